//! Which client runs which job, and in what order: config types, assigned clients,
//! priority, with clients serving several servers.

use crate::common;

use crate::common::{text, wait_for_gate, write_build, Harness, Job};

#[test]
fn each_config_type_runs_only_on_clients_that_include_it_across_two_servers() {
    let harness = Harness::new("include");
    // Both servers accept one client credential, so that one client serves both.
    let shared_token = harness.path().join("client.secret");
    std::fs::write(&shared_token, "shared-client-secret-for-the-test\n").expect("writing a token");
    let server_one = harness.start_server_with_client_token("one", Some(&shared_token), &[]);
    let server_two = harness.start_server_with_client_token("two", Some(&shared_token), &[]);
    let _client_pro = harness.start_client("A", &[&server_one, &server_two], &["--include", "PRO"]);
    let _client_home =
        harness.start_client("B", &[&server_one, &server_two], &["--include", "HOME"]);

    let mixed = |prefix: &str| {
        vec![
            Job::new(&format!("{prefix}-pro-1"), "PRO"),
            Job::new(&format!("{prefix}-home-1"), "HOME"),
            Job::new(&format!("{prefix}-home-2"), "HOME"),
            Job::new(&format!("{prefix}-pro-2"), "PRO"),
            Job::new(&format!("{prefix}-pro-3"), "PRO"),
            Job::new(&format!("{prefix}-home-3"), "HOME"),
        ]
    };
    let build_one = server_one.submit(&write_build(&harness.mkdir("b1"), "100", &mixed("s1")));
    let build_two = server_two.submit(&write_build(&harness.mkdir("b2"), "200", &mixed("s2")));

    for (server, build) in [(&server_one, &build_one), (&server_two, &build_two)] {
        let waited = server.kiln(&["wait", build, "--timeout", "60"]);
        harness.check(waited.code == 0, || {
            format!(
                "kiln wait {build} on server {} should exit 0: {waited:?}",
                server.name
            )
        });
        let jobs = server.status_json(build);
        assert_eq!(jobs.len(), 6, "build {build} has its six jobs: {jobs:#?}");
        for job in &jobs {
            let expected_client = match text(job, "config_type") {
                "PRO" => "A",
                "HOME" => "B",
                other => panic!("unexpected config type {other}"),
            };
            assert_eq!(
                text(job, "client_id"),
                expected_client,
                "a {} job runs on the client that includes it: {job:#}",
                text(job, "config_type")
            );
            assert_eq!(text(job, "state"), "finished", "{job:#}");
        }
    }
}

#[test]
fn a_job_assigned_to_a_client_waits_for_it_while_another_client_is_idle() {
    let harness = Harness::new("assigned");
    let server = harness.start_server("main", &[]);
    let mut client_a = harness.start_client("A", &[&server], &["--include", "*"]);

    // The assigned job comes first by priority: A must pass it over to take the other.
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "300",
        &[
            Job::new("for-b", "PRO").priority(10).assigned_to("B"),
            Job::new("anyone", "PRO"),
        ],
    ));
    let anyone = server.wait_for_job(&build, "anyone", "finished", |job| {
        text(job, "state") == "finished"
    });
    assert_eq!(text(&anyone, "client_id"), "A", "{anyone:#}");
    // A has nothing left it may take: it is idle, and the assigned job still waits.
    let for_b = server.job(&build, "for-b");
    assert_eq!(
        text(&for_b, "state"),
        "queued",
        "the job assigned to B is not taken by A: {for_b:#}"
    );
    assert!(client_a.process.is_running(), "client A is still up");

    let _client_b = harness.start_client("B", &[&server], &["--include", "*"]);
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("kiln wait {build} should exit 0: {waited:?}")
    });
    let for_b = server.status_of(&build, "for-b");
    assert_eq!(
        text(&for_b, "client_id"),
        "B",
        "the assigned job ran on B: {for_b:#}"
    );
    assert!(client_a.process.is_running(), "client A stayed up, idle");
}

