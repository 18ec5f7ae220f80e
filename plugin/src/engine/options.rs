//! The engine's options: one typed structure every host fills, and the one table of environment
//! variables.
//!
//! A host starts from [`EngineOptions::default`] (everything at the backend's default) or from
//! [`EngineOptions::from_env`], then applies its own settings on top: the CLI its flags, Triton the
//! model's `config.pbtxt` parameters. Nothing below reads the environment: constructors take
//! these options, so a library user (or a test) is never surprised by a variable set elsewhere.
//!
//! | variable | values | field |
//! | --- | --- | --- |
//! | `PREGATE_EXPERT_CACHE` | `all`, `N` (experts per layer), a size (`512MiB`, `2GiB`), a fraction of free memory (`0.5`, `50%`) | [`ExpertCacheOptions::capacity`] |
//! | `PREGATE_CACHE_POLICY` | `belady`, `lru`, `lfu`, `random` | [`ExpertCacheOptions::policy`] |
//! | `PREGATE_PREFETCH` | `1` (default), `0` to load experts on demand | [`EngineOptions::prefetch`] |
//! | `PREGATE_CUDA_DTYPE` | `bf16` (default), `f32` | [`EngineOptions::cuda_dtype`] |
//! | `PREGATE_ROUTER` | `host` (default), `device` | [`EngineOptions::router`] |
//! | `PREGATE_KV_TOKENS` | KV cache size in tokens (CUDA; default: a quarter of free memory) | [`EngineOptions::kv_tokens`] |
//! | `PREGATE_EXPERT_FFN` | `grouped` (default), `cublas` | [`EngineOptions::expert_ffn`] |
//! | `PREGATE_SPECULATE` | `1` to predict in-model gates and prefetch, `0` not to (default: on for an in-model router with a cache smaller than the experts) | [`EngineOptions::speculate`] |
//! | `PREGATE_SPEC_DEPTH` | layers predicted ahead, 1..=4 (default 2) | [`EngineOptions::spec_depth`] |
//! | `PREGATE_SPEC_EXTRA` | candidates per token beyond the top-k, 0..=8 (default 1) | [`EngineOptions::spec_extra`] |
//!
//! Read where CUDA's libraries are located, by `pregate-kernels` (not engine options):
//! `PREGATE_NVRTC_LIB` (the NVRTC library to load), `PREGATE_CUDA_INCLUDE` (headers for NVRTC),
//! `PREGATE_KERNEL_CACHE` (the compiled-kernel cache folder; `off` or empty disables it). Those are listed by
//! [`ENVIRONMENT`] too, so that one list documents every variable pregate reads.

use crate::cache::{EvictionPolicy, ExpertCapacity};
use crate::cuda::{CudaDtype, RouterPlacement};
use crate::error::{Error, Result};

/// An expert cache for the engine's backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertCacheOptions {
    /// How many experts may be resident (`PerLayer(n)`: n experts of each layer).
    pub capacity: ExpertCapacity,
    /// Eviction policy.
    pub policy: EvictionPolicy,
}

/// How the CUDA expert FFN runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertFfn {
    /// Grouped skinny kernels for small batches (two launches for all experts), cuBLAS beyond.
    #[default]
    Grouped,
    /// cuBLAS GEMMs for every batch (a fallback, and the baseline of benchmarks).
    Cublas,
}

impl std::str::FromStr for ExpertFfn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "grouped" => Ok(ExpertFfn::Grouped),
            "cublas" => Ok(ExpertFfn::Cublas),
            _ => Err(Error::InvalidArgument(format!(
                "unknown expert FFN `{s}` (expected grouped or cublas)"
            ))),
        }
    }
}

