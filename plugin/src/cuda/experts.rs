//! The CUDA expert runtime: routed experts in device slots, per layer, on the caller's stream.
//!
//! Units (one expert of one layer: `gate_up [2I, H]` then `down [H, I]`, contiguous) live in equal
//! device slots of [`CudaExpertMemory`], filled on the runtime's own copy stream from one
//! page-locked host copy of every expert ([`PinnedExperts`]); when every expert fits, the slots are
//! filled once at start and never evicted. A layer call permutes its tokens by expert, runs the
//! expert FFNs (in waves when the layer uses more experts than it has slots), combines them with
//! their weights into `out`, and adds the shared expert if the layer has one.
//!
//! Streams: compute goes on the stream each call is given (the backbone's compute stream, or a
//! host framework's current stream, borrowed); loads go on the copy stream. Each slot's `loaded`
//! event orders a reader after its copy (per reading stream), and its `released` event orders a
//! later copy into the slot after every kernel that read it, so no call synchronises the host.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream};
use pregate_kernels::{Blas, ExpertPlan, ExpertWeights, FfnDims, KernelSet, MoePermutation};

use super::dev;
use super::memory::{BorrowedPool, CudaExpertMemory};
use super::weights::UnitShape;
use super::weights::{pack_ffn, upload, upload_stacked, DeviceElem, OneUnit, PinnedExperts};
use crate::cache::{
    CacheCapacity, EvictionPolicy, ExpertCache, ExpertCapacity, ExpertStore, Lookup, MemoryBackend,
    PrefetchPlanner, StepExperts, Unit,
};
use crate::error::{Error, Result};
use crate::model::ModelDir;
use crate::moe::speculate::{
    admit_guess, cap, Budget, Candidate, EvictionGuard, LayerScores, SpeculationStats, Speculator,
    SpeculatorConfig,
};
use crate::moe::{run_waves, MoeShape, RuntimeStats};
use crate::route::{ExpertId, ExpertSet, TokenRoute};

/// How a [`CudaExperts`] keeps its experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertSetup {
    /// Capacity of the device slots.
    pub capacity: ExpertCapacity,
    /// Eviction policy.
    pub policy: EvictionPolicy,
    /// Issue a plan's loads ahead of use; off = load on demand.
    pub prefetch: bool,
    /// Time the compute stream's waits for expert loads (adds two events per wait).
    pub measure_stalls: bool,
    /// Grouped kernels for the expert FFN of small batches (off: cuBLAS for every batch).
    pub grouped_ffn: bool,
}

/// Routed experts a host keeps itself, packed into the runtime's units on request (see
/// [`CudaExperts::from_host_units`]).
pub struct HostUnits<'a> {
    /// Experts per layer.
    pub experts: usize,
    /// Model width `H`.
    pub hidden: usize,
    /// Expert width `I` of each layer (one entry per MoE layer).
    pub inter: Vec<usize>,
    /// Writes unit `(layer, expert)` into `out` as little-endian elements of the runtime's type:
    /// `gate` `[I, H]`, `up` `[I, H]`, then `down` `[H, I]`, exactly `out.len()` bytes. Asked once
    /// per unit, from several threads at once, so the host may release its copy of a unit as
    /// soon as it is packed.
    pub pack: &'a super::weights::PackUnit<'a>,
}

/// Per-call buffers, grown to the largest call seen.
struct Workspace<T> {
    pairs: usize,
    x_perm: CudaSlice<T>,
    gate_up: CudaSlice<T>,
    act: CudaSlice<T>,
    y_perm: CudaSlice<T>,
    /// The shared expert's output, `[tokens, H]`.
    y: CudaSlice<T>,
    /// The shared expert gate's logit per token (`[tokens]`, f32).
    shared_gate: CudaSlice<f32>,
    perm: MoePermutation,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
}

/// The shared (always active) experts of every layer, `gate_up [2I, H]` and `down [H, I]`.
struct SharedExperts<T> {
    weights: Vec<Option<(CudaSlice<T>, CudaSlice<T>)>>,
    /// Per layer, the `[H]` gate scaling the shared output by `sigmoid(gate . x)` (Qwen2-MoE).
    gates: Vec<Option<CudaSlice<T>>>,
    inter: usize,
}

/// The routes last uploaded and permuted, and the stream that did it: a layer with the same routes
/// on the same stream (Read-ME's shared routes) reuses the permutation.
struct Uploaded {
    ids: Vec<i32>,
    weights: Vec<f32>,
    stream: usize,
    plan: ExpertPlan,
}

/// The routed and shared experts of every MoE layer on one CUDA device.
pub struct CudaExperts<T: DeviceElem> {
    shape: MoeShape,
    ctx: Arc<CudaContext>,
    kernels: Arc<KernelSet>,
    blas: Blas,
    units: Vec<UnitShape>,
    shared: Vec<Option<(CudaSlice<T>, CudaSlice<T>)>>,
    shared_gates: Vec<Option<CudaSlice<T>>>,
    shared_inter: usize,
    store: ExpertStore<CudaExpertMemory>,
    source: Option<PinnedExperts>,
    planner: PrefetchPlanner,
    setup: ExpertSetup,
    stalls: Vec<(CudaEvent, CudaEvent)>,
    ws: Option<Workspace<T>>,
    uploaded: Option<Uploaded>,
    stats: RuntimeStats,
}

