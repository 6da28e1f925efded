//! `kiln bench store`: the job store alone, without HTTP or clients: how many
//! claim-and-finish cycles a second it does, on SQLite and (given a database) on
//! PostgreSQL, alternating the two, each round a new build in the same store so that
//! later rounds run on a fuller one.
//!
//! A cycle is what a server does for a trivial job: read the first queued jobs in the
//! dispatcher's order (`queued_candidates`, 64 at a time, as a dispatch round does),
//! claim one (its event, the client's history and the lease in one transaction),
//! record its image under the lease, and finish it (its event and the client's
//! history in one transaction, and with `--webhook` the notice in the webhook outbox,
//! which every end of a job of a build with a webhook writes; the build's end notice
//! with its last job). `workers` tasks do cycles at once,
//! each taking every `workers`-th job of what it read, as several dispatchers (one per
//! replica) would; a claim another worker won counts as a lost race, not a cycle.
//!
//! With `--dispatchers D`, the workers are instead the slots of D dispatchers, as a
//! server's clients are the slots of its replicas' dispatchers: each dispatcher reads
//! the queue once a round, takes every D-th job of it (the others' share, as replicas
//! racing for the same queue would take), one for each free slot, claims them all at
//! once (so that on PostgreSQL they can share a batch, as a dispatch round's claims
//! do), and hands each job it won to a slot, which records the image and finishes it.
//! A dispatcher starts its next round as soon as a slot is free again, or at once when
//! it lost a race.

use kiln_proto::manifest::BuildManifest;
use kiln_store::{ClaimedJob, ClaimingClient, NewBuild, NewImage, PgStore, SqliteStore, Store};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

/// One round's figures.
struct Round {
    backend: &'static str,
    workers: u32,
    round: u32,
    insert_secs: f64,
    cycles: u64,
    lost_races: u64,
    secs: f64,
    cycle_ms: Vec<f64>,
    /// With `--webhook`: one read of the due notices after the round, with every
    /// notice the store holds still pending (no server delivers them).
    due_read: Option<(usize, f64)>,
}

/// Where the builds' webhook points with `--webhook`. Nothing is sent there: the
/// bench runs no outbox worker.
const WEBHOOK: &str = "http://127.0.0.1:9/kiln-bench";

/// Due notices read at once, as the server's notifier reads them (`DUE_PAGE` in
/// `kiln-server`'s `domain/notices.rs`).
const DUE_PAGE: u32 = 256;

/// A build of `n_jobs` trivial jobs, numbered `number`, parsed from its XML as a
/// submitted one is; with `webhook`, the build has one.
fn build_of(number: &str, n_jobs: u32, webhook: bool) -> anyhow::Result<NewBuild> {
    let notify = if webhook {
        format!("<NOTIFY>{WEBHOOK}</NOTIFY>\n")
    } else {
        String::new()
    };
    let mut xml = format!(
        "<SERVER>\n<BUILDNUMBER>{number}</BUILDNUMBER>\n<TITLE>store bench</TITLE>\n{notify}<JOBS>\n"
    );
    for idx in 0..n_jobs {
        let _ = writeln!(
            xml,
            "<JOB ID=\"j{idx}\"><CONFIGTYPE>PRO</CONFIGTYPE><INSTALLSCRIPT>install.sh</INSTALLSCRIPT><IMAGESCRIPT>image.sh</IMAGESCRIPT><TIMEOUT>600</TIMEOUT></JOB>"
        );
    }
    xml.push_str("</JOBS>\n</SERVER>\n");
    Ok(NewBuild {
        manifest: BuildManifest::parse("relbuild.xml", &xml)?,
        files_key: format!("files/{number}.tar"),
        files_size: 10_240,
        submitted_at: kiln_common::now_micros(),
        default_accept_within_secs: None,
        default_max_attempts: 3,
    })
}

/// One worker's cycles until the queue is empty: (cycle times in ms, lost races).
async fn work(
    store: Arc<dyn Store>,
    worker: usize,
    n_workers: usize,
) -> anyhow::Result<(Vec<f64>, u64)> {
    let client = ClaimingClient {
        id: format!("bench-{worker}"),
        include: vec!["*".into()],
        slots: Some(1),
        version: None,
        address: Some("127.0.0.1".into()),
    };
    let mut cycle_ms = Vec::new();
    let mut lost = 0;
    loop {
        let started = Instant::now();
        let candidates = store.queued_candidates(64).await?;
        if candidates.is_empty() {
            return Ok((cycle_ms, lost));
        }
        let mut mine = candidates.iter().skip(worker % candidates.len().max(1));
        let mut first = true;
        while let Some(candidate) = mine.next() {
            let began = if first { started } else { Instant::now() };
            first = false;
            let now = kiln_common::now_micros();
            let Some(claimed) = store
                .claim(
                    &candidate.build,
                    &candidate.job,
                    &client,
                    now + 60_000_000,
                    now,
                )
                .await?
            else {
                lost += 1;
                continue;
            };
            image_and_finish(&*store, &claimed).await?;
            cycle_ms.push(began.elapsed().as_secs_f64() * 1000.0);
            // The next of every `n_workers` candidates.
            for _ in 1..n_workers {
                mine.next();
            }
        }
    }
}

