//! DoRA on the layer kinds PEFT adapts besides Linear: Conv (`DoraConv2dLayer`: the norm over
//! every dim but the output channel) on the small CNN of `models/make_convnet.py`, and Embedding
//! (`DoraEmbeddingLayer`: the norm of each embedding dim over the vocabulary) on the token model
//! of `models/make_embednet.py`. For each: rewrite at init computes the base model, PEFT's
//! adapter (Conv-shaped tensors, embedding keys) gives PEFT's output, merge keeps it, a saved
//! adapter has PEFT's keys, shapes and values, and one AdamW step matches PEFT's loss,
//! gradients, moments and updated adapter.

mod common;

use common::*;
use dorac::ir::Method;
use dorac::passes::{find_linear_layers, insert_adapters, merge_adapters};
use dorac::passes::{AdapterInit, AdapterSpec};
use dorac::tensor::relative_error;
use dorac::train::{build, BuildOptions, Session, TrainMethod};
use std::collections::BTreeMap;

const TOL: f64 = 1e-5;

fn base(model: &str) -> dorac::ir::Graph {
    load_path(
        &models_dir().join(model).join("model.onnx"),
        &read(model, "inputs.safetensors"),
    )
}

#[test]
fn conv_layers_rewrite_adapt_merge_and_save_like_peft() {
    let layers = find_linear_layers(&base("convnet"));
    let modules: Vec<&str> = layers.iter().map(|l| l.module.as_str()).collect();
    assert_eq!(modules, ["conv1", "conv2", "fc"]);
    // conv2: 6 channels x 2x2 taps in, 8 out.
    assert_eq!((layers[1].in_features, layers[1].out_features), (24, 8));
    rewrite_adapt_merge_and_save("convnet", 3);
}

#[test]
fn embedding_layers_rewrite_adapt_merge_and_save_like_peft() {
    let layers = find_linear_layers(&base("embednet"));
    let modules: Vec<&str> = layers.iter().map(|l| l.module.as_str()).collect();
    assert_eq!(modules, ["embed", "fc"]);
    // The embedding: 40 rows (in), 8 dims (out).
    assert_eq!((layers[0].in_features, layers[0].out_features), (40, 8));
    assert!(layers[0].is_embedding());
    rewrite_adapt_merge_and_save("embednet", 2);
}

fn rewrite_adapt_merge_and_save(model: &str, adapted: usize) {
    let inputs = read(model, "inputs.safetensors");
    let ort = read(model, "ort_outputs.safetensors");
    let peft = read(model, "peft_dora_outputs.safetensors");
    let g = base(model);
    let layers = find_linear_layers(&g);
    let e = rel(&run_gpu(&g, &inputs), &ort, "y");
    assert!(e < TOL, "base vs onnxruntime {e:e}");

    let mut init = g.clone();
    let specs = layers
        .into_iter()
        .map(|layer| AdapterSpec {
            layer,
            method: Method::Dora,
            rank: 2,
            alpha: 4.0,
            rslora: false,
            init: AdapterInit::Peft { seed: 3 },
        })
        .collect();
    insert_adapters(&mut init, specs).unwrap();
    let e = rel(&run_gpu(&init, &inputs), &ort, "y");
    assert!(e < TOL, "rewritten at init vs onnxruntime {e:e}");

    let dir = models_dir().join(model).join("peft_dora");
    let adapter = dorac::adapter::load(&dir).unwrap();
    let mut g = base(model);
    assert_eq!(dorac::adapter::apply(&mut g, &adapter).unwrap(), adapted);
    let unmerged = run_gpu(&g, &inputs);
    let (eg, er) = (
        rel(&unmerged, &peft, "y"),
        rel(&run_reference(&g, &inputs), &peft, "y"),
    );
    println!("PEFT adapter: gpu {eg:.2e}, reference {er:.2e}");
    assert!(
        eg < TOL && er < TOL,
        "adapter vs PEFT: gpu {eg:e}, reference {er:e}"
    );

    // Saved in PEFT's Conv shapes, with the same values; through ONNX and back too.
    let out = temp_dir(&format!("{model}-adapter"));
    let bytes = prost::Message::encode_to_vec(&dorac::onnx::export(&g).unwrap());
    let back = dorac::onnx::decode_model(&bytes, model).unwrap();
    let shapes = [("x".to_string(), inputs["x"].shape.clone())].into();
    let g2 = dorac::onnx::import(
        &back,
        std::path::Path::new("."),
        &dorac::onnx::ShapePins::default(),
        &shapes,
    )
    .unwrap();
    dorac::adapter::save(&g2, &out).unwrap();
    let want = dorac::tensors_io::read_safetensors(&dir.join("adapter_model.safetensors")).unwrap();
    let got = dorac::tensors_io::read_safetensors(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        assert_eq!(got[k].shape, w.shape, "{k}");
        let e = relative_error(&got[k].data, &w.data);
        assert!(e < 1e-7, "{k}: {e:e}");
    }

    merge_adapters(&mut g).unwrap();
    let e = rel(&run_gpu(&g, &inputs), &unmerged, "y");
    assert!(e < TOL, "merged vs unmerged {e:e}");
}

