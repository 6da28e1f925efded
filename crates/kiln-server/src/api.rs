//! The HTTP API under `/v1`: routes and handlers.
//!
//! Operators (admin credential) submit, cancel, restart, read and list the clients;
//! clients (client credential) claim, heartbeat, log, upload and report, each call
//! about a job carrying its lease token in [`kiln_proto::LEASE_HEADER`]. The seed's
//! formats are served too: `relbuild.xml` per build and `status.xml` (JOBSTATUS) per
//! job.

use crate::auth::Caller;
use crate::contacts::Announced;
use crate::error::ApiErr;
use crate::files;
use crate::transfer;
use crate::AppState;
use axum::body::Body;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequestParts, Multipart, Path, Query, RawPathParams,
    Request, State,
};
use axum::http::Method;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::{Json, Router};
use futures::StreamExt;
use kiln_blob::ImageHasher;
use kiln_proto::api::{
    BuildSummary, Claim, ClaimRequest, ClientInfo, Event, Fail, Finish, Heartbeat, ImageInfo,
    JobStatus, LogAppended, LogBatch, LogChunk, Offer, Submitted,
};
use kiln_proto::manifest::BuildManifest;
use kiln_proto::names::check_name;
use kiln_proto::status_xml::{render_job_status, JobStatusXml};
use kiln_proto::{BLAKE3_HEADER, LEASE_HEADER};
use kiln_store::{ClaimingClient, Failure, NewBuild, StoreError};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;

/// The longest a long poll (claim or log follow) is held open.
const MAX_WAIT_SECS: u64 = 120;
/// The most log lines one read returns.
const LOG_PAGE: u32 = 2000;
/// The largest manifest accepted.
const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// The largest commit body: a chunk list of a 64 GiB image at the smallest chunks.
const MAX_COMMIT_BYTES: usize = 512 << 20;
/// The largest body of any call without a limit of its own (JSON calls).
const MAX_JSON_BYTES: usize = 2 << 20;
/// The most bytes of a plain-text refusal that are read to re-wrap it.
const MAX_REFUSAL_TEXT: usize = 64 << 10;
/// The most lines one log batch may carry.
const MAX_LOG_BATCH: usize = 10_000;
/// The longest version a claim may give; the rest is cut off.
const MAX_VERSION_CHARS: usize = 64;

type Shared = State<Arc<AppState>>;

/// Who may call an endpoint; [`crate::auth::authorize`] enforces it before the
/// handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a credential.
    Open,
    /// Any valid credential.
    AnyCredential,
    /// The admin, or a client that runs a job of the build named in the path. With
    /// `public`, anyone when the server serves reads publicly (`--public-read`).
    Read { public: bool },
    /// The admin only.
    Admin,
    /// An identified client (a handler also checks that it names itself).
    Client,
    /// The client holding the job named in the path.
    Holder,
    /// The join token (or the admin): enrolls a client.
    Enroll,
}

/// One endpoint: method, route template and who may call it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}

type Handler = MethodRouter<Arc<AppState>>;

/// Every endpoint of the API with its handler: the router is built from this list
/// and nothing else, so [`endpoints`] names every route there is.
fn routes(submit_limit: usize) -> Vec<(Endpoint, Handler)> {
    use Access::*;
    const PUBLIC: Access = Read { public: true };
    const PRIVATE: Access = Read { public: false };
    let table: Vec<(Method, &'static str, Access, Handler)> = vec![
        (Method::GET, "/v1/health", Open, get(health)),
        (Method::GET, "/v1/whoami", AnyCredential, get(whoami)),
        (Method::GET, "/v1/builds", Admin, get(list_builds)),
        (
            Method::POST,
            "/v1/builds",
            Admin,
            post(submit).layer(DefaultBodyLimit::max(submit_limit)),
        ),
        (
            Method::GET,
            "/v1/builds/{build}",
            PUBLIC,
            get(build_summary),
        ),
        (
            Method::DELETE,
            "/v1/builds/{build}",
            Admin,
            delete(transfer::delete_build),
        ),
        (
            Method::GET,
            "/v1/builds/{build}/jobs",
            PUBLIC,
            get(list_jobs),
        ),
        (
            Method::GET,
            "/v1/builds/{build}/relbuild.xml",
            PRIVATE,
            get(relbuild_xml),
        ),
        (
            Method::GET,
            "/v1/builds/{build}/events",
            PUBLIC,
            get(events),
        ),
        (
            Method::GET,
            "/v1/builds/{build}/images",
            PUBLIC,
            get(list_images),
        ),
        (
            Method::GET,
            "/v1/builds/{build}/files",
            PRIVATE,
            get(build_files),
        ),
        (Method::POST, "/v1/claim", Client, post(claim)),
        (Method::POST, "/v1/offer", Client, post(offer)),
        (Method::GET, "/v1/clients", Admin, get(list_clients)),
        (Method::POST, "/v1/enroll", Enroll, post(enroll)),
        (Method::GET, "/v1/credentials", Admin, get(list_credentials)),
        (
            Method::POST,
            "/v1/credentials/{client}",
            Admin,
            post(issue_credential),
        ),
        (
            Method::DELETE,
            "/v1/credentials/{client}",
            Admin,
            delete(revoke_credential),
        ),
        (Method::POST, "/v1/join-token", Admin, post(join_token)),
        (
            Method::POST,
            "/v1/session",
            Client,
            post(session).layer(DefaultBodyLimit::disable()),
        ),
        (
            Method::GET,
            "/v1/jobs/{build}/{job}",
            PUBLIC,
            get(job_status),
        ),
        (
            Method::GET,
            "/v1/jobs/{build}/{job}/status.xml",
            PUBLIC,
            get(job_status_xml),
        ),
        (
            Method::GET,
            "/v1/jobs/{build}/{job}/log",
            PRIVATE,
            get(read_log),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/log",
            Holder,
            post(append_log),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/heartbeat",
            Holder,
            post(heartbeat),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/finish",
            Holder,
            post(finish),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/fail",
            Holder,
            post(fail),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/release",
            Holder,
            post(release),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/giveup",
            Holder,
            post(give_up),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/restart",
            Admin,
            post(restart),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/cancel",
            Admin,
            post(cancel),
        ),
        (
            Method::GET,
            "/v1/jobs/{build}/{job}/images/{name}",
            PUBLIC,
            get(transfer::get_image),
        ),
        (
            Method::PUT,
            "/v1/jobs/{build}/{job}/images/{name}",
            Holder,
            put(put_image).layer(DefaultBodyLimit::disable()),
        ),
        (
            Method::GET,
            "/v1/jobs/{build}/{job}/images/{name}/index",
            PUBLIC,
            get(transfer::index),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/images/{name}/commit",
            Holder,
            post(transfer::commit).layer(DefaultBodyLimit::max(MAX_COMMIT_BYTES)),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/chunks/missing",
            Holder,
            post(transfer::missing).layer(DefaultBodyLimit::max(MAX_COMMIT_BYTES)),
        ),
        (
            Method::POST,
            "/v1/jobs/{build}/{job}/chunks",
            Holder,
            post(transfer::put_chunks).layer(DefaultBodyLimit::disable()),
        ),
        (
            Method::POST,
            "/v1/chunks/fetch",
            PUBLIC,
            post(transfer::fetch),
        ),
        (Method::GET, "/v1/storage", Admin, get(transfer::storage)),
        (Method::GET, "/metrics", Admin, get(transfer::metrics)),
    ];
    table
        .into_iter()
        .map(|(method, path, access, handler)| {
            (
                Endpoint {
                    method,
                    path,
                    access,
                },
                handler,
            )
        })
        .collect()
}

