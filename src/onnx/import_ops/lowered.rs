//! ONNX ops imported as small graphs of existing IR ops (CONTRIBUTING: "prefer a lowering to
//! existing ops when it costs nothing"): the reference executor, the WGSL kernels, export and
//! autodiff already know every op they become, and fusion puts element-wise chains back into one
//! kernel. Each builder names its intermediates `<output>/<tag>` and its last node after the
//! ONNX output.
//!
//! - activations: LeakyRelu, PRelu, Elu, Selu, Celu, ThresholdedRelu, HardSigmoid, HardSwish,
//!   Softplus (in the stable form `max(x, 0) + log(1 + exp(-|x|))`), Softsign, Mish, Swish;
//! - ArgMax, ArgMin and Hardmax (from ReduceMax/ReduceMin, Equal and an index constant);
//! - IsInf, Xor, Sum and Mean (variadic), CastLike, Dropout (inference: the identity, and an
//!   all-true mask), Mod (the IR's Mod or Fmod by its `fmod` attribute);
//! - normalisations, reductions and losses: RMSNormalization, LogSoftmax, ReduceL1, ReduceL2,
//!   ReduceLogSum, ReduceLogSumExp, GlobalAveragePool, NegativeLogLikelihoodLoss,
//!   SoftmaxCrossEntropyLoss;
//! - CumSum (a product with a triangular constant), OneHot (Equal with positions, Where);
//! - Attention (opsets 23-25: heads, past keys and values, grouped queries, softcap, masks),
//!   RotaryEmbedding (halves or interleaved pairs, partial rotary dims, position ids),
//!   LpNormalization, DequantizeLinear (per tensor, per axis, blocked);
//! - ScatterElements, Scatter and ScatterND with indices known at import (Gathers by writer),
//!   TopK with K known at import (ranks from an n x n comparison), Einsum (broadcast products
//!   and sums; diagonals through identity constants);
//! - RNN, GRU, LSTM unrolled over the static sequence (default activations, no clip).
//! - layout: Tile, SpaceToDepth, DepthToSpace (reshape, expand or transpose, reshape), Pad (one
//!   Gather per padded axis, every mode), CenterCropPad.

use super::{reduce_args, Ctx};
use crate::error::Result;
use crate::ir::{unary, Binary, NodeId, Op, Reduce, Unary};
use crate::tensor::{numel, shape_str, Tensor};

/// An intermediate node `<output>/<tag>`.
pub(super) fn tmp(cx: &mut Ctx, op: Op, inputs: &[NodeId], tag: &str) -> Result<NodeId> {
    let name = cx.temp_name(tag);
    cx.add_named(op, inputs, &name)
}

pub(super) fn bin(cx: &mut Ctx, b: Binary, x: NodeId, y: NodeId, tag: &str) -> Result<NodeId> {
    tmp(cx, Op::Binary(b), &[x, y], tag)
}

pub(super) fn un(cx: &mut Ctx, u: Unary, x: NodeId, tag: &str) -> Result<NodeId> {
    tmp(cx, Op::Unary(u), &[x], tag)
}

/// A float32 scalar constant.
pub(super) fn scalar(cx: &mut Ctx, v: f32, tag: &str) -> Result<NodeId> {
    let name = cx.temp_name(tag);
    cx.add_const(&name, Tensor::scalar(v))
}

fn alpha(cx: &Ctx, default: f32) -> Result<f32> {
    Ok(cx.attr_float("alpha")?.unwrap_or(default))
}

/// `x < 0 ? neg : x`.
fn where_negative(cx: &mut Ctx, x: NodeId, neg: NodeId) -> Result<NodeId> {
    let zero = scalar(cx, 0.0, "zero")?;
    let c = bin(cx, Binary::Less, x, zero, "negative")?;
    cx.add(Op::Where, &[c, neg, x])
}

pub fn leaky_relu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let a = scalar(cx, alpha(cx, 0.01)?, "alpha")?;
    let neg = bin(cx, Binary::Mul, x, a, "scaled")?;
    where_negative(cx, x, neg)
}

pub fn prelu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let slope = cx.input(1)?;
    let neg = bin(cx, Binary::Mul, x, slope, "scaled")?;
    where_negative(cx, x, neg)
}

/// `alpha * (exp(x) - 1)`.
fn exp_minus_one(cx: &mut Ctx, x: NodeId, alpha: f32) -> Result<NodeId> {
    let e = un(cx, unary::EXP, x, "exp")?;
    let one = scalar(cx, 1.0, "one")?;
    let em1 = bin(cx, Binary::Sub, e, one, "exp_minus_one")?;
    let a = scalar(cx, alpha, "alpha")?;
    bin(cx, Binary::Mul, em1, a, "scaled")
}

pub fn elu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let neg = exp_minus_one(cx, x, alpha(cx, 1.0)?)?;
    where_negative(cx, x, neg)
}

pub fn selu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let a = alpha(cx, 1.673_263_2)?;
    let gamma = cx.attr_float("gamma")?.unwrap_or(1.050_701);
    let neg = exp_minus_one(cx, x, a)?;
    let zero = scalar(cx, 0.0, "zero")?;
    let c = bin(cx, Binary::LessOrEqual, x, zero, "non_positive")?;
    let e = tmp(cx, Op::Where, &[c, neg, x], "elu")?;
    let g = scalar(cx, gamma, "gamma")?;
    cx.add(Op::Binary(Binary::Mul), &[e, g])
}

/// `max(0, x) + min(0, alpha * (exp(x / alpha) - 1))`.
pub fn celu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let a = alpha(cx, 1.0)?;
    let inv = scalar(cx, 1.0 / a, "inv_alpha")?;
    let xa = bin(cx, Binary::Mul, x, inv, "x_over_alpha")?;
    let neg = exp_minus_one(cx, xa, a)?;
    let zero = scalar(cx, 0.0, "zero")?;
    let pos = bin(cx, Binary::Max, x, zero, "positive_part")?;
    let neg = bin(cx, Binary::Min, neg, zero, "negative_part")?;
    cx.add(Op::Binary(Binary::Add), &[pos, neg])
}

pub fn thresholded_relu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let a = scalar(cx, alpha(cx, 1.0)?, "alpha")?;
    let c = bin(cx, Binary::Less, a, x, "above")?;
    let zero = scalar(cx, 0.0, "zero")?;
    cx.add(Op::Where, &[c, x, zero])
}

/// `clamp(alpha * x + beta, 0, 1)`.
fn hard_sigmoid_of(cx: &mut Ctx, x: NodeId, alpha: f32, beta: f32) -> Result<NodeId> {
    let a = scalar(cx, alpha, "alpha")?;
    let b = scalar(cx, beta, "beta")?;
    let ax = bin(cx, Binary::Mul, x, a, "scaled")?;
    let t = bin(cx, Binary::Add, ax, b, "shifted")?;
    let zero = scalar(cx, 0.0, "zero")?;
    let one = scalar(cx, 1.0, "one")?;
    let lo = bin(cx, Binary::Max, t, zero, "at_least_0")?;
    bin(cx, Binary::Min, lo, one, "hard_sigmoid")
}

pub fn hard_sigmoid(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let beta = cx.attr_float("beta")?.unwrap_or(0.5);
    let h = hard_sigmoid_of(cx, x, alpha(cx, 0.2)?, beta)?;
    cx.add(Op::Identity, &[h])
}

pub fn hard_swish(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let h = hard_sigmoid_of(cx, x, 1.0 / 6.0, 0.5)?;
    cx.add(Op::Binary(Binary::Mul), &[x, h])
}

/// `max(x, 0) + log(1 + exp(-|x|))`: no overflow for large |x|.
fn softplus_of(cx: &mut Ctx, x: NodeId) -> Result<NodeId> {
    let zero = scalar(cx, 0.0, "zero")?;
    let one = scalar(cx, 1.0, "one")?;
    let pos = bin(cx, Binary::Max, x, zero, "positive_part")?;
    let a = un(cx, unary::ABS, x, "abs")?;
    let na = un(cx, unary::NEG, a, "minus_abs")?;
    let e = un(cx, unary::EXP, na, "exp")?;
    let e1 = bin(cx, Binary::Add, e, one, "one_plus_exp")?;
    let l = un(cx, unary::LOG, e1, "log")?;
    bin(cx, Binary::Add, pos, l, "softplus")
}

pub fn softplus(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let s = softplus_of(cx, x)?;
    cx.add(Op::Identity, &[s])
}

pub fn softsign(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let a = un(cx, unary::ABS, x, "abs")?;
    let one = scalar(cx, 1.0, "one")?;
    let d = bin(cx, Binary::Add, a, one, "one_plus_abs")?;
    cx.add(Op::Binary(Binary::Div), &[x, d])
}

/// `x * tanh(softplus(x))`.
pub fn mish(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let s = softplus_of(cx, x)?;
    let t = un(cx, unary::TANH, s, "tanh")?;
    cx.add(Op::Binary(Binary::Mul), &[x, t])
}

/// `x * sigmoid(alpha * x)`.
pub fn swish(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let a = scalar(cx, alpha(cx, 1.0)?, "alpha")?;
    let ax = bin(cx, Binary::Mul, x, a, "scaled")?;
    let s = un(cx, unary::SIGMOID, ax, "sigmoid")?;
    cx.add(Op::Binary(Binary::Mul), &[x, s])
}

pub fn is_inf(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let neg = cx.attr_bool("detect_negative", true)?;
    let pos = cx.attr_bool("detect_positive", true)?;
    let p = scalar(cx, f32::INFINITY, "inf")?;
    let n = scalar(cx, f32::NEG_INFINITY, "minus_inf")?;
    let is_p = bin(cx, Binary::Equal, x, p, "is_pos_inf")?;
    let is_n = bin(cx, Binary::Equal, x, n, "is_neg_inf")?;
    match (pos, neg) {
        (true, true) => cx.add(Op::Binary(Binary::Or), &[is_p, is_n]),
        (true, false) => cx.add(Op::Identity, &[is_p]),
        (false, true) => cx.add(Op::Identity, &[is_n]),
        // Both off: nothing is detected (+inf is never -inf).
        (false, false) => cx.add(Op::Binary(Binary::And), &[is_p, is_n]),
    }
}

/// Mod: the sign of the divisor (fmod = 0, integers only in ONNX) or of the dividend (fmod = 1).
pub fn modulo(cx: &mut Ctx) -> Result<NodeId> {
    let a = cx.input(0)?;
    let b = cx.input(1)?;
    let op = match cx.attr_bool("fmod", false)? {
        true => Binary::Fmod,
        false => Binary::Mod,
    };
    cx.add(Op::Binary(op), &[a, b])
}

/// `!(a == b)` on bools.
pub fn xor(cx: &mut Ctx) -> Result<NodeId> {
    let a = cx.input(0)?;
    let b = cx.input(1)?;
    let e = bin(cx, Binary::Equal, a, b, "equal")?;
    cx.add(Op::Unary(unary::NOT), &[e])
}

