//! Element-wise ops beyond one IR op each: Cast (by element type), Where, Greater and
//! GreaterOrEqual (Less and LessOrEqual swapped), variadic Max and Min, and Clip.

use super::Ctx;
use crate::error::Result;
use crate::ir::{Binary, NodeId, Op};
use crate::onnx::data::ir_dtype;

/// `a > b` is `b < a`.
pub fn greater(cx: &mut Ctx) -> Result<NodeId> {
    let (a, b) = (cx.input(0)?, cx.input(1)?);
    cx.add(Op::Binary(Binary::Less), &[b, a])
}

/// `a >= b` is `b <= a`.
pub fn greater_or_equal(cx: &mut Ctx) -> Result<NodeId> {
    let (a, b) = (cx.input(0)?, cx.input(1)?);
    cx.add(Op::Binary(Binary::LessOrEqual), &[b, a])
}

pub fn max(cx: &mut Ctx) -> Result<NodeId> {
    fold_variadic(cx, Binary::Max)
}

pub fn min(cx: &mut Ctx) -> Result<NodeId> {
    fold_variadic(cx, Binary::Min)
}

/// A variadic op with broadcasting as a chain of binary ops: ((a op b) op c) ...
fn fold_variadic(cx: &mut Ctx, op: Binary) -> Result<NodeId> {
    let inputs = cx.inputs_from(0)?;
    let Some((&first, rest)) = inputs.split_first() else {
        return Err(cx.err("no inputs".into()));
    };
    if rest.is_empty() {
        return cx.add(Op::Identity, &[first]);
    }
    let mut acc = first;
    for (i, &x) in rest.iter().enumerate() {
        acc = if i + 1 == rest.len() {
            cx.add(Op::Binary(op), &[acc, x])?
        } else {
            let name = cx.temp_name(&format!("step{i}"));
            cx.add_named(Op::Binary(op), &[acc, x], &name)?
        };
    }
    Ok(acc)
}

/// Clip(x, min, max) as Min(Max(x, min), max); either bound may be absent.
pub fn clip(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let (lo, hi) = (cx.opt_input(1)?, cx.opt_input(2)?);
    match (lo, hi) {
        (None, None) => cx.add(Op::Identity, &[x]),
        (Some(lo), None) => cx.add(Op::Binary(Binary::Max), &[x, lo]),
        (None, Some(hi)) => cx.add(Op::Binary(Binary::Min), &[x, hi]),
        (Some(lo), Some(hi)) => {
            let name = cx.temp_name("at_least_min");
            let low = cx.add_named(Op::Binary(Binary::Max), &[x, lo], &name)?;
            cx.add(Op::Binary(Binary::Min), &[low, hi])
        }
    }
}

/// Cast to a float type (computed as float32), an integer type (int64) or bool. A cast to the
/// type the value already has is an Identity.
pub fn cast(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let to = cx
        .attr_int("to")?
        .ok_or_else(|| cx.err("the 'to' attribute is missing".into()))?;
    let to = ir_dtype(to as i32).ok_or_else(|| {
        cx.unsupported(format!(
            "Cast to {}",
            crate::onnx::data::dtype_name(to as i32)
        ))
    })?;
    if cx.dtype(x) == to {
        return cx.add(Op::Identity, &[x]);
    }
    cx.add(Op::Cast { to }, &[x])
}

pub fn where_(cx: &mut Ctx) -> Result<NodeId> {
    let (c, x, y) = (cx.input(0)?, cx.input(1)?, cx.input(2)?);
    cx.add(Op::Where, &[c, x, y])
}
