//! Host memory of the MoE service through the C ABI: fills a service of a given shape with
//! pseudo-random bf16 experts (as vLLM hands them over), finalizes it on the CPU (or a CUDA
//! device), and prints the process' resident and peak resident memory after each phase, read from
//! `/proc/self/status`. The caller's own buffer is one projection, so the figures are the
//! library's.
//!
//! ```sh
//! # Qwen3-30B-A3B's expert shape, 2 MoE layers (what `pregate make-model --preset qwen3-30b-a3b
//! # --layers 2` sizes): 128 experts, hidden 2048, expert width 768, top-8.
//! /usr/bin/time -v cargo run --release -p pregate-adapters --example load_peak -- \
//!     --layers 2 --experts 128 --hidden 2048 --inter 768 --top-k 8 --dtype bf16
//! ```

use std::ffi::c_void;

use pregate_adapters::moe::{
    pregate_moe_create, pregate_moe_destroy, pregate_moe_finalize, pregate_moe_host_bytes,
    pregate_moe_set_expert, PregateMoe, PregateMoeConfig,
};

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Prints the process' memory and, for a live handle, the host bytes the service reports.
fn report(phase: &str, m: *const PregateMoe) {
    let (rss, peak) = memory();
    let mut held = 0u64;
    // SAFETY: `m` is NULL or a live handle; `held` is writable.
    let reported = !m.is_null() && unsafe { pregate_moe_host_bytes(m, &mut held) } == 0;
    let held = if reported {
        format!(
            "   service holds {:>7.0} MiB",
            held as f64 / (1 << 20) as f64
        )
    } else {
        String::new()
    };
    println!("{phase:<26} rss {rss:>7.0} MiB   peak {peak:>7.0} MiB{held}");
}

fn last_error() -> String {
    let mut buf = vec![0u8; 1024];
    // SAFETY: `buf` has `buf.len()` writable bytes.
    let n = unsafe { pregate_adapters::pregate_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    String::from_utf8_lossy(&buf[..n.min(buf.len() - 1)]).into_owned()
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut layers, mut experts, mut hidden, mut inter, mut top_k) = (2u32, 128u32, 2048, 768, 8);
    let (mut dtype, mut device, mut slots) = (1i32, -1i32, 0u64);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let num = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--layers" => layers = num()? as u32,
            "--experts" => experts = num()? as u32,
            "--hidden" => hidden = num()? as u32,
            "--inter" => inter = num()? as u32,
            "--top-k" => top_k = num()? as u32,
            "--device" => device = value.parse().map_err(|e| format!("--device: {e}"))?,
            "--cache-slots" => slots = num()?,
            "--dtype" => {
                dtype = match value.as_str() {
                    "f32" => 0,
                    "bf16" => 1,
                    "f16" => 2,
                    _ => return Err(format!("--dtype {value}: f32, bf16 or f16")),
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let cfg = PregateMoeConfig {
        struct_size: std::mem::size_of::<PregateMoeConfig>() as u32,
        num_layers: layers,
        num_experts: experts,
        top_k,
        hidden,
        inter,
        dtype,
        device,
        cache_slots: slots,
        ..Default::default()
    };
    let elements = 3 * hidden as u64 * inter as u64;
    println!(
        "{layers} layers x {experts} experts of 3 x {hidden} x {inter}: {:.0} MiB as bf16, {:.0} \
         MiB as f32",
        (layers * experts) as f64 * elements as f64 * 2.0 / (1 << 20) as f64,
        (layers * experts) as f64 * elements as f64 * 4.0 / (1 << 20) as f64,
    );
    report("start", std::ptr::null());
    let mut m: *mut PregateMoe = std::ptr::null_mut();
    // SAFETY: a full-size config and a writable handle pointer.
    if unsafe { pregate_moe_create(&cfg, &mut m) } != 0 {
        return Err(last_error());
    }
    // One projection of bf16 bits, refilled per call: small finite values.
    let len = hidden as usize * inter as usize;
    let mut proj = vec![0u16; len];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for l in 0..layers {
        for e in 0..experts {
            for p in 0..3 {
                for v in proj.iter_mut() {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    // Exponent 0x3c..0x3f (about 0.008 .. 1), random sign and mantissa.
                    *v = ((state >> 48) as u16 & 0x81ff) | 0x3c00;
                }
                let (rows, cols) = if p == 2 {
                    (hidden, inter)
                } else {
                    (inter, hidden)
                };
                // SAFETY: `proj` holds `rows * cols` bf16 elements, rows `cols` apart.
                let s = unsafe {
                    pregate_moe_set_expert(
                        m,
                        l,
                        e,
                        p,
                        1,
                        proj.as_ptr() as *const c_void,
                        rows as u64,
                        cols as u64,
                        cols as u64,
                    )
                };
                if s != 0 {
                    return Err(last_error());
                }
            }
        }
    }
    report("after set_expert of all", m);
    // SAFETY: a live handle; NULL pools let the library allocate its own.
    let s = unsafe { pregate_moe_finalize(m, std::ptr::null_mut(), 0, std::ptr::null_mut(), 0) };
    if s != 0 {
        return Err(last_error());
    }
    report("after finalize", m);
    // SAFETY: a live handle, destroyed once.
    unsafe { pregate_moe_destroy(m) };
    report("after destroy", std::ptr::null());
    Ok(())
}
