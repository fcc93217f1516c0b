//! ReduceSum.

use super::{ReduceDef, ReduceWgsl};
use crate::codegen::template;

pub const SUM: ReduceDef = ReduceDef {
    name: "reduce_sum",
    onnx: "ReduceSum",
    axes_input_since: 13,
    init: 0.0,
    combine: |acc, v| acc + v,
    wgsl: ReduceWgsl {
        template: template::REDUCE_SUM,
        term: "v",
        sign: None,
    },
    grad: |_, g| Ok(g.spread),
};
