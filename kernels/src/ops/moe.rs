//! Launchers of `cuda/moe.cu`: routing, and the permutation around the expert FFN.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{check_len, grid_stride, mul, per_row, shape_err, to_i32, KernelDtype, BLOCK};
use crate::error::Result;
use crate::kernel_set::KernelSet;

/// The most experts per layer the permutation handles (`MOE_MAX_EXPERTS`).
pub const MAX_EXPERTS: usize = 256;
/// The most experts per token.
pub const MAX_TOP_K: usize = 8;
const PERMUTE_THREADS: u32 = 1024;

/// Device buffers of a token permutation by expert, for up to `max_pairs` (token, choice) pairs.
///
/// After [`KernelSet::moe_permute`] over `n_pairs` pairs (pair `p = t * k + j` is token `t`'s
/// `j`-th expert): `counts[e]` pairs go to expert `e`; `offsets[e]` (`n_experts + 1` entries) is the
/// exclusive prefix sum, so expert `e`'s rows of the permuted matrix are
/// `offsets[e] .. offsets[e + 1]`; `sorted_pair[r]` is the pair at permuted row `r` (pairs of one
/// expert in ascending pair order); `pair_pos[p]` is pair `p`'s row, or -1 when its expert id was
/// out of range (such pairs are dropped).
#[derive(Debug)]
pub struct MoePermutation {
    /// Pairs per expert, `[n_experts]`.
    pub counts: CudaSlice<i32>,
    /// Exclusive prefix sum of `counts`, `[n_experts + 1]`.
    pub offsets: CudaSlice<i32>,
    /// Permuted row -> pair index, `[max_pairs]`.
    pub sorted_pair: CudaSlice<i32>,
    /// Pair index -> permuted row (or -1), `[max_pairs]`.
    pub pair_pos: CudaSlice<i32>,
    n_experts: usize,
}

impl MoePermutation {
    /// Allocates buffers for up to `max_pairs` pairs over `n_experts` experts.
    pub fn new(
        stream: &std::sync::Arc<CudaStream>,
        max_pairs: usize,
        n_experts: usize,
    ) -> Result<Self> {
        if n_experts == 0 || n_experts > MAX_EXPERTS {
            return Err(shape_err(
                "moe_permute",
                format!("n_experts {n_experts} must be 1..={MAX_EXPERTS}"),
            ));
        }
        Ok(MoePermutation {
            counts: stream.alloc_zeros(n_experts)?,
            offsets: stream.alloc_zeros(n_experts + 1)?,
            sorted_pair: stream.alloc_zeros(max_pairs.max(1))?,
            pair_pos: stream.alloc_zeros(max_pairs.max(1))?,
            n_experts,
        })
    }

    /// Experts per layer.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// The most pairs the buffers hold.
    pub fn max_pairs(&self) -> usize {
        self.pair_pos.len()
    }
}

/// The host's view of a permutation: the same counts and offsets the device computes, derived
/// from the expert ids the host already knows (the route plan), so GEMM sizes need no device read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlan {
    /// Pairs per expert.
    pub counts: Vec<usize>,
    /// Exclusive prefix sum, `n_experts + 1` entries.
    pub offsets: Vec<usize>,
}

impl ExpertPlan {
    /// The plan of the pairs `ids` (`ids[t * k + j]`) over `n_experts`; out-of-range ids are dropped,
    /// as on the device.
    pub fn from_ids(ids: &[i32], n_experts: usize) -> Self {
        let mut counts = vec![0usize; n_experts];
        for &e in ids {
            if e >= 0 && (e as usize) < n_experts {
                counts[e as usize] += 1;
            }
        }
        let mut offsets = Vec::with_capacity(n_experts + 1);
        let mut run = 0;
        offsets.push(0);
        for c in &counts {
            run += c;
            offsets.push(run);
        }
        ExpertPlan { counts, offsets }
    }

    /// Rows of the permuted matrix.
    pub fn total(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// The experts with at least one pair, with their row ranges.
    pub fn active(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(e, _)| (e, self.offsets[e]..self.offsets[e + 1]))
    }
}

