//! The `dorac` binary as a user meets it: happy paths, and bad input that must end in one clear
//! line, a non-zero exit, no panic and no output file left behind.

mod common;

use common::*;
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dorac(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dorac"))
        .args(args)
        .output()
        .expect("the dorac binary runs")
}

/// Runs dorac and asserts it succeeded, showing its stderr otherwise.
fn dorac_ok(args: &[&str]) -> Output {
    let out = dorac(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a clean failure: exit code 1, one `error:` line mentioning `needle`, no panic, and
/// the output folder holding nothing but `keep`.
fn assert_clean_failure(out: &Output, needle: &str, dir: &Path, keep: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("note:")).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "expected '{needle}' in: {stderr}");
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    left.sort();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

fn model_proto(name: &str) -> dorac::onnx::proto::ModelProto {
    dorac::onnx::load_model(&models_dir().join(name).join("model.onnx")).unwrap()
}

fn write_model(dir: &Path, file: &str, m: &dorac::onnx::proto::ModelProto) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

#[test]
fn rewrite_run_merge_from_the_command_line() {
    let dir = temp_dir("cli-happy");
    let input_dir = dir.join("input");
    std::fs::create_dir_all(&input_dir).unwrap();
    let model = input_dir.join("model.onnx");
    std::fs::copy(models_dir().join("mlp3d/model.onnx"), &model).unwrap();
    let inputs = models_dir().join("mlp3d/inputs.safetensors");
    let adapter_out = dir.join("adapter");

    // Run from `dir`: the default output lands there, not beside the input.
    let out = dorac_in(
        &dir,
        &[
            "rewrite",
            s(&model),
            "--rank",
            "4",
            "--alpha",
            "8",
            "--target",
            "fc",
            "--adapter-out",
            s(&adapter_out),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("blocks.0.fc") && stdout.contains("blocks.1.fc"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("proj_in"),
        "--target fc adapts only the fc layers: {stdout}"
    );
    assert!(stdout.contains("trainable params"), "{stdout}");
    let rewritten = dir.join("model.dora.onnx");
    assert!(rewritten.exists());
    assert!(
        !input_dir.join("model.dora.onnx").exists(),
        "nothing is written into the input's folder by default"
    );
    assert!(adapter_out.join("adapter_config.json").exists());
    assert!(adapter_out.join("adapter_model.safetensors").exists());

    let y = dir.join("y.safetensors");
    let out = dorac_ok(&[
        "run",
        s(&rewritten),
        "--inputs",
        s(&inputs),
        "-o",
        s(&y),
        "--verbose",
    ]);
    // --verbose: one line per phase of the time to the result.
    let err = String::from_utf8_lossy(&out.stderr);
    for phase in ["import", "open the device", "compile pipelines", "run ("] {
        assert!(err.contains(phase), "--verbose misses '{phase}': {err}");
    }
    let got = dorac::tensors_io::read_safetensors(&y).unwrap();
    let ort = read("mlp3d", "ort_outputs.safetensors");
    assert!(rel(&got, &ort, "y") < 1e-5);

    let peft_dir = models_dir().join("mlp3d/peft_dora");
    let merged = dir.join("merged.onnx");
    dorac_ok(&[
        "merge",
        s(&model),
        "--adapter",
        s(&peft_dir),
        "-o",
        s(&merged),
    ]);
    let y2 = dir.join("y2.safetensors");
    dorac_ok(&["run", s(&merged), "--inputs", s(&inputs), "-o", s(&y2)]);
    let y3 = dir.join("y3.safetensors");
    dorac_ok(&[
        "run",
        s(&model),
        "--adapter",
        s(&peft_dir),
        "--inputs",
        s(&inputs),
        "-o",
        s(&y3),
    ]);
    let merged_y = dorac::tensors_io::read_safetensors(&y2).unwrap();
    let unmerged_y = dorac::tensors_io::read_safetensors(&y3).unwrap();
    let peft = read("mlp3d", "peft_dora_outputs.safetensors");
    assert!(rel(&merged_y, &unmerged_y, "y") < 1e-5);
    assert!(rel(&unmerged_y, &peft, "y") < 1e-5);
}

#[test]
fn symbolic_dims_must_be_pinned() {
    let dir = temp_dir("cli-pin");
    let model = models_dir().join("mlp2d/model.onnx");
    let out_file = dir.join("out.onnx");
    let out = dorac(&["rewrite", s(&model), "-o", s(&out_file)]);
    assert_clean_failure(&out, "--shape", &dir, &[]);
    dorac_ok(&[
        "rewrite",
        s(&model),
        "-o",
        s(&out_file),
        "--shape",
        "batch=3",
    ]);
}

#[test]
fn truncated_and_non_onnx_files_are_refused() {
    let dir = temp_dir("cli-bad-files");
    let bytes = std::fs::read(models_dir().join("mlp3d/model.onnx")).unwrap();
    let truncated = dir.join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let text = dir.join("notes.onnx");
    std::fs::write(&text, "this is not a model\n").unwrap();
    for bad in [&truncated, &text] {
        let out_file = dir.join("out.onnx");
        let out = dorac(&["rewrite", s(bad), "-o", s(&out_file)]);
        let name = bad.file_name().unwrap().to_str().unwrap();
        assert_clean_failure(&out, name, &dir, &["truncated.onnx", "notes.onnx"]);
    }
    let out = dorac(&["rewrite", s(&dir.join("missing.onnx"))]);
    assert_clean_failure(
        &out,
        "missing.onnx",
        &dir,
        &["truncated.onnx", "notes.onnx"],
    );
}

#[test]
fn broken_graphs_are_refused_with_the_node_named() {
    let dir = temp_dir("cli-broken");
    // A missing initializer.
    let mut m = model_proto("mlp3d");
    let g = m.graph.as_mut().unwrap();
    let pos = g
        .initializer
        .iter()
        .position(|t| t.name.as_deref() == Some("out.bias"))
        .unwrap();
    g.initializer.remove(pos);
    let missing = write_model(&dir, "missing_init.onnx", &m);
    // A cycle: the first node reads the last node's output.
    let mut m = model_proto("mlp3d");
    let g = m.graph.as_mut().unwrap();
    let last_out = g.node.last().unwrap().output[0].clone();
    g.node[0].input[0] = last_out;
    let cycle = write_model(&dir, "cycle.onnx", &m);
    // Two unsupported op types on three nodes: one error lists them all.
    let mut m = model_proto("mlp3d");
    let g = m.graph.as_mut().unwrap();
    g.node[1].op_type = Some("Loop".into());
    g.node[2].op_type = Some("Scan".into());
    g.node[3].op_type = Some("Loop".into());
    let names: Vec<String> = (1..4).map(|i| g.node[i].name.clone().unwrap()).collect();
    let unsupported = write_model(&dir, "unsupported.onnx", &m);
    let keep = ["missing_init.onnx", "cycle.onnx", "unsupported.onnx"];

    let out_file = dir.join("out.onnx");
    let out = dorac(&["rewrite", s(&missing), "-o", s(&out_file)]);
    assert_clean_failure(&out, "out.bias", &dir, &keep);
    let out = dorac(&["rewrite", s(&cycle), "-o", s(&out_file)]);
    assert_clean_failure(&out, "cycle", &dir, &keep);
    let out = dorac(&["merge", s(&unsupported), "-o", s(&out_file)]);
    for needle in ["Loop", "Scan", &names[0], &names[1], &names[2]] {
        assert_clean_failure(&out, needle, &dir, &keep);
    }
}

#[test]
fn bad_inputs_are_refused_before_running() {
    let dir = temp_dir("cli-bad-inputs");
    let model = models_dir().join("mlp3d/model.onnx");
    let mut t = std::collections::BTreeMap::new();
    t.insert("x".to_string(), dorac::tensor::Array::zeros(vec![2, 5, 15]));
    let wrong_shape = dir.join("wrong_shape.safetensors");
    dorac::tensors_io::write_safetensors(&wrong_shape, &t).unwrap();
    let mut t = std::collections::BTreeMap::new();
    t.insert(
        "input".to_string(),
        dorac::tensor::Array::zeros(vec![2, 5, 16]),
    );
    let wrong_name = dir.join("wrong_name.safetensors");
    dorac::tensors_io::write_safetensors(&wrong_name, &t).unwrap();
    let keep = ["wrong_shape.safetensors", "wrong_name.safetensors"];
    let out_file = dir.join("y.safetensors");
    let out = dorac(&[
        "run",
        s(&model),
        "--inputs",
        s(&wrong_shape),
        "-o",
        s(&out_file),
    ]);
    assert_clean_failure(&out, "'x'", &dir, &keep);
    let out = dorac(&[
        "run",
        s(&model),
        "--inputs",
        s(&wrong_name),
        "-o",
        s(&out_file),
    ]);
    assert_clean_failure(&out, "'x'", &dir, &keep);
    // An adapter for another model.
    let other = models_dir().join("mlp2d/peft_dora");
    let inputs = models_dir().join("mlp3d/inputs.safetensors");
    let out = dorac(&[
        "run",
        s(&model),
        "--adapter",
        s(&other),
        "--inputs",
        s(&inputs),
        "-o",
        s(&out_file),
    ]);
    assert_clean_failure(&out, "layers.0", &dir, &keep);
}

#[test]
fn without_a_gpu_adapter_run_falls_back_to_the_reference_executor() {
    let dir = temp_dir("cli-fallback");
    let model = models_dir().join("mlp3d/model.onnx");
    let inputs = models_dir().join("mlp3d/inputs.safetensors");
    let y = dir.join("y.safetensors");
    // No DX12 on this platform: wgpu finds no adapter.
    let out = Command::new(env!("CARGO_BIN_EXE_dorac"))
        .args(["run", s(&model), "--inputs", s(&inputs), "-o", s(&y)])
        .env("WGPU_BACKEND", if cfg!(windows) { "metal" } else { "dx12" })
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("no GPU adapter found"), "{stderr}");
    assert!(stderr.contains("mesa-vulkan-drivers"), "{stderr}");
    let got = dorac::tensors_io::read_safetensors(&y).unwrap();
    assert!(rel(&got, &read("mlp3d", "ort_outputs.safetensors"), "y") < 1e-5);
}

/// `compile --device` plans for the adapter wgpu finds (lavapipe here: the CPU target's row-
/// broadcast matmuls and 48 bindings a kernel), where the default plan is the portable one. On
/// a DoRA training step the device plan fuses more: fewer kernels.
#[test]
fn compile_plans_for_the_device_when_asked() {
    let dir = temp_dir("cli-compile-device");
    let model = models_dir().join("mlp2d").join("model.onnx");
    let kernels = |device: bool| {
        let out_dir = dir.join(if device { "device" } else { "portable" });
        let mut args = vec![
            "compile",
            s(&model),
            "--train",
            "--shape",
            "batch=8",
            "--emit",
            "wgsl",
            "-o",
            s(&out_dir),
        ];
        if device {
            args.push("--device");
        }
        let out = dorac(&args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let n: usize = stdout
            .lines()
            .find_map(|l| {
                l.strip_suffix(" kernels; constant-only (shape) work left in the program: none")
            })
            .unwrap_or_else(|| panic!("no kernel count in {stdout}"))
            .parse()
            .unwrap();
        let cpu_matmuls = std::fs::read_dir(&out_dir)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
            .filter(|src| src.contains("Row-broadcast matrix product for CPU adapters"))
            .count();
        (stdout, n, cpu_matmuls)
    };
    let (_, portable, portable_cpu) = kernels(false);
    let (stdout, device, device_cpu) = kernels(true);
    assert!(stdout.contains("planned for "), "{stdout}");
    assert_eq!(portable_cpu, 0);
    if stdout.contains("llvmpipe") {
        assert!(device_cpu > 0, "{stdout}");
        assert!(
            device < portable,
            "device {device} kernels, portable {portable}"
        );
    }
}

#[test]
fn compile_reports_no_shape_work_left_in_a_transformer() {
    let dir = temp_dir("cli-compile-gpt2");
    for (file, extra) in [
        ("legacy_op17.onnx", vec![]),
        (
            "legacy_op17_dynamic.onnx",
            vec!["--shape", "batch=2", "--shape", "seq=16"],
        ),
    ] {
        let model = models_dir().join("gpt2_tiny").join(file);
        let mut args = vec![
            "compile",
            s(&model),
            "--emit",
            "plan",
            "--emit",
            "dot",
            "--emit",
            "wgsl",
            "-o",
            s(&dir),
        ];
        args.extend(extra);
        let out = dorac(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("constant-only (shape) work left in the program: none"),
            "{stdout}"
        );
        let plan = std::fs::read_to_string(dir.join("plan.txt")).unwrap();
        for shape_op in ["shape", "constant_of_shape", "range", "equal", "unsqueeze"] {
            assert!(
                !plan.contains(&format!("_{shape_op}_")),
                "{file}: a {shape_op} kernel is left:\n{plan}"
            );
        }
        assert!(std::fs::read_to_string(dir.join("graph.dot"))
            .unwrap()
            .starts_with("digraph"));
    }
}

#[test]
fn generate_decodes_greedily_with_and_without_an_adapter() {
    let model = models_dir().join("gpt2_tiny/legacy_op17_dynamic.onnx");
    let adapter = models_dir().join("gpt2_tiny/peft_dora");
    let base = dorac(&[
        "generate",
        s(&model),
        "--prompt",
        "The ",
        "--tokens",
        "8",
        "--shape",
        "seq=16",
    ]);
    let adapted = dorac(&[
        "generate",
        s(&model),
        "--adapter",
        s(&adapter),
        "--prompt",
        "The ",
        "--tokens",
        "8",
        "--shape",
        "seq=16",
    ]);
    for out in [&base, &adapted] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("The ["));
    }
    // The same model with and without the adapter decodes differently, and decoding is
    // deterministic.
    assert_ne!(base.stdout, adapted.stdout);
    let again = dorac(&[
        "generate",
        s(&model),
        "--prompt",
        "The ",
        "--tokens",
        "8",
        "--shape",
        "seq=16",
    ]);
    assert_eq!(base.stdout, again.stdout);
}

/// `dorac run` takes shapes and split sizes fed as graph inputs from the inputs file (pinned at
/// import), and writes outputs in their types, 0-d ones included: conformance cases through the
/// command line, against their expected outputs.
#[test]
fn run_pins_shape_inputs_and_writes_typed_outputs() {
    use dorac::tensors_io::{read_safetensors_typed, Stored};
    let dir = temp_dir("run_typed");
    let suite = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    for case in [
        "test_reshape_negative_dim",
        "test_split_variable_parts_1d_opset18",
        "test_equal",
        "test_matmul_1d_1d",
    ] {
        let case_dir = suite.join(case);
        let out = dir.join(format!("{case}.safetensors"));
        dorac_ok(&[
            "run",
            s(&case_dir.join("model.onnx")),
            "--inputs",
            s(&case_dir.join("inputs.safetensors")),
            "-o",
            s(&out),
        ]);
        let got = read_safetensors_typed(&out).unwrap();
        let want = read_safetensors_typed(&case_dir.join("outputs.safetensors")).unwrap();
        assert_eq!(got.len(), want.len(), "{case}");
        for (name, (w, w_kind)) in &want {
            let (g, g_kind) = &got[name];
            assert_eq!(g.shape, w.shape, "{case}: {name}");
            let kind = |k: &Stored| match k {
                Stored::Float(_) => "float",
                Stored::Int("bool") => "bool",
                Stored::Int(_) => "int",
            };
            assert_eq!(kind(g_kind), kind(w_kind), "{case}: {name}");
            let err = dorac::tensor::relative_error(&g.data, &w.data);
            assert!(err <= 1e-5, "{case}: {name}: relative error {err:e}");
        }
    }
}

/// `--storage` on an f32 model: `compile` shows the weights stored as half (half the bytes) or
/// as block codes, and `run` says what was rounded (block codes: at most half a step, a
/// fifteenth of a block's range at 4 bits) and how far the outputs moved from the f32 weights'.
#[test]
fn storage_flag_stores_weights_compactly_and_reports_the_error() {
    let dir = temp_dir("cli-storage");
    let model = models_dir().join("mlp3d/model.onnx");
    let inputs = models_dir().join("mlp3d/inputs.safetensors");
    let plan_dir = dir.join("plan");
    let plan = |format: &str| {
        let (m, p) = (model.to_str().unwrap(), plan_dir.to_str().unwrap());
        dorac_ok(&["compile", m, "--storage", format, "-o", p]);
        std::fs::read_to_string(plan_dir.join("plan.txt")).unwrap()
    };
    for (format, stored) in [("f16", "f16"), ("int4", "4-bit blocks of 32")] {
        let plan = plan(format);
        assert!(plan.contains(&format!("stored as {stored}")), "{plan}");
    }
    for (format, said, rounding_bound, bound) in [
        ("f16", "f16", 1e-3, 1e-2),
        ("bf16", "bf16", 4e-3, 5e-2),
        ("int4", "4-bit codes in blocks of 32", 1.0 / 15.0, 5e-2),
        ("int8", "8-bit codes in blocks of 32", 1.0 / 255.0, 2e-3),
    ] {
        let (m, i) = (model.to_str().unwrap(), inputs.to_str().unwrap());
        let out = dorac_ok(&["run", m, "--inputs", i, "--storage", format]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let said = format!("stored as {said}, max rounding error ");
        let rounding: f64 = (stderr.split(&said).nth(1))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{stderr}"));
        assert!(
            rounding > 0.0 && rounding <= rounding_bound,
            "{format}: {stderr}"
        );
        let line = stdout
            .lines()
            .find(|l| l.contains("relative difference from f32 weights"))
            .unwrap_or_else(|| panic!("{stdout}"));
        let err: f64 = line.split_whitespace().last().unwrap().parse().unwrap();
        assert!(err > 0.0 && err < bound, "{format}: {line}");
    }
}
