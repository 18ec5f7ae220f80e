//! Where cached experts live: the memory-backend trait and its host-memory implementation.
//!
//! The trait is deliberately small so that a device backend (CUDA: device slots, pinned host
//! staging, a copy stream and events) can implement it without knowing about eviction policies:
//! allocate `n` slots of `s` bytes once, copy a unit's bytes into a slot (possibly asynchronously,
//! returning a [`LoadTicket`] the compute side waits on), and report free memory so a capacity can
//! be given as a fraction of it.

use crate::error::{Error, Result};

/// A handle on one issued copy; the compute side waits on it before reading the slot.
///
/// Tickets are issued in increasing order by one backend, so waiting on a ticket also means every
/// earlier copy of that backend has completed (copies run on one in-order copy stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoadTicket(pub u64);

/// Memory that holds expert slots (host memory here; device memory in the CUDA backend).
pub trait MemoryBackend: Send {
    /// Reserves `slots` buffers of `slot_bytes` bytes each, replacing any earlier allocation.
    fn allocate(&mut self, slots: usize, slot_bytes: usize) -> Result<()>;

    /// Starts copying `bytes` (at most `slot_bytes`) into `slot`; returns the copy's ticket.
    fn load(&mut self, slot: usize, bytes: &[u8]) -> Result<LoadTicket>;

    /// Blocks until the copy behind `ticket` (and every earlier one) has completed.
    fn wait(&mut self, ticket: LoadTicket) -> Result<()>;

    /// Bytes still free in the backend's memory (for a capacity given as a fraction of it).
    fn free_bytes(&self) -> Result<u64>;
}

/// Host-memory slots: copies are synchronous, so every ticket is complete when returned.
///
/// This is the CPU engine's cache memory and the reference the CUDA backend is tested against.
#[derive(Debug, Default)]
pub struct HostMemory {
    slot_bytes: usize,
    slots: Vec<Vec<u8>>,
    lens: Vec<usize>,
    next_ticket: u64,
    budget: Option<u64>,
}

impl HostMemory {
    /// Host memory bounded by the machine's available memory.
    pub fn new() -> Self {
        HostMemory::default()
    }

    /// Host memory that pretends to have only `bytes` in total (tests, or a hard host budget).
    pub fn with_budget(bytes: u64) -> Self {
        HostMemory {
            budget: Some(bytes),
            ..HostMemory::default()
        }
    }

    /// The bytes last copied into `slot` (empty if none).
    pub fn slot(&self, slot: usize) -> Option<&[u8]> {
        self.slots.get(slot).map(|s| &s[..self.lens[slot]])
    }

    /// Number of allocated slots.
    pub fn num_slots(&self) -> usize {
        self.slots.len()
    }

    fn allocated(&self) -> u64 {
        (self.slots.len() * self.slot_bytes) as u64
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes; `None` where it cannot be read.
fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl MemoryBackend for HostMemory {
    fn allocate(&mut self, slots: usize, slot_bytes: usize) -> Result<()> {
        let want = slots as u64 * slot_bytes as u64;
        if let Some(budget) = self.budget {
            if want > budget {
                return Err(Error::Capacity(format!(
                    "{slots} slots of {slot_bytes} bytes need {want} bytes; host budget is {budget}"
                )));
            }
        }
        self.slots = Vec::new();
        let mut buffers = Vec::new();
        buffers
            .try_reserve_exact(slots)
            .map_err(|e| Error::Capacity(format!("cannot allocate {slots} slots: {e}")))?;
        for _ in 0..slots {
            let mut b = Vec::new();
            b.try_reserve_exact(slot_bytes).map_err(|e| {
                Error::Capacity(format!("cannot allocate a slot of {slot_bytes} bytes: {e}"))
            })?;
            b.resize(slot_bytes, 0);
            buffers.push(b);
        }
        self.slots = buffers;
        self.lens = vec![0; slots];
        self.slot_bytes = slot_bytes;
        Ok(())
    }

    fn load(&mut self, slot: usize, bytes: &[u8]) -> Result<LoadTicket> {
        let n = self.slots.len();
        let buf = self
            .slots
            .get_mut(slot)
            .ok_or_else(|| Error::InvalidArgument(format!("slot {slot} is outside 0..{n}")))?;
        if bytes.len() > buf.len() {
            return Err(Error::Capacity(format!(
                "an expert of {} bytes does not fit a slot of {} bytes",
                bytes.len(),
                buf.len()
            )));
        }
        buf[..bytes.len()].copy_from_slice(bytes);
        self.lens[slot] = bytes.len();
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
        Ok(())
    }

    fn free_bytes(&self) -> Result<u64> {
        match self.budget {
            Some(b) => Ok(b.saturating_sub(self.allocated())),
            None => host_available_bytes()
                .ok_or_else(|| Error::Device("cannot read MemAvailable from /proc/meminfo".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_copies_bytes_into_slots() {
        let mut m = HostMemory::with_budget(64);
        m.allocate(4, 16).unwrap();
        assert_eq!(m.free_bytes().unwrap(), 0);
        let t = m.load(2, &[7u8; 10]).unwrap();
        m.wait(t).unwrap();
        assert_eq!(m.slot(2).unwrap(), &[7u8; 10]);
        assert!(m.load(4, &[1]).is_err());
        assert!(m.load(0, &[0u8; 17]).is_err());
        assert!(m.wait(LoadTicket(99)).is_err());
    }

    #[test]
    fn host_memory_respects_its_budget() {
        let mut m = HostMemory::with_budget(100);
        let err = m.allocate(10, 11).unwrap_err().to_string();
        assert!(err.contains("110"), "{err}");
        assert!(HostMemory::new().free_bytes().unwrap() > 0);
    }
}
