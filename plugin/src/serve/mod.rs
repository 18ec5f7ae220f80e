//! A host-agnostic serving loop: one engine thread per model instance.
//!
//! [`Server::start`] moves an [`Engine`] onto its own thread. Hosts (the Triton backend, later the
//! vLLM plugin and the CLI) call [`Server::submit`] with a [`ServeRequest`] and a [`ResponseSink`]
//! and return at once; the engine thread admits the request, asks the [`LookaheadBatcher`] for
//! each step's schedule, runs the step and streams every new token, with its text delta, to the
//! request's sink. Guarantees, whatever happens:
//! - every submitted request gets exactly one [`ResponseSink::finish`] call (finished, cancelled or
//!   failed), and no token after it;
//! - a cancelled request (its [`RequestHandle`] or [`ResponseSink::is_cancelled`]) stops at the
//!   next step boundary and its KV space and batch slot are freed;
//! - a failing or panicking step fails only the requests it scheduled (error events) and the loop
//!   goes on; a request whose own computation fails (its logits are NaN, its new token cannot be
//!   routed) fails alone with its error, and the step's other requests get their tokens; a
//!   panicking sink is treated as a client that went away;
//! - overload is bounded: a request the batcher has not admitted (no free batch slot or KV memory)
//!   within [`ServeConfig::max_queue_wait`] ([`DEFAULT_MAX_QUEUE_WAIT`] by default) fails with
//!   [`Error::Overloaded`], and a request arriving while [`ServeConfig::max_waiting`]
//!   ([`DEFAULT_MAX_WAITING`] by default) requests already wait for admission is refused at once
//!   with it; requests already admitted are not touched. [`Error::Overloaded`] has the code
//!   [`crate::ErrorCode::Unavailable`]: the same request may succeed later.
//!
//! Each step, the loop passes the backend's expert residency ([`Engine::expert_cache`]: experts
//! resident at every layer) to the batcher, builds a lookahead from what is queued ([`crate::engine::StepDriver`]: the step
//! about to run, then the pending tokens it leaves, cut into steps of the token budget) and calls
//! [`Engine::prepare`] with it (Belady's next uses, the prefetch plan) before [`Engine::step`].
//!
//! Counters and gauges are kept in [`ServeStats`]; [`ServeConfig::on_step`] is called with a
//! snapshot after every step so a host can mirror them into its own metrics system. With
//! [`ServeConfig::metrics`] the loop also records the library's Prometheus families
//! ([`crate::metrics`]): expert cache counters and resident slots, stall time, per-step unique
//! experts and tokens, queue waits, waiting and running requests.

mod config;
mod intake;
mod request;
mod stats;
mod stop;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{
    ServeConfig, StepObserver, DEFAULT_MAX_QUEUE_WAIT, DEFAULT_MAX_WAITING,
    DEFAULT_PROMPT_BYTES_PER_TOKEN,
};
pub use request::{Completion, Outcome, Prompt, ResponseSink, ServeRequest, TokenDelta};
pub use stats::ServeStats;

use crate::batcher::{LookaheadBatcher, RequestDesc, StepPlan};
use crate::engine::{Engine, FinishReason, GenerationRequest, SeqId, StepEvent};
use crate::engine::{StepDriver, ViewOrder};
use crate::error::{Error, Result};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// A submitted request: its id and a way to cancel it.
#[derive(Debug, Clone)]
pub struct RequestHandle {
    id: u64,
    cancel: Arc<AtomicBool>,
}

impl RequestHandle {
    /// The server-wide request id (not the engine's sequence id).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Asks the loop to stop the request at the next step boundary.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }
}

enum Msg {
    Submit(Box<Submitted>),
    Shutdown,
}

struct Submitted {
    /// When the host submitted it: its queue wait starts here, not when the loop receives it
    /// (which may be a whole step later).
    at: Instant,
    prompt: Vec<u32>,
    req: ServeRequest,
    sink: Box<dyn ResponseSink>,
    cancel: Arc<AtomicBool>,
}

