//! The server itself: liveness (with its background workers), who a credential is,
//! the storage figures, metrics in Prometheus's text format, and the API's OpenAPI
//! description.

use super::error::HttpError;
use super::{Doc, Shared};
use crate::domain::Caller;
use crate::workers::{WorkerState, WorkerStatus};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_proto::transfer::StorageStats;
use serde::Serialize;
use std::fmt::Write;
use utoipa::ToSchema;

type Answer<T> = Result<T, HttpError>;

/// `GET /v1/health`: the server is up.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
    /// The server's kiln version.
    pub version: &'static str,
    /// Client ids with an open session.
    pub clients_connected: usize,
    /// Claims waiting for a job now.
    pub clients_waiting: usize,
    /// The background workers and what each is doing.
    pub workers: Vec<WorkerStatus>,
}

/// Liveness, with how many clients are connected and wait for a job, and the state
/// of each background worker.
pub async fn health(state: Shared) -> Json<Health> {
    let (clients_connected, clients_waiting) = state.farm.client_counts();
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        clients_connected,
        clients_waiting,
        workers: state.workers.statuses(),
    })
}

pub fn health_doc() -> Doc {
    Doc::new("meta", "health", "Liveness")
        .describe(
            "The server is up: its version, how many clients hold a session and wait for \
             a job, and its background workers' states.",
        )
        .answers::<Health>(200, "The server is up.")
}

/// `GET /v1/openapi.json`: this API's OpenAPI description.
pub async fn openapi(state: Shared) -> Response {
    let document = super::openapi_for(state.farm.config().max_files_bytes);
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::to_json(&document),
    )
        .into_response()
}

pub fn openapi_doc() -> Doc {
    Doc::new("meta", "openapi", "This description").answers_object(
        200,
        "The API's OpenAPI 3.1 description, built from the server's route table.",
    )
}

/// What a credential is, as `GET /v1/whoami` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Whoami {
    pub role: Role,
    /// The client's id, for a client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// The kind of credential.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Client,
    Join,
    Anonymous,
}

/// `GET /v1/whoami`: what the presented credential is.
pub async fn whoami(caller: Caller) -> Json<Whoami> {
    let (role, client_id) = match caller {
        Caller::Admin => (Role::Admin, None),
        Caller::Client(id) => (Role::Client, Some(id)),
        Caller::Join => (Role::Join, None),
        Caller::Anonymous => (Role::Anonymous, None),
    };
    Json(Whoami { role, client_id })
}

pub fn whoami_doc() -> Doc {
    Doc::new("meta", "whoami", "What the credential is")
        .answers::<Whoami>(200, "The credential's role, and a client's id.")
}

/// `GET /v1/storage`
pub async fn storage(state: Shared, _caller: Caller) -> Answer<Json<StorageStats>> {
    Ok(Json(state.farm.storage_stats().await?))
}

pub fn storage_doc() -> Doc {
    Doc::new("meta", "storage", "Storage counters")
        .answers::<StorageStats>(200, "What the server has received and keeps.")
}

/// `GET /metrics`: the storage counters, the fleet's state and the background
/// workers' in Prometheus's text format.
pub async fn metrics(state: Shared, _caller: Caller) -> Answer<Response> {
    let stats = state.farm.storage_stats().await?;
    let (connected, waiting) = state.farm.client_counts();
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    };
    metric(
        "kiln_bytes_received_total",
        "counter",
        "Chunk bytes received on the wire, as sent.",
        stats.bytes_received,
    );
    metric(
        "kiln_bytes_deduplicated_total",
        "counter",
        "Bytes of chunks offered that the server already had.",
        stats.bytes_deduplicated,
    );
    metric(
        "kiln_bytes_stored",
        "gauge",
        "Bytes of chunk files on disk.",
        stats.bytes_stored,
    );
    metric(
        "kiln_chunks_stored",
        "gauge",
        "Chunk files on disk.",
        stats.chunks_stored,
    );
    metric(
        "kiln_image_bytes",
        "gauge",
        "Sum of the sizes of the images stored.",
        stats.image_bytes,
    );
    metric("kiln_images", "gauge", "Images stored.", stats.images);
    metric(
        "kiln_clients_connected",
        "gauge",
        "Clients holding a session.",
        connected as u64,
    );
    metric(
        "kiln_clients_waiting",
        "gauge",
        "Clients waiting for a job.",
        waiting as u64,
    );
    let workers = state.workers.statuses();
    let _ = write!(
        text,
        "# HELP kiln_worker_state Whether each background worker is in each state (1) or not (0).\n\
         # TYPE kiln_worker_state gauge\n"
    );
    for worker in &workers {
        for each in WorkerState::ALL {
            let _ = writeln!(
                text,
                "kiln_worker_state{{worker=\"{}\",state=\"{}\"}} {}",
                worker.name,
                each.as_str(),
                u8::from(worker.state == each)
            );
        }
    }
    let _ = write!(
        text,
        "# HELP kiln_worker_errors_total Rounds of background work that failed.\n\
         # TYPE kiln_worker_errors_total counter\n"
    );
    for worker in &workers {
        let _ = writeln!(
            text,
            "kiln_worker_errors_total{{worker=\"{}\"}} {}",
            worker.name, worker.n_errors
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

pub fn metrics_doc() -> Doc {
    Doc::new("meta", "metrics", "Metrics").answers_text(
        200,
        "text/plain",
        "The storage counters, the client counts and the background workers' states, in \
         Prometheus's text format (version 0.0.4).",
    )
}
