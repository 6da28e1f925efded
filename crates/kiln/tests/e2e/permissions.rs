//! The permission matrix: every endpoint the server's router serves × every kind of
//! caller, against a real server. The endpoints come from the router's own table
//! (`kiln_server::api::endpoints`); what each caller may do is written out here, by
//! hand, so that a new endpoint without a row fails this test, and a row whose access
//! changes fails it too.
//!
//! A cell passes when the server lets the call through (any answer but 401, 403 or a
//! 5xx: a call let through may still be refused for its body or its state) or refuses
//! it with the status the matrix names.

use crate::common::{basic_auth, http, write_build, Harness, HttpResponse, Job, Server};
use serde_json::Value;
use std::collections::BTreeMap;

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    /// No Authorization header.
    Nobody,
    /// A client's id with a secret that is not its own.
    WrongSecret,
    /// A client whose credential was revoked.
    Revoked,
    /// The join token.
    Join,
    /// A live client that does not hold the job (nor any job of the build).
    OtherClient,
    /// The client holding the job named in the path.
    Holder,
    /// The admin token.
    Admin,
}

const EVERYONE: [Who; 7] = [
    Who::Nobody,
    Who::WrongSecret,
    Who::Revoked,
    Who::Join,
    Who::OtherClient,
    Who::Holder,
    Who::Admin,
];

/// What a cell expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Let through.
    Through,
    /// 401: no valid credential.
    Unauthenticated,
    /// 403: a valid credential without the right.
    Forbidden,
}

use Expect::{Forbidden as F, Through as T, Unauthenticated as U};

/// The matrix: for each endpoint, the expectation per caller in the order of
/// [`EVERYONE`] (nobody, wrong secret, revoked, join token, other client, holder,
/// admin).
fn matrix() -> BTreeMap<(&'static str, &'static str), [Expect; 7]> {
    // Shapes shared by many rows.
    let admin = [U, U, U, F, F, F, T];
    let read_build = [U, U, U, F, F, T, T];
    let client = [U, U, U, F, F, T, F];
    let holder = [U, U, U, F, F, T, F];
    // Reads not tied to a build: the admin's.
    let read_unscoped = [U, U, U, F, F, F, T];
    BTreeMap::from([
        (("GET", "/"), [T, T, T, T, T, T, T]),
        (("GET", "/ui/{asset}"), [T, T, T, T, T, T, T]),
        (("GET", "/ui/session"), [T, T, T, T, T, T, T]),
        (("POST", "/ui/login"), [T, T, T, T, T, T, T]),
        (("POST", "/ui/logout"), [T, T, T, T, T, T, T]),
        (("GET", "/v1/health"), [T, T, T, T, T, T, T]),
        (("GET", "/v1/openapi.json"), [T, T, T, T, T, T, T]),
        (("GET", "/v1/whoami"), [U, U, U, T, T, T, T]),
        (("GET", "/v1/builds"), admin),
        (("POST", "/v1/builds"), admin),
        (("GET", "/v1/builds/{build}"), read_build),
        (("DELETE", "/v1/builds/{build}"), admin),
        (("GET", "/v1/builds/{build}/jobs"), read_build),
        (("GET", "/v1/builds/{build}/relbuild.xml"), read_build),
        (("GET", "/v1/builds/{build}/events"), read_build),
        (("GET", "/v1/builds/{build}/images"), read_build),
        (("GET", "/v1/builds/{build}/stream"), read_build),
        (("GET", "/v1/builds/{build}/files"), read_build),
        (("POST", "/v1/claim"), client),
        (("POST", "/v1/offer"), client),
        (("GET", "/v1/clients"), admin),
        (("POST", "/v1/enroll"), [U, U, U, T, F, F, T]),
        (("GET", "/v1/credentials"), admin),
        (("POST", "/v1/credentials/{client}"), admin),
        (("DELETE", "/v1/credentials/{client}"), admin),
        (("POST", "/v1/join-token"), admin),
        (("POST", "/v1/session"), client),
        (("GET", "/v1/jobs/{build}/{job}"), read_build),
        (("GET", "/v1/jobs/{build}/{job}/status.xml"), read_build),
        (("GET", "/v1/jobs/{build}/{job}/log"), read_build),
        (("GET", "/v1/jobs/{build}/{job}/stream"), read_build),
        (("POST", "/v1/jobs/{build}/{job}/log"), holder),
        (("POST", "/v1/jobs/{build}/{job}/heartbeat"), holder),
        (("POST", "/v1/jobs/{build}/{job}/finish"), holder),
        (("POST", "/v1/jobs/{build}/{job}/fail"), holder),
        (("POST", "/v1/jobs/{build}/{job}/release"), holder),
        (("POST", "/v1/jobs/{build}/{job}/giveup"), holder),
        (("POST", "/v1/jobs/{build}/{job}/restart"), admin),
        (("POST", "/v1/jobs/{build}/{job}/cancel"), admin),
        (("GET", "/v1/jobs/{build}/{job}/images/{name}"), read_build),
        (("PUT", "/v1/jobs/{build}/{job}/images/{name}"), holder),
        (
            ("GET", "/v1/jobs/{build}/{job}/images/{name}/index"),
            read_build,
        ),
        (
            ("POST", "/v1/jobs/{build}/{job}/images/{name}/commit"),
            holder,
        ),
        (("POST", "/v1/jobs/{build}/{job}/chunks/missing"), holder),
        (("POST", "/v1/jobs/{build}/{job}/chunks"), holder),
        (("POST", "/v1/chunks/fetch"), read_unscoped),
        (("GET", "/v1/stream"), admin),
        (("GET", "/v1/storage"), admin),
        (("GET", "/metrics"), admin),
    ])
}

