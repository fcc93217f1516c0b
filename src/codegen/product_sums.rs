//! Sums of products in one kernel. A LoRA or DoRA layer adds its low-rank path to the base
//! product, `x W0ᵀ + s (x Aᵀ) Bᵀ`, and its backward pass adds the two paths' input gradients,
//! `dY W0 + (dY B) A`: two products of the same output shape, one over the layer's width and one
//! over the rank. Computed apart, the smaller one writes its whole output for the larger one's
//! epilogue to read back, in a kernel of its own. Both are dot products of the same output
//! element, so one kernel computes their sum in one accumulator: its K loop runs over the first
//! product's K terms and then over the second's K2 (`shaders/matmul*.wgsl`, the `SEGMENTS`
//! section). The rank-16 path of a 512-wide layer then costs its multiply-adds (6% of the base
//! product's) and nothing else.
//!
//! A group summing two products is laid out `[p1, p2, add, ...]`, or `[p1, p2, mul, add, ...]`
//! where the second product is scaled by a scalar first (LoRA's `s`, which the kernel applies
//! as it loads A2); the epilogue goes on from the add. The fusion pass forms such groups
//! ([`seed`]), the planner checks them and the matmul emitter renders them ([`summed`]).

use crate::ir::{Binary, Graph, NodeId, Op};
use crate::tensor::numel;
use std::collections::{BTreeSet, HashSet};

/// The second product of a group that sums two (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SecondProduct {
    /// The product whose K2 terms the kernel adds to the anchor's sums.
    pub product: NodeId,
    /// The scalar it is multiplied by before the add (a value of one element), where it is.
    pub scale: Option<NodeId>,
    /// Index in the group of the add of the two products: the epilogue's first node.
    pub add: usize,
}

/// A MatMul or Gemm node.
pub(crate) fn is_product(graph: &Graph, n: NodeId) -> bool {
    matches!(graph.node(n).op, Op::MatMul | Op::Gemm { .. })
}

/// A MatMul, or a Gemm that scales nothing (alpha 1): its value is the plain dot product, plus
/// Gemm's C where `with_c`.
fn plain_product(graph: &Graph, n: NodeId, with_c: bool) -> bool {
    match &graph.node(n).op {
        Op::MatMul => true,
        Op::Gemm { alpha, .. } => *alpha == 1.0 && (with_c || graph.inputs_of(n).len() == 2),
        _ => false,
    }
}

/// The second product of `group` when the group sums two (module docs), checked: the anchor
/// and the second product plain (alpha 1; only the anchor may have a C, which is added once),
/// of the same shape, each value before the add read by the next node of the chain alone, and
/// none of them kept. None when the group's second node is not a product; `Err` with the reason
/// when it is but the group is no sum of products.
pub(crate) fn summed(
    graph: &Graph,
    group: &[NodeId],
    live: &BTreeSet<NodeId>,
    kept: &HashSet<NodeId>,
) -> Option<Result<SecondProduct, &'static str>> {
    let second = match layout(graph, group)? {
        Ok(second) => second,
        Err(why) => return Some(Err(why)),
    };
    // Every value before the add is read by the chain alone: the kernel computes none apart.
    let read_by = |n: NodeId, reader: NodeId| {
        let readers: Vec<NodeId> = (graph.consumers(n).into_iter())
            .filter(|c| live.contains(c))
            .collect();
        readers == [reader] && !kept.contains(&n)
    };
    let chain = &group[..=second.add];
    if !chain.windows(2).skip(1).all(|w| read_by(w[0], w[1]))
        || !read_by(group[0], chain[second.add])
    {
        return Some(Err("a value the two products sum is read outside the sum"));
    }
    Some(Ok(second))
}

