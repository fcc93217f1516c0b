//! ONNX front end and back end: protobuf file <-> [`ir::Graph`](crate::ir::Graph).
//!
//! - [`load_model`] reads and decodes a `.onnx` file; [`save_model`] writes one atomically.
//! - [`import`] turns a decoded model into the IR. Every shape in the IR is static, so symbolic
//!   input dims must be pinned: [`import`] takes the CLI's `--shape` arguments
//!   ([`ShapePins`], [`parse_shape_arg`]) or a plain map of dim sizes ([`Pins`]). The op table is [`import_ops::OPS`]: one entry per
//!   ONNX op type.
//! - [`export`] turns the IR back into a model: constants become initializers, every op its ONNX
//!   node, and the adapter records (`graph.adapters`) and stop-gradient markers travel in the
//!   model's `metadata_props` (see [`meta`]) so a rewritten model can be read back with its
//!   adapters known.
//!
//! The protobuf types in [`proto`] are generated once by `scripts/gen-onnx-proto.sh` and checked
//! in, so building dorac needs no `protoc`.

mod data;
mod dim_expr;
mod export;
mod external;
mod import;
pub mod import_ops;
pub mod meta;
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto;
pub mod reweight;

pub use export::{export, EXPORT_MIN_IR_VERSION, EXPORT_MIN_OPSET};
pub use external::EXTERNAL_MIN_BYTES;
pub use import::{import, import_with_values};

use crate::error::{Error, Result, Subject};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The largest model protobuf can encode (a 2 GiB message limit). Bigger models need external
/// data, which export does not write yet.
pub const MAX_PROTO_BYTES: usize = (1 << 31) - 1;

/// Reads and decodes an ONNX file. Errors name the file: [`Error::Io`] when it cannot be read,
/// [`Error::Onnx`] when it is not a model (truncated, not protobuf, no graph, empty graph), so a
/// wrong path or a half-downloaded file is reported as such instead of as a confusing import
/// error later.
pub fn load_model(path: &Path) -> Result<proto::ModelProto> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let decoded = if !meta.is_file() || meta.len() == 0 {
        // Nothing to map (an empty file), or not a file (a pipe, a folder): read it, which
        // also gives a folder its usual error.
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        decode(&bytes[..])
    } else {
        // The file is mapped, not read: the weights' `raw_data` are slices of the mapping
        // (`Bytes`), so decoding copies none of them, and the importer copies each once.
        // SAFETY: the mapping is read-only; like every reader of a model file, dorac assumes the
        // file is not truncated or rewritten while it runs.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        decode(prost::bytes::Bytes::from_owner(map))
    };
    decoded.map_err(|e| e.within(Subject::file(path)))
}

/// Decodes an in-memory ONNX model; `what` names it in errors (a file name, say). The same
/// checks as [`load_model`].
pub fn decode_model(bytes: &[u8], what: &str) -> Result<proto::ModelProto> {
    decode(bytes).map_err(|e| e.within(Subject::context(what)))
}

fn decode(bytes: impl prost::bytes::Buf) -> Result<proto::ModelProto> {
    if !bytes.has_remaining() {
        return Err(Error::onnx("not an ONNX model (the file is empty)"));
    }
    let model = proto::ModelProto::decode(bytes)
        .map_err(|e| Error::onnx(format!("not an ONNX model (protobuf decode failed: {e})")))?;
    if model.ir_version.is_none() {
        return Err(Error::onnx(
            "not an ONNX model (no ir_version; the protobuf decoded but is not a ModelProto)",
        ));
    }
    let Some(graph) = &model.graph else {
        return Err(Error::onnx("not an ONNX model (it has no graph)"));
    };
    if graph.output.is_empty() {
        return Err(Error::onnx(format!(
            "the ONNX graph is empty ({} nodes and no outputs)",
            graph.node.len()
        )));
    }
    Ok(model)
}

