//! One gradient rule per op: given a node and the cotangent `dy` of its output, the cotangents
//! of its inputs (`None` where an input needs none). Every rule builds plain IR ops, so the
//! backward pass compiles to the same kernels as the forward pass.

use super::Builder;
use crate::error::{Error, Result, Subject};
use crate::ir::op::matmul_dims;
use crate::ir::{unary, Binary, NodeId, Op, PatchRef, Reduce};
use crate::tensor::{numel, DType};

type Grads = Vec<Option<PatchRef>>;

/// The cotangents of `n`'s inputs; `wanted[i]` says whether input i needs one.
pub(super) fn input_grads(
    b: &mut Builder,
    n: NodeId,
    dy: PatchRef,
    wanted: &[bool],
) -> Result<Grads> {
    let op = b.graph().node(n).op.clone();
    let ins: Vec<PatchRef> = b
        .graph()
        .inputs_of(n)
        .into_iter()
        .map(PatchRef::from)
        .collect();
    let n = PatchRef::from(n);
    let shape = |b: &Builder, i: usize| b.shape(ins[i]).to_vec();
    Ok(match op {
        Op::Input | Op::Const(_) | Op::StopGradient => vec![],
        Op::Identity => vec![Some(dy)],
        Op::Reshape { .. } => vec![Some(b.reshape(dy, &shape(b, 0), n, "reshape")?)],
        Op::Transpose { perm } => {
            let mut inverse = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p] = i;
            }
            vec![Some(b.add(
                Op::Transpose { perm: inverse },
                &[dy],
                n,
                "transpose",
            )?)]
        }
        Op::Expand { .. } => vec![Some(b.sum_to(dy, &shape(b, 0), n, "expand")?)],
        Op::Unary(u) if u.is_predicate() => vec![None],
        Op::Unary(u) => {
            // Relu's gradient reads its output, which the next layer keeps anyway.
            let operand = if u.def().grad_reads_output { n } else { ins[0] };
            vec![Some(b.add(Op::UnaryGrad(u), &[operand, dy], n, "unary")?)]
        }
        Op::Binary(op) => binary(b, n, op, &ins, dy, wanted)?,
        Op::MatMul => matmul(b, n, &ins, dy, wanted)?,
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => gemm(b, n, &ins, dy, wanted, alpha, beta, trans_a, trans_b)?,
        Op::Reduce { kind, axes, .. } => {
            let xs = shape(b, 0);
            let kept: Vec<usize> = xs
                .iter()
                .enumerate()
                .map(|(d, &s)| if axes.contains(&d) { 1 } else { s })
                .collect();
            let dy = b.reshape(dy, &kept, n, "keepdims")?;
            let spread = b.add(Op::Expand { shape: xs.clone() }, &[dy], n, "spread")?;
            let args = crate::ops::reduce::GradArgs {
                n,
                x: ins[0],
                spread,
                axes: &axes,
                keepdims_shape: &kept,
            };
            vec![Some((kind.def().grad)(b, &args)?)]
        }
        Op::Softmax { axis } => {
            // dx = y * (dy - sum(dy * y, axis))
            let dyy = b.binary(Binary::Mul, dy, n, n, "dy_y")?;
            let sum = b.add(
                Op::Reduce {
                    kind: Reduce::Sum,
                    axes: vec![axis],
                    keepdims: true,
                },
                &[dyy],
                n,
                "dy_y_sum",
            )?;
            let centered = b.binary(Binary::Sub, dy, sum, n, "centered")?;
            vec![Some(b.binary(Binary::Mul, n, centered, n, "softmax")?)]
        }
        Op::LayerNorm { axis, epsilon } => layer_norm(b, n, &ins, dy, wanted, axis, epsilon)?,
        Op::DoraNormSq(p) => p.grad(b, n, &ins, dy, wanted)?,
        Op::SoftmaxCrossEntropy {
            ignore_index,
            shift,
        } => {
            let op = Op::SoftmaxCrossEntropyGrad {
                ignore_index,
                shift,
            };
            vec![
                Some(b.add(op, &[ins[0], ins[1], dy], n, "cross_entropy")?),
                None,
            ]
        }
        op @ (Op::UnaryGrad(_) | Op::SoftmaxCrossEntropyGrad { .. }) => {
            return Err(Error::graph_at(
                Subject::named("node", b.label(n)),
                format!("no second derivative for {}", op.name()),
            ))
        }
        // Casts between floats pass the cotangent through; to integers or bools nothing flows.
        Op::Cast { to } => {
            if to == DType::F32 {
                vec![Some(dy)]
            } else {
                vec![None]
            }
        }
        Op::Where => {
            // dx = where(c, dy, 0), dy = where(c, 0, dy); the condition gets nothing.
            let zero = b.scalar(0.0, n, "zero");
            let (cond, x, y) = (ins[0], ins[1], ins[2]);
            let mut out = vec![None, None, None];
            if wanted[1] {
                let g = b.add(Op::Where, &[cond, dy, zero], n, "where_x")?;
                out[1] = Some(b.sum_to(g, &shape(b, 1), n, "dx")?);
            }
            if wanted[2] {
                let g = b.add(Op::Where, &[cond, zero, dy], n, "where_y")?;
                out[2] = Some(b.sum_to(g, &shape(b, 2), n, "dy")?);
            }
            let _ = (x, y);
            out
        }
        Op::Slice { starts, steps, .. } => {
            vec![Some(slice_grad(b, n, dy, &shape(b, 0), &starts, &steps)?)]
        }
        Op::Concat { axis } => {
            // Each input's cotangent is its window of dy along the axis.
            let mut offset = 0i64;
            let mut out = vec![];
            for (i, &input) in ins.iter().enumerate() {
                let s = b.shape(input).to_vec();
                let len = s[axis] as i64;
                if wanted[i] {
                    let dims = b.shape(dy).to_vec();
                    let mut starts = vec![0i64; dims.len()];
                    let mut ends: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
                    starts[axis] = offset;
                    ends[axis] = offset + len;
                    let op = Op::Slice {
                        starts,
                        ends,
                        steps: vec![1; dims.len()],
                    };
                    out.push(Some(b.add(op, &[dy], n, &format!("concat_part{i}"))?));
                } else {
                    out.push(None);
                }
                offset += len;
            }
            out
        }
        Op::Trilu { upper, k } => vec![Some(b.add(Op::Trilu { upper, k }, &[dy], n, "trilu")?)],
        // With constant indices (Conv's input windows, a fixed selection) the data's cotangent
        // is a gather of dy through the inverted index table. Index inputs take no gradient.
        Op::Gather { axis } if wanted[0] && matches!(b.op(ins[1]), Op::Const(_)) => {
            vec![Some(gather_grad(b, n, &ins, dy, axis)?), None]
        }
        // Runtime ids into rows (an embedding, or DoRA's A^T on one): a one-hot product.
        Op::Gather { axis: 0 } if wanted[0] => {
            vec![Some(gather_rows_grad(b, n, &ins, dy)?), None]
        }
        // Runtime ids along another axis, and the other gathers, would need a scatter-add.
        op @ (Op::Gather { .. } | Op::GatherElements { .. } | Op::GatherND { .. }) => {
            if wanted[0] {
                return Err(Error::graph_at(
                    Subject::named("node", b.label(n)),
                    format!(
                        "the gradient of {}'s data (a trainable embedding) is not supported",
                        op.name()
                    ),
                ));
            }
            vec![None, None]
        }
    })
}

