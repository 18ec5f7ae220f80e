//! What a model is, once: its family (from `config.json`), a per-layer plan of what the engine
//! computes ([`ModelPlan`], [`LayerPlan`]) and the tensors it reads ([`inventory`]).
//!
//! Read-ME (all three expert layouts) and the Hugging Face MoE families Mixtral, Qwen2-MoE,
//! Qwen3-MoE and OLMoE are served. Their attention switches (q/k/v bias, QK RMSNorm per head or
//! over the full width), dense layers between MoE layers, a shared expert with a sigmoid gate, and
//! routing inside the forward pass ([`GatingRule::SoftmaxTopK`]) are expressed here, so adding a
//! family is a detection rule, a plan builder and a name map ([`hub`]).

pub mod hub;
pub mod inventory;

use std::num::NonZeroUsize;

use super::checkpoint::Checkpoint;
use super::names;
use super::weights::ExpertLayout;
use crate::config::{ModelConfig, ReadMeRouterConfig};
use crate::error::{Error, Result};

pub use inventory::{
    AttnProj, DSelectPart, FfnProj, Inventory, PreGatePart, StackedProj, TensorRole, TensorSpec,
};

/// A model family pregate knows how to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// Read-ME: a Llama backbone whose MLPs are split into experts, routed by a pre-gating router
    /// (`cluster_predictor`) that runs before the backbone.
    ReadMe,
    /// Mixtral (`MixtralForCausalLM`): every layer MoE, softmax top-k always renormalised.
    Mixtral,
    /// Qwen2-MoE (`Qwen2MoeForCausalLM`): q/k/v biases, a sigmoid-gated shared expert, optional
    /// dense layers.
    Qwen2Moe,
    /// Qwen3-MoE (`Qwen3MoeForCausalLM`): per-head QK RMSNorm, explicit `head_dim`.
    Qwen3Moe,
    /// OLMoE (`OlmoeForCausalLM`): full-width QK RMSNorm, optional `clip_qkv`.
    Olmoe,
}

impl ModelFamily {
    /// Every family served.
    pub const ALL: [ModelFamily; 5] = [
        ModelFamily::ReadMe,
        ModelFamily::Mixtral,
        ModelFamily::Qwen2Moe,
        ModelFamily::Qwen3Moe,
        ModelFamily::Olmoe,
    ];

