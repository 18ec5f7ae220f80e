//! Everything of the library that runs on an NVIDIA GPU, through `pregate-kernels` (NVRTC kernels
//! and cuBLAS; CUDA is loaded at run time, so one binary runs on CPU-only and GPU machines alike).
//!
//! - **`backend`**: [`CudaBackend`], the engine's backend for a whole model. Dense tensors
//!   (embedding, attention, norms, lm_head) are uploaded once in the compute type `T` (bf16 for
//!   serving; f32 for exact comparison with the CPU engine). A step runs decode tokens and prefill
//!   chunks of many sequences together: per layer RMSNorm, one fused QKV GEMM, RoPE, a KV-cache
//!   write, paged attention (`kv`), the output GEMM and residual add, RMSNorm, then the layer's
//!   experts through the expert runtime. Nothing synchronises the host inside a step except the
//!   final read of the logits.
//! - **`experts`**: [`CudaExperts`], the expert runtime on the device (see [`crate::moe`]): device
//!   slots (`memory`: [`CudaExpertMemory`]) filled on a copy stream from a page-locked host copy
//!   (`weights`), waves, prefetch, permute -> grouped expert FFN -> weighted combine, on whatever
//!   stream each call is given.
//! - **`router`**: [`CudaReadMeRouter`], the Read-ME router on the device (f32, a paged router KV
//!   cache, only the logits read back), a [`crate::router::Router`] like the host one.
//!
//! **Context and streams.** pregate uses the device's *primary* context, the one the CUDA runtime
//! (and so torch) uses, so device pointers and streams of a host framework in the same process are
//! valid here. It changes no setting of that context (flags, limits, cache config). cudarc's
//! automatic event tracking is switched off on pregate's own handle of the context only (a flag
//! of that Rust object, not of the driver): pregate orders its streams itself with events. Each
//! backend has a compute stream; each expert runtime a copy stream; a caller may pass its own
//! (borrowed) stream to the runtime's layer calls, and the runtime orders its copies against
//! whichever stream reads a slot.

mod backend;
mod experts;
mod kv;
pub mod memory;
mod router;
mod weights;

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;
use half::bf16;

pub use backend::CudaBackend;
pub use experts::{CudaExperts, CudaSpeculation, ExpertSetup, HostUnits, LinkModel, SpecLoad};
pub use memory::{BorrowedPool, CudaExpertMemory};
pub use router::CudaReadMeRouter;
pub use weights::{DeviceElem, PackUnit};

use crate::cache::EvictionPolicy;
use crate::engine::{Backend, Engine};
use crate::error::{Error, Result};
use crate::model::ModelDir;
use crate::router::{HostReadMeRouter, InModelRouter, ReadMeRouter, Router};

pub(crate) fn dev(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::device("CUDA", e)
}

/// Opens the primary context of device `ordinal` for pregate's use (see the module docs).
pub fn open_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    let ctx = pregate_kernels::open_device(ordinal).map_err(dev)?;
    // SAFETY: pregate orders its streams itself (per-slot events, stream order) and frees
    // nothing while a stream may still use it (drops happen after a synchronisation or are
    // stream-ordered frees on the allocating stream). The flag is this handle's, not the driver's.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// The compute type of the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CudaDtype {
    /// bf16 weights and activations, f32 accumulation (serving).
    #[default]
    Bf16,
    /// f32 weights and activations (exact comparison with the CPU engine).
    F32,
}

impl std::str::FromStr for CudaDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" | "bfloat16" => Ok(CudaDtype::Bf16),
            "f32" | "float32" => Ok(CudaDtype::F32),
            _ => Err(Error::InvalidArgument(format!(
                "unknown CUDA dtype `{s}` (expected bf16 or f32)"
            ))),
        }
    }
}

/// Where the pre-gating router runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouterPlacement {
    /// On the host, in f32, batched over a step's sequences (the default).
    #[default]
    Host,
    /// On the backend's device, in f32, with its KV cache beside the backbone's: the host then
    /// reads back only the logits. The CUDA backend only; the CPU backend's device is the host.
    /// Experimental: not yet verified on a GPU, hence not the default.
    Device,
}

