//! `kiln bench`: the numbers DESIGN.md holds kiln to, measured on this machine. Each
//! bench prints its table on stdout and returns whether it ran to its end.
//!
//! - `dispatch`: a real server process and N idle clients long-polling it over HTTP
//!   (in this process, one task each, speaking the client API); jobs are submitted one
//!   at a time and the time from a job's availability to its claim is read from the
//!   server's event log (microsecond timestamps).
//! - `failover`, `reattach`: a client's failure (killed, hung, cut off) or the
//!   server's, and the time until the work goes on.
//! - `fleet`: see [`fleet`]; `transfer`: see [`transfer`]; `chaos`: see
//!   [`crate::chaos`].
//! - `throughput`: see [`throughput`]; `tabs`: see [`tabs`].
//! - `makespan`: a real server and N real `kiln client` processes run a build of
//!   sleep jobs; the makespan (first job available → last job finished, from the event
//!   log) is compared with the ideal, total work / clients.

use crate::farm::Farm;
use kiln_api::{Operator, ServerConn};
use kiln_proto::api::{ClaimRequest, Event, Fail};
use kiln_proto::state::JobState;
use std::path::Path;
use std::time::Duration;

pub mod fleet;
pub mod store;
pub mod tabs;
pub mod throughput;
pub mod transfer;

/// How a client fails in [`failover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverMode {
    /// SIGKILL: the process dies and its connections close.
    Kill,
    /// SIGSTOP: the process hangs with its connections open.
    Stop,
    /// The network between client and server stops passing bytes.
    Partition,
}

/// How many clients hold a session with the server of `operator` (its `/v1/health`).
pub async fn sessions_open(operator: &Operator) -> anyhow::Result<u64> {
    let health = operator.health().await?;
    Ok(health["clients_connected"].as_u64().unwrap_or(0))
}

/// The `p`th percentile of `sorted`, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Writes a build `number` of `n_jobs` jobs with these install and image scripts into
/// `dir`, as `dir/relbuild.xml`.
pub fn write_build(
    dir: &Path,
    number: &str,
    n_jobs: u32,
    install: &str,
    image: &str,
) -> anyhow::Result<()> {
    write_build_notifying(dir, number, n_jobs, install, image, None)
}

/// As [`write_build`], the build with a webhook at `notify`.
pub fn write_build_notifying(
    dir: &Path,
    number: &str,
    n_jobs: u32,
    install: &str,
    image: &str,
    notify: Option<&str>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("install.sh"), install)?;
    std::fs::write(dir.join("image.sh"), image)?;
    let notify = notify
        .map(|url| format!("  <NOTIFY>{url}</NOTIFY>\n"))
        .unwrap_or_default();
    let mut xml = format!("<SERVER>\n  <BUILDNUMBER>{number}</BUILDNUMBER>\n  <TITLE>bench {number}</TITLE>\n{notify}  <JOBS>\n");
    for idx in 0..n_jobs {
        xml.push_str(&format!(
            "    <JOB ID=\"j{idx:03}\">\n      <CONFIGTYPE>BENCH</CONFIGTYPE>\n      <INSTALLSCRIPT>install.sh</INSTALLSCRIPT>\n      <IMAGESCRIPT>image.sh</IMAGESCRIPT>\n      <TIMEOUT>600</TIMEOUT>\n    </JOB>\n"
        ));
    }
    xml.push_str("  </JOBS>\n</SERVER>\n");
    std::fs::write(dir.join("relbuild.xml"), xml)?;
    Ok(())
}

