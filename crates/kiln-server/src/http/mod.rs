//! The HTTP API under `/v1`: the route table, the router built from it, and thin
//! handlers, grouped by resource, that call the farm.
//!
//! Every route is one row of [`routes`]: method, path, who may call it ([`Access`],
//! enforced by [`auth::authorize`] before the handler), the largest body it takes,
//! whether it is a long poll, and its handler. The router is built from that table
//! alone, and so is everything that depends on a route: body limits, the words of a
//! refusal for a body over its limit, which calls run to completion when their client
//! hangs up, and the API's OpenAPI description ([`openapi`]: each row carries its
//! [`Doc`]). [`endpoints`] lists the table for tests and tools.
//!
//! - [`builds`]: submit, list, read and delete builds; their events, images, files.
//! - [`jobs`]: claims and offers, sessions, what a holder reports, restart and cancel.
//! - [`images`]: the chunked transfer and image downloads.
//! - [`clients`]: the inventory, enrollment and credentials.
//! - [`meta`]: health, whoami, storage figures, metrics, the OpenAPI description.
//! - [`streams`]: server-sent event streams of the farm, a build and a job.
//! - [`dashboard`]: the dashboard's page and assets at `/`, its login and logout:
//!   rows marked `described: false`, left out of the API's description.

mod auth;
mod builds;
mod clients;
mod dashboard;
mod error;
pub use error::status_and_code;
mod images;
mod jobs;
mod meta;
pub mod openapi;
mod streams;

use crate::domain::Farm;
use crate::workers::Workers;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, RawPathParams, Request};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::{Json, Router};
use error::HttpError;
use kiln_proto::names::check_name;
pub use openapi::Doc;
use std::sync::Arc;

/// The largest commit body: a chunk list of a 64 GiB image at the smallest chunks.
const MAX_COMMIT_BYTES: usize = 512 << 20;
/// The largest body of a call that names no limit of its own (JSON calls).
const MAX_JSON_BYTES: usize = 2 << 20;
/// The most bytes of a plain-text refusal that are read to re-wrap it.
const MAX_REFUSAL_TEXT: usize = 64 << 10;

/// What the handlers share: the farm, and the workers whose state they report.
pub struct ServerState {
    pub farm: Arc<Farm>,
    pub workers: Arc<Workers>,
}

type Shared = axum::extract::State<Arc<ServerState>>;

/// Who may call an endpoint; [`auth::authorize`] enforces it before the handler runs.
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
    /// An identified client (the call also checks that it names itself).
    Client,
    /// The client holding the job named in the path.
    Holder,
    /// The join token (or the admin): enrolls a client.
    Enroll,
}

/// The largest request body an endpoint reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLimit {
    /// At most this many bytes.
    Max(usize),
    /// A streamed body the handler bounds itself (chunks, images, sessions).
    Streamed,
}

impl BodyLimit {
    /// The number of bytes, when there is one.
    pub fn bytes(self) -> Option<usize> {
        match self {
            BodyLimit::Max(bytes) => Some(bytes),
            BodyLimit::Streamed => None,
        }
    }
}

/// One endpoint as the route table has it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub body_limit: BodyLimit,
    /// The call may wait (claims, offers, sessions, log and event follows): it is
    /// cancelled when its client hangs up, where every other call runs to completion.
    pub long_poll: bool,
    /// Part of the API, in its OpenAPI description. The dashboard's page, assets and
    /// session calls are not (`false`): they serve a browser, not API callers.
    pub described: bool,
}

type Handler = MethodRouter<Arc<ServerState>>;

/// A row of the table: the endpoint, its handler and its description.
struct Route {
    endpoint: Endpoint,
    handler: Handler,
    doc: Doc,
}

/// The largest submission: the files archive the server accepts, the largest
/// manifest, and room for the multipart framing.
fn submit_limit(max_files_bytes: u64) -> usize {
    (max_files_bytes + crate::domain::builds::MAX_MANIFEST_BYTES as u64 + (1 << 20)) as usize
}

