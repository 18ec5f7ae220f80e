//! `pregate convert`: a masked (training layout) checkpoint -> split experts.

use std::path::PathBuf;

use pregate::error::Result;
use pregate::model::convert::convert_with_progress;
use pregate::model::ExpertLayout;

use crate::progress::Bar;

/// Flags of `pregate convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Input model directory in the masked layout (with masks.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Output layout: fused (shared channels duplicated in each expert) or residual (a separate
    /// always-active shared part).
    #[arg(long, default_value = "fused")]
    pub layout: String,
    /// Masks file, when not `<model>/masks.safetensors`.
    #[arg(long)]
    pub masks: Option<PathBuf>,
    /// Shard the weights into files of at most this many MiB (default 4096).
    #[arg(long)]
    pub max_shard_mib: Option<usize>,
}

/// Runs `pregate convert`.
pub fn run(args: ConvertArgs) -> Result<()> {
    let layout = ExpertLayout::parse(&args.layout)?;
    let done = convert_with_progress(
        &args.model,
        &args.out,
        layout,
        args.masks.as_deref(),
        args.max_shard_mib.map(|m| m.max(1) << 20),
        &Bar::new(Bar::WRITE_BYTES),
    )?;
    let (w, s) = done.widths.first().copied().unwrap_or((0, 0));
    println!(
        "converted {} -> {} ({} layout, {} file(s)); layer 0: experts of {w} channels{}{}",
        args.model.display(),
        args.out.display(),
        layout.as_str(),
        done.files.len(),
        if s > 0 {
            format!(", shared part of {s}")
        } else {
            String::new()
        },
        if done.padded_channels > 0 {
            format!(
                "; {} zero channels padded so that a layer's experts have one width",
                done.padded_channels
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
