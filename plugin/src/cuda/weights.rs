//! Getting weights onto the device: dense tensors converted to the compute type and uploaded once,
//! routed experts packed into cache units (`gate` rows, `up` rows, `down`: one `[2I, H]` plus one
//! `[H, I]` matrix, contiguous), and the page-locked host copy of every unit that offloaded
//! experts are loaded from.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, PinnedHostSlice};
use half::bf16;
use pregate_kernels::KernelDtype;
use rayon::prelude::*;

use super::dev;
use crate::cache::{ExpertSource, Unit};
use crate::error::{Error, Result};
use crate::model::checkpoint::convert_to_f32;
use crate::model::family::TensorSpec;
use crate::model::{Checkpoint, FloatDtype, TensorRef};

/// A storage type of the CUDA backend, convertible from every checkpoint dtype.
pub trait DeviceElem: KernelDtype {
    /// Appends `t`'s values as little-endian `Self` bytes (raw when the dtypes agree).
    fn encode(t: &TensorRef<'_>, out: &mut [u8]) -> Result<()>;
    /// `t`'s values as `Self`.
    fn decode(t: &TensorRef<'_>) -> Result<Vec<Self>>;
    /// Writes f32 `values` as little-endian `Self` bytes (`out` holds exactly that many).
    fn encode_f32(values: &[f32], out: &mut [u8]);
}

fn encode_via_f32(
    t: &TensorRef<'_>,
    out: &mut [u8],
    size: usize,
    put: impl Fn(f32, &mut [u8]),
) -> Result<()> {
    let vals = convert_to_f32(t.data, t.float_dtype()?);
    if out.len() != vals.len() * size {
        return Err(Error::Internal(format!(
            "tensor `{}`: packing size mismatch",
            t.name
        )));
    }
    for (v, o) in vals.iter().zip(out.chunks_exact_mut(size)) {
        put(*v, o);
    }
    Ok(())
}

impl DeviceElem for f32 {
    fn encode(t: &TensorRef<'_>, out: &mut [u8]) -> Result<()> {
        if t.float_dtype()? == FloatDtype::F32 && out.len() == t.data.len() {
            out.copy_from_slice(t.data);
            return Ok(());
        }
        encode_via_f32(t, out, 4, |v, o| o.copy_from_slice(&v.to_le_bytes()))
    }
    fn decode(t: &TensorRef<'_>) -> Result<Vec<Self>> {
        t.to_f32()
    }
    fn encode_f32(values: &[f32], out: &mut [u8]) {
        for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
            o.copy_from_slice(&v.to_le_bytes());
        }
    }
}

impl DeviceElem for bf16 {
    fn encode(t: &TensorRef<'_>, out: &mut [u8]) -> Result<()> {
        if t.float_dtype()? == FloatDtype::BF16 && out.len() == t.data.len() {
            out.copy_from_slice(t.data);
            return Ok(());
        }
        encode_via_f32(t, out, 2, |v, o| {
            o.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())
        })
    }
    fn decode(t: &TensorRef<'_>) -> Result<Vec<Self>> {
        if t.float_dtype()? == FloatDtype::BF16 {
            return Ok(t
                .data
                .chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                .collect());
        }
        Ok(t.to_f32()?.into_iter().map(bf16::from_f32).collect())
    }
    fn encode_f32(values: &[f32], out: &mut [u8]) {
        for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
            o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
        }
    }
}

/// Uploads tensor `name` (checked to be `shape`) as `T`.
pub(super) fn upload<T: DeviceElem>(
    stream: &Arc<CudaStream>,
    ck: &Checkpoint,
    name: &str,
    shape: &[usize],
) -> Result<CudaSlice<T>> {
    let t = ck.float_tensor(name, shape)?;
    let host = T::decode(&t)?;
    stream
        .clone_htod(&host)
        .map_err(|e| Error::Capacity(format!("uploading `{name}` ({} bytes): {e}", t.data.len())))
}

/// Uploads several `[rows_i, cols]` tensors stacked into one `[sum rows_i, cols]` matrix.
pub(super) fn upload_stacked<T: DeviceElem>(
    stream: &Arc<CudaStream>,
    ck: &Checkpoint,
    parts: &[(&str, usize)],
    cols: usize,
) -> Result<CudaSlice<T>> {
    let mut host = Vec::new();
    for &(name, rows) in parts {
        host.extend(T::decode(&ck.float_tensor(name, &[rows, cols])?)?);
    }
    stream
        .clone_htod(&host)
        .map_err(|e| Error::Capacity(format!("uploading `{}`: {e}", parts[0].0)))
}

