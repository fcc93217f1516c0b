//! Ops that move elements without computing new ones: Unsqueeze and Squeeze (reshapes),
//! Concat, Slice, Split (one Slice per output), Expand, and Trilu.

use super::Ctx;
use crate::error::Result;
use crate::ir::op::{broadcast, resolve_slice, MAX_CONCAT_INPUTS};
use crate::ir::{NodeId, Op};
use crate::tensor::shape_str;

/// Axes from the `axes` attribute (before opset 13) or input 1 (from 13).
fn axes_arg(cx: &Ctx) -> Result<Option<Vec<i64>>> {
    if cx.opset >= 13 {
        match cx.const_ints(1, "axes input")? {
            Some(a) => Ok(Some(a)),
            None => cx.attr_ints("axes"),
        }
    } else {
        cx.attr_ints("axes")
    }
}

pub fn unsqueeze(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let from = cx.shape(x);
    let axes = axes_arg(cx)?.ok_or_else(|| cx.err("no axes given".into()))?;
    let rank = from.len() + axes.len();
    let mut ones = vec![false; rank];
    for &a in &axes {
        let a = cx.axis(a, rank, false)?;
        if std::mem::replace(&mut ones[a], true) {
            return Err(cx.err(format!("axes {axes:?} name dim {a} twice")));
        }
    }
    let mut rest = from.iter();
    let shape = ones
        .iter()
        .map(|&one| if one { 1 } else { *rest.next().unwrap() })
        .collect();
    cx.add(Op::Reshape { shape }, &[x])
}

pub fn squeeze(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let from = cx.shape(x);
    let drop: Vec<usize> = match axes_arg(cx)? {
        None => (0..from.len()).filter(|&d| from[d] == 1).collect(),
        Some(axes) => axes
            .iter()
            .map(|&a| cx.axis(a, from.len(), false))
            .collect::<Result<_>>()?,
    };
    if let Some(&d) = drop.iter().find(|&&d| from[d] != 1) {
        return Err(cx.err(format!(
            "dim {d} of {} has size {}, not 1: it cannot be squeezed",
            shape_str(&from),
            from[d]
        )));
    }
    let shape = (0..from.len())
        .filter(|d| !drop.contains(d))
        .map(|d| from[d])
        .collect();
    cx.add(Op::Reshape { shape }, &[x])
}

/// Concat; more inputs than one kernel can bind become a tree of concatenations.
pub fn concat(cx: &mut Ctx) -> Result<NodeId> {
    let mut parts = cx.inputs_from(0)?;
    let Some(&first) = parts.first() else {
        return Err(cx.err("no inputs".into()));
    };
    let axis = cx.axis(
        cx.attr_int("axis")?
            .ok_or_else(|| cx.err("the axis attribute is missing".into()))?,
        cx.shape(first).len(),
        false,
    )?;
    if parts.len() == 1 {
        return cx.add(Op::Identity, &parts);
    }
    let mut level = 0;
    while parts.len() > MAX_CONCAT_INPUTS {
        let mut joined = vec![];
        for (i, chunk) in parts.chunks(MAX_CONCAT_INPUTS).enumerate() {
            let name = cx.temp_name(&format!("part{level}_{i}"));
            joined.push(match chunk {
                [one] => *one,
                _ => cx.add_named(Op::Concat { axis }, chunk, &name)?,
            });
        }
        parts = joined;
        level += 1;
    }
    cx.add(Op::Concat { axis }, &parts)
}

pub fn slice(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let from = cx.shape(x);
    let need = |v: Option<Vec<i64>>, what: &str| {
        v.ok_or_else(|| cx.err(format!("the {what} input is missing")))
    };
    let starts = need(cx.const_ints(1, "starts input")?, "starts")?;
    let ends = need(cx.const_ints(2, "ends input")?, "ends")?;
    let axes = cx.const_ints(3, "axes input")?;
    let steps = cx.const_ints(4, "steps input")?;
    let (starts, ends, steps) =
        resolve_slice(&from, &starts, &ends, axes.as_deref(), steps.as_deref())
            .map_err(|m| cx.err(m))?;
    window(cx, x, starts, ends, steps, None)
}

