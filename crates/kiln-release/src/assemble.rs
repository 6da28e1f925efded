//! Writes one image from its chunk list: each chunk the release directory already has
//! is copied from there (its bytes checked against its name), the others are fetched
//! from the server in batches. The file is written in order to a temporary file while
//! a second thread computes its whole-file BLAKE3 and SHA-256; it takes its name only
//! when size and both hashes are what the server recorded.
//!
//! Memory stays bounded whatever the size of the image: one batch's frames are read
//! off the response as they are written, never held together.

use crate::local::{ChunkLocation, FileId, LocalChunks, PART_SUFFIX};
use crate::ReleaseError;
use bytes::Bytes;
use kiln_api::CallError;
use kiln_blob::frames::FrameReader;
use kiln_blob::{ChunkEntry, ChunkHash, Digests, Frame, ImageHasher};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Most chunks asked for in one fetch: the server's limit.
pub const FETCH_BATCH: usize = kiln_proto::transfer::MAX_FETCH;
/// Most chunks planned at once. A batch's response waits while the chunks copied
/// between its frames are written, so this bounds that wait; it also bounds how much
/// is planned again when a local file turns out to have changed.
const WINDOW_CHUNKS: usize = 2048;
/// Chunks queued for the hashing thread (at most 256 KiB each).
const HASH_QUEUE: usize = 32;

/// The bytes of a fetch response, in the pieces they arrive in.
pub type Pieces = Box<dyn Iterator<Item = Result<Bytes, CallError>>>;

/// Where the chunks the release directory lacks come from.
pub trait ChunkSource {
    /// Asks for `hashes` (at most [`FETCH_BATCH`]); the answer is one frame per hash,
    /// in that order.
    fn fetch(&mut self, hashes: &[ChunkHash]) -> Result<Pieces, CallError>;
}

/// Why the answer to a fetch is not the chunks asked for.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The answer could not be read.
    #[error(transparent)]
    Call(#[from] CallError),
    /// A frame of the answer is malformed, or its bytes do not match its hash.
    #[error(transparent)]
    Frame(#[from] kiln_blob::frames::FrameError),
    /// The answer ended early.
    #[error("the answer ended before chunk {0}")]
    Ended(ChunkHash),
    /// A frame holds another chunk than the one asked for at its place.
    #[error("the server sent chunk {sent} where chunk {asked} was asked for")]
    Wrong { sent: ChunkHash, asked: ChunkHash },
    /// A chunk's length is not the one the image's index gives it.
    #[error("chunk {hash} is {got} bytes, not the {len} of the image's index")]
    Length {
        hash: ChunkHash,
        got: usize,
        len: u32,
    },
    /// More frames came than were asked for.
    #[error("the server sent chunk {0} after every chunk asked for")]
    Extra(ChunkHash),
}

/// What a release copied and fetched.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Image bytes copied from files already in the release directory (or written by
    /// this release).
    pub bytes_reused: u64,
    /// Image bytes downloaded, uncompressed.
    pub bytes_fetched: u64,
    /// Bytes received for them, as sent (chunks compressed).
    pub wire_bytes: u64,
    /// Chunks copied.
    pub chunks_reused: u64,
    /// Chunks downloaded.
    pub chunks_fetched: u64,
}

/// What an image must turn out to be.
pub struct Expected<'a> {
    /// How messages name the image: `BUILD/JOB/NAME`.
    pub label: &'a str,
    pub size: u64,
    /// BLAKE3, lowercase hex.
    pub blake3: &'a str,
    /// SHA-256, lowercase hex.
    pub sha256: &'a str,
}

/// The path an image is written to before it is verified.
pub fn part_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(PART_SUFFIX);
    PathBuf::from(name)
}

