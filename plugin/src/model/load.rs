//! Loading a model directory into host f32 weights ([`ModelWeights`]).
//!
//! Order of checks: the layout is detected from the tensor names, then the configuration is checked
//! against the tensors' shapes (a disagreement names the config field and the tensor), then every
//! tensor of [`expected_tensors`] (the one list of what the engine reads, with each shape) is
//! converted to f32 in parallel.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use super::checkpoint::{Checkpoint, FloatDtype, TensorRef};
use super::names;
use super::weights::{
    ExpertLayout, ExpertWeights, LayerWeights, Linear, Matrix, ModelWeights, RouterWeights,
};
use crate::config::{config_path, ModelConfig};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Models whose weights exceed this many bytes show a progress bar while loading (on a terminal).
const PROGRESS_BYTES: usize = 512 << 20;

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
        })
    }

    /// Converts every weight to f32.
    pub fn load_weights(&self) -> Result<ModelWeights> {
        load_checked(&self.checkpoint, &self.config, self.layout)
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
        load_checked(ck, config, layout)
    }
}

fn load_checked(
    ck: &Checkpoint,
    config: &ModelConfig,
    layout: ExpertLayout,
) -> Result<ModelWeights> {
    if layout == ExpertLayout::Masked {
        return Err(masked_layout_error(ck.origin()));
    }
    let (plan, problems) = expected_tensors(ck, config, layout);
    if let Some(e) = problems.into_iter().next() {
        return Err(e);
    }
    let loader = Loader::new(ck, &plan, true);
    let weights = loader.model(config, layout);
    if let Some(pb) = &loader.progress {
        pb.finish_and_clear();
    }
    let weights = weights?;
    loader.all_read()?;
    Ok(weights)
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

/// A tensor the engine reads, with the exact shape it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    /// Its name in the checkpoint.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl ExpectedTensor {
    fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        ExpectedTensor {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }
}

/// The router's tensors (`cluster_predictor.*`) with their shapes.
pub fn router_tensors(cfg: &ModelConfig) -> Vec<ExpectedTensor> {
    let d = cfg.embedding_dim;
    let f = cfg.inter_dim;
    let mut v = vec![
        ExpectedTensor::new(names::router("embed.weight"), &[cfg.vocab_size, d]),
        ExpectedTensor::new(names::router("input_layernorm_0.weight"), &[d]),
    ];
    let mut linear = |prefix: &str, out: usize, inp: usize| {
        v.push(ExpectedTensor::new(
            names::router(&format!("{prefix}.weight")),
            &[out, inp],
        ));
        v.push(ExpectedTensor::new(
            names::router(&format!("{prefix}.bias")),
            &[out],
        ));
    };
    for p in ["q_proj_0", "k_proj_0", "v_proj_0", "o_proj_0"] {
        linear(p, d, d);
    }
    linear("proj_1_0", f, d);
    linear("proj_2_0", d, f);
    linear("proj_out", cfg.n_cluster, d);
    v.push(ExpectedTensor::new(
        names::router("post_attention_layernorm_0.weight"),
        &[d],
    ));
    v.push(ExpectedTensor::new(
        names::router("out_layernorm.weight"),
        &[d],
    ));
    v
}

