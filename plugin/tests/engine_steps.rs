//! The engine's step interface as a continuous-batching scheduler drives it: sequences join and
//! leave between steps, stop conditions, seeded sampling, and every misuse reported as an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pregate::engine::{open_engine, Device, Engine, FinishReason, GenerationRequest};
use pregate::model::ModelDir;
use pregate::sampling::SamplingParams;
use pregate::Error;

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fused_f32/model")
}

fn engine() -> Engine {
    open_engine(&ModelDir::open(&model()).unwrap(), Device::Cpu).unwrap()
}

fn req(prompt: &[u32], n: usize) -> GenerationRequest {
    let mut r = GenerationRequest::greedy(prompt.to_vec(), n);
    r.ignore_eos = true;
    r
}

/// Runs `steps` of schedule_all, collecting tokens per sequence.
fn drain(e: &mut Engine, out: &mut HashMap<u64, Vec<u32>>) {
    while !e.is_empty() {
        let s = e.schedule_all();
        for ev in e.step(&s).unwrap().into_events().unwrap() {
            out.entry(ev.seq).or_default().push(ev.token);
        }
    }
}

fn solo(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut e = engine();
    let id = e.add_request(req(prompt, n)).unwrap();
    let mut out = HashMap::new();
    drain(&mut e, &mut out);
    out.remove(&id).unwrap()
}

#[test]
fn sequences_joining_and_leaving_between_steps_do_not_disturb_each_other() {
    let (pa, pb, pc) = (vec![5, 9, 13, 200], vec![42], vec![7, 7, 7, 300, 301, 302]);
    let mut e = engine();
    let a = e.add_request(req(&pa, 12)).unwrap();
    let c = e.add_request(req(&pc, 12)).unwrap();
    let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
    for step in 0..6 {
        if step == 3 {
            // b joins mid-flight; c is cancelled.
            let b = e.add_request(req(&pb, 10)).unwrap();
            assert_eq!(b, 3);
            assert!(e.remove(c));
            assert!(!e.remove(c));
        }
        let s = e.schedule_all();
        assert!(s.iter().all(|&(seq, _)| seq != c || step < 3));
        for ev in e.step(&s).unwrap().into_events().unwrap() {
            out.entry(ev.seq).or_default().push(ev.token);
        }
    }
    drain(&mut e, &mut out);
    assert_eq!(out[&a], solo(&pa, 12));
    assert_eq!(out[&3], solo(&pb, 10));
    assert_eq!(out[&c].len(), 3, "the cancelled sequence stopped");
    assert!(e.is_empty());
}

#[test]
fn stop_ids_eos_and_length_end_sequences() {
    let prompt = [11u32, 22, 33];
    let greedy = solo(&prompt, 8);
    let mut e = engine();
    let mut r = req(&prompt, 8);
    r.stop_token_ids = vec![greedy[2]];
    let first = greedy.iter().position(|&t| t == greedy[2]).unwrap();
    let id = e.add_request(r).unwrap();
    let mut last = None;
    let mut n = 0;
    while !e.is_empty() {
        let s = e.schedule_all();
        for ev in e.step(&s).unwrap().into_events().unwrap() {
            assert_eq!(ev.seq, id);
            n += 1;
            last = ev.finished;
        }
    }
    assert_eq!(n, first + 1);
    assert_eq!(last, Some(FinishReason::Stop));
    // Without ignore_eos, an EOS id (2 in the fixture) ends the sequence; a length limit otherwise.
    let mut e = engine();
    e.add_request(GenerationRequest::greedy(prompt.to_vec(), 5))
        .unwrap();
    let mut reasons = vec![];
    while !e.is_empty() {
        let s = e.schedule_all();
        reasons.extend(
            e.step(&s)
                .unwrap()
                .into_events()
                .unwrap()
                .into_iter()
                .filter_map(|ev| ev.finished),
        );
    }
    assert_eq!(reasons.len(), 1);
    assert!(matches!(
        reasons[0],
        FinishReason::Length | FinishReason::Eos
    ));
}

#[test]
fn seeded_sampling_is_reproducible_and_differs_across_seeds() {
    let run = |seed: u64| {
        let mut e = engine();
        let mut r = req(&[100, 101, 102], 24);
        r.sampling = SamplingParams {
            temperature: 1.5,
            top_k: 50,
            top_p: 0.95,
            seed: Some(seed),
        };
        let id = e.add_request(r).unwrap();
        let mut out = HashMap::new();
        drain(&mut e, &mut out);
        out.remove(&id).unwrap()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    // Sequences are sampled in parallel, each from its own stream: a seeded request gives the same
    // tokens alone and beside others with other seeds and settings.
    let mut e = engine();
    let mut ids = Vec::new();
    for (i, seed) in [7u64, 8, 9, 10, 11, 12].into_iter().enumerate() {
        let mut r = req(&[100, 101, 102], 24);
        r.sampling = SamplingParams {
            temperature: 1.5,
            top_k: if i % 2 == 0 { 50 } else { 0 },
            top_p: 0.95,
            seed: Some(seed),
        };
        ids.push(e.add_request(r).unwrap());
    }
    let mut out = HashMap::new();
    drain(&mut e, &mut out);
    assert_eq!(out[&ids[0]], run(7));
}

#[test]
fn misuse_is_an_error_and_changes_nothing() {
    let mut e = engine();
    let ctx = e.config().max_context();
    let vocab = e.config().vocab_size as u32;
    let cases: Vec<(GenerationRequest, &str)> = vec![
        (req(&[], 4), "empty"),
        (req(&[1, vocab], 4), "outside the vocabulary"),
        (req(&[1, 2], 0), "max_new_tokens"),
        (req(&vec![5; ctx], 1), "exceeds the context"),
        (req(&[5; 4], ctx), "exceeds the context"),
        (
            GenerationRequest {
                sampling: SamplingParams {
                    temperature: -1.0,
                    ..SamplingParams::greedy()
                },
                ..req(&[5], 2)
            },
            "temperature",
        ),
    ];
    for (r, needle) in cases {
        let err = e.add_request(r).unwrap_err();
        assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    }
    assert!(e.is_empty());
    let id = e.add_request(req(&[5, 6, 7], 3)).unwrap();
    for bad in [
        vec![(id, 0)],
        vec![(id, 4)],
        vec![(id, 1), (id, 1)],
        vec![(99, 1)],
    ] {
        assert!(e.step(&bad).is_err(), "{bad:?}");
    }
    // Chunked prefill still works after the rejected schedules: nothing advanced.
    assert_eq!(e.pending().next().unwrap().tokens.len(), 3);
    assert!(e.step(&[(id, 2)]).unwrap().events.is_empty());
    let evs = e.step(&[(id, 1)]).unwrap().into_events().unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].token, solo(&[5, 6, 7], 3)[0]);
}

