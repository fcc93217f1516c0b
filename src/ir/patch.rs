//! The one rewrite mechanism every pass uses. A [`Rule`] looks at one node and may answer with a
//! [`Patch`]: new nodes wired to existing ones, and "shunts" that redirect the users of an old
//! value to a new one. A patch is built against an immutable graph and applied in one step, so a
//! rule that fails half-way (a shape error, say) leaves the graph untouched.

use super::{AdaptedLayer, BlockCodes, Graph, Half, Node, NodeId, Op};
use crate::error::{Error, Result, Subject};
use crate::tensor::{shape_str, DType, Tensor};
use std::collections::HashSet;

/// A value a patch refers to: one already in the graph, or one the patch adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PatchRef {
    Old(NodeId),
    New(usize),
}

impl From<NodeId> for PatchRef {
    fn from(n: NodeId) -> Self {
        PatchRef::Old(n)
    }
}

/// A change to a node that stays where it is (same id, name, inputs and shape), so the records
/// that point at it (adapter layers, parameters) stay valid.
enum InPlace {
    /// A different op on the same inputs (a detached norm made differentiable).
    Op(NodeId, Op),
    /// A constant becomes a graph input (a trained tensor, fed or kept as state).
    Promote(NodeId),
    /// The constant is stored on the device in half precision.
    Half(NodeId, Half),
    /// The constant holds what these codes decode to, and keeps them.
    Blocked(NodeId, std::sync::Arc<BlockCodes>),
}

/// Pending edits to a graph. Build with [`Patch::new`], apply with [`Graph::apply`]. Every
/// check happens while building, so applying cannot fail.
pub struct Patch<'g> {
    graph: &'g Graph,
    edits: Edits,
}

/// A finished patch that no longer borrows the graph.
pub struct PatchOps(Edits);

#[derive(Default)]
struct Edits {
    nodes: Vec<(Node, Vec<PatchRef>)>,
    /// Indices of new nodes that are graph inputs.
    new_inputs: Vec<usize>,
    shunts: Vec<(NodeId, PatchRef)>,
    /// New nodes that recompute a forward value, with the node each copies
    /// (`Graph::recomputed`).
    recomputed: Vec<(PatchRef, NodeId)>,
    /// Recomputations that become plain forward values (their originals are gone).
    promoted: Vec<NodeId>,
    /// Shunts for some users only: `(old, new, users)`.
    partial_shunts: Vec<(NodeId, PatchRef, Vec<NodeId>)>,
    in_place: Vec<InPlace>,
    /// New constants that keep block-quantized codes (`Graph::blocked`).
    blocked: Vec<(PatchRef, std::sync::Arc<BlockCodes>)>,
    /// Replaces the graph outputs (before `more_outputs` are appended).
    outputs: Option<Vec<(String, PatchRef)>>,
    more_outputs: Vec<(String, PatchRef)>,
    updates: Vec<(PatchRef, PatchRef)>,
    adapters: Vec<AdaptedLayer<PatchRef>>,
    claims: Vec<usize>,
    dropped_adapters: Vec<String>,
}

impl<'g> Patch<'g> {
    pub fn new(graph: &'g Graph) -> Self {
        Patch {
            graph,
            edits: Edits::default(),
        }
    }

