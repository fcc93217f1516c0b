//! The ONNX op table: how each supported ONNX op type becomes IR nodes. Supporting a new op is
//! one entry in [`OPS`] (plus, usually, a small function below it); the importer asks this table
//! both whether an op is supported and how to build it.
//!
//! A builder reads its node through [`Ctx`]: inputs (values, or int64 constants that are
//! consumed at import, such as Reshape's shape), attributes with their defaults, and the opset.
//! It adds its IR nodes with [`Ctx::add`], which names the result after the ONNX node's output
//! and checks shapes, and returns the node that produces the ONNX node's first output (a node
//! with several outputs registers the others with [`Ctx::set_output`]).
//!
//! Shapes are static, so shape computations are constants: Shape, Size, ConstantOfShape and
//! Range become constants directly, and [`Ctx::add`] evaluates every integer or bool node whose
//! inputs are all constant (through the reference executor), so that chains such as
//! Shape -> Gather -> Concat -> Reshape, or a causal mask built from Range and LessOrEqual, are
//! constants by the time an op needs them. Float results are left to `passes::fold_constants`,
//! which knows which constants are trainable (the adapter tensors of a rewritten model are
//! constants in the IR, and must stay separate).
//!
//! The builders live by family: `layout` (Unsqueeze, Squeeze, Concat, Slice, Split, Expand,
//! Trilu), `shape` (Shape, Size, ConstantOfShape, Range), `gather` (Gather, GatherElements,
//! GatherND), `logic` (Cast, Where, Greater (as Less), variadic Max/Min, Clip), `conv` (Conv,
//! lowered to a Gather of input windows and a MatMul), `pool`, `resize`, `quantized`
//! (quantizers, integer products, and ONNX Runtime's MatMulNBits, dequantized at import) and
//! `lowered` (ops that become small graphs of existing IR ops: activations, RMSNormalization,
//! LogSoftmax, ReduceL1/L2/LogSum, Tile, SpaceToDepth...).

mod attention;
mod conv;
mod gather;
mod layout;
mod logic;
mod lowered;
mod pool;
mod quantized;

pub use crate::ir::{quantize_nbits, Quantized, ZeroPointForm};
mod resize;
mod shape;

use super::data;
use super::proto::tensor_proto::DataType;
use super::proto::{attribute_proto::AttributeType, AttributeProto, NodeProto, TensorProto};
use crate::error::{Error, Result, Subject};
use crate::ir::{unary, Binary, GraphBuilder, NodeId, Op, Reduce, Unary};
use crate::reference::eval_typed;
use crate::tensor::{numel, shape_str, Array, DType, Tensor};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;

/// How an ONNX op type is imported.
#[derive(Clone, Copy)]
pub enum Rule {
    /// An element-wise op of one input without attributes (from `ops::unary`).
    Unary(Unary),
    /// An element-wise op of two inputs (numpy broadcasting) without attributes.
    Binary(Binary),
    /// A reduction (from `ops::reduce`): axes, keepdims, noop_with_empty_axes.
    Reduce(Reduce),
    /// Anything else: a function that builds the node.
    Build(fn(&mut Ctx) -> Result<NodeId>),
}