/// The inputs added with broadcasting, and optionally divided by their count.
fn sum_of_inputs(cx: &mut Ctx, mean: bool) -> Result<NodeId> {
    let inputs = cx.inputs_from(0)?;
    let Some((&first, rest)) = inputs.split_first() else {
        return Err(cx.err("no inputs".into()));
    };
    let mut acc = first;
    for (i, &x) in rest.iter().enumerate() {
        acc = bin(cx, Binary::Add, acc, x, &format!("step{i}"))?;
    }
    if mean && !rest.is_empty() {
        let n = scalar(cx, inputs.len() as f32, "count")?;
        return cx.add(Op::Binary(Binary::Div), &[acc, n]);
    }
    cx.add(Op::Identity, &[acc])
}

pub fn sum(cx: &mut Ctx) -> Result<NodeId> {
    sum_of_inputs(cx, false)
}

pub fn mean(cx: &mut Ctx) -> Result<NodeId> {
    sum_of_inputs(cx, true)
}

/// Cast to the element type of the second input (only its type is read).
pub fn cast_like(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let like = cx.input(1)?;
    let to = cx.dtype(like);
    if cx.dtype(x) == to {
        return cx.add(Op::Identity, &[x]);
    }
    cx.add(Op::Cast { to }, &[x])
}

/// Dropout for inference: the identity, with an all-true mask. Training mode with a nonzero
/// ratio draws random numbers, which dorac does not do: refused.
pub fn dropout(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let (ratio, training) = if cx.opset >= 12 {
        let training = cx.const_scalar(2, "training_mode")?.unwrap_or(0.0) != 0.0;
        let ratio = match training {
            true => cx.const_scalar(1, "ratio")?.unwrap_or(0.5),
            false => {
                cx.opt_input(1)?;
                0.0
            }
        };
        (ratio, training)
    } else {
        // Before opset 12: attribute ratio; training unless is_test (opsets < 7).
        let ratio = cx.attr_float("ratio")?.unwrap_or(0.5) as f64;
        (ratio, false)
    };
    if training && ratio != 0.0 {
        return Err(cx.unsupported(format!(
            "Dropout in training mode (ratio {ratio}: random masks)"
        )));
    }
    let y = cx.add(Op::Identity, &[x])?;
    if cx.node.output.get(1).is_some_and(|o| !o.is_empty()) {
        let shape = cx.shape(x);
        let name = cx.node.output[1].clone();
        let mask = cx.add_const(
            &name,
            Tensor::bool(shape.clone(), vec![true; numel(&shape)]),
        )?;
        cx.set_output(1, mask);
    }
    Ok(y)
}

/// `x / sqrt(mean(x^2 over axis..) + epsilon) * scale`.
/// ONNX Runtime's SimplifiedLayerNormalization is the same op.
pub fn rms_normalization(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let scale = cx.input(1)?;
    let rank = cx.shape(x).len();
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(-1), rank, false)?;
    let epsilon = cx.attr_float("epsilon")?.unwrap_or(1e-5);
    rms_norm(cx, x, scale, axis, epsilon)
}

/// `x / sqrt(mean(x^2 over axis..) + epsilon) * scale`, the last node named after the output.
fn rms_norm(cx: &mut Ctx, x: NodeId, scale: NodeId, axis: usize, epsilon: f32) -> Result<NodeId> {
    let shape = cx.shape(x);
    let count: usize = shape[axis..].iter().product();
    let op = Op::Reduce {
        kind: Reduce::SumSquare,
        axes: (axis..shape.len()).collect(),
        keepdims: true,
    };
    let ss = tmp(cx, op, &[x], "sum_squares")?;
    let n = scalar(cx, count as f32, "count")?;
    let ms = bin(cx, Binary::Div, ss, n, "mean_square")?;
    let eps = scalar(cx, epsilon, "epsilon")?;
    let me = bin(cx, Binary::Add, ms, eps, "mean_square_eps")?;
    let rms = un(cx, unary::SQRT, me, "rms")?;
    let normed = bin(cx, Binary::Div, x, rms, "normalized")?;
    cx.add(Op::Binary(Binary::Mul), &[normed, scale])
}

/// ONNX Runtime's SkipLayerNormalization and SkipSimplifiedLayerNormalization (com.microsoft,
/// the residual adds of its fused transformers): `s = input + skip (+ bias)`, normalized over
/// the last axis (LayerNormalization with gamma and beta, or RMS with gamma); output 3 is `s`
/// itself, the residual stream the next layer adds to. The saved statistics (outputs 1 and 2)
/// are refused.
fn skip_norm(cx: &mut Ctx, rms: bool) -> Result<NodeId> {
    let x = cx.input(0)?;
    let skip = cx.input(1)?;
    let gamma = cx.input(2)?;
    let (beta, bias) = if rms {
        (None, cx.opt_input(3)?)
    } else {
        (cx.opt_input(3)?, cx.opt_input(4)?)
    };
    // ONNX Runtime's default for both ops.
    let epsilon = cx.attr_float("epsilon")?.unwrap_or(1e-12);
    if [1, 2]
        .iter()
        .any(|&i| cx.node.output.get(i).is_some_and(|o| !o.is_empty()))
    {
        return Err(cx.unsupported(format!(
            "{} with its mean or inv_std_var output",
            cx.op_type()
        )));
    }
    let mut sum = bin(cx, Binary::Add, x, skip, "input_skip")?;
    if let Some(b) = bias {
        sum = bin(cx, Binary::Add, sum, b, "input_skip_bias")?;
    }
    if let Some(name) = cx.node.output.get(3).filter(|o| !o.is_empty()).cloned() {
        let s = cx.add_named(Op::Identity, &[sum], &name)?;
        cx.set_output(3, s);
    }
    let axis = cx.shape(sum).len() - 1;
    if rms {
        return rms_norm(cx, sum, gamma, axis, epsilon);
    }
    let op = Op::LayerNorm { axis, epsilon };
    match beta {
        Some(b) => cx.add(op, &[sum, gamma, b]),
        None => cx.add(op, &[sum, gamma]),
    }
}

pub fn skip_layer_normalization(cx: &mut Ctx) -> Result<NodeId> {
    skip_norm(cx, false)
}

pub fn skip_simplified_layer_normalization(cx: &mut Ctx) -> Result<NodeId> {
    skip_norm(cx, true)
}

/// ONNX Runtime's GELU family (com.microsoft), as its transformer optimizer fuses BERT, GPT-2
/// and ViT: Gelu (erf), BiasGelu (`gelu(a + bias)`), FastGelu (the tanh approximation, with an
/// optional bias), QuickGelu (`x sigmoid(alpha x)`, alpha 1.702 by default).
pub fn contrib_gelu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let (f, bias) = match cx.op_type() {
        "Gelu" => (unary::GELU, None),
        "BiasGelu" => (unary::GELU, Some(cx.input(1)?)),
        _ => (unary::GELU_TANH, cx.opt_input(1)?),
    };
    let x = match bias {
        Some(b) => bin(cx, Binary::Add, x, b, "biased")?,
        None => x,
    };
    cx.add(Op::Unary(f), &[x])
}

pub fn quick_gelu(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let a = cx.attr_float("alpha")?.unwrap_or(1.702);
    let alpha = scalar(cx, a, "alpha")?;
    let ax = bin(cx, Binary::Mul, x, alpha, "scaled")?;
    let s = un(cx, unary::SIGMOID, ax, "sigmoid")?;
    cx.add(Op::Binary(Binary::Mul), &[x, s])
}

/// ONNX Runtime's EmbedLayerNormalization (com.microsoft, BERT's fused embeddings):
/// LayerNorm(word[input_ids] + position[position_ids, or 0..S] + segment[segment_ids]).
/// Output 1, the mask index, is each sequence's count of ones in `mask` (its length when the
/// padding is on the right, the form Attention reads), zeros without a mask, as ONNX Runtime
/// writes; output 2 is the sum before the normalization.
pub fn embed_layer_normalization(cx: &mut Ctx) -> Result<NodeId> {
    let ids = cx.input(0)?;
    let segments = cx.opt_input(1)?;
    let word = cx.input(2)?;
    let position = cx.input(3)?;
    let segment_table = cx.opt_input(4)?;
    let gamma = cx.input(5)?;
    let beta = cx.input(6)?;
    let mask = cx.opt_input(7)?;
    let position_ids = cx.opt_input(8)?;
    let epsilon = cx.attr_float("epsilon")?.unwrap_or(1e-12);
    let _ = cx.attr_int("mask_index_type")?;
    let shape = cx.shape(ids);
    let [batch, seq] = shape[..] else {
        return Err(cx.err(format!(
            "input_ids has shape {}, expected [batch, sequence]",
            shape_str(&shape)
        )));
    };
    let words = tmp(cx, Op::Gather { axis: 0 }, &[word, ids], "words")?;
    let table = cx.shape(position).first().copied().unwrap_or(0);
    let positions = match position_ids {
        Some(p) => p,
        None if seq > table => {
            return Err(cx.err(format!(
                "{seq} positions, but the position embedding has {table} rows"
            )))
        }
        None => {
            let name = cx.temp_name("positions");
            cx.add_const(&name, Tensor::i64(vec![1, seq], (0..seq as i64).collect()))?
        }
    };
    let placed = tmp(
        cx,
        Op::Gather { axis: 0 },
        &[position, positions],
        "positions_embedded",
    )?;
    let mut sum = bin(cx, Binary::Add, words, placed, "word_position")?;
    match (segments, segment_table) {
        (Some(sid), Some(table)) => {
            let seg = tmp(cx, Op::Gather { axis: 0 }, &[table, sid], "segments")?;
            sum = bin(cx, Binary::Add, sum, seg, "embedding_sum")?;
        }
        (None, None) => {}
        _ => return Err(cx.err("segment_ids and segment_embedding come together".into())),
    }
    if let Some(name) = cx.node.output.get(2).filter(|o| !o.is_empty()).cloned() {
        let s = cx.add_named(Op::Identity, &[sum], &name)?;
        cx.set_output(2, s);
    }
    if let Some(name) = cx.node.output.get(1).filter(|o| !o.is_empty()).cloned() {
        let index = match mask {
            Some(m) => {
                let op = Op::Reduce {
                    kind: Reduce::Sum,
                    axes: vec![1],
                    keepdims: false,
                };
                cx.add_named(op, &[m], &name)?
            }
            None => cx.add_const(&name, Tensor::i64(vec![batch], vec![0; batch]))?,
        };
        cx.set_output(1, index);
    }
    let axis = cx.shape(sum).len() - 1;
    cx.add(Op::LayerNorm { axis, epsilon }, &[sum, gamma, beta])
}

