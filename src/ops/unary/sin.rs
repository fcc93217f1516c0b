//! Sin (radians). In transformers' exports it acts on the rotary-embedding table, a constant
//! that folds at import; the kernel serves graphs where it is real work.

use super::{Libs, Unary, UnaryDef};

pub const SIN: Unary = Unary::new(&UnaryDef {
    name: "sin",
    onnx: Some("Sin"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-4.0, 4.0),
    eval: f64::sin,
    derivative: f64::cos,
    wgsl: |x, _: &mut Libs| format!("sin({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("cos({x}) * {dy}"),
});
