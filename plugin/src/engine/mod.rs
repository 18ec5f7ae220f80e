//! The engine: requests, routing, sampling and stepping a [`Backend`].
//!
//! The engine is device-agnostic. It owns every live sequence: its tokens, its router state (the
//! per-request router KV cache), its route history and its sampler. A scheduler (the lookahead
//! batcher, or [`Engine::schedule_all`] for simple use) decides which tokens run in each step; the
//! engine hands them to the backend, samples from the logits of every sequence whose known tokens are
//! all computed, routes the new token at once (so its experts are known a whole step ahead), and
//! retires finished sequences.

mod backend;
pub mod cpu;
mod device;
mod driver;
mod options;

use std::collections::BTreeMap;

use rayon::prelude::*;

pub use crate::cache::ExpertCapacity;
pub use crate::cuda::{CudaDtype, RouterPlacement};
pub use backend::{
    check_max_len, route_trace, speculation_config, Backend, ChunkRoutes, ForwardChunk, Lookahead,
    SeqId, StepRoutes,
};
pub use device::{open_engine, open_engine_with, Device};
pub use driver::{StepDriver, ViewOrder};
pub use options::{EngineOptions, EnvVar, ExpertCacheOptions, ExpertFfn, ENVIRONMENT};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::route::{RoutePlan, TokenRoute};
use crate::router::Router;
use crate::sampling::{Sampler, SamplingParams};

/// One generation request, in token ids.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids, used exactly as given.
    pub prompt: Vec<u32>,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Tokens to generate at most (>= 1).
    pub max_new_tokens: usize,
    /// Extra ids that end generation (the stop token is emitted).
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the model's EOS ids.
    pub ignore_eos: bool,
    /// Return every step's logits in the events (for `--dump-logits` and tests).
    pub keep_logits: bool,
}

impl GenerationRequest {
    /// A greedy request for `max_new_tokens` tokens after `prompt`.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        GenerationRequest {
            prompt,
            sampling: SamplingParams::greedy(),
            max_new_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            keep_logits: false,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an EOS id.
    Eos,
    /// It produced one of the request's stop ids.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

impl FinishReason {
    /// The name clients see (`stop` for EOS and stop ids, `length`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A token produced by a step.
#[derive(Debug, Clone)]
pub struct StepEvent {
    /// The sequence.
    pub seq: SeqId,
    /// The new token.
    pub token: u32,
    /// Its route (already computed by a pre-gate router, for the next step; with one route per
    /// layer, layer 0's). `None` for an in-model router, whose routes are made as layers run.
    pub route: Option<TokenRoute>,
    /// Set when the sequence finished with this token; it is then gone from the engine.
    pub finished: Option<FinishReason>,
    /// The logits the token was sampled from, when the request asked to keep them.
    pub logits: Option<Vec<f32>>,
}

/// What a step produced: a token for each sequence that advanced, and the sequences that failed.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// The new tokens, in schedule order.
    pub events: Vec<StepEvent>,
    /// Sequences whose own sampling or routing failed, with their errors; they are gone from the
    /// engine (KV space and router state freed).
    pub failed: Vec<(SeqId, Error)>,
    /// The routes the model's own gates made for every chunk of the step, when tracing is on
    /// ([`Engine::trace_routes`]); empty otherwise.
    pub routes: Vec<ChunkRoutes>,
}

impl StepOutput {
    /// The events, or the first sequence's error when any failed: for callers that treat a
    /// failed sequence as a failed run.
    pub fn into_events(self) -> Result<Vec<StepEvent>> {
        match self.failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(self.events),
        }
    }
}

/// A sequence's tokens not yet computed, as a scheduler sees them.
#[derive(Debug, Clone, Copy)]
pub struct PendingWork<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// Uncomputed tokens, in order (the rest of the prompt, or the last sampled token).
    pub tokens: &'a [u32],
    /// The route plan holding their routes, starting at `route_offset`.
    pub routes: &'a RoutePlan,
    /// Index in `routes` of `tokens[0]`.
    pub route_offset: usize,
    /// Whether the sequence is still in its prompt (prefill) phase.
    pub prefill: bool,
    /// Tokens generated so far.
    pub generated: usize,
}

