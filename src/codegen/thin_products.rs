//! Thin products, turned for a CPU driver. The row-broadcast matmul kernel that lavapipe runs
//! (`shaders/matmul_columns.wgsl`) gives each SIMD lane columns of its own, so a product with
//! few columns and many rows leaves most lanes idle: DoRA's `W0 Aᵀ` (out x r) in the exact norm
//! gradient, or `x Aᵀ` over a long batch of tokens. Computed as `(Aᵀᵀ W0ᵀ)ᵀ = (A W0ᵀ)ᵀ`, the
//! same product has few rows and many columns, which that kernel runs well (measured on
//! lavapipe, 2 cores: 512 x 512 x 16 at 3.2 GFLOP/s, turned 7.3 to 15.5 over three runs; in the
//! DoRA training step, 1.9 ms turned into 0.75). Every transpose
//! this leaves is read in place by the kernels around it (`codegen::fusion`), so none costs a
//! kernel. Only for CPU targets: a GPU's tiled kernels take thin products as they are.
//!
//! The rewrite undoes what `passes::simplify_transposes` prefers (a product, not a transpose of
//! one), so it runs last, on the graph about to be planned for such a device
//! (`runtime::Executable::compile`).

use super::fusion::reads_in_place;
use crate::error::Result;
use crate::ir::{rewrite, Graph, NodeId, Op, Patch, PatchOps, Rule};
use crate::passes::transpose::transposed;

/// At most this many columns...
const MAX_COLUMNS: usize = 32;
/// ...and at least this many rows (and this many terms per dot product) make a product thin.
const MIN_ROWS: usize = 256;

/// Rewrites every thin 2-D product `X Y` as `(Yᵀ Xᵀ)ᵀ` (module docs); returns how many.
pub fn turn_thin_products(graph: &mut Graph) -> Result<usize> {
    rewrite(graph, &[&TurnThinProduct])
}

/// True when `turn_thin_products` has something to do in `graph`.
pub fn has_thin_products(graph: &Graph) -> bool {
    graph
        .topo_order()
        .map(|order| order.into_iter().any(|n| is_thin(graph, n)))
        .unwrap_or(false)
}

/// A 2-D MatMul of at least MIN_ROWS rows and terms and at most MAX_COLUMNS columns, not kept,
/// whose readers can all read its transposed value in place.
fn is_thin(graph: &Graph, n: NodeId) -> bool {
    if !matches!(graph.node(n).op, Op::MatMul) {
        return false;
    }
    let ins = graph.inputs_of(n);
    let (a, b) = (graph.shape(ins[0]), graph.shape(ins[1]));
    let [m, k] = a[..] else { return false };
    let [_, cols] = b[..] else { return false };
    let kept = graph.outputs().iter().any(|&(_, o)| o == n)
        || graph.updates().iter().any(|&(_, next)| next == n);
    m >= MIN_ROWS
        && k >= MIN_ROWS
        && cols <= MAX_COLUMNS
        && !kept
        && graph
            .consumers(n)
            .iter()
            .all(|&c| reads_in_place(graph, c, n))
}

struct TurnThinProduct;

impl Rule for TurnThinProduct {
    fn name(&self) -> &str {
        "turn_thin_product"
    }

    fn apply(&self, graph: &Graph, n: NodeId) -> Result<Option<PatchOps>> {
        if !is_thin(graph, n) {
            return Ok(None);
        }
        let ins = graph.inputs_of(n);
        let node = graph.node(n);
        let (name, label) = (node.name.clone(), node.label.clone());
        let mut p = Patch::new(graph);
        let b_t = transposed(&mut p, graph, ins[1], &[1, 0], &format!("{name}.rhs_t"))?;
        let a_t = transposed(&mut p, graph, ins[0], &[1, 0], &format!("{name}.lhs_t"))?;
        let turned = p.add(Op::MatMul, &[b_t, a_t], &format!("{name}.turned"), &label)?;
        let back = p.add(Op::Transpose { perm: vec![1, 0] }, &[turned], &name, &label)?;
        p.replace(n, back);
        Ok(Some(p.finish()))
    }
}
