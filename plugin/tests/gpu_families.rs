//! The Hugging Face MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) on the CUDA engine, on the
//! five transformers fixtures (Mixtral with and without a sliding window): against the fixtures' own greedy tokens and the CPU engine's logits
//! and per-layer experts, each case alone, the three batched, and with chunked prefill; in bf16
//! against the CPU engine's logits; with an expert cache smaller than the experts against all
//! resident; with speculative expert prefetch on a cache of two experts per layer against it off
//! and the CPU engine's speculation. The fixture comparison also runs on the CPU backend (`NAME::cpu`), which checks the
//! harness itself where there is no GPU; without a CUDA device the CUDA trials are reported as
//! ignored.
//!
//! Tolerances: f32, every logit within 1e-4 of the largest reference logit (transformers' and the
//! CPU engine's), each route's weights within 1e-5 of the CPU engine's; bf16, the prompt's
//! logits within a relative (L2) error of 5e-2 of the CPU engine's f32 logits (32 greedy bf16
//! steps of a random model may leave the f32 path at a near tie, so their agreement is printed,
//! not asserted).

mod common;
#[path = "../../kernels/tests/common_gpu/devices.rs"]
mod devices;

use std::path::PathBuf;

use common::fixtures::{check_tokens_and_logits, fixture_dir, read_cases, run_batched, Run};
use common::rel_err;
use devices::{register, Device as TestDevice, DeviceTests, Failed};
use pregate::cache::EvictionPolicy;
use pregate::cuda::{open_cuda_engine, CudaDtype, CudaOptions};
use pregate::engine::{
    open_engine, open_engine_with, Device, Engine, EngineOptions, ExpertCacheOptions,
    ExpertCapacity,
};
use pregate::model::{ModelDir, ModelFamily};

const FIXTURES: [(&str, ModelFamily); 5] = [
    ("mixtral_f32_sharded", ModelFamily::Mixtral),
    ("mixtral_swa_f32", ModelFamily::Mixtral),
    ("qwen2_moe_f32", ModelFamily::Qwen2Moe),
    ("qwen3_moe_bf16", ModelFamily::Qwen3Moe),
    ("olmoe_f32", ModelFamily::Olmoe),
];

fn main() -> std::process::ExitCode {
    let mut tests = DeviceTests::new();
    register!(
        tests,
        every: families_match_transformers_and_the_cpu_engine,
        stacked_experts_give_the_per_expert_results,
    );
    register!(
        tests,
        cuda: families_bf16_logits_close_to_cpu,
        families_small_expert_cache_matches_all_resident,
        families_speculation_changes_no_token_and_predicts_like_the_cpu,
    );
    tests.run()
}

/// A fixture's model folder: beside the sources, or under `tests/fixtures` of the working
/// directory (a prebuilt test binary run from the repository root on another machine).
/// Fixture `name`'s model directory.
fn fixture(name: &str) -> PathBuf {
    fixture_dir(name).join("model")
}

/// A CUDA engine on `ordinal` with the given compute type and expert capacity.
fn cuda(ordinal: usize, model: &ModelDir, dtype: CudaDtype, experts: ExpertCapacity) -> Engine {
    let opts = CudaOptions {
        ordinal,
        dtype,
        experts,
        policy: EvictionPolicy::Lru,
        kv_tokens: Some(4096),
        ..CudaOptions::default()
    };
    open_cuda_engine(model, &opts)
        .unwrap_or_else(|e| panic!("{}: {e}", model.dir.display()))
        .0
}

/// The engine of `device` in f32 (the CUDA one with every expert resident), tracing routes.
fn engine_on(device: &TestDevice, model: &ModelDir) -> Engine {
    let mut e = match *device {
        TestDevice::Cuda(n) => cuda(n, model, CudaDtype::F32, ExpertCapacity::All),
        TestDevice::Cpu => open_engine(model, Device::Cpu).unwrap(),
    };
    e.trace_routes(true).unwrap();
    e
}

