//! `dorac merge`: fold adapters into the base weights and write the merged ONNX.

use super::common::{apply_adapter, load_graph, save_graph};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  dorac merge models/mlp3d/model.onnx --adapter models/mlp3d/peft_dora -o mlp3d-merged.onnx
  dorac merge mlp3d.dora.onnx -o mlp3d-rewritten-merged.onnx")]
pub struct Args {
    /// A base model with --adapter, or a model made by `dorac rewrite`.
    pub model: PathBuf,
    /// A PEFT-format adapter folder to merge (replaces a rewritten model's own adapters)
    /// [default: the rewritten model's own].
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The merged model to write.
    #[arg(short, long, value_name = "MERGED.onnx")]
    pub output: PathBuf,
    /// Pin a symbolic dim (`batch=4`) or a whole input shape (`x=4x16`). Repeatable [default:
    /// none; a symbolic dim left unpinned is an error].
    #[arg(long = "shape", value_name = "NAME=DIMS", help_heading = "Shapes")]
    pub shapes: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let mut graph = load_graph(&args.model, &args.shapes, &HashMap::new())?;
    if let Some(dir) = &args.adapter {
        apply_adapter(&mut graph, dir)?;
    }
    if graph.adapters.is_empty() {
        return Err(Error::Input(format!(
            "{}: no adapters to merge (give --adapter DIR, or a model made by `dorac rewrite`)",
            args.model.display()
        )));
    }
    let modules: Vec<String> = graph.adapters.iter().map(|a| a.module.clone()).collect();
    crate::passes::merge_adapters(&mut graph)?;
    save_graph(&graph, &args.output)?;
    println!("merged {} layers: {}", modules.len(), modules.join(", "));
    println!("wrote {}", args.output.display());
    Ok(())
}
