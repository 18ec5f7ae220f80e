//! Speculative expert prefetch for models whose layers route from their own hidden state.
//!
//! With a per-layer gate (Mixtral, Qwen-MoE, OLMoE) a layer's experts are known only when the
//! layer runs, so nothing can be loaded ahead from exact routes. The residual stream changes
//! slowly, though: layer `l+j`'s own norm and gate applied to the hidden state after layer `l`
//! predict layer `l+j`'s experts well for small `j` (mixtral-offloading; the design note reports
//! about 80 % at one layer ahead and 70 % at two). The [`Speculator`] turns such predicted gate
//! scores into an ordered list of prefetch candidates and keeps the statistics that tell how good
//! the predictions were. It is pure host logic: the caller computes the scores (one `[E x H]`
//! product per predicted layer), issues the loads and reports what actually ran.
//!
//! Speculation never changes outputs: every layer still computes its exact routes, and an exact
//! expert that was not prefetched is loaded on demand. A wrong guess costs link time only.
//!
//! Per step and layer `l` the caller:
//! 1. calls [`Speculator::observe`] with layer `l`'s exact experts when they are known (recall of
//!    what was predicted for `l` at each distance; prefetched units that are used);
//! 2. calls [`Speculator::predict`] with the predicted scores of layers `l+1..=l+D`;
//! 3. keeps the candidates [`cap`] lets through the link before each layer runs and loads them,
//!    nearest layer first, reporting each with [`Speculator::loaded`] and each eviction of a unit
//!    with [`Speculator::evicted`] (a speculative load evicted before any use is wasted).
//!
//! Candidates: for each predicted layer, the union over the step's tokens of every token's top
//! `k + m` experts (`k` the layer's gating top-k, `m` the configured extra); a candidate's score is
//! the highest any token gave it (only the order matters, so probabilities and logits alike).
//! Order: distance first (nearest layer first, the order an in-order copy stream must issue them
//! in), then score, highest first; ties by layer, then expert id.
//!
//! Recall at distance `j` is counted on the full prediction, before any budget cap: of the exact
//! experts of a layer, the share that were among the layer's candidates predicted `j` layers ahead
//! (recall@k+m), so it measures the predictor, not the link.

//!
//! # Backends
//! The CPU backend (`engine/cpu.rs`) predicts after each layer's attention, from the residual
//! stream, with the coming layers' own post-attention norms and gates, and before layer 0 from the
//! step's embeddings; its runtime ([`super::CpuExperts::speculate`]) prefetches into the
//! accounting cache and observes each layer's exact experts. The CUDA backend
//! (`cuda/backend.rs`) computes the same predictions on the device and reads them back with each
//! MoE layer's exact routes (one synchronisation); it observes the layer's exact experts, loads
//! its misses first, then queues the candidates [`cap`] lets through a link budget (bytes the
//! measured copy bandwidth moves in about one layer's time, less the exact bytes already queued)
//! behind them on the copy stream, with the same eviction rules and [`EvictionGuard`]. The
//! per-layer replay (`replay/perlayer.rs`) models a stricter rule on an in-order link: candidates
//! wait in a [`SpecQueue`] drained only while a copy lands before the next exact load
//! ([`fits_before_exact`]), and [`SpecQueue::cancel_layer`] drops those whose layer ran. Every
//! backend sends the counters to `ModelMetrics::record_speculation` each step.

use crate::cache::{ExpertCache, Lookup, Unit};
use crate::error::{Error, Result};
use crate::route::{ExpertId, ExpertSet, MAX_EXPERTS, MAX_TOP_K};

/// The most layers ahead a speculator predicts.
pub const MAX_SPEC_DEPTH: usize = 4;

/// The most extra candidates per token beyond the gating top-k.
pub const MAX_SPEC_EXTRA: usize = 8;

