//! Images: the chunked transfer (which chunks are missing, receiving chunks,
//! committing an image), images that arrive whole, reading images back (whole, by
//! range, by chunk), collecting chunks no image uses, and the storage figures. See
//! docs/transfer.md.
//!
//! Collection never races uploads, whichever server of a farm runs it: every chunk an
//! upload asks about, sends or commits is *pinned* in the state store for [`PIN_TTL`]
//! (an upload abandoned for good stops protecting its chunks then), and the chunk
//! store's removal skips chunks pinned past the collection's start, in the same
//! transaction that removes. A commit ends its pins at the time it recorded its image:
//! a collection that started before then may not have seen the image, and still skips
//! them; one that starts later sees the image. A commit pins its chunks *before* it checks they are present: either the
//! pin is there when collection removes (the chunk stays), or the removal came first
//! and the check finds the chunk gone and answers `missing_chunks`, so the client
//! sends it again. Either way no image is recorded that lists a chunk not stored.

use super::{Farm, FarmError, FarmResult};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_blob::chunking::ChunkParams;
use kiln_blob::frames::{pack_chunk_list, unpack_chunk_list, FrameReader, MAX_CHUNK_BYTES};
use kiln_blob::{BlobError, BlockingChunks, ByteStream, ChunkEntry, ChunkHash, ChunkStore, Frame};
use kiln_proto::api::ImageInfo;
use kiln_proto::names::check_name;
use kiln_proto::transfer::{
    CommitRequest, ImageIndex, MissingRequest, MissingResponse, PutChunksResponse, StorageStats,
    MAX_FETCH, MAX_MISSING_QUERY,
};
use kiln_store::NewImage;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a chunk an upload mentioned is safe from collection.
pub const PIN_TTL: Duration = Duration::from_secs(3600);
/// Bytes of frames received before they are checked and stored, then hashed into
/// their image while the next batch is checked and stored; with the batch being
/// received, three of these a body bound its memory on the server.
const PUT_BATCH_BYTES: usize = 2 << 20;
/// Bytes of chunks an image keeps that arrived ahead of where its in-order hash is
/// (another body of the same upload, sent at the same time, is still on its way);
/// beyond this they are read back from the store when the hash reaches them.
const HASH_AHEAD_BYTES: usize = 4 << 20;
/// Chunks whose pins [`RecentPins`] remembers for one job: a few questions' worth.
const RECENT_PINS_PER_JOB: usize = 8192;
/// Decoded chunks a download may hold ahead of the network.
const STREAM_AHEAD: usize = 16;
/// Chunks listed at a time while collecting garbage.
const LIST_PAGE: usize = 4096;
/// Packs whose live chunks take less than this share of them are rewritten.
pub const COMPACT_BELOW: f64 = 0.5;

/// Counter names in the store.
const RECEIVED: &str = "bytes_received";
const DEDUPLICATED: &str = "bytes_deduplicated";
const STORED: &str = "bytes_stored";
const CHUNKS: &str = "chunks_stored";

/// The chunk store with what keeps collection and uploads apart, and what uploads
/// are under way.
pub(super) struct Images {
    chunks: Arc<dyn ChunkStore>,
    /// One collection at a time in this server.
    gc_serial: tokio::sync::Mutex<()>,
    /// Images being hashed in order while their chunks arrive, by (build, job, name).
    hashing: Mutex<HashMap<ImageKey, Arc<HashLock>>>,
    /// How many image uploads each client is sending now.
    uploads: UploadSlots,
    /// Chunks pinned lately for each job, and when.
    recent_pins: RecentPins,
}

/// An image of a job: (build, job, image name).
type ImageKey = (String, String, String);

/// The lock of an in-order hash. Its holder on a blocking thread may wait for the
/// store, which needs the async workers, so async code waits for it by awaiting
/// (never by blocking a worker) and blocking code by [`tokio::sync::Mutex::blocking_lock`].
type HashLock = tokio::sync::Mutex<InOrderHash>;

/// An image hashed in order as its chunks become present, so that a commit finds its
/// digests ready instead of reading the image back.
struct InOrderHash {
    /// The chunks announced so far, in image order.
    entries: Vec<ChunkEntry>,
    /// Bytes those cover.
    announced: u64,
    /// How many of `entries` are hashed.
    hashed: usize,
    hasher: kiln_blob::ImageHasher,
    /// Chunks received and checked before the hash reached them, kept (at most
    /// [`HASH_AHEAD_BYTES`] of them) so that they need not be read back.
    ahead: HashMap<ChunkHash, Bytes>,
    /// Bytes of `ahead`.
    ahead_bytes: usize,
    /// Announcements came out of order: the commit reads the image back instead.
    broken: bool,
    touched: Instant,
}

impl InOrderHash {
    fn new() -> Self {
        InOrderHash {
            entries: Vec::new(),
            announced: 0,
            hashed: 0,
            hasher: kiln_blob::ImageHasher::new(),
            ahead: HashMap::new(),
            ahead_bytes: 0,
            broken: false,
            touched: Instant::now(),
        }
    }

    /// Hashes announced chunks, in order, as far as they are stored, taking the bytes
    /// from `fresh` (chunks just received and checked) or from those kept ahead
    /// before reading the store; then keeps the chunks of `fresh` the hash has yet to
    /// reach. Runs on a blocking thread.
    fn advance(
        &mut self,
        chunks: &BlockingChunks,
        fresh: &HashMap<ChunkHash, Bytes>,
    ) -> Result<(), BlobError> {
        while self.hashed < self.entries.len() && !self.broken {
            let entry = self.entries[self.hashed];
            let bytes = match fresh.get(&entry.hash) {
                Some(bytes) => bytes.clone(),
                None => match self.ahead.remove(&entry.hash) {
                    Some(bytes) => {
                        self.ahead_bytes -= bytes.len();
                        bytes
                    }
                    None => match chunks.read_unchecked(&entry.hash) {
                        Ok(bytes) => bytes,
                        Err(BlobError::NotFound(_)) => break,
                        Err(err) => return Err(err),
                    },
                },
            };
            if bytes.len() != entry.len as usize {
                self.broken = true;
                break;
            }
            self.hasher.update(&bytes);
            self.hashed += 1;
        }
        self.keep_ahead(fresh);
        Ok(())
    }

