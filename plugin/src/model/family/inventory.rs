//! The tensor inventory: every tensor a model's files hold for the engine, with its name, shape and
//! role, derived from a [`ModelPlan`]. The loader reads exactly these (checking each shape),
//! `make-model` writes exactly these, and `inspect` checks a directory against them; a device
//! backend looks its uploads up by role.
//!
//! Names are spelled by [`names`] (Read-ME's Hugging Face Llama names) and, for the MoE block and
//! the attention extras of the Hugging Face families, by [`hub`] (Mixtral's
//! `block_sparse_moe.experts.{e}.w1`, Qwen's `mlp.experts.{e}.gate_proj`); the roles are shared,
//! so the loader and the backends read every family the same way.

use std::collections::HashMap;

use super::{hub, DSelectKind, ExpertStorage, FfnPlan, GatingRule, ModelPlan, QkNorm};
use crate::config::ReadMeRouterConfig;
use crate::error::{Error, Result};
use crate::model::names;
use crate::model::weights::ExpertLayout;

/// One of a layer's attention projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttnProj {
    /// `[heads * head_dim, hidden]`.
    Q,
    /// `[kv_heads * head_dim, hidden]`.
    K,
    /// `[kv_heads * head_dim, hidden]`.
    V,
    /// `[hidden, heads * head_dim]`.
    O,
}

/// One of a SwiGLU block's three matrices: `down(silu(gate x) * up x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FfnProj {
    /// `[I, hidden]`.
    Gate,
    /// `[I, hidden]`.
    Up,
    /// `[hidden, I]`.
    Down,
}

impl FfnProj {
    /// Gate, up, down: the order of the `[String; 3]` name triples.
    pub const ALL: [FfnProj; 3] = [FfnProj::Gate, FfnProj::Up, FfnProj::Down];
}

/// One of the two tensors holding every expert of a layer (transformers v5's stacked form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StackedProj {
    /// `gate_up_proj [E, 2I, H]`: each expert's gate rows, then its up rows.
    GateUp,
    /// `down_proj [E, H, I]`.
    Down,
}

/// A part of Read-ME's pre-gating router (`cluster_predictor.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreGatePart {
    /// `embed.weight [V, D]`.
    Embed,
    /// `input_layernorm_0.weight [D]`.
    InputNorm,
    /// `q_proj_0 [D, D]` (+ bias `[D]`).
    Q,
    /// `k_proj_0`.
    K,
    /// `v_proj_0`.
    V,
    /// `o_proj_0`.
    O,
    /// `post_attention_layernorm_0.weight [D]`.
    PostNorm,
    /// `proj_1_0 [F, D]` (+ bias `[F]`).
    Proj1,
    /// `proj_2_0 [D, F]` (+ bias `[D]`).
    Proj2,
    /// `out_layernorm.weight [D]`.
    OutNorm,
    /// `proj_out [N, D]` (+ bias `[N]`).
    ProjOut,
}

/// A part of a layer's DSelect-k gate (`crate::router::dselect`), with `k` selectors of `m` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DSelectPart {
    /// Static gate: the selector logits `[k, m]`.
    Z,
    /// Static gate: the selector mixing logits `[k]`.
    Alpha,
    /// Per-example gate: `W_z [k*m, H]`, selector logits `z = W_z x + b_z`.
    ZWeight,
    /// Per-example gate: `b_z [k*m]`.
    ZBias,
    /// Per-example gate: `W_a [k, H]`, mixing logits `alpha = W_a x + b_a`.
    AlphaWeight,
    /// Per-example gate: `b_a [k]`.
    AlphaBias,
}

