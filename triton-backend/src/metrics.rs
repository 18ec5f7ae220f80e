//! pregate's metrics on Triton's Prometheus endpoint, through Triton's custom metrics API.
//!
//! Two sources, distinct family names:
//! - the serving loop's [`ServeStats`] (requests by outcome, tokens, steps, active and scheduled
//!   requests): each model instance owns one metric per family, labelled `model` and `instance`
//!   ([`InstanceMetrics`]);
//! - the library's registry ([`pregate::metrics`]: `pregate_expert_cache_*`, `pregate_expert_load_*`,
//!   `pregate_expert_stall_seconds_total`, `pregate_batch_unique_experts`, `pregate_batch_tokens`,
//!   `pregate_queue_wait_seconds`, `pregate_requests_waiting`, `pregate_requests_running`,
//!   `pregate_admission_timeouts_total`, `pregate_sampling_seconds_total`,
//!   `pregate_routing_seconds_total`), which the serving loop records per model: one
//!   [`LibraryMirror`] per model copies its series, labelled `model`. Triton's API has no histogram
//!   a value can be copied into, so a library histogram appears as its Prometheus series:
//!   `<name>_bucket{le=...}`, `<name>_sum` and `<name>_count` (counters), which
//!   `histogram_quantile` reads as usual.
//!
//! The ServeStats families are created once per backend ([`Families::create`] at
//! `TRITONBACKEND_Initialize`), the library's when first mirrored; all are deleted at
//! `TRITONBACKEND_Finalize`. Both mirror after every step: counters incremented by their change,
//! gauges set.

use std::collections::HashMap;
use std::sync::Mutex;

use pregate::metrics::{MetricKind, MetricValue};
use pregate::serve::ServeStats;

use crate::bridge::{ffi, metric_kind};

/// What a family reports, read from a stats snapshot.
type Getter = fn(&ServeStats) -> f64;

/// One metric: (name, kind, help, extra labels, getter).
type MetricDef = (
    &'static str,
    u32,
    &'static str,
    &'static [(&'static str, &'static str)],
    Getter,
);

/// Every pregate metric.
const METRICS: &[MetricDef] = &[
    (
        "pregate_requests_total",
        metric_kind::COUNTER,
        "Requests completed, by outcome.",
        &[("outcome", "finished")],
        |s| s.finished as f64,
    ),
    (
        "pregate_requests_total",
        metric_kind::COUNTER,
        "Requests completed, by outcome.",
        &[("outcome", "cancelled")],
        |s| s.cancelled as f64,
    ),
    (
        "pregate_requests_total",
        metric_kind::COUNTER,
        "Requests completed, by outcome.",
        &[("outcome", "failed")],
        |s| s.failed as f64,
    ),
    (
        "pregate_prompt_tokens_total",
        metric_kind::COUNTER,
        "Prompt tokens admitted.",
        &[],
        |s| s.prompt_tokens as f64,
    ),
    (
        "pregate_generated_tokens_total",
        metric_kind::COUNTER,
        "Tokens generated and streamed.",
        &[],
        |s| s.generated_tokens as f64,
    ),
    (
        "pregate_steps_total",
        metric_kind::COUNTER,
        "Engine steps run.",
        &[],
        |s| s.steps as f64,
    ),
    (
        "pregate_step_tokens_total",
        metric_kind::COUNTER,
        "Tokens computed by all steps.",
        &[],
        |s| s.step_tokens as f64,
    ),
    (
        "pregate_step_requests_total",
        metric_kind::COUNTER,
        "Sum over steps of the requests batched in each step.",
        &[],
        |s| s.step_requests as f64,
    ),
    (
        "pregate_step_experts_total",
        metric_kind::COUNTER,
        "Sum over steps of the distinct experts each step used.",
        &[],
        |s| s.step_experts as f64,
    ),
    (
        "pregate_step_seconds_total",
        metric_kind::COUNTER,
        "Seconds spent in engine steps.",
        &[],
        |s| s.step_seconds,
    ),
    (
        "pregate_batch_requests_max",
        metric_kind::GAUGE,
        "Most requests batched in one step so far.",
        &[],
        |s| s.max_step_requests as f64,
    ),
    (
        "pregate_requests_active",
        metric_kind::GAUGE,
        "Requests admitted and generating.",
        &[],
        |s| s.active as f64,
    ),
    (
        "pregate_requests_scheduled",
        metric_kind::GAUGE,
        "Requests in the last step.",
        &[],
        |s| s.scheduled as f64,
    ),
    (
        "pregate_kv_bytes_in_use",
        metric_kind::GAUGE,
        "KV bytes the admitted requests reserve (prompt plus max_tokens each).",
        &[],
        |s| s.kv_bytes_in_use as f64,
    ),
    (
        "pregate_kv_bytes_max",
        metric_kind::GAUGE,
        "Most KV bytes reserved at once so far.",
        &[],
        |s| s.kv_bytes_max as f64,
    ),
    (
        "pregate_kv_budget_bytes",
        metric_kind::GAUGE,
        "The KV memory budget (kv_memory_bytes); 0 when there is none.",
        &[],
        |s| s.kv_budget_bytes as f64,
    ),
];