/// The cotangent of Gather's data when its indices are a constant: each data row `j` along
/// `axis` receives the sum of the cotangent rows of every index position holding `j`. The
/// positions are inverted at compile time into a `[dim, m]` table (m: the most positions any row
/// is read by; unused slots hold an out-of-range id, which Gather reads as 0), so the backward
/// pass is a Gather of dy followed by a sum over the m slots: no scatter, no atomics.
fn gather_grad(
    b: &mut Builder,
    n: PatchRef,
    ins: &[PatchRef],
    dy: PatchRef,
    axis: usize,
) -> Result<PatchRef> {
    let data_shape = b.shape(ins[0]).to_vec();
    let Op::Const(t) = b.op(ins[1]) else {
        unreachable!("the caller checked that the indices are constant")
    };
    let ids = t.to_f64();
    let dim = data_shape[axis];
    let mut readers: Vec<Vec<i64>> = vec![vec![]; dim];
    for (p, &id) in ids.iter().enumerate() {
        let id = id.round() as i64;
        let j = if id < 0 { id + dim as i64 } else { id };
        if (0..dim as i64).contains(&j) {
            readers[j as usize].push(p as i64);
        }
    }
    let m = readers.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let unused = ids.len() as i64;
    let table: Vec<i64> = readers
        .iter()
        .flat_map(|r| r.iter().copied().chain(std::iter::repeat(unused)).take(m))
        .collect();
    let table = b.constant(
        n,
        "windows",
        crate::tensor::Tensor::i64(vec![dim, m], table),
    );
    let mut flat = data_shape.clone();
    flat[axis] = ids.len();
    let dy = b.reshape(dy, &flat, n, "positions")?;
    let rows = b.add(Op::Gather { axis }, &[dy, table], n, "gather")?;
    if m == 1 {
        return b.reshape(rows, &data_shape, n, "rows");
    }
    b.add(
        Op::Reduce {
            kind: Reduce::Sum,
            axes: vec![axis + 1],
            keepdims: false,
        },
        &[rows],
        n,
        "sum",
    )
}

