//! One error type for the whole pipeline. Every variant carries enough context (file, node, tensor)
//! for a user to find the problem without a backtrace: the CLI prints `error: {self}` and exits 1.

use std::path::PathBuf;

/// Everything that can go wrong between reading a model and writing results.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed ONNX model (truncated, not protobuf, missing pieces).
    #[error("{0}")]
    Onnx(String),
    /// The model uses ops dorac does not implement; one entry per op type with its node names.
    #[error("unsupported ONNX ops: {}", .0.join("; "))]
    Unsupported(Vec<String>),
    /// Shapes that do not fit together, named by node.
    #[error("shape error: {0}")]
    Shape(String),
    /// The graph itself is malformed (cycle, dangling reference).
    #[error("graph error: {0}")]
    Graph(String),
    /// User input (tensors, flags, adapters) that does not match the model.
    #[error("{0}")]
    Input(String),
    /// GPU setup, shader validation or execution failure.
    #[error("gpu: {0}")]
    Gpu(String),
    /// No GPU adapter on this machine (for the backends asked for): the one GPU failure the
    /// commands answer by falling back to the reference executor.
    #[error(
        "gpu: no GPU adapter found ({backends}: {reason}); {}",
        crate::runtime::INSTALL_HINT
    )]
    NoAdapter { backends: String, reason: String },
    /// A tensor larger than the memory budget (`tensor::memory_budget`), refused before it
    /// was allocated.
    #[error("{what}: shape {shape} needs {} bytes, over the memory budget of {budget} bytes (set DORAC_MEMORY_BUDGET to change it)", bytes.map_or("more than 2^128".to_string(), |b| b.to_string()))]
    TooLarge {
        what: String,
        shape: String,
        bytes: Option<u128>,
        budget: u64,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Early-return with an [`Error`] variant and a formatted message.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$kind(format!($($arg)*)))
    };
}