    pub fn graph(&self) -> &'g Graph {
        self.graph
    }

    fn new_node(&self, i: usize) -> &Node {
        &self.edits.nodes[i].0
    }

    pub fn shape(&self, r: PatchRef) -> &[usize] {
        match r {
            PatchRef::Old(n) => self.graph.shape(n),
            PatchRef::New(i) => &self.new_node(i).shape,
        }
    }

    pub fn dtype(&self, r: PatchRef) -> DType {
        match r {
            PatchRef::Old(n) => self.graph.node(n).dtype,
            PatchRef::New(i) => self.new_node(i).dtype,
        }
    }

    /// The value's name (a new node's may still get a suffix when the patch is applied).
    pub fn name(&self, r: PatchRef) -> &str {
        match r {
            PatchRef::Old(n) => &self.graph.node(n).name,
            PatchRef::New(i) => &self.new_node(i).name,
        }
    }

    pub fn label(&self, r: PatchRef) -> &str {
        match r {
            PatchRef::Old(n) => &self.graph.node(n).label,
            PatchRef::New(i) => &self.new_node(i).label,
        }
    }

    pub fn op(&self, r: PatchRef) -> &Op {
        match r {
            PatchRef::Old(n) => &self.graph.node(n).op,
            PatchRef::New(i) => &self.new_node(i).op,
        }
    }

    /// Adds an op; its shape is checked now, against the inputs' shapes.
    pub fn add(
        &mut self,
        op: Op,
        inputs: &[PatchRef],
        name: &str,
        label: &str,
    ) -> Result<PatchRef> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|&r| self.shape(r)).collect();
        let dtypes: Vec<DType> = inputs.iter().map(|&r| self.dtype(r)).collect();
        let node = Node::checked(op, &shapes, &dtypes, name, label)?;
        Ok(self.push(node, inputs.to_vec()))
    }

    fn push(&mut self, node: Node, inputs: Vec<PatchRef>) -> PatchRef {
        self.edits.nodes.push((node, inputs));
        PatchRef::New(self.edits.nodes.len() - 1)
    }

    pub fn constant(&mut self, name: &str, tensor: Tensor) -> PatchRef {
        let node = Node {
            name: name.into(),
            label: name.into(),
            shape: tensor.shape.clone(),
            dtype: tensor.dtype(),
            op: Op::Const(tensor),
        };
        self.push(node, vec![])
    }

    /// A constant of `shape` whose values `codes` decode to (computed when first read), kept as
    /// those codes where the device can (`Graph::blocked`).
    pub fn blocked_constant(
        &mut self,
        name: &str,
        shape: Vec<usize>,
        codes: BlockCodes,
    ) -> PatchRef {
        let codes = std::sync::Arc::new(codes);
        let r = self.constant(name, BlockCodes::tensor(&codes, shape));
        self.edits.blocked.push((r, codes));
        r
    }

    /// An f32 scalar constant.
    pub fn scalar(&mut self, name: &str, v: f32) -> PatchRef {
        self.constant(name, Tensor::scalar(v))
    }

    /// A new graph input, appended after the existing ones.
    pub fn input(&mut self, name: &str, shape: Vec<usize>, dtype: DType) -> Result<PatchRef> {
        crate::tensor::check_size(&shape, 4, || format!("input '{name}'"))?;
        let node = Node {
            name: name.into(),
            label: name.into(),
            op: Op::Input,
            shape,
            dtype,
        };
        let r = self.push(node, vec![]);
        if let PatchRef::New(i) = r {
            self.edits.new_inputs.push(i);
        }
        Ok(r)
    }

    /// Users of `old` that exist before the patch read `new` from now on.
    pub fn replace(&mut self, old: NodeId, new: PatchRef) {
        self.edits.shunts.push((old, new));
    }

    /// The listed users of `old` read `new` from now on; its other users, the graph outputs and
    /// the adapter records keep reading `old`.
    pub fn replace_for(&mut self, old: NodeId, new: PatchRef, users: Vec<NodeId>) {
        self.edits.partial_shunts.push((old, new, users));
    }

    /// Marks `r` as a recomputation of `original`, a forward value, for the backward pass.
    pub fn mark_recomputed(&mut self, r: PatchRef, original: NodeId) {
        self.edits.recomputed.push((r, original));
    }

    /// Node `n`, a recomputation, is a forward value like any other from now on: its original
    /// is gone, and `n` takes its place (`codegen::undo_unhosted_recomputations`).
    pub fn promote_recomputed(&mut self, n: NodeId) {
        self.edits.promoted.push(n);
    }

    /// Node `n` computes `op` on its current inputs instead. The new op must give the same
    /// shape and element type.
    pub fn replace_op(&mut self, n: NodeId, op: Op) -> Result<()> {
        let node = self.graph.node(n);
        let ins = self.graph.inputs_of(n);
        let shapes: Vec<&[usize]> = ins.iter().map(|&i| self.graph.shape(i)).collect();
        let dtypes: Vec<DType> = ins.iter().map(|&i| self.graph.node(i).dtype).collect();
        let new = Node::checked(op, &shapes, &dtypes, &node.name, &node.label)?;
        if new.shape != node.shape || new.dtype != node.dtype {
            return Err(Error::graph_at(
                Subject::named("node", &node.label),
                format!(
                    "{} in place of {} would change its value from {} {} to {} {}",
                    new.op.name(),
                    node.op.name(),
                    node.dtype.name(),
                    shape_str(&node.shape),
                    new.dtype.name(),
                    shape_str(&new.shape)
                ),
            ));
        }
        self.edits.in_place.push(InPlace::Op(n, new.op));
        Ok(())
    }

    /// The constant `n` takes the value `tensor` (same shape and element type), keeping its
    /// node: checkpoints and trained weights restored into a model.
    pub fn set_const(&mut self, n: NodeId, tensor: Tensor) -> Result<()> {
        let node = self.graph.node(n);
        if !matches!(node.op, Op::Const(_)) {
            return Err(Error::graph(format!(
                "'{}' is a {}, not a constant",
                node.name,
                node.op.name()
            )));
        }
        if tensor.shape != node.shape || tensor.dtype() != node.dtype {
            return Err(Error::Mismatch {
                at: Box::new(Subject::named("tensor", &node.name)),
                quantity: "type and shape",
                found: format!("{} {}", tensor.dtype().name(), shape_str(&tensor.shape)),
                expected: format!("{} {}", node.dtype.name(), shape_str(&node.shape)),
            });
        }
        self.edits.in_place.push(InPlace::Op(n, Op::Const(tensor)));
        Ok(())
    }

    /// The constant `n` becomes a graph input (appended after the existing ones), keeping its
    /// node, so the records that point at it stay valid. Returns its value until now.
    pub fn promote_to_input(&mut self, n: NodeId) -> Result<Tensor> {
        let node = self.graph.node(n);
        let Op::Const(t) = &node.op else {
            return Err(Error::graph(format!(
                "'{}' is a {}, not a constant",
                node.name,
                node.op.name()
            )));
        };
        self.edits.in_place.push(InPlace::Promote(n));
        Ok(t.clone())
    }

    /// The constant `n` holds the values `codes` decode to (after a `set_const` of them in
    /// this patch) and keeps the codes (`Graph::blocked`).
    pub fn store_blocked(&mut self, n: NodeId, codes: std::sync::Arc<BlockCodes>) {
        self.edits.in_place.push(InPlace::Blocked(n, codes));
    }

    /// The constant `n` (whose values are exact in `format`) is stored in half precision.
    pub fn store_half(&mut self, n: NodeId, format: Half) {
        self.edits.in_place.push(InPlace::Half(n, format));
    }

    /// The graph's outputs become exactly these.
    pub fn set_outputs(&mut self, outputs: Vec<(String, PatchRef)>) {
        self.edits.outputs = Some(outputs);
    }

    /// Appends a graph output.
    pub fn add_output(&mut self, name: &str, value: PatchRef) {
        self.edits.more_outputs.push((name.to_string(), value));
    }

    /// After each run, `next`'s value becomes the state input `state`'s.
    pub fn add_update(&mut self, state: PatchRef, next: PatchRef) {
        self.edits.updates.push((state, next));
    }

    pub fn record_adapter(&mut self, layer: AdaptedLayer<PatchRef>) {
        self.edits.adapters.push(layer);
    }

    /// The new node keeps its exact name; an old node holding it is renamed instead. Merge uses
    /// this so a merged weight keeps its initializer's name.
    pub fn claim_name(&mut self, r: PatchRef) {
        if let PatchRef::New(i) = r {
            self.edits.claims.push(i);
        }
    }

    /// Forgets the adapter record of `module` (its nodes go when they become dead).
    pub fn drop_adapter(&mut self, module: &str) {
        self.edits.dropped_adapters.push(module.to_string());
    }

    pub fn finish(self) -> PatchOps {
        PatchOps(self.edits)
    }
}

