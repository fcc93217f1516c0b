//! How building a training step grows with depth: GPT-2 small (width 768, 12 heads) cut to 1, 2,
//! 4 and 8 blocks, DoRA on every `c_attn`, rank 16. For each depth it prints the forward graph's
//! node count, the time autodiff takes to build the backward pass (one patch), the time the
//! whole step build takes (`train::build`: loss, autodiff, AdamW, transpose simplification,
//! constant folding), and both per forward node. Building is linear when the per-node times stay
//! flat as the depth grows.
//!
//! The models are too large to commit (340-540 MB each); make them with
//!
//!     for n in 1 2 4 8; do python models/make_gpt2_small.py DIR/$n --layers $n; done
//!
//! then `DORAC_GPT2_LAYERS=DIR cargo bench --bench autodiff`. No GPU is needed.

mod common;

use dorac::ir::{Graph, Method, NodeId, Patch};
use dorac::passes::{autodiff::differentiate, fuse_dora_norms, AdapterSpec};
use dorac::passes::{find_linear_layers, insert_adapters, matches_target, AdapterInit};
use dorac::train::{build, loss, AdamW, BuildOptions, LossKind, TrainMethod};
use std::path::Path;
use std::time::Instant;

const DEPTHS: [usize; 4] = [1, 2, 4, 8];
const LM: LossKind = LossKind::Lm { ignore_index: -100 };

fn main() {
    let Ok(dir) = std::env::var("DORAC_GPT2_LAYERS") else {
        println!(
            "set DORAC_GPT2_LAYERS to a folder holding 1/, 2/, 4/ and 8/ made by \
             models/make_gpt2_small.py (see benches/autodiff.rs); nothing measured"
        );
        return;
    };
    let iters = common::env("DORAC_BENCH_ITERS", 3);
    println!("GPT-2 small blocks, DoRA rank 16 on c_attn; median of {iters} builds\n");
    println!(
        "{:>6} {:>7} {:>9} {:>12} {:>14} {:>12} {:>14}",
        "blocks", "nodes", "backward", "autodiff ms", "autodiff us/n", "step ms", "step us/n"
    );
    for depth in DEPTHS {
        let path = Path::new(&dir)
            .join(depth.to_string())
            .join("legacy_op17.onnx");
        let graph = adapted(&path);
        let nodes = graph.node_count();
        let mut autodiff = vec![];
        let mut step = vec![];
        let mut backward = 0;
        for _ in 0..iters {
            let (mut g, loss, params) = with_loss(&graph);
            let before = g.node_count();
            let t = Instant::now();
            differentiate(&mut g, loss, &params).unwrap();
            autodiff.push(t.elapsed().as_secs_f64() * 1e3);
            backward = g.node_count() - before;
            let t = Instant::now();
            build(graph.clone(), &options()).unwrap();
            step.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (a, s) = (median(autodiff), median(step));
        println!(
            "{depth:>6} {nodes:>7} {backward:>9} {a:>12.1} {:>14.2} {s:>12.1} {:>14.2}",
            a * 1e3 / nodes as f64,
            s * 1e3 / nodes as f64
        );
    }
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn options() -> BuildOptions {
    BuildOptions {
        method: TrainMethod::Dora,
        loss: LM,
        output: None,
        labels: "labels".into(),
        optimizer: AdamW::default(),
        exact_norm_grad: false,
        expose_grads: false,
        full_targets: None,
        lean_activations: false,
    }
}

/// The model with a DoRA adapter on every `c_attn`.
fn adapted(path: &Path) -> Graph {
    let proto = dorac::onnx::load_model(path).unwrap();
    let mut g = dorac::onnx::import(
        &proto,
        path.parent().unwrap(),
        &dorac::onnx::ShapePins::default(),
        &Default::default(),
    )
    .unwrap();
    let specs: Vec<AdapterSpec> = find_linear_layers(&g)
        .into_iter()
        .filter(|l| matches_target(&l.module, "c_attn"))
        .map(|layer| AdapterSpec {
            layer,
            method: Method::Dora,
            rank: 16,
            alpha: 32.0,
            rslora: false,
            init: AdapterInit::Peft { seed: 0 },
        })
        .collect();
    insert_adapters(&mut g, specs).unwrap();
    g
}

/// What autodiff starts from in a step build: adapter tensors as inputs, the fused norm, the
/// LM loss on the logits.
fn with_loss(graph: &Graph) -> (Graph, NodeId, Vec<NodeId>) {
    let mut g = graph.clone();
    let mut p = Patch::new(&g);
    let mut params = vec![];
    for a in g.adapters() {
        for n in [Some(a.lora_a), Some(a.lora_b), a.magnitude]
            .into_iter()
            .flatten()
        {
            p.promote_to_input(n).unwrap();
            params.push(n);
        }
    }
    g.apply(p.finish());
    fuse_dora_norms(&mut g).unwrap();
    let logits = g.outputs()[0].1;
    let mut p = Patch::new(&g);
    let (_, l) = loss::append(&mut p, LM, logits, "labels").unwrap();
    p.set_outputs(vec![("loss".into(), l)]);
    let loss = g.apply(p.finish()).id(l);
    (g, loss, params)
}
