//! Metrics, through the Prometheus project's Rust client (`prometheus-client`).
//!
//! Two kinds of figures:
//! - [`Metrics`]: what happens, counted as it happens (histograms of dispatch latency,
//!   run duration and upload duration; lost leases, timeouts, webhook failures). The
//!   farm owns one and records into it.
//! - [`Scrape`]: what is, read at each scrape (jobs by state, the queue per config
//!   type, storage, the disk, clients, workers), into a registry of its own.
//!
//! [`Metrics::render`] writes both as OpenMetrics 1.0 text, or as Prometheus's text
//! format 0.0.4 ([`to_prometheus_text`]), which is what `promtool check metrics`
//! reads and what a scraper that does not ask for OpenMetrics gets.

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A metric's labels.
pub type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// An upload phase not ended within this long is forgotten (its run was lost).
const UPLOAD_FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Buckets from 50 ms to about 3.6 hours: dispatch waits and runs.
fn long_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 3.0, 11))
}

/// Buckets from 10 ms to about 10 minutes: uploads.
fn upload_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 3.0, 11))
}

/// Why a lease was lost, as the `cause` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostLease {
    /// No heartbeat within the lease.
    Lapsed,
    /// The client's session connection dropped and it did not come back.
    ConnectionLost,
    /// The client gave the job back (restart, stop, reset).
    GivenUp,
}

impl LostLease {
    fn as_str(self) -> &'static str {
        match self {
            LostLease::Lapsed => "lease_lapsed",
            LostLease::ConnectionLost => "connection_lost",
            LostLease::GivenUp => "given_up",
        }
    }
}

/// What the farm counts as it happens.
pub struct Metrics {
    registry: Registry,
    dispatch_latency: Histograms,
    run_duration: Histograms,
    upload_duration: Histogram,
    leases_lost: Family<Labels, Counter>,
    timeouts: Counter,
    webhook_failures: Counter,
    webhooks_given_up: Counter,
    /// Runs whose steps are done and whose images upload, by lease: since when.
    uploading: Mutex<HashMap<String, Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let dispatch_latency = Histograms::new_with_constructor(long_buckets);
        let run_duration = Histograms::new_with_constructor(long_buckets);
        let upload_duration = upload_buckets();
        let leases_lost = Family::<Labels, Counter>::default();
        let timeouts = Counter::default();
        let webhook_failures = Counter::default();
        let webhooks_given_up = Counter::default();
        registry.register(
            "kiln_dispatch_latency_seconds",
            "From a job becoming queued to a client claiming it, by config type.",
            dispatch_latency.clone(),
        );
        registry.register(
            "kiln_job_duration_seconds",
            "From claim to the end of a run, by config type and outcome (finished, failed).",
            run_duration.clone(),
        );
        registry.register(
            "kiln_upload_duration_seconds",
            "From a run's steps being done to its images being stored and the job finished.",
            upload_duration.clone(),
        );
        registry.register(
            "kiln_leases_lost",
            "Runs taken back from their client, by cause (lease_lapsed, connection_lost, \
             given_up).",
            leases_lost.clone(),
        );
        registry.register(
            "kiln_jobs_timed_out",
            "Jobs failed because their client held them past their timeout and the hung grace.",
            timeouts.clone(),
        );
        registry.register(
            "kiln_webhook_failures",
            "Webhook deliveries that failed (each try).",
            webhook_failures.clone(),
        );
        registry.register(
            "kiln_webhooks_given_up",
            "Webhook notices given up after their last try.",
            webhooks_given_up.clone(),
        );
        // Every cause shows from the start, so that rates work before the first loss.
        for cause in [
            LostLease::Lapsed,
            LostLease::ConnectionLost,
            LostLease::GivenUp,
        ] {
            let _ = leases_lost.get_or_create(&vec![("cause", cause.as_str().to_owned())]);
        }
        Metrics {
            registry,
            dispatch_latency,
            run_duration,
            upload_duration,
            leases_lost,
            timeouts,
            webhook_failures,
            webhooks_given_up,
            uploading: Mutex::new(HashMap::new()),
        }
    }

    /// A client claimed a job of `config_type` that had waited `waited_micros`.
    pub fn claimed(&self, config_type: &str, waited_micros: i64) {
        self.dispatch_latency
            .get_or_create(&vec![("config_type", config_type.to_owned())])
            .observe(seconds(waited_micros));
    }

    /// A run ended as `outcome` after `micros`.
    pub fn run_ended(&self, config_type: &str, outcome: &str, micros: i64) {
        self.run_duration
            .get_or_create(&vec![
                ("config_type", config_type.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .observe(seconds(micros));
    }

    /// The run under `lease` has done its steps: its upload begins (the first time
    /// this is said).
    pub fn steps_done(&self, lease: &str) {
        let now = Instant::now();
        let mut uploading = self.uploading.lock().expect("uploading lock");
        uploading.retain(|_, since| now.duration_since(*since) < UPLOAD_FORGET_AFTER);
        uploading.entry(lease.to_owned()).or_insert(now);
    }

    /// The run under `lease` ended; `finished` when its images were stored.
    pub fn run_over(&self, lease: &str, finished: bool) {
        let since = self.uploading.lock().expect("uploading lock").remove(lease);
        if let (Some(since), true) = (since, finished) {
            self.upload_duration.observe(since.elapsed().as_secs_f64());
        }
    }

    /// A lease was lost.
    pub fn lease_lost(&self, cause: LostLease) {
        self.leases_lost
            .get_or_create(&vec![("cause", cause.as_str().to_owned())])
            .inc();
    }

    /// A job was failed for being held past its timeout.
    pub fn timed_out(&self) {
        self.timeouts.inc();
    }

    /// A webhook delivery failed; `given_up` when it was its last try.
    pub fn webhook_failed(&self, given_up: bool) {
        self.webhook_failures.inc();
        if given_up {
            self.webhooks_given_up.inc();
        }
    }

    /// The whole exposition: these metrics and the scrape's, as OpenMetrics text.
    pub fn render(&self, scrape: &Scrape) -> String {
        let mut text = String::new();
        // Writing to a String does not fail.
        let _ = encode_registry(&mut text, &scrape.registry);
        let _ = encode_registry(&mut text, &self.registry);
        let _ = encode_eof(&mut text);
        text
    }
}

fn seconds(micros: i64) -> f64 {
    micros.max(0) as f64 / 1e6
}

/// The figures read at one scrape, in a registry of their own.
#[derive(Default)]
pub struct Scrape {
    registry: Registry,
}

impl Scrape {
    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        let gauge = FloatGauge::default();
        gauge.set(value);
        self.registry.register(name, help, gauge);
    }

    /// A gauge with one series per label set.
    pub fn gauges(&mut self, name: &str, help: &str, series: Vec<(Labels, f64)>) {
        let family = Family::<Labels, FloatGauge>::default();
        for (labels, value) in series {
            family.get_or_create(&labels).set(value);
        }
        self.registry.register(name, help, family);
    }

    /// A counter that the store keeps (its value is read, not counted here). `name`
    /// goes without `_total`: the encoding adds it.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        self.registry.register(name, help, counter);
    }

    /// A counter with one series per label set.
    pub fn counters(&mut self, name: &str, help: &str, series: Vec<(Labels, u64)>) {
        let family = Family::<Labels, Counter>::default();
        for (labels, value) in series {
            family.get_or_create(&labels).inc_by(value);
        }
        self.registry.register(name, help, family);
    }
}

