use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::cache::{EvictionPolicy, ExpertCapacity};
use crate::model::weights::{ExpertWeights, Matrix};
use crate::ops::swiglu_ffn;

const H: usize = 16;
const I: usize = 24;

fn matrix(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Matrix {
    let data = (0..rows * cols)
        .map(|_| rng.random_range(-0.5f32..0.5))
        .collect();
    Matrix::new(rows, cols, data)
}

fn expert(rng: &mut ChaCha8Rng) -> ExpertWeights {
    ExpertWeights {
        gate: matrix(I, H, rng),
        up: matrix(I, H, rng),
        down: matrix(H, I, rng),
    }
}

/// A runtime of `layers` x `n` random experts (and a shared expert on odd layers).
fn runtime(layers: usize, n: usize, top_k: usize, seed: u64) -> CpuExperts {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let experts = (0..layers)
        .map(|_| (0..n).map(|_| expert(&mut rng)).collect())
        .collect();
    let shared = (0..layers)
        .map(|l| (l % 2 == 1).then(|| expert(&mut rng)))
        .collect();
    CpuExperts::new(experts, shared, H, top_k).unwrap()
}

fn random_routes(t: usize, n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<TokenRoute> {
    (0..t)
        .map(|_| {
            let mut ids: Vec<u16> = Vec::new();
            while ids.len() < k {
                let e = rng.random_range(0..n as u16);
                if !ids.contains(&e) {
                    ids.push(e);
                }
            }
            let w: Vec<f32> = (0..k).map(|_| rng.random_range(0.1f32..1.0)).collect();
            TokenRoute::new(&ids, &w).unwrap()
        })
        .collect()
}

/// The plain dense reference: every token through each of its experts alone, weighted and
/// summed, plus the shared expert; no permutation, no cache.
fn dense(rt: &CpuExperts, layer: usize, x: &[f32], routes: &[TokenRoute]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let mut y = vec![0.0f32; H];
    for (t, r) in routes.iter().enumerate() {
        let xt = &x[t * H..(t + 1) * H];
        let o = &mut out[t * H..(t + 1) * H];
        for (&e, &w) in r.experts().iter().zip(r.weights()) {
            swiglu_ffn(xt, 1, rt.expert(layer, e as usize).unwrap(), &mut y);
            for (a, b) in o.iter_mut().zip(&y) {
                *a += w * b;
            }
        }
        if let Some(s) = rt.shared(layer) {
            swiglu_ffn(xt, 1, s, &mut y);
            for (a, b) in o.iter_mut().zip(&y) {
                *a += b;
            }
        }
    }
    out
}

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "[{i}]: {x} vs {y}");
    }
}

fn run_layers(rt: &mut CpuExperts, k: usize, seed: u64) {
    let (layers, n) = (rt.shape().layers, rt.shape().experts);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for step in 0..4 {
        let t = 1 + step * 5;
        let x: Vec<f32> = (0..t * H).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        for l in 0..layers {
            let routes = random_routes(t, n, k, &mut rng);
            let mut out = vec![f32::NAN; t * H];
            rt.forward_layer(l, &x, &routes, &mut out, false).unwrap();
            assert_close(&out, &dense(rt, l, &x, &routes));
            // Accumulating adds to what is there.
            let mut acc = vec![1.0f32; t * H];
            rt.forward_layer(l, &x, &routes, &mut acc, true).unwrap();
            let want: Vec<f32> = dense(rt, l, &x, &routes).iter().map(|v| v + 1.0).collect();
            assert_close(&acc, &want);
        }
        rt.end_step();
    }
}

#[test]
fn forward_layer_equals_the_dense_reference_all_resident() {
    for k in [1, 2, 3] {
        let mut rt = runtime(3, 6, k, 11 + k as u64);
        run_layers(&mut rt, k, 5);
        let mut cached = runtime(3, 6, k, 11 + k as u64)
            .with_cache(ExpertCapacity::All, EvictionPolicy::Lru)
            .unwrap();
        run_layers(&mut cached, k, 5);
        let c = cached.cache().unwrap();
        assert_eq!(c.stats().evictions, 0);
        assert_eq!(cached.stats().waves, cached.stats().layer_calls);
    }
}

