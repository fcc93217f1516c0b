//! Gather, GatherElements and GatherND. Indices may be constants or runtime values (token ids);
//! on the device ids are f32, exact below 2^24.

use super::Ctx;
use crate::error::Result;
use crate::ir::{NodeId, Op};

/// The data and indices inputs; the indices must be integers.
fn operands(cx: &Ctx) -> Result<(NodeId, NodeId)> {
    let (data, idx) = (cx.input(0)?, cx.input(1)?);
    if cx.dtype(idx).is_float() {
        return Err(cx.err(format!(
            "the indices '{}' are {}, expected int64 or int32",
            cx.graph.node(idx).name,
            cx.dtype(idx).name()
        )));
    }
    Ok((data, idx))
}

pub fn gather(cx: &mut Ctx) -> Result<NodeId> {
    let (data, idx) = operands(cx)?;
    let rank = cx.shape(data).len();
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(0), rank, false)?;
    cx.add(Op::Gather { axis }, &[data, idx])
}

pub fn gather_elements(cx: &mut Ctx) -> Result<NodeId> {
    let (data, idx) = operands(cx)?;
    let rank = cx.shape(data).len();
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(0), rank, false)?;
    cx.add(Op::GatherElements { axis }, &[data, idx])
}

pub fn gather_nd(cx: &mut Ctx) -> Result<NodeId> {
    let (data, idx) = operands(cx)?;
    let batch_dims = cx.attr_int("batch_dims")?.unwrap_or(0);
    let batch_dims =
        usize::try_from(batch_dims).map_err(|_| cx.err(format!("batch_dims is {batch_dims}")))?;
    cx.add(Op::GatherND { batch_dims }, &[data, idx])
}
