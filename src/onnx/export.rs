//! IR -> ONNX model. Constants become initializers (`raw_data`), every op its ONNX node, graph
//! inputs and outputs get their static shapes. Adapter records and stop-gradient markers go into
//! `metadata_props` (see [`super::meta`]) so that [`super::import`] restores them.
//!
//! Value names are the IR node names, except that a node feeding a graph output is named after
//! that output (an extra `Identity` per further output it feeds), and names are made unique. Node
//! names are the IR labels, made unique. The output is deterministic: nodes in a topological order
//! with ties broken by node id.
//!
//! Opset: the source model's, raised to at least 13 (Softmax over one axis and ReduceSum with an
//! axes input have their current meaning from 13 on) and to 17 when the graph has a LayerNorm
//! (LayerNormalization exists from 17). Gelu is written as the Gelu op when the opset is at least
//! 20 (the source model already needed a runtime that has it), else as its Erf (or Tanh) formula.

use super::data::tensor_to_proto;
use super::external::{ExternalData, EXTERNAL_MIN_BYTES};
use super::meta::{self, AdapterMeta};
use super::proto::{
    self, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, ModelProto, NodeProto, TensorProto,
};
use crate::error::{Error, Result, Subject};
use crate::ir::{unary, Graph, NodeId, Op};
use crate::tensor::{DType, Tensor};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// The lowest `ir_version` export writes (the source model's is kept when higher).
pub const EXPORT_MIN_IR_VERSION: i64 = 8;
/// The lowest default-domain opset export writes.
pub const EXPORT_MIN_OPSET: i64 = 13;
/// The opset export writes when the graph has a LayerNorm.
pub const LAYER_NORM_OPSET: i64 = 17;
/// The first opset with the Gelu op.
pub const GELU_OPSET: i64 = 20;
/// The lowest opset export writes when the graph has a Trilu (which exists from 14).
pub const TRILU_OPSET: i64 = 14;

/// Turns the IR into an ONNX model (see the module docs for naming and opset rules), every
/// tensor inline.
pub fn export(graph: &Graph) -> Result<ModelProto> {
    export_with(graph, None)
}

