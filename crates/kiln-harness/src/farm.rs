//! [`Farm`]: a server (or several replicas of one farm) and clients started as real
//! `kiln` processes on loopback, for `kiln demo` and `kiln bench`. Each process logs to
//! a file in the farm's directory and is signalled by its own pid.

use crate::postgres::PgCluster;
use crate::seaweed::{Seaweed, S3_KEY, S3_SECRET};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// A farm of `kiln` processes sharing one directory.
pub struct Farm {
    pub dir: PathBuf,
    /// The farm's URL: the server's, or the replicas' separated by commas.
    pub url: String,
    pub admin_token_file: PathBuf,
    pub client_token_file: PathBuf,
    server_args: Vec<String>,
    servers: Vec<ServerProcess>,
    clients: Vec<(String, Child)>,
}

/// What replicas share, started for them and kept alive as long as this is: a
/// SeaweedFS of their own, on loopback, and a PostgreSQL of their own unless they were
/// given a database.
pub struct SharedStores {
    pub postgres: Option<Arc<PgCluster>>,
    pub weed: Seaweed,
}

/// One `kiln server` of the farm: its data in `DIR/NAME`, its log `DIR/NAME.log`.
struct ServerProcess {
    name: String,
    url: String,
    child: Child,
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(Stdio::from(file))
}

/// Starts `kiln server` named `name` listening on `listen`; returns it and the URL it
/// printed.
async fn spawn_server(
    dir: &Path,
    name: &str,
    listen: &str,
    args: &[String],
) -> anyhow::Result<(Child, String)> {
    let data = dir.join(name);
    std::fs::create_dir_all(&data)?;
    let mut all: Vec<std::ffi::OsString> = vec![
        "server".into(),
        "--listen".into(),
        listen.into(),
        "--data".into(),
        data.into(),
    ];
    all.extend(args.iter().map(Into::into));
    let log = dir.join(format!("{name}.log"));
    spawn_listening(&all, &log, "kiln server listening on ").await
}