/// A Linear adapter on a Conv, or a Conv adapter on a Linear, is refused by name.
#[test]
fn conv_and_linear_adapters_do_not_mix() {
    let dir = models_dir().join("convnet/peft_dora");
    let mut adapter = dorac::adapter::load(&dir).unwrap();
    let fc = adapter.layers["fc"].clone();
    let conv1 = adapter.layers["conv1"].clone();
    adapter.layers.insert("conv1".into(), fc);
    adapter.layers.insert("fc".into(), conv1);
    let err = dorac::adapter::apply(&mut base("convnet"), &adapter)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'conv1' is a Conv") && err.contains("'fc' is a linear layer"),
        "{err}"
    );
}

fn training_step(model: &str, tensors: usize, on_gpu: bool) {
    let dir = models_dir().join(model);
    let data = read(model, "train/data.safetensors");
    let golden = read(model, "train/dora_mse.safetensors");
    let mut g = base(model);
    let adapter = dorac::adapter::load(&dir.join("peft_dora")).unwrap();
    dorac::adapter::apply(&mut g, &adapter).unwrap();
    let opts = BuildOptions {
        expose_grads: true,
        ..mse_options(TrainMethod::Dora)
    };
    let prog = build(g, &opts).unwrap();
    let params = prog.params.clone();
    let mut session = Session::new(prog, on_gpu.then(gpu)).unwrap();
    let fetch: Vec<&str> = params.iter().map(|p| p.grad_output.as_str()).collect();
    let batch: BTreeMap<_, _> = data.clone();
    let (metrics, grads) = session.step(&batch, 1e-2, &fetch).unwrap();
    let want = golden["loss"].data[0];
    let tag = format!("{model} ({})", if on_gpu { "gpu" } else { "reference" });
    assert!(
        (metrics.loss - want).abs() / want < TOL,
        "{tag}: loss {} vs PEFT {want}",
        metrics.loss
    );
    let state = session.read_state().unwrap();
    assert_eq!(params.len(), tensors);
    let mut worst = 0.0f64;
    for p in &params {
        let key = format!("{}.{}", p.module, p.role.key());
        let mut checks = vec![("grad", &grads[&p.grad_output])];
        if !on_gpu {
            // AdamW's first step divides by sqrt(v) ~ |g|: on the device f32 rounding of tiny
            // gradients is amplified (see tests/train_peft.rs), so the update is checked here.
            checks.extend([
                ("after", &state[&p.name]),
                ("exp_avg", &state[&p.exp_avg]),
                ("exp_avg_sq", &state[&p.exp_avg_sq]),
            ]);
        }
        for (what, got) in checks {
            let want = &golden[&format!("{what}.{key}")];
            assert_eq!(got.data.len(), want.data.len(), "{what}.{key}");
            let e = relative_error(&got.data, &want.data);
            worst = worst.max(e);
            assert!(e < 1e-4, "{tag}: {what}.{key} rel err {e:e}");
        }
    }
    println!(
        "{tag}: loss {} (PEFT {want}), worst {worst:.2e}",
        metrics.loss
    );
}

#[test]
fn dora_training_steps_match_peft_on_the_reference_executor() {
    training_step("convnet", 9, false);
    training_step("embednet", 6, false);
}

#[test]
fn dora_training_steps_match_peft_on_the_gpu() {
    training_step("convnet", 9, true);
    training_step("embednet", 6, true);
}
