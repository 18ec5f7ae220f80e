//! DSelect-k gates chosen by a model's config (`pregate_gate`): the `make-model` presets with a
//! static gate (a pre-gate router) and a per-example gate (routed in the forward pass) load and
//! generate, and their routes equal the DSelect-k formula computed here from the weights; bad
//! tensor shapes and bad config values are named.

mod common;

use std::path::Path;

use pregate::engine::{open_engine, Device, GenerationRequest};
use pregate::model::weights::Matrix;
use pregate::model::{make_model, ExpertLayout, ModelDir, Preset};
use pregate::route::TokenRoute;
use pregate::router::RouterKind;

/// `model.safetensors`' f32 tensor `name`.
fn tensor(dir: &Path, name: &str) -> Vec<f32> {
    let ck = pregate::model::Checkpoint::open(dir).unwrap();
    let t = ck.tensor(name).unwrap();
    t.data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The DSelect-k expert weights for selector logits `z` (`[k, m]`) and mixing logits `alpha`:
/// `sum_i softmax(alpha)_i prod_j (bit_j(e) ? S(z_ij) : 1 - S(z_ij))`, bits most significant first.
fn dselect_weights(z: &[f32], alpha: &[f32], experts: usize, gamma: f32) -> Vec<f32> {
    let m = z.len() / alpha.len();
    let smooth = |x: f32| {
        if x <= -gamma / 2.0 {
            0.0
        } else if x >= gamma / 2.0 {
            1.0
        } else {
            -2.0 / gamma.powi(3) * x.powi(3) + 3.0 / (2.0 * gamma) * x + 0.5
        }
    };
    let max = alpha.iter().cloned().fold(f32::MIN, f32::max);
    let sum: f32 = alpha.iter().map(|a| (a - max).exp()).sum();
    (0..experts)
        .map(|e| {
            alpha
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let mix = (a - max).exp() / sum;
                    (0..m).fold(mix, |r, j| {
                        let s = smooth(z[i * m + j]);
                        match (e >> (m - 1 - j)) & 1 {
                            1 => r * s,
                            _ => r * (1.0 - s),
                        }
                    })
                })
                .sum()
        })
        .collect()
}

/// The experts with non-zero weight, heaviest first (ties to the lower index), at most `k`.
fn top(weights: &[f32], k: usize) -> Vec<(u16, f32)> {
    let mut idx: Vec<usize> = (0..weights.len()).filter(|&e| weights[e] > 0.0).collect();
    idx.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    idx.into_iter()
        .take(k)
        .map(|e| (e as u16, weights[e]))
        .collect()
}

fn assert_route(route: &TokenRoute, want: &[(u16, f32)], what: &str) {
    let experts: Vec<u16> = want.iter().map(|w| w.0).collect();
    assert_eq!(route.experts(), &experts[..], "{what}");
    for (got, (_, w)) in route.weights().iter().zip(want) {
        assert!(
            (got - w).abs() < 1e-5,
            "{what}: {:?} vs {want:?}",
            route.weights()
        );
    }
}

fn made(preset: Preset) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_model(&preset.spec(), ExpertLayout::Fused, 7, dir.path()).unwrap();
    dir
}

/// Generates `n` tokens greedily from `prompt`; the tokens.
fn generate(engine: &mut pregate::engine::Engine, prompt: Vec<u32>, n: usize) -> Vec<u32> {
    let mut req = GenerationRequest::greedy(prompt, n);
    req.ignore_eos = true;
    engine.add_request(req).unwrap();
    let mut out = Vec::new();
    while !engine.is_empty() {
        let step = engine.step(&engine.schedule_all()).unwrap();
        out.extend(step.into_events().unwrap().iter().map(|e| e.token));
    }
    out
}

