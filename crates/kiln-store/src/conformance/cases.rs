//! The conformance cases: each is one behaviour of the store, checked through its
//! traits on a store that a [`StoreFactory`] opened.
//! [`conformance_tests!`](crate::conformance_tests) runs every one of them as a test of
//! its own, named after it.

use super::*;
use crate::{Clients, Images, Logs, Outbox, PackEntry, PackFill, PackedAt, Queue};
use anyhow::Context as _;
use kiln_proto::api::Notice;
use kiln_proto::state::JobState::{Cancelled, Expired, Failed, Finished, Queued, Running};
use kiln_proto::transfer::ChunkHash;
use std::collections::HashSet;

pub async fn insert_build_is_listed_with_counts_and_a_duplicate_number_changes_nothing<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let original = new_build(BUILD, vec![job("a"), job("b"), job("c")], at(0));
    store.insert_build(&original).await?;
    store
        .insert_build(&new_build("20021017.1", vec![job("x")], at(10)))
        .await?;

    let summary = store.build_summary(BUILD).await?;
    assert_eq!(summary.number, BUILD);
    assert_eq!(summary.title, format!("Release {BUILD}"));
    assert_eq!(summary.build_time.as_deref(), Some("20021016:18:00:00"));
    assert_eq!(summary.submitted_at, at(0));
    assert_eq!((summary.n_jobs, summary.n_queued), (3, 3));

    let a = claim(&*store, BUILD, "a", "client-1", at(20)).await?;
    finish_with_image(&*store, &a, at(30)).await?;
    claim(&*store, BUILD, "b", "client-2", at(20)).await?;
    let summary = store.build_summary(BUILD).await?;
    assert_eq!(
        (
            summary.n_jobs,
            summary.n_queued,
            summary.n_running,
            summary.n_finished,
            summary.n_failed,
            summary.n_expired,
            summary.n_cancelled
        ),
        (3, 1, 1, 1, 0, 0, 0)
    );

    let builds = store.list_builds().await?;
    let numbers: Vec<&str> = builds.iter().map(|b| b.number.as_str()).collect();
    assert_eq!(numbers, ["20021017.1", BUILD], "newest first");
    assert_eq!((builds[0].n_jobs, builds[0].n_queued), (1, 1));

    let jobs = store.list_jobs(BUILD).await?;
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"], "manifest order");
    let c_events = history(&*store, BUILD, "c").await?;
    assert_eq!(steps(&c_events), [step(at(0), None, Queued, None, 0)]);
    assert_eq!(reason(&c_events[0]), "submitted");

    let summaries_before = format!("{:?}", store.list_builds().await?);
    let events_before = store.events(BUILD, 0).await?.len();
    let mut duplicate = new_build(BUILD, vec![job("z")], at(40));
    duplicate.manifest.title = "Another release".to_owned();
    match store.insert_build(&duplicate).await {
        Err(StoreError::DuplicateBuild(number)) => assert_eq!(number, BUILD),
        other => panic!("expected StoreError::DuplicateBuild, got {other:?}"),
    }
    assert_eq!(
        format!("{:?}", store.list_builds().await?),
        summaries_before
    );
    assert_eq!(store.list_jobs(BUILD).await?, jobs);
    assert_eq!(store.events(BUILD, 0).await?.len(), events_before);
    let stored = store.get_build(BUILD).await?;
    assert_eq!(stored.manifest, original.manifest);
    assert_eq!(stored.submitted_at, at(0));
    assert_eq!(stored.files_key, original.files_key);
    assert_eq!(
        store.build_files(BUILD).await?,
        (original.files_key.clone(), original.files_size)
    );
    assert_not_found("build_files of no build", store.build_files("none").await);
    assert_not_found("get_job z", store.get_job(BUILD, "z").await);
    Ok(())
}

/// A build of more jobs than a backend may insert in one statement: every job is stored
/// with its fields and one `queued` event, numbered in the manifest's order.
pub async fn a_build_of_thousands_of_jobs_is_stored_whole_with_a_queued_event_each<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    const N_JOBS: usize = 2_500;
    let (_place, store) = open_store(factory).await?;
    let jobs: Vec<JobSpec> = (0..N_JOBS)
        .map(|idx| JobSpec {
            priority: Some(if idx == 1_234 { 5 } else { 0 }),
            assigned_to: (idx == 2_001).then(|| "client-7".to_owned()),
            ..job(&format!("job-{idx:04}"))
        })
        .collect();
    store.insert_build(&new_build(BUILD, jobs, at(0))).await?;

    let summary = store.build_summary(BUILD).await?;
    assert_eq!(
        (summary.n_jobs as usize, summary.n_queued as usize),
        (N_JOBS, N_JOBS)
    );
    let events = store.events(BUILD, 0).await?;
    assert_eq!(events.len(), N_JOBS, "one event a job");
    for (idx, event) in events.iter().enumerate() {
        assert_eq!(
            event.job,
            format!("job-{idx:04}"),
            "events in the manifest's order"
        );
        assert_eq!((event.from, event.to), (None, Queued));
    }
    assert!(events.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    let candidates = store.queued_candidates(2).await?;
    assert_eq!(
        candidates[0].job, "job-1234",
        "the job of higher priority first"
    );
    assert_eq!(candidates[1].job, "job-0000");
    let assigned = store.get_job(BUILD, "job-2001").await?;
    assert_eq!(assigned.assigned_to.as_deref(), Some("client-7"));
    let last = store.get_job(BUILD, "job-2499").await?;
    assert_eq!(
        (last.state, last.title.as_str()),
        (Queued, "Image job-2499")
    );
    Ok(())
}

pub async fn queued_candidates_order_by_priority_then_accept_deadline_then_submission<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let with = |id: &str, priority: Option<i64>, accept_within_secs: Option<u64>| JobSpec {
        priority,
        accept_within_secs,
        ..job(id)
    };
    store
        .insert_build(&new_build(
            BUILD,
            vec![
                with("plain-1", None, None),
                with("high-open", Some(5), None),
                with("due-600", Some(0), Some(600)),
                with("due-60", Some(0), Some(60)),
                with("high-due", Some(5), Some(3600)),
                with("low", Some(-1), None),
                with("plain-2", None, None),
            ],
            at(0),
        ))
        .await?;
    // The later build's deadline (10 + 30 s) comes before any of the first build's.
    store
        .insert_build(&new_build(
            "20021017.1",
            vec![
                with("later-plain", Some(0), None),
                with("later-due-30", None, Some(30)),
            ],
            at(10),
        ))
        .await?;

    let order: Vec<String> = store
        .queued_candidates(100)
        .await?
        .into_iter()
        .map(|c| c.job)
        .collect();
    assert_eq!(
        order,
        [
            "high-due",
            "high-open",
            "later-due-30",
            "due-60",
            "due-600",
            "plain-1",
            "plain-2",
            "later-plain",
            "low"
        ]
    );

    let first_three = store.queued_candidates(3).await?;
    assert_eq!(first_three.len(), 3);
    assert_eq!(first_three[0].build, BUILD);
    assert_eq!(first_three[0].config_type, "winxp-pro");
    assert_eq!(first_three[2].build, "20021017.1");

    claim(&*store, BUILD, "high-due", "client-1", at(20)).await?;
    let order: Vec<String> = store
        .queued_candidates(2)
        .await?
        .into_iter()
        .map(|c| c.job)
        .collect();
    assert_eq!(
        order,
        ["high-open", "later-due-30"],
        "a claimed job leaves the queue"
    );
    Ok(())
}

pub async fn claim_hands_out_attempt_one_under_a_fresh_lease_and_only_once<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let configured = JobSpec {
        configure_script: Some("scripts/configure.cmd".to_owned()),
        timeout_secs: 900,
        ..job("a")
    };
    store
        .insert_build(&new_build(BUILD, vec![configured, job("b")], at(0)))
        .await?;

    let claimed = claim(&*store, BUILD, "a", "client-1", at(10)).await?;
    assert_eq!(claimed.attempt, 1);
    assert_eq!((claimed.build.as_str(), claimed.job.as_str()), (BUILD, "a"));
    assert_eq!(claimed.title, "Image a");
    assert_eq!(claimed.config_type, "winxp-pro");
    assert_eq!(claimed.install_script, "scripts/install.cmd");
    assert_eq!(
        claimed.configure_script.as_deref(),
        Some("scripts/configure.cmd")
    );
    assert_eq!(claimed.image_script, "scripts/image.cmd");
    assert_eq!(claimed.verify_script, None);
    assert_eq!(claimed.timeout_secs, 900);
    assert!(
        claimed.lease.len() >= 32,
        "lease token too short to be unguessable: {:?}",
        claimed.lease
    );

    assert!(store.runs_job_of("client-1", BUILD).await?);
    assert!(!store.runs_job_of("client-2", BUILD).await?);
    assert!(!store.runs_job_of("client-1", "no-such-build").await?);

    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Running);
    assert_eq!(status.client_id.as_deref(), Some("client-1"));
    assert_eq!(status.time_start, Some(at(10)));
    assert_eq!(status.time_complete, None);
    assert_eq!(status.attempt, 1);
    let holder = store.check_lease(BUILD, "a", &claimed.lease).await?;
    assert_eq!(holder.client_id, "client-1");
    assert_eq!(holder.attempt, 1);
    assert_eq!(holder.time_start, at(10));
    assert_eq!(holder.timeout_secs, 900);

    assert!(
        store
            .claim(
                BUILD,
                "a",
                &ClaimingClient::with_id("client-2"),
                at(50),
                at(20)
            )
            .await?
            .is_none(),
        "a running job must not be claimed again"
    );
    assert_eq!(store.get_job(BUILD, "a").await?, status);
    store.check_lease(BUILD, "a", &claimed.lease).await?;

    let other = claim(&*store, BUILD, "b", "client-2", at(20)).await?;
    assert_eq!(other.attempt, 1);
    assert_ne!(other.lease, claimed.lease, "every claim gets its own lease");

    let events = history(&*store, BUILD, "a").await?;
    assert_eq!(
        steps(&events),
        [
            step(at(0), None, Queued, None, 0),
            step(at(10), Some(Queued), Running, Some("client-1"), 1),
        ]
    );
    Ok(())
}

pub async fn a_jobs_verify_step_is_kept_and_handed_out_with_each_of_its_claims<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let verified = JobSpec {
        verify_script: Some("scripts/verify.sh".to_owned()),
        ..job("a")
    };
    store
        .insert_build(&new_build(BUILD, vec![verified, job("b")], at(0)))
        .await?;
    let record = store.get_build(BUILD).await?;
    assert_eq!(
        record.manifest.jobs[0].verify_script.as_deref(),
        Some("scripts/verify.sh"),
        "the stored manifest keeps the verify step"
    );
    assert_eq!(record.manifest.jobs[1].verify_script, None);

    let first = claim(&*store, BUILD, "a", "client-1", at(10)).await?;
    assert_eq!(first.verify_script.as_deref(), Some("scripts/verify.sh"));
    let without = claim(&*store, BUILD, "b", "client-2", at(11)).await?;
    assert_eq!(without.verify_script, None, "a job without a verify step");

    // A later run of the job (here after a restart) has the same steps.
    store.restart(BUILD, "a", at(20)).await?;
    let again = claim(&*store, BUILD, "a", "client-2", at(30)).await?;
    assert_ne!(again.lease, first.lease);
    assert_eq!(again.verify_script.as_deref(), Some("scripts/verify.sh"));
    Ok(())
}

pub async fn racing_claims_from_eight_tasks_hand_each_job_to_exactly_one_client<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    const N_JOBS: usize = 50;
    const N_TASKS: usize = 8;
    let (_place, store, job_ids) = open_store_with_jobs(factory, N_JOBS).await?;

    let mut tasks = tokio::task::JoinSet::new();
    for task_idx in 0..N_TASKS {
        let store = store.clone();
        let job_ids = job_ids.clone();
        tasks.spawn(async move {
            let client_id = format!("client-{task_idx}");
            let mut won = Vec::new();
            // Every task walks the same jobs in the same order so that they collide on
            // each one.
            for job_id in &job_ids {
                if let Some(claimed) = store
                    .claim(
                        BUILD,
                        job_id,
                        &ClaimingClient::with_id(&client_id),
                        at(60),
                        at(1),
                    )
                    .await?
                {
                    won.push((claimed.job, client_id.clone(), claimed.lease));
                }
            }
            anyhow::Ok(won)
        });
    }
    let mut wins = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        wins.extend(joined??);
    }

    assert_eq!(wins.len(), N_JOBS, "claims that returned a job");
    let claimed_jobs: HashSet<&str> = wins.iter().map(|(job, _, _)| job.as_str()).collect();
    assert_eq!(claimed_jobs.len(), N_JOBS, "a job was handed out twice");
    for (job_id, client_id, lease) in &wins {
        let status = store.get_job(BUILD, job_id).await?;
        assert_eq!(status.state, Running);
        assert_eq!(status.client_id.as_deref(), Some(client_id.as_str()));
        assert_eq!(status.attempt, 1);
        store.check_lease(BUILD, job_id, lease).await?;
    }
    let events = store.events(BUILD, 0).await?;
    for job_id in &job_ids {
        let n_claims = events
            .iter()
            .filter(|e| &e.job == job_id && e.from == Some(Queued) && e.to == Running)
            .count();
        assert_eq!(n_claims, 1, "queued → running events of {job_id}");
    }
    Ok(())
}

