//! The ONNX op table: how each supported ONNX op type becomes IR nodes. Supporting a new op is
//! one entry in [`OPS`] (plus, usually, a small function below it); the importer asks this table
//! both whether an op is supported and how to build it.
//!
//! A builder reads its node through [`Ctx`]: inputs (float32 values, or int64 constants that
//! are consumed at import, such as Reshape's shape), attributes with their defaults, and the
//! opset. It adds its IR nodes with [`Ctx::add`], which names the result after the ONNX node's
//! output and checks shapes, and returns the node that produces the ONNX node's first output.

use super::data;
use super::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto, TensorProto};
use crate::error::{Error, Result};
use crate::ir::{Binary, Graph, NodeId, Op, Reduce, Unary};
use crate::tensor::{shape_str, DType, Tensor};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

/// How an ONNX op type is imported.
#[derive(Clone, Copy)]
pub enum Rule {
    /// An element-wise op of one input without attributes.
    Unary(Unary),
    /// An element-wise op of two inputs (numpy broadcasting) without attributes.
    Binary(Binary),
    /// Anything else: a function that builds the node.
    Build(fn(&mut Ctx) -> Result<NodeId>),
}

/// Every ONNX op type (default domain) dorac imports.
pub const OPS: &[(&str, Rule)] = &[
    ("Add", Rule::Binary(Binary::Add)),
    ("Sub", Rule::Binary(Binary::Sub)),
    ("Mul", Rule::Binary(Binary::Mul)),
    ("Div", Rule::Binary(Binary::Div)),
    ("Pow", Rule::Binary(Binary::Pow)),
    ("Relu", Rule::Unary(Unary::Relu)),
    ("Sigmoid", Rule::Unary(Unary::Sigmoid)),
    ("Tanh", Rule::Unary(Unary::Tanh)),
    ("Erf", Rule::Unary(Unary::Erf)),
    ("Sqrt", Rule::Unary(Unary::Sqrt)),
    ("Neg", Rule::Unary(Unary::Neg)),
    ("Exp", Rule::Unary(Unary::Exp)),
    ("Log", Rule::Unary(Unary::Log)),
    ("Reciprocal", Rule::Unary(Unary::Reciprocal)),
    ("Gelu", Rule::Build(gelu)),
    ("MatMul", Rule::Build(matmul)),
    ("Gemm", Rule::Build(gemm)),
    ("Identity", Rule::Build(identity)),
    ("Constant", Rule::Build(constant)),
    ("Reshape", Rule::Build(reshape)),
    ("Flatten", Rule::Build(flatten)),
    ("Transpose", Rule::Build(transpose)),
    ("LayerNormalization", Rule::Build(layer_norm)),
    ("Softmax", Rule::Build(softmax)),
    ("ReduceSum", Rule::Build(reduce_sum)),
    ("ReduceSumSquare", Rule::Build(reduce_sum_square)),
];

/// The rule for an op type of the default domain, or None when dorac does not support it.
pub fn rule(op_type: &str) -> Option<Rule> {
    OPS.iter().find(|(t, _)| *t == op_type).map(|(_, r)| *r)
}

/// Builds the IR for one node (whose op type has a rule), then checks that the builder read
/// every input the node has, so an input dorac would ignore is an error and not a wrong result.
pub(crate) fn build(cx: &mut Ctx) -> Result<NodeId> {
    let rule = rule(cx.op_type()).ok_or_else(|| {
        Error::Unsupported(vec![format!("{} (nodes: {})", cx.op_type(), cx.label)])
    })?;
    let id = match rule {
        Rule::Unary(u) => {
            let x = cx.input(0)?;
            cx.add(Op::Unary(u), &[x])?
        }
        Rule::Binary(b) => {
            let a = cx.input(0)?;
            let b_in = cx.input(1)?;
            cx.add(Op::Binary(b), &[a, b_in])?
        }
        Rule::Build(f) => f(cx)?,
    };
    let used = cx.max_read.get();
    if let Some((i, name)) = cx
        .node
        .input
        .iter()
        .enumerate()
        .skip(used)
        .find(|(_, n)| !n.is_empty())
    {
        return Err(cx.err(format!(
            "input {i} ('{name}') is not one dorac reads (the node has {} inputs)",
            cx.node.input.len()
        )));
    }
    Ok(id)
}

