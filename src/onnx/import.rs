//! ONNX model -> IR. Checks the model as a whole first (unsupported ops, dangling names,
//! cycles, input types and shapes) so that each problem class is reported once, completely; then
//! builds the IR node by node through the op table in [`super::import_ops`].
//!
//! Nodes are added in a canonical order (graph inputs, constants, then ops in a stable
//! topological order) so that importing an exported model gives the same graph, node for node.

use super::data::{dtype_name, ir_dtype, tensor_from_proto};
use super::dim_expr::DimExpr;
use super::import_ops::{self, Ctx};
use super::meta::{self, AdapterMeta};
use super::proto::{
    self, tensor_proto::DataType, tensor_shape_proto::dimension, type_proto, ModelProto, NodeProto,
};
use super::Pins;
use crate::error::{Error, Result, Subject};
use crate::ir::{Graph, GraphBuilder, Half, ModelInfo, NodeId};
use crate::tensor::{shape_str, Array, DType};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::Path;

/// A dim as the model declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DeclaredDim {
    Fixed(usize),
    Param(String),
    Unknown,
}

/// The declared dims of a graph input, or None when it declares no shape.
pub(crate) fn declared_dims(vi: &proto::ValueInfoProto) -> Option<Vec<DeclaredDim>> {
    let Some(proto::TypeProto {
        value: Some(type_proto::Value::TensorType(t)),
        ..
    }) = &vi.r#type
    else {
        return None;
    };
    let shape = t.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(dimension::Value::DimValue(v)) if *v >= 0 => DeclaredDim::Fixed(*v as usize),
                Some(dimension::Value::DimParam(p)) if !p.is_empty() => {
                    DeclaredDim::Param(p.clone())
                }
                _ => DeclaredDim::Unknown,
            })
            .collect(),
    )
}

