//! Content-defined chunking of images (FastCDC), for chunked, deduplicated transfer.
//!
//! [`chunk_file`] and [`chunk_reader`] cut a byte stream into chunks whose boundaries
//! depend on the content, not on offsets, so that an insertion or a deletion changes
//! only the chunks around it. Each [`ChunkRef`] is named by its BLAKE3 hash; the
//! resulting [`ChunkedFile`] also carries the whole-file [`Digests`] computed in the
//! same single read. [`ChunkParams`] sets the minimum, average and maximum chunk size.
//!
//! The work runs as a two-stage pipeline on two threads: one reads, finds boundaries
//! and hashes each chunk; the other computes the whole-file BLAKE3 and SHA-256. Chunk
//! buffers pass between them through a bounded channel, so memory stays at a few MiB
//! whatever the size of the input.

use crate::frames::{ChunkEntry, ChunkHash};
use crate::{Digests, ImageHasher};
use bytes::Bytes;
use fastcdc::v2020::{self as cdc, StreamCDC};
use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc;

/// Content-defined chunking parameters (FastCDC), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    /// No chunk but the last of a stream is shorter than this.
    pub min_size: u32,
    /// The chunk size the boundaries aim at.
    pub avg_size: u32,
    /// No chunk is longer than this.
    pub max_size: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
        }
    }
}

impl ChunkParams {
    /// Refuses sizes out of order or outside what FastCDC supports (which would
    /// otherwise panic inside the chunker).
    fn check(&self) -> io::Result<()> {
        let ChunkParams {
            min_size,
            avg_size,
            max_size,
        } = *self;
        let in_bounds = (cdc::MINIMUM_MIN..=cdc::MINIMUM_MAX).contains(&min_size)
            && (cdc::AVERAGE_MIN..=cdc::AVERAGE_MAX).contains(&avg_size)
            && (cdc::MAXIMUM_MIN..=cdc::MAXIMUM_MAX).contains(&max_size);
        if in_bounds && min_size <= avg_size && avg_size <= max_size {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "invalid chunk sizes {min_size}/{avg_size}/{max_size}: need \
                     min <= avg <= max, min in {}..={}, avg in {}..={}, max in {}..={}",
                    cdc::MINIMUM_MIN,
                    cdc::MINIMUM_MAX,
                    cdc::AVERAGE_MIN,
                    cdc::AVERAGE_MAX,
                    cdc::MAXIMUM_MIN,
                    cdc::MAXIMUM_MAX,
                ),
            ))
        }
    }
}

/// One chunk of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// Where the chunk starts in the file.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u32,
    /// BLAKE3 of its bytes, lowercase hex.
    pub blake3: String,
}

impl ChunkRef {
    /// The chunk-list entry for this chunk.
    pub fn entry(&self) -> ChunkEntry {
        ChunkEntry {
            hash: ChunkHash::parse(&self.blake3).expect("chunk names are made as lowercase hex"),
            len: self.len,
        }
    }
}

/// A file cut into chunks, with its whole-file digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedFile {
    /// The chunks in file order; they cover the file exactly.
    pub chunks: Vec<ChunkRef>,
    /// Size, BLAKE3 and SHA-256 of the whole file.
    pub digests: Digests,
}

/// How many bytes of chunks may wait between the two threads. Enough to absorb jitter
/// between them, small enough that memory stays flat.
const QUEUED_BYTES: usize = 4 << 20;

/// Cuts the file at `path` into content-defined chunks, reading it once and never
/// holding it whole in memory. See [`chunk_reader`].
pub fn chunk_file(path: &Path, params: &ChunkParams) -> io::Result<ChunkedFile> {
    let file = std::fs::File::open(path)?;
    chunk_reader(file, params)
}

/// Cuts the bytes of `reader` into content-defined chunks, hashing each chunk and the
/// whole stream, in one read and bounded memory.
///
/// Chunk boundaries depend only on the bytes and `params`, never on how the reader
/// splits its reads.
pub fn chunk_reader<R: Read + Send>(reader: R, params: &ChunkParams) -> io::Result<ChunkedFile> {
    chunk_reader_with(reader, params, |_, _| Ok(()))
}