impl std::str::FromStr for RouterPlacement {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "host" | "cpu" => Ok(RouterPlacement::Host),
            "device" | "gpu" => Ok(RouterPlacement::Device),
            _ => Err(Error::InvalidArgument(format!(
                "unknown router placement `{s}` (expected host or device)"
            ))),
        }
    }
}

pub use crate::cache::ExpertCapacity;

/// Options of the CUDA backend.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// Device ordinal.
    pub ordinal: usize,
    /// Compute type.
    pub dtype: CudaDtype,
    /// Expert cache capacity.
    pub experts: ExpertCapacity,
    /// Eviction policy of the expert cache.
    pub policy: EvictionPolicy,
    /// Issue the lookahead's expert loads ahead of use (`prepare`); off = load on demand.
    pub prefetch: bool,
    /// KV cache size in tokens; `None`: a quarter of the device memory left after the weights.
    pub kv_tokens: Option<usize>,
    /// Tokens per KV block.
    pub kv_block_size: usize,
    /// Time the compute stream's waits for expert loads (adds two events per wait).
    pub measure_stalls: bool,
    /// Where the pre-gating router runs.
    pub router: RouterPlacement,
    /// The expert FFN's grouped kernels for small batches (off: cuBLAS for every batch).
    pub grouped_ffn: bool,
    /// Speculative expert prefetch for in-model gates: on, off, or `None` for the default (on
    /// when the model routes in-model and the cache holds fewer units than the model has
    /// experts; see [`CudaBackend::with_speculation`]).
    pub speculate: Option<bool>,
    /// Depth and extra candidates of the speculation.
    pub speculation: crate::moe::SpeculatorConfig,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            ordinal: 0,
            dtype: CudaDtype::Bf16,
            experts: ExpertCapacity::All,
            policy: EvictionPolicy::Belady,
            prefetch: true,
            kv_tokens: None,
            kv_block_size: 16,
            measure_stalls: false,
            router: RouterPlacement::Host,
            grouped_ffn: true,
            speculate: None,
            speculation: crate::moe::SpeculatorConfig::default(),
        }
    }
}

impl CudaOptions {
    /// The options of device `ordinal` that `opts` sets, defaults elsewhere.
    pub fn from_engine_options(ordinal: usize, opts: &crate::engine::EngineOptions) -> Self {
        let d = CudaOptions::default();
        CudaOptions {
            ordinal,
            dtype: opts.cuda_dtype.unwrap_or(d.dtype),
            experts: opts.expert_cache.map_or(d.experts, |c| c.capacity),
            policy: opts.expert_cache.map_or(d.policy, |c| c.policy),
            prefetch: opts.prefetch.unwrap_or(d.prefetch),
            kv_tokens: opts.kv_tokens.or(d.kv_tokens),
            router: opts.router.unwrap_or(d.router),
            grouped_ffn: opts.expert_ffn.unwrap_or_default() == crate::engine::ExpertFfn::Grouped,
            speculate: opts.speculate,
            speculation: opts.speculation(),
            ..d
        }
    }
}

/// Counters of the CUDA backend, shared with whoever opened it (benchmarks, metrics).
#[derive(Debug, Clone, Copy, Default)]
pub struct CudaStats {
    /// Steps run.
    pub steps: u64,
    /// Host wall time of the steps, seconds (each ends with the logits read, so it is device time).
    pub step_seconds: f64,
    /// Device time the compute stream spent waiting for expert loads, seconds (with
    /// [`CudaOptions::measure_stalls`]).
    pub stall_seconds: f64,
    /// Expert cache hits.
    pub hits: u64,
    /// Expert cache misses (loads on demand).
    pub misses: u64,
    /// Loads issued ahead of use by the prefetch plan.
    pub prefetches: u64,
    /// Bytes copied into expert slots.
    pub bytes_loaded: u64,
}

/// An expert cache setup: capacity, eviction policy, prefetching.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSetup {
    /// Capacity.
    pub experts: ExpertCapacity,
    /// Eviction policy.
    pub policy: EvictionPolicy,
    /// Issue the lookahead's loads ahead of use.
    pub prefetch: bool,
}

