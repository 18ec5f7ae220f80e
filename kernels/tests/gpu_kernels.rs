//! Every kernel against a CPU reference (f64) on fresh random inputs, outputs poisoned with NaN
//! first. Relative error < 1e-5 in f32, < 1e-2 in bf16. One trial per CUDA device (`NAME::cuda:N`);
//! without one the trials are reported as ignored.

mod common_gpu;

use common_gpu::*;
use half::bf16;
use pregate_kernels::{
    AttentionShape, ExpertPlan, ExpertWeights, FfnDims, KernelDtype, MoePermutation, PagedKvLayout,
};
use rand::Rng;
use std::num::NonZeroUsize;

fn main() -> std::process::ExitCode {
    let mut tests = DeviceTests::new();
    register!(
        tests,
        cuda:
        embedding_f32,
        embedding_bf16,
        elementwise_f32,
        elementwise_bf16,
        rmsnorm_f32,
        rmsnorm_bf16,
        rope_f32,
        rope_bf16,
        attention_prefill_f32,
        attention_prefill_bf16,
        attention_paged_f32,
        attention_paged_bf16,
        moe_layer_f32,
        moe_layer_bf16,
        linear_f32,
        linear_bf16,
        casts_round_to_nearest_even,
        topk_softmax_matches_reference,
        moe_permute_is_a_stable_sort_by_expert,
        sampling_greedy_topk_topp_seeded,
        sampling_follows_the_distribution,
        launchers_reject_bad_shapes_without_launching,
        grouped_expert_ffn_bf16,
        qk_norm_f32,
        qk_norm_bf16,
        clamp_and_gated_add_f32,
        clamp_and_gated_add_bf16,
        gate_softmax_topk_matches_reference,
    );
    tests.run()
}

/// Defines the tests of a generic check for f32 and for bf16.
macro_rules! both_dtypes {
    ($check:ident: $f32_name:ident, $bf16_name:ident) => {
        fn $f32_name(device: &Device) -> Result<(), Failed> {
            $check::<f32>(&gpu(device)?, stringify!($f32_name));
            Ok(())
        }
        fn $bf16_name(device: &Device) -> Result<(), Failed> {
            $check::<bf16>(&gpu(device)?, stringify!($bf16_name));
            Ok(())
        }
    };
}

both_dtypes!(check_embedding: embedding_f32, embedding_bf16);
fn check_embedding<T: KernelDtype>(g: &Gpu, name: &str) {
    let mut rng = rng(name);
    let (vocab, hidden, n) = (1000, 384, 37);
    let (table, table_f) = as_dtype::<T>(&rand_vec(&mut rng, vocab * hidden, 1.0));
    let mut ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    ids[5] = vocab as u32 + 3; // out of range: a zero row
    let (d_ids, d_table) = (g.upload(&ids), g.upload(&table));
    let mut out = g.poisoned::<T>(n * hidden);
    g.ks.embedding(&g.stream, &d_ids, &d_table, &mut out, n, hidden, vocab)
        .unwrap();
    let table_f = &table_f;
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&id| {
            (0..hidden).map(move |c| {
                if (id as usize) < vocab {
                    table_f[id as usize * hidden + c] as f64
                } else {
                    0.0
                }
            })
        })
        .collect();
    assert_eq!(
        rel_err(&g.download_f32(&out), &want),
        0.0,
        "embedding is a copy"
    );
}

fn casts_round_to_nearest_even(device: &Device) -> Result<(), Failed> {
    let g = gpu(device)?;
    let mut rng = rng("casts");
    let mut x = rand_vec(&mut rng, 10_001, 100.0);
    x[0] = 1.0 + 2f32.powi(-8); // a tie: rounds to even (1.0)
    x[1] = f32::INFINITY;
    let dx = g.upload(&x);
    let mut b = g.poisoned::<bf16>(x.len());
    g.ks.cast_f32_to_bf16(&g.stream, &dx, &mut b, x.len())
        .unwrap();
    let got = g.download(&b);
    for (i, (&v, gv)) in x.iter().zip(&got).enumerate() {
        assert_eq!(
            gv.to_bits(),
            bf16::from_f32(v).to_bits(),
            "element {i} ({v})"
        );
    }
    let mut back = g.poisoned::<f32>(x.len());
    g.ks.cast_bf16_to_f32(&g.stream, &b, &mut back, x.len())
        .unwrap();
    let back = g.download(&back);
    for (gv, bv) in got.iter().zip(&back) {
        assert_eq!(gv.to_f32().to_bits(), bv.to_bits());
    }
    Ok(())
}

both_dtypes!(check_elementwise: elementwise_f32, elementwise_bf16);
fn check_elementwise<T: KernelDtype>(g: &Gpu, name: &str) {
    let mut rng = rng(name);
    let (rows, cols) = (19, 333);
    let n = rows * cols;
    let (x, xf) = as_dtype::<T>(&rand_vec(&mut rng, n, 3.0));
    let (y, yf) = as_dtype::<T>(&rand_vec(&mut rng, n, 3.0));
    let (bias, bf) = as_dtype::<T>(&rand_vec(&mut rng, cols, 1.0));

    let mut dx = g.upload(&x);
    g.ks.add(&g.stream, &mut dx, &g.upload(&y), n).unwrap();
    let want: Vec<f64> = xf
        .iter()
        .zip(&yf)
        .map(|(&a, &b)| a as f64 + b as f64)
        .collect();
    assert_close::<T>("add", &g.download_f32(&dx), &want);

    let mut dx = g.upload(&x);
    g.ks.bias_add(&g.stream, &mut dx, &g.upload(&bias), rows, cols)
        .unwrap();
    let want: Vec<f64> = (0..n).map(|i| xf[i] as f64 + bf[i % cols] as f64).collect();
    assert_close::<T>("bias_add", &g.download_f32(&dx), &want);

    let mut dx = g.upload(&x);
    g.ks.silu(&g.stream, &mut dx, n).unwrap();
    let want: Vec<f64> = xf.iter().map(|&a| silu(a as f64)).collect();
    assert_close::<T>("silu", &g.download_f32(&dx), &want);

    // silu_mul: [rows, 2 * inter] -> [rows, inter]
    let inter = cols;
    let (gu, guf) = as_dtype::<T>(&rand_vec(&mut rng, rows * 2 * inter, 4.0));
    let mut out = g.poisoned::<T>(rows * inter);
    g.ks.silu_mul(&g.stream, &g.upload(&gu), &mut out, rows, inter)
        .unwrap();
    let want: Vec<f64> = (0..rows * inter)
        .map(|i| {
            let (r, c) = (i / inter, i % inter);
            silu(guf[r * 2 * inter + c] as f64) * guf[r * 2 * inter + inter + c] as f64
        })
        .collect();
    assert_close::<T>("silu_mul", &g.download_f32(&out), &want);
}

