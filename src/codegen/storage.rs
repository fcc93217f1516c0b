//! Which constants live on the device other than as f32 values, and how kernels load them:
//! in half precision (`Graph::half_consts`), or as the block-quantized codes of a quantized
//! model (`Graph::blocked`, `ir::blocks`). A constant is stored so when every reader decodes as
//! it loads (`passes::half::read_only_as_weight`, the rule `--storage` rounds by too). The
//! readers that do are the ones that read weights: a MatMul's or Gemm's A or B (also through a
//! transpose read in place), `dora_norm_sq`'s W and a Gather's table (embeddings). A constant
//! read by anything else (an element-wise op, Gemm's C) or fetched as a graph output stays f32,
//! so every other kernel keeps reading `array<f32>`.
//!
//! A half buffer is an `array<u32>` of packed pairs, element `k` in the low (even `k`) or high
//! half of word `k / 2`; a block buffer an `array<u32>` of the packed codes, then each block's
//! scale and zero point as f32 bits. [`stored_load`] renders the decoding load
//! (`shaders/lib/half.wgsl`, `shaders/lib/blocks.wgsl`).

use crate::codegen::wgsl::u32_lit;
use crate::ir::{BlockFormat, Graph, NodeId, Op, Stored};
use crate::passes::half::{read_only_as_matrix, read_only_as_weight};
use std::collections::{BTreeMap, BTreeSet};

/// Floats added to each row of a padded matrix: one 64-byte cache line.
pub const ROW_PAD: usize = 16;

/// The f32 matrices stored with padded rows on a CPU driver, with their row pitch in elements.
///
/// The row-broadcast matmul (`matmul_columns.wgsl`) has every lane read 4 to 16 columns of B,
/// and where B is a weight read transposed (Gemm's transB, PyTorch's `[out, in]`) those are rows
/// of the weight, read side by side: 128 rows at once for a workgroup of 8 lanes. Rows whose
/// length in bytes is an even number of cache lines start in few of the L1 cache's sets (a 512-
/// float row: every 32nd set, so 128 rows share two sets of 8 lines), and evict each other before
/// a line's second half is read. A row one cache line longer starts in the next set over (33 lines
/// apart: all 64 sets). On lavapipe, 128 x 512 x 512 with B transposed: 2.65 ms as stored, 1.92
/// ms with rows of 528, as fast as B untransposed; DoRA's norm reads W's rows the same way.
///
/// Padded: 2-D constants whose rows are a multiple of 2 cache lines (32 floats) long, of at least
/// 32 rows, read only by products and DoRA norms (`read_only_as_matrix`, whose kernels take a
/// pitch) and by at least one of them across its rows (`read_across_rows`), not stored in half
/// precision, and still within `max_bytes` padded.
pub(crate) fn padded_rows(
    graph: &Graph,
    transposed: &BTreeSet<NodeId>,
    live: &BTreeSet<NodeId>,
    stored: &BTreeMap<NodeId, Stored>,
    max_bytes: u64,
) -> BTreeMap<NodeId, usize> {
    let is_reader = |c: NodeId| live.contains(&c);
    let in_place = |t: NodeId| transposed.contains(&t);
    (live.iter().copied())
        .filter(|&n| !stored.contains_key(&n))
        .filter(|&n| matches!(graph.node(n).op, Op::Const(_)))
        .filter_map(|n| match graph.shape(n) {
            &[rows, cols] if rows >= 32 && cols % 32 == 0 && cols > 0 => {
                let bytes = 4 * rows as u64 * (cols + ROW_PAD) as u64;
                (bytes <= max_bytes).then_some((n, cols))
            }
            _ => None,
        })
        .filter(|&(n, _)| read_only_as_matrix(graph, n, &is_reader, &in_place))
        .filter(|&(n, _)| read_across_rows(graph, n, live, transposed))
        .map(|(n, cols)| (n, cols + ROW_PAD))
        .collect()
}

