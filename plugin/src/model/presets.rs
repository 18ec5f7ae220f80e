//! Model shapes of `pregate make-model`: `tiny` (tests), `small` (the demo) and `readme-7b` (the
//! real Read-ME shape, for GPU benchmarks), `tiny-h64` (tests inside vLLM, whose CPU attention
//! needs head sizes of 64); per Hugging Face family a tiny shape for tests (`mixtral-tiny`,
//! `qwen2-moe-tiny`, `qwen3-moe-tiny`, `olmoe-tiny`) and the real shapes of `mixtral-8x7b`,
//! `qwen2-moe-a2.7b`, `qwen3-30b-a3b` and `olmoe-1b-7b` (random weights, Hub tensor names; fewer
//! layers with [`ModelSpec::with_layers`]).

use crate::config::{ModelConfig, ReadMeRouterConfig, TokenIds};
use crate::error::{Error, Result};

use super::checkpoint::FloatDtype;
use super::family::{DSelectKind, FfnWidths, ModelPlan, TensorRole};
use super::weights::ExpertLayout;
use super::writer::DEFAULT_SHARD_BYTES;

/// A named model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A few hundred thousand parameters, f32: for tests.
    Tiny,
    /// About 142 M parameters, 7 experts, vocabulary 32000, bf16: the demo model.
    Small,
    /// Read-ME on Llama-2-7B: 32 layers, 7 experts of 5504 channels, about 17.6 B parameters, bf16.
    Readme7b,
    /// Like `Tiny`, but with attention heads of 64 in the backbone and the router: vLLM's CPU
    /// attention serves head sizes 32, 64, 80, 96, 112, 128, ... only (16 is refused).
    TinyHead64,
    /// Mixtral, 2 layers of 4 experts, top-2, f32: for tests.
    MixtralTiny,
    /// Qwen2-MoE, 3 layers (the middle one dense), 4 experts top-2, a gated shared expert, q/k/v
    /// biases, f32: for tests.
    Qwen2MoeTiny,
    /// Qwen3-MoE, 2 layers of 8 experts top-2 renormalised, head_dim 32 != hidden/heads, per-head
    /// QK norm, f32: for tests.
    Qwen3MoeTiny,
    /// OLMoE, 2 layers of 8 experts top-2 (not renormalised), full-width QK norm, `clip_qkv`, f32:
    /// for tests.
    OlmoeTiny,
    /// `mixtral-tiny` with a DSelect-k static gate per layer (`pregate_gate: dselect_static`),
    /// served as a pre-gate router: for tests.
    DSelectStaticTiny,
    /// `mixtral-tiny` with a DSelect-k per-example gate per layer (`pregate_gate:
    /// dselect_per_example`), routed from the hidden state: for tests.
    DSelectPerExampleTiny,
    /// Mixtral-8x7B: 32 layers of 8 experts of 14336 channels, top-2, about 46.7 B parameters.
    Mixtral8x7b,
    /// Qwen1.5-MoE-A2.7B: 24 layers of 60 experts of 1408 channels, top-4, a shared expert of 5632.
    Qwen2MoeA27b,
    /// Qwen3-30B-A3B: 48 layers of 128 experts of 768 channels, top-8, head_dim 128.
    Qwen3_30bA3b,
    /// OLMoE-1B-7B: 16 layers of 64 experts of 1024 channels, top-8.
    Olmoe1b7b,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 14] = [
        Preset::Tiny,
        Preset::Small,
        Preset::Readme7b,
        Preset::TinyHead64,
        Preset::MixtralTiny,
        Preset::Qwen2MoeTiny,
        Preset::Qwen3MoeTiny,
        Preset::OlmoeTiny,
        Preset::DSelectStaticTiny,
        Preset::DSelectPerExampleTiny,
        Preset::Mixtral8x7b,
        Preset::Qwen2MoeA27b,
        Preset::Qwen3_30bA3b,
        Preset::Olmoe1b7b,
    ];

    /// The name the CLI uses.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Readme7b => "readme-7b",
            Preset::TinyHead64 => "tiny-h64",
            Preset::MixtralTiny => "mixtral-tiny",
            Preset::Qwen2MoeTiny => "qwen2-moe-tiny",
            Preset::Qwen3MoeTiny => "qwen3-moe-tiny",
            Preset::OlmoeTiny => "olmoe-tiny",
            Preset::DSelectStaticTiny => "dselect-static-tiny",
            Preset::DSelectPerExampleTiny => "dselect-per-example-tiny",
            Preset::Mixtral8x7b => "mixtral-8x7b",
            Preset::Qwen2MoeA27b => "qwen2-moe-a2.7b",
            Preset::Qwen3_30bA3b => "qwen3-30b-a3b",
            Preset::Olmoe1b7b => "olmoe-1b-7b",
        }
    }

    /// Parses a preset name.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                let all: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown preset `{name}`: expected one of {}",
                    all.join(", ")
                ))
            })
    }

    /// The preset's full shape.
    pub fn spec(self) -> ModelSpec {
        if let Some(spec) = hf_spec(self) {
            return spec;
        }
        match self {
            Preset::Tiny => ModelSpec {
                config: config(Dims {
                    vocab: 512,
                    hidden: 64,
                    dense_inter: 128,
                    layers: 2,
                    heads: 4,
                    kv_heads: 2,
                    positions: 512,
                    experts: 4,
                    router_dim: 32,
                    router_inter: 48,
                    router_heads: 2,
                    dtype: FloatDtype::F32,
                }),
                dtype: FloatDtype::F32,
                expert_inter: 64,
                shared_inter: 16,
                max_shard_bytes: DEFAULT_SHARD_BYTES,
            },
            Preset::Small => ModelSpec {
                config: config(Dims {
                    vocab: 32000,
                    hidden: 768,
                    dense_inter: 1536,
                    layers: 6,
                    heads: 12,
                    kv_heads: 4,
                    positions: 4096,
                    experts: 7,
                    router_dim: 256,
                    router_inter: 256,
                    router_heads: 2,
                    dtype: FloatDtype::BF16,
                }),
                dtype: FloatDtype::BF16,
                expert_inter: 768,
                shared_inter: 256,
                max_shard_bytes: DEFAULT_SHARD_BYTES,
            },
            Preset::Readme7b => ModelSpec {
                config: config(Dims {
                    vocab: 32000,
                    hidden: 4096,
                    dense_inter: 11008,
                    layers: 32,
                    heads: 32,
                    kv_heads: 32,
                    positions: 4096,
                    experts: 7,
                    router_dim: 512,
                    router_inter: 512,
                    router_heads: 4,
                    dtype: FloatDtype::BF16,
                }),
                dtype: FloatDtype::BF16,
                expert_inter: 5504,
                shared_inter: 1376,
                max_shard_bytes: DEFAULT_SHARD_BYTES,
            },
            Preset::TinyHead64 => ModelSpec {
                config: config(Dims {
                    vocab: 512,
                    hidden: 128,
                    dense_inter: 256,
                    layers: 2,
                    heads: 2,
                    kv_heads: 1,
                    positions: 512,
                    experts: 4,
                    router_dim: 64,
                    router_inter: 64,
                    router_heads: 1,
                    dtype: FloatDtype::F32,
                }),
                dtype: FloatDtype::F32,
                expert_inter: 128,
                shared_inter: 32,
                max_shard_bytes: DEFAULT_SHARD_BYTES,
            },
            _ => unreachable!("every Hugging Face preset has an hf_spec"),
        }
    }
}

