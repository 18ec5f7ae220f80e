//! The loader on every layout and dtype, `convert` against the dense masked computation, the
//! tiny preset's numerics, and the Python reference's fixtures.

use std::path::{Path, PathBuf};

use pregate::model::checkpoint::FloatDtype;
use pregate::model::convert::convert;
use pregate::model::names;
use pregate::model::{make_model, Checkpoint, ExpertLayout, ModelDir, ModelSpec, Preset};
use pregate::model::{ExpertWeights, Matrix, ModelWeights};
use pregate::Error;

fn tiny(dtype: FloatDtype) -> ModelSpec {
    let mut s = Preset::Tiny.spec();
    s.dtype = dtype;
    s
}

fn make(spec: &ModelSpec, layout: ExpertLayout, seed: u64) -> (tempfile::TempDir, ModelDir) {
    let dir = tempfile::tempdir().unwrap();
    make_model(spec, layout, seed, dir.path()).unwrap();
    let m = ModelDir::open(dir.path()).unwrap();
    (dir, m)
}

fn round(v: f32, dtype: FloatDtype) -> f32 {
    match dtype {
        FloatDtype::F32 => v,
        FloatDtype::F16 => half::f16::from_f32(v).to_f32(),
        // make-model truncates to bf16.
        FloatDtype::BF16 => f32::from_bits(v.to_bits() & 0xffff_0000),
    }
}

fn assert_rounded(a: &Matrix, exact: &Matrix, dtype: FloatDtype) {
    assert_eq!((a.rows, a.cols), (exact.rows, exact.cols));
    for (x, y) in a.data.iter().zip(&exact.data) {
        assert_eq!(*x, round(*y, dtype));
    }
}

#[test]
fn fused_and_residual_load_in_every_dtype() {
    for layout in [ExpertLayout::Fused, ExpertLayout::Residual] {
        let (_d32, m32) = make(&tiny(FloatDtype::F32), layout, 3);
        let exact = m32.load_weights().unwrap();
        let spec = tiny(FloatDtype::F32);
        let c = &spec.config;
        assert_eq!(exact.layout, layout);
        assert_eq!(exact.layers.len(), c.num_hidden_layers);
        assert_eq!(exact.embed.rows, c.vocab_size);
        assert!(exact.lm_head.is_some());
        for layer in &exact.layers {
            assert_eq!(layer.experts.len(), c.n_cluster);
            match layout {
                ExpertLayout::Residual => {
                    assert_eq!(layer.shared.as_ref().unwrap().inter(), spec.shared_inter);
                    assert_eq!(
                        layer.experts[0].inter(),
                        spec.expert_inter - spec.shared_inter
                    );
                }
                _ => {
                    assert!(layer.shared.is_none());
                    assert_eq!(layer.experts[0].inter(), spec.expert_inter);
                }
            }
        }
        for dtype in [FloatDtype::F16, FloatDtype::BF16] {
            let (_d, m) = make(&tiny(dtype), layout, 3);
            let w = m.load_weights().unwrap();
            assert_rounded(&w.embed, &exact.embed, dtype);
            assert_rounded(
                &w.layers[1].experts[3].down,
                &exact.layers[1].experts[3].down,
                dtype,
            );
            assert_rounded(
                &w.router.proj_out.weight,
                &exact.router.proj_out.weight,
                dtype,
            );
            let dtypes = pregate::model::load::storage_dtypes(&m.checkpoint);
            assert_eq!(dtypes, vec![dtype.safetensors().to_string()]);
        }
    }
}

#[test]
fn sharded_index_loads_the_same_weights() {
    let spec = tiny(FloatDtype::BF16);
    let (_a, single) = make(&spec, ExpertLayout::Residual, 5);
    let mut sharded_spec = spec.clone();
    sharded_spec.max_shard_bytes = 64 << 10;
    let (b, sharded) = make(&sharded_spec, ExpertLayout::Residual, 5);
    assert!(b.path().join("model.safetensors.index.json").is_file());
    assert!(!b.path().join("model.safetensors").exists());
    assert!(sharded.checkpoint.files().len() > 3);
    assert_eq!(
        single.load_weights().unwrap(),
        sharded.load_weights().unwrap()
    );
}

#[test]
fn make_model_is_deterministic_per_seed() {
    let spec = tiny(FloatDtype::F32);
    let (a, _) = make(&spec, ExpertLayout::Fused, 11);
    let (b, _) = make(&spec, ExpertLayout::Fused, 11);
    let (c, _) = make(&spec, ExpertLayout::Fused, 12);
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(read(a.path()), read(b.path()));
    assert_ne!(read(a.path()), read(c.path()));
    for f in ["config.json", "tokenizer.json"] {
        assert!(a.path().join(f).is_file(), "{f}");
    }
}

