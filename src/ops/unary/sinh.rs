//! Hyperbolic sine.

use super::{Libs, Unary, UnaryDef};

pub const SINH: Unary = Unary::new(&UnaryDef {
    name: "sinh",
    onnx: Some("Sinh"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-3.0, 3.0),
    eval: f64::sinh,
    derivative: f64::cosh,
    wgsl: |x, _: &mut Libs| format!("sinh({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("cosh({x}) * {dy}"),
});
