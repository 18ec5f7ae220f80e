//! The model's `config.pbtxt` (as Triton's JSON), parsed and validated once per model.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pregate::batcher::{BatchPolicy, BatcherConfig};
use pregate::cache::EvictionPolicy;
use pregate::engine::{Device, EngineOptions, ExpertCacheOptions, ExpertCapacity};
use pregate::serve::{DEFAULT_MAX_QUEUE_WAIT, DEFAULT_MAX_WAITING};
use serde_json::Value;

use crate::bridge::kind;

/// Every `parameters` key the backend reads; any other key fails the load (a typo must not be
/// silently ignored).
pub const PARAMETERS: [&str; 17] = [
    "model_dir",
    "device",
    "max_batch_tokens",
    "max_prefill_chunk",
    "max_running",
    "batching_policy",
    "max_wait_ms",
    "max_queue_wait_ms",
    "max_waiting_requests",
    "max_prompt_bytes",
    "kv_memory_bytes",
    "cache_capacity",
    "cache_policy",
    "metrics",
    "speculate",
    "spec_depth",
    "spec_extra",
];

/// The backend's settings for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    /// The pregate model directory (absolute, or resolved against the model's repository folder).
    pub model_dir: PathBuf,
    /// The `device` parameter (for KIND_MODEL / KIND_AUTO instances).
    pub device: Device,
    /// The batcher's configuration.
    pub batcher: BatcherConfig,
    /// Longest a request waits for admission before it fails as overloaded (`None`: unbounded;
    /// unset: [`DEFAULT_MAX_QUEUE_WAIT`]).
    pub max_queue_wait: Option<Duration>,
    /// Most requests waiting for admission at once; more are refused at once as overloaded
    /// (`None`: unbounded; unset: [`DEFAULT_MAX_WAITING`]).
    pub max_waiting: Option<usize>,
    /// Largest prompt text, in bytes, refused before tokenization (`None`: the serving loop's
    /// default, [`pregate::serve::DEFAULT_PROMPT_BYTES_PER_TOKEN`] per context token).
    pub max_prompt_bytes: Option<usize>,
    /// KV memory the admitted requests may reserve together (`None`: no budget).
    pub kv_memory_bytes: Option<u64>,
    /// Expert cache size: CUDA, its device slots; CPU, an accounting cache (the same decisions,
    /// weights staying in host memory). `None`: the backend's default (CUDA: `PREGATE_EXPERT_CACHE`
    /// or every expert; CPU: no cache).
    pub cache_capacity: Option<ExpertCapacity>,
    /// Expert cache eviction policy.
    pub cache_policy: EvictionPolicy,
    /// Whether to publish pregate's metrics on Triton's endpoint.
    pub metrics: bool,
    /// Speculative expert prefetch for an in-model router: on, off, or `None` for the default
    /// (`PREGATE_SPECULATE`, else on when the expert cache is smaller than the experts).
    pub speculate: Option<bool>,
    /// Speculation: layers predicted ahead (`None`: `PREGATE_SPEC_DEPTH` or 2).
    pub spec_depth: Option<usize>,
    /// Speculation: candidates per token beyond the top-k (`None`: `PREGATE_SPEC_EXTRA` or 1).
    pub spec_extra: Option<usize>,
}