/// Many calls at once, as a busy farm makes them: two clients asking for every job,
/// then every job's image record, then every job's end, each wave at once and with
/// calls among them that the rules refuse. Each call is decided as if it were alone:
/// every job is handed out once, a refused call changes nothing and the others go on,
/// every job ends with one event, its client counts it, and the build's end is
/// announced once, after every job's own notice. (On PostgreSQL calls made together
/// share transactions: see its store's batches.)
pub async fn calls_made_at_once_are_each_decided_as_if_alone<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    const N_JOBS: usize = 24;
    const CLIENTS: [&str; 3] = ["client-a", "client-b", "client-c"];
    let (_place, store, job_ids) = open_store_with_jobs(factory, N_JOBS).await?;

    let mut claims = tokio::task::JoinSet::new();
    for (idx, job_id) in job_ids.iter().enumerate() {
        for client in [CLIENTS[idx % 3], CLIENTS[(idx + 1) % 3]] {
            let (store, job_id) = (store.clone(), job_id.clone());
            claims.spawn(async move {
                let claimed = store
                    .claim(
                        BUILD,
                        &job_id,
                        &ClaimingClient::with_id(client),
                        at(61),
                        at(1),
                    )
                    .await?;
                anyhow::Ok(claimed.map(|claimed| (client, claimed)))
            });
        }
    }
    let mut runs = Vec::new();
    while let Some(joined) = claims.join_next().await {
        runs.extend(joined??);
    }
    runs.sort_by(|a, b| a.1.job.cmp(&b.1.job));
    let won: Vec<&str> = runs.iter().map(|(_, run)| run.job.as_str()).collect();
    assert_eq!(won, job_ids, "each job handed out once");
    for (client, run) in &runs {
        assert_eq!(run.attempt, 1);
        assert_eq!(run.title, format!("Image {}", run.job));
        assert_eq!(run.install_script, "scripts/install.cmd");
        assert_eq!(run.queued_since, at(0), "{}: queued at submission", run.job);
        let status = store.get_job(BUILD, &run.job).await?;
        assert_eq!(status.client_id.as_deref(), Some(*client));
    }

    // Every image record at once, with one under a lease that is not the job's and one
    // of a job that does not exist.
    let mut records = tokio::task::JoinSet::new();
    for (idx, (_, run)) in runs.iter().enumerate() {
        let (store, run) = (store.clone(), run.clone());
        records.spawn(async move {
            let name = format!("{}.img", run.job);
            let stored = store
                .add_image(BUILD, &run.job, &run.lease, &image(&name, at(2)))
                .await;
            (idx, stored)
        });
    }
    let (other, unknown) = (image("x.img", at(2)), image("y.img", at(2)));
    let stale = store.add_image(BUILD, "job-000", "not-the-lease", &other);
    let missing = store.add_image(BUILD, "no-such-job", "lease", &unknown);
    let (stale, missing) = tokio::join!(stale, missing);
    while let Some(joined) = records.join_next().await {
        let (idx, stored) = joined?;
        stored.with_context(|| format!("image of job {idx}"))?;
    }
    assert_stale("add_image with another lease", stale);
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "add_image of no job: {missing:?}"
    );

    // Every end at once: the last job fails, the others finish. Two calls the rules
    // refuse come with them: job 1 finished naming an image never stored (refused as
    // such, or as stale if job 1's own finish came first) and job 2 finished under a
    // lease that is not its.
    let mut ends = tokio::task::JoinSet::new();
    for (idx, (_, run)) in runs.iter().enumerate() {
        let (store, run) = (store.clone(), run.clone());
        ends.spawn(async move {
            let name = format!("{}.img", run.job);
            let ended = if idx == N_JOBS - 1 {
                let failure = failure("exit", "status 1");
                store
                    .fail(BUILD, &run.job, &run.lease, &failure, at(3))
                    .await
            } else {
                store
                    .finish(BUILD, &run.job, &run.lease, &[name], at(3))
                    .await
            };
            (idx, ended)
        });
    }
    let (_, run_1) = &runs[1];
    let unstored = ["job-001.img".to_owned(), "missing.img".to_owned()];
    let unstored = store.finish(BUILD, "job-001", &run_1.lease, &unstored, at(3));
    let named = ["job-002.img".to_owned()];
    let wrong = store.finish(BUILD, "job-002", "not-the-lease", &named, at(3));
    let (unstored, wrong) = tokio::join!(unstored, wrong);
    while let Some(joined) = ends.join_next().await {
        let (idx, ended) = joined?;
        let event = ended.with_context(|| format!("end of job {idx}"))?;
        let to = if idx == N_JOBS - 1 { Failed } else { Finished };
        assert_eq!((event.job.as_str(), event.to), (job_ids[idx].as_str(), to));
    }
    assert!(
        matches!(
            unstored,
            Err(StoreError::Conflict(_) | StoreError::StaleLease { .. })
        ),
        "a finish naming an image not stored: {unstored:?}"
    );
    assert_stale("finish with another lease", wrong);

    let summary = store.build_summary(BUILD).await?;
    assert_eq!(
        (summary.n_finished, summary.n_failed),
        (N_JOBS as u32 - 1, 1)
    );
    let events = store.events(BUILD, 0).await?;
    assert_eq!(events.len(), 3 * N_JOBS, "queued, running and an end a job");
    assert!(events.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    for job_id in &job_ids {
        let path: Vec<JobState> = events
            .iter()
            .filter(|e| &e.job == job_id)
            .map(|e| e.to)
            .collect();
        let end = if *job_id == job_ids[N_JOBS - 1] {
            Failed
        } else {
            Finished
        };
        assert_eq!(path, [Queued, Running, end], "events of {job_id}");
    }
    let images = store.list_images(BUILD).await?;
    assert_eq!(images.len(), N_JOBS - 1, "one image a finished job");

    // A client that lost every race it ran has no record.
    let mut totals = (0, 0, 0, 0);
    let mut image_bytes = 0;
    for record in store.clients().await? {
        assert!(
            CLIENTS.contains(&record.id.as_str()),
            "client {}",
            record.id
        );
        let (claimed, finished, failed, lost) = tally(&record);
        totals = (
            totals.0 + claimed,
            totals.1 + finished,
            totals.2 + failed,
            totals.3 + lost,
        );
        image_bytes += record.image_bytes;
        let contact = if finished + failed > 0 { at(3) } else { at(1) };
        assert!(
            record.last_contact >= contact,
            "last contact of {}",
            record.id
        );
    }
    assert_eq!(image_bytes, (N_JOBS as u64 - 1) * (1 << 20));

    let notices = queued_notices(&*store).await?;
    let kinds: Vec<&str> = notices.iter().map(|(_, n)| n.event.as_str()).collect();
    assert_eq!(
        kinds.len(),
        N_JOBS + 1,
        "a notice a job and the build's end: {kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "job_finished").count(),
        N_JOBS - 1
    );
    assert_eq!(kinds.iter().filter(|k| **k == "job_failed").count(), 1);
    let (_, last) = notices.last().expect("notices");
    assert_eq!(
        last.event, "build_finished",
        "the build's end comes last: {kinds:?}"
    );
    assert_eq!(last.reason.as_deref(), Some("23 of 24 jobs finished"));
    Ok(())
}

