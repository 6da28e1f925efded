//! Chunks in packs: many chunks appended to one file or object of tens of MiB, found
//! through an index of (chunk, pack, offset, length).
//!
//! [`PackChunkStore`] is a [`ChunkStore`] over two parts it is given:
//! - [`PackFiles`], where pack bytes rest: [`LocalPackFiles`] (files in a directory) or
//!   `S3PackFiles` (objects in a bucket, see [`crate::s3`]). A pack is written once,
//!   through an [`OpenPack`], and never changed after it is sealed.
//! - [`PackIndex`], where the index rests: the server keeps it in its state store, so
//!   that server replicas sharing one database and one object store share it.
//!   [`MemoryPackIndex`] keeps it in memory, for tests.
//!
//! A pack is the 8 bytes [`PACK_MAGIC`] followed by frames back to back, each whole
//! with its name (see [`crate::frames`]): a pack describes itself, and a read checks
//! that the frame at an index entry's place carries the name asked for and that its
//! bytes hash to it. A damaged pack is reported, never served.
//!
//! Writes: every chunk [`ChunkStore::put`] stores is appended to the one open pack
//! (after a look in the open pack and in the index: a chunk stored already is
//! skipped). The open pack is *sealed* when it reaches its target size and at every
//! [`ChunkStore::persist`]: its bytes are made durable (fsync; a completed object
//! upload), then its index entries are recorded in one transaction. A seal runs in a
//! task of its own while puts go on into a new open pack (one seal at a time); a chunk
//! in a pack being sealed is present and readable, but durable only once indexed, and
//! `persist` waits for every seal in flight. So a pack and its
//! index are durable before any image that lists its chunks is recorded (the server
//! persists before it records), and a crash loses only chunks no image lists yet.
//! Two uploads storing the same chunk at once store it once: appends and the look
//! before them take one lock, and the index keeps the first entry of a name (a second
//! server that stored the same chunk meanwhile leaves a dead copy, reclaimed by
//! compaction).
//!
//! Collection: [`ChunkStore::remove_unpinned_since`] drops index entries, but never
//! those of a chunk pinned in the index past the collection's start (an upload about
//! to commit pins its chunks first, in the same store; see the server's
//! `farm::images`). [`ChunkStore::compact`] then rewrites
//! each pack whose live share fell below a threshold: its live chunks are copied to a
//! new pack, the index entries are moved to it in one transaction, and the old pack is
//! deleted once no entry points into it. A reader that looked a chunk up just before
//! a move finds the old pack gone and looks again.

use crate::chunks::{PutStats, StoredChunk};
use crate::frames::{ChunkHash, Frame, FrameReader};
use crate::{BlobError, ChunkStore};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How every pack starts.
pub const PACK_MAGIC: &[u8; 8] = b"KILNPK01";
/// How many chunks are looked up in the index at a time when reading many.
const LOCATE_BATCH: usize = 256;
/// Chunks read ahead by [`ChunkStore::read_frames`].
const READ_AHEAD: usize = 8;

/// Where a chunk rests: a range of a pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    pub pack: String,
    /// Where its frame starts in the pack.
    pub offset: u64,
    /// The frame's length, name included.
    pub len: u32,
}

/// An index entry of a pack being recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedChunk {
    pub hash: ChunkHash,
    pub offset: u64,
    pub len: u32,
}

/// A pack with how much of it is still indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackUsage {
    pub pack: String,
    /// The pack's length.
    pub bytes: u64,
    /// Bytes of the frames the index still points at.
    pub live_bytes: u64,
}

/// Where the pack index rests; a server keeps it in its state store.
#[async_trait]
pub trait PackIndex: Send + Sync + 'static {
    /// Records a sealed pack of `bytes` bytes and its chunks, in one transaction. A
    /// chunk indexed already keeps its entry. Returns how many entries were new.
    async fn add_pack(
        &self,
        pack: &str,
        bytes: u64,
        chunks: &[PackedChunk],
    ) -> Result<u64, BlobError>;
    /// Where each of `hashes` rests, in that order (`None`: not indexed).
    async fn locate(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<ChunkLocation>>, BlobError>;
    /// Up to `limit` indexed chunks after `after`, in name order, with their frames'
    /// lengths.
    async fn list(
        &self,
        after: Option<ChunkHash>,
        limit: usize,
    ) -> Result<Vec<StoredChunk>, BlobError>;
    /// Drops the entries of `hashes` except those pinned past `since` (unix
    /// microseconds: when the collection started), in one transaction; returns the
    /// bytes of the frames dropped.
    async fn remove_unpinned(&self, hashes: &[ChunkHash], since: i64) -> Result<u64, BlobError>;
    /// Packs whose indexed bytes are below `live_share` of their length.
    async fn sparse_packs(&self, live_share: f64) -> Result<Vec<PackUsage>, BlobError>;
    /// The entries that point into `pack`.
    async fn pack_chunks(&self, pack: &str) -> Result<Vec<PackedChunk>, BlobError>;
    /// In one transaction: records the pack `new` (when given, with its length and the
    /// entries of chunks copied into it) and moves to it the entries of those chunks
    /// that still point into `old`; then forgets `old` if no entry points into it.
    /// Returns whether `old` was forgotten (its bytes may be deleted).
    async fn replace_pack(
        &self,
        old: &str,
        new: Option<(&str, u64, &[PackedChunk])>,
    ) -> Result<bool, BlobError>;
}

/// A pack being written: appended to, readable, then sealed under its name.
#[async_trait]
pub trait OpenPack: Send + Sync {
    /// The name it will have once sealed.
    fn name(&self) -> &str;
    /// Bytes written so far.
    fn size(&self) -> u64;
    /// Appends `pieces` in order.
    async fn append(&mut self, pieces: Vec<Bytes>) -> Result<(), BlobError>;
    /// Bytes written so far, by range; `None` when they are not held here any more
    /// (sent on to where the pack will rest, and readable there once it is sealed).
    async fn read(&self, range: Range<u64>) -> Result<Option<Bytes>, BlobError>;
    /// Makes the pack durable and readable under its name. Called once, after the
    /// last append.
    async fn seal(&self) -> Result<(), BlobError>;
    /// Gives the pack up; nothing of it is kept.
    async fn abandon(&self);
}

/// Where packs rest.
#[async_trait]
pub trait PackFiles: Send + Sync + 'static {
    /// A new, empty pack, its magic written.
    async fn begin(&self) -> Result<Box<dyn OpenPack>, BlobError>;
    /// A range of a sealed pack (`NotFound` when the pack is not there).
    async fn read(&self, pack: &str, range: Range<u64>) -> Result<Bytes, BlobError>;
    /// Deletes a sealed pack, if it is there.
    async fn remove(&self, pack: &str) -> Result<(), BlobError>;
    /// The size at which the open pack is sealed.
    fn target_pack_bytes(&self) -> u64;
    /// The id this image store was given ([`PackFiles::claim_store_id`]), if any. The
    /// database that indexes the packs records it too, so that a server started on a
    /// database and an image store that do not belong together refuses to start.
    async fn store_id(&self) -> Result<Option<String>, BlobError>;
    /// Gives the store `id` unless it has one already (one of several servers
    /// starting at once wins); returns the id it has.
    async fn claim_store_id(&self, id: &str) -> Result<String, BlobError>;
}

