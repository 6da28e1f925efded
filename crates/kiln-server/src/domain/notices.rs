//! The webhook outbox as the notifier sees it, and what a server tells its masters.

use super::{Farm, FarmResult};
use kiln_store::{LoadCounts, Notification};

/// The most notices read from the outbox at a time.
const DUE_PAGE: u32 = 256;

impl Farm {
    /// Takes the pending notices of every URL whose oldest pending one is due at `now`
    /// and that no other notifier holds: they are this one's to deliver until
    /// `hold_until` (other servers sharing the store leave them alone meanwhile).
    pub async fn take_due_notices(
        &self,
        now: i64,
        hold_until: i64,
    ) -> FarmResult<Vec<Notification>> {
        Ok(self
            .store
            .claim_notifications(now, DUE_PAGE, hold_until)
            .await?)
    }

    /// Gives back notices taken but not tried (their URL's delivery stopped at a
    /// failure): due again at `now`, behind the failed one.
    pub async fn release_notices(&self, ids: &[i64], now: i64) -> FarmResult<()> {
        Ok(self.store.release_notifications(ids, now).await?)
    }

    /// Records a delivery.
    pub async fn notice_delivered(&self, id: i64, now: i64) -> FarmResult<()> {
        Ok(self.store.notification_delivered(id, now).await?)
    }

    /// Records a failed delivery: tried again at `retry_at`, or given up when `None`.
    pub async fn notice_failed(
        &self,
        id: i64,
        error: &str,
        retry_at: Option<i64>,
        now: i64,
    ) -> FarmResult<()> {
        self.metrics.webhook_failed(retry_at.is_none());
        Ok(self
            .store
            .notification_failed(id, error, retry_at, now)
            .await?)
    }

    /// How many builds there are and how many jobs are queued and running.
    pub async fn load_counts(&self) -> FarmResult<LoadCounts> {
        Ok(self.store.load_counts().await?)
    }
}