/// How far and how wide to speculate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculatorConfig {
    /// Layers ahead to predict, 1..=[`MAX_SPEC_DEPTH`] (default 2).
    pub depth: usize,
    /// Candidates per token beyond the layer's top-k, 0..=[`MAX_SPEC_EXTRA`] (default 1).
    pub extra: usize,
    /// Whether to speculate at all (off: [`Speculator::predict`] proposes nothing).
    pub enabled: bool,
}

impl Default for SpeculatorConfig {
    fn default() -> Self {
        SpeculatorConfig {
            depth: 2,
            extra: 1,
            enabled: true,
        }
    }
}

impl SpeculatorConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_SPEC_DEPTH).contains(&self.depth) {
            return Err(Error::InvalidArgument(format!(
                "speculation depth {} is outside 1..={MAX_SPEC_DEPTH}",
                self.depth
            )));
        }
        if self.extra > MAX_SPEC_EXTRA {
            return Err(Error::InvalidArgument(format!(
                "{} extra speculative experts per token is more than {MAX_SPEC_EXTRA}",
                self.extra
            )));
        }
        Ok(())
    }
}

/// Predicted gate scores of one future layer for the step's tokens.
#[derive(Debug, Clone, Copy)]
pub struct LayerScores<'a> {
    /// The layer predicted.
    pub layer: usize,
    /// How many layers ahead of the current one it is (1..=depth).
    pub distance: usize,
    /// `[tokens, experts]` row-major, probabilities or logits (higher: more likely).
    pub scores: &'a [f32],
    /// The layer's gating top-k.
    pub top_k: usize,
}

/// One prefetch candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Layer of the unit.
    pub layer: usize,
    /// Expert of the unit.
    pub expert: ExpertId,
    /// Layers between the current layer and `layer`.
    pub distance: usize,
    /// The highest score any token gave it.
    pub score: f32,
}

/// How much a prefetch may move before the layers it serves run.
#[derive(Debug, Clone, PartialEq)]
pub enum Budget {
    /// At most this many loads.
    Count(usize),
    /// What an in-order link can start in time: a candidate at distance `j` is kept if the bytes
    /// of the loads kept before it take less than `seconds_until[j - 1]` at `bytes_per_s` (a
    /// missing entry is 0 s), i.e. if its own load starts before its layer runs. Such a load
    /// lands sooner than an on-demand load issued when the layer runs would, even where a coarse
    /// expert (a 352 MB Mixtral expert is 6 ms at 55 GB/s) cannot land in time; one that would
    /// start later only delays the demand loads queued behind it.
    Link {
        /// Link bandwidth, bytes per second (fixed costs folded in).
        bytes_per_s: f64,
        /// Bytes of one unit.
        unit_bytes: u64,
        /// Seconds from now until the layer at distance `j` reads its experts, by `j - 1`.
        seconds_until: Vec<f64>,
    },
}

/// Keeps, in order, the candidates that are not resident and fit `budget`. A resident candidate
/// costs nothing and is dropped; one that does not fit is skipped, so a farther layer, which has
/// more time, may still take a later candidate.
pub fn cap(
    candidates: &[Candidate],
    budget: &Budget,
    mut resident: impl FnMut(usize, ExpertId) -> bool,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut bytes = 0f64;
    for c in candidates {
        if resident(c.layer, c.expert) {
            continue;
        }
        let fits = match budget {
            Budget::Count(n) => out.len() < *n,
            Budget::Link {
                bytes_per_s,
                seconds_until,
                ..
            } => {
                let secs = c
                    .distance
                    .checked_sub(1)
                    .and_then(|j| seconds_until.get(j))
                    .copied()
                    .unwrap_or(0.0)
                    .max(0.0);
                bytes < bytes_per_s * secs
            }
        };
        if fits {
            if let Budget::Link { unit_bytes, .. } = budget {
                bytes += *unit_bytes as f64;
            }
            out.push(*c);
        }
    }
    out
}

