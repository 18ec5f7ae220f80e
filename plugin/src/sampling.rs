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

/// Parses a `top_k` as operators and clients write it, the one parser for the CLI's `--top-k` and
/// the Triton `sampling_parameters.top_k`: a whole number of tokens, with `0` and vLLM's `-1`
/// meaning every token; other negative values, fractions and numbers past `usize` are refused,
/// echoing the text.
pub fn parse_top_k(text: &str) -> Result<usize> {
    let t = text.trim();
    if t == "-1" {
        return Ok(0);
    }
    let bad = |why: &str| Error::InvalidRequest(format!("top_k `{text}` {why}"));
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(
            "must be a whole number of tokens (0 or -1: every token)",
        ));
    }
    t.parse().map_err(|_| bad("is too large"))
}

/// Parses a finite number as written (`temperature`, `top_p`): one finite as f64 but not as f32
/// (`1e300`) is refused as too large, echoing the text, rather than read as infinity.
pub fn parse_finite(name: &str, text: &str) -> Result<f32> {
    let x: f64 = text
        .trim()
        .parse()
        .map_err(|_| Error::InvalidRequest(format!("{name} `{text}` is not a number")))?;
    if !x.is_finite() {
        return Err(Error::InvalidRequest(format!(
            "{name} `{text}` must be a finite number"
        )));
    }
    let y = x as f32;
    if !y.is_finite() {
        return Err(Error::InvalidRequest(format!(
            "{name} `{text}` is too large"
        )));
    }
    Ok(y)
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
    let (max, nan) = max_and_nan(logits);
    if nan {
        return None;
    }
    logits.iter().position(|&v| v == max)
}

/// The largest value and whether any value is NaN, in independent lanes so the loop vectorises
/// (greedy decoding scans the whole vocabulary for every token; a scalar scan with an early NaN
/// exit ran at about one element per nanosecond).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn max_and_nan(x: &[f32]) -> (f32, bool) {
    const L: usize = 16;
    let mut m = [f32::NEG_INFINITY; L];
    let mut nan = [false; L];
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
            nan[i] |= c[i].is_nan();
        }
    }
    let mut max = m
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let mut any_nan = nan.iter().any(|&n| n);
    for &v in rest {
        max = if v > max { v } else { max };
        any_nan |= v.is_nan();
    }
    (max, any_nan)
}

/// A candidate token: its id, its logit over the temperature, its probability.
#[derive(Debug, Clone, Copy)]
struct Cand {
    id: u32,
    logit: f32,
    prob: f32,
}

/// The order candidates are ranked in: higher logit first, lower id on ties (what a stable sort by
/// logit gives). A strict total order, so no result depends on the sort or selection algorithm.
fn rank(a: &Cand, b: &Cand) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Temperature, top-k (by selection, not a sort) and the softmax over what is kept; unsorted.
fn candidates(logits: &[f32], p: &SamplingParams) -> Vec<Cand> {
    let inv_t = 1.0 / p.temperature;
    let mut c: Vec<Cand> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| Cand {
            id: i as u32,
            logit: l * inv_t,
            prob: 0.0,
        })
        .collect();
    if p.top_k > 0 && p.top_k < c.len() {
        c.select_nth_unstable_by(p.top_k - 1, rank);
        c.truncate(p.top_k);
    }
    let max = c
        .iter()
        .map(|x| x.logit)
        .max_by(f32::total_cmp)
        .unwrap_or(0.0);
    let mut sum = 0.0f64;
    for x in c.iter_mut() {
        x.prob = (x.logit - max).exp();
        sum += x.prob as f64;
    }
    for x in c.iter_mut() {
        x.prob = (x.prob as f64 / sum) as f32;
    }
    c
}

