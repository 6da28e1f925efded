//! The kiln server: the HTTP API under `/v1`, the dispatcher that hands jobs to
//! long-polling clients, and the background loop that reclaims lapsed leases and
//! expires jobs nobody accepted.
//!
//! Start it with [`Server::open`] then [`Server::run`] on a bound listener, so that
//! tests can bind `127.0.0.1:0`. State lives in a [`kiln_store::JobStore`], bytes in a
//! [`kiln_blob::BlobStore`].

pub mod api;
mod auth;
mod contacts;
mod dispatch;
mod error;
mod files;
mod loops;
mod notify;
mod register;
mod sessions;
mod transfer;

pub use auth::{hash_secret, verify_secret, Caller};

use anyhow::Context;
use dispatch::Dispatcher;
use kiln_blob::{BlobStore, LocalBlobStore, LocalChunkStore};
use kiln_store::{JobStore, SqliteStore};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How the server runs. Durations are whole seconds, as on the command line.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the database, the blobs and the token files live.
    pub data_dir: PathBuf,
    /// An existing admin token file instead of `DATA/admin.token`.
    pub admin_token_file: Option<PathBuf>,
    /// An existing client token file instead of `DATA/client.token`.
    pub client_token_file: Option<PathBuf>,
    /// How long a lease lasts past each heartbeat.
    pub lease_secs: u64,
    /// How often clients heartbeat; well inside the lease.
    pub heartbeat_secs: u64,
    /// Extra time every running lease gets when the server starts, so that clients
    /// re-attach instead of losing their jobs.
    pub startup_grace_secs: u64,
    /// A job still held this long past its timeout is taken from its (hung) client.
    pub hung_grace_secs: u64,
    /// A client whose session connection dropped gets this long to reconnect before
    /// its jobs are taken back, in milliseconds.
    pub session_grace_ms: u64,
    /// Accept deadline for jobs whose manifest names none.
    pub default_accept_within_secs: Option<u64>,
    /// Runs of a job that may be lost (lease lapsed, client gone, given back); the job fails with `lost` when this many were.
    pub default_max_attempts: u32,
    /// The largest build files archive accepted at submit.
    pub max_files_bytes: u64,
    /// The largest image accepted.
    pub max_image_bytes: u64,
    /// Bytes of log text stored per job; past them the log is cut with a last line
    /// saying so, and later lines are dropped while the job runs on.
    pub max_log_bytes_per_job: u64,
    /// The most jobs one build's manifest may hold.
    pub max_jobs_per_build: usize,
    /// The most image uploads (chunk bodies, whole images) one client may send at
    /// once; one more is answered `429 too_many_uploads`.
    pub max_uploads_per_client: usize,
    /// Masters to register with and heartbeat to, every `heartbeat_secs`.
    pub masters: Vec<String>,
    /// The URL masters hand out for this server; needed when `masters` is not empty.
    pub advertise: Option<String>,
    /// The file holding the masters' server credential.
    pub master_token_file: Option<PathBuf>,
    /// Serve build status and images to callers without a credential.
    pub public_read: bool,
    /// The certificate and key to serve HTTPS with; plain HTTP without.
    pub tls: Option<kiln_tls::ServerTls>,
    /// Which certificates the server trusts when it calls masters.
    pub master_tls: kiln_tls::ClientTls,
}

impl ServerConfig {
    /// The defaults, with data in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            admin_token_file: None,
            client_token_file: None,
            public_read: false,
            lease_secs: 15,
            heartbeat_secs: 5,
            startup_grace_secs: 15,
            hung_grace_secs: 60,
            session_grace_ms: 1000,
            default_accept_within_secs: None,
            default_max_attempts: 3,
            max_files_bytes: 1 << 30,
            max_image_bytes: 64 << 30,
            max_log_bytes_per_job: 64 << 20,
            max_jobs_per_build: 10_000,
            max_uploads_per_client: 4,
            masters: Vec::new(),
            advertise: None,
            master_token_file: None,
            tls: None,
            master_tls: kiln_tls::ClientTls::default(),
        }
    }
}

/// Everything a request handler needs.
pub struct AppState {
    pub(crate) config: ServerConfig,
    pub(crate) store: Arc<dyn JobStore>,
    pub(crate) blobs: Arc<dyn BlobStore>,
    /// Image chunks, and what keeps collection from racing uploads.
    pub(crate) storage: transfer::Storage,
    pub(crate) credentials: auth::Credentials,
    pub(crate) dispatcher: Arc<Dispatcher>,
    /// Bumped whenever log lines are appended or a job changes state, for followers.
    pub(crate) changes: watch::Sender<u64>,
    /// Becomes true when the server stops: long polls end at once.
    pub(crate) stopping: watch::Sender<bool>,
    /// Wakes the notifier: a transition may have queued webhook notices.
    pub(crate) notices: tokio::sync::Notify,
    /// Which clients hold a session connection.
    pub(crate) sessions: sessions::Sessions,
    /// Each client's latest contact, written to the store now and then.
    pub(crate) contacts: contacts::Contacts,
    /// How many image uploads each client is sending now.
    pub(crate) uploads: transfer::UploadSlots,
}

