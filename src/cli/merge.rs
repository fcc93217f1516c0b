//! `dorac merge`: fold adapters into the base weights and write the merged ONNX.

use super::common::{apply_adapter, load_graph, save_graph};
use crate::error::{Error, Result, Subject};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  dorac merge models/mlp3d/model.onnx --adapter models/mlp3d/peft_dora -o mlp3d-merged.onnx
  dorac merge mlp3d.dora.onnx -o mlp3d-rewritten-merged.onnx")]
pub struct Args {
    /// A base model with --adapter, or a model made by `dorac rewrite`.
    pub model: PathBuf,
    /// A PEFT-format adapter folder to merge (replaces a rewritten model's own adapters).
    /// Repeatable: adapters are merged one after the other, each applied to the weights the
    /// previous one produced (its magnitude and direction relative to them) [default: the
    /// rewritten model's own].
    #[arg(long, value_name = "DIR")]
    pub adapter: Vec<PathBuf>,
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
    let no_adapters = || {
        Error::input_at(
            Subject::file(&args.model),
            "no adapters to merge (give --adapter DIR, or a model made by `dorac rewrite`)",
        )
    };
    if args.adapter.is_empty() {
        if graph.adapters().is_empty() {
            return Err(no_adapters());
        }
        merge_one(&mut graph, "the model's own adapters")?;
    }
    for (i, dir) in args.adapter.iter().enumerate() {
        // A rewritten model's own adapters are merged first; each --adapter then starts from
        // the weights merged so far.
        if i == 0 && !graph.adapters().is_empty() {
            merge_one(&mut graph, "the model's own adapters")?;
        }
        apply_adapter(&mut graph, dir)?;
        merge_one(&mut graph, &dir.display().to_string())?;
    }
    save_graph(&graph, &args.output)?;
    println!("wrote {}", args.output.display());
    Ok(())
}

/// Merges the graph's adapters into its weights and says which layers.
fn merge_one(graph: &mut crate::ir::Graph, what: &str) -> Result<()> {
    let modules: Vec<String> = graph.adapters().iter().map(|a| a.module.clone()).collect();
    crate::passes::merge_adapters(graph)?;
    println!(
        "merged {what}: {} layers ({})",
        modules.len(),
        modules.join(", ")
    );
    Ok(())
}
