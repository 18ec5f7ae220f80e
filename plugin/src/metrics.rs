//! Prometheus metrics: one registry for the whole library, names `pregate_<what>_<unit>`.
//!
//! Every metric carries one label, `model`, whose values form a closed set: the names of the
//! models a host serves, registered through [`model_metrics`] (validated: 1-64 characters of
//! `[A-Za-z0-9_.-]`, at most [`MAX_MODELS`] of them). The speculative-prefetch recall counters
//! (`pregate_prediction_{hits,misses}_total`) carry a second label, `distance`: how many layers
//! ahead the prediction was made, `1..=`[`MAX_SPEC_DEPTH`]. The registry is exported three ways:
//! - [`encode_text`]: the Prometheus text format (what `/metrics` serves);
//! - [`MetricsServer`]: a small tokio HTTP endpoint serving `GET /metrics`, which a host starts on
//!   its own thread (`pregate replay --metrics-addr`);
//! - [`snapshot`]: plain values, for hosts with their own metrics API (the Triton backend mirrors
//!   them into Triton's metrics so they appear on its :8002 endpoint).
//!
//! Recording costs a few atomic operations ([`ModelMetrics`] holds the labelled handles), so the
//! batcher and cache can be instrumented per step.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    exponential_buckets, linear_buckets, Encoder, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cache::CacheStats;
use crate::error::{Error, Result};
use crate::moe::speculate::{SpeculationStats, MAX_SPEC_DEPTH};

/// The most distinct `model` label values.
pub const MAX_MODELS: usize = 64;

/// Every metric pregate defines, by family.
struct Families {
    hits: IntCounterVec,
    misses: IntCounterVec,
    evictions: IntCounterVec,
    load_bytes: IntCounterVec,
    load_seconds: HistogramVec,
    resident: IntGaugeVec,
    stall_seconds: prometheus::CounterVec,
    batch_experts: HistogramVec,
    batch_tokens: HistogramVec,
    queue_wait: HistogramVec,
    waiting: IntGaugeVec,
    running: IntGaugeVec,
    admission_timeouts: IntCounterVec,
    sampling_seconds: prometheus::CounterVec,
    routing_seconds: prometheus::CounterVec,
    prediction_hits: IntCounterVec,
    prediction_misses: IntCounterVec,
    speculative_loads: IntCounterVec,
    speculative_wasted: IntCounterVec,
}

struct Library {
    registry: Registry,
    families: Families,
    models: Mutex<BTreeSet<String>>,
}

fn err(e: prometheus::Error) -> Error {
    Error::Internal(format!("metrics: {e}"))
}

