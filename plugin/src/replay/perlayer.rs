//! The simulated replay of a model that routes each layer from its own hidden state, with
//! speculative expert prefetch ([`crate::moe::Speculator`]) or on-demand loading.
//!
//! The batcher, the cache and the cost model are those of [`super::sim`]; what changes is what is
//! known ahead. No route is known before its layer runs, so the batcher sees none (its
//! expert-aware policy degrades to decode-first) and the cache learns next uses only from
//! speculation. Every token has its own `k` experts at every layer, from the synthetic per-layer
//! model or a recorded route trace ([`super::workload`]).
//!
//! # One step, layer by layer
//! - Layer `l` starts with its dense part (`dense_layer_s`); its exact experts are then known
//!   ([`Speculator::observe`] counts recall), accessed in the cache (hits first) and every miss is
//!   loaded on demand on the in-order copy stream, after whatever it already carries. For
//!   `belady`/`belady-decay`, a unit just used is next expected at the same layer of the next step
//!   (position `layers + l`): after every speculated unit, before the layer's other units, which
//!   have no known use once the layer ran and which the policy's fallback ranks.
//! - With speculation of depth `D`, the predicted scores of layers `l+1..=l+D` are made from the
//!   recall model (below) and turned into candidates; [`cap`] keeps those whose load can start
//!   on the copy stream before their layer is estimated to run (layers ahead are assumed as wide
//!   as layer `l`), and the
//!   kept ones are issued through the cache's [`PrefetchPlanner`] (nearest layer first; Belady
//!   next use = the predicted layer's position in the step, so `belady`/`belady-decay` keep them
//!   over units with no known use, and a planned load never evicts a unit due sooner). At step
//!   start, layers `0..D` are predicted the same way at distances `1..=D` (a real backend applies
//!   their gates to the step's embeddings), so the first layers are not certain misses.
//! - The layer's experts then compute one after the other (`expert_layer_s` each plus its share of
//!   `token_s`), each waiting for its load, speculative or on demand, to land: that wait is stall.
//!
//! That is the eager rule ([`SpecRule::Eager`]). Under the guarded rule (the default,
//! [`SpecRule::Guarded`]) the kept candidates instead wait in a [`SpecQueue`]; after each layer's
//! compute (and at step start) the queue's front starts while the copy lands before the next
//! layer's exact loads are issued, so no exact load ever waits behind a guess; a queued load is
//! cancelled when its layer runs or a newer prediction drops it; and a started one evicts only a
//! unit the latest prediction does not name, while the
//! [`EvictionGuard`] finds such evictions paying.
//!
//! A speculative load that the cache evicts before its layer used it is *wasted*. The hit ratio
//! counts exact accesses only: a speculative load that lands in time is a hit.
//!
//! # Recall model
//! The simulator has no hidden states, so the speculation's quality is a parameter: at distance
//! `j` each of a token's `k` true experts is among the token's predicted top-`k` with probability
//! `r_j`, independently. A wrong guess of a real gate is a plausible expert, not a random one,
//! so the top-`k` is filled with other experts drawn in proportion to their *plausibility*: the
//! layer's decayed use count in the cache ([`ExpertCache::decayed_uses`]) plus
//! [`PLAUSIBLE_FLOOR`]; the `m` extra candidates are the rest ranked by uniform noise scaled by
//! plausibility (a missed true expert among them, likelier when it is a common one). The measured
//! recall@k is `r_j` in expectation with `m = 0` and one token per step; extra candidates and a
//! step's union over several tokens catch more. Defaults ([`DEFAULT_RECALL`]): `r_1 = 0.79`, `r_2 = 0.69`, the
//! practitioner measurement of residual-stream prediction the design note cites; `r_3 = 0.59`,
//! `r_4 = 0.49` extend its 10-point drop per layer and are not measured.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::layer;
use super::report::{PerLayerReport, Report, Summary};
use super::requests::{Flow, Outcome, Requests};
use super::sim::{check_capacity, SimConfig};
use super::workload::{LayerExpertModel, LayerStream, RouteTrace, TraceRequest};
use crate::batcher::LookaheadBatcher;
use crate::cache::{ExpertCache, Lookup, PrefetchPlanner, StepExperts, Unit, NEVER};
use crate::error::{Error, Result};
use crate::metrics::ModelMetrics;
use crate::moe::speculate::{
    cap, fits_before_exact, Budget, EvictionGuard, LayerScores, SpecQueue, SpecRule, Speculator,
    SpeculatorConfig,
};
use crate::route::{ExpertId, ExpertSet, RoutePlan, RouteScope};