/// `log(softmax(x))` over one axis (the last only before opset 13, as for Softmax).
pub fn log_softmax(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let axis = super::softmax_axis(cx, x)?;
    let s = tmp(cx, Op::Softmax { axis }, &[x], "softmax")?;
    cx.add(Op::Unary(unary::LOG), &[s])
}

/// A reduction as `post(sum(pre(x)))`; with `noop_with_empty_axes` and no axes, `post(pre(x))`.
fn reduce_lowered(
    cx: &mut Ctx,
    axes_input_since: i64,
    kind: Reduce,
    pre: Option<Unary>,
    post: Option<Unary>,
) -> Result<NodeId> {
    let (x, axes, keepdims) = reduce_args(cx, axes_input_since)?;
    let mut v = match pre {
        Some(u) => un(cx, u, x, "term")?,
        None => x,
    };
    if let Some(axes) = axes {
        let op = Op::Reduce {
            kind,
            axes,
            keepdims,
        };
        v = tmp(cx, op, &[v], "sum")?;
    }
    match post {
        Some(u) => cx.add(Op::Unary(u), &[v]),
        None => cx.add(Op::Identity, &[v]),
    }
}

pub fn reduce_l1(cx: &mut Ctx) -> Result<NodeId> {
    reduce_lowered(cx, 18, Reduce::Sum, Some(unary::ABS), None)
}

pub fn reduce_l2(cx: &mut Ctx) -> Result<NodeId> {
    reduce_lowered(cx, 18, Reduce::SumSquare, None, Some(unary::SQRT))
}

pub fn reduce_log_sum(cx: &mut Ctx) -> Result<NodeId> {
    reduce_lowered(cx, 18, Reduce::Sum, None, Some(unary::LOG))
}

/// `m + log(sum(exp(x - m)))` with `m` the maximum over the axes: no overflow for large x.
pub fn reduce_log_sum_exp(cx: &mut Ctx) -> Result<NodeId> {
    let (x, axes, keepdims) = reduce_args(cx, 18)?;
    let Some(axes) = axes else {
        // A reduction over no axes: log(exp(x)) = x.
        return cx.add(Op::Identity, &[x]);
    };
    let op = |kind| Op::Reduce {
        kind,
        axes: axes.clone(),
        keepdims: true,
    };
    let m = tmp(cx, op(Reduce::Max), &[x], "max")?;
    // An all -inf (or empty) row has m = -inf: shift by 0 there instead (x - m would be NaN).
    let finite = {
        let zero = scalar(cx, 0.0, "zero")?;
        let e = un(cx, unary::EXP, m, "exp_max")?;
        let pos = bin(cx, Binary::Less, zero, e, "max_above_minus_inf")?;
        tmp(cx, Op::Where, &[pos, m, zero], "shift")?
    };
    let d = bin(cx, Binary::Sub, x, finite, "shifted")?;
    let e = un(cx, unary::EXP, d, "exp")?;
    let s = tmp(cx, op(Reduce::Sum), &[e], "sum")?;
    let l = un(cx, unary::LOG, s, "log")?;
    if keepdims {
        return cx.add(Op::Binary(Binary::Add), &[l, finite]);
    }
    let r = bin(cx, Binary::Add, l, finite, "keepdims")?;
    let shape: Vec<usize> = cx
        .shape(x)
        .iter()
        .enumerate()
        .filter(|(d, _)| !axes.contains(d))
        .map(|(_, &s)| s)
        .collect();
    cx.add(Op::Reshape { shape }, &[r])
}

/// NegativeLogLikelihoodLoss of `input` [N, C, d...] (log-probabilities) at class ids `target`
/// [N, d...], with optional class weights [C], `ignore_index` and `reduction`: GatherElements
/// along the class axis, weights by Gather, the ignored positions masked out.
fn nll(cx: &mut Ctx, input: NodeId, target: NodeId, weight: Option<NodeId>) -> Result<NodeId> {
    let ignore = cx.attr_int("ignore_index")?;
    let reduction = cx
        .attr_string("reduction")?
        .unwrap_or_else(|| "mean".into());
    if !matches!(reduction.as_str(), "none" | "sum" | "mean") {
        return Err(cx.err(format!(
            "reduction '{reduction}', expected \"none\", \"sum\" or \"mean\""
        )));
    }
    let xs = cx.shape(input);
    let ts = cx.shape(target);
    let mut want = xs.clone();
    if xs.len() >= 2 {
        want.remove(1);
    }
    if xs.len() < 2 || ts != want {
        return Err(cx.err(format!(
            "input {xs:?} and target {ts:?} do not fit ([N, C, d...] and [N, d...])"
        )));
    }
    // Ignored positions gather class 0 (any valid id) and are masked out below.
    let (t, keep) = match ignore {
        Some(i) => {
            let name = cx.temp_name("ignore_index");
            let ig = cx.add_const(&name, Tensor::i64(vec![], vec![i]))?;
            let hit = bin(cx, Binary::Equal, target, ig, "ignored")?;
            let name = cx.temp_name("class0");
            let zero = cx.add_const(&name, Tensor::i64(vec![], vec![0]))?;
            let t = tmp(cx, Op::Where, &[hit, zero, target], "safe_target")?;
            let keep = un(cx, unary::NOT, hit, "kept")?;
            (t, Some(keep))
        }
        None => (target, None),
    };
    let mut unsq = ts.clone();
    unsq.insert(1, 1);
    let t1 = tmp(cx, Op::Reshape { shape: unsq }, &[t], "target_1")?;
    let picked = tmp(cx, Op::GatherElements { axis: 1 }, &[input, t1], "picked")?;
    let picked = tmp(
        cx,
        Op::Reshape { shape: ts.clone() },
        &[picked],
        "picked_flat",
    )?;
    let mut w = match weight {
        Some(wt) => Some(tmp(cx, Op::Gather { axis: 0 }, &[wt, t], "weight")?),
        None => None,
    };
    if let Some(keep) = keep {
        let k = tmp(
            cx,
            Op::Cast {
                to: crate::tensor::DType::F32,
            },
            &[keep],
            "mask",
        )?;
        w = Some(match w {
            Some(w) => bin(cx, Binary::Mul, w, k, "weight_kept")?,
            None => k,
        });
    }
    let neg = un(cx, unary::NEG, picked, "neg")?;
    let loss = match w {
        Some(w) => bin(cx, Binary::Mul, neg, w, "weighted")?,
        None => neg,
    };
    let all = |n: usize| Op::Reduce {
        kind: Reduce::Sum,
        axes: (0..n).collect(),
        keepdims: false,
    };
    match reduction.as_str() {
        "none" => cx.add(Op::Identity, &[loss]),
        "sum" => cx.add(all(ts.len()), &[loss]),
        _ => {
            let total = tmp(cx, all(ts.len()), &[loss], "total")?;
            let den = match w {
                Some(w) => tmp(cx, all(ts.len()), &[w], "weight_total")?,
                None => scalar(cx, numel(&ts) as f32, "count")?,
            };
            cx.add(Op::Binary(Binary::Div), &[total, den])
        }
    }
}

pub fn negative_log_likelihood_loss(cx: &mut Ctx) -> Result<NodeId> {
    let input = cx.input(0)?;
    let target = cx.input(1)?;
    let weight = cx.opt_input(2)?;
    nll(cx, input, target, weight)
}

/// NLL of the log-softmax over the class axis (1); the optional second output is that
/// log-probability.
pub fn softmax_cross_entropy_loss(cx: &mut Ctx) -> Result<NodeId> {
    let scores = cx.input(0)?;
    let labels = cx.input(1)?;
    let weight = cx.opt_input(2)?;
    if cx.shape(scores).len() < 2 {
        return Err(cx.err("scores must have rank 2 or more ([N, C, d...])".into()));
    }
    let p = tmp(cx, Op::Softmax { axis: 1 }, &[scores], "softmax")?;
    let log_prob = match cx.node.output.get(1).filter(|o| !o.is_empty()) {
        Some(name) => {
            let name = name.clone();
            cx.add_named(Op::Unary(unary::LOG), &[p], &name)?
        }
        None => un(cx, unary::LOG, p, "log_prob")?,
    };
    let loss = nll(cx, log_prob, labels, weight)?;
    cx.set_output(1, log_prob);
    Ok(loss)
}

/// The index along `axis` of the first (or last) maximum (or minimum), kept as a dim of size 1:
/// the positions equal to the extreme (or NaN: numpy's argmax picks the first NaN, and the
/// extreme is NaN then) keep their index, the others an index past the end (or -1), and a
/// minimum (maximum) over those picks the first (last).
fn arg_extreme(cx: &mut Ctx, x: NodeId, axis: usize, max: bool, last: bool) -> Result<NodeId> {
    let shape = cx.shape(x);
    let len = shape[axis];
    if len == 0 {
        return Err(cx.err(format!("axis {axis} has size 0: no element to pick")));
    }
    let reduce = |kind| Op::Reduce {
        kind,
        axes: vec![axis],
        keepdims: true,
    };
    let kind = if max { Reduce::Max } else { Reduce::Min };
    let m = tmp(cx, reduce(kind), &[x], "extreme")?;
    let hit = bin(cx, Binary::Equal, x, m, "hit")?;
    let nan = un(cx, unary::IS_NAN, x, "nan")?;
    let hit = bin(cx, Binary::Or, hit, nan, "hit_or_nan")?;
    let mut ids_shape = vec![1; shape.len()];
    ids_shape[axis] = len;
    let name = cx.temp_name("ids");
    let ids = cx.add_const(&name, Tensor::i64(ids_shape, (0..len as i64).collect()))?;
    let miss = if last { -1 } else { len as i64 };
    let name = cx.temp_name("miss");
    let miss = cx.add_const(&name, Tensor::i64(vec![], vec![miss]))?;
    let cand = tmp(cx, Op::Where, &[hit, ids, miss], "candidates")?;
    let pick = if last { Reduce::Max } else { Reduce::Min };
    tmp(cx, reduce(pick), &[cand], "index")
}

fn arg(cx: &mut Ctx, max: bool) -> Result<NodeId> {
    let x = cx.input(0)?;
    let shape = cx.shape(x);
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(0), shape.len(), false)?;
    let keepdims = cx.attr_bool("keepdims", true)?;
    let last = cx.attr_bool("select_last_index", false)?;
    let i = arg_extreme(cx, x, axis, max, last)?;
    if keepdims {
        return cx.add(Op::Identity, &[i]);
    }
    let mut out = shape;
    out.remove(axis);
    cx.add(Op::Reshape { shape: out }, &[i])
}

pub fn arg_max(cx: &mut Ctx) -> Result<NodeId> {
    arg(cx, true)
}

pub fn arg_min(cx: &mut Ctx) -> Result<NodeId> {
    arg(cx, false)
}

