//! [`SqliteStore`]: the store on an embedded SQLite database.
//!
//! WAL mode, and SQLite called directly ([`db`]): reads on the caller's thread, and
//! every write a closure run on one writer thread inside a `BEGIN IMMEDIATE`
//! transaction, so that no two writes race on a snapshot. A change to a job reads its
//! row ([`read_job_row`]), asks [`crate::rules`], and writes what they decided
//! ([`apply`]) with one `UPDATE ... WHERE state = ?` conditional on the state it read:
//! a claim is that `UPDATE ... WHERE state = 'queued'`, and whoever loses gets nothing.
//!
//! One module per area of the store: `queue.rs` ([`crate::Queue`]), `logs.rs`,
//! `images.rs`, `packs.rs`, `outbox.rs`, `clients.rs`. This one opens the database and
//! holds what they share: reading and writing job rows, events and the notices they
//! call for, and the clients' counters. Migrations are in `migrations/sqlite/`, applied
//! by sqlx's migrator.

mod clients;
mod db;
mod images;
mod logs;
mod outbox;
mod packs;
mod queue;

use crate::rules::{self, ClientCount, EventDraft, JobLimits, JobRow, JobRun, Transition};
use crate::{StoreError, StoreResult};
use db::Db;
use kiln_proto::api::{Event, JobStatus};
use kiln_proto::state::JobState;
use rusqlite::{Connection, OptionalExtension, Row};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The store on SQLite.
#[derive(Clone)]
pub struct SqliteStore {
    /// The connections ([`db`]): reads on the caller's thread, writes on the writer
    /// thread.
    db: Arc<Db>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        // Migrations go through sqlx's migrator, which keeps their record in
        // `_sqlx_migrations` as every earlier release did; its one connection is closed
        // before the store's own are opened.
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let migrations = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        let migrated = MIGRATOR.run(&migrations).await.map_err(StoreError::Migrate);
        migrations.close().await;
        migrated?;
        Ok(SqliteStore {
            db: Db::open(path)?,
        })
    }
}

fn parse_state(text: &str) -> StoreResult<JobState> {
    JobState::from_str(text).map_err(|err| StoreError::Conflict(err.to_string()))
}

/// Reads a count or size column, stored as a signed integer.
fn unsigned(row: &Row, name: &str) -> StoreResult<u64> {
    Ok(row.get::<_, i64>(name)?.max(0) as u64)
}

/// The columns of `jobs` that make a [`JobStatus`].
const JOB_COLUMNS: &str = "build, id, title, config_type, state, client_id, time_start, \
     time_complete, major_state, minor_state, percent, attempt, error, priority, assigned_to, \
     steps_done_at";

fn job_status_from_row(row: &Row) -> StoreResult<JobStatus> {
    Ok(JobStatus {
        build: row.get("build")?,
        id: row.get("id")?,
        title: row.get("title")?,
        config_type: row.get("config_type")?,
        state: parse_state(&row.get::<_, String>("state")?)?,
        client_id: row.get("client_id")?,
        time_start: row.get("time_start")?,
        time_complete: row.get("time_complete")?,
        major_state: row.get("major_state")?,
        minor_state: row.get("minor_state")?,
        percent: row
            .get::<_, Option<i64>>("percent")?
            .map(|p| p.clamp(0, 100) as u8),
        eta_seconds: None,
        attempt: row.get::<_, i64>("attempt")? as u32,
        error: row.get("error")?,
        priority: row.get("priority")?,
        assigned_to: row.get("assigned_to")?,
        uploading_since: row.get("steps_done_at")?,
    })
}

/// The columns of `jobs` that make a [`JobRow`]: what the rules read.
const JOB_ROW_COLUMNS: &str = "build, id, timeout_secs, max_attempts, retries, \
     accept_within_secs, state, client_id, lease_token, lease_expires_at, attempt, \
     time_start, time_complete, steps_done, steps_done_at, major_state, minor_state, percent, \
     error, retries_used, leases_lost, accept_deadline";

