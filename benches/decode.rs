//! Decode throughput of the CPU backend on the `small` demo model, beside the floor that memory
//! bandwidth sets: the bytes of weights one decode step must read over the host's measured `memcpy`
//! bandwidth (bytes copied per second, over buffers far larger than the caches), both measured in
//! the same run.
//!
//! `cargo bench -p pregate-benches --bench decode` (set `PREGATE_BENCH_MODEL=DIR` to reuse a
//! model).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use pregate::engine::{open_engine, Device, Engine, GenerationRequest};
use pregate::model::{make_model, ExpertLayout, ModelDir, Preset};

const BATCHES: [usize; 2] = [1, 8];

fn model_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PREGATE_BENCH_MODEL") {
        return PathBuf::from(dir);
    }
    let dir = std::env::temp_dir().join("pregate-bench-small");
    if !dir.join("config.json").exists() {
        make_model(&Preset::Small.spec(), ExpertLayout::Fused, 0, &dir).expect("make small model");
    }
    dir
}

/// An engine with `batch` sequences whose prompts are already computed, so every step is decode.
fn decoding_engine(dir: &Path, batch: usize) -> Engine {
    let model = ModelDir::open(dir).expect("open model");
    let mut engine = open_engine(&model, Device::Cpu).expect("engine");
    for i in 0..batch {
        let prompt: Vec<u32> = (0..16).map(|t| 100 + (i * 31 + t * 7) as u32).collect();
        let mut req = GenerationRequest::greedy(prompt, 1500);
        req.ignore_eos = true;
        engine.add_request(req).expect("request");
    }
    let all = engine.schedule_all();
    engine
        .step(&all)
        .and_then(pregate::StepOutput::into_events)
        .expect("prefill");
    engine
}

fn step(engine: &mut Engine) {
    let s = engine.schedule_all();
    engine
        .step(&s)
        .and_then(pregate::StepOutput::into_events)
        .expect("decode step");
}

/// Weight bytes (f32, as the CPU backend holds them) one decode step reads: dense weights once,
/// plus every distinct expert the batch's tokens are routed to, plus the router.
fn step_bytes(engine: &Engine, model: &ModelDir) -> usize {
    let c = &model.config;
    let (h, v, l) = (c.hidden_size, c.vocab_size, c.num_hidden_layers);
    let d = c.head_dim();
    let attn = h * c.num_attention_heads * d * 2 + h * c.num_kv_heads() * d * 2 + 2 * h;
    let inter = model
        .checkpoint
        .tensor("model.layers.0.moe.gate_proj_0.weight")
        .map(|t| t.shape[0])
        .unwrap_or(0);
    let expert = 3 * h * inter;
    let mut distinct = 0;
    for layer in 0..l {
        let mut set = pregate::route::ExpertSet::default();
        for p in engine.pending() {
            for &e in p.routes.route(p.route_offset, layer).experts() {
                set.insert(e);
            }
        }
        distinct += set.len();
    }
    let rc = c.readme_router.as_ref().expect("a Read-ME router");
    let (rd, rf) = (rc.embedding_dim, rc.inter_dim);
    let router = rd + 4 * (rd * rd + rd) + 2 * rd * rf + rd + rf + c.n_cluster * rd + 3 * rd;
    4 * (l * attn + distinct * expert + h * v + h + h + router)
}

/// Host `memcpy` bandwidth (bytes copied per second) over buffers far larger than the caches.
fn memcpy_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = Duration::MAX;
    for _ in 0..7 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t.elapsed());
        std::hint::black_box(&dst);
    }
    n as f64 / best.as_secs_f64()
}

fn median_step_seconds(engine: &mut Engine, steps: usize) -> f64 {
    let mut times: Vec<f64> = (0..steps)
        .map(|_| {
            let t = Instant::now();
            step(engine);
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn bench_decode(c: &mut Criterion) {
    let dir = model_dir();
    let mut group = c.benchmark_group("decode_small_cpu");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    for batch in BATCHES {
        let mut engine = decoding_engine(&dir, batch);
        group.bench_function(format!("batch{batch}"), |b| b.iter(|| step(&mut engine)));
    }
    group.finish();

    // The side-by-side summary: decode speed against the bandwidth floor, in this same run.
    let model = ModelDir::open(&dir).expect("open model");
    let bw = memcpy_bandwidth();
    println!(
        "\nmemcpy bandwidth (bytes copied per second): {:.2} GB/s",
        bw / 1e9
    );
    println!("| batch | step ms | tokens/s | weight MB/step | floor tokens/s | ratio to floor |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for batch in BATCHES {
        let mut engine = decoding_engine(&dir, batch);
        step(&mut engine);
        let bytes = step_bytes(&engine, &model);
        let secs = median_step_seconds(&mut engine, 30);
        let floor_secs = bytes as f64 / bw;
        println!(
            "| {batch} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} |",
            secs * 1e3,
            batch as f64 / secs,
            bytes as f64 / 1e6,
            batch as f64 / floor_secs,
            floor_secs / secs
        );
    }
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