/// 1 at the first maximum along `axis` (default -1; before opset 13 the input is flattened to
/// 2-D at `axis`, the same only for the last axis), 0 elsewhere.
pub fn hardmax(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let shape = cx.shape(x);
    let rank = shape.len();
    let default = if cx.opset >= 13 { -1 } else { 1 };
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(default), rank, false)?;
    if cx.opset < 13 && axis + 1 != rank {
        return Err(cx.unsupported(format!(
            "Hardmax (opset {} semantics) over axis {axis} of a rank-{rank} input (only the \
             last axis is supported before opset 13)",
            cx.opset
        )));
    }
    let i = arg_extreme(cx, x, axis, true, false)?;
    let mut ids_shape = vec![1; rank];
    ids_shape[axis] = shape[axis];
    let name = cx.temp_name("positions");
    let ids = cx.add_const(
        &name,
        Tensor::i64(ids_shape, (0..shape[axis] as i64).collect()),
    )?;
    let hot = bin(cx, Binary::Equal, ids, i, "hot")?;
    // Equal broadcasts to x's shape, since `i` has x's dims but `axis`.
    cx.add(
        Op::Cast {
            to: crate::tensor::DType::F32,
        },
        &[hot],
    )
}

/// Pad as one Gather per padded axis with a constant index vector: output position j reads
/// input position j - begin (cropping for negative pads), mapped by the mode: `edge` clamps,
/// `reflect` mirrors without repeating the border, `wrap` wraps around, and `constant` reads an
/// index past the end, which gathers 0; a nonzero constant is put where a gathered all-true
/// mask says no input element landed.
pub fn pad(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let shape = cx.shape(x);
    let rank = shape.len();
    let mode = cx.attr_string("mode")?.unwrap_or_else(|| "constant".into());
    let (pads, value, axes) = if cx.opset >= 11 {
        let pads = cx
            .const_ints(1, "pads input")?
            .ok_or_else(|| cx.err("the pads input is missing".into()))?;
        let value = cx.const_scalar(2, "constant_value input")?.unwrap_or(0.0);
        let axes = cx.const_ints(3, "axes input")?;
        (pads, value, axes)
    } else {
        let pads = cx
            .attr_ints("pads")?
            .ok_or_else(|| cx.err("the pads attribute is missing".into()))?;
        (pads, cx.attr_float("value")?.unwrap_or(0.0) as f64, None)
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a
            .iter()
            .map(|&a| cx.axis(a, rank, false))
            .collect::<Result<_>>()?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(cx.err(format!(
            "pads {pads:?} must have 2 entries per padded axis ({} axes)",
            axes.len()
        )));
    }
    if !matches!(mode.as_str(), "constant" | "edge" | "reflect" | "wrap") {
        return Err(cx.err(format!(
            "mode '{mode}', expected constant, edge, reflect or wrap"
        )));
    }
    let mut v = x;
    let mut mask: Option<NodeId> = None;
    let fill = mode == "constant" && value != 0.0;
    if fill {
        let name = cx.temp_name("inside");
        mask = Some(cx.add_const(
            &name,
            Tensor::bool(shape.clone(), vec![true; numel(&shape)]),
        )?);
    }
    for (k, &d) in axes.iter().enumerate() {
        let (b, e) = (pads[k], pads[k + axes.len()]);
        if b == 0 && e == 0 {
            continue;
        }
        let n = shape[d] as i64;
        let out = n + b + e;
        if out < 0 || (n == 0 && out > 0 && mode != "constant") {
            return Err(cx.err(format!(
                "pads ({b}, {e}) do not fit axis {d} of size {n} in mode {mode}"
            )));
        }
        let ids: Vec<i64> = (0..out)
            .map(|j| {
                let src = j - b;
                match mode.as_str() {
                    "edge" => src.clamp(0, n - 1),
                    "wrap" => src.rem_euclid(n),
                    "reflect" if n == 1 => 0,
                    "reflect" => {
                        let m = src.rem_euclid(2 * (n - 1));
                        if m >= n {
                            2 * (n - 1) - m
                        } else {
                            m
                        }
                    }
                    // Past the end: Gather gives 0.
                    _ if (0..n).contains(&src) => src,
                    _ => n,
                }
            })
            .collect();
        let name = cx.temp_name(&format!("ids{d}"));
        let idx = cx.add_const(&name, Tensor::i64(vec![ids.len()], ids))?;
        v = tmp(cx, Op::Gather { axis: d }, &[v, idx], &format!("axis{d}"))?;
        if let Some(m) = mask {
            mask = Some(tmp(
                cx,
                Op::Gather { axis: d },
                &[m, idx],
                &format!("inside{d}"),
            )?);
        }
    }
    let Some(mask) = mask else {
        return cx.add(Op::Identity, &[v]);
    };
    let name = cx.temp_name("value");
    let c = match cx.dtype(x) {
        crate::tensor::DType::F32 => Tensor::scalar(value as f32),
        crate::tensor::DType::I64 => Tensor::i64(vec![], vec![value as i64]),
        crate::tensor::DType::Bool => Tensor::bool(vec![], vec![value != 0.0]),
    };
    let c = cx.add_const(&name, c)?;
    cx.add(Op::Where, &[mask, v, c])
}

/// CumSum as a product with a constant triangular matrix along the axis (moved last and back):
/// `y[.., j] = sum_i x[.., i] T[i, j]`, T picking i <= j (i < j when `exclusive`; mirrored when
/// `reverse`).
pub fn cum_sum(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let shape = cx.shape(x);
    let rank = shape.len();
    let axis = cx
        .const_scalar(1, "axis input")?
        .ok_or_else(|| cx.err("the axis input is missing".into()))?;
    let axis = cx.axis(axis as i64, rank, false)?;
    let exclusive = cx.attr_bool("exclusive", false)?;
    let reverse = cx.attr_bool("reverse", false)?;
    let n = shape[axis];
    let takes = |i: usize, j: usize| match (reverse, exclusive) {
        (false, false) => i <= j,
        (false, true) => i < j,
        (true, false) => i >= j,
        (true, true) => i > j,
    };
    let tri: Vec<f32> = (0..n * n)
        .map(|k| takes(k / n, k % n) as u8 as f32)
        .collect();
    let name = cx.temp_name("triangle");
    let t = match cx.dtype(x) {
        crate::tensor::DType::F32 => Tensor::f32(vec![n, n], tri),
        _ => Tensor::i64(vec![n, n], tri.iter().map(|&v| v as i64).collect()),
    };
    let t = cx.add_const(&name, t)?;
    if axis + 1 == rank {
        return cx.add(Op::MatMul, &[x, t]);
    }
    let mut perm: Vec<usize> = (0..rank).collect();
    perm.swap(axis, rank - 1);
    let moved = tmp(cx, Op::Transpose { perm: perm.clone() }, &[x], "axis_last")?;
    let sums = tmp(cx, Op::MatMul, &[moved, t], "sums")?;
    cx.add(Op::Transpose { perm }, &[sums])
}

/// OneHot: `on` where the (integer, negative counting from `depth`) index equals the position
/// along the new axis, `off` elsewhere.
pub fn one_hot(cx: &mut Ctx) -> Result<NodeId> {
    let indices = cx.input(0)?;
    let depth = cx
        .const_scalar(1, "depth input")?
        .ok_or_else(|| cx.err("the depth input is missing".into()))?;
    let values = cx.input(2)?;
    if depth < 1.0 {
        return Err(cx.err(format!("depth {depth} is not positive")));
    }
    let depth = depth as usize;
    let shape = cx.shape(indices);
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(-1), shape.len() + 1, false)?;
    if cx.shape(values) != [2] {
        return Err(cx.err("values must have shape [2] (off, on)".into()));
    }
    let ids = match cx.dtype(indices) {
        crate::tensor::DType::I64 => indices,
        _ => tmp(
            cx,
            Op::Cast {
                to: crate::tensor::DType::I64,
            },
            &[indices],
            "ids",
        )?,
    };
    let name = cx.temp_name("depth");
    let d = cx.add_const(&name, Tensor::i64(vec![], vec![depth as i64]))?;
    let name = cx.temp_name("zero");
    let zero = cx.add_const(&name, Tensor::i64(vec![], vec![0]))?;
    let neg = bin(cx, Binary::Less, ids, zero, "negative")?;
    let wrapped = bin(cx, Binary::Add, ids, d, "wrapped")?;
    let ids = tmp(cx, Op::Where, &[neg, wrapped, ids], "index")?;
    let mut unsq = shape.clone();
    unsq.insert(axis, 1);
    let ids = tmp(cx, Op::Reshape { shape: unsq }, &[ids], "index_unsqueezed")?;
    let mut pos_shape = vec![1; shape.len() + 1];
    pos_shape[axis] = depth;
    let name = cx.temp_name("positions");
    let pos = cx.add_const(&name, Tensor::i64(pos_shape, (0..depth as i64).collect()))?;
    let hot = bin(cx, Binary::Equal, ids, pos, "hot")?;
    let pick = |cx: &mut Ctx, i: i64, tag: &str| -> Result<NodeId> {
        let name = cx.temp_name(&format!("{tag}_id"));
        let c = cx.add_const(&name, Tensor::i64(vec![], vec![i]))?;
        tmp(cx, Op::Gather { axis: 0 }, &[values, c], tag)
    };
    let off = pick(cx, 0, "off")?;
    let on = pick(cx, 1, "on")?;
    cx.add(Op::Where, &[hot, on, off])
}

/// The mean over every dim after the first two, kept as dims of size 1.
pub fn global_average_pool(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let shape = cx.shape(x);
    if shape.len() < 3 {
        return Err(cx.err(format!(
            "the input has rank {}, expected at least 3 (N, C, spatial...)",
            shape.len()
        )));
    }
    let count: usize = shape[2..].iter().product();
    let op = Op::Reduce {
        kind: Reduce::Sum,
        axes: (2..shape.len()).collect(),
        keepdims: true,
    };
    let s = tmp(cx, op, &[x], "sum")?;
    let n = scalar(cx, count as f32, "count")?;
    cx.add(Op::Binary(Binary::Div), &[s, n])
}

/// Tile as reshape to `[1, d0, 1, d1, ...]`, expand to `[r0, d0, r1, d1, ...]`, reshape to
/// `[r0 * d0, r1 * d1, ...]`.
pub fn tile(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let repeats = cx
        .const_ints(1, "repeats")?
        .ok_or_else(|| cx.err("the repeats input is missing".into()))?;
    let shape = cx.shape(x);
    if repeats.len() != shape.len() || repeats.iter().any(|&r| r < 0) {
        return Err(cx.err(format!(
            "repeats {repeats:?} must have one non-negative entry per input dim (rank {})",
            shape.len()
        )));
    }
    let reps: Vec<usize> = repeats.iter().map(|&r| r as usize).collect();
    let spread: Vec<usize> = shape.iter().flat_map(|&d| [1, d]).collect();
    let big: Vec<usize> = shape
        .iter()
        .zip(&reps)
        .flat_map(|(&d, &r)| [r, d])
        .collect();
    let out: Vec<usize> = shape.iter().zip(&reps).map(|(&d, &r)| d * r).collect();
    let a = tmp(cx, Op::Reshape { shape: spread }, &[x], "spread")?;
    let b = tmp(cx, Op::Expand { shape: big }, &[a], "repeated")?;
    cx.add(Op::Reshape { shape: out }, &[b])
}