/// What a builder sees of the node it imports.
pub struct Ctx<'a> {
    pub graph: &'a mut Graph,
    pub values: &'a HashMap<String, NodeId>,
    /// Opset version of the default domain.
    pub opset: i64,
    pub node: &'a NodeProto,
    /// IR name of the result: the node's first output.
    pub name: String,
    /// IR label: the ONNX node name (or the output name for an unnamed node).
    pub label: String,
    /// Where external data of Constant tensors is read from.
    pub model_dir: &'a Path,
    /// The node is an Identity that dorac exported for a StopGradient.
    pub stop_gradient: bool,
    max_read: Cell<usize>,
}

impl<'a> Ctx<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        graph: &'a mut Graph,
        values: &'a HashMap<String, NodeId>,
        opset: i64,
        node: &'a NodeProto,
        name: String,
        label: String,
        model_dir: &'a Path,
        stop_gradient: bool,
    ) -> Self {
        Ctx {
            graph,
            values,
            opset,
            node,
            name,
            label,
            model_dir,
            stop_gradient,
            max_read: Cell::new(0),
        }
    }

    pub fn op_type(&self) -> &str {
        self.node.op_type()
    }

    /// An error about this node (malformed attributes or inputs).
    pub fn err(&self, msg: String) -> Error {
        Error::Onnx(format!("node '{}' ({}): {msg}", self.label, self.op_type()))
    }

    /// A dorac limitation hit by this node, as a one-entry [`Error::Unsupported`].
    pub fn unsupported(&self, what: String) -> Error {
        Error::Unsupported(vec![format!("{what} (nodes: {})", self.label)])
    }

    fn mark_read(&self, i: usize) {
        self.max_read.set(self.max_read.get().max(i + 1));
    }

    /// Optional input `i` (absent or empty name: None), without a dtype check.
    fn value(&self, i: usize) -> Option<NodeId> {
        self.mark_read(i);
        let name = self.node.input.get(i).filter(|n| !n.is_empty())?;
        // The importer has checked that every input name resolves.
        self.values.get(name).copied()
    }

    /// Optional float32 input `i`.
    pub fn opt_input(&self, i: usize) -> Result<Option<NodeId>> {
        let Some(id) = self.value(i) else {
            return Ok(None);
        };
        let n = self.graph.node(id);
        if n.dtype != DType::F32 {
            return Err(self.unsupported(format!(
                "{} on {} values (input '{}'; dorac computes in float32 only)",
                self.op_type(),
                n.dtype.name(),
                n.name
            )));
        }
        Ok(Some(id))
    }

    /// Required float32 input `i`.
    pub fn input(&self, i: usize) -> Result<NodeId> {
        self.opt_input(i)?
            .ok_or_else(|| self.err(format!("input {i} is missing")))
    }

    /// Optional input `i` that must be an int64 (or int32) constant, consumed at import (a
    /// shape, axes). A computed value is a dorac limitation, reported as unsupported.
    pub fn const_ints(&self, i: usize, what: &str) -> Result<Option<Vec<i64>>> {
        let Some(id) = self.value(i) else {
            return Ok(None);
        };
        match self.graph.const_tensor(id).and_then(|t| t.as_i64()) {
            Some(v) => Ok(Some(v.to_vec())),
            None => Err(self.unsupported(format!(
                "{} with a {what} that is not an int64 constant",
                self.op_type()
            ))),
        }
    }

    pub fn shape(&self, id: NodeId) -> Vec<usize> {
        self.graph.shape(id).to_vec()
    }

    /// Adds the node's result (named after its output, labelled with the node name).
    pub fn add(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let (name, label) = (self.name.clone(), self.label.clone());
        self.graph.add(op, inputs, &name, &label)
    }

    fn attr(&self, name: &str, ty: AttributeType) -> Result<Option<&'a AttributeProto>> {
        let Some(a) = self.node.attribute.iter().find(|a| a.name() == name) else {
            return Ok(None);
        };
        if a.ref_attr_name.is_some() {
            return Err(self.err(format!(
                "attribute '{name}' refers to a function attribute, which dorac does not support"
            )));
        }
        // Some exporters leave `type` unset; then trust the field that holds a value.
        if a.r#type.is_some() && a.r#type() != ty {
            return Err(self.err(format!(
                "attribute '{name}' has type {}, expected {}",
                a.r#type().as_str_name(),
                ty.as_str_name()
            )));
        }
        Ok(Some(a))
    }

    pub fn attr_int(&self, name: &str) -> Result<Option<i64>> {
        Ok(self.attr(name, AttributeType::Int)?.map(|a| a.i()))
    }

    pub fn attr_float(&self, name: &str) -> Result<Option<f32>> {
        Ok(self.attr(name, AttributeType::Float)?.map(|a| a.f()))
    }

    pub fn attr_ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        Ok(self
            .attr(name, AttributeType::Ints)?
            .map(|a| a.ints.clone()))
    }

    pub fn attr_floats(&self, name: &str) -> Result<Option<Vec<f32>>> {
        Ok(self
            .attr(name, AttributeType::Floats)?
            .map(|a| a.floats.clone()))
    }

    pub fn attr_string(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .attr(name, AttributeType::String)?
            .map(|a| String::from_utf8_lossy(a.s()).into_owned()))
    }

    pub fn attr_tensor(&self, name: &str) -> Result<Option<&'a TensorProto>> {
        Ok(self
            .attr(name, AttributeType::Tensor)?
            .and_then(|a| a.t.as_ref()))
    }

    /// A 0/1 attribute.
    pub fn attr_bool(&self, name: &str, default: bool) -> Result<bool> {
        match self.attr_int(name)? {
            None => Ok(default),
            Some(0) => Ok(false),
            Some(1) => Ok(true),
            Some(v) => Err(self.err(format!("attribute '{name}' is {v}, expected 0 or 1"))),
        }
    }

    /// An axis in `-rank..rank` (or `-rank..=rank` with `inclusive`), made non-negative.
    pub fn axis(&self, axis: i64, rank: usize, inclusive: bool) -> Result<usize> {
        let r = rank as i64;
        let hi = if inclusive { r } else { r - 1 };
        if axis < -r || axis > hi {
            return Err(self.err(format!("axis {axis} is out of range for rank {rank}")));
        }
        Ok(if axis < 0 { axis + r } else { axis } as usize)
    }
}

