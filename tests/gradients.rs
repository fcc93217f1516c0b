//! Every op's gradient rule against central finite differences of the f64 reference executor,
//! on random inputs (fresh seed each run, printed; DORAC_TEST_SEED replays one). Relative error
//! (max-abs error over max-abs gradient) must stay under 1e-6.

use dorac::ir::{unary, Binary, GraphBuilder, NodeId, Op, Reduce};
use dorac::passes::autodiff::differentiate;
use dorac::reference;
use dorac::tensor::{numel, relative_error, Array, Rng, Tensor};
use std::collections::HashMap;

fn seed() -> u64 {
    std::env::var("DORAC_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// A graph whose inputs are all differentiated: `inputs` (name, shape, lo, hi) feed `build`,
/// which returns the node to test; the loss is sum(out * R) with a random constant R.
struct Case {
    name: String,
    g: GraphBuilder,
    values: HashMap<String, Array>,
    rng: Rng,
    seed: u64,
    /// Graph inputs that are fed but not differentiated (runtime token ids).
    fixed: Vec<NodeId>,
}

impl Case {
    fn new(name: &str) -> Case {
        let seed = seed();
        println!("{name}: seed {seed}");
        Case {
            name: name.into(),
            g: GraphBuilder::new(),
            values: HashMap::new(),
            rng: Rng::new(seed),
            seed,
            fixed: vec![],
        }
    }

    /// A case on an imported ONNX model: every graph input gets random values in [-1, 1].
    fn imported(name: &str, path: &std::path::Path) -> (Case, NodeId) {
        let mut c = Case::new(name);
        let model = dorac::onnx::load_model(path).unwrap();
        let g = dorac::onnx::import(
            &model,
            path.parent().unwrap(),
            &dorac::onnx::ShapePins::default(),
            &HashMap::new(),
        )
        .unwrap();
        for &i in g.inputs() {
            let shape = g.shape(i).to_vec();
            let data = (0..numel(&shape)).map(|_| c.rng.range(-1.0, 1.0)).collect();
            c.values
                .insert(g.node(i).name.clone(), Array::new(shape, data));
        }
        let out = g.outputs()[0].1;
        c.g = GraphBuilder::extending(g);
        (c, out)
    }

    fn input(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> NodeId {
        let data = (0..numel(shape)).map(|_| self.rng.range(lo, hi)).collect();
        self.values
            .insert(name.into(), Array::new(shape.to_vec(), data));
        self.g.add_input(name, shape.to_vec())
    }

    /// A case on an ONNX backend test case of `tests/conformance/`: its first input gets random
    /// values in [-1, 1] and is differentiated; its other inputs (Resize's roi, scales or sizes)
    /// take the case's own values, given at import.
    fn conformance(name: &str) -> (Case, NodeId) {
        let mut c = Case::new(name);
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/conformance")
            .join(name);
        let model = dorac::onnx::load_model(&dir.join("model.onnx")).unwrap();
        let given = dorac::tensors_io::read_safetensors(&dir.join("inputs.safetensors")).unwrap();
        let first = model.graph.as_ref().and_then(|g| g.input.first());
        let x = first.map(|i| i.name().to_string()).unwrap();
        let x = x.as_str();
        let shapes: HashMap<String, Vec<usize>> = (given.iter())
            .map(|(k, v)| (k.clone(), v.shape.clone()))
            .collect();
        let known: HashMap<String, Array> = (given.into_iter()).filter(|(k, _)| k != x).collect();
        let g = dorac::onnx::import_with_values(
            &model,
            &dir,
            &dorac::onnx::ShapePins::default(),
            &shapes,
            &known,
        )
        .unwrap();
        for &i in g.inputs() {
            if let Some(v) = known.get(&g.node(i).name) {
                c.values.insert(g.node(i).name.clone(), v.clone());
                c.fixed.push(i);
            }
        }
        let input = g.inputs().iter().copied().find(|&i| g.node(i).name == x);
        let shape = g.shape(input.unwrap()).to_vec();
        let data = (0..numel(&shape)).map(|_| c.rng.range(-1.0, 1.0)).collect();
        c.values.insert(x.to_string(), Array::new(shape, data));
        let out = g.outputs()[0].1;
        c.g = GraphBuilder::extending(g);
        (c, out)
    }

    /// A graph input with given values that is not differentiated (token ids).
    fn fixed_input(&mut self, name: &str, shape: &[usize], values: Vec<f64>) -> NodeId {
        self.values
            .insert(name.into(), Array::new(shape.to_vec(), values));
        let id = self
            .g
            .add_typed_input(name, shape.to_vec(), dorac::tensor::DType::I64);
        self.fixed.push(id);
        id
    }

    /// Class ids as an input that is not differentiated; the positions in `ignored` hold the
    /// ignore index -100.
    fn labels(&mut self, name: &str, shape: &[usize], classes: usize, ignored: &[usize]) -> NodeId {
        let mut data: Vec<f64> = (0..numel(shape))
            .map(|_| (self.rng.uniform() * classes as f64).floor())
            .collect();
        for &i in ignored {
            data[i] = -100.0;
        }
        let arr = Array::new(shape.to_vec(), data);
        self.g.add_const(name, arr.to_tensor_f32())
    }

    fn op(&mut self, op: Op, ins: &[NodeId]) -> NodeId {
        let n = self.g.petgraph().node_count();
        self.g
            .add(op, ins, &format!("v{n}"), &format!("v{n}"))
            .unwrap()
    }

    fn check(mut self, out: NodeId) {
        let shape = self.g.shape(out).to_vec();
        let r: Vec<f32> = (0..numel(&shape))
            .map(|_| self.rng.range(-1.0, 1.0) as f32)
            .collect();
        let r = self.g.add_const("R", Tensor::f32(shape, r));
        let weighted = self.op(Op::Binary(Binary::Mul), &[out, r]);
        let rank = self.g.shape(weighted).len();
        let loss = self.op(
            Op::Reduce {
                kind: Reduce::Sum,
                axes: (0..rank).collect(),
                keepdims: false,
            },
            &[weighted],
        );
        self.g.add_output("loss", loss);
        let params: Vec<NodeId> = self
            .g
            .inputs()
            .iter()
            .copied()
            .filter(|i| !self.fixed.contains(i))
            .collect();
        let mut graph = std::mem::take(&mut self.g).finish();
        let grads = differentiate(&mut graph, loss, &params).unwrap();
        let values = reference::run_all(&graph, &self.values).unwrap();
        let loss_at =
            |vals: &HashMap<String, Array>| reference::run(&graph, vals).unwrap()["loss"].data[0];
        for (&p, &gnode) in params.iter().zip(&grads) {
            let name = graph.node(p).name.clone();
            let analytic = &values[&gnode].data;
            let h = 1e-6;
            let mut numeric = vec![];
            for i in 0..analytic.len() {
                let mut plus = self.values.clone();
                plus.get_mut(&name).unwrap().data[i] += h;
                let mut minus = self.values.clone();
                minus.get_mut(&name).unwrap().data[i] -= h;
                numeric.push((loss_at(&plus) - loss_at(&minus)) / (2.0 * h));
            }
            let e = relative_error(analytic, &numeric);
            println!("  {} d/d{name}: rel err {e:.2e}", self.name);
            assert!(
                e < 1e-6,
                "{} d/d{name}: {e:e} (seed {})",
                self.name,
                self.seed
            );
        }
    }
}

#[test]
fn unary_rules() {
    // Every differentiable function, on its sample range.
    let unaries = unary::ALL.iter().filter(|u| !u.is_predicate()).map(|&u| {
        let (lo, hi) = u.def().sample_range;
        (u, lo, hi)
    });
    for (u, lo, hi) in unaries {
        let mut c = Case::new(&format!("{u:?}"));
        let x = c.input("x", &[3, 4], lo, hi);
        let y = c.op(Op::Unary(u), &[x]);
        c.check(y);
    }
}

#[test]
fn binary_rules_with_broadcasting() {
    let ops = [
        Binary::Add,
        Binary::Sub,
        Binary::Mul,
        Binary::Div,
        Binary::Pow,
    ];
    let shapes: [(&[usize], &[usize]); 4] = [
        (&[3, 4], &[3, 4]),
        (&[3, 4], &[4]),
        (&[2, 3, 1], &[3, 4]),
        (&[], &[2, 3]),
    ];
    for op in ops {
        for (sa, sb) in shapes {
            let mut c = Case::new(&format!("{op:?} {sa:?} {sb:?}"));
            let a = c.input("a", sa, 0.5, 2.0);
            let b = c.input("b", sb, 0.5, 2.0);
            let y = c.op(Op::Binary(op), &[a, b]);
            c.check(y);
        }
    }
    // Mod and Fmod, with quotients in (2, 3): away from the jumps at integer quotients.
    for op in [Binary::Mod, Binary::Fmod] {
        let mut c = Case::new(&format!("{op:?}"));
        let a = c.input("a", &[3, 4], 2.2, 2.8);
        let b = c.input("b", &[4], 0.95, 1.05);
        let y = c.op(Op::Binary(op), &[a, b]);
        c.check(y);
    }
}

#[test]
fn matmul_and_gemm_rules() {
    let cases: [(&[usize], &[usize]); 5] = [
        (&[3, 4], &[4, 5]),
        (&[2, 3, 4], &[4, 5]),
        (&[2, 1, 3, 4], &[3, 4, 2]),
        (&[4], &[4, 3]),
        (&[3, 4], &[4]),
    ];
    for (sa, sb) in cases {
        let mut c = Case::new(&format!("matmul {sa:?} {sb:?}"));
        let a = c.input("a", sa, -1.0, 1.0);
        let b = c.input("b", sb, -1.0, 1.0);
        let y = c.op(Op::MatMul, &[a, b]);
        c.check(y);
    }
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            let mut c = Case::new(&format!("gemm ta={trans_a} tb={trans_b}"));
            let a = c.input("a", if trans_a { &[4, 3] } else { &[3, 4] }, -1.0, 1.0);
            let b = c.input("b", if trans_b { &[5, 4] } else { &[4, 5] }, -1.0, 1.0);
            let bias = c.input("c", &[5], -1.0, 1.0);
            let y = c.op(
                Op::Gemm {
                    alpha: 0.7,
                    beta: 1.3,
                    trans_a,
                    trans_b,
                },
                &[a, b, bias],
            );
            c.check(y);
        }
    }
}

#[test]
fn shape_and_reduction_rules() {
    let mut c = Case::new("transpose");
    let x = c.input("x", &[2, 3, 4], -1.0, 1.0);
    let y = c.op(
        Op::Transpose {
            perm: vec![2, 0, 1],
        },
        &[x],
    );
    c.check(y);
    let mut c = Case::new("reshape");
    let x = c.input("x", &[2, 3, 4], -1.0, 1.0);
    let y = c.op(Op::Reshape { shape: vec![6, 4] }, &[x]);
    c.check(y);
    let mut c = Case::new("expand");
    let x = c.input("x", &[3, 1], -1.0, 1.0);
    let y = c.op(
        Op::Expand {
            shape: vec![2, 3, 4],
        },
        &[x],
    );
    c.check(y);
    for kind in [Reduce::Sum, Reduce::SumSquare, Reduce::Max, Reduce::Min] {
        for (axes, keepdims) in [(vec![0], false), (vec![1, 2], true), (vec![2], false)] {
            let mut c = Case::new(&format!("{kind:?} {axes:?} {keepdims}"));
            let x = c.input("x", &[2, 3, 4], -1.0, 1.0);
            let y = c.op(
                Op::Reduce {
                    kind,
                    axes,
                    keepdims,
                },
                &[x],
            );
            c.check(y);
        }
    }
    let mut c = Case::new("identity");
    let x = c.input("x", &[3], -1.0, 1.0);
    let i = c.op(Op::Identity, &[x]);
    let y = c.op(Op::Binary(Binary::Mul), &[i, x]);
    c.check(y);
}

#[test]
fn normalisation_rules() {
    for axis in [0, 1, 2] {
        let mut c = Case::new(&format!("softmax axis {axis}"));
        let x = c.input("x", &[2, 3, 4], -2.0, 2.0);
        let y = c.op(Op::Softmax { axis }, &[x]);
        c.check(y);
    }
    for (axis, bias) in [(2, true), (1, false)] {
        let mut c = Case::new(&format!("layer_norm axis {axis} bias {bias}"));
        let x = c.input("x", &[2, 3, 4], -2.0, 2.0);
        let norm = if axis == 2 { vec![4] } else { vec![3, 4] };
        let scale = c.input("scale", &norm, 0.5, 1.5);
        let mut ins = vec![x, scale];
        if bias {
            ins.push(c.input("bias", &norm, -1.0, 1.0));
        }
        let y = c.op(
            Op::LayerNorm {
                axis,
                epsilon: 1e-5,
            },
            &ins,
        );
        c.check(y);
    }
}

/// DoRA's fused norm: gradients for A and B (W is a frozen constant), in both weight
/// orientations, with a Gemm alpha and with rsLoRA-like scales.
#[test]
fn dora_norm_rule() {
    for (out_in, alpha, scale) in [(false, 1.0f32, 2.0f32), (true, 0.5, 0.7)] {
        let mut c = Case::new(&format!("dora_norm_sq out_in {out_in}"));
        let (fin, fout, r) = (5, 4, 3);
        let shape = if out_in { [fout, fin] } else { [fin, fout] };
        let w: Vec<f32> = (0..fin * fout)
            .map(|_| c.rng.range(-1.0, 1.0) as f32)
            .collect();
        let w = c.g.add_const("w", Tensor::f32(shape.to_vec(), w));
        let a = c.input("a", &[r, fin], -1.0, 1.0);
        let b = c.input("b", &[fout, r], -1.0, 1.0);
        let op = Op::DoraNormSq(dorac::ops::DoraNorm {
            alpha,
            scale,
            weight_out_in: out_in,
        });
        let y = c.op(op, &[w, a, b]);
        c.check(y);
    }
}

#[test]
fn cross_entropy_rules() {
    for shift in [false, true] {
        let mut c = Case::new(&format!("cross_entropy shift {shift}"));
        let logits = c.input("logits", &[2, 4, 5], -2.0, 2.0);
        // One ignored position.
        let labels = c.labels("labels", &[2, 4], 5, &[2]);
        let y = c.op(
            Op::SoftmaxCrossEntropy {
                ignore_index: -100,
                shift,
            },
            &[logits, labels],
        );
        c.check(y);
    }
}

#[test]
fn stop_gradient_blocks_the_path() {
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![3]);
    let s = g.add(Op::StopGradient, &[x], "s", "s").unwrap();
    let y = g.add(Op::Binary(Binary::Mul), &[x, s], "y", "y").unwrap();
    let loss = g
        .add(
            Op::Reduce {
                kind: Reduce::Sum,
                axes: vec![0],
                keepdims: false,
            },
            &[y],
            "loss",
            "loss",
        )
        .unwrap();
    g.add_output("loss", loss);
    let mut g = g.finish();
    let grads = differentiate(&mut g, loss, &[x]).unwrap();
    let xs = Array::new(vec![3], vec![1.0, -2.0, 3.0]);
    let vals = reference::run_all(&g, &[("x".to_string(), xs.clone())].into()).unwrap();
    // d(x * sg(x))/dx = sg(x) = x, not 2x.
    assert_eq!(vals[&grads[0]].data, xs.data);
}