    /// Keeps those of `fresh` that the hash has yet to reach, as far as
    /// [`HASH_AHEAD_BYTES`] allows.
    fn keep_ahead(&mut self, fresh: &HashMap<ChunkHash, Bytes>) {
        if self.broken || fresh.is_empty() || self.hashed == self.entries.len() {
            return;
        }
        let to_come: HashSet<&ChunkHash> = self.entries[self.hashed..]
            .iter()
            .map(|entry| &entry.hash)
            .collect();
        for (hash, bytes) in fresh {
            if self.ahead_bytes + bytes.len() > HASH_AHEAD_BYTES {
                break;
            }
            if to_come.contains(hash) && !self.ahead.contains_key(hash) {
                self.ahead_bytes += bytes.len();
                // A copy: the received bytes share buffers with their neighbours,
                // which this would keep alive too.
                self.ahead.insert(*hash, Bytes::copy_from_slice(bytes));
            }
        }
    }
}

impl Images {
    pub(super) fn new(chunks: Arc<dyn ChunkStore>) -> Self {
        Images {
            chunks,
            gc_serial: tokio::sync::Mutex::new(()),
            hashing: Mutex::default(),
            uploads: UploadSlots::default(),
            recent_pins: RecentPins::default(),
        }
    }

    /// The in-order hash of an image, a new one when `restart`.
    fn in_order_hash(&self, key: ImageKey, restart: bool) -> Arc<HashLock> {
        let mut hashing = self.hashing.lock().expect("hashing lock");
        // Uploads abandoned long ago are forgotten here.
        hashing.retain(|_, image| {
            image
                .try_lock()
                .map_or(true, |image| image.touched.elapsed() < PIN_TTL)
        });
        if restart {
            let fresh = Arc::new(HashLock::new(InOrderHash::new()));
            hashing.insert(key, fresh.clone());
            return fresh;
        }
        hashing
            .entry(key)
            .or_insert_with(|| {
                let mut image = InOrderHash::new();
                // Joined half-way (after a restart of the server): read back at commit.
                image.broken = true;
                Arc::new(HashLock::new(image))
            })
            .clone()
    }

    /// The images of a job being hashed in order.
    fn in_order_hashes_of(&self, build: &str, job: &str) -> Vec<Arc<HashLock>> {
        self.hashing
            .lock()
            .expect("hashing lock")
            .iter()
            .filter(|((b, j, _), _)| b == build && j == job)
            .map(|(_, image)| image.clone())
            .collect()
    }

    /// The chunk list the image's questions announced, when this server holds all
    /// of it, in order, and it has `n_chunks` entries.
    async fn announced_list(&self, key: &ImageKey, n_chunks: u64) -> Option<Vec<ChunkEntry>> {
        let image = self.hashing.lock().expect("hashing lock").get(key)?.clone();
        let image = image.lock().await;
        (!image.broken && image.entries.len() as u64 == n_chunks).then(|| image.entries.clone())
    }

    fn take_in_order_hash(&self, key: &ImageKey) -> Option<Arc<HashLock>> {
        self.hashing.lock().expect("hashing lock").remove(key)
    }

    fn blocking(&self) -> BlockingChunks {
        BlockingChunks::new(self.chunks.clone())
    }
}

/// The chunks this server pinned for each job lately, and when. The chunks of a body
/// were most often pinned a moment before, when the job asked which it should send;
/// they are pinned again only when that was longer than half [`PIN_TTL`] ago. (A
/// commit pins all its chunks again before it checks them, whatever this says, so
/// collection never races it.)
#[derive(Default)]
struct RecentPins {
    by_job: Mutex<HashMap<(String, String), JobPins>>,
}

/// A job's recent pins: when the latest started, and when each chunk's did.
type JobPins = (Instant, HashMap<ChunkHash, Instant>);

impl RecentPins {
    /// Notes that `hashes` were pinned for the job, with a pin that started no
    /// earlier than `at`.
    fn note(&self, build: &str, job: &str, hashes: &[ChunkHash], at: Instant) {
        let mut by_job = self.by_job.lock().expect("recent pins lock");
        // Jobs that stopped uploading long ago are forgotten here.
        by_job.retain(|_, (last, _)| last.elapsed() < PIN_TTL);
        let (last, pins) = by_job
            .entry((build.to_owned(), job.to_owned()))
            .or_insert_with(|| (at, HashMap::new()));
        *last = (*last).max(at);
        // Bodies follow the latest questions closely: beyond a bound, the older
        // pins are let go of (a body of theirs still in flight pins again), so that
        // memory does not grow with the image.
        if pins.len() + hashes.len() > RECENT_PINS_PER_JOB {
            pins.clear();
        }
        for hash in hashes {
            pins.insert(*hash, at);
        }
    }

    /// Those of `hashes` without a pin of the job that started less than half
    /// [`PIN_TTL`] ago.
    fn not_covered(&self, build: &str, job: &str, hashes: &[ChunkHash]) -> Vec<ChunkHash> {
        let by_job = self.by_job.lock().expect("recent pins lock");
        let pins = by_job
            .get(&(build.to_owned(), job.to_owned()))
            .map(|(_, pins)| pins);
        hashes
            .iter()
            .filter(|hash| {
                pins.and_then(|pins| pins.get(*hash))
                    .is_none_or(|at| at.elapsed() >= PIN_TTL / 2)
            })
            .copied()
            .collect()
    }

    /// Forgets the job's pins: its image is recorded, and its pins ended.
    fn forget(&self, build: &str, job: &str) {
        let mut by_job = self.by_job.lock().expect("recent pins lock");
        by_job.remove(&(build.to_owned(), job.to_owned()));
    }
}

