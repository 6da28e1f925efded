//! `kiln logs BUILD/ID [-f]`: prints a job's log, following it while the job runs.

use crate::cli::LogsArgs;
use crate::operator::{operator, split_job};
use std::io::Write;
use std::process::ExitCode;

pub async fn run(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let (build, job) = split_job(&args.job)?;
    let operator = operator(&args.server)?;
    let mut after = 0;
    loop {
        let wait = if args.follow { 30 } else { 0 };
        let chunk = operator.log(&build, &job, after, wait).await?;
        let mut out = std::io::stdout().lock();
        for line in &chunk.lines {
            match line.stream.as_str() {
                "kiln" => writeln!(out, "kiln: {}", line.text)?,
                _ => writeln!(out, "{}", line.text)?,
            }
        }
        out.flush()?;
        let got_lines = !chunk.lines.is_empty();
        after = chunk.next;
        if chunk.done && !got_lines {
            break;
        }
        if !args.follow && !got_lines {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
