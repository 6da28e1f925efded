//! [`Queue`] on SQLite: builds, jobs, claims, transitions, events and deadlines.

use super::{
    apply, collect, event_from_row, first, insert_event, job_row, job_row_from,
    job_status_from_row, leased_job_row, parse_state, run, scalar, unsigned, write_run,
    SqliteStore, JOB_COLUMNS, JOB_ROW_COLUMNS,
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
use rusqlite::{Connection, Row};

fn summary_from_row(row: &Row) -> StoreResult<BuildSummary> {
    let count = |name: &str| -> StoreResult<u32> { Ok(row.get::<_, i64>(name)? as u32) };
    Ok(BuildSummary {
        number: row.get("number")?,
        title: row.get("title")?,
        build_time: row.get("build_time")?,
        submitted_at: row.get("submitted_at")?,
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

fn build_summary(conn: &Connection, number: &str) -> StoreResult<BuildSummary> {
    first(
        conn,
        &format!("{SUMMARY_QUERY} WHERE b.number = ? GROUP BY b.number"),
        [number],
        summary_from_row,
    )?
    .ok_or_else(|| StoreError::NotFound(format!("build {number}")))
}

/// The rows `query` (with `params`) selects, each read as a [`rules::JobRow`].
fn job_rows(
    conn: &Connection,
    query: &str,
    params: impl rusqlite::Params,
) -> StoreResult<Vec<rules::JobRow>> {
    collect(conn, query, params, job_row_from)
}

/// Moves each job of `rows` as `decide` says (`None`: not this one), one at a time,
/// each with its event, so that a build's end is seen (and announced) at the last of
/// them.
fn transition_rows(
    conn: &Connection,
    rows: Vec<rules::JobRow>,
    now: i64,
    decide: impl Fn(&rules::JobRow) -> StoreResult<Option<rules::Transition>>,
) -> StoreResult<Vec<TimedTransition>> {
    let mut transitions = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(transition) = decide(&row)? else {
            continue;
        };
        let event = apply(conn, &row, transition, now)?;
        transitions.push(TimedTransition {
            build: row.build,
            job: row.job,
            event,
        });
    }
    Ok(transitions)
}

/// The job `build/job` read under the lease `lease`, moved by `decide`; its event.
async fn transition_leased(
    store: &SqliteStore,
    build: &str,
    job: &str,
    lease: &str,
    now: i64,
    decide: impl FnOnce(&rules::JobRow) -> StoreResult<rules::Transition> + Send + 'static,
) -> StoreResult<Event> {
    let (build, job, lease) = (build.to_owned(), job.to_owned(), lease.to_owned());
    store
        .db
        .write(move |conn| {
            let row = leased_job_row(conn, &build, &job, &lease)?;
            let transition = decide(&row)?;
            apply(conn, &row, transition, now)
        })
        .await
}

/// The job `build/job` (any lease or none) moved by `decide`; its event.
async fn transition_any(
    store: &SqliteStore,
    build: &str,
    job: &str,
    now: i64,
    decide: impl FnOnce(&rules::JobRow) -> StoreResult<rules::Transition> + Send + 'static,
) -> StoreResult<Event> {
    let (build, job) = (build.to_owned(), job.to_owned());
    store
        .db
        .write(move |conn| {
            let row = job_row(conn, &build, &job)?;
            let transition = decide(&row)?;
            apply(conn, &row, transition, now)
        })
        .await
}

#[async_trait]
impl Queue for SqliteStore {
    async fn insert_build(&self, build: &NewBuild) -> StoreResult<()> {
        let build = build.clone();
        let manifest_json = serde_json::to_string(&build.manifest)
            .map_err(|err| StoreError::Conflict(format!("manifest does not serialise: {err}")))?;
        let notify_json = serde_json::to_string(&build.manifest.notify).map_err(|err| {
            StoreError::Conflict(format!("notify list does not serialise: {err}"))
        })?;
        self.db
            .write(move |conn| {
                let manifest = &build.manifest;
                let exists: Option<i64> = scalar(
                    conn,
                    "SELECT 1 FROM builds WHERE number = ?",
                    [&manifest.number],
                )?;
                if exists.is_some() {
                    return Err(StoreError::DuplicateBuild(manifest.number.clone()));
                }
                run(
                    conn,
                    "INSERT INTO builds (number, title, build_time, log_file, notify, \
                     files_key, files_size, submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rusqlite::params![
                        manifest.number,
                        manifest.title,
                        manifest.build_time,
                        manifest.log_file,
                        notify_json,
                        build.files_key,
                        build.files_size as i64,
                        build.submitted_at,
                    ],
                )?;
                // Apart from `builds` (migration 0013), so that reading a build's other
                // columns never passes over it.
                run(
                    conn,
                    "INSERT INTO build_manifests (number, manifest) VALUES (?, ?)",
                    rusqlite::params![manifest.number, manifest_json],
                )?;
                for spec in &manifest.jobs {
                    let submitted = rules::submit(spec, &build);
                    let limits = &submitted.limits;
                    run(
                        conn,
                        "INSERT INTO jobs (build, id, title, config_type, install_script, \
                         configure_script, image_script, verify_script, timeout_secs, priority, \
                         accept_within_secs, accept_deadline, assigned_to, max_attempts, \
                         retries, state) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rusqlite::params![
                            manifest.number,
                            spec.id,
                            spec.title,
                            spec.config_type,
                            spec.install_script,
                            spec.configure_script,
                            spec.image_script,
                            spec.verify_script,
                            limits.timeout_secs as i64,
                            submitted.priority,
                            limits.accept_within_secs.map(|secs| secs as i64),
                            submitted.accept_deadline,
                            spec.assigned_to,
                            i64::from(limits.max_attempts),
                            i64::from(limits.retries),
                            submitted.event.to.as_str(),
                        ],
                    )?;
                    insert_event(conn, &manifest.number, &spec.id, submitted.event)?;
                }
                Ok(())
            })
            .await
    }

    async fn list_builds(&self) -> StoreResult<Vec<BuildSummary>> {
        self.db
            .read_blocking(|conn| {
                collect(
                    conn,
                    &format!(
                        "{SUMMARY_QUERY} GROUP BY b.number \
                         ORDER BY b.submitted_at DESC, b.rowid DESC"
                    ),
                    [],
                    summary_from_row,
                )
            })
            .await
    }

    async fn build_summary(&self, number: &str) -> StoreResult<BuildSummary> {
        self.db.read(|conn| build_summary(conn, number))
    }

    async fn get_build(&self, number: &str) -> StoreResult<BuildRecord> {
        let (manifest, files_key, files_size, submitted_at) = self
            .db
            .read(|conn| {
                first(
                    conn,
                    "SELECT m.manifest, b.files_key, b.files_size, b.submitted_at \
                     FROM builds b JOIN build_manifests m ON m.number = b.number \
                     WHERE b.number = ?",
                    [number],
                    |row| {
                        Ok((
                            row.get::<_, String>("manifest")?,
                            row.get::<_, String>("files_key")?,
                            row.get::<_, i64>("files_size")?,
                            row.get::<_, i64>("submitted_at")?,
                        ))
                    },
                )
            })?
            .ok_or_else(|| StoreError::NotFound(format!("build {number}")))?;
        let manifest: BuildManifest = serde_json::from_str(&manifest).map_err(|err| {
            StoreError::Conflict(format!(
                "stored manifest of build {number} is unreadable: {err}"
            ))
        })?;
        Ok(BuildRecord {
            manifest,
            files_key,
            files_size: files_size as u64,
            submitted_at,
        })
    }

    async fn build_files(&self, number: &str) -> StoreResult<(String, u64)> {
        self.db
            .read(|conn| {
                first(
                    conn,
                    "SELECT files_key, files_size FROM builds WHERE number = ?",
                    [number],
                    |row| Ok((row.get("files_key")?, unsigned(row, "files_size")?)),
                )
            })?
            .ok_or_else(|| StoreError::NotFound(format!("build {number}")))
    }

    async fn runs_job_of(&self, client_id: &str, build: &str) -> StoreResult<bool> {
        let runs: Option<bool> = self.db.read(|conn| {
            scalar(
                conn,
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE build = ? AND client_id = ? \
                 AND state = 'running')",
                [build, client_id],
            )
        })?;
        Ok(runs.unwrap_or(false))
    }

    async fn list_jobs(&self, build: &str) -> StoreResult<Vec<JobStatus>> {
        let build = build.to_owned();
        self.db
            .read_blocking(move |conn| {
                let jobs = collect(
                    conn,
                    &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE build = ? ORDER BY pk"),
                    [&build],
                    job_status_from_row,
                )?;
                if jobs.is_empty() {
                    // Tell "no such build" from "a build without jobs" (which cannot be
                    // submitted).
                    build_summary(conn, &build)?;
                }
                Ok(jobs)
            })
            .await
    }

    async fn get_job(&self, build: &str, job: &str) -> StoreResult<JobStatus> {
        self.db
            .read(|conn| {
                first(
                    conn,
                    &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE build = ? AND id = ?"),
                    [build, job],
                    job_status_from_row,
                )
            })?
            .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))
    }

    async fn queued_candidates(&self, limit: u32) -> StoreResult<Vec<Candidate>> {
        // `jobs_queued_order` (migration 0008) holds the queued jobs in this very order,
        // so the first `limit` are read without sorting the queue. Named, because the
        // planner would otherwise take `jobs_queue` for the state and sort.
        self.db.read(|conn| {
            collect(
                conn,
                "SELECT j.build, j.id, j.config_type, j.assigned_to, j.priority, \
                 b.submitted_at \
                 FROM jobs j INDEXED BY jobs_queued_order JOIN builds b ON b.number = j.build \
                 WHERE j.state = 'queued' ORDER BY j.priority DESC, \
                 j.accept_deadline IS NULL, j.accept_deadline, j.pk LIMIT ?",
                [i64::from(limit)],
                |row| {
                    Ok(Candidate {
                        build: row.get("build")?,
                        job: row.get("id")?,
                        config_type: row.get("config_type")?,
                        assigned_to: row.get("assigned_to")?,
                        priority: row.get("priority")?,
                        submitted_at: row.get("submitted_at")?,
                    })
                },
            )
        })
    }

    async fn claim(
        &self,
        build: &str,
        job: &str,
        client: &ClaimingClient,
        lease_until: i64,
        now: i64,
    ) -> StoreResult<Option<ClaimedJob>> {
        let (build, job, client) = (build.to_owned(), job.to_owned(), client.clone());
        self.db
            .write(move |conn| {
                let client_id = client.id.as_str();
                let query = format!(
                    "SELECT {JOB_ROW_COLUMNS}, title, config_type, install_script, \
                     configure_script, image_script, verify_script FROM jobs \
                     WHERE build = ? AND id = ?"
                );
                let Some((row, mut claimed)) = first(conn, &query, [&build, &job], |row| {
                    Ok((
                        job_row_from(row)?,
                        ClaimedJob {
                            build: build.clone(),
                            job: job.clone(),
                            title: row.get("title")?,
                            config_type: row.get("config_type")?,
                            install_script: row.get("install_script")?,
                            configure_script: row.get("configure_script")?,
                            image_script: row.get("image_script")?,
                            verify_script: row.get("verify_script")?,
                            timeout_secs: 0,
                            attempt: 0,
                            lease: String::new(),
                            queued_since: now,
                        },
                    ))
                })?
                else {
                    return Ok(None);
                };
                let lease = rules::new_lease_token();
                let Some(transition) =
                    rules::claim(&row, client_id, lease.clone(), lease_until, now)
                else {
                    return Ok(None);
                };
                let attempt = transition.run.attempt;
                // The job's latest event is the one that queued it.
                let queued_since: Option<i64> = scalar::<Option<i64>>(
                    conn,
                    "SELECT MAX(time) FROM events WHERE build = ? AND job = ?",
                    [&build, &job],
                )?
                .flatten();
                apply(conn, &row, transition, now)?;
                // What a client says of itself may change from one claim to the next (an
                // older client says nothing of its slots or version): the latest claim is
                // the truth.
                run(
                    conn,
                    "INSERT INTO clients (id, include, slots, version, address, first_seen, \
                     last_contact, n_claimed) VALUES (?, ?, ?, ?, ?, ?, ?, 1) \
                     ON CONFLICT (id) DO UPDATE SET include = excluded.include, \
                     slots = excluded.slots, version = excluded.version, \
                     address = COALESCE(excluded.address, clients.address), \
                     last_contact = MAX(clients.last_contact, excluded.last_contact), \
                     n_claimed = clients.n_claimed + 1",
                    rusqlite::params![
                        client_id,
                        client.include.join(","),
                        client.slots.map(i64::from),
                        client.version,
                        client.address,
                        now,
                        now,
                    ],
                )?;
                claimed.timeout_secs = row.limits.timeout_secs;
                claimed.attempt = attempt;
                claimed.lease = lease;
                claimed.queued_since = queued_since.unwrap_or(now);
                Ok(Some(claimed))
            })
            .await
    }

    async fn release(&self, build: &str, job: &str, lease: &str, now: i64) -> StoreResult<()> {
        transition_leased(self, build, job, lease, now, move |row| {
            Ok(rules::release(row, now))
        })
        .await?;
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
        let (build, job, lease) = (build.to_owned(), job.to_owned(), lease.to_owned());
        let progress = progress.cloned();
        self.db
            .write(move |conn| {
                let row = leased_job_row(conn, &build, &job, &lease)?;
                write_run(
                    conn,
                    &row,
                    &rules::heartbeat(&row, lease_until, progress.as_ref()),
                )?;
                Ok(rules::holder(&row))
            })
            .await
    }

    async fn mark_steps_done(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        now: i64,
    ) -> StoreResult<()> {
        let (build, job, lease) = (build.to_owned(), job.to_owned(), lease.to_owned());
        self.db
            .write(move |conn| {
                let row = leased_job_row(conn, &build, &job, &lease)?;
                write_run(conn, &row, &rules::steps_done(&row, now))
            })
            .await
    }

    async fn check_lease(&self, build: &str, job: &str, lease: &str) -> StoreResult<LeaseHolder> {
        // One read, outside a transaction: the caller acts on the answer under a later
        // write that checks the lease again.
        let row = self
            .db
            .read(|conn| leased_job_row(conn, build, job, lease))?;
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
        let (build, job, lease) = (build.to_owned(), job.to_owned(), lease.to_owned());
        let images = images.to_vec();
        self.db
            .write(move |conn| {
                // The lease first: a caller that does not hold the job learns nothing else.
                let row = leased_job_row(conn, &build, &job, &lease)?;
                let stored: Vec<String> = collect(
                    conn,
                    "SELECT name FROM images WHERE build = ? AND job = ? AND lease_token = ?",
                    [&build, &job, &lease],
                    |row| Ok(row.get(0)?),
                )?;
                let unnamed = rules::finish_images(&build, &job, &images, &stored)?;
                // Images of earlier attempts were uploaded under leases that are gone: only
                // what this lease stored and the finish names is the job's output
                // (invariant 4).
                run(
                    conn,
                    "DELETE FROM images WHERE build = ? AND job = ? AND lease_token != ?",
                    [&build, &job, &lease],
                )?;
                for name in &unnamed {
                    run(
                        conn,
                        "DELETE FROM images WHERE build = ? AND job = ? AND name = ?",
                        [&build, &job, name],
                    )?;
                }
                let image_bytes: i64 = scalar(
                    conn,
                    "SELECT COALESCE(SUM(size), 0) FROM images WHERE build = ? AND job = ?",
                    [&build, &job],
                )?
                .unwrap_or(0);
                let transition = rules::finish(&row, image_bytes.max(0) as u64, now);
                apply(conn, &row, transition, now)
            })
            .await
    }

    async fn fail(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        failure: &Failure,
        now: i64,
    ) -> StoreResult<Event> {
        let failure = failure.clone();
        transition_leased(self, build, job, lease, now, move |row| {
            Ok(rules::fail(row, &failure, now))
        })
        .await
    }

    async fn reap_leases(
        &self,
        now: i64,
        hung_grace_secs: u64,
    ) -> StoreResult<Vec<TimedTransition>> {
        self.db
            .write(move |conn| {
                // The jobs `rules::overdue` takes, found with the `jobs_lease` index; the
                // rules decide again, row by row, and say why.
                let rows = job_rows(
                    conn,
                    &format!(
                        "SELECT {JOB_ROW_COLUMNS} FROM jobs WHERE state = 'running' \
                         AND (lease_expires_at < ? \
                         OR (steps_done = 0 AND time_start + (timeout_secs + ?) * 1000000 < ?))"
                    ),
                    rusqlite::params![now, hung_grace_secs as i64, now],
                )?;
                transition_rows(conn, rows, now, |row| {
                    rules::overdue(row, now, hung_grace_secs)
                        .map(|why| rules::take_back(row, why, now))
                        .transpose()
                })
            })
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
        let reason = reason.to_owned();
        transition_leased(self, build, job, lease, now, move |row| {
            rules::take_back(row, TakeBack::LeaseLost(&reason), now)
        })
        .await
    }

    async fn take_back_from_client(
        &self,
        client_id: &str,
        reason: &str,
        now: i64,
    ) -> StoreResult<Vec<TimedTransition>> {
        let (client_id, reason) = (client_id.to_owned(), reason.to_owned());
        self.db
            .write(move |conn| {
                let rows = job_rows(
                    conn,
                    &format!(
                        "SELECT {JOB_ROW_COLUMNS} FROM jobs \
                         WHERE state = 'running' AND client_id = ?"
                    ),
                    [&client_id],
                )?;
                transition_rows(conn, rows, now, |row| {
                    rules::take_back(row, TakeBack::LeaseLost(&reason), now).map(Some)
                })
            })
            .await
    }

    async fn expire_unclaimed(&self, now: i64) -> StoreResult<Vec<TimedTransition>> {
        self.db
            .write(move |conn| {
                // The jobs `rules::expire` expires, found by the query; the rules decide
                // again.
                let rows = job_rows(
                    conn,
                    &format!(
                        "SELECT {JOB_ROW_COLUMNS} FROM jobs \
                         WHERE state = 'queued' AND attempt = 0 AND accept_deadline < ? \
                         ORDER BY pk"
                    ),
                    [now],
                )?;
                transition_rows(conn, rows, now, |row| Ok(rules::expire(row, now)))
            })
            .await
    }

    async fn next_deadline(&self) -> StoreResult<Option<i64>> {
        let next: Option<Option<i64>> = self.db.read(|conn| {
            scalar(
                conn,
                "SELECT MIN(t) FROM (\
                 SELECT MIN(lease_expires_at) AS t FROM jobs WHERE state = 'running' \
                 UNION ALL SELECT MIN(accept_deadline) FROM jobs INDEXED BY jobs_unclaimed \
                 WHERE state = 'queued' AND attempt = 0)",
                [],
            )
        })?;
        Ok(next.flatten())
    }

    async fn extend_all_leases(&self, until: i64) -> StoreResult<u64> {
        // One statement for every running job: what `rules::heartbeat` does to a lease
        // (at least until `until`, never shorter).
        let changed = self
            .db
            .write(move |conn| {
                run(
                    conn,
                    "UPDATE jobs SET lease_expires_at = ? \
                     WHERE state = 'running' AND lease_expires_at < ?",
                    [until, until],
                )
            })
            .await?;
        Ok(changed as u64)
    }

    async fn restart(&self, build: &str, job: &str, now: i64) -> StoreResult<Event> {
        transition_any(self, build, job, now, move |row| rules::restart(row, now)).await
    }

    async fn cancel(&self, build: &str, job: &str, now: i64) -> StoreResult<Event> {
        transition_any(self, build, job, now, move |row| rules::cancel(row, now)).await
    }

    async fn events(&self, build: &str, after: i64) -> StoreResult<Vec<Event>> {
        let build = build.to_owned();
        self.db
            .read_blocking(move |conn| {
                collect(
                    conn,
                    "SELECT seq, time, build, job, from_state, to_state, client_id, attempt, \
                     reason FROM events WHERE build = ? AND seq > ? ORDER BY seq",
                    rusqlite::params![build, after],
                    event_from_row,
                )
            })
            .await
    }

    async fn farm_events(&self, after: i64, limit: u32) -> StoreResult<Vec<Event>> {
        self.db.read(|conn| {
            collect(
                conn,
                "SELECT seq, time, build, job, from_state, to_state, client_id, attempt, \
                 reason FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                [after, i64::from(limit)],
                event_from_row,
            )
        })
    }

    async fn last_event_seq(&self) -> StoreResult<i64> {
        let last: Option<i64> = self
            .db
            .read(|conn| scalar(conn, "SELECT COALESCE(MAX(seq), 0) FROM events", []))?;
        Ok(last.unwrap_or(0))
    }

    async fn mean_run_secs(&self, config_type: &str) -> StoreResult<Option<f64>> {
        let config_type = config_type.to_owned();
        let mean: Option<Option<f64>> = self
            .db
            .read_blocking(move |conn| {
                scalar(
                    conn,
                    "SELECT AVG((time_complete - time_start) / 1000000.0) FROM jobs \
                     WHERE config_type = ? AND state = 'finished' AND time_start IS NOT NULL",
                    [&config_type],
                )
            })
            .await?;
        Ok(mean.flatten())
    }

    async fn delete_build(&self, build: &str) -> StoreResult<DeletedBuild> {
        let build = build.to_owned();
        self.db
            .write(move |conn| {
                let files_key: String = scalar(
                    conn,
                    "SELECT files_key FROM builds WHERE number = ?",
                    [&build],
                )?
                .ok_or_else(|| StoreError::NotFound(format!("build {build}")))?;
                let running: Vec<String> = collect(
                    conn,
                    "SELECT id FROM jobs WHERE build = ? AND state = 'running' ORDER BY pk",
                    [&build],
                    |row| Ok(row.get(0)?),
                )?;
                rules::check_deletable(&build, &running)?;
                let images = run(conn, "DELETE FROM images WHERE build = ?", [&build])?;
                for table in ["log_lines", "events", "notifications"] {
                    run(
                        conn,
                        &format!("DELETE FROM {table} WHERE build = ?"),
                        [&build],
                    )?;
                }
                let jobs = run(conn, "DELETE FROM jobs WHERE build = ?", [&build])?;
                run(
                    conn,
                    "DELETE FROM build_manifests WHERE number = ?",
                    [&build],
                )?;
                run(conn, "DELETE FROM builds WHERE number = ?", [&build])?;
                let files_key_shared: Option<bool> = scalar(
                    conn,
                    "SELECT EXISTS (SELECT 1 FROM builds WHERE files_key = ?)",
                    [&files_key],
                )?;
                Ok(DeletedBuild {
                    jobs: jobs as u64,
                    images: images as u64,
                    files_key,
                    files_key_shared: files_key_shared.unwrap_or(false),
                })
            })
            .await
    }

    async fn files_key_in_use(&self, key: &str) -> StoreResult<bool> {
        let used: Option<bool> = self.db.read(|conn| {
            scalar(
                conn,
                "SELECT EXISTS (SELECT 1 FROM builds WHERE files_key = ?)",
                [key],
            )
        })?;
        Ok(used.unwrap_or(false))
    }

    async fn follow_changes(
        &self,
    ) -> StoreResult<Option<tokio::sync::mpsc::Receiver<crate::Change>>> {
        // One server per SQLite file: every change is its own.
        Ok(None)
    }

    async fn load_counts(&self) -> StoreResult<LoadCounts> {
        self.db
            .read_blocking(|conn| {
                first(
                    conn,
                    "SELECT (SELECT COUNT(*) FROM builds) AS builds, \
                     (SELECT COUNT(*) FROM jobs WHERE state = 'queued') AS queued, \
                     (SELECT COUNT(*) FROM jobs WHERE state = 'running') AS running",
                    [],
                    |row| {
                        Ok(LoadCounts {
                            builds: unsigned(row, "builds")?,
                            queued: unsigned(row, "queued")?,
                            running: unsigned(row, "running")?,
                        })
                    },
                )?
                .ok_or_else(|| StoreError::Conflict("no row of counts".into()))
            })
            .await
    }

    async fn job_counts(&self) -> StoreResult<Vec<JobCount>> {
        // A queued job became queued at its latest event.
        self.db
            .read_blocking(|conn| {
                collect(
                    conn,
                    "SELECT state, config_type, COUNT(*) AS jobs, \
                     MIN(CASE WHEN state = 'queued' THEN \
                         (SELECT MAX(e.time) FROM events e \
                          WHERE e.build = j.build AND e.job = j.id) \
                     END) AS oldest_since \
                     FROM jobs j GROUP BY state, config_type ORDER BY config_type, state",
                    [],
                    |row| {
                        Ok(JobCount {
                            state: parse_state(&row.get::<_, String>("state")?)?,
                            config_type: row.get("config_type")?,
                            jobs: unsigned(row, "jobs")?,
                            oldest_since: row.get("oldest_since")?,
                        })
                    },
                )
            })
            .await
    }
}