/// Encodes a model and writes it atomically (a temporary file in the same folder, fsync,
/// rename), so an interrupted run never leaves a half-written model where a good one was.
/// Models over protobuf's 2 GiB limit are refused with a clear error instead of a corrupt file.
pub fn save_model(model: &proto::ModelProto, path: &Path) -> Result<()> {
    let len = model.encoded_len();
    if len > MAX_PROTO_BYTES {
        return Err(Error::onnx_at(
            Subject::file(path),
            format!(
                "the model encodes to {len} bytes, over protobuf's 2 GiB limit; write it with \
             its tensors as external data (save_graph does so for large graphs)"
            ),
        ));
    }
    let bytes = model.encode_to_vec();
    write_atomic(path, &bytes)
}

/// Exports `graph` and writes it to `path` atomically, with its large tensors in an external
/// data file `<path>.data` beside it when the model it came from had external data or when
/// inline it would come near protobuf's 2 GiB limit; otherwise as one file. Both are written to
/// temporary files first; the data file is renamed into place just before the model, so a run
/// killed earlier leaves the old files as they were.
pub fn save_graph(graph: &crate::ir::Graph, path: &Path) -> Result<()> {
    let const_bytes: usize = graph
        .petgraph()
        .node_weights()
        .filter_map(|n| match &n.op {
            crate::ir::Op::Const(t) => Some(t.numel() * t.dtype().size()),
            _ => None,
        })
        .sum();
    // Room for the graph itself under the limit.
    let near_limit = const_bytes > MAX_PROTO_BYTES - (64 << 20);
    if !(graph.info.external_data || near_limit) {
        return save_model(&export::export(graph)?, path);
    }
    let mut data = external::ExternalData::create(path)?;
    let model = match export::export_with(graph, Some(&mut data)) {
        Ok(m) => m,
        Err(e) => {
            data.abandon();
            return Err(e);
        }
    };
    let len = model.encoded_len();
    if len > MAX_PROTO_BYTES {
        data.abandon();
        return Err(Error::onnx_at(Subject::file(path), format!("the graph encodes to {len} bytes without its large tensors, over protobuf's              2 GiB limit")));
    }
    let bytes = model.encode_to_vec();
    write_atomic_with(path, &bytes, Some(data))
}

/// Writes `<path>.tmp-<pid>` in the target's folder, fsyncs it and renames it over `path`; the
/// temporary file is removed if any step fails.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, bytes, None)
}

/// [`write_atomic`] for a model whose external `data` file is complete but still temporary: it
/// is put in place once the model's temporary file is synced, just before the model is renamed
/// (and removed if anything fails first).
fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    data: Option<external::ExternalData>,
) -> Result<()> {
    use std::io::Write;
    let Some(file_name) = path.file_name() else {
        if let Some(d) = data {
            d.abandon();
        }
        return Err(Error::input_at(Subject::file(path), "not a file path"));
    };
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    if let Some(dir) = tmp.parent() {
        crate::tensors_io::clean_stale_temps(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        });
    }
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        if let Some(d) = data {
            d.abandon();
        }
        return Err(Error::io(path, e));
    }
    if let Some(d) = data {
        if let Err(e) = d.finish() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// The CLI's `--shape NAME=DIMS` arguments, as given: `NAME` is either a symbolic dim
/// (`--shape batch=3` sizes that `dim_param` in every input) or a graph input (`--shape x=3x16`,
/// that input's whole shape). Which one is decided against the model by [`ShapePins::resolve`]
/// (which [`import`] calls), so parsing needs no model. The IR is statically shaped, so every
/// symbolic dim must end up with a size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShapePins {
    /// `(NAME, sizes)` in argument order; names are unique.
    pub entries: Vec<(String, Vec<usize>)>,
}

