//! `dorac rewrite`: insert DoRA/LoRA adapters and write the rewritten ONNX.

use super::common::{adapter_table, load_graph, save_graph, sibling_path};
use crate::error::{Error, Result};
use crate::ir::Method;
use crate::passes::{
    find_linear_layers, insert_adapters, matches_target, AdapterInit, AdapterSpec,
};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model to rewrite.
    pub model: PathBuf,
    /// Output file [default: <stem>.dora.onnx, or <stem>.lora.onnx with --method lora].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// dora: magnitude and direction (the norm is detached, as in PEFT); lora: plain LoRA.
    #[arg(long, value_enum, default_value = "dora")]
    pub method: MethodArg,
    /// Adapter rank r (PEFT's default).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// lora_alpha; the update is scaled by alpha / r (PEFT's default alpha is 8).
    #[arg(long, default_value_t = 8.0)]
    pub alpha: f64,
    /// Scale by alpha / sqrt(r) (rank-stabilised LoRA).
    #[arg(long)]
    pub rslora: bool,
    /// Module to adapt, matched as PEFT's target_modules: the name or a dotted suffix
    /// (`--target fc` adapts `blocks.0.fc`). Repeatable, or comma-separated. Default: every
    /// linear layer.
    #[arg(long = "target", value_name = "PATTERN")]
    pub targets: Vec<String>,
    /// Seed for A's kaiming-uniform initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the adapter in PEFT format (adapter_config.json, adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter_out: Option<PathBuf>,
    /// Pin a symbolic dim (`batch=4`) or a whole input shape (`x=4x16`). Repeatable.
    #[arg(long = "shape", value_name = "NAME=DIMS")]
    pub shapes: Vec<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum MethodArg {
    Dora,
    Lora,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Dora => Method::Dora,
            MethodArg::Lora => Method::Lora,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let mut graph = load_graph(&args.model, &args.shapes, &HashMap::new())?;
    let method = Method::from(args.method);
    let patterns: Vec<String> = args
        .targets
        .iter()
        .flat_map(|t| t.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    let layers = find_linear_layers(&graph);
    if layers.is_empty() {
        return Err(Error::Input(format!(
            "{}: no linear layers (MatMul/Gemm with a 2-D float weight initializer) to adapt",
            args.model.display()
        )));
    }
    let chosen: Vec<_> = layers
        .iter()
        .filter(|l| patterns.is_empty() || patterns.iter().any(|p| matches_target(&l.module, p)))
        .cloned()
        .collect();
    if chosen.is_empty() {
        return Err(Error::Input(format!(
            "no layer matches --target {} (the model's linear layers: {})",
            patterns.join(","),
            layers
                .iter()
                .map(|l| l.module.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let specs = chosen
        .into_iter()
        .map(|layer| AdapterSpec {
            layer,
            method,
            rank: args.rank,
            alpha: args.alpha,
            rslora: args.rslora,
            init: AdapterInit::Peft { seed: args.seed },
        })
        .collect();
    insert_adapters(&mut graph, specs)?;
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| sibling_path(&args.model, method.name()));
    save_graph(&graph, &out)?;
    print!("{}", adapter_table(&graph));
    println!("wrote {}", out.display());
    if let Some(dir) = &args.adapter_out {
        crate::adapter::save(&graph, dir)?;
        println!("wrote adapter {}", dir.display());
    }
    Ok(())
}
