//! The chunks a release directory already holds: every file under it cut into
//! content-defined chunks with the parameters the server uses, so that `kiln release`
//! copies those chunks instead of downloading them.
//!
//! Cutting gigabytes again on every release would be slow, so each file's chunk list
//! is kept in `DIR/.kiln/chunks/KEY` (KEY: BLAKE3 of the file's path under DIR), valid
//! only while the file's size, modification time and inode are those recorded. A cache
//! file that is damaged, unreadable or of another format is ignored and written again.
//!
//! The index only says where a chunk *should* be. [`LocalChunks::read`] checks the
//! bytes against the chunk's name every time, so a file changed since it was indexed
//! can cost a download but never a wrong byte.

use bytes::Bytes;
use kiln_blob::chunking::{chunk_reader, ChunkParams};
use kiln_blob::frames::{pack_chunk_list, unpack_chunk_list, CHUNK_ENTRY_BYTES};
use kiln_blob::{ChunkEntry, ChunkHash};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The directory under the release directory that holds kiln's own files.
pub const STATE_DIR: &str = ".kiln";
/// Suffix of files being written; they are never read as a source of chunks.
pub const PART_SUFFIX: &str = ".kiln-part";
/// First bytes of a cache file (the number is the format's version).
const CACHE_MAGIC: &[u8; 8] = b"KILNCL01";
/// How many files are kept open for reading at once.
const MAX_OPEN_FILES: usize = 32;

/// Which file of the index a chunk is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(u32);

/// Where the bytes of a chunk are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    pub file: FileId,
    pub offset: u64,
    pub len: u32,
}

/// What identifies one version of a file: if any of these changed, so may its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
    ino: u64,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        Stamp {
            size: metadata.len(),
            mtime_sec: metadata.mtime(),
            mtime_nsec: metadata.mtime_nsec(),
            ino: metadata.ino(),
        }
    }
}

/// One file chunks may be read from.
#[derive(Debug)]
struct LocalFile {
    path: PathBuf,
    /// The version that was indexed; `None` for a file this release is writing, whose
    /// size grows as it is read.
    stamp: Option<Stamp>,
    /// Cleared when the file turned out not to hold what the index says.
    usable: bool,
    /// Written by this release (and checked as it was written).
    own: bool,
}

/// What a scan did, for the summary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanStats {
    /// Files indexed.
    pub files: usize,
    /// Of those, files cut again (no valid cache entry).
    pub files_cut: usize,
    /// Bytes of the files cut again.
    pub bytes_cut: u64,
    /// Distinct chunks indexed.
    pub chunks: usize,
}

/// A file found by the walk, not yet indexed.
struct Candidate {
    path: PathBuf,
    relative: PathBuf,
    stamp: Stamp,
}

/// Chunk name → where its bytes are, over the files of a release directory and the
/// files this release writes.
pub struct LocalChunks {
    root: PathBuf,
    params: ChunkParams,
    files: Vec<LocalFile>,
    chunks: HashMap<ChunkHash, ChunkLocation>,
    open: HashMap<FileId, File>,
}

