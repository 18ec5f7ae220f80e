//! The crate's error type.

use cudarc::cublas::result::CublasError;
use cudarc::driver::DriverError;

/// Everything that can go wrong compiling, loading or launching a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The NVRTC library could not be loaded (not installed, not on the loader path).
    #[error("NVRTC is not available: {0}")]
    NvrtcUnavailable(String),
    /// The CUDA driver library could not be loaded.
    #[error("the CUDA driver is not available: {0}")]
    DriverUnavailable(String),
    /// The driver loaded but reports no device with this ordinal.
    #[error("no CUDA device {ordinal} (the driver reports {count})")]
    NoDevice {
        /// The device asked for.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// cuBLAS could not be loaded.
    #[error("cuBLAS is not available: {0}")]
    CublasUnavailable(String),
    /// NVRTC rejected a kernel source; `log` is NVRTC's program log.
    #[error("NVRTC failed to compile `{module}` for {arch} ({status}):\n{log}{hint}")]
    Compile {
        /// The kernel source's name.
        module: String,
        /// The target architecture, `sm_XY`.
        arch: String,
        /// NVRTC's status code.
        status: String,
        /// NVRTC's program log.
        log: String,
        /// A hint on how to fix the environment, or empty.
        hint: String,
    },
    /// An NVRTC call other than the compilation itself failed.
    #[error("NVRTC error in {call}: {status}")]
    Nvrtc {
        /// The NVRTC function.
        call: &'static str,
        /// Its status.
        status: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0:?}")]
    Cublas(CublasError),
    /// A compiled module lacks a kernel this crate launches.
    #[error("kernel `{0}` is missing from the compiled modules")]
    MissingKernel(String),
    /// A launcher's arguments do not describe consistent shapes, or a buffer is too short.
    #[error("bad shape for {kernel}: {detail}")]
    Shape {
        /// The kernel or operation.
        kernel: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A library call panicked (for example a symbol missing from an old library); caught here.
    #[error("{0} panicked: {1}")]
    Panicked(&'static str, String),
}

impl From<CublasError> for KernelError {
    fn from(e: CublasError) -> Self {
        KernelError::Cublas(e)
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, KernelError>;

/// Runs `f`, turning a panic (cudarc panics when a library or symbol is missing) into an error.
pub(crate) fn catch<T>(what: &'static str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        KernelError::Panicked(what, msg)
    })
}
