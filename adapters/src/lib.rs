//! pregate's C ABI, `libpregate.so` (declared in `include/pregate.h`): the per-layer MoE service
//! (`pregate_moe_*`) a host framework such as vLLM calls from each MoE layer of its own model, and
//! the host Read-ME router (`pregate_router_*`).
//!
//! Every entry point returns a status: 0 for success, else one of pregate's [`ErrorCode`]
//! numbers (1 `INVALID_ARGUMENT`, 2 `NOT_FOUND`, 3 `UNAVAILABLE`, 4 `STATE`, 5 `DEVICE`,
//! 6 `MODEL_DATA`, 7 `IO`, 8 `INTERNAL`), with the message in [`pregate_last_error`]
//! (thread-local). Nothing unwinds across the boundary: a panic inside becomes `INTERNAL`.
//! The ownership, stream and threading rules are in the header.

mod cuda;
pub mod dtype;
pub mod ffi;
pub mod layered;
pub mod moe;
pub mod router;
mod store;

pub use pregate::ErrorCode;

/// The ABI version `pregate.h` declares (`PREGATE_ABI_VERSION`); bumped on any change of a
/// function's signature or a struct's layout.
pub const ABI_VERSION: u32 = 1;

/// The ABI version of this library; callers refuse a library whose version differs from the
/// header they were built against.
#[no_mangle]
pub extern "C" fn pregate_abi_version() -> u32 {
    ABI_VERSION
}

/// Copies this thread's last error message into `buf` (at most `cap - 1` bytes and a NUL) and
/// returns the message's full length in bytes; `buf` may be NULL with `cap` 0 to ask the length.
///
/// # Safety
/// `buf` must point to `cap` writable bytes (or be NULL with `cap` 0).
#[no_mangle]
pub unsafe extern "C" fn pregate_last_error(buf: *mut std::ffi::c_char, cap: usize) -> usize {
    let msg = ffi::last_error();
    if !buf.is_null() && cap > 0 {
        let n = msg.len().min(cap - 1);
        // SAFETY: `buf` has `cap > n` writable bytes (the caller's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), buf as *mut u8, n);
            *buf.add(n) = 0;
        }
    }
    msg.len()
}