/// True when some reader of the matrix `n` has its lanes read `n`'s rows side by side: a
/// product's B read transposed (Gemm's transB, or a Transpose read in place) or a DoRA norm's W
/// stored `[out, in]`. Read the other way, each lane reads along a row, the aliasing does not
/// arise, and padding costs: 128 x 768 x 3072 untransposed ran 37.5 GFLOP/s as stored, 33 with
/// rows of 3088, which straddle more pages.
fn read_across_rows(
    graph: &Graph,
    n: NodeId,
    live: &BTreeSet<NodeId>,
    transposed: &BTreeSet<NodeId>,
) -> bool {
    let b_slot = |c: NodeId, v: NodeId| graph.inputs_of(c).get(1) == Some(&v);
    graph.consumers(n).into_iter().any(|c| {
        live.contains(&c)
            && match &graph.node(c).op {
                Op::Gemm { trans_b, .. } => *trans_b && b_slot(c, n),
                Op::DoraNormSq(p) => p.weight_out_in,
                Op::Transpose { perm } if transposed.contains(&c) && perm[..] == [1, 0] => {
                    (graph.consumers(c).into_iter()).any(|r| {
                        live.contains(&r)
                            && matches!(
                                graph.node(r).op,
                                Op::MatMul | Op::Gemm { trans_b: false, .. }
                            )
                            && b_slot(r, c)
                    })
                }
                _ => false,
            }
    })
}

/// The constants stored other than as f32 values, with their format.
pub(crate) fn stored_consts(
    graph: &Graph,
    transposed: &BTreeSet<NodeId>,
    live: &BTreeSet<NodeId>,
) -> BTreeMap<NodeId, Stored> {
    let is_reader = |c: NodeId| live.contains(&c);
    let in_place = |t: NodeId| transposed.contains(&t);
    // `DORAC_F32_WEIGHTS=1` keeps quantized weights f32 on the device, to compare.
    let codes = std::env::var_os("DORAC_F32_WEIGHTS").is_none_or(|v| v == "0");
    (graph.half_consts().keys())
        .chain(graph.blocked().keys().filter(|_| codes))
        .copied()
        .filter(|&n| graph.contains(n) && live.contains(&n))
        .filter(|&n| matches!(graph.node(n).op, Op::Const(_)))
        .filter(|&n| read_only_as_weight(graph, n, &is_reader, &in_place))
        .filter_map(|n| Some((n, graph.stored(n)?)))
        .filter(|(_, s)| !matches!(s, Stored::Blocks(f) if !f.indexable()))
        .collect()
}

/// The WGSL expression loading element `index` (a u32 expression) of `binding` stored as
/// `storage` (`None`: f32). Half formats use `Lib::Half`, blocks `Lib::Blocks`.
pub(crate) fn stored_load(binding: &str, index: &str, storage: Option<Stored>) -> String {
    match storage {
        None => format!("{binding}[{index}]"),
        Some(Stored::Half(crate::ir::Half::F16)) => {
            format!("f16_at({binding}[({index}) >> 1u], {index})")
        }
        Some(Stored::Half(crate::ir::Half::Bf16)) => {
            format!("bf16_at({binding}[({index}) >> 1u], {index})")
        }
        Some(Stored::Blocks(f)) => blocks_load(binding, index, &f),
    }
}

/// Element `index` of a block-quantized constant: its code's word (codes in row-major order,
/// `bits` each), and its block's scale and zero point (`BlockFormat::device_block`).
fn blocks_load(binding: &str, index: &str, f: &BlockFormat) -> String {
    let (cols, block) = (u32_lit(f.cols as usize), u32_lit(f.block as usize));
    let place = match f.down_columns {
        true => format!("block_down({index}, {cols}, {block})"),
        false => format!(
            "block_along({index}, {cols}, {}, {block})",
            u32_lit(f.blocks as usize)
        ),
    };
    let bits = u32_lit(f.bits as usize);
    let zero = match f.zero_points {
        true => format!(
            "bitcast<f32>({binding}[{} + {place}])",
            u32_lit(f.zeros_at() as usize)
        ),
        false => format!("{:.1}", (1u32 << (f.bits - 1)) as f32),
    };
    format!(
        "block_value({binding}[(({index}) * {bits}) >> 5u], ({index}) * {bits}, {bits}, {zero}, \
         bitcast<f32>({binding}[{} + {place}]))",
        u32_lit(f.scales_at() as usize)
    )
}