/// Every endpoint of the API with its handler: the router is built from this list
/// and nothing else.
fn routes(max_files_bytes: u64) -> Vec<Route> {
    use Access::*;
    const PUBLIC: Access = Read { public: true };
    const PRIVATE: Access = Read { public: false };
    const JSON: BodyLimit = BodyLimit::Max(MAX_JSON_BYTES);
    const COMMIT: BodyLimit = BodyLimit::Max(MAX_COMMIT_BYTES);
    const STREAMED: BodyLimit = BodyLimit::Streamed;
    let submit = BodyLimit::Max(submit_limit(max_files_bytes));
    let row = |method: Method,
               path: &'static str,
               access: Access,
               body_limit: BodyLimit,
               long_poll: bool,
               handler: Handler,
               doc: Doc| Route {
        endpoint: Endpoint {
            method,
            path,
            access,
            body_limit,
            long_poll,
            described: true,
        },
        handler,
        doc,
    };
    // The dashboard's rows: open (the page shows nothing until its calls are let
    // through), short, and left out of the API's description.
    let page = |method: Method, path: &'static str, handler: Handler| Route {
        endpoint: Endpoint {
            method,
            path,
            access: Open,
            body_limit: JSON,
            long_poll: false,
            described: false,
        },
        handler,
        doc: Doc::new("dashboard", "dashboard", "The dashboard"),
    };
    vec![
        page(Method::GET, "/", get(dashboard::index)),
        page(Method::GET, "/ui/{asset}", get(dashboard::asset)),
        page(Method::GET, "/ui/session", get(dashboard::session)),
        page(Method::POST, "/ui/login", post(dashboard::login)),
        page(Method::POST, "/ui/logout", post(dashboard::logout)),
        row(
            Method::GET,
            "/v1/health",
            Open,
            JSON,
            false,
            get(meta::health),
            meta::health_doc(),
        ),
        row(
            Method::GET,
            "/v1/openapi.json",
            Open,
            JSON,
            false,
            get(meta::openapi),
            meta::openapi_doc(),
        ),
        row(
            Method::GET,
            "/v1/whoami",
            AnyCredential,
            JSON,
            false,
            get(meta::whoami),
            meta::whoami_doc(),
        ),
        row(
            Method::GET,
            "/v1/builds",
            Admin,
            JSON,
            false,
            get(builds::list),
            builds::list_doc(),
        ),
        row(
            Method::POST,
            "/v1/builds",
            Admin,
            submit,
            false,
            post(builds::submit),
            builds::submit_doc(),
        ),
        row(
            Method::GET,
            "/v1/builds/{build}",
            PUBLIC,
            JSON,
            false,
            get(builds::summary),
            builds::summary_doc(),
        ),
        row(
            Method::DELETE,
            "/v1/builds/{build}",
            Admin,
            JSON,
            false,
            delete(builds::delete),
            builds::delete_doc(),
        ),
        row(
            Method::GET,
            "/v1/builds/{build}/jobs",
            PUBLIC,
            JSON,
            false,
            get(builds::jobs),
            builds::jobs_doc(),
        ),
        row(
            Method::GET,
            "/v1/builds/{build}/relbuild.xml",
            PRIVATE,
            JSON,
            false,
            get(builds::relbuild_xml),
            builds::relbuild_xml_doc(),
        ),
        row(
            Method::GET,
            "/v1/builds/{build}/events",
            PUBLIC,
            JSON,
            true,
            get(builds::events),
            builds::events_doc(),
        ),
        row(
            Method::GET,
            "/v1/builds/{build}/stream",
            PUBLIC,
            JSON,
            true,
            get(streams::build),
            streams::build_doc(),
        ),
        row(
            Method::GET,
            "/v1/builds/{build}/images",
            PUBLIC,
            JSON,
            false,
            get(builds::images),
            builds::images_doc(),
        ),
        row(
            Method::GET,
            "/v1/builds/{build}/files",
            PRIVATE,
            JSON,
            false,
            get(builds::files),
            builds::files_doc(),
        ),
        row(
            Method::POST,
            "/v1/claim",
            Client,
            JSON,
            true,
            post(jobs::claim),
            jobs::claim_doc(),
        ),
        row(
            Method::POST,
            "/v1/offer",
            Client,
            JSON,
            true,
            post(jobs::offer),
            jobs::offer_doc(),
        ),
        row(
            Method::GET,
            "/v1/clients",
            Admin,
            JSON,
            false,
            get(clients::list),
            clients::list_doc(),
        ),
        row(
            Method::POST,
            "/v1/enroll",
            Enroll,
            JSON,
            false,
            post(clients::enroll),
            clients::enroll_doc(),
        ),
        row(
            Method::GET,
            "/v1/credentials",
            Admin,
            JSON,
            false,
            get(clients::credentials),
            clients::credentials_doc(),
        ),
        row(
            Method::POST,
            "/v1/credentials/{client}",
            Admin,
            JSON,
            false,
            post(clients::issue_credential),
            clients::issue_credential_doc(),
        ),
        row(
            Method::DELETE,
            "/v1/credentials/{client}",
            Admin,
            JSON,
            false,
            delete(clients::revoke_credential),
            clients::revoke_credential_doc(),
        ),
        row(
            Method::POST,
            "/v1/join-token",
            Admin,
            JSON,
            false,
            post(clients::join_token),
            clients::join_token_doc(),
        ),
        row(
            Method::POST,
            "/v1/session",
            Client,
            STREAMED,
            true,
            post(jobs::session),
            jobs::session_doc(),
        ),
        row(
            Method::GET,
            "/v1/jobs/{build}/{job}",
            PUBLIC,
            JSON,
            false,
            get(jobs::status),
            jobs::status_doc(),
        ),
        row(
            Method::GET,
            "/v1/jobs/{build}/{job}/status.xml",
            PUBLIC,
            JSON,
            false,
            get(jobs::status_xml),
            jobs::status_xml_doc(),
        ),
        row(
            Method::GET,
            "/v1/jobs/{build}/{job}/log",
            PRIVATE,
            JSON,
            true,
            get(jobs::read_log),
            jobs::read_log_doc(),
        ),
        row(
            Method::GET,
            "/v1/jobs/{build}/{job}/stream",
            PRIVATE,
            JSON,
            true,
            get(streams::job),
            streams::job_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/log",
            Holder,
            JSON,
            false,
            post(jobs::append_log),
            jobs::append_log_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/heartbeat",
            Holder,
            JSON,
            false,
            post(jobs::heartbeat),
            jobs::heartbeat_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/finish",
            Holder,
            JSON,
            false,
            post(jobs::finish),
            jobs::finish_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/fail",
            Holder,
            JSON,
            false,
            post(jobs::fail),
            jobs::fail_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/release",
            Holder,
            JSON,
            false,
            post(jobs::release),
            jobs::release_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/giveup",
            Holder,
            JSON,
            false,
            post(jobs::give_up),
            jobs::give_up_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/restart",
            Admin,
            JSON,
            false,
            post(jobs::restart),
            jobs::restart_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/cancel",
            Admin,
            JSON,
            false,
            post(jobs::cancel),
            jobs::cancel_doc(),
        ),
        row(
            Method::GET,
            "/v1/jobs/{build}/{job}/images/{name}",
            PUBLIC,
            JSON,
            false,
            get(images::download),
            images::download_doc(),
        ),
        row(
            Method::PUT,
            "/v1/jobs/{build}/{job}/images/{name}",
            Holder,
            STREAMED,
            false,
            put(images::put_whole),
            images::put_whole_doc(),
        ),
        row(
            Method::GET,
            "/v1/jobs/{build}/{job}/images/{name}/index",
            PUBLIC,
            JSON,
            false,
            get(images::index),
            images::index_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/images/{name}/commit",
            Holder,
            COMMIT,
            false,
            post(images::commit),
            images::commit_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/chunks/missing",
            Holder,
            COMMIT,
            false,
            post(images::missing),
            images::missing_doc(),
        ),
        row(
            Method::POST,
            "/v1/jobs/{build}/{job}/chunks",
            Holder,
            STREAMED,
            false,
            post(images::put_chunks),
            images::put_chunks_doc(),
        ),
        row(
            Method::POST,
            "/v1/chunks/fetch",
            PUBLIC,
            JSON,
            false,
            post(images::fetch),
            images::fetch_doc(),
        ),
        row(
            Method::GET,
            "/v1/stream",
            Admin,
            JSON,
            true,
            get(streams::farm),
            streams::farm_doc(),
        ),
        row(
            Method::GET,
            "/v1/storage",
            Admin,
            JSON,
            false,
            get(meta::storage),
            meta::storage_doc(),
        ),
        row(
            Method::GET,
            "/metrics",
            Admin,
            JSON,
            false,
            get(meta::metrics),
            meta::metrics_doc(),
        ),
    ]
}