/// The plausibility every expert has on top of its layer's decayed use count in the recall
/// model: an expert never used yet can still be a wrong guess.
pub const PLAUSIBLE_FLOOR: f64 = 0.5;

/// The recall model's default `r_j` for distances 1..=4 (see the module documentation).
pub const DEFAULT_RECALL: [f64; 4] = [0.79, 0.69, 0.59, 0.49];

/// Where the per-layer routes come from.
#[derive(Debug, Clone)]
pub enum RouteSource {
    /// The synthetic per-layer model.
    Synthetic(LayerExpertModel),
    /// Recorded routes.
    Trace(Arc<RouteTrace>),
}

/// What a per-layer replay adds to [`SimConfig`].
#[derive(Debug, Clone)]
pub struct PerLayerConfig {
    /// Experts per token and layer.
    pub top_k: usize,
    /// The routes.
    pub routes: RouteSource,
    /// Speculative prefetch; `None` loads every expert on demand.
    pub speculation: Option<SpeculatorConfig>,
    /// The recall model's `r_j`, by `j - 1`; at least `depth` entries in `[0, 1]`.
    pub recall: Vec<f64>,
    /// How speculative loads share the link with on-demand loads.
    pub rule: SpecRule,
}

impl PerLayerConfig {
    fn validate(&self, cfg: &SimConfig) -> Result<()> {
        let shape = cfg.shape;
        if !(1..=crate::route::MAX_TOP_K).contains(&self.top_k) {
            return Err(Error::InvalidArgument(format!(
                "top-{} is outside 1..={}",
                self.top_k,
                crate::route::MAX_TOP_K
            )));
        }
        check_capacity(cfg.per_layer, shape.experts, self.top_k)?;
        match &self.routes {
            RouteSource::Synthetic(m) => {
                m.validate()?;
                if (m.layers, m.base.experts, m.top_k) != (shape.layers, shape.experts, self.top_k)
                {
                    return Err(Error::InvalidArgument(format!(
                        "the route model has {} layers x {} experts, top-{}; the replay {} x {}, \
                         top-{}",
                        m.layers, m.base.experts, m.top_k, shape.layers, shape.experts, self.top_k
                    )));
                }
            }
            RouteSource::Trace(t) => {
                if t.layers != shape.layers || t.top_k != self.top_k || t.experts() > shape.experts
                {
                    return Err(Error::InvalidArgument(format!(
                        "the route trace has {} layers, top-{}, experts up to {}; the replay \
                         needs {} layers, top-{}, {} experts",
                        t.layers,
                        t.top_k,
                        t.experts(),
                        shape.layers,
                        self.top_k,
                        shape.experts
                    )));
                }
            }
        }
        if let Some(s) = &self.speculation {
            s.validate()?;
            if self.recall.len() < s.depth {
                return Err(Error::InvalidArgument(format!(
                    "speculation depth {} needs a recall for each distance, {} given",
                    s.depth,
                    self.recall.len()
                )));
            }
        }
        if let Some(r) = self.recall.iter().find(|r| !(0.0..=1.0).contains(*r)) {
            return Err(Error::InvalidArgument(format!(
                "recall {r} must be in [0, 1]"
            )));
        }
        Ok(())
    }
}

/// Where a request's per-layer routes come from, drawn token by token as steps compute them.
enum Tokens {
    Synthetic(Box<LayerStream>),
    Trace { request: usize, next: usize },
}

fn slot_of(l: Lookup) -> usize {
    match l {
        Lookup::Hit { slot } | Lookup::Miss { slot, .. } => slot,
    }
}

/// The per-layer step machinery: cache, copy stream, speculation.
struct Device {
    cache: ExpertCache,
    spec: Speculator,
    depth: usize,
    recall: Vec<f64>,
    top_k: usize,
    rng: ChaCha8Rng,
    planner: PrefetchPlanner,
    load_s: f64,
    copy_free: f64,
    /// When each slot's load lands, and when its last reader finishes.
    slot_ready: Vec<f64>,
    slot_free: Vec<f64>,
    demand_loads: u64,
    scores: Vec<Vec<f32>>,
    /// Cumulative plausibility of a layer's experts (the recall model's wrong guesses).
    plausible: Vec<f64>,
    outcomes: Vec<(ExpertId, Lookup)>,
    /// Per outcome of the layer: its slot and when its unit is ready (`None`: loaded later).
    ready: Vec<(usize, Option<f64>)>,
    /// Next uses of the current layer's units after its access.
    future: Vec<u64>,
    /// Distinct experts per layer in the last step: the width assumed for layers ahead.
    width: f64,
    rule: SpecRule,
    /// Guarded rule: speculative loads not started yet, and when they were queued.
    queue: SpecQueue,
    queued_at: f64,
    /// Guarded rule: each layer's latest predicted experts (resident ones are kept from eviction
    /// by a speculative load).
    predicted: Vec<ExpertSet>,
    guard: EvictionGuard,
}