/// Writes the image made of `chunks` to `path`, copying what `index` has and fetching
/// the rest from `source`, and refuses it (leaving nothing at `path`'s temporary name
/// and `path` untouched) unless its size, BLAKE3 and SHA-256 are `expected`. The chunks
/// written become sources for the rest of the release. `on_written` is told the bytes
/// of each chunk written.
pub fn assemble(
    index: &mut LocalChunks,
    source: &mut dyn ChunkSource,
    chunks: &[ChunkEntry],
    expected: &Expected<'_>,
    path: &Path,
    counts: &mut Counts,
    on_written: &dyn Fn(u64),
) -> Result<(), ReleaseError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(ReleaseError::io(format!("creating {}", parent.display())))?;
    }
    let part = PartFile::create(part_path(path))?;
    let file_id = index.add_writing(&part.path);
    let written = write_chunks(
        index, source, chunks, expected, &part, file_id, counts, on_written,
    );
    let digests = match written {
        Ok(digests) => digests,
        Err(err) => {
            index.discard(file_id);
            return Err(err);
        }
    };
    if digests.size != expected.size
        || digests.sha256 != expected.sha256
        || digests.blake3 != expected.blake3
    {
        index.discard(file_id);
        return Err(ReleaseError::Mismatch(Box::new(crate::Mismatch {
            label: expected.label.to_owned(),
            path: path.to_owned(),
            size: digests.size,
            expected_size: expected.size,
            sha256: digests.sha256,
            expected_sha256: expected.sha256.to_owned(),
            blake3: digests.blake3,
            expected_blake3: expected.blake3.to_owned(),
        })));
    }
    if let Err(err) = part.commit(path) {
        index.discard(file_id);
        return Err(err);
    }
    index.committed(file_id, path, chunks);
    Ok(())
}

/// How one chunk of a window is had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Copied from a local file.
    Copy(ChunkLocation),
    /// The next frame of the window's fetch.
    Fetch,
}

/// Consecutive chunks of the image, planned together.
#[derive(Debug)]
struct Window {
    steps: Vec<Step>,
    /// The chunks to fetch, in the order their frames are needed.
    asked: Vec<ChunkHash>,
}

/// Plans the chunks from `start`: copied when a usable local file has them (the file
/// being written included, for a chunk that repeats within the window), else fetched.
/// The window ends at [`WINDOW_CHUNKS`] chunks or [`FETCH_BATCH`] chunks to fetch.
fn plan(
    index: &LocalChunks,
    chunks: &[ChunkEntry],
    offsets: &[u64],
    start: usize,
    writing: FileId,
) -> Window {
    let writing_usable = index.is_usable(writing);
    let mut steps = Vec::new();
    let mut asked = Vec::new();
    let mut fetched_here: HashMap<ChunkHash, ChunkLocation> = HashMap::new();
    for (position, entry) in chunks.iter().enumerate().skip(start) {
        if steps.len() == WINDOW_CHUNKS || asked.len() == FETCH_BATCH {
            break;
        }
        let step = match index
            .locate(&entry.hash)
            .or_else(|| fetched_here.get(&entry.hash).copied())
        {
            Some(location) => Step::Copy(location),
            None => {
                asked.push(entry.hash);
                if writing_usable {
                    fetched_here.insert(
                        entry.hash,
                        ChunkLocation {
                            file: writing,
                            offset: offsets[position],
                            len: entry.len,
                        },
                    );
                }
                Step::Fetch
            }
        };
        steps.push(step);
    }
    Window { steps, asked }
}

/// Writes every chunk in order; returns the digests of what was written, synced.
#[allow(clippy::too_many_arguments)]
fn write_chunks(
    index: &mut LocalChunks,
    source: &mut dyn ChunkSource,
    chunks: &[ChunkEntry],
    expected: &Expected<'_>,
    part: &PartFile,
    writing: FileId,
    counts: &mut Counts,
    on_written: &dyn Fn(u64),
) -> Result<Digests, ReleaseError> {
    let label = expected.label;
    let from_server = |source| ReleaseError::Chunks {
        label: label.to_owned(),
        source,
    };
    let offsets: Vec<u64> = chunks
        .iter()
        .scan(0u64, |offset, entry| {
            let here = *offset;
            *offset += u64::from(entry.len);
            Some(here)
        })
        .collect();
    let hashing = Hashing::start();
    let mut file = &part.file;
    let mut position = 0;
    'window: while position < chunks.len() {
        let window = plan(index, chunks, &offsets, position, writing);
        let mut feed: Option<FrameFeed> = None;
        for step in window.steps {
            let entry = chunks[position];
            let bytes = match step {
                Step::Copy(location) => match index.read(location, &entry.hash) {
                    Some(bytes) => {
                        counts.chunks_reused += 1;
                        counts.bytes_reused += bytes.len() as u64;
                        bytes
                    }
                    // The file did not hold it after all, and is no longer used: plan
                    // again from this chunk (the rest of this fetch is dropped).
                    None => continue 'window,
                },
                Step::Fetch => {
                    if feed.is_none() {
                        let pieces =
                            source
                                .fetch(&window.asked)
                                .map_err(|source| ReleaseError::Fetch {
                                    label: label.to_owned(),
                                    source,
                                })?;
                        feed = Some(FrameFeed::new(pieces));
                    }
                    let feed = feed.as_mut().expect("the feed was just started");
                    let bytes = feed.next_chunk(&entry, counts).map_err(from_server)?;
                    counts.chunks_fetched += 1;
                    counts.bytes_fetched += bytes.len() as u64;
                    bytes
                }
            };
            file.write_all(&bytes)
                .map_err(ReleaseError::io(format!("writing {}", part.path.display())))?;
            index.insert(
                entry.hash,
                ChunkLocation {
                    file: writing,
                    offset: offsets[position],
                    len: entry.len,
                },
            );
            on_written(bytes.len() as u64);
            hashing.update(bytes);
            position += 1;
        }
        if let Some(feed) = feed {
            feed.finish(counts).map_err(from_server)?;
        }
    }
    file.sync_all()
        .map_err(ReleaseError::io(format!("writing {}", part.path.display())))?;
    Ok(hashing.finish())
}