/// What a tensor is to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorRole {
    /// The token embedding `[V, H]`.
    Embedding,
    /// The final RMSNorm `[H]`.
    FinalNorm,
    /// The output projection `[V, H]` (absent when tied).
    LmHead,
    /// A layer's RMSNorm before attention `[H]`.
    InputNorm {
        /// The layer.
        layer: usize,
    },
    /// A layer's RMSNorm before the feed-forward part `[H]`.
    PostAttentionNorm {
        /// The layer.
        layer: usize,
    },
    /// A layer's attention projection weight.
    Attention {
        /// The layer.
        layer: usize,
        /// Which projection.
        proj: AttnProj,
    },
    /// A layer's q, k or v bias (Qwen2-MoE).
    AttentionBias {
        /// The layer.
        layer: usize,
        /// Which projection (Q, K or V).
        proj: AttnProj,
    },
    /// A layer's query RMSNorm weight: `[head_dim]` (per head) or `[heads * head_dim]`.
    QueryNorm {
        /// The layer.
        layer: usize,
    },
    /// A layer's key RMSNorm weight: `[head_dim]` (per head) or `[kv_heads * head_dim]`.
    KeyNorm {
        /// The layer.
        layer: usize,
    },
    /// A layer's in-model router `[experts, H]`.
    Gate {
        /// The layer.
        layer: usize,
    },
    /// A part of a layer's DSelect-k gate.
    DSelect {
        /// The layer.
        layer: usize,
        /// Which part.
        part: DSelectPart,
    },
    /// A layer's shared expert gate `[1, H]` (Qwen2-MoE): the shared output is scaled by
    /// `sigmoid(gate . x)`.
    SharedExpertGate {
        /// The layer.
        layer: usize,
    },
    /// Every routed expert of a layer in one tensor (transformers v5's stacked form).
    StackedExperts {
        /// The layer.
        layer: usize,
        /// Which of the two.
        proj: StackedProj,
    },
    /// A routed expert's matrix: the unit of the expert cache is `(layer, expert)`.
    Expert {
        /// The layer.
        layer: usize,
        /// The expert.
        expert: usize,
        /// Which matrix.
        proj: FfnProj,
    },
    /// A layer's shared (always-active) expert matrix.
    SharedExpert {
        /// The layer.
        layer: usize,
        /// Which matrix.
        proj: FfnProj,
    },
    /// A layer's dense MLP matrix (Read-ME's masked training layout).
    DenseMlp {
        /// The layer.
        layer: usize,
        /// Which matrix.
        proj: FfnProj,
    },
    /// Masked layout, `masks.safetensors`: a layer's shared-channel mask `[I]`.
    ResidualMask {
        /// The layer.
        layer: usize,
    },
    /// Masked layout, `masks.safetensors`: a layer's per-expert channel masks `[N, I]`.
    ExpertMask {
        /// The layer.
        layer: usize,
    },
    /// A tensor of Read-ME's pre-gating router.
    PreGate {
        /// Which part.
        part: PreGatePart,
        /// The part's bias rather than its weight.
        bias: bool,
    },
}

impl TensorRole {
    /// The decoder layer the tensor belongs to, if any.
    pub fn layer(&self) -> Option<usize> {
        match *self {
            TensorRole::InputNorm { layer }
            | TensorRole::PostAttentionNorm { layer }
            | TensorRole::Attention { layer, .. }
            | TensorRole::Expert { layer, .. }
            | TensorRole::SharedExpert { layer, .. }
            | TensorRole::DenseMlp { layer, .. }
            | TensorRole::ResidualMask { layer }
            | TensorRole::ExpertMask { layer }
            | TensorRole::AttentionBias { layer, .. }
            | TensorRole::QueryNorm { layer }
            | TensorRole::KeyNorm { layer }
            | TensorRole::Gate { layer }
            | TensorRole::DSelect { layer, .. }
            | TensorRole::SharedExpertGate { layer }
            | TensorRole::StackedExperts { layer, .. } => Some(layer),
            _ => None,
        }
    }

    /// Whether the tensor lives in `masks.safetensors` rather than the weight files.
    pub fn in_masks_file(&self) -> bool {
        matches!(
            self,
            TensorRole::ResidualMask { .. } | TensorRole::ExpertMask { .. }
        )
    }

    /// Whether the tensor is a norm weight (a vector multiplied in, initialised near 1).
    pub fn is_norm(&self) -> bool {
        matches!(
            self,
            TensorRole::FinalNorm
                | TensorRole::InputNorm { .. }
                | TensorRole::PostAttentionNorm { .. }
                | TensorRole::QueryNorm { .. }
                | TensorRole::KeyNorm { .. }
                | TensorRole::PreGate {
                    part: PreGatePart::InputNorm | PreGatePart::PostNorm | PreGatePart::OutNorm,
                    ..
                }
        )
    }
}

