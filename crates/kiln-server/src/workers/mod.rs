//! Background work, in one shape.
//!
//! Each [`Worker`] has a name, waits for work ([`Worker::wait_for_work`]) and does a
//! round of it ([`Worker::work`]). One [`Workers`] runner owns them all: it runs each
//! in a task, keeps its [`WorkerStatus`] (state, rounds, errors and the last error),
//! backs off after a failed round, records a panic as the worker's failure, and stops
//! them all with a deadline, reporting any that failed or did not stop. The statuses
//! show in `/metrics` and in `GET /v1/health`.
//!
//! The workers: `dispatcher` (hands queued jobs to waiting clients), `timekeeper`
//! (lapsed leases, hung jobs, accept deadlines), `notifier` (webhooks from the outbox)
//! `registrar` (registration with masters, when the server has any) and `follower`
//! (other servers' changes, when the store is shared).

mod follower;
mod notifier;
mod registrar;
mod timekeeper;

pub use follower::Follower;
pub use notifier::{backoff, Notifier};
pub use registrar::Registrar;
pub use timekeeper::Timekeeper;

use async_trait::async_trait;
use futures::FutureExt;
use serde::Serialize;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The first pause after a failed round; it doubles with each failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The longest pause after failed rounds.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a round of work failed, in words for the log and the status.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WorkerError(pub String);

impl WorkerError {
    /// The error with its causes.
    pub fn of(err: &dyn std::error::Error) -> Self {
        WorkerError(kiln_proto::error_chain(err))
    }
}

/// A piece of background work.
#[async_trait]
pub trait Worker: Send + 'static {
    /// The worker's name in logs, metrics and the health answer.
    fn name(&self) -> &'static str;
    /// Waits until there may be work (a tick, a wake-up).
    async fn wait_for_work(&mut self);
    /// Does one round of work.
    async fn work(&mut self) -> Result<(), WorkerError>;
    /// The runner stopped the worker (no round is running).
    fn stopped(&mut self) {}
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Waiting for work.
    Idle,
    /// In a round.
    Busy,
    /// Pausing after a failed round.
    BackingOff,
    /// Stopped by the runner.
    Stopped,
    /// Panicked: it does no more work.
    Failed,
}

impl WorkerState {
    /// Every state, for metrics that show one series per state.
    pub const ALL: [WorkerState; 5] = [
        WorkerState::Idle,
        WorkerState::Busy,
        WorkerState::BackingOff,
        WorkerState::Stopped,
        WorkerState::Failed,
    ];

    /// The state's name as the health answer and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::BackingOff => "backing_off",
            WorkerState::Stopped => "stopped",
            WorkerState::Failed => "failed",
        }
    }
}

/// A worker's status as the runner keeps it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkerStatus {
    pub name: &'static str,
    pub state: WorkerState,
    /// Rounds done, failed ones included.
    pub n_rounds: u64,
    /// Rounds that failed.
    pub n_errors: u64,
    /// The latest failure, if any.
    pub last_error: Option<String>,
    /// When it happened (unix microseconds).
    pub last_error_at: Option<i64>,
}

/// How stopping the workers went.
#[derive(Debug, Default)]
pub struct StopReport {
    /// Workers that stopped in time.
    pub stopped: Vec<&'static str>,
    /// Workers that failed (panicked) or did not stop in time, with what happened.
    pub failed: Vec<(&'static str, String)>,
}

struct Entry {
    status: Arc<Mutex<WorkerStatus>>,
    task: Option<JoinHandle<()>>,
}

/// The runner of every background worker; see the module docs.
pub struct Workers {
    entries: Mutex<Vec<Entry>>,
    stop: watch::Sender<bool>,
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            entries: Mutex::default(),
            stop: watch::channel(false).0,
        }
    }
}

impl Workers {
    /// Starts `worker` in a task of its own.
    pub fn spawn(&self, worker: impl Worker) {
        let status = Arc::new(Mutex::new(WorkerStatus {
            name: worker.name(),
            state: WorkerState::Idle,
            n_rounds: 0,
            n_errors: 0,
            last_error: None,
            last_error_at: None,
        }));
        let task = tokio::spawn(run(worker, status.clone(), self.stop.subscribe()));
        self.entries.lock().expect("workers lock").push(Entry {
            status,
            task: Some(task),
        });
    }

    /// Every worker's status, in the order they were started.
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        self.entries
            .lock()
            .expect("workers lock")
            .iter()
            .map(|entry| entry.status.lock().expect("worker status lock").clone())
            .collect()
    }

    /// Stops every worker (a round under way finishes first) and waits for them, at
    /// most `deadline` in all; a worker still running then is aborted.
    pub async fn stop(&self, deadline: Duration) -> StopReport {
        let _ = self.stop.send(true);
        let tasks: Vec<(Arc<Mutex<WorkerStatus>>, JoinHandle<()>)> = self
            .entries
            .lock()
            .expect("workers lock")
            .iter_mut()
            .filter_map(|entry| Some((entry.status.clone(), entry.task.take()?)))
            .collect();
        let until = tokio::time::Instant::now() + deadline;
        let mut report = StopReport::default();
        for (status, mut task) in tasks {
            let name = status.lock().expect("worker status lock").name;
            match tokio::time::timeout_at(until, &mut task).await {
                Ok(Ok(())) => {
                    let status = status.lock().expect("worker status lock");
                    if status.state == WorkerState::Failed {
                        report.failed.push((
                            name,
                            status.last_error.clone().unwrap_or_else(|| "failed".into()),
                        ));
                    } else {
                        report.stopped.push(name);
                    }
                }
                Ok(Err(err)) => report
                    .failed
                    .push((name, format!("its task failed: {err}"))),
                Err(_) => {
                    task.abort();
                    report.failed.push((
                        name,
                        format!("did not stop within {} ms", deadline.as_millis()),
                    ));
                }
            }
        }
        report
    }
}