/// How many uploads each client is sending now: a counting semaphore per client id,
/// tried (never waited on) by every body-carrying upload call. A client at its limit
/// is refused `too_many_uploads` before its body is read.
#[derive(Default)]
struct UploadSlots {
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

/// One upload's place among its client's; given back when dropped.
struct UploadSlot {
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
    client_id: String,
}

impl UploadSlots {
    /// A slot for one more upload of `client_id`, or the refusal when it sends
    /// `max` already.
    fn try_take(&self, client_id: &str, max: usize) -> FarmResult<UploadSlot> {
        let mut in_flight = self.in_flight.lock().expect("upload slots lock");
        let n_sending = in_flight.entry(client_id.to_owned()).or_default();
        if *n_sending >= max {
            return Err(FarmError::TooManyUploads(format!(
                "client {client_id} already sends as many uploads at once as this server \
                 accepts from one client (--max-uploads-per-client {max}); send this one \
                 again when one of them ends"
            )));
        }
        *n_sending += 1;
        Ok(UploadSlot {
            in_flight: self.in_flight.clone(),
            client_id: client_id.to_owned(),
        })
    }

    /// How many uploads `client_id` is sending now.
    #[cfg(test)]
    fn n_sending(&self, client_id: &str) -> usize {
        let in_flight = self.in_flight.lock().expect("upload slots lock");
        in_flight.get(client_id).copied().unwrap_or(0)
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().expect("upload slots lock");
        if let Some(n_sending) = in_flight.get_mut(&self.client_id) {
            *n_sending = n_sending.saturating_sub(1);
            if *n_sending == 0 {
                in_flight.remove(&self.client_id);
            }
        }
    }
}

/// The in-order hashing of a batch of chunks, under way.
struct HashingOn(Option<tokio::task::JoinHandle<()>>);

impl HashingOn {
    /// Waits for it to end (a failure has marked its images for reading back).
    async fn wait(self) {
        if let Some(task) = self.0 {
            let _ = task.await;
        }
    }
}

/// Runs blocking chunk work (hashing, cutting) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> FarmResult<T> + Send + 'static,
) -> FarmResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| FarmError::task("chunk work", err))?
}

/// A stored image: its record and its chunks in order.
pub struct StoredImage {
    pub info: ImageInfo,
    pub entries: Vec<ChunkEntry>,
}

impl Farm {
    /// Which of the chunks an upload names the server lacks. With the image named,
    /// the chunks it already has are hashed into it on the way.
    pub async fn missing_chunks(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        request: &MissingRequest,
    ) -> FarmResult<MissingResponse> {
        self.store.check_lease(build, job, lease).await?;
        if request.chunks.len() > MAX_MISSING_QUERY {
            return Err(FarmError::TooLarge(format!(
                "{} chunks in one question; at most {MAX_MISSING_QUERY}",
                request.chunks.len()
            )));
        }
        let hashes: Vec<ChunkHash> = request.chunks.iter().map(|entry| entry.hash).collect();
        let pinned_at = Instant::now();
        self.pin_chunks(build, job, &hashes).await?;
        self.images.recent_pins.note(build, job, &hashes, pinned_at);
        let in_order = match &request.image {
            Some(image) => {
                check_name("image name", image)
                    .map_err(|msg| FarmError::invalid("bad_name", msg))?;
                let key = (build.to_owned(), job.to_owned(), image.clone());
                let in_order = self.images.in_order_hash(key, request.offset == 0);
                {
                    let mut in_order = in_order.lock().await;
                    if request.offset != in_order.announced {
                        in_order.broken = true;
                    }
                    in_order.entries.extend_from_slice(&request.chunks);
                    in_order.announced +=
                        request.chunks.iter().map(|e| u64::from(e.len)).sum::<u64>();
                    in_order.touched = Instant::now();
                }
                Some(in_order)
            }
            None => None,
        };
        let missing = self.images.chunks.missing(&hashes).await?;
        if in_order.is_some() {
            // Chunks the server had already are hashed on while the client cuts the next.
            self.advance_in_background(build, job);
        }
        let missing_set: HashSet<&ChunkHash> = missing.iter().collect();
        let mut seen = HashSet::new();
        let deduplicated: u64 = request
            .chunks
            .iter()
            .filter(|entry| seen.insert(entry.hash) && !missing_set.contains(&entry.hash))
            .map(|entry| u64::from(entry.len))
            .sum();
        if deduplicated > 0 {
            self.store
                .add_counters(&[(DEDUPLICATED, deduplicated as i64)])
                .await?;
        }
        Ok(MissingResponse { missing })
    }

