//! RMSNorm.

/// RMSNorm of each `w.len()`-wide row of `x` into `out`: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    debug_assert_eq!(x.len(), out.len());
    debug_assert_eq!(x.len() % h, 0);
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
            *o = xv * inv * wv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, rand_vec};

    #[test]
    fn matches_the_definition_per_row() {
        let (rows, h) = (3, 37);
        let x = rand_vec(rows * h, 1);
        let w = rand_vec(h, 2);
        let mut out = vec![f32::NAN; rows * h];
        rms_norm(&x, &w, 1e-5, &mut out);
        let mut want = Vec::new();
        for r in 0..rows {
            let row = &x[r * h..(r + 1) * h];
            let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            want.extend(row.iter().zip(&w).map(|(&v, &g)| v as f64 * inv * g as f64));
        }
        assert_close(&out, &want, 1e-6);
    }
}
