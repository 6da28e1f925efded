//! The store: builds, jobs, leases, events, logs, image records, the webhook outbox and
//! the clients' histories and credentials. Only this crate speaks SQL.
//!
//! The server sees the store through one trait per area: [`Queue`] (builds, jobs,
//! claims, transitions, events, deadlines, load counts), [`Logs`], [`Images`] (image
//! records, chunk lists, legacy images, storage counters), [`Packs`] (the index of the
//! packs image chunks rest in, and the pins that keep chunks from collection),
//! [`Outbox`] (webhook notices) and [`Clients`] (histories, contacts, credentials). [`Store`] is all of them, so
//! that the server holds one `Arc<dyn Store>` and may hand a part on as a narrower
//! trait object. Two backends implement them: [`SqliteStore`] on an embedded SQLite
//! database (WAL, every read-modify-write in `BEGIN IMMEDIATE`), the default, and
//! [`PgStore`] on a PostgreSQL server (row locks and conditional updates), for farms
//! whose server processes share one database. Each has its migrations in
//! `migrations/<backend>/`.
//!
//! The farm's rules live apart from any SQL, in the private module `rules`: what a
//! claim, a report, a lost lease, a restart or a cancel does to a job, the reason its
//! event gives, how attempts, lost leases and retries are counted, and which of the
//! client's counters moves. A backend reads the job's row inside its transaction, asks
//! the rules, and writes what they decided. The `conformance` module (cargo feature
//! `conformance`) holds the store's tests, written against the traits, that every
//! backend runs with the macro `conformance_tests!`.
//!
//! Every state change writes its [`kiln_proto::api::Event`] in the same transaction,
//! and every call about a running job names its lease token: a token that is not the
//! job's current one is refused with [`StoreError::StaleLease`].
//!
//! The store also keeps each client's history ([`Clients::clients`]): a claim records
//! the [`ClaimingClient`], and the transition that ends a run counts it as finished,
//! failed or lost for its client in the same transaction.

#[cfg(feature = "conformance")]
pub mod conformance;
mod postgres;
mod rules;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use kiln_proto::api::{BuildSummary, ClientInfo, Event, ImageInfo, JobStatus, LogLine, NewLogLine};
use kiln_proto::manifest::BuildManifest;
use kiln_proto::progress::Progress;
use kiln_proto::transfer::ChunkHash;
use std::collections::BTreeMap;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named build or job does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A build with this number already exists.
    #[error("build {0} already exists")]
    DuplicateBuild(String),
    /// The lease token is not the job's current one.
    #[error(
        "lease of job {build}/{job} is not current (the job was reclaimed, restarted or cancelled)"
    )]
    StaleLease { build: String, job: String },
    /// The job's state does not allow the change.
    #[error("{0}")]
    Conflict(String),
    /// The database cannot be reached now (a database server restarting, a broken
    /// connection, no connection free in time): nothing was changed, and the same call
    /// may succeed later.
    #[error("the database is unavailable; try again")]
    Unavailable(#[source] sqlx::Error),
    /// The database failed.
    #[error("database error")]
    Db(#[source] sqlx::Error),
    /// The SQLite database failed.
    #[error("database error")]
    Sqlite(#[source] rusqlite::Error),
    /// Applying migrations failed.
    #[error("database migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            StoreError::Unavailable(err)
        } else {
            StoreError::Db(err)
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Sqlite(err)
    }
}

/// Whether `err` says the database could not be reached rather than that it refused
/// what was asked: connection failures, a pool with no connection to give, and
/// PostgreSQL's connection exceptions (class 08) and shutdown notices (57P01 to 57P03).
fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Results of store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A build to insert: the parsed manifest and where its files are stored.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub manifest: BuildManifest,
    /// Key of the build's files archive in the blob store.
    pub files_key: String,
    pub files_size: u64,
    pub submitted_at: i64,
    /// Server default accept deadline for jobs that name none.
    pub default_accept_within_secs: Option<u64>,
    /// Server default for MAXATTEMPTS: lost runs after which a job fails with `lost`.
    pub default_max_attempts: u32,
}

