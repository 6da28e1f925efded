//! Hostile input: path traversal, symlink tricks, crafted archives, names that try to
//! leave their directory, oversized bodies and stale or foreign leases. Each is refused
//! with a status (or exit code) and a message that names what was wrong, nothing of it
//! is stored, and the server keeps serving.

use crate::common;

use crate::common::{text, wait_for_gate, write_build, Harness, HttpResponse, Job, Server};
use serde_json::Value;
use std::path::Path;

/// The builds `GET /v1/builds` lists.
fn listed_builds(server: &Server) -> Vec<Value> {
    let response = server.get("/v1/builds");
    assert_eq!(response.status, 200, "listing builds: {response:?}");
    match serde_json::from_str(&response.body) {
        Ok(Value::Array(builds)) => builds,
        _ => server.fail(&format!("GET /v1/builds is not a JSON array: {response:?}")),
    }
}

/// The `{code, error}` body of a refusal; fails the test if the body is not one.
fn refusal(server: &Server, what: &str, response: &HttpResponse) -> (String, String) {
    let body: Value = serde_json::from_str(&response.body).unwrap_or_else(|_| {
        server.fail(&format!(
            "{what}: the refusal is not a JSON {{code, error}} body: {response:?}"
        ))
    });
    (
        text(&body, "code").to_owned(),
        text(&body, "error").to_owned(),
    )
}

/// Asserts that `response` is a refusal with `status` whose message contains every one
/// of `words`.
fn assert_refused(
    server: &Server,
    what: &str,
    response: &HttpResponse,
    status: u16,
    words: &[&str],
) {
    if response.status != status {
        server.fail(&format!("{what}: expected {status}, got {response:?}"));
    }
    let (code, error) = refusal(server, what, response);
    assert!(
        !code.is_empty(),
        "{what}: the refusal has a code: {response:?}"
    );
    for word in words {
        assert!(
            error.contains(word),
            "{what}: the message names {word:?}: {response:?}"
        );
    }
}

/// Asserts that `response` refuses a JSON body that does not fit its type (400 or 422)
/// with a `{code, error}` body naming the field at `field`.
fn assert_bad_json(server: &Server, what: &str, response: &HttpResponse, field: &str) {
    if !matches!(response.status, 400 | 422) {
        server.fail(&format!("{what}: expected 400 or 422, got {response:?}"));
    }
    let (_code, error) = refusal(server, what, response);
    assert!(
        error.contains(field),
        "{what}: the message names {field}: {response:?}"
    );
}

/// Every path under `dir` (recursively), relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            found.push(
                path.strip_prefix(dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
            );
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