/// The serving loop's handle. Dropping it (or [`Server::shutdown`]) stops the thread; requests
/// still live then get a failed completion.
pub struct Server {
    tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    intake: intake::Intake,
    limits: intake::PromptLimits,
    tokenizer: Option<Arc<Tokenizer>>,
    stats: Arc<Mutex<ServeStats>>,
    next_id: AtomicU64,
    max_context: usize,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl Server {
    /// Starts the engine thread.
    pub fn start(engine: Engine, tokenizer: Option<Tokenizer>, cfg: ServeConfig) -> Result<Self> {
        if cfg.max_queue_wait.is_some_and(|d| d.is_zero()) {
            return Err(Error::InvalidArgument(
                "max_queue_wait must be positive (None: unbounded)".into(),
            ));
        }
        if cfg.max_waiting == Some(0) {
            return Err(Error::InvalidArgument(
                "max_waiting must be at least 1 (None: unbounded)".into(),
            ));
        }
        if cfg.kv_memory_bytes == Some(0) {
            return Err(Error::InvalidArgument(
                "kv_memory_bytes must be positive (None: no budget)".into(),
            ));
        }
        if cfg.max_prompt_bytes == Some(0) {
            return Err(Error::InvalidArgument(
                "max_prompt_bytes must be positive (None: derived from the context)".into(),
            ));
        }
        let mut batcher_cfg = cfg.batcher.clone();
        if let Some(budget) = cfg.kv_memory_bytes {
            batcher_cfg.kv_capacity_bytes = Some(
                batcher_cfg
                    .kv_capacity_bytes
                    .map_or(budget, |c| c.min(budget)),
            );
        }
        let kv_budget = batcher_cfg.kv_capacity_bytes;
        let kv_per_token = kv_bytes_per_token(engine.config());
        let batcher = LookaheadBatcher::new(batcher_cfg)?;
        let driver = StepDriver::new(batcher, cfg.lookahead_steps, ViewOrder::Admission);
        let tokenizer = tokenizer.map(Arc::new);
        let max_context = engine.config().max_context();
        let stats = Arc::new(Mutex::new(ServeStats::default()));
        let (tx, rx) = mpsc::channel();
        let mut state = LoopState {
            engine,
            driver,
            tokenizer: tokenizer.clone(),
            live: HashMap::new(),
            rx,
            stats: stats.clone(),
            epoch: Instant::now(),
            cfg: cfg.clone(),
            closed: false,
            scheduled: 0,
            stall_seen: 0.0,
            host_seen: Default::default(),
            kv_per_token,
            kv_budget,
        };
        {
            let mut st = stats.lock().unwrap_or_else(|p| p.into_inner());
            st.kv_budget_bytes = kv_budget.unwrap_or(0);
        }
        let thread = std::thread::Builder::new()
            .name(cfg.thread_name.clone())
            .spawn(move || state.run())
            .map_err(|e| Error::Internal(format!("cannot start the engine thread: {e}")))?;
        let limits = intake::PromptLimits {
            text_bytes: cfg.prompt_byte_limit(max_context),
            derived: cfg.max_prompt_bytes.is_none(),
            context: max_context,
        };
        let intake = match intake::Intake::start(
            &cfg.thread_name,
            tokenizer.clone(),
            tx.clone(),
            stats.clone(),
        ) {
            Ok(i) => i,
            Err(e) => {
                let _ = tx.send(Msg::Shutdown);
                let _ = thread.join();
                return Err(e);
            }
        };
        Ok(Server {
            tx,
            thread: Some(thread),
            intake,
            limits,
            tokenizer,
            stats,
            next_id: AtomicU64::new(1),
            max_context,
        })
    }

    /// The model's tokenizer, when it has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// The model's context length (prompt plus generated tokens).
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// The largest prompt text accepted, in bytes ([`ServeConfig::max_prompt_bytes`]).
    pub fn max_prompt_bytes(&self) -> usize {
        self.limits.text_bytes
    }

    /// Submits a request and returns at once. Never fails: an invalid request gets a failed
    /// [`Completion`] through its sink (possibly before this returns). The calling thread only
    /// checks the prompt's size (constant time): a text prompt is tokenized on the server's
    /// tokenizer thread, token ids go straight to the engine thread.
    pub fn submit(&self, mut req: ServeRequest, mut sink: Box<dyn ResponseSink>) -> RequestHandle {
        let at = Instant::now();
        let cancel = Arc::new(AtomicBool::new(false));
        let handle = RequestHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cancel: cancel.clone(),
        };
        if let Err(e) = self.limits.check(&req.prompt) {
            self.stats.lock().map(|mut s| s.failed += 1).ok();
            finish_sink(&mut sink, Outcome::Failed(e), 0, 0);
            return handle;
        }
        let prompt = match &mut req.prompt {
            Prompt::Ids(ids) => std::mem::take(ids),
            Prompt::Text { .. } => Vec::new(),
        };
        let text = matches!(req.prompt, Prompt::Text { .. });
        let s = Box::new(Submitted {
            at,
            prompt,
            req,
            sink,
            cancel,
        });
        if text {
            if let Err(mut s) = self.intake.send(s) {
                let e = Error::Internal("the tokenizer thread has stopped".into());
                finish_sink(&mut s.sink, Outcome::Failed(e), 0, 0);
            }
            return handle;
        }
        if let Err(mpsc::SendError(Msg::Submit(mut s))) = self.tx.send(Msg::Submit(s)) {
            let e = Error::Internal("the engine thread has stopped".into());
            finish_sink(&mut s.sink, Outcome::Failed(e), s.prompt.len(), 0);
        }
        handle
    }

