//! The simulated replay: the real batcher and the real expert cache, driven by a cost model
//! instead of a device.
//!
//! # Cost model (defaults: readme-system.md §6, Read-ME on one H100 over PCIe Gen5)
//! - An expert-layer load costs `expert_bytes / link_bytes_per_s + load_fixed_s` (135 MB at
//!   55 GB/s plus 15 us: about 2.47 ms) on one in-order copy stream.
//! - A step computes layer after layer. Layer `l` costs `dense_layer_s` (attention and the other
//!   dense weights: 135 MB read at 3 TB/s, 45 us) plus `expert_layer_s` per distinct expert used (its
//!   weights read once: 45 us) plus `token_s / layers` per token (`token_s` = 2 x 4.7 G active
//!   parameters / 790 TFLOP/s = 11.9 us for the whole model).
//! - Layer `l` starts when layer `l-1` is done and its experts are resident; the wait is stall.
//!   With `prefetch`, every load of the step is issued when the step is decided (the routes of every
//!   layer are known then), in (layer, expert) order, so loads for later layers overlap with
//!   earlier layers' compute; without it, a layer's loads are issued when compute reaches it.
//!   A load never starts before the compute that last used its victim's slot has finished.
//! - The cache holds `per_layer` experts of every layer. A layer computes its experts one after
//!   the other, resident ones first; pins and use order are those of `replay/layer.rs`, so a step may
//!   use more experts at a layer than it has slots (loads then wait for their victim's compute).
//!
//! # Lookahead for `belady`
//! At each step the cache learns every unit's next use. Units the step itself uses come first
//! (exact). The others are ranked by their expected demand in the coming steps, from what a server
//! knows at that moment ([`Lookahead::Online`]): the first 64 pending prompt tokens of every request
//! the batcher can see (exact routes), and for each decode request the chance that its next token
//! uses the expert, estimated from its own route history: `k [e = current] + (1 - k) f_e`, where
//! `k` is the share of its tokens so far that kept the previous expert and `f_e` the share routed to
//! `e`. Higher demand means a sooner use; experts with no demand have no known next use (ties by
//! LRU). [`Lookahead::Oracle`] instead reads the true expert of every decode request's next token
//! (which no router has computed yet): an upper bound on what any lookahead can give, for
//! comparison with offline Belady figures.

use super::layer;
use super::report::{Report, Summary};
use super::requests::{Flow, Outcome, Requests};
use super::workload::{ExpertModel, ExpertStream, TraceRequest};
use crate::batcher::{BatcherConfig, LookaheadBatcher};
use crate::cache::{EvictionPolicy, ExpertCache, NEVER};
use crate::error::{Error, Result};
use crate::metrics::ModelMetrics;
use crate::route::{ExpertId, RoutePlan, TokenRoute};

/// Costs of the simulated device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Host-to-device bandwidth for expert loads, bytes/s.
    pub link_bytes_per_s: f64,
    /// Fixed cost of one load, seconds.
    pub load_fixed_s: f64,
    /// Compute per token for the whole model, seconds.
    pub token_s: f64,
    /// Compute per distinct expert per layer, seconds.
    pub expert_layer_s: f64,
    /// Dense compute per layer, seconds.
    pub dense_layer_s: f64,
}

impl CostModel {
    /// Seconds one expert-layer load of `bytes` takes: the link's bandwidth plus its fixed cost.
    pub fn load_seconds(&self, bytes: u64) -> f64 {
        bytes as f64 / self.link_bytes_per_s + self.load_fixed_s
    }
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            link_bytes_per_s: 55e9,
            load_fixed_s: 15e-6,
            token_s: 2.0 * 4.7e9 / 790e12,
            expert_layer_s: 135e6 / 3.0e12,
            dense_layer_s: 135e6 / 3.0e12,
        }
    }
}

/// The model's shape as the cache sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Backbone layers.
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Bytes of one expert-layer.
    pub expert_bytes: u64,
    /// KV bytes per token (admission accounting).
    pub kv_bytes_per_token: u64,
}

impl ModelShape {
    /// Read-ME on Llama-2-7B: 32 layers, 7 experts of 135 MB per layer, 512 KiB of KV per token.
    pub fn read_me() -> Self {
        ModelShape {
            layers: 32,
            experts: 7,
            expert_bytes: 3 * 4096 * 5504 * 2,
            kv_bytes_per_token: 2 * 32 * 4096 * 2,
        }
    }

