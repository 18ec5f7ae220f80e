//! Routers: what picks every token's experts.
//!
//! Two kinds exist ([`RouterKind`]). A **pre-gate** router routes from the token ids alone, before
//! the backbone runs: the Read-ME `cluster_predictor` ([`ReadMeRouter`], one small causal block
//! over its own embedding table with a per-request KV cache) and the DSelect-k static gate
//! ([`StaticGateRouter`]). Every layer's experts are then known ahead, which the lookahead
//! batcher and the expert cache's Belady eviction and prefetch use. An **in-model** gate routes
//! each layer's hidden state during the forward pass (the real MoE families); its routes are
//! known only as the layer runs, so the batcher and the cache work without them (see
//! [`crate::batcher`] and [`crate::cache`]).
//!
//! The engine holds a `Box<dyn Router>`. Where a router runs is the router's own option: the
//! Read-ME router runs on the host ([`HostReadMeRouter`], batched over a step's sequences) or on
//! a CUDA device (`crate::cuda::CudaReadMeRouter`, f32, with a paged router KV cache), behind
//! the same trait.

pub mod dselect;
pub mod in_model;
mod readme;

pub use in_model::InModelRouter;
pub(crate) use readme::{check_tokens, ROUTER_EPS};
pub use readme::{ReadMeRouter, RouterState};

use std::collections::HashMap;

use crate::engine::SeqId;
use crate::error::{Error, Result};
use crate::route::{ExpertId, RoutePlan, RouteScope, TokenRoute};

/// When a router's routes are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterKind {
    /// From the token ids, before the backbone runs: routes are known a step ahead.
    PreGate,
    /// From each layer's hidden state, inside the forward pass: routes are known as layers run.
    InModel,
}

/// A router the engine drives: it keeps each sequence's routing state (e.g. a router KV cache)
/// from [`Router::open`] to [`Router::close`], and routes a step's new tokens of many sequences
/// in one call.
pub trait Router: Send {
    /// Pre-gate or in-model.
    fn kind(&self) -> RouterKind;

    /// Routed experts per layer.
    fn num_experts(&self) -> usize;

    /// Most experts per token.
    fn top_k(&self) -> usize;

    /// Where it runs (`host`, `cuda:0`), for logs.
    fn placement(&self) -> String;

    /// An empty route plan of this router's shape.
    fn new_plan(&self) -> RoutePlan {
        RoutePlan::new(self.num_experts(), RouteScope::AllLayers)
    }

    /// Starts the routing state of a sequence of up to `max_len` tokens.
    fn open(&mut self, seq: SeqId, max_len: usize) -> Result<()>;

    /// Drops a sequence's routing state; unknown ids are ignored.
    fn close(&mut self, seq: SeqId);

    /// Routes `tokens[i]`, which follow the tokens sequence `seqs[i]` was routed with before: one
    /// list of token routes per sequence, in order (for a scope of per-layer routes, one route per
    /// layer for each token). Inputs are checked before any state changes, so on error no
    /// sequence's state has advanced. An in-model router returns no routes (empty lists).
    fn route(&mut self, seqs: &[SeqId], tokens: &[&[u32]]) -> Result<Vec<Vec<TokenRoute>>>;
}

/// The Read-ME router on the host: f32, batched over a step's sequences, one router KV cache
/// per sequence.
pub struct HostReadMeRouter {
    router: ReadMeRouter,
    states: HashMap<SeqId, RouterState>,
}

impl HostReadMeRouter {
    /// Wraps `router`.
    pub fn new(router: ReadMeRouter) -> Self {
        HostReadMeRouter {
            router,
            states: HashMap::new(),
        }
    }

    /// The router itself.
    pub fn inner(&self) -> &ReadMeRouter {
        &self.router
    }
}

impl Router for HostReadMeRouter {
    fn kind(&self) -> RouterKind {
        RouterKind::PreGate
    }

    fn num_experts(&self) -> usize {
        self.router.num_experts()
    }

    fn top_k(&self) -> usize {
        self.router.top_k()
    }

    fn placement(&self) -> String {
        "host".into()
    }

    fn open(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        self.states.insert(seq, self.router.new_state(max_len));
        Ok(())
    }

    fn close(&mut self, seq: SeqId) {
        self.states.remove(&seq);
    }

    fn route(&mut self, seqs: &[SeqId], tokens: &[&[u32]]) -> Result<Vec<Vec<TokenRoute>>> {
        let mut states = states_in_order(&mut self.states, seqs)?;
        self.router.route_batch(&mut states, tokens)
    }
}

/// The states of `seqs`, mutably, in that order (each id once, all present).
fn states_in_order<'a, S>(
    states: &'a mut HashMap<SeqId, S>,
    seqs: &[SeqId],
) -> Result<Vec<&'a mut S>> {
    if let Some(&missing) = seqs.iter().find(|s| !states.contains_key(s)) {
        return Err(Error::UnknownSequence(missing));
    }
    let found = crate::engine::in_order(states.iter_mut(), seqs);
    if found.len() != seqs.len() {
        return Err(Error::InvalidArgument(
            "a sequence is routed twice in one call".into(),
        ));
    }
    Ok(found)
}

