//! Telling the originator: a job nobody accepts within its ACCEPTWITHIN expires and the
//! build's NOTIFY URLs hear of it; a NOTIFY URL that is dead holds up neither the jobs
//! nor the notices to the other URLs.

use crate::common::{events_of, text, wait_until, write_build_notifying, Harness, Job};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A webhook receiver: a tiny HTTP server on loopback that records the body of every
/// POST it gets and answers 200.
struct WebhookReceiver {
    url: String,
    address: std::net::SocketAddr,
    notices: Arc<Mutex<Vec<Value>>>,
    stopping: Arc<AtomicBool>,
}

impl WebhookReceiver {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the webhook receiver");
        let address = listener.local_addr().expect("the receiver's address");
        let notices = Arc::new(Mutex::new(Vec::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let (thread_notices, thread_stopping) = (notices.clone(), stopping.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if thread_stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let notices = thread_notices.clone();
                std::thread::spawn(move || {
                    if let Some(body) = read_post_body(stream) {
                        let notice = serde_json::from_str(&body)
                            .unwrap_or_else(|_| Value::String(format!("not JSON: {body}")));
                        notices.lock().expect("notices poisoned").push(notice);
                    }
                });
            }
        });
        WebhookReceiver {
            url: format!("http://{address}/hook"),
            address,
            notices,
            stopping,
        }
    }

    /// The notices received so far, in order of arrival.
    fn notices(&self) -> Vec<Value> {
        self.notices.lock().expect("notices poisoned").clone()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.address);
    }
}

/// Reads one HTTP/1.1 request; answers 200 and returns its body if it was a POST.
fn read_post_body(stream: TcpStream) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).ok()?;
    let mut stream = stream;
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = stream.flush();
    request_line
        .starts_with("POST ")
        .then(|| String::from_utf8_lossy(&body).into_owned())
}

/// A loopback URL on which nothing listens: the port was bound, then let go.
fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a port to let go");
    let address = listener.local_addr().expect("its address");
    drop(listener);
    format!("http://{address}/hook")
}

#[test]
fn job_nobody_accepts_in_time_expires_and_the_notify_url_hears_job_expired_then_build_finished() {
    let harness = Harness::new("expiry-notify");
    let receiver = WebhookReceiver::start();
    let server = harness.start_server("main", &[]);
    // A client is there, but it does not include the job's config type.
    let _client = harness.start_client("home-only", &[&server], &["--include", "HOME"]);
    let build = server.submit(&write_build_notifying(
        &harness.mkdir("build"),
        "1100",
        &[&receiver.url],
        &[Job::new("unwanted", "PRO").accept_within(1)],
    ));

    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 1, || {
        format!("kiln wait exits 1 for a build whose job expired: {waited:?}")
    });
    let job = server.status_of(&build, "unwanted");
    assert_eq!(text(&job, "state"), "expired", "{job:#}");
    assert!(job["client_id"].is_null(), "nobody ran it: {job:#}");

    let notices = wait_until(
        harness.path(),
        "the receiver to get two notices",
        || Some(receiver.notices()).filter(|notices| notices.len() >= 2),
        || format!("{:#?}", receiver.notices()),
    );
    // Give a wrongly repeated notice a moment to show up.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(receiver.notices(), notices, "no further notice came");
    let find = |event: &str| {
        notices
            .iter()
            .find(|notice| notice["event"] == event)
            .unwrap_or_else(|| panic!("no {event} notice: {notices:#?}"))
    };
    let (expired, finished) = (find("job_expired"), find("build_finished"));
    assert_eq!(expired["build"], build.as_str(), "{expired:#}");
    assert_eq!(expired["job"], "unwanted", "{expired:#}");
    assert!(
        !text(expired, "reason").is_empty(),
        "the notice says why: {expired:#}"
    );
    assert_eq!(finished["build"], build.as_str(), "{finished:#}");
    assert!(finished["job"].is_null(), "{finished:#}");
    assert_eq!(
        finished["seq"], expired["seq"],
        "the build ended with the job's expiry: {notices:#?}"
    );

    let events = server.events(&build);
    let job_events = events_of(&events, "unwanted");
    let last = job_events.last().expect("the job has events");
    assert_eq!(last["from"], "queued", "{events:#?}");
    assert_eq!(last["to"], "expired", "{events:#?}");
    assert!(
        !text(last, "reason").is_empty(),
        "the expiry has a reason: {last:#}"
    );
    assert_eq!(
        expired["seq"], last["seq"],
        "the notice names the event: {expired:#} {last:#}"
    );
    assert!(
        job_events.iter().all(|event| event["to"] != "running"),
        "the job never ran: {events:#?}"
    );
}

