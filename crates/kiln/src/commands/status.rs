//! `kiln status [BUILD] [--json]` and `kiln wait BUILD [--timeout SECS]`.

use crate::cli::{StatusArgs, WaitArgs};
use crate::operator::operator;
use kiln_api::format_eta;
use kiln_proto::api::{BuildSummary, JobStatus};
use std::process::ExitCode;
use std::time::Duration;

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let operator = operator(&args.server)?;
    match &args.build {
        None => {
            let builds = operator.builds().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&builds)?);
            } else {
                print!("{}", builds_table(&builds));
            }
        }
        Some(build) => {
            let jobs = operator.jobs(build).await?;
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
    let operator = operator(&args.server)?;
    let timeout = args.timeout.map(Duration::from_secs);
    Ok(exit_code(
        operator.wait_for_build(&args.build, timeout).await?,
    ))
}

/// 0 when every job finished, else 1.
pub fn exit_code(all_finished: bool) -> ExitCode {
    if all_finished {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let text = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(text, "A    BB\nxyz  1\n");
    }
}
