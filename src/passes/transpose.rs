//! Transpose simplification: moves transposes onto the operands of matrix products, where the
//! code generator reads them in place (`codegen::fusion`), and cancels the pairs this exposes.
//!
//! Autodiff writes the gradient of `x Aᵀ` with respect to A as `(xᵀ dY)ᵀ`: a transpose of a
//! product. Rewritten as `dYᵀ x` (with `xᵀᵀ = x`), no transpose is left to compute; the same
//! holds for a transpose of a transpose. Two rules, for a transpose `t` of value `p`:
//!
//! - `p` is a transpose: `t` becomes one transpose of `p`'s input by the composed permutation, or
//!   that input itself when the composition is the identity.
//! - `p` is a MatMul of operands of rank >= 2 read by `t` alone, and `t` swaps the last two axes
//!   and keeps the rest: `(P Q)ᵀ = Qᵀ Pᵀ`, with batch axes untouched, so broadcasting is too.

use crate::error::Result;
use crate::ir::{rewrite, Graph, NodeId, Op, Patch, PatchOps, PatchRef, Rule};

/// Applies the rules above until none matches; returns how many rewrites were made.
pub fn simplify_transposes(graph: &mut Graph) -> Result<usize> {
    let mut total = 0;
    // Each sweep can expose a pair for the next one (a product's new operand transposes); the
    // number of sweeps is bounded by the longest chain of products and transposes.
    loop {
        let n = rewrite(graph, &[&SimplifyTranspose])?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

struct SimplifyTranspose;

/// The permutation of a transpose node, if `n` is one.
fn perm_of(graph: &Graph, n: NodeId) -> Option<&[usize]> {
    match &graph.node(n).op {
        Op::Transpose { perm } => Some(perm),
        _ => None,
    }
}

/// True for the permutation that swaps the last two of its axes and keeps the others.
fn swaps_last_two(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2
        && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p)
}

/// `x` transposed by `perm` inside patch `p`: composed with `x`'s own transpose when it has
/// one, and `x`'s source itself when they cancel.
pub(crate) fn transposed(
    p: &mut Patch,
    graph: &Graph,
    x: NodeId,
    perm: &[usize],
    name: &str,
) -> Result<PatchRef> {
    if let Some(inner) = perm_of(graph, x) {
        let composed: Vec<usize> = perm.iter().map(|&d| inner[d]).collect();
        let src = graph.inputs_of(x)[0];
        if composed.iter().enumerate().all(|(i, &d)| i == d) {
            return Ok(src.into());
        }
        let label = graph.node(x).label.clone();
        return p.add(
            Op::Transpose { perm: composed },
            &[src.into()],
            name,
            &label,
        );
    }
    let label = graph.node(x).label.clone();
    p.add(
        Op::Transpose {
            perm: perm.to_vec(),
        },
        &[x.into()],
        name,
        &label,
    )
}

impl Rule for SimplifyTranspose {
    fn name(&self) -> &str {
        "simplify_transpose"
    }

    fn apply(&self, graph: &Graph, t: NodeId) -> Result<Option<PatchOps>> {
        let Some(perm) = perm_of(graph, t) else {
            return Ok(None);
        };
        let src = graph.inputs_of(t)[0];
        let name = graph.node(t).name.clone();
        let mut p = Patch::new(graph);
        if perm_of(graph, src).is_some() {
            let new = transposed(&mut p, graph, src, perm, &name)?;
            p.replace(t, new);
            return Ok(Some(p.finish()));
        }
        let product = matches!(graph.node(src).op, Op::MatMul)
            && swaps_last_two(perm)
            && graph.consumers(src) == [t]
            && !graph.outputs().iter().any(|&(_, o)| o == src)
            && !graph.updates().iter().any(|&(_, next)| next == src);
        if !product {
            return Ok(None);
        }
        let ops = graph.inputs_of(src);
        let (a, b) = (ops[0], ops[1]);
        if graph.shape(a).len() < 2 || graph.shape(b).len() < 2 {
            return Ok(None);
        }
        let swap = |x: NodeId| {
            let mut q: Vec<usize> = (0..graph.shape(x).len()).collect();
            let r = q.len();
            q.swap(r - 2, r - 1);
            q
        };
        let b_t = transposed(&mut p, graph, b, &swap(b), &format!("{name}.rhs_t"))?;
        let a_t = transposed(&mut p, graph, a, &swap(a), &format!("{name}.lhs_t"))?;
        let label = graph.node(src).label.clone();
        let product = p.add(Op::MatMul, &[b_t, a_t], &name, &label)?;
        p.replace(t, product);
        Ok(Some(p.finish()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::GraphBuilder;
    use crate::reference;
    use crate::tensor::{relative_error, Array, Rng};
    use std::collections::HashMap;

    fn transpose(g: &mut GraphBuilder, x: NodeId, perm: &[usize], name: &str) -> NodeId {
        let op = Op::Transpose {
            perm: perm.to_vec(),
        };
        g.add(op, &[x], name, name).unwrap()
    }

    #[test]
    fn products_and_pairs_of_transposes_leave_no_transpose_to_compute() {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![2, 5, 3]);
        let dy = g.add_input("dy", vec![2, 5, 4]);
        let w = g.add_input("w", vec![3, 4]);
        // (xᵀ dy)ᵀ, batched: becomes dyᵀ x.
        let x_t = transpose(&mut g, x, &[0, 2, 1], "x_t");
        let grad = g.add(Op::MatMul, &[x_t, dy], "grad", "grad").unwrap();
        let grad_t = transpose(&mut g, grad, &[0, 2, 1], "grad_t");
        // (wᵀ)ᵀ cancels; a 3-cycle composes into one transpose.
        let w_t = transpose(&mut g, w, &[1, 0], "w_t");
        let w_tt = transpose(&mut g, w_t, &[1, 0], "w_tt");
        let r = transpose(&mut g, x, &[1, 2, 0], "r");
        let rr = transpose(&mut g, r, &[1, 2, 0], "rr");
        for (name, n) in [("grad_t", grad_t), ("w_tt", w_tt), ("rr", rr)] {
            g.add_output(name, n);
        }
        let mut rng = Rng::new(3);
        let feeds: HashMap<String, Array> = [
            ("x", vec![2, 5, 3]),
            ("dy", vec![2, 5, 4]),
            ("w", vec![3, 4]),
        ]
        .into_iter()
        .map(|(n, s)| {
            let len = s.iter().product();
            (
                n.to_string(),
                Array::new(s, (0..len).map(|_| rng.normal()).collect()),
            )
        })
        .collect();
        let mut g = g.finish();
        let before = reference::run(&g, &feeds).unwrap();
        assert!(simplify_transposes(&mut g).unwrap() >= 3);
        let after = reference::run(&g, &feeds).unwrap();
        for name in ["grad_t", "w_tt", "rr"] {
            assert_eq!(before[name].shape, after[name].shape, "{name}");
            assert!(
                relative_error(&after[name].data, &before[name].data) < 1e-12,
                "{name}"
            );
        }
        let node = |name: &str| g.node(g.outputs().iter().find(|o| o.0 == name).unwrap().1);
        assert!(matches!(node("grad_t").op, Op::MatMul));
        let transposes: Vec<&Op> = g
            .petgraph()
            .node_indices()
            .map(|n| &g.node(n).op)
            .filter(|op| matches!(op, Op::Transpose { .. }))
            .collect();
        // dyᵀ (read in place by the product) and the composed 3-cycle remain.
        assert_eq!(transposes.len(), 2, "{transposes:?}");
        assert_eq!(g.outputs()[1].1, w, "w_tt is w itself");
    }
}
