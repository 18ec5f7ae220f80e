//! AFL++ entry point of the `request` target (see `pregate_fuzz::request`).

fn main() {
    afl::fuzz!(|data: &[u8]| pregate_fuzz::request(data));
}