/// Every ONNX op type (default domain) dorac imports.
pub const OPS: &[(&str, Rule)] = &[
    ("Greater", Rule::Build(logic::greater)),
    ("GreaterOrEqual", Rule::Build(logic::greater_or_equal)),
    ("Max", Rule::Build(logic::max)),
    ("Min", Rule::Build(logic::min)),
    ("Clip", Rule::Build(logic::clip)),
    ("Cast", Rule::Build(logic::cast)),
    ("Where", Rule::Build(logic::where_)),
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
    ("ReduceMean", Rule::Build(reduce_mean)),
    ("Shape", Rule::Build(shape::shape)),
    ("Size", Rule::Build(shape::size)),
    ("ConstantOfShape", Rule::Build(shape::constant_of_shape)),
    ("Range", Rule::Build(shape::range)),
    ("Unsqueeze", Rule::Build(layout::unsqueeze)),
    ("Squeeze", Rule::Build(layout::squeeze)),
    ("Concat", Rule::Build(layout::concat)),
    ("Slice", Rule::Build(layout::slice)),
    ("Split", Rule::Build(layout::split)),
    ("Expand", Rule::Build(layout::expand)),
    ("Trilu", Rule::Build(layout::trilu)),
    ("Gather", Rule::Build(gather::gather)),
    ("GatherElements", Rule::Build(gather::gather_elements)),
    ("GatherND", Rule::Build(gather::gather_nd)),
    ("Conv", Rule::Build(conv::conv)),
    // Lowered to existing IR ops (see `lowered`).
    ("LeakyRelu", Rule::Build(lowered::leaky_relu)),
    ("PRelu", Rule::Build(lowered::prelu)),
    ("Elu", Rule::Build(lowered::elu)),
    ("Selu", Rule::Build(lowered::selu)),
    ("Celu", Rule::Build(lowered::celu)),
    ("ThresholdedRelu", Rule::Build(lowered::thresholded_relu)),
    ("HardSigmoid", Rule::Build(lowered::hard_sigmoid)),
    ("HardSwish", Rule::Build(lowered::hard_swish)),
    ("Softplus", Rule::Build(lowered::softplus)),
    ("Softsign", Rule::Build(lowered::softsign)),
    ("Mish", Rule::Build(lowered::mish)),
    ("Swish", Rule::Build(lowered::swish)),
    ("IsInf", Rule::Build(lowered::is_inf)),
    ("Xor", Rule::Build(lowered::xor)),
    ("Mod", Rule::Build(lowered::modulo)),
    ("ArgMax", Rule::Build(lowered::arg_max)),
    ("ArgMin", Rule::Build(lowered::arg_min)),
    ("Hardmax", Rule::Build(lowered::hardmax)),
    ("Pad", Rule::Build(lowered::pad)),
    ("Resize", Rule::Build(resize::resize)),
    ("MaxPool", Rule::Build(pool::max_pool)),
    ("AveragePool", Rule::Build(pool::average_pool)),
    ("GlobalMaxPool", Rule::Build(pool::global_max_pool)),
    ("CumSum", Rule::Build(lowered::cum_sum)),
    ("OneHot", Rule::Build(lowered::one_hot)),
    ("Attention", Rule::Build(attention::attention)),
    ("RotaryEmbedding", Rule::Build(attention::rotary_embedding)),
    ("LpNormalization", Rule::Build(lowered::lp_normalization)),
    ("DequantizeLinear", Rule::Build(lowered::dequantize_linear)),
    ("QuantizeLinear", Rule::Build(quantized::quantize_linear)),
    (
        "DynamicQuantizeLinear",
        Rule::Build(quantized::dynamic_quantize_linear),
    ),
    ("MatMulInteger", Rule::Build(quantized::matmul_integer)),
    ("ConvInteger", Rule::Build(quantized::conv_integer)),
    ("CenterCropPad", Rule::Build(lowered::center_crop_pad)),
    ("ScatterElements", Rule::Build(lowered::scatter_elements)),
    ("Scatter", Rule::Build(lowered::scatter_elements)),
    ("ScatterND", Rule::Build(lowered::scatter_nd)),
    ("TopK", Rule::Build(lowered::top_k)),
    ("Einsum", Rule::Build(lowered::einsum)),
    ("RNN", Rule::Build(lowered::rnn)),
    ("GRU", Rule::Build(lowered::gru)),
    ("LSTM", Rule::Build(lowered::lstm)),
    ("Sum", Rule::Build(lowered::sum)),
    ("Mean", Rule::Build(lowered::mean)),
    ("CastLike", Rule::Build(lowered::cast_like)),
    ("Dropout", Rule::Build(lowered::dropout)),
    ("RMSNormalization", Rule::Build(lowered::rms_normalization)),
    // ONNX Runtime's, in the default domain (its model builder writes it there).
    (
        "SimplifiedLayerNormalization",
        Rule::Build(lowered::rms_normalization),
    ),
    ("LogSoftmax", Rule::Build(lowered::log_softmax)),
    ("ReduceL1", Rule::Build(lowered::reduce_l1)),
    ("ReduceL2", Rule::Build(lowered::reduce_l2)),
    ("ReduceLogSum", Rule::Build(lowered::reduce_log_sum)),
    ("ReduceLogSumExp", Rule::Build(lowered::reduce_log_sum_exp)),
    (
        "NegativeLogLikelihoodLoss",
        Rule::Build(lowered::negative_log_likelihood_loss),
    ),
    (
        "SoftmaxCrossEntropyLoss",
        Rule::Build(lowered::softmax_cross_entropy_loss),
    ),
    (
        "GlobalAveragePool",
        Rule::Build(lowered::global_average_pool),
    ),
    ("Tile", Rule::Build(lowered::tile)),
    ("SpaceToDepth", Rule::Build(lowered::space_to_depth)),
    ("DepthToSpace", Rule::Build(lowered::depth_to_space)),
];

