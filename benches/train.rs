//! Training benchmark: one compiled AdamW step (forward, MSE loss, backward, update) for DoRA
//! and LoRA at the same rank, on the GPU wgpu finds, and DoRA with the exact norm gradient and
//! with its activations stored (`dorac train --store-activations`). Prints time per step, the device memory the step's plan allocates,
//! their ratios measured in this run, and unmerged DoRA inference against base inference.
//!
//! `cargo bench --bench train` (env DORAC_BENCH_ITERS, DORAC_BENCH_WIDTH, DORAC_BENCH_BATCH,
//! DORAC_BENCH_RANK).

mod common;

use common::{adapted, env, mlp};
use dorac::ir::{Graph, Method};
use dorac::pipeline::Inference;
use dorac::runtime::Executable;
use dorac::tensor::{Array, Rng};
use dorac::train::{build, AdamW, BuildOptions, LossKind, Session, TrainMethod};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let iters = env("DORAC_BENCH_ITERS", 10);
    let width = env("DORAC_BENCH_WIDTH", 512);
    let batch = env("DORAC_BENCH_BATCH", 128);
    let (layers, rank) = (4, env("DORAC_BENCH_RANK", 16));
    let mut rng = Rng::new(7);
    let gpu = dorac::runtime::Gpu::new(None).expect("the benchmark needs a GPU adapter");
    println!("device: {}", gpu.describe());
    println!("model: {layers} x Linear({width}, {width}) + ReLU, batch {batch}, rank {rank}, {iters} steps each\n");
    let base = mlp(batch, width, layers, &mut rng);
    let x = Array::new(
        vec![batch, width],
        (0..batch * width).map(|_| rng.normal()).collect(),
    );
    let t = Array::new(
        vec![batch, width],
        (0..batch * width).map(|_| rng.normal()).collect(),
    );
    let data: BTreeMap<String, Array> =
        [("x".to_string(), x.clone()), ("target".to_string(), t)].into();

    let mut sessions = vec![];
    // `lean`: as `dorac train` by default, DoRA's activations are not stored beside its `u`
    // (`passes::recompute`); the last row stores them (`--store-activations`).
    for (name, method, graph, exact, lean) in [
        (
            "dora",
            TrainMethod::Dora,
            adapted(&base, Method::Dora, rank, &mut rng),
            false,
            true,
        ),
        (
            "dora exact-norm",
            TrainMethod::Dora,
            adapted(&base, Method::Dora, rank, &mut rng),
            true,
            true,
        ),
        (
            "lora",
            TrainMethod::Lora,
            adapted(&base, Method::Lora, rank, &mut rng),
            false,
            true,
        ),
        (
            "dora stored",
            TrainMethod::Dora,
            adapted(&base, Method::Dora, rank, &mut rng),
            false,
            false,
        ),
    ] {
        let opts = BuildOptions {
            method,
            loss: LossKind::Mse,
            output: None,
            labels: "target".into(),
            optimizer: AdamW::default(),
            exact_norm_grad: exact,
            expose_grads: false,
            full_targets: None,
            lean_activations: lean,
        };
        let program = build(graph, &opts).unwrap();
        // The plan the session runs on this device.
        let (_, plan) = Executable::plan_for(&gpu, &program.graph).unwrap();
        let (peak, total, kernels) = (plan.peak_bytes(), plan.total_bytes(), plan.kernels.len());
        let params: usize = program.params.iter().map(|p| p.initial.numel()).sum();
        let mut session = Session::new(program, Some(&gpu)).unwrap();
        session.step(&data, 1e-3, &[]).unwrap(); // warm-up
        sessions.push((name, session, peak, total, kernels, params));
    }
    // The methods take turns, one step each, so that a machine whose speed drifts (a shared
    // one) slows them alike; the median of each method's steps is its time.
    let mut times = vec![vec![]; sessions.len()];
    for _ in 0..iters {
        for (t, (_, session, ..)) in times.iter_mut().zip(&mut sessions) {
            let c = Instant::now();
            session.step(&data, 1e-3, &[]).unwrap();
            t.push(c.elapsed().as_secs_f64());
        }
    }
    let mut step_results = vec![];
    for ((name, _, peak, total, kernels, params), t) in sessions.into_iter().zip(times) {
        let ms = median(t) * 1e3;
        println!(
            "{name:<16} {ms:>9.2} ms/step  {:>7.2} MB device peak ({:>7.2} MB before reuse)  {kernels:>4} kernels  {params} trainable",
            peak as f64 / 1e6,
            total as f64 / 1e6
        );
        step_results.push((name, ms, peak, kernels));
    }
    let get = |n: &str| step_results.iter().find(|r| r.0 == n).unwrap();
    println!("\nratios (this run):");
    for (what, a, b) in [
        ("DoRA / LoRA", "dora", "lora"),
        ("DoRA storing activations / LoRA", "dora stored", "lora"),
        ("exact / detached norm", "dora exact-norm", "dora"),
    ] {
        println!("  step time    {what}  {:.3}", get(a).1 / get(b).1);
        println!(
            "  peak memory  {what}  {:.3}",
            get(a).2 as f64 / get(b).2 as f64
        );
    }
    println!(
        "  kernels      DoRA / LoRA  {:.3} ({} / {})",
        get("dora").3 as f64 / get("lora").3 as f64,
        get("dora").3,
        get("lora").3
    );

    // Inference: unmerged DoRA (norm folded once) against the base model, in turns.
    let inputs: HashMap<String, Vec<f32>> =
        [("x".to_string(), x.data.iter().map(|&v| v as f32).collect())].into();
    let compile = |g: &Graph| {
        let g = Inference::default().run(g.clone()).unwrap().value;
        let exe = Executable::compile(&gpu, &g).unwrap();
        exe.run(&inputs).unwrap();
        exe
    };
    let exes = [
        compile(&base),
        compile(&adapted(&base, Method::Dora, rank, &mut rng)),
    ];
    let mut times = [vec![], vec![]];
    for _ in 0..iters {
        for (t, exe) in times.iter_mut().zip(&exes) {
            let c = Instant::now();
            exe.run(&inputs).unwrap();
            t.push(c.elapsed().as_secs_f64());
        }
    }
    let [base_ms, dora_ms] = times.map(|t| median(t) * 1e3);
    println!(
        "\ninference: base {base_ms:.2} ms, unmerged DoRA {dora_ms:.2} ms, ratio {:.3}",
        dora_ms / base_ms
    );
}
