//! Recomputing cheap activations in the backward pass instead of keeping them.
//!
//! A training step keeps each forward value that a gradient reads until the backward pass gets
//! there. Where such a value `t` is an element-wise function of another value `s` of its size
//! that the backward pass reads anyway, and otherwise only of small broadcast operands (a bias,
//! a per-column scale), keeping both is a waste: `t`'s backward readers can compute it again
//! from `s`. DoRA's layers are the case this is for: the magnitude's gradient reads the layer's
//! unscaled output `u`, and the next layer reads the activation `relu(g * u + b)`, which LoRA
//! keeps alone. Recomputed, the activation's buffer is free after the forward pass's last
//! reader, and DoRA keeps `u` where LoRA keeps the activation.
//!
//! The pass recomputes `t` only where a product reads it in the backward pass (the next layer's
//! gradient products) and its other backward readers are element-wise at `t`'s size: the code
//! generator computes their copy in their kernel (a side operand of an epilogue), so the copy
//! costs loads of the small operands, not a kernel of its own. (Values that only element-wise
//! gradients read, such as the pieces of GELU or of a gated MLP, are left kept: their
//! gradients' kernels are laid out around them, and copies cost kernels there; see
//! `codegen::undo_unhosted_recomputations` for the copies that still find no kernel.) Each
//! product that reads `t` (directly or through a transpose) gets a copy of its own, which the
//! code generator computes as the product loads that operand (an operand prologue): the copy
//! is then never stored at all. With `lean` (what `dorac train` does unless
//! `--store-activations`), where only products read `t` in the forward pass too (the next layer
//! of an MLP), they get copies of their own as well, and `t` is not stored even there: DoRA then
//! keeps `u` where LoRA keeps the activation, and nothing beside it. The forward products then
//! load `u` and the per-column scale and bias instead of `t` (the latter once per column, see
//! `codegen::kernels::ColumnLoads`), and skip writing `t`: on lavapipe at the train bench's
//! shape the step is 2 to 3% faster than with `t` stored.

use crate::error::Result;
use crate::ir::{Graph, NodeId, Op, Patch, PatchRef};
use crate::tensor::numel;
use std::collections::{HashMap, HashSet};

/// Most element-wise nodes one recomputation repeats (a scale, a bias and an activation take 3).
const MAX_RECIPE: usize = 4;

/// An operand at most this fraction of `t`'s elements is small: kept anyway or cheap to keep.
const SMALL_FRACTION: usize = 8;

