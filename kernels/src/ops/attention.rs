//! Launchers of `cuda/attention.cu`.

use std::num::NonZeroUsize;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{check_len, mul, per_row, shape_err, strided_len, to_i32, to_i64, KernelDtype, BLOCK};
use crate::error::Result;
use crate::kernel_set::KernelSet;

/// Warps per attention block (`ATTN_WARPS` in the source).
const ATTN_THREADS: u32 = 4 * 32;
/// The largest head size the attention kernels take (`32 * ATTN_MAX_PER_LANE`).
pub const MAX_HEAD_DIM: usize = 256;

/// The shape of an attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query tokens.
    pub n_tokens: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA: query head `h` reads kv head `h / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    /// Head size, at most [`MAX_HEAD_DIM`] (lanes past it idle when it is not a multiple of 32).
    pub head_dim: usize,
    /// Elements between two tokens' rows of `q` (at least `n_heads * head_dim`).
    pub q_stride: usize,
    /// Elements between two tokens' rows of `k` and `v` (at least `n_kv_heads * head_dim`); only
    /// the contiguous prefill reads it.
    pub kv_stride: usize,
    /// The logit scale: `1 / sqrt(head_dim)` for the backbone, `1 / normalizer` for the router.
    pub scale: f32,
    /// Sliding window: the query at position `p` sees the keys `p - window < j <= p`, itself and
    /// the `window - 1` before it (Mixtral's `sliding_window`); `None`: every key up to its own.
    pub window: Option<NonZeroUsize>,
}

impl AttentionShape {
    fn validate(&self, k: &'static str) -> Result<()> {
        let d = self.head_dim;
        if d == 0 || d > MAX_HEAD_DIM {
            return Err(shape_err(
                k,
                format!("head_dim {d} must be 1..={MAX_HEAD_DIM}"),
            ));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(shape_err(
                k,
                format!(
                    "n_heads {} is not a multiple of n_kv_heads {}",
                    self.n_heads, self.n_kv_heads
                ),
            ));
        }
        if self.n_heads > 65_535 {
            return Err(shape_err(
                k,
                format!("n_heads {} exceeds the grid's 65535", self.n_heads),
            ));
        }
        if !self.scale.is_finite() {
            return Err(shape_err(k, format!("scale {} is not finite", self.scale)));
        }
        to_i32(k, "n_heads", self.n_heads)?;
        to_i32(k, "q_stride", self.q_stride)?;
        to_i32(k, "kv_stride", self.kv_stride)?;
        to_i32(k, "n_tokens", self.n_tokens)?;
        Ok(())
    }

    fn q_len(&self, k: &'static str) -> Result<usize> {
        strided_len(
            k,
            self.n_tokens,
            self.q_stride,
            mul(k, self.n_heads, self.head_dim)?,
        )
    }

    fn out_len(&self, k: &'static str) -> Result<usize> {
        mul(k, mul(k, self.n_tokens, self.n_heads)?, self.head_dim)
    }

    /// The kernels' `window` argument: 0 for none; a window past `i32::MAX` covers every key a
    /// kernel can address, so it is passed as `i32::MAX`.
    fn window_arg(&self) -> i32 {
        self.window
            .map_or(0, |w| i32::try_from(w.get()).unwrap_or(i32::MAX))
    }

    fn grid(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.n_tokens as u32, self.n_heads as u32, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The layout of one layer's paged KV cache: K and V are two buffers of
/// `[num_blocks, block_size, n_kv_heads, head_dim]`; cache slot `s = block * block_size + offset`
/// holds one token's `n_kv_heads * head_dim` values at `s * n_kv_heads * head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvLayout {
    /// Blocks in the cache.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
}

impl PagedKvLayout {
    /// Elements of one token's keys (or values).
    pub fn token_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Elements of the K (or V) buffer.
    pub fn cache_len(&self) -> usize {
        self.num_blocks * self.block_size * self.token_width()
    }

    /// The slot of position `pos` of a sequence whose block table row is `blocks`.
    pub fn slot(&self, blocks: &[i32], pos: usize) -> Option<i32> {
        let b = *blocks.get(pos / self.block_size)?;
        let s = b as i64 * self.block_size as i64 + (pos % self.block_size) as i64;
        i32::try_from(s).ok()
    }

    fn validate(&self, k: &'static str) -> Result<()> {
        if self.block_size == 0 || self.num_blocks == 0 {
            return Err(shape_err(
                k,
                "the KV cache needs at least one block of at least one token",
            ));
        }
        let slots = mul(k, self.num_blocks, self.block_size)?;
        to_i32(k, "num_blocks * block_size", slots)?;
        mul(k, slots, self.token_width())?;
        Ok(())
    }
}

