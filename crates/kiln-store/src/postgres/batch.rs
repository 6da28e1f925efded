//! Group commit on PostgreSQL for the calls every job's run makes: its claim, the
//! records of its images, and its finish or failure.
//!
//! Each of these calls goes to the store's [`Batcher`], which runs at most [`LANES`]
//! transactions at once. While a lane is free, a call runs at once in it, alone, in its
//! caller's task, with a statement a row ([`execute_alone`]). A call that comes while
//! every lane is busy waits in the batcher's task; when a lane frees, the next call
//! waiting runs alone, or, if [`MIN_BATCH`] wait, all of them (one per job, at most
//! [`MAX_BATCH`]) go together into one transaction whose statements each serve all of
//! its calls ([`execute`]): one locks every job row, one records every client, one
//! writes every run, one writes every event. Calls that come together share their round
//! trips and their commit (one WAL flush). One job a transaction, a claim or a finish
//! was seven round trips and a flush of its own, and PostgreSQL ran out of CPU near
//! 600 to 1,100 claim-and-finish cycles a second whatever the number of callers.
//!
//! The rules decide each call on the row as the batch locked it, exactly as for a call
//! alone: a call they refuse (a stale lease, a finish naming an image not stored, a
//! job no longer queued) gets its answer and writes nothing, and the others go on. Each
//! call is answered only once the batch's commit is done. A batch the database fails
//! is run again one call at a time, so that a failure of one call is that call's
//! alone; when the database is unavailable, every call of the batch is told so.
//!
//! A batch takes its locks in the order every transaction takes them (see the parent
//! module): the job rows in (build, pk) order in one statement, the clients' rows in
//! id order in one statement, then the builds' event locks in build order.

use super::{apply, job_row_from, leased_job_row, queue_notices, webhooks, Tx, JOB_ROW_COLUMNS};
use crate::rules::{self, ClientCount, EventDraft, JobRow, JobRun, Transition};
use crate::{ClaimedJob, ClaimingClient, Failure, NewImage, StoreError, StoreResult};
use kiln_proto::api::Event;
use kiln_proto::state::JobState;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// The most calls one batch serves: its statements' arrays stay small, and the calls
/// beyond wait for the next batch.
const MAX_BATCH: usize = 256;

/// Transactions the batcher runs at once (its lanes): a call alone while few wait, or a
/// batch of them once [`MIN_BATCH`] wait.
const LANES: usize = 4;

/// Calls waiting for a free lane from which they go together into one batch; fewer
/// go one at a time, each alone in its transaction, as the batch's statements cost
/// PostgreSQL more than a call's own for a handful of calls.
const MIN_BATCH: usize = 8;

/// An image record's insert of the rows `$rows` (a `VALUES` list or a `SELECT`), which
/// replaces a record of the same name: one statement text for a call alone and for a
/// batch.
macro_rules! image_upsert {
    ($rows:literal) => {
        concat!(
            "INSERT INTO images (build, job, name, lease_token, size, blake3, sha256, \
             blob_key, created_at, chunk_list) ",
            $rows,
            " ON CONFLICT (build, job, name) DO UPDATE SET lease_token = excluded.lease_token, \
             size = excluded.size, blake3 = excluded.blake3, sha256 = excluded.sha256, \
             blob_key = excluded.blob_key, created_at = excluded.created_at, \
             chunk_list = excluded.chunk_list"
        )
    };
}

/// A call the batcher serves, on one job.
pub(super) enum Call {
    Claim {
        client: ClaimingClient,
        lease_until: i64,
        now: i64,
    },
    AddImage {
        lease: String,
        image: NewImage,
    },
    Finish {
        lease: String,
        images: Vec<String>,
        now: i64,
    },
    Fail {
        lease: String,
        failure: Failure,
        now: i64,
    },
}

/// What a call gets back.
pub(super) enum Answer {
    Claimed(Option<ClaimedJob>),
    Stored,
    Ended(Event),
}

struct Request {
    build: String,
    job: String,
    call: Call,
}

struct Pending {
    request: Request,
    reply: oneshot::Sender<StoreResult<Answer>>,
}

/// Runs each call at once in a lane of its own while a lane is free, and the calls
/// that come while every lane is busy in batches, from a task of its own (started by
/// the first such call, and again by the next if its runtime went away).
pub(super) struct Batcher {
    pool: PgPool,
    /// [`LANES`] permits: a transaction of the batcher's holds one.
    lanes: Arc<Semaphore>,
    sender: Mutex<Option<mpsc::UnboundedSender<Pending>>>,
    /// Calls answered by batches of several, since the store opened.
    batched: Arc<AtomicU64>,
}