/// How speculative loads share the copy link with exact (on-demand) loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpecRule {
    /// Every kept candidate is issued at once on the in-order link, ahead of the exact loads of
    /// later layers. Kept to measure what the guarded rule fixes: a wrong guess holds the link
    /// while the next layer's exact loads wait behind it.
    Eager,
    /// Exact loads first ([`SpecQueue`]): a speculative load waits in a queue and starts only
    /// when the link is free and the copy lands before the next exact load can be issued (a
    /// started copy cannot be preempted, so a wrong guess then delays no exact load); a queued
    /// load whose layer runs is cancelled (its exact routes are known); a speculative load may
    /// evict only a unit that no exact route of the running layer needs and that the current
    /// prediction ranks below it (the caller pins the rest).
    #[default]
    Guarded,
}

impl SpecRule {
    /// The rule's name (`eager`, `guarded`).
    pub fn as_str(self) -> &'static str {
        match self {
            SpecRule::Eager => "eager",
            SpecRule::Guarded => "guarded",
        }
    }
}

impl std::str::FromStr for SpecRule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "eager" => Ok(SpecRule::Eager),
            "guarded" => Ok(SpecRule::Guarded),
            _ => Err(Error::InvalidArgument(format!(
                "unknown speculation rule {s:?} (eager, guarded)"
            ))),
        }
    }
}

/// The speculative loads not started yet, under [`SpecRule::Guarded`], in the order the link
/// issues them. Nothing is in the cache until it starts, so cancelling one costs nothing.
#[derive(Debug, Clone, Default)]
pub struct SpecQueue {
    queued: std::collections::VecDeque<Candidate>,
    cancelled: u64,
}

impl SpecQueue {
    /// Replaces the queue by the latest capped candidates: a newer prediction of a layer (made
    /// nearer to it) supersedes an older one. Counts the replaced entries as cancelled.
    pub fn replace(&mut self, kept: &[Candidate]) {
        let fresh = |c: &Candidate| {
            kept.iter()
                .any(|k| (k.layer, k.expert) == (c.layer, c.expert))
        };
        self.cancelled += self.queued.iter().filter(|c| !fresh(c)).count() as u64;
        self.queued.clear();
        self.queued.extend(kept.iter().copied());
    }

    /// Layer `layer` runs: its queued loads are cancelled (its exact routes are known; those it
    /// needs become exact loads).
    pub fn cancel_layer(&mut self, layer: usize) {
        let before = self.queued.len();
        self.queued.retain(|c| c.layer != layer);
        self.cancelled += (before - self.queued.len()) as u64;
    }

    /// The next load the link would start.
    pub fn front(&self) -> Option<&Candidate> {
        self.queued.front()
    }

    /// Removes the front (it started, or became pointless).
    pub fn pop(&mut self) -> Option<Candidate> {
        self.queued.pop_front()
    }

    /// Loads queued.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Queued loads cancelled so far (their layer ran, or a newer prediction dropped them).
    pub fn cancelled(&self) -> u64 {
        self.cancelled
    }
}

/// Whether speculative loads have paid for their evictions lately, under
/// [`SpecRule::Guarded`]. A speculative load that its layer uses saves a miss; one whose victim
/// that layer then needs adds one, and a wrong guess left resident costs the cache more later. The
/// guard lets speculative loads evict only while the saved misses outweigh [`EvictionGuard::PAYBACK`]
/// times the added ones,
/// both decayed per observed layer (so an idle guard forgets and probes again).
#[derive(Debug, Clone)]
pub struct EvictionGuard {
    victims: Vec<ExpertSet>,
    saved: f64,
    added: f64,
}

impl EvictionGuard {
    /// Per observed layer, the weight old counts keep.
    pub const DECAY: f64 = 0.995;

    /// Saved misses needed per added one: a wrong guess left resident also displaces later
    /// choices of the policy, a cost the direct count misses.
    pub const PAYBACK: f64 = 4.0;

    /// A guard over `layers` layers.
    pub fn new(layers: usize) -> Self {
        EvictionGuard {
            victims: vec![ExpertSet::default(); layers],
            saved: 0.0,
            added: 0.0,
        }
    }

