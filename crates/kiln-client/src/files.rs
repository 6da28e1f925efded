//! [`KeptFiles`]: the build files archives a client fetched, kept in
//! `WORK/build-files/` under their ETag (the server's content key of the archive).
//!
//! Every job unpacks its build's files into a fresh workspace. Without a kept copy each
//! job downloaded the whole archive again: a build's installers once per job, and a
//! build of 10,000 jobs whose directory holds its 1.7 MB manifest sent 17 GB of it.
//! Now a fetch names the kept archives in `If-None-Match`; the server answers 304 with
//! the ETag of the one that is the build's files, and the job unpacks that copy
//! straight from where it is kept, open before it is read, so that a copy removed
//! meanwhile stays readable to the job that opened it. A build's files travel once per
//! client, and a build that shares another's files (same content key) does not travel
//! at all.
//!
//! At most [`KEPT`] archives are kept, the least recently used removed first. Jobs of
//! one build that fetch at the same time may each download it; each keeps it by a
//! rename, so the last one's copy stays, with the same bytes. An archive removed
//! between the 304 and its use is fetched again in full.

use kiln_api::{CallError, FilesFetch, ServerConn};
use kiln_proto::api::Claim;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The most archives kept.
pub const KEPT: usize = 8;

/// A kept archive used again within this long of its last recorded use is not marked
/// again: marking is a write to the file system, and the order of uses this coarse is
/// enough to pick what to remove.
const MARK_EVERY: Duration = Duration::from_secs(60);

/// How a kept archive's file name ends.
const SUFFIX: &str = ".tar";

/// The kept build files archives of one client.
#[derive(Debug, Clone)]
pub struct KeptFiles {
    dir: PathBuf,
}

impl KeptFiles {
    /// Opens (creating it if needed) `WORK/build-files`, removing what an interrupted
    /// keep left.
    pub fn open(work_dir: &Path) -> io::Result<Self> {
        let dir = work_dir.join("build-files");
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(kiln_common::fs::TEMP_PREFIX)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(KeptFiles { dir })
    }

    /// The files archive of `claim`'s build, open for reading: the kept copy if the
    /// server says it is theirs, else a download to `dest` (a file that does not exist
    /// yet; the caller removes it), kept for later.
    pub async fn fetch(
        &self,
        conn: &ServerConn,
        claim: &Claim,
        dest: &Path,
    ) -> Result<File, CallError> {
        let opened = |path: &Path| {
            File::open(path).map_err(|source| CallError::Local {
                what: format!("opening the build's files {}", path.display()),
                source,
            })
        };
        let kept = self.kept_etags();
        match conn.fetch_files(claim, dest, &kept).await? {
            FilesFetch::Kept { etag } => match self.open_kept(&etag) {
                Ok(file) => {
                    tracing::info!(build = %claim.build, job = %claim.job_id, %etag, "the build's files are unchanged since an earlier job: unpacking the kept copy");
                    return Ok(file);
                }
                // Removed since it was listed: fetched in full below.
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CallError::Local {
                        what: format!("taking the kept build files {etag}"),
                        source,
                    })
                }
            },
            FilesFetch::Fetched { etag } => {
                self.keep_fetched(etag, dest);
                return opened(dest);
            }
        }
        if let FilesFetch::Fetched { etag } = conn.fetch_files(claim, dest, &[]).await? {
            self.keep_fetched(etag, dest);
        }
        opened(dest)
    }

    /// Keeps a fetched archive if the server named it; a failure to keep costs only a
    /// later download, so it is logged and the job goes on.
    fn keep_fetched(&self, etag: Option<String>, dest: &Path) {
        if let Some(etag) = etag {
            if let Err(err) = self.keep(&etag, dest) {
                tracing::warn!(cause = %err, dir = %self.dir.display(), "cannot keep the build's files for later jobs");
            }
        }
    }

    /// Keeps the archive just fetched to `dest` under `etag`.
    pub fn keep(&self, etag: &str, dest: &Path) -> io::Result<()> {
        let Some(path) = self.path_of(etag) else {
            return Ok(());
        };
        let temp = self.dir.join(format!(
            "{}{:016x}{SUFFIX}",
            kiln_common::fs::TEMP_PREFIX,
            rand::random::<u64>()
        ));
        link_or_copy(dest, &temp)?;
        std::fs::rename(&temp, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&temp);
        })?;
        self.evict()
    }

    /// The ETags of the kept archives, most recently used first.
    pub fn kept_etags(&self) -> Vec<String> {
        self.by_recency()
            .into_iter()
            .take(KEPT)
            .filter_map(|(path, _)| {
                let name = path.file_name()?.to_str()?;
                Some(format!("\"{}\"", name.strip_suffix(SUFFIX)?))
            })
            .collect()
    }

    /// Opens the archive kept as `etag`, and marks it used.
    fn open_kept(&self, etag: &str) -> io::Result<File> {
        let path = self.path_of(etag).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no archive is kept as {etag}"),
            )
        })?;
        let file = File::open(&path)?;
        let now = SystemTime::now();
        let used = file.metadata()?.modified()?;
        if now.duration_since(used).unwrap_or_default() >= MARK_EVERY {
            file.set_modified(now)?;
        }
        Ok(file)
    }

    /// Removes the least recently used archives beyond [`KEPT`].
    fn evict(&self) -> io::Result<()> {
        for (path, _) in self.by_recency().into_iter().skip(KEPT) {
            match std::fs::remove_file(&path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        Ok(())
    }

    /// The kept archives and their last use, most recent first.
    fn by_recency(&self) -> Vec<(PathBuf, SystemTime)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut kept: Vec<(PathBuf, SystemTime)> = entries
            .flatten()
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.ends_with(SUFFIX) && !name.starts_with(kiln_common::fs::TEMP_PREFIX)
            })
            .filter_map(|entry| Some((entry.path(), entry.metadata().ok()?.modified().ok()?)))
            .collect();
        kept.sort_by_key(|(_, used)| std::cmp::Reverse(*used));
        kept
    }

    /// Where the archive with `etag` is kept; `None` for an ETag that is no plain
    /// quoted name (the archive is then not kept).
    fn path_of(&self, etag: &str) -> Option<PathBuf> {
        let name = etag.strip_prefix('"')?.strip_suffix('"')?;
        let plain = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
        plain.then(|| self.dir.join(format!("{name}{SUFFIX}")))
    }
}

