//! `pregate generate`: run one prompt through the engine.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use pregate::cache::EvictionPolicy;
use pregate::engine::{
    open_engine_with, Device, EngineOptions, ExpertCacheOptions, ExpertCapacity, GenerationRequest,
};
use pregate::error::{Error, Result};
use pregate::model::ModelDir;
use pregate::sampling::SamplingParams;
use pregate::tokenizer::IncrementalDecoder;

use crate::progress::Bar;

/// Flags of `pregate generate`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"])))]
pub struct GenerateArgs {
    /// The model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A text prompt (tokenized with the model's tokenizer, BOS added).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt token ids, comma-separated, used exactly as given (no BOS added).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; greedy when absent or 0.
    #[arg(long, value_parser = temperature)]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0, value_parser = top_p)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 or -1 = all), as Triton's `top_k`.
    #[arg(long, default_value = "0", allow_hyphen_values = true, value_parser = top_k)]
    pub top_k: usize,
    /// Seed of the sampler.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating past EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Write every step's logits to this safetensors file (tensor `logits`, f32 `[steps, vocab]`).
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Expert cache capacity, as Triton's `cache_capacity`: all, N (experts per layer), NGiB /
    /// NMiB, or a fraction of free device memory (0.5, 50%). On the CPU the cache only accounts
    /// (weights stay in host memory).
    #[arg(long = "cache-capacity", visible_alias = "expert-cache", value_parser = capacity)]
    pub expert_cache: Option<ExpertCapacity>,
    /// Expert cache eviction policy: belady, belady-decay, lru, lfu or random (with an in-model
    /// router no next use is known ahead, so belady ranks as lru; belady-decay by decayed use
    /// counts).
    #[arg(long, default_value = "belady")]
    pub cache_policy: String,
    /// CUDA compute dtype: bf16 or f32.
    #[arg(long)]
    pub cuda_dtype: Option<String>,
    /// Where the CUDA backend runs the router: host or device (default: host, or
    /// `PREGATE_ROUTER`). Ignored on the CPU.
    #[arg(long)]
    pub router: Option<String>,
    /// Speculative expert prefetch (in-model gates): layers predicted ahead, 1..=4 (default 2;
    /// on by default when the expert cache is smaller than the experts).
    #[arg(long)]
    pub spec_depth: Option<usize>,
    /// Speculative candidates per token beyond the top-k, 0..=8 (default 1).
    #[arg(long)]
    pub spec_extra: Option<usize>,
    /// No speculative expert prefetch.
    #[arg(long, conflicts_with_all = ["spec_depth", "spec_extra"])]
    pub no_spec: bool,
}

