//! Clients' own identities: a client enrolls once with the join token and keeps its
//! secret; the server keeps only a slow hash of it; a revoked client is refused and
//! cannot enroll again until an operator issues it a new secret, which it then uses
//! as its USERNAME and PASSWORD; the join token can be rotated and disabled.

use crate::common;

use crate::common::{http, text, wait_until, write_build, Harness, Job, Server};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The client's kept secret for `server`, and the file it is in.
fn kept_secret(work: &Path, server: &Server) -> (String, PathBuf) {
    for path in files_under(&work.join("credentials")) {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(kept) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if kept["server"] == server.url.as_str() {
            return (kept["secret"].as_str().expect("secret").to_owned(), path);
        }
    }
    panic!("no kept secret for {} under {}", server.url, work.display())
}

fn enroll_status(server: &Server, token: &str, id: &str) -> (u16, String) {
    let response = http(
        &server.url,
        "POST",
        "/v1/enroll",
        &[("Authorization", &format!("Bearer {token}"))],
        Some(&format!(r#"{{"client_id":"{id}"}}"#)),
    )
    .expect("enroll");
    (response.status, response.body)
}

fn finished_by(server: &Server, build: &str, job: &str) -> String {
    let ended = server.wait_for_build_end(build);
    let job = ended
        .iter()
        .find(|status| text(status, "id") == job)
        .expect("the job");
    assert_eq!(text(job, "state"), "finished", "{job:#}");
    text(job, "client_id").to_owned()
}

#[test]
fn a_client_enrolls_once_a_revoked_one_is_refused_and_an_issued_secret_brings_it_back() {
    let harness = Harness::new("identities");
    let server = harness.start_server("main", &[]);
    let build = server.submit(&write_build(
        &harness.mkdir("b1"),
        "501",
        &[Job::new("one", "PRO").install("echo one")],
    ));
    let mut client = harness.start_client("rack1", &[&server], &["--include", "*"]);
    assert_eq!(finished_by(&server, &build, "one"), "rack1");

    // The secret it enrolled with is in its work directory, for its user only, and
    // nowhere in the server's data directory: the store has an argon2id hash.
    let (secret, kept) = kept_secret(&client.work_dir, &server);
    let mode = std::fs::metadata(&kept)
        .expect("kept file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{} is mode {mode:o}", kept.display());
    for path in files_under(&server.data) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !contains(&bytes, secret.as_bytes()),
            "the client's secret is in {}",
            path.display()
        );
    }
    let listed = common::run_kiln(
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
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).expect("list JSON");
    assert_eq!(listed[0]["client_id"], "rack1", "{listed:#}");
    assert_eq!(listed[0]["origin"], "enrolled", "{listed:#}");
    assert!(!listed.to_string().contains(&secret));

    // Restarted, it calls with the kept secret: no second enrollment.
    client.process.kill();
    let client = harness.start_client("rack1", &[&server], &["--include", "*"]);
    let build = server.submit(&write_build(
        &harness.mkdir("b2"),
        "502",
        &[Job::new("one", "PRO").install("echo two")],
    ));
    assert_eq!(finished_by(&server, &build, "one"), "rack1");
    let server_log = std::fs::read_to_string(harness.path().join("server-main.log")).unwrap();
    assert_eq!(
        server_log.matches("client enrolled").count(),
        1,
        "one enrollment: {server_log}"
    );
    // Another id cannot enroll over it, even with the join token.
    let (status, body) = enroll_status(&server, &server.client_token(), "rack1");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("enrolled already"), "{body}");

    // Revoked through the API: its claims are refused, it cannot enroll again, and a
    // job submitted now stays queued.
    let revoked = common::run_kiln(
        harness.path(),
        &[
            "server",
            "client",
            "revoke",
            "rack1",
            "--server",
            &server.url,
            "--token-file",
            &server.admin_token_file.display().to_string(),
        ],
        &[],
    );
    assert_eq!(revoked.code, 0, "{revoked:?}");
    let build = server.submit(&write_build(
        &harness.mkdir("b3"),
        "503",
        &[Job::new("one", "PRO").install("echo three")],
    ));
    let client_log = harness.path().join("client-rack1.log");
    wait_until(
        harness.path(),
        "the revoked client to say it is refused",
        || {
            std::fs::read_to_string(&client_log)
                .ok()
                .filter(|log| log.contains("was revoked"))
        },
        || std::fs::read_to_string(&client_log).unwrap_or_default(),
    );
    assert_eq!(text(&server.status_of(&build, "one"), "state"), "queued");
    let (status, body) = enroll_status(&server, &server.client_token(), "rack1");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    drop(client);

    // An operator issues a new secret straight in the data directory, while the
    // server runs; the client is given it as its own (--id and the secret).
    let issued = common::run_kiln(
        harness.path(),
        &[
            "server",
            "client",
            "add",
            "rack1",
            "--data",
            &server.data.display().to_string(),
        ],
        &[],
    );
    assert_eq!(issued.code, 0, "{issued:?}");
    let new_secret = issued.last_line().to_owned();
    assert_eq!(new_secret.len(), 64, "{issued:?}");
    let secret_file = harness.path().join("rack1.secret");
    std::fs::write(&secret_file, format!("{new_secret}\n")).unwrap();
    let config = harness.path().join("rack1.toml");
    std::fs::write(
        &config,
        format!(
            "id = \"rack1\"\ninclude = [\"*\"]\n\n[[server]]\nurl = \"{}\"\nusername = \"rack1\"\npassword = \"{new_secret}\"\n",
            server.url
        ),
    )
    .unwrap();
    let _client = harness.start_client_with_args(
        "rack1-again",
        &[
            "client".into(),
            "--config".into(),
            config.display().to_string(),
        ],
    );
    assert_eq!(finished_by(&server, &build, "one"), "rack1");
    // The old secret stays refused.
    let old = http(
        &server.url,
        "GET",
        "/v1/whoami",
        &[("Authorization", &common::basic_auth("rack1", &secret))],
        None,
    )
    .unwrap();
    assert_eq!(old.status, 401, "{old:?}");
}