impl Batcher {
    pub(super) fn new(pool: PgPool) -> Self {
        Batcher {
            pool,
            lanes: Arc::new(Semaphore::new(LANES)),
            sender: Mutex::new(None),
            batched: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Calls answered by batches of several (not alone), since the store opened.
    pub(super) fn batched(&self) -> u64 {
        self.batched.load(Ordering::Relaxed)
    }

    /// Runs `call` on the job `build`/`job`: at once if a lane is free (in the caller's
    /// task, as any call alone), else in the next batch. Answers once committed.
    pub(super) async fn call(&self, build: &str, job: &str, call: Call) -> StoreResult<Answer> {
        let request = Request {
            build: build.to_owned(),
            job: job.to_owned(),
            call,
        };
        // A free lane means nothing waits for one (the task waiting for a lane for the
        // calls it holds is handed the next free one first).
        if let Ok(_lane) = self.lanes.clone().try_acquire_owned() {
            return execute_alone(&self.pool, &request).await;
        }
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending { request, reply };
        {
            let mut sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(sender) = sender.as_ref() {
                    match sender.send(pending) {
                        Ok(()) => break,
                        Err(mpsc::error::SendError(back)) => pending = back,
                    }
                }
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run(
                    self.pool.clone(),
                    self.lanes.clone(),
                    self.batched.clone(),
                    rx,
                ));
                *sender = Some(tx);
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(unavailable(
                "the store's batch ended before it answered".to_owned(),
            ))
        })
    }
}

/// An `Unavailable` error saying `text`.
fn unavailable(text: String) -> StoreError {
    StoreError::Unavailable(sqlx::Error::Io(std::io::Error::other(text)))
}

/// The batcher's task: whenever a lane is free, starts the next call waiting alone, or
/// a batch of those waiting if [`MIN_BATCH`] wait; until every sender is gone.
async fn run(
    pool: PgPool,
    lanes: Arc<Semaphore>,
    batched: Arc<AtomicU64>,
    mut calls: mpsc::UnboundedReceiver<Pending>,
) {
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    let mut open = true;
    loop {
        if waiting.is_empty() {
            if !open {
                return;
            }
            match calls.recv().await {
                Some(pending) => waiting.push_back(pending),
                None => return,
            }
        }
        // A lane, taking in the calls that come meanwhile.
        let lane = tokio::select! {
            lane = lanes.clone().acquire_owned() => lane,
            pending = calls.recv(), if open => {
                match pending {
                    Some(pending) => waiting.push_back(pending),
                    None => open = false,
                }
                continue;
            }
        };
        let Ok(lane) = lane else {
            return;
        };
        while let Ok(pending) = calls.try_recv() {
            waiting.push_back(pending);
        }
        let most = if waiting.len() >= MIN_BATCH {
            MAX_BATCH
        } else {
            1
        };
        let batch = next_batch(&mut waiting, most);
        if !batch.is_empty() {
            let (pool, batched) = (pool.clone(), batched.clone());
            tokio::spawn(async move {
                run_batch(pool, batch, &batched).await;
                drop(lane);
            });
        }
    }
}

/// Takes the next batch from `waiting`: in order, one call a job (a second call on a
/// job waits for a later batch, so that its rules see the row as the first left it),
/// at most `most`, none whose caller stopped waiting.
fn next_batch(waiting: &mut VecDeque<Pending>, most: usize) -> Vec<Pending> {
    let mut batch = Vec::new();
    let mut jobs = HashSet::new();
    let mut later = VecDeque::new();
    for pending in waiting.drain(..) {
        if pending.reply.is_closed() {
            // Its caller stopped waiting before it ran: as a call dropped before its
            // transaction began, it does nothing.
            continue;
        }
        let key = (pending.request.build.clone(), pending.request.job.clone());
        if batch.len() < most && jobs.insert(key) {
            batch.push(pending);
        } else {
            later.push_back(pending);
        }
    }
    *waiting = later;
    batch
}

