//! Causal multi-head attention over a KV cache, with grouped-query heads.

use rayon::prelude::*;

/// Head configuration of an attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; each serves `n_heads / n_kv_heads` query heads.
    pub n_kv_heads: usize,
    /// Per-head size.
    pub head_dim: usize,
    /// Multiplier of the logits (`1/sqrt(d)` for the backbone, `1/normalizer` for the router).
    pub scale: f32,
}

/// Below this many score computations the call stays on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 14;

/// Causal attention for `T` queries at positions `start..start+T`.
///
/// `q` is `[T, n_heads*d]`; `k` and `v` are `[S, n_kv_heads*d]` caches holding the keys and values
/// of positions `0..S` with `S >= start + T`; query `t` attends to positions `0..=start+t`.
/// Writes `out`, `[T, n_heads*d]`. Softmax is in f32 with max subtraction.
///
/// # Panics
/// If the slices do not have these shapes, or `n_heads * d` is 0. Every caller sizes them from a
/// validated config (positive heads and head size, heads a multiple of KV heads) and appends a
/// chunk's keys and values before attending to them, so no input reaches the checks; they guard
/// the callers' arithmetic.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    shape: &AttentionShape,
    out: &mut [f32],
) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
        scale,
    } = *shape;
    let q_width = n_heads * d;
    let kv_width = n_kv_heads * d;
    let t_count = q.len() / q_width;
    assert_eq!(q.len(), t_count * q_width, "attention: q is not [T, nH*d]");
    assert_eq!(out.len(), q.len(), "attention: out is not [T, nH*d]");
    assert!(
        k.len() >= (start + t_count) * kv_width && v.len() == k.len(),
        "attention: KV cache shorter than the queries' positions"
    );
    let group = n_heads / n_kv_heads;
    let head = |(idx, o): (usize, &mut [f32])| {
        let (t, h) = (idx / n_heads, idx % n_heads);
        let qh = &q[t * q_width + h * d..t * q_width + (h + 1) * d];
        let kvh = h / group;
        let len = start + t + 1;
        let mut scores: Vec<f32> = (0..len)
            .map(|p| {
                let kh = &k[p * kv_width + kvh * d..p * kv_width + (kvh + 1) * d];
                super::matmul::dot(qh, kh) * scale
            })
            .collect();
        super::softmax(&mut scores);
        o.fill(0.0);
        for (p, w) in scores.iter().enumerate() {
            let vh = &v[p * kv_width + kvh * d..p * kv_width + (kvh + 1) * d];
            for (oi, vi) in o.iter_mut().zip(vh) {
                *oi += w * vi;
            }
        }
    };
    let work = t_count * n_heads * (start + t_count) * d;
    if work >= PARALLEL_MIN_WORK {
        out.par_chunks_mut(d).enumerate().for_each(head);
    } else {
        out.chunks_mut(d).enumerate().for_each(head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, rand_vec};

    fn reference(q: &[f32], k: &[f32], v: &[f32], start: usize, s: &AttentionShape) -> Vec<f64> {
        let (nh, nkv, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
        let t_count = q.len() / (nh * d);
        let mut out = vec![0.0f64; q.len()];
        for t in 0..t_count {
            for h in 0..nh {
                let kvh = h * nkv / nh;
                let len = start + t + 1;
                let logits: Vec<f64> = (0..len)
                    .map(|p| {
                        (0..d)
                            .map(|i| {
                                q[t * nh * d + h * d + i] as f64
                                    * k[p * nkv * d + kvh * d + i] as f64
                            })
                            .sum::<f64>()
                            * s.scale as f64
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..d {
                    out[t * nh * d + h * d + i] = (0..len)
                        .map(|p| e[p] / z * v[p * nkv * d + kvh * d + i] as f64)
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn gqa_prefill_and_decode_match_the_definition() {
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            scale: 0.35,
        };
        let s = 9;
        let k = rand_vec(s * 16, 1);
        let v = rand_vec(s * 16, 2);
        // Prefill of 5 tokens after 3 cached ones, then one decode token at the last position.
        for (start, t) in [(3usize, 5usize), (8, 1), (0, 9)] {
            let q = rand_vec(t * 32, 3 + start as u64);
            let mut out = vec![f32::NAN; t * 32];
            attention(
                &q,
                &k[..(start + t) * 16],
                &v[..(start + t) * 16],
                start,
                &shape,
                &mut out,
            );
            assert_close(&out, &reference(&q, &k, &v, start, &shape), 1e-5);
        }
    }

    #[test]
    fn the_first_position_returns_its_own_value() {
        let shape = AttentionShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 4,
            scale: 1.0,
        };
        let v = vec![1.0, 2.0, 3.0, 4.0];
        let mut out = vec![0.0; 4];
        attention(&[9.0, 9.0, 9.0, 9.0], &[0.1; 4], &v, 0, &shape, &mut out);
        assert_eq!(out, v);
    }
}
