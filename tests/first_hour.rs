//! A new user's first hour: one flag vocabulary, help that shows every default and examples
//! that work, errors that name the cause and the fix, outputs where the user is, adapters PEFT
//! reads as its own, and the README's quickstart run exactly as written.

mod common;

use common::*;
use dorac::ir::{unary, GraphBuilder, Op};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ok(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one `error:` line of a failed run (no panic, exit status 1).
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A scratch folder where `models/` is the repository's, as it is for a user in a clone.
fn workdir(test: &str) -> PathBuf {
    let dir = temp_dir(test);
    #[cfg(unix)]
    std::os::unix::fs::symlink(models_dir(), dir.join("models")).unwrap();
    dir
}

const COMMANDS: [&str; 9] = [
    "rewrite", "run", "merge", "train", "eval", "analyze", "compile", "generate", "demo",
];

fn help(command: Option<&str>) -> String {
    let mut args: Vec<&str> = command.into_iter().collect();
    args.push("--help");
    ok(&dorac_in(&models_dir(), &args), "--help")
}

/// Splits an example line as a shell would (single and double quotes, no expansions).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = vec![];
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut started = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, c) if c.is_whitespace() => {
                if started || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                started = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if started || !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// The `dorac ...` commands of an "Examples:" block, continuation lines joined.
fn examples(help: &str) -> Vec<Vec<String>> {
    let Some(block) = help.split("Examples:").nth(1) else {
        return vec![];
    };
    let mut lines: Vec<String> = vec![];
    for line in block.lines() {
        let t = line.trim();
        match lines.last_mut() {
            Some(last) if last.ends_with('\\') => {
                last.pop();
                last.push(' ');
                last.push_str(t);
            }
            _ if t.starts_with("dorac ") => lines.push(t.to_string()),
            _ => {}
        }
    }
    lines.iter().map(|l| shell_words(l)[1..].to_vec()).collect()
}

/// Every subcommand's help groups its flags under headings, shows a default for every option
/// that takes a value and is not required, and ends with examples.
#[test]
fn help_shows_groups_defaults_and_examples() {
    let top = help(None);
    assert!(examples(&top).len() >= 3, "{top}");
    for c in COMMANDS {
        let text = help(Some(c));
        assert!(
            examples(&text).len() >= 2,
            "{c}: fewer than 2 examples:\n{text}"
        );
        let usage = text.lines().find(|l| l.starts_with("Usage:")).unwrap();
        // Option entries: a line starting with the flag, then its description lines.
        let mut entries: Vec<String> = vec![];
        for line in text.split("Examples:").next().unwrap().lines() {
            let t = line.trim_start();
            // Flags are indented 2 (`-o, --output`) or 6 (`--lr`); deeper lines are text.
            let indent = line.len() - t.len();
            if t.starts_with('-') && (2..=6).contains(&indent) {
                entries.push(line.to_string());
            } else if let Some(e) = entries.last_mut() {
                if line.starts_with("    ") {
                    e.push_str(line);
                }
            }
        }
        for e in &entries {
            let flag = e.split_whitespace().find(|w| w.starts_with("--")).unwrap();
            let flag = flag.trim_end_matches(',');
            let takes_value = e.contains(" <");
            let required = usage.contains(flag);
            if takes_value && !required && !e.contains("[default") {
                panic!("{c} {flag}: no default shown: {e}");
            }
        }
    }
    let train = help(Some("train"));
    for heading in [
        "Data and loss:",
        "Steps:",
        "Optimizer:",
        "Adapter:",
        "Output:",
        "Engine:",
        "Shapes:",
    ] {
        assert!(train.contains(heading), "train --help lacks '{heading}'");
    }
    // One vocabulary: -o is always what the command writes.
    for c in [
        "rewrite", "run", "merge", "train", "eval", "analyze", "compile", "demo",
    ] {
        let text = help(Some(c));
        assert!(text.contains("-o, --output"), "{c} has no -o/--output");
    }
    assert!(train.contains("--loss-output"));
}

/// Each subcommand's examples, run in order as a user would from a clone: each succeeds, and
/// the training examples show a falling loss.
#[test]
fn help_examples_run() {
    let dir = workdir("help-examples");
    // The top-level examples repeat some of the commands': they run in a folder of their own.
    let top = workdir("help-examples-top");
    for c in COMMANDS.iter().map(|c| Some(*c)).chain([None]) {
        let dir = if c.is_none() { &top } else { &dir };
        for args in examples(&help(c)) {
            let words: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = ok(&dorac_in(dir, &words), &args.join(" "));
            if words[0] == "train" {
                let line = out.lines().find(|l| l.starts_with("loss ")).unwrap();
                let nums: Vec<f64> = line
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                assert!(nums[1] < nums[0] * 0.8, "the loss hardly fell: {line}");
            }
        }
    }
    // Nothing was written into the models folder.
    let status = Command::new("git")
        .args(["status", "--porcelain", "--", "models"])
        .current_dir(models_dir())
        .output();
    if let Ok(st) = status {
        let text = String::from_utf8_lossy(&st.stdout);
        assert!(
            !text.lines().any(|l| l.starts_with("??")),
            "files appeared under models/: {text}"
        );
    }
}

/// `train -o` is the output folder (also spelled `--out`), `--loss-output` the model output the
/// loss reads; without -o the folder lands in the current directory, not beside the model.
#[test]
fn train_flags_and_default_output() {
    let dir = workdir("train-vocabulary");
    let common = [
        "--data",
        "models/demo/teacher.safetensors",
        "--loss",
        "mse",
        "--steps",
        "2",
        "--quiet",
    ];
    let mut args = vec!["train", "models/mlp2d/model.onnx"];
    args.extend(common);
    ok(&dorac_in(&dir, &args), "train without -o");
    assert!(dir.join("model-dora/adapter_config.json").is_file());
    assert!(!models_dir().join("mlp2d/model-dora").exists());

    let mut named = args.clone();
    named.extend(["--loss-output", "y", "-o", "named"]);
    ok(&dorac_in(&dir, &named), "train -o");
    assert!(dir.join("named/adapter_model.safetensors").is_file());
    let mut old = args.clone();
    old.extend(["--out", "old-spelling"]);
    ok(&dorac_in(&dir, &old), "train --out");
    assert!(dir.join("old-spelling").is_dir());

    let mut wrong = args.clone();
    wrong.extend(["--loss-output", "logits", "-o", "wrong"]);
    let err = error_line(&dorac_in(&dir, &wrong));
    assert!(
        err.contains("--loss-output logits: the model's outputs are y"),
        "{err}"
    );
}

/// A model exported with a fixed batch: the default batch is that one, and another batch size
/// fails with an error naming the input, the exported size and the flag that fixes it.
#[test]
fn fixed_batch_exports_say_what_to_do() {
    let dir = workdir("fixed-batch");
    let data = dir.join("lm.safetensors");
    let ids: Vec<f64> = (0..8 * 16).map(|i| (i * 7 % 256) as f64).collect();
    let ids = dorac::tensor::Array::new(vec![8, 16], ids);
    let typed = [("input_ids", &ids), ("labels", &ids)]
        .into_iter()
        .map(|(k, a)| (k.to_string(), (a.clone(), dorac::tensor::DType::I64)))
        .collect();
    dorac::tensors_io::write_safetensors_typed(&data, &typed).unwrap();
    let base = [
        "train",
        "models/gpt2_tiny/legacy_op17.onnx",
        "--data",
        s(&data),
        "--loss",
        "lm",
        "--steps",
        "1",
        "--quiet",
    ];
    let mut args = base.to_vec();
    args.extend(["-o", "ok"]);
    let out = ok(&dorac_in(&dir, &args), "train at the exported batch");
    assert!(out.contains("batch 2"), "{out}");
    let mut args = base.to_vec();
    args.extend(["--batch-size", "4", "-o", "bad"]);
    let err = error_line(&dorac_in(&dir, &args));
    for needle in [
        "fixed batch of 2",
        "input 'input_ids'",
        "--batch-size 2",
        "dynamic batch axis",
    ] {
        assert!(err.contains(needle), "'{needle}' missing: {err}");
    }
}

/// A tensor over the device's binding limit is refused with the limit's name and size and the
/// way around it.
#[test]
fn binding_limit_error_suggests_reference() {
    let gpu = gpu();
    let limit = gpu.limits().max_storage_buffer_binding_size as usize;
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![limit / 4 + 1024]);
    let y = g.add(Op::Unary(unary::RELU), &[x], "y", "y").unwrap();
    g.add_output("y", y);
    let err = match dorac::runtime::Executable::compile(gpu, &g) {
        Ok(_) => panic!("a buffer over the binding limit was accepted"),
        Err(e) => e.to_string(),
    };
    for needle in [
        "tensor 'x'",
        "max_storage_buffer_binding_size",
        &limit.to_string(),
        "--reference",
    ] {
        assert!(err.contains(needle), "'{needle}' missing: {err}");
    }
}