both_dtypes!(check_rmsnorm: rmsnorm_f32, rmsnorm_bf16);
fn check_rmsnorm<T: KernelDtype>(g: &Gpu, name: &str) {
    let mut rng = rng(name);
    for (rows, cols, eps) in [(7, 4096, 1e-5f32), (3, 33, 1e-6), (1, 512, 1e-6)] {
        let (x, xf) = as_dtype::<T>(&rand_vec(&mut rng, rows * cols, 2.0));
        let (w, wf) = as_dtype::<T>(&rand_vec(&mut rng, cols, 1.5));
        let mut out = g.poisoned::<T>(rows * cols);
        g.ks.rmsnorm(
            &g.stream,
            &g.upload(&x),
            &g.upload(&w),
            &mut out,
            rows,
            cols,
            eps,
        )
        .unwrap();
        let mut want = Vec::new();
        for r in 0..rows {
            let row = &xf[r * cols..(r + 1) * cols];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            want.extend(
                row.iter()
                    .zip(&wf)
                    .map(|(&v, &g)| v as f64 * inv * g as f64),
            );
        }
        assert_close::<T>(
            &format!("rmsnorm {rows}x{cols}"),
            &g.download_f32(&out),
            &want,
        );
    }
}

both_dtypes!(check_rope: rope_f32, rope_bf16);
fn check_rope<T: KernelDtype>(g: &Gpu, name: &str) {
    let mut rng = rng(name);
    // Rotate the q part (4 heads) of a fused qkv row [q 4 heads | k 2 | v 2] in place.
    let (n, n_heads, d, theta) = (9, 4, 128, 10000.0f32);
    let stride = (n_heads + 4) * d;
    let (x, xf) = as_dtype::<T>(&rand_vec(&mut rng, n * stride, 1.0));
    let mut pos: Vec<i32> = (0..n).map(|_| rng.random_range(0..4096)).collect();
    pos[0] = 0;
    let mut dx = g.upload(&x);
    g.ks.rope(
        &g.stream,
        &mut dx,
        &g.upload(&pos),
        n,
        stride,
        n_heads,
        d,
        theta,
    )
    .unwrap();
    let mut want: Vec<f64> = xf.iter().map(|&v| v as f64).collect();
    let half = d / 2;
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..n_heads {
            for i in 0..half {
                let a = p as f64 * (theta as f64).powf(-2.0 * i as f64 / d as f64);
                let (c, s) = (a.cos() as f32 as f64, a.sin() as f32 as f64);
                let base = t * stride + h * d;
                let (x0, x1) = (xf[base + i] as f64, xf[base + i + half] as f64);
                want[base + i] = x0 * c - x1 * s;
                want[base + i + half] = x1 * c + x0 * s;
            }
        }
    }
    assert_close::<T>("rope", &g.download_f32(&dx), &want);
}

