//! The Hugging Face MoE families (Mixtral, with and without a sliding window, Qwen2-MoE,
//! Qwen3-MoE, OLMoE) on the CPU engine against transformers' own modeling code (fixtures made by
//! `tests/reference/make_family_fixtures.py`): logits, the 32 greedy tokens and every token's
//! experts and weights at every layer, for each case alone, the three cases batched, and with
//! chunked prefill. Then the families' presets and
//! the errors of bad checkpoints and configs.

mod common;

use std::path::Path;

use common::fixtures::{
    check_tokens_and_logits, fixture_dir, read_cases, request, run_batched, Case, Run,
};
use pregate::engine::{open_engine, Device, Engine};
use pregate::model::{make_model, ExpertLayout, ModelDir, ModelFamily, Preset};

fn engine_for(dir: &Path) -> Engine {
    let model = ModelDir::open(dir).unwrap();
    let mut engine = open_engine(&model, Device::Cpu).unwrap();
    engine.trace_routes(true).unwrap();
    engine
}

fn check(name: &str, case: &Case, run: &Run, tol: f32, weight_tol: f32) {
    check_tokens_and_logits(name, case, &run.output, &run.logits, tol);
    assert_eq!(run.routes.len(), case.layers, "{name}: layers");
    for (l, row) in run.routes.iter().enumerate() {
        let dense = case.experts_at(l, 0).iter().all(|&e| e < 0);
        if dense {
            assert!(row.is_empty(), "{name}: dense layer {l} was routed");
            continue;
        }
        assert_eq!(row.len(), case.fed(), "{name}: tokens routed at layer {l}");
        for (t, r) in row.iter().enumerate() {
            let r = r.unwrap_or_else(|| panic!("{name}: layer {l}, token {t} not routed"));
            let want: Vec<u16> = case.experts_at(l, t).iter().map(|&e| e as u16).collect();
            assert_eq!(
                r.experts(),
                &want[..],
                "{name}: experts of layer {l}, token {t}"
            );
            for (w, want) in r.weights().iter().zip(case.weights_at(l, t)) {
                assert!(
                    (w - want).abs() <= weight_tol,
                    "{name}: layer {l}, token {t}: weight {w} vs {want}"
                );
            }
        }
    }
}

/// f32 fixtures: logits within 1e-4 of the largest logit, weights within 1e-5. The bf16 fixture
/// stores bf16 weights that transformers computed with in f32, so the same tolerances hold.
fn check_fixture(name: &str, family: ModelFamily) {
    let (tol, weight_tol) = (1e-4, 1e-5);
    let dir = fixture_dir(name).join("model");
    assert_eq!(ModelDir::open(&dir).unwrap().plan.family, family);
    let cases = read_cases(name);
    for case in &cases {
        let mut engine = engine_for(&dir);
        let run = run_batched(&mut engine, std::slice::from_ref(case), usize::MAX);
        check(&format!("{name} alone"), case, &run[0], tol, weight_tol);
    }
    for (chunk, what) in [
        (usize::MAX, "batched"),
        (5, "batched, prefill in chunks of 5"),
    ] {
        let mut engine = engine_for(&dir);
        let runs = run_batched(&mut engine, &cases, chunk);
        for (case, run) in cases.iter().zip(&runs) {
            check(&format!("{name} {what}"), case, run, tol, weight_tol);
        }
    }
}

#[test]
fn mixtral_sharded_f32_matches_transformers() {
    check_fixture("mixtral_f32_sharded", ModelFamily::Mixtral);
}

/// A window of 6 tokens, shorter than every case's context: prefill chunks of 5 cross it, and
/// decoding runs 25 to 44 tokens past it.
#[test]
fn mixtral_sliding_window_f32_matches_transformers() {
    let name = "mixtral_swa_f32";
    let plan = ModelDir::open(&fixture_dir(name).join("model"))
        .unwrap()
        .plan;
    for layer in &plan.layers {
        assert_eq!(layer.attention.sliding_window.map(|w| w.get()), Some(6));
    }
    check_fixture(name, ModelFamily::Mixtral);
}

#[test]
fn qwen2_moe_f32_matches_transformers() {
    check_fixture("qwen2_moe_f32", ModelFamily::Qwen2Moe);
}

#[test]
fn qwen3_moe_bf16_matches_transformers() {
    check_fixture("qwen3_moe_bf16", ModelFamily::Qwen3Moe);
}

