//! One sequence's failure stays its own: a sequence whose logits are NaN fails with a
//! [`Error::ModelData`] error and leaves the engine, and the other sequences of the same steps
//! produce exactly the tokens they produce without it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pregate::config::ModelConfig;
use pregate::engine::cpu::{BackboneWeights, CpuBackend};
use pregate::engine::{Backend, Engine, ForwardChunk, GenerationRequest, SeqId};
use pregate::error::ErrorCode;
use pregate::model::ModelDir;
use pregate::router::{HostReadMeRouter, ReadMeRouter};
use pregate::{Error, Result};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fused_f32/model")
}

/// The CPU backend, except that the logits of one sequence (0: none) are NaN.
struct Poison {
    inner: CpuBackend,
    seq: Arc<AtomicU64>,
}

impl Backend for Poison {
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn add_sequence(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        self.inner.add_sequence(seq, max_len)
    }
    fn remove_sequence(&mut self, seq: SeqId) {
        self.inner.remove_sequence(seq)
    }
    fn forward(&mut self, chunks: &[ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        let mut rows = self.inner.forward(chunks)?;
        let bad = self.seq.load(Ordering::SeqCst);
        let with_logits = chunks.iter().filter(|c| c.want_logits);
        for (c, row) in with_logits.zip(rows.iter_mut()) {
            if c.seq == bad {
                row[3] = f32::NAN;
            }
        }
        Ok(rows)
    }
}

fn engine(poisoned: SeqId) -> Engine {
    let m = ModelDir::open(&model()).unwrap();
    let router = ReadMeRouter::new(m.load_weights().unwrap().router, &m.config);
    let (backbone, _) = BackboneWeights::split(m.load_weights().unwrap());
    let backend = Poison {
        inner: CpuBackend::new(m.config.clone(), backbone).unwrap(),
        seq: Arc::new(AtomicU64::new(poisoned)),
    };
    Engine::new(Box::new(backend), Box::new(HostReadMeRouter::new(router)))
}

fn req(prompt: &[u32], n: usize) -> GenerationRequest {
    let mut r = GenerationRequest::greedy(prompt.to_vec(), n);
    r.ignore_eos = true;
    r
}

type Run = (HashMap<SeqId, Vec<u32>>, Vec<(SeqId, Error)>);

/// Runs `prompts` together to the end: every sequence's tokens, and the failures.
fn run(e: &mut Engine, prompts: &[(&[u32], usize)]) -> Run {
    let ids: Vec<SeqId> = prompts
        .iter()
        .map(|(p, n)| e.add_request(req(p, *n)).unwrap())
        .collect();
    let mut tokens: HashMap<SeqId, Vec<u32>> = ids.iter().map(|&id| (id, Vec::new())).collect();
    let mut failed = Vec::new();
    while !e.is_empty() {
        let s = e.schedule_all();
        let out = e.step(&s).unwrap();
        for ev in out.events {
            tokens.get_mut(&ev.seq).unwrap().push(ev.token);
        }
        failed.extend(out.failed);
    }
    (tokens, failed)
}

const PROMPTS: [(&[u32], usize); 3] = [(&[5, 17, 29, 41], 6), (&[300, 7], 5), (&[64, 65, 66], 7)];

#[test]
fn a_sequence_with_nan_logits_fails_alone() {
    // Sequence ids are given in admission order from 1: the second request is poisoned.
    let (clean, none) = run(&mut engine(0), &PROMPTS);
    assert!(none.is_empty());
    let mut e = engine(2);
    let (tokens, failed) = run(&mut e, &PROMPTS);
    assert_eq!(failed.len(), 1, "{failed:?}");
    let (seq, err) = &failed[0];
    assert_eq!(*seq, 2);
    assert!(matches!(err, Error::ModelData(_)), "{err:?}");
    assert_eq!(err.code(), ErrorCode::ModelData);
    assert!(
        tokens[&2].is_empty(),
        "the poisoned sequence produced no token"
    );
    for id in [1, 3] {
        assert_eq!(tokens[&id], clean[&id], "sequence {id}");
        assert_eq!(tokens[&id].len(), PROMPTS[id as usize - 1].1);
    }
    // Gone from the engine: it holds no KV space or routes and cannot be removed again.
    assert!(e.is_empty());
    assert!(e.routes(2).is_none());
    assert!(!e.remove(2));
}

#[test]
fn a_sequence_poisoned_mid_decode_keeps_the_tokens_it_had() {
    let (clean, _) = run(&mut engine(0), &PROMPTS);
    let poisoned = Arc::new(AtomicU64::new(0));
    let m = ModelDir::open(&model()).unwrap();
    let router = ReadMeRouter::new(m.load_weights().unwrap().router, &m.config);
    let (backbone, _) = BackboneWeights::split(m.load_weights().unwrap());
    let backend = Poison {
        inner: CpuBackend::new(m.config.clone(), backbone).unwrap(),
        seq: poisoned.clone(),
    };
    let mut e = Engine::new(Box::new(backend), Box::new(HostReadMeRouter::new(router)));
    for (p, n) in PROMPTS {
        e.add_request(req(p, n)).unwrap();
    }
    let mut tokens: HashMap<SeqId, Vec<u32>> = HashMap::new();
    let mut failed = Vec::new();
    let mut step = 0;
    while !e.is_empty() {
        if step == 2 {
            poisoned.store(3, Ordering::SeqCst);
        }
        let out = e.step(&e.schedule_all()).unwrap();
        for ev in out.events {
            tokens.entry(ev.seq).or_default().push(ev.token);
        }
        failed.extend(out.failed);
        step += 1;
    }
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, 3);
    assert_eq!(failed[0].1.code(), ErrorCode::ModelData);
    // Two tokens (steps 0 and 1) before the poisoned step, then nothing.
    assert_eq!(tokens[&3], clean[&3][..2]);
    assert_eq!(tokens[&1], clean[&1]);
    assert_eq!(tokens[&2], clean[&2]);
}
