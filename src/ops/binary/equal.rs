//! Equal: equality, as a bool (0/1).

use super::{no_grad, truth, wgsl_truth, BinaryDef};

pub const EQUAL: BinaryDef = BinaryDef {
    name: "equal",
    onnx: "Equal",
    onnx_attrs: &[],
    import: true,
    predicate: true,
    eval: |a, b| truth(a == b),
    wgsl: |a, b, _, _| wgsl_truth(format!("{a} == {b}")),
    grad: no_grad,
};