/// Runs `pregate generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let device: Device = args.device.parse()?;
    let model = ModelDir::open(&args.model)?.with_progress(Arc::new(Bar::new(Bar::LOAD_BYTES)));
    let prompt = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => model
            .tokenizer
            .as_ref()
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{} has no tokenizer.json: pass --prompt-ids",
                    args.model.display()
                ))
            })?
            .encode(text, true)?,
        (None, None) => {
            return Err(Error::InvalidArgument(
                "give --prompt or --prompt-ids".into(),
            ))
        }
    };
    let sampling = SamplingParams {
        temperature: args.temperature.unwrap_or(0.0),
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let policy: EvictionPolicy = args.cache_policy.parse()?;
    let options = EngineOptions {
        expert_cache: args
            .expert_cache
            .map(|capacity| ExpertCacheOptions { capacity, policy }),
        cuda_dtype: args.cuda_dtype.as_deref().map(str::parse).transpose()?,
        router: args.router.as_deref().map(str::parse).transpose()?,
        speculate: args.no_spec.then_some(false),
        spec_depth: args.spec_depth,
        spec_extra: args.spec_extra,
        ..EngineOptions::default()
    };
    // The environment first, then the flags.
    let options = EngineOptions::from_env()?.overridden_by(&options);
    let mut engine = open_engine_with(&model, device, &options)?;
    let request = GenerationRequest {
        prompt: prompt.clone(),
        sampling,
        max_new_tokens: args.max_new_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: args.ignore_eos,
        keep_logits: args.dump_logits.is_some(),
    };
    let seq = engine.add_request(request)?;
    let mut experts: Vec<Vec<u16>> = engine
        .routes(seq)
        .map(|plan| {
            (0..plan.len())
                .map(|t| plan.route(t, 0).experts().to_vec())
                .collect()
        })
        .unwrap_or_default();
    let mut output = Vec::new();
    let mut logits = Vec::new();
    let tokenizer = model.tokenizer.as_ref();
    // Streams text deltas as the serving loop does, without re-decoding the whole output each token.
    let mut stream = IncrementalDecoder::new(&prompt);
    let print = |delta: &str| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(delta.as_bytes());
        let _ = out.flush();
    };
    let started = Instant::now();
    let mut first_token: Option<Duration> = None;
    loop {
        let schedule = engine.schedule_all();
        if schedule.is_empty() {
            break;
        }
        for ev in engine.step(&schedule)?.into_events()? {
            first_token.get_or_insert_with(|| started.elapsed());
            output.push(ev.token);
            experts.push(ev.route.map_or_else(Vec::new, |r| r.experts().to_vec()));
            if let Some(l) = ev.logits {
                logits.extend(l);
            }
            if !args.json {
                if let Some(tok) = tokenizer {
                    print(&stream.push(tok, ev.token)?);
                }
            }
        }
    }
    if let (false, Some(tok)) = (args.json, tokenizer) {
        print(&stream.finish(tok)?);
    }
    if let Some(path) = &args.dump_logits {
        write_logits(path, &logits, engine.config().vocab_size)?;
    }
    let timing = Timing {
        prompt_tokens: prompt.len(),
        generated_tokens: output.len(),
        seconds: started.elapsed().as_secs_f64(),
        first_token_seconds: first_token.unwrap_or_default().as_secs_f64(),
    };
    let text = tokenizer.map(|t| t.decode(&output)).transpose()?;
    if args.json {
        let mut obj = json!({
            "prompt_ids": prompt,
            "output_ids": output,
            "experts": experts,
            "device": engine.device_name(),
        });
        if let Some(t) = text {
            obj["text"] = json!(t);
        }
        obj["timing"] = json!({
            "prompt_tokens": timing.prompt_tokens,
            "generated_tokens": timing.generated_tokens,
            "seconds": timing.seconds,
            "first_token_seconds": timing.first_token_seconds,
            "decode_tokens_per_second": timing.decode_rate(),
        });
        if let Some(cache) = engine.expert_cache() {
            let st = cache.stats();
            obj["expert_cache"] = json!({
                "policy": cache.policy().as_str(),
                "capacity_slots": cache.capacity(),
                "hits": st.hits,
                "misses": st.misses,
                "evictions": st.evictions,
                "hit_ratio": st.hit_ratio(),
                "bytes_loaded": st.bytes_loaded,
            });
        }
        if let Some(sp) = engine.speculation_stats() {
            let recall: Vec<Option<f64>> = (1..=pregate::moe::speculate::MAX_SPEC_DEPTH)
                .map(|j| sp.recall(j))
                .collect();
            obj["speculation"] = json!({
                "recall": recall,
                "loads": sp.loads,
                "used": sp.used,
                "wasted": sp.wasted,
            });
        }
        println!("{obj}");
    } else if tokenizer.is_none() {
        println!(
            "{}",
            output
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
    } else {
        println!();
    }
    if !args.json {
        // On stderr, so that stdout stays the generated text alone.
        eprintln!("{timing}");
    }
    Ok(())
}

/// A generation's token counts and times.
struct Timing {
    prompt_tokens: usize,
    generated_tokens: usize,
    seconds: f64,
    first_token_seconds: f64,
}

impl Timing {
    /// Tokens per second after the first one (the prefill step makes the first).
    fn decode_rate(&self) -> f64 {
        let decode = self.seconds - self.first_token_seconds;
        if self.generated_tokens > 1 && decode > 0.0 {
            (self.generated_tokens - 1) as f64 / decode
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pregate: {} prompt tokens, {} generated in {:.3} s; first token after {:.3} s, then \
             {:.1} tokens/s",
            self.prompt_tokens,
            self.generated_tokens,
            self.seconds,
            self.first_token_seconds,
            self.decode_rate()
        )
    }
}

/// Writes `logits` (`[steps, vocab]`, f32) as the tensor `logits` with the project's writer.
fn write_logits(path: &std::path::Path, logits: &[f32], vocab: usize) -> Result<()> {
    use pregate::model::writer::{write_file, TensorSpec};
    let spec = TensorSpec::new(
        "logits",
        safetensors::Dtype::F32,
        vec![logits.len() / vocab, vocab],
    );
    let bytes = |_: &TensorSpec| Ok(logits.iter().flat_map(|v| v.to_le_bytes()).collect());
    write_file(path, &[spec], &bytes, None)
}

// The library's parsers, so that a flag and its Triton parameter accept the same text.
fn temperature(s: &str) -> std::result::Result<f32, String> {
    pregate::sampling::parse_finite("temperature", s).map_err(|e| e.to_string())
}

fn top_p(s: &str) -> std::result::Result<f32, String> {
    pregate::sampling::parse_finite("top_p", s).map_err(|e| e.to_string())
}

fn top_k(s: &str) -> std::result::Result<usize, String> {
    pregate::sampling::parse_top_k(s).map_err(|e| e.to_string())
}

fn capacity(s: &str) -> std::result::Result<ExpertCapacity, String> {
    s.parse::<ExpertCapacity>().map_err(|e| e.to_string())
}