    /// The family's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ModelFamily::ReadMe => "Read-ME",
            ModelFamily::Mixtral => "Mixtral",
            ModelFamily::Qwen2Moe => "Qwen2-MoE",
            ModelFamily::Qwen3Moe => "Qwen3-MoE",
            ModelFamily::Olmoe => "OLMoE",
        }
    }

    /// `architectures[0]` values of the family. `LlamaForCausalLM` is accepted because Read-ME's
    /// released configs keep the Llama one.
    pub fn architectures(self) -> &'static [&'static str] {
        match self {
            ModelFamily::ReadMe => &["ReadMEForCausalLM", "LlamaForCausalLM"],
            ModelFamily::Mixtral => &["MixtralForCausalLM"],
            ModelFamily::Qwen2Moe => &["Qwen2MoeForCausalLM"],
            ModelFamily::Qwen3Moe => &["Qwen3MoeForCausalLM"],
            ModelFamily::Olmoe => &["OlmoeForCausalLM"],
        }
    }

    /// `model_type` values of the family (used when `architectures` is absent).
    pub fn model_types(self) -> &'static [&'static str] {
        match self {
            ModelFamily::ReadMe => &["llama", "readme"],
            ModelFamily::Mixtral => &["mixtral"],
            ModelFamily::Qwen2Moe => &["qwen2_moe"],
            ModelFamily::Qwen3Moe => &["qwen3_moe"],
            ModelFamily::Olmoe => &["olmoe"],
        }
    }

    /// Whether each layer routes its own hidden state (an in-model gate), rather than a router
    /// running before the backbone (Read-ME).
    pub fn routes_in_model(self) -> bool {
        self != ModelFamily::ReadMe
    }

    /// The family of a config: by `architectures[0]`, else by `model_type`; a config with neither
    /// is Read-ME (pregate's own format). An unknown name is an error listing the supported ones.
    pub fn detect(
        architectures: &[String],
        model_type: Option<&str>,
    ) -> std::result::Result<Self, String> {
        if let Some(arch) = architectures.first() {
            return Self::ALL
                .into_iter()
                .find(|f| f.architectures().contains(&arch.as_str()))
                .ok_or_else(|| {
                    format!(
                        "architectures[0] is `{arch}`, which pregate does not serve; supported: {}",
                        Self::supported(Self::architectures)
                    )
                });
        }
        match model_type {
            Some(t) => Self::ALL
                .into_iter()
                .find(|f| f.model_types().contains(&t))
                .ok_or_else(|| {
                    format!(
                        "model_type `{t}` is not served by pregate; supported: {}",
                        Self::supported(Self::model_types)
                    )
                }),
            None => Ok(ModelFamily::ReadMe),
        }
    }

    fn supported(names: fn(Self) -> &'static [&'static str]) -> String {
        Self::ALL
            .iter()
            .flat_map(|f| {
                names(*f)
                    .iter()
                    .map(move |n| format!("`{n}` ({})", f.name()))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How a query/key RMSNorm is applied after the projection, before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// None (Llama, Read-ME, Mixtral, Qwen2-MoE).
    None,
    /// Over each head's `head_dim` values, weight `[head_dim]` (Qwen3-MoE).
    PerHead,
    /// Over the whole projected q / k vector, weights `[heads * head_dim]` (OLMoE).
    Full,
}

/// One layer's self-attention: GQA with rotate-half RoPE, causal.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionPlan {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it).
    pub kv_heads: usize,
    /// Per-head size (may differ from `hidden / heads`, as in Qwen3-MoE).
    pub head_dim: usize,
    /// Whether q, k and v carry biases (Qwen2-MoE); o never does in the served families.
    pub qkv_bias: bool,
    /// Query/key normalisation.
    pub qk_norm: QkNorm,
    /// RoPE base.
    pub rope_theta: f32,
    /// Tokens a query sees, itself included (sliding window); `None` = the whole context.
    pub sliding_window: Option<NonZeroUsize>,
}

/// How a layer's tokens are assigned to experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatingRule {
    /// Read-ME: a router over the token ids alone decides every token's experts before the
    /// backbone runs; the same routes serve every layer (`route::RouteScope::AllLayers`).
    PreGate,
    /// A per-layer router `[experts, hidden]` on the layer's normed hidden state: softmax over all
    /// experts (f32), top-k (ties to the lower index), and the k weights rescaled to sum to 1 when
    /// `renormalize` (Mixtral always, Qwen and OLMoE by `norm_topk_prob`).
    SoftmaxTopK {
        /// Whether the k selected weights are divided by their sum.
        renormalize: bool,
    },
    /// A DSelect-k gate per layer (`crate::router::dselect`) in place of the family's softmax
    /// gate, chosen by the config's `pregate_gate`: `num_experts_per_tok` selectors of
    /// `ceil(log2 experts)` bits, smooth-step width `dselect_gamma`; each token goes to the experts
    /// with non-zero weight, heaviest first, at most `num_experts_per_tok` of them.
    DSelect(DSelectKind),
}

/// Which DSelect-k gate a layer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DSelectKind {
    /// `pregate_gate: "dselect_static"`: fixed selector logits, the same route for every token,
    /// served as a pre-gate router (every layer's routes known before the backbone runs).
    Static,
    /// `pregate_gate: "dselect_per_example"`: selector logits from the layer's normed hidden
    /// state, routed inside the forward pass like the softmax gate.
    PerExample,
}

impl DSelectKind {
    /// The config value that chooses it.
    pub fn config_name(self) -> &'static str {
        match self {
            DSelectKind::Static => "dselect_static",
            DSelectKind::PerExample => "dselect_per_example",
        }
    }
}

/// An always-active expert added to every token's routed output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedExpertPlan {
    /// Its intermediate width.
    pub inter: usize,
    /// Whether its output is scaled by `sigmoid(gate . x)` (Qwen2-MoE); Read-ME's is not.
    pub gated: bool,
}

/// A mixture-of-experts feed-forward layer of SwiGLU experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoePlan {
    /// Routed experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Channels of one routed expert as stored. For Read-ME's masked layout, the dense MLP width:
    /// each expert is the subset of those channels its masks select.
    pub expert_inter: usize,
    /// The shared expert, if any.
    pub shared: Option<SharedExpertPlan>,
    /// How routes are made.
    pub gating: GatingRule,
}

