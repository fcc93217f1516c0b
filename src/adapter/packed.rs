//! A Hugging Face model's adapter on onnxruntime-genai's export of that model.
//!
//! The model builder (`onnxruntime_genai.models.builder`, the `model.onnx` of the Hub's `*-onnx`
//! repositories) renames and packs the layers a PEFT adapter names:
//! - the attention module `self_attn` is `attn`, and its output projection (`o_proj`,
//!   `out_proj` or Phi's `dense`) is `o_proj`;
//! - `q_proj`, `k_proj` and `v_proj` become one `qkv_proj` whose output columns are
//!   `[q | k | v]`, k and v of equal width;
//! - a packed `gate_up_proj` (Phi-3), `[gate | up]` along its outputs, becomes `gate_proj` and
//!   `up_proj`.
//!
//! Both packings are exact for LoRA and DoRA: every output column of a linear layer depends on
//! its own row of B (and DoRA's norm and magnitude are per column), so adapters of column
//! blocks stack into one adapter of the packed layer — A stacked, B block-diagonal with each
//! block's scale folded in, the magnitudes side by side — and one adapter of a packed layer
//! splits into one per block, A shared. A block with no adapter gets B = 0 and, for DoRA, its
//! base columns' norms as magnitude, which is the base layer's output. Blocks that share one A
//! keep it, and a packed q/k/v adapter is saved as its blocks again (`super::save`), A shared,
//! so that PEFT loads it on the Hugging Face model.

use super::{LayerTensors, PeftConfig};
use crate::ir::{Graph, PackedBlock};
use crate::passes::{base_magnitude, resolve_module, LinearLayer, ModuleMatch};
use crate::tensor::{shape_str, Array};
use std::borrow::Cow;

/// Where one of the adapter's modules goes in the model: one layer under a builder name, or a
/// block of a packed layer.
pub(super) enum Place {
    Renamed(String),
    Qkv { packed: String, part: Qkv },
    GateUp { gate: String, up: String },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Qkv {
    Q,
    K,
    V,
}

/// One layer's adapter, ready to insert: under which name, on which of the model's layers.
pub(super) struct Resolved<'a> {
    /// The name the adapted layer keeps, and is saved under.
    pub name: String,
    /// The model's layer.
    pub layer: String,
    pub tensors: Cow<'a, LayerTensors>,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// For a packed layer's adapter: the PEFT modules its column blocks are saved as.
    pub blocks: Vec<PackedBlock>,
}

/// Where the builder put `module` (a Hugging Face module name), among the model's `names`;
/// None when no builder name of it is in the model.
pub(super) fn builder_place(module: &str, names: &[&str]) -> Option<Place> {
    let found = |name: &str| match resolve_module(name, names) {
        ModuleMatch::Found(m) => Some(m.to_string()),
        _ => None,
    };
    let parts: Vec<&str> = module.split('.').collect();
    let (leaf, parent) = parts.split_last()?;
    let in_attention = matches!(parent.last(), Some(&"self_attn") | Some(&"attn"));
    let parent: Vec<&str> = parent
        .iter()
        .map(|p| if *p == "self_attn" { "attn" } else { p })
        .collect();
    let under = |leaf: &str| [&parent[..], &[leaf]].concat().join(".");
    let leaf = match *leaf {
        "out_proj" | "dense" if in_attention => "o_proj",
        leaf => leaf,
    };
    if let Some(m) = found(&under(leaf)) {
        return Some(Place::Renamed(m));
    }
    let part = match leaf {
        "q_proj" => Some(Qkv::Q),
        "k_proj" => Some(Qkv::K),
        "v_proj" => Some(Qkv::V),
        _ => None,
    };
    if let (Some(part), true) = (part, in_attention) {
        return found(&under("qkv_proj")).map(|packed| Place::Qkv { packed, part });
    }
    if leaf == "gate_up_proj" {
        return Some(Place::GateUp {
            gate: found(&under("gate_proj"))?,
            up: found(&under("up_proj"))?,
        });
    }
    None
}

