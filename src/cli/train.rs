//! `dorac train`: compile a training step for the GPU and run it over a data set.

use super::common::{apply_adapter, load_batched, AdapterArgs};
use crate::error::{Error, Result, Subject};
use crate::passes::insert_adapters;
use crate::train::checkpoint;
use crate::train::data::{self, Expected};
use crate::train::report::{write_loss_png, MetricsLog, Progress, StepRecord};
use crate::train::{AdamW, BuildOptions, LossKind, Schedule, Session, TrainMethod};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
#[command(after_help = TRAIN_EXAMPLES)]
pub struct Args {
    /// The base ONNX model (or one made by `dorac rewrite`).
    pub model: PathBuf,

    /// Training data (safetensors): tensors named after the graph inputs, plus the labels;
    /// dim 0 indexes examples.
    #[arg(long, value_name = "DATA.safetensors", help_heading = "Data and loss")]
    pub data: PathBuf,
    /// mse (targets shaped like the output), cross-entropy (class indices), lm (next-token
    /// cross-entropy on shifted logits).
    #[arg(long, value_enum, help_heading = "Data and loss")]
    pub loss: LossArg,
    /// The model output the loss reads [default: the first output].
    #[arg(long, value_name = "NAME", help_heading = "Data and loss")]
    pub loss_output: Option<String>,
    /// The labels tensor in DATA [default: `target` for mse, `labels` otherwise].
    #[arg(long, value_name = "TENSOR", help_heading = "Data and loss")]
    pub labels: Option<String>,
    /// Class index that does not count in cross-entropy losses.
    #[arg(long, default_value_t = -100, allow_hyphen_values = true, help_heading = "Data and loss")]
    pub ignore_index: i64,
    /// Evaluate on this data set (same tensor names as --data) every --eval-every steps and
    /// after the last: loss, and accuracy for classification and lm losses (as `dorac eval`
    /// defines them), in the progress line, metrics.jsonl and loss.png [default: no evaluation].
    #[arg(long, value_name = "DATA.safetensors", help_heading = "Data and loss")]
    pub eval_data: Option<PathBuf>,
    /// Steps between evaluations [default: one epoch].
    #[arg(
        long,
        value_name = "N",
        requires = "eval_data",
        help_heading = "Data and loss"
    )]
    pub eval_every: Option<usize>,

    /// Optimizer steps [default: one epoch, or --epochs].
    #[arg(long, conflicts_with = "epochs", help_heading = "Steps")]
    pub steps: Option<usize>,
    /// Passes over the data set; the last partial batch of each is dropped [default: 1].
    #[arg(long, help_heading = "Steps")]
    pub epochs: Option<usize>,
    /// Examples per step [default: the batch the model was exported with if fixed, else
    /// min(8, examples)].
    #[arg(long, help_heading = "Steps")]
    pub batch_size: Option<usize>,
    /// Seed for adapter initialisation and data order.
    #[arg(long, default_value_t = 0, help_heading = "Steps")]
    pub seed: u64,
    /// Keep the data set's order.
    #[arg(long, help_heading = "Steps")]
    pub no_shuffle: bool,

    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4, help_heading = "Optimizer")]
    pub lr: f64,
    /// AdamW's decoupled weight decay (applied to every trained tensor, as PyTorch does).
    #[arg(long, default_value_t = 0.01, help_heading = "Optimizer")]
    pub weight_decay: f64,
    /// Adam betas.
    #[arg(
        long,
        default_value = "0.9,0.999",
        value_name = "B1,B2",
        help_heading = "Optimizer"
    )]
    pub betas: String,
    /// Adam epsilon (added outside the square root).
    #[arg(long, default_value_t = 1e-8, help_heading = "Optimizer")]
    pub eps: f64,
    /// Clip the global gradient L2 norm to this value [default: no clipping].
    #[arg(long, value_name = "MAX_NORM", help_heading = "Optimizer")]
    pub grad_clip: Option<f64>,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value = "linear", help_heading = "Optimizer")]
    pub schedule: ScheduleArg,
    /// Linear warmup steps from 0 to --lr.
    #[arg(long, default_value_t = 0, help_heading = "Optimizer")]
    pub warmup: usize,

    /// dora, lora, magnitude (m only), direction (A and B only), full (the weights themselves).
    #[arg(long, value_enum, default_value = "dora", help_heading = "Adapter")]
    pub method: MethodArg,
    #[command(flatten)]
    pub adapter_args: AdapterArgs,
    /// Start from this PEFT adapter instead of a fresh one [default: fresh adapters, PEFT's
    /// initialisation].
    #[arg(long, value_name = "DIR", help_heading = "Adapter")]
    pub adapter: Option<PathBuf>,
    /// Differentiate through the DoRA norm (the default detaches it, as PEFT does).
    #[arg(long, help_heading = "Adapter")]
    pub exact_norm_grad: bool,
    /// Store each DoRA layer's activation for the next layer's products. By default it is not
    /// stored: they compute it again from the layer's `u` (kept anyway for the magnitude's
    /// gradient) as they load it, so DoRA keeps what LoRA keeps (on lavapipe that is also the
    /// faster step).
    #[arg(long, help_heading = "Engine")]
    pub store_activations: bool,
    /// The default now (see --store-activations); accepted for scripts that still pass it.
    #[arg(long, hide = true, conflicts_with = "store_activations")]
    pub lean_activations: bool,
    /// The Hugging Face name or path of the base model, written as the adapter's
    /// `base_model_name_or_path` [default: --adapter's, else unset].
    #[arg(long, value_name = "NAME", help_heading = "Adapter")]
    pub base_model: Option<String>,

    /// Output folder: the adapter (PEFT format), checkpoints, metrics.jsonl, loss.png
    /// [default: ./<model stem>-<method>].
    #[arg(
        short,
        long,
        value_name = "DIR",
        alias = "out",
        help_heading = "Output"
    )]
    pub output: Option<PathBuf>,
    /// Save a checkpoint every K steps [default: only after the last step].
    #[arg(long, value_name = "K", help_heading = "Output")]
    pub save_every: Option<usize>,
    /// How many of the newest checkpoints to keep (0: all of them, as `dorac analyze` wants).
    #[arg(long, value_name = "N", default_value_t = 2, help_heading = "Output")]
    pub keep_checkpoints: usize,
    /// Continue from the newest checkpoint in the output folder (optimizer state and data
    /// order included).
    #[arg(long, help_heading = "Output", conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace an earlier run's checkpoints, metrics and adapter in the output folder (without
    /// it a fresh run there is refused).
    #[arg(long, help_heading = "Output")]
    pub overwrite: bool,
    /// No progress bar (evaluations and the summary are still printed).
    #[arg(long, help_heading = "Output")]
    pub quiet: bool,

    #[command(flatten)]
    pub engine: super::common::EngineArgs,
    /// Store the frozen weights on the device in half precision (f16 or bf16), or quantize them
    /// to 4- or 8-bit block codes first (int4, int8: QDoRA and QLoRA, the adapters' norms and
    /// magnitudes taken from the quantized weights); the adapters, their gradients and optimizer
    /// state stay f32, and so does all compute [default: the model's own precision].
    #[arg(long, value_enum, value_name = "FORMAT", help_heading = "Engine")]
    pub storage: Option<super::common::StorageArg>,
    /// Pin a symbolic dim (`seq=64`); the batch dim follows --batch-size [default: none].
    #[arg(long = "shape", value_name = "NAME=DIMS", help_heading = "Shapes")]
    pub shapes: Vec<String>,
}

