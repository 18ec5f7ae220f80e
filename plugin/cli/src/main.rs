//! The `pregate` command line. Each subcommand lives in its own module; their flags are a stable
//! interface that scripts, tests and the Triton backend's `serve.sh` depend on.

mod convert;
mod generate;
mod inspect;
mod make_model;
mod progress;
mod replay;

use clap::{Parser, Subcommand};

/// pregate: serve Read-ME Mixture-of-Experts models with pre-gated routing.
#[derive(Debug, Parser)]
#[command(name = "pregate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
// Parsed once per process; boxing the larger argument structs would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a random-weight model (with a working tokenizer) of a preset shape.
    MakeModel(make_model::MakeModelArgs),
    /// Print a model's configuration, parameter counts, expert sizes and layout.
    Inspect(inspect::InspectArgs),
    /// Generate tokens from a prompt.
    Generate(generate::GenerateArgs),
    /// Convert a training-layout (masked) checkpoint into split experts.
    Convert(convert::ConvertArgs),
    /// Replay a request trace through the batcher and the expert cache.
    Replay(replay::ReplayArgs),
}

fn main() {
    std::process::exit(run());
}

/// Runs the CLI; returns the process exit code. Errors are printed, never panicked.
fn run() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::MakeModel(a) => make_model::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Replay(a) => replay::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