fn declared_str(d: &[DeclaredDim]) -> String {
    let parts: Vec<String> = d
        .iter()
        .map(|d| match d {
            DeclaredDim::Fixed(v) => v.to_string(),
            DeclaredDim::Param(p) => p.clone(),
            DeclaredDim::Unknown => "?".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn list_str(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The label of a node: its name, or its first output for an unnamed node. A MatMul or Gemm
/// that the torch.export-based exporter wrote (named `node_linear_3`, its weight `val_47`) gets
/// the module path it recorded in `metadata_props` as a scope, `/<module>/node_linear_3`, the
/// form the legacy exporter gives its node names, so that `passes::linear` finds PEFT's module
/// name in either export.
fn node_label(n: &NodeProto) -> String {
    let plain = plain_label(n);
    if matches!(n.op_type(), "MatMul" | "Gemm") && !plain.starts_with('/') {
        if let Some(module) = exported_module(n) {
            return format!("/{module}/{plain}");
        }
    }
    plain
}

/// The module path of a node of the torch.export-based exporter: the last-but-one entry of its
/// `pkg.torch.onnx.name_scopes` (a Python list literal: the module scopes from the root, then
/// the op), or None at the top level or without the entry.
fn exported_module(n: &NodeProto) -> Option<String> {
    let scopes = n
        .metadata_props
        .iter()
        .find(|p| p.key() == "pkg.torch.onnx.name_scopes")?
        .value();
    let entries: Vec<&str> = scopes
        .trim()
        .strip_prefix('[')?
        .strip_suffix(']')?
        .split(',')
        .map(|e| e.trim().trim_matches(|c| c == '\'' || c == '"'))
        .collect();
    let module = entries.len().checked_sub(2).map(|i| entries[i])?;
    let valid = !module.is_empty()
        && module
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '_');
    valid.then(|| module.to_string())
}

fn plain_label(n: &NodeProto) -> String {
    match n.name() {
        "" => n
            .output
            .iter()
            .find(|o| !o.is_empty())
            .cloned()
            .unwrap_or_else(|| format!("<unnamed {}>", n.op_type())),
        name => name.to_string(),
    }
}

/// The opsets dorac is tested on: PyTorch's exporters (13 to 20), onnxruntime-genai's model
/// builder (21 and 22), and the ONNX node conformance cases, which reach opset 28.
pub const TESTED_OPSETS: std::ops::RangeInclusive<i64> = 13..=28;

/// A warning for a default-domain opset outside [`TESTED_OPSETS`]: ops whose meaning changed
/// between opsets are read with the rules of the versions dorac knows.
fn opset_warning(opset: i64) -> Option<String> {
    (!TESTED_OPSETS.contains(&opset)).then(|| {
        format!(
            "the model uses opset {opset}, outside the opsets dorac is tested on ({} to {}); ops whose definition changed may be read wrongly",
            TESTED_OPSETS.start(),
            TESTED_OPSETS.end()
        )
    })
}

/// The opset of the default ONNX domain.
pub(crate) fn default_opset(model: &ModelProto) -> Result<i64> {
    model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain(), "" | "ai.onnx"))
        .map(|o| o.version())
        .ok_or_else(|| Error::onnx("the model imports no opset of the default ONNX domain"))
}

/// Turns a decoded model into the IR.
///
/// - `model_dir` is the folder external data files are read from (the model file's folder).
/// - `pins` sizes symbolic dims: a `HashMap<String, usize>` of dim sizes by `dim_param` name, or
///   [`ShapePins`](super::ShapePins) (the CLI's `--shape batch=3` / `--shape x=3x16`), see [`Pins`].
/// - `input_shapes` gives whole shapes of graph inputs by name (the tensors a user supplies).
///   They take precedence over `pins`, must agree with the model's fixed dims and with a
///   `--shape` for the same input; a symbolic dim they fix also sizes that dim in other inputs.
///
/// Every symbolic dim must end up with a size (the IR is statically shaped); the error for those
/// that do not says how to pin them. Unsupported ops are reported all at once. Graph inputs that
/// are also initializers are constants. dorac's own metadata (adapters, stop-gradient markers,
/// see [`super::meta`]) is read back. Nodes nothing depends on are dropped.
pub fn import<P: Pins + ?Sized>(
    model: &ModelProto,
    model_dir: &Path,
    pins: &P,
    input_shapes: &HashMap<String, Vec<usize>>,
) -> Result<Graph> {
    import_with_values(model, model_dir, pins, input_shapes, &HashMap::new())
}

/// [`import`], with the values of some graph inputs known at import (`dorac run` passes the
/// tensors it is given; each is read as its input's declared type). Where an op needs an operand at import (Reshape's shape,
/// Slice's starts, a reduction's axes, Tile's repeats...) and that operand is computed from
/// constants and such inputs only, it is evaluated with these values, as `--shape` pins a dim.
/// The inputs stay graph inputs (fed as usual); elsewhere they are ordinary values.
pub fn import_with_values<P: Pins + ?Sized>(
    model: &ModelProto,
    model_dir: &Path,
    pins: &P,
    input_shapes: &HashMap<String, Vec<usize>>,
    input_values: &HashMap<String, Array>,
) -> Result<Graph> {
    let mut input_shapes = input_shapes.clone();
    for (name, t) in input_values {
        input_shapes
            .entry(name.clone())
            .or_insert_with(|| t.shape.clone());
    }
    let input_shapes = &input_shapes;
    let (dims, mut shapes) = pins.resolve(model)?;
    for (name, given) in input_shapes {
        match shapes.get(name) {
            Some(s) if s != given => {
                return Err(Error::input_at(
                    Subject::named("input", name),
                    format!(
                        "--shape {name}={} but the supplied tensor has shape {}",
                        shape_str(s),
                        shape_str(given)
                    ),
                ))
            }
            _ => {
                shapes.insert(name.clone(), given.clone());
            }
        }
    }
    import_resolved(model, model_dir, &dims, &shapes, input_values)
}

fn import_resolved(
    model: &ModelProto,
    model_dir: &Path,
    pins: &HashMap<String, usize>,
    input_shapes: &HashMap<String, Vec<usize>>,
    input_values: &HashMap<String, Array>,
) -> Result<Graph> {
    let gp = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::onnx("the model has no graph"))?;
    if gp.output.is_empty() {
        return Err(Error::onnx("the ONNX graph is empty (it has no outputs)"));
    }
    let opset = default_opset(model)?;

    // Initializers by name; duplicates are malformed.
    let mut inits: HashMap<&str, &proto::TensorProto> = HashMap::new();
    for t in &gp.initializer {
        if t.name().is_empty() {
            return Err(Error::onnx("an initializer has no name"));
        }
        if inits.insert(t.name(), t).is_some() {
            return Err(Error::onnx(format!(
                "initializer '{}' is defined twice",
                t.name()
            )));
        }
    }
    // Graph inputs that are not initializers (old exporters list initializers as inputs too).
    let inputs: Vec<&proto::ValueInfoProto> = gp
        .input
        .iter()
        .filter(|i| !inits.contains_key(i.name()))
        .collect();
    let mut input_names = HashSet::new();
    if let Some(dup) = inputs.iter().find(|i| !input_names.insert(i.name())) {
        return Err(Error::onnx(format!(
            "graph input '{}' is listed twice",
            dup.name()
        )));
    }

    let every_node = nodes_with_branches(&gp.node);
    let consumed: HashSet<&str> = every_node
        .iter()
        .flat_map(|n| reads(n))
        .chain(gp.output.iter().map(|o| o.name()))
        .collect();

    check_supported(&every_node, &inputs, &consumed)?;
    let sources: HashSet<&str> = inits
        .keys()
        .copied()
        .chain(inputs.iter().map(|i| i.name()))
        .collect();
    let order = topo_sort(&gp.node, &sources, &gp.output)?;

    let mut g = GraphBuilder::new();
    *g.info_mut() = ModelInfo {
        ir_version: model.ir_version(),
        opset,
        producer: model.producer_name().to_string(),
        graph_name: gp.name().to_string(),
        input_dims: HashMap::new(),
        external_data: gp
            .initializer
            .iter()
            .any(|t| t.data_location() == super::proto::tensor_proto::DataLocation::External),
        warnings: opset_warning(opset).into_iter().collect(),
    };
    let mut values: HashMap<String, NodeId> = HashMap::new();

    // 1. Graph inputs, with static shapes.
    let shapes = resolve_input_shapes(&inputs, pins, input_shapes)?;
    // The declared type of each graph input and initializer: dorac computes floats in f32 and
    // integers as int64, but where an op requires one element type their ONNX types must still
    // agree, and a quantizer's zero point says by its type which integers it makes.
    let mut formats: HashMap<NodeId, DataType> = HashMap::new();
    for (vi, (shape, dims)) in inputs.iter().zip(shapes) {
        crate::tensor::check_size(&shape, 4, || format!("input '{}'", vi.name()))?;
        let id = g.add_typed_input(vi.name(), shape, input_dtype(vi).unwrap_or(DType::F32));
        if let Some(t) = input_elem_type(vi) {
            formats.insert(id, t);
        }
        values.insert(vi.name().to_string(), id);
        g.info_mut().input_dims.insert(vi.name().to_string(), dims);
    }

    // 2. Initializers, in file order (unused ones are dropped at the end). Large integer ones
    // (a quantized model's codes) wait for their first reader: see `Scope::deferred`.
    let outputs: HashSet<String> = gp.output.iter().map(|o| o.name().to_string()).collect();
    let mut deferred = HashMap::new();
    for t in &gp.initializer {
        if is_deferred(t) && !outputs.contains(t.name()) {
            deferred.insert(t.name().to_string(), t);
            continue;
        }
        add_initializer(&mut g, t, model_dir, &mut values, &mut formats)?;
    }
    let mut reads_left: HashMap<String, usize> = HashMap::new();
    for name in every_node.iter().flat_map(|n| reads(n)) {
        *reads_left.entry(name.to_string()).or_default() += 1;
    }

    // 3. Nodes: Constant nodes first (they read nothing), then the rest, each in topological
    // order, so constants precede ops as they do in an exported model.
    let mut scope = Scope {
        opset,
        model_dir,
        stop_gradient: stop_gradient_nodes(model, gp)?,
        constness: std::cell::RefCell::new(HashMap::new()),
        input_values,
        formats,
        deferred,
        reads_left,
        outputs,
    };
    let (constants, ops): (Vec<usize>, Vec<usize>) = order
        .into_iter()
        .partition(|&i| gp.node[i].op_type() == "Constant");
    let order: Vec<usize> = constants.into_iter().chain(ops).collect();
    scope.import_nodes(&mut g, &mut values, &gp.node, &order)?;

    // 4. Graph outputs.
    let mut seen = HashSet::new();
    for o in &gp.output {
        if !seen.insert(o.name()) {
            return Err(Error::onnx(format!(
                "graph output '{}' is listed twice",
                o.name()
            )));
        }
        // topo_sort checked that every output resolves.
        let id = values[o.name()];
        check_declared_shape(o, g.shape(id))?;
        g.add_output(o.name(), id);
    }

    // 5. dorac's adapter records.
    if let Some(json) = metadata(model, meta::ADAPTERS_KEY) {
        let records: Vec<AdapterMeta> = meta::parse(meta::ADAPTERS_KEY, json)?;
        for r in &records {
            let layer = r.to_layer(&values)?;
            g.add_adapter(layer);
        }
    }

    if let Some(json) = metadata(model, meta::CONV_FILTERS_KEY) {
        let filters: std::collections::BTreeMap<String, Vec<usize>> =
            meta::parse(meta::CONV_FILTERS_KEY, json)?;
        for (name, shape) in filters {
            let id = values.get(&name).copied().ok_or_else(|| {
                Error::onnx(format!(
                    "metadata '{}' names '{name}', which is not a value in the graph",
                    meta::CONV_FILTERS_KEY
                ))
            })?;
            g.set_conv_filter(id, shape);
        }
    }

    let mut g = g.finish();
    g.remove_dead();
    Ok(g)
}

