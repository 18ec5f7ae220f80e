//! Shared helpers of the GPU tests (included with `mod common_gpu;`).
#![allow(dead_code)]

pub mod devices;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
pub(crate) use devices::register;
pub use devices::{Device, DeviceTests, Failed};
use pregate_kernels::{Blas, KernelDtype, KernelSet};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A device, a stream on it, the compiled kernels and a cuBLAS handle.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ks: KernelSet,
    pub blas: Blas,
}

/// The CUDA device `device`, with its kernels compiled and loaded. The harness only runs a CUDA
/// trial on a device the driver reports, so any failure here (opening it, NVRTC, cuBLAS) fails
/// the test.
pub fn gpu(device: &Device) -> Result<Gpu, Failed> {
    let Device::Cuda(ordinal) = *device else {
        return Err(format!("{device} is not a CUDA device").into());
    };
    let ctx = pregate_kernels::open_device(ordinal).map_err(|e| format!("open {device}: {e}"))?;
    let stream = ctx
        .new_stream()
        .map_err(|e| format!("create a stream on {device}: {e}"))?;
    let ks = KernelSet::new(&ctx).map_err(|e| format!("kernels failed to load: {e}"))?;
    let blas = Blas::new(&stream).map_err(|e| format!("cuBLAS failed to load: {e}"))?;
    Ok(Gpu {
        ctx,
        stream,
        ks,
        blas,
    })
}

/// A fresh seed per run (printed), or `PREGATE_TEST_SEED`.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("PREGATE_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    println!("{test}: seed {seed} (PREGATE_TEST_SEED={seed} reproduces it)");
    StdRng::seed_from_u64(seed)
}

/// `n` uniform values in `[-scale, scale)`.
pub fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// `x` stored as `T`, and the values the device actually sees (for the reference).
pub fn as_dtype<T: KernelDtype>(x: &[f32]) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let back = t.iter().map(|v| v.to_f32()).collect();
    (t, back)
}

impl Gpu {
    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(host).expect("upload")
    }

    /// A buffer of `n` NaNs (or the dtype's NaN), so an unwritten element fails the comparison.
    pub fn poisoned<T: KernelDtype>(&self, n: usize) -> CudaSlice<T> {
        self.upload(&vec![T::from_f32(f32::NAN); n])
    }

    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        d: &impl DevicePtr<T>,
    ) -> Vec<T> {
        let v = self.stream.clone_dtoh(d).expect("download");
        self.stream.synchronize().expect("synchronize");
        v
    }

    pub fn download_f32<T: KernelDtype>(&self, d: &CudaSlice<T>) -> Vec<f32> {
        self.download(d).into_iter().map(|v| v.to_f32()).collect()
    }
}

/// `||out - want|| / ||want||`; infinite when `out` has a NaN or the lengths differ.
pub fn rel_err(out: &[f32], want: &[f64]) -> f64 {
    if out.len() != want.len() || out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &w) in out.iter().zip(want) {
        num += (o as f64 - w).powi(2);
        den += w * w;
    }
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

/// The tolerance of a storage type: 1e-5 for f32, 1e-2 for bf16.
pub fn tol<T: KernelDtype>() -> f64 {
    if T::SUFFIX == "f32" {
        1e-5
    } else {
        1e-2
    }
}

pub fn assert_close<T: KernelDtype>(what: &str, out: &[f32], want: &[f64]) {
    let e = rel_err(out, want);
    println!("{what} [{}]: relative error {e:.3e}", T::SUFFIX);
    assert!(
        e < tol::<T>(),
        "{what} [{}]: relative error {e:.3e} >= {:.0e}",
        T::SUFFIX,
        tol::<T>()
    );
}

pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}
