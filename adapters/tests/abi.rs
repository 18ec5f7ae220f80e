//! The C ABI through its Rust declarations: struct layouts as `pregate.h` declares them, the error
//! paths (NULL pointers, struct sizes, shapes, missing experts, calls out of order, panics), the
//! CPU service against a dense reference, and the host router against the library's own.

use std::ffi::{c_void, CString};
use std::mem::{offset_of, size_of};
use std::ptr::{null, null_mut};

use half::bf16;
use pregate::model::{make_model, ExpertLayout, ModelDir, Preset};
use pregate::router::{ReadMeRouter, Router as _};
use pregate_adapters::layered::*;
use pregate_adapters::moe::*;
use pregate_adapters::router::*;
use pregate_adapters::{ffi, pregate_abi_version, pregate_last_error, ErrorCode, ABI_VERSION};

const INVALID: i32 = ErrorCode::InvalidArgument as i32;
const STATE: i32 = ErrorCode::State as i32;

fn last_error() -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` has `buf.len()` writable bytes.
    let n = unsafe { pregate_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    String::from_utf8_lossy(&buf[..n.min(buf.len() - 1)]).into_owned()
}

/// A small deterministic generator (values in [-1, 1)).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn config(layers: u32, experts: u32, top_k: u32, hidden: u32, inter: u32) -> PregateMoeConfig {
    PregateMoeConfig {
        struct_size: size_of::<PregateMoeConfig>() as u32,
        num_layers: layers,
        num_experts: experts,
        top_k,
        hidden,
        inter,
        dtype: 0,
        device: -1,
        policy: 3,
        ..Default::default()
    }
}

/// Experts `[layer][expert] = (gate, up, down)`, random.
type Experts = Vec<Vec<[Vec<f32>; 3]>>;

fn random_experts(c: &PregateMoeConfig, seed: u64) -> Experts {
    let mut g = Lcg(seed);
    let (h, i) = (c.hidden as usize, c.inter as usize);
    (0..c.num_layers)
        .map(|_| {
            (0..c.num_experts)
                .map(|_| [g.vec(i * h, 0.3), g.vec(i * h, 0.3), g.vec(h * i, 0.3)])
                .collect()
        })
        .collect()
}

fn create(c: &PregateMoeConfig) -> *mut PregateMoe {
    let mut m = null_mut();
    // SAFETY: valid pointers.
    let s = unsafe { pregate_moe_create(c, &mut m) };
    assert_eq!(s, 0, "{}", last_error());
    m
}

fn set_all(m: *mut PregateMoe, c: &PregateMoeConfig, experts: &Experts) {
    set_all_as(m, c, experts, 0);
}

/// Sets every expert from values of ABI dtype `dtype` (`E` its element: f32, or u16 bits).
fn set_all_as<E>(
    m: *mut PregateMoe,
    c: &PregateMoeConfig,
    experts: &[Vec<[Vec<E>; 3]>],
    dtype: i32,
) {
    let (h, i) = (c.hidden as u64, c.inter as u64);
    for (l, layer) in experts.iter().enumerate() {
        for (e, projs) in layer.iter().enumerate() {
            for (p, w) in projs.iter().enumerate() {
                let (rows, cols) = if p == 2 { (h, i) } else { (i, h) };
                // SAFETY: `w` holds rows x cols values of `dtype`.
                let s = unsafe {
                    pregate_moe_set_expert(
                        m,
                        l as u32,
                        e as u32,
                        p as i32,
                        dtype,
                        w.as_ptr().cast(),
                        rows,
                        cols,
                        cols,
                    )
                };
                assert_eq!(s, 0, "{}", last_error());
            }
        }
    }
}

fn finalize(m: *mut PregateMoe) -> i32 {
    // SAFETY: a live handle; NULL device memory on the CPU.
    unsafe { pregate_moe_finalize(m, null_mut(), 0, null_mut(), 0) }
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// The dense reference: `sum_j w_j down(silu(gate x) * up x)`, in f64.
fn reference(
    c: &PregateMoeConfig,
    experts: &Experts,
    layer: usize,
    x: &[f32],
    ids: &[i32],
    w: &[f32],
) -> Vec<f32> {
    let (h, i, k) = (c.hidden as usize, c.inter as usize, c.top_k as usize);
    let mut out = vec![0.0f32; x.len()];
    for (t, xt) in x.chunks(h).enumerate() {
        for j in 0..k {
            let [gate, up, down] = &experts[layer][ids[t * k + j] as usize];
            let mid: Vec<f64> = (0..i)
                .map(|r| {
                    let g: f64 = (0..h).map(|q| gate[r * h + q] as f64 * xt[q] as f64).sum();
                    let u: f64 = (0..h).map(|q| up[r * h + q] as f64 * xt[q] as f64).sum();
                    silu(g as f32) as f64 * u
                })
                .collect();
            for o in 0..h {
                let y: f64 = (0..i).map(|r| down[o * i + r] as f64 * mid[r]).sum();
                out[t * h + o] += (w[t * k + j] as f64 * y) as f32;
            }
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (n, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "element {n}: {a} vs {b}"
        );
    }
}

#[test]
fn layouts_match_the_header() {
    assert_eq!(pregate_abi_version(), ABI_VERSION);
    assert_eq!(size_of::<PregateMoeConfig>(), 72);
    assert_eq!(offset_of!(PregateMoeConfig, num_layers), 4);
    assert_eq!(offset_of!(PregateMoeConfig, inter), 20);
    assert_eq!(offset_of!(PregateMoeConfig, dtype), 24);
    assert_eq!(offset_of!(PregateMoeConfig, device), 28);
    assert_eq!(offset_of!(PregateMoeConfig, cache_slots), 32);
    assert_eq!(offset_of!(PregateMoeConfig, layer_quota), 40);
    assert_eq!(offset_of!(PregateMoeConfig, policy), 44);
    assert_eq!(offset_of!(PregateMoeConfig, max_tokens), 48);
    assert_eq!(offset_of!(PregateMoeConfig, shard_kind), 52);
    assert_eq!(offset_of!(PregateMoeConfig, shard_size), 60);
    assert_eq!(offset_of!(PregateMoeConfig, seed), 64);
    assert_eq!(size_of::<PregateMoeStats>(), 72);
    assert_eq!(offset_of!(PregateMoeStats, hits), 8);
    assert_eq!(offset_of!(PregateMoeStats, waves), 56);
    assert_eq!(offset_of!(PregateMoeStats, stall_s), 64);
}

#[test]
fn null_pointers_and_bad_configs_are_refused_with_a_message() {
    let c = config(1, 4, 1, 8, 4);
    let mut m = null_mut();
    // SAFETY: NULL arguments are what is tested; everything else is valid.
    unsafe {
        assert_eq!(pregate_moe_create(null(), &mut m), INVALID);
        assert!(last_error().contains("`cfg` is NULL"), "{}", last_error());
        assert_eq!(pregate_moe_create(&c, null_mut()), INVALID);
        assert!(last_error().contains("`out` is NULL"));
        let mut small = c;
        small.struct_size = 40;
        assert_eq!(pregate_moe_create(&small, &mut m), INVALID);
        assert!(
            last_error().contains("struct_size is 40"),
            "{}",
            last_error()
        );
        assert!(m.is_null());
        for (bad, what) in [
            (PregateMoeConfig { top_k: 5, ..c }, "top_k 5"),
            (PregateMoeConfig { num_layers: 0, ..c }, "num_layers"),
            (PregateMoeConfig { dtype: 7, ..c }, "dtype 7"),
            (PregateMoeConfig { policy: 9, ..c }, "policy 9"),
            (PregateMoeConfig { shard_kind: 2, ..c }, "expert parallel"),
            (
                PregateMoeConfig {
                    cache_slots: 1,
                    top_k: 2,
                    ..c
                },
                "cannot hold one token's 2 experts",
            ),
            (
                PregateMoeConfig {
                    cache_slots: 3,
                    layer_quota: 2,
                    ..c
                },
                "layer_quota",
            ),
        ] {
            assert_eq!(pregate_moe_create(&bad, &mut m), INVALID, "{what}");
            assert!(last_error().contains(what), "{what}: {}", last_error());
        }
        // Without a GPU a CUDA service is refused clearly; f16 is refused on CUDA everywhere.
        if !pregate::cuda::cuda_available() {
            let gpu = PregateMoeConfig { device: 0, ..c };
            assert_eq!(pregate_moe_create(&gpu, &mut m), ErrorCode::Device as i32);
            assert!(last_error().contains("CUDA"), "{}", last_error());
        }
        let f16 = PregateMoeConfig {
            device: 0,
            dtype: 2,
            ..c
        };
        assert_eq!(pregate_moe_create(&f16, &mut m), INVALID);
        assert!(last_error().contains("f16"), "{}", last_error());
        // NULL handles.
        assert_eq!(finalize(null_mut()), INVALID);
        let mut st = PregateMoeStats::default();
        assert_eq!(pregate_moe_stats(null(), &mut st), INVALID);
        pregate_moe_destroy(null_mut());
    }
}

#[test]
fn a_newer_larger_config_is_accepted_when_its_new_fields_are_zero() {
    #[repr(C)]
    struct Newer {
        c: PregateMoeConfig,
        extra: u64,
    }
    let mut n = Newer {
        c: config(1, 2, 1, 4, 4),
        extra: 0,
    };
    n.c.struct_size = size_of::<Newer>() as u32;
    let mut m = null_mut();
    // SAFETY: `n` has `struct_size` readable bytes.
    unsafe {
        assert_eq!(pregate_moe_create(&n.c, &mut m), 0);
        pregate_moe_destroy(m);
        n.extra = 1;
        assert_eq!(pregate_moe_create(&n.c, &mut m), INVALID);
        assert!(last_error().contains("newer"), "{}", last_error());
    }
}

#[test]
fn set_expert_checks_names_shapes_and_values() {
    let c = config(2, 3, 1, 8, 4);
    let m = create(&c);
    let w = vec![0.5f32; 64];
    let set = |l, e, p, dt, ptr: *const c_void, rows, cols, stride| {
        // SAFETY: `w` is large enough for every call made below.
        unsafe { pregate_moe_set_expert(m, l, e, p, dt, ptr, rows, cols, stride) }
    };
    let p = w.as_ptr().cast();
    assert_eq!(set(2, 0, 0, 0, p, 4, 8, 8), INVALID);
    assert!(
        last_error().contains("(layer 2, expert 0)"),
        "{}",
        last_error()
    );
    assert_eq!(set(0, 3, 0, 0, p, 4, 8, 8), INVALID);
    assert_eq!(set(0, 0, 3, 0, p, 4, 8, 8), INVALID);
    assert!(last_error().contains("proj 3"));
    assert_eq!(set(0, 0, 2, 0, p, 4, 8, 8), INVALID);
    assert!(
        last_error().contains("(layer 0, expert 0, down): got [4, 8]"),
        "{}",
        last_error()
    );
    assert_eq!(set(0, 0, 0, 0, p, 4, 8, 7), INVALID);
    assert_eq!(set(0, 0, 0, 5, p, 4, 8, 8), INVALID);
    assert!(last_error().contains("src_dtype 5"));
    assert_eq!(set(0, 0, 0, 0, null(), 4, 8, 8), INVALID);
    assert!(last_error().contains("NULL"));
    let mut nan = w.clone();
    nan[9] = f32::NAN;
    assert_eq!(set(0, 0, 0, 0, nan.as_ptr().cast(), 4, 8, 8), INVALID);
    assert!(last_error().contains("element 9"), "{}", last_error());
    // Missing experts are named at finalize; the store is kept, so the caller can finish it.
    assert_eq!(set(0, 0, 0, 0, p, 4, 8, 8), 0);
    assert_eq!(finalize(m), INVALID);
    let e = last_error();
    assert!(
        e.contains("17 of 18") && e.contains("(layer 0, expert 0, up)"),
        "{e}"
    );
    let experts = random_experts(&c, 3);
    set_all(m, &c, &experts);
    assert_eq!(finalize(m), 0, "{}", last_error());
    assert_eq!(set(0, 0, 0, 0, p, 4, 8, 8), STATE);
    assert_eq!(finalize(m), STATE);
    // SAFETY: a live handle, destroyed once.
    unsafe { pregate_moe_destroy(m) };
}

#[test]
fn steps_must_be_planned_and_current() {
    let c = config(1, 2, 1, 4, 4);
    let m = create(&c);
    let (ids, w, x) = ([0i32, 1], [1.0f32, 1.0], [0.25f32; 8]);
    let mut out = [0.0f32; 8];
    let mut step = 0u64;
    // SAFETY: every buffer matches the extents given.
    unsafe {
        let plan =
            |step: &mut u64| pregate_moe_plan_step(m, ids.as_ptr(), w.as_ptr(), 2, 1, 0, step);
        assert_eq!(plan(&mut step), STATE, "before finalize");
        set_all(m, &c, &random_experts(&c, 1));
        assert_eq!(finalize(m), 0);
        let fwd_at = |step: u64, layer: u32, tokens: u64, out: &mut [f32]| {
            pregate_moe_layer_forward(
                m,
                step,
                layer,
                x.as_ptr().cast(),
                4,
                ids.as_ptr(),
                w.as_ptr(),
                tokens,
                out.as_mut_ptr().cast(),
                0,
            )
        };
        let fwd = |step: u64, out: &mut [f32]| fwd_at(step, 0, 2, out);
        assert_eq!(fwd(1, &mut out), STATE);
        assert!(last_error().contains("without a plan"), "{}", last_error());
        assert_eq!(plan(&mut step), 0);
        assert_eq!(fwd(step + 1, &mut out), STATE);
        assert_eq!(fwd(step, &mut out), 0, "{}", last_error());
        assert!(out.iter().any(|&v| v != 0.0));
        // Wrong token count, layer, route.
        assert_eq!(fwd_at(step, 0, 1, &mut out), INVALID);
        assert_eq!(fwd_at(step, 1, 2, &mut out), INVALID);
        let bad = [0i32, 2];
        let f = pregate_moe_plan_step(m, bad.as_ptr(), w.as_ptr(), 2, 1, 0, &mut step);
        assert_eq!(f, INVALID);
        assert!(
            last_error().contains("token 1: expert 2"),
            "{}",
            last_error()
        );
        assert_eq!(pregate_moe_step_end(m, step + 7, 0), STATE);
        assert_eq!(pregate_moe_step_end(m, step, 0), 0);
        assert_eq!(fwd(step, &mut out), STATE, "after step_end");
        pregate_moe_destroy(m);
    }
}

#[test]
fn a_panic_inside_is_reported_as_internal() {
    let s = ffi::guard("pregate_test", || panic!("boom at the boundary"));
    assert_eq!(s, ErrorCode::Internal as i32);
    let e = last_error();
    assert!(
        e.contains("pregate_test") && e.contains("boom at the boundary"),
        "{e}"
    );
    // The message length is returned whatever the buffer.
    // SAFETY: NULL with cap 0 asks the length only.
    assert_eq!(unsafe { pregate_last_error(null_mut(), 0) }, e.len());
}

/// Runs `steps` random steps of every layer through the service and compares with the reference.
fn run_against_reference(
    c: PregateMoeConfig,
    steps: usize,
    tokens: usize,
    tol: f32,
) -> PregateMoeStats {
    let experts = random_experts(&c, 11);
    let m = create(&c);
    set_all(m, &c, &experts);
    assert_eq!(finalize(m), 0, "{}", last_error());
    let (h, k, ne) = (c.hidden as usize, c.top_k as usize, c.num_experts as usize);
    let mut g = Lcg(5);
    for _ in 0..steps {
        let mut ids = Vec::new();
        let mut w = Vec::new();
        for _ in 0..tokens {
            let first = ((g.next() + 1.0) * 0.5 * ne as f32) as usize % ne;
            for j in 0..k {
                ids.push(((first + j) % ne) as i32);
                w.push(1.0 / k as f32 + 0.1 * j as f32);
            }
        }
        let x = g.vec(tokens * h, 1.0);
        let mut step = 0;
        // SAFETY: buffers match the extents given.
        unsafe {
            assert_eq!(
                pregate_moe_plan_step(
                    m,
                    ids.as_ptr(),
                    w.as_ptr(),
                    tokens as u64,
                    k as u32,
                    0,
                    &mut step
                ),
                0
            );
            for l in 0..c.num_layers as usize {
                let mut out = vec![0.0f32; tokens * h];
                let want = reference(&c, &experts, l, &x, &ids, &w);
                // Input and output in the service's dtype.
                let forward = |x: *const std::ffi::c_void, out: *mut std::ffi::c_void| {
                    pregate_moe_layer_forward(
                        m,
                        step,
                        l as u32,
                        x,
                        h as u64,
                        ids.as_ptr(),
                        w.as_ptr(),
                        tokens as u64,
                        out,
                        0,
                    )
                };
                if c.dtype == 1 {
                    let xb: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
                    let mut ob = vec![0u16; tokens * h];
                    let s = forward(xb.as_ptr().cast(), ob.as_mut_ptr().cast());
                    assert_eq!(s, 0, "{}", last_error());
                    out = ob.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
                } else {
                    let s = forward(x.as_ptr().cast(), out.as_mut_ptr().cast());
                    assert_eq!(s, 0, "{}", last_error());
                }
                assert_close(&out, &want, tol);
            }
            assert_eq!(pregate_moe_step_end(m, step, 0), 0);
        }
    }
    let mut st = PregateMoeStats {
        struct_size: size_of::<PregateMoeStats>() as u32,
        ..Default::default()
    };
    // SAFETY: a live handle and a full-size stats struct.
    unsafe {
        assert_eq!(pregate_moe_stats(m, &mut st), 0);
        let mut needed = 0usize;
        assert_eq!(pregate_moe_metrics_text(m, null_mut(), 0, &mut needed), 0);
        let mut buf = vec![0u8; needed];
        assert_eq!(
            pregate_moe_metrics_text(m, buf.as_mut_ptr().cast(), needed, &mut needed),
            0
        );
        let text = String::from_utf8(buf[..needed - 1].to_vec()).unwrap();
        assert!(
            text.contains(&format!("pregate_moe_cache_misses_total {}", st.misses)),
            "{text}"
        );
        assert!(
            text.contains(&format!("pregate_moe_layer_calls_total {}", st.layer_calls)),
            "{text}"
        );
        pregate_moe_destroy(m);
    }
    assert_eq!(st.layer_calls, (steps * c.num_layers as usize) as u64);
    st
}

#[test]
fn cpu_service_matches_the_dense_reference_with_every_expert_resident() {
    let st = run_against_reference(config(3, 5, 2, 16, 12), 4, 6, 1e-5);
    assert_eq!(
        (st.hits, st.misses),
        (0, 0),
        "no cache: nothing is ever loaded"
    );
    assert_eq!(st.waves, st.layer_calls);
}

#[test]
fn belady_decay_is_a_policy_of_the_abi() {
    let c = PregateMoeConfig {
        cache_slots: 3,
        policy: 4,
        ..config(2, 6, 2, 16, 8)
    };
    let st = run_against_reference(c, 3, 9, 1e-5);
    assert!(st.misses > 0 && st.evictions > 0, "{st:?}");
}

#[test]
fn cpu_service_with_fewer_slots_than_a_layer_runs_waves_and_counts_misses() {
    let c = PregateMoeConfig {
        cache_slots: 2,
        ..config(2, 6, 2, 16, 8)
    };
    let st = run_against_reference(c, 3, 9, 1e-5);
    assert!(st.misses > 0 && st.evictions > 0, "{st:?}");
    assert!(
        st.waves > st.layer_calls,
        "a layer of more experts than slots runs in waves: {st:?}"
    );
    // Every load copies one whole expert (three 16 x 8 f32 matrices).
    let unit = 3 * 16 * 8 * 4;
    assert!(
        st.bytes_loaded >= unit && st.bytes_loaded % unit == 0,
        "{st:?}"
    );
}

#[test]
fn cpu_service_takes_bf16_activations() {
    let c = PregateMoeConfig {
        dtype: 1,
        layer_quota: 2,
        ..config(2, 4, 1, 16, 8)
    };
    let st = run_against_reference(c, 2, 5, 2e-2);
    assert!(st.misses > 0);
}

#[test]
fn host_router_matches_the_library_router_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    make_model(
        &Preset::TinyHead64.spec(),
        ExpertLayout::Fused,
        4,
        dir.path(),
    )
    .unwrap();
    let model = ModelDir::open(dir.path()).unwrap();
    let weights = pregate::model::RouterWeights::load(&model.checkpoint, &model.config).unwrap();
    let mut lib = pregate::router::HostReadMeRouter::new(ReadMeRouter::new(weights, &model.config));
    lib.open(0, 64).unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 512).collect();
    let want = lib.route(&[0], &[&ids]).unwrap().remove(0);
    let path = CString::new(dir.path().to_str().unwrap()).unwrap();
    let (mut r, mut s) = (null_mut(), null_mut());
    let (mut n, mut k) = (0u32, 0u32);
    // SAFETY: valid pointers and extents throughout.
    unsafe {
        assert_eq!(
            pregate_router_open(path.as_ptr(), &mut r),
            0,
            "{}",
            last_error()
        );
        assert_eq!(pregate_router_shape(r, &mut n, &mut k), 0);
        assert_eq!((n, k), (4, 1));
        assert_eq!(pregate_router_state_new(r, 64, &mut s), 0);
        // Routed in two calls: the state carries the first call's tokens.
        let mut e = vec![0i32; 20];
        let mut w = vec![0f32; 20];
        assert_eq!(
            pregate_router_route(r, s, ids.as_ptr(), 12, e.as_mut_ptr(), w.as_mut_ptr()),
            0
        );
        assert_eq!(
            pregate_router_route(
                r,
                s,
                ids[12..].as_ptr(),
                8,
                e[12..].as_mut_ptr(),
                w[12..].as_mut_ptr()
            ),
            0
        );
        for (t, route) in want.iter().enumerate() {
            assert_eq!(e[t], route.experts()[0] as i32, "token {t}");
            assert_eq!(w[t], route.weights()[0]);
        }
        let bad = [600u32];
        assert_eq!(
            pregate_router_route(r, s, bad.as_ptr(), 1, e.as_mut_ptr(), w.as_mut_ptr()),
            INVALID
        );
        assert!(last_error().contains("token id 600"), "{}", last_error());
        pregate_router_state_free(s);
        pregate_router_close(r);
        let missing = CString::new("/nonexistent/pregate-model").unwrap();
        let status = pregate_router_open(missing.as_ptr(), &mut r);
        assert_eq!(status, ErrorCode::NotFound as i32, "{}", last_error());
        assert!(r.is_null());
    }
}

/// Runs `layer` of the open per-layer step `step` on f32 `x` with routes `ids` / `w`.
fn forward_routed(
    m: *mut PregateMoe,
    step: u64,
    layer: u32,
    x: &[f32],
    ids: &[i32],
    w: &[f32],
    top_k: u32,
) -> (i32, Vec<f32>) {
    let tokens = ids.len() / top_k as usize;
    let mut out = vec![0.0f32; x.len()];
    // SAFETY: the buffers hold `tokens` rows / `tokens * top_k` routes.
    let s = unsafe {
        pregate_moe_layer_forward_routed(
            m,
            step,
            layer,
            x.as_ptr().cast(),
            (x.len() / tokens) as u64,
            ids.as_ptr(),
            w.as_ptr(),
            tokens as u64,
            top_k,
            out.as_mut_ptr().cast(),
            0,
        )
    };
    (s, out)
}

fn stats(m: *mut PregateMoe) -> (PregateMoeStats, PregateMoeSpecStats) {
    let mut st = PregateMoeStats {
        struct_size: size_of::<PregateMoeStats>() as u32,
        ..Default::default()
    };
    let mut sp = PregateMoeSpecStats {
        struct_size: size_of::<PregateMoeSpecStats>() as u32,
        ..Default::default()
    };
    // SAFETY: a live handle and full-size structs.
    unsafe {
        assert_eq!(pregate_moe_stats(m, &mut st), 0);
        assert_eq!(pregate_moe_speculation_stats(m, &mut sp), 0);
    }
    (st, sp)
}

fn metrics(m: *mut PregateMoe) -> String {
    let mut needed = 0usize;
    // SAFETY: a live handle; a NULL buffer of 0 bytes, then one of `needed`.
    unsafe {
        assert_eq!(pregate_moe_metrics_text(m, null_mut(), 0, &mut needed), 0);
        let mut buf = vec![0u8; needed];
        assert_eq!(
            pregate_moe_metrics_text(m, buf.as_mut_ptr().cast(), needed, &mut needed),
            0
        );
        String::from_utf8(buf[..needed - 1].to_vec()).unwrap()
    }
}

#[test]
fn spec_stats_layout_matches_the_header() {
    assert_eq!(size_of::<PregateMoeSpecStats>(), 96);
    assert_eq!(offset_of!(PregateMoeSpecStats, hits), 8);
    assert_eq!(offset_of!(PregateMoeSpecStats, misses), 40);
    assert_eq!(offset_of!(PregateMoeSpecStats, loads), 72);
    assert_eq!(offset_of!(PregateMoeSpecStats, wasted), 88);
}

#[test]
fn per_layer_routes_match_the_dense_reference_with_a_small_cache() {
    // Every layer routes its own way; 3 slots for 4 layers x 6 experts, so layers miss and evict.
    let c = PregateMoeConfig {
        cache_slots: 3,
        ..config(4, 6, 2, 16, 8)
    };
    let experts = random_experts(&c, 21);
    let m = create(&c);
    set_all(m, &c, &experts);
    assert_eq!(finalize(m), 0, "{}", last_error());
    let mut g = Lcg(9);
    let tokens = 3;
    for _ in 0..3 {
        let x = g.vec(tokens * 16, 1.0);
        let mut step = 0;
        // SAFETY: a live handle and a writable step id.
        assert_eq!(
            unsafe { pregate_moe_begin_step(m, tokens as u64, 0, &mut step) },
            0
        );
        for l in 0..4 {
            let ids: Vec<i32> = (0..tokens)
                .flat_map(|t| {
                    let a = ((g.next() + 1.0) * 3.0) as i32 % 6;
                    [a, (a + 1 + (t as i32 + l) % 5) % 6]
                })
                .collect();
            let w: Vec<f32> = (0..tokens).flat_map(|_| [0.7, 0.3]).collect();
            let (s, out) = forward_routed(m, step, l as u32, &x, &ids, &w, 2);
            assert_eq!(s, 0, "{}", last_error());
            assert_close(
                &out,
                &reference(&c, &experts, l as usize, &x, &ids, &w),
                1e-5,
            );
        }
        // SAFETY: a live handle.
        assert_eq!(unsafe { pregate_moe_step_end(m, step, 0) }, 0);
    }
    let (st, sp) = stats(m);
    assert_eq!(st.layer_calls, 12);
    assert!(st.misses > 0 && st.evictions > 0, "{st:?}");
    assert!(st.waves >= 12, "{st:?}");
    assert_eq!(sp.depth, 0);
    // SAFETY: a live handle, destroyed once.
    unsafe { pregate_moe_destroy(m) };
}

#[test]
fn speculation_loads_predicted_experts_ahead_and_counts_recall() {
    // 3 layers x 4 experts, top-1, 4 slots, at most 2 speculative loads per call. One token.
    let c = PregateMoeConfig {
        cache_slots: 4,
        ..config(3, 4, 1, 8, 4)
    };
    let experts = random_experts(&c, 3);
    let m = create(&c);
    set_all(m, &c, &experts);
    assert_eq!(finalize(m), 0, "{}", last_error());
    let x = Lcg(1).vec(8, 1.0);
    let mut step = 0;
    let mut queued = 0u32;
    // Layer 1 predicted {2, 3} (top-1 plus 1 extra), layer 2 predicted {0, 3}.
    let scores = [0.1f32, 0.2, 0.9, 0.5, 0.8, 0.1, 0.0, 0.3];
    // SAFETY: live handle; `scores` holds 2 x 1 x 4 floats; writable outputs.
    unsafe {
        assert_eq!(pregate_moe_begin_step(m, 1, 0, &mut step), 0);
        let s = pregate_moe_speculate(m, step, 0, 2, scores.as_ptr(), 1, 1, 0, &mut queued);
        assert_eq!(s, STATE, "speculate before configuring: {}", last_error());
        assert!(last_error().contains("configure_speculation"));
        assert_eq!(pregate_moe_configure_speculation(m, 2, 1, 0), STATE);
        assert!(last_error().contains("inside a per-layer step"));
        assert_eq!(pregate_moe_step_end(m, step, 0), 0);
        assert_eq!(pregate_moe_configure_speculation(m, 5, 1, 2), INVALID);
        assert_eq!(pregate_moe_configure_speculation(m, 2, 1, 2), 0);
        assert_eq!(pregate_moe_begin_step(m, 1, 0, &mut step), 0);
    }
    let (s, out) = forward_routed(m, step, 0, &x, &[0], &[1.0], 1);
    assert_eq!(s, 0, "{}", last_error());
    assert_close(&out, &reference(&c, &experts, 0, &x, &[0], &[1.0]), 1e-5);
    // SAFETY: as above.
    unsafe {
        // Layer 1 + 2 = 3 is not a layer: refused, nothing recorded.
        let s = pregate_moe_speculate(m, step, 1, 2, scores.as_ptr(), 1, 1, 0, &mut queued);
        assert_eq!(s, INVALID);
        let nan = [f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let s = pregate_moe_speculate(m, step, 0, 2, nan.as_ptr(), 1, 1, 0, &mut queued);
        assert_eq!(s, INVALID);
        assert!(last_error().contains("NaN"), "{}", last_error());
        let s = pregate_moe_speculate(m, step, 0, 2, scores.as_ptr(), 1, 1, 0, &mut queued);
        assert_eq!(s, 0, "{}", last_error());
    }
    // Four candidates, none resident; the budget of two goes to the nearest layer's.
    assert_eq!(queued, 2);
    let (st, sp) = stats(m);
    assert_eq!((st.misses, st.hits, st.prefetches), (1, 0, 2));
    assert_eq!(sp.loads, 2);
    // Layer 1 runs expert 3: a hit on a speculative load; recall at distance 1 is 1 of 1.
    let (s, out) = forward_routed(m, step, 1, &x, &[3], &[1.0], 1);
    assert_eq!(s, 0, "{}", last_error());
    assert_close(&out, &reference(&c, &experts, 1, &x, &[3], &[1.0]), 1e-5);
    // Layer 2 runs expert 1, which was not predicted two layers ahead: a miss on demand.
    let (s, out) = forward_routed(m, step, 2, &x, &[1], &[1.0], 1);
    assert_eq!(s, 0, "{}", last_error());
    assert_close(&out, &reference(&c, &experts, 2, &x, &[1], &[1.0]), 1e-5);
    let (st, sp) = stats(m);
    assert_eq!((st.hits, st.misses), (1, 2), "{st:?}");
    assert_eq!((sp.depth, sp.loads, sp.used), (2, 2, 1), "{sp:?}");
    assert_eq!((sp.hits[0], sp.misses[0]), (1, 0), "{sp:?}");
    assert_eq!((sp.hits[1], sp.misses[1]), (0, 1), "{sp:?}");
    let text = metrics(m);
    for want in [
        "pregate_prediction_hits_total{distance=\"1\"} 1",
        "pregate_prediction_misses_total{distance=\"2\"} 1",
        "pregate_prediction_recall{distance=\"1\"} 1",
        "pregate_prediction_recall{distance=\"2\"} 0",
        "pregate_speculative_loads_total 2",
        "pregate_speculative_used_loads_total 1",
        "pregate_moe_prefetches_total 2",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    let ratio = 1.0 / 3.0;
    assert!(
        text.contains(&format!("pregate_moe_cache_hit_ratio {ratio}")),
        "{text}"
    );
    // SAFETY: a live handle, destroyed once.
    unsafe { pregate_moe_destroy(m) };
}

#[test]
fn per_layer_and_planned_steps_do_not_mix() {
    let c = config(2, 4, 1, 8, 4);
    let experts = random_experts(&c, 4);
    let m = create(&c);
    set_all(m, &c, &experts);
    assert_eq!(finalize(m), 0, "{}", last_error());
    let x = Lcg(2).vec(16, 1.0);
    let (ids, w) = ([1i32, 2], [1.0f32, 1.0]);
    let mut step = 0;
    let mut out = vec![0.0f32; 16];
    // SAFETY: live handle; buffers of 2 tokens.
    unsafe {
        assert_eq!(
            pregate_moe_plan_step(m, ids.as_ptr(), w.as_ptr(), 2, 1, 0, &mut step),
            0
        );
        assert_eq!(forward_routed(m, step, 0, &x, &ids, &w, 1).0, STATE);
        assert!(
            last_error().contains("use layer_forward"),
            "{}",
            last_error()
        );
        assert_eq!(pregate_moe_begin_step(m, 2, 0, &mut step), 0);
        let s = pregate_moe_layer_forward(
            m,
            step,
            0,
            x.as_ptr().cast(),
            8,
            ids.as_ptr(),
            w.as_ptr(),
            2,
            out.as_mut_ptr().cast(),
            0,
        );
        assert_eq!(s, STATE);
        assert!(
            last_error().contains("layer_forward_routed"),
            "{}",
            last_error()
        );
        // Three tokens for a step of two; an expert outside the layer.
        let x3 = Lcg(3).vec(24, 1.0);
        assert_eq!(
            forward_routed(m, step, 0, &x3, &[0, 1, 2], &[1.0; 3], 1).0,
            INVALID
        );
        assert!(last_error().contains("begun for 2"), "{}", last_error());
        assert_eq!(forward_routed(m, step, 0, &x, &[0, 9], &w, 1).0, INVALID);
        assert_eq!(forward_routed(m, step + 1, 0, &x, &ids, &w, 1).0, STATE);
        // The step is intact after the refusals.
        assert_eq!(forward_routed(m, step, 1, &x, &ids, &w, 1).0, 0);
        pregate_moe_destroy(m);
    }
}

fn host_bytes(m: *const PregateMoe) -> u64 {
    let mut n = 0;
    // SAFETY: a live handle and a writable u64.
    let s = unsafe { pregate_moe_host_bytes(m, &mut n) };
    assert_eq!(s, 0, "{}", last_error());
    n
}

#[test]
fn the_store_holds_the_services_dtype_and_reports_its_host_bytes() {
    let bf = PregateMoeConfig {
        dtype: 1,
        ..config(2, 3, 1, 16, 8)
    };
    let elements = 2 * 3 * 3 * 16 * 8;
    let experts = random_experts(&bf, 2);
    let m = create(&bf);
    assert_eq!(host_bytes(m), 0);
    // f32 sources into a bf16 service: stored as bf16, 2 bytes an element.
    set_all(m, &bf, &experts);
    assert_eq!(host_bytes(m), elements * 2);
    let text = metrics(m);
    assert!(
        text.contains(&format!("pregate_moe_host_expert_bytes {}", elements * 2)),
        "{text}"
    );
    // The CPU runtime computes in f32.
    assert_eq!(finalize(m), 0, "{}", last_error());
    assert_eq!(host_bytes(m), elements * 4);
    let mut n = 0;
    // SAFETY: NULL arguments are refused before any access.
    unsafe {
        assert_eq!(pregate_moe_host_bytes(m, null_mut()), INVALID);
        assert_eq!(pregate_moe_host_bytes(null(), &mut n), INVALID);
        pregate_moe_destroy(m);
    }
    let f = config(2, 3, 1, 16, 8);
    let m = create(&f);
    set_all(m, &f, &experts);
    assert_eq!(host_bytes(m), elements * 4);
    // SAFETY: a live handle, destroyed once.
    unsafe { pregate_moe_destroy(m) };
}

#[test]
fn a_value_the_services_dtype_cannot_hold_is_refused_by_name() {
    let c = PregateMoeConfig {
        dtype: 2,
        ..config(1, 2, 1, 8, 4)
    };
    let m = create(&c);
    let mut w = [0.5f32; 32];
    w[6] = 70000.0;
    // SAFETY: `w` holds 4 x 8 f32 values.
    let s = unsafe { pregate_moe_set_expert(m, 0, 1, 1, 0, w.as_ptr().cast(), 4, 8, 8) };
    assert_eq!(s, INVALID);
    let e = last_error();
    assert!(
        e.contains("(layer 0, expert 1, up): element 6 is 70000")
            && e.contains("beyond the range of the service's f16"),
        "{e}"
    );
    assert_eq!(host_bytes(m), 0, "nothing is stored");
    // SAFETY: a live handle, destroyed once.
    unsafe { pregate_moe_destroy(m) };
}

/// One planned step of every layer through a CPU service: `x` holds `tokens x hidden` elements of
/// the service's dtype (as bytes); the outputs, as bytes of that dtype, layer by layer.
fn one_step(m: *mut PregateMoe, c: &PregateMoeConfig, x: &[u8], ids: &[i32], w: &[f32]) -> Vec<u8> {
    let (h, k) = (c.hidden as usize, c.top_k as usize);
    let tokens = ids.len() / k;
    let size = if c.dtype == 0 { 4 } else { 2 };
    let mut outs = Vec::new();
    let mut step = 0;
    // SAFETY: buffers match the extents given; `x` and `out` are u64-aligned below.
    unsafe {
        let s = pregate_moe_plan_step(
            m,
            ids.as_ptr(),
            w.as_ptr(),
            tokens as u64,
            k as u32,
            0,
            &mut step,
        );
        assert_eq!(s, 0, "{}", last_error());
        let xs: Vec<u64> = x
            .chunks(8)
            .map(|b| {
                let mut a = [0u8; 8];
                a[..b.len()].copy_from_slice(b);
                u64::from_le_bytes(a)
            })
            .collect();
        for l in 0..c.num_layers {
            let mut out = vec![0u64; (tokens * h * size).div_ceil(8)];
            let s = pregate_moe_layer_forward(
                m,
                step,
                l,
                xs.as_ptr().cast(),
                h as u64,
                ids.as_ptr(),
                w.as_ptr(),
                tokens as u64,
                out.as_mut_ptr().cast(),
                0,
            );
            assert_eq!(s, 0, "{}", last_error());
            outs.extend(
                out.iter()
                    .flat_map(|v| v.to_le_bytes())
                    .take(tokens * h * size),
            );
        }
        assert_eq!(pregate_moe_step_end(m, step, 0), 0);
    }
    outs
}

#[test]
fn a_bf16_service_computes_from_exactly_the_bf16_it_was_given() {
    let bf = PregateMoeConfig {
        dtype: 1,
        ..config(2, 4, 2, 16, 8)
    };
    let f = PregateMoeConfig { dtype: 0, ..bf };
    // Experts as bf16 (what vLLM hands over), and the same values widened to f32.
    let experts: Vec<Vec<[Vec<u16>; 3]>> = random_experts(&bf, 4)
        .into_iter()
        .map(|l| {
            l.into_iter()
                .map(|p| p.map(|v| v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()))
                .collect()
        })
        .collect();
    let widened: Experts = experts
        .iter()
        .map(|l| {
            l.iter()
                .map(|p| {
                    p.clone()
                        .map(|v| v.iter().map(|&b| bf16::from_bits(b).to_f32()).collect())
                })
                .collect()
        })
        .collect();
    let mb = create(&bf);
    set_all_as(mb, &bf, &experts, 1);
    let mf = create(&f);
    set_all(mf, &f, &widened);
    assert_eq!(finalize(mb), 0, "{}", last_error());
    assert_eq!(finalize(mf), 0, "{}", last_error());
    let tokens = 5;
    let ids: Vec<i32> = (0..tokens).flat_map(|t| [t % 4, (t + 1) % 4]).collect();
    let w: Vec<f32> = (0..tokens).flat_map(|_| [0.7, 0.3]).collect();
    let x: Vec<u16> = Lcg(8)
        .vec(tokens as usize * 16, 1.0)
        .iter()
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect();
    let xb: Vec<u8> = x.iter().flat_map(|b| b.to_le_bytes()).collect();
    let xf: Vec<u8> = x
        .iter()
        .flat_map(|&b| bf16::from_bits(b).to_f32().to_le_bytes())
        .collect();
    let got = one_step(mb, &bf, &xb, &ids, &w);
    let want: Vec<u8> = one_step(mf, &f, &xf, &ids, &w)
        .chunks_exact(4)
        .flat_map(|b| {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            bf16::from_f32(v).to_bits().to_le_bytes()
        })
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "the bf16 service's outputs differ from f32 over the same values"
    );
    assert!(got.iter().any(|&b| b != 0));
    // SAFETY: live handles, destroyed once.
    unsafe {
        pregate_moe_destroy(mb);
        pregate_moe_destroy(mf);
    }
}
