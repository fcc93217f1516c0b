//! Adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`, with
//! keys `base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] and
//! `.lora_magnitude_vector` [out]. A PEFT user's adapter runs in dorac, and dorac's goes back.
//!
//! Conv layers (lowered at import to a linear layer over input windows, see
//! `onnx::import_ops::conv`) keep PEFT's Conv shapes on disk: lora_A `[r, C, kernel...]`, lora_B
//! `[out, r, 1...]`, magnitude `[1, out, 1...]`; in the graph they are the 2-D `[r, C*K]`,
//! `[out, r]` and `[out]` of that linear layer.
//!
//! Embeddings (`LinearKind::Embedding`) use PEFT's embedding keys, `<module>.lora_embedding_A`
//! `[r, num_embeddings]` and `.lora_embedding_B` `[dim, r]`: the same orientation as a linear
//! layer's A and B with in = num_embeddings and out = dim.

use crate::error::{Error, Result, Subject};
use crate::ir::{Graph, Method, Patch};
use crate::passes::{
    find_linear_layers, insert_adapters, resolve_module, AdapterInit, AdapterSpec, LinearLayer,
    ModuleMatch,
};
use crate::tensor::{shape_str, Array, Tensor};
use crate::tensors_io::{write_atomic, write_safetensors};
use packed::{builder_place, pack_qkv, split_gate_up, Place, Qkv, Resolved};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

mod config;
mod packed;

pub use config::{ConfigFile, TargetModules};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// The parts of PEFT's `LoraConfig` that change the computation.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_dora: bool,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
    pub lora_dropout: f64,
    /// Per-module overrides, keyed by PEFT pattern (a module-name suffix).
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `base_model_name_or_path`.
    pub base_model: Option<String>,
}

/// One layer's tensors, in the 2-D (1-D for m) shapes of a linear layer.
#[derive(Clone, Debug)]
pub struct LayerTensors {
    pub a: Array,
    pub b: Array,
    pub magnitude: Option<Array>,
    /// For a Conv adapter, lora_A's shape on disk `[r, C, kernel...]`.
    pub conv_a_shape: Option<Vec<usize>>,
    /// Stored under PEFT's embedding keys (`lora_embedding_A`, `lora_embedding_B`).
    pub embedding: bool,
}

/// A loaded adapter: config plus tensors by module name.
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    pub config: PeftConfig,
    pub layers: BTreeMap<String, LayerTensors>,
}

impl PeftConfig {
    /// Alpha for one module, honouring `alpha_pattern`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        pattern_lookup(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }

    pub fn method(&self) -> Method {
        if self.use_dora {
            Method::Dora
        } else {
            Method::Lora
        }
    }
}

fn pattern_lookup<T: Copy>(map: &BTreeMap<String, T>, module: &str) -> Option<T> {
    map.iter()
        .find(|(k, _)| crate::passes::matches_target(module, k))
        .map(|(_, v)| *v)
}

/// Reads a PEFT adapter folder.
pub fn load(dir: &Path) -> Result<PeftAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let weights = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
    from_parts(&text, &weights, dir)
}