#[test]
fn the_join_token_rotates_and_disables_and_stays_disabled_across_a_restart() {
    let harness = Harness::new("join-token");
    let mut server = harness.start_server("main", &[]);
    let first = server.client_token();
    let admin = server.admin_token_file.display().to_string();
    let rotated = common::run_kiln(
        harness.path(),
        &[
            "server",
            "join-token",
            "rotate",
            "--server",
            &server.url,
            "--token-file",
            &admin,
        ],
        &[],
    );
    assert_eq!(rotated.code, 0, "{rotated:?}");
    let second = rotated.last_line().to_owned();
    assert_ne!(second, first);
    assert_eq!(
        server.client_token(),
        second,
        "the token file holds the new token"
    );
    assert_eq!(enroll_status(&server, &first, "a").0, 401);
    let (status, body) = enroll_status(&server, &second, "a");
    assert_eq!(status, 201, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let own = common::basic_auth("a", answer["secret"].as_str().unwrap());

    let disabled = common::run_kiln(
        harness.path(),
        &[
            "server",
            "join-token",
            "disable",
            "--server",
            &server.url,
            "--token-file",
            &admin,
        ],
        &[],
    );
    assert_eq!(disabled.code, 0, "{disabled:?}");
    assert_eq!(enroll_status(&server, &second, "b").0, 401);
    // Disabled survives a restart; the word in the file is no token either.
    let data = server.data.clone();
    let listen = server.url.trim_start_matches("http://").to_owned();
    server.process.kill();
    drop(server);
    let server = harness.start_server_at("main", &listen, &data, None, &[]);
    assert_eq!(enroll_status(&server, &second, "b").0, 401);
    assert_eq!(enroll_status(&server, "disabled", "b").0, 401);
    // A client enrolled before keeps working with its own secret.
    let whoami = http(
        &server.url,
        "GET",
        "/v1/whoami",
        &[("Authorization", &own)],
        None,
    )
    .unwrap();
    assert_eq!(whoami.status, 200, "{whoami:?}");
    assert!(whoami.body.contains(r#""client_id":"a""#), "{whoami:?}");
}
