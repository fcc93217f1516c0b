//! The IR's operations and their static shape rules. Adding an op starts here: a variant, its
//! `shape` rule, and its display name; then one arm each in the reference executor
//! (`reference::eval`), the WGSL emitter (`codegen::kernels`) and the ONNX import/export tables
//! (`onnx::import_ops`, `onnx::export`). CONTRIBUTING.md lists the steps.

use crate::error::{Error, Result, Subject};
use crate::tensor::{shape_str, DType, Tensor};

/// The most inputs one Concat node takes: with its output, one kernel binds at most 8 storage
/// buffers, WebGPU's guaranteed minimum. The importer splits longer concatenations into a tree.
pub const MAX_CONCAT_INPUTS: usize = 7;

pub use crate::ops::{Binary, Reduce, Unary};

/// One IR operation. Every op produces exactly one value.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input, fed at run time.
    Input,
    /// A constant: an initializer, a Constant node, an adapter tensor, a folded value.
    Const(Tensor),
    /// numpy-style matmul: 1-D operands promoted, batch dims broadcast.
    MatMul,
    /// `alpha * op(A) op(B) + beta * C` with optional C (2-D A and B).
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    Unary(Unary),
    Binary(Binary),
    /// Identity that also tells autodiff not to differentiate through (DoRA's detached norm).
    StopGradient,
    /// DoRA's squared column norms of `alpha W + s (B A)ᵀ`: inputs W, A, B; output [out]
    /// (`crate::ops::dora_norm`).
    DoraNormSq(crate::ops::DoraNorm),
    Identity,
    /// Target shape fully resolved at import (no -1 or 0 left).
    Reshape {
        shape: Vec<usize>,
    },
    Transpose {
        perm: Vec<usize>,
    },
    /// A reduction over `axes` (sorted, unique).
    Reduce {
        kind: Reduce,
        axes: Vec<usize>,
        keepdims: bool,
    },
    /// Normalises over dims `axis..`; inputs x, scale, optional bias.
    LayerNorm {
        axis: usize,
        epsilon: f32,
    },
    Softmax {
        axis: usize,
    },
    /// numpy-style broadcast of the input to `shape` (ONNX Expand with a static shape; the
    /// gradient of a reduction).
    Expand {
        shape: Vec<usize>,
    },
    /// The derivative of a unary function, applied: inputs (x, dy), output `f'(x) * dy`.
    UnaryGrad(Unary),
    /// Mean softmax cross-entropy over class indices: inputs logits [..., C] and labels [...]
    /// (class ids stored as f32); output a scalar. Positions whose label is `ignore_index` do
    /// not count. With `shift`, position t's logits predict label t+1 along the second-to-last
    /// logits dim (next-token loss for language models).
    SoftmaxCrossEntropy {
        ignore_index: i64,
        shift: bool,
    },
    /// Its gradient: inputs (logits, labels, dloss scalar), output dlogits.
    SoftmaxCrossEntropyGrad {
        ignore_index: i64,
        shift: bool,
    },
    /// Conversion to `to`: to int64 truncates toward zero, to bool is `x != 0`, to float32 keeps
    /// the value (on the device every value is already f32, so it is a view).
    Cast {
        to: DType,
    },
    /// `cond ? x : y` element-wise with numpy broadcasting of all three; inputs cond, x, y.
    Where,
    /// ONNX Gather: inputs data and indices (any shape; ids stored as f32 on the device, rounded
    /// to the nearest integer, negative ids count from the end). The output is
    /// `data.shape[..axis] ++ indices.shape ++ data.shape[axis + 1..]`. An id outside
    /// `-dim..dim` gives 0 (ONNX leaves it undefined; no kernel ever reads out of bounds).
    Gather {
        axis: usize,
    },
    /// ONNX GatherElements: the output has the indices' shape; element `i` is `data` at `i`
    /// with coordinate `axis` replaced by `indices[i]` (same id rules as Gather).
    GatherElements {
        axis: usize,
    },
    /// ONNX GatherND: the last indices dim indexes the leading `k` dims of `data` after
    /// `batch_dims` shared batch dims (same id rules as Gather).
    GatherND {
        batch_dims: usize,
    },
    /// A strided window, one entry per input dim, fully resolved: element `j` along dim `d` is
    /// input element `starts[d] + j * steps[d]`, for `j` in `0..ceil((ends[d] - starts[d]) /
    /// steps[d])`. The importer normalises ONNX's negative and clamped values; steps may be
    /// negative (then `ends[d]` may be -1: the window runs down to element 0). ONNX Split is
    /// one Slice per output.
    Slice {
        starts: Vec<i64>,
        ends: Vec<i64>,
        steps: Vec<i64>,
    },
    /// Joins its inputs (1 to [`MAX_CONCAT_INPUTS`]) along `axis`.
    Concat {
        axis: usize,
    },
    /// Keeps the upper (`upper`) or lower triangle of the last two dims, relative to diagonal `k`
    /// (above the main one when positive), and zeros the rest.
    Trilu {
        upper: bool,
        k: i64,
    },
}

