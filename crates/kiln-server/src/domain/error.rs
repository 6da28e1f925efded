//! [`FarmError`]: what the farm's operations refuse, and why, in the farm's words. The
//! HTTP layer maps each to a status and a `{code, error}` body in one place
//! (`crate::http::error`).

use kiln_blob::BlobError;
use kiln_store::StoreError;

/// A refusal or failure of an operation of the farm.
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The request is malformed or names something invalid.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// No credential, or not a valid one (or no longer: revoked).
    #[error("{0}")]
    NotAuthenticated(String),
    /// A valid credential without the right to do this.
    #[error("{0}")]
    NotAllowed(String),
    /// The call conflicts with what exists (a client enrolled already, say).
    #[error("{message}")]
    Exists { code: &'static str, message: String },
    /// More than the server accepts (a body, a build, a batch).
    #[error("{0}")]
    TooLarge(String),
    /// Well-formed, but not what it claims to be (a chunk or an image whose bytes do
    /// not match their hash): nothing of it was kept.
    #[error("{message}")]
    Mismatch { code: &'static str, message: String },
    /// A commit lists chunks the server does not have; the client sends them and
    /// commits again.
    #[error("{message}")]
    MissingChunks {
        message: String,
        missing: Vec<String>,
    },
    /// The client is sending as many uploads as it may at once: it retries after a
    /// pause. Nothing of this one was read or kept.
    #[error("{0}")]
    TooManyUploads(String),
    /// Anything else: logged in full, reported without detail.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Results of the farm's operations.
pub type FarmResult<T> = Result<T, FarmError>;

impl FarmError {
    /// An invalid request, with its code and words.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        FarmError::Invalid {
            code,
            message: message.into(),
        }
    }

    /// A task of the farm that failed to run (it panicked or was cancelled).
    pub(crate) fn task(what: &str, err: tokio::task::JoinError) -> Self {
        FarmError::Internal(format!("{what} failed: {err}"))
    }
}
