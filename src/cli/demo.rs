//! `dorac demo`: the whole pipeline on the bundled models, checked against the goldens that
//! onnxruntime and PEFT produced (models/make_models.py).

use super::common::{execute, open_gpu, save_graph, Engine, Phases};
use super::run::prepare;
use crate::error::{Error, Result};
use crate::ir::Method;
use crate::passes::insert_adapters;
use crate::tensor::{relative_error, Array};
use crate::tensors_io::read_safetensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  dorac demo\n  dorac demo -o /tmp/dorac-demo --backend vulkan")]
pub struct Args {
    /// Folder of bundled models (each with model.onnx, inputs, goldens and a PEFT adapter).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/models"))]
    pub models: PathBuf,
    /// Folder for the rewritten and merged models it writes.
    #[arg(
        short,
        long,
        value_name = "DIR",
        default_value = "dorac-demo",
        alias = "out-dir"
    )]
    pub output: PathBuf,
    /// GPU backend: vulkan, metal, dx12 or gl [default: the first wgpu finds].
    #[arg(long)]
    pub backend: Option<String>,
}

const TOLERANCE: f64 = 1e-5;

pub fn run(args: Args) -> Result<()> {
    std::fs::create_dir_all(&args.output).map_err(|e| Error::io(&args.output, e))?;
    let mut failures = 0;
    for name in ["mlp2d", "mlp3d"] {
        failures += demo_model(&args, name)?;
    }
    if failures > 0 {
        return Err(Error::input(format!(
            "demo: {failures} checks above the {TOLERANCE:e} tolerance"
        )));
    }
    println!("\nall checks within {TOLERANCE:e} (max-abs error over max-abs value)");
    Ok(())
}

fn demo_model(args: &Args, name: &str) -> Result<usize> {
    let dir = args.models.join(name);
    let model = dir.join("model.onnx");
    let inputs = read_safetensors(&dir.join("inputs.safetensors"))?;
    let ort = read_safetensors(&dir.join("ort_outputs.safetensors"))?;
    let peft = read_safetensors(&dir.join("peft_dora_outputs.safetensors"))?;
    let adapter = dir.join("peft_dora");
    let gpu = open_gpu(args.backend.as_deref(), false, "running")?;
    let run = |path: &Path, adapter: Option<&Path>| -> Result<(BTreeMap<String, Array>, String)> {
        let graph = prepare(path, &[], &inputs, adapter, false, None)?;
        let (out, engine) = execute(&graph, &inputs, gpu.as_ref(), &mut Phases::start())?;
        let engine = match engine {
            Engine::Gpu(d) => d,
            Engine::Reference => "CPU reference".into(),
        };
        Ok((out, engine))
    };
    println!("\n== {name}: {}", model.display());

    // 1. The base model on the GPU against onnxruntime.
    let (base, engine) = run(&model, None)?;
    println!("   running on {engine}");
    let mut rows = vec![("base model vs onnxruntime", err(&base, &ort, "y"))];

    // 2. Rewrite with PEFT's initialisation: the adapted model must equal the base model.
    let shapes: HashMap<String, Vec<usize>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    let mut graph = super::common::load_graph(&model, &[], &shapes)?;
    let every_layer = super::common::AdapterArgs {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: vec![],
    };
    let specs = every_layer.specs(&graph, Method::Dora, 0, &model)?;
    insert_adapters(&mut graph, specs)?;
    let rewritten = args.output.join(format!("{name}.dora.onnx"));
    save_graph(&graph, &rewritten)?;
    let (at_init, _) = run(&rewritten, None)?;
    rows.push(("rewritten at init vs onnxruntime", err(&at_init, &ort, "y")));

    // 3. PEFT's trained-looking adapter (non-zero B, perturbed m) against PEFT itself.
    let (unmerged, _) = run(&model, Some(&adapter))?;
    rows.push((
        "base + PEFT DoRA adapter vs PEFT",
        err(&unmerged, &peft, "y"),
    ));

    // 4. Merge, write, reload: the merged model must match unmerged inference.
    let mut graph = super::common::load_graph(&model, &[], &shapes)?;
    super::common::apply_adapter(&mut graph, &adapter)?;
    crate::passes::merge_adapters(&mut graph)?;
    let merged = args.output.join(format!("{name}.merged.onnx"));
    save_graph(&graph, &merged)?;
    let (merged_out, _) = run(&merged, None)?;
    rows.push(("merged vs unmerged", err(&merged_out, &unmerged, "y")));

    let mut failures = 0;
    for (what, e) in rows {
        let ok = e <= TOLERANCE;
        failures += usize::from(!ok);
        println!(
            "   {what:<36} rel err {e:.2e}  {}",
            if ok { "ok" } else { "FAIL" }
        );
    }
    println!("   wrote {} and {}", rewritten.display(), merged.display());
    Ok(failures)
}

fn err(actual: &BTreeMap<String, Array>, expected: &BTreeMap<String, Array>, key: &str) -> f64 {
    match (actual.get(key), expected.get(key)) {
        (Some(a), Some(e)) => relative_error(&a.data, &e.data),
        _ => f64::INFINITY,
    }
}