/// Adds an initializer (of the graph or of an inlined branch) as a constant.
fn add_initializer(
    g: &mut GraphBuilder,
    t: &proto::TensorProto,
    model_dir: &Path,
    values: &mut HashMap<String, NodeId>,
    formats: &mut HashMap<NodeId, DataType>,
) -> Result<()> {
    let tensor = tensor_from_proto(t, model_dir, &format!("initializer '{}'", t.name()))?;
    let id = g.add_const(t.name(), tensor);
    values.insert(t.name().to_string(), id);
    let Ok(dt) = DataType::try_from(t.data_type()) else {
        return Ok(());
    };
    formats.insert(id, dt);
    // Half-precision weights stay half on the device where their readers allow.
    match dt {
        DataType::Float16 => g.mark_half(id, Half::F16),
        DataType::Bfloat16 => g.mark_half(id, Half::Bf16),
        _ => {}
    }
    Ok(())
}

/// What importing a node needs beside the graph being built and the values in scope.
struct Scope<'a> {
    opset: i64,
    model_dir: &'a Path,
    /// The Identity nodes dorac exported for a StopGradient.
    stop_gradient: HashSet<String>,
    /// Which nodes depend on constants only, shared by the whole import.
    constness: std::cell::RefCell<HashMap<NodeId, bool>>,
    input_values: &'a HashMap<String, Array>,
    /// The declared ONNX type of each graph input, initializer, Constant and Cast.
    formats: HashMap<NodeId, DataType>,
    /// Large integer initializers not loaded yet: each is loaded when a node first reads it.
    /// Integers are held as int64, so a 4-bit model's codes take 16 times their file's bytes;
    /// loaded together, a 1.24B model's codes took 6.2 GB before the first was dequantized.
    deferred: HashMap<String, &'a proto::TensorProto>,
    /// How many nodes not yet imported read each value (an If counts the values its branches
    /// read, and so do the branches' nodes: a count errs high, never low).
    reads_left: HashMap<String, usize>,
    /// The graph's outputs, which are never dropped.
    outputs: HashSet<String>,
}

