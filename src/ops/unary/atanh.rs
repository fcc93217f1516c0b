//! Inverse hyperbolic tangent, on (-1, 1).

use super::{Libs, Unary, UnaryDef};

pub const ATANH: Unary = Unary::new(&UnaryDef {
    name: "atanh",
    onnx: Some("Atanh"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-0.9, 0.9),
    eval: f64::atanh,
    derivative: |x| 1.0 / (1.0 - x * x),
    wgsl: |x, _: &mut Libs| format!("atanh({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("{dy} / (1.0 - {x} * {x})"),
});
