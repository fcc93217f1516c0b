//! One training step against PEFT (goldens from models/make_training_goldens.py): the loss,
//! the gradient of every lora_A, lora_B and magnitude, the Adam moments and the adapter after
//! the AdamW step, for DoRA (detached and exact norm), LoRA, cross-entropy, gradient clipping
//! and three steps of bias correction. Runs on the f64 reference executor and on the GPU.

mod common;

use common::*;
use dorac::tensor::{relative_error, Array};
use dorac::train::{build, AdamW, BuildOptions, LossKind, Session, TrainMethod};
use serde_json::Value;
use std::collections::BTreeMap;

struct Case {
    model: &'static str,
    name: String,
    spec: Value,
}

fn cases(model: &'static str) -> Vec<Case> {
    let path = models_dir().join(model).join("train/cases.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["cases"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, spec)| Case {
            model,
            name: k.clone(),
            spec: spec.clone(),
        })
        .collect()
}

/// Builds the case's program: the base model re-batched to the data, the PEFT adapter applied.
fn program(case: &Case, data: &BTreeMap<String, Array>) -> dorac::train::Program {
    let dir = models_dir().join(case.model);
    let mut proto = dorac::onnx::load_model(&dir.join("model.onnx")).unwrap();
    let batch = data["x"].shape[0];
    dorac::onnx::set_batch_dim(&mut proto, batch);
    let mut graph = dorac::onnx::import(
        &proto,
        &dir,
        &dorac::onnx::ShapePins::default(),
        &Default::default(),
    )
    .unwrap();
    let adapter = case.spec["adapter"]
        .as_str()
        .unwrap()
        .trim_start_matches("../");
    let a = dorac::adapter::load(&dir.join(adapter)).unwrap();
    dorac::adapter::apply(&mut graph, &a).unwrap();
    let s = &case.spec;
    let o = &s["optimizer"];
    let (loss, labels) = match s["loss"]["kind"].as_str().unwrap() {
        "mse" => (LossKind::Mse, "target"),
        "cross_entropy" => (
            LossKind::CrossEntropy {
                ignore_index: s["loss"]["ignore_index"].as_i64().unwrap(),
            },
            "labels",
        ),
        k => panic!("unknown loss {k}"),
    };
    let opts = BuildOptions {
        method: if s["method"] == "lora" {
            TrainMethod::Lora
        } else {
            TrainMethod::Dora
        },
        loss,
        output: None,
        labels: labels.into(),
        optimizer: AdamW {
            lr: o["lr"].as_f64().unwrap(),
            beta1: o["betas"][0].as_f64().unwrap(),
            beta2: o["betas"][1].as_f64().unwrap(),
            eps: o["eps"].as_f64().unwrap(),
            weight_decay: o["weight_decay"].as_f64().unwrap(),
            grad_clip: s["grad_clip"].get("max_norm").and_then(Value::as_f64),
        },
        exact_norm_grad: s["norm_grad"] == "exact",
        expose_grads: true,
        full_targets: None,
        lean_activations: true, // as `dorac train` does
    };
    build(graph, &opts).unwrap()
}