/// Claims, gives an image to and finishes every job of `job_ids` from `n_tasks` tasks at
/// once, task `i` taking every `n_tasks`-th job as the client `client_of(i)`.
async fn claim_and_finish_from_tasks(
    store: &Arc<dyn Store>,
    job_ids: &[String],
    n_tasks: usize,
    client_of: impl Fn(usize) -> String,
) -> CaseResult {
    let mut tasks = tokio::task::JoinSet::new();
    for task_idx in 0..n_tasks {
        let store = store.clone();
        let client = client_of(task_idx);
        let mine: Vec<String> = job_ids
            .iter()
            .skip(task_idx)
            .step_by(n_tasks)
            .cloned()
            .collect();
        tasks.spawn(async move {
            for job_id in &mine {
                let run = claim(&*store, BUILD, job_id, &client, at(1)).await?;
                let name = format!("{job_id}.img");
                store
                    .add_image(BUILD, job_id, &run.lease, &image(&name, at(2)))
                    .await?;
                store
                    .finish(BUILD, job_id, &run.lease, &[name], at(3))
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

/// One client's slots claiming and finishing jobs of one build at the same moment, as a
/// busy client does: every call succeeds. On PostgreSQL a claim took the build's event
/// lock before the client's row and a finish the client's row before the event lock,
/// so the two deadlocked and one of them failed (after a second's wait).
pub async fn one_client_claiming_and_finishing_from_eight_tasks_at_once_never_deadlocks<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    const N_TASKS: usize = 8;
    const JOBS_EACH: usize = 12;
    let (_place, store, job_ids) = open_store_with_jobs(factory, N_TASKS * JOBS_EACH).await?;
    claim_and_finish_from_tasks(&store, &job_ids, N_TASKS, |_| "busy-client".to_owned()).await?;
    let summary = store.build_summary(BUILD).await?;
    assert_eq!(summary.n_finished as usize, job_ids.len());
    let client = client_record(&*store, "busy-client").await?;
    assert_eq!(
        tally(&client),
        (job_ids.len() as u64, job_ids.len() as u64, 0, 0)
    );
    Ok(())
}

/// Two clients' overdue jobs taken back in one transaction (the reaper) while those
/// clients claim and finish other jobs of the build, round after round: every call
/// succeeds. A change of several jobs counts several clients and writes events of their
/// builds; if it took the event lock and the clients' rows in another order than a
/// single job's change does, each could hold what the other waits for (on PostgreSQL a
/// deadlock, which fails one of them after a second's wait).
pub async fn reaping_clients_overdue_jobs_while_they_claim_and_finish_never_deadlocks<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    const ROUNDS: usize = 20;
    const CLIENTS: [&str; 2] = ["client-a", "client-b"];
    const OVERDUE_EACH: usize = 2;
    const WORK_EACH: usize = 3;
    let per_round = CLIENTS.len() * (OVERDUE_EACH + WORK_EACH);
    let (_place, store, job_ids) = open_store_with_jobs(factory, ROUNDS * per_round).await?;
    for (round, jobs) in job_ids.chunks(per_round).enumerate() {
        let start = 100 * round as i64;
        let (overdue, work) = jobs.split_at(CLIENTS.len() * OVERDUE_EACH);
        // Each client holds OVERDUE_EACH jobs whose one-second leases run out before
        // the reaper looks.
        for (idx, job_id) in overdue.iter().enumerate() {
            let client = ClaimingClient::with_id(CLIENTS[idx % CLIENTS.len()]);
            store
                .claim(BUILD, job_id, &client, at(start + 1), at(start))
                .await?
                .with_context(|| format!("{job_id} was not claimed"))?;
        }
        let now = at(start + 10);
        let mut tasks = tokio::task::JoinSet::new();
        for (idx, client) in CLIENTS.iter().enumerate() {
            let store = store.clone();
            let mine: Vec<String> = work
                .iter()
                .skip(idx)
                .step_by(CLIENTS.len())
                .cloned()
                .collect();
            tasks.spawn(async move {
                for job_id in &mine {
                    let run = claim(&*store, BUILD, job_id, client, now).await?;
                    let name = format!("{job_id}.img");
                    store
                        .add_image(BUILD, job_id, &run.lease, &image(&name, now))
                        .await?;
                    store
                        .finish(BUILD, job_id, &run.lease, &[name], now)
                        .await?;
                }
                anyhow::Ok(0)
            });
        }
        let reaper = store.clone();
        tasks.spawn(async move { Ok(reaper.reap_leases(now, 600).await?.len()) });
        let mut taken_back = 0;
        while let Some(joined) = tasks.join_next().await {
            taken_back += joined??;
        }
        assert_eq!(
            taken_back,
            overdue.len(),
            "jobs taken back in round {round}"
        );
    }
    let summary = store.build_summary(BUILD).await?;
    assert_eq!(
        summary.n_finished as usize,
        ROUNDS * CLIENTS.len() * WORK_EACH
    );
    assert_eq!(
        summary.n_queued as usize,
        ROUNDS * CLIENTS.len() * OVERDUE_EACH
    );
    for client in CLIENTS {
        let record = client_record(&*store, client).await?;
        let work = (ROUNDS * WORK_EACH) as u64;
        let overdue = (ROUNDS * OVERDUE_EACH) as u64;
        assert_eq!(
            tally(&record),
            (work + overdue, work, 0, overdue),
            "{client}"
        );
    }
    Ok(())
}

/// A build's events read page after page (as a stream or the dashboard follows them)
/// while eight tasks claim and finish its jobs: every event is seen, in order, and none
/// is skipped. Numbers that committed out of order (a later one visible before an
/// earlier one) would be passed over by a reader that had moved past them.
pub async fn a_reader_paging_a_build_s_events_while_its_jobs_change_misses_none<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    const N_TASKS: usize = 8;
    const JOBS_EACH: usize = 12;
    let (_place, store, job_ids) = open_store_with_jobs(factory, N_TASKS * JOBS_EACH).await?;
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let store = store.clone();
        let writing = writing.clone();
        tokio::spawn(async move {
            let mut seen: Vec<i64> = Vec::new();
            loop {
                let last_round = !writing.load(std::sync::atomic::Ordering::SeqCst);
                let after = seen.last().copied().unwrap_or(0);
                for event in store.events(BUILD, after).await? {
                    anyhow::ensure!(
                        event.seq > seen.last().copied().unwrap_or(0),
                        "event {} came after {:?}",
                        event.seq,
                        seen.last()
                    );
                    seen.push(event.seq);
                }
                if last_round {
                    return anyhow::Ok(seen);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    claim_and_finish_from_tasks(&store, &job_ids, N_TASKS, |task| format!("client-{task}")).await?;
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.await??;
    let all: Vec<i64> = store
        .events(BUILD, 0)
        .await?
        .iter()
        .map(|event| event.seq)
        .collect();
    assert_eq!(
        all.len(),
        3 * job_ids.len(),
        "queued, running and finished for every job"
    );
    let missed: Vec<&i64> = all.iter().filter(|seq| !seen.contains(seq)).collect();
    assert!(
        missed.is_empty(),
        "the reader passed over events {missed:?} of {}",
        all.len()
    );
    Ok(())
}

pub async fn lease_calls_with_a_wrong_token_are_refused_and_with_the_current_one_accepted<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(
            BUILD,
            vec![job("a"), job("b"), job("c"), job("d")],
            at(0),
        ))
        .await?;
    let a = claim(&*store, BUILD, "a", "client-1", at(1)).await?;
    let b = claim(&*store, BUILD, "b", "client-2", at(1)).await?;
    let status_before = store.get_job(BUILD, "a").await?;

    assert_every_lease_call_refused(
        &*store,
        BUILD,
        "a",
        "0123456789abcdef0123456789abcdef",
        at(2),
    )
    .await;
    assert_every_lease_call_refused(&*store, BUILD, "a", "", at(2)).await;
    // Another job's current lease is not a lease on this one.
    assert_every_lease_call_refused(&*store, BUILD, "a", &b.lease, at(2)).await;

    assert_eq!(store.get_job(BUILD, "a").await?, status_before);
    assert!(store.read_log(BUILD, "a", 0, 100).await?.is_empty());
    assert_eq!(history(&*store, BUILD, "a").await?.len(), 2);
    assert_eq!(store.get_job(BUILD, "b").await?.state, Running);

    let holder = store.check_lease(BUILD, "a", &a.lease).await?;
    assert_eq!(holder.client_id, "client-1");
    store.heartbeat(BUILD, "a", &a.lease, at(60), None).await?;
    store
        .append_log(
            BUILD,
            "a",
            &a.lease,
            &[log_line("stdout", "installing")],
            None,
            at(3),
        )
        .await?;
    assert_eq!(store.read_log(BUILD, "a", 0, 100).await?.len(), 1);
    store
        .add_image(BUILD, "a", &a.lease, &image("a.wim", at(4)))
        .await?;
    store
        .finish(BUILD, "a", &a.lease, &["a.wim".to_owned()], at(5))
        .await?;
    assert_eq!(store.get_job(BUILD, "a").await?.state, Finished);
    // Once finished, the lease is no longer current.
    assert_every_lease_call_refused(&*store, BUILD, "a", &a.lease, at(6)).await;

    let c = claim(&*store, BUILD, "c", "client-3", at(1)).await?;
    store
        .fail(BUILD, "c", &c.lease, &failure("exit", "status 1"), at(5))
        .await?;
    assert_eq!(store.get_job(BUILD, "c").await?.state, Failed);

    let d = claim(&*store, BUILD, "d", "client-4", at(1)).await?;
    store.release(BUILD, "d", &d.lease, at(5)).await?;
    assert_eq!(store.get_job(BUILD, "d").await?.state, Queued);
    Ok(())
}

pub async fn old_lease_is_refused_after_restart_and_after_cancel<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(
            BUILD,
            vec![job("restarted"), job("cancelled")],
            at(0),
        ))
        .await?;

    let old = claim(&*store, BUILD, "restarted", "client-1", at(1)).await?;
    store.restart(BUILD, "restarted", at(2)).await?;
    assert_every_lease_call_refused(&*store, BUILD, "restarted", &old.lease, at(3)).await;
    assert_eq!(store.get_job(BUILD, "restarted").await?.state, Queued);
    let new = claim(&*store, BUILD, "restarted", "client-2", at(4)).await?;
    assert_ne!(new.lease, old.lease);
    assert_every_lease_call_refused(&*store, BUILD, "restarted", &old.lease, at(5)).await;
    let holder = store.check_lease(BUILD, "restarted", &new.lease).await?;
    assert_eq!(holder.client_id, "client-2");

    let held = claim(&*store, BUILD, "cancelled", "client-3", at(1)).await?;
    store.cancel(BUILD, "cancelled", at(2)).await?;
    assert_every_lease_call_refused(&*store, BUILD, "cancelled", &held.lease, at(3)).await;
    assert_eq!(store.get_job(BUILD, "cancelled").await?.state, Cancelled);

    let events = history(&*store, BUILD, "restarted").await?;
    assert_eq!(
        steps(&events),
        [
            step(at(0), None, Queued, None, 0),
            step(at(1), Some(Queued), Running, Some("client-1"), 1),
            step(at(2), Some(Running), Queued, Some("client-1"), 0),
            step(at(4), Some(Queued), Running, Some("client-2"), 1),
        ]
    );
    Ok(())
}

pub async fn heartbeat_extends_the_lease_and_records_progress<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a")], at(0)))
        .await?;
    let claimed = claim(&*store, BUILD, "a", "client-1", at(0)).await?;

    let progress = Progress {
        major: Some("install".to_owned()),
        minor: Some("format".to_owned()),
        percent: Some(10),
    };
    let holder = store
        .heartbeat(BUILD, "a", &claimed.lease, at(90), Some(&progress))
        .await?;
    assert_eq!((holder.client_id.as_str(), holder.attempt), ("client-1", 1));
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.major_state.as_deref(), Some("install"));
    assert_eq!(status.minor_state.as_deref(), Some("format"));
    assert_eq!(status.percent, Some(10));

    // The claim's lease ran to 30 s; the heartbeat moved it to 90 s.
    assert!(store.reap_leases(at(60), 600).await?.is_empty());
    assert_eq!(store.get_job(BUILD, "a").await?.state, Running);

    let percent_only = Progress {
        percent: Some(40),
        ..Progress::default()
    };
    store
        .heartbeat(BUILD, "a", &claimed.lease, at(90), Some(&percent_only))
        .await?;
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.major_state.as_deref(), Some("install"));
    assert_eq!(status.minor_state.as_deref(), Some("format"));
    assert_eq!(status.percent, Some(40));

    // Progress may also come with log lines.
    let minor_only = Progress {
        minor: Some("copy".to_owned()),
        ..Progress::default()
    };
    store
        .append_log(BUILD, "a", &claimed.lease, &[], Some(&minor_only), at(70))
        .await?;
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.major_state.as_deref(), Some("install"));
    assert_eq!(status.minor_state.as_deref(), Some("copy"));
    assert_eq!(status.percent, Some(40));

    assert!(store.reap_leases(at(89), 600).await?.is_empty());
    let reaped = store.reap_leases(at(91), 600).await?;
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].event.to, Queued);

    // Heartbeats are not transitions: the log holds only submit, claim and the reap.
    let events = history(&*store, BUILD, "a").await?;
    assert_eq!(
        steps(&events),
        [
            step(at(0), None, Queued, None, 0),
            step(at(0), Some(Queued), Running, Some("client-1"), 1),
            step(at(91), Some(Running), Queued, Some("client-1"), 1),
        ]
    );
    Ok(())
}

pub async fn finish_keeps_only_images_stored_under_the_finishing_lease<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a")], at(0)))
        .await?;

    let first = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    store
        .add_image(BUILD, "a", &first.lease, &image("lease1.wim", at(10)))
        .await?;
    let reaped = store.reap_leases(at(31), 600).await?;
    assert_eq!(reaped.len(), 1);
    assert_eq!(store.get_job(BUILD, "a").await?.state, Queued);

    let second = claim(&*store, BUILD, "a", "client-2", at(40)).await?;
    assert_eq!(second.attempt, 2);
    store
        .add_image(BUILD, "a", &second.lease, &image("lease2.wim", at(50)))
        .await?;

    assert_conflict(
        "finish naming an image of the lapsed lease",
        store
            .finish(
                BUILD,
                "a",
                &second.lease,
                &["lease1.wim".to_owned(), "lease2.wim".to_owned()],
                at(60),
            )
            .await,
    );
    assert_conflict(
        "finish naming an image never stored",
        store
            .finish(BUILD, "a", &second.lease, &["never.wim".to_owned()], at(60))
            .await,
    );
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Running, "a refused finish changes nothing");
    assert_eq!(status.time_complete, None);
    store.check_lease(BUILD, "a", &second.lease).await?;

    let event = store
        .finish(
            BUILD,
            "a",
            &second.lease,
            &["lease2.wim".to_owned()],
            at(70),
        )
        .await?;
    assert_eq!(
        steps(std::slice::from_ref(&event)),
        [step(at(70), Some(Running), Finished, Some("client-2"), 2)]
    );
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Finished);
    assert_eq!(status.time_complete, Some(at(70)));
    assert_eq!(status.percent, Some(100));
    assert_eq!(status.error, None);

    let images = store.list_images(BUILD).await?;
    let names: Vec<&str> = images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["lease2.wim"]);
    assert_eq!(images[0].job_id, "a");
    assert_eq!(images[0].config_type, "winxp-pro");
    assert_eq!(images[0].size, 1 << 20);
    assert_eq!(images[0].blake3, "b3-lease2.wim");
    assert_eq!(images[0].sha256, "sha-lease2.wim");
    assert_eq!(images[0].created_at, at(50));
    let record = store.get_image(BUILD, "a", "lease2.wim").await?;
    assert_eq!(record.blob_key, "images/lease2.wim");
    assert_not_found(
        "get_image of the lapsed lease's image",
        store.get_image(BUILD, "a", "lease1.wim").await,
    );

    let events = history(&*store, BUILD, "a").await?;
    assert_eq!(
        steps(&events),
        [
            step(at(0), None, Queued, None, 0),
            step(at(0), Some(Queued), Running, Some("client-1"), 1),
            step(at(31), Some(Running), Queued, Some("client-1"), 1),
            step(at(40), Some(Queued), Running, Some("client-2"), 2),
            step(at(70), Some(Running), Finished, Some("client-2"), 2),
        ]
    );
    Ok(())
}

pub async fn fail_without_retries_fails_the_job_with_reason_and_message<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a")], at(0)))
        .await?;
    let claimed = claim(&*store, BUILD, "a", "client-1", at(0)).await?;

    let event = store
        .fail(
            BUILD,
            "a",
            &claimed.lease,
            &failure("exit", "scripts/install.cmd exited with status 1"),
            at(10),
        )
        .await?;
    assert_eq!(
        steps(std::slice::from_ref(&event)),
        [step(at(10), Some(Running), Failed, Some("client-1"), 1)]
    );
    assert!(reason(&event).starts_with("exit"), "{event:?}");

    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Failed);
    assert_eq!(
        status.error.as_deref(),
        Some("exit: scripts/install.cmd exited with status 1")
    );
    assert_eq!(status.time_complete, Some(at(10)));
    assert!(store
        .claim(
            BUILD,
            "a",
            &ClaimingClient::with_id("client-2"),
            at(50),
            at(20)
        )
        .await?
        .is_none());
    assert_eq!(history(&*store, BUILD, "a").await?.len(), 3);
    Ok(())
}

pub async fn fail_with_a_retry_left_requeues_then_fails<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let retried = JobSpec {
        retries: Some(1),
        ..job("a")
    };
    store
        .insert_build(&new_build(BUILD, vec![retried], at(0)))
        .await?;

    let first = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    let event = store
        .fail(
            BUILD,
            "a",
            &first.lease,
            &failure("exit", "first try"),
            at(10),
        )
        .await?;
    assert_eq!(event.to, Queued);
    assert!(reason(&event).contains("retry"), "{event:?}");
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Queued);
    assert_eq!(status.client_id, None);
    assert_eq!(status.time_complete, None);
    assert_every_lease_call_refused(&*store, BUILD, "a", &first.lease, at(11)).await;

    let second = claim(&*store, BUILD, "a", "client-2", at(20)).await?;
    assert_eq!(second.attempt, 2);
    let event = store
        .fail(
            BUILD,
            "a",
            &second.lease,
            &failure("exit", "second try"),
            at(30),
        )
        .await?;
    assert_eq!(event.to, Failed);
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Failed);
    assert_eq!(status.error.as_deref(), Some("exit: second try"));
    assert_eq!(status.time_complete, Some(at(30)));

    let events = history(&*store, BUILD, "a").await?;
    assert_eq!(
        steps(&events),
        [
            step(at(0), None, Queued, None, 0),
            step(at(0), Some(Queued), Running, Some("client-1"), 1),
            step(at(10), Some(Running), Queued, Some("client-1"), 1),
            step(at(20), Some(Queued), Running, Some("client-2"), 2),
            step(at(30), Some(Running), Failed, Some("client-2"), 2),
        ]
    );
    Ok(())
}

