//! The per-layer MoE service (`pregate_moe_*`): a host framework keeps attention, the KV cache and
//! the dense parts; pregate keeps the routed experts, their cache and its plan.
//!
//! Life of a handle: `create` (shape and cache settings) -> `set_expert` for every (layer, expert,
//! projection), copied into pregate's store -> `finalize` (every expert present; the runtime is
//! built) -> per step: `plan_step` (the step's routes, shared by every layer) -> `layer_forward`
//! per layer -> `step_end` -> `destroy`. A call out of this order fails with `STATE`. Models that
//! route per layer (Mixtral, Qwen-MoE, OLMoE) open their steps with `begin_step` instead and pass
//! each layer's routes with the layer ([`crate::layered`]).

use std::ffi::c_void;
use std::sync::Mutex;

use pregate::cache::{
    prefetch, CacheCapacity, CacheStats, EvictionPolicy, ExpertCache, ExpertCapacity, HostMemory,
    MemoryBackend, PrefetchPlanner, StepExperts, Unit,
};
use pregate::model::weights::ExpertWeights;
use pregate::moe::{run_waves, CpuExperts, RuntimeStats};
use pregate::route::{ExpertSet, MAX_EXPERTS, MAX_TOP_K};
use pregate::{ErrorCode, TokenRoute};

use crate::dtype::{read_matrix, read_matrix_as, write_values, Dtype};
use crate::ffi::{self, guard, product, CallResult, Failure, Status};
use crate::store::HostStore;

/// The settings of a service, as C passes them (`PregateMoeConfig` in `pregate.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PregateMoeConfig {
    /// `sizeof(PregateMoeConfig)` as the caller compiled it.
    pub struct_size: u32,
    /// MoE layers.
    pub num_layers: u32,
    /// Routed experts per layer.
    pub num_experts: u32,
    /// Most experts per token.
    pub top_k: u32,
    /// Model width `H`.
    pub hidden: u32,
    /// Expert width `I` (this rank's shard under tensor parallelism).
    pub inter: u32,
    /// Activations' element type (`PREGATE_F32`, `PREGATE_BF16`, `PREGATE_F16`).
    pub dtype: i32,
    /// -1: CPU; else the CUDA device ordinal.
    pub device: i32,
    /// Expert slots in all; 0: every expert resident.
    pub cache_slots: u64,
    /// Slots per layer; 0: one pool shared by the layers.
    pub layer_quota: u32,
    /// Eviction policy (`PREGATE_LRU`, `PREGATE_LFU`, `PREGATE_RANDOM`, `PREGATE_BELADY`,
    /// `PREGATE_BELADY_DECAY`).
    pub policy: i32,
    /// Most tokens of one step (0: no limit).
    pub max_tokens: u32,
    /// `PREGATE_SHARD_NONE` or `PREGATE_SHARD_TP`.
    pub shard_kind: u32,
    /// This rank.
    pub shard_rank: u32,
    /// Ranks.
    pub shard_size: u32,
    /// Seed of the random eviction policy.
    pub seed: u64,
}

/// A service's counters (`PregateMoeStats` in `pregate.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PregateMoeStats {
    /// `sizeof(PregateMoeStats)`: set by the caller to its size, by the library to its own.
    pub struct_size: u32,
    /// Zero.
    pub reserved: u32,
    /// Cache accesses that found their expert resident.
    pub hits: u64,
    /// Cache accesses that loaded their expert.
    pub misses: u64,
    /// Experts evicted.
    pub evictions: u64,
    /// Bytes copied into expert slots.
    pub bytes_loaded: u64,
    /// Loads issued ahead of use by a plan.
    pub prefetches: u64,
    /// Layer forwards run.
    pub layer_calls: u64,
    /// Waves run (more than one per layer call when a layer uses more experts than its slots).
    pub waves: u64,
    /// Seconds compute waited for expert loads.
    pub stall_s: f64,
}

/// An eviction policy's ABI number.
fn policy(code: i32) -> CallResult<EvictionPolicy> {
    match code {
        0 => Ok(EvictionPolicy::Lru),
        1 => Ok(EvictionPolicy::Lfu),
        2 => Ok(EvictionPolicy::Random),
        3 => Ok(EvictionPolicy::Belady),
        4 => Ok(EvictionPolicy::BeladyDecay),
        _ => Err(Failure::invalid(format!(
            "policy {code} is not an eviction policy (0 lru, 1 lfu, 2 random, 3 belady, 4 \
             belady-decay)"
        ))),
    }
}

/// The projections of one expert.
const PROJ_NAMES: [&str; 3] = ["gate", "up", "down"];

/// A validated [`PregateMoeConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub inter: usize,
    pub dtype: Dtype,
    pub device: Option<usize>,
    pub capacity: ExpertCapacity,
    pub policy: EvictionPolicy,
    pub max_tokens: usize,
}

