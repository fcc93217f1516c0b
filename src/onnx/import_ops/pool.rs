//! MaxPool, AveragePool and GlobalMaxPool, lowered at import as Conv is (`conv.rs`): every
//! channel's input is flattened, a Gather with a constant table takes each output position's
//! window, `[N*C, OS, K]`, and a reduction over the window's K taps pools it (a sum divided by
//! the window's count, or a max over the taps that read the input). Their reference, kernels and
//! gradients are those ops'.
//!
//! Windows follow the ONNX reference: with explicit `pads`, the output is
//! `(in + pads - extent) / stride + 1` rounded down, or up under `ceil_mode` (less one where the
//! last window would start past the input and its leading padding); a window that then runs past
//! the padded input reads nothing there, and the extra length is split as padding, half of it
//! (rounded down) ahead of the input. `auto_pad` SAME_UPPER / SAME_LOWER pad
//! `(out - 1) * stride + kernel - in` around the input, VALID nothing. AveragePool divides by
//! the taps that read the input, or with `count_include_pad` by those inside the padded input.

use super::conv::{per_dim, positions, positive, MAX_FLAT_INDEX};
use super::lowered::tmp;
use super::Ctx;
use crate::error::Result;
use crate::ir::{Binary, NodeId, Op, Reduce};
use crate::tensor::{shape_str, DType, Tensor};

/// How a window's values combine.
#[derive(Clone, Copy, PartialEq)]
enum Pooling {
    Max,
    Average { include_pad: bool },
}

/// One spatial dim's windows: output `o` and tap `t` sit at `stride * o + dilation * t` of the
/// padded input, which holds the input from `begin` on and counts up to `limit`.
struct Windows {
    input: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    begin: usize,
    limit: usize,
    output: usize,
}

impl Windows {
    /// Whether tap `t` of output `o` lies inside the padded input, and the input index it reads.
    fn tap(&self, o: usize, t: usize) -> (bool, Option<usize>) {
        let p = self.stride * o + self.dilation * t;
        let read = (p >= self.begin && p - self.begin < self.input).then(|| p - self.begin);
        (p < self.limit, read)
    }
}

pub fn max_pool(cx: &mut Ctx) -> Result<NodeId> {
    cx.attr_int("storage_order")?; // Only the Indices output depends on it.
    pool(cx, Pooling::Max)
}

pub fn average_pool(cx: &mut Ctx) -> Result<NodeId> {
    let include_pad = cx.attr_int("count_include_pad")?.unwrap_or(0) != 0;
    pool(cx, Pooling::Average { include_pad })
}

/// The max over every spatial dim (keeping them, of length 1).
pub fn global_max_pool(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let rank = cx.shape(x).len();
    if rank < 3 {
        return Err(cx.err(format!(
            "the input has rank {rank}, expected at least 3 (N, C, spatial...)"
        )));
    }
    let op = Op::Reduce {
        kind: Reduce::Max,
        axes: (2..rank).collect(),
        keepdims: true,
    };
    cx.add(op, &[x])
}

fn pool(cx: &mut Ctx, pooling: Pooling) -> Result<NodeId> {
    let x = cx.input(0)?;
    let xs = cx.shape(x);
    // MaxPool takes integers too (compared as they are); an average needs floats.
    let dtype = cx.dtype(x);
    let typed = dtype.is_float() || (pooling == Pooling::Max && dtype == DType::I64);
    if xs.len() < 3 || !typed {
        return Err(cx.err(format!(
            "X is {} {}, expected a float tensor [N, C, spatial...] (or an integer one for \
             MaxPool)",
            dtype.name(),
            shape_str(&xs)
        )));
    }
    let (n, c) = (xs[0], xs[1]);
    let windows = windows(cx, &xs[2..])?;
    let s: usize = xs[2..].iter().product();
    if s >= MAX_FLAT_INDEX {
        return Err(cx.unsupported(format!(
            "{} over {s} positions per channel (at most {MAX_FLAT_INDEX})",
            cx.op_type()
        )));
    }
    let (ids, counted) = table(&windows, s);
    let os: usize = windows.iter().map(|w| w.output).product();
    let k: usize = windows.iter().map(|w| w.kernel).product();

    let flat = Op::Reshape {
        shape: vec![n * c, s],
    };
    let flat = tmp(cx, flat, &[x], "flat")?;
    let table = cx.add_const(
        &cx.temp_name("windows"),
        Tensor::i64(vec![os, k], ids.clone()),
    )?;
    let cols = tmp(cx, Op::Gather { axis: 1 }, &[flat, table], "cols")?;
    let reduce = |kind| Op::Reduce {
        kind,
        axes: vec![2],
        keepdims: false,
    };
    let pooled = match pooling {
        Pooling::Max => {
            // Taps that read no input take -inf, so that they never win.
            let read: Vec<bool> = ids.iter().map(|&i| i < s as i64).collect();
            let read = cx.add_const(&cx.temp_name("read"), Tensor::bool(vec![os, k], read))?;
            let floor = match dtype {
                DType::I64 => Tensor::i64(vec![], vec![i64::MIN]),
                _ => Tensor::scalar(f32::NEG_INFINITY),
            };
            let floor = cx.add_const(&cx.temp_name("floor"), floor)?;
            let taps = tmp(cx, Op::Where, &[read, cols, floor], "taps")?;
            tmp(cx, reduce(Reduce::Max), &[taps], "max")?
        }
        Pooling::Average { include_pad } => {
            let counts: Vec<f32> = (ids.chunks(k).zip(counted.chunks(k)))
                .map(|(ids, inside)| match include_pad {
                    true => inside.iter().filter(|&&b| b).count() as f32,
                    false => ids.iter().filter(|&&i| i < s as i64).count() as f32,
                })
                .collect();
            let sum = tmp(cx, reduce(Reduce::Sum), &[cols], "sum")?;
            let counts = cx.add_const(&cx.temp_name("counts"), Tensor::f32(vec![os], counts))?;
            tmp(cx, Op::Binary(Binary::Div), &[sum, counts], "mean")?
        }
    };
    let mut shape = vec![n, c];
    shape.extend(windows.iter().map(|w| w.output));
    cx.add(Op::Reshape { shape }, &[pooled])
}

