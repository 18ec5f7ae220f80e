//! The Read-ME router (`cluster_predictor`), with the released code's exact semantics.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::weights::RouterWeights;
use crate::ops::{attention, linear, rms_norm, AttentionShape, RopeTable};
use crate::route::{RoutePlan, RouteScope, TokenRoute};

/// RMSNorm epsilon of the released router (fixed, independent of the backbone's).
const ROUTER_EPS: f32 = 1e-6;

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
    /// A router over `weights` for the model `cfg`.
    pub fn new(weights: RouterWeights, cfg: &ModelConfig) -> Self {
        let head_dim = cfg.router_head_dim();
        ReadMeRouter {
            w: weights,
            dim: cfg.embedding_dim,
            shape: AttentionShape {
                n_heads: cfg.n_head,
                n_kv_heads: cfg.n_head,
                head_dim,
                // Read-ME divides by `normalizer`, not by sqrt(head_dim).
                scale: 1.0 / cfg.normalizer,
            },
            top_k: cfg.router_top_k,
            n_experts: cfg.n_cluster,
            vocab: cfg.vocab_size,
            rope: RopeTable::new(
                head_dim,
                cfg.rope_theta,
                cfg.max_position_embeddings_predictor,
            ),
        }
    }

    /// A fresh per-request state with room for `max_len` tokens.
    pub fn new_state(&self, max_len: usize) -> RouterState {
        let cap = max_len.min(self.rope.max_pos()) * self.dim;
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
        let t = tokens.len();
        let d = self.dim;
        if state.len + t > self.rope.max_pos() {
            return Err(Error::InvalidRequest(format!(
                "the router's context of {} tokens is exceeded ({} + {t})",
                self.rope.max_pos(),
                state.len
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (0..{})",
                self.vocab
            )));
        }
        let w = &self.w;
        let mut x = Vec::with_capacity(t * d);
        for &id in tokens {
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
        for i in 0..t {
            let pos = state.len + i;
            self.rope.apply(&mut q[i * d..(i + 1) * d], pos);
            self.rope.apply(&mut k[i * d..(i + 1) * d], pos);
        }
        let start = state.len;
        state.k.extend_from_slice(&k);
        state.v.extend_from_slice(&v);
        state.len += t;
        let mut att = vec![0.0; t * d];
        attention(&q, &state.k, &state.v, start, &self.shape, &mut att);
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

    /// Routes `tokens` (which follow those already in `state`): one route per token, for every layer.
    pub fn route(&self, state: &mut RouterState, tokens: &[u32]) -> Result<Vec<TokenRoute>> {
        let logits = self.logits(state, tokens)?;
        Ok(logits
            .chunks_exact(self.n_experts)
            .map(|l| super::select_top_k(l, self.top_k))
            .collect())
    }
}
