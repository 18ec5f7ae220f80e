//! The crate's one error type.
//!
//! Every fallible public function returns [`Result`]. Variants are structured so that a host
//! (Triton, vLLM, the CLI) can turn them into a clear message naming the file, tensor or value
//! at fault; none of them is ever raised by a panic.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in pregate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` (or another configuration) is missing a field, has a bad value, or
    /// disagrees with itself.
    #[error("bad config {path}: {msg}")]
    Config {
        /// The configuration file (or a pseudo-path such as `<config.pbtxt>`).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A weight file is truncated, corrupt or not safetensors.
    #[error("bad checkpoint file {path}: {msg}")]
    Checkpoint {
        /// The weight file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the model needs is absent from every weight file.
    #[error("missing tensor `{name}` in {dir}")]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// The model directory searched.
        dir: PathBuf,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?} ({path})")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        found: Vec<usize>,
        /// The weight file holding it.
        path: PathBuf,
    },
    /// A tensor has a dtype pregate cannot read there.
    #[error("tensor `{name}` has dtype {found}, expected one of {expected} ({path})")]
    Dtype {
        /// The tensor's name.
        name: String,
        /// The dtype found.
        found: String,
        /// The dtypes accepted.
        expected: String,
        /// The weight file holding it.
        path: PathBuf,
    },
    /// A request or argument is invalid (bad token id, prompt too long, bad sampling value...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An argument to a library call or command is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A tokenizer could not be loaded or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A resource limit was reached (KV memory, cache capacity, device memory).
    #[error("out of capacity: {0}")]
    Capacity(String),
    /// The server is too busy to take the request now (it waited too long for admission); the
    /// same request may succeed later, so hosts report it as unavailable rather than invalid.
    #[error("server overloaded: {0}")]
    Overloaded(String),
    /// A compute device failed or is unavailable.
    #[error("device: {0}")]
    Device(String),
    /// A sequence id is unknown to the engine.
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// A request trace has a malformed line (named by its 1-based number).
    #[error("{path}:{line}: {msg}")]
    Trace {
        /// The trace file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// An internal invariant broke; reported rather than panicking across FFI.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A configuration error for `path`.
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// A checkpoint-file error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
