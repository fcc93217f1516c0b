//! Arctangent.

use super::{Libs, Unary, UnaryDef};

pub const ATAN: Unary = Unary::new(&UnaryDef {
    name: "atan",
    onnx: Some("Atan"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-4.0, 4.0),
    eval: f64::atan,
    derivative: |x| 1.0 / (1.0 + x * x),
    wgsl: |x, _: &mut Libs| format!("atan({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("{dy} / (1.0 + {x} * {x})"),
});
