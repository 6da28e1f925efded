//! Stopping a client on purpose: one SIGTERM drains it (its job finishes, it takes no
//! new one, it exits); a second SIGTERM gives its job back for another client.

use crate::common::{
    read_pid_file, text, wait_for_gate, wait_until, wait_until_gone, write_build, Harness, Job,
    PidFilesGuard,
};

#[test]
fn sigterm_drains_the_client_its_job_finishes_and_it_takes_no_new_one() {
    let harness = Harness::new("drain");
    let server = harness.start_server("main", &["--heartbeat-secs", "1"]);
    let gate = harness.path().join("gate");
    let pid_file = harness.path().join("step.pid");
    let _step = PidFilesGuard(vec![pid_file.clone()]);
    let install = format!(
        "echo $$ > '{}'\n{}",
        pid_file.display(),
        wait_for_gate(&gate)
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "900",
        &[Job::new("held", "PRO").install(&install)],
    ));
    let mut client = harness.start_client("drainer", &[&server], &["--include", "*"]);
    read_pid_file(harness.path(), &pid_file);
    server.wait_for_job(&build, "held", "running", |job| {
        text(job, "state") == "running"
    });

    client.process.signal(libc::SIGTERM);
    // Another job is waiting; a draining client must leave it.
    let other = server.submit(&write_build(
        &harness.mkdir("other"),
        "901",
        &[Job::new("waiting", "PRO")],
    ));
    std::fs::write(&gate, "").expect("opening the gate");

    let job = server.wait_for_job(&build, "held", "to end", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(text(&job, "client_id"), "drainer", "{job:#}");
    assert_eq!(job["attempt"], 1, "the job was not given back: {job:#}");
    let status = wait_until(
        harness.path(),
        "the drained client to exit",
        || client.process.exit_status(),
        || "still running".into(),
    );
    assert!(status.success(), "a drained client exits 0: {status}");
    let waiting = server.status_of(&other, "waiting");
    assert_eq!(
        text(&waiting, "state"),
        "queued",
        "the draining client took no new job: {waiting:#}"
    );
}

#[test]
fn second_sigterm_gives_the_job_back_and_another_client_runs_it() {
    let harness = Harness::new("abandon");
    let server = harness.start_server("main", &["--heartbeat-secs", "1"]);
    let first_pid_file = harness.path().join("first.pid");
    let gate = harness.path().join("gate");
    let _step = PidFilesGuard(vec![first_pid_file.clone()]);
    // The first run waits at a gate the test never opens; the second goes through.
    let install = format!(
        "if [ ! -e '{first}' ]; then\n\
         echo $$ > '{first}.tmp' && mv '{first}.tmp' '{first}'\n\
         {gate}\
         fi\n",
        first = first_pid_file.display(),
        gate = wait_for_gate(&gate),
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "910",
        &[Job::new("handed-on", "PRO").install(&install)],
    ));
    let mut leaving = harness.start_client("leaving", &[&server], &["--include", "*"]);
    let first_pid = read_pid_file(harness.path(), &first_pid_file);
    server.wait_for_job(
        &build,
        "handed-on",
        "running on the leaving client",
        |job| text(job, "state") == "running" && text(job, "client_id") == "leaving",
    );

    leaving.process.signal(libc::SIGTERM);
    // The first signal must be seen before the second: the client logs it.
    let log = harness.path().join("client-leaving.log");
    wait_until(
        harness.path(),
        "the client to report that it is stopping",
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|text| text.contains("stopping"))
                .map(|_| ())
        },
        || "no `stopping` line in its log".into(),
    );
    leaving.process.signal(libc::SIGTERM);
    wait_until(
        harness.path(),
        "the client to exit after the second SIGTERM",
        || (!leaving.process.is_running()).then_some(()),
        || "still running".into(),
    );
    wait_until_gone(harness.path(), "the abandoned step", first_pid);
    let job = server.job(&build, "handed-on");
    assert_eq!(
        text(&job, "state"),
        "queued",
        "the job is back in the queue at once, not left to lapse: {job:#}"
    );

    let _next = harness.start_client("next", &[&server], &["--include", "*"]);
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("the job finishes on the next client: {waited:?}")
    });
    let job = server.status_of(&build, "handed-on");
    assert_eq!(text(&job, "client_id"), "next", "{job:#}");
}

#[test]
fn idle_client_in_a_long_poll_exits_0_at_once_on_sigterm() {
    let harness = Harness::new("idle-stop");
    let server = harness.start_server("main", &[]);
    // Its long poll would hold it for two minutes, past the test's deadline.
    let mut client = harness.start_client(
        "idle",
        &[&server],
        &["--include", "*", "--wait-secs", "120"],
    );
    let log = harness.path().join("client-idle.log");
    wait_until(
        harness.path(),
        "the client to start",
        || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|text| text.contains("client started"))
                .map(|_| ())
        },
        || "no `client started` line in its log".into(),
    );
    client.process.signal(libc::SIGTERM);
    let status = wait_until(
        harness.path(),
        "the idle client to exit after SIGTERM",
        || client.process.exit_status(),
        || "still running".into(),
    );
    assert!(status.success(), "the client exits 0: {status}");
}
