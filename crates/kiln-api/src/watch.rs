//! Waiting for a build: [`Operator::wait_for_build`] polls the build's jobs until each
//! has ended and shows their progress on stderr as it goes — a bar per job on a
//! terminal, a line per change of state otherwise — then one line per job that did
//! not finish. `kiln wait`, `kiln demo` and the benches show the same.

use crate::error::CallError;
use crate::operator::Operator;
use kiln_proto::api::JobStatus;
use kiln_proto::state::JobState;
use std::collections::HashMap;
use std::time::Duration;

/// Why waiting for a build stopped before it ended.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The build was still running when the time given ran out.
    #[error("build {build} did not end within {secs} s")]
    TimedOut { build: String, secs: u64 },
    /// A call to the server failed.
    #[error(transparent)]
    Call(#[from] CallError),
}

impl WaitError {
    /// The call that failed, if a call did.
    pub fn call(&self) -> Option<&CallError> {
        match self {
            WaitError::Call(err) => Some(err),
            WaitError::TimedOut { .. } => None,
        }
    }
}

/// An ETA for people: `42s`, `2m05s`, `1h02m`; `-` when there is none.
pub fn format_eta(eta: Option<u64>) -> String {
    match eta {
        None => "-".into(),
        Some(secs) if secs >= 3600 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        Some(secs) if secs >= 60 => format!("{}m{:02}s", secs / 60, secs % 60),
        Some(secs) => format!("{secs}s"),
    }
}

impl Operator {
    /// Shows progress until every job of `build` ended (or `timeout` passed); returns
    /// whether they all finished (else some failed, expired or were cancelled).
    pub async fn wait_for_build(
        &self,
        build: &str,
        timeout: Option<Duration>,
    ) -> Result<bool, WaitError> {
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
            let jobs = self.jobs(build).await?;
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
                return Ok(report_end(build, &jobs));
            }
            if let Some(timeout) = timeout {
                if started.elapsed() >= timeout {
                    return Err(WaitError::TimedOut {
                        build: build.to_owned(),
                        secs: timeout.as_secs(),
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Says on stderr how the build ended; returns whether every job finished.
fn report_end(build: &str, jobs: &[JobStatus]) -> bool {
    let bad: Vec<&JobStatus> = jobs
        .iter()
        .filter(|job| job.state != JobState::Finished)
        .collect();
    if bad.is_empty() {
        eprintln!("build {build}: all {} jobs finished", jobs.len());
        return true;
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
    false
}

#[cfg(test)]
mod tests {
    use super::format_eta;

    #[test]
    fn eta_is_human() {
        assert_eq!(format_eta(None), "-");
        assert_eq!(format_eta(Some(42)), "42s");
        assert_eq!(format_eta(Some(125)), "2m05s");
        assert_eq!(format_eta(Some(3725)), "1h02m");
    }
}
