//! What a replay measured, and how it is printed (a table for people, JSON for tools).

use serde::Serialize;

use crate::cache::CacheStats;

/// Accumulates per-step and per-request figures during a replay.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Steps run.
    pub steps: u64,
    unique_hist: Vec<u64>,
    unique_sum: u64,
    tokens_sum: u64,
    stall: f64,
    ttft: Vec<f64>,
    tpot: Vec<f64>,
    normalized: Vec<f64>,
    max_wait: f64,
    first_arrival: f64,
    last_finish: f64,
    prompt_tokens: u64,
    generated_tokens: u64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl Summary {
    /// An empty summary for a model of `experts` experts per layer.
    pub fn new(experts: usize) -> Self {
        Summary {
            steps: 0,
            unique_hist: vec![0; experts + 1],
            unique_sum: 0,
            tokens_sum: 0,
            stall: 0.0,
            ttft: Vec::new(),
            tpot: Vec::new(),
            normalized: Vec::new(),
            max_wait: 0.0,
            first_arrival: f64::INFINITY,
            last_finish: 0.0,
            prompt_tokens: 0,
            generated_tokens: 0,
        }
    }

    /// One step: distinct experts, tokens, stall seconds.
    pub fn step(&mut self, unique: usize, tokens: usize, stall: f64) {
        self.steps += 1;
        if unique >= self.unique_hist.len() {
            self.unique_hist.resize(unique + 1, 0);
        }
        self.unique_hist[unique] += 1;
        self.unique_sum += unique as u64;
        self.tokens_sum += tokens as u64;
        self.stall += stall;
    }

    /// A request waited `s` seconds before a step.
    pub fn queue_wait(&mut self, s: f64) {
        self.max_wait = self.max_wait.max(s);
    }

    /// A request finished.
    pub fn finish(
        &mut self,
        arrival: f64,
        first_token: f64,
        finish: f64,
        prompt: usize,
        output: usize,
    ) {
        self.ttft.push(first_token - arrival);
        if output > 1 {
            self.tpot.push((finish - first_token) / (output - 1) as f64);
        }
        self.normalized
            .push((finish - arrival) / output.max(1) as f64);
        self.first_arrival = self.first_arrival.min(arrival);
        self.last_finish = self.last_finish.max(finish);
        self.prompt_tokens += prompt as u64;
        self.generated_tokens += output as u64;
    }

    /// The final report; `max_waited` is the batcher's own longest wait, `wall_s` the replay's
    /// run time.
    pub fn report(mut self, cache: CacheStats, max_waited: f64, wall_s: f64) -> Report {
        for v in [&mut self.ttft, &mut self.tpot, &mut self.normalized] {
            v.sort_by(f64::total_cmp);
        }
        let steps = self.steps.max(1) as f64;
        let makespan = if self.last_finish > self.first_arrival {
            self.last_finish - self.first_arrival
        } else {
            0.0
        };
        let tokens = (self.prompt_tokens + self.generated_tokens) as f64;
        Report {
            requests: self.normalized.len(),
            steps: self.steps,
            hit_ratio: cache.hit_ratio(),
            hits: cache.hits,
            misses: cache.misses,
            evictions: cache.evictions,
            loads: cache.loads,
            bytes_loaded: cache.bytes_loaded,
            stall_seconds: self.stall,
            unique_experts_per_batch_mean: self.unique_sum as f64 / steps,
            unique_experts_per_batch_hist: self.unique_hist,
            tokens_per_batch_mean: self.tokens_sum as f64 / steps,
            ttft_p50_s: percentile(&self.ttft, 0.5),
            ttft_p95_s: percentile(&self.ttft, 0.95),
            tpot_p50_s: percentile(&self.tpot, 0.5),
            normalized_latency_mean_s: mean(&self.normalized),
            normalized_latency_p50_s: percentile(&self.normalized, 0.5),
            normalized_latency_p95_s: percentile(&self.normalized, 0.95),
            normalized_latency_p99_s: percentile(&self.normalized, 0.99),
            max_queue_wait_s: self.max_wait.max(max_waited),
            throughput_tokens_per_s: if makespan > 0.0 {
                tokens / makespan
            } else {
                0.0
            },
            makespan_s: makespan,
            prompt_tokens: self.prompt_tokens,
            generated_tokens: self.generated_tokens,
            wall_s,
            step_experts: Vec::new(),
            token_experts: Vec::new(),
            per_layer: None,
        }
    }
}

