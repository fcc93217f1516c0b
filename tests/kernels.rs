//! Every WGSL kernel against the f64 reference executor, on a real wgpu adapter.
//!
//! Each test builds a tiny IR graph by hand, runs it through `codegen` + `runtime` and through
//! `reference::run`, and compares every output with `tensor::relative_error` (max-abs error over
//! max-abs reference value) at 1e-5. Inputs are random with a fresh seed per run, printed with
//! every test and quoted in every failure; `DORAC_TEST_SEED=<seed>` replays a run.
//!
//! These tests need a GPU adapter and FAIL without one (lavapipe, Mesa's software Vulkan driver,
//! is enough): run `scripts/install-vulkan.sh` or `apt-get install mesa-vulkan-drivers`.
//!
//! The snapshot tests at the end pin the generated WGSL of a small MLP (tests/snapshots/): a
//! changed shader shows up as a diff to review. Accept a reviewed change with
//! `cargo insta accept`, or by renaming the `.snap.new` files; CI runs with `INSTA_UPDATE=no`.

use dorac::codegen::{self, PlanOptions, Target};
use dorac::ir::{
    unary, Binary, BlockCodes, BlockFormat, Graph, GraphBuilder, Half, NodeId, Op, Reduce, Stored,
    Unary,
};
use dorac::reference;
use dorac::runtime::{self, Executable, Gpu};
use dorac::tensor::{numel, relative_error, Array, DType, Rng, Tensor};
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

const TOL: f64 = 1e-5;

/// One adapter for the whole test binary: opening a device costs more than most tests.
fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
    match GPU.get_or_init(|| Gpu::new(None).map_err(|e| e.to_string())) {
        Ok(g) => g,
        // The error says how to install a driver (runtime::INSTALL_HINT).
        Err(e) => panic!("these tests need a GPU adapter and fail without one: {e}"),
    }
}

/// The run's seed: `DORAC_TEST_SEED`, or the clock.
fn base_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("DORAC_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .expect("DORAC_TEST_SEED must be an unsigned integer"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    })
}

/// A graph under test with its random feeds. Each test derives its own stream from the run's
/// seed and its name, so tests do not depend on each other's order.
struct Case {
    test: &'static str,
    rng: Rng,
    graph: GraphBuilder,
    feeds: HashMap<String, Array>,
}

impl Case {
    fn new(test: &'static str) -> Case {
        let base = base_seed();
        let name_hash = test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        println!("{test}: seed {base} (replay with DORAC_TEST_SEED={base})");
        Case {
            test,
            rng: Rng::new(base ^ name_hash),
            graph: GraphBuilder::new(),
            feeds: HashMap::new(),
        }
    }

    /// `len` values uniform in [lo, hi), rounded to f32 so both executors see the same numbers.
    fn values(&mut self, len: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..len).map(|_| self.rng.range(lo, hi) as f32).collect()
    }

    fn input(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> NodeId {
        let v = self.values(numel(shape), lo, hi);
        self.input_values(name, shape, v)
    }

    fn input_values(&mut self, name: &str, shape: &[usize], v: Vec<f32>) -> NodeId {
        self.feeds
            .insert(name.into(), Array::from_f32(shape.to_vec(), &v));
        self.graph.add_input(name, shape.to_vec())
    }

    fn constant(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> NodeId {
        let v = self.values(numel(shape), lo, hi);
        self.graph.add_const(name, Tensor::f32(shape.to_vec(), v))
    }

    fn op(&mut self, op: Op, inputs: &[NodeId], name: &str) -> NodeId {
        self.graph
            .add(op, inputs, name, name)
            .unwrap_or_else(|e| panic!("{}: building '{name}': {e}", self.test))
    }

    fn output(&mut self, name: &str, n: NodeId) {
        self.graph.add_output(name, n);
    }

    /// `op` on `inputs`, as a graph output of the same name.
    fn out(&mut self, op: Op, inputs: &[NodeId], name: &str) -> NodeId {
        let n = self.op(op, inputs, name);
        self.output(name, n);
        n
    }

    /// Checks the plan for a GPU and, where any kernel differs, the plan for a CPU driver
    /// (its own matmul template, and the kernels that use this device's subgroups) too: both
    /// kinds of kernel run here, on lavapipe.
    fn check(self) {
        let plan = |target| {
            let options = PlanOptions {
                target,
                subgroup_size: gpu().subgroup_size(),
                ..PlanOptions::default()
            };
            codegen::plan_with(&self.graph, &options)
                .unwrap_or_else(|e| panic!("{}: plan for {target:?}: {e}", self.test))
        };
        let (gpu_plan, cpu_plan) = (plan(Target::Gpu), plan(Target::Cpu));
        self.check_plan(&gpu_plan);
        let differs = (gpu_plan.kernels.iter())
            .zip(&cpu_plan.kernels)
            .any(|(g, c)| g.source != c.source);
        if differs {
            println!("{}: the CPU target's kernels", self.test);
            self.check_plan(&cpu_plan);
        }
    }

    fn check_plan(&self, plan: &codegen::Plan) {
        let test = self.test;
        let seed = base_seed();
        let exe = Executable::new(gpu(), plan, &self.graph)
            .unwrap_or_else(|e| panic!("{test}: building the executable: {e}"));
        let host: HashMap<String, Vec<f32>> = self
            .feeds
            .iter()
            .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
            .collect();
        let got = exe
            .run(&host)
            .unwrap_or_else(|e| panic!("{test}: run (seed {seed}): {e}"));
        let want = reference::run(&self.graph, &self.feeds)
            .unwrap_or_else(|e| panic!("{test}: reference: {e}"));
        let mut failures = vec![];
        for (name, _) in self.graph.outputs() {
            let g: Vec<f64> = got[name].iter().map(|&x| x as f64).collect();
            let err = relative_error(&g, &want[name].data);
            // relative_error is infinite, never NaN, when anything is NaN.
            println!("relerr {test}/{name} {err:.3e}");
            if err > TOL {
                let worst = g
                    .iter()
                    .zip(&want[name].data)
                    .enumerate()
                    .max_by(|a, b| {
                        let d = |(_, (g, w)): &(usize, (&f64, &f64))| (*g - *w).abs();
                        d(a).partial_cmp(&d(b))
                            .unwrap_or(std::cmp::Ordering::Greater)
                    })
                    .map(|(i, (g, w))| format!(" (worst at {i}: gpu {g}, reference {w})"))
                    .unwrap_or_default();
                failures.push(format!("{name}: relative error {err:e} > {TOL:e}{worst}"));
            }
        }
        assert!(
            failures.is_empty(),
            "{test} (seed {seed}; replay with DORAC_TEST_SEED={seed}):\n  {}",
            failures.join("\n  ")
        );
    }
}

fn un(u: Unary) -> Op {
    Op::Unary(u)
}

fn bin(b: Binary) -> Op {
    Op::Binary(b)
}

// ---------------------------------------------------------------- element-wise

#[test]
fn unary_ops() {
    let mut c = Case::new("unary_ops");
    let x = c.input("x", &[7, 45], -4.0, 4.0);
    let pos = c.input("pos", &[7, 45], 0.05, 5.0);
    let wide = c.input("wide", &[300], -20.0, 20.0);
    for u in unary::ALL.iter().filter(|u| !u.is_predicate()) {
        let (lo, hi) = u.def().sample_range;
        let x = c.input(&format!("x_{}", u.name()), &[7, 45], lo, hi);
        c.out(un(*u), &[x], u.name());
    }
    // Where the naive formulas overflow or cancel.
    for (u, name, input) in [
        (unary::SIGMOID, "sigmoid_wide", wide),
        (unary::TANH, "tanh_wide", wide),
        (unary::TANH, "tanh_small", x),
        (unary::EXP, "exp_4", x),
        (unary::SQRT, "sqrt_near_0", pos),
        (unary::LOG, "log_near_0", pos),
        (unary::RECIPROCAL, "reciprocal_near_0", pos),
    ] {
        c.out(un(u), &[input], name);
    }
    c.check();
}

#[test]
fn tanh_and_sigmoid_survive_large_inputs() {
    let mut c = Case::new("tanh_and_sigmoid_survive_large_inputs");
    let big = vec![
        -1e4, -500.0, -100.0, -89.0, -45.0, -10.0, -1e-3, -1e-8, 0.0, 1e-8, 1e-3, 0.39, 0.41, 10.0,
        45.0, 89.0, 100.0, 500.0, 1e4,
    ];
    let x = c.input_values("x", &[big.len()], big);
    c.out(un(unary::TANH), &[x], "tanh");
    c.out(un(unary::SIGMOID), &[x], "sigmoid");
    c.out(un(unary::GELU_TANH), &[x], "gelu_tanh");
    c.out(un(unary::GELU), &[x], "gelu_erf");
    c.check();
}

#[test]
fn erf_and_gelu_over_minus6_to_6() {
    let mut c = Case::new("erf_and_gelu_over_minus6_to_6");
    // An even grid over [-6, 6] (hits the branch points) plus random points.
    let mut v: Vec<f32> = (0..=1200).map(|i| -6.0 + i as f32 * 0.01).collect();
    v.extend(c.values(1199, -6.0, 6.0));
    let x = c.input_values("x", &[2400], v);
    c.out(un(unary::ERF), &[x], "erf");
    c.out(un(unary::GELU), &[x], "gelu_erf");
    c.out(un(unary::GELU_TANH), &[x], "gelu_tanh");
    c.check();
}

#[test]
fn binary_ops_with_broadcasting() {
    let mut c = Case::new("binary_ops_with_broadcasting");
    // (a shape, b shape, variant) -> every op.
    let variants: [(&[usize], &[usize], &str); 8] = [
        (&[3, 4], &[3, 4], "same"),
        (&[3, 4], &[], "scalar"),
        (&[], &[3, 4], "scalar_first"),
        (&[3, 4], &[4], "row"),
        (&[3, 4], &[3, 1], "column"),
        (&[2, 1, 4], &[3, 4], "rank_extended"),
        (&[3, 1], &[1, 4], "outer"),
        (&[2, 3, 1, 5], &[3, 4, 1], "both_ways"),
    ];
    for (sa, sb, variant) in variants {
        let a = c.input(&format!("a_{variant}"), sa, -2.0, 2.0);
        let b = c.input(&format!("b_{variant}"), sb, 0.5, 2.0);
        for (op, name) in [
            (Binary::Add, "add"),
            (Binary::Sub, "sub"),
            (Binary::Mul, "mul"),
            (Binary::Div, "div"),
        ] {
            c.out(bin(op), &[a, b], &format!("{name}_{variant}"));
        }
    }
    c.check();
}

/// Every binary function of `ops::binary` (a new one is covered without further code), on
/// float operands where each is defined and smooth: a in [0.5, 2], b in [0.5, 2] broadcast by
/// rows. Special values and integer types have their own tests below.
#[test]
fn every_binary_function() {
    let mut c = Case::new("every_binary_function");
    let a = c.input("a", &[5, 7], 0.5, 2.0);
    let b = c.input("b", &[7], 0.5, 2.0);
    for &op in Binary::ALL {
        c.out(bin(op), &[a, b], op.name());
    }
    c.check();
}

#[test]
fn pow_negative_bases_and_fractional_exponents() {
    let mut c = Case::new("pow_negative_bases_and_fractional_exponents");
    // Negative (and positive) bases with integer exponents, broadcast along the row.
    let base = c.input("base", &[6, 7], -3.0, 3.0);
    let ints = c.graph.add_const(
        "ints",
        Tensor::f32(vec![7], vec![-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]),
    );
    c.out(bin(Binary::Pow), &[base, ints], "pow_int");
    // Positive bases with fractional exponents.
    let pos = c.input("pos", &[6, 7], 0.1, 3.0);
    let frac = c.input("frac", &[6, 7], -2.5, 2.5);
    c.out(bin(Binary::Pow), &[pos, frac], "pow_frac");
    // A scalar exponent (x^2, the DoRA norm's square), negative bases included.
    let two = c.graph.add_const("two", Tensor::scalar(2.0));
    c.out(bin(Binary::Pow), &[base, two], "pow_square");
    c.check();
}

#[test]
fn pow_of_negative_base_and_fractional_exponent_is_nan() {
    let mut g = GraphBuilder::new();
    let a = g.add_const("a", Tensor::f32(vec![3], vec![-2.0, -8.0, 0.0]));
    let e = g.add_const("e", Tensor::f32(vec![3], vec![0.5, 1.0 / 3.0, 2.0]));
    let y = g.add(bin(Binary::Pow), &[a, e], "y", "y").unwrap();
    g.add_output("y", y);
    let out = runtime::run_graph(gpu(), &g, &HashMap::new()).unwrap();
    assert!(
        out["y"][0].is_nan() && out["y"][1].is_nan(),
        "{:?}",
        out["y"]
    );
    assert_eq!(out["y"][2], 0.0);
}

/// Pow of an integer base has the base's type (ONNX): the device's f32 power (pow(3, 6) may
/// come out as 729.0002) must give the exact integer, for integer and float exponents alike
/// (a fractional result truncates toward zero, as the reference's integer results do).
#[test]
fn integer_pow_is_exact() {
    let mut c = Case::new("integer_pow_is_exact");
    let v = ints(&mut c, 8 * 7, -12, 12);
    let base = typed_input(&mut c, "base", &[8, 7], v, DType::I64);
    let v: Vec<f32> = (0..7).map(|e| e as f32).collect();
    let int_exp = typed_input(&mut c, "int_exp", &[7], v, DType::I64);
    let v = vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let float_exp = c.input_values("float_exp", &[7], v);
    let v = vec![-2.0, -1.0, 0.5, 1.5, -0.5, 2.5, 6.0];
    let mixed_exp = c.input_values("mixed_exp", &[7], v);
    let v = ints(&mut c, 8 * 7, 1, 12);
    let positive = typed_input(&mut c, "positive", &[8, 7], v, DType::I64);
    c.out(bin(Binary::Pow), &[base, int_exp], "int_int");
    c.out(bin(Binary::Pow), &[base, float_exp], "int_float");
    c.out(bin(Binary::Pow), &[positive, mixed_exp], "int_mixed");
    for name in ["int_int", "int_float", "int_mixed"] {
        let id = c.graph.outputs().iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(c.graph.node(id).dtype, DType::I64);
    }
    let host: HashMap<String, Vec<f32>> = c
        .feeds
        .iter()
        .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    let got = runtime::run_graph(gpu(), &c.graph, &host).unwrap();
    let want = reference::run(&c.graph, &c.feeds).unwrap();
    for (name, _) in c.graph.outputs() {
        let g: Vec<f64> = got[name].iter().map(|&x| x as f64).collect();
        assert_eq!(g, want[name].data, "{name} (seed {})", base_seed());
    }
}

// ---------------------------------------------------------------- matmul and gemm

/// One MatMul output per `(A shape, B shape, name)`: A an input, B a constant (a weight).
fn matmuls(c: &mut Case, cases: &[(&[usize], &[usize], &str)]) {
    for &(sa, sb, name) in cases {
        let a = c.input(&format!("a_{name}"), sa, -1.0, 1.0);
        let b = c.constant(&format!("b_{name}"), sb, -1.0, 1.0);
        c.out(Op::MatMul, &[a, b], name);
    }
}

#[test]
fn matmul_shapes() {
    let mut c = Case::new("matmul_shapes");
    // (a, b, name): several tiles with sizes that are not multiples of 16, batches with broadcast
    // batch dims, and 1-D operands.
    let cases: [(&[usize], &[usize], &str); 9] = [
        (&[37, 53], &[53, 29], "tiles_37x53x29"),
        (&[16, 16], &[16, 16], "one_tile"),
        (&[2, 3, 5, 7], &[7, 4], "batched_a"),
        (&[5, 7], &[3, 7, 4], "batched_b"),
        (&[2, 1, 5, 7], &[3, 7, 4], "broadcast_batch"),
        (&[4, 20, 33], &[4, 33, 18], "batched_both"),
        (&[7], &[7, 4], "vector_a"),
        (&[3, 5, 7], &[7], "vector_b"),
        (&[40], &[40], "dot"),
    ];
    matmuls(&mut c, &cases);
    c.check();
}

#[test]
fn gemm_transposes_alpha_beta_and_c() {
    // The 16x16 template (sizes below the blocked kernel's threshold), every broadcast C.
    gemm_cases("gemm_transposes_alpha_beta_and_c", (19, 23, 17), true);
}

/// Every transA/transB combination of an m x k by k x n Gemm, with alpha and beta, C as a row,
/// a column and a full matrix (plus a scalar and a 1 x n row when `all_c`), and without C.
fn gemm_cases(test: &'static str, (m, k, n): (usize, usize, usize), all_c: bool) {
    let mut c = Case::new(test);
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            let sa = if trans_a { [k, m] } else { [m, k] };
            let sb = if trans_b { [n, k] } else { [k, n] };
            let tag = format!("{}{}", trans_a as u8, trans_b as u8);
            let a = c.input(&format!("a{tag}"), &sa, -1.0, 1.0);
            let b = c.constant(&format!("b{tag}"), &sb, -1.0, 1.0);
            let mut c_shapes: Vec<(Vec<usize>, &str)> = vec![
                (vec![n], "row"),
                (vec![m, 1], "column"),
                (vec![m, n], "full"),
            ];
            if all_c {
                c_shapes.extend([(vec![], "scalar"), (vec![1, n], "row2d")]);
            }
            for (cs, cname) in c_shapes {
                let cc = c.constant(&format!("c{tag}_{cname}"), &cs, -1.0, 1.0);
                let op = Op::Gemm {
                    alpha: 0.75,
                    beta: -1.5,
                    trans_a,
                    trans_b,
                };
                c.out(op, &[a, b, cc], &format!("gemm{tag}_{cname}"));
            }
            let op = Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a,
                trans_b,
            };
            c.out(op, &[a, b], &format!("gemm{tag}_no_c"));
        }
    }
    c.check();
}

