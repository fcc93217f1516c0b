//! One function per IR op, in f64.

use crate::error::{Error, Result};
use crate::ir::op::matmul_dims;
use crate::ir::{Op, Reduce};
use crate::tensor::{numel, strides, Array, DType};

/// Evaluates one op on its input values.
pub fn eval_op(op: &Op, args: &[&Array]) -> Result<Array> {
    let shapes: Vec<&[usize]> = args.iter().map(|a| a.shape.as_slice()).collect();
    let out_shape = op.shape(&shapes)?;
    Ok(match op {
        Op::Input => return Err(Error::graph("graph inputs have no value of their own")),
        Op::Const(t) => t.to_array(),
        Op::MatMul => matmul(args[0], args[1]),
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => gemm(args, *alpha as f64, *beta as f64, *trans_a, *trans_b),
        Op::Unary(u) => {
            let f = u.def().eval;
            Array::new(out_shape, args[0].data.iter().map(|&x| f(x)).collect())
        }
        Op::Binary(b) => {
            let f = b.def().eval;
            let (a, c) = (args[0], args[1]);
            let ia = broadcast_index(&a.shape, &out_shape);
            let ic = broadcast_index(&c.shape, &out_shape);
            let data = (0..numel(&out_shape))
                .map(|i| f(a.data[ia(i)], c.data[ic(i)]))
                .collect();
            Array::new(out_shape, data)
        }
        Op::StopGradient | Op::Identity | Op::Reshape { .. } => {
            Array::new(out_shape, args[0].data.clone())
        }
        Op::Transpose { perm } => transpose(args[0], perm),
        Op::Reduce { kind, axes, .. } => reduce(args[0], *kind, axes, out_shape),
        Op::LayerNorm { axis, epsilon } => layer_norm(args, *axis, *epsilon as f64),
        Op::DoraNormSq(p) => p.eval(args[0], args[1], args[2]),
        Op::Softmax { axis } => softmax(args[0], *axis),
        Op::Expand { .. } => {
            let at = broadcast_index(&args[0].shape, &out_shape);
            let data = (0..numel(&out_shape))
                .map(|i| args[0].data[at(i)])
                .collect();
            Array::new(out_shape, data)
        }
        Op::UnaryGrad(u) => {
            let d = u.def().derivative;
            let data = args[0]
                .data
                .iter()
                .zip(&args[1].data)
                .map(|(&x, &dy)| d(x) * dy)
                .collect();
            Array::new(out_shape, data)
        }
        &Op::SoftmaxCrossEntropy {
            ignore_index,
            shift,
        } => {
            let (loss, _) = cross_entropy(args[0], args[1], ignore_index, shift, None);
            Array::new(vec![], vec![loss])
        }
        &Op::SoftmaxCrossEntropyGrad {
            ignore_index,
            shift,
        } => {
            let (_, grad) =
                cross_entropy(args[0], args[1], ignore_index, shift, Some(args[2].data[0]));
            Array::new(out_shape, grad)
        }
        Op::Cast { to } => {
            let f: fn(f64) -> f64 = match to {
                DType::F32 => |x| x,
                // `as i64` truncates toward zero, saturates, and takes NaN to 0.
                DType::I64 => |x| x as i64 as f64,
                DType::Bool => |x| truth(x != 0.0),
            };
            Array::new(out_shape, args[0].data.iter().map(|&x| f(x)).collect())
        }
        Op::Where => {
            let at: Vec<_> = args
                .iter()
                .map(|a| broadcast_index(&a.shape, &out_shape))
                .collect();
            let data = (0..numel(&out_shape))
                .map(|i| {
                    let pick = if args[0].data[at[0](i)] != 0.0 { 1 } else { 2 };
                    args[pick].data[at[pick](i)]
                })
                .collect();
            Array::new(out_shape, data)
        }
        Op::Gather { axis } => gather(args[0], args[1], *axis, out_shape),
        Op::GatherElements { axis } => gather_elements(args[0], args[1], *axis),
        Op::GatherND { batch_dims } => gather_nd(args[0], args[1], *batch_dims, out_shape),
        Op::Slice { starts, steps, .. } => {
            let in_strides = strides(&args[0].shape);
            let out_strides = strides(&out_shape);
            let data = (0..numel(&out_shape))
                .map(|i| {
                    let src: i64 = (0..out_shape.len())
                        .map(|d| {
                            let j = ((i / out_strides[d]) % out_shape[d]) as i64;
                            (starts[d] + j * steps[d]) * in_strides[d] as i64
                        })
                        .sum();
                    args[0].data[src as usize]
                })
                .collect();
            Array::new(out_shape, data)
        }
        Op::Concat { axis } => {
            let inner: usize = out_shape[axis + 1..].iter().product();
            let outer: usize = out_shape[..*axis].iter().product();
            let mut data = Vec::with_capacity(numel(&out_shape));
            for o in 0..outer {
                for a in args {
                    let chunk = a.shape[*axis] * inner;
                    data.extend_from_slice(&a.data[o * chunk..(o + 1) * chunk]);
                }
            }
            Array::new(out_shape, data)
        }
        &Op::Trilu { upper, k } => {
            let r = out_shape.len();
            let (rows, cols) = (out_shape[r - 2], out_shape[r - 1]);
            let data = args[0]
                .data
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let (row, col) = (((i / cols) % rows) as i64, (i % cols) as i64);
                    let keep = if upper {
                        col - row >= k
                    } else {
                        col - row <= k
                    };
                    if keep {
                        x
                    } else {
                        0.0
                    }
                })
                .collect();
            Array::new(out_shape, data)
        }
    })
}

