//! The paged KV cache on the device: per layer one K and one V buffer of fixed-size blocks, and a
//! host-side block allocator. A sequence reserves the blocks of its whole `max_len` when it is
//! added, so a step can never run out of KV space half-way.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use pregate_kernels::{KernelDtype, PagedKvLayout};

use super::dev;
use crate::engine::SeqId;
use crate::error::{Error, Result};

/// One sequence's blocks.
pub(super) struct SeqBlocks {
    pub blocks: Vec<i32>,
    pub len: usize,
    pub max_len: usize,
}

/// K and V blocks of every layer, and who owns which block.
pub(super) struct PagedKv<T> {
    pub layout: PagedKvLayout,
    pub k: Vec<CudaSlice<T>>,
    pub v: Vec<CudaSlice<T>>,
    free: Vec<i32>,
    pub seqs: HashMap<SeqId, SeqBlocks>,
}

impl<T: KernelDtype> PagedKv<T> {
    /// `num_blocks` blocks of `block_size` tokens for each of `layers` layers.
    pub fn new(stream: &Arc<CudaStream>, layers: usize, layout: PagedKvLayout) -> Result<Self> {
        let len = layout.cache_len();
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            // Zeroed: attention never reads unwritten slots, but zeros keep a bug visible as
            // wrong numbers rather than NaNs from stale memory.
            k.push(stream.alloc_zeros::<T>(len).map_err(|e| {
                Error::Capacity(format!("KV cache of {} blocks: {e}", layout.num_blocks))
            })?);
            v.push(stream.alloc_zeros::<T>(len).map_err(|e| {
                Error::Capacity(format!("KV cache of {} blocks: {e}", layout.num_blocks))
            })?);
        }
        stream.synchronize().map_err(dev)?;
        Ok(PagedKv {
            layout,
            k,
            v,
            free: (0..layout.num_blocks as i32).rev().collect(),
            seqs: HashMap::new(),
        })
    }

    /// Tokens the cache holds in all.
    pub fn capacity_tokens(&self) -> usize {
        self.layout.num_blocks * self.layout.block_size
    }

    /// Reserves the blocks of a sequence of up to `max_len` tokens.
    pub fn add(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        let need = max_len.div_ceil(self.layout.block_size).max(1);
        if need > self.free.len() {
            return Err(Error::Capacity(format!(
                "sequence {seq} needs {need} KV blocks of {} tokens; {} of {} are free",
                self.layout.block_size,
                self.free.len(),
                self.layout.num_blocks
            )));
        }
        if let Some(old) = self.seqs.remove(&seq) {
            self.free.extend(old.blocks);
        }
        let blocks = self.free.split_off(self.free.len() - need);
        self.seqs.insert(
            seq,
            SeqBlocks {
                blocks,
                len: 0,
                max_len,
            },
        );
        Ok(())
    }

    /// Frees a sequence's blocks; unknown ids are ignored.
    pub fn remove(&mut self, seq: SeqId) {
        if let Some(old) = self.seqs.remove(&seq) {
            self.free.extend(old.blocks);
        }
    }
}
