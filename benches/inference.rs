//! Inference benchmark: base model vs unmerged DoRA vs unmerged LoRA vs merged DoRA, on the GPU
//! wgpu finds (lavapipe on a machine without one). Prints time per forward pass, the ratios
//! measured in this one run, and the work (FLOPs) and device bytes each variant needs.
//!
//! `cargo bench --bench inference` (env DORAC_BENCH_ITERS, DORAC_BENCH_WIDTH, DORAC_BENCH_BATCH).

use dorac::ir::{Graph, Method, Op};
use dorac::passes::{
    find_linear_layers, fold_constants, insert_adapters, merge_adapters, AdapterInit, AdapterSpec,
};
use dorac::tensor::{Rng, Tensor};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An MLP of `layers` Gemm layers (PyTorch's Linear export: W [out, in], transB=1) with ReLU.
fn mlp(batch: usize, width: usize, layers: usize, rng: &mut Rng) -> Graph {
    let mut g = Graph::new();
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
                    Op::Unary(dorac::ir::Unary::Relu),
                    &[h],
                    &format!("{label}_output_0"),
                    &label,
                )
                .unwrap();
        }
    }
    g.outputs.push(("y".into(), h));
    g
}

fn adapted(base: &Graph, method: Method, rank: usize, rng: &mut Rng) -> Graph {
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
fn flops(g: &Graph) -> f64 {
    g.graph
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

fn main() {
    let iters = env("DORAC_BENCH_ITERS", 20);
    let width = env("DORAC_BENCH_WIDTH", 512);
    let batch = env("DORAC_BENCH_BATCH", 256);
    let (layers, rank) = (4, 16);
    let mut rng = Rng::new(42);
    let gpu = dorac::runtime::Gpu::new(None).expect("the benchmark needs a GPU adapter");
    println!("device: {}", gpu.describe());
    println!("model: {layers} x Linear({width}, {width}) + ReLU, batch {batch}, rank {rank}, {iters} iterations\n");

    let base = mlp(batch, width, layers, &mut rng);
    let dora = adapted(&base, Method::Dora, rank, &mut rng);
    let lora = adapted(&base, Method::Lora, rank, &mut rng);
    let mut merged = dora.clone();
    merge_adapters(&mut merged).unwrap();
    let x: Vec<f32> = (0..batch * width).map(|_| rng.normal() as f32).collect();
    let inputs: HashMap<String, Vec<f32>> = [("x".to_string(), x)].into();

    let mut results = vec![];
    for (name, g) in [
        ("base", &base),
        ("dora (unmerged)", &dora),
        ("lora (unmerged)", &lora),
        ("dora merged", &merged),
    ] {
        let mut g = g.clone();
        fold_constants(&mut g, &HashSet::new()).unwrap();
        let plan = dorac::codegen::plan(&g).unwrap();
        let exe = dorac::runtime::Executable::new(&gpu, &plan, &g).unwrap();
        exe.run(&inputs).unwrap(); // warm-up: pipeline creation, first upload
        let mut times = vec![];
        for _ in 0..iters {
            let t = Instant::now();
            exe.run(&inputs).unwrap();
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let bytes: usize = plan.buffers.iter().map(|b| b.len * 4).sum();
        let f = flops(&g);
        println!(
            "{name:<16} {:>8.3} ms/forward  {:>6.2} GFLOP  {:>7.2} MB device  {:>3} kernels  {:>6.2} GFLOP/s",
            median * 1e3,
            f / 1e9,
            bytes as f64 / 1e6,
            plan.kernels.len(),
            f / median / 1e9
        );
        results.push((name, median));
    }
    let t = |n: &str| results.iter().find(|r| r.0 == n).unwrap().1;
    println!("\nratios (this run):");
    println!(
        "  unmerged DoRA / base  {:.3}",
        t("dora (unmerged)") / t("base")
    );
    println!(
        "  unmerged DoRA / LoRA  {:.3}",
        t("dora (unmerged)") / t("lora (unmerged)")
    );
    println!(
        "  merged DoRA / base    {:.3}",
        t("dora merged") / t("base")
    );
}