impl AppState {
    /// Tells log followers and the dispatcher that something changed.
    pub(crate) fn changed(&self) {
        self.changes.send_modify(|generation| *generation += 1);
        self.notices.notify_one();
    }

    /// Notes a contact from a client (see [`contacts`]). When the store is due to get
    /// it, it is written in a task of its own: the caller does not wait for it, and a
    /// caller that is cancelled (a long poll whose client hung up) cannot cancel it
    /// half-way.
    pub(crate) fn note_contact(self: &Arc<Self>, client_id: &str, address: Option<&str>) {
        let now = kiln_common::now_micros();
        if !self.contacts.note(client_id, address, now) {
            return;
        }
        let state = self.clone();
        let client_id = client_id.to_owned();
        let address = address.map(str::to_owned);
        tokio::spawn(async move {
            match state
                .store
                .touch_client(&client_id, address.as_deref(), now)
                .await
            {
                Ok(true) => {}
                Ok(false) => state.contacts.unknown_to_store(&client_id, now),
                Err(err) => {
                    tracing::warn!(cause = %kiln_proto::error_chain(&err), client = %client_id, "cannot record a client's contact")
                }
            }
        });
    }
}

/// A server ready to serve.
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    /// Opens the data directory: database, blob store and credentials.
    pub async fn open(config: ServerConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let store = SqliteStore::open(&config.data_dir.join("kiln.db"))
            .await
            .context("opening the job store")?;
        let blobs = LocalBlobStore::open(&config.data_dir.join("blobs"))
            .context("opening the blob store")?;
        let chunks = LocalChunkStore::open(&config.data_dir.join("chunks"))
            .context("opening the chunk store")?;
        let credentials = auth::Credentials::load_or_create(
            &config.data_dir,
            config.admin_token_file.as_deref(),
            config.client_token_file.as_deref(),
        )?;
        let store: Arc<dyn JobStore> = Arc::new(store);
        // Running jobs' clients may not have heard from us for a while: give them time
        // to re-attach before their leases count as lost (invariant 3).
        let grace_until = kiln_common::now_micros() + config.startup_grace_secs as i64 * 1_000_000;
        let extended = store.extend_all_leases(grace_until).await?;
        if extended > 0 {
            tracing::info!(
                n_jobs = extended,
                grace_secs = config.startup_grace_secs,
                "leases extended for re-attach"
            );
        }
        let dispatcher = Dispatcher::new(store.clone(), config.lease_secs);
        let (changes, _) = watch::channel(0);
        let (stopping, _) = watch::channel(false);
        let server = Server {
            state: Arc::new(AppState {
                config,
                store,
                blobs: Arc::new(blobs),
                storage: transfer::Storage::new(Arc::new(chunks)),
                credentials,
                dispatcher,
                changes,
                stopping,
                notices: tokio::sync::Notify::new(),
                sessions: sessions::Sessions::default(),
                contacts: contacts::Contacts::default(),
                uploads: transfer::UploadSlots::default(),
            }),
        };
        transfer::convert_legacy_images(&server.state)
            .await
            .context("converting images stored whole to chunks")?;
        Ok(server)
    }

    /// Serves on `listener` until `shutdown` resolves, then stops the loops.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop_rx = self.state.stopping.subscribe();
        let dispatcher = tokio::spawn(self.state.dispatcher.clone().run(stop_rx.clone()));
        let reaper = tokio::spawn(loops::timekeeper(self.state.clone(), stop_rx.clone()));
        let registrar = tokio::spawn(register::registrar(self.state.clone(), stop_rx.clone()));
        let notifier = tokio::spawn(notify::notifier(self.state.clone(), stop_rx));
        // Whatever was queued before a restart is available now.
        self.state.dispatcher.wake();
        let app = api::router(self.state.clone());
        let state = self.state.clone();
        // Long polls would hold a graceful shutdown open for their whole wait: end them
        // first (waiting clients get "no job" and come back to the next server).
        let shutdown = async move {
            shutdown.await;
            let _ = state.stopping.send(true);
        };
        // Every connection carries its peer's address: the client inventory shows
        // where each client's requests come from.
        let tls = self.state.config.tls.clone();
        let result = kiln_tls::serve(listener, tls, app, shutdown)
            .await
            .context("serving HTTP");
        let _ = self.state.stopping.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = dispatcher.await;
            let _ = reaper.await;
            let _ = notifier.await;
            let _ = registrar.await;
        })
        .await;
        result
    }
}
