//! ONNX Resize (opsets 11 to 19), lowered at import. Its interpolation is separable: along each
//! resized axis, every output element is a fixed weighted sum of a few input elements, so the
//! axis is resized by a product with an `[out, in]` matrix of those weights, computed here from
//! the scales or sizes (known at import) and the attributes. Nearest-neighbour resizing, whose
//! weights pick one element, is a Gather instead (exact for every element type). The products,
//! gathers and their gradients are existing ops; no kernel of its own.
//!
//! The weights follow the ONNX reference: an output index `y` maps to the input coordinate `x`
//! by `coordinate_transformation_mode`; the taps are the `n` input indices nearest `x` (ties to
//! the lower ones: at a whole `x` the window ends at `x`), clamped into the input (edge
//! padding); the weights are the mode's (`nearest_mode`, linear, cubic with `cubic_coeff_a`,
//! their antialiased forms stretched by `1 / scale` when downscaling), taps outside the input
//! dropped and the rest renormalised under `exclude_outside`. `tf_crop_and_resize` gives
//! `extrapolation_value` where `x` falls outside the input.

use super::lowered::tmp;
use super::Ctx;
use crate::error::Result;
use crate::ir::{Binary, NodeId, Op};
use crate::tensor::{shape_str, Tensor};

/// How output indices map to input coordinates (`coordinate_transformation_mode`).
#[derive(Clone, Copy, PartialEq)]
enum Coordinates {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfCropAndResize,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Nearest(Rounding),
    Linear,
    Cubic(f64),
}

/// `nearest_mode`: which of the two neighbours a coordinate between them takes.
#[derive(Clone, Copy, PartialEq)]
enum Rounding {
    PreferFloor,
    PreferCeil,
    Floor,
    Ceil,
}

/// One axis to resize: its output length, scale and region of interest.
struct Axis {
    axis: usize,
    len: usize,
    out: usize,
    scale: f64,
    roi: (f64, f64),
}

/// The interpolation of one axis: `weights[o]` holds `(input index, weight)` pairs; `outside[o]`
/// is set where `tf_crop_and_resize` extrapolates.
struct AxisMap {
    weights: Vec<Vec<(usize, f64)>>,
    outside: Vec<bool>,
}

pub fn resize(cx: &mut Ctx) -> Result<NodeId> {
    if cx.opset < 11 {
        return Err(cx.unsupported(format!(
            "Resize of opset {} (its coordinates predate coordinate_transformation_mode; \
             re-export at opset 11 or later)",
            cx.opset
        )));
    }
    let x = cx.input(0)?;
    let shape = cx.shape(x);
    let rank = shape.len();
    let coordinates = coordinates(cx)?;
    let mode = mode(cx)?;
    let antialias = cx.attr_int("antialias")?.unwrap_or(0) != 0;
    let exclude_outside = cx.attr_int("exclude_outside")?.unwrap_or(0) != 0;
    let extrapolation = cx.attr_float("extrapolation_value")?.unwrap_or(0.0) as f64;
    let axes = resized_axes(cx, rank)?;
    let roi = match coordinates {
        Coordinates::TfCropAndResize => match cx.const_input(1, "roi")? {
            Some(t) => Some(t.to_f64()),
            None => return Err(cx.err("tf_crop_and_resize without the roi input".into())),
        },
        _ => {
            cx.opt_input(1)?;
            None
        }
    };
    let scales = cx.const_input(2, "scales")?.map(|t| t.to_f64());
    let sizes = cx.const_ints(3, "sizes")?;
    let plan = axis_plan(cx, &shape, &axes, scales, sizes, roi.as_deref())?;

    let float = cx.dtype(x).is_float();
    let gathers = matches!(mode, Mode::Nearest(_)) && coordinates != Coordinates::TfCropAndResize;
    if !float && !gathers {
        return Err(cx.err(format!(
            "{} input: only mode 'nearest' resizes a non-float tensor",
            cx.dtype(x).name()
        )));
    }
    let mut y = x;
    let mut outside: Vec<(usize, Vec<bool>)> = vec![];
    for a in &plan {
        let map = axis_map(a, mode, coordinates, antialias, exclude_outside);
        y = match gathers {
            true => gather_axis(cx, y, a, &map)?,
            false => product_axis(cx, y, a, &map, rank)?,
        };
        if map.outside.iter().any(|&o| o) {
            outside.push((a.axis, map.outside));
        }
    }
    if !outside.is_empty() && extrapolation != 0.0 {
        y = add_extrapolation(cx, y, &outside, extrapolation)?;
    }
    cx.add(Op::Identity, &[y])
}

