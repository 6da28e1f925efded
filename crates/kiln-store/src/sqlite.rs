//! [`SqliteStore`]: the job store on an embedded SQLite database.
//!
//! WAL mode, a busy timeout, and every read-modify-write in a `BEGIN IMMEDIATE`
//! transaction so that two writers never race on a snapshot. A claim is one
//! conditional `UPDATE ... WHERE state = 'queued'`: whoever loses gets nothing.

use crate::{
    BuildRecord, Candidate, ClaimedJob, ClaimingClient, ClientCredential, CredentialPut,
    CredentialWrite, DeletedBuild, Failure, ImageRecord, ImageTotals, JobStore, LeaseHolder,
    LegacyImage, LoadCounts, LogAppend, NewBuild, NewImage, Notification, StoreError, StoreResult,
    TimedTransition,
};
use async_trait::async_trait;
use kiln_proto::api::{
    BuildSummary, ClientInfo, Event, HeldJob, ImageInfo, JobStatus, LogLine, NewLogLine, Notice,
};
use kiln_proto::manifest::BuildManifest;
use kiln_proto::progress::Progress;
use kiln_proto::state::JobState;
use rand::RngCore;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The columns of `jobs` that make a [`JobStatus`].
const JOB_COLUMNS: &str = "build, id, title, config_type, state, client_id, time_start, \
     time_complete, major_state, minor_state, percent, attempt, error, priority, assigned_to";

/// The job store on SQLite.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a state change is on disk before it is acknowledged (invariant 3).
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await.map_err(StoreError::Migrate)?;
        Ok(SqliteStore { pool })
    }

    async fn write_tx(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn new_lease_token() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn parse_state(text: &str) -> StoreResult<JobState> {
    JobState::from_str(text).map_err(|err| StoreError::Conflict(err.to_string()))
}

fn job_status_from_row(row: &SqliteRow) -> StoreResult<JobStatus> {
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
    })
}

fn event_from_row(row: &SqliteRow) -> StoreResult<Event> {
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

/// The parts of an event that the transaction knows; `seq` comes from the insert.
struct NewEvent<'a> {
    build: &'a str,
    job: &'a str,
    time: i64,
    from: Option<JobState>,
    to: JobState,
    client_id: Option<&'a str>,
    attempt: u32,
    reason: Option<&'a str>,
}

async fn insert_event(
    tx: &mut Transaction<'static, Sqlite>,
    event: NewEvent<'_>,
) -> StoreResult<Event> {
    // The state machine's arrows are written once, in kiln-proto; every transition the
    // store makes passes through here and is checked against them.
    if let Some(from) = event.from {
        if !from.can_become(event.to) {
            return Err(StoreError::Conflict(format!(
                "job {}/{} cannot go from {from} to {}",
                event.build, event.job, event.to
            )));
        }
    }
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO events (build, job, time, from_state, to_state, client_id, attempt, reason) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
    )
    .bind(event.build)
    .bind(event.job)
    .bind(event.time)
    .bind(event.from.map(JobState::as_str))
    .bind(event.to.as_str())
    .bind(event.client_id)
    .bind(event.attempt as i64)
    .bind(event.reason)
    .fetch_one(&mut **tx)
    .await?;
    let event = Event {
        seq,
        time: event.time,
        build: event.build.to_owned(),
        job: event.job.to_owned(),
        from: event.from,
        to: event.to,
        client_id: event.client_id.map(str::to_owned),
        attempt: event.attempt,
        reason: event.reason.map(str::to_owned),
    };
    queue_notices(tx, &event).await?;
    Ok(event)
}

