//! Fusion decisions: which IR nodes share a kernel.
//!
//! [`groups`] walks the schedule and starts a group at every node that needs a kernel. When that
//! node can take an element-wise epilogue (see `kernels::takes_epilogue`: element-wise and
//! index-mapping ops, MatMul, Gemm), the group absorbs the chain of element-wise nodes that
//! follows it, one at a time, while all of these hold for the group's current last value `v` and
//! the candidate `c`:
//!
//! - `v` has exactly one live consumer, `c` (so nothing else reads it: no second node, no view;
//!   dead nodes, such as a Shape whose value was folded at import, read nothing), and
//!   `v` is neither a graph output nor the `next` value of a state update. It then never needs a
//!   buffer and stays in registers.
//! - `c` is element-wise (`kernels::is_elementwise`) and has the anchor's shape (an epilogue is
//!   applied at the anchor's flat output index).
//! - Every other input of `c` is available before the anchor runs: a graph input, a constant, or
//!   a value whose buffer is written earlier in the schedule than the anchor (views are followed
//!   to the value that owns the buffer). Nothing the group reads is produced after its anchor, so
//!   running the whole group where its last node was scheduled keeps the order topological.
//! - The kernel stays within [`MAX_BINDINGS`] storage buffers (its inputs and its output).
//!
//! Anything else ends the group. The groups satisfy the contract of
//! [`super::plan_grouped`], which checks it again.

use super::kernels::{is_elementwise, takes_epilogue};
use super::{has_kernel, schedule};
use crate::error::Result;
use crate::ir::{Graph, NodeId, Op};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Storage buffers one fused kernel may bind (inputs and output): WebGPU's guaranteed minimum of
/// `max_storage_buffers_per_shader_stage`, so a fused plan runs on every adapter.
pub const MAX_BINDINGS: usize = 8;

/// The kernel groups of `graph`, in schedule order: each an anchor followed by the element-wise
/// chain it absorbs (often just the anchor). With `fuse` off, one group per node.
pub fn groups(graph: &Graph, fuse: bool) -> Result<Vec<Vec<NodeId>>> {
    let order = schedule::order(graph)?;
    let live = schedule::live(graph);
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    // Values that must reach memory whatever their consumers: outputs and state `next` values.
    let kept: HashSet<NodeId> = graph
        .outputs
        .iter()
        .map(|&(_, n)| n)
        .chain(graph.updates.iter().map(|&(_, next)| next))
        .collect();
    let mut taken: HashSet<NodeId> = HashSet::new();
    let mut groups = vec![];
    for &anchor in &order {
        if !live.contains(&anchor) || !has_kernel(&graph.node(anchor).op) || taken.contains(&anchor)
        {
            continue;
        }
        let mut group = vec![anchor];
        taken.insert(anchor);
        if fuse && takes_epilogue(&graph.node(anchor).op) {
            // Bindings of the anchor alone (an upper bound: every input bound once) and its output.
            let mut bindings = graph.inputs_of(anchor).len() + 1;
            while let Some(next) = absorbable(graph, &group, &kept, &live, &position, &taken) {
                let extra = graph
                    .inputs_of(next)
                    .iter()
                    .filter(|&&i| i != *group.last().unwrap())
                    .count();
                if bindings + extra > MAX_BINDINGS {
                    break;
                }
                bindings += extra;
                taken.insert(next);
                group.push(next);
            }
        }
        groups.push(group);
    }
    Ok(groups)
}

/// The node that may extend `group` (see the module's rules), if any.
fn absorbable(
    graph: &Graph,
    group: &[NodeId],
    kept: &HashSet<NodeId>,
    live: &BTreeSet<NodeId>,
    position: &HashMap<NodeId, usize>,
    taken: &HashSet<NodeId>,
) -> Option<NodeId> {
    let anchor = group[0];
    let last = *group.last().expect("groups are not empty");
    if kept.contains(&last) {
        return None;
    }
    let consumers: Vec<NodeId> = graph
        .consumers(last)
        .into_iter()
        .filter(|c| live.contains(c))
        .collect();
    let &[next] = consumers.as_slice() else {
        return None;
    };
    let node = graph.node(next);
    // A view (a Cast to float32 is one: every value is f32 on the device) has no kernel to join.
    if taken.contains(&next)
        || !is_elementwise(&node.op)
        || node.op.is_view()
        || node.shape != graph.shape(anchor)
    {
        return None;
    }
    let ready = graph
        .inputs_of(next)
        .into_iter()
        .filter(|&i| i != last)
        .all(|i| {
            let owner = buffer_owner(graph, i);
            matches!(graph.node(owner).op, Op::Input | Op::Const(_))
                || position[&owner] < position[&anchor]
        });
    ready.then_some(next)
}