/// Runs one batch and answers its calls.
async fn run_batch(pool: PgPool, batch: Vec<Pending>, batched: &AtomicU64) {
    let pool = &pool;
    let (requests, replies): (Vec<Request>, Vec<_>) = batch
        .into_iter()
        .map(|pending| (pending.request, pending.reply))
        .unzip();
    if requests.len() == 1 {
        if let (Some(request), Some(reply)) = (requests.first(), replies.into_iter().next()) {
            let _ = reply.send(execute_alone(pool, request).await);
        }
        return;
    }
    match execute(pool, &requests).await {
        Ok(answers) => {
            batched.fetch_add(answers.len() as u64, Ordering::Relaxed);
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(StoreError::Unavailable(err)) => {
            let text = err.to_string();
            for reply in replies {
                let _ = reply.send(Err(unavailable(text.clone())));
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, calls = requests.len(), "a batch failed; its calls run one at a time");
            for (request, reply) in requests.iter().zip(replies) {
                let _ = reply.send(execute_alone(pool, request).await);
            }
        }
    }
}

type Key = (String, String);

/// A job row as the batch locked it, with what a claim hands out.
struct Locked {
    row: JobRow,
    spec: Option<Spec>,
}

/// What a claim hands its client, read with the row.
#[derive(Clone)]
struct Spec {
    title: String,
    config_type: String,
    install_script: String,
    configure_script: Option<String>,
    image_script: String,
    verify_script: Option<String>,
    /// The job's latest event: the one that queued it.
    queued_since: Option<i64>,
}

/// An image row of a job being finished.
struct StoredImage {
    name: String,
    size: i64,
    lease: String,
}

/// One transaction for `requests` (on distinct jobs): the answer of each, or the
/// error of the whole.
async fn execute(pool: &PgPool, requests: &[Request]) -> StoreResult<Vec<StoreResult<Answer>>> {
    let mut tx = pool.begin().await?;
    let locked = lock_rows(&mut tx, requests).await?;
    let images = stored_images(&mut tx, requests).await?;
    let mut plan = Plan::default();
    let decided: Vec<StoreResult<Decided>> = requests
        .iter()
        .map(|request| {
            let key = (request.build.clone(), request.job.clone());
            let no_images = Vec::new();
            plan.decide(
                request,
                locked.get(&key),
                images.get(&key).unwrap_or(&no_images),
            )
        })
        .collect();
    let events = plan.write(&mut tx).await?;
    tx.commit().await?;
    Ok(decided
        .into_iter()
        .map(|decided| match decided? {
            Decided::Answered(answer) => Ok(*answer),
            Decided::Event(idx) => events
                .get(idx)
                .cloned()
                .map(Answer::Ended)
                .ok_or_else(|| StoreError::Conflict("an event was not stored".to_owned())),
        })
        .collect())
}

/// Locks the rows of the requests' jobs, in (build, pk) order, and reads with each
/// claimed job what the claim hands out.
async fn lock_rows(tx: &mut Tx, requests: &[Request]) -> StoreResult<HashMap<Key, Locked>> {
    let builds: Vec<&str> = requests.iter().map(|r| r.build.as_str()).collect();
    let jobs: Vec<&str> = requests.iter().map(|r| r.job.as_str()).collect();
    let claims: Vec<bool> = requests
        .iter()
        .map(|r| matches!(r.call, Call::Claim { .. }))
        .collect();
    // What a claim hands out only for the jobs claimed (`r_claim`): a finish has no use
    // for the scripts, nor for a read of the job's latest event. The rows are joined to
    // the (build, job) pairs: `build = ANY(..) AND id = ANY(..)` probed the index once
    // for every pair of the two lists, 3 ms for a batch of 30 calls.
    let query = format!(
        "SELECT {JOB_ROW_COLUMNS}, r_claim, \
         CASE WHEN r_claim THEN title END AS title, \
         CASE WHEN r_claim THEN config_type END AS config_type, \
         CASE WHEN r_claim THEN install_script END AS install_script, \
         CASE WHEN r_claim THEN configure_script END AS configure_script, \
         CASE WHEN r_claim THEN image_script END AS image_script, \
         CASE WHEN r_claim THEN verify_script END AS verify_script, \
         CASE WHEN r_claim THEN (SELECT MAX(e.time) FROM events e \
             WHERE e.build = jobs.build AND e.job = jobs.id) END AS queued_since \
         FROM jobs JOIN UNNEST($1::TEXT[], $2::TEXT[], $3::BOOLEAN[]) \
         AS r (r_build, r_id, r_claim) ON jobs.build = r.r_build AND jobs.id = r.r_id \
         ORDER BY build, pk FOR UPDATE OF jobs"
    );
    let rows = sqlx::query(&query)
        .bind(&builds)
        .bind(&jobs)
        .bind(&claims)
        .fetch_all(&mut **tx)
        .await?;
    let mut locked = HashMap::with_capacity(rows.len());
    for row in &rows {
        let job_row = job_row_from(row)?;
        let spec = if row.try_get::<bool, _>("r_claim")? {
            Some(spec_from(row)?)
        } else {
            None
        };
        locked.insert(
            (job_row.build.clone(), job_row.job.clone()),
            Locked { row: job_row, spec },
        );
    }
    Ok(locked)
}

fn spec_from(row: &PgRow) -> StoreResult<Spec> {
    Ok(Spec {
        title: row.try_get("title")?,
        config_type: row.try_get("config_type")?,
        install_script: row.try_get("install_script")?,
        configure_script: row.try_get("configure_script")?,
        image_script: row.try_get("image_script")?,
        verify_script: row.try_get("verify_script")?,
        queued_since: row.try_get("queued_since")?,
    })
}

fn stored_image_from(row: &PgRow) -> StoreResult<StoredImage> {
    Ok(StoredImage {
        name: row.try_get("name")?,
        size: row.try_get("size")?,
        lease: row.try_get("lease_token")?,
    })
}

/// What a claim hands its client.
fn claimed_job(
    read: &JobRow,
    spec: Spec,
    transition: &Transition,
    lease: String,
    now: i64,
) -> ClaimedJob {
    ClaimedJob {
        build: read.build.clone(),
        job: read.job.clone(),
        title: spec.title,
        config_type: spec.config_type,
        install_script: spec.install_script,
        configure_script: spec.configure_script,
        image_script: spec.image_script,
        verify_script: spec.verify_script,
        timeout_secs: read.limits.timeout_secs,
        attempt: transition.run.attempt,
        lease,
        queued_since: spec.queued_since.unwrap_or(now),
    }
}

/// A finish under `lease` naming `named`, given the job's image rows `stored`: its
/// transition, and the names of this lease's images it drops when images go (those of
/// earlier leases go too: only what this lease stored and the finish names is the
/// job's output, invariant 4); or why the rules refuse it.
fn finish_transition(
    read: &JobRow,
    lease: &str,
    named: &[String],
    stored: &[StoredImage],
    now: i64,
) -> StoreResult<(Transition, Option<Vec<String>>)> {
    let mine: Vec<String> = stored
        .iter()
        .filter(|image| image.lease == lease)
        .map(|image| image.name.clone())
        .collect();
    let unnamed = rules::finish_images(&read.build, &read.job, named, &mine)?;
    let image_bytes: i64 = stored
        .iter()
        .filter(|image| image.lease == lease && !unnamed.contains(&image.name))
        .map(|image| image.size)
        .sum();
    let transition = rules::finish(read, image_bytes.max(0) as u64, now);
    let drops = (!unnamed.is_empty() || stored.len() > mine.len()).then_some(unnamed);
    Ok((transition, drops))
}

/// Drops a finished job's images of other leases than `lease`, and those of `unnamed`.
async fn drop_unkept(
    tx: &mut Tx,
    build: &str,
    job: &str,
    lease: &str,
    unnamed: &[String],
) -> StoreResult<()> {
    sqlx::query(
        "DELETE FROM images WHERE build = $1 AND job = $2 \
         AND (lease_token != $3 OR name = ANY($4))",
    )
    .bind(build)
    .bind(job)
    .bind(lease)
    .bind(unnamed)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records a claim's client (what it said of itself, its address, its contact, one
/// more claim). What a client says of itself may change from one claim to the next (an
/// older client says nothing of its slots or version): the latest claim is the truth.
async fn record_claim(tx: &mut Tx, client: &ClaimingClient, now: i64) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO clients (id, include, slots, version, address, first_seen, \
         last_contact, n_claimed) VALUES ($1, $2, $3, $4, $5, $6, $7, 1) \
         ON CONFLICT (id) DO UPDATE SET include = excluded.include, \
         slots = excluded.slots, version = excluded.version, \
         address = COALESCE(excluded.address, clients.address), \
         last_contact = GREATEST(clients.last_contact, excluded.last_contact), \
         n_claimed = clients.n_claimed + 1",
    )
    .bind(&client.id)
    .bind(client.include.join(","))
    .bind(client.slots.map(i64::from))
    .bind(&client.version)
    .bind(&client.address)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Every image row of the jobs the requests finish, in one read.
async fn stored_images(
    tx: &mut Tx,
    requests: &[Request],
) -> StoreResult<HashMap<Key, Vec<StoredImage>>> {
    let (builds, jobs): (Vec<&str>, Vec<&str>) = requests
        .iter()
        .filter(|r| matches!(r.call, Call::Finish { .. }))
        .map(|r| (r.build.as_str(), r.job.as_str()))
        .unzip();
    let mut images: HashMap<Key, Vec<StoredImage>> = HashMap::new();
    if builds.is_empty() {
        return Ok(images);
    }
    let rows = sqlx::query(
        "SELECT build, job, name, size, lease_token FROM images \
         WHERE (build, job) IN (SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[]))",
    )
    .bind(&builds)
    .bind(&jobs)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        images
            .entry((row.try_get("build")?, row.try_get("job")?))
            .or_default()
            .push(stored_image_from(row)?);
    }
    Ok(images)
}