/// Waits for the first job of build `number` to be claimed; returns the time from its
/// queueing to its claim, from the server's event log, in milliseconds.
pub async fn claim_latency_ms(operator: &Operator, number: &str) -> anyhow::Result<f64> {
    loop {
        let events: Vec<Event> = operator.events(number).await?;
        let queued = events
            .iter()
            .find(|e| e.to == JobState::Queued)
            .map(|e| e.time);
        let running = events
            .iter()
            .find(|e| e.to == JobState::Running)
            .map(|e| e.time);
        if let (Some(queued), Some(running)) = (queued, running) {
            return Ok((running - queued) as f64 / 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Dispatch latency with `n_clients` idle long-polling clients, over `n_jobs` jobs.
pub async fn dispatch(
    n_clients: u32,
    n_jobs: u32,
    database: Option<&str>,
    n_servers: u32,
    wait_elsewhere: bool,
) -> anyhow::Result<bool> {
    anyhow::ensure!(
        n_servers >= 1 && (n_servers == 1 || database.is_some()),
        "--servers {n_servers}: servers share a farm only through --database"
    );
    anyhow::ensure!(
        !wait_elsewhere || n_servers > 1,
        "--wait-elsewhere needs --servers 2 or more"
    );
    let temp = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    // Several servers are replicas: one database, one image store (a SeaweedFS started
    // here; a database belongs to one image store), one client credential.
    let (farm, _stores, urls, client_token) = if n_servers > 1 {
        let (farm, stores) =
            Farm::start_replicas_on_shared_stores(temp.path(), n_servers, database, &[]).await?;
        let urls: Vec<String> = (0..n_servers as usize)
            .map(|idx| farm.server_url(idx).to_owned())
            .collect();
        let client_token = farm.client_token()?;
        (farm, Some(stores), urls, client_token)
    } else {
        let mut server_args = vec![];
        if let Some(url) = database {
            server_args.extend(["--database", url]);
        }
        let farm = Farm::start(&temp.path().join("server-0"), &server_args).await?;
        let urls = vec![farm.url.clone()];
        let client_token = farm.client_token()?;
        (farm, None, urls, client_token)
    };
    // Jobs are submitted to the first server.
    let operator = Operator::with_token(&urls[0], Some(&farm.admin_token()?))?;
    let mut pollers = Vec::new();
    for idx in 0..n_clients {
        let waits_on = match wait_elsewhere {
            true => 1 + idx as usize % (urls.len() - 1),
            false => idx as usize % urls.len(),
        };
        let url = &urls[waits_on];
        let conn = ServerConn::new(url, &client_token)?;
        pollers.push(tokio::spawn(async move {
            let request = ClaimRequest {
                client_id: format!("idle-{idx}"),
                include: vec!["*".into()],
                wait_secs: 60,
                slots: Some(1),
                version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            };
            loop {
                match conn.claim(&request).await {
                    Ok(Some(claim)) => {
                        let report = Fail {
                            reason: "bench".into(),
                            message: "dispatch benchmark".into(),
                            exit_status: None,
                        };
                        let _ = conn.fail(&claim, &report).await;
                    }
                    Ok(None) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
    }
    // Let every poller reach its long poll, and warm the server up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let build_dir = temp.path().join("build");
    let mut latencies_ms = Vec::with_capacity(n_jobs as usize);
    for idx in 0..(n_jobs + 10) {
        let number = format!("d{idx}");
        write_build(&build_dir, &number, 1, "true\n", "true\n")?;
        operator
            .submit(&build_dir.join("relbuild.xml"), &build_dir)
            .await?;
        let claimed = claim_latency_ms(&operator, &number).await?;
        // The first few are warm-up.
        if idx >= 10 {
            latencies_ms.push(claimed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for poller in pollers {
        poller.abort();
    }
    farm.stop().await;
    latencies_ms.sort_by(|a, b| a.total_cmp(b));
    let store = match database {
        Some(_) if wait_elsewhere => format!(
            "PostgreSQL, {n_servers} servers on it, jobs submitted to the first, clients waiting on the others"
        ),
        Some(_) => format!("PostgreSQL, {n_servers} server(s) on it, jobs submitted to the first"),
        None => "SQLite".to_owned(),
    };
    println!("dispatch latency, job available -> claimed, {n_clients} idle long-polling clients spread over the servers, {n_jobs} jobs; {store}");
    println!("| p50 | p90 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        percentile(&latencies_ms, 50.0),
        percentile(&latencies_ms, 90.0),
        percentile(&latencies_ms, 99.0),
        latencies_ms.last().copied().unwrap_or(f64::NAN)
    );
    Ok(true)
}

/// A farm of `n_clients` real clients (one slot each) in `dir`, warmed up with one job
/// per client so that every client is started and polling; and its admin.
async fn warm_farm(dir: &Path, n_clients: u32) -> anyhow::Result<(Farm, Operator)> {
    let mut farm = Farm::start(dir, &[]).await?;
    for idx in 0..n_clients {
        farm.add_client(&format!("bench-{idx}"), "*", 1)?;
    }
    let operator = Operator::with_token(&farm.url, Some(&farm.admin_token()?))?;
    let warm_dir = dir.join("warm");
    write_build(
        &warm_dir,
        "warmup",
        n_clients,
        "true\n",
        "echo x > \"$KILN_OUTPUT/image.bin\"\n",
    )?;
    operator
        .submit(&warm_dir.join("relbuild.xml"), &warm_dir)
        .await?;
    operator
        .wait_for_build("warmup", Some(Duration::from_secs(120)))
        .await?;
    Ok((farm, operator))
}

/// A build's makespan from its events: the first job queued to the last finished, in
/// seconds.
fn makespan_secs(events: &[Event]) -> f64 {
    let first = events
        .iter()
        .filter(|e| e.to == JobState::Queued)
        .map(|e| e.time)
        .min()
        .unwrap_or_default();
    let last = events
        .iter()
        .filter(|e| e.to == JobState::Finished)
        .map(|e| e.time)
        .max()
        .unwrap_or_default();
    (last - first) as f64 / 1e6
}

/// The makespan of `n_jobs` jobs of `job_secs` on `n_clients` clients; returns whether
/// every job finished.
pub async fn makespan(n_clients: u32, n_jobs: u32, job_secs: f64) -> anyhow::Result<bool> {
    let temp = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let (farm, operator) = warm_farm(temp.path(), n_clients).await?;
    let build_dir = temp.path().join("build");
    write_build(
        &build_dir,
        "makespan",
        n_jobs,
        &format!("sleep {job_secs}\n"),
        "echo \"$KILN_JOB_ID\" > \"$KILN_OUTPUT/image.bin\"\n",
    )?;
    operator
        .submit(&build_dir.join("relbuild.xml"), &build_dir)
        .await?;
    let all_finished = operator
        .wait_for_build("makespan", Some(Duration::from_secs(3600)))
        .await?;
    let events: Vec<Event> = operator.events("makespan").await?;
    farm.stop().await;
    let makespan_secs = makespan_secs(&events);
    let rounds = n_jobs.div_ceil(n_clients);
    let ideal_secs = f64::from(rounds) * job_secs;
    let per_job_overhead_ms = (makespan_secs - ideal_secs) / f64::from(rounds) * 1000.0;
    println!(
        "makespan of {n_jobs} jobs of `sleep {job_secs}` on {n_clients} clients (1 slot each)"
    );
    println!("| makespan | ideal | ratio | overhead per job |");
    println!("|---|---|---|---|");
    println!(
        "| {makespan_secs:.2} s | {ideal_secs:.2} s | {:.3} ({:+.1} %) | {per_job_overhead_ms:.0} ms |",
        makespan_secs / ideal_secs,
        (makespan_secs / ideal_secs - 1.0) * 100.0
    );
    Ok(all_finished)
}

async fn job_events(operator: &Operator, build: &str) -> anyhow::Result<Vec<Event>> {
    Ok(operator.events(build).await?)
}

/// Waits until `check` holds for the build's events, polling every few milliseconds.
async fn wait_for_events(
    operator: &Operator,
    build: &str,
    timeout: Duration,
    check: impl Fn(&[Event]) -> bool,
) -> anyhow::Result<Vec<Event>> {
    let give_up = tokio::time::Instant::now() + timeout;
    loop {
        let events = job_events(operator, build).await?;
        if check(&events) {
            return Ok(events);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < give_up,
            "build {build}: the awaited event did not come within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The time from a client's failure (`mode`) to its job running on another client,
/// over `n_trials` trials.
pub async fn failover(
    mode: FailoverMode,
    n_trials: u32,
    lease_secs: u64,
    heartbeat_secs: u64,
) -> anyhow::Result<bool> {
    let temp = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let lease = lease_secs.to_string();
    let heartbeat = heartbeat_secs.to_string();
    let mut farm = Farm::start(
        temp.path(),
        &["--lease-secs", &lease, "--heartbeat-secs", &heartbeat],
    )
    .await?;
    let operator = Operator::with_token(&farm.url, Some(&farm.admin_token()?))?;
    let build_dir = temp.path().join("build");
    let mut latencies = Vec::new();
    for trial in 0..n_trials {
        let number = format!("f{trial}");
        write_build(
            &build_dir,
            &number,
            1,
            "sleep 600\n",
            "echo x > \"$KILN_OUTPUT/image.bin\"\n",
        )?;
        // The failing client starts alone, so that it is the one that takes the job.
        let proxy = crate::proxy::TcpProxy::start(&farm.url);
        let victim_url = if mode == FailoverMode::Partition {
            proxy.url.clone()
        } else {
            farm.url.clone()
        };
        let victim = farm.add_client_via(&format!("victim-{trial}"), "*", 1, &victim_url)?;
        operator
            .submit(&build_dir.join("relbuild.xml"), &build_dir)
            .await?;
        wait_for_events(&operator, &number, Duration::from_secs(60), |events| {
            events.iter().any(|e| e.to == JobState::Running)
        })
        .await?;
        let rescuer_id = format!("rescuer-{trial}");
        let rescuer = farm.add_client(&rescuer_id, "*", 1)?;
        // Let the rescuer reach its long poll before the failure.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let failed_at = kiln_common::now_micros();
        match mode {
            FailoverMode::Kill => farm.signal_client(victim, libc::SIGKILL),
            FailoverMode::Stop => farm.signal_client(victim, libc::SIGSTOP),
            FailoverMode::Partition => proxy.cut(),
        }
        let events = wait_for_events(
            &operator,
            &number,
            Duration::from_secs(lease_secs * 4 + 30),
            |events| {
                events.iter().any(|e| {
                    e.to == JobState::Running && e.client_id.as_deref() == Some(rescuer_id.as_str())
                })
            },
        )
        .await?;
        let running_again = events
            .iter()
            .find(|e| {
                e.to == JobState::Running && e.client_id.as_deref() == Some(rescuer_id.as_str())
            })
            .map(|e| e.time)
            .unwrap_or_default();
        latencies.push((running_again - failed_at) as f64 / 1e6);
        // Clean up: end the job, stop both clients.
        operator
            .job_action(&number, "j000", kiln_api::JobAction::Cancel)
            .await?;
        farm.kill_client(victim).await;
        farm.kill_client(rescuer).await;
        drop(proxy);
    }
    farm.stop().await;
    latencies.sort_by(|a, b| a.total_cmp(b));
    let what = match mode {
        FailoverMode::Kill => "SIGKILL",
        FailoverMode::Stop => "SIGSTOP (hung)",
        FailoverMode::Partition => "network partition",
    };
    println!("failover: client {what} -> its job running on another client; lease {lease_secs} s, heartbeat {heartbeat_secs} s, {n_trials} trials");
    println!("| p50 | p99 | min | max |");
    println!("|---|---|---|---|");
    println!(
        "| {:.2} s | {:.2} s | {:.2} s | {:.2} s |",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.first().copied().unwrap_or(f64::NAN),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    Ok(true)
}

/// Time for every client to hold a session again after the server holding them is
/// SIGKILLed: with one server, from its restart on the same address and data; with
/// `replicas` (2 or more, on a PostgreSQL and a SeaweedFS of their own), from the kill
/// of the replica every session is on, until every client holds its session with the
/// next one (the killed one is started again before the next trial).
pub async fn reattach(n_clients: u32, n_trials: u32, replicas: u32) -> anyhow::Result<bool> {
    let temp = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let (mut farm, stores) = if replicas >= 2 {
        let (farm, stores) =
            Farm::start_replicas_on_shared_stores(temp.path(), replicas, None, &[]).await?;
        (farm, Some(stores))
    } else {
        (Farm::start(temp.path(), &[]).await?, None)
    };
    // Every client is given the URLs in the same order, so every session starts on the
    // first server.
    let url = farm.url.clone();
    for idx in 0..n_clients {
        farm.add_client_via(&format!("c{idx}"), "*", 1, &url)?;
    }
    let admin = farm.admin_token()?;
    let operator = Operator::with_token(&farm.url, Some(&admin))?;
    let each: Vec<Operator> = (0..farm.n_servers())
        .map(|idx| Operator::with_token(farm.server_url(idx), Some(&admin)))
        .collect::<Result<_, _>>()?;
    let build_dir = temp.path().join("build");
    write_build(
        &build_dir,
        "reattach",
        n_clients,
        "sleep 600\n",
        "echo x > \"$KILN_OUTPUT/image.bin\"\n",
    )?;
    operator
        .submit(&build_dir.join("relbuild.xml"), &build_dir)
        .await?;
    let mut times = Vec::new();
    let mut holder = 0;
    for _ in 0..n_trials {
        // Every client is running its job and holds its session with `holder`.
        loop {
            let jobs = operator.jobs("reattach").await?;
            let running = jobs
                .iter()
                .filter(|job| job.state == JobState::Running)
                .count();
            if running == n_clients as usize
                && sessions_open(&each[holder]).await? == u64::from(n_clients)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Sessions settled, as a farm's are, not just opened.
        tokio::time::sleep(Duration::from_secs(1)).await;
        if stores.is_none() {
            farm.crash_and_restart_server().await?;
        } else {
            farm.kill_replica(holder).await;
        }
        let lost = tokio::time::Instant::now();
        let next = (holder + 1) % farm.n_servers();
        while sessions_open(&each[next]).await.unwrap_or(0) < u64::from(n_clients) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        times.push(lost.elapsed().as_secs_f64());
        if stores.is_some() {
            farm.restart_replica(holder).await?;
        }
        holder = next;
    }
    let events: Vec<Event> = job_events(&operator, "reattach").await?;
    let n_claims = events.iter().filter(|e| e.to == JobState::Running).count();
    farm.stop().await;
    drop(stores);
    times.sort_by(|a, b| a.total_cmp(b));
    if replicas >= 2 {
        println!("re-attach: the replica holding every session SIGKILLed ({replicas} replicas on PostgreSQL) with {n_clients} clients running jobs; {n_trials} trials, from the kill");
    } else {
        println!("re-attach: server SIGKILLed and restarted with {n_clients} clients running jobs; {n_trials} trials");
    }
    println!("| p50 | max | jobs started twice |");
    println!("|---|---|---|");
    println!(
        "| {:.2} s | {:.2} s | {} |",
        percentile(&times, 50.0),
        times.last().copied().unwrap_or(f64::NAN),
        n_claims.saturating_sub(n_clients as usize)
    );
    Ok(true)
}
