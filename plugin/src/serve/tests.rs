use std::sync::mpsc;

use super::*;
use crate::batcher::BatcherConfig;
use crate::engine::Lookahead;
use crate::engine::{open_engine, Device};
use crate::model::{make_model, ExpertLayout, ModelDir, Preset};
use crate::route::RoutePlan;

enum Ev {
    Tok(TokenDelta),
    Done(Completion),
}

struct ChanSink {
    tx: mpsc::Sender<Ev>,
    stop_after: Option<usize>,
}

impl ResponseSink for ChanSink {
    fn token(&mut self, d: &TokenDelta) -> bool {
        let _ = self.tx.send(Ev::Tok(d.clone()));
        self.stop_after.is_none_or(|n| d.index + 1 < n)
    }
    fn finish(&mut self, done: Completion) {
        let _ = self.tx.send(Ev::Done(done));
    }
}

/// A [`ChanSink`] whose first token waits for the test's signal (then lets the rest through).
struct GateSink {
    inner: ChanSink,
    gate: Option<mpsc::Receiver<()>>,
}

impl ResponseSink for GateSink {
    fn token(&mut self, d: &TokenDelta) -> bool {
        let keep = self.inner.token(d);
        if let Some(g) = self.gate.take() {
            let _ = g.recv_timeout(Duration::from_secs(60));
        }
        keep
    }
    fn finish(&mut self, done: Completion) {
        self.inner.finish(done);
    }
}

fn tiny() -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    make_model(&Preset::Tiny.spec(), ExpertLayout::Fused, 0, dir.path()).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    (dir, m)
}

fn server(m: &ModelDir) -> Server {
    let engine = open_engine(m, Device::Cpu).unwrap();
    Server::start(engine, m.tokenizer.clone(), ServeConfig::default()).unwrap()
}

fn collect(rx: &mpsc::Receiver<Ev>) -> (Vec<TokenDelta>, Completion) {
    let mut toks = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            Ev::Tok(t) => toks.push(t),
            Ev::Done(d) => return (toks, d),
        }
    }
}

fn submit(s: &Server, req: ServeRequest, stop_after: Option<usize>) -> mpsc::Receiver<Ev> {
    let (tx, rx) = mpsc::channel();
    s.submit(req, Box::new(ChanSink { tx, stop_after }));
    rx
}

/// The reference: the engine alone, one request, `schedule_all`.
fn reference(m: &ModelDir, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut e = open_engine(m, Device::Cpu).unwrap();
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

#[test]
fn concurrent_requests_match_the_engine_alone_and_are_batched() {
    let (_d, m) = tiny();
    let s = server(&m);
    let tok = m.tokenizer.clone().unwrap();
    let prompts = [
        "Once upon a time",
        "The capital of France",
        "a",
        "experts and routers",
    ];
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = ServeRequest::greedy(
                Prompt::Text {
                    text: p.to_string(),
                    add_bos: true,
                },
                4 + 3 * i,
            );
            r.ignore_eos = true;
            submit(&s, r, None)
        })
        .collect();
    for (i, rx) in rxs.iter().enumerate() {
        let (toks, done) = collect(rx);
        let ids = tok.encode(prompts[i], true).unwrap();
        let want = reference(&m, &ids, 4 + 3 * i);
        assert_eq!(toks.iter().map(|t| t.token).collect::<Vec<_>>(), want);
        assert!(matches!(
            done.outcome,
            Outcome::Finished(FinishReason::Length)
        ));
        assert_eq!(done.generated, want.len());
        let text: String = toks.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(text, tok.decode(&want).unwrap());
        assert_eq!(toks.last().unwrap().finish, Some(FinishReason::Length));
    }
    let st = s.stats();
    assert_eq!(st.finished, 4);
    assert!(st.max_step_requests >= 2, "{st:?}");
}

