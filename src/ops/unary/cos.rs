//! Cos (radians); see `sin.rs`.

use super::{Libs, Unary, UnaryDef};

pub const COS: Unary = Unary::new(&UnaryDef {
    name: "cos",
    onnx: Some("Cos"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-4.0, 4.0),
    eval: f64::cos,
    derivative: |x| -x.sin(),
    wgsl: |x, _: &mut Libs| format!("cos({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("-sin({x}) * {dy}"),
});
