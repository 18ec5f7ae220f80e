//! The crate's one error type.
//!
//! Every fallible public function returns [`Result`]. Variants are structured so that a host
//! (Triton, vLLM, the CLI) can turn them into a clear message naming the file, tensor or value
//! at fault; none of them is ever raised by a panic. [`Error::code`] sorts them into a few
//! stable [`ErrorCode`]s that hosts map onto their own status codes.

use std::path::PathBuf;
use std::sync::Arc;

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
    /// A compute device failed or is unavailable (a message without an underlying error; see
    /// [`Error::DeviceCall`] for a failed driver, NVRTC or cuBLAS call).
    #[error("device: {0}")]
    Device(String),
    /// A driver, NVRTC, cuBLAS or kernel-launch call failed; [`std::error::Error::source`] walks
    /// to the library's own error. A CUDA out-of-memory failure has code
    /// [`ErrorCode::Unavailable`], since the same request may fit later.
    #[error("device: {context}: {source}")]
    DeviceCall {
        /// What was being done (the component that made the call).
        context: String,
        /// The library's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The model's own numbers are unusable (NaN or empty logits): a fault of the weights, not of
    /// the request.
    #[error("model data: {0}")]
    ModelData(String),
    /// A batched step failed; every request of the step ends with this, which keeps the step's
    /// error (and its [`Error::code`]) as its source, shared as an `Arc<Error>`.
    #[error("step failed: {0}")]
    StepFailed(#[source] Arc<Error>),
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

/// The stable class of an [`Error`], for hosts that map errors onto their own status codes.
///
/// Names ([`ErrorCode::as_str`]) and numbers (`code as i32`) never change meaning; new codes may
/// be added. How the Triton backend maps them:
///
/// | Code | Number | Name | Meaning | Triton |
/// |---|---|---|---|---|
/// | [`InvalidArgument`](ErrorCode::InvalidArgument) | 1 | `INVALID_ARGUMENT` | bad request, argument, config, checkpoint, tensor, trace or tokenizer input: retrying the same thing fails again | `INVALID_ARG` |
/// | [`NotFound`](ErrorCode::NotFound) | 2 | `NOT_FOUND` | a named file does not exist | `NOT_FOUND` |
/// | [`Unavailable`](ErrorCode::Unavailable) | 3 | `UNAVAILABLE` | overloaded or out of capacity (KV, cache slots, device memory): the same request may succeed later | `UNAVAILABLE` |
/// | [`State`](ErrorCode::State) | 4 | `STATE` | a call in the wrong state (unknown sequence) | `INTERNAL` |
/// | [`Device`](ErrorCode::Device) | 5 | `DEVICE` | a GPU, driver, NVRTC or cuBLAS failure | `INTERNAL` |
/// | [`ModelData`](ErrorCode::ModelData) | 6 | `MODEL_DATA` | the model's own numbers are unusable (NaN logits) | `INTERNAL` |
/// | [`Io`](ErrorCode::Io) | 7 | `IO` | a file-system failure other than not-found | `INTERNAL` |
/// | [`Internal`](ErrorCode::Internal) | 8 | `INTERNAL` | a broken invariant of pregate itself | `INTERNAL` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ErrorCode {
    /// The input is wrong; the same input fails again.
    InvalidArgument = 1,
    /// A named file does not exist.
    NotFound = 2,
    /// Overloaded or out of capacity; the same request may succeed later.
    Unavailable = 3,
    /// A call arrived in the wrong state (for example for an unknown sequence).
    State = 4,
    /// A compute device or its driver failed.
    Device = 5,
    /// The model's own numbers are unusable.
    ModelData = 6,
    /// A file-system failure other than not-found.
    Io = 7,
    /// An internal invariant broke.
    Internal = 8,
}

impl ErrorCode {
    /// Every code, in number order.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::Unavailable,
        ErrorCode::State,
        ErrorCode::Device,
        ErrorCode::ModelData,
        ErrorCode::Io,
        ErrorCode::Internal,
    ];

    /// The stable upper-case name, e.g. `"INVALID_ARGUMENT"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::State => "STATE",
            ErrorCode::Device => "DEVICE",
            ErrorCode::ModelData => "MODEL_DATA",
            ErrorCode::Io => "IO",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// The stable class of this error (see [`ErrorCode`]).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => ErrorCode::NotFound,
                // A short or malformed file is bad input, not a failing file system.
                std::io::ErrorKind::InvalidData
                | std::io::ErrorKind::InvalidInput
                | std::io::ErrorKind::UnexpectedEof => ErrorCode::InvalidArgument,
                std::io::ErrorKind::OutOfMemory => ErrorCode::Unavailable,
                _ => ErrorCode::Io,
            },
            Error::Config { .. }
            | Error::Checkpoint { .. }
            | Error::MissingTensor { .. }
            | Error::Shape { .. }
            | Error::Dtype { .. }
            | Error::InvalidRequest(_)
            | Error::InvalidArgument(_)
            | Error::Tokenizer(_)
            | Error::Trace { .. } => ErrorCode::InvalidArgument,
            Error::Capacity(_) | Error::Overloaded(_) => ErrorCode::Unavailable,
            Error::Device(_) => ErrorCode::Device,
            Error::DeviceCall { source, .. } => device_code(source.as_ref()),
            Error::ModelData(_) => ErrorCode::ModelData,
            Error::StepFailed(e) => e.code(),
            Error::UnknownSequence(_) => ErrorCode::State,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }

    /// A failed device-library call: `context` says what was being done, `source` is the
    /// library's error (kept as [`std::error::Error::source`]).
    pub fn device(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::DeviceCall {
            context: context.into(),
            source: Box::new(source),
        }
    }

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

