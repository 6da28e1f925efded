//! Builds: a submission (its manifest parsed and checked, its files archive spooled,
//! checked and stored, then the build and its jobs inserted), what operators read of
//! a build, and deleting one.

use super::{Caller, Farm, FarmError, FarmResult};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use kiln_blob::{BlobRead, Digests, ImageHasher};
use kiln_proto::api::{BuildSummary, Event, ImageInfo, Submitted};
use kiln_proto::manifest::BuildManifest;
use kiln_proto::transfer::DeleteReport;
use kiln_store::{NewBuild, StoreError};
use std::io::Write;
use std::ops::Range;

/// The largest manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A submission's files archive, spooled to the server's scratch directory while it
/// arrived (and deleted with this), with its digests.
pub struct StagedFiles {
    file: tempfile::NamedTempFile,
    digests: Digests,
}

/// A build's stored files archive.
#[derive(Debug, Clone)]
pub struct StoredFiles {
    pub key: String,
    pub size: u64,
}

impl Farm {
    /// Parses a submission's manifest and checks what can be checked before its files
    /// arrive: its size, its number of jobs, and that its build number is new.
    pub async fn check_manifest(&self, file_name: &str, bytes: &[u8]) -> FarmResult<BuildManifest> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(FarmError::TooLarge(format!(
                "the manifest is larger than {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| {
            FarmError::invalid(
                "bad_manifest",
                format!("{file_name}: the manifest is not UTF-8 text"),
            )
        })?;
        let parsed = BuildManifest::parse(file_name, text)
            .map_err(|err| FarmError::invalid("bad_manifest", err.to_string()))?;
        let max_jobs = self.config.max_jobs_per_build;
        if parsed.jobs.len() > max_jobs {
            return Err(FarmError::TooLarge(format!(
                "{file_name}: build {} has {} jobs; this server accepts at most \
                 {max_jobs} jobs per build (--max-jobs-per-build)",
                parsed.number,
                parsed.jobs.len()
            )));
        }
        // Refuse a known build number before reading a large archive.
        match self.store.build_summary(&parsed.number).await {
            Ok(_) => Err(StoreError::DuplicateBuild(parsed.number).into()),
            Err(StoreError::NotFound(_)) => Ok(parsed),
            Err(err) => Err(err.into()),
        }
    }

