//! [`PgStore`]: the store on a PostgreSQL server, for farms whose server processes
//! share one database.
//!
//! Every read-modify-write is one transaction (READ COMMITTED) that locks what it reads:
//! a change to a job reads its row with `SELECT ... FOR UPDATE` ([`read_job_row`]), asks
//! [`crate::rules`], and writes what they decided ([`apply`]) with one
//! `UPDATE ... WHERE state = $n` conditional on the state it read, exactly as the SQLite
//! store does. A claim is that conditional update of a queued job: whoever loses gets
//! nothing.
//!
//! Sequence numbers (`events.seq`, `log_lines.seq`) are what readers page by, so a
//! reader must never see a later number before an earlier one commits. A job's log
//! lines are written under its row lock, and a build's events under a transaction
//! advisory lock on the build's name ([`lock_build_events`]): within a build (and a
//! job), numbers commit in order.
//!
//! Locks are taken in one order, so that no two transactions wait on each other in a
//! cycle: job rows (several in (build, pk) order), then clients' rows (a client's
//! counters and contact; several in id order), then builds' event locks (several in
//! build order); a change of several jobs takes the last two with
//! [`lock_for_changes_of`]. A claim that took the event lock before its client's row
//! and a finish that updated its client's row before the event lock deadlocked, each
//! time costing PostgreSQL's `deadlock_timeout` (1 s) and the call.
//!
//! The event lock comes last because every change of a build waits for it, and it is
//! held until the commit (and its WAL flush) is done: a transaction takes it with the
//! statement that writes its event ([`write_run_and_event`]), which also reads the build's
//! webhooks, and then only writes the notices, if any, before committing.
//!
//! The calls every job's run makes (its claim, its image records, its finish or
//! failure) are committed in batches (`batch.rs`): calls made at the same time share one
//! transaction, whose statements each serve all of them, and each is decided by the
//! rules as if it were alone. The other changes are one transaction a call, as above.
//!
//! One module per area, as for SQLite: `queue.rs`, `logs.rs`, `images.rs`,
//! `outbox.rs`, `clients.rs`; and `batch.rs`. Migrations are in `migrations/postgres/`.

mod batch;
mod changes;
mod clients;
mod images;
mod logs;
mod outbox;
mod packs;
mod queue;