fn coordinates(cx: &Ctx) -> Result<Coordinates> {
    let name = cx.attr_string("coordinate_transformation_mode")?;
    Ok(match name.as_deref().unwrap_or("half_pixel") {
        "half_pixel" => Coordinates::HalfPixel,
        "half_pixel_symmetric" => Coordinates::HalfPixelSymmetric,
        "pytorch_half_pixel" => Coordinates::PytorchHalfPixel,
        "align_corners" => Coordinates::AlignCorners,
        "asymmetric" => Coordinates::Asymmetric,
        "tf_crop_and_resize" => Coordinates::TfCropAndResize,
        other => {
            return Err(cx.err(format!(
                "coordinate_transformation_mode '{other}', expected half_pixel, \
                 half_pixel_symmetric, pytorch_half_pixel, align_corners, asymmetric or \
                 tf_crop_and_resize"
            )))
        }
    })
}

fn mode(cx: &Ctx) -> Result<Mode> {
    // Every attribute is read, whichever mode uses it: the importer refuses unread ones.
    let rounding = cx.attr_string("nearest_mode")?;
    let rounding = match rounding.as_deref().unwrap_or("round_prefer_floor") {
        "round_prefer_floor" => Rounding::PreferFloor,
        "round_prefer_ceil" => Rounding::PreferCeil,
        "floor" => Rounding::Floor,
        "ceil" => Rounding::Ceil,
        other => {
            return Err(cx.err(format!(
                "nearest_mode '{other}', expected round_prefer_floor, round_prefer_ceil, floor \
                 or ceil"
            )))
        }
    };
    let a = cx.attr_float("cubic_coeff_a")?.unwrap_or(-0.75) as f64;
    let name = cx.attr_string("mode")?;
    Ok(match name.as_deref().unwrap_or("nearest") {
        "nearest" => Mode::Nearest(rounding),
        "linear" => Mode::Linear,
        "cubic" => Mode::Cubic(a),
        other => return Err(cx.err(format!("mode '{other}', expected nearest, linear or cubic"))),
    })
}

/// The axes the scales, sizes and roi list (the `axes` attribute of opset 18, else all),
/// normalised.
fn resized_axes(cx: &Ctx, rank: usize) -> Result<Vec<usize>> {
    let Some(axes) = cx.attr_ints("axes")? else {
        return Ok((0..rank).collect());
    };
    let mut seen = vec![false; rank];
    let mut out = vec![];
    for a in axes {
        let d = if a < 0 { a + rank as i64 } else { a };
        if d < 0 || d >= rank as i64 || seen[d as usize] {
            return Err(cx.err(format!(
                "axes holds {a}: expected distinct axes in [-{rank}, {rank})"
            )));
        }
        seen[d as usize] = true;
        out.push(d as usize);
    }
    Ok(out)
}

