//! Pieces the subcommands share: loading a model with its pins, applying an adapter, running a
//! graph on the GPU or the reference executor, and the adapted-layer table.

use crate::error::{Error, Result, Subject};
use crate::ir::{Graph, Method};
use crate::passes::{find_linear_layers, matches_target, AdapterInit, AdapterSpec};
use crate::tensor::{shape_str, Array};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Loads and imports an ONNX model. `shapes` are `--shape NAME=DIMS` arguments; `input_shapes`
/// pin whole inputs (from the tensors a user supplied).
pub fn load_graph(
    path: &Path,
    shapes: &[String],
    input_shapes: &HashMap<String, Vec<usize>>,
) -> Result<Graph> {
    load_graph_with_values(path, shapes, input_shapes, &HashMap::new())
}

/// [`load_graph`] with the values of inputs that ops need at import (shapes, axes, split sizes
/// fed as graph inputs), see [`crate::onnx::import_with_values`].
pub fn load_graph_with_values(
    path: &Path,
    shapes: &[String],
    input_shapes: &HashMap<String, Vec<usize>>,
    input_values: &HashMap<String, Array>,
) -> Result<Graph> {
    let model = crate::onnx::load_model(path)?;
    let pins = crate::onnx::ShapePins::parse(shapes)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let graph = crate::onnx::import_with_values(&model, dir, &pins, input_shapes, input_values)
        .map_err(|e| match e {
            e @ Error::Onnx { .. } => e.within(Subject::file(path)),
            other => other,
        })?;
    print_warnings(&graph, path);
    Ok(graph)
}

/// Prints what the import noticed but did not refuse, once per model load.
fn print_warnings(graph: &Graph, path: &Path) {
    for w in &graph.info.warnings {
        eprintln!("warning: {}: {w}", path.display());
    }
}

/// Applies what a training run saved in `dir` to a graph: a PEFT adapter folder (inserting or
/// replacing adapters), or a full fine-tuning run's `trained_weights.safetensors` (replacing
/// the weights it names). Returns the names of the weights it replaced (none for an adapter).
pub fn apply_adapter(graph: &mut Graph, dir: &Path) -> Result<Vec<String>> {
    let weights = dir.join(crate::train::checkpoint::FULL_WEIGHTS_FILE);
    if !dir.join(crate::adapter::CONFIG_FILE).exists() && weights.exists() {
        return crate::train::checkpoint::load_trained_weights(graph, &weights);
    }
    let adapter = crate::adapter::load(dir)?;
    crate::adapter::apply(graph, &adapter)?;
    Ok(vec![])
}

/// Imports the model with dim 0 of every input set to the batch size: `batch`, or when that is
/// `None` the batch the model was exported with if it is fixed, else `default`. Returns the
/// graph and the batch size.
/// The inputs' other symbolic dims are sized by the data's tensors of the same names
/// (`examples`: their shapes without dim 0), where `--shape` does not size them.
pub fn load_batched(
    path: &Path,
    shapes: &[String],
    batch: Option<usize>,
    default: usize,
    examples: &HashMap<String, Vec<usize>>,
) -> Result<(Graph, usize)> {
    let model = crate::onnx::load_model(path)?;
    let batch = batch
        .or_else(|| crate::onnx::fixed_batch_dim(&model))
        .unwrap_or(default);
    let given = crate::onnx::shapes_from_examples(&model, examples, batch);
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut shapes = shapes.to_vec();
    shapes.extend(crate::onnx::cache_pins(&model, dir, examples, &shapes));
    Ok((rebatch(model, path, &shapes, batch, &given)?, batch))
}

/// Imports the model with dim 0 of every input set to the batch size.
pub fn load_rebatched(path: &Path, shapes: &[String], batch: usize) -> Result<Graph> {
    rebatch(
        crate::onnx::load_model(path)?,
        path,
        shapes,
        batch,
        &HashMap::new(),
    )
}