impl LocalChunks {
    /// Indexes every regular file under `root` of at least `params.min_size` bytes
    /// (shorter files are one short chunk, which can only be an image's last), except
    /// kiln's own directory `root/.kiln` and `*.kiln-part` files. Symbolic links are not
    /// followed. Chunk lists come from the cache when it is valid; files are cut (and
    /// the cache written) otherwise. When some files must be cut, `on_cut` is told
    /// their total size first, then `on_progress` the bytes cut as it goes.
    ///
    /// A file that cannot be read is left out with a warning; only a failure to read
    /// `root` itself is an error (a missing `root` gives an empty index).
    pub fn scan(
        root: &Path,
        params: ChunkParams,
        on_cut: &dyn Fn(u64),
        on_progress: &(dyn Fn(u64) + Sync),
    ) -> io::Result<(LocalChunks, ScanStats)> {
        let mut index = LocalChunks {
            root: root.to_owned(),
            params,
            files: Vec::new(),
            chunks: HashMap::new(),
            open: HashMap::new(),
        };
        let mut candidates = Vec::new();
        match std::fs::read_dir(root) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Ok((index, ScanStats::default()))
            }
            Err(err) => return Err(err),
            Ok(_) => walk(root, Path::new(""), params.min_size, &mut candidates),
        }
        let mut stats = ScanStats::default();
        let mut to_cut = Vec::new();
        let mut keys = HashSet::new();
        for candidate in candidates {
            keys.insert(cache_key(&candidate.relative));
            match index.cached_chunks(&candidate.relative, &candidate.stamp) {
                Some(entries) => index.add_file(candidate.path, Some(candidate.stamp), &entries),
                None => to_cut.push(candidate),
            }
        }
        let bytes_to_cut = to_cut.iter().map(|candidate| candidate.stamp.size).sum();
        if bytes_to_cut > 0 {
            on_cut(bytes_to_cut);
        }
        for candidate in to_cut {
            match cut(&candidate.path, &params, on_progress) {
                Ok((stamp, entries)) => {
                    stats.files_cut += 1;
                    stats.bytes_cut += stamp.size;
                    index.store_cache(&candidate.relative, &stamp, &entries);
                    index.add_file(candidate.path, Some(stamp), &entries);
                }
                Err(err) => eprintln!(
                    "warning: not reusing chunks of {}: {err}",
                    candidate.path.display()
                ),
            }
        }
        index.forget_cache_except(&keys);
        stats.files = index.files.len();
        stats.chunks = index.chunks.len();
        Ok((index, stats))
    }

    /// Where a chunk's bytes are, if a file that still looks right holds it.
    pub fn locate(&self, hash: &ChunkHash) -> Option<ChunkLocation> {
        self.chunks
            .get(hash)
            .copied()
            .filter(|location| self.files[location.file.0 as usize].usable)
    }

    /// Whether chunks are still read from the file `file_id`.
    pub fn is_usable(&self, file_id: FileId) -> bool {
        self.files[file_id.0 as usize].usable
    }

    /// Records that `hash` is at `location` in a file this release writes. A chunk is
    /// read from the first such file that has it rather than from a file found by the
    /// scan, which may have changed since it was indexed.
    pub fn insert(&mut self, hash: ChunkHash, location: ChunkLocation) {
        match self.chunks.get(&hash) {
            Some(known) if self.is_usable(known.file) && self.files[known.file.0 as usize].own => {}
            _ => {
                self.chunks.insert(hash, location);
            }
        }
    }

    /// The bytes of chunk `hash` at `location`, checked against the name. `None` when
    /// they are not there any more (the file changed, shrank, vanished or cannot be
    /// read): the file is then no longer used, and its cache entry is dropped so that
    /// the next scan cuts it again.
    pub fn read(&mut self, location: ChunkLocation, hash: &ChunkHash) -> Option<Bytes> {
        match self.try_read(location, hash) {
            Ok(Some(bytes)) => Some(bytes),
            Ok(None) | Err(_) => {
                self.forget_file(location.file);
                None
            }
        }
    }

    fn try_read(&mut self, location: ChunkLocation, hash: &ChunkHash) -> io::Result<Option<Bytes>> {
        let file_id = location.file;
        let local = &self.files[file_id.0 as usize];
        if !local.usable {
            return Ok(None);
        }
        if !self.open.contains_key(&file_id) {
            if self.open.len() >= MAX_OPEN_FILES {
                self.open.clear();
            }
            let file = open_no_follow(&local.path)?;
            if let Some(stamp) = local.stamp {
                if Stamp::of(&file.metadata()?) != stamp {
                    return Ok(None);
                }
            }
            self.open.insert(file_id, file);
        }
        let file = &self.open[&file_id];
        let mut bytes = vec![0u8; location.len as usize];
        match file.read_exact_at(&mut bytes, location.offset) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) => return Err(err),
        }
        Ok((ChunkHash::of(&bytes) == *hash).then(|| Bytes::from(bytes)))
    }

    /// Stops using a file, and drops its cache entry if it is one the scan indexed.
    fn forget_file(&mut self, file_id: FileId) {
        self.open.remove(&file_id);
        let local = &mut self.files[file_id.0 as usize];
        if !local.usable {
            return;
        }
        local.usable = false;
        if local.stamp.is_some() {
            let relative = local.path.strip_prefix(&self.root).map(Path::to_owned);
            if let Ok(relative) = relative {
                let _ = std::fs::remove_file(self.cache_path(&relative));
            }
        }
    }

    /// Registers a file this release is writing at `path`, so that the chunks written
    /// to it can be read back for later occurrences.
    pub fn add_writing(&mut self, path: &Path) -> FileId {
        let file_id = self.push_file(path.to_owned(), None);
        self.files[file_id.0 as usize].own = true;
        file_id
    }

    /// The file `file_id` (being written) was renamed to `path` and holds `entries`:
    /// whatever the index knew of the file `path` replaced is dropped, and the new
    /// file's chunk list is cached.
    pub fn committed(&mut self, file_id: FileId, path: &Path, entries: &[ChunkEntry]) {
        let replaced: Vec<FileId> = self
            .files
            .iter()
            .enumerate()
            .filter(|(idx, local)| *idx != file_id.0 as usize && local.usable && local.path == path)
            .map(|(idx, _)| FileId(idx as u32))
            .collect();
        for old in replaced {
            self.open.remove(&old);
            self.files[old.0 as usize].usable = false;
        }
        self.open.remove(&file_id);
        let stamp = std::fs::symlink_metadata(path)
            .ok()
            .map(|metadata| Stamp::of(&metadata));
        let local = &mut self.files[file_id.0 as usize];
        local.path = path.to_owned();
        match stamp {
            Some(stamp) => {
                local.stamp = Some(stamp);
                if stamp.size >= u64::from(self.params.min_size) {
                    if let Ok(relative) = path.strip_prefix(&self.root) {
                        let relative = relative.to_owned();
                        self.store_cache(&relative, &stamp, entries);
                    }
                }
            }
            None => local.usable = false,
        }
    }

    /// The file `file_id` (being written) was abandoned.
    pub fn discard(&mut self, file_id: FileId) {
        self.open.remove(&file_id);
        self.files[file_id.0 as usize].usable = false;
    }

    fn push_file(&mut self, path: PathBuf, stamp: Option<Stamp>) -> FileId {
        let file_id = FileId(u32::try_from(self.files.len()).expect("fewer than 4 billion files"));
        self.files.push(LocalFile {
            path,
            stamp,
            usable: true,
            own: false,
        });
        file_id
    }

    fn add_file(&mut self, path: PathBuf, stamp: Option<Stamp>, entries: &[ChunkEntry]) {
        let file_id = self.push_file(path, stamp);
        let mut offset = 0u64;
        for entry in entries {
            self.chunks.entry(entry.hash).or_insert(ChunkLocation {
                file: file_id,
                offset,
                len: entry.len,
            });
            offset += u64::from(entry.len);
        }
    }

    fn cache_dir(&self) -> PathBuf {
        self.root.join(STATE_DIR).join("chunks")
    }

    fn cache_path(&self, relative: &Path) -> PathBuf {
        self.cache_dir().join(cache_key(relative))
    }

    /// The cached chunk list of the file at `relative`, if the cache entry is whole and
    /// made for this version of the file with these chunking parameters.
    fn cached_chunks(&self, relative: &Path, stamp: &Stamp) -> Option<Vec<ChunkEntry>> {
        let bytes = std::fs::read(self.cache_path(relative)).ok()?;
        decode_cache(&bytes, relative, stamp, &self.params)
    }

    /// Writes a cache entry (temporary file and rename, so that a reader sees the old
    /// entry or the new one). Best effort: the cache only saves time.
    fn store_cache(&self, relative: &Path, stamp: &Stamp, entries: &[ChunkEntry]) {
        let dir = self.cache_dir();
        let write = || -> io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let mut temp = tempfile::NamedTempFile::new_in(&dir)?;
            temp.write_all(&encode_cache(relative, stamp, &self.params, entries))?;
            temp.persist(self.cache_path(relative))
                .map_err(|err| err.error)?;
            Ok(())
        };
        if let Err(err) = write() {
            eprintln!(
                "warning: cannot cache the chunks of {} in {}: {err}",
                relative.display(),
                dir.display()
            );
        }
    }

    /// Removes cache entries of files that are no longer there.
    fn forget_cache_except(&self, keys: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.cache_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if kiln_blob::is_valid_key(name) && !keys.contains(name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Collects the regular files under `dir` (`relative` to the root) of at least
/// `min_size` bytes, in name order, without following symbolic links.
fn walk(dir: &Path, relative: &Path, min_size: u32, out: &mut Vec<Candidate>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            eprintln!("warning: not reusing chunks under {}: {err}", dir.display());
            return;
        }
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let name = entry.file_name();
        let path = entry.path();
        let child = relative.join(&name);
        // The entry's own type: a symbolic link is reported as one, not followed.
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            if relative.as_os_str().is_empty() && name == STATE_DIR {
                continue;
            }
            walk(&path, &child, min_size, out);
        } else if file_type.is_file() {
            if name.as_bytes().ends_with(PART_SUFFIX.as_bytes()) {
                continue;
            }
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_file() && metadata.len() >= u64::from(min_size) {
                out.push(Candidate {
                    path,
                    relative: child,
                    stamp: Stamp::of(&metadata),
                });
            }
        }
    }
}

