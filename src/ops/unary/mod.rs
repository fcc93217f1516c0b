//! Element-wise functions of one input. Each lives in its own file as a [`UnaryDef`]; [`ALL`]
//! lists them. The rest of dorac reads a function only through its definition:
//!
//! - import: an ONNX node whose type is a definition's `onnx` name becomes `Op::Unary`;
//! - export: `Op::Unary` is written as a node of that type;
//! - reference: `eval` (f64), applied element by element, integer results truncated by the
//!   executor when the node's type is an integer;
//! - WGSL: `wgsl` gives the expression of one element (every value is f32 on the device);
//! - autodiff: `Op::UnaryGrad` computes `f'(x) * dy` with `derivative` (reference) and
//!   `wgsl_grad` (device), given x, or f(x) where `grad_reads_output` says so; predicates take
//!   no gradient.
//!
//! Adding a function: a file beside this one (copy `sin.rs`), and its line in the list below.
//! Its kernel test (tests/kernels.rs) and finite-difference check (tests/gradients.rs) iterate
//! over [`ALL`], so they cover it without further code.

mod abs;
mod acos;
mod acosh;
mod asin;
mod asinh;
mod atan;
mod atanh;
mod ceil;
mod cos;
mod cosh;
mod erf;
mod exp;
mod floor;
mod gelu;
mod is_nan;
mod log;
mod neg;
mod not;
mod positive_or_one;
mod reciprocal;
mod relu;
mod round;
mod sigmoid;
mod sign;
mod sin;
mod sinh;
mod sqrt;
mod tan;
mod tanh;

pub use abs::ABS;
pub use acos::ACOS;
pub use acosh::ACOSH;
pub use asin::ASIN;
pub use asinh::ASINH;
pub use atan::ATAN;
pub use atanh::ATANH;
pub use ceil::CEIL;
pub use cos::COS;
pub use cosh::COSH;
pub use erf::ERF;
pub use exp::EXP;
pub use floor::FLOOR;
pub use gelu::{GELU, GELU_TANH};
pub use is_nan::IS_NAN;
pub use log::LOG;
pub use neg::NEG;
pub use not::NOT;
pub use positive_or_one::POSITIVE_OR_ONE;
pub use reciprocal::RECIPROCAL;
pub use relu::RELU;
pub use round::ROUND;
pub use sigmoid::SIGMOID;
pub use sign::SIGN;
pub use sin::SIN;
pub use sinh::SINH;
pub use sqrt::SQRT;
pub use tan::TAN;
pub use tanh::TANH;

/// Every unary function dorac knows.
pub const ALL: &[Unary] = &[
    RELU,
    SIGMOID,
    TANH,
    ERF,
    GELU,
    GELU_TANH,
    SQRT,
    NEG,
    EXP,
    LOG,
    RECIPROCAL,
    NOT,
    IS_NAN,
    SIN,
    COS,
    ABS,
    TAN,
    ASIN,
    ACOS,
    ATAN,
    SINH,
    COSH,
    ASINH,
    ACOSH,
    ATANH,
    FLOOR,
    CEIL,
    ROUND,
    SIGN,
    POSITIVE_OR_ONE,
];

use crate::codegen::template::Lib;
use std::collections::BTreeSet;

/// The WGSL helper libraries a kernel needs: an expression that calls one inserts it.
pub type Libs = BTreeSet<Lib>;

/// Everything dorac knows of one unary function.
pub struct UnaryDef {
    /// Stable IR name: kernel names, messages, IR dumps.
    pub name: &'static str,
    /// The ONNX op type (default domain) imported as this function and exported for it, with no
    /// attributes. None for functions the importer builds from an attributed node (Gelu's
    /// `approximate`), which the exporter writes out by hand.
    pub onnx: Option<&'static str>,
    /// The result is a bool (0/1) whatever the input's type, and takes no gradient.
    pub predicate: bool,
    /// The backward pass gives `derivative` and `wgsl_grad` the function's output f(x) instead
    /// of x. Only for functions whose derivative, written as a function of x, gives the same
    /// value at f(x) (Relu: f(x) > 0 exactly when x > 0). In a network the output is kept
    /// anyway (the next layer reads it), so the input need not stay in memory for backward.
    pub grad_reads_output: bool,
    /// Inputs on which the function is defined and smooth: what kernel tests and
    /// finite-difference checks draw from.
    pub sample_range: (f64, f64),
    /// f(x) in f64, the reference executor's definition.
    pub eval: fn(f64) -> f64,
    /// f'(x) in f64 (0 for predicates and piecewise-constant functions).
    pub derivative: fn(f64) -> f64,
    /// The WGSL expression of f at operand `x` (a plain name: the expression may repeat it).
    pub wgsl: fn(x: &str, libs: &mut Libs) -> String,
    /// The WGSL expression of f'(x) * dy.
    pub wgsl_grad: fn(x: &str, dy: &str, libs: &mut Libs) -> String,
}

/// A unary function: a handle to its definition. Two handles are equal when they name the
/// same function.
#[derive(Clone, Copy)]
pub struct Unary(&'static UnaryDef);

impl Unary {
    pub const fn new(def: &'static UnaryDef) -> Self {
        Unary(def)
    }

    pub fn def(self) -> &'static UnaryDef {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// Functions whose result is a bool whatever the input type.
    pub fn is_predicate(self) -> bool {
        self.0.predicate
    }

    /// The function an attribute-free ONNX node of type `op_type` computes.
    pub fn from_onnx(op_type: &str) -> Option<Unary> {
        ALL.iter().copied().find(|u| u.0.onnx == Some(op_type))
    }

    /// The function of IR name `name`.
    pub fn from_name(name: &str) -> Option<Unary> {
        ALL.iter().copied().find(|u| u.0.name == name)
    }
}

impl PartialEq for Unary {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl std::fmt::Debug for Unary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name)
    }
}

/// A bool result (1.0 or 0.0) of a WGSL condition.
fn truth(cond: String) -> String {
    format!("select(0.0, 1.0, {cond})")
}

/// The derivative of a predicate or a piecewise-constant function.
fn zero(_: f64) -> f64 {
    0.0
}

/// The gradient expression of a function that passes no gradient.
fn no_grad(_: &str, dy: &str, _: &mut Libs) -> String {
    format!("0.0 * {dy}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_onnx_types_are_unique() {
        for (i, a) in ALL.iter().enumerate() {
            for b in &ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
                assert!(a.def().onnx.is_none() || a.def().onnx != b.def().onnx);
            }
        }
        assert_eq!(Unary::from_onnx("Sin"), Some(SIN));
        assert_eq!(Unary::from_onnx("Gelu"), None);
    }
}
