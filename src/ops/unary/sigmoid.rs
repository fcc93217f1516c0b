//! Sigmoid: 1 / (1 + e^-x).

use super::{Libs, Unary, UnaryDef};
use crate::codegen::template::Lib;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub const SIGMOID: Unary = Unary::new(&UnaryDef {
    name: "sigmoid",
    onnx: Some("Sigmoid"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (-4.0, 4.0),
    eval: sigmoid,
    derivative: |x| sigmoid(x) * (1.0 - sigmoid(x)),
    wgsl: |x, _: &mut Libs| format!("1.0 / (1.0 + exp(-{x}))"),
    // s (1 - s) loses its relative accuracy in the right tail; the library keeps it.
    wgsl_grad: |x, dy, libs: &mut Libs| {
        libs.insert(Lib::SigmoidGrad);
        format!("sigmoid_grad({x}, {dy})")
    },
});