fn build() -> std::result::Result<Library, prometheus::Error> {
    let registry = Registry::new();
    let l = &["model"];
    let counter = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), l);
    let by_distance =
        |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["model", "distance"]);
    let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), l);
    let hist = |name: &str, help: &str, b: Vec<f64>| {
        HistogramVec::new(HistogramOpts::new(name, help).buckets(b), l)
    };
    let families = Families {
        hits: counter(
            "pregate_expert_cache_hits_total",
            "Expert (layer, expert) accesses that found the unit resident.",
        )?,
        misses: counter(
            "pregate_expert_cache_misses_total",
            "Expert accesses that had to load the unit.",
        )?,
        evictions: counter(
            "pregate_expert_cache_evictions_total",
            "Expert units evicted from the cache.",
        )?,
        load_bytes: counter(
            "pregate_expert_load_bytes_total",
            "Bytes of expert weights copied into cache slots.",
        )?,
        load_seconds: hist(
            "pregate_expert_load_seconds",
            "Duration of one expert-layer load.",
            exponential_buckets(1e-4, 2.0, 16)?,
        )?,
        resident: gauge(
            "pregate_expert_cache_resident_slots",
            "Cache slots holding an expert unit.",
        )?,
        stall_seconds: prometheus::CounterVec::new(
            Opts::new(
                "pregate_expert_stall_seconds_total",
                "Time compute waited for expert loads.",
            ),
            l,
        )?,
        batch_experts: hist(
            "pregate_batch_unique_experts",
            "Distinct experts used by one step.",
            linear_buckets(1.0, 1.0, 16)?,
        )?,
        batch_tokens: hist(
            "pregate_batch_tokens",
            "Tokens computed by one step.",
            exponential_buckets(1.0, 2.0, 14)?,
        )?,
        queue_wait: hist(
            "pregate_queue_wait_seconds",
            "Time a request waited before one of its steps.",
            exponential_buckets(1e-3, 2.0, 18)?,
        )?,
        waiting: gauge(
            "pregate_requests_waiting",
            "Requests waiting for admission.",
        )?,
        running: gauge(
            "pregate_requests_running",
            "Requests admitted and not finished.",
        )?,
        admission_timeouts: counter(
            "pregate_admission_timeouts_total",
            "Requests failed as overloaded: not admitted within the maximum queue wait.",
        )?,
        sampling_seconds: prometheus::CounterVec::new(
            Opts::new(
                "pregate_sampling_seconds_total",
                "Host time sampling decoded tokens from their logits.",
            ),
            l,
        )?,
        routing_seconds: prometheus::CounterVec::new(
            Opts::new(
                "pregate_routing_seconds_total",
                "Time routing decoded tokens (the router's pass, on the host or the device).",
            ),
            l,
        )?,
        prediction_hits: by_distance(
            "pregate_prediction_hits_total",
            "Exact experts of a layer that speculation predicted `distance` layers ahead.",
        )?,
        prediction_misses: by_distance(
            "pregate_prediction_misses_total",
            "Exact experts of a layer that speculation did not predict `distance` layers ahead.",
        )?,
        speculative_loads: counter(
            "pregate_speculative_loads_total",
            "Expert loads issued on a speculative prediction.",
        )?,
        speculative_wasted: counter(
            "pregate_speculative_wasted_loads_total",
            "Speculative expert loads evicted before their layer used them.",
        )?,
    };
    let all: [Box<dyn Collector>; 19] = [
        Box::new(families.hits.clone()),
        Box::new(families.misses.clone()),
        Box::new(families.evictions.clone()),
        Box::new(families.load_bytes.clone()),
        Box::new(families.load_seconds.clone()),
        Box::new(families.resident.clone()),
        Box::new(families.stall_seconds.clone()),
        Box::new(families.batch_experts.clone()),
        Box::new(families.batch_tokens.clone()),
        Box::new(families.queue_wait.clone()),
        Box::new(families.waiting.clone()),
        Box::new(families.running.clone()),
        Box::new(families.admission_timeouts.clone()),
        Box::new(families.sampling_seconds.clone()),
        Box::new(families.routing_seconds.clone()),
        Box::new(families.prediction_hits.clone()),
        Box::new(families.prediction_misses.clone()),
        Box::new(families.speculative_loads.clone()),
        Box::new(families.speculative_wasted.clone()),
    ];
    for c in all {
        registry.register(c)?;
    }
    Ok(Library {
        registry,
        families,
        models: Mutex::new(BTreeSet::new()),
    })
}

fn library() -> Result<&'static Library> {
    static LIB: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIB.get_or_init(|| build().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Internal(format!("metrics: {e}")))
}

/// The library's registry (for hosts that want to add it to their own exporter).
pub fn registry() -> Result<&'static Registry> {
    Ok(&library()?.registry)
}

/// The labelled handles of one model: what the batcher, cache and replay record into.
#[derive(Clone)]
pub struct ModelMetrics {
    hits: IntCounter,
    misses: IntCounter,
    evictions: IntCounter,
    load_bytes: IntCounter,
    load_seconds: Histogram,
    resident: IntGauge,
    stall_seconds: prometheus::Counter,
    batch_experts: Histogram,
    batch_tokens: Histogram,
    queue_wait: Histogram,
    waiting: IntGauge,
    running: IntGauge,
    admission_timeouts: IntCounter,
    sampling_seconds: prometheus::Counter,
    routing_seconds: prometheus::Counter,
    prediction_hits: Vec<IntCounter>,
    prediction_misses: Vec<IntCounter>,
    speculative_loads: IntCounter,
    speculative_wasted: IntCounter,
    last_cache: Arc<Mutex<CacheStats>>,
    last_speculation: Arc<Mutex<SpeculationStats>>,
}

impl std::fmt::Debug for ModelMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelMetrics").finish_non_exhaustive()
    }
}

