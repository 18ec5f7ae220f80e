//! AFL++ entry point of the `safetensors` target (see `pregate_fuzz::safetensors`).

fn main() {
    afl::fuzz!(|data: &[u8]| pregate_fuzz::safetensors(data));
}
