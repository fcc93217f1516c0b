//! ReduceProd: 1 over no elements. No gradient yet: d/dx_i is the product of the other elements,
//! and y / x_i fails at zeros.

use super::{ReduceDef, ReduceWgsl};
use crate::codegen::template;
use crate::error::{Error, Subject};

pub const PROD: ReduceDef = ReduceDef {
    name: "reduce_prod",
    onnx: "ReduceProd",
    axes_input_since: 18,
    init: 1.0,
    combine: |acc, v| acc * v,
    wgsl: ReduceWgsl {
        template: template::REDUCE_PROD,
        term: "v",
        sign: None,
    },
    grad: |b, g| {
        Err(Error::graph_at(
            Subject::named("node", b.label(g.n)),
            "the gradient of a product reduction is not supported",
        ))
    },
};
