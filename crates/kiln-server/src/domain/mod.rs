//! The farm: everything the server does, with no HTTP in it.
//!
//! [`Farm`] owns the state the operations share (the stores, the dispatcher, the
//! clients' sessions and contacts, the credentials) and keeps it to itself: the HTTP
//! handlers and the background workers call its operations and nothing else. Each
//! operation that changes something also says so (see [`Farm::changed`] and
//! [`Farm::job_available`]), so that no caller has to remember to.
//!
//! - [`builds`]: submit (parse, stage, check, insert), read, delete a build.
//! - [`jobs`]: claim and offer, heartbeats, logs, finish, fail, release, give up,
//!   restart, cancel, sessions and what the clock does to jobs.
//! - [`images`]: the chunked transfer, image reads, garbage collection, storage figures.
//! - [`clients`]: the inventory and the credentials (enroll, issue, revoke, join token).
//! - [`credentials`]: the server's secrets and how a caller is identified.
//! - [`files`]: the checks of a submitted files archive.
//! - [`web`]: dashboard sessions (login with the admin token, logout, CSRF tokens).
//! - [`follow`]: waking on the farm's changes, for event streams.
//! - [`figures`]: what metrics and the dashboard read: the queue, storage, the disk.
//!
//! Errors are [`FarmError`], in the farm's words.

pub mod builds;
pub mod clients;
pub mod credentials;
mod error;
pub mod figures;
pub mod files;
pub mod follow;
pub mod images;
pub mod jobs;
mod notices;
pub mod web;

pub use error::{FarmError, FarmResult};

use crate::contacts::Contacts;
use crate::dispatch::Dispatcher;
use crate::holders::Holders;
use crate::metrics::Metrics;
use crate::sessions::Sessions;
use crate::ServerConfig;
use kiln_blob::{BlobStore, ChunkStore};
use kiln_proto::state::JobState;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// The job store as the farm holds it: every area of it (see [`kiln_store::Store`]).
pub type Store = dyn kiln_store::Store;

/// The directory under `--data` where uploads are spooled.
const SCRATCH_DIR: &str = "tmp";

/// The longest a long poll (claim, offer, log or event follow) is held open.
pub const MAX_WAIT_SECS: u64 = 120;

/// Who is calling, as the credential they presented makes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin token: operators.
    Admin,
    /// A client, by its own id and secret.
    Client(String),
    /// The join token: may enroll, nothing else.
    Join,
    /// No credential, on a call the server serves publicly.
    Anonymous,
}

impl Caller {
    /// Refuses anyone but an identified client; gives its id.
    pub fn require_client(&self) -> FarmResult<&str> {
        match self {
            Caller::Client(id) => Ok(id),
            Caller::Join => Err(FarmError::NotAllowed(
                "the join token only enrolls a client (POST /v1/enroll): call with the \
                 client's own id and secret"
                    .into(),
            )),
            _ => Err(FarmError::NotAllowed(
                "this call needs a client credential".into(),
            )),
        }
    }

    /// Refuses anyone but the admin.
    pub fn require_admin(&self) -> FarmResult<()> {
        match self {
            Caller::Admin => Ok(()),
            _ => Err(FarmError::NotAllowed(
                "this call needs the admin credential".into(),
            )),
        }
    }

    /// Refuses a client that names an id other than its own.
    pub fn require_client_named(&self, named: &str) -> FarmResult<()> {
        let id = self.require_client()?;
        if id == named {
            Ok(())
        } else {
            Err(FarmError::NotAllowed(format!(
                "this credential is client {id:?}'s: it cannot act as client {named:?}"
            )))
        }
    }
}

/// The stores a farm keeps its state and bytes in.
#[derive(Clone)]
pub struct Backends {
    /// Builds, jobs, leases, events, logs, image records, clients.
    pub store: Arc<Store>,
    /// Image chunks.
    pub chunks: Arc<dyn ChunkStore>,
    /// Build files archives.
    pub files: Arc<dyn BlobStore>,
}

/// The farm's state and operations; see the module docs.
pub struct Farm {
    config: ServerConfig,
    store: Arc<Store>,
    files: Arc<dyn BlobStore>,
    images: images::Images,
    credentials: credentials::Credentials,
    dispatcher: Arc<Dispatcher>,
    sessions: Sessions,
    contacts: Contacts,
    /// Which client each lease was handed to, as far as this server knows.
    holders: Holders,
    /// What happens, counted as it happens (see [`crate::metrics`]).
    metrics: Metrics,
    /// Bumped whenever log lines are appended or a job changes state, for followers.
    changes: watch::Sender<u64>,
    /// Wakes the notifier: a transition may have queued webhook notices.
    notices: Notify,
    /// Becomes true when the server stops: long polls end at once.
    stopping: watch::Sender<bool>,
}