    /// Whether a speculative load may evict now.
    pub fn may_evict(&self) -> bool {
        self.saved >= Self::PAYBACK * self.added
    }

    /// A speculative load evicted (`layer`, `expert`).
    pub fn evicted(&mut self, layer: usize, expert: ExpertId) {
        if let Some(v) = self.victims.get_mut(layer) {
            v.insert(expert);
        }
    }

    /// Layer `layer` ran: `used` speculative loads of it were used, and of its `exact` experts
    /// those `missing` (not resident) count against the guard if speculation evicted them.
    pub fn observe(
        &mut self,
        layer: usize,
        used: u64,
        exact: &ExpertSet,
        mut missing: impl FnMut(ExpertId) -> bool,
    ) {
        self.saved *= Self::DECAY;
        self.added *= Self::DECAY;
        self.saved += used as f64;
        if let Some(v) = self.victims.get_mut(layer) {
            self.added += exact
                .iter()
                .filter(|&e| v.contains(e) && missing(e))
                .count() as f64;
            *v = ExpertSet::default();
        }
    }
}

/// Admits the speculative guess `unit` into `cache` as a prefetch, by the eviction part of the
/// guarded rule every backend shares: it evicts, by the cache's policy, only a unit that is not
/// pinned (the running layer's exact units are), not named by its layer's latest prediction
/// (`predicted`) and used less lately than the guess, and only while `guard` finds such evictions
/// paying; when every evictable unit is worth more, nothing is loaded. Returns the cache's
/// [`Lookup::Miss`] (slot, victim) when the guess was admitted, `None` when it was resident or
/// refused. Host bookkeeping only: the caller copies the bytes and tells the [`Speculator`] and
/// the guard about the load and its victim.
pub fn admit_guess(
    cache: &mut ExpertCache,
    unit: Unit,
    predicted: &ExpertSet,
    guard: &EvictionGuard,
) -> Result<Option<Lookup>> {
    if cache.slot_of(unit).is_some() {
        return Ok(None);
    }
    let layer = unit.layer as usize;
    let worth = cache.decayed_uses(unit);
    let mut pinned = Vec::new();
    for e in 0..cache.experts() {
        let u = Unit::new(layer, e as ExpertId);
        let valued = predicted.contains(e as ExpertId) || cache.decayed_uses(u) >= worth;
        if valued && cache.slot_of(u).is_some() && !cache.is_pinned(u) {
            cache.pin(u)?;
            pinned.push(u);
        }
    }
    let full = match cache.layer_quota() {
        Some(q) => cache.resident_experts(layer).len() >= q,
        None => cache.resident() >= cache.capacity(),
    };
    let outcome = if full && !guard.may_evict() {
        None
    } else {
        // A capacity error: every evictable unit is worth more than the guess.
        cache.prefetch(unit).ok().flatten()
    };
    for &u in &pinned {
        cache.unpin(u);
    }
    Ok(outcome)
}

/// Whether a speculative copy starting at `begin` may start under [`SpecRule::Guarded`]: it lands
/// (after `load_s`) no later than `next_exact`, the earliest time an exact load can be issued.
pub fn fits_before_exact(begin: f64, load_s: f64, next_exact: f64) -> bool {
    begin + load_s <= next_exact
}

/// Counters of a speculator, cumulative since it was built; per-distance arrays by `j - 1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeculationStats {
    /// Exact experts that were predicted at each distance.
    pub hits: [u64; MAX_SPEC_DEPTH],
    /// Exact experts that were not predicted at each distance.
    pub misses: [u64; MAX_SPEC_DEPTH],
    /// Speculative loads issued.
    pub loads: u64,
    /// Speculative loads used by their layer.
    pub used: u64,
    /// Speculative loads evicted before any use.
    pub wasted: u64,
}

