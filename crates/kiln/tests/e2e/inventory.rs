//! The client inventory (`kiln clients`, `GET /v1/clients`): who a server's clients
//! are, what each runs now, and what became of the jobs each took — finished, failed,
//! lost, and the bytes of the images it made — kept across a server restart.

use crate::common::{
    http, kill_process_group, text, wait_for_gate, wait_until, write_build, Harness, Job, Server,
};
use serde_json::Value;

/// The version every client of this workspace announces.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `kiln clients --json`, which must succeed with a JSON array.
fn clients_json(server: &Server) -> Vec<Value> {
    let run = server.kiln(&["clients", "--json"]);
    if run.code != 0 {
        server.fail(&format!("kiln clients --json failed: {run:?}"));
    }
    match serde_json::from_str::<Value>(&run.stdout) {
        Ok(Value::Array(clients)) => clients,
        _ => server.fail(&format!(
            "kiln clients --json did not print a JSON array: {run:?}"
        )),
    }
}

/// The entry of client `id` in `clients`.
fn entry(server: &Server, clients: &[Value], id: &str) -> Value {
    clients
        .iter()
        .find(|client| client["id"] == id)
        .cloned()
        .unwrap_or_else(|| server.fail(&format!("no client {id} in {clients:#?}")))
}

/// A client's held jobs as `BUILD/JOB` names.
fn held_names(client: &Value) -> Vec<String> {
    client["held"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|held| format!("{}/{}", text(held, "build"), text(held, "job")))
        .collect()
}

/// The counters of a client's history: (claimed, finished, failed, lost, image bytes).
fn history(client: &Value) -> [u64; 5] {
    [
        "n_claimed",
        "n_finished",
        "n_failed",
        "n_lost",
        "image_bytes",
    ]
    .map(|field| client[field].as_u64().unwrap_or(u64::MAX))
}

/// The total size the server recorded for the images of `build`'s jobs that `client_id`
/// finished.
fn image_bytes_of(server: &Server, build: &str, client_id: &str) -> u64 {
    let response = server.get(&format!("/v1/builds/{build}/images"));
    assert_eq!(response.status, 200, "{response:?}");
    let images: Vec<Value> = serde_json::from_str(&response.body).expect("a JSON array");
    let jobs = server.jobs(build);
    images
        .iter()
        .filter(|image| {
            jobs.iter()
                .any(|job| job["id"] == image["job_id"] && text(job, "client_id") == client_id)
        })
        .map(|image| image["size"].as_u64().expect("an image size"))
        .sum()
}

