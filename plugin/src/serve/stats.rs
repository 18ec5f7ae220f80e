//! Counters and gauges of the serving loop.

use crate::batcher::StepPlan;

/// Largest batch (requests per step) the histogram resolves; larger steps count in the last bucket.
pub const BATCH_BUCKETS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// A snapshot of the serving loop's counters (monotonic) and gauges (current values).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServeStats {
    /// Requests that finished normally (counter).
    pub finished: u64,
    /// Requests cancelled by the client or host (counter).
    pub cancelled: u64,
    /// Requests that failed, invalid ones included (counter).
    pub failed: u64,
    /// Prompt tokens admitted (counter).
    pub prompt_tokens: u64,
    /// Tokens generated and delivered (counter).
    pub generated_tokens: u64,
    /// Steps run (counter).
    pub steps: u64,
    /// Tokens computed by all steps (counter).
    pub step_tokens: u64,
    /// Sum over steps of the requests each step scheduled (counter).
    pub step_requests: u64,
    /// Sum over steps of the distinct experts each step used (counter).
    pub step_experts: u64,
    /// Seconds spent in steps (counter).
    pub step_seconds: f64,
    /// Most requests ever scheduled in one step (gauge, monotonic).
    pub max_step_requests: u64,
    /// Steps by requests scheduled: `batch_hist[i]` counts steps with at most
    /// `BATCH_BUCKETS[i]` requests (cumulative, Prometheus style).
    pub batch_hist: [u64; BATCH_BUCKETS.len()],
    /// Requests admitted and running (gauge).
    pub active: u64,
    /// Requests waiting for admission (gauge).
    pub waiting: u64,
    /// Requests in the last step (gauge).
    pub scheduled: u64,
    /// Requests live in the loop (gauge).
    pub live: u64,
    /// KV bytes the admitted requests reserve, at their worst case (gauge).
    pub kv_bytes_in_use: u64,
    /// Most KV bytes ever reserved at once (gauge, monotonic).
    pub kv_bytes_max: u64,
    /// The KV budget, in bytes; 0 when there is none (gauge).
    pub kv_budget_bytes: u64,
}

impl ServeStats {
    /// Accounts one step.
    pub fn record_step(&mut self, plan: &StepPlan, seconds: f64) {
        let n = plan.chunks.len() as u64;
        self.steps += 1;
        self.step_tokens += plan.tokens as u64;
        self.step_requests += n;
        self.step_experts += plan.experts.len() as u64;
        self.step_seconds += seconds;
        self.max_step_requests = self.max_step_requests.max(n);
        for (i, &b) in BATCH_BUCKETS.iter().enumerate() {
            if n <= b {
                self.batch_hist[i] += 1;
            }
        }
    }

    /// Requests completed in any way.
    pub fn completed(&self) -> u64 {
        self.finished + self.cancelled + self.failed
    }
}
