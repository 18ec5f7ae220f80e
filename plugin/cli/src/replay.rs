//! `pregate replay`: a trace or a synthetic workload through the batcher and the expert cache.
//!
//! ```text
//! pregate replay --model DIR [--trace FILE | --synthetic REQUESTS [--rate RPS] [--seed S]]
//!     --cache-capacity N --policy lru|lfu|random|belady|belady-decay
//!     --batching fcfs|decode-first|prefill-first|expert-aware [--max-batch-tokens N]
//!     [--max-wait-ms W] [--mode simulated|executed] [--json]
//! ```
//!
//! In simulated mode `--model` only supplies the shape (layers, experts, bytes per expert-layer,
//! KV bytes per token); without it the Read-ME defaults apply (32 layers, 7 experts, 135 MB), or
//! a named shape (`--shape mixtral-8x7b|qwen3-30b-a3b`, which also sets the top-k and the compute
//! costs), each overridable by `--layers`, `--experts`, `--expert-bytes`, `--kv-bytes-per-token`.
//!
//! `--per-layer` (or `--routes-jsonl FILE`) replays a model that routes each layer from its own
//! hidden state: synthetic per-layer routes (`--keep-prob`, `--layer-corr`) or recorded ones, with
//! on-demand loading, or speculative prefetch with `--spec-depth D [--spec-extra M]
//! [--recall r1,r2,...]` (see `pregate::replay::perlayer`).

use std::net::SocketAddr;
use std::path::PathBuf;

use pregate::batcher::{BatchPolicy, BatcherConfig};
use pregate::cache::EvictionPolicy;
use pregate::error::{Error, Result};
use pregate::metrics::{model_metrics, MetricsServer};
use pregate::moe::SpeculatorConfig;
use pregate::replay::{
    self, perlayer, workload, CostModel, ExpertModel, LayerExpertModel, ModelShape, PerLayerConfig,
    Preset, RouteSource, SimConfig,
};
use pregate::route::ExpertSet;

