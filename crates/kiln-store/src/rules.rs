//! The farm's rules, apart from any SQL: what each change does to a job, the event it
//! writes, and what it counts in the history of the job's client.
//!
//! A backend reads the job's row ([`JobRow`]) inside its transaction, calls the rule of
//! the change, and writes what the rule decided: a [`Transition`] (the job's run columns
//! whole as a [`JobRun`], the [`EventDraft`], the [`ClientCount`] that moves, whether the
//! job's images go), or a new [`JobRun`] for the changes that are not transitions
//! (heartbeats, progress, the end of the steps). Nothing here touches a database, so
//! every backend applies the same rules, and the tests at the end check them directly.
//!
//! The state machine's arrows are written once, in
//! [`JobState::can_become`](kiln_proto::state::JobState::can_become); every event is held
//! to them by [`check_transition`].

use crate::{
    CredentialPut, CredentialWrite, Failure, LeaseHolder, NewBuild, StoreError, StoreResult,
};
use kiln_proto::api::{Event, NewLogLine, Notice};
use kiln_proto::manifest::JobSpec;
use kiln_proto::progress::Progress;
use kiln_proto::state::JobState;
use rand::RngCore;

const MICROS_PER_SEC: i64 = 1_000_000;

/// Why the timekeeper takes a job whose lease ran out: the client is gone or cut off.
pub const LEASE_LAPSED: &str = "lease lapsed";

/// What a job's row fixed at submission that the rules check against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLimits {
    /// The job's TIMEOUT: how long its steps may run.
    pub timeout_secs: u64,
    /// MAXATTEMPTS: lost runs after which the job fails as `lost`.
    pub max_attempts: u32,
    /// RETRIES: script failures after which the job is still queued again.
    pub retries: u32,
    /// How long a queued job waits for a client before it expires, counted from its
    /// submission and again from each restart.
    pub accept_within_secs: Option<u64>,
}

/// The part of a job's row that changes as the job moves. A backend reads it whole and
/// writes it whole: the rules decide every column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRun {
    pub state: JobState,
    /// The client of the latest run; kept when the run ends, cleared when the job goes
    /// back to the queue.
    pub client_id: Option<String>,
    pub lease_token: Option<String>,
    pub lease_expires_at: Option<i64>,
    /// Runs handed out: claims, less the claims given back unstarted.
    pub attempt: u32,
    pub time_start: Option<i64>,
    pub time_complete: Option<i64>,
    /// The steps are over and the images upload: only the lease says whether the client
    /// is alive, no longer the timeout.
    pub steps_done: bool,
    /// When the steps were first said to be over (unix microseconds).
    pub steps_done_at: Option<i64>,
    pub major_state: Option<String>,
    pub minor_state: Option<String>,
    pub percent: Option<i64>,
    pub error: Option<String>,
    /// Script failures queued again so far (they do not count against MAXATTEMPTS).
    pub retries_used: u32,
    /// Runs taken from their client (lease lapsed, session lost, given back, held past
    /// the timeout): these count against MAXATTEMPTS.
    pub leases_lost: u32,
    pub accept_deadline: Option<i64>,
}

/// A job's row as a backend read it in its transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub build: String,
    pub job: String,
    pub limits: JobLimits,
    pub run: JobRun,
}

/// An event to write: all of it but the sequence number, which the backend's insert
/// gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDraft {
    pub time: i64,
    pub from: Option<JobState>,
    pub to: JobState,
    pub client_id: Option<String>,
    pub attempt: u32,
    pub reason: String,
}

impl EventDraft {
    /// The event as stored under `seq`.
    pub fn into_event(self, seq: i64, build: &str, job: &str) -> Event {
        Event {
            seq,
            time: self.time,
            build: build.to_owned(),
            job: job.to_owned(),
            from: self.from,
            to: self.to,
            client_id: self.client_id,
            attempt: self.attempt,
            reason: Some(self.reason),
        }
    }
}

/// What the end of a run adds to the history of the client that held it. A claim
/// counts one more claim for its client, with what the client said of itself: the
/// backend writes that with the claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCount {
    /// The client finished the job: `n_finished + 1`, and the size of the images the
    /// job keeps.
    Finished { image_bytes: u64 },
    /// The client reported the job failed, whether it is retried or not: `n_failed + 1`.
    Failed,
    /// The run was taken from the client (lease lapsed, session dropped, given back
    /// after a restart or stop, held past its timeout): `n_lost + 1`.
    Lost,
    /// The client gave the job back unstarted: like its attempt, the claim is not
    /// counted (`n_claimed - 1`, never below zero).
    ClaimGivenBack,
}

impl ClientCount {
    /// Whether the change is also a contact with the client: it reported the end
    /// itself, so its latest contact moves forward to the change's time.
    pub fn is_contact(self) -> bool {
        matches!(self, ClientCount::Finished { .. } | ClientCount::Failed)
    }
}

/// A transition as the rules decided it. The backend writes the run, drops the job's
/// images if told, counts the client, and writes the event, all in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub run: JobRun,
    pub event: EventDraft,
    /// The client whose history counts the change, and what it counts.
    pub count: Option<(String, ClientCount)>,
    /// Every image of the job goes: a restart starts the job from nothing.
    pub drop_images: bool,
}

/// A fresh lease token: 128 random bits, in hex.
pub fn new_lease_token() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Refuses an event whose arrow the state machine does not have.
pub fn check_transition(
    build: &str,
    job: &str,
    from: Option<JobState>,
    to: JobState,
) -> StoreResult<()> {
    match from {
        Some(from) if !from.can_become(to) => Err(StoreError::Conflict(format!(
            "job {build}/{job} cannot go from {from} to {to}"
        ))),
        _ => Ok(()),
    }
}

/// Refuses a lease that is not the job's current one: the job is not running, or runs
/// under another lease (invariant 2).
pub fn check_lease(row: &JobRow, lease: &str) -> StoreResult<()> {
    if row.run.state != JobState::Running || row.run.lease_token.as_deref() != Some(lease) {
        return Err(StoreError::StaleLease {
            build: row.build.clone(),
            job: row.job.clone(),
        });
    }
    Ok(())
}