/// Everything `make-model` needs to write a model: its config, storage dtype and expert widths.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// `config.json`.
    pub config: ModelConfig,
    /// Storage dtype of every weight.
    pub dtype: FloatDtype,
    /// Channels of one expert as the fused layout stores it (shared channels included).
    pub expert_inter: usize,
    /// Shared (always-active) channels: the residual layout's shared part, and the masked layout's
    /// `residual_mask` population. Each residual-layout expert has `expert_inter - shared_inter`.
    pub shared_inter: usize,
    /// Shard size of the weight files.
    pub max_shard_bytes: usize,
}

/// Parameter counts of a model, as `inspect` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamCounts {
    /// Every parameter (router included).
    pub total: usize,
    /// Parameters one token reads: backbone, router, its `router_top_k` experts and the shared part.
    pub active: usize,
    /// The router's parameters.
    pub router: usize,
    /// One routed expert in one layer (gate + up + down).
    pub per_expert_layer: usize,
}

impl ModelSpec {
    /// Each layer's stored FFN widths in `layout`: fused experts hold `expert_inter` channels;
    /// residual ones `expert_inter - shared_inter` plus a shared part of `shared_inter`; the
    /// masked layout stores the dense MLP of `intermediate_size`.
    pub fn widths(&self, layout: ExpertLayout) -> FfnWidths {
        match layout {
            ExpertLayout::Fused => FfnWidths {
                expert: self.expert_inter,
                shared: 0,
            },
            ExpertLayout::Residual => FfnWidths {
                expert: self.expert_inter.saturating_sub(self.shared_inter),
                shared: self.shared_inter,
            },
            ExpertLayout::Masked => FfnWidths {
                expert: self.config.intermediate_size,
                shared: 0,
            },
        }
    }

