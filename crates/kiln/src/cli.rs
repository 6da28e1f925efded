//! The command line: one clap-derived struct per subcommand.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// kiln: a distributed build farm for installed software images.
#[derive(Debug, Parser)]
#[command(name = "kiln", version = env!("KILN_VERSION"), about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a build server: the HTTP API, the job store and the image store.
    Server(Box<ServerArgs>),
    /// Run an imaging client that claims and runs jobs.
    Client(ClientArgs),
    /// Run a master: the list of live servers that servers register with.
    Master(MasterArgs),
    /// List the servers a master knows.
    Servers(ServersArgs),
    /// Submit a build (relbuild.xml or kiln.toml) with the files beside it.
    Submit(SubmitArgs),
    /// Show builds, or the jobs of one build.
    Status(StatusArgs),
    /// Wait for a build to end, with live progress.
    Wait(WaitArgs),
    /// Print a job's log.
    Logs(LogsArgs),
    /// Print a build's event log: every state change of every job.
    Events(EventsArgs),
    /// Restart or cancel a job.
    Job(JobArgs),
    /// Delete a build with its images; chunks no image uses any more are freed.
    Build(BuildArgs),
    /// What the server stores: image bytes, chunk bytes, bytes received and saved.
    Storage(StorageArgs),
    /// The server's clients: what each runs now, when it was last heard from, and what
    /// became of the jobs it took.
    Clients(ClientsArgs),
    /// Download a build's images into a release directory.
    Release(ReleaseArgs),
    /// Run a whole farm on this machine and build the bundled example.
    Demo(DemoArgs),
    /// Measure dispatch latency and makespan.
    Bench(BenchArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(crate::commands::completions::CompletionsArgs),
    /// Write manual pages for kiln and every subcommand into a directory.
    Man(crate::commands::manpages::ManArgs),
    /// Print the server API's OpenAPI description (docs/openapi.json).
    Openapi(crate::commands::openapi::OpenapiArgs),
}

/// Where the server is and the credential to use, for operator commands.
#[derive(Debug, Clone, Args)]
pub struct ServerOpts {
    /// The server's URL; a farm's replicas as one value, their URLs separated by commas
    /// (http://a:7070,http://b:7070): calls go to the next when one cannot be reached.
    #[arg(long, env = "KILN_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// A file holding the credential (else the env variable KILN_TOKEN holds it).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust, besides the usual public ones, for an
    /// https:// server.
    #[arg(long, env = "KILN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub action: Option<ServerAction>,
    /// Address to listen on (port 0 picks a free one; the URL is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Directory for the database, images and token files.
    #[arg(long, required = true)]
    pub data: Option<PathBuf>,
    /// Keep the farm's state in this PostgreSQL database
    /// (postgres://USER[:PASSWORD]@HOST[:PORT]/DB) instead of SQLite under --data.
    #[arg(long, env = "KILN_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// Serve build status, events and images to callers without a credential.
    #[arg(long)]
    pub public_read: bool,
    /// Keep images and build files in S3-compatible object storage,
    /// s3://BUCKET[/PREFIX], instead of under --data (needs --s3-endpoint).
    #[arg(long, value_name = "s3://BUCKET[/PREFIX]", requires = "s3_endpoint")]
    pub images: Option<String>,
    /// The object store's URL, e.g. http://127.0.0.1:8333.
    #[arg(long, value_name = "URL", requires = "images")]
    pub s3_endpoint: Option<String>,
    /// The object store's region.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "us-east-1",
        requires = "images"
    )]
    pub s3_region: String,
    /// A file with the object store's key (aws_access_key_id and
    /// aws_secret_access_key lines, as in an AWS credentials file); without it, the
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY variables, else unsigned requests.
    #[arg(long, value_name = "FILE", requires = "images")]
    pub s3_credentials_file: Option<PathBuf>,
    /// Use this existing admin token file instead of DATA/admin.token.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Use this existing client token file instead of DATA/client.token.
    #[arg(long)]
    pub client_token_file: Option<PathBuf>,
    /// How long a lease lasts past each heartbeat, in seconds.
    #[arg(long, default_value_t = 15)]
    pub lease_secs: u64,
    /// How often clients heartbeat, in seconds.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_secs: u64,
    /// Extra lease time running jobs get at start-up so their clients re-attach (default: the lease).
    #[arg(long)]
    pub startup_grace_secs: Option<u64>,
    /// A job held this long past its timeout is taken from its client, in seconds.
    #[arg(long, default_value_t = 60)]
    pub hung_grace_secs: u64,
    /// Accept deadline for jobs whose manifest names none, in seconds.
    #[arg(long)]
    pub accept_within_secs: Option<u64>,
    /// Lost runs (lease lapsed, client gone) after which a job fails with `lost`.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Bytes of log text stored per job; later output is dropped (the job runs on).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_log_bytes_per_job: u64,
    /// Jobs one build's manifest may hold; a larger one is refused at submit.
    #[arg(long, default_value_t = 10_000)]
    pub max_jobs_per_build: usize,
    /// Image uploads (chunk bodies, whole images) one client may send at once; more
    /// are answered 429 and retried by the client.
    #[arg(long, default_value_t = 4)]
    pub max_uploads_per_client: usize,
    /// A master to register with and heartbeat to (repeat for several).
    #[arg(long = "master")]
    pub masters: Vec<String>,
    /// The URL masters hand out for this server (default: http:// and the address
    /// listened on; needed when listening on every address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// File holding the masters' server credential (their server.token).
    #[arg(long)]
    pub master_token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust, besides the usual public ones, when
    /// calling https:// masters.
    #[arg(long)]
    pub master_ca_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ServerAction {
    /// Manage clients' own credentials.
    Client(ServerClientArgs),
    /// Rotate or disable the join token clients enroll with.
    JoinToken(JoinTokenArgs),
}

