//! The kiln imaging client: an agent that long-polls its servers for jobs it can do,
//! runs them, uploads their images and takes the next.
//!
//! [`Agent::run`] runs one dispatch loop: it takes a free slot, then a job for it. With
//! one server it long-polls that server's claim; with several it asks each for its
//! offer (`POST /v1/offer`, nothing claimed) and claims from the server with the best
//! one — highest priority, then oldest — and when none has work it waits on every
//! server's offer at once. Since a slot is taken before a claim is made, the client
//! never holds more jobs than slots, however many servers offer work at the same
//! moment. The servers it serves come from [`fleet::ServerList`]: fixed ones and
//! those its masters list, refreshed as it runs. Each job runs in [`job::run_job`]; its
//! steps run through [`runner::run_step`], with the client's [`cache::JobCache`] as
//! `KILN_CACHE`, evicted between jobs.

pub mod cache;
pub mod files;
pub mod fleet;
pub mod job;
pub mod runner;
pub mod state;
pub mod upload;

use cache::JobCache;
use files::KeptFiles;
use fleet::ServerList;
use futures::StreamExt;
use job::{JobEnd, JobRun};
use kiln_api::{CallError, MasterConn, ServerConn};
use kiln_proto::api::{Claim, ClaimRequest, Offer};
use rand::Rng;
use state::LocalState;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use upload::{ChunkedUploader, ImageUploader};

/// How long the client waits for one server's immediate offer before counting it as
/// unreachable for a while.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// How the client runs.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The id servers know this client by.
    pub client_id: String,
    /// Config types it takes; `*` takes any.
    pub include: Vec<String>,
    /// The servers it always serves, each with the client credential for it.
    pub servers: Vec<ServerConn>,
    /// Masters whose live servers it also serves (with the masters' credential).
    pub masters: Vec<MasterConn>,
    /// How often the server list is read again from the masters.
    pub refresh: Duration,
    /// Where workspaces and the state file live.
    pub work_dir: PathBuf,
    /// How many jobs it runs at once.
    pub slots: u32,
    /// How long one long poll waits.
    pub wait_secs: u64,
    /// How long a step has between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// The job cache (`KILN_CACHE`), kept across jobs.
    pub cache_dir: PathBuf,
    /// The most bytes the job cache keeps between jobs.
    pub cache_max_bytes: u64,
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
    list: ServerList,
    slots: Arc<Semaphore>,
    /// Servers this client holds jobs on, with how many: their sessions stay open
    /// even after they drop off the list.
    held: std::sync::Mutex<HashMap<String, (ServerConn, usize)>>,
    held_changed: Notify,
    local_state: Arc<LocalState>,
    uploader: Arc<dyn ImageUploader>,
    report: std::sync::Mutex<AgentReport>,
    cache: JobCache,
    /// The build files archives fetched, for later jobs of the same builds.
    kept_files: KeptFiles,
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

