//! A build's files: the archive `kiln submit` uploads (a tar of the directory the
//! manifest sits in), checked before anything is stored.

use kiln_proto::manifest::BuildManifest;
use std::collections::HashSet;
use std::path::{Component, Path};

/// The most entries a build's files may hold.
pub const MAX_FILES: usize = 100_000;

/// Checks the archive at `path`: only regular files and directories, every path
/// relative and inside the build, and every script the manifest names present.
/// Returns the refusal in words.
pub fn check_archive(path: &Path, manifest: &BuildManifest) -> Result<u64, String> {
    let file = std::fs::File::open(path)
        .map_err(|err| format!("cannot read the uploaded files: {err}"))?;
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries()
        .map_err(|err| format!("the build's files are not a tar archive: {err}"))?;
    let mut regular_files = HashSet::new();
    for entry in entries {
        let entry = entry.map_err(|err| format!("the build's files archive is damaged: {err}"))?;
        let entry_path = entry
            .path()
            .map_err(|err| format!("an entry of the build's files has an unreadable name: {err}"))?
            .into_owned();
        let name = entry_path.display().to_string();
        let relative = safe_relative(&entry_path).ok_or_else(|| {
            format!("file {name:?} in the build's files escapes the build directory")
        })?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(format!(
                "file {name:?} in the build's files is not a regular file or directory (symlinks, links and devices are refused)"
            ));
        }
        if relative.is_empty() {
            continue;
        }
        regular_files.insert(relative);
        if regular_files.len() > MAX_FILES {
            return Err(format!(
                "the build's files hold more than {MAX_FILES} files"
            ));
        }
    }
    for job in &manifest.jobs {
        let scripts = [
            Some(&job.install_script),
            job.configure_script.as_ref(),
            Some(&job.image_script),
            job.verify_script.as_ref(),
        ];
        for script in scripts.into_iter().flatten() {
            if !regular_files.contains(script.as_str()) {
                return Err(format!(
                    "job {} names script {script:?}, which is not among the build's files",
                    job.id
                ));
            }
        }
    }
    Ok(regular_files.len() as u64)
}

/// `path` as a `/`-joined relative path, or `None` if it is absolute or climbs out.
pub fn safe_relative(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?.to_owned()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn climbing_paths_are_refused() {
        assert_eq!(
            safe_relative(Path::new("./pro/install.cmd")).as_deref(),
            Some("pro/install.cmd")
        );
        assert_eq!(safe_relative(Path::new("../etc/passwd")), None);
        assert_eq!(safe_relative(Path::new("/etc/passwd")), None);
        assert_eq!(safe_relative(Path::new("a/../../b")), None);
    }

    #[test]
    fn a_verify_script_missing_from_the_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let archive_path = dir.path().join("files.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&archive_path).unwrap());
        for name in ["install.sh", "image.sh"] {
            let mut header = tar::Header::new_gnu();
            header.set_size(5);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, &b"true\n"[..])
                .unwrap();
        }
        builder.into_inner().unwrap();
        let text = "number = 1\n[[job]]\nid = \"a\"\nconfig_type = \"T\"\n\
                    install_script = \"install.sh\"\nimage_script = \"image.sh\"\n\
                    verify = \"boot.sh\"\ntimeout = 60\n";
        let mut manifest = BuildManifest::from_toml("kiln.toml", text).unwrap();
        assert_eq!(
            check_archive(&archive_path, &manifest),
            Err("job a names script \"boot.sh\", which is not among the build's files".to_owned())
        );
        manifest.jobs[0].verify_script = None;
        assert_eq!(check_archive(&archive_path, &manifest), Ok(2));
    }
}
