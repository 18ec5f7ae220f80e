//! Model shapes of `pregate make-model`: `tiny` (tests), `small` (the demo) and `readme-7b` (the
//! real Read-ME shape, for GPU benchmarks).

use crate::config::{ModelConfig, TokenIds};
use crate::error::{Error, Result};

use super::checkpoint::FloatDtype;
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
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 3] = [Preset::Tiny, Preset::Small, Preset::Readme7b];

    /// The name the CLI uses.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Readme7b => "readme-7b",
        }
    }

    /// Parses a preset name.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown preset `{name}`: expected one of tiny, small, readme-7b"
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
    /// Parameter counts of the fused layout of this shape.
    pub fn param_counts(&self) -> ParamCounts {
        let c = &self.config;
        let (v, h, d, f, n) = (
            c.vocab_size,
            c.hidden_size,
            c.embedding_dim,
            c.inter_dim,
            c.n_cluster,
        );
        let qd = c.num_attention_heads * c.head_dim();
        let kvd = c.num_kv_heads() * c.head_dim();
        let attn = 2 * h * qd + 2 * h * kvd + 2 * h;
        let expert = 3 * h * self.expert_inter;
        let router = v * d + 4 * (d * d + d) + (f * d + f) + (d * f + d) + 3 * d + (n * d + n);
        let embeds = v * h * if c.tie_word_embeddings { 1 } else { 2 } + h;
        let layers = c.num_hidden_layers;
        ParamCounts {
            total: embeds + router + layers * (attn + n * expert),
            active: embeds + router + layers * (attn + c.router_top_k * expert),
            router,
            per_expert_layer: expert,
        }
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
        add_cluster_predictor: true,
        n_cluster: d.experts,
        embedding_dim: d.router_dim,
        inter_dim: d.router_inter,
        n_layer: 1,
        n_head: d.router_heads,
        normalizer: 1.0,
        hidden_act_predictor: "silu".into(),
        max_position_embeddings_predictor: d.positions,
        nonautoregressive: false,
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
        let small = Preset::Small.spec().param_counts();
        assert!(
            (100_000_000..=150_000_000).contains(&small.total),
            "{small:?}"
        );
        let big = Preset::Readme7b.spec().param_counts();
        assert!(
            (17_000_000_000..18_000_000_000).contains(&big.total),
            "{big:?}"
        );
        // readme-system.md: one expert-layer is 135 MB in bf16, the router 18.0 M parameters.
        assert_eq!(big.per_expert_layer * 2, 135_266_304);
        assert!((17_900_000..18_100_000).contains(&big.router), "{big:?}");
        let err = Preset::parse("huge").unwrap_err().to_string();
        assert!(err.contains("huge") && err.contains("tiny"), "{err}");
    }
}
