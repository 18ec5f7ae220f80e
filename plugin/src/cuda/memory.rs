//! CUDA memory for the expert cache: equal-size device slots filled on a dedicated copy stream.
//!
//! Each slot has two events. `loaded` is recorded on the copy stream after a copy into the slot;
//! the compute stream waits on it ([`CudaExpertMemory::acquire`]) before the first kernel that
//! reads the slot, so compute waits only for the experts it needs, never for the whole copy queue.
//! `released` is recorded on the compute stream after the last kernel that read the slot
//! ([`CudaExpertMemory::release`]); the copy stream waits on it before overwriting the slot, so an
//! eviction can never overwrite weights a queued kernel has yet to read, whatever the cache's
//! bookkeeping decided (pins only make evictions efficient; these events make them safe).
//!
//! Copies come from wherever the [`ExpertSource`](crate::cache::ExpertSource) keeps the bytes: the CUDA
//! backend keeps every expert in one page-locked (pinned) host buffer, so copies run at the PCIe
//! link's speed and asynchronously; a pageable source is also correct (the driver stages it before
//! `load` returns) but about five times slower.
//!
//! The slots are either allocated here (pregate's own engine) or carved from a [`BorrowedPool`], device
//! memory a host framework owns (a torch tensor, so torch's allocator and a host that sizes its memory
//! from it count the pool); borrowed memory is never freed.
//!
//! The backend requires the context's automatic event tracking to be off (the CUDA backend turns it
//! off before allocating): ordering is entirely the events above and stream order.

use std::sync::Arc;

use cudarc::driver::{
    result as cu, CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, DevicePtr,
};

use crate::cache::{LoadTicket, MemoryBackend};
use crate::error::{Error, Result};

fn dev(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::device("expert cache", e)
}

/// Device memory lent by the caller for the expert slots: `bytes` bytes at device address `ptr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BorrowedPool {
    /// Device address of the first byte.
    pub ptr: u64,
    /// Size in bytes.
    pub bytes: u64,
}

impl BorrowedPool {
    /// Alignment of every slot in a pool (what cuBLAS and vector loads like).
    pub const ALIGN: u64 = 256;

    /// Distance between two slots of `slot_bytes` in a pool.
    pub fn stride(slot_bytes: usize) -> u64 {
        (slot_bytes.max(1) as u64).div_ceil(Self::ALIGN) * Self::ALIGN
    }

    /// Bytes a pool of `slots` slots of `slot_bytes` needs.
    pub fn bytes_for(slots: usize, slot_bytes: usize) -> u64 {
        slots as u64 * Self::stride(slot_bytes)
    }
}

/// Device slots for cached experts, filled on a copy stream (see the module docs).
pub struct CudaExpertMemory {
    ctx: Arc<CudaContext>,
    copy: Arc<CudaStream>,
    slot_bytes: usize,
    slots: Vec<CudaSlice<u8>>,
    loaded: Vec<CudaEvent>,
    released: Vec<CudaEvent>,
    /// Per slot, the streams that have waited for its last copy: a stream not in the list must
    /// wait before it reads the slot (the runtime may compute on a caller's stream that changes
    /// from call to call). Emptied by each new copy.
    waited: Vec<Vec<usize>>,
    next_ticket: u64,
    bytes_copied: u64,
    /// Where the slots come from when the caller owns their memory.
    pool: Option<BorrowedPool>,
}

impl CudaExpertMemory {
    /// Slots in `ctx`'s device memory, filled on `copy` (a stream of the same context).
    pub fn new(ctx: &Arc<CudaContext>, copy: &Arc<CudaStream>) -> Result<Self> {
        if copy.context() != ctx {
            return Err(Error::InvalidArgument(
                "the copy stream belongs to another CUDA context".into(),
            ));
        }
        Ok(CudaExpertMemory {
            ctx: ctx.clone(),
            copy: copy.clone(),
            slot_bytes: 0,
            slots: Vec::new(),
            loaded: Vec::new(),
            released: Vec::new(),
            waited: Vec::new(),
            next_ticket: 0,
            bytes_copied: 0,
            pool: None,
        })
    }