/// Every endpoint the router serves, with who may call it.
pub fn endpoints() -> Vec<Endpoint> {
    routes(0)
        .into_iter()
        .map(|(endpoint, _)| endpoint)
        .collect()
}

/// Builds the router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let submit_limit =
        (state.config.max_files_bytes + MAX_MANIFEST_BYTES as u64 + (1 << 20)) as usize;
    let mut by_path: Vec<(&'static str, Handler)> = Vec::new();
    for (endpoint, handler) in routes(submit_limit) {
        let access = endpoint.access;
        let auth_state = state.clone();
        let handler = handler.route_layer(axum::middleware::from_fn(move |request, next| {
            crate::auth::authorize(auth_state.clone(), access, request, next)
        }));
        match by_path.iter_mut().find(|(path, _)| *path == endpoint.path) {
            Some((_, existing)) => *existing = std::mem::take(existing).merge(handler),
            None => by_path.push((endpoint.path, handler)),
        }
    }
    by_path
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| {
            router.route(path, handler)
        })
        .route_layer(axum::middleware::from_fn(check_path_names))
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .layer(axum::middleware::from_fn(run_to_completion))
        .layer(axum::middleware::from_fn(move |request, next| {
            refusals_as_json(request, next, submit_limit)
        }))
        .with_state(state)
}

/// What each path parameter of the routes above names, as a refusal says it.
const PATH_NAMES: [(&str, &str); 4] = [
    ("build", "build number"),
    ("job", "job id"),
    ("name", "image name"),
    ("client", "client id"),
];

/// Refuses, for every route, a `{build}`, `{job}`, `{name}` or `{client}` path parameter that is
/// not a valid name (`400 bad_name`, naming the parameter), before any handler looks
/// it up. A parameter that does not decode is left to the handler's own refusal.
async fn check_path_names(
    params: Result<RawPathParams, RawPathParamsRejection>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if let Ok(params) = params {
        for (key, value) in &params {
            let Some((_, what)) = PATH_NAMES.iter().find(|(param, _)| *param == key) else {
                continue;
            };
            if let Err(message) = check_name(what, value) {
                return ApiErr::bad_request("bad_name", message).into_response();
            }
        }
    }
    next.run(request).await
}

/// The body limit of the call at `path`, as the routes above set it.
fn body_limit(path: &str, submit_limit: usize) -> usize {
    if path == "/v1/builds" {
        submit_limit
    } else if path.ends_with("/commit") || path.ends_with("/chunks/missing") {
        MAX_COMMIT_BYTES
    } else {
        MAX_JSON_BYTES
    }
}

/// Axum's own refusals (a body over its limit, JSON that does not parse or does not
/// fit its type, a path it cannot decode) are plain text; this gives them the API's
/// `{code, error}` body, so that every refusal reads the same, and says which limit a
/// body went over.
async fn refusals_as_json(
    request: Request,
    next: axum::middleware::Next,
    submit_limit: usize,
) -> Response {
    let limit = body_limit(request.uri().path(), submit_limit);
    let response = next.run(request).await;
    let status = response.status();
    let plain_text = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/plain"));
    if !status.is_client_error() || !plain_text {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), MAX_REFUSAL_TEXT)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let (code, error) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "too_large",
            format!("the request body is larger than the {limit} bytes this call accepts ({text})"),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("bad_content_type", text),
        _ => ("bad_request", text),
    };
    let body = kiln_proto::api::ApiError {
        code: code.to_owned(),
        error,
        missing: None,
    };
    (status, Json(body)).into_response()
}