/// Flags of `pregate replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Model directory: its shape in simulated mode (optional there), the model run in executed mode.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Trace to replay: an Azure CSV (`.csv`) or JSON lines (see BENCHMARKS.md for the format).
    #[arg(long, conflicts_with = "synthetic")]
    pub trace: Option<PathBuf>,
    /// Replay this many synthetic requests (Poisson arrivals, Chatbot-Arena-like lengths).
    #[arg(long)]
    pub synthetic: Option<usize>,
    /// Synthetic arrival rate in requests/s (default 1); with --trace, rescales the trace to this
    /// mean rate.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Multiplies trace arrival times (< 1: a higher load).
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// Replay only the first N requests of the workload.
    #[arg(long)]
    pub max_requests: Option<usize>,
    /// Seed of the synthetic workload, the synthetic routes and the random policy.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Cache capacity in experts per layer.
    #[arg(long)]
    pub cache_capacity: usize,
    /// Eviction policy: lru, lfu, random, belady or belady-decay.
    #[arg(long, default_value = "lru")]
    pub policy: String,
    /// Batching policy: fcfs, decode-first, prefill-first or expert-aware.
    #[arg(long, default_value = "decode-first")]
    pub batching: String,
    /// Most tokens per step.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Most prompt tokens of one request per step (default: --max-batch-tokens).
    #[arg(long)]
    pub max_prefill_chunk: Option<usize>,
    /// Most requests admitted at once.
    #[arg(long, default_value_t = 256)]
    pub max_running: usize,
    /// Longest a request may wait between its steps, in milliseconds.
    #[arg(long)]
    pub max_wait_ms: Option<f64>,
    /// KV memory for admitted requests, GB (default 40 in simulated mode: an 80 GB H100 less the
    /// dense weights and an expert cache).
    #[arg(long)]
    pub kv_capacity_gb: Option<f64>,
    /// Most non-resident experts one step may use.
    #[arg(long)]
    pub max_expert_loads: Option<usize>,
    /// `simulated` (cost model) or `executed` (the CPU engine with the model's own router).
    #[arg(long, default_value = "simulated")]
    pub mode: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Issue a layer's loads only when compute reaches it (on-demand) instead of at step start.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Backbone layers (simulated mode without --model; default 32).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Experts per layer (simulated mode without --model; default 7).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Bytes of one expert-layer (default 135 MB, or from --model).
    #[arg(long)]
    pub expert_bytes: Option<u64>,
    /// KV bytes per token (default 512 KiB, or from --model).
    #[arg(long)]
    pub kv_bytes_per_token: Option<u64>,
    /// Expert-load bandwidth, GB/s.
    #[arg(long, default_value_t = 55.0)]
    pub link_gbps: f64,
    /// Fixed cost of one load, microseconds.
    #[arg(long, default_value_t = 15.0)]
    pub load_fixed_us: f64,
    /// Compute per token for the whole model, microseconds (default 11.9).
    #[arg(long)]
    pub token_us: Option<f64>,
    /// Compute per distinct expert per layer, microseconds (default 45).
    #[arg(long)]
    pub expert_layer_us: Option<f64>,
    /// Dense compute per layer, microseconds (default 45).
    #[arg(long)]
    pub dense_layer_us: Option<f64>,
    /// Share of tokens keeping the previous token's expert in the synthetic expert model (default
    /// 2921/4096, Read-ME's measurement); with --per-layer, the probability that each of a token's
    /// choices repeats the previous token's at the same layer (default 0.25).
    #[arg(long)]
    pub keep_prob: Option<f64>,
    /// A named model shape for simulated mode: read-me, mixtral-8x7b or qwen3-30b-a3b (layers,
    /// experts, bytes, KV, top-k and compute costs).
    #[arg(long, conflicts_with = "model")]
    pub shape: Option<String>,
    /// Replay per-layer routes (a model whose layers route from their own hidden state).
    #[arg(long)]
    pub per_layer: bool,
    /// Experts per token and layer with --per-layer (default: the shape's, else 2).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// With --per-layer: probability that a choice not kept from the previous token follows the
    /// previous layer's (default 0.5).
    #[arg(long)]
    pub layer_corr: Option<f64>,
    /// Per-layer routes recorded from a model, JSON lines (implies --per-layer; format in
    /// `pregate::replay::workload`).
    #[arg(long)]
    pub routes_jsonl: Option<PathBuf>,
    /// Speculative prefetch this many layers ahead (1..=4; 0 or absent: on-demand loading).
    #[arg(long)]
    pub spec_depth: Option<usize>,
    /// Speculative candidates per token beyond the top-k.
    #[arg(long, default_value_t = 1)]
    pub spec_extra: usize,
    /// How speculative loads share the link: `guarded` (exact loads first; a speculative copy
    /// starts only if it lands before the next exact load can be issued) or `eager` (issued at
    /// once, ahead of later exact loads).
    #[arg(long, default_value = "guarded")]
    pub spec_rule: String,
    /// The simulated predictor's recall per distance, comma-separated (default 0.79,0.69,0.59,0.49).
    #[arg(long, value_delimiter = ',')]
    pub recall: Option<Vec<f64>>,
    /// What `belady` knows of coming steps in simulated mode: `online` (queued prompts and each
    /// request's route history) or `oracle` (also the true next decode tokens; an upper bound).
    #[arg(long, default_value = "online")]
    pub lookahead: String,
    /// Also evaluate every eviction policy at capacities 2..=5 (1..experts-1 if fewer) on this
    /// replay's fixed step sequence, Belady with its exact future (the paper's Table 4 setting).
    #[arg(long)]
    pub hit_ratio_table: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9400) during the replay.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Keep serving metrics this many seconds after the replay ends.
    #[arg(long, default_value_t = 0.0)]
    pub metrics_linger_s: f64,
}

fn positive(name: &str, v: f64) -> Result<f64> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(Error::InvalidArgument(format!(
            "--{name} {v} must be positive"
        )))
    }
}