/// `[N, C, H, W]` as `shape`, permuted by `perm`, reshaped to `out`.
fn rearrange(
    cx: &mut Ctx,
    x: NodeId,
    shape: Vec<usize>,
    perm: Vec<usize>,
    out: Vec<usize>,
) -> Result<NodeId> {
    let a = tmp(cx, Op::Reshape { shape }, &[x], "blocks")?;
    let b = tmp(cx, Op::Transpose { perm }, &[a], "moved")?;
    cx.add(Op::Reshape { shape: out }, &[b])
}

/// The NCHW input dims and the blocksize, checked.
fn nchw_blocks(cx: &Ctx, x: NodeId) -> Result<([usize; 4], usize)> {
    let shape = cx.shape(x);
    let b = cx
        .attr_int("blocksize")?
        .ok_or_else(|| cx.err("the blocksize attribute is missing".into()))?;
    let [n, c, h, w] = shape[..] else {
        return Err(cx.err(format!("the input has rank {}, expected 4", shape.len())));
    };
    if b <= 0 {
        return Err(cx.err(format!("blocksize {b} is not positive")));
    }
    Ok(([n, c, h, w], b as usize))
}

pub fn space_to_depth(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let ([n, c, h, w], b) = nchw_blocks(cx, x)?;
    if h % b != 0 || w % b != 0 {
        return Err(cx.err(format!(
            "H {h} and W {w} must be multiples of blocksize {b}"
        )));
    }
    // DCR puts the block offsets before the channels, CRD after them.
    let perm = match cx.attr_string("mode")?.as_deref() {
        None | Some("DCR") => vec![0, 3, 5, 1, 2, 4],
        Some("CRD") => vec![0, 1, 3, 5, 2, 4],
        Some(m) => return Err(cx.err(format!("mode '{m}', expected \"DCR\" or \"CRD\""))),
    };
    rearrange(
        cx,
        x,
        vec![n, c, h / b, b, w / b, b],
        perm,
        vec![n, c * b * b, h / b, w / b],
    )
}

pub fn depth_to_space(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let ([n, c, h, w], b) = nchw_blocks(cx, x)?;
    if c % (b * b) != 0 {
        return Err(cx.err(format!("C {c} must be a multiple of blocksize² {}", b * b)));
    }
    let c2 = c / (b * b);
    let (shape, perm) = match cx.attr_string("mode")?.as_deref() {
        None | Some("DCR") => (vec![n, b, b, c2, h, w], vec![0, 3, 4, 1, 5, 2]),
        Some("CRD") => (vec![n, c2, b, b, h, w], vec![0, 1, 4, 2, 5, 3]),
        Some(m) => return Err(cx.err(format!("mode '{m}', expected \"DCR\" or \"CRD\""))),
    };
    rearrange(cx, x, shape, perm, vec![n, c2, h * b, w * b])
}

/// LpNormalization: `x / ||x||_p` along `axis` (p = 1 or 2); a zero vector stays zero.
pub fn lp_normalization(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let rank = cx.shape(x).len();
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(-1), rank, false)?;
    let p = cx.attr_int("p")?.unwrap_or(2);
    let norm = match p {
        1 => {
            let a = un(cx, unary::ABS, x, "abs")?;
            let op = Op::Reduce {
                kind: Reduce::Sum,
                axes: vec![axis],
                keepdims: true,
            };
            tmp(cx, op, &[a], "norm")?
        }
        2 => {
            let op = Op::Reduce {
                kind: Reduce::SumSquare,
                axes: vec![axis],
                keepdims: true,
            };
            let ss = tmp(cx, op, &[x], "sum_squares")?;
            un(cx, unary::SQRT, ss, "norm")?
        }
        _ => return Err(cx.err(format!("p is {p}, expected 1 or 2"))),
    };
    // A zero vector stays zero (the reference divides by 1 there).
    let zero = scalar(cx, 0.0, "zero")?;
    let one = scalar(cx, 1.0, "one")?;
    let z = bin(cx, Binary::Equal, norm, zero, "zero_norm")?;
    let norm = tmp(cx, Op::Where, &[z, one, norm], "safe_norm")?;
    cx.add(Op::Binary(Binary::Div), &[x, norm])
}

/// A quantizer's scale (or zero point) laid out to broadcast against an input of shape `xs`:
/// one value, one per index of `axis` (a 1-D tensor), or one per `block_size` indices of it.
pub(super) fn spread_quantization(
    cx: &mut Ctx,
    t: NodeId,
    xs: &[usize],
    tag: &str,
) -> Result<NodeId> {
    let axis_attr = cx.attr_int("axis")?.unwrap_or(1);
    let block = cx.attr_int("block_size")?.unwrap_or(0);
    let ts = cx.shape(t);
    if block <= 0 && (numel(&ts) == 1 || ts.is_empty()) {
        return Ok(t);
    }
    let axis = cx.axis(axis_attr, xs.len(), false)?;
    if block > 0 {
        let n = xs[axis];
        let ids: Vec<i64> = (0..n as i64).map(|j| j / block).collect();
        let name = cx.temp_name(&format!("{tag}_blocks"));
        let c = cx.add_const(&name, Tensor::i64(vec![n], ids))?;
        return tmp(cx, Op::Gather { axis }, &[t, c], &format!("{tag}_spread"));
    }
    if ts.len() == 1 && ts[0] == xs[axis] {
        let mut s = vec![1; xs.len()];
        s[axis] = ts[0];
        return tmp(cx, Op::Reshape { shape: s }, &[t], &format!("{tag}_axis"));
    }
    Err(cx.err(format!(
        "{tag} {ts:?} does not fit input {xs:?} along axis {axis}"
    )))
}

/// DequantizeLinear: `(x - zero_point) * scale`, with per-tensor, per-axis (1-D along `axis`)
/// or blocked (`block_size` elements of `axis` per entry) scale and zero point.
pub fn dequantize_linear(cx: &mut Ctx) -> Result<NodeId> {
    use crate::tensor::DType;
    let x = cx.input(0)?;
    let scale = cx.input(1)?;
    let zp = cx.opt_input(2)?;
    let xs = cx.shape(x);
    if let Some(t) = cx.attr_int("output_dtype")? {
        if t != 0 && super::data::ir_dtype(t as i32) != Some(DType::F32) {
            return Err(cx.unsupported(format!("DequantizeLinear to output type {t}")));
        }
    }
    let spread = |cx: &mut Ctx, t: NodeId, tag: &str| spread_quantization(cx, t, &xs, tag);
    let xf = match cx.dtype(x) {
        DType::F32 => x,
        _ => tmp(cx, Op::Cast { to: DType::F32 }, &[x], "x_float")?,
    };
    let s = spread(cx, scale, "scale")?;
    let d = match zp {
        Some(z) => {
            let z = spread(cx, z, "zero_point")?;
            let zf = match cx.dtype(z) {
                DType::F32 => z,
                _ => tmp(cx, Op::Cast { to: DType::F32 }, &[z], "zero_point_float")?,
            };
            bin(cx, Binary::Sub, xf, zf, "centered")?
        }
        None => xf,
    };
    cx.add(Op::Binary(Binary::Mul), &[d, s])
}

/// CenterCropPad: each listed axis cropped or zero-padded to its target size around the centre
/// (the extra element of an odd difference at the end), as one Gather per axis whose indices
/// past the end gather 0.
pub fn center_crop_pad(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let target = cx
        .const_ints(1, "shape input")?
        .ok_or_else(|| cx.err("the shape input is missing".into()))?;
    let xs = cx.shape(x);
    let axes: Vec<usize> = match cx.attr_ints("axes")? {
        Some(a) => a
            .iter()
            .map(|&a| cx.axis(a, xs.len(), false))
            .collect::<Result<_>>()?,
        None => (0..xs.len()).collect(),
    };
    if target.len() != axes.len() || target.iter().any(|&t| t < 0) {
        return Err(cx.err(format!(
            "shape {target:?} must give a size for each of the {} axes",
            axes.len()
        )));
    }
    let mut v = x;
    for (&a, &t) in axes.iter().zip(&target) {
        let n = xs[a] as i64;
        if t == n {
            continue;
        }
        // Output position j reads input j + shift (cropping) or j - (t - n) / 2 (padding).
        let shift = if t < n { (n - t) / 2 } else { -((t - n) / 2) };
        let ids: Vec<i64> = (0..t)
            .map(|j| j + shift)
            .map(|s| if (0..n).contains(&s) { s } else { n })
            .collect();
        let name = cx.temp_name(&format!("ids{a}"));
        let c = cx.add_const(&name, Tensor::i64(vec![ids.len()], ids))?;
        v = tmp(cx, Op::Gather { axis: a }, &[v, c], &format!("axis{a}"))?;
    }
    cx.add(Op::Identity, &[v])
}

/// Scatter with indices known at import (constants, or an input whose value was given): each
/// output element's writers are known, so the op is Gathers of the flat updates with constant
/// ids, one layer per writer rank, combined with the data by Where (no reduction: the last
/// writer wins) or by the reduction (add, mul, max, min). `pairs` are (output position, update
/// position) in write order.
fn scatter_known(
    cx: &mut Ctx,
    data: NodeId,
    updates: NodeId,
    pairs: Vec<(usize, usize)>,
) -> Result<NodeId> {
    let reduction = cx
        .attr_string("reduction")?
        .unwrap_or_else(|| "none".into());
    let combine = match reduction.as_str() {
        "none" => None,
        "add" => Some(Binary::Add),
        "mul" => Some(Binary::Mul),
        "max" => Some(Binary::Max),
        "min" => Some(Binary::Min),
        r => {
            return Err(cx.err(format!(
                "reduction '{r}', expected none, add, mul, max or min"
            )))
        }
    };
    let ds = cx.shape(data);
    let n = numel(&ds);
    let m = numel(&cx.shape(updates));
    let mut writers: Vec<Vec<usize>> = vec![vec![]; n];
    for (o, u) in pairs {
        writers[o].push(u);
    }
    if combine.is_none() {
        for w in &mut writers {
            if w.len() > 1 {
                w.drain(..w.len() - 1);
            }
        }
    }
    let layers = writers.iter().map(Vec::len).max().unwrap_or(0);
    let flat = tmp(cx, Op::Reshape { shape: vec![n] }, &[data], "data_flat")?;
    let upd = tmp(
        cx,
        Op::Reshape { shape: vec![m] },
        &[updates],
        "updates_flat",
    )?;
    let mut acc = flat;
    for l in 0..layers {
        // Id m is past the end: Gather gives 0 there, and the mask keeps acc.
        let ids: Vec<i64> = writers
            .iter()
            .map(|w| w.get(l).map_or(m as i64, |&u| u as i64))
            .collect();
        let mask: Vec<bool> = writers.iter().map(|w| w.len() > l).collect();
        let name = cx.temp_name(&format!("writer{l}_ids"));
        let idc = cx.add_const(&name, Tensor::i64(vec![n], ids))?;
        let name = cx.temp_name(&format!("writer{l}_mask"));
        let mc = cx.add_const(&name, Tensor::bool(vec![n], mask))?;
        let g = tmp(
            cx,
            Op::Gather { axis: 0 },
            &[upd, idc],
            &format!("writer{l}"),
        )?;
        let v = match combine {
            Some(b) => bin(cx, b, acc, g, &format!("combined{l}"))?,
            None => g,
        };
        acc = tmp(cx, Op::Where, &[mc, v, acc], &format!("scattered{l}"))?;
    }
    cx.add(Op::Reshape { shape: ds }, &[acc])
}