/// A stored build.
#[derive(Debug, Clone)]
pub struct BuildRecord {
    pub manifest: BuildManifest,
    pub files_key: String,
    pub files_size: u64,
    pub submitted_at: i64,
}

/// A queued job as the dispatcher sees it, in scheduling order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub build: String,
    pub job: String,
    pub config_type: String,
    pub assigned_to: Option<String>,
    /// Higher runs first.
    pub priority: i64,
    /// When its build was submitted (unix microseconds): among equal priorities the
    /// older runs first.
    pub submitted_at: i64,
}

/// A job the store just handed to a client.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub build: String,
    pub job: String,
    pub title: String,
    pub config_type: String,
    pub install_script: String,
    pub configure_script: Option<String>,
    pub image_script: String,
    pub verify_script: Option<String>,
    pub timeout_secs: u64,
    pub attempt: u32,
    pub lease: String,
    /// When the job last became queued (its previous event, unix microseconds): the
    /// claim ends a wait that began then.
    pub queued_since: i64,
}

/// A client as it introduces itself in a claim: recorded with the claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimingClient {
    pub id: String,
    /// Config types it takes; `*` takes any.
    pub include: Vec<String>,
    /// How many jobs it runs at once, if it said.
    pub slots: Option<u32>,
    /// Its kiln version, if it said.
    pub version: Option<String>,
    /// The IP address its claim came from.
    pub address: Option<String>,
}

impl ClaimingClient {
    /// A client known only by its id.
    pub fn with_id(id: &str) -> Self {
        ClaimingClient {
            id: id.to_owned(),
            ..ClaimingClient::default()
        }
    }
}

/// The holder of a job's lease, as the store has it.
#[derive(Debug, Clone)]
pub struct LeaseHolder {
    pub client_id: String,
    pub attempt: u32,
    pub time_start: i64,
    pub timeout_secs: u64,
}

/// What [`Logs::append_log_within`] did.
#[derive(Debug, Clone)]
pub struct LogAppend {
    pub holder: LeaseHolder,
    /// How many of the lines given were stored.
    pub n_stored: usize,
    /// The job's log is cut: it reached its limit, now or before.
    pub cut: bool,
    /// This call cut it (and stored the notice).
    pub cut_now: bool,
}

/// An image whose bytes are in the blob store, to record under a lease.
#[derive(Debug, Clone)]
pub struct NewImage {
    pub name: String,
    pub size: u64,
    pub blake3: String,
    pub sha256: String,
    pub blob_key: String,
    pub created_at: i64,
    /// The ordered chunk list, packed (see `kiln_blob::frames::pack_chunk_list`).
    pub chunk_list: Vec<u8>,
}

/// A stored image with where its bytes are.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    pub info: ImageInfo,
    /// The whole-file blob of an image stored before chunking (see
    /// [`Images::legacy_images`]).
    pub blob_key: String,
    /// The packed chunk list; `None` only for an image not yet converted.
    pub chunk_list: Option<Vec<u8>>,
}

/// An image stored whole, before images were kept as chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyImage {
    pub build: String,
    pub job: String,
    pub name: String,
    pub blob_key: String,
}

/// What deleting a build removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedBuild {
    pub jobs: u64,
    pub images: u64,
    /// The blob of the build's files, and whether another build still uses it.
    pub files_key: String,
    pub files_key_shared: bool,
}

/// What the server has stored, from the database's side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageTotals {
    pub images: u64,
    /// The sum of their sizes.
    pub bytes: u64,
}

/// A server's load as its masters see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadCounts {
    pub builds: u64,
    pub queued: u64,
    pub running: u64,
}