#[test]
fn clients_shows_each_client_with_its_running_jobs_and_a_history_that_survives_a_server_restart() {
    let harness = Harness::new("inventory");
    let server_args = ["--lease-secs", "3", "--heartbeat-secs", "1"];
    let server = harness.start_server("first", &server_args);
    let gate = harness.path().join("gate");
    let waits = wait_for_gate(&gate);
    let first = server.submit(&write_build(
        &harness.mkdir("build-first"),
        "800",
        &[
            Job::new("pro", "PRO").install(&waits),
            Job::new("home", "HOME").install(&waits),
        ],
    ));
    let _alpha = harness.start_client("alpha", &[&server], &["--include", "PRO", "--slots", "2"]);
    let mut beta = harness.start_client(
        "beta",
        &[&server],
        &["--include", "HOME,SERVER", "--slots", "1"],
    );
    server.wait_for_job(&first, "pro", "running on alpha", |job| {
        text(job, "state") == "running" && text(job, "client_id") == "alpha"
    });
    server.wait_for_job(&first, "home", "running on beta", |job| {
        text(job, "state") == "running" && text(job, "client_id") == "beta"
    });

    // Both steps wait at the gate: each client holds its job now.
    let clients = clients_json(&server);
    let ids: Vec<&str> = clients.iter().map(|client| text(client, "id")).collect();
    assert_eq!(ids, ["alpha", "beta"], "{clients:#?}");
    let alpha_now = entry(&server, &clients, "alpha");
    assert_eq!(
        alpha_now["include"],
        serde_json::json!(["PRO"]),
        "{alpha_now:#}"
    );
    assert_eq!(alpha_now["slots"], 2, "{alpha_now:#}");
    assert_eq!(text(&alpha_now, "version"), VERSION, "{alpha_now:#}");
    assert_eq!(text(&alpha_now, "address"), "127.0.0.1", "{alpha_now:#}");
    assert_eq!(
        held_names(&alpha_now),
        [format!("{first}/pro")],
        "{alpha_now:#}"
    );
    let beta_now = entry(&server, &clients, "beta");
    assert_eq!(
        beta_now["include"],
        serde_json::json!(["HOME", "SERVER"]),
        "{beta_now:#}"
    );
    assert_eq!(beta_now["slots"], 1, "{beta_now:#}");
    assert_eq!(text(&beta_now, "version"), VERSION, "{beta_now:#}");
    assert_eq!(text(&beta_now, "address"), "127.0.0.1", "{beta_now:#}");
    assert_eq!(
        held_names(&beta_now),
        [format!("{first}/home")],
        "{beta_now:#}"
    );
    for client in [&alpha_now, &beta_now] {
        assert_eq!(history(client), [1, 0, 0, 0, 0], "{client:#}");
        let first_seen = client["first_seen"].as_i64().expect("first_seen");
        let last_contact = client["last_contact"].as_i64().expect("last_contact");
        assert!(last_contact >= first_seen && first_seen > 0, "{client:#}");
    }
    wait_until(
        harness.path(),
        "both clients to show an open session",
        || {
            let clients = clients_json(&server);
            clients
                .iter()
                .all(|client| client["session_open"] == true)
                .then_some(())
        },
        || format!("{:#?}", clients_json(&server)),
    );

    std::fs::write(&gate, "").expect("opening the gate");
    let ended = server.wait_for_build_end(&first);
    assert!(
        ended.iter().all(|job| text(job, "state") == "finished"),
        "{ended:#?}"
    );

    // alpha fails a job for good (a script exit, no retries); beta is SIGKILLed in
    // the middle of one, which is taken back and, on its only attempt, fails as lost.
    let second_gate = harness.path().join("second-gate");
    let second = server.submit(&write_build(
        &harness.mkdir("build-second"),
        "801",
        &[
            Job::new("broken", "PRO").install("echo 'no disk' >&2\nexit 1\n"),
            Job::new("orphaned", "HOME")
                .install(&wait_for_gate(&second_gate))
                .max_attempts(1),
        ],
    ));
    let broken = server.wait_for_job(&second, "broken", "to fail", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    assert_eq!(text(&broken, "state"), "failed", "{broken:#}");
    assert_eq!(text(&broken, "client_id"), "alpha", "{broken:#}");
    let held = wait_until(
        harness.path(),
        "beta's state file to hold the job with its step's pgid",
        || {
            beta.held_job(&second, "orphaned")
                .filter(|held| held["pgid"].is_i64())
        },
        || format!("{:?}", beta.state()),
    );
    let orphan_pgid = held["pgid"].as_i64().expect("a pgid") as i32;
    beta.process.kill();
    let orphaned = server.wait_for_job(&second, "orphaned", "to be taken back", |job| {
        !matches!(text(job, "state"), "queued" | "running")
    });
    // A step its client died without stopping: end it.
    kill_process_group(orphan_pgid);
    assert_eq!(text(&orphaned, "state"), "failed", "{orphaned:#}");
    assert!(text(&orphaned, "error").starts_with("lost"), "{orphaned:#}");

    let alpha_bytes = image_bytes_of(&server, &first, "alpha");
    let beta_bytes = image_bytes_of(&server, &first, "beta");
    assert!(
        alpha_bytes > 0 && beta_bytes > 0,
        "each finished job left an image"
    );
    let expected_alpha = [2, 1, 1, 0, alpha_bytes];
    let expected_beta = [2, 1, 0, 1, beta_bytes];
    let clients = wait_until(
        harness.path(),
        "beta's session to be seen closed",
        || {
            let clients = clients_json(&server);
            (entry(&server, &clients, "beta")["session_open"] == false).then_some(clients)
        },
        || format!("{:#?}", clients_json(&server)),
    );
    let alpha_after = entry(&server, &clients, "alpha");
    let beta_after = entry(&server, &clients, "beta");
    assert_eq!(history(&alpha_after), expected_alpha, "{alpha_after:#}");
    assert_eq!(history(&beta_after), expected_beta, "{beta_after:#}");
    assert!(held_names(&alpha_after).is_empty(), "{alpha_after:#}");
    assert!(held_names(&beta_after).is_empty(), "{beta_after:#}");

    // The table marks both: alpha failed a job, beta lost one.
    let table = server.kiln(&["clients"]);
    harness.check(table.code == 0, || format!("kiln clients: {table:?}"));
    for id in ["alpha", "beta"] {
        let row = table
            .stdout
            .lines()
            .find(|line| line.starts_with(id))
            .unwrap_or_else(|| harness.fail(&format!("no row for {id}: {table:?}")));
        assert!(row.ends_with('!'), "{id} is marked: {table:?}");
        assert!(row.contains("127.0.0.1"), "{table:?}");
    }

    // A server SIGKILLed and started again on its data keeps every client's history.
    let listen = server.url.trim_start_matches("http://").to_owned();
    let data = server.data.clone();
    let client_token_file = server.client_token_file.clone();
    drop(server);
    let server = harness.start_server_at(
        "restarted",
        &listen,
        &data,
        Some(&client_token_file),
        &server_args,
    );
    let clients = clients_json(&server);
    let alpha_restarted = entry(&server, &clients, "alpha");
    let beta_restarted = entry(&server, &clients, "beta");
    assert_eq!(
        history(&alpha_restarted),
        expected_alpha,
        "{alpha_restarted:#}"
    );
    assert_eq!(
        history(&beta_restarted),
        expected_beta,
        "{beta_restarted:#}"
    );
    // beta is dead: all of it comes from the store.
    assert_eq!(
        beta_restarted["include"],
        serde_json::json!(["HOME", "SERVER"]),
        "{beta_restarted:#}"
    );
    assert_eq!(beta_restarted["slots"], 1, "{beta_restarted:#}");
    assert_eq!(
        text(&beta_restarted, "version"),
        VERSION,
        "{beta_restarted:#}"
    );
    assert_eq!(
        text(&beta_restarted, "address"),
        "127.0.0.1",
        "{beta_restarted:#}"
    );
    assert_eq!(beta_restarted["first_seen"], beta_now["first_seen"]);
    // Its finish and its last claim came after the contact seen then, and wrote theirs.
    assert!(
        beta_restarted["last_contact"]
            .as_i64()
            .expect("last_contact")
            > beta_now["last_contact"].as_i64().expect("last_contact"),
        "{beta_restarted:#} {beta_now:#}"
    );
    assert_eq!(beta_restarted["session_open"], false, "{beta_restarted:#}");
}

#[test]
fn the_client_list_is_refused_without_the_admin_credential() {
    let harness = Harness::new("inventory-auth");
    let server = harness.start_server("main", &[]);
    let no_credential = http(&server.url, "GET", "/v1/clients", &[], None).expect("GET");
    assert_eq!(no_credential.status, 401, "{no_credential:?}");
    let client_auth = format!("Bearer {}", server.client_token());
    let client_credential = http(
        &server.url,
        "GET",
        "/v1/clients",
        &[("Authorization", &client_auth)],
        None,
    )
    .expect("GET");
    assert_eq!(client_credential.status, 403, "{client_credential:?}");
    let admin = server.get("/v1/clients");
    assert_eq!(admin.status, 200, "{admin:?}");
    assert_eq!(admin.body, "[]");
}