    /// Mixtral-8x7B: 32 layers, 8 experts of `3 x 4096 x 14336` bf16 values (352 MB), KV of 8
    /// heads of 128 per layer (128 KiB per token).
    pub fn mixtral_8x7b() -> Self {
        ModelShape {
            layers: 32,
            experts: 8,
            expert_bytes: 3 * 4096 * 14336 * 2,
            kv_bytes_per_token: 2 * 32 * 8 * 128 * 2,
        }
    }

    /// Qwen3-30B-A3B: 48 layers, 128 experts of `3 x 2048 x 768` bf16 values (9.4 MB), KV of 4
    /// heads of 128 per layer (96 KiB per token).
    pub fn qwen3_30b_a3b() -> Self {
        ModelShape {
            layers: 48,
            experts: 128,
            expert_bytes: 3 * 2048 * 768 * 2,
            kv_bytes_per_token: 2 * 48 * 4 * 128 * 2,
        }
    }
}

/// A named model for the simulator: its shape, its gating top-k and its compute costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// The cache's view of the model.
    pub shape: ModelShape,
    /// Experts per token and layer.
    pub top_k: usize,
    /// Compute and link costs on the default device (H100, PCIe Gen5 at 55 GB/s).
    pub cost: CostModel,
}

impl Preset {
    /// `read-me` (top-1, the default costs), `mixtral-8x7b` (top-2) or `qwen3-30b-a3b` (top-8).
    /// Compute as in [`CostModel`]'s defaults: `token_s` = 2 x active parameters / 790 TFLOP/s,
    /// `expert_layer_s` = one expert's bytes / 3 TB/s, `dense_layer_s` = one layer's attention
    /// weights / 3 TB/s (Mixtral: 12.9 G active, 84 MB of attention per layer; Qwen3-30B-A3B:
    /// 3.3 G active, 37.7 MB).
    pub fn by_name(name: &str) -> Result<Self> {
        let h100 = |shape: ModelShape, top_k, active: f64, dense_bytes: f64| Preset {
            shape,
            top_k,
            cost: CostModel {
                token_s: 2.0 * active / 790e12,
                expert_layer_s: shape.expert_bytes as f64 / 3.0e12,
                dense_layer_s: dense_bytes / 3.0e12,
                ..CostModel::default()
            },
        };
        match name {
            "read-me" => Ok(Preset {
                shape: ModelShape::read_me(),
                top_k: 1,
                cost: CostModel::default(),
            }),
            "mixtral-8x7b" => Ok(h100(
                ModelShape::mixtral_8x7b(),
                2,
                12.9e9,
                (2.0 * 4096.0 * 4096.0 + 2.0 * 4096.0 * 1024.0) * 2.0,
            )),
            "qwen3-30b-a3b" => Ok(h100(
                ModelShape::qwen3_30b_a3b(),
                8,
                3.3e9,
                (2.0 * 2048.0 * 4096.0 + 2.0 * 2048.0 * 512.0) * 2.0,
            )),
            other => Err(Error::InvalidArgument(format!(
                "unknown model shape `{other}` (expected read-me, mixtral-8x7b or qwen3-30b-a3b)"
            ))),
        }
    }
}

/// What `belady` may know about future steps (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lookahead {
    /// Queued prompt routes plus each decode request's route history.
    #[default]
    Online,
    /// Also the true expert of every decode request's next token (clairvoyant; for comparison).
    Oracle,
}

impl std::str::FromStr for Lookahead {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "online" => Ok(Lookahead::Online),
            "oracle" => Ok(Lookahead::Oracle),
            other => Err(Error::InvalidArgument(format!(
                "unknown lookahead `{other}` (expected online or oracle)"
            ))),
        }
    }
}

/// Everything a simulated replay needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The model.
    pub shape: ModelShape,
    /// The device.
    pub cost: CostModel,
    /// The batcher.
    pub batcher: BatcherConfig,
    /// Cache capacity, experts per layer.
    pub per_layer: usize,
    /// Eviction policy.
    pub policy: EvictionPolicy,
    /// Issue a step's loads when it is decided (true) or when compute reaches each layer.
    pub prefetch: bool,
    /// Routes of the simulated requests.
    pub experts: ExpertModel,
    /// Seed of the routes and of the random policy.
    pub seed: u64,
    /// What `belady` knows of future steps.
    pub lookahead: Lookahead,
    /// Keep every step's expert set in [`Report::step_experts`].
    pub record_steps: bool,
}

