//! `kiln submit FILE [--files DIR]`: checks the manifest and the files here, then
//! uploads both. The last line on stdout is the build number.

use crate::cli::SubmitArgs;
use crate::operator::{Operator, Usage};
use anyhow::Context;
use kiln_proto::api::Submitted;
use kiln_proto::manifest::BuildManifest;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub async fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let operator = Operator::new(&args.server)?;
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
    let submitted = submit(&operator, &args.file, &files_dir).await?;
    eprintln!(
        "build {} submitted with {} jobs to {}",
        submitted.number,
        submitted.n_jobs,
        operator.url()
    );
    println!("{}", submitted.number);
    Ok(ExitCode::SUCCESS)
}

/// Checks and uploads a build; used by `kiln demo` too.
pub async fn submit(
    operator: &Operator,
    manifest_path: &Path,
    files_dir: &Path,
) -> anyhow::Result<Submitted> {
    let text = std::fs::read_to_string(manifest_path)
        .with_context(|| format!("reading manifest {}", manifest_path.display()))?;
    let file_name = manifest_path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "relbuild.xml".into());
    let manifest = BuildManifest::parse(&manifest_path.display().to_string(), &text)?;
    let archive = tempfile::NamedTempFile::new().context("creating a temporary archive")?;
    let files = pack_files(files_dir, archive.path())?;
    for job in &manifest.jobs {
        let scripts = [
            Some(&job.install_script),
            job.configure_script.as_ref(),
            Some(&job.image_script),
            job.verify_script.as_ref(),
        ];
        for script in scripts.into_iter().flatten() {
            anyhow::ensure!(
                files.contains(script.as_str()),
                "job {} names script {script:?}, which is not in {}",
                job.id,
                files_dir.display()
            );
        }
    }
    let size = std::fs::metadata(archive.path())?.len();
    let file = tokio::fs::File::open(archive.path()).await?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
        file,
        256 * 1024,
    ));
    let form = reqwest::multipart::Form::new()
        .part(
            "manifest",
            reqwest::multipart::Part::text(text).file_name(file_name),
        )
        .part(
            "files",
            reqwest::multipart::Part::stream_with_length(body, size)
                .file_name("files.tar")
                .mime_str("application/x-tar")?,
        );
    let response = operator
        .send(
            operator
                .request(reqwest::Method::POST, "/v1/builds")
                .multipart(form),
        )
        .await?;
    Ok(response.json().await?)
}

/// Packs the regular files and directories under `dir` into a tar at `dest`; returns
/// the relative paths of the files. Anything else (symlinks, devices) is refused.
fn pack_files(dir: &Path, dest: &Path) -> anyhow::Result<BTreeSet<String>> {
    let out =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(out));
    builder.mode(tar::HeaderMode::Deterministic);
    let mut files = BTreeSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let full = dir.join(&relative);
        let mut entries: Vec<_> = std::fs::read_dir(&full)
            .with_context(|| format!("reading {}", full.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let name = entry.file_name();
            let rel = relative.join(&name);
            let meta = std::fs::symlink_metadata(entry.path())?;
            let rel_text = rel
                .to_str()
                .with_context(|| format!("{} is not a UTF-8 name", rel.display()))?
                .to_owned();
            if meta.is_dir() {
                builder.append_dir(&rel, entry.path())?;
                stack.push(rel);
            } else if meta.is_file() {
                let mut file = std::fs::File::open(entry.path())?;
                builder.append_file(&rel, &mut file)?;
                files.insert(rel_text);
            } else {
                anyhow::bail!(
                    "{} is not a regular file or directory (symlinks and devices cannot be part of a build)",
                    entry.path().display()
                );
            }
        }
    }
    builder
        .into_inner()?
        .into_inner()
        .map_err(|err| err.into_error())?
        .sync_all()?;
    Ok(files)
}