/// How many jobs of one config type are in one state; for queued jobs, since when the
/// one queued longest has waited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCount {
    pub state: kiln_proto::state::JobState,
    pub config_type: String,
    pub jobs: u64,
    /// For queued jobs: the earliest time (unix microseconds) one of them became
    /// queued. `None` for other states.
    pub oldest_since: Option<i64>,
}

/// A job that changed state because of time (lease lapsed, deadline passed).
#[derive(Debug, Clone)]
pub struct TimedTransition {
    pub build: String,
    pub job: String,
    pub event: Event,
}

/// A webhook delivery waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub id: i64,
    pub build: String,
    pub url: String,
    /// The JSON body: a [`kiln_proto::api::Notice`].
    pub body: String,
    /// Deliveries tried so far.
    pub attempts: u32,
}

/// How a failed job is reported by its client.
#[derive(Debug, Clone)]
pub struct Failure {
    pub reason: String,
    pub message: String,
}

/// A word from [`Queue::follow_changes`]: another server sharing the store changed
/// jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// Whether a job ended (so that a webhook notice may have been queued). Also true
    /// when the word stands for words that may have been lost.
    pub ended: bool,
}

/// Builds, jobs and their leases: submission, the queue in scheduling order, claims,
/// every transition and the event it writes, the timed transitions (lapsed leases,
/// hung jobs, accept deadlines), and what the server reports of its load.
///
/// All times are unix microseconds, passed in by the caller so that one clock (the
/// server's) orders everything. Every transition follows the farm's rules (the crate's
/// `rules` module) and writes its [`Event`] (and the webhook notices it calls for) in
/// the transaction that changes the job; a backend may commit calls made at the same
/// time in one transaction (PostgreSQL's batches), each decided as if it were alone and
/// answered only once committed.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Inserts a build and its queued jobs. Refuses a number that exists.
    async fn insert_build(&self, build: &NewBuild) -> StoreResult<()>;
    /// Every build, newest first, with job counts.
    async fn list_builds(&self) -> StoreResult<Vec<BuildSummary>>;
    /// One build's summary.
    async fn build_summary(&self, number: &str) -> StoreResult<BuildSummary>;
    /// One build's manifest and files.
    async fn get_build(&self, number: &str) -> StoreResult<BuildRecord>;
    /// A build's jobs in manifest order.
    async fn list_jobs(&self, build: &str) -> StoreResult<Vec<JobStatus>>;
    /// One job.
    async fn get_job(&self, build: &str, job: &str) -> StoreResult<JobStatus>;
    /// The key and size of a build's files archive, without reading its manifest.
    async fn build_files(&self, number: &str) -> StoreResult<(String, u64)>;
    /// Whether `client_id` runs a job of `build` now (false for an unknown build).
    async fn runs_job_of(&self, client_id: &str, build: &str) -> StoreResult<bool>;
    /// Queued jobs in scheduling order (priority, deadline, submission), at most `limit`.
    async fn queued_candidates(&self, limit: u32) -> StoreResult<Vec<Candidate>>;
    /// Atomically hands a queued job to a client under a new lease, and records the
    /// client (what it said of itself, its address, its contact, one more claim) in
    /// the same transaction. `None` when the job is no longer queued.
    async fn claim(
        &self,
        build: &str,
        job: &str,
        client: &ClaimingClient,
        lease_until: i64,
        now: i64,
    ) -> StoreResult<Option<ClaimedJob>>;
    /// Gives back a job its client never started: queued again, attempt not counted,
    /// and the claim not counted in the client's history either.
    async fn release(&self, build: &str, job: &str, lease: &str, now: i64) -> StoreResult<()>;
    /// Extends the lease and records progress. Returns the holder.
    async fn heartbeat(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        lease_until: i64,
        progress: Option<&Progress>,
    ) -> StoreResult<LeaseHolder>;
    /// Records that the job's steps are over (its images are uploading): from now on
    /// only the lease, not the job's timeout, decides whether its client is alive.
    async fn mark_steps_done(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        now: i64,
    ) -> StoreResult<()>;
    /// Checks that `lease` is the job's current lease.
    async fn check_lease(&self, build: &str, job: &str, lease: &str) -> StoreResult<LeaseHolder>;
    /// Marks the job finished: at least one image, each stored under this lease (with
    /// [`Images::add_image`]); the job's other images are dropped. Its client's history
    /// counts one more finished job and the images' total size.
    async fn finish(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        images: &[String],
        now: i64,
    ) -> StoreResult<Event>;
    /// Marks the job failed, or queues it again when it has retries left; either way
    /// its client's history counts one more failed job.
    async fn fail(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        failure: &Failure,
        now: i64,
    ) -> StoreResult<Event>;
    /// Requeues (or fails, past the attempt limit) running jobs whose lease lapsed, and
    /// fails jobs held past their timeout plus `hung_grace_secs`. Each counts as a lost
    /// job in its client's history.
    async fn reap_leases(
        &self,
        now: i64,
        hung_grace_secs: u64,
    ) -> StoreResult<Vec<TimedTransition>>;
    /// The holder gives a started job back (its client restarted, or is stopping):
    /// queued again at once with the run counted as lost, or failed as `lost` past
    /// MAXATTEMPTS. The client's history counts a lost job.
    async fn give_up(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        reason: &str,
        now: i64,
    ) -> StoreResult<Event>;
    /// Takes every running job of a client that is gone (its connection dropped and it
    /// did not come back), as [`Queue::give_up`] does.
    async fn take_back_from_client(
        &self,
        client_id: &str,
        reason: &str,
        now: i64,
    ) -> StoreResult<Vec<TimedTransition>>;
    /// Expires queued jobs no client took before their accept deadline (a job given back
    /// unstarted with [`Queue::release`] counts as never taken).
    async fn expire_unclaimed(&self, now: i64) -> StoreResult<Vec<TimedTransition>>;
    /// The earliest lease expiry or accept deadline, if any.
    async fn next_deadline(&self) -> StoreResult<Option<i64>>;
    /// Gives every running job's lease at least until `until` (start-up grace).
    async fn extend_all_leases(&self, until: i64) -> StoreResult<u64>;
    /// Puts a job back in the queue as new, whatever its state, without its images.
    async fn restart(&self, build: &str, job: &str, now: i64) -> StoreResult<Event>;
    /// Cancels a job that has not ended.
    async fn cancel(&self, build: &str, job: &str, now: i64) -> StoreResult<Event>;
    /// The build's events after `after`.
    async fn events(&self, build: &str, after: i64) -> StoreResult<Vec<Event>>;
    /// Every build's events after `after`, oldest first, at most `limit` of them.
    async fn farm_events(&self, after: i64, limit: u32) -> StoreResult<Vec<Event>>;
    /// The newest event's sequence number (0 with none).
    async fn last_event_seq(&self) -> StoreResult<i64>;
    /// Mean run time in seconds of finished jobs of a config type.
    async fn mean_run_secs(&self, config_type: &str) -> StoreResult<Option<f64>>;
    /// Deletes a build with its jobs, events, logs, images and pending notifications.
    /// Refuses (conflict, naming them) while any of its jobs is running.
    async fn delete_build(&self, build: &str) -> StoreResult<DeletedBuild>;
    /// Whether any build's files are stored under `key`.
    async fn files_key_in_use(&self, key: &str) -> StoreResult<bool>;
    /// How many builds there are and how many jobs are queued and running: what a
    /// server reports to its masters.
    async fn load_counts(&self) -> StoreResult<LoadCounts>;
    /// Follows what other servers sharing this store change: a message on the channel
    /// says that jobs may have been queued, claimed or ended elsewhere (or that some
    /// such word may have been lost: the feed's connection dropped, or a while passed
    /// without any). What this store itself changes is not told. `None` when no other
    /// server shares the store (SQLite). The feed ends when the receiver is dropped.
    async fn follow_changes(&self) -> StoreResult<Option<tokio::sync::mpsc::Receiver<Change>>>;
    /// Jobs counted by state and config type (only the pairs that have jobs), with
    /// the oldest queued job's queued-since time: the queue as metrics show it.
    async fn job_counts(&self) -> StoreResult<Vec<JobCount>>;
    /// Claims, image records and ends answered by a batch of several calls rather
    /// than alone, since the store opened (PostgreSQL's batches); `None` for a backend
    /// that has none.
    fn calls_batched(&self) -> Option<u64> {
        None
    }
}