/// `got`'s experts equal `want`'s at every layer and token, weights within `tol`.
fn same_routes(name: &str, got: &Run, want: &Run, tol: f32) {
    assert_eq!(got.routes.len(), want.routes.len(), "{name}: layers");
    for (l, (g, w)) in got.routes.iter().zip(&want.routes).enumerate() {
        assert_eq!(g.len(), w.len(), "{name}: tokens routed at layer {l}");
        for (t, (g, w)) in g.iter().zip(w).enumerate() {
            let (g, w) = (g.unwrap(), w.unwrap());
            assert_eq!(g.experts(), w.experts(), "{name}: layer {l}, token {t}");
            for (a, b) in g.weights().iter().zip(w.weights()) {
                assert!(
                    (a - b).abs() <= tol,
                    "{name}: layer {l}, token {t}: weight {a} vs {b}"
                );
            }
        }
    }
}

/// The largest `|a - b|` over the largest `|b|`.
fn scaled_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    diff / scale
}

fn families_match_transformers_and_the_cpu_engine(device: &TestDevice) -> Result<(), Failed> {
    for (name, family) in FIXTURES {
        let model = ModelDir::open(&fixture(name)).unwrap();
        assert_eq!(model.plan.family, family, "{name}");
        let cases = read_cases(name);
        let mut cpu = open_engine(&model, Device::Cpu).unwrap();
        cpu.trace_routes(true).unwrap();
        let want = run_batched(&mut cpu, &cases, usize::MAX);
        let alone: Vec<Run> = cases
            .iter()
            .flat_map(|case| {
                let mut e = engine_on(device, &model);
                run_batched(&mut e, std::slice::from_ref(case), usize::MAX)
            })
            .collect();
        let mut e = engine_on(device, &model);
        let batched = run_batched(&mut e, &cases, usize::MAX);
        let mut e = engine_on(device, &model);
        let chunked = run_batched(&mut e, &cases, 5);
        let mut worst = 0f32;
        for (what, got) in [
            ("alone", &alone),
            ("batched", &batched),
            ("batched, prefill in chunks of 5", &chunked),
        ] {
            for (i, ((case, g), w)) in cases.iter().zip(got).zip(&want).enumerate() {
                let label = format!("{name} {device} {what}, case {i}");
                check_tokens_and_logits(&label, case, &g.output, &g.logits, 1e-4);
                assert_eq!(g.output, w.output, "{label}: tokens against the CPU engine");
                let d = scaled_diff(&g.logits, &w.logits);
                assert!(d <= 1e-4, "{label}: logits {d} off the CPU engine's");
                worst = worst.max(d);
                same_routes(&label, g, w, 1e-5);
            }
        }
        println!(
            "{name} on {device}: {} greedy tokens per case equal to transformers' and the CPU \
             engine's, experts equal at every layer, logits within {worst:.2e} of the largest",
            cases[0].output.len()
        );
    }
    Ok(())
}

fn ordinal(device: &TestDevice) -> Result<usize, Failed> {
    match *device {
        TestDevice::Cuda(n) => Ok(n),
        TestDevice::Cpu => Err("a CUDA test run on the CPU".into()),
    }
}

fn families_bf16_logits_close_to_cpu(device: &TestDevice) -> Result<(), Failed> {
    let ordinal = ordinal(device)?;
    for (name, _) in FIXTURES {
        let model = ModelDir::open(&fixture(name)).unwrap();
        let cases = read_cases(name);
        let mut cpu = open_engine(&model, Device::Cpu).unwrap();
        let want = run_batched(&mut cpu, &cases, usize::MAX);
        let mut gpu = cuda(ordinal, &model, CudaDtype::Bf16, ExpertCapacity::All);
        let got = run_batched(&mut gpu, &cases, usize::MAX);
        let vocab = model.config.vocab_size;
        let (mut worst, mut agree, mut total) = (0f64, 0, 0);
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max(rel_err(&g.logits[..vocab], &w.logits[..vocab]));
            agree += g
                .output
                .iter()
                .zip(&w.output)
                .take_while(|(a, b)| a == b)
                .count();
            total += w.output.len();
        }
        println!(
            "{name} bf16: prompt logits relative error {worst:.3e}; greedy prefix agreeing with \
             f32: {agree} of {total} tokens"
        );
        assert!(worst < 5e-2, "{name}: bf16 logits relative error {worst}");
    }
    Ok(())
}