/// Where an applied patch's new nodes landed.
pub struct Applied {
    ids: Vec<NodeId>,
}

impl Applied {
    /// The graph node of a value the patch referred to.
    pub fn id(&self, r: PatchRef) -> NodeId {
        match r {
            PatchRef::Old(n) => n,
            PatchRef::New(i) => self.ids[i],
        }
    }

    /// The nodes the patch added.
    pub fn ids(&self) -> &[NodeId] {
        &self.ids
    }
}

impl Graph {
    /// Applies a finished patch. New value names are made unique.
    pub fn apply(&mut self, patch: PatchOps) -> Applied {
        let e = patch.0;
        for &i in &e.claims {
            let name = &e.nodes[i].0.name;
            if let Some(holder) = self.find_by_name(name) {
                let renamed = self.take_fresh_name(name);
                self.rename(holder, renamed);
            }
        }
        let mut ids = Vec::with_capacity(e.nodes.len());
        let resolve = |ids: &Vec<NodeId>, r: PatchRef| match r {
            PatchRef::Old(n) => n,
            PatchRef::New(i) => ids[i],
        };
        for (node, inputs) in e.nodes {
            let id = self.insert_node(node);
            for (slot, r) in inputs.into_iter().enumerate() {
                let src = resolve(&ids, r);
                self.graph.add_edge(src, id, slot);
            }
            ids.push(id);
        }
        self.inputs.extend(e.new_inputs.iter().map(|&i| ids[i]));
        let added: HashSet<NodeId> = ids.iter().copied().collect();
        for (old, new) in e.shunts {
            let new = resolve(&ids, new);
            self.replace_uses(old, new, &added);
        }
        for (r, original) in e.recomputed {
            self.recomputed.insert(resolve(&ids, r), original);
        }
        for (r, codes) in e.blocked {
            self.blocked.insert(resolve(&ids, r), codes);
        }
        for n in e.promoted {
            self.recomputed.remove(&n);
        }
        for (old, new, users) in e.partial_shunts {
            let new = resolve(&ids, new);
            self.move_reads(old, new, |c| users.contains(&c));
        }
        for edit in e.in_place {
            match edit {
                InPlace::Op(n, op) => {
                    // A new value or op: the codes no longer give it.
                    self.blocked.remove(&n);
                    self.graph[n].op = op
                }
                InPlace::Promote(n) => {
                    self.graph[n].op = Op::Input;
                    self.half_consts.remove(&n);
                    self.blocked.remove(&n);
                    self.inputs.push(n);
                }
                InPlace::Half(n, format) => _ = self.half_consts.insert(n, format),
                InPlace::Blocked(n, codes) => _ = self.blocked.insert(n, codes),
            }
        }
        if let Some(outputs) = e.outputs {
            self.outputs = outputs
                .into_iter()
                .map(|(name, r)| (name, resolve(&ids, r)))
                .collect();
        }
        for (name, r) in e.more_outputs {
            self.outputs.push((name, resolve(&ids, r)));
        }
        for (state, next) in e.updates {
            self.updates
                .push((resolve(&ids, state), resolve(&ids, next)));
        }
        self.adapters
            .retain(|a| !e.dropped_adapters.contains(&a.module));
        for a in e.adapters {
            self.adapters.push(a.map(|r| resolve(&ids, r)));
        }
        Applied { ids }
    }
}

/// A local rewrite: look at one node, maybe propose a patch.
pub trait Rule {
    fn name(&self) -> &str;
    fn apply(&self, graph: &Graph, node: NodeId) -> Result<Option<PatchOps>>;
}

/// Runs `rules` over the graph in one topological sweep: each node gets the first rule that
/// matches it. Nodes that a patch makes are not revisited in the same sweep, but a consumer
/// visited later sees its producers' rewrites (so constant folding propagates in one sweep).
/// Dead nodes are removed at the end. Returns how many patches were applied.
pub fn rewrite(graph: &mut Graph, rules: &[&dyn Rule]) -> Result<usize> {
    let order = graph.topo_order()?;
    let mut applied = 0;
    for n in order {
        if !graph.contains(n) {
            continue;
        }
        for rule in rules {
            if let Some(patch) = rule.apply(graph, n)? {
                graph.apply(patch);
                applied += 1;
                break;
            }
        }
    }
    graph.remove_dead();
    Ok(applied)
}