/// A bool as the reference holds it.
fn truth(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The position an index value selects along a dim of `dim` elements, as every gather kernel
/// reads it: rounded to the nearest integer (ties to even, like WGSL's `round`), negative values
/// counted from the end; None when it falls outside the dim (the gathered value is then 0).
pub fn gather_position(v: f64, dim: usize) -> Option<usize> {
    let r = v.round_ties_even();
    let r = if r < 0.0 { r + dim as f64 } else { r };
    (r >= 0.0 && r < dim as f64).then_some(r as usize)
}

fn gather(data: &Array, idx: &Array, axis: usize, out_shape: Vec<usize>) -> Array {
    let dim = data.shape[axis];
    let inner: usize = data.shape[axis + 1..].iter().product();
    let n_idx = idx.data.len();
    let out = (0..numel(&out_shape))
        .map(|i| {
            let (o, j, r) = (i / (n_idx * inner), (i / inner) % n_idx, i % inner);
            gather_position(idx.data[j], dim).map_or(0.0, |p| data.data[(o * dim + p) * inner + r])
        })
        .collect();
    Array::new(out_shape, out)
}

fn gather_elements(data: &Array, idx: &Array, axis: usize) -> Array {
    let d_strides = strides(&data.shape);
    let i_strides = strides(&idx.shape);
    let out = (0..idx.data.len())
        .map(|i| {
            let mut off = 0;
            for d in 0..idx.shape.len() {
                let c = (i / i_strides[d]) % idx.shape[d];
                if d != axis {
                    off += c * d_strides[d];
                }
            }
            gather_position(idx.data[i], data.shape[axis])
                .map_or(0.0, |p| data.data[off + p * d_strides[axis]])
        })
        .collect();
    Array::new(idx.shape.clone(), out)
}

fn gather_nd(data: &Array, idx: &Array, b: usize, out_shape: Vec<usize>) -> Array {
    let q = idx.shape.len();
    let k = idx.shape[q - 1];
    let d_strides = strides(&data.shape);
    let inner: usize = data.shape[b + k..].iter().product();
    // Index tuples per batch entry, and data elements per batch entry.
    let tuples_per_batch: usize = idx.shape[b..q - 1].iter().product();
    let batch_size: usize = data.shape[b..].iter().product();
    let out = (0..numel(&out_shape))
        .map(|i| {
            let (m, r) = (i / inner.max(1), i % inner.max(1));
            let mut off = (m / tuples_per_batch.max(1)) * batch_size + r;
            for t in 0..k {
                match gather_position(idx.data[m * k + t], data.shape[b + t]) {
                    Some(p) => off += p * d_strides[b + t],
                    None => return 0.0,
                }
            }
            data.data[off]
        })
        .collect();
    Array::new(out_shape, out)
}

/// Mean softmax cross-entropy, and (when `dloss` is given) its gradient w.r.t. the logits.
/// Rows are the logits' leading positions; with `shift`, row t of each sequence is scored
/// against label t+1 and the last position of each sequence is not scored.
fn cross_entropy(
    logits: &Array,
    labels: &Array,
    ignore_index: i64,
    shift: bool,
    dloss: Option<f64>,
) -> (f64, Vec<f64>) {
    let c = *logits.shape.last().unwrap();
    let rows = logits.data.len() / c.max(1);
    let seq = if shift {
        logits.shape[logits.shape.len() - 2]
    } else {
        1
    };
    let target = |row: usize| -> Option<usize> {
        let label_at = if shift {
            if row % seq == seq - 1 {
                return None;
            }
            row + 1
        } else {
            row
        };
        let l = labels.data[label_at];
        if l as i64 == ignore_index || l < 0.0 || l as usize >= c {
            None
        } else {
            Some(l as usize)
        }
    };
    let count = (0..rows).filter(|&r| target(r).is_some()).count() as f64;
    let mut loss = 0.0;
    let mut grad = vec![
        0.0;
        if dloss.is_some() {
            logits.data.len()
        } else {
            0
        }
    ];
    for r in 0..rows {
        let Some(t) = target(r) else { continue };
        let z = &logits.data[r * c..(r + 1) * c];
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
        loss += sum.ln() + max - z[t];
        if let Some(d) = dloss {
            for j in 0..c {
                let p = (z[j] - max).exp() / sum;
                grad[r * c + j] = d * (p - if j == t { 1.0 } else { 0.0 }) / count;
            }
        }
    }
    (loss / count, grad)
}

/// Maps a flat index of `out` to the flat index of an operand of shape `shape` that broadcasts
/// to it.
pub fn broadcast_index(shape: &[usize], out: &[usize]) -> impl Fn(usize) -> usize {
    let rank = out.len();
    let offset = rank - shape.len();
    let in_strides = strides(shape);
    let out_strides = strides(out);
    let dims: Vec<(usize, usize, usize)> = (0..rank)
        .filter_map(|d| {
            if d < offset || shape[d - offset] == 1 {
                None
            } else {
                Some((out_strides[d], out[d], in_strides[d - offset]))
            }
        })
        .collect();
    move |i| dims.iter().map(|&(os, od, is)| (i / os) % od * is).sum()
}

fn matmul(a: &Array, b: &Array) -> Array {
    let d = matmul_dims(&a.shape, &b.shape).expect("shape checked");
    let (m, k, n) = (d.m, d.k, d.n);
    // Batch offsets of each operand for each broadcast batch index.
    let a_mat = |bi: usize| broadcast_index(&d.a_batch, &d.batch)(bi) * m * k;
    let b_mat = |bi: usize| broadcast_index(&d.b_batch, &d.batch)(bi) * k * n;
    let batches = numel(&d.batch);
    let mut out = vec![0.0; batches * m * n];
    for bi in 0..batches {
        let (ao, bo) = (a_mat(bi), b_mat(bi));
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    acc += a.data[ao + i * k + p] * b.data[bo + p * n + j];
                }
                out[bi * m * n + i * n + j] = acc;
            }
        }
    }
    Array::new(d.out, out)
}

