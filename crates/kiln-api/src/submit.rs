//! Submitting a build: [`Operator::submit`] checks the manifest and the files here
//! (every script a job names must be among them), packs the files into a tar and
//! uploads both.

use crate::error::CallError;
use crate::operator::Operator;
use kiln_proto::api::Submitted;
use kiln_proto::manifest::BuildManifest;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Why a build was not submitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The manifest file could not be read.
    #[error("reading manifest {}", path.display())]
    ReadManifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The manifest is malformed: the file, line and column and what was expected.
    #[error(transparent)]
    Manifest(#[from] kiln_proto::error::FormatError),
    /// A job names a script the build's files do not hold.
    #[error("job {job} names script {script:?}, which is not in {}", dir.display())]
    MissingScript {
        job: String,
        script: String,
        dir: PathBuf,
    },
    /// A file under the build's directory is neither a regular file nor a directory.
    #[error(
        "{} is not a regular file or directory (symlinks and devices cannot be part of a build)",
        path.display()
    )]
    NotAFile { path: PathBuf },
    /// A file under the build's directory has a name that is not UTF-8.
    #[error("{} is not a UTF-8 name", path.display())]
    NotUtf8 { path: PathBuf },
    /// The build's files could not be read or packed.
    #[error("{what}")]
    Pack {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The server could not be reached or refused the build.
    #[error(transparent)]
    Call(#[from] CallError),
}

impl SubmitError {
    /// The call that failed, if a call did.
    pub fn call(&self) -> Option<&CallError> {
        match self {
            SubmitError::Call(err) => Some(err),
            _ => None,
        }
    }
}

impl Operator {
    /// Checks and uploads the build of `manifest_path` with the files under
    /// `files_dir`.
    pub async fn submit(
        &self,
        manifest_path: &Path,
        files_dir: &Path,
    ) -> Result<Submitted, SubmitError> {
        let text =
            std::fs::read_to_string(manifest_path).map_err(|source| SubmitError::ReadManifest {
                path: manifest_path.to_owned(),
                source,
            })?;
        let file_name = manifest_path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "relbuild.xml".into());
        let manifest = BuildManifest::parse(&manifest_path.display().to_string(), &text)?;
        let archive = tempfile::NamedTempFile::new().map_err(|source| SubmitError::Pack {
            what: "creating a temporary archive".into(),
            source,
        })?;
        let files = pack_files(files_dir, archive.path())?;
        for job in &manifest.jobs {
            let scripts = [
                Some(&job.install_script),
                job.configure_script.as_ref(),
                Some(&job.image_script),
                job.verify_script.as_ref(),
            ];
            for script in scripts.into_iter().flatten() {
                if !files.contains(script.as_str()) {
                    return Err(SubmitError::MissingScript {
                        job: job.id.clone(),
                        script: script.clone(),
                        dir: files_dir.to_owned(),
                    });
                }
            }
        }
        Ok(self.post_build(text, file_name, archive.path()).await?)
    }
}

/// Packs the regular files and directories under `dir` into a tar at `dest`; returns
/// the relative paths of the files. Anything else (symlinks, devices) is refused.
fn pack_files(dir: &Path, dest: &Path) -> Result<BTreeSet<String>, SubmitError> {
    let pack = |what: String| move |source| SubmitError::Pack { what, source };
    let out = std::fs::File::create(dest).map_err(pack(format!("creating {}", dest.display())))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(out));
    builder.mode(tar::HeaderMode::Deterministic);
    let mut files = BTreeSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let full = dir.join(&relative);
        let reading = || format!("reading {}", full.display());
        let mut entries: Vec<_> = std::fs::read_dir(&full)
            .map_err(pack(reading()))?
            .collect::<Result<_, _>>()
            .map_err(pack(reading()))?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let name = entry.file_name();
            let rel = relative.join(&name);
            let packing = || format!("packing {}", entry.path().display());
            let meta = std::fs::symlink_metadata(entry.path()).map_err(pack(packing()))?;
            let rel_text = rel
                .to_str()
                .ok_or_else(|| SubmitError::NotUtf8 { path: rel.clone() })?
                .to_owned();
            if meta.is_dir() {
                builder
                    .append_dir(&rel, entry.path())
                    .map_err(pack(packing()))?;
                stack.push(rel);
            } else if meta.is_file() {
                let mut file = std::fs::File::open(entry.path()).map_err(pack(packing()))?;
                builder
                    .append_file(&rel, &mut file)
                    .map_err(pack(packing()))?;
                files.insert(rel_text);
            } else {
                return Err(SubmitError::NotAFile { path: entry.path() });
            }
        }
    }
    let writing = || format!("writing {}", dest.display());
    builder
        .into_inner()
        .map_err(pack(writing()))?
        .into_inner()
        .map_err(|err| err.into_error())
        .map_err(pack(writing()))?
        .sync_all()
        .map_err(pack(writing()))?;
    Ok(files)
}