#[test]
fn one_slot_client_runs_jobs_by_priority_then_file_order() {
    let harness = Harness::new("priority");
    let server = harness.start_server("main", &[]);
    // File order is not priority order; the two without PRIORITY have priority 0 and
    // keep their file order between 5 and -3.
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "400",
        &[
            Job::new("p5", "PRO").priority(5),
            Job::new("none-first", "PRO"),
            Job::new("p20", "PRO").priority(20),
            Job::new("minus3", "PRO").priority(-3),
            Job::new("none-second", "PRO"),
            Job::new("p10", "PRO").priority(10),
        ],
    ));
    // Every job is queued before the client asks for its first.
    let _client = harness.start_client("solo", &[&server], &["--include", "*", "--slots", "1"]);
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("kiln wait {build} should exit 0: {waited:?}")
    });

    let mut jobs = server.status_json(&build);
    for job in &jobs {
        assert!(job["time_start"].is_i64(), "{job:#}");
        assert_eq!(
            job["attempt"], 1,
            "each job ran once, so its start is its only one: {job:#}"
        );
    }
    jobs.sort_by_key(|job| job["time_start"].as_i64());
    let started: Vec<&str> = jobs.iter().map(|job| text(job, "id")).collect();
    assert_eq!(
        started,
        ["p20", "p10", "p5", "none-first", "none-second", "minus3"],
        "jobs start by priority, then file order"
    );
}

#[test]
fn job_nobody_accepts_within_its_deadline_expires_and_is_not_run_later() {
    let harness = Harness::new("expire");
    let server = harness.start_server("main", &[]);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "450",
        &[Job::new("late", "PRO").accept_within(1)],
    ));
    // No client takes PRO: the deadline passes.
    let _home_only = harness.start_client("home-only", &[&server], &["--include", "HOME"]);
    let job = server.wait_for_job(&build, "late", "to leave the queue", |job| {
        text(job, "state") != "queued"
    });
    assert_eq!(text(&job, "state"), "expired", "{job:#}");
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    assert_eq!(
        waited.code, 1,
        "kiln wait exits 1 for an expired job: {waited:?}"
    );

    // A client that could have run it comes too late; the job stays expired.
    let _pro = harness.start_client("pro", &[&server], &["--include", "PRO"]);
    let check = server.submit(&write_build(
        &harness.mkdir("after"),
        "451",
        &[Job::new("on-time", "PRO")],
    ));
    let waited = server.kiln(&["wait", &check, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("the PRO client runs jobs: {waited:?}")
    });
    let job = server.status_of(&build, "late");
    assert_eq!(text(&job, "state"), "expired", "{job:#}");
    assert!(job["client_id"].is_null(), "{job:#}");
}

#[test]
fn one_slot_client_serving_two_servers_never_runs_two_jobs_at_once() {
    let harness = Harness::new("slots");
    let shared_token = harness.path().join("client.secret");
    std::fs::write(&shared_token, "shared-client-secret-for-the-test\n").expect("writing a token");
    let server_one = harness.start_server_with_client_token("one", Some(&shared_token), &[]);
    let server_two = harness.start_server_with_client_token("two", Some(&shared_token), &[]);
    let gate = harness.path().join("gate");
    let gated = || Job::new("gated", "PRO").install(&wait_for_gate(&gate));
    let build_one = server_one.submit(&write_build(&harness.mkdir("b1"), "460", &[gated()]));
    let build_two = server_two.submit(&write_build(&harness.mkdir("b2"), "470", &[gated()]));
    let _client = harness.start_client(
        "single",
        &[&server_one, &server_two],
        &["--include", "*", "--slots", "1"],
    );

    common::wait_until(
        harness.path(),
        "one of the two jobs to run",
        || {
            let running = |server: &common::Server, build: &str| {
                text(&server.job(build, "gated"), "state") == "running"
            };
            (running(&server_one, &build_one) || running(&server_two, &build_two)).then_some(())
        },
        || {
            format!(
                "{:#} {:#}",
                server_one.job(&build_one, "gated"),
                server_two.job(&build_two, "gated")
            )
        },
    );
    // Give a client that ignores its slot count time to take the other job too; a
    // correct one takes it only after the first ended.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::write(&gate, "").expect("opening the gate");

    let one = server_one.wait_for_build_end(&build_one).remove(0);
    let two = server_two.wait_for_build_end(&build_two).remove(0);
    for job in [&one, &two] {
        assert_eq!(text(job, "state"), "finished", "{job:#}");
    }
    let span = |job: &serde_json::Value| {
        (
            job["time_start"].as_i64().expect("time_start"),
            job["time_complete"].as_i64().expect("time_complete"),
        )
    };
    let (mut first, mut second) = (span(&one), span(&two));
    if second.0 < first.0 {
        std::mem::swap(&mut first, &mut second);
    }
    assert!(
        second.0 >= first.1,
        "the second job started after the first completed: {one:#} {two:#}"
    );
}
