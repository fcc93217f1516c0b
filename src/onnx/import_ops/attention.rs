//! Attention ops, lowered to MatMul, Softmax and masks: ONNX's Attention (opsets 23-25) and
//! RotaryEmbedding (23), and ONNX Runtime's GroupQueryAttention, which the model builder of
//! onnxruntime-genai writes into every decoder it exports (Llama, Qwen, Mistral, Gemma, Phi...).
//! They share the pieces: heads split and merged, grouped key/value heads repeated, the masked
//! softmax of the scaled scores, and the rotation of a head's features.

use super::lowered::{bin, scalar, slice_strided, tmp, un};
use super::Ctx;
use crate::error::Result;
use crate::ir::{unary, Binary, NodeId, Op, Reduce};
use crate::tensor::{shape_str, DType, Tensor};

/// `[B, S, H * D]` -> `[B, S, H, D]`.
fn heads(cx: &mut Ctx, x: NodeId, h: usize, tag: &str) -> Result<NodeId> {
    let s = cx.shape(x);
    if h == 0 || !s[2].is_multiple_of(h) {
        return Err(cx.err(format!(
            "hidden size {} is not a multiple of {h} heads",
            s[2]
        )));
    }
    let shape = vec![s[0], s[1], h, s[2] / h];
    tmp(cx, Op::Reshape { shape }, &[x], tag)
}

/// Swaps dims 1 and 2 of a 4-D value: `[B, S, H, D]` <-> `[B, H, S, D]`.
fn swap_1_2(cx: &mut Ctx, x: NodeId, tag: &str) -> Result<NodeId> {
    let perm = vec![0, 2, 1, 3];
    tmp(cx, Op::Transpose { perm }, &[x], tag)
}

/// `[B, H, S, D]` -> `[B, S, H * D]`, named after the node's first output.
fn merge_heads(cx: &mut Ctx, y: NodeId) -> Result<NodeId> {
    let s = cx.shape(y);
    let t = swap_1_2(cx, y, "merge")?;
    cx.add(
        Op::Reshape {
            shape: vec![s[0], s[2], s[1] * s[3]],
        },
        &[t],
    )
}

/// Grouped-query attention: each of the key/value heads of `x` (`[B, hkv, L, D]`) serves
/// `hq / hkv` query heads, in order.
fn repeat_heads(cx: &mut Ctx, x: NodeId, hq: usize, tag: &str) -> Result<NodeId> {
    let s = cx.shape(x);
    let hkv = s[1];
    if hq == hkv {
        return Ok(x);
    }
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        return Err(cx.err(format!(
            "{hq} query heads do not share {hkv} key/value heads"
        )));
    }
    let r = tmp(
        cx,
        Op::Reshape {
            shape: vec![s[0], hkv, 1, s[2], s[3]],
        },
        &[x],
        tag,
    )?;
    let big = vec![s[0], hkv, hq / hkv, s[2], s[3]];
    let e = tmp(
        cx,
        Op::Expand { shape: big },
        &[r],
        &format!("{tag}_repeated"),
    )?;
    tmp(
        cx,
        Op::Reshape {
            shape: vec![s[0], hq, s[2], s[3]],
        },
        &[e],
        &format!("{tag}_groups"),
    )
}

/// What [`attention_probs`] computes, for the outputs that expose it.
struct Scores {
    /// `q kᵀ · scale`, softcapped.
    qk: NodeId,
    /// `qk` plus the bias.
    scores: NodeId,
    /// The softmax over keys; a row whose bias is -inf everywhere attends to nothing (zeros).
    probs: NodeId,
}

/// The attention probabilities of `q` (`[B, H, S, D]`) over `k` (`[B, H, L, D]`, heads already
/// repeated): Q and K each scaled by sqrt(scale), `softcap · tanh(qk / softcap)` when softcap
/// is positive, plus `bias` (broadcast to `[B, H, S, L]`).
fn attention_probs(
    cx: &mut Ctx,
    q: NodeId,
    k: NodeId,
    scale: f64,
    softcap: f32,
    bias: Option<NodeId>,
) -> Result<Scores> {
    let root = scalar(cx, scale.sqrt() as f32, "sqrt_scale")?;
    let qsc = bin(cx, Binary::Mul, q, root, "q_scaled")?;
    let ksc = bin(cx, Binary::Mul, k, root, "k_scaled")?;
    let kt = tmp(
        cx,
        Op::Transpose {
            perm: vec![0, 1, 3, 2],
        },
        &[ksc],
        "k_t",
    )?;
    let mut qk = tmp(cx, Op::MatMul, &[qsc, kt], "qk")?;
    if softcap > 0.0 {
        let c = scalar(cx, softcap, "softcap")?;
        let d = bin(cx, Binary::Div, qk, c, "qk_over_cap")?;
        let t = un(cx, unary::TANH, d, "qk_tanh")?;
        qk = bin(cx, Binary::Mul, t, c, "qk_capped")?;
    }
    let scores = match bias {
        Some(b) => bin(cx, Binary::Add, qk, b, "qk_bias")?,
        None => qk,
    };
    let mut probs = tmp(cx, Op::Softmax { axis: 3 }, &[scores], "probs")?;
    if let Some(b) = bias {
        let rank = cx.shape(b).len();
        let op = Op::Reduce {
            kind: Reduce::Max,
            axes: vec![rank - 1],
            keepdims: true,
        };
        let most = tmp(cx, op, &[b], "bias_max")?;
        let neg_inf = scalar(cx, f32::NEG_INFINITY, "minus_inf")?;
        let none = bin(cx, Binary::Equal, most, neg_inf, "row_masked")?;
        let zero = scalar(cx, 0.0, "zero")?;
        probs = tmp(cx, Op::Where, &[none, zero, probs], "probs_guarded")?;
    }
    Ok(Scores { qk, scores, probs })
}