impl KernelSet {
    /// Router top-k: for each token, the `k` largest of `logits[t, 0 .. n_experts]` (f32; ties:
    /// lower index first; NaN as -inf) in descending order into `ids[t, :]`, and
    /// `weights[t, :]` = softmax over those `k` logits (k = 1: exactly 1). `ids`, `weights`
    /// `[n_tokens, k]`.
    #[allow(clippy::too_many_arguments)]
    pub fn topk_softmax(
        &self,
        stream: &CudaStream,
        logits: &impl DevicePtr<f32>,
        n_tokens: usize,
        n_experts: usize,
        k: usize,
        ids: &mut impl DevicePtrMut<i32>,
        weights: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        const K: &str = "topk_softmax";
        self.check_stream(K, stream)?;
        if k == 0 || k > MAX_TOP_K || k > n_experts {
            return Err(shape_err(
                K,
                format!("k {k} must be 1..={MAX_TOP_K} and <= n_experts {n_experts}"),
            ));
        }
        check_len(K, "logits", logits.len(), mul(K, n_tokens, n_experts)?)?;
        check_len(K, "ids", ids.len(), mul(K, n_tokens, k)?)?;
        check_len(K, "weights", weights.len(), mul(K, n_tokens, k)?)?;
        let (nt, ne, kk) = (
            to_i32(K, "n_tokens", n_tokens)?,
            to_i32(K, "n_experts", n_experts)?,
            k as i32,
        );
        mul(K, n_tokens, n_experts).and_then(|n| to_i32(K, "n_tokens * n_experts", n))?;
        if n_tokens == 0 {
            return Ok(());
        }
        let f = self.function("topk_softmax")?;
        let (lp, _gl) = logits.device_ptr(stream);
        let (ip, _gi) = ids.device_ptr_mut(stream);
        let (wp, _gw) = weights.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&lp).arg(&nt).arg(&ne).arg(&kk).arg(&ip).arg(&wp);
        // SAFETY: matches `topk_softmax(const float*, int, int, int, int*, float*)`; sizes checked.
        unsafe { b.launch(grid_stride(n_tokens)) }?;
        Ok(())
    }

    /// Sorts `n_pairs` pairs (expert ids `ids[p]`, i32) by expert into `perm` (see
    /// [`MoePermutation`]). One block; deterministic.
    pub fn moe_permute(
        &self,
        stream: &CudaStream,
        ids: &impl DevicePtr<i32>,
        n_pairs: usize,
        perm: &mut MoePermutation,
    ) -> Result<()> {
        const K: &str = "moe_permute";
        self.check_stream(K, stream)?;
        check_len(K, "ids", ids.len(), n_pairs)?;
        check_len(K, "perm", perm.max_pairs(), n_pairs)?;
        let (np, ne) = (to_i32(K, "n_pairs", n_pairs)?, perm.n_experts as i32);
        let f = self.function("moe_permute")?;
        let (ip, _gi) = ids.device_ptr(stream);
        let (cp, _gc) = perm.counts.device_ptr_mut(stream);
        let (op, _go) = perm.offsets.device_ptr_mut(stream);
        let (sp, _gs) = perm.sorted_pair.device_ptr_mut(stream);
        let (pp, _gp) = perm.pair_pos.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&ip)
            .arg(&np)
            .arg(&ne)
            .arg(&cp)
            .arg(&op)
            .arg(&sp)
            .arg(&pp);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (PERMUTE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `moe_permute`'s signature; counts/offsets hold n_experts(+1) <= 256
        // entries (the kernel's static shared arrays), sorted_pair/pair_pos n_pairs (checked).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Gathers the tokens into expert order: `x_perm[r, :] = x[sorted_pair[r] / k, :]` for the
    /// `perm.offsets[n_experts]` permuted rows (rows past them untouched). `x` `[n_tokens, hidden]`,
    /// `x_perm` `[n_tokens * k, hidden]`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gather<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<T>,
        perm: &MoePermutation,
        n_tokens: usize,
        k: usize,
        hidden: usize,
        x_perm: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        const K: &str = "moe_gather";
        self.check_stream(K, stream)?;
        if k == 0 || k > MAX_TOP_K {
            return Err(shape_err(K, format!("k {k} must be 1..={MAX_TOP_K}")));
        }
        let n_pairs = mul(K, n_tokens, k)?;
        check_len(K, "perm", perm.max_pairs(), n_pairs)?;
        check_len(K, "x", x.len(), mul(K, n_tokens, hidden)?)?;
        check_len(K, "x_perm", x_perm.len(), mul(K, n_pairs, hidden)?)?;
        let (np, kk, h, ne) = (
            to_i32(K, "n_pairs", n_pairs)?,
            k as i32,
            to_i32(K, "hidden", hidden)?,
            perm.n_experts as i32,
        );
        if n_pairs == 0 || hidden == 0 {
            return Ok(());
        }
        let f = self.function(&format!("moe_gather_{}", T::SUFFIX))?;
        let (xp, _gx) = x.device_ptr(stream);
        let (sp, _gs) = perm.sorted_pair.device_ptr(stream);
        let (op, _go) = perm.offsets.device_ptr(stream);
        let (pp, _gp) = x_perm.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&xp)
            .arg(&sp)
            .arg(&op)
            .arg(&ne)
            .arg(&np)
            .arg(&kk)
            .arg(&h)
            .arg(&pp);
        // SAFETY: matches `moe_gather_*`'s signature; the kernel bounds rows by n_pairs and skips
        // pairs outside 0..n_pairs, so x (n_pairs / k rows) and x_perm (n_pairs rows) stay in bounds.
        unsafe { b.launch(per_row(n_pairs.min(1 << 16), BLOCK)) }?;
        Ok(())
    }

    /// Un-permute with the weighted combine, in token order (deterministic):
    /// `out[t, :] = (accumulate ? out[t, :] : 0) + sum_j weights[t * k + j] * y_perm[pair_pos[t * k + j], :]`,
    /// summed in f32 and rounded once; pairs with `pair_pos` -1 are skipped. `y_perm`
    /// `[n_tokens * k, hidden]`, `weights` f32 `[n_tokens, k]`, `out` `[n_tokens, hidden]`.
    /// With `accumulate` this is also the residual add.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine<T: KernelDtype>(
        &self,
        stream: &CudaStream,
        y_perm: &impl DevicePtr<T>,
        perm: &MoePermutation,
        weights: &impl DevicePtr<f32>,
        n_tokens: usize,
        k: usize,
        hidden: usize,
        out: &mut impl DevicePtrMut<T>,
        accumulate: bool,
    ) -> Result<()> {
        const K: &str = "moe_combine";
        self.check_stream(K, stream)?;
        if k == 0 || k > MAX_TOP_K {
            return Err(shape_err(K, format!("k {k} must be 1..={MAX_TOP_K}")));
        }
        let n_pairs = mul(K, n_tokens, k)?;
        check_len(K, "perm", perm.max_pairs(), n_pairs)?;
        check_len(K, "y_perm", y_perm.len(), mul(K, n_pairs, hidden)?)?;
        check_len(K, "weights", weights.len(), n_pairs)?;
        check_len(K, "out", out.len(), mul(K, n_tokens, hidden)?)?;
        let (nt, kk, h, nrows, acc) = (
            to_i32(K, "n_tokens", n_tokens)?,
            k as i32,
            to_i32(K, "hidden", hidden)?,
            to_i32(K, "n_pairs", n_pairs)?,
            accumulate as i32,
        );
        if n_tokens == 0 || hidden == 0 {
            return Ok(());
        }
        let f = self.function(&format!("moe_combine_{}", T::SUFFIX))?;
        let (yp, _gy) = y_perm.device_ptr(stream);
        let (pp, _gp) = perm.pair_pos.device_ptr(stream);
        let (wp, _gw) = weights.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let mut b = stream.launch_builder(f);
        b.arg(&yp)
            .arg(&pp)
            .arg(&wp)
            .arg(&nt)
            .arg(&kk)
            .arg(&h)
            .arg(&nrows)
            .arg(&op)
            .arg(&acc);
        // SAFETY: matches `moe_combine_*`'s signature; the kernel reads only rows 0..n_pairs of
        // y_perm (checked length) and writes n_tokens rows of out.
        unsafe { b.launch(per_row(n_tokens, BLOCK)) }?;
        Ok(())
    }
}
