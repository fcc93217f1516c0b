//! Op definitions that live in one place each: for every op of a family, one file holds what
//! every layer of the pipeline needs to know of it (its ONNX name for import and export, its
//! result type, its f64 reference, its WGSL expression and its derivative), and the family's
//! `mod.rs` holds the one list the importer, exporter, reference, code generator and autodiff
//! all read. Adding an op of a family is one file plus its line in that list.
//!
//! - [`unary`]: element-wise functions of one input (Relu, Sin, Abs, ...).
//! - [`binary`]: element-wise functions of two inputs with broadcasting (Add, Pow, Less, Mod...).
//! - [`reduce`]: reductions over axes (ReduceSum, ReduceSumSquare, ReduceMax, ReduceMin, ReduceProd).
//! - [`dora_norm`]: DoRA's column norms of `W0 + s (BA)ᵀ` in one op (training's fused norm).

pub mod binary;
pub mod dora_norm;
pub mod reduce;
pub mod unary;

pub use binary::Binary;
pub use dora_norm::DoraNorm;
pub use reduce::Reduce;
pub use unary::Unary;
