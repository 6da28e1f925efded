//! A server that dies and comes back: nothing is lost and nothing starts twice. The
//! client running a job keeps it through the outage and finishes it under its lease.

mod common;

use common::{text, wait_for_gate, wait_until, write_build, Harness, Job};

#[test]
fn server_killed_and_restarted_keeps_the_running_job_on_its_client_and_runs_it_once() {
    let harness = Harness::new("server-restart");
    let server_args = ["--lease-secs", "3", "--heartbeat-secs", "1"];
    let server = harness.start_server("first", &server_args);
    let runs_file = harness.path().join("runs");
    let gate = harness.path().join("gate");
    let install = format!(
        "echo run >> '{}'\n{}",
        runs_file.display(),
        wait_for_gate(&gate)
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "950",
        &[
            Job::new("through", "PRO").install(&install),
            Job::new("queued", "HOME"),
        ],
    ));
    let client = harness.start_client("steady", &[&server], &["--include", "PRO"]);
    server.wait_for_job(&build, "through", "running", |job| {
        text(job, "state") == "running"
    });
    let held = wait_until(
        harness.path(),
        "the client to record its job",
        || client.held_job(&build, "through"),
        || format!("{:?}", client.state()),
    );

    let listen = server.url.trim_start_matches("http://").to_owned();
    let data = server.data.clone();
    let client_token_file = server.client_token_file.clone();
    drop(server); // SIGKILL: no orderly shutdown.
    let server = harness.start_server_at(
        "restarted",
        &listen,
        &data,
        Some(&client_token_file),
        &server_args,
    );

    let builds = server.kiln(&["status", "--json"]);
    harness.check(builds.code == 0, || format!("{builds:?}"));
    let job = server.job(&build, "through");
    assert_eq!(
        text(&job, "state"),
        "running",
        "the running job survives the restart: {job:#}"
    );
    assert_eq!(text(&job, "client_id"), "steady", "{job:#}");
    let queued = server.job(&build, "queued");
    assert_eq!(text(&queued, "state"), "queued", "{queued:#}");

    // Let more than a lease pass after the restart: only the client's heartbeats,
    // accepted by the restarted server, keep the job its own that long.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let job = server.job(&build, "through");
    assert_eq!(text(&job, "state"), "running", "{job:#}");
    assert_eq!(job["attempt"], 1, "the job was not reclaimed: {job:#}");
    let still_held = client.held_job(&build, "through").expect("still held");
    assert_eq!(still_held["lease"], held["lease"], "the same lease");

    std::fs::write(&gate, "").expect("opening the gate");
    let job = server.wait_for_job(&build, "through", "to end", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(job["attempt"], 1, "{job:#}");
    let runs = std::fs::read_to_string(&runs_file).expect("the runs file");
    assert_eq!(runs.lines().count(), 1, "the job ran once: {runs:?}");
}

#[test]
fn upload_cut_off_by_a_server_kill_completes_after_the_restart() {
    let harness = Harness::new("server-restart-upload");
    let server_args = ["--lease-secs", "5", "--heartbeat-secs", "1"];
    let server = harness.start_server("first", &server_args);
    let expected_file = harness.path().join("expected.sha256");
    // A 512 MiB image (sparse on the client, written whole on the server): long enough
    // on loopback for the test to see the server staging it and kill the server.
    let image = format!(
        "truncate -s 512M \"$KILN_OUTPUT/big.img\"\n\
         printf '%s' \"$KILN_JOB_ID\" | dd of=\"$KILN_OUTPUT/big.img\" bs=1 seek=1000 conv=notrunc 2>/dev/null\n\
         sha256sum \"$KILN_OUTPUT/big.img\" | cut -d' ' -f1 > '{}'\n",
        expected_file.display()
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "960",
        &[Job::new("big", "PRO").image(&image)],
    ));
    let _client = harness.start_client("uploader", &[&server], &["--include", "PRO"]);
    let staging = server.data.join("blobs").join("staging");
    wait_until(
        harness.path(),
        "the server to be staging the image",
        || {
            std::fs::read_dir(&staging)
                .ok()?
                .flatten()
                .any(|entry| entry.metadata().is_ok_and(|meta| meta.len() > 0))
                .then_some(())
        },
        || format!("{:?}", std::fs::read_dir(&staging).map(|dir| dir.count())),
    );

    let listen = server.url.trim_start_matches("http://").to_owned();
    let data = server.data.clone();
    let client_token_file = server.client_token_file.clone();
    drop(server); // SIGKILL in the middle of the upload.
    let server = harness.start_server_at(
        "restarted",
        &listen,
        &data,
        Some(&client_token_file),
        &server_args,
    );

    let job = server.wait_for_job(&build, "big", "to end", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(
        job["attempt"], 1,
        "the upload resumed under the same lease: {job:#}"
    );
    let expected = std::fs::read_to_string(&expected_file).expect("the step's hash");
    let images = server.get(&format!("/v1/builds/{build}/images"));
    let images: serde_json::Value = serde_json::from_str(&images.body).expect("image list");
    assert_eq!(images[0]["sha256"], expected.trim(), "{images:#}");
    assert_eq!(images[0]["size"], 512u64 << 20, "{images:#}");
}