impl SpeculationStats {
    /// Recall at `distance` (1-based): hits over exact experts; `None` before any observation.
    pub fn recall(&self, distance: usize) -> Option<f64> {
        let j = distance.checked_sub(1).filter(|&j| j < MAX_SPEC_DEPTH)?;
        let n = self.hits[j] + self.misses[j];
        (n > 0).then(|| self.hits[j] as f64 / n as f64)
    }
}

/// Predictions, recall statistics and speculative-load accounting (see the module documentation).
#[derive(Debug, Clone)]
pub struct Speculator {
    cfg: SpeculatorConfig,
    layers: usize,
    experts: usize,
    /// `predicted[layer * MAX_SPEC_DEPTH + j - 1]`: what was predicted for `layer` at distance `j`
    /// since the layer last ran.
    predicted: Vec<Option<ExpertSet>>,
    /// Speculatively loaded units of each layer not used yet.
    outstanding: Vec<ExpertSet>,
    stats: SpeculationStats,
    order: Vec<(f32, ExpertId)>,
}

impl Speculator {
    /// A speculator for `layers` MoE layers of `experts` experts each.
    pub fn new(cfg: SpeculatorConfig, layers: usize, experts: usize) -> Result<Self> {
        cfg.validate()?;
        if layers == 0 || experts == 0 || experts > MAX_EXPERTS {
            return Err(Error::InvalidArgument(format!(
                "a speculator over {layers} layers x {experts} experts (1..={MAX_EXPERTS})"
            )));
        }
        Ok(Speculator {
            cfg,
            layers,
            experts,
            predicted: vec![None; layers * MAX_SPEC_DEPTH],
            outstanding: vec![ExpertSet::default(); layers],
            stats: SpeculationStats::default(),
            order: Vec::with_capacity(experts),
        })
    }

    /// The configuration.
    pub fn config(&self) -> SpeculatorConfig {
        self.cfg
    }

    /// The counters so far.
    pub fn stats(&self) -> SpeculationStats {
        self.stats
    }

    fn check_scores(&self, s: &LayerScores<'_>) -> Result<()> {
        if s.layer >= self.layers {
            return Err(Error::InvalidArgument(format!(
                "predicted layer {} is outside 0..{}",
                s.layer, self.layers
            )));
        }
        if !(1..=self.cfg.depth).contains(&s.distance) {
            return Err(Error::InvalidArgument(format!(
                "layer {}: distance {} is outside 1..={}",
                s.layer, s.distance, self.cfg.depth
            )));
        }
        if !(1..=MAX_TOP_K.min(self.experts)).contains(&s.top_k) {
            return Err(Error::InvalidArgument(format!(
                "layer {}: top-k {} is outside 1..={}",
                s.layer,
                s.top_k,
                MAX_TOP_K.min(self.experts)
            )));
        }
        if s.scores.len() % self.experts != 0 {
            return Err(Error::InvalidArgument(format!(
                "layer {}: {} scores are not whole rows of {} experts",
                s.layer,
                s.scores.len(),
                self.experts
            )));
        }
        if let Some(bad) = s.scores.iter().position(|x| x.is_nan()) {
            return Err(Error::InvalidArgument(format!(
                "layer {}: token {} has a NaN score for expert {}",
                s.layer,
                bad / self.experts,
                bad % self.experts
            )));
        }
        Ok(())
    }

