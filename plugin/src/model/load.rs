//! Loading a model directory into host f32 weights ([`ModelWeights`]).
//!
//! Order of checks: the layout is detected from the tensor names, then the configuration is checked
//! against the tensors' shapes (a disagreement names the config field and the tensor), then every
//! tensor is converted to f32 in parallel with its exact expected shape.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use std::collections::HashMap;

use super::checkpoint::{Checkpoint, FloatDtype};
use super::family::inventory::pre_gate_inventory;
use super::family::{
    hub, AttnProj, DSelectKind, DSelectPart, ExpertStorage, FfnPlan, FfnProj, GatingRule,
    Inventory, ModelPlan, MoePlan, PreGatePart, QkNorm, StackedProj, TensorRole, TensorSpec,
};
use super::names;
use super::progress::{Finish, NoProgress, Progress};
use super::weights::{
    ExpertLayout, ExpertWeights, LayerExtras, LayerWeights, Linear, Matrix, ModelWeights,
    RouterWeights,
};
use crate::config::{config_path, ModelConfig, ReadMeRouterConfig};
use crate::engine::cpu::BackboneWeights;
use crate::error::{Error, Result};
use crate::router::dselect::{DSelectGate, GateParams};
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
    /// The model's description, with the expert widths found in the checkpoint: its
    /// [`ModelPlan::inventory`] lists every tensor the engine reads, by role.
    pub plan: ModelPlan,
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
        Self::open_checked(dir, true)
    }

    /// [`ModelDir::open`] without the check of the configuration against the tensor shapes:
    /// inspection reports that check's finding among all the others instead of stopping at it.
    pub(crate) fn open_for_inspection(dir: &Path) -> Result<Self> {
        Self::open_checked(dir, false)
    }

    fn open_checked(dir: &Path, check: bool) -> Result<Self> {
        let config = ModelConfig::from_file(&config_path(dir))?;
        let checkpoint = Checkpoint::open(dir)?;
        let layout = layout_of(&checkpoint, &config)?;
        if check {
            check_config(&checkpoint, &config, layout, &config_path(dir))?;
        }
        let plan = ModelPlan::from_checkpoint(&config, &checkpoint, layout)?;
        let tokenizer = Tokenizer::from_model_dir(dir, &config)?;
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            config,
            checkpoint,
            layout,
            plan,
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

    /// Converts every weight to f32 (Read-ME: the backbone and its pre-gating router; a family
    /// routed in the model has no such router, see [`ModelDir::load_backbone`]).
    pub fn load_weights(&self) -> Result<ModelWeights> {
        let (backbone, router) = self.load_backbone()?;
        ModelWeights::with_router(backbone, router, &self.plan)
    }

    /// Converts every weight to f32: the backbone, and the pre-gating router when the family has
    /// one (Read-ME; `None` for the families whose layers route themselves).
    pub fn load_backbone(&self) -> Result<(BackboneWeights, Option<RouterWeights>)> {
        let progress = self.progress.as_deref().unwrap_or(&NoProgress);
        load_checked(&self.checkpoint, &self.config, &self.plan, progress)
    }
}

/// The expert layout of a checkpoint: detected from Read-ME's names, or whole SwiGLU experts (as
/// Read-ME's fused layout) for the families routed in the model.
fn layout_of(ck: &Checkpoint, config: &ModelConfig) -> Result<ExpertLayout> {
    match config.family() {
        Ok(f) if f.routes_in_model() => Ok(ExpertLayout::Fused),
        _ => detect_layout(ck),
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
        let layout = layout_of(ck, config)?;
        check_config(ck, config, layout, &config_path(ck.origin()))?;
        if layout == ExpertLayout::Masked {
            return Err(masked_layout_error(ck.origin()));
        }
        let plan = ModelPlan::from_checkpoint(config, ck, layout)?;
        let (backbone, router) = load_checked(ck, config, &plan, &NoProgress)?;
        Self::with_router(backbone, router, &plan)
    }

    /// A loaded backbone and its pre-gating router as Read-ME weights; a family routed in the
    /// model has no such router (its weights: [`ModelDir::load_backbone`]).
    fn with_router(
        backbone: BackboneWeights,
        router: Option<RouterWeights>,
        plan: &ModelPlan,
    ) -> Result<Self> {
        let router = router.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} routes inside the model: it has no pre-gating router to load \
                 (ModelDir::load_backbone loads its weights)",
                plan.family.name()
            ))
        })?;
        Ok(ModelWeights {
            embed: backbone.embed,
            layers: backbone.layers,
            norm: backbone.norm,
            lm_head: backbone.lm_head,
            router,
            layout: plan.layout,
        })
    }
}

