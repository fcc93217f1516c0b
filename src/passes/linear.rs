//! Linear layers and their module names.
//!
//! PEFT addresses layers by PyTorch module path (`encoder.layer.0.attention.self.query`).
//! ONNX exports keep that path in one of two places: the weight initializer's name
//! (`layers.0.weight`, when the exporter kept the parameter as is) or the node's scope name
//! (`/blocks.0/fc/MatMul`, when the weight was transposed into an anonymous initializer).

use crate::ir::{Graph, LinearKind, NodeId, Op};
use crate::tensor::DType;
use std::collections::HashMap;

/// A MatMul or Gemm whose weight is a 2-D float constant, or a Gather of rows of one by runtime
/// ids (an embedding): a candidate for an adapter.
#[derive(Clone, Debug)]
pub struct LinearLayer {
    pub node: NodeId,
    pub module: String,
    pub kind: LinearKind,
    pub x: NodeId,
    pub weight: NodeId,
    pub bias: Option<NodeId>,
    pub in_features: usize,
    pub out_features: usize,
}

impl LinearLayer {
    /// Embeddings are adapted only when named: a default target list ("every linear layer")
    /// leaves them out, as PEFT's defaults do.
    pub fn is_embedding(&self) -> bool {
        self.kind == LinearKind::Embedding
    }
}

/// Every linear layer of the graph in topological order, with unique module names. Layers that
/// already carry an adapter are not listed again.
pub fn find_linear_layers(graph: &Graph) -> Vec<LinearLayer> {
    let adapted_weights: Vec<NodeId> = graph.adapters().iter().map(|a| a.weight).collect();
    let order = graph.topo_order().unwrap_or_default();
    let mut layers = vec![];
    for n in order {
        let inputs = graph.inputs_of(n);
        let Some(kind) = LinearKind::of(&graph.node(n).op) else {
            continue;
        };
        let [x, w] = kind.operands(inputs[0], inputs[1]);
        // An embedding looks up runtime ids (a lookup of constant ids is folded away).
        if kind == LinearKind::Embedding && graph.node(x).dtype.is_float() {
            continue;
        }
        let wnode = graph.node(w);
        let is_weight =
            matches!(wnode.op, Op::Const(_)) && wnode.dtype == DType::F32 && wnode.shape.len() == 2;
        // A product of two constants is not a layer (the DoRA norm's `A W0` is one).
        if !is_weight || matches!(graph.node(x).op, Op::Const(_)) || adapted_weights.contains(&w) {
            continue;
        }
        let trans_b = matches!(kind, LinearKind::Gemm { trans_b: true, .. });
        let (in_features, out_features) = if trans_b {
            (wnode.shape[1], wnode.shape[0])
        } else {
            (wnode.shape[0], wnode.shape[1])
        };
        if let LinearKind::MatMul = kind {
            // x @ W needs x's last dim to be `in`; 1-D x is a vector-matrix product, still linear.
            if graph.shape(x).last() != Some(&in_features) {
                continue;
            }
        }
        layers.push(LinearLayer {
            node: n,
            module: module_name(graph, n, w),
            kind,
            x,
            weight: w,
            bias: inputs.get(2).copied(),
            in_features,
            out_features,
        });
    }
    // Two products in one module (rare for weights) get distinct names.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for l in layers.iter_mut() {
        let count = seen.entry(l.module.clone()).or_insert(0);
        if *count > 0 {
            l.module = format!("{}_{}", l.module, count);
        }
        *count += 1;
    }
    layers
}

