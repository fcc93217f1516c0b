//! The IR: a `petgraph::StableGraph` of tensor ops. Node ids stay valid while passes delete
//! nodes, so records that point into the graph (graph outputs, adapted layers) survive rewrites.
//!
//! Each node produces one value; an edge runs from producer to consumer and carries the input
//! slot it feeds. Shapes are static and checked when a node is added: a graph that exists is a
//! graph whose shapes fit.

mod blocks;
mod build;
mod dump;
pub mod lookups;
pub use dump::to_dot;
pub mod op;
pub mod patch;

pub use blocks::{quantize_nbits, BlockCodes, BlockFormat, Quantized, ZeroPointForm};
pub use build::GraphBuilder;

pub use crate::ops::unary;
pub use op::{Binary, Op, Reduce, Unary};
pub use patch::{rewrite, Applied, Patch, PatchOps, PatchRef, Rule};

use crate::error::{Error, Result, Subject};
use crate::tensor::{numel, DType, Tensor};
use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

pub type NodeId = NodeIndex<u32>;

/// One operation and the value it produces.
#[derive(Clone, Debug)]
pub struct Node {
    /// Unique name of the produced value (ONNX output name, initializer name, or a generated one).
    pub name: String,
    /// Where the node came from: the ONNX node name, or the pass that made it. Used to recover
    /// PyTorch module paths and in messages.
    pub label: String,
    pub op: Op,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl Node {
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
}

/// How an adapted layer's low-rank update is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Dora,
    Lora,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Dora => "dora",
            Method::Lora => "lora",
        }
    }
}

/// The linear op that an adapter wraps, as it was in the base model.
#[derive(Clone, Debug, PartialEq)]
pub enum LinearKind {
    /// `x @ W`, W: [in, out].
    MatMul,
    /// `alpha * op(x) op(W) + beta * C`; W: [out, in] when `trans_b`.
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    /// `W[ids]`, a Gather of rows (an embedding): the product of one-hot ids with W
    /// `[in = num_embeddings, out = dim]`, so DoRA's column norm runs over the vocabulary, as in
    /// PEFT's `DoraEmbeddingLayer`. Inputs (W, ids): the weight comes first.
    Embedding,
}

impl LinearKind {
    /// The kind of a MatMul, Gemm or row-Gather node (None for other ops).
    pub fn of(op: &Op) -> Option<LinearKind> {
        match *op {
            Op::MatMul => Some(LinearKind::MatMul),
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => Some(LinearKind::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            }),
            Op::Gather { axis: 0 } => Some(LinearKind::Embedding),
            _ => None,
        }
    }

    /// The op that computes this layer.
    pub fn op(&self) -> Op {
        match *self {
            LinearKind::MatMul => Op::MatMul,
            LinearKind::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            },
            LinearKind::Embedding => Op::Gather { axis: 0 },
        }
    }

    /// The layer's op inputs in order, given x (the ids of an embedding) and the weight.
    pub fn operands<T>(&self, x: T, weight: T) -> [T; 2] {
        match self {
            LinearKind::Embedding => [weight, x],
            _ => [x, weight],
        }
    }
}

/// A linear layer with a LoRA/DoRA adapter, recorded by the rewrite so that export (PEFT
/// adapters), merge and training can find the pieces again. `Id` is [`NodeId`] in a graph and
/// [`PatchRef`] inside a patch that is still being built.
#[derive(Clone, Debug)]
pub struct AdaptedLayer<Id = NodeId> {
    /// PyTorch module path, e.g. `encoder.layer.0.attention.self.query`.
    pub module: String,
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub in_features: usize,
    pub out_features: usize,
    pub kind: LinearKind,
    /// The ONNX node name of the original linear op (kept by merge).
    pub base_label: String,
    /// The original op's inputs: x, the weight initializer, and Gemm's C.
    pub x: Id,
    pub weight: Id,
    pub bias: Option<Id>,
    /// Adapter tensors in PEFT orientation: A [r, in], B [out, r], m [out].
    pub lora_a: Id,
    pub lora_b: Id,
    pub magnitude: Option<Id>,
    /// The node whose value replaced the original op's output.
    pub output: Id,
    /// DoRA: the squared column norms of the adapted weight, before clamping (the value that
    /// training's fused norm replaces). None for LoRA, or when not known.
    pub norm_sq: Option<Id>,
}

