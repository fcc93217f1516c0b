//! Matmul benchmark: dorac's matmul kernels on the GPU wgpu finds (lavapipe on a machine without
//! one) next to a maintained CPU sgemm (`matrixmultiply`, threaded, on this machine's cores), for
//! the shapes a fine-tuning step is made of: square products, a batch of tokens against a wide
//! weight (the thin-row tile), a transformer MLP projection. Prints GFLOP/s of both, measured in
//! this one run, and their ratio. "run" covers one run of the compiled product: the upload of x,
//! the kernel and the read-back of y; "kernel" the kernel alone, repeated in one submission; the
//! next column is the kernel planned for the other target (`codegen::Target`) on the same device,
//! and "speedup" how much faster the adapter's own kernel is.
//!
//! `cargo bench --bench matmul` (env DORAC_BENCH_ITERS; DORAC_BENCH_LARGE=1 adds 2048³, 4096³ and a
//! Llama-7B MLP projection).

mod common;

use common::env;
use dorac::codegen::{Plan, PlanOptions, Target};
use dorac::ir::{Graph, GraphBuilder, Op};
use dorac::runtime::Executable;
use dorac::tensor::{Rng, Tensor};
use std::collections::HashMap;
use std::time::Instant;

/// The kernels of `target`, using the device's subgroups where that is the device's own target
/// (as `run` and `train` plan).
fn plan_for(g: &Graph, target: Target, gpu: &dorac::runtime::Gpu) -> Plan {
    let options = PlanOptions {
        target,
        subgroup_size: gpu.subgroup_size().filter(|_| target == gpu.target()),
        ..PlanOptions::default()
    };
    dorac::codegen::plan_with(g, &options).unwrap()
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let iters = env("DORAC_BENCH_ITERS", 10);
    let mut rng = Rng::new(7);
    let gpu = dorac::runtime::Gpu::new(None).expect("the benchmark needs a GPU adapter");
    println!("device: {}", gpu.describe());
    println!(
        "CPU: matrixmultiply sgemm, threaded ({} threads available), {iters} iterations\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // This adapter's kernels, and the other target's for comparison (on lavapipe: the
    // row-broadcast CPU kernel against the GPU's tiled one, which dorac used before).
    let target = gpu.target();
    let other = match target {
        Target::Cpu => Target::Gpu,
        Target::Gpu => Target::Cpu,
    };
    println!("kernels for target {target:?}, compared with target {other:?}'s");
    println!(
        "{:<24} {:>11} {:>12} {:>12} {:>8} {:>11} {:>13}",
        "M x K x N",
        "run GF/s",
        "kernel GF/s",
        format!("{other:?} GF/s"),
        "speedup",
        "sgemm GF/s",
        "kernel/sgemm"
    );
    // (m, k, n, transB): transB is a Linear layer as PyTorch exports it (W stored [n, k]).
    let mut shapes = vec![
        (256, 256, 256, false),
        (512, 512, 512, false),
        (1024, 1024, 1024, false),
        (32, 768, 2304, false),
        (32, 768, 8192, false),
        (128, 768, 3072, false),
        (128, 768, 3072, true),
        (512, 512, 512, true),
        // A LoRA/DoRA layer's thin products at rank 16: x Aᵀ (A stored [r, in]) and dY B.
        (128, 512, 16, true),
        (128, 512, 16, false),
    ];
    // On a real GPU (benches/gpu.sh) the small shapes measure dispatch and transfer overhead;
    // large ones measure the kernel.
    if env("DORAC_BENCH_LARGE", 0) != 0 {
        shapes.extend([
            (2048, 2048, 2048, false),
            (4096, 4096, 4096, false),
            (1024, 4096, 11008, false),
            (1024, 4096, 11008, true),
        ]);
    }
    for (m, k, n, trans_b) in shapes {
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let w: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        let mut g = GraphBuilder::new();
        let xi = g.add_input("x", vec![m, k]);
        let y = if trans_b {
            // The same product with W stored transposed: w_t[j, p] = w[p, j].
            let w_t = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let wc = g.add_const("w", Tensor::f32(vec![n, k], w_t));
            let gemm = Op::Gemm {
                alpha: 1.0,
                beta: 0.0,
                trans_a: false,
                trans_b: true,
            };
            g.add(gemm, &[xi, wc], "y", "y").unwrap()
        } else {
            let wc = g.add_const("w", Tensor::f32(vec![k, n], w.clone()));
            g.add(Op::MatMul, &[xi, wc], "y", "y").unwrap()
        };
        g.add_output("y", y);
        let exe = Executable::new(&gpu, &plan_for(&g, target, &gpu), &g).unwrap();
        let inputs: HashMap<String, Vec<f32>> = [("x".to_string(), x.clone())].into();
        exe.run(&inputs).unwrap(); // warm-up: pipeline creation, first upload
        let gpu_t = median(
            (0..iters)
                .map(|_| {
                    let t = Instant::now();
                    exe.run(&inputs).unwrap();
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        );
        let mut c = vec![0f32; m * n];
        let cpu_t = median(
            (0..iters)
                .map(|_| {
                    let t = Instant::now();
                    // Row-major x [m, k] @ w [k, n] -> c [m, n].
                    unsafe {
                        matrixmultiply::sgemm(
                            m,
                            k,
                            n,
                            1.0,
                            x.as_ptr(),
                            k as isize,
                            1,
                            w.as_ptr(),
                            n as isize,
                            1,
                            0.0,
                            c.as_mut_ptr(),
                            n as isize,
                            1,
                        );
                    }
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        );
        // The kernel alone, repeated in one submission: what a step's product costs once its
        // operands are on the device. Then the other target's kernel for the same product, on
        // this device, the two timed in turns (best of 3 each: a shared machine is noisy).
        let other_exe = Executable::new(&gpu, &plan_for(&g, other, &gpu), &g).unwrap();
        other_exe.run(&inputs).unwrap();
        let (mut kernel_t, mut other_t) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            kernel_t = kernel_t.min(exe.time_kernels(iters).unwrap());
            other_t = other_t.min(other_exe.time_kernels(iters).unwrap());
        }
        let flop = 2.0 * (m * k * n) as f64;
        let rate = |t: f64| flop / t / 1e9;
        let (kf, cf) = (rate(kernel_t), rate(cpu_t));
        println!(
            "{:<24} {:>11.2} {kf:>12.2} {:>12.2} {:>8.2} {cf:>11.2} {:>13.2}",
            format!("{m} x {k} x {n}{}", if trans_b { " transB" } else { "" }),
            rate(gpu_t),
            rate(other_t),
            other_t / kernel_t,
            kf / cf
        );
    }
}
