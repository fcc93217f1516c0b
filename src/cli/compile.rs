//! `dorac compile`: write what dorac makes of a model, for inspection.

use super::common::{apply_adapter, load_graph};
use crate::error::{Error, Result};
use crate::tensors_io::write_atomic;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
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
    /// A PEFT-format adapter folder to apply first.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Compile a training step (forward, loss, backward, AdamW) instead of inference. Layers
    /// without an adapter get a DoRA adapter at PEFT's initialisation.
    #[arg(long)]
    pub train: bool,
    /// The loss of the training step (with --train).
    #[arg(long, value_enum, default_value = "mse")]
    pub loss: super::train::LossArg,
    /// Pin a symbolic dim (`batch=4`) or a whole input shape (`x=4x16`). Repeatable.
    #[arg(long = "shape", value_name = "NAME=DIMS")]
    pub shapes: Vec<String>,
    /// Store the frozen weights in half precision (f16 or bf16), as `run --storage` does: the
    /// plan shows each such buffer's size and format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub storage: Option<super::common::StorageArg>,
}

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
    if let Some(dir) = &args.adapter {
        apply_adapter(&mut graph, dir)?;
        if args.emit.contains(&Emit::Ir) {
            write("ir.adapted.txt", &graph.to_string())?;
        }
    }
    if args.train {
        if graph.adapters.is_empty() {
            let specs = super::common::AdapterArgs {
                rank: 8,
                alpha: 8.0,
                rslora: false,
                targets: vec![],
            }
            .specs(&graph, crate::ir::Method::Dora, 0, &args.model)?;
            crate::passes::insert_adapters(&mut graph, specs)?;
        }
        let loss = args.loss.kind(-100);
        let opts = crate::train::BuildOptions {
            method: crate::train::TrainMethod::Dora,
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
            full_targets: None,
        };
        graph = crate::train::build(graph, &opts)?.graph;
        if args.emit.contains(&Emit::Ir) {
            write("ir.train_step.txt", &graph.to_string())?;
        }
    } else {
        crate::passes::fold_constants(&mut graph, &HashSet::new())?;
        if args.emit.contains(&Emit::Ir) {
            write("ir.folded.txt", &graph.to_string())?;
        }
    }
    if let Some(storage) = args.storage {
        super::common::apply_storage(&mut graph, storage)?;
    }
    if args.emit.contains(&Emit::Dot) {
        write("graph.dot", &crate::ir::to_dot(&graph))?;
    }
    let plan = crate::codegen::plan(&graph)?;
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