/// The axes whose length or coordinates change, with their output lengths and scales: from
/// the sizes (scale out / in, adjusted to keep the aspect ratio under
/// `keep_aspect_ratio_policy`) or the scales (out = floor(in * scale)).
fn axis_plan(
    cx: &Ctx,
    shape: &[usize],
    axes: &[usize],
    scales: Option<Vec<f64>>,
    sizes: Option<Vec<i64>>,
    roi: Option<&[f64]>,
) -> Result<Vec<Axis>> {
    let n = axes.len();
    let expect = |what: &str, len: usize| -> Result<()> {
        match len == n {
            true => Ok(()),
            false => Err(cx.err(format!(
                "{what} has {len} values, expected {n} (one per resized axis of a {} input)",
                shape_str(shape)
            ))),
        }
    };
    // Empty scales stand for absent ones (opset 13 on).
    let scales = scales.filter(|s| !s.is_empty());
    let policy = cx.attr_string("keep_aspect_ratio_policy")?;
    let (outs, factors): (Vec<usize>, Vec<f64>) = match (scales, sizes) {
        (Some(_), Some(_)) => {
            return Err(cx.err("both scales and sizes are given; ONNX takes one".into()))
        }
        (None, None) => return Err(cx.err("neither scales nor sizes is given".into())),
        (Some(scales), None) => {
            expect("scales", scales.len())?;
            if let Some(s) = scales.iter().find(|s| !(**s > 0.0 && s.is_finite())) {
                return Err(cx.err(format!("scale {s}: expected positive scales")));
            }
            let outs = (axes.iter().zip(&scales))
                .map(|(&d, &s)| (shape[d] as f64 * s) as usize)
                .collect();
            (outs, scales)
        }
        (None, Some(sizes)) => {
            expect("sizes", sizes.len())?;
            if let Some(s) = sizes.iter().find(|&&s| s < 0) {
                return Err(cx.err(format!("size {s}: expected sizes of 0 or more")));
            }
            let ratio = |i: usize| sizes[i] as f64 / shape[axes[i]] as f64;
            let kept = match policy.as_deref().unwrap_or("stretch") {
                "stretch" => None,
                "not_larger" => Some((0..n).map(ratio).fold(f64::INFINITY, f64::min)),
                "not_smaller" => Some((0..n).map(ratio).fold(0.0, f64::max)),
                other => {
                    return Err(cx.err(format!(
                        "keep_aspect_ratio_policy '{other}', expected stretch, not_larger or \
                         not_smaller"
                    )))
                }
            };
            match kept {
                // The output rounds half up, as the reference does.
                Some(s) => (
                    axes.iter()
                        .map(|&d| (s * shape[d] as f64 + 0.5) as usize)
                        .collect(),
                    vec![s; n],
                ),
                None => (
                    (0..n).map(|i| sizes[i] as usize).collect(),
                    (0..n).map(ratio).collect(),
                ),
            }
        }
    };
    if let Some(roi) = roi {
        expect("roi", roi.len() / 2)?;
    }
    let mut plan = vec![];
    for (i, &d) in axes.iter().enumerate() {
        let roi = roi.map_or((0.0, 1.0), |r| (r[i], r[n + i]));
        let same = outs[i] == shape[d] && (factors[i] - 1.0).abs() < 1e-12 && roi == (0.0, 1.0);
        if !same {
            plan.push(Axis {
                axis: d,
                len: shape[d],
                out: outs[i],
                scale: factors[i],
                roi,
            });
        }
    }
    Ok(plan)
}

/// The input coordinate of output index `y`, and whether `tf_crop_and_resize` extrapolates it.
fn source(a: &Axis, coordinates: Coordinates, y: f64) -> (f64, bool) {
    let (len, s) = (a.len as f64, a.scale);
    // The reference compares and divides by the output length as a float (scale * in).
    let out = s * len;
    let x = match coordinates {
        Coordinates::HalfPixel => (y + 0.5) / s - 0.5,
        Coordinates::HalfPixelSymmetric => {
            let offset = len / 2.0 * (1.0 - a.out as f64 / out);
            offset + (y + 0.5) / s - 0.5
        }
        Coordinates::PytorchHalfPixel if out == 1.0 => -0.5,
        Coordinates::PytorchHalfPixel => (y + 0.5) / s - 0.5,
        Coordinates::AlignCorners if out == 1.0 => 0.0,
        Coordinates::AlignCorners => y * (len - 1.0) / (out - 1.0),
        Coordinates::Asymmetric => y / s,
        Coordinates::TfCropAndResize => {
            let (start, end) = a.roi;
            let x = match out == 1.0 {
                true => (end - start) * (len - 1.0) / 2.0,
                false => y * (end - start) * (len - 1.0) / (out - 1.0),
            };
            let x = x + start * (len - 1.0);
            return (x, x < 0.0 || x > len - 1.0);
        }
    };
    (x, false)
}

