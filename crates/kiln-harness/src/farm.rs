//! [`Farm`]: a server and clients started as real `kiln` processes on loopback, for
//! `kiln demo` and `kiln bench`. Each process logs to a file in the farm's directory
//! and is signalled by its own pid.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// A farm of `kiln` processes sharing one directory.
pub struct Farm {
    pub dir: PathBuf,
    pub url: String,
    pub admin_token_file: PathBuf,
    pub client_token_file: PathBuf,
    server_args: Vec<String>,
    server: Child,
    clients: Vec<(String, Child)>,
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(Stdio::from(file))
}

/// Starts `kiln server` listening on `listen`; returns it and the URL it printed.
async fn spawn_server(
    dir: &Path,
    listen: &str,
    args: &[String],
) -> anyhow::Result<(Child, String)> {
    let data = dir.join("server");
    std::fs::create_dir_all(&data)?;
    let mut all: Vec<std::ffi::OsString> = vec![
        "server".into(),
        "--listen".into(),
        listen.into(),
        "--data".into(),
        data.into(),
    ];
    all.extend(args.iter().map(Into::into));
    spawn_listening(&all, &dir.join("server.log"), "kiln server listening on ").await
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
        let (server, url) = spawn_server(dir, "127.0.0.1:0", &server_args).await?;
        let data = dir.join("server");
        Ok(Farm {
            dir: dir.to_owned(),
            url,
            admin_token_file: data.join("admin.token"),
            client_token_file: data.join("client.token"),
            server_args,
            server,
            clients: Vec::new(),
        })
    }

    /// SIGKILLs the server and starts it again on the same address and data.
    pub async fn crash_and_restart_server(&mut self) -> anyhow::Result<()> {
        signal(&self.server, libc::SIGKILL);
        let _ = self.server.wait().await;
        self.respawn_server().await
    }

    /// Stops the server (SIGTERM) and starts it again on the same address and data,
    /// with `server_args` from now on.
    pub async fn restart_server_with(&mut self, server_args: &[&str]) -> anyhow::Result<()> {
        signal(&self.server, libc::SIGTERM);
        stop_child(&mut self.server).await;
        self.server_args = server_args.iter().map(|arg| arg.to_string()).collect();
        self.respawn_server().await
    }

    async fn respawn_server(&mut self) -> anyhow::Result<()> {
        let listen = self.url.trim_start_matches("http://").to_owned();
        let (server, url) = spawn_server(&self.dir, &listen, &self.server_args).await?;
        anyhow::ensure!(
            url == self.url,
            "the server came back at {url}, not {}",
            self.url
        );
        self.server = server;
        Ok(())
    }

    /// Starts a client process taking `include`, with `slots` slots; returns its index.
    pub fn add_client(&mut self, id: &str, include: &str, slots: u32) -> anyhow::Result<usize> {
        let url = self.url.clone();
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

    /// The server's process id, while it runs.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.id()
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
    /// the server; SIGKILL whatever is still there after a few seconds.
    pub async fn stop(mut self) {
        for (_, client) in &self.clients {
            signal(client, libc::SIGCONT);
            signal(client, libc::SIGTERM);
        }
        for (_, client) in &mut self.clients {
            stop_child(client).await;
        }
        signal(&self.server, libc::SIGTERM);
        stop_child(&mut self.server).await;
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
