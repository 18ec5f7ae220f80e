//! AFL++ entry point of the `trace` target (see `pregate_fuzz::trace`).

fn main() {
    afl::fuzz!(|data: &[u8]| pregate_fuzz::trace(data));
}
