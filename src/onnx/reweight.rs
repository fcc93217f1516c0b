//! Writing a model file again with some of its weights replaced and everything else as the file
//! had it: its ops (fused ones such as GroupQueryAttention included), symbolic dims, opsets and
//! metadata. `dorac merge` writes a base model's merged layers this way, so that the merged file
//! is a drop-in replacement of the input: a runtime that generates with it (onnxruntime-genai,
//! or any caller feeding other batch and sequence sizes) keeps working, where a graph exported
//! from dorac's IR would have the shapes pinned at import and the fused ops lowered.
//!
//! A weight is replaced when the IR constant that held it carries the name of an initializer of
//! the model with the same dims and a float type (written back in that type). A MatMulNBits
//! layer's weight (dequantized at import) is quantized again in the node's own layout (bits,
//! block size, zero points and the scales' type), or with `Requantize::No` becomes a MatMul with
//! an f32 initializer, its bias an Add; the quantized tensors no other node reads are dropped.
//! Anything else (a weight the importer transposed or folded into a new constant) is not in the
//! file as such: the caller hears why and exports the graph instead.

use super::data::external_bytes;
use super::external::{ExternalData, EXTERNAL_MIN_BYTES};
use super::import_ops::{quantize_nbits, ZeroPointForm};
use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::{GraphProto, ModelProto, NodeProto, TensorProto};
use crate::error::{Error, Result, Subject};
use crate::tensor::Tensor;
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Why a weight cannot be written into the model file in place.
pub type NotInPlace = String;

/// What becomes of a MatMulNBits layer's new weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requantize {
    /// Quantized again as the node stored it.
    Yes,
    /// Written as an f32 MatMul.
    No,
}

/// A MatMulNBits layer whose new weight was quantized again: how far its codes are from it.
#[derive(Clone, Debug)]
pub struct Requantized {
    pub node: String,
    pub bits: usize,
    pub block: usize,
    /// The largest `|w - dequantized w|` in steps of its block's scale, and absolute.
    pub max_steps: f64,
    pub max_abs: f64,
    /// The largest `|w|`.
    pub max_weight: f64,
}

/// The model with its new weights, and the layers quantized again.
pub struct Reweighted {
    pub model: ModelProto,
    pub requantized: Vec<Requantized>,
}