fn valid_model_label(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= 64
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The handles for `model`, registering the label value (closed set: see the module docs).
pub fn model_metrics(model: &str) -> Result<ModelMetrics> {
    if !valid_model_label(model) {
        return Err(Error::InvalidArgument(format!(
            "metrics model label `{model}` must be 1-64 characters of [A-Za-z0-9_.-]"
        )));
    }
    let lib = library()?;
    {
        let mut models = lib
            .models
            .lock()
            .map_err(|_| Error::Internal("metrics model set poisoned".into()))?;
        if !models.contains(model) && models.len() >= MAX_MODELS {
            return Err(Error::Capacity(format!(
                "more than {MAX_MODELS} distinct model labels"
            )));
        }
        models.insert(model.to_string());
    }
    let f = &lib.families;
    let v = &[model];
    let per_distance = |family: &IntCounterVec| -> Result<Vec<IntCounter>> {
        (1..=MAX_SPEC_DEPTH)
            .map(|j| {
                family
                    .get_metric_with_label_values(&[model, &j.to_string()])
                    .map_err(err)
            })
            .collect()
    };
    Ok(ModelMetrics {
        hits: f.hits.get_metric_with_label_values(v).map_err(err)?,
        misses: f.misses.get_metric_with_label_values(v).map_err(err)?,
        evictions: f.evictions.get_metric_with_label_values(v).map_err(err)?,
        load_bytes: f.load_bytes.get_metric_with_label_values(v).map_err(err)?,
        load_seconds: f
            .load_seconds
            .get_metric_with_label_values(v)
            .map_err(err)?,
        resident: f.resident.get_metric_with_label_values(v).map_err(err)?,
        stall_seconds: f
            .stall_seconds
            .get_metric_with_label_values(v)
            .map_err(err)?,
        batch_experts: f
            .batch_experts
            .get_metric_with_label_values(v)
            .map_err(err)?,
        batch_tokens: f
            .batch_tokens
            .get_metric_with_label_values(v)
            .map_err(err)?,
        queue_wait: f.queue_wait.get_metric_with_label_values(v).map_err(err)?,
        waiting: f.waiting.get_metric_with_label_values(v).map_err(err)?,
        running: f.running.get_metric_with_label_values(v).map_err(err)?,
        admission_timeouts: f
            .admission_timeouts
            .get_metric_with_label_values(v)
            .map_err(err)?,
        sampling_seconds: f
            .sampling_seconds
            .get_metric_with_label_values(v)
            .map_err(err)?,
        routing_seconds: f
            .routing_seconds
            .get_metric_with_label_values(v)
            .map_err(err)?,
        prediction_hits: per_distance(&f.prediction_hits)?,
        prediction_misses: per_distance(&f.prediction_misses)?,
        speculative_loads: f
            .speculative_loads
            .get_metric_with_label_values(v)
            .map_err(err)?,
        speculative_wasted: f
            .speculative_wasted
            .get_metric_with_label_values(v)
            .map_err(err)?,
        last_cache: Arc::new(Mutex::new(CacheStats::default())),
        last_speculation: Arc::new(Mutex::new(SpeculationStats::default())),
    })
}

impl ModelMetrics {
    /// Adds what a cache counted since the last call (its counters are cumulative) and sets the
    /// resident-slot gauge.
    pub fn record_cache(&self, now: CacheStats, resident_slots: usize) {
        let mut last = match self.last_cache.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        self.hits.inc_by(now.hits.saturating_sub(last.hits));
        self.misses.inc_by(now.misses.saturating_sub(last.misses));
        self.evictions
            .inc_by(now.evictions.saturating_sub(last.evictions));
        self.load_bytes
            .inc_by(now.bytes_loaded.saturating_sub(last.bytes_loaded));
        *last = now;
        self.resident.set(resident_slots as i64);
    }

    /// Adds what a [`crate::moe::Speculator`] counted since the last call (its counters are
    /// cumulative): recall per distance, speculative loads and the wasted ones. A backend calls it
    /// once per step.
    pub fn record_speculation(&self, now: SpeculationStats) {
        let mut last = match self.last_speculation.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for j in 0..MAX_SPEC_DEPTH {
            self.prediction_hits[j].inc_by(now.hits[j].saturating_sub(last.hits[j]));
            self.prediction_misses[j].inc_by(now.misses[j].saturating_sub(last.misses[j]));
        }
        self.speculative_loads
            .inc_by(now.loads.saturating_sub(last.loads));
        self.speculative_wasted
            .inc_by(now.wasted.saturating_sub(last.wasted));
        *last = now;
    }

    /// One expert-layer load took `seconds`.
    pub fn observe_load(&self, seconds: f64) {
        self.load_seconds.observe(seconds);
    }

    /// Compute waited `seconds` for loads.
    pub fn add_stall(&self, seconds: f64) {
        if seconds > 0.0 {
            self.stall_seconds.inc_by(seconds);
        }
    }

    /// One step used `unique_experts` experts over `tokens` tokens.
    pub fn observe_batch(&self, unique_experts: usize, tokens: usize) {
        self.batch_experts.observe(unique_experts as f64);
        self.batch_tokens.observe(tokens as f64);
    }

    /// A request waited `seconds` before a step.
    pub fn observe_queue_wait(&self, seconds: f64) {
        self.queue_wait.observe(seconds.max(0.0));
    }

    /// Sets the request gauges.
    pub fn set_requests(&self, waiting: usize, running: usize) {
        self.waiting.set(waiting as i64);
        self.running.set(running as i64);
    }

    /// A request was failed as overloaded: it waited past the maximum for admission.
    pub fn count_admission_timeout(&self) {
        self.admission_timeouts.inc();
    }

    /// The engine spent `sampling` and `routing` more seconds on decoded tokens.
    pub fn add_host_seconds(&self, sampling: f64, routing: f64) {
        if sampling > 0.0 {
            self.sampling_seconds.inc_by(sampling);
        }
        if routing > 0.0 {
            self.routing_seconds.inc_by(routing);
        }
    }
}

/// The whole registry in the Prometheus text format (version 0.0.4).
pub fn encode_text() -> Result<String> {
    let families = registry()?.gather();
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut buf)
        .map_err(err)?;
    String::from_utf8(buf).map_err(|e| Error::Internal(format!("metrics text: {e}")))
}