/// A hard link from `from` to `to`, or a copy where a link cannot be made (another
/// file system).
fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(err),
        Err(_) => std::fs::copy(from, to).map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn a_kept_archive_is_listed_by_its_etag_and_opened_with_its_bytes() {
        let work = tempfile::tempdir().unwrap();
        let kept = KeptFiles::open(work.path()).unwrap();
        assert!(kept.kept_etags().is_empty());
        let fetched = archive(work.path(), "files.tar", b"the build's files");
        kept.keep("\"abc123\"", &fetched).unwrap();
        // The job unpacks and removes its copy; the kept one stays.
        std::fs::remove_file(&fetched).unwrap();
        assert_eq!(kept.kept_etags(), ["\"abc123\""]);
        let mut bytes = Vec::new();
        let mut file = kept.open_kept("\"abc123\"").unwrap();
        io::Read::read_to_end(&mut file, &mut bytes).unwrap();
        assert_eq!(bytes, b"the build's files");
    }

    #[test]
    fn an_etag_that_is_no_plain_name_is_not_kept() {
        let work = tempfile::tempdir().unwrap();
        let kept = KeptFiles::open(work.path()).unwrap();
        let fetched = archive(work.path(), "files.tar", b"x");
        for etag in ["W/\"weak\"", "\"../escape\"", "unquoted", "\"\""] {
            kept.keep(etag, &fetched).unwrap();
        }
        assert!(kept.kept_etags().is_empty());
        let missing = kept.open_kept("\"../escape\"");
        assert_eq!(missing.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_least_recently_used_archives_beyond_the_bound_are_removed() {
        let work = tempfile::tempdir().unwrap();
        let kept = KeptFiles::open(work.path()).unwrap();
        let base = SystemTime::now() - std::time::Duration::from_secs(3600);
        for idx in 0..KEPT + 2 {
            let etag = format!("\"k{idx}\"");
            // A download of its own each (a kept archive is a link to its download).
            let fetched = archive(work.path(), &format!("files-{idx}.tar"), b"x");
            kept.keep(&etag, &fetched).unwrap();
            // Distinct ages, oldest first, whatever the clock's resolution.
            let path = kept.path_of(&etag).unwrap();
            std::fs::File::open(&path)
                .unwrap()
                .set_modified(base + std::time::Duration::from_secs(idx as u64))
                .unwrap();
        }
        // Using the oldest survivor makes it the most recent.
        kept.open_kept("\"k2\"").unwrap();
        kept.keep("\"k99\"", &archive(work.path(), "files-99.tar", b"y"))
            .unwrap();
        let etags = kept.kept_etags();
        assert_eq!(etags.len(), KEPT);
        assert!(etags.contains(&"\"k2\"".to_owned()));
        assert!(etags.contains(&"\"k99\"".to_owned()));
        for gone in ["\"k0\"", "\"k1\"", "\"k3\""] {
            assert!(!etags.contains(&gone.to_owned()), "{gone} is still kept");
        }
    }
}
