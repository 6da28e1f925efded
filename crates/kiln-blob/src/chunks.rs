//! The chunk store: each distinct chunk kept once, compressed, crash-safely.
//!
//! [`ChunkStore`] is what the server needs from wherever chunks rest: async, with
//! paged listing and no file system in its contract. [`LocalChunkStore`] keeps them
//! as files `DIR/ab/abcdef...` holding the chunk's stored form (see
//! [`Frame::write_body_to`]); its file work runs on blocking threads.
//! [`BlockingChunks`] lets code that already runs on a blocking thread (cutting an
//! image, hashing one in order) call a store.
//!
//! The local store's writes are crash-safe a batch at a time: every new chunk of a
//! batch is written to a temporary `.part-*` file beside its final name, the file
//! system is synced once (`syncfs`), and the files are renamed into place. (Temporary
//! files live in the 256 shard directories rather than one directory: creating
//! thousands of files a second in a single directory serialises on its lock.) A file
//! under a chunk's name is therefore always whole, and one sync covers thousands of
//! chunks where an fsync per chunk would cost a journal commit each. The renames
//! become durable at the next [`ChunkStore::persist`], which the server calls before
//! it records an image that lists them: a crash before that loses only chunks no
//! image lists yet, which the client is told are missing and sends again.

use crate::chunking::{chunk_reader_with, ChunkParams, ChunkedFile};
use crate::frames::{ChunkEntry, ChunkHash, Frame};
use crate::packs::CompactStats;
use crate::{BlobError, Digests, ImageHasher};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use rand::RngCore;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

/// What storing a batch of chunks did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutStats {
    /// Chunks that were not stored before.
    pub new_chunks: u64,
    /// Bytes those take at rest.
    pub new_bytes: u64,
}

/// A stored chunk as a listing shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    pub hash: ChunkHash,
    /// Bytes it takes at rest.
    pub bytes: u64,
}

/// How many frames [`ChunkStore::read_frames`] reads ahead by default.
const READ_AHEAD_FRAMES: usize = 8;

/// Where the server keeps chunks.
#[async_trait]
pub trait ChunkStore: Send + Sync + 'static {
    /// Which of `hashes` are not stored, in the order given, each once.
    async fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError>;
    /// Stores chunks already checked against their names ([`Frame::decode`]); the
    /// ones already stored are skipped (two writers of one chunk store it once).
    /// Their bytes are durable when this returns; that they can be found is after
    /// the next [`ChunkStore::persist`].
    async fn put(&self, frames: Vec<Frame>) -> Result<PutStats, BlobError>;
    /// Makes everything stored so far durable and findable.
    async fn persist(&self) -> Result<(), BlobError>;
    /// Which of `hashes` are not durable and findable, in the order given, each once:
    /// called after [`ChunkStore::persist`] by a caller that must know its own chunks
    /// made it. A store that shares pending writes between callers (packs) may lose
    /// another caller's chunks when a write of theirs fails, and says so here. By
    /// default, [`ChunkStore::missing`].
    async fn not_persisted(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
        self.missing(hashes).await
    }
    /// A chunk in its stored form, ready to send, checked against its name: a damaged
    /// chunk is [`BlobError::Damaged`], never served.
    async fn read_frame(&self, hash: &ChunkHash) -> Result<Frame, BlobError>;
    /// Up to `limit` stored chunks whose names follow `after` (from the first when
    /// `None`), in name order: a listing a page at a time.
    async fn list_page(
        &self,
        after: Option<ChunkHash>,
        limit: usize,
    ) -> Result<Vec<StoredChunk>, BlobError>;
    /// Deletes chunks; returns the bytes freed (nothing for those not there). A store
    /// may keep chunks its index has pinned (see [`crate::packs`]).
    async fn remove(&self, hashes: &[ChunkHash]) -> Result<u64, BlobError>;

    /// Deletes chunks as [`ChunkStore::remove`] does, for a collection that started at
    /// `since` (unix microseconds): a store that keeps pins skips chunks pinned past
    /// it, so that an upload that commits while the collection runs keeps its chunks.
    async fn remove_unpinned_since(
        &self,
        hashes: &[ChunkHash],
        since: i64,
    ) -> Result<u64, BlobError> {
        let _ = since;
        self.remove(hashes).await
    }

    /// Gives back the room of removed chunks where it is not given back at once:
    /// rewrites what holds less than `live_share` live bytes.
    async fn compact(&self, live_share: f64) -> Result<CompactStats, BlobError> {
        let _ = live_share;
        Ok(CompactStats::default())
    }

    /// The chunks `hashes` names, in that order, a few read ahead. A store that can
    /// read neighbours together does better than this one-at-a-time default.
    fn read_frames(&self, hashes: Vec<ChunkHash>) -> BoxStream<'_, Result<Frame, BlobError>> {
        futures::stream::iter(hashes)
            .map(move |hash| async move { self.read_frame(&hash).await })
            .buffered(READ_AHEAD_FRAMES)
            .boxed()
    }

    /// A chunk's bytes, checked against its name: a damaged chunk is reported, never
    /// served.
    async fn read(&self, hash: &ChunkHash) -> Result<Bytes, BlobError> {
        self.read_frame(hash)
            .await?
            .decode()
            .map_err(|err| BlobError::io("reading a stored chunk", io::Error::other(err)))
    }

    /// A chunk's bytes, length-checked only: for readers that hash the whole image.
    async fn read_unchecked(&self, hash: &ChunkHash) -> Result<Bytes, BlobError> {
        self.read_frame(hash)
            .await?
            .decompress()
            .map_err(|err| BlobError::io("reading a stored chunk", io::Error::other(err)))
    }
}

