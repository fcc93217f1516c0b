//! Tan (radians).

use super::{Libs, Unary, UnaryDef};

pub const TAN: Unary = Unary::new(&UnaryDef {
    name: "tan",
    onnx: Some("Tan"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-1.2, 1.2),
    eval: f64::tan,
    derivative: |x| 1.0 / (x.cos() * x.cos()),
    wgsl: |x, _: &mut Libs| format!("tan({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("{dy} / (cos({x}) * cos({x}))"),
});