fn gemm(args: &[&Array], alpha: f64, beta: f64, ta: bool, tb: bool) -> Array {
    let (a, b) = (args[0], args[1]);
    let (m, k) = if ta {
        (a.shape[1], a.shape[0])
    } else {
        (a.shape[0], a.shape[1])
    };
    let n = if tb { b.shape[0] } else { b.shape[1] };
    let at = |i: usize, p: usize| {
        if ta {
            a.data[p * m + i]
        } else {
            a.data[i * k + p]
        }
    };
    let bt = |p: usize, j: usize| {
        if tb {
            b.data[j * k + p]
        } else {
            b.data[p * n + j]
        }
    };
    let c = args.get(2).map(|c| (c, broadcast_index(&c.shape, &[m, n])));
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for p in 0..k {
                acc += at(i, p) * bt(p, j);
            }
            let mut v = alpha * acc;
            if let Some((c, ci)) = &c {
                v += beta * c.data[ci(i * n + j)];
            }
            out[i * n + j] = v;
        }
    }
    Array::new(vec![m, n], out)
}

fn transpose(x: &Array, perm: &[usize]) -> Array {
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let in_strides = strides(&x.shape);
    let out_strides = strides(&out_shape);
    let data = (0..x.data.len())
        .map(|i| {
            let src: usize = (0..perm.len())
                .map(|d| (i / out_strides[d]) % out_shape[d] * in_strides[perm[d]])
                .sum();
            x.data[src]
        })
        .collect();
    Array::new(out_shape, data)
}

