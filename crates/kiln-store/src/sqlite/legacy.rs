//! The sqlx helpers of the modules not yet moved to [`super::db`]: reading and writing
//! job rows, events and notices in a sqlx transaction.

use crate::rules::{self, ClientCount, EventDraft, JobLimits, JobRow, JobRun, Transition};
use crate::{StoreError, StoreResult};
use kiln_proto::api::{Event, JobStatus};
use kiln_proto::state::JobState;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};
use std::str::FromStr;

pub(super) type Tx = Transaction<'static, Sqlite>;

pub(super) fn parse_state(text: &str) -> StoreResult<JobState> {
    JobState::from_str(text).map_err(|err| StoreError::Conflict(err.to_string()))
}

/// Reads a count or size column, stored as a signed integer.
pub(super) fn unsigned(row: &SqliteRow, name: &str) -> StoreResult<u64> {
    Ok(row.try_get::<i64, _>(name)?.max(0) as u64)
}

/// The columns of `jobs` that make a [`JobStatus`].
pub(super) const JOB_COLUMNS: &str = "build, id, title, config_type, state, client_id, time_start, \
     time_complete, major_state, minor_state, percent, attempt, error, priority, assigned_to, \
     steps_done_at";

pub(super) fn job_status_from_row(row: &SqliteRow) -> StoreResult<JobStatus> {
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
pub(super) const JOB_ROW_COLUMNS: &str = "build, id, timeout_secs, max_attempts, retries, \
     accept_within_secs, state, client_id, lease_token, lease_expires_at, attempt, \
     time_start, time_complete, steps_done, steps_done_at, major_state, minor_state, percent, \
     error, retries_used, leases_lost, accept_deadline";

pub(super) fn job_row_from(row: &SqliteRow) -> StoreResult<JobRow> {
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
            steps_done: row.try_get::<i64, _>("steps_done")? != 0,
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

/// Reads a job's row (in a transaction, or on the pool for a read alone); `None` when
/// there is no such job.
pub(super) async fn read_job_row<'c>(
    executor: impl sqlx::SqliteExecutor<'c>,
    build: &str,
    job: &str,
) -> StoreResult<Option<JobRow>> {
    let query = format!("SELECT {JOB_ROW_COLUMNS} FROM jobs WHERE build = ? AND id = ?");
    let row = sqlx::query(&query)
        .bind(build)
        .bind(job)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(job_row_from).transpose()
}

/// Reads a job's row; not found when there is no such job.
pub(super) async fn job_row<'c>(
    executor: impl sqlx::SqliteExecutor<'c>,
    build: &str,
    job: &str,
) -> StoreResult<JobRow> {
    read_job_row(executor, build, job)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))
}

/// Reads a job's row and checks that `lease` is its current lease.
pub(super) async fn leased_job_row<'c>(
    executor: impl sqlx::SqliteExecutor<'c>,
    build: &str,
    job: &str,
    lease: &str,
) -> StoreResult<JobRow> {
    let row = job_row(executor, build, job).await?;
    rules::check_lease(&row, lease)?;
    Ok(row)
}

/// Writes a job's run columns as the rules decided them, if the job is still in the
/// state `read` has (in a write transaction it always is: the condition makes each write
/// safe on its own).
pub(super) async fn write_run(tx: &mut Tx, read: &JobRow, run: &JobRun) -> StoreResult<()> {
    let done = sqlx::query(
        "UPDATE jobs SET state = ?, client_id = ?, lease_token = ?, lease_expires_at = ?, \
         attempt = ?, time_start = ?, time_complete = ?, steps_done = ?, major_state = ?, \
         minor_state = ?, percent = ?, error = ?, retries_used = ?, leases_lost = ?, \
         accept_deadline = ?, steps_done_at = ? WHERE build = ? AND id = ? AND state = ?",
    )
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
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(StoreError::Conflict(format!(
            "job {}/{} is no longer {}",
            read.build, read.job, read.run.state
        )));
    }
    Ok(())
}

