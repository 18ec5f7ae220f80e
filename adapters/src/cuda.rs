//! The CUDA side of the MoE service (`device >= 0`): `pregate::cuda::CudaExperts` over the
//! experts the caller set, computing on the caller's stream (borrowed per call), loading on its
//! own copy stream.
//!
//! Built and compiled, **not yet run on a GPU**. Unverified: everything that needs a device
//! (construction, plan, layer calls, stream ordering against the caller's stream, counters).
//! Memory: `device_bytes` reports the expert slot pool, which `finalize` adopts from the caller
//! (a torch tensor inside vLLM, so torch's allocator counts it) and never frees; with NULL the
//! library allocates the pool itself. The per-call workspace (sized by `max_tokens`) stays the
//! library's, allocated in `finalize`, so `device_bytes` reports a workspace of 0.
//! Host memory: `finalize` packs each expert from the service's store (in the service's dtype)
//! into the runtime and frees it there, so the host holds the experts once; an offloaded cache
//! keeps the page-locked copy (`pregate_moe_host_bytes`).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;
use pregate::cache::{CacheStats, StepExperts, Unit};
use pregate::cuda::{BorrowedPool, CudaExperts, DeviceElem, ExpertSetup, HostUnits};
use pregate::moe::RuntimeStats;
use pregate::{ErrorCode, TokenRoute};
use pregate_kernels::KernelSet;

use crate::dtype::Dtype;
use crate::ffi::{CallResult, Failure};
use crate::moe::Settings;
use crate::store::{HostStore, Units};

fn device_failure(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::new(ErrorCode::Device, format!("{what}: {e}"))
}

/// Checks that CUDA device `ordinal` exists and that the service's dtype runs there.
pub(crate) fn check_device(ordinal: usize, settings: &Settings) -> CallResult {
    if settings.dtype == Dtype::F16 {
        return Err(Failure::invalid(
            "dtype f16 is not served on CUDA: use f32 or bf16",
        ));
    }
    let count =
        pregate_kernels::device_count().map_err(|e| device_failure("no usable CUDA driver", e))?;
    if ordinal >= count {
        return Err(Failure::new(
            ErrorCode::Device,
            format!("CUDA device {ordinal} does not exist ({count} present)"),
        ));
    }
    Ok(())
}

/// How the runtime keeps its experts.
fn setup(settings: &Settings) -> ExpertSetup {
    ExpertSetup {
        capacity: settings.capacity,
        policy: settings.policy,
        prefetch: true,
        measure_stalls: false,
        grouped_ffn: true,
    }
}

/// Device bytes the caller allocates for `finalize`: the slot pool, and a workspace of 0 (see
/// the module docs).
pub(crate) fn device_bytes(s: &Settings) -> CallResult<(u64, u64)> {
    let pool = match s.dtype {
        Dtype::F32 => {
            CudaExperts::<f32>::slot_pool_bytes(&setup(s), s.layers, s.experts, s.hidden, s.inter)
        }
        _ => {
            CudaExperts::<bf16>::slot_pool_bytes(&setup(s), s.layers, s.experts, s.hidden, s.inter)
        }
    }?;
    Ok((pool, 0))
}

/// The runtime in the service's compute type.
enum Typed {
    F32(CudaExperts<f32>),
    Bf16(CudaExperts<bf16>),
}

/// A service's runtime on a CUDA device.
pub(crate) struct CudaService {
    ctx: Arc<CudaContext>,
    runtime: Typed,
    hidden: usize,
    layers: usize,
}