/// softmax(scale q.k) v over `keys` of one head, in f64.
fn attend_ref(q: &[f32], keys: &[(&[f32], &[f32])], scale: f64) -> Vec<f64> {
    let logits: Vec<f64> = keys
        .iter()
        .map(|(k, _)| {
            q.iter()
                .zip(*k)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let z: f64 = p.iter().sum();
    let mut out = vec![0.0; q.len()];
    for (pi, (_, v)) in p.iter().zip(keys) {
        for (o, &vv) in out.iter_mut().zip(*v) {
            *o += pi / z * vv as f64;
        }
    }
    out
}

both_dtypes!(check_attention_prefill: attention_prefill_f32, attention_prefill_bf16);
fn check_attention_prefill<T: KernelDtype>(g: &Gpu, name: &str) {
    let mut rng = rng(name);
    // (heads, kv heads, head dim, scale, sliding window): the backbone with GQA, and the router
    // (scale 1/normalizer); windows shorter than the 17-token sequence, one of a single key, and
    // one longer than every sequence (full attention).
    for (nh, nkv, d, scale, window) in [
        (8, 2, 128, 1.0 / (128f32).sqrt(), 0),
        (4, 4, 128, 1.0, 0),
        (6, 3, 64, 0.125, 0),
        // Head sizes that are not a multiple of 32 (the test fixtures use 16).
        (4, 2, 16, 0.25, 0),
        (2, 1, 48, 0.2, 0),
        (8, 2, 128, 1.0 / (128f32).sqrt(), 4),
        (2, 1, 48, 0.2, 6),
        (4, 2, 16, 0.25, 1),
        (6, 3, 64, 0.125, 4096),
    ] {
        let window = NonZeroUsize::new(window);
        let lens = [5usize, 1, 17];
        let n: usize = lens.iter().sum();
        let mut cu = vec![0i32];
        for l in lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        // q inside a wider row (stride), k and v contiguous.
        let q_stride = nh * d + 32;
        let kv_stride = nkv * d;
        let (q, qf) = as_dtype::<T>(&rand_vec(&mut rng, n * q_stride, 1.0));
        let (k, kf) = as_dtype::<T>(&rand_vec(&mut rng, n * kv_stride, 1.0));
        let (v, vf) = as_dtype::<T>(&rand_vec(&mut rng, n * kv_stride, 1.0));
        let shape = AttentionShape {
            n_tokens: n,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            q_stride,
            kv_stride,
            scale,
            window,
        };
        let mut out = g.poisoned::<T>(n * nh * d);
        g.ks.attention_prefill(
            &g.stream,
            &shape,
            &g.upload(&q),
            &g.upload(&k),
            &g.upload(&v),
            &g.upload(&cu),
            lens.len(),
            &mut out,
        )
        .unwrap();
        let mut want = Vec::new();
        for s in 0..lens.len() {
            for t in cu[s] as usize..cu[s + 1] as usize {
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let first = window.map_or(cu[s] as usize, |w| {
                        (cu[s] as usize).max((t + 1).saturating_sub(w.get()))
                    });
                    let keys: Vec<(&[f32], &[f32])> = (first..=t)
                        .map(|j| {
                            let o = j * kv_stride + kvh * d;
                            (&kf[o..o + d], &vf[o..o + d])
                        })
                        .collect();
                    let qo = t * q_stride + h * d;
                    want.extend(attend_ref(&qf[qo..qo + d], &keys, scale as f64));
                }
            }
        }
        assert_close::<T>(
            &format!("attention_prefill h{nh}/{nkv} d{d} window {window:?}"),
            &g.download_f32(&out),
            &want,
        );
    }
}

both_dtypes!(check_attention_paged: attention_paged_f32, attention_paged_bf16);
fn check_attention_paged<T: KernelDtype>(g: &Gpu, name: &str) {
    // Sliding windows (0: none): shorter than a block (16), across blocks, a single key.
    for (nh, nkv, d, window) in [
        (8, 2, 128, 0),
        (4, 2, 16, 0),
        (8, 2, 128, 5),
        (4, 2, 16, 20),
        (2, 1, 32, 1),
    ] {
        let window = NonZeroUsize::new(window);
        check_attention_paged_shape::<T>(g, &format!("{name}-{d}-{window:?}"), nh, nkv, d, window);
    }
}

fn check_attention_paged_shape<T: KernelDtype>(
    g: &Gpu,
    name: &str,
    nh: usize,
    nkv: usize,
    d: usize,
    window: Option<NonZeroUsize>,
) {
    let mut rng = rng(name);
    let layout = PagedKvLayout {
        num_blocks: 12,
        block_size: 16,
        n_kv_heads: nkv,
        head_dim: d,
    };
    let width = layout.token_width();
    // Three sequences: context lengths after this step, and how many query tokens end them
    // (a decode token, a one-token prompt, a chunked prefill of 5 tokens).
    let seqs = [(13usize, 1usize), (1, 1), (40, 5)];
    let max_blocks = 4;
    let mut perm: Vec<i32> = (0..layout.num_blocks as i32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.random_range(0..=i));
    }
    let mut tables = vec![-1i32; seqs.len() * max_blocks];
    let mut next = 0;
    for (s, &(len, _)) in seqs.iter().enumerate() {
        for b in 0..len.div_ceil(layout.block_size) {
            tables[s * max_blocks + b] = perm[next];
            next += 1;
        }
    }
    // Write every position's K/V (n_all tokens) in one call, in a shuffled order.
    let mut all: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, &(len, _))| (0..len).map(move |p| (s, p)))
        .collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.random_range(0..=i));
    }
    let (k, kf) = as_dtype::<T>(&rand_vec(&mut rng, all.len() * width, 1.0));
    let (v, vf) = as_dtype::<T>(&rand_vec(&mut rng, all.len() * width, 1.0));
    let mut slots: Vec<i32> = all
        .iter()
        .map(|&(s, p)| {
            layout
                .slot(&tables[s * max_blocks..(s + 1) * max_blocks], p)
                .unwrap()
        })
        .collect();
    slots.push(-1); // a padding token: skipped
    let mut kc = g.poisoned::<T>(layout.cache_len());
    let mut vc = g.poisoned::<T>(layout.cache_len());
    let mut k_pad = k.clone();
    k_pad.extend(vec![T::from_f32(9.0); width]);
    let mut v_pad = v.clone();
    v_pad.extend(vec![T::from_f32(9.0); width]);
    g.ks.kv_cache_write(
        &g.stream,
        &layout,
        &g.upload(&k_pad),
        &g.upload(&v_pad),
        width,
        &g.upload(&slots),
        all.len() + 1,
        &mut kc,
        &mut vc,
    )
    .unwrap();
    let kc_host = g.download_f32(&kc);
    for (i, &s) in slots[..all.len()].iter().enumerate() {
        let o = s as usize * width;
        assert_eq!(
            &kc_host[o..o + width],
            &kf[i * width..(i + 1) * width],
            "cache slot {s}"
        );
    }
    let kv_of = |s: usize, p: usize| all.iter().position(|&x| x == (s, p)).unwrap();

    let mut rows = Vec::new();
    let mut positions = Vec::new();
    for (s, &(len, nq)) in seqs.iter().enumerate() {
        for p in len - nq..len {
            rows.push(s as i32);
            positions.push(p as i32);
        }
    }
    let n = rows.len();
    let q_stride = nh * d;
    let (q, qf) = as_dtype::<T>(&rand_vec(&mut rng, n * q_stride, 1.0));
    let scale = 1.0 / (d as f32).sqrt();
    let shape = AttentionShape {
        n_tokens: n,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: d,
        q_stride,
        kv_stride: width,
        scale,
        window,
    };
    let mut out = g.poisoned::<T>(n * nh * d);
    g.ks.attention_paged(
        &g.stream,
        &shape,
        &layout,
        &g.upload(&q),
        &kc,
        &vc,
        &g.upload(&tables),
        (seqs.len(), max_blocks),
        &g.upload(&rows),
        &g.upload(&positions),
        &mut out,
    )
    .unwrap();
    let mut want = Vec::new();
    for t in 0..n {
        let (s, pos) = (rows[t] as usize, positions[t] as usize);
        for h in 0..nh {
            let kvh = h / (nh / nkv);
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w.get()));
            let keys: Vec<(&[f32], &[f32])> = (first..=pos)
                .map(|p| {
                    let o = kv_of(s, p) * width + kvh * d;
                    (&kf[o..o + d], &vf[o..o + d])
                })
                .collect();
            want.extend(attend_ref(
                &qf[t * q_stride + h * d..][..d],
                &keys,
                scale as f64,
            ));
        }
    }
    assert_close::<T>(
        &format!("attention_paged window {window:?}"),
        &g.download_f32(&out),
        &want,
    );
}

