//! [`ImageUploader`]: how a finished image travels to the server.
//!
//! [`ChunkedUploader`] (the one the client uses) cuts the image into content-defined
//! chunks while it reads it once, asks the server which chunks it lacks a batch at a
//! time, sends only those (compressed when that pays) while the next batch is being
//! cut, and commits the image with its chunk list and whole-file digests. Sent again
//! after an interruption, it re-cuts the file and sends only what the server still
//! lacks. [`WholeFileUploader`] streams the file whole, for servers' older route.

use async_trait::async_trait;
use bytes::Bytes;
use kiln_api::{CallError, ServerConn, StatusCode};
use kiln_blob::chunking::{chunk_reader_with, ChunkParams};
use kiln_blob::{ChunkEntry, ChunkHash, Frame};
use kiln_proto::api::Claim;
use kiln_proto::transfer::{CommitRequest, MAX_MISSING_QUERY};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What an upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// Bytes of the image.
    pub size: u64,
    /// Chunks it was cut into.
    pub chunks: u64,
    /// Chunks the server lacked, sent.
    pub chunks_sent: u64,
    /// Uncompressed bytes of the chunks sent.
    pub raw_bytes_sent: u64,
    /// Bytes of frames on the wire.
    pub wire_bytes_sent: u64,
    /// From the first read to the commit's answer.
    pub elapsed: Duration,
}

/// Told how far an upload is: bytes of the image the server has (sent or already
/// there), and the image's size.
pub type OnProgress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

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
        on_progress: OnProgress<'_>,
    ) -> Result<UploadReport, CallError>;
}

/// Chunks cut ahead of the network, at most; about 16 MiB at the average size.
const CUT_AHEAD_CHUNKS: usize = 256;
/// Raw bytes of chunks gathered into one question and one body.
const BATCH_BYTES: u64 = 16 << 20;
/// Bodies of chunks on the wire at once: the server checks, writes and syncs one while
/// the next arrives.
const BODIES_IN_FLIGHT: usize = 2;
/// Rounds of "send what the commit says is missing" before giving up.
const COMMIT_ROUNDS: u32 = 3;

/// Chunked, deduplicated, resumable upload (docs/transfer.md).
#[derive(Debug, Clone, Default)]
pub struct ChunkedUploader {
    pub params: ChunkParams,
}

impl ChunkedUploader {
    /// An uploader with the default chunk sizes.
    pub fn new() -> Self {
        Self::default()
    }
}

fn local(what: String) -> impl FnOnce(std::io::Error) -> CallError {
    move |source| CallError::Local { what, source }
}

/// A batch of cut chunks waiting for the server's answer.
#[derive(Default)]
struct Batch {
    /// Every chunk cut, in order, repeats included: what the server is told.
    entries: Vec<ChunkEntry>,
    /// The bytes of chunks not offered before: what may be sent.
    new: HashMap<ChunkHash, (ChunkEntry, Bytes)>,
    /// Bytes of `new`.
    raw_bytes: u64,
}

/// Totals of what was sent.
#[derive(Default)]
struct Sent {
    chunks: u64,
    raw_bytes: u64,
    wire_bytes: u64,
}