/// The holder of a job's lease, as its row has it.
pub fn holder(row: &JobRow) -> LeaseHolder {
    LeaseHolder {
        client_id: row.run.client_id.clone().unwrap_or_default(),
        attempt: row.run.attempt,
        time_start: row.run.time_start.unwrap_or_default(),
        timeout_secs: row.limits.timeout_secs,
    }
}

/// A job of a new build as it enters the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub priority: i64,
    pub limits: JobLimits,
    pub accept_deadline: Option<i64>,
    /// Its first event: submitted, queued.
    pub event: EventDraft,
}

/// What a submitted job starts with: the manifest's values, or the server's defaults
/// where the manifest names none. At least one attempt is always allowed.
pub fn submit(spec: &JobSpec, build: &NewBuild) -> Submitted {
    let accept_within_secs = spec.accept_within_secs.or(build.default_accept_within_secs);
    Submitted {
        priority: spec.priority.unwrap_or(0),
        limits: JobLimits {
            timeout_secs: spec.timeout_secs,
            max_attempts: spec
                .max_attempts
                .unwrap_or(build.default_max_attempts)
                .max(1),
            retries: spec.retries.unwrap_or(0),
            accept_within_secs,
        },
        accept_deadline: accept_within_secs.map(|secs| accept_deadline(build.submitted_at, secs)),
        event: EventDraft {
            time: build.submitted_at,
            from: None,
            to: JobState::Queued,
            client_id: None,
            attempt: 0,
            reason: "submitted".to_owned(),
        },
    }
}

fn accept_deadline(from: i64, accept_within_secs: u64) -> i64 {
    from + accept_within_secs as i64 * MICROS_PER_SEC
}

/// The run columns of a job that goes back to the queue: no client, no lease, no
/// start, no progress. The attempt, the counts and the error stay as they were.
fn back_in_queue(run: &JobRun) -> JobRun {
    JobRun {
        state: JobState::Queued,
        client_id: None,
        lease_token: None,
        lease_expires_at: None,
        time_start: None,
        steps_done: false,
        steps_done_at: None,
        major_state: None,
        minor_state: None,
        percent: None,
        ..run.clone()
    }
}

/// The run columns of a run that ended without going back to the queue: the lease is
/// gone; the client, its start and its progress stay to be seen.
fn ended(run: &JobRun, state: JobState, now: i64, error: Option<String>) -> JobRun {
    JobRun {
        state,
        lease_token: None,
        lease_expires_at: None,
        time_complete: Some(now),
        error,
        ..run.clone()
    }
}

/// A claim: a queued job runs under a new lease as its next attempt. `None` when the
/// job is not queued (another client took it, or it ended).
pub fn claim(
    row: &JobRow,
    client_id: &str,
    lease: String,
    lease_until: i64,
    now: i64,
) -> Option<Transition> {
    if row.run.state != JobState::Queued {
        return None;
    }
    let run = JobRun {
        state: JobState::Running,
        client_id: Some(client_id.to_owned()),
        lease_token: Some(lease),
        lease_expires_at: Some(lease_until),
        attempt: row.run.attempt + 1,
        time_start: Some(now),
        time_complete: None,
        steps_done: false,
        steps_done_at: None,
        major_state: None,
        minor_state: None,
        percent: None,
        error: None,
        ..row.run.clone()
    };
    Some(Transition {
        event: EventDraft {
            time: now,
            from: Some(JobState::Queued),
            to: JobState::Running,
            client_id: Some(client_id.to_owned()),
            attempt: run.attempt,
            reason: "claimed".to_owned(),
        },
        run,
        count: None,
        drop_images: false,
    })
}

/// A job its client gives back unstarted (no free slot, or the waiter left): queued
/// again, and neither the attempt nor the claim counts.
pub fn release(row: &JobRow, now: i64) -> Transition {
    let attempt = row.run.attempt.saturating_sub(1);
    Transition {
        run: JobRun {
            attempt,
            ..back_in_queue(&row.run)
        },
        event: EventDraft {
            time: now,
            from: Some(JobState::Running),
            to: JobState::Queued,
            client_id: row.run.client_id.clone(),
            attempt,
            reason: "released unstarted by its client".to_owned(),
        },
        count: row
            .run
            .client_id
            .clone()
            .map(|client| (client, ClientCount::ClaimGivenBack)),
        drop_images: false,
    }
}

/// A heartbeat: the lease runs at least until `lease_until` (a late heartbeat never
/// shortens it), and the progress it carries is recorded.
pub fn heartbeat(row: &JobRow, lease_until: i64, progress: Option<&Progress>) -> JobRun {
    let run = JobRun {
        lease_expires_at: Some(row.run.lease_expires_at.unwrap_or(0).max(lease_until)),
        ..row.run.clone()
    };
    match progress {
        Some(progress) => with_progress(run, progress),
        None => run,
    }
}

/// The run with a progress report recorded. A new major state starts its minor state
/// afresh; otherwise what the report does not name is kept.
pub fn with_progress(run: JobRun, progress: &Progress) -> JobRun {
    let minor_state = if progress.major.is_some() {
        progress.minor.clone()
    } else {
        progress.minor.clone().or(run.minor_state)
    };
    JobRun {
        major_state: progress.major.clone().or(run.major_state),
        minor_state,
        percent: progress.percent.map(i64::from).or(run.percent),
        ..run
    }
}

/// The job's steps are over and its images upload: from now on only the lease decides
/// whether its client is alive, not the job's timeout. The first word of it (`now`)
/// is when the upload began.
pub fn steps_done(row: &JobRow, now: i64) -> JobRun {
    JobRun {
        steps_done: true,
        steps_done_at: row.run.steps_done_at.or(Some(now)),
        ..row.run.clone()
    }
}