/// ScatterElements (and the older Scatter): update i goes to position i with coordinate `axis`
/// replaced by indices[i].
pub fn scatter_elements(cx: &mut Ctx) -> Result<NodeId> {
    let data = cx.input(0)?;
    let updates = cx.input(2)?;
    let ids = cx
        .const_ints(1, "indices input")?
        .ok_or_else(|| cx.err("the indices input is missing".into()))?;
    let ds = cx.shape(data);
    let is = cx.shape(updates);
    let axis = cx.axis(cx.attr_int("axis")?.unwrap_or(0), ds.len(), false)?;
    let ds_strides = crate::tensor::strides(&ds);
    let is_strides = crate::tensor::strides(&is);
    if ids.len() != numel(&is) {
        return Err(cx.err("indices and updates must have the same shape".into()));
    }
    let mut pairs = Vec::with_capacity(ids.len());
    for (u, &id) in ids.iter().enumerate() {
        let dim = ds[axis] as i64;
        if id < -dim || id >= dim {
            return Err(cx.err(format!(
                "index {id} is out of range for axis {axis} of size {dim}"
            )));
        }
        let id = if id < 0 { id + dim } else { id } as usize;
        let mut o = 0;
        for d in 0..ds.len() {
            let c = (u / is_strides[d]) % is[d];
            o += if d == axis { id } else { c } * ds_strides[d];
        }
        pairs.push((o, u));
    }
    scatter_known(cx, data, updates, pairs)
}

/// ScatterND: update slice q goes to the data slice at the index tuple indices[q].
pub fn scatter_nd(cx: &mut Ctx) -> Result<NodeId> {
    let data = cx.input(0)?;
    let updates = cx.input(2)?;
    let ids = cx
        .const_ints(1, "indices input")?
        .ok_or_else(|| cx.err("the indices input is missing".into()))?;
    let idx_shape = cx.shape(cx.input(1)?);
    let ds = cx.shape(data);
    let k = *idx_shape.last().unwrap_or(&0);
    if k == 0 || k > ds.len() {
        return Err(cx.err(format!(
            "index tuples of length {k} do not fit data of rank {}",
            ds.len()
        )));
    }
    let slice: usize = ds[k..].iter().product();
    let ds_strides = crate::tensor::strides(&ds);
    let mut pairs = vec![];
    for (q, tuple) in ids.chunks(k).enumerate() {
        let mut base = 0;
        for (d, &i) in tuple.iter().enumerate() {
            let dim = ds[d] as i64;
            if i < -dim || i >= dim {
                return Err(cx.err(format!(
                    "index {i} is out of range for dim {d} of size {dim}"
                )));
            }
            base += (if i < 0 { i + dim } else { i }) as usize * ds_strides[d];
        }
        for e in 0..slice {
            pairs.push((base + e, q * slice + e));
        }
    }
    scatter_known(cx, data, updates, pairs)
}

/// TopK with K known at import, by ranks: element i's rank along the axis counts the elements
/// that come before it (larger, or smaller with `largest = 0`; equal ones with a lower index
/// first), from an [n, n] comparison; output slot r sums the one element whose rank is r. The
/// outputs are always sorted (also when `sorted = 0`, which leaves the order free). Costs n²
/// per row.
pub fn top_k(cx: &mut Ctx) -> Result<NodeId> {
    use crate::tensor::DType;
    let x = cx.input(0)?;
    let k = cx
        .const_ints(1, "K input")?
        .ok_or_else(|| cx.err("the K input is missing".into()))?;
    let xs = cx.shape(x);
    let a = cx.axis(cx.attr_int("axis")?.unwrap_or(-1), xs.len(), false)?;
    let largest = cx.attr_bool("largest", true)?;
    let _ = cx.attr_bool("sorted", true)?;
    let n = xs[a];
    let k = match k[..] {
        [k] if (0..=n as i64).contains(&k) => k as usize,
        _ => return Err(cx.err(format!("K {k:?} must be one value in 0..={n}"))),
    };
    let trailing = xs.len() - a - 1;
    // x with its axis element index at a (i) and a unit dim at a + 1, and the transpose (j).
    let with_unit = |at: usize| {
        let mut s = xs.clone();
        s.insert(at, 1);
        s
    };
    let xi = tmp(
        cx,
        Op::Reshape {
            shape: with_unit(a + 1),
        },
        &[x],
        "x_i",
    )?;
    let xj = tmp(
        cx,
        Op::Reshape {
            shape: with_unit(a),
        },
        &[x],
        "x_j",
    )?;
    let before = if largest {
        bin(cx, Binary::Less, xi, xj, "j_larger")?
    } else {
        bin(cx, Binary::Less, xj, xi, "j_smaller")?
    };
    let same = bin(cx, Binary::Equal, xi, xj, "tie")?;
    let mut lower = vec![n, n];
    lower.extend(vec![1; trailing]);
    let name = cx.temp_name("j_lower");
    let jl: Vec<bool> = (0..n * n).map(|p| p % n < p / n).collect();
    let jl = cx.add_const(&name, Tensor::bool(lower, jl))?;
    let tie_first = bin(cx, Binary::And, same, jl, "tie_first")?;
    let beats = bin(cx, Binary::Or, before, tie_first, "beats")?;
    let beats = tmp(cx, Op::Cast { to: DType::I64 }, &[beats], "beats_count")?;
    let op = Op::Reduce {
        kind: Reduce::Sum,
        axes: vec![a + 1],
        keepdims: true,
    };
    let rank = tmp(cx, op, &[beats], "rank")?;
    let mut slots = vec![1; a + 1];
    slots.push(k);
    slots.extend(vec![1; trailing]);
    let name = cx.temp_name("slots");
    let r = cx.add_const(&name, Tensor::i64(slots, (0..k as i64).collect()))?;
    let pick = bin(cx, Binary::Equal, rank, r, "pick")?;
    let sum_i = Op::Reduce {
        kind: Reduce::Sum,
        axes: vec![a],
        keepdims: false,
    };
    let zero = scalar(cx, 0.0, "zero")?;
    let chosen = tmp(cx, Op::Where, &[pick, xi, zero], "chosen")?;
    let values = cx.add(sum_i.clone(), &[chosen])?;
    if let Some(name) = cx.node.output.get(1).filter(|o| !o.is_empty()).cloned() {
        let mut is = vec![1; a];
        is.extend([n, 1]);
        is.extend(vec![1; trailing]);
        let iname = cx.temp_name("positions");
        let ids = cx.add_const(&iname, Tensor::i64(is, (0..n as i64).collect()))?;
        let izero = cx.temp_name("zero_id");
        let iz = cx.add_const(&izero, Tensor::i64(vec![], vec![0]))?;
        let at = tmp(cx, Op::Where, &[pick, ids, iz], "chosen_ids")?;
        let idx = cx.add_named(sum_i, &[at], &name)?;
        cx.set_output(1, idx);
    }
    Ok(values)
}