/// OpenMetrics text as Prometheus's text format 0.0.4: a counter's `HELP` and `TYPE`
/// name its samples (`x_total`, where OpenMetrics names the family `x`), and there is
/// no `# EOF` or `# UNIT` line.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| line.strip_prefix(prefix).map(|rest| (prefix, rest)));
        if let Some((prefix, rest)) = comment {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                text.push_str(prefix);
                text.push_str(name);
                text.push_str("_total ");
                text.push_str(tail);
                text.push('\n');
                continue;
            }
        }
        text.push_str(line);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_take_their_total_name_in_the_prometheus_text_format() {
        let metrics = Metrics::new();
        metrics.lease_lost(LostLease::Lapsed);
        metrics.claimed("winxp-pro", 2_500_000);
        let mut scrape = Scrape::default();
        scrape.counter("kiln_bytes_received", "Bytes.", 42);
        scrape.gauge("kiln_images", "Images.", 3.0);
        let open = metrics.render(&scrape);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(
            open.contains("# TYPE kiln_bytes_received counter\n"),
            "{open}"
        );
        let text = to_prometheus_text(&open);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains(
                "# TYPE kiln_bytes_received_total counter\nkiln_bytes_received_total 42\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("kiln_leases_lost_total{cause=\"lease_lapsed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kiln_dispatch_latency_seconds_count{config_type=\"winxp-pro\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("kiln_images 3.0\n"), "{text}");
    }

    #[test]
    fn an_upload_is_timed_from_steps_done_to_finish_only() {
        let metrics = Metrics::new();
        metrics.steps_done("lease-a");
        metrics.steps_done("lease-a");
        metrics.steps_done("lease-b");
        metrics.run_over("lease-a", true);
        metrics.run_over("lease-b", false);
        metrics.run_over("lease-c", true);
        assert!(metrics.uploading.lock().unwrap().is_empty());
        let text = to_prometheus_text(&metrics.render(&Scrape::default()));
        assert!(
            text.contains("kiln_upload_duration_seconds_count 1\n"),
            "{text}"
        );
    }
}