/// How [`open_engine_with`](super::open_engine_with) builds an engine. `None` fields keep the
/// backend's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineOptions {
    /// The backend's expert cache. CUDA: its device slots. CPU: accounting of the same decisions,
    /// the weights staying in host memory (see [`crate::moe`]). Default: CUDA keeps every expert
    /// resident; the CPU keeps no cache.
    pub expert_cache: Option<ExpertCacheOptions>,
    /// CUDA: issue the lookahead's expert loads ahead of use (default on); off = on demand.
    pub prefetch: Option<bool>,
    /// CUDA: compute in bf16 (serving, the default) or f32 (exact comparison with the CPU).
    /// Ignored by the CPU backend, which computes in f32.
    pub cuda_dtype: Option<CudaDtype>,
    /// CUDA: where the router runs (default: the host). The CPU backend's device is the host.
    pub router: Option<RouterPlacement>,
    /// CUDA: KV cache size in tokens (default: a quarter of the memory left after the weights).
    pub kv_tokens: Option<usize>,
    /// CUDA: how the expert FFN runs (default: grouped kernels where they apply).
    pub expert_ffn: Option<ExpertFfn>,
    /// Speculative expert prefetch for an in-model router (default: on when the expert cache
    /// holds fewer units than the model has experts; off for a pre-gate router, whose routes are
    /// exact, and when every expert is resident).
    pub speculate: Option<bool>,
    /// Speculation: layers predicted ahead (default 2).
    pub spec_depth: Option<usize>,
    /// Speculation: candidates per token beyond the gating top-k (default 1).
    pub spec_extra: Option<usize>,
}

impl EngineOptions {
    /// The speculator's depth and extra candidates these options ask for (defaults where
    /// unset), enabled as [`EngineOptions::speculate`] says or, when unset, as the backend's
    /// default decides.
    pub fn speculation(&self) -> crate::moe::SpeculatorConfig {
        let d = crate::moe::SpeculatorConfig::default();
        crate::moe::SpeculatorConfig {
            depth: self.spec_depth.unwrap_or(d.depth),
            extra: self.spec_extra.unwrap_or(d.extra),
            enabled: self.speculate.unwrap_or(true),
        }
    }
}

/// One environment variable pregate reads, for the documentation table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvVar {
    /// Its name.
    pub name: &'static str,
    /// What it sets.
    pub meaning: &'static str,
}

/// Every environment variable pregate reads (the table of the module docs).
pub const ENVIRONMENT: &[EnvVar] = &[
    EnvVar {
        name: "PREGATE_EXPERT_CACHE",
        meaning: "expert cache capacity",
    },
    EnvVar {
        name: "PREGATE_CACHE_POLICY",
        meaning: "expert cache eviction policy",
    },
    EnvVar {
        name: "PREGATE_PREFETCH",
        meaning: "0 loads experts on demand",
    },
    EnvVar {
        name: "PREGATE_CUDA_DTYPE",
        meaning: "CUDA compute type",
    },
    EnvVar {
        name: "PREGATE_ROUTER",
        meaning: "where the router runs",
    },
    EnvVar {
        name: "PREGATE_KV_TOKENS",
        meaning: "CUDA KV cache size in tokens",
    },
    EnvVar {
        name: "PREGATE_EXPERT_FFN",
        meaning: "CUDA expert FFN implementation",
    },
    EnvVar {
        name: "PREGATE_SPECULATE",
        meaning: "speculative expert prefetch on or off",
    },
    EnvVar {
        name: "PREGATE_SPEC_DEPTH",
        meaning: "layers speculated ahead",
    },
    EnvVar {
        name: "PREGATE_SPEC_EXTRA",
        meaning: "speculative candidates beyond the top-k",
    },
    EnvVar {
        name: "PREGATE_NVRTC_LIB",
        meaning: "the NVRTC library to load",
    },
    EnvVar {
        name: "PREGATE_CUDA_INCLUDE",
        meaning: "CUDA headers for NVRTC",
    },
    EnvVar {
        name: "PREGATE_KERNEL_CACHE",
        meaning: "compiled-kernel cache folder",
    },
];

