//! The kiln server: a build farm's state and its HTTP API.
//!
//! Three layers, each knowing only the one below:
//! - [`domain`]: the farm itself. [`domain::Farm`] does everything the server does (submit,
//!   claim, heartbeat, log, finish, fail, restart, cancel, delete a build, collect
//!   garbage, issue and revoke credentials) over the stores it is given
//!   ([`domain::Backends`]), and returns [`domain::FarmError`]; it knows nothing of HTTP.
//! - [`http`]: the route table, the router built from it, and thin handlers grouped
//!   by resource that call the farm.
//! - [`workers`]: background work in one shape (dispatcher, timekeeper, notifier,
//!   registrar), run and stopped by one runner.
//!
//! [`offline`] changes client credentials and the join token on a data directory
//! without going through a server's HTTP API, with the farm's own rules.
//!
//! Start a server with [`Server::open`] (the embedded defaults: SQLite and local
//! packs under `--data`) or [`Server::with_backends`] (for images in object storage,
//! [`Backends::s3`]), then [`Server::run`] on a bound listener, so that tests can
//! bind `127.0.0.1:0`.

mod contacts;
mod dispatch;
pub mod domain;
mod holders;
pub mod http;
pub mod metrics;
pub mod offline;
pub mod pack_index;
mod sessions;
pub mod workers;

pub use domain::credentials::{hash_secret, verify_secret};
pub use domain::{Backends, Caller, Farm};
/// Where images rest in object storage: `--images s3://BUCKET[/PREFIX]` and the
/// `--s3-*` flags.
pub use kiln_blob::s3::S3Config;

use anyhow::Context;
use kiln_blob::packs::{convert_chunk_files, PackFiles};
use kiln_blob::s3::{S3BlobStore, S3PackFiles};
use kiln_blob::{BlobStore, ChunkStore, LocalBlobStore, LocalPackFiles, PackChunkStore};
use kiln_store::{PgStore, SqliteStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How the server runs. Durations are whole seconds, as on the command line.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the database, the blobs and the token files live.
    pub data_dir: PathBuf,
    /// A PostgreSQL database to keep the state in (`postgres://...`) instead of SQLite
    /// in `data_dir`.
    pub database: Option<String>,
    /// Image packs and build files as objects in this S3-compatible bucket
    /// (`--images s3://...`) instead of under `data_dir`.
    pub images: Option<S3Config>,
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
            database: None,
            images: None,
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

/// How long the background workers get to stop when the server does.
const WORKERS_STOP_DEADLINE: Duration = Duration::from_secs(5);

impl Backends {
    /// The embedded defaults, under `data_dir`: SQLite in `kiln.db`, image chunks in
    /// packs in `packs/` (indexed in the database), build files in `blobs/`. Chunks
    /// kept one file each (`chunks/ab/<hash>`, the layout of older servers) are moved
    /// into packs first.
    pub async fn local(data_dir: &Path) -> anyhow::Result<Self> {
        Self::open(&ServerConfig::new(data_dir.to_owned())).await
    }

    /// SQLite (or the PostgreSQL database `database` names) for the state; image packs
    /// and build files as objects in the bucket `s3` names. Nothing about images is
    /// kept on the local disk.
    pub async fn s3(
        data_dir: &Path,
        database: Option<&str>,
        s3: &S3Config,
    ) -> anyhow::Result<Self> {
        let mut config = ServerConfig::new(data_dir.to_owned());
        config.database = database.map(str::to_owned);
        config.images = Some(s3.clone());
        Self::open(&config).await
    }

    /// What `config` asks for: the state in PostgreSQL when it names a database, in
    /// SQLite under the data directory otherwise; image packs and build files in the
    /// object store `config.images` names, under the data directory otherwise. Chunks
    /// an older server kept one file each (`chunks/ab/<hash>`) are moved into packs
    /// first.
    pub async fn open(config: &ServerConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let store = open_state(config).await?;
        let index = Arc::new(pack_index::StorePackIndex::new(store.clone()));
        let (packs, files, place): (Arc<dyn PackFiles>, Arc<dyn BlobStore>, String) =
            match &config.images {
                Some(s3) => {
                    let bucket = s3.connect().context("opening the object store")?;
                    let place = if s3.prefix.is_empty() {
                        format!("s3://{}", s3.bucket)
                    } else {
                        format!("s3://{}/{}", s3.bucket, s3.prefix)
                    };
                    (
                        Arc::new(S3PackFiles::new(bucket.clone(), s3.clone())),
                        Arc::new(S3BlobStore::new(bucket, s3.clone())),
                        place,
                    )
                }
                None => {
                    let data_dir = &config.data_dir;
                    let files = LocalBlobStore::open(&data_dir.join("blobs"))
                        .context("opening the blob store")?;
                    let dir = data_dir.join("packs");
                    let packs = LocalPackFiles::open(&dir).context("opening the pack store")?;
                    (Arc::new(packs), Arc::new(files), dir.display().to_string())
                }
            };
        check_image_store(store.as_ref(), packs.as_ref(), &place).await?;
        let chunks = PackChunkStore::new(packs, index);
        convert_old_chunks(&config.data_dir, &chunks).await?;
        Ok(Backends {
            store,
            chunks: Arc::new(chunks),
            files,
        })
    }
}

/// The state's store: PostgreSQL when `config` names a database, SQLite in the data
/// directory otherwise.
async fn open_state(config: &ServerConfig) -> anyhow::Result<Arc<domain::Store>> {
    match &config.database {
        Some(url) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                anyhow::bail!(
                    "--database {}: only PostgreSQL is supported (postgres://USER@HOST:PORT/DB)",
                    redact_url(url)
                );
            }
            Ok(Arc::new(PgStore::connect(url).await.with_context(
                || format!("opening the job store at {}", redact_url(url)),
            )?))
        }
        None => Ok(Arc::new(
            SqliteStore::open(&config.data_dir.join("kiln.db"))
                .await
                .context("opening the job store")?,
        )),
    }
}

