//! Constants larger than one device binding, split at their readers
//! (`passes::split_large_constants`): forced here with a small byte limit, the split graph
//! computes what the whole one does, on the reference executor and the GPU, for an embedding
//! Gather (negative and out-of-range ids too), a MatMul with the constant on either side, a Gemm
//! with transposed weight and bias, and the whole tiny GPT-2 (tied embedding and LM head)
//! against onnxruntime. GPT-2 small itself (154 MB embedding over lavapipe's 128 MiB binding) is
//! checked by `scripts/check-gpt2-small.sh`, not here: its files are 650 MB.

mod common;

use common::*;
use dorac::ir::{BlockCodes, BlockFormat, Graph, GraphBuilder, Op, Patch, Stored};
use dorac::passes::split_large_constants;
use dorac::tensor::{numel, Array, Rng, Tensor};
use std::collections::BTreeMap;

fn random(rng: &mut Rng, shape: &[usize]) -> Tensor {
    Tensor::f32(
        shape.to_vec(),
        (0..numel(shape))
            .map(|_| rng.range(-1.0, 1.0) as f32)
            .collect(),
    )
}

/// Splits `g` with `limit` bytes per binding and checks that outputs do not change.
fn check(tag: &str, g: &Graph, inputs: &BTreeMap<String, Array>, limit: u64, rewritten: usize) {
    let want = run_reference(g, inputs);
    let mut s = g.clone();
    assert_eq!(
        split_large_constants(&mut s, limit).unwrap(),
        rewritten,
        "{tag}"
    );
    let biggest = s
        .petgraph()
        .node_weights()
        .filter(|n| matches!(n.op, Op::Const(_)))
        .map(|n| 4 * numel(&n.shape) as u64)
        .max()
        .unwrap();
    assert!(biggest <= limit, "{tag}: a {biggest}-byte constant is left");
    for (how, got) in [
        ("reference", run_reference(&s, inputs)),
        ("gpu", run_gpu(&s, inputs)),
    ] {
        for (k, w) in &want {
            assert_eq!(got[k].shape, w.shape, "{tag} {how} {k}");
            let e = dorac::tensor::relative_error(&got[k].data, &w.data);
            assert!(e < 1e-6, "{tag} {how} {k}: {e:e}");
        }
    }
}

#[test]
fn split_readers_compute_what_the_whole_constant_does() {
    let mut rng = Rng::new(17);
    // Embedding [50, 8] (1600 bytes) in chunks of 12 rows (limit 400 bytes): 5 chunks.
    let mut g = GraphBuilder::new();
    let table = g.add_const("wte", random(&mut rng, &[50, 8]));
    let ids = g.add_const(
        "ids",
        Tensor::i64(vec![2, 4], vec![0, 49, 13, -1, 24, 25, 60, -50]),
    );
    let y = g
        .add(Op::Gather { axis: 0 }, &[table, ids], "y", "y")
        .unwrap();
    g.add_output("y", y);
    check("gather", &g, &BTreeMap::new(), 400, 1);

    // x @ W with W [8, 30] split by columns; W [30, 8] @ x split by rows.
    for (left, tag) in [(false, "matmul right"), (true, "matmul left")] {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![3, 8]);
        let (w, ins) = if left {
            let w = g.add_const("w", random(&mut rng, &[30, 3]));
            (w, [w, x])
        } else {
            let w = g.add_const("w", random(&mut rng, &[8, 30]));
            (w, [x, w])
        };
        let _ = w;
        let y = g.add(Op::MatMul, &ins, "y", "y").unwrap();
        g.add_output("y", y);
        let xv = Array::new(
            vec![3, 8],
            (0..24).map(|i| (i as f64 * 0.37).sin()).collect(),
        );
        check(tag, &g, &[("x".into(), xv)].into(), 256, 1);
    }

    // Gemm with W [30, 8] transposed and a bias of 30.
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![3, 8]);
    let w = g.add_const("w", random(&mut rng, &[30, 8]));
    let b = g.add_const("b", random(&mut rng, &[30]));
    let op = Op::Gemm {
        alpha: 0.5,
        beta: 2.0,
        trans_a: false,
        trans_b: true,
    };
    let y = g.add(op, &[x, w, b], "y", "y").unwrap();
    g.add_output("y", y);
    let xv = Array::new(
        vec![3, 8],
        (0..24).map(|i| (i as f64 * 0.11).cos()).collect(),
    );
    check("gemm", &g, &[("x".into(), xv)].into(), 256, 1);
}