/// One adapter for the packed `layer` from the adapters of its q, k and v blocks.
pub(super) fn pack_qkv<'a>(
    graph: &Graph,
    layer: &LinearLayer,
    blocks: &[(Qkv, &str, &LayerTensors)],
    config: &PeftConfig,
) -> Result<Resolved<'a>, String> {
    let (total, fin) = (layer.out_features, layer.in_features);
    let packed = &layer.module;
    let width = |part| blocks.iter().find(|b| b.0 == part).map(|b| b.2.b.shape[0]);
    // k and v have the same width; q takes the rest.
    let kv = match (width(Qkv::K).or(width(Qkv::V)), width(Qkv::Q)) {
        (Some(kv), _) => kv,
        (None, Some(q)) if q < total && (total - q) % 2 == 0 => (total - q) / 2,
        (None, Some(q)) => {
            return Err(format!(
                "'{}': its q_proj has {q} outputs, which do not leave two equal k and v blocks \
                 in the {total} outputs of the model's packed '{packed}'",
                blocks[0].1
            ))
        }
        (None, None) => unreachable!("a packed layer is resolved for at least one block"),
    };
    if 2 * kv >= total {
        return Err(format!(
            "the k and v blocks ({kv} outputs each) leave no q block in the {total} outputs of \
             the model's packed '{packed}'"
        ));
    }
    let span = |part| match part {
        Qkv::Q => 0..total - 2 * kv,
        Qkv::K => total - 2 * kv..total - kv,
        Qkv::V => total - kv..total,
    };
    if let Some(twice) = blocks
        .iter()
        .find(|b| blocks.iter().filter(|c| c.0 == b.0).count() > 1)
    {
        return Err(format!(
            "two of the adapter's modules are the {:?} block of the model's packed \
             '{packed}' ('{}' is one)",
            twice.0, twice.1
        ));
    }
    for (_, module, t) in blocks {
        if t.a.shape[1] != fin {
            return Err(format!(
                "module '{module}': lora_A {} does not take the {fin} inputs of the model's \
                 packed '{packed}'",
                shape_str(&t.a.shape)
            ));
        }
    }
    // Blocks that share one A (an adapter of the packed layer, split when saved) keep it: the
    // packed adapter has its rank. Else the As are stacked, one rank slot each.
    let shared = blocks.windows(2).all(|w| w[0].2.a == w[1].2.a);
    let slots: Vec<usize> = match shared {
        true => vec![0; blocks.len()],
        false => (blocks.iter())
            .scan(0, |next, b| {
                let at = *next;
                *next += b.2.a.shape[0];
                Some(at)
            })
            .collect(),
    };
    let rank: usize = match shared {
        true => blocks[0].2.a.shape[0],
        false => blocks.iter().map(|b| b.2.a.shape[0]).sum(),
    };
    let a: Vec<f64> = match shared {
        true => blocks[0].2.a.data.clone(),
        false => blocks
            .iter()
            .flat_map(|b| b.2.a.data.iter().copied())
            .collect(),
    };
    let mut b = vec![0.0; total * rank];
    let mut m = config
        .use_dora
        .then(|| base_magnitude(graph, layer).to_array().data);
    for ((part, module, t), slot) in blocks.iter().zip(slots) {
        let cols = span(*part);
        let r = t.a.shape[0];
        if t.b.shape[0] != cols.len() {
            return Err(format!(
                "module '{module}': lora_B {} does not fit its block of the model's packed \
                 '{packed}' (outputs {}..{} of {total})",
                shape_str(&t.b.shape),
                cols.start,
                cols.end
            ));
        }
        let s = crate::ir::scale(config.alpha_for(module), r, config.use_rslora);
        for (i, row) in t.b.data.chunks_exact(r).enumerate() {
            let at = (cols.start + i) * rank + slot;
            for (to, v) in b[at..at + r].iter_mut().zip(row) {
                *to = s * v;
            }
        }
        if let (Some(m), Some(given)) = (m.as_mut(), &t.magnitude) {
            m[cols].copy_from_slice(&given.data);
        }
    }
    // Every block, given or not, is saved as its own module again: a block without an adapter
    // here is trained as the others are, under its sibling's name with its own last part.
    let sibling = blocks[0].1;
    let saved = [(Qkv::Q, "q_proj"), (Qkv::K, "k_proj"), (Qkv::V, "v_proj")]
        .into_iter()
        .map(|(part, leaf)| {
            let module = match blocks.iter().find(|b| b.0 == part) {
                Some(b) => b.1.to_string(),
                None => match sibling.rsplit_once('.') {
                    Some((parent, _)) => format!("{parent}.{leaf}"),
                    None => leaf.to_string(),
                },
            };
            let cols = span(part);
            PackedBlock {
                module,
                start: cols.start,
                end: cols.end,
            }
        })
        .collect();
    Ok(Resolved {
        name: packed.clone(),
        layer: packed.clone(),
        tensors: Cow::Owned(LayerTensors {
            a: Array::new(vec![rank, fin], a),
            b: Array::new(vec![total, rank], b),
            magnitude: m.map(|m| Array::new(vec![total], m)),
            conv_a_shape: None,
            embedding: false,
        }),
        // Each block's scale is in B: the packed adapter's own scale is alpha / rank = 1.
        rank,
        alpha: rank as f64,
        rslora: false,
        blocks: saved,
    })
}

/// One adapter per block for a packed `gate_up_proj` adapter: `[gate | up]` along B's rows.
pub(super) fn split_gate_up<'a>(
    module: &str,
    t: &LayerTensors,
    [gate, up]: [&LinearLayer; 2],
    config: &PeftConfig,
) -> Result<[Resolved<'a>; 2], String> {
    let rows = t.b.shape[0];
    if rows != 2 * gate.out_features || rows != 2 * up.out_features {
        return Err(format!(
            "module '{module}': lora_B {} is not [gate | up] for the model's '{}' and '{}' \
             ({} and {} outputs)",
            shape_str(&t.b.shape),
            gate.module,
            up.module,
            gate.out_features,
            up.out_features
        ));
    }
    let r = t.a.shape[0];
    let half = |k: usize, layer: &LinearLayer| Resolved {
        name: layer.module.clone(),
        layer: layer.module.clone(),
        tensors: Cow::Owned(LayerTensors {
            a: t.a.clone(),
            b: Array::new(
                vec![rows / 2, r],
                t.b.data[k * rows / 2 * r..(k + 1) * rows / 2 * r].to_vec(),
            ),
            magnitude: t.magnitude.as_ref().map(|m| {
                Array::new(
                    vec![rows / 2],
                    m.data[k * rows / 2..(k + 1) * rows / 2].to_vec(),
                )
            }),
            conv_a_shape: None,
            embedding: false,
        }),
        rank: r,
        alpha: config.alpha_for(module),
        rslora: config.use_rslora,
        blocks: vec![],
    };
    Ok([half(0, gate), half(1, up)])
}