/// Which images a finish naming `named` drops, given the names stored under the
/// finishing lease; or why the finish is refused. A finished job has at least one image,
/// and each it names must be stored under this lease; images stored under earlier
/// leases, and those this lease stored but the finish does not name, are not the job's
/// output (invariant 4). The backend drops the earlier leases' images itself; this
/// returns the unnamed ones of this lease.
pub fn finish_images(
    build: &str,
    job: &str,
    named: &[String],
    stored_under_lease: &[String],
) -> StoreResult<Vec<String>> {
    if named.is_empty() {
        return Err(StoreError::Conflict(format!(
            "cannot finish job {build}/{job}: a finished job has at least one image"
        )));
    }
    let missing: Vec<&str> = named
        .iter()
        .filter(|name| !stored_under_lease.contains(name))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(StoreError::Conflict(format!(
            "cannot finish job {build}/{job}: images not stored: {}",
            missing.join(", ")
        )));
    }
    Ok(stored_under_lease
        .iter()
        .filter(|name| !named.contains(name))
        .cloned()
        .collect())
}

/// A finish: the job is finished with its images, which total `image_bytes`; its client
/// counts one more finished job and those bytes.
pub fn finish(row: &JobRow, image_bytes: u64, now: i64) -> Transition {
    Transition {
        run: JobRun {
            percent: Some(100),
            ..ended(&row.run, JobState::Finished, now, None)
        },
        event: EventDraft {
            time: now,
            from: Some(JobState::Running),
            to: JobState::Finished,
            client_id: row.run.client_id.clone(),
            attempt: row.run.attempt,
            reason: "images stored and verified".to_owned(),
        },
        count: row
            .run
            .client_id
            .clone()
            .map(|client| (client, ClientCount::Finished { image_bytes })),
        drop_images: false,
    }
}

/// A failure the client reported: queued again while the manifest's RETRIES last,
/// failed after; either way the job keeps the failure as its error and the client
/// counts one more failed job. A script failure is not a lost run: it does not count
/// against MAXATTEMPTS.
pub fn fail(row: &JobRow, failure: &Failure, now: i64) -> Transition {
    let error = format!("{}: {}", failure.reason, failure.message);
    let retry = row.run.retries_used < row.limits.retries;
    let (run, reason) = if retry {
        let run = JobRun {
            retries_used: row.run.retries_used + 1,
            error: Some(error),
            ..back_in_queue(&row.run)
        };
        let reason = format!(
            "{} (retry {} of {})",
            failure.reason, run.retries_used, row.limits.retries
        );
        (run, reason)
    } else {
        let run = ended(&row.run, JobState::Failed, now, Some(error));
        (run, failure.reason.clone())
    };
    Transition {
        event: EventDraft {
            time: now,
            from: Some(JobState::Running),
            to: run.state,
            client_id: row.run.client_id.clone(),
            attempt: row.run.attempt,
            reason,
        },
        run,
        count: row
            .run
            .client_id
            .clone()
            .map(|client| (client, ClientCount::Failed)),
        drop_images: false,
    }
}

/// Why a running job is taken from its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeBack<'a> {
    /// The client is gone (lease lapsed, connection lost, gave the job up), for this
    /// reason: the job goes back to the queue, or fails as `lost` once MAXATTEMPTS runs
    /// were lost.
    LeaseLost(&'a str),
    /// The client keeps heartbeating but held the job past its timeout and grace.
    Hung,
}

/// Whether the timekeeper takes a running job at `now`, and why: its lease lapsed, or
/// its steps ran past the job's timeout plus `hung_grace_secs` (once the steps are
/// done, only the lease counts).
pub fn overdue(row: &JobRow, now: i64, hung_grace_secs: u64) -> Option<TakeBack<'static>> {
    if row.run.state != JobState::Running {
        return None;
    }
    if row.run.lease_expires_at.is_some_and(|at| at < now) {
        return Some(TakeBack::LeaseLost(LEASE_LAPSED));
    }
    let allowed_secs = row.limits.timeout_secs.saturating_add(hung_grace_secs);
    let allowed = i64::try_from(allowed_secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(MICROS_PER_SEC);
    let hung = !row.run.steps_done
        && row
            .run
            .time_start
            .is_some_and(|start| start.saturating_add(allowed) < now);
    hung.then_some(TakeBack::Hung)
}

/// A run taken from its client. The run counts as a lost lease and as a lost job for
/// the client; the job is queued again with its attempt counted, or fails: as `lost`
/// once MAXATTEMPTS runs were lost, as `timeout` when the client held it too long.
pub fn take_back(row: &JobRow, why: TakeBack<'_>, now: i64) -> StoreResult<Transition> {
    if row.run.state != JobState::Running {
        return Err(StoreError::Conflict(format!(
            "job {}/{} is not running",
            row.build, row.job
        )));
    }
    let attempt = row.run.attempt;
    let max_attempts = row.limits.max_attempts;
    // Script failures retried at the manifest's request are not lost runs: only runs
    // taken back here count against MAXATTEMPTS.
    let leases_lost = row.run.leases_lost + 1;
    let (run, reason) = match why {
        TakeBack::Hung => {
            let reason = "timeout: held past its timeout by a client that did not stop it";
            let run = ended(&row.run, JobState::Failed, now, Some(reason.to_owned()));
            (run, reason.to_owned())
        }
        TakeBack::LeaseLost(cause) if leases_lost >= max_attempts => {
            let reason = format!(
                "lost: {cause} on attempt {attempt}; {leases_lost} of {max_attempts} attempts lost"
            );
            let run = ended(&row.run, JobState::Failed, now, Some(reason.clone()));
            (run, reason)
        }
        TakeBack::LeaseLost(cause) => (back_in_queue(&row.run), cause.to_owned()),
    };
    let run = JobRun { leases_lost, ..run };
    Ok(Transition {
        event: EventDraft {
            time: now,
            from: Some(JobState::Running),
            to: run.state,
            client_id: row.run.client_id.clone(),
            attempt,
            reason,
        },
        run,
        count: row
            .run
            .client_id
            .clone()
            .map(|client| (client, ClientCount::Lost)),
        drop_images: false,
    })
}

