//! The step loop: one step of continuous batching, the same wherever the engine is driven from
//! (the serving loop, the executed replay, the benchmarks).
//!
//! Each step: the batcher picks the step from the engine's pending work and the backend's
//! resident experts ([`StepDriver::schedule`]); the backend is prepared with what is known of the
//! coming steps (Belady's next uses and the exact prefetch plan: [`StepDriver::lookahead`]); the
//! engine runs the step; the batcher learns how long it took ([`StepDriver::step_done`]). Arrivals,
//! clocks, cancellation and delivery stay with the caller, which is what differs between a server
//! and a replay.

use std::collections::{HashMap, HashSet};

use super::{Engine, Lookahead, SeqId, StepOutput};
use crate::batcher::{LookaheadBatcher, PendingView, RequestDesc, StepPlan};
use crate::error::Result;
use crate::route::RoutePlan;

/// How pending sequences are presented to the batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ViewOrder {
    /// In the engine's admission order (a server adds a request to the engine as it arrives and
    /// to the batcher at the same moment).
    #[default]
    Admission,
    /// Sequences the batcher has admitted first, then the others: for a replay that adds every
    /// arrival to the engine before the batcher admits it.
    AdmittedFirst,
}

/// The batcher and the lookahead policy around an [`Engine`].
pub struct StepDriver {
    batcher: LookaheadBatcher,
    lookahead_steps: usize,
    order: ViewOrder,
    admitted: HashSet<SeqId>,
}

impl StepDriver {
    /// A driver over `batcher`, preparing the backend with up to `lookahead_steps` steps after
    /// the one about to run.
    pub fn new(batcher: LookaheadBatcher, lookahead_steps: usize, order: ViewOrder) -> Self {
        StepDriver {
            batcher,
            lookahead_steps,
            order,
            admitted: HashSet::new(),
        }
    }

    /// The batcher (its queues, counters and guards).
    pub fn batcher(&self) -> &LookaheadBatcher {
        &self.batcher
    }

    /// Tells the batcher of a new request (already added to the engine as `desc.id`).
    pub fn submit(&mut self, desc: RequestDesc) -> Result<()> {
        self.batcher.submit(desc)
    }

    /// Forgets a request that finished or was cancelled.
    pub fn finish(&mut self, seq: SeqId) {
        self.batcher.finish(seq);
        self.admitted.remove(&seq);
    }

    /// The next step at time `now`: the batcher's choice over the engine's pending work, given
    /// the experts resident in the backend's cache.
    pub fn schedule(&mut self, engine: &Engine, now: f64) -> Result<StepPlan> {
        let resident = engine
            .expert_cache()
            .map(|c| c.resident_in_every_layer())
            .unwrap_or_default();
        let pending: Vec<PendingView<'_>> = engine.pending().map(PendingView::from).collect();
        let plan = match self.order {
            ViewOrder::Admission => self.batcher.schedule(now, pending, &resident)?,
            ViewOrder::AdmittedFirst => {
                let admitted = &self.admitted;
                let first = pending.iter().filter(|p| admitted.contains(&p.seq));
                let rest = pending.iter().filter(|p| !admitted.contains(&p.seq));
                self.batcher
                    .schedule(now, first.chain(rest).copied(), &resident)?
            }
        }
        .clone();
        self.admitted.extend(plan.admitted.iter().copied());
        Ok(plan)
    }

    /// Runs `plan` on the engine: prepares the backend with the lookahead, then steps (see
    /// [`Engine::step`] for sequences that fail on their own).
    pub fn run(&self, engine: &mut Engine, plan: &StepPlan) -> Result<StepOutput> {
        let lookahead = self.lookahead(engine, plan);
        engine.prepare(&lookahead)?;
        engine.step(&plan.entries())
    }

    /// Tells the batcher the step ran from `start` to `end` (its step-length estimate).
    pub fn step_done(&mut self, start: f64, end: f64) {
        self.batcher.step_done(start, end);
    }

    /// What is known of the coming steps: the step about to run (`plan`), then every pending
    /// token it leaves, in admission order, cut into steps of the token budget (at most
    /// `lookahead_steps` of them). Empty when the backend has no expert cache to prepare.
    pub fn lookahead(&self, engine: &Engine, plan: &StepPlan) -> Lookahead {
        if engine.expert_cache().is_none() {
            return Lookahead::default();
        }
        let budget = self.batcher.config().max_batch_tokens.max(1);
        let now: HashMap<SeqId, usize> = plan.chunks.iter().map(|c| (c.seq, c.tokens)).collect();
        let mut first: Option<RoutePlan> = None;
        let mut later: Vec<RoutePlan> = Vec::new();
        let mut fill = budget;
        let add = |to: &mut Option<RoutePlan>, from: &RoutePlan, a: usize, b: usize| {
            let part = from.slice(a..b);
            match to {
                Some(p) => {
                    // Plans of one router share a scope; a mismatch only shortens the hint.
                    let _ = p.extend(&part);
                }
                None => *to = Some(part),
            }
        };
        for p in engine.pending() {
            // Routes not known ahead (an in-model router) give no hint.
            let known = p
                .routes
                .len()
                .saturating_sub(p.route_offset)
                .min(p.tokens.len());
            let (start, end) = (p.route_offset, p.route_offset + known);
            let n = now.get(&p.seq).copied().unwrap_or(0).min(end - start);
            if n > 0 {
                add(&mut first, p.routes, start, start + n);
            }
            let mut off = start + n;
            while off < end {
                if fill == budget {
                    if later.len() >= self.lookahead_steps {
                        break;
                    }
                    later.push(RoutePlan::new(p.routes.num_experts(), p.routes.scope()));
                    fill = 0;
                }
                let take = (end - off).min(budget - fill);
                if let Some(last) = later.last_mut() {
                    let _ = last.extend(&p.routes.slice(off..off + take));
                }
                off += take;
                fill += take;
            }
        }
        Lookahead {
            steps: first.into_iter().chain(later).collect(),
        }
    }
}