/// The weights of the taps around a coordinate whose distance past the tap left of it is
/// `ratio` (in (0, 1]), at scale `scale`: the taps run from `1 - n / 2` to `n / 2` around it.
fn tap_weights(mode: Mode, antialias: bool, ratio: f64, scale: f64) -> Vec<f64> {
    let r = ratio;
    match mode {
        Mode::Nearest(rounding) => {
            let right = match rounding {
                _ if r == 1.0 => true,
                Rounding::PreferFloor => r > 0.5,
                Rounding::PreferCeil => r >= 0.5,
                Rounding::Floor => false,
                Rounding::Ceil => true,
            };
            vec![f64::from(!right), f64::from(right)]
        }
        Mode::Linear if antialias => {
            let s = scale.min(1.0);
            let start = (-1.0 / s).floor() as i64 + 1;
            stretched(start, |t| {
                (1.0 - ((t as f64 - r) * s).abs()).clamp(0.0, 1.0)
            })
        }
        Mode::Linear => vec![1.0 - r, r],
        Mode::Cubic(a) if antialias => {
            let s = scale.min(1.0);
            let start = (-2.0 / s).floor() as i64 + 1;
            stretched(start, |t| cubic(a, s * (t as f64 - r)))
        }
        Mode::Cubic(a) => [r + 1.0, r, 1.0 - r, 2.0 - r].map(|d| cubic(a, d)).to_vec(),
    }
}

/// The antialiased filter: `f` at the taps `start..2 - start`, normalised to sum 1.
fn stretched(start: i64, f: impl Fn(i64) -> f64) -> Vec<f64> {
    let w: Vec<f64> = (start..2 - start).map(f).collect();
    let sum: f64 = w.iter().sum();
    w.iter().map(|v| v / sum).collect()
}

/// Keys' cubic convolution kernel with parameter `a` at distance `d`.
fn cubic(a: f64, d: f64) -> f64 {
    let d = d.abs();
    if d <= 1.0 {
        ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    } else if d < 2.0 {
        ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    } else {
        0.0
    }
}

fn axis_map(
    a: &Axis,
    mode: Mode,
    coordinates: Coordinates,
    antialias: bool,
    exclude_outside: bool,
) -> AxisMap {
    let mut map = AxisMap {
        weights: vec![],
        outside: vec![],
    };
    for o in 0..a.out {
        let (x, outside) = source(a, coordinates, o as f64);
        map.outside.push(outside);
        if outside {
            map.weights.push(vec![]);
            continue;
        }
        // The tap left of x, x itself when whole (the window then ends at x).
        let mut left = x.floor();
        if left == x {
            left -= 1.0;
        }
        let weights = tap_weights(mode, antialias, x - left, a.scale);
        let first = left as i64 + 1 - weights.len() as i64 / 2;
        let mut taps: Vec<(i64, f64)> = (weights.iter().enumerate())
            .map(|(i, &w)| (first + i as i64, w))
            .collect();
        if exclude_outside {
            for t in &mut taps {
                if t.0 < 0 || t.0 >= a.len as i64 {
                    t.1 = 0.0;
                }
            }
            let sum: f64 = taps.iter().map(|t| t.1).sum();
            if sum != 0.0 {
                taps.iter_mut().for_each(|t| t.1 /= sum);
            }
        }
        let last = a.len as i64 - 1;
        map.weights.push(
            (taps.into_iter())
                .map(|(t, w)| (t.clamp(0, last.max(0)) as usize, w))
                .collect(),
        );
    }
    map
}