const TRAIN_EXAMPLES: &str = "\
Examples:
  dorac train models/mlp2d/model.onnx --data models/demo/teacher.safetensors --loss mse --lr 1e-2 --epochs 5 --batch-size 32 --rank 4 -o mlp2d-dora
  dorac train models/shift/base.onnx --data models/shift/train_b.safetensors --eval-data models/shift/eval_b.safetensors --loss cross-entropy --rank 4 --lr 5e-3 --batch-size 32 --steps 256 --eval-every 64 -o shift-dora
  dorac train models/shift/base.onnx --data models/shift/train_b.safetensors --loss cross-entropy --method lora --target fc1,fc2 --rank 4 --lr 5e-3 --batch-size 32 --steps 128 --save-every 64 -o shift-lora";

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum LossArg {
    Mse,
    CrossEntropy,
    Lm,
}

impl LossArg {
    pub fn kind(self, ignore_index: i64) -> LossKind {
        match self {
            LossArg::Mse => LossKind::Mse,
            LossArg::CrossEntropy => LossKind::CrossEntropy { ignore_index },
            LossArg::Lm => LossKind::Lm { ignore_index },
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum MethodArg {
    Dora,
    Lora,
    Magnitude,
    Direction,
    Full,
}

impl From<MethodArg> for TrainMethod {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Dora => TrainMethod::Dora,
            MethodArg::Lora => TrainMethod::Lora,
            MethodArg::Magnitude => TrainMethod::Magnitude,
            MethodArg::Direction => TrainMethod::Direction,
            MethodArg::Full => TrainMethod::Full,
        }
    }
}

fn parse_betas(s: &str) -> Result<(f64, f64)> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let bad = || {
        Error::input_at(
            Subject::flag_value("--betas", s),
            "expected two numbers in [0, 1), e.g. 0.9,0.999",
        )
    };
    if parts.len() != 2 {
        return Err(bad());
    }
    let b1: f64 = parts[0].parse().map_err(|_| bad())?;
    let b2: f64 = parts[1].parse().map_err(|_| bad())?;
    if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
        return Err(bad());
    }
    Ok((b1, b2))
}