/// [`summed`] without the check of the values' readers, which the planner made: what the
/// emitter renders.
pub(crate) fn layout(
    graph: &Graph,
    group: &[NodeId],
) -> Option<Result<SecondProduct, &'static str>> {
    let (&p1, &p2) = (group.first()?, group.get(1)?);
    if !is_product(graph, p1) || !is_product(graph, p2) {
        return None;
    }
    Some(structure(graph, group))
}

fn structure(graph: &Graph, group: &[NodeId]) -> Result<SecondProduct, &'static str> {
    let (p1, p2) = (group[0], group[1]);
    if !plain_product(graph, p1, true) || !plain_product(graph, p2, false) {
        return Err("a product is not a plain dot product (alpha 1, C only on the first)");
    }
    let shape = graph.shape(p1);
    if graph.shape(p2) != shape || graph.node(p1).dtype != graph.node(p2).dtype {
        return Err("the products differ in shape or type");
    }
    let scalar = |n: NodeId| numel(graph.shape(n)) == 1;
    // The value the add reads from the second product: the product, or its scaled value.
    let (scale, add) = match group.get(2).map(|&n| (n, &graph.node(n).op)) {
        Some((mul, Op::Binary(Binary::Mul))) => {
            let ins = graph.inputs_of(mul);
            let scale = match ins.as_slice() {
                &[a, s] | &[s, a] if a == p2 && s != p2 && scalar(s) => s,
                _ => return Err("the second product's scale is not a scalar"),
            };
            (Some(scale), 3)
        }
        _ => (None, 2),
    };
    let Some(&add_node) = group.get(add) else {
        return Err("the group has no add of the two products");
    };
    let summand = group[add - 1];
    let ins = graph.inputs_of(add_node);
    let adds_both =
        matches!(ins.as_slice(), &[a, b] if (a, b) == (p1, summand) || (b, a) == (p1, summand));
    if graph.node(add_node).op != Op::Binary(Binary::Add) || !adds_both {
        return Err("the group has no add of the two products");
    }
    if graph.shape(add_node) != shape {
        return Err("the add broadcasts");
    }
    Ok(SecondProduct {
        product: p2,
        scale,
        add,
    })
}

/// The start of a group anchored at the product `p1` that sums it with a second product
/// (module docs): `[p1, p2, (mul,) add]`, where `p1`'s one reader adds it to a product (or a
/// product times a scalar) that is free (`free`) and does at most as many multiply-adds, and
/// nothing but the chain reads either. None otherwise.
pub(crate) fn seed(
    graph: &Graph,
    p1: NodeId,
    live: &BTreeSet<NodeId>,
    kept: &HashSet<NodeId>,
    free: impl Fn(NodeId) -> bool,
) -> Option<Vec<NodeId>> {
    let readers: Vec<NodeId> = (graph.consumers(p1).into_iter())
        .filter(|c| live.contains(c))
        .collect();
    let &[add] = readers.as_slice() else {
        return None;
    };
    let ins = graph.inputs_of(add);
    let &[a, b] = ins.as_slice() else {
        return None;
    };
    let other = if a == p1 { b } else { a };
    let (p2, mul) = match &graph.node(other).op {
        Op::Binary(Binary::Mul) => {
            let ins = graph.inputs_of(other);
            let p2 = *ins.iter().find(|&&i| is_product(graph, i))?;
            (p2, Some(other))
        }
        _ => (other, None),
    };
    if p2 == p1 || !free(p2) || mul.is_some_and(|m| !free(m)) || !free(add) {
        return None;
    }
    if work(graph, p2)? > work(graph, p1)? {
        return None;
    }
    let group: Vec<NodeId> = [p1, p2].into_iter().chain(mul).chain([add]).collect();
    summed(graph, &group, live, kept)?.ok()?;
    Some(group)
}