#[test]
fn olmoe_f32_matches_transformers() {
    check_fixture("olmoe_f32", ModelFamily::Olmoe);
}

#[test]
fn family_presets_load_and_generate_with_in_model_routes() {
    for (preset, family) in [
        (Preset::MixtralTiny, ModelFamily::Mixtral),
        (Preset::Qwen2MoeTiny, ModelFamily::Qwen2Moe),
        (Preset::Qwen3MoeTiny, ModelFamily::Qwen3Moe),
        (Preset::OlmoeTiny, ModelFamily::Olmoe),
    ] {
        let dir = tempfile::tempdir().unwrap();
        make_model(&preset.spec(), ExpertLayout::Fused, 3, dir.path()).unwrap();
        let model = ModelDir::open(dir.path()).unwrap();
        assert_eq!(model.plan.family, family, "{preset:?}");
        let mut engine = open_engine(&model, Device::Cpu).unwrap();
        assert_eq!(engine.router().kind(), pregate::router::RouterKind::InModel);
        engine.trace_routes(true).unwrap();
        let spec = preset.spec();
        let k = spec.config.experts_per_token();
        let renorm = spec.config.renormalize_top_k();
        let mut req = pregate::engine::GenerationRequest::greedy(vec![1, 17, 200, 33], 6);
        req.ignore_eos = true;
        engine.add_request(req).unwrap();
        let mut tokens = 0;
        while !engine.is_empty() {
            let out = engine.step(&engine.schedule_all()).unwrap();
            for chunk in &out.routes {
                for (l, routes) in chunk.layers.iter().enumerate() {
                    assert_eq!(
                        routes.is_empty(),
                        !spec.config.is_moe_layer(l),
                        "{preset:?}"
                    );
                    for r in routes {
                        assert_eq!(r.experts().len(), k);
                        let sum: f32 = r.weights().iter().sum();
                        assert!(r.weights().windows(2).all(|w| w[0] >= w[1]), "{r:?}");
                        match renorm {
                            true => assert!((sum - 1.0).abs() < 1e-5, "{preset:?}: {sum}"),
                            false => assert!(sum < 1.0 && sum > 0.0, "{preset:?}: {sum}"),
                        }
                    }
                }
            }
            tokens += out.into_events().unwrap().len();
        }
        assert_eq!(tokens, 6, "{preset:?}");
    }
}

/// A copy of fixture `name`'s model directory, rewritten by `edit` (see `common::rewrite`).
fn edited_fixture(
    name: &str,
    edit: impl Fn(
        &pregate::model::writer::TensorSpec,
        Vec<u8>,
    ) -> Option<(pregate::model::writer::TensorSpec, Vec<u8>)>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_dir(name).join("model");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    common::rewrite(dir.path(), edit);
    dir
}

fn open_err(dir: &Path) -> pregate::Error {
    let r = std::panic::catch_unwind(|| {
        ModelDir::open(dir).and_then(|m| open_engine(&m, Device::Cpu).map(|_| ()))
    });
    match r {
        Ok(Ok(())) => panic!("opened a bad model"),
        Ok(Err(e)) => e,
        Err(_) => panic!("the loader panicked"),
    }
}

#[test]
fn stacked_experts_as_transformers_v5_holds_them_give_the_same_results() {
    // Qwen3-MoE's per-expert tensors merged into `gate_up_proj [E, 2I, H]` (gate rows, then up
    // rows) and `down_proj [E, H, I]`, as transformers v5 keeps them in memory.
    let name = "qwen3_moe_bf16";
    let src = ModelDir::open(&fixture_dir(name).join("model")).unwrap();
    let experts = src.config.num_experts();
    let ck = &src.checkpoint;
    let bytes = |n: &str| ck.tensor(n).unwrap().data.to_vec();
    let per_expert =
        |l: usize, e: usize, p: &str| format!("model.layers.{l}.mlp.experts.{e}.{p}.weight");
    let dir = edited_fixture(name, |s, b| {
        let Some(rest) = s.name.strip_prefix("model.layers.") else {
            return Some((s.clone(), b));
        };
        let l: usize = rest.split('.').next().unwrap().parse().unwrap();
        if s.name == per_expert(l, 0, "gate_proj") {
            let mut data = Vec::new();
            for e in 0..experts {
                data.extend(bytes(&per_expert(l, e, "gate_proj")));
                data.extend(bytes(&per_expert(l, e, "up_proj")));
            }
            let (i, h) = (s.shape[0], s.shape[1]);
            let spec = pregate::model::writer::TensorSpec::new(
                format!("model.layers.{l}.mlp.experts.gate_up_proj"),
                s.dtype,
                vec![experts, 2 * i, h],
            );
            Some((spec, data))
        } else if s.name == per_expert(l, 0, "down_proj") {
            let data = (0..experts)
                .flat_map(|e| bytes(&per_expert(l, e, "down_proj")))
                .collect();
            let spec = pregate::model::writer::TensorSpec::new(
                format!("model.layers.{l}.mlp.experts.down_proj"),
                s.dtype,
                vec![experts, s.shape[0], s.shape[1]],
            );
            Some((spec, data))
        } else if s.name.contains(".mlp.experts.") {
            None
        } else {
            Some((s.clone(), b))
        }
    });
    let model = ModelDir::open(dir.path()).unwrap();
    assert_eq!(
        model.plan.expert_storage,
        pregate::model::family::ExpertStorage::Stacked
    );
    let cases = read_cases(name);
    let mut engine = engine_for(dir.path());
    let runs = run_batched(&mut engine, &cases, 5);
    for (case, run) in cases.iter().zip(&runs) {
        check(&format!("{name} stacked"), case, run, 1e-4, 1e-5);
    }
}