/// The workload the flags describe.
fn workload(args: &ReplayArgs) -> Result<Vec<workload::TraceRequest>> {
    let mut reqs = match (&args.trace, args.synthetic) {
        (Some(path), None) => {
            let mut r = workload::read_trace(path)?;
            if let Some(n) = args.max_requests {
                r.truncate(n);
            }
            if let Some(s) = args.time_scale {
                workload::scale_time(&mut r, s)?;
            }
            if let Some(rate) = args.rate {
                let span = r.last().map_or(0.0, |l| l.arrival);
                if span > 0.0 && r.len() > 1 {
                    let now = (r.len() - 1) as f64 / span;
                    workload::scale_time(&mut r, now / positive("rate", rate)?)?;
                }
            }
            r
        }
        (None, Some(n)) => {
            let rate = positive("rate", args.rate.unwrap_or(1.0))?;
            let mut r = workload::synthetic(n, rate, args.seed)?;
            if let Some(s) = args.time_scale {
                workload::scale_time(&mut r, s)?;
            }
            r
        }
        _ => {
            return Err(Error::InvalidArgument(
                "give exactly one of --trace FILE or --synthetic REQUESTS".into(),
            ))
        }
    };
    if let Some(n) = args.max_requests {
        reqs.truncate(n);
    }
    if reqs.is_empty() {
        return Err(Error::InvalidArgument(
            "the workload has no requests".into(),
        ));
    }
    Ok(reqs)
}

/// The batcher configuration the flags describe.
pub(crate) fn batcher_config(
    args: &ReplayArgs,
    kv_default_gb: Option<f64>,
) -> Result<BatcherConfig> {
    let kv_gb = args.kv_capacity_gb.or(kv_default_gb);
    let cfg = BatcherConfig {
        policy: args.batching.parse::<BatchPolicy>()?,
        max_batch_tokens: args.max_batch_tokens,
        max_prefill_chunk: args.max_prefill_chunk.unwrap_or(args.max_batch_tokens),
        max_running: args.max_running,
        max_wait: args
            .max_wait_ms
            .map(|w| positive("max-wait-ms", w).map(|w| w / 1e3))
            .transpose()?,
        kv_capacity_bytes: kv_gb
            .map(|g| positive("kv-capacity-gb", g).map(|g| (g * 1e9) as u64))
            .transpose()?,
        max_expert_loads: args.max_expert_loads,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The named shape, if any.
fn preset(args: &ReplayArgs) -> Result<Option<Preset>> {
    args.shape.as_deref().map(Preset::by_name).transpose()
}

/// The simulated model shape: `--model`'s, else `--shape`'s, else Read-ME's, then the explicit
/// overrides.
fn shape(args: &ReplayArgs) -> Result<ModelShape> {
    let mut s = match (&args.model, preset(args)?) {
        (Some(dir), _) => replay::model_shape(dir)?,
        (None, Some(p)) => p.shape,
        (None, None) => ModelShape::read_me(),
    };
    if let Some(l) = args.layers {
        s.layers = l;
    }
    if let Some(e) = args.experts {
        s.experts = e;
    }
    if let Some(b) = args.expert_bytes {
        s.expert_bytes = b;
    }
    if let Some(k) = args.kv_bytes_per_token {
        s.kv_bytes_per_token = k;
    }
    if s.layers == 0 || s.experts == 0 || s.expert_bytes == 0 {
        return Err(Error::InvalidArgument(format!(
            "model shape {} layers x {} experts of {} bytes",
            s.layers, s.experts, s.expert_bytes
        )));
    }
    Ok(s)
}

fn cost(args: &ReplayArgs) -> Result<CostModel> {
    let d = preset(args)?.map_or_else(CostModel::default, |p| p.cost);
    let us = |name: &str, v: Option<f64>, default: f64| -> Result<f64> {
        match v {
            Some(v) if v.is_finite() && v >= 0.0 => Ok(v * 1e-6),
            Some(v) => Err(Error::InvalidArgument(format!("--{name} {v} must be >= 0"))),
            None => Ok(default),
        }
    };
    Ok(CostModel {
        link_bytes_per_s: positive("link-gbps", args.link_gbps)? * 1e9,
        load_fixed_s: us("load-fixed-us", Some(args.load_fixed_us), d.load_fixed_s)?,
        token_s: us("token-us", args.token_us, d.token_s)?,
        expert_layer_s: us("expert-layer-us", args.expert_layer_us, d.expert_layer_s)?,
        dense_layer_s: us("dense-layer-us", args.dense_layer_us, d.dense_layer_s)?,
    })
}

fn metrics_label(args: &ReplayArgs) -> String {
    let name = args
        .model
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "read-me-sim".into());
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        "model".into()
    } else {
        clean
    }
}

/// Per-layer routes: asked for, or implied by a model whose gates route in the model.
fn per_layer_requested(args: &ReplayArgs) -> Result<bool> {
    let asked = args.per_layer || args.routes_jsonl.is_some() || args.spec_depth.is_some();
    Ok(asked || model_top_k(args)?.is_some())
}

