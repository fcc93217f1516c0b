//! Conv (1-D, 2-D and higher; strides, pads, auto_pad, dilations, groups), lowered at import to
//! ops dorac already has, so that its reference, kernels and gradients are theirs:
//!
//! ```text
//! X [N, C, *in]  --Reshape-->  [N, C*S]  --Gather(axis 1, constant window table)-->  cols
//! cols [N, OS, C*K] @ Wt [C*K, M]  (+ B)  --Transpose, Reshape-->  Y [N, M, *out]
//! ```
//!
//! (S, OS, K: the number of input positions, output positions and kernel taps.) The window
//! table holds, for every output position and kernel tap, the flat index of the input element
//! it reads; a tap that falls in the padding holds `C*S`, an index outside the data, which
//! Gather reads as 0. The product is then an ordinary linear layer `x @ W` whose weight is the
//! filter bank flattened to `[C*K, M]` (PEFT's DoRA norm of a Conv is over every dim but the
//! output channel: the column norm of that matrix), so linear-layer discovery, DoRA insertion,
//! adapters and merge treat a Conv like any other projection. With `group` G > 1 every tensor
//! gets a group dim: cols `[N, G, OS, C/G*K]` @ `[G, C/G*K, M/G]`.
//!
//! The input's gradient is Gather's with constant indices (a gather of the cotangent through the
//! inverted table, then a sum), the weight's is MatMul's. The cost is the `cols` tensor, K/stride²
//! times the input: nothing for patch embeddings (stride = kernel), K times for stride-1 convs.

use super::Ctx;
use crate::error::Result;
use crate::ir::{Binary, NodeId, Op};
use crate::tensor::{shape_str, Tensor};

/// Largest flat input index the window table may hold: ids travel as f32 on the device.
pub(super) const MAX_FLAT_INDEX: usize = 1 << 24;

/// The geometry of one convolution, all per spatial dim.
struct Geometry {
    /// Input spatial dims.
    input: Vec<usize>,
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    /// Padding before each dim (the padding after only shows in `output`).
    pad_begin: Vec<usize>,
    output: Vec<usize>,
}

pub fn conv(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let w = cx.input(1)?;
    let bias = cx.opt_input(2)?;
    conv_of(cx, x, w, bias, None)
}

/// The Conv of the node's attributes over `x` and `w` (float values, whichever node computes
/// them), its result named `name` (the node's output when None).
pub(super) fn conv_of(
    cx: &mut Ctx,
    x: NodeId,
    w: NodeId,
    bias: Option<NodeId>,
    name: Option<&str>,
) -> Result<NodeId> {
    let (xs, ws) = (cx.shape(x), cx.shape(w));
    if xs.len() < 3 || ws.len() != xs.len() {
        return Err(cx.err(format!(
            "X {} and W {} must be [N, C, spatial...] and [M, C/group, kernel...] of the same rank >= 3",
            shape_str(&xs),
            shape_str(&ws)
        )));
    }
    for v in [x, w].into_iter().chain(bias) {
        if !cx.dtype(v).is_float() {
            let name = cx.graph.node(v).name.clone();
            return Err(cx.err(format!(
                "'{name}' is {}, expected a float tensor",
                cx.dtype(v).name()
            )));
        }
    }
    let (n, c, m) = (xs[0], xs[1], ws[0]);
    let group = positive(cx, "group", cx.attr_int("group")?.unwrap_or(1))?;
    if c % group != 0 || m % group != 0 || ws[1] * group != c {
        return Err(cx.err(format!(
            "group {group} does not fit X {} and W {}: C must be W's dim 1 times group, and M a multiple of group",
            shape_str(&xs),
            shape_str(&ws)
        )));
    }
    if let Some(b) = bias {
        if cx.shape(b) != [m] {
            return Err(cx.err(format!(
                "B has shape {}, expected [{m}]",
                shape_str(&cx.shape(b))
            )));
        }
    }
    let geo = geometry(cx, &xs[2..], &ws[2..])?;
    let (s, os, k): (usize, usize, usize) = (
        xs[2..].iter().product(),
        geo.output.iter().product(),
        ws[2..].iter().product(),
    );
    let (cg, mg) = (c / group, m / group);
    if c * s >= MAX_FLAT_INDEX {
        return Err(cx.unsupported(format!(
            "Conv over an input of {} elements per example (at most {MAX_FLAT_INDEX})",
            c * s
        )));
    }

    // cols: [N, OS, C*K], or [N, G, OS, C/G*K] with groups.
    let flat = cx.add_named(
        Op::Reshape {
            shape: vec![n, c * s],
        },
        &[x],
        &cx.temp_name("flat"),
    )?;
    let table = window_table(&geo, group, cg, s);
    let table_shape = if group == 1 {
        vec![os, cg * k]
    } else {
        vec![group, os, cg * k]
    };
    let table = cx.add_const(&cx.temp_name("windows"), Tensor::i64(table_shape, table))?;
    let cols = cx.add_named(
        Op::Gather { axis: 1 },
        &[flat, table],
        &cx.temp_name("cols"),
    )?;

    let filters = filter_matrix(cx, w, group, mg, cg * k)?;
    let mut y = cx.add_named(Op::MatMul, &[cols, filters], &cx.temp_name("matmul"))?;
    if let Some(b) = bias {
        let b = if group == 1 {
            b
        } else {
            let shape = vec![group, 1, mg];
            cx.add_named(Op::Reshape { shape }, &[b], &cx.temp_name("bias"))?
        };
        y = cx.add_named(Op::Binary(Binary::Add), &[y, b], &cx.temp_name("add"))?;
    }
    let perm = if group == 1 {
        vec![0, 2, 1]
    } else {
        vec![0, 1, 3, 2]
    };
    let y = cx.add_named(
        Op::Transpose { perm },
        &[y],
        &cx.temp_name("channels_first"),
    )?;
    let mut shape = vec![n, m];
    shape.extend(&geo.output);
    match name {
        Some(name) => cx.add_named(Op::Reshape { shape }, &[y], name),
        None => cx.add(Op::Reshape { shape }, &[y]),
    }
}