fn rebatch(
    mut model: crate::onnx::proto::ModelProto,
    path: &Path,
    shapes: &[String],
    batch: usize,
    given: &HashMap<String, Vec<usize>>,
) -> Result<Graph> {
    let fixed = crate::onnx::fixed_batch_dim(&model).filter(|&n| n != batch);
    let first_input = crate::onnx::first_data_input(&model);
    crate::onnx::set_batch_dim(&mut model, batch);
    let pins = crate::onnx::ShapePins::parse(shapes)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let graph = crate::onnx::import(&model, dir, &pins, given)
        .map_err(|e| with_batch_hint(e, path, fixed, &first_input, batch, "--batch-size"))?;
    print_warnings(&graph, path);
    Ok(graph)
}

/// A shape error met at a batch size other than the one the model was exported with (`fixed`)
/// most likely comes from that size baked into the graph's constants: say so, and how to fix it.
fn with_batch_hint(
    e: Error,
    path: &Path,
    fixed: Option<usize>,
    input: &str,
    batch: usize,
    flag: &str,
) -> Error {
    match (e, fixed) {
        (Error::Shape { at, message }, Some(n)) => Error::Shape {
            at,
            message: format!(
            "{message}\n  hint: {} was exported with a fixed batch of {n} (dim 0 of input '{input}'), and its graph \
             may bake that size into constants (reshape targets, masks), so it fails at batch {batch}: \
             use {flag} {n}, or export the model with a dynamic batch axis",
            path.display()
        ),
        },
        (e, _) => e,
    }
}

/// Where a command computes: flags shared by run, train, eval and generate.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Engine")]
pub struct EngineArgs {
    /// GPU backend: vulkan, metal, dx12 or gl [default: the first wgpu finds].
    #[arg(long, value_name = "B")]
    pub backend: Option<String>,
    /// Compute on the CPU reference executor (f64) instead of the GPU.
    #[arg(long)]
    pub reference: bool,
}

impl EngineArgs {
    /// See [`open_gpu`].
    pub fn open_gpu(&self, doing: &str) -> Result<Option<crate::runtime::Gpu>> {
        open_gpu(self.backend.as_deref(), self.reference, doing)
    }
}

/// The GPU, or `None` for the reference executor: when asked (`--reference`), or when no
/// adapter exists and no backend was asked for (with a note saying so). `doing` completes
/// "no GPU adapter found; ... on the CPU reference executor".
pub fn open_gpu(
    backend: Option<&str>,
    reference: bool,
    doing: &str,
) -> Result<Option<crate::runtime::Gpu>> {
    if reference {
        return Ok(None);
    }
    no_adapter_falls_back(crate::runtime::Gpu::new(backend), backend, doing)
}

/// `opened`, or `None` with a note when no adapter exists and no backend was asked for.
fn no_adapter_falls_back(
    opened: Result<crate::runtime::Gpu>,
    backend: Option<&str>,
    doing: &str,
) -> Result<Option<crate::runtime::Gpu>> {
    match opened {
        Ok(g) => Ok(Some(g)),
        Err(e) if backend.is_none() && crate::runtime::is_no_adapter(&e) => {
            eprintln!("note: no GPU adapter found; {doing} on the CPU reference executor (slow). Install a Vulkan driver (Debian/Ubuntu: apt-get install mesa-vulkan-drivers).");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A device being opened on a thread of its own while the model is read and compiled: opening
/// one takes tens of milliseconds on a CPU driver, as long as importing a small model.
///
/// Dropped unopened (a bad input refused first), it waits for the thread: `process::exit` while
/// the thread is still loading the driver runs the C++ static destructors of the half-loaded
/// libLLVM under it, and lavapipe then aborts the process (`LLVM ERROR: inconsistency in
/// registered CommandLine options`, exit code 134) after dorac's own error line.
pub struct OpeningGpu {
    backend: Option<String>,
    thread: Option<std::thread::JoinHandle<Result<crate::runtime::Gpu>>>,
}

impl OpeningGpu {
    /// Starts opening the device [`open_gpu`] would open (none when `reference`).
    pub fn start(backend: Option<&str>, reference: bool) -> OpeningGpu {
        let owned = backend.map(str::to_string);
        let thread = (!reference).then(|| {
            let backend = owned.clone();
            std::thread::spawn(move || crate::runtime::Gpu::new(backend.as_deref()))
        });
        OpeningGpu {
            backend: owned,
            thread,
        }
    }

    /// The device, as [`open_gpu`] gives it (with its note when no adapter exists).
    pub fn wait(mut self, doing: &str) -> Result<Option<crate::runtime::Gpu>> {
        let Some(thread) = self.thread.take() else {
            return Ok(None);
        };
        let opened = thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        no_adapter_falls_back(opened, self.backend.as_deref(), doing)
    }
}

impl Drop for OpeningGpu {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // The device, or the failure to open one, is of no use now: only the wait matters.
            let _ = thread.join();
        }
    }
}

/// Writes the rendered ONNX of `graph` to `out`, atomically (with external data when the
/// input had it or the model is too large to be one file: [`crate::onnx::save_graph`]).
pub fn save_graph(graph: &Graph, out: &Path) -> Result<()> {
    create_parent(out)?;
    crate::onnx::save_graph(graph, out)
}

/// Creates the folder an output file goes in (`-o out/model.onnx`), as `train -o` creates its.
pub fn create_parent(out: &Path) -> Result<()> {
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e)),
        None => Ok(()),
    }
}

