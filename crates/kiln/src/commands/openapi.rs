//! `kiln openapi`: the server API's OpenAPI description, as a server serves it at
//! `GET /v1/openapi.json` (with the default configuration). `docs/openapi.json` is
//! this command's output; a test in kiln-server fails when it is stale.

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct OpenapiArgs {
    /// Write it to this file instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: OpenapiArgs) -> anyhow::Result<ExitCode> {
    let text = kiln_server::http::openapi::to_json(&kiln_server::http::openapi());
    match &args.out {
        Some(path) => kiln_common::fs::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?,
        None => std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}
