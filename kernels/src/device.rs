//! Finding a CUDA driver and device without ever panicking.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::error::{catch, KernelError, Result};

/// Whether the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: `is_culib_present` only tries to open the library by its candidate names.
    catch("driver probe", || unsafe {
        cudarc::driver::sys::is_culib_present()
    })
    .unwrap_or(false)
}

/// Number of CUDA devices; an error when the driver is missing or fails to initialise.
pub fn device_count() -> Result<usize> {
    if !driver_available() {
        return Err(KernelError::DriverUnavailable(
            "libcuda.so could not be loaded".into(),
        ));
    }
    let n = catch("cuDeviceGetCount", CudaContext::device_count)??;
    Ok(n.max(0) as usize)
}

/// Opens device `ordinal` (its primary context).
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(KernelError::NoDevice { ordinal, count });
    }
    Ok(catch("cuCtxCreate", || CudaContext::new(ordinal))??)
}

/// The `sm_XY` architecture of a context's device.
pub fn device_arch(ctx: &CudaContext) -> Result<String> {
    let (major, minor) = ctx.compute_capability()?;
    Ok(format!("sm_{major}{minor}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn probing_never_panics() {
        // Without a driver (CI) this is an error; on a GPU host a count. Either way, no panic.
        match super::device_count() {
            Ok(n) => println!("{n} CUDA device(s)"),
            Err(e) => println!("no CUDA: {e}"),
        }
        assert!(super::open_device(usize::MAX).is_err());
    }
}
