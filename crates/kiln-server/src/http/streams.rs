//! Server-sent event streams: the farm's, a build's and a job's changes as they
//! happen, for the dashboard (one stream per page) and any other follower.
//!
//! Each stream first sends the state as it is (`builds`, `jobs` or `job`), then every
//! event after the one the caller last saw, then follows: when the farm changes, it
//! sends the new events and the state again if it changed. A transition's SSE `id` is
//! its sequence number (for a job's stream, `EVENT_SEQ-LOG_SEQ`), so that a browser's
//! `EventSource` resumes where it was with `Last-Event-ID` after a reconnect (or the
//! caller says `after`). A stream ends after `wait` seconds (default 300; the browser
//! reconnects by itself), or at once after what is there with `wait=0`, or when the
//! server stops. Nothing polls: a stream wakes on the farm's changes only.

use super::error::HttpError;
use super::{Doc, Shared};
use crate::domain::follow::Follower;
use crate::domain::{Caller, Farm, FarmError};
use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use kiln_proto::api::Event;
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use utoipa::IntoParams;

type Answer<T> = Result<T, HttpError>;

/// How long a stream follows when the caller names no `wait`.
const DEFAULT_FOLLOW_SECS: u64 = 300;
/// The longest a stream follows.
const MAX_FOLLOW_SECS: u64 = 3600;
/// What a browser waits before it reconnects a stream that ended, in milliseconds.
const RETRY_MS: u64 = 1000;
/// A comment this often keeps proxies from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Send what came after this (the last `id` seen); the `Last-Event-ID` header,
    /// which a browser sends when it reconnects, says the same and wins.
    after: Option<String>,
    /// Seconds to follow after what is there has been sent: 0 ends at once, at most
    /// 3600, 300 when not given.
    wait: Option<u64>,
}

impl StreamQuery {
    /// Where the caller was, if it says: `Last-Event-ID`, else `after`.
    fn said(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get("last-event-id")
            .and_then(|value| value.to_str().ok())
            .or(self.after.as_deref())
            .map(str::to_owned)
    }

    /// Where the caller was, as the numbers in its id (0 when it says nothing).
    fn resume(&self, headers: &HeaderMap) -> Result<(i64, i64), FarmError> {
        let said = self.said(headers);
        let text = said.as_deref().unwrap_or("0");
        let mut parts = text.trim().splitn(2, '-');
        let mut number = || -> Result<i64, FarmError> {
            match parts.next() {
                None | Some("") => Ok(0),
                Some(part) => part.parse::<i64>().map_err(|_| {
                    FarmError::invalid(
                        "bad_request",
                        format!("{text:?} is not an event id this stream sent"),
                    )
                }),
            }
        };
        Ok((number()?.max(0), number()?.max(0)))
    }

    fn until(&self) -> Instant {
        let secs = self
            .wait
            .unwrap_or(DEFAULT_FOLLOW_SECS)
            .min(MAX_FOLLOW_SECS);
        Instant::now() + Duration::from_secs(secs)
    }
}

/// One message of a stream.
fn message(kind: &str, id: Option<String>, data: &impl serde::Serialize) -> SseEvent {
    let event = SseEvent::default()
        .event(kind)
        .json_data(data)
        .unwrap_or_else(|_| SseEvent::default().event(kind).data("null"));
    match id {
        Some(id) => event.id(id),
        None => event,
    }
}

/// What a stream reads each time the farm changes: the messages to send now.
trait Source: Send + 'static {
    fn read(
        &mut self,
        farm: &Farm,
    ) -> impl std::future::Future<Output = Result<Vec<SseEvent>, FarmError>> + Send;
}

/// Sends what `source` reads now, then again at each change until `until`.
fn follow<S: Source>(
    farm: Arc<Farm>,
    source: S,
    until: Instant,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct State<S> {
        farm: Arc<Farm>,
        source: S,
        follower: Follower,
        until: Instant,
        first: bool,
        over: bool,
    }
    let follower = farm.follower();
    let state = State {
        farm,
        source,
        follower,
        until,
        first: true,
        over: false,
    };
    stream::unfold(state, |mut state| async move {
        loop {
            if state.over {
                return None;
            }
            if !state.first && !state.follower.changed(state.until).await {
                return None;
            }
            state.first = false;
            match state.source.read(&state.farm).await {
                Ok(messages) if messages.is_empty() => continue,
                Ok(messages) => {
                    let messages: Vec<Result<SseEvent, Infallible>> =
                        messages.into_iter().map(Ok).collect();
                    return Some((stream::iter(messages), state));
                }
                Err(err) => {
                    // The build or job went (deleted): say so and end.
                    state.over = true;
                    let body = kiln_proto::api::ApiError {
                        code: "not_found".to_owned(),
                        error: err.to_string(),
                        missing: None,
                    };
                    return Some((stream::iter(vec![Ok(message("error", None, &body))]), state));
                }
            }
        }
    })
    .flatten()
}

