//! Clients that die or freeze mid-job: the server takes the job back, another client
//! runs it as attempt 2, and the old holder's lease token is refused from then on. A
//! frozen client that wakes up stops its step; a restarted one kills what its dead run
//! left behind.

use crate::common::{
    kill_process_group, process_exists, text, wait_for_gate, wait_until, write_build, Client,
    Harness, Job, Server,
};

/// POSTs a heartbeat for `build/job` under `lease` as `client`; returns the HTTP status.
fn heartbeat(server: &Server, client: &Client, build: &str, job: &str, lease: &str) -> u16 {
    server
        .client_post_as(
            client,
            &format!("/v1/jobs/{build}/{job}/heartbeat"),
            &[("x-kiln-lease", lease)],
            "{}",
        )
        .status
}

#[test]
fn killed_clients_job_finishes_on_another_client_as_attempt_2_and_its_old_lease_is_refused() {
    let harness = Harness::new("killed");
    let server = harness.start_server("main", &["--lease-secs", "3", "--heartbeat-secs", "1"]);
    // The step runs until the test opens the gate (or 60 s pass), so that every check
    // below happens while the job is running, however slow the machine.
    let gate = harness.path().join("gate");
    let install = wait_for_gate(&gate);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "700",
        &[Job::new("long", "PRO").install(&install)],
    ));
    let mut client_a = harness.start_client("A", &[&server], &["--include", "*"]);

    server.wait_for_job(&build, "long", "running on A", |job| {
        text(job, "state") == "running" && text(job, "client_id") == "A"
    });
    // The state file names the lease, and the step's process group once it started.
    let held_by_a = wait_until(
        harness.path(),
        "A's state file to hold the job with its step's pgid",
        || {
            client_a
                .held_job(&build, "long")
                .filter(|held| held["pgid"].is_i64())
        },
        || format!("{:?}", client_a.state()),
    );
    let old_lease = text(&held_by_a, "lease").to_owned();
    let orphan_pgid = held_by_a["pgid"].as_i64().expect("a pgid") as i32;
    assert_eq!(held_by_a["attempt"], 1, "{held_by_a:#}");
    assert_eq!(
        heartbeat(&server, &client_a, &build, "long", &old_lease),
        200,
        "A's lease is current while A holds the job"
    );

    client_a.process.kill();
    let client_b = harness.start_client("B", &[&server], &["--include", "*"]);

    let running_on_b = server.wait_for_job(&build, "long", "to run on B", |job| {
        text(job, "client_id") == "B" || !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&running_on_b, "state"), "running", "{running_on_b:#}");
    assert_eq!(text(&running_on_b, "client_id"), "B", "{running_on_b:#}");
    assert_eq!(running_on_b["attempt"], 2, "{running_on_b:#}");
    let held_by_b = wait_until(
        harness.path(),
        "B's state file to hold the job",
        || client_b.held_job(&build, "long"),
        || format!("{:?}", client_b.state()),
    );
    let new_lease = text(&held_by_b, "lease").to_owned();
    assert_ne!(new_lease, old_lease, "a new attempt has a new lease");
    assert_eq!(
        heartbeat(&server, &client_b, &build, "long", &new_lease),
        200,
        "B's lease is current"
    );
    assert_eq!(
        heartbeat(&server, &client_a, &build, "long", &old_lease),
        409,
        "A's old lease is refused while B runs the job"
    );

    std::fs::write(&gate, "").expect("opening the gate");
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("kiln wait {build} should exit 0: {waited:?}")
    });
    let job = server.status_of(&build, "long");
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(text(&job, "client_id"), "B", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
    assert_eq!(
        heartbeat(&server, &client_a, &build, "long", &old_lease),
        409,
        "A's old lease is refused after the job finished"
    );

    // A died without stopping its step: end whatever is left of that group.
    kill_process_group(orphan_pgid);
}