fn families_small_expert_cache_matches_all_resident(device: &TestDevice) -> Result<(), Failed> {
    let ordinal = ordinal(device)?;
    for (name, _) in FIXTURES {
        let model = ModelDir::open(&fixture(name)).unwrap();
        let experts = model.config.num_experts();
        let cases = read_cases(name);
        let mut all = cuda(ordinal, &model, CudaDtype::F32, ExpertCapacity::All);
        let want = run_batched(&mut all, &cases, 5);
        // Fewer slots than the experts a step of three sequences uses: waves and evictions.
        for cap in [1, experts / 2] {
            let mut small = cuda(
                ordinal,
                &model,
                CudaDtype::F32,
                ExpertCapacity::PerLayer(cap),
            );
            let got = run_batched(&mut small, &cases, 5);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.output, w.output, "{name}, {cap} slots, case {i}: tokens");
                assert_eq!(g.logits, w.logits, "{name}, {cap} slots, case {i}: logits");
            }
            let c = small
                .expert_cache()
                .expect("the CUDA engine's cache")
                .stats();
            println!(
                "{name}: {cap} of {experts} experts per layer resident: tokens and logits equal \
                 ({} hits, {} misses)",
                c.hits, c.misses
            );
            assert!(c.misses > 0, "{name}: a cache of {cap} never missed");
        }
    }
    Ok(())
}

/// Options of an engine with `slots` experts per layer cached (LRU), speculation on or off
/// (depth 2, one extra candidate), f32 on CUDA.
fn spec_options(slots: usize, speculate: bool) -> EngineOptions {
    EngineOptions {
        expert_cache: Some(ExpertCacheOptions {
            capacity: ExpertCapacity::PerLayer(slots),
            policy: EvictionPolicy::Lru,
        }),
        cuda_dtype: Some(CudaDtype::F32),
        kv_tokens: Some(4096),
        speculate: Some(speculate),
        spec_depth: Some(2),
        spec_extra: Some(1),
        ..EngineOptions::default()
    }
}

