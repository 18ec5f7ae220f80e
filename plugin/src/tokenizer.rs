//! Text <-> token ids: a thin wrapper over a Hugging Face `tokenizer.json`.
//!
//! [`Tokenizer`] encodes with or without the model's BOS, decodes without special tokens, and
//! [`IncrementalDecoder`] yields the text delta of each generated token for streaming (holding back
//! bytes of an unfinished UTF-8 character). Text that spells a special token (`<s>`) is encoded as
//! plain text: a prompt cannot inject control tokens.
//!
//! [`synthetic_tokenizer`] builds the byte-level BPE tokenizer `pregate make-model` writes: Llama's
//! special ids (`<unk>` 0, `<s>` 1, `</s>` 2), the 256 byte tokens, merges learned on a small
//! built-in English text, and reserved tokens up to the exact vocabulary size. Any UTF-8 text
//! round-trips through it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// The tokenizer's file name inside a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A loaded tokenizer with the model's special ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .finish()
    }
}

impl Tokenizer {
    /// Wraps a `tokenizers` tokenizer; `bos` is prepended by [`Tokenizer::encode`] when asked.
    pub fn new(mut inner: tokenizers::Tokenizer, bos: Option<u32>) -> Self {
        inner.set_encode_special_tokens(true);
        Tokenizer { inner, bos }
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path, bos: Option<u32>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path, bos)
    }

    /// Parses the text of a `tokenizer.json`; `path` is used in error messages only.
    pub fn from_json(text: &str, path: &Path, bos: Option<u32>) -> Result<Self> {
        let err = |msg: String| Error::Tokenizer(format!("{}: {msg}", path.display()));
        // The `tokenizers` crate panics (`expect`) on a syntax error inside the `decoder` object, and
        // on a `Precompiled` normalizer whose fields do not parse: so the syntax is checked here
        // first, and a panic that the library still raises on well-formed JSON becomes an error.
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let parsed = std::panic::catch_unwind(|| serde_json::from_value(json))
            .map_err(|_| err("rejected by the tokenizers library (it panicked)".into()))?;
        let inner: tokenizers::Tokenizer = parsed.map_err(|e| err(e.to_string()))?;
        Ok(Self::new(inner, bos))
    }

    /// Loads `dir/tokenizer.json` if it exists, checking that its ids fit the model's vocabulary.
    pub fn from_model_dir(dir: &Path, config: &ModelConfig) -> Result<Option<Self>> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let tok = Self::from_file(&path, config.bos_token_id)?;
        let n = tok.vocab_size();
        if n > config.vocab_size {
            return Err(Error::Tokenizer(format!(
                "{} has {n} tokens but the model's vocab_size is {}",
                path.display(),
                config.vocab_size
            )));
        }
        Ok(Some(tok))
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS id prepended by `encode(.., true)`.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes `text`, prepending BOS when `add_bos` (and the model has one).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }
}

/// Streams the text of generated tokens: [`IncrementalDecoder::push`] returns what each new token
/// adds to the text, holding back an incomplete UTF-8 character until it completes.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

/// Prompt tokens kept as context, so that a tokenizer that drops a leading space at the start of a
/// decode (SentencePiece) still produces the right delta.
const CONTEXT_TOKENS: usize = 5;

impl IncrementalDecoder {
    /// A decoder for tokens that follow `prompt` (only its last few ids are kept as context).
    pub fn new(prompt: &[u32]) -> Self {
        let ids = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let read_offset = ids.len();
        IncrementalDecoder {
            ids,
            prefix_offset: 0,
            read_offset,
        }
    }

