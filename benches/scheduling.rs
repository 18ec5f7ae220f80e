//! Cost of the scheduling decisions themselves: one batcher step plus the expert-cache accesses
//! of that step (32 layers), per scheduled token. Goal: >= 1 million scheduled tokens/s
//! on one core, so the decisions never become the bottleneck.
//!
//! `cargo bench -p pregate-benches --bench scheduling`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pregate::batcher::{BatchPolicy, BatcherConfig, LookaheadBatcher, PendingView, RequestDesc};
use pregate::cache::{EvictionPolicy, ExpertCache, Unit};
use pregate::replay::workload::ExpertModel;
use pregate::route::{RoutePlan, TokenRoute};

const LAYERS: usize = 32;
const EXPERTS: usize = 7;

/// `decode` one-token requests and `prefill` prompts of `prompt` tokens, routes from the synthetic
/// expert model.
fn workload(decode: usize, prefill: usize, prompt: usize) -> Vec<(RoutePlan, bool)> {
    let m = ExpertModel::read_me(EXPERTS, 1);
    let pop = m.popularity();
    (0..decode + prefill)
        .map(|i| {
            let mut s = m.stream(&pop, i as u64);
            let n = if i < decode { 1 } else { prompt };
            let experts: Vec<u16> = (0..n).map(|_| s.next_expert()).collect();
            let mut plan = RoutePlan::new(EXPERTS, pregate::route::RouteScope::AllLayers);
            for e in experts {
                plan.push(&[TokenRoute::single(e)]).unwrap();
            }
            (plan, i >= decode)
        })
        .collect()
}

struct Bench {
    batcher: LookaheadBatcher,
    cache: ExpertCache,
    reqs: Vec<(RoutePlan, bool)>,
    now: f64,
}

impl Bench {
    fn new(policy: BatchPolicy, budget: usize, reqs: Vec<(RoutePlan, bool)>) -> Self {
        let mut batcher = LookaheadBatcher::new(BatcherConfig {
            policy,
            max_batch_tokens: budget,
            max_prefill_chunk: 256,
            max_running: 1024,
            max_wait: Some(1.0),
            ..BatcherConfig::default()
        })
        .unwrap();
        for (i, (plan, _)) in reqs.iter().enumerate() {
            batcher
                .submit(RequestDesc {
                    id: i as u64 + 1,
                    arrival: i as f64 * 1e-6,
                    prompt_len: plan.len(),
                    output_len: None,
                    deadline: None,
                    kv_bytes: 0,
                })
                .unwrap();
        }
        let cache = ExpertCache::with_layer_quota(
            LAYERS,
            EXPERTS,
            3,
            135_000_000,
            EvictionPolicy::Belady,
            0,
        )
        .unwrap();
        Bench {
            batcher,
            cache,
            reqs,
            now: 0.0,
        }
    }

    /// One decision: schedule, then every cache access of the step. Returns tokens scheduled.
    fn step(&mut self) -> usize {
        let resident = self.cache.resident_experts(0);
        let views = self
            .reqs
            .iter()
            .enumerate()
            .map(|(i, (plan, prefill))| PendingView {
                seq: i as u64 + 1,
                tokens: plan.len(),
                routes: plan,
                route_offset: 0,
                prefill: *prefill,
                generated: 0,
            });
        let plan = self.batcher.schedule(self.now, views, &resident).unwrap();
        let (used, tokens) = (plan.experts, plan.tokens);
        for l in 0..LAYERS {
            for e in used.iter() {
                self.cache.access(Unit::new(l, e)).unwrap();
                self.cache.unpin_all();
            }
        }
        self.batcher.step_done(self.now, self.now + 0.01);
        self.now += 0.01;
        tokens
    }
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide");
    let cases = [
        ("decode-256", 256, 0, 0, 512),
        ("decode-1024", 1024, 0, 0, 512),
        ("mixed-200+8x512", 200, 8, 512, 1024),
    ];
    for (name, decode, prefill, prompt, budget) in cases {
        for policy in [BatchPolicy::DecodeFirst, BatchPolicy::ExpertAware] {
            let mut b = Bench::new(policy, budget, workload(decode, prefill, prompt));
            let tokens = b.step();
            g.throughput(Throughput::Elements(tokens as u64));
            g.bench_with_input(BenchmarkId::new(policy.as_str(), name), &(), |bench, _| {
                bench.iter(|| b.step())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
