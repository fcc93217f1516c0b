//! Relu: max(x, 0).

use super::{Libs, Unary, UnaryDef};

pub const RELU: Unary = Unary::new(&UnaryDef {
    name: "relu",
    onnx: Some("Relu"),
    predicate: false,
    grad_reads_output: true,
    sample_range: (-2.0, 2.0),
    eval: |x| x.max(0.0),
    derivative: |x| if x > 0.0 { 1.0 } else { 0.0 },
    wgsl: |x, _: &mut Libs| format!("max({x}, 0.0)"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("select(0.0, 1.0, {x} > 0.0) * {dy}"),
});