/// `model` with the initializers named in `weights` replaced, or why one of them cannot be.
pub fn reweighted(
    model: &ModelProto,
    weights: &[(String, Tensor)],
    requantize: Requantize,
) -> std::result::Result<Reweighted, NotInPlace> {
    let mut model = model.clone();
    let graph = model.graph.as_mut().expect("load_model checked the graph");
    let index: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name().to_string(), i))
        .collect();
    // How many node inputs read each name, counted once (the edits below keep these counts for
    // plain initializers: a bias a MatMulNBits read is read by the Add that replaces it).
    let mut readers: HashMap<String, usize> = HashMap::new();
    for i in graph.node.iter().flat_map(|n| &n.input) {
        *readers.entry(i.clone()).or_default() += 1;
    }
    let mut dropped: HashSet<String> = HashSet::new();
    let mut requantized = vec![];
    for (name, value) in weights {
        if let Some(&i) = index.get(name) {
            let old = &graph.initializer[i];
            let dims: Vec<i64> = value.shape.iter().map(|&d| d as i64).collect();
            if old.dims != dims {
                return Err(format!(
                    "weight '{name}' is {:?} in the file and {:?} after import",
                    old.dims, dims
                ));
            }
            // A weight other nodes read too (tied embeddings) would change for them as well.
            let readers = readers.get(name).copied().unwrap_or(0);
            if readers != 1 {
                return Err(format!(
                    "weight '{name}' is read by {readers} nodes of the file, not only its layer"
                ));
            }
            let data_type = DataType::try_from(old.data_type()).ok();
            graph.initializer[i] = data_type
                .and_then(|d| float_proto(name, value, d))
                .ok_or_else(|| format!("weight '{name}' is not a float tensor in the file"))?;
            continue;
        }
        // MatMulNBits: its dequantized weight is `<output>/weight` in the IR.
        let quantized = name.strip_suffix("/weight").and_then(|out| {
            graph.node.iter().position(|n| {
                n.op_type() == "MatMulNBits" && n.output.first().map(String::as_str) == Some(out)
            })
        });
        let Some(at) = quantized else {
            return Err(format!(
                "weight '{name}' is not an initializer of the model (the importer made it)"
            ));
        };
        let node = graph.node[at].clone();
        if requantize == Requantize::Yes {
            let layer = quantize_again(graph, &index, at, value)?;
            requantized.push(layer);
            dropped.extend(node.input[1..4.min(node.input.len())].iter().cloned());
            continue;
        }
        let b = node.input.get(1).cloned().unwrap_or_default();
        let weight_name = format!("{b}_merged");
        graph
            .initializer
            .push(float_proto(&weight_name, value, DataType::Float).expect("float"));
        let out = node.output[0].clone();
        let bias = node.input.get(5).filter(|n| !n.is_empty()).cloned();
        let product_out = match &bias {
            Some(_) => format!("{out}_matmul"),
            None => out.clone(),
        };
        let mut nodes = vec![NodeProto {
            name: node.name.clone(),
            op_type: Some("MatMul".into()),
            input: vec![node.input[0].clone(), weight_name],
            output: vec![product_out.clone()],
            ..Default::default()
        }];
        if let Some(bias) = bias {
            nodes.push(NodeProto {
                name: Some(format!("{}_bias", node.name())),
                op_type: Some("Add".into()),
                input: vec![product_out, bias],
                output: vec![out],
                ..Default::default()
            });
        }
        graph.node.splice(at..at + 1, nodes);
        dropped.extend(node.input[1..].iter().filter(|n| !n.is_empty()).cloned());
    }
    // Quantized tensors that no node reads any more (a bias stays: the Add reads it).
    let read: HashSet<&String> = graph.node.iter().flat_map(|n| &n.input).collect();
    let gone: HashSet<String> = dropped.into_iter().filter(|n| !read.contains(n)).collect();
    graph.initializer.retain(|t| !gone.contains(t.name()));
    Ok(Reweighted { model, requantized })
}

