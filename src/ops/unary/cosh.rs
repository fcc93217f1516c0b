//! Hyperbolic cosine.

use super::{Libs, Unary, UnaryDef};

pub const COSH: Unary = Unary::new(&UnaryDef {
    name: "cosh",
    onnx: Some("Cosh"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-3.0, 3.0),
    eval: f64::cosh,
    derivative: f64::sinh,
    wgsl: |x, _: &mut Libs| format!("cosh({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("sinh({x}) * {dy}"),
});