/// `dir/model.onnx` -> `model.<suffix>.onnx` in the current directory: a command writes where
/// its user is, never into the input's folder.
pub fn default_output(model: &Path, suffix: &str) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    PathBuf::from(format!("{stem}.{suffix}.onnx"))
}

/// `--storage`: the device format of an f32 model's frozen weights.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageArg {
    /// IEEE half: 2^-11 relative rounding, range up to 65504.
    F16,
    /// bfloat16: 2^-8 relative rounding, f32's range.
    Bf16,
    /// 4-bit codes in blocks of 32 with a scale and a zero point each (QLoRA's and QDoRA's
    /// base), within half a step of each block: about 1/30 of a block's range.
    Int4,
    /// 8-bit codes in blocks of 32, within half a step: about 1/510 of a block's range.
    Int8,
}

impl StorageArg {
    /// The half-precision format, for `f16` and `bf16`.
    pub fn half(self) -> Option<crate::ir::Half> {
        match self {
            StorageArg::F16 => Some(crate::ir::Half::F16),
            StorageArg::Bf16 => Some(crate::ir::Half::Bf16),
            StorageArg::Int4 | StorageArg::Int8 => None,
        }
    }

    /// The bits of a code, for `int4` and `int8`.
    pub fn code_bits(self) -> Option<usize> {
        match self {
            StorageArg::Int4 => Some(4),
            StorageArg::Int8 => Some(8),
            StorageArg::F16 | StorageArg::Bf16 => None,
        }
    }

    fn name(self) -> String {
        match (self.half(), self.code_bits()) {
            (Some(h), _) => h.name().to_string(),
            (None, Some(bits)) => format!(
                "{bits}-bit codes in blocks of {}",
                crate::passes::codes::CODE_BLOCK
            ),
            (None, None) => unreachable!("every format is one or the other"),
        }
    }
}

/// Says what `--storage` did to the weights.
pub fn report_storage(r: &crate::passes::HalfReport, storage: StorageArg) {
    eprintln!(
        "storage: {} weight tensors ({} values) stored as {}, max rounding error {:.2e} of \
         each tensor's largest value",
        r.tensors,
        r.elements,
        storage.name(),
        r.max_relative_error
    );
}

/// `--storage int4|int8`, applied first, before adapters and folding read the weights: the
/// frozen weights become block codes ([`crate::passes::store_codes`]), and every later pass
/// (DoRA's norms and magnitudes too) sees the values they decode to. Half precision waits for
/// the pipelines' last stage ([`apply_storage`]).
pub fn apply_codes(graph: &mut Graph, storage: Option<StorageArg>) {
    if let Some(bits) = storage.and_then(StorageArg::code_bits) {
        report_storage(
            &crate::passes::store_codes(graph, bits),
            storage.expect("given"),
        );
    }
}

