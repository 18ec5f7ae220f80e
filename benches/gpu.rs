//! GPU benchmarks of the CUDA backend (run by `kernels/gpu-check.sh` on a GPU host; without a
//! device every command prints `SKIP: no CUDA device` and exits 0).
//!
//! ```text
//! gpu expert-layer [--quick]             permute + expert FFN + combine vs the measured floor
//! gpu loads                              expert loads: pinned/pageable copy bandwidth, overlap
//! gpu make-model DIR LAYERS              readme-7b shape with LAYERS layers (timed)
//! gpu decode DIR BATCHES STEPS           end-to-end decode tokens/s, all experts resident, the
//!                                        router on the host and on the device
//! gpu offload DIR CAPS STEPS BATCH [REQS TOKENS]
//!                                        offloaded decode at cache capacities CAPS (e.g. 2,3,4,5):
//!                                        the engine's router routes (STEPS steps at BATCH), then
//!                                        synthetic Read-ME routes (REQS requests x TOKENS, batch 1)
//! gpu make-mixtral DIR LAYERS            mixtral-8x7b shape with LAYERS layers (timed)
//! gpu mixtral-offload DIR CAPS STEPS     offloaded decode of that model (its own gates route) at
//!                                        CAPS experts per layer (e.g. 2,3,4,5,6), each with
//!                                        speculative prefetch (depth 2, one extra) and LRU on
//!                                        demand, and all resident, beside the link-bound floor:
//!                                        the bytes the exact routes make LRU move per step over
//!                                        the measured pinned copy bandwidth
//! ```
//! Device work is timed with CUDA events (medians); engine steps end with the logits read, so
//! their host clock is device time. Result lines start with `RESULT`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{result as cu, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use pregate::cache::{EvictionPolicy, ExpertCapacity, MemoryBackend};
use pregate::cuda::{
    cuda_available, open_cuda_engine, CacheSetup, CudaBackend, CudaDtype, CudaExpertMemory,
    CudaOptions, CudaStats,
};
use pregate::engine::{Backend, Engine, ForwardChunk, GenerationRequest, Lookahead, SeqId};
use pregate::model::{make_model, ExpertLayout, ModelDir, Preset, RouterWeights};
use pregate::replay::workload::READ_ME_KEEP;
use pregate::replay::ExpertModel;
use pregate::router::{HostReadMeRouter, ReadMeRouter};
use pregate::RoutePlan;
use pregate_kernels::{Blas, ExpertPlan, ExpertWeights, FfnDims, KernelSet, MoePermutation};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if !cuda_available() {
        println!("SKIP: no CUDA device");
        return;
    }
    let r = match args.first().map(String::as_str) {
        Some("expert-layer") => expert_layer(args.iter().any(|a| a == "--quick")),
        Some("loads") => loads(),
        Some("make-model") => make(&args[1], args[2].parse().unwrap_or(32)),
        Some("decode") => decode(&args[1], &args[2], args[3].parse().unwrap_or(32)),
        Some("offload") => offload(
            &args[1],
            &args[2],
            args[3].parse().unwrap_or(32),
            args.get(4).and_then(|b| b.parse().ok()).unwrap_or(1),
            args.get(5).and_then(|b| b.parse().ok()).unwrap_or(8),
            args.get(6).and_then(|b| b.parse().ok()).unwrap_or(64),
        ),
        Some("make-mixtral") => make_mixtral(&args[1], args[2].parse().unwrap_or(4)),
        Some("mixtral-offload") => mixtral_offload(
            &args[1],
            &args[2],
            args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32),
        ),
        _ => {
            eprintln!(
                "usage: gpu expert-layer|loads|make-model|decode|offload|make-mixtral|\
                 mixtral-offload ..."
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn timing_event(ctx: &Arc<CudaContext>) -> Res<CudaEvent> {
    Ok(ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
}

/// Median milliseconds of `f` over `reps` runs after `warm` runs, timed with events on `s`.
fn time_ms(
    ctx: &Arc<CudaContext>,
    s: &CudaStream,
    warm: usize,
    reps: usize,
    mut f: impl FnMut() -> Res<()>,
) -> Res<f64> {
    for _ in 0..warm {
        f()?;
    }
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (a, b) = (timing_event(ctx)?, timing_event(ctx)?);
        a.record(s)?;
        f()?;
        b.record(s)?;
        v.push(a.elapsed_ms(&b)? as f64);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

fn random_bf16(n: usize, scale: f32, seed: u64) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; n];
    out.par_chunks_mut(1 << 20).enumerate().for_each(|(i, c)| {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        for x in c {
            *x = bf16::from_f32(r.random_range(-scale..scale));
        }
    });
    out
}

struct Setup {
    ctx: Arc<CudaContext>,
    s: Arc<CudaStream>,
    k: KernelSet,
    blas: Blas,
}

fn setup() -> Res<Setup> {
    let ctx = pregate_kernels::open_device(0)?;
    // SAFETY: this benchmark orders its streams itself (events and synchronisation).
    unsafe { ctx.disable_event_tracking() };
    let s = ctx.new_stream()?;
    let k = KernelSet::new(&ctx)?;
    let blas = Blas::new(&s)?;
    Ok(Setup { ctx, s, k, blas })
}

/// Measured HBM bandwidth (bytes read + written per second) and bf16 GEMM rate (FLOP/s).
fn ceilings(st: &Setup) -> Res<(f64, f64)> {
    let n = 1usize << 30;
    let a: CudaSlice<u8> = st.s.alloc_zeros(n)?;
    let mut b: CudaSlice<u8> = st.s.alloc_zeros(n)?;
    let ms = time_ms(&st.ctx, &st.s, 2, 10, || {
        st.s.memcpy_dtod(&a, &mut b)?;
        Ok(())
    })?;
    let bw = 2.0 * n as f64 / (ms / 1e3);
    let m = 8192;
    let x = st.s.clone_htod(&random_bf16(m * m, 1.0, 1))?;
    let w = st.s.clone_htod(&random_bf16(m * m, 1.0, 2))?;
    let mut y: CudaSlice<bf16> = st.s.alloc_zeros(m * m)?;
    let ms = time_ms(&st.ctx, &st.s, 3, 10, || {
        st.blas.linear::<bf16, bf16>(&x, &w, &mut y, m, m, m)?;
        Ok(())
    })?;
    let rate = 2.0 * (m as f64).powi(3) / (ms / 1e3);
    println!(
        "RESULT ceilings hbm_copy_GBps={:.0} bf16_gemm_TFLOPs={:.0}",
        bw / 1e9,
        rate / 1e12
    );
    Ok((bw, rate))
}

/// Expert ids `[t * k]`: each token's k distinct experts, uniformly random.
fn route(t: usize, e: usize, k: usize, seed: u64) -> (Vec<i32>, Vec<f32>) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(t * k);
    let mut w = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut chosen: Vec<i32> = Vec::new();
        while chosen.len() < k {
            let x = r.random_range(0..e as i32);
            if !chosen.contains(&x) {
                chosen.push(x);
            }
        }
        let logits: Vec<f32> = (0..k).map(|_| r.random_range(-1.0..1.0f32)).collect();
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        ids.extend(chosen);
        w.extend(
            logits
                .iter()
                .map(|l| if k == 1 { 1.0 } else { l.exp() / z }),
        );
    }
    (ids, w)
}

