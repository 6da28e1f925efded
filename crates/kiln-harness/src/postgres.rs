//! A throwaway PostgreSQL cluster for tests and benches: `initdb` into a temporary
//! directory and a `postgres` server on a free loopback port, from Debian's
//! `postgresql` package (or any installation whose `initdb` and `postgres` are found).
//! The chaos bench's replica mode kills and restarts one of its own.
//!
//! [`PgCluster::shared`] starts one cluster per test process, the first time a test
//! asks, and every test makes its own database there with [`PgCluster::new_database`].
//! The server is started by a thread that lives as long as the process and is told to
//! stop (SIGQUIT, PostgreSQL's immediate shutdown) by the kernel when the process ends,
//! however it ends; its directory is removed by the next test process. A test that
//! needs to stop and start the server itself makes its own with [`PgCluster::start`].
//!
//! Set `KILN_TEST_POSTGRES` to a URL with the right to create databases
//! (`postgres://postgres@127.0.0.1:5432/postgres`) to use a running server instead.
//! There is no skipping: when no server can be had, the test fails and says how to
//! install one.

use anyhow::{bail, Context};
use sqlx::{Connection, PgConnection};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A PostgreSQL server for tests.
pub struct PgCluster {
    /// `postgres://postgres@127.0.0.1:PORT`, without a database.
    base_url: String,
    /// The server we started (`None` with `KILN_TEST_POSTGRES`).
    own: Option<OwnServer>,
}

struct OwnServer {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
}

static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
static N_DATABASES: AtomicU64 = AtomicU64::new(0);

impl PgCluster {
    /// The process's cluster, started on first use (or the server `KILN_TEST_POSTGRES`
    /// names).
    pub fn shared() -> anyhow::Result<&'static PgCluster> {
        let cluster = SHARED.get_or_init(|| {
            let started = match std::env::var("KILN_TEST_POSTGRES") {
                Ok(url) => Ok(PgCluster {
                    base_url: url
                        .rsplit_once('/')
                        .map(|(base, _)| base.to_owned())
                        .unwrap_or(url),
                    own: None,
                }),
                Err(_) => PgCluster::start(),
            };
            started.map_err(|err| format!("{err:#}"))
        });
        cluster.as_ref().map_err(|err| anyhow::anyhow!("{err}"))
    }

    /// A new cluster of this test's own, in a new temporary directory.
    pub fn start() -> anyhow::Result<PgCluster> {
        let bin_dir = find_bin_dir()?;
        remove_stale_dirs();
        let n = N_DATABASES.fetch_add(1, Ordering::Relaxed);
        let data_dir = std::env::temp_dir().join(format!("kiln-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let owner = server_user()?;
        if let Some((uid, gid)) = owner {
            chown(&data_dir, uid, gid)?;
        }
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(data_dir.join("data"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null());
        as_server_user(&mut initdb, owner);
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let port = free_port()?;
        let server = OwnServer {
            bin_dir,
            data_dir,
            port,
            child: Mutex::new(None),
        };
        server.start_server()?;
        Ok(PgCluster {
            base_url: format!("postgres://postgres@127.0.0.1:{port}"),
            own: Some(server),
        })
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{name}", self.base_url)
    }

    /// Makes a new, empty database and returns its URL.
    pub async fn new_database(&self) -> anyhow::Result<String> {
        let n = N_DATABASES.fetch_add(1, Ordering::Relaxed);
        let name = format!("kiln_test_{}_{n}", std::process::id());
        let mut admin = PgConnection::connect(&self.url("postgres"))
            .await
            .with_context(|| format!("connecting to the test server at {}", self.base_url))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await?;
        Ok(self.url(&name))
    }

    /// Stops the server at once (SIGKILL), as a crash would. Only a cluster of one's
    /// own ([`PgCluster::start`]) can be stopped.
    pub fn kill(&self) -> anyhow::Result<()> {
        let server = self
            .own
            .as_ref()
            .context("this server is not ours to stop")?;
        let mut child = server.child.lock().expect("cluster lock");
        if let Some(mut child) = child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again after [`PgCluster::kill`], on the same port and data.
    pub fn restart(&self) -> anyhow::Result<()> {
        let server = self
            .own
            .as_ref()
            .context("this server is not ours to start")?;
        server.start_server()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(server) = &self.own {
            if let Some(mut child) = server.child.lock().expect("cluster lock").take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir_all(&server.data_dir);
        }
    }
}

impl OwnServer {
    /// Starts `postgres` from a thread that lives as long as the process, so that the
    /// kernel's parent-death signal (given to the child when the thread that forked it
    /// ends) comes only when the process ends; waits until it takes connections.
    fn start_server(&self) -> anyhow::Result<()> {
        let mut command = Command::new(self.bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(self.data_dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.data_dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=300",
                // A killed server keeps every commit it acknowledged (its WAL is
                // written at commit); only a machine crash could lose them.
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.data_dir.join("server.log"))
                    .context("creating the server's log")?,
            );
        as_server_user(&mut command, server_user()?);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("kiln-test-postgres".into())
            .spawn(move || {
                let _ = sender.send(command.spawn());
                loop {
                    std::thread::park();
                }
            })
            .context("starting the thread that owns the test server")?;
        let child = receiver
            .recv()
            .context("the test server's thread")?
            .context("starting postgres")?;
        *self.child.lock().expect("cluster lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let ready = Command::new(self.bin_dir.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                    .status()
                    .map(|status| status.success())
                    .unwrap_or(true);
                if ready {
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .lock()
                .expect("cluster lock")
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                let log =
                    std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default();
                bail!("postgres exited with {status}: {}", log.trim());
            }
            if Instant::now() > deadline {
                bail!("postgres did not take connections within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Where `initdb` and `postgres` are: Debian keeps them per major version under
/// `/usr/lib/postgresql/VERSION/bin`, off the PATH.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").exists() && dir.join("postgres").exists() {
                return Ok(dir);
            }
        }
    }
    bail!(
        "the PostgreSQL tests need a PostgreSQL server: install one (Debian: \
         `apt-get install postgresql`) or set KILN_TEST_POSTGRES to the URL of a running \
         server (postgres://USER@HOST:PORT/postgres)"
    )
}

/// PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        bail!(
            "running as root, the PostgreSQL tests start the server as the `postgres` \
             user, and there is none (Debian's postgresql package creates it)"
        );
    }
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some((uid, gid)))
}

fn as_server_user(command: &mut Command, owner: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("giving {} to the postgres user", path.display()))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Removes the directories of test clusters whose process is gone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|name| name.strip_prefix("kiln-pg-")) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