#[test]
fn transformer_op_rules() {
    for op in [Binary::Max, Binary::Min] {
        for (sa, sb) in [(&[3usize, 4][..], &[3usize, 4][..]), (&[3, 4], &[4])] {
            let mut c = Case::new(&format!("{op:?} {sa:?} {sb:?}"));
            let a = c.input("a", sa, -1.0, 1.0);
            let b = c.input("b", sb, -1.0, 1.0);
            let y = c.op(Op::Binary(op), &[a, b]);
            c.check(y);
        }
    }
    let mut c = Case::new("where");
    let cond: Vec<bool> = (0..12).map(|i| i % 3 != 0).collect();
    let cond = c.g.add_const("cond", Tensor::bool(vec![3, 4], cond));
    let x = c.input("x", &[3, 4], -1.0, 1.0);
    let y = c.input("y", &[4], -1.0, 1.0);
    let w = c.op(Op::Where, &[cond, x, y]);
    c.check(w);
    let mut c = Case::new("slice and concat");
    let x = c.input("x", &[4, 6], -1.0, 1.0);
    let s1 = c.op(
        Op::Slice {
            starts: vec![1, 2],
            ends: vec![3, 5],
            steps: vec![1, 1],
        },
        &[x],
    );
    let s2 = c.op(
        Op::Slice {
            starts: vec![0, 0],
            ends: vec![2, 6],
            steps: vec![1, 1],
        },
        &[x],
    );
    let z = c.input("z", &[2, 4], -1.0, 1.0);
    let y = c.op(Op::Concat { axis: 1 }, &[s1, s2, z]);
    c.check(y);
    // Strided windows, as exporters write them: GPT-J's rotary embedding takes every second
    // feature (`x[..., ::2]`, `x[..., 1::2]`), Swin's patch merging every second row and column
    // (`x[:, 0::2, 1::2]`), `torch.flip` a step of -1 over a whole axis.
    let strided = [
        ("every second column", [0, 0], [5, 7], [1, 2]),
        ("every second column from 1", [0, 1], [5, 7], [1, 2]),
        (
            "every third row from 1, ending short of the edge",
            [1, 0],
            [5, 7],
            [3, 1],
        ),
        ("reversed rows", [4, 0], [-1, 7], [-1, 1]),
        ("every second column, descending", [0, 5], [5, -1], [1, -2]),
        ("every second row and column", [0, 1], [5, 7], [2, 2]),
    ];
    for (what, starts, ends, steps) in strided {
        let mut c = Case::new(&format!("slice: {what}"));
        let x = c.input("x", &[5, 7], -1.0, 1.0);
        let y = c.op(
            Op::Slice {
                starts: starts.to_vec(),
                ends: ends.to_vec(),
                steps: steps.to_vec(),
            },
            &[x],
        );
        c.check(y);
    }
    let mut c = Case::new("trilu and cast");
    let x = c.input("x", &[2, 4, 4], -1.0, 1.0);
    let t = c.op(Op::Trilu { upper: false, k: 0 }, &[x]);
    let y = c.op(
        Op::Cast {
            to: dorac::tensor::DType::F32,
        },
        &[t],
    );
    c.check(y);
    // Comparisons pass no gradient, but the value they select through Where does.
    let mut c = Case::new("masked");
    let x = c.input("x", &[3, 4], -1.0, 1.0);
    let zero = c.g.add_const("zero", Tensor::scalar(0.0));
    let mask = c.op(Op::Binary(Binary::Less), &[zero, x]);
    let y = c.op(Op::Where, &[mask, x, zero]);
    c.check(y);
}