/// A chunk store called from a blocking thread (one of `tokio::task::spawn_blocking`),
/// for work that is sequential and heavy on the CPU: cutting an image into chunks,
/// hashing one in order. Each call waits for the store's future on the runtime the
/// adapter was made on.
#[derive(Clone)]
pub struct BlockingChunks {
    store: Arc<dyn ChunkStore>,
    runtime: tokio::runtime::Handle,
}

impl BlockingChunks {
    /// An adapter for `store` on the current runtime; make it on an async thread.
    pub fn new(store: Arc<dyn ChunkStore>) -> Self {
        BlockingChunks {
            store,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// See [`ChunkStore::put`].
    pub fn put(&self, frames: Vec<Frame>) -> Result<PutStats, BlobError> {
        self.runtime.block_on(self.store.put(frames))
    }

    /// See [`ChunkStore::persist`].
    pub fn persist(&self) -> Result<(), BlobError> {
        self.runtime.block_on(self.store.persist())
    }

    /// See [`ChunkStore::not_persisted`].
    pub fn not_persisted(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
        self.runtime.block_on(self.store.not_persisted(hashes))
    }

    /// See [`ChunkStore::read_unchecked`].
    pub fn read_unchecked(&self, hash: &ChunkHash) -> Result<Bytes, BlobError> {
        self.runtime.block_on(self.store.read_unchecked(hash))
    }

    /// The chunks `hashes` names, in that order, as [`ChunkStore::read_frames`] reads
    /// them (ahead of the caller).
    pub fn frames(
        &self,
        hashes: Vec<ChunkHash>,
    ) -> impl Iterator<Item = Result<Frame, BlobError>> + '_ {
        let mut frames = self.store.read_frames(hashes);
        std::iter::from_fn(move || self.runtime.block_on(frames.next()))
    }
}

/// Chunks as files in a directory.
#[derive(Debug, Clone)]
pub struct LocalChunkStore {
    files: Arc<ChunkFiles>,
}

/// The directory of a [`LocalChunkStore`], with its blocking file work.
#[derive(Debug)]
struct ChunkFiles {
    dir: PathBuf,
}

/// How a temporary chunk file's name starts.
const PART_PREFIX: &str = ".part-";

impl LocalChunkStore {
    /// Opens (creating) the store in `dir` with its 256 shard directories, and removes
    /// what writes a crash interrupted left behind: nothing else writes here while
    /// the server that owns the directory starts.
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        for shard in 0..=255u8 {
            let shard = dir.join(hex::encode([shard]));
            std::fs::create_dir_all(&shard)
                .map_err(|err| BlobError::io(format!("creating {}", shard.display()), err))?;
        }
        let files = ChunkFiles {
            dir: dir.to_owned(),
        };
        let removed = files.remove_leftovers(std::time::Duration::ZERO);
        if removed > 0 {
            tracing::info!(
                n_files = removed,
                "removed chunk files an interrupted write left"
            );
        }
        Ok(LocalChunkStore {
            files: Arc::new(files),
        })
    }

