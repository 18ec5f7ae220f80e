//! The CUDA side of the MoE service (`device >= 0`).
//!
//! Not built yet: a service on a CUDA device is refused at `pregate_moe_create` with `DEVICE` and
//! a message saying so. The runtime it will wrap is `pregate::cuda::CudaExperts` (device slots fed
//! from page-locked host memory on a copy stream, compute on the caller's stream borrowed with
//! `pregate::cuda::borrow_stream`); what it still needs is a constructor from host experts (today
//! it reads a model directory) and the adoption of caller-owned device memory.

use std::ffi::c_void;

use pregate::cache::{CacheStats, StepExperts};
use pregate::model::weights::ExpertWeights;
use pregate::moe::RuntimeStats;
use pregate::{ErrorCode, TokenRoute};

use crate::ffi::{CallResult, Failure};
use crate::moe::Settings;

fn not_built() -> Failure {
    Failure::new(
        ErrorCode::Device,
        "the MoE service runs on the CPU only in this version (device -1); its CUDA path is not \
         built yet",
    )
}

/// Refuses a service on CUDA device `ordinal` (see the module docs).
pub(crate) fn check_device(_ordinal: usize, _settings: &Settings) -> CallResult {
    Err(not_built())
}

/// Device bytes the caller would allocate for `finalize`.
pub(crate) fn device_bytes(_settings: &Settings) -> (u64, u64) {
    (0, 0)
}

/// A service's runtime on a CUDA device (never constructed in this version).
pub(crate) struct CudaService {
    _private: (),
}

impl CudaService {
    pub(crate) fn new(
        _settings: &Settings,
        _experts: &[Vec<ExpertWeights>],
        _slot_pool: (*mut c_void, u64),
        _workspace: (*mut c_void, u64),
    ) -> CallResult<Self> {
        Err(not_built())
    }

    pub(crate) fn plan(&mut self, _steps: &[StepExperts], _stream: u64) -> CallResult {
        Err(not_built())
    }

    pub(crate) fn end_step(&mut self, _stream: u64) -> CallResult {
        Err(not_built())
    }

    pub(crate) fn stats(&self) -> (RuntimeStats, Option<CacheStats>) {
        (RuntimeStats::default(), None)
    }

    pub(crate) fn forward_layer(
        &mut self,
        _layer: usize,
        _x: *const c_void,
        _x_row_stride: u64,
        _routes: &[TokenRoute],
        _out: *mut c_void,
        _stream: u64,
    ) -> CallResult {
        Err(not_built())
    }
}