/// Shapes around the register-blocked kernel's tiles (64x64, 32x128 for products of at most 32
/// rows, 128x32 for at most 32 columns; 16-wide K slabs): the smaller kernel just below (63), one exact tile, one tile and a
/// row/column of the next, several partial tiles with K not a multiple of 16, broadcast batch
/// dims, and 1-D operands next to large ones.
#[test]
fn matmul_blocked_shapes() {
    let mut c = Case::new("matmul_blocked_shapes");
    let cases: [(&[usize], &[usize], &str); 15] = [
        (&[63, 63], &[63, 63], "below_63"),
        // Thin products (DoRA's A W0 and x Aᵀ at rank 16) take the blocked kernel too.
        (&[16, 70], &[70, 300], "thin_rows_16"),
        // The 32x128 tile: exact, one column over, and batched partial tiles.
        (&[32, 40], &[40, 128], "thin_tile_32x128"),
        (&[32, 40], &[40, 129], "thin_tile_129"),
        (&[3, 31, 77], &[77, 257], "thin_tiles_batched"),
        // The 128x32 tile (few columns: DoRA's x Aᵀ): exact and partial.
        (&[128, 48], &[48, 32], "narrow_tile_128x32"),
        (&[2, 300, 65], &[65, 20], "narrow_tiles_batched"),
        (&[2, 150, 70], &[70, 17], "thin_cols_17"),
        (&[64, 64], &[64, 64], "tile_64"),
        (&[65, 65], &[65, 65], "tiles_65"),
        (&[127, 129], &[129, 130], "tiles_127x129x130"),
        (&[64, 1], &[1, 70], "k_1"),
        (&[2, 1, 70, 33], &[3, 33, 66], "broadcast_batch"),
        (&[129], &[3, 129, 64], "vector_a"),
        (&[2, 100, 72], &[72], "vector_b"),
    ];
    matmuls(&mut c, &cases);
    c.check();
}

/// Shapes around the CPU target's row-broadcast kernel (`matmul_columns.wgsl`: 8 rows broadcast
/// to up to 32 invocations of 4, 8 or 16 columns each; outputs narrower than 4 keep the blocked or
/// tiled kernels): LoRA's thin products (rank 16, 5 columns), one, two and four vec4s per
/// invocation and a column over,
/// fewer rows than a tile and rows not a multiple of 8, K of 1, batches with broadcast batch
/// dims, a transposed B read in place (PyTorch's Linear), and an epilogue. `check` runs these
/// on both targets; the assertions make sure the CPU plan really uses the template, and loads
/// B four columns at a time exactly where its rows of four are contiguous and aligned (N a
/// multiple of 4, B not transposed; a batch read through a transpose whose strides keep that).
#[test]
fn matmul_columns_shapes() {
    let mut c = Case::new("matmul_columns_shapes");
    let cases: [(&[usize], &[usize], &str); 13] = [
        (&[40, 70], &[70, 16], "rank_16"),
        (&[9, 20], &[20, 5], "n_5"),
        (&[9, 20], &[20, 32], "n_32"),
        (&[17, 33], &[33, 33], "n_33"),
        (&[8, 40], &[40, 255], "one_vec_255"),
        (&[3, 40], &[40, 256], "rows_3_n_256"),
        (&[21, 19], &[19, 257], "two_vecs_257"),
        (&[1, 64], &[64, 300], "row_vector"),
        (&[70, 1], &[1, 100], "k_1"),
        (&[2, 1, 11, 35], &[3, 35, 130], "broadcast_batch"),
        (&[2, 1, 11, 35], &[3, 35, 132], "broadcast_batch_quads"),
        (&[129], &[2, 129, 64], "vector_a"),
        (&[300, 300], &[300, 600], "many_tiles"),
    ];
    matmuls(&mut c, &cases);
    // B read through a transpose in place: [35, 3, 20] -> [3, 35, 20], rows of four still
    // contiguous (p's stride 60, the batch's 20).
    let a = c.input("a_t", &[3, 9, 35], -1.0, 1.0);
    let src = c.constant("b_src", &[35, 3, 20], -1.0, 1.0);
    let bt = c.op(
        Op::Transpose {
            perm: vec![1, 0, 2],
        },
        &[src],
        "b_t",
    );
    c.out(Op::MatMul, &[a, bt], "transposed_quads");
    // A Linear layer as PyTorch exports it (W [out, in], transB) with bias and ReLU fused.
    let x = c.input("x", &[13, 48], -1.0, 1.0);
    let w = c.constant("w", &[96, 48], -1.0, 1.0);
    let bias = c.constant("bias", &[96], -1.0, 1.0);
    let gemm = Op::Gemm {
        alpha: 1.0,
        beta: 1.0,
        trans_a: false,
        trans_b: true,
    };
    let h = c.op(gemm, &[x, w, bias], "linear");
    c.out(un(unary::RELU), &[h], "relu");
    // An epilogue whose column-only operands (a [n] scale, read twice, a [1, n] row, a scalar;
    // Gemm's C above) are loaded once per column of a lane, beside a full [m, n] one that is
    // not, on a batched output with n not a multiple of 4 (the last lane's columns clamped).
    let xb = c.input("x_epilogue", &[2, 3, 21, 35], -1.0, 1.0);
    let wb = c.constant("w_epilogue", &[35, 30], -1.0, 1.0);
    let p = c.op(Op::MatMul, &[xb, wb], "product_epilogue");
    let scale = c.constant("scale", &[30], -1.0, 1.0);
    let row = c.constant("row", &[1, 30], -1.0, 1.0);
    let scalar = c.constant("scalar", &[], -1.0, 1.0);
    let full = c.constant("full", &[21, 30], -1.0, 1.0);
    let e = c.op(bin(Binary::Mul), &[p, scale], "scaled");
    let e = c.op(bin(Binary::Add), &[e, row], "plus_row");
    let e = c.op(bin(Binary::Sub), &[e, scalar], "minus_scalar");
    let e = c.op(bin(Binary::Add), &[e, full], "plus_full");
    let e = c.op(bin(Binary::Mul), &[e, scale], "scaled_again");
    c.out(un(unary::TANH), &[e], "epilogue");
    let options = PlanOptions {
        target: Target::Cpu,
        ..PlanOptions::default()
    };
    let plan = codegen::plan_with(&c.graph, &options).unwrap();
    let columns = plan
        .kernels
        .iter()
        .filter(|k| k.source.contains("Row-broadcast matrix product"))
        .count();
    assert_eq!(columns, 16, "every product here takes the columns template");
    let source = |label: &str| {
        let k = (plan.kernels.iter()).find(|k| k.labels[0] == label);
        k.unwrap().source.as_str()
    };
    // Reads of a value loaded per column, and the loads before the loop over the tile: one
    // vec4 per four columns of a lane for a vector (`cols`, clamped), one for a scalar.
    let reads = |label: &str| source(label).matches("; // loaded once per column").count();
    let vectors = |label: &str| source(label).matches("_c[ci] = vec4<f32>(").count();
    let linear = source("linear");
    assert!(linear.contains("let v0 = acc + c_c[ci][ei];"), "{linear}");
    assert_eq!(vectors("linear"), 1, "Gemm's C, a row");
    assert_eq!(reads("product_epilogue"), 4, "scale twice, row and scalar");
    assert_eq!(vectors("product_epilogue"), 2, "scale once, and row");
    let epilogue = source("product_epilogue");
    assert_eq!(epilogue.matches("[0u];").count(), 1, "{epilogue}");
    let mut quads: Vec<&str> = (plan.kernels.iter())
        .filter(|k| k.source.contains("fn b_get4("))
        .map(|k| k.labels[0].as_str())
        .collect();
    quads.sort();
    // Small products keep their loops rolled (`bound` hides its argument from the compiler);
    // only many_tiles (54M multiply-adds) lets the compiler unroll them.
    assert_eq!(unrolled_kernels(&plan), ["many_tiles"]);
    let want = [
        "broadcast_batch_quads",
        "k_1",
        "many_tiles",
        "n_32",
        "rank_16",
        "row_vector",
        "rows_3_n_256",
        "transposed_quads",
        "vector_a",
    ];
    assert_eq!(quads, want, "the products whose B is loaded by quads");
    c.check();
}

/// The first labels of a CPU plan's kernels whose loop bounds are left in sight of the shader
/// compiler (`bound(n)` returns `n`), so that it unrolls their loops: the large ones.
fn unrolled_kernels(plan: &codegen::Plan) -> Vec<&str> {
    (plan.kernels.iter())
        .filter(|k| (k.source).contains("fn bound(n: u32) -> u32 {\n    return n;\n}"))
        .map(|k| k.labels[0].as_str())
        .collect()
}

/// The columns template's kernel with B loaded four columns at a time (lanes of 8, as on
/// lavapipe): B bound as vec4s, `b_get4` in the K loop. Reviewed as a snapshot.
#[test]
fn matmul_columns_quads_wgsl() {
    let mut g = GraphBuilder::new();
    let a = g.add_input("a", vec![16, 32]);
    let b = g.add_const("b", Tensor::f32(vec![32, 64], vec![0.5; 32 * 64]));
    let y = g.add(Op::MatMul, &[a, b], "y", "y").unwrap();
    g.add_output("y", y);
    let options = PlanOptions {
        target: Target::Cpu,
        subgroup_size: Some(8),
        ..PlanOptions::default()
    };
    let plan = codegen::plan_with(&g.finish(), &options).unwrap();
    insta::assert_snapshot!("matmul_columns_quads", plan.kernels[0].source);
}

/// Gemm's transposes, alpha, beta and broadcast C on register-blocked shapes.
#[test]
fn gemm_blocked_transposes_alpha_beta_and_c() {
    gemm_cases(
        "gemm_blocked_transposes_alpha_beta_and_c",
        (67, 45, 130),
        false,
    );
}

/// The GPU target's 128 x 128 tiles of 8x8 blocks (outputs of at least 2048², one tile and a
/// row and column over), plain and under Gemm's transposes with C, against the reference.
#[test]
fn matmul_wide_tiles() {
    let mut c = Case::new("matmul_wide_tiles");
    let a = c.input("a", &[2049, 24], -1.0, 1.0);
    let b = c.constant("b", &[24, 2049], -1.0, 1.0);
    c.out(Op::MatMul, &[a, b], "plain");
    let bt = c.constant("bt", &[2049, 24], -1.0, 1.0);
    let cc = c.constant("c", &[2049], -1.0, 1.0);
    let gemm = Op::Gemm {
        alpha: 0.5,
        beta: -1.0,
        trans_a: false,
        trans_b: true,
    };
    c.out(gemm, &[a, bt, cc], "gemm_transb");
    let plan = codegen::plan(&c.graph).unwrap();
    assert!(plan
        .kernels
        .iter()
        .all(|k| k.source.contains("const VB: u32 = 2u;")));
    c.check();
}

