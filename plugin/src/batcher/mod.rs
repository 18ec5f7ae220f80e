//! The lookahead batcher: continuous, iteration-level batching that knows every queued token's
//! experts before the step runs.
//!
//! The batcher is device-agnostic. It keeps a small descriptor per request ([`RequestDesc`]: arrival,
//! prompt length, output length if known, deadline, KV bytes) and, at each step, reads the pending
//! tokens of every live request as [`PendingView`]s (uncomputed tokens and the [`RoutePlan`] that
//! holds their routes, exactly what [`Engine::pending`](crate::engine::Engine::pending) yields, or
//! what the simulator keeps). Its output, [`StepPlan::entries`], is a schedule `(seq, n)`: compute
//! the next `n` pending tokens of `seq`, which is what [`Engine::step`](crate::engine::Engine::step)
//! takes. Because it only ever hands out a prefix of each request's pending tokens, and each request
//! at most once per step, every token is scheduled exactly once and in order.
//!
//! # Guards (around every policy)
//! 1. **Token budget**: at most `max_batch_tokens` tokens per step.
//! 2. **Chunked prefill**: at most `max_prefill_chunk` prompt tokens of one request per step.
//! 3. **Maximum wait**: a request whose wait would pass `max_wait` by the next step (the next step
//!    is expected `est_step` after this one: the longest of the last 64 steps) is *due* and is
//!    scheduled first, oldest first: one token each, then extended with what budget remains. With
//!    `max_running <= max_batch_tokens` and steps no longer than the recent ones, no admitted
//!    request waits past the maximum; a request not yet admitted can still wait for KV memory
//!    (the serving loop bounds that wait with `ServeConfig::max_queue_wait`).
//! 4. **Deadlines** (optional, per request: the time it should be finished): a request whose
//!    remaining steps at the current pace would end past its deadline is due as well (after the
//!    max-wait ones, earliest deadline first).
//! 5. **KV admission**: a request is admitted (its `kv_bytes` reserved) when first scheduled, in
//!    arrival order only, while the reserved total stays within `kv_capacity_bytes` and at most
//!    `max_running` requests are admitted; a waiting request that does not fit blocks the ones
//!    behind it, so large requests are not starved by small ones.
//! 6. **Expert-load budget**: a step may use at most `max_expert_loads` experts that are not
//!    resident in the expert cache (the caller passes the resident set): more loads than a step can
//!    hide behind its compute would stall it. Due requests override this budget (no starvation), and
//!    so does the first request of a step that would otherwise be empty (progress).
//!
//! # Policies
//! - `fcfs`: requests in arrival order.
//! - `decode-first`: decode tokens first, then prefill chunks (DeepSpeed-FastGen).
//! - `prefill-first`: prefill chunks first, then decode tokens (vLLM's default).
//! - `expert-aware`: the paper's Algorithm 1, corrected (readme-system.md §3): tokens sit in
//!   per-expert queues; repeatedly take the expert whose queue is longest, until the budget is met
//!   or every queue is empty, and split the last one to fill the budget exactly.
//!
//! # What "expert-aware" means with chunked prefill and mixed decode tokens
//! A decode token is one token with known experts. A prompt is a run of tokens that must be
//! computed in order, and its tokens usually span several experts. The batcher therefore selects a
//! set `A` of experts and schedules, for every request, the longest prefix of its pending tokens
//! (within the chunk cap) whose experts all lie in `A`. The "queue" of an expert `e` is what adding
//! `e` to `A` unlocks: for a decode token routed to `e`, the token; for a prompt whose next token
//! outside `A` is routed to `e`, the tokens up to its next token needing another expert outside
//! `A ∪ {e}`. With top-1 decode tokens only, this is exactly the paper's queue length. Greedy: add
//! the expert with the largest queue (ties: resident experts first, then the lowest id) until the
//! budget is reached or nothing more can be unlocked; then fill the budget oldest request first,
//! splitting the last prefix. A prompt therefore advances by expert-homogeneous runs when decode
//! traffic is heavy, and the maximum-wait guard bounds how long it can be held back. For per-layer
//! routes a token's experts are the union over layers (conservative).

mod select;

use std::collections::HashMap;
use std::str::FromStr;

use crate::engine::SeqId;
use crate::error::{Error, Result};
use crate::route::{ExpertSet, RoutePlan};

/// Which tokens a step takes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchPolicy {
    /// First come, first served (by arrival).
    Fcfs,
    /// Decode tokens before prefill chunks.
    DecodeFirst,
    /// Prefill chunks before decode tokens.
    PrefillFirst,
    /// Fewest distinct experts per step (Algorithm 1, corrected).
    ExpertAware,
}

