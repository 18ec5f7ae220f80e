//! Steps of models that route per layer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), and speculative
//! prefetch for them.
//!
//! A Read-ME step knows every layer's routes before the backbone runs (`plan_step`). A model with a
//! gate in every layer knows a layer's routes only when the layer runs, so its step is opened
//! without routes (`pregate_moe_begin_step`), and each layer passes its exact routes with its
//! activations (`pregate_moe_layer_forward_routed`): an exact expert that is not resident is
//! loaded then, on demand. Between layers the host may hand pregate predicted gate scores of the
//! next layers (`pregate_moe_speculate`: the next layers' own norm and gate applied to the current
//! hidden state); pregate's [`Speculator`] turns them into candidates, and the ones not resident,
//! up to a per-call budget, are loaded ahead of use (on the copy stream on CUDA; accounted on the
//! CPU). Speculation never changes outputs: a wrong guess costs link time only.

use std::ffi::c_void;

use pregate::cache::StepExperts;
use pregate::moe::speculate::{cap, MAX_SPEC_DEPTH, MAX_SPEC_EXTRA};
use pregate::moe::{Budget, LayerScores, SpeculationStats, Speculator, SpeculatorConfig};
use pregate::route::ExpertSet;
use pregate::TokenRoute;

use crate::ffi::{self, guard, CallResult, Failure, Status};
use crate::moe::{check_counts, read_routes, OpenStep, Phase, PregateMoe, Runtime, Service};

/// A service's speculation: the speculator, the per-call load budget, and the speculative loads
/// not used yet (to tell the speculator which were evicted unused).
pub(crate) struct Speculation {
    speculator: Speculator,
    max_loads: usize,
    outstanding: Vec<ExpertSet>,
}

impl Speculation {
    /// The speculator's counters and depth.
    pub(crate) fn stats(&self) -> (usize, SpeculationStats) {
        let cfg = self.speculator.config();
        (
            if cfg.enabled { cfg.depth } else { 0 },
            self.speculator.stats(),
        )
    }

    /// Tells the speculator about speculative loads that left the cache before their use.
    fn reconcile(&mut self, runtime: &Runtime) {
        for (layer, out) in self.outstanding.iter_mut().enumerate() {
            let gone: Vec<u16> = out
                .iter()
                .filter(|&e| !runtime.resident(layer, e))
                .collect();
            for e in gone {
                out.remove(e);
                self.speculator.evicted(layer, e);
            }
        }
    }
}

/// Speculation counters (`PregateMoeSpecStats` in `pregate.h`); arrays by distance - 1.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PregateMoeSpecStats {
    /// `sizeof(PregateMoeSpecStats)`: set by the caller to its size, by the library to its own.
    pub struct_size: u32,
    /// The configured depth (0: speculation off).
    pub depth: u32,
    /// Exact experts of a layer that were predicted `distance` layers ahead.
    pub hits: [u64; MAX_SPEC_DEPTH],
    /// Exact experts of a layer that were not predicted `distance` layers ahead.
    pub misses: [u64; MAX_SPEC_DEPTH],
    /// Speculative loads issued.
    pub loads: u64,
    /// Speculative loads used by their layer.
    pub used: u64,
    /// Speculative loads evicted before any use.
    pub wasted: u64,
}

impl PregateMoeSpecStats {
    pub(crate) fn new(depth: usize, s: &SpeculationStats) -> Self {
        PregateMoeSpecStats {
            struct_size: std::mem::size_of::<Self>() as u32,
            depth: depth as u32,
            hits: s.hits,
            misses: s.misses,
            loads: s.loads,
            used: s.used,
            wasted: s.wasted,
        }
    }
}

/// Turns speculation on (`depth` 1..=4 layers ahead, `extra` 0..=8 candidates per token beyond
/// the gating top-k, at most `max_loads` speculative loads per `speculate` call, 0: no cap but
/// the cache) or off (`depth` 0). Resets its counters. Allowed at any time but inside a step.
///
/// # Safety
/// `m` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_configure_speculation(
    m: *mut PregateMoe,
    depth: u32,
    extra: u32,
    max_loads: u32,
) -> Status {
    guard("pregate_moe_configure_speculation", || {
        // SAFETY: the caller's contract.
        let m = unsafe { ffi::non_null(m, "m")? };
        m.with(|s| {
            if s.open.as_ref().is_some_and(|o| o.per_layer.is_some()) {
                return Err(Failure::state(
                    "configure_speculation inside a per-layer step: end it first",
                ));
            }
            if depth == 0 {
                s.spec = None;
                return Ok(());
            }
            let cfg = SpeculatorConfig {
                depth: depth as usize,
                extra: extra as usize,
                enabled: true,
            };
            if depth as usize > MAX_SPEC_DEPTH || extra as usize > MAX_SPEC_EXTRA {
                return Err(Failure::invalid(format!(
                    "speculation depth {depth} (0..={MAX_SPEC_DEPTH}) and extra {extra} \
                     (0..={MAX_SPEC_EXTRA})"
                )));
            }
            let st = s.settings;
            s.spec = Some(Speculation {
                speculator: Speculator::new(cfg, st.layers, st.experts)?,
                max_loads: if max_loads == 0 {
                    usize::MAX
                } else {
                    max_loads as usize
                },
                outstanding: vec![ExpertSet::default(); st.layers],
            });
            Ok(())
        })
    })
}