/// The kind of a metric, as in Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Monotonically increasing.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Bucketed observations.
    Histogram,
}

/// A metric's value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    /// A counter's or gauge's value.
    Scalar(f64),
    /// A histogram: observations, their sum, and cumulative counts per upper bound (the implicit
    /// `+Inf` bucket is `count`).
    Histogram {
        /// Observations.
        count: u64,
        /// Sum of observations.
        sum: f64,
        /// `(upper bound, cumulative count)`, ascending.
        buckets: Vec<(f64, u64)>,
    },
}

/// One labelled series of the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSample {
    /// The metric name (`pregate_...`).
    pub name: String,
    /// Its help text.
    pub help: String,
    /// Its kind.
    pub kind: MetricKind,
    /// Its labels (`model`).
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: MetricValue,
}

/// Every series of the registry, for hosts that mirror them into their own metrics API.
pub fn snapshot() -> Result<Vec<MetricSample>> {
    let mut out = Vec::new();
    for fam in registry()?.gather() {
        let kind = match fam.get_field_type() {
            MetricType::COUNTER => MetricKind::Counter,
            MetricType::GAUGE => MetricKind::Gauge,
            MetricType::HISTOGRAM => MetricKind::Histogram,
            _ => continue,
        };
        for m in fam.get_metric() {
            let value = match kind {
                MetricKind::Counter => MetricValue::Scalar(m.get_counter().get_value()),
                MetricKind::Gauge => MetricValue::Scalar(m.get_gauge().get_value()),
                MetricKind::Histogram => {
                    let h = m.get_histogram();
                    MetricValue::Histogram {
                        count: h.get_sample_count(),
                        sum: h.get_sample_sum(),
                        buckets: h
                            .get_bucket()
                            .iter()
                            .map(|b| (b.upper_bound(), b.cumulative_count()))
                            .collect(),
                    }
                }
            };
            out.push(MetricSample {
                name: fam.name().to_string(),
                help: fam.help().to_string(),
                kind,
                labels: m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect(),
                value,
            });
        }
    }
    Ok(out)
}