impl Op {
    /// A short stable name, used in kernel names, messages and IR dumps.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Const(_) => "const",
            Op::MatMul => "matmul",
            Op::Gemm { .. } => "gemm",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::StopGradient => "stop_gradient",
            Op::DoraNormSq(_) => "dora_norm_sq",
            Op::Identity => "identity",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Reduce { kind, .. } => kind.name(),
            Op::LayerNorm { .. } => "layer_norm",
            Op::Softmax { .. } => "softmax",
            Op::Expand { .. } => "expand",
            Op::UnaryGrad(_) => "unary_grad",
            Op::SoftmaxCrossEntropy { .. } => "softmax_cross_entropy",
            Op::SoftmaxCrossEntropyGrad { .. } => "softmax_cross_entropy_grad",
            Op::Cast { .. } => "cast",
            Op::Where => "where",
            Op::Gather { .. } => "gather",
            Op::GatherElements { .. } => "gather_elements",
            Op::GatherND { .. } => "gather_nd",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Trilu { .. } => "trilu",
        }
    }

    /// The element type of the result, given the inputs' types. Predicates give bools, Cast its
    /// target; every other op keeps the type of its first (for Where: its second) input.
    pub fn dtype(&self, inputs: &[DType]) -> DType {
        match self {
            Op::Const(t) => t.dtype(),
            Op::Input | Op::SoftmaxCrossEntropy { .. } | Op::SoftmaxCrossEntropyGrad { .. } => {
                DType::F32
            }
            Op::Unary(u) if u.is_predicate() => DType::Bool,
            Op::Binary(b) if b.is_predicate() => DType::Bool,
            Op::Cast { to } => *to,
            Op::Where => inputs.get(1).copied().unwrap_or(DType::F32),
            _ => inputs.first().copied().unwrap_or(DType::F32),
        }
    }

    /// Ops whose output is their input's bytes unchanged: they cost no kernel.
    pub fn is_view(&self) -> bool {
        matches!(
            self,
            Op::Identity | Op::StopGradient | Op::Reshape { .. } | Op::Cast { to: DType::F32 }
        )
    }

    /// The number of inputs the op takes: (min, max).
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Input | Op::Const(_) => (0, 0),
            Op::MatMul | Op::Binary(_) | Op::UnaryGrad(_) | Op::SoftmaxCrossEntropy { .. } => {
                (2, 2)
            }
            Op::SoftmaxCrossEntropyGrad { .. } | Op::Where | Op::DoraNormSq(_) => (3, 3),
            Op::Gather { .. } | Op::GatherElements { .. } | Op::GatherND { .. } => (2, 2),
            Op::Concat { .. } => (1, MAX_CONCAT_INPUTS),
            Op::Gemm { .. } => (2, 3),
            Op::LayerNorm { .. } => (2, 3),
            _ => (1, 1),
        }
    }

    /// The output shape for the given input shapes, or a shape error naming the op.
    pub fn shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let (lo, hi) = self.arity();
        if inputs.len() < lo || inputs.len() > hi {
            return Err(Error::shape(format!(
                "{} takes {lo}..={hi} inputs, got {}",
                self.name(),
                inputs.len()
            )));
        }
        let err = |msg: String| {
            Err(Error::shape_at(
                Subject::context(self.name()),
                msg.to_string(),
            ))
        };
        match self {
            Op::Input => err("graph inputs have no shape rule".into()),
            Op::Const(t) => Ok(t.shape.clone()),
            Op::MatMul => matmul_shape(inputs[0], inputs[1]).map_err(Error::shape),
            Op::Gemm {
                trans_a, trans_b, ..
            } => {
                let (a, b) = (inputs[0], inputs[1]);
                if a.len() != 2 || b.len() != 2 {
                    return err(format!(
                        "A and B must be 2-D, got {} and {}",
                        shape_str(a),
                        shape_str(b)
                    ));
                }
                let (m, ka) = if *trans_a { (a[1], a[0]) } else { (a[0], a[1]) };
                let (kb, n) = if *trans_b { (b[1], b[0]) } else { (b[0], b[1]) };
                if ka != kb {
                    return err(format!(
                        "inner dims differ: op(A) is {m}x{ka}, op(B) is {kb}x{n}"
                    ));
                }
                if let Some(c) = inputs.get(2) {
                    if broadcast(c, &[m, n]).as_deref() != Some(&[m, n][..]) {
                        return err(format!(
                            "C of shape {} does not broadcast to {m}x{n}",
                            shape_str(c)
                        ));
                    }
                }
                Ok(vec![m, n])
            }
            Op::Unary(_) | Op::StopGradient | Op::Identity | Op::Cast { .. } => {
                Ok(inputs[0].to_vec())
            }
            Op::Binary(_) => match broadcast(inputs[0], inputs[1]) {
                Some(s) => Ok(s),
                None => err(format!(
                    "shapes {} and {} do not broadcast",
                    shape_str(inputs[0]),
                    shape_str(inputs[1])
                )),
            },
            Op::Reshape { shape } => {
                let from: usize = inputs[0].iter().product();
                let to: usize = shape.iter().product();
                if from != to {
                    return err(format!(
                        "cannot reshape {} ({from} elements) to {} ({to} elements)",
                        shape_str(inputs[0]),
                        shape_str(shape)
                    ));
                }
                Ok(shape.clone())
            }
            Op::Transpose { perm } => {
                let x = inputs[0];
                let mut seen = vec![false; x.len()];
                if perm.len() != x.len() || perm.iter().any(|&p| p >= x.len() || seen[p]) {
                    return err(format!(
                        "perm {perm:?} is not a permutation of rank {}",
                        x.len()
                    ));
                }
                for &p in perm {
                    seen[p] = true;
                }
                Ok(perm.iter().map(|&p| x[p]).collect())
            }
            Op::Reduce { axes, keepdims, .. } => {
                let x = inputs[0];
                if axes.iter().any(|&a| a >= x.len()) {
                    return err(format!("axes {axes:?} out of range for rank {}", x.len()));
                }
                Ok(x.iter()
                    .enumerate()
                    .filter_map(|(i, &d)| match (axes.contains(&i), keepdims) {
                        (false, _) => Some(d),
                        (true, true) => Some(1),
                        (true, false) => None,
                    })
                    .collect())
            }
            Op::DoraNormSq(p) => p.shape(inputs),
            Op::LayerNorm { axis, .. } => {
                let x = inputs[0];
                if *axis >= x.len() {
                    return err(format!("axis {axis} out of range for rank {}", x.len()));
                }
                let norm = &x[*axis..];
                for p in &inputs[1..] {
                    if broadcast(p, norm).as_deref() != Some(norm) {
                        return err(format!(
                            "scale/bias of shape {} do not match normalised dims {}",
                            shape_str(p),
                            shape_str(norm)
                        ));
                    }
                }
                Ok(x.to_vec())
            }
            Op::Softmax { axis } => {
                if *axis >= inputs[0].len() {
                    return err(format!(
                        "axis {axis} out of range for rank {}",
                        inputs[0].len()
                    ));
                }
                Ok(inputs[0].to_vec())
            }
            Op::Expand { shape } => {
                if broadcast(inputs[0], shape).as_deref() != Some(&shape[..]) {
                    return err(format!(
                        "{} does not broadcast to {}",
                        shape_str(inputs[0]),
                        shape_str(shape)
                    ));
                }
                Ok(shape.clone())
            }
            Op::UnaryGrad(_) => {
                if inputs[0] != inputs[1] {
                    return err(format!(
                        "x {} and dy {} differ",
                        shape_str(inputs[0]),
                        shape_str(inputs[1])
                    ));
                }
                Ok(inputs[0].to_vec())
            }
            Op::SoftmaxCrossEntropy { shift, .. } | Op::SoftmaxCrossEntropyGrad { shift, .. } => {
                let (logits, labels) = (inputs[0], inputs[1]);
                if logits.is_empty() || labels != &logits[..logits.len() - 1] {
                    return err(format!(
                        "labels {} must be the logits' shape {} without its last (class) dim",
                        shape_str(labels),
                        shape_str(logits)
                    ));
                }
                if *shift && logits.len() < 2 {
                    return err(
                        "a shifted loss needs logits of rank >= 2 (positions, classes)".into(),
                    );
                }
                if let Some(d) = inputs.get(2) {
                    if !d.iter().all(|&x| x == 1) {
                        return err(format!("dloss must be a scalar, got {}", shape_str(d)));
                    }
                    return Ok(logits.to_vec());
                }
                Ok(vec![])
            }
            Op::Where => {
                let s = broadcast(inputs[0], inputs[1]).and_then(|s| broadcast(&s, inputs[2]));
                s.map_or_else(
                    || {
                        err(format!(
                            "cond {}, x {} and y {} do not broadcast",
                            shape_str(inputs[0]),
                            shape_str(inputs[1]),
                            shape_str(inputs[2])
                        ))
                    },
                    Ok,
                )
            }
            Op::Gather { axis } => {
                let (data, idx) = (inputs[0], inputs[1]);
                if *axis >= data.len() {
                    return err(format!("axis {axis} out of range for rank {}", data.len()));
                }
                Ok([&data[..*axis], idx, &data[axis + 1..]].concat())
            }
            Op::GatherElements { axis } => {
                let (data, idx) = (inputs[0], inputs[1]);
                let fits = data.len() == idx.len()
                    && *axis < data.len()
                    && (0..data.len()).all(|d| d == *axis || idx[d] <= data[d]);
                if !fits {
                    return err(format!(
                        "indices {} do not fit data {} (same rank, no larger off axis {axis})",
                        shape_str(idx),
                        shape_str(data)
                    ));
                }
                Ok(idx.to_vec())
            }
            Op::GatherND { batch_dims } => gather_nd_shape(inputs[0], inputs[1], *batch_dims)
                .map_err(|m| Error::shape_at(Subject::context(self.name()), m.to_string())),
            Op::Slice {
                starts,
                ends,
                steps,
            } => slice_shape(inputs[0], starts, ends, steps)
                .map_err(|m| Error::shape_at(Subject::context(self.name()), m.to_string())),
            Op::Concat { axis } => {
                let first = inputs[0];
                if *axis >= first.len() {
                    return err(format!("axis {axis} out of range for rank {}", first.len()));
                }
                let mut out = first.to_vec();
                out[*axis] = 0;
                for s in inputs {
                    let same = s.len() == first.len()
                        && (0..s.len()).all(|d| d == *axis || s[d] == first[d]);
                    if !same {
                        let all: Vec<String> = inputs.iter().map(|s| shape_str(s)).collect();
                        return err(format!("inputs {} differ off axis {axis}", all.join(", ")));
                    }
                    out[*axis] += s[*axis];
                }
                Ok(out)
            }
            Op::Trilu { .. } => {
                if inputs[0].len() < 2 {
                    return err(format!("needs rank >= 2, got {}", shape_str(inputs[0])));
                }
                Ok(inputs[0].to_vec())
            }
        }
    }
}

