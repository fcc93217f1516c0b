//! `dorac rewrite`: insert DoRA/LoRA adapters and write the rewritten ONNX.

use super::common::{adapter_table, default_output, load_graph, save_graph, AdapterArgs};
use crate::error::Result;
use crate::ir::Method;
use crate::passes::insert_adapters;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = REWRITE_EXAMPLES)]
pub struct Args {
    /// The ONNX model to rewrite.
    pub model: PathBuf,
    /// Output file [default: ./<stem>.dora.onnx, or ./<stem>.lora.onnx with --method lora].
    #[arg(short, long, value_name = "OUT.onnx")]
    pub output: Option<PathBuf>,
    /// dora: magnitude and direction (the norm is detached, as in PEFT); lora: plain LoRA.
    #[arg(long, value_enum, default_value = "dora", help_heading = "Adapter")]
    pub method: MethodArg,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Seed for A's kaiming-uniform initialisation.
    #[arg(long, default_value_t = 0, help_heading = "Adapter")]
    pub seed: u64,
    /// Also write the adapter in PEFT format (adapter_config.json, adapter_model.safetensors)
    /// [default: not written].
    #[arg(long, value_name = "DIR")]
    pub adapter_out: Option<PathBuf>,
    /// The Hugging Face name or path of the base model, written as the adapter's
    /// `base_model_name_or_path` [default: unset].
    #[arg(long, value_name = "NAME")]
    pub base_model: Option<String>,
    /// Pin a symbolic dim (`batch=4`) or a whole input shape (`x=4x16`). Repeatable [default:
    /// none; a symbolic dim left unpinned is an error].
    #[arg(long = "shape", value_name = "NAME=DIMS", help_heading = "Shapes")]
    pub shapes: Vec<String>,
}

const REWRITE_EXAMPLES: &str = "\
Examples:
  dorac rewrite models/mlp3d/model.onnx --rank 8 --alpha 16 --target fc -o mlp3d.dora.onnx
  dorac rewrite models/mlp2d/model.onnx --method lora --rank 4 --shape batch=8 --adapter-out mlp2d-lora-init
  dorac rewrite models/bert_tiny/legacy_op17.onnx --target query,value --rank 8 -o bert.dora.onnx";

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
    graph.adapter_origin = crate::ir::AdapterOrigin {
        base_model: args.base_model.clone(),
        target_modules: args.adapter.patterns(),
        packed: Default::default(),
    };
    // Outputs go to the current directory unless -o says otherwise, never beside the input.
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.model, method.name()));
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
