//! GEMMs through cuBLAS: dense linear layers and the grouped expert FFN.
//!
//! Row-major throughout: a linear layer is `y[n, out] = x[n, in] @ w[out, in]^T` (PyTorch's weight
//! layout), run as the column-major GEMM `y^T = w x^T` (`transa = T`). Inputs f32 or bf16, f32
//! accumulation (`CUBLAS_COMPUTE_32F`; no TF32, so the f32 path is exact to rounding), outputs of
//! either type.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::error::{catch, KernelError, Result};
use crate::kernel_set::KernelSet;
use crate::ops::moe::ExpertPlan;
use crate::ops::skinny::{SkinnyEntry, GROUPED_FFN_MAX_ROWS};
use crate::ops::{check_len, mul, shape_err, to_i32, KernelDtype};

/// One expert's weights on the device: `gate_up` `[2 * inter, hidden]` (the gate projection's rows,
/// then the up projection's) and `down` `[hidden, inter]`.
#[derive(Clone, Copy)]
pub struct ExpertWeights<'a, T> {
    /// Gate rows then up rows, `[2 * inter, hidden]`.
    pub gate_up: &'a dyn DevicePtr<T>,
    /// The down projection, `[hidden, inter]`.
    pub down: &'a dyn DevicePtr<T>,
}

impl<T> std::fmt::Debug for ExpertWeights<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertWeights")
            .field("gate_up_len", &self.gate_up.len())
            .field("down_len", &self.down.len())
            .finish()
    }
}

/// The widths of an expert FFN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FfnDims {
    /// Model width `H`.
    pub hidden: usize,
    /// Expert intermediate width `I_e`.
    pub inter: usize,
}

/// A cuBLAS handle bound to one stream; every GEMM and kernel it issues runs on that stream.
#[derive(Debug)]
pub struct Blas {
    handle: CudaBlas,
    stream: Arc<CudaStream>,
    grouped: bool,
}

/// A row-major `y[n, m] = x[n, k] @ w[m, k]^T` on raw device addresses.
struct GemmNt {
    n: usize,
    m: usize,
    k: usize,
    x: u64,
    w: u64,
    y: u64,
}

