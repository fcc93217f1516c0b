//! DoRA on real transformer exports (the tiny encoders and decoders, both PyTorch exporters):
//! the model rewritten at PEFT's initialisation computes the base function, a PEFT adapter runs
//! as in PEFT, and the merged model matches unmerged DoRA; each through ONNX export and
//! re-import.

mod common;

use common::*;
use dorac::ir::{Graph, Method};
use dorac::passes::{find_linear_layers, insert_adapters, matches_target, merge_adapters};
use dorac::passes::{AdapterInit, AdapterSpec};
use dorac::tensor::Array;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const TOL: f64 = 1e-4;
/// Decoder projections as PEFT names them in Llama, Qwen2 and Mistral.
const DECODER_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The exported variants of a model folder: every `<variant>.onnx` beside its onnxruntime golden.
fn variants(model: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(models_dir().join(model))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            name.strip_suffix(".ort.safetensors").map(str::to_string)
        })
        .collect();
    out.sort();
    assert!(out.len() >= 4, "{model}: variants {out:?}");
    out
}

fn import(path: &Path, inputs: &BTreeMap<String, Array>) -> Graph {
    let proto = dorac::onnx::load_model(path).unwrap();
    let shapes: HashMap<String, Vec<usize>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    dorac::onnx::import(
        &proto,
        path.parent().unwrap(),
        &dorac::onnx::ShapePins::default(),
        &shapes,
    )
    .unwrap()
}

fn round_trip(g: &Graph, inputs: &BTreeMap<String, Array>, tag: &str) -> Graph {
    let dir = temp_dir(tag);
    let path = dir.join("model.onnx");
    dorac::onnx::save_model(&dorac::onnx::export(g).unwrap(), &path).unwrap();
    import(&path, inputs)
}

fn gpu_out(g: &Graph, inputs: &BTreeMap<String, Array>) -> BTreeMap<String, Array> {
    let mut g = g.clone();
    dorac::passes::fold_constants(&mut g, &Default::default()).unwrap();
    run_gpu(&g, &g.graph_inputs_of(inputs.clone()))
}

