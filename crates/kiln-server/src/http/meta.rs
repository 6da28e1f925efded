//! The server itself: liveness (with its background workers), who a credential is,
//! the storage figures, and metrics in Prometheus's text format.

use super::error::HttpError;
use super::Shared;
use crate::farm::Caller;
use crate::workers::WorkerState;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_proto::transfer::StorageStats;
use std::fmt::Write;

type Answer<T> = Result<T, HttpError>;

/// Liveness, with how many clients are connected and wait for a job, and the state
/// of each background worker.
pub async fn health(state: Shared) -> Json<serde_json::Value> {
    let (connected, waiting) = state.farm.client_counts();
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "clients_connected": connected,
        "clients_waiting": waiting,
        "workers": state.workers.statuses(),
    }))
}

/// `GET /v1/whoami`: what the presented credential is.
pub async fn whoami(caller: Caller) -> Json<serde_json::Value> {
    Json(match caller {
        Caller::Admin => serde_json::json!({ "role": "admin" }),
        Caller::Client(id) => serde_json::json!({ "role": "client", "client_id": id }),
        Caller::Join => serde_json::json!({ "role": "join" }),
        Caller::Anonymous => serde_json::json!({ "role": "anonymous" }),
    })
}

/// `GET /v1/storage`
pub async fn storage(state: Shared, _caller: Caller) -> Answer<Json<StorageStats>> {
    Ok(Json(state.farm.storage_stats().await?))
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
