//! The experts a service collects before `finalize`, each projection in the service's dtype (2
//! bytes per bf16 or f16 element, 4 per f32), and their hand-over to a runtime: as f32 matrices
//! for the CPU, or unit by unit into the CUDA runtime's page-locked copy, each stored expert freed
//! once converted or packed, so the host never holds the experts twice.

use std::sync::Mutex;

use pregate::model::weights::{ExpertWeights, Matrix};

use crate::dtype::{convert, to_f32, Dtype};
use crate::moe::Settings;

/// The projections of one expert (`gate`, `up`, `down`), little-endian elements of a dtype.
type Projections = [Box<[u8]>; 3];

/// Every projection set so far: `projs[(layer * experts + expert) * 3 + proj]`.
pub(crate) struct HostStore {
    dtype: Dtype,
    projs: Vec<Option<Box<[u8]>>>,
    bytes: u64,
}

impl HostStore {
    /// An empty store of `len` projections of `dtype`.
    pub fn new(dtype: Dtype, len: usize) -> Self {
        HostStore {
            dtype,
            projs: (0..len).map(|_| None).collect(),
            bytes: 0,
        }
    }

    /// Projections, set or not.
    pub fn len(&self) -> usize {
        self.projs.len()
    }

    /// Bytes of the projections held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Sets projection `i` (replacing an earlier one): `data` holds its elements in the store's
    /// dtype.
    pub fn set(&mut self, i: usize, data: Vec<u8>) {
        let new = data.len() as u64;
        if let Some(old) = self.projs[i].replace(data.into_boxed_slice()) {
            self.bytes -= old.len() as u64;
        }
        self.bytes += new;
    }

    /// The projections not set, in order.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.projs.len())
            .filter(|&i| self.projs[i].is_none())
            .collect()
    }

    /// The (complete) store as f32 experts `[layer][expert]` for the CPU runtime, converted one
    /// projection at a time, each stored projection freed once converted: the peak is the f32
    /// experts and one projection more.
    pub fn take_f32(&mut self, st: &Settings) -> Vec<Vec<ExpertWeights>> {
        let dtype = self.dtype;
        let mut projs = std::mem::take(&mut self.projs).into_iter();
        self.bytes = 0;
        let mut matrix = |p: usize| {
            let (r, c) = st.proj_shape(p);
            // Taken by value: the stored bytes are dropped as soon as they are converted.
            let data = projs
                .next()
                .flatten()
                .map_or_else(Vec::new, |b| to_f32(dtype, &b));
            Matrix::new(r, c, data)
        };
        (0..st.layers)
            .map(|_| {
                (0..st.experts)
                    .map(|_| ExpertWeights {
                        gate: matrix(0),
                        up: matrix(1),
                        down: matrix(2),
                    })
                    .collect()
            })
            .collect()
    }

    /// Moves the (complete) store into units a runtime packs from, one expert per unit.
    pub fn take_units(&mut self) -> Units {
        self.bytes = 0;
        let mut projs = std::mem::take(&mut self.projs).into_iter();
        let mut units = Vec::with_capacity(projs.len() / 3);
        while let (Some(g), Some(u), Some(d)) = (projs.next(), projs.next(), projs.next()) {
            units.push(Mutex::new(match (g, u, d) {
                (Some(g), Some(u), Some(d)) => Some([g, u, d]),
                _ => None,
            }));
        }
        Units {
            dtype: self.dtype,
            units,
        }
    }

    /// Takes back the units a runtime did not pack (after a failed build): the units packed
    /// before the failure were freed and are missing again.
    pub fn restore_units(&mut self, units: Units) {
        self.projs = units
            .units
            .into_iter()
            .flat_map(|u| match u.into_inner().ok().flatten() {
                Some([g, u, d]) => [Some(g), Some(u), Some(d)],
                None => [None, None, None],
            })
            .collect();
        self.bytes = self.projs.iter().flatten().map(|p| p.len() as u64).sum();
    }
}

/// The experts of a store on their way into a CUDA runtime: each unit is packed once and freed.
pub(crate) struct Units {
    dtype: Dtype,
    /// `units[layer * experts + expert]`; `None` once packed.
    units: Vec<Mutex<Option<Projections>>>,
}

impl Units {
    /// Writes unit `i` into `out` as `target` elements (`gate`, `up`, `down`, contiguous: the
    /// runtime's unit layout) and frees it. Bits are copied exactly when `target` is the store's
    /// dtype.
    pub fn pack(&self, i: usize, target: Dtype, out: &mut [u8]) -> pregate::Result<()> {
        let taken = self
            .units
            .get(i)
            .and_then(|u| u.lock().ok())
            .and_then(|mut u| u.take());
        let Some(projs) = taken else {
            return Err(pregate::Error::Internal(format!(
                "expert unit {i} was asked for twice or does not exist"
            )));
        };
        let mut rest = out;
        for p in &projs {
            let n = p.len() / self.dtype.size() * target.size();
            if rest.len() < n {
                return Err(pregate::Error::Internal(format!(
                    "expert unit {i} does not fit the runtime's {} bytes",
                    rest.len()
                )));
            }
            let (o, tail) = rest.split_at_mut(n);
            convert(self.dtype, target, p, o);
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(pregate::Error::Internal(format!(
                "expert unit {i} leaves {} bytes of the runtime's unit unwritten",
                rest.len()
            )));
        }
        Ok(())
    }

    /// Units packed (and freed) so far.
    pub fn packed(&self) -> usize {
        self.units
            .iter()
            .filter(|u| u.lock().map_or(true, |u| u.is_none()))
            .count()
    }

    /// Bytes of the units not yet packed.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.units
            .iter()
            .filter_map(|u| u.lock().ok())
            .filter_map(|u| {
                u.as_ref()
                    .map(|p| p.iter().map(|b| b.len() as u64).sum::<u64>())
            })
            .sum()
    }
}
