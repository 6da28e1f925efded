//! [`ImageUploader`]: how a finished image travels to the server. The one
//! implementation here, [`WholeFileUploader`], hashes the file and streams it whole;
//! a chunked, deduplicated transfer implements the same trait.

use crate::conn::{CallError, ServerConn};
use async_trait::async_trait;
use kiln_proto::api::Claim;
use std::path::Path;

/// Sends one image of a job to its server under the job's lease.
#[async_trait]
pub trait ImageUploader: Send + Sync {
    /// Uploads `path` as the image `name`; the server verifies it before keeping it.
    async fn upload(
        &self,
        conn: &ServerConn,
        claim: &Claim,
        name: &str,
        path: &Path,
    ) -> Result<(), CallError>;
}

/// Streams the whole file with its BLAKE3 hash.
pub struct WholeFileUploader;

#[async_trait]
impl ImageUploader for WholeFileUploader {
    async fn upload(
        &self,
        conn: &ServerConn,
        claim: &Claim,
        name: &str,
        path: &Path,
    ) -> Result<(), CallError> {
        let digests = kiln_blob::hash_file(path)
            .await
            .map_err(|source| CallError::Local {
                what: format!("hashing image {}", path.display()),
                source,
            })?;
        conn.put_image(claim, name, path, &digests.blake3, digests.size)
            .await
    }
}
