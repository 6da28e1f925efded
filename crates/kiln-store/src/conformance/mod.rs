//! The store's tests, written against its traits, for every backend to pass (cargo
//! feature `conformance`).
//!
//! A backend gives a [`StoreFactory`] (how to make a new, empty store's place and how to
//! open the store there, again and again) and runs every case with one line in a test
//! file:
//!
//! ```text
//! kiln_store::conformance_tests!(sqlite, SqliteFactory);
//! ```
//!
//! which expands to a module `sqlite` with one `#[tokio::test]` per case of [`cases`],
//! named after it, and `sqlite::CASES`, their names. The crate running it needs `tokio`
//! (with `macros` and `rt-multi-thread`) among its dependencies.
//!
//! The cases cover builds and their counts, the queue order, atomic claims, lease
//! fencing (invariant 2), timed transitions (lapsed leases, hung jobs, accept
//! deadlines), restart and cancel, durability across a reopen (invariant 3), the event
//! every transition writes (invariant 5), logs and their limit, images, the pack index and
//! chunk pins, the webhook outbox, and the clients' histories and credentials. Times come from a fake clock
//! ([`at`]), so every case is deterministic. No case skips itself: a factory that cannot
//! make a store fails every case.

pub mod cases;

use crate::{
    ClaimedJob, ClaimingClient, Failure, NewBuild, NewImage, Store, StoreError, StoreResult,
};
use async_trait::async_trait;
use kiln_proto::api::{ClientInfo, Event, NewLogLine};
use kiln_proto::manifest::{BuildManifest, JobSpec};
use kiln_proto::progress::Progress;
use kiln_proto::state::JobState;
use std::sync::Arc;

/// How a backend makes the stores the cases run on.
#[async_trait]
pub trait StoreFactory: Send + Sync {
    /// Where one store's data lives (a temporary directory, a scratch database), kept
    /// while a case runs and removed when dropped.
    type Place: Send + Sync;

    /// A new place holding no store yet. A factory that cannot make one (its database
    /// server is not there, say) returns the error: the case fails, it never skips.
    async fn new_place(&self) -> anyhow::Result<Self::Place>;

    /// Opens the store at `place`, creating it or applying its migrations as its
    /// backend does at a server's start. Opening a place again, after the earlier store
    /// was dropped, must give back everything stored there.
    async fn open(&self, place: &Self::Place) -> anyhow::Result<Arc<dyn Store>>;
}

/// What every case returns.
pub type CaseResult = anyhow::Result<()>;

