//! The Read-ME router (`cluster_predictor`), with the released code's exact semantics.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::weights::RouterWeights;
use crate::ops::{attention, linear, rms_norm, AttentionShape, RopeTable};
use crate::route::{RoutePlan, RouteScope, TokenRoute};

/// RMSNorm epsilon of the released router (fixed, independent of the backbone's).
pub(crate) const ROUTER_EPS: f32 = 1e-6;

/// One request's router KV cache (one block: `embedding_dim` keys and values per token).
#[derive(Debug, Clone, Default)]
pub struct RouterState {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
}

impl RouterState {
    /// Tokens routed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was routed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The Read-ME pre-gating router.
#[derive(Debug, Clone)]
pub struct ReadMeRouter {
    w: RouterWeights,
    dim: usize,
    shape: AttentionShape,
    top_k: usize,
    n_experts: usize,
    vocab: usize,
    rope: RopeTable,
}

impl ReadMeRouter {
    /// A router over `weights` (which carry the router's own configuration) for the model `cfg`
    /// (vocabulary, experts, top-k, RoPE base).
    pub fn new(weights: RouterWeights, cfg: &ModelConfig) -> Self {
        let r = &weights.config;
        let head_dim = r.head_dim();
        ReadMeRouter {
            dim: r.embedding_dim,
            shape: AttentionShape {
                n_heads: r.n_head,
                n_kv_heads: r.n_head,
                head_dim,
                // Read-ME divides by `normalizer`, not by sqrt(head_dim).
                scale: 1.0 / r.normalizer,
                window: None,
            },
            top_k: cfg.router_top_k,
            n_experts: cfg.n_cluster,
            vocab: cfg.vocab_size,
            rope: RopeTable::new(
                head_dim,
                cfg.rope_theta,
                r.max_position_embeddings_predictor,
            ),
            w: weights,
        }
    }

    /// A fresh per-request state with room for `max_len` tokens.
    pub fn new_state(&self, max_len: usize) -> RouterState {
        // A reservation, not a limit: bounded, since `max_len` comes from a request and a config.
        let cap = max_len.min(self.rope.max_pos()).min(4096) * self.dim;
        RouterState {
            k: Vec::with_capacity(cap),
            v: Vec::with_capacity(cap),
            len: 0,
        }
    }

    /// An empty route plan of this router's shape.
    pub fn new_plan(&self) -> RoutePlan {
        RoutePlan::new(self.n_experts, RouteScope::AllLayers)
    }

