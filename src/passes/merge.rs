//! Merge: fold each adapter into its base weight, `W' = (W0 + dW) * g` (DoRA) or `W0 + dW`
//! (LoRA), and put the layer's original op back. The result is the base graph with new weights
//! and nothing more, so merged inference costs exactly what the base model costs.

use crate::error::Result;
use crate::ir::{
    rewrite, AdaptedLayer, Graph, LinearKind, Method, NodeId, Patch, PatchOps, PatchRef, Rule,
};
use crate::tensor::Tensor;

/// Merges every adapter of the graph. Returns how many layers were merged.
pub fn merge_adapters(graph: &mut Graph) -> Result<usize> {
    rewrite(graph, &[&MergeAdapter])
}

struct MergeAdapter;

impl Rule for MergeAdapter {
    fn name(&self) -> &str {
        "merge_adapter"
    }

    fn apply(&self, graph: &Graph, node: NodeId) -> Result<Option<PatchOps>> {
        let Some(layer) = graph.adapters().iter().find(|a| a.output == node) else {
            return Ok(None);
        };
        let merged = merged_weight(graph, layer);
        let mut p = Patch::new(graph);
        let w = p.constant(&graph.node(layer.weight).name, merged);
        p.claim_name(w);
        let op = layer.kind.op();
        let mut inputs = layer.kind.operands(layer.x.into(), w).to_vec();
        inputs.extend(layer.bias.map(PatchRef::Old));
        let out_name = format!("{}_output_0", layer.base_label);
        let y = p.add(op, &inputs, &out_name, &layer.base_label)?;
        p.claim_name(y);
        p.replace(node, y);
        p.drop_adapter(&layer.module);
        Ok(Some(p.finish()))
    }
}

/// The merged weight in the layer's stored orientation. Computed in f64 from the exact
/// (materialised) norm: merging builds the [in, out] matrix anyway.
pub fn merged_weight(graph: &Graph, layer: &AdaptedLayer) -> Tensor {
    let (fin, fout) = (layer.in_features, layer.out_features);
    let (alpha, trans_b) = match layer.kind {
        LinearKind::MatMul | LinearKind::Embedding => (1.0, false),
        LinearKind::Gemm { alpha, trans_b, .. } => (alpha as f64, trans_b),
    };
    let v = effective_weight(graph, layer);
    // Back to storage: divide alpha out again so the layer's own op stays unchanged.
    let shape = graph.shape(layer.weight).to_vec();
    let data: Vec<f32> = (0..fin * fout)
        .map(|idx| {
            let (i, j) = if trans_b {
                (idx % fin, idx / fin)
            } else {
                (idx / fout, idx % fout)
            };
            (v[i * fout + j] / alpha) as f32
        })
        .collect();
    Tensor::f32(shape, data)
}

/// The layer's effective weight as the `[in, out]` matrix it multiplies by, in f64:
/// `V = alpha op(W0) + s (B A)^T` (LoRA), and for DoRA each column `j` scaled by
/// `g_j = m_j / ||V[:, j]||` (a zero column's norm reads as 1, as in the unmerged layer).
pub fn effective_weight(graph: &Graph, layer: &AdaptedLayer) -> Vec<f64> {
    let get = |n: NodeId| {
        graph
            .const_tensor(n)
            .expect("adapter tensors are constants")
            .to_f64()
    };
    let (a, b) = (get(layer.lora_a), get(layer.lora_b));
    let (fin, fout, r) = (layer.in_features, layer.out_features, layer.rank);
    let mut v = in_out_weight(&get(layer.weight), &layer.kind, fin, fout);
    let s = layer.scale();
    for i in 0..fin {
        for j in 0..fout {
            let dw: f64 = (0..r).map(|k| b[j * r + k] * a[k * fin + i]).sum();
            v[i * fout + j] += s * dw;
        }
    }
    if let (Method::Dora, Some(m)) = (layer.method, layer.magnitude) {
        let m = get(m);
        for j in 0..fout {
            let norm = (0..fin)
                .map(|i| v[i * fout + j].powi(2))
                .sum::<f64>()
                .sqrt();
            let g = if norm > 0.0 { m[j] / norm } else { m[j] };
            for i in 0..fin {
                v[i * fout + j] *= g;
            }
        }
    }
    v
}

/// A linear layer's stored weight as the `[in, out]` matrix its op multiplies by: Gemm's alpha
/// and transB applied (`alpha op(W)`), MatMul and embedding tables as stored.
pub fn in_out_weight(w: &[f64], kind: &LinearKind, fin: usize, fout: usize) -> Vec<f64> {
    let (alpha, trans_b) = match kind {
        LinearKind::MatMul | LinearKind::Embedding => (1.0, false),
        LinearKind::Gemm { alpha, trans_b, .. } => (*alpha as f64, *trans_b),
    };
    let mut v = vec![0.0f64; fin * fout];
    for i in 0..fin {
        for j in 0..fout {
            let w0 = if trans_b {
                w[j * fin + i]
            } else {
                w[i * fout + j]
            };
            v[i * fout + j] = alpha * w0;
        }
    }
    v
}