/// One HTTP/1.1 request with a byte body and its own content type, over a fresh
/// connection (the harness's [`common::http`] sends JSON text only).
fn raw_request(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> HttpResponse {
    let mut all = vec![("Content-Type", content_type)];
    all.extend_from_slice(headers);
    let answer = common::raw_http(&server.url, method, path, &all, body);
    HttpResponse {
        status: answer.status,
        body: answer.body,
    }
}

/// A manifest of one job `one` whose scripts are `install.sh` and `image.sh`.
fn one_job_manifest(number: &str) -> String {
    format!(
        "<SERVER>\n  <BUILDNUMBER>{number}</BUILDNUMBER>\n  <TITLE>Hostile {number}</TITLE>\n  \
         <JOBS>\n    <JOB ID=\"one\">\n      <CONFIGTYPE>PRO</CONFIGTYPE>\n      \
         <INSTALLSCRIPT>install.sh</INSTALLSCRIPT>\n      <IMAGESCRIPT>image.sh</IMAGESCRIPT>\n      \
         <TIMEOUT>60</TIMEOUT>\n    </JOB>\n  </JOBS>\n</SERVER>\n"
    )
}

/// POSTs a submission (as `kiln submit` does: a `manifest` part and a `files` part
/// holding a tar) with the admin credential.
fn post_submission(server: &Server, manifest: &str, archive: &[u8]) -> HttpResponse {
    let boundary = "kiln-hostile-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"; \
             filename=\"relbuild.xml\"\r\nContent-Type: text/plain\r\n\r\n{manifest}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"files\"; \
             filename=\"files.tar\"\r\nContent-Type: application/x-tar\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(archive);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let auth = format!("Bearer {}", server.admin_token());
    raw_request(
        server,
        "POST",
        "/v1/builds",
        &[("Authorization", &auth)],
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
    )
}

/// A tar holding `install.sh` and `image.sh`, then whatever `extra` appends.
fn archive_with(extra: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for name in ["install.sh", "image.sh"] {
        append_file(&mut builder, name, b"true\n");
    }
    extra(&mut builder);
    builder.into_inner().expect("finishing the archive")
}

/// Appends a regular file, writing the name into the header raw so that names the
/// `tar` crate would refuse to write (`..`, absolute) go in as given.
fn append_file(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    raw_name(&mut header, name);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append(&header, data).expect("appending a file");
}

/// Appends a link entry (`kind` symlink or hard link) named `name` pointing at `target`.
fn append_link(
    builder: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &str,
    target: &str,
) {
    let mut header = tar::Header::new_gnu();
    raw_name(&mut header, name);
    header.set_size(0);
    header.set_mode(0o777);
    header.set_entry_type(kind);
    if !target.is_empty() {
        header
            .set_link_name(target)
            .expect("a link target the header holds");
    }
    header.set_cksum();
    builder.append(&header, &[][..]).expect("appending a link");
}

fn raw_name(header: &mut tar::Header, name: &str) {
    let field = &mut header.as_old_mut().name;
    assert!(name.len() < field.len(), "test names fit the header");
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
}

#[test]
fn submitted_directory_with_symlinks_or_a_fifo_is_refused_naming_the_entry() {
    let harness = Harness::new("hostile-symlinks");
    let server = harness.start_server("main", &[]);
    let outside = harness.mkdir("outside");
    std::fs::write(outside.join("secret.txt"), "not for the build\n").expect("writing a file");

    type MakeEntry<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: [(&str, MakeEntry<'_>); 3] = [
        (
            "link-to-file",
            Box::new(|dir: &Path| {
                std::os::unix::fs::symlink(outside.join("secret.txt"), dir.join("link-to-file"))
                    .expect("making a symlink")
            }),
        ),
        (
            "link-to-dir",
            Box::new(|dir: &Path| {
                std::os::unix::fs::symlink(&outside, dir.join("scripts/link-to-dir"))
                    .expect("making a symlink")
            }),
        ),
        (
            "a-fifo",
            Box::new(|dir: &Path| {
                let path = std::ffi::CString::new(dir.join("a-fifo").display().to_string())
                    .expect("a path without NUL");
                // SAFETY: mkfifo reads a NUL-terminated path and has no other preconditions.
                let rc = unsafe { libc::mkfifo(path.as_ptr(), 0o644) };
                assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
            }),
        ),
    ];
    for (idx, (entry, make)) in cases.iter().enumerate() {
        let dir = harness.mkdir(&format!("build-{entry}"));
        let manifest = write_build(&dir, &format!("{}", 800 + idx), &[Job::new("one", "PRO")]);
        make(&dir);
        let run = server.kiln(&["submit", &manifest.display().to_string()]);
        assert_eq!(run.code, 1, "a build holding {entry} is refused: {run:?}");
        assert!(
            run.stderr.contains(entry) && run.stderr.contains("not a regular file"),
            "the refusal names {entry} and says why: {:?}",
            run.stderr
        );
    }
    let builds = listed_builds(&server);
    assert!(builds.is_empty(), "no build was stored: {builds:#?}");
}

#[test]
fn crafted_archives_over_the_api_are_refused_naming_the_entry() {
    let harness = Harness::new("hostile-archives");
    let server = harness.start_server("main", &[]);
    let data_before = tree(&server.data);
    type Extra = Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>;
    let cases: Vec<(&str, Extra)> = vec![
        (
            "../evil.sh",
            Box::new(|b: &mut tar::Builder<Vec<u8>>| append_file(b, "../evil.sh", b"evil\n")),
        ),
        (
            "scripts/../../evil.sh",
            Box::new(|b: &mut tar::Builder<Vec<u8>>| {
                append_file(b, "scripts/../../evil.sh", b"evil\n")
            }),
        ),
        (
            "/tmp/evil",
            Box::new(|b: &mut tar::Builder<Vec<u8>>| append_file(b, "/tmp/evil", b"evil\n")),
        ),
        (
            "sym",
            Box::new(|b: &mut tar::Builder<Vec<u8>>| {
                append_link(b, tar::EntryType::Symlink, "sym", "/etc/hostname")
            }),
        ),
        (
            "hard",
            Box::new(|b: &mut tar::Builder<Vec<u8>>| {
                append_link(b, tar::EntryType::Link, "hard", "install.sh")
            }),
        ),
        (
            "dev",
            Box::new(|b: &mut tar::Builder<Vec<u8>>| {
                append_link(b, tar::EntryType::Char, "dev", "")
            }),
        ),
    ];
    for (idx, (entry, extra)) in cases.iter().enumerate() {
        let number = format!("{}", 810 + idx);
        let response = post_submission(&server, &one_job_manifest(&number), &archive_with(extra));
        assert_refused(
            &server,
            &format!("an archive holding {entry}"),
            &response,
            400,
            &[entry],
        );
    }
    // A clean archive still goes in: the refusals above were about their entries.
    let response = post_submission(&server, &one_job_manifest("899"), &archive_with(|_| {}));
    assert_eq!(response.status, 201, "a clean submission: {response:?}");
    let builds = listed_builds(&server);
    let numbers: Vec<&str> = builds.iter().map(|b| text(b, "number")).collect();
    assert_eq!(
        numbers,
        ["899"],
        "only the clean build was stored: {builds:#?}"
    );
    let added: Vec<String> = tree(&server.data)
        .into_iter()
        .filter(|path| !data_before.contains(path))
        .filter(|path| path.contains("evil") || path.contains("sym") || path.contains("hard"))
        .collect();
    assert!(added.is_empty(), "no crafted entry was written: {added:?}");
    assert!(
        !harness.path().join("evil.sh").exists() && !server.data.join("../evil.sh").exists(),
        "nothing escaped the data directory"
    );
}

#[test]
fn names_from_outside_in_manifests_and_urls_are_refused() {
    let harness = Harness::new("hostile-names");
    let server = harness.start_server("main", &[]);

    // Manifests naming builds and jobs that would leave their directory.
    let long = "x".repeat(200);
    for (number, job) in [
        ("../820", "one"),
        ("820/x", "one"),
        ("..", "one"),
        (long.as_str(), "one"),
        ("821", "../one"),
        ("822", "a/b"),
        ("823", "one\u{1}"),
    ] {
        let manifest = one_job_manifest(number).replace("ID=\"one\"", &format!("ID=\"{job}\""));
        let response = post_submission(&server, &manifest, &archive_with(|_| {}));
        let (code, error) = refusal(&server, "a bad name in a manifest", &response);
        assert_eq!(response.status, 400, "{number}/{job}: {response:?}");
        assert_eq!(code, "bad_manifest", "{number}/{job}: {response:?}");
        // A control character is not XML at all; the others are named as invalid.
        let named = if job.contains('\u{1}') {
            error.starts_with("relbuild.xml:")
        } else {
            // Long names are quoted cut short.
            let quoted = |name: &str| format!("found \"{}", &name[..name.len().min(40)]);
            (error.contains("expected a build number") && error.contains(&quoted(number)))
                || (error.contains("expected a job id") && error.contains(&quoted(job)))
        };
        assert!(
            named,
            "{number}/{job}: the message names the bad name: {error}"
        );
    }
    assert!(listed_builds(&server).is_empty(), "no build was stored");

    // A real running job, so that the routes below are reached with a valid lease.
    let gate = harness.path().join("gate");
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "830",
        &[Job::new("one", "PRO").install(&wait_for_gate(&gate))],
    ));
    let client = harness.start_client("A", &[&server], &["--include", "*"]);
    let lease = client.lease_of_running(&server, &build, "one");
    let data_before = tree(&server.data);

    for path in [
        "/v1/builds/..%2F../jobs",
        "/v1/builds/%2e%2e/jobs",
        "/v1/jobs/%2e%2e/x",
        "/v1/jobs/830/..%2F..%2Fetc",
    ] {
        let response = server.get(path);
        assert!(
            matches!(response.status, 400 | 404),
            "GET {path} is refused: {response:?}"
        );
        refusal(&server, &format!("GET {path}"), &response);
    }
    for path in [
        "/v1/jobs/%2e%2e/x/heartbeat",
        "/v1/jobs/830/..%2Fone/heartbeat",
        "/v1/jobs/..%2F830/one/log",
    ] {
        let body = if path.ends_with("/log") {
            r#"{"lines":[],"progress":null}"#
        } else {
            "{}"
        };
        let response = server.client_post_as(&client, path, &[("x-kiln-lease", &lease)], body);
        assert!(
            matches!(response.status, 400 | 404),
            "POST {path} is refused: {response:?}"
        );
        refusal(&server, &format!("POST {path}"), &response);
    }

    // Image names that leave the job's directory, under the job's own lease.
    let zero = "0".repeat(64);
    let commit = format!(r#"{{"size":0,"blake3":"{zero}","sha256":"{zero}","chunks":[]}}"#);
    for name in ["..%2Fetc", "%2e%2e", "..", ".hidden", "a%00b"] {
        let path = format!("/v1/jobs/830/one/images/{name}/commit");
        let response = server.client_post_as(&client, &path, &[("x-kiln-lease", &lease)], &commit);
        assert_refused(
            &server,
            &format!("POST {path}"),
            &response,
            400,
            &["image name"],
        );
    }

    // Chunk ids that are not 64 lowercase hex.
    for bad in ["../../etc/passwd", "abc", &"g".repeat(64), &"A".repeat(64)] {
        let missing = format!(r#"{{"chunks":[{{"hash":"{bad}","len":1}}]}}"#);
        let response = server.client_post_as(
            &client,
            "/v1/jobs/830/one/chunks/missing",
            &[("x-kiln-lease", &lease)],
            &missing,
        );
        assert_bad_json(
            &server,
            &format!("chunks/missing {bad:?}"),
            &response,
            "chunks[0].hash",
        );
        let fetch = format!(r#"{{"chunks":["{bad}"]}}"#);
        let response = server.admin_post("/v1/chunks/fetch", &fetch);
        assert_bad_json(
            &server,
            &format!("chunks/fetch {bad:?}"),
            &response,
            "chunks[0]",
        );
    }

    let added: Vec<String> = tree(&server.data)
        .into_iter()
        .filter(|path| !data_before.contains(path))
        .filter(|path| !path.ends_with("-wal") && !path.ends_with("-shm"))
        .collect();
    assert!(
        added.is_empty(),
        "nothing new in the data directory: {added:?}"
    );
    let job = server.job("830", "one");
    assert_eq!(
        text(&job, "state"),
        "running",
        "the job is untouched: {job:#}"
    );
    std::fs::write(&gate, "").expect("opening the gate");
}

#[test]
fn oversized_bodies_are_refused_naming_the_limit_and_the_server_keeps_serving() {
    let harness = Harness::new("hostile-oversized");
    let server = harness.start_server("main", &[]);

    // A manifest over its limit: padded with a comment, so that it is otherwise valid.
    let padding = format!("<!-- {} -->\n", "x".repeat(5 << 20));
    let manifest = one_job_manifest("840").replace("<JOBS>", &format!("{padding}<JOBS>"));
    let response = post_submission(&server, &manifest, &archive_with(|_| {}));
    assert_refused(
        &server,
        "an oversized manifest",
        &response,
        413,
        &["manifest", "bytes"],
    );
    assert!(listed_builds(&server).is_empty(), "no build was stored");

    // A claim of many MiB.
    let client_id = "x".repeat(8 << 20);
    let claim = format!(r#"{{"client_id":"{client_id}","include":["*"],"wait_secs":0}}"#);
    // Sent with a helper that reads the answer even when the server refuses before the
    // whole body is in and closes (the harness's would fail on the broken pipe).
    let auth = server.enroll("oversized");
    let response = raw_request(
        &server,
        "POST",
        "/v1/claim",
        &[("Authorization", &auth)],
        "application/json",
        claim.as_bytes(),
    );
    assert_refused(&server, "an oversized claim", &response, 413, &["bytes"]);

    // A log batch over its line limit, under a real lease.
    let gate = harness.path().join("gate");
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "841",
        &[Job::new("one", "PRO").install(&wait_for_gate(&gate))],
    ));
    let client = harness.start_client("A", &[&server], &["--include", "*"]);
    let lease = client.lease_of_running(&server, &build, "one");
    let lines: Vec<String> = (0..10_001)
        .map(|idx| format!(r#"{{"stream":"stdout","text":"{idx}"}}"#))
        .collect();
    let batch = format!(r#"{{"lines":[{}],"progress":null}}"#, lines.join(","));
    let response = server.client_post_as(
        &client,
        "/v1/jobs/841/one/log",
        &[("x-kiln-lease", &lease)],
        &batch,
    );
    assert_refused(
        &server,
        "an oversized log batch",
        &response,
        413,
        &["10000 lines"],
    );
    let log = server.get("/v1/jobs/841/one/log");
    assert!(
        !log.body.contains(r#""text":"10000""#),
        "no line of the refused batch was stored: {}",
        &log.body[..log.body.len().min(500)]
    );

    let health = server.get("/v1/health");
    assert_eq!(health.status, 200, "the server still serves: {health:?}");
    std::fs::write(&gate, "").expect("opening the gate");
}

#[test]
fn stale_foreign_and_made_up_leases_are_refused_and_change_nothing() {
    let harness = Harness::new("hostile-leases");
    let server = harness.start_server("main", &["--lease-secs", "30"]);
    let gate = harness.path().join("gate");
    let install = wait_for_gate(&gate);
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "850",
        &[
            Job::new("one", "PRO").install(&install),
            Job::new("two", "PRO").install(&install),
        ],
    ));
    let client = harness.start_client("A", &[&server], &["--include", "*", "--slots", "2"]);
    let lease_one = client.lease_of_running(&server, &build, "one");
    let lease_two = client.lease_of_running(&server, &build, "two");
    assert_ne!(lease_one, lease_two);

    let calls = |lease: &str| -> Vec<(String, HttpResponse)> {
        ["heartbeat", "log", "finish"]
            .into_iter()
            .map(|call| {
                let body = match call {
                    "log" => r#"{"lines":[{"stream":"stdout","text":"forged"}],"progress":null}"#,
                    "heartbeat" => r#"{"progress":{"percent":99}}"#,
                    _ => r#"{"images":[]}"#,
                };
                let path = format!("/v1/jobs/850/one/{call}");
                (
                    path.clone(),
                    server.client_post(&path, &[("x-kiln-lease", lease)], body),
                )
            })
            .collect()
    };
    let assert_stale = |lease: &str, what: &str| {
        for (path, response) in calls(lease) {
            if response.status != 409 {
                server.fail(&format!("{what} on {path}: expected 409, got {response:?}"));
            }
            let (code, error) = refusal(&server, &path, &response);
            assert_eq!(code, "stale_lease", "{what} on {path}: {response:?}");
            assert!(
                error.contains("lease"),
                "{what} on {path}: the message names the lease: {error}"
            );
        }
    };
    let before = server.job("850", "one");
    assert_stale(&lease_two, "the other job's lease");
    assert_stale("0123456789abcdef0123456789abcdef", "a made-up lease");
    let after = server.job("850", "one");
    assert_eq!(text(&after, "state"), "running", "{after:#}");
    assert_eq!(before["percent"], after["percent"], "progress unchanged");

    // Taken back by the operator: the old lease is dead from then on.
    let run = server.kiln(&["job", "restart", "850/one"]);
    assert_eq!(run.code, 0, "kiln job restart: {run:?}");
    assert_stale(&lease_one, "the lease from before the restart");

    let log = server.get("/v1/jobs/850/one/log");
    assert!(
        !log.body.contains("forged"),
        "no forged line was stored: {}",
        log.body
    );
    let job = server.job("850", "one");
    assert!(
        !matches!(text(&job, "state"), "finished" | "failed"),
        "no forged finish: {job:#}"
    );
    std::fs::write(&gate, "").expect("opening the gate");
}
