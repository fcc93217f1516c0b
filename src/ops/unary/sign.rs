//! Sign: -1, 0 or 1 (NaN stays NaN). Piecewise constant: the sample range stays positive (the gradient is 0).

use super::{Libs, Unary, UnaryDef};

pub const SIGN: Unary = Unary::new(&UnaryDef {
    name: "sign",
    onnx: Some("Sign"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (0.5, 3.0),
    eval: |x| {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            x
        }
    },
    derivative: |_| 0.0,
    wgsl: |x, _: &mut Libs| format!("sign({x})"),
    wgsl_grad: |_, dy, _: &mut Libs| format!("0.0 * {dy}"),
});
