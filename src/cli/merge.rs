//! `dorac merge`: fold adapters into the base weights and write the merged ONNX.

use super::common::{apply_adapter, create_parent, load_graph, save_graph};
use crate::error::{Error, Result, Subject};
use crate::onnx::reweight::{Requantize, Requantized, Reweighted};
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
    /// Pin a symbolic dim (`batch=4`) or a whole input shape (`x=4x16`). Repeatable. Needed only
    /// when the merged model is exported from dorac's graph (a rewritten model, full weights),
    /// whose shapes are fixed [default: none; merging into the model's own file keeps its dims].
    #[arg(long = "shape", value_name = "NAME=DIMS", help_heading = "Shapes")]
    pub shapes: Vec<String>,
    /// Write each merged layer of a quantized model (MatMulNBits) as an f32 MatMul, exactly the
    /// merged weight, instead of quantizing it again in the layer's own format (its bits, block
    /// size, zero points and scale type), which keeps the file's size and the runtime's kernels
    /// but rounds the merged weight to the nearest code.
    #[arg(long)]
    pub no_requantize: bool,
}

pub fn run(args: Args) -> Result<()> {
    // The merged weights do not depend on the inputs' sizes, and a merge into the model's own
    // file keeps its symbolic dims: dims left unpinned are imported at a size that always fits
    // (a cache empty, its head size from genai_config.json, others 1). Only a merged graph
    // exported from the IR would carry them, so that path asks for pins instead.
    let model = crate::onnx::load_model(&args.model)?;
    let dir = args.model.parent().unwrap_or(std::path::Path::new("."));
    let mut defaults = crate::onnx::cache_pins(&model, dir, &HashMap::new(), &args.shapes);
    for d in crate::onnx::symbolic_dims(&model) {
        let pinned = |p: &String| p.split('=').next() == Some(d.as_str());
        if !args.shapes.iter().any(pinned) && !defaults.iter().any(pinned) {
            defaults.push(format!("{d}=1"));
        }
    }
    let shapes: Vec<String> = args.shapes.iter().chain(&defaults).cloned().collect();
    let mut graph = load_graph(&args.model, &shapes, &HashMap::new())?;
    let no_adapters = || {
        Error::input_at(
            Subject::file(&args.model),
            "no adapters to merge (give --adapter DIR, or a model made by `dorac rewrite`)",
        )
    };
    let rewritten = !graph.adapters().is_empty();
    // The weights each merge replaces, by their IR names (the initializers they came from).
    let mut changed: Vec<String> = vec![];
    if args.adapter.is_empty() {
        if !rewritten {
            return Err(no_adapters());
        }
        merge_one(&mut graph, "the model's own adapters", &mut changed)?;
    }
    for (i, dir) in args.adapter.iter().enumerate() {
        // A rewritten model's own adapters are merged first; each --adapter then starts from
        // the weights merged so far.
        if i == 0 && rewritten {
            merge_one(&mut graph, "the model's own adapters", &mut changed)?;
        }
        // A full fine-tuning run's weights replace the base ones as they load.
        let replaced = apply_adapter(&mut graph, dir)?;
        if replaced.is_empty() {
            merge_one(&mut graph, &dir.display().to_string(), &mut changed)?;
        } else {
            println!(
                "took {} fine-tuned weights from {} ({})",
                replaced.len(),
                dir.display(),
                replaced.join(", ")
            );
            changed.extend(replaced);
        }
    }
    // A base model's merged (or fully fine-tuned) weights go back into its own file, which keeps
    // every other node, its symbolic dims and its fused ops; a rewritten model loses its adapter
    // subgraphs, so it is exported from the graph, as is a model whose weights are not
    // initializers as such.
    let in_place = if rewritten {
        Err("the model was made by `dorac rewrite`".to_string())
    } else {
        // Merging keeps each weight's name on its new constant.
        let weights: std::result::Result<Vec<(String, crate::tensor::Tensor)>, String> = changed
            .iter()
            .map(|name| {
                let t = graph
                    .find_by_name(name)
                    .and_then(|id| graph.const_tensor(id));
                t.map(|t| (name.clone(), t.clone()))
                    .ok_or_else(|| format!("weight '{name}' is not a constant after the merge"))
            })
            .collect();
        let requantize = match args.no_requantize {
            true => Requantize::No,
            false => Requantize::Yes,
        };
        weights.and_then(|w| crate::onnx::reweight::reweighted(&model, &w, requantize))
    };
    match in_place {
        Ok(Reweighted { model, requantized }) => {
            report_requantized(&requantized);
            create_parent(&args.output)?;
            crate::onnx::reweight::save_reweighted(model, dir, &args.output)?;
            println!(
                "wrote {} (the input model, its adapted weights replaced; its other nodes and dims as they were)",
                args.output.display()
            );
        }
        Err(why) if !defaults.is_empty() => {
            return Err(Error::input_at(
                Subject::file(&args.model),
                format!(
                    "the merged model is exported from dorac's graph ({why}), whose shapes are \
                     fixed: pin the inputs' dims for it with --shape ({})",
                    defaults
                        .iter()
                        .map(|d| format!("{}=N", d.split('=').next().unwrap_or(d)))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            ));
        }
        Err(why) => {
            save_graph(&graph, &args.output)?;
            println!(
                "wrote {} (exported from dorac's graph, shapes as pinned: {why})",
                args.output.display()
            );
        }
    }
    Ok(())
}

/// Says how far the codes of the layers quantized again are from their merged weights.
fn report_requantized(layers: &[Requantized]) {
    let relative = |l: &Requantized| l.max_abs / l.max_weight.max(f64::MIN_POSITIVE);
    let Some(worst) = layers
        .iter()
        .max_by(|a, b| relative(a).total_cmp(&relative(b)))
    else {
        return;
    };
    let steps = layers.iter().map(|l| l.max_steps).fold(0.0, f64::max);
    let formats: std::collections::BTreeSet<String> = layers
        .iter()
        .map(|l| format!("{} bits in blocks of {}", l.bits, l.block))
        .collect();
    println!(
        "quantized {} merged layers again, as the file stored them ({}; --no-requantize keeps \
         them f32): every weight within {steps:.2} of its block's step of the merged value; \
         at most {:.2e} of a layer's largest weight ({:.3e} in '{}')",
        layers.len(),
        formats.into_iter().collect::<Vec<_>>().join(", "),
        relative(worst),
        worst.max_abs,
        worst.node
    );
}

/// Merges the graph's adapters into its weights and says which layers.
fn merge_one(graph: &mut crate::ir::Graph, what: &str, changed: &mut Vec<String>) -> Result<()> {
    let modules: Vec<String> = graph.adapters().iter().map(|a| a.module.clone()).collect();
    for a in graph.adapters() {
        let name = &graph.node(a.weight).name;
        if !changed.contains(name) {
            changed.push(name.clone());
        }
    }
    crate::passes::merge_adapters(graph)?;
    println!(
        "merged {what}: {} layers ({})",
        modules.len(),
        modules.join(", ")
    );
    Ok(())
}
