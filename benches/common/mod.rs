//! Shared pieces of the benchmarks: a synthetic MLP shaped like PyTorch's Linear export, and
//! adapters with non-trivial values.
#![allow(dead_code)]

use dorac::ir::{Graph, GraphBuilder, Method, Op};
use dorac::passes::{find_linear_layers, insert_adapters, AdapterInit, AdapterSpec};
use dorac::tensor::{Rng, Tensor};

pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An MLP of `layers` Gemm layers (PyTorch's Linear export: W [out, in], transB=1) with ReLU.
pub fn mlp(batch: usize, width: usize, layers: usize, rng: &mut Rng) -> Graph {
    let mut g = GraphBuilder::new();
    let mut h = g.add_input("x", vec![batch, width]);
    let bound = 1.0 / (width as f64).sqrt();
    for l in 0..layers {
        let w: Vec<f32> = (0..width * width)
            .map(|_| rng.range(-bound, bound) as f32)
            .collect();
        let b: Vec<f32> = (0..width)
            .map(|_| rng.range(-bound, bound) as f32)
            .collect();
        let w = g.add_const(
            &format!("layers.{l}.weight"),
            Tensor::f32(vec![width, width], w),
        );
        let b = g.add_const(&format!("layers.{l}.bias"), Tensor::f32(vec![width], b));
        let gemm = Op::Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: true,
        };
        let label = format!("/layers/layers.{l}/Gemm");
        h = g
            .add(gemm, &[h, w, b], &format!("{label}_output_0"), &label)
            .unwrap();
        if l + 1 < layers {
            let label = format!("/layers/act{l}/Relu");
            h = g
                .add(
                    Op::Unary(dorac::ir::unary::RELU),
                    &[h],
                    &format!("{label}_output_0"),
                    &label,
                )
                .unwrap();
        }
    }
    g.add_output("y", h);
    g.finish()
}

pub fn adapted(base: &Graph, method: Method, rank: usize, rng: &mut Rng) -> Graph {
    let mut g = base.clone();
    let specs = find_linear_layers(&g)
        .into_iter()
        .map(|layer| {
            let (fin, fout) = (layer.in_features, layer.out_features);
            let mut v = |n: usize, s: f64| {
                (0..n)
                    .map(|_| (rng.normal() * s) as f32)
                    .collect::<Vec<_>>()
            };
            let a = Tensor::f32(vec![rank, fin], v(rank * fin, 0.05));
            let b = Tensor::f32(vec![fout, rank], v(fout * rank, 0.05));
            let m = Tensor::f32(vec![fout], v(fout, 0.1).iter().map(|x| 1.0 + x).collect());
            AdapterSpec {
                layer,
                method,
                rank,
                alpha: 2.0 * rank as f64,
                rslora: false,
                init: AdapterInit::Tensors {
                    a,
                    b,
                    m: Some(m).filter(|_| method == Method::Dora),
                },
            }
        })
        .collect();
    insert_adapters(&mut g, specs).unwrap();
    g
}

/// FLOPs of the compiled (folded) graph: 2mkn per product, one per element elsewhere.
pub fn flops(g: &Graph) -> f64 {
    g.petgraph()
        .node_indices()
        .map(|n| {
            let node = g.node(n);
            let ins = g.inputs_of(n);
            match node.op {
                Op::MatMul => {
                    let k = *g.shape(ins[0]).last().unwrap_or(&1);
                    2.0 * (node.numel() * k) as f64
                }
                Op::Gemm { trans_a, .. } => {
                    let a = g.shape(ins[0]);
                    let k = if trans_a { a[0] } else { a[1] };
                    2.0 * (node.numel() * k) as f64
                }
                Op::Input | Op::Const(_) => 0.0,
                _ => node.numel() as f64,
            }
        })
        .sum()
}
