//! `kiln demo`: a whole farm on this machine building the bundled example (see
//! kiln-harness's `demo`); exit 0 when every image was built and released.

use super::status::exit_code;
use crate::cli::DemoArgs;
use std::process::ExitCode;

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let options = kiln_harness::demo::Options {
        clients: args.clients,
        out: args.out,
        data: args.data,
    };
    Ok(exit_code(kiln_harness::demo::run(options).await?))
}