fn topk_softmax_matches_reference(device: &Device) -> Result<(), Failed> {
    let g = gpu(device)?;
    let mut rng = rng("topk_softmax");
    let (n, e) = (200, 7);
    // Logits on a coarse grid, so ties happen.
    let mut logits: Vec<f32> = (0..n * e)
        .map(|_| (rng.random_range(-6..6) as f32) * 0.5)
        .collect();
    logits[3] = f32::NAN;
    let d_logits = g.upload(&logits);
    for k in [1usize, 2, 3] {
        let mut ids = g.upload(&vec![-7i32; n * k]);
        let mut w = g.poisoned::<f32>(n * k);
        g.ks.topk_softmax(&g.stream, &d_logits, n, e, k, &mut ids, &mut w)
            .unwrap();
        let (ids, w) = (g.download(&ids), g.download(&w));
        for t in 0..n {
            let row: Vec<f32> = logits[t * e..(t + 1) * e]
                .iter()
                .map(|v| if v.is_nan() { f32::NEG_INFINITY } else { *v })
                .collect();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            let want_ids: Vec<i32> = order[..k].iter().map(|&i| i as i32).collect();
            assert_eq!(&ids[t * k..(t + 1) * k], &want_ids[..], "token {t} k {k}");
            let m = row[order[0]] as f64;
            let z: f64 = order[..k].iter().map(|&i| (row[i] as f64 - m).exp()).sum();
            for j in 0..k {
                let want = (row[order[j]] as f64 - m).exp() / z;
                assert!(
                    (w[t * k + j] as f64 - want).abs() < 1e-6,
                    "weight t{t} j{j}"
                );
            }
            if k == 1 {
                assert_eq!(w[t], 1.0);
            }
        }
    }
    Ok(())
}

/// Host reference of the permutation: pairs sorted stably by expert.
fn permute_ref(ids: &[i32], n_experts: usize) -> (Vec<i32>, Vec<i32>) {
    let mut sorted: Vec<usize> = (0..ids.len())
        .filter(|&p| ids[p] >= 0 && (ids[p] as usize) < n_experts)
        .collect();
    sorted.sort_by_key(|&p| ids[p]);
    let mut pos = vec![-1i32; ids.len()];
    for (r, &p) in sorted.iter().enumerate() {
        pos[p] = r as i32;
    }
    (sorted.iter().map(|&p| p as i32).collect(), pos)
}

/// `n` tokens with `k` distinct experts each.
fn random_routes(
    rng: &mut rand::rngs::StdRng,
    n: usize,
    k: usize,
    e: usize,
) -> (Vec<i32>, Vec<f32>) {
    let mut ids = Vec::with_capacity(n * k);
    let mut w = Vec::with_capacity(n * k);
    for _ in 0..n {
        let mut chosen: Vec<i32> = Vec::new();
        while chosen.len() < k {
            let c = rng.random_range(0..e as i32);
            if !chosen.contains(&c) {
                chosen.push(c);
            }
        }
        let raw: Vec<f32> = (0..k).map(|_| rng.random::<f32>() + 0.1).collect();
        let s: f32 = raw.iter().sum();
        ids.extend(chosen);
        w.extend(raw.iter().map(|r| if k == 1 { 1.0 } else { r / s }));
    }
    (ids, w)
}

fn moe_permute_is_a_stable_sort_by_expert(device: &Device) -> Result<(), Failed> {
    let g = gpu(device)?;
    let mut rng = rng("moe_permute");
    for (n, k, e) in [
        (100usize, 2usize, 7usize),
        (3000, 2, 7),
        (1, 1, 7),
        (777, 3, 256),
        (5000, 1, 8),
    ] {
        let (mut ids, _) = random_routes(&mut rng, n, k, e);
        if n > 10 {
            ids[4] = e as i32 + 2; // out of range: dropped
            ids[9] = -1;
        }
        let mut perm = MoePermutation::new(&g.stream, n * k, e).unwrap();
        perm.sorted_pair = g.upload(&vec![-9i32; n * k]);
        perm.pair_pos = g.upload(&vec![-9i32; n * k]);
        g.ks.moe_permute(&g.stream, &g.upload(&ids), n * k, &mut perm)
            .unwrap();
        let plan = ExpertPlan::from_ids(&ids, e);
        let counts: Vec<usize> = g
            .download(&perm.counts)
            .iter()
            .map(|&c| c as usize)
            .collect();
        let offsets: Vec<usize> = g
            .download(&perm.offsets)
            .iter()
            .map(|&c| c as usize)
            .collect();
        assert_eq!(counts, plan.counts, "counts n{n} k{k} e{e}");
        assert_eq!(offsets, plan.offsets, "offsets n{n} k{k} e{e}");
        let (sorted, pos) = permute_ref(&ids, e);
        let got_sorted = g.download(&perm.sorted_pair);
        assert_eq!(
            &got_sorted[..sorted.len()],
            &sorted[..],
            "sorted_pair n{n} k{k} e{e}"
        );
        assert_eq!(g.download(&perm.pair_pos), pos, "pair_pos n{n} k{k} e{e}");
    }
    Ok(())
}

