//! `[interceptor] metrics`: the daemon's counters in the Prometheus text format
//! at `/metrics` (README, "Metrics").
//!
//! Requests, their durations and bytes are counted by [`crate::record`], in the
//! same call that writes the request's log line, so the two always agree. Each
//! tenant's series are looked up once and kept beside its `status` counters
//! ([`TenantMetrics`]): a request then costs a few atomic adds and one
//! histogram observation, not a label lookup. Gauges (open connections, Worker
//! processes) are read when scraped, from what `status` reads.

mod serve;

use std::sync::OnceLock;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::logs::{LogEntry, Proto, Verdict};

pub use serve::{serve, Gauges};

/// Upper bounds (seconds) of the request duration buckets: from a judged-and-refused
/// request (well under a millisecond, logged as 0 ms) to a long-lived byte stream.
const DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    tenant: String,
    proto: &'static str,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    tenant: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabels {
    namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Every family the daemon counts into (the gauges are built per scrape).
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<TenantLabels, Histogram, fn() -> Histogram>,
    bytes: Family<BytesLabels, Counter>,
    log_lines: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "interceptor_requests",
            "Requests and connections judged, by tenant, protocol and decision (one per log line)",
            requests.clone(),
        );
        let duration: Family<TenantLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "interceptor_request_duration_seconds",
            "Time from the start of a request to its end, as the log's duration_ms",
            duration.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "interceptor_bytes",
            "Bytes relayed for a tenant: sent upstream, received from upstream",
            bytes.clone(),
        );
        let log_lines = Counter::default();
        registry.register(
            "interceptor_log_lines",
            "Lines written to tenant logs",
            log_lines.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        // Reloading the configuration is not built yet: both results are shown at
        // 0 so that dashboards and alerts on them can be set up now.
        for result in ["success", "failure"] {
            drop(reloads.get_or_create(&ReloadLabels { result }));
        }
        registry.register(
            "interceptor_config_reloads",
            "Configuration reloads, by result",
            reloads,
        );
        Metrics {
            registry,
            requests,
            duration,
            bytes,
            log_lines,
        }
    }

    /// The series of `tenant`, to keep and count into.
    pub fn tenant(&self, tenant: &str) -> TenantMetrics {
        let labels = TenantLabels {
            tenant: tenant.to_owned(),
        };
        let bytes = |direction| {
            self.bytes.get_or_create_owned(&BytesLabels {
                tenant: tenant.to_owned(),
                direction,
            })
        };
        TenantMetrics {
            tenant: tenant.to_owned(),
            requests: Default::default(),
            duration: self.duration.get_or_create_owned(&labels),
            sent: bytes("sent"),
            received: bytes("received"),
        }
    }

    /// Counts `lines` lines written to tenant logs.
    pub fn log_lines(&self, lines: u64) {
        self.log_lines.inc_by(lines);
    }

    /// The Prometheus text (version 0.0.4) of every family, with `gauges` as the
    /// values of the gauges now.
    pub fn encode(&self, gauges: &Gauges) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)?;
        // The gauges live in a registry of their own, built for this scrape: a
        // tenant or namespace that is gone is then simply absent.
        let mut now = Registry::default();
        let open = Family::<TenantLabels, Gauge>::default();
        for (tenant, n) in &gauges.open_connections {
            open.get_or_create(&TenantLabels {
                tenant: tenant.clone(),
            })
            .inc_by(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        now.register(
            "interceptor_open_connections",
            "Relay connections a tenant's sandboxes hold open now",
            open,
        );
        let workers = Family::<NamespaceLabels, Gauge>::default();
        for (namespace, n) in &gauges.worker_processes {
            workers
                .get_or_create(&NamespaceLabels {
                    namespace: namespace.clone(),
                })
                .inc_by(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        now.register(
            "interceptor_worker_processes",
            "User Worker processes running now, by dispatch namespace",
            workers,
        );
        prometheus_text::encode(&mut text, &now)?;
        Ok(text)
    }
}

/// One tenant's series: what [`crate::record::Recorder`] keeps per tenant.
pub struct TenantMetrics {
    tenant: String,
    /// By [`slot`]: created on first use, so that only the protocols and
    /// decisions a tenant has seen are shown.
    requests: [OnceLock<Counter>; SLOTS],
    duration: Histogram,
    sent: Counter,
    received: Counter,
}

const PROTOS: [Proto; 4] = [Proto::Http, Proto::Tls, Proto::Tcp, Proto::Dns];
const VERDICTS: [Verdict; 3] = [Verdict::Allow, Verdict::Block, Verdict::Error];
const SLOTS: usize = PROTOS.len() * VERDICTS.len();

fn slot(proto: Proto, decision: Verdict) -> usize {
    let p = match proto {
        Proto::Http => 0,
        Proto::Tls => 1,
        Proto::Tcp => 2,
        Proto::Dns => 3,
    };
    let d = match decision {
        Verdict::Allow => 0,
        Verdict::Block => 1,
        Verdict::Error => 2,
    };
    p * VERDICTS.len() + d
}

impl TenantMetrics {
    /// Counts the request `entry` logs (its tenant is this one).
    pub fn record(&self, metrics: &Metrics, entry: &LogEntry) {
        self.requests[slot(entry.proto, entry.decision)]
            .get_or_init(|| {
                metrics.requests.get_or_create_owned(&RequestLabels {
                    tenant: self.tenant.clone(),
                    proto: entry.proto.as_str(),
                    decision: entry.decision.as_str(),
                })
            })
            .inc();
        // The log's whole milliseconds, so that the two agree.
        self.duration.observe(entry.duration_ms as f64 / 1000.0);
        if entry.bytes_sent > 0 {
            self.sent.inc_by(entry.bytes_sent);
        }
        if entry.bytes_received > 0 {
            self.received.inc_by(entry.bytes_received);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tenant: &str, proto: Proto, decision: Verdict) -> LogEntry {
        let mut e = LogEntry::new(tenant, proto, "127.0.0.1:80".parse().unwrap())
            .with_decision(decision, "test");
        e.bytes_sent = 10;
        e.bytes_received = 250;
        e.duration_ms = 12;
        e
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn requests_are_counted_by_tenant_proto_and_decision_with_the_logs_words() {
        let m = Metrics::new();
        let acme = m.tenant("acme");
        for _ in 0..3 {
            acme.record(&m, &entry("acme", Proto::Http, Verdict::Allow));
        }
        acme.record(&m, &entry("acme", Proto::Tls, Verdict::Block));
        let text = m.encode(&Gauges::default()).unwrap();
        assert!(
            text.contains(
                r#"interceptor_requests_total{tenant="acme",proto="http",decision="allow"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"interceptor_requests_total{tenant="acme",proto="tls",decision="block"} 1"#
            ),
            "{text}"
        );
        // Only what was seen: no zero series for every combination.
        assert!(line(
            &text,
            r#"interceptor_requests_total{tenant="acme",proto="dns""#
        )
        .is_none());
        assert!(text.contains(r#"interceptor_bytes_total{tenant="acme",direction="sent"} 40"#));
        assert!(
            text.contains(r#"interceptor_bytes_total{tenant="acme",direction="received"} 1000"#)
        );
        assert!(text.contains(r#"interceptor_request_duration_seconds_count{tenant="acme"} 4"#));
        assert!(
            text.contains(
                r#"interceptor_request_duration_seconds_bucket{tenant="acme",le="0.01"} 0"#
            ) && text.contains(
                r#"interceptor_request_duration_seconds_bucket{tenant="acme",le="0.025"} 4"#
            ),
            "{text}"
        );
    }

    #[test]
    fn reloads_are_shown_at_zero_for_both_results() {
        let text = Metrics::new().encode(&Gauges::default()).unwrap();
        assert!(text.contains(r#"interceptor_config_reloads_total{result="success"} 0"#));
        assert!(text.contains(r#"interceptor_config_reloads_total{result="failure"} 0"#));
        assert!(text.contains("interceptor_log_lines_total 0"));
    }

    #[test]
    fn gauges_show_what_they_are_given_and_nothing_left_from_an_earlier_scrape() {
        let m = Metrics::new();
        let text = m
            .encode(&Gauges {
                open_connections: vec![("acme".into(), 2), ("beta".into(), 0)],
                worker_processes: vec![("customers".into(), 3)],
            })
            .unwrap();
        assert!(text.contains(r#"interceptor_open_connections{tenant="acme"} 2"#));
        assert!(text.contains(r#"interceptor_open_connections{tenant="beta"} 0"#));
        assert!(text.contains(r#"interceptor_worker_processes{namespace="customers"} 3"#));
        let text = m
            .encode(&Gauges {
                open_connections: vec![("beta".into(), 1)],
                worker_processes: vec![],
            })
            .unwrap();
        assert!(!text.contains(r#"tenant="acme""#), "{text}");
        assert!(text.contains(r#"interceptor_open_connections{tenant="beta"} 1"#));
    }
}
