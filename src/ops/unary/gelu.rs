//! ONNX Gelu (opset 20): the exact form `0.5 x (1 + erf(x / sqrt 2))` and the tanh
//! approximation (`approximate = "tanh"`). Both come from one attributed ONNX node, so the
//! importer's `gelu` builder picks the function and the exporter writes them out as their
//! decomposition (older opsets have no Gelu).

use super::{Libs, Unary, UnaryDef};
use crate::codegen::template::Lib;
use std::f64::consts::{PI, SQRT_2};

/// sqrt(2 / pi), the tanh form's scale.
fn tanh_scale() -> f64 {
    (2.0 / PI).sqrt()
}

pub const GELU: Unary = Unary::new(&UnaryDef {
    name: "gelu",
    onnx: None,
    predicate: false,
    grad_reads_output: false,
    sample_range: (-3.0, 3.0),
    eval: |x| 0.5 * x * (1.0 + libm::erf(x / SQRT_2)),
    derivative: |x| {
        0.5 * (1.0 + libm::erf(x / SQRT_2)) + x * (-0.5 * x * x).exp() / (2.0 * PI).sqrt()
    },
    // Written with erfc, which keeps its relative accuracy in the left tail where 1 + erf
    // cancels.
    wgsl: |x, libs: &mut Libs| {
        libs.insert(Lib::Erf);
        format!("0.5 * {x} * erfc_f32(-{x} * 0.7071067812)")
    },
    wgsl_grad: |x, dy, libs: &mut Libs| {
        libs.insert(Lib::Erf);
        libs.insert(Lib::GeluGrad);
        format!("gelu_grad({x}, {dy})")
    },
});

pub const GELU_TANH: Unary = Unary::new(&UnaryDef {
    name: "gelu_tanh",
    onnx: None,
    predicate: false,
    grad_reads_output: false,
    sample_range: (-3.0, 3.0),
    eval: |x| 0.5 * x * (1.0 + (tanh_scale() * (x + 0.044715 * x * x * x)).tanh()),
    derivative: |x| {
        let c = tanh_scale();
        let t = (c * (x + 0.044715 * x * x * x)).tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
    },
    wgsl: |x, libs: &mut Libs| {
        libs.insert(Lib::Tanh);
        format!("0.5 * {x} * (1.0 + tanh_f32(0.7978845608 * ({x} + 0.044715 * {x} * {x} * {x})))")
    },
    wgsl_grad: |x, dy, libs: &mut Libs| {
        libs.insert(Lib::GeluTanhGrad);
        format!("gelu_tanh_grad({x}, {dy})")
    },
});