    /// Deletes temporary files of writes older than `older_than`; returns how many.
    pub fn remove_leftovers(&self, older_than: std::time::Duration) -> u64 {
        self.files.remove_leftovers(older_than)
    }

    /// Runs `work` on the store's files on a blocking thread.
    async fn blocking<T, F>(&self, work: F) -> Result<T, BlobError>
    where
        T: Send + 'static,
        F: FnOnce(&ChunkFiles) -> Result<T, BlobError> + Send + 'static,
    {
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || work(&files))
            .await
            .map_err(|err| BlobError::io("chunk store task", io::Error::other(err)))?
    }
}

#[async_trait]
impl ChunkStore for LocalChunkStore {
    async fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
        let hashes = hashes.to_vec();
        self.blocking(move |files| Ok(files.missing(&hashes))).await
    }

    async fn put(&self, frames: Vec<Frame>) -> Result<PutStats, BlobError> {
        self.blocking(move |files| files.put(&frames)).await
    }

    async fn persist(&self) -> Result<(), BlobError> {
        self.blocking(|files| files.sync_all()).await
    }

    async fn read_frame(&self, hash: &ChunkHash) -> Result<Frame, BlobError> {
        let hash = *hash;
        self.blocking(move |files| files.read_frame(&hash)).await
    }

    async fn list_page(
        &self,
        after: Option<ChunkHash>,
        limit: usize,
    ) -> Result<Vec<StoredChunk>, BlobError> {
        self.blocking(move |files| files.list_page(after, limit))
            .await
    }

    async fn remove(&self, hashes: &[ChunkHash]) -> Result<u64, BlobError> {
        let hashes = hashes.to_vec();
        self.blocking(move |files| {
            let mut freed = 0;
            for hash in &hashes {
                freed += files.remove(hash)?;
            }
            Ok(freed)
        })
        .await
    }
}