fn expert_layer(quick: bool) -> Res<()> {
    let mut st = setup()?;
    let (bw, rate) = ceilings(&st)?;
    let shapes: [(&str, usize, usize, usize, usize); 2] =
        [("readme", 4096, 5504, 7, 1), ("mixtral", 4096, 14336, 8, 2)];
    let ts: &[usize] = if quick {
        &[1, 128, 2048]
    } else {
        &[1, 8, 32, 128, 512, 2048, 8192]
    };
    println!(
        "RESULT expert_layer shape T ms floor_ms ratio TFLOPs experts_active cublas_ms grouped"
    );
    for (name, h, i, e, k) in shapes {
        let gate_up: Vec<CudaSlice<bf16>> = (0..e)
            .map(|x| {
                st.s.clone_htod(&random_bf16(2 * i * h, 0.02, 10 + x as u64))
            })
            .collect::<std::result::Result<_, _>>()?;
        let down: Vec<CudaSlice<bf16>> = (0..e)
            .map(|x| st.s.clone_htod(&random_bf16(h * i, 0.02, 100 + x as u64)))
            .collect::<std::result::Result<_, _>>()?;
        let tmax = *ts.iter().max().unwrap_or(&1);
        let x = st.s.clone_htod(&random_bf16(tmax * h, 1.0, 7))?;
        let pairs = tmax * k;
        let mut perm = MoePermutation::new(&st.s, pairs, e)?;
        let mut x_perm: CudaSlice<bf16> = st.s.alloc_zeros(pairs * h)?;
        let mut gu: CudaSlice<bf16> = st.s.alloc_zeros(pairs * 2 * i)?;
        let mut act: CudaSlice<bf16> = st.s.alloc_zeros(pairs * i)?;
        let mut y_perm: CudaSlice<bf16> = st.s.alloc_zeros(pairs * h)?;
        let mut out: CudaSlice<bf16> = st.s.alloc_zeros(tmax * h)?;
        for &t in ts {
            let (ids_h, w_h) = route(t, e, k, t as u64);
            let ids = st.s.clone_htod(&ids_h)?;
            let w = st.s.clone_htod(&w_h)?;
            let plan = ExpertPlan::from_ids(&ids_h, e);
            let experts: Vec<Option<ExpertWeights<'_, bf16>>> = (0..e)
                .map(|x| {
                    Some(ExpertWeights {
                        gate_up: &gate_up[x],
                        down: &down[x],
                    })
                })
                .collect();
            let reps = if t >= 2048 { 10 } else { 30 };
            let mut run = |st: &Setup| -> Res<f64> {
                time_ms(&st.ctx, &st.s, 3, reps, || {
                    st.k.moe_permute(&st.s, &ids, t * k, &mut perm)?;
                    st.k.moe_gather::<bf16>(&st.s, &x, &perm, t, k, h, &mut x_perm)?;
                    st.blas.expert_ffn::<bf16>(
                        &st.k,
                        &plan,
                        &experts,
                        FfnDims {
                            hidden: h,
                            inter: i,
                        },
                        &x_perm,
                        &mut gu,
                        &mut act,
                        &mut y_perm,
                    )?;
                    st.k.moe_combine::<bf16>(&st.s, &y_perm, &perm, &w, t, k, h, &mut out, false)?;
                    Ok(())
                })
            };
            let grouped = st.blas.grouped_ffn_applies::<bf16>(
                &plan,
                FfnDims {
                    hidden: h,
                    inter: i,
                },
            );
            let ms = run(&st)?;
            // The same layer on cuBLAS alone (two GEMMs per expert), for comparison.
            st.blas.set_grouped_ffn(false);
            let cublas_ms = run(&st);
            st.blas.set_grouped_ffn(true);
            let cublas_ms = cublas_ms?;
            let active = plan.counts.iter().filter(|&&c| c > 0).count();
            let bytes = active as f64 * 3.0 * (h * i) as f64 * 2.0 + 2.0 * (t * h) as f64 * 2.0;
            let flops = (t * k) as f64 * 6.0 * (h * i) as f64;
            let floor = (bytes / bw).max(flops / rate) * 1e3;
            println!(
                "RESULT expert_layer {name} {t} {ms:.4} {floor:.4} {:.2} {:.0} {active} {cublas_ms:.4} {}",
                ms / floor,
                flops / (ms / 1e3) / 1e12,
                u8::from(grouped)
            );
        }
    }
    Ok(())
}

