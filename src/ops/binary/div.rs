//! Div: a / b; on integers (the node's type is int64) it truncates toward zero, as ONNX's
//! integer Div does (the reference executor truncates integer results).

use super::{Binary, BinaryDef, GradArgs};
use crate::ir::{unary, Op};

pub const DIV: BinaryDef = BinaryDef {
    name: "div",
    onnx: "Div",
    onnx_attrs: &[],
    import: true,
    predicate: false,
    eval: |a, b| a / b,
    // i32 division truncates, exactly, for the ids and sizes an f32 holds exactly.
    wgsl: |a, b, int, _| match int {
        true => format!("f32(i32({a}) / i32({b}))"),
        false => format!("{a} / {b}"),
    },
    grad: |b, g: &GradArgs| {
        let dx = match g.wanted[0] {
            true => Some(b.binary(Binary::Div, g.dy, g.y, g.n, "dx")?),
            false => None,
        };
        let dy = match g.wanted[1] {
            // d(x/y)/dy = -(x/y)/y
            true => {
                let q = b.binary(Binary::Div, g.n, g.y, g.n, "q_over_y")?;
                let t = b.binary(Binary::Mul, g.dy, q, g.n, "dy_q")?;
                Some(b.add(Op::Unary(unary::NEG), &[t], g.n, "dy")?)
            }
            false => None,
        };
        Ok([dx, dy])
    },
};