/// Checks that the database and the image store belong together: the database indexes
/// the chunks in one image store's packs, and both record that store's id. A new pair
/// gets an id; a database used before the id came in adopts its image store's.
async fn check_image_store(
    store: &domain::Store,
    packs: &dyn PackFiles,
    place: &str,
) -> anyhow::Result<()> {
    let read_store =
        |err| anyhow::Error::new(err).context(format!("reading the id of the image store {place}"));
    let in_store = packs.store_id().await.map_err(read_store)?;
    let in_database = store
        .image_store_id()
        .await
        .context("reading the database's image store id")?;
    let id = match (in_store, in_database) {
        (Some(in_store), Some(in_database)) => {
            if in_store != in_database {
                anyhow::bail!(
                    "the database indexes the packs of image store {in_database}, but {place} \
                     is image store {in_store}: they do not belong together. Start the server \
                     on the image store this database was used with, or on a new database"
                );
            }
            in_store
        }
        (None, Some(in_database)) => anyhow::bail!(
            "the database indexes the packs of image store {in_database}, but {place} has \
             no store id (it is new, emptied or another store): the chunks the database \
             lists are not there. Start the server on the image store this database was \
             used with, or on a new database"
        ),
        (in_store, None) => {
            let id = match in_store {
                Some(id) => id,
                None => packs
                    .claim_store_id(&kiln_blob::packs::new_store_id())
                    .await
                    .map_err(|err| {
                        anyhow::Error::new(err)
                            .context(format!("giving the image store {place} an id"))
                    })?,
            };
            let recorded = store
                .claim_image_store_id(&id)
                .await
                .context("recording the image store's id in the database")?;
            if recorded != id {
                anyhow::bail!(
                    "the database was just given to image store {recorded} by another server, \
                     but {place} is image store {id}: they do not belong together"
                );
            }
            tracing::info!(image_store = %id, place, "image store and database paired");
            id
        }
    };
    tracing::debug!(image_store = %id, place, "image store checked");
    Ok(())
}