    /// The same shape with `layers` decoder layers (a real shape cut short for a test or a
    /// benchmark); Qwen's dense layers beyond it are dropped.
    pub fn with_layers(mut self, layers: usize) -> Result<Self> {
        if layers == 0 {
            return Err(Error::InvalidArgument(
                "a model needs at least one layer".into(),
            ));
        }
        self.config.num_hidden_layers = layers;
        if let Some(dense) = self.config.moe.mlp_only_layers.as_mut() {
            dense.retain(|&l| l < layers);
        }
        Ok(self)
    }

    /// The model's description in `layout`.
    pub fn plan(&self, layout: ExpertLayout) -> Result<ModelPlan> {
        let widths = vec![self.widths(layout); self.config.num_hidden_layers];
        ModelPlan::new(&self.config, layout, &widths)
    }

    /// Parameter counts of the fused layout of this shape, from its tensor inventory.
    pub fn param_counts(&self) -> Result<ParamCounts> {
        let inventory = self.plan(ExpertLayout::Fused)?.inventory();
        let sum = |keep: &dyn Fn(&TensorRole) -> bool| -> usize {
            inventory
                .weights()
                .filter(|t| keep(&t.role))
                .map(|t| t.numel())
                .sum()
        };
        let total = sum(&|_| true);
        let router = sum(&|r| matches!(r, TensorRole::PreGate { .. }));
        let experts = sum(&|r| matches!(r, TensorRole::Expert { .. }));
        let per_expert_layer = sum(&|r| {
            matches!(
                r,
                TensorRole::Expert {
                    layer: 0,
                    expert: 0,
                    ..
                }
            )
        });
        let c = &self.config;
        let active_experts = experts / c.num_experts().max(1) * c.experts_per_token();
        Ok(ParamCounts {
            total,
            active: total - experts + active_experts,
            router,
            per_expert_layer,
        })
    }
}

