//! DSelect-k (Hazimeh et al., NeurIPS 2021): a differentiable gate that selects at most k experts.
//!
//! With `n` experts and `m = ceil(log2 n)` bits, selector `i` has logits `z_i` (m values) and picks
//! expert `e` with weight `r(z_i)_e = prod_j (bit_j(e) ? S(z_ij) : 1 - S(z_ij))`, bits most significant
//! first, `S` the cubic smooth-step of width `gamma`. `k` selectors are mixed by `softmax(alpha)`.
//! When every `|z| >= gamma/2` each selector is one-hot and at most `k` experts get weight; codes `>= n`
//! are unreachable experts and their weight is dropped (not renormalised), as in the paper.

use crate::error::{Error, Result};
use crate::route::{ExpertId, TokenRoute, MAX_TOP_K};

/// The cubic smooth-step: 0 below `-gamma/2`, 1 above `gamma/2`, `3x/(2g) - 2x^3/g^3 + 1/2` between.
pub fn smooth_step(x: f32, gamma: f32) -> f32 {
    if x <= -gamma / 2.0 {
        0.0
    } else if x >= gamma / 2.0 {
        1.0
    } else {
        3.0 * x / (2.0 * gamma) - 2.0 * x.powi(3) / gamma.powi(3) + 0.5
    }
}

/// Bits per selector for `n` experts: `ceil(log2 n)` (0 for `n <= 1`).
pub fn bits_for(n: usize) -> usize {
    (usize::BITS - n.saturating_sub(1).leading_zeros()) as usize
}

/// Where the selector logits come from.
#[derive(Debug, Clone, PartialEq)]
pub enum GateParams {
    /// One fixed gate for every input: `z` is `[k, m]`, `alpha` is `[k]`.
    Static {
        /// Selector logits.
        z: Vec<f32>,
        /// Selector mixing logits.
        alpha: Vec<f32>,
    },
    /// A gate computed from each input `x` of width `dim`: `z = W_z x + b_z`, `alpha = W_a x + b_a`.
    PerExample {
        /// Input width.
        dim: usize,
        /// `[k*m, dim]`.
        w_z: Vec<f32>,
        /// `[k*m]`.
        b_z: Vec<f32>,
        /// `[k, dim]`.
        w_a: Vec<f32>,
        /// `[k]`.
        b_a: Vec<f32>,
    },
}

/// A DSelect-k gate over `n` experts with `k` selectors.
#[derive(Debug, Clone, PartialEq)]
pub struct DSelectGate {
    n: usize,
    k: usize,
    bits: usize,
    gamma: f32,
    params: GateParams,
}