/// An attribute that must be at least 1.
pub(super) fn positive(cx: &Ctx, what: &str, v: i64) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&v| v >= 1)
        .ok_or_else(|| cx.err(format!("{what} is {v}, expected at least 1")))
}

/// A per-dim attribute with its default, checked to have one entry per spatial dim.
pub(super) fn per_dim(cx: &Ctx, name: &str, dims: usize, default: i64) -> Result<Vec<i64>> {
    let v = cx.attr_ints(name)?.unwrap_or_else(|| vec![default; dims]);
    if v.len() != dims {
        return Err(cx.err(format!(
            "{name} has {} entries, expected {dims} (one per spatial dim)",
            v.len()
        )));
    }
    Ok(v)
}

/// Strides, dilations, padding and output size, from the attributes (ONNX's Conv rules:
/// explicit `pads` or `auto_pad` SAME_UPPER / SAME_LOWER / VALID).
fn geometry(cx: &Ctx, input: &[usize], kernel: &[usize]) -> Result<Geometry> {
    let dims = input.len();
    if let Some(ks) = cx.attr_ints("kernel_shape")? {
        if ks.iter().map(|&d| d as usize).ne(kernel.iter().copied()) {
            return Err(cx.err(format!(
                "kernel_shape {ks:?} differs from W's spatial dims {kernel:?}"
            )));
        }
    }
    let to_pos = |name: &str, v: Vec<i64>| -> Result<Vec<usize>> {
        v.into_iter().map(|d| positive(cx, name, d)).collect()
    };
    let strides = to_pos("strides", per_dim(cx, "strides", dims, 1)?)?;
    let dilations = to_pos("dilations", per_dim(cx, "dilations", dims, 1)?)?;
    let extent: Vec<usize> = (0..dims)
        .map(|d| dilations[d] * (kernel[d] - 1) + 1)
        .collect();
    let auto_pad = cx.attr_string("auto_pad")?;
    let (pad_begin, pad_end) = match auto_pad.as_deref() {
        None | Some("NOTSET") => {
            let pads = per_dim(cx, "pads", dims * 2, 0)?;
            if pads.iter().any(|&p| p < 0) {
                return Err(cx.err(format!("pads {pads:?} are negative")));
            }
            let pads: Vec<usize> = pads.iter().map(|&p| p as usize).collect();
            (pads[..dims].to_vec(), pads[dims..].to_vec())
        }
        Some("VALID") => (vec![0; dims], vec![0; dims]),
        Some(mode @ ("SAME_UPPER" | "SAME_LOWER")) => {
            let mut begin = vec![];
            let mut end = vec![];
            for d in 0..dims {
                let out = input[d].div_ceil(strides[d]);
                let total = ((out - 1) * strides[d] + extent[d]).saturating_sub(input[d]);
                let small = total / 2;
                let (b, e) = if mode == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                begin.push(b);
                end.push(e);
            }
            (begin, end)
        }
        Some(other) => {
            return Err(cx.err(format!(
                "auto_pad is '{other}', expected NOTSET, SAME_UPPER, SAME_LOWER or VALID"
            )))
        }
    };
    let mut output = vec![];
    for d in 0..dims {
        let padded = input[d] + pad_begin[d] + pad_end[d];
        if padded < extent[d] {
            return Err(cx.err(format!(
                "spatial dim {d}: the kernel spans {} positions but the padded input has {padded}",
                extent[d]
            )));
        }
        output.push((padded - extent[d]) / strides[d] + 1);
    }
    Ok(Geometry {
        input: input.to_vec(),
        kernel: kernel.to_vec(),
        strides,
        dilations,
        pad_begin,
        output,
    })
}

