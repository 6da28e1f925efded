//! `kiln demo`: a whole farm on this machine building a bundled example, the quick one
//! or, with `--example debian`, the Debian one (see kiln-harness's `demo`); exit 0 when
//! every image was built and released.

use super::status::exit_code;
use crate::cli::{DemoArgs, DemoExample};
use std::process::ExitCode;

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let options = kiln_harness::demo::Options {
        example: match args.example {
            DemoExample::Demo => kiln_harness::demo::Example::Demo,
            DemoExample::Debian => kiln_harness::demo::Example::Debian,
        },
        clients: args.clients,
        out: args.out,
        data: args.data,
    };
    Ok(exit_code(kiln_harness::demo::run(options).await?))
}
