//! The job state machine.
//!
//! `queued → running → finished | failed`, `queued → expired`, `running → queued`
//! (lease lost), and any non-final state `→ cancelled`. A restart puts a final job back
//! to `queued`. [`JobState::can_become`] is the one place these arrows are written.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a client to claim it.
    Queued,
    /// Claimed by a client that holds its lease.
    Running,
    /// Its images are stored and verified.
    Finished,
    /// A step failed, it timed out, or it lost too many leases.
    Failed,
    /// Nobody claimed it before its accept deadline.
    Expired,
    /// An operator cancelled it.
    Cancelled,
}

impl JobState {
    /// Every state, in the order operators read them.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Finished,
        JobState::Failed,
        JobState::Expired,
        JobState::Cancelled,
    ];

    /// The lowercase name used in the API, the store and the event log.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Finished => "finished",
            JobState::Failed => "failed",
            JobState::Expired => "expired",
            JobState::Cancelled => "cancelled",
        }
    }

    /// A final state changes only by an operator's restart.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    /// Whether the state machine allows `self → next`.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        match (self, next) {
            (Queued, Running) | (Queued, Expired) => true,
            (Running, Finished) | (Running, Failed) | (Running, Queued) => true,
            (Queued, Cancelled) | (Running, Cancelled) => true,
            // An operator's restart puts a job that ended back in the queue.
            (from, Queued) if from.is_final() => true,
            _ => false,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of [`JobState::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().unwrap(), state);
        }
        assert!("done".parse::<JobState>().is_err());
    }

    #[test]
    fn finished_job_cannot_run_or_fail() {
        assert!(!JobState::Finished.can_become(JobState::Running));
        assert!(!JobState::Finished.can_become(JobState::Failed));
        assert!(!JobState::Expired.can_become(JobState::Running));
        assert!(!JobState::Queued.can_become(JobState::Finished));
    }

    #[test]
    fn lease_loss_and_restart_requeue() {
        assert!(JobState::Running.can_become(JobState::Queued));
        assert!(JobState::Failed.can_become(JobState::Queued));
        assert!(JobState::Cancelled.can_become(JobState::Queued));
        assert!(!JobState::Queued.can_become(JobState::Queued));
    }
}
