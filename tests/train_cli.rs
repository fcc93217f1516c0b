//! `dorac train` as a user runs it: learning, checkpoints, kill-and-resume, bad data.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn train(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dorac"));
    c.arg("train").args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("dorac runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dorac train failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(needle),
        "expected '{needle}': {stderr}"
    );
}

fn model() -> std::path::PathBuf {
    models_dir().join("mlp2d/model.onnx")
}

fn demo_data() -> std::path::PathBuf {
    models_dir().join("demo/teacher.safetensors")
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const FLAGS: [&str; 6] = [
    "--loss",
    "mse",
    "--batch-size",
    "32",
    "--quiet",
    "--reference",
];

#[test]
fn training_lowers_the_loss_and_writes_a_peft_adapter() {
    let dir = temp_dir("train-learns");
    let out = dir.join("run");
    let stdout = ok(&run_with(&out, &["--epochs", "2"], &[]));
    assert!(stdout.contains("loss"), "{stdout}");
    let m = metrics(&out);
    assert_eq!(m.len(), 64);
    let first = m[0]["loss"].as_f64().unwrap();
    let last = m.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first / 5.0, "loss {first} -> {last}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "checkpoint-64/optimizer.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let adapter = dorac::adapter::load(&out).unwrap();
    assert!(adapter.config.use_dora);
    assert_eq!(adapter.layers.len(), 3);
}

fn run_with(dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let (m, d) = (model(), demo_data());
    let mut args: Vec<&str> = vec![s(&m), "--data", s(&d), "-o", s(dir)];
    // The reference executor unless a test picks a GPU backend.
    let flags: Vec<&str> = if extra.contains(&"--backend") {
        FLAGS
            .iter()
            .copied()
            .filter(|f| *f != "--reference")
            .collect()
    } else {
        FLAGS.to_vec()
    };
    args.extend_from_slice(&flags);
    args.extend_from_slice(extra);
    // Defaults for these tests unless a test sets its own.
    for (flag, value) in [("--lr", "1e-2"), ("--rank", "4")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    train(&args, envs)
}

#[test]
fn a_killed_run_resumes_to_the_same_adapter() {
    resume_case("train-resume", &[]);
}

#[test]
fn a_killed_gpu_run_resumes_to_the_same_adapter() {
    let _ = common::gpu();
    resume_case("train-resume-gpu", &["--backend", "vulkan"]);
}

fn resume_case(name: &str, extra: &[&str]) {
    let dir = temp_dir(name);
    let whole = dir.join("whole");
    let killed = dir.join("killed");
    let mut common = vec![
        "--steps",
        "40",
        "--save-every",
        "10",
        "--schedule",
        "cosine",
        "--warmup",
        "5",
    ];
    common.extend_from_slice(extra);
    ok(&run_with(&whole, &common, &[]));
    // Dies after step 25: checkpoint-20 is the last complete one.
    let out = run_with(&killed, &common, &[("DORAC_ABORT_AFTER_STEP", "25")]);
    assert!(!out.status.success());
    assert!(killed.join("checkpoint-20").exists());
    assert!(!killed.join("adapter_model.safetensors").exists());
    let mut resume = common.clone();
    resume.push("--resume");
    ok(&run_with(&killed, &resume, &[]));
    let a = std::fs::read(whole.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed adapter differs from the uninterrupted one"
    );
    let (ma, mb) = (metrics(&whole), metrics(&killed));
    assert_eq!(ma.len(), 40);
    assert_eq!(
        mb.len(),
        40,
        "steps 21..25 of the killed run are logged once"
    );
    assert_eq!(ma.last().unwrap()["loss"], mb.last().unwrap()["loss"]);
    // Resuming with other settings is refused.
    let mut other = resume.clone();
    other.extend(["--rank", "8"]);
    let out = run_with(&killed, &other, &[]);
    fails_with(&out, "different settings");
}

#[test]
fn bad_data_is_refused_with_the_tensor_named() {
    let dir = temp_dir("train-bad-data");
    let write = |name: &str, tensors: Vec<(&str, Vec<usize>, bool)>| {
        // (name, shape, integer) -> a safetensors file
        let mut m = std::collections::BTreeMap::new();
        let mut ints = vec![];
        for (k, shape, int) in tensors {
            let n: usize = shape.iter().product();
            m.insert(
                k.to_string(),
                dorac::tensor::Array::new(shape, (0..n).map(|i| (i % 3) as f64).collect()),
            );
            if int {
                ints.push(k.to_string());
            }
        }
        let p = dir.join(name);
        write_mixed(&p, &m, &ints);
        p
    };
    let out_dir = dir.join("out");
    let cases = [
        (
            write(
                "names.safetensors",
                vec![
                    ("inputs", vec![8, 16], false),
                    ("target", vec![8, 4], false),
                ],
            ),
            "'x'",
        ),
        (
            write(
                "shape.safetensors",
                vec![("x", vec![8, 15], false), ("target", vec![8, 4], false)],
            ),
            "'x' has shape",
        ),
        (
            write(
                "dtype.safetensors",
                vec![("x", vec![8, 16], true), ("target", vec![8, 4], false)],
            ),
            "int64",
        ),
        (
            write(
                "count.safetensors",
                vec![("x", vec![8, 16], false), ("target", vec![7, 4], false)],
            ),
            "examples",
        ),
    ];
    let mp = model();
    for (file, needle) in &cases {
        let out = train(
            &[
                s(&mp),
                "--data",
                s(file),
                "--loss",
                "mse",
                "-o",
                s(&out_dir),
                "--reference",
            ],
            &[],
        );
        fails_with(&out, needle);
    }
    // Labels out of range for cross-entropy (4 classes).
    let mut m = std::collections::BTreeMap::new();
    m.insert("x".to_string(), dorac::tensor::Array::zeros(vec![8, 16]));
    m.insert(
        "labels".to_string(),
        dorac::tensor::Array::new(vec![8], vec![0., 1., 2., 3., 0., 9., 1., 2.]),
    );
    let p = dir.join("labels.safetensors");
    write_mixed(&p, &m, &["labels".to_string()]);
    let classify = || {
        let args = [
            s(&mp),
            "--data",
            s(&p),
            "--loss",
            "cross-entropy",
            "-o",
            s(&out_dir),
            "--reference",
        ];
        train(&args, &[])
    };
    fails_with(&classify(), "out of range");
    // Float labels for a classification loss.
    write_mixed(&p, &m, &[]);
    fails_with(&classify(), "integers");
    assert!(!out_dir.join("adapter_model.safetensors").exists());
}

#[test]
fn a_diverging_loss_stops_and_keeps_the_last_checkpoint() {
    let dir = temp_dir("train-nan");
    // Batches 1 and 2 are ordinary; batch 3 has targets whose squared error overflows f32.
    let data = dorac::tensors_io::read_safetensors(&demo_data()).unwrap();
    let take = |a: &dorac::tensor::Array, n: usize| {
        let per = a.data.len() / a.shape[0];
        let mut shape = a.shape.clone();
        shape[0] = n;
        dorac::tensor::Array::new(shape, a.data[..n * per].to_vec())
    };
    let mut t = std::collections::BTreeMap::new();
    t.insert("x".to_string(), take(&data["x"], 128));
    let mut target = take(&data["target"], 128);
    for v in &mut target.data[64 * 4..96 * 4] {
        *v = 3e38;
    }
    t.insert("target".to_string(), target);
    let file = dir.join("overflow.safetensors");
    write_mixed(&file, &t, &[]);
    let out_dir = dir.join("out");
    let (m, f) = (model(), file.clone());
    let out = train(
        &[
            s(&m),
            "--data",
            s(&f),
            "--loss",
            "mse",
            "--batch-size",
            "32",
            "--steps",
            "4",
            "--save-every",
            "1",
            "--no-shuffle",
            "--reference",
            "--quiet",
            "-o",
            s(&out_dir),
        ],
        &[],
    );
    // f32 device state overflows (GPU: the loss itself is inf): either way step 3 is named.
    fails_with(&out, "at step 3");
    let (step, ckpt) = dorac::train::checkpoint::latest(&out_dir)
        .unwrap()
        .expect("a checkpoint survives");
    assert_eq!(step, 2, "the last good checkpoint is step 2");
    let adapter = dorac::adapter::load(&ckpt).unwrap();
    for t in adapter.layers.values() {
        assert!(t.a.data.iter().chain(&t.b.data).all(|v| v.is_finite()));
    }
    assert!(
        !out_dir.join("adapter_model.safetensors").exists(),
        "no final adapter from a failed run"
    );
}

/// GPU runs (activations recomputed as the products load them, the default, and with
/// `--store-activations`) against the reference executor's losses.
#[test]
fn training_on_the_gpu_matches_the_reference() {
    let dir = temp_dir("train-gpu");
    let _ = common::gpu();
    let (m, d) = (model(), demo_data());
    let mut args: Vec<&str> = vec![
        s(&m),
        "--data",
        s(&d),
        "--steps",
        "8",
        "--loss",
        "mse",
        "--lr",
        "1e-2",
        "--batch-size",
        "32",
        "--rank",
        "4",
        "--quiet",
    ];
    let g = dir.join("gpu");
    let r = dir.join("ref");
    args.extend(["-o", s(&g)]);
    ok(&train(&args, &[]));
    let n = args.len();
    args[n - 1] = s(&r);
    args.push("--reference");
    ok(&train(&args, &[]));
    // With the activations stored: the same losses, from a plan that keeps more.
    let l = dir.join("stored");
    args.pop();
    args[n - 1] = s(&l);
    args.push("--store-activations");
    ok(&train(&args, &[]));
    let mr = metrics(&r);
    for run in [&g, &l] {
        let mg = metrics(run);
        assert_eq!(mg.len(), mr.len());
        for (a, b) in mg.iter().zip(&mr) {
            let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "{}: gpu loss {a} vs reference {b}",
                run.display()
            );
        }
    }
}

/// Writes f32 tensors, storing the named ones as int64 instead.
fn write_mixed(
    path: &Path,
    tensors: &std::collections::BTreeMap<String, dorac::tensor::Array>,
    ints: &[String],
) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>, bool)> = tensors
        .iter()
        .map(|(k, a)| {
            let int = ints.contains(k);
            let b: Vec<u8> = if int {
                a.data
                    .iter()
                    .flat_map(|&v| (v as i64).to_le_bytes())
                    .collect()
            } else {
                a.data
                    .iter()
                    .flat_map(|&v| (v as f32).to_le_bytes())
                    .collect()
            };
            (k.clone(), a.shape.clone(), b, int)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, shape, b, int)| {
            let dt = if *int {
                safetensors::Dtype::I64
            } else {
                safetensors::Dtype::F32
            };
            (
                k.clone(),
                safetensors::tensor::TensorView::new(dt, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A sequence length the model leaves symbolic comes from the data's tensors (16 tokens an
/// example here), as `run` takes it from its inputs; a `--shape` that disagrees is named.
#[test]
fn the_sequence_length_comes_from_the_data() {
    let dir = temp_dir("train-seq-from-data");
    let model = models_dir().join("gpt2_tiny/legacy_op17_dynamic.onnx");
    let data = models_dir().join("text/corpus.safetensors");
    let out = dir.join("run");
    let common = [
        "--data",
        s(&data),
        "--loss",
        "lm",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--reference",
        "--quiet",
        "-o",
        s(&out),
    ];
    let mut args = vec![s(&model)];
    args.extend(common);
    ok(&train(&args, &[]));
    assert!(out.join("adapter_model.safetensors").exists());
    args.extend(["--overwrite", "--shape", "seq=12"]);
    fails_with(
        &train(&args, &[]),
        "input 'input_ids' has shape [2, 16] (dim 'seq' = 16), but --shape seq=12",
    );
}

/// `--storage int4` (QDoRA): the frozen weights are quantized before the adapters are made, so
/// DoRA's magnitudes start at the quantized weights' column norms, as PEFT takes them from a
/// quantized base's dequantized weights; the GPU, reading the codes, gives the reference's
/// losses; and `--method full`, which would train quantized weights, is refused.
#[test]
fn qdora_trains_on_the_quantized_weights() {
    let dir = temp_dir("train-int4");
    let _ = common::gpu();
    let (m, d) = (model(), demo_data());
    let mut args: Vec<&str> = vec![
        s(&m),
        "--data",
        s(&d),
        "--steps",
        "6",
        "--loss",
        "mse",
        "--batch-size",
        "32",
        "--rank",
        "4",
        "--storage",
        "int4",
    ];
    let (g, r, z) = (dir.join("gpu"), dir.join("ref"), dir.join("lr0"));
    let gpu_run = train(&[&args[..], &["--lr", "1e-2", "-o", s(&g)]].concat(), &[]);
    let stderr = String::from_utf8_lossy(&gpu_run.stderr).into_owned();
    ok(&gpu_run);
    assert!(
        stderr.contains("stored as 4-bit codes in blocks of 32"),
        "{stderr}"
    );
    ok(&train(
        &[&args[..], &["--lr", "1e-2", "-o", s(&r), "--reference"]].concat(),
        &[],
    ));
    let (mg, mr) = (metrics(&g), metrics(&r));
    assert_eq!(mg.len(), 6);
    for (a, b) in mg.iter().zip(&mr) {
        let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "gpu loss {a} vs reference {b}"
        );
    }
    assert!(mg[5]["loss"].as_f64() < mg[0]["loss"].as_f64(), "{mg:?}");

    // Magnitudes at init (lr 1e-30: no step moves them): the quantized weights' column norms,
    // not the f32 ones'.
    args[4] = "1";
    ok(&train(
        &[&args[..], &["--lr", "1e-30", "-o", s(&z), "--reference"]].concat(),
        &[],
    ));
    let adapter = dorac::adapter::load(&z).unwrap();
    let x = dorac::tensor::Array::new(vec![32, 16], vec![0.0; 32 * 16]);
    let f32_graph = load_path(&m, &[("x".to_string(), x)].into());
    let mut quantized = f32_graph.clone();
    let report = dorac::passes::store_codes(&mut quantized, 4);
    assert!(report.tensors > 0);
    let layers = dorac::passes::find_linear_layers(&quantized);
    let mut moved = 0;
    for layer in &layers {
        let Some(saved) = adapter.layers.get(&layer.module) else {
            continue;
        };
        let saved = saved.magnitude.as_ref().unwrap();
        let want = dorac::passes::base_magnitude(&quantized, layer).to_array();
        let f32_norms = dorac::passes::base_magnitude(&f32_graph, layer).to_array();
        let err = dorac::tensor::relative_error(&saved.data, &want.data);
        assert!(
            err < 1e-6,
            "{}: {err:e} from the quantized norms",
            layer.module
        );
        moved += usize::from(dorac::tensor::relative_error(&saved.data, &f32_norms.data) > 1e-4);
    }
    assert!(
        moved > 0,
        "no magnitude differs from the f32 weights' norms"
    );
    // So at init the adapter gives the quantized base's outputs: `eval --storage int4` scores
    // it as the base, and without --storage (the f32 base) it does not.
    let eval = |name: &str, extra: &[&str]| -> f64 {
        let json = dir.join(format!("{name}.json"));
        let mut c = Command::new(env!("CARGO_BIN_EXE_dorac"));
        c.args([
            "eval",
            s(&m),
            "--data",
            s(&d),
            "--loss",
            "mse",
            "--reference",
            "-o",
        ]);
        ok(&c.arg(s(&json)).args(extra).output().expect("dorac runs"));
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        metrics["loss"].as_f64().unwrap()
    };
    let base = eval("base", &["--storage", "int4"]);
    let adapted = eval("adapted", &["--storage", "int4", "--adapter", s(&z)]);
    let on_f32 = eval("on_f32", &["--adapter", s(&z)]);
    assert!(
        (adapted - base).abs() <= 1e-6 * base,
        "{adapted} vs the quantized base's {base}"
    );
    assert!((on_f32 - base).abs() > 1e-4 * base, "{on_f32} vs {base}");

    let full = train(
        &[&args[..], &["--method", "full", "-o", s(&dir.join("full"))]].concat(),
        &[],
    );
    fails_with(&full, "--method full trains the weights themselves");
}
