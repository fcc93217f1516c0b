//! Transformer models as PyTorch's exporters write them (models/bert_tiny, models/gpt2_tiny, the
//! decoders of make_decoders.py, and DistilBERT, the T5 encoder and ViT of make_encoders.py: legacy
//! TorchScript exporter at opsets 14 and 17, with static and with dynamic shapes, and the
//! torch.export-based exporter at opset 18 or 20, plus BERT with external data). Every variant
//! must import with the shapes of `inputs.safetensors` (int64 token ids and masks, given as float
//! values; ViT's pixel values), run on the GPU and on the reference executor, and match onnxruntime's output
//! (`<variant>.ort.safetensors`) at 1e-4 relative. Shape computations must be gone by then: no
//! kernel of the compiled plan computes from constants only, and the dynamic variant computes the
//! same nodes as the static one. Each imported variant also survives export and import.

mod common;

use common::*;
use dorac::codegen::{self, Plan};
use dorac::ir::{Graph, NodeId, Op};
use dorac::tensor::Array;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-4;
const MODELS: [&str; 11] = [
    "bert_tiny",
    "gpt2_tiny",
    "llama_tiny",
    "qwen2_tiny",
    "mistral_tiny",
    "phi3_tiny",
    "gemma_tiny",
    "gpt_neox_tiny",
    "distilbert_tiny",
    "t5_encoder_tiny",
    "vit_tiny",
];

/// Every `.onnx` of a model folder (and of its `external/` subfolder, when there is one), with
/// the onnxruntime golden of each: `<variant>.ort.safetensors` next to it, or for
/// `external/model.onnx` (legacy_op17 re-saved with external data) legacy_op17's.
fn variants(model: &str) -> Vec<(PathBuf, PathBuf)> {
    let dir = models_dir().join(model);
    let mut out = vec![];
    for folder in [dir.clone(), dir.join("external")] {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
            .collect();
        files.sort();
        for f in files {
            let stem = f.file_stem().unwrap().to_string_lossy().to_string();
            let own = f.with_file_name(format!("{stem}.ort.safetensors"));
            let golden = if own.exists() {
                own
            } else {
                dir.join("legacy_op17.ort.safetensors")
            };
            out.push((f, golden));
        }
    }
    assert!(
        !out.is_empty(),
        "no .onnx models in {} (run models/make_transformers.py)",
        dir.display()
    );
    out
}

fn short(path: &Path) -> String {
    let models = models_dir();
    path.strip_prefix(&models)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Imports a variant with its inputs' shapes and folds constants, as `dorac run` does.
fn prepare(path: &Path, inputs: &BTreeMap<String, Array>) -> Graph {
    let mut g = load_path(path, inputs);
    dorac::passes::fold_constants(&mut g, &HashSet::new()).unwrap();
    g
}

/// Nodes whose value depends on constants only.
fn constant_only(g: &Graph) -> HashSet<NodeId> {
    let mut out = HashSet::new();
    for n in g.topo_order().unwrap() {
        let ins = g.inputs_of(n);
        let konst = match g.node(n).op {
            Op::Const(_) => true,
            Op::Input => false,
            _ => ins.iter().all(|i| out.contains(i)),
        };
        if konst {
            out.insert(n);
        }
    }
    out
}

/// The kernels that compute only from constants: shape or mask computations that should have
/// been folded away.
fn constant_kernels(g: &Graph, plan: &Plan) -> Vec<String> {
    let konst = constant_only(g);
    plan.kernels
        .iter()
        .filter(|k| k.nodes.iter().all(|n| konst.contains(n)))
        .map(|k| k.name.clone())
        .collect()
}

fn op_counts(g: &Graph) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for n in g.petgraph().node_weights() {
        *m.entry(n.op.name()).or_insert(0) += 1;
    }
    m
}

#[test]
fn every_variant_matches_onnxruntime_on_gpu_and_reference() {
    let mut failures = vec![];
    for model in MODELS {
        let inputs = read(model, "inputs.safetensors");
        for (path, golden) in variants(model) {
            let name = short(&path);
            let ort = dorac::tensors_io::read_safetensors(&golden).unwrap();
            let g = prepare(&path, &inputs);
            let gpu = run_gpu(&g, &inputs);
            let cpu = run_reference(&g, &inputs);
            for (out, want) in &ort {
                let (eg, ec) = (rel(&gpu, &ort, out), rel(&cpu, &ort, out));
                println!("{name} {out}: gpu {eg:.2e} reference {ec:.2e}");
                assert_eq!(gpu[out].shape, want.shape, "{name} {out}");
                if eg > TOL || ec > TOL {
                    failures.push(format!("{name} {out}: gpu {eg:e}, reference {ec:e}"));
                }
            }
            println!("  ops after folding: {:?}", op_counts(&g));
        }
    }
    assert!(
        failures.is_empty(),
        "over {TOL:e}:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn compiled_plans_have_no_shape_computations() {
    for model in MODELS {
        let inputs = read(model, "inputs.safetensors");
        let mut kernels: HashMap<String, Vec<String>> = HashMap::new();
        for (path, _) in variants(model) {
            let name = short(&path);
            let g = prepare(&path, &inputs);
            // Shape, Size, ConstantOfShape and Range become constants at import; nothing
            // integer- or bool-valued is left that depends on constants only.
            let plan = codegen::plan(&g).unwrap();
            let konst = constant_kernels(&g, &plan);
            assert!(
                konst.is_empty(),
                "{name}: kernels on constants only: {konst:?}"
            );
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            // Every node a kernel computes (fusion may group them differently: the exporters
            // number nodes differently, so the schedule, and what is ready before an anchor,
            // can differ).
            let mut ops: Vec<String> = plan
                .kernels
                .iter()
                .flat_map(|k| &k.nodes)
                .map(|&n| format!("{} {:?}", g.node(n).op.name(), g.shape(n)))
                .collect();
            ops.sort();
            kernels.insert(stem, ops);
        }
        // With the shapes pinned, the dynamic export computes exactly what the static one does
        // (the same nodes, maybe in another order).
        assert_eq!(
            kernels["legacy_op17_dynamic"], kernels["legacy_op17"],
            "{model}: the dynamic variant's kernels differ from the static one's"
        );
    }
}

/// Every imported variant exports to ONNX and imports back to the same IR: the same ops, and a
/// fixed point from the first round trip on (ties in the topological order may be broken
/// differently the first time, as in the Llama exports' rotary halves).
#[test]
fn variants_round_trip_through_export() {
    let round_trip = |g: &Graph, name: &str| {
        let bytes = prost::Message::encode_to_vec(&dorac::onnx::export(g).unwrap());
        let back = dorac::onnx::decode_model(&bytes, name).unwrap();
        let shapes = HashMap::new();
        let pins = dorac::onnx::ShapePins::default();
        dorac::onnx::import(&back, Path::new("."), &pins, &shapes).unwrap()
    };
    for model in MODELS {
        let inputs = read(model, "inputs.safetensors");
        for (path, _) in variants(model) {
            let name = short(&path);
            let g = prepare(&path, &inputs);
            let g2 = round_trip(&g, &name);
            assert_eq!(op_counts(&g), op_counts(&g2), "{name}");
            let g3 = round_trip(&g2, &name);
            assert_eq!(format!("{g2}"), format!("{g3}"), "{name}");
        }
    }
}