    /// A body of frames: each checked against its name before it is stored. Whole
    /// frames that arrived before a damaged one or a broken connection are still
    /// stored: an interrupted upload need not send them again.
    pub async fn put_chunks<S, E>(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        mut body: S,
    ) -> FarmResult<PutChunksResponse>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let holder = self.store.check_lease(build, job, lease).await?;
        let _slot = self
            .images
            .uploads
            .try_take(&holder.client_id, self.config.max_uploads_per_client)?;
        let mut reader = FrameReader::new();
        let mut batch: Vec<Frame> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut report = PutChunksResponse {
            chunks: 0,
            bytes_received: 0,
            bytes_stored: 0,
        };
        let mut new_chunks = 0u64;
        let mut body_hashes: Vec<ChunkHash> = Vec::new();
        let mut cut_short: Option<FarmError> = None;
        let mut hashing: Option<HashingOn> = None;
        let outcome: FarmResult<()> = async {
            loop {
                let piece = body.next().await;
                let mut done = piece.is_none();
                match piece {
                    Some(Ok(piece)) => {
                        report.bytes_received += piece.len() as u64;
                        reader.push(&piece);
                        loop {
                            match reader.next_frame() {
                                Ok(Some(frame)) => {
                                    batch_bytes += frame.wire_len();
                                    batch.push(frame);
                                }
                                Ok(None) => break,
                                Err(err) => {
                                    cut_short = Some(frame_refused(err));
                                    done = true;
                                    break;
                                }
                            }
                        }
                    }
                    Some(Err(err)) => {
                        cut_short = Some(FarmError::invalid(
                            "upload_interrupted",
                            format!("the chunk upload broke off: {err}"),
                        ));
                        done = true;
                    }
                    None => {
                        if let Err(err) = reader.finish() {
                            cut_short = Some(frame_refused(err));
                        }
                    }
                }
                if batch_bytes >= PUT_BATCH_BYTES || (done && !batch.is_empty()) {
                    let frames = std::mem::take(&mut batch);
                    batch_bytes = 0;
                    report.chunks += frames.len() as u64;
                    let hashes: Vec<ChunkHash> = frames.iter().map(|frame| frame.hash).collect();
                    let unpinned = self.images.recent_pins.not_covered(build, job, &hashes);
                    if !unpinned.is_empty() {
                        let pinned_at = Instant::now();
                        self.pin_chunks(build, job, &unpinned).await?;
                        self.images
                            .recent_pins
                            .note(build, job, &unpinned, pinned_at);
                    }
                    body_hashes.extend_from_slice(&hashes);
                    let chunks = self.images.blocking();
                    let store_started = Instant::now();
                    let (stats, refused, fresh) =
                        blocking(move || store_checked(&chunks, frames)).await?;
                    tracing::debug!(
                        secs = store_started.elapsed().as_secs_f64(),
                        new_bytes = stats.new_bytes,
                        "chunks checked and stored"
                    );
                    // The images of this job are hashed on from the bytes at hand while
                    // the next batch is received, checked and stored; one batch is
                    // hashed at a time, so memory stays at a few batches a body.
                    if let Some(previous) = hashing.take() {
                        previous.wait().await;
                    }
                    hashing = Some(self.hash_on(build, job, fresh));
                    report.bytes_stored += stats.new_bytes;
                    new_chunks += stats.new_chunks;
                    if let Some(err) = refused {
                        return Err(err);
                    }
                }
                if done {
                    return cut_short.take().map_or(Ok(()), Err);
                }
            }
        }
        .await;
        if let Some(previous) = hashing.take() {
            previous.wait().await;
        }
        // The chunks of a body are durable before it is answered (those before a bad
        // frame or a broken connection too): a server killed after the answer has
        // them when it starts again, and the client need not send them again.
        let persisted = self.images.chunks.persist().await;
        self.store
            .add_counters(&[
                (RECEIVED, report.bytes_received as i64),
                (STORED, report.bytes_stored as i64),
                (CHUNKS, new_chunks as i64),
            ])
            .await?;
        outcome?;
        persisted?;
        // Durable means findable in the index: chunks of this body that shared an open
        // pack with another body whose write failed went down with it.
        let lost = self.images.chunks.not_persisted(&body_hashes).await?;
        if !lost.is_empty() {
            return Err(kiln_blob::chunks::lost_with_a_pack(lost.len()).into());
        }
        Ok(report)
    }

    /// Hashes the images of a job on, as far as their chunks are stored, on a blocking
    /// thread; a commit takes the same lock, so it waits for this to finish.
    fn advance_in_background(&self, build: &str, job: &str) {
        drop(self.hash_on(build, job, HashMap::new()));
    }

    /// Hashes the images of a job on from `fresh` (chunks just checked and stored) and
    /// the store, on a blocking thread; the work goes on whether or not the answer is
    /// awaited.
    fn hash_on(&self, build: &str, job: &str, fresh: HashMap<ChunkHash, Bytes>) -> HashingOn {
        let images = self.images.in_order_hashes_of(build, job);
        if images.is_empty() {
            return HashingOn(None);
        }
        let chunks = self.images.blocking();
        HashingOn(Some(tokio::task::spawn_blocking(move || {
            advance_all(&images, &chunks, &fresh)
        })))
    }

    /// Commits an image made of chunks the server has: checks the list, the chunks'
    /// presence and the whole image's digests, makes the chunks durable, and records
    /// the image under the lease.
    pub async fn commit_image(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        name: &str,
        request: CommitRequest,
    ) -> FarmResult<ImageInfo> {
        self.store.check_lease(build, job, lease).await?;
        let key = (build.to_owned(), job.to_owned(), name.to_owned());
        let request = match request.announced_chunks {
            Some(n_chunks) => {
                let chunks = self
                    .images
                    .announced_list(&key, n_chunks)
                    .await
                    .ok_or_else(|| FarmError::Exists {
                        code: "chunk_list_needed",
                        message: format!(
                            "image {name}: this server does not hold the {n_chunks} chunks \
                             announced for it (it restarted, or they were asked out of \
                             order); commit again with the chunk list"
                        ),
                    })?;
                CommitRequest {
                    chunks,
                    announced_chunks: None,
                    ..request
                }
            }
            None => request,
        };
        if request.size > self.config.max_image_bytes {
            return Err(FarmError::TooLarge(format!(
                "image {name} is larger than the {} bytes this server accepts",
                self.config.max_image_bytes
            )));
        }
        if let Some(bad) = request
            .chunks
            .iter()
            .find(|entry| entry.len == 0 || entry.len > MAX_CHUNK_BYTES)
        {
            return Err(FarmError::invalid(
                "bad_chunk",
                format!(
                    "image {name}: chunk {} has length {}, outside 1..={MAX_CHUNK_BYTES}",
                    bad.hash, bad.len
                ),
            ));
        }
        let listed: u64 = request
            .chunks
            .iter()
            .map(|entry| u64::from(entry.len))
            .sum();
        if listed != request.size {
            return Err(FarmError::Mismatch {
                code: "size_mismatch",
                message: format!(
                    "image {name}: the chunks add up to {listed} bytes, not the {} announced; nothing was stored",
                    request.size
                ),
            });
        }
        let hashes: Vec<ChunkHash> = request.chunks.iter().map(|entry| entry.hash).collect();
        // Pinned before the check: see the module docs.
        self.pin_chunks(build, job, &hashes).await?;
        let missing = self.images.chunks.missing(&hashes).await?;
        if !missing.is_empty() {
            return Err(FarmError::MissingChunks {
                message: format!(
                    "image {name}: the server lacks {} of its chunks; send them and commit again",
                    missing.len()
                ),
                missing: missing.iter().map(ChunkHash::to_hex).collect(),
            });
        }
        let chunks = self.images.blocking();
        let entries = request.chunks;
        let verify_started = Instant::now();
        let in_order = self.images.take_in_order_hash(&key);
        let (digests, entries, read_back) = blocking(move || {
            if let Some(in_order) = in_order {
                let mut in_order = in_order.blocking_lock();
                in_order.advance(&chunks, &HashMap::new())?;
                if !in_order.broken
                    && in_order.hashed == in_order.entries.len()
                    && in_order.entries == entries
                {
                    let digests = in_order.hasher.clone().finish();
                    return Ok((digests, entries, false));
                }
            }
            let digests = kiln_blob::chunks::read_image(&chunks, &entries, |_| Ok(()))?;
            Ok((digests, entries, true))
        })
        .await?;
        tracing::debug!(image = %name, read_back, secs = verify_started.elapsed().as_secs_f64(), "image digests ready");
        if digests.blake3 != request.blake3 || digests.sha256 != request.sha256 {
            return Err(FarmError::Mismatch {
                code: "hash_mismatch",
                message: format!(
                    "image {name}: its chunks hash to BLAKE3 {} and SHA-256 {}, but the client said {} and {}; nothing was stored",
                    digests.blake3, digests.sha256, request.blake3, request.sha256
                ),
            });
        }
        // The chunks' names become durable before an image lists them.
        self.images.chunks.persist().await?;
        // And they are findable in the index: a pack shared with another upload whose
        // write failed takes its chunks down with it; the client sends them again.
        let lost = self.images.chunks.not_persisted(&hashes).await?;
        if !lost.is_empty() {
            return Err(FarmError::MissingChunks {
                message: format!(
                    "image {name}: {} of its chunks were lost with a pack that could not be written; send them and commit again",
                    lost.len()
                ),
                missing: lost.iter().map(ChunkHash::to_hex).collect(),
            });
        }
        let info = self
            .record_image(build, job, lease, name, &digests, &entries)
            .await?;
        tracing::info!(build = %build, job = %job, image = %name, size = digests.size, chunks = entries.len(), "image committed");
        Ok(info)
    }

    /// Records an image made of `entries` under the lease, and what to answer with.
    async fn record_image(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        name: &str,
        digests: &kiln_blob::Digests,
        entries: &[ChunkEntry],
    ) -> FarmResult<ImageInfo> {
        let now = kiln_common::now_micros();
        self.store
            .add_image(
                build,
                job,
                lease,
                &NewImage {
                    name: name.to_owned(),
                    size: digests.size,
                    blake3: digests.blake3.clone(),
                    sha256: digests.sha256.clone(),
                    blob_key: digests.blake3.clone(),
                    created_at: now,
                    chunk_list: pack_chunk_list(entries),
                },
            )
            .await?;
        // The image keeps its chunks now; collections that start from here on see it.
        let hashes: Vec<ChunkHash> = entries.iter().map(|entry| entry.hash).collect();
        self.images.recent_pins.forget(build, job);
        self.store
            .release_pins(
                &format!("{build}/{job}"),
                &hashes,
                kiln_common::now_micros(),
            )
            .await?;
        let config_type = self.store.get_job(build, job).await?.config_type;
        Ok(ImageInfo {
            build: build.to_owned(),
            job_id: job.to_owned(),
            config_type,
            name: name.to_owned(),
            size: digests.size,
            blake3: digests.blake3.clone(),
            sha256: digests.sha256.clone(),
            created_at: now,
        })
    }

    /// An image that arrives whole (the older upload call): spooled while its BLAKE3 is
    /// checked against `expected` (the hash the client sent with it), then cut into
    /// chunks and recorded under the lease.
    pub async fn put_whole_image<S, E>(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        name: &str,
        expected: Option<&str>,
        mut body: S,
    ) -> FarmResult<ImageInfo>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        // Refuse a stale lease, or one upload too many, before reading a large body.
        let holder = self.store.check_lease(build, job, lease).await?;
        let _slot = self
            .images
            .uploads
            .try_take(&holder.client_id, self.config.max_uploads_per_client)?;
        let expected = expected
            .filter(|value| kiln_blob::is_valid_key(value))
            .ok_or_else(|| {
                FarmError::invalid(
                    "no_hash",
                    format!(
                        "an image upload carries its BLAKE3 hash (64 lowercase hex) in the {} header",
                        kiln_proto::BLAKE3_HEADER
                    ),
                )
            })?;
        let storing = |err: std::io::Error| {
            FarmError::from(BlobError::io(format!("storing image {name}"), err))
        };
        let scratch = self.scratch_dir();
        let mut file = tokio::task::spawn_blocking(move || {
            tempfile::Builder::new()
                .prefix("image-")
                .tempfile_in(scratch)
        })
        .await
        .map_err(|err| FarmError::task("staging an image", err))?
        .map_err(|err| FarmError::from(BlobError::io(format!("staging image {name}"), err)))?;
        let mut hasher = kiln_blob::ImageHasher::new();
        let mut size = 0u64;
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|err| {
                FarmError::invalid(
                    "upload_interrupted",
                    format!("image {name}: the upload broke off: {err}"),
                )
            })?;
            size += piece.len() as u64;
            if size > self.config.max_image_bytes {
                return Err(FarmError::TooLarge(format!(
                    "image {name} is larger than the {} bytes this server accepts",
                    self.config.max_image_bytes
                )));
            }
            hasher.update(&piece);
            file = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                file.write_all(&piece).map(|()| file)
            })
            .await
            .map_err(|err| FarmError::task("staging an image", err))?
            .map_err(storing)?;
        }
        let digests = hasher.finish();
        if digests.blake3 != expected {
            return Err(FarmError::invalid(
                "hash_mismatch",
                format!("image {name}: the bytes received hash to {} but the client said {expected}; nothing was stored", digests.blake3),
            ));
        }
        // The chunks are known only once cut: they are pinned then, and looked for
        // again; any a collection took meanwhile are stored again.
        let file = Arc::new(file);
        let mut attempts = 0;
        let (chunked, stats, entries) = loop {
            let chunks = self.images.blocking();
            let staged = file.clone();
            let (chunked, stats) = blocking(move || {
                let reader = std::fs::File::open(staged.path())
                    .map_err(|err| BlobError::io("reading a staged image", err))?;
                Ok(kiln_blob::chunks::ingest(
                    &chunks,
                    reader,
                    &ChunkParams::default(),
                )?)
            })
            .await?;
            let entries: Vec<ChunkEntry> =
                chunked.chunks.iter().map(|chunk| chunk.entry()).collect();
            let hashes: Vec<ChunkHash> = entries.iter().map(|entry| entry.hash).collect();
            self.pin_chunks(build, job, &hashes).await?;
            attempts += 1;
            let missing = self.images.chunks.missing(&hashes).await?;
            if missing.is_empty() {
                break (chunked, stats, entries);
            }
            if attempts == 3 {
                return Err(FarmError::MissingChunks {
                    message: format!(
                        "image {name}: {} of its chunks were collected as they were stored;                          send it again",
                        missing.len()
                    ),
                    missing: missing.iter().map(ChunkHash::to_hex).collect(),
                });
            }
        };
        self.store
            .add_counters(&[
                (RECEIVED, chunked.digests.size as i64),
                (STORED, stats.new_bytes as i64),
                (CHUNKS, stats.new_chunks as i64),
            ])
            .await?;
        let info = self
            .record_image(build, job, lease, name, &chunked.digests, &entries)
            .await?;
        tracing::info!(build = %build, job = %job, image = %name, size = info.size, "image stored");
        Ok(info)
    }

    /// A stored image with its chunk list.
    pub async fn image(&self, build: &str, job: &str, name: &str) -> FarmResult<StoredImage> {
        let image = self.store.get_image(build, job, name).await?;
        let packed = image.chunk_list.as_deref().ok_or_else(|| {
            FarmError::Internal(format!(
                "image {name} of {build}/{job} has not been converted to chunks"
            ))
        })?;
        let entries = unpack_chunk_list(packed)
            .map_err(|err| FarmError::Internal(format!("image {name} of {build}/{job}: {err}")))?;
        Ok(StoredImage {
            info: image.info,
            entries,
        })
    }

    /// A stored image's digests and chunk list.
    pub async fn image_index(&self, build: &str, job: &str, name: &str) -> FarmResult<ImageIndex> {
        let image = self.image(build, job, name).await?;
        Ok(ImageIndex {
            name: name.to_owned(),
            size: image.info.size,
            blake3: image.info.blake3,
            sha256: image.info.sha256,
            chunks: image.entries,
        })
    }

    /// The bytes of `span` (end exclusive) of a stored image, read chunk by chunk (each
    /// checked against its name) on a blocking thread a few chunks ahead of the reader.
    pub fn read_image_span(&self, image: StoredImage, span: Range<u64>) -> ByteStream {
        let mut offset = 0u64;
        let mut wanted = Vec::new();
        for entry in &image.entries {
            let chunk_start = offset;
            let chunk_end = offset + u64::from(entry.len);
            offset = chunk_end;
            if chunk_end <= span.start {
                continue;
            }
            if chunk_start >= span.end {
                break;
            }
            let from = span.start.saturating_sub(chunk_start) as usize;
            let to = (span.end.min(chunk_end) - chunk_start) as usize;
            wanted.push((entry.hash, from..to));
        }
        let chunks = self.images.blocking();
        produce(move |sender| {
            let hashes = wanted.iter().map(|(hash, _)| *hash).collect();
            for (frame, (_, piece)) in chunks.frames(hashes).zip(wanted) {
                let bytes = frame.and_then(|frame| {
                    frame.decode().map_err(|err| {
                        BlobError::io("reading a stored chunk", std::io::Error::other(err))
                    })
                });
                let failed = bytes.is_err();
                if sender
                    .blocking_send(bytes.map(|bytes| bytes.slice(piece)))
                    .is_err()
                    || failed
                {
                    return;
                }
            }
        })
    }

    /// The frames of the chunks asked for, in that order, ready to send.
    pub async fn fetch_frames(&self, hashes: Vec<ChunkHash>) -> FarmResult<ByteStream> {
        if hashes.len() > MAX_FETCH {
            return Err(FarmError::TooLarge(format!(
                "{} chunks in one fetch; at most {MAX_FETCH}",
                hashes.len()
            )));
        }
        // Refuse up front what cannot be served, rather than cutting the stream later.
        let missing = self.images.chunks.missing(&hashes).await?;
        if let Some(hash) = missing.first() {
            return Err(BlobError::NotFound(format!("chunk {hash}")).into());
        }
        let chunks = self.images.blocking();
        Ok(produce(move |sender| {
            for frame in chunks.frames(hashes) {
                let wire = frame.map(|frame| {
                    let mut wire = Vec::with_capacity(frame.wire_len());
                    frame.write_to(&mut wire);
                    Bytes::from(wire)
                });
                let failed = wire.is_err();
                if sender.blocking_send(wire).is_err() || failed {
                    return;
                }
            }
        }))
    }

    /// What the server has received and keeps.
    pub async fn storage_stats(&self) -> FarmResult<StorageStats> {
        let counters = self.store.counters().await?;
        let counter = |name: &str| counters.get(name).copied().unwrap_or(0).max(0) as u64;
        let totals = self.store.image_totals().await?;
        Ok(StorageStats {
            bytes_received: counter(RECEIVED),
            bytes_deduplicated: counter(DEDUPLICATED),
            bytes_stored: counter(STORED),
            chunks_stored: counter(CHUNKS),
            image_bytes: totals.bytes,
            images: totals.images,
        })
    }

    /// The chunks some image lists.
    async fn live_chunks(&self) -> FarmResult<HashSet<ChunkHash>> {
        let mut live = HashSet::new();
        for packed in self.store.chunk_lists().await? {
            let entries = unpack_chunk_list(&packed)
                .map_err(|err| FarmError::Internal(format!("a stored chunk list: {err}")))?;
            live.extend(entries.into_iter().map(|entry| entry.hash));
        }
        Ok(live)
    }

    /// Keeps `hashes` from collection for [`PIN_TTL`], in the state store.
    /// The pins of one job's uploads are theirs: another upload's commit of the same
    /// chunks does not end them.
    async fn pin_chunks(&self, build: &str, job: &str, hashes: &[ChunkHash]) -> FarmResult<()> {
        let until = kiln_common::now_micros() + PIN_TTL.as_micros() as i64;
        self.store
            .pin_chunks(&format!("{build}/{job}"), hashes, until)
            .await?;
        Ok(())
    }

    /// Deletes every chunk no image lists and no upload has pinned, then rewrites the
    /// packs less than [`COMPACT_BELOW`] live; returns how many chunks and their bytes.
    /// Also sets the stored-bytes counters to what the store holds. Safe while uploads
    /// run, on this server or another on the same state store (see the module docs).
    pub async fn collect_garbage(&self) -> FarmResult<(u64, u64)> {
        let _one_at_a_time = self.images.gc_serial.lock().await;
        // Taken before the mark: a pin released after it (an image recorded while
        // this collection runs, which the mark may not have seen) still holds.
        let started = kiln_common::now_micros();
        self.store.forget_pins(started).await?;
        let live = self.live_chunks().await?;
        let mut candidates: Vec<ChunkHash> = Vec::new();
        let mut stored_bytes = 0u64;
        let mut stored_chunks = 0u64;
        let mut after = None;
        loop {
            let page = self.images.chunks.list_page(after, LIST_PAGE).await?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.hash);
            for chunk in &page {
                stored_bytes += chunk.bytes;
                stored_chunks += 1;
                if !live.contains(&chunk.hash) {
                    candidates.push(chunk.hash);
                }
            }
        }
        // Pinned candidates are skipped by the store, at the moment it removes.
        let mut freed = 0u64;
        let mut freed_bytes = 0u64;
        for batch in candidates.chunks(LIST_PAGE) {
            let before = self.images.chunks.missing(batch).await?.len();
            freed_bytes += self
                .images
                .chunks
                .remove_unpinned_since(batch, started)
                .await?;
            let after = self.images.chunks.missing(batch).await?.len();
            freed += (after - before) as u64;
        }
        let compacted = self.images.chunks.compact(COMPACT_BELOW).await?;
        if compacted.packs_rewritten > 0 {
            tracing::info!(
                packs = compacted.packs_rewritten,
                bytes_freed = compacted.bytes_freed,
                bytes_written = compacted.bytes_written,
                "sparse packs rewritten"
            );
        }
        self.store
            .set_counters(&[
                (STORED, stored_bytes.saturating_sub(freed_bytes) as i64),
                (CHUNKS, stored_chunks.saturating_sub(freed) as i64),
            ])
            .await?;
        Ok((freed, freed_bytes))
    }

    /// Converts images stored whole (before chunking) into chunk lists, then deletes
    /// their whole-file blobs. Runs at start, before the server serves.
    pub(super) async fn convert_legacy_images(&self) -> anyhow::Result<()> {
        let legacy = self.store.legacy_images().await?;
        if legacy.is_empty() {
            return Ok(());
        }
        tracing::info!(
            n_images = legacy.len(),
            "converting whole-file images to chunks"
        );
        let mut keys = HashSet::new();
        for image in &legacy {
            let read = self.files.get(&image.blob_key, None).await?;
            let reader = tokio_util::io::StreamReader::new(
                read.body.map(|piece| piece.map_err(std::io::Error::other)),
            );
            let reader = tokio_util::io::SyncIoBridge::new(reader);
            let chunks = self.images.blocking();
            let (chunked, stats) = tokio::task::spawn_blocking(move || {
                kiln_blob::chunks::ingest(&chunks, reader, &ChunkParams::default())
            })
            .await??;
            if chunked.digests.blake3 != image.blob_key {
                anyhow::bail!(
                    "image {} of {}/{}: its stored bytes hash to {}, not {}; left as it is",
                    image.name,
                    image.build,
                    image.job,
                    chunked.digests.blake3,
                    image.blob_key
                );
            }
            let entries: Vec<ChunkEntry> =
                chunked.chunks.iter().map(|chunk| chunk.entry()).collect();
            self.store
                .set_chunk_list(
                    &image.build,
                    &image.job,
                    &image.name,
                    &pack_chunk_list(&entries),
                )
                .await?;
            self.store
                .add_counters(&[
                    (STORED, stats.new_bytes as i64),
                    (CHUNKS, stats.new_chunks as i64),
                ])
                .await?;
            keys.insert(image.blob_key.clone());
        }
        for key in keys {
            if !self.store.files_key_in_use(&key).await? {
                self.files.remove(&key).await?;
            }
        }
        Ok(())
    }
}

