//! [`Outbox`] on PostgreSQL: the webhook notices `queue_notices` wrote, until delivered.

use super::PgStore;
use crate::{Notification, Outbox, StoreResult};
use async_trait::async_trait;
use sqlx::Row;

#[async_trait]
impl Outbox for PgStore {
    async fn due_notifications(&self, now: i64, limit: u32) -> StoreResult<Vec<Notification>> {
        let rows = sqlx::query(
            // Every pending notice of a URL whose oldest pending notice is due: a URL
            // gets its notices in order, and later ones wait while an earlier one is
            // being retried.
            "SELECT id, build, url, body, attempts FROM notifications n \
             WHERE delivered_at IS NULL AND gave_up_at IS NULL \
             AND (SELECT o.next_attempt_at FROM notifications o WHERE o.url = n.url \
                  AND o.delivered_at IS NULL AND o.gave_up_at IS NULL ORDER BY o.id LIMIT 1) <= $1 \
             ORDER BY id LIMIT $2",
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
            "UPDATE notifications SET delivered_at = $1, attempts = attempts + 1 WHERE id = $2",
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
            "UPDATE notifications SET attempts = attempts + 1, last_error = $1, \
             next_attempt_at = COALESCE($2, next_attempt_at), \
             gave_up_at = CASE WHEN $3::BIGINT IS NULL THEN $4 ELSE NULL END WHERE id = $5",
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
}
