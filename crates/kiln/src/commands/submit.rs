//! `kiln submit FILE [--files DIR]`: checks the manifest and the files here, then
//! uploads both. The last line on stdout is the build number.

use crate::cli::SubmitArgs;
use crate::operator::{operator, Usage};
use std::path::PathBuf;
use std::process::ExitCode;

pub async fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let operator = operator(&args.server)?;
    let files_dir = match args.files {
        Some(dir) => dir,
        None => args
            .file
            .parent()
            .map(|dir| {
                if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir.to_owned()
                }
            })
            .ok_or_else(|| Usage(format!("{} has no parent directory", args.file.display())))?,
    };
    let submitted = operator.submit(&args.file, &files_dir).await?;
    eprintln!(
        "build {} submitted with {} jobs to {}",
        submitted.number,
        submitted.n_jobs,
        operator.url()
    );
    println!("{}", submitted.number);
    Ok(ExitCode::SUCCESS)
}
