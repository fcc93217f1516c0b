//! Inverse hyperbolic cosine, on [1, inf).

use super::{Libs, Unary, UnaryDef};

pub const ACOSH: Unary = Unary::new(&UnaryDef {
    name: "acosh",
    onnx: Some("Acosh"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (1.1, 4.0),
    eval: f64::acosh,
    derivative: |x| 1.0 / (x * x - 1.0).sqrt(),
    wgsl: |x, _: &mut Libs| format!("acosh({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("{dy} / sqrt({x} * {x} - 1.0)"),
});
