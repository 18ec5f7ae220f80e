//! End-to-end tests of `pregate replay`: JSON keys, determinism, bad input, executed mode.

use std::io::Write;
use std::process::Command;

fn pregate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pregate"))
        .args(args)
        .output()
        .expect("run pregate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = pregate(args);
    assert!(ok, "pregate {args:?} failed: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

const SYNTH: &[&str] = &[
    "replay",
    "--synthetic",
    "300",
    "--rate",
    "2",
    "--seed",
    "11",
    "--cache-capacity",
    "3",
    "--policy",
    "belady",
    "--batching",
    "expert-aware",
    "--max-batch-tokens",
    "128",
    "--max-wait-ms",
    "2000",
    "--json",
];

#[test]
fn json_has_every_documented_key() {
    let v = json(SYNTH);
    for key in [
        "hit_ratio",
        "loads",
        "bytes_loaded",
        "stall_seconds",
        "unique_experts_per_batch_mean",
        "unique_experts_per_batch_hist",
        "tokens_per_batch_mean",
        "ttft_p50_s",
        "ttft_p95_s",
        "tpot_p50_s",
        "normalized_latency_mean_s",
        "normalized_latency_p50_s",
        "normalized_latency_p95_s",
        "normalized_latency_p99_s",
        "max_queue_wait_s",
        "throughput_tokens_per_s",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["requests"], 300);
    let h = v["hit_ratio"].as_f64().unwrap();
    assert!(h > 0.0 && h < 1.0, "{h}");
    assert!(v["unique_experts_per_batch_mean"].as_f64().unwrap() <= 7.0);
}

#[test]
fn replay_is_deterministic_for_a_seed() {
    let mut a = json(SYNTH);
    let mut b = json(SYNTH);
    a.as_object_mut().unwrap().remove("wall_s");
    b.as_object_mut().unwrap().remove("wall_s");
    assert_eq!(a, b);
    let mut other: Vec<&str> = SYNTH.to_vec();
    other[6] = "12";
    let mut c = json(&other);
    c.as_object_mut().unwrap().remove("wall_s");
    assert_ne!(a, c);
}

#[test]
fn the_table_and_the_offline_hit_ratios_print() {
    let (ok, out, err) = pregate(&[
        "replay",
        "--synthetic",
        "200",
        "--rate",
        "3",
        "--cache-capacity",
        "7",
        "--policy",
        "lru",
        "--batching",
        "decode-first",
        "--hit-ratio-table",
    ]);
    assert!(ok, "{err}");
    for needle in ["cache hit ratio", "normalized latency", "belady", "cap 5"] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
}

#[test]
fn azure_csv_and_jsonl_traces_replay() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("t.csv");
    std::fs::write(
        &csv,
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n\
         2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:51.0,20,3\n",
    )
    .unwrap();
    let v = json(&[
        "replay",
        "--trace",
        csv.to_str().unwrap(),
        "--time-scale",
        "0.5",
        "--cache-capacity",
        "4",
        "--policy",
        "lfu",
        "--batching",
        "fcfs",
        "--json",
    ]);
    assert_eq!(v["requests"], 3);
    assert_eq!(v["generated_tokens"], 156);
    let jl = dir.path().join("t.jsonl");
    std::fs::write(
        &jl,
        "{\"arrival\": 0, \"prompt_len\": 30, \"output_len\": 5}\n\
         {\"arrival\": 0.1, \"prompt\": [5, 6, 7], \"output_len\": 2, \"deadline_s\": 1.5}\n",
    )
    .unwrap();
    let v = json(&[
        "replay",
        "--trace",
        jl.to_str().unwrap(),
        "--cache-capacity",
        "2",
        "--policy",
        "random",
        "--batching",
        "prefill-first",
        "--json",
    ]);
    assert_eq!(v["requests"], 2);
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = pregate(args);
    assert!(!ok, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` not in {err}");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    let mut f = std::fs::File::create(&bad).unwrap();
    writeln!(
        f,
        "{{\"arrival\": 0, \"prompt_len\": 3, \"output_len\": 1}}"
    )
    .unwrap();
    writeln!(
        f,
        "{{\"arrival\": 0.5, \"prompt_len\": 3, \"output_len\": 1}}"
    )
    .unwrap();
    writeln!(
        f,
        "{{\"arrival\": 1, \"prompt_len\": 3, \"output_len\": \"many\"}}"
    )
    .unwrap();
    drop(f);
    let path = bad.to_str().unwrap();
    let base = ["replay", "--cache-capacity", "2", "--synthetic", "10"];
    fails_with(
        &["replay", "--trace", path, "--cache-capacity", "2"],
        &["bad.jsonl:3:"],
    );
    fails_with(
        &[&base[..], &["--policy", "fifo"]].concat(),
        &["fifo", "belady"],
    );
    fails_with(
        &[&base[..], &["--batching", "greedy"]].concat(),
        &["greedy", "expert-aware"],
    );
    fails_with(
        &[&base[..], &["--mode", "real"]].concat(),
        &["real", "executed"],
    );
    fails_with(
        &["replay", "--synthetic", "10", "--cache-capacity", "0"],
        &["smaller than one step's experts"],
    );
    fails_with(
        &["replay", "--synthetic", "10", "--cache-capacity", "9"],
        &["exceeds the model's 7 experts"],
    );
    fails_with(
        &["replay", "--cache-capacity", "2"],
        &["--trace FILE or --synthetic"],
    );
    fails_with(
        &[&base[..], &["--mode", "executed"]].concat(),
        &["--model DIR"],
    );
    fails_with(
        &[
            "replay",
            "--trace",
            "/nonexistent.csv",
            "--cache-capacity",
            "2",
        ],
        &["/nonexistent.csv"],
    );
}

#[test]
fn executed_mode_runs_the_cpu_engine() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let (ok, _, err) = pregate(&[
        "make-model",
        "--preset",
        "tiny",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let m = model.to_str().unwrap();
    let v = json(&[
        "replay",
        "--model",
        m,
        "--synthetic",
        "12",
        "--rate",
        "20",
        "--seed",
        "3",
        "--cache-capacity",
        "2",
        "--policy",
        "belady",
        "--batching",
        "expert-aware",
        "--max-batch-tokens",
        "32",
        "--mode",
        "executed",
        "--json",
    ]);
    assert_eq!(v["requests"], 12);
    assert_eq!(v["mode"], "executed");
    assert!(v["stall_seconds"].as_f64().unwrap() >= 0.0);
    fails_with(
        &[
            "replay",
            "--model",
            m,
            "--synthetic",
            "2",
            "--cache-capacity",
            "5",
            "--mode",
            "executed",
        ],
        &["exceeds the model's 4 experts"],
    );
    // Simulated mode reads the shape from the model directory.
    let v = json(&[
        "replay",
        "--model",
        m,
        "--synthetic",
        "20",
        "--cache-capacity",
        "4",
        "--json",
    ]);
    assert!(v["hit_ratio"].as_f64().unwrap() > 0.9, "{v}");
}

const PER_LAYER: &[&str] = &[
    "replay",
    "--synthetic",
    "20",
    "--rate",
    "0.5",
    "--seed",
    "3",
    "--shape",
    "mixtral-8x7b",
    "--per-layer",
    "--cache-capacity",
    "3",
    "--policy",
    "belady-decay",
    "--json",
];

#[test]
fn per_layer_replays_report_speculation_and_recall() {
    let on_demand = json(PER_LAYER);
    let p = &on_demand["per_layer"];
    assert_eq!(p["spec_depth"], 0);
    assert_eq!(p["top_k"], 2, "the mixtral-8x7b shape routes top-2");
    assert_eq!(p["speculative_loads"], 0);
    assert_eq!(on_demand["shape"], "mixtral-8x7b");
    let mut args = PER_LAYER.to_vec();
    args.extend([
        "--spec-depth",
        "2",
        "--spec-extra",
        "0",
        "--recall",
        "0.9,0.5",
    ]);
    let spec = json(&args);
    let p = &spec["per_layer"];
    assert_eq!(p["spec_depth"], 2);
    assert_eq!(p["configured_recall"], serde_json::json!([0.9, 0.5]));
    let recall: Vec<f64> = p["recall"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().unwrap())
        .collect();
    assert!(recall[0] > recall[1], "{recall:?}");
    // A Mixtral expert takes 6.4 ms on the link, a layer 0.26 ms: under the guarded rule no
    // speculative copy lands before the next layer's exact loads, so none starts; the eager rule
    // issues them.
    assert_eq!(p["spec_rule"], "guarded");
    assert_eq!(p["speculative_loads"], 0);
    assert!(p["cancelled_loads"].as_u64().unwrap() > 0);
    assert_eq!(spec["stall_seconds"], on_demand["stall_seconds"]);
    let mut eager = args.clone();
    eager.extend(["--spec-rule", "eager"]);
    let e = json(&eager);
    assert_eq!(e["per_layer"]["spec_rule"], "eager");
    assert!(e["per_layer"]["speculative_loads"].as_u64().unwrap() > 0);
    let mut bad = args.clone();
    bad.extend(["--spec-rule", "later"]);
    let (ok, _, err) = pregate(&bad);
    assert!(!ok && err.contains("speculation rule"), "{err}");
    let without_wall = |mut v: serde_json::Value| {
        v.as_object_mut().unwrap().remove("wall_s");
        v
    };
    assert_eq!(
        without_wall(spec.clone()),
        without_wall(json(&args)),
        "one seed, one report"
    );
    let table: Vec<&str> = args.iter().copied().filter(|&a| a != "--json").collect();
    let (ok, out, _) = pregate(&table);
    assert!(ok && out.contains("recall by distance") && out.contains("speculative loads"));
}

#[test]
fn recorded_per_layer_routes_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for t in 0..5 {
        let layers: Vec<String> = (0..4)
            .map(|l| format!("[{}, {}]", (t + l) % 6, 6))
            .collect();
        writeln!(
            f,
            "{{\"request\": 0, \"token\": {t}, \"layers\": [{}]}}",
            layers.join(", ")
        )
        .unwrap();
    }
    drop(f);
    let routes = path.to_str().unwrap();
    let base = [
        "replay",
        "--synthetic",
        "5",
        "--rate",
        "1",
        "--layers",
        "4",
        "--experts",
        "7",
        "--cache-capacity",
        "3",
        "--top-k",
        "2",
        "--routes-jsonl",
        routes,
        "--json",
    ];
    let v = json(&base);
    assert_eq!(v["requests"], 5);
    assert!(v["hits"].as_u64().unwrap() > 0);
    // The trace's layer count must match the model's.
    let mut wrong = base.to_vec();
    wrong[6] = "5";
    fails_with(&wrong, &["route trace", "4 layers"]);
}

#[test]
fn bad_per_layer_flags_are_clear_errors() {
    let with = |extra: &[&'static str]| {
        let mut a = PER_LAYER.to_vec();
        a.extend_from_slice(extra);
        a
    };
    fails_with(&with(&["--spec-depth", "5"]), &["depth 5"]);
    fails_with(
        &with(&["--spec-depth", "3", "--recall", "0.9,0.8"]),
        &["recall for each distance"],
    );
    fails_with(
        &with(&["--spec-depth", "1", "--recall", "1.2"]),
        &["[0, 1]"],
    );
    fails_with(
        &with(&["--spec-depth", "1", "--spec-extra", "9"]),
        &["extra"],
    );
    fails_with(&with(&["--top-k", "9"]), &["top-9"]);
    fails_with(&with(&["--hit-ratio-table"]), &["hit-ratio-table"]);
    let mut small = PER_LAYER.to_vec();
    small[11] = "1";
    fails_with(&small, &["capacity"]);
    fails_with(
        &[
            "replay",
            "--synthetic",
            "3",
            "--cache-capacity",
            "2",
            "--shape",
            "gpt-5",
        ],
        &["unknown model shape"],
    );
}

/// `--model` on the in-model families' fixtures: per-layer synthetic routes over the model's MoE
/// layers, its experts and top-k, expert bytes from its checkpoint.
#[test]
fn family_model_dirs_replay_with_per_layer_routes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for (name, bytes_per_value) in [
        ("mixtral_f32_sharded", 4),
        ("qwen2_moe_f32", 4),
        ("qwen3_moe_bf16", 2),
        ("olmoe_f32", 4),
    ] {
        let dir = root.join(name).join("model");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let hidden = cfg["hidden_size"].as_u64().unwrap();
        let inter = cfg["moe_intermediate_size"]
            .as_u64()
            .or(cfg["intermediate_size"].as_u64())
            .unwrap();
        let dir = dir.to_str().unwrap();
        for spec in [&[][..], &["--spec-depth", "1", "--spec-extra", "0"][..]] {
            let mut args = vec![
                "replay",
                "--model",
                dir,
                "--synthetic",
                "6",
                "--rate",
                "1",
                "--seed",
                "2",
                "--cache-capacity",
                "2",
                "--policy",
                "belady-decay",
                "--json",
            ];
            args.extend_from_slice(spec);
            let r = json(&args);
            let p = &r["per_layer"];
            assert_eq!(p["top_k"], cfg["num_experts_per_tok"], "{name}");
            assert_eq!(r["requests"], 6, "{name}");
            let loaded = r["bytes_loaded"].as_u64().unwrap();
            let loads = r["loads"].as_u64().unwrap();
            assert!(loads > 0, "{name}");
            // One unit is one expert's three matrices in the checkpoint's dtype.
            assert_eq!(
                loaded,
                loads * 3 * hidden * inter * bytes_per_value,
                "{name}"
            );
            assert_eq!(
                p["spec_depth"],
                if spec.is_empty() { 0 } else { 1 },
                "{name}"
            );
        }
    }
}
