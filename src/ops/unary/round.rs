//! Round to the nearest integer, ties to even (ONNX; WGSL's round). Piecewise constant: the sample range avoids the jumps (the gradient is 0).

use super::{Libs, Unary, UnaryDef};

pub const ROUND: Unary = Unary::new(&UnaryDef {
    name: "round",
    onnx: Some("Round"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (2.05, 2.45),
    eval: f64::round_ties_even,
    derivative: |_| 0.0,
    wgsl: |x, _: &mut Libs| format!("round({x})"),
    wgsl_grad: |_, dy, _: &mut Libs| format!("0.0 * {dy}"),
});