impl CudaService {
    /// Builds the runtime on `settings.device` from the experts in `store`, its slots in the
    /// caller's `slot_pool` (or its own memory when NULL). Each expert is packed straight from
    /// the store into the runtime (its page-locked copy, or its slot when every expert fits) and
    /// freed there, so the host holds the experts once. On failure the experts not yet packed go
    /// back to the store.
    ///
    /// # Safety
    /// A non-NULL `slot_pool` is device memory of `settings.device` of the size given, alive and
    /// otherwise unused until the service is destroyed (the ABI's contract).
    pub(crate) unsafe fn new(
        settings: &Settings,
        store: &mut HostStore,
        slot_pool: (*mut c_void, u64),
        workspace: (*mut c_void, u64),
    ) -> CallResult<Self> {
        if !workspace.0.is_null() || workspace.1 != 0 {
            return Err(Failure::invalid(
                "the workspace is the library's (pregate_moe_device_bytes reports 0): pass NULL \
                 and 0",
            ));
        }
        let pool = if slot_pool.0.is_null() {
            None
        } else {
            let (need, _) = device_bytes(settings)?;
            if slot_pool.1 < need {
                return Err(Failure::invalid(format!(
                    "the slot pool has {} bytes; pregate_moe_device_bytes asks {need}",
                    slot_pool.1
                )));
            }
            Some(BorrowedPool {
                ptr: slot_pool.0 as u64,
                bytes: slot_pool.1,
            })
        };
        let ordinal = settings
            .device
            .ok_or_else(|| Failure::new(ErrorCode::Internal, "a CUDA service without a device"))?;
        let ctx = pregate::cuda::open_context(ordinal)?;
        let kernels = Arc::new(
            KernelSet::new(&ctx).map_err(|e| device_failure("compiling the CUDA kernels", e))?,
        );
        let stream = ctx
            .new_stream()
            .map_err(|e| device_failure("creating a stream", e))?;
        let setup = setup(settings);
        let units = store.take_units();
        let built =
            match settings.dtype {
                Dtype::F32 => build(settings, &units, Dtype::F32, kernels, &stream, setup, pool)
                    .map(Typed::F32),
                _ => build(settings, &units, Dtype::Bf16, kernels, &stream, setup, pool)
                    .map(Typed::Bf16),
            }
            .and_then(|rt| {
                stream
                    .synchronize()
                    .map_err(|e| device_failure("finishing the expert upload", e))?;
                Ok(rt)
            });
        let runtime = match built {
            Ok(r) => r,
            Err(mut f) => {
                let packed = units.packed();
                store.restore_units(units);
                if packed > 0 {
                    f.message = format!(
                        "{}; {packed} experts were already packed for the device and freed: set \
                         them again before finalize",
                        f.message
                    );
                }
                return Err(f);
            }
        };
        Ok(CudaService {
            ctx,
            runtime,
            hidden: settings.hidden,
            layers: settings.layers,
        })
    }

    /// Host bytes the runtime holds for its experts (the page-locked copy when offloaded).
    pub(crate) fn host_bytes(&self) -> u64 {
        match &self.runtime {
            Typed::F32(r) => r.host_bytes(),
            Typed::Bf16(r) => r.host_bytes(),
        }
    }

    /// Plans the step: Belady's next uses and the loads of its misses, on the copy stream.
    pub(crate) fn plan(&mut self, steps: &[StepExperts], _stream: u64) -> CallResult {
        match &mut self.runtime {
            Typed::F32(r) => r.plan(steps)?,
            Typed::Bf16(r) => r.plan(steps)?,
        };
        Ok(())
    }

    /// Ends the step: pins released, completed stall timings counted.
    /// Issues the loads of `steps` on the copy stream as prefetches; returns the units loaded
    /// (those not resident before and resident after: the runtime reports a count only).
    pub(crate) fn prefetch(
        &mut self,
        steps: &[StepExperts],
        _stream: u64,
    ) -> CallResult<Vec<Unit>> {
        let mut wanted = Vec::new();
        for s in steps {
            for l in 0..self.layers {
                for e in s.at(l).iter() {
                    if !self.resident(l, e) {
                        wanted.push(Unit::new(l, e));
                    }
                }
            }
        }
        match &mut self.runtime {
            Typed::F32(r) => r.plan(steps)?,
            Typed::Bf16(r) => r.plan(steps)?,
        };
        Ok(wanted
            .into_iter()
            .filter(|&u| self.resident(u.layer as usize, u.expert))
            .collect())
    }

    /// Whether `(layer, expert)` is in a slot.
    pub(crate) fn resident(&self, layer: usize, expert: u16) -> bool {
        let u = Unit::new(layer, expert);
        match &self.runtime {
            Typed::F32(r) => r.cache().slot_of(u).is_some(),
            Typed::Bf16(r) => r.cache().slot_of(u).is_some(),
        }
    }

