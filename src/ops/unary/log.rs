//! Log, the natural logarithm.

use super::{Libs, Unary, UnaryDef};

pub const LOG: Unary = Unary::new(&UnaryDef {
    name: "log",
    onnx: Some("Log"),
    predicate: false,
    grad_reads_output: false,
    sample_range: (0.5, 3.0),
    eval: f64::ln,
    derivative: |x| 1.0 / x,
    wgsl: |x, _: &mut Libs| format!("log({x})"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("{dy} / {x}"),
});
