//! The expert runtime per layer on every device present, against the CPU runtime (the reference,
//! itself tested against a dense reference in `moe::tests`): random hidden states and random
//! top-1 and top-2 routes, every expert resident and fewer slots than a layer's experts (waves)
//! under LRU and Belady, a plan issued before the layer or not, fused and residual layouts.
//!
//! On CUDA the runtime runs on a **borrowed, non-default stream** (as torch's current stream
//! reaches it through the C ABI) whose input is produced behind a long GEMM chain: a runtime that
//! enqueued anything on another stream (its own, or the legacy default stream) would read the
//! input before it exists and fail the comparison.

#[path = "../../kernels/tests/common_gpu/devices.rs"]
mod devices;

use devices::{register, Device as TestDevice, DeviceTests, Failed};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use pregate::cache::{EvictionPolicy, ExpertCapacity};
use pregate::engine::cpu::BackboneWeights;
use pregate::model::{make_model, ExpertLayout, ModelDir, Preset};
use pregate::moe::{step_experts, CpuExperts};
use pregate::route::{RoutePlan, RouteScope, TokenRoute};

fn main() -> std::process::ExitCode {
    let mut tests = DeviceTests::new();
    register!(tests, every: runtime_per_layer_matches_the_cpu_runtime);
    tests.run()
}

/// A tiny model of `layout` whose router picks `top_k` experts per token.
fn model(layout: ExpertLayout, top_k: usize) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    make_model(&Preset::Tiny.spec(), layout, 3, dir.path()).unwrap();
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["router_top_k"] = top_k.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    (dir, m)
}

fn cpu_runtime(m: &ModelDir) -> CpuExperts {
    let (mut w, _) = BackboneWeights::split(m.load_weights().unwrap());
    let routed = w
        .layers
        .iter_mut()
        .map(|l| std::mem::take(&mut l.experts))
        .collect();
    let shared = w.layers.iter_mut().map(|l| l.shared.take()).collect();
    let c = &m.config;
    CpuExperts::new(routed, shared, c.hidden_size, c.router_top_k).unwrap()
}

/// Per step: the hidden states and each layer's routes.
type Step = (Vec<f32>, Vec<Vec<TokenRoute>>);

fn steps(m: &ModelDir, seed: u64) -> Vec<Step> {
    let c = &m.config;
    let (h, n, k) = (c.hidden_size, c.n_cluster, c.router_top_k);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..5)
        .map(|s| {
            let t = [1, 7, 3, 16, 2][s];
            let x = (0..t * h).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let layers = (0..c.num_hidden_layers)
                .map(|_| {
                    (0..t)
                        .map(|_| {
                            let mut ids: Vec<u16> = Vec::new();
                            while ids.len() < k {
                                let e = rng.random_range(0..n as u16);
                                if !ids.contains(&e) {
                                    ids.push(e);
                                }
                            }
                            let w: Vec<f32> =
                                (0..k).map(|_| rng.random_range(0.1f32..1.0)).collect();
                            TokenRoute::new(&ids, &w).unwrap()
                        })
                        .collect()
                })
                .collect();
            (x, layers)
        })
        .collect()
}

/// The plan of the steps from `i` on, as a backend would pass it.
fn plan_from(steps: &[Step], i: usize, n: usize) -> Vec<pregate::cache::StepExperts> {
    let layers = steps[0].1.len();
    let plans: Vec<RoutePlan> = steps[i..]
        .iter()
        .map(|(_, ls)| {
            let mut p = RoutePlan::new(n, RouteScope::PerLayer(layers));
            for t in 0..ls[0].len() {
                let rows: Vec<TokenRoute> = ls.iter().map(|l| l[t]).collect();
                p.push(&rows).unwrap();
            }
            p
        })
        .collect();
    step_experts(&plans, layers)
}

/// The CPU runtime's outputs: `[step][layer]`, overwriting.
fn reference(m: &ModelDir, steps: &[Step]) -> Vec<Vec<Vec<f32>>> {
    let mut rt = cpu_runtime(m);
    steps
        .iter()
        .map(|(x, layers)| {
            let out = layers
                .iter()
                .enumerate()
                .map(|(l, r)| {
                    let mut o = vec![0.0f32; x.len()];
                    rt.forward_layer(l, x, r, &mut o, false).unwrap();
                    o
                })
                .collect();
            rt.end_step();
            out
        })
        .collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs())) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / scale)
        .fold(0.0, f64::max)
}

type Setup = (ExpertCapacity, EvictionPolicy, bool);

const SETUPS: [Setup; 4] = [
    (ExpertCapacity::All, EvictionPolicy::Belady, false),
    (ExpertCapacity::PerLayer(2), EvictionPolicy::Lru, false),
    (ExpertCapacity::PerLayer(2), EvictionPolicy::Belady, true),
    (ExpertCapacity::PerLayer(1), EvictionPolicy::Belady, false),
];

