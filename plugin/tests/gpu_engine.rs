//! The CUDA engine against the CPU engine, end to end: in f32 the same greedy tokens (alone,
//! batched, chunked prefill); in bf16 logits close; the expert cache under eviction pressure gives
//! the same outputs as all experts resident (on the CPU backend's cache too). One trial per
//! device present (`NAME::cpu`, `NAME::cuda:N`); without a CUDA device the CUDA trials are
//! reported as ignored.

mod common;
#[path = "../../kernels/tests/common_gpu/devices.rs"]
mod devices;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::rel_err;
use devices::{register, Device as TestDevice, DeviceTests, Failed};
use pregate::cache::EvictionPolicy;
use pregate::cuda::{cuda_available, open_cuda_engine, CudaDtype, CudaOptions};
use pregate::engine::ExpertCapacity;
use pregate::engine::{
    open_engine, open_engine_with, Device, Engine, EngineOptions, ExpertCacheOptions,
    GenerationRequest, Lookahead,
};
use pregate::model::{make_model, ExpertLayout, ModelDir, Preset};

fn main() -> std::process::ExitCode {
    let mut tests = DeviceTests::new();
    register!(
        tests,
        cuda: f32_matches_cpu_on_fixtures_and_tiny,
        bf16_logits_close_to_cpu,
        router_on_the_device_matches_the_host_router,
    );
    register!(
        tests,
        every: cache_under_eviction_pressure_matches_all_resident
    );
    register!(tests, cpu: device_selection_reports_errors);
    tests.run()
}

/// The CUDA ordinal of a CUDA trial's device.
fn ordinal(device: &TestDevice) -> Result<usize, Failed> {
    match *device {
        TestDevice::Cuda(n) => Ok(n),
        TestDevice::Cpu => Err("a CUDA test run on the CPU".into()),
    }
}

/// A fixture model: beside the sources, or under `tests/fixtures` of the working directory (a
/// prebuilt test binary run from the repository root on another machine).
fn fixture(name: &str) -> PathBuf {
    let built =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/fixtures/{name}/model"));
    if built.exists() {
        built
    } else {
        PathBuf::from(format!("tests/fixtures/{name}/model"))
    }
}

/// A `tiny` random model written to a temporary folder.
fn tiny(layout: ExpertLayout) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_model(&Preset::Tiny.spec(), layout, 7, dir.path()).unwrap();
    dir
}

fn cuda(
    ordinal: usize,
    model: &ModelDir,
    dtype: CudaDtype,
    experts: ExpertCapacity,
    policy: EvictionPolicy,
    prefetch: bool,
) -> Engine {
    let opts = CudaOptions {
        ordinal,
        dtype,
        experts,
        policy,
        prefetch,
        kv_tokens: Some(4096),
        measure_stalls: true,
        ..CudaOptions::default()
    };
    open_cuda_engine(model, &opts).unwrap().0
}

fn requests(vocab: u32) -> Vec<GenerationRequest> {
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 5, 9, 13, 200 % vocab],
        vec![42 % vocab],
        (0..37).map(|i| (i * 7 + 3) % vocab).collect(),
    ];
    prompts
        .into_iter()
        .map(|p| {
            let mut r = GenerationRequest::greedy(p, 10);
            r.ignore_eos = true;
            r.keep_logits = true;
            r
        })
        .collect()
}

/// Runs every request to completion, `chunk` prompt tokens per step at most, passing the
/// scheduled work to `prepare` first (the prefetch path). Returns tokens and logits per request.
fn run(e: &mut Engine, reqs: &[GenerationRequest], chunk: usize) -> Vec<(Vec<u32>, Vec<Vec<f32>>)> {
    let ids: Vec<u64> = reqs
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let mut out: HashMap<u64, (Vec<u32>, Vec<Vec<f32>>)> = HashMap::new();
    while !e.is_empty() {
        let sched: Vec<(u64, usize)> = e
            .pending()
            .map(|p| (p.seq, p.tokens.len().min(chunk)))
            .collect();
        let mut plan = None::<pregate::route::RoutePlan>;
        for p in e.pending() {
            let n = sched.iter().find(|s| s.0 == p.seq).map_or(0, |s| s.1);
            let part = p.routes.slice(p.route_offset..p.route_offset + n);
            match &mut plan {
                None => plan = Some(part),
                Some(pl) => pl.extend(&part).unwrap(),
            }
        }
        e.prepare(&Lookahead {
            steps: plan.into_iter().collect(),
        })
        .unwrap();
        for ev in e.step(&sched).unwrap().into_events().unwrap() {
            let o = out.entry(ev.seq).or_default();
            o.0.push(ev.token);
            o.1.push(ev.logits.unwrap());
        }
    }
    ids.iter().map(|id| out.remove(id).unwrap()).collect()
}