fn job_row_from(row: &Row) -> StoreResult<JobRow> {
    Ok(JobRow {
        build: row.get("build")?,
        job: row.get("id")?,
        limits: JobLimits {
            timeout_secs: unsigned(row, "timeout_secs")?,
            max_attempts: unsigned(row, "max_attempts")? as u32,
            retries: unsigned(row, "retries")? as u32,
            accept_within_secs: row
                .get::<_, Option<i64>>("accept_within_secs")?
                .map(|secs| secs.max(0) as u64),
        },
        run: JobRun {
            state: parse_state(&row.get::<_, String>("state")?)?,
            client_id: row.get("client_id")?,
            lease_token: row.get("lease_token")?,
            lease_expires_at: row.get("lease_expires_at")?,
            attempt: unsigned(row, "attempt")? as u32,
            time_start: row.get("time_start")?,
            time_complete: row.get("time_complete")?,
            steps_done: row.get::<_, i64>("steps_done")? != 0,
            steps_done_at: row.get("steps_done_at")?,
            major_state: row.get("major_state")?,
            minor_state: row.get("minor_state")?,
            percent: row.get("percent")?,
            error: row.get("error")?,
            retries_used: unsigned(row, "retries_used")? as u32,
            leases_lost: unsigned(row, "leases_lost")? as u32,
            accept_deadline: row.get("accept_deadline")?,
        },
    })
}

/// Runs `query` with `params` and maps each row with `map`.
fn collect<T>(
    conn: &Connection,
    query: &str,
    params: impl rusqlite::Params,
    mut map: impl FnMut(&Row) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut statement = conn.prepare_cached(query)?;
    let mut rows = statement.query(params)?;
    let mut all = Vec::new();
    while let Some(row) = rows.next()? {
        all.push(map(row)?);
    }
    Ok(all)
}

/// Runs `query` with `params` and maps its first row with `map`, if it has one.
fn first<T>(
    conn: &Connection,
    query: &str,
    params: impl rusqlite::Params,
    map: impl FnOnce(&Row) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut statement = conn.prepare_cached(query)?;
    let mut rows = statement.query(params)?;
    match rows.next()? {
        Some(row) => Ok(Some(map(row)?)),
        None => Ok(None),
    }
}

/// Runs a statement with `params`; the number of rows it changed.
fn run(conn: &Connection, query: &str, params: impl rusqlite::Params) -> StoreResult<usize> {
    Ok(conn.prepare_cached(query)?.execute(params)?)
}

/// Reads one value: the first column of the first row (`None` without a row).
fn scalar<T: rusqlite::types::FromSql>(
    conn: &Connection,
    query: &str,
    params: impl rusqlite::Params,
) -> StoreResult<Option<T>> {
    Ok(conn
        .prepare_cached(query)?
        .query_row(params, |row| row.get::<_, T>(0))
        .optional()?)
}

/// Reads a job's row; `None` when there is no such job.
fn read_job_row(conn: &Connection, build: &str, job: &str) -> StoreResult<Option<JobRow>> {
    first(
        conn,
        &format!("SELECT {JOB_ROW_COLUMNS} FROM jobs WHERE build = ? AND id = ?"),
        (build, job),
        job_row_from,
    )
}

/// Reads a job's row; not found when there is no such job.
fn job_row(conn: &Connection, build: &str, job: &str) -> StoreResult<JobRow> {
    read_job_row(conn, build, job)?
        .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))
}

/// Reads a job's row and checks that `lease` is its current lease.
fn leased_job_row(conn: &Connection, build: &str, job: &str, lease: &str) -> StoreResult<JobRow> {
    let row = job_row(conn, build, job)?;
    rules::check_lease(&row, lease)?;
    Ok(row)
}

