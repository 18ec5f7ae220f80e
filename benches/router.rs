//! The host router's cost in a decode step: routing the step's new tokens (one per sequence) with
//! the Read-ME router at the `readme-7b` shape (512-wide, one block, vocab 32000, 7 experts), each
//! sequence holding `CONTEXT` tokens in its router KV cache. This is host time between two device
//! steps (the next step cannot launch before its routes are known), so it is compared with the CUDA
//! backend's decode step in BENCHMARKS.md.
//!
//! Both ways of routing a step are timed side by side: one router call per sequence, and one
//! batched call for the whole step ([`ReadMeRouter::route_batch`]).
//!
//! `cargo bench -p pregate-benches --bench router`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pregate::model::weights::{Linear, Matrix, RouterWeights};
use pregate::model::Preset;
use pregate::router::{ReadMeRouter, RouterState};

const BATCHES: [usize; 3] = [1, 8, 32];
const CONTEXTS: [usize; 2] = [128, 1024];

/// Deterministic values in [-0.05, 0.05) (a splitmix64 stream): the cost does not depend on them.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

fn linear(out: usize, inp: usize, seed: u64) -> Linear {
    Linear {
        weight: Matrix::new(out, inp, values(out * inp, seed)),
        bias: values(out, seed + 1),
    }
}

fn router() -> ReadMeRouter {
    let cfg = Preset::Readme7b.spec().config;
    let rc = cfg.readme_router.clone().expect("the preset has a router");
    let (d, f, n, v) = (
        rc.embedding_dim,
        rc.inter_dim,
        cfg.n_cluster,
        cfg.vocab_size,
    );
    let w = RouterWeights {
        embed: Matrix::new(v, d, values(v * d, 1)),
        input_norm: vec![1.0; d],
        q: linear(d, d, 10),
        k: linear(d, d, 20),
        v: linear(d, d, 30),
        o: linear(d, d, 40),
        post_norm: vec![1.0; d],
        proj_1: linear(f, d, 50),
        proj_2: linear(d, f, 60),
        out_norm: vec![1.0; d],
        proj_out: linear(n, d, 70),
        config: rc,
    };
    ReadMeRouter::new(w, &cfg)
}

/// Steps timed on one set of states before they are rebuilt (keeps the context near `ctx`).
const STEPS_PER_SET: u64 = 32;

/// `batch` router states, each holding a `ctx`-token prompt, with room for the timed steps.
fn states(r: &ReadMeRouter, batch: usize, ctx: usize) -> Vec<RouterState> {
    (0..batch)
        .map(|i| {
            let mut s = r.new_state(ctx + STEPS_PER_SET as usize + 1);
            let prompt: Vec<u32> = (0..ctx)
                .map(|t| ((i * 7919 + t * 31) % 32000) as u32)
                .collect();
            r.route(&mut s, &prompt).expect("prompt");
            s
        })
        .collect()
}

/// Times `iters` decode steps of `batch` sequences; `batched` routes the step's tokens in one
/// pass, otherwise one call per sequence (as the engine did before it batched them).
fn time_steps(r: &ReadMeRouter, batch: usize, ctx: usize, iters: u64, batched: bool) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let mut st = states(r, batch, ctx);
        let n = STEPS_PER_SET.min(iters - done);
        let start = Instant::now();
        for step in 0..n {
            let tokens: Vec<[u32; 1]> = (0..batch)
                .map(|i| [((i as u64 * 13 + step * 7 + 5) % 32000) as u32])
                .collect();
            if batched {
                let mut refs: Vec<&mut RouterState> = st.iter_mut().collect();
                let lists: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
                black_box(r.route_batch(&mut refs, &lists).expect("route"));
            } else {
                for (s, t) in st.iter_mut().zip(&tokens) {
                    black_box(r.route(s, t).expect("route"));
                }
            }
        }
        total += start.elapsed();
        done += n;
    }
    total
}

fn bench(c: &mut Criterion) {
    let r = router();
    let mut g = c.benchmark_group("router_decode_step");
    g.sample_size(20);
    for &ctx in &CONTEXTS {
        for &batch in &BATCHES {
            for (name, batched) in [("per_sequence", false), ("batched", true)] {
                g.bench_with_input(
                    BenchmarkId::new(format!("ctx{ctx}/{name}"), batch),
                    &batch,
                    |b, &batch| b.iter_custom(|iters| time_steps(&r, batch, ctx, iters, batched)),
                );
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
