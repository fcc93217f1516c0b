//! End-to-end checks on the bundled models against onnxruntime and PEFT goldens
//! (made by models/make_models.py; no Python at test time).

mod common;

use common::*;
use dorac::ir::{Method, Op};
use dorac::passes::{
    find_linear_layers, fold_constants, insert_adapters, merge_adapters, AdapterInit, AdapterSpec,
};
use std::collections::HashSet;

fn rewrite_all(graph: &mut dorac::ir::Graph, method: Method, seed: u64) {
    let specs = find_linear_layers(graph)
        .into_iter()
        .map(|layer| AdapterSpec {
            layer,
            method,
            rank: 4,
            alpha: 8.0,
            rslora: false,
            init: AdapterInit::Peft { seed },
        })
        .collect();
    insert_adapters(graph, specs).unwrap();
}

fn with_adapter(name: &str, adapter: &str) -> dorac::ir::Graph {
    let mut g = load(name);
    let a = dorac::adapter::load(&models_dir().join(name).join(adapter)).unwrap();
    dorac::adapter::apply(&mut g, &a).unwrap();
    g
}

#[test]
fn base_models_match_onnxruntime_on_gpu_and_reference() {
    for name in MODELS {
        let inputs = read(name, "inputs.safetensors");
        let ort = read(name, "ort_outputs.safetensors");
        let g = load(name);
        let gpu = rel(&run_gpu(&g, &inputs), &ort, "y");
        let cpu = rel(&run_reference(&g, &inputs), &ort, "y");
        println!("{name}: gpu {gpu:.2e} reference {cpu:.2e}");
        assert!(gpu < 1e-5, "{name}: GPU vs onnxruntime {gpu:e}");
        assert!(cpu < 1e-5, "{name}: reference vs onnxruntime {cpu:e}");
    }
}

#[test]
fn rewritten_at_init_computes_the_base_function() {
    for name in MODELS {
        for method in [Method::Dora, Method::Lora] {
            let inputs = read(name, "inputs.safetensors");
            let ort = read(name, "ort_outputs.safetensors");
            let mut g = load(name);
            let layers = find_linear_layers(&g).len();
            rewrite_all(&mut g, method, 7);
            assert_eq!(g.adapters().len(), layers);
            // Through ONNX and back, as a user would run it.
            let dir = temp_dir(&format!("init-{name}-{}", method.name()));
            let path = dir.join("model.dora.onnx");
            dorac::onnx::save_model(&dorac::onnx::export(&g).unwrap(), &path).unwrap();
            let g2 = load_path(&path, &inputs);
            assert_eq!(
                g2.adapters().len(),
                layers,
                "adapters survive the ONNX round trip"
            );
            let cpu = rel(&run_reference(&g2, &inputs), &ort, "y");
            let gpu = rel(&run_gpu(&g2, &inputs), &ort, "y");
            println!(
                "{name} {}: reference {cpu:.2e} gpu {gpu:.2e}",
                method.name()
            );
            assert!(cpu < 1e-6, "{name}: rewritten (reference) vs base {cpu:e}");
            assert!(gpu < 1e-5, "{name}: rewritten (gpu) vs base {gpu:e}");
        }
    }
}

#[test]
fn peft_adapters_match_peft() {
    for name in MODELS {
        for (adapter, golden) in [
            ("peft_dora", "peft_dora_outputs.safetensors"),
            ("peft_lora", "peft_lora_outputs.safetensors"),
        ] {
            let inputs = read(name, "inputs.safetensors");
            let peft = read(name, golden);
            let g = with_adapter(name, adapter);
            let cpu = rel(&run_reference(&g, &inputs), &peft, "y");
            // Inference folds every frozen expression, the DoRA norm included.
            let mut folded = g.clone();
            fold_constants(&mut folded, &HashSet::new()).unwrap();
            let gpu = rel(&run_gpu(&folded, &inputs), &peft, "y");
            println!("{name} {adapter}: reference {cpu:.2e} gpu {gpu:.2e}");
            // Not 1e-15: the exported GELU uses f32-rounded constants (sqrt 2), PEFT exact ones.
            assert!(cpu < 1e-7, "{name} {adapter}: reference vs PEFT {cpu:e}");
            assert!(gpu < 1e-5, "{name} {adapter}: gpu vs PEFT {gpu:e}");
        }
    }
}

