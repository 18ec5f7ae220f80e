//! Pre-gating routers: pick every token's experts from the token ids alone, before the backbone runs.
//!
//! [`ReadMeRouter`] is the Read-ME `cluster_predictor`: one small causal transformer block over its
//! own embedding table, run on the CPU with a per-request KV cache so a decode step costs one token.
//! [`dselect`] holds the DSelect-k gate.

pub mod dselect;
mod readme;

pub(crate) use readme::{check_tokens, ROUTER_EPS};
pub use readme::{ReadMeRouter, RouterState};

use crate::route::{ExpertId, TokenRoute};

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
    TokenRoute::new(&experts, &weights).expect("k distinct experts within MAX_TOP_K")
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
