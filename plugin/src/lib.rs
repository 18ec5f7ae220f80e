//! pregate: serving Read-ME style Mixture-of-Experts models on limited GPU memory.
//!
//! A pre-gating router picks every token's experts from the token ids alone, before the backbone
//! runs ([`router`], [`route`]). Knowing the future routes, the lookahead batcher ([`batcher`])
//! forms steps that touch few distinct experts, and the expert cache ([`cache`]) evicts by next use
//! and prefetches ahead of use. The [`engine`] drives a device backend (the CPU reference here, CUDA
//! in `pregate-kernels`) one step at a time. See ARCHITECTURE.md for the map.
#![warn(missing_docs)]

pub mod batcher;
pub mod cache;
pub mod config;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod model;
pub mod moe;
pub mod ops;
pub mod replay;
pub mod route;
pub mod router;
pub mod sampling;
pub mod serve;
pub mod tokenizer;

pub use config::ModelConfig;
pub use engine::{Engine, GenerationRequest, StepEvent, StepOutput};
pub use error::{Error, ErrorCode, Result};
pub use route::{RoutePlan, TokenRoute};