/// [`chunk_reader`], handing each chunk with its bytes to `on_chunk` as soon as it is
/// cut, in file order (on the chunking thread). An error from `on_chunk` stops the
/// work and is returned.
pub fn chunk_reader_with<R, F>(
    reader: R,
    params: &ChunkParams,
    mut on_chunk: F,
) -> io::Result<ChunkedFile>
where
    R: Read + Send,
    F: FnMut(&ChunkRef, &Bytes) -> io::Result<()> + Send,
{
    params.check()?;
    let max_size = params.max_size as usize;
    // At least two in flight, so that neither thread waits on a hand-over.
    let queue_len = (QUEUED_BYTES / max_size).max(2);
    let (chunk_sender, chunk_receiver) = mpsc::sync_channel::<Bytes>(queue_len);

    std::thread::scope(|scope| {
        let chunker = scope.spawn(move || -> io::Result<Vec<ChunkRef>> {
            let stream = StreamCDC::new(
                RetryInterrupted(reader),
                params.min_size,
                params.avg_size,
                params.max_size,
            );
            let mut chunks = Vec::new();
            for chunk in stream {
                let chunk = chunk?;
                let len = u32::try_from(chunk.length)
                    .expect("a chunk is never longer than max_size, a u32");
                let chunk_ref = ChunkRef {
                    offset: chunk.offset,
                    len,
                    blake3: blake3::hash(&chunk.data).to_hex().to_string(),
                };
                let data = Bytes::from(chunk.data);
                on_chunk(&chunk_ref, &data)?;
                chunks.push(chunk_ref);
                // The receiver lives until every sender is gone, so this cannot fail.
                let _ = chunk_sender.send(data);
            }
            Ok(chunks)
        });

        // The whole-file digests are computed here while the chunker runs ahead; the
        // loop ends when the chunker drops its sender, at the end or on an error.
        let mut image_hasher = ImageHasher::new();
        for data in chunk_receiver {
            image_hasher.update(&data);
        }
        let chunks = match chunker.join() {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        Ok(ChunkedFile {
            chunks,
            digests: image_hasher.finish(),
        })
    })
}

/// Retries reads interrupted by a signal, which the chunker would otherwise report as
/// a failure of the whole stream.
struct RetryInterrupted<R>(R);

impl<R: Read> Read for RetryInterrupted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                result => return result,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::noise;
    use std::collections::HashSet;
    use std::io::Write;

    /// Small sizes, so that a few hundred KiB give many chunks.
    const SMALL: ChunkParams = ChunkParams {
        min_size: 256,
        avg_size: 1024,
        max_size: 4096,
    };

    fn digests_of(bytes: &[u8]) -> Digests {
        let mut image_hasher = ImageHasher::new();
        image_hasher.update(bytes);
        image_hasher.finish()
    }

    /// Checks everything a chunking of `bytes` must satisfy.
    fn assert_valid_chunking(bytes: &[u8], chunked: &ChunkedFile, params: &ChunkParams) {
        assert_eq!(chunked.digests, digests_of(bytes));
        let mut next_offset = 0u64;
        for (chunk_idx, chunk) in chunked.chunks.iter().enumerate() {
            assert_eq!(
                chunk.offset, next_offset,
                "chunk {chunk_idx} is not contiguous"
            );
            let is_last = chunk_idx + 1 == chunked.chunks.len();
            assert!(chunk.len > 0, "chunk {chunk_idx} is empty");
            assert!(chunk.len <= params.max_size, "chunk {chunk_idx} too long");
            assert!(
                is_last || chunk.len >= params.min_size,
                "chunk {chunk_idx} of {} bytes is shorter than the minimum",
                chunk.len
            );
            let start = chunk.offset as usize;
            let chunk_bytes = &bytes[start..start + chunk.len as usize];
            assert_eq!(chunk.blake3, blake3::hash(chunk_bytes).to_hex().to_string());
            next_offset += u64::from(chunk.len);
        }
        assert_eq!(
            next_offset,
            bytes.len() as u64,
            "chunks do not cover the input"
        );
    }

    fn write_temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file.flush().unwrap();
        file
    }

    #[test]
    fn chunks_of_a_file_cover_it_and_hash_right() {
        let bytes = noise(3 << 20, 1);
        let file = write_temp_file(&bytes);
        let chunked = chunk_file(file.path(), &ChunkParams::default()).unwrap();
        assert!(chunked.chunks.len() > 10, "{} chunks", chunked.chunks.len());
        assert_valid_chunking(&bytes, &chunked, &ChunkParams::default());
    }

    #[test]
    fn many_small_chunks_cover_the_input_and_hash_right() {
        let bytes = noise(300_000, 2);
        let chunked = chunk_reader(&bytes[..], &SMALL).unwrap();
        assert!(
            chunked.chunks.len() > 100,
            "{} chunks",
            chunked.chunks.len()
        );
        assert_valid_chunking(&bytes, &chunked, &SMALL);
    }

    #[test]
    fn uniform_data_is_cut_at_max_size() {
        // Zeros never match the boundary mask, so every chunk but the last is as long
        // as allowed, and they all share one hash.
        let bytes = vec![0u8; 10 * SMALL.max_size as usize + 100];
        let chunked = chunk_reader(&bytes[..], &SMALL).unwrap();
        assert_valid_chunking(&bytes, &chunked, &SMALL);
        assert_eq!(chunked.chunks.len(), 11);
        assert!(chunked.chunks[..10]
            .iter()
            .all(|chunk| chunk.len == SMALL.max_size && chunk.blake3 == chunked.chunks[0].blake3));
        assert_eq!(chunked.chunks[10].len, 100);
    }

    #[test]
    fn same_input_gives_same_chunks() {
        let bytes = noise(1 << 20, 3);
        let first = chunk_reader(&bytes[..], &ChunkParams::default()).unwrap();
        let second = chunk_reader(&bytes[..], &ChunkParams::default()).unwrap();
        assert_eq!(first, second);
    }

    /// Hands out at most `max_read` bytes per read, and an interruption before every
    /// other read.
    struct TrickleReader<'a> {
        bytes: &'a [u8],
        max_read: usize,
        interrupt_next: bool,
    }

    impl Read for TrickleReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt_next = !self.interrupt_next;
            if self.interrupt_next {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(self.max_read).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn boundaries_do_not_depend_on_read_sizes_or_interruptions() {
        let bytes = noise(200_000, 4);
        let whole = chunk_reader(&bytes[..], &SMALL).unwrap();
        let trickle = TrickleReader {
            bytes: &bytes,
            max_read: 7,
            interrupt_next: false,
        };
        let trickled = chunk_reader(trickle, &SMALL).unwrap();
        assert_eq!(trickled, whole);
    }

    #[test]
    fn empty_input_gives_no_chunks_and_empty_digests() {
        let file = write_temp_file(&[]);
        let chunked = chunk_file(file.path(), &ChunkParams::default()).unwrap();
        assert!(chunked.chunks.is_empty());
        assert_eq!(chunked.digests, digests_of(&[]));
        assert_eq!(chunked.digests.size, 0);
    }

    #[test]
    fn input_smaller_than_min_size_is_one_chunk() {
        let bytes = noise(1000, 5);
        let file = write_temp_file(&bytes);
        let chunked = chunk_file(file.path(), &ChunkParams::default()).unwrap();
        assert_eq!(chunked.chunks.len(), 1);
        assert_eq!(chunked.chunks[0].offset, 0);
        assert_eq!(chunked.chunks[0].len, 1000);
        assert_eq!(chunked.chunks[0].blake3, chunked.digests.blake3);
        assert_valid_chunking(&bytes, &chunked, &ChunkParams::default());
    }

    #[test]
    fn insertion_in_the_middle_changes_only_a_few_chunks() {
        let original = noise(8 << 20, 6);
        let middle = original.len() / 2;
        let mut modified = original[..middle].to_vec();
        modified.extend_from_slice(&noise(4096, 7));
        modified.extend_from_slice(&original[middle..]);

        let params = ChunkParams::default();
        let original_chunks = chunk_reader(&original[..], &params).unwrap();
        let modified_chunks = chunk_reader(&modified[..], &params).unwrap();
        assert_valid_chunking(&modified, &modified_chunks, &params);

        let original_hashes: HashSet<&str> = original_chunks
            .chunks
            .iter()
            .map(|chunk| chunk.blake3.as_str())
            .collect();
        let n_shared = modified_chunks
            .chunks
            .iter()
            .filter(|chunk| original_hashes.contains(chunk.blake3.as_str()))
            .count();
        let n_chunks = modified_chunks.chunks.len();
        assert!(n_chunks > 60, "{n_chunks} chunks");
        assert!(
            n_shared * 10 >= n_chunks * 9,
            "only {n_shared} of {n_chunks} chunks survive a 4 KiB insertion"
        );
    }

    /// Yields some bytes, then fails.
    struct FailingReader {
        bytes_left: usize,
    }

    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.bytes_left == 0 {
                return Err(io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.bytes_left);
            buf[..n].fill(0xA5);
            self.bytes_left -= n;
            Ok(n)
        }
    }

    #[test]
    fn read_error_is_returned() {
        let reader = FailingReader {
            bytes_left: 1 << 20,
        };
        let err = chunk_reader(reader, &ChunkParams::default()).unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
    }

    #[test]
    fn missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = chunk_file(&dir.path().join("absent"), &ChunkParams::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn invalid_params_are_refused_not_panicked_on() {
        let out_of_order = ChunkParams {
            min_size: 64 * 1024,
            avg_size: 16 * 1024,
            max_size: 256 * 1024,
        };
        let too_small = ChunkParams {
            min_size: 1,
            ..ChunkParams::default()
        };
        let too_large = ChunkParams {
            max_size: u32::MAX,
            ..ChunkParams::default()
        };
        for params in [out_of_order, too_small, too_large] {
            let err = chunk_reader(&b"bytes"[..], &params).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{params:?}");
        }
    }
}
