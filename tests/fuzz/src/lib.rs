//! Fuzz targets for the parsers that read bytes pregate does not control: a checkpoint's
//! safetensors files, `config.json`, `tokenizer.json`, replay traces, and the Triton backend's
//! request inputs and model configuration.
//!
//! Each target takes arbitrary bytes, hands them to the parser, and exercises what the parser
//! returned. A target may return an error for any input; it must never panic, abort (an allocation
//! sized by the input), or hang. The functions hold the targets' code so that the corpus replay test
//! (`tests/corpus.rs`) runs them in the normal test suite; `src/bin/` wraps each in `afl::fuzz!`.
//! `tests/fuzz/run.sh` builds and runs them.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use pregate::model::Checkpoint;
use pregate::replay::workload;
use pregate::tokenizer::{IncrementalDecoder, Tokenizer};
use pregate::ModelConfig;
use triton_pregate::bridge::dtype;
use triton_pregate::request::{self, RawInput};

/// A fuzz target: any bytes in, a panic on a bug.
pub type Target = fn(&[u8]);

/// The targets, by name (the binaries are `fuzz_<name>`; seeds are in `seeds/<name>/`).
pub const TARGETS: [(&str, Target); 5] = [
    ("safetensors", safetensors),
    ("config", config),
    ("tokenizer", tokenizer),
    ("trace", trace),
    ("request", request),
];

/// Tensors at most this large are converted to f32 (the conversion of a large one only costs time).
const MAX_CONVERT: usize = 1 << 16;

/// Where the safetensors target writes its input: the checkpoint reader maps a file. One path per
/// process (`PREGATE_FUZZ_SCRATCH` overrides it), reused for every input, so nothing accumulates.
fn scratch_file() -> PathBuf {
    match std::env::var_os("PREGATE_FUZZ_SCRATCH") {
        Some(p) => PathBuf::from(p),
        None => std::env::temp_dir().join(format!(
            "pregate-fuzz-{}-{:?}.safetensors",
            std::process::id(),
            std::thread::current().id()
        )),
    }
}

/// A safetensors file: header length, JSON header, dtypes, shapes and data offsets.
pub fn safetensors(data: &[u8]) {
    let path = scratch_file();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let opened = Checkpoint::open_file(&path);
    if let Ok(ck) = &opened {
        let mut total = 0usize;
        for name in ck.names() {
            let t = ck.tensor(name).expect("a listed tensor must be found");
            total += t.data.len();
            let Ok(dtype) = t.float_dtype() else { continue };
            assert_eq!(
                t.data.len(),
                t.numel() * dtype.size(),
                "tensor `{name}`: bytes do not match its shape"
            );
            if t.numel() <= MAX_CONVERT {
                let v = t.to_f32().expect("a float tensor converts");
                assert_eq!(v.len(), t.numel());
            }
            let _ = ck.float_tensor(name, t.shape);
        }
        assert_eq!(total, ck.data_bytes(), "the tensors tile the data section");
    }
    drop(opened);
    let _ = std::fs::remove_file(&path);
}

/// `config.json`, parsed and validated, then the values derived from it.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = ModelConfig::from_json(text, Path::new("config.json")) else {
        return;
    };
    let _ = (
        cfg.head_dim(),
        cfg.num_kv_heads(),
        cfg.router_config().map(|r| r.head_dim()).ok(),
        cfg.max_context(),
        cfg.eos_token_ids(),
    );
    // What pregate writes, it reads back unchanged.
    let written = serde_json::to_string(&cfg).expect("a config serialises");
    let back = ModelConfig::from_json(&written, Path::new("config.json"))
        .expect("a written config parses");
    assert_eq!(back, cfg, "config.json round trip");
}

/// Text that the tokenizer target encodes: ASCII, a special token's spelling, multi-byte UTF-8.
const SAMPLE_TEXT: &str = "Hello, world! <s> 12 345 caf\u{e9} \u{4e2d}\u{6587} \u{1f600}\n\t end";