/// A PEFT adapter from its config's text and its weights file's bytes; `dir` names them in
/// errors (the fuzz target `peft_adapter` calls this directly).
pub fn from_parts(text: &str, weights: &[u8], dir: &Path) -> Result<PeftAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let file: ConfigFile = serde_json::from_str(text).map_err(|e| {
        Error::input_at(
            Subject::file(&cfg_path),
            format!("not a PEFT adapter config ({e})"),
        )
    })?;
    if file.peft_type != "LORA" {
        return Err(Error::input_at(
            Subject::file(&cfg_path),
            format!(
                "peft_type is {}; dorac reads LORA adapters (with or without use_dora)",
                file.peft_type
            ),
        ));
    }
    // fan_in_fan_out: PEFT's A and B keep [r, in] / [out, r] either way; only the base weight is
    // transposed, and dorac reads the base weight's orientation from the ONNX graph.
    let config = PeftConfig {
        r: file.r,
        lora_alpha: file.lora_alpha,
        use_dora: file.use_dora,
        use_rslora: file.use_rslora,
        target_modules: file
            .target_modules
            .as_ref()
            .map(TargetModules::patterns)
            .unwrap_or_default(),
        lora_dropout: file.lora_dropout,
        rank_pattern: file.rank_pattern.clone(),
        alpha_pattern: file.alpha_pattern.clone(),
        base_model: file.base_model_name_or_path.clone(),
    };

    refuse_unsupported(&file, &cfg_path)?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let tensors: BTreeMap<String, Array> =
        crate::tensors_io::parse_safetensors_typed(weights, &weights_path.display().to_string())?
            .into_iter()
            .map(|(k, (a, _))| (k, a))
            .collect();
    let mut parts: BTreeMap<String, [Option<Array>; 3]> = BTreeMap::new();
    let mut embeddings = std::collections::BTreeSet::new();
    for (key, t) in tensors {
        let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(&key);
        let (module, slot) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else if let Some(m) = rest.strip_suffix(".lora_embedding_A") {
            embeddings.insert(m.to_string());
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_embedding_B") {
            embeddings.insert(m.to_string());
            (m, 1)
        } else if let Some(m) = rest.strip_suffix(".lora_magnitude_vector") {
            (m, 2)
        } else if let Some(m) = rest.strip_suffix(".lora_magnitude_vector.weight") {
            (m, 2) // older PEFT releases
        } else {
            return Err(Error::input_at(Subject::file(&weights_path), format!("unexpected tensor '{key}' (expected <module>.lora_A.weight, .lora_B.weight, .lora_embedding_A, .lora_embedding_B or .lora_magnitude_vector)")));
        };
        // PEFT may insert the adapter name for non-default adapters: `<module>.lora_A.<name>.weight`
        // is not supported; plain keys only.
        let e = parts.entry(module.to_string()).or_default();
        e[slot] = Some(t);
    }
    let mut layers = BTreeMap::new();
    for (module, [a, b, m]) in parts {
        let missing = |what: &str| {
            Error::input_at(
                Subject::file(&weights_path),
                format!("module '{module}' has no {what}"),
            )
        };
        let embedding = embeddings.contains(&module);
        let a = a.ok_or_else(|| {
            missing(if embedding {
                "lora_embedding_A"
            } else {
                "lora_A.weight"
            })
        })?;
        let b = b.ok_or_else(|| {
            missing(if embedding {
                "lora_embedding_B"
            } else {
                "lora_B.weight"
            })
        })?;
        let conv_a_shape = (a.shape.len() > 2).then(|| a.shape.clone());
        let (a, b, m) = match &conv_a_shape {
            Some(_) => flatten_conv(a, b, m).map_err(|why| {
                Error::input_at(
                    Subject::file(&weights_path),
                    format!("module '{module}': {why}"),
                )
            })?,
            None => (a, b, m),
        };
        if config.use_dora && m.is_none() {
            return Err(missing("lora_magnitude_vector (the config says use_dora)"));
        }
        if !config.use_dora && m.is_some() {
            return Err(Error::input_at(
                Subject::file(&weights_path),
                format!(
                    "module '{module}' has a lora_magnitude_vector, but {} says use_dora: false; \
                 set use_dora to true to apply it as DoRA, or remove the magnitudes for LoRA",
                    cfg_path.display()
                ),
            ));
        }
        for (what, t) in [
            ("lora_A", Some(&a)),
            ("lora_B", Some(&b)),
            ("lora_magnitude_vector", m.as_ref()),
        ] {
            if let Some(t) = t {
                if let Some(v) = t.data.iter().find(|v| !v.is_finite()) {
                    return Err(Error::input_at(Subject::file(&weights_path), format!("module '{module}': {what} holds {v}; an adapter's values must be finite")));
                }
            }
        }
        if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != b.shape[1] {
            return Err(Error::input_at(
                Subject::file(&weights_path),
                format!(
                    "module '{module}': lora_A {} and lora_B {} do not form a rank-r pair",
                    shape_str(&a.shape),
                    shape_str(&b.shape)
                ),
            ));
        }
        // The rank the config gives this module (rank_pattern, else r) must be the tensors'.
        let rank = pattern_lookup(&config.rank_pattern, &module).unwrap_or(config.r);
        if a.shape[0] != rank {
            return Err(Error::input_at(
                Subject::file(&weights_path),
                format!(
                    "module '{module}' has rank {} tensors, but {} gives it rank {rank} ({})",
                    a.shape[0],
                    cfg_path.display(),
                    if config.rank_pattern.is_empty() {
                        "r"
                    } else {
                        "r / rank_pattern"
                    }
                ),
            ));
        }
        if !config.target_modules.is_empty()
            && !config
                .target_modules
                .iter()
                .any(|p| crate::passes::matches_target(&module, p))
        {
            return Err(Error::input_at(
                Subject::file(&weights_path),
                format!(
                    "module '{module}' has tensors but matches none of target_modules {:?} in {}",
                    config.target_modules,
                    cfg_path.display()
                ),
            ));
        }
        layers.insert(
            module,
            LayerTensors {
                a,
                b,
                magnitude: m.filter(|_| config.use_dora),
                conv_a_shape,
                embedding,
            },
        );
    }
    if layers.is_empty() {
        return Err(Error::input_at(
            Subject::file(&weights_path),
            "no adapter tensors",
        ));
    }
    Ok(PeftAdapter { config, layers })
}

