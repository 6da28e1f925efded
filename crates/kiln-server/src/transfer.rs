//! Chunked image transfer and storage: which chunks are missing, receiving chunks,
//! committing an image, serving it back (whole, by range, by chunk), deleting builds
//! and collecting chunks no image uses. See docs/transfer.md.
//!
//! Two rules keep collection from racing uploads. Every chunk an upload asks about
//! or sends is *pinned* until an image that lists it is committed (at most
//! [`PIN_TTL`]: an upload abandoned for good stops protecting its chunks), and
//! collection skips pinned chunks. And a
//! commit checks that all its chunks are present and records the image while holding
//! [`Storage::gc_lock`] for reading, which collection holds for writing while it
//! deletes: a chunk is never deleted between a commit's check and its record, and a
//! commit that finds a chunk gone answers `missing_chunks`, so the client sends it
//! again.

use crate::api::lease_of;
use crate::auth::Caller;
use crate::error::ApiErr;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt;
use kiln_blob::chunking::ChunkParams;
use kiln_blob::frames::{pack_chunk_list, unpack_chunk_list, FrameReader, MAX_CHUNK_BYTES};
use kiln_blob::{BlobError, ChunkEntry, ChunkHash, ChunkStore, Frame};
use kiln_proto::api::ImageInfo;
use kiln_proto::names::check_name;
use kiln_proto::transfer::{
    CommitRequest, DeleteReport, FetchRequest, ImageIndex, MissingRequest, MissingResponse,
    PutChunksResponse, StorageStats, FRAMES_CONTENT_TYPE, MAX_FETCH, MAX_MISSING_QUERY,
};
use kiln_store::{JobStore, NewImage};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a chunk an upload mentioned is safe from collection.
pub const PIN_TTL: Duration = Duration::from_secs(3600);
/// Bytes of frames received before they are checked, stored (one sync) and hashed
/// into their image; what bounds a body's memory on the server.
const PUT_BATCH_BYTES: usize = 8 << 20;
/// Decoded chunks a download may hold ahead of the network.
const STREAM_AHEAD: usize = 16;

/// Counter names in the store.
const RECEIVED: &str = "bytes_received";
const DEDUPLICATED: &str = "bytes_deduplicated";
const STORED: &str = "bytes_stored";
const CHUNKS: &str = "chunks_stored";

type Shared = State<Arc<AppState>>;

/// The chunk store with what keeps collection and uploads apart.
pub struct Storage {
    pub(crate) chunks: Arc<dyn ChunkStore>,
    /// Chunks uploads mentioned, and when.
    pins: Mutex<HashMap<ChunkHash, Instant>>,
    /// Commits hold it for reading, collection for writing while it deletes.
    gc_lock: tokio::sync::RwLock<()>,
    /// One collection at a time.
    gc_serial: tokio::sync::Mutex<()>,
    /// Images being hashed in order while their chunks arrive, by (build, job, name).
    hashing: Mutex<HashMap<ImageKey, Arc<Mutex<InOrderHash>>>>,
}

/// An image of a job: (build, job, image name).
type ImageKey = (String, String, String);

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
            broken: false,
            touched: Instant::now(),
        }
    }

    /// Hashes announced chunks, in order, as far as they are stored, taking the bytes
    /// from `fresh` (chunks just received and checked) before reading the store.
    fn advance(
        &mut self,
        chunks: &dyn ChunkStore,
        fresh: &HashMap<ChunkHash, Bytes>,
    ) -> Result<(), BlobError> {
        while self.hashed < self.entries.len() && !self.broken {
            let entry = self.entries[self.hashed];
            let bytes = match fresh.get(&entry.hash) {
                Some(bytes) => bytes.clone(),
                None => match chunks.read_unchecked(&entry.hash) {
                    Ok(bytes) => bytes,
                    Err(BlobError::NotFound(_)) => break,
                    Err(err) => return Err(err),
                },
            };
            if bytes.len() != entry.len as usize {
                self.broken = true;
                break;
            }
            self.hasher.update(&bytes);
            self.hashed += 1;
        }
        Ok(())
    }
}

impl Storage {
    pub fn new(chunks: Arc<dyn ChunkStore>) -> Self {
        Storage {
            chunks,
            pins: Mutex::default(),
            gc_lock: tokio::sync::RwLock::new(()),
            gc_serial: tokio::sync::Mutex::new(()),
            hashing: Mutex::default(),
        }
    }

