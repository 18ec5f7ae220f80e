//! `pregate inspect`: what a model directory holds, without converting any weight, and (by
//! default) whether the engine could load it: every tensor it would read is checked for presence,
//! dtype, shape and finite values against the model's tensor inventory (the loader's own list,
//! [`crate::model::family::Inventory`]).

use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use super::checkpoint::{Checkpoint, TensorRef};
use super::convert::mask_bits;
use super::family::{DSelectKind, GatingRule, QkNorm, TensorRole, TensorSpec};
use super::load::{check_config, storage_dtypes, ModelDir};
use super::names;
use super::random::MASKS_FILE;
use super::weights::ExpertLayout;
use crate::config::{config_path, ModelConfig};
use crate::error::{Error, Result};

/// How much of a model `inspect` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Check {
    /// `config.json` and the safetensors headers only, stopping at the first problem: cheap for
    /// huge checkpoints, but a model that passes may still fail to load.
    Headers,
    /// Also every tensor the engine reads: present, a float dtype, the shape the config implies
    /// and every element finite; all problems are reported together.
    #[default]
    Full,
}

/// Every problem that keeps the engine from loading `model` or poisons its outputs: the config
/// disagreeing with the tensors, and each weight of the model's inventory missing, of another
/// shape, not a float dtype or (with `values`) holding a NaN or an infinity. Empty for a sound
/// model. Tensors are checked in parallel; the problems come back in the inventory's order.
pub fn validate(model: &ModelDir, values: bool) -> Vec<Error> {
    let ck = &model.checkpoint;
    let mut problems = Vec::new();
    if let Err(e) = check_config(ck, &model.config, model.layout, &config_path(&model.dir)) {
        problems.push(e);
    }
    let inventory = model.plan.inventory();
    let specs: Vec<&TensorSpec> = inventory.weights().collect();
    let per_tensor: Vec<Vec<Error>> = specs
        .par_iter()
        .map(|t| check_tensor(ck, t, values))
        .collect();
    problems.extend(per_tensor.into_iter().flatten());
    // The config check and the per-tensor checks can find the same missing tensor.
    let mut seen = std::collections::HashSet::new();
    problems.retain(|e| seen.insert(e.to_string()));
    problems
}

/// The first non-finite value of a tensor, with where it is.
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

/// Checks one tensor of the inventory as the loader reads it: present under its name, of the
/// expected shape and a float dtype, and, with `values`, every element finite (NaN and infinities
/// poison every output they reach). Returns every problem found.
pub fn check_tensor(ck: &Checkpoint, expected: &TensorSpec, values: bool) -> Vec<Error> {
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

/// The error `inspect` returns for a model with problems: all of them, one per line.
fn problems_error(dir: &Path, problems: &[Error]) -> Error {
    let n = problems.len();
    let list: String = problems.iter().map(|p| format!("\n  - {p}")).collect();
    Error::checkpoint(
        dir,
        format!(
            "{n} problem{} found; the engine would refuse this model or compute garbage with it:{list}",
            if n == 1 { "" } else { "s" }
        ),
    )
}

/// Parameter counts of a model directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamReport {
    /// Every parameter in the weight files (router included).
    pub total: usize,
    /// Parameters one token reads: everything but the experts it is not routed to. For the masked
    /// layout, counted as after `convert --layout fused`; `None` if its masks are missing.
    pub active_per_token: Option<usize>,
    /// The pre-gating router's parameters.
    pub router: usize,
    /// All routed and shared expert parameters (the dense MLPs for the masked layout).
    pub experts: usize,
}

/// The expert geometry of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerExperts {
    /// Channels of each routed expert (fused layout: shared channels included).
    pub expert_inter: usize,
    /// Channels of the shared part (residual layout; 0 otherwise).
    pub shared_inter: usize,
    /// Bytes of one routed expert in this layer (gate + up + down) in the storage dtype.
    pub bytes_per_expert: usize,
    /// `moe`, or `dense` for a layer with one MLP (then the widths above are 0).
    pub kind: String,
}

