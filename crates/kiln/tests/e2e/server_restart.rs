//! A server that dies and comes back: nothing is lost and nothing starts twice. The
//! client running a job keeps it through the outage and finishes it under its lease.

use crate::common::{text, wait_for_gate, wait_until, write_build, Harness, Job};

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

/// Bytes of the sealed packs in a server's data directory: what it has stored for good.
fn stored_pack_bytes(data: &std::path::Path) -> u64 {
    let Ok(packs) = std::fs::read_dir(data.join("packs")) else {
        return 0;
    };
    packs
        .flatten()
        .filter(|pack| pack.file_name().to_string_lossy().ends_with(".pack"))
        .filter_map(|pack| pack.metadata().ok())
        .map(|meta| meta.len())
        .sum()
}

#[test]
fn upload_cut_off_by_a_server_kill_resumes_without_resending_stored_chunks() {
    let harness = Harness::new("server-restart-upload");
    let server_args = ["--lease-secs", "5", "--heartbeat-secs", "1"];
    let server = harness.start_server("first", &server_args);
    let expected_file = harness.path().join("expected.sha256");
    // 384 MiB of noise: about 4,700 distinct chunks, enough for the test to see the
    // first ones stored and kill the server before the last.
    const SIZE: u64 = 384 << 20;
    let image = format!(
        "head -c {SIZE} /dev/urandom > \"$KILN_OUTPUT/big.img\"\n\
         sha256sum \"$KILN_OUTPUT/big.img\" | cut -d' ' -f1 > '{}'\n",
        expected_file.display()
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "960",
        &[Job::new("big", "PRO").image(&image)],
    ));
    let _client = harness.start_client("uploader", &[&server], &["--include", "PRO"]);
    let data = server.data.clone();
    let stored_before_kill = wait_until(
        harness.path(),
        "the server to have stored some chunks of the image",
        || {
            // About 300 chunks.
            let n = stored_pack_bytes(&data);
            (n >= 20 << 20).then_some(n)
        },
        || format!("{} bytes stored in packs", stored_pack_bytes(&data)),
    );

    let listen = server.url.trim_start_matches("http://").to_owned();
    let client_token_file = server.client_token_file.clone();
    drop(server); // SIGKILL in the middle of the upload.
    let stored_at_kill = stored_pack_bytes(&data);
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
    assert_eq!(images[0]["size"], SIZE, "{images:#}");
    let total_chunks = stored_pack_bytes(&data);
    assert!(
        stored_at_kill < total_chunks,
        "the kill came before the upload ended ({stored_at_kill} of {total_chunks} bytes)"
    );
    // Chunks stored before the kill were not sent again: all bytes received, over
    // both lives of the server, come to the image once, plus at most the one body
    // (16 MiB of chunks) that was on the wire when the server died.
    let storage: serde_json::Value =
        serde_json::from_str(&server.get("/v1/storage").body).expect("storage counters");
    let received = storage["bytes_received"].as_u64().expect("bytes_received");
    assert!(
        received <= SIZE + (17 << 20),
        "{received} bytes received for a {SIZE}-byte image: stored chunks were sent again \
         ({stored_before_kill} chunks seen stored before the kill); {storage:#}"
    );
}