/// The cotangent of Gather's data along axis 0 when the ids are runtime values (token ids):
/// `onehot(ids)ᵀ @ dy`, with the ids flattened to P positions and the data's trailing dims to F,
/// so the scatter-add is one `[V, P] x [P, F]` product (no atomics). The one-hot matrix is
/// `[P, V]`: fine for a batch of tokens against a vocabulary, not for millions of positions.
fn gather_rows_grad(
    b: &mut Builder,
    n: PatchRef,
    ins: &[PatchRef],
    dy: PatchRef,
) -> Result<PatchRef> {
    let data_shape = b.shape(ins[0]).to_vec();
    let v = data_shape[0];
    let f: usize = data_shape[1..].iter().product();
    let p = numel(b.shape(ins[1]));
    let ids_type = b.dtype(ins[1]);
    let konst = |b: &mut Builder, tag: &str, t: crate::tensor::Tensor| b.constant(n, tag, t);
    let int = |x: i64| match ids_type {
        DType::F32 => crate::tensor::Tensor::scalar(x as f32),
        _ => crate::tensor::Tensor::i64(vec![], vec![x]),
    };
    let ids = b.reshape(ins[1], &[p, 1], n, "ids")?;
    // Negative ids count from the end.
    let zero = konst(b, "zero", int(0));
    let dim = konst(b, "dim", int(v as i64));
    let negative = b.add(Op::Binary(Binary::Less), &[ids, zero], n, "negative")?;
    let wrapped = b.add(Op::Binary(Binary::Add), &[ids, dim], n, "wrapped")?;
    let ids = b.add(Op::Where, &[negative, wrapped, ids], n, "ids_wrapped")?;
    let rows: Vec<i64> = (0..v as i64).collect();
    let rows = match ids_type {
        DType::F32 => {
            crate::tensor::Tensor::f32(vec![1, v], rows.iter().map(|&r| r as f32).collect())
        }
        _ => crate::tensor::Tensor::i64(vec![1, v], rows),
    };
    let rows = konst(b, "rows", rows);
    let hit = b.add(Op::Binary(Binary::Equal), &[ids, rows], n, "one_hot")?;
    let hot = b.add(Op::Cast { to: DType::F32 }, &[hit], n, "one_hot_f32")?;
    let hot_t = b.add(Op::Transpose { perm: vec![1, 0] }, &[hot], n, "one_hot_t")?;
    let dy = b.reshape(dy, &[p, f], n, "dy_rows")?;
    let d = b.add(Op::MatMul, &[hot_t, dy], n, "scatter")?;
    b.reshape(d, &data_shape, n, "data")
}