both_dtypes!(check_moe_layer: moe_layer_f32, moe_layer_bf16);
/// The whole routed-expert step: permute, gather, grouped expert FFN, weighted combine into the
/// residual, against `h + sum_j w_j FFN_{e_j}(x)`.
fn check_moe_layer<T: KernelDtype>(g: &Gpu, name: &str) {
    let mut rng = rng(name);
    let (hidden, inter, e) = (256, 384, 7);
    let dims = FfnDims { hidden, inter };
    let mut gate_up_host = Vec::new();
    let mut down_host = Vec::new();
    let mut gu_dev = Vec::new();
    let mut down_dev = Vec::new();
    for _ in 0..e {
        let (gu, guf) = as_dtype::<T>(&rand_vec(
            &mut rng,
            2 * inter * hidden,
            1.0 / (hidden as f32).sqrt(),
        ));
        let (dn, dnf) = as_dtype::<T>(&rand_vec(
            &mut rng,
            hidden * inter,
            1.0 / (inter as f32).sqrt(),
        ));
        gu_dev.push(g.upload(&gu));
        down_dev.push(g.upload(&dn));
        gate_up_host.push(guf);
        down_host.push(dnf);
    }
    for (n, k) in [(1usize, 1usize), (37, 1), (64, 2), (300, 2)] {
        let (mut ids, w) = random_routes(&mut rng, n, k, e);
        // Expert 6 gets no token in this step: its weights are absent.
        for id in ids.iter_mut() {
            if *id == 6 {
                *id = if k == 1 { 0 } else { 6 };
            }
        }
        if k > 1 {
            for t in 0..n {
                let row = &mut ids[t * k..(t + 1) * k];
                if row.contains(&6) {
                    let free = (0..6).find(|c| !row.contains(c)).unwrap();
                    for id in row.iter_mut() {
                        if *id == 6 {
                            *id = free;
                        }
                    }
                }
            }
        }
        let plan = ExpertPlan::from_ids(&ids, e);
        assert_eq!(plan.counts[6], 0);
        let (x, xf) = as_dtype::<T>(&rand_vec(&mut rng, n * hidden, 1.0));
        let (res, resf) = as_dtype::<T>(&rand_vec(&mut rng, n * hidden, 1.0));
        let dx = g.upload(&x);
        let mut perm = MoePermutation::new(&g.stream, n * k, e).unwrap();
        g.ks.moe_permute(&g.stream, &g.upload(&ids), n * k, &mut perm)
            .unwrap();
        let mut x_perm = g.poisoned::<T>(n * k * hidden);
        g.ks.moe_gather(&g.stream, &dx, &perm, n, k, hidden, &mut x_perm)
            .unwrap();
        // Gather is a copy.
        let (sorted, _) = permute_ref(&ids, e);
        let xp = g.download_f32(&x_perm);
        for (r, &p) in sorted.iter().enumerate() {
            let t = p as usize / k;
            assert_eq!(
                &xp[r * hidden..(r + 1) * hidden],
                &xf[t * hidden..(t + 1) * hidden]
            );
        }
        let experts: Vec<Option<ExpertWeights<'_, T>>> = (0..e)
            .map(|i| {
                (i != 6).then(|| ExpertWeights {
                    gate_up: &gu_dev[i],
                    down: &down_dev[i],
                })
            })
            .collect();
        let mut gu_ws = g.poisoned::<T>(n * k * 2 * inter);
        let mut act_ws = g.poisoned::<T>(n * k * inter);
        let mut y_perm = g.poisoned::<T>(n * k * hidden);
        g.blas
            .expert_ffn(
                &g.ks,
                &plan,
                &experts,
                dims,
                &x_perm,
                &mut gu_ws,
                &mut act_ws,
                &mut y_perm,
            )
            .unwrap();
        let mut out = g.upload(&res);
        g.ks.moe_combine(
            &g.stream,
            &y_perm,
            &perm,
            &g.upload(&w),
            n,
            k,
            hidden,
            &mut out,
            true,
        )
        .unwrap();
        let got = g.download_f32(&out);
        // Reference: FFN in f64 on the stored values.
        let mut want: Vec<f64> = resf.iter().map(|&v| v as f64).collect();
        for t in 0..n {
            let xr = &xf[t * hidden..(t + 1) * hidden];
            for j in 0..k {
                let ex = ids[t * k + j] as usize;
                let (gu, dn) = (&gate_up_host[ex], &down_host[ex]);
                let act: Vec<f64> = (0..inter)
                    .map(|i| {
                        let dot = |row: usize| -> f64 {
                            gu[row * hidden..(row + 1) * hidden]
                                .iter()
                                .zip(xr)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum()
                        };
                        silu(dot(i)) * dot(inter + i)
                    })
                    .collect();
                for c in 0..hidden {
                    let y: f64 = dn[c * inter..(c + 1) * inter]
                        .iter()
                        .zip(&act)
                        .map(|(&a, &b)| a as f64 * b)
                        .sum();
                    want[t * hidden + c] += w[t * k + j] as f64 * y;
                }
            }
        }
        assert_close::<T>(&format!("moe layer n{n} k{k}"), &got, &want);

        // Overwrite mode: out = the routed sum alone (its error is not hidden by the residual).
        let want_delta: Vec<f64> = want
            .iter()
            .zip(&resf)
            .map(|(&o, &r)| o - r as f64)
            .collect();
        let mut out2 = g.poisoned::<T>(n * hidden);
        g.ks.moe_combine(
            &g.stream,
            &y_perm,
            &perm,
            &g.upload(&w),
            n,
            k,
            hidden,
            &mut out2,
            false,
        )
        .unwrap();
        assert_close::<T>("moe_combine overwrite", &g.download_f32(&out2), &want_delta);
    }
}

both_dtypes!(check_linear: linear_f32, linear_bf16);
fn check_linear<T: KernelDtype>(g: &Gpu, name: &str) {
    let mut rng = rng(name);
    let (n, in_f, out_f) = (5, 300, 200);
    let (x, xf) = as_dtype::<T>(&rand_vec(&mut rng, n * in_f, 1.0));
    let (w, wf) = as_dtype::<T>(&rand_vec(&mut rng, out_f * in_f, 0.1));
    let want: Vec<f64> = (0..n * out_f)
        .map(|i| {
            let (r, o) = (i / out_f, i % out_f);
            (0..in_f)
                .map(|c| xf[r * in_f + c] as f64 * wf[o * in_f + c] as f64)
                .sum()
        })
        .collect();
    let (dx, dw) = (g.upload(&x), g.upload(&w));
    let mut y = g.poisoned::<T>(n * out_f);
    g.blas.linear(&dx, &dw, &mut y, n, in_f, out_f).unwrap();
    assert_close::<T>("linear", &g.download_f32(&y), &want);
    // f32 output (logits) from the same inputs.
    let mut y32 = g.poisoned::<f32>(n * out_f);
    g.blas.linear(&dx, &dw, &mut y32, n, in_f, out_f).unwrap();
    // Exact products and f32 accumulation: close to f32 accuracy whatever the input type.
    let e = rel_err(&g.download(&y32), &want);
    println!("linear -> f32 [{}]: relative error {e:.3e}", T::SUFFIX);
    assert!(e < 1e-4, "linear to f32 output: {e:.3e}");
}

/// CPU reproduction of `sample_tokens` (f64).
struct SampleRef {
    /// The token the reference picks for the row's `u`.
    pick: usize,
    /// The top-k threshold logit (-inf when top-k is off).
    kth: f64,
    /// Unnormalised probabilities after top-k (0 outside it).
    e: Vec<f64>,
    /// Their sum.
    z: f64,
}