/// Sorts a prefix of `c` by [`rank`], doubling it until `enough(prefix)` holds or all of `c` is
/// sorted; returns the prefix's length. A language model's distribution is peaked, so sampling
/// and top-p usually need a few dozen of the vocabulary's tens of thousands of entries: sorting
/// them all cost about a millisecond per token.
fn sorted_prefix(c: &mut [Cand], mut enough: impl FnMut(&[Cand]) -> bool) -> usize {
    let mut done = 0;
    let mut m = c.len().min(64);
    loop {
        if m < c.len() {
            // Everything before `m` now ranks ahead of everything after it.
            c[done..].select_nth_unstable_by(m - done - 1, rank);
        }
        c[done..m].sort_unstable_by(rank);
        done = m;
        if done == c.len() || enough(&c[..done]) {
            return done;
        }
        m = (m * 2).min(c.len());
    }
}

/// The length of the smallest ranked prefix whose probability reaches `top_p` (`None` if the
/// prefix does not), accumulated in ranked order as [`filtered_distribution`] documents.
fn nucleus_len(prefix: &[Cand], top_p: f32) -> Option<usize> {
    let mut acc = 0.0f32;
    prefix
        .iter()
        .position(|x| {
            acc += x.prob;
            acc >= top_p
        })
        .map(|i| i + 1)
}

/// Applies top-p to `c`: sorts its nucleus, drops the rest and renormalises (f32, as accumulated).
/// With `top_p >= 1`, `c` is left whole and unsorted.
fn apply_top_p(c: &mut Vec<Cand>, top_p: f32) {
    if top_p >= 1.0 {
        return;
    }
    let sorted = sorted_prefix(c, |pre| nucleus_len(pre, top_p).is_some());
    let keep = nucleus_len(&c[..sorted], top_p).unwrap_or(c.len());
    c.truncate(keep);
    let s: f32 = c.iter().map(|x| x.prob).sum();
    for x in c.iter_mut() {
        x.prob /= s;
    }
}

/// The candidate tokens and their probabilities after temperature, top-k and top-p, most likely
/// first (ties: lower id first). Top-p keeps the smallest ranked prefix whose probability,
/// accumulated in f32 in ranked order, reaches `top_p`, and renormalises it.
pub fn filtered_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let mut c = candidates(logits, p);
    apply_top_p(&mut c, p.top_p);
    c.sort_unstable_by(rank);
    c.into_iter().map(|x| (x.id, x.prob)).collect()
}

