//! Inference benchmark: base model vs unmerged DoRA vs unmerged LoRA vs merged DoRA, on the GPU
//! wgpu finds (lavapipe on a machine without one). Prints time per forward pass, the ratios
//! measured in this one run, and the work (FLOPs) and device bytes each variant needs.
//!
//! `cargo bench --bench inference` (env DORAC_BENCH_ITERS, DORAC_BENCH_WIDTH, DORAC_BENCH_BATCH).

mod common;

use common::{adapted, env, flops, mlp};
use dorac::ir::Method;
use dorac::passes::merge_adapters;
use dorac::pipeline::Inference;
use dorac::tensor::Rng;
use std::collections::HashMap;
use std::time::Instant;

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

    // Compile all four, then run them in turns so that a machine whose speed drifts (a shared
    // one) slows them alike; each one's time is the median of its runs.
    let mut compiled = vec![];
    for (name, g) in [
        ("base", &base),
        ("dora (unmerged)", &dora),
        ("lora (unmerged)", &lora),
        ("dora merged", &merged),
    ] {
        let g = Inference::default().run(g.clone()).unwrap().value;
        // What `Executable::compile` runs on this device.
        let (g, plan) = dorac::runtime::Executable::plan_for(&gpu, &g).unwrap();
        let g = g.into_owned();
        let exe = dorac::runtime::Executable::new(&gpu, &plan, &g).unwrap();
        exe.run(&inputs).unwrap(); // warm-up: pipeline creation, first upload
        compiled.push((name, g, plan, exe));
    }
    let mut times = vec![vec![]; compiled.len()];
    for _ in 0..iters {
        for (t, (_, _, _, exe)) in times.iter_mut().zip(&compiled) {
            let c = Instant::now();
            exe.run(&inputs).unwrap();
            t.push(c.elapsed().as_secs_f64());
        }
    }
    let mut results = vec![];
    for ((name, g, plan, _), mut times) in compiled.into_iter().zip(times) {
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let bytes = plan.peak_bytes();
        let f = flops(&g);
        println!(
            "{name:<16} {:>8.3} ms/forward  {:>6.2} GFLOP  {:>7.2} MB device peak  {:>3} kernels  {:>6.2} GFLOP/s",
            median * 1e3,
            f / 1e9,
            bytes as f64 / 1e6,
            plan.kernels.len(),
            f / median / 1e9
        );
        results.push((name, median, f));
    }
    let t = |n: &str| results.iter().find(|r| r.0 == n).unwrap().1;
    let work = |n: &str| results.iter().find(|r| r.0 == n).unwrap().2;
    println!("\nratios (this run):");
    // The adapter's two thin products add r (K + N) / (K N) of the base's work per layer: no
    // unmerged schedule computes less, so that FLOP ratio is the floor of the time ratio.
    println!(
        "  unmerged DoRA / base  {:.3}  (FLOP ratio {:.4})",
        t("dora (unmerged)") / t("base"),
        work("dora (unmerged)") / work("base")
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
