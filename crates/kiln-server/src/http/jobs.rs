//! Jobs: claims and offers, sessions, what a holder reports (heartbeats, logs, the end
//! of a run), what operators read of a job and do to it.

use super::error::HttpError;
use super::{lease_of, xml_response, Peer, Shared};
use crate::farm::{Caller, FarmError};
use axum::body::Body;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use kiln_proto::api::{
    ClaimRequest, Event, Fail, Finish, Heartbeat, JobStatus, LogAppended, LogBatch, LogChunk,
};
use kiln_proto::names::check_name;
use kiln_proto::state::JobState;
use kiln_proto::status_xml::{render_job_status, JobStatusXml};
use serde::Deserialize;

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

#[derive(Deserialize)]
pub struct SessionQuery {
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

pub async fn status(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Answer<Json<JobStatus>> {
    Ok(Json(state.farm.job(&build, &job).await?))
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

#[derive(Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    after: i64,
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

pub async fn heartbeat(
    state: Shared,
    _caller: Caller,
    Peer(address): Peer,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(beat): Json<Heartbeat>,
) -> Answer<Json<serde_json::Value>> {
    let lease = lease_of(&headers)?;
    state
        .farm
        .heartbeat(&build, &job, lease, &beat, address)
        .await?;
    Ok(Json(
        serde_json::json!({ "lease_secs": state.farm.config().lease_secs }),
    ))
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

#[derive(Deserialize)]
pub struct GiveUp {
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

pub async fn restart(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Answer<Json<Event>> {
    Ok(Json(state.farm.restart(&build, &job).await?))
}

pub async fn cancel(
    state: Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Answer<Json<Event>> {
    Ok(Json(state.farm.cancel(&build, &job).await?))
}