/// Everything `inspect` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelReport {
    /// The directory.
    pub dir: String,
    /// The model family (`Read-ME`, `Mixtral`, `Qwen2-MoE`, `Qwen3-MoE`, `OLMoE`).
    pub family: String,
    /// How tokens are routed: `pre-gate` (before the backbone) or the in-model gate's rule.
    pub routing: String,
    /// The attention's extras beyond Llama's (`q/k/v bias`, `QK norm per head`, ...), or none.
    pub attention_extras: Vec<String>,
    /// `fused`, `residual` or `masked`.
    pub layout: String,
    /// Storage dtypes found (`BF16`, `F16`, `F32`, ...).
    pub dtypes: Vec<String>,
    /// The weight files.
    pub files: Vec<String>,
    /// Bytes of tensor data.
    pub weight_bytes: usize,
    /// Whether `tokenizer.json` exists.
    pub tokenizer: bool,
    /// Its vocabulary size.
    pub tokenizer_vocab: Option<usize>,
    /// Parameter counts.
    pub params: ParamReport,
    /// Per layer expert geometry (for the masked layout, from its masks, as `convert` would fuse).
    pub layers: Vec<LayerExperts>,
    /// `config.json`.
    pub config: ModelConfig,
    /// How many tensors were checked in full (presence, dtype, shape, values): `None` when only
    /// the headers were read ([`Check::Headers`]).
    pub tensors_checked: Option<usize>,
}

fn numel(ck: &Checkpoint, name: &str) -> usize {
    ck.tensor(name).map(|t| t.numel()).unwrap_or(0)
}

fn bytes(ck: &Checkpoint, names: &[String]) -> usize {
    names
        .iter()
        .filter_map(|n| ck.tensor(n).ok())
        .map(|t| t.data.len())
        .sum()
}

/// Inspects the model directory `dir`, checking every tensor the engine reads ([`Check::Full`]).
/// A model with problems is an error listing all of them.
pub fn inspect(dir: &Path) -> Result<ModelReport> {
    inspect_with(dir, Check::Full)
}

/// Inspects the model directory `dir`, reading as much as `check` says.
pub fn inspect_with(dir: &Path, check: Check) -> Result<ModelReport> {
    let model = match check {
        Check::Headers => ModelDir::open(dir)?,
        Check::Full => {
            // As `ModelDir::open`, but the config check joins the list of problems rather than
            // ending the inspection.
            let model = ModelDir::open_for_inspection(dir)?;
            let problems = validate(&model, true);
            if !problems.is_empty() {
                return Err(problems_error(dir, &problems));
            }
            model
        }
    };
    let checked = (check == Check::Full).then(|| model.plan.inventory().weights().count());
    report(dir, &model, checked)
}

