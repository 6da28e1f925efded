//! Garbage collection racing an upload's commit, with the interleavings forced, on two
//! servers that share one database and one pack directory (as replicas do): one
//! uploads, the other collects. A chunk store wrapper stops the commit between its
//! presence check and its record (at the persist it makes there), or the collection
//! between its mark and its removal, while the other side runs to its end.

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use kiln_blob::chunking::{chunk_reader, ChunkParams};
use kiln_blob::packs::CompactStats;
use kiln_blob::{
    BlobError, ChunkEntry, ChunkHash, ChunkStore, Frame, LocalBlobStore, LocalPackFiles,
    PackChunkStore, PutStats, StoredChunk,
};
use kiln_proto::manifest::{BuildManifest, JobSpec};
use kiln_proto::transfer::{CommitRequest, MissingRequest};
use kiln_server::pack_index::StorePackIndex;
use kiln_server::{Backends, Farm, Server, ServerConfig};
use kiln_store::{NewBuild, Queue, SqliteStore};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Where a paused call stops: it says it got there, then waits to be let go.
struct Gate {
    reached: oneshot::Sender<()>,
    resume: oneshot::Receiver<()>,
}

/// The test's side of a [`Gate`].
struct GateHandle {
    reached: oneshot::Receiver<()>,
    resume: oneshot::Sender<()>,
}

fn gate() -> (Gate, GateHandle) {
    let (reached_tx, reached_rx) = oneshot::channel();
    let (resume_tx, resume_rx) = oneshot::channel();
    (
        Gate {
            reached: reached_tx,
            resume: resume_rx,
        },
        GateHandle {
            reached: reached_rx,
            resume: resume_tx,
        },
    )
}

/// A chunk store that can stop once in `persist` or in `remove`.
struct Pausing {
    inner: Arc<dyn ChunkStore>,
    at_persist: Mutex<Option<Gate>>,
    at_remove: Mutex<Option<Gate>>,
}

impl Pausing {
    async fn stop_here(slot: &Mutex<Option<Gate>>) {
        let gate = slot.lock().unwrap().take();
        if let Some(gate) = gate {
            let _ = gate.reached.send(());
            let _ = gate.resume.await;
        }
    }
}

#[async_trait::async_trait]
impl ChunkStore for Pausing {
    async fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
        self.inner.missing(hashes).await
    }
    async fn put(&self, frames: Vec<Frame>) -> Result<PutStats, BlobError> {
        self.inner.put(frames).await
    }
    async fn persist(&self) -> Result<(), BlobError> {
        Self::stop_here(&self.at_persist).await;
        self.inner.persist().await
    }
    async fn not_persisted(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
        self.inner.not_persisted(hashes).await
    }
    async fn read_frame(&self, hash: &ChunkHash) -> Result<Frame, BlobError> {
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
        Self::stop_here(&self.at_remove).await;
        self.inner.remove(hashes).await
    }
    async fn remove_unpinned_since(
        &self,
        hashes: &[ChunkHash],
        since: i64,
    ) -> Result<u64, BlobError> {
        Self::stop_here(&self.at_remove).await;
        self.inner.remove_unpinned_since(hashes, since).await
    }
    async fn compact(&self, live_share: f64) -> Result<CompactStats, BlobError> {
        self.inner.compact(live_share).await
    }
    fn read_frames(&self, hashes: Vec<ChunkHash>) -> BoxStream<'_, Result<Frame, BlobError>> {
        self.inner.read_frames(hashes)
    }
    async fn read(&self, hash: &ChunkHash) -> Result<Bytes, BlobError> {
        self.inner.read(hash).await
    }
    async fn read_unchecked(&self, hash: &ChunkHash) -> Result<Bytes, BlobError> {
        self.inner.read_unchecked(hash).await
    }
}

/// One server of the pair: its farm and its paused chunk store.
struct Replica {
    farm: Arc<Farm>,
    chunks: Arc<Pausing>,
}

async fn replica(shared: &Path, own: &Path) -> anyhow::Result<Replica> {
    let store: Arc<SqliteStore> = Arc::new(SqliteStore::open(&shared.join("kiln.db")).await?);
    let packs = LocalPackFiles::open(&shared.join("packs"))?.with_target_pack_bytes(1 << 20);
    let index = StorePackIndex::new(store.clone());
    let chunks = Arc::new(Pausing {
        inner: Arc::new(PackChunkStore::new(Arc::new(packs), Arc::new(index))),
        at_persist: Mutex::new(None),
        at_remove: Mutex::new(None),
    });
    let backends = Backends {
        store,
        chunks: chunks.clone(),
        files: Arc::new(LocalBlobStore::open(&shared.join("blobs"))?),
    };
    let server = Server::with_backends(ServerConfig::new(own.to_owned()), backends).await?;
    Ok(Replica {
        farm: server.farm().clone(),
        chunks,
    })
}

