//! The `pregate` binary; see [`pregate::cli`].

fn main() {
    std::process::exit(pregate::cli::main());
}