/// Gather with constant indices (repeated, negative and out-of-range ids) passes its cotangent
/// back to the data; Conv, lowered to such a Gather and a MatMul, gets gradients for its input
/// and its filter bank.
#[test]
fn gather_and_conv_rules() {
    for axis in [0, 1] {
        let mut c = Case::new(&format!("gather with constant indices, axis {axis}"));
        let x = c.input("x", &[4, 5], -1.0, 1.0);
        let ids =
            c.g.add_const("ids", Tensor::i64(vec![2, 3], vec![0, 3, 3, -1, 9, 1]));
        let y = c.op(Op::Gather { axis }, &[x, ids]);
        c.check(y);
    }
    // Runtime ids (an embedding lookup): repeated, negative and out-of-range ids.
    let mut c = Case::new("gather with runtime ids");
    let x = c.input("table", &[6, 2, 3], -1.0, 1.0);
    let ids = c.fixed_input("ids", &[2, 3], vec![0.0, 5.0, 5.0, -2.0, 9.0, 2.0]);
    let y = c.op(Op::Gather { axis: 0 }, &[x, ids]);
    c.check(y);
    // Resize, lowered to products with interpolation weights (or gathers, for nearest), and
    // pooling, lowered to gathers of windows and reductions.
    for name in [
        "test_resize_upsample_scales_linear",
        "test_resize_downsample_scales_cubic_antialias",
        "test_resize_upsample_sizes_nearest_axes_2_3",
        "test_resize_tf_crop_and_resize_extrapolation_value",
        "test_averagepool_2d_precomputed_pads_count_include_pad",
        "test_averagepool_2d_ceil_last_window_starts_on_pad",
        "test_maxpool_2d_precomputed_pads",
        "test_maxpool_2d_dilations",
    ] {
        let (c, y) = Case::conformance(name);
        c.check(y);
    }
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/conv");
    for name in [
        "conv2d_strides_dilations",
        "conv2d_groups",
        "conv1d",
        "conv2d_filter_input",
    ] {
        let (c, y) = Case::imported(name, &dir.join(format!("{name}.onnx")));
        c.check(y);
    }
}
