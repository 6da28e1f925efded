//! Bounded attempts: a job whose clients keep dying fails as `lost` after MAXATTEMPTS
//! lost runs; a script failure is queued again only when RETRIES asks for it.

use crate::common::{
    events_of, kill_process_group, state_file_pgids, text, wait_for_gate, wait_until, write_build,
    Harness, Job,
};

#[test]
fn job_whose_client_is_killed_on_each_of_its_max_attempts_fails_as_lost() {
    let harness = Harness::new("max-attempts");
    let server = harness.start_server("main", &[]);
    // Every run waits at a gate that the test never opens.
    let gate = harness.path().join("gate");
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1300",
        &[Job::new("doomed", "PRO")
            .install(&wait_for_gate(&gate))
            .max_attempts(2)],
    ));

    let mut orphan_pgids = Vec::new();
    for (run_idx, client_id) in ["first", "second"].into_iter().enumerate() {
        let mut client = harness.start_client(client_id, &[&server], &["--include", "*"]);
        let held = wait_until(
            harness.path(),
            &format!("{client_id} to run the job's step"),
            || {
                client
                    .held_job(&build, "doomed")
                    .filter(|held| held["pgid"].is_i64())
            },
            || format!("{:?} / {:#}", client.state(), server.job(&build, "doomed")),
        );
        assert_eq!(held["attempt"], run_idx + 1, "{held:#}");
        orphan_pgids.extend(state_file_pgids(&client.work_dir));
        client.process.kill();
        let job = server.wait_for_job(&build, "doomed", "to be taken back", |job| {
            text(job, "state") != "running"
        });
        if run_idx == 0 {
            assert_eq!(
                text(&job, "state"),
                "queued",
                "one lost run of two is survived: {job:#}"
            );
        } else {
            assert_eq!(
                text(&job, "state"),
                "failed",
                "the second lost run fails the job: {job:#}"
            );
            assert!(
                text(&job, "error").starts_with("lost:"),
                "the error starts with lost: {job:#}"
            );
        }
    }
    for pgid in orphan_pgids {
        kill_process_group(pgid);
    }

    let events = server.events(&build);
    let job_events = events_of(&events, "doomed");
    let n_claims = job_events
        .iter()
        .filter(|event| event["to"] == "running")
        .count();
    assert_eq!(n_claims, 2, "two runs, no third: {events:#?}");
    let last = job_events.last().expect("events");
    assert_eq!(last["from"], "running", "{events:#?}");
    assert_eq!(last["to"], "failed", "{events:#?}");
    assert!(text(last, "reason").starts_with("lost:"), "{last:#}");

    // A fresh client does not get the failed job.
    let _third = harness.start_client("third", &[&server], &["--include", "*"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let job = server.job(&build, "doomed");
    assert_eq!(text(&job, "state"), "failed", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
}

#[test]
fn script_failure_is_run_again_only_with_retries() {
    let harness = Harness::new("retries");
    let server = harness.start_server("main", &[]);
    // Each job's install fails on its first run only: a marker per job remembers it.
    let markers = harness.mkdir("markers");
    let install = format!(
        "marker='{markers}'/\"$KILN_JOB_ID\"\n\
         if [ ! -e \"$marker\" ]; then\n\
         : > \"$marker\"\n\
         echo 'first run: the install breaks'\n\
         exit 3\n\
         fi\n\
         echo 'later run: the install works'\n",
        markers = markers.display(),
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1310",
        &[
            Job::new("retried", "PRO").install(&install).retries(1),
            Job::new("not-retried", "PRO").install(&install),
        ],
    ));
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);
    let jobs = server.wait_for_build_end(&build);
    let by_id = |id: &str| {
        jobs.iter()
            .find(|job| job["id"] == id)
            .unwrap_or_else(|| panic!("no job {id}: {jobs:#?}"))
    };

    let retried = by_id("retried");
    assert_eq!(text(retried, "state"), "finished", "{retried:#}");
    assert_eq!(retried["attempt"], 2, "{retried:#}");
    let not_retried = by_id("not-retried");
    assert_eq!(text(not_retried, "state"), "failed", "{not_retried:#}");
    assert_eq!(not_retried["attempt"], 1, "{not_retried:#}");
    assert!(
        text(not_retried, "error").starts_with("exit"),
        "the error is the script's exit: {not_retried:#}"
    );

    let events = server.events(&build);
    let retried_events = events_of(&events, "retried");
    let transitions: Vec<(String, String)> = retried_events
        .iter()
        .map(|event| (event["from"].to_string(), event["to"].to_string()))
        .collect();
    assert_eq!(
        transitions,
        [
            ("null", "\"queued\""),
            ("\"queued\"", "\"running\""),
            ("\"running\"", "\"queued\""),
            ("\"queued\"", "\"running\""),
            ("\"running\"", "\"finished\""),
        ]
        .map(|(from, to)| (from.to_owned(), to.to_owned())),
        "{events:#?}"
    );
    let requeue = retried_events[2];
    let reason = text(requeue, "reason");
    assert!(
        reason.starts_with("exit") && reason.contains("retry 1 of 1"),
        "the requeue says it is retry 1 of 1 after an exit: {requeue:#}"
    );

    let not_retried_events = events_of(&events, "not-retried");
    let n_claims = not_retried_events
        .iter()
        .filter(|event| event["to"] == "running")
        .count();
    assert_eq!(n_claims, 1, "one run only: {events:#?}");
    let last = not_retried_events.last().expect("events");
    assert_eq!(last["to"], "failed", "{events:#?}");
}
