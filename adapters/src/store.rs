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

    /// Takes every projection out, leaving each one unset (so that a finalize that fails after
    /// this names them missing instead of building from nothing).
    fn take_all(&mut self) -> Vec<Option<Box<[u8]>>> {
        self.bytes = 0;
        let empty = (0..self.projs.len()).map(|_| None).collect();
        std::mem::replace(&mut self.projs, empty)
    }

    /// The (complete) store as f32 experts `[layer][expert]` for the CPU runtime, converted one
    /// projection at a time, each stored projection freed once converted: the peak is the f32
    /// experts and one projection more.
    pub fn take_f32(&mut self, st: &Settings) -> Vec<Vec<ExpertWeights>> {
        let dtype = self.dtype;
        let mut projs = self.take_all().into_iter();
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
        let mut projs = self.take_all().into_iter();
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

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::dtype::read_matrix_as;
    use crate::moe::PregateMoeConfig;

    /// 2 layers x 3 experts, hidden 8, inter 4, of `dtype`.
    fn settings(dtype: Dtype) -> Settings {
        let code = match dtype {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
            Dtype::F16 => 2,
        };
        Settings::new(&PregateMoeConfig {
            struct_size: std::mem::size_of::<PregateMoeConfig>() as u32,
            num_layers: 2,
            num_experts: 3,
            top_k: 1,
            hidden: 8,
            inter: 4,
            dtype: code,
            device: -1,
            ..Default::default()
        })
        .unwrap()
    }

    /// Finite bf16 bit patterns of every kind: signs, zeros, subnormals, large exponents.
    fn bf16_bits(n: usize, seed: u64) -> Vec<u16> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let b = (s >> 40) as u16;
                // An all-ones exponent is infinity or NaN: clear its lowest bit.
                if b & 0x7f80 == 0x7f80 {
                    b & !0x0080
                } else {
                    b
                }
            })
            .collect()
    }

    /// Reads `values` (contiguous `rows x cols` of `src`, given as their bytes) into `dst`.
    fn read<T: Copy>(src: Dtype, dst: Dtype, values: &[T], rows: usize, cols: usize) -> Vec<u8> {
        // SAFETY: `values` holds `rows * cols` elements of `src`, contiguous and aligned.
        let r = unsafe { read_matrix_as(src, dst, values.as_ptr().cast(), rows, cols, cols) };
        let r = r.unwrap();
        assert_eq!(r.non_finite, None);
        r.bytes
    }

    /// A store of `st` with every projection set from pseudo-random bf16 bits (returned).
    fn filled(st: &Settings, seed: u64) -> (HostStore, Vec<Vec<u16>>) {
        let mut store = HostStore::new(st.dtype, st.layers * st.experts * 3);
        let mut sources = Vec::new();
        for i in 0..store.len() {
            let (r, c) = st.proj_shape(i % 3);
            let bits = bf16_bits(r * c, seed + i as u64);
            store.set(i, read(Dtype::Bf16, st.dtype, &bits, r, c));
            sources.push(bits);
        }
        (store, sources)
    }

    #[test]
    fn a_bf16_store_holds_two_bytes_per_element() {
        let st = settings(Dtype::Bf16);
        let mut store = HostStore::new(st.dtype, st.layers * st.experts * 3);
        // An f32 source is stored as bf16, not as the f32 it came in.
        let values = vec![0.25f32; 4 * 8];
        store.set(0, read(Dtype::F32, Dtype::Bf16, &values, 4, 8));
        assert_eq!(store.bytes(), 4 * 8 * 2);
        // Setting a projection again replaces it.
        store.set(0, read(Dtype::F32, Dtype::Bf16, &values, 4, 8));
        assert_eq!(store.bytes(), 4 * 8 * 2);
        let (full, _) = filled(&st, 1);
        let elements = (st.layers * st.experts * 3 * st.hidden * st.inter) as u64;
        assert_eq!(full.bytes(), elements * 2);
        assert!(full.missing().is_empty());
        let (f32_store, _) = filled(&settings(Dtype::F32), 1);
        assert_eq!(f32_store.bytes(), elements * 4);
    }

    #[test]
    fn bf16_experts_pack_bit_exactly_and_are_freed_once_packed() {
        let st = settings(Dtype::Bf16);
        let (mut store, sources) = filled(&st, 7);
        let all = store.bytes();
        let units = store.take_units();
        assert_eq!(store.bytes(), 0);
        assert_eq!(
            store.missing().len(),
            store.len(),
            "taken experts are missing"
        );
        let unit_bytes = 3 * st.hidden * st.inter * 2;
        for i in 0..st.layers * st.experts {
            let mut out = vec![0xaau8; unit_bytes];
            units.pack(i, Dtype::Bf16, &mut out).unwrap();
            let want: Vec<u8> = sources[i * 3..i * 3 + 3]
                .iter()
                .flatten()
                .flat_map(|b| b.to_le_bytes())
                .collect();
            assert!(out == want, "unit {i} is not the bits it was given");
            assert_eq!(units.packed(), i + 1);
            assert_eq!(units.bytes(), all - (i as u64 + 1) * unit_bytes as u64);
        }
        let mut out = vec![0u8; unit_bytes];
        let e = units.pack(0, Dtype::Bf16, &mut out).unwrap_err();
        assert!(e.to_string().contains("asked for twice"), "{e}");
    }

    #[test]
    fn packing_into_another_dtype_converts_and_a_wrong_size_is_refused() {
        let st = settings(Dtype::Bf16);
        let (mut store, sources) = filled(&st, 3);
        let units = store.take_units();
        let mut out = vec![0u8; 3 * st.hidden * st.inter * 4];
        units.pack(1, Dtype::F32, &mut out).unwrap();
        let want: Vec<u8> = sources[3..6]
            .iter()
            .flatten()
            .flat_map(|&b| bf16::from_bits(b).to_f32().to_le_bytes())
            .collect();
        assert!(out == want);
        let mut short = vec![0u8; 3 * st.hidden * st.inter * 2 - 2];
        let e = units.pack(2, Dtype::Bf16, &mut short).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }

    #[test]
    fn f16_and_f32_sources_are_converted_once_into_a_bf16_service() {
        let st = settings(Dtype::Bf16);
        let (r, c) = st.proj_shape(0);
        let f32s: Vec<f32> = (0..r * c).map(|i| 1.0 + i as f32 / 3.0e3).collect();
        let got = read(Dtype::F32, Dtype::Bf16, &f32s, r, c);
        let want: Vec<u8> = f32s
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        assert!(got == want, "f32 rounds to the nearest bf16");
        let f16s: Vec<u16> = f32s.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
        let got = read(Dtype::F16, Dtype::Bf16, &f16s, r, c);
        let want: Vec<u8> = f16s
            .iter()
            .flat_map(|&b| {
                bf16::from_f32(f16::from_bits(b).to_f32())
                    .to_bits()
                    .to_le_bytes()
            })
            .collect();
        assert!(got == want, "f16 rounds to the nearest bf16 once");
        // A value bf16 cannot hold is named with its index and value.
        let mut big = f32s.clone();
        big[5] = f32::MAX;
        // SAFETY: `big` holds `r * c` contiguous f32s.
        let read = unsafe { read_matrix_as(Dtype::F32, Dtype::Bf16, big.as_ptr().cast(), r, c, c) };
        assert_eq!(read.unwrap().non_finite, Some((5, f32::MAX)));
    }

    #[test]
    fn the_cpu_runtime_gets_the_stored_values_and_the_store_is_emptied() {
        let st = settings(Dtype::Bf16);
        let (mut store, sources) = filled(&st, 5);
        let experts = store.take_f32(&st);
        assert_eq!(store.bytes(), 0);
        assert_eq!(experts.len(), st.layers);
        for (l, layer) in experts.iter().enumerate() {
            assert_eq!(layer.len(), st.experts);
            for (e, w) in layer.iter().enumerate() {
                let i = (l * st.experts + e) * 3;
                for (m, src) in [&w.gate, &w.up, &w.down]
                    .into_iter()
                    .zip(&sources[i..i + 3])
                {
                    assert_eq!((m.rows * m.cols), src.len());
                    let want: Vec<f32> = src.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
                    assert!(
                        m.data
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "(layer {l}, expert {e})"
                    );
                }
                assert_eq!((w.gate.rows, w.gate.cols), (4, 8));
                assert_eq!((w.down.rows, w.down.cols), (8, 4));
            }
        }
    }

    #[test]
    fn units_not_packed_go_back_to_the_store() {
        let st = settings(Dtype::Bf16);
        let (mut store, _) = filled(&st, 9);
        let all = store.bytes();
        let units = store.take_units();
        let unit_bytes = 3 * st.hidden * st.inter * 2;
        let mut out = vec![0u8; unit_bytes];
        units.pack(4, Dtype::Bf16, &mut out).unwrap();
        store.restore_units(units);
        assert_eq!(store.missing(), vec![12, 13, 14]);
        assert_eq!(store.bytes(), all - unit_bytes as u64);
    }
}
