//! Bad input gets a one-line error naming what is wrong, never a panic, an abort or a silent
//! wrong result: PEFT adapters whose config and tensors disagree, non-finite adapter values,
//! hyperparameters out of range, sizes over the memory budget.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn dorac(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dorac"))
        .args(args)
        .current_dir(models_dir().parent().unwrap())
        // The same budget on every machine, so the size checks below do not depend on its RAM.
        .env("DORAC_MEMORY_BUDGET", "4G")
        .output()
        .expect("the dorac binary runs")
}

/// Asserts exit status 1 with one `error:` line that contains every needle.
fn fails_with(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    for n in needles {
        assert!(errors[0].contains(n), "'{n}' missing: {stderr}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A copy of models/shift/peft_dora with its config edited by `config` and its tensors by
/// `tensors`.
fn edited_adapter(
    dir: &Path,
    name: &str,
    config: impl Fn(&mut serde_json::Value),
    tensors: impl Fn(&mut std::collections::BTreeMap<String, dorac::tensor::Array>),
) -> std::path::PathBuf {
    common::edited_adapter(
        &models_dir().join("shift/peft_dora"),
        &dir.join(name),
        config,
        tensors,
    )
}

fn eval_with(adapter: &Path) -> Output {
    dorac(&[
        "eval",
        "models/shift/base.onnx",
        "--adapter",
        s(adapter),
        "--data",
        "models/shift/eval_b.safetensors",
        "--loss",
        "cross-entropy",
        "--reference",
    ])
}

#[test]
fn peft_config_fields_are_honoured_or_refused_by_name() {
    let dir = temp_dir("peft-config-fields");
    let keep = |_: &mut std::collections::BTreeMap<String, dorac::tensor::Array>| {};
    // r disagrees with the tensors' rank.
    let a = edited_adapter(&dir, "r", |c| c["r"] = 8.into(), keep);
    fails_with(&eval_with(&a), &["rank 4 tensors", "rank 8"]);
    // rank_pattern gives a module another rank.
    let a = edited_adapter(
        &dir,
        "rank-pattern",
        |c| c["rank_pattern"] = serde_json::json!({"fc2": 2}),
        keep,
    );
    fails_with(&eval_with(&a), &["module 'fc2'", "rank 2", "rank_pattern"]);
    // target_modules that do not cover a module with tensors.
    let a = edited_adapter(
        &dir,
        "targets",
        |c| c["target_modules"] = serde_json::json!(["fc1", "fc2"]),
        keep,
    );
    fails_with(&eval_with(&a), &["module 'head'", "target_modules"]);
    // Fields that change the computation and that dorac does not implement.
    for (key, value) in [
        ("exclude_modules", serde_json::json!(["fc1"])),
        ("layers_to_transform", serde_json::json!([0])),
        ("lora_bias", serde_json::json!(true)),
        ("modules_to_save", serde_json::json!(["head"])),
    ] {
        let a = edited_adapter(&dir, key, |c| c[key] = value.clone(), keep);
        fails_with(&eval_with(&a), &[&format!("'{key}'"), "does not implement"]);
    }
    // Magnitudes with use_dora false would silently be LoRA.
    let a = edited_adapter(&dir, "no-dora", |c| c["use_dora"] = false.into(), keep);
    fails_with(
        &eval_with(&a),
        &["lora_magnitude_vector", "use_dora: false"],
    );
    // Non-finite values.
    for (what, bad) in [
        ("lora_A", f64::NAN),
        ("lora_magnitude_vector", f64::INFINITY),
    ] {
        let a = edited_adapter(
            &dir,
            what,
            |_| {},
            |t| {
                let key = t.keys().find(|k| k.contains(what)).unwrap().clone();
                t.get_mut(&key).unwrap().data[3] = bad;
            },
        );
        fails_with(&eval_with(&a), &[what, "must be finite"]);
    }
    // The untouched adapter still evaluates.
    let out = eval_with(&models_dir().join("shift/peft_dora"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hyperparameters_out_of_range_are_refused() {
    let dir = temp_dir("hyperparameters");
    let out = dir.join("run");
    for (flag, needle) in [
        ("--lr=-1", "--lr -1"),
        ("--lr=nan", "--lr NaN"),
        ("--grad-clip=-1", "--grad-clip -1"),
        ("--weight-decay=-0.5", "--weight-decay -0.5"),
        ("--eps=0", "--eps 0"),
        ("--eval-every=0", "--eval-every 0"),
    ] {
        let mut extra = vec![flag];
        if flag.starts_with("--eval-every") {
            extra.extend(["--eval-data", "models/demo/teacher.safetensors"]);
        }
        fails_with(&train_into(&out, &extra), &[needle]);
    }
    assert!(!out.exists(), "nothing is written for a refused run");
}

/// Ranks and pinned shapes a user can type are checked against the memory budget before
/// anything is allocated.
#[test]
fn huge_ranks_and_shapes_are_refused() {
    for rank in ["2147483648", "18446744073709551615", "1000000"] {
        fails_with(
            &dorac(&[
                "rewrite",
                "models/mlp3d/model.onnx",
                "--rank",
                rank,
                "-o",
                "/dev/null",
            ]),
            &["memory budget"],
        );
    }
    fails_with(
        &dorac(&[
            "generate",
            "models/gpt2_tiny/legacy_op17_dynamic.onnx",
            "--prompt",
            "The ",
            "--tokens",
            "1",
            "--shape",
            "seq=100000",
        ]),
        &["memory budget", "DORAC_MEMORY_BUDGET"],
    );
}

fn train_into(out: &Path, extra: &[&str]) -> Output {
    let steps = if extra.contains(&"--steps") {
        None
    } else {
        Some("2")
    };
    let mut args = vec![
        "train",
        "models/mlp2d/model.onnx",
        "--data",
        "models/demo/teacher.safetensors",
        "--loss",
        "mse",
        "--quiet",
        "-o",
        s(out),
    ];
    if let Some(n) = steps {
        args.extend(["--steps", n]);
    }
    args.extend(extra);
    dorac(&args)
}

/// A process id that no running process has.
fn dead_pid() -> u32 {
    (400_000..)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap()
}

/// A training folder: one run at a time (a dead run's lock is taken over), an earlier run's
/// checkpoints refused unless --overwrite, and killed runs' temporary files cleaned away.
#[test]
fn training_folders_are_locked_fresh_and_clean() {
    let dir = temp_dir("training-folders");
    let out = dir.join("run");
    std::fs::create_dir_all(&out).unwrap();
    let lock = out.join(".dorac-train.lock");
    // A live holder (this test process) keeps others out.
    std::fs::write(&lock, std::process::id().to_string()).unwrap();
    fails_with(&train_into(&out, &[]), &["another dorac run", "process"]);
    // A dead one does not; its leftovers go too.
    let dead = dead_pid();
    std::fs::write(&lock, dead.to_string()).unwrap();
    std::fs::create_dir_all(out.join(format!(".checkpoint-7.tmp-{dead}"))).unwrap();
    std::fs::write(out.join(format!(".metrics.jsonl.tmp-{dead}")), b"torn").unwrap();
    let first = train_into(&out, &[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // A second fresh run would mix with the first one's checkpoints.
    fails_with(
        &train_into(&out, &[]),
        &["checkpoint(s) of an earlier run", "--overwrite"],
    );
    let again = train_into(&out, &["--overwrite", "--steps", "3"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let (step, _) = dorac::train::checkpoint::latest(&out).unwrap().unwrap();
    assert_eq!(step, 3);
    assert_eq!(dorac::train::checkpoint::list(&out).unwrap().len(), 1);
}

/// Errors say what they concern as data (`Error::subject`, `Error::Mismatch`), so a caller
/// handles them without reading their text.
#[test]
fn errors_carry_their_subject_as_data() {
    use dorac::error::{Error, Subject};
    use dorac::ir::{GraphBuilder, Op};
    let dir = temp_dir("errors_carry_their_subject_as_data");
    // A file that is not a model: the file.
    let empty = dir.join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let e = dorac::onnx::load_model(&empty).unwrap_err();
    assert!(matches!(e, Error::Onnx { .. }), "{e}");
    assert_eq!(e.subject(), Some(&Subject::File(empty.clone())), "{e}");
    // Shapes that do not fit: the node, by its label.
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![2, 3]);
    let w = g.add_input("w", vec![4, 5]);
    let e = g.add(Op::MatMul, &[x, w], "y", "/fc/MatMul").unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    assert_eq!(e.subject(), Some(&Subject::node("/fc/MatMul")), "{e}");
    // A flag's value: the flag and the value.
    let e = dorac::onnx::ShapePins::parse(&["seq=abc"]).unwrap_err();
    assert_eq!(
        e.subject(),
        Some(&Subject::flag_value("--shape", "seq=abc")),
        "{e}"
    );
    // A tensor of the wrong shape: expected against found.
    let e = dorac::tensors_io::expect_shape("input", "x", &[2, 3], &[2, 4]).unwrap_err();
    match &e {
        Error::Mismatch {
            found, expected, ..
        } => assert_eq!((found.as_str(), expected.as_str()), ("2x3", "2x4")),
        other => panic!("{other}"),
    }
    assert_eq!(e.to_string(), "input 'x' has shape 2x3, expected 2x4");
}
