//! `pregate make-model` (in progress).

/// Flags of `pregate make-model`.
#[derive(Debug, clap::Args)]
pub struct MakeModelArgs {}

/// Runs `pregate make-model`.
pub fn run(_args: MakeModelArgs) -> crate::Result<()> {
    Err(crate::Error::InvalidArgument("not built yet".into()))
}
