//! Erf, the Gauss error function (GELU's exact form as PyTorch exports it).

use super::{Libs, Unary, UnaryDef};
use crate::codegen::template::Lib;

pub const ERF: Unary = Unary::new(&UnaryDef {
    name: "erf",
    onnx: Some("Erf"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-2.0, 2.0),
    eval: libm::erf,
    derivative: |x| 2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp(),
    wgsl: |x, libs: &mut Libs| {
        libs.insert(Lib::Erf);
        format!("erf_f32({x})")
    },
    // 2 / sqrt(pi) exp(-x^2)
    wgsl_grad: |x, dy, _: &mut Libs| format!("1.1283791671 * exp(-{x} * {x}) * {dy}"),
});
