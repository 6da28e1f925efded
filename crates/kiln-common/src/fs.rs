//! Crash-safe file replacement.
//!
//! [`AtomicFile`] is written beside its target under a temporary name; [`AtomicFile::commit`]
//! fsyncs it, renames it over the target and fsyncs the directory, so that after a
//! crash the target holds either its old bytes or all of the new ones, never a part.
//! Dropped without a commit (an error on the way, a panic), the temporary file is
//! removed. [`write_atomic`] does all of that for bytes already in memory.

use rand::RngCore;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How a temporary file's name starts: hidden, and recognisable as kiln's.
pub const TEMP_PREFIX: &str = ".kiln-tmp-";

/// A file being written in place of another; see the module docs.
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: File,
    committed: bool,
}

impl AtomicFile {
    /// Starts replacing `target` (mode 0644 before the umask).
    pub fn create(target: &Path) -> io::Result<Self> {
        Self::create_with_mode(target, 0o644)
    }

    /// Starts replacing `target` with a file of `mode` (0600 for secrets: the
    /// temporary file has the mode from its first byte).
    pub fn create_with_mode(target: &Path, mode: u32) -> io::Result<Self> {
        let temp = temp_path_for(target)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(|err| with_path(err, "creating", &temp))?;
        Ok(AtomicFile {
            target: target.to_owned(),
            temp,
            file,
            committed: false,
        })
    }

    /// The file to write to.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Where the bytes are until the commit.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Makes the written bytes durable under the target's name.
    pub fn commit(mut self) -> io::Result<()> {
        self.file
            .sync_all()
            .map_err(|err| with_path(err, "syncing", &self.temp))?;
        std::fs::rename(&self.temp, &self.target)
            .map_err(|err| with_path(err, "renaming into", &self.target))?;
        self.committed = true;
        sync_parent(&self.target)
    }
}

impl Write for AtomicFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.file.write(bytes)
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Replaces `path` with `bytes`, crash-safely.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with_mode(path, bytes, 0o644)
}

/// Replaces `path` with `bytes` in a file of `mode`, crash-safely.
pub fn write_atomic_with_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut file = AtomicFile::create_with_mode(path, mode)?;
    file.write_all(bytes)
        .map_err(|err| with_path(err, "writing", &file.temp))?;
    file.commit()
}

/// Makes the names in `dir` durable (a rename or a new file in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| with_path(err, "syncing directory", dir))
}

/// Makes `path`'s name durable in its directory.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// A fresh temporary name beside `target`: concurrent writers never share one.
fn temp_path_for(target: &Path) -> io::Result<PathBuf> {
    let name = target.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", target.display()),
        )
    })?;
    let mut random = [0u8; 6];
    rand::thread_rng().fill_bytes(&mut random);
    Ok(target.with_file_name(format!(
        "{TEMP_PREFIX}{}-{}",
        hex::encode(random),
        name.to_string_lossy()
    )))
}

/// `err`, saying what was being done to which file.
fn with_path(err: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{doing} {}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_replaces_the_whole_file_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(names_in(dir.path()), ["state.json"]);
    }

    #[test]
    fn a_file_dropped_before_its_commit_leaves_the_old_bytes_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("servers.json");
        write_atomic(&path, b"old").unwrap();
        let mut file = AtomicFile::create(&path).unwrap();
        file.write_all(b"half of the n").unwrap();
        assert!(file.temp_path().exists());
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names_in(dir.path()), ["servers.json"]);
    }

    #[test]
    fn a_write_that_fails_names_the_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a directory: the rename fails after the bytes were written.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        let err = write_atomic(&path, b"bytes").unwrap_err();
        assert!(err.to_string().contains("taken"), "{err}");
        assert_eq!(names_in(dir.path()), ["taken"]);
    }

    #[test]
    fn a_secret_file_is_private_from_its_first_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let file = AtomicFile::create_with_mode(&path, 0o600).unwrap();
        let mode = std::fs::metadata(file.temp_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        file.commit().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
