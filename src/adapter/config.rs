//! `adapter_config.json`, PEFT's `LoraConfig` as it is saved: read and written through one serde
//! struct. Fields dorac does not use are kept as read (`extra`), so a PEFT adapter passes
//! through dorac without losing them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The file's fields, named and typed as PEFT writes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigFile {
    #[serde(default = "lora")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    /// PEFT's default.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub use_rslora: bool,
    /// A list of module-name patterns, or one regular expression (a string).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default = "yes")]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// Per-module rank overrides, keyed by pattern.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, keyed by pattern.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub revision: Option<String>,
    /// Every other field, kept as read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

impl TargetModules {
    pub fn patterns(&self) -> Vec<String> {
        match self {
            TargetModules::List(l) => l.clone(),
            TargetModules::Regex(s) => vec![s.clone()],
        }
    }
}

fn lora() -> String {
    "LORA".into()
}
fn none() -> String {
    "none".into()
}
fn yes() -> serde_json::Value {
    serde_json::Value::Bool(true)
}
fn default_alpha() -> f64 {
    8.0
}

impl ConfigFile {
    /// A config for adapters dorac made, with PEFT's defaults for everything else.
    pub fn new(r: usize, lora_alpha: f64, use_dora: bool, use_rslora: bool) -> ConfigFile {
        ConfigFile {
            peft_type: lora(),
            task_type: None,
            base_model_name_or_path: None,
            r,
            lora_alpha,
            lora_dropout: 0.0,
            use_dora,
            use_rslora,
            target_modules: None,
            fan_in_fan_out: false,
            bias: none(),
            init_lora_weights: yes(),
            inference_mode: true,
            modules_to_save: None,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            revision: None,
            extra: peft_defaults(),
        }
    }
}

/// The other fields PEFT (0.21) writes in every LoRA config, at its defaults, so that PEFT's
/// tooling reads a dorac adapter like one of its own.
fn peft_defaults() -> BTreeMap<String, serde_json::Value> {
    use serde_json::{json, Value};
    let null = [
        "alora_invocation_tokens",
        "arrow_config",
        "corda_config",
        "eva_config",
        "exclude_modules",
        "kasa_config",
        "layer_replication",
        "layers_pattern",
        "lora_ga_config",
        "megatron_config",
        "monteclora_config",
        "target_parameters",
        "trainable_token_indices",
        "use_bdlora",
        "velora_config",
    ];
    let mut m: BTreeMap<String, Value> =
        null.iter().map(|k| (k.to_string(), Value::Null)).collect();
    m.insert("ensure_weight_tying".into(), json!(false));
    m.insert("loftq_config".into(), json!({}));
    m.insert("lora_bias".into(), json!(false));
    m.insert("megatron_core".into(), json!("megatron.core"));
    m.insert("qalora_group_size".into(), json!(16));
    m.insert("use_qalora".into(), json!(false));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_fields_read_and_unknown_ones_survive() {
        let text = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": true,
            "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 4},
            "alpha_pattern": {}, "megatron_core": "megatron.core", "layer_replication": null}"#;
        let c: ConfigFile = serde_json::from_str(text).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.use_dora), (8, 16.0, true));
        assert_eq!(
            c.target_modules.as_ref().unwrap().patterns(),
            ["q_proj", "v_proj"]
        );
        assert_eq!(c.rank_pattern["q_proj"], 4);
        assert_eq!(c.extra["megatron_core"], "megatron.core");
        let back: ConfigFile = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        // A regex string, and PEFT's defaults for what is missing.
        let c: ConfigFile =
            serde_json::from_str(r#"{"r": 2, "target_modules": ".*attn.*"}"#).unwrap();
        assert_eq!(c.target_modules.unwrap().patterns(), [".*attn.*"]);
        assert_eq!((c.lora_alpha, c.peft_type.as_str()), (8.0, "LORA"));
        assert!(serde_json::from_str::<ConfigFile>(r#"{"lora_alpha": 2}"#).is_err());
    }
}