fn report(dir: &Path, model: &ModelDir, tensors_checked: Option<usize>) -> Result<ModelReport> {
    let ck = &model.checkpoint;
    let cfg = &model.config;
    let all = ck.names();
    let total: usize = all.iter().map(|n| numel(ck, n)).sum();
    let router: usize = all
        .iter()
        .filter(|n| n.starts_with(names::ROUTER_PREFIX))
        .map(|n| numel(ck, n))
        .sum();
    let is_ffn = |n: &str| n.contains(".moe.") || n.contains(".mlp.");
    let mut experts: usize = all.iter().filter(|n| is_ffn(n)).map(|n| numel(ck, n)).sum();
    let h = cfg.hidden_size;
    let k = cfg.experts_per_token();
    let mut layers = Vec::new();
    let mut active = Some(total - experts);
    let plan = &model.plan;
    let in_model = plan.family.routes_in_model();
    if in_model {
        // The families name their tensors their own way: count by role. Everything but the
        // routed experts is read by every token of its layer.
        let inventory = plan.inventory();
        let numel = |keep: fn(&TensorRole) -> bool| -> usize {
            inventory
                .weights()
                .filter(|t| keep(&t.role))
                .map(|t| t.numel())
                .sum()
        };
        let routed = numel(|r| {
            matches!(
                r,
                TensorRole::Expert { .. } | TensorRole::StackedExperts { .. }
            )
        });
        experts = routed + numel(|r| matches!(r, TensorRole::SharedExpert { .. }));
        active = Some(total - routed);
    }
    for l in (0..cfg.num_hidden_layers).filter(|_| in_model) {
        let Some(m) = plan.moe(l) else {
            layers.push(LayerExperts {
                expert_inter: 0,
                shared_inter: 0,
                bytes_per_expert: 0,
                kind: "dense".into(),
            });
            continue;
        };
        let inventory = plan.inventory();
        let elem = inventory
            .get(TensorRole::Gate { layer: l })
            // A DSelect-k model has no softmax gate: its first expert's dtype.
            .or_else(|| {
                inventory.get(TensorRole::Expert {
                    layer: l,
                    expert: 0,
                    proj: super::family::FfnProj::Gate,
                })
            })
            .and_then(|g| ck.tensor(&g.name).ok())
            .map_or(2, |t| t.dtype.bitsize() / 8);
        active = active.map(|a| a + 3 * h * k * m.expert_inter);
        layers.push(LayerExperts {
            expert_inter: m.expert_inter,
            shared_inter: m.shared.map_or(0, |s| s.inter),
            bytes_per_expert: 3 * h * m.expert_inter * elem,
            kind: "moe".into(),
        });
    }
    for l in (0..cfg.num_hidden_layers).filter(|_| !in_model) {
        let (expert_inter, shared_inter, bytes_per_expert) = match model.layout {
            ExpertLayout::Fused | ExpertLayout::Residual => {
                let e0 = names::expert_tensor_names(l, 0);
                let width = ck.tensor(&e0[0]).map(|t| t.shape[0]).unwrap_or(0);
                let shared = ck
                    .tensor(&names::shared_tensor_names(l)[0])
                    .map(|t| t.shape[0])
                    .unwrap_or(0);
                (width, shared, bytes(ck, &e0))
            }
            ExpertLayout::Masked => {
                let width = masked_width(dir, l, cfg.n_cluster).ok();
                let dense = names::dense_mlp_tensor_names(l);
                let elem = ck
                    .tensor(&dense[0])
                    .map(|t| t.dtype.bitsize() / 8)
                    .unwrap_or(2);
                match width {
                    Some(w) => (w, 0, 3 * h * w * elem),
                    None => (0, 0, 0),
                }
            }
        };
        active = active.and_then(|a| {
            (expert_inter > 0).then(|| a + 3 * h * (k * expert_inter + shared_inter))
        });
        layers.push(LayerExperts {
            expert_inter,
            shared_inter,
            bytes_per_expert,
            kind: "moe".into(),
        });
    }
    let routing = match plan
        .moe(0)
        .or_else(|| (0..plan.layers.len()).find_map(|l| plan.moe(l)))
    {
        Some(m) => match m.gating {
            GatingRule::PreGate => "pre-gate (Read-ME router, before the backbone)".to_string(),
            GatingRule::SoftmaxTopK { renormalize } => format!(
                "in-model gate per layer: softmax over {} experts, top-{}{}{}",
                m.experts,
                m.top_k,
                if renormalize { ", renormalised" } else { "" },
                match m.shared {
                    Some(s) if s.gated => format!(", sigmoid-gated shared expert of {}", s.inter),
                    _ => String::new(),
                }
            ),
            GatingRule::DSelect(kind) => format!(
                "DSelect-k gate per layer ({}): {} selectors over {} experts{}",
                kind.config_name(),
                m.top_k,
                m.experts,
                match kind {
                    DSelectKind::Static => ", routed before the backbone",
                    DSelectKind::PerExample => ", from the hidden state",
                }
            ),
        },
        None => "none".into(),
    };
    let mut attention_extras = Vec::new();
    if let Some(a) = plan.layers.first().map(|l| &l.attention) {
        if a.qkv_bias {
            attention_extras.push("q/k/v bias".to_string());
        }
        match a.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => attention_extras.push("QK RMSNorm per head".into()),
            QkNorm::Full => attention_extras.push("QK RMSNorm over the full width".into()),
        }
        if let Some(c) = cfg.clip_qkv() {
            attention_extras.push(format!("clip_qkv {c}"));
        }
        if let Some(w) = a.sliding_window {
            attention_extras.push(format!("sliding window {w}"));
        }
    }
    Ok(ModelReport {
        family: plan.family.name().into(),
        routing,
        attention_extras,
        dir: dir.display().to_string(),
        layout: model.layout.as_str().into(),
        dtypes: storage_dtypes(ck),
        files: ck.files().iter().map(|p| p.display().to_string()).collect(),
        weight_bytes: ck.data_bytes(),
        tokenizer: model.tokenizer.is_some(),
        tokenizer_vocab: model.tokenizer.as_ref().map(|t| t.vocab_size()),
        params: ParamReport {
            total,
            active_per_token: active,
            router,
            experts,
        },
        layers,
        config: cfg.clone(),
        tensors_checked,
    })
}

