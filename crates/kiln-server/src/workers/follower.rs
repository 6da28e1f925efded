//! The follower: hears of what other servers sharing the store change (jobs queued,
//! claimed, ended on them) and has this server look again: its dispatcher reads the
//! queue, and its event streams and notifier wake. Runs only when the store can be
//! shared (PostgreSQL); see `kiln_store::Queue::follow_changes`.

use super::{Worker, WorkerError};
use crate::domain::Farm;
use async_trait::async_trait;
use std::sync::Arc;
use tokio::sync::mpsc;

pub struct Follower {
    farm: Arc<Farm>,
    feed: mpsc::Receiver<()>,
}

impl Follower {
    pub fn new(farm: Arc<Farm>, feed: mpsc::Receiver<()>) -> Self {
        Follower { farm, feed }
    }
}

#[async_trait]
impl Worker for Follower {
    fn name(&self) -> &'static str {
        "follower"
    }

    async fn wait_for_work(&mut self) {
        if self.feed.recv().await.is_none() {
            // The feed ended (the store is closing): nothing more will come.
            std::future::pending::<()>().await;
        }
    }

    async fn work(&mut self) -> Result<(), WorkerError> {
        self.farm.changed_elsewhere();
        Ok(())
    }
}