/// What the opener of a CUDA engine keeps: the backend's counters, and a way to change its
/// expert cache between steps (benchmarks compare cache setups without reloading the model; the
/// backend must have been opened offloaded, so that it keeps the pinned host copy of the experts).
#[derive(Debug, Default)]
pub struct CudaHandle {
    /// Counters, updated after every step.
    pub stats: Mutex<CudaStats>,
    /// A new cache setup, applied (emptying the cache) before the next step.
    pub reconfigure: Mutex<Option<CacheSetup>>,
    /// Speculative prefetch on or off from the next step (fresh counters; `None` inside: the
    /// backend's default for its cache). Applied with a pending reconfiguration, or alone.
    pub speculate: Mutex<Option<Option<bool>>>,
}

impl CudaHandle {
    /// A copy of the counters.
    pub fn snapshot(&self) -> CudaStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

/// Wraps `raw`, a CUDA stream of `ctx`'s device owned by a host framework (torch's current
/// stream, `torch.cuda.current_stream().cuda_stream`), for the expert runtime's layer calls.
/// Dropping the wrapper leaves the stream alone.
///
/// # Safety
/// `raw` must be a live stream of `ctx` (the primary context: torch's streams are), and must
/// outlive the wrapper and all work pregate enqueues on it.
pub unsafe fn borrow_stream(ctx: &Arc<CudaContext>, raw: u64) -> Arc<cudarc::driver::CudaStream> {
    // SAFETY: the caller guarantees `raw` is a live stream of this context that outlives the
    // wrapper (this function's contract).
    unsafe { ctx.wrap_borrowed_stream(raw as cudarc::driver::sys::CUstream) }
}

/// A CUDA engine's parts before they are joined: the backend, the router, the backend's handle.
type OpenedParts = (Box<dyn Backend>, Box<dyn Router>, Arc<CudaHandle>);

/// Opens the model in `model` on the GPU and returns an engine, plus a handle on the backend.
/// A Read-ME model's router runs where `opts.router` says: on the host, or on this device. The
/// Hugging Face MoE families route inside the forward pass, on the device, whatever
/// `opts.router` says (their engine's router only keeps the shape).
pub fn open_cuda_engine(model: &ModelDir, opts: &CudaOptions) -> Result<(Engine, Arc<CudaHandle>)> {
    let weights = match model.plan.family.routes_in_model() {
        true => None,
        false => Some(crate::model::RouterWeights::load(
            &model.checkpoint,
            &model.config,
        )?),
    };
    fn parts<T: DeviceElem>(
        model: &ModelDir,
        opts: &CudaOptions,
        weights: Option<crate::model::RouterWeights>,
    ) -> Result<OpenedParts> {
        let b = CudaBackend::<T>::new(model, opts)?
            .with_speculation(opts.speculate, opts.speculation)?;
        let cfg = &model.config;
        let router: Box<dyn Router> = match (weights, opts.router) {
            (None, _) => Box::new(InModelRouter::new(
                cfg.num_experts(),
                cfg.experts_per_token(),
            )),
            (Some(weights), RouterPlacement::Host) => Box::new(HostReadMeRouter::new(
                ReadMeRouter::new(weights, &model.config),
            )),
            (Some(weights), RouterPlacement::Device) => Box::new(CudaReadMeRouter::new(
                b.stream().context(),
                b.kernels().clone(),
                &weights,
                &model.config,
                b.kv_capacity_tokens(),
                opts.kv_block_size,
            )?),
        };
        let s = b.stats();
        Ok((Box::new(b), router, s))
    }
    let (backend, router, stats) = match opts.dtype {
        CudaDtype::Bf16 => parts::<bf16>(model, opts, weights)?,
        CudaDtype::F32 => parts::<f32>(model, opts, weights)?,
    };
    Ok((Engine::new(backend, router), stats))
}

/// Whether a CUDA driver and at least one device are present (never panics).
pub fn cuda_available() -> bool {
    matches!(pregate_kernels::device_count(), Ok(n) if n > 0)
}