impl<Id: Copy> AdaptedLayer<Id> {
    /// The same record with its node references translated.
    pub fn map<T>(self, f: impl Fn(Id) -> T) -> AdaptedLayer<T> {
        AdaptedLayer {
            module: self.module,
            method: self.method,
            rank: self.rank,
            alpha: self.alpha,
            rslora: self.rslora,
            in_features: self.in_features,
            out_features: self.out_features,
            kind: self.kind,
            base_label: self.base_label,
            x: f(self.x),
            weight: f(self.weight),
            bias: self.bias.map(&f),
            lora_a: f(self.lora_a),
            lora_b: f(self.lora_b),
            magnitude: self.magnitude.map(&f),
            output: f(self.output),
            norm_sq: self.norm_sq.map(&f),
        }
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        scale(self.alpha, self.rank, self.rslora)
    }
}

pub fn scale(alpha: f64, rank: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// Model-level facts carried from import to export.
#[derive(Clone, Debug, Default)]
pub struct ModelInfo {
    pub ir_version: i64,
    pub opset: i64,
    pub producer: String,
    pub graph_name: String,
    /// Symbolic dims of the inputs as the model declared them (name per dim, None when fixed).
    pub input_dims: HashMap<String, Vec<Option<String>>>,
    /// The model kept (some of) its weights in external data files: outputs do too.
    pub external_data: bool,
    /// What the import noticed but did not refuse (an opset outside the tested range); the
    /// commands print these as `warning:` lines.
    pub warnings: Vec<String>,
}

/// A whole model.
///
/// The structure (nodes, edges, inputs, outputs, adapter records, training updates) is private
/// to this module: a graph is made by a [`GraphBuilder`] and changed only by applying a
/// [`Patch`], so no code outside `ir` can leave it half-edited. Node names are indexed, so
/// lookups by name and fresh names cost O(1).
#[derive(Clone, Debug, Default)]
pub struct Graph {
    graph: StableGraph<Node, usize>,
    /// Graph inputs in declaration order (each an `Op::Input` node).
    inputs: Vec<NodeId>,
    /// Graph outputs: ONNX name and producing node.
    outputs: Vec<(String, NodeId)>,
    adapters: Vec<AdaptedLayer>,
    /// Persistent state of a compiled training step: `(state, next)` means that after each run
    /// the value of `next` becomes the value of the graph input `state` (parameters, Adam
    /// moments, the step counter). State inputs live on the device across runs.
    updates: Vec<(NodeId, NodeId)>,
    /// The filter matrices of Convs lowered at import (`onnx::import_ops::conv`): weight node
    /// `[C*K, M]` -> the ONNX filter bank's shape `[M, C, kernel...]`, which PEFT's Conv adapter
    /// tensors follow (lora_A `[r, C, kernel...]`, lora_B `[M, r, 1...]`).
    conv_filters: BTreeMap<NodeId, Vec<usize>>,
    /// Constants whose values are exactly representable in a half-precision format (a half
    /// model's initializers, or weights rounded by `passes::store_half`): the planner stores
    /// them on the device in that format where every reader can decode it (see
    /// `codegen::storage`), computing in f32 as always. The reference executor reads the same
    /// (already rounded) f32 values.
    half_consts: BTreeMap<NodeId, Half>,
    /// Constants dequantized at import from block-quantized codes, with those codes (see
    /// `blocks`): the planner stores the codes on the device where every reader decodes them.
    /// A new value (`Patch::set_const`) drops the record.
    blocked: BTreeMap<NodeId, Arc<BlockCodes>>,
    /// Copies of forward values that the backward pass computes again from a value it keeps
    /// anyway (`passes::recompute`), each with the node it copies: the planner computes each
    /// in its readers' kernel, never as the epilogue of the kernel that computes the original.
    recomputed: BTreeMap<NodeId, NodeId>,
    /// Every node's name -> the node (names are unique).
    names: HashMap<String, NodeId>,
    /// For a name that was taken: the next numeric suffix to try, so fresh names do not rescan.
    suffixes: HashMap<String, usize>,
    pub info: ModelInfo,
    /// Where the adapters came from, for the PEFT config they are saved with.
    pub adapter_origin: AdapterOrigin,
}

/// What a saved adapter's `adapter_config.json` says beyond the per-layer records: the base
/// model's Hugging Face name and the `target_modules` patterns the adapters were chosen by (the
/// user's `--target`s, or a loaded PEFT config's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdapterOrigin {
    pub base_model: Option<String>,
    pub target_modules: Vec<String>,
    /// Layers whose one adapter stands for a PEFT adapter per block of their output columns
    /// (`adapter::packed`), by the layer's module: saved, it is split into those again.
    pub packed: std::collections::BTreeMap<String, Vec<PackedBlock>>,
}