/// Reads a model configuration; `repository` is the model's folder in the model repository.
pub fn parse_model_config(json: &str, repository: &Path) -> Result<ModelParams, String> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| format!("model configuration is not JSON: {e}"))?;
    let decoupled = v
        .pointer("/model_transaction_policy/decoupled")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !decoupled {
        return Err(
            "the pregate backend streams tokens: set `model_transaction_policy { \
                    decoupled: true }` in config.pbtxt"
                .into(),
        );
    }
    let params = v.get("parameters").and_then(Value::as_object);
    let get = |key: &str| -> Option<String> {
        params
            .and_then(|p| p.get(key))
            .and_then(|p| p.get("string_value"))
            .and_then(Value::as_str)
            .map(|s| s.trim().to_string())
    };
    if let Some(p) = params {
        if let Some(bad) = p.keys().find(|k| !PARAMETERS.contains(&k.as_str())) {
            return Err(format!(
                "unknown parameter `{bad}` in config.pbtxt (known: {})",
                PARAMETERS.join(", ")
            ));
        }
    }
    let model_dir = get("model_dir").filter(|s| !s.is_empty()).ok_or_else(|| {
        "parameter `model_dir` is required: the pregate model directory (config.json, \
         tokenizer.json, weights)"
            .to_string()
    })?;
    let model_dir = {
        let p = PathBuf::from(&model_dir);
        if p.is_absolute() {
            p
        } else {
            repository.join(p)
        }
    };
    let device = match get("device") {
        Some(d) => d.parse().map_err(|e| format!("parameter `device`: {e}"))?,
        None => Device::Auto,
    };
    let mut batcher = BatcherConfig {
        policy: BatchPolicy::ExpertAware,
        ..BatcherConfig::default()
    };
    if let Some(s) = get("batching_policy") {
        batcher.policy = s
            .parse()
            .map_err(|e| format!("parameter `batching_policy`: {e}"))?;
    }
    let num = |key: &str| -> Result<Option<usize>, String> {
        get(key)
            .map(|s| {
                s.parse::<usize>()
                    .map_err(|_| format!("parameter `{key}`: `{s}` is not a whole number"))
            })
            .transpose()
    };
    if let Some(n) = num("max_batch_tokens")? {
        batcher.max_batch_tokens = n;
    }
    if let Some(n) = num("max_prefill_chunk")? {
        batcher.max_prefill_chunk = n;
    } else {
        batcher.max_prefill_chunk = batcher.max_batch_tokens;
    }
    if let Some(n) = num("max_running")? {
        batcher.max_running = n;
    }
    if let Some(ms) = get("max_wait_ms") {
        let v = parse_bound_ms("max_wait_ms", &ms)?;
        batcher.max_wait = if v == 0.0 { None } else { Some(v / 1000.0) };
    }
    batcher
        .validate()
        .map_err(|e| format!("batcher parameters: {e}"))?;
    let max_queue_wait = match get("max_queue_wait_ms") {
        Some(s) => parse_queue_wait(&s)?,
        None => Some(DEFAULT_MAX_QUEUE_WAIT),
    };
    // 0 lifts the bound, as for the waits.
    let max_waiting = match num("max_waiting_requests")? {
        Some(0) => None,
        Some(n) => Some(n),
        None => Some(DEFAULT_MAX_WAITING),
    };
    let max_prompt_bytes = get("max_prompt_bytes")
        .map(|s| parse_bytes("max_prompt_bytes", &s))
        .transpose()?
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let kv_memory_bytes = get("kv_memory_bytes")
        .map(|s| parse_bytes("kv_memory_bytes", &s))
        .transpose()?;
    let cache_capacity = get("cache_capacity")
        .map(|s| parse_capacity(&s))
        .transpose()?;
    let cache_policy = match get("cache_policy") {
        Some(s) => s
            .parse()
            .map_err(|e| format!("parameter `cache_policy`: {e}"))?,
        None => EvictionPolicy::Belady,
    };
    let metrics = match get("metrics").as_deref() {
        None | Some("true") | Some("on") | Some("1") => true,
        Some("false") | Some("off") | Some("0") => false,
        Some(other) => {
            return Err(format!(
                "parameter `metrics`: `{other}` is not true or false"
            ))
        }
    };
    let speculate = match get("speculate").as_deref() {
        None => None,
        Some("true") | Some("on") | Some("1") => Some(true),
        Some("false") | Some("off") | Some("0") => Some(false),
        Some(other) => {
            return Err(format!(
                "parameter `speculate`: `{other}` is not true or false"
            ))
        }
    };
    let (spec_depth, spec_extra) = (num("spec_depth")?, num("spec_extra")?);
    Ok(ModelParams {
        speculate,
        spec_depth,
        spec_extra,
        model_dir,
        device,
        batcher,
        max_queue_wait,
        max_waiting,
        max_prompt_bytes,
        kv_memory_bytes,
        cache_capacity,
        cache_policy,
        metrics,
    })
}

