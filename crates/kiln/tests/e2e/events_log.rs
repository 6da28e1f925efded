//! The build's event log as `kiln events` prints it: one JSON event per line, in order,
//! with every transition of a job's life; and `-f` follows transitions as they happen.

use crate::common::{text, wait_for_gate, wait_until, write_build, Harness, Job};
use serde_json::Value;

#[test]
fn events_json_lists_a_finished_jobs_transitions_in_order_with_client_and_attempt() {
    let harness = Harness::new("events-json");
    let server = harness.start_server("main", &[]);
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1200",
        &[Job::new("only", "PRO")],
    ));
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || format!("the job finishes: {waited:?}"));

    let run = server.kiln(&["events", &build, "--json"]);
    harness.check(run.code == 0, || {
        format!("kiln events --json failed: {run:?}")
    });
    let events: Vec<Value> = run
        .stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("a line that is not JSON ({err}): {line:?}"))
        })
        .collect();
    let seqs: Vec<i64> = events
        .iter()
        .map(|event| event["seq"].as_i64().expect("an integer seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|pair| pair[0] < pair[1]),
        "seq strictly increases: {seqs:?}"
    );
    let times: Vec<i64> = events
        .iter()
        .map(|event| event["time"].as_i64().expect("an integer time"))
        .collect();
    assert!(
        times.windows(2).all(|pair| pair[0] <= pair[1]),
        "time does not go back: {times:?}"
    );
    let transitions: Vec<(Value, Value)> = events
        .iter()
        .map(|event| (event["from"].clone(), event["to"].clone()))
        .collect();
    assert_eq!(
        transitions,
        [
            (Value::Null, "queued".into()),
            ("queued".into(), "running".into()),
            ("running".into(), "finished".into()),
        ],
        "{events:#?}"
    );
    for event in &events {
        assert_eq!(event["build"], build.as_str(), "{event:#}");
        assert_eq!(event["job"], "only", "{event:#}");
    }
    for event in &events[1..] {
        assert_eq!(event["client_id"], "runner", "{event:#}");
        assert_eq!(event["attempt"], 1, "{event:#}");
        assert!(!text(event, "reason").is_empty(), "{event:#}");
    }
}

#[test]
fn events_follow_prints_a_transition_that_happens_while_it_follows() {
    let harness = Harness::new("events-follow");
    let server = harness.start_server("main", &[]);
    let gate = harness.path().join("gate");
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1210",
        &[Job::new("held", "PRO").install(&wait_for_gate(&gate))],
    ));
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);
    server.wait_for_job(&build, "held", "running", |job| {
        text(job, "state") == "running"
    });

    let (mut follower, output) = server.spawn_kiln("events-follow", &["events", &build, "-f"]);
    let transition_line = |from: &str, to: &str| {
        let output = output.clone();
        let needle = format!("{from} -> {to}");
        move || {
            let printed = std::fs::read_to_string(&output).unwrap_or_default();
            printed
                .lines()
                .find(|line| {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    words.windows(3).any(|w| w.join(" ") == needle)
                })
                .map(str::to_owned)
        }
    };
    let observe = || std::fs::read_to_string(&output).unwrap_or_default();
    // What happened before it started: printed at once.
    let claimed = wait_until(
        harness.path(),
        "the follower to print the claim",
        transition_line("queued", "running"),
        observe,
    );
    assert!(claimed.contains("client=runner"), "{claimed}");
    assert!(
        transition_line("running", "finished")().is_none(),
        "the job has not finished yet: {}",
        observe()
    );

    std::fs::write(&gate, "").expect("opening the gate");
    let finished = wait_until(
        harness.path(),
        "the follower to print the job finishing",
        transition_line("running", "finished"),
        observe,
    );
    assert!(finished.contains(" held "), "{finished}");
    assert!(finished.contains("client=runner"), "{finished}");
    assert!(
        follower.is_running(),
        "a follower keeps following after the build ends"
    );
    follower.kill();
}