impl ChunkFiles {
    fn path_of(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Flushes everything written on the file system holding the store.
    fn sync_all(&self) -> Result<(), BlobError> {
        let dir = std::fs::File::open(&self.dir)
            .map_err(|err| BlobError::io(format!("opening {}", self.dir.display()), err))?;
        // SAFETY: syncfs takes a file descriptor, which `dir` keeps open for the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(BlobError::io(
                "syncing the chunk store",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn missing(&self, hashes: &[ChunkHash]) -> Vec<ChunkHash> {
        let mut seen = std::collections::HashSet::with_capacity(hashes.len());
        let mut missing = Vec::new();
        for hash in hashes {
            if seen.insert(*hash) && !self.path_of(hash).exists() {
                missing.push(*hash);
            }
        }
        missing
    }

    fn put(&self, frames: &[Frame]) -> Result<PutStats, BlobError> {
        let mut written: Vec<(PathBuf, PathBuf, u64)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut header = Vec::new();
        let result = (|| {
            for frame in frames {
                let target = self.path_of(&frame.hash);
                if !seen.insert(frame.hash) || target.exists() {
                    continue;
                }
                let mut name = [0u8; 12];
                rand::thread_rng().fill_bytes(&mut name);
                let temp = target.with_file_name(format!("{PART_PREFIX}{}", hex::encode(name)));
                // The header, then the data as it came: no copy of the data.
                header.clear();
                frame.write_header_to(&mut header);
                let bytes = (header.len() + frame.data.len()) as u64;
                // Listed before it is written: a write that fails half-way (a full
                // disk) leaves nothing behind either.
                written.push((temp.clone(), target, bytes));
                std::fs::File::create(&temp)
                    .and_then(|mut file| {
                        file.write_all(&header)?;
                        file.write_all(&frame.data)
                    })
                    .map_err(|err| BlobError::io(format!("writing chunk {}", frame.hash), err))?;
            }
            if written.is_empty() {
                return Ok(PutStats::default());
            }
            self.sync_all()?;
            let mut stats = PutStats::default();
            for (temp, target, bytes) in &written {
                if rename_no_replace(temp, target)
                    .map_err(|err| BlobError::io(format!("storing {}", target.display()), err))?
                {
                    stats.new_chunks += 1;
                    stats.new_bytes += bytes;
                } else {
                    // Another upload stored the same chunk meanwhile: same bytes.
                    let _ = std::fs::remove_file(temp);
                }
            }
            Ok(stats)
        })();
        if result.is_err() {
            for (temp, _, _) in &written {
                let _ = std::fs::remove_file(temp);
            }
        }
        result
    }

    fn read_frame(&self, hash: &ChunkHash) -> Result<Frame, BlobError> {
        let path = self.path_of(hash);
        let body = match std::fs::read(&path) {
            Ok(body) => body,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(format!("chunk {hash}")))
            }
            Err(err) => return Err(BlobError::io(format!("reading {}", path.display()), err)),
        };
        let frame = Frame::from_body(*hash, Bytes::from(body))
            .map_err(|err| BlobError::Damaged(format!("{}: {err}", path.display())))?;
        frame
            .decode()
            .map_err(|err| BlobError::Damaged(format!("{}: {err}", path.display())))?;
        Ok(frame)
    }

    /// A page of the listing: shard directories in order, names sorted within each.
    fn list_page(
        &self,
        after: Option<ChunkHash>,
        limit: usize,
    ) -> Result<Vec<StoredChunk>, BlobError> {
        let mut page = Vec::new();
        let first_shard = after.map_or(0, |hash| hash.0[0]);
        for shard in first_shard..=255u8 {
            if page.len() >= limit {
                break;
            }
            let shard_path = self.dir.join(hex::encode([shard]));
            let entries = match std::fs::read_dir(&shard_path) {
                Ok(entries) => entries,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(BlobError::io(
                        format!("listing {}", shard_path.display()),
                        err,
                    ))
                }
            };
            let mut in_shard = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|err| BlobError::io("listing the chunk store", err))?;
                let name = entry.file_name();
                let Some(hash) = name.to_str().and_then(ChunkHash::parse) else {
                    continue;
                };
                if after.is_some_and(|after| hash <= after) {
                    continue;
                }
                let bytes = entry.metadata().map(|meta| meta.len()).unwrap_or(0);
                in_shard.push(StoredChunk { hash, bytes });
            }
            in_shard.sort_by_key(|chunk| chunk.hash);
            in_shard.truncate(limit - page.len());
            page.extend(in_shard);
        }
        Ok(page)
    }

    fn remove(&self, hash: &ChunkHash) -> Result<u64, BlobError> {
        let path = self.path_of(hash);
        let bytes = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(BlobError::io(format!("reading {}", path.display()), err)),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(bytes),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(err) => Err(BlobError::io(format!("deleting {}", path.display()), err)),
        }
    }

    fn remove_leftovers(&self, older_than: std::time::Duration) -> u64 {
        let mut removed = 0;
        let now = std::time::SystemTime::now();
        for shard in 0..=255u8 {
            let shard = self.dir.join(hex::encode([shard]));
            let Ok(entries) = std::fs::read_dir(&shard) else {
                continue;
            };
            for entry in entries.flatten() {
                let is_part = entry.file_name().to_string_lossy().starts_with(PART_PREFIX);
                let old = entry
                    .metadata()
                    .and_then(|meta| meta.modified())
                    .ok()
                    .and_then(|modified| now.duration_since(modified).ok())
                    .is_some_and(|age| age >= older_than);
                if is_part && old && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// Renames `from` to `to` unless `to` exists; returns whether it renamed. Two
/// uploads storing the same chunk at once then count it once.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are NUL-terminated paths that live across the call.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if result == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(false),
        // A file system without RENAME_NOREPLACE: a plain rename, counted as new.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::rename(from_path(&from), from_path(&to)).map(|()| true)
        }
        _ => Err(err),
    }
}