/// Opens a step of `num_tokens` tokens whose routes come per layer; ends a step still open.
/// `*step_id` receives the step's id.
///
/// # Safety
/// `m` must be a live handle; `step_id` a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_begin_step(
    m: *mut PregateMoe,
    num_tokens: u64,
    stream: u64,
    step_id: *mut u64,
) -> Status {
    guard("pregate_moe_begin_step", || {
        // SAFETY: the caller's contract.
        let (m, step_out) = unsafe {
            (
                ffi::non_null(m, "m")?,
                ffi::non_null_mut(step_id, "step_id")?,
            )
        };
        m.with(|s| {
            let st = s.settings;
            let (n, _) = check_counts(&st, num_tokens, 1)?;
            let Phase::Ready(runtime) = &mut s.phase else {
                return Err(Failure::state("begin_step before finalize"));
            };
            if s.open.take().is_some() {
                runtime.end_step(stream)?;
            }
            // Nothing of this step is known yet: earlier plans' next uses must not steer eviction.
            runtime.plan(&[], stream)?;
            s.last_step += 1;
            s.open = Some(OpenStep {
                id: s.last_step,
                routes: Vec::new(),
                per_layer: Some(n),
            });
            *step_out = s.last_step;
            Ok(())
        })
    })
}

/// The open per-layer step's token count, or the error for `step_id`.
fn per_layer_tokens(s: &Service, step_id: u64, what: &str) -> CallResult<usize> {
    match &s.open {
        Some(o) if o.id == step_id => o.per_layer.ok_or_else(|| {
            Failure::state(format!(
                "{what} for step {step_id}, which plan_step opened: use layer_forward"
            ))
        }),
        Some(o) => Err(Failure::state(format!(
            "{what} for step {step_id}, but the open step is {}",
            o.id
        ))),
        None => Err(Failure::state(format!(
            "{what} for step {step_id} without an open step: call begin_step first"
        ))),
    }
}

/// Runs the experts of `layer` for the per-layer step `step_id` with the layer's exact routes
/// (`topk_ids_host` / `topk_w_host`: host memory, `[num_tokens, top_k]` row-major): `out[t] = sum_j
/// w_j FFN_{e_j}(x[t])`. Experts not resident are loaded first. `x` and `out` as for
/// `pregate_moe_layer_forward` (host on the CPU, device on CUDA on `stream`).
///
/// # Safety
/// `m` must be a live handle; the route pointers `num_tokens * top_k` readable elements each;
/// `x` `num_tokens` rows `x_row_stride` elements apart and `out` `num_tokens * hidden` writable
/// elements of the service's dtype.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn pregate_moe_layer_forward_routed(
    m: *mut PregateMoe,
    step_id: u64,
    layer: u32,
    x: *const c_void,
    x_row_stride: u64,
    topk_ids_host: *const i32,
    topk_w_host: *const f32,
    num_tokens: u64,
    top_k: u32,
    out: *mut c_void,
    stream: u64,
) -> Status {
    guard("pregate_moe_layer_forward_routed", || {
        // SAFETY: the caller's contract.
        let m = unsafe { ffi::non_null(m, "m")? };
        m.with(|s| {
            let st = s.settings;
            let tokens = per_layer_tokens(s, step_id, "layer_forward_routed")?;
            let (n, k) = check_counts(&st, num_tokens, top_k)?;
            let l = layer as usize;
            if l >= st.layers {
                return Err(Failure::invalid(format!(
                    "layer {l} is outside 0..{}",
                    st.layers
                )));
            }
            if n != tokens {
                return Err(Failure::invalid(format!(
                    "{n} tokens, but step {step_id} was begun for {tokens}"
                )));
            }
            if x_row_stride < st.hidden as u64 {
                return Err(Failure::invalid(format!(
                    "x_row_stride {x_row_stride} is below hidden {}",
                    st.hidden
                )));
            }
            // SAFETY: the caller's contract (`n * k` elements each).
            let (ids, ws) = unsafe {
                (
                    ffi::slice(topk_ids_host, n * k, "topk_ids_host")?,
                    ffi::slice(topk_w_host, n * k, "topk_w_host")?,
                )
            };
            let routes: Vec<TokenRoute> = read_routes(&st, ids, ws, k)?;
            let Phase::Ready(runtime) = &mut s.phase else {
                return Err(Failure::state("layer_forward_routed before finalize"));
            };
            if let Some(spec) = s.spec.as_mut() {
                let mut used = ExpertSet::default();
                for r in &routes {
                    for &e in r.experts() {
                        used.insert(e);
                    }
                }
                spec.speculator.observe(l, &used)?;
                for e in used.iter() {
                    spec.outstanding[l].remove(e);
                }
            }
            // SAFETY: the caller's contract on `x` and `out` (`n` rows).
            unsafe { runtime.forward(&st, l, x, x_row_stride, &routes, out, stream)? };
            if let Some(spec) = s.spec.as_mut() {
                spec.reconcile(runtime);
            }
            Ok(())
        })
    })
}

