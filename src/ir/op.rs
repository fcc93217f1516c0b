//! The IR's operations and their static shape rules. Adding an op starts here: a variant, its
//! `shape` rule, and its display name; then one arm each in the reference executor
//! (`reference::eval`), the WGSL emitter (`codegen::kernels`) and the ONNX import/export tables
//! (`onnx::import_ops`, `onnx::export`). CONTRIBUTING.md lists the steps.

use crate::error::{Error, Result};
use crate::tensor::{shape_str, Tensor};

/// Element-wise functions of one input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Relu,
    Sigmoid,
    Tanh,
    Erf,
    /// ONNX Gelu; `tanh` selects the tanh approximation.
    Gelu {
        tanh: bool,
    },
    Sqrt,
    Neg,
    Exp,
    Log,
    Reciprocal,
}

/// What a reduction computes over its axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    /// Sum of squares: DoRA's frozen column norms `||W0[:, j]||²` without an [in, out] temporary.
    SumSquare,
}

/// Element-wise functions of two inputs, with numpy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

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
}

impl Op {
    /// A short stable name, used in kernel names, messages and IR dumps.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Const(_) => "const",
            Op::MatMul => "matmul",
            Op::Gemm { .. } => "gemm",
            Op::Unary(u) => match u {
                Unary::Relu => "relu",
                Unary::Sigmoid => "sigmoid",
                Unary::Tanh => "tanh",
                Unary::Erf => "erf",
                Unary::Gelu { .. } => "gelu",
                Unary::Sqrt => "sqrt",
                Unary::Neg => "neg",
                Unary::Exp => "exp",
                Unary::Log => "log",
                Unary::Reciprocal => "reciprocal",
            },
            Op::Binary(b) => match b {
                Binary::Add => "add",
                Binary::Sub => "sub",
                Binary::Mul => "mul",
                Binary::Div => "div",
                Binary::Pow => "pow",
            },
            Op::StopGradient => "stop_gradient",
            Op::Identity => "identity",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Reduce {
                kind: Reduce::Sum, ..
            } => "reduce_sum",
            Op::Reduce {
                kind: Reduce::SumSquare,
                ..
            } => "reduce_sum_square",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Softmax { .. } => "softmax",
            Op::Expand { .. } => "expand",
            Op::UnaryGrad(_) => "unary_grad",
            Op::SoftmaxCrossEntropy { .. } => "softmax_cross_entropy",
            Op::SoftmaxCrossEntropyGrad { .. } => "softmax_cross_entropy_grad",
        }
    }

    /// Ops whose output is their input's bytes unchanged: they cost no kernel.
    pub fn is_view(&self) -> bool {
        matches!(self, Op::Identity | Op::StopGradient | Op::Reshape { .. })
    }

    /// The number of inputs the op takes: (min, max).
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Input | Op::Const(_) => (0, 0),
            Op::MatMul | Op::Binary(_) | Op::UnaryGrad(_) | Op::SoftmaxCrossEntropy { .. } => {
                (2, 2)
            }
            Op::SoftmaxCrossEntropyGrad { .. } => (3, 3),
            Op::Gemm { .. } => (2, 3),
            Op::LayerNorm { .. } => (2, 3),
            _ => (1, 1),
        }
    }

    /// The output shape for the given input shapes, or a shape error naming the op.
    pub fn shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let (lo, hi) = self.arity();
        if inputs.len() < lo || inputs.len() > hi {
            return Err(Error::Shape(format!(
                "{} takes {lo}..={hi} inputs, got {}",
                self.name(),
                inputs.len()
            )));
        }
        let err = |msg: String| Err(Error::Shape(format!("{}: {msg}", self.name())));
        match self {
            Op::Input => err("graph inputs have no shape rule".into()),
            Op::Const(t) => Ok(t.shape.clone()),
            Op::MatMul => matmul_shape(inputs[0], inputs[1]).map_err(Error::Shape),
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
            Op::Unary(_) | Op::StopGradient | Op::Identity => Ok(inputs[0].to_vec()),
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
        }
    }
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