/// Stores `graph`'s frozen weights as `storage` says (half precision as the pipelines' last
/// stage does, [`crate::pipeline::store`]) and says what that did.
pub fn apply_storage(graph: &mut Graph, storage: StorageArg) -> Result<()> {
    match storage.half() {
        Some(half) => report_storage(&crate::pipeline::store(graph, half)?, storage),
        None => apply_codes(graph, Some(storage)),
    }
    Ok(())
}

/// An evaluator of `output` (None: the model's first) through the inference pipeline, with
/// the trained tensors `params` written before each evaluation.
pub fn evaluator(
    graph: Graph,
    output: Option<&str>,
    kind: crate::train::LossKind,
    labels: &str,
    params: &[String],
    gpu: Option<&crate::runtime::Gpu>,
) -> Result<crate::train::eval::Evaluator> {
    let (output, _) = graph.find_output(output)?;
    let pipeline = crate::pipeline::Inference {
        output: Some(output),
        live: params.to_vec(),
        ..Default::default()
    };
    let graph = pipeline.run(graph)?.value;
    crate::train::eval::Evaluator::new(graph, kind, labels, params, gpu)
}

/// Where a graph ran.
pub enum Engine {
    Gpu(String),
    Reference,
}

/// Runs an inference graph: on wgpu when an adapter exists, otherwise on the f64 reference
/// executor with a one-line notice (or an error when a backend was asked for explicitly).
/// Wall-clock times of the phases of a command, printed by `--verbose`: where the time to a
/// first result goes.
pub struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, f64)>,
    /// Lines printed under the phases (a breakdown of one of them).
    details: Vec<String>,
}

impl Phases {
    pub fn start() -> Phases {
        Phases {
            last: std::time::Instant::now(),
            done: vec![],
            details: vec![],
        }
    }

    /// How building a GPU executable split up (part of the phase it ends).
    pub fn building(&mut self, b: &crate::runtime::BuildTimes) {
        self.details.push(format!(
            "building the executable: plan {:.1} ms; buffers and weights {:.1} ms, and alongside \
             them {} kernels in {} distinct pipelines on {} threads, {:.1} ms in all",
            b.plan * 1e3,
            b.upload * 1e3,
            b.kernels,
            b.distinct_pipelines,
            b.threads,
            b.pipelines * 1e3
        ));
    }

    /// Ends the phase that started when the previous one ended.
    pub fn done(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((name, (now - self.last).as_secs_f64()));
        self.last = now;
    }

    /// One line per phase, with its time and share.
    pub fn report(&self) -> String {
        let total: f64 = self.done.iter().map(|p| p.1).sum();
        let mut s = format!("phases ({:.3} s in all):\n", total);
        for (name, t) in &self.done {
            s += &format!(
                "  {:>9.1} ms {:>5.1}%  {name}\n",
                t * 1e3,
                100.0 * t / total.max(1e-12)
            );
        }
        for d in &self.details {
            s += &format!("  {d}\n");
        }
        s
    }
}

/// Runs `graph` on `gpu`, or on the reference executor without one.
pub fn execute(
    graph: &Graph,
    inputs: &BTreeMap<String, Array>,
    gpu: Option<&crate::runtime::Gpu>,
    phases: &mut Phases,
) -> Result<(BTreeMap<String, Array>, Engine)> {
    if let Some(gpu) = gpu {
        let host: HashMap<String, Vec<f32>> = inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
            .collect();
        let exe = crate::runtime::Executable::compile(gpu, graph)?;
        phases.done("plan, compile pipelines, upload weights");
        phases.building(exe.build_times());
        let out = exe.run(&host)?;
        phases.done("run (upload inputs, kernels, read back)");
        let shapes: HashMap<&str, &[usize]> = graph
            .outputs()
            .iter()
            .map(|(n, id)| (n.as_str(), graph.shape(*id)))
            .collect();
        let arrays = out
            .into_iter()
            .map(|(k, v)| {
                let shape = shapes[k.as_str()].to_vec();
                let a = Array::from_f32(shape, &v);
                (k, a)
            })
            .collect();
        return Ok((arrays, Engine::Gpu(gpu.describe())));
    }
    let inputs: HashMap<String, Array> = inputs.clone().into_iter().collect();
    let out = crate::reference::run(graph, &inputs)?;
    phases.done("run on the reference executor");
    Ok((out.into_iter().collect(), Engine::Reference))
}

