//! Jobs: claims and offers, what a holder reports (heartbeats, logs, the end of a run),
//! what operators do to a job (restart, cancel), clients' sessions, and what the clock
//! does (leases lapsing, jobs held past their timeout, accept deadlines).
//!
//! Every operation that changes a job tells the log and event followers, and wakes
//! the dispatcher when a job may have become available; callers never do.

use super::{Caller, Farm, FarmError, FarmResult, MAX_WAIT_SECS};
use crate::contacts::Announced;
use crate::metrics::LostLease;
use kiln_proto::api::{
    Claim, ClaimRequest, Event, Fail, Heartbeat, JobStatus, LogAppended, LogBatch, LogChunk, Offer,
};
use kiln_proto::names::check_name;
use kiln_proto::state::JobState;
use kiln_store::{ClaimingClient, Failure, LeaseHolder, TimedTransition};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The most log lines one read returns.
pub(crate) const LOG_PAGE: u32 = 2000;
/// The most lines one log batch may carry.
const MAX_LOG_BATCH: usize = 10_000;
/// The longest version a claim may give; the rest is cut off.
const MAX_VERSION_CHARS: usize = 64;
/// The longest reason a client may give for giving a job up; the rest is cut off.
const MAX_GIVE_UP_REASON_CHARS: usize = 500;

/// What the clock did to jobs in one look: leases lapsed or held past their timeout,
/// and accept deadlines passed.
#[derive(Debug, Default)]
pub struct TimeEffects {
    pub reaped: Vec<TimedTransition>,
    pub expired: Vec<TimedTransition>,
}

impl Farm {
    fn lease_until(&self) -> i64 {
        kiln_common::now_micros() + self.config.lease_secs as i64 * 1_000_000
    }

    /// Refuses a claim or offer request that does not name the caller itself or names
    /// no config type.
    fn check_claim_request(&self, caller: &Caller, request: &ClaimRequest) -> FarmResult<()> {
        check_name("client id", &request.client_id)
            .map_err(|msg| FarmError::invalid("bad_name", msg))?;
        caller.require_client_named(&request.client_id)?;
        if request.include.is_empty() {
            return Err(FarmError::invalid(
                "no_include",
                "a claim names at least one config type it includes (or *)",
            ));
        }
        Ok(())
    }

    /// Notes the client a claim or offer request describes (its types, slots, version
    /// and address) as in contact now; returns it as a claim records it.
    fn announce(
        self: &Arc<Self>,
        request: &ClaimRequest,
        address: Option<String>,
    ) -> ClaimingClient {
        let version = request
            .version
            .as_ref()
            .map(|version| version.chars().take(MAX_VERSION_CHARS).collect::<String>());
        self.contacts.announced(
            &request.client_id,
            Announced {
                include: request.include.clone(),
                slots: request.slots,
                version: version.clone(),
            },
            kiln_common::now_micros(),
        );
        self.note_contact(&request.client_id, address.as_deref());
        ClaimingClient {
            id: request.client_id.clone(),
            include: request.include.clone(),
            slots: request.slots,
            version,
            address,
        }
    }

