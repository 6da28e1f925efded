//! `kiln`: the one binary. `main` parses the arguments and hands them to [`run`]; the
//! work lives in the library crates (kiln-server, kiln-client, kiln-master, kiln-api,
//! kiln-release, kiln-harness), the command modules here parse and print.
//!
//! Exit codes: 0 success; 1 the thing asked for did not succeed (a job failed, a
//! submission was refused); 2 a usage error or the server could not be reached.

mod cli;
mod commands;
mod operator;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(operator::exit_code_for(&err))
        }
    }
}

/// Runs the parsed command line on a multi-threaded runtime.
fn run(args: cli::Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| operator::Usage(format!("cannot start the async runtime: {err}")))?;
    runtime.block_on(commands::run(args))
}