/// Transposes read in place by the kernels that consume them (no kernel of their own): matmul
/// operands A and B, 2-D and batched with broadcast batch dims, through permutations that move
/// batch axes too (attention's [0, 2, 1, 3]), small and register-blocked shapes; Gemm operands
/// under every transA/transB; element-wise operands, broadcast, in an anchor and an epilogue.
#[test]
fn transposes_read_in_place() {
    let mut c = Case::new("transposes_read_in_place");
    let t = |perm: &[usize]| Op::Transpose {
        perm: perm.to_vec(),
    };
    // (source of A, perm of A, source of B, perm of B, name); an empty perm: no transpose.
    type Operands<'a> = (&'a [usize], &'a [usize], &'a [usize], &'a [usize], &'a str);
    let cases: [Operands; 8] = [
        (&[9, 13], &[1, 0], &[9, 11], &[], "a_t_small"),
        (&[13, 9], &[], &[11, 9], &[1, 0], "b_t_small"),
        (&[70, 100], &[1, 0], &[90, 70], &[1, 0], "both_t_blocked"),
        (&[300, 48], &[], &[20, 48], &[1, 0], "narrow_b_t_blocked"),
        (
            &[2, 5, 37, 66],
            &[0, 1, 3, 2],
            &[5, 37, 40],
            &[],
            "batched_a_t",
        ),
        (
            &[3, 40, 33],
            &[],
            &[2, 1, 70, 33],
            &[0, 1, 3, 2],
            "broadcast_b_t",
        ),
        // q [b, s, h, d] -> [b, h, s, d] against k [b, s, h, d] -> [b, h, d, s].
        (
            &[2, 20, 3, 8],
            &[0, 2, 1, 3],
            &[2, 20, 3, 8],
            &[0, 2, 3, 1],
            "attention",
        ),
        (
            &[2, 70, 3, 16],
            &[0, 2, 1, 3],
            &[2, 80, 3, 16],
            &[0, 2, 3, 1],
            "attention_blocked",
        ),
    ];
    for (sa, pa, sb, pb, name) in cases {
        let mut a = c.input(&format!("a_{name}"), sa, -1.0, 1.0);
        if !pa.is_empty() {
            a = c.op(t(pa), &[a], &format!("a_t_{name}"));
        }
        let mut b = c.constant(&format!("b_{name}"), sb, -1.0, 1.0);
        if !pb.is_empty() {
            b = c.op(t(pb), &[b], &format!("b_t_{name}"));
        }
        c.out(Op::MatMul, &[a, b], name);
    }
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            let (m, k, n) = (19, 23, 67);
            // The Gemm's operands as they reach it, each a transpose of a stored source.
            let sa = if trans_a { [m, k] } else { [k, m] };
            let sb = if trans_b { [k, n] } else { [n, k] };
            let tag = format!("{}{}", trans_a as u8, trans_b as u8);
            let a = c.input(&format!("ga{tag}"), &sa, -1.0, 1.0);
            let a = c.op(t(&[1, 0]), &[a], &format!("ga_t{tag}"));
            let b = c.constant(&format!("gb{tag}"), &sb, -1.0, 1.0);
            let b = c.op(t(&[1, 0]), &[b], &format!("gb_t{tag}"));
            let bias = c.constant(&format!("gc{tag}"), &[n], -1.0, 1.0);
            let op = Op::Gemm {
                alpha: 0.5,
                beta: 2.0,
                trans_a,
                trans_b,
            };
            c.out(op, &[a, b, bias], &format!("gemm{tag}"));
        }
    }
    // Element-wise: y = x + w^T (anchor), z = relu(x @ v) * w^T (epilogue), and a broadcast
    // one: u [3, 4, 5] + r^T with r [5, 4] -> [4, 5].
    let x = c.input("x", &[6, 7], -1.0, 1.0);
    let w = c.input("w", &[7, 6], -1.0, 1.0);
    let w_t = c.op(t(&[1, 0]), &[w], "w_t");
    c.out(bin(Binary::Add), &[x, w_t], "x_plus_w_t");
    let v = c.constant("v", &[7, 7], -1.0, 1.0);
    let xv = c.op(Op::MatMul, &[x, v], "xv");
    let relu = c.op(un(unary::RELU), &[xv], "relu");
    c.out(bin(Binary::Mul), &[relu, w_t], "relu_times_w_t");
    let u = c.input("u", &[3, 4, 5], -1.0, 1.0);
    let r = c.input("r", &[5, 4], -1.0, 1.0);
    let r_t = c.op(t(&[1, 0]), &[r], "r_t");
    c.out(bin(Binary::Sub), &[u, r_t], "u_minus_r_t");
    let plan = codegen::plan(&c.graph).unwrap();
    assert!(
        plan.kernels.iter().all(|k| !k.name.contains("transpose")),
        "a transpose got a kernel:\n{plan}"
    );
    assert!(plan.kernels.iter().any(|k| k.nodes.len() > 1), "{plan}");
    c.check_plan(&plan);
}

/// DoRA's fused column norm against the reference, in both weight orientations, with a column
/// count not a multiple of the 8 per workgroup, `in` not a multiple of the workgroup's tile and
/// over one tile, and with its epilogue
/// (clamp, square root, then m / norm through a StopGradient view) in the same kernel.
#[test]
fn dora_norm_kernel() {
    let mut c = Case::new("dora_norm_kernel");
    for (out_in, (fin, fout, r), alpha, scale) in [
        (false, (37, 9, 4), 1.0f32, 2.0f32),
        (true, (130, 70, 16), 0.5, 0.25),
        (false, (64, 3, 1), 1.0, 1.0),
        // Two vec4s per invocation: one full 512-feature tile and part of the next.
        (true, (600, 21, 8), 1.0, 0.5),
        (false, (1030, 10, 3), 1.0, 2.0),
        // Features past a tile of 32 on the CPU kernel that owns features per lane.
        (false, (70, 150, 12), 1.0, 0.75),
        // Fewer input features than a subgroup has lanes.
        (true, (5, 40, 4), 2.0, 1.0),
        // Rank 32 (one vec4 of features per lane), and 40 (one invocation per feature, A's
        // values broadcast).
        (true, (96, 70, 32), 1.0, 0.5),
        (false, (40, 33, 40), 1.0, 0.25),
        // Over 2^22 multiply-adds: the CPU kernel's loops are left to the compiler to unroll.
        (true, (520, 512, 16), 1.0, 0.5),
    ] {
        let tag = format!("{}_{fin}x{fout}x{r}", out_in as u8);
        let shape = if out_in { [fout, fin] } else { [fin, fout] };
        let w = c.constant(&format!("w{tag}"), &shape, -1.0, 1.0);
        let a = c.input(&format!("a{tag}"), &[r, fin], -1.0, 1.0);
        let b = c.input(&format!("b{tag}"), &[fout, r], -1.0, 1.0);
        let m = c.input(&format!("m{tag}"), &[fout], 0.5, 2.0);
        let op = Op::DoraNormSq(dorac::ops::DoraNorm {
            alpha,
            scale,
            weight_out_in: out_in,
        });
        c.out(op.clone(), &[w, a, b], &format!("norm_sq{tag}"));
        let n2 = c.op(op, &[w, a, b], &format!("n2{tag}"));
        let safe = c.op(un(unary::POSITIVE_OR_ONE), &[n2], &format!("safe{tag}"));
        let norm = c.op(un(unary::SQRT), &[safe], &format!("norm{tag}"));
        let detached = c.op(Op::StopGradient, &[norm], &format!("detached{tag}"));
        c.out(bin(Binary::Div), &[m, detached], &format!("g{tag}"));
    }
    let plan = codegen::plan(&c.graph).unwrap();
    assert!(
        plan.kernels.iter().any(|k| k
            .name
            .contains("dora_norm_sq_positive_or_one_sqrt_stop_gradient_div")),
        "the scale is not in the norm's kernel:\n{plan}"
    );
    // The CPU target's kernel without subgroups; `check` runs the GPU's and, on a device with
    // subgroups (lavapipe), the CPU target's that broadcasts A's values.
    let options = PlanOptions {
        target: Target::Cpu,
        ..PlanOptions::default()
    };
    c.check_plan(&codegen::plan_with(&c.graph, &options).unwrap());
    if let Some(sg) = gpu().subgroup_size() {
        let options = PlanOptions {
            target: Target::Cpu,
            subgroup_size: Some(sg),
            ..PlanOptions::default()
        };
        let plan = codegen::plan_with(&c.graph, &options).unwrap();
        // Rank 40 broadcasts A's values; the others take the kernel that owns features per
        // lane (two norm kernels a case).
        assert!(
            plan.kernels
                .iter()
                .any(|k| k.source.contains("subgroupBroadcast(a, ")),
            "{plan}"
        );
        let columns = (plan.kernels.iter())
            .filter(|k| k.source.contains("nsq[c] = fma(v, v, nsq[c])"))
            .count();
        assert_eq!(columns, 18, "{plan}");
        // The large norm's kernels keep the bound of their loops in sight of the compiler;
        // the others hide it, and their loops stay rolled.
        assert_eq!(
            unrolled_kernels(&plan),
            ["norm_sq1_520x512x16", "n21_520x512x16"],
            "{plan}"
        );
        // The kernel for subgroups of 4 (lavapipe on a 128-bit CPU) computes the same on
        // larger ones: the lanes past the fourth load values nobody reads.
        if sg > 4 {
            let options = PlanOptions {
                subgroup_size: Some(4),
                ..options
            };
            let plan = codegen::plan_with(&c.graph, &options).unwrap();
            assert!(!plan.kernels.iter().any(|k| k.source.contains("ba[1]")));
            c.check_plan(&plan);
        }
    }
    // Wider subgroups render valid kernels too (the planner validates each with naga).
    for sg in [16, 64] {
        let options = PlanOptions {
            target: Target::Cpu,
            subgroup_size: Some(sg),
            ..PlanOptions::default()
        };
        let plan = codegen::plan_with(&c.graph, &options).unwrap();
        let last = format!("subgroupBroadcast(a, {}u)", sg - 1);
        assert!(plan.kernels.iter().any(|k| k.source.contains(&last)));
    }
    c.check();
}

/// Weights whose rows are a multiple of 32 floats long are stored with a cache line of padding
/// per row on a CPU driver (`storage::padded_rows`): products reading them as B, transposed
/// (Gemm's transB, a Transpose read in place) or not, as A, and DoRA norms of both weight
/// layouts, batched, against the reference. A weight also read by an element-wise op, or of
/// other widths, keeps its rows.
#[test]
fn padded_weight_rows() {
    let mut c = Case::new("padded_weight_rows");
    let x = c.input("x", &[5, 96], -1.0, 1.0);
    // [out, in] = [64, 96]: Gemm transB, and a Transpose read in place by a MatMul.
    let w_oi = c.constant("w_oi", &[64, 96], -1.0, 1.0);
    let gemm = Op::Gemm {
        alpha: 1.0,
        beta: 0.0,
        trans_a: false,
        trans_b: true,
    };
    c.out(gemm, &[x, w_oi], "gemm_trans_b");
    let w_t = c.op(Op::Transpose { perm: vec![1, 0] }, &[w_oi], "w_t");
    c.out(Op::MatMul, &[x, w_t], "matmul_transposed");
    // Read only through a Transpose read in place: padded too.
    let w_t_only = c.constant("w_t_only", &[64, 96], -1.0, 1.0);
    let w_t2 = c.op(Op::Transpose { perm: vec![1, 0] }, &[w_t_only], "w_t2");
    c.out(Op::MatMul, &[x, w_t2], "matmul_transposed_only");
    // Not padded: [in, out] = [96, 64] as B, each lane reads along its rows; and a weight as A.
    let w_io = c.constant("w_io", &[96, 64], -1.0, 1.0);
    c.out(Op::MatMul, &[x, w_io], "matmul_plain");
    let u = c.input("u", &[96, 7], -1.0, 1.0);
    c.out(Op::MatMul, &[w_oi, u], "weight_as_a");
    // Not padded: also read by an add; rows of 40.
    let w_add = c.constant("w_add", &[96, 64], -1.0, 1.0);
    c.out(Op::MatMul, &[x, w_add], "matmul_shared");
    let bias = c.input("bias", &[96, 64], -1.0, 1.0);
    c.out(bin(Binary::Add), &[w_add, bias], "weight_plus");
    let w_40 = c.constant("w_40", &[96, 40], -1.0, 1.0);
    c.out(Op::MatMul, &[x, w_40], "matmul_40");
    // DoRA norms, two layers of each layout (batched where the device binds arrays).
    for (l, out_in) in [(0, true), (1, true), (2, false), (3, false)] {
        let shape = if out_in { [64, 96] } else { [96, 64] };
        let w = c.constant(&format!("norm_w{l}"), &shape, -1.0, 1.0);
        let a = c.input(&format!("norm_a{l}"), &[8, 96], -1.0, 1.0);
        let b = c.input(&format!("norm_b{l}"), &[64, 8], -1.0, 1.0);
        let op = Op::DoraNormSq(dorac::ops::DoraNorm {
            alpha: 1.0,
            scale: 0.5,
            weight_out_in: out_in,
        });
        let n2 = c.op(op, &[w, a, b], &format!("norm_sq{l}"));
        c.out(un(unary::SQRT), &[n2], &format!("norm{l}"));
    }
    let plan = codegen::plan_with(&c.graph, &gpu().plan_options()).unwrap();
    let pitch = |name: &str| {
        let b = plan.buffers.iter().find(|b| b.name == name).unwrap();
        b.row_pitch
    };
    if gpu().plan_options().target == Target::Cpu {
        for (name, want) in [
            ("w_oi", Some(112)),
            ("w_t_only", Some(112)),
            ("w_io", None),
            ("norm_w0", Some(112)),
            ("norm_w2", None),
            ("w_add", None),
            ("w_40", None),
        ] {
            assert_eq!(pitch(name), want, "{name}:\n{plan}");
        }
    }
    c.check_plan(&plan);
    // Both targets as `check` plans them (the CPU target pads, the GPU target does not).
    c.check();
}

/// The norms of DoRA layers of the same shapes and storage share one dispatch when the device
/// binds arrays of buffers (a device plan): two f32 layers batched, one of them with its
/// squared norm also read outside (written beside), each with its own epilogue; two layers
/// with W stored as f16 batched apart; a layer of other shapes keeps its own kernel. Checked against the reference on both
/// targets; without binding arrays, or in a portable plan, every layer has its own kernel.
#[test]
fn dora_norms_of_layers_share_a_dispatch() {
    let mut c = Case::new("dora_norms_of_layers_share_a_dispatch");
    let p = dorac::ops::DoraNorm {
        alpha: 1.0,
        scale: 0.5,
        weight_out_in: true,
    };
    let shapes = [
        (600, 21, 8),
        (600, 21, 8),
        (600, 21, 8),
        (40, 21, 8),
        (600, 21, 8),
    ];
    for (l, (fin, fout, r)) in shapes.into_iter().enumerate() {
        let w = if l == 1 || l == 4 {
            let v: Vec<f32> = (c.values(fout * fin, -1.0, 1.0).into_iter())
                .map(|x| Half::F16.round(x))
                .collect();
            let n = c
                .graph
                .add_const(&format!("w{l}"), Tensor::f32(vec![fout, fin], v));
            c.graph.mark_half(n, Half::F16);
            n
        } else {
            c.constant(&format!("w{l}"), &[fout, fin], -1.0, 1.0)
        };
        let a = c.input(&format!("a{l}"), &[r, fin], -1.0, 1.0);
        let b = c.input(&format!("b{l}"), &[fout, r], -1.0, 1.0);
        let m = c.input(&format!("m{l}"), &[fout], 0.5, 2.0);
        let n2 = c.op(Op::DoraNormSq(p), &[w, a, b], &format!("n2_{l}"));
        if l == 2 {
            c.output("n2_2", n2);
        }
        let safe = c.op(un(unary::POSITIVE_OR_ONE), &[n2], &format!("safe{l}"));
        let norm = c.op(un(unary::SQRT), &[safe], &format!("norm{l}"));
        c.out(bin(Binary::Div), &[m, norm], &format!("g{l}"));
    }
    let norms = |plan: &codegen::Plan| -> Vec<codegen::Kernel> {
        (plan.kernels.iter())
            .filter(|k| k.name.contains("dora_norm_sq"))
            .cloned()
            .collect()
    };
    // Both targets, and the CPU target's subgroup kernel where this device has subgroups.
    let with_subgroups = gpu().subgroup_size().map(|s| (Target::Cpu, Some(s)));
    for (target, subgroup_size) in [(Target::Gpu, None), (Target::Cpu, None)]
        .into_iter()
        .chain(with_subgroups)
    {
        let options = PlanOptions {
            target,
            max_bindings: 48,
            binding_arrays: true,
            subgroup_size,
            ..PlanOptions::default()
        };
        let plan = codegen::plan_with(&c.graph, &options).unwrap();
        let norms = norms(&plan);
        assert_eq!(norms.len(), 3, "{plan}");
        let pairs = norms.iter().filter(|k| k.name.contains("_x2_")).count();
        assert_eq!(pairs, 2, "the f32 pair and the f16 pair:\n{plan}");
        assert!(
            norms[1].source.contains("binding_array<Words, 2>"),
            "{}",
            norms[1].source
        );
        assert_eq!(
            norms[0].input_arrays[..3],
            [2, 2, 2],
            "W, A and B of both layers"
        );
        assert_eq!(norms[0].also_writes.len(), 2, "g0 and n2_2 beside g2");
        assert!(norms[0].source.contains("binding_array<Floats, 2>"));
        // Rank 8: the product-shaped kernel where the device has subgroups.
        let shuffles = norms[0].source.contains("subgroupShuffle(amine[k], pe)");
        assert_eq!(shuffles, subgroup_size.is_some(), "{}", norms[0].source);
        c.check_plan(&plan);
    }
    // Without binding arrays, or in a portable plan (8 bindings), one kernel per layer.
    let options = PlanOptions {
        max_bindings: 48,
        ..PlanOptions::default()
    };
    for plan in [
        codegen::plan_with(&c.graph, &options),
        codegen::plan(&c.graph),
    ] {
        let plan = plan.unwrap();
        assert_eq!(norms(&plan).len(), 5, "{plan}");
    }
}

