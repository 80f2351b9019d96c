//! Prometheus metrics of the server, kept in plain maps behind mutexes (a handful of series;
//! no registry crate needed) and rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Batch-size buckets.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone)]
struct Histogram {
    buckets: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(buckets: &'static [f64]) -> Self {
        Self { buckets, counts: vec![0; buckets.len()], sum: 0.0, count: 0 }
    }
    fn observe(&mut self, v: f64) {
        for (i, b) in self.buckets.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// Label set, rendered `{k="v",…}`.
type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    request_seconds: BTreeMap<String, Histogram>,
    stage_seconds: BTreeMap<&'static str, Histogram>,
    batch_sizes: BTreeMap<(String, u64), Histogram>,
    queue_depth: BTreeMap<(String, u64), i64>,
    versions: BTreeMap<(String, u64), &'static str>,
    dropped_jobs: u64,
    connections_closed: BTreeMap<&'static str, u64>,
}

/// The server's metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Processing stages of an inference request.
pub const STAGES: [&str; 6] = ["decode", "resize", "queue", "inference", "postprocess", "encode"];

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// One finished request.
    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        self.with(|m| {
            *m.requests.entry((route.to_string(), status)).or_default() += 1;
            m.request_seconds.entry(route.to_string()).or_insert_with(|| Histogram::new(&LATENCY_BUCKETS)).observe(elapsed.as_secs_f64());
        });
    }

    /// Time spent in one stage (see [`STAGES`]).
    pub fn stage(&self, stage: &'static str, elapsed: Duration) {
        self.with(|m| m.stage_seconds.entry(stage).or_insert_with(|| Histogram::new(&LATENCY_BUCKETS)).observe(elapsed.as_secs_f64()));
    }

    /// One model call of `size` requests.
    pub fn batch(&self, model: &str, version: u64, size: usize) {
        self.with(|m| {
            m.batch_sizes.entry((model.to_string(), version)).or_insert_with(|| Histogram::new(&BATCH_BUCKETS)).observe(size as f64)
        });
    }

    /// Queued images dropped before their model call (client gone, deadline passed).
    pub fn dropped_jobs(&self, n: usize) {
        self.with(|m| m.dropped_jobs += n as u64);
    }

    /// A connection the server closed, by reason (`header_timeout`, `idle_timeout`, `write_timeout`).
    pub fn connection_closed(&self, reason: &'static str) {
        self.with(|m| *m.connections_closed.entry(reason).or_default() += 1);
    }

    pub fn queue_depth(&self, model: &str, version: u64, depth: usize) {
        self.with(|m| {
            m.queue_depth.insert((model.to_string(), version), depth as i64);
        });
    }

    /// Current state of a model version (`None` removes it).
    pub fn version_state(&self, model: &str, version: u64, state: Option<&'static str>) {
        self.with(|m| {
            let key = (model.to_string(), version);
            match state {
                Some(s) => {
                    m.versions.insert(key, s);
                }
                None => {
                    m.versions.remove(&key);
                    m.queue_depth.remove(&key);
                }
            }
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|m| {
            let mut out = String::new();
            out.push_str("# HELP segctl_requests_total HTTP requests by route and status.\n# TYPE segctl_requests_total counter\n");
            for ((route, status), n) in &m.requests {
                let _ = writeln!(out, "segctl_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
            out.push_str("# HELP segctl_request_duration_seconds Request latency by route.\n# TYPE segctl_request_duration_seconds histogram\n");
            for (route, h) in &m.request_seconds {
                histogram(&mut out, "segctl_request_duration_seconds", &vec![("route", route.clone())], h);
            }
            out.push_str("# HELP segctl_stage_duration_seconds Time per processing stage (decode, resize, queue, inference, postprocess, encode).\n# TYPE segctl_stage_duration_seconds histogram\n");
            for (stage, h) in &m.stage_seconds {
                histogram(&mut out, "segctl_stage_duration_seconds", &vec![("stage", stage.to_string())], h);
            }
            out.push_str("# HELP segctl_batch_size Requests per model call.\n# TYPE segctl_batch_size histogram\n");
            for ((model, version), h) in &m.batch_sizes {
                histogram(&mut out, "segctl_batch_size", &vec![("model", model.clone()), ("version", version.to_string())], h);
            }
            out.push_str("# HELP segctl_queue_depth Requests waiting for a model call.\n# TYPE segctl_queue_depth gauge\n");
            for ((model, version), d) in &m.queue_depth {
                let _ = writeln!(out, "segctl_queue_depth{{model=\"{model}\",version=\"{version}\"}} {d}");
            }
            out.push_str("# HELP segctl_model_version_state Model versions known to the server (1 per version, labelled by state).\n# TYPE segctl_model_version_state gauge\n");
            for ((model, version), state) in &m.versions {
                let _ = writeln!(out, "segctl_model_version_state{{model=\"{model}\",version=\"{version}\",state=\"{state}\"}} 1");
            }
            out.push_str("# HELP segctl_dropped_jobs_total Queued images dropped before their model call (client gone or deadline passed).\n# TYPE segctl_dropped_jobs_total counter\n");
            let _ = writeln!(out, "segctl_dropped_jobs_total {}", m.dropped_jobs);
            out.push_str("# HELP segctl_connections_closed_total Connections the server closed, by reason.\n# TYPE segctl_connections_closed_total counter\n");
            for reason in ["header_timeout", "idle_timeout", "write_timeout"] {
                let _ = writeln!(out, "segctl_connections_closed_total{{reason=\"{reason}\"}} {}", m.connections_closed.get(reason).copied().unwrap_or(0));
            }
            let loaded = m.versions.values().filter(|s| **s == "AVAILABLE").count();
            out.push_str("# HELP segctl_loaded_model_versions Model versions serving.\n# TYPE segctl_loaded_model_versions gauge\n");
            let _ = writeln!(out, "segctl_loaded_model_versions {loaded}");
            out
        })
    }
}

fn label_text(labels: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    format!("{{{}}}", parts.join(","))
}

fn histogram(out: &mut String, name: &str, labels: &Labels, h: &Histogram) {
    for (b, c) in h.buckets.iter().zip(&h.counts) {
        let _ = writeln!(out, "{name}_bucket{} {c}", label_text(labels, Some(("le", format!("{b}")))));
    }
    let _ = writeln!(out, "{name}_bucket{} {}", label_text(labels, Some(("le", "+Inf".into()))), h.count);
    let _ = writeln!(out, "{name}_sum{} {}", label_text(labels, None), h.sum);
    let _ = writeln!(out, "{name}_count{} {}", label_text(labels, None), h.count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let m = Metrics::default();
        m.request("segment", 200, Duration::from_millis(20));
        m.batch("pets", 1, 3);
        m.version_state("pets", 1, Some("AVAILABLE"));
        let text = m.render();
        assert!(text.contains("segctl_requests_total{route=\"segment\",status=\"200\"} 1"));
        assert!(text.contains("segctl_batch_size_bucket{model=\"pets\",version=\"1\",le=\"4\"} 1"));
        assert!(text.contains("segctl_batch_size_bucket{model=\"pets\",version=\"1\",le=\"2\"} 0"));
        assert!(text.contains("segctl_loaded_model_versions 1"));
    }
}