impl<T: DeviceElem> CudaExperts<T> {
    /// Loads the experts of `model`'s MoE layers onto the device of `stream` (which also carries
    /// the shared experts' upload), serving routes of up to the model's experts per token. The
    /// runtime's layer `m` is the model's `m`-th MoE layer: dense layers (Qwen2-MoE's
    /// `mlp_only_layers`) are the backbone's.
    pub fn new(
        model: &ModelDir,
        kernels: Arc<KernelSet>,
        stream: &Arc<CudaStream>,
        setup: ExpertSetup,
    ) -> Result<Self> {
        let cfg = &model.config;
        let ck = &model.checkpoint;
        let (h, ne) = (cfg.hidden_size, cfg.num_experts());
        let moe_layers: Vec<usize> = (0..cfg.num_hidden_layers)
            .filter(|&l| model.plan.moe(l).is_some())
            .collect();
        let nl = moe_layers.len();
        if nl == 0 {
            return Err(Error::InvalidArgument(
                "the model has no MoE layer for the expert runtime".into(),
            ));
        }
        let elem = std::mem::size_of::<T>();
        // Widths from the model's plan, tensors by their role in its inventory.
        let inventory = model.plan.inventory();
        let mut units = Vec::with_capacity(nl);
        let mut shared = Vec::with_capacity(nl);
        let mut gates = Vec::with_capacity(nl);
        let mut shared_inter = 0;
        for &l in &moe_layers {
            let moe = model.plan.moe(l).ok_or_else(|| {
                Error::InvalidArgument(format!("layer {l} has no experts for the expert runtime"))
            })?;
            gates.push(
                match inventory.get(crate::model::family::TensorRole::SharedExpertGate { layer: l })
                {
                    Some(g) => Some(upload::<T>(stream, ck, &g.name, &g.shape)?),
                    None => None,
                },
            );
            units.push(UnitShape {
                hidden: h,
                inter: moe.expert_inter,
                elem,
            });
            shared.push(match inventory.shared_expert(l) {
                Some([gate, up, down]) => {
                    let ir = gate.shape[0];
                    shared_inter = shared_inter.max(ir);
                    let parts = [(&*gate.name, ir), (&*up.name, ir)];
                    let gu = upload_stacked::<T>(stream, ck, &parts, h)?;
                    Some((gu, upload::<T>(stream, ck, &down.name, &down.shape)?))
                }
                None => None,
            });
        }
        let shape = MoeShape {
            layers: nl,
            experts: ne,
            top_k: cfg.experts_per_token().max(1),
            hidden: h,
        };
        let stacked = model.plan.expert_storage == crate::model::family::ExpertStorage::Stacked;
        let pack = |m: usize, e: usize, out: &mut [u8]| {
            let l = moe_layers[m];
            if stacked {
                let role =
                    |proj| crate::model::family::TensorRole::StackedExperts { layer: l, proj };
                let parts = [
                    inventory.require(role(crate::model::family::StackedProj::GateUp))?,
                    inventory.require(role(crate::model::family::StackedProj::Down))?,
                ];
                return super::weights::pack_stacked_ffn::<T>(ck, parts, e, units[m], out);
            }
            pack_ffn::<T>(ck, inventory.expert(l, e)?, units[m], out)
        };
        let shared = SharedExperts {
            weights: shared,
            gates,
            inter: shared_inter,
        };
        Self::assemble(
            shape,
            units.clone(),
            shared,
            kernels,
            stream,
            setup,
            &pack,
            None,
        )
    }

    /// A runtime over host experts `experts[layer][expert]` (f32; `gate`, `up` `[I, H]`, `down`
    /// `[H, I]`, one width per layer) without shared experts, serving routes of up to `top_k`
    /// experts. Converted to `T` on the device of `stream`, as [`CudaExperts::new`] does. A host
    /// that keeps its experts in another form packs them itself through
    /// [`CudaExperts::from_host_units`].
    pub fn from_host(
        experts: &[Vec<crate::model::weights::ExpertWeights>],
        hidden: usize,
        top_k: usize,
        kernels: Arc<KernelSet>,
        stream: &Arc<CudaStream>,
        setup: ExpertSetup,
    ) -> Result<Self> {
        Self::from_weights(experts, hidden, top_k, kernels, stream, setup, None)
    }

    /// [`CudaExperts::from_host`] with the expert slots carved from `pool`, device memory the
    /// caller owns (a torch tensor inside vLLM) and never freed here; its size is
    /// [`CudaExperts::slot_pool_bytes`].
    ///
    /// # Safety
    /// `pool` must be device memory of `stream`'s device, valid for `pool.bytes` bytes, and stay
    /// allocated and otherwise unused until the runtime is dropped.
    pub unsafe fn from_host_borrowing(
        experts: &[Vec<crate::model::weights::ExpertWeights>],
        hidden: usize,
        top_k: usize,
        kernels: Arc<KernelSet>,
        stream: &Arc<CudaStream>,
        setup: ExpertSetup,
        pool: BorrowedPool,
    ) -> Result<Self> {
        Self::from_weights(experts, hidden, top_k, kernels, stream, setup, Some(pool))
    }