/// Op types whose nodes may have several outputs that are used (each becomes its own IR node);
/// of any other op only the first output may be used.
pub const MULTI_OUTPUT: &[&str] = &[
    "DynamicQuantizeLinear",
    "Split",
    "LayerNormalization",
    "Dropout",
    "SoftmaxCrossEntropyLoss",
    "Attention",
    "GroupQueryAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "TopK",
    "RNN",
    "GRU",
    "LSTM",
];

/// ONNX Runtime's contrib domain, of which dorac imports the ops in [`CONTRIB_OPS`].
pub const CONTRIB_DOMAIN: &str = "com.microsoft";

/// The ops of [`CONTRIB_DOMAIN`] dorac imports: those that Hub models' exports carry and that
/// lower to IR ops (MatMulNBits: the 4-bit weights of `model_q4.onnx` files).
pub const CONTRIB_OPS: &[(&str, Rule)] = &[
    ("MatMulNBits", Rule::Build(quantized::matmul_nbits)),
    (
        "GatherBlockQuantized",
        Rule::Build(quantized::gather_block_quantized),
    ),
    ("Attention", Rule::Build(attention::contrib_attention)),
    ("BiasGelu", Rule::Build(lowered::contrib_gelu)),
    (
        "EmbedLayerNormalization",
        Rule::Build(lowered::embed_layer_normalization),
    ),
    ("FastGelu", Rule::Build(lowered::contrib_gelu)),
    ("Gelu", Rule::Build(lowered::contrib_gelu)),
    (
        "GroupQueryAttention",
        Rule::Build(attention::group_query_attention),
    ),
    ("QuickGelu", Rule::Build(lowered::quick_gelu)),
    (
        "SkipLayerNormalization",
        Rule::Build(lowered::skip_layer_normalization),
    ),
    (
        "SkipSimplifiedLayerNormalization",
        Rule::Build(lowered::skip_simplified_layer_normalization),
    ),
];

/// The rule for an op of `domain` (the default one, or [`CONTRIB_DOMAIN`]), or None when dorac
/// does not support it.
pub fn rule_in(domain: &str, op_type: &str) -> Option<Rule> {
    match domain {
        "" | "ai.onnx" => rule(op_type),
        CONTRIB_DOMAIN => CONTRIB_OPS
            .iter()
            .find(|(t, _)| *t == op_type)
            .map(|(_, r)| *r),
        _ => None,
    }
}

/// The rule for an op type of the default domain, or None when dorac does not support it: an
/// entry of [`OPS`], or a definition of `ops::unary`, `ops::binary` or `ops::reduce` by its ONNX
/// name (the one place those names are written).
pub fn rule(op_type: &str) -> Option<Rule> {
    OPS.iter()
        .find(|(t, _)| *t == op_type)
        .map(|(_, r)| *r)
        .or_else(|| Unary::from_onnx(op_type).map(Rule::Unary))
        .or_else(|| Binary::from_onnx(op_type).map(Rule::Binary))
        .or_else(|| Reduce::from_onnx(op_type).map(Rule::Reduce))
}