/// `--model`'s experts per token when its gates route in the model.
fn model_top_k(args: &ReplayArgs) -> Result<Option<usize>> {
    match (&args.model, args.mode.as_str()) {
        (Some(dir), "simulated") => replay::model_top_k(dir),
        _ => Ok(None),
    }
}

/// The per-layer replay the flags describe, or `None` for Read-ME's shared routes.
fn per_layer_config(args: &ReplayArgs, cfg: &SimConfig) -> Result<Option<PerLayerConfig>> {
    if !per_layer_requested(args)? {
        return Ok(None);
    }
    if args.hit_ratio_table {
        return Err(Error::InvalidArgument(
            "--hit-ratio-table evaluates Read-ME's shared routes; drop it with --per-layer".into(),
        ));
    }
    let top_k = args
        .top_k
        .or(model_top_k(args)?)
        .or(preset(args)?.map(|p| p.top_k))
        .unwrap_or(2);
    let routes = match &args.routes_jsonl {
        Some(path) => RouteSource::Trace(std::sync::Arc::new(workload::read_route_trace(path)?)),
        None => {
            let mut m =
                LayerExpertModel::new(cfg.shape.layers, cfg.shape.experts, top_k, args.seed);
            m.base = cfg.experts;
            m.keep = args.keep_prob.unwrap_or(LayerExpertModel::DEFAULT_KEEP);
            m.layer_corr = args
                .layer_corr
                .unwrap_or(LayerExpertModel::DEFAULT_LAYER_CORR);
            RouteSource::Synthetic(m)
        }
    };
    let speculation = match args.spec_depth {
        None | Some(0) => None,
        Some(depth) => Some(SpeculatorConfig {
            depth,
            extra: args.spec_extra,
            enabled: true,
        }),
    };
    Ok(Some(PerLayerConfig {
        top_k,
        routes,
        speculation,
        recall: args
            .recall
            .clone()
            .unwrap_or_else(|| perlayer::DEFAULT_RECALL.to_vec()),
        rule: args.spec_rule.parse()?,
    }))
}