fn from_path(path: &std::ffi::CStr) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(path.to_bytes()))
}

/// How many bytes of encoded chunks [`ingest`] gathers before storing them.
const INGEST_BATCH_BYTES: usize = 16 << 20;

/// Cuts the bytes of `reader` into chunks and stores them: how the server keeps an
/// image that arrives whole. Returns the chunking and what storing it added.
pub fn ingest<R: Read + Send>(
    store: &BlockingChunks,
    reader: R,
    params: &ChunkParams,
) -> Result<(ChunkedFile, PutStats), BlobError> {
    let mut batch: Vec<Frame> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut stats = PutStats::default();
    let mut failure: Option<BlobError> = None;
    let flush = |batch: &mut Vec<Frame>, stats: &mut PutStats| -> Result<(), BlobError> {
        let added = store.put(std::mem::take(batch))?;
        stats.new_chunks += added.new_chunks;
        stats.new_bytes += added.new_bytes;
        Ok(())
    };
    let chunked = chunk_reader_with(reader, params, |chunk, data| {
        let frame = Frame::encode_shared(chunk.entry().hash, data);
        batch_bytes += frame.data.len();
        batch.push(frame);
        if batch_bytes >= INGEST_BATCH_BYTES {
            batch_bytes = 0;
            if let Err(err) = flush(&mut batch, &mut stats) {
                let message = err.to_string();
                failure = Some(err);
                return Err(io::Error::other(message));
            }
        }
        Ok(())
    });
    if let Some(err) = failure {
        return Err(err);
    }
    let chunked = chunked.map_err(|err| BlobError::io("cutting an image into chunks", err))?;
    flush(&mut batch, &mut stats)?;
    store.persist()?;
    let hashes: Vec<ChunkHash> = chunked
        .chunks
        .iter()
        .map(|chunk| chunk.entry().hash)
        .collect();
    let lost = store.not_persisted(&hashes)?;
    if !lost.is_empty() {
        return Err(lost_with_a_pack(lost.len()));
    }
    Ok((chunked, stats))
}

/// The error of a caller whose chunks, stored and persisted without error, are not all
/// findable: they went down with a pack another caller failed to write (the store
/// failed), so the same upload may work later.
pub fn lost_with_a_pack(n_lost: usize) -> BlobError {
    BlobError::Unavailable {
        what: format!("{n_lost} chunks were lost with a pack that could not be written"),
        source: Box::new(io::Error::other("a pack could not be written")),
    }
}

/// How many decoded chunks may wait between the two threads of [`read_image`].
const READ_AHEAD_CHUNKS: usize = 32;