impl Device {
    /// Queues a load into `slot` on the copy stream, not before `now` nor before the slot's last
    /// reader is done; returns when it lands.
    fn load(&mut self, slot: usize, now: f64) -> f64 {
        let begin = self.copy_free.max(now).max(self.slot_free[slot]);
        self.copy_free = begin + self.load_s;
        self.slot_ready[slot] = self.copy_free;
        self.copy_free
    }

    /// The recall model's scores of `layer` at `distance` for the step's tokens (`routes`:
    /// `tokens x layers x k`).
    fn fill_scores(&mut self, slot: usize, routes: &[ExpertId], layer: usize, distance: usize) {
        let e_n = self.cache.experts();
        let layers = self.cache.layers();
        let k = self.top_k;
        let r = self.recall[distance - 1];
        let tokens = routes.len() / (layers * k);
        // Plausibility of each expert: the layer's decayed use counts, floored.
        self.plausible.clear();
        let mut total = 0.0;
        for e in 0..e_n {
            let w = self.cache.decayed_uses(Unit::new(layer, e as ExpertId)) + PLAUSIBLE_FLOOR;
            total += w;
            self.plausible.push(total);
        }
        let w_max = (0..e_n)
            .map(|e| self.plausible[e] - if e > 0 { self.plausible[e - 1] } else { 0.0 })
            .fold(0.0, f64::max);
        let scores = &mut self.scores[slot];
        scores.clear();
        for t in 0..tokens {
            let base = scores.len();
            for e in 0..e_n {
                let w = self.plausible[e] - if e > 0 { self.plausible[e - 1] } else { 0.0 };
                scores.push((self.rng.random::<f64>() * w / w_max) as f32);
            }
            let truth = &routes[(t * layers + layer) * k..(t * layers + layer + 1) * k];
            let mut missed = 0;
            for &e in truth {
                if self.rng.random::<f64>() < r {
                    scores[base + e as usize] += 2.0;
                } else {
                    missed += 1;
                }
            }
            // Decoys fill the top-k, drawn by plausibility (uniformly once that keeps failing);
            // the rest, ordered by plausibility-weighted noise, give the extra candidates.
            let others = e_n - k;
            let (mut placed, mut tries) = (0, 0);
            while placed < missed.min(others) {
                let e = if tries < 64 {
                    let u = self.rng.random::<f64>() * total;
                    self.plausible.partition_point(|&c| c <= u).min(e_n - 1)
                } else {
                    self.rng.random_range(0..e_n)
                };
                tries += 1;
                if truth.contains(&(e as ExpertId)) || scores[base + e] >= 2.0 {
                    continue;
                }
                scores[base + e] += 2.0;
                placed += 1;
            }
        }
    }

    /// Predicts `targets` (layer, distance), caps by what the link moves before each runs (from
    /// `now`; layer `distance` starts `first + (distance - 1) x per_layer` from now) and issues
    /// the kept loads.
    fn speculate(
        &mut self,
        routes: &[ExpertId],
        targets: &[(usize, usize)],
        now: f64,
        first: f64,
        per_layer: f64,
        unit_bytes: u64,
    ) -> Result<()> {
        for (slot, &(layer, distance)) in targets.iter().enumerate() {
            self.fill_scores(slot, routes, layer, distance);
        }
        let inputs: Vec<LayerScores<'_>> = targets
            .iter()
            .enumerate()
            .map(|(slot, &(layer, distance))| LayerScores {
                layer,
                distance,
                scores: &self.scores[slot],
                top_k: self.top_k,
            })
            .collect();
        let candidates = self.spec.predict(&inputs)?;
        let start = self.copy_free.max(now);
        let seconds_until = (1..=self.depth)
            .map(|j| now + first + (j - 1) as f64 * per_layer - start)
            .collect();
        let budget = Budget::Link {
            bytes_per_s: unit_bytes as f64 / self.load_s,
            unit_bytes,
            seconds_until,
        };
        let cache = &self.cache;
        let kept = cap(&candidates, &budget, |l, e| {
            cache.slot_of(Unit::new(l, e)).is_some()
        });
        if self.rule == SpecRule::Guarded {
            for &(layer, _) in targets {
                self.predicted[layer] = ExpertSet::default();
            }
            for c in &candidates {
                self.predicted[c.layer].insert(c.expert);
            }
            self.queue.replace(&kept);
            self.queued_at = now;
            return Ok(());
        }
        if kept.is_empty() {
            return Ok(());
        }
        // The plan pins every unit it names: the resident candidates too, so that a load for
        // their layer does not evict them.
        let mut sets = vec![ExpertSet::default(); self.cache.layers()];
        for c in candidates
            .iter()
            .filter(|c| self.cache.slot_of(Unit::new(c.layer, c.expert)).is_some())
        {
            sets[c.layer].insert(c.expert);
        }
        for c in &kept {
            sets[c.layer].insert(c.expert);
        }
        for p in self
            .planner
            .plan_into(&mut self.cache, &[StepExperts::PerLayer(sets)])
        {
            if let Some(v) = p.evicts {
                self.spec.evicted(v.layer as usize, v.expert);
            }
            let slot = self.cache.slot_of(p.unit).ok_or_else(|| {
                Error::Internal(format!("planned unit {:?} is not resident", p.unit))
            })?;
            self.load(slot, now);
            self.spec.loaded(p.layer, p.unit.expert);
        }
        Ok(())
    }

