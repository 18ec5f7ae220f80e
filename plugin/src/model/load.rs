//! Loading a model directory into host f32 weights ([`ModelWeights`]).
//!
//! Order of checks: the layout is detected from the tensor names, then the configuration is checked
//! against the tensors' shapes (a disagreement names the config field and the tensor), then every
//! tensor is converted to f32 in parallel with its exact expected shape.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use super::checkpoint::{Checkpoint, FloatDtype, TensorRef};
use super::names;
use super::progress::{Finish, NoProgress, Progress};
use super::weights::{
    ExpertLayout, ExpertWeights, LayerWeights, Linear, Matrix, ModelWeights, RouterWeights,
};
use crate::config::{config_path, ModelConfig};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Detects the expert layout from the tensor names (layer 0).
///
/// Returns [`Error::MissingTensor`] naming the fused layout's first expert tensor when no layout
/// is recognised.
pub fn detect_layout(ck: &Checkpoint) -> Result<ExpertLayout> {
    let split = &names::expert_tensor_names(0, 0)[0];
    if ck.contains(split) {
        if ck.contains(&names::shared_tensor_names(0)[0]) {
            Ok(ExpertLayout::Residual)
        } else {
            Ok(ExpertLayout::Fused)
        }
    } else if ck.contains(&names::dense_mlp_tensor_names(0)[0]) {
        Ok(ExpertLayout::Masked)
    } else {
        Err(Error::MissingTensor {
            name: split.clone(),
            dir: ck.origin().to_path_buf(),
        })
    }
}

/// The error for a masked (training-layout) checkpoint given to the engine.
pub fn masked_layout_error(dir: &Path) -> Error {
    Error::checkpoint(
        dir,
        format!(
            "this is the masked training layout (dense `mlp.*_proj` + masks.safetensors); convert it \
             first: `pregate convert --model {} --out NEW_DIR`",
            dir.display()
        ),
    )
}

/// A model directory opened but not converted: its config, memory-mapped weights, layout and
/// tokenizer. The CPU backend calls [`ModelDir::load_weights`]; a device backend may read each
/// tensor's raw bytes from [`ModelDir::checkpoint`] instead.
#[derive(Debug)]
pub struct ModelDir {
    /// The directory.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: ModelConfig,
    /// The memory-mapped weights.
    pub checkpoint: Checkpoint,
    /// The expert layout found.
    pub layout: ExpertLayout,
    /// `tokenizer.json`, when present.
    pub tokenizer: Option<Tokenizer>,
    /// Where [`ModelDir::load_weights`] reports its progress.
    progress: Option<Arc<dyn Progress>>,
}

impl ModelDir {
    /// Opens `dir`: reads `config.json` and `tokenizer.json`, maps the weights, detects the layout
    /// and checks the configuration against the tensor shapes. A masked layout is accepted here
    /// (for `inspect` and `convert`); [`ModelDir::load_weights`] rejects it.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&config_path(dir))?;
        let checkpoint = Checkpoint::open(dir)?;
        let layout = detect_layout(&checkpoint)?;
        check_config(&checkpoint, &config, layout, &config_path(dir))?;
        let tokenizer = Tokenizer::from_model_dir(dir, &config)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            config,
            checkpoint,
            layout,
            tokenizer,
            progress: None,
        })
    }

    /// Reports the progress of [`ModelDir::load_weights`] (as `loading`, in bytes of the
    /// checkpoint) to `progress`, also when an engine opened on this directory loads them.
    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Converts every weight to f32.
    pub fn load_weights(&self) -> Result<ModelWeights> {
        let progress = self.progress.as_deref().unwrap_or(&NoProgress);
        load_checked(&self.checkpoint, &self.config, self.layout, progress)
    }
}

impl ModelWeights {
    /// Loads the weights of the model directory `dir` described by `config`.
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(&ck, config)
    }

    /// Loads the weights from an opened checkpoint (errors about the config name
    /// `<checkpoint dir>/config.json`).
    pub fn from_checkpoint(ck: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let layout = detect_layout(ck)?;
        check_config(ck, config, layout, &config_path(ck.origin()))?;
        load_checked(ck, config, layout, &NoProgress)
    }
}

fn load_checked(
    ck: &Checkpoint,
    config: &ModelConfig,
    layout: ExpertLayout,
    progress: &dyn Progress,
) -> Result<ModelWeights> {
    if layout == ExpertLayout::Masked {
        return Err(masked_layout_error(ck.origin()));
    }
    progress.start("loading", ck.data_bytes() as u64);
    let _finish = Finish(progress);
    Loader { ck, progress }.model(config, layout)
}

