//! ONNX Mod: `fmod = 0` is [`MOD`] (the remainder takes the divisor's sign, Python's `%`),
//! `fmod = 1` is [`FMOD`] (the dividend's sign, C's `fmod`). The import builder reads the
//! attribute (`onnx::import_ops::lowered::modulo`).

use super::{Binary, BinaryDef, GradArgs, Grads};
use crate::error::Result;
use crate::ir::{unary, Op};
use crate::passes::autodiff::Builder;

pub const MOD: BinaryDef = BinaryDef {
    name: "mod",
    onnx: "Mod",
    onnx_attrs: &[],
    import: false,
    predicate: false,
    eval: |a, b| {
        // f64 `%` is C's fmod (exact); a remainder whose sign differs from the divisor's moves
        // by one divisor.
        let r = a % b;
        if r != 0.0 && (r < 0.0) != (b < 0.0) {
            r + b
        } else {
            r
        }
    },
    wgsl: |a, b, int, _| {
        let r = remainder(a, b, int);
        format!("select({r}, {r} + {b}, {r} != 0.0 && (({r} < 0.0) != ({b} < 0.0)))")
    },
    grad: remainder_grad,
};

pub const FMOD: BinaryDef = BinaryDef {
    name: "fmod",
    onnx: "Mod",
    onnx_attrs: &[("fmod", 1)],
    import: false,
    predicate: false,
    eval: |a, b| a % b,
    wgsl: |a, b, int, _| remainder(a, b, int),
    grad: remainder_grad,
};

/// The truncated remainder in WGSL: i32 arithmetic for integers (exact for the integers an f32
/// holds); for floats WGSL's f32 `%` (x - y * trunc(x / y)), except that a finite x modulo an
/// infinite y is x, as C's fmod says (the formula gives NaN).
fn remainder(a: &str, b: &str, int: bool) -> String {
    if int {
        format!("f32(i32({a}) % i32({b}))")
    } else {
        format!("select({a} % {b}, {a}, abs({b}) > 3.40282347e38 && abs({a}) <= 3.40282347e38)")
    }
}

/// d/dx (x mod y) = 1 and d/dy = -floor(x / y) (or -trunc): (x - r) / y is that quotient, from
/// the result itself.
fn remainder_grad(b: &mut Builder, g: &GradArgs) -> Result<Grads> {
    let dy = match g.wanted[1] {
        true => {
            let d = b.binary(Binary::Sub, g.x, g.n, g.n, "x_minus_r")?;
            let q = b.binary(Binary::Div, d, g.y, g.n, "quotient")?;
            let t = b.binary(Binary::Mul, g.dy, q, g.n, "dy_q")?;
            Some(b.add(Op::Unary(unary::NEG), &[t], g.n, "dy")?)
        }
        false => None,
    };
    Ok([Some(g.dy), dy])
}