/// The name of the file or object, beside the packs, that holds the store's id.
pub const STORE_ID_NAME: &str = "store-id";

/// A fresh store id: random, 128 bits, in hex.
pub fn new_store_id() -> String {
    use rand::RngCore;
    let mut random = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut random);
    hex::encode(random)
}

/// A stored id read back: its text, checked to be an id [`new_store_id`] could make.
pub fn parse_store_id(bytes: &[u8], place: &str) -> Result<String, BlobError> {
    let id = std::str::from_utf8(bytes).unwrap_or("").trim();
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id.to_owned())
    } else {
        Err(BlobError::Damaged(format!(
            "{place} does not hold a store id (32 hex digits)"
        )))
    }
}

/// A fresh, unique pack name: the time first, so that names sort by age.
pub fn new_pack_name() -> String {
    use rand::RngCore;
    let mut random = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut random);
    format!(
        "{:016x}-{}",
        kiln_common::now_micros().max(0),
        hex::encode(random)
    )
}

/// Whether `name` is a pack name [`new_pack_name`] could make.
pub fn is_pack_name(name: &str) -> bool {
    name.len() == 33
        && name.as_bytes()[16] == b'-'
        && name
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 16 || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The open pack and what it holds.
struct Open {
    pack: Box<dyn OpenPack>,
    chunks: HashMap<ChunkHash, (u64, u32)>,
    entries: Vec<PackedChunk>,
}

/// How many packs may be sealing in the background at once: a put that fills one
/// more, or a persist, waits for the oldest to be sealed first. With the open pack,
/// this bounds the pack bytes held (in memory, for packs bound for an object store):
/// one pack fills while the one before it is written.
const MAX_SEALING: usize = 1;

/// How a pack's seal ended; `None` while it goes on.
type SealOutcome = Option<Result<(), Arc<BlobError>>>;

/// A pack being sealed in the background: its bytes are all written and readable,
/// its chunks are not in the index yet.
struct Sealing {
    pack: Arc<dyn OpenPack>,
    chunks: HashMap<ChunkHash, (u64, u32)>,
    done: tokio::sync::watch::Receiver<SealOutcome>,
}

/// Chunks in packs; see the module docs.
pub struct PackChunkStore {
    files: Arc<dyn PackFiles>,
    index: Arc<dyn PackIndex>,
    open: tokio::sync::Mutex<Option<Open>>,
    /// Packs being sealed, oldest first. A seal takes its pack out of this list after
    /// its index entries are recorded (or it failed), so a chunk that was in the open
    /// pack is always in the open pack, here, or in the index, unless its seal failed.
    sealing: Arc<Mutex<Vec<Arc<Sealing>>>>,
}

impl PackChunkStore {
    /// A store over `files` and `index`.
    pub fn new(files: Arc<dyn PackFiles>, index: Arc<dyn PackIndex>) -> Self {
        PackChunkStore {
            files,
            index,
            open: tokio::sync::Mutex::new(None),
            sealing: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The packs being sealed now.
    fn sealing_now(&self) -> Vec<Arc<Sealing>> {
        self.sealing.lock().expect("the sealing list").clone()
    }

    /// Starts sealing the open pack, if it holds anything, in a task of its own: the
    /// pack is made durable, then its index entries are recorded, then it leaves the
    /// sealing list and its outcome is told.
    async fn start_seal(&self, open: &mut Option<Open>) {
        let Some(current) = open.take() else {
            return;
        };
        if current.entries.is_empty() {
            current.pack.abandon().await;
            return;
        }
        let (tell, done) = tokio::sync::watch::channel(None);
        let pack: Arc<dyn OpenPack> = Arc::from(current.pack);
        let sealing = Arc::new(Sealing {
            pack: pack.clone(),
            chunks: current.chunks,
            done,
        });
        self.sealing.lock().expect("the sealing list").push(sealing);
        let index = self.index.clone();
        let list = self.sealing.clone();
        let entries = current.entries;
        tokio::spawn(async move {
            let name = pack.name().to_owned();
            let bytes = pack.size();
            let outcome = async {
                if let Err(err) = pack.seal().await {
                    pack.abandon().await;
                    return Err(err);
                }
                index.add_pack(&name, bytes, &entries).await?;
                Ok(())
            }
            .await;
            match &outcome {
                Ok(()) => {
                    tracing::debug!(pack = %name, bytes, chunks = entries.len(), "pack sealed");
                }
                Err(err) => {
                    tracing::warn!(pack = %name, error = %err, "a pack could not be sealed; its chunks are asked for again");
                }
            }
            list.lock()
                .expect("the sealing list")
                .retain(|sealing| sealing.pack.name() != name);
            let _ = tell.send(Some(outcome.map_err(Arc::new)));
        });
    }

    /// Waits until fewer than [`MAX_SEALING`] packs are being sealed.
    async fn make_room(&self) {
        loop {
            let oldest = {
                let list = self.sealing.lock().expect("the sealing list");
                if list.len() < MAX_SEALING {
                    return;
                }
                list[0].done.clone()
            };
            // A failed seal is reported to those who persist; here it only frees room.
            let _ = sealed(oldest).await;
        }
    }

    /// A chunk's frame as stored, checked to carry its name but not its bytes. A chunk
    /// whose bytes an open pack sent on already has that pack sealed now, and is read
    /// from where it rests once the seal is done.
    async fn read_stored(&self, hash: &ChunkHash) -> Result<Frame, BlobError> {
        {
            let mut open = self.open.lock().await;
            if let Some(current) = open.as_ref() {
                if let Some(&(offset, len)) = current.chunks.get(hash) {
                    let range = offset..offset + u64::from(len);
                    if let Some(bytes) = current.pack.read(range).await? {
                        return parse_frame(hash, current.pack.name(), bytes);
                    }
                    tracing::debug!(pack = %current.pack.name(), chunk = %hash, "a chunk whose bytes were sent on is read: its pack is sealed now");
                    self.make_room().await;
                    self.start_seal(&mut open).await;
                }
            }
        }
        for sealing in self.sealing_now() {
            if let Some(&(offset, len)) = sealing.chunks.get(hash) {
                let range = offset..offset + u64::from(len);
                if let Some(bytes) = sealing.pack.read(range).await? {
                    return parse_frame(hash, sealing.pack.name(), bytes);
                }
                // Indexed once sealed; not found if the seal failed.
                let _ = sealed(sealing.done.clone()).await;
                break;
            }
        }
        let location = self.index.locate(&[*hash]).await?.pop().flatten();
        let location = location.ok_or_else(|| BlobError::NotFound(format!("chunk {hash}")))?;
        self.read_at(hash, location).await
    }

    /// Reads a chunk from where the index said; looks again once if its pack went
    /// away meanwhile (compaction moved it).
    async fn read_at(&self, hash: &ChunkHash, location: ChunkLocation) -> Result<Frame, BlobError> {
        match self.read_location(hash, &location).await {
            Err(BlobError::NotFound(_)) => {
                let again = self.index.locate(&[*hash]).await?.pop().flatten();
                match again {
                    Some(moved) if moved != location => self.read_location(hash, &moved).await,
                    _ => Err(BlobError::NotFound(format!("chunk {hash}"))),
                }
            }
            other => other,
        }
    }

    async fn read_location(
        &self,
        hash: &ChunkHash,
        location: &ChunkLocation,
    ) -> Result<Frame, BlobError> {
        let range = location.offset..location.offset + u64::from(location.len);
        let bytes = self.files.read(&location.pack, range).await?;
        parse_frame(hash, &location.pack, bytes)
    }
}

/// Takes the frame of `hash` apart from the bytes at its place in `pack`.
fn parse_frame(hash: &ChunkHash, pack: &str, bytes: Bytes) -> Result<Frame, BlobError> {
    let damaged = |why: String| BlobError::Damaged(format!("chunk {hash} in pack {pack}: {why}"));
    let mut reader = FrameReader::new();
    reader.push(&bytes);
    let frame = reader
        .next_frame()
        .map_err(|err| damaged(err.to_string()))?
        .ok_or_else(|| damaged(format!("{} bytes are not a whole frame", bytes.len())))?;
    reader.finish().map_err(|err| damaged(err.to_string()))?;
    if frame.hash != *hash {
        return Err(damaged(format!("the frame there is named {}", frame.hash)));
    }
    Ok(frame)
}

/// Checks a stored frame's bytes against its name.
fn verified(frame: Frame) -> Result<Frame, BlobError> {
    frame
        .decode()
        .map_err(|err| BlobError::Damaged(err.to_string()))?;
    Ok(frame)
}

impl PackChunkStore {
    /// Those of `hashes` the index does not hold, asked in batches.
    async fn unindexed(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
        let mut missing = Vec::new();
        for batch in hashes.chunks(4096) {
            let found = self.index.locate(batch).await?;
            missing.extend(
                batch
                    .iter()
                    .zip(found)
                    .filter(|(_, location)| location.is_none())
                    .map(|(hash, _)| *hash),
            );
        }
        Ok(missing)
    }
}

#[async_trait]
impl ChunkStore for PackChunkStore {
    async fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
        // The open pack is looked at under its lock, then the packs being sealed, then
        // the index before the lock is let go: a seal records its index entries before
        // it leaves the sealing list, so a chunk is found in one of the three.
        let open = self.open.lock().await;
        let sealing = self.sealing_now();
        let not_open: Vec<ChunkHash> = ChunkHash::distinct(hashes)
            .into_iter()
            .filter(|hash| !held(&open, &sealing, hash))
            .collect();
        let missing = self.unindexed(&not_open).await?;
        drop(open);
        Ok(missing)
    }

    /// Only the index counts: a chunk in the open pack is not durable yet, and one
    /// whose pack failed to seal (another caller's persist, say) is in neither.
    async fn not_persisted(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
        self.unindexed(&ChunkHash::distinct(hashes)).await
    }

    async fn put(&self, frames: Vec<Frame>) -> Result<PutStats, BlobError> {
        let mut open = self.open.lock().await;
        let sealing = self.sealing_now();
        let mut seen = HashSet::with_capacity(frames.len());
        let fresh: Vec<Frame> = frames
            .into_iter()
            .filter(|frame| seen.insert(frame.hash) && !held(&open, &sealing, &frame.hash))
            .collect();
        drop(sealing);
        let hashes: Vec<ChunkHash> = fresh.iter().map(|frame| frame.hash).collect();
        let mut indexed = HashSet::new();
        for batch in hashes.chunks(4096) {
            let found = self.index.locate(batch).await?;
            indexed.extend(
                batch
                    .iter()
                    .zip(found)
                    .filter(|(_, location)| location.is_some())
                    .map(|(hash, _)| *hash),
            );
        }
        let mut stats = PutStats::default();
        let target = self.files.target_pack_bytes();
        let mut pieces = Vec::new();
        let mut pending: Vec<PackedChunk> = Vec::new();
        for frame in fresh {
            if indexed.contains(&frame.hash) {
                continue;
            }
            if open.is_none() {
                *open = Some(Open {
                    pack: self.files.begin().await?,
                    chunks: HashMap::new(),
                    entries: Vec::new(),
                });
            }
            let current = open.as_mut().expect("an open pack");
            let offset =
                current.pack.size() + pending.iter().map(|c| u64::from(c.len)).sum::<u64>();
            let mut header = Vec::with_capacity(crate::frames::FRAME_HEADER_BYTES);
            header.extend_from_slice(&frame.hash.0);
            frame.write_header_to(&mut header);
            let len = frame.wire_len() as u32;
            pieces.push(Bytes::from(header));
            pieces.push(frame.data.clone());
            pending.push(PackedChunk {
                hash: frame.hash,
                offset,
                len,
            });
            stats.new_chunks += 1;
            stats.new_bytes += u64::from(len);
            let full = offset + u64::from(len) >= target;
            if full {
                if let Err(err) = flush_pending(current, &mut pieces, &mut pending).await {
                    give_up(&mut open).await;
                    return Err(err);
                }
                self.make_room().await;
                self.start_seal(&mut open).await;
            }
        }
        if let Some(current) = open.as_mut() {
            if let Err(err) = flush_pending(current, &mut pieces, &mut pending).await {
                give_up(&mut open).await;
                return Err(err);
            }
        }
        Ok(stats)
    }

    /// Seals the open pack (once there is room) and waits for every pack being
    /// sealed; the first failure among them is the answer (their chunks are then in no
    /// pack: `not_persisted` names them).
    async fn persist(&self) -> Result<(), BlobError> {
        let waits: Vec<_> = {
            let mut open = self.open.lock().await;
            if open.is_some() {
                self.make_room().await;
            }
            self.start_seal(&mut open).await;
            self.sealing_now()
                .iter()
                .map(|sealing| sealing.done.clone())
                .collect()
        };
        let mut failed = None;
        for done in waits {
            if let Err(err) = sealed(done).await {
                failed.get_or_insert(err);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    async fn read_frame(&self, hash: &ChunkHash) -> Result<Frame, BlobError> {
        verified(self.read_stored(hash).await?)
    }

    async fn list_page(
        &self,
        after: Option<ChunkHash>,
        limit: usize,
    ) -> Result<Vec<StoredChunk>, BlobError> {
        self.index.list(after, limit).await
    }

    async fn remove(&self, hashes: &[ChunkHash]) -> Result<u64, BlobError> {
        self.index
            .remove_unpinned(hashes, kiln_common::now_micros())
            .await
    }

    async fn remove_unpinned_since(
        &self,
        hashes: &[ChunkHash],
        since: i64,
    ) -> Result<u64, BlobError> {
        self.index.remove_unpinned(hashes, since).await
    }

    async fn compact(&self, live_share: f64) -> Result<CompactStats, BlobError> {
        let mut stats = CompactStats::default();
        for usage in self.index.sparse_packs(live_share).await? {
            let chunks = self.index.pack_chunks(&usage.pack).await?;
            let mut new = None;
            if !chunks.is_empty() {
                let mut pack = self.files.begin().await?;
                let mut copied = Vec::with_capacity(chunks.len());
                for chunk in &chunks {
                    let range = chunk.offset..chunk.offset + u64::from(chunk.len);
                    let bytes = match self.files.read(&usage.pack, range).await {
                        Ok(bytes) => bytes,
                        Err(err) => {
                            pack.abandon().await;
                            return Err(err);
                        }
                    };
                    // A damaged frame is not copied on: its entry stays with the old
                    // pack, which is then kept, and reads of it are refused.
                    if parse_frame(&chunk.hash, &usage.pack, bytes.clone())
                        .and_then(verified)
                        .is_err()
                    {
                        tracing::error!(chunk = %chunk.hash, pack = %usage.pack, "damaged chunk left in place");
                        continue;
                    }
                    copied.push(PackedChunk {
                        hash: chunk.hash,
                        offset: pack.size(),
                        len: chunk.len,
                    });
                    if let Err(err) = pack.append(vec![bytes]).await {
                        pack.abandon().await;
                        return Err(err);
                    }
                }
                let name = pack.name().to_owned();
                let bytes = pack.size();
                pack.seal().await?;
                stats.bytes_written += bytes;
                new = Some((name, bytes, copied));
            }
            let forgotten = self
                .index
                .replace_pack(
                    &usage.pack,
                    new.as_ref()
                        .map(|(name, bytes, copied)| (name.as_str(), *bytes, copied.as_slice())),
                )
                .await?;
            if forgotten {
                self.files.remove(&usage.pack).await?;
                stats.packs_rewritten += 1;
                stats.bytes_freed += usage.bytes;
            }
        }
        Ok(stats)
    }

    fn read_frames(&self, hashes: Vec<ChunkHash>) -> BoxStream<'_, Result<Frame, BlobError>> {
        // Looked up a batch at a time, then read a few ahead.
        let batches: Vec<Vec<ChunkHash>> = hashes
            .chunks(LOCATE_BATCH)
            .map(|batch| batch.to_vec())
            .collect();
        futures::stream::iter(batches)
            .then(move |batch| async move {
                let located = self.index.locate(&batch).await;
                let items: Vec<Result<(ChunkHash, Option<ChunkLocation>), BlobError>> =
                    match located {
                        Ok(located) => batch.into_iter().zip(located).map(Ok).collect(),
                        Err(err) => vec![Err(err)],
                    };
                futures::stream::iter(items)
            })
            .flatten()
            .map(move |item| async move {
                let (hash, location) = item?;
                let frame = match location {
                    Some(location) => self.read_at(&hash, location).await?,
                    None => self.read_stored(&hash).await?,
                };
                verified(frame)
            })
            .buffered(READ_AHEAD)
            .boxed()
    }

    async fn read(&self, hash: &ChunkHash) -> Result<Bytes, BlobError> {
        self.read_stored(hash)
            .await?
            .decode()
            .map_err(|err| BlobError::Damaged(err.to_string()))
    }

    async fn read_unchecked(&self, hash: &ChunkHash) -> Result<Bytes, BlobError> {
        self.read_stored(hash)
            .await?
            .decompress()
            .map_err(|err| BlobError::Damaged(err.to_string()))
    }
}

/// Whether `hash` is in the open pack or in a pack being sealed.
fn held(open: &Option<Open>, sealing: &[Arc<Sealing>], hash: &ChunkHash) -> bool {
    open.as_ref()
        .is_some_and(|current| current.chunks.contains_key(hash))
        || sealing.iter().any(|pack| pack.chunks.contains_key(hash))
}

/// Waits for a pack's seal to end; its failure, if it failed.
async fn sealed(mut done: tokio::sync::watch::Receiver<SealOutcome>) -> Result<(), BlobError> {
    let outcome = match done.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone(),
        Err(_) => None,
    };
    match outcome {
        Some(Ok(())) => Ok(()),
        Some(Err(err)) => Err(err.again()),
        None => Err(BlobError::io(
            "sealing a pack",
            io::Error::other("the seal stopped before its end"),
        )),
    }
}

/// Appends what `put` gathered to the open pack and notes its entries.
async fn flush_pending(
    current: &mut Open,
    pieces: &mut Vec<Bytes>,
    pending: &mut Vec<PackedChunk>,
) -> Result<(), BlobError> {
    if pending.is_empty() {
        return Ok(());
    }
    current.pack.append(std::mem::take(pieces)).await?;
    for chunk in pending.drain(..) {
        current.chunks.insert(chunk.hash, (chunk.offset, chunk.len));
        current.entries.push(chunk);
    }
    Ok(())
}

/// Gives the open pack up whole after an append failed (its tail is unknown now):
/// its chunks are sent again when a commit names them missing.
async fn give_up(open: &mut Option<Open>) {
    if let Some(current) = open.take() {
        current.pack.abandon().await;
    }
}

/// What [`ChunkStore::compact`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactStats {
    /// Packs rewritten (or deleted, when nothing in them was live).
    pub packs_rewritten: u64,
    /// Bytes of the packs deleted.
    pub bytes_freed: u64,
    /// Bytes of the packs written in their place.
    pub bytes_written: u64,
}

/// Packs as files `DIR/<name>.pack`; a pack being written is `DIR/<name>.part`.
#[derive(Debug, Clone)]
pub struct LocalPackFiles {
    dir: PathBuf,
    target_pack_bytes: u64,
}

/// The size a local pack is sealed at.
pub const LOCAL_PACK_BYTES: u64 = 32 << 20;

impl LocalPackFiles {
    /// Opens (creating) the directory and removes packs a crash left half-written:
    /// nothing else writes here while the server that owns the directory starts.
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        std::fs::create_dir_all(dir)
            .map_err(|err| BlobError::io(format!("creating {}", dir.display()), err))?;
        let entries = std::fs::read_dir(dir)
            .map_err(|err| BlobError::io(format!("listing {}", dir.display()), err))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".part") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(LocalPackFiles {
            dir: dir.to_owned(),
            target_pack_bytes: LOCAL_PACK_BYTES,
        })
    }

    /// The same, sealing packs at `bytes` (tests use small packs).
    pub fn with_target_pack_bytes(mut self, bytes: u64) -> Self {
        self.target_pack_bytes = bytes.max(1);
        self
    }

    fn path_of(&self, pack: &str) -> Result<PathBuf, BlobError> {
        if !is_pack_name(pack) {
            return Err(BlobError::InvalidKey(pack.to_owned()));
        }
        Ok(self.dir.join(format!("{pack}.pack")))
    }
}

