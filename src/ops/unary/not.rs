//! Not: logical negation of a bool (0/1) value.

use super::{no_grad, truth, zero, Libs, Unary, UnaryDef};

pub const NOT: Unary = Unary::new(&UnaryDef {
    name: "not",
    onnx: Some("Not"),
    predicate: true,
    grad_reads_output: false,
    sample_range: (-1.0, 1.0),
    eval: |x| if x == 0.0 { 1.0 } else { 0.0 },
    derivative: zero,
    wgsl: |x, _: &mut Libs| truth(format!("{x} == 0.0")),
    wgsl_grad: no_grad,
});