#[test]
fn forward_layer_in_waves_equals_the_dense_reference_under_lru_and_belady() {
    for policy in [EvictionPolicy::Lru, EvictionPolicy::Belady] {
        for k in [1, 2] {
            // Two slots per layer for 6 experts: any step of more than two experts runs in waves.
            let mut rt = runtime(2, 6, k, 3)
                .with_cache(ExpertCapacity::PerLayer(2), policy)
                .unwrap();
            run_layers(&mut rt, k, 9);
            let s = rt.stats();
            assert!(s.waves > s.layer_calls, "{policy:?} k={k}: no waves ran");
            let c = rt.cache().unwrap();
            assert!(c.stats().evictions > 0);
            assert!(c.resident() <= 2 * 2);
        }
    }
}

#[test]
fn a_shared_pool_smaller_than_a_layer_runs_in_waves() {
    let mut rt = runtime(2, 8, 2, 4)
        .with_cache(
            ExpertCapacity::Total(crate::cache::CacheCapacity::Slots(3)),
            EvictionPolicy::Lru,
        )
        .unwrap();
    run_layers(&mut rt, 2, 2);
    assert!(rt.stats().waves > rt.stats().layer_calls);
}

#[test]
fn plan_then_forward_equals_forward_alone_and_belady_uses_the_plan() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..3 * H).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let steps = [[0u16, 1, 2], [0, 1, 0], [1, 1, 1]];
    let mut outs = Vec::new();
    let mut misses = Vec::new();
    for planned in [false, true] {
        let mut rt = runtime(1, 4, 1, 8)
            .with_cache(ExpertCapacity::PerLayer(2), EvictionPolicy::Belady)
            .unwrap();
        let mut got = Vec::new();
        for (i, s) in steps.iter().enumerate() {
            let plans: Vec<RoutePlan> = steps[i..]
                .iter()
                .map(|s| RoutePlan::from_top1(4, s))
                .collect();
            if planned {
                rt.plan(&step_experts(&plans, 1)).unwrap();
            }
            let routes: Vec<TokenRoute> = s.iter().map(|&e| TokenRoute::single(e)).collect();
            let mut out = vec![0.0f32; 3 * H];
            rt.forward_layer(0, &x, &routes, &mut out, false).unwrap();
            rt.end_step();
            got.push(out);
        }
        outs.push(got);
        misses.push(rt.cache().unwrap().stats().misses);
    }
    assert_eq!(outs[0], outs[1]);
    // Step 0 loads 0, 1 then 2 (waves of two). With the plan, Belady keeps 0 and 1 for step 1
    // and evicts 2; without it every next use is unknown and step 1 misses again.
    assert!(
        misses[1] < misses[0],
        "planned {} vs unplanned {}",
        misses[1],
        misses[0]
    );
}

