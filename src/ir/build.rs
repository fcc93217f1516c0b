//! Making a graph from nothing: the importer and tests add nodes one by one to a graph nobody
//! else sees yet, then [`GraphBuilder::finish`] hands it over. From then on it changes only
//! through patches.

use super::{AdaptedLayer, BlockCodes, Graph, Half, ModelInfo, NodeId, Op};
use crate::error::Result;
use crate::tensor::{DType, Tensor};
use std::ops::Deref;
use std::sync::Arc;

/// A graph under construction. Reads go to the graph as built so far (it derefs to [`Graph`]).
#[derive(Default)]
pub struct GraphBuilder {
    graph: Graph,
}

impl Deref for GraphBuilder {
    type Target = Graph;
    fn deref(&self) -> &Graph {
        &self.graph
    }
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Goes on building a graph the caller owns (tests that add a loss to an imported model):
    /// nobody else sees it until [`GraphBuilder::finish`].
    pub fn extending(graph: Graph) -> Self {
        GraphBuilder { graph }
    }

    /// Adds a float32 graph input.
    pub fn add_input(&mut self, name: &str, shape: Vec<usize>) -> NodeId {
        self.graph.add_input(name, shape, DType::F32)
    }

    /// Adds a graph input of any element type (its values reach the device as f32).
    pub fn add_typed_input(&mut self, name: &str, shape: Vec<usize>, dtype: DType) -> NodeId {
        self.graph.add_input(name, shape, dtype)
    }

    /// Adds a constant, labelled with its name.
    pub fn add_const(&mut self, name: &str, tensor: Tensor) -> NodeId {
        self.add_labelled_const(name, name, tensor)
    }

    /// Adds a constant with a label of its own (the ONNX node that made it).
    pub fn add_labelled_const(&mut self, name: &str, label: &str, tensor: Tensor) -> NodeId {
        self.graph.insert_node(super::Node {
            name: name.into(),
            label: label.into(),
            shape: tensor.shape.clone(),
            dtype: tensor.dtype(),
            op: Op::Const(tensor),
        })
    }

    /// Adds an op node; its shape is checked against its inputs'.
    pub fn add(&mut self, op: Op, inputs: &[NodeId], name: &str, label: &str) -> Result<NodeId> {
        self.graph.add(op, inputs, name, label)
    }

    /// Takes back the node added last (the importer evaluates an all-constant integer node and
    /// keeps its value instead). Nothing may read it yet.
    pub fn remove_unread(&mut self, id: NodeId) {
        debug_assert!(self.graph.consumers(id).is_empty());
        self.graph.remove_node(id);
    }

    pub fn add_output(&mut self, name: impl Into<String>, id: NodeId) {
        self.graph.outputs.push((name.into(), id));
    }

    /// The graph's outputs become exactly these.
    pub fn set_outputs(&mut self, outputs: Vec<(String, NodeId)>) {
        self.graph.outputs = outputs;
    }

    pub fn add_adapter(&mut self, layer: AdaptedLayer) {
        self.graph.adapters.push(layer);
    }

    /// `next`'s value becomes the state input `state`'s after each run (a training step).
    pub fn add_update(&mut self, state: NodeId, next: NodeId) {
        self.graph.updates.push((state, next));
    }

    /// The graph's state updates become exactly these.
    pub fn set_updates(&mut self, updates: Vec<(NodeId, NodeId)>) {
        self.graph.updates = updates;
    }

    /// Removes the constant `id` if no node reads it and it is no graph output: the importer
    /// consumed it. Returns whether it did.
    pub fn drop_unread_const(&mut self, id: NodeId) -> bool {
        let g = &self.graph;
        let unread = matches!(g.node(id).op, Op::Const(_))
            && g.consumers(id).is_empty()
            && !g.outputs.iter().any(|&(_, o)| o == id);
        if unread {
            self.graph.remove_node(id);
        }
        unread
    }

    /// The constant `id` holds the values `codes` decode to (a block-quantized weight,
    /// dequantized by the importer with [`BlockCodes::value`]'s arithmetic).
    pub fn mark_blocked(&mut self, id: NodeId, codes: impl Into<Arc<BlockCodes>>) {
        debug_assert!(matches!(self.graph.node(id).op, Op::Const(_)));
        self.graph.blocked.insert(id, codes.into());
    }

    /// The constant `id` holds values exact in `format` (a half-precision initializer).
    pub fn mark_half(&mut self, id: NodeId, format: Half) {
        self.graph.half_consts.insert(id, format);
    }

    /// The lowered Conv filter matrix `id` came from a filter bank of `shape`.
    pub fn set_conv_filter(&mut self, id: NodeId, shape: Vec<usize>) {
        self.graph.conv_filters.insert(id, shape);
    }

    pub fn info_mut(&mut self) -> &mut ModelInfo {
        &mut self.graph.info
    }

    pub fn finish(self) -> Graph {
        self.graph
    }
}
