//! Losses appended to a model's output: the last nodes of the forward pass.

use crate::error::{Error, Result, Subject};
use crate::ir::{Binary, NodeId, Op, Patch, PatchRef, Reduce};
use crate::tensor::{numel, shape_str, DType};

/// Which loss to train with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossKind {
    /// Mean squared error against a target of the output's shape.
    Mse,
    /// Mean softmax cross-entropy over class indices (the output's last dim), skipping
    /// `ignore_index`.
    CrossEntropy { ignore_index: i64 },
    /// Next-token cross-entropy: logits at position t predict label t+1.
    Lm { ignore_index: i64 },
}

impl LossKind {
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Mse => "mse",
            LossKind::CrossEntropy { .. } => "cross-entropy",
            LossKind::Lm { .. } => "lm",
        }
    }

    /// The shape the labels tensor must have for a model output of `output` shape.
    pub fn label_shape(self, output: &[usize]) -> Vec<usize> {
        match self {
            LossKind::Mse => output.to_vec(),
            _ => output[..output.len().saturating_sub(1)].to_vec(),
        }
    }

    /// Number of classes, for label range checks (None for regression).
    pub fn classes(self, output: &[usize]) -> Option<usize> {
        match self {
            LossKind::Mse => None,
            _ => output.last().copied(),
        }
    }
}

/// Adds a labels input named `labels` and the scalar loss on `output` to the patch; returns
/// (labels, loss).
pub fn append(
    p: &mut Patch,
    kind: LossKind,
    output: NodeId,
    labels: &str,
) -> Result<(PatchRef, PatchRef)> {
    let out_shape = p.graph().shape(output).to_vec();
    if kind != LossKind::Mse && out_shape.is_empty() {
        return Err(Error::input_at(
            Subject::flag_value("--loss", kind.name()),
            "the model output is a scalar; a classification loss needs logits [..., classes]",
        ));
    }
    if let LossKind::Lm { .. } = kind {
        if out_shape.len() < 2 {
            return Err(Error::input(format!(
                "--loss lm needs logits [batch, positions, vocab]; the output has shape {}",
                shape_str(&out_shape)
            )));
        }
    }
    let label_node = p.input(labels, kind.label_shape(&out_shape), DType::F32)?;
    let output = PatchRef::from(output);
    let loss = match kind {
        LossKind::Mse => {
            let diff = p.add(
                Op::Binary(Binary::Sub),
                &[output, label_node],
                "loss/diff",
                "/loss/mse/diff",
            )?;
            let sq = Op::Reduce {
                kind: Reduce::SumSquare,
                axes: (0..out_shape.len()).collect(),
                keepdims: false,
            };
            let total = p.add(sq, &[diff], "loss/sum_sq", "/loss/mse/sum_sq")?;
            let inv = p.scalar("loss/inv_count", 1.0 / numel(&out_shape).max(1) as f32);
            p.add(Op::Binary(Binary::Mul), &[total, inv], "loss", "/loss/mse")?
        }
        LossKind::CrossEntropy { ignore_index } | LossKind::Lm { ignore_index } => {
            let shift = matches!(kind, LossKind::Lm { .. });
            let op = Op::SoftmaxCrossEntropy {
                ignore_index,
                shift,
            };
            p.add(op, &[output, label_node], "loss", "/loss/cross_entropy")?
        }
    };
    Ok((label_node, loss))
}