/// Writes a job's run columns as the rules decided them, if the job is still in the
/// state `read` has (in a write it always is: the condition makes each write safe on
/// its own).
fn write_run(conn: &Connection, read: &JobRow, run_: &JobRun) -> StoreResult<()> {
    let changed = run(
        conn,
        "UPDATE jobs SET state = ?, client_id = ?, lease_token = ?, lease_expires_at = ?, \
         attempt = ?, time_start = ?, time_complete = ?, steps_done = ?, major_state = ?, \
         minor_state = ?, percent = ?, error = ?, retries_used = ?, leases_lost = ?, \
         accept_deadline = ?, steps_done_at = ? WHERE build = ? AND id = ? AND state = ?",
        rusqlite::params![
            run_.state.as_str(),
            run_.client_id,
            run_.lease_token,
            run_.lease_expires_at,
            i64::from(run_.attempt),
            run_.time_start,
            run_.time_complete,
            run_.steps_done,
            run_.major_state,
            run_.minor_state,
            run_.percent,
            run_.error,
            i64::from(run_.retries_used),
            i64::from(run_.leases_lost),
            run_.accept_deadline,
            run_.steps_done_at,
            read.build,
            read.job,
            read.run.state.as_str(),
        ],
    )?;
    if changed != 1 {
        return Err(StoreError::Conflict(format!(
            "job {}/{} is no longer {}",
            read.build, read.job, read.run.state
        )));
    }
    Ok(())
}

/// Writes a transition the rules decided for the job `read`: its run, its images if
/// they go, its client's count, and its event (with the notices it calls for).
fn apply(conn: &Connection, read: &JobRow, transition: Transition, now: i64) -> StoreResult<Event> {
    write_run(conn, read, &transition.run)?;
    if transition.drop_images {
        run(
            conn,
            "DELETE FROM images WHERE build = ? AND job = ?",
            (&read.build, &read.job),
        )?;
    }
    if let Some((client_id, count)) = &transition.count {
        count_client(conn, client_id, *count, now)?;
    }
    insert_event(conn, &read.build, &read.job, transition.event)
}

/// Counts a change in its client's history, in the transaction of the job's
/// transition. Every client holding a job has a row: claims write it, and the migration
/// that made the table wrote one for the holders of jobs claimed before.
fn count_client(
    conn: &Connection,
    client_id: &str,
    count: ClientCount,
    now: i64,
) -> StoreResult<()> {
    let contact = count.is_contact().then_some(now);
    // `MAX(last_contact, NULL)` is NULL in SQLite, hence the COALESCE for the counts
    // that are no contact.
    let (counter, image_bytes) = match count {
        ClientCount::Finished { image_bytes } => (
            "n_finished = n_finished + 1, image_bytes = image_bytes + ?1",
            image_bytes as i64,
        ),
        ClientCount::Failed => ("n_failed = n_failed + 1", 0),
        ClientCount::Lost => ("n_lost = n_lost + 1", 0),
        ClientCount::ClaimGivenBack => ("n_claimed = MAX(n_claimed - 1, 0)", 0),
    };
    let query = format!(
        "UPDATE clients SET {counter}, \
         last_contact = COALESCE(MAX(last_contact, ?2), last_contact) WHERE id = ?3"
    );
    run(
        conn,
        &query,
        rusqlite::params![image_bytes, contact, client_id],
    )?;
    Ok(())
}

fn event_from_row(row: &Row) -> StoreResult<Event> {
    let from: Option<String> = row.get("from_state")?;
    Ok(Event {
        seq: row.get("seq")?,
        time: row.get("time")?,
        build: row.get("build")?,
        job: row.get("job")?,
        from: from.as_deref().map(parse_state).transpose()?,
        to: parse_state(&row.get::<_, String>("to_state")?)?,
        client_id: row.get("client_id")?,
        attempt: row.get::<_, i64>("attempt")? as u32,
        reason: row.get("reason")?,
    })
}

