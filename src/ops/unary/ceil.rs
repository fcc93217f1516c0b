//! Ceiling. Piecewise constant: the sample range stays between two integers (the gradient is 0).

use super::{Libs, Unary, UnaryDef};

pub const CEIL: Unary = Unary::new(&UnaryDef {
    name: "ceil",
    onnx: Some("Ceil"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (2.05, 2.95),
    eval: f64::ceil,
    derivative: |_| 0.0,
    wgsl: |x, _: &mut Libs| format!("ceil({x})"),
    wgsl_grad: |_, dy, _: &mut Libs| format!("0.0 * {dy}"),
});