/// One tensor of the inventory. Not to be confused with `writer::TensorSpec`, which adds the
/// storage dtype a file gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its name in the checkpoint.
    pub name: String,
    /// Its exact shape (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// What it is.
    pub role: TensorRole,
}

impl TensorSpec {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The writer's spec of this tensor stored as `dtype`.
    pub fn with_dtype(&self, dtype: safetensors::Dtype) -> crate::model::writer::TensorSpec {
        crate::model::writer::TensorSpec::new(self.name.clone(), dtype, self.shape.clone())
    }
}

/// Every tensor of a model, in file order, found by role or by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    tensors: Vec<TensorSpec>,
    by_role: HashMap<TensorRole, usize>,
}

impl Inventory {
    fn from_tensors(tensors: Vec<TensorSpec>) -> Self {
        let by_role = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.role, i))
            .collect();
        Inventory { tensors, by_role }
    }

    /// The inventory of `plan`: embedding, per layer (input norm, q, k, v, o, post-attention norm,
    /// the FFN tensors), final norm, lm_head unless tied, the pre-gating router, and for the masked
    /// layout the masks.
    pub fn of(plan: &ModelPlan) -> Self {
        let (v, h) = (plan.vocab, plan.hidden);
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, role: TensorRole| {
            out.push(TensorSpec { name, shape, role });
        };
        push(names::EMBED.into(), vec![v, h], TensorRole::Embedding);
        for (l, layer) in plan.layers.iter().enumerate() {
            let a = &layer.attention;
            let (qd, kvd) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
            let [inorm, q, k, vv, o, pnorm] = names::attention_tensor_names(l);
            let attn = |proj| TensorRole::Attention { layer: l, proj };
            push(inorm, vec![h], TensorRole::InputNorm { layer: l });
            push(q, vec![qd, h], attn(AttnProj::Q));
            push(k, vec![kvd, h], attn(AttnProj::K));
            push(vv, vec![kvd, h], attn(AttnProj::V));
            push(o, vec![h, qd], attn(AttnProj::O));
            push(pnorm, vec![h], TensorRole::PostAttentionNorm { layer: l });
            if a.qkv_bias {
                let [bq, bk, bv] = hub::qkv_bias_names(l);
                let bias = |proj| TensorRole::AttentionBias { layer: l, proj };
                push(bq, vec![qd], bias(AttnProj::Q));
                push(bk, vec![kvd], bias(AttnProj::K));
                push(bv, vec![kvd], bias(AttnProj::V));
            }
            let norms = match a.qk_norm {
                QkNorm::None => None,
                QkNorm::PerHead => Some((a.head_dim, a.head_dim)),
                QkNorm::Full => Some((qd, kvd)),
            };
            if let Some((qn, kn)) = norms {
                let [nq, nk] = hub::qk_norm_names(l);
                push(nq, vec![qn], TensorRole::QueryNorm { layer: l });
                push(nk, vec![kn], TensorRole::KeyNorm { layer: l });
            }
            let ffn = |push: &mut dyn FnMut(String, Vec<usize>, TensorRole),
                       names3: [String; 3],
                       width: usize,
                       role: &dyn Fn(FfnProj) -> TensorRole| {
                for (name, proj) in names3.into_iter().zip(FfnProj::ALL) {
                    let shape = match proj {
                        FfnProj::Down => vec![h, width],
                        _ => vec![width, h],
                    };
                    push(name, shape, role(proj));
                }
            };
            match (&layer.ffn, plan.layout) {
                (FfnPlan::Dense { inter }, _)
                | (
                    FfnPlan::Moe(super::MoePlan {
                        expert_inter: inter,
                        ..
                    }),
                    ExpertLayout::Masked,
                ) => {
                    ffn(
                        &mut push,
                        names::dense_mlp_tensor_names(l),
                        *inter,
                        &|proj| TensorRole::DenseMlp { layer: l, proj },
                    );
                }
                (FfnPlan::Moe(m), _) if plan.family.routes_in_model() => {
                    let f = plan.family;
                    match m.gating {
                        GatingRule::DSelect(kind) => {
                            for (part, shape) in dselect_shapes(kind, m.experts, m.top_k, h) {
                                push(
                                    hub::dselect_name(l, part),
                                    shape,
                                    TensorRole::DSelect { layer: l, part },
                                );
                            }
                        }
                        _ => push(
                            hub::gate_name(f, l),
                            vec![m.experts, h],
                            TensorRole::Gate { layer: l },
                        ),
                    }
                    if let Some(s) = &m.shared {
                        ffn(&mut push, hub::shared_expert_names(l), s.inter, &|proj| {
                            TensorRole::SharedExpert { layer: l, proj }
                        });
                        if s.gated {
                            push(
                                hub::shared_expert_gate_name(l),
                                vec![1, h],
                                TensorRole::SharedExpertGate { layer: l },
                            );
                        }
                    }
                    match plan.expert_storage {
                        ExpertStorage::PerExpert => {
                            for e in 0..m.experts {
                                ffn(
                                    &mut push,
                                    hub::expert_names(f, l, e),
                                    m.expert_inter,
                                    &|proj| TensorRole::Expert {
                                        layer: l,
                                        expert: e,
                                        proj,
                                    },
                                );
                            }
                        }
                        ExpertStorage::Stacked => {
                            let [gu, down] = hub::stacked_expert_names(l);
                            let i = m.expert_inter;
                            let stacked = |proj| TensorRole::StackedExperts { layer: l, proj };
                            push(gu, vec![m.experts, 2 * i, h], stacked(StackedProj::GateUp));
                            push(down, vec![m.experts, h, i], stacked(StackedProj::Down));
                        }
                    }
                }
                (FfnPlan::Moe(m), _) => {
                    if let Some(s) = &m.shared {
                        ffn(&mut push, names::shared_tensor_names(l), s.inter, &|proj| {
                            TensorRole::SharedExpert { layer: l, proj }
                        });
                    }
                    for e in 0..m.experts {
                        ffn(
                            &mut push,
                            names::expert_tensor_names(l, e),
                            m.expert_inter,
                            &|proj| TensorRole::Expert {
                                layer: l,
                                expert: e,
                                proj,
                            },
                        );
                    }
                }
            }
        }
        push(names::FINAL_NORM.into(), vec![h], TensorRole::FinalNorm);
        if !plan.tied_embeddings {
            push(names::LM_HEAD.into(), vec![v, h], TensorRole::LmHead);
        }
        if let Some(r) = &plan.pre_gate {
            let experts = plan
                .layers
                .iter()
                .find_map(|l| match l.ffn {
                    FfnPlan::Moe(m) => Some(m.experts),
                    FfnPlan::Dense { .. } => None,
                })
                .unwrap_or(0);
            out.extend(pre_gate_tensors(r, v, experts));
        }
        if plan.layout == ExpertLayout::Masked {
            for (l, layer) in plan.layers.iter().enumerate() {
                if let FfnPlan::Moe(m) = layer.ffn {
                    out.push(TensorSpec {
                        name: names::expert_mask_name(l),
                        shape: vec![m.experts, m.expert_inter],
                        role: TensorRole::ExpertMask { layer: l },
                    });
                    out.push(TensorSpec {
                        name: names::residual_mask_name(l),
                        shape: vec![m.expert_inter],
                        role: TensorRole::ResidualMask { layer: l },
                    });
                }
            }
        }
        Self::from_tensors(out)
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The tensors of the weight files (all but the masks).
    pub fn weights(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().filter(|t| !t.role.in_masks_file())
    }

    /// The tensors of `masks.safetensors` (masked layout only).
    pub fn masks(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors.iter().filter(|t| t.role.in_masks_file())
    }

    /// The tensor playing `role`, if the model has one.
    pub fn get(&self, role: TensorRole) -> Option<&TensorSpec> {
        self.by_role.get(&role).map(|&i| &self.tensors[i])
    }

    /// The tensor playing `role`; its absence is an internal error (the plan promised it).
    pub fn require(&self, role: TensorRole) -> Result<&TensorSpec> {
        self.get(role)
            .ok_or_else(|| Error::Internal(format!("the model has no tensor for {role:?}")))
    }

    /// Gate, up and down of routed expert `(layer, expert)`: the unit a device backend uploads.
    pub fn expert(&self, layer: usize, expert: usize) -> Result<[&TensorSpec; 3]> {
        let one = |proj| {
            self.require(TensorRole::Expert {
                layer,
                expert,
                proj,
            })
        };
        Ok([one(FfnProj::Gate)?, one(FfnProj::Up)?, one(FfnProj::Down)?])
    }

    /// Gate, up and down of layer `layer`'s shared expert, if it has one.
    pub fn shared_expert(&self, layer: usize) -> Option<[&TensorSpec; 3]> {
        let one = |proj| self.get(TensorRole::SharedExpert { layer, proj });
        Some([one(FfnProj::Gate)?, one(FfnProj::Up)?, one(FfnProj::Down)?])
    }

    /// Elements over the weight files.
    pub fn weight_params(&self) -> usize {
        self.weights().map(TensorSpec::numel).sum()
    }
}

