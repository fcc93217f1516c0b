//! The training methods of the paper's comparisons and ablations, all through one pipeline, and
//! the structure of a compiled step: no gradient memory for frozen weights, frozen-only work
//! folded away, only the trainable tensors updated.

mod common;

use common::*;
use dorac::ir::{Graph, Op, Patch};
use dorac::passes::{find_linear_layers, insert_adapters, AdapterInit, AdapterSpec};
use dorac::tensor::Array;
use dorac::train::{build, BuildOptions, ParamRole, Session, TrainMethod};
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
    adapt(&mut g, method);
    g
}

/// The adapters `method` trains, on every linear layer of `g`.
fn adapt(g: &mut Graph, method: TrainMethod) {
    if let Some(kind) = method.adapter() {
        let specs = find_linear_layers(g)
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
        insert_adapters(g, specs).unwrap();
    }
}

fn options(method: TrainMethod) -> BuildOptions {
    mse_options(method)
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
            .adapters()
            .iter()
            .map(|a| (g.node(a.weight).name.clone(), g.shape(a.weight).to_vec()))
            .collect();
        let program = build(g, &options(method)).unwrap();
        let pg = &program.graph;
        let computed: std::collections::HashSet<_> = dorac::codegen::plan(pg)
            .unwrap()
            .kernels
            .iter()
            .flat_map(|k| k.nodes.clone())
            .collect();
        for n in pg.petgraph().node_indices() {
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
            // Frozen-only expressions were folded at compile time, but for transposes of
            // constants that products read in place: no kernel computes them.
            let ins = pg.inputs_of(n);
            let frozen_only = !matches!(node.op, Op::Input | Op::Const(_))
                && ins.iter().all(|&i| matches!(pg.node(i).op, Op::Const(_)));
            if frozen_only {
                assert!(
                    matches!(node.op, Op::Transpose { .. }) && !computed.contains(&n),
                    "{}: node {} computes from constants only every step",
                    method.name(),
                    node.name
                );
            }
        }
    }
}

/// A weight column of norm zero (a pruned neuron; PEFT computes 0/0 = NaN there, its issue
/// #2049): DoRA at init computes exactly the base output, merges to the base weights, and
/// trains without NaN on the reference executor and the GPU, with the detached and the exact
/// norm gradient; its B row learns (the column is not frozen dead); the other columns still
/// compute PEFT's DoRA (tests/train_peft.rs).
#[test]
fn zero_norm_columns_give_the_base_output_and_train_without_nan() {
    let data = demo();
    let pruned = |method: TrainMethod| {
        let mut g = model(TrainMethod::Full);
        let layers = find_linear_layers(&g);
        for l in &layers[..2] {
            let Op::Const(t) = &g.node(l.weight).op else {
                panic!("weights are constants")
            };
            // Output column 1 of the layer: W[:, 1] of a MatMul's [in, out] weight, W[1, :] of
            // a Gemm's transposed [out, in] one.
            let mut a = t.to_array();
            let cols = a.shape[1];
            let stored_out_first =
                matches!(l.kind, dorac::ir::LinearKind::Gemm { trans_b: true, .. });
            for (i, v) in a.data.iter_mut().enumerate() {
                let out = if stored_out_first { i / cols } else { i % cols };
                if out == 1 {
                    *v = 0.0;
                }
            }
            let mut p = Patch::new(&g);
            p.set_const(l.weight, a.to_tensor_f32()).unwrap();
            g.apply(p.finish());
        }
        let base = g.clone();
        adapt(&mut g, method);
        (base, g)
    };
    let (base, dora) = pruned(TrainMethod::Dora);
    let inputs: BTreeMap<String, Array> = [("x".to_string(), data["x"].clone())].into();
    let want = run_reference(&base, &inputs);
    for (how, got) in [
        ("reference", run_reference(&dora, &inputs)),
        ("gpu", run_gpu(&dora, &inputs)),
    ] {
        let out = &got["y"].data;
        assert!(
            out.iter().all(|v| v.is_finite()),
            "{how}: non-finite output"
        );
        let e = dorac::tensor::relative_error(out, &want["y"].data);
        assert!(e < 1e-6, "{how}: DoRA at init vs base {e:e}");
    }
    let mut merged = dora.clone();
    dorac::passes::merge_adapters(&mut merged).unwrap();
    let e = rel(&run_reference(&merged, &inputs), &want, "y");
    assert!(e < 1e-6, "merged at init vs base {e:e}");

    for exact_norm_grad in [false, true] {
        for gpu_run in [false, true] {
            let (_, g) = pruned(TrainMethod::Dora);
            let mut opts = options(TrainMethod::Dora);
            opts.exact_norm_grad = exact_norm_grad;
            let program = build(g, &opts).unwrap();
            let mut s = Session::new(program, gpu_run.then(gpu)).unwrap();
            let losses: Vec<f64> = (0..20)
                .map(|_| s.step(&data, 1e-2, &[]).unwrap().0.loss)
                .collect();
            let state = s.read_state().unwrap();
            let tag = format!("exact norm {exact_norm_grad}, gpu {gpu_run}");
            // Row 1 of the first layer's B (its zero column) has moved off zero.
            let b = state
                .iter()
                .find(|(k, _)| k.ends_with("lora_B.weight"))
                .map(|(_, v)| v)
                .unwrap();
            let r = b.shape[1];
            assert!(
                b.data[r..2 * r].iter().any(|&v| v != 0.0),
                "{tag}: the zero column's B row did not learn"
            );
            assert!(
                state.values().all(|a| a.data.iter().all(|v| v.is_finite())),
                "{tag}: non-finite state"
            );
            assert!(losses[19] < losses[0], "{tag}: loss {losses:?}");
            println!("{tag}: loss {} -> {}", losses[0], losses[19]);
        }
    }
}
