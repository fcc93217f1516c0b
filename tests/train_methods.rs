//! The training methods of the paper's comparisons and ablations, all through one pipeline, and
//! the structure of a compiled step: no gradient memory for frozen weights, frozen-only work
//! folded away, only the trainable tensors updated.

mod common;

use common::*;
use dorac::ir::{Graph, Op};
use dorac::passes::{find_linear_layers, insert_adapters, AdapterInit, AdapterSpec};
use dorac::tensor::Array;
use dorac::train::{build, AdamW, BuildOptions, LossKind, ParamRole, Session, TrainMethod};
use std::collections::BTreeMap;

const BATCH: usize = 24;

fn demo() -> BTreeMap<String, Array> {
    let d = dorac::tensors_io::read_safetensors(&models_dir().join("demo/teacher.safetensors"))
        .unwrap();
    // The first BATCH examples: one batch (24, so no activation has a weight's shape).
    d.into_iter()
        .map(|(k, a)| {
            let per = a.data.len() / a.shape[0];
            let mut shape = a.shape.clone();
            shape[0] = BATCH;
            (k, Array::new(shape, a.data[..BATCH * per].to_vec()))
        })
        .collect()
}

fn model(method: TrainMethod) -> Graph {
    let mut proto = dorac::onnx::load_model(&models_dir().join("mlp2d/model.onnx")).unwrap();
    dorac::onnx::set_batch_dim(&mut proto, BATCH);
    let mut g = dorac::onnx::import(
        &proto,
        &models_dir(),
        &dorac::onnx::ShapePins::default(),
        &Default::default(),
    )
    .unwrap();
    if let Some(kind) = method.adapter() {
        let specs = find_linear_layers(&g)
            .into_iter()
            .map(|layer| AdapterSpec {
                layer,
                method: kind,
                // Rank 3: no adapter tensor shares a shape with a weight or an activation.
                rank: 3,
                alpha: 6.0,
                rslora: false,
                // Start from a non-trivial adapter so every tensor gets a gradient.
                init: AdapterInit::Peft { seed: 3 },
            })
            .collect();
        insert_adapters(&mut g, specs).unwrap();
    }
    g
}

fn options(method: TrainMethod) -> BuildOptions {
    BuildOptions {
        method,
        loss: LossKind::Mse,
        output: None,
        labels: "target".into(),
        optimizer: AdamW {
            lr: 1e-2,
            ..AdamW::default()
        },
        exact_norm_grad: false,
        expose_grads: false,
        full_targets: None,
    }
}

#[test]
fn every_method_trains_only_its_tensors_and_lowers_the_loss() {
    let data = demo();
    for method in [
        TrainMethod::Dora,
        TrainMethod::Lora,
        TrainMethod::Magnitude,
        TrainMethod::Direction,
        TrainMethod::Full,
    ] {
        let g = model(method);
        let program = build(g, &options(method)).unwrap();
        let roles: Vec<ParamRole> = program.params.iter().map(|p| p.role).collect();
        let expected: &[ParamRole] = match method {
            TrainMethod::Dora => &[ParamRole::LoraA, ParamRole::LoraB, ParamRole::Magnitude],
            TrainMethod::Lora | TrainMethod::Direction => &[ParamRole::LoraA, ParamRole::LoraB],
            TrainMethod::Magnitude => &[ParamRole::Magnitude],
            TrainMethod::Full => &[ParamRole::Weight],
        };
        assert!(
            roles.iter().all(|r| expected.contains(r)),
            "{}: {roles:?}",
            method.name()
        );
        assert_eq!(
            roles.len(),
            3 * expected.len(),
            "{}: one of each per layer",
            method.name()
        );
        let mut s = Session::new(program, None).unwrap();
        let mut losses = vec![];
        for _ in 0..30 {
            losses.push(s.step(&data, 1e-2, &[]).unwrap().0.loss);
        }
        println!("{}: loss {} -> {}", method.name(), losses[0], losses[29]);
        assert!(
            losses[29] < losses[0] * 0.7,
            "{}: loss {} -> {}",
            method.name(),
            losses[0],
            losses[29]
        );
    }
}

#[test]
fn a_compiled_step_holds_no_frozen_weight_gradient_and_no_frozen_only_work() {
    for method in [TrainMethod::Dora, TrainMethod::Magnitude] {
        let g = model(method);
        let weights: Vec<(String, Vec<usize>)> = g
            .adapters
            .iter()
            .map(|a| (g.node(a.weight).name.clone(), g.shape(a.weight).to_vec()))
            .collect();
        let program = build(g, &options(method)).unwrap();
        let pg = &program.graph;
        for n in pg.graph.node_indices() {
            let node = pg.node(n);
            // Every weight-sized value is a frozen constant: no gradient, no temporary.
            for (w, shape) in &weights {
                let transposed: Vec<usize> = shape.iter().rev().copied().collect();
                let sized = node.shape == *shape || node.shape == transposed;
                if sized && !matches!(node.op, Op::Const(_)) {
                    panic!(
                        "{}: node {} has the size of weight {w}",
                        method.name(),
                        node.name
                    );
                }
            }
            // Frozen-only expressions were folded at compile time.
            if !matches!(node.op, Op::Input | Op::Const(_)) {
                let ins = pg.inputs_of(n);
                assert!(
                    !ins.iter().all(|&i| matches!(pg.node(i).op, Op::Const(_))),
                    "{}: node {} computes from constants only every step",
                    method.name(),
                    node.name
                );
            }
        }
    }
}