/// Runs every conformance case on a backend: `conformance_tests!(name, factory)` makes
/// a module `name` with one `#[tokio::test]` per case of
/// [`conformance::cases`](crate::conformance::cases), each opening its stores with
/// `factory` (an expression whose type implements
/// [`StoreFactory`](crate::conformance::StoreFactory), evaluated in that module, which
/// sees the items of the one around it), and `name::CASES`, the names of the cases.
#[macro_export]
macro_rules! conformance_tests {
    ($module:ident, $factory:expr) => {
        $crate::__conformance_tests! {
            $module, $factory,
            current_thread [
                insert_build_is_listed_with_counts_and_a_duplicate_number_changes_nothing,
                a_build_of_thousands_of_jobs_is_stored_whole_with_a_queued_event_each,
                queued_candidates_order_by_priority_then_accept_deadline_then_submission,
                claim_hands_out_attempt_one_under_a_fresh_lease_and_only_once,
                a_jobs_verify_step_is_kept_and_handed_out_with_each_of_its_claims,
                lease_calls_with_a_wrong_token_are_refused_and_with_the_current_one_accepted,
                old_lease_is_refused_after_restart_and_after_cancel,
                heartbeat_extends_the_lease_and_records_progress,
                finish_keeps_only_images_stored_under_the_finishing_lease,
                fail_without_retries_fails_the_job_with_reason_and_message,
                fail_with_a_retry_left_requeues_then_fails,
                reap_requeues_a_lapsed_lease_and_fails_it_as_lost_on_the_last_attempt,
                reap_fails_a_job_held_past_its_timeout_and_grace_despite_heartbeats,
                a_job_whose_steps_are_done_is_taken_back_only_when_its_lease_lapses,
                expire_unclaimed_expires_only_never_claimed_jobs_past_their_deadline,
                next_deadline_is_the_earliest_lease_expiry_or_accept_deadline,
                release_requeues_without_counting_the_attempt,
                restart_puts_a_finished_or_failed_job_back_as_new,
                restart_of_an_expired_job_gives_it_a_fresh_accept_deadline,
                cancel_ends_a_queued_or_running_job_and_refuses_an_ended_one,
                extend_all_leases_gives_running_leases_at_least_until,
                reopened_store_keeps_builds_jobs_events_logs_and_leases,
                read_log_returns_lines_after_a_seq_in_order_with_their_attempt,
                mean_run_secs_averages_finished_jobs_of_a_config_type,
                script_retries_do_not_use_up_the_lost_lease_allowance,
                finish_without_an_image_is_refused,
                a_requeued_job_shows_no_start_time,
                deleting_a_build_removes_everything_of_it_and_nothing_else,
                a_files_key_is_in_use_while_a_build_holds_it,
                counters_add_up_and_survive_reopening,
                load_counts_give_builds_and_queued_and_running_jobs,
                job_counts_give_each_state_and_config_type_with_the_oldest_queued_wait,
                farm_events_page_every_build_s_events_in_order,
                claim_records_the_client_as_its_latest_claim_describes_it_with_the_jobs_it_holds,
                finish_counts_a_finished_job_and_the_size_of_the_images_it_keeps_for_its_client,
                fail_counts_a_failed_job_for_its_client_whether_it_is_retried_or_not,
                lapsed_leases_dropped_sessions_give_ups_and_hung_jobs_count_as_lost_for_their_client,
                a_job_released_unstarted_counts_neither_as_claimed_nor_as_lost,
                an_operator_cancelling_or_restarting_a_running_job_counts_no_end_for_its_client,
                touch_client_moves_last_contact_forward_for_a_known_client_only,
                client_history_survives_reopening,
                log_volume_stops_at_its_limit_with_a_notice_and_the_count_survives_reopening,
                job_ends_queue_a_notice_per_url_and_the_build_end_once_per_time_it_ends,
                the_outbox_hands_out_a_url_s_notices_in_order_until_delivered_or_given_up,
                a_url_s_notices_are_taken_by_one_notifier_at_a_time,
                enrolling_takes_a_free_id_only_and_issuing_replaces_any_credential,
                a_logged_out_web_session_stays_ended_after_reopening_until_it_would_expire,
                every_area_works_through_its_own_narrow_trait_object,
                the_pack_index_keeps_the_first_entry_of_a_chunk_and_survives_reopening,
                removing_chunks_skips_pinned_ones_until_their_pins_end,
                replacing_a_sparse_pack_moves_its_live_entries_and_forgets_it,
                the_image_store_id_is_recorded_once_and_survives_reopening,
            ]
            multi_thread [
                racing_claims_from_eight_tasks_hand_each_job_to_exactly_one_client,
                one_client_claiming_and_finishing_from_eight_tasks_at_once_never_deadlocks,
                reaping_clients_overdue_jobs_while_they_claim_and_finish_never_deadlocks,
                a_reader_paging_a_build_s_events_while_its_jobs_change_misses_none,
                calls_made_at_once_are_each_decided_as_if_alone,
            ]
        }
    };
}

/// The expansion of [`conformance_tests!`]: the list of cases is written once, there.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    (
        $module:ident, $factory:expr,
        current_thread [$($case:ident),* $(,)?]
        multi_thread [$($racing_case:ident),* $(,)?]
    ) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[::tokio::test]
                async fn $case() -> $crate::conformance::CaseResult {
                    $crate::conformance::cases::$case(&$factory).await
                }
            )*

            $(
                #[::tokio::test(flavor = "multi_thread", worker_threads = 8)]
                async fn $racing_case() -> $crate::conformance::CaseResult {
                    $crate::conformance::cases::$racing_case(&$factory).await
                }
            )*

            /// The name of every case this module runs.
            pub const CASES: &[&str] = &[$(stringify!($case),)* $(stringify!($racing_case),)*];
        }
    };
}

pub const MICROS_PER_SEC: i64 = 1_000_000;

/// The fake clock's zero, a fixed instant.
pub const T0: i64 = 1_700_000_000 * MICROS_PER_SEC;