/// Refuses, by name, the `LoraConfig` fields that would change what the adapter computes and
/// that dorac does not implement, so an adapter never runs differently from PEFT in silence.
fn refuse_unsupported(file: &ConfigFile, path: &Path) -> Result<()> {
    use serde_json::Value;
    let set = |key: &str| match file.extra.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    let mut unsupported: Vec<&str> = [
        "exclude_modules",
        "layers_pattern",
        "layer_replication",
        "lora_bias",
        "use_qalora",
        "trainable_token_indices",
        "target_parameters",
        "alora_invocation_tokens",
        "use_bdlora",
    ]
    .into_iter()
    .filter(|k| set(k))
    .collect();
    if file
        .layers_to_transform
        .as_ref()
        .is_some_and(|v| !v.is_null())
    {
        unsupported.push("layers_to_transform");
    }
    if file.modules_to_save.as_ref().is_some_and(|v| !v.is_empty()) {
        unsupported.push("modules_to_save");
    }
    if file.bias != "none" {
        unsupported.push("bias");
    }
    if unsupported.is_empty() {
        return Ok(());
    }
    Err(Error::input_at(Subject::file(path), format!("dorac does not implement {} (set to a non-default value); the adapter would not compute what PEFT computes", unsupported
            .iter()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", "))))
}

/// A Conv adapter's tensors as a linear layer's: lora_A `[r, C, kernel...]` -> `[r, C*K]`,
/// lora_B `[out, r, 1...]` -> `[out, r]`, magnitude `[1, out, 1...]` -> `[out]`.
fn flatten_conv(
    a: Array,
    b: Array,
    m: Option<Array>,
) -> std::result::Result<(Array, Array, Option<Array>), String> {
    let dims = a.shape.len();
    let ones = |s: &[usize]| s.iter().all(|&d| d == 1);
    if b.shape.len() != dims || !ones(&b.shape[2..]) {
        return Err(format!(
            "lora_A {} is a Conv's, so lora_B must be [out, r, 1...] of the same rank, not {}",
            shape_str(&a.shape),
            shape_str(&b.shape)
        ));
    }
    let rows: usize = a.shape[1..].iter().product();
    let a = Array::new(vec![a.shape[0], rows], a.data);
    let b = Array::new(b.shape[..2].to_vec(), b.data);
    let m = match m {
        Some(m) if m.shape.len() == dims && m.shape[0] == 1 && ones(&m.shape[2..]) => {
            Some(Array::new(vec![m.shape[1]], m.data))
        }
        Some(m) if m.shape.len() == 1 => Some(m),
        Some(m) => {
            return Err(format!(
                "the magnitude of a Conv adapter must be [1, out, 1...], not {}",
                shape_str(&m.shape)
            ))
        }
        None => None,
    };
    Ok((a, b, m))
}