/// The length of a strided window: `ceil((end - start) / step)`, at least 0.
pub fn slice_len(start: i64, end: i64, step: i64) -> usize {
    let span = if step > 0 { end - start } else { start - end };
    let step = step.abs();
    if span <= 0 {
        0
    } else {
        ((span + step - 1) / step) as usize
    }
}

fn slice_shape(
    x: &[usize],
    starts: &[i64],
    ends: &[i64],
    steps: &[i64],
) -> std::result::Result<Vec<usize>, String> {
    if starts.len() != x.len() || ends.len() != x.len() || steps.len() != x.len() {
        return Err(format!(
            "starts {starts:?}, ends {ends:?} and steps {steps:?} need one entry per dim of {}",
            shape_str(x)
        ));
    }
    let mut out = Vec::with_capacity(x.len());
    for d in 0..x.len() {
        let (start, step, dim) = (starts[d], steps[d], x[d] as i64);
        if step == 0 {
            return Err(format!("step 0 on dim {d}"));
        }
        let len = slice_len(start, ends[d], step);
        let last = start + (len as i64 - 1) * step;
        if len > 0 && !((0..dim).contains(&start) && (0..dim).contains(&last)) {
            return Err(format!(
                "dim {d}: elements {start}..{} by {step} are outside 0..{dim}",
                ends[d]
            ));
        }
        out.push(len);
    }
    Ok(out)
}