// ---------------------------------------------------------------- layout ops and reductions

#[test]
fn transposes() {
    let mut c = Case::new("transposes");
    let x2 = c.input("x2", &[5, 7], -1.0, 1.0);
    c.out(Op::Transpose { perm: vec![1, 0] }, &[x2], "t2_10");
    let x3 = c.input("x3", &[2, 3, 4], -1.0, 1.0);
    for perm in [[0, 2, 1], [2, 0, 1], [1, 2, 0], [2, 1, 0]] {
        let name = format!("t3_{}{}{}", perm[0], perm[1], perm[2]);
        c.out(
            Op::Transpose {
                perm: perm.to_vec(),
            },
            &[x3],
            &name,
        );
    }
    let x4 = c.input("x4", &[2, 3, 4, 5], -1.0, 1.0);
    for perm in [[0, 2, 1, 3], [3, 1, 0, 2], [0, 1, 2, 3], [3, 2, 1, 0]] {
        let name = format!("t4_{}{}{}{}", perm[0], perm[1], perm[2], perm[3]);
        c.out(
            Op::Transpose {
                perm: perm.to_vec(),
            },
            &[x4],
            &name,
        );
    }
    c.check();
}

#[test]
fn reduce_sums() {
    let mut c = Case::new("reduce_sums");
    // Mixed signs, but a positive mean: the sum of all 60 values (one output, so its own scale
    // for the relative error) is then near 30, where values centred on 0 may cancel to a sum
    // far below the rounding of its terms (seed 1796440714643687305: -0.0057, 2e-5 off).
    let x = c.input("x", &[3, 4, 5], -0.5, 1.5);
    let axes_sets: [&[usize]; 7] = [&[0], &[1], &[2], &[0, 2], &[1, 2], &[0, 1, 2], &[]];
    for axes in axes_sets {
        for keepdims in [false, true] {
            let tag: String = axes.iter().map(|a| a.to_string()).collect();
            let name = format!("sum_{tag}_{}", if keepdims { "keep" } else { "drop" });
            let op = Op::Reduce {
                kind: Reduce::Sum,
                axes: axes.to_vec(),
                keepdims,
            };
            c.out(op, &[x], &name);
        }
    }
    // Long rows: each invocation adds many elements before the tree.
    let long = c.input("long", &[3, 1000], -1.0, 1.0);
    let op = Op::Reduce {
        kind: Reduce::Sum,
        axes: vec![1],
        keepdims: false,
    };
    c.out(op, &[long], "sum_long_rows");
    // Maximum and minimum over the same axis sets, and over long rows.
    for kind in [Reduce::Max, Reduce::Min] {
        for axes in [&[0][..], &[2], &[0, 2], &[0, 1, 2]] {
            let tag: String = axes.iter().map(|a| a.to_string()).collect();
            let op = Op::Reduce {
                kind,
                axes: axes.to_vec(),
                keepdims: axes.len() == 1,
            };
            c.out(op, &[x], &format!("{kind:?}_{tag}"));
        }
        let op = Op::Reduce {
            kind,
            axes: vec![1],
            keepdims: false,
        };
        c.out(op, &[long], &format!("{kind:?}_long_rows"));
    }
    // Products of factors near 1 (no overflow over the long rows).
    let near_one = c.input("near_one", &[3, 4, 5], 0.8, 1.25);
    let long_near_one = c.input("long_near_one", &[3, 200], 0.95, 1.05);
    for (axes, input, tag) in [
        (vec![1], near_one, "1"),
        (vec![0, 2], near_one, "02"),
        (vec![1], long_near_one, "long_rows"),
    ] {
        let op = Op::Reduce {
            kind: Reduce::Prod,
            axes,
            keepdims: false,
        };
        c.out(op, &[input], &format!("prod_{tag}"));
    }
    // Sum of squares (DoRA's frozen column norms), over either axis of a weight matrix.
    let w = c.input("w", &[37, 53], -1.0, 1.0);
    for axis in [0, 1] {
        let op = Op::Reduce {
            kind: Reduce::SumSquare,
            axes: vec![axis],
            keepdims: false,
        };
        c.out(op, &[w], &format!("sum_square_{axis}"));
    }
    c.check();
}

#[test]
fn layer_norms() {
    let mut c = Case::new("layer_norms");
    let x = c.input("x", &[4, 6, 32], -2.0, 2.0);
    let scale = c.constant("scale", &[32], 0.5, 1.5);
    let bias = c.constant("bias", &[32], -1.0, 1.0);
    let ln = |axis| Op::LayerNorm {
        axis,
        epsilon: 1e-5,
    };
    c.out(ln(2), &[x, scale, bias], "last_axis");
    c.out(ln(2), &[x, scale], "last_axis_no_bias");
    let scale2 = c.constant("scale2", &[6, 32], 0.5, 1.5);
    c.out(ln(1), &[x, scale2, bias], "axis1_bias_broadcast");
    c.out(ln(1), &[x, scale2], "axis1_no_bias");
    // Rows longer than a workgroup, with a large mean (the two-pass variance keeps it exact).
    let wide = c.input("wide", &[3, 300], 99.0, 101.0);
    let s = c.constant("s300", &[300], 0.5, 1.5);
    let b = c.constant("b300", &[300], -1.0, 1.0);
    let op = Op::LayerNorm {
        axis: 1,
        epsilon: 1e-6,
    };
    c.out(op, &[wide, s, b], "wide_rows");
    c.check();
}

#[test]
fn softmaxes() {
    let mut c = Case::new("softmaxes");
    let x = c.input("x", &[4, 7, 9], -20.0, 20.0);
    for axis in [2, 1, 0] {
        c.out(Op::Softmax { axis }, &[x], &format!("softmax_axis{axis}"));
    }
    let long = c.input("long", &[3, 500], -30.0, 30.0);
    c.out(Op::Softmax { axis: 1 }, &[long], "softmax_long_rows");
    // The longest rows that take an invocation each, and the shortest that take a workgroup,
    // in more rows than one workgroup of invocations holds.
    for len in [64, 65] {
        let x = c.input(&format!("rows_{len}"), &[2, 70, len], -30.0, 30.0);
        c.out(Op::Softmax { axis: 2 }, &[x], &format!("softmax_{len}"));
    }
    c.check();
}

// ---------------------------------------------------------------- training ops

#[test]
fn expands() {
    let mut c = Case::new("expands");
    let cases: [(&[usize], &[usize], &str); 7] = [
        (&[], &[3, 4], "scalar"),
        (&[1], &[7], "unit"),
        (&[4], &[3, 4], "row"),
        (&[3, 1], &[3, 4], "column"),
        (&[2, 1, 4], &[5, 2, 3, 4], "rank_extended"),
        (&[3, 4], &[3, 4], "same"),
        (&[300], &[70, 300], "many_workgroups"),
    ];
    for (from, to, name) in cases {
        let x = c.input(&format!("x_{name}"), from, -2.0, 2.0);
        c.out(Op::Expand { shape: to.to_vec() }, &[x], name);
    }
    c.check();
}

/// Every `Unary`'s derivative times dy, on the ranges where the function is defined.
#[test]
fn unary_grads() {
    let mut c = Case::new("unary_grads");
    let wide = c.input("wide", &[7, 45], -20.0, 20.0);
    let dy = c.input("dy", &[7, 45], -2.0, 2.0);
    for u in unary::ALL.iter().filter(|u| !u.is_predicate()) {
        let (lo, hi) = u.def().sample_range;
        let x = c.input(&format!("x_{}", u.name()), &[7, 45], lo, hi);
        c.out(Op::UnaryGrad(*u), &[x, dy], &format!("{}_grad", u.name()));
    }
    for u in [
        unary::SIGMOID,
        unary::TANH,
        unary::ERF,
        unary::GELU,
        unary::GELU_TANH,
    ] {
        c.out(
            Op::UnaryGrad(u),
            &[wide, dy],
            &format!("{}_grad_wide", u.name()),
        );
    }
    c.check();
}

/// The derivatives in their tails and at their branch points, where naive formulas cancel or
/// overflow.
#[test]
fn unary_grads_survive_large_inputs() {
    let mut c = Case::new("unary_grads_survive_large_inputs");
    let big = vec![
        -1e4, -500.0, -100.0, -89.0, -45.0, -10.0, -6.0, -0.5, -1e-3, -1e-8, 0.0, 1e-8, 1e-3, 0.39,
        0.41, 0.5, 6.0, 10.0, 45.0, 89.0, 100.0, 500.0, 1e4,
    ];
    let n = big.len();
    let x = c.input_values("x", &[n], big);
    let dy = c.input("dy", &[n], 0.5, 2.0);
    for (u, name) in [
        (unary::RELU, "relu"),
        (unary::SIGMOID, "sigmoid"),
        (unary::TANH, "tanh"),
        (unary::ERF, "erf"),
        (unary::GELU, "gelu_erf"),
        (unary::GELU_TANH, "gelu_tanh"),
    ] {
        c.out(Op::UnaryGrad(u), &[x, dy], &format!("{name}_grad"));
    }
    c.check();
}

/// Labels for `rows` positions of `classes` classes: mostly valid class ids, some
/// `ignore_index`, some out of range (negative, >= classes) and some fractional (truncated).
fn labels(c: &mut Case, rows: usize, classes: usize, ignore_index: i64) -> Vec<f32> {
    (0..rows)
        .map(|_| {
            let r = c.rng.uniform();
            let class = (c.rng.uniform() * classes as f64).floor() as f32;
            if r < 0.15 {
                ignore_index as f32
            } else if r < 0.2 {
                classes as f32 + 3.0
            } else if r < 0.22 {
                -1.0
            } else if r < 0.27 {
                class + 0.5
            } else {
                class
            }
        })
        .collect()
}

#[test]
fn softmax_cross_entropy_and_its_gradient() {
    let mut c = Case::new("softmax_cross_entropy_and_its_gradient");
    // (logits shape, shift, ignore_index, logits range, name)
    let cases: [(&[usize], bool, i64, f64, &str); 9] = [
        (&[6, 257], false, -100, 5.0, "rows_257_classes"),
        (&[2, 3, 1000], true, -100, 5.0, "shifted_1000_classes"),
        (&[2, 700, 5], true, -100, 3.0, "shifted_1400_positions"),
        (&[2, 5, 257], true, -100, 5.0, "shifted_257_classes"),
        (&[3, 4, 10], false, -100, 3.0, "rank3"),
        (&[3, 9, 7], true, 2, 3.0, "shifted_ignore_a_class"),
        (&[150, 33], false, 0, 4.0, "many_rows_ignore_class_0"),
        (&[4, 64], false, -100, 80.0, "large_logits"),
        (&[1, 3], false, -100, 1.0, "single_row"),
    ];
    for (shape, shift, ignore_index, range, name) in cases {
        let classes = *shape.last().unwrap();
        let rows: usize = shape[..shape.len() - 1].iter().product();
        let logits = c.input(&format!("logits_{name}"), shape, -range, range);
        let mut l = labels(&mut c, rows, classes, ignore_index);
        l[0] = 0.0; // at least one position counts
        if shift {
            l[1] = 1.0;
        }
        let labels = c.input_values(&format!("labels_{name}"), &shape[..shape.len() - 1], l);
        let dloss = c.input(&format!("dloss_{name}"), &[], 0.5, 2.0);
        let loss = Op::SoftmaxCrossEntropy {
            ignore_index,
            shift,
        };
        c.out(loss, &[logits, labels], &format!("loss_{name}"));
        let grad = Op::SoftmaxCrossEntropyGrad {
            ignore_index,
            shift,
        };
        c.out(grad, &[logits, labels, dloss], &format!("grad_{name}"));
    }
    c.check();
}

/// Every position ignored: the gradient is all zeros (the loss is 0/0, NaN, on both sides).
#[test]
fn cross_entropy_with_every_position_ignored() {
    let mut c = Case::new("cross_entropy_with_every_position_ignored");
    let logits = c.input("logits", &[3, 5], -1.0, 1.0);
    let labels = c.input_values("labels", &[3], vec![-100.0; 3]);
    let dloss = c.input("dloss", &[1], 1.0, 2.0);
    let op = Op::SoftmaxCrossEntropy {
        ignore_index: -100,
        shift: false,
    };
    let loss = c.op(op, &[logits, labels], "loss");
    c.output("loss", loss);
    let op = Op::SoftmaxCrossEntropyGrad {
        ignore_index: -100,
        shift: false,
    };
    let grad = c.op(op, &[logits, labels, dloss], "grad");
    c.output("grad", grad);
    let plan = codegen::plan(&c.graph).unwrap();
    let exe = Executable::new(gpu(), &plan, &c.graph).unwrap();
    let host: HashMap<String, Vec<f32>> = c
        .feeds
        .iter()
        .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    let out = exe.run(&host).unwrap();
    assert!(out["loss"][0].is_nan(), "{:?}", out["loss"]);
    assert!(out["grad"].iter().all(|&g| g == 0.0), "{:?}", out["grad"]);
}

/// UnaryGrad and Expand as anchors and as epilogues.
#[test]
fn training_ops_fuse_as_elementwise() {
    let mut c = Case::new("training_ops_fuse_as_elementwise");
    let x = c.input("x", &[6, 20], -3.0, 3.0);
    let w = c.constant("w", &[20, 12], -1.0, 1.0);
    let pre = c.input("pre", &[6, 12], -3.0, 3.0);
    // dy = x @ w, then gelu'(pre) * dy, then * 0.5, in the matmul's epilogue.
    let dy = c.op(Op::MatMul, &[x, w], "dy");
    let g = c.op(Op::UnaryGrad(unary::GELU), &[pre, dy], "g");
    let half = c.constant("half", &[], 0.5, 0.5);
    let gh = c.out(bin(Binary::Mul), &[g, half], "gh");
    // An Expand anchor with a UnaryGrad and a same-shape Expand after it.
    let col = c.input("col", &[6, 1], -1.0, 1.0);
    let e = c.op(Op::Expand { shape: vec![6, 12] }, &[col], "e");
    let t = c.op(Op::UnaryGrad(unary::TANH), &[pre, e], "t");
    let e2 = c.out(Op::Expand { shape: vec![6, 12] }, &[t], "e2");
    let groups = vec![vec![dy, g, gh], vec![e, t, e2]];
    let plan = codegen::plan_grouped(&c.graph, groups, &PlanOptions::default()).unwrap();
    assert_eq!(plan.kernels.len(), 2, "{plan}");
    c.check_plan(&plan);
}

