//! Sub: a - b.

use super::{BinaryDef, GradArgs};
use crate::ir::{unary, Op};

pub const SUB: BinaryDef = BinaryDef {
    name: "sub",
    onnx: "Sub",
    onnx_attrs: &[],
    import: true,
    predicate: false,
    eval: |a, b| a - b,
    wgsl: |a, b, _, _| format!("{a} - {b}"),
    grad: |b, g: &GradArgs| {
        let dy = match g.wanted[1] {
            true => Some(b.add(Op::Unary(unary::NEG), &[g.dy], g.n, "neg")?),
            false => None,
        };
        Ok([Some(g.dy), dy])
    },
};
