//! The dispatcher: hands queued jobs to clients waiting in a long poll.
//!
//! A client's `POST /v1/claim` registers a [`Waiter`] and sleeps on a oneshot. One
//! dispatcher task, woken by [`Dispatcher::wake`] whenever a job may have become
//! available or a client starts waiting, reads the queue once, matches waiters (oldest
//! first) with the best job each may take, claims it in the store (one conditional
//! update: atomic even across server replicas) and sends it to the waiter. Nobody
//! sleeps and re-asks: a job is claimed as soon as it is queued.
//!
//! A client serving several servers waits with `POST /v1/offer` instead: its waiter is
//! told of the best job it may take without claiming it, so that the client can
//! compare the servers' offers and claim the best. Claims are matched first; each
//! queued job is offered to one offer waiter at a time and held for [`OFFER_HOLD`]
//! before the next is told of it, so one new job does not wake every idle client.
use crate::workers::{Worker, WorkerError};
use async_trait::async_trait;
use futures::future;
use kiln_store::{Candidate, ClaimedJob, ClaimingClient, Store};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// The most queued jobs one dispatch round looks at.
const CANDIDATE_LIMIT: u32 = 2048;

/// The queued jobs a round reads first: the best few, so that a round costs the same
/// with 300 or 10,000 jobs queued. A round reads further (eight times as many each
/// time, up to [`CANDIDATE_LIMIT`]) only while a waiter finds nothing it may take in
/// what was read and more jobs are queued.
const FIRST_PAGE: u32 = 64;

/// How long a job offered to one offer waiter is kept from the others: time for that
/// client to compare offers and claim.
pub const OFFER_HOLD: Duration = Duration::from_secs(2);

/// What a waiter is waiting for.
enum Reply {
    /// A job claimed for it.
    Claim(oneshot::Sender<ClaimedJob>),
    /// Word of a job it may take, not claimed.
    Offer(oneshot::Sender<Candidate>),
}

/// A client waiting for a job.
struct Waiter {
    id: u64,
    /// The client as its request describes it: recorded with a claim.
    client: ClaimingClient,
    reply: Reply,
}

impl Waiter {
    fn can_take(&self, candidate: &Candidate) -> bool {
        can_take(&self.client.id, &self.client.include, candidate)
    }

    fn is_offer(&self) -> bool {
        matches!(self.reply, Reply::Offer(_))
    }
}

/// Whether a client with these config types may run `candidate`.
fn can_take(client_id: &str, include: &[String], candidate: &Candidate) -> bool {
    let assigned_ok = candidate
        .assigned_to
        .as_deref()
        .is_none_or(|client| client == client_id);
    let type_ok = include
        .iter()
        .any(|include| include == "*" || include.eq_ignore_ascii_case(&candidate.config_type));
    assigned_ok && type_ok
}

