//! `pregate inspect`: configuration, parameter counts, bytes per expert, layout found.

use std::path::PathBuf;

use pregate::error::{Error, Result};
use pregate::model::inspect::inspect;

/// Flags of `pregate inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pregate inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
    let report = inspect(&args.model)?;
    if args.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
