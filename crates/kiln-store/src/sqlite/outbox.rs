//! [`Outbox`] on SQLite: the webhook notices `queue_notices` wrote, until delivered.

use super::SqliteStore;
use crate::{Notification, Outbox, StoreResult};
use async_trait::async_trait;
use sqlx::Row;

/// The due notices (see [`Outbox::due_notifications`]), read through `executor`.
async fn due<'e, E>(executor: E, now: i64, limit: u32) -> StoreResult<Vec<Notification>>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
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
    .fetch_all(executor)
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

#[async_trait]
impl Outbox for SqliteStore {
    async fn due_notifications(&self, now: i64, limit: u32) -> StoreResult<Vec<Notification>> {
        due(&self.pool, now, limit).await
    }

    async fn claim_notifications(
        &self,
        now: i64,
        limit: u32,
        hold_until: i64,
    ) -> StoreResult<Vec<Notification>> {
        let mut tx = self.write_tx().await?;
        let mut taken = Vec::new();
        for group in crate::notices_by_url(due(&mut *tx, now, limit).await?) {
            // The URL is due by its oldest notice: whoever moves that one on first
            // takes the URL (a caller that lost the race finds it moved and skips).
            let held = sqlx::query(
                "UPDATE notifications SET next_attempt_at = ? WHERE id = ? AND next_attempt_at <= ? AND delivered_at IS NULL AND gave_up_at IS NULL",
            )
            .bind(hold_until)
            .bind(group[0].id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if held == 0 {
                continue;
            }
            for notice in &group[1..] {
                sqlx::query("UPDATE notifications SET next_attempt_at = ? WHERE id = ?")
                    .bind(hold_until)
                    .bind(notice.id)
                    .execute(&mut *tx)
                    .await?;
            }
            taken.extend(group);
        }
        tx.commit().await?;
        taken.sort_by_key(|notice| notice.id);
        Ok(taken)
    }

    async fn release_notifications(&self, ids: &[i64], now: i64) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        for id in ids {
            sqlx::query(
                "UPDATE notifications SET next_attempt_at = ? WHERE id = ? AND delivered_at IS NULL AND gave_up_at IS NULL",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn notification_delivered(&self, id: i64, now: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE notifications SET delivered_at = ?, attempts = attempts + 1 WHERE id = ?",
        )
        .bind(now)
        .bind(id)
        .execute(&self.writer)
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
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}