fn frame_refused(err: kiln_blob::frames::FrameError) -> FarmError {
    FarmError::Mismatch {
        code: "chunk_mismatch",
        message: format!("{err}; the chunk was not stored"),
    }
}

/// Hashes `images` on as far as their chunks are stored (see [`InOrderHash::advance`]).
fn advance_all(
    images: &[Arc<HashLock>],
    chunks: &BlockingChunks,
    fresh: &HashMap<ChunkHash, Bytes>,
) {
    for image in images {
        let mut image = image.blocking_lock();
        if let Err(err) = image.advance(chunks, fresh) {
            // The commit reads the image back instead.
            tracing::warn!(cause = %kiln_proto::error_chain(&err), "cannot hash an image in order");
            image.broken = true;
        }
    }
}

/// What [`store_checked`] did: what storing added, the refusal of the first bad chunk
/// if any, and the good chunks' bytes for the in-order hash.
type Checked = (
    kiln_blob::PutStats,
    Option<FarmError>,
    HashMap<ChunkHash, Bytes>,
);

/// Checks each frame against its name and stores the good ones before the first bad
/// one, which is returned as the refusal.
fn store_checked(chunks: &BlockingChunks, frames: Vec<Frame>) -> FarmResult<Checked> {
    let mut good = Vec::with_capacity(frames.len());
    let mut fresh = HashMap::with_capacity(frames.len());
    let mut refused = None;
    for frame in frames {
        match frame.decode() {
            Ok(bytes) => {
                fresh.insert(frame.hash, bytes);
                good.push(frame);
            }
            Err(err) => {
                refused = Some(frame_refused(err));
                break;
            }
        }
    }
    let stats = chunks.put(good)?;
    Ok((stats, refused, fresh))
}