/// Builds the IR for one node (whose op type has a rule), then checks that the builder read
/// every input the node has, so an input dorac would ignore is an error and not a wrong result.
/// Returns the IR node of each ONNX output that has one, by output name.
pub(crate) fn build(cx: &mut Ctx) -> Result<Vec<(String, NodeId)>> {
    let rule = rule_in(cx.node.domain(), cx.op_type()).ok_or_else(|| {
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
            // Pow alone lets its exponent have another type.
            if cx.op_type() != "Pow" {
                cx.same_type(&[a, b_in])?;
            }
            cx.add(Op::Binary(b), &[a, b_in])?
        }
        Rule::Reduce(kind) => reduce(cx, kind)?,
        Rule::Build(f) => f(cx)?,
    };
    // An attribute no builder looked at could change the result: refuse it, unless it only
    // matters for what dorac does not do (float8 saturation, stashed precision, random seeds).
    if let Some(a) = cx.node.attribute.iter().find(|a| {
        !cx.attrs_read.borrow().contains(a.name()) && !IGNORED_ATTRIBUTES.contains(&a.name())
    }) {
        return Err(cx.unsupported(format!(
            "{} with attribute '{}' (dorac does not read it)",
            cx.op_type(),
            a.name()
        )));
    }
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
    let mut outputs = vec![(cx.name.clone(), id)];
    let first = cx.name.clone();
    outputs.extend(cx.extra_outputs.drain(..).filter(|(n, _)| *n != first));
    Ok(outputs)
}

/// Attributes that do not change what dorac computes: `stash_type` (normalisations: the
/// precision of intermediates; dorac computes in f32 or f64 anyway), `saturate` and `round_mode`
/// (casts to float8 types, which dorac does not have), `seed` (random ops in training mode,
/// which dorac refuses).
const IGNORED_ATTRIBUTES: &[&str] = &["stash_type", "saturate", "round_mode", "seed"];

/// What a builder sees of the node it imports.
pub struct Ctx<'a> {
    pub graph: &'a mut GraphBuilder,
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
    /// Names of the attributes the builder asked for (present or not).
    attrs_read: RefCell<std::collections::HashSet<String>>,
    /// Outputs after the first, by ONNX name (see [`Ctx::set_output`]).
    extra_outputs: Vec<(String, NodeId)>,
    /// Which nodes depend on constants only, shared by the whole import ([`Ctx::is_constant`]).
    constness: &'a RefCell<HashMap<NodeId, bool>>,
    /// Values of graph inputs known at import, by name (see `onnx::import_with_values`).
    input_values: &'a HashMap<String, Array>,
    /// The declared ONNX float type of each float graph input and initializer.
    formats: &'a HashMap<NodeId, DataType>,
}

