//! The chunk store: each distinct chunk kept once, compressed, crash-safely.
//!
//! [`ChunkStore`] is what the server needs from wherever chunks rest;
//! [`LocalChunkStore`] keeps them as files `DIR/ab/abcdef...` holding the chunk's
//! stored form (see [`Frame::write_body_to`]). The calls block: the server makes them
//! from blocking threads.
//!
//! Writes are crash-safe a batch at a time: every new chunk of a batch is written to
//! a temporary `.part-*` file beside its final name, the file system is synced once
//! (`syncfs`), and the files are renamed into place. (Temporary files live in the 256
//! shard directories rather than one directory: creating thousands of files a second
//! in a single directory serialises on its lock.) A file under a chunk's name is therefore always whole, and one sync
//! covers thousands of chunks where an fsync per chunk would cost a journal commit
//! each. The renames become durable at the next [`ChunkStore::sync`], which the server
//! calls before it records an image that lists them: a crash before that loses only
//! chunks no image lists yet, which the client is told are missing and sends again.

use crate::chunking::{chunk_reader_with, ChunkParams, ChunkedFile};
use crate::frames::{ChunkEntry, ChunkHash, Frame};
use crate::{BlobError, Digests, ImageHasher};
use bytes::Bytes;
use rand::RngCore;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// What storing a batch of chunks did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PutStats {
    /// Chunks that were not stored before.
    pub new_chunks: u64,
    /// Bytes those take on disk.
    pub new_bytes: u64,
}

/// Where the server keeps chunks.
pub trait ChunkStore: Send + Sync + 'static {
    /// Which of `hashes` are not stored, in the order given, each once.
    fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError>;
    /// Stores chunks already checked against their names ([`Frame::decode`]); the
    /// ones already stored are skipped. Their bytes are durable when this returns;
    /// their names are after the next [`ChunkStore::sync`].
    fn put(&self, frames: &[Frame]) -> Result<PutStats, BlobError>;
    /// Makes everything stored so far durable, names included.
    fn sync(&self) -> Result<(), BlobError>;
    /// A chunk in its stored form, ready to send.
    fn read_frame(&self, hash: &ChunkHash) -> Result<Frame, BlobError>;
    /// Every stored chunk with the bytes it takes.
    fn list(&self) -> Result<Vec<(ChunkHash, u64)>, BlobError>;
    /// Deletes a chunk; returns the bytes freed (0 if it was not there).
    fn remove(&self, hash: &ChunkHash) -> Result<u64, BlobError>;
    /// Deletes what interrupted writes left behind more than `older_than` ago; returns
    /// how many.
    fn remove_leftovers(&self, older_than: std::time::Duration) -> Result<u64, BlobError>;

    /// A chunk's bytes, checked against its name: a damaged file on disk is reported,
    /// never served.
    fn read(&self, hash: &ChunkHash) -> Result<Bytes, BlobError> {
        self.read_frame(hash)?
            .decode()
            .map_err(|err| BlobError::io("reading a stored chunk", io::Error::other(err)))
    }

    /// A chunk's bytes, length-checked only: for readers that hash the whole image.
    fn read_unchecked(&self, hash: &ChunkHash) -> Result<Bytes, BlobError> {
        self.read_frame(hash)?
            .decompress()
            .map_err(|err| BlobError::io("reading a stored chunk", io::Error::other(err)))
    }
}

/// Chunks as files in a directory.
#[derive(Debug, Clone)]
pub struct LocalChunkStore {
    dir: PathBuf,
}

/// How a temporary chunk file's name starts.
const PART_PREFIX: &str = ".part-";