    /// A runtime over routed experts a host framework keeps itself (vLLM, through the C ABI),
    /// without shared experts, serving routes of up to `top_k` experts: each unit is asked of
    /// `units.pack` once, straight into the page-locked copy (or, when every expert fits, into
    /// the device slots), so a host that frees its copy of a unit once packed never holds the
    /// experts twice. The slots come from `pool` when given.
    ///
    /// # Safety
    /// A `Some(pool)` must be device memory of `stream`'s device, valid for `pool.bytes` bytes,
    /// and stay allocated and otherwise unused until the runtime is dropped (the contract of
    /// [`CudaExperts::from_host_borrowing`]). With `None` nothing is required.
    pub unsafe fn from_host_units(
        units: &HostUnits<'_>,
        top_k: usize,
        kernels: Arc<KernelSet>,
        stream: &Arc<CudaStream>,
        setup: ExpertSetup,
        pool: Option<BorrowedPool>,
    ) -> Result<Self> {
        let (nl, ne) = (units.inter.len(), units.experts);
        if nl == 0 || ne == 0 || top_k == 0 || units.hidden == 0 || units.inter.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "an expert runtime needs at least one layer of experts of non-zero widths and \
                 top_k >= 1 ({nl} layers of {ne} experts, hidden {}, widths {:?}, top_k {top_k})",
                units.hidden, units.inter
            )));
        }
        let elem = std::mem::size_of::<T>();
        let shapes: Vec<UnitShape> = units
            .inter
            .iter()
            .map(|&inter| UnitShape {
                hidden: units.hidden,
                inter,
                elem,
            })
            .collect();
        let shape = MoeShape {
            layers: nl,
            experts: ne,
            top_k,
            hidden: units.hidden,
        };
        let shared = SharedExperts {
            weights: (0..nl).map(|_| None).collect(),
            gates: (0..nl).map(|_| None).collect(),
            inter: 0,
        };
        Self::assemble(
            shape, shapes, shared, kernels, stream, setup, units.pack, pool,
        )
    }

    /// Bytes of the slot pool a runtime of `setup` over `layers` x `experts` experts of width
    /// `inter` needs (its [`CudaExperts::from_host_borrowing`] pool). A capacity given as a
    /// fraction of free memory is refused: a caller-owned pool is sized before it exists.
    pub fn slot_pool_bytes(
        setup: &ExpertSetup,
        layers: usize,
        experts: usize,
        hidden: usize,
        inter: usize,
    ) -> Result<u64> {
        let unit = UnitShape {
            hidden,
            inter,
            elem: std::mem::size_of::<T>(),
        }
        .bytes();
        if let ExpertCapacity::Total(CacheCapacity::FractionOfFree(_)) = setup.capacity {
            return Err(Error::InvalidArgument(
                "a caller-owned slot pool is sized before it exists: give the capacity in slots \
                 or bytes, not as a fraction of free memory"
                    .into(),
            ));
        }
        // Slots and bytes never consult free memory.
        let cache =
            setup
                .capacity
                .build_cache(layers, experts, unit as u64, setup.policy, || Ok(u64::MAX))?;
        Ok(BorrowedPool::bytes_for(cache.capacity(), unit))
    }

    /// [`CudaExperts::from_host_units`] over f32 [`crate::model::weights::ExpertWeights`].
    #[allow(clippy::too_many_arguments)]
    fn from_weights(
        experts: &[Vec<crate::model::weights::ExpertWeights>],
        hidden: usize,
        top_k: usize,
        kernels: Arc<KernelSet>,
        stream: &Arc<CudaStream>,
        setup: ExpertSetup,
        pool: Option<BorrowedPool>,
    ) -> Result<Self> {
        let (nl, ne) = (experts.len(), experts.first().map_or(0, Vec::len));
        if nl == 0 || ne == 0 || experts.iter().any(|l| l.len() != ne) || top_k == 0 {
            return Err(Error::InvalidArgument(format!(
                "an expert runtime needs layers of equally many experts and top_k >= 1 ({nl} \
                 layers, {ne} experts in layer 0, top_k {top_k})"
            )));
        }
        let elem = std::mem::size_of::<T>();
        let inter: Vec<usize> = experts.iter().map(|l| l[0].inter()).collect();
        let pack = |l: usize, e: usize, out: &mut [u8]| {
            let unit = UnitShape {
                hidden,
                inter: inter[l],
                elem,
            };
            super::weights::pack_host_ffn::<T>(&experts[l][e], unit, out)
        };
        let units = HostUnits {
            experts: ne,
            hidden,
            inter: inter.clone(),
            pack: &pack,
        };
        // SAFETY: a `Some` pool carries the contract of `from_host_borrowing`, its only source.
        unsafe { Self::from_host_units(&units, top_k, kernels, stream, setup, pool) }
    }

    /// The common tail of the constructors: the cache and its slots, filled once when every
    /// expert fits, else a page-locked copy of every unit to load them from. The slots come from
    /// `pool` when given (see [`CudaExperts::from_host_borrowing`]'s contract).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        shape: MoeShape,
        units: Vec<UnitShape>,
        shared: SharedExperts<T>,
        kernels: Arc<KernelSet>,
        stream: &Arc<CudaStream>,
        setup: ExpertSetup,
        pack: &super::weights::PackUnit<'_>,
        pool: Option<BorrowedPool>,
    ) -> Result<Self> {
        let (nl, ne) = (shape.layers, shape.experts);
        let ctx = stream.context().clone();
        let copy = ctx.new_stream().map_err(dev)?;
        let unit_bytes = units.iter().map(UnitShape::bytes).max().unwrap_or(1) as u64;
        let memory = match pool {
            // SAFETY: the pool's contract is the caller's (`from_host_borrowing`).
            Some(p) => unsafe { CudaExpertMemory::borrowed(&ctx, &copy, p)? },
            None => CudaExpertMemory::new(&ctx, &copy)?,
        };
        let cache = setup
            .capacity
            .build_cache(nl, ne, unit_bytes, setup.policy, || memory.free_bytes())?;
        let all_resident = cache.capacity() >= nl * ne;
        let mut store = ExpertStore::new(cache, memory)?;
        // Before any unit is packed: a host that releases its copy of each unit as it is packed
        // (`from_host_units`) should find few ways to fail after that.
        let mut blas = Blas::new(stream).map_err(dev)?;
        blas.set_grouped_ffn(setup.grouped_ffn);
        let source = if all_resident {
            // Fill every slot once from pageable memory; nothing is ever evicted.
            let mut one = OneUnit(Vec::new());
            for (l, &unit) in units.iter().enumerate() {
                one.0.resize(unit.bytes(), 0);
                for e in 0..ne {
                    pack(l, e, &mut one.0)?;
                    let u = Unit::new(l, e as u16);
                    store.cache_mut().prefetch(u)?;
                    let slot = store
                        .cache()
                        .slot_of(u)
                        .ok_or_else(|| Error::Internal("prefetched unit has no slot".into()))?;
                    store.memory_mut().load(slot, &one.0)?;
                }
            }
            None
        } else {
            Some(PinnedExperts::new(&ctx, ne, &units, pack)?)
        };
        copy.synchronize().map_err(dev)?;
        stream.synchronize().map_err(dev)?;
        Ok(CudaExperts {
            shape,
            blas,
            ctx,
            kernels,
            units,
            shared: shared.weights,
            shared_gates: shared.gates,
            shared_inter: shared.inter,
            store,
            source,
            planner: PrefetchPlanner::default(),
            setup,
            stalls: Vec::new(),
            ws: None,
            uploaded: None,
            stats: RuntimeStats::default(),
        })
    }

    /// Allocates the per-call buffers for steps of up to `tokens` tokens now, so that no layer
    /// call of such a step allocates device memory (a host that sizes its memory after loading
    /// the model, as vLLM does, sees them).
    pub fn reserve(&mut self, tokens: usize, stream: &Arc<CudaStream>) -> Result<()> {
        self.ensure_workspace(tokens, stream)
    }

    /// The shape calls are checked against.
    pub fn shape(&self) -> MoeShape {
        self.shape
    }

    /// The cache (residency and counters).
    pub fn cache(&self) -> &ExpertCache {
        self.store.cache()
    }

    /// Counters.
    pub fn stats(&self) -> RuntimeStats {
        self.stats
    }

    /// Bytes copied into expert slots so far.
    pub fn bytes_copied(&self) -> u64 {
        self.store.memory().bytes_copied()
    }

    /// How the runtime keeps its experts.
    pub fn setup(&self) -> ExpertSetup {
        self.setup
    }

    /// Whether the experts are offloaded (a page-locked host copy feeds the slots).
    pub fn offloaded(&self) -> bool {
        self.source.is_some()
    }

    /// Host bytes the runtime holds for its routed experts: the page-locked copy of every unit
    /// when offloaded, 0 when every expert lives in a device slot.
    pub fn host_bytes(&self) -> u64 {
        self.source.as_ref().map_or(0, |s| s.bytes() as u64)
    }

    /// Checks one layer call of `routes.len()` tokens without running it.
    pub fn check(&self, layer: usize, routes: &[TokenRoute]) -> Result<()> {
        let n = routes.len() * self.shape.hidden;
        self.shape.check_layer(layer, routes, n, n).map(|_| ())
    }

    /// Plans the coming steps (nearest first): sets Belady's next uses and issues the loads of the
    /// units they need on the copy stream, nearest deadline first, as far as the cache admits them
    /// without evicting a unit needed sooner. Returns the loads issued.
    pub fn plan(&mut self, steps: &[StepExperts]) -> Result<usize> {
        let Some(src) = self.source.as_ref().filter(|_| self.setup.prefetch) else {
            return Ok(0);
        };
        let (cache, memory) = self.store.parts_mut();
        let plan = self.planner.plan_into(cache, steps);
        for p in &plan {
            let slot = cache
                .slot_of(p.unit)
                .ok_or_else(|| Error::Internal("planned unit has no slot".into()))?;
            memory.load(slot, crate::cache::ExpertSource::unit_bytes(src, p.unit)?)?;
        }
        self.stats.prefetches += plan.len() as u64;
        Ok(plan.len())
    }

    fn ensure_workspace(&mut self, tokens: usize, stream: &Arc<CudaStream>) -> Result<()> {
        let pairs = tokens * self.shape.top_k;
        if self.ws.as_ref().is_some_and(|w| w.pairs >= pairs) {
            return Ok(());
        }
        let pairs = pairs.max(16 * self.shape.top_k);
        let tokens = pairs / self.shape.top_k;
        // Release the old buffers only once the work that uses them is done.
        stream.synchronize().map_err(dev)?;
        self.ws = None;
        self.uploaded = None;
        let h = self.shape.hidden;
        let inter = self
            .units
            .iter()
            .map(|u| u.inter)
            .max()
            .unwrap_or(0)
            .max(self.shared_inter);
        let alloc = |n: usize| -> Result<CudaSlice<T>> {
            stream
                .alloc_zeros::<T>(n.max(1))
                .map_err(|e| Error::Capacity(format!("expert workspace of {n} elements: {e}")))
        };
        self.ws = Some(Workspace {
            pairs,
            x_perm: alloc(pairs * h)?,
            gate_up: alloc(pairs * 2 * inter)?,
            act: alloc(pairs * inter)?,
            y_perm: alloc(pairs * h)?,
            y: alloc(tokens * h)?,
            shared_gate: stream.alloc_zeros::<f32>(tokens).map_err(dev)?,
            perm: MoePermutation::new(stream, pairs, self.shape.experts).map_err(dev)?,
            ids: stream.alloc_zeros::<i32>(pairs).map_err(dev)?,
            weights: stream.alloc_zeros::<f32>(pairs).map_err(dev)?,
        });
        Ok(())
    }

    /// The experts of `layer` for the first `routes.len()` rows of `x` (`[T, H]`, the layer's
    /// normed hidden states): `out[t] = sum_j w_j FFN_{e_j}(x[t])` plus the shared expert, written
    /// over `out` or, with `accumulate`, added to it (the residual stream). All work is enqueued on
    /// `stream` (which may be borrowed from a host framework); the host is not synchronised.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_layer(
        &mut self,
        layer: usize,
        x: &CudaSlice<T>,
        routes: &[TokenRoute],
        out: &mut CudaSlice<T>,
        accumulate: bool,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let (n, h, k, ne) = (
            routes.len(),
            self.shape.hidden,
            self.shape.top_k,
            self.shape.experts,
        );
        if x.len() < n * h || out.len() < n * h {
            return Err(Error::InvalidArgument(format!(
                "layer {layer}: {n} routes need x and out of at least {} values, got {} and {}",
                n * h,
                x.len(),
                out.len()
            )));
        }
        let used = self.shape.check_layer(layer, routes, n * h, n * h)?;
        if n == 0 {
            return Ok(());
        }
        self.ensure_workspace(n, stream)?;
        self.blas.set_stream(stream).map_err(dev)?;
        let np = n * k;
        let mut ids = Vec::with_capacity(np);
        let mut weights = Vec::with_capacity(np);
        for r in routes {
            for j in 0..k {
                match (r.experts().get(j), r.weights().get(j)) {
                    (Some(&e), Some(&w)) => {
                        ids.push(e as i32);
                        weights.push(w);
                    }
                    _ => {
                        ids.push(-1);
                        weights.push(0.0);
                    }
                }
            }
        }
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Internal("no expert workspace".into()))?;
        let sid = stream.cu_stream() as usize;
        let same = self
            .uploaded
            .as_ref()
            .is_some_and(|u| u.stream == sid && u.ids == ids && u.weights == weights);
        if !same {
            stream
                .memcpy_htod(&ids, &mut ws.ids.slice_mut(..np))
                .map_err(dev)?;
            stream
                .memcpy_htod(&weights, &mut ws.weights.slice_mut(..np))
                .map_err(dev)?;
            self.kernels
                .moe_permute(stream, &ws.ids.slice(..np), np, &mut ws.perm)
                .map_err(dev)?;
            let plan = ExpertPlan::from_ids(&ids, ne);
            self.uploaded = Some(Uploaded {
                ids,
                weights,
                stream: sid,
                plan,
            });
        }
        let plan = &self
            .uploaded
            .as_ref()
            .ok_or_else(|| Error::Internal("no uploaded routes".into()))?
            .plan;
        let kk = &self.kernels;
        kk.moe_gather::<T>(stream, x, &ws.perm, n, k, h, &mut ws.x_perm)
            .map_err(dev)?;
        let unit = self.units[layer];
        let dims = FfnDims {
            hidden: h,
            inter: unit.inter,
        };
        let (source, measure) = (self.source.as_ref(), self.setup.measure_stalls);
        let (blas, ctx, stalls) = (&mut self.blas, &self.ctx, &mut self.stalls);
        let (cache, memory) = self.store.parts_mut();
        let waves = run_waves(cache, layer, &used, |wave, lookups| {
            let mut slots = Vec::with_capacity(wave.len());
            for (&u, lookup) in wave.iter().zip(lookups) {
                let slot = match *lookup {
                    Lookup::Hit { slot } => slot,
                    Lookup::Miss { slot, .. } => {
                        let src = source.ok_or_else(|| {
                            Error::Internal("an all-resident expert cache missed".into())
                        })?;
                        memory.load(slot, crate::cache::ExpertSource::unit_bytes(src, u)?)?;
                        slot
                    }
                };
                acquire(memory, ctx, stream, slot, measure, stalls)?;
                slots.push(slot);
            }
            let views = slots
                .iter()
                .map(|&s| memory.view::<T>(s, unit.gate_up_len() + unit.down_len()))
                .collect::<Result<Vec<_>>>()?;
            let parts: Vec<_> = views
                .iter()
                .map(|v| (v.slice(..unit.gate_up_len()), v.slice(unit.gate_up_len()..)))
                .collect();
            let mut experts: Vec<Option<ExpertWeights<'_, T>>> = vec![None; ne];
            let mut wave_plan = ExpertPlan {
                counts: vec![0; ne],
                offsets: plan.offsets.clone(),
            };
            for (i, u) in wave.iter().enumerate() {
                let e = u.expert as usize;
                experts[e] = Some(ExpertWeights {
                    gate_up: &parts[i].0,
                    down: &parts[i].1,
                });
                wave_plan.counts[e] = plan.counts[e];
            }
            blas.expert_ffn::<T>(
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
            for &slot in &slots {
                memory.release(slot, stream)?;
            }
            Ok(())
        })?;
        kk.moe_combine::<T>(
            stream,
            &ws.y_perm,
            &ws.perm,
            &ws.weights.slice(..np),
            n,
            k,
            h,
            out,
            accumulate,
        )
        .map_err(dev)?;
        if let Some((gu, dn)) = &self.shared[layer] {
            let splan = ExpertPlan {
                counts: vec![n],
                offsets: vec![0, n],
            };
            let weights = [Some(ExpertWeights {
                gate_up: gu,
                down: dn,
            })];
            let dims = FfnDims {
                hidden: h,
                inter: self.shared_inter,
            };
            self.blas
                .expert_ffn::<T>(
                    kk,
                    &splan,
                    &weights,
                    dims,
                    x,
                    &mut ws.gate_up,
                    &mut ws.act,
                    &mut ws.y,
                )
                .map_err(dev)?;
            match &self.shared_gates[layer] {
                Some(g) => {
                    self.blas
                        .linear::<T, f32>(x, g, &mut ws.shared_gate, n, h, 1)
                        .map_err(dev)?;
                    kk.sigmoid_scale_add::<T>(stream, out, &ws.y, &ws.shared_gate, n, h)
                        .map_err(dev)?;
                }
                None => kk.add::<T>(stream, out, &ws.y, n * h).map_err(dev)?,
            }
        }
        self.stats.layer_calls += 1;
        self.stats.waves += waves;
        Ok(())
    }

    /// Ends a step: the step's pins are released, and the stall time of completed waits is added
    /// to the counters.
    pub fn end_step(&mut self) {
        self.store.cache_mut().unpin_all();
        let mut stall = 0.0;
        self.stalls.retain(|(a, b)| {
            if !b.is_complete() {
                return true;
            }
            stall += a.elapsed_ms(b).unwrap_or(0.0) as f64 / 1e3;
            false
        });
        self.stats.stall_seconds += stall;
    }

    /// Replaces the cache with a new, empty one of `setup` (benchmarks compare setups without
    /// reloading the model). Only an offloaded runtime keeps the host copy this needs. Waits for
    /// `stream` and the copy stream first.
    pub fn reconfigure(&mut self, setup: ExpertSetup, stream: &Arc<CudaStream>) -> Result<()> {
        if self.source.is_none() {
            return Err(Error::InvalidArgument(
                "the expert cache of an all-resident runtime cannot be reconfigured".into(),
            ));
        }
        if self.store.memory().is_borrowed() {
            return Err(Error::InvalidArgument(
                "the expert cache in a caller-owned slot pool cannot be reconfigured".into(),
            ));
        }
        stream.synchronize().map_err(dev)?;
        let copy = self.store.memory().copy_stream().clone();
        copy.synchronize().map_err(dev)?;
        let (nl, ne) = (self.shape.layers, self.shape.experts);
        let unit_bytes = self.units.iter().map(UnitShape::bytes).max().unwrap_or(1) as u64;
        // Free the old slots before allocating the new ones.
        let empty = ExpertCache::new(nl, ne, 1, unit_bytes, setup.policy, 0)?;
        self.store = ExpertStore::new(empty, CudaExpertMemory::new(&self.ctx, &copy)?)?;
        let memory = CudaExpertMemory::new(&self.ctx, &copy)?;
        let cache = setup
            .capacity
            .build_cache(nl, ne, unit_bytes, setup.policy, || memory.free_bytes())?;
        self.store = ExpertStore::new(cache, memory)?;
        self.blas.set_grouped_ffn(setup.grouped_ffn);
        self.setup = setup;
        self.uploaded = None;
        Ok(())
    }

    /// Waits for every load issued so far (before the runtime's buffers are dropped).
    pub fn synchronize(&self) -> Result<()> {
        self.store.memory().copy_stream().synchronize().map_err(dev)
    }
}

