//! `kiln bench tabs`: what open dashboard tabs cost the server. The makespan build of
//! `kiln bench makespan` (42 sleep jobs on 6 real clients by default) runs with no tab
//! open and with N tabs, alternating, on a fresh farm each time, and each run reports
//! its makespan against the ideal and the server's CPU time over the build.
//!
//! A tab here is what a browser showing the build's page does to the server: it logs
//! in with the admin token (`POST /ui/login`), asks for its session (`GET
//! /ui/session`), then holds the build's event stream (`GET
//! /v1/builds/{b}/stream`) and reads every message, reconnecting with
//! `Last-Event-ID` when a stream ends, as `EventSource` does. The page draws what the
//! stream sends and asks nothing more while it follows, so the server sees the same
//! requests it sees from Chromium; the browser's own drawing is not part of the
//! server's cost.

use super::throughput::process_use;
use super::write_build;
use anyhow::Context;
use kiln_proto::api::Event;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One run's figures.
struct Run {
    tabs: u32,
    makespan_secs: f64,
    ideal_secs: f64,
    server_cpu_secs: f64,
    messages: u64,
    all_finished: bool,
}

/// Runs the makespan build `rounds` times with no tab and `rounds` times with `tabs`
/// tabs, alternating, and prints a row per run and the medians.
pub async fn run(
    n_clients: u32,
    n_jobs: u32,
    job_secs: f64,
    tabs: u32,
    rounds: u32,
) -> anyhow::Result<bool> {
    let mut runs = Vec::new();
    for round in 0..rounds {
        for open in [0, tabs] {
            let run = one_run(n_clients, n_jobs, job_secs, open, round).await?;
            eprintln!(
                "round {round}: {open} tabs: makespan {:.2} s, server CPU {:.2} s",
                run.makespan_secs, run.server_cpu_secs
            );
            runs.push(run);
        }
    }
    println!(
        "makespan of {n_jobs} jobs of `sleep {job_secs}` on {n_clients} clients, with 0 and \
         {tabs} dashboard tabs on the build's page, alternating"
    );
    println!(
        "| tabs | makespan | ideal | over ideal | server CPU over the build | stream messages |"
    );
    println!("|---|---|---|---|---|---|");
    for run in &runs {
        println!(
            "| {} | {:.2} s | {:.2} s | {:+.1} % | {:.2} s | {} |",
            run.tabs,
            run.makespan_secs,
            run.ideal_secs,
            (run.makespan_secs / run.ideal_secs - 1.0) * 100.0,
            run.server_cpu_secs,
            run.messages
        );
    }
    for open in [0, tabs] {
        let mut cpu: Vec<f64> = runs
            .iter()
            .filter(|run| run.tabs == open)
            .map(|run| run.server_cpu_secs)
            .collect();
        let mut over: Vec<f64> = runs
            .iter()
            .filter(|run| run.tabs == open)
            .map(|run| (run.makespan_secs / run.ideal_secs - 1.0) * 100.0)
            .collect();
        cpu.sort_by(f64::total_cmp);
        over.sort_by(f64::total_cmp);
        println!(
            "median with {open} tabs: server CPU {:.2} s, makespan {:+.1} % over ideal",
            super::percentile(&cpu, 50.0),
            super::percentile(&over, 50.0)
        );
    }
    Ok(runs.iter().all(|run| run.all_finished))
}

async fn one_run(
    n_clients: u32,
    n_jobs: u32,
    job_secs: f64,
    tabs: u32,
    round: u32,
) -> anyhow::Result<Run> {
    let temp = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    let (farm, operator) = super::warm_farm(temp.path(), n_clients).await?;
    let admin_token = farm.admin_token()?;
    let number = format!("tabs-{round}-{tabs}");
    let build_dir = temp.path().join("build");
    write_build(
        &build_dir,
        &number,
        n_jobs,
        &format!("sleep {job_secs}\n"),
        "echo \"$KILN_JOB_ID\" > \"$KILN_OUTPUT/image.bin\"\n",
    )?;
    let pid = farm.server_pid().context("the server is not running")?;
    let before = process_use(pid)?;
    operator
        .submit(&build_dir.join("relbuild.xml"), &build_dir)
        .await?;
    let messages = Arc::new(AtomicU64::new(0));
    let mut open = tokio::task::JoinSet::new();
    for _ in 0..tabs {
        let url = farm.url.clone();
        let token = admin_token.clone();
        let build = number.clone();
        let messages = messages.clone();
        open.spawn(async move {
            if let Err(err) = tab(&url, &token, &build, &messages).await {
                eprintln!("a tab stopped: {err:#}");
            }
        });
    }
    let all_finished = operator
        .wait_for_build(&number, Some(Duration::from_secs(3600)))
        .await?;
    let after = process_use(pid)?;
    open.abort_all();
    let events: Vec<Event> = operator.events(&number).await?;
    farm.stop().await;
    Ok(Run {
        tabs,
        makespan_secs: super::makespan_secs(&events),
        ideal_secs: f64::from(n_jobs.div_ceil(n_clients)) * job_secs,
        server_cpu_secs: after.cpu_secs - before.cpu_secs,
        messages: messages.load(Ordering::Relaxed),
        all_finished,
    })
}

/// One tab on the build's page: logs in, then follows the build's stream until
/// aborted, counting the messages it reads.
async fn tab(url: &str, token: &str, build: &str, messages: &AtomicU64) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().build()?;
    let login = http
        .post(format!("{url}/ui/login"))
        .json(&serde_json::json!({ "token": token }))
        .send()
        .await?
        .error_for_status()?;
    let cookie = login
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .context("the login set no cookie")?
        .to_owned();
    http.get(format!("{url}/ui/session"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await?
        .error_for_status()?;
    let mut last_id: Option<String> = None;
    loop {
        let mut request = http
            .get(format!("{url}/v1/builds/{build}/stream"))
            .header(reqwest::header::COOKIE, &cookie)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let mut response = request.send().await?.error_for_status()?;
        let mut pending = String::new();
        while let Some(chunk) = response.chunk().await? {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            // A message ends with a blank line.
            while let Some(end) = pending.find("\n\n") {
                let message: String = pending.drain(..end + 2).collect();
                if let Some(id) = message.lines().find_map(|line| line.strip_prefix("id:")) {
                    last_id = Some(id.trim().to_owned());
                }
                if message.lines().any(|line| line.starts_with("data:")) {
                    messages.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // The stream ended (its `wait` ran out): reconnect as a browser does.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
