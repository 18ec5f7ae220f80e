//! Property: a simulated replay is a pure function of its workload, configuration and seed.

use pregate::batcher::{BatchPolicy, BatcherConfig};
use pregate::cache::EvictionPolicy;
use pregate::replay::{self, workload, CostModel, ExpertModel, Lookahead, ModelShape, SimConfig};
use proptest::prelude::*;

fn run(seed: u64, policy: usize, batching: usize, cap: usize, n: usize) -> replay::Report {
    let reqs = workload::synthetic(n, 3.0, seed).unwrap();
    let cfg = SimConfig {
        shape: ModelShape::read_me(),
        cost: CostModel::default(),
        batcher: BatcherConfig {
            policy: BatchPolicy::ALL[batching],
            max_batch_tokens: 256,
            max_prefill_chunk: 128,
            max_wait: Some(0.5),
            ..BatcherConfig::default()
        },
        per_layer: cap,
        policy: EvictionPolicy::ALL[policy],
        prefetch: seed % 2 == 0,
        experts: ExpertModel::read_me(7, seed),
        seed,
        lookahead: Lookahead::Online,
        record_steps: true,
    };
    let mut r = replay::simulate(&reqs, &cfg, None).unwrap();
    r.wall_s = 0.0;
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn same_seed_same_report(
        seed in 0u64..1000,
        policy in 0usize..4,
        batching in 0usize..4,
        cap in 1usize..8,
        n in 1usize..40,
    ) {
        let a = run(seed, policy, batching, cap, n);
        let b = run(seed, policy, batching, cap, n);
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a.requests, n);
        prop_assert!(a.stall_seconds >= 0.0);
        prop_assert!(a.hit_ratio >= 0.0 && a.hit_ratio <= 1.0);
        prop_assert_eq!(a.step_experts.len() as u64, a.steps);
    }
}
