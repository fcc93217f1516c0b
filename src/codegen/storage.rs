//! Which constants live on the device in half precision (`Graph::half_consts`): those whose
//! every reader decodes 16-bit values as it loads them (`passes::half::read_only_as_weight`,
//! the rule `--storage` rounds by too). The readers that do are the ones that read weights: a MatMul's or Gemm's A or B (also through a transpose read in place),
//! `dora_norm_sq`'s W and a Gather's table (embeddings). A constant read by anything else (an
//! element-wise op, Gemm's C) or fetched as a graph output stays f32, so every other kernel
//! keeps reading `array<f32>`.
//!
//! A half buffer is an `array<u32>` of packed pairs, element `k` in the low (even `k`) or high
//! half of word `k / 2`; [`half_load`] renders the decoding load (`shaders/lib/half.wgsl`).

use crate::ir::{Graph, Half, NodeId, Op};
use crate::passes::half::read_only_as_weight;
use std::collections::{BTreeMap, BTreeSet};

/// The constants stored in half precision, with their format.
pub(crate) fn half_stored(
    graph: &Graph,
    transposed: &BTreeSet<NodeId>,
    live: &BTreeSet<NodeId>,
) -> BTreeMap<NodeId, Half> {
    let is_reader = |c: NodeId| live.contains(&c);
    let in_place = |t: NodeId| transposed.contains(&t);
    graph
        .half_consts()
        .iter()
        .filter(|&(&n, _)| graph.contains(n) && live.contains(&n))
        .filter(|&(&n, _)| matches!(graph.node(n).op, Op::Const(_)))
        .filter(|&(&n, _)| read_only_as_weight(graph, n, &is_reader, &in_place))
        .map(|(&n, &h)| (n, h))
        .collect()
}

/// The WGSL expression loading element `index` (a u32 expression) of `binding` stored as
/// `storage` (`None`: f32). Half formats use `Lib::Half`.
pub(crate) fn half_load(binding: &str, index: &str, storage: Option<Half>) -> String {
    match storage {
        None => format!("{binding}[{index}]"),
        Some(Half::F16) => format!("f16_at({binding}[({index}) >> 1u], {index})"),
        Some(Half::Bf16) => format!("bf16_at({binding}[({index}) >> 1u], {index})"),
    }
}