impl<T: DeviceElem> Drop for CudaExperts<T> {
    fn drop(&mut self) {
        // Slots must outlive the copies into them; an error here is recorded, never panicked on.
        let _ = self.synchronize();
    }
}

/// Speculative expert prefetch for a [`CudaExperts`] whose layers route themselves: the
/// [`Speculator`], the [`EvictionGuard`], and the link model that caps speculative copies
/// ([`Budget::Link`]). The backend owns it and hands it to [`CudaExperts::speculate`] with each
/// layer's predicted gate scores, and to [`CudaSpeculation::observe`] with each layer's exact
/// experts.
pub struct CudaSpeculation {
    spec: Speculator,
    guard: EvictionGuard,
    /// Each layer's latest predicted experts (what a speculative load may not evict).
    predicted: Vec<ExpertSet>,
    /// Speculative loads not used yet, per layer: one that leaves the cache first was wasted.
    outstanding: Vec<ExpertSet>,
    link: LinkModel,
}

/// How long speculative copies may hold the copy link: its bandwidth and the time one decoder
/// layer takes, so that a candidate `j` layers ahead is copied only if its copy starts before
/// that layer reads its experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    /// Copy bandwidth, bytes per second, fixed costs folded in (measured on the unit size).
    pub bytes_per_s: f64,
    /// Bytes of one unit.
    pub unit_bytes: u64,
    /// Smoothed seconds of one decoder layer; `None` before the first measurement.
    pub layer_seconds: Option<f64>,
    /// The gating top-k: before any measurement a layer is assumed to take the time its `top_k`
    /// units take to copy (an offloaded layer is link-bound).
    pub top_k: usize,
}

