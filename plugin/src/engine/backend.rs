//! The backend interface: what a device (CPU, CUDA) implements to run the backbone.
//!
//! A backend owns the weights and the KV cache of every sequence on its device. It knows nothing of
//! requests, sampling or scheduling: the [`Engine`](super::Engine) drives it one step at a time with
//! chunks of tokens whose routes are already known.

use crate::cache::ExpertCache;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::route::{RoutePlan, RouteScope, TokenRoute};

/// An engine-wide sequence id.
pub type SeqId = u64;

/// A contiguous run of one sequence's tokens to compute in a step.
#[derive(Debug, Clone, Copy)]
pub struct ForwardChunk<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// The tokens, in order.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence; the backend's KV cache holds exactly this many tokens.
    pub start_pos: usize,
    /// The sequence's route plan; `tokens[i]` has the route `routes.route(route_offset + i, layer)`.
    pub routes: &'a RoutePlan,
    /// Index in `routes` of `tokens[0]`.
    pub route_offset: usize,
    /// Whether the logits after the last token are wanted (it completes the known tokens).
    pub want_logits: bool,
}

impl ForwardChunk<'_> {
    /// Checks the chunk against the backend's state of its sequence: `cached` tokens in its KV
    /// cache, room reserved for `reserved`, and a vocabulary of `vocab` ids. Every backend calls it
    /// for every chunk before touching any KV cache, so a bad chunk changes nothing.
    pub fn check(&self, cached: usize, reserved: usize, vocab: usize) -> Result<()> {
        self.check_tokens(cached, reserved, vocab)?;
        if self.routes.len() < self.route_offset + self.tokens.len() {
            return Err(Error::Internal(format!(
                "sequence {}: routes missing",
                self.seq
            )));
        }
        Ok(())
    }

    /// [`ForwardChunk::check`] without the routes: what a backend whose layers route themselves
    /// (an in-model gate) checks, since no route is known before its forward pass.
    pub fn check_tokens(&self, cached: usize, reserved: usize, vocab: usize) -> Result<()> {
        if cached != self.start_pos {
            return Err(Error::Internal(format!(
                "sequence {}: chunk starts at {} but {cached} tokens are cached",
                self.seq, self.start_pos
            )));
        }
        if self.start_pos + self.tokens.len() > reserved {
            return Err(Error::Capacity(format!(
                "sequence {} would exceed its {reserved} reserved tokens",
                self.seq
            )));
        }
        if let Some(bad) = self.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (0..{vocab})"
            )));
        }
        Ok(())
    }
}

/// The routes of a step's tokens (every chunk's, in order), per layer: one list when every chunk's
/// routes serve all layers (Read-ME), else one list per layer. [`StepRoutes::layer`] gives the list
/// a layer uses; both backends hand it to their expert runtime.
#[derive(Debug, Clone)]
pub struct StepRoutes(Vec<Vec<TokenRoute>>);

impl StepRoutes {
    /// The routes of `chunks` for a model of `layers` layers.
    pub fn of(chunks: &[ForwardChunk<'_>], layers: usize) -> Self {
        let at = |l: usize| -> Vec<TokenRoute> {
            chunks
                .iter()
                .flat_map(|c| {
                    (0..c.tokens.len()).map(move |i| *c.routes.route(c.route_offset + i, l))
                })
                .collect()
        };
        let shared = chunks
            .iter()
            .all(|c| c.routes.scope() == RouteScope::AllLayers);
        StepRoutes(if shared || layers == 0 {
            vec![at(0)]
        } else {
            (0..layers).map(at).collect()
        })
    }

    /// The routes layer `layer` uses, one per token of the step.
    pub fn layer(&self, layer: usize) -> &[TokenRoute] {
        &self.0[layer.min(self.0.len() - 1)]
    }
}

/// The experts an in-model gate chose for one chunk's tokens, at every layer: what a backend
/// traces (see [`Backend::trace_routes`]) so that every token's experts can be compared with a
/// reference implementation's.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRoutes {
    /// The sequence.
    pub seq: SeqId,
    /// Position of the chunk's first token.
    pub start_pos: usize,
    /// `layers[l][i]`: the route of token `start_pos + i` at layer `l`; empty for a dense layer.
    pub layers: Vec<Vec<TokenRoute>>,
}

/// A backend's route trace after [`Backend::trace_routes`]`(on)`: an empty trace when on, none
/// when off. Tracing is refused for a model routed before the backbone (`in_model` false): the
/// engine's routes are its routes, and nothing inside the model makes any.
pub fn route_trace(on: bool, in_model: bool) -> Result<Option<Vec<ChunkRoutes>>> {
    if on && !in_model {
        return Err(Error::InvalidArgument(
            "this model is routed before the backbone (its routes are the engine's): there are \
             no in-model routes to trace"
                .into(),
        ));
    }
    Ok(on.then(Vec::new))
}