/// Matches waiting clients with queued jobs.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    waiters: Mutex<VecDeque<Waiter>>,
    wake: Notify,
    next_id: AtomicU64,
    lease_secs: u64,
    /// Jobs lately offered to an offer waiter, until when they are held.
    offered: Mutex<HashMap<(String, String), Instant>>,
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
    pub fn new(store: Arc<dyn Store>, lease_secs: u64) -> Arc<Self> {
        Arc::new(Dispatcher {
            store,
            waiters: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            next_id: AtomicU64::new(1),
            lease_secs,
            offered: Mutex::new(HashMap::new()),
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
        let (reply, receiver) = oneshot::channel();
        self.wait(client, wait, Reply::Claim(reply), receiver).await
    }

    /// Waits up to `wait` to hear of a job this client may take, without claiming it;
    /// `None` when none came.
    pub async fn wait_for_offer(
        &self,
        client_id: &str,
        include: &[String],
        wait: Duration,
    ) -> Option<Candidate> {
        let (reply, receiver) = oneshot::channel();
        let client = ClaimingClient {
            id: client_id.to_owned(),
            include: include.to_vec(),
            ..ClaimingClient::default()
        };
        self.wait(client, wait, Reply::Offer(reply), receiver).await
    }

    /// The best job this client may take now, not claimed; `None` when there is none.
    pub async fn offer_now(
        &self,
        client_id: &str,
        include: &[String],
    ) -> Result<Option<Candidate>, kiln_store::StoreError> {
        // The client asks now, so any wait of its here is one it gave up on.
        self.waiters
            .lock()
            .expect("waiter list poisoned")
            .retain(|waiter| waiter.client.id != client_id);
        let mut limit = FIRST_PAGE;
        loop {
            let candidates = self.store.queued_candidates(limit).await?;
            let read_all = candidates.len() < limit as usize || limit >= CANDIDATE_LIMIT;
            let best = candidates
                .into_iter()
                .find(|candidate| can_take(client_id, include, candidate));
            if best.is_some() || read_all {
                return Ok(best);
            }
            limit = limit.saturating_mul(8).min(CANDIDATE_LIMIT);
        }
    }

    /// The best queued jobs, enough that every waiter finds one it may take (as a
    /// round matches them, oldest waiter first) or every queued job up to
    /// [`CANDIDATE_LIMIT`].
    async fn candidates(&self) -> Result<Vec<Candidate>, kiln_store::StoreError> {
        let n_waiting = u32::try_from(self.n_waiting()).unwrap_or(u32::MAX);
        let mut limit = FIRST_PAGE
            .max(n_waiting.saturating_mul(2))
            .min(CANDIDATE_LIMIT);
        loop {
            let candidates = self.store.queued_candidates(limit).await?;
            if candidates.len() < limit as usize
                || limit >= CANDIDATE_LIMIT
                || self.every_waiter_finds_one(&candidates)
            {
                return Ok(candidates);
            }
            limit = limit.saturating_mul(8).min(CANDIDATE_LIMIT);
        }
    }

    /// Whether matching the waiters, oldest first, each with the first job it may take
    /// and nobody has taken, leaves no waiter without one.
    fn every_waiter_finds_one(&self, candidates: &[Candidate]) -> bool {
        let waiters = self.waiters.lock().expect("waiter list poisoned");
        let mut taken = vec![false; candidates.len()];
        waiters.iter().all(|waiter| {
            let found = candidates
                .iter()
                .enumerate()
                .position(|(idx, candidate)| !taken[idx] && waiter.can_take(candidate));
            if let Some(idx) = found {
                taken[idx] = true;
            }
            found.is_some()
        })
    }

    async fn wait<T>(
        &self,
        client: ClaimingClient,
        wait: Duration,
        reply: Reply,
        mut receiver: oneshot::Receiver<T>,
    ) -> Option<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut waiters = self.waiters.lock().expect("waiter list poisoned");
            // A client waits once per server at a time: an older waiter of the same client
            // is a request it gave up on (the server does not notice a client hanging up
            // while a handler waits). Dropping it answers it with "nothing" and keeps a
            // job from being handed to it.
            waiters.retain(|waiter| waiter.client.id != client.id);
            waiters.push_back(Waiter { id, client, reply });
        }
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

    fn take_waiter(&self, id: u64) -> Option<Waiter> {
        let mut waiters = self.waiters.lock().expect("waiter list poisoned");
        waiters
            .iter()
            .position(|waiter| waiter.id == id)
            .and_then(|idx| waiters.remove(idx))
    }

    /// One round; returns when the earliest held offer lapses if an offer waiter is
    /// still waiting.
    async fn round(&self) -> Result<Option<Instant>, kiln_store::StoreError> {
        if self.n_waiting() == 0 {
            return Ok(None);
        }
        let mut candidates = self.candidates().await?;
        if candidates.is_empty() {
            self.offered.lock().expect("offer holds poisoned").clear();
            return Ok(None);
        }
        // Match each claim waiter, oldest first, with the best job it may take; then
        // tell each offer waiter of the best job left that nobody else is considering.
        let mut hold_ends = None;
        let (matches, offers) = {
            let waiters = self.waiters.lock().expect("waiter list poisoned");
            let mut matches: Vec<(u64, ClaimingClient, Candidate)> = Vec::new();
            for waiter in waiters.iter().filter(|waiter| !waiter.is_offer()) {
                if candidates.is_empty() {
                    break;
                }
                if let Some(idx) = candidates
                    .iter()
                    .position(|candidate| waiter.can_take(candidate))
                {
                    matches.push((waiter.id, waiter.client.clone(), candidates.remove(idx)));
                }
            }
            let now = Instant::now();
            let mut offered = self.offered.lock().expect("offer holds poisoned");
            offered.retain(|_, until| *until > now);
            candidates.retain(|candidate| {
                !offered.contains_key(&(candidate.build.clone(), candidate.job.clone()))
            });
            let mut offers: Vec<(u64, Candidate)> = Vec::new();
            let mut n_unanswered = 0;
            for waiter in waiters.iter().filter(|waiter| waiter.is_offer()) {
                match candidates
                    .iter()
                    .position(|candidate| waiter.can_take(candidate))
                {
                    Some(idx) => {
                        let candidate = candidates.remove(idx);
                        offered.insert(
                            (candidate.build.clone(), candidate.job.clone()),
                            now + OFFER_HOLD,
                        );
                        offers.push((waiter.id, candidate));
                    }
                    None => n_unanswered += 1,
                }
            }
            if n_unanswered > 0 {
                hold_ends = offered.values().min().copied();
            }
            (matches, offers)
        };
        let mut missed = false;
        for (waiter_id, candidate) in offers {
            let delivered = match self.take_waiter(waiter_id) {
                Some(Waiter {
                    reply: Reply::Offer(reply),
                    ..
                }) => reply.send(candidate.clone()).is_ok(),
                _ => false,
            };
            if !delivered {
                // Nobody heard of it: free it for the next waiter.
                self.offered
                    .lock()
                    .expect("offer holds poisoned")
                    .remove(&(candidate.build, candidate.job));
                missed = true;
            }
        }
        // Every match claimed at once: on PostgreSQL they share one transaction (the
        // store's batches), on SQLite one group commit. A claim that fails leaves the
        // others delivered, and the round's error is its.
        let now = kiln_common::now_micros();
        let lease_until = now + self.lease_secs as i64 * 1_000_000;
        let claims = future::join_all(matches.iter().map(|(_, client, candidate)| {
            self.store
                .claim(&candidate.build, &candidate.job, client, lease_until, now)
        }))
        .await;
        let mut failed = None;
        for ((waiter_id, client, _), claimed) in matches.into_iter().zip(claims) {
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(err) => {
                    failed.get_or_insert(err);
                    missed = true;
                    continue;
                }
            };
            let Some(claimed) = claimed else {
                // Another replica took it first; this waiter gets another round.
                missed = true;
                continue;
            };
            let undelivered = match self.take_waiter(waiter_id) {
                Some(Waiter {
                    reply: Reply::Claim(reply),
                    ..
                }) => reply.send(claimed).err(),
                _ => Some(claimed),
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
                        kiln_common::now_micros(),
                    )
                    .await?;
                missed = true;
            }
        }
        if missed {
            self.wake();
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(hold_ends),
        }
    }
}

