//! `pregate inspect` (in progress).

/// Flags of `pregate inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {}

/// Runs `pregate inspect`.
pub fn run(_args: InspectArgs) -> crate::Result<()> {
    Err(crate::Error::InvalidArgument("not built yet".into()))
}