/// Runs file work on a blocking thread.
async fn on_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, BlobError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| BlobError::io("pack file task", io::Error::other(err)))?
}

#[async_trait]
impl PackFiles for LocalPackFiles {
    async fn begin(&self) -> Result<Box<dyn OpenPack>, BlobError> {
        let name = new_pack_name();
        let part = self.dir.join(format!("{name}.part"));
        let target = self.dir.join(format!("{name}.pack"));
        let dir = self.dir.clone();
        let file = on_blocking({
            let part = part.clone();
            move || {
                let file = std::fs::File::create_new(&part)
                    .and_then(|file| file.write_all_at(PACK_MAGIC, 0).map(|()| file))
                    .map_err(|err| BlobError::io(format!("creating {}", part.display()), err))?;
                Ok(file)
            }
        })
        .await?;
        Ok(Box::new(LocalOpenPack {
            name,
            dir,
            part,
            target,
            file: Arc::new(file),
            len: PACK_MAGIC.len() as u64,
        }))
    }

    async fn read(&self, pack: &str, range: Range<u64>) -> Result<Bytes, BlobError> {
        let path = self.path_of(pack)?;
        let pack = pack.to_owned();
        on_blocking(move || {
            let file = std::fs::File::open(&path).map_err(|err| {
                if err.kind() == io::ErrorKind::NotFound {
                    BlobError::NotFound(format!("pack {pack}"))
                } else {
                    BlobError::io(format!("opening {}", path.display()), err)
                }
            })?;
            let mut bytes = vec![0u8; (range.end - range.start) as usize];
            file.read_exact_at(&mut bytes, range.start).map_err(|err| {
                if err.kind() == io::ErrorKind::UnexpectedEof {
                    BlobError::Damaged(format!("pack {pack} is shorter than its index says"))
                } else {
                    BlobError::io(format!("reading {}", path.display()), err)
                }
            })?;
            Ok(Bytes::from(bytes))
        })
        .await
    }

