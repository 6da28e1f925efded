//! [`CallError`]: why a call to a server or a master did not succeed, sorted so that
//! callers can act on it: unreachable (try again, or exit 2), refused (the server said
//! no, with its words), stale (the job is no longer ours), busy or failed (later).

use kiln_proto::api::ApiError;
use kiln_proto::transfer::ChunkHash;
use reqwest::StatusCode;
use std::time::Duration;

/// Why a call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The server could not be reached, the connection broke, or its answer could not
    /// be read.
    #[error("cannot reach {url}{}", kiln_tls::certificate_hint(.source))]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server refused the call, in these words; the same call will not succeed.
    #[error("{message} (HTTP {status})")]
    Refused { status: StatusCode, message: String },
    /// The lease is no longer ours (409 `stale_lease`): stop the job.
    #[error("the server says our lease is stale: {0}")]
    Stale(String),
    /// The server could not do it now (5xx, e.g. out of disk); retry later.
    #[error("the server failed: {status}: {message}")]
    ServerFailed { status: StatusCode, message: String },
    /// The server is taking as many uploads from this client as it accepts at once
    /// (429): send this one again after the pause it asks for.
    #[error("the server is busy with this client's other uploads: {message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
    /// A commit named chunks the server lacks (it may have collected them): send
    /// them and commit again.
    #[error("the server lacks {} chunks of the image", .0.len())]
    MissingChunks(Vec<ChunkHash>),
    /// A local file could not be read or written.
    #[error("{what}")]
    Local {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl CallError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CallError::Unreachable { .. } | CallError::ServerFailed { .. } | CallError::Busy { .. }
        )
    }

    /// Whether the server could not be reached (as opposed to: it answered no).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, CallError::Unreachable { .. })
    }

    /// The HTTP status the server refused the call with, if it did.
    pub fn refused_status(&self) -> Option<StatusCode> {
        match self {
            CallError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn unreachable(url: &str) -> impl FnOnce(reqwest::Error) -> CallError + '_ {
        move |source| CallError::Unreachable {
            url: url.to_owned(),
            source,
        }
    }
}

/// The pause after a `429` that names none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest pause a `429` may ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The answer of an agent's call, sorted: success as is, else the [`CallError`] its
/// status and `{code, error}` body say.
pub(crate) async fn check(response: reqwest::Response) -> Result<reqwest::Response, CallError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    // Read before the body: a pause the server asks for when it is busy.
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY_AFTER, |secs| {
            Duration::from_secs(secs).min(MAX_RETRY_AFTER)
        });
    let text = response.text().await.unwrap_or_default();
    let (code, message, missing) = match serde_json::from_str::<ApiError>(&text) {
        Ok(body) => (body.code, body.error, body.missing),
        Err(_) => (String::new(), text, None),
    };
    if status == StatusCode::CONFLICT && code == "missing_chunks" {
        let missing = missing
            .unwrap_or_default()
            .iter()
            .filter_map(|hex| ChunkHash::parse(hex))
            .collect();
        return Err(CallError::MissingChunks(missing));
    }
    // 409 also answers other conflicts (finishing without the images, say): only
    // `stale_lease` means the job is no longer ours.
    Err(if status == StatusCode::CONFLICT && code == "stale_lease" {
        CallError::Stale(message)
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        CallError::Busy {
            message,
            retry_after,
        }
    } else if status.is_server_error() {
        CallError::ServerFailed { status, message }
    } else {
        CallError::Refused { status, message }
    })
}