/// How long the leases handed out by [`claim`] last.
pub const LEASE_SECS: i64 = 30;

/// The build most cases use.
pub const BUILD: &str = "20021016.1";

/// The fake clock: `secs` seconds after [`T0`], in unix microseconds.
pub fn at(secs: i64) -> i64 {
    T0 + secs * MICROS_PER_SEC
}

/// A new place and the store opened there.
pub async fn open_store<F: StoreFactory>(
    factory: &F,
) -> anyhow::Result<(F::Place, Arc<dyn Store>)> {
    let place = factory.new_place().await?;
    let store = factory.open(&place).await?;
    Ok((place, store))
}

/// A new store holding build [`BUILD`] of `n_jobs` jobs `job-000`, `job-001`, ...;
/// their ids in order.
pub async fn open_store_with_jobs<F: StoreFactory>(
    factory: &F,
    n_jobs: usize,
) -> anyhow::Result<(F::Place, Arc<dyn Store>, Vec<String>)> {
    let (place, store) = open_store(factory).await?;
    let job_ids: Vec<String> = (0..n_jobs).map(|idx| format!("job-{idx:03}")).collect();
    store
        .insert_build(&new_build(
            BUILD,
            job_ids.iter().map(|id| job(id)).collect(),
            at(0),
        ))
        .await?;
    Ok((place, store, job_ids))
}

/// A job with the seed's usual fields and no scheduling options.
pub fn job(id: &str) -> JobSpec {
    JobSpec {
        id: id.to_owned(),
        title: format!("Image {id}"),
        config_type: "winxp-pro".to_owned(),
        install_script: "scripts/install.cmd".to_owned(),
        configure_script: None,
        image_script: "scripts/image.cmd".to_owned(),
        verify_script: None,
        timeout_secs: 3600,
        priority: None,
        accept_within_secs: None,
        assigned_to: None,
        max_attempts: None,
        retries: None,
    }
}

/// A build of `jobs` submitted at `submitted_at`, notifying one URL.
pub fn new_build(number: &str, jobs: Vec<JobSpec>, submitted_at: i64) -> NewBuild {
    NewBuild {
        manifest: BuildManifest {
            number: number.to_owned(),
            title: format!("Release {number}"),
            build_time: Some("20021016:18:00:00".to_owned()),
            log_file: Some("relbuild.log".to_owned()),
            notify: vec!["http://127.0.0.1:9/notify".to_owned()],
            jobs,
        },
        files_key: format!("files/{number}.tar"),
        files_size: 4096,
        submitted_at,
        default_accept_within_secs: None,
        default_max_attempts: 3,
    }
}

/// Claims a job at `now` under a lease of [`LEASE_SECS`]; an error if it is not queued.
pub async fn claim(
    store: &dyn Store,
    build: &str,
    job: &str,
    client_id: &str,
    now: i64,
) -> anyhow::Result<ClaimedJob> {
    store
        .claim(
            build,
            job,
            &ClaimingClient::with_id(client_id),
            now + LEASE_SECS * MICROS_PER_SEC,
            now,
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("job {build}/{job} was not claimable"))
}

/// An image of 1 MiB named `name`, with hashes and a chunk list made from its name.
pub fn image(name: &str, created_at: i64) -> NewImage {
    NewImage {
        name: name.to_owned(),
        size: 1 << 20,
        blake3: format!("b3-{name}"),
        sha256: format!("sha-{name}"),
        blob_key: format!("images/{name}"),
        created_at,
        chunk_list: name.as_bytes().repeat(36),
    }
}

fn log_line(stream: &str, text: &str) -> NewLogLine {
    NewLogLine {
        stream: stream.to_owned(),
        text: text.to_owned(),
    }
}

fn failure(reason: &str, message: &str) -> Failure {
    Failure {
        reason: reason.to_owned(),
        message: message.to_owned(),
    }
}

/// Stores one image named after the job under the claim's lease and finishes with it.
async fn finish_with_image(
    store: &dyn Store,
    claimed: &ClaimedJob,
    now: i64,
) -> anyhow::Result<Event> {
    let name = format!("{}.wim", claimed.job);
    store
        .add_image(
            &claimed.build,
            &claimed.job,
            &claimed.lease,
            &image(&name, now),
        )
        .await?;
    Ok(store
        .finish(&claimed.build, &claimed.job, &claimed.lease, &[name], now)
        .await?)
}