fn loads() -> Res<()> {
    let st = setup()?;
    let copy = st.ctx.new_stream()?;
    let unit = 3 * 4096 * 5504 * 2; // one Read-ME expert-layer in bf16, 135 MB
    let n_units = 16;
    // SAFETY: filled below before any copy reads it.
    let mut pinned = unsafe { st.ctx.alloc_pinned::<u8>(unit * n_units) }?;
    pinned
        .as_mut_slice()?
        .par_chunks_mut(1 << 20)
        .for_each(|c| c.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8));
    let pageable = vec![1u8; unit];
    let dst: CudaSlice<u8> = st.s.alloc_zeros(unit * 4)?;
    // Raw pinned copy bandwidth: one large copy per rep.
    let raw = time_ms(&st.ctx, &copy, 1, 5, || {
        let (d, _g) = dst.device_ptr(&copy);
        let src = pinned.as_slice()?;
        // SAFETY: both buffers hold at least 4 units; the pinned buffer outlives the copy.
        unsafe { cu::memcpy_htod_async(d, &src[..4 * unit], copy.cu_stream()) }?;
        Ok(())
    })?;
    let raw_bw = 4.0 * unit as f64 / (raw / 1e3);
    let pg = time_ms(&st.ctx, &copy, 1, 5, || {
        let (d, _g) = dst.device_ptr(&copy);
        // SAFETY: dst holds one unit; the driver stages pageable memory before returning.
        unsafe { cu::memcpy_htod_async(d, &pageable[..], copy.cu_stream()) }?;
        Ok(())
    })?;
    let pg_bw = unit as f64 / (pg / 1e3);
    // The cache's memory backend: 16 expert loads into 4 slots.
    let mut mem = CudaExpertMemory::new(&st.ctx, &copy)?;
    mem.allocate(4, unit)?;
    let src = pinned.as_slice()?;
    let cache_ms = time_ms(&st.ctx, &copy, 1, 5, || {
        for u in 0..n_units {
            mem.load(u % 4, &src[u * unit..(u + 1) * unit])?;
        }
        Ok(())
    })?;
    let cache_bw = (n_units * unit) as f64 / (cache_ms / 1e3);
    println!(
        "RESULT loads pinned_copy_GBps={:.1} pageable_copy_GBps={:.1} cache_load_GBps={:.1} cache_vs_pinned={:.1}%",
        raw_bw / 1e9,
        pg_bw / 1e9,
        cache_bw / 1e9,
        100.0 * cache_bw / raw_bw
    );
    // Overlap: expert FFN (Read-ME shape, T = 128, HBM-bound) alone, then with loads on the copy
    // stream; compute reads its own weights, never the slots being written.
    let (h, i, e) = (4096, 5504, 7);
    let gate_up: Vec<CudaSlice<bf16>> = (0..e)
        .map(|x| st.s.clone_htod(&random_bf16(2 * i * h, 0.02, x as u64)))
        .collect::<std::result::Result<_, _>>()?;
    let down: Vec<CudaSlice<bf16>> = (0..e)
        .map(|x| st.s.clone_htod(&random_bf16(h * i, 0.02, 50 + x as u64)))
        .collect::<std::result::Result<_, _>>()?;
    let t = 128;
    let (ids_h, _) = route(t, e, 1, 3);
    let plan = ExpertPlan::from_ids(&ids_h, e);
    let x_perm = st.s.clone_htod(&random_bf16(t * h, 1.0, 9))?;
    let mut gu: CudaSlice<bf16> = st.s.alloc_zeros(t * 2 * i)?;
    let mut act: CudaSlice<bf16> = st.s.alloc_zeros(t * i)?;
    let mut y: CudaSlice<bf16> = st.s.alloc_zeros(t * h)?;
    let experts: Vec<Option<ExpertWeights<'_, bf16>>> = (0..e)
        .map(|x| {
            Some(ExpertWeights {
                gate_up: &gate_up[x],
                down: &down[x],
            })
        })
        .collect();
    let reps = 40;
    let mut ffn = || -> Res<()> {
        for _ in 0..reps {
            st.blas.expert_ffn::<bf16>(
                &st.k,
                &plan,
                &experts,
                FfnDims {
                    hidden: h,
                    inter: i,
                },
                &x_perm,
                &mut gu,
                &mut act,
                &mut y,
            )?;
        }
        Ok(())
    };
    let alone = time_ms(&st.ctx, &st.s, 1, 3, &mut ffn)?;
    let mut busy = Vec::new();
    for _ in 0..3 {
        let (a, b, c0, c1) = (
            timing_event(&st.ctx)?,
            timing_event(&st.ctx)?,
            timing_event(&st.ctx)?,
            timing_event(&st.ctx)?,
        );
        c0.record(&copy)?;
        for u in 0..n_units {
            mem.load(u % 4, &src[u * unit..(u + 1) * unit])?;
        }
        c1.record(&copy)?;
        a.record(&st.s)?;
        ffn()?;
        b.record(&st.s)?;
        let ms = a.elapsed_ms(&b)? as f64;
        let cms = c0.elapsed_ms(&c1)? as f64;
        busy.push((ms, cms));
    }
    busy.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (with, copy_ms) = busy[1];
    println!(
        "RESULT overlap ffn_alone_ms={alone:.2} ffn_with_loads_ms={with:.2} slowdown={:.1}% loads_during_ms={copy_ms:.2} loads_GBps_during={:.1}",
        100.0 * (with / alone - 1.0),
        (n_units * unit) as f64 / (copy_ms / 1e3) / 1e9
    );
    Ok(())
}