#[test]
fn a_missing_expert_names_its_layer_and_expert() {
    let gone = "model.layers.2.mlp.experts.3.up_proj.weight";
    let dir = edited_fixture("qwen2_moe_f32", |s, b| {
        (s.name != gone).then(|| (s.clone(), b))
    });
    let msg = open_err(dir.path()).to_string();
    assert!(
        msg.contains("layer 2, expert 3") && msg.contains(gone),
        "{msg}"
    );
}

#[test]
fn shapes_that_disagree_with_the_config_are_named() {
    // The router of layer 0 has 3 rows where the config says 4 experts.
    let gate = "model.layers.0.mlp.gate.weight";
    let dir = edited_fixture("qwen2_moe_f32", |s, b| {
        Some(match s.name == gate {
            true => {
                let row = b.len() / s.shape[0];
                let spec = pregate::model::writer::TensorSpec::new(gate, s.dtype, vec![3, 64]);
                (spec, b[..3 * row].to_vec())
            }
            false => (s.clone(), b),
        })
    });
    let msg = open_err(dir.path()).to_string();
    assert!(
        msg.contains("num_experts = 4") && msg.contains(gate),
        "{msg}"
    );
    // An expert's down projection of the wrong width: the tensor, expected and found shapes.
    let down = "model.layers.1.block_sparse_moe.experts.6.w2.weight";
    let dir = edited_fixture("mixtral_f32_sharded", |s, b| {
        Some(match s.name == down {
            true => {
                let spec = pregate::model::writer::TensorSpec::new(down, s.dtype, vec![32, 64]);
                (spec, b)
            }
            false => (s.clone(), b),
        })
    });
    match open_err(dir.path()) {
        pregate::Error::Shape {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, down);
            assert_eq!((expected, found), (vec![64, 32], vec![32, 64]));
        }
        e => panic!("{e}"),
    }
    // More experts in the checkpoint than the config has.
    let dir = edited_fixture("olmoe_f32", |s, b| Some((s.clone(), b)));
    let cfg_path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        text.replace("\"num_experts\": 8", "\"num_experts\": 6"),
    )
    .unwrap();
    let msg = open_err(dir.path()).to_string();
    assert!(msg.contains("num_experts = 6"), "{msg}");
    // A layer count far beyond the checkpoint's is named, by open and by inspect alike.
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let huge = text
        .replace("\"num_experts\": 6", "\"num_experts\": 8")
        .replace(
            "\"num_hidden_layers\": 2",
            "\"num_hidden_layers\": 1099511627776",
        );
    std::fs::write(&cfg_path, huge).unwrap();
    let msg = open_err(dir.path()).to_string();
    assert!(msg.contains("num_hidden_layers = 1099511627776"), "{msg}");
    let msg = pregate::model::inspect::inspect(dir.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("num_hidden_layers"), "{msg}");
}

