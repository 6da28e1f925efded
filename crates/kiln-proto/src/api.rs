//! JSON bodies of the HTTP API under `/v1`.
//!
//! Operators read [`BuildSummary`], [`JobStatus`], [`LogChunk`], [`Event`],
//! [`ImageInfo`] and [`ClientInfo`]; clients send [`ClaimRequest`] and get a
//! [`Claim`], then carry the claim's lease token (header [`crate::LEASE_HEADER`]) on
//! [`Heartbeat`], [`LogBatch`], image uploads, [`Finish`] and [`Fail`]. Every refusal
//! is an [`ApiError`].
//! Times are unix microseconds.

use crate::progress::Progress;
use crate::state::JobState;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every refusal: what was wrong, in words, and a stable code.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// A stable machine-readable code such as `stale_lease` or `duplicate_build`.
    pub code: String,
    /// What was wrong, for a person.
    pub error: String,
    /// With `missing_chunks`: the chunks (BLAKE3, hex) the server lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<String>>,
}

/// A build as listed by `GET /v1/builds`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildSummary {
    pub number: String,
    pub title: String,
    pub build_time: Option<String>,
    pub submitted_at: i64,
    pub n_jobs: u32,
    pub n_queued: u32,
    pub n_running: u32,
    pub n_finished: u32,
    pub n_failed: u32,
    pub n_expired: u32,
    pub n_cancelled: u32,
}

impl BuildSummary {
    /// Whether every job reached a final state.
    pub fn is_done(&self) -> bool {
        self.n_queued == 0 && self.n_running == 0
    }
}

/// A job's status as operators see it (`kiln status BUILD --json` prints these).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct JobStatus {
    pub build: String,
    pub id: String,
    pub title: String,
    pub config_type: String,
    pub state: JobState,
    pub client_id: Option<String>,
    pub time_start: Option<i64>,
    pub time_complete: Option<i64>,
    pub major_state: Option<String>,
    pub minor_state: Option<String>,
    pub percent: Option<u8>,
    pub eta_seconds: Option<u64>,
    pub attempt: u32,
    pub error: Option<String>,
    pub priority: i64,
    pub assigned_to: Option<String>,
    /// When the latest run's steps ended and its images began to upload (unix
    /// microseconds); none before that, or for a run that went back to the queue.
    #[serde(default)]
    pub uploading_since: Option<i64>,
}

/// `POST /v1/claim`: a client asks for one job, waiting up to `wait_secs` for one.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClaimRequest {
    /// The caller's own client id.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    pub client_id: String,
    /// Config types the client takes; `*` takes any.
    #[schema(min_items = 1)]
    pub include: Vec<String>,
    /// How long the server may hold the request open waiting for a job.
    pub wait_secs: u64,
    /// How many jobs the client runs at once; older clients do not say.
    #[serde(default)]
    pub slots: Option<u32>,
    /// The client's kiln version; older clients do not say.
    #[serde(default)]
    pub version: Option<String>,
}

/// `POST /v1/offer` (body: a [`ClaimRequest`]): the job this server would hand the
/// client next, without handing it over. A client serving several servers asks each
/// and claims from the one with the best offer: the highest priority, then the oldest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Offer {
    pub build: String,
    pub job_id: String,
    pub priority: i64,
    /// When the job's build was submitted (unix microseconds).
    pub submitted_at: i64,
}

impl Offer {
    /// Offers sort by this, the one to take first first: higher priority, then the
    /// older build.
    pub fn precedence(&self) -> (std::cmp::Reverse<i64>, i64) {
        (std::cmp::Reverse(self.priority), self.submitted_at)
    }
}

/// A claimed job: what the client needs to run it. Answer to [`ClaimRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Claim {
    pub build: String,
    pub job_id: String,
    pub title: String,
    pub config_type: String,
    pub install_script: String,
    pub configure_script: Option<String>,
    pub image_script: String,
    /// The optional verify step, run after image (absent from older servers' claims).
    #[serde(default)]
    pub verify_script: Option<String>,
    pub timeout_secs: u64,
    /// 1 for the first attempt; grows each time a lease is lost.
    pub attempt: u32,
    /// The lease token: carried on every later call about this job.
    pub lease: String,
    /// The lease lasts this long past each heartbeat.
    pub lease_secs: u64,
    /// The client heartbeats this often.
    pub heartbeat_secs: u64,
}

/// `POST /v1/jobs/{build}/{job}/heartbeat`: the holder is alive, with its progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub progress: Option<Progress>,
    /// The job's steps are over and its images are being uploaded: the job's TIMEOUT
    /// (which covers the steps) no longer applies; the lease still does.
    #[serde(default)]
    pub steps_done: bool,
}

/// One line a step printed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NewLogLine {
    /// `stdout`, `stderr` or `kiln` (the client's own notes).
    pub stream: String,
    pub text: String,
}

/// `POST /v1/jobs/{build}/{job}/log`: lines in order, and the latest progress if any.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct LogBatch {
    pub lines: Vec<NewLogLine>,
    pub progress: Option<Progress>,
}

/// The answer to a log batch. A server older than this field answers `204 No Content`,
/// which reads as the default (not truncated).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogAppended {
    /// The job's log reached the server's limit (`--max-log-bytes-per-job`): the
    /// server stores no more of its lines, so the client stops sending them. The job
    /// itself runs on.
    #[serde(default)]
    pub truncated: bool,
}