impl DSelectGate {
    /// A gate over `n` experts with `k` selectors and smooth-step width `gamma`; checks the shapes.
    pub fn new(n: usize, k: usize, gamma: f32, params: GateParams) -> Result<Self> {
        if n < 2 || k == 0 || gamma.is_nan() || gamma <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "DSelect-k needs n >= 2 experts, k >= 1 selectors and gamma > 0 (n={n}, k={k}, gamma={gamma})"
            )));
        }
        let bits = bits_for(n);
        let ok = match &params {
            GateParams::Static { z, alpha } => z.len() == k * bits && alpha.len() == k,
            GateParams::PerExample {
                dim,
                w_z,
                b_z,
                w_a,
                b_a,
            } => {
                w_z.len() == k * bits * dim
                    && b_z.len() == k * bits
                    && w_a.len() == k * dim
                    && b_a.len() == k
            }
        };
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "DSelect-k parameter shapes do not match k={k} selectors of {bits} bits"
            )));
        }
        Ok(DSelectGate {
            n,
            k,
            bits,
            gamma,
            params,
        })
    }

    /// Bits per selector, `ceil(log2 n)`.
    pub fn bits(&self) -> usize {
        self.bits
    }

    fn logits(&self, x: Option<&[f32]>) -> Result<(Vec<f32>, Vec<f32>)> {
        match (&self.params, x) {
            (GateParams::Static { z, alpha }, _) => Ok((z.clone(), alpha.clone())),
            (
                GateParams::PerExample {
                    dim,
                    w_z,
                    b_z,
                    w_a,
                    b_a,
                },
                Some(x),
            ) if x.len() == *dim => {
                let affine = |w: &[f32], b: &[f32]| -> Vec<f32> {
                    b.iter()
                        .enumerate()
                        .map(|(r, bias)| {
                            bias + w[r * dim..(r + 1) * dim]
                                .iter()
                                .zip(x)
                                .map(|(a, b)| a * b)
                                .sum::<f32>()
                        })
                        .collect()
                };
                Ok((affine(w_z, b_z), affine(w_a, b_a)))
            }
            (GateParams::PerExample { dim, .. }, _) => Err(Error::InvalidArgument(format!(
                "a per-example DSelect-k gate needs an input of width {dim}"
            ))),
        }
    }

    /// The mixing weight of every expert for input `x` (ignored by a static gate).
    pub fn weights(&self, x: Option<&[f32]>) -> Result<Vec<f32>> {
        let (z, mut alpha) = self.logits(x)?;
        crate::ops::softmax(&mut alpha);
        let mut q = vec![0.0f32; self.n];
        for (i, a) in alpha.iter().enumerate() {
            let s: Vec<f32> = z[i * self.bits..(i + 1) * self.bits]
                .iter()
                .map(|&v| smooth_step(v, self.gamma))
                .collect();
            for (e, qe) in q.iter_mut().enumerate() {
                let mut r = 1.0;
                for (j, sj) in s.iter().enumerate() {
                    let bit = (e >> (self.bits - 1 - j)) & 1 == 1;
                    r *= if bit { *sj } else { 1.0 - sj };
                }
                *qe += a * r;
            }
        }
        Ok(q)
    }

    /// The route for input `x`: every expert with non-zero weight, heaviest first (at most
    /// [`MAX_TOP_K`]; a gate that is not yet sparse keeps its heaviest ones).
    pub fn route(&self, x: Option<&[f32]>) -> Result<TokenRoute> {
        self.route_at_most(x, MAX_TOP_K)
    }

    /// [`DSelectGate::route`] keeping at most `max` experts (the heaviest; ties to the lower
    /// index), so that a layer serving routes of `max` experts takes the gate's routes.
    pub fn route_at_most(&self, x: Option<&[f32]>, max: usize) -> Result<TokenRoute> {
        let q = self.weights(x)?;
        let mut idx: Vec<usize> = (0..self.n).filter(|&e| q[e] > 0.0).collect();
        idx.sort_by(|&a, &b| q[b].total_cmp(&q[a]));
        idx.truncate(max.clamp(1, MAX_TOP_K));
        if idx.is_empty() {
            return Err(Error::Internal(
                "DSelect-k gave every expert zero weight".into(),
            ));
        }
        let experts: Vec<ExpertId> = idx.iter().map(|&e| e as ExpertId).collect();
        let weights: Vec<f32> = idx.iter().map(|&e| q[e]).collect();
        TokenRoute::new(&experts, &weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_step_is_continuous_and_saturates() {
        assert_eq!(smooth_step(-0.5, 1.0), 0.0);
        assert_eq!(smooth_step(0.5, 1.0), 1.0);
        assert_eq!(smooth_step(0.0, 1.0), 0.5);
        assert!((smooth_step(0.499_999, 1.0) - 1.0).abs() < 1e-5);
        assert!((smooth_step(0.25, 2.0) - (0.1875 - 2.0 * 0.015625 / 8.0 + 0.5)).abs() < 1e-6);
    }

    #[test]
    fn saturated_selectors_pick_their_binary_codes() {
        // n = 7 -> 3 bits. Selector 0 codes 101 = 5, selector 1 codes 010 = 2.
        let gate = DSelectGate::new(
            7,
            2,
            1.0,
            GateParams::Static {
                z: vec![2.0, -2.0, 2.0, -2.0, 2.0, -2.0],
                alpha: vec![(3.0f32).ln(), 0.0],
            },
        )
        .unwrap();
        assert_eq!(gate.bits(), 3);
        let q = gate.weights(None).unwrap();
        assert!((q[5] - 0.75).abs() < 1e-6 && (q[2] - 0.25).abs() < 1e-6);
        assert_eq!(q.iter().filter(|&&w| w > 0.0).count(), 2);
        let r = gate.route(None).unwrap();
        assert_eq!(r.experts(), &[5, 2]);
    }

    #[test]
    fn unsaturated_bits_double_the_support_and_unreachable_codes_are_dropped() {
        // Selector codes 11? with the last bit undecided: experts 6 and 7; 7 >= n=7 is unreachable.
        let gate = DSelectGate::new(
            7,
            1,
            1.0,
            GateParams::Static {
                z: vec![1.0, 1.0, 0.0],
                alpha: vec![0.0],
            },
        )
        .unwrap();
        let q = gate.weights(None).unwrap();
        assert!((q[6] - 0.5).abs() < 1e-6);
        assert!((q.iter().sum::<f32>() - 0.5).abs() < 1e-6);
    }

    #[test]
    fn per_example_gates_read_the_input_and_check_shapes() {
        let gate = DSelectGate::new(
            4,
            1,
            1.0,
            GateParams::PerExample {
                dim: 2,
                w_z: vec![1.0, 0.0, 0.0, 1.0],
                b_z: vec![0.0, 0.0],
                w_a: vec![0.0, 0.0],
                b_a: vec![0.0],
            },
        )
        .unwrap();
        assert_eq!(gate.route(Some(&[3.0, -3.0])).unwrap().experts(), &[2]);
        assert_eq!(gate.route(Some(&[-3.0, 3.0])).unwrap().experts(), &[1]);
        assert!(gate.route(Some(&[1.0])).is_err());
        assert!(DSelectGate::new(
            4,
            1,
            1.0,
            GateParams::Static {
                z: vec![0.0],
                alpha: vec![0.0]
            }
        )
        .is_err());
    }
}