/// The fused expert width of layer `l` of a masked model: the most channels any expert owns.
fn masked_width(dir: &Path, l: usize, n: usize) -> Result<usize> {
    let masks = Checkpoint::open_file(&dir.join(MASKS_FILE))?;
    let res = mask_bits(&masks.tensor(&names::residual_mask_name(l))?)?;
    let exp = mask_bits(&masks.tensor(&names::expert_mask_name(l))?)?;
    let i = res.len();
    Ok((0..n)
        .map(|e| {
            (0..i)
                .filter(|&c| res[c] || exp.get(e * i + c).copied().unwrap_or(false))
                .count()
        })
        .max()
        .unwrap_or(0))
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn human_bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

impl ModelReport {
    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let mut line = |t: String| {
            s.push_str(&t);
            s.push('\n');
        };
        line(format!("model        {} ({})", self.dir, self.family));
        line(format!(
            "layout       {} ({} weight file{}, {}, {})",
            self.layout,
            self.files.len(),
            if self.files.len() == 1 { "" } else { "s" },
            self.dtypes.join("+"),
            human_bytes(self.weight_bytes)
        ));
        line(format!(
            "tokenizer    {}",
            match self.tokenizer_vocab {
                Some(v) => format!("tokenizer.json ({v} tokens)"),
                None => "none (prompts must be token ids)".into(),
            }
        ));
        line(format!(
            "backbone     {} layers, hidden {}, {} heads ({} kv, head {}), vocab {}, context {}, rope_theta {}, tied embeddings {}",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.head_dim(),
            c.vocab_size,
            c.max_position_embeddings,
            c.rope_theta,
            c.tie_word_embeddings
        ));
        if !self.attention_extras.is_empty() {
            line(format!("attention    {}", self.attention_extras.join(", ")));
        }
        line(format!("routing      {}", self.routing));
        let dense: Vec<String> = (self.layers.iter().enumerate())
            .filter(|(_, l)| l.kind == "dense")
            .map(|(i, _)| i.to_string())
            .collect();
        if !dense.is_empty() {
            line(format!(
                "layers       {} MoE, dense (one MLP of {}): {}",
                self.layers.len() - dense.len(),
                c.intermediate_size,
                dense.join(", ")
            ));
        }
        if let Some(r) = &c.readme_router {
            line(format!(
                "router       width {}, {} heads, mlp {}, {} experts, top-{}, normalizer {}",
                r.embedding_dim, r.n_head, r.inter_dim, c.n_cluster, c.router_top_k, r.normalizer
            ));
        }
        line(format!(
            "parameters   total {}, active per token {}, router {}, experts {}",
            human(self.params.total),
            self.params
                .active_per_token
                .map_or("unknown (masks missing)".into(), human),
            human(self.params.router),
            human(self.params.experts)
        ));
        let moe: Vec<&LayerExperts> = self.layers.iter().filter(|l| l.kind == "moe").collect();
        let widths: Vec<usize> = moe.iter().map(|l| l.expert_inter).collect();
        let same = widths.windows(2).all(|w| w[0] == w[1]);
        if let Some(first) = moe.first() {
            if same {
                line(format!(
                    "experts      {} per layer x {} layers, {} channels{} each; one expert-layer = {}",
                    c.num_experts(),
                    moe.len(),
                    first.expert_inter,
                    if first.shared_inter > 0 {
                        format!(" + shared part of {}", first.shared_inter)
                    } else {
                        String::new()
                    },
                    human_bytes(first.bytes_per_expert)
                ));
            } else {
                for (l, e) in self.layers.iter().enumerate() {
                    line(format!(
                        "layer {l:<6} {} channels per expert (shared {}), {} per expert",
                        e.expert_inter,
                        e.shared_inter,
                        human_bytes(e.bytes_per_expert)
                    ));
                }
            }
            let all: usize = self
                .layers
                .iter()
                .map(|l| l.bytes_per_expert)
                .sum::<usize>()
                * c.num_experts();
            line(format!("all experts  {}", human_bytes(all)));
        }
        line(match self.tensors_checked {
            Some(n) => format!(
                "checked      all {n} tensors the engine reads: present, dtype, shape, finite values"
            ),
            None => "checked      config and headers only (tensor values not read)".into(),
        });
        if self.layout == "masked" {
            line(
                "note         masked training layout: run `pregate convert` before serving".into(),
            );
        }
        s
    }
}