#[test]
fn tiny_gpt2_split_matches_onnxruntime() {
    let inputs = read("gpt2_tiny", "inputs.safetensors");
    let ort = read("gpt2_tiny", "legacy_op17.ort.safetensors");
    let mut g = load_path(&models_dir().join("gpt2_tiny/legacy_op17.onnx"), &inputs);
    dorac::passes::fold_constants(&mut g, &Default::default()).unwrap();
    // wte is 256 x 32 f32 (32 KiB): a 12 KiB limit cuts it (and the LM head) in three.
    let n = split_large_constants(&mut g, 12 * 1024).unwrap();
    assert!(n >= 2, "{n} readers split");
    let e = rel(&run_gpu(&g, &inputs), &ort, "logits");
    assert!(e < 1e-4, "split tiny GPT-2 vs onnxruntime {e:e}");
}

/// A reader with no split form is refused with the tensor's name.
#[test]
fn unsplittable_readers_are_named() {
    let mut g = GraphBuilder::new();
    let w = g.add_const("big", Tensor::f32(vec![100], vec![1.0; 100]));
    let y = g
        .add(Op::Unary(dorac::ir::unary::EXP), &[w], "y", "/exp")
        .unwrap();
    g.add_output("y", y);
    let mut g = g.finish();
    let err = split_large_constants(&mut g, 64).unwrap_err().to_string();
    assert!(err.contains("'big'") && err.contains("'/exp'"), "{err}");
}

