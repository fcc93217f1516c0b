//! Sqrt.

use super::{Libs, Unary, UnaryDef};

pub const SQRT: Unary = Unary::new(&UnaryDef {
    name: "sqrt",
    onnx: Some("Sqrt"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (0.5, 3.0),
    eval: f64::sqrt,
    derivative: |x| 0.5 / x.sqrt(),
    wgsl: |x, _: &mut Libs| format!("sqrt({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("0.5 / sqrt({x}) * {dy}"),
});