/// Jobs' logs: lines appended under the lease, read back by sequence number.
#[async_trait]
pub trait Logs: Send + Sync + 'static {
    /// Appends log lines under the lease (and the latest progress, if any). Returns the
    /// holder.
    async fn append_log(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        lines: &[NewLogLine],
        progress: Option<&Progress>,
        now: i64,
    ) -> StoreResult<LeaseHolder>;
    /// Appends log lines under the lease like [`Logs::append_log`], keeping the
    /// job's stored log text within `max_bytes`: the lines that fit are stored, then
    /// `cut_notice` as a last `kiln` line, and from then on no more lines of the job
    /// (the progress is still recorded). The count lives in the job's row, so it holds
    /// across restarts.
    #[expect(
        clippy::too_many_arguments,
        reason = "the arguments of append_log and the limit with its notice"
    )]
    async fn append_log_within(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        lines: &[NewLogLine],
        progress: Option<&Progress>,
        now: i64,
        max_bytes: u64,
        cut_notice: &str,
    ) -> StoreResult<LogAppend>;
    /// Log lines after `after`, at most `limit`.
    async fn read_log(
        &self,
        build: &str,
        job: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<LogLine>>;
}

/// Image records and what refers to chunks: the images stored under a lease and kept by
/// finished jobs, their chunk lists (for garbage collection), images stored whole before
/// chunking, and the storage counters.
#[async_trait]
pub trait Images: Send + Sync + 'static {
    /// Records an uploaded image under the lease (replacing one of the same name).
    async fn add_image(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        image: &NewImage,
    ) -> StoreResult<()>;
    /// The build's stored images (of finished jobs).
    async fn list_images(&self, build: &str) -> StoreResult<Vec<ImageInfo>>;
    /// One stored image.
    async fn get_image(&self, build: &str, job: &str, name: &str) -> StoreResult<ImageRecord>;
    /// Images stored whole, before chunking, that the server must convert.
    async fn legacy_images(&self) -> StoreResult<Vec<LegacyImage>>;
    /// Records the chunk list of a converted image.
    async fn set_chunk_list(
        &self,
        build: &str,
        job: &str,
        name: &str,
        chunk_list: &[u8],
    ) -> StoreResult<()>;
    /// The packed chunk list of every image, for garbage collection.
    async fn chunk_lists(&self) -> StoreResult<Vec<Vec<u8>>>;
    /// How many images are stored, and their total size.
    async fn image_totals(&self) -> StoreResult<ImageTotals>;
    /// Adds to named counters, creating them at zero.
    async fn add_counters(&self, deltas: &[(&str, i64)]) -> StoreResult<()>;
    /// Sets named counters.
    async fn set_counters(&self, values: &[(&str, i64)]) -> StoreResult<()>;
    /// Every counter.
    async fn counters(&self) -> StoreResult<BTreeMap<String, i64>>;
}