/// Frames taken off a fetch response as they are needed.
struct FrameFeed {
    pieces: Pieces,
    reader: FrameReader,
}

impl FrameFeed {
    fn new(pieces: Pieces) -> Self {
        FrameFeed {
            pieces,
            reader: FrameReader::new(),
        }
    }

    /// The next frame, reading more of the response as needed; `None` at its end.
    fn next_frame(&mut self, counts: &mut Counts) -> Result<Option<Frame>, FetchError> {
        loop {
            if let Some(frame) = self.reader.next_frame()? {
                return Ok(Some(frame));
            }
            match self.pieces.next() {
                Some(piece) => {
                    let piece = piece?;
                    counts.wire_bytes += piece.len() as u64;
                    self.reader.push(&piece);
                }
                None => {
                    self.reader.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// The bytes of the next frame, which must be the chunk `entry`, checked.
    fn next_chunk(&mut self, entry: &ChunkEntry, counts: &mut Counts) -> Result<Bytes, FetchError> {
        let frame = self
            .next_frame(counts)?
            .ok_or(FetchError::Ended(entry.hash))?;
        if frame.hash != entry.hash {
            return Err(FetchError::Wrong {
                sent: frame.hash,
                asked: entry.hash,
            });
        }
        let bytes = frame.decode()?;
        if bytes.len() != entry.len as usize {
            return Err(FetchError::Length {
                hash: entry.hash,
                got: bytes.len(),
                len: entry.len,
            });
        }
        Ok(bytes)
    }

    /// Checks that nothing follows the frames asked for.
    fn finish(mut self, counts: &mut Counts) -> Result<(), FetchError> {
        match self.next_frame(counts)? {
            None => Ok(()),
            Some(frame) => Err(FetchError::Extra(frame.hash)),
        }
    }
}

/// The whole-file BLAKE3 and SHA-256, computed on their own thread.
struct Hashing {
    sender: std::sync::mpsc::SyncSender<Bytes>,
    worker: std::thread::JoinHandle<Digests>,
}

impl Hashing {
    fn start() -> Self {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Bytes>(HASH_QUEUE);
        let worker = std::thread::spawn(move || {
            let mut hasher = ImageHasher::new();
            for bytes in receiver {
                hasher.update(&bytes);
            }
            hasher.finish()
        });
        Hashing { sender, worker }
    }

    fn update(&self, bytes: Bytes) {
        // The thread only ends once the sender is dropped (or on a panic, which
        // `finish` passes on).
        let _ = self.sender.send(bytes);
    }

    fn finish(self) -> Digests {
        drop(self.sender);
        self.worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// A temporary file next to an image's place, removed unless committed.
struct PartFile {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl PartFile {
    fn create(path: PathBuf) -> Result<Self, ReleaseError> {
        let file = File::create(&path)
            .map_err(ReleaseError::io(format!("creating {}", path.display())))?;
        Ok(PartFile {
            path,
            file,
            committed: false,
        })
    }

    /// Gives the (synced) file its name `path`, durably.
    fn commit(mut self, path: &Path) -> Result<(), ReleaseError> {
        std::fs::rename(&self.path, path)
            .map_err(ReleaseError::io(format!("writing {}", path.display())))?;
        self.committed = true;
        sync_parent(path);
        Ok(())
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes a rename in `path`'s directory durable. Best effort: the file itself is
/// already synced, and a lost rename only means downloading it again.
pub fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_blob::chunking::{chunk_reader, ChunkParams};
    use kiln_blob::noise::noise;
    use std::cell::RefCell;
    use std::rc::Rc;

    const PARAMS: ChunkParams = ChunkParams {
        min_size: 1024,
        avg_size: 4096,
        max_size: 16384,
    };

    /// A server in memory: every chunk of the images it was given, and a log of the
    /// batches asked for.
    #[derive(Default)]
    struct FakeServer {
        chunks: HashMap<ChunkHash, Vec<u8>>,
        asked: Rc<RefCell<Vec<Vec<ChunkHash>>>>,
        /// Damage the chunk of this name when sending it.
        corrupt: Option<ChunkHash>,
    }

    impl FakeServer {
        /// Adds an image; returns its chunk list and digests.
        fn add(&mut self, bytes: &[u8]) -> (Vec<ChunkEntry>, Digests) {
            let chunked = chunk_reader(bytes, &PARAMS).unwrap();
            for chunk in &chunked.chunks {
                let start = chunk.offset as usize;
                self.chunks.insert(
                    chunk.entry().hash,
                    bytes[start..start + chunk.len as usize].to_vec(),
                );
            }
            let entries = chunked.chunks.iter().map(|chunk| chunk.entry()).collect();
            (entries, chunked.digests)
        }
    }

    impl ChunkSource for FakeServer {
        fn fetch(&mut self, hashes: &[ChunkHash]) -> Result<Pieces, CallError> {
            assert!(
                hashes.len() <= FETCH_BATCH,
                "{} asked at once",
                hashes.len()
            );
            self.asked.borrow_mut().push(hashes.to_vec());
            let mut body = Vec::new();
            for hash in hashes {
                let mut frame = Frame::encode(&self.chunks[hash]);
                if self.corrupt == Some(*hash) {
                    let mut data = frame.data.to_vec();
                    data[0] ^= 1;
                    frame.data = Bytes::from(data);
                }
                frame.write_to(&mut body);
            }
            // Pieces of an awkward size, as a network would cut them.
            let pieces: Vec<Result<Bytes, CallError>> = body
                .chunks(1000)
                .map(|piece| Ok(Bytes::copy_from_slice(piece)))
                .collect();
            Ok(Box::new(pieces.into_iter()))
        }
    }

    fn scan(root: &Path) -> LocalChunks {
        LocalChunks::scan(root, PARAMS, &|_| {}, &|_| {}).unwrap().0
    }

    fn write_image(
        index: &mut LocalChunks,
        server: &mut FakeServer,
        entries: &[ChunkEntry],
        digests: &Digests,
        path: &Path,
    ) -> anyhow::Result<Counts> {
        let mut counts = Counts::default();
        let expected = Expected {
            label: "1/job/disk.img",
            size: digests.size,
            blake3: &digests.blake3,
            sha256: &digests.sha256,
        };
        assemble(
            index,
            server,
            entries,
            &expected,
            path,
            &mut counts,
            &|_| {},
        )?;
        Ok(counts)
    }

    #[test]
    fn an_image_with_nothing_local_is_fetched_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = FakeServer::default();
        // About 1500 chunks of 4 KiB: two batches.
        let bytes = noise(6 << 20, 1);
        let (entries, digests) = server.add(&bytes);
        assert!(entries.len() > FETCH_BATCH);
        let mut index = scan(dir.path());
        let path = dir.path().join("1/PRO/disk.img");
        let counts = write_image(&mut index, &mut server, &entries, &digests, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(counts.bytes_fetched, bytes.len() as u64);
        assert_eq!(counts.chunks_fetched, entries.len() as u64);
        assert_eq!(counts.bytes_reused, 0);
        assert!(counts.wire_bytes >= counts.bytes_fetched);
        let asked = server.asked.borrow();
        assert!(asked.len() >= 2, "{} batches", asked.len());
        assert!(asked.iter().all(|batch| batch.len() <= FETCH_BATCH));
        assert!(!part_path(&path).exists());
    }

    #[test]
    fn a_similar_image_reuses_local_chunks_and_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = FakeServer::default();
        let old = noise(1 << 20, 2);
        std::fs::write(dir.path().join("old.img"), &old).unwrap();
        // The old image with a change in the middle, and a run of zeros (the same
        // chunk many times) at the end.
        let mut new = old.clone();
        new[500_000..500_100].copy_from_slice(&noise(100, 3));
        new.resize(new.len() + 200_000, 0);
        let (entries, digests) = server.add(&new);
        let mut index = scan(dir.path());
        let path = dir.path().join("new.img");
        let counts = write_image(&mut index, &mut server, &entries, &digests, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), new);
        assert_eq!(counts.bytes_reused + counts.bytes_fetched, new.len() as u64);
        assert!(
            counts.bytes_fetched < 100_000,
            "{} bytes fetched",
            counts.bytes_fetched
        );
        let asked: Vec<ChunkHash> = server.asked.borrow().concat();
        let mut distinct = asked.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), asked.len(), "no chunk is asked for twice");

        // A second image of the same release: everything is local now.
        let again = dir.path().join("again.img");
        let counts = write_image(&mut index, &mut server, &entries, &digests, &again).unwrap();
        assert_eq!(counts.bytes_fetched, 0);
        assert_eq!(counts.chunks_reused, entries.len() as u64);
        assert_eq!(std::fs::read(&again).unwrap(), new);
    }

    #[test]
    fn a_local_file_changed_after_indexing_is_fetched_around() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = FakeServer::default();
        let bytes = noise(1 << 20, 4);
        let old_path = dir.path().join("old.img");
        std::fs::write(&old_path, &bytes).unwrap();
        let (entries, digests) = server.add(&bytes);
        let mut index = scan(dir.path());
        // Same size, same mtime, one byte changed: only reading can tell.
        let metadata = std::fs::metadata(&old_path).unwrap();
        let mut changed = bytes.clone();
        changed[300_000] ^= 0xff;
        std::fs::write(&old_path, &changed).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&old_path)
            .unwrap()
            .set_modified(metadata.modified().unwrap())
            .unwrap();

        let path = dir.path().join("new.img");
        let counts = write_image(&mut index, &mut server, &entries, &digests, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert!(counts.chunks_fetched > 0, "the changed chunk is fetched");
        assert!(
            counts.chunks_reused > 0,
            "chunks before the change were copied"
        );
        assert_eq!(
            counts.bytes_reused + counts.bytes_fetched,
            bytes.len() as u64
        );

        // Every chunk is in the file just written, those copied from the changed file
        // included: the same image again needs nothing from the server.
        let again = dir.path().join("again.img");
        let counts = write_image(&mut index, &mut server, &entries, &digests, &again).unwrap();
        assert_eq!(counts.bytes_fetched, 0);
        assert_eq!(std::fs::read(&again).unwrap(), bytes);
    }

    #[test]
    fn a_damaged_chunk_from_the_server_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = FakeServer::default();
        let bytes = noise(200_000, 5);
        let (entries, digests) = server.add(&bytes);
        server.corrupt = Some(entries[3].hash);
        let mut index = scan(dir.path());
        let path = dir.path().join("disk.img");
        let err = write_image(&mut index, &mut server, &entries, &digests, &path).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("1/job/disk.img"), "{message}");
        assert!(message.contains(&entries[3].hash.to_hex()), "{message}");
        assert!(!path.exists());
        assert!(!part_path(&path).exists());
    }

    #[test]
    fn digests_that_do_not_match_are_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = FakeServer::default();
        let bytes = noise(200_000, 6);
        let (entries, mut digests) = server.add(&bytes);
        let actual_sha256 = digests.sha256.clone();
        digests.sha256 = "0".repeat(64);
        let mut index = scan(dir.path());
        let path = dir.path().join("disk.img");
        let err = write_image(&mut index, &mut server, &entries, &digests, &path).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("1/job/disk.img"), "{message}");
        assert!(message.contains(&actual_sha256), "{message}");
        assert!(message.contains(&digests.sha256), "{message}");
        assert!(!path.exists());
        assert!(!part_path(&path).exists());
        // Nothing of the refused file is offered as a source.
        assert!(index.locate(&entries[0].hash).is_none());
    }

    #[test]
    fn an_empty_image_is_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = FakeServer::default();
        let (entries, digests) = server.add(&[]);
        let mut index = scan(dir.path());
        let path = dir.path().join("empty.img");
        let counts = write_image(&mut index, &mut server, &entries, &digests, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        assert_eq!(counts, Counts::default());
    }
}
