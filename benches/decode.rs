//! Decode throughput of the CPU backend on the `small` demo model and on a small Mixtral-shaped
//! model (routed by its own gates), each beside the floor that memory bandwidth sets: the bytes of
//! weights one decode step must read over the host's measured `memcpy` bandwidth (bytes copied per
//! second, over buffers far larger than the caches), both measured in the same run.
//!
//! `cargo bench -p pregate-benches --bench decode` (set `PREGATE_BENCH_MODEL=DIR` to reuse a
//! `small` model; `cargo bench -p pregate-benches --bench decode -- mixtral` for the Mixtral shape
//! only).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use pregate::engine::{open_engine, Device, Engine, GenerationRequest};
use pregate::model::{make_model, ExpertLayout, ModelDir, ModelSpec, Preset};

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

/// Criterion's timings of one decode step at each batch size of the model in `dir`, then the
/// side-by-side summary in the same run: decode speed against the bandwidth floor (`bytes` the
/// weights a step reads, over the measured memcpy bandwidth). `title` heads the summary.
fn decode_against_floor(
    c: &mut Criterion,
    group: &str,
    dir: &Path,
    title: &str,
    bytes: impl Fn(&mut Engine, &ModelDir) -> usize,
) {
    let mut g = c.benchmark_group(group);
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    for batch in BATCHES {
        let mut engine = decoding_engine(dir, batch);
        g.bench_function(format!("batch{batch}"), |b| b.iter(|| step(&mut engine)));
    }
    g.finish();

    let model = ModelDir::open(dir).expect("open model");
    let bw = memcpy_bandwidth();
    println!(
        "\n{title}memcpy bandwidth (bytes copied per second): {:.2} GB/s",
        bw / 1e9
    );
    println!("| batch | step ms | tokens/s | weight MB/step | floor tokens/s | ratio to floor |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for batch in BATCHES {
        let mut engine = decoding_engine(dir, batch);
        step(&mut engine);
        let bytes = bytes(&mut engine, &model);
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

fn bench_decode(c: &mut Criterion) {
    decode_against_floor(c, "decode_small_cpu", &model_dir(), "", |e, m| {
        step_bytes(e, m)
    });
}

/// Mixtral's shape scaled down to run on a small host: 4 layers of 8 experts, top-2, hidden 512,
/// expert width 1792 (Mixtral's 3.5 x hidden), 8 query and 2 key/value heads of 64, vocabulary
/// 32000; f32, as the CPU backend holds it.
fn mixtral_small_spec() -> ModelSpec {
    let mut spec = Preset::MixtralTiny.spec();
    let c = &mut spec.config;
    c.vocab_size = 32000;
    c.hidden_size = 512;
    c.intermediate_size = 1792;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 8;
    c.num_key_value_heads = Some(2);
    c.head_dim = Some(64);
    c.max_position_embeddings = 4096;
    c.moe.num_local_experts = Some(8);
    c.moe.num_experts_per_tok = Some(2);
    spec.expert_inter = 1792;
    spec
}

fn mixtral_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("pregate-bench-mixtral-small");
    if !dir.join("config.json").exists() {
        make_model(&mixtral_small_spec(), ExpertLayout::Fused, 0, &dir)
            .expect("make the Mixtral-shaped model");
    }
    dir
}

/// Weight bytes (f32) one decode step of an in-model-routed model reads: dense weights once (the
/// gates included), plus every distinct expert the step's tokens went to at each layer (from the
/// engine's route trace of that step).
fn traced_step_bytes(engine: &mut Engine, model: &ModelDir) -> usize {
    let c = &model.config;
    let (h, v, l) = (c.hidden_size, c.vocab_size, c.num_hidden_layers);
    let d = c.head_dim();
    let attn = h * c.num_attention_heads * d * 2 + h * c.num_kv_heads() * d * 2 + 2 * h;
    let gate = c.num_experts() * h;
    let expert = 3 * h * c.expert_intermediate_size().0;
    let s = engine.schedule_all();
    let out = engine.step(&s).expect("traced decode step");
    let mut distinct = 0;
    for layer in 0..l {
        let mut set = pregate::route::ExpertSet::default();
        for chunk in &out.routes {
            for r in &chunk.layers[layer] {
                for &e in r.experts() {
                    set.insert(e);
                }
            }
        }
        distinct += set.len();
    }
    out.into_events().expect("decode step");
    let head = if c.tie_word_embeddings { 0 } else { h * v };
    4 * (l * (attn + gate) + distinct * expert + head + h)
}

fn bench_decode_mixtral(c: &mut Criterion) {
    // Routes come from in-model gates: the experts a step reads are known from its trace.
    let bytes = |engine: &mut Engine, model: &ModelDir| {
        engine.trace_routes(true).expect("trace routes");
        let bytes = traced_step_bytes(engine, model);
        engine.trace_routes(false).expect("stop tracing");
        bytes
    };
    let title = "Mixtral-shaped (4 layers, 8 experts of 512x1792, top-2, vocab 32000), f32, CPU\n";
    decode_against_floor(c, "decode_mixtral_small_cpu", &mixtral_dir(), title, bytes);
}

criterion_group!(benches, bench_decode, bench_decode_mixtral);
criterion_main!(benches);
