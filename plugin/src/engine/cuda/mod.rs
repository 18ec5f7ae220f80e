//! The CUDA backend: the whole backbone on an NVIDIA GPU through `pregate-kernels`.
//!
//! - **Weights**: dense tensors (embedding, attention, norms, lm_head, the shared expert part) are
//!   uploaded once in the compute type `T` (bf16 for serving; f32 for exact comparison with the CPU
//!   engine): bf16 checkpoint bytes are used as they are, other dtypes are converted on the host.
//!   Routed experts live in the expert cache ([`crate::cache`]) over [`CudaExpertMemory`]: equal
//!   device slots, filled on a dedicated copy stream from a page-locked host copy of every expert
//!   (or, when every expert fits, filled once at start and never evicted).
//! - **KV cache**: paged, on the device (`kv.rs`); a sequence reserves its blocks when it is added.
//! - **A step** (`forward`) runs decode tokens and prefill chunks of many sequences together: one
//!   packed batch of tokens, per layer RMSNorm, one fused QKV GEMM, RoPE, a KV-cache write, paged
//!   attention, the output GEMM and residual add, RMSNorm, then the routed experts as permute ->
//!   grouped expert FFN -> weighted combine into the residual. Nothing synchronises the host inside
//!   a step except the final read of the logits.
//! - **The router** runs on the host by default ([`crate::router`], driven by the engine, batched
//!   over a step's sequences), or on the device with [`RouterPlacement::Device`] (`router.rs`): the
//!   same f32 block from the backbone's kernels, a paged router KV cache beside the backbone's,
//!   and only the logits read back. Either way the routes reach the host before the step is
//!   launched, since the batcher and the cache's prefetch planner need them. On the host the
//!   router reads each sequence's router KV cache every step (4 KiB per token of context), which
//!   at long contexts and large batches is a large share of a device step.
//! - **Streams**: one compute stream (kernels and cuBLAS) and one copy stream (expert loads), both
//!   driven from the engine's thread; cross-stream order is events per cache slot (see
//!   [`CudaExpertMemory`]), so compute waits only for the experts it is about to read.

mod kv;
mod router;
mod weights;

use std::sync::{Arc, Mutex};

use std::time::Instant;

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream};
use half::bf16;
use pregate_kernels::{
    AttentionShape, Blas, ExpertPlan, ExpertWeights, FfnDims, KernelSet, MoePermutation,
    PagedKvLayout,
};

use super::backend::{Backend, ForwardChunk, Lookahead, SeqId};
use super::Engine;
use crate::cache::cuda::CudaExpertMemory;
use crate::cache::{
    EvictionPolicy, ExpertCache, ExpertStore, Lookup, PrefetchPlanner, StepExperts, Unit,
};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{names, ExpertLayout, ModelDir};
use crate::route::ExpertId;
use crate::router::ReadMeRouter;

use kv::PagedKv;
use router::DeviceRouter;
use weights::{pack_ffn, upload, upload_stacked, DeviceElem, OneUnit, PinnedExperts, UnitShape};

pub(crate) fn dev(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::device("CUDA engine", e)
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
        }
    }
}

