//! The engine with a router of its own kind (as the CUDA router is, with `--router device`): the
//! engine drives any [`Router`] the same way. Prompts are routed after the sequence is reserved,
//! each step's sampled tokens are routed in one pass, the routes and tokens equal the plain host
//! engine's, and a routing error loses nothing. The router here is the host router behind a
//! counting, failure-injecting wrapper, so the engine's side is checked without a GPU;
//! `gpu_engine.rs` checks the CUDA router itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use pregate::engine::cpu::{BackboneWeights, CpuBackend};
use pregate::engine::{open_engine, Device, Engine, GenerationRequest, SeqId};
use pregate::model::ModelDir;
use pregate::route::TokenRoute;
use pregate::router::{HostReadMeRouter, ReadMeRouter, Router, RouterKind};
use pregate::{Error, Result};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fused_f32/model")
}

/// The host router, counting its passes and the sequences it holds, failing on demand.
struct CountingRouter {
    inner: HostReadMeRouter,
    passes: Arc<AtomicUsize>,
    fail_next: Arc<AtomicBool>,
    /// Sequences holding router state.
    live: Arc<AtomicUsize>,
    open: std::collections::HashSet<SeqId>,
}

impl Router for CountingRouter {
    fn kind(&self) -> RouterKind {
        self.inner.kind()
    }
    fn num_experts(&self) -> usize {
        self.inner.num_experts()
    }
    fn top_k(&self) -> usize {
        self.inner.top_k()
    }
    fn placement(&self) -> String {
        "counting-test".into()
    }
    fn open(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        self.inner.open(seq, max_len)?;
        self.open.insert(seq);
        self.live.store(self.open.len(), Ordering::SeqCst);
        Ok(())
    }
    fn close(&mut self, seq: SeqId) {
        self.inner.close(seq);
        self.open.remove(&seq);
        self.live.store(self.open.len(), Ordering::SeqCst);
    }
    fn route(&mut self, seqs: &[SeqId], tokens: &[&[u32]]) -> Result<Vec<Vec<TokenRoute>>> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(Error::Device("injected router failure".into()));
        }
        self.passes.fetch_add(1, Ordering::SeqCst);
        self.inner.route(seqs, tokens)
    }
}

fn router(m: &ModelDir) -> ReadMeRouter {
    ReadMeRouter::new(m.load_weights().unwrap().router, &m.config)
}

struct Handles {
    passes: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
}

fn routing_engine() -> (Engine, Handles) {
    let m = ModelDir::open(&model()).unwrap();
    let (backbone, _) = BackboneWeights::split(m.load_weights().unwrap());
    let passes = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(false));
    let live = Arc::new(AtomicUsize::new(0));
    let router = CountingRouter {
        inner: HostReadMeRouter::new(router(&m)),
        passes: passes.clone(),
        fail_next: fail.clone(),
        live: live.clone(),
        open: Default::default(),
    };
    let backend = CpuBackend::new(m.config.clone(), backbone).unwrap();
    let h = Handles { passes, fail, live };
    (Engine::new(Box::new(backend), Box::new(router)), h)
}

fn req(prompt: &[u32], n: usize) -> GenerationRequest {
    let mut r = GenerationRequest::greedy(prompt.to_vec(), n);
    r.ignore_eos = true;
    r
}

/// Every event (sequence, token, experts) of a run where requests join at given steps.
fn run(e: &mut Engine, passes: Option<&AtomicUsize>) -> Vec<(u64, u32, Vec<u16>)> {
    let prompts: [(&[u32], usize, usize); 3] = [
        (&[5, 17, 29, 41, 53], 9, 0),
        (&[300, 7], 6, 0),
        (&[64, 65, 66, 67, 68, 69, 70], 5, 2),
    ];
    let mut out = Vec::new();
    let mut step = 0;
    loop {
        for &(p, n, at) in &prompts {
            if at == step {
                e.add_request(req(p, n)).unwrap();
            }
        }
        if e.is_empty() && step > 2 {
            break;
        }
        let s = e.schedule_all();
        let before = passes.map(|p| p.load(Ordering::SeqCst));
        let events = e.step(&s).unwrap().into_events().unwrap();
        if let (Some(p), Some(b)) = (passes, before) {
            // All of a step's sampled tokens are routed in one pass.
            assert_eq!(p.load(Ordering::SeqCst), b + 1, "step {step}");
        }
        for ev in events {
            out.push((
                ev.seq,
                ev.token,
                ev.route
                    .expect("a pre-gate router's route")
                    .experts()
                    .to_vec(),
            ));
        }
        step += 1;
    }
    out
}

