//! Rotary position embeddings, Hugging Face "rotate half" convention.

/// Precomputed cos/sin of `pos * theta^(-2i/d)` for every position up to `max_pos`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    max_pos: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// A table for heads of size `head_dim` (even) and positions `0..max_pos`.
    pub fn new(head_dim: usize, theta: f32, max_pos: usize) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                // Angles in f64: at long positions f32 products lose the low bits of the phase.
                let inv = (theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
                let a = p as f64 * inv;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable {
            half,
            max_pos,
            cos,
            sin,
        }
    }

    /// Positions the table covers.
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// Rotates every head (of size `2 * half`) in `x` for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let (c, s) = (
            &self.cos[pos * h..(pos + 1) * h],
            &self.sin[pos * h..(pos + 1) * h],
        );
        for head in x.chunks_exact_mut(2 * h) {
            let (a, b) = head.split_at_mut(h);
            for i in 0..h {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * c[i] - x1 * s[i];
                b[i] = x1 * c[i] + x0 * s[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, rand_vec};

    #[test]
    fn rotates_pairs_i_and_i_plus_half() {
        let d = 8;
        let t = RopeTable::new(d, 10_000.0, 64);
        let x0 = rand_vec(2 * d, 3);
        let mut x = x0.clone();
        t.apply(&mut x, 37);
        let mut want = Vec::new();
        for head in x0.chunks(d) {
            let mut out = vec![0.0f64; d];
            for i in 0..d / 2 {
                let a = 37.0 * 10_000f64.powf(-2.0 * i as f64 / d as f64);
                let (x1, x2) = (head[i] as f64, head[i + d / 2] as f64);
                out[i] = x1 * a.cos() - x2 * a.sin();
                out[i + d / 2] = x2 * a.cos() + x1 * a.sin();
            }
            want.extend(out);
        }
        assert_close(&x, &want, 1e-6);
    }

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let t = RopeTable::new(16, 500.0, 8);
        let x0 = rand_vec(16, 4);
        let mut x = x0.clone();
        t.apply(&mut x, 0);
        assert_eq!(x, x0);
        t.apply(&mut x, 7);
        let n0: f32 = x0.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-5);
    }
}