    /// Experts per layer.
    pub fn num_experts(&self) -> usize {
        self.n_experts
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// The router logits (`[T, N]`) of `tokens`, which follow the tokens already in `state`.
    pub fn logits(&self, state: &mut RouterState, tokens: &[u32]) -> Result<Vec<f32>> {
        self.logits_batch(&mut [state], &[tokens])
    }

    /// The router logits of several requests' new tokens at once: `tokens[i]` follows the tokens
    /// already in `states[i]`. Returns `[sum T_i, N]`, the requests' rows in order. Every
    /// token-wise layer runs once over all the rows (a decode step's tokens share one pass over
    /// the weights instead of one per request); only RoPE and attention are per request. Inputs
    /// are checked before any state changes, so on error no state has advanced.
    pub fn logits_batch(
        &self,
        states: &mut [&mut RouterState],
        tokens: &[&[u32]],
    ) -> Result<Vec<f32>> {
        if states.len() != tokens.len() {
            return Err(Error::Internal(format!(
                "router: {} states for {} token lists",
                states.len(),
                tokens.len()
            )));
        }
        for (state, toks) in states.iter().zip(tokens) {
            self.check(state, toks)?;
        }
        let d = self.dim;
        let t: usize = tokens.iter().map(|x| x.len()).sum();
        let w = &self.w;
        let mut x = Vec::with_capacity(t * d);
        for &id in tokens.iter().flat_map(|x| x.iter()) {
            x.extend_from_slice(w.embed.row(id as usize));
        }
        let mut h = vec![0.0; t * d];
        rms_norm(&x, &w.input_norm, ROUTER_EPS, &mut h);
        let mut q = vec![0.0; t * d];
        let mut k = vec![0.0; t * d];
        let mut v = vec![0.0; t * d];
        linear(&h, t, &w.q, &mut q);
        linear(&h, t, &w.k, &mut k);
        linear(&h, t, &w.v, &mut v);
        let mut att = vec![0.0; t * d];
        // RoPE, the KV append and attention are per request; requests run in parallel, since at
        // long contexts reading each request's router KV cache is most of the router's time.
        let mut work = Vec::with_capacity(states.len());
        let (mut qr, mut kr, mut vr, mut ar) = (&mut q[..], &mut k[..], &v[..], &mut att[..]);
        for (state, toks) in states.iter_mut().zip(tokens) {
            let n = toks.len() * d;
            let (qi, qrest) = std::mem::take(&mut qr).split_at_mut(n);
            let (ki, krest) = std::mem::take(&mut kr).split_at_mut(n);
            let (vi, vrest) = vr.split_at(n);
            let (ai, arest) = std::mem::take(&mut ar).split_at_mut(n);
            (qr, kr, vr, ar) = (qrest, krest, vrest, arest);
            work.push((&mut **state, qi, ki, vi, ai));
        }
        let one = |(state, q, k, v, att): (
            &mut RouterState,
            &mut [f32],
            &mut [f32],
            &[f32],
            &mut [f32],
        )| {
            let start = state.len;
            for (i, (qi, ki)) in q.chunks_exact_mut(d).zip(k.chunks_exact_mut(d)).enumerate() {
                self.rope.apply(qi, start + i);
                self.rope.apply(ki, start + i);
            }
            state.k.extend_from_slice(k);
            state.v.extend_from_slice(v);
            state.len += q.len() / d;
            attention(q, &state.k, &state.v, start, &self.shape, att);
        };
        if work.len() > 1 {
            work.into_par_iter().for_each(one);
        } else {
            work.into_iter().for_each(one);
        }
        let mut o = vec![0.0; t * d];
        linear(&att, t, &w.o, &mut o);
        for (xi, oi) in x.iter_mut().zip(&o) {
            *xi += oi;
        }
        rms_norm(&x, &w.post_norm, ROUTER_EPS, &mut h);
        let f = w.proj_1.weight.rows;
        let mut mid = vec![0.0; t * f];
        linear(&h, t, &w.proj_1, &mut mid);
        for m in mid.iter_mut() {
            *m = crate::ops::silu(*m);
        }
        linear(&mid, t, &w.proj_2, &mut o);
        for (xi, oi) in x.iter_mut().zip(&o) {
            *xi += oi;
        }
        rms_norm(&x, &w.out_norm, ROUTER_EPS, &mut h);
        let mut logits = vec![0.0; t * self.n_experts];
        linear(&h, t, &w.proj_out, &mut logits);
        Ok(logits)
    }

    /// Rejects tokens that would pass the router's context or fall outside its vocabulary.
    fn check(&self, state: &RouterState, tokens: &[u32]) -> Result<()> {
        check_tokens(state.len, self.rope.max_pos(), self.vocab, tokens)
    }

    /// Routes `tokens` (which follow those already in `state`): one route per token, for every layer.
    pub fn route(&self, state: &mut RouterState, tokens: &[u32]) -> Result<Vec<TokenRoute>> {
        Ok(self.routes_from_logits(&self.logits(state, tokens)?))
    }

    /// One route per row of router logits (`[T, N]`): the top-k experts with softmax weights
    /// (top-1 with weight 1 by default).
    pub fn routes_from_logits(&self, logits: &[f32]) -> Vec<TokenRoute> {
        logits
            .chunks_exact(self.n_experts)
            .map(|l| super::select_top_k(l, self.top_k))
            .collect()
    }

    /// Routes several requests' new tokens in one pass ([`Self::logits_batch`]): one route list
    /// per request, in order.
    pub fn route_batch(
        &self,
        states: &mut [&mut RouterState],
        tokens: &[&[u32]],
    ) -> Result<Vec<Vec<TokenRoute>>> {
        let logits = self.logits_batch(states, tokens)?;
        Ok(super::routes_per_sequence(
            &logits,
            self.n_experts,
            self.top_k,
            tokens,
        ))
    }
}

/// Rejects `tokens` that, after `routed` tokens, would pass a router context of `max_pos` or fall
/// outside a vocabulary of `vocab` ids: the same check wherever the router runs.
pub(crate) fn check_tokens(
    routed: usize,
    max_pos: usize,
    vocab: usize,
    tokens: &[u32],
) -> Result<()> {
    if routed + tokens.len() > max_pos {
        return Err(Error::InvalidRequest(format!(
            "the router's context of {max_pos} tokens is exceeded ({routed} + {})",
            tokens.len()
        )));
    }
    if let Some(bad) = tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::InvalidRequest(format!(
            "token id {bad} is outside the vocabulary (0..{vocab})"
        )));
    }
    Ok(())
}