/// The bias of the causal and window masks when key `j` of row `i` is allowed iff
/// `-right <= i + offset - j <= left` (a negative bound: unbounded; causal: `left`'s side only
/// from 0), one `[q, kv]` constant per offset.
fn position_bias(
    causal: bool,
    left: i64,
    right: i64,
    offset: i64,
    (sq, skv): (usize, usize),
    keep: impl Fn(i64) -> bool,
) -> Vec<f32> {
    let mut data = Vec::with_capacity(sq * skv);
    for i in 0..sq as i64 {
        for j in 0..skv as i64 {
            let diff = i + offset - j;
            let mut ok = !causal || diff >= 0;
            ok &= left < 0 || diff <= left;
            ok &= right < 0 || -diff <= right;
            ok &= keep(j);
            data.push(if ok { 0.0 } else { f32::NEG_INFINITY });
        }
    }
    data
}

/// Attention (opsets 23-25) from MatMul, Softmax and masks, following the ONNX reference:
/// 3-D inputs split into heads, past keys and values concatenated (the present outputs),
/// grouped-query heads repeated, Q and K each scaled by sqrt(scale), softcap, then an additive
/// bias: the attention mask (a bool mask as 0 / -inf, padded with -inf up to the key length),
/// and the causal, sliding-window and `nonpad_kv_seqlen` masks, which depend only on shapes and
/// on `nonpad_kv_seqlen` (known at import) and so are one constant. A query row whose bias is
/// -inf everywhere attends to nothing: its probabilities are 0. The optional fourth output is
/// the QK product (softcapped) for modes 0 and 1, with the bias for mode 2, the probabilities
/// for mode 3.
pub fn attention(cx: &mut Ctx) -> Result<NodeId> {
    let (q, k, v) = (cx.input(0)?, cx.input(1)?, cx.input(2)?);
    let mask = cx.opt_input(3)?;
    let past_k = cx.opt_input(4)?;
    let past_v = cx.opt_input(5)?;
    let nonpad = cx.const_ints(6, "nonpad_kv_seqlen input")?;
    let is_causal = cx.attr_bool("is_causal", false)?;
    let q_heads = cx.attr_int("q_num_heads")?;
    let kv_heads = cx.attr_int("kv_num_heads")?;
    let scale = cx.attr_float("scale")?;
    let softcap = cx.attr_float("softcap")?.unwrap_or(0.0);
    let mode = cx.attr_int("qk_matmul_output_mode")?.unwrap_or(0);
    // The softmax is computed in f32 (or f64 on the reference) whatever precision is asked.
    let _ = cx.attr_int("softmax_precision")?;
    let left = cx.attr_int("left_window_size")?.unwrap_or(-1);
    let right = cx.attr_int("right_window_size")?.unwrap_or(-1);
    if past_k.is_some() != past_v.is_some() || (past_k.is_some() && nonpad.is_some()) {
        return Err(
            cx.err("past_key and past_value come together, and not with nonpad_kv_seqlen".into())
        );
    }
    if !(0..=3).contains(&mode) {
        return Err(cx.err(format!("qk_matmul_output_mode {mode}, expected 0 to 3")));
    }
    let qs = cx.shape(q);
    let three_d = qs.len() == 3;
    let ranks: Vec<usize> = [q, k, v].iter().map(|&x| cx.shape(x).len()).collect();
    if ranks.iter().any(|&r| r != qs.len()) {
        return Err(cx.err(format!(
            "Q, K and V have ranks {ranks:?}: they must all be 3-D or all 4-D"
        )));
    }
    if let Some(p) = [past_k, past_v]
        .into_iter()
        .flatten()
        .find(|&p| cx.shape(p).len() != 4)
    {
        return Err(cx.err(format!(
            "a past key or value has shape {}, expected [batch, heads, length, head size]",
            shape_str(&cx.shape(p))
        )));
    }
    // [B, S, H * D] -> [B, H, S, D]
    let split_heads = |cx: &mut Ctx, x: NodeId, h: Option<i64>, tag: &str| -> Result<NodeId> {
        let h = h.filter(|&h| h > 0).ok_or_else(|| {
            cx.err("3-D inputs need the q_num_heads and kv_num_heads attributes".into())
        })? as usize;
        let x = heads(cx, x, h, tag)?;
        swap_1_2(cx, x, &format!("{tag}_heads"))
    };
    let (q, k, v) = if three_d {
        (
            split_heads(cx, q, q_heads, "q")?,
            split_heads(cx, k, kv_heads, "k")?,
            split_heads(cx, v, kv_heads, "v")?,
        )
    } else if qs.len() == 4 {
        (q, k, v)
    } else {
        return Err(cx.err(format!("Q has rank {}, expected 3 or 4", qs.len())));
    };
    let qs = cx.shape(q);
    let (batch, hq, sq, dh) = (qs[0], qs[1], qs[2], qs[3]);
    let concat = |cx: &mut Ctx, past: Option<NodeId>, x: NodeId, i: usize| -> Result<NodeId> {
        let Some(p) = past else { return Ok(x) };
        match cx.node.output.get(i).filter(|o| !o.is_empty()).cloned() {
            Some(name) => cx.add_named(Op::Concat { axis: 2 }, &[p, x], &name),
            None => tmp(cx, Op::Concat { axis: 2 }, &[p, x], &format!("present{i}")),
        }
    };
    let k = concat(cx, past_k, k, 1)?;
    let v = concat(cx, past_v, v, 2)?;
    cx.set_output(1, k);
    cx.set_output(2, v);
    let past_len = past_k.map_or(0, |p| cx.shape(p)[2]);
    let skv = cx.shape(k)[2];
    let kr = repeat_heads(cx, k, hq, "k_group")?;
    let vr = repeat_heads(cx, v, hq, "v_group")?;
    let scale = scale.map_or(1.0 / (dh as f64).sqrt(), |s| s as f64);
    // The attention mask as an additive bias over the full key length.
    let mut bias = match mask {
        None => None,
        Some(m) => {
            let neg_inf = scalar(cx, f32::NEG_INFINITY, "minus_inf")?;
            let m = if cx.dtype(m) == DType::Bool {
                let zero = scalar(cx, 0.0, "zero")?;
                tmp(cx, Op::Where, &[m, zero, neg_inf], "mask_bias")?
            } else {
                m
            };
            let ms = cx.shape(m);
            let last = *ms
                .last()
                .ok_or_else(|| cx.err("attn_mask is a scalar".into()))?;
            if last > skv {
                return Err(cx.err(format!("attn_mask covers {last} keys, there are {skv}")));
            }
            Some(if last < skv {
                let mut ps = ms.clone();
                *ps.last_mut().unwrap() = skv - last;
                let fill = tmp(cx, Op::Expand { shape: ps }, &[neg_inf], "mask_fill")?;
                tmp(
                    cx,
                    Op::Concat { axis: ms.len() - 1 },
                    &[m, fill],
                    "mask_padded",
                )?
            } else {
                m
            })
        }
    };
    // Causal, window and padding masks: a constant of [q, kv], or [batch, 1, q, kv] when they
    // depend on each batch's nonpad_kv_seqlen.
    if is_causal || left >= 0 || right >= 0 || nonpad.is_some() {
        let data = match &nonpad {
            Some(n) if n.len() != batch => {
                return Err(cx.err(format!(
                    "nonpad_kv_seqlen has {} entries, batch is {batch}",
                    n.len()
                )))
            }
            Some(n) => n
                .iter()
                .flat_map(|&l| {
                    position_bias(is_causal, left, right, l - sq as i64, (sq, skv), |j| j < l)
                })
                .collect(),
            None => position_bias(is_causal, left, right, past_len as i64, (sq, skv), |_| true),
        };
        let shape = if nonpad.is_some() {
            vec![batch, 1, sq, skv]
        } else {
            vec![sq, skv]
        };
        let name = cx.temp_name("position_bias");
        let c = cx.add_const(&name, Tensor::f32(shape, data))?;
        bias = Some(match bias {
            Some(b) => bin(cx, Binary::Add, b, c, "bias")?,
            None => c,
        });
    }
    let s = attention_probs(cx, q, kr, scale, softcap, bias)?;
    if let Some(name) = cx.node.output.get(3).filter(|o| !o.is_empty()).cloned() {
        let out = match mode {
            0 | 1 => s.qk,
            2 => s.scores,
            _ => s.probs,
        };
        let o = cx.add_named(Op::Identity, &[out], &name)?;
        cx.set_output(3, o);
    }
    let y = tmp(cx, Op::MatMul, &[s.probs, vr], "attended")?;
    if three_d {
        merge_heads(cx, y)
    } else {
        cx.add(Op::Identity, &[y])
    }
}