/// Checks the user's tensors against the graph inputs: every input present with its shape, and
/// the ids an embedding looks up inside its table.
pub fn check_inputs(graph: &Graph, inputs: &BTreeMap<String, Array>, file: &Path) -> Result<()> {
    for &id in graph.inputs() {
        let node = graph.node(id);
        match inputs.get(&node.name) {
            None => {
                return Err(Error::input_at(
                    Subject::file(file),
                    format!(
                        "no tensor named '{}' (the model's inputs: {})",
                        node.name,
                        graph
                            .inputs()
                            .iter()
                            .map(|&i| format!(
                                "{} {}",
                                graph.node(i).name,
                                shape_str(graph.shape(i))
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
            Some(a) if a.shape != node.shape => {
                return Err(Error::input_at(
                    Subject::file(file),
                    format!(
                        "tensor '{}' has shape {}, the model expects {}",
                        node.name,
                        shape_str(&a.shape),
                        shape_str(&node.shape)
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    graph
        .check_lookups(inputs)
        .map_err(|m| Error::input_at(Subject::file(file), m))
}

/// The adapted-layer table `rewrite` prints, and the trainable share of all parameters.
pub fn adapter_table(graph: &Graph) -> String {
    let mut rows = vec![[
        "layer".to_string(),
        "in".into(),
        "out".into(),
        "rank".into(),
        "params".into(),
    ]];
    for a in graph.adapters() {
        let params = a.rank * (a.in_features + a.out_features)
            + if a.magnitude.is_some() {
                a.out_features
            } else {
                0
            };
        rows.push([
            a.module.clone(),
            a.in_features.to_string(),
            a.out_features.to_string(),
            a.rank.to_string(),
            params.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if c == 0 {
                    format!("{s:<w$}", w = widths[c])
                } else {
                    format!("{s:>w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 8));
            out.push('\n');
        }
    }
    let (total, trainable) = graph.parameter_counts();
    out.push_str(&format!(
        "trainable params: {trainable} of {total} ({:.3}%)\n",
        100.0 * trainable as f64 / total.max(1) as f64
    ));
    out
}

/// The adapter flags `rewrite` and `train` share.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Adapter")]
pub struct AdapterArgs {
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
    /// (`--target fc` adapts `blocks.0.fc`). Repeatable, or comma-separated [default: every
    /// linear layer but embeddings].
    #[arg(long = "target", value_name = "PATTERN")]
    pub targets: Vec<String>,
}

impl AdapterArgs {
    /// The --target patterns, split at commas.
    pub fn patterns(&self) -> Vec<String> {
        self.targets
            .iter()
            .flat_map(|t| t.split(','))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// One adapter per targeted linear layer, at PEFT's initialisation. Errors when the model
    /// has no linear layer or none matches, listing the model's layers.
    pub fn specs(
        &self,
        graph: &Graph,
        method: Method,
        seed: u64,
        model: &Path,
    ) -> Result<Vec<AdapterSpec>> {
        let patterns = self.patterns();
        let layers = find_linear_layers(graph);
        if layers.is_empty() {
            return Err(Error::input_at(
                Subject::file(model),
                "no linear layers (MatMul/Gemm with a 2-D float weight initializer) to adapt",
            ));
        }
        let specs: Vec<AdapterSpec> = layers
            .iter()
            .filter(|l| match patterns.is_empty() {
                true => !l.is_embedding(),
                false => patterns.iter().any(|p| matches_target(&l.module, p)),
            })
            .map(|layer| AdapterSpec {
                layer: layer.clone(),
                method,
                rank: self.rank,
                alpha: self.alpha,
                rslora: self.rslora,
                init: AdapterInit::Peft { seed },
            })
            .collect();
        if specs.is_empty() {
            return Err(Error::input(format!(
                "no layer matches --target {} (the model's linear layers: {})",
                patterns.join(","),
                layers
                    .iter()
                    .map(|l| l.module.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(specs)
    }
}