/// One worker's life: wait, work, record, until the runner says stop.
async fn run(
    mut worker: impl Worker,
    status: Arc<Mutex<WorkerStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let name = worker.name();
    let set_state = |state| status.lock().expect("worker status lock").state = state;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = worker.wait_for_work() => {}
        }
        if *stop.borrow() {
            break;
        }
        set_state(WorkerState::Busy);
        let outcome = AssertUnwindSafe(worker.work()).catch_unwind().await;
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err.0),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                    .unwrap_or_else(|| "panicked".to_owned());
                let mut status = status.lock().expect("worker status lock");
                status.n_rounds += 1;
                status.n_errors += 1;
                status.state = WorkerState::Failed;
                status.last_error = Some(format!("panicked: {message}"));
                status.last_error_at = Some(kiln_common::now_micros());
                tracing::error!(worker = name, cause = %message, "background worker panicked; it does no more work");
                return;
            }
        };
        let pause = {
            let mut status = status.lock().expect("worker status lock");
            status.n_rounds += 1;
            match failure {
                None => {
                    backoff = FIRST_BACKOFF;
                    status.state = WorkerState::Idle;
                    None
                }
                Some(cause) => {
                    status.n_errors += 1;
                    tracing::error!(worker = name, cause = %cause, n_errors = status.n_errors, "background work failed");
                    status.last_error = Some(cause);
                    status.last_error_at = Some(kiln_common::now_micros());
                    status.state = WorkerState::BackingOff;
                    let pause = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    Some(pause)
                }
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(pause) => {}
            }
            set_state(WorkerState::Idle);
        }
    }
    worker.stopped();
    set_state(WorkerState::Stopped);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails its first `n_failures` rounds, then succeeds; panics on round `panic_at`.
    struct Flaky {
        rounds: Arc<AtomicU32>,
        n_failures: u32,
        panic_at: Option<u32>,
    }

    #[async_trait]
    impl Worker for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }

        async fn wait_for_work(&mut self) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        async fn work(&mut self) -> Result<(), WorkerError> {
            let round = self.rounds.fetch_add(1, Ordering::SeqCst) + 1;
            if Some(round) == self.panic_at {
                panic!("round {round} went wrong");
            }
            if round <= self.n_failures {
                return Err(WorkerError(format!("round {round} failed")));
            }
            Ok(())
        }
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn failed_rounds_are_counted_with_the_last_error_and_the_worker_goes_on() {
        let workers = Workers::default();
        let rounds = Arc::new(AtomicU32::new(0));
        workers.spawn(Flaky {
            rounds: rounds.clone(),
            n_failures: 2,
            panic_at: None,
        });
        wait_for("rounds after the failures", || {
            rounds.load(Ordering::SeqCst) >= 4
        })
        .await;
        let status = &workers.statuses()[0];
        assert_eq!(status.name, "flaky");
        assert_eq!(status.n_errors, 2);
        assert_eq!(status.last_error.as_deref(), Some("round 2 failed"));
        assert!(status.n_rounds >= 3, "{status:?}");
        let report = workers.stop(Duration::from_secs(5)).await;
        assert_eq!(report.stopped, ["flaky"]);
        assert!(report.failed.is_empty(), "{report:?}");
        assert_eq!(workers.statuses()[0].state, WorkerState::Stopped);
    }

    #[tokio::test]
    async fn a_panicking_worker_is_failed_and_reported_at_stop() {
        let workers = Workers::default();
        let rounds = Arc::new(AtomicU32::new(0));
        workers.spawn(Flaky {
            rounds: rounds.clone(),
            n_failures: 0,
            panic_at: Some(2),
        });
        wait_for("the panic", || {
            workers.statuses()[0].state == WorkerState::Failed
        })
        .await;
        let status = &workers.statuses()[0];
        assert_eq!(
            status.last_error.as_deref(),
            Some("panicked: round 2 went wrong")
        );
        let report = workers.stop(Duration::from_secs(5)).await;
        assert!(report.stopped.is_empty());
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, "flaky");
        assert!(
            report.failed[0].1.contains("round 2 went wrong"),
            "{report:?}"
        );
    }

    /// Never finishes a round.
    struct Stuck;

    #[async_trait]
    impl Worker for Stuck {
        fn name(&self) -> &'static str {
            "stuck"
        }

        async fn wait_for_work(&mut self) {}

        async fn work(&mut self) -> Result<(), WorkerError> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_worker_that_does_not_stop_in_time_is_reported_and_aborted() {
        let workers = Workers::default();
        workers.spawn(Stuck);
        wait_for("the round to start", || {
            workers.statuses()[0].state == WorkerState::Busy
        })
        .await;
        let report = workers.stop(Duration::from_millis(50)).await;
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, "stuck");
        assert!(report.failed[0].1.contains("did not stop within 50 ms"));
    }
}
