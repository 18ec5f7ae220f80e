//! Launchers of `cuda/expert_ffn.cu`: the grouped skinny expert FFN in bf16, every active expert
//! of a layer in one launch per projection, for up to [`GROUPED_FFN_MAX_ROWS`] rows per expert.

use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{shape_err, to_i32};
use crate::error::Result;
use crate::kernel_set::KernelSet;

/// The most rows (token, expert pairs) one expert may have for the grouped skinny kernels; above
/// it [`crate::Blas::expert_ffn`] runs cuBLAS GEMMs.
pub const GROUPED_FFN_MAX_ROWS: usize = 16;
/// Experts per launch (`SK_GROUP`); more active experts take several launches.
const GROUP: usize = 32;
/// Threads per block (`SK_THREADS`).
const THREADS: u32 = 256;

/// The kernel's `SkinnyGroup`: per entry a weight address, its first row and its row count.
#[repr(C)]
#[derive(Clone, Copy)]
struct SkinnyGroup {
    w: [u64; GROUP],
    row0: [i32; GROUP],
    rows: [i32; GROUP],
}

// SAFETY: plain old data laid out as the kernel's `struct SkinnyGroup { u64 w[32]; int row0[32];
// int rows[32]; }` (no padding: 256 + 128 + 128 bytes), passed by value.
unsafe impl DeviceRepr for SkinnyGroup {}

/// One active expert of a grouped launch: raw device addresses of its bf16 weights and its rows
/// of the permuted matrices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SkinnyEntry {
    /// `[2 * inter, hidden]`, 16-byte aligned.
    pub gate_up: u64,
    /// `[hidden, inter]`, 16-byte aligned.
    pub down: u64,
    /// First row in `x`, `act` and `y`.
    pub row0: usize,
    /// Rows, `1 ..= GROUPED_FFN_MAX_ROWS`.
    pub rows: usize,
}

/// The kernels' tile count (n-tiles of 8 rows) for `max_rows` rows per expert.
fn tiles_for(max_rows: usize) -> Option<usize> {
    [1usize, 2]
        .into_iter()
        .find(|&nt| 8 * nt >= max_rows.min(GROUPED_FFN_MAX_ROWS + 1))
}

impl KernelSet {
    /// `act[rows_e] = silu(x[rows_e] W_gate^T) * (x[rows_e] W_up^T)` then
    /// `y[rows_e] = act[rows_e] W_down^T` for every entry: one gate_up launch and one down launch
    /// per 32 entries, no host synchronisation.
    ///
    /// # Safety
    /// `x` and `y` must hold `[rows, hidden]` and `act` `[rows, inter]` bf16 rows covering every
    /// entry's `row0 .. row0 + rows`, each entry's weights the sizes above, all ordered on
    /// `stream` and alive until the launches complete; every address 16-byte aligned and
    /// `hidden`, `inter` multiples of 8.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn expert_ffn_skinny(
        &self,
        stream: &CudaStream,
        entries: &[SkinnyEntry],
        hidden: usize,
        inter: usize,
        x: u64,
        act: u64,
        y: u64,
    ) -> Result<()> {
        const K: &str = "expert_ffn_skinny";
        self.check_stream(K, stream)?;
        let max_rows = entries.iter().map(|e| e.rows).max().unwrap_or(0);
        if entries.is_empty() || hidden == 0 || inter == 0 {
            return Ok(());
        }
        let nt = tiles_for(max_rows).ok_or_else(|| {
            shape_err(K, format!("{max_rows} rows exceed {GROUPED_FFN_MAX_ROWS}"))
        })?;
        if hidden % 8 != 0 || inter % 8 != 0 {
            return Err(shape_err(K, "hidden and inter must be multiples of 8"));
        }
        if [x, act, y]
            .iter()
            .chain(entries.iter().flat_map(|e| [&e.gate_up, &e.down]))
            .any(|a| a % 16 != 0)
        {
            return Err(shape_err(K, "every address must be 16-byte aligned"));
        }
        let (h, i) = (to_i32(K, "hidden", hidden)?, to_i32(K, "inter", inter)?);
        to_i32(K, "2 * inter", 2 * inter)?;
        let gate_up = self.function(&format!("expert_skinny_gate_up_n{nt}"))?;
        let down = self.function(&format!("expert_skinny_down_n{nt}"))?;
        for chunk in entries.chunks(GROUP) {
            let mut gu = SkinnyGroup {
                w: [0; GROUP],
                row0: [0; GROUP],
                rows: [0; GROUP],
            };
            for (slot, e) in chunk.iter().enumerate() {
                gu.w[slot] = e.gate_up;
                gu.row0[slot] = to_i32(K, "row", e.row0)?;
                gu.rows[slot] = to_i32(K, "rows", e.rows)?;
            }
            let mut dn = gu;
            for (slot, e) in chunk.iter().enumerate() {
                dn.w[slot] = e.down;
            }
            let n = chunk.len() as u32;
            let cfg = |tiles: usize| LaunchConfig {
                grid_dim: (tiles as u32, n, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(gate_up);
            b.arg(&gu).arg(&x).arg(&h).arg(&i).arg(&act);
            // SAFETY: matches `expert_skinny_gate_up_nNT(SkinnyGroup, const bf16*, int, int,
            // bf16*)`; the caller guarantees the buffers (see above); rows <= 8 * nt.
            unsafe { b.launch(cfg(inter.div_ceil(16))) }?;
            let mut b = stream.launch_builder(down);
            b.arg(&dn).arg(&act).arg(&i).arg(&h).arg(&y);
            // SAFETY: matches `expert_skinny_down_nNT(SkinnyGroup, const bf16*, int, int, bf16*)`.
            unsafe { b.launch(cfg(hidden.div_ceil(32))) }?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_counts_cover_the_rows() {
        assert_eq!(tiles_for(1), Some(1));
        assert_eq!(tiles_for(8), Some(1));
        assert_eq!(tiles_for(9), Some(2));
        assert_eq!(tiles_for(GROUPED_FFN_MAX_ROWS), Some(2));
        assert_eq!(tiles_for(33), None);
        assert_eq!(std::mem::size_of::<SkinnyGroup>(), 512);
    }
}