pub async fn reap_requeues_a_lapsed_lease_and_fails_it_as_lost_on_the_last_attempt<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let two_attempts = JobSpec {
        max_attempts: Some(2),
        ..job("a")
    };
    store
        .insert_build(&new_build(BUILD, vec![two_attempts], at(0)))
        .await?;

    let first = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    assert!(store.reap_leases(at(29), 600).await?.is_empty());
    let reaped = store.reap_leases(at(31), 600).await?;
    assert_eq!(reaped.len(), 1);
    assert_eq!(
        (reaped[0].build.as_str(), reaped[0].job.as_str()),
        (BUILD, "a")
    );
    assert_eq!(
        steps(std::slice::from_ref(&reaped[0].event)),
        [step(at(31), Some(Running), Queued, Some("client-1"), 1)]
    );
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Queued);
    assert_eq!(status.attempt, 1, "the lapsed attempt counts");
    assert_eq!(status.client_id, None);
    assert_every_lease_call_refused(&*store, BUILD, "a", &first.lease, at(32)).await;
    assert!(store.reap_leases(at(35), 600).await?.is_empty());

    let second = claim(&*store, BUILD, "a", "client-2", at(40)).await?;
    assert_eq!(second.attempt, 2);
    let reaped = store.reap_leases(at(71), 600).await?;
    assert_eq!(reaped.len(), 1);
    let event = &reaped[0].event;
    assert_eq!(
        steps(std::slice::from_ref(event)),
        [step(at(71), Some(Running), Failed, Some("client-2"), 2)]
    );
    assert!(reason(event).starts_with("lost"), "{event:?}");
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Failed);
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("lost")),
        "{status:?}"
    );
    assert_eq!(status.time_complete, Some(at(71)));

    let events = history(&*store, BUILD, "a").await?;
    assert_eq!(events.len(), 5);
    assert_eq!(events[4].seq, reaped[0].event.seq);
    Ok(())
}

pub async fn reap_fails_a_job_held_past_its_timeout_and_grace_despite_heartbeats<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    const HUNG_GRACE_SECS: u64 = 30;
    let (_place, store) = open_store(factory).await?;
    let short = JobSpec {
        timeout_secs: 60,
        ..job("a")
    };
    store
        .insert_build(&new_build(BUILD, vec![short], at(0)))
        .await?;
    let claimed = claim(&*store, BUILD, "a", "client-1", at(0)).await?;

    for secs in (10..=80).step_by(10) {
        store
            .heartbeat(BUILD, "a", &claimed.lease, at(secs + LEASE_SECS), None)
            .await?;
        assert!(store
            .reap_leases(at(secs), HUNG_GRACE_SECS)
            .await?
            .is_empty());
    }
    // Timeout and grace end at 90 s; the lease runs to 110 s.
    assert!(store.reap_leases(at(89), HUNG_GRACE_SECS).await?.is_empty());
    let reaped = store.reap_leases(at(91), HUNG_GRACE_SECS).await?;
    assert_eq!(reaped.len(), 1);
    let event = &reaped[0].event;
    assert_eq!(
        steps(std::slice::from_ref(event)),
        [step(at(91), Some(Running), Failed, Some("client-1"), 1)]
    );
    assert!(reason(event).starts_with("timeout"), "{event:?}");
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Failed);
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("timeout")),
        "{status:?}"
    );
    assert_every_lease_call_refused(&*store, BUILD, "a", &claimed.lease, at(92)).await;
    Ok(())
}

pub async fn expire_unclaimed_expires_only_never_claimed_jobs_past_their_deadline<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let due = |id: &str| JobSpec {
        accept_within_secs: Some(60),
        ..job(id)
    };
    store
        .insert_build(&new_build(
            BUILD,
            vec![due("never"), due("requeued"), job("open")],
            at(0),
        ))
        .await?;
    claim(&*store, BUILD, "requeued", "client-1", at(10)).await?;
    assert_eq!(store.reap_leases(at(41), 600).await?.len(), 1);
    assert_eq!(store.get_job(BUILD, "requeued").await?.state, Queued);

    assert!(store.expire_unclaimed(at(59)).await?.is_empty());
    let expired = store.expire_unclaimed(at(61)).await?;
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].job, "never");
    let event = &expired[0].event;
    assert_eq!(
        steps(std::slice::from_ref(event)),
        [step(at(61), Some(Queued), Expired, None, 0)]
    );
    assert!(reason(event).contains("60 s"), "{event:?}");

    let status = store.get_job(BUILD, "never").await?;
    assert_eq!(status.state, Expired);
    assert_eq!(status.time_complete, Some(at(61)));
    assert!(status.error.is_some());
    assert_eq!(store.get_job(BUILD, "requeued").await?.state, Queued);
    assert_eq!(store.get_job(BUILD, "open").await?.state, Queued);
    assert!(store
        .claim(
            BUILD,
            "never",
            &ClaimingClient::with_id("client-2"),
            at(100),
            at(70)
        )
        .await?
        .is_none());
    assert!(store.expire_unclaimed(at(100_000)).await?.is_empty());

    let events = history(&*store, BUILD, "never").await?;
    assert_eq!(
        steps(&events),
        [
            step(at(0), None, Queued, None, 0),
            step(at(61), Some(Queued), Expired, None, 0),
        ]
    );
    Ok(())
}

pub async fn next_deadline_is_the_earliest_lease_expiry_or_accept_deadline<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    assert_eq!(store.next_deadline().await?, None);
    let due = |id: &str, secs: u64| JobSpec {
        accept_within_secs: Some(secs),
        ..job(id)
    };
    store
        .insert_build(&new_build(
            BUILD,
            vec![due("due-120", 120), due("due-60", 60), job("open")],
            at(0),
        ))
        .await?;
    assert_eq!(store.next_deadline().await?, Some(at(60)));

    let open = store
        .claim(
            BUILD,
            "open",
            &ClaimingClient::with_id("client-1"),
            at(90),
            at(1),
        )
        .await?
        .context("open was not claimable")?;
    assert_eq!(store.next_deadline().await?, Some(at(60)));

    // Claimed, due-60's accept deadline no longer counts; its lease does.
    store
        .claim(
            BUILD,
            "due-60",
            &ClaimingClient::with_id("client-2"),
            at(100),
            at(2),
        )
        .await?
        .context("due-60 was not claimable")?;
    assert_eq!(store.next_deadline().await?, Some(at(90)));

    store
        .heartbeat(BUILD, "open", &open.lease, at(200), None)
        .await?;
    assert_eq!(store.next_deadline().await?, Some(at(100)));

    store.cancel(BUILD, "due-60", at(3)).await?;
    assert_eq!(store.next_deadline().await?, Some(at(120)));
    Ok(())
}

pub async fn release_requeues_without_counting_the_attempt<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a")], at(0)))
        .await?;
    let first = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    let progress = Progress {
        major: Some("download".to_owned()),
        ..Progress::default()
    };
    store
        .heartbeat(BUILD, "a", &first.lease, at(30), Some(&progress))
        .await?;
    store.release(BUILD, "a", &first.lease, at(5)).await?;

    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Queued);
    assert_eq!(status.attempt, 0);
    assert_eq!(status.client_id, None);
    assert_eq!(status.time_start, None);
    assert_eq!(status.major_state, None);
    assert_every_lease_call_refused(&*store, BUILD, "a", &first.lease, at(6)).await;

    let second = claim(&*store, BUILD, "a", "client-2", at(10)).await?;
    assert_eq!(second.attempt, 1);
    assert_ne!(second.lease, first.lease);

    let events = history(&*store, BUILD, "a").await?;
    assert_eq!(
        steps(&events),
        [
            step(at(0), None, Queued, None, 0),
            step(at(0), Some(Queued), Running, Some("client-1"), 1),
            step(at(5), Some(Running), Queued, Some("client-1"), 0),
            step(at(10), Some(Queued), Running, Some("client-2"), 1),
        ]
    );
    Ok(())
}

pub async fn restart_puts_a_finished_or_failed_job_back_as_new<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(
            BUILD,
            vec![job("finished"), job("failed")],
            at(0),
        ))
        .await?;

    let finished = claim(&*store, BUILD, "finished", "client-1", at(0)).await?;
    finish_with_image(&*store, &finished, at(10)).await?;
    assert_eq!(store.list_images(BUILD).await?.len(), 1);
    let event = store.restart(BUILD, "finished", at(100)).await?;
    assert_eq!(
        steps(std::slice::from_ref(&event)),
        [step(at(100), Some(Finished), Queued, Some("client-1"), 0)]
    );
    let status = store.get_job(BUILD, "finished").await?;
    assert_eq!(status.state, Queued);
    assert_eq!(status.attempt, 0);
    assert_eq!(status.client_id, None);
    assert_eq!(status.time_start, None);
    assert_eq!(status.time_complete, None);
    assert_eq!(status.percent, None);
    assert_eq!(status.error, None);
    assert!(store.list_images(BUILD).await?.is_empty());
    assert_not_found(
        "get_image after restart",
        store.get_image(BUILD, "finished", "finished.wim").await,
    );
    let again = claim(&*store, BUILD, "finished", "client-2", at(110)).await?;
    assert_eq!(again.attempt, 1);

    let failed = claim(&*store, BUILD, "failed", "client-1", at(0)).await?;
    store
        .fail(
            BUILD,
            "failed",
            &failed.lease,
            &failure("exit", "status 2"),
            at(10),
        )
        .await?;
    assert!(store.get_job(BUILD, "failed").await?.error.is_some());
    store.restart(BUILD, "failed", at(100)).await?;
    let status = store.get_job(BUILD, "failed").await?;
    assert_eq!(status.state, Queued);
    assert_eq!(status.attempt, 0);
    assert_eq!(status.error, None);
    assert_eq!(status.time_complete, None);

    let events_before = store.events(BUILD, 0).await?.len();
    assert_conflict(
        "restart of a queued job",
        store.restart(BUILD, "failed", at(120)).await,
    );
    assert_eq!(store.events(BUILD, 0).await?.len(), events_before);
    assert_eq!(store.get_job(BUILD, "failed").await?, status);
    Ok(())
}

pub async fn restart_of_an_expired_job_gives_it_a_fresh_accept_deadline<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let due = JobSpec {
        accept_within_secs: Some(60),
        ..job("a")
    };
    store
        .insert_build(&new_build(BUILD, vec![due], at(0)))
        .await?;
    assert_eq!(store.expire_unclaimed(at(61)).await?.len(), 1);

    let event = store.restart(BUILD, "a", at(100)).await?;
    assert_eq!(
        steps(std::slice::from_ref(&event)),
        [step(at(100), Some(Expired), Queued, None, 0)]
    );
    let status = store.get_job(BUILD, "a").await?;
    assert_eq!(status.state, Queued);
    assert_eq!(status.error, None);
    assert_eq!(status.time_complete, None);
    assert_eq!(store.next_deadline().await?, Some(at(160)));
    assert!(store.expire_unclaimed(at(159)).await?.is_empty());
    assert_eq!(store.expire_unclaimed(at(161)).await?.len(), 1);

    let events = history(&*store, BUILD, "a").await?;
    assert_eq!(
        steps(&events),
        [
            step(at(0), None, Queued, None, 0),
            step(at(61), Some(Queued), Expired, None, 0),
            step(at(100), Some(Expired), Queued, None, 0),
            step(at(161), Some(Queued), Expired, None, 0),
        ]
    );
    Ok(())
}

pub async fn cancel_ends_a_queued_or_running_job_and_refuses_an_ended_one<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(
            BUILD,
            vec![job("queued"), job("running"), job("finished")],
            at(0),
        ))
        .await?;

    let event = store.cancel(BUILD, "queued", at(5)).await?;
    assert_eq!(
        steps(std::slice::from_ref(&event)),
        [step(at(5), Some(Queued), Cancelled, None, 0)]
    );
    let status = store.get_job(BUILD, "queued").await?;
    assert_eq!(status.state, Cancelled);
    assert_eq!(status.time_complete, Some(at(5)));
    assert!(store
        .claim(
            BUILD,
            "queued",
            &ClaimingClient::with_id("client-1"),
            at(60),
            at(6)
        )
        .await?
        .is_none());

    claim(&*store, BUILD, "running", "client-1", at(1)).await?;
    let event = store.cancel(BUILD, "running", at(5)).await?;
    assert_eq!(
        steps(std::slice::from_ref(&event)),
        [step(at(5), Some(Running), Cancelled, Some("client-1"), 1)]
    );
    assert_eq!(store.get_job(BUILD, "running").await?.state, Cancelled);

    let finished = claim(&*store, BUILD, "finished", "client-2", at(1)).await?;
    finish_with_image(&*store, &finished, at(2)).await?;
    let events_before = store.events(BUILD, 0).await?.len();
    assert_conflict(
        "cancel of a finished job",
        store.cancel(BUILD, "finished", at(5)).await,
    );
    assert_conflict(
        "cancel of a cancelled job",
        store.cancel(BUILD, "queued", at(5)).await,
    );
    assert_eq!(store.events(BUILD, 0).await?.len(), events_before);
    assert_eq!(store.get_job(BUILD, "finished").await?.state, Finished);
    assert_eq!(store.list_images(BUILD).await?.len(), 1);
    Ok(())
}

pub async fn extend_all_leases_gives_running_leases_at_least_until<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(
            BUILD,
            vec![job("short"), job("long"), job("queued")],
            at(0),
        ))
        .await?;
    store
        .claim(
            BUILD,
            "short",
            &ClaimingClient::with_id("client-1"),
            at(30),
            at(0),
        )
        .await?
        .context("short was not claimable")?;
    store
        .claim(
            BUILD,
            "long",
            &ClaimingClient::with_id("client-2"),
            at(500),
            at(0),
        )
        .await?
        .context("long was not claimable")?;

    assert_eq!(store.extend_all_leases(at(100)).await?, 1);
    assert_eq!(store.next_deadline().await?, Some(at(100)));
    assert_eq!(store.get_job(BUILD, "queued").await?.state, Queued);
    // Without the extension the short lease would have lapsed at 30 s.
    assert!(store.reap_leases(at(99), 600).await?.is_empty());
    let reaped = store.reap_leases(at(101), 600).await?;
    let reaped_jobs: Vec<&str> = reaped.iter().map(|t| t.job.as_str()).collect();
    assert_eq!(reaped_jobs, ["short"], "the longer lease is not shortened");
    assert_eq!(store.next_deadline().await?, Some(at(500)));
    Ok(())
}

