//! `GET /metrics`: the figures move as a small build runs (jobs by state, the queue,
//! the histograms, bytes, a lost lease, webhook failures), and `promtool check
//! metrics` (Debian's `prometheus` package) passes on the output, in both formats the
//! server speaks. The example alert rules in docs/operations.md pass `promtool check
//! rules`.

use crate::common::{
    http, text, wait_for_gate, wait_until, write_build_notifying, Harness, Job, Server,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

const PROMTOOL: &str = "promtool";

/// The samples of an exposition: `name{labels}` → value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

pub fn scrape(server: &Server, accept: Option<&str>) -> (String, String) {
    let auth = format!("Bearer {}", server.admin_token());
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(accept) = accept {
        headers.push(("Accept", accept));
    }
    let response = crate::common::raw_http(&server.url, "GET", "/metrics", &headers, b"");
    assert_eq!(response.status, 200, "{response:?}");
    let content_type = response
        .head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (content_type, response.body)
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in:\n{samples:#?}"))
}

/// Runs `promtool ARGS` with `input` on its standard input (if any); fails saying what
/// to install when promtool is missing.
fn promtool(args: &[&str], input: &str) -> (bool, String) {
    let mut child = Command::new(PROMTOOL)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run {PROMTOOL} ({err}): install Debian's prometheus package \
                 (apt-get install prometheus), as .ci/run does"
            )
        });
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(input.as_bytes())
        .expect("writing to promtool");
    let output = child.wait_with_output().expect("waiting for promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

#[test]
fn metrics_move_as_a_build_runs_and_promtool_accepts_them() {
    let harness = Harness::new("metrics");
    let server = harness.start_server("main", &["--lease-secs", "3", "--heartbeat-secs", "1"]);
    let (_, before) = scrape(&server, None);
    let before = samples(&before);
    assert_eq!(value(&before, "kiln_jobs{state=\"finished\"}"), 0.0);
    // SQLite has no batches to count (its writes go in groups, uncounted).
    assert!(!before.contains_key("kiln_store_calls_batched_total"));
    assert_eq!(
        value(&before, "kiln_leases_lost_total{cause=\"connection_lost\"}"),
        0.0
    );
    assert_eq!(value(&before, "kiln_webhook_failures_total"), 0.0);

    // Two jobs that finish, one that waits on a gate, with a webhook nobody answers.
    let gate = harness.path().join("gate");
    let build = server.submit(&write_build_notifying(
        &harness.mkdir("build"),
        "1500",
        &["http://127.0.0.1:9/nobody-listens"],
        &[
            Job::new("a", "PRO"),
            Job::new("b", "PRO"),
            Job::new("held", "SRV").install(&wait_for_gate(&gate)),
        ],
    ));
    let (_, queued) = scrape(&server, None);
    let queued = samples(&queued);
    assert_eq!(value(&queued, "kiln_jobs{state=\"queued\"}"), 3.0);
    assert_eq!(value(&queued, "kiln_queue_depth{config_type=\"PRO\"}"), 2.0);
    assert_eq!(
        value(&queued, "kiln_queue_clients{config_type=\"PRO\"}"),
        0.0
    );

    let mut client = harness.start_client("runner", &[&server], &["--include", "*"]);
    for job in ["a", "b"] {
        server.wait_for_job(&build, job, "finished", |status| {
            text(status, "state") == "finished"
        });
    }
    server.wait_for_job(&build, "held", "running", |status| {
        text(status, "state") == "running"
    });
    let (_, running) = scrape(&server, None);
    let running = samples(&running);
    assert_eq!(value(&running, "kiln_jobs{state=\"finished\"}"), 2.0);
    assert_eq!(value(&running, "kiln_jobs{state=\"running\"}"), 1.0);
    assert_eq!(
        value(&running, "kiln_queue_running{config_type=\"SRV\"}"),
        1.0
    );
    assert_eq!(
        value(&running, "kiln_queue_clients{config_type=\"SRV\"}"),
        1.0
    );
    assert_eq!(
        value(
            &running,
            "kiln_dispatch_latency_seconds_count{config_type=\"PRO\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &running,
            "kiln_job_duration_seconds_count{config_type=\"PRO\",outcome=\"finished\"}"
        ),
        2.0
    );
    assert!(
        value(
            &running,
            "kiln_job_duration_seconds_sum{config_type=\"PRO\",outcome=\"finished\"}"
        ) > 0.0
    );
    assert_eq!(value(&running, "kiln_upload_duration_seconds_count"), 2.0);
    assert!(value(&running, "kiln_bytes_received_total") > 0.0);
    assert!(value(&running, "kiln_bytes_stored") > 0.0);
    assert!(value(&running, "kiln_image_bytes") > 0.0);
    assert!(value(&running, "kiln_data_size_bytes") > 0.0);
    assert_eq!(
        value(
            &running,
            "kiln_worker_state{worker=\"dispatcher\",state=\"failed\"}"
        ),
        0.0
    );
    // Each finished job queued a notice for a URL where nobody listens.
    wait_until(
        harness.path(),
        "a webhook failure to be counted",
        || {
            let (_, now) = scrape(&server, None);
            (value(&samples(&now), "kiln_webhook_failures_total") >= 1.0).then_some(())
        },
        || scrape(&server, None).1,
    );

    // The client dies holding a job: its lease is lost.
    client.process.kill();
    wait_until(
        harness.path(),
        "the dead client's lease to be counted lost",
        || {
            let (_, now) = scrape(&server, None);
            let now = samples(&now);
            let lost: f64 = ["connection_lost", "lease_lapsed"]
                .iter()
                .map(|cause| {
                    value(
                        &now,
                        &format!("kiln_leases_lost_total{{cause=\"{cause}\"}}"),
                    )
                })
                .sum();
            (lost >= 1.0).then_some(())
        },
        || scrape(&server, None).1,
    );
    let (_, after) = scrape(&server, None);
    let after = samples(&after);
    assert_eq!(value(&after, "kiln_jobs{state=\"queued\"}"), 1.0);
    assert!(value(&after, "kiln_queue_oldest_age_seconds{config_type=\"SRV\"}") >= 0.0);

    // Both formats pass promtool's checks.
    let (content_type, text_format) = scrape(&server, None);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let (ok, said) = promtool(&["check", "metrics"], &text_format);
    assert!(
        ok,
        "promtool check metrics refused the text format: {said}\n{text_format}"
    );
    let (content_type, openmetrics) =
        scrape(&server, Some("application/openmetrics-text; version=1.0.0"));
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");

    // Nobody without the admin credential reads them.
    let anonymous = http(&server.url, "GET", "/metrics", &[], None).expect("GET /metrics");
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
}

#[test]
fn the_example_alert_rules_in_the_docs_pass_promtool() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    let operations = std::fs::read_to_string(docs.join("operations.md")).expect("operations.md");
    let rules = std::fs::read_to_string(docs.join("kiln-alerts.yml")).expect("kiln-alerts.yml");
    let block = operations
        .split("### Example alert rules")
        .nth(1)
        .and_then(|rest| rest.split("```yaml\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("an alert rules block in docs/operations.md");
    assert!(
        rules.ends_with(block),
        "docs/kiln-alerts.yml differs from the rules in docs/operations.md"
    );
    let path = docs.join("kiln-alerts.yml").display().to_string();
    let (ok, said) = promtool(&["check", "rules", &path], "");
    assert!(ok, "promtool check rules: {said}");
}
