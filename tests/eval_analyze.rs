//! `dorac eval`, `train --eval-data` and `dorac analyze` against independent computations:
//! models/eval_goldens.json (PEFT in float64 and onnxruntime, by models/make_eval_goldens.py) and
//! models/shift/runs/analysis_goldens.json (numpy from the checkpoints' safetensors, by
//! models/make_analysis_goldens.py).

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn dorac(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dorac"))
        .args(args)
        .current_dir(models_dir().parent().unwrap())
        .output()
        .expect("dorac runs")
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dorac failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// |a - b| / |b|, NaN-safe (NaN never passes).
fn rel(a: f64, b: f64) -> f64 {
    let e = (a - b).abs() / b.abs().max(1e-300);
    if e.is_nan() {
        f64::INFINITY
    } else {
        e
    }
}

/// Every golden case through `dorac eval`: losses within 1e-5 relative, counts exact. The shift
/// model runs with a batch size that does not divide the data set, so the padded last batch is
/// covered; the result must not depend on it.
#[test]
fn eval_matches_peft_and_onnxruntime() {
    let dir = temp_dir("eval_goldens");
    let cases = json(&models_dir().join("eval_goldens.json"));
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let examples = case["examples"].as_u64().unwrap();
        let batches: &[&str] = if examples > 100 {
            &["default", "100"]
        } else {
            &["default"]
        };
        for &batch in batches {
            let out = dir.join(format!("{name}-{batch}.json"));
            let mut args = vec![
                "eval",
                case["model"].as_str().unwrap(),
                "--data",
                case["data"].as_str().unwrap(),
                "--loss",
                case["loss"].as_str().unwrap(),
                "--labels",
                case["labels"].as_str().unwrap(),
                "-o",
                s(&out),
            ];
            if let Some(a) = case["adapter"].as_str() {
                args.extend(["--adapter", a]);
            }
            if batch != "default" {
                args.extend(["--batch-size", batch]);
            }
            let stdout = ok(&dorac(&args));
            assert!(stdout.contains("eval "), "{stdout}");
            let got = json(&out);
            let e = rel(
                got["loss"].as_f64().unwrap(),
                case["loss_value"].as_f64().unwrap(),
            );
            assert!(
                e <= 1e-5,
                "{name} batch {batch}: loss {got} vs {case}: {e:e}"
            );
            for key in ["examples", "counted"] {
                assert_eq!(got[key], case[key], "{name} batch {batch}: {key}");
            }
            assert_eq!(got["correct"], case["correct"], "{name} batch {batch}");
            if let Some(a) = case["accuracy"].as_f64() {
                assert_eq!(got["accuracy"].as_f64().unwrap(), a, "{name}");
            }
        }
    }
}

/// The evaluation inside a training run is the evaluation of what the run saved: the last
/// record of metrics.jsonl equals `dorac eval` of the written adapter (and of the full run's
/// weights), and evaluations land every --eval-every steps and after the last.
#[test]
fn train_eval_data_equals_eval_of_the_saved_run() {
    let dir = temp_dir("train_eval");
    let shift = models_dir().join("shift");
    let (model, train, eval) = (
        shift.join("base.onnx"),
        shift.join("train_b.safetensors"),
        shift.join("eval_b.safetensors"),
    );
    for method in ["dora", "full"] {
        let out = dir.join(method);
        let stdout = ok(&dorac(&[
            "train",
            s(&model),
            "--data",
            s(&train),
            "--eval-data",
            s(&eval),
            "--eval-every",
            "4",
            "--loss",
            "cross-entropy",
            "--method",
            method,
            "--rank",
            "4",
            "--lr",
            "5e-3",
            "--batch-size",
            "32",
            "--steps",
            "10",
            "--quiet",
            "-o",
            s(&out),
        ]));
        assert_eq!(
            stdout.matches("eval cross-entropy loss").count(),
            3,
            "{stdout}"
        );
        let records: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let evaluated: Vec<u64> = records
            .iter()
            .filter(|r| r.get("eval_loss").is_some())
            .map(|r| r["step"].as_u64().unwrap() + 1)
            .collect();
        assert_eq!(evaluated, [4, 8, 10]);
        let last = records.last().unwrap();
        let file = dir.join(format!("{method}.json"));
        ok(&dorac(&[
            "eval",
            s(&model),
            "--adapter",
            s(&out),
            "--data",
            s(&eval),
            "--loss",
            "cross-entropy",
            "-o",
            s(&file),
        ]));
        let m = json(&file);
        let e = rel(
            m["loss"].as_f64().unwrap(),
            last["eval_loss"].as_f64().unwrap(),
        );
        assert!(e <= 1e-6, "{method}: {m} vs {last}: {e:e}");
        assert_eq!(m["accuracy"], last["eval_accuracy"], "{method}");
        // The loss plot is written with the evaluations on it.
        assert!(out.join("loss.png").is_file());
    }
}

/// `dorac analyze` on committed full, LoRA and DoRA runs: every ΔM and ΔD within 1e-5
/// relative of numpy's, the fits likewise, and the scatter drawn.
#[test]
fn analyze_matches_numpy() {
    let dir = temp_dir("analyze");
    let runs = models_dir().join("shift/runs");
    let out = dir.join("analysis");
    let stdout = ok(&dorac(&[
        "analyze",
        s(&models_dir().join("shift/base.onnx")),
        s(&runs.join("full")),
        s(&runs.join("lora")),
        s(&runs.join("dora")),
        "-o",
        s(&out),
    ]));
    assert!(stdout.contains("slope"), "{stdout}");
    let golden = json(&runs.join("analysis_goldens.json"));
    let got = json(&out.join("analysis.json"));
    let want = golden["changes"].as_array().unwrap();
    let have = got["changes"].as_array().unwrap();
    assert_eq!(have.len(), want.len());
    for w in want {
        let h = have
            .iter()
            .find(|h| h["run"] == w["run"] && h["step"] == w["step"] && h["layer"] == w["layer"])
            .unwrap_or_else(|| panic!("no row for {w}"));
        assert_eq!(h["method"], w["method"]);
        for key in ["delta_m", "delta_d"] {
            let e = rel(h[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!(e <= 1e-5, "{key}: {h} vs {w}: {e:e}");
        }
    }
    for method in ["full", "lora", "dora"] {
        let (h, w) = (&got["fits"][method], &golden["fits"][method]);
        for key in ["slope", "intercept", "correlation"] {
            let e = rel(h[key].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!(e <= 1e-5, "{method} {key}: {h} vs {w}: {e:e}");
        }
    }
    let csv = std::fs::read_to_string(out.join("analysis.csv")).unwrap();
    assert_eq!(csv.lines().count(), want.len() + 1);
    let png = std::fs::read(out.join("analysis.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // A run folder without checkpoints is refused by name.
    let empty = dir.join("empty-run");
    std::fs::create_dir_all(&empty).unwrap();
    let bad = dorac(&[
        "analyze",
        s(&models_dir().join("shift/base.onnx")),
        s(&empty),
    ]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && stderr.contains("no checkpoint-<step> folders"),
        "{stderr}"
    );
}