/// An element-wise chain reading scalars, one of them twice, with a value kept midway (stored
/// before the scalars after it are read): the scalars are loaded once before the loop over an
/// invocation's elements (16 on the CPU target, whose loop then repeats), one load per scalar.
#[test]
fn elementwise_scalars_load_once() {
    let mut c = Case::new("elementwise_scalars_load_once");
    let x = c.input("x", &[70, 130], -2.0, 2.0);
    let v = c.input("v", &[70, 130], 0.0, 2.0);
    let decay = c.constant("decay", &[], 0.8, 0.99);
    let rate = c.input("rate", &[1, 1], 0.1, 0.5);
    let eps = c.constant("eps", &[1], 1e-3, 1e-2);
    let t = c.op(bin(Binary::Mul), &[v, decay], "decayed");
    let sq = c.op(bin(Binary::Mul), &[x, x], "squared");
    let sq = c.op(bin(Binary::Mul), &[sq, rate], "rated");
    let kept = c.out(bin(Binary::Add), &[t, sq], "kept");
    let r = c.op(un(unary::SQRT), &[kept], "root");
    let r = c.op(bin(Binary::Add), &[r, eps], "plus_eps");
    let r = c.op(bin(Binary::Div), &[r, rate], "over_rate");
    c.out(bin(Binary::Mul), &[r, decay], "out");
    let options = PlanOptions {
        target: Target::Cpu,
        ..PlanOptions::default()
    };
    let plan = codegen::plan_with(&c.graph, &options).unwrap();
    assert_eq!(plan.kernels.len(), 1, "{plan}");
    let source = &plan.kernels[0].source;
    let body = &source[source.find("for (var e = 0u").unwrap()..];
    assert!(
        !body.contains("[0u]"),
        "a scalar loaded in the loop:\n{source}"
    );
    let before = &source[source.find("fn main(").unwrap()..source.find("for (var e = 0u").unwrap()];
    assert_eq!(
        before.matches("[0u];").count(),
        3,
        "decay, rate, eps once each:\n{source}"
    );
    assert_eq!(body.matches("; // loaded once, before the loop").count(), 5);
    c.check();
}

/// On the CPU target an invocation takes up to 16 elements, but no more than one workgroup of
/// 256 invocations needs: lavapipe compiles the loop's body once per element of an invocation.
/// 300 elements take 2 each; 4096 and 9100 take 16. The values match the reference.
#[test]
fn elementwise_elements_per_invocation_fit_the_tensor() {
    let mut c = Case::new("elementwise_elements_per_invocation_fit_the_tensor");
    let options = PlanOptions {
        target: Target::Cpu,
        ..PlanOptions::default()
    };
    for (n, per) in [(1, 1), (300, 2), (4096, 16), (9100, 16)] {
        let x = c.input(&format!("x{n}"), &[n], -2.0, 2.0);
        let y = c.out(un(unary::EXP), &[x], &format!("y{n}"));
        let plan = codegen::plan_with(&c.graph, &options).unwrap();
        let kernel = plan.kernels.iter().find(|k| k.nodes.contains(&y)).unwrap();
        let want = format!("const PER: u32 = {per}u;");
        assert!(kernel.source.contains(&want), "{}", kernel.source);
    }
    let plan = codegen::plan_with(&c.graph, &options).unwrap();
    c.check_plan(&plan);
}

// ---------------------------------------------------------------- transformer ops

/// `len` integers uniform in `lo..=hi`, as f32 (token ids, positions, masks).
fn ints(c: &mut Case, len: usize, lo: i64, hi: i64) -> Vec<f32> {
    (0..len)
        .map(|_| (lo + (c.rng.uniform() * (hi - lo + 1) as f64).floor() as i64).min(hi) as f32)
        .collect()
}

/// A graph input of integer (or bool) values with the given element type.
fn typed_input(c: &mut Case, name: &str, shape: &[usize], v: Vec<f32>, dtype: DType) -> NodeId {
    c.feeds
        .insert(name.into(), Array::from_f32(shape.to_vec(), &v));
    c.graph.add_typed_input(name, shape.to_vec(), dtype)
}

/// Comparisons on small integers (so that ties occur), logical ops on bools, Max and Min, all
/// with broadcasting; Not and IsNaN.
#[test]
fn comparisons_logic_max_min() {
    let mut c = Case::new("comparisons_logic_max_min");
    let variants: [(&[usize], &[usize], &str); 4] = [
        (&[5, 6], &[5, 6], "same"),
        (&[5, 6], &[], "scalar"),
        (&[5, 1], &[1, 6], "outer"),
        (&[2, 1, 6], &[5, 6], "rank_extended"),
    ];
    for (sa, sb, variant) in variants {
        let va = ints(&mut c, numel(sa), -2, 2);
        let vb = ints(&mut c, numel(sb), -2, 2);
        let a = c.input_values(&format!("a_{variant}"), sa, va);
        let b = c.input_values(&format!("b_{variant}"), sb, vb);
        let bools: Vec<f32> = ints(&mut c, numel(sa), 0, 1);
        let p = typed_input(&mut c, &format!("p_{variant}"), sa, bools, DType::Bool);
        let bools: Vec<f32> = ints(&mut c, numel(sb), 0, 1);
        let q = typed_input(&mut c, &format!("q_{variant}"), sb, bools, DType::Bool);
        for (op, name) in [
            (Binary::Equal, "equal"),
            (Binary::Less, "less"),
            (Binary::LessOrEqual, "less_or_equal"),
        ] {
            c.out(bin(op), &[a, b], &format!("{name}_{variant}"));
        }
        c.out(bin(Binary::And), &[p, q], &format!("and_{variant}"));
        c.out(bin(Binary::Or), &[p, q], &format!("or_{variant}"));
        let fa = c.input(&format!("fa_{variant}"), sa, -3.0, 3.0);
        let fb = c.input(&format!("fb_{variant}"), sb, -3.0, 3.0);
        c.out(bin(Binary::Max), &[fa, fb], &format!("max_{variant}"));
        c.out(bin(Binary::Min), &[fa, fb], &format!("min_{variant}"));
    }
    let bools = ints(&mut c, 30, 0, 1);
    let p = typed_input(&mut c, "p", &[30], bools, DType::Bool);
    c.out(un(unary::NOT), &[p], "not");
    let mut v = c.values(40, -1e30, 1e30);
    for i in (0..40).step_by(3) {
        v[i] = f32::NAN;
    }
    v[1] = f32::INFINITY;
    v[2] = f32::NEG_INFINITY;
    let x = c.input_values("x", &[40], v);
    c.out(un(unary::IS_NAN), &[x], "is_nan");
    c.check();
}

/// Division of integer values truncates toward zero, on the device as in the reference.
#[test]
fn integer_division_truncates() {
    let mut c = Case::new("integer_division_truncates");
    let v = ints(&mut c, 60, -50, 50);
    let a = typed_input(&mut c, "a", &[6, 10], v, DType::I64);
    let v: Vec<f32> = ints(&mut c, 10, 1, 7)
        .into_iter()
        .enumerate()
        .map(|(i, d)| if i % 2 == 0 { d } else { -d })
        .collect();
    let b = typed_input(&mut c, "b", &[10], v, DType::I64);
    let q = c.out(bin(Binary::Div), &[a, b], "quotient");
    assert_eq!(c.graph.node(q).dtype, DType::I64);
    c.check();
}

/// ReduceMax and ReduceMin: a NaN in a row makes its result NaN; a row of infinities keeps them.
#[test]
fn reduce_max_min_nan_and_infinities() {
    let mut g = GraphBuilder::new();
    let inf = f32::INFINITY;
    let v = vec![1.0, f32::NAN, 3.0, -inf, -inf, -inf, 2.0, 5.0, -7.0];
    let a = g.add_const("a", Tensor::f32(vec![3, 3], v));
    for (kind, name) in [(Reduce::Max, "max"), (Reduce::Min, "min")] {
        let op = Op::Reduce {
            kind,
            axes: vec![1],
            keepdims: false,
        };
        let y = g.add(op, &[a], name, name).unwrap();
        g.add_output(name, y);
    }
    let out = runtime::run_graph(gpu(), &g, &HashMap::new()).unwrap();
    assert!(out["max"][0].is_nan() && out["min"][0].is_nan(), "{out:?}");
    assert_eq!((out["max"][1], out["min"][1]), (-inf, -inf));
    assert_eq!((out["max"][2], out["min"][2]), (5.0, -7.0));
}

/// Mod (the divisor's sign) and Fmod (the dividend's), on integers (exact, i32 arithmetic) and on
/// floats whose quotients stay away from integers (where truncation in f32 and f64 could differ).
#[test]
fn mod_and_fmod() {
    let mut c = Case::new("mod_and_fmod");
    let v = ints(&mut c, 40, -50, 50);
    let a = typed_input(&mut c, "a", &[4, 10], v, DType::I64);
    let v: Vec<f32> = ints(&mut c, 10, 1, 7)
        .into_iter()
        .enumerate()
        .map(|(i, d)| if i % 3 == 0 { -d } else { d })
        .collect();
    let b = typed_input(&mut c, "b", &[10], v, DType::I64);
    let mut fb = vec![];
    let mut fa = vec![];
    for i in 0..40 {
        let d = c.rng.range(0.5, 3.0) * if i % 3 == 0 { -1.0 } else { 1.0 };
        let k = (c.rng.range(-5.0, 5.0)).floor();
        let frac = c.rng.range(0.1, 0.9);
        fb.push(d as f32);
        fa.push(((k + frac) * d) as f32);
    }
    let x = c.input_values("x", &[40], fa);
    let y = c.input_values("y", &[40], fb);
    for (op, name) in [(Binary::Mod, "mod"), (Binary::Fmod, "fmod")] {
        let r = c.out(bin(op), &[a, b], &format!("int_{name}"));
        assert_eq!(c.graph.node(r).dtype, DType::I64);
        c.out(bin(op), &[x, y], &format!("float_{name}"));
    }
    c.check();
}

/// Max and Min keep a NaN operand (WGSL's max and min may drop it), as torch does.
#[test]
fn max_and_min_propagate_nan() {
    let mut g = GraphBuilder::new();
    let a = g.add_const("a", Tensor::f32(vec![3], vec![f32::NAN, 1.0, 2.0]));
    let b = g.add_const("b", Tensor::f32(vec![3], vec![0.0, f32::NAN, 3.0]));
    for (op, name) in [(Binary::Max, "max"), (Binary::Min, "min")] {
        let y = g.add(bin(op), &[a, b], name, name).unwrap();
        g.add_output(name, y);
    }
    let out = runtime::run_graph(gpu(), &g, &HashMap::new()).unwrap();
    assert!(
        out["max"][0].is_nan() && out["max"][1].is_nan(),
        "{:?}",
        out["max"]
    );
    assert!(
        out["min"][0].is_nan() && out["min"][1].is_nan(),
        "{:?}",
        out["min"]
    );
    assert_eq!((out["max"][2], out["min"][2]), (3.0, 2.0));
}

#[test]
fn casts_and_where() {
    let mut c = Case::new("casts_and_where");
    let mut v = c.values(60, -5.0, 5.0);
    v[..6].copy_from_slice(&[0.0, -0.0, 2.5, -2.5, 0.99, -0.99]);
    let x = c.input_values("x", &[6, 10], v);
    let to_int = c.out(Op::Cast { to: DType::I64 }, &[x], "to_int64");
    c.out(Op::Cast { to: DType::Bool }, &[x], "to_bool");
    // A cast back to float is a view of the integer values.
    c.out(Op::Cast { to: DType::F32 }, &[to_int], "back_to_float");
    type Shapes<'a> = (&'a [usize], &'a [usize], &'a [usize], &'a str);
    let shapes: [Shapes; 4] = [
        (&[6, 10], &[6, 10], &[6, 10], "same"),
        (&[6, 1], &[10], &[], "broadcast"),
        (&[1, 1, 10], &[6, 10], &[3, 1, 1], "all_three"),
        (&[], &[4, 5], &[5], "scalar_cond"),
    ];
    for (sc, sx, sy, name) in shapes {
        let bools = ints(&mut c, numel(sc), 0, 1);
        let cond = typed_input(&mut c, &format!("cond_{name}"), sc, bools, DType::Bool);
        let a = c.input(&format!("a_{name}"), sx, -2.0, 2.0);
        let b = c.input(&format!("b_{name}"), sy, -2.0, 2.0);
        c.out(Op::Where, &[cond, a, b], &format!("where_{name}"));
    }
    c.check();
}

/// Gather with runtime ids (an embedding lookup: ids include negative and out-of-range
/// values, which give 0), along inner axes, with a scalar id, and with constant ids.
#[test]
fn gathers() {
    let mut c = Case::new("gathers");
    let table = c.constant("table", &[50, 24], -1.0, 1.0);
    let v = ints(&mut c, 14, -53, 52);
    let ids = typed_input(&mut c, "ids", &[2, 7], v, DType::I64);
    c.out(Op::Gather { axis: 0 }, &[table, ids], "embedding");
    let x = c.input("x", &[3, 9, 4], -1.0, 1.0);
    let v = ints(&mut c, 5, -9, 8);
    let cols = typed_input(&mut c, "cols", &[5], v, DType::I64);
    c.out(Op::Gather { axis: 1 }, &[x, cols], "axis1");
    let last = c.graph.add_const("last", Tensor::i64(vec![], vec![-1]));
    c.out(Op::Gather { axis: 2 }, &[x, last], "scalar_id");
    let two = c
        .graph
        .add_const("two", Tensor::i64(vec![2, 2], vec![0, 2, -1, 1]));
    c.out(Op::Gather { axis: 0 }, &[x, two], "constant_ids");
    // A long table: many workgroups.
    let big = c.constant("big", &[300, 64], -1.0, 1.0);
    let v = ints(&mut c, 64, 0, 299);
    let many = typed_input(&mut c, "many", &[8, 8], v, DType::I64);
    c.out(Op::Gather { axis: 0 }, &[big, many], "embedding_many");
    c.check();
}

#[test]
fn gather_elements_and_gather_nd() {
    let mut c = Case::new("gather_elements_and_gather_nd");
    let data = c.input("data", &[4, 6, 5], -1.0, 1.0);
    for (axis, shape, dim) in [(0, [3, 6, 5], 4), (1, [4, 9, 2], 6), (2, [2, 3, 7], 5)] {
        let v = ints(&mut c, numel(&shape), -(dim as i64) - 1, dim as i64);
        let ids = typed_input(&mut c, &format!("ids{axis}"), &shape, v, DType::I64);
        c.out(
            Op::GatherElements { axis },
            &[data, ids],
            &format!("gather_elements_axis{axis}"),
        );
    }
    // GatherND: whole rows (k = 1), elements (k = 3), pairs (k = 2) with a batch dim.
    let cases: [(&[usize], usize, &str); 4] = [
        (&[3, 1], 0, "rows"),
        (&[2, 2, 3], 0, "elements"),
        (&[4, 3, 1], 1, "batched_rows"),
        (&[4, 2], 1, "batched_pairs"),
    ];
    for (shape, batch_dims, name) in cases {
        let k = shape[shape.len() - 1];
        let dims = [4usize, 6, 5];
        let n = numel(shape);
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let d = dims[batch_dims + i % k] as i64;
                ints(&mut c, 1, -d, d - 1)[0]
            })
            .collect();
        let ids = typed_input(&mut c, &format!("nd_{name}"), shape, v, DType::I64);
        c.out(
            Op::GatherND { batch_dims },
            &[data, ids],
            &format!("gather_nd_{name}"),
        );
    }
    // An out-of-range id in a tuple gives 0.
    let bad = c
        .graph
        .add_const("bad", Tensor::i64(vec![2, 2], vec![1, 2, 9, 0]));
    c.out(
        Op::GatherND { batch_dims: 0 },
        &[data, bad],
        "gather_nd_out_of_range",
    );
    c.check();
}