/// The token a uniform draw `u` in [0, 1) picks from the filtered distribution: the first in
/// ranked order at which the accumulated probability passes `u` (the last one if rounding leaves
/// the total below `u`). Only the ranked prefix up to that point is sorted.
fn draw(logits: &[f32], p: &SamplingParams, u: f32) -> u32 {
    let mut c = candidates(logits, p);
    apply_top_p(&mut c, p.top_p);
    let passes = |pre: &[Cand]| {
        let mut acc = 0.0f32;
        pre.iter().position(|x| {
            acc += x.prob;
            u < acc
        })
    };
    let sorted = sorted_prefix(&mut c, |pre| passes(pre).is_some());
    match passes(&c[..sorted]) {
        Some(i) => c[i].id,
        None => c.last().map_or(0, |x| x.id),
    }
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
        let bad = || Error::ModelData("logits are empty or NaN".into());
        if self.params.is_greedy() {
            return argmax(logits).map(|i| i as u32).ok_or_else(bad);
        }
        if logits.is_empty() || logits.iter().any(|v| v.is_nan()) {
            return Err(bad());
        }
        let u: f32 = self.rng.random();
        Ok(draw(logits, &self.params, u))
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
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), Some(0));
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0));
        // Against the plain scan, over lengths around the vector width, with ties and NaNs.
        let scan = |x: &[f32]| -> Option<usize> {
            let mut best: Option<(usize, f32)> = None;
            for (i, &v) in x.iter().enumerate() {
                if v.is_nan() {
                    return None;
                }
                if best.is_none_or(|(_, b)| v > b) {
                    best = Some((i, v));
                }
            }
            best.map(|(i, _)| i)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for n in [1usize, 15, 16, 17, 31, 33, 100, 32000] {
            for trial in 0..20 {
                let mut x: Vec<f32> = (0..n)
                    .map(|_| (rng.random::<f32>() * 8.0).round() - 4.0)
                    .collect();
                if trial == 19 {
                    let at = rng.random_range(0..n);
                    x[at] = f32::NAN;
                }
                assert_eq!(argmax(&x), scan(&x), "n {n} trial {trial}");
            }
        }
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

    /// The straightforward definition: a stable sort of the whole vocabulary.
    fn reference(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
        let mut c: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (l / p.temperature) as f64))
            .collect();
        c.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        let max = c[0].1;
        let z: f64 = c.iter().map(|x| (x.1 - max).exp()).sum();
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp() / z;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = c
                .iter()
                .position(|x| {
                    acc += x.1;
                    acc >= p.top_p as f64
                })
                .map_or(c.len(), |i| i + 1);
            c.truncate(keep);
            let s: f64 = c.iter().map(|x| x.1).sum();
            for x in c.iter_mut() {
                x.1 /= s;
            }
        }
        c
    }

    #[test]
    fn partial_selection_gives_the_full_sorts_distribution_and_draws() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for trial in 0..40 {
            let n = [5usize, 63, 64, 65, 300, 5000][trial % 6];
            // Peaked and flat rows, with ties (rounded values) in some.
            let scale = if trial % 2 == 0 { 4.0 } else { 0.3 };
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    let v: f32 = rng.random::<f32>() * scale;
                    if trial % 3 == 0 {
                        (v * 4.0).round() / 4.0
                    } else {
                        v
                    }
                })
                .collect();
            for (k, tp) in [(0, 1.0), (0, 0.9), (7, 1.0), (50, 0.5), (0, 0.999)] {
                let p = params(0.7, k, tp, 0);
                let want = reference(&logits, &p);
                let got = filtered_distribution(&logits, &p);
                // Top-p may differ by one token where the f32 and f64 sums straddle top_p.
                let common = want.len().min(got.len());
                assert!(want.len().abs_diff(got.len()) <= 1, "n {n} k {k} p {tp}");
                for (g, w) in got[..common].iter().zip(&want[..common]) {
                    assert_eq!(g.0, w.0, "n {n} k {k} p {tp}: ranking differs");
                    assert!((g.1 as f64 - w.1).abs() < 1e-5, "n {n} k {k} p {tp}");
                }
                if got.len() != want.len() {
                    continue;
                }
                // Draws halfway between cumulative boundaries pick exactly the reference's token.
                let mut acc = 0.0;
                let every = want.len().div_ceil(64);
                for (i, w) in want.iter().enumerate() {
                    let mid = acc + w.1 / 2.0;
                    acc += w.1;
                    if i % every == 0 && w.1 > 1e-4 {
                        assert_eq!(draw(&logits, &p, mid as f32), w.0, "n {n} k {k} p {tp}");
                    }
                }
            }
        }
    }

    #[test]
    fn top_k_and_finite_numbers_parse_as_written() {
        assert_eq!(parse_top_k("0").unwrap(), 0);
        assert_eq!(parse_top_k("-1").unwrap(), 0);
        assert_eq!(parse_top_k(" 40 ").unwrap(), 40);
        for bad in ["-2", "1.5", "many", ""] {
            let e = parse_top_k(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("top_k `{bad}`")) && e.contains("whole"),
                "{e}"
            );
        }
        let e = parse_top_k("99999999999999999999999")
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("is too large"), "{e}");
        assert_eq!(parse_finite("temperature", "0.5").unwrap(), 0.5);
        let e = parse_finite("temperature", "1e300")
            .unwrap_err()
            .to_string();
        assert!(e.contains("temperature `1e300` is too large"), "{e}");
        assert!(!e.contains("inf"), "{e}");
        for bad in ["inf", "NaN"] {
            let e = parse_finite("top_p", bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("top_p `{bad}` must be a finite number")),
                "{e}"
            );
        }
    }
}