/// Returns once `stop` says anything but [`Stop::Run`] (or its sender is gone).
async fn until_stopped(stop: &mut watch::Receiver<Stop>) {
    while *stop.borrow_and_update() == Stop::Run {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Servers that failed lately and when each may be asked again: jittered exponential
/// backoff, so that many clients do not come back to a restarted server all at once.
#[derive(Default)]
struct Backoff {
    failing: HashMap<String, (u32, Instant)>,
}

impl Backoff {
    fn is_ready(&self, url: &str) -> bool {
        self.failing
            .get(url)
            .is_none_or(|(_, retry_at)| *retry_at <= Instant::now())
    }

    /// When the next failing server may be asked again.
    fn next_retry(&self) -> Option<Instant> {
        self.failing.values().map(|(_, at)| *at).min()
    }

    fn succeeded(&mut self, url: &str) {
        self.failing.remove(url);
    }

    fn failed(&mut self, url: &str, err: &CallError) {
        let entry = self
            .failing
            .entry(url.to_owned())
            .or_insert((0, Instant::now()));
        entry.0 += 1;
        let base = Duration::from_millis(250 * 2u64.pow(entry.0.min(7)));
        let delay = base
            .min(Duration::from_secs(30))
            .mul_f64(rand::thread_rng().gen_range(0.5..1.0));
        entry.1 = Instant::now() + delay;
        if let CallError::Refused { .. } = err {
            tracing::error!(cause = %kiln_proto::error_chain(err), server = %url, ?delay, "the server refuses our claims");
        } else {
            tracing::warn!(cause = %kiln_proto::error_chain(err), server = %url, ?delay, "cannot ask the server for work; will retry");
        }
    }
}

impl Agent {
    /// Prepares the work directory and the state file.
    pub fn new(options: ClientOptions) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        anyhow::ensure!(
            !options.servers.is_empty() || !options.masters.is_empty(),
            "the client has no server to serve and no master to ask for one"
        );
        anyhow::ensure!(options.slots > 0, "the client needs at least one slot");
        std::fs::create_dir_all(options.work_dir.join("jobs"))
            .with_context(|| format!("creating work directory {}", options.work_dir.display()))?;
        let local_state =
            LocalState::open(&options.work_dir).context("reading the client's state file")?;
        let cache = JobCache::open(options.cache_dir.clone(), options.cache_max_bytes)
            .with_context(|| format!("creating the job cache {}", options.cache_dir.display()))?;
        let kept_files = KeptFiles::open(&options.work_dir).with_context(|| {
            format!(
                "creating the kept build files directory under {}",
                options.work_dir.display()
            )
        })?;
        Ok(Arc::new(Agent {
            list: ServerList::new(options.servers.clone(), options.masters.clone()),
            slots: Arc::new(Semaphore::new(options.slots as usize)),
            held: std::sync::Mutex::new(HashMap::new()),
            held_changed: Notify::new(),
            local_state: Arc::new(local_state),
            uploader: Arc::new(ChunkedUploader::new()),
            report: std::sync::Mutex::new(AgentReport::default()),
            cache,
            kept_files,
            options,
        }))
    }

    /// Serves every server until told to stop; returns what it did.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<Stop>) -> AgentReport {
        if self.list.has_masters() && !self.list.refresh().await {
            tracing::warn!("no master answers yet; serving the fixed servers until one does");
        }
        let held_before: Vec<ServerConn> = {
            let mut conns: Vec<ServerConn> = Vec::new();
            for held in self.local_state.held() {
                if let Some(conn) = self.list.conn_for(&held.server) {
                    if !conns.iter().any(|known| known.url() == conn.url()) {
                        conns.push(conn);
                    }
                }
            }
            conns
        };
        recover_held_jobs(&self.local_state, &held_before, &self.options.work_dir).await;
        self.evict_cache().await;
        let refresher = {
            let agent = self.clone();
            tokio::spawn(async move { agent.list.keep_fresh(agent.options.refresh).await })
        };
        let sessions = tokio::spawn(self.clone().keep_sessions());
        let (abandon_tx, abandon_rx) = watch::channel(false);
        let jobs = tokio_util::task::TaskTracker::new();
        self.clone()
            .dispatch(stop.clone(), jobs.clone(), abandon_rx)
            .await;
        let mut stop_rx = stop.clone();
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
        refresher.abort();
        sessions.abort();
        self.report.lock().expect("report poisoned").clone()
    }

    /// Bounds the job cache, if no job is using it (see [`cache`]).
    async fn evict_cache(&self) {
        match self.cache.evict_between_jobs().await {
            None => {}
            Some(Ok(eviction)) if eviction.removed.is_empty() => {
                tracing::debug!(
                    bytes = eviction.bytes_after,
                    max_bytes = self.cache.max_bytes(),
                    "job cache within its bound"
                );
            }
            Some(Ok(eviction)) => tracing::info!(
                removed = %eviction.removed.join(" "),
                bytes_before = eviction.bytes_before,
                bytes_after = eviction.bytes_after,
                max_bytes = self.cache.max_bytes(),
                "job cache over its bound: least recently used entries removed"
            ),
            Some(Err(err)) => tracing::warn!(
                cause = %kiln_proto::error_chain(&err),
                dir = %self.cache.dir().display(),
                "cannot bound the job cache"
            ),
        }
    }

    fn claim_request(&self, wait_secs: u64) -> ClaimRequest {
        ClaimRequest {
            client_id: self.options.client_id.clone(),
            include: self.options.include.clone(),
            wait_secs,
            slots: Some(self.options.slots),
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        }
    }

    /// Takes a free slot, then a job for it, and starts the job; until told to stop.
    async fn dispatch(
        self: Arc<Self>,
        mut stop: watch::Receiver<Stop>,
        jobs: tokio_util::task::TaskTracker,
        abandon: watch::Receiver<bool>,
    ) {
        let mut list = self.list.subscribe();
        let mut backoff = Backoff::default();
        loop {
            let permit = tokio::select! {
                permit = self.slots.clone().acquire_owned() => permit.expect("the slot pool is never closed"),
                _ = until_stopped(&mut stop) => return,
            };
            let (conn, claim) = loop {
                if *stop.borrow() != Stop::Run {
                    return;
                }
                let ready: Vec<ServerConn> = list
                    .borrow_and_update()
                    .iter()
                    .filter(|conn| backoff.is_ready(conn.url()))
                    .cloned()
                    .collect();
                let found = match ready.as_slice() {
                    [] => {
                        let retry = backoff
                            .next_retry()
                            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                        tokio::select! {
                            _ = tokio::time::sleep_until(retry) => {}
                            _ = list.changed() => {}
                            _ = until_stopped(&mut stop) => {}
                        }
                        None
                    }
                    [conn] => {
                        self.claim_from(conn, &mut backoff, &mut stop, &mut list)
                            .await
                    }
                    several => {
                        self.claim_best(several, &mut backoff, &mut stop, &mut list)
                            .await
                    }
                };
                if let Some(found) = found {
                    break found;
                }
            };
            if *stop.borrow() != Stop::Run {
                // Claimed as the stop came: give it back at once.
                if let Err(err) = conn.release(&claim).await {
                    tracing::warn!(cause = %kiln_proto::error_chain(&err), "cannot give back a job; its lease will lapse");
                }
                return;
            }
            self.start_job(conn, claim, permit, &jobs, &abandon);
        }
    }

    /// Long-polls the only server served; `None` when the wait ended without a job, the
    /// list changed, or a stop came.
    async fn claim_from(
        &self,
        conn: &ServerConn,
        backoff: &mut Backoff,
        stop: &mut watch::Receiver<Stop>,
        list: &mut watch::Receiver<Vec<ServerConn>>,
    ) -> Option<(ServerConn, Claim)> {
        let request = self.claim_request(self.options.wait_secs);
        let claim = conn.claim(&request);
        tokio::pin!(claim);
        let claimed = loop {
            tokio::select! {
                result = &mut claim => break result,
                _ = until_stopped(stop) => return None,
                changed = list.changed() => {
                    // Only a list that no longer is this one server ends the poll: an
                    // abandoned claim in flight costs a lease if the server had just
                    // answered it.
                    let alone = changed.is_ok() && {
                        let now = list.borrow_and_update();
                        now.len() == 1 && now[0].url() == conn.url()
                    };
                    if !alone {
                        return None;
                    }
                }
            }
        };
        match claimed {
            Ok(claim) => {
                backoff.succeeded(conn.url());
                claim.map(|claim| (conn.clone(), claim))
            }
            Err(err) => {
                backoff.failed(conn.url(), &err);
                None
            }
        }
    }

    /// Asks every server for its offer and claims from the best; when none has work,
    /// waits for the first offer from any (then returns `None` to ask all again).
    async fn claim_best(
        &self,
        servers: &[ServerConn],
        backoff: &mut Backoff,
        stop: &mut watch::Receiver<Stop>,
        list: &mut watch::Receiver<Vec<ServerConn>>,
    ) -> Option<(ServerConn, Claim)> {
        let now = self.claim_request(0);
        let answers = futures::future::join_all(servers.iter().map(|conn| {
            let now = &now;
            async move {
                let answer = tokio::time::timeout(OFFER_TIMEOUT, conn.offer(now)).await;
                (conn, answer)
            }
        }))
        .await;
        let mut offers: Vec<(&ServerConn, Offer)> = Vec::new();
        for (conn, answer) in answers {
            match answer {
                Ok(Ok(offer)) => {
                    backoff.succeeded(conn.url());
                    offers.extend(offer.map(|offer| (conn, offer)));
                }
                Ok(Err(err)) => backoff.failed(conn.url(), &err),
                Err(_elapsed) => {
                    tracing::warn!(server = %conn.url(), "no answer to an offer request")
                }
            }
        }
        if !offers.is_empty() {
            offers.sort_by_key(|(_, offer)| offer.precedence());
            for (conn, offer) in offers {
                // A short claim: the offered job, or the server's next best if another
                // client took it meanwhile.
                match conn.claim(&self.claim_request(1)).await {
                    Ok(Some(claim)) => {
                        tracing::debug!(server = %conn.url(), offered = %format!("{}/{}", offer.build, offer.job_id), claimed = %format!("{}/{}", claim.build, claim.job_id), priority = offer.priority, "claimed the best offer");
                        return Some((conn.clone(), claim));
                    }
                    Ok(None) => {}
                    Err(err) => backoff.failed(conn.url(), &err),
                }
            }
            return None;
        }
        let waiting = self.claim_request(self.options.wait_secs);
        let mut waits: futures::stream::FuturesUnordered<_> = servers
            .iter()
            .filter(|conn| backoff.is_ready(conn.url()))
            .map(|conn| {
                let waiting = &waiting;
                async move { (conn, conn.offer(waiting).await) }
            })
            .collect();
        loop {
            tokio::select! {
                next = waits.next() => match next {
                    None => return None,
                    Some((conn, Ok(offer))) => {
                        backoff.succeeded(conn.url());
                        if offer.is_some() {
                            return None;
                        }
                    }
                    Some((conn, Err(err))) => backoff.failed(conn.url(), &err),
                },
                _ = list.changed() => return None,
                _ = until_stopped(stop) => return None,
            }
        }
    }

    fn start_job(
        self: &Arc<Self>,
        conn: ServerConn,
        claim: Claim,
        permit: OwnedSemaphorePermit,
        jobs: &tokio_util::task::TaskTracker,
        abandon: &watch::Receiver<bool>,
    ) {
        tracing::info!(build = %claim.build, job = %claim.job_id, attempt = claim.attempt, server = %conn.url(), "job claimed");
        self.local_state.hold(conn.url(), &claim);
        self.held
            .lock()
            .expect("held list poisoned")
            .entry(conn.url().to_owned())
            .or_insert_with(|| (conn.clone(), 0))
            .1 += 1;
        self.held_changed.notify_one();
        let job_dir = self
            .options
            .work_dir
            .join("jobs")
            // One directory level per name, so that no two jobs share a directory
            // whatever dashes their names hold.
            .join(server_dir_name(conn.url()))
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
            cache: self.cache.clone(),
            kept_files: self.kept_files.clone(),
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
            {
                let mut held = agent.held.lock().expect("held list poisoned");
                if let Some(entry) = held.get_mut(conn.url()) {
                    entry.1 -= 1;
                    if entry.1 == 0 {
                        held.remove(conn.url());
                    }
                }
            }
            agent.held_changed.notify_one();
            // Between jobs: the last job to end bounds the cache.
            agent.evict_cache().await;
            drop(permit);
        });
    }

    /// Keeps a session open with every server on the list and every server it holds a
    /// job on; closes the others'.
    async fn keep_sessions(self: Arc<Self>) {
        let mut list = self.list.subscribe();
        // Dropping the set (when this task is aborted) ends every session.
        let mut tasks = tokio::task::JoinSet::new();
        let mut sessions: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
        loop {
            let mut wanted: HashMap<String, ServerConn> = list
                .borrow_and_update()
                .iter()
                .map(|conn| (conn.url().to_owned(), conn.clone()))
                .collect();
            for (url, (conn, _)) in self.held.lock().expect("held list poisoned").iter() {
                wanted.entry(url.clone()).or_insert_with(|| conn.clone());
            }
            sessions.retain(|url, task| {
                let keep = wanted.contains_key(url);
                if !keep {
                    task.abort();
                }
                keep
            });
            for (url, conn) in wanted {
                sessions.entry(url).or_insert_with(|| {
                    tasks.spawn(hold_session(conn, self.options.client_id.clone()))
                });
            }
            tokio::select! {
                changed = list.changed() => if changed.is_err() { return },
                _ = self.held_changed.notified() => {}
                // Reap sessions that were aborted.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    }
}

/// The directory a server's jobs run under: stable across restarts and list changes,
/// and safe whatever the URL holds.
fn server_dir_name(url: &str) -> String {
    let hash = kiln_blob::ChunkHash::of(url.as_bytes()).to_string();
    format!("s-{}", &hash[..16])
}

/// Keeps a session open with one server for as long as the client runs, reconnecting
/// with jittered backoff: the server takes this client's jobs back soon after the
/// session drops for good (see the server's `sessions` module).
async fn hold_session(conn: ServerConn, client_id: String) {
    let mut n_failures: u32 = 0;
    loop {
        let opened = tokio::time::Instant::now();
        let called = conn.current_url().to_owned();
        let result = conn.session(&client_id).await;
        if opened.elapsed() > Duration::from_secs(30) {
            n_failures = 0;
        }
        if let Err(err) = result {
            tracing::debug!(cause = %kiln_proto::error_chain(&err), server = %conn.url(), "session ended");
        }
        // A session that had been open broke, and the farm's next URL is another
        // server: open the session there at once. (One that could not even open
        // waits as usual, so that a farm whose every server is down is not called in
        // a loop: at most 4 times a second this way.)
        if conn.current_url() != called && opened.elapsed() > Duration::from_millis(250) {
            n_failures = 0;
            continue;
        }
        n_failures += 1;
        let base = Duration::from_millis(100 * 2u64.pow(n_failures.min(6)));
        let delay = base
            .min(Duration::from_secs(5))
            .mul_f64(rand::thread_rng().gen_range(0.5..1.0));
        tokio::time::sleep(delay).await;
    }
}

/// Gives back the jobs that the state file says a previous run held: their
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
