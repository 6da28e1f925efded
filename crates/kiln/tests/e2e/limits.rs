//! The server's limits on what one job, build or client may use: log bytes per job,
//! jobs per build and uploads sent at once per client; and names in the paths of the
//! read routes, refused before anything is looked up. Each limit is met with a clear
//! refusal (or, for the log, a last line saying it was cut) and nothing over it is
//! stored; the work that stays within it goes on. And the client's own bound: its job
//! cache outlives jobs and is cut back between them, least recently used entries first.

use crate::common;

use crate::common::{
    http, text, wait_for_gate, wait_until, write_build, Harness, HttpResponse, Job,
};
use crate::common::{RawResponse, Server};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;

/// Every stored log line of `build/job`, read page by page through the API.
fn whole_log(server: &Server, build: &str, job: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut after = 0;
    loop {
        let response = server.get(&format!("/v1/jobs/{build}/{job}/log?after={after}"));
        if response.status != 200 {
            server.fail(&format!("reading the log of {build}/{job}: {response:?}"));
        }
        let chunk: Value = serde_json::from_str(&response.body)
            .unwrap_or_else(|err| server.fail(&format!("the log is not JSON: {err}")));
        let page = chunk["lines"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return lines;
        }
        after = chunk["next"].as_i64().unwrap_or(after);
        lines.extend(page);
    }
}

/// Shell text printing `n` lines of 100 digits each.
fn print_lines(n: u32) -> String {
    format!("i=0\nwhile [ $i -lt {n} ]; do printf '%0100d\\n' $i; i=$((i+1)); done\n")
}

#[test]
fn a_log_over_its_limit_is_cut_with_a_last_line_and_the_job_finishes_across_a_restart() {
    let harness = Harness::new("limits-log");
    let server_args = ["--max-log-bytes-per-job", "65536"];
    let server = harness.start_server("main", &server_args);
    let gate = harness.path().join("gate");
    // 40,000 bytes before the restart, 300,000 after: only the count kept across the
    // restart keeps the whole log within the limit.
    let install = format!(
        "{}{}{}",
        print_lines(400),
        wait_for_gate(&gate),
        print_lines(3000)
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "700",
        &[Job::new("chatty", "PRO").install(&install)],
    ));
    let client = harness.start_client("A", &[&server], &["--include", "*"]);
    wait_until(
        harness.path(),
        "the first 400 lines to be stored",
        || (whole_log(&server, &build, "chatty").len() >= 400).then_some(()),
        || format!("{} lines", whole_log(&server, &build, "chatty").len()),
    );

    let listen = server.url.trim_start_matches("http://").to_owned();
    let data = server.data.clone();
    let client_token_file = server.client_token_file.clone();
    drop(server); // SIGKILL
    let server = harness.start_server_at(
        "restarted",
        &listen,
        &data,
        Some(&client_token_file),
        &server_args,
    );
    std::fs::write(&gate, "").expect("opening the gate");

    let jobs = server.wait_for_build_end(&build);
    assert_eq!(
        text(&jobs[0], "state"),
        "finished",
        "the job runs on past its log's limit: {jobs:#?}"
    );
    let lines = whole_log(&server, &build, "chatty");
    let (last, kept) = lines.split_last().expect("a stored log");
    let kept_bytes: usize = kept.iter().map(|line| text(line, "text").len()).sum();
    assert!(
        kept_bytes <= 65536,
        "the log holds {kept_bytes} bytes before its last line, more than the limit"
    );
    assert!(
        kept.len() > 400,
        "lines after the restart were stored up to the limit: {} lines",
        kept.len()
    );
    assert_eq!(text(last, "stream"), "kiln", "{last}");
    let notice = text(last, "text");
    assert!(
        notice.contains("cut at 65536 bytes") && notice.contains("--max-log-bytes-per-job"),
        "the last line says the log was cut: {notice}"
    );
    eprintln!("log cut notice: {notice}");
    let client_log = std::fs::read_to_string(harness.path().join("client-A.log"))
        .expect("reading the client log");
    let n_said = client_log
        .matches("the server cut this job's log at its limit")
        .count();
    assert_eq!(
        n_said, 1,
        "the client says once that it stopped sending the log: {client_log}"
    );
    drop(client);
}