/// The Slice of `x` (an Identity when it is the whole tensor), named after output `output` of
/// the node, or after its first output when None.
fn window(
    cx: &mut Ctx,
    x: NodeId,
    starts: Vec<i64>,
    ends: Vec<i64>,
    steps: Vec<i64>,
    output: Option<usize>,
) -> Result<NodeId> {
    let from = cx.shape(x);
    let whole =
        (0..from.len()).all(|d| starts[d] == 0 && ends[d] == from[d] as i64 && steps[d] == 1);
    let op = if whole {
        Op::Identity
    } else {
        Op::Slice {
            starts,
            ends,
            steps,
        }
    };
    match output {
        None => cx.add(op, &[x]),
        Some(i) => {
            let name = cx.node.output[i].clone();
            cx.add_named(op, &[x], &name)
        }
    }
}

/// Split into the sizes of the `split` input (attribute before opset 13), or into
/// `num_outputs` (opset 18) or as many outputs as the node has: equal parts, the last smaller.
/// Each output is its own Slice.
pub fn split(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let from = cx.shape(x);
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(0), from.len(), false)?;
    let dim = from[axis] as i64;
    let outputs = cx.node.output.len();
    let given = if cx.opset >= 13 {
        cx.const_ints(1, "split input")?
    } else {
        cx.attr_ints("split")?
    };
    let sizes: Vec<i64> = match given {
        Some(s) => {
            if s.len() != outputs || s.iter().any(|&v| v < 0) || s.iter().sum::<i64>() != dim {
                return Err(cx.err(format!(
                    "split sizes {s:?} do not divide dim {axis} ({dim}) into {outputs} outputs"
                )));
            }
            s
        }
        None => {
            let n = match cx.attr_int("num_outputs")? {
                Some(n) if n as usize != outputs => {
                    return Err(cx.err(format!(
                        "num_outputs is {n}, but the node has {outputs} outputs"
                    )))
                }
                _ => outputs as i64,
            };
            let part = (dim + n - 1) / n.max(1);
            (0..n).map(|i| part.min(dim - i * part).max(0)).collect()
        }
    };
    let mut first = None;
    let mut start = 0;
    for (i, &len) in sizes.iter().enumerate() {
        let mut starts = vec![0; from.len()];
        let mut ends: Vec<i64> = from.iter().map(|&d| d as i64).collect();
        starts[axis] = if len == 0 { 0 } else { start };
        ends[axis] = starts[axis] + len;
        start += len;
        if cx.node.output[i].is_empty() {
            continue;
        }
        let id = window(cx, x, starts, ends, vec![1; from.len()], Some(i))?;
        match i {
            0 => first = Some(id),
            _ => cx.set_output(i, id),
        }
    }
    first.ok_or_else(|| cx.err("the first output has no name".into()))
}

/// Expand: ONNX broadcasts both ways (the shape may hold 1 where the input is larger).
pub fn expand(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let dims = cx
        .const_ints(1, "shape input")?
        .ok_or_else(|| cx.err("the shape input is missing".into()))?;
    let shape = dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|_| cx.err(format!("shape {dims:?} has a negative size")))?;
    let from = cx.shape(x);
    let to = broadcast(&from, &shape).ok_or_else(|| {
        cx.err(format!(
            "{} does not broadcast with the shape {dims:?}",
            shape_str(&from)
        ))
    })?;
    if to == from {
        return cx.add(Op::Identity, &[x]);
    }
    cx.add(Op::Expand { shape: to }, &[x])
}

pub fn trilu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let upper = cx.attr_bool("upper", true)?;
    let k = match cx.const_scalar(1, "k input")? {
        Some(k) => k as i64,
        None => 0,
    };
    cx.add(Op::Trilu { upper, k }, &[x])
}