/// Einsum as broadcasting: every operand is transposed to one label order (the output's labels,
/// then the summed ones) with unit dims for its missing labels, the operands are multiplied, and
/// the summed labels are reduced. A label repeated within an operand (a diagonal, `ii`) becomes
/// a fresh label tied to the first by an identity-matrix constant. `...` stands for the same
/// broadcast dims in every operand.
pub fn einsum(cx: &mut Ctx) -> Result<NodeId> {
    let eq: String = cx
        .attr_string("equation")?
        .ok_or_else(|| cx.err("the equation attribute is missing".into()))?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let inputs = cx.inputs_from(0)?;
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != inputs.len() {
        return Err(cx.err(format!(
            "equation '{eq}' has {} operands, the node {}",
            terms.len(),
            inputs.len()
        )));
    }
    // Labels are chars; ellipsis dims get the labels '0', '1', ... from the left of the widest.
    // The labels a term names besides its ellipsis:
    let named = |t: &str| t.chars().count() - if t.contains("...") { 3 } else { 0 };
    let mut ell_rank = 0;
    for (t, &x) in terms.iter().zip(&inputs).filter(|(t, _)| t.contains("...")) {
        let rank = cx.shape(x).len();
        let e = rank.checked_sub(named(t)).filter(|&e| e <= 10);
        let e = e.ok_or_else(|| {
            cx.err(format!(
                "term '{t}' does not fit an operand of rank {rank} (or its ellipsis spans over 10 dims)"
            ))
        })?;
        ell_rank = ell_rank.max(e);
    }
    // None when the term names more labels than `rank` holds.
    let expand = |t: &str, rank: usize| -> Option<Vec<char>> {
        match t.split_once("...") {
            Some((a, b)) => {
                let e = rank.checked_sub(named(t))?;
                let mut v: Vec<char> = a.chars().collect();
                v.extend((ell_rank.checked_sub(e)?..ell_rank).map(|i| (b'0' + i as u8) as char));
                v.extend(b.chars());
                Some(v)
            }
            None => Some(t.chars().collect()),
        }
    };
    let mut ops: Vec<(NodeId, Vec<char>)> = vec![];
    let mut fresh = 'A';
    let mut sizes: std::collections::HashMap<char, usize> = Default::default();
    for (t, &x) in terms.iter().zip(&inputs) {
        let s = cx.shape(x);
        let mut labels = expand(t, s.len()).unwrap_or_default();
        if labels.len() != s.len() {
            return Err(cx.err(format!(
                "term '{t}' does not fit an operand of rank {}",
                s.len()
            )));
        }
        for (k, &l) in labels.clone().iter().enumerate() {
            let d = sizes.entry(l).or_insert(s[k]);
            if *d != s[k] && *d != 1 && s[k] != 1 {
                return Err(cx.err(format!("label '{l}' has sizes {d} and {}", s[k])));
            }
            *d = (*d).max(s[k]);
        }
        let mut extra = vec![];
        for k in 0..labels.len() {
            if labels[..k].contains(&labels[k]) {
                while sizes.contains_key(&fresh) || lhs.contains(fresh) {
                    fresh = char::from_u32(fresh as u32 + 1)
                        .ok_or_else(|| cx.err("too many repeated labels".into()))?;
                }
                let n = s[k];
                let name = cx.temp_name("diagonal");
                let eye = Tensor::f32(
                    vec![n, n],
                    (0..n * n)
                        .map(|p| (p % (n + 1) == 0) as u8 as f32)
                        .collect(),
                );
                let eye = cx.add_const(&name, eye)?;
                extra.push((eye, vec![labels[k], fresh]));
                sizes.insert(fresh, n);
                labels[k] = fresh;
            }
        }
        ops.push((x, labels));
        ops.extend(extra);
    }
    let out: Vec<char> = match &rhs {
        Some(r) => expand(r, ell_rank + named(r))
            .ok_or_else(|| cx.err(format!("output term '{r}' does not fit")))?,
        None => {
            let all: Vec<char> = ops.iter().flat_map(|(_, l)| l.clone()).collect();
            let mut once: Vec<char> = all
                .iter()
                .copied()
                .filter(|c| !c.is_ascii_digit() && all.iter().filter(|d| *d == c).count() == 1)
                .collect();
            once.sort_unstable();
            let mut v: Vec<char> = (0..ell_rank).map(|i| (b'0' + i as u8) as char).collect();
            v.extend(once);
            v
        }
    };
    let mut order = out.clone();
    for (_, ls) in &ops {
        for &l in ls {
            if !order.contains(&l) {
                order.push(l);
            }
        }
    }
    if let Some(l) = out.iter().find(|l| !sizes.contains_key(l)) {
        return Err(cx.err(format!("output label '{l}' is in no operand")));
    }
    let mut acc: Option<NodeId> = None;
    for (i, (x, ls)) in ops.iter().enumerate() {
        let mut present: Vec<(usize, usize)> = ls
            .iter()
            .enumerate()
            .map(|(k, l)| (order.iter().position(|o| o == l).unwrap(), k))
            .collect();
        present.sort_unstable();
        let perm: Vec<usize> = present.iter().map(|&(_, k)| k).collect();
        let mut v = *x;
        if perm.iter().enumerate().any(|(a, &b)| a != b) {
            v = tmp(
                cx,
                Op::Transpose { perm: perm.clone() },
                &[v],
                &format!("operand{i}"),
            )?;
        }
        let s = cx.shape(v);
        let full: Vec<usize> = order
            .iter()
            .map(|l| {
                ls.iter()
                    .position(|m| m == l)
                    .map_or(1, |k| cx.shape(*x)[k])
            })
            .collect();
        if full != s {
            v = tmp(
                cx,
                Op::Reshape { shape: full },
                &[v],
                &format!("operand{i}_spread"),
            )?;
        }
        acc = Some(match acc {
            None => v,
            Some(a) => bin(cx, Binary::Mul, a, v, &format!("product{i}"))?,
        });
    }
    let acc = acc.ok_or_else(|| cx.err("no operands".into()))?;
    let summed: Vec<usize> = (out.len()..order.len()).collect();
    if summed.is_empty() {
        let shape: Vec<usize> = out.iter().map(|l| sizes[l]).collect();
        if cx.shape(acc) != shape {
            return cx.add(Op::Expand { shape }, &[acc]);
        }
        return cx.add(Op::Identity, &[acc]);
    }
    let op = Op::Reduce {
        kind: Reduce::Sum,
        axes: summed,
        keepdims: false,
    };
    cx.add(op, &[acc])
}

/// `x[.., start..end, ..]` along `axis`.
fn slice_axis(
    cx: &mut Ctx,
    x: NodeId,
    axis: usize,
    start: usize,
    end: usize,
    tag: &str,
) -> Result<NodeId> {
    slice_strided(cx, x, axis, (start, end, 1), tag)
}

/// `x[.., start..end:step, ..]` along `axis`: a Slice (differentiable, unlike a Gather).
pub(super) fn slice_strided(
    cx: &mut Ctx,
    x: NodeId,
    axis: usize,
    (start, end, step): (usize, usize, i64),
    tag: &str,
) -> Result<NodeId> {
    let s = cx.shape(x);
    let mut starts = vec![0i64; s.len()];
    let mut ends: Vec<i64> = s.iter().map(|&e| e as i64).collect();
    let mut steps = vec![1i64; s.len()];
    (starts[axis], ends[axis], steps[axis]) = (start as i64, end as i64, step);
    tmp(
        cx,
        Op::Slice {
            starts,
            ends,
            steps,
        },
        &[x],
        tag,
    )
}

/// Concat of any number of values along `axis`, in chunks the IR's Concat takes.
fn concat_many(cx: &mut Ctx, mut v: Vec<NodeId>, axis: usize, tag: &str) -> Result<NodeId> {
    let mut round = 0;
    while v.len() > 1 {
        let mut next = vec![];
        for (i, chunk) in v.chunks(crate::ir::op::MAX_CONCAT_INPUTS).enumerate() {
            next.push(match chunk {
                [one] => *one,
                _ => tmp(
                    cx,
                    Op::Concat { axis },
                    chunk,
                    &format!("{tag}_{round}_{i}"),
                )?,
            });
        }
        v = next;
        round += 1;
    }
    v.pop()
        .ok_or_else(|| cx.err("nothing to concatenate".into()))
}

#[derive(Clone, Copy, PartialEq)]
enum Cell {
    Rnn,
    Gru,
    Lstm,
}