impl<'a> Ctx<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        graph: &'a mut GraphBuilder,
        values: &'a HashMap<String, NodeId>,
        opset: i64,
        node: &'a NodeProto,
        name: String,
        label: String,
        model_dir: &'a Path,
        stop_gradient: bool,
        constness: &'a RefCell<HashMap<NodeId, bool>>,
        input_values: &'a HashMap<String, Array>,
        formats: &'a HashMap<NodeId, DataType>,
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
            attrs_read: RefCell::default(),
            extra_outputs: vec![],
            constness,
            input_values,
            formats,
        }
    }

    pub fn op_type(&self) -> &str {
        self.node.op_type()
    }

    /// An error about this node (malformed attributes or inputs).
    /// Refuses inputs of different element types where ONNX requires one (a MatMul of a
    /// float input and an int64 weight would otherwise compute on the converted values).
    pub fn same_type(&self, inputs: &[NodeId]) -> Result<()> {
        let types: Vec<&str> = inputs.iter().map(|&i| self.dtype(i).name()).collect();
        // Floats all compute in f32; their declared formats are known for graph inputs and
        // initializers (a float16 weight against a float32 input is an invalid model).
        let formats: Vec<&str> = inputs
            .iter()
            .filter_map(|&i| self.float_format(i))
            .collect();
        let differ = |t: &[&str]| t.windows(2).any(|w| w[0] != w[1]);
        let shown = match (differ(&types), differ(&formats)) {
            (true, _) => types,
            (false, true) => formats,
            (false, false) => return Ok(()),
        };
        Err(self.err(format!(
            "inputs of types {}; ONNX requires one element type here (Cast one of them)",
            shown.join(" and ")
        )))
    }

    /// The declared ONNX float type of a graph input or initializer (None for computed
    /// values, whose declared types dorac does not track).
    fn float_format(&self, id: NodeId) -> Option<&'static str> {
        let name = |t: DataType| match t {
            DataType::Float16 => "float16",
            DataType::Bfloat16 => "bfloat16",
            DataType::Double => "float64",
            _ => "float32",
        };
        self.formats
            .get(&id)
            .filter(|t| {
                matches!(
                    t,
                    DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double
                )
            })
            .map(|&t| name(t))
    }

    /// The ONNX element type a graph input, initializer, Constant or Cast declares (None for
    /// other computed values, whose declared types dorac does not track).
    pub fn declared_type(&self, id: NodeId) -> Option<DataType> {
        self.formats.get(&id).copied()
    }

    pub fn err(&self, msg: String) -> Error {
        let at = Subject::OnnxNode {
            name: self.label.clone(),
            op_type: self.op_type().to_string(),
        };
        Error::onnx_at(at, msg)
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

    /// Optional input `i`, of any element type.
    pub fn opt_input(&self, i: usize) -> Result<Option<NodeId>> {
        Ok(self.value(i))
    }

    /// Required input `i`.
    pub fn input(&self, i: usize) -> Result<NodeId> {
        self.opt_input(i)?
            .ok_or_else(|| self.err(format!("input {i} is missing")))
    }

    /// Every input from `from` on (variadic ops); absent ones are an error.
    pub fn inputs_from(&self, from: usize) -> Result<Vec<NodeId>> {
        (from..self.node.input.len().max(from))
            .map(|i| self.input(i))
            .collect()
    }

    /// Optional input `i` whose value must be known at import: a constant, or a node computed
    /// from constants and graph inputs whose values were given at import only (evaluated here).
    /// A value that depends on any other graph input is a dorac limitation, reported as
    /// unsupported.
    pub fn const_input(&self, i: usize, what: &str) -> Result<Option<Tensor>> {
        let Some(id) = self.value(i) else {
            return Ok(None);
        };
        if !self.is_known(id) {
            return Err(self.unsupported(format!(
                "{} with a {what} computed from graph inputs (dorac needs it at import: give \
                 the input's value, as `dorac run` does with the integer tensors of its inputs \
                 file)",
                self.op_type()
            )));
        }
        self.evaluate(id).map(Some)
    }

    /// Optional input `i` that must be an integer constant, consumed at import (a shape, axes).
    pub fn const_ints(&self, i: usize, what: &str) -> Result<Option<Vec<i64>>> {
        let Some(t) = self.const_input(i, what)? else {
            return Ok(None);
        };
        match t.as_i64() {
            Some(v) => Ok(Some(v.to_vec())),
            None => Err(self.err(format!(
                "the {what} is {}, expected int64",
                t.dtype().name()
            ))),
        }
    }

    /// Optional input `i` that must be a constant scalar (one element), as f64.
    pub fn const_scalar(&self, i: usize, what: &str) -> Result<Option<f64>> {
        let Some(t) = self.const_input(i, what)? else {
            return Ok(None);
        };
        match t.to_f64()[..] {
            [v] => Ok(Some(v)),
            _ => Err(self.err(format!(
                "the {what} has shape {}, expected one value",
                shape_str(&t.shape)
            ))),
        }
    }

    pub fn shape(&self, id: NodeId) -> Vec<usize> {
        self.graph.shape(id).to_vec()
    }

    pub fn dtype(&self, id: NodeId) -> DType {
        self.graph.node(id).dtype
    }

    /// Adds the node's result (named after its output, labelled with the node name).
    pub fn add(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let name = self.name.clone();
        self.add_named(op, inputs, &name)
    }

    /// Adds a node named `name` (an intermediate of a lowering, or a further output), labelled
    /// with the node name. An integer or bool node whose inputs are all constant is evaluated
    /// now and becomes a constant (see the module docs).
    pub fn add_named(&mut self, op: Op, inputs: &[NodeId], name: &str) -> Result<NodeId> {
        let label = self.label.clone();
        let id = self.graph.add(op, inputs, name, &label)?;
        let node = self.graph.node(id);
        if node.dtype.is_float() || !inputs.iter().all(|&i| self.is_constant(i)) {
            return Ok(id);
        }
        let value = self.evaluate(id)?;
        self.graph.remove_unread(id);
        // The index may be reused by the constant: forget what was known about it.
        self.constness.borrow_mut().remove(&id);
        self.add_const(name, value)
    }

    /// A fresh IR name for an intermediate of this node's lowering: `<output>/<tag>`.
    pub fn temp_name(&self, tag: &str) -> String {
        self.graph.fresh_name(&format!("{}/{tag}", self.name))
    }

    /// Adds a constant, labelled with the node name.
    pub fn add_const(&mut self, name: &str, value: Tensor) -> Result<NodeId> {
        Ok(self.graph.add_labelled_const(name, &self.label, value))
    }

    /// [`add_const`](Ctx::add_const) for a weight dequantized from `codes`, which the device
    /// may store instead of its f32 values (`ir::blocks`).
    pub fn add_blocked_const(
        &mut self,
        name: &str,
        value: Tensor,
        codes: Option<std::sync::Arc<crate::ir::BlockCodes>>,
    ) -> Result<NodeId> {
        let id = self.add_const(name, value)?;
        if let Some(codes) = codes {
            self.graph.mark_blocked(id, codes);
        }
        Ok(id)
    }

    /// Registers `id` as the value of output `i` (> 0) of a node with several outputs; an
    /// output with no name is skipped.
    pub fn set_output(&mut self, i: usize, id: NodeId) {
        if let Some(name) = self.node.output.get(i).filter(|n| !n.is_empty()) {
            self.extra_outputs.push((name.clone(), id));
        }
    }

    /// True when the value depends on constants only (no graph input). Answers are remembered
    /// for the whole import, so each node is looked at once.
    pub fn is_constant(&self, id: NodeId) -> bool {
        let mut memo = self.constness.borrow_mut();
        // Post-order without recursion: graphs can be thousands of nodes deep.
        let mut stack = vec![(id, false)];
        while let Some((n, inputs_done)) = stack.pop() {
            if memo.contains_key(&n) {
                continue;
            }
            let ins = self.graph.inputs_of(n);
            let known = match self.graph.node(n).op {
                Op::Const(_) => Some(true),
                Op::Input => Some(false),
                _ if inputs_done => Some(ins.iter().all(|i| memo[i])),
                _ => None,
            };
            match known {
                Some(v) => {
                    memo.insert(n, v);
                }
                None => {
                    stack.push((n, true));
                    stack.extend(ins.into_iter().map(|i| (i, false)));
                }
            }
        }
        memo[&id]
    }

    /// The value of a graph input given at import, as its declared type, if any.
    fn input_value(&self, id: NodeId) -> Option<Tensor> {
        let node = self.graph.node(id);
        match node.op {
            Op::Input => self
                .input_values
                .get(&node.name)
                .map(|a| a.to_tensor(node.dtype)),
            _ => None,
        }
    }

    /// True when the value depends on constants and graph inputs given at import only.
    pub fn is_known(&self, id: NodeId) -> bool {
        if self.is_constant(id) {
            return true;
        }
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![id];
        while let Some(n) = stack.pop() {
            let given = matches!(self.graph.node(n).op, Op::Input)
                && self.input_values.contains_key(&self.graph.node(n).name);
            if !seen.insert(n) || given || self.is_constant(n) {
                continue;
            }
            if matches!(self.graph.node(n).op, Op::Input) {
                return false;
            }
            stack.extend(self.graph.inputs_of(n));
        }
        true
    }

    /// The value of a node that depends on constants (and graph inputs given at import) only,
    /// computed by the reference executor and stored as its type (f32 rounded once per node, as
    /// constant folding does).
    pub fn evaluate(&self, id: NodeId) -> Result<Tensor> {
        let node = self.graph.node(id);
        if let Op::Const(t) = &node.op {
            return Ok(t.clone());
        }
        if let Some(t) = self.input_value(id) {
            return Ok(t);
        }
        // A reshape keeps the values: the same data under the new shape, not a copy through
        // f64 (the builder reshapes the LM head's codes, 130M bytes for a 1B model, this way).
        if let Op::Reshape { shape } = &node.op {
            let source = self.evaluate(self.graph.inputs_of(id)[0])?;
            return Ok(Tensor {
                shape: shape.clone(),
                data: source.data,
            });
        }
        let args: Vec<Array> = self
            .graph
            .inputs_of(id)
            .iter()
            .map(|&i| self.evaluate(i).map(|t| t.to_array()))
            .collect::<Result<_>>()?;
        let refs: Vec<&Array> = args.iter().collect();
        let value = eval_typed(&node.op, &refs, node.dtype)
            .map_err(|e| self.err(format!("evaluating '{}' at import: {e}", node.name)))?;
        Ok(value.to_tensor(node.dtype))
    }

    fn attr(&self, name: &str, ty: AttributeType) -> Result<Option<&'a AttributeProto>> {
        self.attrs_read.borrow_mut().insert(name.to_string());
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
    cx.same_type(&[a, b])?;
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
    let inputs: Vec<NodeId> = [a, b].into_iter().chain(c).collect();
    cx.same_type(&inputs)?;
    cx.add(op, &inputs)
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
    let f = if tanh { unary::GELU_TANH } else { unary::GELU };
    cx.add(Op::Unary(f), &[x])
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
    Ok(cx.graph.add_labelled_const(&cx.name, &cx.label, tensor))
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
    let y = match bias {
        Some(b) => cx.add(op, &[x, scale, b])?,
        None => cx.add(op, &[x, scale])?,
    };
    let wanted = |i: usize| cx.node.output.get(i).is_some_and(|o| !o.is_empty());
    if wanted(1) || wanted(2) {
        let (mean, inv_std) = layer_norm_stats(cx, x, axis, epsilon)?;
        cx.set_output(1, mean);
        cx.set_output(2, inv_std);
    }
    Ok(y)
}