/// Whether an initializer is loaded only when a node first reads it: integers of 1 MiB or more
/// in the file (quantized codes; shape and index tensors are small).
fn is_deferred(t: &proto::TensorProto) -> bool {
    let elements = t
        .dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d.max(0) as u64));
    ir_dtype(t.data_type()) == Some(DType::I64) && elements.is_some_and(|n| n >= 1 << 20)
}

/// Constants of at least this many elements are dropped at their last read when no IR node
/// reads them (they were consumed at import: codes dequantized into a weight).
const DROP_MIN_ELEMENTS: usize = 1 << 16;

impl Scope<'_> {
    /// What the builder of `node` sees.
    fn ctx<'a>(
        &'a self,
        g: &'a mut GraphBuilder,
        values: &'a HashMap<String, NodeId>,
        node: &'a NodeProto,
    ) -> Ctx<'a> {
        // The IR name of the node's result: its first output, or (RNN's Y unused, say) the
        // first output it has (topo_sort refused nodes without one).
        let name = node.output.iter().find(|o| !o.is_empty()).unwrap().clone();
        Ctx::new(
            g,
            values,
            self.opset,
            node,
            name,
            node_label(node),
            self.model_dir,
            self.stop_gradient.contains(node.name()),
            &self.constness,
            self.input_values,
            &self.formats,
        )
    }

    /// Imports `nodes[i]` for each `i` of `order` (topological), adding each output to `values`.
    fn import_nodes(
        &mut self,
        g: &mut GraphBuilder,
        values: &mut HashMap<String, NodeId>,
        nodes: &[NodeProto],
        order: &[usize],
    ) -> Result<()> {
        for &i in order {
            let node = &nodes[i];
            let read = reads(node);
            for &name in &read {
                if let Some(t) = self.deferred.remove(name) {
                    add_initializer(g, t, self.model_dir, values, &mut self.formats)?;
                }
            }
            if is_if(node) {
                let outputs = self.inline_if(g, values, node)?;
                values.extend(outputs);
                continue;
            }
            let outputs = import_ops::build(&mut self.ctx(g, values, node))?;
            // An op that only moves elements keeps its input's type: the builder reshapes the
            // LM head's uint8 codes into the embedding's GatherBlockQuantized table.
            let moved = || {
                let input = values.get(node.input.first()?)?;
                matches!(
                    node.op_type(),
                    "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" | "Transpose"
                )
                .then(|| self.formats.get(input).copied())?
            };
            let declared = declared_output_type(node).or_else(moved);
            if let (Some(t), Some(&(_, id))) = (declared, outputs.first()) {
                self.formats.insert(id, t);
            }
            values.extend(outputs);
            self.drop_consumed(g, values, &read);
        }
        Ok(())
    }

    /// Drops the large constants that a node reading `read` was the last to read, where no IR
    /// node reads them: the importer consumed them (MatMulNBits makes a new weight of its codes).
    fn drop_consumed(
        &mut self,
        g: &mut GraphBuilder,
        values: &mut HashMap<String, NodeId>,
        read: &[&str],
    ) {
        for &name in read {
            let Some(left) = self.reads_left.get_mut(name) else {
                continue;
            };
            *left = left.saturating_sub(1);
            if *left > 0 || self.outputs.contains(name) {
                continue;
            }
            let Some(&id) = values.get(name) else {
                continue;
            };
            let big = g
                .const_tensor(id)
                .is_some_and(|t| t.numel() >= DROP_MIN_ELEMENTS);
            if big && g.drop_unread_const(id) {
                values.remove(name);
                // Ids are reused: nothing may be remembered of this one.
                self.formats.remove(&id);
                self.constness.borrow_mut().remove(&id);
            }
        }
    }

    /// An If whose condition is known at import (a constant, or computed from graph inputs given
    /// at import, as Optimum's merged decoders compute `use_cache_branch`): the nodes of the branch
    /// it takes, imported in its place. The IR has no control flow, so a condition that depends on
    /// other inputs is refused.
    fn inline_if(
        &mut self,
        g: &mut GraphBuilder,
        values: &HashMap<String, NodeId>,
        node: &NodeProto,
    ) -> Result<Vec<(String, NodeId)>> {
        let label = node_label(node);
        let at = |msg: String| Error::onnx(format!("node '{label}' (If): {msg}"));
        if node.input.len() != 1 || node.input[0].is_empty() {
            return Err(at(format!(
                "expected one input (the condition), found {}",
                node.input.len()
            )));
        }
        let cond = self
            .ctx(g, values, node)
            .const_scalar(0, "condition")?
            .ok_or_else(|| at("the condition is missing".into()))?;
        let wanted = if cond != 0.0 {
            "then_branch"
        } else {
            "else_branch"
        };
        let mut branch = None;
        for a in &node.attribute {
            match (a.name(), &a.g) {
                ("then_branch" | "else_branch", Some(sub)) => {
                    if a.name() == wanted {
                        branch = Some(sub);
                    }
                }
                (name, _) => {
                    return Err(at(format!(
                        "attribute '{name}' is not one of then_branch and else_branch (graphs)"
                    )))
                }
            }
        }
        let branch = branch.ok_or_else(|| at(format!("it has no {wanted}")))?;
        if branch.output.len() != node.output.len() {
            return Err(at(format!(
                "the {wanted} has {} outputs, the node {}",
                branch.output.len(),
                node.output.len()
            )));
        }
        // The branch sees every value of the enclosing scopes, then its own initializers.
        let mut inner = values.clone();
        for t in &branch.initializer {
            add_initializer(g, t, self.model_dir, &mut inner, &mut self.formats)?;
        }
        let sources: HashSet<&str> = inner.keys().map(String::as_str).collect();
        let order = topo_sort(&branch.node, &sources, &branch.output)
            .map_err(|e| at(format!("in its {wanted}: {e}")))?;
        self.import_nodes(g, &mut inner, &branch.node, &order)?;
        Ok(node
            .output
            .iter()
            .zip(&branch.output)
            .filter(|(o, _)| !o.is_empty())
            .map(|(o, b)| (o.clone(), inner[b.name()]))
            .collect())
    }
}

