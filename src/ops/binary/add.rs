//! Add: a + b.

use super::{BinaryDef, GradArgs};

pub const ADD: BinaryDef = BinaryDef {
    name: "add",
    onnx: "Add",
    onnx_attrs: &[],
    import: true,
    predicate: false,
    eval: |a, b| a + b,
    wgsl: |a, b, _, _| format!("{a} + {b}"),
    grad: |_, g: &GradArgs| Ok([Some(g.dy), Some(g.dy)]),
};