/// LayerNormalization's optional outputs Mean and InvStdDev (the statistics over the axes from
/// `axis` on, kept as dims of size 1), from existing ops: a sum divided by the count, and
/// 1 / sqrt(mean((x - mean)^2) + epsilon), as the op itself computes them.
fn layer_norm_stats(
    cx: &mut Ctx,
    x: NodeId,
    axis: usize,
    epsilon: f32,
) -> Result<(NodeId, NodeId)> {
    let shape = cx.shape(x);
    let axes: Vec<usize> = (axis..shape.len()).collect();
    let count: usize = shape[axis..].iter().product();
    let reduce = Op::Reduce {
        kind: Reduce::Sum,
        axes,
        keepdims: true,
    };
    let out = |i: usize| cx.node.output.get(i).filter(|o| !o.is_empty()).cloned();
    let (mean_name, inv_name) = (
        out(1).unwrap_or_else(|| cx.temp_name("mean")),
        out(2).unwrap_or_else(|| cx.temp_name("inv_std_dev")),
    );
    let t = |cx: &Ctx, tag: &str| cx.temp_name(tag);
    let n = cx.add_const(&t(cx, "count"), Tensor::scalar(count as f32))?;
    let sum = cx.add_named(reduce.clone(), &[x], &t(cx, "sum"))?;
    let mean = cx.add_named(Op::Binary(Binary::Div), &[sum, n], &mean_name)?;
    let d = cx.add_named(Op::Binary(Binary::Sub), &[x, mean], &t(cx, "centered"))?;
    let sq = cx.add_named(Op::Binary(Binary::Mul), &[d, d], &t(cx, "squared"))?;
    let ss = cx.add_named(reduce, &[sq], &t(cx, "sum_squares"))?;
    let var = cx.add_named(Op::Binary(Binary::Div), &[ss, n], &t(cx, "variance"))?;
    let eps = cx.add_const(&t(cx, "epsilon"), Tensor::scalar(epsilon))?;
    let ve = cx.add_named(Op::Binary(Binary::Add), &[var, eps], &t(cx, "variance_eps"))?;
    let sd = cx.add_named(Op::Unary(unary::SQRT), &[ve], &t(cx, "std_dev"))?;
    let inv = cx.add_named(Op::Unary(unary::RECIPROCAL), &[sd], &inv_name)?;
    Ok((mean, inv))
}