#[test]
fn transformers_rewrite_adapt_and_merge() {
    for (model, targets, expected_layers) in [
        ("bert_tiny", &["query", "value"][..], 4),
        ("gpt2_tiny", &["c_attn", "c_proj", "c_fc"][..], 8),
        ("llama_tiny", &DECODER_TARGETS[..], 14),
        ("qwen2_tiny", &DECODER_TARGETS[..], 14),
        ("mistral_tiny", &DECODER_TARGETS[..], 14),
        ("gemma_tiny", &DECODER_TARGETS[..], 14),
        // Phi-3's fused projections; GPT-NeoX's, under its own names.
        (
            "phi3_tiny",
            &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"][..],
            8,
        ),
        (
            "gpt_neox_tiny",
            &["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"][..],
            8,
        ),
        // Encoders: DistilBERT (attention and FFN), the T5 encoder (bias-free projections).
        (
            "distilbert_tiny",
            &["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"][..],
            12,
        ),
        ("t5_encoder_tiny", &["q", "k", "v", "o", "wi", "wo"][..], 12),
        (
            "vit_tiny",
            &["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"][..],
            12,
        ),
    ] {
        let dir = models_dir().join(model);
        let inputs = read(model, "inputs.safetensors");
        let peft = read(model, "peft_dora_outputs.safetensors");
        for variant in variants(model) {
            let tag = format!("{model}/{variant}");
            let ort = read(model, &format!("{variant}.ort.safetensors"));
            let base = import(&dir.join(format!("{variant}.onnx")), &inputs);
            let out_name = base.outputs()[0].0.clone();

            // Rewritten at PEFT's init: the base function, through ONNX and back.
            let mut g = base.clone();
            let specs: Vec<AdapterSpec> = find_linear_layers(&g)
                .into_iter()
                .filter(|l| targets.iter().any(|t| matches_target(&l.module, t)))
                .map(|layer| AdapterSpec {
                    layer,
                    method: Method::Dora,
                    rank: 4,
                    alpha: 8.0,
                    rslora: false,
                    init: AdapterInit::Peft { seed: 1 },
                })
                .collect();
            assert_eq!(
                specs.len(),
                expected_layers,
                "{tag}: targeted layers {:?}",
                specs.iter().map(|s| &s.layer.module).collect::<Vec<_>>()
            );
            insert_adapters(&mut g, specs).unwrap();
            let g = round_trip(&g, &inputs, &format!("{model}-{variant}-init"));
            let e = rel(&gpu_out(&g, &inputs), &ort, &out_name);
            assert!(e < TOL, "{tag}: rewritten at init vs onnxruntime {e:e}");

            // PEFT's adapter, unmerged.
            let mut g = base.clone();
            let a = dorac::adapter::load(&dir.join("peft_dora")).unwrap();
            dorac::adapter::apply(&mut g, &a).unwrap();
            let unmerged = gpu_out(&g, &inputs);
            let e_peft = rel(&unmerged, &peft, &out_name);
            assert!(e_peft < TOL, "{tag}: --adapter vs PEFT {e_peft:e}");

            // Merged, through ONNX and back: the base graph's op count, unmerged DoRA's outputs.
            merge_adapters(&mut g).unwrap();
            let merged = round_trip(&g, &inputs, &format!("{model}-{variant}-merged"));
            assert_eq!(
                merged.petgraph().node_count(),
                round_trip(&base, &inputs, &format!("{model}-{variant}-base"))
                    .petgraph()
                    .node_count(),
                "{tag}: merged graph differs from base"
            );
            let e_merge = rel(&gpu_out(&merged, &inputs), &unmerged, &out_name);
            assert!(e_merge < TOL, "{tag}: merged vs unmerged {e_merge:e}");
            println!("{tag}: init vs ORT {e:.1e}, adapter vs PEFT {e_peft:.1e}, merged vs unmerged {e_merge:.1e}");
        }
    }
}

#[test]
fn external_weights_are_memory_mapped_and_run() {
    let inputs = read("bert_tiny", "inputs.safetensors");
    let g = import(&models_dir().join("bert_tiny/external/model.onnx"), &inputs);
    let mapped = g
        .petgraph()
        .node_weights()
        .filter(|n| matches!(&n.op, dorac::ir::Op::Const(t) if matches!(&t.data, dorac::tensor::Data::F32(b) if b.is_mapped())))
        .count();
    assert!(mapped > 10, "only {mapped} weights are mapped");
    let ort = read("bert_tiny", "legacy_op17.ort.safetensors");
    let e = rel(&gpu_out(&g, &inputs), &ort, "logits");
    assert!(e < TOL, "external-data BERT vs onnxruntime {e:e}");
}