pub fn run(args: Args) -> Result<()> {
    let method = TrainMethod::from(args.method);
    let loss = match args.loss {
        LossArg::Mse => LossKind::Mse,
        LossArg::CrossEntropy => LossKind::CrossEntropy {
            ignore_index: args.ignore_index,
        },
        LossArg::Lm => LossKind::Lm {
            ignore_index: args.ignore_index,
        },
    };
    let labels = args
        .labels
        .clone()
        .unwrap_or_else(|| super::eval::default_labels(loss).into());
    let (beta1, beta2) = parse_betas(&args.betas)?;
    check_hyperparameters(&args)?;
    let optimizer = AdamW {
        lr: args.lr,
        beta1,
        beta2,
        eps: args.eps,
        weight_decay: args.weight_decay,
        grad_clip: args.grad_clip,
    };
    let schedule = match args.schedule {
        ScheduleArg::Constant => Schedule::Constant,
        ScheduleArg::Linear => Schedule::Linear,
        ScheduleArg::Cosine => Schedule::Cosine,
    };
    // Outputs go to the current directory unless -o says otherwise, never beside the input.
    let out = args.output.clone().unwrap_or_else(|| {
        let stem = args
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        PathBuf::from(format!("{stem}-{}", method.name()))
    });

    // The data decides the batch size; the model is re-batched to it.
    let raw = crate::tensors_io::read_safetensors_typed(&args.data)?;
    let (mut graph, batch_size) = load_batched(
        &args.model,
        &args.shapes,
        args.batch_size,
        data::count_examples(&raw).clamp(1, 8),
        &data::example_shapes(&raw),
    )?;
    let output_node = find_output(&graph, args.loss_output.as_deref(), "--loss-output")?;
    let expected = Expected::for_model(&graph, output_node, &labels, loss);
    let dataset = data::from_tensors(&args.data, raw, &expected)?;
    graph
        .check_lookups(&dataset.tensors)
        .map_err(|m| Error::input_at(Subject::file(&args.data), m))?;
    let per_epoch = dataset.batches_per_epoch(batch_size)?;
    let total = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * per_epoch,
        (None, None) => per_epoch,
    };
    if total == 0 {
        return Err(Error::input("nothing to do: 0 steps"));
    }

    // Codes first: fresh DoRA magnitudes are the quantized weights' norms, as in PEFT.
    if let (None, Some(storage)) = (method.adapter(), args.storage) {
        if storage.code_bits().is_some() {
            return Err(Error::input_at(
                Subject::flag("--storage"),
                "int4 and int8 quantize the frozen weights before training, and --method full \
                 trains the weights themselves: use f16 or bf16, or an adapter method",
            ));
        }
    }
    super::common::apply_codes(&mut graph, args.storage);
    // Adapters: a given PEFT adapter, a rewritten model's own, or fresh ones (PEFT's init).
    if let Some(dir) = &args.adapter {
        apply_adapter(&mut graph, dir)?;
    } else if graph.adapters().is_empty() {
        if let Some(kind) = method.adapter() {
            let specs = args
                .adapter_args
                .specs(&graph, kind, args.seed, &args.model)?;
            insert_adapters(&mut graph, specs)?;
            graph.adapter_origin.target_modules = args.adapter_args.patterns();
        }
    }
    if args.base_model.is_some() {
        graph.adapter_origin.base_model = args.base_model.clone();
    }
    let opts = BuildOptions {
        method,
        loss,
        output: args.loss_output.clone(),
        labels: labels.clone(),
        optimizer: optimizer.clone(),
        exact_norm_grad: args.exact_norm_grad,
        expose_grads: false,
        full_targets: (!args.adapter_args.targets.is_empty()).then(|| args.adapter_args.patterns()),
        lean_activations: !args.store_activations,
    };
    let gpu = args.engine.open_gpu("training")?;
    // Trainable tensors over the device's binding limit are trained in chunks.
    let limit = gpu
        .as_ref()
        .map(|g| g.limits().max_storage_buffer_binding_size);
    let half = args.storage.and_then(super::common::StorageArg::half);
    let prepared = crate::pipeline::training(graph.clone(), &opts, limit, half)?;
    if let (Some(r), Some(storage)) = (&prepared.storage, args.storage) {
        super::common::report_storage(r, storage);
    }
    let program = prepared.value;
    let trainable: usize = program.params.iter().map(|p| p.initial.numel()).sum();
    let engine = gpu
        .as_ref()
        .map(|g| g.describe())
        .unwrap_or_else(|| "CPU reference executor".into());
    let param_names: Vec<String> = program
        .params
        .iter()
        .map(|p| p.part_of.as_ref().map_or(&p.name, |w| &w.0).clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut session = Session::new(program, gpu.as_ref())?;
    // Evaluation: the same model with the trained tensors as inputs, set before each run.
    let mut eval = match &args.eval_data {
        None => None,
        Some(path) => {
            let dataset = data::load(path, &expected)?;
            graph
                .check_lookups(&dataset.tensors)
                .map_err(|m| Error::input_at(Subject::file(path), m))?;
            let evaluator = super::common::evaluator(
                graph.clone(),
                args.loss_output.as_deref(),
                loss,
                &labels,
                &param_names,
                gpu.as_ref(),
            )?;
            Some((evaluator, dataset))
        }
    };
    let eval_every = args.eval_every.unwrap_or(per_epoch).max(1);

    let config = json!({
        "model": args.model.display().to_string(), "data": args.data.display().to_string(),
        "method": method.name(), "loss": loss.name(), "labels": labels, "rank": args.adapter_args.rank,
        "alpha": args.adapter_args.alpha, "rslora": args.adapter_args.rslora, "lr": args.lr, "betas": [beta1, beta2],
        "eps": args.eps, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
        "schedule": format!("{schedule:?}").to_lowercase(), "warmup": args.warmup,
        "batch_size": batch_size, "total_steps": total, "seed": args.seed,
        "shuffle": !args.no_shuffle, "exact_norm_grad": args.exact_norm_grad,
    });
    // One run per folder at a time; a fresh run does not mix with an earlier run's files.
    let _lock = checkpoint::RunLock::acquire(&out)?;
    if !args.resume {
        checkpoint::prepare_fresh(&out, args.overwrite)?;
    }
    let mut start = 0;
    if args.resume {
        let (step, dir) = checkpoint::latest(&out)?.ok_or_else(|| {
            Error::input_at(
                Subject::flag("--resume"),
                format!("no checkpoint in {}", out.display()),
            )
        })?;
        let record = checkpoint::read_record(&dir)?;
        if record["config"] != config {
            return Err(Error::input_at(
                Subject::flag("--resume"),
                format!(
                    "{} was made with different settings; resume with the same flags (saved: {})",
                    dir.display(),
                    record["config"]
                ),
            ));
        }
        checkpoint::restore(&dir, &mut session)?;
        start = step;
        eprintln!("resuming from {} (step {step})", dir.display());
    }
    println!(
        "training {} on {engine}: method {}, {} trainable parameters, {} examples, batch {batch_size}, {total} steps",
        args.model.display(),
        method.name(),
        trainable,
        dataset.examples
    );
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let mut log = MetricsLog::open(&out, Some(start))?;
    let mut progress = Progress::new(total, start, args.quiet);
    let clock = Instant::now();
    let abort_after: Option<usize> = std::env::var("DORAC_ABORT_AFTER_STEP")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut order_epoch = usize::MAX;
    let mut order = vec![];
    let save = |graph: &mut crate::ir::Graph, session: &Session| -> Result<PathBuf> {
        checkpoint::sync_params(graph, session)?;
        let rec = checkpoint::trainer_record(session.steps_taken()?, total, args.seed, &config);
        checkpoint::save(&out, graph, session, &rec, args.keep_checkpoints)
    };
    for step in start..total {
        let (epoch, b) = (step / per_epoch, step % per_epoch);
        if epoch != order_epoch {
            order = dataset.order(args.seed, epoch, !args.no_shuffle);
            order_epoch = epoch;
        }
        let batch = dataset.batch(&order, b, batch_size);
        let lr = schedule.lr(args.lr, step, total, args.warmup);
        let (metrics, _) = session.step(&batch, lr, &[])?;
        if !metrics.loss.is_finite() {
            progress.finish();
            log.flush()?;
            let last = checkpoint::latest(&out)?
                .map(|(s, d)| format!("the last checkpoint ({}, step {s}) is intact", d.display()))
                .unwrap_or_else(|| "no checkpoint was written".into());
            return Err(Error::input(format!(
                "the loss became {} at step {} (lr {lr:.3e}); stopping: {last}. Try a lower --lr or --grad-clip",
                metrics.loss,
                step + 1
            )));
        }
        let done = step + 1;
        let mut evaluated = None;
        if let Some((evaluator, eval_data)) = &mut eval {
            if done % eval_every == 0 || done == total {
                evaluator.set_params(&session.params()?)?;
                let m = evaluator.evaluate(eval_data)?;
                progress.println(&format!("step {done}: {}", super::eval::describe(&m, loss)));
                evaluated = Some(m);
            }
        }
        let rec = StepRecord {
            step,
            epoch,
            loss: metrics.loss,
            lr,
            grad_norm: metrics.grad_norm,
            elapsed_s: clock.elapsed().as_secs_f64(),
            eval_loss: evaluated.as_ref().map(|m| m.loss),
            eval_accuracy: evaluated.as_ref().and_then(|m| m.accuracy),
        };
        progress.update(&rec);
        log.push(rec)?;
        if args.save_every.is_some_and(|k| k > 0 && done % k == 0) && done < total {
            log.flush()?;
            save(&mut graph, &session)?;
        }
        if abort_after == Some(done) {
            // Fault injection for the crash-safety tests: die like a killed process would.
            std::process::abort();
        }
    }
    progress.finish();
    log.flush()?;
    let ckpt = save(&mut graph, &session)?;
    checkpoint::write_weights(&graph, &session, &out)?;
    write_loss_png(&out.join("loss.png"), log.records(), 640, 400)?;
    let first = log.records().first().map(|r| r.loss).unwrap_or(f64::NAN);
    let last = log.records().last().map(|r| r.loss).unwrap_or(f64::NAN);
    println!(
        "loss {first:.6} -> {last:.6} in {:.1} s; wrote {} ({}), {}, metrics.jsonl, loss.png",
        clock.elapsed().as_secs_f64(),
        out.display(),
        if method == TrainMethod::Full {
            "trained weights"
        } else {
            "adapter"
        },
        ckpt.file_name().unwrap().to_string_lossy()
    );
    Ok(())
}