/// Uploads several tensors (each checked to be its listed shape) one after the other as one
/// vector: the q, k and v biases as one bias of the fused qkv projection.
pub(super) fn upload_concat<T: DeviceElem>(
    stream: &Arc<CudaStream>,
    ck: &Checkpoint,
    parts: &[&TensorSpec],
) -> Result<CudaSlice<T>> {
    let mut host = Vec::new();
    for t in parts {
        host.extend(T::decode(&ck.float_tensor(&t.name, &t.shape)?)?);
    }
    let first = parts.first().map_or("", |t| t.name.as_str());
    stream
        .clone_htod(&host)
        .map_err(|e| Error::Capacity(format!("uploading `{first}`: {e}")))
}

/// Packs unit (`layer`, `expert`) into its bytes: `pack(layer, expert, out)`.
pub type PackUnit<'a> = dyn Fn(usize, usize, &mut [u8]) -> Result<()> + Sync + 'a;

/// The shape of one routed expert unit.
#[derive(Debug, Clone, Copy)]
pub(super) struct UnitShape {
    pub hidden: usize,
    pub inter: usize,
    pub elem: usize,
}

impl UnitShape {
    /// Elements of `gate_up` (`[2I, H]`).
    pub fn gate_up_len(&self) -> usize {
        2 * self.inter * self.hidden
    }
    /// Elements of `down` (`[H, I]`).
    pub fn down_len(&self) -> usize {
        self.hidden * self.inter
    }
    /// Bytes of one packed unit.
    pub fn bytes(&self) -> usize {
        (self.gate_up_len() + self.down_len()) * self.elem
    }
}

/// Packs host f32 expert matrices (`gate`, `up` `[I, H]`, `down` `[H, I]`) into `out`
/// (`shape.bytes()` bytes), the unit layout [`pack_ffn`] writes from a checkpoint.
pub(super) fn pack_host_ffn<T: DeviceElem>(
    w: &crate::model::weights::ExpertWeights,
    shape: UnitShape,
    out: &mut [u8],
) -> Result<()> {
    let (h, i, s) = (shape.hidden, shape.inter, shape.elem);
    let dims = [(&w.gate, i, h), (&w.up, i, h), (&w.down, h, i)];
    if out.len() != shape.bytes() || dims.iter().any(|(m, r, c)| (m.rows, m.cols) != (*r, *c)) {
        return Err(Error::InvalidArgument(format!(
            "expert matrices [{}, {}], [{}, {}], [{}, {}] do not form a unit of H {h}, I {i}",
            w.gate.rows, w.gate.cols, w.up.rows, w.up.cols, w.down.rows, w.down.cols
        )));
    }
    let (g, rest) = out.split_at_mut(i * h * s);
    let (u, d) = rest.split_at_mut(i * h * s);
    T::encode_f32(&w.gate.data, g);
    T::encode_f32(&w.up.data, u);
    T::encode_f32(&w.down.data, d);
    Ok(())
}

/// Packs the expert tensors `[gate, up, down]` (as the model's inventory lists them) into `out`
/// (`shape.bytes()` bytes).
pub(super) fn pack_ffn<T: DeviceElem>(
    ck: &Checkpoint,
    [gate, up, down]: [&TensorSpec; 3],
    shape: UnitShape,
    out: &mut [u8],
) -> Result<()> {
    let (h, i, s) = (shape.hidden, shape.inter, shape.elem);
    let (g, rest) = out.split_at_mut(i * h * s);
    let (u, d) = rest.split_at_mut(i * h * s);
    T::encode(&ck.float_tensor(&gate.name, &[i, h])?, g)?;
    T::encode(&ck.float_tensor(&up.name, &[i, h])?, u)?;
    T::encode(&ck.float_tensor(&down.name, &[h, i])?, d)
}