/// One transition as the event log has it, without its sequence number and reason.
#[derive(Debug, PartialEq)]
struct Step {
    time: i64,
    from: Option<JobState>,
    to: JobState,
    client_id: Option<String>,
    attempt: u32,
}

fn step(
    time: i64,
    from: Option<JobState>,
    to: JobState,
    client_id: Option<&str>,
    attempt: u32,
) -> Step {
    Step {
        time,
        from,
        to,
        client_id: client_id.map(str::to_owned),
        attempt,
    }
}

fn steps(events: &[Event]) -> Vec<Step> {
    events
        .iter()
        .map(|event| Step {
            time: event.time,
            from: event.from,
            to: event.to,
            client_id: event.client_id.clone(),
            attempt: event.attempt,
        })
        .collect()
}

fn reason(event: &Event) -> &str {
    event.reason.as_deref().unwrap_or_default()
}

/// The job's events in order. Checks what every event of the build must have: a
/// sequence that only grows, its build, and a reason.
async fn history(store: &dyn Store, build: &str, job: &str) -> anyhow::Result<Vec<Event>> {
    let events = store.events(build, 0).await?;
    assert!(
        events.windows(2).all(|pair| pair[0].seq < pair[1].seq),
        "events of build {build} are not in sequence order: {events:?}"
    );
    for event in &events {
        assert_eq!(event.build, build, "event of another build: {event:?}");
        assert!(
            !reason(event).is_empty(),
            "event without a reason: {event:?}"
        );
    }
    Ok(events
        .into_iter()
        .filter(|event| event.job == job)
        .collect())
}

#[track_caller]
fn assert_stale<T: std::fmt::Debug>(call: &str, result: StoreResult<T>) {
    match result {
        Err(StoreError::StaleLease { .. }) => {}
        other => panic!("{call}: expected StoreError::StaleLease, got {other:?}"),
    }
}

#[track_caller]
fn assert_conflict<T: std::fmt::Debug>(call: &str, result: StoreResult<T>) {
    match result {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("{call}: expected StoreError::Conflict, got {other:?}"),
    }
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(call: &str, result: StoreResult<T>) {
    match result {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("{call}: expected StoreError::NotFound, got {other:?}"),
    }
}

/// Every call a client makes about a job, with `lease`: each must be refused as stale.
async fn assert_every_lease_call_refused(
    store: &dyn Store,
    build: &str,
    job: &str,
    lease: &str,
    now: i64,
) {
    let progress = Progress {
        major: Some("stale".to_owned()),
        ..Progress::default()
    };
    assert_stale("check_lease", store.check_lease(build, job, lease).await);
    assert_stale(
        "heartbeat",
        store
            .heartbeat(
                build,
                job,
                lease,
                now + 600 * MICROS_PER_SEC,
                Some(&progress),
            )
            .await,
    );
    assert_stale(
        "append_log",
        store
            .append_log(
                build,
                job,
                lease,
                &[log_line("stdout", "from a stale client")],
                Some(&progress),
                now,
            )
            .await,
    );
    assert_stale(
        "add_image",
        store
            .add_image(build, job, lease, &image("stale.wim", now))
            .await,
    );
    assert_stale(
        "finish",
        store
            .finish(build, job, lease, &["stale.wim".to_owned()], now)
            .await,
    );
    assert_stale(
        "fail",
        store
            .fail(build, job, lease, &failure("exit", "stale"), now)
            .await,
    );
    assert_stale("release", store.release(build, job, lease, now).await);
}

/// The client's record in [`Clients::clients`](crate::Clients::clients); an error if
/// there is none.
pub async fn client_record(store: &dyn Store, id: &str) -> anyhow::Result<ClientInfo> {
    store
        .clients()
        .await?
        .into_iter()
        .find(|client| client.id == id)
        .ok_or_else(|| anyhow::anyhow!("the store lists no client {id}"))
}

/// The ends a client's record counts: (claimed, finished, failed, lost).
pub fn tally(client: &ClientInfo) -> (u64, u64, u64, u64) {
    (
        client.n_claimed,
        client.n_finished,
        client.n_failed,
        client.n_lost,
    )
}