impl Farm {
    /// A farm over `backends`, with the credentials of `config.data_dir`. Running
    /// leases get the start-up grace, and images stored whole by older versions are
    /// converted to chunks, before anything is served.
    pub async fn open(config: ServerConfig, backends: Backends) -> anyhow::Result<Arc<Farm>> {
        use anyhow::Context;
        let credentials = credentials::Credentials::load_or_create(
            &config.data_dir,
            config.admin_token_file.as_deref(),
            config.client_token_file.as_deref(),
        )?;
        // Running jobs' clients may not have heard from us for a while: give them time
        // to re-attach before their leases count as lost (invariant 3).
        let grace_until = kiln_common::now_micros() + config.startup_grace_secs as i64 * 1_000_000;
        let extended = backends.store.extend_all_leases(grace_until).await?;
        if extended > 0 {
            tracing::info!(
                n_jobs = extended,
                grace_secs = config.startup_grace_secs,
                "leases extended for re-attach"
            );
        }
        // Whatever a crash left half-spooled is of no use now.
        let scratch = config.data_dir.join(SCRATCH_DIR);
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)
                .with_context(|| format!("clearing {}", scratch.display()))?;
        }
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let dispatcher = Dispatcher::new(backends.store.clone(), config.lease_secs);
        let farm = Arc::new(Farm {
            images: images::Images::new(backends.chunks.clone()),
            store: backends.store,
            files: backends.files,
            credentials,
            dispatcher,
            sessions: Sessions::default(),
            contacts: Contacts::default(),
            holders: Holders::default(),
            metrics: Metrics::new(),
            changes: watch::channel(0).0,
            notices: Notify::new(),
            stopping: watch::channel(false).0,
            config,
        });
        farm.convert_legacy_images()
            .await
            .context("converting images stored whole to chunks")?;
        Ok(farm)
    }

    /// Where uploads are spooled before they are checked and stored: `DATA/tmp`.
    fn scratch_dir(&self) -> PathBuf {
        self.config.data_dir.join(SCRATCH_DIR)
    }

    /// How the server runs.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// What the farm counts as it happens.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The dispatcher, for the worker that runs it.
    pub(crate) fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// Says that jobs or logs changed: log and event followers look again.
    fn changed(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Says that jobs changed state to the states `to`: as [`Farm::changed`], and if
    /// one of them is an end, the notifier looks for the notices it queued. Only an end
    /// queues notices (`kiln_store::rules::may_notify`); waking the notifier for every
    /// claim, log line and progress report read the outbox (a write transaction) about
    /// three times a job for nothing.
    fn jobs_changed(&self, to: impl IntoIterator<Item = JobState>) {
        self.changed();
        if to.into_iter().any(|state| state.is_final()) {
            self.notices.notify_one();
        }
    }

    /// Says that another server sharing the store changed jobs: as for a change here
    /// (the notifier looks if a job `ended`), and a job may have become available.
    pub(crate) fn changed_elsewhere(&self, ended: bool) {
        self.changed();
        if ended {
            self.notices.notify_one();
        }
        self.job_available();
    }

    /// Follows what other servers sharing the store change (see
    /// [`kiln_store::Queue::follow_changes`]); `None` when the store is not shared.
    pub(crate) async fn follow_changes(
        &self,
    ) -> FarmResult<Option<tokio::sync::mpsc::Receiver<kiln_store::Change>>> {
        Ok(self.store.follow_changes().await?)
    }

    /// Says that a job may have become available: the dispatcher looks again.
    fn job_available(&self) {
        self.dispatcher.wake();
    }

    /// Waits until something changed that may have queued webhook notices, or
    /// `timeout` passed.
    pub(crate) async fn notices_may_be_due(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.notices.notified()).await;
    }

    /// Ends every long poll and keeps new ones from waiting: the server is stopping.
    pub fn stop(&self) {
        let _ = self.stopping.send(true);
    }

    /// Whether the server is stopping.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Resolves when the server starts stopping (at once if it has).
    pub async fn stopped(&self) {
        let mut stopping = self.stopping.subscribe();
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }

    /// Answers a long poll: calls `fetch` (which says whether its answer is worth
    /// returning) again each time something changes, until it is, `wait` passes, or
    /// the server stops; then returns the last answer. Holds nothing while it waits.
    pub async fn long_poll<T, F, Fut>(&self, wait_secs: u64, mut fetch: F) -> FarmResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = FarmResult<(T, bool)>>,
    {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(wait_secs.min(MAX_WAIT_SECS));
        let mut changes = self.changes.subscribe();
        let mut stopping = self.stopping.subscribe();
        loop {
            let (answer, ready) = fetch().await?;
            if ready || *stopping.borrow_and_update() || tokio::time::Instant::now() >= deadline {
                return Ok(answer);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = changes.changed() => {}
                _ = stopping.changed() => {}
            }
        }
    }

    /// How many clients hold a session, and how many wait for a job.
    pub fn client_counts(&self) -> (usize, usize) {
        (self.sessions.n_connected(), self.dispatcher.n_waiting())
    }
}