fn runtime_per_layer_matches_the_cpu_runtime(device: &TestDevice) -> Result<(), Failed> {
    for layout in [ExpertLayout::Fused, ExpertLayout::Residual] {
        for top_k in [1, 2] {
            let (_d, m) = model(layout, top_k);
            let steps = steps(&m, 17 + top_k as u64);
            let want = reference(&m, &steps);
            for setup in SETUPS {
                let got = match device {
                    TestDevice::Cpu => on_cpu(&m, &steps, setup),
                    TestDevice::Cuda(n) => cuda::on_cuda(*n, &m, &steps, setup)?,
                };
                for (s, (g, w)) in got.iter().zip(&want).enumerate() {
                    for (l, (gl, wl)) in g.iter().zip(w).enumerate() {
                        let e = max_rel(gl, wl);
                        if e > 1e-5 {
                            return Err(format!(
                                "{layout:?} top-{top_k} {setup:?}: step {s} layer {l}: \
                                 relative error {e:.3e}"
                            )
                            .into());
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The CPU runtime with a cache (accounting), accumulating into a residual of ones.
fn on_cpu(m: &ModelDir, steps: &[Step], (cap, policy, plan): Setup) -> Vec<Vec<Vec<f32>>> {
    let mut rt = cpu_runtime(m).with_cache(cap, policy).unwrap();
    let n = m.config.n_cluster;
    steps
        .iter()
        .enumerate()
        .map(|(i, (x, layers))| {
            if plan {
                rt.plan(&plan_from(steps, i, n)).unwrap();
            }
            let out = layers
                .iter()
                .enumerate()
                .map(|(l, r)| {
                    let mut o = vec![1.0f32; x.len()];
                    rt.forward_layer(l, x, r, &mut o, true).unwrap();
                    o.iter().map(|v| v - 1.0).collect()
                })
                .collect();
            rt.end_step();
            out
        })
        .collect()
}

mod cuda {
    use std::sync::Arc;

    use pregate::cuda::{borrow_stream, open_context, CudaExperts, ExpertSetup};
    use pregate_kernels::{Blas, KernelSet};

    use super::*;

    /// The CUDA runtime (f32) on a borrowed stream, each layer's input produced behind a long
    /// GEMM chain on that stream.
    pub fn on_cuda(
        ordinal: usize,
        m: &ModelDir,
        steps: &[Step],
        (capacity, policy, plan): Setup,
    ) -> Result<Vec<Vec<Vec<f32>>>, Failed> {
        let ctx = open_context(ordinal).map_err(|e| e.to_string())?;
        let kernels = Arc::new(KernelSet::new(&ctx).map_err(|e| e.to_string())?);
        // A host framework's stream: created and owned elsewhere, borrowed here.
        let owner = ctx.new_stream().map_err(|e| e.to_string())?;
        // SAFETY: `owner` is a live stream of this context and outlives `stream` and every call
        // below (it is dropped at the end of this function, after a synchronisation).
        let stream = unsafe { borrow_stream(&ctx, owner.cu_stream() as u64) };
        let setup = ExpertSetup {
            capacity,
            policy,
            prefetch: true,
            measure_stalls: true,
            grouped_ffn: true,
        };
        let mut rt =
            CudaExperts::<f32>::new(m, kernels, &stream, setup).map_err(|e| e.to_string())?;
        let blas = Blas::new(&stream).map_err(|e| e.to_string())?;
        let big = 2048;
        let a = stream
            .alloc_zeros::<f32>(big * big)
            .map_err(|e| e.to_string())?;
        let mut b = stream
            .alloc_zeros::<f32>(big * big)
            .map_err(|e| e.to_string())?;
        let n = m.config.n_cluster;
        let mut out = Vec::new();
        for (i, (x, layers)) in steps.iter().enumerate() {
            if plan {
                rt.plan(&plan_from(steps, i, n))
                    .map_err(|e| e.to_string())?;
            }
            let mut per_layer = Vec::new();
            for (l, r) in layers.iter().enumerate() {
                let staged = stream.clone_htod(x).map_err(|e| e.to_string())?;
                let mut dx = stream
                    .alloc_zeros::<f32>(x.len())
                    .map_err(|e| e.to_string())?;
                let ones = vec![1.0f32; x.len()];
                let mut dout = stream
                    .alloc_zeros::<f32>(x.len())
                    .map_err(|e| e.to_string())?;
                // The long work: the layer's input and residual exist only after it.
                for _ in 0..8 {
                    blas.linear::<f32, f32>(&a, &a, &mut b, big, big, big)
                        .map_err(|e| e.to_string())?;
                }
                stream
                    .memcpy_dtod(&staged, &mut dx)
                    .map_err(|e| e.to_string())?;
                stream
                    .memcpy_htod(&ones, &mut dout)
                    .map_err(|e| e.to_string())?;
                rt.forward_layer(l, &dx, r, &mut dout, true, &stream)
                    .map_err(|e| e.to_string())?;
                let host = stream.clone_dtoh(&dout).map_err(|e| e.to_string())?;
                per_layer.push(host.iter().map(|v| v - 1.0).collect());
            }
            rt.end_step();
            out.push(per_layer);
        }
        stream.synchronize().map_err(|e| e.to_string())?;
        let s = rt.stats();
        println!(
            "cuda:{ordinal} {capacity:?} {policy:?} plan={plan}: {} layer calls, {} waves, {} \
             prefetches, hits {} misses {}",
            s.layer_calls,
            s.waves,
            s.prefetches,
            rt.cache().stats().hits,
            rt.cache().stats().misses
        );
        drop(rt);
        drop(owner);
        Ok(out)
    }
}
