//! Launchers of `cuda/norm.cu`.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{check_len, mul, per_row, shape_err, strided_len, to_i32, KernelDtype, BLOCK};
use crate::error::Result;
use crate::kernel_set::KernelSet;

impl KernelSet {
    /// RMSNorm of each row: `out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w`, sums in f32;
    /// `x`, `out` `[rows, cols]`, `w` `[cols]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        const K: &str = "rmsnorm";
        self.check_stream(K, stream)?;
        let n = mul(K, rows, cols)?;
        check_len(K, "x", x.len(), n)?;
        check_len(K, "w", w.len(), cols)?;
        check_len(K, "out", out.len(), n)?;
        let (r, c) = (to_i32(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        if eps.is_nan() || eps < 0.0 {
            return Err(shape_err(K, format!("eps {eps} must be >= 0")));
        }
        if n == 0 {
            return Ok(());
        }
        let f = self.function(&format!("rmsnorm_{}", T::SUFFIX))?;
        let (xp, _gx) = x.device_ptr(stream);
        let (wp, _gw) = w.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&xp).arg(&wp).arg(&op).arg(&r).arg(&c).arg(&eps);
        // SAFETY: matches `rmsnorm_*(const T*, const T*, T*, int, int, float)`; sizes checked above.
        unsafe { b.launch(per_row(rows, BLOCK)) }?;
        Ok(())
    }

    /// RoPE ("rotate half"), in place: for token `t < n_tokens` at position `positions[t]`, each
    /// head `h < n_heads` at `x[t * row_stride + h * head_dim ..]` is rotated by the angles
    /// `pos * theta^(-2i / head_dim)` applied to the pairs `(i, i + head_dim / 2)`. A row stride
    /// above `n_heads * head_dim` rotates the q or k part of a fused qkv buffer in place.
    #[allow(clippy::too_many_arguments)]
    pub fn rope<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        x: &mut impl DevicePtrMut<T>,
        positions: &impl DevicePtr<i32>,
        n_tokens: usize,
        row_stride: usize,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        const K: &str = "rope";
        self.check_stream(K, stream)?;
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 1024 {
            return Err(shape_err(
                K,
                format!("head_dim {head_dim} must be even, 2..=1024"),
            ));
        }
        if theta.is_nan() || theta <= 0.0 {
            return Err(shape_err(K, format!("theta {theta} must be > 0")));
        }
        let width = mul(K, n_heads, head_dim)?;
        check_len(
            K,
            "x",
            x.len(),
            strided_len(K, n_tokens, row_stride, width)?,
        )?;
        check_len(K, "positions", positions.len(), n_tokens)?;
        let (n, s, h, d) = (
            to_i32(K, "n_tokens", n_tokens)?,
            to_i32(K, "row_stride", row_stride)?,
            to_i32(K, "n_heads", n_heads)?,
            to_i32(K, "head_dim", head_dim)?,
        );
        if n_tokens == 0 || n_heads == 0 {
            return Ok(());
        }
        let f = self.function(&format!("rope_{}", T::SUFFIX))?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let (pp, _gp) = positions.device_ptr(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&xp)
            .arg(&pp)
            .arg(&n)
            .arg(&s)
            .arg(&h)
            .arg(&d)
            .arg(&theta);
        let cfg = LaunchConfig {
            shared_mem_bytes: (head_dim * std::mem::size_of::<f32>()) as u32,
            ..per_row(n_tokens, BLOCK)
        };
        // SAFETY: matches `rope_*(T*, const int*, int, int, int, int, float)`; x spans the strided
        // rows (checked), the dynamic shared memory holds head_dim floats as the kernel needs.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
