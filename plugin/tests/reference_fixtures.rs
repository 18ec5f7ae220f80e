//! The engine against the independent NumPy reference (tests/reference): logits, greedy tokens and
//! the router's experts of every token, for every expert layout, alone and batched.

mod common;

use std::path::Path;

use common::fixtures::{check_tokens_and_logits, fixture_dir, read_cases, request, Case};
use pregate::engine::{open_engine, Device, Engine};
use pregate::model::ModelDir;

struct Run {
    output: Vec<u32>,
    logits: Vec<f32>,
    experts: Vec<(Vec<u16>, Vec<f32>)>,
}

/// Runs `cases` together in one engine; `chunk` caps the prompt tokens scheduled per step.
fn run_batched(engine: &mut Engine, cases: &[Case], chunk: usize) -> Vec<Run> {
    let ids: Vec<u64> = cases
        .iter()
        .map(|c| engine.add_request(request(c)).unwrap())
        .collect();
    let mut runs: Vec<Run> = ids
        .iter()
        .map(|&id| {
            let plan = engine.routes(id).unwrap();
            Run {
                output: vec![],
                logits: vec![],
                experts: (0..plan.len())
                    .map(|t| {
                        let r = plan.route(t, 0);
                        (r.experts().to_vec(), r.weights().to_vec())
                    })
                    .collect(),
            }
        })
        .collect();
    while !engine.is_empty() {
        let schedule: Vec<(u64, usize)> = engine
            .pending()
            .map(|p| (p.seq, p.tokens.len().min(chunk)))
            .collect();
        for ev in engine.step(&schedule).unwrap().into_events().unwrap() {
            let run = &mut runs[ids.iter().position(|&i| i == ev.seq).unwrap()];
            run.output.push(ev.token);
            run.logits.extend(ev.logits.unwrap());
            run.experts.push({
                let r = ev.route.expect("a pre-gate router's route");
                (r.experts().to_vec(), r.weights().to_vec())
            });
        }
    }
    runs
}

fn check(name: &str, case: &Case, run: &Run) {
    check_tokens_and_logits(name, case, &run.output, &run.logits, 1e-4);
    assert_eq!(run.experts.len(), case.fed(), "{name}");
    for (t, (experts, weights)) in run.experts.iter().enumerate() {
        let want: Vec<u16> = case.experts_at(0, t).iter().map(|&e| e as u16).collect();
        assert_eq!(experts, &want, "{name}: experts of token {t}");
        for (w, r) in weights.iter().zip(case.weights_at(0, t)) {
            assert!(
                (w - r).abs() < 1e-5,
                "{name}: weight of token {t}: {w} vs {r}"
            );
        }
    }
}

fn engine_for(dir: &Path) -> Engine {
    let model = ModelDir::open(dir).unwrap();
    open_engine(&model, Device::Cpu).unwrap()
}

fn check_fixture(name: &str, model_dir: &Path) {
    let cases = read_cases(name);
    // One request at a time, whole prompt in one step.
    for case in &cases {
        let mut engine = engine_for(model_dir);
        let run = run_batched(&mut engine, std::slice::from_ref(case), usize::MAX);
        check(name, case, &run[0]);
    }
    // All cases batched together, prompts chunked into steps of 5 tokens.
    let mut engine = engine_for(model_dir);
    let runs = run_batched(&mut engine, &cases, 5);
    for (case, run) in cases.iter().zip(&runs) {
        check(name, case, run);
    }
}

#[test]
fn fused_f32_matches_the_reference() {
    check_fixture("fused_f32", &fixture_dir("fused_f32").join("model"));
}

#[test]
fn residual_bf16_sharded_matches_the_reference() {
    check_fixture(
        "residual_bf16_sharded",
        &fixture_dir("residual_bf16_sharded").join("model"),
    );
}

#[test]
fn masked_f16_converted_to_both_split_layouts_matches_the_reference() {
    use pregate::model::weights::ExpertLayout;
    let src = fixture_dir("masked_f16").join("model");
    // The training layout itself is refused with a pointer to `pregate convert`.
    let err = ModelDir::open(&src)
        .and_then(|m| m.load_weights().map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("convert"), "{err}");
    for layout in [ExpertLayout::Fused, ExpertLayout::Residual] {
        let out = tempfile::tempdir().unwrap();
        pregate::model::convert::convert(&src, out.path(), layout, None, None).unwrap();
        assert_eq!(ModelDir::open(out.path()).unwrap().layout, layout);
        check_fixture("masked_f16", out.path());
    }
}