/// A claimed job's image record and finish, as its client's calls would make them: the
/// rest of a cycle after the claim.
async fn image_and_finish(store: &dyn Store, claimed: &ClaimedJob) -> anyhow::Result<()> {
    let name = format!("{}.img", claimed.job);
    let image = NewImage {
        name: name.clone(),
        size: 6,
        blake3: "0".repeat(64),
        sha256: String::new(),
        blob_key: format!("images/{}/{}", claimed.build, name),
        created_at: kiln_common::now_micros(),
        chunk_list: Vec::new(),
    };
    store
        .add_image(&claimed.build, &claimed.job, &claimed.lease, &image)
        .await?;
    store
        .finish(
            &claimed.build,
            &claimed.job,
            &claimed.lease,
            &[name],
            kiln_common::now_micros(),
        )
        .await?;
    Ok(())
}

/// Slots of each client a dispatcher serves.
const SLOTS_A_CLIENT: usize = 4;

/// One dispatcher of `n_dispatchers` with `slots` slots, until the queue is empty:
/// (cycle times in ms, lost races). A cycle runs from its round's start to its finish.
async fn dispatch(
    store: Arc<dyn Store>,
    dispatcher: usize,
    n_dispatchers: usize,
    slots: usize,
) -> anyhow::Result<(Vec<f64>, u64)> {
    // The slots are those of clients with four each, as a farm's are: a claim names
    // the next client in turn.
    let clients: Vec<ClaimingClient> = (0..slots.div_ceil(SLOTS_A_CLIENT))
        .map(|idx| ClaimingClient {
            id: format!("bench-{dispatcher}-{idx}"),
            include: vec!["*".into()],
            slots: Some(SLOTS_A_CLIENT as u32),
            version: None,
            address: Some("127.0.0.1".into()),
        })
        .collect();
    let mut n_claims = 0;
    let mut busy = tokio::task::JoinSet::new();
    let mut cycle_ms = Vec::new();
    let mut lost = 0;
    loop {
        let free = slots - busy.len();
        let mut raced = false;
        if free > 0 {
            let started = Instant::now();
            // As a dispatch round reads: at least a page, and twice the free slots of
            // every dispatcher.
            let page = (2 * free * n_dispatchers).max(64) as u32;
            let candidates = store.queued_candidates(page).await?;
            if candidates.is_empty() && busy.is_empty() {
                return Ok((cycle_ms, lost));
            }
            let share: Vec<_> = candidates
                .iter()
                .skip(dispatcher % n_dispatchers)
                .step_by(n_dispatchers)
                .take(free)
                .collect();
            // The queue's tail, shorter than the dispatchers: any job of it.
            let picked = if share.is_empty() {
                candidates.iter().take(free).collect()
            } else {
                share
            };
            let mut claims = tokio::task::JoinSet::new();
            for candidate in picked {
                let client = clients[n_claims % clients.len()].clone();
                n_claims += 1;
                let store = store.clone();
                let (build, job) = (candidate.build.clone(), candidate.job.clone());
                claims.spawn(async move {
                    let now = kiln_common::now_micros();
                    store
                        .claim(&build, &job, &client, now + 60_000_000, now)
                        .await
                });
            }
            while let Some(claimed) = claims.join_next().await {
                match claimed?? {
                    Some(claimed) => {
                        let store = store.clone();
                        busy.spawn(async move {
                            image_and_finish(&*store, &claimed).await?;
                            anyhow::Ok(started.elapsed().as_secs_f64() * 1000.0)
                        });
                    }
                    None => {
                        lost += 1;
                        raced = true;
                    }
                }
            }
        }
        // A lost race is a new round at once, as the server's dispatcher wakes itself;
        // otherwise the next round waits for a free slot.
        if raced && busy.len() < slots {
            continue;
        }
        // Every slot freed meanwhile goes into the next round, as every client that
        // came back while a round ran waits for the next.
        if let Some(done) = busy.join_next().await {
            cycle_ms.push(done??);
        }
        while let Some(done) = busy.try_join_next() {
            cycle_ms.push(done??);
        }
    }
}