/// Writes the webhook notices an event calls for into the outbox, in the event's
/// transaction: the job's end (finished, failed, expired) and, when it was the build's
/// last job still queued or running, the build's.
async fn queue_notices(tx: &mut Transaction<'static, Sqlite>, event: &Event) -> StoreResult<()> {
    // A cancelled job has no notice of its own, but may be what ends its build.
    let kind = match event.to {
        JobState::Finished => Some("job_finished"),
        JobState::Failed => Some("job_failed"),
        JobState::Expired => Some("job_expired"),
        JobState::Cancelled => None,
        JobState::Queued | JobState::Running => return Ok(()),
    };
    let notify: Option<String> = sqlx::query_scalar("SELECT notify FROM builds WHERE number = ?")
        .bind(&event.build)
        .fetch_optional(&mut **tx)
        .await?;
    let urls: Vec<String> = notify
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    if urls.is_empty() {
        return Ok(());
    }
    let mut notices: Vec<Notice> = kind
        .map(|kind| Notice {
            event: kind.to_owned(),
            build: event.build.clone(),
            job: Some(event.job.clone()),
            client_id: event.client_id.clone(),
            reason: event.reason.clone(),
            time: kiln_proto::format_rfc3339(event.time),
            seq: event.seq,
        })
        .into_iter()
        .collect();
    let n_open: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM jobs WHERE build = ? AND state IN ('queued', 'running')",
    )
    .bind(&event.build)
    .fetch_one(&mut **tx)
    .await?;
    // Announce the build's end once per time it ends: not again for each job of a
    // batch that ends together, but again after a restart reopened it.
    let announced = n_open == 0
        && {
            let last_reopen: Option<i64> = sqlx::query_scalar(
                "SELECT MAX(seq) FROM events WHERE build = ? AND to_state = 'queued'",
            )
            .bind(&event.build)
            .fetch_one(&mut **tx)
            .await?;
            let done: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM notifications WHERE build = ? AND kind = 'build_finished' AND seq > ? LIMIT 1",
        )
        .bind(&event.build)
        .bind(last_reopen.unwrap_or(0))
        .fetch_optional(&mut **tx)
        .await?;
            done.is_some()
        };
    if n_open == 0 && !announced {
        let counts = sqlx::query(
            "SELECT COUNT(*) AS n_jobs, COALESCE(SUM(state = 'finished'), 0) AS n_finished \
             FROM jobs WHERE build = ?",
        )
        .bind(&event.build)
        .fetch_one(&mut **tx)
        .await?;
        let n_jobs: i64 = counts.try_get("n_jobs")?;
        let n_finished: i64 = counts.try_get("n_finished")?;
        notices.push(Notice {
            event: "build_finished".to_owned(),
            build: event.build.clone(),
            job: None,
            client_id: None,
            reason: Some(format!("{n_finished} of {n_jobs} jobs finished")),
            time: kiln_proto::format_rfc3339(event.time),
            seq: event.seq,
        });
    }
    for notice in &notices {
        let body = serde_json::to_string(notice)
            .map_err(|err| StoreError::Conflict(format!("notice does not serialise: {err}")))?;
        for url in &urls {
            sqlx::query(
                "INSERT INTO notifications (build, kind, seq, url, body, created_at, next_attempt_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
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

/// The lease-relevant part of a job row, read inside a transaction.
struct JobLease {
    state: JobState,
    lease_token: Option<String>,
    client_id: Option<String>,
    attempt: u32,
    time_start: Option<i64>,
    timeout_secs: u64,
    retries: u32,
    retries_used: u32,
}

async fn read_job_lease(
    tx: &mut Transaction<'static, Sqlite>,
    build: &str,
    job: &str,
) -> StoreResult<JobLease> {
    let row = sqlx::query(
        "SELECT state, lease_token, client_id, attempt, time_start, timeout_secs, retries, \
         retries_used FROM jobs WHERE build = ? AND id = ?",
    )
    .bind(build)
    .bind(job)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))?;
    Ok(JobLease {
        state: parse_state(row.try_get("state")?)?,
        lease_token: row.try_get("lease_token")?,
        client_id: row.try_get("client_id")?,
        attempt: row.try_get::<i64, _>("attempt")? as u32,
        time_start: row.try_get("time_start")?,
        timeout_secs: row.try_get::<i64, _>("timeout_secs")? as u64,
        retries: row.try_get::<i64, _>("retries")? as u32,
        retries_used: row.try_get::<i64, _>("retries_used")? as u32,
    })
}

/// Reads the job and checks that `lease` is its current lease.
async fn current_lease(
    tx: &mut Transaction<'static, Sqlite>,
    build: &str,
    job: &str,
    lease: &str,
) -> StoreResult<JobLease> {
    let row = read_job_lease(tx, build, job).await?;
    if row.state != JobState::Running || row.lease_token.as_deref() != Some(lease) {
        return Err(StoreError::StaleLease {
            build: build.to_owned(),
            job: job.to_owned(),
        });
    }
    Ok(row)
}

impl JobLease {
    fn holder(&self) -> LeaseHolder {
        LeaseHolder {
            client_id: self.client_id.clone().unwrap_or_default(),
            attempt: self.attempt,
            time_start: self.time_start.unwrap_or_default(),
            timeout_secs: self.timeout_secs,
        }
    }
}

/// Columns reset when a job goes back to the queue.
const RESET_RUN: &str =
    "client_id = NULL, lease_token = NULL, lease_expires_at = NULL, time_start = NULL, \
     steps_done = 0, major_state = NULL, minor_state = NULL, percent = NULL";

/// Why a running job is taken from its client.
enum TakeBack<'a> {
    /// The client is gone (lease lapsed, connection lost, gave the job up): the job
    /// goes back to the queue, or fails as `lost` once MAXATTEMPTS runs were lost.
    LeaseLost(&'a str),
    /// The client keeps heartbeating but held the job past its timeout and grace.
    Hung,
}

/// Takes a running job from its client and writes the event.
async fn take_back(
    tx: &mut Transaction<'static, Sqlite>,
    build: &str,
    job: &str,
    why: TakeBack<'_>,
    now: i64,
) -> StoreResult<Event> {
    let row = sqlx::query(
        "SELECT client_id, attempt, max_attempts, leases_lost FROM jobs \
         WHERE build = ? AND id = ? AND state = 'running'",
    )
    .bind(build)
    .bind(job)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| StoreError::Conflict(format!("job {build}/{job} is not running")))?;
    let client_id: Option<String> = row.try_get("client_id")?;
    let attempt = row.try_get::<i64, _>("attempt")? as u32;
    let max_attempts = row.try_get::<i64, _>("max_attempts")? as u32;
    // Script failures retried at the manifest's request are not lost runs: only runs
    // taken back here count against MAXATTEMPTS.
    let leases_lost = row.try_get::<i64, _>("leases_lost")? as u32 + 1;
    count_run_end(tx, client_id.as_deref(), RunEnd::Lost, now).await?;
    let (to, reason) = match why {
        TakeBack::Hung => (
            JobState::Failed,
            "timeout: held past its timeout by a client that did not stop it".to_owned(),
        ),
        TakeBack::LeaseLost(cause) if leases_lost >= max_attempts => (
            JobState::Failed,
            format!(
                "lost: {cause} on attempt {attempt}; {leases_lost} of {max_attempts} attempts lost"
            ),
        ),
        TakeBack::LeaseLost(cause) => (JobState::Queued, cause.to_owned()),
    };
    if to == JobState::Queued {
        let query = format!(
            "UPDATE jobs SET state = 'queued', {RESET_RUN}, leases_lost = leases_lost + 1 \
             WHERE build = ? AND id = ?"
        );
        sqlx::query(&query)
            .bind(build)
            .bind(job)
            .execute(&mut **tx)
            .await?;
    } else {
        sqlx::query(
            "UPDATE jobs SET state = 'failed', lease_token = NULL, lease_expires_at = NULL, \
             leases_lost = ?, time_complete = ?, error = ? WHERE build = ? AND id = ?",
        )
        .bind(leases_lost as i64)
        .bind(now)
        .bind(&reason)
        .bind(build)
        .bind(job)
        .execute(&mut **tx)
        .await?;
    }
    insert_event(
        tx,
        NewEvent {
            build,
            job,
            time: now,
            from: Some(JobState::Running),
            to,
            client_id: client_id.as_deref(),
            attempt,
            reason: Some(&reason),
        },
    )
    .await
}

/// What the end of a run adds to its client's history.
enum RunEnd {
    /// The client finished the job; its images total this many bytes.
    Finished { image_bytes: i64 },
    /// The client reported the job failed (queued again for a retry or not).
    Failed,
    /// The job was taken from the client: lease lapsed, session dropped, given back
    /// after a restart or stop, or held past its timeout.
    Lost,
}

/// Counts the end of a run in its client's history, in the transaction of the job's
/// transition. A run the client reported the end of is also a contact with it. Every
/// client holding a job has a row: claims write it, and the migration that made the
/// table wrote one for the holders of jobs claimed before.
async fn count_run_end(
    tx: &mut Transaction<'static, Sqlite>,
    client_id: Option<&str>,
    end: RunEnd,
    now: i64,
) -> StoreResult<()> {
    let Some(client_id) = client_id else {
        return Ok(());
    };
    let query = match end {
        RunEnd::Finished { image_bytes } => sqlx::query(
            "UPDATE clients SET n_finished = n_finished + 1, image_bytes = image_bytes + ?, \
             last_contact = MAX(last_contact, ?) WHERE id = ?",
        )
        .bind(image_bytes)
        .bind(now),
        RunEnd::Failed => sqlx::query(
            "UPDATE clients SET n_failed = n_failed + 1, last_contact = MAX(last_contact, ?) \
             WHERE id = ?",
        )
        .bind(now),
        RunEnd::Lost => sqlx::query("UPDATE clients SET n_lost = n_lost + 1 WHERE id = ?"),
    };
    query.bind(client_id).execute(&mut **tx).await?;
    Ok(())
}