/// A PEFT adapter made on the Hugging Face model applies to an export of that model inside a
/// wrapper module (every module path prefixed `m.`), legacy and torch.export-based: adapter
/// names find the export's modules by a unique suffix, as PEFT's `target_modules` do.
#[test]
fn peft_adapter_applies_to_a_wrapped_export() {
    // (model, a module of the wrapped export, adapted layers)
    for (model, probe, layers) in [
        ("llama_tiny", "m.model.layers.0.self_attn.q_proj", 14),
        (
            "distilbert_tiny",
            "m.distilbert.transformer.layer.0.attention.q_lin",
            12,
        ),
    ] {
        let dir = models_dir().join(model);
        let inputs = read(model, "inputs.safetensors");
        let peft = read(model, "peft_dora_outputs.safetensors");
        let adapter = dorac::adapter::load(&dir.join("peft_dora")).unwrap();
        for variant in ["legacy_op17", "dynamo_op20"] {
            let tag = format!("{model}/wrapped/{variant}");
            let ort = read(model, &format!("wrapped/{variant}.ort.safetensors"));
            let mut g = import(&dir.join(format!("wrapped/{variant}.onnx")), &inputs);
            let modules: Vec<String> = find_linear_layers(&g)
                .into_iter()
                .map(|l| l.module)
                .collect();
            assert!(modules.contains(&probe.to_string()), "{tag}: {modules:?}");
            let e_base = rel(&gpu_out(&g, &inputs), &ort, "logits");
            assert!(e_base < TOL, "{tag} vs onnxruntime {e_base:e}");
            assert_eq!(dorac::adapter::apply(&mut g, &adapter).unwrap(), layers);
            let e = rel(&gpu_out(&g, &inputs), &peft, "logits");
            assert!(e < TOL, "{tag} + PEFT adapter vs PEFT {e:e}");
            // Saved back under PEFT's names (no `m.`): it loads on the unwrapped HF model.
            let saved = temp_dir(&format!("wrapped-{model}-{variant}"));
            dorac::adapter::save(&g, &saved).unwrap();
            let keys = |d: &Path| {
                let t = dorac::tensors_io::read_safetensors(&d.join("adapter_model.safetensors"));
                t.unwrap().into_keys().collect::<Vec<_>>()
            };
            assert_eq!(keys(&saved), keys(&dir.join("peft_dora")), "{tag}");
            println!("{tag}: base vs ORT {e_base:.1e}, adapter vs PEFT {e:.1e}");
        }
    }
}

/// PEFT DoRA on ViT's patch-embedding Conv (`DoraConv2dLayer`) as well as its projections, on
/// every exporter variant: PEFT's output unmerged and merged, and the adapter saved by dorac has
/// PEFT's tensors and shapes (Conv-shaped for the projection).
#[test]
fn vit_conv_adapter_matches_peft() {
    let dir = models_dir().join("vit_tiny");
    let inputs = read("vit_tiny", "inputs.safetensors");
    let peft = read("vit_tiny", "peft_dora_conv_outputs.safetensors");
    let adapter = dorac::adapter::load(&dir.join("peft_dora_conv")).unwrap();
    let want =
        dorac::tensors_io::read_safetensors(&dir.join("peft_dora_conv/adapter_model.safetensors"))
            .unwrap();
    for variant in variants("vit_tiny") {
        let tag = format!("vit_tiny/{variant}");
        let mut g = import(&dir.join(format!("{variant}.onnx")), &inputs);
        let out_name = g.outputs()[0].0.clone();
        assert_eq!(
            dorac::adapter::apply(&mut g, &adapter).unwrap(),
            13,
            "{tag}"
        );
        let unmerged = gpu_out(&g, &inputs);
        let e = rel(&unmerged, &peft, &out_name);
        assert!(e < TOL, "{tag}: Conv adapter vs PEFT {e:e}");

        let saved = temp_dir(&format!("vit-conv-{variant}"));
        dorac::adapter::save(&round_trip(&g, &inputs, &format!("vit-{variant}")), &saved).unwrap();
        let got =
            dorac::tensors_io::read_safetensors(&saved.join("adapter_model.safetensors")).unwrap();
        assert_eq!(got.len(), want.len(), "{tag}");
        for (k, w) in &want {
            let k_got = got.get(k).unwrap_or_else(|| panic!("{tag}: {k} not saved"));
            assert_eq!(k_got.shape, w.shape, "{tag}: {k}");
            assert!(
                dorac::tensor::relative_error(&k_got.data, &w.data) < 1e-7,
                "{tag}: {k}"
            );
        }

        merge_adapters(&mut g).unwrap();
        let e_merge = rel(&gpu_out(&g, &inputs), &unmerged, &out_name);
        assert!(e_merge < TOL, "{tag}: merged vs unmerged {e_merge:e}");
        println!("{tag}: Conv adapter vs PEFT {e:.1e}, merged vs unmerged {e_merge:.1e}");
    }
}
