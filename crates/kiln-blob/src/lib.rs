//! Image bytes: hashing and the blob store.
//!
//! - [`ImageHasher`] computes an image's whole-file BLAKE3 and SHA-256 in one pass.
//! - [`chunking`] cuts an image into content-defined chunks named by their BLAKE3 hash.
//! - [`frames`] is how chunks travel and rest; [`ChunkStore`] keeps each chunk once.
//! - [`BlobStore`] is where the server keeps image bytes and build files, by key;
//!   [`LocalBlobStore`] keeps them in a directory, written crash-safely (temp file,
//!   fsync, rename, fsync the directory). An S3-compatible store implements the same
//!   trait.

pub mod chunking;
pub mod chunks;
pub mod frames;
mod local;
pub mod noise;

pub use chunks::{ChunkStore, LocalChunkStore, PutStats};
pub use frames::{ChunkEntry, ChunkHash, Frame};
pub use local::LocalBlobStore;

use async_trait::async_trait;
use sha2::Digest;
use std::path::{Path, PathBuf};

/// What went wrong with stored bytes.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob has this key.
    #[error("blob {0} not found")]
    NotFound(String),
    /// The key is not a hex digest.
    #[error("invalid blob key {0:?}")]
    InvalidKey(String),
    /// The device holding the store is full.
    #[error("{what}: no space left on the server's disk")]
    NoSpace {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Any other I/O failure, with what was being done.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl BlobError {
    /// Wraps an I/O error, telling a full disk apart.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        let what = what.into();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            BlobError::NoSpace { what, source }
        } else {
            BlobError::Io { what, source }
        }
    }
}

/// Whole-file digests of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub size: u64,
    /// BLAKE3, lowercase hex.
    pub blake3: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// Computes BLAKE3 and SHA-256 of a byte stream fed in pieces.
#[derive(Default, Clone)]
pub struct ImageHasher {
    size: u64,
    blake3: blake3::Hasher,
    sha256: sha2::Sha256,
}

impl ImageHasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece.
    pub fn update(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        self.blake3.update(bytes);
        self.sha256.update(bytes);
    }

    /// The digests of everything fed.
    pub fn finish(self) -> Digests {
        Digests {
            size: self.size,
            blake3: self.blake3.finalize().to_hex().to_string(),
            sha256: hex::encode(self.sha256.finalize()),
        }
    }
}

/// Hashes a file in one pass without holding it in memory.
pub async fn hash_file(path: &Path) -> std::io::Result<Digests> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = ImageHasher::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        Ok(hasher.finish())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A file being written into the store, not yet visible under any key. Dropped
/// without [`BlobStore::commit`], it is deleted.
pub struct StagedBlob {
    path: PathBuf,
    committed: bool,
}

impl StagedBlob {
    /// Where to write the bytes.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where the server keeps image bytes and build files.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// A new staging file to write an incoming blob to.
    async fn stage(&self) -> Result<StagedBlob, BlobError>;
    /// Makes the staged bytes durable and visible under `key` (a hex digest of them).
    /// A blob already stored under `key` is kept: the bytes are the same.
    async fn commit(&self, staged: StagedBlob, key: &str) -> Result<(), BlobError>;
    /// Whether a blob is stored under `key`.
    async fn contains(&self, key: &str) -> Result<bool, BlobError>;
    /// The size of the blob under `key`.
    async fn size(&self, key: &str) -> Result<u64, BlobError>;
    /// A file holding the blob, for stores that keep blobs as local files (served with
    /// Range support straight from it).
    fn local_path(&self, key: &str) -> Result<PathBuf, BlobError>;
    /// Deletes the blob under `key`, if there is one.
    async fn remove(&self, key: &str) -> Result<(), BlobError>;
}

/// Whether `key` is a lowercase hex digest of 64 characters.
pub fn is_valid_key(key: &str) -> bool {
    kiln_proto::transfer::is_hex_digest(key)
}