#[async_trait]
impl ImageUploader for ChunkedUploader {
    async fn upload(
        &self,
        conn: &ServerConn,
        claim: &Claim,
        name: &str,
        path: &Path,
        on_progress: OnProgress<'_>,
    ) -> Result<UploadReport, CallError> {
        let started = Instant::now();
        let file = std::fs::File::open(path)
            .map_err(local(format!("opening image {}", path.display())))?;
        let size = file
            .metadata()
            .map_err(local(format!("reading image {}", path.display())))?
            .len();
        on_progress(0, size);
        let (cut_sender, mut cut) = mpsc::channel::<(ChunkEntry, Bytes)>(CUT_AHEAD_CHUNKS);
        let params = self.params;
        let cutter = tokio::task::spawn_blocking(move || {
            chunk_reader_with(file, &params, |chunk, data| {
                cut_sender
                    .blocking_send((chunk.entry(), data.clone()))
                    .map_err(|_| std::io::Error::other("the upload stopped"))
            })
        });

        // Everything below runs while the cutter reads on: each batch is asked about
        // and sent while the next one is being cut.
        let mut entries: Vec<ChunkEntry> = Vec::new();
        let mut offered: HashSet<ChunkHash> = HashSet::new();
        let mut sent = Sent::default();
        // Bodies on the wire, oldest first, with the image offset each one ends at.
        let mut sending: std::collections::VecDeque<(u64, JoinHandle<Result<Sent, CallError>>)> =
            std::collections::VecDeque::new();
        let mut batch = Batch::default();
        let mut offset = 0u64;
        let mut last_report = Instant::now();
        loop {
            let next = cut.recv().await;
            let done = next.is_none();
            if let Some((entry, data)) = next {
                entries.push(entry);
                batch.entries.push(entry);
                // A chunk that repeats within the image is sent once.
                if offered.insert(entry.hash) {
                    batch.raw_bytes += u64::from(entry.len);
                    batch.new.insert(entry.hash, (entry, data));
                }
            }
            let full = batch.raw_bytes >= BATCH_BYTES || batch.entries.len() >= MAX_MISSING_QUERY;
            if !(full || (done && !batch.entries.is_empty())) {
                if done {
                    break;
                }
                continue;
            }
            let mut this_batch = std::mem::take(&mut batch);
            let batch_bytes: u64 = this_batch.entries.iter().map(|e| u64::from(e.len)).sum();
            let missing = conn
                .missing_chunks(claim, Some((name, offset)), this_batch.entries)
                .await?;
            offset += batch_bytes;
            // A chunk missing but not in `new` was offered in an earlier batch: it is
            // on its way already.
            let to_send: Vec<(ChunkEntry, Bytes)> = missing
                .iter()
                .filter_map(|hash| this_batch.new.remove(hash))
                .collect();
            while sending.len() >= BODIES_IN_FLIGHT {
                let (done_to, previous) = sending.pop_front().expect("not empty");
                add_sent(&mut sent, previous).await?;
                on_progress(done_to, size);
            }
            if to_send.is_empty() {
                if sending.is_empty() {
                    on_progress(offset, size);
                }
            } else {
                let conn = conn.clone();
                let claim = claim.clone();
                sending.push_back((
                    offset,
                    tokio::spawn(async move { send_chunks(&conn, &claim, to_send).await }),
                ));
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                last_report = Instant::now();
                tracing::info!(image = %name, cut_bytes = offset, sent_bytes = sent.wire_bytes, "uploading");
            }
            if done {
                break;
            }
        }
        while let Some((done_to, previous)) = sending.pop_front() {
            add_sent(&mut sent, previous).await?;
            on_progress(done_to, size);
        }
        let chunked = cutter
            .await
            .map_err(|err| CallError::Local {
                what: format!("cutting image {}", path.display()),
                source: std::io::Error::other(err),
            })?
            .map_err(local(format!("reading image {}", path.display())))?;

        tracing::debug!(image = %name, secs = started.elapsed().as_secs_f64(), "image cut and chunks sent; committing");
        // The questions named every chunk in order: the commit refers to that list
        // rather than sending it again, unless the server no longer holds it (it
        // restarted) or predates that (it cannot read such a commit).
        let mut commit = CommitRequest {
            size: chunked.digests.size,
            blake3: chunked.digests.blake3.clone(),
            sha256: chunked.digests.sha256.clone(),
            chunks: Vec::new(),
            announced_chunks: (!entries.is_empty()).then_some(entries.len() as u64),
        };
        let mut rounds = 0;
        loop {
            match conn.commit_image(claim, name, &commit).await {
                Ok(()) => break,
                Err(CallError::Refused { status, message })
                    if commit.announced_chunks.is_some()
                        && (status == StatusCode::CONFLICT
                            || status == StatusCode::UNPROCESSABLE_ENTITY) =>
                {
                    tracing::debug!(image = %name, %message, "committing again with the chunk list");
                    commit.announced_chunks = None;
                    commit.chunks = std::mem::take(&mut entries);
                }
                Err(CallError::MissingChunks(missing)) if rounds < COMMIT_ROUNDS => {
                    // Collected since we asked (or never stored): send them again.
                    rounds += 1;
                    tracing::warn!(image = %name, n_chunks = missing.len(), "the server lacks chunks at commit; sending them again");
                    let again = read_chunks(path, &chunked.chunks, &missing)?;
                    let more = send_chunks(conn, claim, again).await?;
                    sent.chunks += more.chunks;
                    sent.raw_bytes += more.raw_bytes;
                    sent.wire_bytes += more.wire_bytes;
                }
                Err(err) => return Err(err),
            }
        }
        on_progress(size, size);
        let report = UploadReport {
            size: chunked.digests.size,
            chunks: chunked.chunks.len() as u64,
            chunks_sent: sent.chunks,
            raw_bytes_sent: sent.raw_bytes,
            wire_bytes_sent: sent.wire_bytes,
            elapsed: started.elapsed(),
        };
        Ok(report)
    }
}

