//! [`StorePackIndex`]: the pack index of a [`kiln_blob::PackChunkStore`] kept in the
//! server's state store ([`kiln_store::Packs`]), so that every server on one database
//! finds every chunk, and removal sees the pins uploads to any of them set.

use kiln_blob::packs::{ChunkLocation, PackIndex, PackUsage, PackedChunk};
use kiln_blob::{BlobError, ChunkHash, StoredChunk};
use kiln_store::{PackEntry, StoreError};
use std::sync::Arc;

/// The pack index in the state store.
pub struct StorePackIndex {
    store: Arc<crate::domain::Store>,
}

impl StorePackIndex {
    pub fn new(store: Arc<crate::domain::Store>) -> Self {
        StorePackIndex { store }
    }
}

fn index_error(err: StoreError) -> BlobError {
    BlobError::io("the pack index", std::io::Error::other(err))
}

fn entries(chunks: &[PackedChunk]) -> Vec<PackEntry> {
    chunks
        .iter()
        .map(|chunk| PackEntry {
            hash: chunk.hash,
            offset: chunk.offset,
            len: chunk.len,
        })
        .collect()
}

#[async_trait::async_trait]
impl PackIndex for StorePackIndex {
    async fn add_pack(
        &self,
        pack: &str,
        bytes: u64,
        chunks: &[PackedChunk],
    ) -> Result<u64, BlobError> {
        self.store
            .add_pack(pack, bytes, &entries(chunks), kiln_common::now_micros())
            .await
            .map_err(index_error)
    }

    async fn locate(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<ChunkLocation>>, BlobError> {
        Ok(self
            .store
            .locate_chunks(hashes)
            .await
            .map_err(index_error)?
            .into_iter()
            .map(|at| {
                at.map(|at| ChunkLocation {
                    pack: at.pack,
                    offset: at.offset,
                    len: at.len,
                })
            })
            .collect())
    }

    async fn list(
        &self,
        after: Option<ChunkHash>,
        limit: usize,
    ) -> Result<Vec<StoredChunk>, BlobError> {
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        Ok(self
            .store
            .list_chunks(after, limit)
            .await
            .map_err(index_error)?
            .into_iter()
            .map(|(hash, len)| StoredChunk {
                hash,
                bytes: u64::from(len),
            })
            .collect())
    }

    async fn remove_unpinned(&self, hashes: &[ChunkHash], since: i64) -> Result<u64, BlobError> {
        self.store
            .remove_unpinned_chunks(hashes, since)
            .await
            .map_err(index_error)
    }

    async fn sparse_packs(&self, live_share: f64) -> Result<Vec<PackUsage>, BlobError> {
        Ok(self
            .store
            .sparse_packs(live_share)
            .await
            .map_err(index_error)?
            .into_iter()
            .map(|fill| PackUsage {
                pack: fill.pack,
                bytes: fill.bytes,
                live_bytes: fill.live_bytes,
            })
            .collect())
    }

    async fn pack_chunks(&self, pack: &str) -> Result<Vec<PackedChunk>, BlobError> {
        Ok(self
            .store
            .pack_entries(pack)
            .await
            .map_err(index_error)?
            .into_iter()
            .map(|entry| PackedChunk {
                hash: entry.hash,
                offset: entry.offset,
                len: entry.len,
            })
            .collect())
    }

    async fn replace_pack(
        &self,
        old: &str,
        new: Option<(&str, u64, &[PackedChunk])>,
    ) -> Result<bool, BlobError> {
        let copied = new.map(|(_, _, chunks)| entries(chunks));
        let new = new.map(|(name, bytes, _)| (name, bytes));
        self.store
            .replace_pack(
                old,
                new.zip(copied.as_deref())
                    .map(|((name, bytes), copied)| (name, bytes, copied)),
                kiln_common::now_micros(),
            )
            .await
            .map_err(index_error)
    }
}