impl CudaOptions {
    /// Defaults for device `ordinal`, overridden by the environment (for hosts such as Triton that
    /// pass no flags; `EngineOptions` and the CLI flags override it in turn):
    /// `PREGATE_CUDA_DTYPE` (`bf16`, `f32`), `PREGATE_EXPERT_CACHE` (`all`, `N` experts per layer,
    /// `NGiB`/`NMiB` bytes, or `0.F` of free memory), `PREGATE_CACHE_POLICY` (`belady`, `lru`, ...),
    /// `PREGATE_PREFETCH` (`0` to load on demand), `PREGATE_KV_TOKENS`, `PREGATE_ROUTER` (`host`,
    /// `device`).
    pub fn from_env(ordinal: usize) -> Result<Self> {
        let mut o = CudaOptions {
            ordinal,
            ..CudaOptions::default()
        };
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(v) = var("PREGATE_CUDA_DTYPE") {
            o.dtype = v.parse()?;
        }
        if let Some(v) = var("PREGATE_EXPERT_CACHE") {
            o.experts = v.parse()?;
        }
        if let Some(v) = var("PREGATE_CACHE_POLICY") {
            o.policy = v.parse()?;
        }
        if let Some(v) = var("PREGATE_PREFETCH") {
            o.prefetch = v != "0";
        }
        if let Some(v) = var("PREGATE_ROUTER") {
            o.router = v.parse()?;
        }
        if let Some(v) = var("PREGATE_KV_TOKENS") {
            o.kv_tokens = Some(v.parse().map_err(|_| {
                Error::InvalidArgument(format!("PREGATE_KV_TOKENS `{v}` is not a number"))
            })?);
        }
        Ok(o)
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
}

impl CudaHandle {
    /// A copy of the counters.
    pub fn snapshot(&self) -> CudaStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

/// Opens the model in `model` on the GPU and returns an engine, plus a handle on the backend.
pub fn open_cuda_engine(model: &ModelDir, opts: &CudaOptions) -> Result<(Engine, Arc<CudaHandle>)> {
    let weights = crate::model::RouterWeights::load(&model.checkpoint, &model.config)?;
    let on_device = (opts.router == RouterPlacement::Device).then_some(&weights);
    let (backend, stats): (Box<dyn Backend>, _) = match opts.dtype {
        CudaDtype::Bf16 => {
            let mut b = CudaBackend::<bf16>::new(model, opts)?;
            if let Some(w) = on_device {
                b.run_router(w)?;
            }
            let s = b.stats();
            (Box::new(b), s)
        }
        CudaDtype::F32 => {
            let mut b = CudaBackend::<f32>::new(model, opts)?;
            if let Some(w) = on_device {
                b.run_router(w)?;
            }
            let s = b.stats();
            (Box::new(b), s)
        }
    };
    // The host router selects the experts from the device's logits, or routes when the device
    // does not.
    let router = ReadMeRouter::new(weights, &model.config);
    Ok((Engine::new(backend, router), stats))
}

/// Per-layer dense weights.
struct LayerWeights<T> {
    input_norm: CudaSlice<T>,
    /// q, k, v rows stacked: `[(nH + 2 nKV) d, H]`.
    qkv: CudaSlice<T>,
    o: CudaSlice<T>,
    post_norm: CudaSlice<T>,
    /// The residual layout's always-active part: `gate_up [2 I_r, H]`, `down [H, I_r]`.
    shared: Option<(CudaSlice<T>, CudaSlice<T>)>,
}

/// Step buffers, grown to the largest step seen.
struct Workspace<T> {
    tokens: usize,
    logit_rows: usize,
    x: CudaSlice<T>,
    h: CudaSlice<T>,
    qkv: CudaSlice<T>,
    att: CudaSlice<T>,
    o: CudaSlice<T>,
    x_perm: CudaSlice<T>,
    gate_up: CudaSlice<T>,
    act: CudaSlice<T>,
    y_perm: CudaSlice<T>,
    perm: MoePermutation,
    ids: CudaSlice<u32>,
    ints: CudaSlice<i32>,
    pair_w: CudaSlice<f32>,
    last: CudaSlice<T>,
    normed: CudaSlice<T>,
    logits: CudaSlice<f32>,
}

/// The CUDA backend over storage type `T` (`bf16` or `f32`).
pub struct CudaBackend<T: DeviceElem> {
    cfg: ModelConfig,
    device: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: KernelSet,
    blas: Blas,
    embed: CudaSlice<T>,
    lm_head: Option<CudaSlice<T>>,
    norm: CudaSlice<T>,
    layers: Vec<LayerWeights<T>>,
    /// Each layer's routed expert shape (the width may differ between layers).
    units: Vec<UnitShape>,
    shared_inter: usize,
    store: ExpertStore<CudaExpertMemory>,
    source: Option<PinnedExperts>,
    planner: PrefetchPlanner,
    prefetch: bool,
    kv: PagedKv<T>,
    /// The router, when it runs on the device ([`RouterPlacement::Device`]).
    router: Option<DeviceRouter>,
    ws: Option<Workspace<T>>,
    top_k: usize,
    measure_stalls: bool,
    stalls: Vec<(CudaEvent, CudaEvent)>,
    stats: Arc<CudaHandle>,
}

impl<T: DeviceElem> CudaBackend<T> {
    /// Loads `model` onto device `opts.ordinal`.
    pub fn new(model: &ModelDir, opts: &CudaOptions) -> Result<Self> {
        let cfg = model.config.clone();
        if model.layout == ExpertLayout::Masked {
            return Err(crate::model::load::masked_layout_error(&model.dir));
        }
        let ctx = pregate_kernels::open_device(opts.ordinal).map_err(dev)?;
        // SAFETY: this backend orders its two streams itself (per-slot events, stream order) and
        // frees nothing while a stream may still use it (drops happen after a synchronisation or
        // are stream-ordered frees on the allocating stream); see CudaExpertMemory.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(dev)?;
        let copy = ctx.new_stream().map_err(dev)?;
        let kernels = KernelSet::new(&ctx).map_err(dev)?;
        let blas = Blas::new(&stream).map_err(dev)?;
        let ck = &model.checkpoint;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let d = cfg.head_dim();
        let (qd, kvd) = (cfg.num_attention_heads * d, cfg.num_kv_heads() * d);
        let embed = upload::<T>(&stream, ck, names::EMBED, &[v, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(upload::<T>(&stream, ck, names::LM_HEAD, &[v, h])?)
        };
        let norm = upload::<T>(&stream, ck, names::FINAL_NORM, &[h])?;
        let mut units = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let gate = ck.tensor(&names::expert_tensor_names(l, 0)[0])?;
            units.push(UnitShape {
                hidden: h,
                inter: gate.shape.first().copied().unwrap_or(0),
                elem: std::mem::size_of::<T>(),
            });
        }
        let mut shared_inter = 0;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let [inorm, q, k, vv, o, pnorm] = names::attention_tensor_names(l);
            let shared = if model.layout == ExpertLayout::Residual {
                let sn = names::shared_tensor_names(l);
                let ir = ck.tensor(&sn[0])?.shape[0];
                shared_inter = shared_inter.max(ir);
                let gu = upload_stacked::<T>(&stream, ck, &[(&sn[0], ir), (&sn[1], ir)], h)?;
                let dn = upload::<T>(&stream, ck, &sn[2], &[h, ir])?;
                Some((gu, dn))
            } else {
                None
            };
            layers.push(LayerWeights {
                input_norm: upload::<T>(&stream, ck, &inorm, &[h])?,
                qkv: upload_stacked::<T>(&stream, ck, &[(&q, qd), (&k, kvd), (&vv, kvd)], h)?,
                o: upload::<T>(&stream, ck, &o, &[h, qd])?,
                post_norm: upload::<T>(&stream, ck, &pnorm, &[h])?,
                shared,
            });
        }
        stream.synchronize().map_err(dev)?;
        let (nl, ne) = (cfg.num_hidden_layers, cfg.n_cluster);
        let unit_bytes = units.iter().map(UnitShape::bytes).max().unwrap_or(1) as u64;
        let memory = CudaExpertMemory::new(&ctx, &copy)?;
        let cache = opts
            .experts
            .build_cache(nl, ne, unit_bytes, opts.policy, || {
                crate::cache::MemoryBackend::free_bytes(&memory)
            })?;
        let all_resident = cache.capacity() >= nl * ne;
        let mut store = ExpertStore::new(cache, memory)?;
        let source = if all_resident {
            // Fill every slot once from pageable memory; nothing is ever evicted.
            let mut one = OneUnit(Vec::new());
            for (l, &unit) in units.iter().enumerate() {
                one.0.resize(unit.bytes(), 0);
                for e in 0..ne {
                    pack_ffn::<T>(ck, &names::expert_tensor_names(l, e), unit, &mut one.0)?;
                    let u = Unit::new(l, e as ExpertId);
                    store.cache_mut().prefetch(u)?;
                    let slot = store
                        .cache()
                        .slot_of(u)
                        .ok_or_else(|| Error::Internal("prefetched unit has no slot".into()))?;
                    crate::cache::MemoryBackend::load(store.memory_mut(), slot, &one.0)?;
                }
            }
            None
        } else {
            Some(PinnedExperts::new::<T>(&ctx, ck, &cfg, &units)?)
        };
        copy.synchronize().map_err(dev)?;
        // KV cache: what the user asked for, else a quarter of what is left.
        let per_token = 2 * nl * kvd * std::mem::size_of::<T>();
        let bs = opts.kv_block_size.max(1);
        let tokens = match opts.kv_tokens {
            Some(t) => t,
            None => {
                let (free, _) = ctx.mem_get_info().map_err(dev)?;
                (free / 4 / per_token.max(1)).clamp(bs, 1 << 20)
            }
        };
        let layout = PagedKvLayout {
            num_blocks: tokens.div_ceil(bs).max(1),
            block_size: bs,
            n_kv_heads: cfg.num_kv_heads(),
            head_dim: d,
        };
        let kv = PagedKv::new(&stream, nl, layout)?;
        let stats = Arc::new(CudaHandle::default());
        let top_k = cfg.router_top_k.max(1);
        Ok(CudaBackend {
            device: format!("cuda:{}", opts.ordinal),
            cfg,
            ctx,
            stream,
            kernels,
            blas,
            embed,
            lm_head,
            norm,
            layers,
            units,
            shared_inter,
            store,
            source,
            planner: PrefetchPlanner::default(),
            prefetch: opts.prefetch,
            kv,
            router: None,
            ws: None,
            top_k,
            measure_stalls: opts.measure_stalls,
            stalls: Vec::new(),
            stats,
        })
    }