pub async fn reopened_store_keeps_builds_jobs_events_logs_and_leases<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let place = factory.new_place().await?;
    let store = factory.open(&place).await?;
    let original = new_build(
        BUILD,
        vec![job("running"), job("finished"), job("failed")],
        at(0),
    );
    store.insert_build(&original).await?;

    let running = claim(&*store, BUILD, "running", "client-1", at(1)).await?;
    store
        .append_log(
            BUILD,
            "running",
            &running.lease,
            &[
                log_line("stdout", "installing"),
                log_line("stderr", "slow disk"),
            ],
            Some(&Progress {
                major: Some("install".to_owned()),
                minor: None,
                percent: Some(25),
            }),
            at(2),
        )
        .await?;
    let finished = claim(&*store, BUILD, "finished", "client-2", at(1)).await?;
    finish_with_image(&*store, &finished, at(3)).await?;
    let failed = claim(&*store, BUILD, "failed", "client-3", at(1)).await?;
    store
        .fail(
            BUILD,
            "failed",
            &failed.lease,
            &failure("exit", "status 1"),
            at(4),
        )
        .await?;

    let builds_before = format!("{:?}", store.list_builds().await?);
    let jobs_before = store.list_jobs(BUILD).await?;
    let events_before = format!("{:?}", store.events(BUILD, 0).await?);
    let log_before = format!("{:?}", store.read_log(BUILD, "running", 0, 100).await?);
    let images_before = format!("{:?}", store.list_images(BUILD).await?);
    drop(store);

    let store = factory.open(&place).await?;
    assert_eq!(format!("{:?}", store.list_builds().await?), builds_before);
    assert_eq!(store.list_jobs(BUILD).await?, jobs_before);
    assert_eq!(
        format!("{:?}", store.events(BUILD, 0).await?),
        events_before
    );
    assert_eq!(
        format!("{:?}", store.read_log(BUILD, "running", 0, 100).await?),
        log_before
    );
    assert_eq!(
        format!("{:?}", store.list_images(BUILD).await?),
        images_before
    );
    assert_eq!(store.get_build(BUILD).await?.manifest, original.manifest);
    assert_eq!(store.list_jobs(BUILD).await?.len(), 3);
    assert_eq!(store.events(BUILD, 0).await?.len(), 3 + 3 + 2);
    assert_eq!(store.read_log(BUILD, "running", 0, 100).await?.len(), 2);

    // The running job's client re-attaches with the lease it holds.
    let holder = store.check_lease(BUILD, "running", &running.lease).await?;
    assert_eq!((holder.client_id.as_str(), holder.attempt), ("client-1", 1));
    store
        .heartbeat(BUILD, "running", &running.lease, at(60), None)
        .await?;
    match store.insert_build(&original).await {
        Err(StoreError::DuplicateBuild(_)) => {}
        other => panic!("expected StoreError::DuplicateBuild after reopen, got {other:?}"),
    }
    Ok(())
}

pub async fn read_log_returns_lines_after_a_seq_in_order_with_their_attempt<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a"), job("b")], at(0)))
        .await?;
    let a = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    let b = claim(&*store, BUILD, "b", "client-2", at(0)).await?;
    store
        .append_log(
            BUILD,
            "a",
            &a.lease,
            &[
                log_line("stdout", "installing"),
                log_line("stderr", "warning: slow disk"),
            ],
            None,
            at(1),
        )
        .await?;
    store
        .append_log(
            BUILD,
            "b",
            &b.lease,
            &[log_line("stdout", "b only")],
            None,
            at(2),
        )
        .await?;
    store
        .append_log(
            BUILD,
            "a",
            &a.lease,
            &[log_line("stdout", "installed")],
            None,
            at(3),
        )
        .await?;

    let lines = store.read_log(BUILD, "a", 0, 100).await?;
    let read: Vec<(i64, u32, &str, &str)> = lines
        .iter()
        .map(|l| (l.time, l.attempt, l.stream.as_str(), l.text.as_str()))
        .collect();
    assert_eq!(
        read,
        [
            (at(1), 1, "stdout", "installing"),
            (at(1), 1, "stderr", "warning: slow disk"),
            (at(3), 1, "stdout", "installed"),
        ]
    );
    assert!(lines.windows(2).all(|pair| pair[0].seq < pair[1].seq));

    let after_first = store.read_log(BUILD, "a", lines[0].seq, 100).await?;
    let texts: Vec<&str> = after_first.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["warning: slow disk", "installed"]);
    let limited = store.read_log(BUILD, "a", 0, 2).await?;
    let texts: Vec<&str> = limited.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["installing", "warning: slow disk"]);
    assert!(store
        .read_log(BUILD, "a", lines[2].seq, 100)
        .await?
        .is_empty());
    let b_lines = store.read_log(BUILD, "b", 0, 100).await?;
    let texts: Vec<&str> = b_lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["b only"]);

    assert_eq!(store.reap_leases(at(31), 600).await?.len(), 2);
    let again = claim(&*store, BUILD, "a", "client-3", at(40)).await?;
    store
        .append_log(
            BUILD,
            "a",
            &again.lease,
            &[log_line("kiln", "retrying")],
            None,
            at(41),
        )
        .await?;
    let new_lines = store.read_log(BUILD, "a", lines[2].seq, 100).await?;
    let read: Vec<(i64, u32, &str)> = new_lines
        .iter()
        .map(|l| (l.time, l.attempt, l.text.as_str()))
        .collect();
    assert_eq!(read, [(at(41), 2, "retrying")]);
    Ok(())
}

pub async fn mean_run_secs_averages_finished_jobs_of_a_config_type<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let other = JobSpec {
        config_type: "win2k-server".to_owned(),
        ..job("other")
    };
    store
        .insert_build(&new_build(
            BUILD,
            vec![
                job("fast"),
                job("slow"),
                job("failed"),
                job("running"),
                other,
            ],
            at(0),
        ))
        .await?;
    assert_eq!(store.mean_run_secs("winxp-pro").await?, None);

    let fast = claim(&*store, BUILD, "fast", "client-1", at(0)).await?;
    finish_with_image(&*store, &fast, at(100)).await?;
    let slow = claim(&*store, BUILD, "slow", "client-2", at(10)).await?;
    store
        .heartbeat(BUILD, "slow", &slow.lease, at(400), None)
        .await?;
    finish_with_image(&*store, &slow, at(310)).await?;
    let failed = claim(&*store, BUILD, "failed", "client-3", at(0)).await?;
    store
        .fail(
            BUILD,
            "failed",
            &failed.lease,
            &failure("exit", "status 1"),
            at(1000),
        )
        .await?;
    claim(&*store, BUILD, "running", "client-4", at(0)).await?;
    let other = claim(&*store, BUILD, "other", "client-5", at(0)).await?;
    finish_with_image(&*store, &other, at(50)).await?;

    let mean = store
        .mean_run_secs("winxp-pro")
        .await?
        .context("no mean for winxp-pro")?;
    assert!(
        (mean - 200.0).abs() < 1e-9,
        "mean of 100 s and 300 s: {mean}"
    );
    let mean = store
        .mean_run_secs("win2k-server")
        .await?
        .context("no mean for win2k-server")?;
    assert!((mean - 50.0).abs() < 1e-9, "{mean}");
    assert_eq!(store.mean_run_secs("win98").await?, None);
    Ok(())
}

pub async fn script_retries_do_not_use_up_the_lost_lease_allowance<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let mut spec = job("j1");
    spec.max_attempts = Some(2);
    spec.retries = Some(1);
    store
        .insert_build(&new_build(BUILD, vec![spec], at(0)))
        .await?;
    // A script failure, retried at the manifest's request.
    let first = claim(&*store, BUILD, "j1", "c1", at(1)).await?;
    store
        .fail(
            BUILD,
            "j1",
            &first.lease,
            &failure("exit", "status 1"),
            at(2),
        )
        .await?;
    // One lost lease: with MAXATTEMPTS 2 the job goes back to the queue once more.
    claim(&*store, BUILD, "j1", "c1", at(3)).await?;
    let reaped = store.reap_leases(at(3 + LEASE_SECS + 1), 60).await?;
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].event.to, Queued, "{:?}", reaped[0].event);
    // A second lost lease reaches the limit.
    claim(&*store, BUILD, "j1", "c1", at(100)).await?;
    let reaped = store.reap_leases(at(100 + LEASE_SECS + 1), 60).await?;
    assert_eq!(reaped[0].event.to, Failed);
    assert!(
        reason(&reaped[0].event).starts_with("lost"),
        "{:?}",
        reaped[0].event
    );
    Ok(())
}

pub async fn finish_without_an_image_is_refused<F: StoreFactory>(factory: &F) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("j1")], at(0)))
        .await?;
    let claimed = claim(&*store, BUILD, "j1", "c1", at(1)).await?;
    assert_conflict(
        "finish",
        store.finish(BUILD, "j1", &claimed.lease, &[], at(2)).await,
    );
    assert_eq!(store.get_job(BUILD, "j1").await?.state, Running);
    Ok(())
}

pub async fn a_requeued_job_shows_no_start_time<F: StoreFactory>(factory: &F) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("j1")], at(0)))
        .await?;
    claim(&*store, BUILD, "j1", "c1", at(1)).await?;
    store.reap_leases(at(1 + LEASE_SECS + 1), 60).await?;
    let status = store.get_job(BUILD, "j1").await?;
    assert_eq!(
        (status.state, status.time_start, status.client_id),
        (Queued, None, None)
    );
    Ok(())
}

pub async fn deleting_a_build_removes_everything_of_it_and_nothing_else<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    for number in ["100", "200"] {
        store
            .insert_build(&new_build(number, vec![job("j1"), job("j2")], at(0)))
            .await?;
        let claimed = claim(&*store, number, "j1", "c1", at(1)).await?;
        store
            .add_image(number, "j1", &claimed.lease, &image("disk.raw", at(2)))
            .await?;
        store
            .finish(
                number,
                "j1",
                &claimed.lease,
                &["disk.raw".to_owned()],
                at(3),
            )
            .await?;
    }
    // A running job blocks the deletion, and the refusal names it.
    claim(&*store, "100", "j2", "c1", at(4)).await?;
    let refused = store.delete_build("100").await.unwrap_err().to_string();
    assert!(refused.contains("j2"), "{refused}");
    let claimed = store.get_job("100", "j2").await?;
    assert_eq!(claimed.state, Running);
    store.cancel("100", "j2", at(5)).await?;

    assert_eq!(store.chunk_lists().await?.len(), 2);
    let deleted = store.delete_build("100").await?;
    assert_eq!((deleted.jobs, deleted.images), (2, 1));
    assert!(!deleted.files_key_shared, "each build has its own files");
    assert!(store.get_build("100").await.is_err());
    assert!(store.events("100", 0).await?.is_empty());
    assert_eq!(store.chunk_lists().await?.len(), 1);
    assert_eq!(store.list_images("200").await?.len(), 1);
    assert_eq!(store.image_totals().await?.images, 1);
    assert!(store.delete_build("100").await.is_err(), "gone already");
    Ok(())
}

pub async fn counters_add_up_and_survive_reopening<F: StoreFactory>(factory: &F) -> CaseResult {
    let place = factory.new_place().await?;
    {
        let store = factory.open(&place).await?;
        store
            .add_counters(&[("bytes_received", 10), ("chunks", 1)])
            .await?;
        store
            .add_counters(&[("bytes_received", 4), ("bytes_received", 1)])
            .await?;
        store.set_counters(&[("chunks", 7)]).await?;
        store.add_counters(&[]).await?;
    }
    let store = factory.open(&place).await?;
    let counters = store.counters().await?;
    assert_eq!(counters.get("bytes_received"), Some(&15));
    assert_eq!(counters.get("chunks"), Some(&7));
    Ok(())
}

pub async fn load_counts_give_builds_and_queued_and_running_jobs<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    assert_eq!(store.load_counts().await?, crate::LoadCounts::default());
    store
        .insert_build(&new_build(BUILD, vec![job("a"), job("b"), job("c")], at(0)))
        .await?;
    store
        .insert_build(&new_build("20021017.1", vec![job("x")], at(10)))
        .await?;
    let a = claim(&*store, BUILD, "a", "client-1", at(20)).await?;
    claim(&*store, BUILD, "b", "client-2", at(20)).await?;
    finish_with_image(&*store, &a, at(30)).await?;
    let counts = store.load_counts().await?;
    assert_eq!(
        (counts.builds, counts.queued, counts.running),
        (2, 2, 1),
        "two builds; c and x queued, b running, a finished"
    );
    Ok(())
}

