//! `config.json`: a Hugging Face config of a served family (Read-ME's LlamaConfig plus its router
//! fields; Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE as transformers writes them).
//!
//! The format is documented in `plugin/docs/model-format.md`. Parsing is lenient about fields pregate
//! does not use and strict about the ones it does: every inconsistency is reported with the file's path.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::family::{DSelectKind, ModelFamily, QkNorm};

/// `eos_token_id` may be one id or a list of ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids, any of which ends a sequence.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_rms_eps() -> f32 {
    1e-6
}
fn default_one() -> usize {
    1
}
fn default_normalizer() -> f32 {
    1.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_router_positions() -> usize {
    4096
}
fn default_true() -> bool {
    true
}

/// The Read-ME pre-gating router (`cluster_predictor`), read from flat keys of `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadMeRouterConfig {
    /// The model carries a pre-gating router; pregate requires true.
    #[serde(default = "default_true")]
    pub add_cluster_predictor: bool,
    /// Router width.
    pub embedding_dim: usize,
    /// Router MLP width.
    pub inter_dim: usize,
    /// Router blocks (1 in every released checkpoint).
    #[serde(default = "default_one")]
    pub n_layer: usize,
    /// Router attention heads.
    pub n_head: usize,
    /// Router attention logits are divided by this (not by sqrt(head size)).
    #[serde(default = "default_normalizer")]
    pub normalizer: f32,
    /// Router MLP activation; only `silu` exists.
    #[serde(default = "default_act")]
    pub hidden_act_predictor: String,
    /// Router context length.
    #[serde(default = "default_router_positions")]
    pub max_position_embeddings_predictor: usize,
    /// Non-autoregressive router variant; pregate supports the causal one only.
    #[serde(default)]
    pub nonautoregressive: bool,
}

impl ReadMeRouterConfig {
    /// The keys the router needs; the others have defaults.
    pub const REQUIRED: [&'static str; 3] = ["embedding_dim", "inter_dim", "n_head"];

    /// Per-head size of the router.
    pub fn head_dim(&self) -> usize {
        self.embedding_dim / self.n_head.max(1)
    }

    /// Checks the router's values; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::config(path, msg));
        for (name, v) in [
            ("embedding_dim", self.embedding_dim),
            ("inter_dim", self.inter_dim),
            ("n_head", self.n_head),
            (
                "max_position_embeddings_predictor",
                self.max_position_embeddings_predictor,
            ),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if !self.add_cluster_predictor {
            return bad(
                "add_cluster_predictor is false: pregate needs the pre-gating router".into(),
            );
        }
        if self.embedding_dim % self.n_head != 0 || (self.embedding_dim / self.n_head) % 2 != 0 {
            return bad(format!(
                "router embedding_dim {} must split into {} heads of even size",
                self.embedding_dim, self.n_head
            ));
        }
        if self.n_layer != 1 {
            return bad(format!(
                "router n_layer {} is unsupported: Read-ME routers have one block",
                self.n_layer
            ));
        }
        if self.hidden_act_predictor != "silu" {
            return bad(format!(
                "hidden_act_predictor `{}` is unsupported (only `silu`)",
                self.hidden_act_predictor
            ));
        }
        if self.nonautoregressive {
            return bad("nonautoregressive routers are unsupported: routes must be causal".into());
        }
        if !(self.normalizer.is_finite() && self.normalizer > 0.0) {
            return bad(format!("normalizer {} must be positive", self.normalizer));
        }
        Ok(())
    }
}

/// Every router key optional: which of them `config.json` has decides whether a router is
/// described at all (none of them) or described incompletely (an error naming the missing key).
#[derive(Deserialize)]
struct RouterKeys {
    add_cluster_predictor: Option<bool>,
    embedding_dim: Option<usize>,
    inter_dim: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    normalizer: Option<f32>,
    hidden_act_predictor: Option<String>,
    max_position_embeddings_predictor: Option<usize>,
    nonautoregressive: Option<bool>,
}

fn readme_router_keys<'de, D>(d: D) -> std::result::Result<Option<ReadMeRouterConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let k = RouterKeys::deserialize(d)?;
    let any = k.add_cluster_predictor.is_some()
        || k.embedding_dim.is_some()
        || k.inter_dim.is_some()
        || k.n_layer.is_some()
        || k.n_head.is_some()
        || k.normalizer.is_some()
        || k.hidden_act_predictor.is_some()
        || k.max_position_embeddings_predictor.is_some()
        || k.nonautoregressive.is_some();
    if !any {
        return Ok(None);
    }
    let (Some(embedding_dim), Some(inter_dim), Some(n_head)) =
        (k.embedding_dim, k.inter_dim, k.n_head)
    else {
        let present = [k.embedding_dim, k.inter_dim, k.n_head].map(|v| v.is_some());
        let missing = ReadMeRouterConfig::REQUIRED
            .iter()
            .zip(present)
            .find(|(_, p)| !p)
            .map_or("embedding_dim", |(name, _)| name);
        return Err(serde::de::Error::custom(format!(
            "the Read-ME router fields are incomplete: missing `{missing}`"
        )));
    };
    Ok(Some(ReadMeRouterConfig {
        add_cluster_predictor: k.add_cluster_predictor.unwrap_or(true),
        embedding_dim,
        inter_dim,
        n_layer: k.n_layer.unwrap_or_else(default_one),
        n_head,
        normalizer: k.normalizer.unwrap_or_else(default_normalizer),
        hidden_act_predictor: k.hidden_act_predictor.unwrap_or_else(default_act),
        max_position_embeddings_predictor: k
            .max_position_embeddings_predictor
            .unwrap_or_else(default_router_positions),
        nonautoregressive: k.nonautoregressive.unwrap_or(false),
    }))
}

