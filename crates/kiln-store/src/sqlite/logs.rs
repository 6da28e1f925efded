//! [`Logs`] on SQLite: log lines under the lease, and the volume kept in the job's row.

use super::legacy::{leased_job_row, unsigned, write_run, Tx};
use super::SqliteStore;
use crate::rules::{self, LogVolume};
use crate::{LeaseHolder, LogAppend, Logs, StoreResult};
use async_trait::async_trait;
use kiln_proto::api::{LogLine, NewLogLine};
use kiln_proto::progress::Progress;
use sqlx::Row;

async fn insert_log_line(
    tx: &mut Tx,
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
    .bind(i64::from(attempt))
    .bind(now)
    .bind(stream)
    .bind(text)
    .execute(&mut **tx)
    .await?;
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
        let mut tx = self.write_tx().await?;
        let row = leased_job_row(&mut *tx, build, job, lease).await?;
        let volume = sqlx::query("SELECT log_bytes, log_cut FROM jobs WHERE build = ? AND id = ?")
            .bind(build)
            .bind(job)
            .fetch_one(&mut *tx)
            .await?;
        let volume = LogVolume {
            bytes: unsigned(&volume, "log_bytes")?,
            cut: volume.try_get("log_cut")?,
        };
        let fit = rules::fit_log(volume, lines, max_bytes);
        let attempt = row.run.attempt;
        for line in &lines[..fit.n_stored] {
            insert_log_line(&mut tx, build, job, attempt, now, &line.stream, &line.text).await?;
        }
        if fit.cut_now {
            insert_log_line(&mut tx, build, job, attempt, now, "kiln", cut_notice).await?;
        }
        if fit.changed() {
            sqlx::query("UPDATE jobs SET log_bytes = ?, log_cut = ? WHERE build = ? AND id = ?")
                .bind(fit.volume.bytes as i64)
                .bind(fit.volume.cut)
                .bind(build)
                .bind(job)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(progress) = progress {
            let run = rules::with_progress(row.run.clone(), progress);
            write_run(&mut tx, &row, &run).await?;
        }
        tx.commit().await?;
        Ok(LogAppend {
            holder: rules::holder(&row),
            n_stored: fit.n_stored,
            cut: fit.volume.cut,
            cut_now: fit.cut_now,
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
}