/// The PyTorch module path of a linear node.
fn module_name(graph: &Graph, node: NodeId, weight: NodeId) -> String {
    let wname = &graph.node(weight).name;
    // onnxruntime-genai's model builder names a weight after its node: `<module>.MatMul.weight`.
    let module = wname
        .strip_suffix(".MatMul.weight")
        .or_else(|| wname.strip_suffix(".weight"));
    if let Some(m) = module {
        if !m.is_empty() && !m.contains("::") && !m.contains('/') {
            return m.to_string();
        }
    }
    let label = &graph.node(node).label;
    if let Some(m) = module_from_scope(label) {
        return m;
    }
    // torch.export-based exports name nodes `node_MatMul_49` and weights `val_50`; the bias
    // added right after the product still carries the parameter name `<module>.bias`.
    for consumer in graph.consumers(node) {
        if !matches!(graph.node(consumer).op, Op::Binary(crate::ir::Binary::Add)) {
            continue;
        }
        for i in graph.inputs_of(consumer) {
            if let Some(m) = graph.node(i).name.strip_suffix(".bias") {
                if matches!(graph.node(i).op, Op::Const(_)) && !m.contains("::") && !m.is_empty() {
                    return m.to_string();
                }
            }
        }
    }
    label
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `/a/b.0/c/MatMul` -> `a.b.0.c`. A Sequential's children appear as `/layers/layers.0/...`:
/// a component that extends the path so far by `.<index>` replaces the last component.
pub fn module_from_scope(label: &str) -> Option<String> {
    if !label.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = label.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() < 2 {
        return None;
    }
    let mut path: Vec<String> = vec![];
    for part in &parts[..parts.len() - 1] {
        match path.last() {
            Some(last) if part.starts_with(&format!("{last}.")) => {
                *path.last_mut().unwrap() = part.to_string();
            }
            _ => path.push(part.to_string()),
        }
    }
    Some(path.join("."))
}

/// PEFT's `target_modules` rule for one name: an exact match, or a suffix that starts at a
/// component boundary (`query` matches `encoder.layer.0.attention.self.query`, not `subquery`).
pub fn matches_target(module: &str, pattern: &str) -> bool {
    module == pattern || module.ends_with(&format!(".{pattern}"))
}

/// How an adapter's module name finds one of the model's: PEFT's `target_modules` rule
/// applied to a single name. The whole name, or else the one model module that ends with it at a
/// `.` boundary: an export that wraps the Hugging Face model in a module prefixes every path
/// (`m.transformer.layer.0.attention.q_lin` for PEFT's `transformer.layer.0.attention.q_lin`).
#[derive(Debug, PartialEq, Eq)]
pub enum ModuleMatch<'a> {
    Found(&'a str),
    /// Several model modules end with the name; listed for the error message.
    Ambiguous(Vec<&'a str>),
    /// None does; the closest names (sharing the longest suffix), for the error message.
    Missing(Vec<&'a str>),
}

pub fn resolve_module<'a>(name: &str, modules: &[&'a str]) -> ModuleMatch<'a> {
    if let Some(m) = modules.iter().find(|m| **m == name) {
        return ModuleMatch::Found(m);
    }
    let by_suffix: Vec<&str> = modules
        .iter()
        .copied()
        .filter(|m| matches_target(m, name))
        .collect();
    match by_suffix.len() {
        1 => ModuleMatch::Found(by_suffix[0]),
        0 => {
            let shared = |m: &str| {
                m.bytes()
                    .rev()
                    .zip(name.bytes().rev())
                    .take_while(|(a, b)| a == b)
                    .count()
            };
            let best = modules.iter().map(|m| shared(m)).max().unwrap_or(0);
            let close = modules
                .iter()
                .copied()
                .filter(|m| best > 0 && shared(m) == best)
                .take(3)
                .collect();
            ModuleMatch::Missing(close)
        }
        _ => ModuleMatch::Ambiguous(by_suffix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_find_wrapped_modules_by_a_unique_suffix() {
        let model = [
            "m.transformer.layer.0.attention.q_lin",
            "m.transformer.layer.1.attention.q_lin",
            "m.classifier",
        ];
        assert_eq!(
            resolve_module("transformer.layer.0.attention.q_lin", &model),
            ModuleMatch::Found("m.transformer.layer.0.attention.q_lin")
        );
        assert_eq!(
            resolve_module("m.classifier", &model),
            ModuleMatch::Found("m.classifier")
        );
        assert_eq!(
            resolve_module("attention.q_lin", &model),
            ModuleMatch::Ambiguous(vec![model[0], model[1]])
        );
        // Not at a component boundary.
        assert!(matches!(
            resolve_module("lassifier", &model),
            ModuleMatch::Missing(_)
        ));
        assert_eq!(
            resolve_module("transformer.layer.2.attention.q_lin", &model),
            ModuleMatch::Missing(vec![model[0], model[1]])
        );
    }

    #[test]
    fn scope_names_follow_pytorch_module_paths() {
        assert_eq!(
            module_from_scope("/blocks.0/fc/MatMul").unwrap(),
            "blocks.0.fc"
        );
        assert_eq!(
            module_from_scope("/layers/layers.0/Gemm").unwrap(),
            "layers.0"
        );
        assert_eq!(module_from_scope("/proj_in/MatMul").unwrap(), "proj_in");
        assert_eq!(
            module_from_scope("/bert/encoder/layer.0/attention/self/query/MatMul").unwrap(),
            "bert.encoder.layer.0.attention.self.query"
        );
        assert_eq!(module_from_scope("MatMul_3"), None);
    }

    #[test]
    fn targets_match_on_component_boundaries() {
        assert!(matches_target(
            "encoder.layer.0.attention.self.query",
            "query"
        ));
        assert!(matches_target("blocks.0.fc", "0.fc"));
        assert!(matches_target("head", "head"));
        assert!(!matches_target("subquery", "query"));
        assert!(!matches_target("blocks.0.fc", "c"));
    }
}