    /// The in-order hash of an image, a new one when `restart`.
    fn in_order_hash(
        &self,
        key: (String, String, String),
        restart: bool,
    ) -> Arc<Mutex<InOrderHash>> {
        let mut hashing = self.hashing.lock().expect("hashing lock");
        // Uploads abandoned long ago are forgotten here.
        hashing.retain(|_, image| {
            image
                .try_lock()
                .map_or(true, |image| image.touched.elapsed() < PIN_TTL)
        });
        if restart {
            let fresh = Arc::new(Mutex::new(InOrderHash::new()));
            hashing.insert(key, fresh.clone());
            return fresh;
        }
        hashing
            .entry(key)
            .or_insert_with(|| {
                let mut image = InOrderHash::new();
                // Joined half-way (after a restart of the server): read back at commit.
                image.broken = true;
                Arc::new(Mutex::new(image))
            })
            .clone()
    }

    /// The images of a job being hashed in order.
    fn in_order_hashes_of(&self, build: &str, job: &str) -> Vec<Arc<Mutex<InOrderHash>>> {
        self.hashing
            .lock()
            .expect("hashing lock")
            .iter()
            .filter(|((b, j, _), _)| b == build && j == job)
            .map(|(_, image)| image.clone())
            .collect()
    }

    fn take_in_order_hash(
        &self,
        key: &(String, String, String),
    ) -> Option<Arc<Mutex<InOrderHash>>> {
        self.hashing.lock().expect("hashing lock").remove(key)
    }

    fn pin<'a>(&self, hashes: impl IntoIterator<Item = &'a ChunkHash>) {
        let now = Instant::now();
        let mut pins = self.pins.lock().expect("pins lock");
        for hash in hashes {
            pins.insert(*hash, now);
        }
    }

    /// Drops the pins of chunks an image now lists: the image keeps them.
    fn unpin<'a>(&self, hashes: impl IntoIterator<Item = &'a ChunkHash>) {
        let mut pins = self.pins.lock().expect("pins lock");
        for hash in hashes {
            pins.remove(hash);
        }
    }

    fn is_pinned(&self, hash: &ChunkHash, now: Instant) -> bool {
        let pins = self.pins.lock().expect("pins lock");
        pins.get(hash)
            .is_some_and(|pinned_at| now.duration_since(*pinned_at) < PIN_TTL)
    }

    fn forget_old_pins(&self) {
        let now = Instant::now();
        self.pins
            .lock()
            .expect("pins lock")
            .retain(|_, pinned_at| now.duration_since(*pinned_at) < PIN_TTL);
    }
}