impl Blas {
    /// Creates a handle on `stream`; an error (never a panic) when cuBLAS cannot be loaded.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: `is_culib_present` only tries to open the library by its candidate names.
        let present = catch("cublas probe", || unsafe {
            cudarc::cublas::sys::is_culib_present()
        })?;
        if !present {
            return Err(KernelError::CublasUnavailable(
                "libcublas.so.13 not found on the loader path".into(),
            ));
        }
        let handle = catch("cublasCreate", || CudaBlas::new(stream.clone()))??;
        let grouped = true;
        Ok(Blas {
            handle,
            stream: stream.clone(),
            grouped,
        })
    }

    /// Enables or disables the grouped skinny kernels in [`Blas::expert_ffn`] (on by default;
    /// a host turns them off with its options, e.g. `PREGATE_EXPERT_FFN=cublas`). Off: cuBLAS
    /// GEMMs for every plan.
    pub fn set_grouped_ffn(&mut self, on: bool) {
        self.grouped = on;
    }

    /// Whether [`Blas::expert_ffn`] runs `plan` with the grouped skinny kernels (two launches
    /// for all experts, weights read once) rather than two cuBLAS GEMMs per expert: bf16, enabled,
    /// at most [`GROUPED_FFN_MAX_ROWS`] rows per expert, widths multiples of 8 (and, checked at
    /// the call, 16-byte aligned buffers).
    pub fn grouped_ffn_applies<T: KernelDtype>(&self, plan: &ExpertPlan, dims: FfnDims) -> bool {
        self.grouped
            && T::SUFFIX == "bf16"
            && dims.hidden % 8 == 0
            && dims.inter % 8 == 0
            && plan.counts.iter().any(|&c| c > 0)
            && plan.counts.iter().all(|&c| c <= GROUPED_FFN_MAX_ROWS)
    }

    /// Issues the handle's later work on `stream`: another stream of this context, or a stream
    /// borrowed from a host framework (torch's current stream, wrapped with
    /// `CudaContext::wrap_borrowed_stream`). Work already issued stays ordered on the old stream;
    /// ordering between the two is the caller's (events), as for any two streams.
    pub fn set_stream(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        if self.stream.cu_stream() == stream.cu_stream() {
            return Ok(());
        }
        // SAFETY: `stream` belongs to the context the handle was created in (a borrowed stream is
        // the caller's to keep alive while work is issued on it); cuBLAS only records the handle.
        catch("cublasSetStream", || unsafe {
            self.handle.set_stream(stream.clone())
        })??;
        self.stream = stream.clone();
        Ok(())
    }

    /// The stream the handle issues work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn gemm_nt<A: KernelDtype, C: KernelDtype>(&self, op: &'static str, g: GemmNt) -> Result<()> {
        if g.n == 0 || g.m == 0 {
            return Ok(());
        }
        let (m, n, k) = (
            to_i32(op, "m", g.m)?,
            to_i32(op, "n", g.n)?,
            to_i32(op, "k", g.k)?,
        );
        // cuBLAS runs in the calling thread's current context.
        self.stream.context().bind_to_thread()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the callers checked that x spans n * k, w m * k and y n * m elements of their
        // types at these addresses; alpha/beta are f32 as CUBLAS_COMPUTE_32F requires; the handle
        // is bound to `self.stream`, on which the addresses' last writes were ordered by
        // `device_ptr`.
        unsafe {
            gemm_ex(
                *self.handle.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast::<c_void>(),
                g.w as *const c_void,
                A::CUDA_TYPE,
                k,
                g.x as *const c_void,
                A::CUDA_TYPE,
                k,
                (&beta as *const f32).cast::<c_void>(),
                g.y as *mut c_void,
                C::CUDA_TYPE,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }

    /// A linear layer: `y[n, out_f] = x[n, in_f] @ w[out_f, in_f]^T`. `A` is the input and weight
    /// type, `C` the output type (bf16 in, f32 out gives f32 logits directly).
    pub fn linear<A: KernelDtype, C: KernelDtype>(
        &self,
        x: &impl DevicePtr<A>,
        w: &impl DevicePtr<A>,
        y: &mut impl DevicePtrMut<C>,
        n: usize,
        in_f: usize,
        out_f: usize,
    ) -> Result<()> {
        const K: &str = "linear";
        check_pair::<A, C>(K)?;
        check_len(K, "x", x.len(), mul(K, n, in_f)?)?;
        check_len(K, "w", w.len(), mul(K, out_f, in_f)?)?;
        check_len(K, "y", y.len(), mul(K, n, out_f)?)?;
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (wp, _gw) = w.device_ptr(&self.stream);
        let (yp, _gy) = y.device_ptr_mut(&self.stream);
        self.gemm_nt::<A, C>(
            K,
            GemmNt {
                n,
                m: out_f,
                k: in_f,
                x: xp,
                w: wp,
                y: yp,
            },
        )
    }

    /// The expert FFN over tokens already permuted by expert: for every expert `e` with rows
    /// `plan.offsets[e] .. plan.offsets[e + 1]` of `x_perm` (`[rows, hidden]`),
    /// `y_perm[rows] = down_e(silu(gate_e x) * up_e x)`. Two GEMMs per expert present (no host
    /// synchronisation: the plan's counts are the host's), one fused SiLU-and-mul over all rows.
    /// For few rows per expert (see [`Blas::grouped_ffn_applies`]) instead two grouped kernel
    /// launches for all experts, SiLU-and-mul fused into the first (the `gate_up` workspace is then
    /// unused). `experts[e]` may be `None` for experts without rows. Workspaces: `gate_up`
    /// `[rows, 2 * inter]`, `act` `[rows, inter]`.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_ffn<T: KernelDtype>(
        &self,
        kernels: &KernelSet,
        plan: &ExpertPlan,
        experts: &[Option<ExpertWeights<'_, T>>],
        dims: FfnDims,
        x_perm: &impl DevicePtr<T>,
        gate_up: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
        act: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
        y_perm: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        const K: &str = "expert_ffn";
        let FfnDims { hidden, inter } = dims;
        if plan.counts.len() != experts.len() || plan.offsets.len() != experts.len() + 1 {
            return Err(shape_err(
                K,
                format!(
                    "the plan covers {} experts, {} weights given",
                    plan.counts.len(),
                    experts.len()
                ),
            ));
        }
        let rows = plan.total();
        check_len(K, "x_perm", x_perm.len(), mul(K, rows, hidden)?)?;
        check_len(K, "gate_up", gate_up.len(), mul(K, rows, 2 * inter)?)?;
        check_len(K, "act", act.len(), mul(K, rows, inter)?)?;
        check_len(K, "y_perm", y_perm.len(), mul(K, rows, hidden)?)?;
        for (e, range) in plan.active() {
            let w = experts[e]
                .ok_or_else(|| shape_err(K, format!("expert {e} has rows but no weights")))?;
            check_len(
                K,
                "gate_up weights",
                w.gate_up.len(),
                mul(K, 2 * inter, hidden)?,
            )?;
            check_len(K, "down weights", w.down.len(), mul(K, hidden, inter)?)?;
            if range.end > rows {
                return Err(shape_err(K, "the plan's offsets are inconsistent"));
            }
        }
        if rows == 0 {
            return Ok(());
        }
        if self.grouped_ffn_applies::<T>(plan, dims) {
            let (xp, _gx) = x_perm.device_ptr(&self.stream);
            let (ap, _ga) = act.device_ptr_mut(&self.stream);
            let (yp, _gy) = y_perm.device_ptr_mut(&self.stream);
            let mut guards = Vec::new();
            let mut entries = Vec::new();
            for (e, range) in plan.active() {
                let Some(w) = experts[e] else { continue };
                let (gu, g1) = w.gate_up.device_ptr(&self.stream);
                let (dn, g2) = w.down.device_ptr(&self.stream);
                guards.push(g1);
                guards.push(g2);
                entries.push(SkinnyEntry {
                    gate_up: gu,
                    down: dn,
                    row0: range.start,
                    rows: range.len(),
                });
            }
            let aligned = [xp, ap, yp]
                .iter()
                .chain(entries.iter().flat_map(|e| [&e.gate_up, &e.down]))
                .all(|a| a % 16 == 0);
            if aligned {
                // SAFETY: checked above: x_perm and y_perm span rows * hidden, act rows * inter
                // elements (bf16: `grouped_ffn_applies`), every active expert's weights
                // 2 * inter * hidden and hidden * inter, its range ends within rows; every address
                // is 16-byte aligned, hidden and inter multiples of 8; the guards keep the
                // accesses ordered on `self.stream`.
                return unsafe {
                    kernels.expert_ffn_skinny(&self.stream, &entries, hidden, inter, xp, ap, yp)
                };
            }
        }
        let sz = std::mem::size_of::<T>() as u64;
        {
            let (xp, _gx) = x_perm.device_ptr(&self.stream);
            let (gp, _gg) = gate_up.device_ptr_mut(&self.stream);
            for (e, range) in plan.active() {
                let Some(w) = experts[e] else { continue };
                let (wp, _gw) = w.gate_up.device_ptr(&self.stream);
                let r0 = range.start as u64;
                self.gemm_nt::<T, T>(
                    K,
                    GemmNt {
                        n: range.len(),
                        m: 2 * inter,
                        k: hidden,
                        x: xp + r0 * hidden as u64 * sz,
                        w: wp,
                        y: gp + r0 * 2 * inter as u64 * sz,
                    },
                )?;
            }
        }
        kernels.silu_mul(&self.stream, gate_up, act, rows, inter)?;
        let (ap, _ga) = act.device_ptr(&self.stream);
        let (yp, _gy) = y_perm.device_ptr_mut(&self.stream);
        for (e, range) in plan.active() {
            let Some(w) = experts[e] else { continue };
            let (dp, _gd) = w.down.device_ptr(&self.stream);
            let r0 = range.start as u64;
            self.gemm_nt::<T, T>(
                K,
                GemmNt {
                    n: range.len(),
                    m: hidden,
                    k: inter,
                    x: ap + r0 * inter as u64 * sz,
                    w: dp,
                    y: yp + r0 * hidden as u64 * sz,
                },
            )?;
        }
        Ok(())
    }
}

/// cuBLAS with f32 compute takes f32 -> f32, bf16 -> bf16 and bf16 -> f32.
fn check_pair<A: KernelDtype, C: KernelDtype>(op: &'static str) -> Result<()> {
    if A::SUFFIX == "f32" && C::SUFFIX != "f32" {
        return Err(shape_err(op, "f32 inputs need an f32 output"));
    }
    Ok(())
}
