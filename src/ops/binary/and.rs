//! And: both operands non-zero, as a bool (0/1).

use super::{no_grad, truth, wgsl_truth, BinaryDef};

pub const AND: BinaryDef = BinaryDef {
    name: "and",
    onnx: "And",
    onnx_attrs: &[],
    import: true,
    predicate: true,
    eval: |a, b| truth(a != 0.0 && b != 0.0),
    wgsl: |a, b, _, _| wgsl_truth(format!("{a} != 0.0 && {b} != 0.0")),
    grad: no_grad,
};