/// A trainable tensor over the binding limit (forced small here) is trained as chunks: one step
/// gives, reassembled, the gradient of central finite differences of the f64 reference loss and
/// the update of AdamW's first step written out by hand (PyTorch's: `p (1 - lr wd) - lr g / (|g| +
/// eps)`), for Gemm/MatMul weights (mlp2d) and an embedding table read by a Gather (embednet).
#[test]
fn oversized_trainable_tensors_train_in_chunks() {
    use dorac::train::{
        build_for_device, loss, AdamW, BuildOptions, LossKind, Session, TrainMethod,
    };
    for (model, targets, limit) in [
        ("mlp2d", None, 256),
        (
            "embednet",
            Some(vec!["embed".to_string(), "fc".to_string()]),
            400,
        ),
    ] {
        let mut data = read(model, "train/data.safetensors");
        data.retain(|k, _| k == "x" || k == "target");
        let mut proto =
            dorac::onnx::load_model(&models_dir().join(model).join("model.onnx")).unwrap();
        dorac::onnx::set_batch_dim(&mut proto, data["x"].shape[0]);
        let g = dorac::onnx::import(
            &proto,
            &models_dir(),
            &dorac::onnx::ShapePins::default(),
            &Default::default(),
        )
        .unwrap();
        let opts = BuildOptions {
            full_targets: targets,
            lean_activations: true, // as `dorac train` does
            expose_grads: true,
            ..mse_options(TrainMethod::Full)
        };
        // The loss of the unsplit model, on the reference executor, for finite differences.
        let mut lossg = g.clone();
        let out = lossg.outputs()[0].1;
        let mut p = Patch::new(&lossg);
        let (_, l) = loss::append(&mut p, LossKind::Mse, out, "target").unwrap();
        p.set_outputs(vec![("loss".into(), l)]);
        lossg.apply(p.finish());
        let feed: std::collections::HashMap<String, Array> = data.clone().into_iter().collect();
        // The weight becomes an f64 input, so the perturbations are not rounded to f32.
        let loss_with = |name: &str, i: usize, delta: f64| {
            let mut g = lossg.clone();
            let id = g.find_by_name(name).unwrap();
            let mut t = g.const_tensor(id).unwrap().to_array();
            t.data[i] += delta;
            let mut p = Patch::new(&g);
            p.promote_to_input(id).unwrap();
            g.apply(p.finish());
            let mut feed = feed.clone();
            feed.insert(name.to_string(), t);
            dorac::reference::run(&g, &feed).unwrap()["loss"].data[0]
        };
        for on_gpu in [false, true] {
            let split = build_for_device(g.clone(), &opts, Some(limit)).unwrap();
            let chunked = split.params.iter().filter(|p| p.part_of.is_some()).count();
            assert!(chunked >= 2, "{model}: {chunked} chunks");
            let tag = format!("{model} ({})", if on_gpu { "gpu" } else { "reference" });
            let params = split.params.clone();
            let initial = |name: &str| {
                lossg
                    .const_tensor(lossg.find_by_name(name).unwrap())
                    .unwrap()
                    .to_array()
            };
            let mut session = Session::new(split, on_gpu.then(gpu)).unwrap();
            let fetch: Vec<&str> = params.iter().map(|p| p.grad_output.as_str()).collect();
            let (_, grads) = session.step(&data, 1e-2, &fetch).unwrap();
            let after = session.params().unwrap();
            // Each whole tensor's gradient, from its chunks' gradients.
            let mut whole: BTreeMap<String, Vec<(usize, usize, Array)>> = BTreeMap::new();
            for p in &params {
                let (name, axis, start) =
                    p.part_of.clone().unwrap_or_else(|| (p.name.clone(), 0, 0));
                whole
                    .entry(name)
                    .or_default()
                    .push((axis, start, grads[&p.grad_output].clone()));
            }
            let opt = AdamW::default();
            for (name, mut parts) in whole {
                parts.sort_by_key(|p| p.1);
                let axis = parts[0].0;
                let tensors: Vec<Tensor> = parts.iter().map(|p| p.2.to_tensor_f32()).collect();
                let grad = Tensor::concat_axis(&tensors, axis).to_array();
                let p0 = initial(&name);
                assert_eq!(grad.shape, p0.shape, "{tag} {name}");
                // Every 7th element: enough to cover every chunk, cheap enough for f64 runs.
                let picked: Vec<usize> = (0..p0.data.len()).step_by(7).collect();
                let h = 1e-6;
                let fd: Vec<f64> = picked
                    .iter()
                    .map(|&i| (loss_with(&name, i, h) - loss_with(&name, i, -h)) / (2.0 * h))
                    .collect();
                let got: Vec<f64> = picked.iter().map(|&i| grad.data[i]).collect();
                let e = dorac::tensor::relative_error(&got, &fd);
                assert!(
                    e < 1e-4,
                    "{tag} {name}: gradient vs finite differences {e:e}"
                );
                // AdamW's first step, where the gradient is clearly away from 0 (near 0 the
                // update is g / (|g| + eps), whose sign f32 rounding may flip).
                let big = fd.iter().fold(0.0f64, |m, v| m.max(v.abs())) * 1e-3;
                let stepped = after[&name].to_f64();
                for (&i, &g) in picked.iter().zip(&fd) {
                    if g.abs() < big {
                        continue;
                    }
                    let want = p0.data[i] * (1.0 - 1e-2 * opt.weight_decay)
                        - 1e-2 * g / (g.abs() + opt.eps);
                    let have = stepped[i];
                    assert!(
                        (have - want).abs() <= 1e-5 * want.abs().max(1e-2),
                        "{tag} {name}[{i}]: {have} after the step, AdamW gives {want}"
                    );
                }
            }
        }
    }
}