/// A build of one job, claimed: its lease.
async fn claimed_job(shared: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(shared)?;
    let store = SqliteStore::open(&shared.join("kiln.db")).await?;
    let job = JobSpec {
        id: "a".into(),
        title: "a".into(),
        config_type: "PRO".into(),
        install_script: "i.sh".into(),
        configure_script: None,
        image_script: "i.sh".into(),
        verify_script: None,
        timeout_secs: 3600,
        priority: None,
        accept_within_secs: None,
        assigned_to: None,
        max_attempts: None,
        retries: None,
    };
    store
        .insert_build(&NewBuild {
            manifest: BuildManifest {
                number: "1".into(),
                title: "gc".into(),
                build_time: None,
                log_file: None,
                notify: vec![],
                jobs: vec![job],
            },
            files_key: "0".repeat(64),
            files_size: 0,
            submitted_at: 1,
            default_accept_within_secs: None,
            default_max_attempts: 3,
        })
        .await?;
    let now = kiln_common::now_micros();
    let claimed = store
        .claim(
            "1",
            "a",
            &kiln_store::ClaimingClient::with_id("imager"),
            now + 3_600_000_000,
            now,
        )
        .await?
        .expect("claimable");
    Ok(claimed.lease)
}

/// An image, its chunk list and its frames.
fn image(seed: u64) -> (Vec<u8>, CommitRequest, Vec<Frame>) {
    let bytes = kiln_blob::noise::noise(2 << 20, seed);
    let chunked = chunk_reader(&bytes[..], &ChunkParams::default()).unwrap();
    let frames = chunked
        .chunks
        .iter()
        .map(|chunk| {
            let start = chunk.offset as usize;
            Frame::encode(&bytes[start..start + chunk.len as usize])
        })
        .collect();
    let commit = CommitRequest {
        size: chunked.digests.size,
        blake3: chunked.digests.blake3.clone(),
        sha256: chunked.digests.sha256.clone(),
        chunks: chunked.chunks.iter().map(|chunk| chunk.entry()).collect(),
        announced_chunks: None,
    };
    (bytes, commit, frames)
}

/// Sends the chunks of an image, makes them durable, and lets their pins lapse: an
/// upload that sent everything long ago and commits only now, when nothing but its
/// commit protects them.
async fn send_and_let_pins_lapse(
    uploader: &Replica,
    shared: &Path,
    lease: &str,
    commit: &CommitRequest,
    frames: &[Frame],
) -> anyhow::Result<()> {
    let missing = uploader
        .farm
        .missing_chunks(
            "1",
            "a",
            lease,
            &MissingRequest {
                chunks: commit.chunks.clone(),
                image: None,
                offset: 0,
            },
        )
        .await?;
    assert_eq!(missing.missing.len(), frames.len());
    let mut wire = Vec::new();
    for frame in frames {
        frame.write_to(&mut wire);
    }
    let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(wire))]);
    uploader.farm.put_chunks("1", "a", lease, body).await?;
    uploader.chunks.inner.persist().await?;
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(shared.join("kiln.db"));
    let pool = sqlx::SqlitePool::connect_with(options).await?;
    sqlx::query("UPDATE chunk_pins SET until = 0")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

/// Finishes the job and reads its image back whole.
async fn finish_and_read(
    farm: &Farm,
    shared: &Path,
    lease: &str,
    size: u64,
) -> anyhow::Result<Vec<u8>> {
    let store = SqliteStore::open(&shared.join("kiln.db")).await?;
    store
        .finish(
            "1",
            "a",
            lease,
            &["disk.img".into()],
            kiln_common::now_micros(),
        )
        .await?;
    let stored = farm.image("1", "a", "disk.img").await?;
    let mut stream = farm.read_image_span(stored, 0..size);
    let mut back = Vec::new();
    while let Some(piece) = stream.next().await {
        back.extend_from_slice(&piece?);
    }
    Ok(back)
}

