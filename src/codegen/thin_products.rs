//! Thin products, turned for a CPU driver. The row-broadcast matmul kernel that lavapipe runs
//! (`shaders/matmul_columns.wgsl`) gives each SIMD lane columns of its own, so a product with
//! few columns and many rows leaves most lanes idle: DoRA's `W0 Aᵀ` (out x r) in the exact norm
//! gradient, `x Aᵀ` and its gradient `dY B` over a batch of tokens. Computed as
//! `(Aᵀᵀ W0ᵀ)ᵀ = (A W0ᵀ)ᵀ`, the same product has few rows and many columns, which that kernel
//! runs well (measured on lavapipe, 2 cores: 512 x 512 x 16 at 3.2 GFLOP/s, turned 7.3 to 15.5
//! over three runs; in the DoRA training step, 1.9 ms turned into 0.75; `dY B` of a batch of
//! 128, 0.305 ms a layer, 0.160 turned). Every transpose this leaves is read in place by the
//! kernels around it (`codegen::fusion`), so none costs a kernel. Only for CPU targets: a GPU's
//! tiled kernels take thin products as they are.
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
/// ...at least this many rows...
///
/// `x Aᵀ` of a batch of 128 rows, 512 terms and rank 16 ran 0.31 ms a layer as it is (16
/// columns over 8 lanes of 4: half the lanes idle) and 0.12 to 0.2 ms turned. Unmerged DoRA
/// inference of four such layers took 11.95 ms against 10.2 for the base model; turned, 10.97.
const MIN_ROWS: usize = 128;
/// ...and at least this many terms per dot product make a product thin.
///
/// Fewer terms leave the adapter's `dB = dYᵀ (x Aᵀ)` over a batch of 128 as it is. Turned, its
/// AdamW update is no longer its epilogue but a kernel of its own: in the train bench's profile
/// the four turned products took 0.65 ms and their updates 0.53 more, against 1.13 for the
/// products with the update fused, and the step took 4 kernels more.
const MIN_TERMS: usize = 256;

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

/// A 2-D MatMul of at least MIN_ROWS rows, MIN_TERMS terms and at most MAX_COLUMNS columns,
/// not kept, whose readers can all read its transposed value in place or are its transpose (the
/// turned product itself: the adapter's `dY B` read as `(dY B)ᵀ` by `dA`).
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
        && k >= MIN_TERMS
        && cols <= MAX_COLUMNS
        && !kept
        && graph
            .consumers(n)
            .iter()
            .all(|&c| reads_in_place(graph, c, n) || is_transpose(graph, c))
}

/// True when `n` is a transpose of a matrix.
fn is_transpose(graph: &Graph, n: NodeId) -> bool {
    matches!(&graph.node(n).op, Op::Transpose { perm } if perm[..] == [1, 0])
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
        for c in graph.consumers(n) {
            if is_transpose(graph, c) {
                p.replace(c, turned);
            }
        }
        Ok(Some(p.finish()))
    }
}