/// Gives the readers in `backward` of each forward value that qualifies (module docs) a copy
/// computed from the value it is recomputed from; returns how many values were recomputed.
/// Values are decided operands first, so a recomputed value is never the kept source of
/// another (that one is computed from its source too, sharing the copies). With
/// `forward_products`, forward readers that are all products get copies of their own too.
pub fn recompute_activations(
    graph: &mut Graph,
    backward: &HashSet<NodeId>,
    forward_products: bool,
) -> Result<usize> {
    let mut recomputed: HashSet<NodeId> = HashSet::new();
    let read_late = |n: NodeId| graph.consumers(n).iter().any(|c| backward.contains(c));
    let mut plans = vec![];
    for t in graph.topo_order()? {
        if backward.contains(&t) || !is_cheap_elementwise(&graph.node(t).op) {
            continue;
        }
        let mut late: Vec<NodeId> = graph
            .consumers(t)
            .into_iter()
            .filter(|c| backward.contains(c))
            .collect();
        late.sort();
        late.dedup();
        // Products compute their copies as they load them; element-wise readers of `t`'s size
        // compute theirs in their kernels. At least one product: what GELU's or a gated MLP's
        // pieces feed is element-wise gradients alone, laid out around the kept values.
        let size = numel(graph.shape(t));
        let hosted = late.iter().all(|&c| {
            let node = graph.node(c);
            reads_as_product(graph, c)
                || (matches!(node.op, Op::Unary(_) | Op::Binary(_) | Op::UnaryGrad(_))
                    && numel(&node.shape) == size)
        });
        let multiplied = late.iter().any(|&c| reads_as_product(graph, c));
        if !hosted || !multiplied {
            continue;
        }
        let kept = |n: NodeId| read_late(n) && !recomputed.contains(&n);
        if let Some(recipe) = recipe(graph, t, &kept) {
            recomputed.insert(t);
            plans.push((t, recipe, late));
        }
    }
    if plans.is_empty() {
        return Ok(0);
    }
    let mut p = Patch::new(graph);
    // Copies shared by the element-wise readers (a chain's copies feed the next value's).
    let mut shared: HashMap<NodeId, PatchRef> = HashMap::new();
    for (t, recipe, late) in &plans {
        let (mut products, others): (Vec<NodeId>, Vec<NodeId>) =
            late.iter().partition(|&&c| reads_as_product(graph, c));
        // Where the forward pass only multiplies by `t` (the next layer's products), its
        // products may compute their own copies too, and `t` is then never stored.
        let mut early = graph.consumers(*t);
        early.retain(|c| !late.contains(c));
        early.sort();
        early.dedup();
        if forward_products && early.iter().all(|&c| reads_as_product(graph, c)) {
            products.extend(early);
        }
        if !others.is_empty() {
            copy(&mut p, graph, recipe, &mut shared)?;
            p.replace_for(*t, shared[t], others);
        }
        // Each product gets a copy of its own, which it can compute as it loads the operand.
        for reader in products {
            let mut own = HashMap::new();
            copy(&mut p, graph, recipe, &mut own)?;
            p.replace_for(*t, own[t], vec![reader]);
        }
    }
    graph.apply(p.finish());
    Ok(plans.len())
}

/// Adds a copy of each node of `recipe` that `copies` has none of yet, reading the copies of
/// its inputs where there are some, and marks it recomputed.
fn copy(
    p: &mut Patch,
    graph: &Graph,
    recipe: &[NodeId],
    copies: &mut HashMap<NodeId, PatchRef>,
) -> Result<()> {
    for &n in recipe {
        if copies.contains_key(&n) {
            continue;
        }
        let node = graph.node(n);
        let inputs: Vec<PatchRef> = graph
            .inputs_of(n)
            .into_iter()
            .map(|i| copies.get(&i).copied().unwrap_or(PatchRef::Old(i)))
            .collect();
        let name = format!("{}/recomputed", node.name);
        let label = format!("{}/recomputed", node.label);
        let copy = p.add(node.op.clone(), &inputs, &name, &label)?;
        p.mark_recomputed(copy, n);
        copies.insert(n, copy);
    }
    Ok(())
}

/// A product, or a transpose that only products read (the code generator reads it in place).
fn reads_as_product(graph: &Graph, n: NodeId) -> bool {
    let product = |n: NodeId| matches!(graph.node(n).op, Op::MatMul | Op::Gemm { .. });
    match graph.node(n).op {
        Op::Transpose { .. } => {
            let readers = graph.consumers(n);
            !readers.is_empty() && readers.into_iter().all(product)
        }
        _ => product(n),
    }
}

/// Element-wise ops that are worth repeating rather than keeping: unary and binary arithmetic.
fn is_cheap_elementwise(op: &Op) -> bool {
    matches!(op, Op::Unary(_) | Op::Binary(_))
}