impl Settings {
    pub(crate) fn new(c: &PregateMoeConfig) -> CallResult<Self> {
        let positive = |v: u32, name: &str| {
            if v == 0 {
                Err(Failure::invalid(format!("{name} must be at least 1")))
            } else {
                Ok(v as usize)
            }
        };
        let layers = positive(c.num_layers, "num_layers")?;
        let experts = positive(c.num_experts, "num_experts")?;
        let hidden = positive(c.hidden, "hidden")?;
        let inter = positive(c.inter, "inter")?;
        if experts > MAX_EXPERTS {
            return Err(Failure::invalid(format!(
                "num_experts {experts} is above {MAX_EXPERTS}"
            )));
        }
        let top_k = c.top_k as usize;
        if top_k == 0 || top_k > experts.min(MAX_TOP_K) {
            return Err(Failure::invalid(format!(
                "top_k {top_k} must be 1..={}",
                experts.min(MAX_TOP_K)
            )));
        }
        let device = match c.device {
            -1 => None,
            d if d >= 0 => Some(d as usize),
            d => {
                return Err(Failure::invalid(format!(
                    "device {d}: -1 (CPU) or a CUDA ordinal"
                )))
            }
        };
        let units = layers * experts;
        // Fewer slots than one token's experts would leave a layer unable to run at all.
        let (slots, quota) = (c.cache_slots, c.layer_quota as usize);
        if (slots > 0 && slots < top_k as u64) || (quota > 0 && quota < top_k) {
            return Err(Failure::invalid(format!(
                "a cache of {slots} slots (layer_quota {quota}) cannot hold one token's {top_k} \
                 experts"
            )));
        }
        let capacity = match (c.cache_slots, c.layer_quota as usize) {
            (0, 0) => ExpertCapacity::All,
            (s, 0) if s >= units as u64 => ExpertCapacity::All,
            (s, 0) => ExpertCapacity::Total(CacheCapacity::Slots(s as usize)),
            (s, q) if s == 0 || s == (q * layers) as u64 => {
                if q >= experts {
                    ExpertCapacity::All
                } else {
                    ExpertCapacity::PerLayer(q)
                }
            }
            (s, q) => {
                return Err(Failure::invalid(format!(
                    "cache_slots {s} disagrees with layer_quota {q} over {layers} layers (0 or {})",
                    q * layers
                )))
            }
        };
        match (c.shard_kind, c.shard_size) {
            (0, _) => {}
            (1, n) if c.shard_rank < n => {}
            (1, n) => {
                return Err(Failure::invalid(format!(
                    "shard_rank {} is outside 0..{n}",
                    c.shard_rank
                )))
            }
            (2, _) => {
                return Err(Failure::invalid(
                    "shard_kind 2 (expert parallel) is not supported yet: use 1 (tensor parallel)",
                ))
            }
            (k, _) => {
                return Err(Failure::invalid(format!(
                    "shard_kind {k}: 0 (none) or 1 (tensor parallel)"
                )))
            }
        }
        Ok(Settings {
            layers,
            experts,
            top_k,
            hidden,
            inter,
            dtype: Dtype::from_code(c.dtype, "dtype")?,
            device,
            capacity,
            policy: policy(c.policy)?,
            max_tokens: c.max_tokens as usize,
        })
    }

    /// The shape of projection `proj`: gate and up are `[inter, hidden]`, down `[hidden, inter]`.
    pub(crate) fn proj_shape(&self, proj: usize) -> (usize, usize) {
        if proj == 2 {
            (self.hidden, self.inter)
        } else {
            (self.inter, self.hidden)
        }
    }
}

/// The runtime a finalized service computes with.
pub(crate) enum Runtime {
    Cpu(Box<CpuRuntime>),
    Cuda(Box<crate::cuda::CudaService>),
}

/// Where a service is in its life.
pub(crate) enum Phase {
    /// Collecting experts, each projection in the service's dtype.
    Loading(HostStore),
    Ready(Runtime),
}

/// The step opened last and not yet ended.
pub(crate) struct OpenStep {
    pub id: u64,
    /// The step's routes (every layer's) for a planned step; empty for a per-layer step, whose
    /// routes come with each layer.
    pub routes: Vec<TokenRoute>,
    /// `Some(tokens)` for a step opened by `begin_step` (routes per layer).
    pub per_layer: Option<usize>,
}

/// The state behind a handle.
pub(crate) struct Service {
    pub settings: Settings,
    pub phase: Phase,
    pub open: Option<OpenStep>,
    pub last_step: u64,
    /// Speculative prefetch, once configured.
    pub spec: Option<crate::layered::Speculation>,
}

/// The CPU runtime: the experts, computed from host memory, and the cache's accounting. The cache
/// is this runtime's own (not [`CpuExperts`]'), so that speculative loads can be issued into it.
pub(crate) struct CpuRuntime {
    experts: CpuExperts,
    cache: Option<ExpertCache>,
    planner: PrefetchPlanner,
    stats: RuntimeStats,
    /// Bytes of the f32 experts.
    host_bytes: u64,
}

impl CpuRuntime {
    fn new(experts: CpuExperts, st: &Settings) -> CallResult<Self> {
        let cache = if st.capacity == ExpertCapacity::All {
            None
        } else {
            // A unit is counted with the bytes of the largest expert, as a device slot holds it.
            let unit_bytes = (0..st.layers)
                .flat_map(|l| (0..st.experts).map(move |e| (l, e)))
                .filter_map(|(l, e)| experts.expert(l, e).map(ExpertWeights::bytes))
                .max()
                .unwrap_or(1)
                .max(1) as u64;
            Some(
                st.capacity
                    .build_cache(st.layers, st.experts, unit_bytes, st.policy, || {
                        HostMemory::new().free_bytes()
                    })?,
            )
        };
        let host_bytes = (0..st.layers)
            .flat_map(|l| (0..st.experts).map(move |e| (l, e)))
            .filter_map(|(l, e)| experts.expert(l, e).map(|w| w.bytes() as u64))
            .sum();
        Ok(CpuRuntime {
            experts,
            cache,
            planner: PrefetchPlanner::default(),
            stats: RuntimeStats::default(),
            host_bytes,
        })
    }

