//! Pow: a^b. An integer base gives an integer (ONNX: the result has the base's type), computed
//! exactly on the device by squaring (`shaders/lib/pow_int.wgsl`); float powers follow
//! `shaders/lib/pow.wgsl` (negative bases with integral exponents, as C's pow).

use super::{Binary, BinaryDef, GradArgs};
use crate::codegen::template::Lib;
use crate::ir::{unary, Op};

pub const POW: BinaryDef = BinaryDef {
    name: "pow",
    onnx: "Pow",
    onnx_attrs: &[],
    import: true,
    predicate: false,
    eval: f64::powf,
    wgsl: |a, b, int, libs| {
        libs.insert(Lib::Pow);
        if int {
            libs.insert(Lib::PowInt);
            format!("pow_int_f32({a}, {b})")
        } else {
            format!("pow_f32({a}, {b})")
        }
    },
    grad: |b, g: &GradArgs| {
        let dx = match g.wanted[0] {
            // y * x^(y-1)
            true => {
                let one = b.scalar(1.0, g.n, "one");
                let ym1 = b.binary(Binary::Sub, g.y, one, g.n, "exp_minus_one")?;
                let p = b.binary(Binary::Pow, g.x, ym1, g.n, "pow")?;
                let d = b.binary(Binary::Mul, p, g.y, g.n, "deriv")?;
                Some(b.binary(Binary::Mul, g.dy, d, g.n, "dx")?)
            }
            false => None,
        };
        let dy = match g.wanted[1] {
            // x^y * ln x
            true => {
                let ln = b.add(Op::Unary(unary::LOG), &[g.x], g.n, "ln")?;
                let d = b.binary(Binary::Mul, g.n, ln, g.n, "deriv_exp")?;
                Some(b.binary(Binary::Mul, g.dy, d, g.n, "dy")?)
            }
            false => None,
        };
        Ok([dx, dy])
    },
};