    /// A claim: the best job this client may take, claimed under a new lease, as soon
    /// as there is one within the request's wait; `None` when none came.
    pub async fn claim(
        self: &Arc<Self>,
        caller: &Caller,
        request: &ClaimRequest,
        address: Option<String>,
    ) -> FarmResult<Option<Claim>> {
        self.check_claim_request(caller, request)?;
        let wait = Duration::from_secs(request.wait_secs.min(MAX_WAIT_SECS));
        let mut stopping = self.stopping.subscribe();
        if *stopping.borrow_and_update() {
            return Ok(None);
        }
        let client = self.announce(request, address);
        let waited = tokio::select! {
            claimed = self.dispatcher.wait_for_job(client, wait) => claimed,
            _ = stopping.changed() => None,
        };
        let Some(claimed) = waited else {
            return Ok(None);
        };
        // The credential may have been revoked while the claim waited: the job goes back.
        if !self.credential_is_live(&request.client_id).await? {
            self.store
                .release(
                    &claimed.build,
                    &claimed.job,
                    &claimed.lease,
                    kiln_common::now_micros(),
                )
                .await?;
            self.job_available();
            return Err(FarmError::NotAuthenticated(format!(
                "client {:?}'s credential was revoked",
                request.client_id
            )));
        }
        self.metrics.claimed(
            &claimed.config_type,
            kiln_common::now_micros() - claimed.queued_since,
        );
        // The claim recorded the client and this contact.
        self.contacts
            .stored(&request.client_id, kiln_common::now_micros());
        self.holders.handed(
            &claimed.build,
            &claimed.job,
            &claimed.lease,
            &request.client_id,
        );
        tracing::info!(build = %claimed.build, job = %claimed.job, client = %request.client_id, attempt = claimed.attempt, "job claimed");
        self.changed();
        Ok(Some(Claim {
            build: claimed.build,
            job_id: claimed.job,
            title: claimed.title,
            config_type: claimed.config_type,
            install_script: claimed.install_script,
            configure_script: claimed.configure_script,
            image_script: claimed.image_script,
            verify_script: claimed.verify_script,
            timeout_secs: claimed.timeout_secs,
            attempt: claimed.attempt,
            lease: claimed.lease,
            lease_secs: self.config.lease_secs,
            heartbeat_secs: self.config.heartbeat_secs,
        }))
    }

    /// An offer: the job a claim would get now (or, with a wait, as soon as one is
    /// queued), without claiming it; `None` when there is none.
    pub async fn offer(
        self: &Arc<Self>,
        caller: &Caller,
        request: &ClaimRequest,
        address: Option<String>,
    ) -> FarmResult<Option<Offer>> {
        self.check_claim_request(caller, request)?;
        self.announce(request, address);
        let found = if request.wait_secs == 0 {
            self.dispatcher
                .offer_now(&request.client_id, &request.include)
                .await?
        } else {
            let wait = Duration::from_secs(request.wait_secs.min(MAX_WAIT_SECS));
            let mut stopping = self.stopping.subscribe();
            if *stopping.borrow_and_update() {
                return Ok(None);
            }
            tokio::select! {
                found = self.dispatcher.wait_for_offer(&request.client_id, &request.include, wait) => found,
                _ = stopping.changed() => None,
            }
        };
        Ok(found.map(|candidate| Offer {
            build: candidate.build,
            job_id: candidate.job,
            priority: candidate.priority,
            submitted_at: candidate.submitted_at,
        }))
    }

    /// Whether client `id` has a credential that is not revoked.
    async fn credential_is_live(&self, id: &str) -> FarmResult<bool> {
        if self.credentials.recently_live(id) {
            return Ok(true);
        }
        Ok(self
            .store
            .client_credential(id)
            .await?
            .is_some_and(|row| row.revoked_at.is_none()))
    }

    /// Checks that `lease` is the job's current lease; returns its holder.
    pub async fn check_lease(
        &self,
        build: &str,
        job: &str,
        lease: &str,
    ) -> FarmResult<LeaseHolder> {
        Ok(self.store.check_lease(build, job, lease).await?)
    }

