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

/// Decodes one little-endian element of `dtype` (`bytes` holds exactly its bytes).
fn decode(dtype: Dtype, bytes: &[u8]) -> f32 {
    match (dtype, bytes) {
        (Dtype::F32, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]),
        (Dtype::Bf16, &[a, b]) => bf16::from_bits(u16::from_le_bytes([a, b])).to_f32(),
        (Dtype::F16, &[a, b]) => f16::from_bits(u16::from_le_bytes([a, b])).to_f32(),
        _ => f32::NAN,
    }
}

/// Encodes `v` as one little-endian element of `dtype` (rounded to nearest) into `out`, which
/// holds exactly its bytes; returns whether the element is finite in `dtype`.
fn encode(dtype: Dtype, v: f32, out: &mut [u8]) -> bool {
    match dtype {
        Dtype::F32 => {
            out.copy_from_slice(&v.to_le_bytes());
            v.is_finite()
        }
        Dtype::Bf16 => {
            let b = bf16::from_f32(v);
            out.copy_from_slice(&b.to_bits().to_le_bytes());
            b.is_finite()
        }
        Dtype::F16 => {
            let h = f16::from_f32(v);
            out.copy_from_slice(&h.to_bits().to_le_bytes());
            h.is_finite()
        }
    }
}

/// A matrix read into the store's dtype by [`read_matrix_as`].
#[derive(Debug)]
pub struct Converted {
    /// The elements, row-major and contiguous, little-endian in the store's dtype.
    pub bytes: Vec<u8>,
    /// The first element (row-major index, and its value as read) that is not finite in the
    /// store's dtype: a NaN or infinity of the source, or a value beyond the store's range.
    pub non_finite: Option<(usize, f32)>,
}

/// Reads a `rows x cols` matrix of `src` whose rows start `row_stride` elements apart from `base`
/// as contiguous little-endian elements of `dst`: bits copied exactly when the dtypes agree,
/// converted once (through f32, rounding to nearest) when they differ.
///
/// # Safety
/// As [`read_matrix`].
pub unsafe fn read_matrix_as(
    src: Dtype,
    dst: Dtype,
    base: *const u8,
    rows: usize,
    cols: usize,
    row_stride: usize,
) -> CallResult<Converted> {
    let mut out = Converted {
        bytes: Vec::new(),
        non_finite: None,
    };
    if rows == 0 || cols == 0 {
        return Ok(out);
    }
    let len = (rows - 1)
        .checked_mul(row_stride)
        .and_then(|n| n.checked_add(cols))
        .ok_or_else(|| Failure::invalid("matrix extent overflows"))?;
    let size = dst.size();
    out.bytes.resize(rows * cols * size, 0);
    macro_rules! rows_of {
        ($t:ty, $conv:expr) => {{
            // SAFETY: the extent `len` is covered by the caller's contract; `slice` checks null
            // and alignment.
            let all: &[$t] = unsafe { crate::ffi::slice(base as *const $t, len, "matrix data")? };
            let mut outs = out.bytes.chunks_exact_mut(size).enumerate();
            for r in 0..rows {
                for &v in &all[r * row_stride..r * row_stride + cols] {
                    let Some((i, o)) = outs.next() else {
                        break;
                    };
                    let x: f32 = $conv(v);
                    let finite = if src == dst {
                        o.copy_from_slice(&v.to_le_bytes());
                        x.is_finite()
                    } else {
                        encode(dst, x, o)
                    };
                    if !finite && out.non_finite.is_none() {
                        out.non_finite = Some((i, x));
                    }
                }
            }
        }};
    }
    match src {
        Dtype::F32 => rows_of!(f32, |v: f32| v),
        Dtype::Bf16 => rows_of!(u16, |b| bf16::from_bits(b).to_f32()),
        Dtype::F16 => rows_of!(u16, |b| f16::from_bits(b).to_f32()),
    }
    Ok(out)
}

/// Converts the little-endian elements of `from` in `src` to `to` into `out` (as many elements):
/// bits copied exactly when the dtypes agree. `false` when the lengths disagree.
pub fn convert(from: Dtype, to: Dtype, src: &[u8], out: &mut [u8]) -> bool {
    if src.len() / from.size() != out.len() / to.size()
        || src.len() % from.size() != 0
        || out.len() % to.size() != 0
    {
        return false;
    }
    if from == to {
        out.copy_from_slice(src);
        return true;
    }
    for (s, o) in src
        .chunks_exact(from.size())
        .zip(out.chunks_exact_mut(to.size()))
    {
        encode(to, decode(from, s), o);
    }
    true
}

/// The little-endian elements of `dtype` in `bytes` as f32 (exact: every dtype here widens to
/// f32 without rounding).
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(dtype.size())
        .map(|b| decode(dtype, b))
        .collect()
}
