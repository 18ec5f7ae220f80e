//! The expert runtime: the routed experts of every MoE layer as one component, used per layer.
//!
//! A backend (or a host framework such as vLLM, which keeps attention and the KV cache itself)
//! hands the runtime one layer at a time: the layer's normed hidden states and each token's route
//! at that layer (experts and weights). The runtime owns everything about the experts:
//!
//! - the **expert store**: the `ExpertCache` bookkeeping over memory
//!   slots, and the source every unit is (re)loaded from (page-locked host memory on CUDA);
//! - the **plan** of coming steps ([`StepExperts`], nearest first): Belady's next uses and the
//!   exact prefetch loads, issued ahead of use (on CUDA, on the runtime's copy stream);
//! - **waves**: a layer that uses more experts than the cache holds for it runs in waves of at
//!   most that many, each wave's units pinned while it computes and released before the next;
//! - the permutation of tokens by expert, the expert FFNs and the weighted combine;
//! - pins, stall timing and counters ([`RuntimeStats`]).
//!
//! Two implementations share this module's rules: [`CpuExperts`] (the reference, over
//! [`crate::ops`]; its cache is accounting, since host memory is where experts live anyway) and
//! `crate::cuda::CudaExperts` (device slots, copy stream, NVRTC kernels and cuBLAS, on the
//! caller's stream). Nothing else touches the cache.

mod cpu;
pub mod speculate;

pub use cpu::CpuExperts;
pub use speculate::{
    Budget, Candidate, EvictionGuard, LayerScores, SpecQueue, SpecRule, SpeculationStats,
    Speculator, SpeculatorConfig,
};

use crate::cache::{ExpertCache, StepExperts, Unit};
use crate::error::{Error, Result};
use crate::route::{ExpertSet, RoutePlan, RouteScope, TokenRoute};

/// Counters of an expert runtime, cumulative since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RuntimeStats {
    /// Layer forwards run.
    pub layer_calls: u64,
    /// Waves run (one per layer call when every expert of the layer fits its slots).
    pub waves: u64,
    /// Loads issued ahead of use by a plan.
    pub prefetches: u64,
    /// Seconds compute waited for expert loads (measured by the CUDA runtime when asked to).
    pub stall_seconds: f64,
}

/// The experts each of the coming steps uses, nearest first (step 0 is the step about to run):
/// what [`CpuExperts::plan`] and the CUDA runtime's plan take. Built from route plans, so that
/// every caller (the engine's lookahead, a replay, a host's step) converts routes the same way.
pub fn step_experts(steps: &[RoutePlan], layers: usize) -> Vec<StepExperts> {
    steps
        .iter()
        .map(|p| {
            if p.scope() == RouteScope::AllLayers {
                StepExperts::AllLayers(p.experts_used(0..p.len(), 0))
            } else {
                StepExperts::PerLayer((0..layers).map(|l| p.experts_used(0..p.len(), l)).collect())
            }
        })
        .collect()
}

/// The shape every call of a runtime is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    /// MoE layers.
    pub layers: usize,
    /// Routed experts per layer.
    pub experts: usize,
    /// Most experts one token may be routed to.
    pub top_k: usize,
    /// Model width `H`.
    pub hidden: usize,
}

impl MoeShape {
    /// Checks one layer call: `layer` in range, `x` and `out` of `routes.len()` rows of `hidden`
    /// (given as element counts), and every route naming 1..=top_k distinct experts in range with
    /// finite weights. Returns the set of experts the layer uses.
    pub fn check_layer(
        &self,
        layer: usize,
        routes: &[TokenRoute],
        x_len: usize,
        out_len: usize,
    ) -> Result<ExpertSet> {
        if layer >= self.layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} is outside 0..{}",
                self.layers
            )));
        }
        let want = routes.len() * self.hidden;
        if x_len != want || out_len != want {
            return Err(Error::InvalidArgument(format!(
                "layer {layer}: {} routes need x and out of {} x {} = {want} values, got {x_len} \
                 and {out_len}",
                routes.len(),
                routes.len(),
                self.hidden
            )));
        }
        let mut used = ExpertSet::default();
        for (t, r) in routes.iter().enumerate() {
            if r.experts().len() > self.top_k {
                return Err(Error::InvalidArgument(format!(
                    "layer {layer}, token {t}: routed to {} experts, but the runtime serves top-{}",
                    r.experts().len(),
                    self.top_k
                )));
            }
            for (&e, &w) in r.experts().iter().zip(r.weights()) {
                if e as usize >= self.experts {
                    return Err(Error::InvalidArgument(format!(
                        "layer {layer}, token {t}: expert {e} is outside 0..{}",
                        self.experts
                    )));
                }
                if !w.is_finite() {
                    return Err(Error::InvalidArgument(format!(
                        "layer {layer}, token {t}: expert {e} has weight {w}"
                    )));
                }
                used.insert(e);
            }
        }
        Ok(used)
    }
}

/// The most units one wave of a layer may hold: the layer's quota, else the whole cache.
pub fn wave_room(cache: &ExpertCache) -> usize {
    cache.layer_quota().unwrap_or(cache.capacity()).max(1)
}

/// Splits a layer's experts into waves that fit the cache, and makes each wave resident in turn:
/// each wave's units are accessed (a hit, or a miss assigned a slot by the eviction policy) and
/// pinned, then `run(wave_units, lookups)` issues the wave's compute; a unit's load on a miss is
/// the caller's to perform inside `run`, before the compute that reads it. Pins already held (the
/// step's earlier layers, a prefetch plan's window) are kept while they leave room, so a planned
/// unit is not evicted before its use; when they do not, they are released (their compute has
/// been issued, and a device reload waits for it) and only the wave's own units stay pinned.
/// Between two waves of one layer the earlier wave's pins are released. Returns the waves run.
pub fn run_waves(
    cache: &mut ExpertCache,
    layer: usize,
    used: &ExpertSet,
    mut run: impl FnMut(&[Unit], &[crate::cache::Lookup]) -> Result<()>,
) -> Result<u64> {
    let room = wave_room(cache);
    let units: Vec<Unit> = used.iter().map(|e| Unit::new(layer, e)).collect();
    let mut waves = 0;
    for wave in units.chunks(room) {
        if waves > 0 {
            cache.unpin_all();
        }
        let mut lookups = Vec::with_capacity(wave.len());
        for (i, &u) in wave.iter().enumerate() {
            let lookup = match cache.access(u) {
                Err(Error::Capacity(_)) => {
                    cache.unpin_all();
                    for &p in &wave[..i] {
                        cache.pin(p)?;
                    }
                    cache.access(u)?
                }
                other => other?,
            };
            lookups.push(lookup);
        }
        run(wave, &lookups)?;
        waves += 1;
    }
    Ok(waves)
}

#[cfg(test)]
mod tests;
