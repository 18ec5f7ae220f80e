//! What hosts submit to the serving loop and what it sends back: requests, streamed tokens,
//! completions and the sink they go to.

use crate::engine::FinishReason;
use crate::error::Error;
use crate::sampling::SamplingParams;

/// A prompt, as text (tokenized with the model's tokenizer) or token ids (used as given).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text; BOS is prepended when `add_bos` and the model has one (as `pregate generate` does).
    Text {
        /// The prompt text.
        text: String,
        /// Prepend the model's BOS id.
        add_bos: bool,
    },
    /// Token ids, used exactly as given.
    Ids(Vec<u32>),
}

/// One generation request as a host submits it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Strings that end generation; the text is cut before the first one found. While streaming,
    /// text that may still begin one is held back (see [`TokenDelta::text`]).
    pub stop: Vec<String>,
    /// Token ids that end generation (the id is emitted).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS.
    pub ignore_eos: bool,
}

impl ServeRequest {
    /// A greedy request for `max_new_tokens` tokens after `prompt`.
    pub fn greedy(prompt: Prompt, max_new_tokens: usize) -> Self {
        ServeRequest {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// One generated token as streamed to a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenDelta {
    /// The token id.
    pub token: u32,
    /// The text it releases: empty while a UTF-8 character is incomplete, or without a tokenizer.
    /// Text that may still be the beginning of a stop string is held back and comes with a later
    /// token, once it cannot be (a client never receives part of a stop string); the last token
    /// brings whatever is held. The concatenated texts (and [`Completion::tail`]) are therefore
    /// exactly the generated text, cut before the stop string that ended it.
    pub text: String,
    /// Its index among the generated tokens (0-based).
    pub index: usize,
    /// Set on the last token: the sequence finished with it.
    pub finish: Option<FinishReason>,
}

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    /// It finished normally; the last [`TokenDelta`] carried the same reason.
    Finished(FinishReason),
    /// It was cancelled (by the client or the host) or the client went away.
    Cancelled,
    /// It failed; no more tokens follow.
    Failed(Error),
}

/// The final event of a request.
#[derive(Debug)]
pub struct Completion {
    /// How it ended.
    pub outcome: Outcome,
    /// Prompt tokens (0 when it failed before tokenization).
    pub prompt_tokens: usize,
    /// Tokens delivered.
    pub generated: usize,
    /// Text held back from the streamed deltas (a possible stop-string beginning) when the request
    /// ended without a final token (cancelled or failed); empty otherwise, since a final token
    /// carries it. A host that streams sends it before the final event, so that what the client
    /// received adds up to what was generated.
    pub tail: String,
}

/// Where a request's events go. Called on the engine thread only.
pub trait ResponseSink: Send {
    /// A new token. Return `false` when the client is gone: the request is then cancelled.
    fn token(&mut self, delta: &TokenDelta) -> bool;
    /// The final event; called exactly once, last.
    fn finish(&mut self, done: Completion);
    /// Polled before every step: whether the client cancelled the request.
    fn is_cancelled(&mut self) -> bool {
        false
    }
}
