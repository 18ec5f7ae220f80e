//! The metrics a replay records, checked with Prometheus's own parser (`promtool check metrics`)
//! and through the HTTP endpoint.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use pregate::batcher::{BatchPolicy, BatcherConfig};
use pregate::cache::EvictionPolicy;
use pregate::metrics::{encode_text, model_metrics, snapshot, MetricKind, MetricsServer};
use pregate::replay::{self, workload, CostModel, ExpertModel, Lookahead, ModelShape, SimConfig};

fn replay_into_metrics(label: &str) {
    let m = model_metrics(label).unwrap();
    let reqs = workload::synthetic(100, 2.0, 1).unwrap();
    let cfg = SimConfig {
        shape: ModelShape::read_me(),
        cost: CostModel::default(),
        batcher: BatcherConfig {
            policy: BatchPolicy::ExpertAware,
            max_wait: Some(1.0),
            ..BatcherConfig::default()
        },
        per_layer: 3,
        policy: EvictionPolicy::Belady,
        prefetch: true,
        experts: ExpertModel::read_me(7, 1),
        seed: 1,
        lookahead: Lookahead::Online,
        record_steps: false,
    };
    let r = replay::simulate(&reqs, &cfg, Some(&m)).unwrap();
    assert_eq!(r.requests, 100);
}

#[test]
fn promtool_accepts_the_metrics() {
    replay_into_metrics("promtool-test");
    let text = encode_text().unwrap();
    assert!(text.contains("pregate_expert_cache_hits_total{model=\"promtool-test\"}"));
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("SKIPPED: promtool not found (apt-get install prometheus provides it)");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool rejected the metrics: {msg}\n{text}"
    );
    // promtool also lints; pregate's names follow its conventions, so no complaint is expected.
    assert!(msg.trim().is_empty(), "promtool lint: {msg}");
}

#[test]
fn snapshot_mirrors_the_registry_and_the_endpoint_serves_it() {
    replay_into_metrics("snapshot-test");
    let snap = snapshot().unwrap();
    let ours: Vec<_> = snap
        .iter()
        .filter(|s| s.labels.iter().any(|(_, v)| v == "snapshot-test"))
        .collect();
    assert_eq!(
        ours.iter()
            .map(|s| s.name.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        19,
        "the 15 cache, batch and host families and the 4 of speculative prefetch"
    );
    assert!(ours
        .iter()
        .any(|s| s.name == "pregate_batch_unique_experts" && s.kind == MetricKind::Histogram));
    let server = MetricsServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut s = std::net::TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"));
    assert!(body.contains("text/plain; version=0.0.4"));
    assert!(body.contains("pregate_queue_wait_seconds_bucket{model=\"snapshot-test\""));
}
