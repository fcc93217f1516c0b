//! Tanh.

use super::{Libs, Unary, UnaryDef};
use crate::codegen::template::Lib;

pub const TANH: Unary = Unary::new(&UnaryDef {
    name: "tanh",
    onnx: Some("Tanh"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-3.0, 3.0),
    eval: f64::tanh,
    derivative: |x| 1.0 - x.tanh().powi(2),
    // The builtin may overflow to NaN for large |x| (see shaders/lib/tanh.wgsl).
    wgsl: |x, libs: &mut Libs| {
        libs.insert(Lib::Tanh);
        format!("tanh_f32({x})")
    },
    wgsl_grad: |x, dy, libs: &mut Libs| {
        libs.insert(Lib::TanhGrad);
        format!("tanh_grad({x}, {dy})")
    },
});