    /// Slots carved from `pool`, caller-owned device memory of `ctx`, filled on `copy`; the
    /// memory is never freed.
    ///
    /// # Safety
    /// `pool` must be device memory of `ctx`'s device, valid for `pool.bytes` bytes, and stay
    /// allocated (and unused by anything else) until this value and the work enqueued on its slots
    /// are gone.
    pub unsafe fn borrowed(
        ctx: &Arc<CudaContext>,
        copy: &Arc<CudaStream>,
        pool: BorrowedPool,
    ) -> Result<Self> {
        if pool.ptr == 0 || pool.ptr % BorrowedPool::ALIGN != 0 {
            return Err(Error::InvalidArgument(format!(
                "the slot pool at {:#x} is NULL or not aligned to {} bytes",
                pool.ptr,
                BorrowedPool::ALIGN
            )));
        }
        let mut m = Self::new(ctx, copy)?;
        m.pool = Some(pool);
        Ok(m)
    }

    /// Whether the slots are carved from caller-owned memory.
    pub fn is_borrowed(&self) -> bool {
        self.pool.is_some()
    }

    /// Drops the slots, giving borrowed ones back instead of freeing them.
    fn drop_slots(&mut self) {
        for s in self.slots.drain(..) {
            if self.pool.is_some() {
                // The caller owns the memory: forget the slice instead of freeing it.
                let _ = s.leak();
            }
        }
        self.loaded.clear();
        self.released.clear();
        self.waited.clear();
    }

    /// The copy stream.
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy
    }

    /// Number of slots.
    pub fn num_slots(&self) -> usize {
        self.slots.len()
    }

    /// Bytes copied into slots so far.
    pub fn bytes_copied(&self) -> u64 {
        self.bytes_copied
    }

    /// Orders `compute` after the last copy into `slot`; returns whether it had to wait (a copy
    /// was pending that `compute` had not waited for). Call before the first kernel that reads the
    /// slot on `compute`.
    pub fn acquire(&mut self, slot: usize, compute: &CudaStream) -> Result<bool> {
        let n = self.slots.len();
        let waited = self
            .waited
            .get_mut(slot)
            .ok_or_else(|| Error::InvalidArgument(format!("slot {slot} is outside 0..{n}")))?;
        let id = compute.cu_stream() as usize;
        if waited.contains(&id) {
            return Ok(false);
        }
        compute.wait(&self.loaded[slot]).map_err(dev)?;
        waited.push(id);
        Ok(true)
    }

    /// Records that every kernel reading `slot` has been enqueued on `compute`: a later copy into
    /// the slot waits for them.
    pub fn release(&self, slot: usize, compute: &CudaStream) -> Result<()> {
        let ev = self
            .released
            .get(slot)
            .ok_or_else(|| Error::InvalidArgument(format!("slot {slot} is out of range")))?;
        ev.record(compute).map_err(dev)
    }

    /// The slot's first `len` elements as `T` (f32 or bf16 weights).
    pub fn view<T>(&self, slot: usize, len: usize) -> Result<CudaView<'_, T>> {
        let s = self
            .slots
            .get(slot)
            .ok_or_else(|| Error::InvalidArgument(format!("slot {slot} is out of range")))?;
        // SAFETY: the slots hold plain f32 / bf16 weights copied from the checkpoint; every bit
        // pattern is a valid value of either type, and `transmute` checks the length in bytes.
        unsafe { s.transmute::<T>(len) }.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{len} elements of {} bytes exceed a slot of {} bytes",
                std::mem::size_of::<T>(),
                self.slot_bytes
            ))
        })
    }
}