async fn add_sent(
    sent: &mut Sent,
    sending: JoinHandle<Result<Sent, CallError>>,
) -> Result<(), CallError> {
    let more = sending.await.map_err(|err| CallError::Local {
        what: "sending chunks".to_owned(),
        source: std::io::Error::other(err),
    })??;
    sent.chunks += more.chunks;
    sent.raw_bytes += more.raw_bytes;
    sent.wire_bytes += more.wire_bytes;
    Ok(())
}

/// Encodes chunks (off the async threads: compression is work) and sends them in one
/// body.
async fn send_chunks(
    conn: &ServerConn,
    claim: &Claim,
    chunks: Vec<(ChunkEntry, Bytes)>,
) -> Result<Sent, CallError> {
    let n_chunks = chunks.len() as u64;
    let raw_bytes: u64 = chunks.iter().map(|(entry, _)| u64::from(entry.len)).sum();
    let body = tokio::task::spawn_blocking(move || {
        let mut body = Vec::with_capacity(raw_bytes as usize + chunks.len() * 48);
        for (entry, data) in &chunks {
            Frame::encode_shared(entry.hash, data).write_to(&mut body);
        }
        body
    })
    .await
    .map_err(|err| CallError::Local {
        what: "compressing chunks".to_owned(),
        source: std::io::Error::other(err),
    })?;
    let wire_bytes = body.len() as u64;
    conn.put_chunks(claim, body).await?;
    Ok(Sent {
        chunks: n_chunks,
        raw_bytes,
        wire_bytes,
    })
}

/// Reads the chunks named in `wanted` back from the image file.
fn read_chunks(
    path: &Path,
    chunks: &[kiln_blob::chunking::ChunkRef],
    wanted: &[ChunkHash],
) -> Result<Vec<(ChunkEntry, Bytes)>, CallError> {
    use std::os::unix::fs::FileExt;
    let wanted: HashSet<&ChunkHash> = wanted.iter().collect();
    let mut found: HashMap<ChunkHash, (ChunkEntry, Bytes)> = HashMap::new();
    let file =
        std::fs::File::open(path).map_err(local(format!("opening image {}", path.display())))?;
    for chunk in chunks {
        let entry = chunk.entry();
        if !wanted.contains(&entry.hash) || found.contains_key(&entry.hash) {
            continue;
        }
        let mut data = vec![0u8; entry.len as usize];
        file.read_exact_at(&mut data, chunk.offset)
            .map_err(local(format!("reading image {}", path.display())))?;
        if ChunkHash::of(&data) != entry.hash {
            return Err(CallError::Local {
                what: format!(
                    "image {} changed while it was being uploaded",
                    path.display()
                ),
                source: std::io::Error::other("a chunk no longer has the bytes it was cut with"),
            });
        }
        found.insert(entry.hash, (entry, Bytes::from(data)));
    }
    Ok(found.into_values().collect())
}

/// Streams the whole file with its BLAKE3 hash (the server cuts it into chunks).
pub struct WholeFileUploader;

#[async_trait]
impl ImageUploader for WholeFileUploader {
    async fn upload(
        &self,
        conn: &ServerConn,
        claim: &Claim,
        name: &str,
        path: &Path,
        on_progress: OnProgress<'_>,
    ) -> Result<UploadReport, CallError> {
        let started = Instant::now();
        let digests = kiln_blob::hash_file(path)
            .await
            .map_err(local(format!("hashing image {}", path.display())))?;
        on_progress(0, digests.size);
        conn.put_image(claim, name, path, &digests.blake3, digests.size)
            .await?;
        on_progress(digests.size, digests.size);
        Ok(UploadReport {
            size: digests.size,
            chunks: 0,
            chunks_sent: 0,
            raw_bytes_sent: digests.size,
            wire_bytes_sent: digests.size,
            elapsed: started.elapsed(),
        })
    }
}
