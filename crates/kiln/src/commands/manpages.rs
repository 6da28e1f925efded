//! `kiln man DIR`: a manual page for `kiln` and one for every subcommand (`kiln.1`,
//! `kiln-server.1`, `kiln-server-client.1`, ...), generated from the clap definition by
//! `clap_mangen`.

use anyhow::Context;
use clap::{Args, CommandFactory};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ManArgs {
    /// The directory to write the pages to (made if missing).
    pub dir: PathBuf,
}

pub fn run(args: ManArgs) -> anyhow::Result<ExitCode> {
    let n_pages = write_pages(&args.dir)?;
    eprintln!("{n_pages} manual pages in {}", args.dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Writes every page into `dir`; returns how many.
fn write_pages(dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    clap_mangen::generate_to(crate::cli::Cli::command(), dir)
        .with_context(|| format!("writing manual pages to {}", dir.display()))?;
    let n_pages = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".1"))
        .count();
    Ok(n_pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_for_kiln_and_for_each_subcommand() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let n_pages = write_pages(dir.path()).expect("pages are written");
        let command = crate::cli::Cli::command();
        assert!(n_pages > command.get_subcommands().count());
        let page = |name: &str| {
            std::fs::read_to_string(dir.path().join(name))
                .unwrap_or_else(|err| panic!("{name}: {err}"))
        };
        assert!(page("kiln.1").contains("kiln\\-submit(1)"));
        let server = page("kiln-server.1");
        assert!(server.starts_with(".ie"), "a roff page: {server:.40}");
        assert!(server.contains("public\\-read"));
        assert!(page("kiln-server-client.1").contains("kiln\\-server\\-client"));
    }
}
