//! Between a host's [`Server::submit`](super::Server::submit) and the engine thread: the prompt's
//! size is checked before anything reads it, and text prompts are tokenized on a thread of their
//! own, so that neither the host's calling thread (Triton's instance thread) nor the engine's
//! steps wait while a long text is tokenized.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::config::DEFAULT_PROMPT_BYTES_PER_TOKEN;
use super::{finish_sink, panic_message, Msg, Outcome, Prompt, ServeStats, Submitted};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The prompt limits of one server, checked on the submitting thread in constant time.
#[derive(Debug, Clone, Copy)]
pub(super) struct PromptLimits {
    /// Largest prompt text, in bytes.
    pub text_bytes: usize,
    /// Whether `text_bytes` is the default (derived from the context) rather than configured.
    pub derived: bool,
    /// The model's context, in tokens.
    pub context: usize,
}

impl PromptLimits {
    /// Refuses a prompt that cannot fit, before it is read: a text over the byte limit, or more
    /// token ids than the context holds.
    pub fn check(&self, prompt: &Prompt) -> Result<()> {
        match prompt {
            Prompt::Text { text, .. } if text.len() > self.text_bytes => {
                let why = if self.derived {
                    format!(
                        "{DEFAULT_PROMPT_BYTES_PER_TOKEN} bytes for each of the model's {} \
                         context tokens",
                        self.context
                    )
                } else {
                    "configured".to_string()
                };
                Err(Error::InvalidRequest(format!(
                    "the prompt text is {} bytes, over the limit of {} bytes (max_prompt_bytes, \
                     {why}); it was not tokenized",
                    text.len(),
                    self.text_bytes
                )))
            }
            Prompt::Ids(ids) if ids.len() > self.context => Err(Error::InvalidRequest(format!(
                "the prompt has {} token ids, over the model's context of {} tokens",
                ids.len(),
                self.context
            ))),
            _ => Ok(()),
        }
    }
}

/// The tokenizing thread: takes text requests, tokenizes them and hands them to the engine thread.
pub(super) struct Intake {
    tx: Option<Sender<Box<Submitted>>>,
    thread: Option<JoinHandle<()>>,
}

impl Intake {
    /// Starts the thread; it forwards to `engine`.
    pub fn start(
        name: &str,
        tokenizer: Option<Arc<Tokenizer>>,
        engine: Sender<Msg>,
        stats: Arc<Mutex<ServeStats>>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-tokenize"))
            .spawn(move || run(rx, tokenizer, engine, stats))
            .map_err(|e| Error::Internal(format!("cannot start the tokenizer thread: {e}")))?;
        Ok(Intake {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a text request; `Err` gives it back when the thread is gone.
    pub fn send(&self, s: Box<Submitted>) -> std::result::Result<(), Box<Submitted>> {
        match &self.tx {
            Some(tx) => tx.send(s).map_err(|mpsc::SendError(s)| s),
            None => Err(s),
        }
    }

    /// Stops the thread after it has handed on every request already queued.
    pub fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    rx: Receiver<Box<Submitted>>,
    tokenizer: Option<Arc<Tokenizer>>,
    engine: Sender<Msg>,
    stats: Arc<Mutex<ServeStats>>,
) {
    for mut s in rx {
        let text = match std::mem::replace(&mut s.req.prompt, Prompt::Ids(Vec::new())) {
            Prompt::Text { text, add_bos } => Some((text, add_bos)),
            ids @ Prompt::Ids(_) => {
                s.req.prompt = ids;
                None
            }
        };
        if let Some((text, add_bos)) = text {
            let encoded = catch_unwind(AssertUnwindSafe(|| encode(&tokenizer, &text, add_bos)))
                .unwrap_or_else(|p| {
                    Err(Error::Internal(format!(
                        "tokenization panicked: {}",
                        panic_message(&p)
                    )))
                });
            match encoded {
                Ok(ids) => s.prompt = ids,
                Err(e) => {
                    stats.lock().map(|mut st| st.failed += 1).ok();
                    finish_sink(&mut s.sink, Outcome::Failed(e), 0, 0);
                    continue;
                }
            }
        }
        if let Err(mpsc::SendError(Msg::Submit(mut s))) = engine.send(Msg::Submit(s)) {
            let e = Error::Internal("the engine thread has stopped".into());
            finish_sink(&mut s.sink, Outcome::Failed(e), s.prompt.len(), 0);
        }
    }
}

fn encode(tokenizer: &Option<Arc<Tokenizer>>, text: &str, add_bos: bool) -> Result<Vec<u32>> {
    let tok = tokenizer.as_ref().ok_or_else(|| {
        Error::InvalidRequest("the model has no tokenizer.json: send token ids (input_ids)".into())
    })?;
    tok.encode(text, add_bos)
}