/// What a replay with per-layer routes adds: the speculation and how well it predicted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerLayerReport {
    /// Experts per token and layer.
    pub top_k: usize,
    /// Layers speculated ahead (0: on-demand loading only).
    pub spec_depth: usize,
    /// Candidates per token beyond the top-k.
    pub spec_extra: usize,
    /// The recall model's probability per distance (1, 2, ...).
    pub configured_recall: Vec<f64>,
    /// Measured recall@k+m per distance: exact experts that were predicted / exact experts.
    pub recall: Vec<f64>,
    /// Loads issued on a prediction.
    pub speculative_loads: u64,
    /// Speculative loads their layer used.
    pub speculative_used: u64,
    /// Speculative loads evicted before any use.
    pub wasted_loads: u64,
    /// Loads of exact experts that were not resident when their layer ran.
    pub demand_loads: u64,
    /// How speculative loads shared the link (`eager`, `guarded`).
    pub spec_rule: String,
    /// Speculative loads queued but never started (guarded rule: their layer ran first, or a
    /// newer prediction dropped them).
    pub cancelled_loads: u64,
}

/// A replay's results. Field names are the `--json` keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Requests finished.
    pub requests: usize,
    /// Steps run.
    pub steps: u64,
    /// Cache hits over accesses, one access per (step, layer, expert used).
    pub hit_ratio: f64,
    /// Cache hits.
    pub hits: u64,
    /// Cache misses.
    pub misses: u64,
    /// Evictions.
    pub evictions: u64,
    /// Expert-layer loads.
    pub loads: u64,
    /// Bytes loaded.
    pub bytes_loaded: u64,
    /// Time compute waited for loads.
    pub stall_seconds: f64,
    /// Mean distinct experts per step.
    pub unique_experts_per_batch_mean: f64,
    /// Steps by distinct experts used (index = experts).
    pub unique_experts_per_batch_hist: Vec<u64>,
    /// Mean tokens per step.
    pub tokens_per_batch_mean: f64,
    /// Time to first token, median.
    pub ttft_p50_s: f64,
    /// Time to first token, 95th percentile.
    pub ttft_p95_s: f64,
    /// Time per output token after the first, median over requests.
    pub tpot_p50_s: f64,
    /// End-to-end latency over output tokens, mean over requests.
    pub normalized_latency_mean_s: f64,
    /// Normalized latency, median.
    pub normalized_latency_p50_s: f64,
    /// Normalized latency, 95th percentile.
    pub normalized_latency_p95_s: f64,
    /// Normalized latency, 99th percentile.
    pub normalized_latency_p99_s: f64,
    /// Longest wait of a request before one of its steps.
    pub max_queue_wait_s: f64,
    /// Prompt plus generated tokens over the makespan.
    pub throughput_tokens_per_s: f64,
    /// First arrival to last finish.
    pub makespan_s: f64,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: u64,
    /// Generated tokens of finished requests.
    pub generated_tokens: u64,
    /// Wall-clock time the replay itself took.
    pub wall_s: f64,
    /// The experts each step used, in order (for [`super::offline`]; not serialized).
    #[serde(skip)]
    pub step_experts: Vec<crate::route::ExpertSet>,
    /// With `record_steps`: every scheduled token's (primary) expert, in execution order.
    pub token_experts: Vec<crate::route::ExpertId>,
    /// Per-layer routes and speculation (absent for the Read-ME replay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_layer: Option<PerLayerReport>,
}

