//! `pregate make-model`, `inspect` and `convert` through the built binary: outputs, exit codes and
//! error messages.

use std::path::Path;
use std::process::{Command, Output};

use pregate::model::Preset;

fn pregate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pregate"))
        .args(args)
        .output()
        .expect("run pregate")
}

fn ok(args: &[&str]) -> String {
    let out = pregate(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = pregate(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn make_model_then_inspect() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("tiny");
    let out = ok(&[
        "make-model",
        "--preset",
        "tiny",
        "--out",
        s(&m),
        "--seed",
        "3",
    ]);
    assert!(out.contains("tiny") && out.contains("fused"), "{out}");
    let text = ok(&["inspect", "--model", s(&m)]);
    for needle in [
        "fused",
        "F32",
        "tokenizer.json (512 tokens)",
        "4 per layer",
        "one expert-layer",
    ] {
        assert!(text.contains(needle), "`{needle}` not in\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", "--model", s(&m), "--json"])).unwrap();
    let counts = Preset::Tiny.spec().param_counts().unwrap();
    assert_eq!(json["layout"], "fused");
    assert_eq!(json["params"]["total"], counts.total);
    assert_eq!(json["params"]["active_per_token"], counts.active);
    assert_eq!(json["params"]["router"], counts.router);
    assert_eq!(
        json["layers"][0]["bytes_per_expert"],
        counts.per_expert_layer * 4
    );
    assert_eq!(json["tokenizer"], true);
    assert_eq!(json["config"]["N_cluster"], 4);
}

#[test]
fn masked_model_converts_to_both_layouts() {
    let d = tempfile::tempdir().unwrap();
    let masked = d.path().join("masked");
    ok(&[
        "make-model",
        "--preset",
        "tiny",
        "--out",
        s(&masked),
        "--layout",
        "masked",
        "--dtype",
        "bf16",
    ]);
    let text = ok(&["inspect", "--model", s(&masked)]);
    assert!(
        text.contains("masked") && text.contains("pregate convert"),
        "{text}"
    );
    for layout in ["fused", "residual"] {
        let out = d.path().join(layout);
        let msg = ok(&[
            "convert",
            "--model",
            s(&masked),
            "--out",
            s(&out),
            "--layout",
            layout,
        ]);
        assert!(msg.contains(layout), "{msg}");
        let json: serde_json::Value =
            serde_json::from_str(&ok(&["inspect", "--model", s(&out), "--json"])).unwrap();
        assert_eq!(json["layout"], layout);
        assert_eq!(json["dtypes"][0], "BF16");
        let spec = Preset::Tiny.spec();
        let width = if layout == "fused" {
            spec.expert_inter
        } else {
            spec.expert_inter - spec.shared_inter
        };
        assert_eq!(json["layers"][1]["expert_inter"], width);
    }
    // Converting a split model again is refused.
    let err = fails(&[
        "convert",
        "--model",
        s(&d.path().join("fused")),
        "--out",
        s(&d.path().join("again")),
    ]);
    assert!(err.contains("already in the fused layout"), "{err}");
}

#[test]
fn bad_inputs_exit_non_zero_with_a_message() {
    let d = tempfile::tempdir().unwrap();
    let err = fails(&["make-model", "--preset", "huge", "--out", s(d.path())]);
    assert!(err.contains("unknown preset `huge`"), "{err}");
    let err = fails(&[
        "make-model",
        "--preset",
        "tiny",
        "--out",
        s(d.path()),
        "--layout",
        "dense",
    ]);
    assert!(err.contains("unknown layout `dense`"), "{err}");
    let err = fails(&[
        "make-model",
        "--preset",
        "tiny",
        "--out",
        s(d.path()),
        "--dtype",
        "f8",
    ]);
    assert!(err.contains("unknown dtype `f8`"), "{err}");

    let missing = d.path().join("missing");
    let err = fails(&["inspect", "--model", s(&missing)]);
    assert!(
        err.contains("missing") && err.contains("config.json"),
        "{err}"
    );

    let m = d.path().join("m");
    ok(&["make-model", "--preset", "tiny", "--out", s(&m)]);
    let weights = m.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&["inspect", "--model", s(&m)]);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    let err = fails(&[
        "convert",
        "--model",
        s(&missing),
        "--out",
        s(&d.path().join("o")),
    ]);
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn inspect_fails_on_a_nan_weight_unless_told_to_read_headers_only() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("tiny");
    ok(&["make-model", "--preset", "tiny", "--out", s(&m)]);
    assert!(ok(&["inspect", "--model", s(&m)]).contains("checked      all"));
    // The first f32 of the data section (8-byte length + header) is the first tensor's first
    // element: make it a NaN.
    let path = m.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = fails(&["inspect", "--model", s(&m)]);
    assert!(
        err.contains("1 problem found") && err.contains("(NaN) at flat index 0"),
        "{err}"
    );
    let text = ok(&["inspect", "--model", s(&m), "--no-check"]);
    assert!(text.contains("headers only"), "{text}");
}