/// The shape of a Hugging Face family preset: the family's config fields (as its Hub config
/// spells them), `None` for Read-ME's presets.
fn hf_spec(p: Preset) -> Option<ModelSpec> {
    use crate::config::FamilyFields;
    struct Hf {
        arch: &'static str,
        model_type: &'static str,
        vocab: usize,
        hidden: usize,
        inter: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        positions: usize,
        rope_theta: f32,
        eps: f32,
        dtype: FloatDtype,
        moe: FamilyFields,
    }
    let tiny = FloatDtype::F32;
    let bf16 = FloatDtype::BF16;
    let fields = FamilyFields {
        hidden_act: Some("silu".into()),
        ..Default::default()
    };
    let hf = match p {
        Preset::MixtralTiny => Hf {
            arch: "MixtralForCausalLM",
            model_type: "mixtral",
            vocab: 512,
            hidden: 64,
            inter: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            positions: 512,
            rope_theta: 1e6,
            eps: 1e-5,
            dtype: tiny,
            moe: FamilyFields {
                num_local_experts: Some(4),
                num_experts_per_tok: Some(2),
                ..fields
            },
        },
        Preset::Qwen2MoeTiny => Hf {
            arch: "Qwen2MoeForCausalLM",
            model_type: "qwen2_moe",
            vocab: 512,
            hidden: 64,
            inter: 128,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            positions: 512,
            rope_theta: 1e4,
            eps: 1e-6,
            dtype: tiny,
            moe: FamilyFields {
                num_experts: Some(4),
                num_experts_per_tok: Some(2),
                moe_intermediate_size: Some(48),
                shared_expert_intermediate_size: Some(80),
                norm_topk_prob: Some(false),
                decoder_sparse_step: Some(1),
                mlp_only_layers: Some(vec![1]),
                qkv_bias: Some(true),
                use_sliding_window: Some(false),
                ..fields
            },
        },
        Preset::Qwen3MoeTiny => Hf {
            arch: "Qwen3MoeForCausalLM",
            model_type: "qwen3_moe",
            vocab: 512,
            hidden: 64,
            inter: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            positions: 512,
            rope_theta: 1e6,
            eps: 1e-6,
            dtype: tiny,
            moe: FamilyFields {
                num_experts: Some(8),
                num_experts_per_tok: Some(2),
                moe_intermediate_size: Some(32),
                norm_topk_prob: Some(true),
                decoder_sparse_step: Some(1),
                mlp_only_layers: Some(vec![]),
                attention_bias: Some(false),
                use_sliding_window: Some(false),
                ..fields
            },
        },
        Preset::OlmoeTiny => Hf {
            arch: "OlmoeForCausalLM",
            model_type: "olmoe",
            vocab: 512,
            hidden: 64,
            inter: 32,
            layers: 2,
            heads: 4,
            kv_heads: 4,
            head_dim: 16,
            positions: 512,
            rope_theta: 1e4,
            eps: 1e-5,
            dtype: tiny,
            moe: FamilyFields {
                num_experts: Some(8),
                num_experts_per_tok: Some(2),
                norm_topk_prob: Some(false),
                clip_qkv: Some(3.0),
                attention_bias: Some(false),
                ..fields
            },
        },
        Preset::Mixtral8x7b => Hf {
            arch: "MixtralForCausalLM",
            model_type: "mixtral",
            vocab: 32000,
            hidden: 4096,
            inter: 14336,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            positions: 32768,
            rope_theta: 1e6,
            eps: 1e-5,
            dtype: bf16,
            moe: FamilyFields {
                num_local_experts: Some(8),
                num_experts_per_tok: Some(2),
                ..fields
            },
        },
        Preset::Qwen2MoeA27b => Hf {
            arch: "Qwen2MoeForCausalLM",
            model_type: "qwen2_moe",
            vocab: 151936,
            hidden: 2048,
            inter: 5632,
            layers: 24,
            heads: 16,
            kv_heads: 16,
            head_dim: 128,
            positions: 8192,
            rope_theta: 1e6,
            eps: 1e-6,
            dtype: bf16,
            moe: FamilyFields {
                num_experts: Some(60),
                num_experts_per_tok: Some(4),
                moe_intermediate_size: Some(1408),
                shared_expert_intermediate_size: Some(5632),
                norm_topk_prob: Some(false),
                decoder_sparse_step: Some(1),
                mlp_only_layers: Some(vec![]),
                qkv_bias: Some(true),
                use_sliding_window: Some(false),
                ..fields
            },
        },
        Preset::Qwen3_30bA3b => Hf {
            arch: "Qwen3MoeForCausalLM",
            model_type: "qwen3_moe",
            vocab: 151936,
            hidden: 2048,
            inter: 6144,
            layers: 48,
            heads: 32,
            kv_heads: 4,
            head_dim: 128,
            positions: 40960,
            rope_theta: 1e6,
            eps: 1e-6,
            dtype: bf16,
            moe: FamilyFields {
                num_experts: Some(128),
                num_experts_per_tok: Some(8),
                moe_intermediate_size: Some(768),
                norm_topk_prob: Some(true),
                decoder_sparse_step: Some(1),
                mlp_only_layers: Some(vec![]),
                attention_bias: Some(false),
                use_sliding_window: Some(false),
                ..fields
            },
        },
        Preset::Olmoe1b7b => Hf {
            arch: "OlmoeForCausalLM",
            model_type: "olmoe",
            vocab: 50304,
            hidden: 2048,
            inter: 1024,
            layers: 16,
            heads: 16,
            kv_heads: 16,
            head_dim: 128,
            positions: 4096,
            rope_theta: 1e4,
            eps: 1e-5,
            dtype: bf16,
            moe: FamilyFields {
                num_experts: Some(64),
                num_experts_per_tok: Some(8),
                norm_topk_prob: Some(false),
                attention_bias: Some(false),
                ..fields
            },
        },
        Preset::DSelectStaticTiny | Preset::DSelectPerExampleTiny => {
            let kind = match p {
                Preset::DSelectStaticTiny => DSelectKind::Static,
                _ => DSelectKind::PerExample,
            };
            let mut spec = hf_spec(Preset::MixtralTiny)?;
            spec.config.moe.pregate_gate = Some(kind.config_name().into());
            return Some(spec);
        }
        Preset::Tiny | Preset::Small | Preset::Readme7b | Preset::TinyHead64 => return None,
    };
    let config = ModelConfig {
        architectures: vec![hf.arch.into()],
        model_type: Some(hf.model_type.into()),
        vocab_size: hf.vocab,
        hidden_size: hf.hidden,
        intermediate_size: hf.inter,
        num_hidden_layers: hf.layers,
        num_attention_heads: hf.heads,
        num_key_value_heads: Some(hf.kv_heads),
        head_dim: Some(hf.head_dim),
        rms_norm_eps: hf.eps,
        rope_theta: hf.rope_theta,
        max_position_embeddings: hf.positions,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
        torch_dtype: Some(hf.dtype.torch_name().into()),
        n_cluster: 0,
        readme_router: None,
        router_top_k: 1,
        moe: hf.moe,
    };
    let (expert_inter, _) = config.expert_intermediate_size();
    Some(ModelSpec {
        config,
        dtype: hf.dtype,
        expert_inter,
        shared_inter: 0,
        max_shard_bytes: DEFAULT_SHARD_BYTES,
    })
}