    /// A snapshot of the counters and gauges.
    pub fn stats(&self) -> ServeStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops the engine thread after failing the requests still live; waits for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // The tokenizer thread first: what it hands on still reaches the engine thread, which
        // then fails it as the model unloads.
        self.intake.stop();
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// KV bytes one token of `cfg` holds: K and V of every layer, counted at 4 bytes a value (the
/// CPU backend's f32; the CUDA backend's bf16 cache holds half of it, so a budget in these bytes
/// is never exceeded there either).
pub fn kv_bytes_per_token(cfg: &crate::config::ModelConfig) -> u64 {
    (2 * cfg.num_hidden_layers * cfg.num_kv_heads() * cfg.head_dim() * 4) as u64
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn finish_sink(sink: &mut Box<dyn ResponseSink>, outcome: Outcome, prompt: usize, gen: usize) {
    finish_sink_with(sink, outcome, prompt, gen, String::new());
}

fn finish_sink_with(
    sink: &mut Box<dyn ResponseSink>,
    outcome: Outcome,
    prompt: usize,
    gen: usize,
    tail: String,
) {
    let done = Completion {
        outcome,
        prompt_tokens: prompt,
        generated: gen,
        tail,
    };
    // A panicking sink must not take the loop down; there is nobody left to tell.
    let _ = catch_unwind(AssertUnwindSafe(|| sink.finish(done)));
}

struct Live {
    sink: Box<dyn ResponseSink>,
    cancel: Arc<AtomicBool>,
    decoder: IncrementalDecoder,
    stop: stop::StopMatcher,
    prompt_len: usize,
    generated: usize,
    /// Submission time on the loop's clock (seconds since `LoopState::epoch`).
    arrival: f64,
}

struct LoopState {
    engine: Engine,
    driver: StepDriver,
    tokenizer: Option<Arc<Tokenizer>>,
    live: HashMap<SeqId, Live>,
    rx: Receiver<Msg>,
    stats: Arc<Mutex<ServeStats>>,
    epoch: Instant,
    cfg: ServeConfig,
    closed: bool,
    scheduled: usize,
    /// The backend's cumulative stall seconds at the last metrics record.
    stall_seen: f64,
    /// The engine's cumulative host seconds at the last metrics record.
    host_seen: crate::engine::HostSeconds,
    /// KV bytes of one token ([`kv_bytes_per_token`]).
    kv_per_token: u64,
    /// The batcher's KV budget, if any.
    kv_budget: Option<u64>,
}

impl LoopState {
    fn run(&mut self) {
        while !(self.closed && self.live.is_empty()) {
            let r = catch_unwind(AssertUnwindSafe(|| self.iterate()));
            // Mirror every change (admissions, finishes, cancellations), not only steps.
            self.publish();
            if r.is_err() {
                // A bug in the loop itself: fail everything live and go on with a clean slate.
                let ids: Vec<SeqId> = self.live.keys().copied().collect();
                for id in ids {
                    let e = Error::Internal("the serving loop panicked".into());
                    self.end(id, Outcome::Failed(e));
                }
            }
        }
        self.scheduled = 0;
        self.publish();
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn iterate(&mut self) {
        self.receive();
        if self.closed {
            let ids: Vec<SeqId> = self.live.keys().copied().collect();
            for id in ids {
                let e = Error::Internal("the model is being unloaded".into());
                self.end(id, Outcome::Failed(e));
            }
            return;
        }
        self.reap_cancelled();
        if self.live.is_empty() {
            return;
        }
        let now = self.now();
        let plan = match self.driver.schedule(&self.engine, now) {
            Ok(p) => p,
            Err(e) => {
                self.fail_all(&e.to_string());
                return;
            }
        };
        // After the schedule, so that a request this step admits is not failed.
        self.expire_waiting(now);
        if plan.is_empty() {
            self.wait_for_message(self.cfg.idle_poll);
            return;
        }
        let entries = plan.entries();
        let start = self.now();
        let result = catch_unwind(AssertUnwindSafe(|| {
            self.driver.run(&mut self.engine, &plan)
        }));
        let end = self.now();
        self.driver.step_done(start, end);
        {
            let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            s.record_step(&plan, end - start);
        }
        self.record_metrics(&plan);
        match result {
            Ok(Ok(out)) => {
                // A request whose own sampling or routing failed ends alone, with its error;
                // the engine has already dropped it.
                for (seq, e) in out.failed {
                    self.end(seq, Outcome::Failed(e));
                }
                self.deliver(out.events);
            }
            Ok(Err(e)) => {
                // Shared, so that every request keeps the step's error and its code.
                let e = Arc::new(e);
                for (seq, _) in &entries {
                    self.end(*seq, Outcome::Failed(Error::StepFailed(e.clone())));
                }
            }
            Err(p) => {
                let msg = format!("step panicked: {}", panic_message(&p));
                for (seq, _) in &entries {
                    self.end(*seq, Outcome::Failed(Error::Internal(msg.clone())));
                }
            }
        }
        self.scheduled = plan.chunks.len();
    }

    /// Records a step into the library metrics: its unique experts and tokens, the queue waits of
    /// its requests, the backend's expert cache counters, resident slots and stall time.
    fn record_metrics(&mut self, plan: &StepPlan) {
        let Some(m) = &self.cfg.metrics else {
            return;
        };
        m.observe_batch(plan.experts.len(), plan.tokens);
        for c in &plan.chunks {
            m.observe_queue_wait(c.waited);
        }
        if let Some(cache) = self.engine.expert_cache() {
            m.record_cache(cache.stats(), cache.resident());
        }
        if let Some(s) = self.engine.speculation_stats() {
            m.record_speculation(s);
        }
        let stall = self.engine.expert_stall_seconds();
        m.add_stall(stall - self.stall_seen);
        self.stall_seen = stall;
        let host = self.engine.host_seconds();
        m.add_host_seconds(
            host.sampling - self.host_seen.sampling,
            host.routing - self.host_seen.routing,
        );
        self.host_seen = host;
    }

    /// Takes every queued message; blocks while nothing is live.
    fn receive(&mut self) {
        if self.live.is_empty() && !self.closed {
            match self.rx.recv() {
                Ok(m) => self.handle(m),
                Err(_) => self.closed = true,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(m) => self.handle(m),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.closed = true;
                    break;
                }
            }
        }
    }

    fn wait_for_message(&mut self, d: Duration) {
        match self.rx.recv_timeout(d) {
            Ok(m) => self.handle(m),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => self.closed = true,
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Shutdown => self.closed = true,
            Msg::Submit(s) => self.admit(*s),
        }
    }

    /// Ends a request that was not admitted: counted as failed, its sink finished with `e`.
    fn refuse(&self, mut sink: Box<dyn ResponseSink>, e: Error, prompt_len: usize) {
        self.count_failed();
        finish_sink(&mut sink, Outcome::Failed(e), prompt_len, 0);
    }

    fn admit(&mut self, s: Submitted) {
        let Submitted {
            at,
            prompt,
            req,
            sink,
            cancel,
        } = s;
        let prompt_len = prompt.len();
        if self.closed {
            let e = Error::Internal("the model is being unloaded".into());
            return self.refuse(sink, e, prompt_len);
        }
        let waiting = self.driver.batcher().waiting();
        if let Some(max) = self.cfg.max_waiting.filter(|&max| waiting >= max) {
            let e = Error::Overloaded(format!(
                "{waiting} requests already wait for admission (max_waiting {max})"
            ));
            return self.refuse(sink, e, prompt_len);
        }
        let kv_tokens = (prompt_len as u64).saturating_add(req.max_new_tokens as u64);
        let kv_bytes = kv_tokens.saturating_mul(self.kv_per_token);
        if let Some(budget) = self.kv_budget.filter(|&b| kv_bytes > b) {
            let e = Error::InvalidRequest(format!(
                "the request may need {kv_bytes} KV bytes ({prompt_len} prompt + {} max_tokens \
                 tokens x {} bytes), more than the whole KV budget of {budget} bytes \
                 (kv_memory_bytes)",
                req.max_new_tokens, self.kv_per_token
            ));
            return self.refuse(sink, e, prompt_len);
        }
        let decoder = IncrementalDecoder::new(&prompt);
        let greq = GenerationRequest {
            prompt,
            sampling: req.sampling,
            max_new_tokens: req.max_new_tokens,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            keep_logits: false,
        };
        let added = catch_unwind(AssertUnwindSafe(|| self.engine.add_request(greq)))
            .unwrap_or_else(|p| Err(Error::Internal(format!("panic: {}", panic_message(&p)))));
        let seq = match added {
            Ok(seq) => seq,
            Err(e) => return self.refuse(sink, e, prompt_len),
        };
        let arrival = at.saturating_duration_since(self.epoch).as_secs_f64();
        let desc = RequestDesc {
            id: seq,
            arrival,
            prompt_len,
            output_len: None,
            deadline: None,
            kv_bytes,
        };
        if let Err(e) = self.driver.submit(desc) {
            self.engine.remove(seq);
            return self.refuse(sink, e, prompt_len);
        }
        if let Ok(mut st) = self.stats.lock() {
            st.prompt_tokens += prompt_len as u64;
            st.live = self.live.len() as u64 + 1;
        }
        self.live.insert(
            seq,
            Live {
                sink,
                cancel,
                decoder,
                stop: stop::StopMatcher::new(req.stop),
                prompt_len,
                generated: 0,
                arrival,
            },
        );
    }

    /// Fails, as overloaded, every request still waiting for admission `max_queue_wait` after its
    /// submission.
    fn expire_waiting(&mut self, now: f64) {
        let Some(max) = self.cfg.max_queue_wait else {
            return;
        };
        let max_s = max.as_secs_f64();
        let expired: Vec<(SeqId, f64)> = self
            .live
            .iter()
            .filter(|(seq, l)| now - l.arrival >= max_s && self.driver.batcher().is_waiting(**seq))
            .map(|(seq, l)| (*seq, now - l.arrival))
            .collect();
        for (seq, waited) in expired {
            if let Some(m) = &self.cfg.metrics {
                m.count_admission_timeout();
            }
            let e = Error::Overloaded(format!(
                "request waited {waited:.3} s for admission (max_queue_wait {max_s} s)"
            ));
            self.end(seq, Outcome::Failed(e));
        }
    }

    fn count_failed(&self) {
        if let Ok(mut s) = self.stats.lock() {
            s.failed += 1;
        }
    }

    fn reap_cancelled(&mut self) {
        let mut gone = Vec::new();
        for (&seq, l) in self.live.iter_mut() {
            let flagged = l.cancel.load(Ordering::Acquire)
                || catch_unwind(AssertUnwindSafe(|| l.sink.is_cancelled())).unwrap_or(true);
            if flagged {
                gone.push(seq);
            }
        }
        for seq in gone {
            self.end(seq, Outcome::Cancelled);
        }
    }

    fn deliver(&mut self, events: Vec<StepEvent>) {
        for ev in events {
            let Some(l) = self.live.get_mut(&ev.seq) else {
                continue;
            };
            let mut text = String::new();
            let mut finish = ev.finished;
            if let Some(tok) = &self.tokenizer {
                let mut decoded = l.decoder.push(tok, ev.token).unwrap_or_default();
                if finish.is_some() {
                    decoded.push_str(&l.decoder.finish(tok).unwrap_or_default());
                }
                let released = l.stop.push(&decoded);
                text = released.text;
                if released.stopped {
                    finish = Some(FinishReason::Stop);
                } else if finish.is_some() {
                    // EOS, a stop token or the length limit: what was held back is plain output.
                    text.push_str(&l.stop.flush());
                }
            }
            let delta = TokenDelta {
                token: ev.token,
                text,
                index: l.generated,
                finish,
            };
            l.generated += 1;
            if let Ok(mut s) = self.stats.lock() {
                s.generated_tokens += 1;
            }
            let keep = catch_unwind(AssertUnwindSafe(|| l.sink.token(&delta))).unwrap_or(false);
            match (finish, keep) {
                (Some(r), _) => self.end(ev.seq, Outcome::Finished(r)),
                (None, false) => self.end(ev.seq, Outcome::Cancelled),
                (None, true) => {}
            }
        }
    }

    /// Ends a live request: frees it in the engine and the batcher, sends its completion.
    fn end(&mut self, seq: SeqId, outcome: Outcome) {
        self.engine.remove(seq);
        self.driver.finish(seq);
        let Some(mut l) = self.live.remove(&seq) else {
            return;
        };
        if let Ok(mut s) = self.stats.lock() {
            s.live = self.live.len() as u64;
            match &outcome {
                Outcome::Finished(_) => s.finished += 1,
                Outcome::Cancelled => s.cancelled += 1,
                Outcome::Failed(_) => s.failed += 1,
            }
        }
        let tail = l.stop.flush();
        finish_sink_with(&mut l.sink, outcome, l.prompt_len, l.generated, tail);
    }

    fn fail_all(&mut self, msg: &str) {
        let ids: Vec<SeqId> = self.live.keys().copied().collect();
        for id in ids {
            self.end(id, Outcome::Failed(Error::Internal(msg.to_string())));
        }
    }

    fn publish(&mut self) {
        let scheduled = std::mem::take(&mut self.scheduled);
        let snapshot = {
            let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            s.active = self.driver.batcher().running() as u64;
            s.waiting = self.driver.batcher().waiting() as u64;
            s.scheduled = scheduled as u64;
            s.live = self.live.len() as u64;
            s.kv_bytes_in_use = self.driver.batcher().kv_used();
            s.kv_bytes_max = s.kv_bytes_max.max(s.kv_bytes_in_use);
            s.clone()
        };
        if let Some(m) = &self.cfg.metrics {
            m.set_requests(
                self.driver.batcher().waiting(),
                self.driver.batcher().running(),
            );
        }
        if let Some(f) = &self.cfg.on_step {
            let _ = catch_unwind(AssertUnwindSafe(|| f(&snapshot)));
        }
    }
}

/// The message of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

#[cfg(test)]
mod tests;
