//! Launchers of `cuda/elementwise.cu`.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

use super::{check_len, grid_stride, mul, per_row, to_i32, to_i64, KernelDtype, BLOCK};
use crate::error::Result;
use crate::kernel_set::KernelSet;

impl KernelSet {
    /// Embedding gather: `out[t, :] = table[ids[t], :]` for `t < n_tokens`; `table` is
    /// `[vocab, hidden]`, `out` `[n_tokens, hidden]`. An id `>= vocab` writes a zero row.
    #[allow(clippy::too_many_arguments)]
    pub fn embedding<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        ids: &impl DevicePtr<u32>,
        table: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        n_tokens: usize,
        hidden: usize,
        vocab: usize,
    ) -> Result<()> {
        const K: &str = "embedding";
        self.check_stream(K, stream)?;
        check_len(K, "ids", ids.len(), n_tokens)?;
        check_len(K, "table", table.len(), mul(K, vocab, hidden)?)?;
        check_len(K, "out", out.len(), mul(K, n_tokens, hidden)?)?;
        let (n, h, v) = (
            to_i32(K, "n_tokens", n_tokens)?,
            to_i32(K, "hidden", hidden)?,
            to_i32(K, "vocab", vocab)?,
        );
        if n_tokens == 0 || hidden == 0 {
            return Ok(());
        }
        let f = self.function(&format!("embedding_{}", T::SUFFIX))?;
        let (ip, _gi) = ids.device_ptr(stream);
        let (tp, _gt) = table.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&ip).arg(&tp).arg(&op).arg(&n).arg(&h).arg(&v);
        // SAFETY: the argument list matches `embedding_*`'s signature; `table` holds vocab * hidden
        // and `out` n_tokens * hidden elements (checked above), and ids >= vocab are not read.
        unsafe { b.launch(per_row(n_tokens, BLOCK)) }?;
        Ok(())
    }

    /// `out[i] = bf16(x[i])` (round to nearest even) for `i < n`.
    pub fn cast_f32_to_bf16(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<f32>,
        out: &mut impl DevicePtrMut<bf16>,
        n: usize,
    ) -> Result<()> {
        self.cast("cast_f32_to_bf16", stream, x, out, n)
    }

    /// `out[i] = f32(x[i])` for `i < n`.
    pub fn cast_bf16_to_f32(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<f32>,
        n: usize,
    ) -> Result<()> {
        self.cast("cast_bf16_to_f32", stream, x, out, n)
    }

    fn cast<A, B>(
        &self,
        name: &'static str,
        stream: &CudaStream,
        x: &impl DevicePtr<A>,
        out: &mut impl DevicePtrMut<B>,
        n: usize,
    ) -> Result<()> {
        self.check_stream(name, stream)?;
        check_len(name, "x", x.len(), n)?;
        check_len(name, "out", out.len(), n)?;
        let n64 = to_i64(name, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function(name)?;
        let (xp, _gx) = x.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&xp).arg(&op).arg(&n64);
        // SAFETY: matches the cast kernels' (const*, *, long long) signature; both buffers hold n.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// Residual add: `x[i] += y[i]` for `i < n` (in f32, rounded once).
    pub fn add<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        x: &mut impl DevicePtrMut<T>,
        y: &impl DevicePtr<T>,
        n: usize,
    ) -> Result<()> {
        const K: &str = "add";
        self.check_stream(K, stream)?;
        check_len(K, "x", x.len(), n)?;
        check_len(K, "y", y.len(), n)?;
        let n64 = to_i64(K, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function(&format!("add_{}", T::SUFFIX))?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let (yp, _gy) = y.device_ptr(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&xp).arg(&yp).arg(&n64);
        // SAFETY: matches `add_*(T*, const T*, long long)`; both buffers hold n elements.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// `x[r, c] += bias[c]` for a `[rows, cols]` matrix.
    pub fn bias_add<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        x: &mut impl DevicePtrMut<T>,
        bias: &impl DevicePtr<T>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        const K: &str = "bias_add";
        self.check_stream(K, stream)?;
        let n = mul(K, rows, cols)?;
        check_len(K, "x", x.len(), n)?;
        check_len(K, "bias", bias.len(), cols)?;
        let (r, c) = (to_i64(K, "rows", rows)?, to_i32(K, "cols", cols)?);
        if n == 0 {
            return Ok(());
        }
        let f = self.function(&format!("bias_add_{}", T::SUFFIX))?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let (bp, _gb) = bias.device_ptr(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&xp).arg(&bp).arg(&r).arg(&c);
        // SAFETY: matches `bias_add_*(T*, const T*, long long, int)`; x holds rows * cols, bias cols.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// `x[i] = silu(x[i]) = x / (1 + exp(-x))`, in place, for `i < n`.
    pub fn silu<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        x: &mut impl DevicePtrMut<T>,
        n: usize,
    ) -> Result<()> {
        const K: &str = "silu";
        self.check_stream(K, stream)?;
        check_len(K, "x", x.len(), n)?;
        let n64 = to_i64(K, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function(&format!("silu_{}", T::SUFFIX))?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&xp).arg(&n64);
        // SAFETY: matches `silu_*(T*, long long)`; x holds n elements.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// Fused SiLU-and-mul: `out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]`, with
    /// `gate_up` `[rows, 2 * inter]` (gate columns first, then up) and `out` `[rows, inter]`.
    pub fn silu_mul<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        gate_up: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        const K: &str = "silu_mul";
        self.check_stream(K, stream)?;
        let n = mul(K, rows, inter)?;
        check_len(K, "gate_up", gate_up.len(), mul(K, n, 2)?)?;
        check_len(K, "out", out.len(), n)?;
        let (r, i) = (to_i64(K, "rows", rows)?, to_i32(K, "inter", inter)?);
        to_i32(K, "2 * inter", inter * 2)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function(&format!("silu_mul_{}", T::SUFFIX))?;
        let (gp, _gg) = gate_up.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&gp).arg(&op).arg(&r).arg(&i);
        // SAFETY: matches `silu_mul_*(const T*, T*, long long, int)`; gate_up holds rows * 2 * inter
        // and out rows * inter elements.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }
}
