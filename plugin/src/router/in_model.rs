//! The in-model gate of the Hugging Face MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE):
//! each MoE layer routes its own post-attention-normed hidden state inside the forward pass, so
//! the engine's router only keeps the shape and makes no route ahead ([`InModelRouter`]); the
//! backend calls [`route_hidden`] per layer.

use super::{Router, RouterKind};
use crate::engine::SeqId;
use crate::error::{Error, Result};
use crate::model::weights::Matrix;
use crate::ops::{matmul_t, softmax};
use crate::route::{ExpertId, TokenRoute, MAX_TOP_K};

/// The engine's router for a model whose layers route themselves: it routes nothing ahead
/// ([`Router::route`] returns an empty list per sequence), so the batcher and the expert cache
/// run without known routes, and the backend computes each layer's routes as it runs.
#[derive(Debug, Clone)]
pub struct InModelRouter {
    experts: usize,
    top_k: usize,
}

impl InModelRouter {
    /// A router of `experts` experts per layer and `top_k` per token.
    pub fn new(experts: usize, top_k: usize) -> Self {
        InModelRouter { experts, top_k }
    }
}

impl Router for InModelRouter {
    fn kind(&self) -> RouterKind {
        RouterKind::InModel
    }

    fn num_experts(&self) -> usize {
        self.experts
    }

    fn top_k(&self) -> usize {
        self.top_k
    }

    fn placement(&self) -> String {
        "in-model".into()
    }

    fn open(&mut self, _seq: SeqId, _max_len: usize) -> Result<()> {
        Ok(())
    }

    fn close(&mut self, _seq: SeqId) {}

    fn route(&mut self, seqs: &[SeqId], tokens: &[&[u32]]) -> Result<Vec<Vec<TokenRoute>>> {
        if seqs.len() != tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "{} sequences with {} token lists",
                seqs.len(),
                tokens.len()
            )));
        }
        Ok(vec![Vec::new(); seqs.len()])
    }
}

/// One token's route from its gate logits, as transformers routes these families: softmax over
/// every expert in f32, the `k` largest probabilities (ties to the lower expert index), divided
/// by their sum when `renormalize`. The experts come most probable first.
///
/// `k` must be 1..=min(logits, [`MAX_TOP_K`]) (the config was checked against it). A row with a
/// non-finite logit (a hidden state already NaN) routes to experts `0..k` with weight 0: the
/// token's NaN residual still reaches its logits, so that sequence fails alone at sampling
/// instead of the whole step failing here.
pub fn softmax_top_k(logits: &[f32], k: usize, renormalize: bool) -> Result<TokenRoute> {
    if k == 0 || k > logits.len().min(MAX_TOP_K) {
        return Err(Error::InvalidArgument(format!(
            "top-{k} of {} experts",
            logits.len()
        )));
    }
    if logits.iter().any(|l| !l.is_finite()) {
        let experts: Vec<ExpertId> = (0..k as ExpertId).collect();
        return TokenRoute::new(&experts, &vec![0.0; k]);
    }
    let mut p = logits.to_vec();
    softmax(&mut p);
    let mut idx: Vec<usize> = (0..p.len()).collect();
    // A stable sort by descending probability keeps the lower index first among equals.
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    idx.truncate(k);
    let experts: Vec<ExpertId> = idx.iter().map(|&i| i as ExpertId).collect();
    let mut weights: Vec<f32> = idx.iter().map(|&i| p[i]).collect();
    if renormalize {
        let sum: f32 = weights.iter().sum();
        for w in &mut weights {
            *w /= sum;
        }
    }
    TokenRoute::new(&experts, &weights)
}

