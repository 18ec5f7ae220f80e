use std::sync::mpsc;

use super::*;
use crate::engine::{open_engine, Device};
use crate::model::{make_model, ExpertLayout, ModelDir, Preset};

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
        out.extend(e.step(&s).unwrap().into_iter().map(|ev| ev.token));
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
    // Cancelled through the handle.
    let (tx, rx) = mpsc::channel();
    let h = s.submit(
        r.clone(),
        Box::new(ChanSink {
            tx,
            stop_after: None,
        }),
    );
    h.cancel();
    let (toks, done) = collect(&rx);
    assert!(toks.len() < 50);
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