async fn round(
    store: &Arc<dyn Store>,
    backend: &'static str,
    round_no: u32,
    n_jobs: u32,
    n_workers: u32,
    dispatchers: Option<u32>,
    webhook: bool,
) -> anyhow::Result<Round> {
    let number = format!("store-{}-{round_no}", std::process::id());
    let build = build_of(&number, n_jobs, webhook)?;
    let inserted = Instant::now();
    store.insert_build(&build).await?;
    let insert_secs = inserted.elapsed().as_secs_f64();
    let started = Instant::now();
    let workers: Vec<_> = match dispatchers {
        None => (0..n_workers as usize)
            .map(|worker| tokio::spawn(work(store.clone(), worker, n_workers as usize)))
            .collect(),
        Some(n_dispatchers) => {
            let n = n_dispatchers as usize;
            (0..n)
                .map(|idx| {
                    // The workers shared out as evenly as they go.
                    let slots = n_workers as usize / n + usize::from(idx < n_workers as usize % n);
                    tokio::spawn(dispatch(store.clone(), idx, n, slots))
                })
                .collect()
        }
    };
    let mut cycle_ms = Vec::new();
    let mut lost_races = 0;
    for worker in workers {
        let (times, lost) = worker.await??;
        cycle_ms.extend(times);
        lost_races += lost;
    }
    let secs = started.elapsed().as_secs_f64();
    let summary = store.build_summary(&number).await?;
    anyhow::ensure!(
        summary.n_finished == n_jobs,
        "round {round_no} on {backend}: {} of {n_jobs} jobs finished",
        summary.n_finished
    );
    cycle_ms.sort_by(|a, b| a.total_cmp(b));
    let due_read = if webhook {
        let started = Instant::now();
        let due = store
            .due_notifications(kiln_common::now_micros(), DUE_PAGE)
            .await?;
        Some((due.len(), started.elapsed().as_secs_f64() * 1000.0))
    } else {
        None
    };
    Ok(Round {
        backend,
        workers: n_workers,
        round: round_no,
        insert_secs,
        cycles: cycle_ms.len() as u64,
        lost_races,
        secs,
        cycle_ms,
        due_read,
    })
}

/// Runs, for each count of `workers` in turn, `rounds` rounds of `n_jobs` jobs on
/// SQLite (a new file) and, with `database`, on PostgreSQL, alternating; prints the
/// table. With `webhook`, every build has a webhook.
pub async fn store(
    n_jobs: u32,
    workers: &[u32],
    rounds: u32,
    dispatchers: Option<u32>,
    database: Option<&str>,
    webhook: bool,
) -> anyhow::Result<bool> {
    anyhow::ensure!(
        !workers.is_empty() && workers.iter().all(|&n| n >= 1),
        "--workers must be counts of at least 1"
    );
    if let Some(n) = dispatchers {
        anyhow::ensure!(
            n >= 1 && workers.iter().all(|&w| w >= n),
            "--dispatchers must be at least 1 and at most every count of --workers (each dispatcher needs a slot)"
        );
    }
    let temp = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let mut stores: Vec<(&'static str, Arc<dyn Store>)> = vec![(
        "SQLite",
        Arc::new(SqliteStore::open(&temp.path().join("kiln.db")).await?),
    )];
    if let Some(url) = database {
        stores.push(("PostgreSQL", Arc::new(PgStore::connect(url).await?)));
    }
    // A warm-up round on each, not counted.
    for (backend, store) in &stores {
        round(
            store,
            backend,
            0,
            n_jobs.min(500),
            workers[0],
            dispatchers,
            webhook,
        )
        .await?;
    }
    let mut results = Vec::new();
    let mut jobs_before = n_jobs.min(500);
    let mut befores = Vec::new();
    let mut round_no = 0;
    for &n_workers in workers {
        for _ in 0..rounds {
            round_no += 1;
            for (backend, store) in &stores {
                let result = round(
                    store,
                    backend,
                    round_no,
                    n_jobs,
                    n_workers,
                    dispatchers,
                    webhook,
                )
                .await?;
                eprintln!(
                    "store: {backend} round {round_no}, {n_workers} workers: {} cycles in {:.2} s",
                    result.cycles, result.secs
                );
                results.push(result);
                befores.push(jobs_before);
            }
            jobs_before += n_jobs;
        }
    }
    let counts: Vec<String> = workers.iter().map(u32::to_string).collect();
    println!(
        "store: claim-and-finish cycles of {n_jobs} jobs a round, {rounds} rounds of each backend alternating for each count of workers ({}){}",
        counts.join(", "),
        if webhook { "; each build has a webhook" } else { "" }
    );
    match dispatchers {
        Some(n) => println!(
            "The workers are the slots of {n} dispatchers, each claiming a round's jobs at once."
        ),
        None => println!(
            "Each worker reads the queue and claims for itself, as a dispatcher of its own."
        ),
    }
    let (due_head, due_rule) = if webhook {
        (" read of the due notices, all still pending |", "---|")
    } else {
        ("", "")
    };
    println!("| backend | workers | round | jobs in the store before | insert | cycles/s | cycle p50 | cycle p99 | lost races |{due_head}");
    println!("|---|---|---|---|---|---|---|---|---|{due_rule}");
    for (result, before) in results.iter().zip(befores) {
        let due = result
            .due_read
            .map(|(n, ms)| format!(" {ms:.2} ms ({n} read) |"))
            .unwrap_or_default();
        println!(
            "| {} | {} | {} | {before} | {:.2} s | {:.0} | {:.2} ms | {:.2} ms | {} |{due}",
            result.backend,
            result.workers,
            result.round,
            result.insert_secs,
            result.cycles as f64 / result.secs,
            super::percentile(&result.cycle_ms, 50.0),
            super::percentile(&result.cycle_ms, 99.0),
            result.lost_races
        );
    }
    Ok(true)
}