#[test]
fn a_static_gate_is_a_pre_gate_router_whose_routes_are_the_formula() {
    let dir = made(Preset::DSelectStaticTiny);
    let model = ModelDir::open(dir.path()).unwrap();
    let cfg = model.config.clone();
    let (experts, k, gamma) = (
        cfg.num_experts(),
        cfg.experts_per_token(),
        cfg.dselect_gamma(),
    );
    let mut engine = open_engine(&model, Device::Cpu).unwrap();
    assert_eq!(engine.router().kind(), RouterKind::PreGate);
    let prompt = vec![1, 17, 200, 33, 5];
    engine
        .add_request(GenerationRequest::greedy(prompt.clone(), 4))
        .unwrap();
    let pending: Vec<_> = engine.pending().collect();
    assert_eq!(pending.len(), 1);
    let p = &pending[0];
    assert_eq!(p.tokens.len(), prompt.len());
    for l in 0..cfg.num_hidden_layers {
        let z = tensor(dir.path(), &format!("model.layers.{l}.mlp.dselect.z"));
        let alpha = tensor(dir.path(), &format!("model.layers.{l}.mlp.dselect.alpha"));
        let want = top(&dselect_weights(&z, &alpha, experts, gamma), k);
        assert!(!want.is_empty());
        for t in 0..prompt.len() {
            let r = p.routes.route(p.route_offset + t, l);
            assert_route(r, &want, &format!("layer {l}, token {t}"));
        }
    }
    drop(pending);
    while !engine.is_empty() {
        engine.step(&engine.schedule_all()).unwrap();
    }
    let out = generate(&mut engine, prompt, 6);
    assert_eq!(out.len(), 6);
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

fn matvec(m: &Matrix, x: &[f32]) -> Vec<f32> {
    m.data
        .chunks_exact(m.cols)
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

#[test]
fn a_per_example_gate_routes_the_hidden_state_by_the_formula() {
    let dir = made(Preset::DSelectPerExampleTiny);
    let model = ModelDir::open(dir.path()).unwrap();
    let cfg = model.config.clone();
    let (experts, k, gamma) = (
        cfg.num_experts(),
        cfg.experts_per_token(),
        cfg.dselect_gamma(),
    );
    let (backbone, router) = model.load_backbone().unwrap();
    assert!(router.is_none());
    let mut engine = open_engine(&model, Device::Cpu).unwrap();
    assert_eq!(engine.router().kind(), RouterKind::InModel);
    engine.trace_routes(true).unwrap();
    // A one-token prompt: at position 0 attention returns the token's own value vector, so layer
    // 0's normed hidden state, and from it the gate's input, is computed here in a few lines.
    let h = cfg.hidden_size;
    let (heads, kv_heads, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let l0 = &backbone.layers[0];
    let wz = tensor(dir.path(), "model.layers.0.mlp.dselect.z_proj.weight");
    let bz = tensor(dir.path(), "model.layers.0.mlp.dselect.z_proj.bias");
    let wa = tensor(dir.path(), "model.layers.0.mlp.dselect.alpha_proj.weight");
    let ba = tensor(dir.path(), "model.layers.0.mlp.dselect.alpha_proj.bias");
    let mut distinct = std::collections::BTreeSet::new();
    for token in [3u32, 17, 90, 200, 311, 444] {
        let x0 = &backbone.embed.data[token as usize * h..(token as usize + 1) * h];
        let a = rms_norm(x0, &l0.input_norm, cfg.rms_norm_eps);
        let v = matvec(&l0.v, &a);
        let att: Vec<f32> = (0..heads)
            .flat_map(|q| {
                let g = q / (heads / kv_heads);
                v[g * d..(g + 1) * d].to_vec()
            })
            .collect();
        let o = matvec(&l0.o, &att);
        let x1: Vec<f32> = x0.iter().zip(&o).map(|(a, b)| a + b).collect();
        let hn = rms_norm(&x1, &l0.post_norm, cfg.rms_norm_eps);
        let affine = |w: &[f32], b: &[f32]| -> Vec<f32> {
            b.iter()
                .enumerate()
                .map(|(r, bias)| {
                    bias + w[r * h..(r + 1) * h]
                        .iter()
                        .zip(&hn)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                })
                .collect()
        };
        let want = top(
            &dselect_weights(&affine(&wz, &bz), &affine(&wa, &ba), experts, gamma),
            k,
        );
        let mut req = GenerationRequest::greedy(vec![token], 1);
        req.ignore_eos = true;
        engine.add_request(req).unwrap();
        let out = engine.step(&engine.schedule_all()).unwrap();
        let chunk = &out.routes[0];
        assert_eq!(chunk.start_pos, 0);
        assert_route(&chunk.layers[0][0], &want, &format!("token {token}"));
        distinct.insert(chunk.layers[0][0].experts().to_vec());
        while !engine.is_empty() {
            engine.step(&engine.schedule_all()).unwrap();
        }
    }
    // The gate reads its input: different tokens go to different experts.
    assert!(distinct.len() > 1, "{distinct:?}");
    assert_eq!(generate(&mut engine, vec![1, 17, 200, 33], 6).len(), 6);
}

fn open_err(dir: &Path) -> String {
    match ModelDir::open(dir).and_then(|m| open_engine(&m, Device::Cpu).map(|_| ())) {
        Ok(()) => panic!("opened a bad model"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_gate_shapes_are_named() {
    for (preset, name) in [
        (Preset::DSelectStaticTiny, "model.layers.1.mlp.dselect.z"),
        (
            Preset::DSelectPerExampleTiny,
            "model.layers.0.mlp.dselect.alpha_proj.weight",
        ),
    ] {
        let dir = made(preset);
        common::rewrite(dir.path(), |s, b| {
            let mut s = s.clone();
            if s.name == name {
                // One row short.
                let cols: usize = s.shape[1..].iter().product();
                s.shape[0] -= 1;
                return Some((s, b[..b.len() - cols * 4].to_vec()));
            }
            Some((s, b))
        });
        let msg = open_err(dir.path());
        assert!(msg.contains(name), "{msg}");
    }
    let dir = made(Preset::DSelectStaticTiny);
    common::rewrite(dir.path(), |s, b| {
        (s.name != "model.layers.0.mlp.dselect.alpha").then(|| (s.clone(), b))
    });
    let msg = open_err(dir.path());
    assert!(msg.contains("model.layers.0.mlp.dselect.alpha"), "{msg}");
}

#[test]
fn bad_gate_config_values_are_named() {
    for (edit, want) in [
        (
            r#""pregate_gate": "dselect_magic""#,
            "pregate_gate `dselect_magic`",
        ),
        (
            r#""pregate_gate": "dselect_static", "dselect_gamma": 0"#,
            "dselect_gamma 0",
        ),
    ] {
        let dir = made(Preset::DSelectStaticTiny);
        let path = dir.path().join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace(r#""pregate_gate": "dselect_static""#, edit);
        assert!(text.contains(edit));
        std::fs::write(&path, text).unwrap();
        let msg = open_err(dir.path());
        assert!(msg.contains(want), "{msg}");
    }
    // Qwen2-MoE's tiny preset has a dense layer, which a pre-gate router cannot route.
    let mut spec = Preset::Qwen2MoeTiny.spec();
    spec.config.moe.pregate_gate = Some("dselect_static".into());
    let dir = tempfile::tempdir().unwrap();
    let e = make_model(&spec, ExpertLayout::Fused, 1, dir.path())
        .map(|_| ())
        .and_then(|_| ModelDir::open(dir.path()).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs every layer to be an MoE layer"), "{e}");
}
