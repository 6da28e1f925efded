//! The timekeeper: reclaims jobs whose lease lapsed (or whose client hung past the
//! timeout) and expires jobs nobody accepted in time.

use super::{Worker, WorkerError};
use crate::domain::Farm;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How often the earliest deadline in the store is read.
const TICK: Duration = Duration::from_millis(200);
/// How often jobs held past their timeout are looked for: the store's next deadline
/// does not cover them.
const HUNG_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Each tick reads the earliest deadline (a cheap read) and writes only when one has
/// passed, or when the look for hung jobs is due.
pub struct Timekeeper {
    farm: Arc<Farm>,
    last_hung_check: Instant,
}

impl Timekeeper {
    pub fn new(farm: Arc<Farm>) -> Self {
        Timekeeper {
            farm,
            last_hung_check: Instant::now(),
        }
    }
}

#[async_trait]
impl Worker for Timekeeper {
    fn name(&self) -> &'static str {
        "timekeeper"
    }

    async fn wait_for_work(&mut self) {
        tokio::time::sleep(TICK).await;
    }

    async fn work(&mut self) -> Result<(), WorkerError> {
        let now = kiln_common::now_micros();
        let deadline_passed = self
            .farm
            .next_deadline()
            .await
            .map_err(|err| WorkerError::of(&err))?
            .is_some_and(|deadline| deadline <= now);
        let hung_check_due = self.last_hung_check.elapsed() >= HUNG_CHECK_EVERY;
        if !deadline_passed && !hung_check_due {
            return Ok(());
        }
        self.farm
            .apply_time(now)
            .await
            .map_err(|err| WorkerError::of(&err))?;
        self.last_hung_check = Instant::now();
        Ok(())
    }
}
