//! A dead client's job is taken back without waiting for its lease: the server notices
//! the client's session connection close, and `kiln client reset` gives the job back
//! (and kills what the dead client left running) at once.

use crate::common::{
    first_requeue, kill_process_group, process_exists, run_kiln, text, wait_for_gate, wait_until,
    wait_until_within, write_build, Harness, Job, TcpProxy,
};
use std::time::Duration;

/// Far longer than the tests below may take: a job that moves was not moved by it.
const LEASE_SECS: &str = "60";

/// The bound on a killed client's job running elsewhere, well inside the lease.
const NOTICED_WITHIN: Duration = Duration::from_secs(20);

#[test]
fn killed_clients_job_is_requeued_for_its_lost_connection_not_its_lease() {
    let harness = Harness::new("crash-noticed");
    let server = harness.start_server("main", &["--lease-secs", LEASE_SECS]);
    let gate = harness.path().join("gate");
    // Only the first run waits; the one after the crash goes straight through.
    let install = format!(
        "if [ \"$KILN_ATTEMPT\" = 1 ]; then\n{}fi\n",
        wait_for_gate(&gate)
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1400",
        &[Job::new("crashed", "PRO").install(&install)],
    ));
    let mut doomed = harness.start_client("doomed", &[&server], &["--include", "*"]);
    let held = wait_until(
        harness.path(),
        "the doomed client to run the job's step",
        || {
            doomed
                .held_job(&build, "crashed")
                .filter(|held| held["pgid"].is_i64())
        },
        || format!("{:?}", doomed.state()),
    );
    let orphan_pgid = held["pgid"].as_i64().expect("a pgid") as i32;

    doomed.process.kill();
    let _rescuer = harness.start_client("rescuer", &[&server], &["--include", "*"]);
    let job = wait_until_within(
        harness.path(),
        "the job to finish on the rescuer, well inside the lease",
        NOTICED_WITHIN,
        || Some(server.job(&build, "crashed")).filter(|job| text(job, "state") == "finished"),
        || format!("{:#}", server.job(&build, "crashed")),
    );
    kill_process_group(orphan_pgid);
    assert_eq!(text(&job, "client_id"), "rescuer", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");

    let events = server.events(&build);
    let requeue = first_requeue(&events, "crashed");
    assert_eq!(
        text(requeue, "reason"),
        "client connection lost",
        "the server took the job back because the connection closed: {requeue:#}"
    );
    assert_eq!(requeue["client_id"], "doomed", "{requeue:#}");
    assert_eq!(requeue["attempt"], 1, "{requeue:#}");
}

#[test]
fn client_reset_on_a_killed_clients_work_dir_kills_its_step_and_requeues_the_job_at_once() {
    let harness = Harness::new("client-reset");
    let server = harness.start_server("main", &["--lease-secs", LEASE_SECS]);
    // The client reaches the server through a proxy, so that its death can be hidden
    // from the server: then only the reset can give the job back before the lease.
    let proxy = TcpProxy::start(&server.url);
    let gate = harness.path().join("gate");
    let install = format!(
        "if [ \"$KILN_ATTEMPT\" = 1 ]; then\n{}fi\n",
        wait_for_gate(&gate)
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1410",
        &[Job::new("orphaned", "PRO").install(&install)],
    ));
    let token_file = server.client_token_file.display().to_string();
    let mut dead = harness.start_client_with_args(
        "dead",
        &[
            "client".into(),
            "--server".into(),
            proxy.url.clone(),
            "--id".into(),
            "dead".into(),
            "--include".into(),
            "*".into(),
            "--token-file".into(),
            token_file.clone(),
        ],
    );
    let held = wait_until(
        harness.path(),
        "the client to run the job's step",
        || {
            dead.held_job(&build, "orphaned")
                .filter(|held| held["pgid"].is_i64())
        },
        || format!("{:?}", dead.state()),
    );
    let orphan_pgid = held["pgid"].as_i64().expect("a pgid") as i32;

    // The client's connections stay open towards the server after it dies.
    proxy.cut_open_connections();
    dead.process.kill();
    // Past the server's session grace: had the server seen the death, the job would
    // have moved by now.
    std::thread::sleep(Duration::from_secs(2));
    let job = server.job(&build, "orphaned");
    assert_eq!(
        (text(&job, "state"), text(&job, "client_id")),
        ("running", "dead"),
        "the server does not know the client died: {job:#}"
    );
    let orphan_alive = process_exists(orphan_pgid);

    let work_dir = dead.work_dir.display().to_string();
    let reset = run_kiln(
        harness.path(),
        &[
            "client",
            "reset",
            "--work",
            &work_dir,
            "--token-file",
            &token_file,
        ],
        &[],
    );
    let job = server.job(&build, "orphaned");
    harness.check(reset.code == 0, || {
        format!("kiln client reset failed: {reset:?}")
    });
    assert!(orphan_alive, "the step outlived its client until the reset");
    assert_eq!(
        text(&job, "state"),
        "queued",
        "the job is queued as soon as the reset returns: {job:#}"
    );
    // Killed by the reset, and gone once init has reaped it: well before its gate
    // would have let it end by itself.
    wait_until_within(
        harness.path(),
        "the reset to have killed the dead client's step",
        NOTICED_WITHIN,
        || (!process_exists(orphan_pgid)).then_some(()),
        || format!("process group {orphan_pgid} is still there"),
    );
    let state = dead
        .state()
        .expect("the reset leaves a readable state file");
    assert_eq!(
        state["jobs"].as_array().map(Vec::len),
        Some(0),
        "the state file lists no job: {state:#}"
    );

    let events = server.events(&build);
    let requeue = first_requeue(&events, "orphaned");
    let reason = text(requeue, "reason");
    assert!(
        reason.contains("client restarted"),
        "the reset gave the job back, saying the client's run died: {requeue:#}"
    );
    assert_eq!(requeue["client_id"], "dead", "{requeue:#}");

    let _next = harness.start_client("next", &[&server], &["--include", "*"]);
    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("the job finishes on another client: {waited:?}")
    });
    let job = server.status_of(&build, "orphaned");
    assert_eq!(text(&job, "client_id"), "next", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
}