fn sample_ref(row: &[f32], temp: f32, top_k: i32, top_p: f32, u: f32) -> SampleRef {
    let l: Vec<f64> = row
        .iter()
        .map(|&v| {
            if v.is_nan() {
                f64::NEG_INFINITY
            } else {
                v as f64
            }
        })
        .collect();
    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let v = l.len();
    let kth = if top_k > 0 && (top_k as usize) < v {
        let mut s = l.clone();
        s.sort_by(|a, b| b.partial_cmp(a).unwrap());
        s[top_k as usize - 1]
    } else {
        f64::NEG_INFINITY
    };
    let e: Vec<f64> = l
        .iter()
        .map(|&x| {
            if x >= kth {
                ((x - m) / temp as f64).exp()
            } else {
                0.0
            }
        })
        .collect();
    let z: f64 = e.iter().sum();
    let tau = if top_p < 1.0 {
        let mut s: Vec<f64> = e.iter().cloned().filter(|&x| x > 0.0).collect();
        s.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let mut acc = 0.0;
        let mut t = s[0];
        for &x in &s {
            acc += x;
            t = x;
            if acc >= top_p as f64 * z {
                break;
            }
        }
        t
    } else {
        0.0
    };
    let kept: Vec<bool> = e.iter().map(|&x| x > 0.0 && x >= tau).collect();
    let total: f64 = e
        .iter()
        .zip(&kept)
        .filter(|(_, &k)| k)
        .map(|(x, _)| x)
        .sum();
    let target = u as f64 * total;
    let mut run = 0.0;
    let mut pick = kept.iter().rposition(|&k| k).unwrap();
    for i in 0..v {
        if kept[i] {
            run += e[i];
            if run > target {
                pick = i;
                break;
            }
        }
    }
    SampleRef { pick, kth, e, z }
}

fn sampling_greedy_topk_topp_seeded(device: &Device) -> Result<(), Failed> {
    let g = gpu(device)?;
    let mut rng = rng("sampling");
    let (rows, vocab) = (96usize, 32000usize);
    let mut logits: Vec<f32> = (0..rows * vocab)
        .map(|_| rng.random::<f32>() * 8.0 - 4.0)
        .collect();
    // Row 0: a tie for the maximum (lowest index wins); row 1: a NaN.
    logits[100] = 50.0;
    logits[7000] = 50.0;
    logits[vocab + 5] = f32::NAN;
    let mut temp = vec![0.0f32; rows];
    let mut top_k = vec![0i32; rows];
    let mut top_p = vec![1.0f32; rows];
    let seeds: Vec<u64> = (0..rows).map(|_| rng.random()).collect();
    for b in 0..rows {
        match b % 6 {
            0 => {}                                // greedy
            1 => (temp[b], top_k[b]) = (1.0, 1),   // top-1 = greedy
            2 => (temp[b], top_k[b]) = (0.8, 50),  // top-k
            3 => (temp[b], top_p[b]) = (1.0, 0.9), // top-p
            4 => (temp[b], top_k[b], top_p[b]) = (0.7, 40, 0.8),
            _ => temp[b] = 1.3, // full distribution
        }
    }
    let d_logits = g.upload(&logits);
    let run = || {
        let mut out = g.upload(&vec![u32::MAX; rows]);
        g.ks.sample_tokens(
            &g.stream,
            &d_logits,
            rows,
            vocab,
            &g.upload(&temp),
            &g.upload(&top_k),
            &g.upload(&top_p),
            &g.upload(&seeds),
            &mut out,
        )
        .unwrap();
        g.download(&out)
    };
    let out = run();
    assert_eq!(out, run(), "same seeds, same tokens");
    let mut agree = 0;
    for b in 0..rows {
        let row = &logits[b * vocab..(b + 1) * vocab];
        let tok = out[b] as usize;
        assert!(tok < vocab, "row {b}: token {tok}");
        if temp[b] == 0.0 || top_k[b] == 1 {
            let clean: Vec<f32> = row
                .iter()
                .map(|v| if v.is_nan() { f32::NEG_INFINITY } else { *v })
                .collect();
            let m = clean.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let want = clean.iter().position(|&v| v == m).unwrap();
            assert_eq!(tok, want, "row {b}: greedy");
            agree += 1;
            continue;
        }
        let u = pregate_kernels::sampling_uniform(seeds[b]);
        let r = sample_ref(row, temp[b], top_k[b], top_p[b], u);
        assert!(
            row[tok] as f64 >= r.kth,
            "row {b}: token {tok} is outside the top-{}",
            top_k[b]
        );
        // In the nucleus: the tokens more probable than it hold less than top_p of the mass
        // (a little slack for f32 sums at the boundary).
        let above: f64 = r.e.iter().filter(|&&x| x > r.e[tok]).sum();
        assert!(
            above < top_p[b] as f64 * r.z * (1.0 + 1e-4),
            "row {b}: token {tok} is outside the top-p {} nucleus",
            top_p[b]
        );
        agree += (tok == r.pick) as usize;
    }
    println!("sampling: {agree}/{rows} rows equal the CPU reproduction");
    assert!(agree * 100 >= rows * 95, "only {agree}/{rows} rows agree");
    Ok(())
}

fn sampling_follows_the_distribution(device: &Device) -> Result<(), Failed> {
    let g = gpu(device)?;
    let (rows, vocab) = (20_000usize, 5usize);
    let row = [0.0f32, 1.0, 2.0, 0.5, -1.0];
    let logits: Vec<f32> = (0..rows).flat_map(|_| row).collect();
    let seeds: Vec<u64> = (0..rows as u64).map(|i| i * 7919 + 13).collect();
    let mut out = g.upload(&vec![u32::MAX; rows]);
    g.ks.sample_tokens(
        &g.stream,
        &g.upload(&logits),
        rows,
        vocab,
        &g.upload(&vec![1.0f32; rows]),
        &g.upload(&vec![0i32; rows]),
        &g.upload(&vec![1.0f32; rows]),
        &g.upload(&seeds),
        &mut out,
    )
    .unwrap();
    let out = g.download(&out);
    let z: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
    for (i, &l) in row.iter().enumerate() {
        let p = (l as f64).exp() / z;
        let f = out.iter().filter(|&&t| t as usize == i).count() as f64 / rows as f64;
        let sigma = (p * (1.0 - p) / rows as f64).sqrt();
        println!("token {i}: p {p:.4}, observed {f:.4}");
        assert!(
            (f - p).abs() < 5.0 * sigma,
            "token {i}: p {p:.4}, observed {f:.4}"
        );
    }
    Ok(())
}