impl ShapePins {
    /// Parses `--shape` arguments (see [`parse_shape_arg`]); a name given twice is an error.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Self> {
        let mut pins = ShapePins::default();
        for arg in args {
            let (name, sizes) = parse_shape_arg(arg.as_ref())?;
            if pins.entries.iter().any(|(n, _)| *n == name) {
                return Err(Error::input_at(
                    Subject::flag_value("--shape", arg.as_ref()),
                    format!("'{name}' is given twice"),
                ));
            }
            pins.entries.push((name, sizes));
        }
        Ok(pins)
    }

    /// Sorts the entries into dim sizes and whole input shapes, the two maps [`import`] takes.
    /// A name that is a graph input is a whole shape; a name that is a `dim_param` of some input
    /// is a dim and takes one size. A name that is neither is an error listing what can be
    /// pinned, so a typo does not silently leave a dim unpinned.
    #[allow(clippy::type_complexity)]
    pub fn resolve(
        &self,
        model: &proto::ModelProto,
    ) -> Result<(HashMap<String, usize>, HashMap<String, Vec<usize>>)> {
        let empty = proto::GraphProto::default();
        let graph = model.graph.as_ref().unwrap_or(&empty);
        let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
        let inputs: Vec<&str> = graph
            .input
            .iter()
            .map(|i| i.name())
            .filter(|n| !inits.contains(n))
            .collect();
        let mut dim_names: Vec<String> = vec![];
        for i in graph.input.iter().filter(|i| !inits.contains(i.name())) {
            for d in import::declared_dims(i).into_iter().flatten() {
                if let import::DeclaredDim::Param(p) = d {
                    // An expression's terms can be pinned (and sized, the expression with them).
                    let terms: Vec<String> = dim_expr::DimExpr::parse(&p)
                        .map(|e| e.names().map(str::to_string).collect())
                        .unwrap_or_default();
                    for name in std::iter::once(p).chain(terms) {
                        if !dim_names.contains(&name) {
                            dim_names.push(name);
                        }
                    }
                }
            }
        }
        let mut dims = HashMap::new();
        let mut shapes = HashMap::new();
        for (name, sizes) in &self.entries {
            let arg = format!(
                "{name}={}",
                sizes
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x")
            );
            if inputs.contains(&name.as_str()) {
                shapes.insert(name.clone(), sizes.clone());
            } else if dim_names.contains(name) {
                if sizes.len() != 1 {
                    return Err(Error::input_at(
                        Subject::flag_value("--shape", &arg),
                        format!(
                            "'{name}' is a symbolic dim and takes one size (e.g. \
                         --shape {name}=3), not a shape"
                        ),
                    ));
                }
                dims.insert(name.clone(), sizes[0]);
            } else {
                return Err(Error::input_at(
                    Subject::flag_value("--shape", &arg),
                    format!(
                        "the model has no graph input or symbolic dim named '{name}' \
                     (inputs: {}; symbolic dims: {})",
                        or_none(&inputs.join(", ")),
                        or_none(&dim_names.join(", "))
                    ),
                ));
            }
        }
        Ok((dims, shapes))
    }
}

/// Where [`import`] gets sizes for symbolic dims: a plain map of dim sizes (`batch` -> 3), or
/// the CLI's `--shape` arguments ([`ShapePins`]), which may also give whole input shapes.
pub trait Pins {
    /// Dim sizes by `dim_param` name, and whole shapes by graph input name, for this model.
    #[allow(clippy::type_complexity)]
    fn resolve(
        &self,
        model: &proto::ModelProto,
    ) -> Result<(HashMap<String, usize>, HashMap<String, Vec<usize>>)>;
}

/// Dim sizes by name; names the model does not use are ignored.
impl Pins for HashMap<String, usize> {
    fn resolve(
        &self,
        _model: &proto::ModelProto,
    ) -> Result<(HashMap<String, usize>, HashMap<String, Vec<usize>>)> {
        Ok((self.clone(), HashMap::new()))
    }
}

/// `--shape` arguments; names the model does not use are an error (see [`ShapePins::resolve`]).
impl Pins for ShapePins {
    fn resolve(
        &self,
        model: &proto::ModelProto,
    ) -> Result<(HashMap<String, usize>, HashMap<String, Vec<usize>>)> {
        ShapePins::resolve(self, model)
    }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "none"
    } else {
        s
    }
}

