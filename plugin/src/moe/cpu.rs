//! The CPU expert runtime: the reference every other runtime is checked against.
//!
//! Every expert stays in host memory and is computed from there, so the optional cache is
//! **accounting**: it makes the decisions a device cache makes (which units are resident, hits,
//! misses, evictions by the policy and by the next uses a plan gives it, per-wave pins, a load of
//! the unit's bytes per miss) without copying anything. A CPU deployment therefore shows what a
//! GPU with that cache would load, and the serving loop reads it like any backend's cache.

use super::speculate::{
    admit_guess, EvictionGuard, LayerScores, SpeculationStats, Speculator, SpeculatorConfig,
};
use super::{run_waves, MoeShape, RuntimeStats};
use crate::cache::{prefetch, EvictionPolicy, ExpertCache, ExpertCapacity, HostMemory};
use crate::cache::{Lookup, Unit};
use crate::cache::{MemoryBackend, StepExperts};
use crate::error::{Error, Result};
use crate::model::weights::ExpertWeights;
use crate::ops::matmul::dot;
use crate::ops::{moe_layer, swiglu_ffn};
use crate::route::{ExpertSet, TokenRoute};

/// Speculative prefetch into the accounting cache (see [`CpuExperts::speculate`]).
struct CpuSpeculation {
    spec: Speculator,
    guard: EvictionGuard,
    /// Each layer's latest predicted experts.
    predicted: Vec<ExpertSet>,
}

/// The routed (and shared) experts of every MoE layer, on the host.
pub struct CpuExperts {
    shape: MoeShape,
    experts: Vec<Vec<ExpertWeights>>,
    shared: Vec<Option<ExpertWeights>>,
    shared_gates: Vec<Option<Vec<f32>>>,
    cache: Option<ExpertCache>,
    stats: RuntimeStats,
    speculation: Option<CpuSpeculation>,
}

impl CpuExperts {
    /// A runtime over `experts[layer][expert]` (every layer with the same number of experts, each
    /// `[I, H]` / `[H, I]` with `H = hidden`) and each layer's optional always-active shared
    /// expert, serving routes of at most `top_k` experts per token.
    pub fn new(
        experts: Vec<Vec<ExpertWeights>>,
        shared: Vec<Option<ExpertWeights>>,
        hidden: usize,
        top_k: usize,
    ) -> Result<Self> {
        let layers = experts.len();
        let n = experts.first().map_or(0, Vec::len);
        if layers == 0 || n == 0 || shared.len() != layers {
            return Err(Error::InvalidArgument(format!(
                "an expert runtime needs at least one layer with experts and one shared entry per \
                 layer ({layers} layers, {n} experts, {} shared entries)",
                shared.len()
            )));
        }
        for (l, layer) in experts.iter().enumerate() {
            if layer.len() != n {
                return Err(Error::InvalidArgument(format!(
                    "layer {l} has {} experts, layer 0 has {n}",
                    layer.len()
                )));
            }
            let ffns = layer.iter().chain(shared[l].as_ref());
            for (e, w) in ffns.enumerate() {
                let i = w.inter();
                let ok = w.gate.cols == hidden
                    && w.up.cols == hidden
                    && w.up.rows == i
                    && w.down.rows == hidden
                    && w.down.cols == i;
                if !ok {
                    return Err(Error::InvalidArgument(format!(
                        "layer {l}, expert {e}: gate [{}, {}], up [{}, {}], down [{}, {}] do not \
                         form an FFN of width {hidden}",
                        w.gate.rows, w.gate.cols, w.up.rows, w.up.cols, w.down.rows, w.down.cols
                    )));
                }
            }
        }
        if top_k == 0 || top_k > n.min(crate::route::MAX_TOP_K) {
            return Err(Error::InvalidArgument(format!(
                "top_k {top_k} must be 1..={}",
                n.min(crate::route::MAX_TOP_K)
            )));
        }
        Ok(CpuExperts {
            shape: MoeShape {
                layers,
                experts: n,
                top_k,
                hidden,
            },
            experts,
            shared_gates: vec![None; shared.len()],
            shared,
            cache: None,
            stats: RuntimeStats::default(),
            speculation: None,
        })
    }

