//! LessOrEqual: a <= b (ONNX's GreaterOrEqual is this with the operands swapped), as a bool (0/1).

use super::{no_grad, truth, wgsl_truth, BinaryDef};

pub const LESS_OR_EQUAL: BinaryDef = BinaryDef {
    name: "less_or_equal",
    onnx: "LessOrEqual",
    onnx_attrs: &[],
    import: true,
    predicate: true,
    eval: |a, b| truth(a <= b),
    wgsl: |a, b, _, _| wgsl_truth(format!("{a} <= {b}")),
    grad: no_grad,
};