/// The parts of a DSelect-k gate of `kind` over `experts` experts with `selectors` selectors on a
/// hidden width `h`, with their shapes, in file order.
pub fn dselect_shapes(
    kind: DSelectKind,
    experts: usize,
    selectors: usize,
    h: usize,
) -> Vec<(DSelectPart, Vec<usize>)> {
    let (k, m) = (selectors, crate::router::dselect::bits_for(experts));
    match kind {
        DSelectKind::Static => vec![(DSelectPart::Z, vec![k, m]), (DSelectPart::Alpha, vec![k])],
        DSelectKind::PerExample => vec![
            (DSelectPart::ZWeight, vec![k * m, h]),
            (DSelectPart::ZBias, vec![k * m]),
            (DSelectPart::AlphaWeight, vec![k, h]),
            (DSelectPart::AlphaBias, vec![k]),
        ],
    }
}

/// The tensors of Read-ME's router over a vocabulary of `vocab` and `experts` experts.
pub fn pre_gate_tensors(r: &ReadMeRouterConfig, vocab: usize, experts: usize) -> Vec<TensorSpec> {
    let (d, f) = (r.embedding_dim, r.inter_dim);
    let mut out = Vec::new();
    let mut push = |rest: &str, shape: Vec<usize>, part, bias| {
        out.push(TensorSpec {
            name: names::router(rest),
            shape,
            role: TensorRole::PreGate { part, bias },
        });
    };
    push("embed.weight", vec![vocab, d], PreGatePart::Embed, false);
    push(
        "input_layernorm_0.weight",
        vec![d],
        PreGatePart::InputNorm,
        false,
    );
    for (p, part) in [
        ("q_proj_0", PreGatePart::Q),
        ("k_proj_0", PreGatePart::K),
        ("v_proj_0", PreGatePart::V),
        ("o_proj_0", PreGatePart::O),
    ] {
        push(&format!("{p}.weight"), vec![d, d], part, false);
        push(&format!("{p}.bias"), vec![d], part, true);
    }
    push(
        "post_attention_layernorm_0.weight",
        vec![d],
        PreGatePart::PostNorm,
        false,
    );
    push("proj_1_0.weight", vec![f, d], PreGatePart::Proj1, false);
    push("proj_1_0.bias", vec![f], PreGatePart::Proj1, true);
    push("proj_2_0.weight", vec![d, f], PreGatePart::Proj2, false);
    push("proj_2_0.bias", vec![d], PreGatePart::Proj2, true);
    push("out_layernorm.weight", vec![d], PreGatePart::OutNorm, false);
    push(
        "proj_out.weight",
        vec![experts, d],
        PreGatePart::ProjOut,
        false,
    );
    push("proj_out.bias", vec![experts], PreGatePart::ProjOut, true);
    out
}

/// Read-ME's router tensors alone, as an inventory (what a device backend keeps on the host).
pub fn pre_gate_inventory(r: &ReadMeRouterConfig, vocab: usize, experts: usize) -> Inventory {
    Inventory::from_tensors(pre_gate_tensors(r, vocab, experts))
}
