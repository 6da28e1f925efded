//! A farm whose state is in PostgreSQL (`kiln server --database postgres://...`), on a
//! throwaway PostgreSQL server the tests start: a build runs end to end and nothing of
//! it is kept in SQLite; the database server killed and started again mid-build loses
//! nothing, and the running job finishes on its first attempt; two servers on one
//! database and one object store share one queue: a job submitted to one goes at once
//! to a client that waits on the other, and its image is the first one's to release.

use crate::common::{
    text, wait_for_gate, wait_until_within, write_build, Harness, Job, Seaweed, Server, S3_KEY,
    S3_SECRET,
};
use kiln_store::conformance::pg_cluster::PgCluster;
use std::time::Duration;

/// A new database on `cluster`, made from a blocking test.
fn new_database(cluster: &PgCluster) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(cluster.new_database())
        .expect("a database for the test")
}

#[test]
fn a_build_runs_end_to_end_with_the_farm_state_in_postgresql() {
    let harness = Harness::new("postgres-build");
    let cluster = PgCluster::shared().expect("a PostgreSQL server for the test");
    let database = new_database(cluster);
    let server = harness.start_server("pg", &["--database", &database]);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1400",
        &[Job::new("pro", "PRO"), Job::new("home", "HOME")],
    ));
    let _client = harness.start_client("pg-client", &[&server], &["--include", "*"]);
    let jobs = server.wait_for_build_end(&build);
    for job in &jobs {
        assert_eq!(text(job, "state"), "finished", "{job:#}");
        assert_eq!(job["attempt"], 1, "{job:#}");
    }
    assert!(
        !server.data.join("kiln.db").exists(),
        "the state went to PostgreSQL, not to SQLite under --data"
    );
    let release_dir = harness.path().join("release");
    let release = server.kiln(&[
        "release",
        &build,
        "--to",
        &release_dir.display().to_string(),
    ]);
    harness.check(release.code == 0, || format!("{release:?}"));
    let sums = std::fs::read_to_string(release_dir.join(&build).join("SHA256SUMS"))
        .expect("the release's SHA256SUMS");
    assert_eq!(sums.lines().count(), 2, "one image per job: {sums}");

    // A second server process on the same database sees the same farm.
    let other = harness.start_server("pg-other", &["--database", &database]);
    let jobs = other.jobs(&build);
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|job| text(job, "state") == "finished"));
}

#[test]
fn postgresql_killed_and_restarted_mid_build_loses_nothing_and_the_job_finishes_once() {
    let harness = Harness::new("postgres-restart");
    let cluster = PgCluster::start().expect("a PostgreSQL server of this test's own");
    let database = new_database(&cluster);
    let server = harness.start_server(
        "pg",
        &[
            "--database",
            &database,
            "--lease-secs",
            "6",
            "--heartbeat-secs",
            "1",
        ],
    );
    let runs_file = harness.path().join("runs");
    let gate = harness.path().join("gate");
    let install = format!(
        "echo run >> '{}'\n{}",
        runs_file.display(),
        wait_for_gate(&gate)
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1401",
        &[Job::new("through", "PRO").install(&install)],
    ));
    let _client = harness.start_client("steady", &[&server], &["--include", "PRO"]);
    server.wait_for_job(&build, "through", "running", |job| {
        text(job, "state") == "running"
    });

    cluster.kill().expect("killing PostgreSQL");
    // While the database is down the server stays up and says so: 503 with Retry-After.
    let refused = server.get(&format!("/v1/jobs/{build}/through"));
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        refused.body.contains("store_unavailable"),
        "the refusal names the cause: {refused:?}"
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    cluster.restart().expect("starting PostgreSQL again");

    let job = server.wait_for_job(&build, "through", "running again", |job| {
        text(job, "state") == "running"
    });
    assert_eq!(job["attempt"], 1, "the job was not taken back: {job:#}");
    std::fs::write(&gate, "").expect("opening the gate");
    let job = server.wait_for_job(&build, "through", "to end", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&job, "state"), "finished", "{job:#}");
    assert_eq!(job["attempt"], 1, "{job:#}");
    let runs = std::fs::read_to_string(&runs_file).expect("the runs file");
    assert_eq!(runs.lines().count(), 1, "the job ran once: {runs:?}");
    let events = server.get(&format!("/v1/builds/{build}/events"));
    assert_eq!(events.status, 200, "{events:?}");
    let events: Vec<serde_json::Value> = serde_json::from_str(&events.body).expect("events");
    let states: Vec<&str> = events.iter().map(|event| text(event, "to")).collect();
    assert_eq!(states, ["queued", "running", "finished"], "{events:#?}");
}

#[test]
fn a_job_submitted_to_one_server_goes_at_once_to_a_client_waiting_on_the_other() {
    // Replicas share the state (PostgreSQL) and the images and build files (one
    // bucket of a real SeaweedFS): the client fetches from server two the files of a
    // build submitted to server one.
    let harness = Harness::new("postgres-two-servers")
        .with_env("AWS_ACCESS_KEY_ID", S3_KEY)
        .with_env("AWS_SECRET_ACCESS_KEY", S3_SECRET);
    let cluster = PgCluster::shared().expect("a PostgreSQL server for the test");
    let database = new_database(cluster);
    let weed = Seaweed::start(&harness.path().join("weed"));
    // One client credential for both servers, as replicas behind one name would have.
    let shared_token = harness.path().join("client.secret");
    std::fs::write(&shared_token, "shared-client-secret-for-the-test\n").expect("a token");
    let mut args = vec!["--database".to_owned(), database.clone()];
    args.extend(weed.server_args("farm"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let submit_to = harness.start_server_with_client_token("one", Some(&shared_token), &args);
    let wait_on = harness.start_server_with_client_token("two", Some(&shared_token), &args);
    // The client asks only the second server, in long polls of two minutes: a job it
    // gets sooner came because the first server's submit woke the second.
    let client = harness.start_client(
        "waiting",
        &[&wait_on],
        &["--include", "*", "--wait-secs", "120"],
    );
    wait_until_within(
        harness.path(),
        "the client to wait in a long poll on server two",
        Duration::from_secs(30),
        || {
            let health = health(&wait_on);
            (health["clients_waiting"].as_u64().unwrap_or(0) >= 1).then_some(())
        },
        || format!("{:#}", health(&wait_on)),
    );
    let build = submit_to.submit(&write_build(
        &harness.mkdir("build"),
        "1410",
        &[Job::new("shared", "PRO")],
    ));
    let job = wait_until_within(
        harness.path(),
        "the job submitted to server one to finish on the client of server two",
        Duration::from_secs(30),
        || Some(submit_to.job(&build, "shared")).filter(|job| text(job, "state") == "finished"),
        || format!("{:#}", submit_to.job(&build, "shared")),
    );
    assert_eq!(text(&job, "client_id"), client.id, "{job:#}");
    assert_eq!(job["attempt"], 1, "{job:#}");
    // The image the client uploaded to server two is server one's to release.
    let release_dir = harness.path().join("release");
    let release = submit_to.kiln(&[
        "release",
        &build,
        "--to",
        &release_dir.display().to_string(),
    ]);
    harness.check(release.code == 0, || format!("{release:?}"));
    let health = health(&wait_on);
    assert!(
        health.to_string().contains("\"follower\""),
        "server two runs the worker that follows the other servers' changes: {health:#}"
    );
}

/// A server's `GET /v1/health` answer.
fn health(server: &Server) -> serde_json::Value {
    serde_json::from_str(&server.get("/v1/health").body).expect("the health answer is JSON")
}