/// The ONNX type a node's first output declares by its attributes: a Constant's value, a
/// Cast's target (None for other nodes).
fn declared_output_type(n: &NodeProto) -> Option<DataType> {
    n.attribute
        .iter()
        .find_map(|a| match (n.op_type(), a.name()) {
            ("Constant", "value") => DataType::try_from(a.t.as_ref()?.data_type()).ok(),
            ("Constant", "value_int" | "value_ints") => Some(DataType::Int64),
            ("Constant", "value_float" | "value_floats") => Some(DataType::Float),
            ("Cast", "to") => DataType::try_from(a.i() as i32).ok(),
            _ => None,
        })
}

/// If is the one op with subgraphs dorac takes: it is not an op of the IR, but inlined at import
/// ([`Scope::inline_if`]).
fn is_if(n: &NodeProto) -> bool {
    n.op_type() == "If" && matches!(n.domain(), "" | "ai.onnx")
}

/// The graphs held in a node's attributes.
fn subgraphs(n: &NodeProto) -> impl Iterator<Item = &proto::GraphProto> {
    n.attribute.iter().flat_map(|a| a.g.iter().chain(&a.graphs))
}

/// `nodes` and, depth first, the nodes of the branches of their Ifs.
fn nodes_with_branches(nodes: &[NodeProto]) -> Vec<&NodeProto> {
    let mut out = vec![];
    for n in nodes {
        out.push(n);
        if is_if(n) {
            for sub in subgraphs(n) {
                out.extend(nodes_with_branches(&sub.node));
            }
        }
    }
    out
}

