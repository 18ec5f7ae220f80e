//! SwiGLU feed-forward blocks and the routed expert layer.

use crate::model::weights::ExpertWeights;
use crate::ops::matmul::matmul_t;
use crate::route::{ExpertId, TokenRoute};

/// `x * sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out[m, H] = down(silu(gate x) * up x)` for `m` rows of `x`.
pub fn swiglu_ffn(x: &[f32], m: usize, e: &ExpertWeights, out: &mut [f32]) {
    let inter = e.inter();
    let mut g = vec![0.0f32; m * inter];
    let mut u = vec![0.0f32; m * inter];
    matmul_t(x, m, &e.gate, &mut g);
    matmul_t(x, m, &e.up, &mut u);
    for (gv, uv) in g.iter_mut().zip(&u) {
        *gv = silu(*gv) * uv;
    }
    matmul_t(&g, m, &e.down, out);
}

/// The routed expert layer: `out[t] = sum_j w_j FFN_{e_j}(x[t]) (+ FFN_shared(x[t]))` over `T = routes.len()`
/// tokens of width `hidden`.
///
/// Tokens are permuted by expert so that each expert runs once over all of its tokens (one pass over
/// its weights), then un-permuted with their weights: the same grouping the GPU kernels do.
/// `expert(e)` returns the weights of expert `e` (from the model, or from a cache slot).
///
/// # Panics
/// If `x` or `out` is not `[T, hidden]`: callers size both from the routes they pass, so the check
/// guards their arithmetic, not input.
pub fn moe_layer<'a>(
    x: &[f32],
    hidden: usize,
    routes: &[TokenRoute],
    expert: impl Fn(ExpertId) -> &'a ExpertWeights,
    shared: Option<&ExpertWeights>,
    out: &mut [f32],
) {
    let t_count = routes.len();
    assert_eq!(x.len(), t_count * hidden, "moe_layer: x is not [T, H]");
    assert_eq!(out.len(), x.len(), "moe_layer: out is not [T, H]");
    if let Some(s) = shared {
        swiglu_ffn(x, t_count, s, out);
    } else {
        out.fill(0.0);
    }
    // Group (token, weight) pairs by expert; BTreeMap keeps a deterministic expert order.
    let mut groups: std::collections::BTreeMap<ExpertId, Vec<(usize, f32)>> = Default::default();
    for (t, r) in routes.iter().enumerate() {
        for (&e, &w) in r.experts().iter().zip(r.weights()) {
            groups.entry(e).or_default().push((t, w));
        }
    }
    let mut xin = Vec::new();
    let mut y = Vec::new();
    for (e, members) in groups {
        xin.clear();
        for &(t, _) in &members {
            xin.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        y.resize(members.len() * hidden, 0.0);
        swiglu_ffn(&xin, members.len(), expert(e), &mut y);
        for (i, &(t, w)) in members.iter().enumerate() {
            let dst = &mut out[t * hidden..(t + 1) * hidden];
            for (o, v) in dst.iter_mut().zip(&y[i * hidden..(i + 1) * hidden]) {
                *o += w * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::Matrix;
    use crate::ops::testutil::{assert_close, rand_vec};

    fn expert(h: usize, i: usize, seed: u64) -> ExpertWeights {
        ExpertWeights {
            gate: Matrix::new(i, h, rand_vec(i * h, seed)),
            up: Matrix::new(i, h, rand_vec(i * h, seed + 1)),
            down: Matrix::new(h, i, rand_vec(h * i, seed + 2)),
        }
    }

    fn ffn_ref(x: &[f32], e: &ExpertWeights) -> Vec<f64> {
        let (h, i) = (e.down.rows, e.inter());
        let act: Vec<f64> = (0..i)
            .map(|c| {
                let g: f64 = (0..h)
                    .map(|j| x[j] as f64 * e.gate.data[c * h + j] as f64)
                    .sum();
                let u: f64 = (0..h)
                    .map(|j| x[j] as f64 * e.up.data[c * h + j] as f64)
                    .sum();
                g / (1.0 + (-g).exp()) * u
            })
            .collect();
        (0..h)
            .map(|r| (0..i).map(|c| act[c] * e.down.data[r * i + c] as f64).sum())
            .collect()
    }

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!(silu(-30.0).abs() < 1e-10);
    }

    #[test]
    fn swiglu_matches_the_definition() {
        let e = expert(12, 20, 7);
        let x = rand_vec(2 * 12, 1);
        let mut out = vec![f32::NAN; 24];
        swiglu_ffn(&x, 2, &e, &mut out);
        let mut want = ffn_ref(&x[..12], &e);
        want.extend(ffn_ref(&x[12..], &e));
        assert_close(&out, &want, 1e-5);
    }

    #[test]
    fn routed_layer_mixes_weighted_experts_and_the_shared_part() {
        let h = 8;
        let experts: Vec<_> = (0..3).map(|s| expert(h, 6, 10 * s)).collect();
        let shared = expert(h, 4, 99);
        let routes = vec![
            TokenRoute::single(2),
            TokenRoute::new(&[0, 2], &[0.75, 0.25]).unwrap(),
            TokenRoute::single(0),
        ];
        let x = rand_vec(3 * h, 5);
        for with_shared in [false, true] {
            let mut out = vec![f32::NAN; 3 * h];
            let sh = with_shared.then_some(&shared);
            moe_layer(&x, h, &routes, |e| &experts[e as usize], sh, &mut out);
            let mut want = Vec::new();
            for (t, r) in routes.iter().enumerate() {
                let xt = &x[t * h..(t + 1) * h];
                let mut acc = if with_shared {
                    ffn_ref(xt, &shared)
                } else {
                    vec![0.0; h]
                };
                for (&e, &w) in r.experts().iter().zip(r.weights()) {
                    for (a, v) in acc.iter_mut().zip(ffn_ref(xt, &experts[e as usize])) {
                        *a += w as f64 * v;
                    }
                }
                want.extend(acc);
            }
            assert_close(&out, &want, 1e-5);
        }
    }
}
