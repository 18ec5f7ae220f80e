//! Causal multi-head attention over a KV cache, with grouped-query heads and an optional sliding
//! window.

use std::num::NonZeroUsize;

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
    /// Sliding window: a query at position `p` sees the keys at `p - window < j <= p`, itself
    /// and the `window - 1` before it (Mixtral's `sliding_window`, as transformers masks it);
    /// `None`: every position up to its own.
    pub window: Option<NonZeroUsize>,
}

impl AttentionShape {
    /// The first key position a query at `pos` sees.
    pub fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w.get()))
    }
}

/// Below this many score computations the call stays on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 14;

/// Causal attention for `T` queries at positions `start..start+T`.
///
/// `q` is `[T, n_heads*d]`; `k` and `v` are `[S, n_kv_heads*d]` caches holding the keys and values
/// of positions `0..S` with `S >= start + T`; query `t` attends to positions
/// `shape.first_key(start+t)..=start+t` (all of `0..=start+t` without a window). Writes `out`,
/// `[T, n_heads*d]`. Softmax is in f32 with max subtraction.
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
        window: _,
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
        let pos = start + t;
        let first = shape.first_key(pos);
        let mut scores: Vec<f32> = (first..=pos)
            .map(|p| {
                let kh = &k[p * kv_width + kvh * d..p * kv_width + (kvh + 1) * d];
                super::matmul::dot(qh, kh) * scale
            })
            .collect();
        super::softmax(&mut scores);
        o.fill(0.0);
        for (p, w) in (first..=pos).zip(&scores) {
            let vh = &v[p * kv_width + kvh * d..p * kv_width + (kvh + 1) * d];
            for (oi, vi) in o.iter_mut().zip(vh) {
                *oi += w * vi;
            }
        }
    };
    let keys = shape
        .window
        .map_or(start + t_count, |w| w.get().min(start + t_count));
    let work = t_count * n_heads * keys * d;
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
                let pos = start + t;
                // the definition itself, not AttentionShape::first_key
                let keys: Vec<usize> = (0..=pos)
                    .filter(|&p| s.window.is_none_or(|w| p + w.get() > pos))
                    .collect();
                let logits: Vec<f64> = keys
                    .iter()
                    .map(|&p| {
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
                    out[t * nh * d + h * d + i] = keys
                        .iter()
                        .zip(&e)
                        .map(|(&p, e)| e / z * v[p * nkv * d + kvh * d + i] as f64)
                        .sum();
                }
            }
        }
        out
    }

    fn run(q: &[f32], k: &[f32], v: &[f32], start: usize, shape: &AttentionShape) -> Vec<f32> {
        let mut out = vec![f32::NAN; q.len()];
        attention(q, k, v, start, shape, &mut out);
        out
    }

    #[test]
    fn gqa_prefill_and_decode_match_the_definition() {
        let s = 9;
        let k = rand_vec(s * 16, 1);
        let v = rand_vec(s * 16, 2);
        for window in [None, NonZeroUsize::new(1), NonZeroUsize::new(3)] {
            let shape = AttentionShape {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                scale: 0.35,
                window,
            };
            // Prefill of 5 tokens after 3 cached ones, then one decode token at the last position.
            for (start, t) in [(3usize, 5usize), (8, 1), (0, 9)] {
                let q = rand_vec(t * 32, 3 + start as u64);
                let kv = ..(start + t) * 16;
                let out = run(&q, &k[kv], &v[kv], start, &shape);
                assert_close(&out, &reference(&q, &k, &v, start, &shape), 1e-5);
            }
        }
    }

    #[test]
    fn a_window_of_two_sees_the_query_and_the_key_before_it() {
        // One head of size 1, q = 1: the weights are softmax(k) over the visible keys.
        let shape = AttentionShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 1,
            scale: 1.0,
            window: NonZeroUsize::new(2),
        };
        let k = [0.0, 0.0, 0.0, 3f32.ln()];
        let v = [1.0, 2.0, 4.0, 8.0];
        let q = [1.0; 4];
        // positions 0..=3 see {0}, {0,1}, {1,2}, {2,3} (weights 1 and 3 at the last)
        let want = [1.0, 1.5, 3.0, (4.0 + 3.0 * 8.0) / 4.0];
        assert_close(&run(&q, &k, &v, 0, &shape), &want, 1e-6);
        // decoding the last position alone, over the cache, gives the same row
        assert_close(&run(&[1.0], &k, &v, 3, &shape), &[7.0], 1e-6);
        // without the window the last row mixes all four values: (1 + 2 + 4 + 3 * 8) / 6
        let full = AttentionShape {
            window: None,
            ..shape
        };
        assert_close(&run(&q, &k, &v, 0, &full)[3..], &[31.0 / 6.0], 1e-6);
    }

    #[test]
    fn a_window_as_long_as_the_context_is_full_attention() {
        let full = AttentionShape {
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 8,
            scale: 0.35,
            window: None,
        };
        let s = 7;
        let (k, v) = (rand_vec(s * 8, 5), rand_vec(s * 8, 6));
        let q = rand_vec(4 * 32, 7);
        let want = run(&q, &k, &v, 3, &full);
        for w in [7, 8, 4096] {
            let shape = AttentionShape {
                window: NonZeroUsize::new(w),
                ..full
            };
            assert_eq!(run(&q, &k, &v, 3, &shape), want, "window {w}");
        }
        // one shorter drops position 0 from the last query's keys
        let shorter = AttentionShape {
            window: NonZeroUsize::new(6),
            ..full
        };
        assert_ne!(run(&q, &k, &v, 3, &shorter)[96..], want[96..]);
        assert_eq!(run(&q, &k, &v, 3, &shorter)[..96], want[..96]);
    }

    #[test]
    fn the_first_position_returns_its_own_value() {
        let shape = AttentionShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 4,
            scale: 1.0,
            window: NonZeroUsize::new(1),
        };
        let v = vec![1.0, 2.0, 3.0, 4.0];
        let mut out = vec![0.0; 4];
        attention(&[9.0, 9.0, 9.0, 9.0], &[0.1; 4], &v, 0, &shape, &mut out);
        assert_eq!(out, v);
    }
}