impl LocalChunkStore {
    /// Opens (creating) the store in `dir` with its 256 shard directories.
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        for shard in 0..=255u8 {
            let shard = dir.join(hex::encode([shard]));
            std::fs::create_dir_all(&shard)
                .map_err(|err| BlobError::io(format!("creating {}", shard.display()), err))?;
        }
        Ok(LocalChunkStore {
            dir: dir.to_owned(),
        })
    }

    fn path_of(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Flushes everything written on the file system holding the store.
    fn sync_all(&self) -> Result<(), BlobError> {
        let dir = std::fs::File::open(&self.dir)
            .map_err(|err| BlobError::io(format!("opening {}", self.dir.display()), err))?;
        // SAFETY: syncfs takes a file descriptor, which `dir` keeps open for the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(BlobError::io(
                "syncing the chunk store",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

impl ChunkStore for LocalChunkStore {
    fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BlobError> {
        let mut seen = std::collections::HashSet::with_capacity(hashes.len());
        let mut missing = Vec::new();
        for hash in hashes {
            if seen.insert(*hash) && !self.path_of(hash).exists() {
                missing.push(*hash);
            }
        }
        Ok(missing)
    }

    fn put(&self, frames: &[Frame]) -> Result<PutStats, BlobError> {
        let mut written: Vec<(PathBuf, PathBuf, u64)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut header = Vec::new();
        let result = (|| {
            for frame in frames {
                let target = self.path_of(&frame.hash);
                if !seen.insert(frame.hash) || target.exists() {
                    continue;
                }
                let mut name = [0u8; 12];
                rand::thread_rng().fill_bytes(&mut name);
                let temp = target.with_file_name(format!("{PART_PREFIX}{}", hex::encode(name)));
                // The header, then the data as it came: no copy of the data.
                header.clear();
                frame.write_header_to(&mut header);
                std::fs::File::create(&temp)
                    .and_then(|mut file| {
                        file.write_all(&header)?;
                        file.write_all(&frame.data)
                    })
                    .map_err(|err| BlobError::io(format!("writing chunk {}", frame.hash), err))?;
                written.push((temp, target, (header.len() + frame.data.len()) as u64));
            }
            if written.is_empty() {
                return Ok(PutStats::default());
            }
            self.sync_all()?;
            let mut stats = PutStats::default();
            for (temp, target, bytes) in &written {
                if rename_no_replace(temp, target)
                    .map_err(|err| BlobError::io(format!("storing {}", target.display()), err))?
                {
                    stats.new_chunks += 1;
                    stats.new_bytes += bytes;
                } else {
                    // Another upload stored the same chunk meanwhile: same bytes.
                    let _ = std::fs::remove_file(temp);
                }
            }
            Ok(stats)
        })();
        if result.is_err() {
            for (temp, _, _) in &written {
                let _ = std::fs::remove_file(temp);
            }
        }
        result
    }

    fn sync(&self) -> Result<(), BlobError> {
        self.sync_all()
    }

    fn read_frame(&self, hash: &ChunkHash) -> Result<Frame, BlobError> {
        let path = self.path_of(hash);
        let body = match std::fs::read(&path) {
            Ok(body) => body,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(format!("chunk {hash}")))
            }
            Err(err) => return Err(BlobError::io(format!("reading {}", path.display()), err)),
        };
        Frame::from_body(*hash, Bytes::from(body)).map_err(|err| {
            BlobError::io(format!("reading {}", path.display()), io::Error::other(err))
        })
    }

    fn list(&self) -> Result<Vec<(ChunkHash, u64)>, BlobError> {
        let mut chunks = Vec::new();
        let shards = std::fs::read_dir(&self.dir)
            .map_err(|err| BlobError::io(format!("listing {}", self.dir.display()), err))?;
        for shard in shards {
            let shard = shard.map_err(|err| BlobError::io("listing the chunk store", err))?;
            let shard_path = shard.path();
            if !shard_path.is_dir() {
                continue;
            }
            let entries = std::fs::read_dir(&shard_path)
                .map_err(|err| BlobError::io(format!("listing {}", shard_path.display()), err))?;
            for entry in entries {
                let entry = entry.map_err(|err| BlobError::io("listing the chunk store", err))?;
                let name = entry.file_name();
                let Some(hash) = name.to_str().and_then(ChunkHash::parse) else {
                    continue;
                };
                let bytes = entry.metadata().map(|meta| meta.len()).unwrap_or(0);
                chunks.push((hash, bytes));
            }
        }
        Ok(chunks)
    }

    fn remove(&self, hash: &ChunkHash) -> Result<u64, BlobError> {
        let path = self.path_of(hash);
        let bytes = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(BlobError::io(format!("reading {}", path.display()), err)),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(bytes),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(err) => Err(BlobError::io(format!("deleting {}", path.display()), err)),
        }
    }

    fn remove_leftovers(&self, older_than: std::time::Duration) -> Result<u64, BlobError> {
        let mut removed = 0;
        let now = std::time::SystemTime::now();
        for shard in 0..=255u8 {
            let shard = self.dir.join(hex::encode([shard]));
            let Ok(entries) = std::fs::read_dir(&shard) else {
                continue;
            };
            for entry in entries.flatten() {
                let is_part = entry.file_name().to_string_lossy().starts_with(PART_PREFIX);
                let old = entry
                    .metadata()
                    .and_then(|meta| meta.modified())
                    .ok()
                    .and_then(|modified| now.duration_since(modified).ok())
                    .is_some_and(|age| age >= older_than);
                if is_part && old && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Renames `from` to `to` unless `to` exists; returns whether it renamed. Two
/// uploads storing the same chunk at once then count it once.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are NUL-terminated paths that live across the call.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if result == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(false),
        // A file system without RENAME_NOREPLACE: a plain rename, counted as new.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::rename(from_path(&from), from_path(&to)).map(|()| true)
        }
        _ => Err(err),
    }
}