fn make(dir: &str, layers: usize) -> Res<()> {
    let mut spec = Preset::Readme7b.spec();
    spec.config.num_hidden_layers = layers;
    let start = Instant::now();
    let made = make_model(&spec, ExpertLayout::Fused, 0, std::path::Path::new(dir))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "RESULT make_model layers={layers} GB={:.1} seconds={secs:.1}",
        made.bytes as f64 / 1e9
    );
    Ok(())
}

fn requests(
    e: &Engine,
    batch: usize,
    prompt: usize,
    new: usize,
    seed: u64,
) -> Vec<GenerationRequest> {
    let v = e.config().vocab_size as u32;
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..batch)
        .map(|_| {
            let p: Vec<u32> = (0..prompt).map(|_| r.random_range(3..v)).collect();
            let mut q = GenerationRequest::greedy(p, new);
            q.ignore_eos = true;
            q
        })
        .collect()
}

/// Runs one engine step over every pending token, after passing them to `prepare`.
fn step(e: &mut Engine) -> Res<usize> {
    let sched = e.schedule_all();
    let mut plan: Option<pregate::route::RoutePlan> = None;
    for p in e.pending() {
        let part = p
            .routes
            .slice(p.route_offset..p.route_offset + p.tokens.len());
        match &mut plan {
            None => plan = Some(part),
            Some(pl) => pl.extend(&part)?,
        }
    }
    e.prepare(&Lookahead {
        steps: plan.into_iter().collect(),
    })?;
    Ok(e.step(&sched)?.into_events()?.len())
}