/// The cotangent of a slice's input: dy placed back at its window, zeros elsewhere. Along each
/// sliced axis, a window of step `s` is first turned ascending (reversed where `s` < 0), then
/// spread to step 1 by interleaving `|s| - 1` zeros after each element (a reshape, a
/// concatenation and a reshape), then padded with zero blocks to the input's extent.
fn slice_grad(
    b: &mut Builder,
    n: PatchRef,
    dy: PatchRef,
    in_shape: &[usize],
    starts: &[i64],
    steps: &[i64],
) -> Result<PatchRef> {
    let mut g = dy;
    for d in 0..in_shape.len() {
        let len = b.shape(g)[d];
        let (step, full) = (steps[d], in_shape[d]);
        if step == 1 && len == full {
            continue;
        }
        if len == 0 {
            // An empty window: the cotangent is zeros of the input's extent along `d`.
            let mut zs = b.shape(g).to_vec();
            zs[d] = full;
            let zero = b.scalar(0.0, n, &format!("empty{d}_zero"));
            g = b.add(Op::Expand { shape: zs }, &[zero], n, &format!("empty{d}"))?;
            continue;
        }
        // The window's lowest input index, and its elements in ascending order.
        let mut low = starts[d];
        if step < 0 {
            low += (len as i64 - 1) * step;
            g = reverse(b, g, d, n)?;
        }
        let low = low.max(0) as usize;
        let stride = step.unsigned_abs() as usize;
        let mut extent = len;
        if stride > 1 && len > 1 {
            g = spread(b, g, d, stride, n)?;
            // The zeros after the last element may run past the input's end.
            extent = (len * stride).min(full - low);
            g = keep_first(b, g, d, extent, n)?;
        }
        g = pad_with_zeros(b, g, d, low, full - low - extent, n)?;
    }
    Ok(g)
}

/// `x` reversed along axis `d`.
fn reverse(b: &mut Builder, x: PatchRef, d: usize, n: PatchRef) -> Result<PatchRef> {
    let shape = b.shape(x).to_vec();
    let mut starts = vec![0; shape.len()];
    let mut ends: Vec<i64> = shape.iter().map(|&e| e as i64).collect();
    let mut steps = vec![1; shape.len()];
    (starts[d], ends[d], steps[d]) = (shape[d] as i64 - 1, -1, -1);
    let op = Op::Slice {
        starts,
        ends,
        steps,
    };
    b.add(op, &[x], n, &format!("reverse{d}"))
}

/// `x` with `stride - 1` zeros after each element along axis `d`: element `j` moves to
/// `j * stride`.
fn spread(b: &mut Builder, x: PatchRef, d: usize, stride: usize, n: PatchRef) -> Result<PatchRef> {
    let shape = b.shape(x).to_vec();
    let mut split = shape.clone();
    split.insert(d + 1, 1);
    let column = b.reshape(x, &split, n, &format!("spread{d}_column"))?;
    split[d + 1] = stride - 1;
    let zero = b.scalar(0.0, n, &format!("spread{d}_zero"));
    let zeros = b.add(
        Op::Expand { shape: split },
        &[zero],
        n,
        &format!("spread{d}_zeros"),
    )?;
    let rows = b.add(
        Op::Concat { axis: d + 1 },
        &[column, zeros],
        n,
        &format!("spread{d}_rows"),
    )?;
    let mut spread = shape;
    spread[d] *= stride;
    b.reshape(rows, &spread, n, &format!("spread{d}"))
}

/// The first `keep` elements of `x` along axis `d`.
fn keep_first(
    b: &mut Builder,
    x: PatchRef,
    d: usize,
    keep: usize,
    n: PatchRef,
) -> Result<PatchRef> {
    let shape = b.shape(x).to_vec();
    if shape[d] == keep {
        return Ok(x);
    }
    let mut ends: Vec<i64> = shape.iter().map(|&e| e as i64).collect();
    ends[d] = keep as i64;
    let op = Op::Slice {
        starts: vec![0; shape.len()],
        ends,
        steps: vec![1; shape.len()],
    };
    b.add(op, &[x], n, &format!("trim{d}"))
}