/// Applies an adapter to a graph. On a base model the named layers are rewritten; on a model
/// that already has adapters (a rewritten model), their tensors are replaced.
pub fn apply(graph: &mut Graph, adapter: &PeftAdapter) -> Result<usize> {
    let cfg = &adapter.config;
    graph.adapter_origin = crate::ir::AdapterOrigin {
        base_model: cfg.base_model.clone(),
        target_modules: cfg.target_modules.clone(),
        packed: Default::default(),
    };
    if !graph.adapters().is_empty() {
        return replace_tensors(graph, adapter);
    }
    let layers = find_linear_layers(graph);
    let names: Vec<&str> = layers.iter().map(|l| l.module.as_str()).collect();
    let (resolved, mut problems) = resolve(graph, &layers, adapter);
    let mut specs = vec![];
    for r in &resolved {
        let (module, found, t) = (&r.name, &r.layer, r.tensors.as_ref());
        if let Some(other) = resolved
            .iter()
            .find(|o| o.layer == *found && o.name != *module)
        {
            if module < &other.name {
                problems.push(format!(
                    "modules '{module}' and '{}' both name the model's '{found}'",
                    other.name
                ));
            }
            continue;
        }
        let layer = layers.iter().find(|l| l.module == *found).unwrap();
        let filter = graph.conv_filters().get(&layer.weight);
        match (&t.conv_a_shape, filter) {
            (Some(a), Some(f)) if a[1..] != f[1..] => problems.push(format!(
                "module '{module}': lora_A {} does not fit the Conv's filters {}",
                shape_str(a),
                shape_str(f)
            )),
            (Some(a), None) => problems.push(format!(
                "module '{module}': lora_A {} is a Conv's, but '{found}' is a linear layer",
                shape_str(a)
            )),
            (None, Some(f)) => problems.push(format!(
                "module '{module}': '{found}' is a Conv (filters {}), but lora_A {} is a linear layer's",
                shape_str(f),
                shape_str(&t.a.shape)
            )),
            _ => {}
        }
        if t.embedding != layer.is_embedding() {
            let (given, is) = match t.embedding {
                true => ("an embedding's (lora_embedding_A/B)", "a linear layer"),
                false => ("a linear layer's (lora_A/B)", "an embedding"),
            };
            problems.push(format!(
                "module '{module}': the tensors are {given}, but '{found}' is {is}"
            ));
        }
        // The adapted layer keeps the adapter's module name: an adapter made on the Hugging Face
        // model and applied to a wrapped export (`m.` + its name) is saved back under PEFT's names,
        // so it loads in PEFT on the unwrapped model.
        let mut layer = layer.clone();
        layer.module = module.clone();
        specs.push(AdapterSpec {
            layer,
            method: cfg.method(),
            rank: r.rank,
            alpha: r.alpha,
            rslora: r.rslora,
            init: AdapterInit::Tensors {
                a: t.a.to_tensor_f32(),
                b: t.b.to_tensor_f32(),
                m: t.magnitude.as_ref().map(Array::to_tensor_f32),
            },
        });
    }
    if !problems.is_empty() {
        let modules: Vec<&str> = adapter.layers.keys().map(String::as_str).collect();
        if let Some(prefix) = common_extra_prefix(&modules, &names) {
            return Err(Error::input(format!(
                "the adapter's module names all start with '{prefix}', which the model's do not \
                 ('{}' is the model's '{}'): the adapter was saved from a model that wraps this \
                 one (PEFT names modules from the model object it was given). Export the same \
                 model class the adapter was trained on, or strip the prefix from the keys of \
                 adapter_model.safetensors",
                modules[0],
                &modules[0][prefix.len()..]
            )));
        }
        return Err(Error::input(format!(
            "the adapter's modules do not all match the model's linear layers: {} (the model's: {})",
            problems.join("; "),
            names.join(", ")
        )));
    }
    graph.adapter_origin.packed = (resolved.iter())
        .filter(|r| !r.blocks.is_empty())
        .map(|r| (r.name.clone(), r.blocks.clone()))
        .collect();
    insert_adapters(graph, specs)
}

