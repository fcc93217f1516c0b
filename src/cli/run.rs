//! `dorac run`: inference on wgpu (or the reference executor).

use super::common::{
    apply_adapter, apply_storage, check_inputs, execute, load_graph_with_values, Engine,
    OpeningGpu, Phases, StorageArg,
};
use crate::error::Result;
use crate::ir::Graph;
use crate::tensor::{shape_str, Array};
use crate::tensors_io::{read_safetensors, write_safetensors_typed};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  dorac run models/mlp3d/model.onnx --adapter models/mlp3d/peft_dora --inputs models/mlp3d/inputs.safetensors -o y.safetensors
  dorac run mlp3d.dora.onnx --inputs models/mlp3d/inputs.safetensors --verbose
  dorac run models/mlp3d/model.onnx --inputs models/mlp3d/inputs.safetensors --storage bf16")]
pub struct Args {
    /// A base model (use --adapter to apply a PEFT adapter) or a model made by `dorac rewrite`.
    pub model: PathBuf,
    /// Input tensors, named after the graph inputs (safetensors). Where an op needs an operand at
    /// import (Reshape's shape, Expand's shape, Slice's starts/ends/axes/steps, Split's sizes,
    /// reduction or (Un)Squeeze axes, Tile's repeats, Range's bounds...) and the model feeds it
    /// from a graph input, the tensor's value is pinned as a constant, as --shape pins a dim: the
    /// compiled graph is for these values.
    #[arg(long, value_name = "IN.safetensors")]
    pub inputs: PathBuf,
    /// Write the outputs here, named after the graph outputs, in their types (float32, int64 or
    /// bool) [default: print a summary only].
    #[arg(short, long, value_name = "OUT.safetensors")]
    pub output: Option<PathBuf>,
    /// A PEFT-format adapter folder (adapter_config.json + adapter_model.safetensors) [default:
    /// none].
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Fold the adapters into the weights first (runs at the base model's cost).
    #[arg(long)]
    pub merged: bool,
    #[command(flatten)]
    pub engine: super::common::EngineArgs,
    /// Pin a symbolic dim (`batch=4`) or a whole input shape (`x=4x16`). Repeatable; shapes of
    /// the given input tensors pin the inputs anyway [default: none].
    #[arg(long = "shape", value_name = "NAME=DIMS", help_heading = "Shapes")]
    pub shapes: Vec<String>,
    /// Store the frozen weights on the device in half precision (f16 or bf16) or as 4- or 8-bit
    /// block codes (int4, int8: QLoRA's arrangement; also on the host), computing in f32; also
    /// runs the f32 weights and prints the outputs' difference. A half or quantized model's own
    /// weights are stored so without this flag [default: the model's own precision].
    #[arg(long, value_enum, value_name = "FORMAT", help_heading = "Engine")]
    pub storage: Option<StorageArg>,
    /// Print the time of each phase (reading and compiling the model, opening the device,
    /// building pipelines and uploading weights, running) to stderr.
    #[arg(long, help_heading = "Engine")]
    pub verbose: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut phases = Phases::start();
    let engine = &args.engine;
    let opening = OpeningGpu::start(engine.backend.as_deref(), engine.reference);
    let inputs = read_safetensors(&args.inputs)?;
    let graph = prepare(
        &args.model,
        &args.shapes,
        &inputs,
        args.adapter.as_deref(),
        args.merged,
        None,
    )?;
    check_inputs(&graph, &inputs, &args.inputs)?;
    let feed = graph.graph_inputs_of(inputs.clone());
    phases.done("read inputs, import, passes");
    let gpu = opening.wait("running")?;
    if gpu.is_some() {
        phases.done("open the device (the rest of it: it began with the import)");
    }
    // With --storage, the f32 weights' outputs, for the error report below.
    let full_precision = match args.storage {
        Some(_) => Some(execute(&graph, &feed, gpu.as_ref(), &mut Phases::start())?.0),
        None => None,
    };
    let mut graph = graph;
    if let Some(storage) = args.storage {
        if storage.code_bits().is_some() {
            // Codes come before the adapter, which then reads the quantized weights, as it
            // would in PEFT over a quantized base.
            let (model, shapes, adapter) = (&args.model, &args.shapes, args.adapter.as_deref());
            graph = prepare(model, shapes, &inputs, adapter, args.merged, Some(storage))?;
        } else {
            apply_storage(&mut graph, storage)?;
        }
    }
    let start = Instant::now();
    let (outputs, engine) = execute(&graph, &feed, gpu.as_ref(), &mut phases)?;
    if args.verbose {
        eprint!("{}", phases.report());
    }
    let elapsed = start.elapsed();
    match engine {
        Engine::Gpu(d) => println!("ran on {d} in {:.1} ms", elapsed.as_secs_f64() * 1e3),
        Engine::Reference => println!(
            "ran on the CPU reference executor in {:.1} ms",
            elapsed.as_secs_f64() * 1e3
        ),
    }
    if let Some(reference) = &full_precision {
        for (name, a) in &outputs {
            let err = crate::tensor::relative_error(&a.data, &reference[name].data);
            println!("  {name}: relative difference from f32 weights {err:.2e}");
        }
    }
    for (name, a) in &outputs {
        let finite = a.data.iter().all(|v| v.is_finite());
        let max = a.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        println!(
            "  {name}: {} max|y|={max:.6}{}",
            shape_str(&a.shape),
            if finite { "" } else { " (contains NaN/inf)" }
        );
    }
    if let Some(out) = &args.output {
        let typed: BTreeMap<String, (Array, crate::tensor::DType)> = outputs
            .into_iter()
            .map(|(k, a)| {
                let id = graph.outputs().iter().find(|(n, _)| *n == k).map(|o| o.1);
                let dtype = id.map_or(crate::tensor::DType::F32, |id| graph.node(id).dtype);
                (k, (a, dtype))
            })
            .collect();
        write_safetensors_typed(out, &typed)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// Loads a model for inference: import with pins from the inputs (their shapes, and their values
/// where an op needs one at import: a shape, axes or split sizes fed as a graph input), quantize
/// the weights to `codes` if given (`--storage int4|int8`), apply the adapter, merge if asked,
/// and fold every constant expression (the DoRA magnitude scale included) once.
pub fn prepare(
    model: &Path,
    shapes: &[String],
    inputs: &BTreeMap<String, Array>,
    adapter: Option<&Path>,
    merged: bool,
    codes: Option<StorageArg>,
) -> Result<Graph> {
    let input_shapes: HashMap<String, Vec<usize>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    let values: HashMap<String, Array> = inputs.clone().into_iter().collect();
    let mut graph = load_graph_with_values(model, shapes, &input_shapes, &values)?;
    super::common::apply_codes(&mut graph, codes);
    if let Some(dir) = adapter {
        apply_adapter(&mut graph, dir)?;
    }
    let pipeline = crate::pipeline::Inference {
        merge: merged,
        ..Default::default()
    };
    Ok(pipeline.run(graph)?.value)
}
