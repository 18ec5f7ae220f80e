//! `pregate generate` through the built binary: its JSON contract, logit dumps, and clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn pregate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pregate"))
        .args(args)
        .output()
        .unwrap()
}

fn fixture_case0() -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(fixture("fused_f32").join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = |n: &str| -> Vec<u32> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect()
    };
    let logits = st
        .tensor("case1.logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (ids("case1.prompt_ids"), ids("case1.output_ids"), logits)
}

#[test]
fn json_output_and_logit_dump_match_the_reference() {
    let (prompt, output, logits) = fixture_case0();
    let model = fixture("fused_f32").join("model");
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("logits.safetensors");
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let out = pregate(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &ids.join(","),
        "--max-new-tokens",
        "10",
        "--ignore-eos",
        "--json",
        "--dump-logits",
        dump.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    assert_eq!(
        got("prompt_ids"),
        prompt,
        "prompt ids are used exactly as given"
    );
    assert_eq!(got("output_ids"), output[..10].to_vec());
    assert_eq!(v["experts"].as_array().unwrap().len(), prompt.len() + 10);
    let bytes = std::fs::read(&dump).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let vocab = logits.len() / output.len();
    assert_eq!(t.shape(), &[10, vocab]);
    let dumped: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let diff = dumped
        .iter()
        .zip(&logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "max logit diff {diff}");
}

#[test]
fn an_expert_cache_changes_no_token_and_reports_its_decisions() {
    let model = fixture("fused_f32").join("model");
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            "5,6,7,200,201",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--json",
            "--device",
            "cpu",
        ];
        args.extend(extra);
        let out = pregate(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let full = run(&[]);
    assert!(full.get("expert_cache").is_none());
    for policy in ["lru", "belady"] {
        let cached = run(&["--expert-cache", "1", "--cache-policy", policy]);
        assert_eq!(cached["output_ids"], full["output_ids"], "{policy}");
        let c = &cached["expert_cache"];
        assert_eq!(c["policy"], policy);
        assert_eq!(c["capacity_slots"], 2, "one expert in each of the 2 layers");
        assert!(c["misses"].as_u64().unwrap() > 0 && c["evictions"].as_u64().unwrap() > 0);
    }
}

#[test]
fn text_prompts_use_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("tiny");
    let made = pregate(&[
        "make-model",
        "--preset",
        "tiny",
        "--out",
        m.to_str().unwrap(),
    ]);
    assert!(made.status.success());
    let out = pregate(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "Hello, world",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_ids"][0], 1, "BOS is added to text prompts");
    assert!(v["text"].is_string());
    // Without --json the text streams as deltas; together they are the decoded output.
    let streamed = pregate(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "Hello, world",
        "--max-new-tokens",
        "5",
    ]);
    assert!(streamed.status.success());
    let prompt_len = v["prompt_ids"].as_array().unwrap().len();
    let err = String::from_utf8(streamed.stderr).unwrap();
    let streamed = String::from_utf8(streamed.stdout).unwrap();
    assert_eq!(streamed.strip_suffix('\n'), v["text"].as_str());
    // The counts and times come after the text, on stderr.
    let summary = err.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with(&format!(
            "pregate: {prompt_len} prompt tokens, 5 generated in "
        )) && summary.contains("first token after")
            && summary.ends_with(" tokens/s"),
        "{err}"
    );
    let t = &v["timing"];
    assert_eq!(t["prompt_tokens"].as_u64(), Some(prompt_len as u64));
    assert_eq!(t["generated_tokens"].as_u64(), Some(5));
    let (secs, first) = (
        t["seconds"].as_f64().unwrap(),
        t["first_token_seconds"].as_f64().unwrap(),
    );
    assert!(0.0 < first && first <= secs, "{t}");
    assert!(t["decode_tokens_per_second"].as_f64().unwrap() > 0.0, "{t}");
}

#[test]
fn bad_input_exits_non_zero_with_a_clear_message() {
    let model = fixture("fused_f32").join("model");
    let m = model.to_str().unwrap();
    let long: Vec<String> = (0..300).map(|i| (3 + i % 300).to_string()).collect();
    let long = long.join(",");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--prompt-ids", "5,384"], "token id 384"),
        (vec!["--prompt-ids", long.as_str()], "exceeds the context"),
        (
            vec!["--prompt-ids", "5", "--device", "tpu"],
            "unknown device `tpu`",
        ),
        (vec!["--prompt-ids", "5", "--top-p", "0"], "top_p"),
        (vec!["--prompt", "hi"], "no tokenizer.json"),
        (
            vec!["--prompt-ids", "5", "--max-new-tokens", "0"],
            "max_new_tokens",
        ),
        // Numbers past what the engine holds are named as written, never clamped or wrapped.
        (
            vec!["--prompt-ids", "5", "--temperature", "1e300"],
            "temperature `1e300` is too large",
        ),
        (
            vec!["--prompt-ids", "5", "--top-k", "-3"],
            "top_k `-3` must be a whole number",
        ),
        (
            vec![
                "--prompt-ids",
                "5",
                "--max-new-tokens",
                "18446744073709551615",
            ],
            "plus max_new_tokens 18446744073709551615 exceeds the context",
        ),
        (
            vec!["--prompt-ids", "5", "--cache-capacity", "1e30GiB"],
            "`1e30GiB` is too large",
        ),
        (
            vec!["--prompt-ids", "5", "--cache-capacity", "1B"],
            "cache capacity 1 bytes holds no expert",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["generate", "--model", m];
        args.extend(extra);
        let out = pregate(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("inf ") && !err.contains("Bytes("), "{err}");
    }
    let out = pregate(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt-ids",
        "5",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/model"),
        "{err}"
    );
}