/// How many uploads each client is sending now: a counting semaphore per client id,
/// tried (never waited on) by every body-carrying upload call. A client at its limit
/// is answered `429 too_many_uploads` before its body is read.
#[derive(Default)]
pub struct UploadSlots {
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

/// One upload's place among its client's; given back when dropped.
pub struct UploadSlot {
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
    client_id: String,
}

impl UploadSlots {
    /// A slot for one more upload of `client_id`, or the refusal when it sends
    /// `max` already.
    pub fn try_take(&self, client_id: &str, max: usize) -> Result<UploadSlot, ApiErr> {
        let mut in_flight = self.in_flight.lock().expect("upload slots lock");
        let n_sending = in_flight.entry(client_id.to_owned()).or_default();
        if *n_sending >= max {
            return Err(ApiErr::TooManyUploads(format!(
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

/// Runs blocking chunk-store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiErr> + Send + 'static,
) -> Result<T, ApiErr> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| ApiErr::Internal(format!("chunk store task failed: {err}")))?
}

/// The lease the call carries, checked current (that it is the caller's own, the
/// route's `Holder` access checked before the handler ran).
async fn check_holder(
    state: &AppState,
    build: &str,
    job: &str,
    headers: &HeaderMap,
) -> Result<String, ApiErr> {
    Ok(check_holder_of(state, build, job, headers).await?.0)
}

/// As [`check_holder`]; returns the lease and the holding client.
pub(crate) async fn check_holder_of(
    state: &AppState,
    build: &str,
    job: &str,
    headers: &HeaderMap,
) -> Result<(String, kiln_store::LeaseHolder), ApiErr> {
    let lease = lease_of(headers)?.to_owned();
    let holder = state.store.check_lease(build, job, &lease).await?;
    Ok((lease, holder))
}

/// `POST /v1/jobs/{build}/{job}/chunks/missing`
pub async fn missing(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    Json(request): Json<MissingRequest>,
) -> Result<Json<MissingResponse>, ApiErr> {
    check_holder(&state, &build, &job, &headers).await?;
    if request.chunks.len() > MAX_MISSING_QUERY {
        return Err(ApiErr::TooLarge(format!(
            "{} chunks in one question; at most {MAX_MISSING_QUERY}",
            request.chunks.len()
        )));
    }
    let hashes: Vec<ChunkHash> = request.chunks.iter().map(|entry| entry.hash).collect();
    state.storage.pin(&hashes);
    let in_order = match &request.image {
        Some(image) => {
            check_name("image name", image).map_err(|msg| ApiErr::bad_request("bad_name", msg))?;
            let key = (build.clone(), job.clone(), image.clone());
            let in_order = state.storage.in_order_hash(key, request.offset == 0);
            {
                let mut in_order = in_order.lock().expect("in-order hash lock");
                if request.offset != in_order.announced {
                    in_order.broken = true;
                }
                in_order.entries.extend_from_slice(&request.chunks);
                in_order.announced += request.chunks.iter().map(|e| u64::from(e.len)).sum::<u64>();
                in_order.touched = Instant::now();
            }
            Some(in_order)
        }
        None => None,
    };
    let chunks = state.storage.chunks.clone();
    let missing = blocking(move || Ok(chunks.missing(&hashes)?)).await?;
    if in_order.is_some() {
        // Chunks the server had already are hashed on while the client cuts the next.
        advance_in_background(&state.storage, &build, &job);
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
        state
            .store
            .add_counters(&[(DEDUPLICATED, deduplicated as i64)])
            .await?;
    }
    Ok(Json(MissingResponse { missing }))
}

/// `POST /v1/jobs/{build}/{job}/chunks`: a body of frames, each checked against its
/// name before it is stored.
pub async fn put_chunks(
    State(state): Shared,
    _caller: Caller,
    Path((build, job)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PutChunksResponse>, ApiErr> {
    let (_, holder) = check_holder_of(&state, &build, &job, &headers).await?;
    let _slot = state
        .uploads
        .try_take(&holder.client_id, state.config.max_uploads_per_client)?;
    let mut reader = FrameReader::new();
    let mut batch: Vec<Frame> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut report = PutChunksResponse {
        chunks: 0,
        bytes_received: 0,
        bytes_stored: 0,
    };
    let mut new_chunks = 0u64;
    let mut stream = body.into_data_stream();
    // Whole frames that arrived before a damaged header or a broken connection are
    // still checked and stored: an interrupted upload need not send them again.
    let mut cut_short: Option<ApiErr> = None;
    let outcome: Result<(), ApiErr> = async {
        loop {
            let piece = stream.next().await;
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
                    cut_short = Some(ApiErr::bad_request(
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
                state.storage.pin(frames.iter().map(|frame| &frame.hash));
                let chunks = state.storage.chunks.clone();
                let store_started = Instant::now();
                let images = state.storage.in_order_hashes_of(&build, &job);
                let (stats, refused) = blocking(move || {
                    let (stats, refused, fresh) = store_checked(&*chunks, frames)?;
                    // The images of this job are hashed on from the bytes at hand,
                    // which are let go before the next batch is read: memory stays
                    // at about one batch a body.
                    advance_all(&images, &*chunks, &fresh);
                    Ok((stats, refused))
                })
                .await?;
                tracing::debug!(
                    secs = store_started.elapsed().as_secs_f64(),
                    new_bytes = stats.new_bytes,
                    "chunks checked and stored"
                );
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
    state
        .store
        .add_counters(&[
            (RECEIVED, report.bytes_received as i64),
            (STORED, report.bytes_stored as i64),
            (CHUNKS, new_chunks as i64),
        ])
        .await?;
    outcome?;
    Ok(Json(report))
}

fn frame_refused(err: kiln_blob::frames::FrameError) -> ApiErr {
    ApiErr::Unprocessable {
        code: "chunk_mismatch",
        message: format!("{err}; the chunk was not stored"),
    }
}

/// Hashes the images of a job on, as far as their chunks are stored, on a blocking
/// thread; a commit takes the same lock, so it waits for this to finish.
fn advance_in_background(storage: &Storage, build: &str, job: &str) {
    let chunks = storage.chunks.clone();
    let images = storage.in_order_hashes_of(build, job);
    if images.is_empty() {
        return;
    }
    tokio::task::spawn_blocking(move || advance_all(&images, &*chunks, &HashMap::new()));
}

/// Hashes `images` on as far as their chunks are stored (see [`InOrderHash::advance`]).
fn advance_all(
    images: &[Arc<Mutex<InOrderHash>>],
    chunks: &dyn ChunkStore,
    fresh: &HashMap<ChunkHash, Bytes>,
) {
    for image in images {
        let mut image = image.lock().expect("in-order hash lock");
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
    Option<ApiErr>,
    HashMap<ChunkHash, Bytes>,
);

/// Checks each frame against its name and stores the good ones before the first bad
/// one, which is returned as the refusal.
fn store_checked(chunks: &dyn ChunkStore, frames: Vec<Frame>) -> Result<Checked, ApiErr> {
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
    let stats = chunks.put(&good)?;
    Ok((stats, refused, fresh))
}

/// `POST /v1/jobs/{build}/{job}/images/{name}/commit`
pub async fn commit(
    State(state): Shared,
    _caller: Caller,
    Path((build, job, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    Json(request): Json<CommitRequest>,
) -> Result<(StatusCode, Json<ImageInfo>), ApiErr> {
    let lease = check_holder(&state, &build, &job, &headers).await?;
    if request.size > state.config.max_image_bytes {
        return Err(ApiErr::TooLarge(format!(
            "image {name} is larger than the {} bytes this server accepts",
            state.config.max_image_bytes
        )));
    }
    if let Some(bad) = request
        .chunks
        .iter()
        .find(|entry| entry.len == 0 || entry.len > MAX_CHUNK_BYTES)
    {
        return Err(ApiErr::bad_request(
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
        return Err(ApiErr::Unprocessable {
            code: "size_mismatch",
            message: format!(
                "image {name}: the chunks add up to {listed} bytes, not the {} announced; nothing was stored",
                request.size
            ),
        });
    }
    let hashes: Vec<ChunkHash> = request.chunks.iter().map(|entry| entry.hash).collect();
    state.storage.pin(&hashes);
    let _no_collection = state.storage.gc_lock.read().await;
    let chunks = state.storage.chunks.clone();
    let missing = blocking(move || Ok(chunks.missing(&hashes)?)).await?;
    if !missing.is_empty() {
        return Err(ApiErr::MissingChunks {
            message: format!(
                "image {name}: the server lacks {} of its chunks; send them and commit again",
                missing.len()
            ),
            missing: missing.iter().map(ChunkHash::to_hex).collect(),
        });
    }
    let chunks = state.storage.chunks.clone();
    let entries = request.chunks;
    let verify_started = Instant::now();
    let key = (build.clone(), job.clone(), name.clone());
    let in_order = state.storage.take_in_order_hash(&key);
    let (digests, entries, read_back) = blocking(move || {
        if let Some(in_order) = in_order {
            let mut in_order = in_order.lock().expect("in-order hash lock");
            in_order.advance(&*chunks, &HashMap::new())?;
            if !in_order.broken
                && in_order.hashed == in_order.entries.len()
                && in_order.entries == entries
            {
                let digests = in_order.hasher.clone().finish();
                return Ok((digests, entries, false));
            }
        }
        let digests = kiln_blob::chunks::read_image(&*chunks, &entries, |_| Ok(()))?;
        Ok((digests, entries, true))
    })
    .await?;
    tracing::debug!(image = %name, read_back, secs = verify_started.elapsed().as_secs_f64(), "image digests ready");
    if digests.blake3 != request.blake3 || digests.sha256 != request.sha256 {
        return Err(ApiErr::Unprocessable {
            code: "hash_mismatch",
            message: format!(
                "image {name}: its chunks hash to BLAKE3 {} and SHA-256 {}, but the client said {} and {}; nothing was stored",
                digests.blake3, digests.sha256, request.blake3, request.sha256
            ),
        });
    }
    // The chunks' names become durable before an image lists them.
    let chunks = state.storage.chunks.clone();
    blocking(move || Ok(chunks.sync()?)).await?;
    let info = record_image(&state, &build, &job, &lease, &name, &digests, &entries).await?;
    tracing::info!(build = %build, job = %job, image = %name, size = digests.size, chunks = entries.len(), "image committed");
    Ok((StatusCode::CREATED, Json(info)))
}

/// Records an image made of `entries` under the lease, and what to answer with.
async fn record_image(
    state: &AppState,
    build: &str,
    job: &str,
    lease: &str,
    name: &str,
    digests: &kiln_blob::Digests,
    entries: &[ChunkEntry],
) -> Result<ImageInfo, ApiErr> {
    let now = kiln_common::now_micros();
    state
        .store
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
    // The image keeps its chunks now.
    state.storage.unpin(entries.iter().map(|entry| &entry.hash));
    let config_type = state.store.get_job(build, job).await?.config_type;
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

/// Stores an image that arrived whole (already staged in a file whose BLAKE3 was
/// checked): cuts it into chunks under the collection lock and records it.
pub async fn store_whole_image(
    state: &AppState,
    build: &str,
    job: &str,
    lease: &str,
    name: &str,
    staged: &std::path::Path,
) -> Result<ImageInfo, ApiErr> {
    let _no_collection = state.storage.gc_lock.read().await;
    let chunks = state.storage.chunks.clone();
    let path = staged.to_owned();
    let (chunked, stats) = blocking(move || {
        let file = std::fs::File::open(&path)
            .map_err(|err| BlobError::io(format!("reading {}", path.display()), err))?;
        Ok(kiln_blob::chunks::ingest(
            &*chunks,
            file,
            &ChunkParams::default(),
        )?)
    })
    .await?;
    let entries: Vec<ChunkEntry> = chunked.chunks.iter().map(|chunk| chunk.entry()).collect();
    state.storage.pin(entries.iter().map(|entry| &entry.hash));
    state
        .store
        .add_counters(&[
            (RECEIVED, chunked.digests.size as i64),
            (STORED, stats.new_bytes as i64),
            (CHUNKS, stats.new_chunks as i64),
        ])
        .await?;
    record_image(state, build, job, lease, name, &chunked.digests, &entries).await
}

async fn image_entries(
    state: &AppState,
    build: &str,
    job: &str,
    name: &str,
) -> Result<(kiln_store::ImageRecord, Vec<ChunkEntry>), ApiErr> {
    let image = state.store.get_image(build, job, name).await?;
    let packed = image.chunk_list.as_deref().ok_or_else(|| {
        ApiErr::Internal(format!(
            "image {name} of {build}/{job} has not been converted to chunks"
        ))
    })?;
    let entries = unpack_chunk_list(packed)
        .map_err(|err| ApiErr::Internal(format!("image {name} of {build}/{job}: {err}")))?;
    Ok((image, entries))
}

/// `GET /v1/jobs/{build}/{job}/images/{name}/index`
pub async fn index(
    State(state): Shared,
    _caller: Caller,
    Path((build, job, name)): Path<(String, String, String)>,
) -> Result<Json<ImageIndex>, ApiErr> {
    let (image, chunks) = image_entries(&state, &build, &job, &name).await?;
    Ok(Json(ImageIndex {
        name,
        size: image.info.size,
        blake3: image.info.blake3,
        sha256: image.info.sha256,
        chunks,
    }))
}

/// A byte range of an image, end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u64,
    end: u64,
}

/// What a `Range` header asks of a `size`-byte file: `Ok(None)` for the whole file
/// (no header, a form not understood, or several ranges), `Err(())` when no byte of
/// it exists.
fn parse_range(value: Option<&str>, size: u64) -> Result<Option<Span>, ()> {
    let Some(spec) = value.and_then(|value| value.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let span = if first.is_empty() {
        // The last N bytes.
        let Ok(suffix) = last.parse::<u64>() else {
            return Ok(None);
        };
        if suffix == 0 || size == 0 {
            return Err(());
        }
        Span {
            start: size.saturating_sub(suffix),
            end: size,
        }
    } else {
        let Ok(start) = first.parse::<u64>() else {
            return Ok(None);
        };
        let end = if last.is_empty() {
            size
        } else {
            match last.parse::<u64>() {
                Ok(last) if last >= start => last.saturating_add(1).min(size),
                _ => return Ok(None),
            }
        };
        if start >= size {
            return Err(());
        }
        Span { start, end }
    };
    Ok(Some(span))
}

/// `GET /v1/jobs/{build}/{job}/images/{name}`: the whole image, or one range of it,
/// streamed from its chunks.
pub async fn get_image(
    State(state): Shared,
    _caller: Caller,
    Path((build, job, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiErr> {
    let (image, entries) = image_entries(&state, &build, &job, &name).await?;
    let size = image.info.size;
    let etag = format!("\"{}\"", image.info.blake3);
    let mut response_headers = HeaderMap::new();
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response_headers.insert(header::ETAG, value);
    }
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        response_headers.insert(header::CONTENT_DISPOSITION, value);
    }
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok());
    if if_none_match.is_some_and(|tags| {
        tags.split(',')
            .any(|tag| tag.trim() == etag || tag.trim() == "*")
    }) {
        return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
    }
    let range = headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok());
    // If-Range with another validator means: send the whole (new) file.
    let range = match headers
        .get(header::IF_RANGE)
        .and_then(|value| value.to_str().ok())
    {
        Some(validator) if validator.trim() != etag => None,
        _ => range,
    };
    let (status, span) = match parse_range(range, size) {
        Ok(Some(span)) => (StatusCode::PARTIAL_CONTENT, span),
        Ok(None) => (
            StatusCode::OK,
            Span {
                start: 0,
                end: size,
            },
        ),
        Err(()) => {
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response_headers.insert(header::CONTENT_RANGE, value);
            }
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response());
        }
    };
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {}-{}/{size}", span.start, span.end - 1);
        if let Ok(value) = HeaderValue::from_str(&value) {
            response_headers.insert(header::CONTENT_RANGE, value);
        }
    }
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(span.end - span.start),
    );
    let body = stream_span(state.storage.chunks.clone(), entries, span);
    Ok((status, response_headers, body).into_response())
}

/// The bytes of `span` of the image made of `entries`, read chunk by chunk on a
/// blocking thread a few chunks ahead of the network.
fn stream_span(chunks: Arc<dyn ChunkStore>, entries: Vec<ChunkEntry>, span: Span) -> Body {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, BlobError>>(STREAM_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut offset = 0u64;
        for entry in &entries {
            let chunk_start = offset;
            let chunk_end = offset + u64::from(entry.len);
            offset = chunk_end;
            if chunk_end <= span.start {
                continue;
            }
            if chunk_start >= span.end {
                break;
            }
            let piece = chunks.read(&entry.hash).map(|bytes| {
                let from = span.start.saturating_sub(chunk_start) as usize;
                let to = (span.end.min(chunk_end) - chunk_start) as usize;
                bytes.slice(from..to)
            });
            let failed = piece.is_err();
            if sender.blocking_send(piece).is_err() || failed {
                return;
            }
        }
    });
    body_of(receiver)
}

/// A response body fed by a blocking producer through `receiver`.
fn body_of(receiver: tokio::sync::mpsc::Receiver<Result<Bytes, BlobError>>) -> Body {
    Body::from_stream(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) },
    ))
}

/// `POST /v1/chunks/fetch`: the frames of the chunks asked for, in that order.
pub async fn fetch(
    State(state): Shared,
    _caller: Caller,
    Json(request): Json<FetchRequest>,
) -> Result<Response, ApiErr> {
    if request.chunks.len() > MAX_FETCH {
        return Err(ApiErr::TooLarge(format!(
            "{} chunks in one fetch; at most {MAX_FETCH}",
            request.chunks.len()
        )));
    }
    // Refuse up front what cannot be served, rather than cutting the stream later.
    let chunks = state.storage.chunks.clone();
    let asked = request.chunks.clone();
    let missing = blocking(move || Ok(chunks.missing(&asked)?)).await?;
    if let Some(hash) = missing.first() {
        return Err(BlobError::NotFound(format!("chunk {hash}")).into());
    }
    let chunks = state.storage.chunks.clone();
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, BlobError>>(STREAM_AHEAD);
    tokio::task::spawn_blocking(move || {
        for hash in &request.chunks {
            let frame = chunks.read_frame(hash).map(|frame| {
                let mut wire = Vec::with_capacity(frame.wire_len());
                frame.write_to(&mut wire);
                Bytes::from(wire)
            });
            let failed = frame.is_err();
            if sender.blocking_send(frame).is_err() || failed {
                return;
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, FRAMES_CONTENT_TYPE)],
        body_of(receiver),
    )
        .into_response())
}

async fn stats(state: &AppState) -> Result<StorageStats, ApiErr> {
    let counters = state.store.counters().await?;
    let counter = |name: &str| counters.get(name).copied().unwrap_or(0).max(0) as u64;
    let totals = state.store.image_totals().await?;
    Ok(StorageStats {
        bytes_received: counter(RECEIVED),
        bytes_deduplicated: counter(DEDUPLICATED),
        bytes_stored: counter(STORED),
        chunks_stored: counter(CHUNKS),
        image_bytes: totals.bytes,
        images: totals.images,
    })
}

/// `GET /v1/storage`
pub async fn storage(State(state): Shared, _caller: Caller) -> Result<Json<StorageStats>, ApiErr> {
    Ok(Json(stats(&state).await?))
}

/// `GET /metrics`: the storage counters and the fleet's state in Prometheus's text
/// format.
pub async fn metrics(State(state): Shared, _caller: Caller) -> Result<Response, ApiErr> {
    let stats = stats(&state).await?;
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    metric(
        "kiln_bytes_received_total",
        "counter",
        "Chunk bytes received on the wire, as sent.",
        stats.bytes_received,
    );
    metric(
        "kiln_bytes_deduplicated_total",
        "counter",
        "Bytes of chunks offered that the server already had.",
        stats.bytes_deduplicated,
    );
    metric(
        "kiln_bytes_stored",
        "gauge",
        "Bytes of chunk files on disk.",
        stats.bytes_stored,
    );
    metric(
        "kiln_chunks_stored",
        "gauge",
        "Chunk files on disk.",
        stats.chunks_stored,
    );
    metric(
        "kiln_image_bytes",
        "gauge",
        "Sum of the sizes of the images stored.",
        stats.image_bytes,
    );
    metric("kiln_images", "gauge", "Images stored.", stats.images);
    metric(
        "kiln_clients_connected",
        "gauge",
        "Clients holding a session.",
        state.sessions.n_connected() as u64,
    );
    metric(
        "kiln_clients_waiting",
        "gauge",
        "Clients waiting for a job.",
        state.dispatcher.n_waiting() as u64,
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// `DELETE /v1/builds/{build}`: the build and everything of it, then the chunks no
/// image uses any more.
pub async fn delete_build(
    State(state): Shared,
    _caller: Caller,
    Path(build): Path<String>,
) -> Result<Json<DeleteReport>, ApiErr> {
    let deleted = state.store.delete_build(&build).await?;
    if !deleted.files_key_shared {
        state.blobs.remove(&deleted.files_key).await?;
    }
    state.changed();
    let (chunks_freed, bytes_freed) = collect_garbage(&state).await?;
    tracing::info!(build = %build, images = deleted.images, chunks_freed, bytes_freed, "build deleted");
    Ok(Json(DeleteReport {
        build,
        jobs: deleted.jobs,
        images: deleted.images,
        chunks_freed,
        bytes_freed,
    }))
}

/// The chunks some image lists.
async fn live_chunks(store: &dyn JobStore) -> Result<HashSet<ChunkHash>, ApiErr> {
    let mut live = HashSet::new();
    for packed in store.chunk_lists().await? {
        let entries = unpack_chunk_list(&packed)
            .map_err(|err| ApiErr::Internal(format!("a stored chunk list: {err}")))?;
        live.extend(entries.into_iter().map(|entry| entry.hash));
    }
    Ok(live)
}

/// Deletes every chunk no image lists and no upload has pinned; returns how many and
/// their bytes. Also sets the stored-bytes counters to what is on disk.
pub async fn collect_garbage(state: &AppState) -> Result<(u64, u64), ApiErr> {
    let _one_at_a_time = state.storage.gc_serial.lock().await;
    state.storage.forget_old_pins();
    // Writes interrupted by a crash; an hour is far longer than any write takes.
    let chunks = state.storage.chunks.clone();
    blocking(move || Ok(chunks.remove_leftovers(PIN_TTL)?)).await?;
    let live = live_chunks(&*state.store).await?;
    let chunks = state.storage.chunks.clone();
    let stored = blocking(move || Ok(chunks.list()?)).await?;
    let now = Instant::now();
    let candidates: Vec<ChunkHash> = stored
        .iter()
        .map(|(hash, _)| *hash)
        .filter(|hash| !live.contains(hash) && !state.storage.is_pinned(hash, now))
        .collect();
    let (freed, freed_bytes) = if candidates.is_empty() {
        (0, 0)
    } else {
        // Commits made since the first look are seen here; none can start until done.
        let _exclusive = state.storage.gc_lock.write().await;
        let live = live_chunks(&*state.store).await?;
        let now = Instant::now();
        let doomed: Vec<ChunkHash> = candidates
            .into_iter()
            .filter(|hash| !live.contains(hash) && !state.storage.is_pinned(hash, now))
            .collect();
        let chunks = state.storage.chunks.clone();
        blocking(move || {
            let mut freed_bytes = 0;
            for hash in &doomed {
                freed_bytes += chunks.remove(hash)?;
            }
            Ok((doomed.len() as u64, freed_bytes))
        })
        .await?
    };
    let on_disk: u64 = stored.iter().map(|(_, bytes)| bytes).sum::<u64>() - freed_bytes;
    let n_chunks = stored.len() as u64 - freed;
    state
        .store
        .set_counters(&[(STORED, on_disk as i64), (CHUNKS, n_chunks as i64)])
        .await?;
    Ok((freed, freed_bytes))
}

/// Converts images stored whole (before chunking) into chunk lists, then deletes their
/// whole-file blobs. Runs at start, before the server serves.
pub async fn convert_legacy_images(state: &AppState) -> anyhow::Result<()> {
    let legacy = state.store.legacy_images().await?;
    if legacy.is_empty() {
        return Ok(());
    }
    tracing::info!(
        n_images = legacy.len(),
        "converting whole-file images to chunks"
    );
    let mut keys = HashSet::new();
    for image in &legacy {
        let path = state.blobs.local_path(&image.blob_key)?;
        let chunks = state.storage.chunks.clone();
        let (chunked, stats) = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)
                .map_err(|err| BlobError::io(format!("reading {}", path.display()), err))?;
            kiln_blob::chunks::ingest(&*chunks, file, &ChunkParams::default())
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
        let entries: Vec<ChunkEntry> = chunked.chunks.iter().map(|chunk| chunk.entry()).collect();
        state
            .store
            .set_chunk_list(
                &image.build,
                &image.job,
                &image.name,
                &pack_chunk_list(&entries),
            )
            .await?;
        state
            .store
            .add_counters(&[
                (STORED, stats.new_bytes as i64),
                (CHUNKS, stats.new_chunks as i64),
            ])
            .await?;
        keys.insert(image.blob_key.clone());
    }
    for key in keys {
        if !state.store.files_key_in_use(&key).await? {
            state.blobs.remove(&key).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_slots_refuse_one_over_the_limit_per_client_and_come_back_when_dropped() {
        let slots = UploadSlots::default();
        let first = slots.try_take("client-a", 2).expect("first slot");
        let second = slots.try_take("client-a", 2).expect("second slot");
        let refused = slots
            .try_take("client-a", 2)
            .err()
            .expect("a third is refused");
        assert!(matches!(refused, ApiErr::TooManyUploads(_)), "{refused:?}");
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

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        let size = 1000;
        let span = |start, end| Ok(Some(Span { start, end }));
        assert_eq!(parse_range(None, size), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-99"), size), span(0, 100));
        assert_eq!(parse_range(Some("bytes=900-"), size), span(900, 1000));
        assert_eq!(parse_range(Some("bytes=-100"), size), span(900, 1000));
        assert_eq!(parse_range(Some("bytes=-5000"), size), span(0, 1000));
        assert_eq!(parse_range(Some("bytes=990-5000"), size), span(990, 1000));
        assert_eq!(parse_range(Some("bytes=1000-"), size), Err(()));
        assert_eq!(parse_range(Some("bytes=-0"), size), Err(()));
        // Several ranges, or forms not understood: the whole file.
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), size), Ok(None));
        assert_eq!(parse_range(Some("bytes=5-1"), size), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), size), Ok(None));
        assert_eq!(parse_range(Some("bytes=x-1"), size), Ok(None));
    }
}