#[test]
fn made_models_have_a_working_tokenizer() {
    let (_d, m) = make(&tiny(FloatDtype::F32), ExpertLayout::Fused, 0);
    let tok = m.tokenizer.as_ref().expect("tokenizer.json");
    assert_eq!(tok.vocab_size(), m.config.vocab_size);
    let text = "Hello, wörld! 🦀";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

#[test]
fn masked_layout_is_refused_with_a_hint() {
    let (d, m) = make(&tiny(FloatDtype::F16), ExpertLayout::Masked, 1);
    assert_eq!(m.layout, ExpertLayout::Masked);
    assert!(d.path().join("masks.safetensors").is_file());
    let err = m.load_weights().unwrap_err().to_string();
    assert!(err.contains("pregate convert"), "{err}");
    let err = ModelWeights::load(d.path(), &m.config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("masked"), "{err}");
}

#[test]
fn tied_embeddings_need_no_lm_head() {
    let mut spec = tiny(FloatDtype::F32);
    spec.config.tie_word_embeddings = true;
    let (d, m) = make(&spec, ExpertLayout::Fused, 2);
    assert!(!m.checkpoint.contains(names::LM_HEAD));
    let w = m.load_weights().unwrap();
    assert!(w.lm_head.is_none());
    assert_eq!(w.lm_head(), &w.embed);
    // The same files with `tie_word_embeddings: false` lack lm_head.
    let mut cfg = m.config.clone();
    cfg.tie_word_embeddings = false;
    match ModelWeights::load(d.path(), &cfg) {
        Err(Error::MissingTensor { name, dir }) => {
            assert_eq!(name, names::LM_HEAD);
            assert_eq!(dir, d.path());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn expert_raw_bytes_are_reachable_by_name() {
    let (_d, m) = make(&tiny(FloatDtype::BF16), ExpertLayout::Fused, 4);
    let spec = tiny(FloatDtype::BF16);
    let h = spec.config.hidden_size;
    for (i, name) in names::expert_tensor_names(1, 2).iter().enumerate() {
        let t = m.checkpoint.tensor(name).unwrap();
        assert_eq!(t.float_dtype().unwrap(), FloatDtype::BF16);
        assert_eq!(t.data.len(), h * spec.expert_inter * 2);
        let shape = if i < 2 {
            [spec.expert_inter, h]
        } else {
            [h, spec.expert_inter]
        };
        assert_eq!(t.shape, shape);
    }
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

fn matvec(m: &Matrix, x: &[f32]) -> Vec<f32> {
    (0..m.rows)
        .map(|r| m.row(r).iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn ffn(e: &ExpertWeights, y: &[f32]) -> Vec<f32> {
    let g = matvec(&e.gate, y);
    let u = matvec(&e.up, y);
    let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
    matvec(&e.down, &a)
}

/// The router on a one-token sequence (attention over one position is its value projection;
/// RoPE at position 0 is the identity), written out by hand.
fn router_logits(w: &ModelWeights, token: usize) -> Vec<f32> {
    let r = &w.router;
    let lin = |l: &pregate::model::Linear, x: &[f32]| add(&matvec(&l.weight, x), &l.bias);
    let x = r.embed.row(token).to_vec();
    let attn = lin(&r.o, &lin(&r.v, &rmsnorm(&x, &r.input_norm, 1e-6)));
    let h = add(&x, &attn);
    let hidden: Vec<f32> = lin(&r.proj_1, &rmsnorm(&h, &r.post_norm, 1e-6))
        .into_iter()
        .map(silu)
        .collect();
    let h = add(&h, &lin(&r.proj_2, &hidden));
    lin(&r.proj_out, &rmsnorm(&h, &r.out_norm, 1e-6))
}

#[test]
fn tiny_preset_spreads_tokens_over_experts_and_keeps_logits_order_one() {
    let (_d, m) = make(&tiny(FloatDtype::F32), ExpertLayout::Fused, 0);
    let w = m.load_weights().unwrap();
    let n = m.config.n_cluster;
    let mut counts = vec![0usize; n];
    for t in 0..m.config.vocab_size {
        let l = router_logits(&w, t);
        let best = (0..n).fold(0, |b, e| if l[e] > l[b] { e } else { b });
        counts[best] += 1;
    }
    let v = m.config.vocab_size;
    assert!(
        counts.iter().all(|&c| c > v / (4 * n) && c < v / 2),
        "{counts:?}"
    );
    // Logits of the embedding alone, through the final norm and lm_head: O(1).
    let x = rmsnorm(w.embed.row(7), &w.norm, 1e-5);
    let logits = matvec(w.lm_head(), &x);
    let std = (logits.iter().map(|v| v * v).sum::<f32>() / logits.len() as f32).sqrt();
    assert!((0.3..3.0).contains(&std), "{std}");
}

/// Expert FFN outputs of the converted models equal the dense MLP restricted to the expert's
/// channels (`residual | expert_mask[e]`), computed here from the dense weights and the masks.
#[test]
fn convert_matches_the_dense_masked_ffn() {
    for dtype in [FloatDtype::F32, FloatDtype::F16] {
        let spec = tiny(dtype);
        let (src, masked) = make(&spec, ExpertLayout::Masked, 9);
        let masks = Checkpoint::open_file(&src.path().join("masks.safetensors")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let fused_dir = out.path().join("fused");
        let residual_dir = out.path().join("residual");
        convert(src.path(), &fused_dir, ExpertLayout::Fused, None, None).unwrap();
        convert(
            src.path(),
            &residual_dir,
            ExpertLayout::Residual,
            None,
            Some(32 << 10),
        )
        .unwrap();
        let fused = ModelDir::open(&fused_dir).unwrap();
        let residual = ModelDir::open(&residual_dir).unwrap();
        assert_eq!(fused.layout, ExpertLayout::Fused);
        assert_eq!(residual.layout, ExpertLayout::Residual);
        assert!(residual.checkpoint.files().len() > 1);
        assert!(fused_dir.join("tokenizer.json").is_file());
        // The stored dtype is kept.
        let t = fused
            .checkpoint
            .tensor(&names::expert_tensor_names(0, 0)[0])
            .unwrap();
        assert_eq!(t.float_dtype().unwrap(), dtype);
        let fw = fused.load_weights().unwrap();
        let rw = residual.load_weights().unwrap();
        let h = spec.config.hidden_size;
        let inter = spec.config.intermediate_size;
        for l in 0..spec.config.num_hidden_layers {
            let dense: Vec<Matrix> = names::dense_mlp_tensor_names(l)
                .iter()
                .zip([(inter, h), (inter, h), (h, inter)])
                .map(|(n, (r, c))| {
                    let t = masked.checkpoint.tensor(n).unwrap();
                    Matrix::new(r, c, t.to_f32().unwrap())
                })
                .collect();
            let res = masks
                .tensor(&names::residual_mask_name(l))
                .unwrap()
                .data
                .to_vec();
            let exp = masks
                .tensor(&names::expert_mask_name(l))
                .unwrap()
                .data
                .to_vec();
            let y: Vec<f32> = (0..h)
                .map(|i| ((i * 37 + l * 11) % 17) as f32 / 8.5 - 1.0)
                .collect();
            let g = matvec(&dense[0], &y);
            let u = matvec(&dense[1], &y);
            for e in 0..spec.config.n_cluster {
                let act: Vec<f32> = (0..inter)
                    .map(|c| {
                        let on = res[c] != 0 || exp[e * inter + c] != 0;
                        if on {
                            silu(g[c]) * u[c]
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let want = matvec(&dense[2], &act);
                let got_fused = ffn(&fw.layers[l].experts[e], &y);
                let got_res = add(
                    &ffn(rw.layers[l].shared.as_ref().unwrap(), &y),
                    &ffn(&rw.layers[l].experts[e], &y),
                );
                for i in 0..h {
                    assert!((want[i] - got_fused[i]).abs() < 1e-4, "fused l{l} e{e} {i}");
                    assert!(
                        (want[i] - got_res[i]).abs() < 1e-4,
                        "residual l{l} e{e} {i}"
                    );
                }
            }
        }
        // Every other tensor is copied unchanged.
        let a = masked.checkpoint.tensor(names::EMBED).unwrap();
        let b = fused.checkpoint.tensor(names::EMBED).unwrap();
        assert_eq!(a.data, b.data);
        assert_eq!(a.dtype, b.dtype);
    }
}

#[test]
fn convert_refuses_split_layouts_and_missing_masks() {
    let (src, _) = make(&tiny(FloatDtype::F32), ExpertLayout::Fused, 1);
    let out = tempfile::tempdir().unwrap();
    let err = convert(src.path(), out.path(), ExpertLayout::Fused, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already in the fused layout"), "{err}");
    let (src, _) = make(&tiny(FloatDtype::F32), ExpertLayout::Masked, 1);
    std::fs::remove_file(src.path().join("masks.safetensors")).unwrap();
    let err = convert(src.path(), out.path(), ExpertLayout::Fused, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("masks.safetensors"), "{err}");
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
        .join("model")
}

#[test]
fn reference_fixtures_load() {
    for (name, layout, dtype) in [
        ("fused_f32", ExpertLayout::Fused, "F32"),
        ("residual_bf16_sharded", ExpertLayout::Residual, "BF16"),
    ] {
        let dir = fixture(name);
        if !dir.join("config.json").is_file() {
            eprintln!("skipping {name}: fixture not generated");
            continue;
        }
        let m = ModelDir::open(&dir).unwrap();
        assert_eq!(m.layout, layout, "{name}");
        assert_eq!(
            pregate::model::load::storage_dtypes(&m.checkpoint),
            vec![dtype.to_string()]
        );
        let w = m.load_weights().unwrap();
        assert_eq!(w.layers.len(), m.config.num_hidden_layers);
        assert_eq!(
            w.layers[0].shared.is_some(),
            layout == ExpertLayout::Residual
        );
    }
    let dir = fixture("masked_f16");
    if dir.join("config.json").is_file() {
        let m = ModelDir::open(&dir).unwrap();
        assert_eq!(m.layout, ExpertLayout::Masked);
        let out = tempfile::tempdir().unwrap();
        for layout in [ExpertLayout::Fused, ExpertLayout::Residual] {
            let dst = out.path().join(layout.as_str());
            convert(&dir, &dst, layout, None, None).unwrap();
            let w = ModelDir::open(&dst).unwrap().load_weights().unwrap();
            assert_eq!(w.layout, layout);
        }
    }
}