/// An adapter saved from a model that wraps the exported one (every module name has an extra
/// prefix) is refused with that explanation and the names side by side.
#[test]
fn adapter_with_a_prefix_says_so() {
    let dir = workdir("prefix");
    edited_adapter(
        &models_dir().join("shift/peft_dora"),
        &dir.join("wrapped"),
        |_| {},
        |t| {
            *t = std::mem::take(t)
                .into_iter()
                .map(|(k, v)| (k.replace("base_model.model.", "base_model.model.net."), v))
                .collect();
        },
    );
    let err = error_line(&dorac_in(
        &dir,
        &[
            "eval",
            "models/shift/base.onnx",
            "--adapter",
            "wrapped",
            "--data",
            "models/shift/eval_b.safetensors",
            "--loss",
            "cross-entropy",
        ],
    ));
    assert!(err.contains("start with 'net.'"), "{err}");
    assert!(err.contains("'net.fc1' is the model's 'fc1'"), "{err}");
}

/// Adapters written for PEFT carry the user's target patterns, the base model's name when given
/// (or the loaded adapter's), and every field PEFT writes.
#[test]
fn saved_adapters_carry_peft_fields() {
    let dir = workdir("peft-config");
    let config = |d: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join(d).join("adapter_config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let train = |extra: &[&str], out: &str| {
        let mut args = vec![
            "train",
            "models/shift/base.onnx",
            "--data",
            "models/shift/train_b.safetensors",
            "--loss",
            "cross-entropy",
            "--steps",
            "1",
            "--quiet",
            "-o",
            out,
        ];
        args.extend(extra);
        ok(&dorac_in(&dir, &args), out);
    };
    train(
        &["--target", "fc1,fc2", "--base-model", "acme/shift-mlp"],
        "given",
    );
    let c = config("given");
    assert_eq!(c["target_modules"], serde_json::json!(["fc1", "fc2"]));
    assert_eq!(c["base_model_name_or_path"], "acme/shift-mlp");
    // The fields PEFT writes (PEFT's own adapter, as its save_pretrained wrote it) are all there,
    // but for the two that describe PEFT itself and a custom model class.
    let peft_text =
        std::fs::read_to_string(models_dir().join("mlp2d/peft_lora/adapter_config.json")).unwrap();
    let peft: serde_json::Value = serde_json::from_str(&peft_text).unwrap();
    for key in peft.as_object().unwrap().keys() {
        if key != "peft_version" && key != "auto_mapping" {
            assert!(c.get(key).is_some(), "adapter_config.json lacks '{key}'");
        }
    }
    // Default targets: every linear layer, declared by their short names.
    train(&[], "default");
    assert_eq!(
        config("default")["target_modules"],
        serde_json::json!(["fc1", "fc2", "head"])
    );
    // Continuing a PEFT adapter keeps its targets; --base-model overrides its base.
    train(
        &["--adapter", "models/shift/peft_dora", "--base-model", "x/y"],
        "continued",
    );
    let c = config("continued");
    assert_eq!(
        c["target_modules"],
        serde_json::json!(["fc1", "fc2", "head"])
    );
    assert_eq!(c["base_model_name_or_path"], "x/y");
}

/// The README's quickstart, command by command, exactly as written (run from a folder where
/// `models/` is the repository's, as in a clone).
#[test]
fn readme_quickstart_runs_as_written() {
    let readme = std::fs::read_to_string(models_dir().join("../README.md")).unwrap();
    let section = readme
        .split("## Quickstart")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let block = section
        .split("```sh")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let dir = workdir("quickstart");
    let mut ran = 0;
    for line in block.lines() {
        let line = line.split(" #").next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let words = shell_words(line);
        match words[0].as_str() {
            "dorac" => {
                let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
                ok(&dorac_in(&dir, &args), line);
                ran += 1;
            }
            // Building and installing the binary is what this test binary's build did.
            "cargo" => assert!(line.starts_with("cargo install --path ."), "{line}"),
            _ => panic!("quickstart line that is neither cargo nor dorac: {line}"),
        }
    }
    assert!(ran >= 5, "the quickstart runs {ran} dorac commands");
}