/// The DSelect-k static gate as a pre-gate router: its selectors and mixing weights are
/// parameters, so every token gets the same route, known before the backbone runs. One gate
/// routes every layer alike; one gate per layer gives per-layer routes.
pub struct StaticGateRouter {
    /// One route for every layer, or one per layer (`scope`).
    routes: Vec<TokenRoute>,
    scope: RouteScope,
    experts: usize,
    top_k: usize,
}

impl StaticGateRouter {
    /// A router that routes every token with `gate` (a static gate: no input), in every layer.
    pub fn new(gate: &dselect::DSelectGate, experts: usize) -> Result<Self> {
        let route = gate.route(None)?;
        Ok(StaticGateRouter {
            top_k: route.experts().len(),
            routes: vec![route],
            scope: RouteScope::AllLayers,
            experts,
        })
    }

    /// A router with one static gate per decoder layer, each route cut to the `top_k` heaviest
    /// experts (what the layers serve).
    pub fn per_layer(gates: &[dselect::DSelectGate], experts: usize, top_k: usize) -> Result<Self> {
        if gates.is_empty() {
            return Err(Error::InvalidArgument(
                "a per-layer static gate router needs a gate per layer".into(),
            ));
        }
        let routes = gates
            .iter()
            .map(|g| g.route_at_most(None, top_k))
            .collect::<Result<Vec<_>>>()?;
        Ok(StaticGateRouter {
            top_k: routes.iter().map(|r| r.experts().len()).max().unwrap_or(1),
            scope: RouteScope::PerLayer(routes.len()),
            routes,
            experts,
        })
    }
}

impl Router for StaticGateRouter {
    fn kind(&self) -> RouterKind {
        RouterKind::PreGate
    }

    fn num_experts(&self) -> usize {
        self.experts
    }

    fn top_k(&self) -> usize {
        self.top_k
    }

    fn placement(&self) -> String {
        "host".into()
    }

    fn new_plan(&self) -> RoutePlan {
        RoutePlan::new(self.experts, self.scope)
    }

    fn open(&mut self, _seq: SeqId, _max_len: usize) -> Result<()> {
        Ok(())
    }

    fn close(&mut self, _seq: SeqId) {}

    fn route(&mut self, _seqs: &[SeqId], tokens: &[&[u32]]) -> Result<Vec<Vec<TokenRoute>>> {
        Ok(tokens.iter().map(|t| self.routes.repeat(t.len())).collect())
    }
}

/// Routes a pass's router logits (`[sum T_i, n_experts]`, the sequences' rows in order): one list
/// of top-`k` routes per sequence, `tokens[i]` naming how many rows sequence `i` has. The one
/// selection of every Read-ME router, wherever its logits were computed.
pub fn routes_per_sequence(
    logits: &[f32],
    n_experts: usize,
    k: usize,
    tokens: &[&[u32]],
) -> Vec<Vec<TokenRoute>> {
    let mut rows = logits
        .chunks_exact(n_experts.max(1))
        .map(|l| select_top_k(l, k));
    tokens
        .iter()
        .map(|t| rows.by_ref().take(t.len()).collect())
        .collect()
}

/// Routes one token from its router logits: top-1 (argmax, weight 1) or top-k with softmax weights
/// over the k selected logits. Ties go to the lower expert index.
pub fn select_top_k(logits: &[f32], k: usize) -> TokenRoute {
    if k <= 1 {
        let e = crate::sampling::argmax(logits).unwrap_or(0);
        return TokenRoute::single(e as ExpertId);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // Stable sort by descending logit keeps lower indices first among equals.
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(k);
    let max = logits[idx[0]];
    let exps: Vec<f32> = idx.iter().map(|&i| (logits[i] - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let experts: Vec<ExpertId> = idx.iter().map(|&i| i as ExpertId).collect();
    let weights: Vec<f32> = exps.iter().map(|e| e / sum).collect();
    // k distinct indices of at most MAX_EXPERTS logits; a longer row is cut to what routes hold.
    TokenRoute::new(&experts, &weights).unwrap_or_else(|_| TokenRoute::single(experts[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_is_the_argmax_with_weight_one() {
        let r = select_top_k(&[0.1, 0.9, 0.9, -2.0], 1);
        assert_eq!(r.experts(), &[1]);
        assert_eq!(r.weights(), &[1.0]);
    }

    #[test]
    fn top2_weights_are_a_softmax_over_the_selected_logits() {
        let r = select_top_k(&[0.0, 2.0, (2.0f32).ln() + 2.0, -1.0], 2);
        assert_eq!(r.experts(), &[2, 1]);
        assert!((r.weights()[0] - 2.0 / 3.0).abs() < 1e-6);
        assert!((r.weights()[1] - 1.0 / 3.0).abs() < 1e-6);
    }
}