#[derive(Debug, Args)]
pub struct ServerClientArgs {
    #[command(subcommand)]
    pub action: CredentialAction,
}

#[derive(Debug, Subcommand)]
pub enum CredentialAction {
    /// Give client ID a new secret, printed once, alone on the last line; any previous
    /// one (revoked or not) stops working.
    Add {
        id: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// End client ID's secret at once; it cannot enroll again until added.
    Revoke {
        id: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List the clients' credentials (never the secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
}

#[derive(Debug, Args)]
pub struct JoinTokenArgs {
    #[command(subcommand)]
    pub action: JoinTokenAction,
}

#[derive(Debug, Subcommand)]
pub enum JoinTokenAction {
    /// Make a new join token (printed once, alone on the last line); the old one stops
    /// working.
    Rotate(AdminTarget),
    /// Refuse enrollment until the token is rotated.
    Disable(AdminTarget),
}

/// Where a credential command acts: on a data directory, or on a running server with
/// the admin credential.
#[derive(Debug, Clone, Args)]
pub struct AdminTarget {
    /// Act on this data directory directly (client credentials take effect at once,
    /// even on a running server; a join token change at its next start).
    #[arg(long, conflicts_with = "server")]
    pub data: Option<PathBuf>,
    /// Act on the server at this URL (default: KILN_SERVER, else http://127.0.0.1:7070).
    #[arg(long)]
    pub server: Option<String>,
    /// A file holding the admin credential (else KILN_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The join token file the server uses, if not DATA/client.token (with --data).
    #[arg(long, requires = "data")]
    pub client_token_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for an https:// server (else KILN_CA_FILE).
    #[arg(long, env = "KILN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MasterArgs {
    /// Address to listen on (port 0 picks a free one; the URL is printed).
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub listen: String,
    /// Directory for the server list and token files.
    #[arg(long)]
    pub data: PathBuf,
    /// A server that has not heartbeat for this long drops off the list, in seconds.
    #[arg(long, default_value_t = 15)]
    pub heartbeat_timeout_secs: u64,
    /// Use this existing admin token file instead of DATA/admin.token.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Use this existing server token file instead of DATA/server.token.
    #[arg(long)]
    pub server_token_file: Option<PathBuf>,
    /// Use this existing client token file instead of DATA/client.token.
    #[arg(long)]
    pub client_token_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServersArgs {
    /// The master's URL.
    #[arg(long, env = "KILN_MASTER", default_value = "http://127.0.0.1:7080")]
    pub master: String,
    /// A file holding the master's client or admin credential (else KILN_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust, besides the usual public ones, for an
    /// https:// master.
    #[arg(long, env = "KILN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Include servers that dropped off (no heartbeat within the timeout).
    #[arg(long)]
    pub all: bool,
    /// Print the master's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ClientArgs {
    #[command(subcommand)]
    pub action: Option<ClientAction>,
    /// buildclient.xml (the seed's schema) or client TOML; flags given too override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A server to serve (repeat for several farms); a farm's replicas as one value,
    /// their URLs separated by commas (http://a:7070,http://b:7070): the client calls
    /// the next when one cannot be reached. Without --server, --master or a config
    /// naming one: KILN_SERVER.
    #[arg(long = "server")]
    pub servers: Vec<String>,
    /// A master to learn servers from (repeat for several: the first that answers is
    /// used). Its servers are called with the same client credential.
    #[arg(long = "master")]
    pub masters: Vec<String>,
    /// When no master answers, ask again after this many seconds (otherwise the
    /// client follows the master's list as it changes).
    #[arg(long, default_value_t = 10)]
    pub refresh_secs: u64,
    /// The client's id.
    #[arg(long)]
    pub id: Option<String>,
    /// Config types to take, comma-separated; `*` takes any.
    #[arg(long)]
    pub include: Option<String>,
    /// Work directory for workspaces and local state.
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Jobs to run at once.
    #[arg(long)]
    pub slots: Option<u32>,
    /// File holding the client credential (else KILN_TOKEN, or PASSWORD from the config).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust, besides the usual public ones, for
    /// https:// servers and masters (overrides the config's ca_file).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// How long one long poll waits, in seconds (the seed's WAITTIME).
    #[arg(long)]
    pub wait_secs: Option<u64>,
    /// Seconds between SIGTERM and SIGKILL when a step is stopped.
    #[arg(long, default_value_t = 10)]
    pub kill_grace_secs: u64,
    /// The job cache that outlives jobs, KILN_CACHE to their steps (default: WORK/cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The most bytes the job cache keeps: past it, least recently used entries are
    /// removed between jobs (default: 8 GiB).
    #[arg(long)]
    pub cache_max_bytes: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum ClientAction {
    /// Give up the jobs this client holds and clear its local state (the seed's
    /// "reclaim a client"): their processes are killed and their servers requeue them.
    Reset {
        /// The client's work directory.
        #[arg(long)]
        work: PathBuf,
        /// File holding the client credential (else KILN_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// A PEM file of CA certificates to trust for https:// servers.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// relbuild.xml or kiln.toml.
    pub file: PathBuf,
    /// The build's files (default: the directory FILE sits in).
    #[arg(long)]
    pub files: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerOpts,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A build number: show its jobs.
    pub build: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpts,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    pub build: String,
    /// Give up after this many seconds (exit 2).
    #[arg(long)]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub server: ServerOpts,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// BUILD/ID
    pub job: String,
    /// Keep following until the job ends.
    #[arg(short, long)]
    pub follow: bool,
    #[command(flatten)]
    pub server: ServerOpts,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    pub build: String,
    /// Print JSON, one event per line.
    #[arg(long)]
    pub json: bool,
    /// Keep following until interrupted.
    #[arg(short, long)]
    pub follow: bool,
    #[command(flatten)]
    pub server: ServerOpts,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(subcommand)]
    pub action: JobAction,
}

#[derive(Debug, Subcommand)]
pub enum JobAction {
    /// Put a job back in the queue as new.
    Restart {
        /// BUILD/ID
        job: String,
        #[command(flatten)]
        server: ServerOpts,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// BUILD/ID
        job: String,
        #[command(flatten)]
        server: ServerOpts,
    },
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(subcommand)]
    pub action: BuildAction,
}

#[derive(Debug, Subcommand)]
pub enum BuildAction {
    /// Delete a build: its jobs, logs, events and images. Refused while a job of it
    /// runs, unless --force, which cancels those jobs first.
    Delete {
        build: String,
        /// Cancel the build's running jobs first.
        #[arg(long)]
        force: bool,
        /// Print what was deleted as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerOpts,
    },
}

#[derive(Debug, Args)]
pub struct StorageArgs {
    /// Print the counters as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpts,
}

#[derive(Debug, Args)]
pub struct ClientsArgs {
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpts,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    pub build: String,
    /// The release directory: DIR/BUILD/CONFIGTYPE/FILE. Chunks of files already
    /// under it (earlier releases) are reused instead of downloaded.
    #[arg(long)]
    pub to: PathBuf,
    /// Print what was reused and fetched as one JSON object on stdout, instead of the
    /// directory.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpts,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many clients to start.
    #[arg(long, default_value_t = 3)]
    pub clients: u32,
    /// Where to release the images (default: ./kiln-demo-release, or
    /// ./kiln-debian-release for the Debian example).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the farm's data directory here instead of a temporary one.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Which example to build: `demo`, the quick one (seconds), or `debian`, four real
    /// Debian images installed, booted and released (tens of minutes; needs root,
    /// mmdebstrap, qemu and GRUB).
    #[arg(long, value_enum, default_value_t = DemoExample::Demo)]
    pub example: DemoExample,
}

/// The examples `kiln demo` can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoExample {
    /// examples/demo: 2 products × 3 configurations of small ext4 images.
    Demo,
    /// examples/debian: 2 products × 2 configurations of bootable Debian disks.
    Debian,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchWhich,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhich {
    /// Job available → claimed, with many idle long-polling clients.
    Dispatch {
        /// Idle clients waiting in a long poll.
        #[arg(long, default_value_t = 100)]
        clients: u32,
        /// Jobs to time.
        #[arg(long, default_value_t = 200)]
        jobs: u32,
        /// Keep the state in this PostgreSQL database (a new, empty one) instead of
        /// SQLite.
        #[arg(long)]
        database: Option<String>,
        /// Server processes on the database (needs --database when more than one):
        /// replicas sharing it and a SeaweedFS the run starts; jobs are submitted to
        /// the first, the clients wait on each in turn.
        #[arg(long, default_value_t = 1)]
        servers: u32,
        /// With several servers: the clients wait only on the others, never on the
        /// one jobs are submitted to, so every claim crosses between servers.
        #[arg(long)]
        wait_elsewhere: bool,
    },
    /// Time from a client's failure to its job running on another client.
    Failover {
        /// How the client fails: killed (SIGKILL), hung (SIGSTOP) or cut off (a proxy
        /// between it and the server stops passing bytes).
        #[arg(long, value_enum, default_value_t = FailoverMode::Kill)]
        mode: FailoverMode,
        /// Trials to time.
        #[arg(long, default_value_t = 10)]
        trials: u32,
        /// The server's lease, in seconds.
        #[arg(long, default_value_t = 15)]
        lease_secs: u64,
        /// The server's heartbeat interval, in seconds.
        #[arg(long, default_value_t = 5)]
        heartbeat_secs: u64,
    },
    /// The chaos test: a 42-job build while clients and the server (or replicas and
    /// PostgreSQL) are SIGKILLed and restarted; checks the job invariants from the
    /// images, the event log and the webhook notices.
    Chaos {
        /// Products (jobs = products x configurations).
        #[arg(long, default_value_t = 7)]
        products: u32,
        /// Configurations per product.
        #[arg(long, default_value_t = 6)]
        configs: u32,
        /// Clients (one slot each).
        #[arg(long, default_value_t = 6)]
        clients: u32,
        /// Client SIGKILLs (each client is restarted after).
        #[arg(long, default_value_t = 10)]
        client_kills: u32,
        /// Server SIGKILLs (the server, or a random replica, is restarted after).
        #[arg(long, default_value_t = 3)]
        server_kills: u32,
        /// Servers: 1 keeps the state in SQLite; 2 or more are replicas of one farm on a
        /// PostgreSQL and a SeaweedFS the run starts (postgresql and `weed` installed).
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// PostgreSQL kills, each restarted after a moment (with --replicas 2 or more).
        #[arg(long, default_value_t = 0)]
        database_restarts: u32,
        /// Seed of the random choices, for a repeatable run.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Time for every client to re-attach after the server holding its session is
    /// killed (and restarted, or, with replicas, left for the next).
    Reattach {
        /// Clients, each running a job when the server dies.
        #[arg(long, default_value_t = 6)]
        clients: u32,
        /// Trials to time.
        #[arg(long, default_value_t = 3)]
        trials: u32,
        /// Servers: 1 is restarted after its kill; 2 or more are replicas on a
        /// PostgreSQL and a SeaweedFS the run starts, and the clients move to the next.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
    },
    /// Makespan of a build of sleep jobs over its ideal.
    Makespan {
        /// Clients (one slot each).
        #[arg(long, default_value_t = 6)]
        clients: u32,
        /// Jobs in the build.
        #[arg(long, default_value_t = 42)]
        jobs: u32,
        /// Seconds each job sleeps.
        #[arg(long, default_value_t = 2.0)]
        job_secs: f64,
    },
    /// The server's CPU and the makespan with open dashboard tabs following the build,
    /// against none, alternating.
    Tabs {
        /// Tabs open on the build's page.
        #[arg(long, default_value_t = 20)]
        tabs: u32,
        /// Runs with no tab and with the tabs, each.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Clients (one slot each).
        #[arg(long, default_value_t = 6)]
        clients: u32,
        /// Jobs in the build.
        #[arg(long, default_value_t = 42)]
        jobs: u32,
        /// Seconds each job sleeps.
        #[arg(long, default_value_t = 2.0)]
        job_secs: f64,
    },
    /// Jobs per second and the server's CPU per job, for a build of trivial jobs on
    /// real client processes.
    Throughput {
        /// Jobs in the build.
        #[arg(long, default_value_t = 2000)]
        jobs: u32,
        /// `kiln client` processes.
        #[arg(long, default_value_t = 8)]
        clients: u32,
        /// Slots of each client.
        #[arg(long, default_value_t = 4)]
        slots: u32,
        /// Keep the server's state in this PostgreSQL database instead of SQLite: a new,
        /// empty one each run (a database is tied to the image store of the run that
        /// used it, and servers refuse it with another).
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// Servers: 2 or more are replicas on --database (else a PostgreSQL the run
        /// starts) sharing a SeaweedFS the run starts.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Give the build a webhook on a loopback port where nothing listens, so that
        /// its notices stay pending and are retried, as while a receiver is down.
        #[arg(long)]
        webhook_down: bool,
    },
    /// Claim-and-finish cycles per second of the job store alone (no HTTP, no
    /// clients), on SQLite and, given a database, on PostgreSQL, alternating.
    Store {
        /// Jobs in each round's build.
        #[arg(long, default_value_t = 10000)]
        jobs: u32,
        /// Tasks doing cycles at once, as dispatchers of several replicas would; a
        /// comma-separated list runs each count in turn (`1,4,16,64`).
        #[arg(long, value_delimiter = ',', default_value = "4")]
        workers: Vec<u32>,
        /// Make the workers the slots of this many dispatchers, as clients' slots are
        /// of a server's replicas: each dispatcher reads the queue once a round and
        /// claims a job for every free slot at once. Without it, each worker is a
        /// dispatcher of its own.
        #[arg(long)]
        dispatchers: Option<u32>,
        /// Rounds on each backend, each a new build in the same store.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Also run on this PostgreSQL database (its build numbers are unique to the
        /// run, so a database may be used again).
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// Give each build a webhook, so that every job's end also writes its notice
        /// into the outbox (nothing is delivered: no server runs).
        #[arg(long)]
        webhook: bool,
    },
    /// Image transfer: a fresh image against curl -T to nginx, a changed image against
    /// casync and rsync, the demo build's storage, the server's memory during an upload,
    /// and a fresh image into SeaweedFS against boto3.
    Transfer {
        /// Size of the image sent fresh and changed, in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Size of the image sent while the server's memory is watched, in MiB.
        #[arg(long, default_value_t = 4096)]
        rss_size_mib: u64,
        /// Leave out the server-memory part.
        #[arg(long)]
        skip_rss: bool,
        /// Leave out object storage (it needs `weed` and Python's boto3): part (e), and
        /// the SeaweedFS row of the server-memory part.
        #[arg(long)]
        skip_s3: bool,
        /// Run only these parts, by letter: `--only e` for object storage alone,
        /// `--only ad` for the fresh image and the server's memory.
        #[arg(long, value_parser = parse_transfer_parts)]
        only: Option<String>,
        /// Timed trials of each system.
        #[arg(long, default_value_t = 3)]
        trials: u32,
        /// Make the work directory (removed at the end) in DIR rather than the
        /// temporary directory; it needs about 4 times the image size plus 2 times
        /// --rss-size-mib free.
        #[arg(long)]
        work: Option<PathBuf>,
    },
    /// A fleet: dispatch latency with several servers and many client processes that
    /// know only a master, and the time from a new server's registration to its first
    /// job claimed.
    Fleet {
        /// Servers registered with the master.
        #[arg(long, default_value_t = 3)]
        servers: u32,
        /// `kiln client` processes (one slot each).
        #[arg(long, default_value_t = 200)]
        clients: u32,
        /// Jobs to time for dispatch.
        #[arg(long, default_value_t = 200)]
        jobs: u32,
        /// New servers to time from registration to first claim.
        #[arg(long, default_value_t = 10)]
        trials: u32,
    },
}

/// How a client fails in `kiln bench failover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailoverMode {
    /// SIGKILL: the process dies and its connections close.
    Kill,
    /// SIGSTOP: the process hangs with its connections open.
    Stop,
    /// The network between client and server stops passing bytes.
    Partition,
}

/// `--only` of `kiln bench transfer`: letters of parts (a) to (e).
fn parse_transfer_parts(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("name at least one part, a letter from a to e".into());
    }
    match value.chars().find(|part| !('a'..='e').contains(part)) {
        Some(other) => Err(format!(
            "{other:?} is not a part: the parts are a (fresh image), b (changed image), c (the demo build), d (server memory) and e (object storage)"
        )),
        None => Ok(value.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_parts_are_letters_a_to_e_and_anything_else_is_named() {
        assert_eq!(parse_transfer_parts("ade").as_deref(), Ok("ade"));
        let wrong = parse_transfer_parts("af").unwrap_err();
        assert!(wrong.contains("'f' is not a part"), "{wrong}");
        assert!(parse_transfer_parts("").is_err());
    }
}