impl KernelSet {
    /// Causal attention within each sequence of a packed batch, without a cache (the router's
    /// prefill, or a backbone prefill from position 0): sequence `b` owns tokens
    /// `cu_seqlens[b] .. cu_seqlens[b + 1]` (`n_seqs + 1` device entries, ascending from 0 to
    /// `n_tokens`) and each token attends to its sequence's tokens up to itself (the last
    /// `shape.window` of them, counted from the sequence's first token).
    /// `q` `[n_tokens, q_stride]`, `k`/`v` `[n_tokens, kv_stride]`, `out`
    /// `[n_tokens, n_heads * head_dim]`; softmax in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        shape: &AttentionShape,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        cu_seqlens: &impl DevicePtr<i32>,
        n_seqs: usize,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        const K: &str = "attention_prefill";
        self.check_stream(K, stream)?;
        shape.validate(K)?;
        if n_seqs == 0 && shape.n_tokens > 0 {
            return Err(shape_err(K, "tokens without a sequence"));
        }
        let kv_len = strided_len(
            K,
            shape.n_tokens,
            shape.kv_stride,
            mul(K, shape.n_kv_heads, shape.head_dim)?,
        )?;
        check_len(K, "q", q.len(), shape.q_len(K)?)?;
        check_len(K, "k", k.len(), kv_len)?;
        check_len(K, "v", v.len(), kv_len)?;
        check_len(K, "cu_seqlens", cu_seqlens.len(), n_seqs + 1)?;
        check_len(K, "out", out.len(), shape.out_len(K)?)?;
        if shape.n_tokens == 0 || shape.n_heads == 0 {
            return Ok(());
        }
        let f = self.function(&format!("attention_prefill_{}", T::SUFFIX))?;
        let (qs, kvs) = (shape.q_stride as i32, shape.kv_stride as i32);
        let win = shape.window_arg();
        let (ns, nt, nh, nkv, d) = (
            to_i32(K, "n_seqs", n_seqs)?,
            shape.n_tokens as i32,
            shape.n_heads as i32,
            shape.n_kv_heads as i32,
            shape.head_dim as i32,
        );
        let (qp, _gq) = q.device_ptr(stream);
        let (kp, _gk) = k.device_ptr(stream);
        let (vp, _gv) = v.device_ptr(stream);
        let (cp, _gc) = cu_seqlens.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&qp)
            .arg(&qs)
            .arg(&kp)
            .arg(&vp)
            .arg(&kvs)
            .arg(&op)
            .arg(&cp)
            .arg(&ns)
            .arg(&nt)
            .arg(&nh)
            .arg(&nkv)
            .arg(&d)
            .arg(&shape.scale)
            .arg(&win);
        // SAFETY: matches `attention_prefill_*`'s signature; q, k, v and out span the strided rows
        // (checked); the kernel clamps each sequence start into 0..=t, so keys stay in bounds.
        unsafe { b.launch(shape.grid()) }?;
        Ok(())
    }

    /// Attention of each query token over its sequence's paged KV cache (decode, chunked prefill,
    /// or both in one batch): token `t` reads block table row `seq_rows[t]` of `block_tables`
    /// (`[n_rows, max_blocks]`, i32 block ids) and attends to cache positions `0 ..= positions[t]`
    /// (those past `positions[t] - window` with a window), which must already be written (see [`KernelSet::kv_cache_write`]). Blocks outside
    /// `0..num_blocks` are skipped; a row outside `0..n_rows` or a negative position gives zeros.
    /// `q` `[n_tokens, q_stride]`, `out` `[n_tokens, n_heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_paged<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        shape: &AttentionShape,
        layout: &PagedKvLayout,
        q: &impl DevicePtr<T>,
        k_cache: &impl DevicePtr<T>,
        v_cache: &impl DevicePtr<T>,
        block_tables: &impl DevicePtr<i32>,
        (n_rows, max_blocks): (usize, usize),
        seq_rows: &impl DevicePtr<i32>,
        positions: &impl DevicePtr<i32>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        const K: &str = "attention_paged";
        self.check_stream(K, stream)?;
        shape.validate(K)?;
        layout.validate(K)?;
        if layout.n_kv_heads != shape.n_kv_heads || layout.head_dim != shape.head_dim {
            return Err(shape_err(
                K,
                "the cache layout's heads differ from the attention shape's",
            ));
        }
        if max_blocks == 0 {
            return Err(shape_err(K, "block tables need at least one column"));
        }
        check_len(K, "q", q.len(), shape.q_len(K)?)?;
        check_len(K, "k_cache", k_cache.len(), layout.cache_len())?;
        check_len(K, "v_cache", v_cache.len(), layout.cache_len())?;
        check_len(
            K,
            "block_tables",
            block_tables.len(),
            mul(K, n_rows, max_blocks)?,
        )?;
        check_len(K, "seq_rows", seq_rows.len(), shape.n_tokens)?;
        check_len(K, "positions", positions.len(), shape.n_tokens)?;
        check_len(K, "out", out.len(), shape.out_len(K)?)?;
        to_i32(
            K,
            "max_blocks * block_size",
            mul(K, max_blocks, layout.block_size)?,
        )?;
        if shape.n_tokens == 0 || shape.n_heads == 0 {
            return Ok(());
        }
        let f = self.function(&format!("attention_paged_{}", T::SUFFIX))?;
        let qs = shape.q_stride as i32;
        let (nr, mb) = (to_i32(K, "n_rows", n_rows)?, max_blocks as i32);
        let (nt, nh, nkv, d) = (
            shape.n_tokens as i32,
            shape.n_heads as i32,
            shape.n_kv_heads as i32,
            shape.head_dim as i32,
        );
        let (bs, nb) = (layout.block_size as i32, layout.num_blocks as i32);
        let win = shape.window_arg();
        let (qp, _gq) = q.device_ptr(stream);
        let (kp, _gk) = k_cache.device_ptr(stream);
        let (vp, _gv) = v_cache.device_ptr(stream);
        let (tp, _gt) = block_tables.device_ptr(stream);
        let (sp, _gs) = seq_rows.device_ptr(stream);
        let (pp, _gp) = positions.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&qp)
            .arg(&qs)
            .arg(&kp)
            .arg(&vp)
            .arg(&tp)
            .arg(&nr)
            .arg(&mb)
            .arg(&sp)
            .arg(&pp)
            .arg(&op);
        b.arg(&nt)
            .arg(&nh)
            .arg(&nkv)
            .arg(&d)
            .arg(&bs)
            .arg(&nb)
            .arg(&shape.scale)
            .arg(&win);
        // SAFETY: matches `attention_paged_*`'s signature; buffers checked above; the kernel skips
        // rows, positions and blocks out of range, so every cache access is inside the caches.
        unsafe { b.launch(shape.grid()) }?;
        Ok(())
    }

    /// Writes token `t`'s keys and values (`k`, `v` `[n_tokens, kv_stride]`, the first
    /// `n_kv_heads * head_dim` of each row) into cache slot `slots[t]` of `k_cache` / `v_cache`
    /// (layout `layout`); slots outside `0 .. num_blocks * block_size` are skipped (padding).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_cache_write<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        layout: &PagedKvLayout,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        kv_stride: usize,
        slots: &impl DevicePtr<i32>,
        n_tokens: usize,
        k_cache: &mut impl DevicePtrMut<T>,
        v_cache: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        const K: &str = "kv_cache_write";
        self.check_stream(K, stream)?;
        layout.validate(K)?;
        let width = layout.token_width();
        let kv_len = strided_len(K, n_tokens, kv_stride, width)?;
        check_len(K, "k", k.len(), kv_len)?;
        check_len(K, "v", v.len(), kv_len)?;
        check_len(K, "slots", slots.len(), n_tokens)?;
        check_len(K, "k_cache", k_cache.len(), layout.cache_len())?;
        check_len(K, "v_cache", v_cache.len(), layout.cache_len())?;
        let (ks, nt, w) = (
            to_i32(K, "kv_stride", kv_stride)?,
            to_i32(K, "n_tokens", n_tokens)?,
            to_i32(K, "width", width)?,
        );
        let num_slots = to_i64(K, "slots", layout.num_blocks * layout.block_size)?;
        if n_tokens == 0 || width == 0 {
            return Ok(());
        }
        let f = self.function(&format!("kv_cache_write_{}", T::SUFFIX))?;
        let (kp, _gk) = k.device_ptr(stream);
        let (vp, _gv) = v.device_ptr(stream);
        let (sp, _gs) = slots.device_ptr(stream);
        let (kcp, _gkc) = k_cache.device_ptr_mut(stream);
        let (vcp, _gvc) = v_cache.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&kp)
            .arg(&vp)
            .arg(&ks)
            .arg(&kcp)
            .arg(&vcp)
            .arg(&sp)
            .arg(&nt)
            .arg(&w)
            .arg(&num_slots);
        // SAFETY: matches `kv_cache_write_*`'s signature; sources span the strided rows and the
        // caches num_slots * width elements (checked); out-of-range slots are skipped.
        unsafe { b.launch(per_row(n_tokens, BLOCK)) }?;
        Ok(())
    }
}