/// A Triton metric family pointer.
struct FamilyPtr(*mut ffi::TRITONSERVER_MetricFamily);
// SAFETY: Triton's metric families are internally synchronized; the pointer is only used to create
// and delete metrics, and is deleted once, after every metric of it.
unsafe impl Send for FamilyPtr {}

/// The backend's metric families (one per distinct name).
pub struct Families {
    families: Vec<(String, FamilyPtr)>,
}

static FAMILIES: Mutex<Option<Families>> = Mutex::new(None);

impl Families {
    /// Creates the families (at backend initialization).
    pub fn create() -> Result<(), String> {
        let mut families: Vec<(String, FamilyPtr)> = Vec::new();
        for &(name, kind, help, _, _) in METRICS {
            if families.iter().any(|(n, _)| n == name) {
                continue;
            }
            match ffi::metric_family_new(kind, name, help) {
                Ok(p) => families.push((name.to_string(), FamilyPtr(p))),
                Err(e) => {
                    delete_families(families);
                    return Err(format!("cannot create metric family {name}: {e}"));
                }
            }
        }
        *FAMILIES.lock().unwrap_or_else(|p| p.into_inner()) = Some(Families { families });
        Ok(())
    }

    /// Deletes the families (at backend finalization, after every instance is gone).
    pub fn delete() {
        if let Some(f) = FAMILIES.lock().unwrap_or_else(|p| p.into_inner()).take() {
            delete_families(f.families);
        }
    }
}

/// The family `name`, created (with `kind` and `help`) if it does not exist yet.
fn family(
    name: &str,
    kind: u32,
    help: &str,
) -> Result<*mut ffi::TRITONSERVER_MetricFamily, String> {
    let mut guard = FAMILIES.lock().unwrap_or_else(|p| p.into_inner());
    let fams = guard
        .as_mut()
        .ok_or("the metric families were not created")?;
    if let Some((_, f)) = fams.families.iter().find(|(n, _)| n == name) {
        return Ok(f.0);
    }
    let p = ffi::metric_family_new(kind, name, help)
        .map_err(|e| format!("cannot create metric family {name}: {e}"))?;
    fams.families.push((name.to_string(), FamilyPtr(p)));
    Ok(p)
}

fn delete_families(families: Vec<(String, FamilyPtr)>) {
    for (_, f) in families {
        // SAFETY: `f` came from TRITONSERVER_MetricFamilyNew and is deleted once.
        let _ = unsafe { ffi::metric_family_delete(f.0) };
    }
}

struct MetricPtr(*mut ffi::TRITONSERVER_Metric);
// SAFETY: Triton's metrics are internally synchronized (prometheus-cpp atomics); the pointers are
// used under `InstanceMetrics`' mutex and deleted once.
unsafe impl Send for MetricPtr {}

/// One instance's metrics.
pub struct InstanceMetrics {
    inner: Mutex<Vec<(MetricPtr, u32, Getter, f64)>>,
}

