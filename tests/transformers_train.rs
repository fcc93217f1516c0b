//! A DoRA training step on the tiny transformers against PEFT: loss, gradients, Adam moments and
//! the adapter after one AdamW step, for every exporter variant, on the reference executor and the
//! GPU (1e-4). GPT-2 adapts its Conv1D layers (exported as Gemm), Llama its seven projections per
//! block (grouped-query attention, rotary tables folded at import, SiLU-gated MLP), both with the
//! causal LM loss; ViT its six projections per block and its patch-embedding Conv (PEFT's
//! `DoraConv2dLayer`, imported as Gather + MatMul), with the classification cross-entropy.

mod common;

use common::*;
use dorac::tensor::{relative_error, Array};
use dorac::train::{build, AdamW, BuildOptions, LossKind, Session, TrainMethod};
use std::collections::{BTreeMap, HashMap};

const TOL: f64 = 1e-4;

/// One model with its committed PEFT golden (`models/<model>/train/<golden>`, made by
/// `models/make_transformer_goldens.py`; the data in `train/data.safetensors`: `input`, `labels`).
struct Case {
    model: &'static str,
    variants: &'static [&'static str],
    /// The PEFT adapter folder in `models/<model>`.
    adapter: &'static str,
    adapted_layers: usize,
    /// The model's data input (its shape is pinned at import).
    input: &'static str,
    loss: LossKind,
    golden: &'static str,
}

const GPT2: Case = Case {
    model: "gpt2_tiny",
    variants: &[
        "legacy_op14",
        "legacy_op17",
        "legacy_op17_dynamic",
        "dynamo_op18",
    ],
    adapter: "peft_dora",
    // c_attn, c_proj, c_fc, c_proj in both blocks.
    adapted_layers: 8,
    input: "input_ids",
    loss: LossKind::Lm { ignore_index: -100 },
    golden: "dora_lm.safetensors",
};

const LLAMA: Case = Case {
    model: "llama_tiny",
    variants: &[
        "legacy_op14",
        "legacy_op17",
        "legacy_op17_dynamic",
        "dynamo_op20",
    ],
    adapter: "peft_dora",
    // q/k/v/o and gate/up/down in both blocks.
    adapted_layers: 14,
    input: "input_ids",
    loss: LossKind::Lm { ignore_index: -100 },
    golden: "dora_lm.safetensors",
};

const VIT: Case = Case {
    model: "vit_tiny",
    variants: &[
        "legacy_op14",
        "legacy_op17",
        "legacy_op17_dynamic",
        "dynamo_op20",
    ],
    adapter: "peft_dora_conv",
    // q/k/v/o_proj and fc1/fc2 in both blocks, and the patch-embedding Conv `projection`.
    adapted_layers: 13,
    input: "pixel_values",
    // logits [2, 3] against one class id per image.
    loss: LossKind::CrossEntropy { ignore_index: -100 },
    golden: "dora_ce.safetensors",
};

fn program(case: &Case, variant: &str, data: &BTreeMap<String, Array>) -> dorac::train::Program {
    let dir = models_dir().join(case.model);
    let proto = dorac::onnx::load_model(&dir.join(format!("{variant}.onnx"))).unwrap();
    let shapes: HashMap<String, Vec<usize>> =
        [(case.input.to_string(), data[case.input].shape.clone())].into();
    let mut g =
        dorac::onnx::import(&proto, &dir, &dorac::onnx::ShapePins::default(), &shapes).unwrap();
    let adapter = dorac::adapter::load(&dir.join(case.adapter)).unwrap();
    let applied = dorac::adapter::apply(&mut g, &adapter).unwrap();
    assert_eq!(applied, case.adapted_layers, "{}/{variant}", case.model);
    let opts = BuildOptions {
        method: TrainMethod::Dora,
        loss: case.loss,
        output: None,
        labels: "labels".into(),
        optimizer: AdamW {
            lr: 1e-2,
            ..AdamW::default()
        },
        exact_norm_grad: false,
        expose_grads: true,
        full_targets: None,
        lean_activations: true, // as `dorac train` does
    };
    build(g, &opts).unwrap()
}

fn check(case: &Case, gpu: bool) {
    let dir = models_dir().join(case.model).join("train");
    let data = dorac::tensors_io::read_safetensors(&dir.join("data.safetensors")).unwrap();
    let golden = dorac::tensors_io::read_safetensors(&dir.join(case.golden)).unwrap();
    for variant in case.variants {
        let prog = program(case, variant, &data);
        let params = prog.params.clone();
        // lora_A, lora_B and the magnitude of every adapted layer (the ViT's Conv included).
        assert_eq!(
            params.len(),
            3 * case.adapted_layers,
            "{}/{variant}",
            case.model
        );
        let mut session = Session::new(prog, if gpu { Some(common::gpu()) } else { None }).unwrap();
        let fetch: Vec<&str> = params.iter().map(|p| p.grad_output.as_str()).collect();
        let (metrics, grads) = session.step(&data, 1e-2, &fetch).unwrap();
        let tag = format!(
            "{}/{variant} ({})",
            case.model,
            if gpu { "gpu" } else { "reference" }
        );
        let want = golden["loss"].data[0];
        let e_loss = (metrics.loss - want).abs() / want;
        assert!(e_loss < TOL, "{tag}: loss {} vs {want}", metrics.loss);
        let state = session.read_state().unwrap();
        // The worst relative error of each kind of tensor, over all modules.
        let mut worst: BTreeMap<&str, f64> = BTreeMap::new();
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
                // Conv tensors are PEFT's 4-D ones in the golden, flattened in dorac's graph
                // (lora_A [r, C*kh*kw], lora_B [out, r], magnitude [out]): same element order.
                let want = &golden[&format!("{what}.{key}")];
                assert_eq!(got.data.len(), want.data.len(), "{tag}: {what}.{key}");
                let e = relative_error(&got.data, &want.data);
                let w = worst.entry(what).or_default();
                *w = w.max(e);
                assert!(e < TOL, "{tag}: {what}.{key} rel err {e:e}");
            }
        }
        let worst: Vec<String> = worst.iter().map(|(k, e)| format!("{k} {e:.2e}")).collect();
        println!(
            "{tag}: loss {} (PEFT {want}, rel err {e_loss:.1e}); worst relative error over the {} \
             tensors: {}",
            metrics.loss,
            params.len(),
            worst.join(", ")
        );
    }
}

#[test]
fn gpt2_dora_training_step_matches_peft_on_the_reference_executor() {
    check(&GPT2, false);
}

#[test]
fn gpt2_dora_training_step_matches_peft_on_the_gpu() {
    check(&GPT2, true);
}

#[test]
fn llama_dora_training_step_matches_peft_on_the_reference_executor() {
    check(&LLAMA, false);
}

#[test]
fn llama_dora_training_step_matches_peft_on_the_gpu() {
    check(&LLAMA, true);
}

#[test]
fn vit_dora_training_step_matches_peft_on_the_reference_executor() {
    check(&VIT, false);
}

#[test]
fn vit_dora_training_step_matches_peft_on_the_gpu() {
    check(&VIT, true);
}
