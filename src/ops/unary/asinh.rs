//! Inverse hyperbolic sine.

use super::{Libs, Unary, UnaryDef};

pub const ASINH: Unary = Unary::new(&UnaryDef {
    name: "asinh",
    onnx: Some("Asinh"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-4.0, 4.0),
    eval: f64::asinh,
    derivative: |x| 1.0 / (x * x + 1.0).sqrt(),
    wgsl: |x, _: &mut Libs| format!("asinh({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("{dy} / sqrt({x} * {x} + 1.0)"),
});