    /// Refuses a current lease of the job in the hands of a client other than
    /// `client_id`; a lease that is not current is left to the call itself to refuse.
    /// A lease known to have been handed to `client_id` needs no read of the store.
    pub async fn refuse_other_holder(
        &self,
        client_id: &str,
        build: &str,
        job: &str,
        lease: &str,
    ) -> FarmResult<()> {
        if self.holders.is_holder(build, job, lease, client_id) {
            return Ok(());
        }
        match self.store.check_lease(build, job, lease).await {
            Ok(holder) if holder.client_id != client_id => Err(FarmError::NotAllowed(format!(
                "job {build}/{job} is not held by client {client_id:?}"
            ))),
            Ok(holder) => {
                self.holders.handed(build, job, lease, &holder.client_id);
                Ok(())
            }
            Err(kiln_store::StoreError::StaleLease { .. })
            | Err(kiln_store::StoreError::NotFound(_)) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// A heartbeat: extends the lease, records progress and, once the job's steps are
    /// done, that only the lease decides whether its client lives.
    pub async fn heartbeat(
        self: &Arc<Self>,
        build: &str,
        job: &str,
        lease: &str,
        beat: &Heartbeat,
        address: Option<String>,
    ) -> FarmResult<()> {
        let holder = self
            .store
            .heartbeat(
                build,
                job,
                lease,
                self.lease_until(),
                beat.progress.as_ref(),
            )
            .await?;
        self.note_contact(&holder.client_id, address.as_deref());
        if beat.steps_done {
            self.store
                .mark_steps_done(build, job, lease, kiln_common::now_micros())
                .await?;
            self.metrics.steps_done(lease);
        }
        if beat.progress.is_some() {
            self.changed();
        }
        Ok(())
    }

    /// Appends a batch of log lines (and the latest progress) under the lease, within
    /// the job's log limit.
    pub async fn append_log(
        self: &Arc<Self>,
        build: &str,
        job: &str,
        lease: &str,
        batch: &LogBatch,
        address: Option<String>,
    ) -> FarmResult<LogAppended> {
        if batch.lines.len() > MAX_LOG_BATCH {
            return Err(FarmError::TooLarge(format!(
                "a log batch carries at most {MAX_LOG_BATCH} lines"
            )));
        }
        let max_bytes = self.config.max_log_bytes_per_job;
        let appended = self
            .store
            .append_log_within(
                build,
                job,
                lease,
                &batch.lines,
                batch.progress.as_ref(),
                kiln_common::now_micros(),
                max_bytes,
                &log_cut_notice(max_bytes),
            )
            .await?;
        self.note_contact(&appended.holder.client_id, address.as_deref());
        if appended.cut_now {
            tracing::info!(build = %build, job = %job, max_bytes, "job log cut at its limit; later lines are dropped");
        }
        self.changed();
        Ok(LogAppended {
            truncated: appended.cut,
        })
    }

    /// A job's log lines after `after`, waiting up to `wait_secs` for one when there
    /// is none yet and the job has not ended.
    pub async fn read_log(
        &self,
        build: &str,
        job: &str,
        after: i64,
        wait_secs: u64,
    ) -> FarmResult<LogChunk> {
        self.long_poll(wait_secs, || async {
            // The state first: if it is final, every line was written before it was read.
            let done = self.store.get_job(build, job).await?.state.is_final();
            let lines = self.store.read_log(build, job, after, LOG_PAGE).await?;
            let full_page = lines.len() == LOG_PAGE as usize;
            let ready = !lines.is_empty() || done;
            let next = lines.last().map_or(after, |line| line.seq);
            let done = done && !full_page;
            Ok((LogChunk { lines, next, done }, ready))
        })
        .await
    }

    /// Marks the job finished: every image it names stored under this lease.
    pub async fn finish(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        images: &[String],
    ) -> FarmResult<Event> {
        let run = self.run_of(build, job).await;
        let event = self
            .store
            .finish(build, job, lease, images, kiln_common::now_micros())
            .await?;
        self.run_ended(run, lease, &event);
        self.holders.ended(lease);
        tracing::info!(build = %build, job = %job, n_images = images.len(), "job finished");
        self.jobs_changed([event.to]);
        Ok(event)
    }

    /// Marks the job failed as its holder reports it, or queues it again for a retry.
    pub async fn fail(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        report: Fail,
    ) -> FarmResult<Event> {
        let failure = Failure {
            reason: report.reason,
            message: report.message,
        };
        let run = self.run_of(build, job).await;
        let event = self
            .store
            .fail(build, job, lease, &failure, kiln_common::now_micros())
            .await?;
        self.run_ended(run, lease, &event);
        self.holders.ended(lease);
        tracing::info!(build = %build, job = %job, reason = %failure.reason, to = %event.to, "job failed");
        self.jobs_changed([event.to]);
        self.job_available();
        Ok(event)
    }

    /// The holder gives back a job it never started: queued again, attempt not counted.
    pub async fn release(&self, build: &str, job: &str, lease: &str) -> FarmResult<()> {
        self.store
            .release(build, job, lease, kiln_common::now_micros())
            .await?;
        self.holders.ended(lease);
        self.changed();
        self.job_available();
        Ok(())
    }

    /// The holder gives a started job back: queued again at once, the run counted.
    pub async fn give_up(
        &self,
        build: &str,
        job: &str,
        lease: &str,
        reason: &str,
    ) -> FarmResult<Event> {
        let reason: String = reason.chars().take(MAX_GIVE_UP_REASON_CHARS).collect();
        let event = self
            .store
            .give_up(build, job, lease, &reason, kiln_common::now_micros())
            .await?;
        self.metrics.run_over(lease, false);
        self.metrics.lease_lost(LostLease::GivenUp);
        self.holders.ended(lease);
        tracing::info!(build = %build, job = %job, reason = %reason, to = %event.to, "job given up by its client");
        self.jobs_changed([event.to]);
        self.job_available();
        Ok(event)
    }

    /// An operator puts a job back in the queue as new, whatever its state.
    pub async fn restart(&self, build: &str, job: &str) -> FarmResult<Event> {
        let event = self
            .store
            .restart(build, job, kiln_common::now_micros())
            .await?;
        tracing::info!(build = %build, job = %job, "job restarted");
        self.changed();
        self.job_available();
        Ok(event)
    }

    /// An operator cancels a job that has not ended.
    pub async fn cancel(&self, build: &str, job: &str) -> FarmResult<Event> {
        let event = self
            .store
            .cancel(build, job, kiln_common::now_micros())
            .await?;
        tracing::info!(build = %build, job = %job, "job cancelled");
        self.jobs_changed([event.to]);
        Ok(event)
    }

    /// One job, with its ETA.
    pub async fn job(&self, build: &str, job: &str) -> FarmResult<JobStatus> {
        let status = self.store.get_job(build, job).await?;
        Ok(self.with_eta(vec![status]).await?.remove(0))
    }

    /// A build's jobs in manifest order, with their ETAs.
    pub async fn jobs(&self, build: &str) -> FarmResult<Vec<JobStatus>> {
        let jobs = self.store.list_jobs(build).await?;
        self.with_eta(jobs).await
    }

    /// Fills in `eta_seconds` from percent done and past runs of the same config type.
    async fn with_eta(&self, mut jobs: Vec<JobStatus>) -> FarmResult<Vec<JobStatus>> {
        let now = kiln_common::now_micros();
        let mut means: HashMap<String, Option<f64>> = HashMap::new();
        for job in jobs.iter_mut() {
            if job.state != JobState::Running {
                continue;
            }
            let Some(start) = job.time_start else {
                continue;
            };
            let elapsed = ((now - start) as f64 / 1e6).max(0.0);
            if !means.contains_key(&job.config_type) {
                let mean = self.store.mean_run_secs(&job.config_type).await?;
                means.insert(job.config_type.clone(), mean);
            }
            let from_history = means[&job.config_type].map(|mean| (mean - elapsed).max(0.0));
            let from_percent = job
                .percent
                .filter(|p| *p > 0)
                .map(|p| elapsed * f64::from(100 - p.min(100)) / f64::from(p));
            let eta = match (from_percent, from_history) {
                (Some(by_percent), Some(by_history)) => {
                    // Trust the job's own percent more as it grows.
                    let weight = f64::from(job.percent.unwrap_or(0)) / 100.0;
                    Some(weight * by_percent + (1.0 - weight) * by_history)
                }
                (Some(eta), None) | (None, Some(eta)) => Some(eta),
                (None, None) => None,
            };
            job.eta_seconds = eta.map(|secs| secs.round() as u64);
        }
        Ok(jobs)
    }

    /// Whether client `id` runs a job of `build` now: what lets a client read a build.
    pub async fn runs_job_of(&self, id: &str, build: &str) -> FarmResult<bool> {
        Ok(self.store.runs_job_of(id, build).await?)
    }

    /// A client's session opened (see [`crate::sessions`]); returns its generation.
    pub fn session_opened(self: &Arc<Self>, client_id: &str, address: Option<&str>) -> u64 {
        let generation = self.sessions.open(client_id);
        tracing::debug!(client = %client_id, generation, "session opened");
        self.note_contact(client_id, address);
        generation
    }

    /// A keep-alive of a client's session: a contact.
    pub fn session_alive(self: &Arc<Self>, client_id: &str, address: Option<&str>) {
        self.note_contact(client_id, address);
    }

    /// A client's session ended. When the client ended it (its process died: the
    /// connection closed) and no new session comes within the grace, its jobs are
    /// taken back; the server stopping is not the client leaving.
    pub fn session_closed(
        self: &Arc<Self>,
        client_id: &str,
        generation: u64,
        ended_by_client: bool,
    ) {
        self.sessions.close(client_id);
        if !ended_by_client {
            return;
        }
        let farm = self.clone();
        let client_id = client_id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(farm.config.session_grace_ms)).await;
            if !farm.sessions.gone_since(&client_id, generation) || farm.is_stopping() {
                return;
            }
            if let Err(err) = farm.take_back_from_client(&client_id).await {
                tracing::error!(cause = %kiln_proto::error_chain(&err), client = %client_id, "cannot take back a lost client's jobs");
            }
        });
    }

    /// Takes every running job of a client that is gone.
    async fn take_back_from_client(&self, client_id: &str) -> FarmResult<()> {
        let taken = self
            .store
            .take_back_from_client(
                client_id,
                "client connection lost",
                kiln_common::now_micros(),
            )
            .await?;
        if taken.is_empty() {
            return Ok(());
        }
        for transition in &taken {
            self.metrics.lease_lost(LostLease::ConnectionLost);
            tracing::info!(build = %transition.build, job = %transition.job, client = %client_id, to = %transition.event.to, "client gone; job taken back");
        }
        self.jobs_changed(taken.iter().map(|transition| transition.event.to));
        self.job_available();
        Ok(())
    }

    /// The earliest lease expiry or accept deadline, if any.
    pub async fn next_deadline(&self) -> FarmResult<Option<i64>> {
        Ok(self.store.next_deadline().await?)
    }

    /// What time does to jobs at `now`: lapsed leases are taken back, jobs held past
    /// their timeout and the hung grace fail, and accept deadlines that passed expire
    /// their jobs.
    pub async fn apply_time(&self, now: i64) -> FarmResult<TimeEffects> {
        let reaped = self
            .store
            .reap_leases(now, self.config.hung_grace_secs)
            .await?;
        let expired = self.store.expire_unclaimed(now).await?;
        for transition in &reaped {
            let timed_out = transition
                .event
                .reason
                .as_deref()
                .is_some_and(|reason| reason.starts_with("timeout"));
            if timed_out {
                self.metrics.timed_out();
            } else {
                self.metrics.lease_lost(LostLease::Lapsed);
            }
        }
        for transition in reaped.iter().chain(expired.iter()) {
            let event = &transition.event;
            tracing::info!(
                build = %transition.build,
                job = %transition.job,
                to = %event.to,
                client = event.client_id.as_deref().unwrap_or("-"),
                reason = event.reason.as_deref().unwrap_or("-"),
                "job changed state by time"
            );
        }
        if !reaped.is_empty() || !expired.is_empty() {
            self.jobs_changed(
                reaped
                    .iter()
                    .chain(expired.iter())
                    .map(|transition| transition.event.to),
            );
            self.job_available();
        }
        Ok(TimeEffects { reaped, expired })
    }
}

/// A run as metrics time it: its config type and when it was claimed.
struct Run {
    config_type: String,
    started: i64,
}

impl Farm {
    /// The job's current run, read before the call that ends it (which checks the
    /// lease: a stale one ends nothing, and nothing is timed).
    async fn run_of(&self, build: &str, job: &str) -> Option<Run> {
        let status = self.store.get_job(build, job).await.ok()?;
        Some(Run {
            config_type: status.config_type,
            started: status.time_start?,
        })
    }

    /// Times a run that its client ended (finished, or failed by its report).
    fn run_ended(&self, run: Option<Run>, lease: &str, event: &Event) {
        let finished = event.to == JobState::Finished;
        self.metrics.run_over(lease, finished);
        if let Some(run) = run {
            let outcome = if finished { "finished" } else { "failed" };
            self.metrics
                .run_ended(&run.config_type, outcome, event.time - run.started);
        }
    }
}

/// The last line of a log cut at `max_bytes`.
fn log_cut_notice(max_bytes: u64) -> String {
    format!(
        "kiln: this job's log was cut at {max_bytes} bytes (the server's \
         --max-log-bytes-per-job); later output was dropped, the job runs on"
    )
}