impl InstanceMetrics {
    /// Creates this instance's metrics, labelled with the model and instance names.
    pub fn new(model: &str, instance: &str) -> Result<Self, String> {
        let guard = FAMILIES.lock().unwrap_or_else(|p| p.into_inner());
        let fams = guard
            .as_ref()
            .ok_or("the metric families were not created")?;
        let mut metrics = Vec::new();
        for &(name, kind, _, extra, get) in METRICS {
            let Some((_, fam)) = fams.families.iter().find(|(n, _)| n == name) else {
                continue;
            };
            let mut labels = vec!["model".to_string(), model.to_string()];
            labels.extend(["instance".to_string(), instance.to_string()]);
            for (k, v) in extra {
                labels.extend([k.to_string(), v.to_string()]);
            }
            // SAFETY: `fam.0` is a live family (families outlive instances).
            match unsafe { ffi::metric_new(fam.0, &labels) } {
                Ok(m) => metrics.push((MetricPtr(m), kind, get, 0.0)),
                Err(e) => {
                    for (m, ..) in metrics {
                        // SAFETY: created just above, deleted once.
                        let _ = unsafe { ffi::metric_delete(m.0) };
                    }
                    return Err(format!("cannot create metric {name}: {e}"));
                }
            }
        }
        Ok(InstanceMetrics {
            inner: Mutex::new(metrics),
        })
    }

    /// Mirrors a stats snapshot.
    pub fn update(&self, s: &ServeStats) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (ptr, kind, get, last) in m.iter_mut() {
            let v = get(s);
            // SAFETY: `ptr` is a live metric of this instance (deleted only in Drop).
            let r = unsafe {
                if *kind == metric_kind::COUNTER {
                    if v > *last {
                        ffi::metric_increment(ptr.0, v - *last)
                    } else {
                        Ok(())
                    }
                } else {
                    ffi::metric_set(ptr.0, v)
                }
            };
            if r.is_ok() {
                *last = v.max(*last);
            }
        }
    }
}

impl Drop for InstanceMetrics {
    fn drop(&mut self) {
        let m = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        for (ptr, ..) in m.drain(..) {
            // SAFETY: each metric is deleted once, here.
            let _ = unsafe { ffi::metric_delete(ptr.0) };
        }
    }
}

/// One mirrored series: its Triton metric, kind, and the value last mirrored.
struct Mirrored {
    metric: MetricPtr,
    kind: u32,
    last: f64,
}

/// The library's series of one model, mirrored into Triton's metrics (see the module docs). Shared
/// by the model's instances: the library's values are per model and cumulative, so whichever
/// instance mirrors adds only what changed since the last mirror.
pub struct LibraryMirror {
    model: String,
    series: Mutex<HashMap<String, Mirrored>>,
}

/// One Triton series derived from a library sample: name, kind, help, labels, value.
type Series = (String, u32, String, Vec<(String, String)>, f64);

/// The Triton series of one library sample (a histogram becomes its bucket, sum and count series).
fn series_of(s: &pregate::metrics::MetricSample) -> Vec<Series> {
    let kind = match s.kind {
        MetricKind::Counter | MetricKind::Histogram => metric_kind::COUNTER,
        MetricKind::Gauge => metric_kind::GAUGE,
    };
    match &s.value {
        MetricValue::Scalar(v) => {
            vec![(s.name.clone(), kind, s.help.clone(), s.labels.clone(), *v)]
        }
        MetricValue::Histogram {
            count,
            sum,
            buckets,
        } => {
            let bucket = |le: String, n: u64| {
                let mut labels = s.labels.clone();
                labels.push(("le".to_string(), le));
                (
                    format!("{}_bucket", s.name),
                    kind,
                    format!("{} (cumulative histogram buckets)", s.help),
                    labels,
                    n as f64,
                )
            };
            let mut out: Vec<Series> = buckets
                .iter()
                .map(|&(le, n)| bucket(format!("{le}"), n))
                .collect();
            out.push(bucket("+Inf".to_string(), *count));
            out.push((
                format!("{}_sum", s.name),
                kind,
                format!("{} (sum of observations)", s.help),
                s.labels.clone(),
                *sum,
            ));
            out.push((
                format!("{}_count", s.name),
                kind,
                format!("{} (observations)", s.help),
                s.labels.clone(),
                *count as f64,
            ));
            out
        }
    }
}

