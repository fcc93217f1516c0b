//! Mul: a * b.

use super::{Binary, BinaryDef, GradArgs};

pub const MUL: BinaryDef = BinaryDef {
    name: "mul",
    onnx: "Mul",
    onnx_attrs: &[],
    import: true,
    predicate: false,
    eval: |a, b| a * b,
    wgsl: |a, b, _, _| format!("{a} * {b}"),
    grad: |b, g: &GradArgs| {
        let dx = match g.wanted[0] {
            true => Some(b.binary(Binary::Mul, g.dy, g.y, g.n, "dx")?),
            false => None,
        };
        let dy = match g.wanted[1] {
            true => Some(b.binary(Binary::Mul, g.dy, g.x, g.n, "dy")?),
            false => None,
        };
        Ok([dx, dy])
    },
};
