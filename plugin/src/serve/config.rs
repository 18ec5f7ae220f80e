//! How the serving loop runs: its configuration and the admission defaults.

use std::sync::Arc;
use std::time::Duration;

use super::ServeStats;
use crate::batcher::BatcherConfig;
use crate::metrics::ModelMetrics;

/// A callback with a metrics snapshot, called on the engine thread after every step.
pub type StepObserver = Arc<dyn Fn(&ServeStats) + Send + Sync>;

/// How the serving loop runs.
#[derive(Clone)]
pub struct ServeConfig {
    /// The batcher's policy and guards.
    pub batcher: BatcherConfig,
    /// How often an idle loop with live but unschedulable requests polls for cancellation.
    pub idle_poll: Duration,
    /// Called with a stats snapshot after every step (and after admissions and finishes).
    pub on_step: Option<StepObserver>,
    /// The thread's name.
    pub thread_name: String,
    /// Steps after the one about to run that the lookahead passed to [`Engine::prepare`](crate::engine::Engine::prepare) covers
    /// (pending tokens are known; tokens not yet sampled are not).
    pub lookahead_steps: usize,
    /// The library metrics to record into (a model's labelled handles), if any.
    pub metrics: Option<ModelMetrics>,
    /// Longest a request may wait, from its submission, to be admitted by the batcher; past it the
    /// request fails as overloaded instead of queueing without bound while the server cannot keep
    /// up (`None`: unbounded; default [`DEFAULT_MAX_QUEUE_WAIT`]). Checked once per loop
    /// iteration, so the failure comes at most one step late.
    pub max_queue_wait: Option<Duration>,
    /// Most requests that may wait for admission at once; a request arriving when that many
    /// wait is refused at once as overloaded rather than queued behind work the server may not
    /// reach within `max_queue_wait` (`None`: unbounded; default [`DEFAULT_MAX_WAITING`]). New
    /// requests are taken in between steps, so the refusal comes at most one step after
    /// submission.
    pub max_waiting: Option<usize>,
    /// Largest prompt text accepted, in bytes, checked before any tokenization so that a huge
    /// text costs nothing but its refusal (`None`: [`DEFAULT_PROMPT_BYTES_PER_TOKEN`] bytes for
    /// each token of the model's context). Token-id prompts are bounded by the context itself.
    pub max_prompt_bytes: Option<usize>,
    /// KV memory the admitted requests may hold together, in bytes: a request reserves its
    /// worst case, `(prompt + max_new_tokens) x` the KV bytes of one token, when the batcher
    /// admits it, and waits (within `max_queue_wait`) while the reservations of those admitted
    /// leave no room; one whose worst case exceeds the whole budget is refused at once
    /// (`None`: no budget beyond `batcher.max_running` requests of the whole context).
    pub kv_memory_bytes: Option<u64>,
}

/// The prompt-text bytes allowed per context token when [`ServeConfig::max_prompt_bytes`] is
/// unset: 32, generous (a BPE token of English text averages about 4 bytes, and no common
/// tokenizer has tokens much longer than 16), so that only a text that could never fit the
/// context is refused unread.
pub const DEFAULT_PROMPT_BYTES_PER_TOKEN: usize = 32;

impl ServeConfig {
    /// The prompt-text byte limit for a model of `max_context` tokens.
    pub fn prompt_byte_limit(&self, max_context: usize) -> usize {
        self.max_prompt_bytes
            .unwrap_or_else(|| max_context.saturating_mul(DEFAULT_PROMPT_BYTES_PER_TOKEN))
    }
}

/// The default [`ServeConfig::max_queue_wait`]: 30 s, long enough for any burst a server keeps
/// up with on average, short enough that a client of an overloaded server hears so.
pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(30);

/// The default [`ServeConfig::max_waiting`]: 1024 requests waiting for admission.
pub const DEFAULT_MAX_WAITING: usize = 1024;

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("batcher", &self.batcher)
            .field("idle_poll", &self.idle_poll)
            .field("on_step", &self.on_step.is_some())
            .field("thread_name", &self.thread_name)
            .field("lookahead_steps", &self.lookahead_steps)
            .field("metrics", &self.metrics.is_some())
            .field("max_queue_wait", &self.max_queue_wait)
            .field("max_waiting", &self.max_waiting)
            .field("max_prompt_bytes", &self.max_prompt_bytes)
            .field("kv_memory_bytes", &self.kv_memory_bytes)
            .finish()
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            batcher: BatcherConfig::default(),
            idle_poll: Duration::from_millis(2),
            on_step: None,
            thread_name: "pregate-engine".into(),
            lookahead_steps: 4,
            metrics: None,
            max_queue_wait: Some(DEFAULT_MAX_QUEUE_WAIT),
            max_waiting: Some(DEFAULT_MAX_WAITING),
            max_prompt_bytes: None,
            kv_memory_bytes: None,
        }
    }
}