    /// The prefetch candidates of `layers` (see the module documentation for the union and the
    /// order), recorded as this step's predictions. Every input is checked before anything is
    /// recorded: a bad one is an error and changes nothing. Disabled: no candidates, nothing
    /// recorded.
    pub fn predict(&mut self, layers: &[LayerScores<'_>]) -> Result<Vec<Candidate>> {
        for s in layers {
            self.check_scores(s)?;
        }
        if !self.cfg.enabled {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for s in layers {
            let want = (s.top_k + self.cfg.extra).min(self.experts);
            let mut best = [f32::NEG_INFINITY; MAX_EXPERTS];
            let mut set = ExpertSet::default();
            for row in s.scores.chunks_exact(self.experts) {
                self.order.clear();
                self.order
                    .extend(row.iter().enumerate().map(|(e, &x)| (x, e as ExpertId)));
                let by_score = |a: &(f32, ExpertId), b: &(f32, ExpertId)| {
                    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
                };
                if want < self.order.len() {
                    self.order.select_nth_unstable_by(want - 1, by_score);
                }
                for &(x, e) in &self.order[..want] {
                    set.insert(e);
                    best[e as usize] = best[e as usize].max(x);
                }
            }
            let slot = &mut self.predicted[s.layer * MAX_SPEC_DEPTH + s.distance - 1];
            *slot = Some(slot.unwrap_or_default().union(&set));
            out.extend(set.iter().map(|e| Candidate {
                layer: s.layer,
                expert: e,
                distance: s.distance,
                score: best[e as usize],
            }));
        }
        out.sort_by(|a, b| {
            a.distance
                .cmp(&b.distance)
                .then(b.score.total_cmp(&a.score))
                .then(a.layer.cmp(&b.layer))
                .then(a.expert.cmp(&b.expert))
        });
        Ok(out)
    }

    /// Layer `layer` runs with `exact` experts: counts recall of each distance's prediction for it
    /// and the speculative loads it uses, then forgets its predictions (the next ones are for the
    /// next step).
    pub fn observe(&mut self, layer: usize, exact: &ExpertSet) -> Result<()> {
        if layer >= self.layers {
            return Err(Error::InvalidArgument(format!(
                "observed layer {layer} is outside 0..{}",
                self.layers
            )));
        }
        if let Some(e) = exact.iter().find(|&e| e as usize >= self.experts) {
            return Err(Error::InvalidArgument(format!(
                "layer {layer}: exact expert {e} is outside 0..{}",
                self.experts
            )));
        }
        for j in 0..MAX_SPEC_DEPTH {
            if let Some(p) = self.predicted[layer * MAX_SPEC_DEPTH + j].take() {
                let hit = exact.iter().filter(|&e| p.contains(e)).count() as u64;
                self.stats.hits[j] += hit;
                self.stats.misses[j] += exact.len() as u64 - hit;
            }
        }
        let out = &mut self.outstanding[layer];
        for e in exact.iter() {
            if out.contains(e) {
                out.remove(e);
                self.stats.used += 1;
            }
        }
        Ok(())
    }

    /// A speculative load of `expert` at `layer` was issued.
    pub fn loaded(&mut self, layer: usize, expert: ExpertId) {
        if layer < self.layers && (expert as usize) < self.experts {
            self.outstanding[layer].insert(expert);
            self.stats.loads += 1;
        }
    }

    /// The unit (`layer`, `expert`) left the cache: a speculative load not used by then is
    /// wasted.
    pub fn evicted(&mut self, layer: usize, expert: ExpertId) {
        if let Some(out) = self.outstanding.get_mut(layer) {
            if out.contains(expert) {
                out.remove(expert);
                self.stats.wasted += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u16]) -> ExpertSet {
        let mut s = ExpertSet::default();
        for &e in v {
            s.insert(e);
        }
        s
    }

    fn spec(depth: usize, extra: usize) -> Speculator {
        Speculator::new(
            SpeculatorConfig {
                depth,
                extra,
                enabled: true,
            },
            8,
            4,
        )
        .unwrap()
    }

    fn ids(c: &[Candidate]) -> Vec<(usize, u16)> {
        c.iter().map(|c| (c.layer, c.expert)).collect()
    }

    #[test]
    fn candidates_are_the_union_of_each_tokens_top_k_plus_m_nearest_first() {
        let mut s = spec(2, 1);
        // Two tokens, top-1 + 1 extra: token 0 picks 2 (0.9) and 0 (0.5); token 1 picks 3 (0.8)
        // and 2 (0.7). Layer 5 at distance 2: one token, 1 (0.95) and 0 (0.1).
        let near = [0.5, 0.0, 0.9, 0.1, 0.0, 0.1, 0.7, 0.8];
        let far = [0.1, 0.95, 0.0, 0.0];
        let c = s
            .predict(&[
                LayerScores {
                    layer: 5,
                    distance: 2,
                    scores: &far,
                    top_k: 1,
                },
                LayerScores {
                    layer: 4,
                    distance: 1,
                    scores: &near,
                    top_k: 1,
                },
            ])
            .unwrap();
        assert_eq!(ids(&c), vec![(4, 2), (4, 3), (4, 0), (5, 1), (5, 0)]);
        assert_eq!(c[0].score, 0.9, "the highest score any token gave expert 2");
        assert_eq!(c[3].distance, 2);
    }

    #[test]
    fn logits_rank_like_probabilities_and_ties_go_to_the_lower_expert() {
        let mut s = spec(1, 0);
        let c = s
            .predict(&[LayerScores {
                layer: 1,
                distance: 1,
                scores: &[-3.0, 2.0, 2.0, -1.0],
                top_k: 2,
            }])
            .unwrap();
        assert_eq!(ids(&c), vec![(1, 1), (1, 2)]);
    }

    #[test]
    fn the_budget_caps_by_count_and_by_link_time_skipping_resident_units() {
        let c: Vec<Candidate> = [(1, 0, 1), (1, 1, 1), (1, 2, 1), (2, 0, 2), (2, 1, 2)]
            .iter()
            .map(|&(layer, expert, distance)| Candidate {
                layer,
                expert,
                distance,
                score: 1.0,
            })
            .collect();
        let resident = |l: usize, e: u16| l == 1 && e == 0;
        assert_eq!(
            ids(&cap(&c, &Budget::Count(2), resident)),
            vec![(1, 1), (1, 2)]
        );
        // 10 bytes/s, units of 10 bytes: within 0.5 s of distance 1 one load starts, within
        // 2.5 s of distance 2 three in all.
        let link = Budget::Link {
            bytes_per_s: 10.0,
            unit_bytes: 10,
            seconds_until: vec![0.5, 2.5],
        };
        assert_eq!(ids(&cap(&c, &link, resident)), vec![(1, 1), (2, 0), (2, 1)]);
        let none = Budget::Link {
            bytes_per_s: 10.0,
            unit_bytes: 10,
            seconds_until: vec![],
        };
        assert!(cap(&c, &none, |_, _| false).is_empty());
    }

    #[test]
    fn recall_is_counted_per_distance_against_the_exact_experts() {
        let mut s = spec(2, 0);
        let one = |e: usize| {
            let mut v = [0.0f32; 4];
            v[e] = 1.0;
            v
        };
        let (a, b) = (one(1), one(2));
        // Layer 3 predicted at distance 2 (expert 1) then at distance 1 (expert 2).
        s.predict(&[LayerScores {
            layer: 3,
            distance: 2,
            scores: &a,
            top_k: 1,
        }])
        .unwrap();
        s.predict(&[LayerScores {
            layer: 3,
            distance: 1,
            scores: &b,
            top_k: 1,
        }])
        .unwrap();
        s.observe(3, &set(&[2, 3])).unwrap();
        let st = s.stats();
        assert_eq!((st.hits[0], st.misses[0]), (1, 1));
        assert_eq!((st.hits[1], st.misses[1]), (0, 2));
        assert_eq!(st.recall(1), Some(0.5));
        assert_eq!(st.recall(2), Some(0.0));
        assert_eq!(st.recall(3), None);
        // Predictions are forgotten once the layer ran: a second run counts nothing new.
        s.observe(3, &set(&[2])).unwrap();
        assert_eq!(s.stats().hits, st.hits);
    }

    #[test]
    fn loads_are_used_or_wasted() {
        let mut s = spec(1, 0);
        s.loaded(2, 1);
        s.loaded(2, 3);
        s.loaded(4, 0);
        s.observe(2, &set(&[1])).unwrap();
        s.evicted(2, 1); // used before: not wasted
        s.evicted(2, 3);
        s.evicted(5, 0); // never loaded
        let st = s.stats();
        assert_eq!((st.loads, st.used, st.wasted), (3, 1, 1));
    }

    #[test]
    fn depth_and_extra_are_bounded_and_bad_input_changes_nothing() {
        for (depth, extra) in [(0, 1), (5, 1), (2, 9)] {
            let cfg = SpeculatorConfig {
                depth,
                extra,
                enabled: true,
            };
            assert!(Speculator::new(cfg, 4, 4).is_err(), "{cfg:?}");
        }
        assert!(Speculator::new(SpeculatorConfig::default(), 0, 4).is_err());
        assert_eq!(SpeculatorConfig::default().depth, 2);
        assert_eq!(SpeculatorConfig::default().extra, 1);
        let mut s = spec(2, 1);
        let good = [1.0f32, 0.0, 0.0, 0.0];
        let ok = LayerScores {
            layer: 1,
            distance: 1,
            scores: &good,
            top_k: 1,
        };
        for bad in [
            LayerScores { layer: 8, ..ok },
            LayerScores { distance: 3, ..ok },
            LayerScores { distance: 0, ..ok },
            LayerScores { top_k: 0, ..ok },
            LayerScores { top_k: 5, ..ok },
            LayerScores {
                scores: &[1.0, 2.0, 3.0],
                ..ok
            },
            LayerScores {
                scores: &[1.0, f32::NAN, 0.0, 0.0],
                ..ok
            },
        ] {
            assert!(s.predict(&[ok, bad]).is_err(), "{bad:?}");
        }
        assert!(s.observe(1, &set(&[0])).is_ok());
        assert_eq!(s.stats().hits, [0; MAX_SPEC_DEPTH], "nothing was recorded");
        assert!(s.observe(8, &set(&[0])).is_err());
        assert!(s.observe(1, &set(&[4])).is_err());
        let mut off = Speculator::new(
            SpeculatorConfig {
                enabled: false,
                ..SpeculatorConfig::default()
            },
            4,
            4,
        )
        .unwrap();
        assert!(off.predict(&[ok]).unwrap().is_empty());
    }

    #[test]
    fn the_queue_is_superseded_and_cancelled_by_layer() {
        let c = |layer: usize, expert: u16| Candidate {
            layer,
            expert,
            distance: 1,
            score: 1.0,
        };
        let mut q = SpecQueue::default();
        q.replace(&[c(1, 0), c(1, 2), c(2, 3)]);
        q.replace(&[c(1, 2), c(2, 3), c(2, 1)]);
        assert_eq!(
            q.cancelled(),
            1,
            "(1, 0) was dropped by the newer prediction"
        );
        q.cancel_layer(1);
        assert_eq!(q.cancelled(), 2);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop().map(|c| (c.layer, c.expert)), Some((2, 3)));
        assert_eq!(q.front().map(|c| (c.layer, c.expert)), Some((2, 1)));
        assert!(fits_before_exact(1.0, 0.5, 1.5));
        assert!(!fits_before_exact(1.0, 0.6, 1.5));
        assert_eq!("guarded".parse::<SpecRule>().unwrap(), SpecRule::Guarded);
        assert_eq!("eager".parse::<SpecRule>().unwrap().as_str(), "eager");
        assert!("later".parse::<SpecRule>().is_err());
    }

    #[test]
    fn the_guard_stops_evictions_that_cost_more_misses_than_they_save() {
        let mut g = EvictionGuard::new(2);
        assert!(g.may_evict());
        g.evicted(1, 3);
        g.observe(1, 0, &set(&[3]), |_| true);
        assert!(
            !g.may_evict(),
            "the victim was needed and nothing was saved"
        );
        g.observe(0, 5, &set(&[0]), |_| true);
        assert!(g.may_evict(), "five saved misses outweigh one added");
        g.evicted(0, 1);
        g.observe(0, 0, &set(&[1]), |_| false);
        assert!(g.may_evict(), "a victim back in the cache costs nothing");
    }
}
