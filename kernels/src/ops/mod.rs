//! Typed launchers, one module per kernel source. Every launcher checks its shapes and buffer
//! lengths (buffers may be longer than needed; only the prefix described is touched) and that the
//! stream belongs to the kernel set's context, then enqueues the kernel on `stream` without
//! synchronising. Index arrays that live on the device (token ids, expert ids, block tables,
//! slots) cannot be checked from the host: the kernels clamp or skip out-of-range entries as each
//! launcher documents, so a bad index never reads or writes outside the buffers.

pub mod attention;
mod elementwise;
mod family;
pub mod moe;
mod norm;
pub mod sampling;
pub mod skinny;

pub use attention::{AttentionShape, PagedKvLayout};

use cudarc::cublas::sys::cudaDataType_t;
use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, ValidAsZeroBits};
use half::bf16;

use crate::error::{KernelError, Result};
use crate::kernel_set::KernelSet;

/// A storage type the kernels are instantiated for: `f32` (the exact path the correctness tests
/// use) and `bf16` (serving). Arithmetic inside the kernels is always f32.
pub trait KernelDtype:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + std::fmt::Debug + 'static
{
    /// The suffix of the kernel names (`f32`, `bf16`).
    const SUFFIX: &'static str;
    /// The cuBLAS data type.
    const CUDA_TYPE: cudaDataType_t;
    /// Converts from f32 (round to nearest even).
    fn from_f32(x: f32) -> Self;
    /// Converts to f32 (exact).
    fn to_f32(self) -> f32;
}

impl KernelDtype for f32 {
    const SUFFIX: &'static str = "f32";
    const CUDA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl KernelDtype for bf16 {
    const SUFFIX: &'static str = "bf16";
    const CUDA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Threads per block of the element-wise and row kernels.
pub(crate) const BLOCK: u32 = 256;

/// A grid-stride launch over `n` elements.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row.
pub(crate) fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn shape_err(kernel: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::Shape {
        kernel,
        detail: detail.into(),
    }
}

/// `v` as an `i32` kernel argument.
pub(crate) fn to_i32(kernel: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_err(kernel, format!("{what} = {v} exceeds i32")))
}

/// `v` as an `i64` kernel argument.
pub(crate) fn to_i64(kernel: &'static str, what: &str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| shape_err(kernel, format!("{what} = {v} exceeds i64")))
}

/// Checks that a buffer of `have` elements holds the `need` the launch touches.
pub(crate) fn check_len(kernel: &'static str, what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(shape_err(
            kernel,
            format!("{what} has {have} elements, needs {need}"),
        ));
    }
    Ok(())
}

/// `a * b` without overflow.
pub(crate) fn mul(kernel: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| shape_err(kernel, format!("{a} x {b} overflows")))
}

/// Elements a strided matrix of `rows` rows of `width` used elements, `stride` apart, spans.
pub(crate) fn strided_len(
    kernel: &'static str,
    rows: usize,
    stride: usize,
    width: usize,
) -> Result<usize> {
    if rows == 0 {
        return Ok(0);
    }
    if stride < width {
        return Err(shape_err(
            kernel,
            format!("row stride {stride} is below the row width {width}"),
        ));
    }
    mul(kernel, rows - 1, stride)?
        .checked_add(width)
        .ok_or_else(|| shape_err(kernel, "size overflows"))
}

impl KernelSet {
    /// Errors unless `stream` belongs to this set's context.
    pub(crate) fn check_stream(&self, kernel: &'static str, stream: &CudaStream) -> Result<()> {
        if stream.context() != self.context() {
            return Err(shape_err(
                kernel,
                "the stream belongs to another CUDA context than the kernel set",
            ));
        }
        Ok(())
    }
}