#[test]
fn invalid_cancelled_and_stopped_requests_all_get_a_final_event() {
    let (_d, m) = tiny();
    let s = server(&m);
    // Beyond the context.
    let ctx = s.max_context();
    let rx = submit(&s, ServeRequest::greedy(Prompt::Ids(vec![1, 5]), ctx), None);
    let (toks, done) = collect(&rx);
    assert!(toks.is_empty());
    match done.outcome {
        Outcome::Failed(e) => assert!(e.to_string().contains("context"), "{e}"),
        o => panic!("{o:?}"),
    }
    // The sink says the client is gone after 2 tokens.
    let mut r = ServeRequest::greedy(Prompt::Ids(vec![1, 5, 6]), 50);
    r.ignore_eos = true;
    let (toks, done) = collect(&submit(&s, r.clone(), Some(2)));
    assert_eq!(toks.len(), 2);
    assert!(matches!(done.outcome, Outcome::Cancelled));
    // Cancelled through the handle, while the first token is being delivered: the sink holds
    // the loop until the test has cancelled, so the loop's next check must see it.
    let (tx, rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let h = s.submit(
        r.clone(),
        Box::new(GateSink {
            inner: ChanSink {
                tx,
                stop_after: None,
            },
            gate: Some(go_rx),
        }),
    );
    let first = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(matches!(first, Ev::Tok(_)));
    h.cancel();
    go_tx.send(()).unwrap();
    let (toks, done) = collect(&rx);
    assert!(toks.is_empty(), "{} tokens after the cancel", toks.len());
    assert!(matches!(done.outcome, Outcome::Cancelled));
    // Empty prompt, then a normal request still works.
    let (_, done) = collect(&submit(
        &s,
        ServeRequest::greedy(Prompt::Ids(vec![]), 3),
        None,
    ));
    assert!(matches!(done.outcome, Outcome::Failed(_)));
    let (toks, done) = collect(&submit(&s, r, None));
    assert_eq!(toks.len(), 50);
    assert!(matches!(done.outcome, Outcome::Finished(_)));
    let st = s.stats();
    assert_eq!((st.finished, st.cancelled, st.failed), (1, 2, 2));
    assert_eq!(st.live, 0);
    s.shutdown();
}

#[test]
fn dropping_the_server_fails_live_requests() {
    let (_d, m) = tiny();
    let s = server(&m);
    let mut r = ServeRequest::greedy(Prompt::Ids(vec![1, 5, 6]), 200);
    r.ignore_eos = true;
    let rx = submit(&s, r, None);
    drop(s);
    let (_, done) = collect(&rx);
    assert!(matches!(
        done.outcome,
        Outcome::Failed(_) | Outcome::Finished(_)
    ));
}

/// Records what the loop passes to `prepare` and `forward`, around the CPU backend.
struct Recording {
    inner: Box<dyn crate::engine::Backend>,
    last: Option<Lookahead>,
    /// Per step: (tokens in the forward, tokens in the lookahead's first step, lookahead steps).
    log: Arc<Mutex<Vec<(usize, usize, usize)>>>,
}

impl crate::engine::Backend for Recording {
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn config(&self) -> &crate::config::ModelConfig {
        self.inner.config()
    }
    fn add_sequence(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        self.inner.add_sequence(seq, max_len)
    }
    fn remove_sequence(&mut self, seq: SeqId) {
        self.inner.remove_sequence(seq)
    }
    fn forward(&mut self, chunks: &[crate::engine::ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        let tokens = chunks.iter().map(|c| c.tokens.len()).sum();
        let la = self.last.take().unwrap_or_default();
        let first = la.steps.first().map_or(0, RoutePlan::len);
        self.log
            .lock()
            .unwrap()
            .push((tokens, first, la.steps.len()));
        self.inner.forward(chunks)
    }
    fn prepare(&mut self, lookahead: &Lookahead) -> Result<()> {
        self.last = Some(lookahead.clone());
        self.inner.prepare(lookahead)
    }
    fn expert_cache(&self) -> Option<&crate::cache::ExpertCache> {
        self.inner.expert_cache()
    }
}

fn cpu_with_cache(m: &ModelDir, per_layer: usize) -> crate::engine::cpu::CpuBackend {
    let (backbone, _) = crate::engine::cpu::BackboneWeights::split(m.load_weights().unwrap());
    crate::engine::cpu::CpuBackend::new(m.config.clone(), backbone)
        .unwrap()
        .with_expert_cache(
            crate::engine::ExpertCapacity::PerLayer(per_layer),
            crate::cache::EvictionPolicy::Belady,
        )
        .unwrap()
}

#[test]
fn the_loop_prepares_every_step_with_its_lookahead() {
    let (_d, m) = tiny();
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = Recording {
        inner: Box::new(cpu_with_cache(&m, 2)),
        last: None,
        log: log.clone(),
    };
    let w = m.load_weights().unwrap();
    let router = crate::router::ReadMeRouter::new(w.router, &m.config);
    let router = Box::new(crate::router::HostReadMeRouter::new(router));
    let engine = Engine::new(Box::new(backend), router);
    let cfg = ServeConfig {
        batcher: BatcherConfig {
            max_batch_tokens: 8,
            max_prefill_chunk: 8,
            ..BatcherConfig::default()
        },
        ..ServeConfig::default()
    };
    let s = Server::start(engine, None, cfg).unwrap();
    let mut r = ServeRequest::greedy(Prompt::Ids((1..30).collect()), 3);
    r.ignore_eos = true;
    let (toks, done) = collect(&submit(&s, r.clone(), None));
    assert_eq!(toks.len(), 3);
    assert!(matches!(done.outcome, Outcome::Finished(_)));
    s.shutdown();
    let log = log.lock().unwrap();
    // 29 prompt tokens in chunks of 8, then two decode steps.
    assert_eq!(log.len(), 4 + 2, "{log:?}");
    for &(tokens, first, _) in log.iter() {
        assert_eq!(
            tokens, first,
            "step 0 of the lookahead is the step that runs: {log:?}"
        );
    }
    // The first step knows the rest of the prompt: 21 tokens, three more steps of 8.
    assert_eq!(log[0].2, 1 + 3, "{log:?}");
    // A decode step knows nothing after itself.
    assert_eq!(log[5].2, 1, "{log:?}");
}

#[test]
fn the_loop_records_cache_batch_and_queue_metrics() {
    let (_d, m) = tiny();
    let engine = crate::engine::open_engine_with(
        &m,
        Device::Cpu,
        &crate::engine::EngineOptions {
            expert_cache: Some(crate::engine::ExpertCacheOptions {
                capacity: crate::engine::ExpertCapacity::PerLayer(2),
                policy: crate::cache::EvictionPolicy::Belady,
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let label = "serve-loop-test";
    let cfg = ServeConfig {
        metrics: Some(crate::metrics::model_metrics(label).unwrap()),
        ..ServeConfig::default()
    };
    let s = Server::start(engine, m.tokenizer.clone(), cfg).unwrap();
    let rxs: Vec<_> = (0..6u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..5 + 7 * i)
                .map(|t| (t * 37 + i * 11) % 500 + 1)
                .collect();
            let mut r = ServeRequest::greedy(Prompt::Ids(prompt), 6 + i as usize);
            r.ignore_eos = true;
            (r.clone(), submit(&s, r, None))
        })
        .collect();
    for (r, rx) in &rxs {
        let (toks, done) = collect(rx);
        assert!(matches!(done.outcome, Outcome::Finished(_)));
        // The cache is accounting only: the tokens are the engine's without it.
        let Prompt::Ids(ids) = &r.prompt else {
            unreachable!()
        };
        let want = reference(&m, ids, r.max_new_tokens);
        assert_eq!(toks.iter().map(|t| t.token).collect::<Vec<_>>(), want);
    }
    let steps = s.stats().steps;
    s.shutdown();
    let snap = crate::metrics::snapshot().unwrap();
    let get = |name: &str| {
        snap.iter()
            .find(|x| x.name == name && x.labels.iter().any(|(_, v)| v == label))
            .map(|x| x.value.clone())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let scalar = |name: &str| match get(name) {
        crate::metrics::MetricValue::Scalar(v) => v,
        v => panic!("{name}: {v:?}"),
    };
    let count = |name: &str| match get(name) {
        crate::metrics::MetricValue::Histogram { count, .. } => count,
        v => panic!("{name}: {v:?}"),
    };
    assert!(scalar("pregate_expert_cache_hits_total") > 0.0);
    assert!(scalar("pregate_expert_cache_misses_total") > 0.0);
    assert!(scalar("pregate_expert_cache_evictions_total") > 0.0);
    assert!(scalar("pregate_expert_load_bytes_total") > 0.0);
    let resident = scalar("pregate_expert_cache_resident_slots");
    assert!(resident > 0.0 && resident <= 4.0, "{resident}");
    assert_eq!(count("pregate_batch_tokens"), steps);
    assert_eq!(count("pregate_batch_unique_experts"), steps);
    assert!(count("pregate_queue_wait_seconds") >= steps);
    assert_eq!(scalar("pregate_requests_waiting"), 0.0);
    assert_eq!(scalar("pregate_requests_running"), 0.0);
}

/// The tiny model's greedy text after `prompt`, streamed without stop strings: each token's delta.
fn deltas_without_stops(s: &Server, prompt: &[u32], n: usize) -> Vec<String> {
    let mut r = ServeRequest::greedy(Prompt::Ids(prompt.to_vec()), n);
    r.ignore_eos = true;
    let (toks, done) = collect(&submit(s, r, None));
    assert!(matches!(
        done.outcome,
        Outcome::Finished(FinishReason::Length)
    ));
    toks.into_iter().map(|t| t.text).collect()
}

/// Streams `prompt` with `stop`; returns the deltas' texts and the completion.
fn with_stops(
    s: &Server,
    prompt: &[u32],
    n: usize,
    stop: &[String],
    stop_after: Option<usize>,
) -> (Vec<String>, Completion) {
    let mut r = ServeRequest::greedy(Prompt::Ids(prompt.to_vec()), n);
    r.ignore_eos = true;
    r.stop = stop.to_vec();
    let (toks, done) = collect(&submit(s, r, stop_after));
    (toks.into_iter().map(|t| t.text).collect(), done)
}

/// Every streamed prefix is a prefix of `want`: no chunk ever held text past it.
fn assert_prefixes(chunks: &[String], want: &str) {
    let mut sent = String::new();
    for c in chunks {
        sent.push_str(c);
        assert!(want.starts_with(&sent), "sent {sent:?}, want {want:?}");
    }
}

#[test]
fn streamed_text_holds_back_stop_strings_and_adds_up_to_the_full_text() {
    let (_d, m) = tiny();
    let s = server(&m);
    let prompt = [1, 82, 113, 331, 325];
    let n = 24;
    let deltas = deltas_without_stops(&s, &prompt, n);
    let full: String = deltas.concat();
    // A stop string spanning two tokens, whose first token's text starts its first occurrence:
    // without holding back, that token's text would reach the client before the match.
    let starts: Vec<usize> = deltas
        .iter()
        .scan(0, |at, d| {
            let here = *at;
            *at += d.len();
            Some(here)
        })
        .collect();
    let k = (1..n - 2)
        .find(|&k| {
            let stop = format!("{}{}", deltas[k], deltas[k + 1]);
            !deltas[k].is_empty()
                && !deltas[k + 1].is_empty()
                && full.find(&stop) == Some(starts[k])
        })
        .expect("two tokens with text");
    let stop = format!("{}{}", deltas[k], deltas[k + 1]);
    let (chunks, done) = with_stops(&s, &prompt, n, std::slice::from_ref(&stop), None);
    assert!(matches!(
        done.outcome,
        Outcome::Finished(FinishReason::Stop)
    ));
    assert_eq!(
        chunks.len(),
        k + 2,
        "it stops at the token completing {stop:?}"
    );
    let cut = &full[..starts[k]];
    assert_eq!(chunks.concat(), cut);
    assert_prefixes(&chunks, cut);
    assert!(done.tail.is_empty());

    // A stop string that never completes: the last two tokens' text is held back as a possible
    // beginning, then flushed with the last token (length limit).
    let never = format!("{}{}\u{7}never", deltas[n - 2], deltas[n - 1]);
    assert!(!deltas[n - 2].is_empty() && !full.contains(&never));
    let (chunks, done) = with_stops(&s, &prompt, n, std::slice::from_ref(&never), None);
    assert!(matches!(
        done.outcome,
        Outcome::Finished(FinishReason::Length)
    ));
    assert_eq!(chunks.concat(), full);
    assert!(
        chunks[..n - 1].concat().len() <= starts[n - 2],
        "{chunks:?}"
    );
    assert!(chunks[n - 1].ends_with(&format!("{}{}", deltas[n - 2], deltas[n - 1])));
    assert!(done.tail.is_empty());

    // The client goes away after 3 tokens while text is held: the completion carries it.
    let held = format!("{}\u{7}never", deltas[2]);
    let (chunks, done) = with_stops(&s, &prompt, n, &[held], Some(3));
    assert!(matches!(done.outcome, Outcome::Cancelled));
    assert_eq!(chunks.len(), 3);
    assert!(done.tail.ends_with(&deltas[2]), "{:?}", done.tail);
    assert_eq!(chunks.concat() + &done.tail, deltas[..3].concat());

    // No stop strings: each token's text goes out with it.
    let (chunks, _) = with_stops(&s, &prompt, n, &[], None);
    assert_eq!(chunks, deltas);
    s.shutdown();
}

/// A client that reads slowly: each token costs the engine thread `delay`, so a request holds its
/// batch slot for a known minimum time.
struct SlowSink {
    inner: ChanSink,
    delay: Duration,
}

impl ResponseSink for SlowSink {
    fn token(&mut self, d: &TokenDelta) -> bool {
        std::thread::sleep(self.delay);
        self.inner.token(d)
    }
    fn finish(&mut self, done: Completion) {
        self.inner.finish(done)
    }
}

#[test]
fn requests_not_admitted_within_max_queue_wait_fail_as_overloaded() {
    let (_d, m) = tiny();
    let engine = open_engine(&m, Device::Cpu).unwrap();
    let label = "serve-queue-wait-test";
    let max_wait = Duration::from_millis(300);
    let cfg = ServeConfig {
        batcher: BatcherConfig {
            max_running: 1,
            ..BatcherConfig::default()
        },
        metrics: Some(crate::metrics::model_metrics(label).unwrap()),
        max_queue_wait: Some(max_wait),
        ..ServeConfig::default()
    };
    let s = Server::start(engine, None, cfg).unwrap();
    let request = |n: usize| {
        let mut r = ServeRequest::greedy(Prompt::Ids(vec![1, 5, 6]), n);
        r.ignore_eos = true;
        r
    };
    // The only slot is held for at least 60 x 10 ms = 0.6 s, twice the maximum queue wait.
    let (tx, busy) = mpsc::channel();
    let t0 = Instant::now();
    s.submit(
        request(60),
        Box::new(SlowSink {
            inner: ChanSink {
                tx,
                stop_after: None,
            },
            delay: Duration::from_millis(10),
        }),
    );
    let queued: Vec<_> = (0..2).map(|_| submit(&s, request(4), None)).collect();
    for rx in &queued {
        let (toks, done) = collect(rx);
        let waited = t0.elapsed();
        assert!(toks.is_empty());
        match done.outcome {
            Outcome::Failed(e @ Error::Overloaded(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("for admission"), "{msg}");
                assert!(msg.contains("max_queue_wait 0.3 s"), "{msg}");
                assert!(msg.contains("overloaded"), "{msg}");
            }
            o => panic!("{o:?}"),
        }
        assert!(waited >= max_wait, "failed after {waited:?}");
    }
    // The admitted request is untouched: every token, finished normally.
    let (toks, done) = collect(&busy);
    assert_eq!(toks.len(), 60);
    assert!(matches!(
        done.outcome,
        Outcome::Finished(FinishReason::Length)
    ));
    // Once the slot is free, requests queue briefly and are admitted in time.
    let later: Vec<_> = (0..3).map(|_| submit(&s, request(4), None)).collect();
    for rx in &later {
        let (toks, done) = collect(rx);
        assert_eq!(toks.len(), 4);
        assert!(matches!(done.outcome, Outcome::Finished(_)));
    }
    let st = s.stats();
    assert_eq!((st.finished, st.failed), (4, 2));
    s.shutdown();
    let timeouts = crate::metrics::snapshot()
        .unwrap()
        .into_iter()
        .find(|x| {
            x.name == "pregate_admission_timeouts_total" && x.labels.iter().any(|(_, v)| v == label)
        })
        .map(|x| x.value);
    assert_eq!(timeouts, Some(crate::metrics::MetricValue::Scalar(2.0)));
}

#[test]
fn a_zero_max_queue_wait_is_refused() {
    let (_d, m) = tiny();
    let engine = open_engine(&m, Device::Cpu).unwrap();
    let cfg = ServeConfig {
        max_queue_wait: Some(Duration::ZERO),
        ..ServeConfig::default()
    };
    let e = Server::start(engine, None, cfg).unwrap_err().to_string();
    assert!(e.contains("max_queue_wait"), "{e}");
}

/// What a [`Faulty`] backend's forward does instead of the plain one's.
type Fault = Box<
    dyn FnMut(
            &mut dyn crate::engine::Backend,
            &[crate::engine::ForwardChunk<'_>],
        ) -> Result<Vec<Vec<f32>>>
        + Send,
>;

/// The CPU backend, except that its forward goes through a fault: failing, or poisoning logits.
struct Faulty {
    inner: Box<dyn crate::engine::Backend>,
    fault: Fault,
}

impl crate::engine::Backend for Faulty {
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn config(&self) -> &crate::config::ModelConfig {
        self.inner.config()
    }
    fn add_sequence(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        self.inner.add_sequence(seq, max_len)
    }
    fn remove_sequence(&mut self, seq: SeqId) {
        self.inner.remove_sequence(seq)
    }
    fn forward(&mut self, chunks: &[crate::engine::ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        (self.fault)(self.inner.as_mut(), chunks)
    }
}

/// An engine over `m`'s CPU backend whose forward goes through `fault`.
fn faulty_engine(m: &ModelDir, fault: Fault) -> Engine {
    let w = m.load_weights().unwrap();
    let router = crate::router::ReadMeRouter::new(w.router, &m.config);
    let (backbone, _) = crate::engine::cpu::BackboneWeights::split(m.load_weights().unwrap());
    let cpu = crate::engine::cpu::CpuBackend::new(m.config.clone(), backbone).unwrap();
    let router = Box::new(crate::router::HostReadMeRouter::new(router));
    let inner = Box::new(cpu);
    Engine::new(Box::new(Faulty { inner, fault }), router)
}

#[test]
fn a_step_failing_for_capacity_fails_its_requests_as_unavailable() {
    let (_d, m) = tiny();
    // Every forward fails for lack of capacity.
    let engine = faulty_engine(
        &m,
        Box::new(|_, _| Err(Error::Capacity("no free expert slot".into()))),
    );
    let s = Server::start(engine, None, ServeConfig::default()).unwrap();
    let rxs: Vec<_> = (0..2)
        .map(|i| {
            submit(
                &s,
                ServeRequest::greedy(Prompt::Ids(vec![1, 5 + i]), 3),
                None,
            )
        })
        .collect();
    for rx in &rxs {
        let (toks, done) = collect(rx);
        assert!(toks.is_empty());
        match done.outcome {
            Outcome::Failed(e) => {
                assert_eq!(e.code(), crate::error::ErrorCode::Unavailable, "{e}");
                assert!(matches!(e, Error::StepFailed(_)), "{e:?}");
                assert!(e.to_string().contains("no free expert slot"), "{e}");
            }
            o => panic!("{o:?}"),
        }
    }
    s.shutdown();
}

#[test]
fn a_request_with_nan_logits_fails_alone_and_the_others_complete() {
    let (_d, m) = tiny();
    // Sequence ids follow submission order from 1: the fourth request's logits are NaN.
    let engine = faulty_engine(
        &m,
        Box::new(|inner, chunks| {
            let mut rows = inner.forward(chunks)?;
            let with_logits = chunks.iter().filter(|c| c.want_logits);
            for (c, row) in with_logits.zip(rows.iter_mut()) {
                if c.seq == 4 {
                    row.fill(f32::NAN);
                }
            }
            Ok(rows)
        }),
    );
    let s = Server::start(engine, None, ServeConfig::default()).unwrap();
    let n = 9;
    let prompt = |i: u32| vec![1, 5 + i, 9 + 2 * i];
    let rxs: Vec<_> = (0..n)
        .map(|i| {
            let mut r = ServeRequest::greedy(Prompt::Ids(prompt(i)), 5);
            r.ignore_eos = true;
            submit(&s, r, None)
        })
        .collect();
    for (i, rx) in rxs.iter().enumerate() {
        let (toks, done) = collect(rx);
        if i == 3 {
            assert!(toks.is_empty());
            match done.outcome {
                Outcome::Failed(e) => {
                    assert!(matches!(e, Error::ModelData(_)), "{e:?}");
                    assert_eq!(e.code(), crate::error::ErrorCode::ModelData);
                }
                o => panic!("{o:?}"),
            }
        } else {
            let want = reference(&m, &prompt(i as u32), 5);
            assert_eq!(toks.iter().map(|t| t.token).collect::<Vec<_>>(), want);
            assert!(matches!(
                done.outcome,
                Outcome::Finished(FinishReason::Length)
            ));
        }
    }
    let st = s.stats();
    assert_eq!((st.finished, st.failed), (n as u64 - 1, 1));
    assert!(st.max_step_requests >= 2, "{st:?}");
    s.shutdown();
}

#[test]
fn admission_is_bounded_by_default() {
    let cfg = ServeConfig::default();
    assert_eq!(cfg.max_queue_wait, Some(Duration::from_secs(30)));
    assert_eq!(cfg.max_queue_wait, Some(DEFAULT_MAX_QUEUE_WAIT));
    assert_eq!(cfg.max_waiting, Some(1024));
    assert_eq!(cfg.max_waiting, Some(DEFAULT_MAX_WAITING));
    let (_d, m) = tiny();
    let zero = ServeConfig {
        max_waiting: Some(0),
        ..ServeConfig::default()
    };
    let e = Server::start(open_engine(&m, Device::Cpu).unwrap(), None, zero)
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_waiting"), "{e}");
}

/// Starts `n` tokens of a request on `s` whose first token holds the engine thread until the
/// returned sender is used (or dropped); returns once that token is out.
fn hold_the_loop(s: &Server, n: usize) -> (mpsc::Sender<()>, mpsc::Receiver<Ev>) {
    let (tx, rx) = mpsc::channel();
    let (open, gate) = mpsc::channel();
    let mut r = ServeRequest::greedy(Prompt::Ids(vec![1, 5, 6]), n);
    r.ignore_eos = true;
    s.submit(
        r,
        Box::new(GateSink {
            inner: ChanSink {
                tx,
                stop_after: None,
            },
            gate: Some(gate),
        }),
    );
    match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
        Ev::Tok(t) => assert_eq!(t.index, 0),
        Ev::Done(d) => panic!("{:?}", d.outcome),
    }
    (open, rx)
}

#[test]
fn a_full_admission_queue_refuses_new_requests_at_once() {
    let (_d, m) = tiny();
    let cfg = ServeConfig {
        batcher: BatcherConfig {
            max_running: 1,
            ..BatcherConfig::default()
        },
        max_waiting: Some(2),
        ..ServeConfig::default()
    };
    let s = Server::start(open_engine(&m, Device::Cpu).unwrap(), None, cfg).unwrap();
    // The only slot is taken and the loop is held: the next four requests arrive together.
    let (open, busy) = hold_the_loop(&s, 6);
    let t0 = Instant::now();
    let request = || {
        let mut r = ServeRequest::greedy(Prompt::Ids(vec![1, 7]), 3);
        r.ignore_eos = true;
        r
    };
    let rxs: Vec<_> = (0..4).map(|_| submit(&s, request(), None)).collect();
    open.send(()).unwrap();
    for rx in &rxs[2..] {
        let (toks, done) = collect(rx);
        assert!(toks.is_empty());
        match done.outcome {
            Outcome::Failed(e) => {
                assert!(matches!(e, Error::Overloaded(_)), "{e:?}");
                assert_eq!(e.code(), crate::error::ErrorCode::Unavailable);
                let msg = e.to_string();
                assert!(msg.contains("2 requests already wait"), "{msg}");
                assert!(msg.contains("max_waiting 2"), "{msg}");
            }
            o => panic!("{o:?}"),
        }
    }
    // Refused at once, not after the default 30 s queue wait.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    let (toks, done) = collect(&busy);
    assert_eq!(toks.len(), 5);
    assert!(matches!(done.outcome, Outcome::Finished(_)));
    for rx in &rxs[..2] {
        let (toks, done) = collect(rx);
        assert_eq!(toks.len(), 3);
        assert!(matches!(done.outcome, Outcome::Finished(_)));
    }
    let st = s.stats();
    assert_eq!((st.finished, st.failed), (3, 2));
    s.shutdown();
}

#[test]
fn a_request_waiting_past_the_default_bound_fails_as_overloaded() {
    let (_d, m) = tiny();
    let cfg = ServeConfig {
        batcher: BatcherConfig {
            max_running: 1,
            ..BatcherConfig::default()
        },
        ..ServeConfig::default()
    };
    let s = Server::start(open_engine(&m, Device::Cpu).unwrap(), None, cfg).unwrap();
    // The only slot is held, with the loop, past the default bound.
    let (open, busy) = hold_the_loop(&s, 3);
    let t0 = Instant::now();
    let queued = submit(&s, ServeRequest::greedy(Prompt::Ids(vec![1, 7]), 2), None);
    std::thread::sleep(DEFAULT_MAX_QUEUE_WAIT + Duration::from_millis(200));
    open.send(()).unwrap();
    let (toks, done) = collect(&queued);
    assert!(toks.is_empty());
    match done.outcome {
        Outcome::Failed(e) => {
            assert!(matches!(e, Error::Overloaded(_)), "{e:?}");
            assert_eq!(e.code(), crate::error::ErrorCode::Unavailable);
            assert!(e.to_string().contains("max_queue_wait 30 s"), "{e}");
        }
        o => panic!("{o:?}"),
    }
    assert!(t0.elapsed() >= DEFAULT_MAX_QUEUE_WAIT);
    let (toks, done) = collect(&busy);
    assert_eq!(toks.len(), 2);
    assert!(matches!(done.outcome, Outcome::Finished(_)));
    s.shutdown();
}

fn text(t: String) -> Prompt {
    Prompt::Text {
        text: t,
        add_bos: true,
    }
}

fn failure(d: &Completion) -> String {
    match &d.outcome {
        Outcome::Failed(e) => {
            assert_eq!(e.code(), crate::ErrorCode::InvalidArgument, "{e}");
            e.to_string()
        }
        o => panic!("expected a failure, got {o:?}"),
    }
}

#[test]
fn a_prompt_over_the_size_limits_is_refused_before_it_is_read() {
    let (_d, m) = tiny();
    let s = server(&m);
    let ctx = s.max_context();
    assert_eq!(s.max_prompt_bytes(), ctx * DEFAULT_PROMPT_BYTES_PER_TOKEN);
    // Tokenizing 8 MiB of text takes seconds; refusing it by its size, nothing measurable.
    let huge = "once upon a time ".repeat(8 << 16);
    let t = Instant::now();
    let (toks, done) = collect(&submit(&s, ServeRequest::greedy(text(huge), 4), None));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(toks.is_empty());
    let e = failure(&done);
    assert!(
        e.contains(&format!("over the limit of {} bytes", ctx * 32))
            && e.contains("max_prompt_bytes"),
        "{e}"
    );
    let ids = Prompt::Ids(vec![1; ctx + 1]);
    let (_, done) = collect(&submit(&s, ServeRequest::greedy(ids, 1), None));
    assert!(failure(&done).contains(&format!("over the model's context of {ctx} tokens")));
    // Just under the limit is tokenized and then judged by its tokens.
    let (_, done) = collect(&submit(
        &s,
        ServeRequest::greedy(text("a".repeat(ctx * 32)), 1),
        None,
    ));
    assert!(failure(&done).contains("exceeds the context"));
    assert_eq!(s.stats().failed, 3);
}

#[test]
fn text_is_tokenized_off_the_submitting_thread_and_does_not_delay_others() {
    let (_d, m) = tiny();
    let big = "experts and routers ".repeat(1 << 16);
    let tok = m.tokenizer.clone().unwrap();
    let t = Instant::now();
    tok.encode(&big, true).unwrap();
    let tokenizing = t.elapsed();
    let cfg = ServeConfig {
        max_prompt_bytes: Some(64 << 20),
        ..ServeConfig::default()
    };
    let s = Server::start(
        open_engine(&m, Device::Cpu).unwrap(),
        m.tokenizer.clone(),
        cfg,
    )
    .unwrap();
    let t = Instant::now();
    let big_rx = submit(&s, ServeRequest::greedy(text(big), 1), None);
    let submitting = t.elapsed();
    let mut small = ServeRequest::greedy(Prompt::Ids(vec![1, 5, 6]), 4);
    small.ignore_eos = true;
    let (toks, done) = collect(&submit(&s, small, None));
    let small_done = t.elapsed();
    assert!(
        matches!(done.outcome, Outcome::Finished(_)),
        "{:?}",
        done.outcome
    );
    assert_eq!(toks.len(), 4);
    assert!(
        submitting * 10 < tokenizing,
        "submit took {submitting:?}; tokenizing takes {tokenizing:?}"
    );
    assert!(
        small_done * 2 < tokenizing,
        "the small request took {small_done:?}; tokenizing takes {tokenizing:?}"
    );
    let (_, done) = collect(&big_rx);
    assert!(failure(&done).contains("exceeds the context"));
}

#[test]
fn a_kv_budget_bounds_what_is_admitted_and_refuses_what_never_fits() {
    let (_d, m) = tiny();
    let per_token = kv_bytes_per_token(&m.config);
    let (prompt, n) = (vec![1u32, 5, 6, 7], 12);
    let one = (prompt.len() + n) as u64 * per_token;
    // Room for two such requests at once, not three.
    let budget = 2 * one + one / 2;
    let cfg = ServeConfig {
        kv_memory_bytes: Some(budget),
        ..ServeConfig::default()
    };
    let s = Server::start(open_engine(&m, Device::Cpu).unwrap(), None, cfg).unwrap();
    assert_eq!(s.stats().kv_budget_bytes, budget);
    let rxs: Vec<_> = (0..6)
        .map(|_| {
            let mut r = ServeRequest::greedy(Prompt::Ids(prompt.clone()), n);
            r.ignore_eos = true;
            submit(&s, r, None)
        })
        .collect();
    for rx in &rxs {
        let (toks, done) = collect(rx);
        assert!(
            matches!(done.outcome, Outcome::Finished(_)),
            "{:?}",
            done.outcome
        );
        assert_eq!(toks.len(), n);
    }
    // The loop publishes its gauges just after it sends a request's last event.
    let t = Instant::now();
    while s.stats().kv_bytes_in_use != 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = s.stats();
    assert_eq!(st.kv_bytes_max, 2 * one, "two at a time, never three");
    assert_eq!(st.max_step_requests, 2);
    assert_eq!(st.kv_bytes_in_use, 0);
    let too_big = (budget / per_token) as usize;
    let (_, done) = collect(&submit(
        &s,
        ServeRequest::greedy(Prompt::Ids(prompt.clone()), too_big),
        None,
    ));
    let e = failure(&done);
    assert!(
        e.contains(&format!("KV budget of {budget} bytes")) && e.contains(&per_token.to_string()),
        "{e}"
    );
}