    pub(crate) fn end_step(&mut self, _stream: u64) -> CallResult {
        match &mut self.runtime {
            Typed::F32(r) => r.end_step(),
            Typed::Bf16(r) => r.end_step(),
        }
        Ok(())
    }

    /// The runtime's and the cache's counters.
    pub(crate) fn stats(&self) -> (RuntimeStats, Option<CacheStats>) {
        match &self.runtime {
            Typed::F32(r) => (r.stats(), Some(r.cache().stats())),
            Typed::Bf16(r) => (r.stats(), Some(r.cache().stats())),
        }
    }

    /// One layer on the caller's `stream` over device pointers `x` and `out` (`routes.len()`
    /// contiguous rows of `hidden`).
    pub(crate) fn forward_layer(
        &mut self,
        layer: usize,
        x: *const c_void,
        x_row_stride: u64,
        routes: &[TokenRoute],
        out: *mut c_void,
        stream: u64,
    ) -> CallResult {
        if x_row_stride != self.hidden as u64 {
            return Err(Failure::invalid(format!(
                "on CUDA x must be contiguous rows (x_row_stride {x_row_stride}, hidden {})",
                self.hidden
            )));
        }
        if x.is_null() || out.is_null() {
            return Err(Failure::invalid("`x` or `out` is NULL"));
        }
        let len = routes.len() * self.hidden;
        // SAFETY: `stream` is the caller's live stream of the primary context (the ABI's
        // contract), outliving this call and the work enqueued on it.
        let s = unsafe { pregate::cuda::borrow_stream(&self.ctx, stream) };
        match &mut self.runtime {
            Typed::F32(r) => run(r, layer, x, out, len, routes, &s),
            Typed::Bf16(r) => run(r, layer, x, out, len, routes, &s),
        }
    }
}

/// The runtime in `T` (whose ABI dtype is `target`) over the store's `units`, each packed and
/// freed as the runtime asks for it.
#[allow(clippy::too_many_arguments)]
fn build<T: DeviceElem>(
    s: &Settings,
    units: &Units,
    target: Dtype,
    kernels: Arc<KernelSet>,
    stream: &Arc<CudaStream>,
    setup: ExpertSetup,
    pool: Option<BorrowedPool>,
) -> CallResult<CudaExperts<T>> {
    let experts = s.experts;
    let pack = |l: usize, e: usize, out: &mut [u8]| units.pack(l * experts + e, target, out);
    let host = HostUnits {
        experts,
        hidden: s.hidden,
        inter: vec![s.inter; s.layers],
        pack: &pack,
    };
    // SAFETY: a `Some` pool is the caller's live device memory of at least the size the runtime
    // needs (checked by `CudaService::new`; its contract).
    let mut rt =
        unsafe { CudaExperts::<T>::from_host_units(&host, s.top_k, kernels, stream, setup, pool)? };
    if s.max_tokens > 0 {
        rt.reserve(s.max_tokens, stream)?;
    }
    Ok(rt)
}

/// Caller memory seen as a `CudaSlice` for one call; given back (never freed) on drop.
struct Borrowed<T>(Option<CudaSlice<T>>);

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            // The memory is the caller's: forget the slice instead of freeing it.
            let _ = s.leak();
        }
    }
}

fn run<T: DeviceElem>(
    rt: &mut CudaExperts<T>,
    layer: usize,
    x: *const c_void,
    out: *mut c_void,
    len: usize,
    routes: &[TokenRoute],
    stream: &Arc<CudaStream>,
) -> CallResult {
    // SAFETY: `x` and `out` are device pointers of `len` elements of `T` in the primary context,
    // live for the work enqueued on `stream` (the ABI's contract); `Borrowed` never frees them.
    let (xs, mut outs) = unsafe {
        (
            Borrowed(Some(stream.upgrade_device_ptr::<T>(x as u64, len))),
            Borrowed(Some(stream.upgrade_device_ptr::<T>(out as u64, len))),
        )
    };
    let (Some(xv), Some(ov)) = (xs.0.as_ref(), outs.0.as_mut()) else {
        return Err(Failure::new(
            ErrorCode::Internal,
            "borrowed slices vanished",
        ));
    };
    rt.forward_layer(layer, xv, routes, ov, false, stream)?;
    Ok(())
}
