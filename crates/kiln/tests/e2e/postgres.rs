//! A farm whose state is in PostgreSQL (`kiln server --database postgres://...`), on a
//! throwaway PostgreSQL server the tests start: a build runs end to end and nothing of
//! it is kept in SQLite; a server on that database with other packs is refused, and a
//! new server process on the same database and packs sees the same farm; the database server killed and started again mid-build loses
//! nothing, and the running job finishes on its first attempt; two servers on one
//! database and one object store share one queue: a job submitted to one goes at once
//! to a client that waits on the other, and its image is the first one's to release;
//! and the replica holding the clients' sessions SIGKILLed mid-build: the clients,
//! given both replicas' URLs (or one nginx in front of both), carry on through the
//! other, and every job finishes on its first attempt.

use crate::common::{
    events_of, first_requeue, run_kiln, text, wait_for_gate, wait_until_within, write_build,
    Client, Harness, Job, LoadBalancer, Run, Seaweed, Server, S3_KEY, S3_SECRET,
};
use kiln_harness::postgres::PgCluster;
use std::path::Path;
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
    let mut server = harness.start_server("pg", &["--database", &database]);
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
    // The store's batches are counted (two jobs, one at a time: none batched).
    let (_, metrics) = crate::metrics::scrape(&server, None);
    let metrics = crate::metrics::samples(&metrics);
    assert_eq!(
        metrics.get("kiln_store_calls_batched_total"),
        Some(&0.0),
        "{metrics:#?}"
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

    // A server on the same database with another data directory (so other packs) is
    // refused: the database indexes the first one's packs.
    let other_data = harness.path().join("pg-other-data");
    let other_data = other_data.display().to_string();
    let refused = run_kiln(
        harness.path(),
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data",
            &other_data,
            "--database",
            &database,
        ],
        &[],
    );
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains("has no store id"),
        "the refusal says why: {refused:?}"
    );
    // A new server process on the same database and packs sees the same farm.
    server.process.kill();
    let again = harness.start_server_at(
        "pg-again",
        "127.0.0.1:0",
        &server.data,
        None,
        &["--database", &database],
    );
    let jobs = again.jobs(&build);
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|job| text(job, "state") == "finished"));
    let release_again = harness.path().join("release-again");
    let release = again.kiln(&[
        "release",
        &build,
        "--to",
        &release_again.display().to_string(),
    ]);
    harness.check(release.code == 0, || format!("{release:?}"));
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

/// Two replicas of one farm: one database, one bucket of a SeaweedFS of the test's
/// own, the same token files; leases of 6 s (a client cut off from the farm for longer
/// loses its jobs, and they run again as attempt 2) and heartbeats every second.
struct Replicas {
    first: Server,
    second: Server,
    admin_token: String,
    client_token: String,
    _weed: Seaweed,
}