/// The dispatcher as a background worker: one round each time it is woken (a job may
/// have become available, a client started waiting) or a held offer lapses.
pub struct DispatchWorker {
    dispatcher: Arc<Dispatcher>,
    /// When a held offer lapses while offer waiters wait, so that the next is told.
    hold_ends: Option<Instant>,
}

impl DispatchWorker {
    pub fn new(dispatcher: Arc<Dispatcher>) -> Self {
        DispatchWorker {
            dispatcher,
            hold_ends: None,
        }
    }
}

#[async_trait]
impl Worker for DispatchWorker {
    fn name(&self) -> &'static str {
        "dispatcher"
    }

    async fn wait_for_work(&mut self) {
        let hold_timer = async {
            match self.hold_ends {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.dispatcher.wake.notified() => {}
            _ = hold_timer => {}
        }
    }

    async fn work(&mut self) -> Result<(), WorkerError> {
        match self.dispatcher.round().await {
            Ok(hold_ends) => {
                self.hold_ends = hold_ends;
                Ok(())
            }
            Err(err) => {
                // The runner pauses, then the next round reads the queue again.
                self.hold_ends = None;
                self.dispatcher.wake();
                Err(WorkerError::of(&err))
            }
        }
    }

    fn stopped(&mut self) {
        // Dropping the waiters' senders answers their long polls with "no job".
        self.dispatcher
            .waiters
            .lock()
            .expect("waiter list poisoned")
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::manifest::{BuildManifest, JobSpec};
    use kiln_store::{NewBuild, Queue, SqliteStore};

    fn job(id: &str, priority: i64) -> JobSpec {
        JobSpec {
            id: id.into(),
            title: id.into(),
            config_type: "PRO".into(),
            install_script: "i.sh".into(),
            configure_script: None,
            image_script: "i.sh".into(),
            verify_script: None,
            timeout_secs: 60,
            priority: Some(priority),
            accept_within_secs: None,
            assigned_to: None,
            max_attempts: None,
            retries: None,
        }
    }

    async fn dispatcher_with(
        dir: &std::path::Path,
        jobs: Vec<JobSpec>,
    ) -> (Arc<Dispatcher>, crate::workers::Workers) {
        let store = SqliteStore::open(&dir.join("kiln.db"))
            .await
            .expect("opening the store");
        store
            .insert_build(&NewBuild {
                manifest: BuildManifest {
                    number: "7".into(),
                    title: "t".into(),
                    build_time: None,
                    log_file: None,
                    notify: vec![],
                    jobs,
                },
                files_key: "0".repeat(64),
                files_size: 0,
                submitted_at: 1234,
                default_accept_within_secs: None,
                default_max_attempts: 3,
            })
            .await
            .expect("inserting a build");
        let dispatcher = Dispatcher::new(Arc::new(store), 60);
        let workers = crate::workers::Workers::default();
        workers.spawn(DispatchWorker::new(dispatcher.clone()));
        (dispatcher, workers)
    }

    fn types() -> Vec<String> {
        vec!["PRO".to_owned()]
    }

    fn claiming(id: &str) -> ClaimingClient {
        ClaimingClient {
            id: id.to_owned(),
            include: types(),
            ..ClaimingClient::default()
        }
    }

    /// A round reads the first page of the queue only; a waiter whose only job lies
    /// deeper (here behind 600 jobs of a type it does not take) still gets it, by
    /// claim and by offer.
    #[tokio::test]
    async fn a_waiter_gets_the_one_job_it_may_take_from_deep_in_the_queue() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut jobs: Vec<JobSpec> = (0..600)
            .map(|idx| {
                let mut other = job(&format!("home-{idx:03}"), 5);
                other.config_type = "HOME".into();
                other
            })
            .collect();
        jobs.push(job("pro-last", 1));
        jobs.push(job("pro-very-last", 0));
        let (dispatcher, _workers) = dispatcher_with(dir.path(), jobs).await;
        let offer = dispatcher
            .offer_now("c0", &types())
            .await
            .expect("offer")
            .expect("a job");
        assert_eq!(offer.job, "pro-last");
        let first = dispatcher.wait_for_job(claiming("c1"), Duration::from_secs(5));
        let second = dispatcher.wait_for_job(claiming("c2"), Duration::from_secs(5));
        let (first, second) = tokio::join!(first, second);
        let mut claimed = vec![
            first.expect("a claim for c1").job,
            second.expect("a claim for c2").job,
        ];
        claimed.sort();
        assert_eq!(claimed, ["pro-last", "pro-very-last"]);
    }

    #[tokio::test]
    async fn an_offer_names_the_best_job_and_claims_nothing() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (dispatcher, _workers) =
            dispatcher_with(dir.path(), vec![job("low", 1), job("high", 5)]).await;
        let offer = dispatcher
            .offer_now("c1", &types())
            .await
            .expect("offer")
            .expect("a job");
        assert_eq!((offer.job.as_str(), offer.priority), ("high", 5));
        assert_eq!(offer.submitted_at, 1234);
        // Nothing was claimed: the same job is offered again, and claimed by a claim.
        let again = dispatcher.offer_now("c2", &types()).await.expect("offer");
        assert_eq!(again.map(|offer| offer.job), Some("high".to_owned()));
        let claimed = dispatcher
            .wait_for_job(claiming("c2"), Duration::from_secs(5))
            .await
            .expect("a claim");
        assert_eq!(claimed.job, "high");
        let next = dispatcher.offer_now("c1", &types()).await.expect("offer");
        assert_eq!(next.map(|offer| offer.job), Some("low".to_owned()));
        // A client that takes another type is offered nothing.
        let none = dispatcher
            .offer_now("c3", &["HOME".to_owned()])
            .await
            .expect("offer");
        assert!(none.is_none());
    }

    #[tokio::test]
    async fn one_job_is_offered_to_one_waiter_at_a_time() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (dispatcher, _workers) = dispatcher_with(dir.path(), vec![job("only", 1)]).await;
        let started = Instant::now();
        let waiters: Vec<_> = ["c1", "c2"]
            .into_iter()
            .map(|client| {
                let dispatcher = dispatcher.clone();
                tokio::spawn(async move {
                    let offer = dispatcher
                        .wait_for_offer(client, &types(), Duration::from_secs(10))
                        .await;
                    (offer.map(|offer| offer.job), started.elapsed())
                })
            })
            .collect();
        let mut answers = Vec::new();
        for waiter in waiters {
            answers.push(waiter.await.expect("a waiter"));
        }
        answers.sort_by_key(|(_, elapsed)| *elapsed);
        // Both hear of the job (it was not claimed), the second only once the hold on
        // the first's offer lapsed.
        for (job, _) in &answers {
            assert_eq!(job.as_deref(), Some("only"), "{answers:?}");
        }
        assert!(
            answers[0].1 < OFFER_HOLD && answers[1].1 >= OFFER_HOLD,
            "one waiter is told at once, the other after the hold: {answers:?}"
        );
    }

    #[tokio::test]
    async fn a_claim_waiter_comes_before_an_offer_waiter() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (dispatcher, _workers) = dispatcher_with(dir.path(), Vec::new()).await;
        // No job yet: both wait; then the only job arrives.
        let types = types();
        let offer = dispatcher.wait_for_offer("c1", &types, Duration::from_secs(3));
        let claim = dispatcher.wait_for_job(claiming("c2"), Duration::from_secs(3));
        let store = dispatcher.store.clone();
        let arrive = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            store
                .insert_build(&NewBuild {
                    manifest: BuildManifest {
                        number: "8".into(),
                        title: "t".into(),
                        build_time: None,
                        log_file: None,
                        notify: vec![],
                        jobs: vec![job("late", 1)],
                    },
                    files_key: "0".repeat(64),
                    files_size: 0,
                    submitted_at: 2,
                    default_accept_within_secs: None,
                    default_max_attempts: 3,
                })
                .await
                .expect("inserting a build");
            dispatcher.wake();
        };
        let (offered, claimed, ()) = tokio::join!(offer, claim, arrive);
        assert_eq!(claimed.map(|job| job.job), Some("late".to_owned()));
        assert!(
            offered.is_none(),
            "the job went to the claim; nothing is left to offer: {offered:?}"
        );
    }

    #[tokio::test]
    async fn a_clients_new_request_ends_the_wait_it_gave_up_on() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (dispatcher, _workers) = dispatcher_with(dir.path(), Vec::new()).await;
        let started = Instant::now();
        // A wait of `client`'s (an offer or a claim) that it hung up on, which the
        // server did not notice; returns whether it ended with a job.
        let forget = |client: &'static str, claim: bool, wait: Duration| {
            let dispatcher = dispatcher.clone();
            tokio::spawn(async move {
                let got = if claim {
                    dispatcher
                        .wait_for_job(claiming(client), wait)
                        .await
                        .is_some()
                } else {
                    dispatcher
                        .wait_for_offer(client, &types(), wait)
                        .await
                        .is_some()
                };
                got
            })
        };
        let long = Duration::from_secs(30);
        let settle = || tokio::time::sleep(Duration::from_millis(100));

        // The same client asks again: the forgotten wait ends with nothing, so that no
        // job is offered into it.
        let forgotten = forget("c1", false, long);
        settle().await;
        assert!(dispatcher
            .offer_now("c1", &types())
            .await
            .expect("offer")
            .is_none());
        assert!(!forgotten.await.expect("the waiter"));
        // So does a forgotten claim when the client waits again.
        let forgotten = forget("c1", true, long);
        settle().await;
        let again = dispatcher
            .wait_for_offer("c1", &types(), Duration::from_millis(100))
            .await;
        assert!(again.is_none());
        assert!(!forgotten.await.expect("the waiter"));
        // And a forgotten claim when the client asks for offers now (a client that
        // went from one server to several).
        let forgotten = forget("c1", true, long);
        settle().await;
        dispatcher.offer_now("c1", &types()).await.expect("offer");
        assert!(!forgotten.await.expect("the waiter"));
        assert!(
            started.elapsed() < long,
            "the forgotten waits ended when the client asked again, not at their timeout"
        );
        // Another client's wait is left alone.
        let other = forget("c2", false, Duration::from_millis(500));
        settle().await;
        dispatcher.offer_now("c1", &types()).await.expect("offer");
        assert_eq!(dispatcher.n_waiting(), 1, "c2 still waits");
        assert!(!other.await.expect("the waiter"));
    }
}