fn matmul(cx: &mut Ctx) -> Result<NodeId> {
    let a = cx.input(0)?;
    let b = cx.input(1)?;
    cx.add(Op::MatMul, &[a, b])
}

fn gemm(cx: &mut Ctx) -> Result<NodeId> {
    let a = cx.input(0)?;
    let b = cx.input(1)?;
    let c = cx.opt_input(2)?;
    let op = Op::Gemm {
        alpha: cx.attr_float("alpha")?.unwrap_or(1.0),
        beta: cx.attr_float("beta")?.unwrap_or(1.0),
        trans_a: cx.attr_bool("transA", false)?,
        trans_b: cx.attr_bool("transB", false)?,
    };
    match c {
        Some(c) => cx.add(op, &[a, b, c]),
        None => cx.add(op, &[a, b]),
    }
}

fn gelu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let tanh = match cx.attr_string("approximate")?.as_deref() {
        None | Some("none") => false,
        Some("tanh") => true,
        Some(other) => {
            return Err(cx.err(format!(
                "approximate is '{other}', expected \"none\" or \"tanh\""
            )))
        }
    };
    cx.add(Op::Unary(Unary::Gelu { tanh }), &[x])
}

fn identity(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let op = if cx.stop_gradient {
        Op::StopGradient
    } else {
        Op::Identity
    };
    cx.add(op, &[x])
}

fn constant(cx: &mut Ctx) -> Result<NodeId> {
    let set: Vec<&str> = cx
        .node
        .attribute
        .iter()
        .map(|a| a.name())
        .filter(|n| !n.is_empty())
        .collect();
    let tensor = match set.as_slice() {
        ["value"] => {
            let t = cx
                .attr_tensor("value")?
                .ok_or_else(|| cx.err("attribute 'value' holds no tensor".into()))?;
            let what = format!("the value of Constant node '{}'", cx.label);
            data::tensor_from_proto(t, cx.model_dir, &what)?
        }
        ["value_float"] => Tensor::scalar(cx.attr_float("value_float")?.unwrap_or_default()),
        ["value_floats"] => {
            let v = cx.attr_floats("value_floats")?.unwrap_or_default();
            Tensor::f32(vec![v.len()], v)
        }
        ["value_int"] => Tensor::i64(vec![], vec![cx.attr_int("value_int")?.unwrap_or_default()]),
        ["value_ints"] => {
            let v = cx.attr_ints("value_ints")?.unwrap_or_default();
            Tensor::i64(vec![v.len()], v)
        }
        [one] => return Err(cx.unsupported(format!("Constant with attribute '{one}'"))),
        _ => {
            return Err(cx.err(format!(
                "needs exactly one value attribute, has {}",
                if set.is_empty() {
                    "none".to_string()
                } else {
                    set.join(", ")
                }
            )))
        }
    };
    let id = cx.graph.add_const(&cx.name, tensor);
    cx.graph.node_mut(id).label = cx.label.clone();
    Ok(id)
}