impl ModelParams {
    /// The engine options these parameters ask for (the expert cache).
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            expert_cache: self.cache_capacity.map(|capacity| ExpertCacheOptions {
                capacity,
                policy: self.cache_policy,
            }),
            speculate: self.speculate,
            spec_depth: self.spec_depth,
            spec_extra: self.spec_extra,
            ..Default::default()
        }
    }
}

/// A time bound in milliseconds, 0 for no bound. NaN, infinities and negative values parse as
/// numbers but are refused, naming `param`, rather than read as "never": a typo must not silently
/// leave a wait unbounded.
fn parse_bound_ms(param: &str, s: &str) -> Result<f64, String> {
    let ms: f64 = s
        .parse()
        .map_err(|_| format!("parameter `{param}`: `{s}` is not a number"))?;
    if !(ms.is_finite() && ms >= 0.0) {
        return Err(format!(
            "parameter `{param}`: `{s}` must be a finite number of milliseconds, 0 or more (0: no \
             bound)"
        ));
    }
    Ok(ms)
}

/// A positive size in bytes: a whole number, optionally with a unit (`4096`, `64KiB`, `512MiB`,
/// `2GiB`); a size past 2^64 bytes is refused as too large.
pub fn parse_bytes(param: &str, s: &str) -> Result<u64, String> {
    let (digits, unit) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|&(suffix, unit)| s.strip_suffix(suffix).map(|d| (d.trim(), unit)))
    .unwrap_or((s, 1));
    let bad = || {
        format!(
            "parameter `{param}`: `{s}` is not a positive size in bytes (4096, 64KiB, 512MiB, \
             2GiB)"
        )
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let too_large = || format!("parameter `{param}`: `{s}` is too large");
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    let n = n.checked_mul(unit).ok_or_else(too_large)?;
    if n == 0 {
        return Err(bad());
    }
    Ok(n)
}

/// `max_queue_wait_ms`: milliseconds, 0 for no bound; NaN, infinite or negative values refused.
pub fn parse_queue_wait(s: &str) -> Result<Option<Duration>, String> {
    let ms = parse_bound_ms("max_queue_wait_ms", s)?;
    if ms == 0.0 {
        return Ok(None);
    }
    match Duration::try_from_secs_f64(ms / 1000.0) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        Ok(_) => Err(format!(
            "parameter `max_queue_wait_ms`: `{s}` is below a nanosecond (0: no bound)"
        )),
        Err(_) => Err(format!("parameter `max_queue_wait_ms`: `{s}` is too large")),
    }
}

/// `cache_capacity`: experts per layer (`2`, as `pregate replay --cache-capacity` counts them),
/// `all`, bytes with a unit (`512MiB`, `2GiB`), or a fraction of free memory (`0.5` or `50%`).
pub fn parse_capacity(s: &str) -> Result<ExpertCapacity, String> {
    s.parse()
        .map_err(|e| format!("parameter `cache_capacity`: {e}"))
}