#[test]
fn cuda_serves_these_families_or_is_refused_clearly_without_a_device() {
    let model = ModelDir::open(&fixture_dir("olmoe_f32").join("model")).unwrap();
    if pregate::cuda::cuda_available() {
        // A GPU host: the CUDA backend opens the family, and `auto` chooses it.
        let engine = open_engine(&model, Device::Cuda(0)).unwrap();
        assert_eq!(engine.device_name(), "cuda:0");
        let engine = open_engine(&model, Device::Auto).unwrap();
        assert_eq!(engine.device_name(), "cuda:0");
        return;
    }
    // No device: an explicit CUDA device is refused, naming it; `auto` falls back to the CPU.
    let err = open_engine(&model, Device::Cuda(0))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cuda") || err.contains("CUDA"), "{err}");
    let engine = open_engine(&model, Device::Auto).unwrap();
    assert_eq!(engine.device_name(), "cpu");
}

#[test]
fn the_step_driver_serves_an_in_model_router_with_an_expert_cache() {
    // The batcher (expert-aware, falling back to decode-first as no route is known ahead) and an
    // expert cache of 2 experts per layer (Belady, without next uses: LRU) around the CPU engine:
    // the tokens are still transformers' greedy ones, prefill chunked by the batcher.
    use pregate::batcher::{BatchPolicy, BatcherConfig, LookaheadBatcher, RequestDesc};
    use pregate::cache::EvictionPolicy;
    use pregate::engine::{
        EngineOptions, ExpertCacheOptions, ExpertCapacity, StepDriver, ViewOrder,
    };
    let name = "mixtral_f32_sharded";
    let model = ModelDir::open(&fixture_dir(name).join("model")).unwrap();
    let opts = EngineOptions {
        expert_cache: Some(ExpertCacheOptions {
            capacity: ExpertCapacity::PerLayer(2),
            policy: EvictionPolicy::Belady,
        }),
        ..EngineOptions::default()
    };
    let mut engine = pregate::engine::open_engine_with(&model, Device::Cpu, &opts).unwrap();
    let batcher = LookaheadBatcher::new(BatcherConfig {
        policy: BatchPolicy::ExpertAware,
        max_batch_tokens: 8,
        max_prefill_chunk: 4,
        ..BatcherConfig::default()
    })
    .unwrap();
    let mut driver = StepDriver::new(batcher, 4, ViewOrder::Admission);
    let cases = read_cases(name);
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); cases.len()];
    let mut ids = Vec::new();
    for case in &cases {
        let id = engine.add_request(request(case)).unwrap();
        driver
            .submit(RequestDesc {
                id,
                arrival: 0.0,
                prompt_len: case.prompt.len(),
                output_len: Some(case.output.len()),
                deadline: None,
                kv_bytes: 0,
            })
            .unwrap();
        ids.push(id);
    }
    let mut now = 0.0;
    while !engine.is_empty() {
        let plan = driver.schedule(&engine, now).unwrap();
        assert!(plan.experts.is_empty(), "no expert is known before a step");
        let out = driver.run(&mut engine, &plan).unwrap();
        driver.step_done(now, now + 1.0);
        now += 1.0;
        for ev in out.into_events().unwrap() {
            outputs[ids.iter().position(|&i| i == ev.seq).unwrap()].push(ev.token);
            if ev.finished.is_some() {
                driver.finish(ev.seq);
            }
        }
    }
    for (case, out) in cases.iter().zip(&outputs) {
        assert_eq!(out, &case.output, "{name} through the step driver");
    }
    let stats = engine.expert_cache().unwrap().stats();
    assert!(stats.misses > 0 && stats.evictions > 0, "{stats:?}");
}

#[test]
fn inspect_counts_the_families_experts_by_their_role() {
    // Qwen2-MoE fixture: MoE layers 0 and 2 (layer 1 dense), 4 experts of width 32 and a shared
    // expert of width 48 each, hidden 64; the dense MLP and the gates are not experts.
    let r = pregate::model::inspect::inspect(&fixture_dir("qwen2_moe_f32").join("model")).unwrap();
    let (h, routed, shared) = (64, 2 * 4 * 3 * 64 * 32, 2 * 3 * 64 * 48);
    assert_eq!(r.params.experts, routed + shared);
    // A token reads everything but the routed experts it is not sent to: of the routed ones, its
    // top-2 per MoE layer.
    let chosen = 2 * 2 * 3 * 64 * 32;
    assert_eq!(
        r.params.active_per_token,
        Some(r.params.total - routed + chosen)
    );
    assert_eq!(r.params.router, 0);
    // Mixtral names its experts `block_sparse_moe.experts.*`: counted too.
    let r = pregate::model::inspect::inspect(&fixture_dir("mixtral_f32_sharded").join("model"))
        .unwrap();
    assert_eq!(r.params.experts, 2 * 8 * 3 * h * 32);
}
