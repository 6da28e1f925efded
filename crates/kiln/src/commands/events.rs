//! `kiln events BUILD [--json] [-f]`: the build's event log, in order: every state
//! change of every job with its time, client, attempt and reason.

use crate::cli::EventsArgs;
use crate::operator::{operator, Usage};
use kiln_proto::api::Event;
use std::io::Write;
use std::process::ExitCode;

pub async fn run(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let operator = operator(&args.server)?;
    let build = &args.build;
    kiln_proto::names::check_name("build number", build).map_err(Usage)?;
    let mut after = 0;
    loop {
        let wait = if args.follow { 60 } else { 0 };
        let events = operator.events_after(build, after, wait).await?;
        let mut out = std::io::stdout().lock();
        for event in &events {
            if args.json {
                writeln!(out, "{}", serde_json::to_string(event)?)?;
            } else {
                writeln!(out, "{}", format_event(event))?;
            }
            after = event.seq;
        }
        out.flush()?;
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// One line per event: time, job, transition, client, attempt, reason.
fn format_event(event: &Event) -> String {
    format!(
        "{}  {:<16} {:>9} -> {:<9}  client={}  attempt={}  {}",
        kiln_proto::format_rfc3339(event.time),
        event.job,
        event
            .from
            .map_or_else(|| "-".to_owned(), |state| state.to_string()),
        event.to.to_string(),
        event.client_id.as_deref().unwrap_or("-"),
        event.attempt,
        event.reason.as_deref().unwrap_or("")
    )
    .trim_end()
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::state::JobState;

    #[test]
    fn an_event_reads_as_one_line() {
        let event = Event {
            seq: 3,
            time: 1_795_541_879_191_943,
            build: "1000".into(),
            job: "pro-base".into(),
            from: Some(JobState::Queued),
            to: JobState::Running,
            client_id: Some("c1".into()),
            attempt: 1,
            reason: Some("claimed".into()),
        };
        assert_eq!(
            format_event(&event),
            "2026-11-24T17:37:59.191943Z  pro-base            queued -> running    client=c1  attempt=1  claimed"
        );
    }
}