/// Turns the first `rot` features of each head of `h` (`[B, S, H, D]`): halves (or even/odd
/// pairs when `interleaved`) `(x1, x2)` become `(x1 cos - x2 sin, x1 sin + x2 cos)`, with the
/// caches (`[positions, rot / 2]`) looked up by `pos` (`[B, S]`) when given, else read as
/// `[S, rot / 2]`; the other features pass. Returns `[B, S, H, D]`.
fn rotate(
    cx: &mut Ctx,
    h: NodeId,
    (cos, sin, pos): (NodeId, NodeId, Option<NodeId>),
    interleaved: bool,
    rot: usize,
) -> Result<NodeId> {
    let hs = cx.shape(h);
    let d = hs[3];
    if rot > d || !rot.is_multiple_of(2) {
        return Err(cx.err(format!(
            "rotary_embedding_dim {rot} must be even and at most {d}"
        )));
    }
    let half = rot / 2;
    // Strided windows of the last dim.
    let window = |cx: &mut Ctx, start: usize, end: usize, step: i64, tag: &str| {
        slice_strided(cx, h, 3, (start, end, step), tag)
    };
    let (x1, x2) = if interleaved {
        (window(cx, 0, rot, 2, "x1")?, window(cx, 1, rot, 2, "x2")?)
    } else {
        (
            window(cx, 0, half, 1, "x1")?,
            window(cx, half, rot, 1, "x2")?,
        )
    };
    // A head axis before the cache's last: [positions, 1, half] looked up by `pos`, or
    // [(B,) S, 1, half] as given, so that the product broadcasts over heads (and so that a
    // constant cache looked up by runtime positions is not taken for an embedding, a layer
    // that adapters could target).
    let lookup = |cx: &mut Ctx, cache: NodeId, tag: &str| -> Result<NodeId> {
        let mut s = cx.shape(cache);
        if s.last() != Some(&half) || (pos.is_some() && s.len() != 2) {
            let want = if pos.is_some() {
                "[positions, "
            } else {
                "[..., "
            };
            return Err(cx.err(format!(
                "the {tag} cache has shape {}, expected {want}{half}]",
                shape_str(&s)
            )));
        }
        s.insert(s.len() - 1, 1);
        let c = tmp(
            cx,
            Op::Reshape { shape: s },
            &[cache],
            &format!("{tag}_per_head"),
        )?;
        match pos {
            Some(p) => tmp(cx, Op::Gather { axis: 0 }, &[c, p], tag),
            None => Ok(c),
        }
    };
    let c = lookup(cx, cos, "cos")?;
    let s = lookup(cx, sin, "sin")?;
    let x1c = bin(cx, Binary::Mul, x1, c, "x1_cos")?;
    let x2s = bin(cx, Binary::Mul, x2, s, "x2_sin")?;
    let x1s = bin(cx, Binary::Mul, x1, s, "x1_sin")?;
    let x2c = bin(cx, Binary::Mul, x2, c, "x2_cos")?;
    let real = bin(cx, Binary::Sub, x1c, x2s, "real")?;
    let imag = bin(cx, Binary::Add, x1s, x2c, "imag")?;
    let mut rotated = if interleaved {
        let mut s5 = cx.shape(real);
        s5.push(1);
        let r = tmp(cx, Op::Reshape { shape: s5.clone() }, &[real], "real_pairs")?;
        let i = tmp(cx, Op::Reshape { shape: s5 }, &[imag], "imag_pairs")?;
        let p = tmp(cx, Op::Concat { axis: 4 }, &[r, i], "pairs")?;
        let mut s4 = hs.clone();
        s4[3] = rot;
        tmp(cx, Op::Reshape { shape: s4 }, &[p], "rotated")?
    } else {
        tmp(cx, Op::Concat { axis: 3 }, &[real, imag], "rotated")?
    };
    if rot < d {
        let rest = window(cx, rot, d, 1, "passed")?;
        rotated = tmp(cx, Op::Concat { axis: 3 }, &[rotated, rest], "all")?;
    }
    Ok(rotated)
}