impl BatchPolicy {
    /// Every policy, in the order reports list them.
    pub const ALL: [BatchPolicy; 4] = [
        BatchPolicy::Fcfs,
        BatchPolicy::DecodeFirst,
        BatchPolicy::PrefillFirst,
        BatchPolicy::ExpertAware,
    ];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchPolicy::Fcfs => "fcfs",
            BatchPolicy::DecodeFirst => "decode-first",
            BatchPolicy::PrefillFirst => "prefill-first",
            BatchPolicy::ExpertAware => "expert-aware",
        }
    }
}

impl FromStr for BatchPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fcfs" => Ok(BatchPolicy::Fcfs),
            "decode-first" => Ok(BatchPolicy::DecodeFirst),
            "prefill-first" => Ok(BatchPolicy::PrefillFirst),
            "expert-aware" => Ok(BatchPolicy::ExpertAware),
            other => Err(Error::InvalidArgument(format!(
                "unknown batching policy `{other}` (expected fcfs, decode-first, prefill-first or \
                 expert-aware)"
            ))),
        }
    }
}

impl std::fmt::Display for BatchPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The batcher's policy and guards.
#[derive(Debug, Clone, PartialEq)]
pub struct BatcherConfig {
    /// Ordering policy.
    pub policy: BatchPolicy,
    /// Most tokens per step.
    pub max_batch_tokens: usize,
    /// Most prompt tokens of one request per step.
    pub max_prefill_chunk: usize,
    /// Most requests admitted (holding KV) at once.
    pub max_running: usize,
    /// Longest a request may wait between its steps, in seconds (`None`: no guard).
    pub max_wait: Option<f64>,
    /// KV memory available to admitted requests, in bytes (`None`: unlimited).
    pub kv_capacity_bytes: Option<u64>,
    /// Most non-resident experts one step may use (`None`: unlimited).
    pub max_expert_loads: Option<usize>,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            policy: BatchPolicy::DecodeFirst,
            max_batch_tokens: 512,
            max_prefill_chunk: 512,
            max_running: 256,
            max_wait: None,
            kv_capacity_bytes: None,
            max_expert_loads: None,
        }
    }
}

impl BatcherConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.max_batch_tokens == 0 {
            return bad("max_batch_tokens must be at least 1".into());
        }
        if self.max_prefill_chunk == 0 {
            return bad("max_prefill_chunk must be at least 1".into());
        }
        if self.max_running == 0 {
            return bad("max_running must be at least 1".into());
        }
        if let Some(w) = self.max_wait {
            if !(w.is_finite() && w > 0.0) {
                return bad(format!("max_wait {w} s must be positive"));
            }
        }
        Ok(())
    }
}

/// What the batcher knows of a request when it arrives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestDesc {
    /// The sequence id the engine (or simulator) uses for it.
    pub id: SeqId,
    /// Arrival time, seconds on the caller's clock.
    pub arrival: f64,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Tokens it will generate, when known (traces); `None` for live traffic.
    pub output_len: Option<usize>,
    /// Time by which it should be finished, if it has a deadline.
    pub deadline: Option<f64>,
    /// KV bytes to reserve at admission (prompt plus maximum output).
    pub kv_bytes: u64,
}

/// One live request's uncomputed tokens, as the batcher reads them each step.
#[derive(Debug, Clone, Copy)]
pub struct PendingView<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// Number of uncomputed tokens (the rest of the prompt, or the last sampled token).
    pub tokens: usize,
    /// The plan holding their routes.
    pub routes: &'a RoutePlan,
    /// Index in `routes` of the first uncomputed token.
    pub route_offset: usize,
    /// Whether the request is still in its prompt.
    pub prefill: bool,
    /// Tokens generated so far.
    pub generated: usize,
}

impl<'a> From<crate::engine::PendingWork<'a>> for PendingView<'a> {
    fn from(p: crate::engine::PendingWork<'a>) -> Self {
        PendingView {
            seq: p.seq,
            tokens: p.tokens.len(),
            routes: p.routes,
            route_offset: p.route_offset,
            prefill: p.prefill,
            generated: p.generated,
        }
    }
}

/// Why a request was scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Chosen by the policy.
    Policy,
    /// Due by the maximum-wait guard.
    MaxWait,
    /// Due by its deadline.
    Deadline,
    /// Taken so that a step is not empty despite the expert-load budget.
    Progress,
}

