//! `pregate convert`: the masked training layout -> split experts (fused or residual).
//!
//! Expert `e` of layer `l` owns the channels `residual_mask | expert_mask[e]` (fused) or
//! `expert_mask[e] & !residual_mask` plus a shared part of the `residual_mask` channels (residual),
//! in ascending channel order: the dense gate/up rows and down columns of those channels. Weights
//! keep their stored dtype (bytes are gathered, never converted). If a layer's experts own
//! different numbers of channels, the narrower ones are padded with zero channels, which add
//! exactly nothing (`down * (silu(0) * 0) = 0`), so every expert of a layer has one width.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::checkpoint::{Checkpoint, TensorRef};
use super::load::{detect_layout, ModelDir};
use super::names;
use super::progress::{Finish, NoProgress, Progress};
use super::random::MASKS_FILE;
use super::weights::ExpertLayout;
use super::writer::{write_model, TensorSpec, DEFAULT_SHARD_BYTES};
use crate::config::config_path;
use crate::error::{Error, Result};

/// Small files copied from the input directory when present.
const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

/// What `convert` produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// Weight files written.
    pub files: Vec<PathBuf>,
    /// Per layer, the width of each expert (padded) and of the shared part (0 for fused).
    pub widths: Vec<(usize, usize)>,
    /// Channels of zero padding added over all layers and experts.
    pub padded_channels: usize,
}

/// Channel selection of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LayerPlan {
    /// Channels of each expert, ascending; padded to `width` with `None` (zero channels).
    experts: Vec<Vec<Option<usize>>>,
    /// Channels of the shared part (residual layout), ascending.
    shared: Vec<usize>,
}

/// Whether each element of a mask tensor is non-zero (any dtype of whole bytes; float `-0.0` is 0).
pub fn mask_bits(t: &TensorRef<'_>) -> Result<Vec<bool>> {
    let bits = t.dtype.bitsize();
    if bits % 8 != 0 {
        return Err(Error::Dtype {
            name: t.name.into(),
            found: t.dtype.to_string(),
            expected: "a whole-byte dtype (BOOL, U8, I32, F16, BF16, F32, ...)".into(),
            path: t.path.into(),
        });
    }
    let size = bits / 8;
    // The sign bit is the top bit of the last (little-endian) byte.
    let float = matches!(
        t.dtype,
        Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 | Dtype::F8_E4M3 | Dtype::F8_E5M2
    );
    Ok(t.data
        .chunks_exact(size)
        .map(|e| {
            let (last, rest) = e.split_last().unwrap_or((&0, &[]));
            let last = if float { last & 0x7f } else { *last };
            last != 0 || rest.iter().any(|&b| b != 0)
        })
        .collect())
}

fn plan_layer(
    masks: &Checkpoint,
    l: usize,
    n: usize,
    inter: usize,
    layout: ExpertLayout,
) -> Result<LayerPlan> {
    let res_t = masks.tensor(&names::residual_mask_name(l))?;
    res_t.expect_shape(&[inter])?;
    let exp_t = masks.tensor(&names::expert_mask_name(l))?;
    exp_t.expect_shape(&[n, inter])?;
    let residual = mask_bits(&res_t)?;
    let experts = mask_bits(&exp_t)?;
    let shared: Vec<usize> = (0..inter).filter(|&c| residual[c]).collect();
    let mut chans: Vec<Vec<usize>> = (0..n)
        .map(|e| {
            (0..inter)
                .filter(|&c| {
                    let own = experts[e * inter + c];
                    match layout {
                        ExpertLayout::Residual => own && !residual[c],
                        _ => own || residual[c],
                    }
                })
                .collect()
        })
        .collect();
    let width = chans.iter().map(Vec::len).max().unwrap_or(0);
    if width == 0 {
        return Err(Error::checkpoint(
            masks.origin(),
            format!("layer {l}: every expert mask is empty; nothing to convert"),
        ));
    }
    if layout == ExpertLayout::Residual && shared.is_empty() {
        return Err(Error::checkpoint(
            masks.origin(),
            format!(
                "layer {l}: `{}` selects no channel, so there is no shared part; use --layout fused",
                names::residual_mask_name(l)
            ),
        ));
    }
    let experts = chans
        .iter_mut()
        .map(|c| {
            let mut v: Vec<Option<usize>> = c.iter().map(|&x| Some(x)).collect();
            v.resize(width, None);
            v
        })
        .collect();
    Ok(LayerPlan { experts, shared })
}

