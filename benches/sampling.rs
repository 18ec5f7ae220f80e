//! Host cost of sampling one token from a 32000-entry vocabulary (Llama's), per setting: the
//! engine samples every sequence of a step on the host, after the device's logits are read.
//! Beside each, in the same run, the textbook way: a stable sort of the whole vocabulary, then
//! softmax, top-k, top-p and a draw (`full_sort/...`).
//!
//! `cargo bench -p pregate-benches --bench sampling`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pregate::sampling::{Sampler, SamplingParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 32000;

/// Logits shaped like a language model's: a few likely tokens over a long tail (Gumbel-ish).
fn logits(seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..VOCAB)
        .map(|_| {
            let u: f32 = r.random::<f32>().max(1e-12);
            -(-u.ln()).ln() * 2.0
        })
        .collect()
}

/// The baseline: sort everything, then filter and draw.
fn full_sort(logits: &[f32], p: &SamplingParams, u: f32) -> u32 {
    let inv_t = 1.0 / p.temperature;
    let mut c: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l * inv_t))
        .collect();
    c.sort_by(|a, b| b.1.total_cmp(&a.1));
    if p.top_k > 0 && p.top_k < c.len() {
        c.truncate(p.top_k);
    }
    let max = c[0].1;
    let mut sum = 0.0f64;
    for x in c.iter_mut() {
        x.1 = (x.1 - max).exp();
        sum += x.1 as f64;
    }
    for x in c.iter_mut() {
        x.1 = (x.1 as f64 / sum) as f32;
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0f32;
        let keep = c
            .iter()
            .position(|x| {
                acc += x.1;
                acc >= p.top_p
            })
            .map_or(c.len(), |i| i + 1);
        c.truncate(keep);
        let s: f32 = c.iter().map(|x| x.1).sum();
        for x in c.iter_mut() {
            x.1 /= s;
        }
    }
    let mut acc = 0.0;
    for &(t, prob) in &c {
        acc += prob;
        if u < acc {
            return t;
        }
    }
    c.last().map_or(0, |x| x.0)
}

fn bench(c: &mut Criterion) {
    let rows: Vec<Vec<f32>> = (0..8).map(logits).collect();
    let settings: [(&str, f32, usize, f32); 5] = [
        ("greedy", 0.0, 0, 1.0),
        ("temperature", 0.8, 0, 1.0),
        ("top_k50", 0.8, 50, 1.0),
        ("top_p0.95", 0.8, 0, 0.95),
        ("top_k50_top_p0.9", 0.8, 50, 0.9),
    ];
    let mut g = c.benchmark_group("sample_32000");
    for (name, temperature, top_k, top_p) in settings {
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(7),
        };
        let mut s = Sampler::new(params.clone(), 0);
        let mut i = 0;
        g.bench_function(BenchmarkId::new("pregate", name), |b| {
            b.iter(|| {
                i = (i + 1) % rows.len();
                black_box(s.sample(&rows[i]).expect("sample"))
            })
        });
        if temperature > 0.0 {
            let mut r = ChaCha8Rng::seed_from_u64(7);
            g.bench_function(BenchmarkId::new("full_sort", name), |b| {
                b.iter(|| {
                    i = (i + 1) % rows.len();
                    let u: f32 = r.random();
                    black_box(full_sort(&rows[i], &params, u))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