    /// Belady's next uses from the coming steps; nothing is copied on the CPU, so no load.
    fn plan(&mut self, steps: &[StepExperts]) {
        if let Some(cache) = self.cache.as_mut() {
            prefetch::set_next_uses(cache, steps, 0);
        }
    }

    /// Issues the loads of `steps` ahead of use (accounted as prefetches); returns the units
    /// loaded.
    fn prefetch(&mut self, steps: &[StepExperts]) -> Vec<Unit> {
        let Some(cache) = self.cache.as_mut() else {
            return Vec::new();
        };
        let loads = self.planner.plan_into(cache, steps);
        self.stats.prefetches += loads.len() as u64;
        loads.iter().map(|p| p.unit).collect()
    }

    /// Whether `(layer, expert)` is resident (always, without a cache).
    fn resident(&self, layer: usize, expert: u16) -> bool {
        self.cache
            .as_ref()
            .is_none_or(|c| c.slot_of(Unit::new(layer, expert)).is_some())
    }

    fn forward(
        &mut self,
        layer: usize,
        x: &[f32],
        routes: &[TokenRoute],
        out: &mut [f32],
    ) -> CallResult {
        self.experts.check(layer, routes)?;
        let mut used = ExpertSet::default();
        for r in routes {
            for &e in r.experts() {
                used.insert(e);
            }
        }
        self.stats.waves += match self.cache.as_mut() {
            Some(cache) => run_waves(cache, layer, &used, |_, _| Ok(()))?,
            None => 1,
        };
        self.experts.forward_layer(layer, x, routes, out, false)?;
        self.stats.layer_calls += 1;
        Ok(())
    }

    fn end_step(&mut self) {
        if let Some(c) = self.cache.as_mut() {
            c.unpin_all();
        }
    }

    fn stats(&self) -> (RuntimeStats, Option<CacheStats>) {
        (self.stats, self.cache.as_ref().map(ExpertCache::stats))
    }
}

/// An opaque service handle (`PregateMoe *`). Calls on one handle are serialised by its lock.
pub struct PregateMoe(Mutex<Service>);

impl PregateMoe {
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Service) -> CallResult<T>) -> CallResult<T> {
        let mut s = self.0.lock().map_err(|_| {
            Failure::state("a previous call on this handle failed midway; destroy it")
        })?;
        f(&mut s)
    }
}

/// Reads the caller's config: at least this library's fields; the bytes of a newer, larger struct
/// must be zero (fields this library does not know left at their defaults).
///
/// # Safety
/// A non-null `cfg` must point to `cfg->struct_size` readable bytes.
unsafe fn read_config(cfg: *const PregateMoeConfig) -> CallResult<PregateMoeConfig> {
    // SAFETY: the caller's contract (at least the leading `struct_size`).
    let size = unsafe { ffi::non_null(cfg as *const u32, "cfg")? };
    let (size, ours) = (*size as usize, std::mem::size_of::<PregateMoeConfig>());
    if size < ours || size > 4096 {
        return Err(Failure::invalid(format!(
            "cfg->struct_size is {size}; this library's PregateMoeConfig has {ours} bytes \
             (compile against the pregate.h of ABI version {})",
            crate::ABI_VERSION
        )));
    }
    // SAFETY: `size` bytes are readable (the caller's contract), `size >= ours`.
    let bytes = unsafe { std::slice::from_raw_parts(cfg as *const u8, size) };
    if bytes[ours..].iter().any(|&b| b != 0) {
        return Err(Failure::invalid(
            "cfg sets fields newer than this library knows (non-zero bytes past its \
             PregateMoeConfig)",
        ));
    }
    // SAFETY: non-null, aligned (checked by `non_null`), at least `ours` readable bytes.
    Ok(unsafe { std::ptr::read(cfg) })
}

/// Creates a service of `cfg`'s shape and cache settings; `*out` receives the handle.
///
/// # Safety
/// `cfg` must point to `cfg->struct_size` readable bytes and `out` to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_create(
    cfg: *const PregateMoeConfig,
    out: *mut *mut PregateMoe,
) -> Status {
    guard("pregate_moe_create", || {
        // SAFETY: the caller's contract.
        let out = unsafe { ffi::non_null_mut(out, "out")? };
        *out = std::ptr::null_mut();
        // SAFETY: the caller's contract.
        let settings = Settings::new(&unsafe { read_config(cfg)? })?;
        if let Some(d) = settings.device {
            crate::cuda::check_device(d, &settings)?;
        }
        let units = product(
            settings.layers as u64,
            settings.experts as u64 * 3,
            "experts",
        )?;
        let service = Service {
            settings,
            phase: Phase::Loading(HostStore::new(settings.dtype, units)),
            open: None,
            last_step: 0,
            spec: None,
        };
        *out = Box::into_raw(Box::new(PregateMoe(Mutex::new(service))));
        Ok(())
    })
}

