//! Workload replay: a request trace (or a synthetic workload) through the lookahead batcher and
//! the expert cache, simulated on a cost model ([`sim`]) or executed on the CPU engine
//! ([`executed`]).
//!
//! Workload formats and the synthetic generators are documented in [`workload`]; the figures a
//! replay reports in [`report`]. Models that route each layer from its own hidden state replay
//! through [`perlayer`] (per-layer routes, speculative prefetch or on-demand loading). `pregate replay` (crate `pregate-cli`) is the command-line front.

pub mod executed;
mod layer;
pub mod offline;
pub mod perlayer;
pub mod report;
mod requests;
pub mod sim;
pub mod workload;

use std::path::Path;

pub use perlayer::{simulate_per_layer, PerLayerConfig, RouteSource};
pub use report::PerLayerReport;
pub use report::Report;
pub use sim::{check_capacity, simulate, CostModel, Lookahead, ModelShape, Preset, SimConfig};
pub use workload::{ExpertModel, LayerExpertModel, Prompt, RouteTrace, TraceRequest};

use crate::config::{config_path, ModelConfig};
use crate::error::{Error, Result};
use crate::model::family::hub;
use crate::model::ModelFamily;

fn dtype_bytes(dtype: &str) -> Option<u64> {
    match dtype {
        "BF16" | "F16" | "I16" | "U16" => Some(2),
        "F32" | "I32" | "U32" => Some(4),
        "F64" | "I64" | "U64" => Some(8),
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(1),
        _ => None,
    }
}

/// The header of a safetensors file: tensor name -> (dtype, shape).
fn safetensors_header(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(Error::checkpoint(path, format!("header of {n} bytes")));
    }
    let mut text = vec![0u8; n as usize];
    f.read_exact(&mut text).map_err(|e| Error::io(path, e))?;
    match serde_json::from_slice(&text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::checkpoint(path, "header is not a JSON object")),
        Err(e) => Err(Error::checkpoint(path, e.to_string())),
    }
}

/// Bytes of `names` (all in the same file) per the safetensors header of the file holding them.
fn tensors_bytes(dir: &Path, names: &[String]) -> Result<Option<u64>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let file = if single.exists() {
        single
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::checkpoint(&index, e.to_string()))?;
        match v["weight_map"][&names[0]].as_str() {
            Some(shard) => dir.join(shard),
            None => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    let header = safetensors_header(&file)?;
    let mut total = 0u64;
    for name in names {
        let Some(t) = header.get(name) else {
            return Ok(None);
        };
        let dtype = t["dtype"].as_str().unwrap_or_default();
        let size = dtype_bytes(dtype)
            .ok_or_else(|| Error::checkpoint(&file, format!("`{name}` has dtype `{dtype}`")))?;
        let elems = t["shape"]
            .as_array()
            .ok_or_else(|| Error::checkpoint(&file, format!("`{name}` has no shape")))?
            .iter()
            .map(|d| d.as_u64().unwrap_or(0))
            .product::<u64>();
        total += elems * size;
    }
    Ok(Some(total))
}

/// The cache's view of a model directory: layers and experts from `config.json`, and the bytes of
/// one expert-layer from the safetensors header of its split experts (`model.layers.0.moe.
/// {gate,up,down}_proj_0.weight`). Without split-expert weights (config only, or the masked
/// training layout) the size is estimated as `3 x hidden x intermediate/2` bf16 values, Read-ME's
/// split of half the dense channels per expert.
///
/// A family that routes in the model (Mixtral, Qwen2/3-MoE, OLMoE) counts its MoE layers only (a
/// dense layer loads no expert), its `num_experts`, and the bytes of layer `l`'s expert 0 under
/// the family's names, or a layer's stacked expert tensors over its experts; without weights,
/// `3 x hidden x expert width` values of the config's dtype.
pub fn model_shape(dir: &Path) -> Result<ModelShape> {
    let cfg = ModelConfig::from_file(&config_path(dir))?;
    let family = cfg.family().map_err(|m| Error::config("config.json", m))?;
    if family != ModelFamily::ReadMe {
        return family_shape(dir, &cfg, family);
    }
    let names: Vec<String> = ["gate", "up", "down"]
        .iter()
        .map(|p| format!("model.layers.0.moe.{p}_proj_0.weight"))
        .collect();
    let expert_bytes = match tensors_bytes(dir, &names)? {
        Some(b) => b,
        None => 3 * cfg.hidden_size as u64 * (cfg.intermediate_size as u64 / 2).max(1) * 2,
    };
    let dtype = if cfg.torch_dtype.as_deref() == Some("float32") {
        4
    } else {
        2
    };
    Ok(ModelShape {
        layers: cfg.num_hidden_layers,
        experts: cfg.n_cluster,
        expert_bytes,
        kv_bytes_per_token: 2
            * cfg.num_hidden_layers as u64
            * (cfg.num_kv_heads() * cfg.head_dim()) as u64
            * dtype,
    })
}

/// Where a replay's clock goes when the batcher scheduled nothing: to the next arrival, if it is
/// still ahead (only an arrival can unblock a step that admitted nothing); otherwise the batcher
/// is stuck with work pending, an internal error.
pub(crate) fn idle_until(now: f64, next_arrival: Option<f64>) -> Result<f64> {
    match next_arrival {
        Some(t) if t > now => Ok(t),
        _ => Err(Error::Internal(
            "the batcher scheduled nothing with work pending".into(),
        )),
    }
}

/// Experts per token of a model that routes in the model (its per-layer gates), `None` for
/// Read-ME (routes shared by every layer, from its pre-gating router).
pub fn model_top_k(dir: &Path) -> Result<Option<usize>> {
    let cfg = ModelConfig::from_file(&config_path(dir))?;
    let family = cfg.family().map_err(|m| Error::config("config.json", m))?;
    Ok((family != ModelFamily::ReadMe).then(|| cfg.experts_per_token()))
}

fn kv_bytes_per_token(cfg: &ModelConfig, dtype: u64) -> u64 {
    2 * cfg.num_hidden_layers as u64 * (cfg.num_kv_heads() * cfg.head_dim()) as u64 * dtype
}

fn family_shape(dir: &Path, cfg: &ModelConfig, family: ModelFamily) -> Result<ModelShape> {
    let moe: Vec<usize> = (0..cfg.num_hidden_layers)
        .filter(|&l| cfg.is_moe_layer(l))
        .collect();
    let Some(&first) = moe.first() else {
        return Err(Error::config(
            "config.json",
            "no layer has routed experts: nothing for an expert cache to hold",
        ));
    };
    let experts = cfg.num_experts();
    let dtype = if cfg.torch_dtype.as_deref() == Some("float32") {
        4
    } else {
        2
    };
    let per_expert = hub::expert_names(family, first, 0).to_vec();
    let stacked = hub::stacked_expert_names(first).to_vec();
    let expert_bytes = match tensors_bytes(dir, &per_expert)? {
        Some(b) => b,
        None => match tensors_bytes(dir, &stacked)? {
            Some(b) => b / experts.max(1) as u64,
            None => 3 * cfg.hidden_size as u64 * cfg.expert_intermediate_size().0 as u64 * dtype,
        },
    };
    Ok(ModelShape {
        layers: moe.len(),
        experts,
        expert_bytes,
        kv_bytes_per_token: kv_bytes_per_token(cfg, dtype),
    })
}