/// Every index of a tensor of `shape`, in row-major order (the output positions or kernel taps
/// of a window table).
pub(super) fn positions(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut all = vec![vec![]];
    for &d in shape {
        all = (all.into_iter())
            .flat_map(|p| {
                (0..d).map(move |i| {
                    let mut q = p.clone();
                    q.push(i);
                    q
                })
            })
            .collect();
    }
    all
}

/// The flat index into X reshaped to `[N, C*S]` that each (group, output position, channel in
/// group, kernel tap) reads, in that row-major order; `C*S` (read as 0) for padding taps.
fn window_table(geo: &Geometry, group: usize, cg: usize, s: usize) -> Vec<i64> {
    let dims = geo.input.len();
    let outside = (group * cg * s) as i64;
    let (outs, taps) = (positions(&geo.output), positions(&geo.kernel));
    let mut table = Vec::with_capacity(group * outs.len() * cg * taps.len());
    for g in 0..group {
        for o in &outs {
            for ci in 0..cg {
                let channel = g * cg + ci;
                for t in &taps {
                    let mut flat = 0usize;
                    let mut inside = true;
                    for d in 0..dims {
                        let pos = (o[d] * geo.strides[d] + t[d] * geo.dilations[d]) as i64
                            - geo.pad_begin[d] as i64;
                        if pos < 0 || pos >= geo.input[d] as i64 {
                            inside = false;
                            break;
                        }
                        flat = flat * geo.input[d] + pos as usize;
                    }
                    table.push(if inside {
                        (channel * s + flat) as i64
                    } else {
                        outside
                    });
                }
            }
        }
    }
    table
}

/// W `[M, C/G, kernel...]` as the right operand of the product: `[C*K, M]`, or `[G, C/G*K, M/G]`.
/// A constant filter bank is rearranged here (the linear layer's weight is then a constant, as
/// adapters need); a computed one through Reshape and Transpose nodes.
fn filter_matrix(cx: &mut Ctx, w: NodeId, group: usize, mg: usize, rows: usize) -> Result<NodeId> {
    let name = cx.temp_name("filters");
    if let Op::Const(t) = &cx.graph.node(w).op {
        if let Some(v) = t.as_f32() {
            // out[g][r][j] = W[g * mg + j][r]
            let mut out = vec![0f32; group * rows * mg];
            for g in 0..group {
                for r in 0..rows {
                    for j in 0..mg {
                        out[(g * rows + r) * mg + j] = v[(g * mg + j) * rows + r];
                    }
                }
            }
            if group > 1 {
                return cx.add_const(&name, Tensor::f32(vec![group, rows, mg], out));
            }
            let id = cx.add_const(&name, Tensor::f32(vec![rows, mg], out))?;
            let filters = cx.shape(w);
            cx.graph.set_conv_filter(id, filters);
            return Ok(id);
        }
    }
    let (shape, perm) = if group == 1 {
        (vec![mg, rows], vec![1, 0])
    } else {
        (vec![group, mg, rows], vec![0, 2, 1])
    };
    let r = cx.add_named(Op::Reshape { shape }, &[w], &cx.temp_name("filters_rows"))?;
    cx.add_named(Op::Transpose { perm }, &[r], &name)
}