/// The model output named `name` (by `flag`), or the first output.
pub fn find_output(
    graph: &crate::ir::Graph,
    name: Option<&str>,
    flag: &str,
) -> Result<crate::ir::NodeId> {
    graph
        .find_output(name)
        .map(|(_, id)| id)
        .map_err(|e| match name {
            Some(name) => e.within(Subject::flag_value(flag, name)),
            None => e.within(Subject::flag(flag)),
        })
}

/// Refuses hyperparameters outside their meaningful range, naming the flag.
fn check_hyperparameters(args: &Args) -> Result<()> {
    let bad = |flag: &str, v: f64, want: &str| {
        Err(Error::input_at(
            Subject::flag_value(flag, v),
            format!("expected {want}"),
        ))
    };
    if !(args.lr.is_finite() && args.lr > 0.0) {
        return bad("--lr", args.lr, "a positive number");
    }
    if !(args.weight_decay.is_finite() && args.weight_decay >= 0.0) {
        return bad("--weight-decay", args.weight_decay, "a number >= 0");
    }
    if !(args.eps.is_finite() && args.eps > 0.0) {
        return bad("--eps", args.eps, "a positive number");
    }
    if let Some(c) = args.grad_clip {
        if !(c.is_finite() && c > 0.0) {
            return bad("--grad-clip", c, "a positive number");
        }
    }
    if args.steps == Some(0) || args.epochs == Some(0) {
        return Err(Error::input("nothing to do: 0 steps"));
    }
    if args.eval_every == Some(0) {
        return Err(Error::input_at(
            Subject::flag_value("--eval-every", 0),
            "expected at least 1",
        ));
    }
    if args.batch_size == Some(0) {
        return Err(Error::input_at(
            Subject::flag_value("--batch-size", 0),
            "expected at least 1",
        ));
    }
    Ok(())
}