/// How a call was decided: answered already, or answered with the event it writes.
enum Decided {
    Answered(Box<Answer>),
    Event(usize),
}

/// What a client's row gains from the batch.
#[derive(Default)]
struct ClientDelta<'a> {
    /// Its latest claim in the batch: what it said of itself.
    claim: Option<&'a ClaimingClient>,
    /// When it was last in contact, if the batch says (0: it does not).
    contact: i64,
    n_claimed: i64,
    n_finished: i64,
    n_failed: i64,
    n_lost: i64,
    image_bytes: i64,
}

/// Images of a job that go.
enum Drop<'a> {
    /// All of them: the job starts again from nothing.
    All(&'a str, &'a str),
    /// Those of earlier leases, and those of this lease the finish does not name.
    Unkept {
        build: &'a str,
        job: &'a str,
        lease: &'a str,
        unnamed: Vec<String>,
    },
}

/// The writes the batch's calls were decided to make.
#[derive(Default)]
struct Plan<'a> {
    images: Vec<(&'a Request, &'a str, &'a NewImage)>,
    drops: Vec<Drop<'a>>,
    clients: BTreeMap<String, ClientDelta<'a>>,
    /// Each changed job's row as read and its run as decided.
    runs: Vec<(&'a JobRow, JobRun)>,
    events: Vec<(&'a str, &'a str, EventDraft)>,
}

impl<'a> Plan<'a> {
    /// Decides `request` on its job's row (`None`: no such job), and adds what it
    /// writes. A refused call adds nothing.
    fn decide(
        &mut self,
        request: &'a Request,
        locked: Option<&'a Locked>,
        images: &[StoredImage],
    ) -> StoreResult<Decided> {
        let (build, job) = (request.build.as_str(), request.job.as_str());
        let found = || {
            locked
                .map(|locked| &locked.row)
                .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))
        };
        match &request.call {
            Call::Claim {
                client,
                lease_until,
                now,
            } => {
                let Some(locked) = locked else {
                    return Ok(Decided::Answered(Box::new(Answer::Claimed(None))));
                };
                let lease = rules::new_lease_token();
                let Some(transition) =
                    rules::claim(&locked.row, &client.id, lease.clone(), *lease_until, *now)
                else {
                    return Ok(Decided::Answered(Box::new(Answer::Claimed(None))));
                };
                let spec = locked.spec.clone().ok_or_else(|| {
                    StoreError::Conflict(format!("job {build}/{job} was read without its spec"))
                })?;
                let claimed = claimed_job(&locked.row, spec, &transition, lease, *now);
                self.transition(&locked.row, transition, *now)?;
                // What a client says of itself may change from one claim to the next:
                // the latest claim is the truth.
                let delta = self.clients.entry(client.id.clone()).or_default();
                delta.claim = Some(client);
                delta.n_claimed += 1;
                delta.contact = delta.contact.max(*now);
                Ok(Decided::Answered(Box::new(Answer::Claimed(Some(claimed)))))
            }
            Call::AddImage { lease, image } => {
                rules::check_lease(found()?, lease)?;
                self.images.push((request, lease, image));
                Ok(Decided::Answered(Box::new(Answer::Stored)))
            }
            Call::Finish {
                lease,
                images: named,
                now,
            } => {
                let row = found()?;
                rules::check_lease(row, lease)?;
                let (transition, unnamed) = finish_transition(row, lease, named, images, *now)?;
                let idx = self.transition(row, transition, *now)?;
                if let Some(unnamed) = unnamed {
                    self.drops.push(Drop::Unkept {
                        build,
                        job,
                        lease,
                        unnamed,
                    });
                }
                Ok(Decided::Event(idx))
            }
            Call::Fail {
                lease,
                failure,
                now,
            } => {
                let row = found()?;
                rules::check_lease(row, lease)?;
                let idx = self.transition(row, rules::fail(row, failure, *now), *now)?;
                Ok(Decided::Event(idx))
            }
        }
    }

    /// Adds a transition the rules decided: its run, its images if they go, its
    /// client's count and its event. Returns the event's place.
    fn transition(
        &mut self,
        read: &'a JobRow,
        transition: Transition,
        now: i64,
    ) -> StoreResult<usize> {
        let Transition {
            run,
            event,
            count,
            drop_images,
        } = transition;
        rules::check_transition(&read.build, &read.job, event.from, event.to)?;
        if drop_images {
            self.drops.push(Drop::All(&read.build, &read.job));
        }
        if let Some((client_id, count)) = count {
            let delta = self.clients.entry(client_id).or_default();
            match count {
                ClientCount::Finished { image_bytes } => {
                    delta.n_finished += 1;
                    delta.image_bytes += image_bytes as i64;
                }
                ClientCount::Failed => delta.n_failed += 1,
                ClientCount::Lost => delta.n_lost += 1,
                ClientCount::ClaimGivenBack => delta.n_claimed -= 1,
            }
            if count.is_contact() {
                delta.contact = delta.contact.max(now);
            }
        }
        self.runs.push((read, run));
        self.events.push((&read.build, &read.job, event));
        Ok(self.events.len() - 1)
    }

    /// Writes the plan in the order locks are taken (the job rows are locked already):
    /// images, clients' rows, runs, then the events under their builds' event locks,
    /// with the webhook notices they call for. Returns the events, in the plan's order.
    async fn write(&self, tx: &mut Tx) -> StoreResult<Vec<Event>> {
        self.write_images(tx).await?;
        for drop in &self.drops {
            match drop {
                Drop::All(build, job) => {
                    sqlx::query("DELETE FROM images WHERE build = $1 AND job = $2")
                        .bind(build)
                        .bind(job)
                        .execute(&mut **tx)
                        .await?;
                }
                Drop::Unkept {
                    build,
                    job,
                    lease,
                    unnamed,
                } => drop_unkept(tx, build, job, lease, unnamed).await?,
            }
        }
        self.write_clients(tx).await?;
        self.write_runs(tx).await?;
        self.write_events(tx).await
    }

    async fn write_images(&self, tx: &mut Tx) -> StoreResult<()> {
        if self.images.is_empty() {
            return Ok(());
        }
        let column = |f: fn(&(&Request, &str, &NewImage)) -> String| -> Vec<String> {
            self.images.iter().map(f).collect()
        };
        let sizes: Vec<i64> = self.images.iter().map(|i| i.2.size as i64).collect();
        let created: Vec<i64> = self.images.iter().map(|i| i.2.created_at).collect();
        let chunk_lists: Vec<&[u8]> = self.images.iter().map(|i| &i.2.chunk_list[..]).collect();
        sqlx::query(image_upsert!(
            "SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], \
                 $5::BIGINT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::BIGINT[], $10::BYTEA[])"
        ))
        .bind(column(|i| i.0.build.clone()))
        .bind(column(|i| i.0.job.clone()))
        .bind(column(|i| i.2.name.clone()))
        .bind(column(|i| i.1.to_owned()))
        .bind(sizes)
        .bind(column(|i| i.2.blake3.clone()))
        .bind(column(|i| i.2.sha256.clone()))
        .bind(column(|i| i.2.blob_key.clone()))
        .bind(created)
        .bind(chunk_lists)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Every client's row the batch changes, in one statement, in id order. A claim
    /// inserts its client's row if it is new; what a claim said of its client replaces
    /// what the row had (its address only when it said one).
    async fn write_clients(&self, tx: &mut Tx) -> StoreResult<()> {
        if self.clients.is_empty() {
            return Ok(());
        }
        let deltas = || self.clients.values();
        let ids: Vec<&str> = self.clients.keys().map(String::as_str).collect();
        let include: Vec<String> = deltas()
            .map(|d| d.claim.map(|c| c.include.join(",")).unwrap_or_default())
            .collect();
        let slots: Vec<Option<i64>> = deltas()
            .map(|d| d.claim.and_then(|c| c.slots).map(i64::from))
            .collect();
        let versions: Vec<Option<&str>> = deltas()
            .map(|d| d.claim.and_then(|c| c.version.as_deref()))
            .collect();
        let addresses: Vec<Option<&str>> = deltas()
            .map(|d| d.claim.and_then(|c| c.address.as_deref()))
            .collect();
        let contact: Vec<i64> = deltas().map(|d| d.contact).collect();
        let count = |f: fn(&ClientDelta) -> i64| -> Vec<i64> { deltas().map(f).collect() };
        sqlx::query(
            "INSERT INTO clients (id, include, slots, version, address, first_seen, \
             last_contact, n_claimed, n_finished, n_failed, n_lost, image_bytes) \
             SELECT id, include, slots, version, address, last_contact, last_contact, \
             n_claimed, n_finished, n_failed, n_lost, image_bytes \
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], \
             $6::BIGINT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[], $11::BIGINT[]) \
             AS c (id, include, slots, version, address, last_contact, n_claimed, n_finished, \
             n_failed, n_lost, image_bytes) ORDER BY id \
             ON CONFLICT (id) DO UPDATE SET \
             include = CASE WHEN excluded.n_claimed > 0 THEN excluded.include ELSE clients.include END, \
             slots = CASE WHEN excluded.n_claimed > 0 THEN excluded.slots ELSE clients.slots END, \
             version = CASE WHEN excluded.n_claimed > 0 THEN excluded.version ELSE clients.version END, \
             address = COALESCE(excluded.address, clients.address), \
             last_contact = GREATEST(clients.last_contact, excluded.last_contact), \
             n_claimed = GREATEST(clients.n_claimed + excluded.n_claimed, 0), \
             n_finished = clients.n_finished + excluded.n_finished, \
             n_failed = clients.n_failed + excluded.n_failed, \
             n_lost = clients.n_lost + excluded.n_lost, \
             image_bytes = clients.image_bytes + excluded.image_bytes",
        )
        .bind(&ids)
        .bind(&include)
        .bind(&slots)
        .bind(&versions)
        .bind(&addresses)
        .bind(&contact)
        .bind(count(|d| d.n_claimed))
        .bind(count(|d| d.n_finished))
        .bind(count(|d| d.n_failed))
        .bind(count(|d| d.n_lost))
        .bind(count(|d| d.image_bytes))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Every run, in one statement, each if its job is still in the state it was read
    /// in (under the row lock it always is).
    async fn write_runs(&self, tx: &mut Tx) -> StoreResult<()> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let runs = || self.runs.iter();
        let text =
            |f: for<'r> fn(&'r (&'a JobRow, JobRun)) -> Option<&'r str>| -> Vec<Option<&str>> {
                runs().map(f).collect()
            };
        let number = |f: fn(&(&'a JobRow, JobRun)) -> Option<i64>| -> Vec<Option<i64>> {
            runs().map(f).collect()
        };
        let done = sqlx::query(
            "UPDATE jobs SET state = u.state, client_id = u.client_id, \
             lease_token = u.lease_token, lease_expires_at = u.lease_expires_at, \
             attempt = u.attempt, time_start = u.time_start, time_complete = u.time_complete, \
             steps_done = u.steps_done, major_state = u.major_state, \
             minor_state = u.minor_state, percent = u.percent, error = u.error, \
             retries_used = u.retries_used, leases_lost = u.leases_lost, \
             accept_deadline = u.accept_deadline, steps_done_at = u.steps_done_at \
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], \
             $6::TEXT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[], \
             $11::BOOLEAN[], $12::TEXT[], $13::TEXT[], $14::BIGINT[], $15::TEXT[], \
             $16::BIGINT[], $17::BIGINT[], $18::BIGINT[], $19::BIGINT[]) \
             AS u (build, id, read_state, state, client_id, lease_token, lease_expires_at, \
             attempt, time_start, time_complete, steps_done, major_state, minor_state, \
             percent, error, retries_used, leases_lost, accept_deadline, steps_done_at) \
             WHERE jobs.build = u.build AND jobs.id = u.id AND jobs.state = u.read_state",
        )
        .bind(text(|r| Some(r.0.build.as_str())))
        .bind(text(|r| Some(r.0.job.as_str())))
        .bind(text(|r| Some(r.0.run.state.as_str())))
        .bind(text(|r| Some(r.1.state.as_str())))
        .bind(text(|r| r.1.client_id.as_deref()))
        .bind(text(|r| r.1.lease_token.as_deref()))
        .bind(number(|r| r.1.lease_expires_at))
        .bind(number(|r| Some(i64::from(r.1.attempt))))
        .bind(number(|r| r.1.time_start))
        .bind(number(|r| r.1.time_complete))
        .bind(runs().map(|r| r.1.steps_done).collect::<Vec<bool>>())
        .bind(text(|r| r.1.major_state.as_deref()))
        .bind(text(|r| r.1.minor_state.as_deref()))
        .bind(number(|r| r.1.percent))
        .bind(text(|r| r.1.error.as_deref()))
        .bind(number(|r| Some(i64::from(r.1.retries_used))))
        .bind(number(|r| Some(i64::from(r.1.leases_lost))))
        .bind(number(|r| r.1.accept_deadline))
        .bind(number(|r| r.1.steps_done_at))
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() != self.runs.len() as u64 {
            return Err(StoreError::Conflict(format!(
                "{} of {} jobs changed state while locked",
                self.runs.len() as u64 - done.rows_affected(),
                self.runs.len()
            )));
        }
        Ok(())
    }

    /// Every event, in one statement that first takes the builds' event locks (in
    /// build order) and then draws the numbers; then the notices each calls for.
    async fn write_events(&self, tx: &mut Tx) -> StoreResult<Vec<Event>> {
        if self.events.is_empty() {
            return Ok(Vec::new());
        }
        let events = || self.events.iter();
        let text = |f: for<'r> fn(&'r (&'a str, &'a str, EventDraft)) -> Option<&'r str>| -> Vec<Option<&str>> {
            events().map(f).collect()
        };
        // The locks are taken in the select list of a sorted subquery: PostgreSQL
        // evaluates a volatile select list after the sort, so in build order. The
        // numbers are drawn after, in the rows of a join the lock count is one side of.
        let rows = sqlx::query(
            "WITH locked AS (SELECT COUNT(*) AS n FROM (SELECT \
             pg_advisory_xact_lock(hashtextextended('kiln.events:' || b, 0)) \
             FROM (SELECT DISTINCT UNNEST($1::TEXT[]) AS b) AS d ORDER BY b) AS l), \
             inserted AS (INSERT INTO events (seq, build, job, time, from_state, to_state, \
             client_id, attempt, reason) \
             SELECT nextval('events_seq_seq'), e.build, e.job, e.time, e.from_state, \
             e.to_state, e.client_id, e.attempt, e.reason FROM locked, \
             UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], \
             $7::BIGINT[], $8::TEXT[]) \
             AS e (build, job, time, from_state, to_state, client_id, attempt, reason) \
             WHERE locked.n >= 0 RETURNING seq, build, job) \
             SELECT i.seq, i.build, i.job, b.notify FROM inserted i \
             JOIN builds b ON b.number = i.build",
        )
        .bind(text(|e| Some(e.0)))
        .bind(text(|e| Some(e.1)))
        .bind(events().map(|e| e.2.time).collect::<Vec<i64>>())
        .bind(text(|e| e.2.from.map(JobState::as_str)))
        .bind(text(|e| Some(e.2.to.as_str())))
        .bind(text(|e| e.2.client_id.as_deref()))
        .bind(
            events()
                .map(|e| i64::from(e.2.attempt))
                .collect::<Vec<i64>>(),
        )
        .bind(text(|e| Some(e.2.reason.as_str())))
        .fetch_all(&mut **tx)
        .await?;
        let mut stored: HashMap<(String, String), (i64, Option<String>)> = HashMap::new();
        for row in &rows {
            stored.insert(
                (row.try_get("build")?, row.try_get("job")?),
                (row.try_get("seq")?, row.try_get("notify")?),
            );
        }
        let mut written = Vec::with_capacity(self.events.len());
        for (idx, (build, job, draft)) in self.events.iter().enumerate() {
            let key = (build.to_string(), job.to_string());
            let (seq, notify) = stored.get(&key).ok_or_else(|| {
                StoreError::Conflict(format!("no event was stored for job {build}/{job}"))
            })?;
            let event = draft.clone().into_event(*seq, build, job);
            let urls = webhooks(notify.as_deref());
            // A build's end is announced with the last of its events in the batch, as
            // one call at a time would: the earlier ones still saw that job open.
            let last_of_build = !self.events[idx + 1..].iter().any(|(b, _, _)| b == build);
            queue_notices(tx, &event, &urls, last_of_build).await?;
            written.push(event);
        }
        Ok(written)
    }
}