/// The resolved Slice of ONNX's `starts`, `ends`, `axes` and `steps` on a tensor of shape `x`
/// (negative values count from the end; out-of-range values are clamped, as ONNX specifies).
/// `axes` default to `0..starts.len()`, `steps` to 1. Returns `(starts, ends, steps)` per dim,
/// with each end made exact (`start + len * step`) so that equal windows compare equal.
#[allow(clippy::type_complexity)]
pub fn resolve_slice(
    x: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> std::result::Result<(Vec<i64>, Vec<i64>, Vec<i64>), String> {
    let rank = x.len() as i64;
    let n = starts.len();
    let default_axes: Vec<i64> = (0..n as i64).collect();
    let axes = axes.unwrap_or(&default_axes);
    let ones = vec![1; n];
    let steps = steps.unwrap_or(&ones);
    if ends.len() != n || axes.len() != n || steps.len() != n {
        return Err(format!(
            "starts {starts:?}, ends {ends:?}, axes {axes:?} and steps {steps:?} differ in length"
        ));
    }
    let mut s: Vec<i64> = vec![0; x.len()];
    let mut e: Vec<i64> = x.iter().map(|&d| d as i64).collect();
    let mut st: Vec<i64> = vec![1; x.len()];
    let mut seen = vec![false; x.len()];
    for i in 0..n {
        let a = axes[i];
        if a < -rank || a >= rank {
            return Err(format!("axis {a} is out of range for rank {rank}"));
        }
        let a = if a < 0 { a + rank } else { a } as usize;
        if std::mem::replace(&mut seen[a], true) {
            return Err(format!("axis {} is given twice in {axes:?}", axes[i]));
        }
        let dim = x[a] as i64;
        let step = steps[i];
        if step == 0 {
            return Err(format!("step 0 on axis {a}"));
        }
        let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (start, end) = if step > 0 {
            (wrap(starts[i]).clamp(0, dim), wrap(ends[i]).clamp(0, dim))
        } else {
            (
                wrap(starts[i]).clamp(-1, dim - 1),
                wrap(ends[i]).clamp(-1, dim - 1),
            )
        };
        let len = slice_len(start, end, step) as i64;
        // An empty window starts at 0 (or at -1 going down), so equal windows compare equal.
        let start = if len == 0 {
            if step > 0 {
                0
            } else {
                -1
            }
        } else {
            start
        };
        s[a] = start;
        e[a] = start + len * step;
        st[a] = step;
    }
    Ok((s, e, st))
}

fn gather_nd_shape(
    data: &[usize],
    idx: &[usize],
    b: usize,
) -> std::result::Result<Vec<usize>, String> {
    let q = idx.len();
    let Some(&k) = idx.last() else {
        return Err("indices must have rank >= 1".into());
    };
    if k == 0 || b + k > data.len() || b >= q || data[..b] != idx[..b] {
        return Err(format!(
            "indices {} do not index data {} with batch_dims {b}",
            shape_str(idx),
            shape_str(data)
        ));
    }
    Ok([&idx[..q - 1], &data[b + k..]].concat())
}

/// numpy broadcasting of two shapes, or None when they are incompatible.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// The layout of a (possibly batched, possibly 1-D) matmul: batch shape, m, k, n, and whether
/// each operand was a promoted vector (whose unit dim is dropped from the result).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatMulDims {
    pub batch: Vec<usize>,
    pub a_batch: Vec<usize>,
    pub b_batch: Vec<usize>,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub out: Vec<usize>,
}

