//! Speculative expert prefetch on the CPU engine for the in-model families: outputs never change,
//! the speculator is fed at every distance, its counters reach the metrics, and the accounting
//! cache's hit ratio with speculation is not below the one without.

mod common;

use common::fixtures::{fixture_dir, read_cases, request};
use pregate::cache::{CacheStats, EvictionPolicy, ExpertCapacity};
use pregate::engine::{open_engine_with, Device, Engine, EngineOptions, ExpertCacheOptions};
use pregate::model::ModelDir;
use pregate::moe::SpeculationStats;

const FAMILIES: [&str; 4] = [
    "mixtral_f32_sharded",
    "qwen2_moe_f32",
    "qwen3_moe_bf16",
    "olmoe_f32",
];

/// An engine over `name`'s model with a cache of `slots` experts per layer (far fewer than the
/// experts) evicting by belady-decay, speculation as `speculate` says.
fn engine(name: &str, slots: usize, speculate: Option<bool>, extra: Option<usize>) -> Engine {
    let model = ModelDir::open(&fixture_dir(name).join("model")).unwrap();
    let opts = EngineOptions {
        expert_cache: Some(ExpertCacheOptions {
            capacity: ExpertCapacity::PerLayer(slots),
            policy: EvictionPolicy::BeladyDecay,
        }),
        speculate,
        spec_extra: extra,
        ..EngineOptions::default()
    };
    open_engine_with(&model, Device::Cpu, &opts).unwrap()
}

/// Every case of `name` in one batch, whole prompts per step: each case's tokens and logits.
fn run(engine: &mut Engine, name: &str) -> Vec<(Vec<u32>, Vec<f32>)> {
    let cases = read_cases(name);
    let ids: Vec<u64> = cases
        .iter()
        .map(|c| engine.add_request(request(c)).unwrap())
        .collect();
    let mut out = vec![(Vec::new(), Vec::new()); cases.len()];
    while !engine.is_empty() {
        let schedule: Vec<(u64, usize)> =
            engine.pending().map(|p| (p.seq, p.tokens.len())).collect();
        for ev in engine.step(&schedule).unwrap().into_events().unwrap() {
            let o = &mut out[ids.iter().position(|&i| i == ev.seq).unwrap()];
            o.0.push(ev.token);
            o.1.extend(ev.logits.unwrap());
        }
    }
    out
}

fn stats(e: &Engine) -> (CacheStats, Option<SpeculationStats>) {
    (e.expert_cache().unwrap().stats(), e.speculation_stats())
}

#[test]
fn tokens_and_logits_are_the_same_with_speculation_on_and_off() {
    for name in FAMILIES {
        let mut off = engine(name, 2, Some(false), None);
        let mut on = engine(name, 2, Some(true), None);
        let a = run(&mut off, name);
        let b = run(&mut on, name);
        assert!(!a.is_empty() && a.iter().all(|(t, l)| !t.is_empty() && !l.is_empty()));
        assert_eq!(a, b, "{name}: speculation changed an output");
        let (_, none) = stats(&off);
        assert!(none.is_none(), "{name}: off keeps no speculator");
        let (_, s) = stats(&on);
        let s = s.unwrap();
        // Two layers, depth 2: layer 1 is predicted at distance 1 after layer 0's attention and
        // at distance 2 from each step's embeddings.
        for j in [1, 2] {
            let seen = s.hits[j - 1] + s.misses[j - 1];
            assert!(seen > 0, "{name}: nothing observed at distance {j}");
            assert!(s.recall(j).is_some_and(|r| r > 0.0), "{name}: {s:?}");
        }
        assert!(
            s.loads > 0,
            "{name}: no speculative load with 2 slots of 8: {s:?}"
        );
        assert!(s.used + s.wasted <= s.loads, "{name}: {s:?}");
    }
}

#[test]
fn speculation_is_on_by_default_only_where_the_cache_is_smaller_than_the_experts() {
    let name = "olmoe_f32";
    assert!(engine(name, 2, None, None).speculation_stats().is_some());
    let model = ModelDir::open(&fixture_dir(name).join("model")).unwrap();
    let all = EngineOptions {
        expert_cache: Some(ExpertCacheOptions {
            capacity: ExpertCapacity::All,
            policy: EvictionPolicy::BeladyDecay,
        }),
        ..EngineOptions::default()
    };
    let e = open_engine_with(&model, Device::Cpu, &all).unwrap();
    assert!(e.speculation_stats().is_none(), "every expert resident");
    let e = open_engine_with(&model, Device::Cpu, &EngineOptions::default()).unwrap();
    assert!(e.speculation_stats().is_none(), "no cache");
    let bad = EngineOptions {
        spec_depth: Some(5),
        ..all.clone()
    };
    let err = open_engine_with(&model, Device::Cpu, &bad).err().unwrap();
    assert!(err.to_string().contains("depth"), "{err}");
}

#[test]
fn the_speculators_counters_reach_the_metrics_per_distance() {
    let name = "qwen3_moe_bf16";
    let mut e = engine(name, 2, Some(true), None);
    run(&mut e, name);
    let s = e.speculation_stats().unwrap();
    let m = pregate::metrics::model_metrics("speculation-test").unwrap();
    m.record_speculation(s);
    let text = pregate::metrics::encode_text().unwrap();
    for j in 1..=2 {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("pregate_prediction_hits_total")
                    && l.contains(&format!("distance=\"{j}\""))
                    && l.contains("model=\"speculation-test\"")
            })
            .unwrap_or_else(|| panic!("no hits line at distance {j}"));
        let v: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(v, s.hits[j - 1]);
        assert!(v > 0, "distance {j}: {line}");
    }
}

#[test]
fn the_hit_ratio_with_speculation_is_not_below_the_one_without() {
    for name in FAMILIES {
        let mut off = engine(name, 2, Some(false), None);
        let mut on = engine(name, 2, Some(true), Some(0));
        run(&mut off, name);
        run(&mut on, name);
        let (a, _) = stats(&off);
        let (b, s) = stats(&on);
        eprintln!(
            "{name}: hit ratio off {:.3} ({} misses), on {:.3} ({} misses); {:?}",
            a.hit_ratio(),
            a.misses,
            b.hit_ratio(),
            b.misses,
            s.unwrap()
        );
        assert_eq!(
            a.hits + a.misses,
            b.hits + b.misses,
            "{name}: the same accesses"
        );
        assert!(b.hit_ratio() >= a.hit_ratio(), "{name}");
    }
}
