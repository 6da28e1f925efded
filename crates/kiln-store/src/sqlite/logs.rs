//! [`Logs`] on SQLite: log lines under the lease, and the volume kept in the job's row.

use super::{collect, first, leased_job_row, run, unsigned, write_run, SqliteStore};
use crate::rules::{self, LogVolume};
use crate::{LeaseHolder, LogAppend, Logs, StoreError, StoreResult};
use async_trait::async_trait;
use kiln_proto::api::{LogLine, NewLogLine};
use kiln_proto::progress::Progress;
use rusqlite::Connection;

fn insert_log_line(
    conn: &Connection,
    build: &str,
    job: &str,
    attempt: u32,
    now: i64,
    stream: &str,
    text: &str,
) -> StoreResult<()> {
    run(
        conn,
        "INSERT INTO log_lines (build, job, attempt, time, stream, text) VALUES (?, ?, ?, ?, ?, ?)",
        rusqlite::params![build, job, i64::from(attempt), now, stream, text],
    )?;
    Ok(())
}

#[async_trait]
impl Logs for SqliteStore {
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
        let (build, job, lease) = (build.to_owned(), job.to_owned(), lease.to_owned());
        let (lines, progress) = (lines.to_vec(), progress.cloned());
        let cut_notice = cut_notice.to_owned();
        self.db
            .write(move |conn| {
                let row = leased_job_row(conn, &build, &job, &lease)?;
                let volume = first(
                    conn,
                    "SELECT log_bytes, log_cut FROM jobs WHERE build = ? AND id = ?",
                    [&build, &job],
                    |row| {
                        Ok(LogVolume {
                            bytes: unsigned(row, "log_bytes")?,
                            cut: row.get("log_cut")?,
                        })
                    },
                )?
                .ok_or_else(|| StoreError::NotFound(format!("job {build}/{job}")))?;
                let fit = rules::fit_log(volume, &lines, max_bytes);
                let attempt = row.run.attempt;
                for line in &lines[..fit.n_stored] {
                    insert_log_line(conn, &build, &job, attempt, now, &line.stream, &line.text)?;
                }
                if fit.cut_now {
                    insert_log_line(conn, &build, &job, attempt, now, "kiln", &cut_notice)?;
                }
                if fit.changed() {
                    run(
                        conn,
                        "UPDATE jobs SET log_bytes = ?, log_cut = ? WHERE build = ? AND id = ?",
                        rusqlite::params![fit.volume.bytes as i64, fit.volume.cut, build, job],
                    )?;
                }
                if let Some(progress) = &progress {
                    let run_ = rules::with_progress(row.run.clone(), progress);
                    write_run(conn, &row, &run_)?;
                }
                Ok(LogAppend {
                    holder: rules::holder(&row),
                    n_stored: fit.n_stored,
                    cut: fit.volume.cut,
                    cut_now: fit.cut_now,
                })
            })
            .await
    }

    async fn read_log(
        &self,
        build: &str,
        job: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<LogLine>> {
        self.db.read(|conn| {
            collect(
                conn,
                "SELECT seq, time, attempt, stream, text FROM log_lines \
                 WHERE build = ? AND job = ? AND seq > ? ORDER BY seq LIMIT ?",
                rusqlite::params![build, job, after, i64::from(limit)],
                |row| {
                    Ok(LogLine {
                        seq: row.get("seq")?,
                        time: row.get("time")?,
                        attempt: row.get::<_, i64>("attempt")? as u32,
                        stream: row.get("stream")?,
                        text: row.get("text")?,
                    })
                },
            )
        })
    }
}