/// The fields of the Hugging Face MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), each as
/// transformers names it; absent ones take the family's transformers default (see the
/// accessors of [`ModelConfig`]). Written back only when set, so a Read-ME config stays as it was.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FamilyFields {
    /// The MLP activation; only `silu` is served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Mixtral's experts per layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_local_experts: Option<usize>,
    /// Qwen's and OLMoE's experts per layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    /// Experts each token is routed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_experts_per_tok: Option<usize>,
    /// Qwen's routed expert width (`intermediate_size` is then the dense layers').
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    /// Qwen2-MoE's shared expert width.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_expert_intermediate_size: Option<usize>,
    /// Whether the top-k weights are renormalised to sum to 1 (Qwen, OLMoE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// Qwen: layer `l` is MoE iff `(l + 1) % decoder_sparse_step == 0` (and not in `mlp_only_layers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder_sparse_step: Option<usize>,
    /// Qwen: layers with a dense MLP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Qwen2-MoE: q, k and v carry biases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qkv_bias: Option<bool>,
    /// Qwen3-MoE, OLMoE: q, k, v and o carry biases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// OLMoE: q, k and v are clamped to `[-clip_qkv, clip_qkv]` after their projection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_qkv: Option<f32>,
    /// Mixtral: sliding-window attention when set; Qwen: the window when `use_sliding_window`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen: whether sliding-window attention is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// transformers v5: each layer's attention kind (`full_attention`, `sliding_attention`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// RoPE scaling (transformers v4 key); only none is served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Llama's MLP bias; only false is served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// pregate's own: the Hugging Face families' gate replaced by a DSelect-k gate per layer,
    /// `dselect_static` or `dselect_per_example` (see [`DSelectKind`]); absent: the family's gate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pregate_gate: Option<String>,
    /// pregate's own: the DSelect-k smooth-step width `gamma` (1.0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dselect_gamma: Option<f32>,
}

/// The model configuration, as read from `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture names; pregate serves `ReadMEForCausalLM`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Hugging Face model type (`llama` for Read-ME checkpoints).
    #[serde(default)]
    pub model_type: Option<String>,
    /// Vocabulary size of the backbone (and of the router's embedding).
    pub vocab_size: usize,
    /// Backbone width.
    pub hidden_size: usize,
    /// Dense MLP width of the training layout; informational for split layouts.
    #[serde(default)]
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head size; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon of the backbone.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f32,
    /// RoPE base; the router uses it too.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    /// Context length of the backbone.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares `embed_tokens`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id, added before text prompts.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Storage dtype hint (`bfloat16`, `float16`, `float32`).
    #[serde(default)]
    pub torch_dtype: Option<String>,

    /// Experts per layer (Read-ME's `N_cluster`). Checked per family: Read-ME requires it.
    #[serde(rename = "N_cluster", default)]
    pub n_cluster: usize,
    /// Read-ME's pre-gating router (`cluster_predictor`), from the same flat keys; `None` when
    /// `config.json` has none of them.
    #[serde(flatten, deserialize_with = "readme_router_keys")]
    pub readme_router: Option<ReadMeRouterConfig>,
    /// pregate: experts per token (1 = Read-ME's argmax routing).
    #[serde(default = "default_one")]
    pub router_top_k: usize,
    /// The Hugging Face MoE families' fields.
    #[serde(flatten)]
    pub moe: FamilyFields,
}

