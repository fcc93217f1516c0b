//! dorac: a compiler for DoRA fine-tuning.
//!
//! The modules follow the pipeline, and data flows one way through them:
//! [`onnx`] (front end: ONNX protobuf to IR, and back) -> [`ir`] (a petgraph graph of tensor ops) ->
//! [`passes`] (shape-checked rewrites: DoRA/LoRA insertion, constant folding, cleanup) ->
//! [`codegen`] (kernels as groups of IR nodes, rendered to WGSL) -> [`runtime`] (wgpu execution).
//! [`pipeline`] composes the passes, once for inference and once for a training step.
//! [`reference`] is an f64 interpreter of the same IR: the oracle for every kernel and the fallback
//! when no GPU adapter exists. [`adapter`] reads and writes PEFT-format adapters; [`cli`] is the
//! `dorac` command.

pub mod adapter;
pub mod analysis;
pub mod cli;
pub mod codegen;
pub mod error;
pub mod ir;
pub mod onnx;
pub mod ops;
pub mod passes;
pub mod pipeline;
pub mod plot;
pub mod reference;
pub mod runtime;
pub mod tensor;
pub mod tensors_io;
pub mod train;

pub use error::{Error, Result};
