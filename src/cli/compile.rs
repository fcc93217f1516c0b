//! `dorac compile`: write what dorac makes of a model, for inspection.

use super::common::{apply_adapter, load_graph};
use crate::error::{Error, Result};
use crate::tensors_io::write_atomic;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = COMPILE_EXAMPLES)]
pub struct Args {
    /// The ONNX model.
    pub model: PathBuf,
    /// What to write: ir (the IR after each pass), dot (Graphviz of the compiled graph), wgsl
    /// (one file per kernel), plan (kernels in order, buffers with their sizes and lifetimes,
    /// peak memory). Repeatable.
    #[arg(long, value_enum, default_values_t = vec![Emit::Plan])]
    pub emit: Vec<Emit>,
    /// Output folder.
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// A PEFT-format adapter folder to apply first [default: none].
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Compile a training step (forward, loss, backward, AdamW) instead of inference. Without
    /// --adapter, the layers --target picks get a fresh adapter of --method at PEFT's
    /// initialisation.
    #[arg(long, help_heading = "Training step")]
    pub train: bool,
    /// The loss of the training step.
    #[arg(
        long,
        value_enum,
        default_value = "mse",
        help_heading = "Training step"
    )]
    pub loss: super::train::LossArg,
    /// What the training step trains (as `dorac train --method`).
    #[arg(
        long,
        value_enum,
        default_value = "dora",
        help_heading = "Training step"
    )]
    pub method: super::train::MethodArg,
    /// As `dorac train --store-activations`.
    #[arg(long, help_heading = "Training step")]
    pub store_activations: bool,
    /// The default now (see --store-activations); accepted for scripts that still pass it.
    #[arg(long, hide = true, conflicts_with = "store_activations")]
    pub lean_activations: bool,
    #[command(flatten)]
    pub adapter_args: super::common::AdapterArgs,
    /// Pin a symbolic dim (`batch=4`) or a whole input shape (`x=4x16`). Repeatable [default:
    /// none; a symbolic dim left unpinned is an error].
    #[arg(long = "shape", value_name = "NAME=DIMS", help_heading = "Shapes")]
    pub shapes: Vec<String>,
    /// Store the frozen weights in half precision (f16 or bf16) or as block codes (int4, int8)
    /// [default: the model's own precision], as `run --storage` does: the
    /// plan shows each such buffer's size and format.
    #[arg(long, value_enum, value_name = "FORMAT", help_heading = "Engine")]
    pub storage: Option<super::common::StorageArg>,
    /// Plan for the GPU wgpu finds, as `run` and `train` do, instead of the portable plan (GPU
    /// kernel shapes, 8 storage buffers per kernel, which runs on every adapter): that
    /// adapter's kernel shapes (a CPU driver such as lavapipe has its own), as many buffers per
    /// kernel as it allows, and on a CPU driver thin products turned.
    #[arg(long, help_heading = "Engine")]
    pub device: bool,
    /// With --device: the GPU backend, vulkan, metal, dx12 or gl [default: the first wgpu
    /// finds].
    #[arg(long, value_name = "B", requires = "device", help_heading = "Engine")]
    pub backend: Option<String>,
}

const COMPILE_EXAMPLES: &str = "\
Examples:
  dorac compile models/mlp3d/model.onnx --emit plan --emit wgsl -o mlp3d-compiled
  dorac compile models/mlp3d/model.onnx --device --emit plan -o mlp3d-on-this-gpu
  dorac compile models/mlp2d/model.onnx --train --method lora --rank 4 --target layers.0 --shape batch=32 --emit plan -o mlp2d-train-step
  dorac compile models/mlp2d/model.onnx --adapter models/mlp2d/peft_dora --shape batch=8 --emit ir --emit dot -o mlp2d-dora-ir";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Emit {
    Ir,
    Dot,
    Wgsl,
    Plan,
}