    /// Adds a cache of `capacity` evicting by `policy` (accounting: see the module docs). A unit is
    /// one expert of one layer, counted with the bytes of the largest expert; `All` keeps every
    /// expert resident after its first use; a fraction is of the host's available memory.
    pub fn with_cache(mut self, capacity: ExpertCapacity, policy: EvictionPolicy) -> Result<Self> {
        let unit_bytes = self
            .experts
            .iter()
            .flatten()
            .map(ExpertWeights::bytes)
            .max()
            .unwrap_or(1)
            .max(1) as u64;
        let cache = capacity.build_cache(
            self.shape.layers,
            self.shape.experts,
            unit_bytes,
            policy,
            || HostMemory::new().free_bytes(),
        )?;
        self.cache = Some(cache);
        Ok(self)
    }

    /// Speculates as `cfg` says (see [`CpuExperts::speculate`]); a disabled configuration keeps
    /// no speculator.
    pub fn with_speculation(mut self, cfg: SpeculatorConfig) -> Result<Self> {
        self.speculation = if cfg.enabled {
            Some(CpuSpeculation {
                spec: Speculator::new(cfg, self.shape.layers, self.shape.experts)?,
                guard: EvictionGuard::new(self.shape.layers),
                predicted: vec![ExpertSet::default(); self.shape.layers],
            })
        } else {
            None
        };
        Ok(self)
    }

    /// The speculator's configuration, when speculating.
    pub fn speculation(&self) -> Option<SpeculatorConfig> {
        self.speculation.as_ref().map(|s| s.spec.config())
    }

    /// The speculator's counters, when speculating.
    pub fn speculation_stats(&self) -> Option<SpeculationStats> {
        self.speculation.as_ref().map(|s| s.spec.stats())
    }

