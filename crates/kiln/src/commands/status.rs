//! `kiln status [BUILD] [--json]` and `kiln wait BUILD [--timeout SECS]`.

use crate::cli::{StatusArgs, WaitArgs};
use crate::operator::{Operator, Usage};
use kiln_proto::api::{BuildSummary, JobStatus};
use kiln_proto::state::JobState;
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let operator = Operator::new(&args.server)?;
    match &args.build {
        None => {
            let builds: Vec<BuildSummary> = operator.get_json("/v1/builds").await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&builds)?);
            } else {
                print!("{}", builds_table(&builds));
            }
        }
        Some(build) => {
            let jobs: Vec<JobStatus> = operator
                .get_json(&format!("/v1/builds/{build}/jobs"))
                .await?;
            if args.json {
                let jobs: Vec<serde_json::Value> = jobs.iter().map(job_json).collect();
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                print!("{}", jobs_table(&jobs));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The fields `kiln status BUILD --json` promises, and no others.
fn job_json(job: &JobStatus) -> serde_json::Value {
    serde_json::json!({
        "id": job.id,
        "title": job.title,
        "config_type": job.config_type,
        "state": job.state,
        "client_id": job.client_id,
        "time_start": job.time_start,
        "time_complete": job.time_complete,
        "major_state": job.major_state,
        "minor_state": job.minor_state,
        "percent": job.percent,
        "eta_seconds": job.eta_seconds,
        "attempt": job.attempt,
        "error": job.error,
    })
}

/// Lays out rows under a header, each column as wide as its widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (idx, cell) in row.iter().enumerate() {
            widths[idx] = widths[idx].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(idx, cell)| format!("{cell:<width$}", width = widths[idx]))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn builds_table(builds: &[BuildSummary]) -> String {
    let rows: Vec<Vec<String>> = builds
        .iter()
        .map(|b| {
            vec![
                b.number.clone(),
                b.title.clone(),
                b.n_jobs.to_string(),
                b.n_queued.to_string(),
                b.n_running.to_string(),
                b.n_finished.to_string(),
                (b.n_failed + b.n_expired + b.n_cancelled).to_string(),
            ]
        })
        .collect();
    table(
        &[
            "BUILD", "TITLE", "JOBS", "QUEUED", "RUNNING", "FINISHED", "FAILED",
        ],
        &rows,
    )
}

fn format_eta(eta: Option<u64>) -> String {
    match eta {
        None => "-".into(),
        Some(secs) if secs >= 3600 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        Some(secs) if secs >= 60 => format!("{}m{:02}s", secs / 60, secs % 60),
        Some(secs) => format!("{secs}s"),
    }
}

fn jobs_table(jobs: &[JobStatus]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.config_type.clone(),
                j.state.to_string(),
                j.client_id.clone().unwrap_or_else(|| "-".into()),
                j.major_state.clone().unwrap_or_else(|| "-".into()),
                j.minor_state.clone().unwrap_or_else(|| "-".into()),
                j.percent.map_or("-".into(), |p| format!("{p}%")),
                format_eta(j.eta_seconds),
            ]
        })
        .collect();
    table(
        &[
            "ID", "CONFIG", "STATE", "CLIENT", "MAJOR", "MINOR", "PERCENT", "ETA",
        ],
        &rows,
    )
}

pub async fn wait(args: WaitArgs) -> anyhow::Result<ExitCode> {
    let operator = Operator::new(&args.server)?;
    let timeout = args.timeout.map(Duration::from_secs);
    wait_for_build(&operator, &args.build, timeout).await
}

/// Shows progress until every job of `build` ended: exit 0 if all finished, 1 if any
/// failed, expired or was cancelled. Used by `kiln demo` too.
pub async fn wait_for_build(
    operator: &Operator,
    build: &str,
    timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
    let started = tokio::time::Instant::now();
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
    let interactive = !multi.is_hidden();
    let style = ProgressStyle::with_template("{prefix:<16} [{bar:30}] {pos:>3}% {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut last_state: HashMap<String, JobState> = HashMap::new();
    loop {
        let jobs: Vec<JobStatus> = operator
            .get_json(&format!("/v1/builds/{build}/jobs"))
            .await?;
        for job in &jobs {
            let mut words = vec![format!("{:<9}", job.state.as_str())];
            if let Some(client) = &job.client_id {
                words.push(format!("on {client}"));
            }
            let phase: Vec<&str> = [job.major_state.as_deref(), job.minor_state.as_deref()]
                .into_iter()
                .flatten()
                .collect();
            if !phase.is_empty() {
                words.push(phase.join("/"));
            }
            if let Some(eta) = job.eta_seconds {
                words.push(format!("eta {}", format_eta(Some(eta))));
            }
            let message = words.join(" ");
            let percent = if job.state == JobState::Finished {
                100
            } else {
                u64::from(job.percent.unwrap_or(0))
            };
            if interactive {
                let bar = bars.entry(job.id.clone()).or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(100));
                    bar.set_style(style.clone());
                    bar.set_prefix(job.id.clone());
                    bar
                });
                bar.set_position(percent);
                bar.set_message(message);
            } else if last_state.get(&job.id) != Some(&job.state) {
                eprintln!("{}/{}: {}", build, job.id, message.trim_end());
            }
            last_state.insert(job.id.clone(), job.state);
        }
        if jobs.iter().all(|job| job.state.is_final()) {
            for bar in bars.values() {
                bar.finish();
            }
            let bad: Vec<&JobStatus> = jobs
                .iter()
                .filter(|job| job.state != JobState::Finished)
                .collect();
            if bad.is_empty() {
                eprintln!("build {build}: all {} jobs finished", jobs.len());
                return Ok(ExitCode::SUCCESS);
            }
            for job in &bad {
                eprintln!(
                    "build {build}: job {} {}: {}",
                    job.id,
                    job.state,
                    job.error
                        .as_deref()
                        .unwrap_or("-")
                        .lines()
                        .next()
                        .unwrap_or("-")
                );
            }
            eprintln!(
                "build {build}: {} of {} jobs did not finish",
                bad.len(),
                jobs.len()
            );
            return Ok(ExitCode::from(1));
        }
        if let Some(timeout) = timeout {
            if started.elapsed() >= timeout {
                return Err(Usage(format!(
                    "build {build} did not end within {} s",
                    timeout.as_secs()
                ))
                .into());
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_human() {
        assert_eq!(format_eta(None), "-");
        assert_eq!(format_eta(Some(42)), "42s");
        assert_eq!(format_eta(Some(125)), "2m05s");
        assert_eq!(format_eta(Some(3725)), "1h02m");
    }

    #[test]
    fn table_aligns_columns() {
        let text = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(text, "A    BB\nxyz  1\n");
    }
}