/// Copies one projection of one expert into the service's store, in the service's dtype (bits
/// copied when `src_dtype` is that dtype, else converted once, rounding to nearest).
///
/// # Safety
/// `m` must be a live handle; `host_src` must point to `(rows - 1) * row_stride + cols` readable
/// elements of `src_dtype`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn pregate_moe_set_expert(
    m: *mut PregateMoe,
    layer: u32,
    expert: u32,
    proj: i32,
    src_dtype: i32,
    host_src: *const c_void,
    rows: u64,
    cols: u64,
    row_stride: u64,
) -> Status {
    guard("pregate_moe_set_expert", || {
        // SAFETY: the caller's contract.
        let m = unsafe { ffi::non_null(m, "m")? };
        m.with(|s| {
            let st = s.settings;
            let (l, e) = (layer as usize, expert as usize);
            if l >= st.layers || e >= st.experts {
                return Err(Failure::invalid(format!(
                    "(layer {l}, expert {e}) is outside {} layers x {} experts",
                    st.layers, st.experts
                )));
            }
            let p = usize::try_from(proj)
                .ok()
                .filter(|&p| p < 3)
                .ok_or_else(|| Failure::invalid(format!("proj {proj}: 0 gate, 1 up or 2 down")))?;
            let dtype = Dtype::from_code(src_dtype, "src_dtype")?;
            let want = st.proj_shape(p);
            if (rows, cols) != (want.0 as u64, want.1 as u64) || row_stride < cols {
                return Err(Failure::invalid(format!(
                    "(layer {l}, expert {e}, {}): got [{rows}, {cols}] with row stride \
                     {row_stride}, expected [{}, {}] with a row stride of at least {}",
                    PROJ_NAMES[p], want.0, want.1, want.1
                )));
            }
            let Phase::Loading(store) = &mut s.phase else {
                return Err(Failure::state(
                    "set_expert after finalize: experts are fixed once finalized",
                ));
            };
            // SAFETY: the extent is the caller's contract; null and alignment are checked.
            let read = unsafe {
                read_matrix_as(
                    dtype,
                    st.dtype,
                    host_src as *const u8,
                    want.0,
                    want.1,
                    row_stride as usize,
                )?
            };
            if let Some((bad, v)) = read.non_finite {
                let beyond = if v.is_finite() {
                    format!(", beyond the range of the service's {}", st.dtype.name())
                } else {
                    String::new()
                };
                return Err(Failure::invalid(format!(
                    "(layer {l}, expert {e}, {}): element {bad} is {v}{beyond}",
                    PROJ_NAMES[p]
                )));
            }
            store.set((l * st.experts + e) * 3 + p, read.bytes);
            Ok(())
        })
    })
}

/// Device memory the caller allocates for `finalize`: the expert slot pool and the workspace
/// (both 0 on the CPU).
///
/// # Safety
/// `m` must be a live handle; `slot_pool` and `workspace` writable `uint64_t`s.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_device_bytes(
    m: *const PregateMoe,
    slot_pool: *mut u64,
    workspace: *mut u64,
) -> Status {
    guard("pregate_moe_device_bytes", || {
        // SAFETY: the caller's contract.
        let (m, pool, ws) = unsafe {
            (
                ffi::non_null(m, "m")?,
                ffi::non_null_mut(slot_pool, "slot_pool")?,
                ffi::non_null_mut(workspace, "workspace")?,
            )
        };
        m.with(|s| {
            (*pool, *ws) = match s.settings.device {
                None => (0, 0),
                Some(_) => crate::cuda::device_bytes(&s.settings)?,
            };
            Ok(())
        })
    })
}

/// Checks that every expert is present and builds the runtime.
///
/// # Safety
/// `m` must be a live handle. On CUDA, `slot_pool` and `workspace` are device memory of the
/// sizes given, alive until `destroy`.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_finalize(
    m: *mut PregateMoe,
    slot_pool: *mut c_void,
    slot_pool_bytes: u64,
    workspace: *mut c_void,
    workspace_bytes: u64,
) -> Status {
    guard("pregate_moe_finalize", || {
        // SAFETY: the caller's contract.
        let m = unsafe { ffi::non_null(m, "m")? };
        m.with(|s| {
            let st = s.settings;
            let Phase::Loading(store) = &mut s.phase else {
                return Err(Failure::state("finalize called twice"));
            };
            let missing = store.missing();
            if let Some(&first) = missing.first() {
                let (l, e, p) = (first / 3 / st.experts, first / 3 % st.experts, first % 3);
                return Err(Failure::invalid(format!(
                    "{} of {} expert projections were not set; the first is (layer {l}, expert \
                     {e}, {})",
                    missing.len(),
                    store.len(),
                    PROJ_NAMES[p]
                )));
            }
            if st.device.is_none() && (!slot_pool.is_null() || !workspace.is_null()) {
                return Err(Failure::invalid(
                    "slot_pool and workspace must be NULL on the CPU",
                ));
            }
            let runtime = match st.device {
                None => {
                    let experts = store.take_f32(&st);
                    let shared = vec![None; st.layers];
                    let cpu = CpuExperts::new(experts, shared, st.hidden, st.top_k)?;
                    Runtime::Cpu(Box::new(CpuRuntime::new(cpu, &st)?))
                }
                Some(_) => {
                    // SAFETY: the regions are the caller's device memory of the sizes given,
                    // alive until `destroy` (this function's contract).
                    // On failure the experts not yet packed stay in the store for a retry.
                    let built = unsafe {
                        crate::cuda::CudaService::new(
                            &st,
                            store,
                            (slot_pool, slot_pool_bytes),
                            (workspace, workspace_bytes),
                        )
                    };
                    Runtime::Cuda(Box::new(built?))
                }
            };
            s.phase = Phase::Ready(runtime);
            Ok(())
        })
    })
}