async fn insert_log_line(
    tx: &mut Transaction<'static, Sqlite>,
    build: &str,
    job: &str,
    attempt: u32,
    now: i64,
    stream: &str,
    text: &str,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO log_lines (build, job, attempt, time, stream, text) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(build)
    .bind(job)
    .bind(attempt as i64)
    .bind(now)
    .bind(stream)
    .bind(text)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Sets the progress columns from a progress report (keeping what it does not name).
async fn record_progress(
    tx: &mut Transaction<'static, Sqlite>,
    build: &str,
    job: &str,
    progress: &Progress,
) -> StoreResult<()> {
    sqlx::query(
        // A new major state starts its minor state afresh; otherwise what the report
        // does not name is kept.
        "UPDATE jobs SET major_state = COALESCE(?1, major_state), \
         minor_state = CASE WHEN ?1 IS NOT NULL THEN ?2 ELSE COALESCE(?2, minor_state) END, \
         percent = COALESCE(?3, percent) WHERE build = ?4 AND id = ?5",
    )
    .bind(progress.major.as_deref())
    .bind(progress.minor.as_deref())
    .bind(progress.percent.map(i64::from))
    .bind(build)
    .bind(job)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn summary_from_row(row: &SqliteRow) -> StoreResult<BuildSummary> {
    let count = |name: &str| -> StoreResult<u32> { Ok(row.try_get::<i64, _>(name)? as u32) };
    Ok(BuildSummary {
        number: row.try_get("number")?,
        title: row.try_get("title")?,
        build_time: row.try_get("build_time")?,
        submitted_at: row.try_get("submitted_at")?,
        n_jobs: count("n_jobs")?,
        n_queued: count("n_queued")?,
        n_running: count("n_running")?,
        n_finished: count("n_finished")?,
        n_failed: count("n_failed")?,
        n_expired: count("n_expired")?,
        n_cancelled: count("n_cancelled")?,
    })
}

const SUMMARY_QUERY: &str = "SELECT b.number, b.title, b.build_time, b.submitted_at, \
     COUNT(j.pk) AS n_jobs, \
     COALESCE(SUM(j.state = 'queued'), 0) AS n_queued, \
     COALESCE(SUM(j.state = 'running'), 0) AS n_running, \
     COALESCE(SUM(j.state = 'finished'), 0) AS n_finished, \
     COALESCE(SUM(j.state = 'failed'), 0) AS n_failed, \
     COALESCE(SUM(j.state = 'expired'), 0) AS n_expired, \
     COALESCE(SUM(j.state = 'cancelled'), 0) AS n_cancelled \
     FROM builds b LEFT JOIN jobs j ON j.build = b.number";

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert_build(&self, build: &NewBuild) -> StoreResult<()> {
        let manifest = &build.manifest;
        let mut tx = self.write_tx().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM builds WHERE number = ?")
            .bind(&manifest.number)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(StoreError::DuplicateBuild(manifest.number.clone()));
        }
        let manifest_json = serde_json::to_string(manifest)
            .map_err(|err| StoreError::Conflict(format!("manifest does not serialise: {err}")))?;
        let notify_json = serde_json::to_string(&manifest.notify).map_err(|err| {
            StoreError::Conflict(format!("notify list does not serialise: {err}"))
        })?;
        sqlx::query(
            "INSERT INTO builds (number, title, build_time, log_file, notify, manifest, files_key, \
             files_size, submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&manifest.number)
        .bind(&manifest.title)
        .bind(&manifest.build_time)
        .bind(&manifest.log_file)
        .bind(notify_json)
        .bind(manifest_json)
        .bind(&build.files_key)
        .bind(build.files_size as i64)
        .bind(build.submitted_at)
        .execute(&mut *tx)
        .await?;
        for spec in &manifest.jobs {
            let accept_within = spec.accept_within_secs.or(build.default_accept_within_secs);
            let accept_deadline =
                accept_within.map(|secs| build.submitted_at + secs as i64 * 1_000_000);
            sqlx::query(
                "INSERT INTO jobs (build, id, title, config_type, install_script, configure_script, \
                 image_script, timeout_secs, priority, accept_within_secs, accept_deadline, \
                 assigned_to, max_attempts, retries, state) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
            )
            .bind(&manifest.number)
            .bind(&spec.id)
            .bind(&spec.title)
            .bind(&spec.config_type)
            .bind(&spec.install_script)
            .bind(&spec.configure_script)
            .bind(&spec.image_script)
            .bind(spec.timeout_secs as i64)
            .bind(spec.priority.unwrap_or(0))
            .bind(accept_within.map(|secs| secs as i64))
            .bind(accept_deadline)
            .bind(&spec.assigned_to)
            .bind(spec.max_attempts.unwrap_or(build.default_max_attempts).max(1) as i64)
            .bind(spec.retries.unwrap_or(0) as i64)
            .execute(&mut *tx)
            .await?;
            insert_event(
                &mut tx,
                NewEvent {
                    build: &manifest.number,
                    job: &spec.id,
                    time: build.submitted_at,
                    from: None,
                    to: JobState::Queued,
                    client_id: None,
                    attempt: 0,
                    reason: Some("submitted"),
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_builds(&self) -> StoreResult<Vec<BuildSummary>> {
        let query =
            format!("{SUMMARY_QUERY} GROUP BY b.number ORDER BY b.submitted_at DESC, b.rowid DESC");
        let rows = sqlx::query(&query).fetch_all(&self.pool).await?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn build_summary(&self, number: &str) -> StoreResult<BuildSummary> {
        let query = format!("{SUMMARY_QUERY} WHERE b.number = ? GROUP BY b.number");
        let row = sqlx::query(&query)
            .bind(number)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("build {number}")))?;
        summary_from_row(&row)
    }

    async fn get_build(&self, number: &str) -> StoreResult<BuildRecord> {
        let row = sqlx::query(
            "SELECT manifest, files_key, files_size, submitted_at FROM builds WHERE number = ?",
        )
        .bind(number)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("build {number}")))?;
        let manifest: String = row.try_get("manifest")?;
        let manifest: BuildManifest = serde_json::from_str(&manifest).map_err(|err| {
            StoreError::Conflict(format!(
                "stored manifest of build {number} is unreadable: {err}"
            ))
        })?;
        Ok(BuildRecord {
            manifest,
            files_key: row.try_get("files_key")?,
            files_size: row.try_get::<i64, _>("files_size")? as u64,
            submitted_at: row.try_get("submitted_at")?,
        })
    }

    async fn list_jobs(&self, build: &str) -> StoreResult<Vec<JobStatus>> {
        let query = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE build = ? ORDER BY pk");
        let rows = sqlx::query(&query)
            .bind(build)
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() {
            // Tell "no such build" from "a build without jobs" (which cannot be submitted).
            self.build_summary(build).await?;
        }
        rows.iter().map(job_status_from_row).collect()
    }

    async fn get_job(&self, build: &str, job: &str) -> StoreResult<JobStatus> {
        let query = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE build = ? AND id = ?");
        let row = sqlx::query(&query)
            .bind(build)
            .bind(job)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))?;
        job_status_from_row(&row)
    }

    async fn queued_candidates(&self, limit: u32) -> StoreResult<Vec<Candidate>> {
        let rows = sqlx::query(
            "SELECT j.build, j.id, j.config_type, j.assigned_to, j.priority, b.submitted_at \
             FROM jobs j JOIN builds b ON b.number = j.build WHERE j.state = 'queued' \
             ORDER BY j.priority DESC, j.accept_deadline IS NULL, j.accept_deadline, j.pk LIMIT ?",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Candidate {
                    build: row.try_get("build")?,
                    job: row.try_get("id")?,
                    config_type: row.try_get("config_type")?,
                    assigned_to: row.try_get("assigned_to")?,
                    priority: row.try_get("priority")?,
                    submitted_at: row.try_get("submitted_at")?,
                })
            })
            .collect()
    }

    async fn claim(
        &self,
        build: &str,
        job: &str,
        client: &ClaimingClient,
        lease_until: i64,
        now: i64,
    ) -> StoreResult<Option<ClaimedJob>> {
        let client_id = client.id.as_str();
        let lease = new_lease_token();
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(
            "UPDATE jobs SET state = 'running', client_id = ?, lease_token = ?, \
             lease_expires_at = ?, attempt = attempt + 1, time_start = ?, time_complete = NULL, steps_done = 0, \
             major_state = NULL, minor_state = NULL, percent = NULL, error = NULL \
             WHERE build = ? AND id = ? AND state = 'queued' \
             RETURNING title, config_type, install_script, configure_script, image_script, \
             timeout_secs, attempt",
        )
        .bind(client_id)
        .bind(&lease)
        .bind(lease_until)
        .bind(now)
        .bind(build)
        .bind(job)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let claimed = ClaimedJob {
            build: build.to_owned(),
            job: job.to_owned(),
            title: row.try_get("title")?,
            config_type: row.try_get("config_type")?,
            install_script: row.try_get("install_script")?,
            configure_script: row.try_get("configure_script")?,
            image_script: row.try_get("image_script")?,
            timeout_secs: row.try_get::<i64, _>("timeout_secs")? as u64,
            attempt: row.try_get::<i64, _>("attempt")? as u32,
            lease,
        };
        insert_event(
            &mut tx,
            NewEvent {
                build,
                job,
                time: now,
                from: Some(JobState::Queued),
                to: JobState::Running,
                client_id: Some(client_id),
                attempt: claimed.attempt,
                reason: Some("claimed"),
            },
        )
        .await?;
        // What a client says of itself may change from one claim to the next (an older
        // client says nothing of its slots or version): the latest claim is the truth.
        sqlx::query(
            "INSERT INTO clients (id, include, slots, version, address, first_seen, \
             last_contact, n_claimed) VALUES (?, ?, ?, ?, ?, ?, ?, 1) \
             ON CONFLICT (id) DO UPDATE SET include = excluded.include, \
             slots = excluded.slots, version = excluded.version, \
             address = COALESCE(excluded.address, clients.address), \
             last_contact = MAX(clients.last_contact, excluded.last_contact), \
             n_claimed = clients.n_claimed + 1",
        )
        .bind(client_id)
        .bind(client.include.join(","))
        .bind(client.slots.map(i64::from))
        .bind(&client.version)
        .bind(&client.address)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(claimed))
    }

    async fn release(&self, build: &str, job: &str, lease: &str, now: i64) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        let row = current_lease(&mut tx, build, job, lease).await?;
        let query = format!(
            "UPDATE jobs SET state = 'queued', {RESET_RUN}, attempt = attempt - 1 \
             WHERE build = ? AND id = ?"
        );
        sqlx::query(&query)
            .bind(build)
            .bind(job)
            .execute(&mut *tx)
            .await?;
        insert_event(
            &mut tx,
            NewEvent {
                build,
                job,
                time: now,
                from: Some(JobState::Running),
                to: JobState::Queued,
                client_id: row.client_id.as_deref(),
                attempt: row.attempt.saturating_sub(1),
                reason: Some("released unstarted by its client"),
            },
        )
        .await?;
        // The run never started: like the attempt, the claim is not counted.
        sqlx::query("UPDATE clients SET n_claimed = MAX(n_claimed - 1, 0) WHERE id = ?")
            .bind(row.client_id.as_deref())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        lease_until: i64,
        progress: Option<&Progress>,
    ) -> StoreResult<LeaseHolder> {
        let mut tx = self.write_tx().await?;
        let row = current_lease(&mut tx, build, job, lease).await?;
        sqlx::query("UPDATE jobs SET lease_expires_at = MAX(COALESCE(lease_expires_at, 0), ?) WHERE build = ? AND id = ?")
            .bind(lease_until)
            .bind(build)
            .bind(job)
            .execute(&mut *tx)
            .await?;
        if let Some(progress) = progress {
            record_progress(&mut tx, build, job, progress).await?;
        }
        tx.commit().await?;
        Ok(row.holder())
    }

    async fn mark_steps_done(&self, build: &str, job: &str, lease: &str) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        current_lease(&mut tx, build, job, lease).await?;
        sqlx::query("UPDATE jobs SET steps_done = 1 WHERE build = ? AND id = ?")
            .bind(build)
            .bind(job)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn check_lease(&self, build: &str, job: &str, lease: &str) -> StoreResult<LeaseHolder> {
        // A read transaction is enough: the caller acts on the answer under a later
        // write that checks the lease again.
        let mut tx = self.pool.begin().await?;
        let row = current_lease(&mut tx, build, job, lease).await?;
        tx.rollback().await?;
        Ok(row.holder())
    }

    async fn append_log(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        lines: &[NewLogLine],
        progress: Option<&Progress>,
        now: i64,
    ) -> StoreResult<LeaseHolder> {
        let appended = self
            .append_log_within(build, job, lease, lines, progress, now, u64::MAX, "")
            .await?;
        Ok(appended.holder)
    }

    async fn append_log_within(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        lines: &[NewLogLine],
        progress: Option<&Progress>,
        now: i64,
        max_bytes: u64,
        cut_notice: &str,
    ) -> StoreResult<LogAppend> {
        let mut tx = self.write_tx().await?;
        let row = current_lease(&mut tx, build, job, lease).await?;
        let (log_bytes, was_cut): (i64, bool) =
            sqlx::query_as("SELECT log_bytes, log_cut FROM jobs WHERE build = ? AND id = ?")
                .bind(build)
                .bind(job)
                .fetch_one(&mut *tx)
                .await?;
        let mut log_bytes = log_bytes.max(0) as u64;
        let mut n_stored = 0;
        let mut cut = was_cut;
        if !was_cut {
            for line in lines {
                let len = line.text.len() as u64;
                if log_bytes.saturating_add(len) > max_bytes {
                    cut = true;
                    break;
                }
                insert_log_line(
                    &mut tx,
                    build,
                    job,
                    row.attempt,
                    now,
                    &line.stream,
                    &line.text,
                )
                .await?;
                log_bytes += len;
                n_stored += 1;
            }
            if cut {
                insert_log_line(&mut tx, build, job, row.attempt, now, "kiln", cut_notice).await?;
            }
            if n_stored > 0 || cut {
                sqlx::query(
                    "UPDATE jobs SET log_bytes = ?, log_cut = ? WHERE build = ? AND id = ?",
                )
                .bind(log_bytes as i64)
                .bind(cut)
                .bind(build)
                .bind(job)
                .execute(&mut *tx)
                .await?;
            }
        }
        if let Some(progress) = progress {
            record_progress(&mut tx, build, job, progress).await?;
        }
        tx.commit().await?;
        Ok(LogAppend {
            holder: row.holder(),
            n_stored,
            cut,
            cut_now: cut && !was_cut,
        })
    }

    async fn read_log(
        &self,
        build: &str,
        job: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<LogLine>> {
        let rows = sqlx::query(
            "SELECT seq, time, attempt, stream, text FROM log_lines \
             WHERE build = ? AND job = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(build)
        .bind(job)
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(LogLine {
                    seq: row.try_get("seq")?,
                    time: row.try_get("time")?,
                    attempt: row.try_get::<i64, _>("attempt")? as u32,
                    stream: row.try_get("stream")?,
                    text: row.try_get("text")?,
                })
            })
            .collect()
    }

    async fn add_image(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        image: &NewImage,
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        current_lease(&mut tx, build, job, lease).await?;
        sqlx::query(
            "INSERT OR REPLACE INTO images (build, job, name, lease_token, size, blake3, sha256, \
             blob_key, created_at, chunk_list) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
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
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn finish(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        images: &[String],
        now: i64,
    ) -> StoreResult<Event> {
        // The lease first: a caller that does not hold the job learns nothing else.
        let mut tx = self.write_tx().await?;
        let row = current_lease(&mut tx, build, job, lease).await?;
        if images.is_empty() {
            return Err(StoreError::Conflict(format!(
                "cannot finish job {build}/{job}: a finished job has at least one image"
            )));
        }
        // Images of earlier attempts were uploaded under leases that are gone: drop them,
        // so that only what this lease stored is the job's output (invariant 4).
        sqlx::query("DELETE FROM images WHERE build = ? AND job = ? AND lease_token != ?")
            .bind(build)
            .bind(job)
            .bind(lease)
            .execute(&mut *tx)
            .await?;
        let stored: Vec<String> =
            sqlx::query_scalar("SELECT name FROM images WHERE build = ? AND job = ?")
                .bind(build)
                .bind(job)
                .fetch_all(&mut *tx)
                .await?;
        let missing: Vec<&String> = images
            .iter()
            .filter(|name| !stored.contains(name))
            .collect();
        if !missing.is_empty() {
            return Err(StoreError::Conflict(format!(
                "cannot finish job {build}/{job}: images not stored: {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let unnamed: Vec<&String> = stored
            .iter()
            .filter(|name| !images.contains(name))
            .collect();
        for name in unnamed {
            sqlx::query("DELETE FROM images WHERE build = ? AND job = ? AND name = ?")
                .bind(build)
                .bind(job)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        let image_bytes: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(size), 0) FROM images WHERE build = ? AND job = ?",
        )
        .bind(build)
        .bind(job)
        .fetch_one(&mut *tx)
        .await?;
        count_run_end(
            &mut tx,
            row.client_id.as_deref(),
            RunEnd::Finished { image_bytes },
            now,
        )
        .await?;
        let query =
            "UPDATE jobs SET state = 'finished', lease_token = NULL, lease_expires_at = NULL, \
             time_complete = ?, percent = 100, error = NULL WHERE build = ? AND id = ?";
        sqlx::query(query)
            .bind(now)
            .bind(build)
            .bind(job)
            .execute(&mut *tx)
            .await?;
        let event = insert_event(
            &mut tx,
            NewEvent {
                build,
                job,
                time: now,
                from: Some(JobState::Running),
                to: JobState::Finished,
                client_id: row.client_id.as_deref(),
                attempt: row.attempt,
                reason: Some("images stored and verified"),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn fail(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        failure: &Failure,
        now: i64,
    ) -> StoreResult<Event> {
        let mut tx = self.write_tx().await?;
        let row = current_lease(&mut tx, build, job, lease).await?;
        let error = format!("{}: {}", failure.reason, failure.message);
        count_run_end(&mut tx, row.client_id.as_deref(), RunEnd::Failed, now).await?;
        let retry = row.retries_used < row.retries;
        let to = if retry {
            JobState::Queued
        } else {
            JobState::Failed
        };
        if retry {
            let query = format!(
                "UPDATE jobs SET state = 'queued', {RESET_RUN}, retries_used = retries_used + 1, \
                 error = ? WHERE build = ? AND id = ?"
            );
            sqlx::query(&query)
                .bind(&error)
                .bind(build)
                .bind(job)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE jobs SET state = 'failed', lease_token = NULL, lease_expires_at = NULL, \
                 time_complete = ?, error = ? WHERE build = ? AND id = ?",
            )
            .bind(now)
            .bind(&error)
            .bind(build)
            .bind(job)
            .execute(&mut *tx)
            .await?;
        }
        let reason = if retry {
            format!(
                "{} (retry {} of {})",
                failure.reason,
                row.retries_used + 1,
                row.retries
            )
        } else {
            failure.reason.clone()
        };
        let event = insert_event(
            &mut tx,
            NewEvent {
                build,
                job,
                time: now,
                from: Some(JobState::Running),
                to,
                client_id: row.client_id.as_deref(),
                attempt: row.attempt,
                reason: Some(&reason),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn reap_leases(
        &self,
        now: i64,
        hung_grace_secs: u64,
    ) -> StoreResult<Vec<TimedTransition>> {
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query(
            "SELECT build, id, lease_expires_at FROM jobs WHERE state = 'running' \
             AND (lease_expires_at < ? \
             OR (steps_done = 0 AND time_start + (timeout_secs + ?) * 1000000 < ?))",
        )
        .bind(now)
        .bind(hung_grace_secs as i64)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut transitions = Vec::with_capacity(rows.len());
        for row in rows {
            let build: String = row.try_get("build")?;
            let job: String = row.try_get("id")?;
            let lease_expires_at: Option<i64> = row.try_get("lease_expires_at")?;
            let why = if lease_expires_at.is_some_and(|at| at < now) {
                TakeBack::LeaseLost("lease lapsed")
            } else {
                TakeBack::Hung
            };
            let event = take_back(&mut tx, &build, &job, why, now).await?;
            transitions.push(TimedTransition { build, job, event });
        }
        tx.commit().await?;
        Ok(transitions)
    }

    async fn give_up(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        reason: &str,
        now: i64,
    ) -> StoreResult<Event> {
        let mut tx = self.write_tx().await?;
        current_lease(&mut tx, build, job, lease).await?;
        let event = take_back(&mut tx, build, job, TakeBack::LeaseLost(reason), now).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn take_back_from_client(
        &self,
        client_id: &str,
        reason: &str,
        now: i64,
    ) -> StoreResult<Vec<TimedTransition>> {
        let mut tx = self.write_tx().await?;
        let rows =
            sqlx::query("SELECT build, id FROM jobs WHERE state = 'running' AND client_id = ?")
                .bind(client_id)
                .fetch_all(&mut *tx)
                .await?;
        let mut transitions = Vec::with_capacity(rows.len());
        for row in rows {
            let build: String = row.try_get("build")?;
            let job: String = row.try_get("id")?;
            let event = take_back(&mut tx, &build, &job, TakeBack::LeaseLost(reason), now).await?;
            transitions.push(TimedTransition { build, job, event });
        }
        tx.commit().await?;
        Ok(transitions)
    }

    async fn expire_unclaimed(&self, now: i64) -> StoreResult<Vec<TimedTransition>> {
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query(
            "SELECT build, id, accept_within_secs FROM jobs \
             WHERE state = 'queued' AND attempt = 0 AND accept_deadline < ? ORDER BY pk",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut transitions = Vec::with_capacity(rows.len());
        for row in rows {
            let build: String = row.try_get("build")?;
            let job: String = row.try_get("id")?;
            let within: Option<i64> = row.try_get("accept_within_secs")?;
            // One job at a time, each with its event, so that the build's end is seen
            // (and announced) at the last of them.
            sqlx::query(
                "UPDATE jobs SET state = 'expired', time_complete = ?, \
                 error = 'expired: no client accepted it within ' || accept_within_secs || ' s' \
                 WHERE build = ? AND id = ?",
            )
            .bind(now)
            .bind(&build)
            .bind(&job)
            .execute(&mut *tx)
            .await?;
            let reason = format!(
                "no client accepted it within {} s",
                within.unwrap_or_default()
            );
            let event = insert_event(
                &mut tx,
                NewEvent {
                    build: &build,
                    job: &job,
                    time: now,
                    from: Some(JobState::Queued),
                    to: JobState::Expired,
                    client_id: None,
                    attempt: 0,
                    reason: Some(&reason),
                },
            )
            .await?;
            transitions.push(TimedTransition { build, job, event });
        }
        tx.commit().await?;
        Ok(transitions)
    }

    async fn next_deadline(&self) -> StoreResult<Option<i64>> {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(t) FROM (\
             SELECT MIN(lease_expires_at) AS t FROM jobs WHERE state = 'running' \
             UNION ALL SELECT MIN(accept_deadline) FROM jobs WHERE state = 'queued' AND attempt = 0)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(next)
    }

    async fn extend_all_leases(&self, until: i64) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at = ? WHERE state = 'running' AND lease_expires_at < ?",
        )
        .bind(until)
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn restart(&self, build: &str, job: &str, now: i64) -> StoreResult<Event> {
        let mut tx = self.write_tx().await?;
        let row = read_job_lease(&mut tx, build, job).await?;
        if row.state == JobState::Queued {
            return Err(StoreError::Conflict(format!(
                "job {build}/{job} is already queued"
            )));
        }
        let query = format!(
            "UPDATE jobs SET state = 'queued', {RESET_RUN}, attempt = 0, retries_used = 0, \
             leases_lost = 0, time_complete = NULL, error = NULL, \
             accept_deadline = CASE WHEN accept_within_secs IS NULL THEN NULL \
             ELSE ? + accept_within_secs * 1000000 END \
             WHERE build = ? AND id = ?"
        );
        sqlx::query(&query)
            .bind(now)
            .bind(build)
            .bind(job)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM images WHERE build = ? AND job = ?")
            .bind(build)
            .bind(job)
            .execute(&mut *tx)
            .await?;
        let event = insert_event(
            &mut tx,
            NewEvent {
                build,
                job,
                time: now,
                from: Some(row.state),
                to: JobState::Queued,
                client_id: row.client_id.as_deref(),
                attempt: 0,
                reason: Some("restarted by an operator"),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn cancel(&self, build: &str, job: &str, now: i64) -> StoreResult<Event> {
        let mut tx = self.write_tx().await?;
        let row = read_job_lease(&mut tx, build, job).await?;
        if row.state.is_final() {
            return Err(StoreError::Conflict(format!(
                "job {build}/{job} is already {}; only queued or running jobs can be cancelled",
                row.state
            )));
        }
        sqlx::query(
            "UPDATE jobs SET state = 'cancelled', lease_token = NULL, lease_expires_at = NULL, \
             time_complete = ?, error = 'cancelled by an operator' WHERE build = ? AND id = ?",
        )
        .bind(now)
        .bind(build)
        .bind(job)
        .execute(&mut *tx)
        .await?;
        let event = insert_event(
            &mut tx,
            NewEvent {
                build,
                job,
                time: now,
                from: Some(row.state),
                to: JobState::Cancelled,
                client_id: row.client_id.as_deref(),
                attempt: row.attempt,
                reason: Some("cancelled by an operator"),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn events(&self, build: &str, after: i64) -> StoreResult<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, time, build, job, from_state, to_state, client_id, attempt, reason \
             FROM events WHERE build = ? AND seq > ? ORDER BY seq",
        )
        .bind(build)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn list_images(&self, build: &str) -> StoreResult<Vec<ImageInfo>> {
        let rows = sqlx::query(
            "SELECT i.build, i.job, j.config_type, i.name, i.size, i.blake3, i.sha256, i.created_at \
             FROM images i JOIN jobs j ON j.build = i.build AND j.id = i.job \
             WHERE i.build = ? AND j.state = 'finished' ORDER BY j.pk, i.name",
        )
        .bind(build)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(image_info_from_row).collect()
    }

    async fn get_image(&self, build: &str, job: &str, name: &str) -> StoreResult<ImageRecord> {
        let row = sqlx::query(
            "SELECT i.build, i.job, j.config_type, i.name, i.size, i.blake3, i.sha256, i.created_at, \
             i.blob_key, i.chunk_list FROM images i JOIN jobs j ON j.build = i.build AND j.id = i.job \
             WHERE i.build = ? AND i.job = ? AND i.name = ? AND j.state = 'finished'",
        )
        .bind(build)
        .bind(job)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("image {name} of job {build}/{job}")))?;
        Ok(ImageRecord {
            info: image_info_from_row(&row)?,
            blob_key: row.try_get("blob_key")?,
            chunk_list: row.try_get("chunk_list")?,
        })
    }

    async fn due_notifications(&self, now: i64, limit: u32) -> StoreResult<Vec<Notification>> {
        let rows = sqlx::query(
            // Every pending notice of a URL whose oldest pending notice is due: a URL
            // gets its notices in order, and later ones wait while an earlier one is
            // being retried.
            "SELECT id, build, url, body, attempts FROM notifications n \
             WHERE delivered_at IS NULL AND gave_up_at IS NULL \
             AND (SELECT o.next_attempt_at FROM notifications o WHERE o.url = n.url \
                  AND o.delivered_at IS NULL AND o.gave_up_at IS NULL ORDER BY o.id LIMIT 1) <= ? \
             ORDER BY id LIMIT ?",
        )
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Notification {
                    id: row.try_get("id")?,
                    build: row.try_get("build")?,
                    url: row.try_get("url")?,
                    body: row.try_get("body")?,
                    attempts: row.try_get::<i64, _>("attempts")? as u32,
                })
            })
            .collect()
    }

    async fn notification_delivered(&self, id: i64, now: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE notifications SET delivered_at = ?, attempts = attempts + 1 WHERE id = ?",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn notification_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: Option<i64>,
        now: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE notifications SET attempts = attempts + 1, last_error = ?, \
             next_attempt_at = COALESCE(?, next_attempt_at), \
             gave_up_at = CASE WHEN ? IS NULL THEN ? ELSE NULL END WHERE id = ?",
        )
        .bind(error)
        .bind(retry_at)
        .bind(retry_at)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mean_run_secs(&self, config_type: &str) -> StoreResult<Option<f64>> {
        let mean: Option<f64> = sqlx::query_scalar(
            "SELECT AVG((time_complete - time_start) / 1000000.0) FROM jobs \
             WHERE config_type = ? AND state = 'finished' AND time_start IS NOT NULL",
        )
        .bind(config_type)
        .fetch_one(&self.pool)
        .await?;
        Ok(mean)
    }

    async fn legacy_images(&self) -> StoreResult<Vec<LegacyImage>> {
        let rows = sqlx::query(
            "SELECT build, job, name, blob_key FROM images WHERE chunk_list IS NULL \
             ORDER BY build, job, name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(LegacyImage {
                    build: row.try_get("build")?,
                    job: row.try_get("job")?,
                    name: row.try_get("name")?,
                    blob_key: row.try_get("blob_key")?,
                })
            })
            .collect()
    }

    async fn set_chunk_list(
        &self,
        build: &str,
        job: &str,
        name: &str,
        chunk_list: &[u8],
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE images SET chunk_list = ? WHERE build = ? AND job = ? AND name = ?")
            .bind(chunk_list)
            .bind(build)
            .bind(job)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn chunk_lists(&self) -> StoreResult<Vec<Vec<u8>>> {
        let rows = sqlx::query("SELECT chunk_list FROM images WHERE chunk_list IS NOT NULL")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok(row.try_get::<Vec<u8>, _>("chunk_list")?))
            .collect()
    }

    async fn delete_build(&self, build: &str) -> StoreResult<DeletedBuild> {
        let mut tx = self.write_tx().await?;
        let files_key: String = sqlx::query_scalar("SELECT files_key FROM builds WHERE number = ?")
            .bind(build)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("build {build}")))?;
        let running: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE build = ? AND state = 'running' ORDER BY pk",
        )
        .bind(build)
        .fetch_all(&mut *tx)
        .await?;
        if !running.is_empty() {
            return Err(StoreError::Conflict(format!(
                "build {build} has {} running job(s): {}; cancel them first",
                running.len(),
                running.join(", ")
            )));
        }
        let images = sqlx::query("DELETE FROM images WHERE build = ?")
            .bind(build)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        for table in ["log_lines", "events", "notifications"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE build = ?"))
                .bind(build)
                .execute(&mut *tx)
                .await?;
        }
        let jobs = sqlx::query("DELETE FROM jobs WHERE build = ?")
            .bind(build)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM builds WHERE number = ?")
            .bind(build)
            .execute(&mut *tx)
            .await?;
        let files_key_shared: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM builds WHERE files_key = ?)")
                .bind(&files_key)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(DeletedBuild {
            jobs,
            images,
            files_key,
            files_key_shared,
        })
    }

    async fn files_key_in_use(&self, key: &str) -> StoreResult<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM builds WHERE files_key = ?)")
                .bind(key)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn add_counters(&self, deltas: &[(&str, i64)]) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        for (name, delta) in deltas {
            sqlx::query(
                "INSERT INTO counters (name, value) VALUES (?, ?) \
                 ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            )
            .bind(name)
            .bind(delta)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_counters(&self, values: &[(&str, i64)]) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        for (name, value) in values {
            sqlx::query(
                "INSERT INTO counters (name, value) VALUES (?, ?) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(name)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn counters(&self) -> StoreResult<std::collections::BTreeMap<String, i64>> {
        let rows = sqlx::query("SELECT name, value FROM counters")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("name")?, row.try_get("value")?)))
            .collect()
    }

    async fn image_totals(&self) -> StoreResult<ImageTotals> {
        let row = sqlx::query("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM images")
            .fetch_one(&self.pool)
            .await?;
        Ok(ImageTotals {
            images: row.try_get::<i64, _>("n")? as u64,
            bytes: row.try_get::<i64, _>("bytes")? as u64,
        })
    }

    async fn load_counts(&self) -> StoreResult<LoadCounts> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM builds) AS builds, \
             (SELECT COUNT(*) FROM jobs WHERE state = 'queued') AS queued, \
             (SELECT COUNT(*) FROM jobs WHERE state = 'running') AS running",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(LoadCounts {
            builds: row.try_get::<i64, _>("builds")? as u64,
            queued: row.try_get::<i64, _>("queued")? as u64,
            running: row.try_get::<i64, _>("running")? as u64,
        })
    }

    async fn touch_client(&self, id: &str, address: Option<&str>, now: i64) -> StoreResult<bool> {
        // One statement, atomic on its own: no BEGIN IMMEDIATE round trip for a write
        // that comes every few seconds from every client.
        let done = sqlx::query(
            "UPDATE clients SET last_contact = MAX(last_contact, ?), \
             address = COALESCE(?, address) WHERE id = ?",
        )
        .bind(now)
        .bind(address)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn clients(&self) -> StoreResult<Vec<ClientInfo>> {
        // One read transaction: the held jobs and the counters are of the same moment.
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, include, slots, version, address, first_seen, last_contact, n_claimed, \
             n_finished, n_failed, n_lost, image_bytes FROM clients ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let held_rows = sqlx::query(
            "SELECT client_id, build, id, percent, major_state FROM jobs \
             WHERE state = 'running' AND client_id IS NOT NULL ORDER BY pk",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        let mut held: std::collections::HashMap<String, Vec<HeldJob>> =
            std::collections::HashMap::new();
        for row in &held_rows {
            held.entry(row.try_get("client_id")?)
                .or_default()
                .push(HeldJob {
                    build: row.try_get("build")?,
                    job: row.try_get("id")?,
                    percent: row
                        .try_get::<Option<i64>, _>("percent")?
                        .map(|p| p.clamp(0, 100) as u8),
                    major: row.try_get("major_state")?,
                });
        }
        let count = |row: &SqliteRow, name: &str| -> StoreResult<u64> {
            Ok(row.try_get::<i64, _>(name)?.max(0) as u64)
        };
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let include: String = row.try_get("include")?;
                Ok(ClientInfo {
                    held: held.remove(&id).unwrap_or_default(),
                    include: include
                        .split(',')
                        .filter(|entry| !entry.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    slots: row
                        .try_get::<Option<i64>, _>("slots")?
                        .map(|slots| slots.clamp(0, i64::from(u32::MAX)) as u32),
                    version: row.try_get("version")?,
                    address: row.try_get("address")?,
                    first_seen: row.try_get("first_seen")?,
                    last_contact: row.try_get("last_contact")?,
                    session_open: false,
                    n_claimed: count(row, "n_claimed")?,
                    n_finished: count(row, "n_finished")?,
                    n_failed: count(row, "n_failed")?,
                    n_lost: count(row, "n_lost")?,
                    image_bytes: count(row, "image_bytes")?,
                    id,
                })
            })
            .collect()
    }

    async fn client_credential(&self, id: &str) -> StoreResult<Option<ClientCredential>> {
        let row = sqlx::query(
            "SELECT client_id, secret_hash, origin, created_at, revoked_at \
             FROM client_credentials WHERE client_id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(credential_of).transpose()
    }

    async fn client_credentials(&self) -> StoreResult<Vec<ClientCredential>> {
        let rows = sqlx::query(
            "SELECT client_id, secret_hash, origin, created_at, revoked_at \
             FROM client_credentials ORDER BY client_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(credential_of).collect()
    }

    async fn put_client_credential(
        &self,
        id: &str,
        secret_hash: &str,
        how: CredentialWrite,
        now: i64,
    ) -> StoreResult<CredentialPut> {
        let mut tx = self.write_tx().await?;
        let existing: Option<Option<i64>> =
            sqlx::query_scalar("SELECT revoked_at FROM client_credentials WHERE client_id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let (origin, put) = match (how, existing) {
            (CredentialWrite::Enroll, Some(Some(_))) => return Ok(CredentialPut::Revoked),
            (CredentialWrite::Enroll, Some(None)) => return Ok(CredentialPut::Exists),
            (CredentialWrite::Enroll, None) => ("enrolled", CredentialPut::Created),
            (CredentialWrite::Issue, None) => ("issued", CredentialPut::Created),
            (CredentialWrite::Issue, Some(_)) => ("issued", CredentialPut::Replaced),
        };
        sqlx::query(
            "INSERT INTO client_credentials (client_id, secret_hash, origin, created_at) \
             VALUES (?, ?, ?, ?) ON CONFLICT (client_id) DO UPDATE SET \
             secret_hash = excluded.secret_hash, origin = excluded.origin, \
             created_at = excluded.created_at, revoked_at = NULL",
        )
        .bind(id)
        .bind(secret_hash)
        .bind(origin)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(put)
    }

    async fn revoke_client_credential(&self, id: &str, now: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE client_credentials SET revoked_at = ? \
             WHERE client_id = ? AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}

fn image_info_from_row(row: &SqliteRow) -> StoreResult<ImageInfo> {
    Ok(ImageInfo {
        build: row.try_get("build")?,
        job_id: row.try_get("job")?,
        config_type: row.try_get("config_type")?,
        name: row.try_get("name")?,
        size: row.try_get::<i64, _>("size")? as u64,
        blake3: row.try_get("blake3")?,
        sha256: row.try_get("sha256")?,
        created_at: row.try_get("created_at")?,
    })
}
fn credential_of(row: &SqliteRow) -> StoreResult<ClientCredential> {
    Ok(ClientCredential {
        client_id: row.try_get("client_id")?,
        secret_hash: row.try_get("secret_hash")?,
        origin: row.try_get("origin")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}
