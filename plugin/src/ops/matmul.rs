//! Matrix products against row-major `[out, in]` weights: `y = x W^T`.
//!
//! Small batches (decode) are matrix-vector products bound by memory bandwidth: they are split
//! over threads by output rows, each thread streaming its rows of `W` once. Larger batches go to
//! the `gemm` crate's blocked, vectorised kernels.

use rayon::prelude::*;

use crate::model::weights::{Linear, Matrix};

/// Batches up to this many rows use the row-parallel matrix-vector path.
const GEMV_MAX_ROWS: usize = 4;
/// Output rows per parallel task on the matrix-vector path (enough to amortise task overhead).
const GEMV_ROWS_PER_TASK: usize = 64;
/// Below this many multiply-adds, threading costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// `out[m, n] = x[m, k] · w[n, k]^T`, overwriting `out`.
///
/// # Panics
/// If `x` or `out` does not have this shape. Callers size both from the weight they pass (whose
/// shape the loader checked against the file), so the check guards their arithmetic, not input.
pub fn matmul_t(x: &[f32], m: usize, w: &Matrix, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul_t: x is not [m, k]");
    assert_eq!(out.len(), m * n, "matmul_t: out is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    if m <= GEMV_MAX_ROWS {
        gemv_rows(x, m, w, out);
    } else {
        gemm_t(x, m, w, out);
    }
}

/// A linear layer with bias over `m` rows of `x`.
pub fn linear(x: &[f32], m: usize, layer: &Linear, out: &mut [f32]) {
    matmul_t(x, m, &layer.weight, out);
    for row in out.chunks_exact_mut(layer.bias.len()) {
        for (o, b) in row.iter_mut().zip(&layer.bias) {
            *o += b;
        }
    }
}

/// Dot product, compiled for AVX2+FMA and AVX-512 as well as the baseline and picked at run time:
/// the baseline build (SSE2) would leave matrix-vector products compute-bound.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen independent accumulators: two 8-wide vectors, so several FMAs are in flight.
    let mut acc = [0.0f32; 16];
    let (ac, ar) = a.split_at(a.len() / 16 * 16);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(16).zip(bc.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

fn gemv_rows(x: &[f32], m: usize, w: &Matrix, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    // Work on the transposed output ([n, m]) so each task owns a contiguous block of W's rows.
    let mut tmp = vec![0.0f32; n * m];
    let task = |(block, chunk): (usize, &mut [f32])| {
        let r0 = block * GEMV_ROWS_PER_TASK;
        for (i, o) in chunk.chunks_exact_mut(m).enumerate() {
            let wr = w.row(r0 + i);
            for (j, v) in o.iter_mut().enumerate() {
                *v = dot(&x[j * k..(j + 1) * k], wr);
            }
        }
    };
    if n * k * m >= PARALLEL_MIN_WORK {
        tmp.par_chunks_mut(GEMV_ROWS_PER_TASK * m)
            .enumerate()
            .for_each(task);
    } else {
        tmp.chunks_mut(GEMV_ROWS_PER_TASK * m)
            .enumerate()
            .for_each(task);
    }
    for r in 0..n {
        for j in 0..m {
            out[j * n + r] = tmp[r * m + j];
        }
    }
}

fn gemm_t(x: &[f32], m: usize, w: &Matrix, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    let par = if m * n * k >= PARALLEL_MIN_WORK {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `gemm` is a raw-pointer kernel boundary. The extents checked by `matmul_t` make every
    // access in bounds: dst is [m, n] row-major (row stride n, column stride 1), lhs is x as [m, k]
    // (row stride k), rhs is W^T as [k, n], read from W's [n, k] row-major storage (row stride 1,
    // column stride k). `out` does not alias `x` or `w` (distinct borrows), and `read_dst` is false
    // so `out`'s previous contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.data.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, rand_vec};

    fn reference(x: &[f32], m: usize, w: &Matrix) -> Vec<f64> {
        let mut out = Vec::new();
        for i in 0..m {
            for r in 0..w.rows {
                out.push(
                    (0..w.cols)
                        .map(|c| x[i * w.cols + c] as f64 * w.data[r * w.cols + c] as f64)
                        .sum(),
                );
            }
        }
        out
    }

    #[test]
    fn both_paths_match_the_definition() {
        for &(m, n, k) in &[
            (1, 7, 5),
            (3, 130, 67),
            (4, 300, 256),
            (5, 33, 17),
            (64, 96, 80),
        ] {
            let x = rand_vec(m * k, m as u64);
            let w = Matrix::new(n, k, rand_vec(n * k, 99 + n as u64));
            let mut out = vec![f32::NAN; m * n];
            matmul_t(&x, m, &w, &mut out);
            assert_close(&out, &reference(&x, m, &w), 1e-5);
        }
    }

    #[test]
    fn linear_adds_the_bias() {
        let w = Matrix::new(2, 2, vec![1.0, 0.0, 0.0, 1.0]);
        let layer = Linear {
            weight: w,
            bias: vec![0.5, -1.0],
        };
        let mut out = vec![0.0; 4];
        linear(&[1.0, 2.0, 3.0, 4.0], 2, &layer, &mut out);
        assert_eq!(out, vec![1.5, 1.0, 3.5, 3.0]);
    }
}
