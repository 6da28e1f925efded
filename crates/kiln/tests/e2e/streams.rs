//! Server-sent event streams over a real socket: a build's stream shows its jobs, then
//! each transition as it happens on one connection; a reconnect with `Last-Event-ID`
//! resumes after the last event seen; a job's stream carries its log lines as the job
//! prints them; the farm's stream hears of every build; `wait=0` ends at once.

use crate::common::{wait_for_gate, write_build, Harness, Job, Server};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How long a test waits for a message it expects.
const PATIENCE: Duration = Duration::from_secs(60);

/// One message of a stream.
#[derive(Debug, Clone, Default)]
struct Message {
    event: String,
    id: Option<String>,
    data: String,
}

impl Message {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|err| panic!("not JSON ({err}): {self:?}"))
    }
}

/// A stream read off a plain socket (HTTP/1.0, so that the body is the bytes as sent).
struct EventStream {
    reader: BufReader<TcpStream>,
    status: u16,
    content_type: String,
}

impl EventStream {
    fn open(server: &Server, path: &str, last_event_id: Option<&str>) -> EventStream {
        let host = server.url.trim_start_matches("http://");
        let mut socket = TcpStream::connect(host).expect("connecting to the server");
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("a read timeout");
        let mut request = format!(
            "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {}\r\n",
            server.admin_token()
        );
        if let Some(id) = last_event_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        socket.write_all(request.as_bytes()).expect("sending");
        let mut reader = BufReader::new(socket);
        let mut status = 0;
        let mut content_type = String::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => panic!("the server closed before the head ended"),
                Ok(_) => {}
                Err(_) if Instant::now() < deadline => continue,
                Err(err) => panic!("reading the head: {err}"),
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if status == 0 {
                status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            } else if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-type") {
                    content_type = value.trim().to_owned();
                }
            }
        }
        EventStream {
            reader,
            status,
            content_type,
        }
    }

    /// The next message (comments and the retry field skipped); `None` when the
    /// stream ended.
    fn next(&mut self) -> Option<Message> {
        let deadline = Instant::now() + PATIENCE;
        let mut message = Message::default();
        let mut any = false;
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(_) if Instant::now() < deadline => continue,
                Err(err) => panic!("no message within {PATIENCE:?}: {err}"),
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if any && !message.event.is_empty() {
                    return Some(message);
                }
                message = Message::default();
                any = false;
                continue;
            }
            any = true;
            if let Some(value) = line.strip_prefix("event:") {
                message.event = value.trim().to_owned();
            } else if let Some(value) = line.strip_prefix("id:") {
                message.id = Some(value.trim().to_owned());
            } else if let Some(value) = line.strip_prefix("data:") {
                message
                    .data
                    .push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
    }

    /// Reads until a message satisfies `wanted`; returns every message read.
    fn until(&mut self, what: &str, wanted: impl Fn(&Message) -> bool) -> Vec<Message> {
        let mut seen = Vec::new();
        loop {
            let Some(message) = self.next() else {
                panic!("the stream ended before {what}: {seen:#?}")
            };
            let done = wanted(&message);
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
}

fn transition_to(message: &Message, job: &str, state: &str) -> bool {
    message.event == "transition" && {
        let event = message.json();
        event["job"] == job && event["to"] == state
    }
}

#[test]
fn a_build_stream_follows_transitions_live_and_resumes_after_last_event_id() {
    let harness = Harness::new("streams-build");
    let server = harness.start_server("main", &[]);
    let gate = harness.path().join("gate");
    let install = format!(
        "for i in 1 2 3; do echo \"line $i\"; done\n{}echo after-gate\n",
        wait_for_gate(&gate)
    );
    let build = server.submit(&write_build(
        &harness.mkdir("build"),
        "1600",
        &[Job::new("gated", "PRO").install(&install)],
    ));

    let mut stream = EventStream::open(&server, &format!("/v1/builds/{build}/stream"), None);
    assert_eq!(stream.status, 200);
    assert!(
        stream.content_type.starts_with("text/event-stream"),
        "{}",
        stream.content_type
    );
    let first = stream.next().expect("a first message");
    assert_eq!(first.event, "jobs", "{first:?}");
    assert_eq!(first.json()[0]["state"], "queued", "{first:?}");
    let queued = stream.until("the queued transition", |m| {
        transition_to(m, "gated", "queued")
    });
    let queued_id = queued.last().unwrap().id.clone().expect("an id");

    // A client comes: the same connection hears of the claim, with no new request.
    let _client = harness.start_client("runner", &[&server], &["--include", "*"]);
    let seen = stream.until("running", |m| transition_to(m, "gated", "running"));
    let running_id = seen.last().unwrap().id.clone().expect("an id");
    assert!(running_id.parse::<i64>().unwrap() > queued_id.parse::<i64>().unwrap());

    // The job's stream carries its log lines as it prints them.
    let mut job_stream =
        EventStream::open(&server, &format!("/v1/jobs/{build}/gated/stream"), None);
    assert_eq!(job_stream.status, 200);
    let lines = job_stream.until("line 3 in the log", |m| {
        m.event == "log" && m.data.contains("line 3")
    });
    assert_eq!(lines[0].event, "job", "the status comes first: {lines:#?}");
    std::fs::write(&gate, b"").expect("opening the gate");
    // The end may come in the same batch as the last lines (transitions first).
    let seen = job_stream.until("after-gate in the log", |m| {
        m.event == "log" && m.data.contains("after-gate")
    });
    if !seen.iter().any(|m| transition_to(m, "gated", "finished")) {
        job_stream.until("the job finished", |m| {
            transition_to(m, "gated", "finished")
        });
    }

    // The build's stream hears of the end too, and of the jobs list that changed.
    let seen = stream.until("finished", |m| transition_to(m, "gated", "finished"));
    assert!(
        seen.iter().any(|m| m.event == "jobs"),
        "the jobs again as they changed: {seen:#?}"
    );
    drop(stream);

    // A reconnect after the queued event gets running and finished, not queued again.
    let mut resumed = EventStream::open(
        &server,
        &format!("/v1/builds/{build}/stream?wait=0"),
        Some(&queued_id),
    );
    let mut messages = Vec::new();
    while let Some(message) = resumed.next() {
        messages.push(message);
    }
    let states: Vec<String> = messages
        .iter()
        .filter(|m| m.event == "transition")
        .map(|m| m.json()["to"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(states, ["running", "finished"], "{messages:#?}");
    assert_eq!(messages[0].event, "jobs", "{messages:#?}");

    // `after` in the query says the same as the header.
    let mut from_running = EventStream::open(
        &server,
        &format!("/v1/builds/{build}/stream?wait=0&after={running_id}"),
        None,
    );
    let mut transitions = 0;
    while let Some(message) = from_running.next() {
        transitions += usize::from(message.event == "transition");
    }
    assert_eq!(transitions, 1, "only finished comes after running");
}

#[test]
fn the_farm_stream_hears_of_every_build_from_now_on() {
    let harness = Harness::new("streams-farm");
    let server = harness.start_server("main", &[]);
    let old = server.submit(&write_build(
        &harness.mkdir("old"),
        "1610",
        &[Job::new("a", "PRO")],
    ));
    let mut stream = EventStream::open(&server, "/v1/stream", None);
    assert_eq!(stream.status, 200);
    let first = stream.next().expect("a first message");
    assert_eq!(first.event, "builds", "{first:?}");
    assert_eq!(first.json()[0]["number"], old.as_str(), "{first:?}");
    let new = server.submit(&write_build(
        &harness.mkdir("new"),
        "1611",
        &[Job::new("b", "SRV")],
    ));
    let seen = stream.until("the new build's job queued", |m| {
        m.event == "transition" && m.json()["build"] == new.as_str()
    });
    assert!(
        !seen
            .iter()
            .any(|m| m.event == "transition" && m.json()["build"] == old.as_str()),
        "no past events without Last-Event-ID: {seen:#?}"
    );

    // Unknown builds and ids that this stream never sent are refused up front.
    let missing = EventStream::open(&server, "/v1/builds/9999/stream", None);
    assert_eq!(missing.status, 404);
    let bad = EventStream::open(&server, "/v1/stream?after=nonsense", None);
    assert_eq!(bad.status, 400);
}
