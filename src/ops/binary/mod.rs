//! Element-wise functions of two inputs, with numpy broadcasting. Each lives in its own file as a
//! [`BinaryDef`]; [`Binary::def`] maps the IR's [`Binary`] to it. The rest of dorac reads a
//! function only through its definition:
//!
//! - import: an ONNX node of a definition's `onnx` type (default domain, no attributes) becomes
//!   `Op::Binary` when `import` is set; the others are built by an import builder (variadic
//!   Max/Min, Mod's `fmod` attribute, Greater as Less swapped);
//! - export: `Op::Binary` is written as a node of type `onnx` with `onnx_attrs`;
//! - reference: `eval` (f64) on broadcast operands, integer results truncated by the executor
//!   when the node's type is an integer;
//! - WGSL: `wgsl` gives the expression of one element (every value is f32 on the device; `int`
//!   says the node's type is an integer);
//! - autodiff: `grad` builds the cotangents of both operands at the output's shape, from which
//!   autodiff sums each down to its operand's shape (broadcasting). Predicates take none.
//!
//! Adding a function: a file beside this one (copy `sub.rs`), a variant of [`Binary`] and its
//! line in [`Binary::def`]. Kernel tests (tests/kernels.rs) and finite-difference checks
//! (tests/gradients.rs) iterate over [`Binary::ALL`].

mod add;
mod and;
mod div;
mod equal;
mod less;
mod less_or_equal;
mod max;
mod min;
mod modulo;
mod mul;
mod or;
mod pow;
mod sub;

use crate::error::Result;
use crate::ir::{Op, PatchRef};
use crate::passes::autodiff::Builder;

pub use super::unary::Libs;

/// Element-wise functions of two inputs, with numpy broadcasting. Comparisons and logical ops
/// give bools (0/1); And and Or read their inputs as bools (non-zero is true). ONNX's Greater and
/// GreaterOrEqual are Less and LessOrEqual with the operands swapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    /// Division; on integer values (the node's type is int64) it truncates toward zero, as
    /// ONNX's integer Div does.
    Div,
    Pow,
    Max,
    Min,
    Equal,
    Less,
    LessOrEqual,
    And,
    Or,
    /// Remainder with the sign of the divisor, `x - y * floor(x / y)` (ONNX Mod, fmod = 0;
    /// Python's `%`).
    Mod,
    /// Remainder with the sign of the dividend, `x - y * trunc(x / y)` (ONNX Mod, fmod = 1; C's
    /// `fmod`).
    Fmod,
}

/// The cotangents of both operands, at the output's shape (None where none flows or none is
/// wanted).
pub type Grads = [Option<PatchRef>; 2];

/// What a gradient rule sees: the node `n` = f(x, y), the cotangent `dy` of its output, and
/// which operands need a cotangent.
pub struct GradArgs {
    pub n: PatchRef,
    pub x: PatchRef,
    pub y: PatchRef,
    pub dy: PatchRef,
    pub wanted: [bool; 2],
}

/// Everything dorac knows of one binary function.
pub struct BinaryDef {
    /// Stable IR name: kernel names, messages, IR dumps.
    pub name: &'static str,
    /// The ONNX op type export writes (and import reads, when `import`).
    pub onnx: &'static str,
    /// Integer attributes export writes with it (Mod's `fmod`).
    pub onnx_attrs: &'static [(&'static str, i64)],
    /// An attribute-free ONNX node of type `onnx` imports as this function.
    pub import: bool,
    /// The result is a bool (0/1) whatever the inputs' type, and takes no gradient.
    pub predicate: bool,
    /// f(a, b) in f64, the reference executor's definition.
    pub eval: fn(f64, f64) -> f64,
    /// The WGSL expression of f at operands `a` and `b` (plain names; `int`: integer result).
    pub wgsl: fn(a: &str, b: &str, int: bool, libs: &mut Libs) -> String,
    /// The cotangents of x and y, at the output's shape.
    pub(crate) grad: fn(b: &mut Builder, args: &GradArgs) -> Result<Grads>,
}