/// Notices grouped by URL, each group and the groups in the order given.
pub(crate) fn notices_by_url(notices: Vec<Notification>) -> Vec<Vec<Notification>> {
    let mut groups: Vec<Vec<Notification>> = Vec::new();
    for notice in notices {
        match groups.iter_mut().find(|group| group[0].url == notice.url) {
            Some(group) => group.push(notice),
            None => groups.push(vec![notice]),
        }
    }
    groups
}

/// The webhook outbox: notices written with the events that call for them, handed to
/// the notifier when due, until delivered or given up.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// The pending notifications of every URL whose oldest pending one is due at `now`,
    /// oldest first, at most `limit`.
    async fn due_notifications(&self, now: i64, limit: u32) -> StoreResult<Vec<Notification>>;
    /// As [`Outbox::due_notifications`], and takes them: each URL's notices are held
    /// from every other caller (another server's notifier) until `hold_until`, or until
    /// delivered, failed or released. A URL another caller holds is left out. Oldest
    /// first.
    async fn claim_notifications(
        &self,
        now: i64,
        limit: u32,
        hold_until: i64,
    ) -> StoreResult<Vec<Notification>>;
    /// Ends the hold on notices taken but not tried: they are due at `now`.
    async fn release_notifications(&self, ids: &[i64], now: i64) -> StoreResult<()>;
    /// Records a delivery.
    async fn notification_delivered(&self, id: i64, now: i64) -> StoreResult<()>;
    /// Records a failed delivery: tried again at `retry_at`, or given up when `None`.
    async fn notification_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: Option<i64>,
        now: i64,
    ) -> StoreResult<()>;
}