/// A random block-quantized constant of `shape` (4-bit codes, blocks of 16, a zero point a
/// block), its lines down its columns or along its rows, marked to keep its codes.
fn blocked(g: &mut GraphBuilder, rng: &mut Rng, name: &str, shape: [usize; 2], down: bool) {
    let (lines, line_len) = if down {
        (shape[1], shape[0])
    } else {
        (shape[0], shape[1])
    };
    let blocks = line_len.div_ceil(16);
    let format = BlockFormat::new(&shape, 4, 16, down, blocks * 16, blocks, true).unwrap();
    let per_block = || 0..lines * blocks;
    let codes = BlockCodes {
        format,
        codes: (0..format.code_bytes())
            .map(|_| rng.range(0.0, 256.0) as u8)
            .collect(),
        scales: per_block().map(|_| rng.range(-0.5, 0.5) as f32).collect(),
        zeros: per_block()
            .map(|_| rng.range(0.0, 16.0).floor() as f32)
            .collect(),
    };
    let values = (0..shape[0] * shape[1]).map(|i| codes.value(i)).collect();
    let n = g.add_const(name, Tensor::f32(shape.to_vec(), values));
    g.mark_blocked(n, codes);
}

/// Chunks of a constant that keeps its block-quantized codes keep theirs where the cut runs
/// across its lines (a weight's columns, a table's rows): each chunk's codes decode to its
/// values, the planner stores them as codes, and the split graph computes what the whole
/// constant does.
#[test]
fn chunks_keep_block_codes() {
    let mut rng = Rng::new(29);
    let mut g = GraphBuilder::new();
    let x = g.add_input("x", vec![3, 40]);
    blocked(&mut g, &mut rng, "w", [40, 30], true);
    blocked(&mut g, &mut rng, "wte", [50, 40], false);
    let (w, table) = (g.find_by_name("w").unwrap(), g.find_by_name("wte").unwrap());
    let y = g.add(Op::MatMul, &[x, w], "y", "y").unwrap();
    g.add_output("y", y);
    let ids = g.add_const("ids", Tensor::i64(vec![4], vec![0, 49, 13, 60]));
    let e = g
        .add(Op::Gather { axis: 0 }, &[table, ids], "e", "e")
        .unwrap();
    g.add_output("e", e);
    // The table read transposed too (a tied LM head): the split computes the transposed codes.
    let perm = Op::Transpose { perm: vec![1, 0] };
    let t = g.add(perm, &[table], "wte_t", "wte_t").unwrap();
    let logits = g.add(Op::MatMul, &[x, t], "logits", "logits").unwrap();
    g.add_output("logits", logits);
    let xv = Array::new(
        vec![3, 40],
        (0..120).map(|i| (i as f64 * 0.37).sin()).collect(),
    );
    check("blocked", &g, &[("x".into(), xv)].into(), 2048, 3);

    let mut s: Graph = g.clone();
    split_large_constants(&mut s, 2048).unwrap();
    let chunks: Vec<_> = (s.blocked().iter())
        .map(|(&n, codes)| (n, s.const_tensor(n).unwrap(), codes))
        .collect();
    assert_eq!(
        chunks.len(),
        3 + 5 + 5,
        "w in 3 chunks of 12 columns, wte in 5 of 12 rows, its transpose in 5 of 12 columns"
    );
    // Each chunk's codes decode to its part of the whole constant (read from the unsplit graph):
    // columns of w and of wte's transpose, rows of wte.
    let whole = |name: &str| {
        let n = g.find_by_name(name).unwrap();
        g.const_tensor(n).unwrap().to_f32()
    };
    let (w_all, wte_all) = (whole("w"), whole("wte"));
    for (n, t, codes) in &chunks {
        let name = &s.node(*n).name;
        let (source, start) = name.rsplit_once("/rows_").unwrap();
        let start: usize = start.parse().unwrap();
        let [rows, cols] = [t.shape[0], t.shape[1]];
        let want: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                match source {
                    "w" => w_all[r * 30 + start + c],
                    "wte" => wte_all[(start + r) * 40 + c],
                    _ => wte_all[(start + c) * 40 + r],
                }
            })
            .collect();
        assert!(codes.decodes_to(&want), "{name}");
    }
    let plan = dorac::codegen::plan(&s).unwrap();
    let stored = (plan.buffers.iter()).filter(|b| matches!(b.stored, Some(Stored::Blocks(_))));
    assert_eq!(stored.count(), 13);
}