    /// Guarded rule: starts queued speculative loads, in order, while each lands by
    /// `next_exact` (when the next exact load can be issued); the rest wait. A load evicts, by
    /// the policy, only a unit the latest prediction does not name (those are pinned), and only
    /// while the [`EvictionGuard`] finds such evictions paying; its own next use is its layer's
    /// position, before any unit with no predicted use.
    fn drain(&mut self, next_exact: f64) -> Result<()> {
        while let Some(&c) = self.queue.front() {
            let unit = Unit::new(c.layer, c.expert);
            if self.cache.slot_of(unit).is_some() {
                self.queue.pop();
                continue;
            }
            let begin = self.copy_free.max(self.queued_at);
            if !fits_before_exact(begin, self.load_s, next_exact) {
                break;
            }
            self.queue.pop();
            // A unit the prediction names is worth more than the guess; the others are ranked
            // by the policy (a unit used when its layer last ran, expected again, goes last).
            for e in self.predicted[c.layer].iter() {
                let u = Unit::new(c.layer, e);
                if self.cache.slot_of(u).is_some() {
                    self.cache.pin(u)?;
                }
            }
            self.cache.set_next_use(unit, c.layer as u64)?;
            let full = self
                .cache
                .layer_quota()
                .is_some_and(|q| self.cache.resident_experts(c.layer).len() >= q);
            if full && !self.guard.may_evict() {
                continue;
            }
            // Every slot of the layer held a predicted unit: nothing of lower value to evict.
            let Ok(Some(Lookup::Miss { slot, evicted })) = self.cache.prefetch(unit) else {
                continue;
            };
            if let Some(v) = evicted {
                self.spec.evicted(v.layer as usize, v.expert);
                self.guard.evicted(v.layer as usize, v.expert);
            }
            self.load(slot, self.queued_at);
            self.spec.loaded(c.layer, c.expert);
        }
        Ok(())
    }