/// Slices with negative and clamped bounds (resolved as the importer does), steps of 2 and 3
/// and negative steps, an empty window, and Split's pieces.
#[test]
fn slices() {
    let mut c = Case::new("slices");
    let x = c.input("x", &[5, 8, 6], -1.0, 1.0);
    let shape = [5, 8, 6];
    #[allow(clippy::type_complexity)]
    let cases: [(&[i64], &[i64], Option<&[i64]>, Option<&[i64]>, &str); 8] = [
        (&[1], &[4], None, None, "rows"),
        (
            &[-3],
            &[i64::MAX],
            Some(&[1]),
            None,
            "negative_start_clamped_end",
        ),
        (&[0, 1], &[8, -1], Some(&[1, 2]), Some(&[2, 3]), "steps"),
        (&[-1], &[i64::MIN], Some(&[1]), Some(&[-1]), "reversed"),
        (
            &[4, 5],
            &[0, -100],
            Some(&[0, 2]),
            Some(&[-2, -2]),
            "negative_steps",
        ),
        (&[3], &[3], Some(&[2]), None, "empty"),
        (&[0, 2, 1], &[5, 7, 6], None, Some(&[3, 2, 4]), "all_dims"),
        (
            &[7, -1],
            &[-100, 0],
            Some(&[1, 2]),
            Some(&[-3, -1]),
            "down_to_zero",
        ),
    ];
    for (starts, ends, axes, steps, name) in cases {
        let (starts, ends, steps) =
            dorac::ir::op::resolve_slice(&shape, starts, ends, axes, steps).unwrap();
        let op = Op::Slice {
            starts,
            ends,
            steps,
        };
        c.out(op, &[x], &format!("slice_{name}"));
    }
    c.check();
}

#[test]
fn concats() {
    let mut c = Case::new("concats");
    let a = c.input("a", &[3, 4, 5], -1.0, 1.0);
    let b = c.input("b", &[3, 2, 5], -1.0, 1.0);
    let e = c.input("e", &[3, 0, 5], -1.0, 1.0);
    c.out(Op::Concat { axis: 1 }, &[a, b, e, a], "axis1");
    let d = c.input("d", &[1, 4, 5], -1.0, 1.0);
    c.out(Op::Concat { axis: 0 }, &[a, d, a], "axis0");
    let f = c.input("f", &[3, 4, 2], -1.0, 1.0);
    c.out(Op::Concat { axis: 2 }, &[f, a, f], "axis2");
    let parts: Vec<NodeId> = (0..7)
        .map(|i| c.input(&format!("p{i}"), &[2, i + 1], -1.0, 1.0))
        .collect();
    c.out(Op::Concat { axis: 1 }, &parts, "seven_inputs");
    let s = c.input("s", &[1], -1.0, 1.0);
    c.out(Op::Concat { axis: 0 }, &[s, s], "scalars");
    c.check();
}

#[test]
fn trilus() {
    let mut c = Case::new("trilus");
    let x = c.input("x", &[2, 5, 7], -1.0, 1.0);
    for upper in [true, false] {
        for k in [-2i64, 0, 3, 9] {
            let name = format!("{}_{k}", if upper { "upper" } else { "lower" });
            c.out(Op::Trilu { upper, k }, &[x], &name.replace('-', "m"));
        }
    }
    let wide = c.input("wide", &[3, 40], -1.0, 1.0);
    c.out(Op::Trilu { upper: false, k: 0 }, &[wide], "wide_lower");
    c.check();
}

/// A gather anchoring an epilogue with a three-input Where and a Cast: an attention-mask shape.
#[test]
fn index_ops_anchor_epilogues() {
    let mut c = Case::new("index_ops_anchor_epilogues");
    let table = c.constant("table", &[20, 12], -1.0, 1.0);
    let v = ints(&mut c, 6, 0, 19);
    let ids = typed_input(&mut c, "ids", &[6], v, DType::I64);
    let g = c.op(Op::Gather { axis: 0 }, &[table, ids], "g");
    let bools = ints(&mut c, 12, 0, 1);
    let mask = typed_input(&mut c, "mask", &[12], bools, DType::Bool);
    let minus = c.constant("minus", &[], -1e4, -1e4);
    let w = c.op(Op::Where, &[mask, g, minus], "w");
    let y = c.out(Op::Cast { to: DType::I64 }, &[w], "y");
    let x = c.input("x", &[4, 9], -3.0, 3.0);
    let s = c.op(
        Op::Slice {
            starts: vec![3, 0],
            ends: vec![-1, 9],
            steps: vec![-1, 2],
        },
        &[x],
        "s",
    );
    let z = c.out(un(unary::EXP), &[s], "z");
    let groups = vec![vec![g, w, y], vec![s, z]];
    let plan = codegen::plan_grouped(&c.graph, groups, &PlanOptions::default()).unwrap();
    assert_eq!(plan.kernels.len(), 2, "{plan}");
    c.check_plan(&plan);
}

// ---------------------------------------------------------------- dispatch and executables

/// Every template with a dispatch limit lowered to 3 workgroups per dimension, so that each one
/// spills into y and z on small tensors.
#[test]
fn grid_spill_with_a_lowered_limit() {
    let mut c = Case::new("grid_spill_with_a_lowered_limit");
    let x = c.input("x", &[20, 200], -1.0, 1.0); // 4000 elements: 16 workgroups
    let row = c.input("row", &[200], -1.0, 1.0);
    c.out(bin(Binary::Add), &[x, row], "add");
    c.out(un(unary::TANH), &[x], "tanh");
    c.out(Op::Transpose { perm: vec![1, 0] }, &[x], "transpose");
    c.out(Op::Softmax { axis: 1 }, &[x], "softmax"); // 20 rows
    let op = Op::Reduce {
        kind: Reduce::Sum,
        axes: vec![1],
        keepdims: true,
    };
    c.out(op, &[x], "reduce");
    let scale = c.constant("scale", &[200], 0.5, 1.5);
    let op = Op::LayerNorm {
        axis: 1,
        epsilon: 1e-5,
    };
    c.out(op, &[x, scale], "layer_norm");
    let col = c.input("col", &[20, 1], -1.0, 1.0);
    c.out(
        Op::Expand {
            shape: vec![20, 200],
        },
        &[col],
        "expand",
    );
    let dy = c.input("dy", &[20, 200], -1.0, 1.0);
    c.out(Op::UnaryGrad(unary::SIGMOID), &[x, dy], "sigmoid_grad");
    let labels: Vec<f32> = (0..20).map(|i| (i * 7 % 200) as f32).collect();
    let labels = c.input_values("labels", &[20], labels);
    let dloss = c.input("dloss", &[], 0.5, 2.0);
    let op = Op::SoftmaxCrossEntropyGrad {
        ignore_index: -100,
        shift: false,
    };
    c.out(op, &[x, labels, dloss], "cross_entropy_grad"); // 20 rows
    let a = c.input("a", &[5, 20, 24], -1.0, 1.0); // 5 x 2 x 2 = 20 tiles
    let b = c.input("b", &[24, 20], -1.0, 1.0);
    c.out(Op::MatMul, &[a, b], "matmul");
    // The index-mapping ops share the element-wise template's grid.
    let ids: Vec<f32> = (0..20).map(|i| ((i * 3) % 20) as f32).collect();
    let ids = c.input_values("ids", &[20], ids);
    c.out(Op::Gather { axis: 0 }, &[x, ids], "gather");
    let op = Op::Slice {
        starts: vec![19, 0],
        ends: vec![-1, 200],
        steps: vec![-1, 1],
    };
    c.out(op, &[x], "slice");
    let top = c.input("top", &[1, 200], -1.0, 1.0);
    c.out(Op::Concat { axis: 0 }, &[top, x], "concat");
    c.out(Op::Trilu { upper: true, k: 1 }, &[x], "trilu");
    let plan = codegen::plan_with(
        &c.graph,
        &PlanOptions {
            max_workgroups_per_dim: 3,
            ..PlanOptions::default()
        },
    )
    .unwrap();
    for k in &plan.kernels {
        assert!(
            k.workgroups[1] > 1 && k.workgroups.iter().all(|&w| w <= 3),
            "{} was dispatched as {:?}",
            k.name,
            k.workgroups
        );
    }
    c.check_plan(&plan);
}

/// Over 65535 x 256 elements in one element-wise kernel: the real limit spills into y.
#[test]
fn dispatch_over_65535_workgroups() {
    let start = Instant::now();
    let (rows, cols) = (17_000, 1_000); // 17M elements, 66407 workgroups of 256
    let mut c = Case::new("dispatch_over_65535_workgroups");
    let x: Vec<f32> = (0..rows * cols).map(|i| (i % 4099) as f32).collect();
    let b: Vec<f32> = c.values(cols, -1000.0, 1000.0);
    let mut g = GraphBuilder::new();
    let xi = g.add_input("x", vec![rows, cols]);
    let bi = g.add_const("b", Tensor::f32(vec![cols], b.clone()));
    let y = g.add(bin(Binary::Add), &[xi, bi], "y", "y").unwrap();
    g.add_output("y", y);
    let plan = codegen::plan(&g).unwrap();
    assert_eq!(plan.kernels[0].workgroups, [65_535, 2, 1]);
    let exe = Executable::new(gpu(), &plan, &g).unwrap();
    let built = start.elapsed();
    let out = exe.run(&HashMap::from([("x".to_string(), x)])).unwrap();
    let y = &out["y"];
    assert_eq!(y.len(), rows * cols);
    // f32 addition is correctly rounded on both sides, so the results agree exactly.
    let bad = (0..rows * cols).find(|&i| y[i] != (i % 4099) as f32 + b[i % cols]);
    assert!(
        bad.is_none(),
        "wrong value at {bad:?} (seed {})",
        base_seed()
    );
    println!(
        "17M-element add: built in {:.2?}, total {:.2?}",
        built,
        start.elapsed()
    );
}

#[test]
fn executable_runs_again_and_checks_its_inputs() {
    let mut c = Case::new("executable_runs_again_and_checks_its_inputs");
    let x = c.input("x", &[4, 8], -1.0, 1.0);
    let w = c.constant("w", &[8, 3], -1.0, 1.0);
    let y = c.out(Op::MatMul, &[x, w], "y");
    let flat = c.op(Op::Reshape { shape: vec![12] }, &[y], "flat");
    c.output("flat", flat);
    let same = c.op(Op::Identity, &[x], "same"); // an output that is an input's buffer
    c.output("same", same);
    c.output("w_out", w); // and one that is a constant's
    let plan = codegen::plan(&c.graph).unwrap();
    assert_eq!(plan.kernels.len(), 1, "{plan}");
    let exe = Executable::new(gpu(), &plan, &c.graph).unwrap();
    for round in 0..2 {
        let xs = c.values(32, -1.0, 1.0);
        let out = exe
            .run(&HashMap::from([("x".to_string(), xs.clone())]))
            .unwrap();
        let feeds = HashMap::from([("x".to_string(), Array::from_f32(vec![4, 8], &xs))]);
        let want = reference::run(&c.graph, &feeds).unwrap();
        for name in ["y", "flat", "same", "w_out"] {
            let g: Vec<f64> = out[name].iter().map(|&v| v as f64).collect();
            let err = relative_error(&g, &want[name].data);
            assert!(err <= TOL, "round {round}, {name}: {err:e}");
        }
    }
    let missing = exe.run(&HashMap::new()).unwrap_err().to_string();
    assert!(
        missing.contains("missing input 'x'") && missing.contains("4x8"),
        "{missing}"
    );
    let short = HashMap::from([("x".to_string(), vec![0.0; 31])]);
    let short = exe.run(&short).unwrap_err().to_string();
    assert!(
        short.contains("'x' has 31 values") && short.contains("32"),
        "{short}"
    );
    let extra = HashMap::from([
        ("x".to_string(), vec![0.0; 32]),
        ("z".to_string(), vec![0.0; 1]),
    ]);
    let extra = exe.run(&extra).unwrap_err().to_string();
    assert!(
        extra.contains("unknown input") && extra.contains("\"z\""),
        "{extra}"
    );
}

#[test]
fn fused_epilogue_matches_the_reference() {
    let mut c = Case::new("fused_epilogue_matches_the_reference");
    let x = c.input("x", &[2, 21, 30], -1.0, 1.0);
    let w = c.constant("w", &[30, 18], -1.0, 1.0);
    let bias = c.constant("bias", &[18], -1.0, 1.0);
    let mm = c.op(Op::MatMul, &[x, w], "mm");
    let add = c.op(bin(Binary::Add), &[mm, bias], "add");
    let act = c.op(un(unary::GELU), &[add], "gelu");
    let scale = c.constant("scale", &[21, 1], 0.5, 2.0);
    let y = c.out(bin(Binary::Mul), &[scale, act], "y");
    let t = c.op(
        Op::Transpose {
            perm: vec![0, 2, 1],
        },
        &[y],
        "t",
    );
    let z = c.out(un(unary::SIGMOID), &[t], "z");
    let groups = vec![vec![mm, add, act, y], vec![t, z]];
    let plan = codegen::plan_grouped(&c.graph, groups, &PlanOptions::default()).unwrap();
    assert_eq!(plan.kernels.len(), 2, "{plan}");
    c.check_plan(&plan);
}

/// The same epilogue chain on a register-blocked matmul (batched, partial tiles): every element
/// of each invocation's 4x4 block goes through it.
#[test]
fn fused_epilogue_on_a_blocked_matmul() {
    let mut c = Case::new("fused_epilogue_on_a_blocked_matmul");
    let x = c.input("x", &[2, 65, 70], -1.0, 1.0);
    let w = c.constant("w", &[70, 129], -1.0, 1.0);
    let bias = c.constant("bias", &[129], -1.0, 1.0);
    let mm = c.op(Op::MatMul, &[x, w], "mm");
    let add = c.op(bin(Binary::Add), &[mm, bias], "add");
    let act = c.op(un(unary::GELU), &[add], "gelu");
    let scale = c.constant("scale", &[65, 1], 0.5, 2.0);
    let y = c.out(bin(Binary::Mul), &[scale, act], "y");
    let groups = vec![vec![mm, add, act, y]];
    let plan = codegen::plan_grouped(&c.graph, groups, &PlanOptions::default()).unwrap();
    assert_eq!(plan.kernels.len(), 1, "{plan}");
    assert!(
        plan.kernels[0].source.contains("Register-blocked"),
        "{}",
        plan.kernels[0].source
    );
    insta::assert_snapshot!("blocked_matmul_epilogue", plan.kernels[0].source);
    c.check_plan(&plan);
}