/// A call alone, with a statement a row: for one call the batch's statements (arrays
/// unnested, rows joined to them) cost PostgreSQL more than these do. An image record
/// is one statement, its own transaction; the other calls read the job's row, ask the
/// rules, and write in a transaction of their own.
async fn execute_alone(pool: &PgPool, request: &Request) -> StoreResult<Answer> {
    let Request { build, job, call } = request;
    if let Call::AddImage { lease, image } = call {
        return store_image_alone(pool, build, job, lease, image).await;
    }
    let mut tx = pool.begin().await?;
    let answer = match call {
        Call::Claim {
            client,
            lease_until,
            now,
        } => {
            let query = format!(
                "SELECT {JOB_ROW_COLUMNS}, title, config_type, install_script, \
                 configure_script, image_script, verify_script, \
                 (SELECT MAX(e.time) FROM events e WHERE e.build = jobs.build \
                 AND e.job = jobs.id) AS queued_since \
                 FROM jobs WHERE build = $1 AND id = $2 FOR UPDATE"
            );
            // Waits for a transaction holding the job (another claim, a cancel, or one
            // whose rollback is still on its way), then decides on the row as it is.
            let Some(row) = sqlx::query(&query)
                .bind(build)
                .bind(job)
                .fetch_optional(&mut *tx)
                .await?
            else {
                return Ok(Answer::Claimed(None));
            };
            let read = job_row_from(&row)?;
            let spec = spec_from(&row)?;
            let lease = rules::new_lease_token();
            let Some(transition) =
                rules::claim(&read, &client.id, lease.clone(), *lease_until, *now)
            else {
                return Ok(Answer::Claimed(None));
            };
            let claimed = claimed_job(&read, spec, &transition, lease, *now);
            record_claim(&mut tx, client, *now).await?;
            apply(&mut tx, &read, transition, *now).await?;
            Answer::Claimed(Some(claimed))
        }
        // Stored by its one statement, above.
        Call::AddImage { .. } => return Err(super::wrong_answer("an image record")),
        Call::Finish { lease, images, now } => {
            // The lease first: a caller that does not hold the job learns nothing else.
            let read = leased_job_row(&mut tx, build, job, lease).await?;
            let rows = sqlx::query(
                "SELECT name, size, lease_token FROM images WHERE build = $1 AND job = $2",
            )
            .bind(build)
            .bind(job)
            .fetch_all(&mut *tx)
            .await?;
            let stored = rows
                .iter()
                .map(stored_image_from)
                .collect::<StoreResult<Vec<_>>>()?;
            let (transition, unnamed) = finish_transition(&read, lease, images, &stored, *now)?;
            if let Some(unnamed) = unnamed {
                drop_unkept(&mut tx, build, job, lease, &unnamed).await?;
            }
            Answer::Ended(apply(&mut tx, &read, transition, *now).await?)
        }
        Call::Fail {
            lease,
            failure,
            now,
        } => {
            let read = leased_job_row(&mut tx, build, job, lease).await?;
            let transition = rules::fail(&read, failure, *now);
            Answer::Ended(apply(&mut tx, &read, transition, *now).await?)
        }
    };
    tx.commit().await?;
    Ok(answer)
}