    /// Runs one step of `tokens` tokens whose routes are `routes` (`tokens x layers x k`) from
    /// `start`. Returns (end, stall seconds, distinct experts summed over layers).
    fn step(
        &mut self,
        routes: &[ExpertId],
        tokens: usize,
        start: f64,
        cfg: &SimConfig,
    ) -> Result<(f64, f64, usize)> {
        let layers = self.cache.layers();
        let k = self.top_k;
        let cost = &cfg.cost;
        let unit_bytes = self.cache.unit_bytes();
        let enabled = self.spec.config().enabled;
        let mut t = start;
        let mut stall = 0.0;
        let mut distinct = 0;
        let per_expert = |used: usize| {
            cost.expert_layer_s + cost.token_s * tokens as f64 / layers as f64 / used.max(1) as f64
        };
        let est_layer = |width: f64| cost.dense_layer_s + width * per_expert(width as usize);
        if enabled {
            // The step's embeddings predict its first layers.
            let targets: Vec<(usize, usize)> =
                (0..self.depth.min(layers)).map(|l| (l, l + 1)).collect();
            let w = est_layer(self.width);
            self.speculate(routes, &targets, t, cost.dense_layer_s, w, unit_bytes)?;
            if self.rule == SpecRule::Guarded {
                self.drain(t + cost.dense_layer_s)?;
            }
        }
        let mut widths = 0usize;
        for l in 0..layers {
            t += cost.dense_layer_s;
            self.queue.cancel_layer(l);
            let mut used = ExpertSet::default();
            for tok in 0..tokens {
                for &e in &routes[(tok * layers + l) * k..(tok * layers + l + 1) * k] {
                    used.insert(e);
                }
            }
            widths += used.len();
            distinct += used.len();
            let before = self.spec.stats().used;
            self.spec.observe(l, &used)?;
            let cache = &self.cache;
            self.guard
                .observe(l, self.spec.stats().used - before, &used, |e| {
                    cache.slot_of(Unit::new(l, e)).is_none()
                });
            // The speculation window's pins end here: the exact layer may evict any guess.
            self.cache.unpin_all();
            // After its use a unit is expected at the same layer of the next step (a sequence's
            // experts recur): later than every speculated unit (positions below `layers`),
            // sooner than the layer's other units, whose predictions this run of the layer used
            // up: they have no known use.
            for (e, f) in self.future.iter_mut().enumerate() {
                *f = if used.contains(e as ExpertId) {
                    (layers + l) as u64
                } else {
                    NEVER
                };
            }
            layer::access_layer(&mut self.cache, l, &used, &self.future, &mut self.outcomes)?;
            // Demand loads go on the copy stream now, ahead of any speculation; a miss that takes
            // the slot of a unit this layer uses first (more experts than slots) can only load
            // once that unit's compute is done, so it is issued in the compute loop below.
            self.ready.clear();
            for i in 0..self.outcomes.len() {
                let (slot, miss) = match self.outcomes[i].1 {
                    Lookup::Hit { slot } => (slot, None),
                    Lookup::Miss { slot, evicted } => (slot, Some(evicted)),
                };
                let reused = self.outcomes[..i].iter().any(|o| slot_of(o.1) == slot);
                let ready = match miss {
                    _ if reused => None,
                    None => Some(self.slot_ready[slot]),
                    Some(evicted) => {
                        if let Some(v) = evicted {
                            self.spec.evicted(v.layer as usize, v.expert);
                        }
                        self.demand_loads += 1;
                        Some(self.load(slot, t))
                    }
                };
                self.ready.push((slot, ready));
            }
            let pe = per_expert(used.len());
            if enabled && l + 1 < layers {
                let targets: Vec<(usize, usize)> = (1..=self.depth)
                    .filter(|j| l + j < layers)
                    .map(|j| (l + j, j))
                    .collect();
                let this = used.len() as f64 * pe;
                let w = est_layer(used.len() as f64);
                self.speculate(
                    routes,
                    &targets,
                    t,
                    this + cost.dense_layer_s,
                    w,
                    unit_bytes,
                )?;
            }
            for i in 0..self.ready.len() {
                let (slot, ready) = self.ready[i];
                let ready = match ready {
                    Some(r) => r,
                    None => {
                        if let Lookup::Miss {
                            evicted: Some(v), ..
                        } = self.outcomes[i].1
                        {
                            self.spec.evicted(v.layer as usize, v.expert);
                        }
                        if matches!(self.outcomes[i].1, Lookup::Miss { .. }) {
                            self.demand_loads += 1;
                            self.load(slot, t)
                        } else {
                            self.slot_ready[slot]
                        }
                    }
                };
                let ready = ready.max(t);
                stall += ready - t;
                t = ready + pe;
                self.slot_free[slot] = t;
            }
            if enabled && self.rule == SpecRule::Guarded {
                // The next layer's exact loads are issued after its dense part.
                self.drain(t + cost.dense_layer_s)?;
            }
        }
        self.width = widths as f64 / layers as f64;
        self.cache.unpin_all();
        Ok((t, stall, distinct))
    }
}