    /// Adds a generated token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.ends_with('\u{FFFD}') || full.len() <= prefix.len() || !full.starts_with(&prefix) {
            return Ok(String::new());
        }
        let delta = full[prefix.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Returns whatever text is still held back (an unfinished character decodes as U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// English text the synthetic tokenizer learns its merges from.
const CORPUS: &str = "The quick brown fox jumps over the lazy dog. A mixture of experts model routes \
each token to a few experts, and the router of Read-ME decides before the backbone runs, so the \
server knows which experts every queued token will need. It can batch the tokens that share an \
expert, keep the experts that will be used soon in the cache, and load the next ones while the \
current layer computes. This is a story about a small model that learned to write. Once upon a \
time there was a little girl who liked to read books in the garden. She read about the sea, the \
mountains and the stars, and she asked her mother what the world looked like from the moon. Her \
mother said that the world was blue and white and very beautiful. The next day they went to the \
library together and found many more books. What is the capital of France? The capital of France \
is Paris. How many days are there in a week? There are seven days in a week. Please write a short \
poem about the autumn rain. Thank you for your help, this is very useful information for me and \
for the people I work with. The results of the experiment show that the new method is faster than \
the old one, and that it uses less memory on the same hardware. We would like to thank the \
reviewers for their comments. In this paper we present a system for serving large language models \
with limited GPU memory. The number 12345 and the year 2024 appear here, with 3.14 and 42. def \
main(): print(\"hello, world\") return 0 if x == 1 else -1 # comment for i in range(10): total += i";

/// Ids of the synthetic tokenizer's special tokens, as in Llama.
const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// GPT-2's byte -> printable character map, used by the ByteLevel pre-tokenizer.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    out
}

/// Learns up to `max_merges` BPE merges on [`CORPUS`] (pairs seen at least twice; ties broken by
/// the lexicographically smallest pair, so the result is deterministic).
fn learn_merges(max_merges: usize) -> Result<Vec<(String, String)>> {
    let mut pts = PreTokenizedString::from(CORPUS);
    ByteLevel::new(false, true, true)
        .pre_tokenize(&mut pts)
        .map_err(|e| Error::Tokenizer(format!("pre-tokenize: {e}")))?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (word, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *counts.entry(word.to_string()).or_default() += 1;
    }
    let mut words: Vec<(Vec<String>, usize)> = counts
        .into_iter()
        .map(|(w, c)| (w.chars().map(String::from).collect(), c))
        .collect();
    let mut merges = Vec::new();
    while merges.len() < max_merges {
        let mut pairs: HashMap<(&str, &str), usize> = HashMap::new();
        for (syms, c) in &words {
            for w in syms.windows(2) {
                *pairs.entry((&w[0], &w[1])).or_default() += c;
            }
        }
        let Some((&(a, b), &count)) = pairs
            .iter()
            .max_by(|x, y| x.1.cmp(y.1).then_with(|| y.0.cmp(x.0)))
        else {
            break;
        };
        if count < 2 {
            break;
        }
        let (a, b) = (a.to_string(), b.to_string());
        for (syms, _) in &mut words {
            let mut i = 0;
            while i + 1 < syms.len() {
                if syms[i] == a && syms[i + 1] == b {
                    syms[i] = format!("{a}{b}");
                    syms.remove(i + 1);
                }
                i += 1;
            }
        }
        merges.push((a, b));
    }
    Ok(merges)
}

/// Builds the byte-level BPE tokenizer `make-model` writes, with exactly `vocab_size` tokens.
///
/// Needs `vocab_size >= 259` (3 specials + 256 bytes).
pub fn synthetic_tokenizer(vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    let base = SPECIALS.len() + 256;
    if vocab_size < base {
        return Err(Error::InvalidArgument(format!(
            "a byte-level tokenizer needs vocab_size >= {base}, got {vocab_size}"
        )));
    }
    let mut vocab: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    vocab.extend(byte_chars().iter().map(|c| c.to_string()));
    let mut seen: HashMap<String, usize> = vocab
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i))
        .collect();
    let mut merges = Vec::new();
    for (a, b) in learn_merges(vocab_size - base)? {
        let merged = format!("{a}{b}");
        if !seen.contains_key(&merged) {
            if vocab.len() == vocab_size {
                break;
            }
            seen.insert(merged.clone(), vocab.len());
            vocab.push(merged);
        }
        merges.push((a, b));
    }
    let mut reserved = 0;
    while vocab.len() < vocab_size {
        vocab.push(format!("<reserved_{reserved}>"));
        reserved += 1;
    }
    let vocab_map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), serde_json::Value::from(i)))
        .collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab_map, "merges": merges,
        }
    });
    tokenizers::Tokenizer::from_str(&json.to_string())
        .map_err(|e| Error::Tokenizer(format!("building the synthetic tokenizer: {e}")))
}

