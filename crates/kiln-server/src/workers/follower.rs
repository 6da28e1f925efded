//! The follower: hears of what other servers sharing the store change (jobs queued,
//! claimed, ended on them) and has this server look again: its dispatcher reads the
//! queue, its event streams wake, and, when a job ended, its notifier. Runs only when
//! the store can be shared (PostgreSQL); see `kiln_store::Queue::follow_changes`.

use super::{Worker, WorkerError};
use crate::domain::Farm;
use async_trait::async_trait;
use kiln_store::Change;
use std::sync::Arc;
use tokio::sync::mpsc;

pub struct Follower {
    farm: Arc<Farm>,
    feed: mpsc::Receiver<Change>,
    /// Whether a job ended in the changes heard since the last look.
    ended: bool,
}

impl Follower {
    pub fn new(farm: Arc<Farm>, feed: mpsc::Receiver<Change>) -> Self {
        Follower {
            farm,
            feed,
            ended: false,
        }
    }
}

#[async_trait]
impl Worker for Follower {
    fn name(&self) -> &'static str {
        "follower"
    }

    async fn wait_for_work(&mut self) {
        let Some(change) = self.feed.recv().await else {
            // The feed ended (the store is closing): nothing more will come.
            std::future::pending::<()>().await;
            return;
        };
        // One look for every word waiting.
        self.ended = change.ended;
        while let Ok(change) = self.feed.try_recv() {
            self.ended |= change.ended;
        }
    }

    async fn work(&mut self) -> Result<(), WorkerError> {
        self.farm.changed_elsewhere(std::mem::take(&mut self.ended));
        Ok(())
    }
}