fn launchers_reject_bad_shapes_without_launching(device: &Device) -> Result<(), Failed> {
    let g = gpu(device)?;
    let x = g.poisoned::<f32>(10);
    let w = g.poisoned::<f32>(4);
    let mut out = g.poisoned::<f32>(10);
    assert!(
        g.ks.rmsnorm(&g.stream, &x, &w, &mut out, 3, 4, 1e-5)
            .is_err(),
        "x too short"
    );
    assert!(
        g.ks.rmsnorm(&g.stream, &x, &w, &mut out, 2, 5, 1e-5)
            .is_err(),
        "w too short"
    );
    let pos = g.upload(&[0i32; 2]);
    let mut xm = g.poisoned::<f32>(10);
    assert!(
        g.ks.rope(&g.stream, &mut xm, &pos, 2, 5, 1, 5, 1e4)
            .is_err(),
        "odd head_dim"
    );
    let shape = AttentionShape {
        n_tokens: 1,
        n_heads: 3,
        n_kv_heads: 2,
        head_dim: 32,
        q_stride: 96,
        kv_stride: 64,
        scale: 1.0,
        window: None,
    };
    let q = g.poisoned::<f32>(96);
    let kv = g.poisoned::<f32>(64);
    let cu = g.upload(&[0i32, 1]);
    let mut o = g.poisoned::<f32>(96);
    assert!(
        g.ks.attention_prefill(&g.stream, &shape, &q, &kv, &kv, &cu, 1, &mut o)
            .is_err(),
        "GQA ratio"
    );
    let ids = g.upload(&[0i32; 4]);
    let mut perm = MoePermutation::new(&g.stream, 2, 3).unwrap();
    assert!(
        g.ks.moe_permute(&g.stream, &ids, 4, &mut perm).is_err(),
        "perm too small"
    );
    assert!(
        MoePermutation::new(&g.stream, 2, 300).is_err(),
        "too many experts"
    );
    let other = g.ctx.new_stream().unwrap();
    assert!(
        g.ks.add(&other, &mut out, &x, 10).is_ok(),
        "a second stream of the same context is fine"
    );
    Ok(())
}