impl LinkModel {
    /// Weight of a new layer-time sample in the smoothed value.
    const SMOOTHING: f64 = 0.2;

    /// Records that `layers` decoder layers took `seconds`.
    pub fn layer_time(&mut self, seconds: f64, layers: usize) {
        if layers == 0 || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let t = seconds / layers as f64;
        self.layer_seconds = Some(match self.layer_seconds {
            Some(old) => old + Self::SMOOTHING * (t - old),
            None => t,
        });
    }

    /// The budget of candidates up to `depth` layers ahead, when `queued_bytes` of exact loads are
    /// ahead of them on the in-order copy stream: the layer at distance `j` reads its experts
    /// after `j` layer times, less the time the queued exact loads hold the link.
    pub fn budget(&self, depth: usize, queued_bytes: u64) -> Budget {
        let bw = self.bytes_per_s.max(1.0);
        let layer = self
            .layer_seconds
            .unwrap_or(self.top_k as f64 * self.unit_bytes as f64 / bw);
        let queued = queued_bytes as f64 / bw;
        Budget::Link {
            bytes_per_s: bw,
            unit_bytes: self.unit_bytes,
            seconds_until: (1..=depth)
                .map(|j| (j as f64 * layer - queued).max(0.0))
                .collect(),
        }
    }
}

