//! ReduceMax: NaN if any element is NaN, -inf over no elements.

use super::{extreme_grad, nan_or, ReduceDef, ReduceWgsl};
use crate::codegen::template;

pub const MAX: ReduceDef = ReduceDef {
    name: "reduce_max",
    onnx: "ReduceMax",
    axes_input_since: 18,
    init: f64::NEG_INFINITY,
    combine: |acc, v| nan_or(acc, v, v > acc),
    wgsl: ReduceWgsl {
        template: template::REDUCE_MAX,
        term: "v",
        sign: Some("1.0"),
    },
    grad: extreme_grad,
};
