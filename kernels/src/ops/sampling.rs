//! Launcher of `cuda/sampling.cu`.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, PushKernelArg};

use super::{check_len, mul, per_row, to_i32};
use crate::error::Result;
use crate::kernel_set::KernelSet;

const SAMPLE_THREADS: u32 = 1024;

/// The uniform draw of a sampling row: `(splitmix64(seed) >> 40) * 2^-24`, in `[0, 1)`; the same
/// function the kernel uses, so a CPU reference can reproduce its choices.
pub fn sampling_uniform(seed: u64) -> f32 {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 40) as f32 * (1.0 / 16_777_216.0)
}

impl KernelSet {
    /// Samples one token per row of `logits` (f32 `[rows, vocab]`) into `out[b]`, with per-row
    /// device parameters `temperature`, `top_k`, `top_p`, `seeds` (`[rows]` each):
    /// temperature <= 0 is greedy argmax (lowest index on ties); otherwise softmax of
    /// `logits / temperature`, restricted to the logits >= the `top_k`-th largest (`top_k` in
    /// 1..vocab, else no restriction), then to the nucleus: probabilities >= the largest threshold
    /// whose kept mass is >= `top_p` of the top-k mass (`top_p` >= 1: no restriction, <= 0: greedy; ties at a
    /// threshold stay), then inverse-CDF in index order with `u = sampling_uniform(seeds[b])`.
    /// The caller derives each step's seed (for example from the request seed and position).
    #[allow(clippy::too_many_arguments)]
    pub fn sample_tokens(
        &self,
        stream: &CudaStream,
        logits: &impl DevicePtr<f32>,
        rows: usize,
        vocab: usize,
        temperature: &impl DevicePtr<f32>,
        top_k: &impl DevicePtr<i32>,
        top_p: &impl DevicePtr<f32>,
        seeds: &impl DevicePtr<u64>,
        out: &mut impl DevicePtrMut<u32>,
    ) -> Result<()> {
        const K: &str = "sample_tokens";
        self.check_stream(K, stream)?;
        check_len(K, "logits", logits.len(), mul(K, rows, vocab)?)?;
        for (what, len) in [
            ("temperature", temperature.len()),
            ("top_k", top_k.len()),
            ("top_p", top_p.len()),
            ("seeds", seeds.len()),
            ("out", out.len()),
        ] {
            check_len(K, what, len, rows)?;
        }
        let (r, v) = (to_i32(K, "rows", rows)?, to_i32(K, "vocab", vocab)?);
        if vocab >= 1 << 24 {
            return Err(super::shape_err(K, "vocab must be below 2^24"));
        }
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        let f = self.function("sample_tokens")?;
        let (lp, _gl) = logits.device_ptr(stream);
        let (tp, _gt) = temperature.device_ptr(stream);
        let (kp, _gk) = top_k.device_ptr(stream);
        let (pp, _gp) = top_p.device_ptr(stream);
        let (sp, _gs) = seeds.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&lp)
            .arg(&r)
            .arg(&v)
            .arg(&tp)
            .arg(&kp)
            .arg(&pp)
            .arg(&sp)
            .arg(&op);
        // SAFETY: matches `sample_tokens`'s signature; logits hold rows * vocab and every
        // per-row array rows elements (checked); the block size is the kernel's SAMPLE_THREADS.
        unsafe { b.launch(per_row(rows, SAMPLE_THREADS)) }?;
        Ok(())
    }
}