/// The speculation a backend runs: `cfg` switched on or off as `on` says, or, with `on` unset,
/// on when `pays` (the backend's default: an in-model router and a cache smaller than the
/// experts). Asking for it with a pre-gate router (`in_model` false) is an error.
pub fn speculation_config(
    on: Option<bool>,
    cfg: crate::moe::SpeculatorConfig,
    in_model: bool,
    pays: impl FnOnce() -> bool,
) -> Result<crate::moe::SpeculatorConfig> {
    let cfg = crate::moe::SpeculatorConfig {
        enabled: on.unwrap_or_else(pays),
        ..cfg
    };
    cfg.validate()?;
    if cfg.enabled && !in_model {
        return Err(Error::InvalidArgument(
            "speculative prefetch predicts in-model gates; this model's routes come from its \
             pre-gate router and are exact"
                .into(),
        ));
    }
    Ok(cfg)
}

/// Refuses a sequence longer than the model's positions: every backend checks a reservation
/// against it before allocating anything.
pub fn check_max_len(cfg: &ModelConfig, max_len: usize) -> Result<()> {
    if max_len > cfg.max_position_embeddings {
        return Err(Error::InvalidRequest(format!(
            "sequence of {max_len} tokens exceeds max_position_embeddings {}",
            cfg.max_position_embeddings
        )));
    }
    Ok(())
}

/// Upcoming work, as far as the scheduler knows it: the hint a backend with an expert cache uses to
/// evict by next use and to prefetch. Each entry is the routes of one future step, nearest first.
#[derive(Debug, Clone, Default)]
pub struct Lookahead {
    /// Route plans of the next steps, nearest first.
    pub steps: Vec<RoutePlan>,
}

/// A compute device running the backbone (embedding, attention, routed experts, lm_head).
pub trait Backend: Send {
    /// A short name for logs and metrics (`cpu`, `cuda:0`).
    fn device_name(&self) -> String;

    /// The model configuration the backend was built from.
    fn config(&self) -> &ModelConfig;

    /// Reserves KV space for a sequence of up to `max_len` tokens.
    fn add_sequence(&mut self, seq: SeqId, max_len: usize) -> Result<()>;

    /// Frees a sequence's KV space; unknown ids are ignored.
    fn remove_sequence(&mut self, seq: SeqId);

    /// Runs the backbone over `chunks` (distinct sequences) and appends their keys and values to the
    /// KV cache. Returns the logits (`vocab_size` floats) of every chunk with `want_logits`, in order.
    fn forward(&mut self, chunks: &[ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>>;

    /// Tells the backend what comes after the step about to run (no-op for a backend without an
    /// expert cache).
    fn prepare(&mut self, _lookahead: &Lookahead) -> Result<()> {
        Ok(())
    }

    /// The speculative prefetch's counters (recall per distance, loads), when the backend
    /// speculates (an in-model router with a cache smaller than the experts).
    fn speculation_stats(&self) -> Option<crate::moe::SpeculationStats> {
        None
    }

    /// The backend's expert cache, when it has one: per-layer residency (what the batcher's
    /// expert-load budget reads) and the hit / miss / eviction / load counters (what the metrics
    /// report). `None` for a backend that keeps every expert resident without bookkeeping.
    fn expert_cache(&self) -> Option<&ExpertCache> {
        None
    }

    /// Seconds compute has waited for expert loads so far (cumulative). 0 for a backend that does
    /// not measure it, or performs no loads (the CPU backend's cache is accounting only).
    fn expert_stall_seconds(&self) -> f64 {
        0.0
    }

    /// Starts (or stops) recording the routes an in-model gate makes in each forward pass, for
    /// [`Backend::take_route_trace`]. An error for a backend that does not route in the model.
    fn trace_routes(&mut self, on: bool) -> Result<()> {
        match on {
            false => Ok(()),
            true => Err(Error::InvalidArgument(format!(
                "backend {} makes no in-model routes to trace",
                self.device_name()
            ))),
        }
    }

    /// The routes the last forward pass made inside the model, one entry per chunk in order, when
    /// tracing is on (empty otherwise); taking them clears them.
    fn take_route_trace(&mut self) -> Vec<ChunkRoutes> {
        Vec::new()
    }

    /// Whether the backend runs the router itself, on its device ([`Backend::route_logits`]);
    /// otherwise the engine routes on the host.
    fn routes_tokens(&self) -> bool {
        false
    }

    /// The router's logits (`[sum T_i, N]`, rows in order) of `tokens[i]`, which follow the tokens
    /// sequence `seqs[i]` was routed with before. The router's state (its KV cache) lives with the
    /// sequence, from [`Backend::add_sequence`] to [`Backend::remove_sequence`]. Inputs are checked
    /// before any state changes, so on error no sequence's router has advanced.
    fn route_logits(&mut self, _seqs: &[SeqId], _tokens: &[&[u32]]) -> Result<Vec<f32>> {
        Err(Error::Internal(format!(
            "backend {} does not run the router",
            self.device_name()
        )))
    }
}