    async fn remove(&self, pack: &str) -> Result<(), BlobError> {
        let path = self.path_of(pack)?;
        on_blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(BlobError::io(format!("deleting {}", path.display()), err)),
        })
        .await
    }

    fn target_pack_bytes(&self) -> u64 {
        self.target_pack_bytes
    }

    async fn store_id(&self) -> Result<Option<String>, BlobError> {
        let path = self.dir.join(STORE_ID_NAME);
        on_blocking(move || match std::fs::read(&path) {
            Ok(bytes) => parse_store_id(&bytes, &path.display().to_string()).map(Some),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(BlobError::io(format!("reading {}", path.display()), err)),
        })
        .await
    }

    async fn claim_store_id(&self, id: &str) -> Result<String, BlobError> {
        let dir = self.dir.clone();
        let id = id.to_owned();
        on_blocking(move || {
            let path = dir.join(STORE_ID_NAME);
            // Written whole and synced under a name of its own, then linked into place:
            // the link fails when another server's id got there first.
            let part = dir.join(format!(".{STORE_ID_NAME}.{}.part", new_store_id()));
            let written = std::fs::File::create_new(&part).and_then(|file| {
                file.write_all_at(format!("{id}\n").as_bytes(), 0)?;
                file.sync_all()
            });
            let linked = written.and_then(|()| std::fs::hard_link(&part, &path));
            let _ = std::fs::remove_file(&part);
            match linked {
                Ok(()) => {
                    kiln_common::fs::sync_dir(&dir)
                        .map_err(|err| BlobError::io(format!("syncing {}", dir.display()), err))?;
                    Ok(id)
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    let bytes = std::fs::read(&path)
                        .map_err(|err| BlobError::io(format!("reading {}", path.display()), err))?;
                    parse_store_id(&bytes, &path.display().to_string())
                }
                Err(err) => Err(BlobError::io(format!("writing {}", path.display()), err)),
            }
        })
        .await
    }
}

