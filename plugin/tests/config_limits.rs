//! Configs with huge context lengths load and generate at once: nothing is sized by the context
//! length until a sequence uses it.

use std::path::Path;
use std::time::{Duration, Instant};

use pregate::engine::{open_engine, Device};
use pregate::model::{make_model, ExpertLayout, ModelDir, Preset};
use pregate::GenerationRequest;

/// A tiny model whose config claims `positions` positions for the backbone and the router.
fn tiny_with_context(positions: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_model(&Preset::Tiny.spec(), ExpertLayout::Fused, 1, dir.path()).unwrap();
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = positions.into();
    cfg["max_position_embeddings_predictor"] = positions.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

fn generate(dir: &Path, prompt: &[u32], n: usize) -> Vec<u32> {
    let m = ModelDir::open(dir).unwrap();
    let mut e = open_engine(&m, Device::Cpu).unwrap();
    let mut req = GenerationRequest::greedy(prompt.to_vec(), n);
    req.ignore_eos = true;
    e.add_request(req).unwrap();
    let mut out = Vec::new();
    while !e.is_empty() {
        let s = e.schedule_all();
        out.extend(
            e.step(&s)
                .unwrap()
                .into_events()
                .unwrap()
                .into_iter()
                .map(|ev| ev.token),
        );
    }
    out
}

fn generates_quickly_with(positions: u64) {
    let reference = generate(tiny_with_context(4096).path(), &[1, 7, 9], 3);
    let d = tiny_with_context(positions);
    let t = Instant::now();
    let out = generate(d.path(), &[1, 7, 9], 3);
    let took = t.elapsed();
    // The context length changes no position the sequence uses, so not the tokens either.
    assert_eq!(out, reference);
    // Loading the tiny model and three steps take milliseconds; a table of every position took
    // a minute at 2^28 and aborted at 2^32.
    assert!(
        took < Duration::from_secs(10),
        "{positions} positions: {took:?}"
    );
}

#[test]
fn a_context_of_2_pow_32_positions_loads_and_generates() {
    generates_quickly_with(1 << 32);
}

#[test]
fn a_context_of_2_pow_28_positions_loads_and_generates() {
    generates_quickly_with(1 << 28);
}

#[test]
fn a_request_for_a_huge_generation_reserves_nothing_up_front() {
    let d = tiny_with_context(1 << 40);
    let m = ModelDir::open(d.path()).unwrap();
    let mut e = open_engine(&m, Device::Cpu).unwrap();
    let mut req = GenerationRequest::greedy(vec![1, 7, 9], 1 << 36);
    req.ignore_eos = true;
    e.add_request(req).unwrap();
    let s = e.schedule_all();
    assert_eq!(e.step(&s).unwrap().into_events().unwrap().len(), 1);
}