/// Replays `reqs` with per-layer routes through the batcher and the cache on the cost model (see
/// the module documentation). `cfg.prefetch` and `cfg.lookahead` are Read-ME's and not read here;
/// `cfg.experts` gives nothing either (the routes come from `pl.routes`).
pub fn simulate_per_layer(
    reqs: &[TraceRequest],
    cfg: &SimConfig,
    pl: &PerLayerConfig,
    metrics: Option<&ModelMetrics>,
) -> Result<Report> {
    let started = std::time::Instant::now();
    let shape = cfg.shape;
    pl.validate(cfg)?;
    let mut batcher = LookaheadBatcher::new(cfg.batcher.clone())?;
    let cache = ExpertCache::with_layer_quota(
        shape.layers,
        shape.experts,
        cfg.per_layer,
        shape.expert_bytes,
        cfg.policy,
        cfg.seed,
    )?;
    let spec_cfg = pl.speculation.unwrap_or(SpeculatorConfig {
        enabled: false,
        ..SpeculatorConfig::default()
    });
    let depth = if spec_cfg.enabled { spec_cfg.depth } else { 0 };
    let mut dev = Device {
        slot_ready: vec![0.0; cache.capacity()],
        slot_free: vec![0.0; cache.capacity()],
        spec: Speculator::new(spec_cfg, shape.layers, shape.experts)?,
        depth,
        recall: pl.recall.clone(),
        top_k: pl.top_k,
        rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x2545_f491_4f6c_dd1d),
        planner: PrefetchPlanner::default(),
        load_s: cfg.cost.load_seconds(shape.expert_bytes),
        copy_free: 0.0,
        demand_loads: 0,
        scores: vec![Vec::new(); depth.max(1)],
        plausible: Vec::new(),
        outcomes: Vec::new(),
        ready: Vec::new(),
        future: vec![NEVER; shape.experts],
        width: pl.top_k as f64,
        rule: pl.rule,
        queue: SpecQueue::default(),
        queued_at: 0.0,
        predicted: vec![ExpertSet::default(); shape.layers],
        guard: EvictionGuard::new(shape.layers),
        cache,
    };
    let (popularity, perms) = match &pl.routes {
        RouteSource::Synthetic(m) => (m.base.popularity(), Arc::new(m.permutations())),
        RouteSource::Trace(_) => (Vec::new(), Arc::new(Vec::new())),
    };
    // No route is known before its layer runs: the batcher sees none.
    let no_routes = RoutePlan::new(shape.experts, RouteScope::AllLayers);

    let mut q = Requests::new(reqs);
    // Each request's token source, from its first scheduled step until it finishes.
    let mut sources: Vec<Option<Tokens>> = reqs.iter().map(|_| None).collect();
    let mut summary = Summary::new(shape.experts);
    let mut now = 0.0f64;
    let mut routes: Vec<ExpertId> = Vec::new();

    loop {
        match q.arrive(&mut now, &mut batcher, reqs, shape.kv_bytes_per_token)? {
            Flow::Ready => {}
            Flow::Idle => continue,
            Flow::Done => break,
        }
        let window = q.window(cfg.batcher.max_running);
        let resident = dev.cache.resident_in_every_layer();
        let views = q.visible(window).map(|i| q.all[i].view(i, &no_routes));
        let plan = batcher.schedule(now, views, &resident)?;
        if plan.is_empty() {
            now = super::idle_until(now, q.next_arrival())?;
            continue;
        }
        q.admit(plan, &mut summary, metrics);

        // The step's tokens and their routes, drawn as they are computed.
        routes.clear();
        for c in &plan.chunks {
            let i = c.seq as usize - 1;
            let source = sources[i].get_or_insert_with(|| match &pl.routes {
                RouteSource::Synthetic(m) => Tokens::Synthetic(Box::new(m.stream(
                    &popularity,
                    perms.clone(),
                    cfg.seed ^ (i as u64 + 1),
                ))),
                RouteSource::Trace(_) => Tokens::Trace {
                    request: i,
                    next: 0,
                },
            });
            for _ in 0..c.tokens {
                match (&mut *source, &pl.routes) {
                    (Tokens::Synthetic(s), _) => s.next_token(&mut routes),
                    (Tokens::Trace { request, next }, RouteSource::Trace(t)) => {
                        t.token(*request, *next, &mut routes);
                        *next += 1;
                    }
                    _ => return Err(Error::Internal("route source mismatch".into())),
                }
            }
        }
        let tokens = plan.tokens;
        let chunks = plan.chunks.clone();
        let start = now;
        let (end, stall, distinct) = dev.step(&routes, tokens, start, cfg)?;
        let used = distinct.div_ceil(shape.layers);
        summary.step(used, tokens, stall);
        if let Some(m) = metrics {
            m.observe_batch(used, tokens);
            m.add_stall(stall);
            m.record_cache(dev.cache.stats(), dev.cache.resident());
            m.record_speculation(dev.spec.stats());
        }

        for c in &chunks {
            let i = c.seq as usize - 1;
            if q.advance(i, c.tokens, end, &mut batcher, &mut summary) == Outcome::Finished {
                sources[i] = None;
            }
        }
        q.retire();
        batcher.step_done(start, end);
        if let Some(m) = metrics {
            m.set_requests(batcher.waiting(), batcher.running());
        }
        now = end;
    }
    let stats = dev.spec.stats();
    let mut report = summary.report(
        dev.cache.stats(),
        batcher.max_waited(),
        started.elapsed().as_secs_f64(),
    );
    report.per_layer = Some(PerLayerReport {
        top_k: pl.top_k,
        spec_depth: depth,
        spec_extra: if depth > 0 { spec_cfg.extra } else { 0 },
        configured_recall: pl.recall[..depth].to_vec(),
        recall: (1..=depth)
            .map(|j| stats.recall(j).unwrap_or(0.0))
            .collect(),
        speculative_loads: stats.loads,
        speculative_used: stats.used,
        wasted_loads: stats.wasted,
        demand_loads: dev.demand_loads,
        spec_rule: pl.rule.as_str().into(),
        cancelled_loads: dev.queue.cancelled(),
    });
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::{BatchPolicy, BatcherConfig};
    use crate::cache::EvictionPolicy;
    use crate::replay::workload::Prompt;
    use crate::replay::{CostModel, ExpertModel, Lookahead, ModelShape};

    const LAYERS: usize = 8;
    const EXPERTS: usize = 8;

    /// 12 requests of 6 prompt and 40 output tokens, one token per step, so a step's union of
    /// predictions is one token's. A layer computes in 150 us (50 dense, 2 x 50 experts); a load
    /// takes 20 us: the link has room to spare for a good prediction.
    fn setup(seed: u64) -> (Vec<TraceRequest>, SimConfig) {
        let reqs = (0..12)
            .map(|i| TraceRequest {
                arrival: i as f64 * 0.01,
                prompt: Prompt::Len(6),
                output_len: 40,
                deadline_s: None,
            })
            .collect();
        let cfg = SimConfig {
            shape: ModelShape {
                layers: LAYERS,
                experts: EXPERTS,
                expert_bytes: 1_000_000,
                kv_bytes_per_token: 1,
            },
            cost: CostModel {
                link_bytes_per_s: 5e10,
                load_fixed_s: 0.0,
                token_s: 0.0,
                expert_layer_s: 50e-6,
                dense_layer_s: 50e-6,
            },
            batcher: BatcherConfig {
                policy: BatchPolicy::DecodeFirst,
                max_batch_tokens: 1,
                max_prefill_chunk: 1,
                ..BatcherConfig::default()
            },
            per_layer: 2,
            policy: EvictionPolicy::Lru,
            prefetch: false,
            experts: ExpertModel::read_me(EXPERTS, seed),
            seed,
            lookahead: Lookahead::Online,
            record_steps: false,
        };
        (reqs, cfg)
    }

    fn per_layer(depth: usize, extra: usize, recall: &[f64], seed: u64) -> PerLayerConfig {
        PerLayerConfig {
            top_k: 2,
            routes: RouteSource::Synthetic(LayerExpertModel::new(LAYERS, EXPERTS, 2, seed)),
            speculation: (depth > 0).then_some(SpeculatorConfig {
                depth,
                extra,
                enabled: true,
            }),
            recall: recall.to_vec(),
            rule: SpecRule::Guarded,
        }
    }

    fn run(cfg: &SimConfig, pl: &PerLayerConfig, reqs: &[TraceRequest]) -> Report {
        let mut r = simulate_per_layer(reqs, cfg, pl, None).unwrap();
        r.wall_s = 0.0;
        r
    }

    #[test]
    fn perfect_recall_with_link_to_spare_removes_the_stall_of_on_demand_loading() {
        let (reqs, cfg) = setup(3);
        let demand = run(&cfg, &per_layer(0, 0, &[], 3), &reqs);
        let spec = run(&cfg, &per_layer(2, 0, &[1.0, 1.0], 3), &reqs);
        assert_eq!(demand.requests, 12);
        assert_eq!(spec.requests, 12);
        assert!(demand.stall_seconds > 0.002, "{}", demand.stall_seconds);
        assert!(
            spec.stall_seconds < 0.02 * demand.stall_seconds,
            "{} vs {}",
            spec.stall_seconds,
            demand.stall_seconds
        );
        assert!(spec.hit_ratio > 0.98 && spec.hit_ratio > demand.hit_ratio + 0.2);
        let p = spec.per_layer.unwrap();
        assert_eq!(p.recall, vec![1.0, 1.0]);
        assert!(p.speculative_loads > 0 && p.demand_loads * 50 < p.speculative_loads);
        let d = demand.per_layer.unwrap();
        assert_eq!((d.spec_depth, d.speculative_loads), (0, 0));
        assert_eq!(d.demand_loads, demand.misses);
    }

    #[test]
    fn zero_recall_only_wastes_loads() {
        let (reqs, cfg) = setup(4);
        let demand = run(&cfg, &per_layer(0, 0, &[], 4), &reqs);
        let spec = run(&cfg, &per_layer(2, 0, &[0.0, 0.0], 4), &reqs);
        assert!(
            spec.hit_ratio <= demand.hit_ratio + 0.01,
            "{} vs {}",
            spec.hit_ratio,
            demand.hit_ratio
        );
        let p = spec.per_layer.unwrap();
        assert_eq!(p.recall, vec![0.0, 0.0]);
        assert!(p.wasted_loads > p.speculative_loads / 2, "{p:?}");
        assert!(spec.loads > demand.loads);
    }

    #[test]
    fn measured_recall_matches_the_recall_model() {
        let (reqs, cfg) = setup(5);
        let r = run(&cfg, &per_layer(3, 0, &[0.8, 0.6, 0.3], 5), &reqs);
        let p = r.per_layer.unwrap();
        // About 12 x 46 steps x 8 layers x 2 experts per distance: sigma below 0.006.
        for (got, want) in p.recall.iter().zip([0.8, 0.6, 0.3]) {
            assert!((got - want).abs() < 0.03, "{got} vs {want}");
        }
        // Extra candidates catch some of the misses (at least the 2 in 6 of a uniform draw, as
        // true experts are the plausible ones): recall@k+m > r with m = 2.
        let wide = run(&cfg, &per_layer(1, 2, &[0.5], 5), &reqs);
        let got = wide.per_layer.unwrap().recall[0];
        assert!(got > 0.5 + 0.5 * 2.0 / 6.0 - 0.03 && got < 1.0, "{got}");
    }

    #[test]
    fn a_seed_gives_one_report() {
        let (reqs, cfg) = setup(6);
        let pl = per_layer(2, 1, &DEFAULT_RECALL, 6);
        let a = run(&cfg, &pl, &reqs);
        assert_eq!(a, run(&cfg, &pl, &reqs));
        let (_, other) = setup(7);
        assert_ne!(a, run(&other, &per_layer(2, 1, &DEFAULT_RECALL, 7), &reqs));
    }

    #[test]
    fn recorded_routes_replay_and_bad_configurations_are_errors() {
        let (reqs, cfg) = setup(8);
        // Two recorded requests: one always on experts 0 and 1, one cycling through pairs.
        let token = |a: u16, b: u16| (0..LAYERS).flat_map(|_| [a, b]).collect::<Vec<_>>();
        let trace = RouteTrace {
            layers: LAYERS,
            top_k: 2,
            requests: vec![
                vec![token(0, 1)],
                (0..4).map(|i| token(2 * i, 2 * i + 1)).collect(),
            ],
        };
        let pl = PerLayerConfig {
            routes: RouteSource::Trace(Arc::new(trace.clone())),
            ..per_layer(1, 0, &[1.0], 8)
        };
        let r = run(&cfg, &pl, &reqs);
        assert_eq!(r.requests, 12);
        let p = r.per_layer.unwrap();
        assert_eq!(p.recall, vec![1.0]);
        assert!(r.hits > 0 && p.speculative_used > 0);
        let demand = PerLayerConfig {
            speculation: None,
            ..pl.clone()
        };
        let d = run(&cfg, &demand, &reqs);
        assert!(d.misses > 0 && d.hit_ratio < r.hit_ratio, "{}", d.hit_ratio);

        let bad = |pl: PerLayerConfig, cfg: &SimConfig| {
            simulate_per_layer(&reqs, cfg, &pl, None)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(per_layer(2, 0, &[0.9], 8), &cfg).contains("recall for each distance"));
        assert!(bad(per_layer(1, 0, &[1.5], 8), &cfg).contains("[0, 1]"));
        assert!(bad(per_layer(5, 0, &[0.5; 5], 8), &cfg).contains("depth"));
        let small = SimConfig {
            per_layer: 1,
            ..cfg.clone()
        };
        assert!(bad(per_layer(0, 0, &[], 8), &small).contains("capacity"));
        let short = RouteTrace { layers: 3, ..trace };
        let pl = PerLayerConfig {
            routes: RouteSource::Trace(Arc::new(short)),
            ..per_layer(0, 0, &[], 8)
        };
        assert!(bad(pl, &cfg).contains("route trace"));
    }
}