/// Each spatial dim's windows, from `kernel_shape`, `strides`, `dilations`, `pads` or
/// `auto_pad`, and `ceil_mode`.
fn windows(cx: &Ctx, input: &[usize]) -> Result<Vec<Windows>> {
    let dims = input.len();
    let Some(kernel) = cx.attr_ints("kernel_shape")? else {
        return Err(cx.err("kernel_shape is missing".into()));
    };
    if kernel.len() != dims {
        return Err(cx.err(format!(
            "kernel_shape has {} entries, expected {dims} (one per spatial dim)",
            kernel.len()
        )));
    }
    let to_pos = |name: &str, v: Vec<i64>| -> Result<Vec<usize>> {
        v.into_iter().map(|d| positive(cx, name, d)).collect()
    };
    let kernel = to_pos("kernel_shape", kernel)?;
    let strides = to_pos("strides", per_dim(cx, "strides", dims, 1)?)?;
    let dilations = to_pos("dilations", per_dim(cx, "dilations", dims, 1)?)?;
    let ceil_mode = cx.attr_int("ceil_mode")?.unwrap_or(0) != 0;
    let auto_pad = cx.attr_string("auto_pad")?;
    let mut out = vec![];
    for d in 0..dims {
        let (i, k, s, dil) = (input[d], kernel[d], strides[d], dilations[d]);
        let extent = dil * (k - 1) + 1;
        let (output, begin, limit) = match auto_pad.as_deref() {
            None | Some("NOTSET") => {
                let pads = per_dim(cx, "pads", dims * 2, 0)?;
                if pads.iter().any(|&p| p < 0) {
                    return Err(cx.err(format!("pads {pads:?} are negative")));
                }
                let (pb, pe) = (pads[d] as usize, pads[dims + d] as usize);
                let padded = i + pb + pe;
                if padded < extent {
                    return Err(cx.err(format!(
                        "spatial dim {d}: the window spans {extent} positions but the padded \
                         input has {padded}"
                    )));
                }
                let mut output = (padded - extent) / s + 1;
                if ceil_mode && (padded - extent) % s != 0 {
                    output += 1;
                    if (output - 1) * s >= i + pb {
                        output -= 1;
                    }
                }
                let extra = ((output - 1) * s + extent).saturating_sub(padded);
                (output, pb + extra / 2, padded)
            }
            Some(mode @ ("SAME_UPPER" | "SAME_LOWER" | "VALID")) => {
                if ceil_mode {
                    return Err(cx.err(format!("ceil_mode with auto_pad {mode}")));
                }
                let (output, total) = match mode {
                    "VALID" if i < k => {
                        return Err(cx.err(format!(
                            "spatial dim {d}: the kernel spans {k} positions but the input has {i}"
                        )))
                    }
                    "VALID" => ((i - k) / s + 1, 0),
                    _ => {
                        let output = (i - 1) / s + 1;
                        (output, ((output - 1) * s + k).saturating_sub(i))
                    }
                };
                let begin = match mode {
                    "SAME_UPPER" => total / 2,
                    _ => total - total / 2,
                };
                (output, begin, i + total)
            }
            Some(other) => {
                return Err(cx.err(format!(
                    "auto_pad is '{other}', expected NOTSET, SAME_UPPER, SAME_LOWER or VALID"
                )))
            }
        };
        out.push(Windows {
            input: i,
            kernel: k,
            stride: s,
            dilation: dil,
            begin,
            limit,
            output,
        });
    }
    Ok(out)
}

/// The flat input index each (output position, tap) reads, `s` (read as 0) where it reads none,
/// and whether the tap lies inside the padded input; both in row-major (position, tap) order.
fn table(windows: &[Windows], s: usize) -> (Vec<i64>, Vec<bool>) {
    let outs = positions(&windows.iter().map(|w| w.output).collect::<Vec<_>>());
    let taps = positions(&windows.iter().map(|w| w.kernel).collect::<Vec<_>>());
    let (mut ids, mut inside) = (vec![], vec![]);
    for o in &outs {
        for t in &taps {
            let mut flat = Some(0usize);
            let mut counted = true;
            for (d, w) in windows.iter().enumerate() {
                let (within, read) = w.tap(o[d], t[d]);
                counted &= within;
                flat = flat.zip(read).map(|(f, r)| f * w.input + r);
            }
            let read = flat.filter(|_| counted);
            ids.push(read.map_or(s as i64, |f| f as i64));
            inside.push(counted);
        }
    }
    (ids, inside)
}
