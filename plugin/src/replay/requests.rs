//! The request bookkeeping both simulated replays ([`super::sim`], [`super::perlayer`]) share:
//! each request submitted to the batcher at its arrival time, the waiting and running lists, and
//! each request's progress as steps compute its tokens. What a mode knows besides (routes, route
//! streams) it keeps in its own list, indexed the same way.

use std::collections::VecDeque;

use super::report::Summary;
use super::workload::TraceRequest;
use crate::batcher::{LookaheadBatcher, PendingView, RequestDesc, StepPlan};
use crate::error::Result;
use crate::metrics::ModelMetrics;
use crate::route::RoutePlan;

/// One request's progress.
pub(super) struct Progress {
    pub arrival: f64,
    pub prompt_len: usize,
    pub output_len: usize,
    /// Tokens computed so far (prompt, then generated).
    pub computed: usize,
    pub generated: usize,
    pub first_token: f64,
    pub finish: f64,
}

impl Progress {
    /// Tokens whose ids are known: the prompt and what was sampled.
    pub fn known(&self) -> usize {
        self.prompt_len + self.generated
    }

    /// Whether its prompt is still being computed.
    pub fn prefill(&self) -> bool {
        self.computed < self.prompt_len
    }

    /// What the batcher sees of request `i` (sequence `i + 1`): its uncomputed tokens, whose
    /// routes start at the front of `routes`.
    pub fn view<'a>(&self, i: usize, routes: &'a RoutePlan) -> PendingView<'a> {
        PendingView {
            seq: i as u64 + 1,
            tokens: self.known() - self.computed,
            routes,
            route_offset: 0,
            prefill: self.prefill(),
            generated: self.generated,
        }
    }
}

/// What the loop does after [`Requests::arrive`].
pub(super) enum Flow {
    /// Something is waiting or running: schedule a step.
    Ready,
    /// Nothing was; the clock moved to the next arrival.
    Idle,
    /// Every request has finished.
    Done,
}

/// What a step did to one of its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A prompt chunk that does not end the prompt: no token sampled.
    Partial,
    /// A token was sampled and the request goes on.
    Sampled,
    /// Its last token was sampled: finished, and gone from the batcher.
    Finished,
}

/// Every request of a replay, and where each one is.
pub(super) struct Requests {
    pub all: Vec<Progress>,
    next_arrival: usize,
    pub waiting: VecDeque<usize>,
    pub running: Vec<usize>,
}