#[test]
fn bad_routes_and_shapes_are_clear_errors() {
    let mut rt = runtime(2, 4, 2, 1);
    let x = vec![0.0f32; 2 * H];
    let mut out = vec![0.0f32; 2 * H];
    let ok = vec![TokenRoute::single(1), TokenRoute::single(3)];
    let err = |rt: &mut CpuExperts, l: usize, x: &[f32], r: &[TokenRoute], o: &mut [f32]| {
        rt.forward_layer(l, x, r, o, false).unwrap_err().to_string()
    };
    let e = err(&mut rt, 2, &x, &ok, &mut out);
    assert!(e.contains("layer 2 is outside 0..2"), "{e}");
    let far = vec![TokenRoute::single(1), TokenRoute::single(4)];
    let e = err(&mut rt, 0, &x, &far, &mut out);
    assert!(e.contains("token 1: expert 4 is outside 0..4"), "{e}");
    let three = TokenRoute::new(&[0, 1, 2], &[0.5, 0.3, 0.2]).unwrap();
    let e = err(&mut rt, 0, &x, &[ok[0], three], &mut out);
    assert!(
        e.contains("routed to 3 experts, but the runtime serves top-2"),
        "{e}"
    );
    let e = err(&mut rt, 0, &x, &ok[..1], &mut out);
    assert!(e.contains("1 routes need x and out of 1 x 16"), "{e}");
    let mut short = vec![0.0f32; H];
    let e = err(&mut rt, 0, &x, &ok, &mut short);
    assert!(e.contains("got 32 and 16"), "{e}");
    let nan = TokenRoute::new(&[2], &[f32::NAN]).unwrap();
    let e = err(&mut rt, 1, &x, &[ok[0], nan], &mut out);
    assert!(e.contains("has weight NaN"), "{e}");
    // Nothing ran, and a good call still works.
    assert_eq!(rt.stats().layer_calls, 0);
    rt.forward_layer(0, &x, &ok, &mut out, false).unwrap();
    assert!(CpuExperts::new(Vec::new(), Vec::new(), H, 1).is_err());
    let mut r = ChaCha8Rng::seed_from_u64(0);
    let bad_width = vec![vec![expert(&mut r)]];
    let e = CpuExperts::new(bad_width, vec![None], H + 1, 1)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("do not form an FFN of width 17"),
        "{e}"
    );
}

#[test]
fn a_gated_shared_expert_is_scaled_by_the_sigmoid_of_its_gate() {
    // Layer 1 has a shared expert; its gate is the unit vector on coordinate 0, so token t's
    // shared output is scaled by sigmoid(x[t][0]).
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let mut gate = vec![0.0f32; H];
    gate[0] = 1.0;
    let gated = runtime(2, 4, 2, 5)
        .with_shared_gates(vec![None, Some(gate.clone())])
        .unwrap();
    let plain = runtime(2, 4, 2, 5);
    let t = 3;
    let mut x: Vec<f32> = (0..t * H).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    x[0] = 0.0; // sigmoid(0) = 1/2
    x[H] = 40.0; // sigmoid(40) = 1
    x[2 * H] = -40.0; // sigmoid(-40) = 0
    let routes = random_routes(t, 4, 2, &mut rng);
    let (mut gated, mut plain) = (gated, plain);
    let mut with_gate = vec![0.0f32; t * H];
    gated
        .forward_layer(1, &x, &routes, &mut with_gate, false)
        .unwrap();
    let mut ungated = vec![0.0f32; t * H];
    plain
        .forward_layer(1, &x, &routes, &mut ungated, false)
        .unwrap();
    let mut shared = vec![0.0f32; t * H];
    swiglu_ffn(&x, t, plain.shared(1).unwrap(), &mut shared);
    for (tok, scale) in [(0, 0.5f32), (1, 1.0), (2, 0.0)] {
        for c in 0..H {
            let i = tok * H + c;
            let want = ungated[i] - shared[i] + scale * shared[i];
            assert!(
                (with_gate[i] - want).abs() < 1e-5 * want.abs().max(1.0),
                "token {tok}: {} vs {want}",
                with_gate[i]
            );
        }
    }
    assert_eq!(gated.shared_gate(1), Some(&gate[..]));
    assert!(gated.shared_gate(0).is_none());
    // A gate for a layer without a shared expert, or of the wrong width, is refused.
    assert!(runtime(2, 4, 2, 5)
        .with_shared_gates(vec![Some(gate.clone()), None])
        .is_err());
    assert!(runtime(2, 4, 2, 5)
        .with_shared_gates(vec![None, Some(vec![1.0; 3])])
        .is_err());
    assert!(runtime(2, 4, 2, 5).with_shared_gates(vec![None]).is_err());
}