/// An orphan chunk, stored and unpinned: the collection must remove it, so that a
/// collection that removes nothing at all cannot pass these tests.
async fn store_orphan(replica: &Replica) -> anyhow::Result<ChunkHash> {
    let orphan = Frame::encode(&kiln_blob::noise::noise(50_000, 999));
    replica.chunks.inner.put(vec![orphan.clone()]).await?;
    replica.chunks.inner.persist().await?;
    Ok(orphan.hash)
}

fn entries_of(commit: &CommitRequest) -> Vec<ChunkHash> {
    commit
        .chunks
        .iter()
        .map(|entry: &ChunkEntry| entry.hash)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collection_between_a_commits_check_and_its_record_removes_none_of_its_chunks(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let shared = dir.path().join("shared");
    let lease = claimed_job(&shared).await?;
    let uploader = replica(&shared, &dir.path().join("uploader")).await?;
    let collector = replica(&shared, &dir.path().join("collector")).await?;
    let (bytes, commit, frames) = image(1);
    send_and_let_pins_lapse(&uploader, &shared, &lease, &commit, &frames).await?;
    let orphan = store_orphan(&uploader).await?;

    // The commit stops after its check that every chunk is present, before its record.
    let (gate, handle) = gate();
    *uploader.chunks.at_persist.lock().unwrap() = Some(gate);
    let committing = tokio::spawn({
        let farm = uploader.farm.clone();
        let lease = lease.clone();
        let commit = commit.clone();
        async move {
            farm.commit_image("1", "a", &lease, "disk.img", commit)
                .await
        }
    });
    handle.reached.await?;
    // The other server collects now, to its end: the image is not recorded yet, so
    // nothing lists its chunks; only the commit's pins keep them.
    let (freed, _) = collector.farm.collect_garbage().await?;
    assert_eq!(freed, 1, "the orphan is collected, nothing else");
    assert_eq!(
        collector.chunks.missing(&[orphan]).await?,
        vec![orphan],
        "the orphan is gone"
    );
    assert!(
        collector
            .chunks
            .missing(&entries_of(&commit))
            .await?
            .is_empty(),
        "the committing image's chunks are all still there"
    );
    let _ = handle.resume.send(());
    committing.await??;

    let back = finish_and_read(&collector.farm, &shared, &lease, commit.size).await?;
    assert!(back == bytes, "the image reads back byte for byte");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_between_a_collections_mark_and_its_removal_keeps_its_chunks() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let shared = dir.path().join("shared");
    let lease = claimed_job(&shared).await?;
    let uploader = replica(&shared, &dir.path().join("uploader")).await?;
    let collector = replica(&shared, &dir.path().join("collector")).await?;
    let (bytes, commit, frames) = image(2);
    send_and_let_pins_lapse(&uploader, &shared, &lease, &commit, &frames).await?;
    let orphan = store_orphan(&uploader).await?;

    // The collection stops after it marked (no image lists these chunks, none is
    // pinned), before it removes.
    let (gate, handle) = gate();
    *collector.chunks.at_remove.lock().unwrap() = Some(gate);
    let collecting = tokio::spawn({
        let farm = collector.farm.clone();
        async move { farm.collect_garbage().await }
    });
    handle.reached.await?;
    // The whole commit runs now: it finds every chunk present and records the image.
    uploader
        .farm
        .commit_image("1", "a", &lease, "disk.img", commit.clone())
        .await?;
    let _ = handle.resume.send(());
    let (freed, _) = collecting.await??;
    assert_eq!(freed, 1, "the orphan is collected, nothing else");
    assert_eq!(collector.chunks.missing(&[orphan]).await?, vec![orphan]);

    let back = finish_and_read(&uploader.farm, &shared, &lease, commit.size).await?;
    assert!(back == bytes, "the image reads back byte for byte");

    // Once the image is gone, its chunks go too, and their pack with them.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(shared.join("kiln.db"));
    let pool = sqlx::SqlitePool::connect_with(options).await?;
    sqlx::query("DELETE FROM images").execute(&pool).await?;
    sqlx::query("UPDATE chunk_pins SET until = 0")
        .execute(&pool)
        .await?;
    pool.close().await;
    let (freed, _) = collector.farm.collect_garbage().await?;
    assert_eq!(freed as usize, frames.len());
    let packs = std::fs::read_dir(shared.join("packs"))?.count();
    assert_eq!(packs, 0, "every pack was empty and is deleted");
    Ok(())
}
