//! Token sampling: greedy, temperature, top-k, top-p, seeded.
//!
//! The order is the common one (vLLM, Hugging Face): scale by temperature, keep the top-k logits,
//! softmax, keep the smallest set whose probability reaches top-p, renormalise, draw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a request picks its tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the request's random stream; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }

    /// Whether this picks the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Rejects values outside their ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::InvalidRequest(format!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidRequest(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// The index of the largest value (the lowest index on ties); `None` for empty or NaN input.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            return None;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// The candidate tokens and their probabilities after temperature, top-k and top-p, most likely first.
pub fn filtered_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let inv_t = 1.0 / p.temperature;
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l * inv_t))
        .collect();
    // Stable sort: equal logits keep index order, so results do not depend on the sort algorithm.
    cand.sort_by(|a, b| b.1.total_cmp(&a.1));
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.truncate(p.top_k);
    }
    let max = cand[0].1;
    let mut sum = 0.0f64;
    for c in cand.iter_mut() {
        c.1 = (c.1 - max).exp();
        sum += c.1 as f64;
    }
    for c in cand.iter_mut() {
        c.1 = (c.1 as f64 / sum) as f32;
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0f32;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            acc += c.1;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep);
        let s: f32 = cand.iter().map(|c| c.1).sum();
        for c in cand.iter_mut() {
            c.1 /= s;
        }
    }
    cand
}

/// A request's sampler: its parameters and its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler; without a seed the stream is seeded from the OS, mixed with `salt`.
    pub fn new(params: SamplingParams, salt: u64) -> Self {
        let seed = params
            .seed
            .unwrap_or_else(|| rand::rng().random::<u64>() ^ salt);
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let bad = || Error::Internal("logits are empty or NaN".into());
        if self.params.is_greedy() {
            return argmax(logits).map(|i| i as u32).ok_or_else(bad);
        }
        if logits.is_empty() || logits.iter().any(|v| v.is_nan()) {
            return Err(bad());
        }
        let dist = filtered_distribution(logits, &self.params);
        let u: f32 = self.rng.random();
        let mut acc = 0.0;
        for &(tok, prob) in &dist {
            acc += prob;
            if u < acc {
                return Ok(tok);
            }
        }
        Ok(dist.last().map(|d| d.0).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: usize, p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            seed: Some(seed),
        }
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, 1.0]), None);
        let mut s = Sampler::new(SamplingParams::greedy(), 0);
        assert_eq!(s.sample(&[0.0, 0.5, 0.2]).unwrap(), 1);
        assert!(s.sample(&[]).is_err());
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0, 1.0, 2.0, 3.0, 4.0];
        let d = filtered_distribution(&logits, &params(1.0, 2, 1.0, 0));
        assert_eq!(d.iter().map(|c| c.0).collect::<Vec<_>>(), vec![4, 3]);
        assert!((d.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-6);
        // softmax of 0..4: p(4) ~ 0.636, p(3) ~ 0.234: top_p 0.7 keeps both, 0.5 keeps one.
        let d = filtered_distribution(&logits, &params(1.0, 0, 0.7, 0));
        assert_eq!(d.len(), 2);
        let d = filtered_distribution(&logits, &params(1.0, 0, 0.5, 0));
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut a = Sampler::new(params(1.0, 0, 1.0, 7), 1);
        let mut b = Sampler::new(params(1.0, 0, 1.0, 7), 2);
        let xs: Vec<u32> = (0..2000).map(|_| a.sample(&logits).unwrap()).collect();
        let ys: Vec<u32> = (0..2000).map(|_| b.sample(&logits).unwrap()).collect();
        assert_eq!(xs, ys);
        assert!(!xs.contains(&2));
        let ones = xs.iter().filter(|&&t| t == 1).count() as f64 / 2000.0;
        assert!((ones - 0.75).abs() < 0.04, "p(1) = {ones}");
    }

    #[test]
    fn low_temperature_concentrates_on_the_argmax() {
        let mut s = Sampler::new(params(0.01, 0, 1.0, 3), 0);
        for _ in 0..100 {
            assert_eq!(s.sample(&[0.0, 0.2, 0.1]).unwrap(), 1);
        }
    }

    #[test]
    fn invalid_values_are_rejected() {
        assert!(params(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0).validate().is_err());
        assert!(params(1.0, 0, 1.5, 0).validate().is_err());
        assert!(params(0.7, 40, 0.9, 0).validate().is_ok());
    }
}
