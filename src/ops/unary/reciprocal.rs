//! Reciprocal: 1 / x.

use super::{Libs, Unary, UnaryDef};

pub const RECIPROCAL: Unary = Unary::new(&UnaryDef {
    name: "reciprocal",
    onnx: Some("Reciprocal"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (0.5, 3.0),
    eval: |x| 1.0 / x,
    derivative: |x| -1.0 / (x * x),
    wgsl: |x, _: &mut Libs| format!("1.0 / {x}"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("-{dy} / ({x} * {x})"),
});
