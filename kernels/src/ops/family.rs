//! Launchers of `cuda/family.cu`: the Hugging Face MoE families' QK RMSNorm, clip_qkv, in-model
//! gate and gated shared expert.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::moe::{MAX_EXPERTS, MAX_TOP_K};
use super::BLOCK;
use super::{check_len, grid_stride, mul, shape_err, strided_len, to_i32, to_i64, KernelDtype};
use crate::error::Result;
use crate::kernel_set::KernelSet;

impl KernelSet {
    /// RMSNorm in place over groups of `width` values: for token `t < n_tokens` and group
    /// `g < groups`, `x[t * row_stride + g * width ..][..width]` is normalised (sums in f32) and
    /// multiplied by `w[..width]`. Per-head QK norm: `groups` = heads, `width` = head_dim; over
    /// the full width: one group of heads * head_dim. A row stride above `groups * width` works
    /// on the q or k part of a fused qkv buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_groups<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        x: &mut impl DevicePtrMut<T>,
        w: &impl DevicePtr<T>,
        n_tokens: usize,
        row_stride: usize,
        groups: usize,
        width: usize,
        eps: f32,
    ) -> Result<()> {
        const K: &str = "rmsnorm_groups";
        self.check_stream(K, stream)?;
        let used = mul(K, groups, width)?;
        check_len(K, "x", x.len(), strided_len(K, n_tokens, row_stride, used)?)?;
        check_len(K, "w", w.len(), width)?;
        if eps.is_nan() || eps < 0.0 {
            return Err(shape_err(K, format!("eps {eps} must be >= 0")));
        }
        let blocks = mul(K, n_tokens, groups)?;
        if blocks == 0 || width == 0 {
            return Ok(());
        }
        let blocks_u32 = u32::try_from(blocks)
            .map_err(|_| shape_err(K, format!("{blocks} token groups exceed a grid")))?;
        let (nt, rs, g, wd) = (
            to_i32(K, "n_tokens", n_tokens)?,
            to_i32(K, "row_stride", row_stride)?,
            to_i32(K, "groups", groups)?,
            to_i32(K, "width", width)?,
        );
        let f = self.function(&format!("rmsnorm_groups_{}", T::SUFFIX))?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let (wp, _gw) = w.device_ptr(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&xp)
            .arg(&wp)
            .arg(&nt)
            .arg(&rs)
            .arg(&g)
            .arg(&wd)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (blocks_u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `rmsnorm_groups_*(T*, const T*, int, int, int, int, float)`; x spans the
        // strided rows and w `width` values, both checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `x[i] = clamp(x[i], -c, c)` in place for `i < n` (OLMoE's `clip_qkv`); `c` finite, > 0.
    pub fn clamp<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        x: &mut impl DevicePtrMut<T>,
        n: usize,
        c: f32,
    ) -> Result<()> {
        const K: &str = "clamp";
        self.check_stream(K, stream)?;
        check_len(K, "x", x.len(), n)?;
        if !(c.is_finite() && c > 0.0) {
            return Err(shape_err(K, format!("bound {c} must be finite and > 0")));
        }
        let n64 = to_i64(K, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function(&format!("clamp_{}", T::SUFFIX))?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&xp).arg(&n64).arg(&c);
        // SAFETY: matches `clamp_*(T*, long long, float)`; x holds n elements.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// The in-model gate of the Hugging Face MoE families: per token, softmax over all
    /// `n_experts` of `logits[t, :]` (f32), the `k` most probable experts, descending (ties: the
    /// lower index first), into `ids[t, :]` and their probabilities into `weights[t, :]`, divided
    /// by their sum when `renormalize`. A row with a non-finite logit routes to experts `0..k`
    /// with weight 0, as the host gate does. `ids`, `weights` `[n_tokens, k]`.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_softmax_topk(
        &self,
        stream: &CudaStream,
        logits: &impl DevicePtr<f32>,
        n_tokens: usize,
        n_experts: usize,
        k: usize,
        renormalize: bool,
        ids: &mut impl DevicePtrMut<i32>,
        weights: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        const K: &str = "gate_softmax_topk";
        self.check_stream(K, stream)?;
        if k == 0 || k > MAX_TOP_K || k > n_experts || n_experts > MAX_EXPERTS {
            return Err(shape_err(
                K,
                format!(
                    "k {k} must be 1..={MAX_TOP_K} and <= n_experts {n_experts} \
                     (at most {MAX_EXPERTS})"
                ),
            ));
        }
        let n = mul(K, n_tokens, n_experts)?;
        check_len(K, "logits", logits.len(), n)?;
        check_len(K, "ids", ids.len(), mul(K, n_tokens, k)?)?;
        check_len(K, "weights", weights.len(), mul(K, n_tokens, k)?)?;
        to_i32(K, "n_tokens * n_experts", n)?;
        if n_tokens == 0 {
            return Ok(());
        }
        let (nt, ne, kk, rn) = (
            n_tokens as i32,
            n_experts as i32,
            k as i32,
            renormalize as i32,
        );
        let f = self.function("gate_softmax_topk")?;
        let (lp, _gl) = logits.device_ptr(stream);
        let (ip, _gi) = ids.device_ptr_mut(stream);
        let (wp, _gw) = weights.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&lp)
            .arg(&nt)
            .arg(&ne)
            .arg(&kk)
            .arg(&rn)
            .arg(&ip)
            .arg(&wp);
        // SAFETY: matches `gate_softmax_topk(const float*, int, int, int, int, int*, float*)`;
        // sizes checked above, k within the kernel's fixed arrays.
        unsafe { b.launch(grid_stride(n_tokens)) }?;
        Ok(())
    }

    /// `out[r, c] += sigmoid(gate[r]) * y[r, c]` for `[rows, cols]` matrices and `gate` `[rows]`
    /// (f32): Qwen2-MoE's shared expert output `y`, scaled by `sigmoid(shared_expert_gate . x)`.
    pub fn sigmoid_scale_add<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        out: &mut impl DevicePtrMut<T>,
        y: &impl DevicePtr<T>,
        gate: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        const K: &str = "sigmoid_scale_add";
        self.check_stream(K, stream)?;
        let n = mul(K, rows, cols)?;
        check_len(K, "out", out.len(), n)?;
        check_len(K, "y", y.len(), n)?;
        check_len(K, "gate", gate.len(), rows)?;
        let (r, c) = (to_i64(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        to_i64(K, "rows * cols", n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function(&format!("sigmoid_scale_add_{}", T::SUFFIX))?;
        let (op, _go) = out.device_ptr_mut(stream);
        let (yp, _gy) = y.device_ptr(stream);
        let (gp, _gg) = gate.device_ptr(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&op).arg(&yp).arg(&gp).arg(&r).arg(&c);
        // SAFETY: matches `sigmoid_scale_add_*(T*, const T*, const float*, long long, int)`; out
        // and y hold rows * cols elements, gate rows.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }
}