impl Report {
    /// A two-column table for people.
    pub fn table(&self) -> String {
        let gb = self.bytes_loaded as f64 / 1e9;
        let hist = self
            .unique_experts_per_batch_hist
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(k, n)| format!("{k}:{n}"))
            .collect::<Vec<_>>()
            .join(" ");
        let rows: Vec<(&str, String)> = vec![
            ("requests", self.requests.to_string()),
            ("steps", self.steps.to_string()),
            (
                "cache hit ratio",
                format!("{:.2} %", self.hit_ratio * 100.0),
            ),
            ("loads", format!("{} ({gb:.1} GB)", self.loads)),
            ("stall", format!("{:.3} s", self.stall_seconds)),
            (
                "unique experts / batch",
                format!("{:.2}  [{hist}]", self.unique_experts_per_batch_mean),
            ),
            (
                "tokens / batch",
                format!("{:.1}", self.tokens_per_batch_mean),
            ),
            (
                "TTFT p50 / p95",
                format!("{:.3} / {:.3} s", self.ttft_p50_s, self.ttft_p95_s),
            ),
            ("TPOT p50", format!("{:.4} s", self.tpot_p50_s)),
            (
                "normalized latency mean / p50",
                format!(
                    "{:.4} / {:.4} s/token",
                    self.normalized_latency_mean_s, self.normalized_latency_p50_s
                ),
            ),
            (
                "normalized latency p95 / p99",
                format!(
                    "{:.4} / {:.4} s/token",
                    self.normalized_latency_p95_s, self.normalized_latency_p99_s
                ),
            ),
            (
                "longest queue wait",
                format!("{:.3} s", self.max_queue_wait_s),
            ),
            (
                "throughput",
                format!("{:.1} tokens/s", self.throughput_tokens_per_s),
            ),
            ("makespan", format!("{:.1} s", self.makespan_s)),
            ("replay wall time", format!("{:.2} s", self.wall_s)),
        ];
        let mut rows = rows;
        if let Some(p) = &self.per_layer {
            let list = |v: &[f64]| {
                v.iter()
                    .map(|r| format!("{:.3}", r))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            rows.push((
                "speculation",
                if p.spec_depth == 0 {
                    format!("off (on-demand loads), top-{}", p.top_k)
                } else {
                    format!(
                        "depth {}, top-{} + {} extra, {} rule ({} cancelled)",
                        p.spec_depth, p.top_k, p.spec_extra, p.spec_rule, p.cancelled_loads
                    )
                },
            ));
            if p.spec_depth > 0 {
                rows.push((
                    "recall by distance",
                    format!(
                        "{}  (model {})",
                        list(&p.recall),
                        list(&p.configured_recall)
                    ),
                ));
                rows.push((
                    "speculative loads",
                    format!(
                        "{} ({} used, {} wasted)",
                        p.speculative_loads, p.speculative_used, p.wasted_loads
                    ),
                ));
            }
            rows.push(("on-demand loads", p.demand_loads.to_string()));
        }
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<w$}  {v}\n"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn a_summary_becomes_a_report() {
        let mut s = Summary::new(7);
        s.step(3, 100, 0.5);
        s.step(1, 50, 0.0);
        s.queue_wait(0.2);
        s.finish(0.0, 1.0, 3.0, 10, 3);
        let r = s.report(
            CacheStats {
                hits: 1,
                misses: 3,
                ..CacheStats::default()
            },
            0.1,
            0.01,
        );
        assert_eq!(r.unique_experts_per_batch_mean, 2.0);
        assert_eq!(r.unique_experts_per_batch_hist[3], 1);
        assert_eq!(r.tpot_p50_s, 1.0);
        assert_eq!(r.normalized_latency_mean_s, 1.0);
        assert_eq!(r.max_queue_wait_s, 0.2);
        assert_eq!(r.hit_ratio, 0.25);
        assert_eq!(r.throughput_tokens_per_s, 13.0 / 3.0);
        assert!(r.table().contains("25.00 %"));
    }
}
