//! `kiln bench fleet`: a master, several servers registered with it and many real
//! `kiln client` processes that know only the master.
//!
//! - Dispatch: one-job builds are submitted to the servers in turn; the time from a
//!   job's queueing to its claim is read from its server's event log.
//! - Registration: a server with a job already queued starts registering with the
//!   master; the time from its registration (the master's `first_seen`) to the job's
//!   claim (the job's `time_start`) is measured. Both clocks are this machine's.

use super::{claim_latency_ms, percentile, sessions_open, write_build};
use crate::farm::{signal, spawn_listening, stop_child, Farm};
use anyhow::Context;
use kiln_api::Operator;
use kiln_proto::api::{JobStatus, ServerEntry};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// What to run.
pub struct Options {
    pub servers: u32,
    pub clients: u32,
    pub jobs: u32,
    pub trials: u32,
}

const INSTALL: &str = "true\n";
const IMAGE: &str = "echo x > \"$KILN_OUTPUT/image.bin\"\n";

/// The shared secrets and the master's address.
struct Fleet {
    dir: PathBuf,
    master_url: String,
    client_token: PathBuf,
    server_token: PathBuf,
}

impl Fleet {
    /// The flags of a server that registers with the master.
    fn registered(&self) -> Vec<String> {
        let mut args = self.unregistered();
        args.extend([
            "--master".to_owned(),
            self.master_url.clone(),
            "--master-token-file".to_owned(),
            self.server_token.display().to_string(),
        ]);
        args
    }

    /// The flags of a server of this fleet that does not register (yet).
    fn unregistered(&self) -> Vec<String> {
        vec![
            "--client-token-file".to_owned(),
            self.client_token.display().to_string(),
            "--heartbeat-secs".to_owned(),
            "1".to_owned(),
        ]
    }