fn sse(stream: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static) -> Response {
    let retry = stream::once(async {
        Ok::<_, Infallible>(SseEvent::default().retry(Duration::from_millis(RETRY_MS)))
    });
    Sse::new(retry.chain(stream))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// A message of `kind` when `data` differs from what was sent last as `last`.
fn if_changed(
    messages: &mut Vec<SseEvent>,
    last: &mut Option<String>,
    kind: &str,
    data: &impl serde::Serialize,
) {
    let text = serde_json::to_string(data).unwrap_or_default();
    if last.as_deref() != Some(text.as_str()) {
        messages.push(message(kind, None, data));
        *last = Some(text);
    }
}

/// A client as the farm's stream shows it: busy or idle.
#[derive(serde::Serialize)]
struct ClientLoad<'a> {
    id: &'a str,
    include: &'a [String],
    slots: Option<u32>,
    session_open: bool,
    /// The jobs it runs now, as `BUILD/JOB`.
    running: Vec<String>,
}

/// The farm's stream: build summaries, the queue, the clients' load and every
/// build's transitions.
struct FarmSource {
    after: i64,
    last_builds: Option<String>,
    last_queue: Option<String>,
    last_clients: Option<String>,
}

impl Source for FarmSource {
    async fn read(&mut self, farm: &Farm) -> Result<Vec<SseEvent>, FarmError> {
        let mut messages = Vec::new();
        let builds = farm.builds().await?;
        if_changed(&mut messages, &mut self.last_builds, "builds", &builds);
        let queue = farm.queue_state().await?;
        if_changed(&mut messages, &mut self.last_queue, "queue", &queue);
        let clients = farm.clients().await?;
        let loads: Vec<ClientLoad<'_>> = clients
            .iter()
            .map(|client| ClientLoad {
                id: &client.id,
                include: &client.include,
                slots: client.slots,
                session_open: client.session_open,
                running: client
                    .held
                    .iter()
                    .map(|held| format!("{}/{}", held.build, held.job))
                    .collect(),
            })
            .collect();
        if_changed(&mut messages, &mut self.last_clients, "clients", &loads);
        loop {
            let events = farm.farm_events(self.after).await?;
            let full = events.len() as u32 == crate::domain::follow::FARM_EVENTS_PAGE;
            for event in &events {
                self.after = event.seq;
                messages.push(message("transition", Some(event.seq.to_string()), event));
            }
            if !full {
                break;
            }
        }
        Ok(messages)
    }
}