struct Sequence {
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    routes: RoutePlan,
    sampler: Sampler,
    request: GenerationRequest,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The values of `entries` (a map's `iter_mut`) whose ids are in `ids`, mutably, in the order of
/// `ids`: a step samples and routes its sequences together. Ids missing from `entries` are
/// skipped, so a caller that needs all of them compares the lengths.
pub(crate) fn in_order<'a, T: 'a>(
    entries: impl Iterator<Item = (&'a SeqId, &'a mut T)>,
    ids: &[SeqId],
) -> Vec<&'a mut T> {
    let order: BTreeMap<SeqId, usize> = ids.iter().enumerate().map(|(i, &s)| (s, i)).collect();
    let mut v: Vec<(usize, &'a mut T)> = entries
        .filter_map(|(seq, s)| order.get(seq).map(|&i| (i, s)))
        .collect();
    v.sort_unstable_by_key(|&(i, _)| i);
    v.into_iter().map(|(_, t)| t).collect()
}

/// Drives a backend: the step interface a continuous-batching scheduler uses.
pub struct Engine {
    backend: Box<dyn Backend>,
    router: Box<dyn Router>,
    eos: Vec<u32>,
    seqs: BTreeMap<SeqId, Sequence>,
    next_id: SeqId,
    host: HostSeconds,
}

/// Wall time the engine spent between a step's forward pass and the next one, cumulative: work
/// the device waits for, so operators can see when the host becomes the bottleneck.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostSeconds {
    /// Sampling the new tokens from their logits.
    pub sampling: f64,
    /// Routing the new tokens (the router's pass, on the host or the device).
    pub routing: f64,
}

impl Engine {
    /// An engine over `backend`, routing with `router`.
    pub fn new(backend: Box<dyn Backend>, router: Box<dyn Router>) -> Self {
        let eos = backend.config().eos_token_ids();
        Engine {
            backend,
            router,
            eos,
            seqs: BTreeMap::new(),
            next_id: 1,
            host: HostSeconds::default(),
        }
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        self.backend.config()
    }

    /// The backend's device name.
    pub fn device_name(&self) -> String {
        self.backend.device_name()
    }

    /// The router.
    pub fn router(&self) -> &dyn Router {
        self.router.as_ref()
    }

    /// Records the routes an in-model router's gates make in every step (every layer's experts
    /// of every computed token) in [`StepOutput::routes`]: a debugging and parity aid. An error
    /// when the backend makes no in-model routes.
    pub fn trace_routes(&mut self, on: bool) -> Result<()> {
        self.backend.trace_routes(on)
    }