fn compare_f32(ordinal: usize, dir: &Path) {
    let model = ModelDir::open(dir).unwrap();
    let reqs = requests(model.config.vocab_size as u32);
    let mut cpu = open_engine(&model, Device::Cpu).unwrap();
    let want = run(&mut cpu, &reqs, usize::MAX);
    for chunk in [usize::MAX, 8] {
        let mut gpu = cuda(
            ordinal,
            &model,
            CudaDtype::F32,
            ExpertCapacity::All,
            EvictionPolicy::Belady,
            true,
        );
        let got = run(&mut gpu, &reqs, chunk);
        let mut worst = 0.0f64;
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                g.0,
                w.0,
                "{}: greedy tokens differ (chunk {chunk})",
                dir.display()
            );
            for (gl, wl) in g.1.iter().zip(&w.1) {
                worst = worst.max(rel_err(gl, wl));
            }
        }
        println!(
            "{} f32 chunk {chunk}: tokens equal, logits relative error {worst:.3e}",
            dir.display()
        );
        assert!(worst < 1e-4, "f32 logits relative error {worst}");
    }
}

fn f32_matches_cpu_on_fixtures_and_tiny(device: &TestDevice) -> Result<(), Failed> {
    let ordinal = ordinal(device)?;
    compare_f32(ordinal, &fixture("fused_f32"));
    compare_f32(ordinal, &fixture("residual_bf16_sharded"));
    let t = tiny(ExpertLayout::Fused);
    compare_f32(ordinal, t.path());
    Ok(())
}

fn bf16_logits_close_to_cpu(device: &TestDevice) -> Result<(), Failed> {
    let ordinal = ordinal(device)?;
    let t = tiny(ExpertLayout::Fused);
    for dir in [
        fixture("fused_f32"),
        fixture("residual_bf16_sharded"),
        t.path().to_path_buf(),
    ] {
        let model = ModelDir::open(&dir).unwrap();
        let mut reqs = requests(model.config.vocab_size as u32);
        for r in &mut reqs {
            r.max_new_tokens = 1;
        }
        let mut cpu = open_engine(&model, Device::Cpu).unwrap();
        let want = run(&mut cpu, &reqs, usize::MAX);
        let mut gpu = cuda(
            ordinal,
            &model,
            CudaDtype::Bf16,
            ExpertCapacity::All,
            EvictionPolicy::Belady,
            true,
        );
        let got = run(&mut gpu, &reqs, usize::MAX);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| rel_err(&g.1[0], &w.1[0]))
            .fold(0.0, f64::max);
        println!("{} bf16: logits relative error {worst:.3e}", dir.display());
        assert!(worst < 5e-2, "bf16 logits relative error {worst}");
    }
    Ok(())
}

/// Expert cache counters, from either backend.
struct CacheCounts {
    hits: u64,
    misses: u64,
    prefetches: u64,
    bytes_loaded: u64,
}

/// Reads an engine's expert cache counters.
type ReadCounts = Box<dyn Fn(&Engine) -> CacheCounts>;