fn reduce(x: &Array, kind: Reduce, axes: &[usize], out_shape: Vec<usize>) -> Array {
    // Index into the kept-dims layout: reduced dims have size 1.
    let kept: Vec<usize> = x
        .shape
        .iter()
        .enumerate()
        .map(|(d, &s)| if axes.contains(&d) { 1 } else { s })
        .collect();
    let to_out = broadcast_index(&kept, &x.shape);
    let def = kind.def();
    let mut out = vec![def.init; numel(&kept)];
    for (i, &v) in x.data.iter().enumerate() {
        let o = &mut out[to_out(i)];
        *o = (def.combine)(*o, v);
    }
    Array::new(out_shape, out)
}

fn layer_norm(args: &[&Array], axis: usize, eps: f64) -> Array {
    let x = args[0];
    let inner: usize = x.shape[axis..].iter().product();
    let norm_shape = &x.shape[axis..];
    let scale_at = broadcast_index(&args[1].shape, norm_shape);
    let bias_at = args.get(2).map(|b| broadcast_index(&b.shape, norm_shape));
    let mut out = vec![0.0; x.data.len()];
    for (row, chunk) in x.data.chunks(inner).enumerate() {
        let mean = chunk.iter().sum::<f64>() / inner as f64;
        let var = chunk.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / inner as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for (j, &v) in chunk.iter().enumerate() {
            let mut y = (v - mean) * inv * args[1].data[scale_at(j)];
            if let Some(b) = &bias_at {
                y += args[2].data[b(j)];
            }
            out[row * inner + j] = y;
        }
    }
    Array::new(x.shape.clone(), out)
}

fn softmax(x: &Array, axis: usize) -> Array {
    let len = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    let mut out = vec![0.0; x.data.len()];
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * len * inner + j * inner + i;
            let max = (0..len)
                .map(|j| x.data[at(j)])
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..len).map(|j| (x.data[at(j)] - max).exp()).sum();
            for j in 0..len {
                out[at(j)] = (x.data[at(j)] - max).exp() / sum;
            }
        }
    }
    Array::new(x.shape.clone(), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    #[test]
    fn broadcast_matmul_matches_hand_computation() {
        let a = Array::new(vec![2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let b = Array::new(vec![2, 2], vec![1.0, 0.0, 0.0, 2.0]);
        let y = eval_op(&Op::MatMul, &[&a, &b]).unwrap();
        assert_eq!(y.shape, vec![2, 1, 2]);
        assert_eq!(y.data, vec![1.0, 4.0, 3.0, 8.0]);
    }

    #[test]
    fn reduce_and_transpose() {
        let x = Array::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let sum = |kind| Op::Reduce {
            kind,
            axes: vec![0],
            keepdims: false,
        };
        let r = eval_op(&sum(Reduce::Sum), &[&x]).unwrap();
        assert_eq!(r.data, vec![5.0, 7.0, 9.0]);
        let r = eval_op(&sum(Reduce::SumSquare), &[&x]).unwrap();
        assert_eq!(r.data, vec![17.0, 29.0, 45.0]);
        let t = eval_op(&Op::Transpose { perm: vec![1, 0] }, &[&x]).unwrap();
        assert_eq!(t.data, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let c = eval_op(&Op::Const(Tensor::scalar(2.0)), &[]).unwrap();
        let p = eval_op(&Op::Binary(crate::ir::Binary::Pow), &[&x, &c]).unwrap();
        assert_eq!(p.data[5], 36.0);
    }

    #[test]
    fn gemm_with_transposes_and_bias() {
        let a = Array::new(vec![2, 1], vec![1.0, 2.0]); // transA -> [1, 2]
        let b = Array::new(vec![1, 2], vec![3.0, 4.0]); // transB -> [2, 1]
        let c = Array::new(vec![1], vec![10.0]);
        let op = Op::Gemm {
            alpha: 2.0,
            beta: 0.5,
            trans_a: true,
            trans_b: true,
        };
        let y = eval_op(&op, &[&a, &b, &c]).unwrap();
        assert_eq!(y.data, vec![2.0 * 11.0 + 5.0]);
    }
}