/// One row of an offline hit-ratio table: policy, capacity (experts per layer), hit ratio.
type HitRow = (&'static str, usize, f64);

/// Every policy at capacities 2..=5 (clamped to 1..experts-1) on one access sequence.
fn hit_ratio_table(accesses: &[ExpertSet], experts: usize, seed: u64) -> Result<Vec<HitRow>> {
    let hi = experts.saturating_sub(1).clamp(1, 5);
    let lo = 2.min(hi);
    let mut out = Vec::new();
    for p in EvictionPolicy::ALL {
        for c in lo..=hi {
            out.push((
                p.as_str(),
                c,
                replay::offline::hit_ratio(accesses, experts, c, p, seed)?,
            ));
        }
    }
    Ok(out)
}

/// The two offline tables of a replay: per step (each step's distinct experts, as this replay ran
/// them) and per token (every scheduled token asks for its expert, in execution order: the access
/// stream of the paper's Table 4).
fn hit_ratio_tables(
    report: &replay::Report,
    args: &ReplayArgs,
) -> Result<[(String, Vec<HitRow>); 2]> {
    let experts = report
        .step_experts
        .iter()
        .flat_map(|s| s.iter())
        .max()
        .map_or(1, |e| e as usize + 1)
        .max(args.experts.unwrap_or(0));
    let per_token: Vec<ExpertSet> = report
        .token_experts
        .iter()
        .map(|&e| {
            let mut s = ExpertSet::default();
            s.insert(e);
            s
        })
        .collect();
    Ok([
        (
            format!("per step, {} steps", report.step_experts.len()),
            hit_ratio_table(&report.step_experts, experts, args.seed)?,
        ),
        (
            format!("per token, {} token accesses", per_token.len()),
            hit_ratio_table(&per_token, experts, args.seed)?,
        ),
    ])
}

fn print_hit_ratio_table(title: &str, table: &[HitRow]) {
    println!("\noffline hit ratio, {title} (%):");
    let mut caps: Vec<usize> = table.iter().map(|r| r.1).collect();
    caps.sort();
    caps.dedup();
    print!("{:<8}", "policy");
    for c in &caps {
        print!("{:>8}", format!("cap {c}"));
    }
    println!();
    for p in EvictionPolicy::ALL {
        print!("{:<8}", p.as_str());
        for c in &caps {
            let h = table
                .iter()
                .find(|r| r.0 == p.as_str() && r.1 == *c)
                .map_or(0.0, |r| r.2);
            print!("{:>8.2}", h * 100.0);
        }
        println!();
    }
}

/// Runs `pregate replay`.
pub fn run(args: ReplayArgs) -> Result<()> {
    let policy: EvictionPolicy = args.policy.parse()?;
    let executed = match args.mode.as_str() {
        "simulated" => false,
        "executed" => true,
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown mode `{other}` (expected simulated or executed)"
            )))
        }
    };
    let reqs = workload(&args)?;
    let server = args.metrics_addr.map(MetricsServer::start).transpose()?;
    if let Some(s) = &server {
        eprintln!("serving metrics on http://{}/metrics", s.local_addr());
    }
    let metrics = if server.is_some() {
        Some(model_metrics(&metrics_label(&args))?)
    } else {
        None
    };
    let report = if executed {
        let dir = args
            .model
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("--mode executed needs --model DIR".into()))?;
        if per_layer_requested(&args)? {
            return Err(Error::InvalidArgument(
                "per-layer routes and speculation are simulated only (--mode simulated)".into(),
            ));
        }
        let cfg = replay::executed::ExecConfig {
            batcher: batcher_config(&args, None)?,
            per_layer: args.cache_capacity,
            policy,
            cost: cost(&args)?,
            seed: args.seed,
            expert_bytes: args.expert_bytes,
        };
        replay::executed::run(dir, &reqs, &cfg, metrics.as_ref())?
    } else {
        let shape = shape(&args)?;
        let mut experts = ExpertModel::read_me(shape.experts, args.seed);
        experts.keep = args.keep_prob.unwrap_or(workload::READ_ME_KEEP);
        let cfg = SimConfig {
            shape,
            cost: cost(&args)?,
            batcher: batcher_config(&args, Some(40.0))?,
            per_layer: args.cache_capacity,
            policy,
            prefetch: !args.no_prefetch,
            experts,
            seed: args.seed,
            lookahead: args.lookahead.parse()?,
            record_steps: args.hit_ratio_table,
        };
        match per_layer_config(&args, &cfg)? {
            Some(pl) => replay::simulate_per_layer(&reqs, &cfg, &pl, metrics.as_ref())?,
            None => replay::simulate(&reqs, &cfg, metrics.as_ref())?,
        }
    };
    let tables = if args.hit_ratio_table {
        Some(hit_ratio_tables(&report, &args)?)
    } else {
        None
    };
    if args.json {
        let mut v = serde_json::to_value(&report).map_err(|e| Error::Internal(e.to_string()))?;
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("mode".into(), args.mode.clone().into());
            m.insert("policy".into(), policy.as_str().into());
            m.insert("batching".into(), args.batching.clone().into());
            m.insert("cache_capacity".into(), args.cache_capacity.into());
            m.insert("max_batch_tokens".into(), args.max_batch_tokens.into());
            m.insert("seed".into(), args.seed.into());
            if let Some(shape) = &args.shape {
                m.insert("shape".into(), shape.clone().into());
            }
            if let Some(tables) = &tables {
                for (key, (_, table)) in ["hit_ratio_table", "hit_ratio_table_per_token"]
                    .into_iter()
                    .zip(tables)
                {
                    let rows: Vec<serde_json::Value> = table
                        .iter()
                        .map(|(p, c, h)| {
                            serde_json::json!({"policy": p, "capacity": c, "hit_ratio": h})
                        })
                        .collect();
                    m.insert(key.into(), rows.into());
                }
            }
        }
        println!("{v}");
    } else {
        println!(
            "replay ({} mode): {} requests, cache {} experts/layer, policy {policy}, batching {}",
            args.mode,
            reqs.len(),
            args.cache_capacity,
            args.batching
        );
        print!("{}", report.table());
        for (title, table) in tables.iter().flatten() {
            print_hit_ratio_table(title, table);
        }
    }
    if server.is_some() && args.metrics_linger_s > 0.0 {
        std::thread::sleep(std::time::Duration::from_secs_f64(args.metrics_linger_s));
    }
    Ok(())
}
