//! Random-weight models of a [`ModelSpec`]: what `pregate make-model` writes.
//!
//! Weights are uniform with standard deviation `1/sqrt(fan_in)` (embeddings: 1), norms near 1, small
//! biases, so hidden states and logits stay O(1) and the router spreads tokens over the experts.
//! Every tensor's values depend only on the seed, the tensor's name and the element index (chunks
//! seeded by `(seed, name, chunk)` on ChaCha8), so the output is the same on any number of threads
//! and tensors are generated in parallel, streaming to disk tensor by tensor.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::Dtype;

use super::checkpoint::FloatDtype;
use super::family::{PreGatePart, TensorRole, TensorSpec as InventorySpec};
use super::names;
use super::presets::ModelSpec;
use super::progress::{Finish, NoProgress, Progress};
use super::weights::ExpertLayout;
use super::writer::{write_file, write_model, TensorSpec};
use crate::error::{Error, Result};
use crate::tokenizer::{write_synthetic_tokenizer, TOKENIZER_FILE};

/// The masks file of the masked (training) layout.
pub const MASKS_FILE: &str = "masks.safetensors";

/// Elements generated from one RNG stream.
const CHUNK: usize = 1 << 16;

/// How a tensor's values are drawn: `center + uniform(-bound, bound)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Init {
    center: f32,
    bound: f32,
}

impl Init {
    /// Uniform with standard deviation `std` around zero.
    fn std(std: f32) -> Self {
        Init {
            center: 0.0,
            bound: std * 3f32.sqrt(),
        }
    }
    fn fan_in(n: usize) -> Self {
        Self::std(1.0 / (n as f32).sqrt())
    }
    const NORM: Init = Init {
        center: 1.0,
        bound: 0.1,
    };
    const BIAS: Init = Init {
        center: 0.0,
        bound: 0.02,
    };
}

/// FNV-1a, a stable hash of tensor names (std's hasher may change between releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The splitmix64 finaliser: a strong 64-bit mix, used as a counter-based generator (the
/// bulk of the weights) and to derive per-tensor seeds.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn tensor_seed(seed: u64, name: &str) -> u64 {
    mix64(seed ^ fnv1a(name).rotate_left(17))
}

/// Fills `spec` with `init` values in `dtype`, deterministically from `seed`. bf16 values are the
/// f32 values truncated (round toward zero): the cheapest conversion, and as random as any.
fn random_bytes(spec: &TensorSpec, dtype: FloatDtype, init: Init, seed: u64) -> Vec<u8> {
    let size = dtype.size();
    let mut out = vec![0u8; spec.byte_len()];
    let base = tensor_seed(seed, &spec.name);
    let scale = 2.0 * init.bound / (1u32 << 24) as f32;
    let offset = init.center - init.bound;
    let value = move |u: u32| offset + (u >> 8) as f32 * scale;
    out.par_chunks_mut(CHUNK * size)
        .enumerate()
        .for_each(|(chunk, bytes)| {
            // Counter-based: element pair `k` of the tensor uses mix(base + k).
            let mut counter = base.wrapping_add((chunk * CHUNK / 2) as u64);
            let mut next = move || {
                counter = counter.wrapping_add(1);
                mix64(counter)
            };
            // Two values per 64 random bits.
            let mut pairs = bytes.chunks_exact_mut(2 * size);
            match dtype {
                FloatDtype::BF16 => {
                    for pair in &mut pairs {
                        let r = next();
                        let a = value(r as u32).to_bits() >> 16;
                        let b = value((r >> 32) as u32).to_bits() & 0xffff_0000;
                        pair.copy_from_slice(&(a | b).to_le_bytes());
                    }
                }
                _ => {
                    for pair in &mut pairs {
                        let r = next();
                        let (a, b) = pair.split_at_mut(size);
                        encode(value(r as u32), dtype, a);
                        encode(value((r >> 32) as u32), dtype, b);
                    }
                }
            }
            let rest = pairs.into_remainder();
            if !rest.is_empty() {
                encode(value(next() as u32), dtype, rest);
            }
        });
    out
}

fn encode(v: f32, dtype: FloatDtype, out: &mut [u8]) {
    match dtype {
        FloatDtype::F32 => out.copy_from_slice(&v.to_le_bytes()),
        FloatDtype::BF16 => out.copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes()),
        FloatDtype::F16 => out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
    }
}

/// How a tensor of the inventory is initialised.
fn init_of(t: &InventorySpec) -> Init {
    match t.role {
        TensorRole::Embedding
        | TensorRole::PreGate {
            part: PreGatePart::Embed,
            ..
        } => Init::std(1.0),
        TensorRole::PreGate { bias: true, .. } | TensorRole::AttentionBias { .. } => Init::BIAS,
        role if role.is_norm() => Init::NORM,
        _ => Init::fan_in(t.shape.last().copied().unwrap_or(1)),
    }
}

