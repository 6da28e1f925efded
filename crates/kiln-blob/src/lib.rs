//! Image bytes: hashing and the blob store.
//!
//! - [`ImageHasher`] computes an image's whole-file BLAKE3 and SHA-256 in one pass.
//! - [`chunking`] cuts an image into content-defined chunks named by their BLAKE3 hash.
//! - [`frames`] is how chunks travel and rest; [`ChunkStore`] keeps each chunk once.
//! - [`BlobStore`] is where the server keeps build files archives, by key, streamed
//!   in and out; [`LocalBlobStore`] keeps them in a directory, written crash-safely
//!   (temporary file, fsync, rename, fsync the directory).
//!
//! Both store traits are async and name no file system: a backend that keeps bytes
//! elsewhere implements them as they are.

pub mod chunking;
pub mod chunks;
pub mod frames;
mod local;
pub mod noise;
pub mod packs;
pub mod s3;

pub use chunks::{BlockingChunks, ChunkStore, LocalChunkStore, PutStats, StoredChunk};
pub use frames::{ChunkEntry, ChunkHash, Frame};
pub use local::LocalBlobStore;
pub use packs::{LocalPackFiles, PackChunkStore, PackIndex};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::Digest;
use std::ops::Range;
use std::path::Path;

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
    /// Stored bytes that do not match their name or their index: never served.
    #[error("damaged: {0}")]
    Damaged(String),
    /// The store (an object store across the network) cannot be reached or refused
    /// the call; the same call may work later.
    #[error("{what}: the object store is unavailable")]
    Unavailable {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
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

    /// The same error once more, for another caller waiting on the same work: the
    /// variant, its text and the kind of an I/O source are kept (a source's own
    /// source is kept as text).
    pub fn again(&self) -> Self {
        let io_again =
            |source: &std::io::Error| std::io::Error::new(source.kind(), source.to_string());
        match self {
            BlobError::NotFound(what) => BlobError::NotFound(what.clone()),
            BlobError::InvalidKey(key) => BlobError::InvalidKey(key.clone()),
            BlobError::NoSpace { what, source } => BlobError::NoSpace {
                what: what.clone(),
                source: io_again(source),
            },
            BlobError::Damaged(why) => BlobError::Damaged(why.clone()),
            BlobError::Unavailable { what, source } => BlobError::Unavailable {
                what: what.clone(),
                source: source.to_string().into(),
            },
            BlobError::Io { what, source } => BlobError::Io {
                what: what.clone(),
                source: io_again(source),
            },
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

/// Bytes streamed out of a store.
pub type ByteStream = futures::stream::BoxStream<'static, Result<Bytes, BlobError>>;

/// Bytes streamed into a store.
pub type ByteReader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// A stored blob being read: its whole size, and the bytes asked for.
pub struct BlobRead {
    /// The size of the whole blob, whatever range was asked.
    pub size: u64,
    pub body: ByteStream,
}

/// Where the server keeps build files archives, by key (the BLAKE3 of the bytes).
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores what `reader` yields under `key`, durably when this returns. A blob
    /// already stored under `key` is kept (its bytes are the same: the key is their
    /// digest, which the caller computed). Returns the bytes read.
    async fn put(&self, key: &str, reader: ByteReader) -> Result<u64, BlobError>;
    /// The bytes `range` covers (end exclusive; the whole blob when `None`) of the
    /// blob under `key`, streamed.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<BlobRead, BlobError>;
    /// The size of the blob under `key`.
    async fn size(&self, key: &str) -> Result<u64, BlobError>;
    /// Whether a blob is stored under `key`.
    async fn contains(&self, key: &str) -> Result<bool, BlobError>;
    /// Deletes the blob under `key`, if there is one.
    async fn remove(&self, key: &str) -> Result<(), BlobError>;
}

/// Whether `key` is a lowercase hex digest of 64 characters.
pub fn is_valid_key(key: &str) -> bool {
    kiln_proto::transfer::is_hex_digest(key)
}
