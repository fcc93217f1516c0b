//! `dorac eval`: a model's loss and accuracy on a data set, with a saved adapter (or a full
//! fine-tuning run's weights) applied, or a merged model as it is.

use super::common::{apply_adapter, load_batched};
use super::train::LossArg;
use crate::error::{Error, Result};
use crate::train::data::{self, Expected};
use crate::train::eval::EvalMetrics;
use crate::train::report::format_loss;
use crate::train::LossKind;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(after_help = EVAL_HELP)]
pub struct Args {
    /// The model: a base ONNX model (with --adapter), a merged or rewritten one.
    pub model: PathBuf,
    /// A PEFT adapter folder, or a training run's folder or checkpoint (an adapter, or the
    /// trained weights of --method full) [default: none: the model as it is].
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The data (safetensors): tensors named after the graph inputs, plus the labels; dim 0
    /// indexes examples.
    #[arg(long, value_name = "DATA.safetensors")]
    pub data: PathBuf,
    /// How to score the output (see Metrics below).
    #[arg(long, value_enum)]
    pub loss: LossArg,
    /// The model output to score [default: the first output].
    #[arg(long, value_name = "NAME")]
    pub loss_output: Option<String>,
    /// The labels tensor in DATA [default: `target` for mse, `labels` otherwise].
    #[arg(long, value_name = "TENSOR")]
    pub labels: Option<String>,
    /// Class index that does not count (cross-entropy and lm).
    #[arg(long, default_value_t = -100, allow_hyphen_values = true)]
    pub ignore_index: i64,
    #[arg(help_heading = "Shapes")]
    /// Examples per forward pass [default: the batch the model was exported with if fixed, else
    /// min(32, examples)]; the result does not depend on it.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Pin a symbolic dim (`seq=64`); the batch dim follows --batch-size [default: none].
    #[arg(long = "shape", value_name = "NAME=DIMS", help_heading = "Shapes")]
    pub shapes: Vec<String>,
    /// Write the metrics as JSON to this file [default: print them only].
    #[arg(short, long, value_name = "METRICS.json")]
    pub output: Option<PathBuf>,
    /// Store the frozen weights as `train --storage` did: int4 or int8 quantizes them before the
    /// adapter is applied, so an adapter trained with QDoRA is scored on the weights it trained
    /// on; f16 or bf16 rounds them [default: the model's own precision].
    #[arg(long, value_enum, value_name = "FORMAT", help_heading = "Engine")]
    pub storage: Option<super::common::StorageArg>,
    #[command(flatten)]
    pub engine: super::common::EngineArgs,
}

const EVAL_HELP: &str = concat!(
    "Metrics (computed in f64 from the model's outputs, over the whole data set in file order):\n",
    "  mse            loss = mean over every output element of every example of (y - target)^2\n",
    "  cross-entropy  loss = mean over labelled positions (label != --ignore-index) of\n",
    "                 logsumexp(logits) - logits[label]; accuracy = fraction of those positions\n",
    "                 whose arg-max logit (the first on ties) is the label\n",
    "  lm             the same, scoring the logits at position t against the label at t + 1\n",
    "                 (token accuracy)\n",
    "The loss is a mean over positions, not over batches, so it does not depend on --batch-size.\n",
    "\n",
    "Examples:\n",
    "  dorac eval models/shift/base.onnx --data models/shift/eval_b.safetensors --loss cross-entropy\n",
    "  dorac eval models/shift/base.onnx --adapter shift-dora --data models/shift/eval_b.safetensors --loss cross-entropy -o shift-dora-eval.json\n",
    "  dorac eval models/mlp2d/model.onnx --adapter mlp2d-dora --data models/demo/teacher.safetensors --loss mse"
);

pub fn run(args: Args) -> Result<()> {
    let loss = args.loss.kind(args.ignore_index);
    let labels = args
        .labels
        .clone()
        .unwrap_or_else(|| default_labels(loss).into());
    let raw = crate::tensors_io::read_safetensors_typed(&args.data)?;
    if args.batch_size == Some(0) {
        return Err(Error::input("--batch-size must be at least 1"));
    }
    let (mut graph, _) = load_batched(
        &args.model,
        &args.shapes,
        args.batch_size,
        data::count_examples(&raw).clamp(1, 32),
        &data::example_shapes(&raw),
    )?;
    super::common::apply_codes(&mut graph, args.storage);
    if let Some(dir) = &args.adapter {
        apply_adapter(&mut graph, dir)?;
    }
    if let Some(storage) = args.storage.filter(|s| s.half().is_some()) {
        super::common::apply_storage(&mut graph, storage)?;
    }
    let output = super::train::find_output(&graph, args.loss_output.as_deref(), "--loss-output")?;
    let expected = Expected::for_model(&graph, output, &labels, loss);
    let dataset = data::from_tensors(&args.data, raw, &expected)?;
    graph
        .check_lookups(&dataset.tensors)
        .map_err(|m| Error::input_at(crate::error::Subject::file(&args.data), m))?;
    let gpu = args.engine.open_gpu("evaluating")?;
    let name = graph
        .outputs()
        .iter()
        .find(|o| o.1 == output)
        .map(|o| o.0.clone());
    let mut evaluator =
        super::common::evaluator(graph, name.as_deref(), loss, &labels, &[], gpu.as_ref())?;
    let m = evaluator.evaluate(&dataset)?;
    println!("{}", describe(&m, loss));
    if let Some(out) = &args.output {
        let text = serde_json::to_string_pretty(&m).expect("metrics serialise");
        crate::tensors_io::write_atomic(out, text.as_bytes())?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// The labels tensor's default name for a loss.
pub fn default_labels(loss: LossKind) -> &'static str {
    if loss == LossKind::Mse {
        "target"
    } else {
        "labels"
    }
}

/// `loss 0.4312, accuracy 81.25% (832/1024 positions), 1024 examples`.
pub fn describe(m: &EvalMetrics, loss: LossKind) -> String {
    let what = match loss {
        LossKind::Mse => "elements",
        LossKind::CrossEntropy { .. } => "labels",
        LossKind::Lm { .. } => "tokens",
    };
    match (m.accuracy, m.correct) {
        (Some(a), Some(c)) => format!(
            "eval {} loss {}, accuracy {:.2}% ({c}/{} {what}), {} examples",
            loss.name(),
            format_loss(m.loss),
            100.0 * a,
            m.counted,
            m.examples
        ),
        _ => format!(
            "eval {} loss {} ({} {what}), {} examples",
            loss.name(),
            format_loss(m.loss),
            m.counted,
            m.examples
        ),
    }
}