/// An engine on `device` whose expert cache holds `cap` experts per layer, and a reader of its
/// counters. CUDA: device slots filled from host memory; CPU: the cache's accounting of the same
/// decisions (the weights stay in host memory; it does not prefetch).
fn cached_engine(
    device: &TestDevice,
    model: &ModelDir,
    cap: usize,
    policy: EvictionPolicy,
    prefetch: bool,
) -> (Engine, ReadCounts) {
    match *device {
        TestDevice::Cuda(ordinal) => {
            let opts = CudaOptions {
                ordinal,
                dtype: CudaDtype::F32,
                experts: ExpertCapacity::PerLayer(cap),
                policy,
                prefetch,
                kv_tokens: Some(4096),
                measure_stalls: true,
                ..CudaOptions::default()
            };
            let (e, stats) = open_cuda_engine(model, &opts).unwrap();
            let counts = move |_: &Engine| {
                let s = stats.snapshot();
                CacheCounts {
                    hits: s.hits,
                    misses: s.misses,
                    prefetches: s.prefetches,
                    bytes_loaded: s.bytes_loaded,
                }
            };
            (e, Box::new(counts))
        }
        TestDevice::Cpu => {
            let opts = EngineOptions {
                expert_cache: Some(ExpertCacheOptions {
                    capacity: ExpertCapacity::PerLayer(cap),
                    policy,
                }),
                ..EngineOptions::default()
            };
            let e = open_engine_with(model, Device::Cpu, &opts).unwrap();
            let counts = |e: &Engine| {
                let s = e
                    .expert_cache()
                    .expect("the CPU engine's expert cache")
                    .stats();
                CacheCounts {
                    hits: s.hits,
                    misses: s.misses,
                    prefetches: s.loads - s.misses,
                    bytes_loaded: s.bytes_loaded,
                }
            };
            (e, Box::new(counts))
        }
    }
}

fn cache_under_eviction_pressure_matches_all_resident(device: &TestDevice) -> Result<(), Failed> {
    let t = tiny(ExpertLayout::Fused);
    let model = ModelDir::open(t.path()).unwrap();
    let reqs = requests(model.config.vocab_size as u32);
    let mut base = match *device {
        TestDevice::Cuda(ordinal) => cuda(
            ordinal,
            &model,
            CudaDtype::F32,
            ExpertCapacity::All,
            EvictionPolicy::Belady,
            true,
        ),
        TestDevice::Cpu => open_engine(&model, Device::Cpu).unwrap(),
    };
    let want = run(&mut base, &reqs, 8);
    for (cap, policy, prefetch) in [
        (1, EvictionPolicy::Belady, true),
        (2, EvictionPolicy::Belady, true),
        (2, EvictionPolicy::Lru, false),
        (3, EvictionPolicy::Random, true),
    ] {
        let (mut e, stats) = cached_engine(device, &model, cap, policy, prefetch);
        let got = run(&mut e, &reqs, 8);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.0, w.0, "capacity {cap} {policy}: tokens differ");
            for (gl, wl) in g.1.iter().zip(&w.1) {
                assert_eq!(gl, wl, "capacity {cap} {policy}: logits differ");
            }
        }
        let s = stats(&e);
        println!(
            "{device} capacity {cap}/layer {policy} prefetch={prefetch}: equal to all-resident; {} hits, {} misses, {} prefetches, {} MB loaded",
            s.hits,
            s.misses,
            s.prefetches,
            s.bytes_loaded >> 20
        );
        assert!(s.bytes_loaded > 0);
    }
    Ok(())
}

/// Device selection on this machine (the CPU trial: it is about the host, whichever devices it
/// has).
fn device_selection_reports_errors(_: &TestDevice) -> Result<(), Failed> {
    let err = Device::Cuda(99).resolve().unwrap_err().to_string();
    assert!(err.contains("cuda:99"), "{err}");
    let auto = Device::Auto.resolve().unwrap();
    if cuda_available() {
        assert_eq!(auto, Device::Cuda(0));
    } else {
        assert_eq!(auto, Device::Cpu);
        println!("no CUDA device: auto resolved to cpu");
    }
    Ok(())
}