/// A layer's feed-forward part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnPlan {
    /// One SwiGLU MLP (dense layers of Qwen2-MoE's `mlp_only_layers`, DeepSeek's first layers).
    Dense {
        /// Its intermediate width.
        inter: usize,
    },
    /// Routed experts.
    Moe(MoePlan),
}

/// What the engine computes in one decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// The attention.
    pub attention: AttentionPlan,
    /// The feed-forward part.
    pub ffn: FfnPlan,
}

/// The FFN widths of one layer as a checkpoint stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FfnWidths {
    /// Channels of each routed expert (masked layout: of the dense MLP).
    pub expert: usize,
    /// Channels of the shared part (Read-ME's residual layout; 0 = none).
    pub shared: usize,
}

/// How a checkpoint stores an in-model-routed family's experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertStorage {
    /// One gate, up and down matrix per expert (the Hub's names; Read-ME's split layouts).
    PerExpert,
    /// Every expert of a layer in two 3-D tensors, as transformers v5 holds them in memory:
    /// `mlp.experts.gate_up_proj [E, 2I, H]` (gate rows, then up rows) and
    /// `mlp.experts.down_proj [E, H, I]`; sliced per expert at load.
    Stacked,
}

/// The whole model's description: built once per config, layout and expert widths.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPlan {
    /// The family.
    pub family: ModelFamily,
    /// How the experts are stored (Read-ME's layouts).
    pub layout: ExpertLayout,
    /// Vocabulary size.
    pub vocab: usize,
    /// Backbone width.
    pub hidden: usize,
    /// Whether `lm_head` is the embedding.
    pub tied_embeddings: bool,
    /// Backbone RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// The decoder layers.
    pub layers: Vec<LayerPlan>,
    /// Read-ME's pre-gating router (present iff a layer's gating is [`GatingRule::PreGate`]).
    pub pre_gate: Option<ReadMeRouterConfig>,
    /// How the routed experts are stored.
    pub expert_storage: ExpertStorage,
}

impl ModelPlan {
    /// The plan of `cfg` with the expert layout `layout` and each layer's stored widths.
    pub fn new(cfg: &ModelConfig, layout: ExpertLayout, widths: &[FfnWidths]) -> Result<Self> {
        let family = cfg.family().map_err(|m| Error::config("config.json", m))?;
        if widths.len() != cfg.num_hidden_layers {
            return Err(Error::Internal(format!(
                "{} layers of expert widths for {} layers",
                widths.len(),
                cfg.num_hidden_layers
            )));
        }
        match family {
            ModelFamily::ReadMe => readme_plan(cfg, layout, widths),
            _ => hf_plan(cfg, family, ExpertStorage::PerExpert),
        }
    }