#[test]
fn dead_notify_url_holds_up_neither_the_jobs_nor_the_notices_to_a_live_one() {
    let harness = Harness::new("notify-dead");
    let receiver = WebhookReceiver::start();
    let dead = dead_url();
    let server = harness.start_server("main", &[]);
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);
    // The dead URL comes first, so that each notice is tried there before the live one.
    let build = server.submit(&write_build_notifying(
        &harness.mkdir("build"),
        "1110",
        &[&dead, &receiver.url],
        &[Job::new("first", "PRO"), Job::new("second", "PRO")],
    ));

    let waited = server.kiln(&["wait", &build, "--timeout", "60"]);
    harness.check(waited.code == 0, || {
        format!("both jobs finish although a NOTIFY URL is dead: {waited:?}")
    });
    let notices = wait_until(
        harness.path(),
        "the live receiver to hear of both jobs and of the build",
        || {
            let notices = receiver.notices();
            let has = |event: &str, job: Option<&str>| {
                notices.iter().any(|notice| {
                    notice["event"] == event && job.is_none_or(|job| notice["job"] == job)
                })
            };
            (has("job_finished", Some("first"))
                && has("job_finished", Some("second"))
                && has("build_finished", None))
            .then_some(notices)
        },
        || format!("{:#?}", receiver.notices()),
    );
    assert!(
        notices
            .iter()
            .all(|notice| notice["build"] == build.as_str()),
        "{notices:#?}"
    );
    let server_log =
        std::fs::read_to_string(harness.path().join("server-main.log")).expect("the server's log");
    harness.check(
        server_log.contains("webhook delivery failed") && server_log.contains(&dead),
        || "the server tried the dead URL and logged its failure".into(),
    );
}

/// Regression: notices to one URL were sent concurrently (so they arrived in any
/// order), and when several jobs expired in one sweep the build's notice was queued
/// with the first job's, before the others'.
#[test]
fn notices_to_a_url_arrive_in_event_order_and_build_finished_comes_after_every_job() {
    let harness = Harness::new("notify-order");
    let receiver = WebhookReceiver::start();
    let server = harness.start_server("main", &[]);
    let job_ids = ["one", "two", "three"];
    // No client at all: the three expire in the same sweep.
    let build = server.submit(&write_build_notifying(
        &harness.mkdir("build"),
        "1120",
        &[&receiver.url],
        &job_ids.map(|id| Job::new(id, "PRO").accept_within(1)),
    ));
    server.wait_for_build_end(&build);
    let notices = wait_until(
        harness.path(),
        "the receiver to get four notices",
        || Some(receiver.notices()).filter(|notices| notices.len() >= 4),
        || format!("{:#?}", receiver.notices()),
    );
    let events: Vec<&Value> = notices.iter().map(|notice| &notice["event"]).collect();
    assert_eq!(
        events,
        [
            "job_expired",
            "job_expired",
            "job_expired",
            "build_finished"
        ],
        "the build's notice comes after every job's: {notices:#?}"
    );
    let seqs: Vec<i64> = notices
        .iter()
        .map(|notice| notice["seq"].as_i64().expect("an integer seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|pair| pair[0] <= pair[1]),
        "notices arrive in the order of their events: {seqs:?}"
    );
    let last_job_seq = server
        .events(&build)
        .iter()
        .filter(|event| event["to"] == "expired")
        .filter_map(|event| event["seq"].as_i64())
        .max();
    assert_eq!(
        Some(seqs[3]),
        last_job_seq,
        "build_finished carries the seq of the transition that ended the build: {notices:#?}"
    );
}