/// `GET /v1/stream`: the farm as it changes.
pub async fn farm(
    state: Shared,
    _caller: Caller,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Answer<Response> {
    // A new follower of the farm hears of what happens from now on.
    let after = match query.said(&headers) {
        Some(_) => query.resume(&headers)?.0,
        None => state.farm.last_event_seq().await?,
    };
    let source = FarmSource {
        after,
        last_builds: None,
        last_queue: None,
        last_clients: None,
    };
    Ok(sse(follow(state.farm.clone(), source, query.until())))
}

pub fn farm_doc() -> Doc {
    Doc::new(
        "streams",
        "stream_farm",
        "The farm as it changes (server-sent events)",
    )
    .describe(
        "A `text/event-stream`. First a `builds` message (the build list, as `GET \
             /v1/builds` answers), a `queue` message (jobs by state; per config type the \
             jobs queued and running, the oldest wait in seconds and the live clients \
             that take it) and a `clients` message (each client's id, include, slots, \
             session and the jobs it runs), then a `transition` message per event of any build \
             after `after` (its `id` is the event's `seq`; without `after`, from now on), \
             then, as the farm changes, \
             new transitions and the other messages again when they changed. Resumes after \
             `Last-Event-ID`. Ends after `wait` seconds (then reconnect), or when the \
             server stops.",
    )
    .query::<StreamQuery>()
    .answers_events(
        200,
        &["builds", "queue", "clients", "transition", "error"],
        "Server-sent events.",
    )
}

/// A build's stream: its jobs and transitions.
struct BuildSource {
    build: String,
    after: i64,
    last_jobs: Option<String>,
}

impl Source for BuildSource {
    async fn read(&mut self, farm: &Farm) -> Result<Vec<SseEvent>, FarmError> {
        let mut messages = Vec::new();
        let jobs = farm.jobs(&self.build).await?;
        let text = serde_json::to_string(&jobs).unwrap_or_default();
        if self.last_jobs.as_deref() != Some(text.as_str()) {
            messages.push(message("jobs", None, &jobs));
            self.last_jobs = Some(text);
        }
        for event in farm.events(&self.build, self.after, 0).await? {
            self.after = event.seq;
            messages.push(message("transition", Some(event.seq.to_string()), &event));
        }
        Ok(messages)
    }
}

/// `GET /v1/builds/{build}/stream`: one build as it changes.
pub async fn build(
    state: Shared,
    _caller: Caller,
    Path(build): Path<String>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Answer<Response> {
    let (after, _) = query.resume(&headers)?;
    // A build that is not there is refused before the stream starts.
    state.farm.build(&build).await?;
    let source = BuildSource {
        build,
        after,
        last_jobs: None,
    };
    Ok(sse(follow(state.farm.clone(), source, query.until())))
}

pub fn build_doc() -> Doc {
    Doc::new(
        "streams",
        "stream_build",
        "A build as it changes (server-sent events)",
    )
    .describe(
        "A `text/event-stream`. First a `jobs` message (the build's jobs, as `GET \
             /v1/builds/{build}/jobs` answers), then a `transition` message per event of \
             the build after `after` (its `id` is the event's `seq`), then, as the build \
             changes, new transitions and the jobs again when they changed (state, \
             progress, ETA). Resumes after `Last-Event-ID`. Ends after `wait` seconds \
             (then reconnect), or when the server stops; an `error` message if the \
             build is deleted.",
    )
    .query::<StreamQuery>()
    .answers_events(200, &["jobs", "transition", "error"], "Server-sent events.")
    .refuses(404, &["not_found"])
}

/// A job's stream: its status, transitions and log lines.
struct JobSource {
    build: String,
    job: String,
    after_event: i64,
    after_line: i64,
    last_status: Option<String>,
}

impl JobSource {
    fn id(&self) -> String {
        format!("{}-{}", self.after_event, self.after_line)
    }
}

impl Source for JobSource {
    async fn read(&mut self, farm: &Farm) -> Result<Vec<SseEvent>, FarmError> {
        let mut messages = Vec::new();
        let status = farm.job(&self.build, &self.job).await?;
        let text = serde_json::to_string(&status).unwrap_or_default();
        if self.last_status.as_deref() != Some(text.as_str()) {
            messages.push(message("job", None, &status));
            self.last_status = Some(text);
        }
        let events: Vec<Event> = farm
            .events(&self.build, self.after_event, 0)
            .await?
            .into_iter()
            .filter(|event| event.job == self.job)
            .collect();
        for event in events {
            self.after_event = event.seq;
            messages.push(message("transition", Some(self.id()), &event));
        }
        loop {
            let lines = farm
                .log_after(&self.build, &self.job, self.after_line)
                .await?;
            let Some(last) = lines.last() else { break };
            self.after_line = last.seq;
            messages.push(message("log", Some(self.id()), &lines));
        }
        Ok(messages)
    }
}

/// `GET /v1/jobs/{build}/{job}/stream`: one job as it changes, with its log.
pub async fn job(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Answer<Response> {
    let (after_event, after_line) = query.resume(&headers)?;
    state.farm.job(&build, &job).await?;
    let source = JobSource {
        build,
        job,
        after_event,
        after_line,
        last_status: None,
    };
    Ok(sse(follow(state.farm.clone(), source, query.until())))
}

pub fn job_doc() -> Doc {
    Doc::new(
        "streams",
        "stream_job",
        "A job as it changes, with its log (server-sent events)",
    )
    .describe(
        "A `text/event-stream`. First a `job` message (the job's status, as `GET \
             /v1/jobs/{build}/{job}` answers), then its `transition` messages and its log \
             lines (`log` messages, each a list of lines) after `after`, then, as the \
             job changes, new transitions, new lines and the status again when it \
             changed. Ids are `EVENT_SEQ-LOG_SEQ`: the last event and log line sent. \
             Resumes after `Last-Event-ID`. Ends after `wait` seconds (then reconnect), \
             or when the server stops.",
    )
    .query::<StreamQuery>()
    .answers_events(
        200,
        &["job", "transition", "log", "error"],
        "Server-sent events.",
    )
    .refuses(404, &["not_found"])
}
