//! [`Queue`] on PostgreSQL: builds, jobs, claims, transitions, events and deadlines.

use super::{
    apply, batch, event_from_row, is_unique_violation, job_row, job_row_from, job_status_from_row,
    leased_job_row, lock_build_events, lock_for_changes_of, parse_state, queue_notices, unsigned,
    write_run, wrong_answer, PgStore, Tx, JOB_COLUMNS, JOB_ROW_COLUMNS,
};
use crate::rules::{self, TakeBack};
use crate::{
    BuildRecord, Candidate, ClaimedJob, ClaimingClient, DeletedBuild, Failure, JobCount,
    LeaseHolder, LoadCounts, NewBuild, Queue, StoreError, StoreResult, TimedTransition,
};
use async_trait::async_trait;
use kiln_proto::api::{BuildSummary, Event, JobStatus};
use kiln_proto::manifest::BuildManifest;
use kiln_proto::progress::Progress;
use kiln_proto::state::JobState;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};
use std::collections::HashMap;

fn summary_from_row(row: &PgRow) -> StoreResult<BuildSummary> {
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
     COUNT(j.pk) FILTER (WHERE j.state = 'queued') AS n_queued, \
     COUNT(j.pk) FILTER (WHERE j.state = 'running') AS n_running, \
     COUNT(j.pk) FILTER (WHERE j.state = 'finished') AS n_finished, \
     COUNT(j.pk) FILTER (WHERE j.state = 'failed') AS n_failed, \
     COUNT(j.pk) FILTER (WHERE j.state = 'expired') AS n_expired, \
     COUNT(j.pk) FILTER (WHERE j.state = 'cancelled') AS n_cancelled \
     FROM builds b LEFT JOIN jobs j ON j.build = b.number";

/// Takes each job of `rows` from its client for the reason `why` gives (`None`: not
/// this one), and commits.
async fn take_back_rows<'r>(
    mut tx: Tx,
    rows: Vec<PgRow>,
    why: impl Fn(&rules::JobRow) -> Option<TakeBack<'r>>,
    now: i64,
) -> StoreResult<Vec<TimedTransition>> {
    let rows = rows
        .iter()
        .map(job_row_from)
        .collect::<StoreResult<Vec<_>>>()?;
    lock_for_changes_of(&mut tx, &rows).await?;
    let mut transitions = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(why) = why(&row) else {
            continue;
        };
        let transition = rules::take_back(&row, why, now)?;
        let event = apply(&mut tx, &row, transition, now).await?;
        transitions.push(TimedTransition {
            build: row.build,
            job: row.job,
            event,
        });
    }
    tx.commit().await?;
    Ok(transitions)
}

/// Jobs inserted a statement by `insert_build`: 16 parameters each, under PostgreSQL's
/// 65,535 a statement.
const INSERT_CHUNK: usize = 1_000;

/// The first queued jobs in the dispatcher's order, walking `jobs_queue` (priority,
/// then accept deadlines, earliest first, then submission) and stopping after `$1`, so
/// that a read costs the same however many jobs wait. It runs on connections that rule
/// sorting out (`PgStore::queue_reads`): the planner's other way, reading every job
/// queued or running through `jobs_open` and sorting them, looks as cheap whenever its
/// statistics say few jobs are queued, as they do just after a large build is
/// submitted (autovacuum's next ANALYZE is up to a minute away). That plan cost 5.3 ms
/// a read instead of 0.2 ms with 3,000 jobs queued, and more the larger the build.
const QUEUED_CANDIDATES: &str = "SELECT j.build, j.id, j.config_type, j.assigned_to, \
     j.priority, b.submitted_at FROM jobs j JOIN builds b ON b.number = j.build \
     WHERE j.state = 'queued' \
     ORDER BY j.priority DESC, j.accept_deadline IS NULL, j.accept_deadline, j.pk LIMIT $1";