/// Writes the synthetic tokenizer of `vocab_size` tokens to `path`.
pub fn write_synthetic_tokenizer(path: &Path, vocab_size: usize) -> Result<()> {
    let tok = synthetic_tokenizer(vocab_size)?;
    let text = tok
        .to_string(false)
        .map_err(|e| Error::Tokenizer(format!("serialize: {e}")))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(n: usize) -> Tokenizer {
        Tokenizer::new(synthetic_tokenizer(n).unwrap(), Some(1))
    }

    /// A word-level `tokenizer.json` with `decoder` and `normalizer` spliced in.
    fn word_level(decoder: &str, normalizer: &str) -> String {
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":{normalizer},"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,
            "decoder":{decoder},"model":{{"type":"WordLevel","vocab":{{"<unk>":0,"hi":1}},"unk_token":"<unk>"}}}}"#
        )
    }

    #[test]
    fn a_well_formed_file_loads() {
        let t = Tokenizer::from_json(&word_level("null", "null"), Path::new("t.json"), None);
        assert_eq!(t.unwrap().encode("hi hi", false).unwrap(), vec![1, 1]);
    }

    #[test]
    fn a_syntax_error_in_the_decoder_is_an_error_not_a_panic() {
        // Found by fuzzing: the `tokenizers` crate `expect`s the decoder object to parse.
        let text = word_level(r#"{Btype":"ByteLevel"}"#, "null");
        let e = Tokenizer::from_json(&text, Path::new("t.json"), None).unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }

    #[test]
    fn a_bad_precompiled_normalizer_is_an_error_not_a_panic() {
        // Well-formed JSON that the `tokenizers` crate `expect`s to be a valid Precompiled normalizer.
        let text = word_level("null", r#"{"type":"Precompiled","precompiled_charsmap":5}"#);
        let e = Tokenizer::from_json(&text, Path::new("t.json"), None).unwrap_err();
        assert!(e.to_string().contains("t.json"), "{e}");
    }

    const TEXTS: [&str; 5] = [
        "The quick brown fox",
        "  leading spaces, tabs\tand\nnewlines  ",
        "héllo wörld — 東京 🦀🚀 مرحبا",
        "<s> looks special but is text </s>",
        "",
    ];

    #[test]
    fn vocab_size_is_exact_and_specials_are_llamas() {
        for n in [259, 384, 512, 32000] {
            let t = tok(n);
            assert_eq!(t.vocab_size(), n);
            assert_eq!(t.inner().token_to_id("<unk>"), Some(0));
            assert_eq!(t.inner().token_to_id("<s>"), Some(1));
            assert_eq!(t.inner().token_to_id("</s>"), Some(2));
        }
        assert!(synthetic_tokenizer(100).is_err());
    }

    #[test]
    fn arbitrary_text_round_trips() {
        let t = tok(512);
        for text in TEXTS {
            let ids = t.encode(text, false).unwrap();
            assert!(ids.iter().all(|&i| (i as usize) < 512 && i > 2), "{ids:?}");
            assert_eq!(t.decode(&ids).unwrap(), text);
            let with_bos = t.encode(text, true).unwrap();
            assert_eq!(with_bos[0], 1);
            assert_eq!(&with_bos[1..], &ids[..]);
            assert_eq!(t.decode(&with_bos).unwrap(), text);
        }
    }

    #[test]
    fn merges_compress_english() {
        let t = tok(32000);
        let text = "the experts of the model";
        assert!(t.encode(text, false).unwrap().len() < text.len() / 2);
    }

    #[test]
    fn incremental_decode_matches_full_decode() {
        let t = tok(512);
        for text in TEXTS {
            let prompt = t.encode("Prompt:", true).unwrap();
            let ids = t.encode(text, false).unwrap();
            let mut dec = IncrementalDecoder::new(&prompt);
            let mut out = String::new();
            for &id in &ids {
                let delta = dec.push(&t, id).unwrap();
                assert!(!delta.contains('\u{FFFD}'));
                out += &delta;
            }
            out += &dec.finish(&t).unwrap();
            assert_eq!(out, text);
        }
    }

    #[test]
    fn building_is_deterministic() {
        let a = synthetic_tokenizer(1000).unwrap().to_string(false).unwrap();
        let b = synthetic_tokenizer(1000).unwrap().to_string(false).unwrap();
        assert_eq!(a, b);
    }
}