/// RotaryEmbedding (opset 23): the rotated part of each head (its first `rotary_embedding_dim`
/// features, halves or even/odd pairs when `interleaved`) is turned by the cos/sin caches (looked
/// up by `position_ids` when given): `(x1 cos - x2 sin, x1 sin + x2 cos)`; the rest passes.
pub fn rotary_embedding(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let cos = cx.input(1)?;
    let sin = cx.input(2)?;
    let pos = cx.opt_input(3)?;
    let interleaved = cx.attr_bool("interleaved", false)?;
    let n_heads = cx.attr_int("num_heads")?.unwrap_or(0);
    let rot = cx.attr_int("rotary_embedding_dim")?.unwrap_or(0);
    let xs = cx.shape(x);
    // [B, S, H, D]
    let h = match xs.len() {
        4 => swap_1_2(cx, x, "seq_major")?,
        3 => {
            if n_heads <= 0 || !xs[2].is_multiple_of(n_heads as usize) {
                return Err(cx.err(format!(
                    "a 3-D input needs num_heads dividing its hidden size {} (num_heads {n_heads})",
                    xs[2]
                )));
            }
            heads(cx, x, n_heads as usize, "heads")?
        }
        r => return Err(cx.err(format!("the input has rank {r}, expected 3 or 4"))),
    };
    let d = cx.shape(h)[3];
    let rot = if rot <= 0 { d } else { rot as usize };
    let rotated = rotate(cx, h, (cos, sin, pos), interleaved, rot)?;
    match xs.len() {
        4 => cx.add(
            Op::Transpose {
                perm: vec![0, 2, 1, 3],
            },
            &[rotated],
        ),
        _ => cx.add(Op::Reshape { shape: xs }, &[rotated]),
    }
}

/// An int64 constant of `shape` holding `values`.
fn int_const(cx: &mut Ctx, shape: Vec<usize>, values: Vec<i64>, tag: &str) -> Result<NodeId> {
    let name = cx.temp_name(tag);
    cx.add_const(&name, Tensor::i64(shape, values))
}

/// The positions 0, 1, ... as an int64 constant of `shape` (one dim other than 1).
fn positions(cx: &mut Ctx, shape: Vec<usize>, tag: &str) -> Result<NodeId> {
    let n = shape.iter().product::<usize>() as i64;
    int_const(cx, shape, (0..n).collect(), tag)
}

/// `x` (`[B, H, L, D]`) with zero rows after its own up to `rows`.
fn zero_rows_to(cx: &mut Ctx, x: NodeId, rows: usize, tag: &str) -> Result<NodeId> {
    let s = cx.shape(x);
    if s[2] >= rows {
        return Ok(x);
    }
    let shape = vec![s[0], s[1], rows - s[2], s[3]];
    let name = cx.temp_name(&format!("{tag}_zeros"));
    let n = shape.iter().product();
    let z = cx.add_const(&name, Tensor::f32(shape, vec![0.0; n]))?;
    tmp(cx, Op::Concat { axis: 2 }, &[x, z], tag)
}

/// Inputs of GroupQueryAttention past the rotary caches, which dorac does not import.
const GQA_UNSUPPORTED_INPUTS: [&str; 8] = [
    "position_ids",
    "attention_bias",
    "head_sink",
    "k_scale",
    "v_scale",
    "q_norm_weight",
    "k_norm_weight",
    "query_seqlens",
];

