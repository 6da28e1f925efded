//! The server itself: liveness (with its background workers), who a credential is,
//! the storage figures, metrics in Prometheus's text format, and the API's OpenAPI
//! description.

use super::error::HttpError;
use super::{Doc, Shared};
use crate::domain::figures::QueueFigures;
use crate::domain::Caller;
use crate::metrics::{to_prometheus_text, Labels, Scrape};
use crate::workers::{WorkerState, WorkerStatus};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_proto::transfer::StorageStats;
use serde::Serialize;
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

/// The content type of the OpenMetrics text format, for scrapers that ask for it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of Prometheus's text format, for everyone else.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`: jobs by state, the queue per config type, storage, the disk, the
/// clients, the background workers, and the histograms and counters the farm keeps.
/// OpenMetrics text when the `Accept` header asks for it, else Prometheus's text
/// format.
pub async fn metrics(state: Shared, _caller: Caller, headers: HeaderMap) -> Answer<Response> {
    let figures = state.farm.figures().await?;
    let mut scrape = Scrape::default();
    scrape.gauges(
        "kiln_jobs",
        "Jobs by state.",
        figures
            .jobs
            .iter()
            .map(|(job_state, n)| (vec![("state", job_state.as_str().to_owned())], *n as f64))
            .collect(),
    );
    let per_type = |pick: fn(&QueueFigures) -> f64| -> Vec<(Labels, f64)> {
        figures
            .queues
            .iter()
            .map(|(config_type, queue)| (vec![("config_type", config_type.clone())], pick(queue)))
            .collect()
    };
    scrape.gauges(
        "kiln_queue_depth",
        "Jobs queued, by config type (types with jobs queued or running).",
        per_type(|queue| queue.queued as f64),
    );
    scrape.gauges(
        "kiln_queue_running",
        "Jobs running, by config type (types with jobs queued or running).",
        per_type(|queue| queue.running as f64),
    );
    scrape.gauges(
        "kiln_queue_oldest_age_seconds",
        "How long the job queued longest has waited, by config type (0 with none queued).",
        per_type(|queue| queue.oldest_age_secs),
    );
    scrape.gauges(
        "kiln_queue_clients",
        "Clients heard from in the last five minutes that take the config type.",
        per_type(|queue| queue.live_clients as f64),
    );
    let stats = &figures.storage;
    scrape.counter(
        "kiln_bytes_received",
        "Chunk bytes received on the wire, as sent.",
        stats.bytes_received,
    );
    scrape.counter(
        "kiln_bytes_deduplicated",
        "Bytes of chunks offered that the server already had: saved by deduplication.",
        stats.bytes_deduplicated,
    );
    scrape.gauge(
        "kiln_bytes_stored",
        "Bytes of chunk files on disk.",
        stats.bytes_stored as f64,
    );
    scrape.gauge(
        "kiln_chunks_stored",
        "Chunk files on disk.",
        stats.chunks_stored as f64,
    );
    scrape.gauge(
        "kiln_image_bytes",
        "Sum of the sizes of the images stored.",
        stats.image_bytes as f64,
    );
    scrape.gauge("kiln_images", "Images stored.", stats.images as f64);
    if let (Some(free), Some(size)) = (figures.disk_free_bytes, figures.disk_size_bytes) {
        scrape.gauge(
            "kiln_data_free_bytes",
            "Bytes free on the data directory's file system.",
            free as f64,
        );
        scrape.gauge(
            "kiln_data_size_bytes",
            "Size of the data directory's file system.",
            size as f64,
        );
    }
    scrape.gauge(
        "kiln_clients_connected",
        "Clients holding a session.",
        figures.clients_connected as f64,
    );
    scrape.gauge(
        "kiln_clients_waiting",
        "Clients waiting for a job.",
        figures.clients_waiting as f64,
    );
    if let Some(n) = figures.calls_batched {
        scrape.counter(
            "kiln_store_calls_batched",
            "Claims, image records and ends the store answered in a batch of several calls.",
            n,
        );
    }
    let workers = state.workers.statuses();
    scrape.gauges(
        "kiln_worker_state",
        "Whether each background worker is in each state (1) or not (0).",
        workers
            .iter()
            .flat_map(|worker| {
                WorkerState::ALL.into_iter().map(move |each| {
                    (
                        vec![
                            ("worker", worker.name.to_owned()),
                            ("state", each.as_str().to_owned()),
                        ],
                        f64::from(u8::from(worker.state == each)),
                    )
                })
            })
            .collect(),
    );
    scrape.counters(
        "kiln_worker_errors",
        "Rounds of background work that failed.",
        workers
            .iter()
            .map(|worker| (vec![("worker", worker.name.to_owned())], worker.n_errors))
            .collect(),
    );
    scrape.counters(
        "kiln_worker_rounds",
        "Rounds of background work done, failed ones included.",
        workers
            .iter()
            .map(|worker| (vec![("worker", worker.name.to_owned())], worker.n_rounds))
            .collect(),
    );
    let text = state.farm.metrics().render(&scrape);
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    Ok(if wants_openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            to_prometheus_text(&text),
        )
            .into_response()
    })
}

pub fn metrics_doc() -> Doc {
    Doc::new("meta", "metrics", "Metrics")
        .describe(
            "Jobs by state; the queue per config type (depth, running, oldest wait, live \
             clients); storage and the data directory's disk; clients; the background \
             workers' states, rounds and errors; histograms of dispatch latency, job \
             duration and upload duration; lost leases, timeouts and webhook failures; \
             on PostgreSQL, the store's calls answered in batches. \
             OpenMetrics 1.0 when `Accept` asks for `application/openmetrics-text`, else \
             Prometheus's text format 0.0.4. See docs/operations.md for each metric.",
        )
        .answers_text(
            200,
            "text/plain",
            "The metrics in Prometheus's text format (version 0.0.4), or OpenMetrics text.",
        )
}
