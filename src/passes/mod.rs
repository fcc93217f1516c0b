//! Graph-to-graph passes. Each is a set of [`crate::ir::Rule`]s run by the one rewrite driver
//! [`crate::ir::rewrite`], so every pass edits the graph through atomic patches.
//!
//! - [`linear`]: finds the linear layers (MatMul/Gemm with a 2-D weight initializer) and the
//!   PyTorch module names they came from; PEFT-style target matching.
//! - [`adapter_insert`]: rewrites chosen layers into DoRA or LoRA subgraphs.
//! - [`codes`]: `--storage int4|int8`, frozen weights quantized and kept as block codes.
//! - [`dora_norm`]: training's one-op DoRA norm in place of the factored one.
//! - [`fold`]: constant folding through the reference executor (frozen-only work is done once).
//! - [`merge`]: folds adapters back into the base weights.
//! - [`recompute`]: backward readers of cheap activations compute them again from kept values.
//! - [`split`]: cuts constants larger than one device binding into chunks at their readers.
//! - [`transpose`]: moves transposes onto matmul operands and cancels pairs (after autodiff).

pub mod adapter_insert;
pub mod autodiff;
pub mod codes;
pub mod dora_norm;
pub mod fold;
pub mod half;
pub mod linear;
pub mod merge;
pub mod recompute;
pub mod split;
pub mod transpose;

pub use adapter_insert::{base_magnitude, insert_adapters, AdapterInit, AdapterSpec};
pub use codes::store_codes;
pub use dora_norm::fuse_dora_norms;
pub use fold::fold_constants;
pub use half::{store_half, HalfReport};
pub use linear::{find_linear_layers, matches_target, resolve_module, LinearLayer, ModuleMatch};
pub use merge::{effective_weight, in_out_weight, merge_adapters};
pub use recompute::recompute_activations;
pub use split::split_large_constants;
pub use transpose::simplify_transposes;