/// Moves chunks an older server kept one file each into packs.
async fn convert_old_chunks(data_dir: &Path, chunks: &dyn ChunkStore) -> anyhow::Result<()> {
    let old = data_dir.join("chunks");
    if !old.exists() {
        return Ok(());
    }
    tracing::info!(dir = %old.display(), "moving chunk files into packs");
    let (moved, damaged) = convert_chunk_files(&old, chunks)
        .await
        .context("moving chunk files into packs")?;
    tracing::info!(
        n_chunks = moved,
        n_damaged = damaged,
        "chunk files moved into packs"
    );
    if damaged > 0 {
        tracing::error!(
            n_damaged = damaged,
            dir = %old.display(),
            "damaged chunk files were left where they are; images that list them fail to read"
        );
    }
    Ok(())
}

/// A database URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A server ready to serve.
pub struct Server {
    farm: Arc<Farm>,
}

impl Server {
    /// Opens the data directory with the embedded defaults (see [`Backends::local`]).
    pub async fn open(config: ServerConfig) -> anyhow::Result<Self> {
        let backends = Backends::open(&config).await?;
        Self::with_backends(config, backends).await
    }

    /// A server over `backends`; its tokens and scratch space are in `config.data_dir`.
    pub async fn with_backends(config: ServerConfig, backends: Backends) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        Ok(Server {
            farm: Farm::open(config, backends).await?,
        })
    }

    /// The farm this server serves.
    pub fn farm(&self) -> &Arc<Farm> {
        &self.farm
    }

    /// Serves on `listener` until `shutdown` resolves, then stops the workers (within
    /// a deadline; any that failed are reported as the error).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let farm = self.farm;
        let workers = Arc::new(workers::Workers::default());
        workers.spawn(dispatch::DispatchWorker::new(farm.dispatcher().clone()));
        workers.spawn(workers::Timekeeper::new(farm.clone()));
        match workers::Notifier::new(farm.clone()) {
            Ok(notifier) => workers.spawn(notifier),
            Err(err) => {
                tracing::error!(cause = %kiln_proto::error_chain(&err), "notifier cannot set up HTTP; webhooks are off")
            }
        }
        if let Some(registrar) = workers::Registrar::new(farm.clone()) {
            workers.spawn(registrar);
        }
        // Other servers on the same database: their changes wake this one's dispatcher
        // and streams.
        if let Some(feed) = farm
            .follow_changes()
            .await
            .context("listening for other servers' changes")?
        {
            workers.spawn(workers::Follower::new(farm.clone(), feed));
        }
        // Whatever was queued before a restart is available now.
        farm.dispatcher().wake();
        let app = http::router(Arc::new(http::ServerState {
            farm: farm.clone(),
            workers: workers.clone(),
        }));
        // Long polls would hold a graceful shutdown open for their whole wait: end them
        // first (waiting clients get "no job" and come back to the next server).
        let stopping = farm.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.stop();
        };
        // Every connection carries its peer's address: the client inventory shows
        // where each client's requests come from.
        let tls = farm.config().tls.clone();
        let served = kiln_tls::serve(listener, tls, app, shutdown)
            .await
            .context("serving HTTP");
        farm.stop();
        let report = workers.stop(WORKERS_STOP_DEADLINE).await;
        served?;
        if !report.failed.is_empty() {
            let failed: Vec<String> = report
                .failed
                .iter()
                .map(|(name, what)| format!("{name}: {what}"))
                .collect();
            anyhow::bail!("background workers failed: {}", failed.join("; "));
        }
        Ok(())
    }
}

/// Tells the C allocator (glibc) to give memory back as the server lets it go. Left
/// alone, it makes an arena for each thread that allocates (the blocking pool has
/// dozens) and keeps large freed buffers for reuse once it has seen one freed: while a
/// 4 GiB image streamed through, the server's memory grew past 100 MiB on buffers it
/// no longer used. Two arenas, and buffers of 256 KiB and more mapped and unmapped on their own.
/// `kiln server` calls it first thing; it is a no-op elsewhere than on glibc.
pub fn keep_memory_flat() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets the allocator's parameters, which it allows at
        // any time.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        }
    }
}
