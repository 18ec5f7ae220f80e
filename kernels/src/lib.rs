//! pregate's CUDA kernels, compiled at run time with NVRTC for the device's own architecture.
//!
//! Nothing here needs CUDA to build: cudarc loads the driver, NVRTC and cuBLAS dynamically, and
//! every entry point reports a missing library or device as an error, never a panic.
//!
//! - [`Nvrtc`] finds the NVRTC library and the CUDA headers and compiles a source to a cubin;
//!   [`cache`] keeps cubins in memory and on disk.
//! - [`KernelSet`] compiles every source in [`SOURCES`] once per context and holds the kernels;
//!   its launcher methods (in [`ops`]) check shapes before launching.
//! - [`Blas`] runs the dense linear layers and the grouped expert FFN through cuBLAS.
//! - [`device`] probes for a driver and a device.
//!
//! Semantics follow `plugin/docs/model-format.md`: RMSNorm in f32, RoPE "rotate half" with f64
//! angles, causal attention with f32 softmax and GQA, top-k routing with softmax weights (top-1:
//! weight 1), SwiGLU experts.
#![warn(missing_docs)]

pub mod blas;
pub mod cache;
pub mod device;
mod error;
pub mod kernel_set;
pub mod nvrtc;
pub mod ops;
pub mod sources;

pub use blas::{Blas, ExpertWeights, FfnDims};
pub use device::{device_arch, device_count, driver_available, open_device};
pub use error::{KernelError, Result};
pub use kernel_set::{KernelSet, KernelSetOptions};
pub use nvrtc::Nvrtc;
pub use ops::moe::{ExpertPlan, MoePermutation, MAX_EXPERTS, MAX_TOP_K};
pub use ops::sampling::sampling_uniform;
pub use ops::skinny::GROUPED_FFN_MAX_ROWS;
pub use ops::{AttentionShape, KernelDtype, PagedKvLayout};
pub use sources::{KernelSource, SOURCES};