#[test]
fn a_manifest_with_more_jobs_than_the_limit_is_refused_naming_both_and_nothing_is_stored() {
    let harness = Harness::new("limits-jobs");
    let server = harness.start_server("main", &["--max-jobs-per-build", "3"]);
    let jobs: Vec<Job> = (0..4).map(|n| Job::new(&format!("j{n}"), "PRO")).collect();
    let dir = harness.mkdir("build");
    let manifest = write_build(&dir, "710", &jobs);
    // Files that take a while to send: the refusal comes after the manifest, while the
    // client is still sending them, and it must still reach the client.
    std::fs::write(
        dir.join("payload.bin"),
        kiln_blob::noise::noise(32 << 20, 7),
    )
    .expect("writing the build's files");
    let run = server.kiln(&["submit", &manifest.display().to_string()]);
    harness.check(run.code != 0, || format!("the submit is refused: {run:?}"));
    eprintln!("jobs per build refusal: {}", run.stderr.trim());
    assert!(
        run.stderr.contains("710 has 4 jobs")
            && run.stderr.contains("at most 3 jobs per build")
            && run.stderr.contains("--max-jobs-per-build"),
        "the refusal names the count and the limit: {run:?}"
    );
    let status = server.kiln(&["status", "--json"]);
    harness.check(status.code == 0, || format!("{status:?}"));
    let builds: Value = serde_json::from_str(&status.stdout).expect("kiln status --json");
    assert_eq!(builds, Value::Array(Vec::new()), "no build was stored");
    // Three jobs are within the limit.
    let three = write_build(&harness.mkdir("three"), "711", &jobs[..3]);
    assert_eq!(server.submit(&three), "711");
}

/// An upload whose head is sent and whose body is then held back: the server holds
/// its slot until the connection is dropped.
struct HeldUpload {
    stream: TcpStream,
}

impl HeldUpload {
    fn open(server: &Server, auth: &str, path: &str, lease: &str) -> Self {
        let host = server.url.trim_start_matches("http://");
        let mut stream = TcpStream::connect(host).expect("connecting to the server");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n\
             x-kiln-lease: {lease}\r\nContent-Type: application/x-kiln-frames\r\n\
             Content-Length: 1000000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).expect("sending the head");
        HeldUpload { stream }
    }

    /// Whatever the server answered so far (nothing while it waits for the body).
    fn answered(&self) -> String {
        let mut stream = &self.stream;
        let mut answer = vec![0u8; 4096];
        let _ = stream.set_nonblocking(true);
        let n_read = stream.read(&mut answer).unwrap_or(0);
        let _ = stream.set_nonblocking(false);
        String::from_utf8_lossy(&answer[..n_read]).into_owned()
    }
}

/// One request as the client `auth` names, with a byte body, answered in full.
fn raw(
    server: &Server,
    auth: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut all = vec![("Authorization", auth)];
    all.extend_from_slice(headers);
    common::raw_http(&server.url, method, path, &all, body)
}

/// The uploads a client may make: a chunk body (empty: nothing to store) and a whole
/// image whose hash does not match (nothing is kept of it either).
fn probe_uploads(
    server: &Server,
    auth: &str,
    build: &str,
    job: &str,
    lease: &str,
) -> Vec<RawResponse> {
    let wrong_hash = "0".repeat(64);
    vec![
        raw(
            server,
            auth,
            "POST",
            &format!("/v1/jobs/{build}/{job}/chunks"),
            &[
                ("x-kiln-lease", lease),
                ("Content-Type", "application/x-kiln-frames"),
            ],
            b"",
        ),
        raw(
            server,
            auth,
            "PUT",
            &format!("/v1/jobs/{build}/{job}/images/probe.img"),
            &[("x-kiln-lease", lease), ("x-kiln-blake3", &wrong_hash)],
            b"not the bytes of that hash",
        ),
    ]
}

