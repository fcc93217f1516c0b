//! The one rewrite mechanism every pass uses. A [`Rule`] looks at one node and may answer with a
//! [`Patch`]: new nodes wired to existing ones, and "shunts" that redirect the users of an old
//! value to a new one. A patch is built against an immutable graph and applied in one step, so a
//! rule that fails half-way (a shape error, say) leaves the graph untouched.

use super::{AdaptedLayer, Graph, Node, NodeId, Op};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
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

/// Pending edits to a graph. Build with [`Patch::new`], apply with [`Graph::apply`].
pub struct Patch<'g> {
    graph: &'g Graph,
    nodes: Vec<(Node, Vec<PatchRef>)>,
    shunts: Vec<(NodeId, PatchRef)>,
    adapters: Vec<AdaptedLayer<PatchRef>>,
    claims: Vec<usize>,
    dropped_adapters: Vec<String>,
}

/// A finished patch that no longer borrows the graph.
pub struct PatchOps {
    nodes: Vec<(Node, Vec<PatchRef>)>,
    shunts: Vec<(NodeId, PatchRef)>,
    adapters: Vec<AdaptedLayer<PatchRef>>,
    claims: Vec<usize>,
    dropped_adapters: Vec<String>,
}

impl<'g> Patch<'g> {
    pub fn new(graph: &'g Graph) -> Self {
        Patch {
            graph,
            nodes: vec![],
            shunts: vec![],
            adapters: vec![],
            claims: vec![],
            dropped_adapters: vec![],
        }
    }

    pub fn graph(&self) -> &'g Graph {
        self.graph
    }

    pub fn shape(&self, r: PatchRef) -> &[usize] {
        match r {
            PatchRef::Old(n) => self.graph.shape(n),
            PatchRef::New(i) => &self.nodes[i].0.shape,
        }
    }

    pub fn dtype(&self, r: PatchRef) -> DType {
        match r {
            PatchRef::Old(n) => self.graph.node(n).dtype,
            PatchRef::New(i) => self.nodes[i].0.dtype,
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
        let shape = op.shape(&shapes).map_err(|e| match e {
            Error::Shape(m) => Error::Shape(format!("node '{label}': {m}")),
            other => other,
        })?;
        crate::tensor::check_size(&shape, 4, || format!("node '{label}'"))?;
        let dtypes: Vec<DType> = inputs.iter().map(|&r| self.dtype(r)).collect();
        let node = Node {
            name: name.into(),
            label: label.into(),
            dtype: op.dtype(&dtypes),
            op,
            shape,
        };
        self.nodes.push((node, inputs.to_vec()));
        Ok(PatchRef::New(self.nodes.len() - 1))
    }

    pub fn constant(&mut self, name: &str, tensor: Tensor) -> PatchRef {
        let node = Node {
            name: name.into(),
            label: name.into(),
            shape: tensor.shape.clone(),
            dtype: tensor.dtype(),
            op: Op::Const(tensor),
        };
        self.nodes.push((node, vec![]));
        PatchRef::New(self.nodes.len() - 1)
    }

    /// Users of `old` that exist before the patch read `new` from now on.
    pub fn replace(&mut self, old: NodeId, new: PatchRef) {
        self.shunts.push((old, new));
    }

    pub fn record_adapter(&mut self, layer: AdaptedLayer<PatchRef>) {
        self.adapters.push(layer);
    }

    /// The new node keeps its exact name; an old node holding it is renamed instead. Merge uses
    /// this so a merged weight keeps its initializer's name.
    pub fn claim_name(&mut self, r: PatchRef) {
        if let PatchRef::New(i) = r {
            self.claims.push(i);
        }
    }

    /// Forgets the adapter record of `module` (its nodes go when they become dead).
    pub fn drop_adapter(&mut self, module: &str) {
        self.dropped_adapters.push(module.to_string());
    }

    pub fn finish(self) -> PatchOps {
        PatchOps {
            nodes: self.nodes,
            shunts: self.shunts,
            adapters: self.adapters,
            claims: self.claims,
            dropped_adapters: self.dropped_adapters,
        }
    }
}

impl Graph {
    /// Applies a finished patch. New value names are made unique.
    pub fn apply(&mut self, patch: PatchOps) {
        let mut taken: HashSet<String> =
            self.graph.node_weights().map(|n| n.name.clone()).collect();
        for &i in &patch.claims {
            let name = &patch.nodes[i].0.name;
            if let Some(holder) = self.find_by_name(name) {
                let renamed = (1..)
                    .map(|k| format!("{name}_{k}"))
                    .find(|n| !taken.contains(n))
                    .unwrap();
                taken.insert(renamed.clone());
                self.graph[holder].name = renamed;
                taken.remove(name);
            }
        }
        let mut ids = Vec::with_capacity(patch.nodes.len());
        let resolve = |ids: &Vec<NodeId>, r: PatchRef| match r {
            PatchRef::Old(n) => n,
            PatchRef::New(i) => ids[i],
        };
        for (mut node, inputs) in patch.nodes {
            if taken.contains(&node.name) {
                let base = node.name.clone();
                node.name = (1..)
                    .map(|i| format!("{base}_{i}"))
                    .find(|n| !taken.contains(n))
                    .unwrap();
            }
            taken.insert(node.name.clone());
            let id = self.graph.add_node(node);
            for (slot, r) in inputs.into_iter().enumerate() {
                let src = resolve(&ids, r);
                self.graph.add_edge(src, id, slot);
            }
            ids.push(id);
        }
        let added: HashSet<NodeId> = ids.iter().copied().collect();
        for (old, new) in patch.shunts {
            let new = resolve(&ids, new);
            self.replace_uses(old, new, &added);
        }
        self.adapters
            .retain(|a| !patch.dropped_adapters.contains(&a.module));
        for a in patch.adapters {
            self.adapters.push(a.map(|r| resolve(&ids, r)));
        }
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
