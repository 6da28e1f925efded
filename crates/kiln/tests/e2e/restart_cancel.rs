//! Operators cancel and restart jobs: a cancelled job makes `kiln wait` report failure
//! and, if it was running, has its step killed; a restarted one is queued again and
//! runs. `kiln wait` gives up with exit code 2.

use crate::common::{
    read_pid_file, run_kiln, text, wait_for_gate, wait_until, wait_until_gone, write_build,
    Harness, Job, PidFilesGuard,
};

#[test]
fn cancelled_queued_job_fails_the_wait_and_restart_queues_it_to_finish() {
    let harness = Harness::new("cancel");
    let server = harness.start_server("main", &[]);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "800",
        &[Job::new("one", "PRO")],
    ));
    let job_name = format!("{build}/one");

    // No client yet: the job is queued.
    assert_eq!(text(&server.status_of(&build, "one"), "state"), "queued");
    let cancelled = server.kiln(&["job", "cancel", &job_name]);
    harness.check(cancelled.code == 0, || {
        format!("kiln job cancel failed: {cancelled:?}")
    });
    let job = server.status_of(&build, "one");
    assert_eq!(text(&job, "state"), "cancelled", "{job:#}");

    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    assert_eq!(
        waited.code, 1,
        "kiln wait exits 1 when a job was cancelled: {waited:?}"
    );

    let restarted = server.kiln(&["job", "restart", &job_name]);
    harness.check(restarted.code == 0, || {
        format!("kiln job restart failed: {restarted:?}")
    });
    let job = server.status_of(&build, "one");
    assert_eq!(text(&job, "state"), "queued", "{job:#}");
    assert!(job["error"].is_null(), "a restarted job is as new: {job:#}");

    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("the restarted job finishes: {waited:?}")
    });
    let job = server.status_of(&build, "one");
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(text(&job, "client_id"), "runner", "{job:#}");
}

#[test]
fn cancelling_a_running_job_kills_its_step_and_the_client_cannot_finish_it() {
    let harness = Harness::new("cancel-running");
    let server = harness.start_server("main", &["--heartbeat-secs", "1"]);
    let pid_file = harness.path().join("step.pid");
    let gate = harness.path().join("gate");
    let _step = PidFilesGuard(vec![pid_file.clone()]);
    // If the client missed the cancel, the step would end at the gate and the job be
    // reported finished.
    let install = format!(
        "echo $$ > '{}'\n{}",
        pid_file.display(),
        wait_for_gate(&gate)
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "810",
        &[Job::new("busy", "PRO").install(&install)],
    ));
    let client = harness.start_client("runner", &[&server], &["--include", "*"]);
    let step_pid = read_pid_file(harness.path(), &pid_file);
    server.wait_for_job(&build, "busy", "running", |job| {
        text(job, "state") == "running"
    });

    let cancelled = server.kiln(&["job", "cancel", &format!("{build}/busy")]);
    harness.check(cancelled.code == 0, || {
        format!("kiln job cancel failed: {cancelled:?}")
    });
    wait_until_gone(harness.path(), "the cancelled job's step", step_pid);
    std::fs::write(&gate, "").expect("opening the gate");
    wait_until(
        harness.path(),
        "the client to let go of the cancelled job",
        || client.held_job(&build, "busy").is_none().then_some(()),
        || format!("{:?}", client.state()),
    );
    let job = server.status_of(&build, "busy");
    assert_eq!(text(&job, "state"), "cancelled", "{job:#}");
}

#[test]
fn restarting_a_running_job_kills_the_old_run_and_runs_it_again() {
    let harness = Harness::new("restart-running");
    let server = harness.start_server("main", &["--heartbeat-secs", "1"]);
    let runs_file = harness.path().join("runs");
    let first_pid_file = harness.path().join("first.pid");
    let gate = harness.path().join("gate");
    let _step = PidFilesGuard(vec![first_pid_file.clone()]);
    // The first run records its pid and waits for a gate the test never opens; later
    // runs go straight through. Every run appends a line to `runs`.
    let install = format!(
        "echo run >> '{runs}'\n\
         if [ ! -e '{first}' ]; then\n\
         echo $$ > '{first}.tmp' && mv '{first}.tmp' '{first}'\n\
         {gate}\
         fi\n",
        runs = runs_file.display(),
        first = first_pid_file.display(),
        gate = wait_for_gate(&gate),
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "820",
        &[Job::new("again", "PRO").install(&install)],
    ));
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);
    let first_pid = read_pid_file(harness.path(), &first_pid_file);
    server.wait_for_job(&build, "again", "running", |job| {
        text(job, "state") == "running"
    });

    let restarted = server.kiln(&["job", "restart", &format!("{build}/again")]);
    harness.check(restarted.code == 0, || {
        format!("kiln job restart failed: {restarted:?}")
    });
    wait_until_gone(harness.path(), "the first run's step", first_pid);
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("the restarted job finishes: {waited:?}")
    });
    let runs = std::fs::read_to_string(&runs_file).expect("the runs file");
    assert_eq!(runs.lines().count(), 2, "the job ran twice: {runs:?}");
    let job = server.status_of(&build, "again");
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
}

#[test]
fn wait_exits_2_when_its_timeout_passes_or_the_server_is_unreachable() {
    let harness = Harness::new("wait-exit");
    let server = harness.start_server("main", &[]);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "830",
        &[Job::new("never", "PRO")],
    ));
    // No client: the job stays queued.
    let waited = server.kiln(&["wait", &build, "--timeout", "1"]);
    assert_eq!(waited.code, 2, "kiln wait gives up with 2: {waited:?}");

    // A port nothing listens on: bind one, note it, close it.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding a port")
        .port();
    let url = format!("http://127.0.0.1:{closed_port}");
    let admin = server.admin_token_file.display().to_string();
    let unreachable = run_kiln(
        harness.path(),
        &[
            "wait",
            &build,
            "--timeout",
            "5",
            "--server",
            &url,
            "--token-file",
            &admin,
        ],
        &[],
    );
    assert_eq!(
        unreachable.code, 2,
        "kiln wait exits 2 when it cannot reach the server: {unreachable:?}"
    );
}