struct SimReq {
    routes: Option<RoutePlan>,
    stream: Option<ExpertStream>,
    current: ExpertId,
    /// Tokens routed to each expert so far (prompt and generated).
    history: Vec<u32>,
    /// Tokens that kept the previous token's expert.
    kept: u32,
}

/// Checks a cache capacity against the model: it must hold one step's experts at a layer (the
/// router's top-k, 1 for Read-ME) and cannot exceed the experts that exist.
pub fn check_capacity(per_layer: usize, experts: usize, top_k: usize) -> Result<()> {
    if per_layer < top_k.max(1) {
        return Err(Error::Capacity(format!(
            "cache capacity {per_layer} expert(s) per layer is smaller than one step's experts \
             (a token uses {} expert(s) at every layer)",
            top_k.max(1)
        )));
    }
    if per_layer > experts {
        return Err(Error::Capacity(format!(
            "cache capacity {per_layer} experts per layer exceeds the model's {experts} experts"
        )));
    }
    Ok(())
}

/// Replays `reqs` through the batcher and the cache on the cost model.
pub fn simulate(
    reqs: &[TraceRequest],
    cfg: &SimConfig,
    metrics: Option<&ModelMetrics>,
) -> Result<Report> {
    let started = std::time::Instant::now();
    let shape = cfg.shape;
    check_capacity(cfg.per_layer, shape.experts, 1)?;
    cfg.experts.validate()?;
    if cfg.experts.experts != shape.experts {
        return Err(Error::InvalidArgument(format!(
            "the expert model has {} experts, the model {}",
            cfg.experts.experts, shape.experts
        )));
    }
    let mut batcher = LookaheadBatcher::new(cfg.batcher.clone())?;
    let mut cache = ExpertCache::with_layer_quota(
        shape.layers,
        shape.experts,
        cfg.per_layer,
        shape.expert_bytes,
        cfg.policy,
        cfg.seed,
    )?;
    let popularity = cfg.experts.popularity();
    let load_s = cfg.cost.load_seconds(shape.expert_bytes);

    let mut q = Requests::new(reqs);
    let mut sims: Vec<SimReq> = reqs
        .iter()
        .map(|_| SimReq {
            routes: None,
            stream: None,
            current: 0,
            history: Vec::new(),
            kept: 0,
        })
        .collect();
    let mut summary = Summary::new(shape.experts);
    let mut now = 0.0f64;
    let mut demand = vec![0f64; shape.experts];
    let mut timeline = layer::Timeline::new(&cache, load_s, cfg.prefetch);
    let mut future = vec![NEVER; shape.experts];
    let mut step_experts = Vec::new();
    let mut token_experts = Vec::new();

    loop {
        match q.arrive(&mut now, &mut batcher, reqs, shape.kv_bytes_per_token)? {
            Flow::Ready => {}
            Flow::Idle => continue,
            Flow::Done => break,
        }
        // Routes exist from arrival on in a real server; materialising them only for the requests
        // the batcher can reach keeps a long overload queue cheap.
        let window = q.window(cfg.batcher.max_running);
        for &i in q.waiting.iter().take(window) {
            let r = &mut sims[i];
            if r.routes.is_none() {
                let mut stream = cfg.experts.stream(&popularity, cfg.seed ^ (i as u64 + 1));
                let mut plan = RoutePlan::new(shape.experts, crate::route::RouteScope::AllLayers);
                r.history = vec![0; shape.experts];
                let mut prev = None;
                for _ in 0..q.all[i].prompt_len {
                    let e = stream.next_expert();
                    r.history[e as usize] += 1;
                    r.kept += (prev == Some(e)) as u32;
                    prev = Some(e);
                    plan.push(&[TokenRoute::single(e)])?;
                }
                r.current = prev.unwrap_or(0);
                r.routes = Some(plan);
                r.stream = Some(stream);
            }
        }
        let resident = cache.resident_experts(0);
        let views = q.visible(window).filter_map(|i| {
            sims[i]
                .routes
                .as_ref()
                .map(|routes| q.all[i].view(i, routes))
        });
        let plan = batcher.schedule(now, views, &resident)?;
        if plan.is_empty() {
            // Nothing could be admitted (KV full with nothing running cannot happen: submit
            // rejects requests larger than the KV capacity), so only a future arrival helps.
            now = super::idle_until(now, q.next_arrival())?;
            continue;
        }
        q.admit(plan, &mut summary, metrics);
        let used = plan.experts;
        let tokens = plan.tokens;
        let chunks = plan.chunks.clone();

        // Belady's lookahead: queued demand for the steps after this one (see the module docs).
        if cfg.policy.reads_next_use() {
            demand.iter_mut().for_each(|d| *d = 0.0);
            for i in q.visible(window) {
                let r = &sims[i];
                if q.all[i].prefill() {
                    if let Some(routes) = &r.routes {
                        for t in 0..routes.len().min(64) {
                            demand[routes.route(t, 0).primary() as usize] += 1.0;
                        }
                    }
                } else if cfg.lookahead == Lookahead::Oracle {
                    if let Some(stream) = &r.stream {
                        demand[stream.clone().next_expert() as usize] += 1.0;
                    }
                } else {
                    let n = r.history.iter().sum::<u32>().max(1) as f64;
                    let k = r.kept as f64 / n;
                    for (e, &h) in r.history.iter().enumerate() {
                        demand[e] += (1.0 - k) * h as f64 / n;
                    }
                    demand[r.current as usize] += k;
                }
            }
            for (f, &d) in future.iter_mut().zip(&demand) {
                // More expected demand: a sooner use.
                *f = if d > 0.0 { 1 + (1e9 / d) as u64 } else { NEVER };
            }
        }

        // The step's timeline.
        let start = now;
        let per_expert_s = cfg.cost.expert_layer_s
            + cfg.cost.token_s * tokens as f64 / shape.layers as f64 / used.len().max(1) as f64;
        let (t, stall) = timeline.step(
            &mut cache,
            &used,
            &future,
            start,
            cfg.cost.dense_layer_s,
            per_expert_s,
            metrics,
        )?;
        let end = t;
        summary.step(used.len(), tokens, stall);
        if cfg.record_steps {
            step_experts.push(used);
            // Token by token, in the order the step runs them: the access stream of the paper's
            // Table 4, where every token asks for its expert.
            for c in &chunks {
                if let Some(routes) = &sims[c.seq as usize - 1].routes {
                    token_experts.extend((0..c.tokens).map(|t| routes.route(t, 0).primary()));
                }
            }
        }
        if let Some(m) = metrics {
            m.observe_batch(used.len(), tokens);
            m.add_stall(stall);
            m.record_cache(cache.stats(), cache.resident());
        }

        // Apply the step: tokens computed, tokens sampled, requests finished.
        for c in &chunks {
            let i = c.seq as usize - 1;
            let outcome = q.advance(i, c.tokens, end, &mut batcher, &mut summary);
            let r = &mut sims[i];
            let routes = r
                .routes
                .as_mut()
                .ok_or_else(|| Error::Internal(format!("request {i} scheduled without routes")))?;
            routes.drain_front(c.tokens);
            match outcome {
                Outcome::Partial => {}
                Outcome::Finished => {
                    r.routes = None;
                    r.stream = None;
                }
                Outcome::Sampled => {
                    let e = r.stream.as_mut().map(|s| s.next_expert()).ok_or_else(|| {
                        Error::Internal(format!("request {i} has no route stream"))
                    })?;
                    r.kept += (r.current == e) as u32;
                    r.current = e;
                    if let Some(h) = r.history.get_mut(e as usize) {
                        *h += 1;
                    }
                    routes.push(&[TokenRoute::single(e)])?;
                }
            }
        }
        q.retire();
        batcher.step_done(start, end);
        if let Some(m) = metrics {
            m.set_requests(batcher.waiting(), batcher.running());
        }
        now = end;
    }
    let stats = cache.stats();
    let mut report = summary.report(stats, batcher.max_waited(), started.elapsed().as_secs_f64());
    report.step_experts = step_experts;
    report.token_experts = token_experts;
    Ok(report)
}