/// Starts `kiln ARGS` (a server or a master), logging to `log`; returns it and the URL
/// from its first stdout line, which starts with `prefix`.
pub async fn spawn_listening(
    args: &[std::ffi::OsString],
    log: &Path,
    prefix: &str,
) -> anyhow::Result<(Child, String)> {
    let exe = crate::kiln_exe().context("finding the kiln executable")?;
    let mut child = Command::new(&exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(log)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting kiln")?;
    let stdout = child.stdout.take().context("kiln's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("kiln did not start within 30 s")??
        .with_context(|| format!("kiln exited at start; see {}", log.display()))?;
    let url = first
        .strip_prefix(prefix)
        .with_context(|| format!("unexpected first line from kiln: {first:?}"))?
        .to_owned();
    // Keep reading so that the process never writes into a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}

impl Farm {
    /// Starts a server on a free loopback port with data in `dir/server`.
    pub async fn start(dir: &Path, server_args: &[&str]) -> anyhow::Result<Self> {
        let server_args: Vec<String> = server_args.iter().map(|arg| arg.to_string()).collect();
        let (child, url) = spawn_server(dir, "server", "127.0.0.1:0", &server_args).await?;
        let data = dir.join("server");
        Ok(Farm {
            dir: dir.to_owned(),
            url: url.clone(),
            admin_token_file: data.join("admin.token"),
            client_token_file: data.join("client.token"),
            server_args,
            servers: vec![ServerProcess {
                name: "server".into(),
                url,
                child,
            }],
            clients: Vec::new(),
        })
    }

    /// Starts `n` replicas of one farm (`server-0`, `server-1`, ...), each on a free
    /// loopback port with the same token files (`dir/admin.token`, `dir/client.token`)
    /// and `server_args`, which must give them one state store and one image store.
    pub async fn start_replicas(dir: &Path, n: u32, server_args: &[&str]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let admin_token_file = dir.join("admin.token");
        let client_token_file = dir.join("client.token");
        for file in [&admin_token_file, &client_token_file] {
            let secret: [u8; 24] = rand::random();
            std::fs::write(file, format!("{}\n", hex::encode(secret)))?;
        }
        let mut all_args: Vec<String> = server_args.iter().map(|arg| arg.to_string()).collect();
        all_args.extend([
            "--admin-token-file".to_owned(),
            admin_token_file.display().to_string(),
            "--client-token-file".to_owned(),
            client_token_file.display().to_string(),
        ]);
        let mut servers = Vec::new();
        for idx in 0..n {
            let name = format!("server-{idx}");
            let (child, url) = spawn_server(dir, &name, "127.0.0.1:0", &all_args).await?;
            servers.push(ServerProcess { name, url, child });
        }
        Ok(Farm {
            dir: dir.to_owned(),
            url: servers
                .iter()
                .map(|server| server.url.as_str())
                .collect::<Vec<_>>()
                .join(","),
            admin_token_file,
            client_token_file,
            server_args: all_args,
            servers,
            clients: Vec::new(),
        })
    }

    /// As [`Farm::start_replicas`], sharing a SeaweedFS started here (in `dir/weed`;
    /// the images under `s3://kiln/farm`) and the PostgreSQL `database`, or, without
    /// one, a new database on a PostgreSQL started here too.
    pub async fn start_replicas_on_shared_stores(
        dir: &Path,
        n: u32,
        database: Option<&str>,
        server_args: &[&str],
    ) -> anyhow::Result<(Self, SharedStores)> {
        std::fs::create_dir_all(dir)?;
        let (postgres, database) = match database {
            Some(url) => (None, url.to_owned()),
            None => {
                let postgres = Arc::new(tokio::task::spawn_blocking(PgCluster::start).await??);
                let database = postgres.new_database().await?;
                (Some(postgres), database)
            }
        };
        let weed_dir = dir.join("weed");
        let weed = tokio::task::spawn_blocking(move || Seaweed::start(&weed_dir)).await?;
        let credentials = dir.join("s3-credentials");
        std::fs::write(
            &credentials,
            format!(
                "[default]\naws_access_key_id = {S3_KEY}\naws_secret_access_key = {S3_SECRET}\n"
            ),
        )?;
        let mut all: Vec<String> = server_args.iter().map(|arg| arg.to_string()).collect();
        all.extend(["--database".to_owned(), database]);
        all.extend(weed.server_args("farm"));
        all.extend([
            "--s3-credentials-file".to_owned(),
            credentials.display().to_string(),
        ]);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let farm = Farm::start_replicas(&dir.join("farm"), n, &all).await?;
        Ok((farm, SharedStores { postgres, weed }))
    }

    /// Every server's process id, of those that run.
    pub fn server_pids(&self) -> Vec<u32> {
        self.servers
            .iter()
            .filter_map(|server| server.child.id())
            .collect()
    }

    /// The URL of server `idx`.
    pub fn server_url(&self, idx: usize) -> &str {
        &self.servers[idx].url
    }

    /// SIGKILLs server `idx` and reaps it; [`Farm::restart_replica`] starts it again.
    pub async fn kill_replica(&mut self, idx: usize) {
        let server = &mut self.servers[idx];
        signal(&server.child, libc::SIGKILL);
        let _ = server.child.wait().await;
    }

    /// Starts server `idx` again on the same address and data after
    /// [`Farm::kill_replica`].
    pub async fn restart_replica(&mut self, idx: usize) -> anyhow::Result<()> {
        self.respawn_server(idx).await
    }

    /// How many server processes the farm has.
    pub fn n_servers(&self) -> usize {
        self.servers.len()
    }

    /// SIGKILLs the server and starts it again on the same address and data.
    pub async fn crash_and_restart_server(&mut self) -> anyhow::Result<()> {
        self.crash_and_restart_replica(0).await
    }

    /// SIGKILLs server `idx` and starts it again on the same address and data.
    pub async fn crash_and_restart_replica(&mut self, idx: usize) -> anyhow::Result<()> {
        self.kill_replica(idx).await;
        self.respawn_server(idx).await
    }

    /// Stops the server (SIGTERM) and starts it again on the same address and data,
    /// with `server_args` from now on.
    pub async fn restart_server_with(&mut self, server_args: &[&str]) -> anyhow::Result<()> {
        signal(&self.servers[0].child, libc::SIGTERM);
        stop_child(&mut self.servers[0].child).await;
        self.server_args = server_args.iter().map(|arg| arg.to_string()).collect();
        self.respawn_server(0).await
    }

    async fn respawn_server(&mut self, idx: usize) -> anyhow::Result<()> {
        let server = &mut self.servers[idx];
        let listen = server.url.trim_start_matches("http://").to_owned();
        let (child, url) =
            spawn_server(&self.dir, &server.name, &listen, &self.server_args).await?;
        anyhow::ensure!(
            url == server.url,
            "the server came back at {url}, not {}",
            server.url
        );
        server.child = child;
        Ok(())
    }

    /// Starts a client process taking `include`, with `slots` slots; returns its index.
    /// With replicas, the client is given every replica's URL, starting with one that
    /// depends on its id (the same each time it is restarted), so that the clients'
    /// sessions spread over the replicas.
    pub fn add_client(&mut self, id: &str, include: &str, slots: u32) -> anyhow::Result<usize> {
        let first = id.bytes().map(usize::from).sum::<usize>() % self.servers.len();
        let url = self.servers[first..]
            .iter()
            .chain(&self.servers[..first])
            .map(|server| server.url.as_str())
            .collect::<Vec<_>>()
            .join(",");
        self.add_client_via(id, include, slots, &url)
    }

    /// Starts a client that reaches the server at `url` (a proxy, say).
    pub fn add_client_via(
        &mut self,
        id: &str,
        include: &str,
        slots: u32,
        url: &str,
    ) -> anyhow::Result<usize> {
        let exe = crate::kiln_exe().context("finding the kiln executable")?;
        let work = self.dir.join(format!("client-{id}"));
        let child = Command::new(exe)
            .arg("client")
            .arg("--server")
            .arg(url)
            .arg("--id")
            .arg(id)
            .arg("--include")
            .arg(include)
            .arg("--slots")
            .arg(slots.to_string())
            .arg("--work")
            .arg(&work)
            .arg("--token-file")
            .arg(&self.client_token_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join(format!("client-{id}.log")))?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting client {id}"))?;
        self.clients.push((id.to_owned(), child));
        Ok(self.clients.len() - 1)
    }

    /// Sends `signal` to client `idx`.
    pub fn signal_client(&self, idx: usize, signal_number: i32) {
        signal(&self.clients[idx].1, signal_number);
    }

    /// SIGKILLs client `idx` and reaps it.
    pub async fn kill_client(&mut self, idx: usize) {
        signal(&self.clients[idx].1, libc::SIGCONT);
        signal(&self.clients[idx].1, libc::SIGKILL);
        let _ = self.clients[idx].1.wait().await;
    }

    /// The (first) server's process id, while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        self.servers[0].child.id()
    }

    /// The admin secret.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.admin_token_file)?
            .trim()
            .to_owned())
    }

    /// The client secret.
    pub fn client_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.client_token_file)?
            .trim()
            .to_owned())
    }

    /// Stops every process: SIGTERM to the clients (idle ones exit at once), then to
    /// the servers; SIGKILL whatever is still there after a few seconds.
    pub async fn stop(mut self) {
        for (_, client) in &self.clients {
            signal(client, libc::SIGCONT);
            signal(client, libc::SIGTERM);
        }
        for (_, client) in &mut self.clients {
            stop_child(client).await;
        }
        for server in &mut self.servers {
            signal(&server.child, libc::SIGTERM);
            stop_child(&mut server.child).await;
        }
    }
}

/// Sends `signal` to `child` (by its own pid) if it has not been reaped.
pub fn signal(child: &Child, signal: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we started and have not reaped yet.
        unsafe {
            libc::kill(pid as i32, signal);
        }
    }
}

/// Waits up to 10 s for `child` to exit (after a SIGTERM), then SIGKILLs it.
pub async fn stop_child(child: &mut Child) {
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