/// A job no client accepted in time: expired once its accept deadline passed, if it
/// is queued and was never taken (a job given back unstarted counts as never taken).
/// `None` for any other job.
pub fn expire(row: &JobRow, now: i64) -> Option<Transition> {
    let due = row.run.state == JobState::Queued
        && row.run.attempt == 0
        && row
            .run
            .accept_deadline
            .is_some_and(|deadline| deadline < now);
    if !due {
        return None;
    }
    let within = row.limits.accept_within_secs;
    let error = within.map(|secs| format!("expired: no client accepted it within {secs} s"));
    Some(Transition {
        run: JobRun {
            state: JobState::Expired,
            time_complete: Some(now),
            error,
            ..row.run.clone()
        },
        event: EventDraft {
            time: now,
            from: Some(JobState::Queued),
            to: JobState::Expired,
            client_id: None,
            attempt: 0,
            reason: format!(
                "no client accepted it within {} s",
                within.unwrap_or_default()
            ),
        },
        count: None,
        drop_images: false,
    })
}

/// An operator's restart: the job goes back to the queue as new, whatever its state
/// but queued. Attempts, retries and lost leases start again from zero, the error and
/// the images go, and the accept deadline counts again from now. The job's client
/// counts nothing.
pub fn restart(row: &JobRow, now: i64) -> StoreResult<Transition> {
    if row.run.state == JobState::Queued {
        return Err(StoreError::Conflict(format!(
            "job {}/{} is already queued",
            row.build, row.job
        )));
    }
    Ok(Transition {
        run: JobRun {
            attempt: 0,
            retries_used: 0,
            leases_lost: 0,
            time_complete: None,
            error: None,
            accept_deadline: row
                .limits
                .accept_within_secs
                .map(|secs| accept_deadline(now, secs)),
            ..back_in_queue(&row.run)
        },
        event: EventDraft {
            time: now,
            from: Some(row.run.state),
            to: JobState::Queued,
            client_id: row.run.client_id.clone(),
            attempt: 0,
            reason: "restarted by an operator".to_owned(),
        },
        count: None,
        drop_images: true,
    })
}

/// An operator's cancel of a job that has not ended. Its client counts nothing.
pub fn cancel(row: &JobRow, now: i64) -> StoreResult<Transition> {
    if row.run.state.is_final() {
        return Err(StoreError::Conflict(format!(
            "job {}/{} is already {}; only queued or running jobs can be cancelled",
            row.build, row.job, row.run.state
        )));
    }
    let reason = "cancelled by an operator";
    Ok(Transition {
        run: ended(&row.run, JobState::Cancelled, now, Some(reason.to_owned())),
        event: EventDraft {
            time: now,
            from: Some(row.run.state),
            to: JobState::Cancelled,
            client_id: row.run.client_id.clone(),
            attempt: row.run.attempt,
            reason: reason.to_owned(),
        },
        count: None,
        drop_images: false,
    })
}

/// How much log text a job has stored, and whether its log was cut at the limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogVolume {
    pub bytes: u64,
    pub cut: bool,
}

/// What an append stores of its lines under a log limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFit {
    /// The first this many lines are stored.
    pub n_stored: usize,
    /// This append reaches the limit: the cut notice is stored after the lines.
    pub cut_now: bool,
    /// The job's log after the append.
    pub volume: LogVolume,
}

impl LogFit {
    /// Whether the job's log volume changed and must be written.
    pub fn changed(&self) -> bool {
        self.n_stored > 0 || self.cut_now
    }
}

/// Which lines of an append fit in `max_bytes` of log text: lines are stored in order
/// while they fit; the first that does not cuts the log, and a cut log stores nothing
/// more. The cut notice itself is not counted.
pub fn fit_log(volume: LogVolume, lines: &[NewLogLine], max_bytes: u64) -> LogFit {
    let mut bytes = volume.bytes;
    let mut n_stored = 0;
    let mut cut_now = false;
    if !volume.cut {
        for line in lines {
            let len = line.text.len() as u64;
            if bytes.saturating_add(len) > max_bytes {
                cut_now = true;
                break;
            }
            bytes += len;
            n_stored += 1;
        }
    }
    LogFit {
        n_stored,
        cut_now,
        volume: LogVolume {
            bytes,
            cut: volume.cut || cut_now,
        },
    }
}

/// Whether an event may call for webhook notices: only one that ends a job (finished,
/// failed, expired, or cancelled, which may end its build).
pub fn may_notify(event: &Event) -> bool {
    event.to.is_final()
}

/// The notice of a job's own end, for a finished, failed or expired job. A cancelled
/// job has none of its own (but may be what ends its build).
pub fn job_notice(event: &Event) -> Option<Notice> {
    let kind = match event.to {
        JobState::Finished => "job_finished",
        JobState::Failed => "job_failed",
        JobState::Expired => "job_expired",
        JobState::Cancelled | JobState::Queued | JobState::Running => return None,
    };
    Some(Notice {
        event: kind.to_owned(),
        build: event.build.clone(),
        job: Some(event.job.clone()),
        client_id: event.client_id.clone(),
        reason: event.reason.clone(),
        time: kiln_proto::format_rfc3339(event.time),
        seq: event.seq,
    })
}

/// The notice of a build's end, announced with the event of its last job to end: once
/// per time it ends, so again after a restart reopened it. The backend knows whether
/// this end was announced already.
pub fn build_end_notice(event: &Event, n_jobs: u64, n_finished: u64) -> Notice {
    Notice {
        event: "build_finished".to_owned(),
        build: event.build.clone(),
        job: None,
        client_id: None,
        reason: Some(format!("{n_finished} of {n_jobs} jobs finished")),
        time: kiln_proto::format_rfc3339(event.time),
        seq: event.seq,
    }
}

/// Refuses to delete a build while any of its jobs runs, naming them.
pub fn check_deletable(build: &str, running: &[String]) -> StoreResult<()> {
    if running.is_empty() {
        return Ok(());
    }
    Err(StoreError::Conflict(format!(
        "build {build} has {} running job(s): {}; cancel them first",
        running.len(),
        running.join(", ")
    )))
}

/// What a credential write does, given the id's credential now (`None`: it has none;
/// `Some(revoked)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialDecision {
    /// Write the credential with this origin (`enrolled` or `issued`), clearing any
    /// revocation, and answer `put`.
    Write {
        origin: &'static str,
        put: CredentialPut,
    },
    /// Write nothing and answer this.
    Refuse(CredentialPut),
}

