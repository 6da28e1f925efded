//! Jobs: claims and offers, sessions, what a holder reports (heartbeats, logs, the end
//! of a run), what operators read of a job and do to it.

use super::error::HttpError;
use super::{lease_of, xml_response, Doc, Peer, Shared};
use crate::domain::{Caller, FarmError};
use axum::body::Body;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use kiln_proto::api::{
    Claim, ClaimRequest, Event, Fail, Finish, Heartbeat, JobStatus, LogAppended, LogBatch,
    LogChunk, Offer,
};
use kiln_proto::names::check_name;
use kiln_proto::state::JobState;
use kiln_proto::status_xml::{render_job_status, JobStatusXml};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

type Answer<T> = Result<T, HttpError>;

/// `POST /v1/claim`: a job claimed for the caller, or 204 when none came in its wait.
pub async fn claim(
    state: Shared,
    caller: Caller,
    Peer(address): Peer,
    Json(request): Json<ClaimRequest>,
) -> Answer<Response> {
    Ok(match state.farm.claim(&caller, &request, address).await? {
        Some(claim) => Json(claim).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

pub fn claim_doc() -> Doc {
    Doc::new("jobs", "claim", "Wait for a job and claim it")
        .describe(
            "The best job this client may take, claimed under a new lease, as soon as \
             there is one within `wait_secs` (at most 120). The claim is atomic: one job \
             goes to one request. Every later call about the job carries the lease in \
             `x-kiln-lease`, and the client heartbeats every `heartbeat_secs`. A new claim \
             or offer from the same client id ends its older waits (204).",
        )
        .takes::<ClaimRequest>()
        .answers::<Claim>(200, "A job, claimed for the caller.")
        .answers_empty(
            204,
            "No job came within the wait, or the server is stopping: ask again.",
        )
        .refuses(400, &["bad_name", "no_include"])
        // A credential revoked while the claim waited: the job goes back.
        .refuses(401, &["unauthorized"])
}

/// `POST /v1/offer`: the job a claim would get (now, or within `wait_secs`), not
/// claimed; 204 when there is none.
pub async fn offer(
    state: Shared,
    caller: Caller,
    Peer(address): Peer,
    Json(request): Json<ClaimRequest>,
) -> Answer<Response> {
    Ok(match state.farm.offer(&caller, &request, address).await? {
        Some(offer) => Json(offer).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

pub fn offer_doc() -> Doc {
    Doc::new("jobs", "offer", "The job a claim would get, not claimed")
        .describe(
            "So that a client serving several servers can claim from the one with the \
             best job: higher `priority` first, then older `submitted_at`. With \
             `wait_secs` 0 the server answers at once; otherwise it waits up to \
             `wait_secs` (at most 120) for a job this client may take.",
        )
        .takes::<ClaimRequest>()
        .answers::<Offer>(200, "The job a claim would get now.")
        .answers_empty(204, "There is none.")
        .refuses(400, &["bad_name", "no_include"])
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionQuery {
    /// The caller's own client id.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    client_id: String,
}

/// `POST /v1/session`: held open for as long as the client lives (see
/// [`crate::sessions`]). Its body is a trickle of keep-alive bytes that never ends
/// while the client runs.
pub async fn session(
    state: Shared,
    caller: Caller,
    Peer(address): Peer,
    Query(query): Query<SessionQuery>,
    body: Body,
) -> Answer<StatusCode> {
    let farm = &state.farm;
    let client_id = query.client_id;
    check_name("client id", &client_id).map_err(|msg| FarmError::invalid("bad_name", msg))?;
    caller.require_client_named(&client_id)?;
    let generation = farm.session_opened(&client_id, address.as_deref());
    let mut stream = body.into_data_stream();
    let ended_by_client = tokio::select! {
        ended = async {
            loop {
                match stream.next().await {
                    // Each keep-alive is a contact.
                    Some(Ok(_)) => farm.session_alive(&client_id, address.as_deref()),
                    Some(Err(_)) | None => break true,
                }
            }
        } => ended,
        // The server stopping is not the client leaving.
        _ = farm.stopped() => false,
    };
    farm.session_closed(&client_id, generation, ended_by_client);
    Ok(StatusCode::NO_CONTENT)
}

pub fn session_doc() -> Doc {
    Doc::new("jobs", "session", "Hold a session open")
        .describe(
            "The client sends a body that never ends (a newline every few seconds) and \
             keeps the request open while it runs, so that the server notices a dead \
             client at once: when the connection closes and no new session opens within a \
             short grace, every job running under that client id is taken back. Optional: \
             a client without a session is found by its lease.",
        )
        .query::<SessionQuery>()
        .takes_bytes(
            "application/octet-stream",
            "Keep-alive bytes, for as long as the client runs.",
        )
        .answers_empty(204, "The body ended: the session is closed.")
        .refuses(400, &["bad_name"])
}

pub async fn status(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Answer<Json<JobStatus>> {
    Ok(Json(state.farm.job(&build, &job).await?))
}

pub fn status_doc() -> Doc {
    Doc::new("jobs", "get_job", "One job's status")
        .answers::<JobStatus>(200, "The job's status.")
        .refuses(404, &["not_found"])
}

/// The seed's JOBSTATUS.
pub async fn status_xml(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Answer<Response> {
    let status = state.farm.job(&build, &job).await?;
    let xml = render_job_status(&JobStatusXml {
        client_id: status.client_id.as_deref(),
        time_start: status.time_start,
        time_complete: status.time_complete,
        // A job that ended says so in MAJORSTATE, as the seed's stagerel.cmd expects
        // (FINISHED); a running one shows its step's own major state, if it gave one.
        major_state: if status.state.is_final() {
            Some(seed_major_state(status.state))
        } else {
            status
                .major_state
                .as_deref()
                .or(Some(seed_major_state(status.state)))
        },
        minor_state: status.minor_state.as_deref(),
        percent: status.percent,
        eta_seconds: status.eta_seconds,
    });
    Ok(xml_response(xml))
}

pub fn status_xml_doc() -> Doc {
    Doc::new(
        "jobs",
        "get_job_status_xml",
        "The job's status as the seed's XML",
    )
    .answers_text(
        200,
        "application/xml",
        "The seed's JOBSTATUS, with kiln's PERCENT and ETA (seconds) after it.",
    )
    .refuses(404, &["not_found"])
}

/// The seed's MAJORSTATE for a job's state: `INPROGRESS` or `FINISHED` ([0057]), or
/// the state's own name in capitals.
fn seed_major_state(state: JobState) -> &'static str {
    match state {
        JobState::Running => "INPROGRESS",
        JobState::Finished => "FINISHED",
        JobState::Queued => "QUEUED",
        JobState::Failed => "FAILED",
        JobState::Expired => "EXPIRED",
        JobState::Cancelled => "CANCELLED",
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// The lines after this sequence number (the `next` of the previous answer).
    #[serde(default)]
    after: i64,
    /// Seconds to wait for new lines when there are none and the job has not ended
    /// (at most 120).
    #[serde(default)]
    wait: u64,
}

pub async fn read_log(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    Query(query): Query<LogQuery>,
) -> Answer<Json<LogChunk>> {
    Ok(Json(
        state
            .farm
            .read_log(&build, &job, query.after, query.wait)
            .await?,
    ))
}

pub fn read_log_doc() -> Doc {
    Doc::new("jobs", "read_log", "Read (and follow) the job's log")
        .query::<LogQuery>()
        .answers::<LogChunk>(
            200,
            "Up to 2000 lines after `after`, the `next` to ask from, and `done` once the \
             job has ended and no more lines follow.",
        )
        .refuses(404, &["not_found"])
}

pub async fn append_log(
    state: Shared,
    _caller: Caller,
    Peer(address): Peer,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(batch): Json<LogBatch>,
) -> Answer<Json<LogAppended>> {
    let lease = lease_of(&headers)?;
    Ok(Json(
        state
            .farm
            .append_log(&build, &job, lease, &batch, address)
            .await?,
    ))
}

pub fn append_log_doc() -> Doc {
    Doc::new("jobs", "append_log", "Append log lines")
        .describe(
            "Lines in order (at most 10,000), and the latest progress. Past the job's log \
             limit the lines are dropped and `truncated` says so; the job runs on.",
        )
        .takes::<LogBatch>()
        .answers::<LogAppended>(200, "The lines are stored (or dropped past the limit).")
        .refuses(413, &["too_large"])
}

/// The answer to a heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaseExtended {
    /// The lease now lasts this long from now.
    pub lease_secs: u64,
}

pub async fn heartbeat(
    state: Shared,
    _caller: Caller,
    Peer(address): Peer,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(beat): Json<Heartbeat>,
) -> Answer<Json<LeaseExtended>> {
    let lease = lease_of(&headers)?;
    state
        .farm
        .heartbeat(&build, &job, lease, &beat, address)
        .await?;
    Ok(Json(LeaseExtended {
        lease_secs: state.farm.config().lease_secs,
    }))
}

pub fn heartbeat_doc() -> Doc {
    Doc::new("jobs", "heartbeat", "Extend the lease, report progress")
        .describe("Each progress field that is not null replaces the stored one.")
        .takes::<Heartbeat>()
        .answers::<LeaseExtended>(200, "The lease is extended.")
}

pub async fn finish(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(report): Json<Finish>,
) -> Answer<Json<Event>> {
    let lease = lease_of(&headers)?;
    Ok(Json(
        state
            .farm
            .finish(&build, &job, lease, &report.images)
            .await?,
    ))
}

pub fn finish_doc() -> Doc {
    Doc::new("jobs", "finish", "Report the job finished")
        .describe(
            "The images this attempt stored; the server drops any other image of the job. \
             A finished job has at least one image, and each must be stored.",
        )
        .takes::<Finish>()
        .answers::<Event>(200, "The transition to `finished`.")
        .refuses(409, &["conflict"])
}

pub async fn fail(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(report): Json<Fail>,
) -> Answer<Json<Event>> {
    let lease = lease_of(&headers)?;
    Ok(Json(state.farm.fail(&build, &job, lease, report).await?))
}

pub fn fail_doc() -> Doc {
    Doc::new("jobs", "fail", "Report the job failed")
        .describe("The job fails, or is queued again if it has retries left.")
        .takes::<Fail>()
        .answers::<Event>(
            200,
            "The transition to `failed`, or to `queued` for a retry.",
        )
}

pub async fn release(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer<StatusCode> {
    let lease = lease_of(&headers)?;
    state.farm.release(&build, &job, lease).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub fn release_doc() -> Doc {
    Doc::new("jobs", "release", "Give back a job not started")
        .describe("The job is queued again and the attempt is not counted.")
        .answers_empty(204, "The job is queued again.")
}

/// `POST /v1/jobs/{build}/{job}/giveup`: why the holder gives the job back.
#[derive(Deserialize, ToSchema)]
pub struct GiveUp {
    /// Why (at most 500 characters are kept).
    reason: String,
}

/// The holder gives a started job back: queued again at once, the run counted.
pub async fn give_up(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(report): Json<GiveUp>,
) -> Answer<Json<Event>> {
    let lease = lease_of(&headers)?;
    Ok(Json(
        state
            .farm
            .give_up(&build, &job, lease, &report.reason)
            .await?,
    ))
}

pub fn give_up_doc() -> Doc {
    Doc::new("jobs", "give_up", "Give back a started job")
        .describe(
            "The run counts as lost: the job is queued again for its next attempt, or \
             fails with `lost` when it has lost its most runs.",
        )
        .takes::<GiveUp>()
        .answers::<Event>(200, "The transition.")
}

pub async fn restart(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Answer<Json<Event>> {
    Ok(Json(state.farm.restart(&build, &job).await?))
}

pub fn restart_doc() -> Doc {
    Doc::new("jobs", "restart", "Put a job back in the queue as new")
        .describe(
            "A job in any state but `queued`: attempt 0, its images, error and lost runs \
             forgotten. A client still running it gets `409 stale_lease` at its next call.",
        )
        .answers::<Event>(200, "The transition to `queued`.")
        .refuses(404, &["not_found"])
        .refuses(409, &["conflict"])
}

pub async fn cancel(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Answer<Json<Event>> {
    Ok(Json(state.farm.cancel(&build, &job).await?))
}

pub fn cancel_doc() -> Doc {
    Doc::new("jobs", "cancel", "Cancel a queued or running job")
        .answers::<Event>(200, "The transition to `cancelled`.")
        .refuses(404, &["not_found"])
        .refuses(409, &["conflict"])
}