#[test]
fn the_router_kv_cache_gives_the_routes_of_a_full_recompute() {
    let model = ModelDir::open(&model()).unwrap();
    let w = model.load_weights().unwrap();
    let router = pregate::router::ReadMeRouter::new(w.router, &model.config);
    let tokens: Vec<u32> = (0..40).map(|i| 3 + (i * 37 % 380) as u32).collect();
    // All at once (a prompt), then one token at a time (decode), then in uneven chunks.
    let mut whole = router.new_state(64);
    let all = router.logits(&mut whole, &tokens).unwrap();
    let mut step = router.new_state(64);
    let mut one_by_one = Vec::new();
    for t in &tokens {
        one_by_one.extend(router.logits(&mut step, std::slice::from_ref(t)).unwrap());
    }
    let mut chunked_state = router.new_state(64);
    let mut chunked = Vec::new();
    for c in tokens.chunks(7) {
        chunked.extend(router.logits(&mut chunked_state, c).unwrap());
    }
    for other in [&one_by_one, &chunked] {
        let diff = all
            .iter()
            .zip(other.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "incremental router logits differ by {diff}");
    }
    assert_eq!(step.len(), tokens.len());
    // The router's context is bounded by max_position_embeddings_predictor.
    let ctx = model
        .config
        .router_config()
        .unwrap()
        .max_position_embeddings_predictor;
    let mut full = router.new_state(ctx);
    let too_long = vec![5u32; ctx + 1];
    let err = router.logits(&mut full, &too_long).unwrap_err().to_string();
    assert!(err.contains("router's context"), "{err}");
}

#[test]
fn routing_several_requests_in_one_pass_equals_routing_each_alone() {
    let model = ModelDir::open(&model()).unwrap();
    let w = model.load_weights().unwrap();
    let router = pregate::router::ReadMeRouter::new(w.router, &model.config);
    // Three requests with different histories; the batch mixes a prompt chunk and decode tokens.
    let history: [Vec<u32>; 3] = [
        (0..9).map(|i| 7 + i * 11).collect(),
        Vec::new(),
        (0..23).map(|i| 300 - i * 5).collect(),
    ];
    let new: [Vec<u32>; 3] = [vec![42], (0..6).map(|i| 100 + i).collect(), vec![9]];
    let mut alone = Vec::new();
    let mut batched_states = Vec::new();
    for (h, n) in history.iter().zip(&new) {
        let mut s = router.new_state(64);
        if !h.is_empty() {
            router.logits(&mut s, h).unwrap();
        }
        batched_states.push(s.clone());
        alone.push(router.logits(&mut s, n).unwrap());
    }
    let mut refs: Vec<&mut pregate::router::RouterState> = batched_states.iter_mut().collect();
    let lists: Vec<&[u32]> = new.iter().map(Vec::as_slice).collect();
    let batched = router.logits_batch(&mut refs, &lists).unwrap();
    let expected: Vec<f32> = alone.concat();
    assert_eq!(batched.len(), expected.len());
    let diff = batched
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "batched router logits differ by {diff}");
    for (s, (h, n)) in batched_states.iter().zip(history.iter().zip(&new)) {
        assert_eq!(s.len(), h.len() + n.len());
    }
    // Routes: one list per request, as many routes as new tokens, equal to routing alone.
    let mut states: Vec<_> = history
        .iter()
        .map(|h| {
            let mut s = router.new_state(64);
            router.route(&mut s, h).unwrap();
            s
        })
        .collect();
    let solo: Vec<_> = states
        .iter()
        .zip(&new)
        .map(|(s, n)| router.route(&mut s.clone(), n).unwrap())
        .collect();
    let mut refs: Vec<&mut pregate::router::RouterState> = states.iter_mut().collect();
    assert_eq!(router.route_batch(&mut refs, &lists).unwrap(), solo);
    // A bad token in the last request fails the batch before any state advances.
    let mut states: Vec<_> = (0..3).map(|_| router.new_state(64)).collect();
    let mut refs: Vec<&mut pregate::router::RouterState> = states.iter_mut().collect();
    let vocab = model.config.vocab_size as u32;
    let bad: [&[u32]; 3] = [&[1, 2], &[3], &[4, vocab]];
    let err = router
        .logits_batch(&mut refs, &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert!(states.iter().all(|s| s.is_empty()));
}