pub async fn job_counts_give_each_state_and_config_type_with_the_oldest_queued_wait<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    assert_eq!(store.job_counts().await?, vec![]);
    let server = |id: &str| JobSpec {
        config_type: "w2k-server".to_owned(),
        ..job(id)
    };
    store
        .insert_build(&new_build(
            BUILD,
            vec![job("a"), job("b"), server("s")],
            at(0),
        ))
        .await?;
    store
        .insert_build(&new_build(
            "20021017.1",
            vec![job("x"), server("t")],
            at(10),
        ))
        .await?;
    // a runs, then b is claimed and given back at 40: queued since 40, not since 0.
    let a = claim(&*store, BUILD, "a", "client-1", at(20)).await?;
    assert_eq!(a.queued_since, at(0), "a waited from its submission");
    let b = claim(&*store, BUILD, "b", "client-1", at(30)).await?;
    store.release(BUILD, "b", &b.lease, at(40)).await?;
    let s = claim(&*store, BUILD, "s", "client-2", at(50)).await?;
    finish_with_image(&*store, &s, at(60)).await?;
    let b = claim(&*store, BUILD, "b", "client-1", at(70)).await?;
    assert_eq!(b.queued_since, at(40), "b waited from its release");
    store.release(BUILD, "b", &b.lease, at(80)).await?;

    let counts = store.job_counts().await?;
    let find = |state, config_type: &str| {
        counts
            .iter()
            .find(|count| count.state == state && count.config_type == config_type)
            .map(|count| (count.jobs, count.oldest_since))
    };
    assert_eq!(find(Running, "winxp-pro"), Some((1, None)), "{counts:?}");
    assert_eq!(
        find(Queued, "winxp-pro"),
        Some((2, Some(at(10)))),
        "x queued since 10, b since 80: {counts:?}"
    );
    assert_eq!(find(Finished, "w2k-server"), Some((1, None)), "{counts:?}");
    assert_eq!(
        find(Queued, "w2k-server"),
        Some((1, Some(at(10)))),
        "{counts:?}"
    );
    assert_eq!(counts.len(), 4, "no other pairs: {counts:?}");
    Ok(())
}

pub async fn farm_events_page_every_build_s_events_in_order<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    assert!(store.farm_events(0, 10).await?.is_empty());
    assert_eq!(store.last_event_seq().await?, 0);
    store
        .insert_build(&new_build(BUILD, vec![job("a"), job("b")], at(0)))
        .await?;
    store
        .insert_build(&new_build("20021017.1", vec![job("x")], at(10)))
        .await?;
    claim(&*store, "20021017.1", "x", "client-1", at(20)).await?;
    let all = store.farm_events(0, 100).await?;
    let seen: Vec<(&str, &str)> = all
        .iter()
        .map(|event| (event.build.as_str(), event.job.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (BUILD, "a"),
            (BUILD, "b"),
            ("20021017.1", "x"),
            ("20021017.1", "x")
        ]
    );
    assert!(all.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    let seqs = |events: &[kiln_proto::api::Event]| -> Vec<i64> {
        events.iter().map(|event| event.seq).collect()
    };
    let page = store.farm_events(all[0].seq, 2).await?;
    assert_eq!(
        seqs(&page),
        seqs(&all[1..3]),
        "after the first, two of them"
    );
    assert!(store.farm_events(all[3].seq, 10).await?.is_empty());
    assert_eq!(store.last_event_seq().await?, all[3].seq);
    Ok(())
}

pub async fn claim_records_the_client_as_its_latest_claim_describes_it_with_the_jobs_it_holds<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a"), job("b")], at(0)))
        .await?;
    assert!(store.clients().await?.is_empty());
    let imager = ClaimingClient {
        id: "imager-1".to_owned(),
        include: vec!["winxp-pro".to_owned(), "winxp-home".to_owned()],
        slots: Some(2),
        version: Some("0.1.0".to_owned()),
        address: Some("10.0.0.7".to_owned()),
    };
    let first = store
        .claim(BUILD, "a", &imager, at(40), at(10))
        .await?
        .context("a is claimable")?;
    store
        .heartbeat(
            BUILD,
            "a",
            &first.lease,
            at(50),
            Some(&Progress {
                major: Some("install".to_owned()),
                minor: None,
                percent: Some(40),
            }),
        )
        .await?;

    let record = client_record(&*store, "imager-1").await?;
    assert_eq!(record.include, ["winxp-pro", "winxp-home"]);
    assert_eq!(record.slots, Some(2));
    assert_eq!(record.version.as_deref(), Some("0.1.0"));
    assert_eq!(record.address.as_deref(), Some("10.0.0.7"));
    assert_eq!((record.first_seen, record.last_contact), (at(10), at(10)));
    assert_eq!(tally(&record), (1, 0, 0, 0));
    assert_eq!(
        record.held,
        [kiln_proto::api::HeldJob {
            build: BUILD.to_owned(),
            job: "a".to_owned(),
            percent: Some(40),
            major: Some("install".to_owned()),
        }]
    );

    // An older client says nothing of its slots or version, and a claim may come
    // without an address: the latest claim is what the client is, the address stays.
    let restarted_older = ClaimingClient {
        include: vec!["*".to_owned()],
        slots: None,
        version: None,
        address: None,
        ..imager.clone()
    };
    store
        .claim(BUILD, "b", &restarted_older, at(60), at(20))
        .await?
        .context("b is claimable")?;
    let record = client_record(&*store, "imager-1").await?;
    assert_eq!(record.include, ["*"]);
    assert_eq!((record.slots, record.version.as_deref()), (None, None));
    assert_eq!(record.address.as_deref(), Some("10.0.0.7"));
    assert_eq!((record.first_seen, record.last_contact), (at(10), at(20)));
    assert_eq!(tally(&record), (2, 0, 0, 0));
    let held: Vec<&str> = record.held.iter().map(|held| held.job.as_str()).collect();
    assert_eq!(held, ["a", "b"]);
    assert!(!record.session_open, "sessions are the server's to know");
    Ok(())
}

pub async fn finish_counts_a_finished_job_and_the_size_of_the_images_it_keeps_for_its_client<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a")], at(0)))
        .await?;
    // An image of a lost first run is dropped at the finish: it is not counted.
    let lost_run = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    store
        .add_image(BUILD, "a", &lost_run.lease, &image("old.wim", at(1)))
        .await?;
    store.reap_leases(at(31), 600).await?;

    let run = claim(&*store, BUILD, "a", "client-2", at(40)).await?;
    for (name, size) in [
        ("disk.wim", 3000),
        ("recovery.wim", 500),
        ("scratch.wim", 7),
    ] {
        let sized = NewImage {
            size,
            ..image(name, at(41))
        };
        store.add_image(BUILD, "a", &run.lease, &sized).await?;
    }
    // Only the images the finish names are the job's output.
    let named = ["disk.wim".to_owned(), "recovery.wim".to_owned()];
    store.finish(BUILD, "a", &run.lease, &named, at(45)).await?;

    let finisher = client_record(&*store, "client-2").await?;
    assert_eq!(tally(&finisher), (1, 1, 0, 0));
    assert_eq!(finisher.image_bytes, 3500);
    assert_eq!(finisher.last_contact, at(45), "the finish is a contact");
    assert!(finisher.held.is_empty());
    let loser = client_record(&*store, "client-1").await?;
    assert_eq!(tally(&loser), (1, 0, 0, 1));
    assert_eq!(loser.image_bytes, 0);
    Ok(())
}

pub async fn fail_counts_a_failed_job_for_its_client_whether_it_is_retried_or_not<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let one_retry = JobSpec {
        retries: Some(1),
        ..job("a")
    };
    store
        .insert_build(&new_build(BUILD, vec![one_retry], at(0)))
        .await?;
    let first = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    let event = store
        .fail(
            BUILD,
            "a",
            &first.lease,
            &failure("exit", "status 1"),
            at(5),
        )
        .await?;
    assert_eq!(event.to, Queued, "retried");
    let second = claim(&*store, BUILD, "a", "client-2", at(10)).await?;
    let event = store
        .fail(
            BUILD,
            "a",
            &second.lease,
            &failure("exit", "status 1"),
            at(15),
        )
        .await?;
    assert_eq!(event.to, Failed, "no retry left");

    let first_client = client_record(&*store, "client-1").await?;
    assert_eq!(tally(&first_client), (1, 0, 1, 0));
    assert_eq!(first_client.last_contact, at(5), "the report is a contact");
    assert_eq!(
        tally(&client_record(&*store, "client-2").await?),
        (1, 0, 1, 0)
    );
    Ok(())
}

pub async fn lapsed_leases_dropped_sessions_give_ups_and_hung_jobs_count_as_lost_for_their_client<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let short = JobSpec {
        timeout_secs: 10,
        ..job("hung")
    };
    store
        .insert_build(&new_build(
            BUILD,
            vec![job("lapsed"), job("dropped"), job("given-up"), short],
            at(0),
        ))
        .await?;
    claim(&*store, BUILD, "lapsed", "client-1", at(0)).await?;
    let reaped = store.reap_leases(at(31), 600).await?;
    assert_eq!(reaped.len(), 1);
    assert_eq!(
        tally(&client_record(&*store, "client-1").await?),
        (1, 0, 0, 1),
        "a lapsed lease is a lost job"
    );

    claim(&*store, BUILD, "dropped", "client-2", at(40)).await?;
    let taken = store
        .take_back_from_client("client-2", "client connection lost", at(41))
        .await?;
    assert_eq!(taken.len(), 1);
    assert_eq!(
        tally(&client_record(&*store, "client-2").await?),
        (1, 0, 0, 1),
        "a job taken back when the session dropped is a lost job"
    );

    let given = claim(&*store, BUILD, "given-up", "client-3", at(50)).await?;
    store
        .give_up(
            BUILD,
            "given-up",
            &given.lease,
            "the client restarted; the job died with it",
            at(51),
        )
        .await?;
    assert_eq!(
        tally(&client_record(&*store, "client-3").await?),
        (1, 0, 0, 1),
        "a job its client gave back after a restart is a lost job"
    );

    let hung = claim(&*store, BUILD, "hung", "client-4", at(60)).await?;
    store
        .heartbeat(BUILD, "hung", &hung.lease, at(60 + 600), None)
        .await?;
    let reaped = store.reap_leases(at(60 + 10 + 6), 5).await?;
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].event.to, Failed);
    assert_eq!(
        tally(&client_record(&*store, "client-4").await?),
        (1, 0, 0, 1),
        "a job taken from a client that held it past its timeout is a lost job"
    );
    Ok(())
}

pub async fn a_job_released_unstarted_counts_neither_as_claimed_nor_as_lost<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a")], at(0)))
        .await?;
    let unstarted = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    store.release(BUILD, "a", &unstarted.lease, at(1)).await?;
    let record = client_record(&*store, "client-1").await?;
    assert_eq!(tally(&record), (0, 0, 0, 0));
    assert!(record.held.is_empty());
    Ok(())
}

pub async fn an_operator_cancelling_or_restarting_a_running_job_counts_no_end_for_its_client<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a"), job("b")], at(0)))
        .await?;
    claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    claim(&*store, BUILD, "b", "client-1", at(0)).await?;
    store.cancel(BUILD, "a", at(1)).await?;
    store.restart(BUILD, "b", at(2)).await?;
    let record = client_record(&*store, "client-1").await?;
    assert_eq!(tally(&record), (2, 0, 0, 0));
    assert!(record.held.is_empty());
    Ok(())
}

pub async fn touch_client_moves_last_contact_forward_for_a_known_client_only<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a")], at(0)))
        .await?;
    assert!(
        !store
            .touch_client("stranger", Some("10.0.0.9"), at(1))
            .await?
    );
    assert!(store.clients().await?.is_empty(), "a touch records no one");

    claim(&*store, BUILD, "a", "client-1", at(10)).await?;
    assert!(
        store
            .touch_client("client-1", Some("10.0.0.8"), at(20))
            .await?
    );
    let record = client_record(&*store, "client-1").await?;
    assert_eq!(record.last_contact, at(20));
    assert_eq!(record.address.as_deref(), Some("10.0.0.8"));
    // A late write of an older contact does not move it back; no address keeps it.
    assert!(store.touch_client("client-1", None, at(15)).await?);
    let record = client_record(&*store, "client-1").await?;
    assert_eq!(record.last_contact, at(20));
    assert_eq!(record.address.as_deref(), Some("10.0.0.8"));
    assert_eq!(record.first_seen, at(10));
    Ok(())
}

pub async fn client_history_survives_reopening<F: StoreFactory>(factory: &F) -> CaseResult {
    let place = factory.new_place().await?;
    let store = factory.open(&place).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a"), job("b")], at(0)))
        .await?;
    let finished = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    finish_with_image(&*store, &finished, at(5)).await?;
    claim(&*store, BUILD, "b", "client-1", at(6)).await?;
    let before = store.clients().await?;
    drop(store);

    let reopened = factory.open(&place).await?;
    let after = reopened.clients().await?;
    assert_eq!(after, before);
    assert_eq!(tally(&after[0]), (2, 1, 0, 0));
    assert_eq!(after[0].image_bytes, 1 << 20);
    assert_eq!(after[0].held.len(), 1);
    Ok(())
}

