//! The order kernels run in, and which nodes need computing at all.

use crate::error::{Error, Result};
use crate::ir::{Graph, NodeId};
use petgraph::Direction;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

/// A topological order in which, among the nodes ready at any point, the lowest `NodeIndex`
/// goes first. The same graph therefore always gives the same order, so kernel names and
/// snapshots do not change from run to run.
pub fn order(graph: &Graph) -> Result<Vec<NodeId>> {
    let g = &graph.petgraph();
    let mut pending: HashMap<NodeId, usize> = g
        .node_indices()
        .map(|n| (n, graph.inputs_of(n).len()))
        .collect();
    let mut ready: BinaryHeap<Reverse<NodeId>> = pending
        .iter()
        .filter(|(_, &k)| k == 0)
        .map(|(&n, _)| Reverse(n))
        .collect();
    let mut out = Vec::with_capacity(pending.len());
    while let Some(Reverse(n)) = ready.pop() {
        out.push(n);
        // One decrement per edge: a node may read the same value in two slots.
        for next in g.neighbors_directed(n, Direction::Outgoing) {
            let k = pending.get_mut(&next).expect("node in graph");
            *k -= 1;
            if *k == 0 {
                ready.push(Reverse(next));
            }
        }
    }
    if out.len() != pending.len() {
        // Report the cycle the same way the rest of the crate does.
        graph.topo_order()?;
        return Err(Error::graph("the graph has a cycle"));
    }
    Ok(out)
}

/// The nodes some graph output or state update depends on, plus the graph inputs (which are
/// always fed). Nodes outside this set get no buffer and no kernel.
pub fn live(graph: &Graph) -> BTreeSet<NodeId> {
    let mut live = BTreeSet::new();
    let mut stack: Vec<NodeId> = graph.outputs().iter().map(|(_, n)| *n).collect();
    stack.extend(graph.inputs().iter().copied());
    stack.extend(
        graph
            .updates()
            .iter()
            .flat_map(|&(state, next)| [state, next])
            .filter(|&n| graph.contains(n)),
    );
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(graph.inputs_of(n));
        }
    }
    live
}