/// The names a node reads: its inputs and, for a node with subgraphs, the values of enclosing
/// scopes that they read.
fn reads(n: &NodeProto) -> Vec<&str> {
    let mut out: Vec<&str> = n
        .input
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    for sub in subgraphs(n) {
        let defined: HashSet<&str> = sub
            .initializer
            .iter()
            .map(|t| t.name())
            .chain(sub.input.iter().map(|i| i.name()))
            .chain(
                sub.node
                    .iter()
                    .flat_map(|n| n.output.iter().map(String::as_str)),
            )
            .collect();
        let read = sub
            .node
            .iter()
            .flat_map(reads)
            .chain(sub.output.iter().map(|o| o.name()));
        for v in read {
            if !defined.contains(v) && !out.contains(&v) {
                out.push(v);
            }
        }
    }
    out
}

fn metadata<'m>(model: &'m ModelProto, key: &str) -> Option<&'m str> {
    model
        .metadata_props
        .iter()
        .find(|p| p.key() == key)
        .map(|p| p.value())
}

/// The node names listed in `dorac.stop_gradient`; each must be an Identity node.
fn stop_gradient_nodes(model: &ModelProto, gp: &proto::GraphProto) -> Result<HashSet<String>> {
    let Some(json) = metadata(model, meta::STOP_GRADIENT_KEY) else {
        return Ok(HashSet::new());
    };
    let names: Vec<String> = meta::parse(meta::STOP_GRADIENT_KEY, json)?;
    for n in &names {
        if !gp
            .node
            .iter()
            .any(|node| node.name() == n && node.op_type() == "Identity")
        {
            return Err(Error::onnx(format!(
                "metadata '{}' names node '{n}', which is not an Identity node of the graph",
                meta::STOP_GRADIENT_KEY
            )));
        }
    }
    Ok(names.into_iter().collect())
}

/// The IR type of a tensor graph input (float types compute as float32, integer types as
/// int64; the device holds them all as f32), or None when dorac cannot take it.
fn input_dtype(vi: &proto::ValueInfoProto) -> Option<DType> {
    ir_dtype(input_elem_type(vi)? as i32)
}

/// A tensor input's declared ONNX element type.
fn input_elem_type(vi: &proto::ValueInfoProto) -> Option<DataType> {
    match &vi.r#type {
        Some(proto::TypeProto {
            value: Some(type_proto::Value::TensorType(t)),
            ..
        }) => DataType::try_from(t.elem_type()).ok(),
        _ => None,
    }
}

/// Refuses, in one error, everything dorac cannot import: unknown op types, other domains,
/// subgraphs, extra outputs that are used (except where an op has several), and graph inputs
/// of a type dorac cannot take.
fn check_supported(
    nodes: &[&NodeProto],
    inputs: &[&proto::ValueInfoProto],
    consumed: &HashSet<&str>,
) -> Result<()> {
    // (what, names), in order of first appearance.
    let mut problems: Vec<(String, Vec<String>)> = vec![];
    let mut note = |what: String, name: String| match problems.iter_mut().find(|(w, _)| *w == what)
    {
        Some((_, names)) => names.push(name),
        None => problems.push((what, vec![name])),
    };
    for &n in nodes {
        let op = n.op_type();
        let domain = n.domain();
        let default_domain = matches!(domain, "" | "ai.onnx");
        let what = if is_if(n) {
            None
        } else if !default_domain && import_ops::rule_in(domain, op).is_none() {
            Some(format!("{op} (domain '{domain}')"))
        } else if subgraphs(n).next().is_some() {
            Some(format!("{op} (with a subgraph)"))
        } else if import_ops::rule_in(domain, op).is_none() {
            Some(op.to_string())
        } else if !import_ops::MULTI_OUTPUT.contains(&op)
            && n.output
                .iter()
                .skip(1)
                .any(|o| !o.is_empty() && consumed.contains(o.as_str()))
        {
            Some(format!(
                "{op} with its extra outputs used (dorac computes only the first output)"
            ))
        } else {
            None
        };
        if let Some(what) = what {
            note(what, node_label(n));
        }
    }
    let mut typed = |what: String, name: &str| note(what, name.to_string());
    for vi in inputs {
        match &vi.r#type {
            Some(proto::TypeProto {
                value: Some(type_proto::Value::TensorType(t)),
                ..
            }) => {
                if input_dtype(vi).is_none() {
                    typed(
                        format!("{} graph inputs", dtype_name(t.elem_type())),
                        vi.name(),
                    );
                }
            }
            _ => typed("non-tensor graph inputs".into(), vi.name()),
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::Unsupported(
        problems
            .into_iter()
            .map(|(what, names)| {
                let kind = if what.ends_with("graph inputs") {
                    "inputs"
                } else {
                    "nodes"
                };
                format!("{what} ({kind}: {})", names.join(", "))
            })
            .collect(),
    ))
}