/// Reads `tokens x top_k` routes (expert ids and weights, row-major) into token routes.
pub(crate) fn read_routes(
    st: &Settings,
    ids: &[i32],
    weights: &[f32],
    top_k: usize,
) -> CallResult<Vec<TokenRoute>> {
    let mut routes = Vec::with_capacity(ids.len() / top_k.max(1));
    let mut experts = Vec::with_capacity(top_k);
    for (t, (ids, ws)) in ids
        .chunks_exact(top_k)
        .zip(weights.chunks_exact(top_k))
        .enumerate()
    {
        experts.clear();
        for (&e, &w) in ids.iter().zip(ws) {
            if e < 0 || e as usize >= st.experts {
                return Err(Failure::invalid(format!(
                    "token {t}: expert {e} is outside 0..{}",
                    st.experts
                )));
            }
            if !w.is_finite() {
                return Err(Failure::invalid(format!(
                    "token {t}: expert {e} has weight {w}"
                )));
            }
            experts.push(e as u16);
        }
        let route = TokenRoute::new(&experts, ws)
            .map_err(|e| Failure::invalid(format!("token {t}: {}", Failure::from(e).message)))?;
        routes.push(route);
    }
    Ok(routes)
}

/// Checks a step's token count and top-k against the settings.
pub(crate) fn check_counts(st: &Settings, tokens: u64, top_k: u32) -> CallResult<(usize, usize)> {
    let k = top_k as usize;
    if k == 0 || k > st.top_k {
        return Err(Failure::invalid(format!(
            "top_k {k} must be 1..={} (the service's top_k)",
            st.top_k
        )));
    }
    let n = usize::try_from(tokens).map_err(|_| Failure::invalid("num_tokens overflows"))?;
    if st.max_tokens > 0 && n > st.max_tokens {
        return Err(Failure::invalid(format!(
            "{n} tokens in one step; the service was created for at most {}",
            st.max_tokens
        )));
    }
    Ok((n, k))
}

/// Plans a step: `num_tokens` routes of `top_k` experts (host memory, row-major), the same at
/// every layer. Ends a step still open. `*step_id` receives the step's id.
///
/// # Safety
/// `m` must be a live handle; `topk_ids_host` and `topk_w_host` must point to
/// `num_tokens * top_k` readable elements; `step_id` to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_plan_step(
    m: *mut PregateMoe,
    topk_ids_host: *const i32,
    topk_w_host: *const f32,
    num_tokens: u64,
    top_k: u32,
    stream: u64,
    step_id: *mut u64,
) -> Status {
    guard("pregate_moe_plan_step", || {
        // SAFETY: the caller's contract.
        let (m, step_out) = unsafe {
            (
                ffi::non_null(m, "m")?,
                ffi::non_null_mut(step_id, "step_id")?,
            )
        };
        m.with(|s| {
            let st = s.settings;
            let (n, k) = check_counts(&st, num_tokens, top_k)?;
            let len = n * k;
            // SAFETY: the caller's contract (`len` elements each).
            let (ids, ws) = unsafe {
                (
                    ffi::slice(topk_ids_host, len, "topk_ids_host")?,
                    ffi::slice(topk_w_host, len, "topk_w_host")?,
                )
            };
            let routes = read_routes(&st, ids, ws, k)?;
            let Phase::Ready(runtime) = &mut s.phase else {
                return Err(Failure::state("plan_step before finalize"));
            };
            if s.open.take().is_some() {
                runtime.end_step(stream)?;
            }
            let mut used = ExpertSet::default();
            for r in &routes {
                for &e in r.experts() {
                    used.insert(e);
                }
            }
            runtime.plan(&[StepExperts::AllLayers(used)], stream)?;
            s.last_step += 1;
            s.open = Some(OpenStep {
                id: s.last_step,
                routes,
                per_layer: None,
            });
            *step_out = s.last_step;
            Ok(())
        })
    })
}

impl Runtime {
    pub(crate) fn plan(&mut self, steps: &[StepExperts], stream: u64) -> CallResult {
        match self {
            Runtime::Cpu(c) => {
                c.plan(steps);
                Ok(())
            }
            Runtime::Cuda(c) => c.plan(steps, stream),
        }
    }

    /// Loads the units of `steps` ahead of use, on the copy stream (CUDA) or in the accounting
    /// (CPU); returns the units loaded.
    pub(crate) fn prefetch(&mut self, steps: &[StepExperts], stream: u64) -> CallResult<Vec<Unit>> {
        match self {
            Runtime::Cpu(c) => Ok(c.prefetch(steps)),
            Runtime::Cuda(c) => c.prefetch(steps, stream),
        }
    }

    /// Whether `(layer, expert)` is in a slot now.
    pub(crate) fn resident(&self, layer: usize, expert: u16) -> bool {
        match self {
            Runtime::Cpu(c) => c.resident(layer, expert),
            Runtime::Cuda(c) => c.resident(layer, expert),
        }
    }