    /// The backend's handle (counters, cache reconfiguration).
    pub fn stats(&self) -> Arc<CudaHandle> {
        self.stats.clone()
    }

    /// Runs the pre-gating router with weights `w` on this device from now on, with a router KV
    /// cache of as many tokens as the backbone's. Sequences already added keep no router state,
    /// so it is called before the first [`Backend::add_sequence`].
    pub fn run_router(&mut self, w: &crate::model::RouterWeights) -> Result<()> {
        if !self.kv.seqs.is_empty() {
            return Err(Error::InvalidArgument(
                "the router must be moved to the device before sequences are added".into(),
            ));
        }
        let tokens = self.kv.capacity_tokens();
        let bs = self.kv.layout.block_size;
        self.router = Some(DeviceRouter::new(&self.stream, w, &self.cfg, tokens, bs)?);
        Ok(())
    }

    /// Applies a pending [`CudaHandle::reconfigure`]: a new, empty expert cache.
    fn apply_reconfigure(&mut self) -> Result<()> {
        let Some(setup) = self
            .stats
            .reconfigure
            .lock()
            .ok()
            .and_then(|mut r| r.take())
        else {
            return Ok(());
        };
        if self.source.is_none() {
            return Err(Error::InvalidArgument(
                "the expert cache of an all-resident backend cannot be reconfigured".into(),
            ));
        }
        self.stream.synchronize().map_err(dev)?;
        let copy = self.store.memory().copy_stream().clone();
        copy.synchronize().map_err(dev)?;
        let (nl, ne) = (self.cfg.num_hidden_layers, self.cfg.n_cluster);
        let unit_bytes = self.units.iter().map(UnitShape::bytes).max().unwrap_or(1) as u64;
        // Free the old slots before allocating the new ones.
        let empty = ExpertCache::new(nl, ne, 1, unit_bytes, setup.policy, 0)?;
        self.store = ExpertStore::new(empty, CudaExpertMemory::new(&self.ctx, &copy)?)?;
        let memory = CudaExpertMemory::new(&self.ctx, &copy)?;
        let cache = setup
            .experts
            .build_cache(nl, ne, unit_bytes, setup.policy, || {
                crate::cache::MemoryBackend::free_bytes(&memory)
            })?;
        self.store = ExpertStore::new(cache, memory)?;
        self.prefetch = setup.prefetch;
        Ok(())
    }