/// `x` with `before` zeros ahead of it and `after` behind it along axis `d`.
fn pad_with_zeros(
    b: &mut Builder,
    x: PatchRef,
    d: usize,
    before: usize,
    after: usize,
    n: PatchRef,
) -> Result<PatchRef> {
    let mut inputs = vec![];
    for (len, tag) in [(before, "pad_before"), (after, "pad_after")] {
        if len > 0 {
            let mut zs = b.shape(x).to_vec();
            zs[d] = len;
            let z = b.scalar(0.0, n, &format!("{tag}{d}_zero"));
            inputs.push(b.add(Op::Expand { shape: zs }, &[z], n, &format!("{tag}{d}"))?);
        }
    }
    if inputs.is_empty() {
        return Ok(x);
    }
    inputs.insert(usize::from(before > 0), x);
    b.add(Op::Concat { axis: d }, &inputs, n, &format!("unslice{d}"))
}

fn binary(
    b: &mut Builder,
    n: PatchRef,
    op: Binary,
    ins: &[PatchRef],
    dy: PatchRef,
    wanted: &[bool],
) -> Result<Grads> {
    let (x, y) = (ins[0], ins[1]);
    let args = crate::ops::binary::GradArgs {
        n,
        x,
        y,
        dy,
        wanted: [wanted[0], wanted[1]],
    };
    let at_output = (op.def().grad)(b, &args)?;
    // Each cotangent back to its operand's shape (numpy broadcasting).
    let mut out = vec![None, None];
    for (i, operand) in [x, y].into_iter().enumerate() {
        if let (Some(g), true) = (at_output[i], wanted[i]) {
            let shape = b.shape(operand).to_vec();
            out[i] = Some(b.sum_to(g, &shape, n, if i == 0 { "dx" } else { "dy" })?);
        }
    }
    Ok(out)
}

fn swap_last_two(rank: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..rank).collect();
    p.swap(rank - 2, rank - 1);
    p
}