fn softmax(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let axis = softmax_axis(cx, x)?;
    cx.add(Op::Softmax { axis }, &[x])
}

/// The axis of Softmax or LogSoftmax on `x`. Before opset 13 they flatten the input to 2-D at
/// `axis` and normalise each row: the same as over one axis only when that axis is the last.
pub(super) fn softmax_axis(cx: &Ctx, x: NodeId) -> Result<usize> {
    let rank = cx.shape(x).len();
    let default = if cx.opset >= 13 { -1 } else { 1 };
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(default), rank, false)?;
    if cx.opset < 13 && axis + 1 != rank {
        return Err(cx.unsupported(format!(
            "{} (opset {} semantics) over axis {axis} of a rank-{rank} input (only the last \
             axis is supported before opset 13)",
            cx.op_type(),
            cx.opset
        )));
    }
    Ok(axis)
}

fn reduce(cx: &mut Ctx, kind: Reduce) -> Result<NodeId> {
    let (x, axes, keepdims) = reduce_args(cx, kind.def().axes_input_since)?;
    let Some(axes) = axes else {
        return cx.add(Op::Identity, &[x]);
    };
    let shape = cx.shape(x);
    let empty = axes.iter().any(|&a| shape[a] == 0);
    if empty && matches!(kind, Reduce::Max | Reduce::Min) && !cx.dtype(x).is_float() {
        // The maximum of no elements is the type's least value: false for bools; an integer
        // type's (such as -2^63) is not a value the device holds exactly.
        if cx.dtype(x) != DType::Bool {
            return Err(cx.unsupported(format!(
                "{} over no elements of an integer tensor (the type's extreme value)",
                cx.op_type()
            )));
        }
        let out: Vec<usize> = shape
            .iter()
            .enumerate()
            .filter(|&(d, _)| keepdims || !axes.contains(&d))
            .map(|(d, &s)| if axes.contains(&d) { 1 } else { s })
            .collect();
        let value = kind == Reduce::Min;
        let name = cx.name.clone();
        return cx.add_const(&name, Tensor::bool(out.clone(), vec![value; numel(&out)]));
    }
    cx.add(
        Op::Reduce {
            kind,
            axes,
            keepdims,
        },
        &[x],
    )
}

