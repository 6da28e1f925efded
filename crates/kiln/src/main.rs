//! `kiln`: the one binary. `main` parses the arguments and hands them to [`run`]; the
//! work lives in the library crates and in the command modules here.
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(commands::run(args)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(operator::exit_code_for(&err))
        }
    }
}