/// The routes of `x` (`[T, H]`, the layer's post-attention-normed hidden states) under `gate`
/// (`[N, H]`): logits `x . gate^T`, then [`softmax_top_k`] per token.
pub fn route_hidden(
    x: &[f32],
    gate: &Matrix,
    k: usize,
    renormalize: bool,
) -> Result<Vec<TokenRoute>> {
    let h = gate.cols;
    if h == 0 || x.len() % h != 0 {
        return Err(Error::InvalidArgument(format!(
            "{} hidden values are not rows of {h}",
            x.len()
        )));
    }
    let t = x.len() / h;
    let mut logits = vec![0.0f32; t * gate.rows];
    matmul_t(x, t, gate, &mut logits);
    logits
        .chunks_exact(gate.rows.max(1))
        .map(|row| softmax_top_k(row, k, renormalize))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn top_k_of_the_softmax_with_and_without_renormalisation() {
        // Probabilities e^l / Z with l = ln(1), ln(4), ln(2), ln(3): 0.1, 0.4, 0.2, 0.3.
        let logits = [1f32, 4.0, 2.0, 3.0].map(f32::ln);
        let r = softmax_top_k(&logits, 2, false).unwrap();
        assert_eq!(r.experts(), &[1, 3]);
        assert!(close(r.weights(), &[0.4, 0.3]), "{:?}", r.weights());
        let r = softmax_top_k(&logits, 2, true).unwrap();
        assert_eq!(r.experts(), &[1, 3]);
        assert!(
            close(r.weights(), &[4.0 / 7.0, 3.0 / 7.0]),
            "{:?}",
            r.weights()
        );
        let r = softmax_top_k(&logits, 3, false).unwrap();
        assert_eq!(r.experts(), &[1, 3, 2]);
        assert!(close(r.weights(), &[0.4, 0.3, 0.2]));
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let r = softmax_top_k(&[0.5, 2.0, 1.0, 2.0, 1.0], 3, true).unwrap();
        assert_eq!(r.experts(), &[1, 3, 2]);
        let r = softmax_top_k(&[0.0; 6], 2, false).unwrap();
        assert_eq!(r.experts(), &[0, 1]);
        assert!(close(r.weights(), &[1.0 / 6.0, 1.0 / 6.0]));
    }

    #[test]
    fn a_k_beyond_the_experts_is_an_error() {
        assert!(softmax_top_k(&[1.0, 2.0], 3, true).is_err());
        assert!(softmax_top_k(&[1.0; 16], MAX_TOP_K + 1, true).is_err());
        assert!(softmax_top_k(&[1.0, 2.0], 0, true).is_err());
        let nan = softmax_top_k(&[1.0, f32::NAN, 0.0], 2, true).unwrap();
        assert_eq!(
            (nan.experts(), nan.weights()),
            (&[0, 1][..], &[0.0, 0.0][..])
        );
    }

    #[test]
    fn routes_come_from_the_gate_applied_to_each_token() {
        // Two experts reading one coordinate each: token 0 prefers expert 1, token 1 expert 0.
        let gate = Matrix::new(2, 2, vec![1.0, 0.0, 0.0, 1.0]);
        let routes = route_hidden(&[0.0, 3.0, 2.0, -1.0], &gate, 1, true).unwrap();
        assert_eq!(routes[0].experts(), &[1]);
        assert_eq!(routes[1].experts(), &[0]);
        assert_eq!(routes[0].weights(), &[1.0]);
        let p = 1.0 / (1.0 + (-3.0f32).exp());
        let unnormed = route_hidden(&[0.0, 3.0], &gate, 1, false).unwrap();
        assert!((unnormed[0].weights()[0] - p).abs() < 1e-6);
        assert!(route_hidden(&[1.0, 2.0, 3.0], &gate, 1, true).is_err());
    }

    #[test]
    fn the_router_routes_nothing_ahead() {
        let mut r = InModelRouter::new(8, 2);
        assert_eq!(r.kind(), RouterKind::InModel);
        r.open(1, 10).unwrap();
        let routes = r.route(&[1, 2], &[&[5, 6], &[7]]).unwrap();
        assert_eq!(routes, vec![Vec::new(), Vec::new()]);
        assert_eq!((r.num_experts(), r.top_k()), (8, 2));
    }
}
