//! Arccosine, on [-1, 1]. WGSL's acos is only good to about 1e-4 on some drivers (lavapipe), so
//! the kernel takes atan2(sqrt((1 - x)(1 + x)), x).

use super::{Libs, Unary, UnaryDef};

pub const ACOS: Unary = Unary::new(&UnaryDef {
    name: "acos",
    onnx: Some("Acos"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-0.9, 0.9),
    eval: f64::acos,
    derivative: |x| -1.0 / (1.0 - x * x).sqrt(),
    wgsl: |x, _: &mut Libs| format!("atan2(sqrt((1.0 - {x}) * (1.0 + {x})), {x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("-{dy} / sqrt(1.0 - {x} * {x})"),
});
