//! ReduceSumSquare: DoRA's frozen column norms `||W0[:, j]||²` without an [in, out] temporary.

use super::{ReduceDef, ReduceWgsl};
use crate::codegen::template;
use crate::ir::Binary;

pub const SUM_SQUARE: ReduceDef = ReduceDef {
    name: "reduce_sum_square",
    onnx: "ReduceSumSquare",
    axes_input_since: 18,
    init: 0.0,
    combine: |acc, v| acc + v * v,
    wgsl: ReduceWgsl {
        template: template::REDUCE_SUM,
        term: "v * v",
        sign: None,
    },
    // d/dx sum(x²) = 2x
    grad: |b, g| {
        let two = b.scalar(2.0, g.n, "two");
        let two_x = b.binary(Binary::Mul, g.x, two, g.n, "two_x")?;
        b.binary(Binary::Mul, g.spread, two_x, g.n, "sum_square")
    },
};
