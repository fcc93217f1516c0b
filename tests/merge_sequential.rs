//! `dorac merge --adapter A --adapter B`: adapters merged one after the other, each DoRA
//! adapter's magnitude and direction applied to the weights the previous one produced. Checked
//! against unmerged inference of the same sequence: A merged, then B applied as a live DoRA
//! layer (its norm computed at run time from the weights A produced).

mod common;

use common::*;
use dorac::tensor::relative_error;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A second DoRA adapter for mlp2d: PEFT's, with B and the magnitudes changed.
fn second_adapter(dir: &Path) -> std::path::PathBuf {
    edited_adapter(
        &models_dir().join("mlp2d/peft_dora"),
        &dir.join("second"),
        |_| {},
        |t| {
            for (k, a) in t.iter_mut() {
                for (i, v) in a.data.iter_mut().enumerate() {
                    if k.contains("lora_B") {
                        *v = -0.7 * *v + 0.01 * ((i % 7) as f64 - 3.0);
                    } else if k.contains("magnitude") {
                        *v *= 1.0 + 0.05 * ((i % 5) as f64 - 2.0);
                    }
                }
            }
        },
    )
}

#[test]
fn two_dora_adapters_merge_as_applied_in_sequence() {
    let dir = temp_dir("merge-sequential");
    let model = models_dir().join("mlp2d/model.onnx");
    let first = models_dir().join("mlp2d/peft_dora");
    let second = second_adapter(&dir);
    let merged = dir.join("merged.onnx");
    let out = Command::new(env!("CARGO_BIN_EXE_dorac"))
        .args([
            "merge",
            s(&model),
            "--adapter",
            s(&first),
            "--adapter",
            s(&second),
            "--shape",
            "batch=8",
            "-o",
            s(&merged),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("merged ").count(), 2, "{stdout}");

    let inputs = read("mlp2d", "inputs.safetensors");
    let x = &inputs["x"];
    let batch: std::collections::BTreeMap<String, dorac::tensor::Array> = [(
        "x".to_string(),
        dorac::tensor::Array::new(
            vec![8, 16],
            x.data.iter().cycle().take(8 * 16).copied().collect(),
        ),
    )]
    .into();
    let pins: HashMap<String, usize> = [("batch".to_string(), 8)].into();
    let load = |path: &Path| {
        let m = dorac::onnx::load_model(path).unwrap();
        dorac::onnx::import(&m, path.parent().unwrap(), &pins, &HashMap::new()).unwrap()
    };
    let apply = |g: &mut dorac::ir::Graph, dir: &Path| {
        let a = dorac::adapter::load(dir).unwrap();
        dorac::adapter::apply(g, &a).unwrap();
    };
    // Unmerged sequence: A folded into the weights, B live on top of them.
    let mut seq = load(&model);
    apply(&mut seq, &first);
    dorac::passes::merge_adapters(&mut seq).unwrap();
    apply(&mut seq, &second);
    let want = run_reference(&seq, &batch);
    let got = run_reference(&load(&merged), &batch);
    let e = relative_error(&got["y"].data, &want["y"].data);
    assert!(e <= 1e-5, "merged vs sequential: {e:e}");
    // The first adapter matters: B alone on the base model gives something else.
    let mut alone = load(&model);
    apply(&mut alone, &second);
    let other = run_reference(&alone, &batch);
    assert!(relative_error(&other["y"].data, &want["y"].data) > 1e-3);
    // And on the GPU, the merged model computes the same.
    let gpu = run_gpu(&load(&merged), &batch);
    assert!(relative_error(&gpu["y"].data, &want["y"].data) <= 1e-5);
}

/// A full fine-tuning run's weights merge into the model's own file too, with no `--shape`, and
/// the merged model computes what the run's weights compute.
#[test]
fn full_fine_tuned_weights_merge_into_the_file() {
    let dir = temp_dir("merge-full");
    let model = models_dir().join("mlp2d/model.onnx");
    let data = models_dir().join("demo/teacher.safetensors");
    let ok = |args: &[&str]| dorac_ok(&dir, args);
    ok(&[
        "train",
        s(&model),
        "--data",
        s(&data),
        "--loss",
        "mse",
        "--steps",
        "2",
        "--method",
        "full",
        "--lr",
        "1e-2",
        "-o",
        "full",
    ]);
    let said = ok(&["merge", s(&model), "--adapter", "full", "-o", "merged.onnx"]);
    assert!(
        said.contains("took 3 fine-tuned weights") && said.contains("dims as they were"),
        "{said}"
    );
    let inputs = models_dir().join("mlp2d/inputs.safetensors");
    ok(&[
        "run",
        "merged.onnx",
        "--inputs",
        s(&inputs),
        "--reference",
        "-o",
        "got.safetensors",
    ]);
    ok(&[
        "run",
        s(&model),
        "--adapter",
        "full",
        "--inputs",
        s(&inputs),
        "--reference",
        "-o",
        "want.safetensors",
    ]);
    let got = dorac::tensors_io::read_safetensors(&dir.join("got.safetensors")).unwrap();
    let want = dorac::tensors_io::read_safetensors(&dir.join("want.safetensors")).unwrap();
    let base = read("mlp2d", "ort_outputs.safetensors");
    assert!(relative_error(&got["y"].data, &want["y"].data) < 1e-6);
    assert!(
        relative_error(&got["y"].data, &base["y"].data) > 1e-4,
        "the weights changed nothing"
    );
}