pub async fn log_volume_stops_at_its_limit_with_a_notice_and_the_count_survives_reopening<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let place = factory.new_place().await?;
    let lease = {
        let store = factory.open(&place).await?;
        store
            .insert_build(&new_build(BUILD, vec![job("a")], at(0)))
            .await?;
        let a = claim(&*store, BUILD, "a", "client-1", at(1)).await?;
        // 10 + 10 bytes fit in 25; the third line would pass the limit.
        let lines = [
            log_line("stdout", "0123456789"),
            log_line("stdout", "abcdefghij"),
        ];
        let first = store
            .append_log_within(BUILD, "a", &a.lease, &lines, None, at(2), 25, "cut")
            .await?;
        assert_eq!((first.n_stored, first.cut), (2, false));
        a.lease
    };
    // The 20 bytes stored count after a reopen: 5 more fit, 6 do not.
    let store = factory.open(&place).await?;
    let lines = [log_line("stdout", "12345"), log_line("stderr", "123456")];
    let second = store
        .append_log_within(BUILD, "a", &lease, &lines, None, at(3), 25, "cut")
        .await?;
    assert_eq!(
        (second.n_stored, second.cut, second.cut_now),
        (1, true, true)
    );
    // Once cut, nothing more is stored, but the progress still is.
    let progress = Progress {
        percent: Some(50),
        ..Progress::default()
    };
    let third = store
        .append_log_within(
            BUILD,
            "a",
            &lease,
            &[log_line("stdout", "x")],
            Some(&progress),
            at(4),
            25,
            "cut",
        )
        .await?;
    assert_eq!((third.n_stored, third.cut, third.cut_now), (0, true, false));
    let texts: Vec<(String, String)> = store
        .read_log(BUILD, "a", 0, 100)
        .await?
        .into_iter()
        .map(|line| (line.stream, line.text))
        .collect();
    let expected = [
        ("stdout", "0123456789"),
        ("stdout", "abcdefghij"),
        ("stdout", "12345"),
        ("kiln", "cut"),
    ]
    .map(|(stream, text)| (stream.to_owned(), text.to_owned()));
    assert_eq!(texts, expected);
    assert_eq!(store.get_job(BUILD, "a").await?.percent, Some(50));
    Ok(())
}

pub async fn a_job_whose_steps_are_done_is_taken_back_only_when_its_lease_lapses<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    const HUNG_GRACE_SECS: u64 = 5;
    let (_place, store) = open_store(factory).await?;
    let short = JobSpec {
        timeout_secs: 10,
        ..job("a")
    };
    store
        .insert_build(&new_build(BUILD, vec![short], at(0)))
        .await?;
    let uploading = claim(&*store, BUILD, "a", "client-1", at(0)).await?;
    assert_stale(
        "mark_steps_done with another lease",
        store
            .mark_steps_done(BUILD, "a", "not-the-lease", at(2))
            .await,
    );
    assert_eq!(store.get_job(BUILD, "a").await?.uploading_since, None);
    store
        .heartbeat(BUILD, "a", &uploading.lease, at(100), None)
        .await?;
    store
        .mark_steps_done(BUILD, "a", &uploading.lease, at(3))
        .await?;
    // Every later heartbeat says so again: the upload began at the first.
    store
        .mark_steps_done(BUILD, "a", &uploading.lease, at(4))
        .await?;
    assert_eq!(
        store.get_job(BUILD, "a").await?.uploading_since,
        Some(at(3)),
        "the upload began when the steps were first said to be over"
    );
    // Timeout and grace end at 15 s, but the steps are over: the images upload.
    assert!(store.reap_leases(at(50), HUNG_GRACE_SECS).await?.is_empty());
    assert_eq!(store.get_job(BUILD, "a").await?.state, Running);
    let reaped = store.reap_leases(at(101), HUNG_GRACE_SECS).await?;
    assert_eq!(reaped.len(), 1);
    assert_eq!(
        steps(std::slice::from_ref(&reaped[0].event)),
        [step(at(101), Some(Running), Queued, Some("client-1"), 1)]
    );
    assert_eq!(reason(&reaped[0].event), "lease lapsed");

    assert_eq!(
        store.get_job(BUILD, "a").await?.uploading_since,
        None,
        "a run back in the queue is not uploading"
    );

    // The next claim starts its steps again: held past timeout and grace, it is hung.
    let again = claim(&*store, BUILD, "a", "client-2", at(110)).await?;
    store
        .heartbeat(BUILD, "a", &again.lease, at(1000), None)
        .await?;
    assert!(store
        .reap_leases(at(125), HUNG_GRACE_SECS)
        .await?
        .is_empty());
    let reaped = store.reap_leases(at(126), HUNG_GRACE_SECS).await?;
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].event.to, Failed);
    assert!(reason(&reaped[0].event).starts_with("timeout"));
    Ok(())
}

pub async fn a_files_key_is_in_use_while_a_build_holds_it<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    for number in ["100", "200"] {
        let mut build = new_build(number, vec![job("j1")], at(0));
        build.files_key = "files/shared.tar".to_owned();
        store.insert_build(&build).await?;
    }
    assert!(store.files_key_in_use("files/shared.tar").await?);
    assert!(!store.files_key_in_use("files/none.tar").await?);

    let first = store.delete_build("100").await?;
    assert_eq!(first.files_key, "files/shared.tar");
    assert!(first.files_key_shared, "build 200 holds the same files");
    assert!(store.files_key_in_use("files/shared.tar").await?);
    let last = store.delete_build("200").await?;
    assert!(!last.files_key_shared);
    assert!(!store.files_key_in_use("files/shared.tar").await?);
    Ok(())
}

/// The notices waiting in the outbox (all of them are due by the end of time), as
/// (URL, notice), oldest first.
async fn queued_notices(store: &dyn Store) -> anyhow::Result<Vec<(String, Notice)>> {
    store
        .due_notifications(i64::MAX, 1000)
        .await?
        .into_iter()
        .map(|notification| {
            let notice: Notice = serde_json::from_str(&notification.body)
                .with_context(|| format!("notice body {}", notification.body))?;
            assert_eq!(notification.build, notice.build);
            assert_eq!(notification.attempts, 0);
            Ok((notification.url, notice))
        })
        .collect()
}

/// A queued notice as a case checks it: (URL, event, job, reason, event sequence number).
type NoticeSeen<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, i64);

pub async fn job_ends_queue_a_notice_per_url_and_the_build_end_once_per_time_it_ends<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let urls = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"];
    let mut build = new_build(BUILD, vec![job("a"), job("b")], at(0));
    build.manifest.notify = urls.iter().map(|url| url.to_string()).collect();
    store.insert_build(&build).await?;
    assert!(
        queued_notices(&*store).await?.is_empty(),
        "a submission is no end"
    );

    let a = claim(&*store, BUILD, "a", "client-1", at(1)).await?;
    let finished_a = finish_with_image(&*store, &a, at(10)).await?;
    let b = claim(&*store, BUILD, "b", "client-2", at(1)).await?;
    let failed_b = store
        .fail(BUILD, "b", &b.lease, &failure("exit", "status 1"), at(20))
        .await?;
    store.restart(BUILD, "b", at(30)).await?;
    let b = claim(&*store, BUILD, "b", "client-3", at(31)).await?;
    let finished_b = finish_with_image(&*store, &b, at(40)).await?;

    let notices = queued_notices(&*store).await?;
    let seen: Vec<NoticeSeen> = notices
        .iter()
        .map(|(url, notice)| {
            (
                url.as_str(),
                notice.event.as_str(),
                notice.job.as_deref(),
                notice.reason.as_deref(),
                notice.seq,
            )
        })
        .collect();
    let stored = "images stored and verified";
    let (url_a, url_b) = (urls[0], urls[1]);
    let mut expected = Vec::new();
    for url in urls {
        expected.push((url, "job_finished", Some("a"), Some(stored), finished_a.seq));
    }
    for url in urls {
        expected.push((url, "job_failed", Some("b"), Some("exit"), failed_b.seq));
    }
    for url in urls {
        let reason = Some("1 of 2 jobs finished");
        expected.push((url, "build_finished", None, reason, failed_b.seq));
    }
    for url in urls {
        expected.push((url, "job_finished", Some("b"), Some(stored), finished_b.seq));
    }
    // The restart reopened the build: its second end is announced again.
    for url in [url_a, url_b] {
        let reason = Some("2 of 2 jobs finished");
        expected.push((url, "build_finished", None, reason, finished_b.seq));
    }
    assert_eq!(seen, expected);
    let (_, first) = &notices[0];
    assert_eq!(first.build, BUILD);
    assert_eq!(first.client_id.as_deref(), Some("client-1"));
    assert_eq!(first.time, kiln_proto::format_rfc3339(at(10)));
    let (_, build_end) = &notices[4];
    assert_eq!(build_end.client_id, None);
    assert_eq!(build_end.time, kiln_proto::format_rfc3339(at(20)));

    // Jobs that end together end their build once; a cancel has no notice of its own.
    let expiring = JobSpec {
        accept_within_secs: Some(60),
        ..job("x")
    };
    let also_expiring = JobSpec {
        id: "y".to_owned(),
        ..expiring.clone()
    };
    store
        .insert_build(&new_build(
            "20021017.1",
            vec![expiring, also_expiring],
            at(0),
        ))
        .await?;
    assert_eq!(store.expire_unclaimed(at(61)).await?.len(), 2);
    store
        .insert_build(&new_build("20021018.1", vec![job("z")], at(0)))
        .await?;
    store.cancel("20021018.1", "z", at(70)).await?;
    let later: Vec<(String, Option<String>, Option<String>)> = queued_notices(&*store)
        .await?
        .into_iter()
        .skip(notices.len())
        .map(|(_, notice)| (notice.event, notice.job, notice.reason))
        .collect();
    let within = Some("no client accepted it within 60 s".to_owned());
    assert_eq!(
        later,
        [
            (
                "job_expired".to_owned(),
                Some("x".to_owned()),
                within.clone()
            ),
            ("job_expired".to_owned(), Some("y".to_owned()), within),
            (
                "build_finished".to_owned(),
                None,
                Some("0 of 2 jobs finished".to_owned())
            ),
            (
                "build_finished".to_owned(),
                None,
                Some("0 of 1 jobs finished".to_owned())
            ),
        ]
    );
    Ok(())
}

pub async fn the_outbox_hands_out_a_url_s_notices_in_order_until_delivered_or_given_up<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a"), job("b")], at(0)))
        .await?;
    let mut other = new_build("20021017.1", vec![job("c")], at(0));
    other.manifest.notify = vec!["http://127.0.0.1:9/other".to_owned()];
    store.insert_build(&other).await?;
    let a = claim(&*store, BUILD, "a", "client-1", at(1)).await?;
    finish_with_image(&*store, &a, at(10)).await?;
    let b = claim(&*store, BUILD, "b", "client-1", at(1)).await?;
    finish_with_image(&*store, &b, at(20)).await?;
    let c = claim(&*store, "20021017.1", "c", "client-2", at(1)).await?;
    finish_with_image(&*store, &c, at(30)).await?;

    let ids = |due: &[crate::Notification]| due.iter().map(|n| n.id).collect::<Vec<_>>();
    assert!(store.due_notifications(at(5), 100).await?.is_empty());
    // A URL's notices come together once its oldest is due, in order.
    let due = store.due_notifications(at(15), 100).await?;
    assert_eq!(due.len(), 3, "a's end, b's end, the build's end: {due:?}");
    let (n1, n2, n3) = (due[0].id, due[1].id, due[2].id);
    assert!(n1 < n2 && n2 < n3);
    assert!(due.iter().all(|n| n.url == "http://127.0.0.1:9/notify"));
    assert_eq!(ids(&store.due_notifications(at(15), 2).await?), [n1, n2]);
    let due = store.due_notifications(at(30), 100).await?;
    assert_eq!(due.len(), 5, "and the other build's two: {due:?}");
    let n4 = due[3].id;
    let n5 = due[4].id;

    // A failed delivery waits until its retry, and holds back the later ones of its URL
    // only.
    store
        .notification_failed(n1, "503 Service Unavailable", Some(at(100)), at(31))
        .await?;
    assert_eq!(ids(&store.due_notifications(at(50), 100).await?), [n4, n5]);
    store.notification_delivered(n4, at(51)).await?;
    store.notification_delivered(n5, at(51)).await?;
    let due = store.due_notifications(at(100), 100).await?;
    assert_eq!(ids(&due), [n1, n2, n3]);
    assert_eq!(due[0].attempts, 1);
    assert_eq!(due[1].attempts, 0);

    store.notification_delivered(n1, at(101)).await?;
    store
        .notification_failed(n2, "404 Not Found", None, at(102))
        .await?;
    assert_eq!(
        ids(&store.due_notifications(at(103), 100).await?),
        [n3],
        "given up, the notice is not tried again"
    );
    store.notification_delivered(n3, at(104)).await?;
    assert!(store.due_notifications(i64::MAX, 100).await?.is_empty());
    Ok(())
}

pub async fn a_url_s_notices_are_taken_by_one_notifier_at_a_time<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .insert_build(&new_build(BUILD, vec![job("a"), job("b")], at(0)))
        .await?;
    let a = claim(&*store, BUILD, "a", "client-1", at(1)).await?;
    finish_with_image(&*store, &a, at(10)).await?;
    let b = claim(&*store, BUILD, "b", "client-1", at(1)).await?;
    finish_with_image(&*store, &b, at(20)).await?;
    let ids = |due: &[crate::Notification]| due.iter().map(|n| n.id).collect::<Vec<_>>();

    // Two notifiers (two servers on this store) look at once: one takes the URL.
    let taken = store.claim_notifications(at(30), 100, at(90)).await?;
    assert_eq!(
        taken.len(),
        3,
        "a's end, b's end, the build's end: {taken:?}"
    );
    let (n1, n2, n3) = (taken[0].id, taken[1].id, taken[2].id);
    assert!(store
        .claim_notifications(at(30), 100, at(90))
        .await?
        .is_empty());
    assert!(
        store.due_notifications(at(30), 100).await?.is_empty(),
        "a taken URL is not due for anyone else"
    );
    // Delivering the first does not free the rest to others while held.
    store.notification_delivered(n1, at(31)).await?;
    assert!(store
        .claim_notifications(at(32), 100, at(90))
        .await?
        .is_empty());
    // A failure stops the URL: the untried one is given back, and waits behind it.
    store
        .notification_failed(n2, "503 Service Unavailable", Some(at(60)), at(33))
        .await?;
    store.release_notifications(&[n3], at(33)).await?;
    assert!(store
        .claim_notifications(at(40), 100, at(90))
        .await?
        .is_empty());
    assert_eq!(
        ids(&store.claim_notifications(at(60), 100, at(120)).await?),
        [n2, n3]
    );
    // A notifier that died mid-round: its hold runs out and another takes the URL.
    assert!(store
        .claim_notifications(at(119), 100, at(200))
        .await?
        .is_empty());
    assert_eq!(
        ids(&store.claim_notifications(at(120), 100, at(200)).await?),
        [n2, n3]
    );
    Ok(())
}