/// A block of a packed layer's output columns, `start..end`, and the PEFT module it stands for.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedBlock {
    pub module: String,
    pub start: usize,
    pub end: usize,
}

/// A 16-bit float format for stored weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Half {
    /// IEEE binary16 (ONNX FLOAT16).
    F16,
    /// bfloat16: f32's exponent, 7 mantissa bits (ONNX BFLOAT16).
    Bf16,
}

impl Half {
    pub fn name(self) -> &'static str {
        match self {
            Half::F16 => "f16",
            Half::Bf16 => "bf16",
        }
    }

    /// `x` rounded to this format (round to nearest even), back in f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Half::F16 => half::f16::from_f32(x).to_f32(),
            Half::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// The 16 bits of `x` (exactly representable, or rounded) in this format.
    pub fn bits(self, x: f32) -> u16 {
        match self {
            Half::F16 => half::f16::from_f32(x).to_bits(),
            Half::Bf16 => half::bf16::from_f32(x).to_bits(),
        }
    }
}

/// How the device stores a constant other than as f32 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stored {
    /// 16-bit floats, two a word.
    Half(Half),
    /// Block-quantized codes, then scales and zero points (`blocks`).
    Blocks(BlockFormat),
}

impl Stored {
    /// What plans say: "f16", "4-bit blocks of 32".
    pub fn name(&self) -> String {
        match self {
            Stored::Half(h) => h.name().to_string(),
            Stored::Blocks(f) => f.name(),
        }
    }

    /// What a kernel's binding holds, for its comment: "f16 pairs".
    pub fn words_note(&self) -> String {
        match self {
            Stored::Half(h) => format!("{} pairs", h.name()),
            Stored::Blocks(f) => format!("{} with their scales", f.name()),
        }
    }