    fn start_client(&self, id: &str) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("finding the kiln executable")?;
        let clients = self.dir.join("clients");
        std::fs::create_dir_all(&clients)?;
        let log = std::fs::File::create(clients.join(format!("{id}.log")))?;
        Command::new(exe)
            .args(["client", "--master", &self.master_url, "--id", id])
            .args(["--include", "BENCH", "--slots", "1", "--wait-secs", "60"])
            .arg("--work")
            .arg(clients.join(id))
            .arg("--token-file")
            .arg(&self.client_token)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting client {id}"))
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

pub async fn run(options: Options) -> anyhow::Result<bool> {
    anyhow::ensure!(options.servers >= 1, "--servers must be at least 1");
    anyhow::ensure!(options.clients >= 1, "--clients must be at least 1");
    let temp = tempfile::Builder::new()
        .prefix("kiln-bench-fleet-")
        .tempdir()?;
    let dir = temp.path().to_owned();
    let client_token = dir.join("client.token");
    let server_token = dir.join("server.token");
    std::fs::write(&client_token, format!("{}\n", random_secret()))?;
    std::fs::write(&server_token, format!("{}\n", random_secret()))?;
    let master_args: Vec<std::ffi::OsString> = vec![
        "master".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data".into(),
        dir.join("master").into(),
        "--client-token-file".into(),
        client_token.clone().into(),
        "--server-token-file".into(),
        server_token.clone().into(),
        "--heartbeat-timeout-secs".into(),
        "3".into(),
    ];
    let (mut master, master_url) = spawn_listening(
        &master_args,
        &dir.join("master.log"),
        "kiln master listening on ",
    )
    .await?;
    let fleet = Fleet {
        dir: dir.clone(),
        master_url,
        client_token,
        server_token,
    };
    let registered = fleet.registered();
    let mut servers = Vec::new();
    for idx in 0..options.servers {
        servers.push(Farm::start(&dir.join(format!("s{idx}")), &strs(&registered)).await?);
    }
    let started = tokio::time::Instant::now();
    let mut clients = Vec::new();
    for idx in 0..options.clients {
        clients.push(fleet.start_client(&format!("fc{idx:03}"))?);
    }
    // Every client serves every server once each server counts every client's session.
    let operators = servers
        .iter()
        .map(|server| {
            Ok(Operator::with_token(
                &server.url,
                Some(&server.admin_token()?),
            )?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (server, operator) in servers.iter().zip(&operators) {
        while sessions_open(operator).await? < u64::from(options.clients) {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "not every client reached {} within 120 s; see the logs in {}",
                server.url,
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "{} clients serve {} servers ({:.1} s from the first start)",
        options.clients,
        options.servers,
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let build_dir = dir.join("build");
    let mut dispatch_ms = Vec::new();
    for idx in 0..(options.jobs + 10) {
        let server = idx as usize % servers.len();
        let number = format!("d{idx}");
        write_build(&build_dir, &number, 1, INSTALL, IMAGE)?;
        operators[server]
            .submit(&build_dir.join("relbuild.xml"), &build_dir)
            .await?;
        let claimed = claim_latency_ms(&operators[server], &number).await?;
        // The first few are warm-up.
        if idx >= 10 {
            dispatch_ms.push(claimed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatch_ms.sort_by(|a, b| a.total_cmp(b));

    let mut registration_ms = Vec::new();
    for trial in 0..options.trials {
        registration_ms.push(registration_trial(&fleet, &dir.join(format!("new{trial}"))).await?);
    }
    registration_ms.sort_by(|a, b| a.total_cmp(b));

    for client in &clients {
        signal(client, libc::SIGTERM);
    }
    for client in &mut clients {
        stop_child(client).await;
    }
    for server in servers {
        server.stop().await;
    }
    signal(&master, libc::SIGTERM);
    stop_child(&mut master).await;

    println!(
        "fleet: 1 master, {} servers, {} client processes that know only the master",
        options.servers, options.clients
    );
    println!("| measure | n | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for (what, figures) in [
        ("dispatch: job queued -> claimed", &dispatch_ms),
        ("new server registered -> its job claimed", &registration_ms),
    ] {
        println!(
            "| {what} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            figures.len(),
            percentile(figures, 50.0),
            percentile(figures, 90.0),
            percentile(figures, 99.0),
            figures.last().copied().unwrap_or(f64::NAN)
        );
    }
    Ok(true)
}

/// A server with a job queued joins the fleet: returns the time from its registration
/// to the job's claim, in milliseconds.
async fn registration_trial(fleet: &Fleet, dir: &Path) -> anyhow::Result<f64> {
    // Queue the job on a server that does not register, then restart it registering.
    let mut server = Farm::start(dir, &strs(&fleet.unregistered())).await?;
    let operator = Operator::with_token(&server.url, Some(&server.admin_token()?))?;
    let build_dir = dir.join("build");
    write_build(&build_dir, "joined", 1, INSTALL, IMAGE)?;
    operator
        .submit(&build_dir.join("relbuild.xml"), &build_dir)
        .await?;
    server
        .restart_server_with(&strs(&fleet.registered()))
        .await?;
    let master_token = std::fs::read_to_string(&fleet.client_token)?;
    let master = Operator::with_token(&fleet.master_url, Some(master_token.trim()))?;
    let started = tokio::time::Instant::now();
    let claimed_at = loop {
        let jobs: Vec<JobStatus> = operator.jobs("joined").await?;
        if let Some(start) = jobs.first().and_then(|job| job.time_start) {
            break start;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the new server's job was not claimed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let listed: Vec<ServerEntry> = master.servers(true).await?;
    let registered_at = listed
        .iter()
        .find(|entry| entry.url == server.url)
        .map(|entry| entry.first_seen)
        .context("the master does not list the new server")?;
    server.stop().await;
    Ok((claimed_at - registered_at) as f64 / 1000.0)
}

fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 24] = rand::thread_rng().gen();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
