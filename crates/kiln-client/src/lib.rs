//! The kiln imaging client: an agent that long-polls its servers for jobs it can do,
//! runs them, uploads their images and takes the next.
//!
//! [`Agent::run`] starts one poller per server; a shared pool of slots makes sure the
//! client never runs more jobs than it has slots, even when several servers offer work
//! at once (a job offered without a free slot is given back at once). Each job runs in
//! [`job::run_job`]; its steps run through [`runner::run_step`].

pub mod conn;
pub mod job;
pub mod runner;
pub mod state;
pub mod upload;

use conn::{CallError, ServerConn};
use job::{JobEnd, JobRun};
use kiln_proto::api::ClaimRequest;
use rand::Rng;
use state::LocalState;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};
use upload::{ChunkedUploader, ImageUploader};

/// How the client runs.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The id servers know this client by.
    pub client_id: String,
    /// Config types it takes; `*` takes any.
    pub include: Vec<String>,
    /// The servers it serves, each with the client credential for it.
    pub servers: Vec<ServerConn>,
    /// Where workspaces and the state file live.
    pub work_dir: PathBuf,
    /// How many jobs it runs at once.
    pub slots: u32,
    /// How long one long poll waits.
    pub wait_secs: u64,
    /// How long a step has between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
}

/// Counts of what the agent did, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentReport {
    pub n_finished: u64,
    pub n_failed: u64,
    pub n_lost: u64,
}

/// The running client.
pub struct Agent {
    options: ClientOptions,
    slots: Arc<Semaphore>,
    slot_freed: Notify,
    local_state: Arc<LocalState>,
    uploader: Arc<dyn ImageUploader>,
    report: std::sync::Mutex<AgentReport>,
}

/// What the agent is told to do from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Keep going.
    Run,
    /// Finish the jobs held, take no new one, then exit.
    Drain,
    /// Give the jobs back and exit now.
    Abandon,
}