/// One speculative load the cache admitted: the unit, its slot, the unit it evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecLoad {
    /// The unit loaded.
    pub unit: Unit,
    /// The slot it goes to.
    pub slot: usize,
    /// The slot's previous tenant.
    pub evicted: Option<Unit>,
}

impl CudaSpeculation {
    /// Speculation of `cfg` over `layers` MoE layers of `experts` experts, over `link`.
    pub fn new(
        cfg: SpeculatorConfig,
        layers: usize,
        experts: usize,
        link: LinkModel,
    ) -> Result<Self> {
        Ok(CudaSpeculation {
            spec: Speculator::new(cfg, layers, experts)?,
            guard: EvictionGuard::new(layers),
            predicted: vec![ExpertSet::default(); layers],
            outstanding: vec![ExpertSet::default(); layers],
            link,
        })
    }

    /// The speculator's configuration.
    pub fn config(&self) -> SpeculatorConfig {
        self.spec.config()
    }

    /// The counters so far.
    pub fn stats(&self) -> SpeculationStats {
        self.spec.stats()
    }

    /// The link model (bandwidth, layer time).
    pub fn link(&self) -> &LinkModel {
        &self.link
    }

    /// Records that `layers` decoder layers took `seconds` (see [`LinkModel::layer_time`]).
    pub fn layer_time(&mut self, seconds: f64, layers: usize) {
        self.link.layer_time(seconds, layers);
    }

    /// Layer `layer` runs with `exact` experts, before its lookups: recall of its predictions,
    /// its speculative loads used, and whether speculative evictions of its units cost misses
    /// (`cache` as it is before the layer's exact loads).
    pub fn observe(&mut self, layer: usize, exact: &ExpertSet, cache: &ExpertCache) -> Result<()> {
        self.sweep(cache);
        let before = self.spec.stats().used;
        self.spec.observe(layer, exact)?;
        let used = self.spec.stats().used - before;
        if let Some(out) = self.outstanding.get_mut(layer) {
            for e in exact.iter() {
                out.remove(e);
            }
        }
        self.guard.observe(layer, used, exact, |e| {
            cache.slot_of(Unit::new(layer, e)).is_none()
        });
        Ok(())
    }

    /// Counts as wasted every speculative load that left `cache` before its layer used it (an
    /// exact miss, or a later speculative load, took its slot).
    fn sweep(&mut self, cache: &ExpertCache) {
        for (layer, out) in self.outstanding.iter_mut().enumerate() {
            let gone: Vec<ExpertId> = out
                .iter()
                .filter(|&e| cache.slot_of(Unit::new(layer, e)).is_none())
                .collect();
            for e in gone {
                out.remove(e);
                self.spec.evicted(layer, e);
            }
        }
    }

