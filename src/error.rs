//! One error type for the whole pipeline. Every variant carries enough context (file, node, tensor)
//! for a user to find the problem without a backtrace: the CLI prints `error: {self}` and exits 1.

use std::fmt;
use std::path::{Path, PathBuf};

/// What an error is about, as a user would look for it: the file, the flag, or the named node,
/// tensor or module. Callers that handle errors read it instead of the message.
#[derive(Clone, Debug, PartialEq)]
pub enum Subject {
    File(PathBuf),
    /// A command-line flag, with the value given to it when that is the problem.
    Flag {
        flag: String,
        value: Option<String>,
    },
    /// A named piece of a model or adapter: `kind` says which (node, input, output, tensor,
    /// initializer, parameter, module, layer, metadata, value).
    Named {
        kind: &'static str,
        name: String,
    },
    /// An ONNX node, with its op type.
    OnnxNode {
        name: String,
        op_type: String,
    },
    /// A description the caller built (`model 'x.onnx'`, `initializer 'w'`).
    Context(String),
}

impl Subject {
    pub fn file(path: impl AsRef<Path>) -> Self {
        Subject::File(path.as_ref().to_path_buf())
    }

    pub fn flag(flag: &str) -> Self {
        Subject::Flag {
            flag: flag.into(),
            value: None,
        }
    }

    pub fn flag_value(flag: &str, value: impl fmt::Display) -> Self {
        Subject::Flag {
            flag: flag.into(),
            value: Some(value.to_string()),
        }
    }

    pub fn named(kind: &'static str, name: impl fmt::Display) -> Self {
        Subject::Named {
            kind,
            name: name.to_string(),
        }
    }

    pub fn node(name: impl fmt::Display) -> Self {
        Subject::named("node", &name)
    }

    pub fn context(text: impl fmt::Display) -> Self {
        Subject::Context(text.to_string())
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Subject::File(p) => write!(f, "{}", p.display()),
            Subject::Flag { flag, value: None } => write!(f, "{flag}"),
            Subject::Flag {
                flag,
                value: Some(v),
            } => write!(f, "{flag} {v}"),
            Subject::Named { kind, name } => write!(f, "{kind} '{name}'"),
            Subject::OnnxNode { name, op_type } => write!(f, "node '{name}' ({op_type})"),
            Subject::Context(text) => write!(f, "{text}"),
        }
    }
}

/// `subject: message`, or the message alone.
fn located(at: &Option<Box<Subject>>, message: &str) -> String {
    match at {
        Some(s) => format!("{s}: {message}"),
        None => message.to_string(),
    }
}

/// Everything that can go wrong between reading a model and writing results. The kinds that
/// carry a message also carry its [`Subject`] where there is one.
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
    #[error("{}", located(.at, .message))]
    Onnx {
        at: Option<Box<Subject>>,
        message: String,
    },
    /// The model uses ops dorac does not implement; one entry per op type with its node names.
    #[error("unsupported ONNX ops: {}", .0.join("; "))]
    Unsupported(Vec<String>),
    /// Shapes that do not fit together, named by node.
    #[error("shape error: {}", located(.at, .message))]
    Shape {
        at: Option<Box<Subject>>,
        message: String,
    },
    /// The graph itself is malformed (cycle, dangling reference).
    #[error("graph error: {}", located(.at, .message))]
    Graph {
        at: Option<Box<Subject>>,
        message: String,
    },
    /// User input (tensors, flags, adapters) that does not match the model.
    #[error("{}", located(.at, .message))]
    Input {
        at: Option<Box<Subject>>,
        message: String,
    },
    /// A tensor whose shape (or type) is not the one the model needs.
    #[error("{at} has {quantity} {found}, expected {expected}")]
    Mismatch {
        at: Box<Subject>,
        /// What differs: "shape", "type and shape".
        quantity: &'static str,
        found: String,
        expected: String,
    },
    /// GPU setup, shader validation or execution failure.
    #[error("gpu: {}", located(.at, .message))]
    Gpu {
        at: Option<Box<Subject>>,
        message: String,
    },
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

/// `Error::input(message)` and `Error::input_at(subject, message)` for each kind that carries
/// a message.
macro_rules! constructors {
    ($($variant:ident $plain:ident $at:ident),*) => {
        impl Error {
            $(
                pub fn $plain(message: impl Into<String>) -> Self {
                    Error::$variant { at: None, message: message.into() }
                }

                pub fn $at(at: Subject, message: impl Into<String>) -> Self {
                    Error::$variant { at: Some(Box::new(at)), message: message.into() }
                }
            )*
        }
    };
}

constructors!(
    Onnx onnx onnx_at,
    Shape shape shape_at,
    Graph graph graph_at,
    Input input input_at,
    Gpu gpu gpu_at
);

impl Error {
    /// A shape mismatch of the tensor `at`.
    pub fn shape_mismatch(at: Subject, found: &[usize], expected: &[usize]) -> Self {
        Error::Mismatch {
            at: Box::new(at),
            quantity: "shape",
            found: crate::tensor::shape_str(found),
            expected: crate::tensor::shape_str(expected),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The subject and message of the kinds that carry both.
    fn parts_mut(&mut self) -> Option<(&mut Option<Box<Subject>>, &mut String)> {
        match self {
            Error::Onnx { at, message }
            | Error::Shape { at, message }
            | Error::Graph { at, message }
            | Error::Input { at, message }
            | Error::Gpu { at, message } => Some((at, message)),
            _ => None,
        }
    }

    /// What the error is about, when it says.
    pub fn subject(&self) -> Option<&Subject> {
        match self {
            Error::Onnx { at, .. }
            | Error::Shape { at, .. }
            | Error::Graph { at, .. }
            | Error::Input { at, .. }
            | Error::Gpu { at, .. } => at.as_deref(),
            Error::Mismatch { at, .. } => Some(at),
            _ => None,
        }
    }

    /// The same error placed within `outer` (a node around an op's shape error, a file around
    /// a parse error): `outer` becomes the subject, and a subject the error had already moves
    /// into the message. Kinds without a subject are returned as they are.
    pub fn within(mut self, outer: Subject) -> Self {
        if let Some((at, message)) = self.parts_mut() {
            *message = located(at, message);
            *at = Some(Box::new(outer));
        }
        self
    }
}

/// Early-return with an [`Error`] variant and a formatted message.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$kind {
            at: None,
            message: format!($($arg)*),
        })
    };
}