/// Opens a file for reading, refusing a symbolic link in its place.
fn open_no_follow(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Cuts the file at `path`, returning the version cut. A file that changes while it
/// is cut is refused: its chunk list would describe neither version.
fn cut(
    path: &Path,
    params: &ChunkParams,
    on_progress: &(dyn Fn(u64) + Sync),
) -> io::Result<(Stamp, Vec<ChunkEntry>)> {
    let file = open_no_follow(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let before = Stamp::of(&metadata);
    let reader = ProgressReader {
        inner: &file,
        on_progress,
    };
    let chunked = chunk_reader(reader, params)?;
    let after = Stamp::of(&file.metadata()?);
    if after != before || chunked.digests.size != before.size {
        return Err(io::Error::other("it changed while it was being indexed"));
    }
    Ok((
        before,
        chunked.chunks.iter().map(|chunk| chunk.entry()).collect(),
    ))
}

/// Reads from a file, telling how many bytes each read brought.
struct ProgressReader<'a> {
    inner: &'a File,
    on_progress: &'a (dyn Fn(u64) + Sync),
}

impl io::Read for ProgressReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n_read = io::Read::read(&mut self.inner, buf)?;
        (self.on_progress)(n_read as u64);
        Ok(n_read)
    }
}

/// The name of a file's cache entry: the BLAKE3 of its path under the root.
fn cache_key(relative: &Path) -> String {
    blake3::hash(relative.as_os_str().as_bytes())
        .to_hex()
        .to_string()
}