/// A stored log line.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub seq: i64,
    pub time: i64,
    pub attempt: u32,
    pub stream: String,
    pub text: String,
}

/// `GET /v1/jobs/{build}/{job}/log?after=SEQ&wait=SECS`: the lines after `after`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogChunk {
    pub lines: Vec<LogLine>,
    /// Pass as `after` to get the lines that follow.
    pub next: i64,
    /// The job is in a final state: no more lines will come unless it is restarted.
    pub done: bool,
}

/// `POST /v1/jobs/{build}/{job}/finish`: every image is uploaded.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Finish {
    /// The images the client uploaded; the server checks they are all stored.
    pub images: Vec<String>,
}

/// `POST /v1/jobs/{build}/{job}/fail`: the job failed on the client.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Fail {
    /// `timeout`, `exit`, `signal`, `setup`, `upload` …
    pub reason: String,
    /// What happened, with the log tail when a step failed.
    pub message: String,
    pub exit_status: Option<i32>,
}

/// A stored image of a job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    pub build: String,
    pub job_id: String,
    pub config_type: String,
    pub name: String,
    pub size: u64,
    pub blake3: String,
    pub sha256: String,
    pub created_at: i64,
}

/// One transition in a build's event log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub seq: i64,
    pub time: i64,
    pub build: String,
    pub job: String,
    pub from: Option<JobState>,
    pub to: JobState,
    pub client_id: Option<String>,
    pub attempt: u32,
    pub reason: Option<String>,
}

/// A client as `GET /v1/clients` lists it: what it said of itself at its latest
/// claim, the jobs it holds now, and what became of the jobs it took from this server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ClientInfo {
    pub id: String,
    /// Config types it takes; `*` takes any.
    pub include: Vec<String>,
    /// How many jobs it runs at once, if it said.
    pub slots: Option<u32>,
    /// Its kiln version, if it said.
    pub version: Option<String>,
    /// The IP address its requests come from (a proxy's, behind one).
    pub address: Option<String>,
    /// Its first claim on this server (or, for a client that has claimed nothing yet,
    /// the first time this server process heard from it).
    pub first_seen: i64,
    /// The latest claim, heartbeat, log batch or session keep-alive it sent.
    pub last_contact: i64,
    /// Whether it holds a session connection open now.
    pub session_open: bool,
    /// The jobs it runs now.
    pub held: Vec<HeldJob>,
    /// Runs it started (a job given back unstarted is not counted).
    pub n_claimed: u64,
    /// Jobs it finished.
    pub n_finished: u64,
    /// Jobs it reported failed, whether or not the job was queued again for a retry.
    pub n_failed: u64,
    /// Jobs taken back from it: lease lapsed, session dropped, given back after it
    /// restarted or stopped, or held past their timeout.
    pub n_lost: u64,
    /// The total size of the images of the jobs it finished.
    pub image_bytes: u64,
}

/// A job a client runs now, as [`ClientInfo`] lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct HeldJob {
    pub build: String,
    pub job: String,
    /// The latest progress it reported, if any.
    pub percent: Option<u8>,
    pub major: Option<String>,
}

/// Answer to `POST /v1/builds`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Submitted {
    pub number: String,
    pub n_jobs: u32,
}

/// What the server POSTs to a build's NOTIFY URLs, and keeps in its outbox until
/// delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// `job_expired`, `job_failed`, `job_finished` or `build_finished`.
    pub event: String,
    pub build: String,
    /// The job, except for `build_finished`.
    pub job: Option<String>,
    pub client_id: Option<String>,
    pub reason: Option<String>,
    /// RFC 3339, UTC.
    pub time: String,
    /// The job's event sequence number in the build's event log (for `build_finished`,
    /// that of the transition that ended the build).
    pub seq: i64,
}

/// One server as listed by a master's `GET /v1/servers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// Where clients reach it.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub builds: u64,
    pub queued: u64,
    pub running: u64,
    /// Unix microseconds of its last registration or heartbeat.
    pub last_heartbeat: i64,
    /// Unix microseconds of its first registration with this master.
    pub first_seen: i64,
    /// Whether it heartbeat within the timeout (only with `?all=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_request_of_an_older_client_without_slots_or_version_is_read() {
        let request: ClaimRequest =
            serde_json::from_str(r#"{"client_id":"old","include":["PRO"],"wait_secs":30}"#)
                .expect("an older client's claim request");
        assert_eq!(request.slots, None);
        assert_eq!(request.version, None);
        let request: ClaimRequest = serde_json::from_str(
            r#"{"client_id":"new","include":["*"],"wait_secs":30,"slots":2,"version":"0.1.0"}"#,
        )
        .expect("a claim request");
        assert_eq!(request.slots, Some(2));
        assert_eq!(request.version.as_deref(), Some("0.1.0"));
    }
}

/// A client's own secret, as enrolling or an operator's `kiln server client add` hands
/// it out: once, in this answer.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ClientSecret {
    pub client_id: String,
    pub secret: String,
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("ClientSecret")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// A client credential as `GET /v1/credentials` lists it: never the secret or its hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct CredentialInfo {
    pub client_id: String,
    /// `enrolled` (with the join token) or `issued` (by an operator).
    pub origin: String,
    /// Unix microseconds.
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}