/// The clients: each one's history (written by the transitions of [`Queue`]), its
/// latest stored contact, and its own credential.
#[async_trait]
pub trait Clients: Send + Sync + 'static {
    /// Records a later contact with a known client (and its address, if given). Returns
    /// false when the store has no such client (it never claimed a job here).
    async fn touch_client(&self, id: &str, address: Option<&str>, now: i64) -> StoreResult<bool>;
    /// Every client that claimed a job here, by id, with the jobs it runs now. Their
    /// `session_open` is false: sessions are the server's to know.
    async fn clients(&self) -> StoreResult<Vec<ClientInfo>>;
    /// A client's own credential, revoked or not.
    async fn client_credential(&self, id: &str) -> StoreResult<Option<ClientCredential>>;
    /// Every client credential, by id.
    async fn client_credentials(&self) -> StoreResult<Vec<ClientCredential>>;
    /// Records `secret_hash` as client `id`'s credential. With [`CredentialWrite::Enroll`]
    /// only an id without a credential gets one (atomically: two enrollments of one id
    /// cannot both win); [`CredentialWrite::Issue`] replaces any, a revoked one too.
    async fn put_client_credential(
        &self,
        id: &str,
        secret_hash: &str,
        how: CredentialWrite,
        now: i64,
    ) -> StoreResult<CredentialPut>;
    /// Revokes client `id`'s credential; false when it has none (or it was revoked).
    async fn revoke_client_credential(&self, id: &str, now: i64) -> StoreResult<bool>;
    /// Records that the dashboard session `nonce` was logged out; the record is kept
    /// until `until` (when the session would have expired anyway). Forgets records
    /// whose time passed by `now`.
    async fn end_web_session(&self, nonce: &str, until: i64, now: i64) -> StoreResult<()>;
    /// Whether the dashboard session `nonce` was logged out (on any server sharing
    /// this store).
    async fn web_session_ended(&self, nonce: &str) -> StoreResult<bool>;
}

/// The whole store: every area in one object, so that the server holds one
/// `Arc<dyn Store>` and hands a part of it on as `&dyn Queue`, `Arc<dyn Images>`, ...
/// Every type that implements the six areas is a `Store`.
pub trait Store: Queue + Logs + Images + Packs + Outbox + Clients {}

impl<T: Queue + Logs + Images + Packs + Outbox + Clients> Store for T {}

/// A chunk's entry in the pack index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub hash: ChunkHash,
    /// Where the chunk's frame starts in its pack.
    pub offset: u64,
    /// The frame's length.
    pub len: u32,
}

/// Where an indexed chunk rests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedAt {
    pub pack: String,
    pub offset: u64,
    pub len: u32,
}