fn from_path(path: &std::ffi::CStr) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(path.to_bytes()))
}

/// How many bytes of encoded chunks [`ingest`] gathers before storing them.
const INGEST_BATCH_BYTES: usize = 16 << 20;

/// Cuts the bytes of `reader` into chunks and stores them: how the server keeps an
/// image that arrives whole. Returns the chunking and what storing it added.
pub fn ingest<R: Read + Send>(
    store: &dyn ChunkStore,
    reader: R,
    params: &ChunkParams,
) -> Result<(ChunkedFile, PutStats), BlobError> {
    let mut batch: Vec<Frame> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut stats = PutStats::default();
    let mut failure: Option<BlobError> = None;
    let flush = |batch: &mut Vec<Frame>, stats: &mut PutStats| -> Result<(), BlobError> {
        let added = store.put(batch)?;
        stats.new_chunks += added.new_chunks;
        stats.new_bytes += added.new_bytes;
        batch.clear();
        Ok(())
    };
    let chunked = chunk_reader_with(reader, params, |chunk, data| {
        let frame = Frame::encode_named(chunk.entry().hash, data);
        batch_bytes += frame.data.len();
        batch.push(frame);
        if batch_bytes >= INGEST_BATCH_BYTES {
            batch_bytes = 0;
            if let Err(err) = flush(&mut batch, &mut stats) {
                let message = err.to_string();
                failure = Some(err);
                return Err(io::Error::other(message));
            }
        }
        Ok(())
    });
    if let Some(err) = failure {
        return Err(err);
    }
    let chunked = chunked.map_err(|err| BlobError::io("cutting an image into chunks", err))?;
    flush(&mut batch, &mut stats)?;
    store.sync()?;
    Ok((chunked, stats))
}

/// How many decoded chunks may wait between the two threads of [`read_image`].
const READ_AHEAD_CHUNKS: usize = 32;

