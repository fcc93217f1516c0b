//! The order kernels run in, and which nodes need computing at all.

use crate::error::{Error, Result};
use crate::ir::{Graph, NodeId};
use petgraph::Direction;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

/// A topological order in which, among the nodes ready at any point, the lowest rank goes first:
/// a node's `NodeIndex`, with two exceptions. The same graph therefore always gives the same
/// order, so kernel names and snapshots do not change from run to run.
/// - A recomputation (`Graph::recomputed`) ranks as its earliest reader, so it comes just before
///   that reader and not as soon as its source is ready (which would be in the forward pass,
///   where recomputing buys nothing).
/// - In a graph with state updates (a training step), a node only graph outputs depend on (the
///   loss a step reports) ranks first, so it runs as soon as it is ready. Run late, it would
///   keep what it reads (the loss's residual, an activation's size) alive through the backward
///   pass; where it lands by index alone depends on which indices earlier rewrites freed.
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

/// The rank of each node that does not rank as its own index (see [`order`]): each
/// recomputation the lowest rank among its readers, each node only outputs need the lowest.
fn ranks(graph: &Graph) -> Result<HashMap<NodeId, NodeId>> {
    let mut rank: HashMap<NodeId, NodeId> = outputs_only(graph)
        .into_iter()
        .map(|n| (n, NodeId::new(0)))
        .collect();
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

/// In a graph with state updates, the nodes that graph outputs depend on and no update does.
fn outputs_only(graph: &Graph) -> BTreeSet<NodeId> {
    if graph.updates().is_empty() {
        return BTreeSet::new();
    }
    let for_updates = ancestors(graph, graph.updates().iter().map(|&(_, next)| next));
    ancestors(graph, graph.outputs().iter().map(|&(_, n)| n))
        .difference(&for_updates)
        .copied()
        .collect()
}

/// `from` and every node they depend on.
fn ancestors(graph: &Graph, from: impl IntoIterator<Item = NodeId>) -> BTreeSet<NodeId> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<NodeId> = from.into_iter().filter(|&n| graph.contains(n)).collect();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(graph.inputs_of(n));
        }
    }
    seen
}

/// The nodes some graph output or state update depends on, plus the graph inputs (which are
/// always fed). Nodes outside this set get no buffer and no kernel.
pub fn live(graph: &Graph) -> BTreeSet<NodeId> {
    let outputs = graph.outputs().iter().map(|&(_, n)| n);
    let states = graph
        .updates()
        .iter()
        .flat_map(|&(state, next)| [state, next]);
    ancestors(
        graph,
        outputs.chain(graph.inputs().iter().copied()).chain(states),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{unary, Binary, GraphBuilder, Op, Reduce};

    fn sum(axes: Vec<usize>) -> Op {
        Op::Reduce {
            kind: Reduce::Sum,
            axes,
            keepdims: false,
        }
    }

    /// A step's reported value (a loss) runs as soon as what it reads is ready, though every
    /// node of the update's chain has a lower index; a graph without updates keeps index order.
    #[test]
    fn values_only_outputs_need_run_when_ready() {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![4, 8]);
        let w = g.add_input("w", vec![8]);
        let h = g.add(Op::Binary(Binary::Mul), &[x, w], "h", "h").unwrap();
        let e = g.add(Op::Unary(unary::EXP), &[h], "e", "e").unwrap();
        let grad = g.add(sum(vec![0]), &[e], "grad", "grad").unwrap();
        let next = g
            .add(Op::Binary(Binary::Sub), &[w, grad], "next", "next")
            .unwrap();
        let loss = g.add(sum(vec![0, 1]), &[h], "loss", "loss").unwrap();
        g.add_output("loss", loss);
        let position = |g: &Graph, n| order(g).unwrap().iter().position(|&o| o == n).unwrap();
        assert_eq!(position(&g, loss), 6, "inference: by index, last");
        g.add_update(w, next);
        assert_eq!(
            position(&g, loss),
            position(&g, h) + 1,
            "training: when ready"
        );
        assert_eq!(position(&g, next), 6);
    }
}
