//! The `dorac` command line. Each subcommand lives in its own file and only strings together
//! library calls: load, rewrite, compile, run, write.

mod analyze;
mod common;
mod compile;
mod demo;
mod eval;
mod generate;
mod merge;
mod rewrite;
mod run;
mod train;

use crate::error::Result;
use clap::{Parser, Subcommand};

/// dorac: a compiler for DoRA fine-tuning.
///
/// Imports an ONNX model, rewrites its linear layers into DoRA (or LoRA) subgraphs, compiles
/// the graph to WGSL compute shaders and runs them on any GPU wgpu finds (Vulkan, Metal, DX12,
/// GL). Adapters load and save in Hugging Face PEFT's format.
#[derive(Parser, Debug)]
#[command(name = "dorac", version, about, long_about = None, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "\
Examples:
  dorac demo
  dorac rewrite models/mlp3d/model.onnx --rank 8 --alpha 16 --target fc -o mlp3d.dora.onnx
  dorac run models/mlp3d/model.onnx --adapter models/mlp3d/peft_dora --inputs models/mlp3d/inputs.safetensors -o y.safetensors
  dorac train models/mlp2d/model.onnx --data models/demo/teacher.safetensors --loss mse --lr 1e-2 --epochs 5 --batch-size 32 --rank 4 -o mlp2d-dora
  dorac merge models/mlp2d/model.onnx --adapter mlp2d-dora --shape batch=32 -o mlp2d-merged.onnx

`dorac <command> --help` lists each command's flags, their defaults, and examples.";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Rewrite linear layers (MatMul/Gemm with a weight initializer) into DoRA or LoRA subgraphs.
    Rewrite(rewrite::Args),
    /// Run inference on the GPU (or on the CPU reference executor when no GPU adapter exists).
    Run(run::Args),
    /// Fold adapters into the base weights: the base graph with new weights and nothing more.
    Merge(merge::Args),
    /// Train adapters: forward, loss, backward and AdamW compiled into one GPU step.
    Train(Box<train::Args>),
    /// Evaluate a model (with an adapter, or merged) on a data set: loss and accuracy.
    Eval(eval::Args),
    /// The DoRA paper's weight analysis: magnitude and direction change per layer per checkpoint.
    Analyze(analyze::Args),
    /// Show what dorac makes of a model: the IR, the generated WGSL, the execution plan.
    Compile(compile::Args),
    /// Rewrite, run, merge and compare on a bundled model, end to end.
    Demo(demo::Args),
    /// Greedy decoding with a byte-level language model (and an optional adapter).
    Generate(generate::Args),
}

/// Runs the parsed command.
pub fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Rewrite(a) => rewrite::run(a),
        Command::Run(a) => run::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Train(a) => train::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Compile(a) => compile::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Generate(a) => generate::run(a),
    }
}
