//! CPU reference operators: the pieces the CPU backend is built from, and the truth every other
//! backend is tested against. Each is a plain function over slices so it can be tested alone.
//!
//! Layouts are row-major; "`[T, H]`" means T rows of H contiguous floats.

pub mod attention;
pub mod ffn;
pub mod matmul;
pub mod norm;
pub mod rope;

pub use attention::{attention, AttentionShape};
pub use ffn::{moe_layer, silu, swiglu_ffn};
pub use matmul::{linear, matmul_t};
pub use norm::rms_norm;
pub use rope::RopeTable;

/// Adds `b` into `a` element-wise.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    debug_assert_eq!(a.len(), b.len());
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// In-place softmax in f32 with max subtraction.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use rand::{Rng, SeedableRng};

    /// Deterministic random floats in [-1, 1).
    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Asserts two slices agree to `tol` relative to the reference's largest magnitude.
    pub fn assert_close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                ((*g as f64) - w).abs() <= tol * scale,
                "element {i}: got {g}, want {w}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_orders() {
        let mut x = vec![1.0, 3.0, 2.0, -50.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[2] && x[2] > x[0] && x[3] < 1e-20);
        let mut big = vec![1000.0, 1000.0];
        softmax(&mut big);
        assert_eq!(big, vec![0.5, 0.5]);
    }
}