fn families_speculation_changes_no_token_and_predicts_like_the_cpu(
    device: &TestDevice,
) -> Result<(), Failed> {
    let ordinal = ordinal(device)?;
    let slots = 2;
    for (name, _) in FIXTURES {
        let model = ModelDir::open(&fixture(name)).unwrap();
        let cases = read_cases(name);
        let mut cpu = open_engine_with(&model, Device::Cpu, &spec_options(slots, true)).unwrap();
        let want = run_batched(&mut cpu, &cases, 5);
        let cpu_stats = cpu.speculation_stats().expect("the CPU engine speculates");
        let open = |on| {
            open_engine_with(&model, Device::Cuda(ordinal), &spec_options(slots, on))
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let mut off = open(false);
        let without = run_batched(&mut off, &cases, 5);
        assert!(off.speculation_stats().is_none(), "{name}: speculation off");
        let mut on = open(true);
        let with = run_batched(&mut on, &cases, 5);
        for (i, ((a, b), w)) in with.iter().zip(&without).zip(&want).enumerate() {
            assert_eq!(
                a.output, b.output,
                "{name}, case {i}: tokens with and without"
            );
            assert_eq!(
                a.logits, b.logits,
                "{name}, case {i}: logits with and without"
            );
            assert_eq!(
                a.output, w.output,
                "{name}, case {i}: tokens against the CPU engine"
            );
        }
        let st = on.speculation_stats().expect("the CUDA engine speculates");
        let (gpu1, cpu1) = (st.recall(1), cpu_stats.recall(1));
        println!(
            "{name}: {slots} slots per layer, tokens equal with and without speculation and to the \
             CPU engine's; recall@1 {gpu1:?} (CPU {cpu1:?}), @2 {:?} (CPU {:?}); {} speculative \
             loads, {} used, {} wasted",
            st.recall(2),
            cpu_stats.recall(2),
            st.loads,
            st.used,
            st.wasted
        );
        assert!(
            st.hits[0] + st.misses[0] > 0,
            "{name}: no prediction observed"
        );
        assert!(st.loads > 0, "{name}: no speculative load");
        let (Some(g), Some(c)) = (gpu1, cpu1) else {
            return Err(format!("{name}: no recall at distance 1").into());
        };
        assert!(
            (g - c).abs() <= 0.05,
            "{name}: recall@1 {g:.3} on CUDA against {c:.3} on the CPU"
        );
    }
    Ok(())
}

/// A copy of fixture `name`'s model with each layer's experts stacked in `gate_up_proj [E, 2I, H]`
/// (gate rows, then up rows) and `down_proj [E, H, I]`, as transformers v5 holds them.
fn stacked_copy(name: &str) -> tempfile::TempDir {
    let src = ModelDir::open(&fixture(name)).unwrap();
    let experts = src.config.num_experts();
    let ck = &src.checkpoint;
    let bytes = |n: &str| ck.tensor(n).unwrap().data.to_vec();
    let per_expert =
        |l: usize, e: usize, p: &str| format!("model.layers.{l}.mlp.experts.{e}.{p}.weight");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    common::rewrite(dir.path(), |s, b| {
        let Some(rest) = s.name.strip_prefix("model.layers.") else {
            return Some((s.clone(), b));
        };
        let l: usize = rest.split('.').next().unwrap().parse().unwrap();
        let spec = |p: &str, shape| {
            let n = format!("model.layers.{l}.mlp.experts.{p}");
            pregate::model::writer::TensorSpec::new(n, s.dtype, shape)
        };
        if s.name == per_expert(l, 0, "gate_proj") {
            let mut data = Vec::new();
            for e in 0..experts {
                data.extend(bytes(&per_expert(l, e, "gate_proj")));
                data.extend(bytes(&per_expert(l, e, "up_proj")));
            }
            let (i, h) = (s.shape[0], s.shape[1]);
            Some((spec("gate_up_proj", vec![experts, 2 * i, h]), data))
        } else if s.name == per_expert(l, 0, "down_proj") {
            let data = (0..experts)
                .flat_map(|e| bytes(&per_expert(l, e, "down_proj")))
                .collect();
            Some((
                spec("down_proj", vec![experts, s.shape[0], s.shape[1]]),
                data,
            ))
        } else if s.name.contains(".mlp.experts.") {
            None
        } else {
            Some((s.clone(), b))
        }
    });
    dir
}

fn stacked_experts_give_the_per_expert_results(device: &TestDevice) -> Result<(), Failed> {
    let name = "qwen3_moe_bf16";
    let dir = stacked_copy(name);
    let stacked = ModelDir::open(dir.path()).unwrap();
    assert_eq!(
        stacked.plan.expert_storage,
        pregate::model::family::ExpertStorage::Stacked
    );
    let per_expert = ModelDir::open(&fixture(name)).unwrap();
    let cases = read_cases(name);
    let want = run_batched(&mut engine_on(device, &per_expert), &cases, 5);
    let got = run_batched(&mut engine_on(device, &stacked), &cases, 5);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.output, w.output,
            "{name} stacked on {device}, case {i}: tokens"
        );
        assert_eq!(
            g.logits, w.logits,
            "{name} stacked on {device}, case {i}: logits"
        );
        same_routes(&format!("{name} stacked, case {i}"), g, w, 0.0);
    }
    println!("{name} with stacked experts on {device}: tokens, logits and experts equal");
    Ok(())
}