/// ONNX Runtime's GroupQueryAttention (com.microsoft), as its CPU kernel computes it. Q, K and
/// V come separate or packed in `query` (`[B, S, (hq + 2 hkv) D]`); `seqlens_k[b] + 1` is the
/// number of tokens sequence `b` holds after this step, `total_sequence_length` (`T`, known
/// at import: exports compute it from the attention mask's shape) their maximum.
///
/// - **First prompt** (`S == T`): every sequence starts at position 0: row `s` rotates at
///   position `s` and attends to keys `j <= s` (with a window, the last `local_window_size`
///   of them, itself included: `j > s - local_window_size`, as ONNX Runtime 1.32 counts), a
///   constant, and to keys of its sequence only (`j <= seqlens_k[b]`, so a padding row sees
///   the whole sequence; with both a window and a softcap, ONNX Runtime's padding rows
///   differ). The present key and value are the new ones, padded with zeros to
///   `max(T, past length)` rows.
/// - **Later steps** (one token, or one sequence of several): sequence `b`'s past holds
///   `p_b = seqlens_k[b] + 1 - S` tokens, known only at run time. The present cache keeps
///   the past's first `p_b` rows and puts the new rows after them (a product with a one-hot
///   `[row, new token]` matrix, so a short sequence of a batch gets its token at its own
///   length), zeros elsewhere; row `s` attends to keys up to `p_b + s`, and rotates at
///   position `p_b + s`.
///
/// Refused: `causal = 0`, smooth softmax and head sinks, window-sized caches
/// (`sliding_window_cache`), quantized caches, the QK output, and the inputs of
/// [`GQA_UNSUPPORTED_INPUTS`].
pub fn group_query_attention(cx: &mut Ctx) -> Result<NodeId> {
    for (i, what) in GQA_UNSUPPORTED_INPUTS.iter().enumerate() {
        if cx.node.input.get(9 + i).is_some_and(|n| !n.is_empty()) {
            return Err(cx.unsupported(format!("GroupQueryAttention with a {what} input")));
        }
    }
    let refuse = |cx: &Ctx, what: &str| Err(cx.unsupported(format!("GroupQueryAttention {what}")));
    if cx.attr_int("causal")?.unwrap_or(1) != 1 {
        return refuse(cx, "with causal = 0");
    }
    if cx.attr_bool("smooth_softmax", false)? {
        return refuse(cx, "with smooth_softmax");
    }
    if cx.attr_int("sliding_window_cache")?.unwrap_or(0) != 0 {
        return refuse(cx, "with a window-sized cache (sliding_window_cache)");
    }
    if cx.attr_int("qk_output")?.unwrap_or(0) != 0 {
        return refuse(cx, "with a QK output (qk_output)");
    }
    for a in ["k_quant_type", "v_quant_type"] {
        if cx.attr_string(a)?.is_some_and(|t| t != "NONE") {
            return refuse(cx, "with a quantized cache");
        }
    }
    if cx.attr_int("kv_cache_bit_width")?.is_some() {
        return refuse(cx, "with a quantized cache");
    }
    // Only read with q_norm_weight, which is refused above.
    for a in ["qk_norm_epsilon", "q_norm_epsilon", "k_norm_epsilon"] {
        let _ = cx.attr_float(a)?;
    }
    let query = cx.input(0)?;
    let key = cx.opt_input(1)?;
    let value = cx.opt_input(2)?;
    let past_k = cx.opt_input(3)?;
    let past_v = cx.opt_input(4)?;
    let seqlens = cx.input(5)?;
    let total = cx
        .const_ints(6, "total_sequence_length input")?
        .ok_or_else(|| cx.err("input 6 (total_sequence_length) is missing".into()))?;
    let cos = cx.opt_input(7)?;
    let sin = cx.opt_input(8)?;
    let positive = |cx: &Ctx, name: &str| -> Result<usize> {
        match cx.attr_int(name)? {
            Some(h) if h > 0 => Ok(h as usize),
            other => Err(cx.err(format!("{name} is {other:?}, expected a positive count"))),
        }
    };
    let hq = positive(cx, "num_heads")?;
    let hkv = positive(cx, "kv_num_heads")?;
    let scale = cx.attr_float("scale")?.filter(|&s| s != 0.0);
    let softcap = cx.attr_float("softcap")?.unwrap_or(0.0);
    let do_rotary = cx.attr_bool("do_rotary", false)?;
    let interleaved = cx.attr_bool("rotary_interleaved", false)?;
    let window = cx.attr_int("local_window_size")?.unwrap_or(-1);
    if !hq.is_multiple_of(hkv) {
        return Err(cx.err(format!(
            "num_heads {hq} is not a multiple of kv_num_heads {hkv}"
        )));
    }
    let qs = cx.shape(query);
    let [batch, sq, width] = qs[..] else {
        return Err(cx.err(format!(
            "query has shape {}, expected [batch, sequence, hidden]",
            shape_str(&qs)
        )));
    };
    let &[t] = &total[..] else {
        return Err(cx.err(format!(
            "total_sequence_length has {} values, expected one",
            total.len()
        )));
    };
    if t < sq as i64 {
        return Err(cx.err(format!(
            "total_sequence_length {t} is less than the sequence length {sq}"
        )));
    }
    let t = t as usize;
    // [B, S, H, D] each.
    let (q, k, v) = match (key, value) {
        (None, None) => {
            let h = hq + 2 * hkv;
            if !width.is_multiple_of(h) {
                return Err(cx.err(format!(
                    "packed QKV width {width} is not a multiple of {h} heads"
                )));
            }
            let d = width / h;
            let part = |cx: &mut Ctx, from: usize, to: usize, tag: &str| -> Result<NodeId> {
                let x = slice_strided(cx, query, 2, (from * d, to * d, 1), tag)?;
                heads(cx, x, to - from, &format!("{tag}_split"))
            };
            (
                part(cx, 0, hq, "q")?,
                part(cx, hq, hq + hkv, "k")?,
                part(cx, hq + hkv, h, "v")?,
            )
        }
        (Some(k), Some(v)) => {
            for x in [k, v] {
                let s = cx.shape(x);
                if s.len() != 3 || s[..2] != [batch, sq] {
                    return Err(cx.err(format!(
                        "key and value have shape {}, expected [{batch}, {sq}, kv hidden]",
                        shape_str(&s)
                    )));
                }
            }
            (
                heads(cx, query, hq, "q")?,
                heads(cx, k, hkv, "k")?,
                heads(cx, v, hkv, "v")?,
            )
        }
        _ => return Err(cx.err("key and value come together, or neither (packed QKV)".into())),
    };
    let d = cx.shape(q)[3];
    if cx.shape(k)[3] != d {
        return Err(cx.err(format!(
            "key and value heads are {} wide, query heads {d}",
            cx.shape(k)[3]
        )));
    }
    let past_len = match (past_k, past_v) {
        (None, None) => 0,
        (Some(pk), Some(pv)) => {
            let want = |p: usize| vec![batch, hkv, p, d];
            let (ks, vs) = (cx.shape(pk), cx.shape(pv));
            // An empty past is not read: its head dims need not be the attention's (a merge
            // imports a cache's symbolic head size at 1).
            let empty = ks.len() == 4 && ks[2] == 0;
            if ks.len() != 4 || (!empty && ks != want(ks[2])) || vs != ks {
                return Err(cx.err(format!(
                    "past key and value have shapes {} and {}, expected [{batch}, {hkv}, past, {d}]",
                    shape_str(&ks),
                    shape_str(&vs)
                )));
            }
            ks[2]
        }
        _ => return Err(cx.err("past_key and past_value come together".into())),
    };
    if cx.shape(seqlens) != [batch] {
        return Err(cx.err(format!(
            "seqlens_k has shape {}, expected [{batch}]",
            shape_str(&cx.shape(seqlens))
        )));
    }
    let first = sq == t;
    if !first && sq > 1 && batch != 1 {
        return Err(cx.err(format!(
            "{sq} new tokens after a past (total_sequence_length {t}) need batch 1, not {batch}"
        )));
    }
    let one = int_const(cx, vec![], vec![1], "one")?;
    let lengths = bin(cx, Binary::Add, seqlens, one, "lengths")?;
    let steps = positions(cx, vec![1, sq], "steps")?;
    let per_batch = |cx: &mut Ctx, x: NodeId, rank: usize, tag: &str| {
        let mut shape = vec![1; rank];
        shape[0] = batch;
        tmp(cx, Op::Reshape { shape }, &[x], tag)
    };
    // The past tokens of each sequence: 0 in a first prompt, else known at run time.
    let past = if first {
        None
    } else {
        let n = int_const(cx, vec![], vec![sq as i64], "new_tokens")?;
        Some(bin(cx, Binary::Sub, lengths, n, "past_lengths")?)
    };
    let (q, k) = if do_rotary {
        let (Some(cos), Some(sin)) = (cos, sin) else {
            return Err(cx.err("do_rotary needs the cos_cache and sin_cache inputs".into()));
        };
        let cs = cx.shape(cos);
        if cs.len() != 2 || cx.shape(sin) != cs {
            return Err(cx.err(format!(
                "the cos and sin caches have shapes {} and {}, expected [positions, rotary dim / 2]",
                shape_str(&cs),
                shape_str(&cx.shape(sin))
            )));
        }
        // Positions run up to total_sequence_length - 1; a cache without their rows would be
        // read past its end (zeros on the GPU), which onnxruntime refuses.
        if t > cs[0] {
            return Err(cx.err(format!(
                "total_sequence_length {t} reaches position {}, but the cos and sin caches have {} rows (the model's longest sequence)",
                t - 1,
                cs[0]
            )));
        }
        // [1, S] in a first prompt, [B, S] after a past.
        let pos = match past {
            None => steps,
            Some(p) => {
                let p = per_batch(cx, p, 2, "past_per_batch")?;
                bin(cx, Binary::Add, p, steps, "positions")?
            }
        };
        let caches = (cos, sin, Some(pos));
        (
            rotate(cx, q, caches, interleaved, 2 * cs[1])?,
            rotate(cx, k, caches, interleaved, 2 * cs[1])?,
        )
    } else {
        (q, k)
    };
    // [B, H, S, D]
    let q = swap_1_2(cx, q, "q_heads")?;
    let k = swap_1_2(cx, k, "k_heads")?;
    let v = swap_1_2(cx, v, "v_heads")?;
    let rows = t.max(past_len);
    let (keys, values, bias) = match past {
        None => {
            // The new rows, then zeros up to the present's length.
            let pk = zero_rows_to(cx, k, rows, "present_key")?;
            let pv = zero_rows_to(cx, v, rows, "present_value")?;
            present(cx, pk, pv)?;
            let left = if window > 0 { window - 1 } else { -1 };
            let data = position_bias(true, left, -1, 0, (sq, sq), |_| true);
            let name = cx.temp_name("position_bias");
            let causal = cx.add_const(&name, Tensor::f32(vec![sq, sq], data))?;
            // Keys past a sequence's length are padding.
            let len = per_batch(cx, lengths, 4, "lengths_per_key")?;
            let key = positions(cx, vec![1, 1, 1, sq], "key_positions")?;
            let padding = bin(cx, Binary::Less, key, len, "real_keys")?;
            let (zero, neg_inf) = (
                scalar(cx, 0.0, "zero_f")?,
                scalar(cx, f32::NEG_INFINITY, "minus_inf")?,
            );
            let pad = tmp(cx, Op::Where, &[padding, zero, neg_inf], "padding_bias")?;
            let bias = bin(cx, Binary::Add, causal, pad, "bias")?;
            (k, v, bias)
        }
        Some(p) => {
            // Row j of the present: the past's row j when j < p_b, new token j - p_b when
            // that is one, else 0.
            let p = per_batch(cx, p, 4, "past_per_row")?;
            let row = positions(cx, vec![1, 1, rows, 1], "rows")?;
            let kept = bin(cx, Binary::Less, row, p, "kept_rows")?;
            let offset = bin(cx, Binary::Sub, row, p, "new_row")?;
            let step = positions(cx, vec![1, 1, 1, sq], "new_tokens")?;
            let hit = bin(cx, Binary::Equal, offset, step, "placed")?;
            let (one_f, zero_f) = (scalar(cx, 1.0, "one_f")?, scalar(cx, 0.0, "zero_f")?);
            let place = tmp(cx, Op::Where, &[hit, one_f, zero_f], "placement")?;
            let fill = |cx: &mut Ctx, past: NodeId, new: NodeId, tag: &str| -> Result<NodeId> {
                let past = zero_rows_to(cx, past, rows, &format!("{tag}_padded"))?;
                let old = tmp(cx, Op::Where, &[kept, past, zero_f], &format!("{tag}_kept"))?;
                let placed = tmp(cx, Op::MatMul, &[place, new], &format!("{tag}_placed"))?;
                bin(cx, Binary::Add, old, placed, tag)
            };
            let pk = fill(cx, past_k.unwrap(), k, "present_key")?;
            let pv = fill(cx, past_v.unwrap(), v, "present_value")?;
            present(cx, pk, pv)?;
            // Row s (at position p_b + s) sees keys j <= p_b + s, and with a window j >
            // p_b + s - window.
            let at = per_batch(cx, past.unwrap(), 4, "past_per_query")?;
            let srow = positions(cx, vec![1, 1, sq, 1], "query_rows")?;
            let at = bin(cx, Binary::Add, at, srow, "query_positions")?;
            let key = positions(cx, vec![1, 1, 1, rows], "key_positions")?;
            let ahead = bin(cx, Binary::Less, at, key, "ahead")?;
            let neg_inf = scalar(cx, f32::NEG_INFINITY, "minus_inf")?;
            let mut bias = tmp(cx, Op::Where, &[ahead, neg_inf, zero_f], "causal_bias")?;
            if window > 0 {
                let w = int_const(cx, vec![], vec![window - 1], "window")?;
                let from = bin(cx, Binary::Sub, at, w, "window_start")?;
                let before = bin(cx, Binary::Less, key, from, "behind")?;
                bias = tmp(cx, Op::Where, &[before, neg_inf, bias], "window_bias")?;
            }
            (pk, pv, bias)
        }
    };
    let kr = repeat_heads(cx, keys, hq, "k_group")?;
    let vr = repeat_heads(cx, values, hq, "v_group")?;
    let scale = scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let s = attention_probs(cx, q, kr, scale, softcap, Some(bias))?;
    let y = tmp(cx, Op::MatMul, &[s.probs, vr], "attended")?;
    merge_heads(cx, y)
}