#[test]
fn merged_models_match_unmerged() {
    for name in MODELS {
        for adapter in ["peft_dora", "peft_lora"] {
            let inputs = read(name, "inputs.safetensors");
            let peft_golden = read(name, &format!("{adapter}_outputs.safetensors"));
            let unmerged = with_adapter(name, adapter);
            let mut merged = unmerged.clone();
            assert_eq!(
                merge_adapters(&mut merged).unwrap(),
                unmerged.adapters().len()
            );
            assert!(merged.adapters().is_empty());
            // The merged graph is the base graph: same ops, same count.
            let base = load(name);
            let ops = |g: &dorac::ir::Graph| {
                let mut v: Vec<&str> = g.petgraph().node_weights().map(|n| n.op.name()).collect();
                v.sort();
                v
            };
            assert_eq!(
                ops(&merged),
                ops(&base),
                "{name}: merged graph has extra ops"
            );
            let dir = temp_dir(&format!("merge-{name}-{adapter}"));
            let path = dir.join("merged.onnx");
            dorac::onnx::save_model(&dorac::onnx::export(&merged).unwrap(), &path).unwrap();
            let reloaded = load_path(&path, &inputs);
            let m = run_gpu(&reloaded, &inputs);
            let u = run_gpu(&unmerged, &inputs);
            let e = rel(&m, &u, "y");
            let e_peft = rel(&run_reference(&reloaded, &inputs), &peft_golden, "y");
            println!("{name} {adapter}: merged vs unmerged {e:.2e}, merged (reference) vs PEFT {e_peft:.2e}");
            assert!(e < 1e-5, "{name} {adapter}: merged vs unmerged {e:e}");
            assert!(e_peft < 1e-6, "{name} {adapter}: merged vs PEFT {e_peft:e}");
        }
    }
}

#[test]
fn inference_never_recomputes_the_norm() {
    let mut g = with_adapter("mlp3d", "peft_dora");
    fold_constants(&mut g, &HashSet::new()).unwrap();
    let norm_ops = g
        .petgraph()
        .node_weights()
        .filter(|n| matches!(n.op, Op::Reduce { .. }) || n.op == Op::Unary(dorac::ir::unary::SQRT))
        .count();
    assert_eq!(
        norm_ops, 0,
        "the DoRA norm must be folded for inference:\n{g}"
    );
}

#[test]
fn the_dora_subgraph_has_no_in_by_out_temporary() {
    let mut g = load("mlp3d");
    rewrite_all(&mut g, Method::Dora, 1);
    for a in g.adapters().to_vec() {
        let big = a.in_features * a.out_features;
        for n in g.petgraph().node_indices() {
            let node = g.node(n);
            let is_weight = n == a.weight;
            if node.name.starts_with(&format!("{}.", a.module)) && !is_weight {
                assert!(
                    node.numel() < big || node.numel() > big * 2,
                    "{}: node {} has an [in, out]-sized value {:?}",
                    a.module,
                    node.name,
                    node.shape
                );
            }
        }
    }
}

#[test]
fn peft_adapter_round_trips_through_dorac() {
    for name in MODELS {
        let src = models_dir().join(name).join("peft_dora");
        let original = dorac::adapter::load(&src).unwrap();
        let g = with_adapter(name, "peft_dora");
        let dir = temp_dir(&format!("adapter-{name}"));
        dorac::adapter::save(&g, &dir).unwrap();
        let back = dorac::adapter::load(&dir).unwrap();
        assert_eq!(back.config.r, original.config.r);
        assert_eq!(back.config.lora_alpha, original.config.lora_alpha);
        assert!(back.config.use_dora);
        assert_eq!(back.layers.len(), original.layers.len());
        for (module, t) in &original.layers {
            let b = &back.layers[module];
            assert_eq!(b.a, t.a, "{module} lora_A");
            assert_eq!(b.b, t.b, "{module} lora_B");
            assert_eq!(b.magnitude, t.magnitude, "{module} magnitude");
        }
    }
}

#[test]
fn a_rewritten_model_merges_and_takes_an_adapter() {
    // rewrite -> export -> import (adapters recovered from metadata) -> load PEFT tensors ->
    // outputs match PEFT; then merge the re-imported model.
    let name = "mlp3d";
    let inputs = read(name, "inputs.safetensors");
    let peft = read(name, "peft_dora_outputs.safetensors");
    let mut g = load(name);
    rewrite_all(&mut g, Method::Dora, 3);
    let dir = temp_dir("rewritten-adapter");
    let path = dir.join("m.dora.onnx");
    dorac::onnx::save_model(&dorac::onnx::export(&g).unwrap(), &path).unwrap();
    let mut g2 = load_path(&path, &inputs);
    let a = dorac::adapter::load(&models_dir().join(name).join("peft_dora")).unwrap();
    dorac::adapter::apply(&mut g2, &a).unwrap();
    let e = rel(&run_reference(&g2, &inputs), &peft, "y");
    assert!(e < 1e-9, "rewritten + adapter vs PEFT {e:e}");
    merge_adapters(&mut g2).unwrap();
    let e = rel(&run_reference(&g2, &inputs), &peft, "y");
    assert!(e < 1e-6, "merged rewritten model vs PEFT {e:e}");
}