    /// One layer's experts for `routes`: host `x` and `out` on the CPU, device ones on CUDA.
    ///
    /// # Safety
    /// `x` holds `routes.len()` rows `x_row_stride` elements apart, `out` `routes.len() * hidden`
    /// writable elements, of the service's dtype.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn forward(
        &mut self,
        st: &Settings,
        layer: usize,
        x: *const c_void,
        x_row_stride: u64,
        routes: &[TokenRoute],
        out: *mut c_void,
        stream: u64,
    ) -> CallResult {
        match self {
            Runtime::Cpu(cpu) => {
                let (n, h) = (routes.len(), st.hidden);
                let mut xs = Vec::with_capacity(n * h);
                // SAFETY: this function's contract on `x`'s extent.
                unsafe {
                    read_matrix(
                        st.dtype,
                        x as *const u8,
                        n,
                        h,
                        x_row_stride as usize,
                        &mut xs,
                    )?
                };
                let mut y = vec![0.0f32; n * h];
                cpu.forward(layer, &xs, routes, &mut y)?;
                // SAFETY: this function's contract on `out`'s extent.
                unsafe { write_values(st.dtype, &y, out as *mut u8) }
            }
            Runtime::Cuda(c) => c.forward_layer(layer, x, x_row_stride, routes, out, stream),
        }
    }

    pub(crate) fn end_step(&mut self, stream: u64) -> CallResult {
        match self {
            Runtime::Cpu(c) => {
                c.end_step();
                Ok(())
            }
            Runtime::Cuda(c) => c.end_step(stream),
        }
    }

    fn stats(&self) -> PregateMoeStats {
        let (rt, cache) = match self {
            Runtime::Cpu(c) => c.stats(),
            Runtime::Cuda(c) => c.stats(),
        };
        let cache = cache.unwrap_or_default();
        PregateMoeStats {
            struct_size: std::mem::size_of::<PregateMoeStats>() as u32,
            reserved: 0,
            hits: cache.hits,
            misses: cache.misses,
            evictions: cache.evictions,
            bytes_loaded: cache.bytes_loaded,
            prefetches: rt.prefetches,
            layer_calls: rt.layer_calls,
            waves: rt.waves,
            stall_s: rt.stall_seconds,
        }
    }
}

/// Runs the experts of `layer` for the step `step_id`: `out[t] = sum_j w_j FFN_{e_j}(x[t])` over
/// `num_tokens` rows. CPU: host pointers, and `topk_ids` / `topk_w` are read (they must name the
/// plan's token count). CUDA: device pointers on `stream`; the plan's routes are used.
///
/// # Safety
/// `m` must be a live handle; `x` must hold `num_tokens` rows `x_row_stride` elements apart (of the
/// service's dtype), `out` `num_tokens * hidden` writable elements, and on the CPU `topk_ids` and
/// `topk_w` `num_tokens * top_k` elements each.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn pregate_moe_layer_forward(
    m: *mut PregateMoe,
    step_id: u64,
    layer: u32,
    x: *const c_void,
    x_row_stride: u64,
    topk_ids: *const i32,
    topk_w: *const f32,
    num_tokens: u64,
    out: *mut c_void,
    stream: u64,
) -> Status {
    guard("pregate_moe_layer_forward", || {
        // SAFETY: the caller's contract.
        let m = unsafe { ffi::non_null(m, "m")? };
        m.with(|s| {
            let st = s.settings;
            let Phase::Ready(runtime) = &mut s.phase else {
                return Err(Failure::state("layer_forward before finalize"));
            };
            let step = match &s.open {
                Some(o) if o.id == step_id => o,
                Some(o) => {
                    return Err(Failure::state(format!(
                        "layer_forward for step {step_id}, but the open step is {}",
                        o.id
                    )))
                }
                None => {
                    return Err(Failure::state(format!(
                        "layer_forward for step {step_id} without a plan: call plan_step first"
                    )))
                }
            };
            if step.per_layer.is_some() {
                return Err(Failure::state(format!(
                    "step {step_id} was opened by begin_step: its layers take their routes with \
                     pregate_moe_layer_forward_routed"
                )));
            }
            let (l, n, h) = (layer as usize, num_tokens as usize, st.hidden);
            if l >= st.layers {
                return Err(Failure::invalid(format!(
                    "layer {l} is outside 0..{}",
                    st.layers
                )));
            }
            if num_tokens != step.routes.len() as u64 {
                return Err(Failure::invalid(format!(
                    "{num_tokens} tokens, but step {step_id} was planned for {}",
                    step.routes.len()
                )));
            }
            if x_row_stride < h as u64 {
                return Err(Failure::invalid(format!(
                    "x_row_stride {x_row_stride} is below hidden {h}"
                )));
            }
            let cpu_routes;
            let routes = match runtime {
                Runtime::Cpu(_) => {
                    let k = step.routes.first().map_or(st.top_k, |r| r.experts().len());
                    // SAFETY: the caller's contract (`n * k` elements each).
                    let (ids, ws) = unsafe {
                        (
                            ffi::slice(topk_ids, n * k, "topk_ids")?,
                            ffi::slice(topk_w, n * k, "topk_w")?,
                        )
                    };
                    cpu_routes = read_routes(&st, ids, ws, k)?;
                    &cpu_routes
                }
                Runtime::Cuda(_) => &step.routes,
            };
            // SAFETY: the caller's contract on `x` and `out` (`n` rows, checked above).
            unsafe { runtime.forward(&st, l, x, x_row_stride, routes, out, stream) }
        })
    })
}

