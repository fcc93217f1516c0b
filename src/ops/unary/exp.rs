//! Exp.

use super::{Libs, Unary, UnaryDef};

pub const EXP: Unary = Unary::new(&UnaryDef {
    name: "exp",
    onnx: Some("Exp"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-2.0, 2.0),
    eval: f64::exp,
    derivative: f64::exp,
    wgsl: |x, _: &mut Libs| format!("exp({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("exp({x}) * {dy}"),
});