/// RNN, GRU and LSTM unrolled over the (static) sequence: per direction, the input projection
/// of every step in one MatMul, then per step the recurrent MatMul and the gate arithmetic.
/// Default activations only, no clip, full sequence lengths; both layouts; forward, reverse and
/// bidirectional; GRU's linear_before_reset; LSTM's peepholes and initial cell.
fn recurrent(cx: &mut Ctx, cell: Cell) -> Result<NodeId> {
    let gates = match cell {
        Cell::Rnn => 1,
        Cell::Gru => 3,
        Cell::Lstm => 4,
    };
    let x = cx.input(0)?;
    let w = cx.input(1)?;
    let r = cx.input(2)?;
    let bias = cx.opt_input(3)?;
    let lens = cx.const_ints(4, "sequence_lens input")?;
    let h0 = cx.opt_input(5)?;
    let (c0, peep) = if cell == Cell::Lstm {
        (cx.opt_input(6)?, cx.opt_input(7)?)
    } else {
        (None, None)
    };
    let hidden = match cx.attr_int("hidden_size")? {
        Some(h) if h > 0 => h as usize,
        Some(h) => return Err(cx.err(format!("hidden_size {h}, expected a positive size"))),
        None => return Err(cx.err("the hidden_size attribute is missing".into())),
    };
    let layout = cx.attr_int("layout")?.unwrap_or(0);
    let direction = cx
        .attr_string("direction")?
        .unwrap_or_else(|| "forward".into());
    let lbr = cell == Cell::Gru && cx.attr_bool("linear_before_reset", false)?;
    let defaults: &[&str] = match cell {
        Cell::Rnn => &["Tanh"],
        Cell::Gru => &["Sigmoid", "Tanh"],
        Cell::Lstm => &["Sigmoid", "Tanh", "Tanh"],
    };
    let _ = cx.attr_floats("activation_alpha")?;
    let _ = cx.attr_floats("activation_beta")?;
    if let Some(acts) = cx.node.attribute.iter().find(|a| a.name() == "activations") {
        let acts: Vec<String> = acts
            .strings
            .iter()
            .map(|s| String::from_utf8_lossy(s).into())
            .collect();
        let n = acts.len().min(defaults.len());
        if acts
            .iter()
            .enumerate()
            .any(|(i, a)| a != defaults[i % n.max(1)])
        {
            return Err(cx.unsupported(format!("{} with activations {acts:?}", cx.op_type())));
        }
    }
    // Reading it through Ctx marks it read; its value was checked above.
    let _ = cx.attr("activations", super::AttributeType::Strings)?;
    if cx.attr_float("clip")?.is_some() {
        return Err(cx.unsupported(format!("{} with clip", cx.op_type())));
    }
    if cell == Cell::Lstm && cx.attr_bool("input_forget", false)? {
        return Err(cx.unsupported("LSTM with input_forget".into()));
    }
    if cx.shape(x).len() != 3 {
        return Err(cx.err(format!(
            "X has shape {}, expected 3 dims",
            shape_str(&cx.shape(x))
        )));
    }
    let x = if layout == 1 {
        tmp(
            cx,
            Op::Transpose {
                perm: vec![1, 0, 2],
            },
            &[x],
            "x_seq_major",
        )?
    } else {
        x
    };
    let xs = cx.shape(x);
    let (steps, batch) = (xs[0], xs[1]);
    if let Some(l) = &lens {
        if l.iter().any(|&v| v != steps as i64) {
            return Err(cx.unsupported(format!(
                "{} with sequence_lens {l:?} shorter than the sequence ({steps})",
                cx.op_type()
            )));
        }
    }
    let dirs: Vec<bool> = match direction.as_str() {
        "forward" => vec![false],
        "reverse" => vec![true],
        "bidirectional" => vec![false, true],
        d => return Err(cx.err(format!("direction '{d}'"))),
    };
    let gh = gates * hidden;
    // Every weight and state by the shape the op defines, before any is sliced.
    let nd = dirs.len();
    let state_shape = if layout == 1 {
        vec![batch, nd, hidden]
    } else {
        vec![nd, batch, hidden]
    };
    let expected = [
        (Some(w), "W", vec![nd, gh, xs[2]]),
        (Some(r), "R", vec![nd, gh, hidden]),
        (bias, "B", vec![nd, 2 * gh]),
        (h0, "initial_h", state_shape.clone()),
        (c0, "initial_c", state_shape),
        (peep, "P", vec![nd, 3 * hidden]),
    ];
    for (id, what, want) in expected {
        if let Some(id) = id.filter(|&id| cx.shape(id) != want) {
            return Err(cx.err(format!(
                "{what} has shape {}, expected {}",
                shape_str(&cx.shape(id)),
                shape_str(&want)
            )));
        }
    }
    // A per-direction, batch-first-or-not initial state as [B, H].
    let state = |cx: &mut Ctx, s: Option<NodeId>, d: usize, tag: &str| -> Result<NodeId> {
        match s {
            Some(s) => {
                let axis = if layout == 1 { 1 } else { 0 };
                let v = slice_axis(cx, s, axis, d, d + 1, &format!("{tag}{d}"))?;
                tmp(
                    cx,
                    Op::Reshape {
                        shape: vec![batch, hidden],
                    },
                    &[v],
                    &format!("{tag}{d}_flat"),
                )
            }
            None => {
                let name = cx.temp_name(&format!("{tag}{d}_zero"));
                cx.add_const(
                    &name,
                    Tensor::f32(vec![batch, hidden], vec![0.0; batch * hidden]),
                )
            }
        }
    };
    let (mut ys, mut hs, mut cs) = (vec![], vec![], vec![]);
    for (d, &rev) in dirs.iter().enumerate() {
        let p = |t: &str| format!("d{d}_{t}");
        let wd = slice_axis(cx, w, 0, d, d + 1, &p("w"))?;
        let wd = tmp(
            cx,
            Op::Reshape {
                shape: vec![gh, xs[2]],
            },
            &[wd],
            &p("w2"),
        )?;
        let wt = tmp(cx, Op::Transpose { perm: vec![1, 0] }, &[wd], &p("wt"))?;
        let rd = slice_axis(cx, r, 0, d, d + 1, &p("r"))?;
        let rd = tmp(
            cx,
            Op::Reshape {
                shape: vec![gh, hidden],
            },
            &[rd],
            &p("r2"),
        )?;
        let rt = tmp(cx, Op::Transpose { perm: vec![1, 0] }, &[rd], &p("rt"))?;
        let mut xw = tmp(cx, Op::MatMul, &[x, wt], &p("xw"))?;
        let mut rb = None;
        if let Some(b) = bias {
            let bd = slice_axis(cx, b, 0, d, d + 1, &p("b"))?;
            let bd = tmp(
                cx,
                Op::Reshape {
                    shape: vec![2 * gh],
                },
                &[bd],
                &p("b1"),
            )?;
            let wb = slice_axis(cx, bd, 0, 0, gh, &p("wb"))?;
            let rbd = slice_axis(cx, bd, 0, gh, 2 * gh, &p("rb"))?;
            xw = bin(cx, Binary::Add, xw, wb, &p("xw_b"))?;
            rb = Some(rbd);
        }
        let pd = match peep {
            Some(pp) => {
                let v = slice_axis(cx, pp, 0, d, d + 1, &p("p"))?;
                Some(tmp(
                    cx,
                    Op::Reshape {
                        shape: vec![3 * hidden],
                    },
                    &[v],
                    &p("p1"),
                )?)
            }
            None => None,
        };
        let mut h = state(cx, h0, d, "h")?;
        let mut c = state(cx, c0, d, "c")?;
        let mut outs = vec![None; steps];
        for k in 0..steps {
            let t = if rev { steps - 1 - k } else { k };
            let q = |s: &str| format!("d{d}_t{t}_{s}");
            let xt = slice_axis(cx, xw, 0, t, t + 1, &q("x"))?;
            let xt = tmp(
                cx,
                Op::Reshape {
                    shape: vec![batch, gh],
                },
                &[xt],
                &q("x2"),
            )?;
            let part = |cx: &mut Ctx, v: NodeId, g: usize, s: &str| {
                slice_axis(cx, v, 1, g * hidden, (g + 1) * hidden, &q(s))
            };
            let bpart = |cx: &mut Ctx, g: usize, s: &str| -> Result<Option<NodeId>> {
                match rb {
                    Some(b) => Ok(Some(slice_axis(
                        cx,
                        b,
                        0,
                        g * hidden,
                        (g + 1) * hidden,
                        &q(s),
                    )?)),
                    None => Ok(None),
                }
            };
            let add_opt = |cx: &mut Ctx, a: NodeId, b: Option<NodeId>, s: &str| match b {
                Some(b) => bin(cx, Binary::Add, a, b, &q(s)),
                None => Ok(a),
            };
            match cell {
                Cell::Rnn | Cell::Lstm => {
                    let hr = tmp(cx, Op::MatMul, &[h, rt], &q("hr"))?;
                    let mut g = bin(cx, Binary::Add, xt, hr, &q("gates"))?;
                    g = add_opt(cx, g, rb, "gates_b")?;
                    if cell == Cell::Rnn {
                        h = un(cx, unary::TANH, g, &q("h"))?;
                    } else {
                        let peep_term =
                            |cx: &mut Ctx, a: NodeId, k: usize, cc: NodeId, s: &str| match pd {
                                Some(pp) => {
                                    let pk = slice_axis(
                                        cx,
                                        pp,
                                        0,
                                        k * hidden,
                                        (k + 1) * hidden,
                                        &q(&format!("{s}_p")),
                                    )?;
                                    let m = bin(cx, Binary::Mul, pk, cc, &q(&format!("{s}_pc")))?;
                                    bin(cx, Binary::Add, a, m, &q(&format!("{s}_peep")))
                                }
                                None => Ok(a),
                            };
                        let gi = part(cx, g, 0, "gi")?;
                        let go = part(cx, g, 1, "go")?;
                        let gf = part(cx, g, 2, "gf")?;
                        let gc = part(cx, g, 3, "gc")?;
                        let gi = peep_term(cx, gi, 0, c, "i")?;
                        let gf = peep_term(cx, gf, 2, c, "f")?;
                        let i = un(cx, unary::SIGMOID, gi, &q("i"))?;
                        let f = un(cx, unary::SIGMOID, gf, &q("f"))?;
                        let cc = un(cx, unary::TANH, gc, &q("c_cand"))?;
                        let fc = bin(cx, Binary::Mul, f, c, &q("fc"))?;
                        let ic = bin(cx, Binary::Mul, i, cc, &q("ic"))?;
                        c = bin(cx, Binary::Add, fc, ic, &q("c"))?;
                        let go = peep_term(cx, go, 1, c, "o")?;
                        let o = un(cx, unary::SIGMOID, go, &q("o"))?;
                        let tc = un(cx, unary::TANH, c, &q("tanh_c"))?;
                        h = bin(cx, Binary::Mul, o, tc, &q("h"))?;
                    }
                }
                Cell::Gru => {
                    let hz_r = tmp(cx, Op::MatMul, &[h, rt], &q("hr"))?;
                    let xz = part(cx, xt, 0, "xz")?;
                    let xr = part(cx, xt, 1, "xr")?;
                    let xh = part(cx, xt, 2, "xh")?;
                    let hz = part(cx, hz_r, 0, "hz")?;
                    let hr = part(cx, hz_r, 1, "hrr")?;
                    let bz = bpart(cx, 0, "bz")?;
                    let br = bpart(cx, 1, "br")?;
                    let bh = bpart(cx, 2, "bh")?;
                    let z = bin(cx, Binary::Add, xz, hz, &q("z_in"))?;
                    let z = add_opt(cx, z, bz, "z_b")?;
                    let z = un(cx, unary::SIGMOID, z, &q("z"))?;
                    let rr = bin(cx, Binary::Add, xr, hr, &q("r_in"))?;
                    let rr = add_opt(cx, rr, br, "r_b")?;
                    let rr = un(cx, unary::SIGMOID, rr, &q("r"))?;
                    let rh = slice_axis(cx, rt, 1, 2 * hidden, 3 * hidden, &q("rh"))?;
                    let hh = if lbr {
                        let hrh = tmp(cx, Op::MatMul, &[h, rh], &q("h_rh"))?;
                        let hrh = add_opt(cx, hrh, bh, "h_rh_b")?;
                        bin(cx, Binary::Mul, rr, hrh, &q("r_h"))?
                    } else {
                        let rh_h = bin(cx, Binary::Mul, rr, h, &q("r_times_h"))?;
                        let v = tmp(cx, Op::MatMul, &[rh_h, rh], &q("rh_proj"))?;
                        add_opt(cx, v, bh, "rh_b")?
                    };
                    let cand = bin(cx, Binary::Add, xh, hh, &q("cand_in"))?;
                    let cand = un(cx, unary::TANH, cand, &q("cand"))?;
                    let one = scalar(cx, 1.0, &q("one"))?;
                    let nz = bin(cx, Binary::Sub, one, z, &q("one_minus_z"))?;
                    let a = bin(cx, Binary::Mul, nz, cand, &q("new"))?;
                    let b = bin(cx, Binary::Mul, z, h, &q("kept"))?;
                    h = bin(cx, Binary::Add, a, b, &q("h"))?;
                }
            }
            outs[t] = Some(tmp(
                cx,
                Op::Reshape {
                    shape: vec![1, 1, batch, hidden],
                },
                &[h],
                &q("y"),
            )?);
        }
        let outs: Vec<NodeId> = outs.into_iter().flatten().collect();
        let y = concat_many(cx, outs, 0, &p("y"))?;
        ys.push(y);
        hs.push(tmp(
            cx,
            Op::Reshape {
                shape: vec![1, batch, hidden],
            },
            &[h],
            &p("h_last"),
        )?);
        cs.push(tmp(
            cx,
            Op::Reshape {
                shape: vec![1, batch, hidden],
            },
            &[c],
            &p("c_last"),
        )?);
    }
    let y = concat_many(cx, ys, 1, "y_dirs")?;
    let yh = concat_many(cx, hs, 0, "h_dirs")?;
    let yc = concat_many(cx, cs, 0, "c_dirs")?;
    let (y, yh, yc) = if layout == 1 {
        (
            tmp(
                cx,
                Op::Transpose {
                    perm: vec![2, 0, 1, 3],
                },
                &[y],
                "y_batch_major",
            )?,
            tmp(
                cx,
                Op::Transpose {
                    perm: vec![1, 0, 2],
                },
                &[yh],
                "h_batch_major",
            )?,
            tmp(
                cx,
                Op::Transpose {
                    perm: vec![1, 0, 2],
                },
                &[yc],
                "c_batch_major",
            )?,
        )
    } else {
        (y, yh, yc)
    };
    let y_used = cx.node.output.first().is_some_and(|o| !o.is_empty());
    let h_first = !y_used && cx.node.output.get(1).is_some_and(|o| !o.is_empty());
    for (i, v) in [(1, yh), (2, yc)] {
        // The output the importer names the node after is the builder's result, below.
        let is_result = !y_used && (i == 1 || !h_first);
        if (i == 2 && cell != Cell::Lstm) || is_result {
            continue;
        }
        if let Some(name) = cx.node.output.get(i).filter(|o| !o.is_empty()).cloned() {
            let o = cx.add_named(Op::Identity, &[v], &name)?;
            cx.set_output(i, o);
        }
    }
    // Without Y, the node's IR result is its first used output (the importer names it so): Y_h,
    // or else LSTM's Y_c (registered above too; the importer keeps one entry per name).
    let h_used = cx.node.output.get(1).is_some_and(|o| !o.is_empty());
    match (y_used, h_used) {
        (true, _) => cx.add(Op::Identity, &[y]),
        (false, true) => cx.add(Op::Identity, &[yh]),
        (false, false) => cx.add(Op::Identity, &[yc]),
    }
}

pub fn rnn(cx: &mut Ctx) -> Result<NodeId> {
    recurrent(cx, Cell::Rnn)
}

pub fn gru(cx: &mut Ctx) -> Result<NodeId> {
    recurrent(cx, Cell::Gru)
}

pub fn lstm(cx: &mut Ctx) -> Result<NodeId> {
    recurrent(cx, Cell::Lstm)
}
