//! AFL++ entry point of the `tokenizer` target (see `pregate_fuzz::tokenizer`).
//!
//! `nohook`: `Tokenizer::from_json` catches the panics the `tokenizers` library raises on some
//! well-formed but invalid files and reports them as errors; any panic that escapes the target is
//! still a crash.

fn main() {
    afl::fuzz_nohook!(|data: &[u8]| pregate_fuzz::tokenizer(data));
}