/// numpy matmul: operands are promoted to rank >= 2, products taken with broadcast batch dims,
/// then summed back to each operand's shape.
fn matmul(
    b: &mut Builder,
    n: PatchRef,
    ins: &[PatchRef],
    dy: PatchRef,
    wanted: &[bool],
) -> Result<Grads> {
    let (a, w) = (ins[0], ins[1]);
    let (as_, ws) = (b.shape(a).to_vec(), b.shape(w).to_vec());
    let d = matmul_dims(&as_, &ws).map_err(Error::shape)?;
    let a2: Vec<usize> = if as_.len() == 1 {
        vec![1, d.k]
    } else {
        as_.clone()
    };
    let w2: Vec<usize> = if ws.len() == 1 {
        vec![d.k, 1]
    } else {
        ws.clone()
    };
    let mut dy2 = d.batch.clone();
    dy2.extend([d.m, d.n]);
    let a_full = b.reshape(a, &a2, n, "a2")?;
    let w_full = b.reshape(w, &w2, n, "b2")?;
    let dyf = b.reshape(dy, &dy2, n, "dy2")?;
    let mut out = vec![None, None];
    if wanted[0] {
        let wt = b.add(
            Op::Transpose {
                perm: swap_last_two(w2.len()),
            },
            &[w_full],
            n,
            "b_t",
        )?;
        let da = b.add(Op::MatMul, &[dyf, wt], n, "da")?;
        let da = b.sum_to(da, &a2, n, "da")?;
        out[0] = Some(b.reshape(da, &as_, n, "da_shape")?);
    }
    if wanted[1] {
        let at = b.add(
            Op::Transpose {
                perm: swap_last_two(a2.len()),
            },
            &[a_full],
            n,
            "a_t",
        )?;
        let dw = b.add(Op::MatMul, &[at, dyf], n, "db")?;
        let dw = b.sum_to(dw, &w2, n, "db")?;
        out[1] = Some(b.reshape(dw, &ws, n, "db_shape")?);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn gemm(
    b: &mut Builder,
    n: PatchRef,
    ins: &[PatchRef],
    dy: PatchRef,
    wanted: &[bool],
    alpha: f32,
    beta: f32,
    ta: bool,
    tb: bool,
) -> Result<Grads> {
    let (a, w) = (ins[0], ins[1]);
    let gemm = |alpha: f32, trans_a: bool, trans_b: bool| Op::Gemm {
        alpha,
        beta: 0.0,
        trans_a,
        trans_b,
    };
    let mut out = vec![None; ins.len()];
    if wanted[0] {
        // d op(A) = alpha dY op(B)^T; transpose back when A was transposed.
        out[0] = Some(if ta {
            b.add(gemm(alpha, tb, true), &[w, dy], n, "da")?
        } else {
            b.add(gemm(alpha, false, !tb), &[dy, w], n, "da")?
        });
    }
    if wanted[1] {
        out[1] = Some(if tb {
            b.add(gemm(alpha, true, ta), &[dy, a], n, "db")?
        } else {
            b.add(gemm(alpha, !ta, false), &[a, dy], n, "db")?
        });
    }
    if let (Some(&c), Some(true)) = (ins.get(2), wanted.get(2)) {
        let cs = b.shape(c).to_vec();
        let mut g = dy;
        if beta != 1.0 {
            let s = b.scalar(beta as f64, n, "beta");
            g = b.binary(Binary::Mul, g, s, n, "dc_scaled")?;
        }
        out[2] = Some(b.sum_to(g, &cs, n, "dc")?);
    }
    Ok(out)
}

/// LayerNorm's backward, recomputing the statistics from x (cheap next to storing them):
/// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * scale.
fn layer_norm(
    b: &mut Builder,
    n: PatchRef,
    ins: &[PatchRef],
    dy: PatchRef,
    wanted: &[bool],
    axis: usize,
    eps: f32,
) -> Result<Grads> {
    let x = ins[0];
    let xs = b.shape(x).to_vec();
    let axes: Vec<usize> = (axis..xs.len()).collect();
    let count = numel(&xs[axis..]) as f64;
    let mean_of = |b: &mut Builder, v: PatchRef, tag: &str| -> Result<PatchRef> {
        let s = b.add(
            Op::Reduce {
                kind: Reduce::Sum,
                axes: axes.clone(),
                keepdims: true,
            },
            &[v],
            n,
            &format!("{tag}_sum"),
        )?;
        let inv = b.scalar(1.0 / count, n, &format!("{tag}_inv_count"));
        b.binary(Binary::Mul, s, inv, n, &format!("{tag}_mean"))
    };
    let mean = mean_of(b, x, "x")?;
    let xc = b.binary(Binary::Sub, x, mean, n, "xc")?;
    let sq = b.binary(Binary::Mul, xc, xc, n, "xc_sq")?;
    let var = mean_of(b, sq, "var")?;
    let e = b.scalar(eps as f64, n, "eps");
    let ve = b.binary(Binary::Add, var, e, n, "var_eps")?;
    let sd = b.add(Op::Unary(unary::SQRT), &[ve], n, "std")?;
    let rstd = b.add(Op::Unary(unary::RECIPROCAL), &[sd], n, "rstd")?;
    let xhat = b.binary(Binary::Mul, xc, rstd, n, "xhat")?;
    let mut out = vec![None; ins.len()];
    if wanted[0] {
        let dxhat = b.binary(Binary::Mul, dy, ins[1], n, "dxhat")?;
        let m1 = mean_of(b, dxhat, "dxhat")?;
        let prod = b.binary(Binary::Mul, dxhat, xhat, n, "dxhat_xhat")?;
        let m2 = mean_of(b, prod, "dxhat_xhat")?;
        let t = b.binary(Binary::Mul, xhat, m2, n, "xhat_m2")?;
        let u = b.binary(Binary::Sub, dxhat, m1, n, "dxhat_centered")?;
        let v = b.binary(Binary::Sub, u, t, n, "dxhat_proj")?;
        out[0] = Some(b.binary(Binary::Mul, v, rstd, n, "dx")?);
    }
    if wanted[1] {
        let ss = b.shape(ins[1]).to_vec();
        let g = b.binary(Binary::Mul, dy, xhat, n, "dscale_terms")?;
        out[1] = Some(b.sum_to(g, &ss, n, "dscale")?);
    }
    if let (Some(&bias), Some(true)) = (ins.get(2), wanted.get(2)) {
        let bs = b.shape(bias).to_vec();
        out[2] = Some(b.sum_to(dy, &bs, n, "dbias")?);
    }
    Ok(out)
}