pub fn run(args: Args) -> Result<()> {
    let mut graph = load_graph(&args.model, &args.shapes, &HashMap::new())?;
    std::fs::create_dir_all(&args.output).map_err(|e| Error::io(&args.output, e))?;
    let write = |name: &str, text: &str| -> Result<()> {
        let p = args.output.join(name);
        write_atomic(&p, text.as_bytes())?;
        println!("wrote {}", p.display());
        Ok(())
    };
    if args.emit.contains(&Emit::Ir) {
        write("ir.imported.txt", &graph.to_string())?;
    }
    super::common::apply_codes(&mut graph, args.storage);
    if let Some(dir) = &args.adapter {
        apply_adapter(&mut graph, dir)?;
        if args.emit.contains(&Emit::Ir) {
            write("ir.adapted.txt", &graph.to_string())?;
        }
    }
    let half = args.storage.and_then(super::common::StorageArg::half);
    let storage = if args.train {
        let method = crate::train::TrainMethod::from(args.method);
        if let (true, Some(kind)) = (graph.adapters().is_empty(), method.adapter()) {
            let specs = args.adapter_args.specs(&graph, kind, 0, &args.model)?;
            crate::passes::insert_adapters(&mut graph, specs)?;
        }
        let loss = args.loss.kind(-100);
        let opts = crate::train::BuildOptions {
            method,
            loss,
            output: None,
            labels: if loss == crate::train::LossKind::Mse {
                "target"
            } else {
                "labels"
            }
            .into(),
            optimizer: crate::train::AdamW::default(),
            exact_norm_grad: false,
            expose_grads: false,
            full_targets: (!args.adapter_args.targets.is_empty())
                .then(|| args.adapter_args.patterns()),
            lean_activations: !args.store_activations,
        };
        let prepared = crate::pipeline::training(graph, &opts, None, half)?;
        graph = prepared.value.graph;
        if args.emit.contains(&Emit::Ir) {
            write("ir.train_step.txt", &graph.to_string())?;
        }
        prepared.storage
    } else {
        let pipeline = crate::pipeline::Inference {
            storage: half,
            ..Default::default()
        };
        let prepared = pipeline.run(graph)?;
        graph = prepared.value;
        if args.emit.contains(&Emit::Ir) {
            write("ir.folded.txt", &graph.to_string())?;
        }
        prepared.storage
    };
    if let (Some(r), Some(storage)) = (&storage, args.storage) {
        super::common::report_storage(r, storage);
    }
    if args.emit.contains(&Emit::Dot) {
        write("graph.dot", &crate::ir::to_dot(&graph))?;
    }
    let plan = if args.device {
        let gpu = crate::runtime::Gpu::new(args.backend.as_deref())?;
        println!("planned for {}", gpu.describe());
        crate::runtime::Executable::plan_for(&gpu, &graph)?.1
    } else {
        // As a device's plan would: recomputations no kernel can host are taken back first.
        let options = crate::codegen::PlanOptions::default();
        crate::codegen::plan_hosting_recomputations(
            &mut std::borrow::Cow::Borrowed(&graph),
            &options,
        )?
    };
    // Work that depends only on constants (shape arithmetic, masks built from constants) must
    // have been folded away: a kernel reading nothing but constants would redo it every run.
    let constant_only: Vec<&str> = plan
        .kernels
        .iter()
        .filter(|k| {
            k.inputs
                .iter()
                .all(|&b| matches!(plan.buffers[b].role, crate::codegen::BufferRole::Const(_)))
        })
        .map(|k| k.name.as_str())
        .collect();
    let summary = format!(
        "{} kernels; constant-only (shape) work left in the program: {}",
        plan.kernels.len(),
        if constant_only.is_empty() {
            "none".to_string()
        } else {
            constant_only.join(", ")
        }
    );
    println!("{summary}");
    if args.emit.contains(&Emit::Plan) {
        write("plan.txt", &format!("{plan}\n{summary}\n"))?;
    }
    if args.emit.contains(&Emit::Wgsl) {
        for k in &plan.kernels {
            write(&format!("{}.wgsl", k.name), &k.source)?;
        }
    }
    Ok(())
}