/// Liveness, with how many clients are connected and how many wait for a job.
/// Runs a request's handler in its own task, so that a client hanging up (a timeout,
/// a crash, a cut network) cannot cancel it half-way through a store transaction: a
/// transaction dropped at an await point would leave its connection holding SQLite's
/// write lock. Long polls stay cancellable: they hold no transaction while they wait,
/// and a claim whose waiter is gone is released by the dispatcher.
async fn run_to_completion(request: Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path();
    let is_get = request.method() == axum::http::Method::GET;
    let long_poll = path == "/v1/claim"
        || path == "/v1/session"
        || (is_get && (path.ends_with("/log") || path.ends_with("/events")));
    if long_poll {
        return next.run(request).await;
    }
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(err) => ApiErr::Internal(format!("request handler failed: {err}")).into_response(),
    }
}

async fn health(State(state): Shared) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "clients_connected": state.sessions.n_connected(),
        "clients_waiting": state.dispatcher.n_waiting(),
    }))
}

/// The IP address a request came from, when the server is served with connection
/// info (as [`crate::Server::run`] does).
pub(crate) struct Peer(Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<std::net::SocketAddr>>()
                // An IPv4 client of a server listening on IPv6 shows as IPv4.
                .map(|ConnectInfo(peer)| peer.ip().to_canonical().to_string()),
        ))
    }
}

