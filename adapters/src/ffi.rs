//! The rules every entry point follows: a status code (pregate's [`ErrorCode`] numbers, 0 for
//! success), the failure's message in a thread-local slot, and no unwinding across the boundary.

use std::any::Any;
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pregate::{Error, ErrorCode};

/// A status returned by every entry point: 0, or an [`ErrorCode`] number.
pub type Status = i32;

/// Success.
pub const OK: Status = 0;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A failed call: its code and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The class of the failure.
    pub code: ErrorCode,
    /// What went wrong, naming the argument or value at fault.
    pub message: String,
}

impl Failure {
    /// A failure of `code` saying `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// A bad argument.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// A call in the wrong state (before `finalize`, without a plan, for another step...).
    pub fn state(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::State, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(e.code(), e.to_string())
    }
}

/// The result of an entry point's body.
pub type CallResult<T = ()> = Result<T, Failure>;

/// Records `message` as this thread's last error.
pub fn set_last_error(message: &str) {
    LAST_ERROR.with(|m| {
        let mut m = m.borrow_mut();
        m.clear();
        m.push_str(message);
    });
}

/// This thread's last error message (empty when no call failed on it yet).
pub fn last_error() -> String {
    LAST_ERROR.with(|m| m.borrow().clone())
}

fn panic_message(p: &(dyn Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs the body of entry point `name`: its failure becomes a status and this thread's last error
/// (prefixed with `name`), and a panic inside becomes `INTERNAL` instead of unwinding into the
/// caller (undefined behaviour across `extern "C"`).
pub fn guard(name: &str, body: impl FnOnce() -> CallResult) -> Status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => OK,
        Ok(Err(f)) => {
            set_last_error(&format!("{name}: {}", f.message));
            f.code as Status
        }
        Err(p) => {
            set_last_error(&format!(
                "{name}: internal error (panic): {}",
                panic_message(p.as_ref())
            ));
            ErrorCode::Internal as Status
        }
    }
}

/// `ptr` as a reference, or an `INVALID_ARGUMENT` naming `what` when it is null.
///
/// # Safety
/// A non-null `ptr` must point to a live, properly aligned `T` for the call's duration.
pub unsafe fn non_null<'a, T>(ptr: *const T, what: &str) -> CallResult<&'a T> {
    // SAFETY: non-null checked here; validity and lifetime are the caller's contract.
    unsafe { ptr.as_ref() }.ok_or_else(|| Failure::invalid(format!("`{what}` is NULL")))
}

/// `ptr` as a mutable reference, or an `INVALID_ARGUMENT` naming `what` when it is null.
///
/// # Safety
/// A non-null `ptr` must point to a live, properly aligned `T` that nothing else accesses during
/// the call.
pub unsafe fn non_null_mut<'a, T>(ptr: *mut T, what: &str) -> CallResult<&'a mut T> {
    // SAFETY: non-null checked here; validity and exclusivity are the caller's contract.
    unsafe { ptr.as_mut() }.ok_or_else(|| Failure::invalid(format!("`{what}` is NULL")))
}

/// `len` elements at `ptr` (an empty slice for `len == 0`, whatever `ptr` is), or an
/// `INVALID_ARGUMENT` naming `what` when `ptr` is null or misaligned and `len > 0`.
///
/// # Safety
/// For `len > 0`, `ptr` must point to `len` initialised, live elements for the call's duration.
pub unsafe fn slice<'a, T>(ptr: *const T, len: usize, what: &str) -> CallResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    check_ptr(ptr, what)?;
    // SAFETY: non-null and aligned (checked above); length and validity are the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Like [`slice()`], mutable.
///
/// # Safety
/// For `len > 0`, `ptr` must point to `len` live elements that nothing else accesses during the
/// call.
pub unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize, what: &str) -> CallResult<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_ptr(ptr, what)?;
    // SAFETY: non-null and aligned (checked above); length and exclusivity are the caller's
    // contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

fn check_ptr<T>(ptr: *const T, what: &str) -> CallResult {
    if ptr.is_null() {
        return Err(Failure::invalid(format!("`{what}` is NULL")));
    }
    if (ptr as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Failure::invalid(format!(
            "`{what}` is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    Ok(())
}

/// `a * b` as `usize`, or an `INVALID_ARGUMENT` naming `what` on overflow.
pub fn product(a: u64, b: u64, what: &str) -> CallResult<usize> {
    a.checked_mul(b)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Failure::invalid(format!("{what}: {a} x {b} overflows")))
}
