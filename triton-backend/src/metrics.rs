//! pregate's metrics on Triton's Prometheus endpoint, through Triton's custom metrics API.
//!
//! The families are created once per backend ([`Families::create`] at `TRITONBACKEND_Initialize`)
//! and deleted at `TRITONBACKEND_Finalize`; each model instance owns one metric per family,
//! labelled `model` and `instance`, and mirrors the serving loop's [`ServeStats`] after every step
//! (counters are incremented by their change, gauges set).

use std::sync::Mutex;

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
        "pregate_requests_waiting",
        metric_kind::GAUGE,
        "Requests waiting for admission.",
        &[],
        |s| s.waiting as f64,
    ),
    (
        "pregate_requests_scheduled",
        metric_kind::GAUGE,
        "Requests in the last step.",
        &[],
        |s| s.scheduled as f64,
    ),
];

/// A Triton metric family pointer.
struct FamilyPtr(*mut ffi::TRITONSERVER_MetricFamily);
// SAFETY: Triton's metric families are internally synchronized; the pointer is only used to create
// and delete metrics, and is deleted once, after every metric of it.
unsafe impl Send for FamilyPtr {}

/// The backend's metric families (one per distinct name).
pub struct Families {
    families: Vec<(&'static str, FamilyPtr)>,
}

static FAMILIES: Mutex<Option<Families>> = Mutex::new(None);

impl Families {
    /// Creates the families (at backend initialization).
    pub fn create() -> Result<(), String> {
        let mut families: Vec<(&'static str, FamilyPtr)> = Vec::new();
        for &(name, kind, help, _, _) in METRICS {
            if families.iter().any(|(n, _)| *n == name) {
                continue;
            }
            match ffi::metric_family_new(kind, name, help) {
                Ok(p) => families.push((name, FamilyPtr(p))),
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

fn delete_families(families: Vec<(&'static str, FamilyPtr)>) {
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
            let Some((_, fam)) = fams.families.iter().find(|(n, _)| *n == name) else {
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
