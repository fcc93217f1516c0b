//! Reductions over a set of axes. Each kind lives in its own file as a [`ReduceDef`];
//! [`Reduce::def`] maps the IR's [`Reduce`] to it. The rest of dorac reads a reduction only
//! through its definition:
//!
//! - import: a node of the definition's `onnx` type becomes `Op::Reduce` (axes from the attribute
//!   before opset `axes_input_since`, from the second input from then on; `keepdims`,
//!   `noop_with_empty_axes`); export writes the same;
//! - reference: `init`, then `combine(acc, v)` over the reduced elements, in f64;
//! - WGSL: `wgsl`, the template and per-element term the reduce kernels use;
//! - autodiff: `grad` builds the input's cotangent from the cotangent spread back over the
//!   reduced axes.
//!
//! Adding a reduction: a file beside this one (copy `sum_square.rs`), a variant of [`Reduce`]
//! and its line in [`Reduce::def`] and [`Reduce::ALL`].

mod max;
mod min;
mod prod;
mod sum;
mod sum_square;

use crate::error::Result;
use crate::ir::PatchRef;
use crate::passes::autodiff::Builder;

/// What a reduction computes over its axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    /// Sum of squares: DoRA's frozen column norms `||W0[:, j]||²` without an [in, out] temporary.
    SumSquare,
    /// Maximum (NaN if any element is NaN; -inf over no elements).
    Max,
    /// Minimum (NaN if any element is NaN; +inf over no elements).
    Min,
    /// Product (1 over no elements).
    Prod,
}

/// How a reduce kernel computes a kind: the template, the per-element term (of `v`), and for
/// the max template the sign it reduces with (a minimum is the maximum of the negated terms).
pub struct ReduceWgsl {
    pub template: crate::codegen::template::Template,
    pub term: &'static str,
    pub sign: Option<&'static str>,
}

/// What a gradient rule sees: the reduction node `n` of input `x`, and `spread`, the cotangent
/// of the output broadcast back to x's shape. `keepdims_shape` is the output's shape with the
/// reduced axes kept as 1.
pub struct GradArgs<'a> {
    pub n: PatchRef,
    pub x: PatchRef,
    pub spread: PatchRef,
    pub axes: &'a [usize],
    pub keepdims_shape: &'a [usize],
}

/// Everything dorac knows of one reduction.
pub struct ReduceDef {
    /// Stable IR name: kernel names, messages, IR dumps.
    pub name: &'static str,
    /// The ONNX op type imported as this reduction and exported for it.
    pub onnx: &'static str,
    /// The opset from which ONNX takes the axes as an input instead of an attribute.
    pub axes_input_since: i64,
    /// The value over no elements, and how one more element joins the accumulator (f64).
    pub init: f64,
    pub combine: fn(acc: f64, v: f64) -> f64,
    pub wgsl: ReduceWgsl,
    /// The input's cotangent.
    pub(crate) grad: fn(b: &mut Builder, args: &GradArgs) -> Result<PatchRef>,
}

impl Reduce {
    /// Every reduction dorac knows.
    pub const ALL: &'static [Reduce] = &[
        Reduce::Sum,
        Reduce::SumSquare,
        Reduce::Max,
        Reduce::Min,
        Reduce::Prod,
    ];

    /// The reduction's definition, in its own file.
    pub fn def(self) -> &'static ReduceDef {
        match self {
            Reduce::Sum => &sum::SUM,
            Reduce::SumSquare => &sum_square::SUM_SQUARE,
            Reduce::Max => &max::MAX,
            Reduce::Min => &min::MIN,
            Reduce::Prod => &prod::PROD,
        }
    }

    pub fn name(self) -> &'static str {
        self.def().name
    }

    /// The reduction a node of ONNX type `op_type` computes.
    pub fn from_onnx(op_type: &str) -> Option<Reduce> {
        Reduce::ALL
            .iter()
            .copied()
            .find(|r| r.def().onnx == op_type)
    }
}

/// Max and Min: the cotangent goes to the elements equal to the result, shared evenly among
/// ties (as torch's amax and amin).
fn extreme_grad(b: &mut Builder, g: &GradArgs) -> Result<PatchRef> {
    use crate::ir::{Binary, Op};
    use crate::tensor::DType;
    let xs = b.shape(g.x).to_vec();
    let y = b.reshape(g.n, g.keepdims_shape, g.n, "y_keepdims")?;
    let y = b.add(Op::Expand { shape: xs }, &[y], g.n, "y_spread")?;
    let hit = b.binary(Binary::Equal, g.x, y, g.n, "hit")?;
    let mask = b.add(Op::Cast { to: DType::F32 }, &[hit], g.n, "mask")?;
    let count = b.add(
        Op::Reduce {
            kind: Reduce::Sum,
            axes: g.axes.to_vec(),
            keepdims: true,
        },
        &[mask],
        g.n,
        "ties",
    )?;
    let share = b.binary(Binary::Div, mask, count, g.n, "share")?;
    b.binary(Binary::Mul, g.spread, share, g.n, "extreme")
}

/// NaN wins a max or min (numpy's maximum.reduce); f64::max would drop it.
fn nan_or(acc: f64, v: f64, better: bool) -> f64 {
    if v.is_nan() || better {
        v
    } else {
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reduction_is_listed_once_with_unique_names() {
        for (i, a) in Reduce::ALL.iter().enumerate() {
            assert_eq!(Reduce::from_onnx(a.def().onnx), Some(*a));
            for b in &Reduce::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
                assert_ne!(a.def().onnx, b.def().onnx);
            }
        }
        let max = Reduce::Max.def();
        assert!((max.combine)(1.0, f64::NAN).is_nan() && (max.combine)(f64::NAN, 5.0).is_nan());
    }
}