/// The masks of the masked layout, per layer: `(residual [I], expert [N, I])` as 0/1 bytes.
/// `shared_inter` random channels are shared; each expert owns `expert_inter - shared_inter`
/// further random channels (experts may overlap each other).
fn random_masks(spec: &ModelSpec, seed: u64, layer: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    let i = spec.config.intermediate_size;
    let own = spec.expert_inter - spec.shared_inter;
    if spec.shared_inter + own > i || spec.expert_inter == 0 {
        return Err(Error::InvalidArgument(format!(
            "masked layout: experts of {} channels do not fit intermediate_size {i}",
            spec.expert_inter
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(tensor_seed(seed, &names::residual_mask_name(layer)));
    let mut channels: Vec<usize> = (0..i).collect();
    channels.shuffle(&mut rng);
    let mut residual = vec![0u8; i];
    for &c in &channels[..spec.shared_inter] {
        residual[c] = 1;
    }
    let mut rest = channels[spec.shared_inter..].to_vec();
    let mut experts = vec![0u8; spec.config.n_cluster * i];
    for e in 0..spec.config.n_cluster {
        rest.shuffle(&mut rng);
        for &c in &rest[..own] {
            experts[e * i + c] = 1;
        }
    }
    Ok((residual, experts))
}

/// What [`make_model`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeModel {
    /// The weight files (and `masks.safetensors` for the masked layout).
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data written.
    pub bytes: usize,
    /// Parameters written.
    pub params: usize,
}

/// Writes a random-weight model of `spec` in `layout` to `out`: `config.json`, `tokenizer.json`,
/// the weights (sharded when larger than `spec.max_shard_bytes`) and, for the masked layout,
/// `masks.safetensors`.
pub fn make_model(
    spec: &ModelSpec,
    layout: ExpertLayout,
    seed: u64,
    out: &Path,
) -> Result<MadeModel> {
    make_model_with_progress(spec, layout, seed, out, &NoProgress)
}

/// [`make_model`], reporting the bytes of weights written to `progress` (as `writing`).
pub fn make_model_with_progress(
    spec: &ModelSpec,
    layout: ExpertLayout,
    seed: u64,
    out: &Path,
    progress: &dyn Progress,
) -> Result<MadeModel> {
    let config_file = out.join("config.json");
    spec.config.validate(&config_file)?;
    if layout == ExpertLayout::Residual && spec.shared_inter >= spec.expert_inter {
        return Err(Error::InvalidArgument(format!(
            "residual layout: shared part of {} channels leaves no routed channels of {}",
            spec.shared_inter, spec.expert_inter
        )));
    }
    let plan = spec.plan(layout)?;
    if plan.family.routes_in_model() && layout != ExpertLayout::Fused {
        return Err(Error::InvalidArgument(format!(
            "the {} layout is Read-ME's; {} models are written with their Hub tensor names \
             (layout fused)",
            layout.as_str(),
            plan.family.name()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let inventory = plan.inventory();
    let dt = spec.dtype.safetensors();
    let specs: Vec<TensorSpec> = inventory.weights().map(|t| t.with_dtype(dt)).collect();
    let inits: std::collections::HashMap<&str, Init> = inventory
        .weights()
        .map(|t| (t.name.as_str(), init_of(t)))
        .collect();
    let bytes: usize = specs.iter().map(TensorSpec::byte_len).sum();
    let params: usize = specs.iter().map(TensorSpec::numel).sum();
    let produce = |s: &TensorSpec| -> Result<Vec<u8>> {
        let init = inits
            .get(s.name.as_str())
            .copied()
            .ok_or_else(|| Error::Internal(format!("no init for `{}`", s.name)))?;
        Ok(random_bytes(s, spec.dtype, init, seed))
    };
    write_synthetic_tokenizer(&out.join(TOKENIZER_FILE), spec.config.vocab_size)?;
    progress.start("writing", bytes as u64);
    let mut files = {
        let _finish = Finish(progress);
        write_model(out, &specs, spec.max_shard_bytes, &produce, Some(progress))?
    };
    let mask_specs: Vec<TensorSpec> = inventory.masks().map(|t| t.with_dtype(Dtype::U8)).collect();
    if !mask_specs.is_empty() {
        let path = out.join(MASKS_FILE);
        let masks = |s: &TensorSpec| -> Result<Vec<u8>> {
            let l = names::layer_index(&s.name)
                .ok_or_else(|| Error::Internal(format!("mask `{}`", s.name)))?;
            let (res, exp) = random_masks(spec, seed, l)?;
            Ok(if s.name.ends_with("residual_mask") {
                res
            } else {
                exp
            })
        };
        write_file(&path, &mask_specs, &masks, None)?;
        files.push(path);
    }
    // config.json last: a half-written model never looks complete.
    let mut config = spec.config.clone();
    config.torch_dtype = Some(spec.dtype.torch_name().into());
    config.write(&config_file)?;
    Ok(MadeModel {
        files,
        bytes,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_follow_the_init_and_do_not_depend_on_threads() {
        let s = TensorSpec::new("x", Dtype::F32, vec![3 * CHUNK + 5]);
        let init = Init::std(0.5);
        let a = random_bytes(&s, FloatDtype::F32, init, 7);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool.install(|| random_bytes(&s, FloatDtype::F32, init, 7));
        assert_eq!(a, b);
        assert_ne!(a, random_bytes(&s, FloatDtype::F32, init, 8));
        let vals = crate::model::checkpoint::convert_to_f32(&a, FloatDtype::F32);
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "{var}");
        assert!(vals.iter().all(|v| v.abs() <= init.bound));
        // bf16 is the f32 values truncated.
        let bf = random_bytes(&s, FloatDtype::BF16, init, 7);
        let bf = crate::model::checkpoint::convert_to_f32(&bf, FloatDtype::BF16);
        for i in [0, 1, 10, vals.len() - 1] {
            assert_eq!(bf[i].to_bits(), vals[i].to_bits() & 0xffff_0000, "{i}");
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "timing"]
    fn generation_speed() {
        let s = TensorSpec::new("x", Dtype::BF16, vec![5504, 4096]);
        let t = std::time::Instant::now();
        let mut n = 0;
        for i in 0..10 {
            n += random_bytes(&s, FloatDtype::BF16, Init::std(0.01), i).len();
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!("{:.0} MB/s", n as f64 / secs / 1e6);
    }
}