#[test]
fn oversized_tensors_are_refused_by_name() {
    let mut g = GraphBuilder::new();
    let x = g.add_input("huge_activation", vec![1 << 15, 1 << 15]); // 4 GiB of f32
    let y = g.add(un(unary::NEG), &[x], "y", "y").unwrap();
    g.add_output("y", y);
    let plan = codegen::plan(&g).unwrap();
    let err = match Executable::new(gpu(), &plan, &g) {
        Ok(_) => panic!("a 4 GiB buffer was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("huge_activation") && err.contains("32768x32768"),
        "{err}"
    );
}

/// A plan that wgpu rejects (a kernel whose bindings no longer match its shader) fails with an
/// error naming the kernel, not a panic.
#[test]
fn wgpu_errors_become_gpu_errors() {
    let mut g = GraphBuilder::new();
    let a = g.add_input("a", vec![8]);
    let b = g.add_input("b", vec![8]);
    let y = g.add(bin(Binary::Add), &[a, b], "y", "y").unwrap();
    g.add_output("y", y);
    let mut plan = codegen::plan(&g).unwrap();
    plan.kernels[0].inputs.pop();
    let err = match Executable::new(gpu(), &plan, &g) {
        Ok(_) => panic!("a kernel with a missing binding was accepted"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(matches!(err, dorac::Error::Gpu { .. }), "{msg}");
    assert!(msg.contains("k00_add_y"), "{msg}");
}

#[test]
fn adapter_is_described() {
    let d = gpu().describe();
    println!("adapter: {d}");
    assert!(!d.is_empty());
}

// ---------------------------------------------------------------- snapshots

/// x -> Gemm(W1, b1, transB) -> Relu -> Gemm(W2, b2) -> Softmax: the shape of a classifier head.
fn mlp() -> Graph {
    let mut rng = Rng::new(7);
    let mut t = |shape: Vec<usize>| {
        let v = (0..numel(&shape))
            .map(|_| rng.range(-1.0, 1.0) as f32)
            .collect();
        Tensor::f32(shape, v)
    };
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![4, 8]);
    let w1 = g.add_const("fc1.weight", t(vec![16, 8]));
    let b1 = g.add_const("fc1.bias", t(vec![16]));
    let w2 = g.add_const("fc2.weight", t(vec![16, 10]));
    let b2 = g.add_const("fc2.bias", t(vec![10]));
    let gemm = |trans_b| Op::Gemm {
        alpha: 1.0,
        beta: 1.0,
        trans_a: false,
        trans_b,
    };
    let h = g.add(gemm(true), &[x, w1, b1], "h", "/fc1/Gemm").unwrap();
    let r = g.add(un(unary::RELU), &[h], "h_relu", "/act/Relu").unwrap();
    let o = g
        .add(gemm(false), &[r, w2, b2], "logits", "/fc2/Gemm")
        .unwrap();
    let p = g
        .add(Op::Softmax { axis: 1 }, &[o], "probs", "/Softmax")
        .unwrap();
    g.add_output("probs", p);
    g.finish()
}

#[test]
fn mlp_wgsl_snapshots() {
    let g = mlp();
    let plan = codegen::plan(&g).unwrap();
    let again = codegen::plan(&mlp()).unwrap();
    assert_eq!(plan.kernels, again.kernels, "codegen is not deterministic");
    insta::assert_snapshot!("mlp_plan", plan.to_string());
    for k in &plan.kernels {
        insta::assert_snapshot!(format!("mlp_{}", k.name), k.source);
    }
}

#[test]
fn mlp_runs() {
    let mut c = Case::new("mlp_runs");
    c.graph = GraphBuilder::extending(mlp());
    let v = c.values(32, -2.0, 2.0);
    c.feeds.insert("x".into(), Array::from_f32(vec![4, 8], &v));
    c.check();
}

/// Weights stored in half precision (`Graph::half_consts`): f16 and bf16 B operands (plain,
/// Gemm transB, a transpose read in place), an f16 A operand, DoRA's norm's W, a bf16 embedding
/// table read by a Gather, against the
/// reference on both targets (values already rounded, so both executors see the same numbers).
/// A half constant that an element-wise op also reads stays f32, and an odd element count packs
/// into whole words.
#[test]
fn half_stored_weights() {
    let mut c = Case::new("half_stored_weights");
    let half = |c: &mut Case, name: &str, shape: &[usize], h: Half| {
        let v: Vec<f32> = c
            .values(numel(shape), -1.0, 1.0)
            .into_iter()
            .map(|x| h.round(x))
            .collect();
        let n = c.graph.add_const(name, Tensor::f32(shape.to_vec(), v));
        c.graph.mark_half(n, h);
        n
    };
    let x = c.input("x", &[37, 48], -1.0, 1.0);
    let w16 = half(&mut c, "w16", &[48, 65], Half::F16);
    c.out(Op::MatMul, &[x, w16], "matmul_f16");
    let wt = half(&mut c, "wt_bf16", &[96, 48], Half::Bf16);
    let gemm = Op::Gemm {
        alpha: 1.0,
        beta: 0.0,
        trans_a: false,
        trans_b: true,
    };
    c.out(gemm, &[x, wt], "gemm_transb_bf16");
    let w_src = half(&mut c, "w_src", &[33, 48], Half::F16);
    let t = c.op(Op::Transpose { perm: vec![1, 0] }, &[w_src], "w_t");
    c.out(Op::MatMul, &[x, t], "matmul_transposed_f16");
    let a16 = half(&mut c, "a16", &[5, 37], Half::F16);
    c.out(Op::MatMul, &[a16, x], "a_operand_f16");
    // Read by a matmul and by an add: stays f32.
    let shared = half(&mut c, "shared", &[48, 48], Half::F16);
    let y = c.op(Op::MatMul, &[x, shared], "uses_shared");
    let s2 = c.op(bin(Binary::Add), &[shared, shared], "shared_twice");
    c.out(Op::MatMul, &[y, s2], "shared_out");
    // DoRA's norm with W (out x in) stored as f16.
    let wn = half(&mut c, "wn", &[21, 600], Half::F16);
    let a = c.input("lora_a", &[8, 600], -1.0, 1.0);
    let b = c.input("lora_b", &[21, 8], -1.0, 1.0);
    let op = Op::DoraNormSq(dorac::ops::DoraNorm {
        alpha: 1.0,
        scale: 0.5,
        weight_out_in: true,
    });
    c.out(op, &[wn, a, b], "dora_norm_f16");
    // An embedding table (odd width: rows straddle words), bf16, ids in range and out of it.
    let table = half(&mut c, "table_bf16", &[37, 13], Half::Bf16);
    let v = ints(&mut c, 12, -40, 39);
    let ids = typed_input(&mut c, "ids", &[3, 4], v, DType::I64);
    c.out(Op::Gather { axis: 0 }, &[table, ids], "embedding_bf16");

    let plan = codegen::plan(&c.graph).unwrap();
    let stored = |name: &str| {
        let b = plan.buffers.iter().find(|b| b.name == name).unwrap();
        (b.stored, b.bytes())
    };
    let (f16, bf16) = (
        Some(Stored::Half(Half::F16)),
        Some(Stored::Half(Half::Bf16)),
    );
    assert_eq!(stored("w16"), (f16, 48 * 65 * 2));
    assert_eq!(stored("wt_bf16"), (bf16, 96 * 48 * 2));
    assert_eq!(stored("w_src"), (f16, 33 * 48 * 2));
    assert_eq!(
        stored("a16"),
        (f16, 5 * 37 * 2 + 2),
        "185 values in 93 words"
    );
    assert_eq!(stored("shared"), (None, 48 * 48 * 4));
    assert_eq!(stored("wn"), (f16, 21 * 600 * 2));
    assert_eq!(stored("table_bf16"), (bf16, 37 * 13 * 2 + 2));
    c.check();
}

/// How a block-quantized test weight gives its zero points.
#[derive(Clone, Copy)]
enum Zeros {
    Middle,
    Codes,
    Floats,
}

/// A random block-quantized weight of `shape` (`ir::blocks`): random codes, scales of both
/// signs, zero points as `zeros` says; its values are what the codes decode to.
fn block_codes(
    rng: &mut Rng,
    shape: [usize; 2],
    (bits, block): (usize, usize),
    down_columns: bool,
    zeros: Zeros,
) -> BlockCodes {
    let [rows, cols] = shape;
    let (lines, line_len) = if down_columns {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let blocks = line_len.div_ceil(block);
    let with_zeros = !matches!(zeros, Zeros::Middle);
    let format = BlockFormat::new(
        &shape,
        bits,
        block,
        down_columns,
        blocks * block,
        blocks,
        with_zeros,
    )
    .unwrap();
    let codes = (0..format.code_bytes())
        .map(|_| rng.range(0.0, 256.0) as u8)
        .collect();
    let per_block = lines * blocks;
    let scales = (0..per_block)
        .map(|_| rng.range(-0.1, 0.1) as f32)
        .collect();
    let top = (1u32 << bits) as f64;
    let zeros = match zeros {
        Zeros::Middle => vec![],
        Zeros::Codes => (0..per_block)
            .map(|_| rng.range(0.0, top).floor() as f32)
            .collect(),
        Zeros::Floats => (0..per_block).map(|_| rng.range(0.0, top) as f32).collect(),
    };
    BlockCodes {
        format,
        codes,
        scales,
        zeros,
    }
}

/// A constant whose values `codes` decode to, marked to keep them (`Graph::blocked`).
fn blocked_const(g: &mut GraphBuilder, name: &str, shape: [usize; 2], codes: BlockCodes) -> NodeId {
    let values = (0..shape[0] * shape[1]).map(|i| codes.value(i)).collect();
    let n = g.add_const(name, Tensor::f32(shape.to_vec(), values));
    g.mark_blocked(n, codes);
    n
}

/// Weights kept as block-quantized codes (`ir::blocks`): 2-, 4- and 8-bit codes, lines down
/// columns (MatMulNBits' layout) and along rows (an embedding's), padded last blocks, no zero
/// points, integer and float ones, read as a product's B (plain, Gemm transB, a transpose read
/// in place), as DoRA's norm's W and as a Gather's table, against the reference on both targets.
/// A blocked constant that an element-wise op also reads stays f32.
#[test]
fn block_stored_weights() {
    let mut c = Case::new("block_stored_weights");
    let mut formats = vec![];
    let mut blocked = |c: &mut Case, name: &str, shape, bits, down, zeros| {
        let codes = block_codes(&mut c.rng, shape, bits, down, zeros);
        formats.push((name.to_string(), codes.format));
        blocked_const(&mut c.graph, name, shape, codes)
    };
    let x = c.input("x", &[37, 48], -1.0, 1.0);
    let w4 = blocked(&mut c, "w4", [48, 65], (4, 32), true, Zeros::Middle);
    c.out(Op::MatMul, &[x, w4], "matmul_4bit");
    let wt = blocked(&mut c, "wt8", [96, 48], (8, 16), false, Zeros::Codes);
    let gemm = Op::Gemm {
        alpha: 1.0,
        beta: 0.0,
        trans_a: false,
        trans_b: true,
    };
    c.out(gemm, &[x, wt], "gemm_transb_8bit");
    let w_src = blocked(&mut c, "w_src2", [33, 48], (2, 16), true, Zeros::Floats);
    let t = c.op(Op::Transpose { perm: vec![1, 0] }, &[w_src], "w_t");
    c.out(Op::MatMul, &[x, t], "matmul_transposed_2bit");
    // Read by a matmul and by an add: stays f32.
    let shared = blocked(&mut c, "shared", [48, 48], (4, 16), true, Zeros::Middle);
    let y = c.op(Op::MatMul, &[x, shared], "uses_shared");
    let s2 = c.op(bin(Binary::Add), &[shared, shared], "shared_twice");
    c.out(Op::MatMul, &[y, s2], "shared_out");
    // DoRA's norm of a MatMulNBits weight (in x out, lines down its columns, 600 in blocks of
    // 128: the last one padded).
    let wn = blocked(&mut c, "wn", [600, 21], (4, 128), true, Zeros::Codes);
    let a = c.input("lora_a", &[8, 600], -1.0, 1.0);
    let b = c.input("lora_b", &[21, 8], -1.0, 1.0);
    let op = Op::DoraNormSq(dorac::ops::DoraNorm {
        alpha: 1.0,
        scale: 0.5,
        weight_out_in: false,
    });
    c.out(op, &[wn, a, b], "dora_norm_4bit");
    // An embedding table, a line per row (13 wide: one padded block), ids in range and out.
    let table = blocked(&mut c, "table4", [37, 13], (4, 16), false, Zeros::Codes);
    let v = ints(&mut c, 12, -40, 39);
    let ids = typed_input(&mut c, "ids", &[3, 4], v, DType::I64);
    c.out(Op::Gather { axis: 0 }, &[table, ids], "embedding_4bit");

    let plan = codegen::plan(&c.graph).unwrap();
    for (name, format) in formats {
        let b = plan.buffers.iter().find(|b| b.name == name).unwrap();
        if name == "shared" {
            assert_eq!((b.stored, b.bytes()), (None, 48 * 48 * 4));
        } else {
            assert_eq!(b.stored, Some(Stored::Blocks(format)), "{name}");
            assert_eq!(b.bytes(), 4 * format.words(), "{name}");
            assert!(
                b.bytes() < 4 * b.len as u64 / 2,
                "{name}: {} bytes",
                b.bytes()
            );
        }
    }
    c.check();
}

/// The device decodes block-quantized codes to exactly the constant's values: an identity
/// times the weight gives it back, for every code width and zero point form, lines down
/// columns and along rows, on both targets.
#[test]
fn block_decoding_is_exact() {
    let mut rng = Rng::new(base_seed());
    for bits in [2, 4, 8] {
        for (zeros, down) in [
            (Zeros::Middle, true),
            (Zeros::Codes, false),
            (Zeros::Floats, true),
        ] {
            let shape = [40, 24];
            let codes = block_codes(&mut rng, shape, (bits, 16), down, zeros);
            let want: Vec<f32> = (0..40 * 24).map(|i| codes.value(i)).collect();
            assert!(codes.decodes_to(&want));
            let mut g = GraphBuilder::new();
            let eye = g.add_input("eye", vec![40, 40]);
            let w = blocked_const(&mut g, "w", shape, codes);
            let y = g.add(Op::MatMul, &[eye, w], "y", "y").unwrap();
            g.add_output("y", y);
            let identity: Vec<f32> = (0..40 * 40)
                .map(|i| if i / 40 == i % 40 { 1.0 } else { 0.0 })
                .collect();
            for target in [Target::Gpu, Target::Cpu] {
                let options = PlanOptions {
                    target,
                    ..PlanOptions::default()
                };
                let plan = codegen::plan_with(&g, &options).unwrap();
                let stored = plan.buffers.iter().find(|b| b.name == "w").unwrap().stored;
                assert!(matches!(stored, Some(Stored::Blocks(_))), "{target:?}");
                let exe = Executable::new(gpu(), &plan, &g).unwrap();
                let got = exe
                    .run(&[("eye".to_string(), identity.clone())].into())
                    .unwrap();
                // `==`: a sum that starts from +0 gives +0 for a -0 weight.
                let wrong: Vec<(usize, f32, f32)> = (want.iter().zip(&got["y"]).enumerate())
                    .filter(|(_, (w, g))| w != g)
                    .map(|(i, (w, g))| (i, *w, *g))
                    .take(5)
                    .collect();
                assert!(
                    wrong.is_empty(),
                    "{bits}-bit, down_columns {down}, {target:?}: (index, want, got) {wrong:?}"
                );
            }
        }
    }
}

/// The device's f16 and bf16 decoding is exact for every finite value, subnormals included:
/// each value times 1 (a 1 x 1 by 1 x N product with B stored half) comes back bit for bit as
/// the host's conversion gives it. (Not -0: a product's sum starts from +0, and +0 + -0 is +0.)
#[test]
fn half_decoding_is_exact() {
    for h in [Half::F16, Half::Bf16] {
        let values: Vec<f32> = (0..=u16::MAX)
            .map(|bits| match h {
                Half::F16 => half::f16::from_bits(bits).to_f32(),
                Half::Bf16 => half::bf16::from_bits(bits).to_f32(),
            })
            .filter(|v| v.is_finite() && v.to_bits() != (-0.0f32).to_bits())
            .collect();
        let n = values.len();
        let mut g = GraphBuilder::new();
        let one = g.add_input("one", vec![1, 1]);
        let w = g.add_const("w", Tensor::f32(vec![1, n], values.clone()));
        g.mark_half(w, h);
        let y = g.add(Op::MatMul, &[one, w], "y", "y").unwrap();
        g.add_output("y", y);
        for target in [Target::Gpu, Target::Cpu] {
            let options = PlanOptions {
                target,
                ..PlanOptions::default()
            };
            let plan = codegen::plan_with(&g, &options).unwrap();
            assert_eq!(
                plan.buffers.iter().find(|b| b.name == "w").unwrap().stored,
                Some(Stored::Half(h))
            );
            let exe = Executable::new(gpu(), &plan, &g).unwrap();
            let got = exe
                .run(&[("one".to_string(), vec![1.0f32])].into())
                .unwrap();
            let wrong: Vec<(f32, f32)> = (values.iter().zip(&got["y"]))
                .filter(|(w, g)| w.to_bits() != g.to_bits())
                .map(|(w, g)| (*w, *g))
                .take(5)
                .collect();
            assert!(
                wrong.is_empty(),
                "{h:?} on {target:?}: (want, got) {wrong:?}"
            );
        }
    }
}

/// Empty products plan and run on both targets (no workgroups, empty outputs): no tile size is
/// derived from a zero dimension.
#[test]
fn empty_matmuls_plan_and_run() {
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![0, 5]);
    let w = g.add_const("w", Tensor::f32(vec![5, 40], vec![0.5; 200]));
    let y = g.add(Op::MatMul, &[x, w], "y", "y").unwrap();
    g.add_output("y", y);
    for target in [Target::Gpu, Target::Cpu] {
        let options = PlanOptions {
            target,
            ..PlanOptions::default()
        };
        let plan = codegen::plan_with(&g, &options).unwrap();
        assert_eq!(plan.kernels[0].workgroups, [0, 0, 0], "{target:?}");
        let exe = Executable::new(gpu(), &plan, &g).unwrap();
        let out = exe.run(&[("x".to_string(), vec![])].into()).unwrap();
        assert!(out["y"].is_empty(), "{target:?}");
    }
}

/// Thin products (many rows, at most 32 columns) turned for a CPU driver
/// (`codegen::turn_thin_products`): `X W` with an element-wise epilogue, DoRA's `W0 Aᵀ` (a
/// transpose read in place, which the turn cancels), `x Aᵀ` of a batch of 160 rows, `dY B` read
/// by a product through its transpose too (as `dA` reads it; the turned product is that
/// transpose); left alone, one read as a Gemm's C, which cannot read a transpose in place, and
/// one of too few terms. Compiled as `dorac` compiles for this device (turned on lavapipe) and
/// compared with the reference; the turned graph on its own too.
#[test]
fn thin_products_turned() {
    let mut c = Case::new("thin_products_turned");
    let x = c.input("x", &[300, 260], -1.0, 1.0);
    let w = c.constant("w", &[260, 16], -1.0, 1.0);
    let xw = c.op(Op::MatMul, &[x, w], "xw");
    let bias = c.input("bias", &[16], -1.0, 1.0);
    c.out(bin(Binary::Add), &[xw, bias], "xw_plus_bias");
    let w0 = c.constant("w0", &[512, 300], -1.0, 1.0);
    let a = c.input("a", &[8, 300], -1.0, 1.0);
    let a_t = c.op(Op::Transpose { perm: vec![1, 0] }, &[a], "a_t");
    let w0_at = c.op(Op::MatMul, &[w0, a_t], "w0_at");
    c.out(un(unary::RELU), &[w0_at], "relu_w0_at");
    let y = c.input("y", &[256, 300], -1.0, 1.0);
    let yw = c.op(Op::MatMul, &[y, a_t], "yw");
    let e = c.input("e", &[256, 256], -1.0, 1.0);
    let f = c.input("f", &[256, 8], -1.0, 1.0);
    let gemm = Op::Gemm {
        alpha: 1.0,
        beta: 1.0,
        trans_a: false,
        trans_b: false,
    };
    c.out(gemm, &[e, f, yw], "gemm_with_thin_c");
    let batch = c.input("batch", &[160, 300], -1.0, 1.0);
    let batch_at = c.op(Op::MatMul, &[batch, a_t], "batch_at");
    c.out(un(unary::RELU), &[batch_at], "relu_batch_at");
    let short = c.input("short", &[300, 200], -1.0, 1.0);
    let w_short = c.constant("w_short", &[200, 16], -1.0, 1.0);
    let short_terms = c.op(Op::MatMul, &[short, w_short], "short_terms");
    c.out(un(unary::RELU), &[short_terms], "relu_short_terms");
    let dy = c.input("dy", &[140, 300], -1.0, 1.0);
    let dy_b = c.op(Op::MatMul, &[dy, a_t], "dy_b");
    c.out(un(unary::RELU), &[dy_b], "relu_dy_b");
    let dy_b_t = c.op(Op::Transpose { perm: vec![1, 0] }, &[dy_b], "dy_b_t");
    let x = c.input("x_for_da", &[140, 5], -1.0, 1.0);
    c.out(Op::MatMul, &[dy_b_t, x], "da");
    let graph: Graph = Graph::clone(&c.graph);
    assert!(codegen::has_thin_products(&graph));
    let mut turned = graph.clone();
    assert_eq!(codegen::turn_thin_products(&mut turned).unwrap(), 4);
    assert!(!codegen::has_thin_products(&turned));
    let host: HashMap<String, Vec<f32>> = c
        .feeds
        .iter()
        .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    let want = reference::run(&graph, &c.feeds).unwrap();
    for (what, g) in [("as compiled", &graph), ("turned", &turned)] {
        let got = Executable::compile(gpu(), g).unwrap().run(&host).unwrap();
        for (name, _) in graph.outputs() {
            let got: Vec<f64> = got[name].iter().map(|&v| v as f64).collect();
            let err = relative_error(&got, &want[name].data);
            println!("relerr {what}/{name} {err:.3e}");
            assert!(err <= TOL, "{what} {name}: relative error {err:e}");
        }
    }
}

/// Sums run the element-wise work on their result as an epilogue, through a reshape to another
/// shape of as many elements: the magnitude gradient's shape (`sum(dY * u)` over the batch,
/// kept as 1 x n, reshaped to n, divided by the norm, then AdamW-like arithmetic with a value
/// written beside the output). Short sums (one invocation per output on a CPU driver) and long
/// ones (a workgroup tree), with a prologue too, on both targets.
#[test]
fn sums_take_epilogues() {
    let mut c = Case::new("sums_take_epilogues");
    for (rows, cols) in [(6, 40), (5000, 3)] {
        let tag = format!("{rows}x{cols}");
        let dy = c.input(&format!("dy{tag}"), &[rows, cols], -1.0, 1.0);
        let u = c.input(&format!("u{tag}"), &[rows, cols], -1.0, 1.0);
        let norm = c.input(&format!("norm{tag}"), &[cols], 0.5, 2.0);
        let m = c.input(&format!("m{tag}"), &[cols], -1.0, 1.0);
        let terms = c.op(bin(Binary::Mul), &[dy, u], &format!("terms{tag}"));
        let sum = Op::Reduce {
            kind: Reduce::Sum,
            axes: vec![0],
            keepdims: true,
        };
        let s = c.op(sum, &[terms], &format!("sum{tag}"));
        let flat = c.op(
            Op::Reshape { shape: vec![cols] },
            &[s],
            &format!("flat{tag}"),
        );
        let grad = c.op(bin(Binary::Div), &[flat, norm], &format!("grad{tag}"));
        let moment = c.op(bin(Binary::Add), &[m, grad], &format!("moment{tag}"));
        c.output(&format!("moment{tag}"), moment);
        let sq = c.op(bin(Binary::Mul), &[grad, grad], &format!("sq{tag}"));
        let step = c.op(bin(Binary::Sub), &[moment, sq], &format!("step{tag}"));
        c.output(&format!("step{tag}"), step);
    }
    let plan = codegen::plan(&c.graph).unwrap();
    assert_eq!(plan.kernels.len(), 2, "one kernel per sum:\n{plan}");
    assert!(
        plan.kernels
            .iter()
            .all(|k| k.name.contains("reduce_sum_reshape_div")),
        "{plan}"
    );
    c.check();
}

/// An element-wise chain that reads a tensor a sum also reads is computed by the sum's kernel
/// as it loads each term, and written from there (`Fusion::term_chains`): DoRA's `dY * g` and
/// `(dY * g) * s` beside the magnitude gradient `sum(dY * u)`, with an interior value read by a
/// matmul; a row sum of more terms than the CPU target sums serially (the workgroup tree on
/// both targets). A chain that reads the sum's own value, or beside a sum of few outputs,
/// keeps its kernel.
#[test]
fn sums_compute_chains_beside_their_terms() {
    let mut c = Case::new("sums_compute_chains_beside_their_terms");
    let reduce = |axes: &[usize], keepdims| Op::Reduce {
        kind: Reduce::Sum,
        axes: axes.to_vec(),
        keepdims,
    };
    // Column sums (DoRA's magnitude gradient).
    let dy = c.input("dy", &[96, 80], -1.0, 1.0);
    let u = c.input("u", &[96, 80], -1.0, 1.0);
    let g = c.input("g", &[80], 0.5, 2.0);
    let s = c.input("s", &[1], 0.5, 2.0);
    let w = c.input("w", &[80, 24], -1.0, 1.0);
    let terms = c.op(bin(Binary::Mul), &[dy, u], "terms");
    let dm = c.op(reduce(&[0], false), &[terms], "dm");
    c.out(bin(Binary::Mul), &[dm, g], "dm_scaled");
    let du = c.op(bin(Binary::Mul), &[dy, g], "du");
    c.out(bin(Binary::Mul), &[du, s], "du_scaled");
    c.out(Op::MatMul, &[du, w], "dx");
    // Row sums of 5000 terms.
    let a = c.input("a", &[70, 5000], -1.0, 1.0);
    let row = c.input("row", &[5000], -1.0, 1.0);
    c.out(reduce(&[1], true), &[a], "row_sum");
    c.out(bin(Binary::Sub), &[a, row], "a_minus_row");
    // Reads the sum it would join: a kernel of its own.
    let b = c.input("b", &[70, 40], -1.0, 1.0);
    let b_sum = c.out(reduce(&[1], true), &[b], "b_sum");
    c.out(bin(Binary::Sub), &[b, b_sum], "b_centered");
    // Beside a sum of 3 outputs: a kernel of its own.
    let few = c.input("few", &[200, 3], -1.0, 1.0);
    c.out(reduce(&[0], false), &[few], "few_sum");
    c.out(un(unary::EXP), &[few], "few_exp");

    for target in [Target::Gpu, Target::Cpu] {
        let options = PlanOptions {
            target,
            max_bindings: 16,
            ..PlanOptions::default()
        };
        let plan = codegen::plan_with(&c.graph, &options).unwrap();
        let kernel_of = |label: &str| {
            let k = plan
                .kernels
                .iter()
                .find(|k| k.labels.iter().any(|l| l == label));
            k.unwrap_or_else(|| panic!("{target:?}: no kernel computes '{label}':\n{plan}"))
        };
        for (label, host) in [
            ("du", "dm"),
            ("du_scaled", "dm"),
            ("a_minus_row", "row_sum"),
        ] {
            assert_eq!(
                kernel_of(label).name,
                kernel_of(host).name,
                "{target:?}:\n{plan}"
            );
        }
        for (label, own) in [("b_centered", "b_sum"), ("few_exp", "few_sum")] {
            assert_ne!(
                kernel_of(label).name,
                kernel_of(own).name,
                "{target:?}:\n{plan}"
            );
        }
        assert!(plan.buffers.iter().any(|b| b.name == "du"), "{plan}");
        assert!(!plan.buffers.iter().any(|b| b.name == "terms"), "{plan}");
    }
    for target in [Target::Gpu, Target::Cpu] {
        let options = PlanOptions {
            target,
            max_bindings: 16,
            ..PlanOptions::default()
        };
        c.check_plan(&codegen::plan_with(&c.graph, &options).unwrap());
    }
}

/// Element-wise nodes read only by a reduction are computed by it (no kernel, no buffer of
/// their own): every reduction kind over a product, a difference with a broadcast operand, a
/// ReLU, and a transpose read in place, on both targets. A node with a second reader keeps its
/// kernel.
#[test]
fn reduce_prologues() {
    let mut c = Case::new("reduce_prologues");
    let a = c.input("a", &[6, 40], -1.0, 1.0);
    let b = c.input("b", &[6, 40], -1.0, 1.0);
    let row = c.input("row", &[40], -1.0, 1.0);
    let reduce = |kind, axes: &[usize]| Op::Reduce {
        kind,
        axes: axes.to_vec(),
        keepdims: false,
    };
    let mut prologues = vec![];
    for (kind, axes, tag) in [
        (Reduce::Sum, &[0][..], "sum"),
        (Reduce::SumSquare, &[1][..], "sum_square"),
        (Reduce::Max, &[0, 1][..], "max"),
        (Reduce::Min, &[1][..], "min"),
        (Reduce::Prod, &[0][..], "prod"),
    ] {
        let prod = c.op(bin(Binary::Mul), &[a, b], &format!("prod_{tag}"));
        c.out(reduce(kind, axes), &[prod], &format!("{tag}_of_product"));
        prologues.push(format!("prod_{tag}"));
    }
    let diff = c.op(bin(Binary::Sub), &[a, row], "diff");
    c.out(
        reduce(Reduce::SumSquare, &[1]),
        &[diff],
        "sum_square_of_difference",
    );
    let relu = c.op(un(unary::RELU), &[b], "relu");
    c.out(reduce(Reduce::Sum, &[0]), &[relu], "sum_of_relu");
    let bt = c.op(Op::Transpose { perm: vec![1, 0] }, &[b], "b_t");
    let at = c.op(Op::Transpose { perm: vec![1, 0] }, &[a], "a_t");
    let tprod = c.op(bin(Binary::Mul), &[at, bt], "transposed_product");
    c.out(
        reduce(Reduce::Sum, &[1]),
        &[tprod],
        "sum_of_transposed_product",
    );
    prologues.extend(["diff", "relu", "transposed_product"].map(String::from));
    // Read twice: computed once by a kernel of its own.
    let shared = c.op(bin(Binary::Add), &[a, b], "shared");
    c.out(reduce(Reduce::Sum, &[0]), &[shared], "sum_of_shared");
    c.out(un(unary::EXP), &[shared], "exp_of_shared");

    for target in [Target::Gpu, Target::Cpu] {
        let options = PlanOptions {
            target,
            ..PlanOptions::default()
        };
        let plan = codegen::plan_with(&c.graph, &options).unwrap();
        let has_buffer = |name: &str| plan.buffers.iter().any(|b| b.name == name);
        for p in &prologues {
            assert!(
                !has_buffer(p),
                "{target:?}: '{p}' should be computed by its reduction"
            );
        }
        assert!(has_buffer("shared"), "{target:?}");
    }
    c.check();
}
