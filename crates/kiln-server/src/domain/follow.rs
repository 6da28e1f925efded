//! Following the farm as it changes, for server-sent event streams: a [`Follower`]
//! wakes when jobs or logs change (or the server stops), and the reads a stream sends
//! from (every build's events after a sequence number).

use super::{Farm, FarmResult};
use kiln_proto::api::Event;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The most events one read of the farm's event log returns.
pub const FARM_EVENTS_PAGE: u32 = 500;

/// How long a follower lets changes gather before it says so: a burst of log batches
/// and heartbeats is one wake-up, not one each.
const GATHER: Duration = Duration::from_millis(250);

/// Wakes on the farm's changes; holds nothing while it waits.
pub struct Follower {
    changes: watch::Receiver<u64>,
    stopping: watch::Receiver<bool>,
}

impl Follower {
    /// Waits until something changed since the last call (or since the follower was
    /// made), then a moment more for changes that come with it. False when the server
    /// stops or `until` passes first.
    pub async fn changed(&mut self, until: Instant) -> bool {
        if *self.stopping.borrow_and_update() {
            return false;
        }
        tokio::select! {
            changed = self.changes.changed() => {
                if changed.is_err() {
                    return false;
                }
            }
            _ = self.stopping.changed() => return false,
            _ = tokio::time::sleep_until(until) => return false,
        }
        tokio::select! {
            _ = tokio::time::sleep(GATHER) => {}
            _ = self.stopping.changed() => return false,
        }
        self.changes.borrow_and_update();
        !*self.stopping.borrow()
    }
}

impl Farm {
    /// A follower of the farm's changes from now on.
    pub fn follower(&self) -> Follower {
        let mut changes = self.changes.subscribe();
        changes.borrow_and_update();
        Follower {
            changes,
            stopping: self.stopping.subscribe(),
        }
    }

    /// Every build's events after `after`, oldest first, a page at a time.
    pub async fn farm_events(&self, after: i64) -> FarmResult<Vec<Event>> {
        Ok(self.store.farm_events(after, FARM_EVENTS_PAGE).await?)
    }

    /// The newest event's sequence number (0 with none).
    pub async fn last_event_seq(&self) -> FarmResult<i64> {
        Ok(self.store.last_event_seq().await?)
    }

    /// A job's log lines after `after`, a page at a time, without waiting.
    pub async fn log_after(
        &self,
        build: &str,
        job: &str,
        after: i64,
    ) -> FarmResult<Vec<kiln_proto::api::LogLine>> {
        Ok(self
            .store
            .read_log(build, job, after, super::jobs::LOG_PAGE)
            .await?)
    }
}
