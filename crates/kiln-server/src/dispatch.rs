//! The dispatcher: hands queued jobs to clients waiting in a long poll.
//!
//! A client's `POST /v1/claim` registers a [`Waiter`] and sleeps on a oneshot. One
//! dispatcher task, woken by [`Dispatcher::wake`] whenever a job may have become
//! available or a client starts waiting, reads the queue once, matches waiters (oldest
//! first) with the best job each may take, claims it in the store (one conditional
//! update: atomic even across server replicas) and sends it to the waiter. Nobody
//! sleeps and re-asks: a job is claimed as soon as it is queued.

use kiln_store::{Candidate, ClaimedJob, ClaimingClient, JobStore};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// How many queued jobs one dispatch round looks at.
const CANDIDATE_LIMIT: u32 = 2048;

/// A client waiting for a job.
struct Waiter {
    id: u64,
    /// The client as its claim describes it: recorded with the claim.
    client: ClaimingClient,
    reply: oneshot::Sender<ClaimedJob>,
}

impl Waiter {
    fn can_take(&self, candidate: &Candidate) -> bool {
        let assigned_ok = candidate
            .assigned_to
            .as_deref()
            .is_none_or(|client| client == self.client.id);
        let type_ok =
            self.client.include.iter().any(|include| {
                include == "*" || include.eq_ignore_ascii_case(&candidate.config_type)
            });
        assigned_ok && type_ok
    }
}

/// Matches waiting clients with queued jobs.
pub struct Dispatcher {
    store: Arc<dyn JobStore>,
    waiters: Mutex<VecDeque<Waiter>>,
    wake: Notify,
    next_id: AtomicU64,
    lease_secs: u64,
}

/// Removes a waiter that gave up (timed out, or its client hung up).
struct WaiterGuard<'a> {
    dispatcher: &'a Dispatcher,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.dispatcher.remove_waiter(self.id);
    }
}

impl Dispatcher {
    /// A dispatcher over `store`, granting leases of `lease_secs`.
    pub fn new(store: Arc<dyn JobStore>, lease_secs: u64) -> Arc<Self> {
        Arc::new(Dispatcher {
            store,
            waiters: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            next_id: AtomicU64::new(1),
            lease_secs,
        })
    }

    /// Says that a job may have become available (or a waiter arrived).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// How many clients are waiting now.
    pub fn n_waiting(&self) -> usize {
        self.waiters.lock().expect("waiter list poisoned").len()
    }

    fn remove_waiter(&self, id: u64) -> bool {
        let mut waiters = self.waiters.lock().expect("waiter list poisoned");
        let before = waiters.len();
        waiters.retain(|waiter| waiter.id != id);
        waiters.len() != before
    }

    /// Waits up to `wait` for a job this client may take; `None` when none came.
    pub async fn wait_for_job(&self, client: ClaimingClient, wait: Duration) -> Option<ClaimedJob> {
        let (reply, mut receiver) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.waiters
            .lock()
            .expect("waiter list poisoned")
            .push_back(Waiter { id, client, reply });
        let _guard = WaiterGuard {
            dispatcher: self,
            id,
        };
        self.wake();
        match tokio::time::timeout(wait, &mut receiver).await {
            Ok(result) => result.ok(),
            Err(_elapsed) => {
                if self.remove_waiter(id) {
                    None
                } else {
                    // The dispatcher took this waiter just now: its answer is on the way.
                    receiver.await.ok()
                }
            }
        }
    }

    /// The dispatcher task: one round per wake-up, until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => {
                    // Dropping the waiters' senders answers their long polls with "no job".
                    self.waiters.lock().expect("waiter list poisoned").clear();
                    return;
                }
            }
            if let Err(err) = self.round().await {
                tracing::error!(cause = %err, "dispatch round failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.wake();
            }
        }
    }

    async fn round(&self) -> Result<(), kiln_store::StoreError> {
        if self.n_waiting() == 0 {
            return Ok(());
        }
        let mut candidates = self.store.queued_candidates(CANDIDATE_LIMIT).await?;
        if candidates.is_empty() {
            return Ok(());
        }
        // Match each waiter, oldest first, with the best job it may take.
        let matches: Vec<(u64, ClaimingClient, Candidate)> = {
            let waiters = self.waiters.lock().expect("waiter list poisoned");
            let mut matches = Vec::new();
            for waiter in waiters.iter() {
                if let Some(idx) = candidates
                    .iter()
                    .position(|candidate| waiter.can_take(candidate))
                {
                    matches.push((waiter.id, waiter.client.clone(), candidates.remove(idx)));
                }
                if candidates.is_empty() {
                    break;
                }
            }
            matches
        };
        let mut missed = false;
        for (waiter_id, client, candidate) in matches {
            let now = crate::now_micros();
            let lease_until = now + self.lease_secs as i64 * 1_000_000;
            let claimed = self
                .store
                .claim(&candidate.build, &candidate.job, &client, lease_until, now)
                .await?;
            let Some(claimed) = claimed else {
                // Another replica took it first; this waiter gets another round.
                missed = true;
                continue;
            };
            let waiter = {
                let mut waiters = self.waiters.lock().expect("waiter list poisoned");
                waiters
                    .iter()
                    .position(|waiter| waiter.id == waiter_id)
                    .and_then(|idx| waiters.remove(idx))
            };
            let undelivered = match waiter {
                Some(waiter) => waiter.reply.send(claimed).err(),
                None => Some(claimed),
            };
            if let Some(claimed) = undelivered {
                // The client stopped waiting between match and claim: give the job back
                // at once rather than letting its lease lapse.
                tracing::info!(build = %claimed.build, job = %claimed.job, client = %client.id, "waiter gone; job released");
                self.store
                    .release(
                        &claimed.build,
                        &claimed.job,
                        &claimed.lease,
                        crate::now_micros(),
                    )
                    .await?;
                missed = true;
            }
        }
        if missed {
            self.wake();
        }
        Ok(())
    }
}