/// The nodes that compute `t` again, operands before readers and `t` last: element-wise nodes
/// of `t`'s size over exactly one `kept` value of that size and small operands. None when `t`
/// is no such function or needs more than [`MAX_RECIPE`] nodes.
fn recipe(graph: &Graph, t: NodeId, kept: &dyn Fn(NodeId) -> bool) -> Option<Vec<NodeId>> {
    struct Walk<'a> {
        graph: &'a Graph,
        t: NodeId,
        size: usize,
        kept: &'a dyn Fn(NodeId) -> bool,
        nodes: Vec<NodeId>,
        sources: HashSet<NodeId>,
    }
    impl Walk<'_> {
        fn visit(&mut self, n: NodeId) -> Option<()> {
            if self.nodes.contains(&n) || self.sources.contains(&n) {
                return Some(());
            }
            let node = self.graph.node(n);
            let elements = numel(&node.shape);
            if n != self.t && elements == self.size && (self.kept)(n) {
                self.sources.insert(n);
                return Some(());
            }
            if n != self.t && elements * SMALL_FRACTION <= self.size {
                return Some(());
            }
            if elements != self.size || !is_cheap_elementwise(&node.op) {
                return None;
            }
            for i in self.graph.inputs_of(n) {
                self.visit(i)?;
            }
            self.nodes.push(n);
            (self.nodes.len() <= MAX_RECIPE).then_some(())
        }
    }
    let mut walk = Walk {
        graph,
        t,
        size: numel(graph.shape(t)),
        kept,
        nodes: vec![],
        sources: HashSet::new(),
    };
    walk.visit(t)?;
    (walk.sources.len() == 1).then_some(walk.nodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Binary, GraphBuilder};
    use crate::ops::unary;
    use crate::tensor::Tensor;

    fn add(g: &mut GraphBuilder, op: Op, inputs: &[NodeId], name: &str) -> NodeId {
        g.add(op, inputs, name, name).unwrap()
    }

    /// `h = relu(u * g + b)`, read by a forward node and, like `u`, by backward nodes: two
    /// element-wise ones and a product.
    fn layer() -> (Graph, HashSet<NodeId>, [NodeId; 3]) {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![8, 4]);
        let u = add(&mut g, Op::Unary(unary::NEG), &[x], "u");
        let scale = g.add_const("g", Tensor::f32(vec![4], vec![1.5; 4]));
        let bias = g.add_const("b", Tensor::f32(vec![4], vec![0.5; 4]));
        let scaled = add(&mut g, Op::Binary(Binary::Mul), &[u, scale], "scaled");
        let out = add(&mut g, Op::Binary(Binary::Add), &[scaled, bias], "out");
        let h = add(&mut g, Op::Unary(unary::RELU), &[out], "h");
        let next = add(&mut g, Op::Unary(unary::EXP), &[h], "next");
        let dy = g.add_input("dy", vec![8, 4]);
        let mask = add(&mut g, Op::Binary(Binary::Mul), &[dy, h], "mask");
        let term = add(&mut g, Op::Binary(Binary::Mul), &[mask, u], "term");
        let wide = add(&mut g, Op::Binary(Binary::Sub), &[term, h], "wide");
        let w = g.add_input("w0", vec![4, 3]);
        let prod = add(&mut g, Op::MatMul, &[h, w], "prod");
        g.add_output("next", next);
        g.add_output("wide", wide);
        g.add_output("prod", prod);
        (g.finish(), [mask, term, wide, prod].into(), [h, mask, wide])
    }

    #[test]
    fn backward_readers_of_an_activation_recompute_it_from_the_kept_value() {
        let (mut graph, backward, [h, mask, wide]) = layer();
        assert_eq!(
            recompute_activations(&mut graph, &backward, false).unwrap(),
            1
        );
        let copy = graph.inputs_of(mask)[1];
        assert_ne!(copy, h);
        assert_eq!(graph.node(copy).name, "h/recomputed");
        // Scale, bias and relu for the element-wise readers, and again for the product.
        assert_eq!(graph.recomputed().len(), 6);
        assert_eq!(graph.inputs_of(wide)[1], copy);
        // The forward reader keeps the original; the copy repeats scale, bias and relu on `u`.
        assert_eq!(graph.consumers(h).len(), 1);
        let out = graph.inputs_of(copy)[0];
        let scaled = graph.inputs_of(out)[0];
        assert_eq!(graph.node(scaled).name, "scaled/recomputed");
        assert_eq!(graph.node(graph.inputs_of(scaled)[0]).name, "u");
    }

    #[test]
    fn each_product_reading_an_activation_gets_a_copy_of_its_own() {
        let (mut graph, mut backward, [h, mask, wide]) = layer();
        let mut p = Patch::new(&graph);
        let w = p.input("w", vec![8, 4], crate::tensor::DType::F32).unwrap();
        let prods = ["p1", "p2"].map(|name| {
            let t = Op::Transpose { perm: vec![1, 0] };
            let x_t = p.add(t, &[w], &format!("{name}_t"), name).unwrap();
            p.add(Op::MatMul, &[x_t, h.into()], name, name).unwrap()
        });
        for (name, &r) in ["p1", "p2"].iter().zip(&prods) {
            p.add_output(name, r);
        }
        let applied = graph.apply(p.finish());
        backward.extend(applied.ids().iter().copied());
        assert_eq!(
            recompute_activations(&mut graph, &backward, false).unwrap(),
            1
        );
        let shared = graph.inputs_of(mask)[1];
        assert_eq!(graph.inputs_of(wide)[1], shared);
        let copies: Vec<NodeId> = prods
            .iter()
            .map(|&r| graph.inputs_of(applied.id(r))[1])
            .collect();
        assert!(copies[0] != shared && copies[1] != shared && copies[0] != copies[1]);
        // Three nodes each: the shared copy and the three products' own.
        assert_eq!(graph.recomputed().len(), 12);
    }

    /// `h = relu(u)`, `u = -x`, on a fresh builder.
    fn relu_of_neg() -> (GraphBuilder, NodeId, NodeId) {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![8, 4]);
        let u = add(&mut g, Op::Unary(unary::NEG), &[x], "u");
        let h = add(&mut g, Op::Unary(unary::RELU), &[u], "h");
        (g, u, h)
    }

    #[test]
    fn values_without_a_kept_source_or_a_product_reader_are_kept() {
        // Nothing in the backward pass reads `u`: `h` has no kept source (and no product
        // reads it late either).
        let (mut g, _, h) = relu_of_neg();
        let dy = g.add_input("dy", vec![8, 4]);
        let mask = add(&mut g, Op::Binary(Binary::Mul), &[dy, h], "mask");
        g.add_output("mask", mask);
        let mut graph = g.finish();
        assert_eq!(
            recompute_activations(&mut graph, &[mask].into(), false).unwrap(),
            0
        );
        // `u` is read late and an element-wise node reads `h` late, but no product does: the
        // gradients of GELU's or a gated MLP's pieces, left as they are.
        let (mut g, u, h) = relu_of_neg();
        let dy = g.add_input("dy", vec![8, 4]);
        let mask = add(&mut g, Op::Binary(Binary::Mul), &[dy, h], "mask");
        let term = add(&mut g, Op::Binary(Binary::Mul), &[mask, u], "term");
        g.add_output("term", term);
        let mut graph = g.finish();
        let backward = [mask, term].into();
        let none = recompute_activations(&mut graph, &backward, false).unwrap();
        assert_eq!(none, 0);
    }

    #[test]
    fn an_activation_only_a_product_reads_late_is_recomputed_for_it() {
        let (mut g, u, h) = relu_of_neg();
        let w = g.add_input("w", vec![4, 8]);
        let prod = add(&mut g, Op::MatMul, &[w, h], "prod");
        let back = add(&mut g, Op::Unary(unary::EXP), &[u], "back");
        g.add_output("prod", prod);
        g.add_output("back", back);
        let mut graph = g.finish();
        let backward = [prod, back].into();
        let one = recompute_activations(&mut graph, &backward, false).unwrap();
        assert_eq!(one, 1);
        // The product's own copy; no shared one, which nothing would read.
        assert_eq!(graph.recomputed().len(), 1);
        assert_eq!(graph.node(graph.inputs_of(prod)[1]).name, "h/recomputed");
    }
}