/// Names of a layer's routed expert tensors present in the checkpoint: the highest expert index
/// plus one (0 when none).
fn experts_in_checkpoint(ck: &Checkpoint) -> usize {
    ck.names()
        .iter()
        .filter(|n| n.contains(".moe."))
        .filter_map(|n| names::expert_index(n))
        .map(|e| e + 1)
        .max()
        .unwrap_or(0)
}

/// Checks the configuration against the tensors' shapes; a disagreement is an [`Error::Config`]
/// naming the config field, the tensor and its file.
pub fn check_config(
    ck: &Checkpoint,
    cfg: &ModelConfig,
    layout: ExpertLayout,
    cfg_path: &Path,
) -> Result<()> {
    let agree = |name: &str, axis: usize, field: &str, value: usize| -> Result<()> {
        let t = ck.tensor(name)?;
        let Some(&found) = t.shape.get(axis) else {
            let mut expected = vec![0; axis + 1];
            expected[axis] = value;
            return Err(Error::Shape {
                name: name.into(),
                expected,
                found: t.shape.to_vec(),
                path: t.path.into(),
            });
        };
        if found == value {
            Ok(())
        } else {
            Err(Error::config(
                cfg_path,
                format!(
                    "{field} = {value} disagrees with tensor `{name}` of shape {:?} in {}",
                    t.shape,
                    t.path.display()
                ),
            ))
        }
    };
    let h = cfg.hidden_size;
    agree(names::EMBED, 0, "vocab_size", cfg.vocab_size)?;
    agree(names::EMBED, 1, "hidden_size", h)?;
    let [_, q, k, ..] = names::attention_tensor_names(0);
    agree(
        &q,
        0,
        "num_attention_heads * head_dim",
        cfg.num_attention_heads * cfg.head_dim(),
    )?;
    agree(
        &k,
        0,
        "num_key_value_heads * head_dim",
        cfg.num_kv_heads() * cfg.head_dim(),
    )?;
    agree(
        &names::router("embed.weight"),
        0,
        "vocab_size",
        cfg.vocab_size,
    )?;
    agree(
        &names::router("embed.weight"),
        1,
        "embedding_dim",
        cfg.embedding_dim,
    )?;
    agree(
        &names::router("proj_1_0.weight"),
        0,
        "inter_dim",
        cfg.inter_dim,
    )?;
    agree(
        &names::router("proj_out.weight"),
        0,
        "N_cluster",
        cfg.n_cluster,
    )?;

    let layers = ck
        .names()
        .iter()
        .filter_map(|n| names::layer_index(n))
        .map(|l| l + 1)
        .max()
        .unwrap_or(0);
    if layers != cfg.num_hidden_layers {
        let probe = names::attention_tensor_names(layers.saturating_sub(1))[0].clone();
        return Err(Error::config(
            cfg_path,
            format!(
                "num_hidden_layers = {} disagrees with the checkpoint, whose tensors go up to layer {} \
                 (e.g. `{probe}`) in {}",
                cfg.num_hidden_layers,
                layers as isize - 1,
                ck.origin().display()
            ),
        ));
    }
    if layout != ExpertLayout::Masked {
        let experts = experts_in_checkpoint(ck);
        if experts > cfg.n_cluster {
            return Err(Error::config(
                cfg_path,
                format!(
                    "N_cluster = {} but the checkpoint has expert tensors up to `{}` in {}",
                    cfg.n_cluster,
                    names::expert_tensor_names(0, experts - 1)[0],
                    ck.origin().display()
                ),
            ));
        }
    }
    Ok(())
}

impl RouterWeights {
    /// Reads only the router's tensors (`cluster_predictor.*`), in f32: what a device backend keeps
    /// on the host, without converting the rest of the model.
    pub fn load(ck: &Checkpoint, cfg: &ModelConfig) -> Result<Self> {
        Loader {
            ck,
            progress: &NoProgress,
        }
        .router(cfg)
    }
}

/// Converts tensors to f32 with shape checks, counting their bytes on `progress`.
struct Loader<'a> {
    ck: &'a Checkpoint,
    progress: &'a dyn Progress,
}

impl<'a> Loader<'a> {
    fn read(&self, t: TensorRef<'_>) -> Result<Vec<f32>> {
        let v = t.to_f32()?;
        self.progress.advance(t.data.len() as u64);
        Ok(v)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.read(self.ck.float_tensor(name, &[len])?)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let data = self.read(self.ck.float_tensor(name, &[rows, cols])?)?;
        Ok(Matrix::new(rows, cols, data))
    }

    fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        let (weight, bias) = rayon::join(
            || self.matrix(&names::router(&format!("{prefix}.weight")), out, inp),
            || self.vector(&names::router(&format!("{prefix}.bias")), out),
        );
        Ok(Linear {
            weight: weight?,
            bias: bias?,
        })
    }

    /// A SwiGLU block whose width is read from the gate's rows (`width`, when given, must match).
    fn ffn(&self, [gate, up, down]: &[String; 3], h: usize, width: usize) -> Result<ExpertWeights> {
        let (g, (u, d)) = rayon::join(
            || self.matrix(gate, width, h),
            || rayon::join(|| self.matrix(up, width, h), || self.matrix(down, h, width)),
        );
        Ok(ExpertWeights {
            gate: g?,
            up: u?,
            down: d?,
        })
    }

    /// The intermediate width of a SwiGLU block, from its gate tensor `[I, H]`.
    fn ffn_width(&self, gate: &str, h: usize) -> Result<usize> {
        let t = self.ck.tensor(gate)?;
        match t.shape {
            [i, hh] if *hh == h && *i > 0 => Ok(*i),
            _ => Err(Error::Shape {
                name: gate.into(),
                expected: vec![t.shape.first().copied().unwrap_or(1).max(1), h],
                found: t.shape.to_vec(),
                path: t.path.into(),
            }),
        }
    }

    fn layer(&self, cfg: &ModelConfig, layout: ExpertLayout, l: usize) -> Result<LayerWeights> {
        let h = cfg.hidden_size;
        let qd = cfg.num_attention_heads * cfg.head_dim();
        let kvd = cfg.num_kv_heads() * cfg.head_dim();
        let [inorm, q, k, v, o, pnorm] = names::attention_tensor_names(l);
        let width = self.ffn_width(&names::expert_tensor_names(l, 0)[0], h)?;
        let experts = (0..cfg.n_cluster)
            .into_par_iter()
            .map(|e| self.ffn(&names::expert_tensor_names(l, e), h, width))
            .collect::<Result<Vec<_>>>()?;
        let shared = match layout {
            ExpertLayout::Residual => {
                let sn = names::shared_tensor_names(l);
                let w = self.ffn_width(&sn[0], h)?;
                Some(self.ffn(&sn, h, w)?)
            }
            _ => None,
        };
        Ok(LayerWeights {
            input_norm: self.vector(&inorm, h)?,
            q: self.matrix(&q, qd, h)?,
            k: self.matrix(&k, kvd, h)?,
            v: self.matrix(&v, kvd, h)?,
            o: self.matrix(&o, h, qd)?,
            post_norm: self.vector(&pnorm, h)?,
            experts,
            shared,
        })
    }

    fn router(&self, cfg: &ModelConfig) -> Result<RouterWeights> {
        let d = cfg.embedding_dim;
        let f = cfg.inter_dim;
        Ok(RouterWeights {
            embed: self.matrix(&names::router("embed.weight"), cfg.vocab_size, d)?,
            input_norm: self.vector(&names::router("input_layernorm_0.weight"), d)?,
            q: self.linear("q_proj_0", d, d)?,
            k: self.linear("k_proj_0", d, d)?,
            v: self.linear("v_proj_0", d, d)?,
            o: self.linear("o_proj_0", d, d)?,
            post_norm: self.vector(&names::router("post_attention_layernorm_0.weight"), d)?,
            proj_1: self.linear("proj_1_0", f, d)?,
            proj_2: self.linear("proj_2_0", d, f)?,
            out_norm: self.vector(&names::router("out_layernorm.weight"), d)?,
            proj_out: self.linear("proj_out", cfg.n_cluster, d)?,
        })
    }

    fn model(&self, cfg: &ModelConfig, layout: ExpertLayout) -> Result<ModelWeights> {
        let v = cfg.vocab_size;
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|l| self.layer(cfg, layout, l))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(self.matrix(names::LM_HEAD, v, h)?)
        };
        Ok(ModelWeights {
            embed: self.matrix(names::EMBED, v, h)?,
            layers,
            norm: self.vector(names::FINAL_NORM, h)?,
            lm_head,
            router: self.router(cfg)?,
            layout,
        })
    }
}

/// The storage dtypes used by a checkpoint's tensors, sorted by name (`BF16` < `F16` < `F32`).
pub fn storage_dtypes(ck: &Checkpoint) -> Vec<String> {
    let mut v: Vec<String> = ck
        .names()
        .iter()
        .filter_map(|n| ck.tensor(n).ok())
        .map(|t| t.dtype.to_string())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The float dtype most of a checkpoint's bytes use (F32 when empty or unknown).
pub fn main_float_dtype(ck: &Checkpoint) -> FloatDtype {
    let mut bytes = [0usize; 3];
    for n in ck.names() {
        if let Ok(t) = ck.tensor(n) {
            if let Ok(d) = t.float_dtype() {
                bytes[d as usize] += t.data.len();
            }
        }
    }
    let order = [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16];
    order
        .into_iter()
        .max_by_key(|d| (bytes[*d as usize], *d == FloatDtype::F32))
        .unwrap_or(FloatDtype::F32)
}