pub(crate) fn lease_of(headers: &HeaderMap) -> Result<&str, ApiErr> {
    headers
        .get(LEASE_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
        .ok_or_else(|| {
            ApiErr::bad_request(
                "no_lease",
                format!("this call needs the job's lease token in the {LEASE_HEADER} header"),
            )
        })
}

/// Fills in `eta_seconds` from percent done and past runs of the same config type.
async fn with_eta(state: &AppState, mut jobs: Vec<JobStatus>) -> Result<Vec<JobStatus>, ApiErr> {
    let now = kiln_common::now_micros();
    let mut means: HashMap<String, Option<f64>> = HashMap::new();
    for job in jobs.iter_mut() {
        if job.state != kiln_proto::state::JobState::Running {
            continue;
        }
        let Some(start) = job.time_start else {
            continue;
        };
        let elapsed = ((now - start) as f64 / 1e6).max(0.0);
        if !means.contains_key(&job.config_type) {
            let mean = state.store.mean_run_secs(&job.config_type).await?;
            means.insert(job.config_type.clone(), mean);
        }
        let from_history = means[&job.config_type].map(|mean| (mean - elapsed).max(0.0));
        let from_percent = job
            .percent
            .filter(|p| *p > 0)
            .map(|p| elapsed * f64::from(100 - p.min(100)) / f64::from(p));
        let eta = match (from_percent, from_history) {
            (Some(by_percent), Some(by_history)) => {
                // Trust the job's own percent more as it grows.
                let weight = f64::from(job.percent.unwrap_or(0)) / 100.0;
                Some(weight * by_percent + (1.0 - weight) * by_history)
            }
            (Some(eta), None) | (None, Some(eta)) => Some(eta),
            (None, None) => None,
        };
        job.eta_seconds = eta.map(|secs| secs.round() as u64);
    }
    Ok(jobs)
}

async fn list_builds(
    State(state): Shared,
    _caller: Caller,
) -> Result<Json<Vec<BuildSummary>>, ApiErr> {
    Ok(Json(state.store.list_builds().await?))
}

async fn build_summary(
    State(state): Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Result<Json<BuildSummary>, ApiErr> {
    Ok(Json(state.store.build_summary(&build).await?))
}

async fn list_jobs(
    State(state): Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Result<Json<Vec<JobStatus>>, ApiErr> {
    let jobs = state.store.list_jobs(&build).await?;
    Ok(Json(with_eta(&state, jobs).await?))
}

async fn job_status(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Result<Json<JobStatus>, ApiErr> {
    let status = state.store.get_job(&build, &job).await?;
    let mut with = with_eta(&state, vec![status]).await?;
    Ok(Json(with.remove(0)))
}

fn xml_response(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn job_status_xml(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Result<Response, ApiErr> {
    let status = state.store.get_job(&build, &job).await?;
    let status = with_eta(&state, vec![status]).await?.remove(0);
    let xml = render_job_status(&JobStatusXml {
        client_id: status.client_id.as_deref(),
        time_start: status.time_start,
        time_complete: status.time_complete,
        // A job that ended says so in MAJORSTATE, as the seed's stagerel.cmd expects
        // (FINISHED); a running one shows its step's own major state, if it gave one.
        major_state: if status.state.is_final() {
            Some(seed_major_state(&status))
        } else {
            status
                .major_state
                .as_deref()
                .or(Some(seed_major_state(&status)))
        },
        minor_state: status.minor_state.as_deref(),
        percent: status.percent,
        eta_seconds: status.eta_seconds,
    });
    Ok(xml_response(xml))
}

/// The seed's MAJORSTATE for a job's state: `INPROGRESS` or `FINISHED` ([0057]), or
/// the state's own name in capitals.
fn seed_major_state(status: &JobStatus) -> &'static str {
    use kiln_proto::state::JobState;
    match status.state {
        JobState::Running => "INPROGRESS",
        JobState::Finished => "FINISHED",
        JobState::Queued => "QUEUED",
        JobState::Failed => "FAILED",
        JobState::Expired => "EXPIRED",
        JobState::Cancelled => "CANCELLED",
    }
}

async fn relbuild_xml(
    State(state): Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Result<Response, ApiErr> {
    let record = state.store.get_build(&build).await?;
    Ok(xml_response(record.manifest.to_relbuild_xml()))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: i64,
    /// Seconds to wait for a new event when there is none after `after`.
    #[serde(default)]
    wait: u64,
}

async fn events(
    State(state): Shared,
    _caller: Caller,
    Path(build): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<Json<Vec<Event>>, ApiErr> {
    state.store.build_summary(&build).await?;
    let events = long_poll(&state, query.wait, || async {
        let events = state.store.events(&build, query.after).await?;
        let ready = !events.is_empty();
        Ok((events, ready))
    })
    .await?;
    Ok(Json(events))
}

async fn list_images(
    State(state): Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Result<Json<Vec<ImageInfo>>, ApiErr> {
    state.store.build_summary(&build).await?;
    Ok(Json(state.store.list_images(&build).await?))
}

#[derive(Deserialize)]
struct FilesQuery {
    job: Option<String>,
}

/// The build's files archive: for the admin, or for a client holding one of its jobs.
async fn build_files(
    State(state): Shared,
    caller: Caller,
    Path(build): Path<String>,
    Query(query): Query<FilesQuery>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiErr> {
    if let Caller::Client(_) = caller {
        let job = query.job.as_deref().ok_or_else(|| {
            ApiErr::bad_request(
                "no_job",
                "a client fetches a build's files for a job it holds: add ?job=ID",
            )
        })?;
        state
            .store
            .check_lease(&build, job, lease_of(&headers)?)
            .await?;
    }
    let record = state.store.get_build(&build).await?;
    serve_blob(
        &state,
        &record.files_key,
        request,
        &format!("{build}-files.tar"),
    )
    .await
}

/// Streams a stored blob with Range support, an ETag and a download name.
async fn serve_blob(
    state: &AppState,
    key: &str,
    request: Request,
    download_name: &str,
) -> Result<Response, ApiErr> {
    let path = state.blobs.local_path(key)?;
    if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Err(kiln_blob::BlobError::NotFound(key.to_owned()).into());
    }
    let mut response =
        tower_http::services::ServeFile::new_with_mime(&path, &mime::APPLICATION_OCTET_STREAM)
            .oneshot(request)
            .await
            .map_err(|err| ApiErr::Internal(err.to_string()))?
            .map(Body::new);
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{key}\"")) {
        headers.insert(header::ETAG, etag);
    }
    if let Ok(disposition) =
        HeaderValue::from_str(&format!("attachment; filename=\"{download_name}\""))
    {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    Ok(response)
}

async fn submit(
    State(state): Shared,
    _caller: Caller,
    mut multipart: Multipart,
) -> Result<(StatusCode, Json<Submitted>), ApiErr> {
    let mut manifest: Option<BuildManifest> = None;
    let mut staged_files = None;
    while let Some(mut field) = multipart.next_field().await.map_err(|err| {
        ApiErr::bad_request("bad_upload", format!("reading the submission: {err}"))
    })? {
        match field.name().unwrap_or_default() {
            "manifest" => {
                let file_name = field.file_name().unwrap_or("relbuild.xml").to_owned();
                let bytes = field.bytes().await.map_err(|err| {
                    ApiErr::bad_request("bad_upload", format!("reading the manifest: {err}"))
                })?;
                if bytes.len() > MAX_MANIFEST_BYTES {
                    return Err(ApiErr::TooLarge(format!(
                        "the manifest is larger than {MAX_MANIFEST_BYTES} bytes"
                    )));
                }
                let text = std::str::from_utf8(&bytes).map_err(|_| {
                    ApiErr::bad_request(
                        "bad_manifest",
                        format!("{file_name}: the manifest is not UTF-8 text"),
                    )
                })?;
                let parsed = BuildManifest::parse(&file_name, text)
                    .map_err(|err| ApiErr::bad_request("bad_manifest", err.to_string()))?;
                let max_jobs = state.config.max_jobs_per_build;
                if parsed.jobs.len() > max_jobs {
                    return Err(ApiErr::TooLarge(format!(
                        "{file_name}: build {} has {} jobs; this server accepts at most \
                         {max_jobs} jobs per build (--max-jobs-per-build)",
                        parsed.number,
                        parsed.jobs.len()
                    )));
                }
                // Refuse a known build number before reading a large archive.
                match state.store.build_summary(&parsed.number).await {
                    Ok(_) => return Err(StoreError::DuplicateBuild(parsed.number).into()),
                    Err(StoreError::NotFound(_)) => {}
                    Err(err) => return Err(err.into()),
                }
                manifest = Some(parsed);
            }
            "files" => {
                let staged = state.blobs.stage().await?;
                let mut file = tokio::fs::File::create(staged.path())
                    .await
                    .map_err(|err| kiln_blob::BlobError::io("staging the build's files", err))?;
                let mut hasher = ImageHasher::new();
                while let Some(chunk) = field.chunk().await.map_err(|err| {
                    ApiErr::bad_request("bad_upload", format!("reading the build's files: {err}"))
                })? {
                    hasher.update(&chunk);
                    file.write_all(&chunk).await.map_err(|err| {
                        kiln_blob::BlobError::io("staging the build's files", err)
                    })?;
                }
                file.flush()
                    .await
                    .map_err(|err| kiln_blob::BlobError::io("staging the build's files", err))?;
                staged_files = Some((staged, hasher.finish()));
            }
            other => {
                return Err(ApiErr::bad_request(
                    "bad_upload",
                    format!(
                        "unexpected part {other:?} in the submission (expected manifest and files)"
                    ),
                ));
            }
        }
    }
    let manifest = manifest
        .ok_or_else(|| ApiErr::bad_request("bad_upload", "the submission has no manifest part"))?;
    let (staged, digests) = staged_files
        .ok_or_else(|| ApiErr::bad_request("bad_upload", "the submission has no files part"))?;
    let archive_path = staged.path().to_owned();
    let checked_manifest = manifest.clone();
    tokio::task::spawn_blocking(move || files::check_archive(&archive_path, &checked_manifest))
        .await
        .map_err(|err| ApiErr::Internal(err.to_string()))?
        .map_err(|msg| ApiErr::bad_request("bad_files", msg))?;
    state.blobs.commit(staged, &digests.blake3).await?;
    let n_jobs = manifest.jobs.len() as u32;
    let number = manifest.number.clone();
    state
        .store
        .insert_build(&NewBuild {
            manifest,
            files_key: digests.blake3,
            files_size: digests.size,
            submitted_at: kiln_common::now_micros(),
            default_accept_within_secs: state.config.default_accept_within_secs,
            default_max_attempts: state.config.default_max_attempts,
        })
        .await?;
    tracing::info!(build = %number, n_jobs, "build submitted");
    state.changed();
    state.dispatcher.wake();
    Ok((StatusCode::CREATED, Json(Submitted { number, n_jobs })))
}

/// `POST /v1/offer`: the job a claim would get now (or, with `wait_secs`, as soon as
/// one is queued), without claiming it.
async fn offer(
    State(state): Shared,
    caller: Caller,
    Peer(address): Peer,
    Json(request): Json<ClaimRequest>,
) -> Result<Response, ApiErr> {
    check_claim_request(&caller, &request)?;
    announce(&state, &request, address);
    let found = if request.wait_secs == 0 {
        state
            .dispatcher
            .offer_now(&request.client_id, &request.include)
            .await?
    } else {
        let wait = Duration::from_secs(request.wait_secs.min(MAX_WAIT_SECS));
        let mut stopping = state.stopping.subscribe();
        if *stopping.borrow_and_update() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        tokio::select! {
            found = state.dispatcher.wait_for_offer(&request.client_id, &request.include, wait) => found,
            _ = stopping.changed() => None,
        }
    };
    Ok(match found {
        Some(candidate) => Json(Offer {
            build: candidate.build,
            job_id: candidate.job,
            priority: candidate.priority,
            submitted_at: candidate.submitted_at,
        })
        .into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

fn check_claim_request(caller: &Caller, request: &ClaimRequest) -> Result<(), ApiErr> {
    check_name("client id", &request.client_id)
        .map_err(|msg| ApiErr::bad_request("bad_name", msg))?;
    caller.require_client_named(&request.client_id)?;
    if request.include.is_empty() {
        return Err(ApiErr::bad_request(
            "no_include",
            "a claim names at least one config type it includes (or *)",
        ));
    }
    Ok(())
}

/// Notes the client a claim or offer request describes (its types, slots, version and
/// address) as in contact now; returns it as a claim records it.
fn announce(
    state: &Arc<AppState>,
    request: &ClaimRequest,
    address: Option<String>,
) -> ClaimingClient {
    let version = request
        .version
        .as_ref()
        .map(|version| version.chars().take(MAX_VERSION_CHARS).collect::<String>());
    state.contacts.announced(
        &request.client_id,
        Announced {
            include: request.include.clone(),
            slots: request.slots,
            version: version.clone(),
        },
        kiln_common::now_micros(),
    );
    state.note_contact(&request.client_id, address.as_deref());
    ClaimingClient {
        id: request.client_id.clone(),
        include: request.include.clone(),
        slots: request.slots,
        version,
        address,
    }
}

async fn claim(
    State(state): Shared,
    caller: Caller,
    Peer(address): Peer,
    Json(request): Json<ClaimRequest>,
) -> Result<Response, ApiErr> {
    check_claim_request(&caller, &request)?;
    let wait = Duration::from_secs(request.wait_secs.min(MAX_WAIT_SECS));
    let mut stopping = state.stopping.subscribe();
    if *stopping.borrow_and_update() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let client = announce(&state, &request, address);
    let waited = tokio::select! {
        claimed = state.dispatcher.wait_for_job(client, wait) => claimed,
        _ = stopping.changed() => None,
    };
    let Some(claimed) = waited else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    // The credential may have been revoked while the claim waited: the job goes back.
    if !credential_is_live(&state, &request.client_id).await? {
        state
            .store
            .release(
                &claimed.build,
                &claimed.job,
                &claimed.lease,
                kiln_common::now_micros(),
            )
            .await?;
        state.dispatcher.wake();
        return Err(ApiErr::Unauthorized(format!(
            "client {:?}'s credential was revoked",
            request.client_id
        )));
    }
    // The claim recorded the client and this contact.
    state
        .contacts
        .stored(&request.client_id, kiln_common::now_micros());
    tracing::info!(build = %claimed.build, job = %claimed.job, client = %request.client_id, attempt = claimed.attempt, "job claimed");
    state.changed();
    Ok(Json(Claim {
        build: claimed.build,
        job_id: claimed.job,
        title: claimed.title,
        config_type: claimed.config_type,
        install_script: claimed.install_script,
        configure_script: claimed.configure_script,
        image_script: claimed.image_script,
        timeout_secs: claimed.timeout_secs,
        attempt: claimed.attempt,
        lease: claimed.lease,
        lease_secs: state.config.lease_secs,
        heartbeat_secs: state.config.heartbeat_secs,
    })
    .into_response())
}

async fn heartbeat(
    State(state): Shared,
    _caller: Caller,
    Peer(address): Peer,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(beat): Json<Heartbeat>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let lease_until = kiln_common::now_micros() + state.config.lease_secs as i64 * 1_000_000;
    let holder = state
        .store
        .heartbeat(
            &build,
            &job,
            lease_of(&headers)?,
            lease_until,
            beat.progress.as_ref(),
        )
        .await?;
    state.note_contact(&holder.client_id, address.as_deref());
    if beat.steps_done {
        state
            .store
            .mark_steps_done(&build, &job, lease_of(&headers)?)
            .await?;
    }
    if beat.progress.is_some() {
        state.changed();
    }
    Ok(Json(
        serde_json::json!({ "lease_secs": state.config.lease_secs }),
    ))
}

async fn append_log(
    State(state): Shared,
    _caller: Caller,
    Peer(address): Peer,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(batch): Json<LogBatch>,
) -> Result<Json<LogAppended>, ApiErr> {
    if batch.lines.len() > MAX_LOG_BATCH {
        return Err(ApiErr::TooLarge(format!(
            "a log batch carries at most {MAX_LOG_BATCH} lines"
        )));
    }
    let max_bytes = state.config.max_log_bytes_per_job;
    let appended = state
        .store
        .append_log_within(
            &build,
            &job,
            lease_of(&headers)?,
            &batch.lines,
            batch.progress.as_ref(),
            kiln_common::now_micros(),
            max_bytes,
            &log_cut_notice(max_bytes),
        )
        .await?;
    state.note_contact(&appended.holder.client_id, address.as_deref());
    if appended.cut_now {
        tracing::info!(build = %build, job = %job, max_bytes, "job log cut at its limit; later lines are dropped");
    }
    state.changed();
    Ok(Json(LogAppended {
        truncated: appended.cut,
    }))
}

/// The last line of a log cut at `max_bytes`.
fn log_cut_notice(max_bytes: u64) -> String {
    format!(
        "kiln: this job's log was cut at {max_bytes} bytes (the server's \
         --max-log-bytes-per-job); later output was dropped, the job runs on"
    )
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    after: i64,
    #[serde(default)]
    wait: u64,
}

async fn read_log(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    Query(query): Query<LogQuery>,
) -> Result<Json<LogChunk>, ApiErr> {
    let chunk = long_poll(&state, query.wait, || async {
        // The state first: if it is final, every line was written before it was read.
        let done = state.store.get_job(&build, &job).await?.state.is_final();
        let lines = state
            .store
            .read_log(&build, &job, query.after, LOG_PAGE)
            .await?;
        let full_page = lines.len() == LOG_PAGE as usize;
        let ready = !lines.is_empty() || done;
        let next = lines.last().map_or(query.after, |line| line.seq);
        let done = done && !full_page;
        Ok((LogChunk { lines, next, done }, ready))
    })
    .await?;
    Ok(Json(chunk))
}

/// Answers a long poll: calls `fetch` (which says whether its answer is worth
/// returning) again each time something changes, until it is, `wait_secs` pass, or the
/// server stops; then returns the last answer.
async fn long_poll<T, F, Fut>(state: &AppState, wait_secs: u64, mut fetch: F) -> Result<T, ApiErr>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(T, bool), ApiErr>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs.min(MAX_WAIT_SECS));
    let mut changes = state.changes.subscribe();
    let mut stopping = state.stopping.subscribe();
    loop {
        let (answer, ready) = fetch().await?;
        if ready || *stopping.borrow_and_update() || tokio::time::Instant::now() >= deadline {
            return Ok(answer);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = changes.changed() => {}
            _ = stopping.changed() => {}
        }
    }
}

async fn put_image(
    State(state): Shared,
    _caller: Caller,
    Path((build, job, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<ImageInfo>), ApiErr> {
    // Refuse a stale lease, or one upload too many, before reading a large body.
    let (lease, holder) = transfer::check_holder_of(&state, &build, &job, &headers).await?;
    let _slot = state
        .uploads
        .try_take(&holder.client_id, state.config.max_uploads_per_client)?;
    let expected = headers
        .get(BLAKE3_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| kiln_blob::is_valid_key(value))
        .ok_or_else(|| ApiErr::bad_request("no_hash", format!("an image upload carries its BLAKE3 hash (64 lowercase hex) in the {BLAKE3_HEADER} header")))?
        .to_owned();
    let staged = state.blobs.stage().await?;
    let mut file = tokio::fs::File::create(staged.path())
        .await
        .map_err(|err| kiln_blob::BlobError::io(format!("staging image {name}"), err))?;
    let mut hasher = ImageHasher::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| {
            ApiErr::bad_request(
                "upload_interrupted",
                format!("image {name}: the upload broke off: {err}"),
            )
        })?;
        size += chunk.len() as u64;
        if size > state.config.max_image_bytes {
            return Err(ApiErr::TooLarge(format!(
                "image {name} is larger than the {} bytes this server accepts",
                state.config.max_image_bytes
            )));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|err| kiln_blob::BlobError::io(format!("storing image {name}"), err))?;
    }
    file.flush()
        .await
        .map_err(|err| kiln_blob::BlobError::io(format!("storing image {name}"), err))?;
    drop(file);
    let digests = hasher.finish();
    if digests.blake3 != expected {
        return Err(ApiErr::bad_request(
            "hash_mismatch",
            format!("image {name}: the bytes received hash to {} but the client said {expected}; nothing was stored", digests.blake3),
        ));
    }
    let info =
        transfer::store_whole_image(&state, &build, &job, &lease, &name, staged.path()).await?;
    drop(staged);
    tracing::info!(build = %build, job = %job, image = %name, size = info.size, "image stored");
    Ok((StatusCode::CREATED, Json(info)))
}

async fn finish(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(report): Json<Finish>,
) -> Result<Json<Event>, ApiErr> {
    let event = state
        .store
        .finish(
            &build,
            &job,
            lease_of(&headers)?,
            &report.images,
            kiln_common::now_micros(),
        )
        .await?;
    tracing::info!(build = %build, job = %job, n_images = report.images.len(), "job finished");
    state.changed();
    Ok(Json(event))
}

async fn fail(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(report): Json<Fail>,
) -> Result<Json<Event>, ApiErr> {
    let failure = Failure {
        reason: report.reason,
        message: report.message,
    };
    let event = state
        .store
        .fail(
            &build,
            &job,
            lease_of(&headers)?,
            &failure,
            kiln_common::now_micros(),
        )
        .await?;
    tracing::info!(build = %build, job = %job, reason = %failure.reason, to = %event.to, "job failed");
    state.changed();
    state.dispatcher.wake();
    Ok(Json(event))
}

async fn release(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiErr> {
    state
        .store
        .release(&build, &job, lease_of(&headers)?, kiln_common::now_micros())
        .await?;
    state.changed();
    state.dispatcher.wake();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct SessionQuery {
    client_id: String,
}

/// A client's session: held open for as long as the client lives (see
/// [`crate::sessions`]). Its body is a trickle of keep-alive bytes that never ends
/// while the client runs.
async fn session(
    State(state): Shared,
    caller: Caller,
    Peer(address): Peer,
    Query(query): Query<SessionQuery>,
    body: Body,
) -> Result<StatusCode, ApiErr> {
    let client_id = query.client_id;
    check_name("client id", &client_id).map_err(|msg| ApiErr::bad_request("bad_name", msg))?;
    caller.require_client_named(&client_id)?;
    let generation = state.sessions.open(&client_id);
    tracing::debug!(client = %client_id, generation, "session opened");
    state.note_contact(&client_id, address.as_deref());
    let mut stream = body.into_data_stream();
    let mut stopping = state.stopping.subscribe();
    let ended_by_client = loop {
        tokio::select! {
            chunk = stream.next() => match chunk {
                // Each keep-alive is a contact.
                Some(Ok(_)) => {
                    state.note_contact(&client_id, address.as_deref());
                    continue;
                }
                Some(Err(_)) | None => break true,
            },
            // The server stopping is not the client leaving.
            _ = stopping.changed() => break false,
        }
    };
    state.sessions.close(&client_id);
    if ended_by_client {
        let state = state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(state.config.session_grace_ms)).await;
            if !state.sessions.gone_since(&client_id, generation) || *state.stopping.borrow() {
                return;
            }
            match state
                .store
                .take_back_from_client(
                    &client_id,
                    "client connection lost",
                    kiln_common::now_micros(),
                )
                .await
            {
                Ok(taken) if taken.is_empty() => {}
                Ok(taken) => {
                    for transition in &taken {
                        tracing::info!(build = %transition.build, job = %transition.job, client = %client_id, to = %transition.event.to, "client gone; job taken back");
                    }
                    state.changed();
                    state.dispatcher.wake();
                }
                Err(err) => {
                    tracing::error!(cause = %kiln_proto::error_chain(&err), client = %client_id, "cannot take back a lost client's jobs")
                }
            }
        });
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/clients`: every client the store has (those that claimed a job here) and
/// every client heard from since the server started, by id, with the latest contact
/// from memory and whether a session is open.
async fn list_clients(
    State(state): Shared,
    _caller: Caller,
) -> Result<Json<Vec<ClientInfo>>, ApiErr> {
    let mut clients = state.store.clients().await?;
    let mut contacts = state.contacts.snapshot();
    for client in clients.iter_mut() {
        let Some(contact) = contacts.remove(&client.id) else {
            continue;
        };
        if contact.at > client.last_contact {
            client.last_contact = contact.at;
            if contact.address.is_some() {
                client.address = contact.address;
            }
        }
        // A claim request that got no job yet may say more than the last claim did.
        if let Some(announced) = contact.announced {
            client.include = announced.include;
            client.slots = announced.slots;
            client.version = announced.version;
        }
    }
    clients.extend(contacts.into_iter().map(|(id, contact)| {
        let announced = contact.announced;
        ClientInfo {
            include: announced
                .as_ref()
                .map(|announced| announced.include.clone())
                .unwrap_or_default(),
            slots: announced.as_ref().and_then(|announced| announced.slots),
            version: announced.and_then(|announced| announced.version),
            address: contact.address,
            first_seen: contact.first_at,
            last_contact: contact.at,
            session_open: false,
            held: Vec::new(),
            n_claimed: 0,
            n_finished: 0,
            n_failed: 0,
            n_lost: 0,
            image_bytes: 0,
            id,
        }
    }));
    for client in clients.iter_mut() {
        client.session_open = state.sessions.is_open(&client.id);
    }
    clients.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(clients))
}

#[derive(Deserialize)]
struct GiveUp {
    reason: String,
}

/// The holder gives a started job back: queued again at once, the run counted.
async fn give_up(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(report): Json<GiveUp>,
) -> Result<Json<Event>, ApiErr> {
    let reason: String = report.reason.chars().take(500).collect();
    let event = state
        .store
        .give_up(
            &build,
            &job,
            lease_of(&headers)?,
            &reason,
            kiln_common::now_micros(),
        )
        .await?;
    tracing::info!(build = %build, job = %job, reason = %reason, to = %event.to, "job given up by its client");
    state.changed();
    state.dispatcher.wake();
    Ok(Json(event))
}

async fn restart(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Result<Json<Event>, ApiErr> {
    let event = state
        .store
        .restart(&build, &job, kiln_common::now_micros())
        .await?;
    tracing::info!(build = %build, job = %job, "job restarted");
    state.changed();
    state.dispatcher.wake();
    Ok(Json(event))
}

async fn cancel(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
) -> Result<Json<Event>, ApiErr> {
    let event = state
        .store
        .cancel(&build, &job, kiln_common::now_micros())
        .await?;
    tracing::info!(build = %build, job = %job, "job cancelled");
    state.changed();
    Ok(Json(event))
}

/// Whether client `id` has a credential that is not revoked.
async fn credential_is_live(state: &AppState, id: &str) -> Result<bool, ApiErr> {
    if state.credentials.recently_live(id) {
        return Ok(true);
    }
    Ok(state
        .store
        .client_credential(id)
        .await?
        .is_some_and(|row| row.revoked_at.is_none()))
}

/// `GET /v1/whoami`: what the presented credential is.
async fn whoami(caller: Caller) -> Json<serde_json::Value> {
    Json(match caller {
        Caller::Admin => serde_json::json!({ "role": "admin" }),
        Caller::Client(id) => serde_json::json!({ "role": "client", "client_id": id }),
        Caller::Join => serde_json::json!({ "role": "join" }),
        Caller::Anonymous => serde_json::json!({ "role": "anonymous" }),
    })
}

#[derive(Deserialize)]
struct EnrollRequest {
    client_id: String,
}

/// `POST /v1/enroll`: with the join token, a client id that has no credential yet
/// gets one; the secret is in this answer and nowhere else.
async fn enroll(
    State(state): Shared,
    Json(request): Json<EnrollRequest>,
) -> Result<(StatusCode, Json<kiln_proto::api::ClientSecret>), ApiErr> {
    let id = request.client_id;
    check_name("client id", &id).map_err(|msg| ApiErr::bad_request("bad_name", msg))?;
    let secret = kiln_common::secret::new_secret();
    let hash = hash_off_thread(&state, &secret).await?;
    let put = state
        .store
        .put_client_credential(
            &id,
            &hash,
            kiln_store::CredentialWrite::Enroll,
            kiln_common::now_micros(),
        )
        .await?;
    match put {
        kiln_store::CredentialPut::Exists => Err(ApiErr::Conflict {
            code: "client_exists",
            message: format!(
                "client {id:?} is enrolled already: it calls with the secret it was given \
                 (an operator can issue a new one: kiln server client add {id})"
            ),
        }),
        kiln_store::CredentialPut::Revoked => Err(ApiErr::Forbidden(format!(
            "client {id:?}'s credential was revoked: only an operator can give it a new \
             one (kiln server client add {id})"
        ))),
        kiln_store::CredentialPut::Created | kiln_store::CredentialPut::Replaced => {
            state.credentials.remember(&id, &hash, &secret);
            tracing::info!(client = %id, "client enrolled");
            Ok((
                StatusCode::CREATED,
                Json(kiln_proto::api::ClientSecret {
                    client_id: id,
                    secret,
                }),
            ))
        }
    }
}

/// Hashes a new secret on a blocking thread, as one of the few argon2 runs allowed at
/// once (each takes 19 MiB: a crowd of enrolling clients must not take them all).
async fn hash_off_thread(state: &AppState, secret: &str) -> Result<String, ApiErr> {
    let _permit = state.credentials.hashing_permit().await?;
    let secret = secret.to_owned();
    tokio::task::spawn_blocking(move || crate::auth::hash_secret(&secret))
        .await
        .map_err(|err| ApiErr::Internal(format!("hashing a secret failed: {err}")))?
        .map_err(|err| ApiErr::Internal(err.to_string()))
}

/// `GET /v1/credentials`: every client credential (never a secret or its hash).
async fn list_credentials(
    State(state): Shared,
) -> Result<Json<Vec<kiln_proto::api::CredentialInfo>>, ApiErr> {
    let rows = state.store.client_credentials().await?;
    Ok(Json(
        rows.into_iter()
            .map(|row| kiln_proto::api::CredentialInfo {
                client_id: row.client_id,
                origin: row.origin,
                created_at: row.created_at,
                revoked_at: row.revoked_at,
            })
            .collect(),
    ))
}

/// `POST /v1/credentials/ID`: a new secret for client ID (its old one, revoked or
/// not, stops working).
async fn issue_credential(
    State(state): Shared,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<kiln_proto::api::ClientSecret>), ApiErr> {
    let secret = kiln_common::secret::new_secret();
    let hash = hash_off_thread(&state, &secret).await?;
    state
        .store
        .put_client_credential(
            &id,
            &hash,
            kiln_store::CredentialWrite::Issue,
            kiln_common::now_micros(),
        )
        .await?;
    state.credentials.remember(&id, &hash, &secret);
    tracing::info!(client = %id, "client credential issued");
    Ok((
        StatusCode::CREATED,
        Json(kiln_proto::api::ClientSecret {
            client_id: id,
            secret,
        }),
    ))
}

/// `DELETE /v1/credentials/ID`: client ID's secret stops working; the id cannot enroll
/// again until an operator issues it a new one.
async fn revoke_credential(
    State(state): Shared,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiErr> {
    let revoked = state
        .store
        .revoke_client_credential(&id, kiln_common::now_micros())
        .await?;
    state.credentials.forget(&id);
    if !revoked {
        return Err(ApiErr::Store(kiln_store::StoreError::NotFound(format!(
            "a live credential of client {id:?}"
        ))));
    }
    tracing::info!(client = %id, "client credential revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct JoinTokenRequest {
    /// `rotate` (a new token, returned once) or `disable`.
    action: String,
}

/// `POST /v1/join-token`: rotates or disables the join token.
async fn join_token(
    State(state): Shared,
    Json(request): Json<JoinTokenRequest>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let token = match request.action.as_str() {
        "rotate" => Some(kiln_common::secret::new_secret()),
        "disable" => None,
        other => {
            return Err(ApiErr::bad_request(
                "bad_action",
                format!("join-token action {other:?} is neither \"rotate\" nor \"disable\""),
            ))
        }
    };
    state
        .credentials
        .set_join_token(token.as_deref())
        .map_err(|err| ApiErr::Internal(format!("{err:#}")))?;
    tracing::info!(action = %request.action, "join token changed");
    Ok(Json(serde_json::json!({ "join_token": token })))
}