/// The model layer each of the adapter's modules goes to: by name (see [`find_module`]), else
/// by the names and packing of onnxruntime-genai's builder (see `packed`); and why not, for
/// those that go nowhere.
fn resolve<'a>(
    graph: &Graph,
    layers: &[LinearLayer],
    adapter: &'a PeftAdapter,
) -> (Vec<Resolved<'a>>, Vec<String>) {
    let cfg = &adapter.config;
    let names: Vec<&str> = layers.iter().map(|l| l.module.as_str()).collect();
    let layer = |name: &str| layers.iter().find(|l| l.module == name).unwrap();
    let whole = |name: &str, layer: String, t: &'a LayerTensors| Resolved {
        name: name.to_string(),
        layer,
        tensors: Cow::Borrowed(t),
        rank: t.a.shape[0],
        alpha: cfg.alpha_for(name),
        rslora: cfg.use_rslora,
        blocks: vec![],
    };
    let (mut resolved, mut problems) = (vec![], vec![]);
    let mut qkv: BTreeMap<String, Vec<(Qkv, &str, &LayerTensors)>> = BTreeMap::new();
    for (module, t) in &adapter.layers {
        let why = match find_module(module, &names) {
            Ok(found) => {
                resolved.push(whole(module, found, t));
                continue;
            }
            Err(why) => why,
        };
        let linear = !t.embedding && t.conv_a_shape.is_none();
        match builder_place(module, &names) {
            // Renamed, it keeps the adapter's name: saved, it loads in PEFT again.
            Some(Place::Renamed(found)) => resolved.push(whole(module, found, t)),
            Some(Place::Qkv { packed, part }) if linear => {
                qkv.entry(packed).or_default().push((part, module, t))
            }
            Some(Place::GateUp { gate, up }) if linear => {
                match split_gate_up(module, t, [layer(&gate), layer(&up)], cfg) {
                    Ok(halves) => resolved.extend(halves),
                    Err(why) => problems.push(why),
                }
            }
            _ => problems.push(why),
        }
    }
    for (packed, blocks) in qkv {
        match pack_qkv(graph, layer(&packed), &blocks, cfg) {
            Ok(r) => resolved.push(r),
            Err(why) => problems.push(why),
        }
    }
    (resolved, problems)
}

/// When `module` is one of `names` with a prefix in front (`model.encoder.q` for `encoder.q`):
/// the prefix (with its dot) and the model's name.
fn wrapped_name<'a>(module: &'a str, names: &[&'a str]) -> Option<(&'a str, &'a str)> {
    names
        .iter()
        .filter(|n| module.len() > n.len() && module.ends_with(&format!(".{n}")))
        .max_by_key(|n| n.len())
        .map(|n| (&module[..module.len() - n.len()], *n))
}

/// The prefix every one of the adapter's modules has in front of a model module's name, if
/// there is one prefix for all of them.
fn common_extra_prefix<'a>(modules: &'a [&'a str], names: &[&'a str]) -> Option<&'a str> {
    let mut prefixes = modules.iter().map(|m| wrapped_name(m, names).map(|p| p.0));
    let first = prefixes.next()??;
    prefixes.all(|p| p == Some(first)).then_some(first)
}

