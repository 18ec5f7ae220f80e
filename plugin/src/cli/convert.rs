//! `pregate convert` (in progress).

/// Flags of `pregate convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {}

/// Runs `pregate convert`.
pub fn run(_args: ConvertArgs) -> crate::Result<()> {
    Err(crate::Error::InvalidArgument("not built yet".into()))
}
