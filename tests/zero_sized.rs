//! Tensors with a zero-sized dim (an empty batch, an empty sequence) compile and run: every
//! kernel either has nothing to do or reduces over nothing, and the results match the reference
//! executor. Before, index arithmetic over a zero size reached naga as "Division by zero".

mod common;

use common::{gpu, run_reference};
use dorac::codegen::{self, PlanOptions, Target};
use dorac::ir::{unary, Binary, GraphBuilder, Op, Reduce};
use dorac::runtime::Executable;
use dorac::tensor::{relative_error, Array, Tensor};
use std::collections::{BTreeMap, HashMap};

fn check(name: &str, g: &dorac::ir::Graph, feeds: &BTreeMap<String, Array>) {
    let want = run_reference(g, feeds);
    let host: HashMap<String, Vec<f32>> = feeds
        .iter()
        .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    // Both targets' kernels (workgroup tiles, and the CPU driver's columns).
    for target in [Target::Gpu, Target::Cpu] {
        let options = PlanOptions {
            target,
            ..PlanOptions::default()
        };
        let plan = codegen::plan_with(g, &options)
            .unwrap_or_else(|e| panic!("{name}: plan for {target:?}: {e}"));
        let exe = Executable::new(gpu(), &plan, g)
            .unwrap_or_else(|e| panic!("{name}: {target:?} kernels: {e}"));
        let got = exe
            .run(&host)
            .unwrap_or_else(|e| panic!("{name}: run: {e}"));
        compare(name, g, &got, &want);
    }
}

fn compare(
    name: &str,
    g: &dorac::ir::Graph,
    got: &HashMap<String, Vec<f32>>,
    want: &BTreeMap<String, Array>,
) {
    for (out, _) in g.outputs() {
        let (got, want) = (&got[out], &want[out].data);
        // Infinities (a max over nothing) must agree exactly; the rest within 1e-5.
        let same_inf = got
            .iter()
            .zip(want)
            .all(|(g, w)| w.is_finite() || *g as f64 == *w);
        assert!(same_inf, "{name}/{out}: {got:?} against {want:?}");
        let finite = |v: &mut dyn Iterator<Item = f64>| -> Vec<f64> {
            v.map(|x| if x.is_infinite() { 0.0 } else { x }).collect()
        };
        let a = finite(&mut got.iter().map(|&x| x as f64));
        let b = finite(&mut want.iter().copied());
        let e = if b.is_empty() {
            0.0
        } else {
            relative_error(&a, &b)
        };
        assert!(e < 1e-5, "{name}/{out}: {e}: {got:?} against {want:?}");
    }
}

#[test]
fn empty_batches_compile_and_run() {
    for rows in [0usize, 3] {
        for inner in [0usize, 4] {
            let mut g = GraphBuilder::new();
            let x = g.add_input("x", vec![rows, inner]);
            let w = g.add_const("w", Tensor::f32(vec![inner, 5], vec![0.5; inner * 5]));
            let b = g.add_const("b", Tensor::f32(vec![5], vec![0.1; 5]));
            let mm = g.add(Op::MatMul, &[x, w], "mm", "mm").unwrap();
            let y = g.add(Op::Binary(Binary::Add), &[mm, b], "y", "y").unwrap();
            let r = g.add(Op::Unary(unary::RELU), &[y], "r", "r").unwrap();
            let s = g
                .add(
                    Op::Reduce {
                        kind: Reduce::Sum,
                        axes: vec![0],
                        keepdims: false,
                    },
                    &[r],
                    "s",
                    "s",
                )
                .unwrap();
            let m = g
                .add(
                    Op::Reduce {
                        kind: Reduce::Max,
                        axes: vec![1],
                        keepdims: false,
                    },
                    &[x],
                    "m",
                    "m",
                )
                .unwrap();
            let sm = g.add(Op::Softmax { axis: 1 }, &[x], "sm", "sm").unwrap();
            let t = g
                .add(Op::Transpose { perm: vec![1, 0] }, &[x], "t", "t")
                .unwrap();
            for (n, id) in [("y", r), ("s", s), ("m", m), ("sm", sm), ("t", t)] {
                g.add_output(n, id);
            }
            let g = g.finish();
            let feeds: BTreeMap<String, Array> = [(
                "x".to_string(),
                Array::new(
                    vec![rows, inner],
                    (0..rows * inner).map(|i| i as f64 * 0.1).collect(),
                ),
            )]
            .into();
            check(&format!("{rows}x{inner}"), &g, &feeds);
        }
    }
}

#[test]
fn empty_dims_inside_the_graph_compile_and_run() {
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![2, 0, 4]);
    let y = g.add_input("y", vec![3, 2]);
    let w = g.add_const("w", Tensor::f32(vec![4, 5], vec![0.25; 20]));
    let mm = g.add(Op::MatMul, &[x, w], "mm", "mm").unwrap();
    let ln_scale = g.add_const("g", Tensor::f32(vec![4], vec![1.0; 4]));
    let ln = g
        .add(
            Op::LayerNorm {
                axis: 2,
                epsilon: 1e-5,
            },
            &[x, ln_scale],
            "ln",
            "ln",
        )
        .unwrap();
    let empty = g
        .add(
            Op::Slice {
                starts: vec![0, 1],
                ends: vec![3, 1],
                steps: vec![1, 1],
            },
            &[y],
            "empty",
            "empty",
        )
        .unwrap();
    let cat = g
        .add(Op::Concat { axis: 1 }, &[empty, y], "cat", "cat")
        .unwrap();
    let ids = g.add_const("ids", Tensor::i64(vec![0], vec![]));
    let rows = g
        .add(Op::Gather { axis: 0 }, &[y, ids], "rows", "rows")
        .unwrap();
    let wide = g
        .add(
            Op::Expand {
                shape: vec![2, 0, 5],
            },
            &[mm],
            "wide",
            "wide",
        )
        .unwrap();
    for (n, id) in [("mm", wide), ("ln", ln), ("cat", cat), ("rows", rows)] {
        g.add_output(n, id);
    }
    let g = g.finish();
    let feeds: BTreeMap<String, Array> = [
        ("x".to_string(), Array::new(vec![2, 0, 4], vec![])),
        (
            "y".to_string(),
            Array::new(vec![3, 2], vec![1.0, -2.0, 0.5, 3.0, -1.0, 2.0]),
        ),
    ]
    .into();
    check("inside", &g, &feeds);
}
