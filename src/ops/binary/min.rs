//! Min of two (ONNX's variadic Min is a chain of these, built at import). NaN propagates, as in
//! torch.minimum.

use super::{chosen_grad, wgsl_nan_keeping, Binary, BinaryDef, GradArgs};

pub const MIN: BinaryDef = BinaryDef {
    name: "min",
    onnx: "Min",
    onnx_attrs: &[],
    import: false,
    predicate: false,
    eval: |a, b| {
        if a.is_nan() || b.is_nan() {
            f64::NAN
        } else {
            a.min(b)
        }
    },
    wgsl: |a, b, _, libs| wgsl_nan_keeping("min", a, b, libs),
    grad: |b, g: &GradArgs| {
        let chosen = b.binary(Binary::LessOrEqual, g.x, g.y, g.n, "x_chosen")?;
        chosen_grad(b, g, chosen)
    },
};