    /// KV cache capacity in tokens.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv.capacity_tokens()
    }

    /// Expert cache slots.
    pub fn expert_slots(&self) -> usize {
        self.store.cache().capacity()
    }

    fn ensure_workspace(&mut self, tokens: usize, logit_rows: usize) -> Result<()> {
        let k = self.top_k;
        if let Some(ws) = &self.ws {
            if ws.tokens >= tokens && ws.logit_rows >= logit_rows {
                return Ok(());
            }
        }
        let tokens = tokens.max(self.ws.as_ref().map_or(0, |w| w.tokens)).max(16);
        let logit_rows = logit_rows
            .max(self.ws.as_ref().map_or(0, |w| w.logit_rows))
            .max(1);
        self.ws = None;
        self.stream.synchronize().map_err(dev)?;
        let cfg = &self.cfg;
        let d = cfg.head_dim();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let qkv_w = (cfg.num_attention_heads + 2 * cfg.num_kv_heads()) * d;
        let qd = cfg.num_attention_heads * d;
        let pairs = tokens * k;
        let inter = self
            .units
            .iter()
            .map(|u| u.inter)
            .max()
            .unwrap_or(0)
            .max(self.shared_inter);
        let s = &self.stream;
        let alloc = |n: usize| -> Result<CudaSlice<T>> {
            s.alloc_zeros::<T>(n.max(1))
                .map_err(|e| Error::Capacity(format!("step workspace of {n} elements: {e}")))
        };
        let max_blocks_total = self.kv.layout.num_blocks + tokens;
        self.ws = Some(Workspace {
            tokens,
            logit_rows,
            x: alloc(tokens * h)?,
            h: alloc(tokens * h)?,
            qkv: alloc(tokens * qkv_w)?,
            att: alloc(tokens * qd)?,
            o: alloc(tokens * h)?,
            x_perm: alloc(pairs * h)?,
            gate_up: alloc(pairs * 2 * inter)?,
            act: alloc(pairs * inter)?,
            y_perm: alloc(pairs * h)?,
            perm: MoePermutation::new(s, pairs, cfg.n_cluster).map_err(dev)?,
            ids: s.alloc_zeros::<u32>(tokens + logit_rows).map_err(dev)?,
            ints: s
                .alloc_zeros::<i32>(3 * tokens + max_blocks_total + cfg.num_hidden_layers * pairs)
                .map_err(dev)?,
            pair_w: s
                .alloc_zeros::<f32>(cfg.num_hidden_layers * pairs)
                .map_err(dev)?,
            last: alloc(logit_rows * h)?,
            normed: alloc(logit_rows * h)?,
            logits: s.alloc_zeros::<f32>(logit_rows * v).map_err(dev)?,
        });
        Ok(())
    }