/// A pack with the bytes its index entries still cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackFill {
    pub pack: String,
    pub bytes: u64,
    pub live_bytes: u64,
}

/// The index of the packs image chunks rest in, and the pins that keep chunks from
/// collection. Both are here, in the one store every server replica shares, so that
/// a collection run by one server never removes a chunk an upload to another is
/// about to commit: the upload pins its chunks before it checks them, and removal
/// skips pinned chunks in the same transaction that removes.
#[async_trait]
pub trait Packs: Send + Sync + 'static {
    /// Records a sealed pack and its entries; a chunk indexed already keeps its entry.
    /// Returns how many entries were new.
    async fn add_pack(
        &self,
        pack: &str,
        bytes: u64,
        entries: &[PackEntry],
        now: i64,
    ) -> StoreResult<u64>;
    /// Where each of `hashes` rests, in that order.
    async fn locate_chunks(&self, hashes: &[ChunkHash]) -> StoreResult<Vec<Option<PackedAt>>>;
    /// Up to `limit` indexed chunks after `after`, in name order, with their lengths.
    async fn list_chunks(
        &self,
        after: Option<ChunkHash>,
        limit: u32,
    ) -> StoreResult<Vec<(ChunkHash, u32)>>;
    /// Drops the entries of `hashes` that no pin holds past `since` (when the
    /// collection removing them started); returns the bytes dropped.
    async fn remove_unpinned_chunks(&self, hashes: &[ChunkHash], since: i64) -> StoreResult<u64>;
    /// Packs whose entries cover less than `live_share` of their bytes.
    async fn sparse_packs(&self, live_share: f64) -> StoreResult<Vec<PackFill>>;
    /// The entries of `pack`, in offset order.
    async fn pack_entries(&self, pack: &str) -> StoreResult<Vec<PackEntry>>;
    /// Records `new` (its name, length and copies of chunks of `old`), moves to it the
    /// entries that still point into `old`, and forgets `old` when nothing points into
    /// it any more; one transaction. Returns whether `old` was forgotten.
    async fn replace_pack(
        &self,
        old: &str,
        new: Option<(&str, u64, &[PackEntry])>,
        now: i64,
    ) -> StoreResult<bool>;
    /// Keeps `hashes` from collection until `until` for `owner` (or later, if it
    /// pinned them longer).
    async fn pin_chunks(&self, owner: &str, hashes: &[ChunkHash], until: i64) -> StoreResult<()>;
    /// Ends `owner`'s pins of `hashes` at `now` (an image that lists them is recorded):
    /// collections that started before `now` still skip them, later ones do not.
    async fn release_pins(&self, owner: &str, hashes: &[ChunkHash], now: i64) -> StoreResult<()>;
    /// Forgets pins that ended before `now`; returns how many.
    async fn forget_pins(&self, now: i64) -> StoreResult<u64>;
    /// The id of the image store this index describes, once recorded.
    async fn image_store_id(&self) -> StoreResult<Option<String>>;
    /// Records `id` as the image store this index describes unless one is recorded
    /// already; returns the id recorded.
    async fn claim_image_store_id(&self, id: &str) -> StoreResult<String>;
}

/// A client's own credential as stored: the hash of its secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCredential {
    pub client_id: String,
    /// An argon2id PHC string.
    pub secret_hash: String,
    /// `enrolled` (with the join token) or `issued` (by an operator).
    pub origin: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// How [`Clients::put_client_credential`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialWrite {
    /// A client enrolling itself: only if the id has no credential.
    Enroll,
    /// An operator issuing one: replaces any.
    Issue,
}

/// What [`Clients::put_client_credential`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialPut {
    /// The id had none: it has this one now.
    Created,
    /// An operator replaced the id's credential.
    Replaced,
    /// Enrolling: the id already has a credential (nothing written).
    Exists,
    /// Enrolling: the id's credential was revoked (nothing written).
    Revoked,
}