/// An image record alone, in one statement: the job's row is locked and read, and the
/// record written only if the row holds `lease`, running. The rules then judge the row
/// read; the statement's own judgement must agree with theirs.
async fn store_image_alone(
    pool: &PgPool,
    build: &str,
    job: &str,
    lease: &str,
    image: &NewImage,
) -> StoreResult<Answer> {
    let query = format!(
        "WITH job AS (SELECT {JOB_ROW_COLUMNS} FROM jobs WHERE build = $1 AND id = $2 \
         FOR UPDATE), stored AS ({} RETURNING 1) \
         SELECT job.*, (SELECT COUNT(*) FROM stored) AS n_stored FROM job",
        image_upsert!(
            "SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 FROM job \
             WHERE job.state = 'running' AND job.lease_token = $4"
        )
    );
    let row = sqlx::query(&query)
        .bind(build)
        .bind(job)
        .bind(&image.name)
        .bind(lease)
        .bind(image.size as i64)
        .bind(&image.blake3)
        .bind(&image.sha256)
        .bind(&image.blob_key)
        .bind(image.created_at)
        .bind(&image.chunk_list)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))?;
    let n_stored: i64 = row.try_get("n_stored")?;
    let judged = rules::check_lease(&job_row_from(&row)?, lease);
    match (judged, n_stored) {
        (Ok(()), 1) => Ok(Answer::Stored),
        (Err(refused), 0) => Err(refused),
        _ => Err(StoreError::Conflict(format!(
            "job {build}/{job}: the image record's statement and the rules judged its lease differently"
        ))),
    }
}
