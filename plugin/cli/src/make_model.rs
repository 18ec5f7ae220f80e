//! `pregate make-model`: a random-weight model of a preset shape, with a working tokenizer.

use std::path::PathBuf;
use std::time::Instant;

use pregate::error::{Error, Result};
use pregate::model::{make_model_with_progress, ExpertLayout, FloatDtype, Preset};

use crate::progress::Bar;

/// Flags of `pregate make-model`.
#[derive(Debug, clap::Args)]
pub struct MakeModelArgs {
    /// Model shape: tiny (tests, a few MB), small (demo, ~142 M params), readme-7b (Read-ME's
    /// real shape, ~17.6 B params, 35 GB), tiny-h64 (tests in vLLM: heads of 64); per Hugging
    /// Face family a test shape (mixtral-tiny, qwen2-moe-tiny, qwen3-moe-tiny, olmoe-tiny) and the
    /// real one (mixtral-8x7b, qwen2-moe-a2.7b, qwen3-30b-a3b, olmoe-1b-7b; with --layers to cut
    /// it short).
    #[arg(long)]
    pub preset: String,
    /// Output directory (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Expert layout: fused, residual, or masked (training layout + masks.safetensors).
    #[arg(long, default_value = "fused")]
    pub layout: String,
    /// Storage dtype instead of the preset's: f32, f16 or bf16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Shard the weights into files of at most this many MiB (default 4096).
    #[arg(long)]
    pub max_shard_mib: Option<usize>,
    /// Decoder layers instead of the preset's (a real shape with fewer layers).
    #[arg(long)]
    pub layers: Option<usize>,
}

fn parse_dtype(s: &str) -> Result<FloatDtype> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(FloatDtype::F32),
        "f16" | "float16" => Ok(FloatDtype::F16),
        "bf16" | "bfloat16" => Ok(FloatDtype::BF16),
        _ => Err(Error::InvalidArgument(format!(
            "unknown dtype `{s}`: expected f32, f16 or bf16"
        ))),
    }
}

/// Runs `pregate make-model`.
pub fn run(args: MakeModelArgs) -> Result<()> {
    let preset = Preset::parse(&args.preset)?;
    let layout = ExpertLayout::parse(&args.layout)?;
    let mut spec = preset.spec();
    if let Some(d) = &args.dtype {
        spec.dtype = parse_dtype(d)?;
    }
    if let Some(layers) = args.layers {
        spec = spec.with_layers(layers)?;
    }
    if let Some(mib) = args.max_shard_mib {
        if mib == 0 {
            return Err(Error::InvalidArgument(
                "--max-shard-mib must be positive".into(),
            ));
        }
        spec.max_shard_bytes = mib << 20;
    }
    let start = Instant::now();
    let bar = Bar::new(Bar::WRITE_BYTES);
    let made = make_model_with_progress(&spec, layout, args.seed, &args.out, &bar)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {} ({} layout, {}) to {}: {:.1} M parameters, {:.1} MiB in {} file(s), {:.1} s ({:.0} MiB/s)",
        preset.name(),
        layout.as_str(),
        spec.dtype.torch_name(),
        args.out.display(),
        made.params as f64 / 1e6,
        made.bytes as f64 / (1 << 20) as f64,
        made.files.len(),
        secs,
        made.bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
    );
    Ok(())
}