/// The callers' Authorization headers.
struct Callers {
    headers: BTreeMap<Who, Option<String>>,
}

impl Callers {
    fn header(&self, who: Who) -> Option<&str> {
        self.headers[&who].as_deref()
    }
}

/// A job held by client "holder": a build of its own (so that whatever one row does to
/// it leaves the next row alone), claimed over the API.
struct Held {
    build: String,
    lease: String,
}

fn hold_a_job(harness: &Harness, server: &Server, callers: &Callers, n: usize) -> Held {
    let number = format!("7{n:02}");
    let dir = harness.mkdir(&format!("build-{number}"));
    // Each build outranks the ones before, whose jobs a row may have queued again.
    let build = server.submit(&write_build(
        &dir,
        &number,
        &[Job::new("one", "PRO")
            .install("sleep 600")
            .priority(n as i64)],
    ));
    let claim = http(
        &server.url,
        "POST",
        "/v1/claim",
        &[("Authorization", callers.header(Who::Holder).unwrap())],
        Some(r#"{"client_id":"holder","include":["*"],"wait_secs":5}"#),
    )
    .expect("claim");
    assert_eq!(
        claim.status, 200,
        "the holder claims build {build}: {claim:?}"
    );
    let claim: Value = serde_json::from_str(&claim.body).expect("claim JSON");
    assert_eq!(claim["build"], build.as_str(), "{claim:#}");
    Held {
        build,
        lease: claim["lease"].as_str().expect("lease").to_owned(),
    }
}

/// One call of `method path` as `who`, on the job `held`.
fn call(
    server: &Server,
    callers: &Callers,
    held: &Held,
    method: &str,
    path: &str,
    who: Who,
) -> HttpResponse {
    let mut url = path
        .replace("{build}", &held.build)
        .replace("{job}", "one")
        .replace("{name}", "disk.img")
        .replace("{client}", "someone-else")
        .replace("{asset}", "app.js");
    if path == "/v1/session" {
        url.push_str("?client_id=holder");
    }
    if path.ends_with("/files") {
        url.push_str("?job=one");
    }
    // Event streams send what is there and end, rather than follow.
    if path.ends_with("/stream") {
        url.push_str("?wait=0");
    }
    let mut headers: Vec<(&str, &str)> = vec![("x-kiln-lease", &held.lease)];
    if let Some(auth) = callers.header(who) {
        headers.push(("Authorization", auth));
    }
    // Claims and offers name the holder, and a config type no job has: let through,
    // they claim nothing. Other bodies do not parse: let through, they change nothing.
    let body = match (method, path) {
        (_, "/v1/claim" | "/v1/offer") => {
            Some(r#"{"client_id":"holder","include":["no-such-type"],"wait_secs":0}"#)
        }
        ("POST" | "PUT", _) => Some("this is not what the call takes"),
        _ => None,
    };
    http(&server.url, method, &url, &headers, body)
        .unwrap_or_else(|err| panic!("{method} {url} as {who:?}: {err}"))
}

fn outcome(response: &HttpResponse) -> Option<Expect> {
    match response.status {
        401 => Some(U),
        403 => Some(F),
        500..=599 => None,
        _ => Some(T),
    }
}

/// Starts a server with three enrolled clients (one of them then revoked).
fn start(harness: &Harness, extra: &[&str]) -> (Server, Callers) {
    let server = harness.start_server("main", extra);
    let holder = server.enroll("holder");
    let other = server.enroll("other");
    let revoked = server.enroll("gone");
    let revoke = http(
        &server.url,
        "DELETE",
        "/v1/credentials/gone",
        &[("Authorization", &format!("Bearer {}", server.admin_token()))],
        None,
    )
    .expect("revoke");
    assert_eq!(revoke.status, 204, "{revoke:?}");
    let headers = BTreeMap::from([
        (Who::Nobody, None),
        (
            Who::WrongSecret,
            Some(basic_auth("holder", &"0".repeat(64))),
        ),
        (Who::Revoked, Some(revoked)),
        (Who::Join, Some(format!("Bearer {}", server.client_token()))),
        (Who::OtherClient, Some(other)),
        (Who::Holder, Some(holder)),
        (Who::Admin, Some(format!("Bearer {}", server.admin_token()))),
    ]);
    (server, Callers { headers })
}

#[test]
fn every_endpoint_answers_every_kind_of_caller_as_the_matrix_says() {
    let harness = Harness::new("permissions");
    let (server, callers) = start(&harness, &["--lease-secs", "120"]);
    let expected = matrix();
    let served: BTreeMap<(String, String), ()> = kiln_server::http::endpoints()
        .into_iter()
        .map(|endpoint| ((endpoint.method.to_string(), endpoint.path.to_owned()), ()))
        .collect();
    let listed: BTreeMap<(String, String), ()> = expected
        .keys()
        .map(|(method, path)| ((method.to_string(), path.to_string()), ()))
        .collect();
    let unlisted: Vec<_> = served
        .keys()
        .filter(|key| !listed.contains_key(*key))
        .collect();
    let gone: Vec<_> = listed
        .keys()
        .filter(|key| !served.contains_key(*key))
        .collect();
    assert!(
        unlisted.is_empty() && gone.is_empty(),
        "the matrix and the router disagree: endpoints without a row {unlisted:?}, rows \
         without an endpoint {gone:?}"
    );

    // Rows that change the server for everyone run last: a session that ends takes the
    // holder's jobs back, and the admin's cell of the join-token row rotates it.
    let mut rows: Vec<_> = expected.iter().collect();
    rows.sort_by_key(|((_, path), _)| match *path {
        "/v1/session" => 1,
        "/v1/join-token" => 2,
        _ => 0,
    });
    let mut failures = Vec::new();
    let mut table = String::new();
    for (n, ((method, path), cells)) in rows.into_iter().enumerate() {
        let held = hold_a_job(&harness, &server, &callers, n);
        let mut line = format!("{method:6} {path:48}");
        for (who, want) in EVERYONE.iter().zip(cells) {
            let response = call(&server, &callers, &held, method, path, *who);
            let got = outcome(&response);
            line.push_str(&format!(" {:?}={}", who, response.status));
            if got != Some(*want) {
                failures.push(format!(
                    "{method} {path} as {who:?}: expected {want:?}, got {} {}",
                    response.status, response.body
                ));
            }
            // A refusal says why, as JSON.
            if matches!(response.status, 401 | 403) {
                let body: Value = serde_json::from_str(&response.body)
                    .unwrap_or_else(|_| panic!("{method} {path} as {who:?}: {response:?}"));
                assert!(
                    body["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{method} {path} as {who:?}: {response:?}"
                );
            }
        }
        table.push_str(&line);
        table.push('\n');
    }
    assert!(
        failures.is_empty(),
        "{} cells differ from the matrix:\n{}\n\nall answers:\n{table}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn public_reads_are_served_without_a_credential_only_when_the_server_is_told_to() {
    let harness = Harness::new("permissions-public");
    let (server, callers) = start(&harness, &["--lease-secs", "120", "--public-read"]);
    let held = hold_a_job(&harness, &server, &callers, 0);
    let public = [
        "/v1/builds/{build}",
        "/v1/builds/{build}/jobs",
        "/v1/builds/{build}/events",
        "/v1/builds/{build}/stream",
        "/v1/builds/{build}/images",
        "/v1/jobs/{build}/{job}",
        "/v1/jobs/{build}/{job}/status.xml",
        "/v1/jobs/{build}/{job}/images/{name}",
        "/v1/jobs/{build}/{job}/images/{name}/index",
    ];
    for path in public {
        let response = call(&server, &callers, &held, "GET", path, Who::Nobody);
        assert_eq!(outcome(&response), Some(T), "GET {path}: {response:?}");
    }
    // Scripts, logs and files stay private, and so does everything else.
    for (method, path) in [
        ("GET", "/v1/builds/{build}/relbuild.xml"),
        ("GET", "/v1/builds/{build}/files"),
        ("GET", "/v1/jobs/{build}/{job}/log"),
        ("GET", "/v1/jobs/{build}/{job}/stream"),
        ("GET", "/v1/stream"),
        ("GET", "/v1/builds"),
        ("GET", "/v1/clients"),
        ("POST", "/v1/jobs/{build}/{job}/heartbeat"),
        ("POST", "/v1/builds"),
    ] {
        let response = call(&server, &callers, &held, method, path, Who::Nobody);
        assert_eq!(response.status, 401, "{method} {path}: {response:?}");
    }
    // The public build status names the job.
    let status = call(
        &server,
        &callers,
        &held,
        "GET",
        "/v1/jobs/{build}/{job}",
        Who::Nobody,
    );
    let status: Value = serde_json::from_str(&status.body).expect("status JSON");
    assert_eq!(status["state"], "running", "{status:#}");
}