/// The width of a layer's SwiGLU blocks: the row count most of the `gates` (`[I, H]`) share (the
/// earliest on a tie), so that one odd gate is reported rather than every other one. When no gate
/// has the form `[I, H]`, the error for the first.
fn ffn_width(ck: &Checkpoint, gates: &[String], h: usize) -> Result<usize> {
    let mut counts: Vec<(usize, usize)> = Vec::new();
    let mut first_error = None;
    for g in gates {
        match ck.tensor(g) {
            Ok(t) => match t.shape {
                [i, hh] if *hh == h && *i > 0 => match counts.iter_mut().find(|(w, _)| w == i) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((*i, 1)),
                },
                _ => {
                    first_error.get_or_insert(Error::Shape {
                        name: g.clone(),
                        expected: vec![t.shape.first().copied().unwrap_or(1).max(1), h],
                        found: t.shape.to_vec(),
                        path: t.path.into(),
                    });
                }
            },
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let mut best: Option<(usize, usize)> = None;
    for (w, n) in counts {
        if best.is_none_or(|(_, bn)| n > bn) {
            best = Some((w, n));
        }
    }
    match (best, first_error) {
        (Some((w, _)), _) => Ok(w),
        (None, Some(e)) => Err(e),
        (None, None) => Err(Error::Internal("a layer with no feed-forward gate".into())),
    }
}

/// Every tensor the engine reads from a checkpoint of `layout` described by `cfg`, with the exact
/// shape each must have: the one list both [`ModelDir::load_weights`] and `inspect` check against.
/// For the masked layout, the tensors `convert` reads from the weights.
///
/// Shapes follow the configuration, except the width of each layer's feed-forward blocks, which
/// only the checkpoint tells (see `ffn_width`). A layer whose width cannot be told adds an error to
/// the second list and none of that block's tensors to the first.
pub fn expected_tensors(
    ck: &Checkpoint,
    cfg: &ModelConfig,
    layout: ExpertLayout,
) -> (Vec<ExpectedTensor>, Vec<Error>) {
    let v = cfg.vocab_size;
    let h = cfg.hidden_size;
    let qd = cfg.num_attention_heads * cfg.head_dim();
    let kvd = cfg.num_kv_heads() * cfg.head_dim();
    let mut out = vec![ExpectedTensor::new(names::EMBED, &[v, h])];
    let mut problems = Vec::new();
    let mut ffn = |out: &mut Vec<ExpectedTensor>, blocks: &[[String; 3]]| {
        let gates: Vec<String> = blocks.iter().map(|b| b[0].clone()).collect();
        match ffn_width(ck, &gates, h) {
            Ok(i) => {
                for [g, u, d] in blocks {
                    out.push(ExpectedTensor::new(g, &[i, h]));
                    out.push(ExpectedTensor::new(u, &[i, h]));
                    out.push(ExpectedTensor::new(d, &[h, i]));
                }
            }
            Err(e) => problems.push(e),
        }
    };
    for l in 0..cfg.num_hidden_layers {
        let [inorm, q, k, vv, o, pnorm] = names::attention_tensor_names(l);
        out.push(ExpectedTensor::new(inorm, &[h]));
        out.push(ExpectedTensor::new(q, &[qd, h]));
        out.push(ExpectedTensor::new(k, &[kvd, h]));
        out.push(ExpectedTensor::new(vv, &[kvd, h]));
        out.push(ExpectedTensor::new(o, &[h, qd]));
        out.push(ExpectedTensor::new(pnorm, &[h]));
        match layout {
            ExpertLayout::Fused | ExpertLayout::Residual => {
                let experts: Vec<[String; 3]> = (0..cfg.n_cluster)
                    .map(|e| names::expert_tensor_names(l, e))
                    .collect();
                ffn(&mut out, &experts);
                if layout == ExpertLayout::Residual {
                    ffn(&mut out, &[names::shared_tensor_names(l)]);
                }
            }
            ExpertLayout::Masked => ffn(&mut out, &[names::dense_mlp_tensor_names(l)]),
        }
    }
    out.push(ExpectedTensor::new(names::FINAL_NORM, &[h]));
    if !cfg.tie_word_embeddings {
        out.push(ExpectedTensor::new(names::LM_HEAD, &[v, h]));
    }
    out.extend(router_tensors(cfg));
    (out, problems)
}

/// The non-finite values a tensor check reports: the first one, with where it is.
fn non_finite_error(t: &TensorRef<'_>) -> Result<Option<Error>> {
    let Some((i, value)) = t.first_non_finite()? else {
        return Ok(None);
    };
    let mut rest = i;
    let mut at = vec![0; t.shape.len()];
    for (a, &n) in at.iter_mut().zip(t.shape).rev() {
        if n > 0 {
            *a = rest % n;
            rest /= n;
        }
    }
    Ok(Some(Error::checkpoint(
        t.path,
        format!(
            "tensor `{}` holds a non-finite value ({value}) at flat index {i} (position {at:?} \
             of shape {:?})",
            t.name, t.shape
        ),
    )))
}

/// Checks one tensor of [`expected_tensors`] as the loader reads it: present under its name, of
/// the expected shape and a float dtype, and, with `values`, every element finite (NaN and
/// infinities poison every output they reach). Returns every problem found.
pub fn check_tensor(ck: &Checkpoint, expected: &ExpectedTensor, values: bool) -> Vec<Error> {
    let t = match ck.tensor(&expected.name) {
        Ok(t) => t,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    if let Err(e) = t.expect_shape(&expected.shape) {
        problems.push(e);
    }
    match t.float_dtype() {
        Err(e) => problems.push(e),
        Ok(_) if values => match non_finite_error(&t) {
            Ok(Some(e)) | Err(e) => problems.push(e),
            Ok(None) => {}
        },
        Ok(_) => {}
    }
    problems
}

/// Converts tensors to f32 with shape checks, counting bytes on an optional progress bar.
impl RouterWeights {
    /// Reads only the router's tensors (`cluster_predictor.*`), in f32: what a device backend keeps
    /// on the host, without converting the rest of the model.
    pub fn load(ck: &Checkpoint, cfg: &ModelConfig) -> Result<Self> {
        let plan = router_tensors(cfg);
        let loader = Loader::new(ck, &plan, false);
        let router = loader.router()?;
        loader.all_read()?;
        Ok(router)
    }
}

/// Reads the tensors of a plan ([`expected_tensors`]): the loading code names each tensor where it
/// goes, its shape comes from the plan alone, and every planned tensor must be read exactly once.
struct Loader<'a> {
    ck: &'a Checkpoint,
    shapes: HashMap<&'a str, &'a [usize]>,
    reads: AtomicUsize,
    progress: Option<ProgressBar>,
}

impl<'a> Loader<'a> {
    fn new(ck: &'a Checkpoint, plan: &'a [ExpectedTensor], progress: bool) -> Self {
        let total = ck.data_bytes();
        let progress = (progress && total > PROGRESS_BYTES && std::io::stderr().is_terminal())
            .then(|| {
                let pb = ProgressBar::new(total as u64);
                if let Ok(style) = ProgressStyle::with_template(
                    "loading {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                ) {
                    pb.set_style(style);
                }
                pb
            });
        Loader {
            ck,
            shapes: plan
                .iter()
                .map(|t| (t.name.as_str(), t.shape.as_slice()))
                .collect(),
            reads: AtomicUsize::new(0),
            progress,
        }
    }

    /// Whether every planned tensor was read (the plan and the loading code agree).
    fn all_read(&self) -> Result<()> {
        let reads = self.reads.load(Ordering::Relaxed);
        if reads == self.shapes.len() {
            Ok(())
        } else {
            Err(Error::Internal(format!(
                "the loader read {reads} tensors but the tensor plan lists {}",
                self.shapes.len()
            )))
        }
    }

    fn read(&self, name: &str) -> Result<(Vec<f32>, &'a [usize])> {
        let shape = self.shapes.get(name).copied().ok_or_else(|| {
            Error::Internal(format!(
                "the loader reads `{name}`, which the tensor plan does not list"
            ))
        })?;
        let t = self.ck.float_tensor(name, shape)?;
        let v = t.to_f32()?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(pb) = &self.progress {
            pb.inc(t.data.len() as u64);
        }
        Ok((v, shape))
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.read(name)?.0)
    }

    fn matrix(&self, name: &str) -> Result<Matrix> {
        match self.read(name)? {
            (data, &[rows, cols]) => Ok(Matrix::new(rows, cols, data)),
            (_, shape) => Err(Error::Internal(format!(
                "the tensor plan gives the matrix `{name}` the shape {shape:?}"
            ))),
        }
    }

    fn linear(&self, prefix: &str) -> Result<Linear> {
        let (weight, bias) = rayon::join(
            || self.matrix(&names::router(&format!("{prefix}.weight"))),
            || self.vector(&names::router(&format!("{prefix}.bias"))),
        );
        Ok(Linear {
            weight: weight?,
            bias: bias?,
        })
    }

    fn ffn(&self, [gate, up, down]: &[String; 3]) -> Result<ExpertWeights> {
        let (g, (u, d)) = rayon::join(
            || self.matrix(gate),
            || rayon::join(|| self.matrix(up), || self.matrix(down)),
        );
        Ok(ExpertWeights {
            gate: g?,
            up: u?,
            down: d?,
        })
    }

    fn layer(&self, cfg: &ModelConfig, layout: ExpertLayout, l: usize) -> Result<LayerWeights> {
        let [inorm, q, k, v, o, pnorm] = names::attention_tensor_names(l);
        let experts = (0..cfg.n_cluster)
            .into_par_iter()
            .map(|e| self.ffn(&names::expert_tensor_names(l, e)))
            .collect::<Result<Vec<_>>>()?;
        let shared = match layout {
            ExpertLayout::Residual => Some(self.ffn(&names::shared_tensor_names(l))?),
            _ => None,
        };
        Ok(LayerWeights {
            input_norm: self.vector(&inorm)?,
            q: self.matrix(&q)?,
            k: self.matrix(&k)?,
            v: self.matrix(&v)?,
            o: self.matrix(&o)?,
            post_norm: self.vector(&pnorm)?,
            experts,
            shared,
        })
    }

    fn router(&self) -> Result<RouterWeights> {
        Ok(RouterWeights {
            embed: self.matrix(&names::router("embed.weight"))?,
            input_norm: self.vector(&names::router("input_layernorm_0.weight"))?,
            q: self.linear("q_proj_0")?,
            k: self.linear("k_proj_0")?,
            v: self.linear("v_proj_0")?,
            o: self.linear("o_proj_0")?,
            post_norm: self.vector(&names::router("post_attention_layernorm_0.weight"))?,
            proj_1: self.linear("proj_1_0")?,
            proj_2: self.linear("proj_2_0")?,
            out_norm: self.vector(&names::router("out_layernorm.weight"))?,
            proj_out: self.linear("proj_out")?,
        })
    }

    fn model(&self, cfg: &ModelConfig, layout: ExpertLayout) -> Result<ModelWeights> {
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|l| self.layer(cfg, layout, l))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(self.matrix(names::LM_HEAD)?)
        };
        Ok(ModelWeights {
            embed: self.matrix(names::EMBED)?,
            layers,
            norm: self.vector(names::FINAL_NORM)?,
            lm_head,
            router: self.router()?,
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