impl Requests {
    /// The requests of `reqs`, none arrived yet.
    pub fn new(reqs: &[TraceRequest]) -> Self {
        let all = reqs
            .iter()
            .map(|r| Progress {
                arrival: r.arrival,
                prompt_len: r.prompt.len(),
                output_len: r.output_len,
                computed: 0,
                generated: 0,
                first_token: f64::NAN,
                finish: f64::NAN,
            })
            .collect();
        Requests {
            all,
            next_arrival: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Submits every request arrived by `now` (request `i` is sequence `i + 1`); with nothing
    /// waiting or running, moves `now` to the next arrival.
    pub fn arrive(
        &mut self,
        now: &mut f64,
        batcher: &mut LookaheadBatcher,
        reqs: &[TraceRequest],
        kv_bytes_per_token: u64,
    ) -> Result<Flow> {
        while let Some(r) = self.all.get(self.next_arrival) {
            if r.arrival > *now {
                break;
            }
            let i = self.next_arrival;
            batcher.submit(RequestDesc {
                id: i as u64 + 1,
                arrival: r.arrival,
                prompt_len: r.prompt_len,
                output_len: Some(r.output_len),
                deadline: reqs[i].deadline_s.map(|d| r.arrival + d),
                kv_bytes: (r.prompt_len + r.output_len) as u64 * kv_bytes_per_token,
            })?;
            self.waiting.push_back(i);
            self.next_arrival += 1;
        }
        if !self.running.is_empty() || !self.waiting.is_empty() {
            return Ok(Flow::Ready);
        }
        match self.next_arrival() {
            Some(t) => {
                *now = now.max(t);
                Ok(Flow::Idle)
            }
            None => Ok(Flow::Done),
        }
    }

    /// When the next request arrives, if one has not yet.
    pub fn next_arrival(&self) -> Option<f64> {
        self.all.get(self.next_arrival).map(|r| r.arrival)
    }

    /// How many waiting requests the batcher can reach this step (one more than it has room
    /// for, so that it sees what it would admit next).
    pub fn window(&self, max_running: usize) -> usize {
        max_running.saturating_sub(self.running.len()) + 1
    }

    /// The running requests, then the first `window` waiting ones: what the batcher is shown.
    pub fn visible(&self, window: usize) -> impl Iterator<Item = usize> + '_ {
        self.running
            .iter()
            .chain(self.waiting.iter().take(window))
            .copied()
    }

    /// Moves the requests `plan` admitted from waiting to running and counts its chunks' waits.
    pub fn admit(
        &mut self,
        plan: &StepPlan,
        summary: &mut Summary,
        metrics: Option<&ModelMetrics>,
    ) {
        if !plan.admitted.is_empty() {
            self.waiting
                .retain(|&i| !plan.admitted.contains(&(i as u64 + 1)));
            self.running
                .extend(plan.admitted.iter().map(|&s| s as usize - 1));
        }
        for c in &plan.chunks {
            summary.queue_wait(c.waited);
            if let Some(m) = metrics {
                m.observe_queue_wait(c.waited);
            }
        }
    }

    /// Request `i` had `tokens` tokens computed by a step ending at `end`: a token is sampled when
    /// the chunk reaches the end of what is known, and the request finishes (the batcher and the
    /// summary told) with its last one. Call [`Requests::retire`] after the step's chunks.
    pub fn advance(
        &mut self,
        i: usize,
        tokens: usize,
        end: f64,
        batcher: &mut LookaheadBatcher,
        summary: &mut Summary,
    ) -> Outcome {
        let r = &mut self.all[i];
        r.computed += tokens;
        if r.computed < r.known() {
            return Outcome::Partial;
        }
        r.generated += 1;
        if r.generated == 1 {
            r.first_token = end;
        }
        if r.generated < r.output_len {
            return Outcome::Sampled;
        }
        r.finish = end;
        batcher.finish(i as u64 + 1);
        summary.finish(
            r.arrival,
            r.first_token,
            r.finish,
            r.prompt_len,
            r.output_len,
        );
        Outcome::Finished
    }

    /// Drops finished requests from the running list.
    pub fn retire(&mut self) {
        let all = &self.all;
        self.running.retain(|&i| all[i].finish.is_nan());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::BatcherConfig;
    use crate::replay::workload::Prompt;

    fn req(arrival: f64, prompt: usize, output: usize) -> TraceRequest {
        TraceRequest {
            arrival,
            prompt: Prompt::Len(prompt),
            output_len: output,
            deadline_s: None,
        }
    }

    #[test]
    fn requests_arrive_in_time_and_finish_after_their_last_token() {
        let reqs = [req(0.0, 3, 2), req(5.0, 1, 1)];
        let mut q = Requests::new(&reqs);
        let mut b = LookaheadBatcher::new(BatcherConfig::default()).unwrap();
        let mut s = Summary::new(4);
        let mut now = 0.0;
        assert!(matches!(
            q.arrive(&mut now, &mut b, &reqs, 1).unwrap(),
            Flow::Ready
        ));
        assert_eq!(q.waiting, [0]);
        q.waiting.clear();
        q.running.push(0);
        // A 2-token prompt chunk, then the last prompt token: the first token is sampled.
        assert_eq!(q.advance(0, 2, 1.0, &mut b, &mut s), Outcome::Partial);
        assert_eq!(q.advance(0, 1, 2.0, &mut b, &mut s), Outcome::Sampled);
        assert_eq!(q.all[0].first_token, 2.0);
        assert_eq!(q.advance(0, 1, 3.0, &mut b, &mut s), Outcome::Finished);
        q.retire();
        assert!(q.running.is_empty());
        // Nothing left to run: the clock jumps to the second arrival, which is then submitted.
        assert!(matches!(
            q.arrive(&mut now, &mut b, &reqs, 1).unwrap(),
            Flow::Idle
        ));
        assert_eq!(now, 5.0);
        assert!(matches!(
            q.arrive(&mut now, &mut b, &reqs, 1).unwrap(),
            Flow::Ready
        ));
        assert_eq!(q.waiting, [1]);
        q.waiting.clear();
        assert!(matches!(
            q.arrive(&mut now, &mut b, &reqs, 1).unwrap(),
            Flow::Done
        ));
    }
}