/// End-to-end decode with the router on the host and on the device (`PREGATE_BENCH_ROUTERS`,
/// default `host,device`), prompts of `PREGATE_BENCH_PROMPT` tokens (default 32): the router's
/// cost grows with the context it attends over.
fn decode(dir: &str, batches: &str, steps: usize) -> Res<()> {
    let model = ModelDir::open(std::path::Path::new(dir))?;
    let prompt: usize = std::env::var("PREGATE_BENCH_PROMPT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let placements = std::env::var("PREGATE_BENCH_ROUTERS").unwrap_or("host,device".into());
    println!("RESULT decode router prompt batch tokens_per_s step_ms");
    for placement in placements.split(',').filter(|p| !p.is_empty()) {
        let t0 = Instant::now();
        let opts = CudaOptions {
            dtype: CudaDtype::Bf16,
            kv_tokens: Some(64 * 1024),
            router: placement.parse()?,
            ..CudaOptions::default()
        };
        let (mut e, _h) = open_cuda_engine(&model, &opts)?;
        println!(
            "load (router on the {placement}): {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        for b in batches.split(',').filter_map(|b| b.parse::<usize>().ok()) {
            let warm = 3;
            for r in requests(&e, b, prompt, 1 + warm + steps, b as u64) {
                e.add_request(r)?;
            }
            step(&mut e)?; // prefill
            for _ in 0..warm {
                step(&mut e)?;
            }
            let start = Instant::now();
            let mut toks = 0;
            for _ in 0..steps {
                toks += step(&mut e)?;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "RESULT decode {placement} {prompt} {b} {:.1} {:.2}",
                toks as f64 / secs,
                secs / steps as f64 * 1e3
            );
            while !e.is_empty() {
                step(&mut e)?;
            }
        }
    }
    Ok(())
}

/// The CUDA backend shared between an [`Engine`] (the router-driven source) and the benchmark,
/// which drives it directly with synthetic routes; one model load serves both.
struct SharedBackend {
    inner: Arc<Mutex<CudaBackend<bf16>>>,
    cfg: pregate::ModelConfig,
}

impl SharedBackend {
    fn lock(&self) -> pregate::Result<std::sync::MutexGuard<'_, CudaBackend<bf16>>> {
        self.inner
            .lock()
            .map_err(|_| pregate::Error::Internal("backend mutex poisoned".into()))
    }
}