impl Binary {
    /// Every binary function dorac knows.
    pub const ALL: &'static [Binary] = &[
        Binary::Add,
        Binary::Sub,
        Binary::Mul,
        Binary::Div,
        Binary::Pow,
        Binary::Max,
        Binary::Min,
        Binary::Equal,
        Binary::Less,
        Binary::LessOrEqual,
        Binary::And,
        Binary::Or,
        Binary::Mod,
        Binary::Fmod,
    ];

    /// The function's definition, in its own file.
    pub fn def(self) -> &'static BinaryDef {
        match self {
            Binary::Add => &add::ADD,
            Binary::Sub => &sub::SUB,
            Binary::Mul => &mul::MUL,
            Binary::Div => &div::DIV,
            Binary::Pow => &pow::POW,
            Binary::Max => &max::MAX,
            Binary::Min => &min::MIN,
            Binary::Equal => &equal::EQUAL,
            Binary::Less => &less::LESS,
            Binary::LessOrEqual => &less_or_equal::LESS_OR_EQUAL,
            Binary::And => &and::AND,
            Binary::Or => &or::OR,
            Binary::Mod => &modulo::MOD,
            Binary::Fmod => &modulo::FMOD,
        }
    }

    pub fn name(self) -> &'static str {
        self.def().name
    }

    /// Functions whose result is a bool whatever the inputs' type.
    pub fn is_predicate(self) -> bool {
        self.def().predicate
    }

    /// The function an attribute-free ONNX node of type `op_type` computes.
    pub fn from_onnx(op_type: &str) -> Option<Binary> {
        Binary::ALL
            .iter()
            .copied()
            .find(|b| b.def().import && b.def().onnx == op_type)
    }
}

/// A bool result (1.0 or 0.0) of a condition, in f64 and in WGSL.
fn truth(cond: bool) -> f64 {
    if cond {
        1.0
    } else {
        0.0
    }
}

fn wgsl_truth(cond: String) -> String {
    format!("select(0.0, 1.0, {cond})")
}

/// The gradient rule of a predicate: nothing flows.
fn no_grad(_: &mut Builder, _: &GradArgs) -> Result<Grads> {
    Ok([None, None])
}

/// Max and Min: the cotangent goes to the operand that was chosen (x on ties), where `chosen`
/// is the bool "x was chosen".
fn chosen_grad(b: &mut Builder, g: &GradArgs, chosen: PatchRef) -> Result<Grads> {
    let zero = b.scalar(0.0, g.n, "zero");
    let dx = match g.wanted[0] {
        true => Some(b.add(Op::Where, &[chosen, g.dy, zero], g.n, "dx")?),
        false => None,
    };
    let dy = match g.wanted[1] {
        true => Some(b.add(Op::Where, &[chosen, zero, g.dy], g.n, "dy")?),
        false => None,
    };
    Ok([dx, dy])
}

/// NaN-keeping max/min in WGSL (WGSL's may drop a NaN operand; torch and the reference keep it).
fn wgsl_nan_keeping(f: &str, a: &str, b: &str, libs: &mut Libs) -> String {
    libs.insert(crate::codegen::template::Lib::IsNan);
    format!("select({f}({a}, {b}), {a} + {b}, is_nan_f32({a}) || is_nan_f32({b}))")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_function_is_listed_once_with_unique_names() {
        for (i, a) in Binary::ALL.iter().enumerate() {
            for b in &Binary::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
                assert!(!(a.def().import && b.def().import && a.def().onnx == b.def().onnx));
            }
        }
        assert_eq!(Binary::from_onnx("Add"), Some(Binary::Add));
        // Max and Min are variadic in ONNX: a builder imports them.
        assert_eq!(Binary::from_onnx("Max"), None);
    }
}
