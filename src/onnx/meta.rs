//! dorac's own `metadata_props` entries, so an exported (rewritten) model can be imported again
//! with its adapters and stop-gradient markers known.
//!
//! - `dorac.adapters`: a JSON array, one [`AdapterMeta`] per `graph.adapters` entry, with the
//!   value names (ONNX tensor names in the exported model) of the nodes it points at.
//! - `dorac.conv_filters`: the filter shapes of Convs lowered at import, by value name, so
//!   that Conv adapters keep PEFT's shapes after a round trip.
//! - `dorac.stop_gradient`: a JSON array of ONNX node names; those `Identity` nodes are
//!   [`Op::StopGradient`](crate::ir::Op::StopGradient) in the IR (ONNX has no such op).

use crate::error::{Error, Result};
use crate::ir::{AdaptedLayer, LinearKind, Method, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Metadata key of the adapter records.
pub const ADAPTERS_KEY: &str = "dorac.adapters";
/// Metadata key of the lowered Convs' filter shapes (`Graph::conv_filters`): a JSON object from
/// the filter matrix's value name to the ONNX filter bank's shape.
pub const CONV_FILTERS_KEY: &str = "dorac.conv_filters";
/// Metadata key of the stop-gradient node names.
pub const STOP_GRADIENT_KEY: &str = "dorac.stop_gradient";

/// One adapter record as stored in the model: [`AdaptedLayer`] with value names for node ids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub module: String,
    /// `"dora"` or `"lora"`.
    pub method: String,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub in_features: usize,
    pub out_features: usize,
    pub kind: KindMeta,
    pub base_label: String,
    pub x: String,
    pub weight: String,
    pub bias: Option<String>,
    pub lora_a: String,
    pub lora_b: String,
    pub magnitude: Option<String>,
    pub output: String,
}

/// [`LinearKind`] in JSON: `{"op":"MatMul"}` or `{"op":"Gemm","alpha":..,...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum KindMeta {
    MatMul,
    Embedding,
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
}

impl AdapterMeta {
    /// The record for `a`, naming each node with `name(id)`.
    pub fn from_layer(a: &AdaptedLayer, name: &dyn Fn(NodeId) -> String) -> Self {
        AdapterMeta {
            module: a.module.clone(),
            method: a.method.name().to_string(),
            rank: a.rank,
            alpha: a.alpha,
            rslora: a.rslora,
            in_features: a.in_features,
            out_features: a.out_features,
            kind: match a.kind {
                LinearKind::MatMul => KindMeta::MatMul,
                LinearKind::Embedding => KindMeta::Embedding,
                LinearKind::Gemm {
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                } => KindMeta::Gemm {
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                },
            },
            base_label: a.base_label.clone(),
            x: name(a.x),
            weight: name(a.weight),
            bias: a.bias.map(name),
            lora_a: name(a.lora_a),
            lora_b: name(a.lora_b),
            magnitude: a.magnitude.map(name),
            output: name(a.output),
        }
    }

    /// The layer, with value names resolved through `values`; a name that does not resolve is
    /// an error naming the module (the metadata and the graph disagree).
    pub fn to_layer(&self, values: &HashMap<String, NodeId>) -> Result<AdaptedLayer> {
        let get = |field: &str, v: &str| {
            values.get(v).copied().ok_or_else(|| {
                Error::onnx(format!(
                    "metadata '{ADAPTERS_KEY}': adapter for module '{}' names {field} '{v}', \
                     which is not a value in the graph",
                    self.module
                ))
            })
        };
        let method = match self.method.as_str() {
            "dora" => Method::Dora,
            "lora" => Method::Lora,
            m => {
                return Err(Error::onnx(format!(
                    "metadata '{ADAPTERS_KEY}': adapter for module '{}' has method '{m}' \
                     (expected \"dora\" or \"lora\")",
                    self.module
                )))
            }
        };
        Ok(AdaptedLayer {
            module: self.module.clone(),
            method,
            rank: self.rank,
            alpha: self.alpha,
            rslora: self.rslora,
            in_features: self.in_features,
            out_features: self.out_features,
            kind: match self.kind {
                KindMeta::MatMul => LinearKind::MatMul,
                KindMeta::Embedding => LinearKind::Embedding,
                KindMeta::Gemm {
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                } => LinearKind::Gemm {
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                },
            },
            base_label: self.base_label.clone(),
            x: get("x", &self.x)?,
            weight: get("weight", &self.weight)?,
            bias: self.bias.as_deref().map(|b| get("bias", b)).transpose()?,
            lora_a: get("lora_a", &self.lora_a)?,
            lora_b: get("lora_b", &self.lora_b)?,
            magnitude: self
                .magnitude
                .as_deref()
                .map(|m| get("magnitude", m))
                .transpose()?,
            output: get("output", &self.output)?,
            // Not in the metadata: found by the name the rewrite gives it, when present (the
            // fused training norm needs it; without it training keeps the factored form).
            norm_sq: match method {
                Method::Dora => values.get(&format!("{}.norm_sq", self.module)).copied(),
                Method::Lora => None,
            },
        })
    }
}

/// Parses the JSON of one of dorac's metadata keys, naming the key on failure.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(key: &str, json: &str) -> Result<T> {
    serde_json::from_str(json)
        .map_err(|e| Error::onnx(format!("metadata '{key}' is not valid dorac metadata: {e}")))
}

/// Serialises a metadata value (cannot fail for these plain types).
pub(crate) fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("metadata serialises")
}
