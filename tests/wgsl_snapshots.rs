//! Generated WGSL pinned by insta snapshots: a changed shader shows up as a diff to review, not
//! as a silent change. Covers a whole MLP (models/mlp3d) and one DoRA layer before folding (the
//! form training runs: low-rank path, factored norm, magnitude scale).

mod common;

use dorac::ir::{Graph, GraphBuilder, Method, Op};
use dorac::passes::{find_linear_layers, insert_adapters, AdapterInit, AdapterSpec};
use dorac::tensor::{Rng, Tensor};

fn all_kernels(graph: &Graph) -> String {
    let plan = dorac::codegen::plan(graph).unwrap();
    let mut text = format!("{plan}\n");
    for k in &plan.kernels {
        text += &format!("// ===== {} =====\n{}\n", k.name, k.source);
    }
    text
}

#[test]
fn mlp_model_wgsl() {
    let g = common::load("mlp3d");
    insta::assert_snapshot!("mlp3d_wgsl", all_kernels(&g));
}

#[test]
fn dora_layer_wgsl() {
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![4, 16]);
    let mut rng = Rng::new(5);
    let w: Vec<f32> = (0..16 * 8).map(|_| rng.normal() as f32).collect();
    let w = g.add_const("fc.weight", Tensor::f32(vec![16, 8], w));
    let y = g.add(Op::MatMul, &[x, w], "y_raw", "/fc/MatMul").unwrap();
    g.add_output("y", y);
    let specs = find_linear_layers(&g)
        .into_iter()
        .map(|layer| AdapterSpec {
            layer,
            method: Method::Dora,
            rank: 2,
            alpha: 4.0,
            rslora: false,
            init: AdapterInit::Peft { seed: 0 },
        })
        .collect();
    let mut g = g.finish();
    insert_adapters(&mut g, specs).unwrap();
    insta::assert_snapshot!("dora_layer_wgsl", all_kernels(&g));
}
