//! Every refusal of the API mapped to an HTTP status and a `{code, error}` body, in
//! one place.

use crate::domain::FarmError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_blob::BlobError;
use kiln_proto::api::ApiError;
use kiln_store::StoreError;

/// The pause, in seconds, a client refused `too_many_uploads` or `store_unavailable`
/// waits before it sends the call again.
const RETRY_AFTER_SECS: &str = "1";

/// A farm error on its way out as an HTTP answer.
#[derive(Debug)]
pub struct HttpError(pub FarmError);

impl From<FarmError> for HttpError {
    fn from(err: FarmError) -> Self {
        HttpError(err)
    }
}

impl From<StoreError> for HttpError {
    fn from(err: StoreError) -> Self {
        HttpError(err.into())
    }
}

/// The status and code of a refusal.
pub fn status_and_code(err: &FarmError) -> (StatusCode, &'static str) {
    match err {
        FarmError::Store(StoreError::NotFound(_)) => (StatusCode::NOT_FOUND, "not_found"),
        FarmError::Store(StoreError::DuplicateBuild(_)) => {
            (StatusCode::CONFLICT, "duplicate_build")
        }
        FarmError::Store(StoreError::StaleLease { .. }) => (StatusCode::CONFLICT, "stale_lease"),
        FarmError::Store(StoreError::Conflict(_)) => (StatusCode::CONFLICT, "conflict"),
        FarmError::Store(StoreError::Unavailable(_)) => {
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        }
        FarmError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_failed"),
        FarmError::Blob(BlobError::NotFound(_)) => (StatusCode::NOT_FOUND, "not_found"),
        FarmError::Blob(BlobError::InvalidKey(_)) => (StatusCode::BAD_REQUEST, "invalid_key"),
        FarmError::Blob(BlobError::NoSpace { .. }) => {
            (StatusCode::INSUFFICIENT_STORAGE, "no_space")
        }
        FarmError::Blob(BlobError::Io { .. }) => (StatusCode::INTERNAL_SERVER_ERROR, "io_failed"),
        FarmError::Blob(BlobError::Damaged(_)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "damaged_chunk")
        }
        FarmError::Blob(BlobError::Unavailable { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        }
        FarmError::Invalid { code, .. } => (StatusCode::BAD_REQUEST, code),
        FarmError::NotAuthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
        FarmError::NotAllowed(_) => (StatusCode::FORBIDDEN, "forbidden"),
        FarmError::Exists { code, .. } => (StatusCode::CONFLICT, code),
        FarmError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        FarmError::Mismatch { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
        FarmError::MissingChunks { .. } => (StatusCode::CONFLICT, "missing_chunks"),
        FarmError::TooManyUploads(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_uploads"),
        FarmError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let HttpError(err) = self;
        let (status, code) = status_and_code(&err);
        let message = kiln_proto::error_chain(&err);
        let missing = match err {
            FarmError::MissingChunks { missing, .. } => Some(missing),
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
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}