/// `tokenizer.json`, loaded, then used to encode and decode (whole and incrementally).
pub fn tokenizer(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(tok) = Tokenizer::from_json(text, Path::new("tokenizer.json"), Some(1)) else {
        return;
    };
    let vocab = tok.vocab_size();
    if let Ok(ids) = tok.encode(SAMPLE_TEXT, true) {
        let _ = tok.decode(&ids);
        let mut dec = IncrementalDecoder::new(&ids[..ids.len().min(3)]);
        for &id in ids.iter().skip(3) {
            let _ = dec.push(&tok, id);
        }
        let _ = dec.finish(&tok);
    }
    // Ids a model may generate: inside the vocabulary and just past it.
    let ids: Vec<u32> = (0..vocab.min(64) as u32 + 2).collect();
    let _ = tok.decode(&ids);
    let _ = tok.decode(&[u32::MAX]);
}

/// A replay trace, read as JSON lines and as an Azure CSV.
pub fn trace(data: &[u8]) {
    for parsed in [
        workload::parse_jsonl(Cursor::new(data), Path::new("trace.jsonl")),
        workload::parse_azure_csv(Cursor::new(data), Path::new("trace.csv")),
    ] {
        let Ok(reqs) = parsed else { continue };
        for w in reqs.windows(2) {
            assert!(w[0].arrival <= w[1].arrival, "a trace is sorted by arrival");
        }
        for r in &reqs {
            assert!(
                r.arrival.is_finite() && r.arrival >= 0.0,
                "arrival {}",
                r.arrival
            );
            assert!(!r.prompt.is_empty() && r.output_len >= 1);
        }
        let mut scaled = reqs;
        let _ = workload::scale_time(&mut scaled, 0.5);
    }
}

/// Triton's `TRITONSERVER_DataType` of the input `i` of [`request::INPUTS`].
const INPUT_TYPES: [u32; 5] = [
    dtype::BYTES,
    dtype::INT32,
    dtype::BOOL,
    dtype::BYTES,
    dtype::BOOL,
];

/// The Triton backend's request inputs, or (first byte's top bit set) its model configuration.
///
/// Layout: a flags byte, then fields separated by 0xFF (which UTF-8 never holds): the input's data,
/// one field per name in [`request::INPUTS`]. Flag bit `i` (0..5) sends input `i`; bit 5 sends the
/// BYTES inputs raw instead of with their 4-byte length prefix; bit 6 flips every datatype. The
/// `sampling_parameters` field also goes to [`request::apply_sampling`] directly.
pub fn request(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    if flags & 0x80 != 0 {
        if let Ok(json) = std::str::from_utf8(rest) {
            let _ = triton_pregate::config::parse_model_config(json, Path::new("/models/pregate"));
        }
        return;
    }
    let fields: Vec<&[u8]> = rest.split(|&b| b == 0xFF).collect();
    let mut inputs = HashMap::new();
    for (i, name) in request::INPUTS.iter().enumerate() {
        if flags & (1 << i) == 0 {
            continue;
        }
        let field = fields.get(i).copied().unwrap_or_default();
        let mut datatype = INPUT_TYPES[i];
        let data = if datatype == dtype::BYTES && flags & 0x20 == 0 {
            let mut d = (field.len() as u32).to_le_bytes().to_vec();
            d.extend_from_slice(field);
            d
        } else {
            field.to_vec()
        };
        if flags & 0x40 != 0 {
            datatype = if datatype == dtype::BYTES {
                dtype::INT32
            } else {
                dtype::BYTES
            };
        }
        inputs.insert(
            name.to_string(),
            RawInput {
                datatype,
                shape: vec![1],
                data,
            },
        );
    }
    if let Ok(parsed) = request::parse_request(&inputs) {
        assert!(parsed.request.max_new_tokens >= 1);
        parsed
            .request
            .sampling
            .validate()
            .expect("an accepted request has valid sampling parameters");
    }
    if let Some(json) = fields.get(3).and_then(|f| std::str::from_utf8(f).ok()) {
        let mut r = pregate::serve::ServeRequest::greedy(pregate::serve::Prompt::Ids(vec![1]), 1);
        if request::apply_sampling(&mut r, json).is_ok() {
            assert!(r.max_new_tokens >= 1);
        }
    }
}
