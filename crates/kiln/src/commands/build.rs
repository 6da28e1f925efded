//! `kiln build delete BUILD` and `kiln storage`: what the server keeps, and letting go
//! of it.

use crate::cli::{BuildAction, BuildArgs, StorageArgs};
use crate::operator::{operator, Usage};
use kiln_api::{JobAction, Operator};
use kiln_proto::state::JobState;
use std::process::ExitCode;

pub async fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        BuildAction::Delete {
            build,
            force,
            json,
            server,
        } => {
            kiln_proto::names::check_name("build number", &build).map_err(Usage)?;
            let operator = operator(&server)?;
            if force {
                cancel_running(&operator, &build).await?;
            }
            let report = operator.delete_build(&build).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "deleted build {}: {} jobs, {} images; {} chunks no image uses any more \
                     freed ({})",
                    report.build,
                    report.jobs,
                    report.images,
                    report.chunks_freed,
                    human_bytes(report.bytes_freed)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Cancels the build's running jobs, so that it can be deleted.
async fn cancel_running(operator: &Operator, build: &str) -> anyhow::Result<()> {
    let jobs = operator.jobs(build).await?;
    for job in jobs.iter().filter(|job| job.state == JobState::Running) {
        let cancelled = operator.job_action(build, &job.id, JobAction::Cancel).await;
        match cancelled {
            Ok(_) => eprintln!("cancelled running job {build}/{}", job.id),
            // It ended meanwhile: nothing to cancel.
            Err(err) => eprintln!("job {build}/{}: {err:#}", job.id),
        }
    }
    Ok(())
}

pub async fn storage(args: StorageArgs) -> anyhow::Result<ExitCode> {
    let operator = operator(&args.server)?;
    let stats = operator.storage().await?;
    if args.json {
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    let ratio = if stats.bytes_stored > 0 {
        format!(
            "{:.1}x",
            stats.image_bytes as f64 / stats.bytes_stored as f64
        )
    } else {
        "-".to_owned()
    };
    println!(
        "images          {:>12}  {}",
        stats.images,
        human_bytes(stats.image_bytes)
    );
    println!(
        "stored          {:>12}  {} in chunks ({ratio} smaller than the images)",
        stats.chunks_stored,
        human_bytes(stats.bytes_stored)
    );
    println!(
        "received        {:>12}  {}",
        "",
        human_bytes(stats.bytes_received)
    );
    println!(
        "deduplicated    {:>12}  {}",
        "",
        human_bytes(stats.bytes_deduplicated)
    );
    Ok(ExitCode::SUCCESS)
}

/// Bytes in binary units, for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn bytes_read_as_people_read_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