impl ModelConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and validates a config from JSON text; `path` is used in error messages only.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::config(path, e.to_string()))?;
        // The family first: a model pregate does not serve is named as such, not as a missing field.
        let architectures: Vec<String> = value
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let model_type = value.get("model_type").and_then(|v| v.as_str());
        let family =
            ModelFamily::detect(&architectures, model_type).map_err(|m| Error::config(path, m))?;
        let mut value = value;
        normalize_hf_keys(&mut value, family).map_err(|m| Error::config(path, m))?;
        let cfg: ModelConfig =
            serde_json::from_value(value).map_err(|e| Error::config(path, e.to_string()))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The model family `architectures` / `model_type` name (an error lists the supported ones).
    pub fn family(&self) -> std::result::Result<ModelFamily, String> {
        ModelFamily::detect(&self.architectures, self.model_type.as_deref())
    }

    fn family_or_readme(&self) -> ModelFamily {
        self.family().unwrap_or(ModelFamily::ReadMe)
    }

    /// Routed experts per layer (Read-ME's `N_cluster`, Mixtral's `num_local_experts`, the
    /// others' `num_experts`; transformers' default when absent).
    pub fn num_experts(&self) -> usize {
        let m = &self.moe;
        match self.family_or_readme() {
            ModelFamily::ReadMe => self.n_cluster,
            // transformers v5 maps either name onto the other (Qwen3-MoE saves
            // `num_local_experts`), so both are read in every family.
            f => m.num_experts.or(m.num_local_experts).unwrap_or(match f {
                ModelFamily::Mixtral => 8,
                ModelFamily::Qwen2Moe => 60,
                ModelFamily::Qwen3Moe => 128,
                _ => 64,
            }),
        }
    }

    /// The config field [`ModelConfig::num_experts`] reads, for messages.
    pub fn experts_field(&self) -> &'static str {
        match self.family_or_readme() {
            ModelFamily::ReadMe => "N_cluster",
            _ if self.moe.num_experts.is_some() => "num_experts",
            ModelFamily::Mixtral => "num_local_experts",
            _ if self.moe.num_local_experts.is_some() => "num_local_experts",
            _ => "num_experts",
        }
    }

    /// Experts each token is routed to (Read-ME's `router_top_k`, the others'
    /// `num_experts_per_tok`).
    pub fn experts_per_token(&self) -> usize {
        let k = self.moe.num_experts_per_tok;
        match self.family_or_readme() {
            ModelFamily::ReadMe => self.router_top_k,
            ModelFamily::Mixtral => k.unwrap_or(2),
            ModelFamily::Qwen2Moe => k.unwrap_or(4),
            ModelFamily::Qwen3Moe | ModelFamily::Olmoe => k.unwrap_or(8),
        }
    }

    /// The config field [`ModelConfig::experts_per_token`] reads, for messages.
    fn top_k_field(&self) -> &'static str {
        match self.family_or_readme() {
            ModelFamily::ReadMe => "router_top_k",
            _ => "num_experts_per_tok",
        }
    }

    /// Channels of one routed expert of an in-model-routed family (Qwen's
    /// `moe_intermediate_size`, else `intermediate_size`), with the field's name. Read-ME's
    /// widths are read from its checkpoint instead.
    pub fn expert_intermediate_size(&self) -> (usize, &'static str) {
        match self.family_or_readme() {
            ModelFamily::Qwen2Moe => (
                self.moe.moe_intermediate_size.unwrap_or(1408),
                "moe_intermediate_size",
            ),
            ModelFamily::Qwen3Moe => (
                self.moe.moe_intermediate_size.unwrap_or(768),
                "moe_intermediate_size",
            ),
            _ => (self.intermediate_size, "intermediate_size"),
        }
    }

    /// Qwen2-MoE's shared expert width (its output scaled by a sigmoid gate); `None` for the
    /// families without one.
    pub fn gated_shared_expert_size(&self) -> Option<usize> {
        match self.family_or_readme() {
            ModelFamily::Qwen2Moe => Some(self.moe.shared_expert_intermediate_size.unwrap_or(5632)),
            _ => None,
        }
    }

    /// Whether an in-model router divides the top-k weights by their sum: always for Mixtral,
    /// by `norm_topk_prob` for Qwen and OLMoE (default false).
    pub fn renormalize_top_k(&self) -> bool {
        match self.family_or_readme() {
            ModelFamily::Mixtral => true,
            _ => self.moe.norm_topk_prob.unwrap_or(false),
        }
    }

    /// The DSelect-k gate `pregate_gate` chooses, if any (an unknown value is refused by
    /// validation, and reads here as none).
    pub fn dselect_gate(&self) -> Option<DSelectKind> {
        match self.moe.pregate_gate.as_deref()? {
            "dselect_static" => Some(DSelectKind::Static),
            "dselect_per_example" => Some(DSelectKind::PerExample),
            _ => None,
        }
    }

    /// The DSelect-k smooth-step width (`dselect_gamma`, 1.0).
    pub fn dselect_gamma(&self) -> f32 {
        self.moe.dselect_gamma.unwrap_or(1.0)
    }

    /// Whether layer `l` has routed experts; the others have a dense MLP of
    /// `intermediate_size` (Qwen's `mlp_only_layers` and `decoder_sparse_step`).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        match self.family_or_readme() {
            ModelFamily::Qwen2Moe | ModelFamily::Qwen3Moe => {
                let step = self.moe.decoder_sparse_step.unwrap_or(1).max(1);
                let dense = self.moe.mlp_only_layers.as_deref().unwrap_or(&[]);
                !dense.contains(&l) && (l + 1) % step == 0
            }
            _ => true,
        }
    }

    /// Whether q, k and v carry biases (Qwen2-MoE's `qkv_bias`, default true).
    pub fn qkv_bias(&self) -> bool {
        match self.family_or_readme() {
            ModelFamily::Qwen2Moe => self.moe.qkv_bias.unwrap_or(true),
            _ => false,
        }
    }

    /// How queries and keys are RMS-normalised before RoPE.
    pub fn qk_norm(&self) -> QkNorm {
        match self.family_or_readme() {
            ModelFamily::Qwen3Moe => QkNorm::PerHead,
            ModelFamily::Olmoe => QkNorm::Full,
            _ => QkNorm::None,
        }
    }

    /// OLMoE's clamp of q, k and v after their projection (and the QK norm), if set.
    pub fn clip_qkv(&self) -> Option<f32> {
        match self.family_or_readme() {
            ModelFamily::Olmoe => self.moe.clip_qkv,
            _ => None,
        }
    }

    /// Mixtral's sliding window (`sliding_window`): a query sees itself and the `w - 1` positions
    /// before it. `None` without one, and for the other families, whose `use_sliding_window` is
    /// refused by validation.
    pub fn sliding_window(&self) -> Option<NonZeroUsize> {
        match self.family_or_readme() {
            ModelFamily::Mixtral => self.moe.sliding_window.and_then(NonZeroUsize::new),
            _ => None,
        }
    }

    /// Checks the Hugging Face MoE families' fields: every feature a config asks for that pregate
    /// does not compute is refused, naming the field.
    fn validate_family(&self, family: ModelFamily) -> std::result::Result<(), String> {
        let m = &self.moe;
        if let Some(act) = &m.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "hidden_act `{act}` is not served (only `silu`: SwiGLU experts)"
                ));
            }
        }
        if m.mlp_bias == Some(true) {
            return Err("mlp_bias true is not served (the MLPs have no biases)".into());
        }
        if family == ModelFamily::ReadMe {
            if m.pregate_gate.is_some() {
                return Err(
                    "`pregate_gate` applies to the Hugging Face MoE families only \
                            (Read-ME is routed by its own pre-gating router)"
                        .into(),
                );
            }
            return Ok(());
        }
        if let Some(g) = &m.pregate_gate {
            if self.dselect_gate().is_none() {
                return Err(format!(
                    "pregate_gate `{g}` is not a gate pregate has (`dselect_static`, \
                     `dselect_per_example`)"
                ));
            }
        }
        if let Some(gamma) = m.dselect_gamma {
            if !(gamma.is_finite() && gamma > 0.0) {
                return Err(format!("dselect_gamma {gamma} must be a finite number > 0"));
            }
        }
        let (experts, k) = (self.num_experts(), self.experts_per_token());
        let (ef, kf) = (self.experts_field(), self.top_k_field());
        if experts == 0 || experts > crate::route::MAX_EXPERTS {
            return Err(format!(
                "{ef} {experts} must be 1..={} experts per layer",
                crate::route::MAX_EXPERTS
            ));
        }
        if k == 0 || k > crate::route::MAX_TOP_K {
            return Err(format!(
                "{kf} {k} must be 1..={} (the most experts per token pregate serves)",
                crate::route::MAX_TOP_K
            ));
        }
        if k > experts {
            return Err(format!("{kf} {k} exceeds {ef} {experts}"));
        }
        let (width, wf) = self.expert_intermediate_size();
        if width == 0 {
            return Err(format!("`{wf}` (the expert width) must be positive"));
        }
        if self.gated_shared_expert_size() == Some(0) {
            return Err("`shared_expert_intermediate_size` must be positive".into());
        }
        if m.decoder_sparse_step == Some(0) {
            return Err("`decoder_sparse_step` must be positive".into());
        }
        // Without walking every layer (num_hidden_layers is input): the MoE candidates are
        // every step-th layer, and one more of them than `mlp_only_layers` lists settles it.
        let layers = self.num_hidden_layers;
        let step = m.decoder_sparse_step.unwrap_or(1).max(1);
        let listed = m.mlp_only_layers.as_deref().unwrap_or(&[]);
        let has_moe = (1..=listed.len() + 1)
            .map(|n| n.saturating_mul(step) - 1)
            .take_while(|&l| l < layers)
            .any(|l| self.is_moe_layer(l));
        if !has_moe {
            return Err(
                "no layer has experts (mlp_only_layers / decoder_sparse_step): not an MoE model"
                    .into(),
            );
        }
        let has_dense = (matches!(family, ModelFamily::Qwen2Moe | ModelFamily::Qwen3Moe)
            && (step > 1 || listed.iter().any(|&l| l < layers)));
        if has_dense && self.intermediate_size == 0 {
            return Err("`intermediate_size` (the dense layers' width) must be positive".into());
        }
        if let Some(kind) = self.dselect_gate() {
            if experts < 2 {
                return Err(format!("a DSelect-k gate needs {ef} >= 2, got {experts}"));
            }
            // A pre-gate router gives every layer a route; a dense layer has none to take.
            if kind == DSelectKind::Static && has_dense {
                return Err(
                    "pregate_gate `dselect_static` needs every layer to be an MoE layer".into(),
                );
            }
        }
        for (what, width) in [
            ("expert", width),
            (
                "shared expert",
                self.gated_shared_expert_size().unwrap_or(0),
            ),
            ("dense MLP", self.intermediate_size),
        ] {
            if width
                .checked_mul(self.hidden_size)
                .and_then(|n| n.checked_mul(experts.max(1) * 12))
                .is_none_or(|n| n > isize::MAX as usize)
            {
                return Err(format!(
                    "the {what} width {width} x hidden_size is too large for any tensor"
                ));
            }
        }
        // Mixtral's one window serves every layer; Qwen's applies to some layers only
        // (`max_window_layers`) and is off in every released checkpoint, so it stays refused.
        let window_in_use = match family {
            ModelFamily::Mixtral if m.sliding_window == Some(0) => {
                Some("sliding_window 0 leaves a query no key to attend to (at least 1)".into())
            }
            ModelFamily::Qwen2Moe | ModelFamily::Qwen3Moe if m.use_sliding_window == Some(true) => {
                Some(
                    "use_sliding_window true asks for sliding-window attention, which pregate \
                     does not implement"
                        .into(),
                )
            }
            _ => None,
        };
        if let Some(msg) = window_in_use {
            return Err(msg);
        }
        if let Some(t) = m
            .layer_types
            .iter()
            .flatten()
            .find(|t| t.as_str() != "full_attention")
        {
            return Err(format!(
                "layer_types has `{t}`: only `full_attention` layers are served"
            ));
        }
        if matches!(family, ModelFamily::Qwen3Moe | ModelFamily::Olmoe)
            && m.attention_bias == Some(true)
        {
            return Err("attention_bias true is not served (q/k/v/o without biases)".into());
        }
        if let Some(c) = self.clip_qkv() {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!("clip_qkv {c} must be positive"));
            }
        }
        Ok(())
    }

    /// Read-ME's router configuration, or the error a Read-ME model without one gets.
    pub fn router_config(&self) -> Result<&ReadMeRouterConfig> {
        self.readme_router
            .as_ref()
            .ok_or_else(|| Error::config("config.json", missing_router()))
    }

    /// Checks the values against each other; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::config(path, msg));
        let family = self.family().map_err(|m| Error::config(path, m))?;
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("router_top_k", self.router_top_k),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("`{name}` must be positive"));
            }
        }
        if family == ModelFamily::ReadMe {
            if self.n_cluster == 0 {
                return bad("Read-ME needs `N_cluster` (experts per layer), positive".into());
            }
            match &self.readme_router {
                Some(router) => router.validate(path)?,
                None => return bad(missing_router()),
            }
        }
        if let Err(m) = self.validate_family(family) {
            return bad(m);
        }
        if self.vocab_size > u32::MAX as usize {
            return bad(format!("vocab_size {} is too large", self.vocab_size));
        }
        if self.n_cluster > crate::route::MAX_EXPERTS {
            return bad(format!(
                "N_cluster {} exceeds the supported {} experts per layer",
                self.n_cluster,
                crate::route::MAX_EXPERTS
            ));
        }
        if self.router_top_k > crate::route::MAX_TOP_K {
            return bad(format!(
                "router_top_k {} exceeds the supported {} experts per token",
                self.router_top_k,
                crate::route::MAX_TOP_K
            ));
        }
        if family == ModelFamily::ReadMe && self.router_top_k > self.n_cluster {
            return bad(format!(
                "router_top_k {} exceeds N_cluster {}",
                self.router_top_k, self.n_cluster
            ));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() == 0 {
            return bad("head_dim must be positive".into());
        }
        // Weight shapes are products of these sizes: one that overflows is not a real model, and
        // would wrap (or panic) in the shape arithmetic of the loader and the engines.
        let router = self.readme_router.as_ref();
        let products = [
            (
                "vocab_size x hidden_size",
                self.vocab_size,
                self.hidden_size,
            ),
            (
                "vocab_size x embedding_dim",
                self.vocab_size,
                router.map_or(0, |r| r.embedding_dim),
            ),
            (
                "num_attention_heads x head_dim",
                self.num_attention_heads,
                self.head_dim(),
            ),
            (
                "N_cluster x inter_dim",
                self.n_cluster,
                router.map_or(0, |r| r.inter_dim),
            ),
            (
                "hidden_size x inter_dim",
                self.hidden_size,
                router.map_or(0, |r| r.inter_dim),
            ),
            (
                "hidden_size x intermediate_size",
                self.hidden_size,
                self.intermediate_size,
            ),
            (
                "num_attention_heads x head_dim x hidden_size",
                self.num_attention_heads.saturating_mul(self.head_dim()),
                self.hidden_size,
            ),
        ];
        for (what, a, b) in products {
            // Bytes of an f32 tensor this size must fit in an `isize`.
            if a.checked_mul(b)
                .and_then(|n| n.checked_mul(4))
                .is_none_or(|n| n > isize::MAX as usize)
            {
                return bad(format!("{what} ({a} x {b}) is too large for any tensor"));
            }
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head size {} must be even for RoPE",
                self.head_dim()
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || self.num_attention_heads % kv != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta {} must be > 1", self.rope_theta));
        }
        for id in self.eos_token_ids().into_iter().chain(self.bos_token_id) {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "special token id {id} is outside the vocabulary ({})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Per-head size of the backbone.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Key/value heads of the backbone.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// End-of-sequence ids (possibly none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// The longest sequence both the backbone and the router can hold.
    pub fn max_context(&self) -> usize {
        let router = self
            .readme_router
            .as_ref()
            .map_or(usize::MAX, |r| r.max_position_embeddings_predictor);
        self.max_position_embeddings.min(router)
    }

    /// Writes the config as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
    }
}