/// ReduceMean (axes as an input from opset 18) as a ReduceSum divided by the element count:
/// the IR needs no op of its own, and training gets its gradient from the sum's and Div's.
fn reduce_mean(cx: &mut Ctx) -> Result<NodeId> {
    let (x, axes, keepdims) = reduce_args(cx, 18)?;
    let Some(axes) = axes else {
        return cx.add(Op::Identity, &[x]);
    };
    let shape = cx.shape(x);
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    let sum_name = cx.temp_name("sum");
    let op = Op::Reduce {
        kind: Reduce::Sum,
        axes,
        keepdims,
    };
    let sum = cx.add_named(op, &[x], &sum_name)?;
    let count_name = cx.temp_name("count");
    let n = cx.add_const(&count_name, Tensor::scalar(count as f32))?;
    cx.add(Op::Binary(Binary::Div), &[sum, n])
}

/// The input, sorted unique axes (None: a no-op, `noop_with_empty_axes` with no axes) and
/// keepdims of a reduction that takes its axes as an input from opset `axes_input_since`.
fn reduce_args(cx: &Ctx, axes_input_since: i64) -> Result<(NodeId, Option<Vec<usize>>, bool)> {
    let x = cx.input(0)?;
    let rank = cx.shape(x).len();
    let keepdims = cx.attr_bool("keepdims", true)?;
    let (axes, noop) = if cx.opset >= axes_input_since {
        // Some exporters still write the older `axes` attribute; accept it when there is no
        // axes input.
        let axes = match cx.const_ints(1, "axes input")? {
            Some(a) => Some(a),
            None => cx.attr_ints("axes")?,
        };
        (axes, cx.attr_bool("noop_with_empty_axes", false)?)
    } else {
        // The attribute belongs to the newer opsets; honour it if an exporter wrote it anyway.
        (
            cx.attr_ints("axes")?,
            cx.attr_bool("noop_with_empty_axes", false)?,
        )
    };
    let axes = axes.unwrap_or_default();
    if axes.is_empty() && noop {
        return Ok((x, None, keepdims));
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
    Ok((x, Some(axes), keepdims))
}