/// A cache entry: magic, chunking parameters, the file's stamp, its path under the
/// root, its chunk list, and the BLAKE3 of everything before (to tell a damaged entry).
fn encode_cache(
    relative: &Path,
    stamp: &Stamp,
    params: &ChunkParams,
    entries: &[ChunkEntry],
) -> Vec<u8> {
    let path = relative.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(80 + path.len() + entries.len() * CHUNK_ENTRY_BYTES);
    out.extend_from_slice(CACHE_MAGIC);
    for size in [params.min_size, params.avg_size, params.max_size] {
        out.extend_from_slice(&size.to_le_bytes());
    }
    out.extend_from_slice(&stamp.size.to_le_bytes());
    out.extend_from_slice(&stamp.mtime_sec.to_le_bytes());
    out.extend_from_slice(&stamp.mtime_nsec.to_le_bytes());
    out.extend_from_slice(&stamp.ino.to_le_bytes());
    out.extend_from_slice(&(path.len() as u64).to_le_bytes());
    out.extend_from_slice(path);
    out.extend_from_slice(&pack_chunk_list(entries));
    let checksum = blake3::hash(&out);
    out.extend_from_slice(checksum.as_bytes());
    out
}

/// Reads back what [`encode_cache`] wrote, if it is whole and describes this version
/// of the file at `relative`, cut with `params`.
fn decode_cache(
    bytes: &[u8],
    relative: &Path,
    stamp: &Stamp,
    params: &ChunkParams,
) -> Option<Vec<ChunkEntry>> {
    let body_len = bytes.len().checked_sub(32)?;
    let (body, checksum) = bytes.split_at(body_len);
    if blake3::hash(body).as_bytes() != checksum {
        return None;
    }
    let expected_head = {
        let mut head = encode_cache(relative, stamp, params, &[]);
        head.truncate(head.len() - 32);
        head
    };
    let list = body.strip_prefix(expected_head.as_slice())?;
    let entries = unpack_chunk_list(list).ok()?;
    let total: u64 = entries.iter().map(|entry| u64::from(entry.len)).sum();
    let lengths_ok = entries
        .iter()
        .all(|entry| entry.len > 0 && entry.len <= params.max_size);
    (total == stamp.size && lengths_ok).then_some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_blob::noise::noise;

    /// Small chunks, so that a few hundred KiB give many.
    const PARAMS: ChunkParams = ChunkParams {
        min_size: 1024,
        avg_size: 4096,
        max_size: 16384,
    };

    fn scan(root: &Path) -> (LocalChunks, ScanStats) {
        LocalChunks::scan(root, PARAMS, &|_| {}, &|_| {}).unwrap()
    }

    fn entries_of(bytes: &[u8]) -> Vec<ChunkEntry> {
        chunk_reader(bytes, &PARAMS)
            .unwrap()
            .chunks
            .iter()
            .map(|chunk| chunk.entry())
            .collect()
    }

    /// Every chunk of `bytes` is found and reads back right.
    fn assert_all_readable(index: &mut LocalChunks, bytes: &[u8]) {
        for entry in entries_of(bytes) {
            let location = index
                .locate(&entry.hash)
                .unwrap_or_else(|| panic!("chunk {} is not indexed", entry.hash));
            assert_eq!(location.len, entry.len);
            let read = index
                .read(location, &entry.hash)
                .expect("the chunk reads back");
            assert_eq!(ChunkHash::of(&read), entry.hash);
        }
    }

    fn set_mtime(path: &Path, secs_ago: u64) {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let when = std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago);
        file.set_modified(when).unwrap();
    }

    #[test]
    fn files_are_indexed_and_their_chunks_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = noise(200_000, 1);
        let second = noise(150_000, 2);
        std::fs::create_dir_all(dir.path().join("7/PRO")).unwrap();
        std::fs::write(dir.path().join("7/PRO/disk.img"), &first).unwrap();
        std::fs::write(dir.path().join("other.img"), &second).unwrap();
        let (mut index, stats) = scan(dir.path());
        assert_eq!(stats.files, 2);
        assert_eq!(stats.files_cut, 2);
        assert_eq!(stats.bytes_cut, 350_000);
        assert_all_readable(&mut index, &first);
        assert_all_readable(&mut index, &second);
        assert!(index.locate(&ChunkHash::of(b"absent")).is_none());
    }

    #[test]
    fn small_part_and_own_files_and_symlinks_are_not_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("big");
        std::fs::write(&target, noise(100_000, 3)).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linked-dir")).unwrap();
        std::fs::write(dir.path().join("small"), noise(1000, 4)).unwrap();
        std::fs::write(dir.path().join("disk.img.kiln-part"), noise(100_000, 5)).unwrap();
        std::fs::create_dir_all(dir.path().join(".kiln")).unwrap();
        std::fs::write(dir.path().join(".kiln/junk"), noise(100_000, 6)).unwrap();
        let (index, stats) = scan(dir.path());
        assert_eq!(stats, ScanStats::default());
        assert!(index.chunks.is_empty());
    }

    #[test]
    fn a_missing_root_is_an_empty_index() {
        let dir = tempfile::tempdir().unwrap();
        let (index, stats) = scan(&dir.path().join("absent"));
        assert_eq!(stats.files, 0);
        assert!(index.chunks.is_empty());
    }

    #[test]
    fn the_cache_saves_cutting_an_unchanged_file() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = noise(300_000, 7);
        std::fs::write(dir.path().join("disk.img"), &bytes).unwrap();
        let (_, first) = scan(dir.path());
        assert_eq!(first.files_cut, 1);
        let (mut index, second) = scan(dir.path());
        assert_eq!(second.files, 1);
        assert_eq!(second.files_cut, 0, "the cached chunk list is used");
        assert_eq!(second.chunks, first.chunks);
        assert_all_readable(&mut index, &bytes);
    }

    #[test]
    fn a_new_mtime_invalidates_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, noise(300_000, 8)).unwrap();
        set_mtime(&path, 100);
        scan(dir.path());
        // Same size, new bytes, and only the mtime tells.
        let changed = noise(300_000, 9);
        std::fs::write(&path, &changed).unwrap();
        set_mtime(&path, 50);
        let (mut index, stats) = scan(dir.path());
        assert_eq!(stats.files_cut, 1, "a new mtime means cutting again");
        assert_all_readable(&mut index, &changed);
    }

    #[test]
    fn a_new_size_invalidates_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, noise(300_000, 10)).unwrap();
        set_mtime(&path, 100);
        scan(dir.path());
        let mut longer = noise(300_000, 10);
        longer.extend_from_slice(&noise(50_000, 11));
        std::fs::write(&path, &longer).unwrap();
        // The same mtime as before: only the size tells.
        set_mtime(&path, 100);
        let (mut index, stats) = scan(dir.path());
        assert_eq!(stats.files_cut, 1, "a new size means cutting again");
        assert_all_readable(&mut index, &longer);
    }

    #[test]
    fn a_damaged_or_foreign_cache_entry_is_ignored_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let bytes = noise(300_000, 12);
        std::fs::write(&path, &bytes).unwrap();
        scan(dir.path());
        let cache_file = dir
            .path()
            .join(".kiln/chunks")
            .join(cache_key(Path::new("disk.img")));
        let good = std::fs::read(&cache_file).unwrap();

        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 1;
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 40);
        let damaged: [&[u8]; 5] = [b"", b"garbage", &flipped, &truncated, &[0u8; 4096]];
        for damage in damaged {
            std::fs::write(&cache_file, damage).unwrap();
            let (mut index, stats) = scan(dir.path());
            assert_eq!(
                stats.files_cut,
                1,
                "a damaged entry ({} bytes) is ignored",
                damage.len()
            );
            assert_all_readable(&mut index, &bytes);
            assert_eq!(
                std::fs::read(&cache_file).unwrap(),
                good,
                "and written again"
            );
        }

        // A cache entry that is a directory cannot be read: ignored too.
        std::fs::remove_file(&cache_file).unwrap();
        std::fs::create_dir(&cache_file).unwrap();
        let (mut index, stats) = scan(dir.path());
        assert_eq!(stats.files_cut, 1);
        assert_all_readable(&mut index, &bytes);
    }

    #[test]
    fn a_cache_entry_for_other_parameters_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk.img"), noise(300_000, 13)).unwrap();
        scan(dir.path());
        let other = ChunkParams {
            min_size: 2048,
            ..PARAMS
        };
        let (_, stats) = LocalChunks::scan(dir.path(), other, &|_| {}, &|_| {}).unwrap();
        assert_eq!(stats.files_cut, 1);
    }

    #[test]
    fn cache_entries_of_removed_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.img"), noise(100_000, 14)).unwrap();
        std::fs::write(dir.path().join("b.img"), noise(100_000, 15)).unwrap();
        scan(dir.path());
        let cache_dir = dir.path().join(".kiln/chunks");
        assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 2);
        std::fs::remove_file(dir.path().join("a.img")).unwrap();
        scan(dir.path());
        let left: Vec<_> = std::fs::read_dir(&cache_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [cache_key(Path::new("b.img"))]);
    }

    #[test]
    fn a_file_changed_after_indexing_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let bytes = noise(300_000, 16);
        std::fs::write(&path, &bytes).unwrap();
        set_mtime(&path, 100);
        let (mut index, _) = scan(dir.path());
        let entries = entries_of(&bytes);

        // Same size and mtime, other bytes: only reading tells.
        let mut changed = bytes.clone();
        let middle = entries[..entries.len() / 2]
            .iter()
            .map(|entry| entry.len as usize)
            .sum::<usize>()
            + 10;
        changed[middle] ^= 0xff;
        std::fs::write(&path, &changed).unwrap();
        set_mtime(&path, 100);
        let damaged = entries[entries.len() / 2];
        let location = index.locate(&damaged.hash).unwrap();
        assert!(index.read(location, &damaged.hash).is_none());
        // The whole file is no longer used, and the next scan cuts it again.
        assert!(index.locate(&entries[0].hash).is_none());
        let (_, stats) = scan(dir.path());
        assert_eq!(stats.files_cut, 1);
    }

    #[test]
    fn a_file_whose_stamp_changed_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let bytes = noise(300_000, 17);
        std::fs::write(&path, &bytes).unwrap();
        let (mut index, _) = scan(dir.path());
        let entry = entries_of(&bytes)[0];
        // The same bytes, written again: a new mtime is enough not to trust it.
        std::fs::write(&path, &bytes).unwrap();
        set_mtime(&path, 10);
        let location = index.locate(&entry.hash).unwrap();
        assert!(index.read(location, &entry.hash).is_none());
        assert!(index.locate(&entry.hash).is_none());
    }

    #[test]
    fn written_files_are_sources_and_replace_what_they_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let old_bytes = noise(200_000, 18);
        let final_path = dir.path().join("disk.img");
        std::fs::write(&final_path, &old_bytes).unwrap();
        let (mut index, _) = scan(dir.path());

        let new_bytes = noise(200_000, 19);
        let temp = dir.path().join("disk.img.kiln-part");
        std::fs::write(&temp, &new_bytes).unwrap();
        let file_id = index.add_writing(&temp);
        let entries = entries_of(&new_bytes);
        let mut offset = 0;
        for entry in &entries {
            index.insert(
                entry.hash,
                ChunkLocation {
                    file: file_id,
                    offset,
                    len: entry.len,
                },
            );
            offset += u64::from(entry.len);
        }
        assert_all_readable(&mut index, &new_bytes);
        std::fs::rename(&temp, &final_path).unwrap();
        index.committed(file_id, &final_path, &entries);
        assert_all_readable(&mut index, &new_bytes);
        let old_entry = entries_of(&old_bytes)[0];
        assert!(
            index.locate(&old_entry.hash).is_none(),
            "the overwritten file is gone"
        );
        // The new file's chunk list is cached: the next scan does not cut it.
        let (mut index, stats) = scan(dir.path());
        assert_eq!(stats.files_cut, 0);
        assert_all_readable(&mut index, &new_bytes);
    }
}