/// [`export`], with the initializers of at least [`EXTERNAL_MIN_BYTES`] written to `external`
/// instead of inline.
pub(crate) fn export_with(
    graph: &Graph,
    external: Option<&mut ExternalData>,
) -> Result<ModelProto> {
    let order = stable_topo(graph)?;
    let mut opset = graph.info.opset.max(EXPORT_MIN_OPSET);
    if order
        .iter()
        .any(|&n| matches!(graph.node(n).op, Op::LayerNorm { .. }))
    {
        opset = opset.max(LAYER_NORM_OPSET);
    }
    if order
        .iter()
        .any(|&n| matches!(graph.node(n).op, Op::Trilu { .. }))
    {
        opset = opset.max(TRILU_OPSET);
    }
    let mut ex = Exporter {
        external,
        graph,
        names: HashMap::new(),
        used_values: HashSet::new(),
        used_nodes: HashSet::new(),
        nodes: vec![],
        consts: vec![],
        extra_inits: vec![],
        stop_gradient: vec![],
        opset,
    };
    let extra_outputs = ex.assign_names(&order)?;
    for &n in &order {
        ex.emit(n)?;
    }
    // A node that feeds several graph outputs: one Identity per further output.
    for (out, n) in &extra_outputs {
        let src = ex.names[n].clone();
        ex.node("Identity", vec![src], out.clone(), out, vec![]);
    }
    ex.consts.sort_by_key(|(n, _)| *n);

    let value_info = |name: &str, n: NodeId| {
        let node = graph.node(n);
        tensor_value_info(name, &node.shape, data_type(node.dtype))
    };
    let inputs = graph
        .inputs()
        .iter()
        .map(|&n| value_info(&ex.names[&n], n))
        .collect();
    let outputs = graph
        .outputs()
        .iter()
        .map(|(name, n)| value_info(name, *n))
        .collect();

    let mut metadata_props = vec![];
    if !graph.adapters().is_empty() {
        let mut records = vec![];
        for a in graph.adapters() {
            let refs = [
                Some(a.x),
                Some(a.weight),
                a.bias,
                Some(a.lora_a),
                Some(a.lora_b),
            ];
            let refs = refs.into_iter().chain([a.magnitude, Some(a.output)]);
            if let Some(missing) = refs.flatten().find(|n| !ex.names.contains_key(n)) {
                return Err(Error::graph(format!(
                    "adapter for module '{}' refers to node {} that is no longer in the graph",
                    a.module,
                    missing.index()
                )));
            }
            records.push(AdapterMeta::from_layer(a, &|n| ex.names[&n].clone()));
        }
        metadata_props.push(string_entry(meta::ADAPTERS_KEY, meta::to_json(&records)));
    }
    let filters: std::collections::BTreeMap<&str, &Vec<usize>> = graph
        .conv_filters()
        .iter()
        .filter_map(|(n, s)| ex.names.get(n).map(|name| (name.as_str(), s)))
        .collect();
    if !filters.is_empty() {
        metadata_props.push(string_entry(
            meta::CONV_FILTERS_KEY,
            meta::to_json(&filters),
        ));
    }
    if !ex.stop_gradient.is_empty() {
        metadata_props.push(string_entry(
            meta::STOP_GRADIENT_KEY,
            meta::to_json(&ex.stop_gradient),
        ));
    }

    let initializer = ex
        .consts
        .into_iter()
        .map(|(_, t)| t)
        .chain(ex.extra_inits)
        .collect();
    let graph_name = match graph.info.graph_name.as_str() {
        "" => "dorac",
        n => n,
    };
    Ok(ModelProto {
        ir_version: Some(graph.info.ir_version.max(EXPORT_MIN_IR_VERSION)),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        producer_name: Some("dorac".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(proto::GraphProto {
            node: ex.nodes,
            name: Some(graph_name.to_string()),
            initializer,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        metadata_props,
        ..Default::default()
    })
}

/// Nodes in topological order, ready nodes taken by smallest id (Kahn's algorithm), so the
/// same graph always exports the same file.
fn stable_topo(graph: &Graph) -> Result<Vec<NodeId>> {
    let g = &graph.petgraph();
    let mut indegree: HashMap<NodeId, usize> = g
        .node_indices()
        .map(|n| {
            (
                n,
                g.neighbors_directed(n, petgraph::Direction::Incoming)
                    .count(),
            )
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<NodeId>> = indegree
        .iter()
        .filter(|(_, &d)| d == 0)
        .map(|(&n, _)| Reverse(n))
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(Reverse(n)) = ready.pop() {
        order.push(n);
        // One entry per edge: a node that reads a value twice has two incoming edges.
        for user in g.neighbors_directed(n, petgraph::Direction::Outgoing) {
            let d = indegree.get_mut(&user).expect("node in graph");
            *d -= 1;
            if *d == 0 {
                ready.push(Reverse(user));
            }
        }
    }
    if order.len() != indegree.len() {
        let done: HashSet<NodeId> = order.into_iter().collect();
        let mut left: Vec<NodeId> = g.node_indices().filter(|n| !done.contains(n)).collect();
        left.sort();
        let names: Vec<&str> = left.iter().map(|&n| graph.node(n).label.as_str()).collect();
        return Err(Error::graph(format!(
            "the graph has a cycle through (or after) nodes: {}",
            names.join(", ")
        )));
    }
    Ok(order)
}

struct Exporter<'g, 'w> {
    /// The opset being written (ReduceSumSquare's axes move from attribute to input at 18).
    opset: i64,
    /// Where initializers of at least [`EXTERNAL_MIN_BYTES`] go, when writing external data.
    external: Option<&'w mut ExternalData>,
    graph: &'g Graph,
    /// Final ONNX value name of each IR node.
    names: HashMap<NodeId, String>,
    used_values: HashSet<String>,
    used_nodes: HashSet<String>,
    nodes: Vec<NodeProto>,
    /// Initializers of Const nodes, by node id (sorted before writing).
    consts: Vec<(NodeId, TensorProto)>,
    /// Initializers export adds (Reshape shapes, ReduceSum axes, Gelu constants).
    extra_inits: Vec<TensorProto>,
    /// ONNX names of the Identity nodes that stand for StopGradient.
    stop_gradient: Vec<String>,
}

/// `base`, or `base_1`, `base_2`, ... : the first not in `used`, which it is added to.
fn unique(used: &mut HashSet<String>, base: &str) -> String {
    let name = if used.contains(base) {
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !used.contains(n))
            .unwrap()
    } else {
        base.to_string()
    };
    used.insert(name.clone());
    name
}

impl Exporter<'_, '_> {
    /// Gives every node its value name. Returns the graph outputs that need an Identity.
    fn assign_names(&mut self, order: &[NodeId]) -> Result<Vec<(String, NodeId)>> {
        let g = self.graph;
        let mut input_names: HashMap<&str, NodeId> = HashMap::new();
        for &n in g.inputs() {
            if !g.contains(n) || g.node(n).op != Op::Input {
                return Err(Error::graph(format!(
                    "graph input #{} is not an input node of the graph",
                    n.index()
                )));
            }
            if input_names.insert(&g.node(n).name, n).is_some() {
                return Err(Error::graph(format!(
                    "two graph inputs are named '{}'",
                    g.node(n).name
                )));
            }
        }
        let mut out_of: HashMap<NodeId, String> = HashMap::new();
        let mut extra = vec![];
        let mut out_names = HashSet::new();
        for (name, n) in g.outputs() {
            if !g.contains(*n) {
                return Err(Error::graph(format!(
                    "graph output '{name}' refers to a node no longer in the graph"
                )));
            }
            if !out_names.insert(name.as_str()) {
                return Err(Error::graph(format!(
                    "graph output '{name}' is listed twice"
                )));
            }
            match input_names.get(name.as_str()) {
                Some(i) if i == n => continue, // the input itself is the output
                Some(_) => {
                    return Err(Error::graph(format!(
                        "graph output '{name}' has the name of a graph input but another value"
                    )))
                }
                None => {}
            }
            if g.node(*n).op == Op::Input || out_of.contains_key(n) {
                extra.push((name.clone(), *n));
            } else {
                out_of.insert(*n, name.clone());
            }
        }
        self.used_values = input_names.keys().map(|s| s.to_string()).collect();
        self.used_values
            .extend(out_names.iter().map(|s| s.to_string()));
        for &n in order {
            let node = g.node(n);
            let name = if node.op == Op::Input {
                if !input_names.contains_key(node.name.as_str()) {
                    return Err(Error::graph(format!(
                        "input node '{}' is not listed as a graph input",
                        node.name
                    )));
                }
                node.name.clone()
            } else if let Some(out) = out_of.get(&n) {
                out.clone()
            } else {
                unique(&mut self.used_values, &node.name)
            };
            self.names.insert(n, name);
        }
        Ok(extra)
    }

    /// Appends an ONNX node; returns its (unique) node name.
    fn node(
        &mut self,
        op_type: &str,
        inputs: Vec<String>,
        output: String,
        name: &str,
        attribute: Vec<AttributeProto>,
    ) -> String {
        let name = unique(&mut self.used_nodes, name);
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![output],
            name: Some(name.clone()),
            op_type: Some(op_type.into()),
            domain: Some(String::new()),
            attribute,
            ..Default::default()
        });
        name
    }

    /// True when Gather node `n` has constant ids of which some fall outside `-len..len` of
    /// its data's axis `axis`.
    fn gathers_outside(&self, n: NodeId, axis: usize) -> bool {
        let g = self.graph;
        let (data, ids) = (g.inputs_of(n)[0], g.inputs_of(n)[1]);
        let len = g.shape(data)[axis] as i64;
        let ids = g.const_tensor(ids).and_then(|t| t.as_i64());
        ids.is_some_and(|v| v.iter().any(|i| !(-len..len).contains(i)))
    }

    /// True when constant `n` is read only as the ids of Gathers that export with ids of their
    /// own ([`Self::gathers_outside`]): it would be an initializer no node reads.
    fn only_remapped_ids(&self, n: NodeId) -> bool {
        let g = self.graph;
        let readers = g.consumers(n);
        !readers.is_empty()
            && !g.outputs().iter().any(|(_, o)| *o == n)
            && readers.iter().all(|&r| match g.node(r).op {
                Op::Gather { axis } => g.inputs_of(r)[0] != n && self.gathers_outside(r, axis),
                _ => false,
            })
    }

    /// Adds an initializer that export makes up; returns its (unique) value name.
    fn extra_const(&mut self, base: &str, t: &Tensor) -> String {
        let name = unique(&mut self.used_values, base);
        self.extra_inits.push(tensor_to_proto(&name, t));
        name
    }

    fn emit(&mut self, n: NodeId) -> Result<()> {
        let g = self.graph;
        let node = g.node(n);
        let out = self.names[&n].clone();
        let ins: Vec<String> = g
            .inputs_of(n)
            .iter()
            .map(|i| self.names[i].clone())
            .collect();
        let label = node.label.as_str();
        let (op_type, attrs): (&str, Vec<AttributeProto>) = match &node.op {
            Op::Input => return Ok(()),
            Op::Const(_) if self.only_remapped_ids(n) => return Ok(()),
            Op::Const(t) => {
                let bytes = t.numel() * t.dtype().size();
                let proto = match self.external.as_deref_mut() {
                    Some(ext) if bytes >= EXTERNAL_MIN_BYTES => ext.write(&out, t)?,
                    _ => tensor_to_proto(&out, t),
                };
                self.consts.push((n, proto));
                return Ok(());
            }
            Op::MatMul => ("MatMul", vec![]),
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => (
                "Gemm",
                vec![
                    attr_float("alpha", *alpha),
                    attr_float("beta", *beta),
                    attr_int("transA", *trans_a as i64),
                    attr_int("transB", *trans_b as i64),
                ],
            ),
            Op::Unary(u)
                if (*u == unary::GELU || *u == unary::GELU_TANH) && self.opset >= GELU_OPSET =>
            {
                let approximate = if *u == unary::GELU_TANH {
                    "tanh"
                } else {
                    "none"
                };
                ("Gelu", vec![attr_string("approximate", approximate)])
            }
            Op::Unary(u) if *u == unary::GELU || *u == unary::GELU_TANH => {
                self.gelu(&ins[0], &out, label, *u == unary::GELU_TANH);
                return Ok(());
            }
            Op::Unary(u) if *u == unary::POSITIVE_OR_ONE => {
                // Where(Less(0, x), x, 1)
                let zero = self.extra_const(&format!("{out}_zero"), &Tensor::scalar(0.0));
                let one = self.extra_const(&format!("{out}_one"), &Tensor::scalar(1.0));
                let positive = unique(&mut self.used_values, &format!("{out}_positive"));
                let x = ins[0].clone();
                self.node(
                    "Less",
                    vec![zero, x.clone()],
                    positive.clone(),
                    &format!("{label}/positive"),
                    vec![],
                );
                self.node("Where", vec![positive, x, one], out, label, vec![]);
                return Ok(());
            }
            Op::Unary(u) => match u.def().onnx {
                Some(op_type) => (op_type, vec![]),
                None => {
                    return Err(Error::graph(format!(
                        "{} has no ONNX form (exporter bug)",
                        u.name()
                    )))
                }
            },
            Op::Binary(b) => {
                let def = b.def();
                let attrs = def.onnx_attrs.iter().map(|&(k, v)| attr_int(k, v));
                (def.onnx, attrs.collect())
            }
            Op::Identity => ("Identity", vec![]),
            Op::StopGradient => {
                let name = self.node("Identity", ins, out, label, vec![]);
                self.stop_gradient.push(name);
                return Ok(());
            }
            Op::Reshape { shape } => {
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                let t = Tensor::i64(vec![dims.len()], dims);
                let s = self.extra_const(&format!("{out}_shape"), &t);
                let mut attrs = vec![];
                // A literal 0 means "copy the input dim" unless allowzero is set.
                if shape.contains(&0) {
                    attrs.push(attr_int("allowzero", 1));
                }
                let ins = vec![ins[0].clone(), s];
                self.node("Reshape", ins, out, label, attrs);
                return Ok(());
            }
            Op::Transpose { perm } => (
                "Transpose",
                vec![attr_ints("perm", perm.iter().map(|&p| p as i64).collect())],
            ),
            Op::Reduce {
                kind,
                axes,
                keepdims,
            } => {
                let op_type = kind.def().onnx;
                let a: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
                let mut attrs = vec![attr_int("keepdims", *keepdims as i64)];
                let mut node_inputs = vec![ins[0].clone()];
                if self.opset >= kind.def().axes_input_since {
                    let t = Tensor::i64(vec![a.len()], a);
                    node_inputs.push(self.extra_const(&format!("{out}_axes"), &t));
                    if axes.is_empty() {
                        attrs.push(attr_int("noop_with_empty_axes", 1));
                    }
                } else {
                    attrs.push(attr_ints("axes", a));
                }
                self.node(op_type, node_inputs, out, label, attrs);
                return Ok(());
            }
            Op::LayerNorm { axis, epsilon } => (
                "LayerNormalization",
                vec![
                    attr_int("axis", *axis as i64),
                    attr_float("epsilon", *epsilon),
                ],
            ),
            Op::Softmax { axis } => ("Softmax", vec![attr_int("axis", *axis as i64)]),
            Op::Expand { shape } => {
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                let t = Tensor::i64(vec![dims.len()], dims);
                let s = self.extra_const(&format!("{out}_shape"), &t);
                let ins = vec![ins[0].clone(), s];
                self.node("Expand", ins, out, label, vec![]);
                return Ok(());
            }
            Op::Cast { to } => ("Cast", vec![attr_int("to", data_type(*to) as i64)]),
            Op::Where => ("Where", vec![]),
            Op::Gather { axis } if self.gathers_outside(n, *axis) => {
                // A constant id outside the axis gathers 0 in the IR (the Pad and Conv
                // lowerings use one for their padding), where ONNX leaves the model invalid:
                // the data gets a zero slot after its end, and such ids point at it.
                let (data, ids) = (g.inputs_of(n)[0], g.inputs_of(n)[1]);
                let len = g.shape(data)[*axis] as i64;
                let t = g.const_tensor(ids).expect("checked by gathers_outside");
                let v = t.as_i64().expect("checked by gathers_outside");
                let rank = g.shape(data).len();
                let mut pads = vec![0i64; 2 * rank];
                pads[rank + axis] = 1;
                let pads =
                    self.extra_const(&format!("{out}_pads"), &Tensor::i64(vec![2 * rank], pads));
                let padded = unique(&mut self.used_values, &format!("{out}_padded"));
                self.node(
                    "Pad",
                    vec![ins[0].clone(), pads],
                    padded.clone(),
                    label,
                    vec![],
                );
                let inside = |i: i64| match i {
                    i if (0..len).contains(&i) => i,
                    i if (-len..0).contains(&i) => i + len,
                    _ => len,
                };
                let remapped = Tensor::i64(t.shape.clone(), v.iter().map(|&i| inside(i)).collect());
                let ids = self.extra_const(&format!("{out}_ids"), &remapped);
                let attrs = vec![attr_int("axis", *axis as i64)];
                self.node("Gather", vec![padded, ids], out, label, attrs);
                return Ok(());
            }
            Op::Gather { axis } => ("Gather", vec![attr_int("axis", *axis as i64)]),
            Op::GatherElements { axis } => ("GatherElements", vec![attr_int("axis", *axis as i64)]),
            Op::GatherND { batch_dims } => {
                ("GatherND", vec![attr_int("batch_dims", *batch_dims as i64)])
            }
            Op::Concat { axis } => ("Concat", vec![attr_int("axis", *axis as i64)]),
            Op::Slice {
                starts,
                ends,
                steps,
            } => {
                let x_shape = g.shape(g.inputs_of(n)[0]);
                // ONNX reads a negative position as counted from the end; a window running
                // down past element 0 ends (or, when empty, starts) at -1, written as -dim - 1,
                // which ONNX clamps back to -1.
                let onnx_pos = |v: i64, d: usize| if v < 0 { -(x_shape[d] as i64) - 1 } else { v };
                let rank = x_shape.len();
                let list = |ex: &mut Self, tag: &str, v: Vec<i64>| {
                    ex.extra_const(&format!("{out}_{tag}"), &Tensor::i64(vec![rank], v))
                };
                let s = list(
                    self,
                    "starts",
                    (0..rank).map(|d| onnx_pos(starts[d], d)).collect(),
                );
                let e = list(
                    self,
                    "ends",
                    (0..rank).map(|d| onnx_pos(ends[d], d)).collect(),
                );
                let a = list(self, "axes", (0..rank as i64).collect());
                let st = list(self, "steps", steps.clone());
                let ins = vec![ins[0].clone(), s, e, a, st];
                self.node("Slice", ins, out, label, vec![]);
                return Ok(());
            }
            &Op::Trilu { upper, k } => {
                let kc = self.extra_const(&format!("{out}_k"), &Tensor::i64(vec![], vec![k]));
                let ins = vec![ins[0].clone(), kc];
                self.node(
                    "Trilu",
                    ins,
                    out,
                    label,
                    vec![attr_int("upper", upper as i64)],
                );
                return Ok(());
            }
            // Training-only ops (gradients, fused losses) have no ONNX form: training graphs
            // are compiled, never exported.
            op @ (Op::UnaryGrad(_)
            | Op::SoftmaxCrossEntropy { .. }
            | Op::SoftmaxCrossEntropyGrad { .. }
            | Op::DoraNormSq(_)) => {
                return Err(Error::graph_at(
                    Subject::named("node", label),
                    format!(
                        "the training-only op {} cannot be exported to ONNX",
                        op.name()
                    ),
                ))
            }
        };
        self.node(op_type, ins, out, label, attrs);
        Ok(())
    }

    /// Gelu as `0.5 * x * (1 + erf(x / sqrt(2)))`, or with `tanh`
    /// `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`.
    fn gelu(&mut self, x: &str, out: &str, label: &str, tanh: bool) {
        let step = |ex: &mut Self, op: &str, ins: Vec<String>, tag: &str| {
            let v = unique(&mut ex.used_values, &format!("{out}_gelu_{tag}"));
            ex.node(op, ins, v.clone(), &format!("{label}/gelu_{tag}"), vec![]);
            v
        };
        let konst = |ex: &mut Self, tag: &str, v: f32| {
            ex.extra_const(&format!("{out}_gelu_{tag}"), &Tensor::scalar(v))
        };
        let inner = if tanh {
            let c = konst(self, "c", 0.044715);
            let k = konst(self, "k", (2.0 / std::f64::consts::PI).sqrt() as f32);
            let x2 = step(self, "Mul", vec![x.into(), x.into()], "x2");
            let x3 = step(self, "Mul", vec![x2, x.into()], "x3");
            let cx3 = step(self, "Mul", vec![x3, c], "cx3");
            let s = step(self, "Add", vec![x.into(), cx3], "sum");
            let t = step(self, "Mul", vec![s, k], "scaled");
            step(self, "Tanh", vec![t], "tanh")
        } else {
            let r = konst(self, "sqrt2", std::f64::consts::SQRT_2 as f32);
            let d = step(self, "Div", vec![x.into(), r], "div");
            step(self, "Erf", vec![d], "erf")
        };
        let one = konst(self, "one", 1.0);
        let half = konst(self, "half", 0.5);
        let p = step(self, "Add", vec![inner, one], "plus1");
        let m = step(self, "Mul", vec![x.into(), p], "mul");
        self.node("Mul", vec![m, half], out.to_string(), label, vec![]);
    }
}

/// The ONNX element type of an IR type.
fn data_type(t: DType) -> DataType {
    match t {
        DType::F32 => DataType::Float,
        DType::I64 => DataType::Int64,
        DType::Bool => DataType::Bool,
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v,
        ..Default::default()
    }
}

fn string_entry(key: &str, value: String) -> proto::StringStringEntryProto {
    proto::StringStringEntryProto {
        key: Some(key.into()),
        value: Some(value),
    }
}

/// A ValueInfo for a tensor of static shape.
pub(crate) fn tensor_value_info(
    name: &str,
    shape: &[usize],
    elem: DataType,
) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(proto::TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
