//! [`Outbox`] on SQLite: the webhook notices `queue_notices` wrote, until delivered.

use super::{collect, run, SqliteStore};
use crate::{Notification, Outbox, StoreResult};
use async_trait::async_trait;
use rusqlite::Connection;

/// Every pending notice of a URL whose oldest pending notice is due: a URL gets its
/// notices in order, and later ones wait while an earlier one is being retried. Each
/// URL's oldest pending notice is one entry of `notifications_pending`.
pub(super) const DUE: &str = "SELECT id, build, url, body, attempts FROM notifications n \
     WHERE delivered_at IS NULL AND gave_up_at IS NULL \
     AND (SELECT o.next_attempt_at FROM notifications o WHERE o.url = n.url \
          AND o.delivered_at IS NULL AND o.gave_up_at IS NULL ORDER BY o.id LIMIT 1) <= ? \
     ORDER BY id LIMIT ?";

/// The due notices (see [`Outbox::due_notifications`]).
fn due(conn: &Connection, now: i64, limit: u32) -> StoreResult<Vec<Notification>> {
    collect(conn, DUE, [now, i64::from(limit)], |row| {
        Ok(Notification {
            id: row.get("id")?,
            build: row.get("build")?,
            url: row.get("url")?,
            body: row.get("body")?,
            attempts: row.get::<_, i64>("attempts")? as u32,
        })
    })
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn due_notifications(&self, now: i64, limit: u32) -> StoreResult<Vec<Notification>> {
        self.db.read(|conn| due(conn, now, limit))
    }

    async fn claim_notifications(
        &self,
        now: i64,
        limit: u32,
        hold_until: i64,
    ) -> StoreResult<Vec<Notification>> {
        self.db
            .write(move |conn| {
                let mut taken = Vec::new();
                for group in crate::notices_by_url(due(conn, now, limit)?) {
                    // The URL is due by its oldest notice: whoever moves that one on first
                    // takes the URL (a caller that lost the race finds it moved and skips).
                    let held = run(
                        conn,
                        "UPDATE notifications SET next_attempt_at = ? WHERE id = ? \
                         AND next_attempt_at <= ? AND delivered_at IS NULL AND gave_up_at IS NULL",
                        [hold_until, group[0].id, now],
                    )?;
                    if held == 0 {
                        continue;
                    }
                    for notice in &group[1..] {
                        run(
                            conn,
                            "UPDATE notifications SET next_attempt_at = ? WHERE id = ?",
                            [hold_until, notice.id],
                        )?;
                    }
                    taken.extend(group);
                }
                taken.sort_by_key(|notice| notice.id);
                Ok(taken)
            })
            .await
    }

    async fn release_notifications(&self, ids: &[i64], now: i64) -> StoreResult<()> {
        let ids = ids.to_vec();
        self.db
            .write(move |conn| {
                for id in ids {
                    run(
                        conn,
                        "UPDATE notifications SET next_attempt_at = ? WHERE id = ? \
                         AND delivered_at IS NULL AND gave_up_at IS NULL",
                        [now, id],
                    )?;
                }
                Ok(())
            })
            .await
    }

    async fn notification_delivered(&self, id: i64, now: i64) -> StoreResult<()> {
        self.db
            .write(move |conn| {
                run(
                    conn,
                    "UPDATE notifications SET delivered_at = ?, attempts = attempts + 1 \
                     WHERE id = ?",
                    [now, id],
                )?;
                Ok(())
            })
            .await
    }

    async fn notification_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: Option<i64>,
        now: i64,
    ) -> StoreResult<()> {
        let error = error.to_owned();
        self.db
            .write(move |conn| {
                run(
                    conn,
                    "UPDATE notifications SET attempts = attempts + 1, last_error = ?, \
                     next_attempt_at = COALESCE(?, next_attempt_at), \
                     gave_up_at = CASE WHEN ? IS NULL THEN ? ELSE NULL END WHERE id = ?",
                    rusqlite::params![error, retry_at, retry_at, now, id],
                )?;
                Ok(())
            })
            .await
    }
}