    /// Issues the loads of the lookahead's experts, nearest deadline first.
    fn issue_prefetch(&mut self, steps: &[StepExperts]) -> Result<()> {
        let Some(src) = self.source.as_ref() else {
            return Ok(());
        };
        let plan = self.planner.plan_into(self.store.cache_mut(), steps);
        let mut loaded = 0u64;
        for p in &plan {
            let slot = self
                .store
                .cache()
                .slot_of(p.unit)
                .ok_or_else(|| Error::Internal("planned unit has no slot".into()))?;
            let bytes = crate::cache::ExpertSource::unit_bytes(src, p.unit)?;
            crate::cache::MemoryBackend::load(self.store.memory_mut(), slot, bytes)?;
            loaded += bytes.len() as u64;
        }
        if let Ok(mut s) = self.stats.stats.lock() {
            s.prefetches += plan.len() as u64;
            s.bytes_loaded += loaded;
        }
        Ok(())
    }

    fn validate(&self, chunks: &[ForwardChunk<'_>]) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        for c in chunks {
            let kv = self
                .kv
                .seqs
                .get(&c.seq)
                .ok_or(Error::UnknownSequence(c.seq))?;
            c.check(kv.len, kv.max_len, vocab)?;
        }
        Ok(())
    }

    fn run(&mut self, chunks: &[ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        self.validate(chunks)?;
        let n: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let m = chunks.iter().filter(|c| c.want_logits).count();
        if n == 0 {
            return Ok(Vec::new());
        }
        self.ensure_workspace(n, m)?;
        let cfg = self.cfg.clone();
        let (h, vocab, nl, ne) = (
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.num_hidden_layers,
            cfg.n_cluster,
        );
        let d = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let (qd, kvd) = (nh * d, nkv * d);
        let qkv_w = qd + 2 * kvd;
        let k = self.top_k;
        let np = n * k;

        // Host-side step description, uploaded in three copies.
        let bs = self.kv.layout.block_size;
        let max_blocks = chunks
            .iter()
            .map(|c| (c.start_pos + c.tokens.len()).div_ceil(bs))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ids: Vec<u32> = Vec::with_capacity(n + m);
        let mut pos = Vec::with_capacity(n);
        let mut rows = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        let mut table = vec![0i32; chunks.len() * max_blocks];
        let mut logit_rows = Vec::with_capacity(m);
        let mut layer_ids: Vec<Vec<i32>> = vec![Vec::with_capacity(np); nl];
        let mut layer_w: Vec<Vec<f32>> = vec![Vec::with_capacity(np); nl];
        let mut row0 = 0usize;
        for (ci, c) in chunks.iter().enumerate() {
            let blocks = &self.kv.seqs[&c.seq].blocks;
            let need = (c.start_pos + c.tokens.len()).div_ceil(bs);
            table[ci * max_blocks..ci * max_blocks + need].copy_from_slice(&blocks[..need]);
            for (i, &t) in c.tokens.iter().enumerate() {
                let p = c.start_pos + i;
                ids.push(t);
                pos.push(p as i32);
                rows.push(ci as i32);
                slots.push(self.kv.layout.slot(blocks, p).unwrap_or(-1));
                for (l, (li, lw)) in layer_ids.iter_mut().zip(layer_w.iter_mut()).enumerate() {
                    let r = c.routes.route(c.route_offset + i, l);
                    for j in 0..k {
                        match (r.experts().get(j), r.weights().get(j)) {
                            (Some(&e), Some(&w)) if (e as usize) < ne => {
                                li.push(e as i32);
                                lw.push(w);
                            }
                            (Some(&e), _) if (e as usize) >= ne => {
                                return Err(Error::Internal(format!(
                                    "route names expert {e} of {ne}"
                                )))
                            }
                            _ => {
                                li.push(-1);
                                lw.push(0.0);
                            }
                        }
                    }
                }
            }
            row0 += c.tokens.len();
            if c.want_logits {
                logit_rows.push((row0 - 1) as u32);
            }
        }
        let shared_routes = layer_ids.iter().all(|v| *v == layer_ids[0])
            && layer_w.iter().all(|v| *v == layer_w[0]);
        let route_sets = if shared_routes { 1 } else { nl };
        ids.extend_from_slice(&logit_rows);
        let mut ints = Vec::with_capacity(3 * n + table.len() + route_sets * np);
        ints.extend_from_slice(&pos);
        ints.extend_from_slice(&rows);
        ints.extend_from_slice(&slots);
        ints.extend_from_slice(&table);
        let mut floats = Vec::with_capacity(route_sets * np);
        for l in 0..route_sets {
            ints.extend_from_slice(&layer_ids[l]);
            floats.extend_from_slice(&layer_w[l]);
        }
        let plans: Vec<ExpertPlan> = (0..route_sets)
            .map(|l| ExpertPlan::from_ids(&layer_ids[l], ne))
            .collect();

        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Internal("no workspace".into()))?;
        let s = &self.stream;
        if ints.len() > ws.ints.len() || floats.len() > ws.pair_w.len() {
            return Err(Error::Internal(
                "step metadata exceeds the workspace".into(),
            ));
        }
        s.memcpy_htod(&ids, &mut ws.ids.slice_mut(..ids.len()))
            .map_err(dev)?;
        s.memcpy_htod(&ints, &mut ws.ints.slice_mut(..ints.len()))
            .map_err(dev)?;
        s.memcpy_htod(&floats, &mut ws.pair_w.slice_mut(..floats.len()))
            .map_err(dev)?;

        let kk = &self.kernels;
        let eps = cfg.rms_norm_eps;
        let theta = cfg.rope_theta;
        let layout = self.kv.layout;
        let shape = AttentionShape {
            n_tokens: n,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            q_stride: qkv_w,
            kv_stride: qkv_w,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let (o_pos, o_rows, o_slots, o_table) = (0, n, 2 * n, 3 * n);
        let o_routes = 3 * n + table.len();
        kk.embedding::<T>(s, &ws.ids.slice(..n), &self.embed, &mut ws.x, n, h, vocab)
            .map_err(dev)?;
        for l in 0..nl {
            let lw = &self.layers[l];
            let unit = self.units[l];
            let dims = FfnDims {
                hidden: h,
                inter: unit.inter,
            };
            kk.rmsnorm::<T>(s, &ws.x, &lw.input_norm, &mut ws.h, n, h, eps)
                .map_err(dev)?;
            self.blas
                .linear::<T, T>(&ws.h, &lw.qkv, &mut ws.qkv, n, h, qkv_w)
                .map_err(dev)?;
            let positions = ws.ints.slice(o_pos..o_pos + n);
            kk.rope::<T>(s, &mut ws.qkv, &positions, n, qkv_w, nh, d, theta)
                .map_err(dev)?;
            kk.rope::<T>(
                s,
                &mut ws.qkv.slice_mut(qd..),
                &positions,
                n,
                qkv_w,
                nkv,
                d,
                theta,
            )
            .map_err(dev)?;
            let (kc, vc) = (&mut self.kv.k[l], &mut self.kv.v[l]);
            kk.kv_cache_write::<T>(
                s,
                &layout,
                &ws.qkv.slice(qd..),
                &ws.qkv.slice(qd + kvd..),
                qkv_w,
                &ws.ints.slice(o_slots..o_slots + n),
                n,
                kc,
                vc,
            )
            .map_err(dev)?;
            kk.attention_paged::<T>(
                s,
                &shape,
                &layout,
                &ws.qkv,
                &self.kv.k[l],
                &self.kv.v[l],
                &ws.ints.slice(o_table..o_table + table.len()),
                (chunks.len(), max_blocks),
                &ws.ints.slice(o_rows..o_rows + n),
                &positions,
                &mut ws.att,
            )
            .map_err(dev)?;
            self.blas
                .linear::<T, T>(&ws.att, &lw.o, &mut ws.o, n, qd, h)
                .map_err(dev)?;
            kk.add::<T>(s, &mut ws.x, &ws.o, n * h).map_err(dev)?;
            kk.rmsnorm::<T>(s, &ws.x, &lw.post_norm, &mut ws.h, n, h, eps)
                .map_err(dev)?;
            // Routed experts: permute (once per step when every layer shares the routes).
            let r = if shared_routes { 0 } else { l };
            let ids_l = ws.ints.slice(o_routes + r * np..o_routes + (r + 1) * np);
            if l == 0 || !shared_routes {
                kk.moe_permute(s, &ids_l, np, &mut ws.perm).map_err(dev)?;
            }
            kk.moe_gather::<T>(s, &ws.h, &ws.perm, n, k, h, &mut ws.x_perm)
                .map_err(dev)?;
            let plan = &plans[r];
            let active: Vec<usize> = plan.active().map(|(e, _)| e).collect();
            let mut done = 0;
            while done < active.len() {
                // Normally one wave with every expert of the layer; a cache smaller than the
                // layer's experts runs them in waves, releasing the earlier ones in between.
                let units: Vec<Unit> = active[done..]
                    .iter()
                    .map(|&e| Unit::new(l, e as ExpertId))
                    .collect();
                let (wave, slots) = match Self::acquire_parts(
                    &mut self.store,
                    self.source.as_ref(),
                    &self.ctx,
                    s,
                    self.measure_stalls,
                    &mut self.stalls,
                    &units,
                )? {
                    Some(sl) => (units.len(), sl),
                    None => {
                        self.store.cache_mut().unpin_all();
                        let q = self
                            .store
                            .cache()
                            .layer_quota()
                            .unwrap_or(self.store.cache().capacity())
                            .max(1)
                            .min(units.len());
                        let sl = Self::acquire_parts(
                            &mut self.store,
                            self.source.as_ref(),
                            &self.ctx,
                            s,
                            self.measure_stalls,
                            &mut self.stalls,
                            &units[..q],
                        )?
                        .ok_or_else(|| {
                            Error::Capacity("the expert cache cannot hold one expert".into())
                        })?;
                        (q, sl)
                    }
                };
                let mem = self.store.memory();
                let mut views = Vec::with_capacity(wave);
                for &slot in &slots {
                    let gu = mem.view::<T>(slot, unit.gate_up_len() + unit.down_len())?;
                    views.push(gu);
                }
                let splits: Vec<_> = views
                    .iter()
                    .map(|v| (v.slice(..unit.gate_up_len()), v.slice(unit.gate_up_len()..)))
                    .collect();
                let mut experts: Vec<Option<ExpertWeights<'_, T>>> = vec![None; ne];
                let mut wave_plan = ExpertPlan {
                    counts: vec![0; ne],
                    offsets: plan.offsets.clone(),
                };
                for (i, &e) in active[done..done + wave].iter().enumerate() {
                    experts[e] = Some(ExpertWeights {
                        gate_up: &splits[i].0,
                        down: &splits[i].1,
                    });
                    wave_plan.counts[e] = plan.counts[e];
                }
                self.blas
                    .expert_ffn::<T>(
                        kk,
                        &wave_plan,
                        &experts,
                        dims,
                        &ws.x_perm,
                        &mut ws.gate_up,
                        &mut ws.act,
                        &mut ws.y_perm,
                    )
                    .map_err(dev)?;
                drop(experts);
                drop(splits);
                drop(views);
                for &slot in &slots {
                    self.store.memory().release(slot, s)?;
                }
                done += wave;
            }
            let w_l = ws.pair_w.slice(r * np..(r + 1) * np);
            kk.moe_combine::<T>(s, &ws.y_perm, &ws.perm, &w_l, n, k, h, &mut ws.x, true)
                .map_err(dev)?;
            if let Some((gu, dn)) = &lw.shared {
                let ir = self.shared_inter;
                let splan = ExpertPlan {
                    counts: vec![n],
                    offsets: vec![0, n],
                };
                self.blas
                    .expert_ffn::<T>(
                        kk,
                        &splan,
                        &[Some(ExpertWeights {
                            gate_up: gu,
                            down: dn,
                        })],
                        FfnDims {
                            hidden: h,
                            inter: ir,
                        },
                        &ws.h,
                        &mut ws.gate_up,
                        &mut ws.act,
                        &mut ws.o,
                    )
                    .map_err(dev)?;
                kk.add::<T>(s, &mut ws.x, &ws.o, n * h).map_err(dev)?;
            }
        }
        for c in chunks {
            if let Some(sb) = self.kv.seqs.get_mut(&c.seq) {
                sb.len += c.tokens.len();
            }
        }
        if m == 0 {
            return Ok(Vec::new());
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        kk.embedding::<T>(s, &ws.ids.slice(n..n + m), &ws.x, &mut ws.last, m, h, n)
            .map_err(dev)?;
        kk.rmsnorm::<T>(s, &ws.last, &self.norm, &mut ws.normed, m, h, eps)
            .map_err(dev)?;
        self.blas
            .linear::<T, f32>(&ws.normed, head, &mut ws.logits, m, h, vocab)
            .map_err(dev)?;
        let host = s.clone_dtoh(&ws.logits.slice(..m * vocab)).map_err(dev)?;
        Ok(host.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// Makes the experts of `units` resident (loading misses on the copy stream) and orders the
    /// compute stream after their loads. Returns their slots, or `None` when the cache cannot hold
    /// them all at once while pinned. Takes the backend's parts apart, since the step holds the
    /// workspace borrowed meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn acquire_parts(
        store: &mut ExpertStore<CudaExpertMemory>,
        source: Option<&PinnedExperts>,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        measure: bool,
        stalls: &mut Vec<(CudaEvent, CudaEvent)>,
        units: &[Unit],
    ) -> Result<Option<Vec<usize>>> {
        let mut slots = Vec::with_capacity(units.len());
        for &u in units {
            let slot = match store.cache_mut().access(u) {
                Ok(Lookup::Hit { slot }) => slot,
                Ok(Lookup::Miss { slot, .. }) => {
                    let src = source
                        .ok_or_else(|| Error::Internal("an all-resident cache missed".into()))?;
                    let bytes = crate::cache::ExpertSource::unit_bytes(src, u)?;
                    crate::cache::MemoryBackend::load(store.memory_mut(), slot, bytes)?;
                    slot
                }
                Err(Error::Capacity(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            slots.push(slot);
        }
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        for &slot in &slots {
            if measure {
                let a = ctx.new_event(timing).map_err(dev)?;
                a.record(stream).map_err(dev)?;
                if store.memory_mut().acquire(slot, stream)? {
                    let b = ctx.new_event(timing).map_err(dev)?;
                    b.record(stream).map_err(dev)?;
                    stalls.push((a, b));
                }
            } else {
                store.memory_mut().acquire(slot, stream)?;
            }
        }
        Ok(Some(slots))
    }
}

impl<T: DeviceElem> Backend for CudaBackend<T> {
    fn device_name(&self) -> String {
        self.device.clone()
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn add_sequence(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        if max_len > self.cfg.max_position_embeddings {
            return Err(Error::InvalidRequest(format!(
                "sequence of {max_len} tokens exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        self.kv.add(seq, max_len)?;
        if let Some(r) = self.router.as_mut() {
            if let Err(e) = r.add(seq, max_len) {
                self.kv.remove(seq);
                return Err(e);
            }
        }
        Ok(())
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        self.kv.remove(seq);
        if let Some(r) = self.router.as_mut() {
            r.remove(seq);
        }
    }

    fn routes_tokens(&self) -> bool {
        self.router.is_some()
    }

    fn route_logits(&mut self, seqs: &[SeqId], tokens: &[&[u32]]) -> Result<Vec<f32>> {
        let router = self
            .router
            .as_mut()
            .ok_or_else(|| Error::Internal("the router runs on the host".into()))?;
        let out = router.logits(&self.stream, &self.kernels, &self.blas, seqs, tokens);
        if out.is_err() {
            // As after a failed step: leave the device idle and consistent.
            let _ = self.stream.synchronize();
        }
        out
    }

    fn forward(&mut self, chunks: &[ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        self.apply_reconfigure()?;
        let start = Instant::now();
        let before = self.store.cache().stats();
        let copied = self.store.memory().bytes_copied();
        let out = self.run(chunks);
        // Whatever happened, the step's pins end with it.
        self.store.cache_mut().unpin_all();
        if out.is_err() {
            // Leave the device idle and consistent; the error is what the caller sees.
            let _ = self.stream.synchronize();
        }
        let mut stall = 0.0;
        for (a, b) in self.stalls.drain(..) {
            stall += a.elapsed_ms(&b).unwrap_or(0.0) as f64 / 1e3;
        }
        let after = self.store.cache().stats();
        if let Ok(mut st) = self.stats.stats.lock() {
            st.steps += 1;
            st.step_seconds += start.elapsed().as_secs_f64();
            st.stall_seconds += stall;
            st.hits += after.hits - before.hits;
            st.misses += after.misses - before.misses;
            st.bytes_loaded += self.store.memory().bytes_copied() - copied;
        }
        out
    }

    fn prepare(&mut self, lookahead: &Lookahead) -> Result<()> {
        self.apply_reconfigure()?;
        if !self.prefetch || self.source.is_none() {
            return Ok(());
        }
        let nl = self.cfg.num_hidden_layers;
        let steps: Vec<StepExperts> = lookahead
            .steps
            .iter()
            .map(|p| {
                if p.scope() == crate::route::RouteScope::AllLayers {
                    StepExperts::AllLayers(p.experts_used(0..p.len(), 0))
                } else {
                    StepExperts::PerLayer((0..nl).map(|l| p.experts_used(0..p.len(), l)).collect())
                }
            })
            .collect();
        self.issue_prefetch(&steps)
    }

    fn expert_cache(&self) -> Option<&ExpertCache> {
        Some(self.store.cache())
    }

    fn expert_stall_seconds(&self) -> f64 {
        self.stats.snapshot().stall_seconds
    }
}

impl<T: DeviceElem> Drop for CudaBackend<T> {
    fn drop(&mut self) {
        // Let queued work finish before buffers are freed; an error here is recorded by the
        // context, never panicked on.
        let _ = self.stream.synchronize();
        let _ = self.store.memory().copy_stream().synchronize();
    }
}

/// Whether a CUDA driver and at least one device are present (never panics).
pub fn cuda_available() -> bool {
    matches!(pregate_kernels::device_count(), Ok(n) if n > 0)
}