/// The device an instance runs on: KIND_CPU is the CPU, KIND_GPU the instance's CUDA device,
/// KIND_MODEL and KIND_AUTO the `device` parameter. A `device` parameter that contradicts the
/// instance kind is an error.
pub fn instance_device(params: &ModelParams, kind_: u32, device_id: i32) -> Result<Device, String> {
    match kind_ {
        kind::CPU => match params.device {
            Device::Cuda(_) => Err(format!(
                "instance_group kind KIND_CPU contradicts parameter device = {}",
                params.device
            )),
            _ => Ok(Device::Cpu),
        },
        kind::GPU => match params.device {
            Device::Cpu => {
                Err("instance_group kind KIND_GPU contradicts parameter device = cpu".into())
            }
            _ => Ok(Device::Cuda(device_id.max(0) as usize)),
        },
        _ => Ok(params.device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(params: &str) -> String {
        format!(
            r#"{{"name":"m","backend":"pregate","model_transaction_policy":{{"decoupled":true}},
               "parameters":{{{params}}}}}"#
        )
    }

    fn p(k: &str, v: &str) -> String {
        format!(r#""{k}":{{"string_value":"{v}"}}"#)
    }

    #[test]
    fn speculation_parameters_reach_the_engine_options() {
        let json = cfg(&[
            p("model_dir", "m"),
            p("speculate", "off"),
            p("spec_depth", "3"),
            p("spec_extra", "0"),
        ]
        .join(","));
        let o = parse_model_config(&json, Path::new("/r"))
            .unwrap()
            .engine_options();
        assert_eq!(
            (o.speculate, o.spec_depth, o.spec_extra),
            (Some(false), Some(3), Some(0))
        );
        let bad = cfg(&[p("model_dir", "m"), p("speculate", "maybe")].join(","));
        let err = parse_model_config(&bad, Path::new("/r")).unwrap_err();
        assert!(err.contains("speculate"), "{err}");
    }

    #[test]
    fn parses_every_parameter() {
        let json = cfg(&[
            p("model_dir", "tiny"),
            p("device", "cpu"),
            p("max_batch_tokens", "64"),
            p("batching_policy", "fcfs"),
            p("max_wait_ms", "50"),
            p("max_queue_wait_ms", "2500"),
            p("max_waiting_requests", "16"),
            p("cache_capacity", "3"),
            p("cache_policy", "lru"),
            p("metrics", "false"),
        ]
        .join(","));
        let m = parse_model_config(&json, Path::new("/repo/m")).unwrap();
        assert_eq!(m.model_dir, PathBuf::from("/repo/m/tiny"));
        assert_eq!(m.device, Device::Cpu);
        assert_eq!(m.batcher.max_batch_tokens, 64);
        assert_eq!(m.batcher.max_prefill_chunk, 64);
        assert_eq!(m.batcher.policy, BatchPolicy::Fcfs);
        assert_eq!(m.batcher.max_wait, Some(0.05));
        assert_eq!(m.max_queue_wait, Some(Duration::from_millis(2500)));
        assert_eq!(m.max_waiting, Some(16));
        assert_eq!(m.cache_capacity, Some(ExpertCapacity::PerLayer(3)));
        assert_eq!(m.cache_policy, EvictionPolicy::Lru);
        let cache = m.engine_options().expert_cache.unwrap();
        assert_eq!(cache.capacity, ExpertCapacity::PerLayer(3));
        assert_eq!(cache.policy, EvictionPolicy::Lru);
        assert!(!m.metrics);
        assert_eq!(instance_device(&m, kind::CPU, 0), Ok(Device::Cpu));
        assert!(instance_device(&m, kind::GPU, 0).is_err());
    }

    #[test]
    fn rejects_bad_configurations_clearly() {
        let no_dir = cfg(&p("device", "cpu"));
        assert!(parse_model_config(&no_dir, Path::new("/"))
            .unwrap_err()
            .contains("model_dir"));
        let typo = cfg(&[p("model_dir", "/m"), p("max_batch_tokenz", "3")].join(","));
        assert!(parse_model_config(&typo, Path::new("/"))
            .unwrap_err()
            .contains("max_batch_tokenz"));
        let bad = cfg(&[p("model_dir", "/m"), p("max_batch_tokens", "many")].join(","));
        assert!(parse_model_config(&bad, Path::new("/"))
            .unwrap_err()
            .contains("max_batch_tokens"));
        let bad = cfg(&[p("model_dir", "/m"), p("batching_policy", "lifo")].join(","));
        assert!(parse_model_config(&bad, Path::new("/"))
            .unwrap_err()
            .contains("lifo"));
        for v in ["soon", "-1", "NaN", "inf", "-inf", ""] {
            let bad = cfg(&[p("model_dir", "/m"), p("max_wait_ms", v)].join(","));
            let e = parse_model_config(&bad, Path::new("/")).unwrap_err();
            assert!(e.contains("max_wait_ms"), "{v}: {e}");
        }
        for v in ["soon", "-1", "NaN", "inf", "", "1e300", "1e-12"] {
            let bad = cfg(&[p("model_dir", "/m"), p("max_queue_wait_ms", v)].join(","));
            let e = parse_model_config(&bad, Path::new("/")).unwrap_err();
            assert!(e.contains("max_queue_wait_ms"), "{v}: {e}");
        }
        let coupled = r#"{"parameters":{"model_dir":{"string_value":"/m"}}}"#;
        assert!(parse_model_config(coupled, Path::new("/"))
            .unwrap_err()
            .contains("decoupled"));
    }

    #[test]
    fn admission_is_bounded_by_default_and_unbounded_at_zero() {
        let unset = parse_model_config(&cfg(&p("model_dir", "/m")), Path::new("/")).unwrap();
        assert_eq!(unset.max_queue_wait, Some(Duration::from_secs(30)));
        assert_eq!(unset.max_waiting, Some(1024));
        let zero = cfg(&[
            p("model_dir", "/m"),
            p("max_queue_wait_ms", "0"),
            p("max_waiting_requests", "0"),
        ]
        .join(","));
        let zero = parse_model_config(&zero, Path::new("/")).unwrap();
        assert_eq!((zero.max_queue_wait, zero.max_waiting), (None, None));
        for v in ["-1", "many", "1.5"] {
            let bad = cfg(&[p("model_dir", "/m"), p("max_waiting_requests", v)].join(","));
            let e = parse_model_config(&bad, Path::new("/")).unwrap_err();
            assert!(e.contains("max_waiting_requests"), "{v}: {e}");
        }
        assert_eq!(parse_queue_wait("0"), Ok(None));
        let unset = parse_model_config(&cfg(&p("model_dir", "/m")), Path::new("/")).unwrap();
        assert_eq!(
            (unset.max_prompt_bytes, unset.kv_memory_bytes),
            (None, None)
        );
        let set = cfg(&[
            p("model_dir", "/m"),
            p("max_prompt_bytes", "64KiB"),
            p("kv_memory_bytes", "120000"),
        ]
        .join(","));
        let set = parse_model_config(&set, Path::new("/")).unwrap();
        assert_eq!(set.max_prompt_bytes, Some(65536));
        assert_eq!(set.kv_memory_bytes, Some(120000));
        assert_eq!(
            parse_queue_wait("0.5"),
            Ok(Some(Duration::from_micros(500)))
        );
    }

    #[test]
    fn byte_sizes_parse_and_name_what_is_wrong() {
        assert_eq!(parse_bytes("k", "4096"), Ok(4096));
        assert_eq!(parse_bytes("k", "2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("k", "3 MiB"), Ok(3 << 20));
        for bad in ["0", "-1", "1.5GiB", "lots", "", "GiB", "1e9"] {
            let e = parse_bytes("kv_memory_bytes", bad).unwrap_err();
            assert!(
                e.contains("kv_memory_bytes") && e.contains("positive size"),
                "{bad}: {e}"
            );
        }
        for huge in ["99999999999999999999", "17179869184GiB"] {
            let e = parse_bytes("kv_memory_bytes", huge).unwrap_err();
            assert!(e.ends_with("is too large"), "{huge}: {e}");
            assert!(!e.contains("18446744073709551615"), "{e}");
        }
    }

    #[test]
    fn capacities() {
        use pregate::cache::CacheCapacity;
        let total = |c| Ok(ExpertCapacity::Total(c));
        assert_eq!(parse_capacity("2GiB"), total(CacheCapacity::Bytes(2 << 30)));
        assert_eq!(
            parse_capacity("50%"),
            total(CacheCapacity::FractionOfFree(0.5))
        );
        assert_eq!(
            parse_capacity("0.25"),
            total(CacheCapacity::FractionOfFree(0.25))
        );
        assert_eq!(parse_capacity("2"), Ok(ExpertCapacity::PerLayer(2)));
        assert_eq!(parse_capacity("all"), Ok(ExpertCapacity::All));
        assert!(parse_capacity("0").is_err());
        assert!(parse_capacity("lots").is_err());
    }
}
