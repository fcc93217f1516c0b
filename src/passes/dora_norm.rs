//! Training's fused DoRA norm: replaces each DoRA layer's factored squared norm (four products,
//! two reductions and the scalar algebra that joins them, see `adapter_insert`) by one
//! [`Op::DoraNormSq`] node over W0, A and B, which the code generator runs as one kernel with
//! the magnitude scale as its epilogue. Inference does not need it: there A, B and m are
//! constants and the whole norm folds away. Export never sees it: only training graphs, which
//! are compiled and not written, go through this pass.

use crate::error::Result;
use crate::ir::{Graph, LinearKind, Method, Op, Patch, PatchRef};
use crate::ops::DoraNorm;

/// Replaces the recorded factored norm of every DoRA layer; returns how many were replaced.
pub fn fuse_dora_norms(graph: &mut Graph) -> Result<usize> {
    let layers: Vec<_> = graph
        .adapters()
        .iter()
        .filter(|a| a.method == Method::Dora)
        .cloned()
        .collect();
    let mut fused = 0;
    for layer in layers {
        let Some(old) = layer.norm_sq.filter(|&n| graph.contains(n)) else {
            continue;
        };
        if matches!(graph.node(old).op, Op::DoraNormSq(_)) {
            continue;
        }
        let (alpha, weight_out_in) = match layer.kind {
            LinearKind::Gemm { alpha, trans_b, .. } => (alpha, trans_b),
            LinearKind::MatMul | LinearKind::Embedding => (1.0, false),
        };
        let op = Op::DoraNormSq(DoraNorm {
            alpha,
            scale: layer.scale() as f32,
            weight_out_in,
        });
        let mut p = Patch::new(graph);
        let inputs = [layer.weight, layer.lora_a, layer.lora_b].map(PatchRef::Old);
        let node = graph.node(old);
        let new = p.add(op, &inputs, &node.name, &node.label)?;
        if p.shape(new) != graph.shape(old) {
            // Not the layer the record describes: keep the factored form.
            continue;
        }
        p.claim_name(new);
        p.replace(old, new);
        p.drop_adapter(&layer.module);
        let mut record = layer.clone().map(PatchRef::Old);
        record.norm_sq = Some(new);
        p.record_adapter(record);
        graph.apply(p.finish());
        fused += 1;
    }
    graph.remove_dead();
    Ok(fused)
}
