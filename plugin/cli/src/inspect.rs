//! `pregate inspect`: configuration, parameter counts, bytes per expert, layout found.

use std::path::PathBuf;

use pregate::error::{Error, Result};
use pregate::model::inspect::{inspect_with, Check};

/// Flags of `pregate inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Read only the config and the headers, not every tensor's dtype, shape and values.
    #[arg(long)]
    pub no_check: bool,
}

/// Runs `pregate inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
    let check = if args.no_check {
        Check::Headers
    } else {
        Check::Full
    };
    let report = inspect_with(&args.model, check)?;
    if args.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