    /// 32-bit words of the buffer of a constant of `len` elements.
    pub fn words(&self, len: usize) -> u64 {
        match self {
            Stored::Half(_) => len.div_ceil(2) as u64,
            Stored::Blocks(f) => f.words(),
        }
    }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.graph[id]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.graph.contains_node(id)
    }

    pub fn shape(&self, id: NodeId) -> &[usize] {
        &self.graph[id].shape
    }

    /// Every node id, in index order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.graph.node_indices()
    }

    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    /// The underlying petgraph, read-only (for graph algorithms).
    pub fn petgraph(&self) -> &StableGraph<Node, usize> {
        &self.graph
    }

    /// Graph inputs in declaration order.
    pub fn inputs(&self) -> &[NodeId] {
        &self.inputs
    }

    /// Graph outputs: name and producing node, in declaration order.
    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    /// The node producing the graph output `name`.
    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs.iter().find(|o| o.0 == name).map(|o| o.1)
    }

    /// The graph output `name` (None: the first) and its node; the error lists the outputs
    /// (callers place it within the flag that named it).
    pub fn find_output(&self, name: Option<&str>) -> Result<(String, NodeId)> {
        let found = match name {
            Some(name) => self.outputs.iter().find(|o| o.0 == name),
            None => self.outputs.first(),
        };
        found.cloned().ok_or_else(|| {
            if self.outputs.is_empty() {
                return Error::input("the model has no outputs");
            }
            let names: Vec<&str> = self.outputs.iter().map(|o| o.0.as_str()).collect();
            Error::input(format!("the model's outputs are {}", names.join(", ")))
        })
    }

    /// The adapted layers, in the order they were recorded.
    pub fn adapters(&self) -> &[AdaptedLayer] {
        &self.adapters
    }

    /// A training step's `(state input, next value)` pairs.
    pub fn updates(&self) -> &[(NodeId, NodeId)] {
        &self.updates
    }

    /// Lowered Conv filter matrices -> the ONNX filter bank's shape.
    pub fn conv_filters(&self) -> &BTreeMap<NodeId, Vec<usize>> {
        &self.conv_filters
    }

    /// Constants stored in half precision on the device.
    pub fn half_consts(&self) -> &BTreeMap<NodeId, Half> {
        &self.half_consts
    }

    /// Constants that keep the block-quantized codes they were dequantized from.
    pub fn blocked(&self) -> &BTreeMap<NodeId, Arc<BlockCodes>> {
        &self.blocked
    }

    /// How the constant `n` may be stored on the device other than as f32 values (where its
    /// readers decode it: `codegen::storage` decides).
    pub fn stored(&self, n: NodeId) -> Option<Stored> {
        (self.half_consts.get(&n).map(|&h| Stored::Half(h)))
            .or_else(|| self.blocked.get(&n).map(|b| Stored::Blocks(b.format)))
    }

    /// Nodes that recompute a forward value for the backward pass -> the node each copies.
    pub fn recomputed(&self) -> &BTreeMap<NodeId, NodeId> {
        &self.recomputed
    }

    /// The node's inputs, ordered by slot.
    pub fn inputs_of(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(usize, NodeId)> = self
            .graph
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        e.sort();
        e.into_iter().map(|(_, n)| n).collect()
    }

    /// Nodes that read this node's value (each consumer once).
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        let mut c: Vec<NodeId> = self
            .graph
            .neighbors_directed(id, Direction::Outgoing)
            .collect();
        c.sort();
        c.dedup();
        c
    }

    pub fn const_tensor(&self, id: NodeId) -> Option<&Tensor> {
        match &self.graph[id].op {
            Op::Const(t) => Some(t),
            _ => None,
        }
    }

    /// Inserts a node under its own name, or under a fresh variant of it when that is taken.
    fn insert_node(&mut self, mut node: Node) -> NodeId {
        if self.names.contains_key(&node.name) {
            node.name = self.take_fresh_name(&node.name);
        }
        let name = node.name.clone();
        let id = self.graph.add_node(node);
        self.names.insert(name, id);
        id
    }

    /// Removes a node, its edges and every record keyed by it.
    fn remove_node(&mut self, id: NodeId) {
        if let Some(node) = self.graph.remove_node(id) {
            if self.names.get(&node.name) == Some(&id) {
                self.names.remove(&node.name);
            }
            self.conv_filters.remove(&id);
            self.half_consts.remove(&id);
            self.blocked.remove(&id);
            self.recomputed.remove(&id);
        }
    }

    /// Gives node `id` the name `name` (which must be free).
    fn rename(&mut self, id: NodeId, name: String) {
        let old = std::mem::replace(&mut self.graph[id].name, name.clone());
        if self.names.get(&old) == Some(&id) {
            self.names.remove(&old);
        }
        self.names.insert(name, id);
    }

    /// Adds a graph input of the given shape and element type. Whatever the type, its values
    /// reach the device as f32 (token ids, masks) and the reference as f64.
    fn add_input(&mut self, name: &str, shape: Vec<usize>, dtype: DType) -> NodeId {
        let id = self.insert_node(Node {
            name: name.into(),
            label: name.into(),
            op: Op::Input,
            shape,
            dtype,
        });
        self.inputs.push(id);
        id
    }

    /// Adds an op node after checking its input count and shapes ([`Node::checked`]).
    fn add(&mut self, op: Op, inputs: &[NodeId], name: &str, label: &str) -> Result<NodeId> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|&i| self.shape(i)).collect();
        let dtypes: Vec<DType> = inputs.iter().map(|&i| self.graph[i].dtype).collect();
        let node = Node::checked(op, &shapes, &dtypes, name, label)?;
        let id = self.insert_node(node);
        for (slot, &i) in inputs.iter().enumerate() {
            self.graph.add_edge(i, id, slot);
        }
        Ok(id)
    }

    /// The consumers of `old` that `moves` picks read `new` instead, in the same slots.
    fn move_reads(&mut self, old: NodeId, new: NodeId, moves: impl Fn(NodeId) -> bool) {
        let edges: Vec<_> = self
            .graph
            .edges_directed(old, Direction::Outgoing)
            .filter(|e| moves(e.target()))
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (eid, target, slot) in edges {
            self.graph.remove_edge(eid);
            self.graph.add_edge(new, target, slot);
        }
    }

    /// Every consumer of `old` (and every graph output and adapter record pointing at it) now
    /// reads `new` instead, except consumers listed in `keep`.
    fn replace_uses(&mut self, old: NodeId, new: NodeId, keep: &HashSet<NodeId>) {
        self.move_reads(old, new, |c| !keep.contains(&c));
        for (_, o) in self.outputs.iter_mut() {
            if *o == old {
                *o = new;
            }
        }
        for a in self.adapters.iter_mut() {
            if a.output == old {
                a.output = new;
            }
        }
        for (_, next) in self.updates.iter_mut() {
            if *next == old {
                *next = new;
            }
        }
    }

    /// Nodes in an order where every node comes after its inputs. Errors on a cycle, naming a
    /// node on it.
    pub fn topo_order(&self) -> Result<Vec<NodeId>> {
        petgraph::algo::toposort(&self.graph, None).map_err(|c| {
            let n = &self.graph[c.node_id()];
            Error::graph(format!(
                "the graph has a cycle through node '{}' (value '{}')",
                n.label, n.name
            ))
        })
    }

    /// Removes every node that no graph output (or adapter tensor) depends on. Nothing that can
    /// be observed changes: this is the one edit outside a [`Patch`].
    pub fn remove_dead(&mut self) {
        let mut live = HashSet::new();
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|(_, n)| *n).collect();
        for a in &self.adapters {
            stack.extend([a.lora_a, a.lora_b, a.output]);
            stack.extend(a.magnitude);
        }
        stack.extend(self.inputs.iter().copied());
        for &(state, next) in &self.updates {
            stack.extend([state, next]);
        }
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.graph.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<NodeId> = self
            .graph
            .node_indices()
            .filter(|n| !live.contains(n))
            .collect();
        for n in dead {
            self.remove_node(n);
        }
    }

    /// A value name not used by any node, starting from `base` (`base`, else `base_1`, ...).
    pub fn fresh_name(&self, base: &str) -> String {
        if !self.names.contains_key(base) {
            return base.to_string();
        }
        let first = self.suffixes.get(base).copied().unwrap_or(1);
        (first..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !self.names.contains_key(n))
            .unwrap()
    }

    /// [`Graph::fresh_name`], remembering the suffix it used.
    fn take_fresh_name(&mut self, base: &str) -> String {
        let name = self.fresh_name(base);
        if name != base {
            let k: usize = name[base.len() + 1..].parse().unwrap_or(0);
            self.suffixes.insert(base.to_string(), k + 1);
        }
        name
    }

    /// The entries of `values` named after a graph input: what to feed, once values the importer
    /// pinned as constants (shapes, axes given as inputs) are left out.
    pub fn graph_inputs_of<T>(&self, values: BTreeMap<String, T>) -> BTreeMap<String, T> {
        let names: HashSet<&str> = self
            .inputs
            .iter()
            .map(|&i| self.node(i).name.as_str())
            .collect();
        values
            .into_iter()
            .filter(|(k, _)| names.contains(k.as_str()))
            .collect()
    }

    pub fn find_by_name(&self, name: &str) -> Option<NodeId> {
        self.names.get(name).copied()
    }

    /// Total parameters in constants (f32 only) and in adapter tensors.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let adapter_nodes: HashSet<NodeId> = self
            .adapters
            .iter()
            .flat_map(|a| [Some(a.lora_a), Some(a.lora_b), a.magnitude])
            .flatten()
            .collect();
        let mut total = 0;
        let mut trainable = 0;
        for n in self.graph.node_indices() {
            let node = &self.graph[n];
            if matches!(node.op, Op::Const(_)) && node.dtype == DType::F32 {
                total += node.numel();
                if adapter_nodes.contains(&n) {
                    trainable += node.numel();
                }
            }
        }
        (total, trainable)
    }
}

impl Node {
    /// A node for `op` on inputs of these shapes and types: the shape is checked against the
    /// inputs' (an error names the node by `label`) and against the memory budget; the element
    /// type follows from the inputs' ([`Op::dtype`]). The one constructor for
    /// [`GraphBuilder::add`] and [`Patch::add`].
    fn checked(
        op: Op,
        shapes: &[&[usize]],
        dtypes: &[DType],
        name: &str,
        label: &str,
    ) -> Result<Node> {
        let shape = op.shape(shapes).map_err(|e| match e {
            e @ Error::Shape { .. } => e.within(Subject::node(label)),
            other => other,
        })?;
        crate::tensor::check_size(&shape, 4, || format!("node '{label}'"))?;
        Ok(Node {
            name: name.into(),
            label: label.into(),
            dtype: op.dtype(dtypes),
            op,
            shape,
        })
    }
}