/// Gathers rows (`by_rows`) or columns of a 2-D tensor's raw bytes; `None` gives a zero row/column.
fn gather(t: &TensorRef<'_>, idx: &[Option<usize>], by_rows: bool) -> Vec<u8> {
    let size = t.dtype.bitsize() / 8;
    let (rows, cols) = (t.shape[0], t.shape[1]);
    if by_rows {
        let row = cols * size;
        let mut out = vec![0u8; idx.len() * row];
        for (dst, src) in out.chunks_exact_mut(row).zip(idx) {
            if let Some(r) = src {
                dst.copy_from_slice(&t.data[r * row..(r + 1) * row]);
            }
        }
        out
    } else {
        let mut out = vec![0u8; rows * idx.len() * size];
        for (r, dst_row) in out.chunks_exact_mut(idx.len() * size).enumerate() {
            let src_row = &t.data[r * cols * size..(r + 1) * cols * size];
            for (dst, src) in dst_row.chunks_exact_mut(size).zip(idx) {
                if let Some(c) = src {
                    dst.copy_from_slice(&src_row[c * size..(c + 1) * size]);
                }
            }
        }
        out
    }
}

/// Where an output tensor's bytes come from.
enum Source {
    /// Copied unchanged.
    Copy(String),
    /// Rows (gate/up) or columns (down) of a dense MLP tensor.
    Gather {
        dense: String,
        channels: Vec<Option<usize>>,
        by_rows: bool,
    },
}

/// Converts the masked model in `input` to `layout` (fused or residual) in `output`.
///
/// Masks are read from `masks` (default `input/masks.safetensors`). Weights larger than
/// `max_shard_bytes` (default 4 GiB) are sharded.
pub fn convert(
    input: &Path,
    output: &Path,
    layout: ExpertLayout,
    masks: Option<&Path>,
    max_shard_bytes: Option<usize>,
) -> Result<Converted> {
    convert_with_progress(input, output, layout, masks, max_shard_bytes, &NoProgress)
}