/// The node whose buffer holds `n`'s value: `n` itself, or the source of a chain of views.
fn buffer_owner(graph: &Graph, mut n: NodeId) -> NodeId {
    while graph.node(n).op.is_view() {
        n = graph.inputs_of(n)[0];
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{unary, Binary};
    use crate::tensor::Tensor;

    /// x @ w + bias -> relu -> * scale, where `scale` is computed before or after the matmul.
    fn chain(scale_first: bool) -> (Graph, Vec<NodeId>) {
        let mut g = Graph::new();
        let x = g.add_input("x", vec![3, 4]);
        let w = g.add_const("w", Tensor::f32(vec![4, 5], vec![0.5; 20]));
        let bias = g.add_const("bias", Tensor::f32(vec![5], vec![1.0; 5]));
        let s_in = g.add_input("s", vec![3, 5]);
        let early = g.add(Op::Unary(unary::EXP), &[s_in], "early", "early");
        let early = early.unwrap();
        let mm = g.add(Op::MatMul, &[x, w], "mm", "mm").unwrap();
        let late = g.add(Op::Unary(unary::EXP), &[s_in], "late", "late");
        let late = late.unwrap();
        let add = g.add(Op::Binary(Binary::Add), &[mm, bias], "add", "add");
        let add = add.unwrap();
        let relu = g
            .add(Op::Unary(unary::RELU), &[add], "relu", "relu")
            .unwrap();
        let scale = if scale_first { early } else { late };
        let y = g.add(Op::Binary(Binary::Mul), &[relu, scale], "y", "y");
        let y = y.unwrap();
        g.outputs.push(("y".into(), y));
        let other = if scale_first { late } else { early };
        g.outputs.push(("other".into(), other));
        (g, vec![mm, add, relu, y, early, late])
    }

    #[test]
    fn chains_fuse_only_with_inputs_ready_before_the_anchor() {
        let (g, n) = chain(true);
        let gr = groups(&g, true).unwrap();
        assert!(gr.contains(&vec![n[0], n[1], n[2], n[3]]), "{gr:?}");
        // `late` is scheduled after the matmul: the Mul that reads it is not absorbed (and
        // `late` cannot take it either, since the Mul's other input comes after `late`).
        let (g, n) = chain(false);
        let gr = groups(&g, true).unwrap();
        assert!(gr.contains(&vec![n[0], n[1], n[2]]), "{gr:?}");
        assert!(gr.contains(&vec![n[5]]), "{gr:?}");
        assert!(gr.contains(&vec![n[3]]), "{gr:?}");
        let unfused = groups(&g, false).unwrap();
        assert!(unfused.iter().all(|g| g.len() == 1), "{unfused:?}");
    }

    #[test]
    fn outputs_state_values_and_shared_values_end_a_group() {
        // A graph output in the middle.
        let (mut g, n) = chain(true);
        g.outputs.push(("mid".into(), n[1]));
        let gr = groups(&g, true).unwrap();
        assert!(gr.contains(&vec![n[0], n[1]]), "{gr:?}");
        assert!(gr.contains(&vec![n[2], n[3]]), "{gr:?}");
        // A state's next value in the middle.
        let (mut g, n) = chain(true);
        let state = g.add_input("state", vec![3, 5]);
        g.updates.push((state, n[2]));
        let gr = groups(&g, true).unwrap();
        assert!(gr.contains(&vec![n[0], n[1], n[2]]), "{gr:?}");
        assert!(gr.contains(&vec![n[3]]), "{gr:?}");
        // Two consumers.
        let (mut g, n) = chain(true);
        let neg = g.add(Op::Unary(unary::NEG), &[n[1]], "neg", "neg").unwrap();
        g.outputs.push(("neg".into(), neg));
        let gr = groups(&g, true).unwrap();
        assert!(gr.contains(&vec![n[0], n[1]]), "{gr:?}");
    }
}
