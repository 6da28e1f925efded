//! `kiln bench`: the numbers DESIGN.md holds kiln to, measured on this machine.
//!
//! - `dispatch`: a real server process and N idle clients long-polling it over HTTP
//!   (in this process, one task each, speaking the client API); jobs are submitted one
//!   at a time and the time from a job's availability to its claim is read from the
//!   server's event log (microsecond timestamps).
//! - `makespan`: a real server and N real `kiln client` processes run a build of
//!   sleep jobs; the makespan (first job available → last job finished, from the event
//!   log) is compared with the ideal, total work / clients.

use super::farm::Farm;
use crate::cli::{BenchArgs, BenchWhich};
use crate::operator::Operator;
use kiln_client::conn::ServerConn;
use kiln_proto::api::{ClaimRequest, Event, Fail};
use kiln_proto::state::JobState;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.which {
        BenchWhich::Dispatch { clients, jobs } => dispatch(clients, jobs).await,
        BenchWhich::Makespan {
            clients,
            jobs,
            job_secs,
        } => makespan(clients, jobs, job_secs).await,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn write_build(
    dir: &Path,
    number: &str,
    n_jobs: u32,
    install: &str,
    image: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("install.sh"), install)?;
    std::fs::write(dir.join("image.sh"), image)?;
    let mut xml = format!("<SERVER>\n  <BUILDNUMBER>{number}</BUILDNUMBER>\n  <TITLE>bench {number}</TITLE>\n  <JOBS>\n");
    for idx in 0..n_jobs {
        xml.push_str(&format!(
            "    <JOB ID=\"j{idx:03}\">\n      <CONFIGTYPE>BENCH</CONFIGTYPE>\n      <INSTALLSCRIPT>install.sh</INSTALLSCRIPT>\n      <IMAGESCRIPT>image.sh</IMAGESCRIPT>\n      <TIMEOUT>600</TIMEOUT>\n    </JOB>\n"
        ));
    }
    xml.push_str("  </JOBS>\n</SERVER>\n");
    std::fs::write(dir.join("relbuild.xml"), xml)?;
    Ok(())
}

async fn dispatch(n_clients: u32, n_jobs: u32) -> anyhow::Result<ExitCode> {
    let temp = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let farm = Farm::start(temp.path(), &[]).await?;
    let operator = Operator::with_token(&farm.url, Some(farm.admin_token()?))?;
    let client_token = farm.client_token()?;
    let mut pollers = Vec::new();
    for idx in 0..n_clients {
        let conn = ServerConn::new(&farm.url, &client_token).map_err(anyhow::Error::msg)?;
        pollers.push(tokio::spawn(async move {
            let request = ClaimRequest {
                client_id: format!("idle-{idx}"),
                include: vec!["*".into()],
                wait_secs: 60,
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
        super::submit::submit(&operator, &build_dir.join("relbuild.xml"), &build_dir).await?;
        let claimed = loop {
            let events: Vec<Event> = operator
                .get_json(&format!("/v1/builds/{number}/events"))
                .await?;
            let queued = events
                .iter()
                .find(|e| e.to == JobState::Queued)
                .map(|e| e.time);
            let running = events
                .iter()
                .find(|e| e.to == JobState::Running)
                .map(|e| e.time);
            if let (Some(queued), Some(running)) = (queued, running) {
                break (running - queued) as f64 / 1000.0;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
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
    println!("dispatch latency, job available -> claimed, {n_clients} idle long-polling clients, {n_jobs} jobs");
    println!("| p50 | p90 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        percentile(&latencies_ms, 50.0),
        percentile(&latencies_ms, 90.0),
        percentile(&latencies_ms, 99.0),
        latencies_ms.last().copied().unwrap_or(f64::NAN)
    );
    Ok(ExitCode::SUCCESS)
}

async fn makespan(n_clients: u32, n_jobs: u32, job_secs: f64) -> anyhow::Result<ExitCode> {
    let temp = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let mut farm = Farm::start(temp.path(), &[]).await?;
    for idx in 0..n_clients {
        farm.add_client(&format!("bench-{idx}"), "*", 1)?;
    }
    let operator = Operator::with_token(&farm.url, Some(farm.admin_token()?))?;
    // Warm-up: one job per client, so that every client is started and polling.
    let warm_dir = temp.path().join("warm");
    write_build(
        &warm_dir,
        "warmup",
        n_clients,
        "true\n",
        "echo x > \"$KILN_OUTPUT/image.bin\"\n",
    )?;
    super::submit::submit(&operator, &warm_dir.join("relbuild.xml"), &warm_dir).await?;
    super::status::wait_for_build(&operator, "warmup", Some(Duration::from_secs(120))).await?;
    let build_dir = temp.path().join("build");
    write_build(
        &build_dir,
        "makespan",
        n_jobs,
        &format!("sleep {job_secs}\n"),
        "echo \"$KILN_JOB_ID\" > \"$KILN_OUTPUT/image.bin\"\n",
    )?;
    super::submit::submit(&operator, &build_dir.join("relbuild.xml"), &build_dir).await?;
    let code =
        super::status::wait_for_build(&operator, "makespan", Some(Duration::from_secs(3600)))
            .await?;
    let events: Vec<Event> = operator.get_json("/v1/builds/makespan/events").await?;
    farm.stop().await;
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
    let makespan_secs = (last - first) as f64 / 1e6;
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
    Ok(code)
}
