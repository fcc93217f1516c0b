//! Max of two (ONNX's variadic Max is a chain of these, built at import). NaN propagates, as in
//! torch.maximum.

use super::{chosen_grad, wgsl_nan_keeping, Binary, BinaryDef, GradArgs};

pub const MAX: BinaryDef = BinaryDef {
    name: "max",
    onnx: "Max",
    onnx_attrs: &[],
    import: false,
    predicate: false,
    eval: |a, b| {
        if a.is_nan() || b.is_nan() {
            f64::NAN
        } else {
            a.max(b)
        }
    },
    wgsl: |a, b, _, libs| wgsl_nan_keeping("max", a, b, libs),
    grad: |b, g: &GradArgs| {
        let chosen = b.binary(Binary::LessOrEqual, g.y, g.x, g.n, "x_chosen")?;
        chosen_grad(b, g, chosen)
    },
};