#[test]
fn uploads_over_the_per_client_limit_are_answered_429_and_the_client_waits_its_turn() {
    let harness = Harness::new("limits-uploads");
    let server = harness.start_server("main", &["--max-uploads-per-client", "1"]);
    let gate = harness.path().join("gate");
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "720",
        &[Job::new("one", "PRO").install(&wait_for_gate(&gate))],
    ));
    let client = harness.start_client("A", &[&server], &["--include", "*"]);
    let lease = client.lease_of_running(&server, &build, "one");
    // The calls below are the client's own: they go with its enrolled secret.
    let auth = client.auth_for(&server);

    // One upload held open takes the client's only slot; every other is answered 429
    // before its body is read.
    // A probe that reaches the server before the held upload takes the slot itself
    // (and the held one is refused): then both are tried again.
    let (held, refused) = wait_until(
        harness.path(),
        "uploads beside a held one to be refused",
        || {
            let held = HeldUpload::open(
                &server,
                &auth,
                &format!("/v1/jobs/{build}/one/chunks"),
                &lease,
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
            let answers = probe_uploads(&server, &auth, &build, "one", &lease);
            let all_refused = answers.iter().all(|answer| answer.status == 429);
            (all_refused && held.answered().is_empty()).then_some((held, answers))
        },
        || format!("{:?}", probe_uploads(&server, &auth, &build, "one", &lease)),
    );
    for answer in &refused {
        let body: Value = serde_json::from_str(&answer.body).expect("a JSON refusal");
        assert_eq!(text(&body, "code"), "too_many_uploads", "{answer:?}");
        assert!(
            text(&body, "error").contains("--max-uploads-per-client 1"),
            "the refusal names the limit: {answer:?}"
        );
        assert!(
            answer.head.to_ascii_lowercase().contains("retry-after: 1"),
            "the refusal says when to retry: {answer:?}"
        );
    }
    eprintln!("too many uploads refusal: {}", refused[0].body);
    let images = server.get(&format!("/v1/builds/{build}/images"));
    assert_eq!(images.body, "[]", "nothing was stored: {images:?}");

    // The real client's own upload meets the held one: it waits and sends again.
    std::fs::write(&gate, "").expect("opening the gate");
    let client_log = harness.path().join("client-A.log");
    wait_until(
        harness.path(),
        "the client to be told it sends too many uploads",
        || {
            let log = std::fs::read_to_string(&client_log).ok()?;
            log.contains("sending it again after a pause").then_some(())
        },
        || std::fs::read_to_string(&client_log).unwrap_or_default(),
    );
    let job = server.job(&build, "one");
    assert_eq!(text(&job, "state"), "running", "the job waits: {job:#}");
    drop(held);
    let jobs = server.wait_for_build_end(&build);
    assert_eq!(
        text(&jobs[0], "state"),
        "finished",
        "the upload went through once the slot was free: {jobs:#?}"
    );
    let images: Value =
        serde_json::from_str(&server.get(&format!("/v1/builds/{build}/images")).body)
            .expect("the images as JSON");
    assert_eq!(images.as_array().map(Vec::len), Some(1), "{images:#}");
    // A slot given back serves the next upload.
    let answers = probe_uploads(&server, &auth, &build, "one", &lease);
    assert!(
        answers.iter().all(|answer| answer.status != 429),
        "{answers:?}"
    );
    drop(client);
}