#[test]
fn client_restarted_after_a_crash_kills_the_step_its_dead_run_left_and_runs_the_job_again() {
    let harness = Harness::new("client-restart");
    let server = harness.start_server("main", &["--lease-secs", "3", "--heartbeat-secs", "1"]);
    let runs_file = harness.path().join("runs");
    let gate = harness.path().join("gate");
    // The first run waits at the gate; the test opens it only after the restart.
    let install = format!(
        "echo run >> '{runs}'\n\
         if [ \"$KILN_ATTEMPT\" = 1 ]; then\n{gate}fi\n",
        runs = runs_file.display(),
        gate = wait_for_gate(&gate),
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "710",
        &[Job::new("crashy", "PRO").install(&install)],
    ));
    let mut client = harness.start_client("A", &[&server], &["--include", "*"]);
    let held = wait_until(
        harness.path(),
        "A's state file to hold the job with its step's pgid",
        || {
            client
                .held_job(&build, "crashy")
                .filter(|held| held["pgid"].is_i64())
        },
        || format!("{:?}", client.state()),
    );
    let orphan_pgid = held["pgid"].as_i64().expect("a pgid") as i32;
    client.process.kill();
    assert!(
        process_exists(orphan_pgid),
        "the step outlives its client's SIGKILL (it has its own process group)"
    );

    // The same client, same work directory, started again.
    let restarted = harness.start_client("A", &[&server], &["--include", "*"]);
    wait_until(
        harness.path(),
        "the restarted client to kill the step its dead run left",
        || (!process_exists(orphan_pgid)).then_some(()),
        || format!("process group {orphan_pgid} is still there"),
    );
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    std::fs::write(&gate, "").expect("opening the gate");
    kill_process_group(orphan_pgid);
    harness.check(waited.code == 0, || {
        format!("the job finishes on the restarted client: {waited:?}")
    });
    let job = server.status_of(&build, "crashy");
    assert_eq!(text(&job, "client_id"), "A", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
    let runs = std::fs::read_to_string(&runs_file).expect("the runs file");
    assert_eq!(runs.lines().count(), 2, "one run per attempt: {runs:?}");
    drop(restarted);
}

#[test]
fn frozen_client_loses_its_job_by_lease_and_on_waking_kills_its_step_and_changes_nothing() {
    let harness = Harness::new("frozen");
    let server = harness.start_server("main", &["--lease-secs", "3", "--heartbeat-secs", "1"]);
    let first_run_marker = harness.path().join("first-run");
    let gate = harness.path().join("gate");
    // The first run waits at a gate the test opens only at the end; later runs go
    // straight through.
    let install = format!(
        "if [ ! -e '{marker}' ]; then\n\
         : > '{marker}'\n\
         {gate}\
         echo 'the frozen run went on' > \"$KILN_OUTPUT/stale.img\"\n\
         fi\n",
        marker = first_run_marker.display(),
        gate = wait_for_gate(&gate),
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "720",
        &[Job::new("frozen", "PRO").install(&install)],
    ));
    let mut client_a = harness.start_client("A", &[&server], &["--include", "*"]);
    let held_by_a = wait_until(
        harness.path(),
        "A's state file to hold the job with its step's pgid",
        || {
            client_a
                .held_job(&build, "frozen")
                .filter(|held| held["pgid"].is_i64())
        },
        || format!("{:?}", client_a.state()),
    );
    let old_lease = text(&held_by_a, "lease").to_owned();
    let step_pgid = held_by_a["pgid"].as_i64().expect("a pgid") as i32;

    // Frozen, not dead: its connections stay open, its heartbeats stop.
    client_a.process.signal(libc::SIGSTOP);
    let _client_b = harness.start_client("B", &[&server], &["--include", "*"]);
    let job = server.wait_for_job(&build, "frozen", "to end on B", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(text(&job, "client_id"), "B", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
    assert_eq!(
        heartbeat(&server, &client_a, &build, "frozen", &old_lease),
        409,
        "the frozen client's lease is refused"
    );

    // Let the step go on only after A woke up: a step A failed to stop would then
    // leave an image that A might try to report.
    client_a.process.signal(libc::SIGCONT);
    wait_until(
        harness.path(),
        "A, awake, to give up the job it lost",
        || client_a.held_job(&build, "frozen").is_none().then_some(()),
        || format!("{:?}", client_a.state()),
    );
    let step_alive = process_exists(step_pgid);
    std::fs::write(&gate, "").expect("opening the gate");
    kill_process_group(step_pgid);
    assert!(
        !step_alive,
        "A killed the step of the job it lost before letting go of it"
    );
    assert!(client_a.process.is_running(), "A keeps running");
    let job = server.status_of(&build, "frozen");
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(text(&job, "client_id"), "B", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
    let images = server.get(&format!("/v1/builds/{build}/images"));
    assert!(
        !images.body.contains("stale.img"),
        "nothing of the frozen run was stored: {images:?}"
    );
}
