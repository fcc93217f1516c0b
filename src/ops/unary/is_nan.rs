//! IsNaN: 1 where the input is NaN, else 0 (a bool).

use super::{no_grad, truth, zero, Libs, Unary, UnaryDef};
use crate::codegen::template::Lib;

pub const IS_NAN: Unary = Unary::new(&UnaryDef {
    name: "is_nan",
    onnx: Some("IsNaN"),
    predicate: true,
    grad_reads_output: false,
    sample_range: (-1.0, 1.0),
    eval: |x| if x.is_nan() { 1.0 } else { 0.0 },
    derivative: zero,
    // A compiler may assume `x != x` false; the library tests the bits.
    wgsl: |x, libs: &mut Libs| {
        libs.insert(Lib::IsNan);
        truth(format!("is_nan_f32({x})"))
    },
    wgsl_grad: no_grad,
});