    /// Spools a submission's files archive as it arrives, hashing it on the way.
    pub async fn stage_files<S, E>(&self, mut pieces: S) -> FarmResult<StagedFiles>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let staging = |err: std::io::Error| {
            FarmError::from(kiln_blob::BlobError::io("staging the build's files", err))
        };
        let scratch = self.scratch_dir();
        let mut file = tokio::task::spawn_blocking(move || {
            tempfile::Builder::new()
                .prefix("files-")
                .tempfile_in(scratch)
        })
        .await
        .map_err(|err| FarmError::task("staging the build's files", err))?
        .map_err(staging)?;
        let mut hasher = ImageHasher::new();
        let mut size = 0u64;
        while let Some(piece) = pieces.next().await {
            let piece = piece.map_err(|err| {
                FarmError::invalid("bad_upload", format!("reading the build's files: {err}"))
            })?;
            size += piece.len() as u64;
            if size > self.config.max_files_bytes {
                return Err(FarmError::TooLarge(format!(
                    "the build's files are larger than the {} bytes this server accepts \
                     (--max-files-bytes)",
                    self.config.max_files_bytes
                )));
            }
            hasher.update(&piece);
            file = tokio::task::spawn_blocking(move || file.write_all(&piece).map(|()| file))
                .await
                .map_err(|err| FarmError::task("staging the build's files", err))?
                .map_err(staging)?;
        }
        Ok(StagedFiles {
            file,
            digests: hasher.finish(),
        })
    }

    /// Checks a submission's files against its manifest, stores them, and inserts the
    /// build with its jobs queued; the dispatcher hears of them at once.
    pub async fn submit(
        &self,
        manifest: BuildManifest,
        files: StagedFiles,
    ) -> FarmResult<Submitted> {
        let StagedFiles { file, digests } = files;
        let checked_manifest = manifest.clone();
        let file = tokio::task::spawn_blocking(move || {
            super::files::check_archive(file.path(), &checked_manifest).map(|_| file)
        })
        .await
        .map_err(|err| FarmError::task("checking the build's files", err))?
        .map_err(|msg| FarmError::invalid("bad_files", msg))?;
        let reader = tokio::fs::File::open(file.path()).await.map_err(|err| {
            FarmError::from(kiln_blob::BlobError::io("reading the staged files", err))
        })?;
        self.files.put(&digests.blake3, Box::new(reader)).await?;
        drop(file);
        let n_jobs = manifest.jobs.len() as u32;
        let number = manifest.number.clone();
        self.store
            .insert_build(&NewBuild {
                manifest,
                files_key: digests.blake3,
                files_size: digests.size,
                submitted_at: kiln_common::now_micros(),
                default_accept_within_secs: self.config.default_accept_within_secs,
                default_max_attempts: self.config.default_max_attempts,
            })
            .await?;
        tracing::info!(build = %number, n_jobs, "build submitted");
        self.changed();
        self.job_available();
        Ok(Submitted { number, n_jobs })
    }

    /// Every build, newest first, with job counts.
    pub async fn builds(&self) -> FarmResult<Vec<BuildSummary>> {
        Ok(self.store.list_builds().await?)
    }

    /// One build's summary.
    pub async fn build(&self, build: &str) -> FarmResult<BuildSummary> {
        Ok(self.store.build_summary(build).await?)
    }

    /// One build's manifest.
    pub async fn manifest(&self, build: &str) -> FarmResult<BuildManifest> {
        Ok(self.store.get_build(build).await?.manifest)
    }

    /// The build's events after `after`, waiting up to `wait_secs` for one when there
    /// is none yet.
    pub async fn events(&self, build: &str, after: i64, wait_secs: u64) -> FarmResult<Vec<Event>> {
        self.store.build_summary(build).await?;
        self.long_poll(wait_secs, || async {
            let events = self.store.events(build, after).await?;
            let ready = !events.is_empty();
            Ok((events, ready))
        })
        .await
    }

    /// The build's stored images (of finished jobs).
    pub async fn images(&self, build: &str) -> FarmResult<Vec<ImageInfo>> {
        self.store.build_summary(build).await?;
        Ok(self.store.list_images(build).await?)
    }

    /// The build's files archive: for the admin, or for a client holding one of its
    /// jobs (it names the job and presents the lease).
    pub async fn build_files(
        &self,
        caller: &Caller,
        build: &str,
        job: Option<&str>,
        lease: Option<&str>,
    ) -> FarmResult<StoredFiles> {
        if let Caller::Client(_) = caller {
            let job = job.ok_or_else(|| {
                FarmError::invalid(
                    "no_job",
                    "a client fetches a build's files for a job it holds: add ?job=ID",
                )
            })?;
            self.store
                .check_lease(build, job, require_lease(lease)?)
                .await?;
        }
        // Not `get_build`: its manifest is as long as the build, and every job reads
        // its build's files.
        let (key, _) = self.store.build_files(build).await?;
        let size = self.files.size(&key).await?;
        Ok(StoredFiles { key, size })
    }

    /// The bytes of `range` of stored build files.
    pub async fn read_files(&self, files: &StoredFiles, range: Range<u64>) -> FarmResult<BlobRead> {
        Ok(self.files.get(&files.key, Some(range)).await?)
    }

    /// Deletes a build and everything of it, then the chunks no image uses any more.
    pub async fn delete_build(&self, build: &str) -> FarmResult<DeleteReport> {
        let deleted = self.store.delete_build(build).await?;
        if !deleted.files_key_shared {
            self.files.remove(&deleted.files_key).await?;
        }
        self.changed();
        let (chunks_freed, bytes_freed) = self.collect_garbage().await?;
        tracing::info!(build = %build, images = deleted.images, chunks_freed, bytes_freed, "build deleted");
        Ok(DeleteReport {
            build: build.to_owned(),
            jobs: deleted.jobs,
            images: deleted.images,
            chunks_freed,
            bytes_freed,
        })
    }
}

/// The lease a call about a job carries, or the refusal that says where it goes.
pub fn require_lease(lease: Option<&str>) -> FarmResult<&str> {
    lease.filter(|lease| !lease.is_empty()).ok_or_else(|| {
        FarmError::invalid(
            "no_lease",
            format!(
                "this call needs the job's lease token in the {} header",
                kiln_proto::LEASE_HEADER
            ),
        )
    })
}
