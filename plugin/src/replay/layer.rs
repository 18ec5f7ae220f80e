//! One layer of one step against the cache: the order a layer's experts are used, and pins.
//!
//! A layer uses each of its experts once, one after the other (a grouped expert GEMM walks the
//! experts in turn). Resident experts go first, then the misses. Each unit is pinned only while it
//! is being accessed: the next load may take the slot of a unit this layer has already used, and
//! the timeline then makes that load wait until the unit's compute is done (trading copy/compute
//! overlap for a free eviction choice; with two slots a carried pin would leave no choice at all).
//! So a step may use more experts at a layer than the layer has slots. Under `belady` the misses
//! are ordered farthest next use first, so the units needed soonest are loaded last and stay
//! resident; a unit of the step that is not yet used counts as needed now, and once used its next
//! use becomes its next use after this step.

use crate::cache::{ExpertCache, Lookup, Unit};
use crate::error::Result;
use crate::metrics::ModelMetrics;
use crate::route::{ExpertId, ExpertSet};

/// Accesses `used` at `layer`; `future[e]` is expert `e`'s next use after this step (>= 1, or
/// [`crate::cache::NEVER`]). Appends `(expert, outcome)` to `out` in use order.
pub(crate) fn access_layer(
    cache: &mut ExpertCache,
    layer: usize,
    used: &ExpertSet,
    future: &[u64],
    out: &mut Vec<(ExpertId, Lookup)>,
) -> Result<()> {
    out.clear();
    let belady = cache.policy().reads_next_use();
    let mut order: [ExpertId; crate::route::MAX_EXPERTS] = [0; crate::route::MAX_EXPERTS];
    let mut n = 0;
    for e in used
        .iter()
        .filter(|&e| cache.slot_of(Unit::new(layer, e)).is_some())
    {
        order[n] = e;
        n += 1;
    }
    let hits = n;
    for e in used
        .iter()
        .filter(|&e| cache.slot_of(Unit::new(layer, e)).is_none())
    {
        order[n] = e;
        n += 1;
    }
    let fut = |e: ExpertId| {
        future
            .get(e as usize)
            .copied()
            .unwrap_or(crate::cache::NEVER)
    };
    if belady {
        order[hits..n].sort_by_key(|&e| std::cmp::Reverse(fut(e)));
        cache.set_layer_next_use(layer, |e| if used.contains(e) { 0 } else { fut(e) });
    }
    for &e in &order[..n] {
        let unit = Unit::new(layer, e);
        let outcome = cache.access(unit)?;
        out.push((e, outcome));
        if belady {
            cache.set_next_use(unit, fut(e))?;
        }
        cache.unpin(unit);
    }
    Ok(())
}

/// The two streams of a simulated device: compute, and one in-order copy stream for expert loads.
#[derive(Debug, Clone)]
pub(crate) struct Timeline {
    copy_free: f64,
    slot_free: Vec<f64>,
    load_s: f64,
    prefetch: bool,
    outcomes: Vec<(ExpertId, Lookup)>,
}

impl Timeline {
    /// A timeline for `cache`; a load takes `load_s`; with `prefetch` a step's loads are issued
    /// when it starts, else when compute reaches their layer.
    pub(crate) fn new(cache: &ExpertCache, load_s: f64, prefetch: bool) -> Self {
        Timeline {
            copy_free: 0.0,
            slot_free: vec![0.0; cache.capacity()],
            load_s,
            prefetch,
            outcomes: Vec::new(),
        }
    }

    /// Runs one step from `start` over every layer: `dense_s` per layer, then `per_expert_s` per
    /// expert, each waiting for its load. Returns (end, stall seconds).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        &mut self,
        cache: &mut ExpertCache,
        used: &ExpertSet,
        future: &[u64],
        start: f64,
        dense_s: f64,
        per_expert_s: f64,
        metrics: Option<&ModelMetrics>,
    ) -> Result<(f64, f64)> {
        let mut t = start;
        let mut stall = 0.0;
        for l in 0..cache.layers() {
            t += dense_s;
            access_layer(cache, l, used, future, &mut self.outcomes)?;
            for &(e, outcome) in &self.outcomes {
                let mut ready = t;
                if let Lookup::Miss { slot, .. } = outcome {
                    let issue = if self.prefetch { start } else { t };
                    let begin = self.copy_free.max(issue).max(self.slot_free[slot]);
                    self.copy_free = begin + self.load_s;
                    ready = self.copy_free.max(t);
                    if let Some(m) = metrics {
                        m.observe_load(self.load_s);
                    }
                }
                stall += ready - t;
                t = ready + per_expert_s;
                if let Some(s) = cache.slot_of(Unit::new(l, e)) {
                    self.slot_free[s] = t;
                }
            }
        }
        cache.unpin_all();
        Ok((t, stall))
    }
}