/// Parses one `--shape` argument, `NAME=DIMS` with DIMS like `3x16` (or `3` for one dim), into
/// the name and the sizes. Whether NAME is a dim or an input is decided against a model by
/// [`ShapePins::resolve`].
pub fn parse_shape_arg(arg: &str) -> Result<(String, Vec<usize>)> {
    let bad = |why: &str| {
        Error::input_at(
            Subject::flag_value("--shape", arg),
            format!("{why} (expected NAME=DIMS, e.g. --shape batch=3 or --shape x=3x16)"),
        )
    };
    let (name, dims) = arg.split_once('=').ok_or_else(|| bad("no '='"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(bad("empty name"));
    }
    let dims = dims.trim();
    if dims.is_empty() {
        return Err(bad("no sizes"));
    }
    let sizes = dims
        .split(['x', 'X', ','])
        .map(|d| d.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| bad(&format!("'{dims}' is not a list of sizes")))?;
    Ok((name.to_string(), sizes))
}

/// The graph inputs a user feeds (initializers listed as inputs excluded), by name.
fn data_input_names(graph: &proto::GraphProto) -> Vec<String> {
    let inits: std::collections::HashSet<&str> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    graph
        .input
        .iter()
        .filter_map(|vi| vi.name.clone())
        .filter(|n| !inits.contains(n.as_str()))
        .collect()
}

/// Dim 0 of a value's declared tensor shape.
fn dim0(vi: &proto::ValueInfoProto) -> Option<&proto::tensor_shape_proto::Dimension> {
    match vi.r#type.as_ref()?.value.as_ref()? {
        proto::type_proto::Value::TensorType(t) => t.shape.as_ref()?.dim.first(),
        _ => None,
    }
}

/// [`dim0`], to change.
fn dim0_mut(vi: &mut proto::ValueInfoProto) -> Option<&mut proto::tensor_shape_proto::Dimension> {
    match vi.r#type.as_mut()?.value.as_mut()? {
        proto::type_proto::Value::TensorType(t) => t.shape.as_mut()?.dim.first_mut(),
        _ => None,
    }
}

/// The name of the model's first data input (empty when it has none).
pub fn first_data_input(model: &proto::ModelProto) -> String {
    model
        .graph
        .as_ref()
        .and_then(|g| data_input_names(g).into_iter().next())
        .unwrap_or_default()
}