/// Node indices in topological order (ties in file order). Also checks that every name a node
/// or graph output reads is produced exactly once, and reports cycles by their nodes.
fn topo_sort<'g>(
    nodes: &'g [NodeProto],
    sources: &HashSet<&str>,
    outputs: &'g [proto::ValueInfoProto],
) -> Result<Vec<usize>> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.output.iter().all(|o| o.is_empty()) {
            return Err(Error::onnx(format!(
                "node '{}' ({}) has no output",
                node_label(n),
                n.op_type()
            )));
        }
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if sources.contains(o.as_str()) {
                return Err(Error::graph(format!(
                    "node '{}' writes '{o}', which is also an initializer or graph input",
                    node_label(n)
                )));
            }
            if let Some(&j) = producer.get(o.as_str()) {
                return Err(Error::graph(format!(
                    "value '{o}' is written by two nodes: '{}' and '{}'",
                    node_label(&nodes[j]),
                    node_label(n)
                )));
            }
            producer.insert(o, i);
        }
    }
    // What each node reads, its subgraphs' outer reads included.
    let node_reads: Vec<Vec<&str>> = nodes.iter().map(reads).collect();
    let mut missing = vec![];
    for (n, read) in nodes.iter().zip(&node_reads) {
        for &v in read {
            if !sources.contains(v) && !producer.contains_key(v) {
                missing.push(format!(
                    "node '{}' reads '{v}', which no initializer, graph input or node produces",
                    node_label(n)
                ));
            }
        }
    }
    for o in outputs {
        if !sources.contains(o.name()) && !producer.contains_key(o.name()) {
            missing.push(format!(
                "graph output '{}' is not produced by any node, initializer or graph input",
                o.name()
            ));
        }
    }
    if !missing.is_empty() {
        return Err(Error::graph(missing.join("; ")));
    }

    // Kahn's algorithm with a min-heap: deterministic, file order among ready nodes.
    let n = nodes.len();
    let mut indegree = vec![0usize; n];
    let mut users: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, read) in node_reads.iter().enumerate() {
        for &v in read {
            if let Some(&p) = producer.get(v) {
                indegree[i] += 1;
                users[p].push(i);
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            indegree[u] -= 1;
            if indegree[u] == 0 {
                ready.push(Reverse(u));
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // The nodes left over are on a cycle or downstream of one; name those on a cycle.
    let left: Vec<usize> = (0..n).filter(|&i| indegree[i] > 0).collect();
    let mut dg = petgraph::graph::DiGraph::<usize, ()>::new();
    let ids: HashMap<usize, _> = left.iter().map(|&i| (i, dg.add_node(i))).collect();
    for &i in &left {
        for &u in &users[i] {
            if let (Some(&a), Some(&b)) = (ids.get(&i), ids.get(&u)) {
                dg.add_edge(a, b, ());
            }
        }
    }
    let mut on_cycle: Vec<usize> = petgraph::algo::tarjan_scc(&dg)
        .into_iter()
        .filter(|scc| scc.len() > 1 || dg.contains_edge(scc[0], scc[0]))
        .flatten()
        .map(|id| dg[id])
        .collect();
    on_cycle.sort_unstable();
    let names: Vec<String> = on_cycle.iter().map(|&i| node_label(&nodes[i])).collect();
    Err(Error::graph(format!(
        "the graph has a cycle through nodes: {}",
        names.join(", ")
    )))
}

/// Static shape and declared dims (for [`ModelInfo::input_dims`]) of each graph input.
#[allow(clippy::type_complexity)]
fn resolve_input_shapes(
    inputs: &[&proto::ValueInfoProto],
    pins: &HashMap<String, usize>,
    input_shapes: &HashMap<String, Vec<usize>>,
) -> Result<Vec<(Vec<usize>, Vec<Option<String>>)>> {
    let declared: Vec<Option<Vec<DeclaredDim>>> =
        inputs.iter().map(|vi| declared_dims(vi)).collect();

    // Given shapes: check against the declaration, and learn the symbolic dims they fix.
    let mut learned: HashMap<String, (usize, String)> = HashMap::new();
    let mut errors: Vec<String> = vec![];
    for (vi, decl) in inputs.iter().zip(&declared) {
        let (Some(given), Some(decl)) = (input_shapes.get(vi.name()), decl) else {
            continue;
        };
        let fits = given.len() == decl.len()
            && given.iter().zip(decl).all(|(g, d)| match d {
                DeclaredDim::Fixed(v) => g == v,
                _ => true,
            });
        if !fits {
            return Err(Error::input_at(
                Subject::named("input", vi.name()),
                format!(
                    "the given shape {} does not match the model's {}",
                    list_str(given),
                    declared_str(decl)
                ),
            ));
        }
        for (&g, d) in given.iter().zip(decl) {
            if let DeclaredDim::Param(p) = d {
                if let Some(&pin) = pins.get(p) {
                    if pin != g {
                        errors.push(format!(
                            "input '{}' has shape {} (dim '{p}' = {g}), but --shape {p}={pin}",
                            vi.name(),
                            list_str(given)
                        ));
                    }
                }
                learned
                    .entry(p.clone())
                    .or_insert((g, vi.name().to_string()));
            }
        }
    }
    if !errors.is_empty() {
        return Err(Error::input(errors.join("; ")));
    }

    let mut out = vec![];
    let mut unpinned: Vec<String> = vec![];
    for (vi, decl) in inputs.iter().zip(&declared) {
        let name = vi.name();
        let given = input_shapes.get(name);
        let Some(decl) = decl else {
            match given {
                Some(g) => out.push((g.clone(), vec![Some("?".to_string()); g.len()])),
                None => unpinned.push(format!(
                    "input '{name}' declares no shape: give it with --shape {name}=DIMS (e.g. \
                     --shape {name}=3x16)"
                )),
            }
            continue;
        };
        let dims: Vec<Option<String>> = decl
            .iter()
            .map(|d| match d {
                DeclaredDim::Fixed(_) => None,
                DeclaredDim::Param(p) => Some(p.clone()),
                DeclaredDim::Unknown => Some("?".to_string()),
            })
            .collect();
        if let Some(g) = given {
            out.push((g.clone(), dims));
            continue;
        }
        let known = |p: &str| pins.get(p).copied().or(learned.get(p).map(|l| l.0));
        let sizes: Vec<Option<usize>> = decl
            .iter()
            .map(|d| match d {
                DeclaredDim::Fixed(v) => Some(*v),
                DeclaredDim::Param(p) => {
                    known(p).or_else(|| DimExpr::parse(p).and_then(|e| e.eval(known)))
                }
                DeclaredDim::Unknown => None,
            })
            .collect();
        if sizes.iter().any(Option::is_none) {
            let example: Vec<String> = sizes
                .iter()
                .map(|s| s.map_or("N".to_string(), |v| v.to_string()))
                .collect();
            let example = example.join("x");
            for (i, (s, d)) in sizes.iter().zip(decl).enumerate() {
                if s.is_some() {
                    continue;
                }
                let expr = match d {
                    DeclaredDim::Param(p) => DimExpr::parse(p),
                    _ => None,
                };
                unpinned.push(match d {
                    DeclaredDim::Param(p) if expr.is_some() => {
                        let terms: Vec<String> = expr
                            .iter()
                            .flat_map(|e| e.names())
                            .filter(|n| known(n).is_none())
                            .map(|n| format!("--shape {n}=N"))
                            .collect();
                        format!(
                            "input '{name}' has dim {i} '{p}' (of {}) with no size: pin its terms with {}, or give the whole shape with --shape {name}={example}",
                            declared_str(decl),
                            terms.join(" ")
                        )
                    }
                    DeclaredDim::Param(p) => format!(
                        "input '{name}' has symbolic dim '{p}' (dim {i} of {}) with no size: pin \
                         it with --shape {p}=N{}, or give the whole shape with --shape \
                         {name}={example}",
                        declared_str(decl),
                        // Key/value caches: what to give when there is none, and the head
                        // size onnxruntime-genai's builder leaves symbolic.
                        if p.starts_with("past") {
                            " (0 for no cache, as in training)"
                        } else if p == "kv_cache_dim" {
                            " (the attention's head size: `head_size` in genai_config.json)"
                        } else {
                            ""
                        }
                    ),
                    _ => format!(
                        "input '{name}' has an unnamed dim {i} (of {}) with no size: give the \
                         whole shape with --shape {name}={example}",
                        declared_str(decl)
                    ),
                });
            }
            continue;
        }
        out.push((sizes.into_iter().flatten().collect(), dims));
    }
    if !unpinned.is_empty() {
        return Err(Error::input(unpinned.join("; ")));
    }
    Ok(out)
}

/// A graph output's computed shape against the one the model declares: the rank, and every
/// dim the declaration fixes (symbolic dims are whatever the pins made them).
fn check_declared_shape(o: &proto::ValueInfoProto, computed: &[usize]) -> Result<()> {
    use proto::tensor_shape_proto::dimension::Value as Dim;
    use proto::type_proto::Value as Type;
    let Some(Type::TensorType(t)) = o.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Ok(());
    };
    let Some(shape) = t.shape.as_ref() else {
        return Ok(());
    };
    let declared: Vec<Option<i64>> = shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Dim::DimValue(v)) if v > 0 => Some(v),
            _ => None,
        })
        .collect();
    let fits = declared.len() == computed.len()
        && declared
            .iter()
            .zip(computed)
            .all(|(d, &c)| d.is_none_or(|d| d as usize == c));
    if fits {
        return Ok(());
    }
    let shown: Vec<String> = declared
        .iter()
        .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
        .collect();
    Err(Error::shape(format!(
        "graph output '{}': the model declares shape [{}], but its nodes compute {}",
        o.name(),
        shown.join(", "),
        crate::tensor::shape_str(computed)
    )))
}
