//! The order kernels run in, and which nodes need computing at all.

use crate::error::{Error, Result};
use crate::ir::{Graph, NodeId};
use petgraph::Direction;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

/// A topological order in which, among the nodes ready at any point, the lowest `NodeIndex`
/// goes first. The same graph therefore always gives the same order, so kernel names and
/// snapshots do not change from run to run. A recomputation (`Graph::recomputed`) ranks as
/// its earliest reader, so it comes just before that reader and not as soon as its source is
/// ready (which would be in the forward pass, where recomputing buys nothing).
pub fn order(graph: &Graph) -> Result<Vec<NodeId>> {
    let g = &graph.petgraph();
    let mut pending: HashMap<NodeId, usize> = g
        .node_indices()
        .map(|n| (n, graph.inputs_of(n).len()))
        .collect();
    let rank = ranks(graph)?;
    let key = |n: NodeId| Reverse((rank.get(&n).copied().unwrap_or(n), n));
    let mut ready: BinaryHeap<Reverse<(NodeId, NodeId)>> = pending
        .iter()
        .filter(|(_, &k)| k == 0)
        .map(|(&n, _)| key(n))
        .collect();
    let mut out = Vec::with_capacity(pending.len());
    while let Some(Reverse((_, n))) = ready.pop() {
        out.push(n);
        // One decrement per edge: a node may read the same value in two slots.
        for next in g.neighbors_directed(n, Direction::Outgoing) {
            let k = pending.get_mut(&next).expect("node in graph");
            *k -= 1;
            if *k == 0 {
                ready.push(key(next));
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

/// The rank of each recomputation: the lowest rank among its readers (a reader that is no
/// recomputation ranks as its own index).
fn ranks(graph: &Graph) -> Result<HashMap<NodeId, NodeId>> {
    let mut rank = HashMap::new();
    if graph.recomputed().is_empty() {
        return Ok(rank);
    }
    for n in graph.topo_order()?.into_iter().rev() {
        if graph.recomputed().contains_key(&n) {
            let of = |c: NodeId| rank.get(&c).copied().unwrap_or(c);
            let lowest = graph.consumers(n).into_iter().map(of).min();
            rank.insert(n, lowest.unwrap_or(n));
        }
    }
    Ok(rank)
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