/// The model module an adapter's module name stands for (see [`resolve_module`]), or why none.
fn find_module(module: &str, names: &[&str]) -> std::result::Result<String, String> {
    match resolve_module(module, names) {
        ModuleMatch::Found(m) => Ok(m.to_string()),
        ModuleMatch::Ambiguous(all) => Err(format!(
            "module '{module}' matches several of the model's ({}); name one in full",
            all.join(", ")
        )),
        ModuleMatch::Missing(_) if wrapped_name(module, names).is_some() => {
            let (prefix, name) = wrapped_name(module, names).unwrap();
            Err(format!(
                "module '{module}' is not in the model, but '{name}' is: the adapter's name has the extra prefix '{prefix}'"
            ))
        }
        ModuleMatch::Missing(close) if close.is_empty() => {
            Err(format!("module '{module}' is not in the model"))
        }
        ModuleMatch::Missing(close) => Err(format!(
            "module '{module}' is not in the model (closest: {})",
            close.join(", ")
        )),
    }
}

/// Writes the adapter's tensors into the model's adapter constants, in one patch.
fn replace_tensors(graph: &mut Graph, adapter: &PeftAdapter) -> Result<usize> {
    let mut count = 0;
    let mut p = Patch::new(graph);
    for (module, t) in &adapter.layers {
        let names: Vec<&str> = graph.adapters().iter().map(|a| a.module.as_str()).collect();
        let found = find_module(module, &names).map_err(|why| {
            Error::input(format!(
                "{why}, among the modules that have an adapter in this model ({})",
                names.join(", ")
            ))
        })?;
        let layer = graph
            .adapters()
            .iter()
            .find(|a| a.module == found)
            .cloned()
            .unwrap();
        if (layer.method == Method::Dora) != adapter.config.use_dora {
            return Err(Error::input_at(
                Subject::named("module", module),
                format!(
                    "the model's adapter is {}, the given one is {}",
                    layer.method.name(),
                    adapter.config.method().name()
                ),
            ));
        }
        let mut set = |node, value: &Array, what: &str| -> Result<()> {
            let model_shape = graph.shape(node);
            if model_shape != value.shape {
                let tensor = Subject::named("tensor", format!("{module}.{what}"));
                return Err(Error::shape_mismatch(tensor, &value.shape, model_shape));
            }
            p.set_const(node, value.to_tensor_f32())
        };
        set(layer.lora_a, &t.a, "lora_A")?;
        set(layer.lora_b, &t.b, "lora_B")?;
        if let (Some(node), Some(m)) = (layer.magnitude, &t.magnitude) {
            set(node, m, "lora_magnitude_vector")?;
        }
        count += 1;
    }
    graph.apply(p.finish());
    Ok(count)
}

/// The `target_modules` a saved adapter declares: the patterns the adapters were chosen by when
/// they select exactly the adapted layers, else the layers' last name components when those
/// do, else every adapted module's full name. PEFT then targets the same layers. With packed
/// layers (saved as their blocks), the saved modules' last names.
fn target_patterns(graph: &Graph, saved: &BTreeMap<String, Array>) -> Vec<String> {
    // Packed layers are saved as the modules of another model (the Hugging Face one): the
    // saved modules' last names select them there.
    if !graph.adapter_origin.packed.is_empty() {
        let mut short: Vec<String> = (saved.keys())
            .filter_map(|k| k.strip_prefix(KEY_PREFIX))
            .filter_map(|k| k.split(".lora_").next())
            .map(|m| m.rsplit('.').next().unwrap_or(m).to_string())
            .collect();
        short.sort();
        short.dedup();
        return short;
    }
    let adapted: std::collections::BTreeSet<&str> =
        graph.adapters().iter().map(|a| a.module.as_str()).collect();
    let mut modules: Vec<String> = find_linear_layers(graph)
        .into_iter()
        .map(|l| l.module)
        .collect();
    modules.extend(adapted.iter().map(|m| m.to_string()));
    let selects_exactly = |patterns: &[String]| {
        let chosen: std::collections::BTreeSet<&str> = modules
            .iter()
            .map(String::as_str)
            .filter(|m| patterns.iter().any(|p| crate::passes::matches_target(m, p)))
            .collect();
        chosen == adapted
    };
    let mut given = graph.adapter_origin.target_modules.clone();
    given.sort();
    given.dedup();
    if !given.is_empty() && selects_exactly(&given) {
        return given;
    }
    let mut short: Vec<String> = adapted
        .iter()
        .map(|m| m.rsplit('.').next().unwrap_or(m).to_string())
        .collect();
    short.sort();
    short.dedup();
    if selects_exactly(&short) {
        return short;
    }
    adapted.iter().map(|m| m.to_string()).collect()
}