/// Ends the step `step_id`: its experts are unpinned.
///
/// # Safety
/// `m` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_step_end(
    m: *mut PregateMoe,
    step_id: u64,
    stream: u64,
) -> Status {
    guard("pregate_moe_step_end", || {
        // SAFETY: the caller's contract.
        let m = unsafe { ffi::non_null(m, "m")? };
        m.with(|s| {
            let Phase::Ready(runtime) = &mut s.phase else {
                return Err(Failure::state("step_end before finalize"));
            };
            match &s.open {
                Some(o) if o.id == step_id => {}
                _ => {
                    return Err(Failure::state(format!(
                        "step {step_id} is not the open step"
                    )))
                }
            }
            s.open = None;
            runtime.end_step(stream)
        })
    })
}

/// Writes the service's counters to `*out` (whose `struct_size` the caller sets).
///
/// # Safety
/// `m` must be a live handle; `out` must point to `out->struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_stats(
    m: *const PregateMoe,
    out: *mut PregateMoeStats,
) -> Status {
    guard("pregate_moe_stats", || {
        // SAFETY: the caller's contract.
        let (m, out) = unsafe { (ffi::non_null(m, "m")?, ffi::non_null_mut(out, "out")?) };
        let ours = std::mem::size_of::<PregateMoeStats>();
        if (out.struct_size as usize) < ours {
            return Err(Failure::invalid(format!(
                "out->struct_size is {}; this library's PregateMoeStats has {ours} bytes",
                out.struct_size
            )));
        }
        *out = m.with(|s| Ok(s.stats()))?;
        Ok(())
    })
}

/// Writes to `*out` the host bytes the service holds for its experts: while loading, the
/// projections set so far in the service's dtype (2 bytes per bf16 or f16 element, 4 per f32);
/// once finalized on the CPU, the f32 experts it computes with; on CUDA, the page-locked copy that
/// feeds an expert cache smaller than the experts (0 when every expert lives in a device slot).
///
/// # Safety
/// `m` must be a live handle; `out` a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_host_bytes(m: *const PregateMoe, out: *mut u64) -> Status {
    guard("pregate_moe_host_bytes", || {
        // SAFETY: the caller's contract.
        let (m, out) = unsafe { (ffi::non_null(m, "m")?, ffi::non_null_mut(out, "out")?) };
        *out = m.with(|s| Ok(s.host_bytes()))?;
        Ok(())
    })
}

impl Service {
    /// Host bytes held for the experts (see [`pregate_moe_host_bytes`]).
    fn host_bytes(&self) -> u64 {
        match &self.phase {
            Phase::Loading(store) => store.bytes(),
            Phase::Ready(Runtime::Cpu(c)) => c.host_bytes,
            Phase::Ready(Runtime::Cuda(c)) => c.host_bytes(),
        }
    }

    fn stats(&self) -> PregateMoeStats {
        match &self.phase {
            Phase::Ready(r) => r.stats(),
            Phase::Loading(_) => PregateMoeStats {
                struct_size: std::mem::size_of::<PregateMoeStats>() as u32,
                ..Default::default()
            },
        }
    }
}

/// The service's counters in Prometheus' text format.
pub fn metrics_text(stats: &PregateMoeStats) -> CallResult<String> {
    metrics_text_with(stats, None, None)
}