/// The grouped skinny expert FFN (bf16, up to `GROUPED_FFN_MAX_ROWS` rows per expert) against
/// an f64 reference of `y = down(silu(gate x) * up x)` per expert: experts without rows, one row,
/// the row limit, more than one launch's 32 experts, widths that are not multiples of the tiles;
/// and past the limit, the cuBLAS path. Outputs poisoned; fresh random inputs.
fn grouped_expert_ffn_bf16(device: &Device) -> Result<(), Failed> {
    let mut g = gpu(device)?;
    let mut rng = rng("grouped_expert_ffn_bf16");
    // Neither width is a multiple of the 32-wide K chunks nor of the 16/32-row tiles.
    let (hidden, inter, e) = (264usize, 200usize, 40usize);
    let dims = FfnDims { hidden, inter };
    let mut host = Vec::new();
    let mut dev = Vec::new();
    for _ in 0..e {
        let (gu, guf) = as_dtype::<bf16>(&rand_vec(
            &mut rng,
            2 * inter * hidden,
            1.0 / (hidden as f32).sqrt(),
        ));
        let (dn, dnf) = as_dtype::<bf16>(&rand_vec(
            &mut rng,
            hidden * inter,
            1.0 / (inter as f32).sqrt(),
        ));
        dev.push((g.upload(&gu), g.upload(&dn)));
        host.push((guf, dnf));
    }
    let limit = pregate_kernels::GROUPED_FFN_MAX_ROWS;
    let mut cases: Vec<(Vec<usize>, bool)> = vec![
        (vec![0, 0, 0, 1], true),
        (vec![0, 1, limit, 9, 13], true),
        (vec![8, 16, 0, 0, 7], true),
        ((0..e).map(|_| rng.random_range(1..=3)).collect(), true),
        (vec![limit + 1, 3, 0, 1], false),
    ];
    for (counts, _) in cases.iter_mut() {
        counts.resize(e, 0);
    }
    for (counts, grouped) in cases {
        let mut offsets = vec![0usize];
        for c in &counts {
            offsets.push(offsets.last().unwrap() + c);
        }
        let plan = ExpertPlan { counts, offsets };
        assert_eq!(
            g.blas.grouped_ffn_applies::<bf16>(&plan, dims),
            grouped,
            "path for {:?}",
            plan.counts
        );
        assert!(!g.blas.grouped_ffn_applies::<f32>(&plan, dims));
        let rows = plan.total();
        let (x, xf) = as_dtype::<bf16>(&rand_vec(&mut rng, rows * hidden, 1.0));
        let dx = g.upload(&x);
        let experts: Vec<Option<ExpertWeights<'_, bf16>>> = (0..e)
            .map(|i| {
                (plan.counts[i] > 0).then(|| ExpertWeights {
                    gate_up: &dev[i].0,
                    down: &dev[i].1,
                })
            })
            .collect();
        let mut gu_ws = g.poisoned::<bf16>(rows * 2 * inter);
        let mut act_ws = g.poisoned::<bf16>(rows * inter);
        let mut y = g.poisoned::<bf16>(rows * hidden);
        g.blas
            .expert_ffn(
                &g.ks,
                &plan,
                &experts,
                dims,
                &dx,
                &mut gu_ws,
                &mut act_ws,
                &mut y,
            )
            .unwrap();
        let got = g.download_f32(&y);
        let mut want = vec![0.0f64; rows * hidden];
        for (ex, range) in plan.active() {
            let (gu, dn) = &host[ex];
            for r in range.clone() {
                let xr = &xf[r * hidden..(r + 1) * hidden];
                let dot = |row: usize| -> f64 {
                    gu[row * hidden..(row + 1) * hidden]
                        .iter()
                        .zip(xr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum()
                };
                let act: Vec<f64> = (0..inter).map(|i| silu(dot(i)) * dot(inter + i)).collect();
                for c in 0..hidden {
                    want[r * hidden + c] = dn[c * inter..(c + 1) * inter]
                        .iter()
                        .zip(&act)
                        .map(|(&a, &b)| a as f64 * b)
                        .sum();
                }
            }
            // Per expert, so that one wrong expert cannot hide in the total.
            let (a, b) = (range.start * hidden, range.end * hidden);
            assert_close::<bf16>(
                &format!("expert {ex} ({} rows, grouped {grouped})", range.len()),
                &got[a..b],
                &want[a..b],
            );
        }
        assert_close::<bf16>(&format!("grouped ffn {:?}", &plan.counts[..5]), &got, &want);
    }
    // Disabled, the same plan runs on cuBLAS.
    g.blas.set_grouped_ffn(false);
    let plan = ExpertPlan {
        counts: vec![1],
        offsets: vec![0, 1],
    };
    assert!(!g.blas.grouped_ffn_applies::<bf16>(&plan, dims));
    Ok(())
}

both_dtypes!(check_qk_norm: qk_norm_f32, qk_norm_bf16);
/// RMSNorm in place over groups of a strided buffer (the q and k parts of a fused qkv row), per
/// head and over the full width; the columns outside the groups stay untouched.
fn check_qk_norm<T: KernelDtype>(g: &Gpu, name: &str) {
    let mut rng = rng(name);
    // (tokens, row stride, offset, groups, width): Qwen3-like per head, OLMoE-like full width.
    for (n, stride, off, groups, width) in
        [(5, 256, 0, 4, 32), (5, 256, 128, 2, 32), (3, 96, 32, 1, 64)]
    {
        let (x, xf) = as_dtype::<T>(&rand_vec(&mut rng, n * stride, 2.0));
        let (w, wf) = as_dtype::<T>(&rand_vec(&mut rng, width, 1.5));
        let eps = 1e-6f32;
        let mut d = g.upload(&x);
        g.ks.rmsnorm_groups::<T>(
            &g.stream,
            &mut d.slice_mut(off..),
            &g.upload(&w),
            n,
            stride,
            groups,
            width,
            eps,
        )
        .unwrap();
        let mut want: Vec<f64> = xf.iter().map(|&v| v as f64).collect();
        for t in 0..n {
            for gi in 0..groups {
                let at = t * stride + off + gi * width;
                let v = &xf[at..at + width];
                let ms = v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / width as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for c in 0..width {
                    want[at + c] = v[c] as f64 * inv * wf[c] as f64;
                }
            }
        }
        assert_close::<T>(
            &format!("rmsnorm_groups {n}x{groups}x{width} stride {stride} at {off}"),
            &g.download_f32(&d),
            &want,
        );
    }
}

both_dtypes!(check_clamp_and_gated_add: clamp_and_gated_add_f32, clamp_and_gated_add_bf16);
/// clip_qkv's clamp, and the shared expert's `out += sigmoid(gate) * y`.
fn check_clamp_and_gated_add<T: KernelDtype>(g: &Gpu, name: &str) {
    let mut rng = rng(name);
    let n = 1000;
    let (x, xf) = as_dtype::<T>(&rand_vec(&mut rng, n, 4.0));
    let mut d = g.upload(&x);
    g.ks.clamp::<T>(&g.stream, &mut d, n - 1, 1.5).unwrap();
    let mut want: Vec<f64> = xf.iter().map(|&v| v.clamp(-1.5, 1.5) as f64).collect();
    // The last element is outside the launch.
    want[n - 1] = xf[n - 1] as f64;
    assert_close::<T>("clamp", &g.download_f32(&d), &want);

    let (rows, cols) = (7, 130);
    let (o, of) = as_dtype::<T>(&rand_vec(&mut rng, rows * cols, 1.0));
    let (y, yf) = as_dtype::<T>(&rand_vec(&mut rng, rows * cols, 1.0));
    let gate = rand_vec(&mut rng, rows, 3.0);
    let mut d = g.upload(&o);
    g.ks.sigmoid_scale_add::<T>(
        &g.stream,
        &mut d,
        &g.upload(&y),
        &g.upload(&gate),
        rows,
        cols,
    )
    .unwrap();
    let want: Vec<f64> = (0..rows * cols)
        .map(|i| {
            let s = 1.0 / (1.0 + (-(gate[i / cols] as f64)).exp());
            of[i] as f64 + s * yf[i] as f64
        })
        .collect();
    assert_close::<T>("sigmoid_scale_add", &g.download_f32(&d), &want);
}

/// The families' in-model gate: softmax over all experts, top-k (ties to the lower index), with
/// and without renormalisation; a non-finite row routes to 0..k with weight 0.
fn gate_softmax_topk_matches_reference(device: &Device) -> Result<(), Failed> {
    let g = gpu(device)?;
    let mut rng = rng("gate_softmax_topk");
    let (n, e) = (300, 8);
    // Logits on a coarse grid, so ties happen.
    let mut logits: Vec<f32> = (0..n * e)
        .map(|_| (rng.random_range(-6..6) as f32) * 0.5)
        .collect();
    logits[5] = f32::NAN;
    logits[e + 2] = f32::INFINITY;
    let d_logits = g.upload(&logits);
    for (k, renorm) in [(1usize, false), (2, false), (2, true), (4, true)] {
        let mut ids = g.upload(&vec![-7i32; n * k]);
        let mut w = g.poisoned::<f32>(n * k);
        g.ks.gate_softmax_topk(&g.stream, &d_logits, n, e, k, renorm, &mut ids, &mut w)
            .unwrap();
        let (ids, w) = (g.download(&ids), g.download(&w));
        for t in 0..n {
            let row = &logits[t * e..(t + 1) * e];
            let got_ids = &ids[t * k..(t + 1) * k];
            let got_w = &w[t * k..(t + 1) * k];
            if row.iter().any(|v| !v.is_finite()) {
                let want: Vec<i32> = (0..k as i32).collect();
                assert_eq!(got_ids, &want[..], "non-finite row {t}");
                assert!(
                    got_w.iter().all(|&v| v == 0.0),
                    "non-finite row {t}: {got_w:?}"
                );
                continue;
            }
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            let p: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp() / z).collect();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
            let want_ids: Vec<i32> = order[..k].iter().map(|&i| i as i32).collect();
            assert_eq!(got_ids, &want_ids[..], "token {t} k {k}");
            let sum: f64 = order[..k].iter().map(|&i| p[i]).sum();
            for j in 0..k {
                let want = if renorm {
                    p[order[j]] / sum
                } else {
                    p[order[j]]
                };
                assert!(
                    (got_w[j] as f64 - want).abs() < 1e-6,
                    "weight t{t} j{j} k{k} renorm {renorm}: {} vs {want}",
                    got_w[j]
                );
            }
        }
    }
    Ok(())
}