/// [`convert`], reporting the bytes of weights written to `progress` (as `converting`).
pub fn convert_with_progress(
    input: &Path,
    output: &Path,
    layout: ExpertLayout,
    masks: Option<&Path>,
    max_shard_bytes: Option<usize>,
    progress: &dyn Progress,
) -> Result<Converted> {
    if layout == ExpertLayout::Masked {
        return Err(Error::InvalidArgument(
            "convert writes the fused or residual layout, not masked".into(),
        ));
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(input, output) {
        return Err(Error::InvalidArgument(format!(
            "--out {} is the input directory; write the converted model elsewhere",
            output.display()
        )));
    }
    let model = ModelDir::open(input)?;
    if model.layout != ExpertLayout::Masked {
        return Err(Error::InvalidArgument(format!(
            "{} is already in the {} layout; nothing to convert",
            input.display(),
            model.layout.as_str()
        )));
    }
    let cfg = &model.config;
    let ck = &model.checkpoint;
    let masks_path = masks
        .map(Path::to_path_buf)
        .unwrap_or_else(|| input.join(MASKS_FILE));
    if !masks_path.is_file() {
        return Err(Error::io(
            &masks_path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the masked layout needs its channel masks (see plugin/docs/model-format.md)",
            ),
        ));
    }
    let masks = Checkpoint::open_file(&masks_path)?;
    let (h, n) = (cfg.hidden_size, cfg.n_cluster);

    let mut specs = Vec::new();
    let mut sources: HashMap<String, Source> = HashMap::new();
    let mut widths = Vec::new();
    let mut padded = 0;
    let dense_layers: Vec<usize> = (0..cfg.num_hidden_layers).collect();
    let mut dense_names = std::collections::HashSet::new();
    for &l in &dense_layers {
        let [g, u, d] = names::dense_mlp_tensor_names(l);
        let gt = ck.tensor(&g)?;
        let inter = match gt.shape {
            [i, hh] if *hh == h => *i,
            _ => {
                return Err(Error::Shape {
                    name: g.clone(),
                    expected: vec![cfg.intermediate_size, h],
                    found: gt.shape.to_vec(),
                    path: gt.path.into(),
                })
            }
        };
        let dtype = gt.float_dtype()?.safetensors();
        ck.float_tensor(&u, &[inter, h])?;
        ck.float_tensor(&d, &[h, inter])?;
        let plan = plan_layer(&masks, l, n, inter, layout)?;
        let width = plan.experts[0].len();
        padded += plan
            .experts
            .iter()
            .map(|c| c.iter().filter(|x| x.is_none()).count())
            .sum::<usize>();
        let mut add = |names: [String; 3], channels: Vec<Option<usize>>| {
            for (name, dense, by_rows) in [
                (&names[0], &g, true),
                (&names[1], &u, true),
                (&names[2], &d, false),
            ] {
                let shape = if by_rows {
                    vec![channels.len(), h]
                } else {
                    vec![h, channels.len()]
                };
                let dt = ck.tensor(dense).map(|t| t.dtype).unwrap_or(dtype);
                specs.push(TensorSpec::new(name.clone(), dt, shape));
                sources.insert(
                    name.clone(),
                    Source::Gather {
                        dense: dense.clone(),
                        channels: channels.clone(),
                        by_rows,
                    },
                );
            }
        };
        let shared_width = if layout == ExpertLayout::Residual {
            add(
                names::shared_tensor_names(l),
                plan.shared.iter().map(|&c| Some(c)).collect(),
            );
            plan.shared.len()
        } else {
            0
        };
        for (e, channels) in plan.experts.into_iter().enumerate() {
            add(names::expert_tensor_names(l, e), channels);
        }
        widths.push((width, shared_width));
        dense_names.extend([g, u, d]);
    }
    // Everything else is copied, in the input's name order, with the experts after their layer.
    let mut copied: Vec<TensorSpec> = Vec::new();
    for name in ck.names() {
        if dense_names.contains(name) {
            continue;
        }
        let t = ck.tensor(name)?;
        copied.push(TensorSpec::new(name, t.dtype, t.shape.to_vec()));
        sources.insert(name.to_string(), Source::Copy(name.to_string()));
    }
    let mut all = copied;
    all.extend(specs);
    all.sort_by_key(|s| {
        (
            names::layer_index(&s.name).map_or(usize::MAX, |l| l),
            s.name.clone(),
        )
    });

    let total: usize = all.iter().map(TensorSpec::byte_len).sum();
    let produce = |s: &TensorSpec| -> Result<Vec<u8>> {
        match sources.get(&s.name) {
            Some(Source::Copy(name)) => Ok(ck.tensor(name)?.data.to_vec()),
            Some(Source::Gather {
                dense,
                channels,
                by_rows,
            }) => Ok(gather(&ck.tensor(dense)?, channels, *by_rows)),
            None => Err(Error::Internal(format!("no source for `{}`", s.name))),
        }
    };
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    progress.start("converting", total as u64);
    let files = {
        let _finish = Finish(progress);
        write_model(
            output,
            &all,
            max_shard_bytes.unwrap_or(DEFAULT_SHARD_BYTES),
            &produce,
            Some(progress),
        )?
    };
    for f in COPIED_FILES {
        let src = input.join(f);
        if src.is_file() {
            let dst = output.join(f);
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    let cfg_dst = config_path(output);
    std::fs::copy(config_path(input), &cfg_dst).map_err(|e| Error::io(&cfg_dst, e))?;
    // The result must load as the layout asked for.
    let check = Checkpoint::open(output)?;
    let found = detect_layout(&check)?;
    if found != layout {
        return Err(Error::Internal(format!(
            "converted model reads as {} instead of {}",
            found.as_str(),
            layout.as_str()
        )));
    }
    Ok(Converted {
        files,
        widths,
        padded_channels: padded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_of_every_dtype() {
        let u8s = [0u8, 1, 0, 7];
        let t = TensorRef {
            name: "m",
            dtype: Dtype::U8,
            shape: &[4],
            data: &u8s,
            path: Path::new("m"),
        };
        assert_eq!(mask_bits(&t).unwrap(), [false, true, false, true]);
        let f: Vec<u8> = [0.0f32, -0.0, 1.0, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = TensorRef {
            dtype: Dtype::F32,
            data: &f,
            ..t
        };
        assert_eq!(mask_bits(&t).unwrap(), [false, false, true, true]);
        let t = TensorRef {
            dtype: Dtype::F4,
            data: &u8s[..2],
            ..t
        };
        assert!(matches!(mask_bits(&t), Err(Error::Dtype { .. })));
    }

    #[test]
    fn gather_rows_and_columns_with_padding() {
        // 2 x 3 u8 matrix [[1,2,3],[4,5,6]].
        let data = [1u8, 2, 3, 4, 5, 6];
        let t = TensorRef {
            name: "w",
            dtype: Dtype::U8,
            shape: &[2, 3],
            data: &data,
            path: Path::new("w"),
        };
        assert_eq!(gather(&t, &[Some(1), None], true), [4, 5, 6, 0, 0, 0]);
        assert_eq!(
            gather(&t, &[Some(2), Some(0), None], false),
            [3, 1, 0, 6, 4, 0]
        );
    }
}