/// A running `/metrics` HTTP endpoint on its own thread; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free one) and serves `GET /metrics` until dropped.
    pub fn start(addr: SocketAddr) -> Result<Self> {
        let io_err = |e: io::Error| Error::io(format!("metrics endpoint {addr}"), e);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(io_err)?;
        let std_listener = std::net::TcpListener::bind(addr).map_err(io_err)?;
        std_listener.set_nonblocking(true).map_err(io_err)?;
        let local = std_listener.local_addr().map_err(io_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pregate-metrics".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    // Polling the stop flag between accepts keeps shutdown free of extra machinery.
                    while !flag.load(Ordering::Relaxed) {
                        let accepted =
                            tokio::time::timeout(Duration::from_millis(50), listener.accept())
                                .await;
                        if let Ok(Ok((stream, _))) = accepted {
                            tokio::spawn(handle(stream));
                        }
                    }
                });
            })
            .map_err(io_err)?;
        Ok(MetricsServer {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Read the request head only (GET has no body); give up on slow or oversized clients.
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let path = path.map(|p| p.split(|&b| b == b'?').next().unwrap_or_default());
    let (status, ctype, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => match encode_text() {
            Ok(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
            Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
        },
        (Some(b"GET"), _) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn names_are_exactly_the_documented_ones() {
        let m = model_metrics("unit-test").unwrap();
        m.record_cache(
            CacheStats {
                hits: 3,
                misses: 2,
                evictions: 1,
                loads: 2,
                bytes_loaded: 20,
            },
            4,
        );
        m.observe_batch(3, 100);
        m.observe_load(0.0025);
        m.add_stall(0.5);
        m.observe_queue_wait(0.01);
        m.set_requests(2, 5);
        m.count_admission_timeout();
        m.add_host_seconds(0.25, 0.125);
        let snap = snapshot().unwrap();
        let names: BTreeSet<&str> = snap.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "pregate_expert_cache_hits_total",
            "pregate_expert_cache_misses_total",
            "pregate_expert_cache_evictions_total",
            "pregate_expert_load_bytes_total",
            "pregate_expert_load_seconds",
            "pregate_expert_cache_resident_slots",
            "pregate_expert_stall_seconds_total",
            "pregate_batch_unique_experts",
            "pregate_batch_tokens",
            "pregate_queue_wait_seconds",
            "pregate_requests_waiting",
            "pregate_requests_running",
            "pregate_admission_timeouts_total",
            "pregate_sampling_seconds_total",
            "pregate_routing_seconds_total",
            "pregate_prediction_hits_total",
            "pregate_prediction_misses_total",
            "pregate_speculative_loads_total",
            "pregate_speculative_wasted_loads_total",
        ] {
            assert!(names.contains(want), "{want} missing");
        }
        let hits = snap
            .iter()
            .find(|s| {
                s.name == "pregate_expert_cache_hits_total"
                    && s.labels == vec![("model".to_string(), "unit-test".to_string())]
            })
            .unwrap();
        assert_eq!(hits.value, MetricValue::Scalar(3.0));
        assert_eq!(hits.kind, MetricKind::Counter);
        // Cumulative counters: a second record adds only the difference.
        m.record_cache(
            CacheStats {
                hits: 5,
                ..CacheStats::default()
            },
            4,
        );
        let text = encode_text().unwrap();
        assert!(
            text.contains("pregate_expert_cache_hits_total{model=\"unit-test\"} 5"),
            "{text}"
        );
        assert!(text.contains("pregate_batch_tokens_bucket{model=\"unit-test\",le=\"128\"} 1"));
        assert!(text.contains("pregate_admission_timeouts_total{model=\"unit-test\"} 1"));
        assert!(text.contains("pregate_sampling_seconds_total{model=\"unit-test\"} 0.25"));
        assert!(text.contains("pregate_routing_seconds_total{model=\"unit-test\"} 0.125"));
    }

    #[test]
    fn speculation_counters_add_deltas_per_distance() {
        let m = model_metrics("spec-test").unwrap();
        let mut s = SpeculationStats {
            hits: [8, 3, 0, 0],
            misses: [2, 7, 0, 0],
            loads: 12,
            used: 9,
            wasted: 2,
        };
        m.record_speculation(s);
        s.hits[0] += 1;
        s.loads += 1;
        m.record_speculation(s);
        let text = encode_text().unwrap();
        for want in [
            "pregate_prediction_hits_total{distance=\"1\",model=\"spec-test\"} 9",
            "pregate_prediction_hits_total{distance=\"2\",model=\"spec-test\"} 3",
            "pregate_prediction_misses_total{distance=\"2\",model=\"spec-test\"} 7",
            "pregate_prediction_misses_total{distance=\"4\",model=\"spec-test\"} 0",
            "pregate_speculative_loads_total{model=\"spec-test\"} 13",
            "pregate_speculative_wasted_loads_total{model=\"spec-test\"} 2",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }

    #[test]
    fn model_labels_are_validated() {
        assert!(model_metrics("").is_err());
        assert!(model_metrics("a b").is_err());
        assert!(model_metrics("x\"y").is_err());
        assert!(model_metrics("read-me_7b.v1").is_ok());
    }

    #[test]
    fn the_endpoint_serves_metrics_and_stops() {
        model_metrics("endpoint-test").unwrap().observe_batch(1, 1);
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let get = |path: &str| {
            let mut s = std::net::TcpStream::connect(server.local_addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("/metrics");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("pregate_batch_tokens_count{model=\"endpoint-test\"}"));
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
        drop(server);
    }
}
