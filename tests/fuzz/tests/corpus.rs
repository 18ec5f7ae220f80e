//! Runs every fuzz target over its committed inputs: the seeds, and the inputs that once crashed a
//! parser (`crashes/<target>/`, each also a unit test beside the parser it broke). A target panics on
//! a bug, so this fails if any of them regresses, without needing AFL++.

use std::path::Path;

#[test]
fn every_target_accepts_its_seeds_and_past_crashes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, target) in pregate_fuzz::TARGETS {
        let mut inputs = 0;
        for dir in ["seeds", "crashes"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(
                    outcome.is_ok(),
                    "target `{name}` panicked on {}",
                    path.display()
                );
                inputs += 1;
            }
        }
        assert!(inputs > 0, "target `{name}` has no seeds");
    }
}

#[test]
fn the_seeds_reach_past_the_parsers() {
    // Seeds that the parsers reject would leave the fuzzer to rediscover the format.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let read = |p: &str| std::fs::read(root.join(p)).unwrap();
    let text = |p: &str| String::from_utf8(read(p)).unwrap();
    let config = pregate::ModelConfig::from_json(&text("config/tiny.json"), Path::new("c"));
    assert!(config.is_ok(), "{config:?}");
    for f in ["wordlevel.json", "tiny.json"] {
        let t = pregate::tokenizer::Tokenizer::from_json(
            &text(&format!("tokenizer/{f}")),
            Path::new(f),
            None,
        );
        assert!(t.is_ok(), "{f}: {t:?}");
    }
    let jsonl =
        pregate::replay::workload::parse_jsonl(&read("trace/tokens.jsonl")[..], Path::new("t"));
    assert_eq!(jsonl.unwrap().len(), 2);
    let csv =
        pregate::replay::workload::parse_azure_csv(&read("trace/azure.csv")[..], Path::new("t"));
    assert_eq!(csv.unwrap().len(), 3);
    let model_config = read("request/model_config.bin");
    let parsed = triton_pregate::config::parse_model_config(
        std::str::from_utf8(&model_config[1..]).unwrap(),
        Path::new("/models/pregate"),
    );
    assert!(parsed.is_ok(), "{parsed:?}");
    let dir = tempfile_dir();
    for f in [
        "dtypes.safetensors",
        "masks.safetensors",
        "tiny-one.safetensors",
    ] {
        let path = dir.join(f);
        std::fs::write(&path, read(&format!("safetensors/{f}"))).unwrap();
        let ck = pregate::model::Checkpoint::open_file(&path);
        assert!(ck.is_ok(), "{f}: {ck:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pregate-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
