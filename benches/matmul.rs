//! Matmul benchmark: dorac's matmul kernels on the GPU wgpu finds (lavapipe on a machine without
//! one) next to a maintained CPU sgemm (`matrixmultiply`, threaded, on this machine's cores), for
//! the shapes a fine-tuning step is made of: square products, a batch of tokens against a wide
//! weight (the thin-row tile), a transformer MLP projection. Prints GFLOP/s of both, measured in
//! this one run, and their ratio. "run" covers one run of the compiled product: the upload of x,
//! the kernel and the read-back of y; "kernel" the kernel alone, repeated in one submission.
//!
//! `cargo bench --bench matmul` (env DORAC_BENCH_ITERS; DORAC_BENCH_LARGE=1 adds 2048³, 4096³ and a
//! Llama-7B MLP projection).

mod common;

use common::env;
use dorac::ir::{Graph, Op};
use dorac::tensor::{Rng, Tensor};
use std::collections::HashMap;
use std::time::Instant;

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
    println!(
        "{:<24} {:>11} {:>12} {:>11} {:>13}",
        "M x K x N", "run GF/s", "kernel GF/s", "sgemm GF/s", "kernel/sgemm"
    );
    let mut shapes = vec![
        (256, 256, 256),
        (512, 512, 512),
        (1024, 1024, 1024),
        (32, 768, 2304),
        (32, 768, 8192),
        (128, 768, 3072),
    ];
    // On a real GPU (benches/gpu.sh) the small shapes measure dispatch and transfer overhead;
    // large ones measure the kernel.
    if env("DORAC_BENCH_LARGE", 0) != 0 {
        shapes.extend([(2048, 2048, 2048), (4096, 4096, 4096), (1024, 4096, 11008)]);
    }
    for (m, k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let w: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        let mut g = Graph::new();
        let xi = g.add_input("x", vec![m, k]);
        let wc = g.add_const("w", Tensor::f32(vec![k, n], w.clone()));
        let y = g.add(Op::MatMul, &[xi, wc], "y", "y").unwrap();
        g.outputs.push(("y".into(), y));
        let exe = dorac::runtime::Executable::compile(&gpu, &g).unwrap();
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
        // operands are on the device.
        let kernel_t = exe.time_kernels(iters).unwrap();
        let flop = 2.0 * (m * k * n) as f64;
        let (gf, kf, cf) = (
            flop / gpu_t / 1e9,
            flop / kernel_t / 1e9,
            flop / cpu_t / 1e9,
        );
        println!(
            "{:<24} {gf:>11.2} {kf:>12.2} {cf:>11.2} {:>13.2}",
            format!("{m} x {k} x {n}"),
            kf / cf
        );
    }
}