impl LibraryMirror {
    /// A mirror of the library series labelled `model`.
    pub fn new(model: &str) -> Self {
        LibraryMirror {
            model: model.to_string(),
            series: Mutex::new(HashMap::new()),
        }
    }

    /// Copies the library's current values of this model into Triton's metrics, creating the
    /// families and metrics met for the first time. Errors are skipped (a metric is not worth a
    /// failed request) and the series retried at the next update.
    pub fn update(&self) {
        let Ok(snapshot) = pregate::metrics::snapshot() else {
            return;
        };
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        for sample in snapshot.iter().filter(|s| {
            s.labels
                .iter()
                .any(|(k, v)| k == "model" && *v == self.model)
        }) {
            for (name, kind, help, labels, value) in series_of(sample) {
                let key = format!("{name}{labels:?}");
                if !series.contains_key(&key) {
                    let Ok(fam) = family(&name, kind, &help) else {
                        continue;
                    };
                    let flat: Vec<String> = labels.into_iter().flat_map(|(k, v)| [k, v]).collect();
                    // SAFETY: `fam` is a live family (families outlive every model).
                    let Ok(m) = (unsafe { ffi::metric_new(fam, &flat) }) else {
                        continue;
                    };
                    series.insert(
                        key.clone(),
                        Mirrored {
                            metric: MetricPtr(m),
                            kind,
                            last: 0.0,
                        },
                    );
                }
                let Some(m) = series.get_mut(&key) else {
                    continue;
                };
                // SAFETY: `m.metric` is a live metric of this mirror (deleted only in Drop).
                let r = unsafe {
                    if m.kind == metric_kind::COUNTER {
                        if value > m.last {
                            ffi::metric_increment(m.metric.0, value - m.last)
                        } else {
                            Ok(())
                        }
                    } else {
                        ffi::metric_set(m.metric.0, value)
                    }
                };
                if r.is_ok() {
                    m.last = if m.kind == metric_kind::COUNTER {
                        value.max(m.last)
                    } else {
                        value
                    };
                }
            }
        }
    }
}

impl Drop for LibraryMirror {
    fn drop(&mut self) {
        let series = self.series.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, m) in series.drain() {
            // SAFETY: each metric is deleted once, here.
            let _ = unsafe { ffi::metric_delete(m.metric.0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pregate::metrics::MetricSample;

    #[test]
    fn a_histogram_becomes_its_prometheus_series() {
        let labels = vec![("model".to_string(), "m".to_string())];
        let h = MetricSample {
            name: "pregate_batch_tokens".into(),
            help: "Tokens.".into(),
            kind: MetricKind::Histogram,
            labels: labels.clone(),
            value: MetricValue::Histogram {
                count: 3,
                sum: 7.0,
                buckets: vec![(1.0, 1), (2.5, 2)],
            },
        };
        let s = series_of(&h);
        let names: Vec<&str> = s.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "pregate_batch_tokens_bucket",
                "pregate_batch_tokens_bucket",
                "pregate_batch_tokens_bucket",
                "pregate_batch_tokens_sum",
                "pregate_batch_tokens_count"
            ]
        );
        assert_eq!(s[1].3.last().unwrap().1, "2.5");
        assert_eq!(s[2].3.last().unwrap().1, "+Inf");
        assert_eq!((s[2].4, s[3].4, s[4].4), (3.0, 7.0, 3.0));
        assert!(s.iter().all(|x| x.1 == metric_kind::COUNTER));
        let g = MetricSample {
            name: "pregate_requests_waiting".into(),
            help: "Waiting.".into(),
            kind: MetricKind::Gauge,
            labels,
            value: MetricValue::Scalar(2.0),
        };
        let s = series_of(&g);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].1, s[0].4), (metric_kind::GAUGE, 2.0));
    }

    #[test]
    fn no_serve_stats_family_shares_a_library_name() {
        let m = pregate::metrics::model_metrics("triton-names").unwrap();
        m.observe_batch(1, 1);
        let library: Vec<String> = pregate::metrics::snapshot()
            .unwrap()
            .iter()
            .flat_map(series_of)
            .map(|s| s.0)
            .collect();
        for &(name, ..) in METRICS {
            assert!(
                !library.iter().any(|l| l == name),
                "{name} is defined twice"
            );
        }
    }
}
