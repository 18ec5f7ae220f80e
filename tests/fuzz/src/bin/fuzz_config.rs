//! AFL++ entry point of the `config` target (see `pregate_fuzz::config`).

fn main() {
    afl::fuzz!(|data: &[u8]| pregate_fuzz::config(data));
}
