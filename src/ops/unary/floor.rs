//! Floor. Piecewise constant: the sample range stays between two integers (the gradient is 0).

use super::{Libs, Unary, UnaryDef};

pub const FLOOR: Unary = Unary::new(&UnaryDef {
    name: "floor",
    onnx: Some("Floor"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (2.05, 2.95),
    eval: f64::floor,
    derivative: |_| 0.0,
    wgsl: |x, _: &mut Libs| format!("floor({x})"),
    wgsl_grad: |_, dy, _: &mut Libs| format!("0.0 * {dy}"),
});