impl EngineOptions {
    /// The options the process environment sets (see the module docs); unset or empty variables
    /// keep the defaults. Hosts call it once, at start, then apply their own settings.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The options `var` sets (a variable lookup: the environment, or a test's map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        // A set variable parsed by its type's `FromStr`, an error naming the variable.
        fn parsed<T: std::str::FromStr<Err = Error>>(
            k: &str,
            v: Option<String>,
        ) -> Result<Option<T>> {
            v.map(|v| v.parse())
                .transpose()
                .map_err(|e| Error::InvalidArgument(format!("{k}: {e}")))
        }
        let mut o = EngineOptions::default();
        let capacity: Option<ExpertCapacity> =
            parsed("PREGATE_EXPERT_CACHE", var("PREGATE_EXPERT_CACHE"))?;
        let policy: Option<EvictionPolicy> =
            parsed("PREGATE_CACHE_POLICY", var("PREGATE_CACHE_POLICY"))?;
        if capacity.is_some() || policy.is_some() {
            o.expert_cache = Some(ExpertCacheOptions {
                capacity: capacity.unwrap_or(ExpertCapacity::All),
                policy: policy.unwrap_or(EvictionPolicy::Belady),
            });
        }
        if let Some(v) = var("PREGATE_PREFETCH") {
            o.prefetch = Some(match v.trim() {
                "1" | "true" | "on" => true,
                "0" | "false" | "off" => false,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "PREGATE_PREFETCH `{v}`: expected 1 or 0"
                    )))
                }
            });
        }
        o.cuda_dtype = parsed("PREGATE_CUDA_DTYPE", var("PREGATE_CUDA_DTYPE"))?;
        o.router = parsed("PREGATE_ROUTER", var("PREGATE_ROUTER"))?;
        o.expert_ffn = parsed("PREGATE_EXPERT_FFN", var("PREGATE_EXPERT_FFN"))?;
        if let Some(v) = var("PREGATE_SPECULATE") {
            o.speculate = Some(match v.trim() {
                "1" | "true" | "on" => true,
                "0" | "false" | "off" => false,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "PREGATE_SPECULATE `{v}`: expected 1 or 0"
                    )))
                }
            });
        }
        for (k, field) in [
            ("PREGATE_SPEC_DEPTH", &mut o.spec_depth),
            ("PREGATE_SPEC_EXTRA", &mut o.spec_extra),
        ] {
            if let Some(v) = var(k) {
                *field = Some(v.trim().parse().map_err(|_| {
                    Error::InvalidArgument(format!("{k} `{v}`: expected a whole number"))
                })?);
            }
        }
        if let Some(v) = var("PREGATE_KV_TOKENS") {
            let n: usize = v.trim().parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "PREGATE_KV_TOKENS `{v}`: expected a positive number of tokens"
                ))
            })?;
            o.kv_tokens = Some(n);
        }
        Ok(o)
    }

    /// `self`, with every field `over` sets taken from `over` (a host's own settings on top of
    /// the environment's).
    pub fn overridden_by(&self, over: &EngineOptions) -> EngineOptions {
        EngineOptions {
            expert_cache: over.expert_cache.or(self.expert_cache),
            prefetch: over.prefetch.or(self.prefetch),
            cuda_dtype: over.cuda_dtype.or(self.cuda_dtype),
            router: over.router.or(self.router),
            kv_tokens: over.kv_tokens.or(self.kv_tokens),
            expert_ffn: over.expert_ffn.or(self.expert_ffn),
            speculate: over.speculate.or(self.speculate),
            spec_depth: over.spec_depth.or(self.spec_depth),
            spec_extra: over.spec_extra.or(self.spec_extra),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<EngineOptions> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        EngineOptions::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn the_environment_fills_every_field_and_empty_means_unset() {
        let o = from(&[
            ("PREGATE_EXPERT_CACHE", "3"),
            ("PREGATE_CACHE_POLICY", "lru"),
            ("PREGATE_PREFETCH", "0"),
            ("PREGATE_CUDA_DTYPE", "f32"),
            ("PREGATE_ROUTER", "device"),
            ("PREGATE_KV_TOKENS", "4096"),
            ("PREGATE_EXPERT_FFN", "cublas"),
        ])
        .unwrap();
        assert_eq!(
            o.expert_cache,
            Some(ExpertCacheOptions {
                capacity: ExpertCapacity::PerLayer(3),
                policy: EvictionPolicy::Lru
            })
        );
        assert_eq!(o.prefetch, Some(false));
        assert_eq!(o.cuda_dtype, Some(CudaDtype::F32));
        assert_eq!(o.router, Some(RouterPlacement::Device));
        assert_eq!(o.kv_tokens, Some(4096));
        assert_eq!(o.expert_ffn, Some(ExpertFfn::Cublas));
        assert_eq!(
            from(&[("PREGATE_ROUTER", ""), ("PREGATE_KV_TOKENS", " ")]).unwrap(),
            EngineOptions::default()
        );
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (k, v) in [
            ("PREGATE_EXPERT_CACHE", "lots"),
            ("PREGATE_CACHE_POLICY", "mru"),
            ("PREGATE_PREFETCH", "maybe"),
            ("PREGATE_CUDA_DTYPE", "fp8"),
            ("PREGATE_ROUTER", "tpu"),
            ("PREGATE_KV_TOKENS", "0"),
            ("PREGATE_EXPERT_FFN", "magic"),
        ] {
            let e = from(&[(k, v)]).unwrap_err().to_string();
            assert!(e.contains(k), "{k}={v}: {e}");
        }
    }

    #[test]
    fn host_settings_override_the_environment_field_by_field() {
        let env = from(&[("PREGATE_CUDA_DTYPE", "f32"), ("PREGATE_ROUTER", "device")]).unwrap();
        let host = EngineOptions {
            router: Some(RouterPlacement::Host),
            ..EngineOptions::default()
        };
        let o = env.overridden_by(&host);
        assert_eq!(o.router, Some(RouterPlacement::Host));
        assert_eq!(o.cuda_dtype, Some(CudaDtype::F32));
    }

    #[test]
    fn the_table_lists_every_variable_the_code_reads() {
        let names: Vec<&str> = ENVIRONMENT.iter().map(|v| v.name).collect();
        for src in [
            include_str!("options.rs"),
            include_str!("../../../kernels/src/nvrtc.rs"),
            include_str!("../../../kernels/src/cache.rs"),
            include_str!("../../../kernels/src/blas.rs"),
        ] {
            for (i, _) in src.match_indices("\"PREGATE_") {
                let name: String = src[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                // This test's own search string names no variable.
                if name != "PREGATE_" {
                    assert!(names.contains(&name.as_str()), "{name} is missing");
                }
            }
        }
    }

    #[test]
    fn speculation_comes_from_the_environment_and_hosts_override_it() {
        let o = from(&[
            ("PREGATE_SPECULATE", "0"),
            ("PREGATE_SPEC_DEPTH", "3"),
            ("PREGATE_SPEC_EXTRA", "0"),
        ])
        .unwrap();
        assert_eq!(
            (o.speculate, o.spec_depth, o.spec_extra),
            (Some(false), Some(3), Some(0))
        );
        let s = o.speculation();
        assert_eq!((s.depth, s.extra, s.enabled), (3, 0, false));
        let host = EngineOptions {
            speculate: Some(true),
            ..EngineOptions::default()
        };
        let both = o.overridden_by(&host);
        assert_eq!((both.speculate, both.spec_depth), (Some(true), Some(3)));
        let d = EngineOptions::default().speculation();
        assert_eq!((d.depth, d.extra), (2, 1));
        assert!(from(&[("PREGATE_SPECULATE", "maybe")]).is_err());
        let err = from(&[("PREGATE_SPEC_DEPTH", "two")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("PREGATE_SPEC_DEPTH"), "{err}");
    }
}