use crate::rules::{self, ClientCount, EventDraft, JobLimits, JobRow, JobRun, Transition};
use crate::{StoreError, StoreResult};
use kiln_proto::api::{Event, JobStatus};
use kiln_proto::state::JobState;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::str::FromStr;
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The store on PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Connections that read the queue's first page (`queued_candidates`), with sorting
    /// ruled out (`enable_sort = off`), so that the page is always read from
    /// `jobs_queue` in its order, never by sorting every queued job (see
    /// `QUEUED_CANDIDATES` in `queue.rs`).
    queue_reads: PgPool,
    /// The `application_name` of this store's connections, unique to it: the words its
    /// changes send to other servers name it, so that its own feed passes over them
    /// (see `changes.rs`).
    origin: String,
    /// Claims, image records, finishes and failures, committed in batches.
    batcher: std::sync::Arc<batch::Batcher>,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`)
    /// and applies migrations (one process at a time: the migrator holds an advisory
    /// lock, so replicas starting together do not race).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)?;
        Self::connect_with(options).await
    }

    /// Connects with `options`, as [`PgStore::connect`].
    pub async fn connect_with(options: PgConnectOptions) -> StoreResult<Self> {
        let origin = changes::new_origin();
        let options = options.application_name(&origin);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await.map_err(StoreError::Migrate)?;
        let queue_reads = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(options.options([("enable_sort", "off")]));
        let batcher = std::sync::Arc::new(batch::Batcher::new(pool.clone()));
        Ok(PgStore {
            pool,
            queue_reads,
            origin,
            batcher,
        })
    }

    async fn write_tx(&self) -> StoreResult<Tx> {
        Ok(self.pool.begin().await?)
    }
}

type Tx = Transaction<'static, Postgres>;

/// The error of a batched call that got another call's kind of answer.
fn wrong_answer(call: &str) -> StoreError {
    StoreError::Conflict(format!(
        "the batch answered {call} with another call's answer"
    ))
}

/// Whether a database error is a unique constraint refusing a second row.
fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

fn parse_state(text: &str) -> StoreResult<JobState> {
    JobState::from_str(text).map_err(|err| StoreError::Conflict(err.to_string()))
}

/// Reads a count or size column, stored as a signed integer.
fn unsigned(row: &PgRow, name: &str) -> StoreResult<u64> {
    Ok(row.try_get::<i64, _>(name)?.max(0) as u64)
}

/// The columns of `jobs` that make a [`JobStatus`].
const JOB_COLUMNS: &str = "build, id, title, config_type, state, client_id, time_start, \
     time_complete, major_state, minor_state, percent, attempt, error, priority, assigned_to, \
     steps_done_at";

fn job_status_from_row(row: &PgRow) -> StoreResult<JobStatus> {
    Ok(JobStatus {
        build: row.try_get("build")?,
        id: row.try_get("id")?,
        title: row.try_get("title")?,
        config_type: row.try_get("config_type")?,
        state: parse_state(row.try_get("state")?)?,
        client_id: row.try_get("client_id")?,
        time_start: row.try_get("time_start")?,
        time_complete: row.try_get("time_complete")?,
        major_state: row.try_get("major_state")?,
        minor_state: row.try_get("minor_state")?,
        percent: row
            .try_get::<Option<i64>, _>("percent")?
            .map(|p| p.clamp(0, 100) as u8),
        eta_seconds: None,
        attempt: row.try_get::<i64, _>("attempt")? as u32,
        error: row.try_get("error")?,
        priority: row.try_get("priority")?,
        assigned_to: row.try_get("assigned_to")?,
        uploading_since: row.try_get("steps_done_at")?,
    })
}

/// The columns of `jobs` that make a [`JobRow`]: what the rules read.
const JOB_ROW_COLUMNS: &str = "build, id, timeout_secs, max_attempts, retries, \
     accept_within_secs, state, client_id, lease_token, lease_expires_at, attempt, \
     time_start, time_complete, steps_done, steps_done_at, major_state, minor_state, percent, \
     error, retries_used, leases_lost, accept_deadline";

fn job_row_from(row: &PgRow) -> StoreResult<JobRow> {
    Ok(JobRow {
        build: row.try_get("build")?,
        job: row.try_get("id")?,
        limits: JobLimits {
            timeout_secs: unsigned(row, "timeout_secs")?,
            max_attempts: unsigned(row, "max_attempts")? as u32,
            retries: unsigned(row, "retries")? as u32,
            accept_within_secs: row
                .try_get::<Option<i64>, _>("accept_within_secs")?
                .map(|secs| secs.max(0) as u64),
        },
        run: JobRun {
            state: parse_state(row.try_get("state")?)?,
            client_id: row.try_get("client_id")?,
            lease_token: row.try_get("lease_token")?,
            lease_expires_at: row.try_get("lease_expires_at")?,
            attempt: unsigned(row, "attempt")? as u32,
            time_start: row.try_get("time_start")?,
            time_complete: row.try_get("time_complete")?,
            steps_done: row.try_get("steps_done")?,
            steps_done_at: row.try_get("steps_done_at")?,
            major_state: row.try_get("major_state")?,
            minor_state: row.try_get("minor_state")?,
            percent: row.try_get("percent")?,
            error: row.try_get("error")?,
            retries_used: unsigned(row, "retries_used")? as u32,
            leases_lost: unsigned(row, "leases_lost")? as u32,
            accept_deadline: row.try_get("accept_deadline")?,
        },
    })
}

/// Reads and locks a job's row in the transaction; `None` when there is no such job.
async fn read_job_row(tx: &mut Tx, build: &str, job: &str) -> StoreResult<Option<JobRow>> {
    let query =
        format!("SELECT {JOB_ROW_COLUMNS} FROM jobs WHERE build = $1 AND id = $2 FOR UPDATE");
    let row = sqlx::query(&query)
        .bind(build)
        .bind(job)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(job_row_from).transpose()
}

/// Reads and locks a job's row; not found when there is no such job.
async fn job_row(tx: &mut Tx, build: &str, job: &str) -> StoreResult<JobRow> {
    read_job_row(tx, build, job)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))
}

/// Reads and locks a job's row and checks that `lease` is its current lease.
async fn leased_job_row(tx: &mut Tx, build: &str, job: &str, lease: &str) -> StoreResult<JobRow> {
    let row = job_row(tx, build, job).await?;
    rules::check_lease(&row, lease)?;
    Ok(row)
}

/// The event lock of the build named by parameter `$n` (`$1` when not said), as an
/// SQL expression: a transaction advisory lock.
macro_rules! event_lock {
    () => {
        event_lock!("$1")
    };
    ($build:literal) => {
        concat!(
            "pg_advisory_xact_lock(hashtextextended('kiln.events:' || ",
            $build,
            ", 0))"
        )
    };
}

/// The update of a job's run columns as the rules decided them (`$1` to `$16`), if
/// the job (build `$17`, id `$18`) is still in the state it was read in (`$19`).
macro_rules! run_update {
    () => {
        "UPDATE jobs SET state = $1, client_id = $2, lease_token = $3, lease_expires_at = $4, \
         attempt = $5, time_start = $6, time_complete = $7, steps_done = $8, major_state = $9, \
         minor_state = $10, percent = $11, error = $12, retries_used = $13, leases_lost = $14, \
         accept_deadline = $15, steps_done_at = $16 WHERE build = $17 AND id = $18 AND state = $19"
    };
}

/// [`run_update!`] with its parameters bound.
fn bind_run<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    read: &'q JobRow,
    run: &'q JobRun,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(run.state.as_str())
        .bind(&run.client_id)
        .bind(&run.lease_token)
        .bind(run.lease_expires_at)
        .bind(i64::from(run.attempt))
        .bind(run.time_start)
        .bind(run.time_complete)
        .bind(run.steps_done)
        .bind(&run.major_state)
        .bind(&run.minor_state)
        .bind(run.percent)
        .bind(&run.error)
        .bind(i64::from(run.retries_used))
        .bind(i64::from(run.leases_lost))
        .bind(run.accept_deadline)
        .bind(run.steps_done_at)
        .bind(&read.build)
        .bind(&read.job)
        .bind(read.run.state.as_str())
}

/// The error of a run's update that found the job no longer in the state it was read in.
fn moved_on(read: &JobRow) -> StoreError {
    StoreError::Conflict(format!(
        "job {}/{} is no longer {}",
        read.build, read.job, read.run.state
    ))
}

/// Writes a job's run columns as the rules decided them, if the job is still in the
/// state `read` has.
async fn write_run(tx: &mut Tx, read: &JobRow, run: &JobRun) -> StoreResult<()> {
    let done = bind_run(sqlx::query(run_update!()), read, run)
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() != 1 {
        return Err(moved_on(read));
    }
    Ok(())
}

/// Writes a transition the rules decided for the job `read`: its images if they go,
/// its client's count, then its run and its event in one statement (with the notices
/// it calls for).
async fn apply(tx: &mut Tx, read: &JobRow, transition: Transition, now: i64) -> StoreResult<Event> {
    if transition.drop_images {
        sqlx::query("DELETE FROM images WHERE build = $1 AND job = $2")
            .bind(&read.build)
            .bind(&read.job)
            .execute(&mut **tx)
            .await?;
    }
    // The client's row before the build's event lock: the order every transaction
    // takes them in (see the module's documentation), and the event last, so that the
    // lock every change of the build waits for is held for as little as can be. The
    // job's row is locked already, since it was read.
    if let Some((client_id, count)) = &transition.count {
        count_client(tx, client_id, *count, now).await?;
    }
    write_run_and_event(tx, read, &transition.run, transition.event).await
}

/// Writes a job's run (as [`write_run`]) and its event, held to the state machine's
/// arrows, in one round trip, then the notices the event calls for. The statement
/// takes the build's event lock only for an updated row, draws the event's number
/// after the lock is held, and reads the build's webhooks. A job no longer in the
/// state `read` has gets neither written, and the call fails as [`write_run`]'s does.
async fn write_run_and_event(
    tx: &mut Tx,
    read: &JobRow,
    run: &JobRun,
    draft: EventDraft,
) -> StoreResult<Event> {
    rules::check_transition(&read.build, &read.job, draft.from, draft.to)?;
    let query = concat!(
        "WITH run AS (",
        run_update!(),
        " RETURNING 1), locked AS (SELECT ",
        event_lock!("$17"),
        " FROM run), inserted AS (INSERT INTO events (seq, build, job, time, from_state, \
         to_state, client_id, attempt, reason) SELECT nextval('events_seq_seq'), $17, $18, \
         $20, $21, $22, $23, $24, $25 FROM locked RETURNING seq) \
         SELECT seq, (SELECT notify FROM builds WHERE number = $17) FROM inserted"
    );
    let written = bind_run(sqlx::query(query), read, run)
        .bind(draft.time)
        .bind(draft.from.map(JobState::as_str))
        .bind(draft.to.as_str())
        .bind(&draft.client_id)
        .bind(i64::from(draft.attempt))
        .bind(&draft.reason)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = written else {
        return Err(moved_on(read));
    };
    let (seq, notify): (i64, Option<String>) = (row.try_get(0)?, row.try_get(1)?);
    let event = draft.into_event(seq, &read.build, &read.job);
    let urls = webhooks(notify.as_deref());
    queue_notices(tx, &event, &urls, true).await?;
    Ok(event)
}

/// A build's webhook URLs, from its `notify` column (a JSON list).
fn webhooks(notify: Option<&str>) -> Vec<String> {
    notify
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default()
}

/// Counts a change in its client's history, in the transaction of the job's transition.
async fn count_client(
    tx: &mut Tx,
    client_id: &str,
    count: ClientCount,
    now: i64,
) -> StoreResult<()> {
    let mut query = match count {
        ClientCount::Finished { image_bytes } => sqlx::query(
            "UPDATE clients SET n_finished = n_finished + 1, image_bytes = image_bytes + $1, \
             last_contact = GREATEST(last_contact, $2) WHERE id = $3",
        )
        .bind(image_bytes as i64),
        ClientCount::Failed => sqlx::query(
            "UPDATE clients SET n_failed = n_failed + 1, \
             last_contact = GREATEST(last_contact, $1) WHERE id = $2",
        ),
        ClientCount::Lost => sqlx::query("UPDATE clients SET n_lost = n_lost + 1 WHERE id = $1"),
        ClientCount::ClaimGivenBack => {
            sqlx::query("UPDATE clients SET n_claimed = GREATEST(n_claimed - 1, 0) WHERE id = $1")
        }
    };
    if count.is_contact() {
        query = query.bind(now);
    }
    query.bind(client_id).execute(&mut **tx).await?;
    Ok(())
}

fn event_from_row(row: &PgRow) -> StoreResult<Event> {
    let from: Option<String> = row.try_get("from_state")?;
    Ok(Event {
        seq: row.try_get("seq")?,
        time: row.try_get("time")?,
        build: row.try_get("build")?,
        job: row.try_get("job")?,
        from: from.as_deref().map(parse_state).transpose()?,
        to: parse_state(row.try_get("to_state")?)?,
        client_id: row.try_get("client_id")?,
        attempt: row.try_get::<i64, _>("attempt")? as u32,
        reason: row.try_get("reason")?,
    })
}

/// Makes the transaction the only one writing events of `build` until it ends, so that
/// the build's event numbers commit in the order they were given out.
async fn lock_build_events(tx: &mut Tx, build: &str) -> StoreResult<()> {
    sqlx::query(concat!("SELECT ", event_lock!()))
        .bind(build)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Takes, for a transaction that changes the several jobs of `rows` (locked already, in
/// (build, pk) order), the rest of what their transitions lock, in the one order every
/// transaction takes it: their clients' rows, then their builds' event locks. Each
/// transition then counts its client and writes its event under locks already held.
async fn lock_for_changes_of(tx: &mut Tx, rows: &[JobRow]) -> StoreResult<()> {
    lock_clients_of(tx, rows).await?;
    lock_events_of(tx, rows).await
}

/// Takes the event locks of the builds of `rows`, in build order (the rows' order).
async fn lock_events_of(tx: &mut Tx, rows: &[JobRow]) -> StoreResult<()> {
    for (idx, row) in rows.iter().enumerate() {
        if idx == 0 || rows[idx - 1].build != row.build {
            lock_build_events(tx, &row.build).await?;
        }
    }
    Ok(())
}

/// Locks the rows of the clients of `rows`, in id order.
async fn lock_clients_of(tx: &mut Tx, rows: &[JobRow]) -> StoreResult<()> {
    let mut ids: Vec<&str> = rows
        .iter()
        .filter_map(|row| row.run.client_id.as_deref())
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    ids.sort_unstable();
    ids.dedup();
    sqlx::query("SELECT 1 FROM clients WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(&ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Whether build `$1` still has a job queued or running: one entry of `jobs_open`,
/// however large the build.
const OPEN_JOB_OF_BUILD: &str =
    "SELECT EXISTS (SELECT 1 FROM jobs WHERE build = $1 AND state IN ('queued', 'running'))";

/// Writes the webhook notices an event calls for into the outbox, in the event's
/// transaction (which holds the build's event lock) for each of the build's webhooks
/// `urls`: the job's end and, when it was the build's last job still queued or running,
/// the build's (if `may_end_build`: a batch of several of the build's events announces
/// the build's end with the last of them).
async fn queue_notices(
    tx: &mut Tx,
    event: &Event,
    urls: &[String],
    may_end_build: bool,
) -> StoreResult<()> {
    if urls.is_empty() || !rules::may_notify(event) {
        return Ok(());
    }
    let mut notices: Vec<_> = rules::job_notice(event).into_iter().collect();
    if !may_end_build {
        return write_notices(tx, event, &notices, urls).await;
    }
    let open: bool = sqlx::query_scalar(OPEN_JOB_OF_BUILD)
        .bind(&event.build)
        .fetch_one(&mut **tx)
        .await?;
    // Announce the build's end once per time it ends: not again for each job of a
    // batch that ends together, but again after a restart reopened it.
    let announced = !open && {
        let last_reopen: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(seq) FROM events WHERE build = $1 AND to_state = 'queued'",
        )
        .bind(&event.build)
        .fetch_one(&mut **tx)
        .await?;
        let done: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM notifications WHERE build = $1 AND kind = 'build_finished' \
             AND seq > $2 LIMIT 1",
        )
        .bind(&event.build)
        .bind(last_reopen.unwrap_or(0))
        .fetch_optional(&mut **tx)
        .await?;
        done.is_some()
    };
    if !open && !announced {
        let counts = sqlx::query(
            "SELECT COUNT(*) AS n_jobs, COUNT(*) FILTER (WHERE state = 'finished') AS n_finished \
             FROM jobs WHERE build = $1",
        )
        .bind(&event.build)
        .fetch_one(&mut **tx)
        .await?;
        notices.push(rules::build_end_notice(
            event,
            unsigned(&counts, "n_jobs")?,
            unsigned(&counts, "n_finished")?,
        ));
    }
    write_notices(tx, event, &notices, urls).await
}

/// Writes `notices` of `event` into the outbox, one row for each of `urls`.
async fn write_notices(
    tx: &mut Tx,
    event: &Event,
    notices: &[kiln_proto::api::Notice],
    urls: &[String],
) -> StoreResult<()> {
    for notice in notices {
        let body = serde_json::to_string(notice)
            .map_err(|err| StoreError::Conflict(format!("notice does not serialise: {err}")))?;
        for url in urls {
            sqlx::query(
                "INSERT INTO notifications (build, kind, seq, url, body, created_at, \
                 next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&event.build)
            .bind(&notice.event)
            .bind(notice.seq)
            .bind(url)
            .bind(&body)
            .bind(event.time)
            .bind(event.time)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}