    /// The plan of a checkpoint: the widths are read from layer `l`'s first expert (the dense MLP
    /// for the masked layout) and shared part. A width tensor that is absent or not `[I, hidden]`
    /// is an error naming it.
    pub fn from_checkpoint(
        cfg: &ModelConfig,
        ck: &Checkpoint,
        layout: ExpertLayout,
    ) -> Result<Self> {
        let family = cfg.family().map_err(|m| Error::config("config.json", m))?;
        if family.routes_in_model() {
            // The plan is sized by the config's layers: they must be the checkpoint's first.
            let cfg_path = ck.origin().join("config.json");
            crate::model::load::check_layer_count(ck, cfg, &cfg_path)?;
            let stacked =
                (0..cfg.num_hidden_layers).any(|l| ck.contains(&hub::stacked_expert_names(l)[0]));
            let storage = match stacked {
                true => ExpertStorage::Stacked,
                false => ExpertStorage::PerExpert,
            };
            return hf_plan(cfg, family, storage);
        }
        let h = cfg.hidden_size;
        let widths = (0..cfg.num_hidden_layers)
            .map(|l| {
                let gates: Vec<String> = match layout {
                    ExpertLayout::Masked => vec![names::dense_mlp_tensor_names(l)[0].clone()],
                    _ => (0..cfg.n_cluster.max(1))
                        .map(|e| names::expert_tensor_names(l, e)[0].clone())
                        .collect(),
                };
                let shared = match layout {
                    ExpertLayout::Residual => {
                        ffn_width(ck, &[names::shared_tensor_names(l)[0].clone()], h)?
                    }
                    _ => 0,
                };
                Ok(FfnWidths {
                    expert: ffn_width(ck, &gates, h)?,
                    shared,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(cfg, layout, &widths)
    }

    /// Layer `l`'s plan.
    pub fn layer(&self, l: usize) -> Option<&LayerPlan> {
        self.layers.get(l)
    }

    /// Layer `l`'s MoE part, if it has one.
    pub fn moe(&self, l: usize) -> Option<&MoePlan> {
        match &self.layers.get(l)?.ffn {
            FfnPlan::Moe(m) => Some(m),
            FfnPlan::Dense { .. } => None,
        }
    }

    /// Every tensor the model's files hold, in file order (see [`inventory`]).
    pub fn inventory(&self) -> Inventory {
        Inventory::of(self)
    }
}

/// The intermediate width of a SwiGLU block, from its gate tensor `[I, H]`.
/// The width of a layer's SwiGLU blocks: the row count most of the `gates` (`[I, H]`) share (the
/// earliest on a tie), so that one odd gate is reported by name (as a shape error of that tensor)
/// rather than every other one. When no gate has the form `[I, H]`, the error for the first.
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

fn readme_plan(cfg: &ModelConfig, layout: ExpertLayout, widths: &[FfnWidths]) -> Result<ModelPlan> {
    let router = cfg.router_config()?.clone();
    let attention = AttentionPlan {
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_kv_heads(),
        head_dim: cfg.head_dim(),
        qkv_bias: false,
        qk_norm: QkNorm::None,
        rope_theta: cfg.rope_theta,
        sliding_window: None,
    };
    let layers = widths
        .iter()
        .enumerate()
        .map(|(l, w)| {
            let shared = match layout {
                ExpertLayout::Residual if w.shared == 0 => {
                    return Err(Error::Internal(format!(
                        "residual layout without a shared part in layer {l}"
                    )))
                }
                ExpertLayout::Residual => Some(SharedExpertPlan {
                    inter: w.shared,
                    gated: false,
                }),
                _ => None,
            };
            Ok(LayerPlan {
                attention: attention.clone(),
                ffn: FfnPlan::Moe(MoePlan {
                    experts: cfg.num_experts(),
                    top_k: cfg.experts_per_token(),
                    expert_inter: w.expert,
                    shared,
                    gating: GatingRule::PreGate,
                }),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ModelPlan {
        family: ModelFamily::ReadMe,
        layout,
        vocab: cfg.vocab_size,
        hidden: cfg.hidden_size,
        tied_embeddings: cfg.tie_word_embeddings,
        rms_norm_eps: cfg.rms_norm_eps,
        layers,
        pre_gate: Some(router),
        expert_storage: ExpertStorage::PerExpert,
    })
}

/// The plan of a Hugging Face MoE family: everything from the config (each family's fields as
/// transformers reads them), nothing from the checkpoint but how its experts are stored.
fn hf_plan(cfg: &ModelConfig, family: ModelFamily, storage: ExpertStorage) -> Result<ModelPlan> {
    let attention = AttentionPlan {
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_kv_heads(),
        head_dim: cfg.head_dim(),
        qkv_bias: cfg.qkv_bias(),
        qk_norm: cfg.qk_norm(),
        rope_theta: cfg.rope_theta,
        sliding_window: cfg.sliding_window(),
    };
    let moe = MoePlan {
        experts: cfg.num_experts(),
        top_k: cfg.experts_per_token(),
        expert_inter: cfg.expert_intermediate_size().0,
        shared: cfg
            .gated_shared_expert_size()
            .map(|inter| SharedExpertPlan { inter, gated: true }),
        gating: match cfg.dselect_gate() {
            Some(kind) => GatingRule::DSelect(kind),
            None => GatingRule::SoftmaxTopK {
                renormalize: cfg.renormalize_top_k(),
            },
        },
    };
    let layers = (0..cfg.num_hidden_layers)
        .map(|l| LayerPlan {
            attention: attention.clone(),
            ffn: match cfg.is_moe_layer(l) {
                true => FfnPlan::Moe(moe),
                false => FfnPlan::Dense {
                    inter: cfg.intermediate_size,
                },
            },
        })
        .collect();
    Ok(ModelPlan {
        family,
        layout: ExpertLayout::Fused,
        vocab: cfg.vocab_size,
        hidden: cfg.hidden_size,
        tied_embeddings: cfg.tie_word_embeddings,
        rms_norm_eps: cfg.rms_norm_eps,
        layers,
        pre_gate: None,
        expert_storage: storage,
    })
}

#[cfg(test)]
mod tests;
