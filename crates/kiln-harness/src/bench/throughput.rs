//! `kiln bench throughput`: a build of N trivial jobs through a real server process and
//! real `kiln client` processes, and what the build cost the server: jobs per second
//! end to end, the server's CPU time per job and its peak resident memory.
//!
//! The jobs do as little as a job can (install `true`, an image of a few bytes), so
//! what is measured is the farm's own cost per job: submit, dispatch, claim,
//! heartbeat-free short runs, the image's upload and commit, finish and events.

use super::{write_build, write_build_notifying};
use crate::farm::Farm;
use anyhow::Context;
use kiln_api::Operator;
use kiln_proto::api::Event;
use kiln_proto::state::JobState;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The image step of every job: a few bytes.
const IMAGE_SCRIPT: &str = "echo \"$KILN_JOB_ID\" > \"$KILN_OUTPUT/image.bin\"\n";

/// What the server process has used so far.
pub(crate) struct ProcessUse {
    /// User and system CPU time, in seconds.
    pub(crate) cpu_secs: f64,
    /// Peak resident memory (`VmHWM`), in MiB.
    peak_rss_mib: f64,
}

pub(crate) fn process_use(pid: u32) -> anyhow::Result<ProcessUse> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) start with the state
    // (field 3); utime and stime are fields 14 and 15.
    let after_name = stat
        .rfind(')')
        .map(|end| &stat[end + 1..])
        .context("no command name in /proc/PID/stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |idx: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(idx)
            .context("a short /proc/PID/stat")?
            .parse::<u64>()? as f64)
    };
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_secs = (ticks(11)? + ticks(12)?) / ticks_per_sec;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(ProcessUse {
        cpu_secs,
        peak_rss_mib: peak_kib / 1024.0,
    })
}

/// Runs `n_jobs` trivial jobs on `n_clients` clients of `slots` slots each, the state in
/// SQLite under the server's data directory or in the PostgreSQL `database`. With
/// `replicas` (2 or more) the farm is that many servers on `database` (or a PostgreSQL
/// started here) sharing a SeaweedFS started here; each client is given every
/// replica's URL, starting with one of its own, and the CPU is every replica's. With
/// `webhook_down`, the build has a webhook on a loopback port where nothing listens.
pub async fn throughput(
    n_jobs: u32,
    n_clients: u32,
    slots: u32,
    database: Option<&str>,
    replicas: u32,
    webhook_down: bool,
) -> anyhow::Result<bool> {
    let temp = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let mut server_args = vec!["--max-jobs-per-build", "100000"];
    let (mut farm, stores) = if replicas >= 2 {
        let (farm, stores) =
            Farm::start_replicas_on_shared_stores(temp.path(), replicas, database, &server_args)
                .await?;
        (farm, Some(stores))
    } else {
        if let Some(database) = database {
            server_args.extend(["--database", database]);
        }
        (Farm::start(temp.path(), &server_args).await?, None)
    };
    let operator = Operator::with_token(&farm.url, Some(&farm.admin_token()?))?;
    // Build numbers and client ids unique to this run, for a database that outlives
    // it (a client id enrolled by an earlier run is another client's).
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    for idx in 0..n_clients {
        farm.add_client(&format!("tp-{run}-{idx}"), "*", slots)?;
    }

    // Warm-up: a job per slot, so that every client is started and polling.
    let warm = format!("tp-warm-{run}");
    let warm_dir = temp.path().join("warm");
    write_build(&warm_dir, &warm, n_clients * slots, "true\n", IMAGE_SCRIPT)?;
    operator
        .submit(&warm_dir.join("relbuild.xml"), &warm_dir)
        .await?;
    operator
        .wait_for_build(&warm, Some(Duration::from_secs(300)))
        .await?;

    let pids = farm.server_pids();
    anyhow::ensure!(pids.len() == farm.n_servers(), "a server is not running");
    let use_of = |pids: &[u32]| -> anyhow::Result<(f64, f64)> {
        let mut cpu_secs = 0.0;
        let mut peak_rss_mib: f64 = 0.0;
        for pid in pids {
            let used = process_use(*pid)?;
            cpu_secs += used.cpu_secs;
            peak_rss_mib = peak_rss_mib.max(used.peak_rss_mib);
        }
        Ok((cpu_secs, peak_rss_mib))
    };
    let (cpu_before, _) = use_of(&pids)?;
    let number = format!("tp-{run}");
    let build_dir = temp.path().join("build");
    let webhook = if webhook_down {
        // A port taken from the system and let go again: nothing listens there, so
        // every delivery is refused and retried later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Some(format!("http://127.0.0.1:{port}/build-done"))
    } else {
        None
    };
    write_build_notifying(
        &build_dir,
        &number,
        n_jobs,
        "true\n",
        IMAGE_SCRIPT,
        webhook.as_deref(),
    )?;
    operator
        .submit(&build_dir.join("relbuild.xml"), &build_dir)
        .await?;
    // Watched by the build's summary (counts by state), not by listing its jobs: a
    // list of 10,000 jobs every few hundred milliseconds would be the server's largest
    // cost, and not the farm's.
    let all_finished = loop {
        let summary = operator.build(&number).await?;
        if summary.is_done() {
            break summary.n_finished == summary.n_jobs;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (cpu_after, peak_rss_mib) = use_of(&pids)?;
    let events: Vec<Event> = operator.events(&number).await?;
    if !all_finished {
        let jobs = operator.jobs(&number).await?;
        let unfinished: Vec<_> = jobs
            .iter()
            .filter(|job| job.state != JobState::Finished)
            .collect();
        eprintln!("{} jobs did not finish; the first:", unfinished.len());
        for job in unfinished.iter().take(5) {
            eprintln!(
                "  {} {} attempt {} on {:?}: {}",
                job.id,
                job.state,
                job.attempt,
                job.client_id,
                job.error.as_deref().unwrap_or("")
            );
        }
    }
    farm.stop().await;
    drop(stores);

    let secs = super::makespan_secs(&events);
    let cpu_ms_per_job = (cpu_after - cpu_before) * 1000.0 / f64::from(n_jobs);
    let store = if database.is_some() || replicas >= 2 {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let servers = if replicas >= 2 {
        format!("{replicas} replicas")
    } else {
        "one server".to_owned()
    };
    println!(
        "{n_jobs} trivial jobs on {n_clients} clients x {slots} slots, {servers}, state in {store}{}",
        if webhook_down {
            ", a webhook that is down"
        } else {
            ""
        }
    );
    println!("| jobs | jobs/s | server CPU per job (all servers) | server peak RSS (largest) | all finished |");
    println!("|---|---|---|---|---|");
    println!(
        "| {n_jobs} | {:.1} | {cpu_ms_per_job:.2} ms | {:.0} MiB | {all_finished} |",
        f64::from(n_jobs) / secs,
        peak_rss_mib
    );
    Ok(all_finished)
}
