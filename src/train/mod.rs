//! Training: compiles one whole step (forward, loss, backward, optimizer update) into a single
//! graph whose parameters and optimizer state are persistent device state, then drives it.
//!
//! - [`program`]: builds the step graph from an adapted model (losses in [`loss`], AdamW in
//!   [`optimizer`], gradients by [`crate::passes::autodiff`]).
//! - [`session`]: runs steps on the GPU (or the reference executor), reads parameters back.
//! - [`data`]: the data set, batches and their order.
//! - [`eval`]: loss and accuracy over a data set, with the current parameters.
//! - [`checkpoint`]: PEFT adapter plus optimizer state, written atomically; resume.
//! - [`report`]: progress bar, metrics log, loss-curve PNG.

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod loss;
pub mod optimizer;
pub mod program;
pub mod report;
pub mod session;

pub use loss::LossKind;
pub use optimizer::{AdamW, Schedule};
pub use program::{build, build_for_device, BuildOptions, Param, ParamRole, Program, TrainMethod};
pub use session::Session;
