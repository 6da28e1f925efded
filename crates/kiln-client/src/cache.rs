//! The client's job cache: one directory that outlives jobs, handed to every step as
//! `KILN_CACHE`, for what the SKUs a client builds share (package downloads, say).
//!
//! [`JobCache`] is one per client, whatever the server or config type of a job: the
//! SKUs of a build share most of their packages across products and configurations,
//! so a cache per config type would download them once per type. Jobs keep their
//! things in **entries**, the top-level files and directories of the cache, one per
//! kind of content (e.g. `apt-bookworm-amd64`).
//!
//! The cache is bounded: [`JobCache::evict`] removes whole entries, least recently used
//! first, until the cache holds at most its bound. An entry's last use is the newest
//! modification time of anything in it (the entry itself included), so a job that
//! reads an entry without writing to it marks it used by touching its directory. The
//! agent evicts between jobs only: at start-up and each time the last running job
//! ends, never while a step could be reading an entry ([`JobCache::in_use`]).

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

/// The bound when the configuration gives none: 8 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 8 << 30;

/// A client's job cache directory and its bound.
#[derive(Debug, Clone)]
pub struct JobCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Held shared by every running job, exclusively by an eviction.
    users: Arc<RwLock<()>>,
}

/// One entry of the cache as an eviction saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The entry's name in the cache directory.
    pub name: String,
    /// Bytes its files take on disk (a file with several links in the cache is counted
    /// once, in the first entry that holds it).
    pub bytes: u64,
    /// The newest modification time of anything in it.
    pub last_used: SystemTime,
}

/// What one eviction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Bytes the cache held before.
    pub bytes_before: u64,
    /// Bytes it holds now.
    pub bytes_after: u64,
    /// The entries removed, oldest first.
    pub removed: Vec<String>,
}

impl JobCache {
    /// The cache in `dir` (created if missing), bounded to `max_bytes`.
    pub fn open(dir: PathBuf, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(JobCache {
            dir,
            max_bytes,
            users: Arc::new(RwLock::new(())),
        })
    }

    /// The directory jobs see as `KILN_CACHE`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bound, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Marks a job as using the cache until the guard is dropped; waits for an
    /// eviction in progress to end.
    pub async fn in_use(&self) -> OwnedRwLockReadGuard<()> {
        self.users.clone().read_owned().await
    }

    /// Evicts if no job uses the cache now; `None` when one does (the last job to end
    /// evicts then).
    pub async fn evict_between_jobs(&self) -> Option<io::Result<Eviction>> {
        let guard = self.users.clone().try_write_owned().ok()?;
        let cache = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            cache.evict()
        })
        .await
        .unwrap_or_else(|err| Err(io::Error::other(err)));
        Some(result)
    }

    /// Removes whole entries, least recently used first, until the cache holds at
    /// most its bound. Call it only when no job runs.
    pub fn evict(&self) -> io::Result<Eviction> {
        let mut entries = self.entries()?;
        let bytes_before: u64 = entries.iter().map(|entry| entry.bytes).sum();
        let mut eviction = Eviction {
            bytes_before,
            bytes_after: bytes_before,
            removed: Vec::new(),
        };
        // Oldest first; among equals, by name, so that an eviction is repeatable.
        entries.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.name.cmp(&b.name)));
        for entry in entries {
            if eviction.bytes_after <= self.max_bytes {
                break;
            }
            let path = self.dir.join(&entry.name);
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            eviction.bytes_after -= entry.bytes;
            eviction.removed.push(entry.name);
        }
        Ok(eviction)
    }

    /// Every entry with its size and last use.
    pub fn entries(&self) -> io::Result<Vec<CacheEntry>> {
        let mut seen_inodes = HashSet::new();
        let mut entries = Vec::new();
        for dir_entry in std::fs::read_dir(&self.dir)? {
            let dir_entry = dir_entry?;
            let name = dir_entry.file_name().to_string_lossy().into_owned();
            let mut usage = Usage {
                bytes: 0,
                last_used: SystemTime::UNIX_EPOCH,
            };
            walk(&dir_entry.path(), &mut seen_inodes, &mut usage)?;
            entries.push(CacheEntry {
                name,
                bytes: usage.bytes,
                last_used: usage.last_used,
            });
        }
        Ok(entries)
    }
}

struct Usage {
    bytes: u64,
    last_used: SystemTime,
}

