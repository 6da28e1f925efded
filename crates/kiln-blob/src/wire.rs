//! JSON bodies of the chunked transfer API (see docs/transfer.md).

use crate::frames::{ChunkEntry, ChunkHash};
use serde::{Deserialize, Serialize};

/// The most chunks one `chunks/missing` question may name.
pub const MAX_MISSING_QUERY: usize = 4096;
/// The most chunks one `chunks/fetch` request may name.
pub const MAX_FETCH: usize = 1024;
/// Media type of a body of frames.
pub const FRAMES_CONTENT_TYPE: &str = "application/x-kiln-chunks";

/// `POST /v1/jobs/B/J/chunks/missing`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingRequest {
    /// The next chunks of the image, in order, repeats included.
    pub chunks: Vec<ChunkEntry>,
    /// The image they belong to. With it, the server hashes the image in order while
    /// its chunks arrive, so the commit need not read it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Where in the image the first of `chunks` starts (0 starts the image again).
    #[serde(default)]
    pub offset: u64,
}

/// The answer: the chunks the server lacks, in the order asked, each once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingResponse {
    pub missing: Vec<ChunkHash>,
}

/// The answer to a body of chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutChunksResponse {
    /// Chunks in the body.
    pub chunks: u64,
    /// Bytes of the body.
    pub bytes_received: u64,
    /// Bytes newly written to disk (chunks the server did not have).
    pub bytes_stored: u64,
}

/// `POST /v1/jobs/B/J/images/NAME/commit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitRequest {
    pub size: u64,
    pub blake3: String,
    pub sha256: String,
    pub chunks: Vec<ChunkEntry>,
}

/// `GET /v1/jobs/B/J/images/NAME/index`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageIndex {
    pub name: String,
    pub size: u64,
    pub blake3: String,
    pub sha256: String,
    pub chunks: Vec<ChunkEntry>,
}

/// `POST /v1/chunks/fetch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchRequest {
    pub chunks: Vec<ChunkHash>,
}

/// `GET /v1/storage`: what the server has received and keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageStats {
    /// Chunk bytes received on the wire, as sent (compressed).
    pub bytes_received: u64,
    /// Bytes of chunks clients offered that the server already had.
    pub bytes_deduplicated: u64,
    /// Bytes of chunk files on disk.
    pub bytes_stored: u64,
    /// Chunk files on disk.
    pub chunks_stored: u64,
    /// Sum of the sizes of the images stored.
    pub image_bytes: u64,
    /// Images stored.
    pub images: u64,
}

/// `DELETE /v1/builds/B`: what went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeleteReport {
    pub build: String,
    pub jobs: u64,
    pub images: u64,
    /// Chunks no image uses any more, deleted.
    pub chunks_freed: u64,
    pub bytes_freed: u64,
}