pub fn matmul_dims(a: &[usize], b: &[usize]) -> std::result::Result<MatMulDims, String> {
    if a.is_empty() || b.is_empty() {
        return Err("matmul operands must have rank >= 1".into());
    }
    let (a_batch, m, ka) = match a.len() {
        1 => (vec![], 1, a[0]),
        r => (a[..r - 2].to_vec(), a[r - 2], a[r - 1]),
    };
    let (b_batch, kb, n) = match b.len() {
        1 => (vec![], b[0], 1),
        r => (b[..r - 2].to_vec(), b[r - 2], b[r - 1]),
    };
    if ka != kb {
        return Err(format!(
            "matmul inner dims differ: {} @ {}",
            shape_str(a),
            shape_str(b)
        ));
    }
    let batch = broadcast(&a_batch, &b_batch).ok_or_else(|| {
        format!(
            "matmul batch dims do not broadcast: {} @ {}",
            shape_str(a),
            shape_str(b)
        )
    })?;
    let mut out = batch.clone();
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok(MatMulDims {
        batch,
        a_batch,
        b_batch,
        m,
        k: ka,
        n,
        out,
    })
}

fn matmul_shape(a: &[usize], b: &[usize]) -> std::result::Result<Vec<usize>, String> {
    matmul_dims(a, b).map(|d| d.out)
}