fn reshape(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let target = cx
        .const_ints(1, "shape")?
        .ok_or_else(|| cx.err("the shape input is missing".into()))?;
    let allowzero = cx.attr_bool("allowzero", false)?;
    let from = cx.shape(x);
    let mut out: Vec<usize> = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        out.push(match d {
            -1 if infer.is_some() => {
                return Err(cx.err(format!("shape {target:?} has more than one -1")))
            }
            -1 => {
                infer = Some(i);
                1
            }
            0 if !allowzero => *from.get(i).ok_or_else(|| {
                cx.err(format!(
                    "shape {target:?} copies dim {i} (0), but the input {} has rank {}",
                    shape_str(&from),
                    from.len()
                ))
            })?,
            d if d >= 0 => d as usize,
            d => return Err(cx.err(format!("shape {target:?} has invalid size {d}"))),
        });
    }
    if let Some(i) = infer {
        let total: usize = from.iter().product();
        let known: usize = out.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(cx.err(format!(
                "cannot reshape {} to {target:?}: the -1 cannot be inferred",
                shape_str(&from)
            )));
        }
        out[i] = total / known;
    }
    cx.add(Op::Reshape { shape: out }, &[x])
}

fn flatten(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let from = cx.shape(x);
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(1), from.len(), true)?;
    let shape = vec![from[..axis].iter().product(), from[axis..].iter().product()];
    cx.add(Op::Reshape { shape }, &[x])
}

fn transpose(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let rank = cx.shape(x).len();
    let perm = match cx.attr_ints("perm")? {
        None => (0..rank).rev().collect(),
        Some(p) => p
            .iter()
            .map(|&a| usize::try_from(a))
            .collect::<std::result::Result<Vec<usize>, _>>()
            .map_err(|_| cx.err(format!("perm {p:?} has a negative entry")))?,
    };
    cx.add(Op::Transpose { perm }, &[x])
}

fn layer_norm(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let scale = cx.input(1)?;
    let bias = cx.opt_input(2)?;
    let rank = cx.shape(x).len();
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(-1), rank, false)?;
    let epsilon = cx.attr_float("epsilon")?.unwrap_or(1e-5);
    let op = Op::LayerNorm { axis, epsilon };
    match bias {
        Some(b) => cx.add(op, &[x, scale, b]),
        None => cx.add(op, &[x, scale]),
    }
}

fn softmax(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let rank = cx.shape(x).len();
    let default = if cx.opset >= 13 { -1 } else { 1 };
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(default), rank, false)?;
    // Before opset 13, Softmax flattens the input to 2-D at `axis` and normalises each row:
    // the same as softmax over one axis only when that axis is the last.
    if cx.opset < 13 && axis + 1 != rank {
        return Err(cx.unsupported(format!(
            "Softmax (opset {} semantics) over axis {axis} of a rank-{rank} input (only the \
             last axis is supported before opset 13)",
            cx.opset
        )));
    }
    cx.add(Op::Softmax { axis }, &[x])
}

fn reduce_sum(cx: &mut Ctx) -> Result<NodeId> {
    reduce(cx, Reduce::Sum)
}

fn reduce_sum_square(cx: &mut Ctx) -> Result<NodeId> {
    reduce(cx, Reduce::SumSquare)
}

/// The opset from which a reduction takes its axes as an input instead of an attribute.
pub fn axes_input_since(kind: Reduce) -> i64 {
    match kind {
        Reduce::Sum => 13,
        Reduce::SumSquare => 18,
    }
}

fn reduce(cx: &mut Ctx, kind: Reduce) -> Result<NodeId> {
    let x = cx.input(0)?;
    let rank = cx.shape(x).len();
    let keepdims = cx.attr_bool("keepdims", true)?;
    let (axes, noop) = if cx.opset >= axes_input_since(kind) {
        // Some exporters still write the pre-13 `axes` attribute; accept it when there is no
        // axes input.
        let axes = match cx.const_ints(1, "axes input")? {
            Some(a) => Some(a),
            None => cx.attr_ints("axes")?,
        };
        (axes, cx.attr_bool("noop_with_empty_axes", false)?)
    } else {
        (cx.attr_ints("axes")?, false)
    };
    let axes = axes.unwrap_or_default();
    if axes.is_empty() && noop {
        return cx.add(Op::Identity, &[x]);
    }
    let mut axes: Vec<usize> = if axes.is_empty() {
        (0..rank).collect()
    } else {
        axes.iter()
            .map(|&a| cx.axis(a, rank, false))
            .collect::<Result<_>>()?
    };
    axes.sort_unstable();
    axes.dedup();
    cx.add(
        Op::Reduce {
            kind,
            axes,
            keepdims,
        },
        &[x],
    )
}