/// A local pack being written.
struct LocalOpenPack {
    name: String,
    dir: PathBuf,
    part: PathBuf,
    target: PathBuf,
    file: Arc<std::fs::File>,
    len: u64,
}

#[async_trait]
impl OpenPack for LocalOpenPack {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.len
    }

    async fn append(&mut self, pieces: Vec<Bytes>) -> Result<(), BlobError> {
        let file = self.file.clone();
        let start = self.len;
        let part = self.part.clone();
        let written = on_blocking(move || {
            let mut offset = start;
            for piece in &pieces {
                file.write_all_at(piece, offset)
                    .map_err(|err| BlobError::io(format!("writing {}", part.display()), err))?;
                offset += piece.len() as u64;
            }
            Ok(offset - start)
        })
        .await?;
        self.len += written;
        Ok(())
    }

    async fn read(&self, range: Range<u64>) -> Result<Option<Bytes>, BlobError> {
        let file = self.file.clone();
        let part = self.part.clone();
        on_blocking(move || {
            let mut bytes = vec![0u8; (range.end - range.start) as usize];
            file.read_exact_at(&mut bytes, range.start)
                .map_err(|err| BlobError::io(format!("reading {}", part.display()), err))?;
            Ok(Some(Bytes::from(bytes)))
        })
        .await
    }

    async fn seal(&self) -> Result<(), BlobError> {
        let file = self.file.clone();
        let (part, target, dir) = (self.part.clone(), self.target.clone(), self.dir.clone());
        on_blocking(move || {
            let failed = |err| BlobError::io(format!("sealing {}", part.display()), err);
            file.sync_data().map_err(failed)?;
            std::fs::rename(&part, &target).map_err(failed)?;
            std::fs::File::open(&dir)
                .and_then(|dir| dir.sync_all())
                .map_err(failed)?;
            Ok(())
        })
        .await
    }

    async fn abandon(&self) {
        let _ = tokio::fs::remove_file(&self.part).await;
    }
}

/// A pack index in memory: for tests, and for tools that rebuild one.
#[derive(Default)]
pub struct MemoryPackIndex {
    state: Mutex<MemoryIndex>,
}

#[derive(Default)]
struct MemoryIndex {
    packs: HashMap<String, u64>,
    chunks: std::collections::BTreeMap<ChunkHash, ChunkLocation>,
    /// Pinned chunks, until when (unix microseconds).
    pins: HashMap<ChunkHash, i64>,
}

impl MemoryPackIndex {
    /// Pins `hashes` until `until` (unix microseconds).
    pub fn pin(&self, hashes: &[ChunkHash], until: i64) {
        let mut state = self.state.lock().expect("index lock");
        for hash in hashes {
            let pinned = state.pins.entry(*hash).or_insert(until);
            *pinned = (*pinned).max(until);
        }
    }

    /// Drops every pin.
    pub fn unpin_all(&self) {
        self.state.lock().expect("index lock").pins.clear();
    }
}

#[async_trait]
impl PackIndex for MemoryPackIndex {
    async fn add_pack(
        &self,
        pack: &str,
        bytes: u64,
        chunks: &[PackedChunk],
    ) -> Result<u64, BlobError> {
        let mut state = self.state.lock().expect("index lock");
        state.packs.insert(pack.to_owned(), bytes);
        let mut added = 0;
        for chunk in chunks {
            if let std::collections::btree_map::Entry::Vacant(vacant) =
                state.chunks.entry(chunk.hash)
            {
                vacant.insert(ChunkLocation {
                    pack: pack.to_owned(),
                    offset: chunk.offset,
                    len: chunk.len,
                });
                added += 1;
            }
        }
        Ok(added)
    }