impl Replicas {
    fn start(harness: &Harness) -> Replicas {
        let cluster = PgCluster::shared().expect("a PostgreSQL server for the test");
        let database = new_database(cluster);
        let weed = Seaweed::start(&harness.path().join("weed"));
        let client_token = harness.path().join("client.secret");
        std::fs::write(&client_token, "shared-client-secret-for-the-test\n").expect("a token");
        let admin_token = harness.path().join("admin.secret");
        std::fs::write(&admin_token, "shared-admin-secret-for-the-test\n").expect("a token");
        let admin_token = admin_token.display().to_string();
        let mut args = vec![
            "--database".to_owned(),
            database,
            "--admin-token-file".to_owned(),
            admin_token.clone(),
            "--lease-secs".to_owned(),
            "6".to_owned(),
            "--heartbeat-secs".to_owned(),
            "1".to_owned(),
        ];
        args.extend(weed.server_args("farm"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut first = harness.start_server_with_client_token("first", Some(&client_token), &args);
        let mut second =
            harness.start_server_with_client_token("second", Some(&client_token), &args);
        for server in [&mut first, &mut second] {
            server.admin_token_file = admin_token.clone().into();
        }
        Replicas {
            first,
            second,
            admin_token,
            client_token: client_token.display().to_string(),
            _weed: weed,
        }
    }

    /// `kiln ARGS --server URL --token-file ADMIN_TOKEN`, which must succeed.
    fn operator(&self, harness: &Harness, url: &str, args: &[&str]) -> Run {
        let mut all = args.to_vec();
        all.extend(["--server", url, "--token-file", &self.admin_token]);
        let run = run_kiln(harness.path(), &all, &[]);
        harness.check(run.code == 0, || format!("kiln {all:?}: {run:?}"));
        run
    }

    /// A client serving the farm at `url`, with two slots.
    fn client(&self, harness: &Harness, id: &str, url: &str) -> Client {
        let args = [
            "client",
            "--server",
            url,
            "--id",
            id,
            "--token-file",
            &self.client_token,
            "--include",
            "*",
            "--slots",
            "2",
        ]
        .map(str::to_owned);
        harness.start_client_with_args(id, &args)
    }
}

/// The jobs of the gated builds below: each notes its run in `runs`, then waits for
/// `gate`.
fn gated_jobs(ids: &[&str], gate: &Path, runs: &Path) -> Vec<Job> {
    let install = format!(
        "echo \"$KILN_JOB_ID\" >> '{}'\n{}",
        runs.display(),
        wait_for_gate(gate)
    );
    ids.iter()
        .map(|id| Job::new(id, "PRO").install(&install))
        .collect()
}

/// Runs a gated build of four jobs through `url` on two clients, kills the first
/// replica once every job runs, and checks that every job finishes on its first
/// attempt, past a whole lease, and that the build releases through `url`.
fn outlive_the_first_replica(harness: &Harness, farm: &mut Replicas, url: &str) -> Vec<Client> {
    let gate = harness.path().join("gate");
    let runs = harness.path().join("runs");
    let ids = ["one", "two", "three", "four"];
    let manifest = write_build(
        &harness.mkdir("build"),
        "1420",
        &gated_jobs(&ids, &gate, &runs),
    );
    let submit = farm.operator(harness, url, &["submit", &manifest.display().to_string()]);
    let build = submit.last_line().to_owned();
    let clients = vec![
        farm.client(harness, "left", url),
        farm.client(harness, "right", url),
    ];
    let second = &farm.second;
    wait_until_within(
        harness.path(),
        "the four jobs to run",
        Duration::from_secs(60),
        || {
            let jobs = second.jobs(&build);
            jobs.iter()
                .all(|job| text(job, "state") == "running")
                .then_some(())
        },
        || format!("{:#?}", second.jobs(&build)),
    );

    farm.first.process.kill();
    let killed = std::time::Instant::now();
    wait_until_within(
        harness.path(),
        "both clients to hold their sessions on the second replica",
        Duration::from_secs(30),
        || (health(second)["clients_connected"] == 2).then_some(()),
        || format!("{:#}", health(second)),
    );
    eprintln!(
        "both clients held sessions on the second replica {:?} after the first was killed",
        killed.elapsed()
    );
    // Operator commands through `url` go to the replica that answers.
    farm.operator(harness, url, &["status", &build]);
    // Past a whole lease since the kill, every job is still on its first run.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(killed.elapsed()));
    for job in second.jobs(&build) {
        assert_eq!(text(&job, "state"), "running", "{job:#}");
        assert_eq!(job["attempt"], 1, "{job:#}");
    }

    std::fs::write(&gate, "").expect("opening the gate");
    for job in &second.wait_for_build_end(&build) {
        assert_eq!(text(job, "state"), "finished", "{job:#}");
        assert_eq!(job["attempt"], 1, "{job:#}");
    }
    let runs = std::fs::read_to_string(&runs).expect("the runs file");
    assert_eq!(runs.lines().count(), 4, "each job ran once: {runs:?}");
    let events = second.events(&build);
    for job in ids {
        let states: Vec<&str> = events_of(&events, job)
            .iter()
            .map(|event| text(event, "to"))
            .collect();
        assert_eq!(states, ["queued", "running", "finished"], "{events:#?}");
    }
    let release_dir = harness.path().join("release");
    farm.operator(
        harness,
        url,
        &[
            "release",
            &build,
            "--to",
            &release_dir.display().to_string(),
        ],
    );
    let sums = std::fs::read_to_string(release_dir.join(&build).join("SHA256SUMS"))
        .expect("the release's SHA256SUMS");
    assert_eq!(sums.lines().count(), 4, "one image per job: {sums}");
    clients
}

#[test]
fn the_replica_holding_the_clients_sessions_killed_mid_build_and_every_job_finishes_on_its_first_attempt(
) {
    let harness = Harness::new("postgres-replica-killed")
        .with_env("AWS_ACCESS_KEY_ID", S3_KEY)
        .with_env("AWS_SECRET_ACCESS_KEY", S3_SECRET);
    let mut farm = Replicas::start(&harness);
    // The clients and the operator are given both URLs: the clients' calls and
    // sessions go to the first until it dies.
    let url = format!("{},{}", farm.first.url, farm.second.url);
    assert_eq!(health(&farm.second)["clients_connected"], 0);
    outlive_the_first_replica(&harness, &mut farm, &url);
}

#[test]
fn two_replicas_behind_nginx_serve_one_url_outlive_a_replica_and_still_notice_a_dead_client() {
    let harness = Harness::new("postgres-nginx")
        .with_env("AWS_ACCESS_KEY_ID", S3_KEY)
        .with_env("AWS_SECRET_ACCESS_KEY", S3_SECRET);
    let mut farm = Replicas::start(&harness);
    let nginx = LoadBalancer::start(
        &harness.mkdir("nginx"),
        &[&farm.first.url, &farm.second.url],
    );
    let url = nginx.url().to_owned();
    let mut clients = outlive_the_first_replica(&harness, &mut farm, &url);
    let second = &farm.second;

    // A client that dies is noticed through the proxy as directly: its session's
    // connection closes, and its job is queued again at once, not after the lease.
    let gate = harness.path().join("late-gate");
    let runs = harness.path().join("late-runs");
    let manifest = write_build(
        &harness.mkdir("late"),
        "1421",
        &gated_jobs(&["late"], &gate, &runs),
    );
    let submit = farm.operator(&harness, &url, &["submit", &manifest.display().to_string()]);
    let build = submit.last_line().to_owned();
    let job = second.wait_for_job(&build, "late", "to run", |job| {
        text(job, "state") == "running"
    });
    let holder = text(&job, "client_id").to_owned();
    let doomed = clients
        .iter_mut()
        .find(|client| client.id == holder)
        .expect("the job's client is one of ours");
    doomed.process.kill();
    std::fs::write(&gate, "").expect("opening the gate");
    let job = second.wait_for_job(&build, "late", "to finish on the other client", |job| {
        text(job, "state") == "finished"
    });
    assert_ne!(text(&job, "client_id"), holder, "{job:#}");
    assert_eq!(job["attempt"], 2, "{job:#}");
    let events = second.events(&build);
    let requeue = first_requeue(&events, "late");
    assert_eq!(
        text(requeue, "reason"),
        "client connection lost",
        "the session's end came through nginx: {requeue:#}\n{}",
        nginx.logs()
    );
}

/// A server's `GET /v1/health` answer.
fn health(server: &Server) -> serde_json::Value {
    serde_json::from_str(&server.get("/v1/health").body).expect("the health answer is JSON")
}