/// Writes a transition the rules decided for the job `read`: its run, its images if
/// they go, its client's count, and its event (with the notices it calls for).
pub(super) async fn apply(tx: &mut Tx, read: &JobRow, transition: Transition, now: i64) -> StoreResult<Event> {
    write_run(tx, read, &transition.run).await?;
    if transition.drop_images {
        sqlx::query("DELETE FROM images WHERE build = ? AND job = ?")
            .bind(&read.build)
            .bind(&read.job)
            .execute(&mut **tx)
            .await?;
    }
    if let Some((client_id, count)) = &transition.count {
        count_client(tx, client_id, *count, now).await?;
    }
    insert_event(tx, &read.build, &read.job, transition.event).await
}

/// Counts a change in its client's history, in the transaction of the job's
/// transition. Every client holding a job has a row: claims write it, and the migration
/// that made the table wrote one for the holders of jobs claimed before.
pub(super) async fn count_client(
    tx: &mut Tx,
    client_id: &str,
    count: ClientCount,
    now: i64,
) -> StoreResult<()> {
    let (counter, image_bytes) = match count {
        ClientCount::Finished { image_bytes } => (
            "n_finished = n_finished + 1, image_bytes = image_bytes + ?",
            Some(image_bytes as i64),
        ),
        ClientCount::Failed => ("n_failed = n_failed + 1", None),
        ClientCount::Lost => ("n_lost = n_lost + 1", None),
        ClientCount::ClaimGivenBack => ("n_claimed = MAX(n_claimed - 1, 0)", None),
    };
    let contact = if count.is_contact() {
        ", last_contact = MAX(last_contact, ?)"
    } else {
        ""
    };
    let query = format!("UPDATE clients SET {counter}{contact} WHERE id = ?");
    let mut query = sqlx::query(&query);
    if let Some(image_bytes) = image_bytes {
        query = query.bind(image_bytes);
    }
    if count.is_contact() {
        query = query.bind(now);
    }
    query.bind(client_id).execute(&mut **tx).await?;
    Ok(())
}

pub(super) fn event_from_row(row: &SqliteRow) -> StoreResult<Event> {
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

/// Writes an event, held to the state machine's arrows, and the notices it calls for.
pub(super) async fn insert_event(
    tx: &mut Tx,
    build: &str,
    job: &str,
    draft: EventDraft,
) -> StoreResult<Event> {
    rules::check_transition(build, job, draft.from, draft.to)?;
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO events (build, job, time, from_state, to_state, client_id, attempt, reason) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
    )
    .bind(build)
    .bind(job)
    .bind(draft.time)
    .bind(draft.from.map(JobState::as_str))
    .bind(draft.to.as_str())
    .bind(&draft.client_id)
    .bind(i64::from(draft.attempt))
    .bind(&draft.reason)
    .fetch_one(&mut **tx)
    .await?;
    let event = draft.into_event(seq, build, job);
    queue_notices(tx, &event).await?;
    Ok(event)
}

/// Writes the webhook notices an event calls for into the outbox, in the event's
/// transaction: the job's end and, when it was the build's last job still queued or
/// running, the build's.
pub(super) async fn queue_notices(tx: &mut Tx, event: &Event) -> StoreResult<()> {
    if !rules::may_notify(event) {
        return Ok(());
    }
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
    let mut notices: Vec<_> = rules::job_notice(event).into_iter().collect();
    let n_open: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM jobs WHERE build = ? AND state IN ('queued', 'running')",
    )
    .bind(&event.build)
    .fetch_one(&mut **tx)
    .await?;
    // Announce the build's end once per time it ends: not again for each job of a
    // batch that ends together, but again after a restart reopened it.
    let announced = n_open == 0 && {
        let last_reopen: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(seq) FROM events WHERE build = ? AND to_state = 'queued'",
        )
        .bind(&event.build)
        .fetch_one(&mut **tx)
        .await?;
        let done: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM notifications WHERE build = ? AND kind = 'build_finished' \
             AND seq > ? LIMIT 1",
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
        notices.push(rules::build_end_notice(
            event,
            unsigned(&counts, "n_jobs")?,
            unsigned(&counts, "n_finished")?,
        ));
    }
    for notice in &notices {
        let body = serde_json::to_string(notice)
            .map_err(|err| StoreError::Conflict(format!("notice does not serialise: {err}")))?;
        for url in &urls {
            sqlx::query(
                "INSERT INTO notifications (build, kind, seq, url, body, created_at, \
                 next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
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