    /// Predicted gate scores of coming layers (runtime layer indices): the [`Speculator`]'s
    /// candidates are prefetched into the cache, nearest layer first, under the guarded rule
    /// ([`super::SpecRule::Guarded`]). Nothing is copied on the CPU, so every load is in time and
    /// none delays an exact one; what is left of the rule is eviction: a speculative load evicts,
    /// by the policy, only a unit that is not pinned (the layer in flight), not named by the
    /// latest prediction, used less lately than the guess, and only while the
    /// [`EvictionGuard`] finds such evictions paying. Without a cache the predictions only count
    /// recall. Not speculating: nothing happens.
    pub fn speculate(&mut self, scores: &[LayerScores<'_>]) -> Result<()> {
        let Some(sp) = self.speculation.as_mut() else {
            return Ok(());
        };
        let candidates = sp.spec.predict(scores)?;
        for s in scores {
            sp.predicted[s.layer] = ExpertSet::default();
        }
        for c in &candidates {
            sp.predicted[c.layer].insert(c.expert);
        }
        let Some(cache) = self.cache.as_mut() else {
            return Ok(());
        };
        for c in &candidates {
            let unit = Unit::new(c.layer, c.expert);
            let predicted = &sp.predicted[c.layer];
            if let Some(Lookup::Miss { evicted, .. }) =
                admit_guess(cache, unit, predicted, &sp.guard)?
            {
                if let Some(v) = evicted {
                    sp.spec.evicted(v.layer as usize, v.expert);
                    sp.guard.evicted(v.layer as usize, v.expert);
                }
                sp.spec.loaded(c.layer, c.expert);
            }
        }
        Ok(())
    }

    /// Scales each layer's shared expert by `sigmoid(gate . x)` per token, where that layer's
    /// gate `[H]` is given (Qwen2-MoE's `shared_expert_gate`); `gates` has one entry per layer,
    /// and a gate only where the layer has a shared expert.
    pub fn with_shared_gates(mut self, gates: Vec<Option<Vec<f32>>>) -> Result<Self> {
        if gates.len() != self.shape.layers {
            return Err(Error::InvalidArgument(format!(
                "{} shared expert gates for {} layers",
                gates.len(),
                self.shape.layers
            )));
        }
        for (l, g) in gates.iter().enumerate() {
            match (g, &self.shared[l]) {
                (Some(g), Some(_)) if g.len() == self.shape.hidden => {}
                (None, _) => {}
                (Some(g), shared) => {
                    return Err(Error::InvalidArgument(format!(
                        "layer {l}: a shared expert gate of {} values (hidden {}){}",
                        g.len(),
                        self.shape.hidden,
                        if shared.is_none() {
                            " for a layer without a shared expert"
                        } else {
                            ""
                        }
                    )))
                }
            }
        }
        self.shared_gates = gates;
        Ok(self)
    }

    /// The gate of `layer`'s shared expert, if its output is gated.
    pub fn shared_gate(&self, layer: usize) -> Option<&[f32]> {
        self.shared_gates.get(layer)?.as_deref()
    }

    /// Expert `expert` of `layer`.
    pub fn expert(&self, layer: usize, expert: usize) -> Option<&ExpertWeights> {
        self.experts.get(layer)?.get(expert)
    }

    /// The shared expert of `layer`, if it has one.
    pub fn shared(&self, layer: usize) -> Option<&ExpertWeights> {
        self.shared.get(layer)?.as_ref()
    }

    /// The shape calls are checked against.
    pub fn shape(&self) -> MoeShape {
        self.shape
    }

    /// The cache, when there is one.
    pub fn cache(&self) -> Option<&ExpertCache> {
        self.cache.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> RuntimeStats {
        self.stats
    }

    /// Plans the coming steps (nearest first; step 0 is the step about to run): Belady's next
    /// uses. No prefetch: nothing is copied on the CPU, so every load is accounted on demand, as a
    /// miss.
    pub fn plan(&mut self, steps: &[StepExperts]) -> Result<()> {
        if let Some(cache) = self.cache.as_mut() {
            prefetch::set_next_uses(cache, steps, 0);
        }
        Ok(())
    }

    /// Checks one layer call without running it (every layer of a step is checked before a
    /// backend changes any state).
    pub fn check(&self, layer: usize, routes: &[TokenRoute]) -> Result<()> {
        let n = routes.len() * self.shape.hidden;
        self.shape.check_layer(layer, routes, n, n).map(|_| ())
    }

    /// The experts of `layer` for `routes.len()` tokens: `out[t] = sum_j w_j FFN_{e_j}(x[t])`
    /// (plus the layer's shared expert, scaled by `sigmoid(gate . x[t])` when gated), overwriting
    /// `out` or, with `accumulate`, adding to it (a residual stream). `x` and `out` are `[T, H]`.
    pub fn forward_layer(
        &mut self,
        layer: usize,
        x: &[f32],
        routes: &[TokenRoute],
        out: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let used = self.shape.check_layer(layer, routes, x.len(), out.len())?;
        if let Some(sp) = self.speculation.as_mut() {
            // The layer's exact experts are known: recall of what was predicted for it, and
            // whether the speculative evictions of its units cost misses.
            let before = sp.spec.stats().used;
            sp.spec.observe(layer, &used)?;
            let saved = sp.spec.stats().used - before;
            let cache = self.cache.as_ref();
            sp.guard.observe(layer, saved, &used, |e| {
                cache.is_some_and(|c| c.slot_of(Unit::new(layer, e)).is_none())
            });
        }
        if let Some(cache) = self.cache.as_mut() {
            let spec = &mut self.speculation;
            self.stats.waves += run_waves(cache, layer, &used, |_, lookups| {
                // A speculative load that an exact miss evicts unused was wasted.
                for l in lookups {
                    if let (
                        Lookup::Miss {
                            evicted: Some(v), ..
                        },
                        Some(sp),
                    ) = (l, spec.as_mut())
                    {
                        sp.spec.evicted(v.layer as usize, v.expert);
                    }
                }
                Ok(())
            })?;
        } else {
            self.stats.waves += 1;
        }
        let experts = &self.experts[layer];
        let gate = self.shared_gates[layer].as_deref();
        // A gated shared expert is added after the routed sum, as transformers does.
        let (shared, gated) = match gate {
            Some(g) => (None, self.shared[layer].as_ref().map(|s| (s, g))),
            None => (self.shared[layer].as_ref(), None),
        };
        let h = self.shape.hidden;
        if accumulate {
            let mut y = vec![0.0f32; out.len()];
            moe_layer(x, h, routes, |e| &experts[e as usize], shared, &mut y);
            crate::ops::add_assign(out, &y);
        } else {
            moe_layer(x, h, routes, |e| &experts[e as usize], shared, out);
        }
        if let Some((s, g)) = gated {
            let t = routes.len();
            let mut y = vec![0.0f32; t * h];
            swiglu_ffn(x, t, s, &mut y);
            for ((xt, yt), ot) in x
                .chunks_exact(h)
                .zip(y.chunks_exact(h))
                .zip(out.chunks_exact_mut(h))
            {
                let scale = 1.0 / (1.0 + (-dot(g, xt)).exp());
                for (o, v) in ot.iter_mut().zip(yt) {
                    *o += scale * v;
                }
            }
        }
        self.stats.layer_calls += 1;
        Ok(())
    }

    /// Ends a step: every pin is released.
    pub fn end_step(&mut self) {
        if let Some(c) = self.cache.as_mut() {
            c.unpin_all();
        }
    }
}
