//! Model shapes of `pregate make-model`: `tiny` (tests), `small` (the demo) and `readme-7b` (the
//! real Read-ME shape, for GPU benchmarks), and `tiny-h64` (tests inside vLLM, whose CPU attention
//! needs head sizes of 64).

use crate::config::{ModelConfig, ReadMeRouterConfig, TokenIds};
use crate::error::{Error, Result};

use super::checkpoint::FloatDtype;
use super::family::{FfnWidths, ModelPlan, TensorRole};
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
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 4] = [
        Preset::Tiny,
        Preset::Small,
        Preset::Readme7b,
        Preset::TinyHead64,
    ];

    /// The name the CLI uses.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Readme7b => "readme-7b",
            Preset::TinyHead64 => "tiny-h64",
        }
    }

    /// Parses a preset name.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown preset `{name}`: expected one of tiny, small, readme-7b, tiny-h64"
                ))
            })
    }

    /// The preset's full shape.
    pub fn spec(self) -> ModelSpec {
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
        let active_experts = experts / c.n_cluster.max(1) * c.router_top_k;
        Ok(ParamCounts {
            total,
            active: total - experts + active_experts,
            router,
            per_expert_layer,
        })
    }
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