/// Packs expert `expert` of a layer whose experts are stacked in two tensors (transformers v5's
/// form, `[gate_up, down]` as the inventory lists them: `gate_up_proj [E, 2I, H]`, each expert's
/// gate rows then its up rows, which is the unit's `gate_up` as stored, and `down_proj [E, H, I]`)
/// into `out` (`shape.bytes()` bytes).
pub(super) fn pack_stacked_ffn<T: DeviceElem>(
    ck: &Checkpoint,
    [gate_up, down]: [&TensorSpec; 2],
    expert: usize,
    shape: UnitShape,
    out: &mut [u8],
) -> Result<()> {
    let (h, i, s) = (shape.hidden, shape.inter, shape.elem);
    let experts = gate_up.shape.first().copied().unwrap_or(0);
    if expert >= experts || gate_up.shape[1..] != [2 * i, h] || down.shape[1..] != [h, i] {
        return Err(Error::Internal(format!(
            "expert {expert} of stacked tensors {:?} and {:?} for H {h}, I {i}",
            gate_up.shape, down.shape
        )));
    }
    // One expert's block of a stacked tensor, as a tensor of its own.
    fn block<'a>(t: &TensorRef<'a>, expert: usize, experts: usize) -> TensorRef<'a> {
        let per = t.data.len() / experts;
        TensorRef {
            data: &t.data[expert * per..(expert + 1) * per],
            shape: &t.shape[1..],
            ..*t
        }
    }
    let gu = ck.float_tensor(&gate_up.name, &gate_up.shape)?;
    let dn = ck.float_tensor(&down.name, &down.shape)?;
    let (g, d) = out.split_at_mut(2 * i * h * s);
    T::encode(&block(&gu, expert, experts), g)?;
    T::encode(&block(&dn, expert, experts), d)
}

/// Every routed expert of the model, packed, in page-locked host memory: the source of the expert
/// cache's copies (pinned memory copies at the link's full speed). One buffer per layer, each
/// allocated only when its layer is packed: a host that frees each unit once packed
/// ([`super::CudaExperts::from_host_units`]) then holds about one copy of the experts (its store
/// shrinking as the pinned layers grow) plus one layer, never two copies.
pub(super) struct PinnedExperts {
    /// `layers[l]`: layer `l`'s units, `layer_bytes[l]` apart.
    layers: Vec<PinnedHostSlice<u8>>,
    /// Bytes of each layer's units.
    layer_bytes: Vec<usize>,
}

impl PinnedExperts {
    /// Packs all `layers x experts` units with `pack(layer, expert, out)`, layer by layer (the
    /// units of a layer in parallel); `shapes[l]` is layer `l`'s unit shape.
    pub fn new(
        ctx: &Arc<CudaContext>,
        experts: usize,
        shapes: &[UnitShape],
        pack: &PackUnit<'_>,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(shapes.len());
        for (l, shape) in shapes.iter().enumerate() {
            let unit = shape.bytes().max(1);
            let total = experts * unit;
            // SAFETY: every byte is written by the packing below before any copy reads it.
            let mut buf = unsafe { ctx.alloc_pinned::<u8>(total) }.map_err(|e| {
                Error::Capacity(format!(
                    "cannot pin {total} bytes of host memory for the experts of layer {l}: {e}"
                ))
            })?;
            let host = buf.as_mut_slice().map_err(dev)?;
            host.par_chunks_mut(unit)
                .enumerate()
                .try_for_each(|(e, out)| pack(l, e, &mut out[..shape.bytes()]))?;
            layers.push(buf);
        }
        Ok(PinnedExperts {
            layers,
            layer_bytes: shapes.iter().map(UnitShape::bytes).collect(),
        })
    }

    /// Bytes of the page-locked buffers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(PinnedHostSlice::len).sum()
    }
}

impl ExpertSource for PinnedExperts {
    fn unit_bytes(&self, unit: Unit) -> Result<&[u8]> {
        let (l, e) = (unit.layer as usize, unit.expert as usize);
        let out_of_range =
            || Error::InvalidArgument(format!("expert unit {unit:?} is out of range"));
        let (buf, len) = self
            .layers
            .get(l)
            .zip(self.layer_bytes.get(l))
            .ok_or_else(out_of_range)?;
        let stride = (*len).max(1);
        let all = buf.as_slice().map_err(dev)?;
        all.get(e * stride..e * stride + len)
            .ok_or_else(out_of_range)
    }
}

/// One packed unit in pageable memory (the initial fill of an all-resident cache).
pub(super) struct OneUnit(pub Vec<u8>);

impl ExpertSource for OneUnit {
    fn unit_bytes(&self, _unit: Unit) -> Result<&[u8]> {
        Ok(&self.0)
    }
}
