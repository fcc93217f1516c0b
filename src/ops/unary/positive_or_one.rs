//! `x > 0 ? x : 1`: DoRA's squared column norm made safe to divide by. A column of norm zero (a
//! pruned neuron) has no direction; with its norm read as 1 the magnitude scale stays finite, and
//! so does every gradient (the square root is never differentiated at 0). ONNX has no such op:
//! export writes it as `Where(Less(0, x), x, 1)`.

use super::{Libs, Unary, UnaryDef};

pub const POSITIVE_OR_ONE: Unary = Unary::new(&UnaryDef {
    name: "positive_or_one",
    onnx: None,
    predicate: false,
    grad_reads_output: false,
    sample_range: (-2.0, 2.0),
    eval: |x| if x > 0.0 { x } else { 1.0 },
    derivative: |x| if x > 0.0 { 1.0 } else { 0.0 },
    wgsl: |x, _: &mut Libs| format!("select(1.0, {x}, {x} > 0.0)"),
    wgsl_grad: |x, dy, _: &mut Libs| format!("select(0.0, 1.0, {x} > 0.0) * {dy}"),
});