/// Quantizes `value` (`[K, N]`) into new initializers in the layout of the MatMulNBits node at
/// `at`, and points the node at them.
fn quantize_again(
    graph: &mut GraphProto,
    index: &HashMap<String, usize>,
    at: usize,
    value: &Tensor,
) -> std::result::Result<Requantized, NotInPlace> {
    let node = &graph.node[at];
    let attr = |name: &str| {
        node.attribute
            .iter()
            .find(|a| a.name() == name)
            .map(|a| a.i() as usize)
    };
    // The importer checked the node's layout against these sizes.
    let (k, n) = (value.shape[0], value.shape[1]);
    let (bits, block) = (attr("bits").unwrap_or(4), attr("block_size").unwrap_or(0));
    if block == 0 {
        return Err(format!("MatMulNBits '{}' has no block_size", node.name()));
    }
    let init = |i: usize| {
        node.input
            .get(i)
            .filter(|name| !name.is_empty())
            .and_then(|name| index.get(name))
            .map(|&j| &graph.initializer[j])
    };
    let scales = init(2).ok_or("its scales are not an initializer")?;
    let scale_type = DataType::try_from(scales.data_type()).unwrap_or(DataType::Undefined);
    let zero = init(3);
    let form = match zero.map(|z| DataType::try_from(z.data_type())) {
        None => ZeroPointForm::Middle,
        Some(Ok(DataType::Uint8)) => ZeroPointForm::Packed,
        Some(_) => ZeroPointForm::Float,
    };
    // Scales (and float zero points) are rounded to their type before the codes are chosen.
    let store = |x: f64| match scale_type {
        DataType::Float16 => half::f16::from_f64(x).to_f64(),
        DataType::Bfloat16 => half::bf16::from_f64(x).to_f64(),
        _ => x as f32 as f64,
    };
    let w = value.to_f32();
    let q = quantize_nbits(&w, (k, n), (bits, block), form, store);
    let blocks = k.div_ceil(block);
    let codes = TensorProto {
        name: Some(format!("{}_merged", node.input[1])),
        dims: vec![n as i64, blocks as i64, (block * bits / 8) as i64],
        data_type: Some(DataType::Uint8 as i32),
        raw_data: Some(q.codes.into()),
        ..Default::default()
    };
    let floats = |like: &TensorProto, values: &[f64]| {
        let t = Tensor::f32(
            vec![values.len()],
            values.iter().map(|&v| v as f32).collect(),
        );
        let mut p = float_proto(&format!("{}_merged", like.name()), &t, scale_type)
            .ok_or_else(|| format!("its scales are {scale_type:?}, not a float type"))?;
        p.dims = like.dims.clone();
        Ok::<_, String>(p)
    };
    let mut new = vec![codes, floats(scales, &q.scales)?];
    if let Some(z) = zero {
        new.push(match form {
            ZeroPointForm::Packed => TensorProto {
                name: Some(format!("{}_merged", z.name())),
                dims: z.dims.clone(),
                data_type: Some(DataType::Uint8 as i32),
                raw_data: Some(q.zero_codes.into()),
                ..Default::default()
            },
            _ => floats(z, &q.zero_floats)?,
        });
    }
    let report = Requantized {
        node: node.name().to_string(),
        bits,
        block,
        max_steps: q.max_steps,
        max_abs: q.max_abs,
        max_weight: w.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs())),
    };
    for (i, t) in new.into_iter().enumerate() {
        graph.node[at].input[i + 1] = t.name().to_string();
        graph.initializer.push(t);
    }
    Ok(report)
}

/// `value` as an initializer of `data_type` (float32, or float16 and bfloat16 rounded to
/// nearest even), or None for other types.
fn float_proto(name: &str, value: &Tensor, data_type: DataType) -> Option<TensorProto> {
    let v = value.to_f32();
    let raw: Vec<u8> = match data_type {
        DataType::Float => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DataType::Float16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        DataType::Bfloat16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        _ => return None,
    };
    Some(TensorProto {
        name: Some(name.to_string()),
        dims: value.shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(data_type as i32),
        raw_data: Some(raw.into()),
        ..Default::default()
    })
}

/// Writes `model` to `out` atomically. When the model read from `model_dir` kept tensors as
/// external data, every large tensor goes to `<out>.data` (copied from the input's data file,
/// or the new bytes), so the written model never refers to the input's files.
pub fn save_reweighted(model: ModelProto, model_dir: &Path, out: &Path) -> Result<()> {
    let graph = model.graph.as_ref().expect("load_model checked the graph");
    let external = graph
        .initializer
        .iter()
        .any(|t| t.data_location() == DataLocation::External);
    if !external {
        return super::save_model(&model, out);
    }
    let mut model = model;
    let mut data = ExternalData::create(out)?;
    let written = (|| -> Result<()> {
        let graph = model.graph.as_mut().expect("checked above");
        for t in graph.initializer.iter_mut() {
            let what = format!("initializer '{}'", t.name());
            if t.data_location() == DataLocation::External {
                let (map, range) = external_bytes(t, model_dir, &what)?;
                *t = data.write_raw(t, &map[range])?;
            } else if let Some(raw) = t.raw_data.clone().filter(|r| r.len() >= EXTERNAL_MIN_BYTES) {
                *t = data.write_raw(t, &raw)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = written {
        data.abandon();
        return Err(e);
    }
    let len = model.encoded_len();
    if len > super::MAX_PROTO_BYTES {
        data.abandon();
        return Err(Error::onnx_at(
            Subject::file(out),
            format!("the graph encodes to {len} bytes without its large tensors, over protobuf's 2 GiB limit"),
        ));
    }
    super::write_atomic_with(out, &model.encode_to_vec(), Some(data))
}