    /// The candidates of `scores` (recorded as predictions), nearest layer first.
    fn predict(&mut self, scores: &[LayerScores<'_>]) -> Result<Vec<Candidate>> {
        let candidates = self.spec.predict(scores)?;
        for s in scores {
            if let Some(p) = self.predicted.get_mut(s.layer) {
                *p = ExpertSet::default();
            }
        }
        for c in &candidates {
            self.predicted[c.layer].insert(c.expert);
        }
        Ok(candidates)
    }

    /// Admits `kept` (capped candidates, nearest first) into `cache` as prefetches and returns the
    /// loads to issue, in order. A speculative load evicts, by the cache's policy, only a unit that
    /// is not pinned (the running layer's exact units are), not named by the layer's latest
    /// prediction and used less lately than the guess, and only while the [`EvictionGuard`]
    /// finds such evictions paying; when every evictable unit is worth more, nothing is loaded.
    /// Host bookkeeping only: the caller copies the bytes.
    pub fn admit(&mut self, cache: &mut ExpertCache, kept: &[Candidate]) -> Result<Vec<SpecLoad>> {
        let mut loads = Vec::new();
        for c in kept {
            let unit = Unit::new(c.layer, c.expert);
            let outcome = admit_guess(cache, unit, &self.predicted[c.layer], &self.guard)?;
            if let Some(Lookup::Miss { slot, evicted }) = outcome {
                if let Some(v) = evicted {
                    self.evicted(v);
                    self.guard.evicted(v.layer as usize, v.expert);
                }
                self.spec.loaded(c.layer, c.expert);
                if let Some(out) = self.outstanding.get_mut(c.layer) {
                    out.insert(c.expert);
                }
                loads.push(SpecLoad {
                    unit,
                    slot,
                    evicted,
                });
            }
        }
        Ok(loads)
    }

    /// `v` left the cache.
    fn evicted(&mut self, v: Unit) {
        let layer = v.layer as usize;
        if let Some(out) = self.outstanding.get_mut(layer) {
            if out.contains(v.expert) {
                out.remove(v.expert);
                self.spec.evicted(layer, v.expert);
            }
        }
    }
}

impl<T: DeviceElem> CudaExperts<T> {
    /// Speculative prefetch from predicted gate scores of coming layers (runtime layer indices),
    /// after the running layer's exact loads were issued (`queued_bytes` of them, ahead on the
    /// copy stream): the [`Speculator`]'s candidates, capped by what the link can start before
    /// each predicted layer runs ([`LinkModel::budget`], [`cap`]), admitted by
    /// [`CudaSpeculation::admit`], copied on the copy stream as prefetches (each slot's events
    /// order them against the kernels that read it, so no host synchronisation). Returns the
    /// loads issued. An all-resident runtime only counts recall.
    pub fn speculate(
        &mut self,
        sp: &mut CudaSpeculation,
        scores: &[LayerScores<'_>],
        queued_bytes: u64,
    ) -> Result<usize> {
        let candidates = sp.predict(scores)?;
        let Some(src) = self.source.as_ref() else {
            return Ok(0);
        };
        let budget = sp.link.budget(sp.config().depth, queued_bytes);
        let (cache, memory) = self.store.parts_mut();
        sp.sweep(cache);
        let kept = cap(&candidates, &budget, |l, e| {
            cache.slot_of(Unit::new(l, e)).is_some()
        });
        let loads = sp.admit(cache, &kept)?;
        for l in &loads {
            memory.load(l.slot, crate::cache::ExpertSource::unit_bytes(src, l.unit)?)?;
        }
        self.stats.prefetches += loads.len() as u64;
        Ok(loads.len())
    }

    /// Bytes per second one unit's copy from the page-locked host copy achieves on the copy
    /// stream (fixed costs folded in: the rate speculative copies of this size get), the median
    /// of five copies timed on the host. `None` for an all-resident runtime (nothing is copied).
    pub fn measure_link(&self) -> Result<Option<f64>> {
        let Some(src) = self.source.as_ref() else {
            return Ok(None);
        };
        let bytes = crate::cache::ExpertSource::unit_bytes(src, Unit::new(0, 0))?;
        let copy = self.store.memory().copy_stream();
        copy.synchronize().map_err(dev)?;
        let mut dst = copy.alloc_zeros::<u8>(bytes.len().max(1)).map_err(dev)?;
        let mut times = Vec::with_capacity(5);
        for _ in 0..5 {
            let t = std::time::Instant::now();
            copy.memcpy_htod(bytes, &mut dst).map_err(dev)?;
            copy.synchronize().map_err(dev)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok(Some(bytes.len() as f64 / times[2].max(1e-9)))
    }

    /// Bytes of one unit (the largest layer's).
    pub fn unit_bytes(&self) -> u64 {
        self.units.iter().map(UnitShape::bytes).max().unwrap_or(1) as u64
    }
}

/// Orders `stream` after the load of `slot`, timing the wait when asked.
fn acquire(
    memory: &mut CudaExpertMemory,
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    slot: usize,
    measure: bool,
    stalls: &mut Vec<(CudaEvent, CudaEvent)>,
) -> Result<()> {
    if !measure {
        return memory.acquire(slot, stream).map(|_| ());
    }
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let a = ctx.new_event(timing).map_err(dev)?;
    a.record(stream).map_err(dev)?;
    if memory.acquire(slot, stream)? {
        let b = ctx.new_event(timing).map_err(dev)?;
        b.record(stream).map_err(dev)?;
        stalls.push((a, b));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(capacity: ExpertCapacity) -> ExpertSetup {
        ExpertSetup {
            capacity,
            policy: EvictionPolicy::Belady,
            prefetch: true,
            measure_stalls: false,
            grouped_ffn: true,
        }
    }

    #[test]
    fn a_caller_owned_pool_holds_one_aligned_slot_per_cached_expert() {
        // A unit of hidden 16, inter 8: gate_up [16, 16] and down [16, 8].
        let unit_f32 = (2 * 8 * 16 + 16 * 8) * 4;
        let stride = BorrowedPool::stride(unit_f32) as usize;
        assert!(stride >= unit_f32 && stride % 256 == 0 && stride - unit_f32 < 256);
        let bytes = |c| CudaExperts::<f32>::slot_pool_bytes(&setup(c), 2, 4, 16, 8).unwrap();
        assert_eq!(bytes(ExpertCapacity::All), 8 * stride as u64);
        assert_eq!(bytes(ExpertCapacity::PerLayer(3)), 6 * stride as u64);
        let three = ExpertCapacity::Total(CacheCapacity::Slots(3));
        assert_eq!(bytes(three), 3 * stride as u64);
        // bf16 halves the unit.
        let bf16 = CudaExperts::<half::bf16>::slot_pool_bytes(&setup(three), 2, 4, 16, 8).unwrap();
        assert_eq!(bf16, 3 * BorrowedPool::stride(unit_f32 / 2));
    }

    fn link(layer_seconds: Option<f64>) -> LinkModel {
        LinkModel {
            bytes_per_s: 100.0,
            unit_bytes: 10,
            layer_seconds,
            top_k: 2,
        }
    }

    fn seconds(b: &Budget) -> Vec<f64> {
        match b {
            Budget::Link { seconds_until, .. } => seconds_until.clone(),
            Budget::Count(_) => panic!("a link budget was expected, got {b:?}"),
        }
    }

    #[test]
    fn the_link_budget_is_layer_time_less_the_exact_loads_ahead() {
        // Unmeasured: a layer takes its top-k units' copies, 2 x 10 B at 100 B/s.
        let mut l = link(None);
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9);
        assert!(close(&seconds(&l.budget(2, 0)), &[0.2, 0.4]));
        // 10 queued bytes hold the link 0.1 s.
        assert!(close(&seconds(&l.budget(2, 10)), &[0.1, 0.3]));
        assert!(close(&seconds(&l.budget(1, 1000)), &[0.0]));
        // Two layers in 0.6 s, then one in 0.5 s: 0.3, then smoothed towards 0.5.
        l.layer_time(0.6, 2);
        assert_eq!(l.layer_seconds, Some(0.3));
        l.layer_time(0.5, 1);
        assert!((l.layer_seconds.unwrap() - 0.34).abs() < 1e-9);
        l.layer_time(f64::NAN, 1);
        l.layer_time(1.0, 0);
        assert!(
            (l.layer_seconds.unwrap() - 0.34).abs() < 1e-9,
            "bad samples are ignored"
        );
        // The budget caps the candidates: with 15 bytes queued, 0.05 s starts one unit before
        // distance 1, 0.25 s three in all before distance 2.
        let c = |layer, expert, distance| Candidate {
            layer,
            expert,
            distance,
            score: 1.0,
        };
        let cands = [c(1, 0, 1), c(1, 1, 1), c(2, 0, 2), c(2, 1, 2), c(2, 2, 2)];
        let kept = cap(&cands, &link(None).budget(2, 15), |_, _| false);
        let ids: Vec<_> = kept.iter().map(|c| (c.layer, c.expert)).collect();
        assert_eq!(ids, vec![(1, 0), (2, 0), (2, 1)]);
    }

    fn speculation() -> CudaSpeculation {
        let cfg = SpeculatorConfig {
            depth: 2,
            extra: 0,
            enabled: true,
        };
        CudaSpeculation::new(cfg, 3, 4, link(None)).unwrap()
    }

    #[test]
    fn admission_loads_predictions_around_pinned_units_and_counts_waste() {
        let mut cache = ExpertCache::with_layer_quota(3, 4, 2, 10, EvictionPolicy::Lru, 0).unwrap();
        let mut sp = speculation();
        // Layer 1 runs on experts 0 and 1: resident and pinned for the step.
        for e in [0, 1] {
            cache.access(Unit::new(1, e)).unwrap();
        }
        let scores = [0.0, 0.1, 0.9, 0.8];
        let predict = |sp: &mut CudaSpeculation, layer, distance| {
            sp.predict(&[LayerScores {
                layer,
                distance,
                scores: &scores,
                top_k: 2,
            }])
            .unwrap()
        };
        // Layer 1 is full of pinned units: its predictions (2, 3) cannot be admitted.
        let c = predict(&mut sp, 1, 1);
        assert!(sp.admit(&mut cache, &c).unwrap().is_empty());
        assert_eq!(cache.resident_experts(1).len(), 2);
        // Layer 2 is empty: both predictions load, nearest first, into free slots.
        let c = predict(&mut sp, 2, 1);
        let loads = sp.admit(&mut cache, &c).unwrap();
        let units: Vec<_> = loads.iter().map(|l| (l.unit.expert, l.evicted)).collect();
        assert_eq!(units, vec![(2, None), (3, None)]);
        for l in &loads {
            assert_eq!(cache.slot_of(l.unit), Some(l.slot));
        }
        // Resident units are not loaded twice.
        assert!(sp.admit(&mut cache, &c).unwrap().is_empty());
        assert_eq!(sp.stats().loads, 2);
        // Layer 2 runs on experts 2 and 0: one speculative load used, recall 1/2 at distance 1.
        cache.unpin_all();
        let mut exact = ExpertSet::default();
        exact.insert(2);
        exact.insert(0);
        sp.observe(2, &exact, &cache).unwrap();
        assert_eq!(sp.stats().used, 1);
        assert_eq!(sp.stats().recall(1), Some(0.5));
        // Its exact miss (expert 0) evicts the unused speculative load of expert 3: wasted.
        cache.access(Unit::new(2, 2)).unwrap();
        match cache.access(Unit::new(2, 0)).unwrap() {
            Lookup::Miss { evicted, .. } => assert_eq!(evicted, Some(Unit::new(2, 3))),
            other => panic!("expected a miss, got {other:?}"),
        }
        sp.sweep(&cache);
        assert_eq!(sp.stats().wasted, 1);
        sp.sweep(&cache);
        assert_eq!(sp.stats().wasted, 1, "a wasted load is counted once");
    }

    #[test]
    fn a_speculative_load_evicts_only_what_the_prediction_does_not_name() {
        let mut cache = ExpertCache::with_layer_quota(3, 4, 2, 10, EvictionPolicy::Lru, 0).unwrap();
        let mut sp = speculation();
        // Layer 0 holds experts 0 and 1, used once each; expert 3, used three times, was evicted.
        for e in [3, 3, 3, 0, 1] {
            cache.access(Unit::new(0, e)).unwrap();
            cache.unpin_all();
        }
        assert!(cache.slot_of(Unit::new(0, 3)).is_none());
        let predict = |sp: &mut CudaSpeculation, scores: &[f32]| {
            sp.predict(&[LayerScores {
                layer: 0,
                distance: 1,
                scores,
                top_k: 2,
            }])
            .unwrap()
        };
        // A guess never used (expert 2) is worth less than every resident unit: no load.
        let c = predict(&mut sp, &[0.0, 0.9, 0.8, 0.1]);
        assert!(sp.admit(&mut cache, &c).unwrap().is_empty());
        // Predicted: expert 1 (resident) and 3. Expert 0, unnamed and used less than 3, is the
        // only unit the guess may take.
        let c = predict(&mut sp, &[0.0, 0.9, 0.1, 0.8]);
        let loads = sp.admit(&mut cache, &c).unwrap();
        assert_eq!(loads.len(), 1);
        assert_eq!(loads[0].unit, Unit::new(0, 3));
        assert_eq!(loads[0].evicted, Some(Unit::new(0, 0)));
        assert!(
            cache.slot_of(Unit::new(0, 1)).is_some(),
            "a predicted unit stays"
        );
        assert!(
            !cache.is_pinned(Unit::new(0, 1)),
            "the admission's pins are released"
        );
    }

    #[test]
    fn a_pool_cannot_be_sized_from_free_memory() {
        let c = ExpertCapacity::Total(CacheCapacity::FractionOfFree(0.5));
        let e = CudaExperts::<f32>::slot_pool_bytes(&setup(c), 2, 4, 16, 8).unwrap_err();
        assert!(e.to_string().contains("fraction of free memory"), "{e}");
    }
}