/// The router on the device (`RouterPlacement::Device`): its logits against the host router's
/// for prompts, batched decode tokens and chunks, in both backbone types (the router computes in
/// f32 either way); bad input changes no state; and the engine end to end gives the host-routed
/// engine's tokens and logits.
fn router_on_the_device_matches_the_host_router(device: &TestDevice) -> Result<(), Failed> {
    use pregate::cuda::{open_context, CudaReadMeRouter, RouterPlacement};
    use pregate::router::{ReadMeRouter, Router};
    let ordinal = ordinal(device)?;
    let t = tiny(ExpertLayout::Fused);
    for dir in [fixture("fused_f32"), t.path().to_path_buf()] {
        let model = ModelDir::open(&dir).unwrap();
        let cfg = &model.config;
        let vocab = cfg.vocab_size as u32;
        let weights = pregate::model::RouterWeights::load(&model.checkpoint, cfg).unwrap();
        let host = ReadMeRouter::new(weights.clone(), cfg);
        {
            // The router computes in f32 whatever the backbone's type, on a stream of its own.
            let ctx = open_context(ordinal).unwrap();
            let kernels = std::sync::Arc::new(pregate_kernels::KernelSet::new(&ctx).unwrap());
            let mut b = CudaReadMeRouter::new(&ctx, kernels, &weights, cfg, 1024, 16).unwrap();
            let prompts: Vec<Vec<u32>> = vec![
                (0..37).map(|i| (i * 7 + 3) % vocab).collect(),
                vec![42 % vocab],
                (0..5).map(|i| (i * 11 + 1) % vocab).collect(),
            ];
            let mut states: Vec<_> = prompts.iter().map(|_| host.new_state(128)).collect();
            for (i, _) in prompts.iter().enumerate() {
                b.open(i as u64, 128).unwrap();
            }
            let mut worst = 0.0f64;
            let mut check = |b: &mut CudaReadMeRouter,
                             states: &mut Vec<pregate::router::RouterState>,
                             lists: &[Vec<u32>]| {
                let seqs: Vec<u64> = (0..lists.len() as u64).collect();
                let refs: Vec<&[u32]> = lists.iter().map(Vec::as_slice).collect();
                let got = b.logits(&seqs, &refs).unwrap();
                let mut st: Vec<&mut pregate::router::RouterState> = states.iter_mut().collect();
                let want = host.logits_batch(&mut st, &refs).unwrap();
                assert_eq!(got.len(), want.len());
                assert_eq!(
                    host.routes_from_logits(&got),
                    host.routes_from_logits(&want)
                );
                worst = worst.max(rel_err(&got, &want));
            };
            // Prompts in one pass, then a chunk of 3 for each, then single decode tokens.
            check(&mut b, &mut states, &prompts);
            let chunks: Vec<Vec<u32>> = (0..3).map(|i| vec![i + 1, i + 2, i + 3]).collect();
            check(&mut b, &mut states, &chunks);
            for step in 0..20u32 {
                let toks: Vec<Vec<u32>> =
                    (0..3).map(|i| vec![(step * 13 + i * 5) % vocab]).collect();
                check(&mut b, &mut states, &toks);
            }
            // Bad input is refused before any state moves: the next pass still agrees.
            let err = b.route(&[0, 1], &[&[1], &[vocab]]).unwrap_err().to_string();
            assert!(err.contains("outside the vocabulary"), "{err}");
            assert!(b.route(&[0, 77], &[&[1], &[1]]).is_err());
            check(&mut b, &mut states, &[vec![3], vec![4], vec![5]]);
            println!(
                "{} router on the device: logits relative error {worst:.3e}",
                dir.display()
            );
            assert!(worst < 1e-5, "device router logits relative error {worst}");
            b.close(1);
            assert!(b.route(&[1], &[&[1]]).is_err());
        }
        // End to end: the engine with the device router equals the host-routed CPU engine (f32).
        let reqs = requests(vocab);
        let mut cpu = open_engine(&model, Device::Cpu).unwrap();
        let want = run(&mut cpu, &reqs, usize::MAX);
        for chunk in [usize::MAX, 8] {
            let opts = CudaOptions {
                ordinal,
                dtype: CudaDtype::F32,
                kv_tokens: Some(4096),
                router: RouterPlacement::Device,
                ..CudaOptions::default()
            };
            let mut gpu = open_cuda_engine(&model, &opts).unwrap().0;
            let got = run(&mut gpu, &reqs, chunk);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.0, w.0, "{}: tokens differ (chunk {chunk})", dir.display());
                for (gl, wl) in g.1.iter().zip(&w.1) {
                    assert!(rel_err(gl, wl) < 1e-4);
                }
            }
        }
    }
    Ok(())
}
