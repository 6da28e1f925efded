//! `kiln release BUILD --to DIR [--json]`: the build's images into a release directory
//! (kiln-release does the work); prints the directory, or what was reused and fetched.

use crate::cli::ReleaseArgs;
use crate::operator::operator;
use std::process::ExitCode;

pub async fn run(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let operator = operator(&args.server)?;
    let released = kiln_release::release(&operator, &args.build, &args.to).await?;
    if args.json {
        let counts = &released.counts;
        let numbers = serde_json::json!({
            "dir": released.dir.display().to_string(),
            "images": released.images.len(),
            "bytes": released.bytes(),
            "bytes_reused": counts.bytes_reused,
            "bytes_fetched": counts.bytes_fetched,
            "wire_bytes": counts.wire_bytes,
            "chunks_reused": counts.chunks_reused,
            "chunks_fetched": counts.chunks_fetched,
        });
        println!("{numbers}");
    } else {
        println!("{}", released.dir.display());
    }
    Ok(if released.complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