#[test]
fn a_routers_routes_equal_the_host_engines_and_are_batched_per_step() {
    let mut host = open_engine(&ModelDir::open(&model()).unwrap(), Device::Cpu).unwrap();
    let expected = run(&mut host, None);
    let (mut dev, h) = routing_engine();
    let got = run(&mut dev, Some(&h.passes));
    assert_eq!(got.len(), 9 + 6 + 5);
    assert_eq!(got, expected);
    // Finished sequences released their router state.
    assert_eq!(h.live.load(Ordering::SeqCst), 0);
}

#[test]
fn a_routing_error_admits_nothing_and_loses_nothing() {
    let (mut e, h) = routing_engine();
    let (passes, fail) = (&h.passes, &h.fail);
    let a = e.add_request(req(&[1, 2, 3], 4)).unwrap();
    fail.store(true, Ordering::SeqCst);
    let err = e.add_request(req(&[4, 5], 4)).unwrap_err().to_string();
    assert!(err.contains("injected router failure"), "{err}");
    assert_eq!(e.len(), 1);
    assert_eq!(
        h.live.load(Ordering::SeqCst),
        1,
        "the failed request kept its reservation"
    );
    // The failed request's reservation was released: a new one is admitted and both complete.
    let b = e.add_request(req(&[4, 5], 4)).unwrap();
    let mut done = HashMap::new();
    while !e.is_empty() {
        let s = e.schedule_all();
        for ev in e.step(&s).unwrap().into_events().unwrap() {
            *done.entry(ev.seq).or_insert(0) += 1;
        }
    }
    assert_eq!(done[&a], 4);
    assert_eq!(done[&b], 4);
    assert!(passes.load(Ordering::SeqCst) >= 2 + 3);
    // A sequence whose routing fails fails alone, not with a panic, and is gone with its router
    // state.
    let c = e.add_request(req(&[9, 9, 9], 3)).unwrap();
    fail.store(true, Ordering::SeqCst);
    let s = e.schedule_all();
    let out = e.step(&s).unwrap();
    assert!(out.events.is_empty());
    assert_eq!(out.failed.len(), 1);
    assert_eq!(out.failed[0].0, c);
    let err = out.failed[0].1.to_string();
    assert!(err.contains("injected router failure"), "{err}");
    assert!(!e.remove(c));
    assert_eq!(h.live.load(Ordering::SeqCst), 0);
}

#[test]
fn a_failed_routing_pass_is_retried_per_sequence() {
    // The batched pass fails once; each sequence routed alone then succeeds, so nobody fails and
    // the tokens and routes are those of a run without the failure.
    let (mut clean, _) = routing_engine();
    let want = run(&mut clean, None);
    let (mut e, h) = routing_engine();
    let mut got = Vec::new();
    let mut step = 0;
    let prompts: [(&[u32], usize); 2] = [(&[5, 17, 29, 41, 53], 9), (&[300, 7], 6)];
    for (p, n) in prompts {
        e.add_request(req(p, n)).unwrap();
    }
    while !e.is_empty() {
        if step == 1 {
            h.fail.store(true, Ordering::SeqCst);
        }
        let s = e.schedule_all();
        let out = e.step(&s).unwrap();
        assert!(out.failed.is_empty(), "{:?}", out.failed);
        for ev in out.events {
            got.push((
                ev.seq,
                ev.token,
                ev.route
                    .expect("a pre-gate router's route")
                    .experts()
                    .to_vec(),
            ));
        }
        step += 1;
    }
    let first_two: Vec<_> = want.iter().filter(|w| w.0 <= 2).cloned().collect();
    assert_eq!(got.len(), 9 + 6);
    // The third request of `run` joins at step 2 and does not change the others' tokens.
    assert_eq!(got, first_two[..got.len()].to_vec());
}
