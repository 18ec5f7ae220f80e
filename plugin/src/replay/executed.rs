//! Executed replay (in progress).
use std::path::Path;

use super::{CostModel, Report, TraceRequest};
use crate::batcher::BatcherConfig;
use crate::cache::EvictionPolicy;
use crate::error::{Error, Result};
use crate::metrics::ModelMetrics;

/// Settings of an executed replay.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// The batcher.
    pub batcher: BatcherConfig,
    /// Cache capacity, experts per layer.
    pub per_layer: usize,
    /// Eviction policy.
    pub policy: EvictionPolicy,
    /// Load costs (the CPU engine holds every expert; loads are accounted, not performed).
    pub cost: CostModel,
    /// Seed of made-up prompt ids and the random policy.
    pub seed: u64,
    /// Overrides the bytes of one expert-layer.
    pub expert_bytes: Option<u64>,
}

/// Replays `reqs` on the CPU engine.
pub fn run(
    _dir: &Path,
    _reqs: &[TraceRequest],
    _cfg: &ExecConfig,
    _metrics: Option<&ModelMetrics>,
) -> Result<Report> {
    Err(Error::InvalidArgument(
        "executed mode is not built yet".into(),
    ))
}