/// transformers' defaults of the fields a family's `config.json` may leave out, where they differ
/// from Read-ME's (the serde defaults): `rope_theta`, `rms_norm_eps`, `num_key_value_heads`.
fn family_defaults(family: ModelFamily) -> [(&'static str, serde_json::Value); 3] {
    use serde_json::json;
    let null = serde_json::Value::Null;
    match family {
        ModelFamily::ReadMe => [("", null.clone()), ("", null.clone()), ("", null)],
        ModelFamily::Mixtral => [
            ("rope_theta", json!(1e6)),
            ("rms_norm_eps", json!(1e-5)),
            ("num_key_value_heads", json!(8)),
        ],
        ModelFamily::Qwen2Moe => [
            ("rope_theta", json!(1e4)),
            ("rms_norm_eps", json!(1e-6)),
            ("num_key_value_heads", json!(16)),
        ],
        ModelFamily::Qwen3Moe => [
            ("rope_theta", json!(1e4)),
            ("rms_norm_eps", json!(1e-6)),
            ("num_key_value_heads", json!(4)),
        ],
        ModelFamily::Olmoe => [
            ("rope_theta", json!(1e4)),
            ("rms_norm_eps", json!(1e-5)),
            ("", null),
        ],
    }
}

/// Checks a RoPE description (`rope_parameters` of transformers v5, `rope_scaling` of v4): only
/// plain RoPE is served; any other type or parameter is refused naming `field.key`.
fn plain_rope(field: &str, v: &serde_json::Value) -> std::result::Result<Option<f64>, String> {
    let Some(obj) = v.as_object() else {
        return match v.is_null() {
            true => Ok(None),
            false => Err(format!("`{field}` must be an object, got {v}")),
        };
    };
    // The type first: it names what is asked for better than the parameters it comes with.
    for k in ["rope_type", "type"] {
        match obj.get(k) {
            Some(val) if val.as_str() != Some("default") => {
                return Err(format!(
                    "{field}.{k} {val} is not served: pregate implements plain RoPE (`default`)"
                ))
            }
            _ => {}
        }
    }
    let mut theta = None;
    for (k, val) in obj {
        match k.as_str() {
            "rope_type" | "type" => {}
            "rope_theta" if field == "rope_parameters" => match val.as_f64() {
                Some(t) => theta = Some(t),
                None => return Err(format!("{field}.rope_theta {val} is not a number")),
            },
            _ => {
                return Err(format!(
                    "{field}.{k} is not served: pregate implements plain RoPE (`default`)"
                ))
            }
        }
    }
    Ok(theta)
}

/// Brings the two spellings transformers writes to one: `dtype` (v5) is `torch_dtype` (v4);
/// `rope_parameters.rope_theta` (v5) is `rope_theta` (v4), with any RoPE scaling refused; and
/// the family's defaults fill the fields its config may omit.
fn normalize_hf_keys(
    value: &mut serde_json::Value,
    family: ModelFamily,
) -> std::result::Result<(), String> {
    let Some(obj) = value.as_object_mut() else {
        return Ok(());
    };
    if let Some(d) = obj.remove("dtype") {
        obj.entry("torch_dtype").or_insert(d);
    }
    if let Some(scaling) = obj.get("rope_scaling") {
        plain_rope("rope_scaling", scaling)?;
    }
    if let Some(params) = obj.remove("rope_parameters") {
        if let Some(theta) = plain_rope("rope_parameters", &params)? {
            match obj.get("rope_theta").and_then(|t| t.as_f64()) {
                Some(top) if top != theta => {
                    return Err(format!(
                        "rope_theta {top} disagrees with rope_parameters.rope_theta {theta}"
                    ))
                }
                _ => {
                    obj.insert("rope_theta".into(), serde_json::json!(theta));
                }
            }
        }
    }
    for (key, default) in family_defaults(family) {
        if !key.is_empty() && obj.get(key).is_none_or(|v| v.is_null()) {
            obj.insert(key.into(), default);
        }
    }
    Ok(())
}

/// The error of a Read-ME config without its router fields.
fn missing_router() -> String {
    format!(
        "Read-ME needs its cluster_predictor: missing `{}`",
        ReadMeRouterConfig::REQUIRED[0]
    )
}

/// The path of `config.json` inside a model directory.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["ReadMEForCausalLM"],
            "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "N_cluster": 4, "embedding_dim": 32, "inter_dim": 48, "n_head": 2,
            "eos_token_id": 2, "bos_token_id": 1
        })
    }

    fn parse(v: &serde_json::Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v.to_string(), Path::new("config.json"))
    }

    #[test]
    fn defaults_are_the_read_me_ones() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.router_top_k, 1);
        let r = c.readme_router.as_ref().unwrap();
        assert_eq!(r.normalizer, 1.0);
        assert_eq!(r.n_layer, 1);
        assert_eq!(r.max_position_embeddings_predictor, 4096);
        assert_eq!(c.max_context(), 128);
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.num_kv_heads(), 2);
        assert_eq!(r.head_dim(), 16);
        assert_eq!(c.eos_token_ids(), vec![2]);
    }

    #[test]
    fn eos_may_be_a_list() {
        let mut v = base();
        v["eos_token_id"] = serde_json::json!([2, 5]);
        assert_eq!(parse(&v).unwrap().eos_token_ids(), vec![2, 5]);
    }

    #[test]
    fn inconsistent_values_are_named() {
        for (field, value, needle) in [
            (
                "num_key_value_heads",
                serde_json::json!(3),
                "num_key_value_heads",
            ),
            ("router_top_k", serde_json::json!(5), "router_top_k"),
            ("router_top_k", serde_json::json!(9), "experts per token"),
            ("n_head", serde_json::json!(3), "embedding_dim"),
            (
                "eos_token_id",
                serde_json::json!(100),
                "outside the vocabulary",
            ),
            ("vocab_size", serde_json::json!(0), "vocab_size"),
            ("architectures", serde_json::json!(["GPT2"]), "GPT2"),
            ("hidden_act_predictor", serde_json::json!("gelu"), "gelu"),
        ] {
            let mut v = base();
            v[field] = value;
            let err = parse(&v).unwrap_err().to_string();
            assert!(err.contains(needle), "{field}: {err}");
            assert!(err.contains("config.json"), "{err}");
        }
    }

    #[test]
    fn absurd_sizes_are_refused_with_the_field_named() {
        let huge = 1u64 << 60;
        for (field, value, needle) in [
            (
                "num_attention_heads",
                serde_json::json!(5),
                "not divisible by num_attention_heads 5",
            ),
            (
                "head_dim",
                serde_json::json!(0),
                "head_dim must be positive",
            ),
            ("head_dim", serde_json::json!(7), "must be even"),
            (
                "num_key_value_heads",
                serde_json::json!(8),
                "not a multiple of num_key_value_heads 8",
            ),
            (
                "num_key_value_heads",
                serde_json::json!(0),
                "num_key_value_heads 0",
            ),
            ("vocab_size", serde_json::json!(1u64 << 33), "vocab_size"),
            (
                "hidden_size",
                serde_json::json!(huge),
                "vocab_size x hidden_size",
            ),
            (
                "inter_dim",
                serde_json::json!(huge),
                "N_cluster x inter_dim",
            ),
            (
                "head_dim",
                serde_json::json!(1u64 << 62),
                "num_attention_heads x head_dim",
            ),
            ("N_cluster", serde_json::json!(1 << 20), "N_cluster"),
            ("rope_theta", serde_json::json!(-1.0), "rope_theta"),
        ] {
            let mut v = base();
            v[field] = value;
            let err = parse(&v).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(needle), "{field}: {msg}");
            assert_eq!(err.code(), crate::error::ErrorCode::InvalidArgument);
        }
        // Long contexts are not absurd: nothing is sized by them.
        let mut v = base();
        v["max_position_embeddings"] = serde_json::json!(1u64 << 32);
        assert_eq!(parse(&v).unwrap().max_position_embeddings, 1 << 32);
    }

    #[test]
    fn missing_field_is_reported() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("N_cluster");
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("N_cluster"), "{err}");
    }

    #[test]
    fn written_configs_read_back_with_flat_router_keys() {
        let c = parse(&base()).unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["embedding_dim"], 32);
        assert_eq!(v["N_cluster"], 4);
        assert!(v.get("readme_router").is_none(), "{v}");
        assert_eq!(parse(&v).unwrap(), c);
    }

    #[test]
    fn read_me_without_its_router_is_refused() {
        let mut v = base();
        for key in ["embedding_dim", "inter_dim", "n_head"] {
            v.as_object_mut().unwrap().remove(key);
        }
        let err = parse(&v).unwrap_err().to_string();
        assert!(
            err.contains("Read-ME needs its cluster_predictor: missing `embedding_dim`"),
            "{err}"
        );
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn a_partial_router_names_the_missing_key() {
        for missing in ReadMeRouterConfig::REQUIRED {
            let mut v = base();
            v.as_object_mut().unwrap().remove(missing);
            let err = parse(&v).unwrap_err().to_string();
            assert!(err.contains(&format!("missing `{missing}`")), "{err}");
            assert!(err.contains("incomplete"), "{err}");
        }
        // One optional key alone still describes a router.
        let mut v = base();
        for key in ["embedding_dim", "inter_dim", "n_head"] {
            v.as_object_mut().unwrap().remove(key);
        }
        v["normalizer"] = serde_json::json!(2.0);
        let err = parse(&v).unwrap_err().to_string();
        assert!(err.contains("missing `embedding_dim`"), "{err}");
    }

    #[test]
    fn an_unknown_architecture_lists_the_supported_ones() {
        // A gpt-oss config: the family is what must be reported, not a missing field.
        let v = serde_json::json!({
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 128,
            "num_local_experts": 8, "num_experts_per_tok": 2
        });
        let err = parse(&v).unwrap_err().to_string();
        for needle in [
            "GptOssForCausalLM",
            "ReadMEForCausalLM",
            "MixtralForCausalLM",
            "Qwen2MoeForCausalLM",
            "Qwen3MoeForCausalLM",
            "OlmoeForCausalLM",
        ] {
            assert!(err.contains(needle), "{err}");
        }
        let err = parse(&serde_json::json!({"model_type": "deepseek_v3"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("deepseek_v3") && err.contains("`olmoe`") && err.contains("`llama`"),
            "{err}"
        );
    }

    /// A Qwen3-MoE config as transformers v5 writes it (`rope_parameters`, `dtype`).
    fn qwen3() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "max_position_embeddings": 256, "intermediate_size": 96,
            "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "dtype": "bfloat16", "eos_token_id": [2, 3], "hidden_act": "silu",
            "use_sliding_window": false, "sliding_window": null, "rms_norm_eps": 1e-6
        })
    }

    #[test]
    fn both_transformers_conventions_read_the_same() {
        let v5 = parse(&qwen3()).unwrap();
        let mut v4 = qwen3();
        let o = v4.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.remove("dtype");
        o.insert("rope_theta".into(), serde_json::json!(1e6));
        o.insert("torch_dtype".into(), serde_json::json!("bfloat16"));
        let v4 = parse(&v4).unwrap();
        assert_eq!(v5, v4);
        assert_eq!(v5.rope_theta, 1e6);
        assert_eq!(v5.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(v5.head_dim(), 32);
        assert_eq!(v5.eos_token_ids(), vec![2, 3]);
        assert_eq!(v5.family(), Ok(ModelFamily::Qwen3Moe));
        assert_eq!((v5.num_experts(), v5.experts_per_token()), (8, 2));
        assert_eq!(v5.expert_intermediate_size(), (32, "moe_intermediate_size"));
        assert!(v5.renormalize_top_k());
        assert_eq!(v5.qk_norm(), QkNorm::PerHead);
        // transformers v5 saves Qwen3-MoE's expert count as `num_local_experts`.
        let mut local = qwen3();
        local.as_object_mut().unwrap().remove("num_experts");
        local["num_local_experts"] = serde_json::json!(8);
        assert_eq!(parse(&local).unwrap().num_experts(), 8);
    }

    #[test]
    fn family_fields_and_defaults_follow_transformers() {
        let mixtral = parse(&serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 16, "max_position_embeddings": 128,
            "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
            "sliding_window": null
        }))
        .unwrap();
        // Mixtral's defaults: rope_theta 1e6, eps 1e-5, 8 KV heads; always renormalised.
        assert_eq!(mixtral.rope_theta, 1e6);
        assert_eq!(mixtral.rms_norm_eps, 1e-5);
        assert_eq!(mixtral.num_kv_heads(), 8);
        assert!(mixtral.renormalize_top_k());
        assert_eq!(mixtral.num_experts(), 4);
        let mut q2 = qwen3();
        q2["architectures"] = serde_json::json!(["Qwen2MoeForCausalLM"]);
        q2["model_type"] = serde_json::json!("qwen2_moe");
        q2["mlp_only_layers"] = serde_json::json!([1]);
        q2["norm_topk_prob"] = serde_json::json!(false);
        q2["shared_expert_intermediate_size"] = serde_json::json!(48);
        let q2 = parse(&q2).unwrap();
        assert!(q2.qkv_bias(), "qkv_bias defaults to true");
        assert!(q2.is_moe_layer(0) && !q2.is_moe_layer(1));
        assert_eq!(q2.gated_shared_expert_size(), Some(48));
        assert!(!q2.renormalize_top_k());
        assert_eq!(q2.qk_norm(), QkNorm::None);
        // A written config reads back unchanged.
        let back = serde_json::to_value(&q2).unwrap();
        assert_eq!(parse(&back).unwrap(), q2);
    }

    #[test]
    fn unsupported_features_are_refused_naming_the_field() {
        for (field, value, needle) in [
            (
                "num_experts_per_tok",
                serde_json::json!(9),
                "num_experts_per_tok 9",
            ),
            ("num_experts_per_tok", serde_json::json!(9), "1..=8"),
            ("num_experts", serde_json::json!(1), "exceeds num_experts 1"),
            ("num_experts", serde_json::json!(300), "num_experts 300"),
            ("hidden_act", serde_json::json!("gelu"), "hidden_act `gelu`"),
            (
                "use_sliding_window",
                serde_json::json!(true),
                "use_sliding_window",
            ),
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
                "rope_scaling.rope_type",
            ),
            (
                "rope_parameters",
                serde_json::json!({"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
                "rope_parameters.",
            ),
            (
                "layer_types",
                serde_json::json!(["full_attention", "sliding_attention"]),
                "sliding_attention",
            ),
            ("attention_bias", serde_json::json!(true), "attention_bias"),
            (
                "moe_intermediate_size",
                serde_json::json!(0),
                "moe_intermediate_size",
            ),
            (
                "mlp_only_layers",
                serde_json::json!([0, 1]),
                "no layer has experts",
            ),
            (
                "decoder_sparse_step",
                serde_json::json!(0),
                "decoder_sparse_step",
            ),
            (
                "rope_theta",
                serde_json::json!(5.0),
                "disagrees with rope_parameters",
            ),
        ] {
            let mut v = qwen3();
            v[field] = value;
            let err = parse(&v).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(needle), "{field}: {msg}");
            assert_eq!(
                err.code(),
                crate::error::ErrorCode::InvalidArgument,
                "{msg}"
            );
        }
        // Mixtral's sliding window is served; one of 0 would leave a query nothing to see.
        let mixtral = serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 8, "max_position_embeddings": 128,
            "intermediate_size": 32, "sliding_window": 64
        });
        assert_eq!(
            parse(&mixtral).unwrap().sliding_window(),
            NonZeroUsize::new(64)
        );
        let mut none = mixtral.clone();
        none["sliding_window"] = serde_json::Value::Null;
        assert_eq!(parse(&none).unwrap().sliding_window(), None);
        let mut zero = mixtral.clone();
        zero["sliding_window"] = serde_json::json!(0);
        let err = parse(&zero).unwrap_err();
        assert!(err.to_string().contains("sliding_window 0"), "{err}");
        assert_eq!(err.code(), crate::error::ErrorCode::InvalidArgument);
        // Sizes that are input: a huge layer count is validated without walking its layers.
        let mut v = qwen3();
        v["num_hidden_layers"] = serde_json::json!(1u64 << 50);
        v["mlp_only_layers"] = serde_json::json!([0, 2]);
        v["decoder_sparse_step"] = serde_json::json!(2);
        assert!(parse(&v).is_ok());
        v["mlp_only_layers"] = serde_json::json!([1, 3, 5]);
        v["decoder_sparse_step"] = serde_json::json!(2);
        v["num_hidden_layers"] = serde_json::json!(6);
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("no layer has experts"));
        v["num_hidden_layers"] = serde_json::json!(8);
        let c = parse(&v).unwrap();
        assert!(c.is_moe_layer(7) && !c.is_moe_layer(5) && !c.is_moe_layer(0));
        // OLMoE's clamp must be positive.
        let olmoe = serde_json::json!({
            "architectures": ["OlmoeForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
            "intermediate_size": 32, "num_experts": 8, "clip_qkv": -1.0
        });
        assert!(parse(&olmoe).unwrap_err().to_string().contains("clip_qkv"));
    }
}
