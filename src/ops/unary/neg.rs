//! Neg: -x.

use super::{Libs, Unary, UnaryDef};

pub const NEG: Unary = Unary::new(&UnaryDef {
    name: "neg",
    onnx: Some("Neg"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-1.0, 1.0),
    eval: |x| -x,
    derivative: |_| -1.0,
    wgsl: |x, _: &mut Libs| format!("-{x}"),
    wgsl_grad: |_, dy, _: &mut Libs| format!("-{dy}"),
});
