//! A client cut off from its server by the network (connections open, no bytes passing)
//! loses its job when the lease lapses; another client finishes it; when the network
//! heals, the cut-off client is told its lease is stale, kills its step and changes
//! nothing.

use crate::common;

use crate::common::{
    events_of, first_requeue, read_pid_file, text, wait_for_gate, wait_until, wait_until_gone,
    write_build, Harness, Job, PidFilesGuard, TcpProxy,
};

#[test]
fn cut_off_clients_job_finishes_elsewhere_and_on_healing_it_kills_its_step_and_stores_nothing() {
    let harness = Harness::new("partition");
    let server = harness.start_server("main", &["--lease-secs", "3", "--heartbeat-secs", "1"]);
    let proxy = TcpProxy::start(&server.url);
    let gate = harness.path().join("gate");
    let cut_off_pid_file = harness.path().join("cut-off.pid");
    let _steps = PidFilesGuard(vec![cut_off_pid_file.clone()]);
    // The cut-off client's run records its pid and waits at a gate the test opens only
    // at the very end; any other client's run goes straight through. Each client's
    // image holds its own id.
    let install = format!(
        "if [ \"$KILN_CLIENT_ID\" = cut-off ]; then\n\
         echo $$ > '{pid}.tmp' && mv '{pid}.tmp' '{pid}'\n\
         {gate}\
         fi\n",
        pid = cut_off_pid_file.display(),
        gate = wait_for_gate(&gate),
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1600",
        &[Job::new("contested", "PRO")
            .install(&install)
            .image("echo \"$KILN_CLIENT_ID\" > \"$KILN_OUTPUT/out.bin\"\n")],
    ));
    let token_file = server.client_token_file.display().to_string();
    let cut_off = harness.start_client_with_args(
        "cut-off",
        &[
            "client".into(),
            "--server".into(),
            proxy.url.clone(),
            "--id".into(),
            "cut-off".into(),
            "--include".into(),
            "*".into(),
            "--token-file".into(),
            token_file,
        ],
    );
    let step_pid = read_pid_file(harness.path(), &cut_off_pid_file);
    let running = server.job(&build, "contested");
    assert_eq!(
        (text(&running, "state"), text(&running, "client_id")),
        ("running", "cut-off"),
        "{running:#}"
    );

    proxy.cut();
    let _direct = harness.start_client("direct", &[&server], &["--include", "*"]);
    let job = server.wait_for_job(&build, "contested", "to end on the direct client", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(text(&job, "client_id"), "direct", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
    let events = server.events(&build);
    let requeue = first_requeue(&events, "contested");
    assert_eq!(
        text(requeue, "reason"),
        "lease lapsed",
        "a cut-off client is found by its lease: {requeue:#}"
    );
    assert!(
        common::process_exists(step_pid),
        "the cut-off client's step still runs while it cannot hear the server"
    );

    proxy.heal();
    wait_until_gone(
        harness.path(),
        "the cut-off client's step, once it heard its lease is stale",
        step_pid,
    );
    wait_until(
        harness.path(),
        "the cut-off client to let go of the job",
        || {
            cut_off
                .held_job(&build, "contested")
                .is_none()
                .then_some(())
        },
        || format!("{:?}", cut_off.state()),
    );
    std::fs::write(&gate, "").expect("opening the gate");

    let image = server.get(&format!("/v1/jobs/{build}/contested/images/out.bin"));
    assert_eq!(image.status, 200, "{image:?}");
    assert_eq!(
        image.body, "direct\n",
        "the stored image is the direct client's"
    );
    let events = server.events(&build);
    let n_finished = events_of(&events, "contested")
        .iter()
        .filter(|event| event["to"] == "finished")
        .count();
    assert_eq!(n_finished, 1, "one finish: {events:#?}");
    let job = server.job(&build, "contested");
    assert_eq!(text(&job, "client_id"), "direct", "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
}