fn load_checked(
    ck: &Checkpoint,
    config: &ModelConfig,
    plan: &ModelPlan,
    progress: &dyn Progress,
) -> Result<(BackboneWeights, Option<RouterWeights>)> {
    if plan.layout == ExpertLayout::Masked {
        return Err(masked_layout_error(ck.origin()));
    }
    progress.start("loading", ck.data_bytes() as u64);
    let _finish = Finish(progress);
    Loader { ck, progress }.model(config, plan)
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
    let family = cfg.family().map_err(|m| Error::config(cfg_path, m))?;
    if family.routes_in_model() {
        check_layer_count(ck, cfg, cfg_path)?;
        return check_family_config(ck, cfg, cfg_path, &agree);
    }
    agree(
        &names::router("embed.weight"),
        0,
        "vocab_size",
        cfg.vocab_size,
    )?;
    let router = cfg.router_config()?;
    agree(
        &names::router("embed.weight"),
        1,
        "embedding_dim",
        router.embedding_dim,
    )?;
    agree(
        &names::router("proj_1_0.weight"),
        0,
        "inter_dim",
        router.inter_dim,
    )?;
    agree(
        &names::router("proj_out.weight"),
        0,
        "N_cluster",
        cfg.n_cluster,
    )?;

    check_layer_count(ck, cfg, cfg_path)?;
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

/// The checkpoint's layers (the highest `model.layers.{l}.` plus one) must be the config's.
pub(crate) fn check_layer_count(ck: &Checkpoint, cfg: &ModelConfig, cfg_path: &Path) -> Result<()> {
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
    Ok(())
}

/// A Hugging Face family's config against its first MoE layer: the router's rows are the
/// experts, the first expert's rows its width, and no expert index beyond the config's.
fn check_family_config(
    ck: &Checkpoint,
    cfg: &ModelConfig,
    cfg_path: &Path,
    agree: &dyn Fn(&str, usize, &str, usize) -> Result<()>,
) -> Result<()> {
    let family = cfg.family().map_err(|m| Error::config(cfg_path, m))?;
    let Some(l) = (0..cfg.num_hidden_layers).find(|&l| cfg.is_moe_layer(l)) else {
        return Ok(());
    };
    let experts = cfg.num_experts();
    let experts_field = cfg.experts_field();
    // A DSelect-k gate has no `[experts, H]` router; its tensors' shapes are checked as read.
    if cfg.dselect_gate().is_none() {
        agree(&hub::gate_name(family, l), 0, experts_field, experts)?;
    }
    let (width, width_field) = cfg.expert_intermediate_size();
    let per_expert = hub::expert_names(family, l, 0);
    if ck.contains(&per_expert[0]) {
        agree(&per_expert[0], 0, width_field, width)?;
    } else if ck.contains(&hub::stacked_expert_names(l)[0]) {
        agree(&hub::stacked_expert_names(l)[0], 0, experts_field, experts)?;
        agree(&hub::stacked_expert_names(l)[1], 2, width_field, width)?;
    }
    let names = ck.names();
    let beyond = names
        .iter()
        .filter(|n| n.contains(".experts.") && !n.contains("shared_expert"))
        .filter_map(|n| Some((n, hub::expert_index(n)?)))
        .find(|(_, e)| *e >= experts);
    if let Some((name, _)) = beyond {
        return Err(Error::config(
            cfg_path,
            format!(
                "{experts_field} = {experts} but the checkpoint has `{name}` in {}",
                ck.origin().display()
            ),
        ));
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

/// Tensors read by role, taken out one by one as the weights are assembled.
struct Parts<'a> {
    inventory: &'a Inventory,
    data: HashMap<TensorRole, Vec<f32>>,
}

impl Parts<'_> {
    fn take(&mut self, role: TensorRole) -> Result<(Vec<f32>, &TensorSpec)> {
        let spec = self.inventory.require(role)?;
        let data = self
            .data
            .remove(&role)
            .ok_or_else(|| Error::Internal(format!("`{}` was not read", spec.name)))?;
        Ok((data, spec))
    }

    fn vector(&mut self, role: TensorRole) -> Result<Vec<f32>> {
        Ok(self.take(role)?.0)
    }

    fn matrix(&mut self, role: TensorRole) -> Result<Matrix> {
        let (data, spec) = self.take(role)?;
        match spec.shape[..] {
            [rows, cols] => Ok(Matrix::new(rows, cols, data)),
            _ => Err(Error::Internal(format!("`{}` is not a matrix", spec.name))),
        }
    }

    fn linear(&mut self, part: PreGatePart) -> Result<Linear> {
        Ok(Linear {
            weight: self.matrix(TensorRole::PreGate { part, bias: false })?,
            bias: self.vector(TensorRole::PreGate { part, bias: true })?,
        })
    }

    fn ffn(&mut self, role: impl Fn(FfnProj) -> TensorRole) -> Result<ExpertWeights> {
        Ok(ExpertWeights {
            gate: self.matrix(role(FfnProj::Gate))?,
            up: self.matrix(role(FfnProj::Up))?,
            down: self.matrix(role(FfnProj::Down))?,
        })
    }

    fn layer(&mut self, plan: &ModelPlan, l: usize, gamma: f32) -> Result<LayerWeights> {
        let attn = |proj| TensorRole::Attention { layer: l, proj };
        let lp = plan
            .layer(l)
            .ok_or_else(|| Error::Internal(format!("no plan for layer {l}")))?;
        let (mut experts, mut shared, mut extra) = (Vec::new(), None, LayerExtras::default());
        match &lp.ffn {
            FfnPlan::Dense { .. } => {
                extra.dense = Some(self.ffn(|proj| TensorRole::DenseMlp { layer: l, proj })?);
            }
            FfnPlan::Moe(moe) => {
                experts = match plan.expert_storage {
                    ExpertStorage::PerExpert => (0..moe.experts)
                        .map(|e| {
                            self.ffn(|proj| TensorRole::Expert {
                                layer: l,
                                expert: e,
                                proj,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?,
                    ExpertStorage::Stacked => self.stacked_experts(l, moe.experts)?,
                };
                if moe.shared.is_some() {
                    shared = Some(self.ffn(|proj| TensorRole::SharedExpert { layer: l, proj })?);
                }
                if moe.shared.is_some_and(|s| s.gated) {
                    extra.shared_gate =
                        Some(self.vector(TensorRole::SharedExpertGate { layer: l })?);
                }
                match moe.gating {
                    GatingRule::SoftmaxTopK { .. } => {
                        extra.gate = Some(self.matrix(TensorRole::Gate { layer: l })?);
                    }
                    GatingRule::DSelect(kind) => {
                        extra.dselect = Some(self.dselect(kind, l, moe, plan.hidden, gamma)?);
                    }
                    GatingRule::PreGate => {}
                }
            }
        }
        if lp.attention.qkv_bias {
            let bias = |proj| TensorRole::AttentionBias { layer: l, proj };
            extra.qkv_bias = Some([
                self.vector(bias(AttnProj::Q))?,
                self.vector(bias(AttnProj::K))?,
                self.vector(bias(AttnProj::V))?,
            ]);
        }
        if lp.attention.qk_norm != QkNorm::None {
            extra.qk_norm = Some([
                self.vector(TensorRole::QueryNorm { layer: l })?,
                self.vector(TensorRole::KeyNorm { layer: l })?,
            ]);
        }
        Ok(LayerWeights {
            input_norm: self.vector(TensorRole::InputNorm { layer: l })?,
            q: self.matrix(attn(AttnProj::Q))?,
            k: self.matrix(attn(AttnProj::K))?,
            v: self.matrix(attn(AttnProj::V))?,
            o: self.matrix(attn(AttnProj::O))?,
            post_norm: self.vector(TensorRole::PostAttentionNorm { layer: l })?,
            experts,
            shared,
            extra,
        })
    }

    /// Layer `l`'s DSelect-k gate of `kind` (its tensors' shapes were checked as they were read).
    fn dselect(
        &mut self,
        kind: DSelectKind,
        l: usize,
        moe: &MoePlan,
        hidden: usize,
        gamma: f32,
    ) -> Result<DSelectGate> {
        let mut part = |part| self.vector(TensorRole::DSelect { layer: l, part });
        let params = match kind {
            DSelectKind::Static => GateParams::Static {
                z: part(DSelectPart::Z)?,
                alpha: part(DSelectPart::Alpha)?,
            },
            DSelectKind::PerExample => GateParams::PerExample {
                dim: hidden,
                w_z: part(DSelectPart::ZWeight)?,
                b_z: part(DSelectPart::ZBias)?,
                w_a: part(DSelectPart::AlphaWeight)?,
                b_a: part(DSelectPart::AlphaBias)?,
            },
        };
        DSelectGate::new(moe.experts, moe.top_k, gamma, params)
            .map_err(|e| Error::Internal(format!("layer {l}'s DSelect-k gate: {e}")))
    }

    /// Layer `l`'s experts sliced out of its stacked `gate_up_proj [E, 2I, H]` (each expert's
    /// gate rows, then its up rows) and `down_proj [E, H, I]`.
    fn stacked_experts(&mut self, l: usize, n: usize) -> Result<Vec<ExpertWeights>> {
        let stacked = |proj| TensorRole::StackedExperts { layer: l, proj };
        let (gate_up, spec) = self.take(stacked(StackedProj::GateUp))?;
        let (i, h) = match spec.shape[..] {
            [_, two_i, h] => (two_i / 2, h),
            _ => return Err(Error::Internal(format!("`{}` is not 3-D", spec.name))),
        };
        let (down, _) = self.take(stacked(StackedProj::Down))?;
        let block = i * h;
        Ok((0..n)
            .map(|e| {
                let gu = &gate_up[e * 2 * block..(e + 1) * 2 * block];
                ExpertWeights {
                    gate: Matrix::new(i, h, gu[..block].to_vec()),
                    up: Matrix::new(i, h, gu[block..].to_vec()),
                    down: Matrix::new(h, i, down[e * block..(e + 1) * block].to_vec()),
                }
            })
            .collect())
    }

    fn router(&mut self, config: ReadMeRouterConfig) -> Result<RouterWeights> {
        let norm = |part| TensorRole::PreGate { part, bias: false };
        Ok(RouterWeights {
            embed: self.matrix(norm(PreGatePart::Embed))?,
            input_norm: self.vector(norm(PreGatePart::InputNorm))?,
            q: self.linear(PreGatePart::Q)?,
            k: self.linear(PreGatePart::K)?,
            v: self.linear(PreGatePart::V)?,
            o: self.linear(PreGatePart::O)?,
            post_norm: self.vector(norm(PreGatePart::PostNorm))?,
            proj_1: self.linear(PreGatePart::Proj1)?,
            proj_2: self.linear(PreGatePart::Proj2)?,
            out_norm: self.vector(norm(PreGatePart::OutNorm))?,
            proj_out: self.linear(PreGatePart::ProjOut)?,
            config,
        })
    }
}

impl<'a> Loader<'a> {
    /// Reads every weight tensor of `inventory` to f32, in parallel, each with its exact shape.
    fn read_all<'i>(&self, inventory: &'i Inventory) -> Result<Parts<'i>> {
        let data = inventory
            .weights()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|s| {
                let t = self
                    .ck
                    .float_tensor(&s.name, &s.shape)
                    .map_err(|e| name_the_expert(e, s))?;
                let v = t.to_f32()?;
                self.progress.advance(t.data.len() as u64);
                Ok((s.role, v))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Parts { inventory, data })
    }

    fn router(&self, cfg: &ModelConfig) -> Result<RouterWeights> {
        let config = cfg.router_config()?.clone();
        let inventory = pre_gate_inventory(&config, cfg.vocab_size, cfg.num_experts());
        self.read_all(&inventory)?.router(config)
    }

    fn model(
        &self,
        cfg: &ModelConfig,
        plan: &ModelPlan,
    ) -> Result<(BackboneWeights, Option<RouterWeights>)> {
        let inventory = plan.inventory();
        let mut parts = self.read_all(&inventory)?;
        let layers = (0..plan.layers.len())
            .map(|l| parts.layer(plan, l, cfg.dselect_gamma()))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = match plan.tied_embeddings {
            true => None,
            false => Some(parts.matrix(TensorRole::LmHead)?),
        };
        let router = match plan.pre_gate {
            Some(_) => Some(parts.router(cfg.router_config()?.clone())?),
            None => None,
        };
        let backbone = BackboneWeights {
            embed: parts.matrix(TensorRole::Embedding)?,
            layers,
            norm: parts.vector(TensorRole::FinalNorm)?,
            lm_head,
        };
        Ok((backbone, router))
    }
}

/// A missing routed-expert tensor of a Hugging Face family is reported with its layer and
/// expert, so a checkpoint cut short (a lost shard) says which experts it lacks. (Read-ME's keep
/// [`Error::MissingTensor`], whose name ends in the expert's index.)
fn name_the_expert(e: Error, spec: &TensorSpec) -> Error {
    match (e, spec.role) {
        (Error::MissingTensor { name, dir }, TensorRole::Expert { layer, expert, .. })
            if hub::expert_index(&name).is_some() =>
        {
            Error::checkpoint(
                dir,
                format!("layer {layer}, expert {expert}: tensor `{name}` is missing"),
            )
        }
        (Error::MissingTensor { name, dir }, TensorRole::StackedExperts { layer, .. }) => {
            Error::checkpoint(
                dir,
                format!("layer {layer}: the experts' tensor `{name}` is missing"),
            )
        }
        (e, _) => e,
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
