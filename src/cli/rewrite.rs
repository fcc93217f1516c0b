//! `dorac rewrite`: insert DoRA/LoRA adapters and write the rewritten ONNX.

use super::common::{adapter_table, load_graph, save_graph, sibling_path, AdapterArgs};
use crate::error::Result;
use crate::ir::Method;
use crate::passes::insert_adapters;
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
    #[command(flatten)]
    pub adapter: AdapterArgs,
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
    let start = std::time::Instant::now();
    let mut graph = load_graph(&args.model, &args.shapes, &HashMap::new())?;
    let method = Method::from(args.method);
    let specs = args.adapter.specs(&graph, method, args.seed, &args.model)?;
    insert_adapters(&mut graph, specs)?;
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| sibling_path(&args.model, method.name()));
    save_graph(&graph, &out)?;
    print!("{}", adapter_table(&graph));
    println!(
        "wrote {} in {:.1} s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    if let Some(dir) = &args.adapter_out {
        crate::adapter::save(&graph, dir)?;
        println!("wrote adapter {}", dir.display());
    }
    Ok(())
}
