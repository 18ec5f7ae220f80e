//! Rotary position embeddings, Hugging Face "rotate half" convention.

/// Positions whose cos/sin are precomputed; later positions are computed when used. A config's
/// `max_position_embeddings` is input: a table sized by it (2^32 positions) would abort the load.
const CACHED_POSITIONS: usize = 8192;

/// cos/sin of `pos * theta^(-2i/d)` for positions `0..max_pos`: the first 8192
/// precomputed, the rest computed per call with the same arithmetic (so
/// every position gets bit-identical values either way).
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    max_pos: usize,
    /// `theta^(-2i/d)` for each of the `half` frequencies.
    inv: Vec<f64>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// A table for heads of size `head_dim` (even) and positions `0..max_pos`. Its memory is
    /// bounded whatever `max_pos` is.
    pub fn new(head_dim: usize, theta: f32, max_pos: usize) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| (theta as f64).powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        let cached = max_pos.min(CACHED_POSITIONS);
        let mut cos = Vec::with_capacity(cached * half);
        let mut sin = Vec::with_capacity(cached * half);
        for p in 0..cached {
            for &f in &inv {
                // Angles in f64: at long positions f32 products lose the low bits of the phase.
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable {
            half,
            max_pos,
            inv,
            cos,
            sin,
        }
    }

    /// Positions the table covers.
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// Rotates every head (of size `2 * half`) in `x` for position `pos`. Any position works;
    /// those past [`RopeTable::max_pos`] are the caller's to refuse (the model was not trained
    /// on them).
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        if h == 0 {
            return;
        }
        if let (Some(c), Some(s)) = (
            self.cos.get(pos * h..(pos + 1) * h),
            self.sin.get(pos * h..(pos + 1) * h),
        ) {
            rotate(x, h, |i| (c[i], s[i]));
        } else {
            rotate(x, h, |i| {
                let a = pos as f64 * self.inv[i];
                (a.cos() as f32, a.sin() as f32)
            });
        }
    }
}

/// Rotates each head of `x` (size `2 * h`) by the angles `cs(i) = (cos, sin)`.
#[inline(always)]
fn rotate(x: &mut [f32], h: usize, cs: impl Fn(usize) -> (f32, f32)) {
    for head in x.chunks_exact_mut(2 * h) {
        let (a, b) = head.split_at_mut(h);
        for i in 0..h {
            let (c, s) = cs(i);
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * c - x1 * s;
            b[i] = x1 * c + x0 * s;
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

    #[test]
    fn positions_past_the_cache_match_a_full_table() {
        let (d, theta) = (12, 10_000.0);
        let max = CACHED_POSITIONS + 40;
        let t = RopeTable::new(d, theta, max);
        assert!(t.cos.len() <= CACHED_POSITIONS * d / 2);
        let x0 = rand_vec(3 * d, 5);
        for pos in [
            0,
            1,
            CACHED_POSITIONS - 1,
            CACHED_POSITIONS,
            max - 1,
            1 << 40,
        ] {
            let mut x = x0.clone();
            t.apply(&mut x, pos);
            // The full table's arithmetic, for this one position.
            let mut want = x0.clone();
            for head in want.chunks_exact_mut(d) {
                let (a, b) = head.split_at_mut(d / 2);
                for i in 0..d / 2 {
                    let inv = (theta as f64).powf(-2.0 * i as f64 / d as f64);
                    let ang = pos as f64 * inv;
                    let (c, s) = (ang.cos() as f32, ang.sin() as f32);
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * c - x1 * s;
                    b[i] = x1 * c + x0 * s;
                }
            }
            assert_eq!(x, want, "position {pos}");
        }
    }

    #[test]
    fn a_huge_max_position_allocates_a_bounded_table() {
        let t = RopeTable::new(128, 10_000.0, 1 << 32);
        assert_eq!(t.max_pos(), 1 << 32);
        assert_eq!(t.cos.len(), CACHED_POSITIONS * 64);
    }
}
