//! A job held past its timeout by a client that cannot stop it: the server fails it
//! after `--hung-grace-secs`, and the client, told its lease is stale, kills the step
//! without waiting out its own (long) kill grace.

use crate::common::{
    process_exists, read_pid_file, text, wait_until, write_build, Harness, Job, PidFilesGuard,
};

/// The client's grace between SIGTERM and SIGKILL: far past the test's deadline, so
/// that a step gone within it was killed for the stale lease, not by the grace.
const KILL_GRACE_SECS: &str = "300";

#[test]
fn job_held_past_its_timeout_fails_on_the_server_and_the_client_then_kills_its_step() {
    let harness = Harness::new("hung");
    let server = harness.start_server("main", &["--hung-grace-secs", "1", "--heartbeat-secs", "1"]);
    let script_pid_file = harness.path().join("script.pid");
    let background_pid_file = harness.path().join("background.pid");
    let _sleepers = PidFilesGuard(vec![script_pid_file.clone(), background_pid_file.clone()]);
    // SIGTERM is ignored by the script and, inherited, by its child.
    let install = format!(
        "trap '' TERM\n\
         sleep 1000 &\n\
         echo $! > '{background}'\n\
         echo $$ > '{script}'\n\
         wait\n",
        background = background_pid_file.display(),
        script = script_pid_file.display(),
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1500",
        &[Job::new("stubborn", "PRO").install(&install).timeout(2)],
    ));
    let client = harness.start_client(
        "patient",
        &[&server],
        &["--include", "*", "--kill-grace-secs", KILL_GRACE_SECS],
    );
    let script_pid = read_pid_file(harness.path(), &script_pid_file);
    let background_pid = read_pid_file(harness.path(), &background_pid_file);

    let job = server.wait_for_job(&build, "stubborn", "to end", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "failed", "{job:#}");
    assert!(
        text(&job, "error").starts_with("timeout: held past its timeout"),
        "the server failed the job for being held past its timeout: {job:#}"
    );
    assert_eq!(text(&job, "client_id"), "patient", "{job:#}");
    // The server fails a job this way only once it was held past its TIMEOUT plus the
    // hung grace: the step outlived its timeout (it ignores SIGTERM and the client's
    // grace is long). Whether it is still alive at the moment this test looks is a
    // race with the client, which learns of the failure within a heartbeat.
    let events = server.events(&build);
    let last = events.last().expect("events");
    assert_eq!(
        (&last["from"], &last["to"]),
        (&"running".into(), &"failed".into()),
        "{events:#?}"
    );
    assert!(text(last, "reason").starts_with("timeout"), "{last:#}");

    let observe_pids = || {
        format!(
            "script {script_pid} exists: {}, background {background_pid} exists: {}; client state: {:?}",
            process_exists(script_pid),
            process_exists(background_pid),
            client.state()
        )
    };
    wait_until(
        harness.path(),
        "the client, told its lease is stale, to kill the step",
        || (!process_exists(script_pid) && !process_exists(background_pid)).then_some(()),
        observe_pids,
    );
    wait_until(
        harness.path(),
        "the client to let go of the job",
        || client.held_job(&build, "stubborn").is_none().then_some(()),
        observe_pids,
    );
    let job = server.job(&build, "stubborn");
    assert_eq!(text(&job, "state"), "failed", "nothing changed it: {job:#}");
}
