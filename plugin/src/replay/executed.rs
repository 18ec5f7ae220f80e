//! Executed replay: the workload through the real step loop of the CPU engine.
//!
//! Routes come from the model's own router (the engine routes every prompt at admission and every
//! sampled token at once). Each request is added to the engine when it arrives; the engine's step
//! loop ([`StepDriver`]) runs exactly as in the server: the batcher decides every step from
//! [`Engine::pending`](crate::engine::Engine::pending), the backend's expert cache is prepared with
//! the lookahead (Belady's next uses) and accounts every layer's expert use through the expert
//! runtime. Time is virtual: arrivals are on the workload's clock, and each step advances it by
//! the step's measured wall time plus the load time of the step's cache misses (the CPU runtime
//! loads on demand: every miss is a load the step waits for, at the cost model's link rate).
//!
//! Prompts given as lengths are made of seeded random ids. A request longer than the model's
//! context is shortened: its prompt first (to at least one token), then its output. Generation
//! ignores EOS, so every request produces exactly its output length.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::report::Summary;
use super::{CostModel, Prompt, Report, TraceRequest};
use crate::batcher::{BatcherConfig, LookaheadBatcher, RequestDesc};
use crate::cache::{EvictionPolicy, ExpertCapacity};
use crate::engine::{
    open_engine_with, Device, EngineOptions, ExpertCacheOptions, GenerationRequest, SeqId,
    StepDriver, ViewOrder,
};
use crate::error::{Error, Result};
use crate::metrics::ModelMetrics;
use crate::model::ModelDir;

/// Settings of an executed replay.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// The batcher.
    pub batcher: BatcherConfig,
    /// Cache capacity, experts per layer.
    pub per_layer: usize,
    /// Eviction policy.
    pub policy: EvictionPolicy,
    /// Load costs (the CPU engine holds every expert; loads are accounted, not performed).
    pub cost: CostModel,
    /// Seed of made-up prompt ids and the random policy.
    pub seed: u64,
    /// Overrides the bytes of one expert-layer.
    pub expert_bytes: Option<u64>,
}

struct Live {
    arrival: f64,
    prompt: usize,
    output: usize,
    first_token: f64,
}

/// Replays `reqs` on the CPU engine with the model in `dir`.
pub fn run(
    dir: &Path,
    reqs: &[TraceRequest],
    cfg: &ExecConfig,
    metrics: Option<&ModelMetrics>,
) -> Result<Report> {
    let started = Instant::now();
    let model = ModelDir::open(dir)?;
    let mut shape = super::model_shape(dir)?;
    if let Some(b) = cfg.expert_bytes {
        shape.expert_bytes = b;
    }
    super::check_capacity(cfg.per_layer, shape.experts, model.config.router_top_k)?;
    let vocab = model.config.vocab_size as u32;
    let ctx = model.config.max_context();
    let opts = EngineOptions {
        expert_cache: Some(ExpertCacheOptions {
            capacity: ExpertCapacity::PerLayer(cfg.per_layer),
            policy: cfg.policy,
        }),
        ..EngineOptions::default()
    };
    let mut engine = open_engine_with(&model, Device::Cpu, &opts)?;
    let batcher = LookaheadBatcher::new(cfg.batcher.clone())?;
    let mut driver = StepDriver::new(batcher, LOOKAHEAD_STEPS, ViewOrder::AdmittedFirst);
    let load_s = cfg.cost.load_seconds(shape.expert_bytes);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut summary = Summary::new(shape.experts);
    let mut live: HashMap<SeqId, Live> = HashMap::new();
    let mut next = 0usize;
    let mut now = 0.0f64;

    loop {
        while next < reqs.len() && reqs[next].arrival <= now {
            let r = &reqs[next];
            next += 1;
            let output = r.output_len.min(ctx.saturating_sub(1)).max(1);
            let prompt_len = r.prompt.len().min(ctx.saturating_sub(output)).max(1);
            let prompt: Vec<u32> = match &r.prompt {
                Prompt::Tokens(t) => t[..prompt_len.min(t.len())].to_vec(),
                Prompt::Len(_) => (0..prompt_len)
                    .map(|_| rng.random_range(0..vocab))
                    .collect(),
            };
            let mut g = GenerationRequest::greedy(prompt, output);
            g.ignore_eos = true;
            let seq = engine.add_request(g)?;
            driver.submit(RequestDesc {
                id: seq,
                arrival: r.arrival,
                prompt_len,
                output_len: Some(output),
                deadline: r.deadline_s.map(|d| r.arrival + d),
                kv_bytes: (prompt_len + output) as u64 * shape.kv_bytes_per_token,
            })?;
            live.insert(
                seq,
                Live {
                    arrival: r.arrival,
                    prompt: prompt_len,
                    output,
                    first_token: f64::NAN,
                },
            );
        }
        if live.is_empty() {
            match reqs.get(next) {
                Some(r) => {
                    now = now.max(r.arrival);
                    continue;
                }
                None => break,
            }
        }
        let plan = driver.schedule(&engine, now)?;
        if plan.is_empty() {
            now = super::idle_until(now, reqs.get(next).map(|r| r.arrival))?;
            continue;
        }
        for c in &plan.chunks {
            summary.queue_wait(c.waited);
            if let Some(m) = metrics {
                m.observe_queue_wait(c.waited);
            }
        }
        let misses = cache_misses(&engine);
        let t0 = Instant::now();
        let events = driver.run(&mut engine, &plan)?.into_events()?;
        let compute = t0.elapsed().as_secs_f64();
        let stall = (cache_misses(&engine) - misses) as f64 * load_s;
        let end = now + compute + stall;
        summary.step(plan.experts.len(), plan.tokens, stall);
        if let Some(m) = metrics {
            m.observe_batch(plan.experts.len(), plan.tokens);
            m.add_stall(stall);
            if let Some(c) = engine.expert_cache() {
                m.record_cache(c.stats(), c.resident());
            }
            if let Some(s) = engine.speculation_stats() {
                m.record_speculation(s);
            }
        }
        for e in events {
            let Some(l) = live.get_mut(&e.seq) else {
                continue;
            };
            if l.first_token.is_nan() {
                l.first_token = end;
            }
            if e.finished.is_some() {
                if let Some(l) = live.remove(&e.seq) {
                    summary.finish(l.arrival, l.first_token, end, l.prompt, l.output);
                }
                driver.finish(e.seq);
            }
        }
        driver.step_done(now, end);
        if let Some(m) = metrics {
            m.set_requests(driver.batcher().waiting(), driver.batcher().running());
        }
        now = end;
    }
    let stats = engine
        .expert_cache()
        .map(|c| c.stats())
        .ok_or_else(|| Error::Internal("the replay's engine has no expert cache".into()))?;
    Ok(summary.report(
        stats,
        driver.batcher().max_waited(),
        started.elapsed().as_secs_f64(),
    ))
}

/// Steps after the one about to run that prepare the cache (as the server's default).
const LOOKAHEAD_STEPS: usize = 4;

/// Misses of the engine's expert cache so far.
fn cache_misses(engine: &crate::engine::Engine) -> u64 {
    engine.expert_cache().map_or(0, |c| c.stats().misses)
}
