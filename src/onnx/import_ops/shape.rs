//! Ops whose result the static shapes decide at import: Shape, Size, ConstantOfShape, Range.
//! Each becomes a constant, so none of them ever reaches the IR as a runtime node.

use super::Ctx;
use crate::error::Result;
use crate::ir::NodeId;
use crate::onnx::data;
use crate::tensor::{numel, Array, DType, Tensor};

/// Shape (with opset 15's `start`/`end`, negative counting from the end, clamped).
pub fn shape(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let dims = cx.shape(x);
    let rank = dims.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clamp(cx.attr_int("start")?.unwrap_or(0));
    let end = clamp(cx.attr_int("end")?.unwrap_or(rank));
    let v: Vec<i64> = dims[start..end.max(start)]
        .iter()
        .map(|&d| d as i64)
        .collect();
    let name = cx.name.clone();
    cx.add_const(&name, Tensor::i64(vec![v.len()], v))
}

pub fn size(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let n = numel(&cx.shape(x)) as i64;
    let name = cx.name.clone();
    cx.add_const(&name, Tensor::i64(vec![], vec![n]))
}

/// ConstantOfShape: the `value` attribute (one element, float32 0 by default) repeated.
pub fn constant_of_shape(cx: &mut Ctx) -> Result<NodeId> {
    let dims = cx
        .const_ints(0, "shape")?
        .ok_or_else(|| cx.err("the shape input is missing".into()))?;
    let shape = dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|_| cx.err(format!("shape {dims:?} has a negative size")))?;
    let value = match cx.attr_tensor("value")? {
        Some(t) => {
            let what = format!("the value of ConstantOfShape node '{}'", cx.label);
            data::tensor_from_proto(t, cx.model_dir, &what)?
        }
        None => Tensor::scalar(0.0),
    };
    if value.numel() != 1 {
        return Err(cx.err(format!(
            "the value attribute has {} elements, expected 1",
            value.numel()
        )));
    }
    crate::tensor::check_size(&shape, 8, || format!("ConstantOfShape node '{}'", cx.label))?;
    let n = numel(&shape);
    let filled = Array::new(shape, vec![value.to_f64()[0]; n]).to_tensor(value.dtype());
    let name = cx.name.clone();
    cx.add_const(&name, filled)
}

/// Range: `start, start + delta, ...` below `limit` (above it for a negative delta), in the
/// type of `start`. All three inputs must be known at import (the length decides the shape).
pub fn range(cx: &mut Ctx) -> Result<NodeId> {
    let start_id = cx.input(0)?;
    let dtype = cx.dtype(start_id);
    let scalar = |i: usize, what: &str| -> Result<f64> {
        cx.const_scalar(i, what)?
            .ok_or_else(|| cx.err(format!("the {what} input is missing")))
    };
    let (start, limit, delta) = (
        scalar(0, "start")?,
        scalar(1, "limit")?,
        scalar(2, "delta")?,
    );
    if delta == 0.0 {
        return Err(cx.err("delta is 0".into()));
    }
    let steps = ((limit - start) / delta).ceil().max(0.0);
    if !steps.is_finite() {
        return Err(cx.err(format!(
            "start {start}, limit {limit}, delta {delta} give no finite length"
        )));
    }
    // `as` saturates: a length past usize::MAX fails the budget below.
    let n = steps as usize;
    crate::tensor::check_size(&[n], 8, || format!("Range node '{}'", cx.label))?;
    let values: Vec<f64> = (0..n).map(|i| start + i as f64 * delta).collect();
    let value = Array::new(vec![n], values).to_tensor(match dtype {
        DType::Bool => DType::I64,
        t => t,
    });
    let name = cx.name.clone();
    cx.add_const(&name, value)
}