struct Dims {
    vocab: usize,
    hidden: usize,
    dense_inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    positions: usize,
    experts: usize,
    router_dim: usize,
    router_inter: usize,
    router_heads: usize,
    dtype: FloatDtype,
}

fn config(d: Dims) -> ModelConfig {
    ModelConfig {
        architectures: vec!["ReadMEForCausalLM".into()],
        model_type: Some("llama".into()),
        vocab_size: d.vocab,
        hidden_size: d.hidden,
        intermediate_size: d.dense_inter,
        num_hidden_layers: d.layers,
        num_attention_heads: d.heads,
        num_key_value_heads: Some(d.kv_heads),
        head_dim: Some(d.hidden / d.heads),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: d.positions,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
        torch_dtype: Some(d.dtype.torch_name().into()),
        n_cluster: d.experts,
        readme_router: Some(ReadMeRouterConfig {
            add_cluster_predictor: true,
            embedding_dim: d.router_dim,
            inter_dim: d.router_inter,
            n_layer: 1,
            n_head: d.router_heads,
            normalizer: 1.0,
            hidden_act_predictor: "silu".into(),
            max_position_embeddings_predictor: d.positions,
            nonautoregressive: false,
        }),
        router_top_k: 1,
        moe: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn presets_are_valid_and_sized_as_documented() {
        for p in Preset::ALL {
            let s = p.spec();
            s.config.validate(Path::new(p.name())).unwrap();
            assert!(s.shared_inter < s.expert_inter);
            assert_eq!(Preset::parse(p.name()).unwrap(), p);
        }
        // The real shapes of the Hugging Face families, as their Hub models publish them.
        for (p, lo, hi, expert_bf16) in [
            (
                Preset::Mixtral8x7b,
                46_000_000_000,
                47_500_000_000,
                352_321_536,
            ),
            (
                Preset::Qwen3_30bA3b,
                30_000_000_000,
                31_000_000_000,
                9_437_184,
            ),
            (Preset::Olmoe1b7b, 6_800_000_000, 7_000_000_000, 12_582_912),
            (
                Preset::Qwen2MoeA27b,
                14_000_000_000,
                14_500_000_000,
                17_301_504,
            ),
        ] {
            let c = p.spec().param_counts().unwrap();
            assert!((lo..hi).contains(&c.total), "{p:?}: {c:?}");
            assert_eq!(c.per_expert_layer * 2, expert_bf16, "{p:?}");
        }
        let cut = Preset::Qwen2MoeTiny.spec().with_layers(1).unwrap();
        assert_eq!(cut.config.num_hidden_layers, 1);
        assert_eq!(cut.config.moe.mlp_only_layers, Some(vec![]));
        let small = Preset::Small.spec().param_counts().unwrap();
        assert!(
            (100_000_000..=150_000_000).contains(&small.total),
            "{small:?}"
        );
        let big = Preset::Readme7b.spec().param_counts().unwrap();
        assert!(
            (17_000_000_000..18_000_000_000).contains(&big.total),
            "{big:?}"
        );
        // readme-system.md: one expert-layer is 135 MB in bf16, the router 18.0 M parameters.
        assert_eq!(big.per_expert_layer * 2, 135_266_304);
        assert!((17_900_000..18_100_000).contains(&big.router), "{big:?}");
        let h64 = Preset::TinyHead64.spec().config;
        assert_eq!(h64.hidden_size / h64.num_attention_heads, 64);
        let router = h64.readme_router.as_ref().unwrap();
        assert_eq!(router.embedding_dim / router.n_head, 64);
        let err = Preset::parse("huge").unwrap_err().to_string();
        assert!(err.contains("huge") && err.contains("tiny"), "{err}");
    }
}