/// A stream fed by `producer` on a blocking thread, a few items ahead of its reader;
/// the producer stops when the reader goes away.
fn produce(
    producer: impl FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, BlobError>>) + Send + 'static,
) -> ByteStream {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, BlobError>>(STREAM_AHEAD);
    tokio::task::spawn_blocking(move || producer(sender));
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_blob::{LocalChunkStore, PutStats, StoredChunk};
    use tokio::sync::Notify;

    /// A chunk store whose reads wait at a gate that only a task on the runtime opens:
    /// as sqlx's pool, whose connections go back to it through spawned tasks, does.
    struct GatedReads {
        inner: LocalChunkStore,
        /// Told when a read reaches the gate.
        entered: Arc<Notify>,
        gate: Arc<Notify>,
    }

    #[async_trait::async_trait]
    impl ChunkStore for GatedReads {
        async fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
            self.inner.missing(hashes).await
        }
        async fn put(&self, frames: Vec<Frame>) -> Result<PutStats, BlobError> {
            self.inner.put(frames).await
        }
        async fn persist(&self) -> Result<(), BlobError> {
            self.inner.persist().await
        }
        async fn read_frame(&self, hash: &ChunkHash) -> Result<Frame, BlobError> {
            self.entered.notify_one();
            self.gate.notified().await;
            self.inner.read_frame(hash).await
        }
        async fn list_page(
            &self,
            after: Option<ChunkHash>,
            limit: usize,
        ) -> Result<Vec<StoredChunk>, BlobError> {
            self.inner.list_page(after, limit).await
        }
        async fn remove(&self, hashes: &[ChunkHash]) -> Result<u64, BlobError> {
            self.inner.remove(hashes).await
        }
    }

    /// A commit asking for an image's announced list while a blocking thread hashes
    /// that image, and waits for the store, must leave the runtime's workers free:
    /// the store's read needs them. Blocking the only worker on the hash's lock here
    /// hung the whole server (found by a 2,000-job throughput bench).
    #[test]
    fn asking_for_an_announced_list_while_its_hash_waits_for_the_store_leaves_the_runtime_free() {
        let (done, answer) = std::sync::mpsc::channel();
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = GatedReads {
            inner: LocalChunkStore::open(dir.path()).expect("chunk store"),
            entered: Arc::new(Notify::new()),
            gate: Arc::new(Notify::new()),
        };
        let (entered, gate) = (store.entered.clone(), store.gate.clone());
        // Not joined: when the runtime hangs, this thread hangs with it.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            // On the one worker, as a request handler runs.
            let listed = runtime.block_on(async move {
                tokio::spawn(async move {
                    let images = Images::new(Arc::new(store));
                    let key = ("b1".to_owned(), "j1".to_owned(), "disk.img".to_owned());
                    let in_order = images.in_order_hash(key.clone(), true);
                    in_order.lock().await.entries.push(ChunkEntry {
                        hash: ChunkHash::of(b"not stored"),
                        len: 10,
                    });
                    let chunks = images.blocking();
                    let hashing = tokio::task::spawn_blocking(move || {
                        advance_all(&[in_order], &chunks, &HashMap::new())
                    });
                    // The blocking thread holds the hash's lock and waits at the gate.
                    entered.notified().await;
                    tokio::spawn(async move { gate.notify_one() });
                    let listed = images.announced_list(&key, 1).await;
                    hashing.await.expect("hashing task");
                    listed
                })
                .await
                .expect("handler task")
            });
            let _ = done.send(listed);
        });
        let listed = answer
            .recv_timeout(Duration::from_secs(30))
            .expect("the announced list never came: the runtime's worker was blocked");
        assert_eq!(listed.map(|entries| entries.len()), Some(1));
    }

    #[test]
    fn upload_slots_refuse_one_over_the_limit_per_client_and_come_back_when_dropped() {
        let slots = UploadSlots::default();
        let first = slots.try_take("client-a", 2).expect("first slot");
        let second = slots.try_take("client-a", 2).expect("second slot");
        let refused = slots
            .try_take("client-a", 2)
            .err()
            .expect("a third is refused");
        assert!(
            matches!(refused, FarmError::TooManyUploads(_)),
            "{refused:?}"
        );
        // Another client has slots of its own.
        let other = slots
            .try_take("client-b", 2)
            .expect("another client's slot");
        drop(first);
        let third = slots.try_take("client-a", 2).expect("a slot given back");
        drop((second, third, other));
        assert_eq!(slots.n_sending("client-a"), 0);
        assert!(slots.in_flight.lock().unwrap().is_empty());
    }
}