impl MemoryBackend for CudaExpertMemory {
    fn allocate(&mut self, slots: usize, slot_bytes: usize) -> Result<()> {
        self.drop_slots();
        if let Some(pool) = self.pool {
            return self.carve(pool, slots, slot_bytes);
        }
        let want = slots as u64 * slot_bytes as u64;
        let free = self.free_bytes()?;
        if want > free {
            return Err(Error::Capacity(format!(
                "{slots} expert slots of {slot_bytes} bytes need {want} bytes; the device has {free} free"
            )));
        }
        for _ in 0..slots {
            // SAFETY: the slot's contents are never read before a copy fills them (a unit is
            // resident only after its load), so uninitialised memory is never observed.
            let s = unsafe { self.copy.alloc::<u8>(slot_bytes.max(1)) }.map_err(|e| {
                Error::Capacity(format!(
                    "cannot allocate an expert slot of {slot_bytes} bytes: {e}"
                ))
            })?;
            self.slots.push(s);
            self.loaded.push(self.ctx.new_event(None).map_err(dev)?);
            self.released.push(self.ctx.new_event(None).map_err(dev)?);
            self.waited.push(Vec::new());
        }
        // The allocations are stream-ordered on the copy stream; compute may use them at once.
        self.copy.synchronize().map_err(dev)?;
        self.slot_bytes = slot_bytes;
        Ok(())
    }

    fn load(&mut self, slot: usize, bytes: &[u8]) -> Result<LoadTicket> {
        let n = self.slots.len();
        if slot >= n {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} is outside 0..{n}"
            )));
        }
        if bytes.len() > self.slot_bytes {
            return Err(Error::Capacity(format!(
                "an expert of {} bytes does not fit a slot of {} bytes",
                bytes.len(),
                self.slot_bytes
            )));
        }
        // Never overwrite weights a queued kernel still reads.
        self.copy.wait(&self.released[slot]).map_err(dev)?;
        let (dst, _guard) = self.slots[slot].device_ptr(&self.copy);
        // SAFETY: `dst` is a live allocation of slot_bytes >= bytes.len() bytes; the source slice
        // stays valid until the copy completes (pinned sources live as long as the backend that
        // owns this memory, and pageable ones are staged by the driver before this call returns).
        unsafe { cu::memcpy_htod_async(dst, bytes, self.copy.cu_stream()) }.map_err(dev)?;
        self.loaded[slot].record(&self.copy).map_err(dev)?;
        self.waited[slot].clear();
        self.bytes_copied += bytes.len() as u64;
        self.next_ticket += 1;
        Ok(LoadTicket(self.next_ticket))
    }

    fn wait(&mut self, ticket: LoadTicket) -> Result<()> {
        if ticket.0 > self.next_ticket {
            return Err(Error::InvalidArgument(format!(
                "ticket {} was never issued",
                ticket.0
            )));
        }
        // One in-order copy stream: waiting for all of it covers every earlier ticket.
        self.copy.synchronize().map_err(dev)
    }

    fn free_bytes(&self) -> Result<u64> {
        if let Some(pool) = self.pool {
            return Ok(pool.bytes);
        }
        let (free, _total) = self.ctx.mem_get_info().map_err(dev)?;
        Ok(free as u64)
    }
}

impl CudaExpertMemory {
    /// `slots` slots of `slot_bytes` from the borrowed `pool`.
    fn carve(&mut self, pool: BorrowedPool, slots: usize, slot_bytes: usize) -> Result<()> {
        let need = BorrowedPool::bytes_for(slots, slot_bytes);
        if need > pool.bytes {
            return Err(Error::Capacity(format!(
                "{slots} expert slots of {slot_bytes} bytes need {need} bytes; the slot pool has {}",
                pool.bytes
            )));
        }
        let stride = BorrowedPool::stride(slot_bytes);
        for i in 0..slots as u64 {
            // SAFETY: `[ptr + i * stride, + slot_bytes)` lies inside the pool (checked above),
            // which the caller keeps allocated for this value's life (`borrowed`'s contract);
            // `drop_slots` forgets these slices instead of freeing them.
            let s = unsafe {
                self.copy
                    .upgrade_device_ptr::<u8>(pool.ptr + i * stride, slot_bytes.max(1))
            };
            self.slots.push(s);
            self.loaded.push(self.ctx.new_event(None).map_err(dev)?);
            self.released.push(self.ctx.new_event(None).map_err(dev)?);
            self.waited.push(Vec::new());
        }
        self.slot_bytes = slot_bytes;
        Ok(())
    }
}

impl Drop for CudaExpertMemory {
    fn drop(&mut self) {
        self.drop_slots();
    }
}
