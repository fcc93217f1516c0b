//! ReduceMin: NaN if any element is NaN, +inf over no elements (the max kernel on negated terms).

use super::{extreme_grad, nan_or, ReduceDef, ReduceWgsl};
use crate::codegen::template;

pub const MIN: ReduceDef = ReduceDef {
    name: "reduce_min",
    onnx: "ReduceMin",
    axes_input_since: 18,
    init: f64::INFINITY,
    combine: |acc, v| nan_or(acc, v, v < acc),
    wgsl: ReduceWgsl {
        template: template::REDUCE_MAX,
        term: "v",
        sign: Some("-1.0"),
    },
    grad: extreme_grad,
};
