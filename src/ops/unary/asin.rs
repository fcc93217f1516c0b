//! Arcsine, on [-1, 1]. WGSL's asin is only good to about 3e-4 on some drivers (lavapipe), so
//! the kernel takes atan2(x, sqrt((1 - x)(1 + x))).

use super::{Libs, Unary, UnaryDef};

pub const ASIN: Unary = Unary::new(&UnaryDef {
    name: "asin",
    onnx: Some("Asin"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-0.9, 0.9),
    eval: f64::asin,
    derivative: |x| 1.0 / (1.0 - x * x).sqrt(),
    wgsl: |x, _: &mut Libs| format!("atan2({x}, sqrt((1.0 - {x}) * (1.0 + {x})))"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("{dy} / sqrt(1.0 - {x} * {x})"),
});