#[test]
fn bad_names_in_every_path_are_refused_naming_the_parameter() {
    let harness = Harness::new("limits-names");
    let server = harness.start_server("main", &[]);
    let long = "x".repeat(200);
    let bad_names = ["..", "%2e%2e", long.as_str(), "a%01b", ".hidden"];
    let routes = [
        "/v1/builds/{build}",
        "/v1/builds/{build}/jobs",
        "/v1/builds/{build}/relbuild.xml",
        "/v1/builds/{build}/events",
        "/v1/builds/{build}/images",
        "/v1/builds/{build}/files",
        "/v1/jobs/{build}/{job}",
        "/v1/jobs/{build}/{job}/status.xml",
        "/v1/jobs/{build}/{job}/log",
        "/v1/jobs/{build}/{job}/images/{name}",
        "/v1/jobs/{build}/{job}/images/{name}/index",
        "/v1/credentials/{client}",
    ];
    let admin = format!("Bearer {}", server.admin_token());
    let mut n_checked = 0;
    for route in routes {
        for (param, what) in [
            ("{build}", "build number"),
            ("{job}", "job id"),
            ("{name}", "image name"),
            ("{client}", "client id"),
        ] {
            if !route.contains(param) {
                continue;
            }
            for bad in bad_names {
                let path = route
                    .replace(param, bad)
                    .replace("{build}", "900")
                    .replace("{job}", "one")
                    .replace("{name}", "a.img");
                let mut methods = vec!["GET"];
                if route == "/v1/builds/{build}" {
                    methods.push("DELETE");
                }
                if route == "/v1/credentials/{client}" {
                    methods = vec!["POST", "DELETE"];
                }
                for method in methods {
                    let response: HttpResponse = http(
                        &server.url,
                        method,
                        &path,
                        &[("Authorization", &admin)],
                        None,
                    )
                    .unwrap_or_else(|err| server.fail(&format!("{method} {path}: {err}")));
                    let body: Value = serde_json::from_str(&response.body).unwrap_or_else(|_| {
                        server.fail(&format!(
                            "{method} {path}: not a JSON refusal: {response:?}"
                        ))
                    });
                    assert_eq!(response.status, 400, "{method} {path}: {response:?}");
                    assert_eq!(
                        text(&body, "code"),
                        "bad_name",
                        "{method} {path}: {response:?}"
                    );
                    assert!(
                        text(&body, "error").starts_with(what),
                        "{method} {path}: the refusal names the {what}: {response:?}"
                    );
                    n_checked += 1;
                }
            }
        }
    }
    // Six build routes (one with DELETE too), three job routes, two image routes, and
    // a client's credential (POST and DELETE).
    assert_eq!(n_checked, bad_names.len() * (6 + 1 + 3 * 2 + 2 * 3 + 2));
    // Valid names still reach the store, which says what it lacks.
    let response = server.get("/v1/jobs/900/one");
    assert_eq!(response.status, 404, "{response:?}");
}

#[test]
fn job_cache_outlives_jobs_and_least_recently_used_entries_go_between_jobs_past_its_bound() {
    let harness = Harness::new("job-cache");
    let server = harness.start_server("main", &[]);
    // One slot and descending priorities: the jobs run one after the other, in order.
    let write_entry = |entry: &str| {
        format!(
            "mkdir -p \"$KILN_CACHE/{entry}\"\n\
             head -c 262144 /dev/urandom > \"$KILN_CACHE/{entry}/data\"\n"
        )
    };
    let first = write_entry("first");
    let second = format!(
        "[ -f \"$KILN_CACHE/first/data\" ] || {{ echo 'the entry of the first job is gone'; exit 3; }}\n{}",
        write_entry("second")
    );
    let third = "[ ! -e \"$KILN_CACHE/first\" ] || { echo 'the oldest entry was kept'; exit 4; }\n\
                 [ -f \"$KILN_CACHE/second/data\" ] || { echo 'the newest entry is gone'; exit 5; }\n";
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "cache1",
        &[
            Job::new("first", "PRO").install(&first).priority(3),
            Job::new("second", "PRO").install(&second).priority(2),
            Job::new("third", "PRO").install(third).priority(1),
        ],
    ));
    let cache = harness.path().join("cache");
    // Room for one entry: after the second job, the cache holds two and the first goes.
    let client = harness.start_client(
        "runner",
        &[&server],
        &[
            "--include",
            "*",
            "--cache",
            &cache.display().to_string(),
            "--cache-max-bytes",
            "400000",
        ],
    );
    let jobs = server.wait_for_build_end(&build);
    for job in &jobs {
        assert_eq!(text(job, "state"), "finished", "{job:#}");
    }
    assert!(
        cache.join("second/data").is_file() && !cache.join("first").exists(),
        "the cache keeps the newest entry only"
    );
    drop(client);
}
