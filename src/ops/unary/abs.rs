//! Abs: |x|, of floats and integers (T5's relative position buckets). Its derivative is the
//! sign, 0 at 0 as in PyTorch.

use super::{Libs, Unary, UnaryDef};

pub const ABS: Unary = Unary::new(&UnaryDef {
    name: "abs",
    onnx: Some("Abs"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-2.0, 2.0),
    eval: f64::abs,
    derivative: |x| {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    },
    wgsl: |x, _: &mut Libs| format!("abs({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("sign({x}) * {dy}"),
});
