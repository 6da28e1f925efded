//! [`ApiErr`]: every refusal of the API, mapped to an HTTP status and an
//! [`kiln_proto::api::ApiError`] body in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_blob::BlobError;
use kiln_proto::api::ApiError;
use kiln_store::StoreError;

/// The pause, in seconds, a client refused `too_many_uploads` waits before it sends
/// the upload again.
const RETRY_UPLOAD_AFTER_SECS: &str = "1";

/// A refusal or failure of an API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiErr {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The request is malformed or names something invalid.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// No credential, or not a valid one.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid credential without the right to do this.
    #[error("{0}")]
    Forbidden(String),
    /// The call conflicts with what exists (a client enrolled already, say).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The request body is larger than the server accepts.
    #[error("{0}")]
    TooLarge(String),
    /// Well-formed, but not what it claims to be (a chunk or an image whose bytes do
    /// not match their hash): nothing of it was kept.
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// A commit lists chunks the server does not have; the client sends them and
    /// commits again.
    #[error("{message}")]
    MissingChunks {
        message: String,
        missing: Vec<String>,
    },
    /// The client is sending as many uploads as it may at once: it retries after a
    /// pause (`Retry-After`). Nothing of this one was read or kept.
    #[error("{0}")]
    TooManyUploads(String),
    /// Anything else: logged in full, reported without detail.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiErr {
    /// A 400 with a code and a message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiErr::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiErr::Store(StoreError::NotFound(_)) => (StatusCode::NOT_FOUND, "not_found"),
            ApiErr::Store(StoreError::DuplicateBuild(_)) => {
                (StatusCode::CONFLICT, "duplicate_build")
            }
            ApiErr::Store(StoreError::StaleLease { .. }) => (StatusCode::CONFLICT, "stale_lease"),
            ApiErr::Store(StoreError::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
            ApiErr::Store(StoreError::Db(_) | StoreError::Migrate(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "store_failed")
            }
            ApiErr::Blob(BlobError::NotFound(_)) => (StatusCode::NOT_FOUND, "not_found"),
            ApiErr::Blob(BlobError::InvalidKey(_)) => (StatusCode::BAD_REQUEST, "invalid_key"),
            ApiErr::Blob(BlobError::NoSpace { .. }) => {
                (StatusCode::INSUFFICIENT_STORAGE, "no_space")
            }
            ApiErr::Blob(BlobError::Io { .. }) => (StatusCode::INTERNAL_SERVER_ERROR, "io_failed"),
            ApiErr::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiErr::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiErr::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiErr::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            ApiErr::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiErr::Unprocessable { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            ApiErr::MissingChunks { .. } => (StatusCode::CONFLICT, "missing_chunks"),
            ApiErr::TooManyUploads(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_uploads"),
            ApiErr::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = kiln_proto::error_chain(&self);
        let missing = match self {
            ApiErr::MissingChunks { missing, .. } => Some(missing),
            _ => None,
        };
        if status.is_server_error() {
            tracing::error!(cause = %message, code, "request failed");
        }
        let mut response = (
            status,
            Json(ApiError {
                code: code.to_owned(),
                error: message,
                missing,
            }),
        )
            .into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_UPLOAD_AFTER_SECS),
            );
        }
        response
    }
}