/// Every endpoint the router serves, as the route table has it.
pub fn endpoints() -> Vec<Endpoint> {
    routes(crate::ServerConfig::new(Default::default()).max_files_bytes)
        .into_iter()
        .map(|route| route.endpoint)
        .collect()
}

/// The API's OpenAPI description, as a server with the default configuration serves
/// it (and `docs/openapi.json` has it).
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi_for(crate::ServerConfig::new(Default::default()).max_files_bytes)
}

/// The OpenAPI description of a server that accepts build files up to
/// `max_files_bytes`.
fn openapi_for(max_files_bytes: u64) -> utoipa::openapi::OpenApi {
    let routes = routes(max_files_bytes);
    let described: Vec<openapi::Described<'_>> = routes
        .iter()
        .filter(|route| route.endpoint.described)
        .map(|route| openapi::Described {
            endpoint: &route.endpoint,
            doc: &route.doc,
        })
        .collect();
    openapi::describe(&described)
}

/// Builds the router over `state` from the route table.
pub fn router(state: Arc<ServerState>) -> Router {
    let mut by_path: Vec<(&'static str, Handler)> = Vec::new();
    for Route {
        endpoint, handler, ..
    } in routes(state.farm.config().max_files_bytes)
    {
        let access = endpoint.access;
        let auth_state = state.clone();
        let limit = endpoint.body_limit;
        let handler = match limit {
            BodyLimit::Max(bytes) => handler.layer(DefaultBodyLimit::max(bytes)),
            BodyLimit::Streamed => handler.layer(DefaultBodyLimit::disable()),
        };
        let mut handler = handler
            .route_layer(axum::middleware::from_fn(move |request, next| {
                auth::authorize(auth_state.clone(), access, request, next)
            }))
            .route_layer(axum::middleware::from_fn(move |request, next| {
                refusals_as_json(request, next, limit)
            }));
        if !endpoint.long_poll {
            handler = handler.route_layer(axum::middleware::from_fn(run_to_completion));
        }
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
        .with_state(state)
}

/// What each path parameter of the routes names, as a refusal says it.
const PATH_NAMES: [(&str, &str); 4] = [
    ("build", "build number"),
    ("job", "job id"),
    ("name", "image name"),
    ("client", "client id"),
];

/// Refuses, for every route, a `{build}`, `{job}`, `{name}` or `{client}` path
/// parameter that is not a valid name (`400 bad_name`, naming the parameter), before
/// any handler looks it up. A parameter that does not decode is left to the handler's
/// own refusal.
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
                return HttpError::from(crate::domain::FarmError::invalid("bad_name", message))
                    .into_response();
            }
        }
    }
    next.run(request).await
}