#[async_trait]
impl Queue for PgStore {
    async fn insert_build(&self, build: &NewBuild) -> StoreResult<()> {
        let manifest = &build.manifest;
        let mut tx = self.write_tx().await?;
        let manifest_json = serde_json::to_string(manifest)
            .map_err(|err| StoreError::Conflict(format!("manifest does not serialise: {err}")))?;
        let notify_json = serde_json::to_string(&manifest.notify).map_err(|err| {
            StoreError::Conflict(format!("notify list does not serialise: {err}"))
        })?;
        // A second submission of one number, even at the same moment, inserts nothing:
        // it waits for the first to commit and then conflicts.
        let inserted = sqlx::query(
            "INSERT INTO builds (number, title, build_time, log_file, notify, manifest, files_key, \
             files_size, submitted_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (number) DO NOTHING",
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
        .await
        .map_err(|err| {
            if is_unique_violation(&err) {
                StoreError::DuplicateBuild(manifest.number.clone())
            } else {
                err.into()
            }
        })?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::DuplicateBuild(manifest.number.clone()));
        }
        // The jobs and their first events, a chunk of rows a statement: one job at a
        // time was four round trips a job, about 4 s for a build of 10,000.
        lock_build_events(&mut tx, &manifest.number).await?;
        for chunk in manifest.jobs.chunks(INSERT_CHUNK) {
            let submitted: Vec<_> = chunk
                .iter()
                .map(|spec| {
                    let submitted = rules::submit(spec, build);
                    let event = &submitted.event;
                    rules::check_transition(&manifest.number, &spec.id, event.from, event.to)?;
                    Ok((spec, submitted))
                })
                .collect::<StoreResult<_>>()?;
            let mut jobs = QueryBuilder::<Postgres>::new(
                "INSERT INTO jobs (build, id, title, config_type, install_script, \
                 configure_script, image_script, verify_script, timeout_secs, priority, \
                 accept_within_secs, accept_deadline, assigned_to, max_attempts, retries, state) ",
            );
            jobs.push_values(&submitted, |mut row, (spec, submitted)| {
                let limits = &submitted.limits;
                row.push_bind(&manifest.number)
                    .push_bind(&spec.id)
                    .push_bind(&spec.title)
                    .push_bind(&spec.config_type)
                    .push_bind(&spec.install_script)
                    .push_bind(&spec.configure_script)
                    .push_bind(&spec.image_script)
                    .push_bind(&spec.verify_script)
                    .push_bind(limits.timeout_secs as i64)
                    .push_bind(submitted.priority)
                    .push_bind(limits.accept_within_secs.map(|secs| secs as i64))
                    .push_bind(submitted.accept_deadline)
                    .push_bind(&spec.assigned_to)
                    .push_bind(i64::from(limits.max_attempts))
                    .push_bind(i64::from(limits.retries))
                    .push_bind(submitted.event.to.as_str());
            });
            jobs.build().execute(&mut *tx).await?;
            let mut events = QueryBuilder::<Postgres>::new(
                "INSERT INTO events (build, job, time, from_state, to_state, client_id, \
                 attempt, reason) ",
            );
            events.push_values(&submitted, |mut row, (spec, submitted)| {
                let event = &submitted.event;
                row.push_bind(&manifest.number)
                    .push_bind(&spec.id)
                    .push_bind(event.time)
                    .push_bind(event.from.map(JobState::as_str))
                    .push_bind(event.to.as_str())
                    .push_bind(&event.client_id)
                    .push_bind(i64::from(event.attempt))
                    .push_bind(&event.reason);
            });
            events.push(" RETURNING job, seq");
            let seqs: HashMap<String, i64> = events
                .build_query_as::<(String, i64)>()
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            for (spec, submitted) in submitted {
                let seq = *seqs.get(&spec.id).ok_or_else(|| {
                    StoreError::Conflict(format!("no event was stored for job {}", spec.id))
                })?;
                let event = submitted.event.into_event(seq, &manifest.number, &spec.id);
                queue_notices(&mut tx, &event, &manifest.notify, true).await?;
            }
        }
        // Other servers on this database look at the queue again once this commits
        // (the trigger on `events` said so).
        tx.commit().await?;
        Ok(())
    }

    async fn list_builds(&self) -> StoreResult<Vec<BuildSummary>> {
        let query =
            format!("{SUMMARY_QUERY} GROUP BY b.number ORDER BY b.submitted_at DESC, b.seqno DESC");
        let rows = sqlx::query(&query).fetch_all(&self.pool).await?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn build_summary(&self, number: &str) -> StoreResult<BuildSummary> {
        let query = format!("{SUMMARY_QUERY} WHERE b.number = $1 GROUP BY b.number");
        let row = sqlx::query(&query)
            .bind(number)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("build {number}")))?;
        summary_from_row(&row)
    }

    async fn get_build(&self, number: &str) -> StoreResult<BuildRecord> {
        let row = sqlx::query(
            "SELECT manifest, files_key, files_size, submitted_at FROM builds WHERE number = $1",
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

    async fn build_files(&self, number: &str) -> StoreResult<(String, u64)> {
        let row = sqlx::query("SELECT files_key, files_size FROM builds WHERE number = $1")
            .bind(number)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("build {number}")))?;
        Ok((
            row.try_get("files_key")?,
            row.try_get::<i64, _>("files_size")? as u64,
        ))
    }

    async fn runs_job_of(&self, client_id: &str, build: &str) -> StoreResult<bool> {
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE build = $1 AND client_id = $2 \
             AND state = 'running') AS runs",
        )
        .bind(build)
        .bind(client_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("runs")?)
    }

    async fn list_jobs(&self, build: &str) -> StoreResult<Vec<JobStatus>> {
        let query = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE build = $1 ORDER BY pk");
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
        let query = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE build = $1 AND id = $2");
        let row = sqlx::query(&query)
            .bind(build)
            .bind(job)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))?;
        job_status_from_row(&row)
    }

    async fn queued_candidates(&self, limit: u32) -> StoreResult<Vec<Candidate>> {
        let rows = sqlx::query(QUEUED_CANDIDATES)
            .bind(limit as i64)
            .fetch_all(&self.queue_reads)
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
        // In the next batch, with the claims, finishes and image records of other
        // callers (see `batch.rs`).
        let call = batch::Call::Claim {
            client: client.clone(),
            lease_until,
            now,
        };
        match self.batcher.call(build, job, call).await? {
            batch::Answer::Claimed(claimed) => Ok(claimed),
            _ => Err(wrong_answer("claim")),
        }
    }

    async fn release(&self, build: &str, job: &str, lease: &str, now: i64) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        let row = leased_job_row(&mut tx, build, job, lease).await?;
        apply(&mut tx, &row, rules::release(&row, now), now).await?;
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
        let row = leased_job_row(&mut tx, build, job, lease).await?;
        write_run(
            &mut tx,
            &row,
            &rules::heartbeat(&row, lease_until, progress),
        )
        .await?;
        tx.commit().await?;
        Ok(rules::holder(&row))
    }

    async fn mark_steps_done(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        now: i64,
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        let row = leased_job_row(&mut tx, build, job, lease).await?;
        write_run(&mut tx, &row, &rules::steps_done(&row, now)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn check_lease(&self, build: &str, job: &str, lease: &str) -> StoreResult<LeaseHolder> {
        // One read, outside a transaction, and no lock: the caller acts on the answer
        // under a later write that checks the lease again. (A transaction around it
        // cost two more round trips to the database for nothing.)
        let query = format!("SELECT {JOB_ROW_COLUMNS} FROM jobs WHERE build = $1 AND id = $2");
        let row = sqlx::query(&query)
            .bind(build)
            .bind(job)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))?;
        let row = job_row_from(&row)?;
        rules::check_lease(&row, lease)?;
        Ok(rules::holder(&row))
    }

    async fn finish(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        images: &[String],
        now: i64,
    ) -> StoreResult<Event> {
        let call = batch::Call::Finish {
            lease: lease.to_owned(),
            images: images.to_vec(),
            now,
        };
        match self.batcher.call(build, job, call).await? {
            batch::Answer::Ended(event) => Ok(event),
            _ => Err(wrong_answer("finish")),
        }
    }

    async fn fail(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        failure: &Failure,
        now: i64,
    ) -> StoreResult<Event> {
        let call = batch::Call::Fail {
            lease: lease.to_owned(),
            failure: failure.clone(),
            now,
        };
        match self.batcher.call(build, job, call).await? {
            batch::Answer::Ended(event) => Ok(event),
            _ => Err(wrong_answer("fail")),
        }
    }

    async fn reap_leases(
        &self,
        now: i64,
        hung_grace_secs: u64,
    ) -> StoreResult<Vec<TimedTransition>> {
        let mut tx = self.write_tx().await?;
        // The jobs `rules::overdue` takes, found with the `jobs_lease` index; the rules
        // decide again, row by row, and say why.
        let query = format!(
            "SELECT {JOB_ROW_COLUMNS} FROM jobs WHERE state = 'running' \
             AND (lease_expires_at < $1 \
             OR (NOT steps_done AND time_start + (timeout_secs + $2) * 1000000 < $3)) \
             ORDER BY build, pk FOR UPDATE"
        );
        let rows = sqlx::query(&query)
            .bind(now)
            .bind(hung_grace_secs as i64)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        take_back_rows(
            tx,
            rows,
            |row| rules::overdue(row, now, hung_grace_secs),
            now,
        )
        .await
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
        let row = leased_job_row(&mut tx, build, job, lease).await?;
        let transition = rules::take_back(&row, TakeBack::LeaseLost(reason), now)?;
        let event = apply(&mut tx, &row, transition, now).await?;
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
        let query = format!(
            "SELECT {JOB_ROW_COLUMNS} FROM jobs WHERE state = 'running' AND client_id = $1 \
             ORDER BY build, pk FOR UPDATE"
        );
        let rows = sqlx::query(&query)
            .bind(client_id)
            .fetch_all(&mut *tx)
            .await?;
        take_back_rows(tx, rows, |_| Some(TakeBack::LeaseLost(reason)), now).await
    }

    async fn expire_unclaimed(&self, now: i64) -> StoreResult<Vec<TimedTransition>> {
        let mut tx = self.write_tx().await?;
        // The jobs `rules::expire` expires, found by the query; the rules decide again.
        let query = format!(
            "SELECT {JOB_ROW_COLUMNS} FROM jobs \
             WHERE state = 'queued' AND attempt = 0 AND accept_deadline < $1 \
             ORDER BY build, pk FOR UPDATE"
        );
        let rows = sqlx::query(&query).bind(now).fetch_all(&mut *tx).await?;
        let rows = rows
            .iter()
            .map(job_row_from)
            .collect::<StoreResult<Vec<_>>>()?;
        lock_for_changes_of(&mut tx, &rows).await?;
        let mut transitions = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(transition) = rules::expire(&row, now) else {
                continue;
            };
            // One job at a time, each with its event, so that the build's end is seen
            // (and announced) at the last of them.
            let event = apply(&mut tx, &row, transition, now).await?;
            transitions.push(TimedTransition {
                build: row.build,
                job: row.job,
                event,
            });
        }
        tx.commit().await?;
        Ok(transitions)
    }

    async fn next_deadline(&self) -> StoreResult<Option<i64>> {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(t) FROM (\
             SELECT MIN(lease_expires_at) AS t FROM jobs WHERE state = 'running' \
             UNION ALL SELECT MIN(accept_deadline) FROM jobs WHERE state = 'queued' AND attempt = 0) AS d",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(next)
    }

    async fn extend_all_leases(&self, until: i64) -> StoreResult<u64> {
        // One statement for every running job: what `rules::heartbeat` does to a lease
        // (at least until `until`, never shorter).
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at = $1 WHERE state = 'running' AND lease_expires_at < $2",
        )
        .bind(until)
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn restart(&self, build: &str, job: &str, now: i64) -> StoreResult<Event> {
        let mut tx = self.write_tx().await?;
        let row = job_row(&mut tx, build, job).await?;
        let event = apply(&mut tx, &row, rules::restart(&row, now)?, now).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn cancel(&self, build: &str, job: &str, now: i64) -> StoreResult<Event> {
        let mut tx = self.write_tx().await?;
        let row = job_row(&mut tx, build, job).await?;
        let event = apply(&mut tx, &row, rules::cancel(&row, now)?, now).await?;
        tx.commit().await?;
        Ok(event)
    }

    async fn events(&self, build: &str, after: i64) -> StoreResult<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, time, build, job, from_state, to_state, client_id, attempt, reason \
             FROM events WHERE build = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(build)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn farm_events(&self, after: i64, limit: u32) -> StoreResult<Vec<Event>> {
        // Each build's events commit in the order of their numbers (see
        // `lock_build_events`); across builds a reader may see a number before a smaller
        // one of another build commits. The farm's stream sends the state of every build
        // with its transitions, so a follower's picture is right either way.
        let rows = sqlx::query(
            "SELECT seq, time, build, job, from_state, to_state, client_id, attempt, reason \
             FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn last_event_seq(&self) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0)::BIGINT FROM events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn mean_run_secs(&self, config_type: &str) -> StoreResult<Option<f64>> {
        let mean: Option<f64> = sqlx::query_scalar(
            "SELECT AVG((time_complete - time_start) / 1000000.0)::DOUBLE PRECISION FROM jobs \
             WHERE config_type = $1 AND state = 'finished' AND time_start IS NOT NULL",
        )
        .bind(config_type)
        .fetch_one(&self.pool)
        .await?;
        Ok(mean)
    }

    async fn delete_build(&self, build: &str) -> StoreResult<DeletedBuild> {
        let mut tx = self.write_tx().await?;
        let files_key: String =
            sqlx::query_scalar("SELECT files_key FROM builds WHERE number = $1")
                .bind(build)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("build {build}")))?;
        // Lock every job of the build, so that none is claimed while it goes.
        let jobs =
            sqlx::query("SELECT id, state FROM jobs WHERE build = $1 ORDER BY pk FOR UPDATE")
                .bind(build)
                .fetch_all(&mut *tx)
                .await?;
        let mut running = Vec::new();
        for job in &jobs {
            if job.try_get::<&str, _>("state")? == "running" {
                running.push(job.try_get::<String, _>("id")?);
            }
        }
        rules::check_deletable(build, &running)?;
        let images = sqlx::query("DELETE FROM images WHERE build = $1")
            .bind(build)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        for table in ["log_lines", "events", "notifications"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE build = $1"))
                .bind(build)
                .execute(&mut *tx)
                .await?;
        }
        let jobs = sqlx::query("DELETE FROM jobs WHERE build = $1")
            .bind(build)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM builds WHERE number = $1")
            .bind(build)
            .execute(&mut *tx)
            .await?;
        let files_key_shared: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM builds WHERE files_key = $1)")
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
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM builds WHERE files_key = $1)")
                .bind(key)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn follow_changes(
        &self,
    ) -> StoreResult<Option<tokio::sync::mpsc::Receiver<crate::Change>>> {
        Ok(Some(
            super::changes::follow(&self.pool, &self.origin).await?,
        ))
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
            builds: unsigned(&row, "builds")?,
            queued: unsigned(&row, "queued")?,
            running: unsigned(&row, "running")?,
        })
    }

    fn calls_batched(&self) -> Option<u64> {
        Some(self.batcher.batched())
    }

    async fn job_counts(&self) -> StoreResult<Vec<JobCount>> {
        // A queued job became queued at its latest event.
        let rows = sqlx::query(
            "SELECT state, config_type, COUNT(*) AS jobs, \
             MIN(CASE WHEN state = 'queued' THEN \
                 (SELECT MAX(e.time) FROM events e WHERE e.build = j.build AND e.job = j.id) \
             END) AS oldest_since \
             FROM jobs j GROUP BY state, config_type ORDER BY config_type, state",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(JobCount {
                    state: parse_state(row.try_get("state")?)?,
                    config_type: row.try_get("config_type")?,
                    jobs: unsigned(row, "jobs")?,
                    oldest_since: row.try_get("oldest_since")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{at, job, new_build};
    use crate::PgStore;
    use kiln_harness::postgres::PgCluster;

    /// The planner's statistics lag behind a submission: taken when no job was queued,
    /// they say almost none is just after a large build arrives. The queue's first
    /// page must still be read from `jobs_queue` in its order, not by sorting every
    /// queued job (which the planner chooses on the store's other connections).
    #[tokio::test]
    async fn the_queues_first_page_is_read_in_index_order_even_with_stale_statistics(
    ) -> anyhow::Result<()> {
        let url = PgCluster::shared()?.new_database().await?;
        let store = PgStore::connect(&url).await?;
        // Statistics change only when this test says so.
        sqlx::query("ALTER TABLE jobs SET (autovacuum_enabled = false)")
            .execute(&store.pool)
            .await?;
        let ids = |prefix: &str, n: usize| {
            (0..n)
                .map(|idx| job(&format!("{prefix}-{idx}")))
                .collect::<Vec<_>>()
        };
        store
            .insert_build(&new_build("1", ids("old", 300), at(0)))
            .await?;
        sqlx::query("UPDATE jobs SET state = 'finished'")
            .execute(&store.pool)
            .await?;
        sqlx::query("ANALYZE jobs").execute(&store.pool).await?;
        store
            .insert_build(&new_build("2", ids("new", 300), at(1)))
            .await?;

        let explain = format!("EXPLAIN {}", QUEUED_CANDIDATES.replace("$1", "64"));
        let read_plan: Vec<String> = sqlx::query_scalar(&explain)
            .fetch_all(&store.queue_reads)
            .await?;
        let read_plan = read_plan.join("\n");
        assert!(
            read_plan.contains("Index Scan using jobs_queue on jobs"),
            "{read_plan}"
        );
        assert!(!read_plan.contains("Sort"), "{read_plan}");
        // What the store's other connections would do: the statistics do mislead.
        let other_plan: Vec<String> = sqlx::query_scalar(&explain).fetch_all(&store.pool).await?;
        assert!(
            other_plan.iter().any(|line| line.contains("Sort")),
            "{}",
            other_plan.join("\n")
        );
        assert_eq!(store.queued_candidates(64).await?.len(), 64);
        Ok(())
    }
}