/// Reads an image back from its chunks in order, computing its whole-file digests,
/// and hands each chunk to `sink` (which may discard it). Two threads: one reads and
/// decodes, the other hashes. A chunk missing is an error; a damaged one shows in the
/// digests (chunks are not checked one by one: the whole-file hash covers them).
pub fn read_image<F>(
    store: &dyn ChunkStore,
    entries: &[ChunkEntry],
    mut sink: F,
) -> Result<Digests, BlobError>
where
    F: FnMut(&[u8]) -> Result<(), BlobError> + Send,
{
    let (sender, receiver) = mpsc::sync_channel::<Bytes>(READ_AHEAD_CHUNKS);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<(), BlobError> {
            for entry in entries {
                let bytes = store.read_unchecked(&entry.hash)?;
                if bytes.len() != entry.len as usize {
                    return Err(BlobError::io(
                        format!("chunk {}", entry.hash),
                        io::Error::other(format!(
                            "{} bytes stored where the image lists {}",
                            bytes.len(),
                            entry.len
                        )),
                    ));
                }
                if sender.send(bytes).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut hasher = ImageHasher::new();
        let mut sink_result = Ok(());
        for bytes in receiver.iter() {
            hasher.update(&bytes);
            if let Err(err) = sink(&bytes) {
                sink_result = Err(err);
                break;
            }
        }
        drop(receiver);
        let read_result = match reader.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        read_result?;
        sink_result?;
        Ok(hasher.finish())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::noise;

    #[test]
    fn chunks_are_stored_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let a = Frame::encode(&noise(70_000, 1));
        let b = Frame::encode(&vec![0u8; 70_000]);
        assert_eq!(
            store.missing(&[a.hash, b.hash, a.hash]).unwrap(),
            vec![a.hash, b.hash]
        );
        let stats = store.put(&[a.clone(), b.clone(), a.clone()]).unwrap();
        assert_eq!(stats.new_chunks, 2);
        assert!(
            stats.new_bytes < 70_000 + 100,
            "zeros are compressed: {stats:?}"
        );
        assert!(store.missing(&[a.hash, b.hash]).unwrap().is_empty());
        assert_eq!(
            store.put(std::slice::from_ref(&a)).unwrap(),
            PutStats::default()
        );
        assert_eq!(store.read(&a.hash).unwrap(), a.decode().unwrap());
        assert_eq!(store.read(&b.hash).unwrap(), vec![0u8; 70_000]);
        let mut listed: Vec<ChunkHash> =
            store.list().unwrap().into_iter().map(|(h, _)| h).collect();
        listed.sort();
        let mut expected = vec![a.hash, b.hash];
        expected.sort();
        assert_eq!(listed, expected);
        assert!(store.remove(&a.hash).unwrap() > 0);
        assert_eq!(store.remove(&a.hash).unwrap(), 0);
        assert!(matches!(store.read(&a.hash), Err(BlobError::NotFound(_))));
        assert_eq!(
            store.remove_leftovers(std::time::Duration::ZERO).unwrap(),
            0,
            "no temporary file is left behind"
        );
    }

    #[test]
    fn a_chunk_stored_by_two_writers_at_once_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let frame = Frame::encode(&noise(30_000, 9));
        // Both writers saw the chunk missing; the second rename finds it there.
        let target = store.path_of(&frame.hash);
        let first = target.with_file_name(".part-first");
        let second = target.with_file_name(".part-second");
        std::fs::write(&first, b"x").unwrap();
        std::fs::write(&second, b"x").unwrap();
        assert!(rename_no_replace(&first, &target).unwrap());
        assert!(!rename_no_replace(&second, &target).unwrap());
        assert!(second.exists(), "the loser's file is left to its writer");
    }

    #[test]
    fn a_damaged_chunk_file_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let frame = Frame::encode(&noise(20_000, 2));
        store.put(std::slice::from_ref(&frame)).unwrap();
        let path = store.path_of(&frame.hash);
        let mut body = std::fs::read(&path).unwrap();
        let last = body.len() - 1;
        body[last] ^= 1;
        std::fs::write(&path, body).unwrap();
        assert!(store.read(&frame.hash).is_err());
    }

    #[test]
    fn partial_writes_are_removed_once_old_and_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let leftover = dir.path().join("ab").join(format!("{PART_PREFIX}0123"));
        std::fs::write(&leftover, b"half a chunk").unwrap();
        assert!(store.list().unwrap().is_empty());
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(store.remove_leftovers(hour).unwrap(), 0, "too young");
        assert!(leftover.exists());
        assert_eq!(
            store.remove_leftovers(std::time::Duration::ZERO).unwrap(),
            1
        );
        assert!(!leftover.exists());
    }

    #[test]
    fn ingested_image_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let mut image = noise(3 << 20, 3);
        image.extend(vec![0u8; 1 << 20]);
        let (chunked, stats) = ingest(&store, &image[..], &ChunkParams::default()).unwrap();
        assert!(stats.new_chunks > 10);
        let entries: Vec<ChunkEntry> = chunked.chunks.iter().map(|c| c.entry()).collect();
        let mut back = Vec::new();
        let digests = read_image(&store, &entries, |bytes| {
            back.extend_from_slice(bytes);
            Ok(())
        })
        .unwrap();
        assert_eq!(back, image);
        assert_eq!(digests, chunked.digests);

        // The same image again stores nothing new.
        let (_, again) = ingest(&store, &image[..], &ChunkParams::default()).unwrap();
        assert_eq!(again, PutStats::default());
    }

    #[test]
    fn reading_an_image_with_a_missing_chunk_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let image = noise(1 << 20, 4);
        let (chunked, _) = ingest(&store, &image[..], &ChunkParams::default()).unwrap();
        let entries: Vec<ChunkEntry> = chunked.chunks.iter().map(|c| c.entry()).collect();
        store.remove(&entries[3].hash).unwrap();
        let err = read_image(&store, &entries, |_| Ok(())).unwrap_err();
        assert!(matches!(err, BlobError::NotFound(_)), "{err}");
    }
}