/// Registers the present key and value as outputs 1 and 2, under their ONNX names.
fn present(cx: &mut Ctx, key: NodeId, value: NodeId) -> Result<()> {
    for (i, x) in [(1, key), (2, value)] {
        if let Some(name) = cx.node.output.get(i).filter(|o| !o.is_empty()).cloned() {
            let o = cx.add_named(Op::Identity, &[x], &name)?;
            cx.set_output(i, o);
        }
    }
    Ok(())
}

/// ONNX Runtime's Attention (com.microsoft), as its transformer optimizer fuses BERT and GPT-2:
/// `input @ weights + bias` split into Q, K and V (`qkv_hidden_sizes`, or thirds), heads,
/// the past (`[2, B, heads, past, D]`) before the new keys and values (output 1, the present,
/// stacked the same way), `q kᵀ · scale`, plus `attention_bias`, plus `mask_filter_value`
/// (-10000 by default: added, not -inf, as ONNX Runtime does, so a row whose keys are all
/// padding still weighs them) for each key the mask index hides (a length per sequence `[B]`,
/// padding on the right; end and start positions `[2B]`; a 0/1 mask `[B, T]` or `[B, S, T]`);
/// with `unidirectional`, the keys after the query's position are left out entirely. Refused: rotary embedding, a shared past/present buffer, 4-D masks
/// and the `[3B + 2]` index.
pub fn contrib_attention(cx: &mut Ctx) -> Result<NodeId> {
    if cx.attr_int("do_rotary")?.unwrap_or(0) != 0 {
        return Err(cx.unsupported("Attention (com.microsoft) with do_rotary".into()));
    }
    if cx.attr_int("past_present_share_buffer")?.unwrap_or(0) != 0 {
        return Err(
            cx.unsupported("Attention (com.microsoft) with past_present_share_buffer".into())
        );
    }
    let input = cx.input(0)?;
    let weights = cx.input(1)?;
    let bias = cx.opt_input(2)?;
    let mask = cx.opt_input(3)?;
    let past = cx.opt_input(4)?;
    let extra_bias = cx.opt_input(5)?;
    if cx.node.input.get(6).is_some_and(|n| !n.is_empty()) {
        return Err(
            cx.unsupported("Attention (com.microsoft) with a past_sequence_length input".into())
        );
    }
    let n_heads = match cx.attr_int("num_heads")? {
        Some(h) if h > 0 => h as usize,
        other => return Err(cx.err(format!("num_heads is {other:?}, expected a positive count"))),
    };
    let causal = cx.attr_int("unidirectional")?.unwrap_or(0) != 0;
    let filter = cx.attr_float("mask_filter_value")?.unwrap_or(-10000.0);
    let scale = cx.attr_float("scale")?.filter(|&s| s != 0.0);
    let is = cx.shape(input);
    let ws = cx.shape(weights);
    let ([batch, sq, _], [_, width]) = (&is[..], &ws[..]) else {
        return Err(cx.err(format!(
            "input {} and weights {}: expected [batch, sequence, hidden] and [hidden, 3 hidden]",
            shape_str(&is),
            shape_str(&ws)
        )));
    };
    let (batch, sq, width) = (*batch, *sq, *width);
    let sizes: Vec<usize> = match cx.attr_ints("qkv_hidden_sizes")? {
        Some(v) => v.iter().map(|&x| x.max(0) as usize).collect(),
        None => vec![width / 3; 3],
    };
    if sizes.len() != 3 || sizes.iter().sum::<usize>() != width || sizes[0] != sizes[1] {
        return Err(cx.err(format!(
            "Q, K and V widths {sizes:?} do not split the weights' {width} columns (Q and K alike)"
        )));
    }
    let mut qkv = tmp(cx, Op::MatMul, &[input, weights], "qkv")?;
    if let Some(b) = bias {
        qkv = bin(cx, Binary::Add, qkv, b, "qkv_biased")?;
    }
    let mut from = 0;
    let mut parts = vec![];
    for (size, tag) in sizes.iter().zip(["q", "k", "v"]) {
        let x = slice_strided(cx, qkv, 2, (from, from + size, 1), tag)?;
        from += size;
        let x = heads(cx, x, n_heads, &format!("{tag}_split"))?;
        parts.push(swap_1_2(cx, x, &format!("{tag}_heads"))?);
    }
    let (q, mut k, mut v) = (parts[0], parts[1], parts[2]);
    let d = cx.shape(q)[3];
    let past_len = match past {
        None => 0,
        Some(p) => {
            let ps = cx.shape(p);
            if ps.len() != 5 || ps[0] != 2 || ps[1] != batch || ps[2] != n_heads || ps[4] != d {
                return Err(cx.err(format!(
                    "past has shape {}, expected [2, {batch}, {n_heads}, past, {d}]",
                    shape_str(&ps)
                )));
            }
            let half = |cx: &mut Ctx, i: usize, tag: &str| -> Result<NodeId> {
                let s = slice_strided(cx, p, 0, (i, i + 1, 1), tag)?;
                let shape = vec![batch, n_heads, ps[3], d];
                tmp(cx, Op::Reshape { shape }, &[s], &format!("{tag}_4d"))
            };
            let (pk, pv) = (half(cx, 0, "past_key")?, half(cx, 1, "past_value")?);
            k = tmp(cx, Op::Concat { axis: 2 }, &[pk, k], "keys")?;
            v = tmp(cx, Op::Concat { axis: 2 }, &[pv, v], "values")?;
            ps[3]
        }
    };
    let total = past_len + sq;
    if let Some(name) = cx.node.output.get(1).filter(|o| !o.is_empty()).cloned() {
        let shape = vec![1, batch, n_heads, total, d];
        let k5 = tmp(
            cx,
            Op::Reshape {
                shape: shape.clone(),
            },
            &[k],
            "present_key",
        )?;
        let v5 = tmp(cx, Op::Reshape { shape }, &[v], "present_value")?;
        let present = cx.add_named(Op::Concat { axis: 0 }, &[k5, v5], &name)?;
        cx.set_output(1, present);
    }
    let (zero, fill) = (scalar(cx, 0.0, "zero")?, scalar(cx, filter, "mask_filter")?);
    let key = positions(cx, vec![1, total], "key_positions")?;
    let per_batch = |cx: &mut Ctx, x: NodeId, tag: &str| {
        tmp(
            cx,
            Op::Reshape {
                shape: vec![batch, 1],
            },
            &[x],
            tag,
        )
    };
    let mut biases: Vec<NodeId> = vec![];
    if let Some(m) = mask {
        let ms = cx.shape(m);
        // Which keys the mask index hides, [B, T] (or [B, S, T] for a 3-D mask).
        let zero_i = |cx: &mut Ctx| int_const(cx, vec![], vec![0], "zero_i");
        let (hidden, rows) = match ms[..] {
            [n] if n == batch => {
                let len = per_batch(cx, m, "lengths")?;
                (bin(cx, Binary::LessOrEqual, len, key, "past_end")?, 1)
            }
            [n] if n == 2 * batch => {
                let end = slice_strided(cx, m, 0, (0, batch, 1), "ends")?;
                let start = slice_strided(cx, m, 0, (batch, 2 * batch, 1), "starts")?;
                let end = per_batch(cx, end, "ends_per_batch")?;
                let start = per_batch(cx, start, "starts_per_batch")?;
                let after = bin(cx, Binary::LessOrEqual, end, key, "after_end")?;
                let before = bin(cx, Binary::Less, key, start, "before_start")?;
                (bin(cx, Binary::Or, after, before, "outside")?, 1)
            }
            [b, t] if b == batch && t == total => {
                let z = zero_i(cx)?;
                (bin(cx, Binary::Equal, m, z, "off")?, 1)
            }
            [b, s, t] if b == batch && s == sq && t == total => {
                let z = zero_i(cx)?;
                (bin(cx, Binary::Equal, m, z, "off")?, sq)
            }
            _ => {
                return Err(cx.unsupported(format!(
                    "Attention (com.microsoft) with a mask_index of shape {}",
                    shape_str(&ms)
                )))
            }
        };
        let shape = vec![batch, 1, rows, total];
        let hidden = tmp(cx, Op::Reshape { shape }, &[hidden], "hidden")?;
        biases.push(tmp(cx, Op::Where, &[hidden, fill, zero], "mask_bias")?);
    }
    if causal {
        let data = position_bias(true, -1, -1, past_len as i64, (sq, total), |_| true);
        let name = cx.temp_name("causal_bias");
        biases.push(cx.add_const(&name, Tensor::f32(vec![sq, total], data))?);
    }
    biases.extend(extra_bias);
    let mut bias = None;
    for b in biases {
        bias = Some(match bias {
            Some(a) => bin(cx, Binary::Add, a, b, "bias")?,
            None => b,
        });
    }
    let scale = scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let s = attention_probs(cx, q, k, scale, 0.0, bias)?;
    let y = tmp(cx, Op::MatMul, &[s.probs, v], "attended")?;
    merge_heads(cx, y)
}