/// Multiply-adds of a MatMul or Gemm node (output elements times the reduced length); None for
/// other ops.
pub(crate) fn work(graph: &Graph, n: NodeId) -> Option<usize> {
    let k = match &graph.node(n).op {
        Op::MatMul => *graph.shape(graph.inputs_of(n)[0]).last()?,
        Op::Gemm { trans_a, .. } => {
            let a = graph.shape(graph.inputs_of(n)[0]);
            a[usize::from(!*trans_a)]
        }
        _ => return None,
    };
    Some(numel(graph.shape(n)) * k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::schedule;
    use crate::ir::{unary, GraphBuilder};

    /// `out = x w + s (x a) b` (scaled where `scale`), `x` 8 x 32, rank 4, 16 outputs, and
    /// `extra` reads of the base product; returns (graph, [base, up, add]).
    fn layer(scale: bool, extra: bool) -> (Graph, [NodeId; 3]) {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![8, 32]);
        let w = g.add_input("w", vec![32, 16]);
        let a = g.add_input("a", vec![32, 4]);
        let b = g.add_input("b", vec![4, 16]);
        let s = g.add_input("s", vec![1]);
        let mut add = |op: Op, ins: &[NodeId], name: &str| g.add(op, ins, name, name).unwrap();
        let base = add(Op::MatMul, &[x, w], "base");
        let xa = add(Op::MatMul, &[x, a], "xa");
        let up = add(Op::MatMul, &[xa, b], "up");
        let low = match scale {
            true => add(Op::Binary(Binary::Mul), &[up, s], "low"),
            false => up,
        };
        let out = add(Op::Binary(Binary::Add), &[low, base], "out");
        let y = add(Op::Unary(unary::RELU), &[out], "y");
        if extra {
            let e = add(Op::Unary(unary::EXP), &[base], "e");
            g.add_output("e", e);
        }
        g.add_output("y", y);
        (g.finish(), [base, up, out])
    }

    fn seed_of(graph: &Graph, p1: NodeId) -> Option<Vec<NodeId>> {
        let live = schedule::live(graph);
        seed(graph, p1, &live, &HashSet::new(), |_| true)
    }

    #[test]
    fn a_base_product_and_its_low_rank_path_start_one_group() {
        for scale in [false, true] {
            let (g, [base, up, out]) = layer(scale, false);
            let group = seed_of(&g, base).unwrap();
            assert_eq!(group.len(), if scale { 4 } else { 3 });
            assert_eq!(
                (group[0], group[1], *group.last().unwrap()),
                (base, up, out)
            );
            let live = schedule::live(&g);
            let second = summed(&g, &group, &live, &HashSet::new()).unwrap().unwrap();
            assert_eq!(second.product, up);
            assert_eq!(second.scale.is_some(), scale);
            assert_eq!(second.add, group.len() - 1);
            // The smaller product anchors nothing: the larger one takes it.
            assert_eq!(seed_of(&g, up), None);
        }
    }

    #[test]
    fn products_read_elsewhere_or_kept_are_not_summed() {
        let (g, [base, ..]) = layer(true, true);
        assert_eq!(seed_of(&g, base), None);
        // Taken by another group already.
        let (g, [base, up2, _]) = layer(true, false);
        let live = schedule::live(&g);
        assert_eq!(seed(&g, base, &live, &HashSet::new(), |n| n != up2), None);
        // A kept value (a graph output, a state's next value) is stored whatever reads it.
        let kept: HashSet<NodeId> = [base].into();
        assert_eq!(seed(&g, base, &live, &kept, |_| true), None);
    }

    #[test]
    fn a_malformed_sum_group_is_refused_with_a_reason() {
        let (g, [base, up, out]) = layer(true, false);
        let live = schedule::live(&g);
        let none = HashSet::new();
        // The scale's Mul missing between the second product and the add.
        let skipped = [base, up, out];
        assert!(matches!(summed(&g, &skipped, &live, &none), Some(Err(_))));
        // Not a sum at all: the second node is no product.
        let relu = g.consumers(out)[0];
        assert_eq!(summed(&g, &[out, relu], &live, &none), None);
    }
}
