//! AFL++ entry point of the `tokenizer` target (see `pregate_fuzz::tokenizer`).

fn main() {
    afl::fuzz!(|data: &[u8]| pregate_fuzz::tokenizer(data));
}