fn check_case(case: &Case, gpu: bool) {
    let dir = models_dir().join(case.model).join("train");
    let data = dorac::tensors_io::read_safetensors(&dir.join("data.safetensors")).unwrap();
    let golden =
        dorac::tensors_io::read_safetensors(&dir.join(case.spec["file"].as_str().unwrap()))
            .unwrap();
    let prog = program(case, &data);
    let params = prog.params.clone();
    let labels = prog.labels.clone();
    let lr = case.spec["optimizer"]["lr"].as_f64().unwrap();
    let mut session = Session::new(prog, if gpu { Some(common::gpu()) } else { None }).unwrap();
    let mut batch = BTreeMap::new();
    batch.insert("x".to_string(), data["x"].clone());
    batch.insert(labels.clone(), data[&labels].clone());
    let steps = case.spec["steps"].as_u64().unwrap() as usize;
    let fetch: Vec<&str> = params.iter().map(|p| p.grad_output.as_str()).collect();
    // The issue asks 1e-5; the reference keeps state in f32 as the device does, so the same.
    let tol = 1e-5;
    let tag = format!(
        "{} {} ({})",
        case.model,
        case.name,
        if gpu { "gpu" } else { "reference" }
    );
    let mut grads = BTreeMap::new();
    for step in 0..steps {
        let (metrics, out) = session.step(&batch, lr, &fetch).unwrap();
        let want = if steps == 1 {
            golden["loss"].data[0]
        } else {
            golden["losses"].data[step]
        };
        let e = (metrics.loss - want).abs() / want.abs();
        println!(
            "{tag}: step {step} loss {} vs {want} ({e:.1e})",
            metrics.loss
        );
        assert!(
            e < tol,
            "{tag}: loss at step {step}: {} vs {want}",
            metrics.loss
        );
        if let (Some(n), Some(want)) = (metrics.grad_norm, golden.get("grad_norm")) {
            let e = (n - want.data[0]).abs() / want.data[0];
            assert!(e < tol, "{tag}: grad norm {n} vs {}", want.data[0]);
        }
        grads = out;
    }
    let state = session.read_state().unwrap();
    let mut worst = 0.0f64;
    for p in &params {
        let key = format!("{}.{}", p.module, p.role.key());
        let grad = &grads[&p.grad_output];
        // On the device, later steps inherit the first update's sensitivity (see below): the
        // multi-step case checks its losses there, and everything on the reference executor.
        let mut checks = if gpu && steps > 1 {
            vec![]
        } else {
            vec![("grad", grad.clone())]
        };
        if !gpu {
            checks.extend([
                ("after", state[&p.name].clone()),
                ("exp_avg", state[&p.exp_avg].clone()),
                ("exp_avg_sq", state[&p.exp_avg_sq].clone()),
            ]);
        }
        for (what, got) in &checks {
            let want = &golden[&format!("{what}.{key}")];
            assert_eq!(got.shape, want.shape, "{tag}: {what}.{key} shape");
            let e = relative_error(&got.data, &want.data);
            worst = worst.max(e);
            assert!(e < tol, "{tag}: {what}.{key} rel err {e:e}");
        }
    }
    if gpu && steps == 1 {
        // AdamW's first step divides g by |g| + eps: where |g| is near eps (1e-8) the f32
        // gradient's last bits decide the update, so the device's update is checked against
        // the f64 AdamW of the device's own gradients (the gradients themselves were checked
        // against PEFT above; the reference executor checks the whole step against PEFT).
        let s = &case.spec;
        let o = &s["optimizer"];
        let (b1, b2) = (
            o["betas"][0].as_f64().unwrap(),
            o["betas"][1].as_f64().unwrap(),
        );
        let (eps, wd) = (
            o["eps"].as_f64().unwrap(),
            o["weight_decay"].as_f64().unwrap(),
        );
        let coef = match s["grad_clip"].get("max_norm").and_then(Value::as_f64) {
            Some(max) => {
                let total: f64 = params
                    .iter()
                    .map(|p| {
                        grads[&p.grad_output]
                            .data
                            .iter()
                            .map(|g| g * g)
                            .sum::<f64>()
                    })
                    .sum();
                (max / (total.sqrt() + 1e-6)).min(1.0)
            }
            None => 1.0,
        };
        for p in &params {
            let g: Vec<f64> = grads[&p.grad_output]
                .data
                .iter()
                .map(|g| g * coef)
                .collect();
            let p0 = p.initial.to_f64();
            let m: Vec<f64> = g.iter().map(|g| (1.0 - b1) * g).collect();
            let v: Vec<f64> = g.iter().map(|g| (1.0 - b2) * g * g).collect();
            let after: Vec<f64> = (0..g.len())
                .map(|i| {
                    let denom = (v[i] / (1.0 - b2)).sqrt() + eps;
                    p0[i] * (1.0 - lr * wd) - lr / (1.0 - b1) * m[i] / denom
                })
                .collect();
            for (what, want, got) in [
                ("after", &after, &state[&p.name]),
                ("exp_avg", &m, &state[&p.exp_avg]),
                ("exp_avg_sq", &v, &state[&p.exp_avg_sq]),
            ] {
                let e = relative_error(&got.data, want);
                worst = worst.max(e);
                assert!(
                    e < tol,
                    "{tag}: {what} of {} vs AdamW of the device gradients: {e:e}",
                    p.name
                );
            }
        }
    }
    println!(
        "{tag}: worst relative error {worst:.2e} over {} tensors",
        params.len() * 4
    );
}

#[test]
fn training_step_matches_peft_on_the_reference_executor() {
    for model in MODELS {
        for case in cases(model) {
            check_case(&case, false);
        }
    }
}

#[test]
fn training_step_matches_peft_on_the_gpu() {
    for model in MODELS {
        for case in cases(model) {
            check_case(&case, true);
        }
    }
}
