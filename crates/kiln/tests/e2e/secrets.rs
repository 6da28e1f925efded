//! Secrets stay secret: after a whole build through a master (a job that finishes, one
//! that fails, one that prints its environment), no credential — admin, client or
//! server — appears in any process's log (at debug level), the build's events, the
//! jobs' status, the job logs, the client inventory, the master's list or the metrics;
//! a wrong credential is not echoed back; and a job's steps do not inherit the
//! client credential from the client's environment.

use crate::common;

use crate::common::{run_kiln, write_build, Harness, Job};
use std::path::Path;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

#[test]
fn no_credential_appears_in_logs_events_status_or_job_environments() {
    // Every process this test starts logs at debug level, HTTP and SQL included.
    // SAFETY: the only test in this binary; set before any thread of ours reads it.
    unsafe { std::env::set_var("RUST_LOG", "debug") };
    let harness = Harness::new("secrets");
    let client_token = harness.path().join("client.secret");
    std::fs::write(&client_token, "client-secret-3f9a1c7e5b2d\n").expect("writing a token");
    let client_arg = client_token.display().to_string();
    let master = harness.start_master("m", &["--client-token-file", &client_arg]);
    let server_token = master.server_token_file.display().to_string();
    let server = harness.start_server_with_client_token(
        "s",
        Some(&client_token),
        &[
            "--master",
            &master.url,
            "--master-token-file",
            &server_token,
        ],
    );

    // The client gets its credential from KILN_TOKEN, as operators often start it.
    let client_secret = read(&client_token).trim().to_owned();
    let _client = harness.start_client_with_env(
        "keeper",
        &[
            "client".into(),
            "--master".into(),
            master.url.clone(),
            "--id".into(),
            "keeper".into(),
            "--include".into(),
            "*".into(),
            "--wait-secs".into(),
            "5".into(),
        ],
        &[("KILN_TOKEN", &client_secret)],
    );
    let build = server.submit(&write_build(
        &harness.mkdir("b"),
        "900",
        &[
            Job::new("ok", "PRO"),
            Job::new("broken", "PRO").install("echo failing on purpose >&2\nexit 1\n"),
            Job::new("nosy", "PRO").install("env\n"),
        ],
    ));
    let jobs = server.wait_for_build_end(&build);
    let state = |id: &str| {
        jobs.iter()
            .find(|job| job["id"] == id)
            .map(|job| job["state"].clone())
    };
    assert_eq!(state("ok"), Some("finished".into()), "{jobs:?}");
    assert_eq!(state("broken"), Some("failed".into()), "{jobs:?}");
    assert_eq!(state("nosy"), Some("finished".into()), "{jobs:?}");

    // A wrong credential is refused without being repeated.
    let wrong = harness.path().join("wrong.secret");
    std::fs::write(&wrong, "wrong-secret-8d41e0b6\n").expect("writing a token");
    let refused = run_kiln(
        harness.path(),
        &[
            "status",
            "--server",
            &server.url,
            "--token-file",
            &wrong.display().to_string(),
        ],
        &[],
    );
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        !refused.stderr.contains("wrong-secret-8d41e0b6"),
        "{refused:?}"
    );

    // Everything an operator or a log reader sees.
    let mut seen = Vec::new();
    for args in [
        vec!["events", build.as_str(), "--json"],
        vec!["status", build.as_str(), "--json"],
        vec!["logs", "900/ok"],
        vec!["logs", "900/broken"],
        vec!["logs", "900/nosy"],
        vec!["clients", "--json"],
        vec!["storage", "--json"],
    ] {
        let run = server.kiln(&args);
        assert_eq!(run.code, 0, "kiln {args:?}: {run:?}");
        seen.push((format!("kiln {}", args.join(" ")), run.stdout + &run.stderr));
    }
    let nosy = &seen[4].1;
    assert!(
        nosy.contains("KILN_JOB_ID=nosy"),
        "the nosy job printed its environment: {nosy}"
    );
    seen.push(("GET /metrics".into(), server.get("/metrics").body));
    let auth = format!("Bearer {client_secret}");
    let list = common::http(
        &master.url,
        "GET",
        "/v1/servers?all=true",
        &[("Authorization", &auth)],
        None,
    )
    .expect("reading the master's list");
    assert_eq!(list.status, 200, "{}", list.body);
    seen.push(("the master's list".into(), list.body));
    let logs = common::read_logs(harness.path());
    assert!(
        logs.len() >= 3,
        "the master, server and client logs were read"
    );
    seen.extend(logs);
    let client_log = &seen
        .iter()
        .find(|(name, _)| name.ends_with("client-keeper.log"))
        .expect("the client's log")
        .1;
    assert!(
        client_log.contains("DEBUG"),
        "the client logged at debug level: {client_log}"
    );

    // The secret the client enrolled with, as it is kept and as it travels.
    let kept_dir = harness.path().join("keeper-work").join("credentials");
    let kept: Vec<serde_json::Value> = std::fs::read_dir(&kept_dir)
        .expect("the client keeps its enrolled secret")
        .map(|entry| serde_json::from_str(&read(&entry.expect("an entry").path())).expect("JSON"))
        .collect();
    assert_eq!(kept.len(), 1, "one server, one kept secret: {kept:?}");
    let own_secret = kept[0]["secret"].as_str().expect("a secret").to_owned();
    let own_header = common::basic_auth("keeper", &own_secret);
    let own_header = own_header.trim_start_matches("Basic ").to_owned();
    let listed = run_kiln(
        harness.path(),
        &[
            "server",
            "client",
            "list",
            "--json",
            "--data",
            &server.data.display().to_string(),
        ],
        &[],
    );
    assert_eq!(listed.code, 0, "{listed:?}");
    assert!(listed.stdout.contains("keeper"), "{listed:?}");
    seen.push(("kiln server client list".into(), listed.stdout));

    let secrets = [
        ("client's own", own_secret),
        ("client's own (as sent)", own_header),
        ("admin", read(&server.admin_token_file).trim().to_owned()),
        ("client", client_secret.clone()),
        ("server", read(&master.server_token_file).trim().to_owned()),
        (
            "master admin",
            read(&master.admin_token_file).trim().to_owned(),
        ),
    ];
    common::assert_no_secret_in(&secrets, &seen);
}