/// The code of a failed device call, from the first error in its chain this crate knows: an
/// out-of-memory failure (driver or cuBLAS) is [`ErrorCode::Unavailable`], a launcher given
/// inconsistent shapes is [`ErrorCode::Internal`] (pregate computed them), anything else is
/// [`ErrorCode::Device`].
fn device_code(e: &(dyn std::error::Error + 'static)) -> ErrorCode {
    use cudarc::cublas::{result::CublasError, sys::cublasStatus_t};
    use cudarc::driver::{sys::CUresult, DriverError};
    use pregate_kernels::KernelError;

    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(d) = e.downcast_ref::<DriverError>() {
            return if d.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                ErrorCode::Unavailable
            } else {
                ErrorCode::Device
            };
        }
        if let Some(c) = e.downcast_ref::<CublasError>() {
            return if c.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
                ErrorCode::Unavailable
            } else {
                ErrorCode::Device
            };
        }
        match e.downcast_ref::<KernelError>() {
            Some(KernelError::Cublas(c)) => return device_code(c),
            Some(KernelError::Shape { .. }) => return ErrorCode::Internal,
            _ => {}
        }
        if let Some(inner) = e.downcast_ref::<Error>() {
            return inner.code();
        }
        if let Some(inner) = e.downcast_ref::<Arc<Error>>() {
            return inner.code();
        }
        next = e.source();
    }
    ErrorCode::Device
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::io;

    use cudarc::cublas::{result::CublasError, sys::cublasStatus_t};
    use cudarc::driver::{sys::CUresult, DriverError};
    use pregate_kernels::KernelError;

    use super::*;

    fn io_err(kind: io::ErrorKind) -> Error {
        Error::io("f", io::Error::new(kind, "x"))
    }

    #[test]
    fn every_variant_has_its_code() {
        let s = || "x".to_string();
        let cases: Vec<(Error, ErrorCode)> = vec![
            (io_err(io::ErrorKind::NotFound), ErrorCode::NotFound),
            (io_err(io::ErrorKind::PermissionDenied), ErrorCode::Io),
            (
                io_err(io::ErrorKind::UnexpectedEof),
                ErrorCode::InvalidArgument,
            ),
            (
                io_err(io::ErrorKind::InvalidData),
                ErrorCode::InvalidArgument,
            ),
            (io_err(io::ErrorKind::OutOfMemory), ErrorCode::Unavailable),
            (Error::config("c", "x"), ErrorCode::InvalidArgument),
            (Error::checkpoint("c", "x"), ErrorCode::InvalidArgument),
            (
                Error::MissingTensor {
                    name: s(),
                    dir: "d".into(),
                },
                ErrorCode::InvalidArgument,
            ),
            (
                Error::Shape {
                    name: s(),
                    expected: vec![1],
                    found: vec![2],
                    path: "p".into(),
                },
                ErrorCode::InvalidArgument,
            ),
            (
                Error::Dtype {
                    name: s(),
                    found: s(),
                    expected: s(),
                    path: "p".into(),
                },
                ErrorCode::InvalidArgument,
            ),
            (Error::InvalidRequest(s()), ErrorCode::InvalidArgument),
            (Error::InvalidArgument(s()), ErrorCode::InvalidArgument),
            (Error::Tokenizer(s()), ErrorCode::InvalidArgument),
            (Error::Capacity(s()), ErrorCode::Unavailable),
            (Error::Overloaded(s()), ErrorCode::Unavailable),
            (Error::Device(s()), ErrorCode::Device),
            (
                Error::device("ctx", io::Error::other("driver")),
                ErrorCode::Device,
            ),
            (Error::ModelData(s()), ErrorCode::ModelData),
            (
                Error::StepFailed(Arc::new(Error::Capacity(s()))),
                ErrorCode::Unavailable,
            ),
            (
                Error::StepFailed(Arc::new(Error::Device(s()))),
                ErrorCode::Device,
            ),
            (Error::UnknownSequence(3), ErrorCode::State),
            (
                Error::Trace {
                    path: "t".into(),
                    line: 1,
                    msg: s(),
                },
                ErrorCode::InvalidArgument,
            ),
            (Error::Internal(s()), ErrorCode::Internal),
        ];
        for (e, want) in cases {
            assert_eq!(e.code(), want, "{e:?}");
        }
    }

    #[test]
    fn codes_have_stable_names_and_numbers() {
        let names: Vec<(&str, i32)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.as_str(), *c as i32))
            .collect();
        assert_eq!(
            names,
            [
                ("INVALID_ARGUMENT", 1),
                ("NOT_FOUND", 2),
                ("UNAVAILABLE", 3),
                ("STATE", 4),
                ("DEVICE", 5),
                ("MODEL_DATA", 6),
                ("IO", 7),
                ("INTERNAL", 8),
            ]
        );
        assert_eq!(ErrorCode::Unavailable.to_string(), "UNAVAILABLE");
    }

    // Driver errors are never displayed here: their Display asks the (absent) driver for a name.
    #[test]
    fn driver_out_of_memory_is_unavailable_and_other_driver_errors_are_device() {
        let oom = Error::device("alloc", DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert_eq!(oom.code(), ErrorCode::Unavailable);
        let src = oom.source().expect("a source");
        assert_eq!(
            src.downcast_ref::<DriverError>().map(|d| d.0),
            Some(CUresult::CUDA_ERROR_OUT_OF_MEMORY)
        );
        let launch = Error::device("launch", DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED));
        assert_eq!(launch.code(), ErrorCode::Device);
    }

    #[test]
    fn kernel_errors_keep_the_driver_error_as_their_source() {
        let k = KernelError::from(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        let e = Error::device("engine", k);
        assert_eq!(e.code(), ErrorCode::Unavailable);
        // Error -> KernelError -> DriverError.
        let driver = e.source().and_then(|k| k.source()).expect("driver error");
        assert!(driver.downcast_ref::<DriverError>().is_some());

        let blas = KernelError::from(CublasError(cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED));
        assert_eq!(Error::device("gemm", blas).code(), ErrorCode::Unavailable);
        let blas = KernelError::from(CublasError(cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED));
        assert_eq!(Error::device("gemm", blas).code(), ErrorCode::Device);
        let shape = KernelError::Shape {
            kernel: "rope",
            detail: "odd head".into(),
        };
        let e = Error::device("engine", shape);
        assert_eq!(e.code(), ErrorCode::Internal);
        assert_eq!(
            e.to_string(),
            "device: engine: bad shape for rope: odd head"
        );
        let missing = KernelError::MissingKernel("k".into());
        assert_eq!(Error::device("engine", missing).code(), ErrorCode::Device);
    }

    #[test]
    fn a_step_failure_keeps_the_step_error_as_source() {
        let e = Error::StepFailed(Arc::new(Error::Capacity("KV".into())));
        assert_eq!(e.to_string(), "step failed: out of capacity: KV");
        let src = e.source().expect("source");
        let step = src.downcast_ref::<Arc<Error>>().map(|e| &**e);
        assert!(matches!(step, Some(Error::Capacity(_))), "{src:?}");
    }
}