/// One scheduled chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scheduled {
    /// The sequence.
    pub seq: SeqId,
    /// How many of its pending tokens to compute.
    pub tokens: usize,
    /// Whether they are prompt tokens.
    pub prefill: bool,
    /// Why it was chosen.
    pub reason: Reason,
    /// Seconds it had waited since it last ran (or arrived).
    pub waited: f64,
}

/// The batcher's decision for one step.
#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    /// The chunks, in the order chosen.
    pub chunks: Vec<Scheduled>,
    /// The distinct experts the step uses (union over layers).
    pub experts: ExpertSet,
    /// Tokens scheduled.
    pub tokens: usize,
    /// Requests admitted by this step.
    pub admitted: Vec<SeqId>,
    /// Non-resident experts the step uses.
    pub loads: usize,
}

impl StepPlan {
    /// The schedule in [`Engine::step`](crate::engine::Engine::step)'s form.
    pub fn entries(&self) -> Vec<(SeqId, usize)> {
        self.chunks.iter().map(|c| (c.seq, c.tokens)).collect()
    }

    /// Whether nothing was scheduled.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

#[derive(Debug, Clone)]
struct ReqState {
    desc: RequestDesc,
    admitted: bool,
    ready_since: f64,
}

/// Steps remembered by [`StepClock`].
const CLOCK_WINDOW: usize = 64;

/// Recent step durations, for the "would it be late by the next step" test. The longest of the
/// last 64 is the estimate: a step longer than all of them (a burst of loads) can still make a
/// request late, by at most the difference.
#[derive(Debug, Clone)]
struct StepClock {
    recent: [f64; CLOCK_WINDOW],
    next: usize,
}

impl Default for StepClock {
    fn default() -> Self {
        StepClock {
            recent: [0.0; CLOCK_WINDOW],
            next: 0,
        }
    }
}

impl StepClock {
    fn push(&mut self, d: f64) {
        self.recent[self.next % CLOCK_WINDOW] = d.max(0.0);
        self.next += 1;
    }
    fn estimate(&self) -> f64 {
        self.recent.iter().copied().fold(0.0, f64::max)
    }
}

/// The lookahead batcher; see the module documentation.
#[derive(Debug, Clone)]
pub struct LookaheadBatcher {
    cfg: BatcherConfig,
    reqs: HashMap<SeqId, ReqState>,
    running: usize,
    kv_used: u64,
    clock: StepClock,
    last: StepPlan,
    max_waited: f64,
    scratch: select::Scratch,
}

impl LookaheadBatcher {
    /// A batcher with `cfg` (validated).
    pub fn new(cfg: BatcherConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(LookaheadBatcher {
            cfg,
            reqs: HashMap::new(),
            running: 0,
            kv_used: 0,
            clock: StepClock::default(),
            last: StepPlan::default(),
            max_waited: 0.0,
            scratch: select::Scratch::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BatcherConfig {
        &self.cfg
    }

    /// Registers an arrived request (waiting for admission).
    pub fn submit(&mut self, desc: RequestDesc) -> Result<()> {
        if desc.prompt_len == 0 {
            return Err(Error::InvalidRequest(format!(
                "request {} has an empty prompt",
                desc.id
            )));
        }
        if !desc.arrival.is_finite() {
            return Err(Error::InvalidRequest(format!(
                "request {} has arrival time {}",
                desc.id, desc.arrival
            )));
        }
        if let Some(cap) = self.cfg.kv_capacity_bytes {
            if desc.kv_bytes > cap {
                return Err(Error::Capacity(format!(
                    "request {} needs {} KV bytes; the KV capacity is {cap}",
                    desc.id, desc.kv_bytes
                )));
            }
        }
        if self.reqs.contains_key(&desc.id) {
            return Err(Error::InvalidRequest(format!(
                "request {} was submitted twice",
                desc.id
            )));
        }
        self.reqs.insert(
            desc.id,
            ReqState {
                desc,
                admitted: false,
                ready_since: desc.arrival,
            },
        );
        Ok(())
    }

    /// Forgets a finished (or cancelled) request and frees its KV reservation.
    pub fn finish(&mut self, seq: SeqId) {
        if let Some(r) = self.reqs.remove(&seq) {
            if r.admitted {
                self.running -= 1;
                self.kv_used -= r.desc.kv_bytes;
            }
        }
    }

    /// Requests submitted and not yet admitted.
    pub fn waiting(&self) -> usize {
        self.reqs.len() - self.running
    }

    /// Whether `seq` was submitted and is not admitted yet: a host bounding admission waits
    /// (the serving loop's `max_queue_wait`) must not fail a request that already holds its slot.
    pub fn is_waiting(&self, seq: SeqId) -> bool {
        self.reqs.get(&seq).is_some_and(|r| !r.admitted)
    }

    /// Requests admitted (holding KV) and not finished.
    pub fn running(&self) -> usize {
        self.running
    }

    /// KV bytes reserved by admitted requests.
    pub fn kv_used(&self) -> u64 {
        self.kv_used
    }

    /// The longest wait of any scheduled chunk so far, in seconds.
    pub fn max_waited(&self) -> f64 {
        self.max_waited
    }

    /// The expected duration of the next step (the longest of the last 64).
    pub fn step_estimate(&self) -> f64 {
        self.clock.estimate()
    }

    /// Decides the step starting at `now`.
    ///
    /// `pending` lists the live requests' uncomputed tokens: admitted requests first (any order),
    /// then waiting requests in arrival order; the batcher stops reading once admission closes, so a
    /// long waiting queue costs nothing. `resident` holds the experts resident in the expert cache
    /// (for the expert-load budget and tie-breaking). Requests unknown to the batcher are errors.
    pub fn schedule<'a, I>(
        &mut self,
        now: f64,
        pending: I,
        resident: &ExpertSet,
    ) -> Result<&StepPlan>
    where
        I: IntoIterator<Item = PendingView<'a>>,
    {
        self.last = StepPlan::default();
        let est = self.clock.estimate();
        self.scratch.clear();
        let mut kv_free = self
            .cfg
            .kv_capacity_bytes
            .map(|c| c.saturating_sub(self.kv_used));
        let mut slots_free = self.cfg.max_running.saturating_sub(self.running);
        for view in pending {
            if view.tokens == 0 {
                continue;
            }
            let r = self
                .reqs
                .get(&view.seq)
                .ok_or(Error::UnknownSequence(view.seq))?;
            if !r.admitted {
                // Admission in arrival order: the first that does not fit closes it.
                let fits = slots_free > 0 && kv_free.is_none_or(|f| f >= r.desc.kv_bytes);
                if !fits {
                    break;
                }
                slots_free -= 1;
                if let Some(f) = kv_free.as_mut() {
                    *f -= r.desc.kv_bytes;
                }
            }
            let cap = if view.prefill {
                view.tokens.min(self.cfg.max_prefill_chunk)
            } else {
                view.tokens
            }
            .min(self.cfg.max_batch_tokens);
            let waited = now - r.ready_since;
            let due_wait = self
                .cfg
                .max_wait
                .is_some_and(|w| r.ready_since + w <= now + est);
            let due_deadline = r.desc.deadline.is_some_and(|d| {
                let prompt_steps = if view.prefill {
                    view.tokens.div_ceil(self.cfg.max_prefill_chunk)
                } else {
                    0
                };
                let decode_steps = r
                    .desc
                    .output_len
                    .map_or(1, |o| o.saturating_sub(view.generated).max(1));
                now + est * (prompt_steps + decode_steps) as f64 >= d
            });
            let urgency = if due_wait {
                select::Urgency::MaxWait(r.ready_since)
            } else if due_deadline {
                select::Urgency::Deadline(r.desc.deadline.unwrap_or(f64::INFINITY))
            } else {
                select::Urgency::None
            };
            self.scratch
                .push(&view, cap, r.desc.arrival, r.ready_since, waited, urgency)?;
        }
        select::select(&self.cfg, &mut self.scratch, resident, &mut self.last);
        for c in &self.last.chunks {
            self.max_waited = self.max_waited.max(c.waited);
            let r = self.reqs.get_mut(&c.seq).expect("views were checked above");
            if !r.admitted {
                r.admitted = true;
                self.running += 1;
                self.kv_used += r.desc.kv_bytes;
                self.last.admitted.push(c.seq);
            }
            // Until the step ends it is not waiting; `step_done` restarts its clock.
            r.ready_since = f64::INFINITY;
        }
        self.last.loads = self
            .last
            .experts
            .iter()
            .filter(|e| !resident.contains(*e))
            .count();
        Ok(&self.last)
    }

    /// Reports that the step returned by the last [`LookaheadBatcher::schedule`] started at
    /// `start` and ended at `end`: its requests wait again from `end`.
    pub fn step_done(&mut self, start: f64, end: f64) {
        self.clock.push(end - start);
        for c in &self.last.chunks {
            if let Some(r) = self.reqs.get_mut(&c.seq) {
                r.ready_since = end;
            }
        }
    }

    /// The last plan.
    pub fn last_plan(&self) -> &StepPlan {
        &self.last
    }
}

#[cfg(test)]
mod tests;