/// Half-precision models (models/half, made by models/make_half.py): their f16 / bf16 weights
/// stay 16-bit on the device (half the bytes of f32 in the plan), compute is f32, and the result
/// matches float64 numpy on the same weights to f32 accuracy. Against onnxruntime, which
/// computes the f16 model in f16 (each op rounds to 2^-11 relative; it is 3.7e-4 from the exact
/// result itself), the tolerance is 2^-9.
#[test]
fn half_models_store_half_weights_and_match() {
    let inputs = read("half", "inputs.safetensors");
    for tag in ["f16", "bf16"] {
        let g = load_path(&models_dir().join(format!("half/mlp_{tag}.onnx")), &inputs);
        let plan = dorac::codegen::plan(&g).unwrap();
        for (name, len) in [("fc1.weight", 96 * 64), ("fc2.weight", 32 * 96)] {
            let b = plan.buffers.iter().find(|b| b.name == name).unwrap();
            assert_eq!(
                b.stored.map(|h| h.name()).as_deref(),
                Some(tag),
                "{tag}: {name}"
            );
            assert_eq!(
                b.bytes(),
                2 * len as u64,
                "{tag}: {name} takes half of f32's bytes"
            );
        }
        let exact = read("half", &format!("exact_{tag}.safetensors"));
        let gpu = rel(&run_gpu(&g, &inputs), &exact, "y");
        let cpu = rel(&run_reference(&g, &inputs), &exact, "y");
        println!("{tag}: gpu {gpu:.2e} reference {cpu:.2e} vs exact");
        assert!(
            gpu < 1e-5 && cpu < 1e-5,
            "{tag}: gpu {gpu:e}, reference {cpu:e}"
        );
        if tag == "f16" {
            let ort = rel(
                &run_gpu(&g, &inputs),
                &read("half", "ort_f16.safetensors"),
                "y",
            );
            println!("f16: gpu vs onnxruntime {ort:.2e}");
            assert!(ort < 2f64.powi(-9), "f16: GPU vs onnxruntime {ort:e}");
        }
    }
}

/// Folding an Expand of a constant: where every reader is an element-wise binary or Where that
/// broadcasts to the Expand's shape anyway, the readers read the small constant and no
/// constant of the expanded size is made; where some reader would not (a unary, or a binary
/// whose other operand is smaller too), it folds as before. Values as before either way.
#[test]
fn a_broadcast_constant_is_read_small_where_its_readers_broadcast() {
    use dorac::ir::{Binary, GraphBuilder};
    use dorac::tensor::{Array, Tensor};
    let build = |second: &str| {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![4, 6]);
        let c = g.add_const("c", Tensor::f32(vec![1, 1], vec![0.25]));
        let wide = Op::Expand { shape: vec![4, 6] };
        let e = g.add(wide, &[c], "spread", "spread").unwrap();
        let y = g.add(Op::Binary(Binary::Mul), &[e, x], "y", "y").unwrap();
        g.add_output("y", y);
        match second {
            "unary" => {
                let z = g.add(Op::Unary(dorac::ir::unary::EXP), &[e], "z", "z");
                g.add_output("z", z.unwrap());
            }
            "row" => {
                let row = g.add_const("row", Tensor::f32(vec![6], vec![1.0; 6]));
                let z = g.add(Op::Binary(Binary::Add), &[e, row], "z", "z");
                g.add_output("z", z.unwrap());
            }
            _ => {}
        }
        g.finish()
    };
    let x = Array::new(vec![4, 6], (0..24).map(|i| i as f64 - 11.5).collect());
    let inputs: std::collections::BTreeMap<String, Array> = [("x".to_string(), x)].into();
    for (second, folds) in [("none", false), ("unary", true), ("row", true)] {
        let g = build(second);
        let mut folded = g.clone();
        fold_constants(&mut folded, &HashSet::new()).unwrap();
        let wide_consts = (folded.petgraph().node_weights())
            .filter(|n| matches!(n.op, Op::Const(_)) && n.numel() == 24)
            .count();
        let expands = (folded.petgraph().node_weights())
            .filter(|n| matches!(n.op, Op::Expand { .. }))
            .count();
        assert_eq!(
            (wide_consts > 0, expands),
            (folds, 0),
            "{second}:\n{folded}"
        );
        let (before, after) = (run_reference(&g, &inputs), run_reference(&folded, &inputs));
        // Exact where nothing folded (y); folded values are rounded to f32 once.
        for name in before.keys() {
            let err = rel(&after, &before, name);
            assert!(err < 1e-7, "{second}: {name} {err:e}");
        }
        assert_eq!(before["y"].data, after["y"].data, "{second}");
        assert_eq!(
            rel(&run_gpu(&folded, &inputs), &before, "y"),
            0.0,
            "{second}"
        );
    }
}