/// Axum's own refusals (a body over its limit, JSON that does not parse or does not
/// fit its type, a path it cannot decode) are plain text; this gives them the API's
/// `{code, error}` body, so that every refusal reads the same, and says which limit a
/// body went over.
async fn refusals_as_json(
    request: Request,
    next: axum::middleware::Next,
    limit: BodyLimit,
) -> Response {
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
            match limit.bytes() {
                Some(limit) => format!(
                    "the request body is larger than the {limit} bytes this call accepts ({text})"
                ),
                None => format!("the request body is larger than this call accepts ({text})"),
            },
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

/// Runs a request's handler in its own task, so that a client hanging up (a timeout,
/// a crash, a cut network) cannot cancel it half-way through a store transaction: a
/// transaction dropped at an await point would leave its connection holding SQLite's
/// write lock. Long polls (the table says which) stay cancellable: they hold no
/// transaction while they wait, and a claim whose waiter is gone is released by the
/// dispatcher.
async fn run_to_completion(request: Request, next: axum::middleware::Next) -> Response {
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(err) => {
            HttpError::from(crate::domain::FarmError::task("request handler", err)).into_response()
        }
    }
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

/// The lease token a call carries, if any.
fn lease_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(kiln_proto::LEASE_HEADER)
        .and_then(|value| value.to_str().ok())
}

/// The lease token a call about a job must carry, or the refusal saying where it goes.
fn lease_of(headers: &HeaderMap) -> Result<&str, HttpError> {
    Ok(crate::domain::builds::require_lease(lease_header(headers))?)
}

/// An XML answer.
fn xml_response(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
        body,
    )
        .into_response()
}