/// An enrollment only gets an id without a credential (a revoked one stays revoked
/// until an operator issues a new one); an operator's issue replaces any.
pub fn credential_write(
    how: CredentialWrite,
    existing_revoked: Option<bool>,
) -> CredentialDecision {
    match (how, existing_revoked) {
        (CredentialWrite::Enroll, Some(true)) => CredentialDecision::Refuse(CredentialPut::Revoked),
        (CredentialWrite::Enroll, Some(false)) => CredentialDecision::Refuse(CredentialPut::Exists),
        (CredentialWrite::Enroll, None) => CredentialDecision::Write {
            origin: "enrolled",
            put: CredentialPut::Created,
        },
        (CredentialWrite::Issue, None) => CredentialDecision::Write {
            origin: "issued",
            put: CredentialPut::Created,
        },
        (CredentialWrite::Issue, Some(_)) => CredentialDecision::Write {
            origin: "issued",
            put: CredentialPut::Replaced,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::manifest::BuildManifest;
    use JobState::{Cancelled, Expired, Failed, Finished, Queued, Running};

    const T0: i64 = 1_700_000_000 * MICROS_PER_SEC;

    fn at(secs: i64) -> i64 {
        T0 + secs * MICROS_PER_SEC
    }

    fn limits() -> JobLimits {
        JobLimits {
            timeout_secs: 60,
            max_attempts: 3,
            retries: 0,
            accept_within_secs: None,
        }
    }

    fn queued() -> JobRow {
        JobRow {
            build: "7".to_owned(),
            job: "a".to_owned(),
            limits: limits(),
            run: JobRun {
                state: Queued,
                client_id: None,
                lease_token: None,
                lease_expires_at: None,
                attempt: 0,
                time_start: None,
                time_complete: None,
                steps_done: false,
                steps_done_at: None,
                major_state: None,
                minor_state: None,
                percent: None,
                error: None,
                retries_used: 0,
                leases_lost: 0,
                accept_deadline: None,
            },
        }
    }

    /// A job claimed by `c1` at 10 s under lease `L` until 40 s, with some progress.
    fn running() -> JobRow {
        let mut row = queued();
        row.run = claim(&row, "c1", "L".to_owned(), at(40), at(10))
            .expect("a queued job is claimable")
            .run;
        row.run.major_state = Some("install".to_owned());
        row.run.minor_state = Some("copy".to_owned());
        row.run.percent = Some(30);
        row
    }

    fn with_run(row: &JobRow, run: JobRun) -> JobRow {
        JobRow { run, ..row.clone() }
    }

    #[test]
    fn submit_takes_the_manifest_or_the_server_defaults_and_allows_one_attempt_at_least() {
        let spec = JobSpec {
            id: "a".into(),
            title: "a".into(),
            config_type: "PRO".into(),
            install_script: "i.sh".into(),
            configure_script: None,
            image_script: "m.sh".into(),
            verify_script: None,
            timeout_secs: 60,
            priority: None,
            accept_within_secs: None,
            assigned_to: None,
            max_attempts: Some(0),
            retries: None,
        };
        let build = NewBuild {
            manifest: BuildManifest {
                number: "7".into(),
                title: "t".into(),
                build_time: None,
                log_file: None,
                notify: vec![],
                jobs: vec![spec.clone()],
            },
            files_key: "k".into(),
            files_size: 0,
            submitted_at: at(0),
            default_accept_within_secs: Some(90),
            default_max_attempts: 3,
        };
        let submitted = submit(&spec, &build);
        assert_eq!(submitted.priority, 0);
        assert_eq!(submitted.limits.max_attempts, 1, "at least one attempt");
        assert_eq!(submitted.limits.retries, 0);
        assert_eq!(submitted.limits.accept_within_secs, Some(90));
        assert_eq!(submitted.accept_deadline, Some(at(90)));
        assert_eq!(
            (
                submitted.event.from,
                submitted.event.to,
                submitted.event.attempt
            ),
            (None, Queued, 0)
        );
        assert_eq!(submitted.event.reason, "submitted");

        let own = JobSpec {
            priority: Some(5),
            accept_within_secs: Some(30),
            max_attempts: None,
            retries: Some(2),
            ..spec
        };
        let submitted = submit(&own, &build);
        assert_eq!(submitted.priority, 5);
        assert_eq!(submitted.limits.max_attempts, 3, "the server's default");
        assert_eq!(submitted.limits.retries, 2);
        assert_eq!(submitted.accept_deadline, Some(at(30)));
    }

    #[test]
    fn a_claim_starts_the_next_attempt_afresh_and_only_from_the_queue() {
        let mut row = queued();
        row.run.attempt = 1;
        row.run.leases_lost = 1;
        row.run.error = Some("exit: 1".to_owned());
        row.run.time_complete = Some(at(5));
        let claimed = claim(&row, "c2", "L2".to_owned(), at(40), at(10)).expect("claimable");
        let run = &claimed.run;
        assert_eq!(run.state, Running);
        assert_eq!(run.client_id.as_deref(), Some("c2"));
        assert_eq!(run.lease_token.as_deref(), Some("L2"));
        assert_eq!(run.lease_expires_at, Some(at(40)));
        assert_eq!(run.attempt, 2);
        assert_eq!((run.time_start, run.time_complete), (Some(at(10)), None));
        assert_eq!(run.error, None);
        assert_eq!(run.leases_lost, 1, "lost leases stay counted");
        assert_eq!(
            claimed.event,
            EventDraft {
                time: at(10),
                from: Some(Queued),
                to: Running,
                client_id: Some("c2".to_owned()),
                attempt: 2,
                reason: "claimed".to_owned(),
            }
        );
        assert_eq!(claimed.count, None, "the backend records the claim itself");

        for state in [Running, Finished, Failed, Expired, Cancelled] {
            let mut row = queued();
            row.run.state = state;
            assert_eq!(claim(&row, "c2", "L2".to_owned(), at(40), at(10)), None);
        }
    }

    #[test]
    fn only_the_current_lease_of_a_running_job_passes() {
        let row = running();
        assert!(check_lease(&row, "L").is_ok());
        for lease in ["", "M", "l"] {
            assert!(matches!(
                check_lease(&row, lease),
                Err(StoreError::StaleLease { build, job }) if build == "7" && job == "a"
            ));
        }
        let mut finished = row.clone();
        finished.run.state = Finished;
        assert!(matches!(
            check_lease(&finished, "L"),
            Err(StoreError::StaleLease { .. })
        ));
        let holder = holder(&row);
        assert_eq!(
            (
                holder.client_id.as_str(),
                holder.attempt,
                holder.time_start,
                holder.timeout_secs
            ),
            ("c1", 1, at(10), 60)
        );
    }

    #[test]
    fn a_release_counts_neither_the_attempt_nor_the_claim() {
        let released = release(&running(), at(12));
        assert_eq!(
            released.run,
            JobRun {
                attempt: 0,
                ..queued().run
            }
        );
        assert_eq!(
            released.event,
            EventDraft {
                time: at(12),
                from: Some(Running),
                to: Queued,
                client_id: Some("c1".to_owned()),
                attempt: 0,
                reason: "released unstarted by its client".to_owned(),
            }
        );
        assert_eq!(
            released.count,
            Some(("c1".to_owned(), ClientCount::ClaimGivenBack))
        );
        assert!(!ClientCount::ClaimGivenBack.is_contact());
    }

    #[test]
    fn a_heartbeat_never_shortens_the_lease_and_merges_progress() {
        let row = running();
        assert_eq!(heartbeat(&row, at(90), None).lease_expires_at, Some(at(90)));
        assert_eq!(
            heartbeat(&row, at(20), None).lease_expires_at,
            Some(at(40)),
            "an older heartbeat arriving late"
        );

        let percent_only = Progress {
            percent: Some(50),
            ..Progress::default()
        };
        let run = heartbeat(&row, at(90), Some(&percent_only));
        assert_eq!(
            (
                run.major_state.as_deref(),
                run.minor_state.as_deref(),
                run.percent
            ),
            (Some("install"), Some("copy"), Some(50))
        );
        let minor_only = Progress {
            minor: Some("format".to_owned()),
            ..Progress::default()
        };
        let run = with_progress(run, &minor_only);
        assert_eq!(
            (
                run.major_state.as_deref(),
                run.minor_state.as_deref(),
                run.percent
            ),
            (Some("install"), Some("format"), Some(50))
        );
        let new_major = Progress {
            major: Some("image".to_owned()),
            ..Progress::default()
        };
        let run = with_progress(run, &new_major);
        assert_eq!(
            (
                run.major_state.as_deref(),
                run.minor_state.as_deref(),
                run.percent
            ),
            (Some("image"), None, Some(50)),
            "a new major state starts its minor state afresh"
        );
        let done = steps_done(&row, 7);
        assert!(done.steps_done);
        assert_eq!(done.steps_done_at, Some(7));
        assert_eq!(
            steps_done(
                &JobRow {
                    run: done,
                    ..row.clone()
                },
                9
            )
            .steps_done_at,
            Some(7)
        );
    }

    #[test]
    fn a_finish_needs_an_image_and_every_one_it_names_stored_under_its_lease() {
        let names = |names: &[&str]| {
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>()
        };
        let refused = finish_images("7", "a", &[], &names(&["a.wim"])).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "cannot finish job 7/a: a finished job has at least one image"
        );
        let refused = finish_images(
            "7",
            "a",
            &names(&["a.wim", "b.wim", "c.wim"]),
            &names(&["b.wim"]),
        )
        .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "cannot finish job 7/a: images not stored: a.wim, c.wim"
        );
        let dropped = finish_images(
            "7",
            "a",
            &names(&["a.wim"]),
            &names(&["scratch.wim", "a.wim", "log.txt"]),
        )
        .expect("a.wim is stored");
        assert_eq!(dropped, names(&["scratch.wim", "log.txt"]));

        let finished = finish(&running(), 3500, at(50));
        let run = &finished.run;
        assert_eq!(run.state, Finished);
        assert_eq!(
            (run.lease_token.as_deref(), run.lease_expires_at),
            (None, None)
        );
        assert_eq!(
            (run.time_complete, run.percent, run.error.as_deref()),
            (Some(at(50)), Some(100), None)
        );
        assert_eq!(
            run.client_id.as_deref(),
            Some("c1"),
            "who finished it stays"
        );
        assert_eq!(finished.event.reason, "images stored and verified");
        assert_eq!(
            finished.count,
            Some(("c1".to_owned(), ClientCount::Finished { image_bytes: 3500 }))
        );
        assert!(ClientCount::Finished { image_bytes: 0 }.is_contact());
    }

    #[test]
    fn a_failure_is_retried_while_retries_last_and_never_counts_as_a_lost_lease() {
        let mut row = running();
        row.limits.retries = 2;
        let failure = Failure {
            reason: "exit".to_owned(),
            message: "status 1".to_owned(),
        };
        let retried = fail(&row, &failure, at(20));
        assert_eq!(retried.run.state, Queued);
        assert_eq!(retried.run.retries_used, 1);
        assert_eq!(retried.run.leases_lost, 0);
        assert_eq!(retried.run.attempt, 1, "the attempt stays counted");
        assert_eq!(retried.run.error.as_deref(), Some("exit: status 1"));
        assert_eq!(
            (retried.run.client_id.as_deref(), retried.run.time_start),
            (None, None)
        );
        assert_eq!(retried.run.time_complete, None);
        assert_eq!(retried.event.reason, "exit (retry 1 of 2)");
        assert_eq!(retried.count, Some(("c1".to_owned(), ClientCount::Failed)));
        assert!(ClientCount::Failed.is_contact());

        row.run.retries_used = 2;
        let failed = fail(&row, &failure, at(20));
        assert_eq!(failed.run.state, Failed);
        assert_eq!(failed.run.time_complete, Some(at(20)));
        assert_eq!(failed.run.error.as_deref(), Some("exit: status 1"));
        assert_eq!(failed.run.lease_token, None);
        assert_eq!(failed.event.reason, "exit");
        assert_eq!(
            (failed.event.from, failed.event.to),
            (Some(Running), Failed)
        );
    }

    #[test]
    fn the_timekeeper_takes_a_lapsed_lease_or_a_job_held_past_timeout_and_grace() {
        let row = running();
        assert_eq!(overdue(&row, at(40), 30), None, "the lease runs to 40 s");
        assert_eq!(
            overdue(&row, at(41), 30),
            Some(TakeBack::LeaseLost(LEASE_LAPSED))
        );

        let mut heartbeating = row.clone();
        heartbeating.run.lease_expires_at = Some(at(1000));
        // Started at 10 s, timeout 60 s, grace 30 s: hung after 100 s.
        assert_eq!(overdue(&heartbeating, at(100), 30), None);
        assert_eq!(overdue(&heartbeating, at(101), 30), Some(TakeBack::Hung));
        heartbeating.run.steps_done = true;
        assert_eq!(overdue(&heartbeating, at(101), 30), None, "uploading");
        assert_eq!(overdue(&queued(), at(10_000), 0), None);
    }

    #[test]
    fn a_run_taken_back_is_requeued_until_maxattempts_runs_were_lost() {
        let mut row = running();
        row.limits.max_attempts = 2;
        let requeued = take_back(&row, TakeBack::LeaseLost("client connection lost"), at(50))
            .expect("running");
        assert_eq!(
            requeued.run,
            JobRun {
                attempt: 1,
                leases_lost: 1,
                ..queued().run
            }
        );
        assert_eq!(requeued.event.reason, "client connection lost");
        assert_eq!(requeued.event.attempt, 1);
        assert_eq!(requeued.count, Some(("c1".to_owned(), ClientCount::Lost)));
        assert!(!ClientCount::Lost.is_contact());

        let mut second = with_run(&row, requeued.run);
        second.run = claim(&second, "c2", "M".to_owned(), at(90), at(60))
            .expect("queued")
            .run;
        let lost = take_back(&second, TakeBack::LeaseLost(LEASE_LAPSED), at(91)).expect("running");
        assert_eq!(lost.run.state, Failed);
        assert_eq!(lost.run.leases_lost, 2);
        assert_eq!(lost.run.client_id.as_deref(), Some("c2"));
        assert_eq!(lost.run.time_complete, Some(at(91)));
        let reason = "lost: lease lapsed on attempt 2; 2 of 2 attempts lost";
        assert_eq!(lost.event.reason, reason);
        assert_eq!(lost.run.error.as_deref(), Some(reason));
        assert_eq!(lost.count, Some(("c2".to_owned(), ClientCount::Lost)));
    }

    #[test]
    fn a_hung_job_fails_with_timeout_and_counts_as_lost() {
        let hung = take_back(&running(), TakeBack::Hung, at(200)).expect("running");
        let reason = "timeout: held past its timeout by a client that did not stop it";
        assert_eq!(
            (hung.run.state, hung.event.reason.as_str()),
            (Failed, reason)
        );
        assert_eq!(hung.run.error.as_deref(), Some(reason));
        assert_eq!(hung.run.leases_lost, 1);
        assert_eq!(hung.count, Some(("c1".to_owned(), ClientCount::Lost)));

        let refused = take_back(&queued(), TakeBack::Hung, at(200)).unwrap_err();
        assert_eq!(refused.to_string(), "job 7/a is not running");
    }

    #[test]
    fn only_a_never_taken_job_past_its_accept_deadline_expires() {
        let mut row = queued();
        row.limits.accept_within_secs = Some(60);
        row.run.accept_deadline = Some(at(60));
        assert_eq!(expire(&row, at(60)), None);
        let expired = expire(&row, at(61)).expect("past its deadline");
        assert_eq!(expired.run.state, Expired);
        assert_eq!(expired.run.time_complete, Some(at(61)));
        assert_eq!(
            expired.run.error.as_deref(),
            Some("expired: no client accepted it within 60 s")
        );
        assert_eq!(
            expired.event,
            EventDraft {
                time: at(61),
                from: Some(Queued),
                to: Expired,
                client_id: None,
                attempt: 0,
                reason: "no client accepted it within 60 s".to_owned(),
            }
        );
        let mut taken_before = row.clone();
        taken_before.run.attempt = 1;
        assert_eq!(expire(&taken_before, at(61)), None);
        assert_eq!(expire(&queued(), at(100_000)), None, "no deadline");
    }

    #[test]
    fn a_restart_starts_the_job_from_nothing_with_a_fresh_accept_deadline() {
        let mut row = running();
        row.limits.accept_within_secs = Some(60);
        row.limits.retries = 1;
        row.run.accept_deadline = Some(at(60));
        row.run.retries_used = 1;
        row.run.leases_lost = 1;
        let failed = with_run(
            &row,
            fail(
                &row,
                &Failure {
                    reason: "exit".to_owned(),
                    message: "2".to_owned(),
                },
                at(20),
            )
            .run,
        );
        let restarted = restart(&failed, at(100)).expect("failed jobs restart");
        assert_eq!(
            restarted.run,
            JobRun {
                accept_deadline: Some(at(160)),
                ..queued().run
            }
        );
        assert!(restarted.drop_images);
        assert_eq!(
            restarted.count, None,
            "an operator's restart counts nothing"
        );
        assert_eq!(
            restarted.event,
            EventDraft {
                time: at(100),
                from: Some(Failed),
                to: Queued,
                client_id: Some("c1".to_owned()),
                attempt: 0,
                reason: "restarted by an operator".to_owned(),
            }
        );
        let refused = restart(&queued(), at(100)).unwrap_err();
        assert_eq!(refused.to_string(), "job 7/a is already queued");
    }

    #[test]
    fn a_cancel_ends_a_queued_or_running_job_and_counts_nothing() {
        let cancelled = cancel(&running(), at(30)).expect("running jobs cancel");
        assert_eq!(cancelled.run.state, Cancelled);
        assert_eq!(cancelled.run.lease_token, None);
        assert_eq!(cancelled.run.time_complete, Some(at(30)));
        assert_eq!(
            cancelled.run.error.as_deref(),
            Some("cancelled by an operator")
        );
        assert_eq!(cancelled.event.reason, "cancelled by an operator");
        assert_eq!(
            (cancelled.event.from, cancelled.event.attempt),
            (Some(Running), 1)
        );
        assert_eq!(cancelled.count, None);
        assert!(cancel(&queued(), at(30)).is_ok());

        let ended = with_run(&queued(), cancelled.run);
        let refused = cancel(&ended, at(31)).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "job 7/a is already cancelled; only queued or running jobs can be cancelled"
        );
    }

    #[test]
    fn every_transition_follows_the_state_machine() {
        assert!(check_transition("7", "a", None, Queued).is_ok());
        assert!(check_transition("7", "a", Some(Queued), Running).is_ok());
        let refused = check_transition("7", "a", Some(Finished), Running).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "job 7/a cannot go from finished to running"
        );
        // Every transition a rule makes from a state it accepts is an arrow.
        let row = running();
        let transitions = [
            claim(&queued(), "c", "L".to_owned(), at(1), at(0)).expect("queued"),
            release(&row, at(1)),
            finish(&row, 1, at(1)),
            fail(
                &row,
                &Failure {
                    reason: "r".into(),
                    message: "m".into(),
                },
                at(1),
            ),
            take_back(&row, TakeBack::Hung, at(1)).expect("running"),
            cancel(&row, at(1)).expect("running"),
        ];
        for transition in transitions {
            let event = &transition.event;
            assert!(
                check_transition("7", "a", event.from, event.to).is_ok(),
                "{event:?}"
            );
            assert_eq!(event.to, transition.run.state, "{transition:?}");
        }
    }

    #[test]
    fn a_log_takes_lines_while_they_fit_then_is_cut_for_good() {
        let lines = |texts: &[&str]| {
            texts
                .iter()
                .map(|text| NewLogLine {
                    stream: "stdout".to_owned(),
                    text: text.to_string(),
                })
                .collect::<Vec<_>>()
        };
        let fit = fit_log(
            LogVolume::default(),
            &lines(&["0123456789", "abcdefghij"]),
            25,
        );
        assert_eq!(
            fit,
            LogFit {
                n_stored: 2,
                cut_now: false,
                volume: LogVolume {
                    bytes: 20,
                    cut: false
                }
            }
        );
        assert!(fit.changed());
        let fit = fit_log(fit.volume, &lines(&["12345", "123456", "x"]), 25);
        assert_eq!(
            fit,
            LogFit {
                n_stored: 1,
                cut_now: true,
                volume: LogVolume {
                    bytes: 25,
                    cut: true
                }
            }
        );
        let fit = fit_log(fit.volume, &lines(&["x"]), 25);
        assert_eq!(
            (fit.n_stored, fit.cut_now, fit.volume.cut),
            (0, false, true)
        );
        assert!(!fit.changed());
        let unlimited = fit_log(LogVolume::default(), &lines(&["a", "b"]), u64::MAX);
        assert_eq!((unlimited.n_stored, unlimited.cut_now), (2, false));
        assert!(!fit_log(LogVolume::default(), &[], 25).changed());
    }

    #[test]
    fn job_ends_call_for_notices_and_a_cancel_only_for_its_build_end() {
        let event = |to: JobState| Event {
            seq: 9,
            time: at(0),
            build: "7".to_owned(),
            job: "a".to_owned(),
            from: Some(Running),
            to,
            client_id: Some("c1".to_owned()),
            attempt: 1,
            reason: Some("r".to_owned()),
        };
        for (to, kind) in [
            (Finished, "job_finished"),
            (Failed, "job_failed"),
            (Expired, "job_expired"),
        ] {
            assert!(may_notify(&event(to)));
            let notice = job_notice(&event(to)).expect("a job's end");
            assert_eq!(notice.event, kind);
            assert_eq!((notice.job.as_deref(), notice.seq), (Some("a"), 9));
            assert_eq!(notice.reason.as_deref(), Some("r"));
            assert_eq!(notice.time, kiln_proto::format_rfc3339(at(0)));
        }
        assert!(may_notify(&event(Cancelled)));
        assert_eq!(job_notice(&event(Cancelled)), None);
        assert!(!may_notify(&event(Queued)) && !may_notify(&event(Running)));
        let build_end = build_end_notice(&event(Cancelled), 3, 2);
        assert_eq!(build_end.event, "build_finished");
        assert_eq!((build_end.job, build_end.client_id), (None, None));
        assert_eq!(build_end.reason.as_deref(), Some("2 of 3 jobs finished"));
    }

    #[test]
    fn a_build_with_running_jobs_is_not_deleted() {
        assert!(check_deletable("7", &[]).is_ok());
        let refused = check_deletable("7", &["a".to_owned(), "b".to_owned()]).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "build 7 has 2 running job(s): a, b; cancel them first"
        );
    }

    #[test]
    fn enrollment_takes_only_a_free_id_and_an_operator_replaces_any() {
        use CredentialDecision::{Refuse, Write};
        use CredentialWrite::{Enroll, Issue};
        let cases = [
            (
                Enroll,
                None,
                Write {
                    origin: "enrolled",
                    put: CredentialPut::Created,
                },
            ),
            (Enroll, Some(false), Refuse(CredentialPut::Exists)),
            (Enroll, Some(true), Refuse(CredentialPut::Revoked)),
            (
                Issue,
                None,
                Write {
                    origin: "issued",
                    put: CredentialPut::Created,
                },
            ),
            (
                Issue,
                Some(false),
                Write {
                    origin: "issued",
                    put: CredentialPut::Replaced,
                },
            ),
            (
                Issue,
                Some(true),
                Write {
                    origin: "issued",
                    put: CredentialPut::Replaced,
                },
            ),
        ];
        for (how, existing, decision) in cases {
            assert_eq!(
                credential_write(how, existing),
                decision,
                "{how:?} {existing:?}"
            );
        }
    }

    #[test]
    fn lease_tokens_are_128_random_bits() {
        let first = new_lease_token();
        assert_eq!(first.len(), 32);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(first, new_lease_token());
    }
}