/// Writes an event, held to the state machine's arrows, and the notices it calls for.
fn insert_event(
    conn: &Connection,
    build: &str,
    job: &str,
    draft: EventDraft,
) -> StoreResult<Event> {
    rules::check_transition(build, job, draft.from, draft.to)?;
    let seq: i64 = conn
        .prepare_cached(
            "INSERT INTO events (build, job, time, from_state, to_state, client_id, attempt, \
             reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        )?
        .query_row(
            rusqlite::params![
                build,
                job,
                draft.time,
                draft.from.map(JobState::as_str),
                draft.to.as_str(),
                draft.client_id,
                i64::from(draft.attempt),
                draft.reason,
            ],
            |row| row.get(0),
        )?;
    let event = draft.into_event(seq, build, job);
    queue_notices(conn, &event)?;
    Ok(event)
}

/// One job of a build still queued or running, if any: one entry of the `jobs_open`
/// index, however large the build (a count read every job of it, at every job's end).
const OPEN_JOB_OF_BUILD: &str =
    "SELECT 1 FROM jobs WHERE build = ? AND state IN ('queued', 'running') LIMIT 1";

/// Writes the webhook notices an event calls for into the outbox, in the event's
/// transaction: the job's end and, when it was the build's last job still queued or
/// running, the build's.
fn queue_notices(conn: &Connection, event: &Event) -> StoreResult<()> {
    if !rules::may_notify(event) {
        return Ok(());
    }
    let notify: Option<String> = scalar::<Option<String>>(
        conn,
        "SELECT notify FROM builds WHERE number = ?",
        [&event.build],
    )?
    .flatten();
    let urls: Vec<String> = notify
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    if urls.is_empty() {
        return Ok(());
    }
    let mut notices: Vec<_> = rules::job_notice(event).into_iter().collect();
    let open = scalar::<i64>(conn, OPEN_JOB_OF_BUILD, [&event.build])?.is_some();
    // Announce the build's end once per time it ends: not again for each job of a
    // batch that ends together, but again after a restart reopened it.
    let announced = !open && {
        let last_reopen: Option<i64> = scalar::<Option<i64>>(
            conn,
            "SELECT MAX(seq) FROM events WHERE build = ? AND to_state = 'queued'",
            [&event.build],
        )?
        .flatten();
        let done: Option<i64> = scalar(
            conn,
            "SELECT 1 FROM notifications WHERE build = ? AND kind = 'build_finished' \
             AND seq > ? LIMIT 1",
            rusqlite::params![event.build, last_reopen.unwrap_or(0)],
        )?;
        done.is_some()
    };
    if !open && !announced {
        let (n_jobs, n_finished) = first(
            conn,
            "SELECT COUNT(*) AS n_jobs, COALESCE(SUM(state = 'finished'), 0) AS n_finished \
             FROM jobs WHERE build = ?",
            [&event.build],
            |row| Ok((unsigned(row, "n_jobs")?, unsigned(row, "n_finished")?)),
        )?
        .unwrap_or((0, 0));
        notices.push(rules::build_end_notice(event, n_jobs, n_finished));
    }
    for notice in &notices {
        let body = serde_json::to_string(notice)
            .map_err(|err| StoreError::Conflict(format!("notice does not serialise: {err}")))?;
        for url in &urls {
            run(
                conn,
                "INSERT INTO notifications (build, kind, seq, url, body, created_at, \
                 next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rusqlite::params![
                    event.build,
                    notice.event,
                    notice.seq,
                    url,
                    body,
                    event.time,
                    event.time
                ],
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The steps of SQLite's plan for `query` (with `params`), in a new store.
    async fn plan(query: &'static str, params: &'static [&'static str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("kiln.db"))
            .await
            .unwrap();
        store
            .db
            .read(|conn| {
                let mut statement = conn.prepare(&format!("EXPLAIN QUERY PLAN {query}"))?;
                let details = statement.query_map(rusqlite::params_from_iter(params), |row| {
                    row.get::<_, String>(3)
                })?;
                Ok(details.collect::<Result<Vec<_>, _>>()?)
            })
            .unwrap()
    }

    #[tokio::test]
    async fn whether_a_build_has_an_open_job_is_read_from_the_open_jobs_index() {
        assert_eq!(
            plan(OPEN_JOB_OF_BUILD, &["b1"]).await,
            ["SEARCH jobs USING INDEX jobs_open (build=?)"]
        );
    }

    #[tokio::test]
    async fn a_urls_oldest_pending_notice_is_read_from_the_pending_notices_index() {
        let steps = plan(outbox::DUE, &["0", "64"]).await;
        assert!(
            steps.contains(&"SEARCH o USING INDEX notifications_pending (url=?)".to_owned()),
            "{steps:?}"
        );
    }
}