/// Reads an image back from its chunks in order, computing its whole-file digests,
/// and hands each chunk to `sink` (which may discard it). Two threads: one reads and
/// decodes, the other hashes. A chunk missing is an error; a damaged one shows in the
/// digests (chunks are not checked one by one: the whole-file hash covers them).
pub fn read_image<F>(
    store: &BlockingChunks,
    entries: &[ChunkEntry],
    mut sink: F,
) -> Result<Digests, BlobError>
where
    F: FnMut(&[u8]) -> Result<(), BlobError> + Send,
{
    let (sender, receiver) = mpsc::sync_channel::<Bytes>(READ_AHEAD_CHUNKS);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<(), BlobError> {
            for entry in entries {
                let bytes = store.read_unchecked(&entry.hash)?;
                if bytes.len() != entry.len as usize {
                    return Err(BlobError::io(
                        format!("chunk {}", entry.hash),
                        io::Error::other(format!(
                            "{} bytes stored where the image lists {}",
                            bytes.len(),
                            entry.len
                        )),
                    ));
                }
                if sender.send(bytes).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut hasher = ImageHasher::new();
        let mut sink_result = Ok(());
        for bytes in receiver.iter() {
            hasher.update(&bytes);
            if let Err(err) = sink(&bytes) {
                sink_result = Err(err);
                break;
            }
        }
        drop(receiver);
        let read_result = match reader.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        read_result?;
        sink_result?;
        Ok(hasher.finish())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::noise;

    fn open(dir: &Path) -> (LocalChunkStore, Arc<dyn ChunkStore>) {
        let store = LocalChunkStore::open(dir).unwrap();
        (store.clone(), Arc::new(store))
    }

    async fn list_all(store: &dyn ChunkStore, page: usize) -> Vec<ChunkHash> {
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let chunks = store.list_page(after, page).await.unwrap();
            let Some(last) = chunks.last() else {
                return listed;
            };
            after = Some(last.hash);
            listed.extend(chunks.iter().map(|chunk| chunk.hash));
        }
    }

    #[tokio::test]
    async fn chunks_are_stored_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (local, store) = open(dir.path());
        let a = Frame::encode(&noise(70_000, 1));
        let b = Frame::encode(&vec![0u8; 70_000]);
        assert_eq!(
            store.missing(&[a.hash, b.hash, a.hash]).await.unwrap(),
            vec![a.hash, b.hash]
        );
        let stats = store
            .put(vec![a.clone(), b.clone(), a.clone()])
            .await
            .unwrap();
        assert_eq!(stats.new_chunks, 2);
        assert!(
            stats.new_bytes < 70_000 + 100,
            "zeros are compressed: {stats:?}"
        );
        assert!(store.missing(&[a.hash, b.hash]).await.unwrap().is_empty());
        assert_eq!(
            store.put(vec![a.clone()]).await.unwrap(),
            PutStats::default()
        );
        assert_eq!(store.read(&a.hash).await.unwrap(), a.decode().unwrap());
        assert_eq!(store.read(&b.hash).await.unwrap(), vec![0u8; 70_000]);
        let mut expected = vec![a.hash, b.hash];
        expected.sort();
        assert_eq!(list_all(&*store, 1000).await, expected);
        assert!(store.remove(&[a.hash]).await.unwrap() > 0);
        assert_eq!(store.remove(&[a.hash]).await.unwrap(), 0);
        assert!(matches!(
            store.read(&a.hash).await,
            Err(BlobError::NotFound(_))
        ));
        assert_eq!(
            local.remove_leftovers(std::time::Duration::ZERO),
            0,
            "no temporary file is left behind"
        );
    }

    #[tokio::test]
    async fn a_listing_comes_a_page_at_a_time_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = open(dir.path());
        let frames: Vec<Frame> = (0..40)
            .map(|seed| Frame::encode(&noise(1000, seed)))
            .collect();
        store.put(frames.clone()).await.unwrap();
        let mut expected: Vec<ChunkHash> = frames.iter().map(|frame| frame.hash).collect();
        expected.sort();
        for page in [1, 3, 7, 40, 100] {
            assert_eq!(list_all(&*store, page).await, expected, "pages of {page}");
        }
        let frames_read: Vec<Frame> = store
            .read_frames(expected.clone())
            .map(|frame| frame.unwrap())
            .collect()
            .await;
        let read: Vec<ChunkHash> = frames_read.iter().map(|frame| frame.hash).collect();
        assert_eq!(read, expected, "read_frames keeps the order asked");
    }

    #[test]
    fn a_chunk_stored_by_two_writers_at_once_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let (local, _) = open(dir.path());
        let frame = Frame::encode(&noise(30_000, 9));
        // Both writers saw the chunk missing; the second rename finds it there.
        let target = local.files.path_of(&frame.hash);
        let first = target.with_file_name(".part-first");
        let second = target.with_file_name(".part-second");
        std::fs::write(&first, b"x").unwrap();
        std::fs::write(&second, b"x").unwrap();
        assert!(rename_no_replace(&first, &target).unwrap());
        assert!(!rename_no_replace(&second, &target).unwrap());
        assert!(second.exists(), "the loser's file is left to its writer");
    }

    #[tokio::test]
    async fn a_damaged_chunk_file_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let (local, store) = open(dir.path());
        let frame = Frame::encode(&noise(20_000, 2));
        store.put(vec![frame.clone()]).await.unwrap();
        let path = local.files.path_of(&frame.hash);
        let mut body = std::fs::read(&path).unwrap();
        let last = body.len() - 1;
        body[last] ^= 1;
        std::fs::write(&path, body).unwrap();
        assert!(store.read(&frame.hash).await.is_err());
    }

    #[tokio::test]
    async fn partial_writes_are_removed_once_old_and_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        let (local, store) = open(dir.path());
        let leftover = dir.path().join("ab").join(format!("{PART_PREFIX}0123"));
        std::fs::write(&leftover, b"half a chunk").unwrap();
        assert!(list_all(&*store, 10).await.is_empty());
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(local.remove_leftovers(hour), 0, "too young");
        assert!(leftover.exists());
        assert_eq!(local.remove_leftovers(std::time::Duration::ZERO), 1);
        assert!(!leftover.exists());
        // Opening the store again removes what a crash left, whatever its age.
        std::fs::write(&leftover, b"half a chunk").unwrap();
        drop(open(dir.path()));
        assert!(!leftover.exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn ingested_image_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = open(dir.path());
        let chunks = BlockingChunks::new(store);
        tokio::task::spawn_blocking(move || {
            let mut image = noise(3 << 20, 3);
            image.extend(vec![0u8; 1 << 20]);
            let (chunked, stats) = ingest(&chunks, &image[..], &ChunkParams::default()).unwrap();
            assert!(stats.new_chunks > 10);
            let entries: Vec<ChunkEntry> = chunked.chunks.iter().map(|c| c.entry()).collect();
            let mut back = Vec::new();
            let digests = read_image(&chunks, &entries, |bytes| {
                back.extend_from_slice(bytes);
                Ok(())
            })
            .unwrap();
            assert_eq!(back, image);
            assert_eq!(digests, chunked.digests);

            // The same image again stores nothing new.
            let (_, again) = ingest(&chunks, &image[..], &ChunkParams::default()).unwrap();
            assert_eq!(again, PutStats::default());
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reading_an_image_with_a_missing_chunk_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = open(dir.path());
        let chunks = BlockingChunks::new(store.clone());
        let image = noise(1 << 20, 4);
        let (chunked, _) = tokio::task::spawn_blocking({
            let chunks = chunks.clone();
            move || ingest(&chunks, &image[..], &ChunkParams::default()).unwrap()
        })
        .await
        .unwrap();
        let entries: Vec<ChunkEntry> = chunked.chunks.iter().map(|c| c.entry()).collect();
        store.remove(&[entries[3].hash]).await.unwrap();
        let err = tokio::task::spawn_blocking(move || read_image(&chunks, &entries, |_| Ok(())))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, BlobError::NotFound(_)), "{err}");
    }
}