impl Backend for SharedBackend {
    fn device_name(&self) -> String {
        self.lock().map(|b| b.device_name()).unwrap_or_default()
    }
    fn config(&self) -> &pregate::ModelConfig {
        &self.cfg
    }
    fn add_sequence(&mut self, seq: SeqId, max_len: usize) -> pregate::Result<()> {
        self.lock()?.add_sequence(seq, max_len)
    }
    fn remove_sequence(&mut self, seq: SeqId) {
        if let Ok(mut b) = self.lock() {
            b.remove_sequence(seq);
        }
    }
    fn forward(&mut self, chunks: &[ForwardChunk<'_>]) -> pregate::Result<Vec<Vec<f32>>> {
        self.lock()?.forward(chunks)
    }
    fn prepare(&mut self, lookahead: &Lookahead) -> pregate::Result<()> {
        self.lock()?.prepare(lookahead)
    }
}

/// Counters of one measured window, printed as a `RESULT offload` line.
fn offload_result(source: &str, cap: usize, name: &str, before: CudaStats, after: CudaStats) {
    let n = (after.steps - before.steps).max(1) as f64;
    let hits = (after.hits - before.hits) as f64;
    let misses = (after.misses - before.misses) as f64;
    let pre = (after.prefetches - before.prefetches) as f64;
    let lookups = (hits + misses).max(1.0);
    println!(
        "RESULT offload {source} {cap} {name} {:.2} {:.2} {:.3} {:.3} {:.3}",
        (after.step_seconds - before.step_seconds) / n * 1e3,
        (after.stall_seconds - before.stall_seconds) / n * 1e3,
        // Demand hit ratio: prefetched units count as hits of the step; misses are loads on demand.
        hits / lookups,
        // Cache hit ratio: units that were resident before the step (neither prefetched nor
        // loaded on demand), the paper's Table 4 measure.
        ((hits - pre) / lookups).max(0.0),
        (after.bytes_loaded - before.bytes_loaded) as f64 / n / 1e9
    );
}

/// Offloaded decode at batch 1, with two route sources on one backend: `router` (the engine and
/// the checkpoint's router; random weights, so no temporal locality) and `synthetic` (the replay's
/// synthetic expert model, [`ExpertModel::read_me`]: 2921/4096 tokens keep the previous token's
/// expert, as the paper measured for Read-ME's router), fed to the backend directly: `synth_reqs`
/// requests of `synth_tokens` tokens one after another, one token per step, each step's
/// `prepare` given that step's routes (all layers' experts, known at step start; later tokens are
/// not known before sampling, so the lookahead is one step), the first 16 steps not measured.
fn offload(
    dir: &str,
    caps: &str,
    steps: usize,
    batch: usize,
    synth_reqs: usize,
    synth_tokens: usize,
) -> Res<()> {
    let model = ModelDir::open(std::path::Path::new(dir))?;
    let ne = model.config.n_cluster;
    let t0 = Instant::now();
    let opts = CudaOptions {
        dtype: CudaDtype::Bf16,
        experts: ExpertCapacity::PerLayer(ne - 1),
        kv_tokens: Some(16 * 1024),
        measure_stalls: true,
        ..CudaOptions::default()
    };
    let backend = CudaBackend::<bf16>::new(&model, &opts)?;
    let h = backend.stats();
    let shared = Arc::new(Mutex::new(backend));
    let router = HostReadMeRouter::new(ReadMeRouter::new(
        RouterWeights::load(&model.checkpoint, &model.config)?,
        &model.config,
    ));
    let mut e = Engine::new(
        Box::new(SharedBackend {
            inner: shared.clone(),
            cfg: model.config.clone(),
        }),
        Box::new(router),
    );
    println!(
        "load (pinned host copy of the experts): {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The synthetic routes: the same requests for every setup.
    let em = ExpertModel::read_me(ne, 7);
    em.validate()?;
    let pop = em.popularity();
    let plans: Vec<RoutePlan> = (0..synth_reqs)
        .map(|r| {
            let mut s = em.stream(&pop, 1000 + r as u64);
            let ex: Vec<_> = (0..synth_tokens).map(|_| s.next_expert()).collect();
            RoutePlan::from_top1(ne, &ex)
        })
        .collect();
    let (mut kept, mut pairs) = (0usize, 0usize);
    for p in &plans {
        let ex = p.primary_experts(0);
        kept += ex.windows(2).filter(|w| w[0] == w[1]).count();
        pairs += ex.len().saturating_sub(1);
    }
    println!(
        "synthetic routes: {synth_reqs} requests x {synth_tokens} tokens, {kept}/{pairs} = {:.3} keep the previous token's expert (target {:.3})",
        kept as f64 / pairs.max(1) as f64,
        READ_ME_KEEP
    );
    let vocab = model.config.vocab_size as u32;

    println!("RESULT offload source capacity mode step_ms stall_ms demand_hit_ratio cache_hit_ratio GB_loaded_per_step");
    let mut setups = vec![(ne, EvictionPolicy::Lru, false, "resident")];
    for c in caps.split(',').filter_map(|c| c.parse::<usize>().ok()) {
        setups.push((c, EvictionPolicy::Belady, true, "belady+prefetch"));
        setups.push((c, EvictionPolicy::Lru, false, "lru-on-demand"));
    }
    let mut next_seq: SeqId = 1 << 40;
    for (cap, policy, prefetch, name) in setups {
        let setup = CacheSetup {
            experts: ExpertCapacity::PerLayer(cap),
            policy,
            prefetch,
        };
        // Source 1: the engine with the checkpoint's router.
        if let Ok(mut r) = h.reconfigure.lock() {
            *r = Some(setup);
        }
        let warm = 4;
        // Same prompts for every setup: the same routes.
        for r in requests(&e, batch, 16, 1 + warm + steps, 11) {
            e.add_request(r)?;
        }
        step(&mut e)?;
        for _ in 0..warm {
            step(&mut e)?;
        }
        let before = h.snapshot();
        for _ in 0..steps {
            step(&mut e)?;
        }
        let after = h.snapshot();
        offload_result("router", cap, name, before, after);
        while !e.is_empty() {
            step(&mut e)?;
        }

        // Source 2: synthetic routes with Read-ME's temporal locality, straight to the backend.
        if let Ok(mut r) = h.reconfigure.lock() {
            *r = Some(setup);
        }
        let mut b = shared
            .lock()
            .map_err(|_| "backend mutex poisoned".to_string())?;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let skip = 16;
        let mut done = 0usize;
        let mut before = h.snapshot();
        for plan in &plans {
            let seq = next_seq;
            next_seq += 1;
            b.add_sequence(seq, plan.len())?;
            for t in 0..plan.len() {
                if done == skip {
                    before = h.snapshot();
                }
                let tok = [rng.random_range(3..vocab)];
                b.prepare(&Lookahead {
                    steps: vec![plan.slice(t..t + 1)],
                })?;
                b.forward(&[ForwardChunk {
                    seq,
                    tokens: &tok,
                    start_pos: t,
                    routes: plan,
                    route_offset: t,
                    want_logits: true,
                }])?;
                done += 1;
            }
            b.remove_sequence(seq);
        }
        let after = h.snapshot();
        offload_result("synthetic", cap, name, before, after);
    }
    Ok(())
}

fn make_mixtral(dir: &str, layers: usize) -> Res<()> {
    let spec = Preset::Mixtral8x7b.spec().with_layers(layers)?;
    let start = Instant::now();
    let made = make_model(&spec, ExpertLayout::Fused, 0, std::path::Path::new(dir))?;
    println!(
        "RESULT make_mixtral layers={layers} GB={:.1} seconds={:.1}",
        made.bytes as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Pinned host-to-device copy bandwidth (bytes per second): 1 GiB copies, median of 5.
fn pinned_bandwidth(ctx: &Arc<CudaContext>) -> Res<f64> {
    let n = 1usize << 30;
    let copy = ctx.new_stream()?;
    // SAFETY: filled below before any copy reads it.
    let mut pinned = unsafe { ctx.alloc_pinned::<u8>(n) }?;
    pinned
        .as_mut_slice()?
        .par_chunks_mut(1 << 20)
        .for_each(|c| c.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8));
    let dst: CudaSlice<u8> = copy.alloc_zeros(n)?;
    let ms = time_ms(ctx, &copy, 1, 5, || {
        let (d, _g) = dst.device_ptr(&copy);
        let src = pinned.as_slice()?;
        // SAFETY: both buffers hold n bytes; the pinned buffer outlives the copy (synchronised
        // by the timing events before it is dropped).
        unsafe { cu::memcpy_htod_async(d, src, copy.cu_stream()) }?;
        Ok(())
    })?;
    copy.synchronize()?;
    Ok(n as f64 / (ms / 1e3))
}

/// Offloaded decode of a Mixtral-8x7B-shaped model at batch 1: each MoE layer routes itself on
/// the device, so no route is known ahead. For each capacity of `caps` experts per layer, LRU on
/// demand, then speculative prefetch (the coming two layers' gates predicted after each attention,
/// one extra candidate per token, copies capped by the link), and all 8 resident: `steps` timed
/// decode steps after 4 warm-up steps: step time, the bytes loaded into expert slots per step,
/// the speculation's loads, recall at one layer ahead and wasted loads, and the link-bound floor:
/// the bytes LRU on demand moves at that capacity over the measured pinned copy bandwidth.
fn mixtral_offload(dir: &str, caps: &str, steps: usize) -> Res<()> {
    let model = ModelDir::open(std::path::Path::new(dir))?;
    let ne = model.config.num_experts();
    let ctx = pregate_kernels::open_device(0)?;
    let bw = pinned_bandwidth(&ctx)?;
    println!("RESULT mixtral_pinned_copy GB_per_s={:.2}", bw / 1e9);
    let t0 = Instant::now();
    let opts = CudaOptions {
        dtype: CudaDtype::Bf16,
        // Offloaded (a pinned host copy of every expert), so that the cache can be resized.
        experts: ExpertCapacity::PerLayer(ne - 1),
        policy: EvictionPolicy::Lru,
        prefetch: false,
        kv_tokens: Some(16 * 1024),
        measure_stalls: true,
        speculate: Some(false),
        speculation: pregate::moe::SpeculatorConfig {
            depth: 2,
            extra: 1,
            enabled: true,
        },
        ..CudaOptions::default()
    };
    let (mut e, h) = open_cuda_engine(&model, &opts)?;
    println!(
        "load (pinned host copy of the experts, {} layers): {:.1} s",
        model.config.num_hidden_layers,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "RESULT mixtral_offload capacity mode step_ms tokens_per_s stall_ms GB_loaded_per_step \
         link_floor_ms step_over_floor spec_loads_per_step spec_recall1 spec_used spec_wasted"
    );
    let mut setups = vec![(ne, "resident")];
    for cap in caps.split(',').filter_map(|c| c.parse::<usize>().ok()) {
        if cap < ne {
            setups.push((cap, "lru"));
            setups.push((cap, "speculative"));
        }
    }
    // The link-bound floor of a capacity: what LRU on demand moves there (measured first).
    let mut floor_s = 0.0;
    for (cap, mode) in setups {
        if let Ok(mut r) = h.reconfigure.lock() {
            *r = Some(CacheSetup {
                experts: ExpertCapacity::PerLayer(cap),
                policy: EvictionPolicy::Lru,
                prefetch: false,
            });
        }
        if let Ok(mut s) = h.speculate.lock() {
            *s = Some(Some(mode == "speculative"));
        }
        let warm = 4;
        // The same prompt for every setup: the same routes.
        for r in requests(&e, 1, 16, 1 + warm + steps, 11) {
            e.add_request(r)?;
        }
        for _ in 0..1 + warm {
            step(&mut e)?;
        }
        let before = h.snapshot();
        let spec_before = e.speculation_stats().unwrap_or_default();
        for _ in 0..steps {
            step(&mut e)?;
        }
        let after = h.snapshot();
        let spec_after = e.speculation_stats().unwrap_or_default();
        while !e.is_empty() {
            step(&mut e)?;
        }
        let n = (after.steps - before.steps).max(1) as f64;
        let step_s = (after.step_seconds - before.step_seconds) / n;
        let bytes = (after.bytes_loaded - before.bytes_loaded) as f64 / n;
        if mode != "speculative" {
            floor_s = bytes / bw;
        }
        let hits = spec_after.hits[0] - spec_before.hits[0];
        let seen = hits + spec_after.misses[0] - spec_before.misses[0];
        let spec = match mode {
            "speculative" => format!(
                "{:.2} {} {} {}",
                (spec_after.loads - spec_before.loads) as f64 / n,
                match seen {
                    0 => "-".to_string(),
                    _ => format!("{:.3}", hits as f64 / seen as f64),
                },
                spec_after.used - spec_before.used,
                spec_after.wasted - spec_before.wasted
            ),
            _ => "- - - -".into(),
        };
        println!(
            "RESULT mixtral_offload {cap} {mode} {:.2} {:.2} {:.2} {:.3} {:.2} {} {spec}",
            step_s * 1e3,
            1.0 / step_s,
            (after.stall_seconds - before.stall_seconds) / n * 1e3,
            bytes / 1e9,
            floor_s * 1e3,
            match floor_s > 0.0 {
                true => format!("{:.2}", step_s / floor_s),
                false => "-".into(),
            }
        );
    }
    Ok(())
}