    /// Checks a request against the model without admitting it.
    pub fn validate(&self, req: &GenerationRequest) -> Result<()> {
        let cfg = self.backend.config();
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = req
            .prompt
            .iter()
            .chain(&req.stop_token_ids)
            .find(|&&t| t as usize >= cfg.vocab_size)
        {
            return Err(Error::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (0..{})",
                cfg.vocab_size
            )));
        }
        if req.max_new_tokens == 0 {
            return Err(Error::InvalidRequest(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        let ctx = cfg.max_context();
        // Saturating: a max_new_tokens near usize::MAX must not wrap around below the context.
        if req.prompt.len().saturating_add(req.max_new_tokens) > ctx {
            return Err(Error::InvalidRequest(format!(
                "prompt of {} tokens plus max_new_tokens {} exceeds the context of {ctx} tokens",
                req.prompt.len(),
                req.max_new_tokens
            )));
        }
        req.sampling.validate()
    }

    /// Admits a request: routes its whole prompt and reserves its KV space.
    pub fn add_request(&mut self, req: GenerationRequest) -> Result<SeqId> {
        self.validate(&req)?;
        let id = self.next_id;
        let max_len = req.prompt.len() + req.max_new_tokens;
        self.backend.add_sequence(id, max_len)?;
        let mut routes = self.router.new_plan();
        let routed = self.router.open(id, max_len).and_then(|()| {
            let rows = routes.scope().rows();
            for list in self.router.route(&[id], &[&req.prompt])? {
                for token in list.chunks(rows) {
                    routes.push(token)?;
                }
            }
            Ok(())
        });
        if let Err(e) = routed {
            self.router.close(id);
            self.backend.remove_sequence(id);
            return Err(e);
        }
        self.next_id += 1;
        let sampler = Sampler::new(req.sampling.clone(), id);
        self.seqs.insert(
            id,
            Sequence {
                tokens: req.prompt.clone(),
                prompt_len: req.prompt.len(),
                computed: 0,
                routes,
                sampler,
                request: req,
            },
        );
        Ok(id)
    }

    /// Drops a sequence (cancellation); its KV space is freed. Returns whether it existed.
    pub fn remove(&mut self, seq: SeqId) -> bool {
        let existed = self.seqs.remove(&seq).is_some();
        if existed {
            self.backend.remove_sequence(seq);
            self.router.close(seq);
        }
        existed
    }

    /// Live sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether no sequence is live.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The routes of every token a live sequence has seen so far (prompt and generated).
    pub fn routes(&self, seq: SeqId) -> Option<&RoutePlan> {
        self.seqs.get(&seq).map(|s| &s.routes)
    }

    /// The uncomputed tokens of every live sequence, in admission order.
    pub fn pending(&self) -> impl Iterator<Item = PendingWork<'_>> {
        self.seqs.iter().map(|(&seq, s)| PendingWork {
            seq,
            tokens: &s.tokens[s.computed..],
            routes: &s.routes,
            route_offset: s.computed,
            prefill: s.computed < s.prompt_len,
            generated: s.generated(),
        })
    }

    /// Every live sequence with all its pending tokens: a schedule without a batcher.
    pub fn schedule_all(&self) -> Vec<(SeqId, usize)> {
        self.pending().map(|p| (p.seq, p.tokens.len())).collect()
    }

    /// Passes the scheduler's view of upcoming steps to the backend.
    pub fn prepare(&mut self, lookahead: &Lookahead) -> Result<()> {
        self.backend.prepare(lookahead)
    }

    /// The backend's expert cache, when it has one (residency and counters; see
    /// [`Backend::expert_cache`]).
    pub fn expert_cache(&self) -> Option<&crate::cache::ExpertCache> {
        self.backend.expert_cache()
    }

    /// The backend's speculative-prefetch counters, when it speculates.
    pub fn speculation_stats(&self) -> Option<crate::moe::SpeculationStats> {
        self.backend.speculation_stats()
    }

    /// Seconds the backend's compute has waited for expert loads so far.
    pub fn expert_stall_seconds(&self) -> f64 {
        self.backend.expert_stall_seconds()
    }

    /// Host time spent sampling and routing decoded tokens so far.
    pub fn host_seconds(&self) -> HostSeconds {
        self.host
    }

    /// Samples each row's token with its sequence's sampler, the sequences in parallel: a sampled
    /// (non-greedy) token over a 32000-entry vocabulary costs the host a few hundred microseconds,
    /// which for a large batch would otherwise add up between two device steps. Each sampler has
    /// its own random stream, so the result does not depend on the threads. A row that cannot be
    /// sampled (NaN or empty logits) fails only its own sequence.
    fn sample_rows(&mut self, rows: Vec<(SeqId, Vec<f32>)>) -> Vec<(SeqId, Result<u32>, Vec<f32>)> {
        let ids: Vec<SeqId> = rows.iter().map(|(seq, _)| *seq).collect();
        let tokens: Vec<Result<u32>> = in_order(self.seqs.iter_mut(), &ids)
            .into_iter()
            .map(|s| &mut s.sampler)
            .collect::<Vec<_>>()
            .into_par_iter()
            .zip(rows.par_iter())
            .map(|(sampler, (_, row))| sampler.sample(row))
            .collect();
        rows.into_iter()
            .zip(tokens)
            .map(|((seq, row), t)| (seq, t, row))
            .collect()
    }

    /// Routes each sampled token (one per sequence), wherever the router runs: one row of routes
    /// per token (one route, or one per layer), or the error of that sequence's routing. All
    /// tokens go in one pass; only when that pass fails is each sequence routed alone, to tell
    /// the sequence at fault from the others (a failed pass advances no router state).
    fn route_sampled(
        &mut self,
        sampled: &[(SeqId, u32, Vec<f32>)],
    ) -> Vec<Result<Vec<TokenRoute>>> {
        let tokens: Vec<[u32; 1]> = sampled.iter().map(|&(_, t, _)| [t]).collect();
        let lists: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
        let ids: Vec<SeqId> = sampled.iter().map(|&(seq, ..)| seq).collect();
        let checked = |routes: Vec<Vec<TokenRoute>>, n: usize| {
            if routes.len() == n {
                Ok(routes)
            } else {
                Err(Error::Internal(format!(
                    "the router returned {} route lists for {n} sequences",
                    routes.len()
                )))
            }
        };
        if ids.is_empty() {
            return Vec::new();
        }
        match self
            .router
            .route(&ids, &lists)
            .and_then(|r| checked(r, ids.len()))
        {
            Ok(routes) => routes.into_iter().map(Ok).collect(),
            Err(_) if ids.len() > 1 => ids
                .iter()
                .zip(&lists)
                .map(|(&seq, &list)| {
                    self.router
                        .route(&[seq], &[list])
                        .and_then(|r| checked(r, 1))
                        .map(|mut r| r.remove(0))
                })
                .collect(),
            Err(e) => vec![Err(e)],
        }
    }

    /// Runs one step: for each `(seq, n)` computes the next `n` pending tokens of `seq`; samples a
    /// token for every sequence whose pending tokens are then all computed. Sequences may appear at
    /// most once. On error (a bad schedule, the backend's forward pass) no sequence has advanced
    /// past its KV cache. A sequence whose own sampling or routing fails (NaN logits give
    /// [`Error::ModelData`]) is listed in [`StepOutput::failed`] and removed from the engine; the
    /// other sequences of the step go on.
    pub fn step(&mut self, schedule: &[(SeqId, usize)]) -> Result<StepOutput> {
        for (i, &(seq, n)) in schedule.iter().enumerate() {
            let s = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?;
            let pending = s.tokens.len() - s.computed;
            if n == 0 || n > pending {
                return Err(Error::InvalidArgument(format!(
                    "sequence {seq}: scheduled {n} tokens of {pending} pending"
                )));
            }
            if schedule[..i].iter().any(|&(other, _)| other == seq) {
                return Err(Error::InvalidArgument(format!(
                    "sequence {seq} is scheduled twice in one step"
                )));
            }
        }
        if schedule.is_empty() {
            return Ok(StepOutput::default());
        }
        let logits = {
            let chunks: Vec<ForwardChunk<'_>> = schedule
                .iter()
                .map(|&(seq, n)| {
                    let s = &self.seqs[&seq];
                    let end = s.computed + n;
                    ForwardChunk {
                        seq,
                        tokens: &s.tokens[s.computed..end],
                        start_pos: s.computed,
                        routes: &s.routes,
                        route_offset: s.computed,
                        want_logits: end == s.tokens.len(),
                    }
                })
                .collect();
            self.backend.forward(&chunks)?
        };
        let traced = self.backend.take_route_trace();
        let mut logits = logits.into_iter();
        // Sample every sequence that completed, then route all the new tokens in one pass: the
        // router's weights are read once per step instead of once per sequence, and the next step
        // cannot launch before its routes are known.
        let mut rows: Vec<(SeqId, Vec<f32>)> = Vec::new();
        for &(seq, n) in schedule {
            let s = self.seqs.get_mut(&seq).expect("validated above");
            s.computed += n;
            if s.computed < s.tokens.len() {
                continue;
            }
            let row = logits
                .next()
                .ok_or_else(|| Error::Internal("backend returned too few logits".into()))?;
            rows.push((seq, row));
        }
        let t0 = std::time::Instant::now();
        let mut failed: Vec<(SeqId, Error)> = Vec::new();
        let mut sampled: Vec<(SeqId, u32, Vec<f32>)> = Vec::new();
        for (seq, token, row) in self.sample_rows(rows) {
            match token {
                Ok(t) => sampled.push((seq, t, row)),
                Err(e) => failed.push((seq, e)),
            }
        }
        let t1 = std::time::Instant::now();
        let routes = self.route_sampled(&sampled);
        self.host.sampling += (t1 - t0).as_secs_f64();
        self.host.routing += t1.elapsed().as_secs_f64();
        let mut events = Vec::new();
        for ((seq, token, row), rows) in sampled.into_iter().zip(routes) {
            let s = self.seqs.get_mut(&seq).expect("validated above");
            let rows = match rows.and_then(|rows| {
                if !rows.is_empty() {
                    s.routes.push(&rows)?;
                }
                Ok(rows)
            }) {
                Ok(rows) => rows,
                Err(e) => {
                    failed.push((seq, e));
                    continue;
                }
            };
            let route = rows.first().copied();
            s.tokens.push(token);
            let finished = if !s.request.ignore_eos && self.eos.contains(&token) {
                Some(FinishReason::Eos)
            } else if s.request.stop_token_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.request.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            let keep = s.request.keep_logits;
            events.push(StepEvent {
                seq,
                token,
                route,
                finished,
                logits: keep.then_some(row),
            });
        }
        for e in &events {
            if e.finished.is_some() {
                self.remove(e.seq);
            }
        }
        // A failed sequence cannot go on (its KV holds tokens it has no next token for).
        for (seq, _) in &failed {
            self.remove(*seq);
        }
        Ok(StepOutput {
            events,
            failed,
            routes: traced,
        })
    }
}