impl Agent {
    /// Prepares the work directory and the state file.
    pub fn new(options: ClientOptions) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        anyhow::ensure!(
            !options.servers.is_empty(),
            "the client has no server to serve"
        );
        anyhow::ensure!(options.slots > 0, "the client needs at least one slot");
        std::fs::create_dir_all(options.work_dir.join("jobs"))
            .with_context(|| format!("creating work directory {}", options.work_dir.display()))?;
        let local_state =
            LocalState::open(&options.work_dir).context("reading the client's state file")?;
        Ok(Arc::new(Agent {
            slots: Arc::new(Semaphore::new(options.slots as usize)),
            slot_freed: Notify::new(),
            local_state: Arc::new(local_state),
            uploader: Arc::new(ChunkedUploader::new()),
            report: std::sync::Mutex::new(AgentReport::default()),
            options,
        }))
    }

    /// Serves every server until told to stop; returns what it did.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<Stop>) -> AgentReport {
        recover_held_jobs(
            &self.local_state,
            &self.options.servers,
            &self.options.work_dir,
        )
        .await;
        let sessions: Vec<_> = self
            .options
            .servers
            .iter()
            .map(|conn| tokio::spawn(hold_session(conn.clone(), self.options.client_id.clone())))
            .collect();
        let (abandon_tx, abandon_rx) = watch::channel(false);
        let jobs = tokio_util::task::TaskTracker::new();
        let mut pollers = Vec::new();
        for (server_idx, conn) in self.options.servers.iter().enumerate() {
            let agent = self.clone();
            let conn = conn.clone();
            let stop = stop.clone();
            let jobs = jobs.clone();
            let abandon = abandon_rx.clone();
            pollers.push(tokio::spawn(async move {
                agent
                    .poll_server(server_idx, conn, stop, jobs, abandon)
                    .await
            }));
        }
        let mut stop_rx = stop.clone();
        // Wait for the first stop request: pollers end on it by themselves.
        while *stop_rx.borrow() == Stop::Run {
            if stop_rx.changed().await.is_err() {
                break;
            }
        }
        for poller in pollers {
            let _ = poller.await;
        }
        jobs.close();
        tokio::select! {
            _ = jobs.wait() => {}
            _ = async {
                while *stop_rx.borrow() != Stop::Abandon {
                    if stop_rx.changed().await.is_err() { std::future::pending::<()>().await; }
                }
            } => {
                let _ = abandon_tx.send(true);
                jobs.wait().await;
            }
        }
        for session in sessions {
            session.abort();
        }
        self.report.lock().expect("report poisoned").clone()
    }

    async fn wait_for_free_slot(&self, stop: &mut watch::Receiver<Stop>) -> bool {
        loop {
            let freed = self.slot_freed.notified();
            if *stop.borrow() != Stop::Run {
                return false;
            }
            if self.slots.available_permits() > 0 {
                return true;
            }
            tokio::select! {
                _ = freed => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn poll_server(
        self: Arc<Self>,
        server_idx: usize,
        conn: ServerConn,
        mut stop: watch::Receiver<Stop>,
        jobs: tokio_util::task::TaskTracker,
        abandon: watch::Receiver<bool>,
    ) {
        let request = ClaimRequest {
            client_id: self.options.client_id.clone(),
            include: self.options.include.clone(),
            wait_secs: self.options.wait_secs,
            slots: Some(self.options.slots),
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        };
        let mut n_failures: u32 = 0;
        while self.wait_for_free_slot(&mut stop).await {
            let claimed = tokio::select! {
                result = conn.claim(&request) => result,
                _ = stop.changed() => continue,
            };
            let claim = match claimed {
                Ok(Some(claim)) => claim,
                Ok(None) => continue,
                Err(err) => {
                    n_failures += 1;
                    // Jittered exponential backoff, so that many clients do not come
                    // back to a restarted server all at once.
                    let base = Duration::from_millis(250 * 2u64.pow(n_failures.min(7)));
                    let delay = base
                        .min(Duration::from_secs(30))
                        .mul_f64(rand::thread_rng().gen_range(0.5..1.0));
                    if let CallError::Refused { .. } = err {
                        tracing::error!(cause = %kiln_proto::error_chain(&err), server = %conn.url(), "the server refuses our claims");
                    } else {
                        tracing::warn!(cause = %kiln_proto::error_chain(&err), server = %conn.url(), ?delay, "cannot claim; will retry");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
            n_failures = 0;
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                // Another server's job took the last slot meanwhile: give this one back.
                tracing::info!(build = %claim.build, job = %claim.job_id, "no free slot; job given back");
                if let Err(err) = conn.release(&claim).await {
                    tracing::warn!(cause = %kiln_proto::error_chain(&err), "cannot give back a job; its lease will lapse");
                }
                continue;
            };
            tracing::info!(build = %claim.build, job = %claim.job_id, attempt = claim.attempt, server = %conn.url(), "job claimed");
            self.local_state.hold(conn.url(), &claim);
            let job_dir = self
                .options
                .work_dir
                .join("jobs")
                // One directory level per name, so that no two jobs share a directory
                // whatever dashes their names hold.
                .join(format!("s{server_idx}"))
                .join(&claim.build)
                .join(&claim.job_id);
            let run = JobRun {
                conn: conn.clone(),
                claim,
                client_id: self.options.client_id.clone(),
                job_dir,
                kill_grace: self.options.kill_grace,
                uploader: self.uploader.clone(),
                local_state: self.local_state.clone(),
                abandon: abandon.clone(),
            };
            let agent = self.clone();
            jobs.spawn(async move {
                let build = run.claim.build.clone();
                let job = run.claim.job_id.clone();
                let end = job::run_job(run).await;
                tracing::info!(%build, %job, ?end, "job ended");
                {
                    let mut report = agent.report.lock().expect("report poisoned");
                    match end {
                        JobEnd::Finished => report.n_finished += 1,
                        JobEnd::Failed(_) => report.n_failed += 1,
                        JobEnd::LeaseLost | JobEnd::Abandoned => report.n_lost += 1,
                    }
                }
                drop(permit);
                agent.slot_freed.notify_waiters();
            });
        }
    }
}

/// Keeps a session open with one server for as long as the client runs, reconnecting
/// with jittered backoff: the server takes this client's jobs back soon after the
/// session drops for good (see the server's `sessions` module).
async fn hold_session(conn: ServerConn, client_id: String) {
    let mut n_failures: u32 = 0;
    loop {
        let opened = tokio::time::Instant::now();
        let result = conn.session(&client_id).await;
        if opened.elapsed() > Duration::from_secs(30) {
            n_failures = 0;
        }
        n_failures += 1;
        if let Err(err) = result {
            tracing::debug!(cause = %kiln_proto::error_chain(&err), server = %conn.url(), "session ended");
        }
        let base = Duration::from_millis(100 * 2u64.pow(n_failures.min(6)));
        let delay = base
            .min(Duration::from_secs(5))
            .mul_f64(rand::thread_rng().gen_range(0.5..1.0));
        tokio::time::sleep(delay).await;
    }
}

/// Gives back the jobs that `WORK/state.json` says a previous run held: their
/// process groups are killed (if they still run that job), their servers are told the
/// job died (so it is queued again at once, not after its lease), and the state and
/// leftover workspaces are cleared. Used at start-up and by `kiln client reset`.
pub async fn recover_held_jobs(
    local_state: &LocalState,
    servers: &[ServerConn],
    work_dir: &std::path::Path,
) {
    for held in local_state.held() {
        if let Some(pgid) = held.pgid {
            if state::group_runs_job(pgid, &held.build, &held.job) {
                tracing::warn!(build = %held.build, job = %held.job, pgid, "killing the processes of a job a previous run held");
                let _ = runner::kill_process_group(pgid, libc::SIGKILL);
            }
        }
        let Some(conn) = servers
            .iter()
            .find(|conn| conn.url() == held.server.trim_end_matches('/'))
        else {
            tracing::warn!(build = %held.build, job = %held.job, server = %held.server, "held job's server is not served any more; its lease will lapse");
            continue;
        };
        let reason = "the client restarted; the job died with it";
        match conn
            .give_up(&held.build, &held.job, &held.lease, reason)
            .await
        {
            Ok(()) => {
                tracing::info!(build = %held.build, job = %held.job, "job a previous run held was given back")
            }
            Err(CallError::Stale(_)) => {
                tracing::info!(build = %held.build, job = %held.job, "job a previous run held had already been taken back")
            }
            Err(err) => {
                tracing::warn!(cause = %kiln_proto::error_chain(&err), build = %held.build, job = %held.job, "cannot give back a job a previous run held; its lease will lapse")
            }
        }
    }
    local_state.clear();
    let jobs_dir = work_dir.join("jobs");
    if let Ok(entries) = std::fs::read_dir(&jobs_dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
