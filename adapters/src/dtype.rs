//! Element types crossing the ABI, and their conversion to and from the f32 the CPU runtime
//! computes in.

use half::{bf16, f16};

use crate::ffi::{CallResult, Failure};

/// An element type of the ABI (`PREGATE_F32`, `PREGATE_BF16`, `PREGATE_F16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl Dtype {
    /// The dtype of ABI number `code`, or an `INVALID_ARGUMENT` naming `what`.
    pub fn from_code(code: i32, what: &str) -> CallResult<Self> {
        match code {
            0 => Ok(Dtype::F32),
            1 => Ok(Dtype::Bf16),
            2 => Ok(Dtype::F16),
            _ => Err(Failure::invalid(format!(
                "{what} {code} is not a dtype (0 f32, 1 bf16, 2 f16)"
            ))),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// The name of the dtype.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

/// Reads a `rows x cols` matrix of `dtype` whose rows start `row_stride` elements apart from
/// `base`, into f32 (appended to `out`).
///
/// # Safety
/// `base` must point to at least `(rows - 1) * row_stride + cols` live elements of `dtype`, aligned
/// for it, for the call's duration (nothing when `rows` or `cols` is 0).
pub unsafe fn read_matrix(
    dtype: Dtype,
    base: *const u8,
    rows: usize,
    cols: usize,
    row_stride: usize,
    out: &mut Vec<f32>,
) -> CallResult {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let len = (rows - 1)
        .checked_mul(row_stride)
        .and_then(|n| n.checked_add(cols))
        .ok_or_else(|| Failure::invalid("matrix extent overflows"))?;
    out.reserve(rows * cols);
    macro_rules! rows_of {
        ($t:ty, $conv:expr) => {{
            // SAFETY: the extent `len` is covered by the caller's contract; `slice` checks null
            // and alignment.
            let all: &[$t] = unsafe { crate::ffi::slice(base as *const $t, len, "matrix data")? };
            for r in 0..rows {
                let row = &all[r * row_stride..r * row_stride + cols];
                out.extend(row.iter().map($conv));
            }
        }};
    }
    match dtype {
        Dtype::F32 => rows_of!(f32, |&v| v),
        Dtype::Bf16 => rows_of!(u16, |&b| bf16::from_bits(b).to_f32()),
        Dtype::F16 => rows_of!(u16, |&b| f16::from_bits(b).to_f32()),
    }
    Ok(())
}

/// Writes `values` as `dtype` to `base` (contiguous).
///
/// # Safety
/// `base` must point to `values.len()` writable elements of `dtype`, aligned for it, that nothing
/// else accesses during the call.
pub unsafe fn write_values(dtype: Dtype, values: &[f32], base: *mut u8) -> CallResult {
    let n = values.len();
    match dtype {
        Dtype::F32 => {
            // SAFETY: the caller's contract; `slice_mut` checks null and alignment.
            let out: &mut [f32] = unsafe { crate::ffi::slice_mut(base as *mut f32, n, "out")? };
            out.copy_from_slice(values);
        }
        Dtype::Bf16 | Dtype::F16 => {
            // SAFETY: as above, for 2-byte elements.
            let out: &mut [u16] = unsafe { crate::ffi::slice_mut(base as *mut u16, n, "out")? };
            for (o, &v) in out.iter_mut().zip(values) {
                *o = if dtype == Dtype::Bf16 {
                    bf16::from_f32(v).to_bits()
                } else {
                    f16::from_f32(v).to_bits()
                };
            }
        }
    }
    Ok(())
}