    async fn locate(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<ChunkLocation>>, BlobError> {
        let state = self.state.lock().expect("index lock");
        Ok(hashes
            .iter()
            .map(|hash| state.chunks.get(hash).cloned())
            .collect())
    }

    async fn list(
        &self,
        after: Option<ChunkHash>,
        limit: usize,
    ) -> Result<Vec<StoredChunk>, BlobError> {
        let state = self.state.lock().expect("index lock");
        Ok(state
            .chunks
            .iter()
            .filter(|(hash, _)| after.is_none_or(|after| **hash > after))
            .take(limit)
            .map(|(hash, location)| StoredChunk {
                hash: *hash,
                bytes: u64::from(location.len),
            })
            .collect())
    }

    async fn remove_unpinned(&self, hashes: &[ChunkHash], since: i64) -> Result<u64, BlobError> {
        let mut state = self.state.lock().expect("index lock");
        let mut freed = 0;
        for hash in hashes {
            if state.pins.get(hash).is_some_and(|until| *until > since) {
                continue;
            }
            if let Some(location) = state.chunks.remove(hash) {
                freed += u64::from(location.len);
            }
        }
        Ok(freed)
    }

    async fn sparse_packs(&self, live_share: f64) -> Result<Vec<PackUsage>, BlobError> {
        let state = self.state.lock().expect("index lock");
        let mut live: HashMap<&str, u64> = HashMap::new();
        for location in state.chunks.values() {
            *live.entry(location.pack.as_str()).or_default() += u64::from(location.len);
        }
        let mut sparse: Vec<PackUsage> = state
            .packs
            .iter()
            .map(|(pack, bytes)| PackUsage {
                pack: pack.clone(),
                bytes: *bytes,
                live_bytes: live.get(pack.as_str()).copied().unwrap_or(0),
            })
            .filter(|usage| (usage.live_bytes as f64) < usage.bytes as f64 * live_share)
            .collect();
        sparse.sort_by(|a, b| a.pack.cmp(&b.pack));
        Ok(sparse)
    }

    async fn pack_chunks(&self, pack: &str) -> Result<Vec<PackedChunk>, BlobError> {
        let state = self.state.lock().expect("index lock");
        let mut chunks: Vec<PackedChunk> = state
            .chunks
            .iter()
            .filter(|(_, location)| location.pack == pack)
            .map(|(hash, location)| PackedChunk {
                hash: *hash,
                offset: location.offset,
                len: location.len,
            })
            .collect();
        chunks.sort_by_key(|chunk| chunk.offset);
        Ok(chunks)
    }

    async fn replace_pack(
        &self,
        old: &str,
        new: Option<(&str, u64, &[PackedChunk])>,
    ) -> Result<bool, BlobError> {
        let mut state = self.state.lock().expect("index lock");
        if let Some((name, bytes, chunks)) = new {
            state.packs.insert(name.to_owned(), bytes);
            for chunk in chunks {
                if let Some(location) = state.chunks.get_mut(&chunk.hash) {
                    if location.pack == old {
                        *location = ChunkLocation {
                            pack: name.to_owned(),
                            offset: chunk.offset,
                            len: chunk.len,
                        };
                    }
                }
            }
        }
        let in_use = state.chunks.values().any(|location| location.pack == old);
        if !in_use {
            state.packs.remove(old);
        }
        Ok(!in_use)
    }
}

/// Moves the chunks of a directory in the one-file-per-chunk layout (`DIR/ab/<hash>`)
/// into `store`, a batch at a time: each batch is stored and persisted before its
/// files are deleted, so an interrupted conversion starts again where it stopped.
/// Damaged chunk files are left where they are and counted. Returns the chunks moved
/// and the damaged ones.
pub async fn convert_chunk_files(
    dir: &Path,
    store: &dyn ChunkStore,
) -> Result<(u64, u64), BlobError> {
    if !dir.exists() {
        return Ok((0, 0));
    }
    let old = crate::chunks::LocalChunkStore::open(dir)?;
    let mut moved = 0u64;
    let mut damaged = 0u64;
    let mut after = None;
    loop {
        let page = old.list_page(after, 1024).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.hash);
        let mut frames = Vec::with_capacity(page.len());
        let mut done = Vec::with_capacity(page.len());
        for chunk in &page {
            match old.read_frame(&chunk.hash).await {
                Ok(frame) => {
                    done.push(chunk.hash);
                    frames.push(frame);
                }
                Err(err) => {
                    tracing::error!(chunk = %chunk.hash, cause = %err, "damaged chunk file left in place");
                    damaged += 1;
                }
            }
        }
        store.put(frames).await?;
        store.persist().await?;
        old.remove(&done).await?;
        moved += done.len() as u64;
    }
    if damaged == 0 {
        // The shard directories, empty now; a failure leaves them, which is harmless.
        for shard in 0..=255u8 {
            let _ = std::fs::remove_dir(dir.join(hex::encode([shard])));
        }
        let _ = std::fs::remove_dir(dir);
    }
    Ok((moved, damaged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::noise;

    fn store_in(dir: &Path, pack_bytes: u64) -> (Arc<MemoryPackIndex>, PackChunkStore) {
        let index = Arc::new(MemoryPackIndex::default());
        let files = LocalPackFiles::open(dir)
            .unwrap()
            .with_target_pack_bytes(pack_bytes);
        let store = PackChunkStore::new(Arc::new(files), index.clone());
        (index, store)
    }

    fn packs_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `n` frames of `size` random bytes each (seeds 0..n), with their names.
    fn noise_frames(n: u64, size: usize) -> (Vec<Frame>, Vec<ChunkHash>) {
        let frames: Vec<Frame> = (0..n)
            .map(|seed| Frame::encode(&noise(size, seed)))
            .collect();
        let hashes = frames.iter().map(|frame| frame.hash).collect();
        (frames, hashes)
    }

    /// Local packs whose seals fail while `fail` is set, as an object store that went
    /// away would, and wait for a permit of `gate` first, as a slow one would.
    struct ControlledSeals {
        inner: LocalPackFiles,
        fail: Arc<std::sync::atomic::AtomicBool>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl ControlledSeals {
        /// Seals that pass at once and succeed.
        fn new(inner: LocalPackFiles) -> Self {
            ControlledSeals {
                inner,
                fail: Arc::default(),
                gate: Arc::new(tokio::sync::Semaphore::new(
                    tokio::sync::Semaphore::MAX_PERMITS,
                )),
            }
        }
    }

    struct ControlledOpen {
        inner: Box<dyn OpenPack>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    #[async_trait]
    impl OpenPack for ControlledOpen {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        async fn append(&mut self, pieces: Vec<Bytes>) -> Result<(), BlobError> {
            self.inner.append(pieces).await
        }
        async fn read(&self, range: Range<u64>) -> Result<Option<Bytes>, BlobError> {
            self.inner.read(range).await
        }
        async fn seal(&self) -> Result<(), BlobError> {
            self.gate.acquire().await.expect("the gate").forget();
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(crate::chunks::lost_with_a_pack(0));
            }
            self.inner.seal().await
        }
        async fn abandon(&self) {
            self.inner.abandon().await
        }
    }

    #[async_trait]
    impl PackFiles for ControlledSeals {
        async fn begin(&self) -> Result<Box<dyn OpenPack>, BlobError> {
            Ok(Box::new(ControlledOpen {
                inner: self.inner.begin().await?,
                fail: self.fail.clone(),
                gate: self.gate.clone(),
            }))
        }
        async fn read(&self, pack: &str, range: Range<u64>) -> Result<Bytes, BlobError> {
            self.inner.read(pack, range).await
        }
        async fn remove(&self, pack: &str) -> Result<(), BlobError> {
            self.inner.remove(pack).await
        }
        fn target_pack_bytes(&self) -> u64 {
            self.inner.target_pack_bytes()
        }
        async fn store_id(&self) -> Result<Option<String>, BlobError> {
            self.inner.store_id().await
        }
        async fn claim_store_id(&self, id: &str) -> Result<String, BlobError> {
            self.inner.claim_store_id(id).await
        }
    }

    #[tokio::test]
    async fn a_local_store_id_is_claimed_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let files = LocalPackFiles::open(dir.path()).unwrap();
        assert_eq!(files.store_id().await.unwrap(), None);
        let (first, second) = (new_store_id(), new_store_id());
        assert_eq!(files.claim_store_id(&first).await.unwrap(), first);
        // A second claim, as a second server starting at once makes, gets the first id.
        assert_eq!(files.claim_store_id(&second).await.unwrap(), first);
        let reopened = LocalPackFiles::open(dir.path()).unwrap();
        assert_eq!(reopened.store_id().await.unwrap(), Some(first));
        // Nothing of the claims is left beside the packs but the id.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, [STORE_ID_NAME]);
        std::fs::write(dir.path().join(STORE_ID_NAME), "not an id\n").unwrap();
        let err = reopened.store_id().await.unwrap_err().to_string();
        assert!(err.contains("does not hold a store id"), "{err}");
    }

    #[tokio::test]
    async fn chunks_that_went_down_with_another_callers_failed_seal_are_not_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let files = ControlledSeals::new(LocalPackFiles::open(dir.path()).unwrap());
        let fail = files.fail.clone();
        let store = PackChunkStore::new(Arc::new(files), Arc::new(MemoryPackIndex::default()));
        let mine = Frame::encode(&noise(50_000, 1));
        let theirs = Frame::encode(&noise(50_000, 2));
        store.put(vec![mine.clone()]).await.unwrap();
        store.put(vec![theirs.clone()]).await.unwrap();
        // The other caller persists while the store is failing: the shared open pack,
        // with my chunk in it, is lost.
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(store.persist().await.is_err());
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        // My persist finds nothing open and succeeds; my chunk is not persisted.
        store.persist().await.unwrap();
        assert_eq!(
            store.not_persisted(&[mine.hash]).await.unwrap(),
            vec![mine.hash]
        );
        assert_eq!(store.missing(&[mine.hash]).await.unwrap(), vec![mine.hash]);
        // Sent again, it is.
        store.put(vec![mine.clone()]).await.unwrap();
        assert_eq!(store.missing(&[mine.hash]).await.unwrap(), vec![]);
        assert_eq!(
            store.not_persisted(&[mine.hash]).await.unwrap(),
            vec![mine.hash],
            "in the open pack, not yet durable"
        );
        store.persist().await.unwrap();
        assert!(store.not_persisted(&[mine.hash]).await.unwrap().is_empty());
    }

    /// Lets every task on this (one-threaded) test runtime run until it waits.
    async fn let_others_run() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    /// A store over local packs of 100 KB in `dir` whose seals wait at a closed gate;
    /// with the gate and the switch that makes seals fail.
    fn gated_store(
        dir: &Path,
    ) -> (
        Arc<PackChunkStore>,
        Arc<tokio::sync::Semaphore>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let mut files = ControlledSeals::new(
            LocalPackFiles::open(dir)
                .unwrap()
                .with_target_pack_bytes(100_000),
        );
        files.gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (gate, fail) = (files.gate.clone(), files.fail.clone());
        let store = PackChunkStore::new(Arc::new(files), Arc::new(MemoryPackIndex::default()));
        (Arc::new(store), gate, fail)
    }

    #[tokio::test]
    async fn a_full_pack_is_sealed_while_puts_go_on_and_persist_waits_for_the_seal() {
        let dir = tempfile::tempdir().unwrap();
        let (store, gate, _) = gated_store(dir.path());
        let (frames, hashes) = noise_frames(4, 60_000);
        // Two 60 KB frames fill a 100 KB pack: this put fills one, and returns while
        // it waits to be sealed.
        store.put(frames[..2].to_vec()).await.unwrap();
        let parts = packs_in(dir.path());
        assert_eq!(parts.len(), 1, "{parts:?}");
        assert!(parts[0].ends_with(".part"), "{parts:?}");
        // Meanwhile its chunks are present and readable, but not durable.
        assert!(store.missing(&hashes[..2]).await.unwrap().is_empty());
        for frame in &frames[..2] {
            assert_eq!(
                store.read(&frame.hash).await.unwrap(),
                frame.decode().unwrap()
            );
        }
        assert_eq!(
            store.not_persisted(&hashes[..2]).await.unwrap(),
            &hashes[..2]
        );
        // A second full pack waits for room, and a persist for the seals.
        let second = tokio::spawn({
            let store = store.clone();
            let frames = frames[2..].to_vec();
            async move { store.put(frames).await }
        });
        let_others_run().await;
        let persisting = tokio::spawn({
            let store = store.clone();
            async move { store.persist().await }
        });
        let_others_run().await;
        assert!(!second.is_finished(), "a pack is being sealed already");
        assert!(!persisting.is_finished(), "no seal has ended");
        gate.add_permits(3);
        second.await.unwrap().unwrap();
        persisting.await.unwrap().unwrap();
        store.persist().await.unwrap();
        assert!(store.not_persisted(&hashes).await.unwrap().is_empty());
        let packs = packs_in(dir.path());
        assert_eq!(packs.len(), 2, "{packs:?}");
        assert!(
            packs.iter().all(|name| name.ends_with(".pack")),
            "{packs:?}"
        );
    }

    #[tokio::test]
    async fn a_background_seal_that_fails_is_reported_by_persist_and_its_chunks_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store, gate, fail) = gated_store(dir.path());
        let (frames, hashes) = noise_frames(2, 60_000);
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        // The put fills a pack and answers before its seal fails.
        store.put(frames.clone()).await.unwrap();
        let persisting = tokio::spawn({
            let store = store.clone();
            async move { store.persist().await }
        });
        let_others_run().await;
        gate.add_permits(10);
        let err = persisting.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("lost"), "{err}");
        assert_eq!(store.missing(&hashes).await.unwrap(), hashes);
        assert_eq!(store.not_persisted(&hashes).await.unwrap(), hashes);
        assert!(
            packs_in(dir.path()).is_empty(),
            "the failed pack is removed"
        );
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        store.put(frames).await.unwrap();
        store.persist().await.unwrap();
        assert!(store.not_persisted(&hashes).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn chunks_go_into_packs_found_after_persist_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (index, store) = store_in(dir.path(), 200_000);
        let (frames, hashes) = noise_frames(10, 50_000);
        assert_eq!(store.missing(&hashes).await.unwrap(), hashes);
        let stats = store.put(frames.clone()).await.unwrap();
        assert_eq!(stats.new_chunks, 10);
        // Present for this store at once, whether sealed yet or not.
        assert!(store.missing(&hashes).await.unwrap().is_empty());
        for frame in &frames {
            assert_eq!(
                store.read(&frame.hash).await.unwrap(),
                frame.decode().unwrap()
            );
        }
        store.persist().await.unwrap();
        let packs = packs_in(dir.path());
        assert!(
            packs.len() >= 3 && packs.iter().all(|name| name.ends_with(".pack")),
            "50 KB chunks in 200 KB packs: {packs:?}"
        );
        let located = index.locate(&hashes).await.unwrap();
        assert!(located.iter().all(Option::is_some), "all indexed");
        // The same chunks again store nothing.
        assert_eq!(
            store.put(frames.clone()).await.unwrap(),
            PutStats::default()
        );
        let read: Vec<ChunkHash> = store
            .read_frames(hashes.clone())
            .map(|frame| frame.unwrap().hash)
            .collect()
            .await;
        assert_eq!(read, hashes);
    }

    #[tokio::test]
    async fn a_damaged_pack_is_reported_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let (index, store) = store_in(dir.path(), 1 << 20);
        let frame = Frame::encode(&noise(40_000, 5));
        store.put(vec![frame.clone()]).await.unwrap();
        store.persist().await.unwrap();
        let location = index.locate(&[frame.hash]).await.unwrap()[0]
            .clone()
            .unwrap();
        let path = dir.path().join(format!("{}.pack", location.pack));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        for err in [
            store.read(&frame.hash).await.unwrap_err(),
            store.read_frame(&frame.hash).await.unwrap_err(),
            store
                .read_frames(vec![frame.hash])
                .next()
                .await
                .unwrap()
                .unwrap_err(),
        ] {
            assert!(matches!(err, BlobError::Damaged(_)), "{err}");
        }
        // Cut short: the frame is not whole.
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        assert!(matches!(
            store.read(&frame.hash).await.unwrap_err(),
            BlobError::Damaged(_)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_uploads_storing_the_same_chunks_at_once_store_them_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = store_in(dir.path(), 300_000);
        let store = Arc::new(store);
        let frames: Vec<Frame> = (0..40)
            .map(|seed| Frame::encode(&noise(20_000, seed)))
            .collect();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let store = store.clone();
            let frames = frames.clone();
            tasks.push(tokio::spawn(async move {
                let mut stats = PutStats::default();
                for batch in frames.chunks(7) {
                    let added = store.put(batch.to_vec()).await.unwrap();
                    stats.new_chunks += added.new_chunks;
                    stats.new_bytes += added.new_bytes;
                }
                stats
            }));
        }
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap().new_chunks;
        }
        store.persist().await.unwrap();
        assert_eq!(total, 40, "each chunk stored by exactly one writer");
        let on_disk: u64 = packs_in(dir.path())
            .iter()
            .map(|name| std::fs::metadata(dir.path().join(name)).unwrap().len())
            .sum();
        let one_copy: u64 = frames.iter().map(|f| f.wire_len() as u64).sum();
        assert!(
            on_disk < one_copy + 4096,
            "{on_disk} on disk for {one_copy}"
        );
    }

    #[tokio::test]
    async fn removal_skips_pinned_chunks_and_compaction_rewrites_sparse_packs() {
        let dir = tempfile::tempdir().unwrap();
        let (index, store) = store_in(dir.path(), 1 << 20);
        let frames: Vec<Frame> = (0..10)
            .map(|seed| Frame::encode(&noise(30_000, seed)))
            .collect();
        store.put(frames.clone()).await.unwrap();
        store.persist().await.unwrap();
        let [old_pack] = packs_in(dir.path()).try_into().unwrap();
        let doomed: Vec<ChunkHash> = frames[..8].iter().map(|f| f.hash).collect();
        let now = kiln_common::now_micros();
        index.pin(&[frames[0].hash], now + 60_000_000);
        let freed = store.remove(&doomed).await.unwrap();
        assert_eq!(
            freed,
            7 * frames[1].wire_len() as u64,
            "the pinned one stays"
        );
        let stats = store.compact(0.5).await.unwrap();
        assert_eq!(stats.packs_rewritten, 1);
        assert!(!packs_in(dir.path()).contains(&old_pack));
        for frame in [&frames[0], &frames[8], &frames[9]] {
            assert_eq!(
                store.read(&frame.hash).await.unwrap(),
                frame.decode().unwrap()
            );
        }
        assert!(matches!(
            store.read(&frames[3].hash).await,
            Err(BlobError::NotFound(_))
        ));
        // A dense pack is left alone.
        assert_eq!(store.compact(0.5).await.unwrap(), CompactStats::default());
        // Nothing live: the pack is deleted without a new one.
        index.unpin_all();
        let all: Vec<ChunkHash> = frames.iter().map(|f| f.hash).collect();
        store.remove(&all).await.unwrap();
        store.compact(0.5).await.unwrap();
        assert!(packs_in(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_reader_finds_a_chunk_that_compaction_moved_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let (index, store) = store_in(dir.path(), 1 << 20);
        let frames: Vec<Frame> = (0..4)
            .map(|seed| Frame::encode(&noise(30_000, seed)))
            .collect();
        store.put(frames.clone()).await.unwrap();
        store.persist().await.unwrap();
        let before = index.locate(&[frames[3].hash]).await.unwrap()[0]
            .clone()
            .unwrap();
        store
            .remove(&[frames[0].hash, frames[1].hash, frames[2].hash])
            .await
            .unwrap();
        store.compact(0.5).await.unwrap();
        // What a reader that looked before the move would do.
        let frame = store.read_at(&frames[3].hash, before).await.unwrap();
        assert_eq!(frame.decode().unwrap(), frames[3].decode().unwrap());
    }

    #[tokio::test]
    async fn a_half_written_pack_is_removed_at_open_and_never_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let (index, store) = store_in(dir.path(), 1 << 20);
        let frame = Frame::encode(&noise(10_000, 1));
        store.put(vec![frame.clone()]).await.unwrap();
        // A crash now: the pack is still `.part`, nothing indexed.
        drop(store);
        assert!(packs_in(dir.path())[0].ends_with(".part"));
        assert!(index.locate(&[frame.hash]).await.unwrap()[0].is_none());
        let (_, store) = store_in(dir.path(), 1 << 20);
        assert!(packs_in(dir.path()).is_empty());
        assert_eq!(
            store.missing(&[frame.hash]).await.unwrap(),
            vec![frame.hash]
        );
    }

    #[tokio::test]
    async fn chunk_files_of_the_old_layout_are_moved_into_packs() {
        let dir = tempfile::tempdir().unwrap();
        let old_dir = dir.path().join("chunks");
        let old = crate::chunks::LocalChunkStore::open(&old_dir).unwrap();
        let frames: Vec<Frame> = (0..30)
            .map(|seed| Frame::encode(&noise(5_000, seed)))
            .collect();
        old.put(frames.clone()).await.unwrap();
        old.persist().await.unwrap();
        let (_, store) = store_in(&dir.path().join("packs"), 1 << 20);
        let (moved, damaged) = convert_chunk_files(&old_dir, &store).await.unwrap();
        assert_eq!((moved, damaged), (30, 0));
        assert!(!old_dir.exists(), "the old layout is gone once converted");
        for frame in &frames {
            assert_eq!(
                store.read(&frame.hash).await.unwrap(),
                frame.decode().unwrap()
            );
        }
        // Converting again finds nothing to do.
        let again = convert_chunk_files(&old_dir, &store).await.unwrap();
        assert_eq!(again, (0, 0));
    }
}
