//! The prefetch planner: the lookahead turned into an ordered list of expert loads.
//!
//! Routes are known before the backbone runs, so prefetching is exact, not speculative: every unit a
//! coming step needs is known with its deadline, the (step, layer) at which compute reads it. The
//! planner walks those deadlines in order and emits one load per missing unit, nearest deadline
//! first, which is the order a single in-order copy stream must issue them in. A load is admitted
//! only if the cache's policy finds it a slot without evicting a unit needed at or before the load's
//! own deadline (those are pinned: the step in flight, everything due earlier, and every unit the
//! plan already loaded), so a planned load is never evicted before its use and never pushes out a
//! unit that is needed sooner. The first load that cannot be admitted ends the plan: later deadlines
//! are served on demand once the step in flight releases its pins.

use crate::cache::{ExpertCache, Lookup, Unit, NEVER};
use crate::route::{ExpertId, ExpertSet};

/// The experts one coming step uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepExperts {
    /// The same experts at every layer (the Read-ME router).
    AllLayers(ExpertSet),
    /// One set per layer.
    PerLayer(Vec<ExpertSet>),
}

impl StepExperts {
    /// The experts used at `layer`.
    pub fn at(&self, layer: usize) -> ExpertSet {
        match self {
            StepExperts::AllLayers(s) => *s,
            StepExperts::PerLayer(v) => v.get(layer).copied().unwrap_or_default(),
        }
    }
}

/// One load of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedLoad {
    /// The unit to load.
    pub unit: Unit,
    /// Deadline: index of the step in the lookahead (0 = the step about to run).
    pub step: usize,
    /// Deadline: the layer that reads it.
    pub layer: usize,
    /// The unit whose slot it takes, if the cache was full.
    pub evicts: Option<Unit>,
}

/// Plans exact prefetches from the lookahead.
#[derive(Debug, Clone, Copy)]
pub struct PrefetchPlanner {
    /// The most loads one plan may hold (bounds the copy queue).
    pub max_loads: usize,
}

impl Default for PrefetchPlanner {
    fn default() -> Self {
        PrefetchPlanner { max_loads: 1024 }
    }
}

/// Position of a deadline on one clock: `step * layers + layer`.
fn position(step: usize, layer: usize, layers: usize) -> u64 {
    (step * layers + layer) as u64
}

/// Sets every unit's next use in `cache` to its first deadline in `lookahead` (positions
/// `step * layers + layer`, offset by `base`), or [`NEVER`] where the lookahead does not use it.
pub fn set_next_uses(cache: &mut ExpertCache, lookahead: &[StepExperts], base: u64) {
    let layers = cache.layers();
    for layer in 0..layers {
        let mut first = [NEVER; crate::route::MAX_EXPERTS];
        for (step, s) in lookahead.iter().enumerate().rev() {
            for e in s.at(layer).iter() {
                first[e as usize] = base + position(step, layer, layers);
            }
        }
        cache.set_layer_next_use(layer, |e: ExpertId| first[e as usize]);
    }
}

impl PrefetchPlanner {
    /// The loads that would bring every unit of `lookahead` in, nearest deadline first, as far as
    /// they can be admitted; `cache` is not modified.
    pub fn plan(&self, cache: &ExpertCache, lookahead: &[StepExperts]) -> Vec<PlannedLoad> {
        let mut scratch = cache.clone();
        self.plan_into(&mut scratch, lookahead)
    }

    /// Plans and issues the loads on `cache` (as prefetches: no hit or miss is counted). Every unit
    /// of the lookahead window is left pinned, so neither the plan nor a demand miss of the step in
    /// flight evicts a unit before its use; [`ExpertCache::unpin_all`] at the end of the step
    /// releases them. Belady's next uses are set from the lookahead (positions `step * layers +
    /// layer`).
    pub fn plan_into(
        &self,
        cache: &mut ExpertCache,
        lookahead: &[StepExperts],
    ) -> Vec<PlannedLoad> {
        set_next_uses(cache, lookahead, 0);
        let layers = cache.layers();
        let mut out: Vec<PlannedLoad> = Vec::new();
        for (step, experts) in lookahead.iter().enumerate() {
            for layer in 0..layers {
                let needed = experts.at(layer);
                // Everything due up to this deadline stays put while this deadline's loads run;
                // pins are never released inside a plan, which is what keeps a planned unit from
                // being evicted before its use.
                for e in needed.iter() {
                    let _ = cache.pin(Unit::new(layer, e));
                }
                for e in needed.iter() {
                    let unit = Unit::new(layer, e);
                    if cache.slot_of(unit).is_some() {
                        continue;
                    }
                    if out.len() >= self.max_loads {
                        return out;
                    }
                    let evicts = match cache.prefetch(unit) {
                        Ok(Some(Lookup::Miss { evicted, .. })) => evicted,
                        Ok(_) => None,
                        // Every candidate slot holds a unit due no later than this one.
                        Err(_) => return out,
                    };
                    out.push(PlannedLoad {
                        unit,
                        step,
                        layer,
                        evicts,
                    });
                }
            }
        }
        out
    }
}