/// Nearest neighbours along an axis: a Gather of the input index each output takes.
fn gather_axis(cx: &mut Ctx, y: NodeId, a: &Axis, map: &AxisMap) -> Result<NodeId> {
    let ids: Vec<i64> = (map.weights.iter())
        .map(|taps| {
            let picked = taps.iter().find(|t| t.1 != 0.0).or(taps.last());
            picked.map_or(0, |t| t.0 as i64)
        })
        .collect();
    let name = cx.temp_name(&format!("ids{}", a.axis));
    let ids = cx.add_const(&name, Tensor::i64(vec![a.out], ids))?;
    tmp(
        cx,
        Op::Gather { axis: a.axis },
        &[y, ids],
        &format!("axis{}", a.axis),
    )
}

/// An axis resized by a product with its `[out, in]` weight matrix: from the left where it is
/// the next to last axis, from the right (transposed) where it is the last, else through a
/// transpose that makes it the last.
fn product_axis(cx: &mut Ctx, y: NodeId, a: &Axis, map: &AxisMap, rank: usize) -> Result<NodeId> {
    let d = a.axis;
    let left = d + 2 == rank;
    let mut values = vec![0f32; a.out * a.len];
    for (o, taps) in map.weights.iter().enumerate() {
        for &(i, w) in taps {
            let at = match left {
                true => o * a.len + i,
                false => i * a.out + o,
            };
            values[at] += w as f32;
        }
    }
    let dims = match left {
        true => vec![a.out, a.len],
        false => vec![a.len, a.out],
    };
    let name = cx.temp_name(&format!("weights{d}"));
    let weights = cx.add_const(&name, Tensor::f32(dims, values))?;
    let tag = format!("axis{d}");
    if left {
        return tmp(cx, Op::MatMul, &[weights, y], &tag);
    }
    if d + 1 == rank {
        return tmp(cx, Op::MatMul, &[y, weights], &tag);
    }
    let mut perm: Vec<usize> = (0..rank).filter(|&i| i != d).collect();
    perm.push(d);
    let mut back = vec![0; rank];
    for (i, &p) in perm.iter().enumerate() {
        back[p] = i;
    }
    let last = tmp(cx, Op::Transpose { perm }, &[y], &format!("axis{d}_last"))?;
    let resized = tmp(
        cx,
        Op::MatMul,
        &[last, weights],
        &format!("axis{d}_resized"),
    )?;
    tmp(cx, Op::Transpose { perm: back }, &[resized], &tag)
}

/// `y` plus `value` where any axis extrapolates (`tf_crop_and_resize`): there the products'
/// weights are all zero.
fn add_extrapolation(
    cx: &mut Ctx,
    y: NodeId,
    outside: &[(usize, Vec<bool>)],
    value: f64,
) -> Result<NodeId> {
    let out = cx.shape(y);
    let mut dims = vec![1; out.len()];
    for (d, o) in outside {
        dims[*d] = o.len();
    }
    let count: usize = dims.iter().product();
    let mut mask = vec![0f32; count];
    for (flat, m) in mask.iter_mut().enumerate() {
        let mut rest = flat;
        let mut any = false;
        for d in (0..dims.len()).rev() {
            let i = rest % dims[d];
            rest /= dims[d];
            any |= outside.iter().any(|(a, o)| *a == d && o[i]);
        }
        *m = if any { value as f32 } else { 0.0 };
    }
    let name = cx.temp_name("extrapolated");
    let fill = cx.add_const(&name, Tensor::f32(dims, mask))?;
    tmp(cx, Op::Binary(Binary::Add), &[y, fill], "extrapolation")
}