/// Writes the graph's adapters as a PEFT adapter folder (each file written atomically).
pub fn save(graph: &Graph, dir: &Path) -> Result<()> {
    let first = graph
        .adapters()
        .first()
        .ok_or_else(|| Error::input("the model has no adapters to save"))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = BTreeMap::new();
    let mut config = ConfigFile::new(
        first.rank,
        first.alpha,
        first.method == Method::Dora,
        first.rslora,
    );
    for a in graph.adapters() {
        // A Conv's tensors go out in PEFT's Conv shapes (see the module docs).
        let conv = graph.conv_filters().get(&a.weight);
        let get = |n, what: &str| {
            let t = graph
                .const_tensor(n)
                .map(Tensor::to_array)
                .expect("adapter tensors are constants");
            let Some(f) = conv else { return t };
            let ones = vec![1; f.len() - 2];
            let shape = match what {
                "a" => [&[t.shape[0]][..], &f[1..]].concat(),
                "b" => [&t.shape[..], &ones].concat(),
                _ => [&[1, t.shape[0]][..], &ones].concat(),
            };
            Array::new(shape, t.data)
        };
        let (key_a, key_b) = match a.kind {
            crate::ir::LinearKind::Embedding => ("lora_embedding_A", "lora_embedding_B"),
            _ => ("lora_A.weight", "lora_B.weight"),
        };
        // A packed layer's adapter goes out as the PEFT modules of its column blocks: A shared,
        // B's rows and the magnitudes of each block.
        if let Some(blocks) = graph.adapter_origin.packed.get(&a.module) {
            let (lora_a, lora_b) = (get(a.lora_a, "a"), get(a.lora_b, "b"));
            let m = a.magnitude.map(|m| get(m, "m"));
            for block in blocks {
                let rows = |t: &Array, width: usize| {
                    let mut shape = t.shape.clone();
                    shape[0] = block.end - block.start;
                    Array::new(
                        shape,
                        t.data[block.start * width..block.end * width].to_vec(),
                    )
                };
                let key = |what: &str| format!("{KEY_PREFIX}{}.{what}", block.module);
                tensors.insert(key(key_a), lora_a.clone());
                tensors.insert(key(key_b), rows(&lora_b, a.rank));
                if let Some(m) = &m {
                    tensors.insert(key("lora_magnitude_vector"), rows(m, 1));
                }
                if a.rank != first.rank {
                    config.rank_pattern.insert(block.module.clone(), a.rank);
                }
                if a.alpha != first.alpha {
                    config.alpha_pattern.insert(block.module.clone(), a.alpha);
                }
            }
            continue;
        }
        tensors.insert(
            format!("{KEY_PREFIX}{}.{key_a}", a.module),
            get(a.lora_a, "a"),
        );
        tensors.insert(
            format!("{KEY_PREFIX}{}.{key_b}", a.module),
            get(a.lora_b, "b"),
        );
        if let Some(m) = a.magnitude {
            tensors.insert(
                format!("{KEY_PREFIX}{}.lora_magnitude_vector", a.module),
                get(m, "m"),
            );
        }
        if a.rank != first.rank {
            config.rank_pattern.insert(a.module.clone(), a.rank);
        }
        if a.alpha != first.alpha {
            config.alpha_pattern.insert(a.module.clone(), a.alpha);
        }
    }
    config.target_modules = Some(TargetModules::List(target_patterns(graph, &tensors)));
    config.base_model_name_or_path = graph.adapter_origin.base_model.clone();
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}