/// Adds up `path` and everything under it, without following symlinks.
fn walk(path: &Path, seen_inodes: &mut HashSet<(u64, u64)>, usage: &mut Usage) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // Gone since it was listed: nothing to count.
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    if let Ok(modified) = meta.modified() {
        usage.last_used = usage.last_used.max(modified);
    }
    if meta.is_dir() {
        for child in std::fs::read_dir(path)? {
            walk(&child?.path(), seen_inodes, usage)?;
        }
    } else if seen_inodes.insert((meta.dev(), meta.ino())) {
        // Blocks on disk, so that a sparse file counts for what it takes.
        usage.bytes += meta.blocks() * 512;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Writes `kib` KiB of non-zero bytes to `path` and dates it `age_secs` ago.
    fn write_aged(path: &Path, kib: usize, age_secs: u64) {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, vec![7u8; kib * 1024]).unwrap();
        set_age(path, age_secs);
    }

    fn set_age(path: &Path, age_secs: u64) {
        let when = SystemTime::now() - Duration::from_secs(age_secs);
        std::fs::File::options()
            .write(true)
            .open(path)
            .or_else(|_| std::fs::File::open(path))
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    fn names(cache: &JobCache) -> Vec<String> {
        let mut names: Vec<String> = cache
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_cache_within_its_bound_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let cache = JobCache::open(dir.path().join("cache"), 1 << 20).unwrap();
        write_aged(&cache.dir().join("apt/a.deb"), 100, 50);
        write_aged(&cache.dir().join("loose.bin"), 100, 10);
        let eviction = cache.evict().unwrap();
        assert!(eviction.removed.is_empty(), "{eviction:?}");
        assert_eq!(eviction.bytes_before, eviction.bytes_after);
        assert!(eviction.bytes_before >= 200 * 1024, "{eviction:?}");
        assert_eq!(names(&cache), ["apt", "loose.bin"]);
    }

    #[test]
    fn least_recently_used_whole_entries_go_first_until_under_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = JobCache::open(dir.path().join("cache"), 500 * 1024).unwrap();
        // "old" was used long ago, but one file of "recent" was written a moment ago:
        // the entry's newest time counts, not its oldest.
        write_aged(&cache.dir().join("old/1.deb"), 300, 3000);
        write_aged(&cache.dir().join("old/sub/2.deb"), 100, 2900);
        write_aged(&cache.dir().join("middle/1.deb"), 300, 2000);
        write_aged(&cache.dir().join("recent/1.deb"), 300, 5000);
        write_aged(&cache.dir().join("recent/2.deb"), 10, 1);
        for entry in ["old", "old/sub", "middle", "recent"] {
            set_age(&cache.dir().join(entry), 6000);
        }
        let eviction = cache.evict().unwrap();
        assert_eq!(eviction.removed, ["old", "middle"]);
        assert!(eviction.bytes_after <= 500 * 1024, "{eviction:?}");
        assert_eq!(names(&cache), ["recent"]);
        assert!(!cache.dir().join("old").exists());
    }

    #[test]
    fn touching_an_entry_marks_it_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = JobCache::open(dir.path().join("cache"), 400 * 1024).unwrap();
        write_aged(&cache.dir().join("a/pkg.deb"), 300, 3000);
        write_aged(&cache.dir().join("b/pkg.deb"), 300, 2000);
        set_age(&cache.dir().join("b"), 2000);
        // A job read "a" without writing to it, and touched its directory.
        set_age(&cache.dir().join("a"), 0);
        let eviction = cache.evict().unwrap();
        assert_eq!(eviction.removed, ["b"]);
        assert_eq!(names(&cache), ["a"]);
    }

    #[test]
    fn hard_links_count_once_and_a_zero_bound_empties_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = JobCache::open(dir.path().join("cache"), 0).unwrap();
        write_aged(&cache.dir().join("a/pkg.deb"), 256, 10);
        std::fs::create_dir_all(cache.dir().join("b")).unwrap();
        std::fs::hard_link(cache.dir().join("a/pkg.deb"), cache.dir().join("b/pkg.deb")).unwrap();
        let total: u64 = cache.entries().unwrap().iter().map(|e| e.bytes).sum();
        assert!(
            (256 * 1024..2 * 256 * 1024).contains(&total),
            "a linked file is counted once: {total}"
        );
        let eviction = cache.evict().unwrap();
        assert_eq!(eviction.bytes_after, 0, "{eviction:?}");
        assert!(names(&cache).is_empty());
    }

    #[tokio::test]
    async fn no_eviction_while_a_job_uses_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = JobCache::open(dir.path().join("cache"), 0).unwrap();
        write_aged(&cache.dir().join("a/pkg.deb"), 64, 10);
        let job = cache.in_use().await;
        assert!(cache.evict_between_jobs().await.is_none());
        assert_eq!(names(&cache), ["a"]);
        drop(job);
        let eviction = cache.evict_between_jobs().await.unwrap().unwrap();
        assert_eq!(eviction.removed, ["a"]);
    }
}