/// The batch size a model was exported with: dim 0 of its data inputs when every one of them
/// has the same fixed value there (exports that bake the batch into Reshape shapes need it).
pub fn fixed_batch_dim(model: &proto::ModelProto) -> Option<usize> {
    use proto::tensor_shape_proto::dimension::Value as Dim;
    let graph = model.graph.as_ref()?;
    let names = data_input_names(graph);
    let mut found = None;
    for vi in &graph.input {
        if !vi.name.as_ref().is_some_and(|n| names.contains(n)) {
            continue;
        }
        let n = match dim0(vi).and_then(|d| d.value.as_ref()) {
            Some(Dim::DimValue(n)) if *n > 0 => *n as usize,
            _ => return None,
        };
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// The shapes of the data inputs that examples of the given per-example shapes (a training set's
/// tensors without their dim 0) give at `batch`, where they fit the model's declaration: its rank
/// and fixed dims. Training learns a sequence length from its data this way; a tensor that does
/// not fit is left to the data's own checks, which name the file.
pub fn shapes_from_examples(
    model: &proto::ModelProto,
    examples: &HashMap<String, Vec<usize>>,
    batch: usize,
) -> HashMap<String, Vec<usize>> {
    let Some(graph) = model.graph.as_ref() else {
        return HashMap::new();
    };
    let names = data_input_names(graph);
    let mut out = HashMap::new();
    for vi in graph
        .input
        .iter()
        .filter(|i| names.iter().any(|n| n == i.name()))
    {
        let (Some(example), Some(declared)) = (examples.get(vi.name()), import::declared_dims(vi))
        else {
            continue;
        };
        let shape: Vec<usize> = std::iter::once(batch)
            .chain(example.iter().copied())
            .collect();
        let fits = shape.len() == declared.len()
            && shape.iter().zip(&declared).skip(1).all(|(s, d)| match d {
                import::DeclaredDim::Fixed(v) => s == v,
                _ => true,
            });
        if fits {
            out.insert(vi.name().to_string(), shape);
        }
    }
    out
}

/// The plain symbolic dims (`batch_size`, not `past + 1`) of the model's data inputs, in order.
pub fn symbolic_dims(model: &proto::ModelProto) -> Vec<String> {
    plain_dims(model, |_| true)
}

/// [`symbolic_dims`] of the data inputs `of` accepts by name.
fn plain_dims(model: &proto::ModelProto, of: impl Fn(&str) -> bool) -> Vec<String> {
    let Some(graph) = model.graph.as_ref() else {
        return vec![];
    };
    let names = data_input_names(graph);
    let mut dims: Vec<String> = vec![];
    for vi in graph
        .input
        .iter()
        .filter(|i| names.iter().any(|n| n == i.name()) && of(i.name()))
    {
        for d in import::declared_dims(vi).unwrap_or_default() {
            if let import::DeclaredDim::Param(p) = d {
                let plain = p.chars().all(|c| c.is_alphanumeric() || c == '_');
                if plain && !dims.contains(&p) {
                    dims.push(p);
                }
            }
        }
    }
    dims
}

/// Dim pins for a key/value cache that training (and merging) needs and the data cannot give: a key/value cache that the data does
/// not hold is empty (each `past...` dim of such an input is 0, as a first call's), and the
/// cache's head size that onnxruntime-genai's builder leaves symbolic (`kv_cache_dim`) is the
/// `head_size` of the `genai_config.json` beside the model. Dims in `pinned` are left alone.
pub fn cache_pins(
    model: &proto::ModelProto,
    model_dir: &Path,
    examples: &HashMap<String, Vec<usize>>,
    pinned: &[String],
) -> Vec<String> {
    let dims = plain_dims(model, |name| !examples.contains_key(name));
    let unpinned = |d: &str| !pinned.iter().any(|p| p.split('=').next() == Some(d));
    let mut pins: Vec<String> = dims
        .iter()
        .filter(|d| d.contains("past") && unpinned(d))
        .map(|d| format!("{d}=0"))
        .collect();
    if dims.iter().any(|d| d == "kv_cache_dim") && unpinned("kv_cache_dim") {
        let head = std::fs::read_to_string(model_dir.join("genai_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|c| c["model"]["decoder"]["head_size"].as_u64());
        if let Some(h) = head {
            pins.push(format!("kv_cache_dim={h}"));
        }
    }
    pins
}

/// Sets dim 0 of every data input to `batch`. Training re-batches a model exported with a
/// fixed batch size: dim 0 is the batch, whatever the export baked in.
pub fn set_batch_dim(model: &mut proto::ModelProto, batch: usize) {
    use proto::tensor_shape_proto::dimension::Value as Dim;
    let Some(graph) = model.graph.as_mut() else {
        return;
    };
    let names = data_input_names(graph);
    let mut old_batches = std::collections::HashSet::new();
    for vi in graph.input.iter_mut() {
        if !vi.name.as_ref().is_some_and(|n| names.contains(n)) {
            continue;
        }
        if let Some(d) = dim0_mut(vi) {
            if let Some(Dim::DimValue(v)) = d.value {
                old_batches.insert(v);
            }
            d.value = Some(Dim::DimValue(batch as i64));
        }
    }
    // An output whose dim 0 was the exported batch now has the new one: leave it open, so the
    // check of declared output shapes does not hold the old size against the model.
    for vi in graph.output.iter_mut() {
        if let Some(d) = dim0_mut(vi) {
            if matches!(d.value, Some(Dim::DimValue(v)) if old_batches.contains(&v)) {
                d.value = Some(Dim::DimParam("batch".into()));
            }
        }
    }
}