/// The service's counters, the host bytes it holds for its experts when given (see
/// [`pregate_moe_host_bytes`]) and, with speculation on, its recall per distance and speculative
/// loads, in Prometheus' text format. Names as pregate's own metrics (`pregate_prediction_*`,
/// `pregate_speculative_*`) where they mean the same.
pub fn metrics_text_with(
    stats: &PregateMoeStats,
    spec: Option<&crate::layered::PregateMoeSpecStats>,
    host_bytes: Option<u64>,
) -> CallResult<String> {
    use prometheus::{
        Counter, Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
        TextEncoder,
    };
    let registry = Registry::new();
    let internal = |e: prometheus::Error| Failure::new(ErrorCode::Internal, e.to_string());
    let counters: [(&str, &str, u64); 7] = [
        (
            "pregate_moe_cache_hits_total",
            "Expert cache accesses that found their expert resident",
            stats.hits,
        ),
        (
            "pregate_moe_cache_misses_total",
            "Expert cache accesses that loaded their expert",
            stats.misses,
        ),
        (
            "pregate_moe_cache_evictions_total",
            "Experts evicted from the cache",
            stats.evictions,
        ),
        (
            "pregate_moe_loaded_bytes_total",
            "Bytes copied into expert slots",
            stats.bytes_loaded,
        ),
        (
            "pregate_moe_prefetches_total",
            "Expert loads issued ahead of use by a plan",
            stats.prefetches,
        ),
        (
            "pregate_moe_layer_calls_total",
            "Layer forwards run",
            stats.layer_calls,
        ),
        ("pregate_moe_waves_total", "Expert waves run", stats.waves),
    ];
    for (name, help, value) in counters {
        let c = IntCounter::with_opts(Opts::new(name, help)).map_err(internal)?;
        c.inc_by(value);
        registry.register(Box::new(c)).map_err(internal)?;
    }
    let stall = Counter::with_opts(Opts::new(
        "pregate_moe_stall_seconds_total",
        "Seconds compute waited for expert loads",
    ))
    .map_err(internal)?;
    stall.inc_by(stats.stall_s.max(0.0));
    registry.register(Box::new(stall)).map_err(internal)?;
    let accesses = stats.hits + stats.misses;
    let ratio = Gauge::with_opts(Opts::new(
        "pregate_moe_cache_hit_ratio",
        "Hits over cache accesses since the service was created (0 before any access)",
    ))
    .map_err(internal)?;
    ratio.set(if accesses == 0 {
        0.0
    } else {
        stats.hits as f64 / accesses as f64
    });
    registry.register(Box::new(ratio)).map_err(internal)?;
    if let Some(bytes) = host_bytes {
        let held = IntGauge::with_opts(Opts::new(
            "pregate_moe_host_expert_bytes",
            "Host bytes held for the experts (the store while loading; the f32 experts on the \
             CPU; the page-locked copy on CUDA)",
        ))
        .map_err(internal)?;
        held.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        registry.register(Box::new(held)).map_err(internal)?;
    }
    if let Some(sp) = spec.filter(|sp| sp.depth > 0) {
        let by_distance = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["distance"]).map_err(internal)
        };
        let hits = by_distance(
            "pregate_prediction_hits_total",
            "Exact experts of a layer that speculation predicted `distance` layers ahead",
        )?;
        let misses = by_distance(
            "pregate_prediction_misses_total",
            "Exact experts of a layer that speculation did not predict `distance` layers ahead",
        )?;
        let recall = GaugeVec::new(
            Opts::new(
                "pregate_prediction_recall",
                "Share of a layer's exact experts predicted `distance` layers ahead",
            ),
            &["distance"],
        )
        .map_err(internal)?;
        for j in 0..sp.depth as usize {
            let d = (j + 1).to_string();
            hits.with_label_values(&[d.as_str()]).inc_by(sp.hits[j]);
            misses.with_label_values(&[d.as_str()]).inc_by(sp.misses[j]);
            let n = sp.hits[j] + sp.misses[j];
            if n > 0 {
                recall
                    .with_label_values(&[d.as_str()])
                    .set(sp.hits[j] as f64 / n as f64);
            }
        }
        registry.register(Box::new(hits)).map_err(internal)?;
        registry.register(Box::new(misses)).map_err(internal)?;
        registry.register(Box::new(recall)).map_err(internal)?;
        let loads: [(&str, &str, u64); 3] = [
            (
                "pregate_speculative_loads_total",
                "Expert loads issued on a speculative prediction",
                sp.loads,
            ),
            (
                "pregate_speculative_used_loads_total",
                "Speculative expert loads their layer used",
                sp.used,
            ),
            (
                "pregate_speculative_wasted_loads_total",
                "Speculative expert loads evicted before their layer used them",
                sp.wasted,
            ),
        ];
        for (name, help, value) in loads {
            let c = IntCounter::with_opts(Opts::new(name, help)).map_err(internal)?;
            c.inc_by(value);
            registry.register(Box::new(c)).map_err(internal)?;
        }
    }
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .map_err(internal)?;
    String::from_utf8(text).map_err(|e| Failure::new(ErrorCode::Internal, e.to_string()))
}

/// Writes the service's counters in Prometheus' text format, NUL-terminated, to `buf` when
/// `*needed` (the text's bytes plus the NUL) fits in `cap`; `buf` is untouched otherwise (call
/// again with a larger one).
///
/// # Safety
/// `m` must be a live handle; `buf` must point to `cap` writable bytes (or be NULL with `cap`
/// 0); `needed` to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_metrics_text(
    m: *const PregateMoe,
    buf: *mut std::ffi::c_char,
    cap: usize,
    needed: *mut usize,
) -> Status {
    guard("pregate_moe_metrics_text", || {
        // SAFETY: the caller's contract.
        let (m, needed) = unsafe { (ffi::non_null(m, "m")?, ffi::non_null_mut(needed, "needed")?) };
        let (stats, spec, held) = m.with(|s| Ok((s.stats(), s.spec_stats(), s.host_bytes())))?;
        let text = metrics_text_with(&stats, Some(&spec), Some(held))?;
        *needed = text.len() + 1;
        if cap >= *needed {
            // SAFETY: `cap` writable bytes (the caller's contract), `cap >= len + 1`.
            let out = unsafe { ffi::slice_mut(buf as *mut u8, *needed, "buf")? };
            out[..text.len()].copy_from_slice(text.as_bytes());
            out[text.len()] = 0;
        }
        Ok(())
    })
}

/// Destroys a handle (NULL: nothing). Waits for the handle's own device work; caller-owned memory
/// is left alone.
///
/// # Safety
/// `m` must be NULL or a handle from `pregate_moe_create` not yet destroyed, used by no other
/// thread.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_destroy(m: *mut PregateMoe) {
    let _ = guard("pregate_moe_destroy", || {
        if !m.is_null() {
            // SAFETY: a handle from `Box::into_raw` in `pregate_moe_create`, destroyed once (the
            // caller's contract).
            drop(unsafe { Box::from_raw(m) });
        }
        Ok(())
    });
}