/// Hands pregate the predicted gate scores of layers `layer + 1 ..= layer + depth` for the open
/// per-layer step (`scores_host`: f32, `[depth, num_tokens, num_experts]` row-major, higher is more
/// likely; `top_k` the layers' gating top-k), after `layer` ran. The speculator's candidates that
/// are not resident, nearest layer first and at most the configured loads, are loaded ahead of use;
/// `*queued` receives how many. Each predicted layer must exist, and `depth` be 1..= the configured
/// depth. Without speculation configured: STATE.
///
/// # Safety
/// `m` must be a live handle; `scores_host` `depth * num_tokens * num_experts` readable floats;
/// `queued` a writable `uint32_t`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn pregate_moe_speculate(
    m: *mut PregateMoe,
    step_id: u64,
    layer: u32,
    depth: u32,
    scores_host: *const f32,
    num_tokens: u64,
    top_k: u32,
    stream: u64,
    queued: *mut u32,
) -> Status {
    guard("pregate_moe_speculate", || {
        // SAFETY: the caller's contract.
        let (m, queued) = unsafe { (ffi::non_null(m, "m")?, ffi::non_null_mut(queued, "queued")?) };
        *queued = 0;
        m.with(|s| {
            let st = s.settings;
            let tokens = per_layer_tokens(s, step_id, "speculate")?;
            let (n, k) = check_counts(&st, num_tokens, top_k)?;
            if n != tokens {
                return Err(Failure::invalid(format!(
                    "{n} tokens, but step {step_id} was begun for {tokens}"
                )));
            }
            let Some(spec) = s.spec.as_mut() else {
                return Err(Failure::state(
                    "speculate without speculation: call pregate_moe_configure_speculation first",
                ));
            };
            let (l, d) = (layer as usize, depth as usize);
            let max_d = spec.speculator.config().depth;
            if d == 0 || d > max_d || l + d >= st.layers {
                return Err(Failure::invalid(format!(
                    "depth {d} after layer {l}: 1..={max_d} and every predicted layer below {}",
                    st.layers
                )));
            }
            let row = n * st.experts;
            // SAFETY: the caller's contract (`depth * num_tokens * num_experts` floats).
            let scores = unsafe { ffi::slice(scores_host, d * row, "scores_host")? };
            let layers: Vec<LayerScores<'_>> = (1..=d)
                .map(|j| LayerScores {
                    layer: l + j,
                    distance: j,
                    scores: &scores[(j - 1) * row..j * row],
                    top_k: k,
                })
                .collect();
            let Phase::Ready(runtime) = &mut s.phase else {
                return Err(Failure::state("speculate before finalize"));
            };
            let candidates = spec.speculator.predict(&layers)?;
            let kept = cap(&candidates, &Budget::Count(spec.max_loads), |l, e| {
                runtime.resident(l, e)
            });
            if kept.is_empty() {
                return Ok(());
            }
            let mut sets = vec![ExpertSet::default(); st.layers];
            for c in &kept {
                sets[c.layer].insert(c.expert);
            }
            let loaded = runtime.prefetch(&[StepExperts::PerLayer(sets)], stream)?;
            for u in &loaded {
                let (ul, ue) = (u.layer as usize, u.expert);
                spec.speculator.loaded(ul, ue);
                spec.outstanding[ul].insert(ue);
            }
            spec.reconcile(runtime);
            *queued = loaded.len() as u32;
            Ok(())
        })
    })
}

/// Writes the speculation counters to `*out` (whose `struct_size` the caller sets); all zero, depth
/// 0, when speculation is off.
///
/// # Safety
/// `m` must be a live handle; `out` must point to `out->struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pregate_moe_speculation_stats(
    m: *const PregateMoe,
    out: *mut PregateMoeSpecStats,
) -> Status {
    guard("pregate_moe_speculation_stats", || {
        // SAFETY: the caller's contract.
        let (m, out) = unsafe { (ffi::non_null(m, "m")?, ffi::non_null_mut(out, "out")?) };
        let ours = std::mem::size_of::<PregateMoeSpecStats>();
        if (out.struct_size as usize) < ours {
            return Err(Failure::invalid(format!(
                "out->struct_size is {}; this library's PregateMoeSpecStats has {ours} bytes",
                out.struct_size
            )));
        }
        *out = m.with(|s| Ok(s.spec_stats()))?;
        Ok(())
    })
}

impl Service {
    pub(crate) fn spec_stats(&self) -> PregateMoeSpecStats {
        match &self.spec {
            Some(sp) => {
                let (depth, st) = sp.stats();
                PregateMoeSpecStats::new(depth, &st)
            }
            None => PregateMoeSpecStats::new(0, &SpeculationStats::default()),
        }
    }
}