pub async fn enrolling_takes_a_free_id_only_and_issuing_replaces_any_credential<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    use crate::{CredentialPut, CredentialWrite};
    let (_place, store) = open_store(factory).await?;
    assert_eq!(store.client_credential("c1").await?, None);
    assert!(store.client_credentials().await?.is_empty());

    let put = |id: &'static str, hash: &'static str, how, secs| {
        let store = store.clone();
        async move { store.put_client_credential(id, hash, how, at(secs)).await }
    };
    assert_eq!(
        put("c1", "h1", CredentialWrite::Enroll, 1).await?,
        CredentialPut::Created
    );
    assert_eq!(
        put("c1", "h2", CredentialWrite::Enroll, 2).await?,
        CredentialPut::Exists
    );
    assert_eq!(
        put("c2", "h3", CredentialWrite::Issue, 3).await?,
        CredentialPut::Created
    );
    let c1 = store
        .client_credential("c1")
        .await?
        .context("c1 enrolled")?;
    assert_eq!(
        (
            c1.secret_hash.as_str(),
            c1.origin.as_str(),
            c1.created_at,
            c1.revoked_at
        ),
        ("h1", "enrolled", at(1), None),
        "a second enrollment changes nothing"
    );

    assert!(store.revoke_client_credential("c1", at(4)).await?);
    assert!(
        !store.revoke_client_credential("c1", at(5)).await?,
        "revoked already"
    );
    assert!(!store.revoke_client_credential("nobody", at(5)).await?);
    assert_eq!(
        put("c1", "h4", CredentialWrite::Enroll, 6).await?,
        CredentialPut::Revoked
    );
    let c1 = store.client_credential("c1").await?.context("c1 kept")?;
    assert_eq!(
        (c1.secret_hash.as_str(), c1.revoked_at),
        ("h1", Some(at(4)))
    );

    assert_eq!(
        put("c1", "h5", CredentialWrite::Issue, 7).await?,
        CredentialPut::Replaced
    );
    let all = store.client_credentials().await?;
    let ids: Vec<&str> = all.iter().map(|c| c.client_id.as_str()).collect();
    assert_eq!(ids, ["c1", "c2"]);
    assert_eq!(
        (
            all[0].secret_hash.as_str(),
            all[0].origin.as_str(),
            all[0].created_at,
            all[0].revoked_at
        ),
        ("h5", "issued", at(7), None)
    );
    assert_eq!(
        (all[1].origin.as_str(), all[1].created_at),
        ("issued", at(3))
    );
    Ok(())
}

pub async fn a_logged_out_web_session_stays_ended_after_reopening_until_it_would_expire<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let place = factory.new_place().await?;
    let store = factory.open(&place).await?;
    assert!(!store.web_session_ended("n1").await?);
    store.end_web_session("n1", at(100), at(1)).await?;
    store.end_web_session("n2", at(10), at(1)).await?;
    assert!(store.web_session_ended("n1").await?);
    assert!(!store.web_session_ended("n3").await?);
    drop(store);
    let store = factory.open(&place).await?;
    assert!(
        store.web_session_ended("n1").await?,
        "a logout survives reopening"
    );
    assert!(store.web_session_ended("n2").await?);
    // A later logout forgets the records whose session has expired.
    store.end_web_session("n3", at(200), at(50)).await?;
    assert!(!store.web_session_ended("n2").await?, "n2 expired at 10 s");
    assert!(store.web_session_ended("n1").await?);
    assert!(store.web_session_ended("n3").await?);
    Ok(())
}

pub async fn every_area_works_through_its_own_narrow_trait_object<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    let queue: Arc<dyn Queue> = store.clone();
    let logs: Arc<dyn Logs> = store.clone();
    let images: Arc<dyn Images> = store.clone();
    let outbox: Arc<dyn Outbox> = store.clone();
    let clients: Arc<dyn Clients> = store.clone();

    queue
        .insert_build(&new_build(BUILD, vec![job("a")], at(0)))
        .await?;
    let claimed = queue
        .claim(
            BUILD,
            "a",
            &ClaimingClient::with_id("client-1"),
            at(30),
            at(1),
        )
        .await?
        .context("a is claimable")?;
    logs.append_log(
        BUILD,
        "a",
        &claimed.lease,
        &[log_line("stdout", "imaging")],
        None,
        at(2),
    )
    .await?;
    images
        .add_image(BUILD, "a", &claimed.lease, &image("a.wim", at(3)))
        .await?;
    queue
        .finish(BUILD, "a", &claimed.lease, &["a.wim".to_owned()], at(4))
        .await?;

    assert_eq!(logs.read_log(BUILD, "a", 0, 10).await?.len(), 1);
    assert_eq!(images.list_images(BUILD).await?.len(), 1);
    assert_eq!(images.chunk_lists().await?, [image("a.wim", 0).chunk_list]);
    assert_eq!(
        images.image_totals().await?,
        crate::ImageTotals {
            images: 1,
            bytes: 1 << 20
        }
    );
    let due = outbox.due_notifications(at(4), 10).await?;
    assert_eq!(due.len(), 2, "the job's end and the build's: {due:?}");
    let record = clients
        .clients()
        .await?
        .into_iter()
        .next()
        .context("one client")?;
    assert_eq!(tally(&record), (1, 1, 0, 0));
    Ok(())
}

fn chunk(seed: u8) -> ChunkHash {
    ChunkHash([seed; 32])
}

fn entry(seed: u8, offset: u64, len: u32) -> PackEntry {
    PackEntry {
        hash: chunk(seed),
        offset,
        len,
    }
}

/// The pack index: a chunk keeps the first entry recorded for it, is found where that
/// says, is listed in name order, and the index survives reopening.
pub async fn the_pack_index_keeps_the_first_entry_of_a_chunk_and_survives_reopening<
    F: StoreFactory,
>(
    factory: &F,
) -> CaseResult {
    let place = factory.new_place().await?;
    {
        let store = factory.open(&place).await?;
        let added = store
            .add_pack(
                "pack-a",
                308,
                &[entry(1, 8, 100), entry(2, 108, 200)],
                at(1),
            )
            .await?;
        assert_eq!(added, 2);
        // A second server stored chunk 2 too: the first entry stays.
        let added = store
            .add_pack("pack-b", 158, &[entry(2, 8, 50), entry(3, 58, 100)], at(2))
            .await?;
        assert_eq!(added, 1, "chunk 2 is indexed already");
    }
    let store = factory.open(&place).await?;
    let located = store
        .locate_chunks(&[chunk(3), chunk(9), chunk(2), chunk(1)])
        .await?;
    assert_eq!(
        located,
        vec![
            Some(PackedAt {
                pack: "pack-b".into(),
                offset: 58,
                len: 100
            }),
            None,
            Some(PackedAt {
                pack: "pack-a".into(),
                offset: 108,
                len: 200
            }),
            Some(PackedAt {
                pack: "pack-a".into(),
                offset: 8,
                len: 100
            }),
        ]
    );
    assert_eq!(
        store.list_chunks(None, 10).await?,
        vec![(chunk(1), 100), (chunk(2), 200), (chunk(3), 100)]
    );
    assert_eq!(
        store.list_chunks(Some(chunk(1)), 1).await?,
        vec![(chunk(2), 200)]
    );
    assert_eq!(
        store.pack_entries("pack-a").await?,
        vec![entry(1, 8, 100), entry(2, 108, 200)]
    );
    // Many at once, past any limit of bound parameters.
    let many: Vec<ChunkHash> = (0..3000u32)
        .map(|i| {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&i.to_le_bytes());
            bytes[31] = 0xee;
            ChunkHash(bytes)
        })
        .collect();
    let entries: Vec<PackEntry> = many
        .iter()
        .enumerate()
        .map(|(i, hash)| PackEntry {
            hash: *hash,
            offset: i as u64 * 10,
            len: 10,
        })
        .collect();
    assert_eq!(
        store.add_pack("pack-c", 30_000, &entries, at(3)).await?,
        3000
    );
    let located = store.locate_chunks(&many).await?;
    assert!(located
        .iter()
        .enumerate()
        .all(|(i, at)| at.as_ref().is_some_and(|at| at.offset == i as u64 * 10)));
    Ok(())
}

/// Removal skips chunks pinned past the start of the collection, pins end when they
/// say, and a released pin still holds for collections that started before it.
pub async fn removing_chunks_skips_pinned_ones_until_their_pins_end<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .add_pack(
            "pack-a",
            1000,
            &[entry(1, 8, 100), entry(2, 108, 200), entry(3, 308, 300)],
            at(0),
        )
        .await?;
    store
        .pin_chunks("1/a", &[chunk(1), chunk(2)], at(60))
        .await?;
    // A shorter pin does not shorten a longer one.
    store.pin_chunks("1/a", &[chunk(2)], at(10)).await?;
    let freed = store
        .remove_unpinned_chunks(&[chunk(1), chunk(2), chunk(3), chunk(9)], at(30))
        .await?;
    assert_eq!(freed, 300, "only chunk 3 was not pinned");
    assert_eq!(
        store.list_chunks(None, 10).await?,
        vec![(chunk(1), 100), (chunk(2), 200)]
    );
    assert_eq!(store.forget_pins(at(30)).await?, 0, "no pin has ended");
    // Two uploads pin chunk 1; one commits and releases its pin at 40.
    store.pin_chunks("1/b", &[chunk(1)], at(45)).await?;
    store
        .release_pins("1/a", &[chunk(1), chunk(2)], at(40))
        .await?;
    assert_eq!(
        store.remove_unpinned_chunks(&[chunk(2)], at(39)).await?,
        0,
        "a collection that started before the release still skips chunk 2"
    );
    assert_eq!(
        store
            .remove_unpinned_chunks(&[chunk(1), chunk(2)], at(41))
            .await?,
        200,
        "one started after it removes chunk 2; the other upload's pin keeps chunk 1"
    );
    assert_eq!(store.forget_pins(at(45)).await?, 3);
    let freed = store.remove_unpinned_chunks(&[chunk(1)], at(46)).await?;
    assert_eq!(freed, 100);
    assert!(store.list_chunks(None, 10).await?.is_empty());
    Ok(())
}

/// Compaction's bookkeeping: sparse packs are found, entries move to the new pack only
/// where they still point into the old one, and the old one is forgotten once empty.
pub async fn replacing_a_sparse_pack_moves_its_live_entries_and_forgets_it<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let (_place, store) = open_store(factory).await?;
    store
        .add_pack(
            "old",
            1000,
            &[entry(1, 8, 100), entry(2, 108, 100), entry(3, 208, 700)],
            at(0),
        )
        .await?;
    store
        .add_pack("dense", 108, &[entry(4, 8, 100)], at(0))
        .await?;
    assert!(store.sparse_packs(0.5).await?.is_empty());
    store.remove_unpinned_chunks(&[chunk(3)], at(1)).await?;
    assert_eq!(
        store.sparse_packs(0.5).await?,
        vec![PackFill {
            pack: "old".into(),
            bytes: 1000,
            live_bytes: 200
        }]
    );
    // Chunk 2 is removed while the copy is made: its entry is not brought back.
    store.remove_unpinned_chunks(&[chunk(2)], at(2)).await?;
    let forgotten = store
        .replace_pack(
            "old",
            Some(("new", 208, &[entry(1, 8, 100), entry(2, 108, 100)])),
            at(3),
        )
        .await?;
    assert!(forgotten);
    assert_eq!(
        store.locate_chunks(&[chunk(1), chunk(2)]).await?,
        vec![
            Some(PackedAt {
                pack: "new".into(),
                offset: 8,
                len: 100
            }),
            None
        ]
    );
    assert_eq!(
        store.sparse_packs(0.5).await?,
        vec![PackFill {
            pack: "new".into(),
            bytes: 208,
            live_bytes: 100
        }],
        "the old pack is forgotten; the new one is half dead already"
    );
    // A pack something still points into is not forgotten.
    assert!(!store.replace_pack("dense", None, at(4)).await?);
    assert!(
        store
            .replace_pack("new", Some(("newer", 108, &[entry(1, 8, 100)])), at(5))
            .await?
    );
    Ok(())
}

/// The image store a database indexes is recorded by the first claim; a later claim
/// (another server starting at once, or on another image store) gets the first id.
pub async fn the_image_store_id_is_recorded_once_and_survives_reopening<F: StoreFactory>(
    factory: &F,
) -> CaseResult {
    let place = factory.new_place().await?;
    let store = factory.open(&place).await?;
    assert_eq!(store.image_store_id().await?, None, "a new store has none");
    let first = "0123456789abcdef0123456789abcdef";
    let other = "fedcba9876543210fedcba9876543210";
    assert_eq!(store.claim_image_store_id(first).await?, first);
    assert_eq!(store.claim_image_store_id(other).await?, first);
    drop(store);
    let reopened = factory.open(&place).await?;
    assert_eq!(reopened.image_store_id().await?.as_deref(), Some(first));
    Ok(())
}
