//! Chunks on the wire and at rest: names, frames and chunk lists.
//!
//! A chunk travels as a **frame**: its BLAKE3 name (32 bytes), its raw length (u32
//! LE), an encoding byte (raw or zstd), the length of the data (u32 LE) and the data.
//! The same frames carry chunks from client to server and from server to `kiln
//! release`; [`FrameReader`] takes them apart from a stream of arbitrary pieces, and
//! [`Frame::decode`] checks one against its name. An image's **chunk list** is packed
//! as 36 bytes a chunk (name, length) by [`pack_chunk_list`].

use bytes::{Bytes, BytesMut};
pub use kiln_proto::transfer::{ChunkEntry, ChunkHash};

/// The longest chunk accepted anywhere (the chunker's maximum is 256 KiB).
pub const MAX_CHUNK_BYTES: u32 = 1 << 20;
/// How much longer than its chunk a compressed encoding may be.
const MAX_EXPANSION: u32 = 1024;
/// The fixed part of a frame before its data.
pub const FRAME_HEADER_BYTES: usize = 32 + 4 + 1 + 4;
/// Bytes of one entry of a packed chunk list.
pub const CHUNK_ENTRY_BYTES: usize = kiln_proto::transfer::PACKED_ENTRY_BYTES;
/// The zstd level chunks are compressed with: fast, and most of the gain on disk
/// images (runs of zeros, text, executables).
const ZSTD_LEVEL: i32 = 1;
/// How many leading bytes of a chunk are compressed to judge whether the whole is
/// worth compressing.
const SAMPLE_BYTES: usize = 4096;

/// How a frame's data holds its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The data is the chunk.
    Raw = 0,
    /// The data is one zstd frame that decompresses to the chunk.
    Zstd = 1,
}

impl Encoding {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Zstd),
            _ => None,
        }
    }
}

/// What was wrong with a frame or a chunk list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("chunk {hash}: its length {len} is outside 1..={MAX_CHUNK_BYTES}")]
    BadLength { hash: ChunkHash, len: u32 },
    #[error("chunk {hash}: unknown encoding {encoding}")]
    BadEncoding { hash: ChunkHash, encoding: u8 },
    #[error("chunk {hash}: {data_len} bytes of data for a {raw_len}-byte chunk")]
    BadDataLength {
        hash: ChunkHash,
        raw_len: u32,
        data_len: u32,
    },
    #[error("chunk {hash}: the compressed data is damaged: {reason}")]
    Undecodable { hash: ChunkHash, reason: String },
    #[error("chunk {hash}: decodes to {actual} bytes, not the {expected} announced")]
    LengthMismatch {
        hash: ChunkHash,
        expected: u32,
        actual: usize,
    },
    #[error("chunk {hash}: its bytes hash to {actual}")]
    HashMismatch { hash: ChunkHash, actual: ChunkHash },
    #[error("the stream ends inside a frame ({0} bytes left over)")]
    Truncated(usize),
    #[error("a chunk list of {0} bytes is not a whole number of {CHUNK_ENTRY_BYTES}-byte entries")]
    BadChunkList(usize),
}

/// One frame taken off the wire, not yet checked against its name.
#[derive(Debug, Clone)]
pub struct Frame {
    pub hash: ChunkHash,
    pub raw_len: u32,
    pub encoding: Encoding,
    pub data: Bytes,
}

impl Frame {
    /// Encodes `chunk` for the wire and for storage: zstd when a sample of it
    /// compresses, else as it is.
    pub fn encode(chunk: &[u8]) -> Frame {
        Frame::encode_named(ChunkHash::of(chunk), chunk)
    }

    /// [`Frame::encode`] for a chunk whose name is already known.
    pub fn encode_named(hash: ChunkHash, chunk: &[u8]) -> Frame {
        Frame::encode_shared(hash, &Bytes::copy_from_slice(chunk))
    }

    /// [`Frame::encode`] for a chunk whose name is known and whose bytes are shared:
    /// a chunk that does not compress travels as the same bytes, not a copy.
    pub fn encode_shared(hash: ChunkHash, chunk: &Bytes) -> Frame {
        let raw_len = u32::try_from(chunk.len()).expect("chunks are shorter than 4 GiB");
        if let Some(compressed) = compress_if_it_pays(chunk) {
            return Frame {
                hash,
                raw_len,
                encoding: Encoding::Zstd,
                data: Bytes::from(compressed),
            };
        }
        Frame {
            hash,
            raw_len,
            encoding: Encoding::Raw,
            data: chunk.clone(),
        }
    }

    /// The chunk's bytes, checked against the frame's length and name.
    pub fn decode(&self) -> Result<Bytes, FrameError> {
        let raw = self.decompress()?;
        let actual = ChunkHash::of(&raw);
        if actual != self.hash {
            return Err(FrameError::HashMismatch {
                hash: self.hash,
                actual,
            });
        }
        Ok(raw)
    }

    /// The chunk's bytes, checked against the frame's length but not its name: for
    /// readers that hash what they read anyway (a whole image against its digest).
    pub fn decompress(&self) -> Result<Bytes, FrameError> {
        let hash = self.hash;
        let raw = match self.encoding {
            Encoding::Raw => self.data.clone(),
            Encoding::Zstd => {
                let raw =
                    zstd::bulk::decompress(&self.data, self.raw_len as usize).map_err(|err| {
                        FrameError::Undecodable {
                            hash,
                            reason: err.to_string(),
                        }
                    })?;
                Bytes::from(raw)
            }
        };
        if raw.len() != self.raw_len as usize {
            return Err(FrameError::LengthMismatch {
                hash,
                expected: self.raw_len,
                actual: raw.len(),
            });
        }
        Ok(raw)
    }

    /// Bytes of the frame on the wire.
    pub fn wire_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.data.len()
    }

    /// Appends the frame to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash.0);
        self.write_body_to(out);
    }

    /// Appends everything but the name: the form a chunk is stored in.
    pub fn write_body_to(&self, out: &mut Vec<u8>) {
        self.write_header_to(out);
        out.extend_from_slice(&self.data);
    }

    /// Appends the stored form's header (raw length, encoding, data length), which
    /// the data follows.
    pub fn write_header_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.push(self.encoding as u8);
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
    }

    /// Reads back what [`Frame::write_body_to`] wrote, for the chunk named `hash`.
    pub fn from_body(hash: ChunkHash, mut body: Bytes) -> Result<Frame, FrameError> {
        let mut named = BytesMut::with_capacity(32 + body.len());
        named.extend_from_slice(&hash.0);
        named.extend_from_slice(&body.split_off(0));
        let mut reader = FrameReader::new();
        reader.push(&named);
        let frame = reader
            .next_frame()?
            .ok_or(FrameError::Truncated(named.len()))?;
        reader.finish()?;
        Ok(frame)
    }
}

thread_local! {
    /// One zstd context a thread, made once: making one costs more than compressing
    /// a sample with it.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `chunk` compressed, when a sample of it compresses and the whole comes out
/// shorter; `None` when it is better sent as it is (random or already compressed
/// bytes, the bulk of a fresh image, are caught by the sample).
fn compress_if_it_pays(chunk: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        let compressor = cell.as_mut()?;
        let sample = &chunk[..chunk.len().min(SAMPLE_BYTES)];
        let sampled = compressor.compress(sample).ok()?;
        if sampled.len() * 100 >= sample.len() * 95 {
            return None;
        }
        let compressed = compressor.compress(chunk).ok()?;
        (compressed.len() < chunk.len()).then_some(compressed)
    })
}

/// Takes frames apart from a byte stream that arrives in arbitrary pieces.
///
/// Each frame's data is copied once, from the pieces into a buffer of exactly its
/// length, allocated when its header has been read and checked. kiln's chunker cuts
/// chunks of at most 256 KiB, under the size `kiln server` maps on its own, so these
/// buffers come from the allocator's heap and are used again as frames are let go,
/// rather than fresh pages for every piece (a buffer that grew with the stream was
/// mapped anew, page by page, as it grew).
pub struct FrameReader {
    /// The header being read, and how much of it has arrived.
    header: [u8; FRAME_HEADER_BYTES],
    header_len: usize,
    /// The frame whose header was read, while its data arrives.
    open: Option<OpenFrame>,
    /// Whole frames not yet taken.
    ready: std::collections::VecDeque<Frame>,
    /// What was wrong with the stream, once something was: given after the frames
    /// before it, and nothing is read after it.
    error: Option<FrameError>,
}

/// A frame whose data is arriving.
struct OpenFrame {
    hash: ChunkHash,
    raw_len: u32,
    encoding: Encoding,
    data: Vec<u8>,
    data_len: usize,
}

impl FrameReader {
    /// A reader that has seen nothing.
    pub fn new() -> Self {
        FrameReader {
            header: [0; FRAME_HEADER_BYTES],
            header_len: 0,
            open: None,
            ready: std::collections::VecDeque::new(),
            error: None,
        }
    }

    /// Adds the next piece of the stream.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.error.is_none() {
            if let Some(open) = &mut self.open {
                let n = (open.data_len - open.data.len()).min(bytes.len());
                open.data.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if open.data.len() == open.data_len {
                    let open = self.open.take().expect("a frame being read");
                    self.ready.push_back(Frame {
                        hash: open.hash,
                        raw_len: open.raw_len,
                        encoding: open.encoding,
                        data: Bytes::from(open.data),
                    });
                }
                continue;
            }
            let n = (FRAME_HEADER_BYTES - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == FRAME_HEADER_BYTES {
                self.header_len = 0;
                match read_header(&self.header) {
                    Ok(open) => self.open = Some(open),
                    Err(err) => self.error = Some(err),
                }
            }
        }
    }

    /// The next whole frame, or `None` until more bytes arrive. The header is checked
    /// as soon as it has arrived (length bounds, encoding), so a hostile stream cannot
    /// make the reader buffer more than one frame's worth.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(frame) = self.ready.pop_front() {
            return Ok(Some(frame));
        }
        match &self.error {
            Some(err) => Err(err.clone()),
            None => Ok(None),
        }
    }

    /// Checks that the stream ended between frames, and that none was refused.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        let left = self.header_len
            + self
                .open
                .as_ref()
                .map_or(0, |open| FRAME_HEADER_BYTES + open.data.len());
        if left == 0 {
            Ok(())
        } else {
            Err(FrameError::Truncated(left))
        }
    }
}

/// Checks a frame's header and makes room for its data.
fn read_header(header: &[u8; FRAME_HEADER_BYTES]) -> Result<OpenFrame, FrameError> {
    let hash = ChunkHash(header[..32].try_into().expect("32 bytes"));
    let raw_len = u32::from_le_bytes(header[32..36].try_into().expect("4 bytes"));
    let encoding_byte = header[36];
    let data_len = u32::from_le_bytes(header[37..41].try_into().expect("4 bytes"));
    if raw_len == 0 || raw_len > MAX_CHUNK_BYTES {
        return Err(FrameError::BadLength { hash, len: raw_len });
    }
    let encoding = Encoding::from_byte(encoding_byte).ok_or(FrameError::BadEncoding {
        hash,
        encoding: encoding_byte,
    })?;
    let data_fits = match encoding {
        Encoding::Raw => data_len == raw_len,
        Encoding::Zstd => data_len > 0 && data_len <= raw_len + MAX_EXPANSION,
    };
    if !data_fits {
        return Err(FrameError::BadDataLength {
            hash,
            raw_len,
            data_len,
        });
    }
    Ok(OpenFrame {
        hash,
        raw_len,
        encoding,
        data: Vec::with_capacity(data_len as usize),
        data_len: data_len as usize,
    })
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

/// Packs a chunk list, 36 bytes an entry (see [`kiln_proto::transfer::pack_chunk_list`]).
pub fn pack_chunk_list(entries: &[ChunkEntry]) -> Vec<u8> {
    kiln_proto::transfer::pack_chunk_list(entries)
}

/// Unpacks what [`pack_chunk_list`] packed.
pub fn unpack_chunk_list(packed: &[u8]) -> Result<Vec<ChunkEntry>, FrameError> {
    kiln_proto::transfer::unpack_chunk_list(packed).ok_or(FrameError::BadChunkList(packed.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::noise;

    fn round_trip(frames: &[Frame], piece: usize) -> Vec<Frame> {
        let mut wire = Vec::new();
        for frame in frames {
            frame.write_to(&mut wire);
        }
        let mut reader = FrameReader::new();
        let mut out = Vec::new();
        for piece in wire.chunks(piece) {
            reader.push(piece);
            while let Some(frame) = reader.next_frame().unwrap() {
                out.push(frame);
            }
        }
        reader.finish().unwrap();
        out
    }

    #[test]
    fn compressible_chunks_are_compressed_and_noise_is_not() {
        let zeros = vec![0u8; 65536];
        let text = b"kiln builds images. ".repeat(3000);
        let random = noise(65536, 1);
        let frames = [
            Frame::encode(&zeros),
            Frame::encode(&text),
            Frame::encode(&random),
        ];
        assert_eq!(frames[0].encoding, Encoding::Zstd);
        assert!(frames[0].data.len() < 100);
        assert_eq!(frames[1].encoding, Encoding::Zstd);
        assert_eq!(frames[2].encoding, Encoding::Raw);
        for (frame, bytes) in frames.iter().zip([&zeros[..], &text[..], &random[..]]) {
            assert_eq!(frame.decode().unwrap(), bytes);
        }
    }

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let frames: Vec<Frame> = (0..5)
            .map(|seed| {
                let mut bytes = noise(1000 + seed as usize * 7000, seed);
                if seed % 2 == 0 {
                    bytes.extend(std::iter::repeat_n(7u8, 20_000));
                }
                Frame::encode(&bytes)
            })
            .collect();
        for piece in [1, 7, 41, 4096, 1 << 20] {
            let back = round_trip(&frames, piece);
            assert_eq!(back.len(), frames.len());
            for (a, b) in back.iter().zip(&frames) {
                assert_eq!(a.hash, b.hash);
                assert_eq!(a.decode().unwrap(), b.decode().unwrap());
            }
        }
    }

    #[test]
    fn a_flipped_bit_is_refused_naming_the_chunk() {
        let bytes = noise(5000, 3);
        let mut frame = Frame::encode(&bytes);
        let mut data = frame.data.to_vec();
        data[100] ^= 1;
        frame.data = Bytes::from(data);
        let err = frame.decode().unwrap_err();
        assert!(matches!(err, FrameError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&ChunkHash::of(&bytes).to_hex()));
    }

    #[test]
    fn damaged_compressed_data_is_refused() {
        let mut frame = Frame::encode(&vec![1u8; 50_000]);
        assert_eq!(frame.encoding, Encoding::Zstd);
        let mut data = frame.data.to_vec();
        let middle = data.len() / 2;
        data[middle] ^= 0xff;
        data.truncate(data.len() - 2);
        frame.data = Bytes::from(data);
        assert!(frame.decode().is_err());
    }

    #[test]
    fn a_wrong_length_is_refused() {
        let bytes = vec![9u8; 3000];
        let mut frame = Frame::encode(&bytes);
        frame.raw_len = 2999;
        assert!(frame.decode().is_err());
    }

    #[test]
    fn hostile_headers_are_refused_before_buffering() {
        let mut reader = FrameReader::new();
        let mut header = vec![0u8; 32];
        header.extend_from_slice(&(u32::MAX).to_le_bytes());
        header.push(0);
        header.extend_from_slice(&(u32::MAX).to_le_bytes());
        reader.push(&header);
        assert!(matches!(
            reader.next_frame(),
            Err(FrameError::BadLength { .. })
        ));

        let mut reader = FrameReader::new();
        let mut header = vec![0u8; 32];
        header.extend_from_slice(&100u32.to_le_bytes());
        header.push(1);
        header.extend_from_slice(&(10_000u32).to_le_bytes());
        reader.push(&header);
        assert!(matches!(
            reader.next_frame(),
            Err(FrameError::BadDataLength { .. })
        ));

        let mut reader = FrameReader::new();
        let mut header = vec![0u8; 32];
        header.extend_from_slice(&100u32.to_le_bytes());
        header.push(9);
        header.extend_from_slice(&100u32.to_le_bytes());
        reader.push(&header);
        assert!(matches!(
            reader.next_frame(),
            Err(FrameError::BadEncoding { encoding: 9, .. })
        ));
    }

    #[test]
    fn frames_before_a_refused_one_are_given_then_the_refusal_and_nothing_after() {
        let mut wire = Vec::new();
        let good = Frame::encode(&noise(3000, 5));
        good.write_to(&mut wire);
        let mut bad = vec![0u8; 32];
        bad.extend_from_slice(&100u32.to_le_bytes());
        bad.push(9);
        bad.extend_from_slice(&100u32.to_le_bytes());
        wire.extend_from_slice(&bad);
        Frame::encode(b"after").write_to(&mut wire);
        let mut reader = FrameReader::new();
        reader.push(&wire);
        assert_eq!(reader.next_frame().unwrap().unwrap().hash, good.hash);
        for _ in 0..2 {
            assert!(matches!(
                reader.next_frame(),
                Err(FrameError::BadEncoding { encoding: 9, .. })
            ));
        }
        reader.push(&wire);
        assert!(
            reader.next_frame().is_err(),
            "nothing is read after a refusal"
        );
        assert!(matches!(
            reader.finish(),
            Err(FrameError::BadEncoding { .. })
        ));
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_reported() {
        let mut wire = Vec::new();
        Frame::encode(b"abc").write_to(&mut wire);
        wire.pop();
        let mut reader = FrameReader::new();
        reader.push(&wire);
        assert!(reader.next_frame().unwrap().is_none());
        assert_eq!(reader.finish(), Err(FrameError::Truncated(wire.len())));
    }

    #[test]
    fn stored_body_reads_back() {
        let frame = Frame::encode(&vec![4u8; 10_000]);
        let mut body = Vec::new();
        frame.write_body_to(&mut body);
        let back = Frame::from_body(frame.hash, Bytes::from(body)).unwrap();
        assert_eq!(back.decode().unwrap(), vec![4u8; 10_000]);
    }

    #[test]
    fn chunk_lists_pack_and_unpack() {
        let entries: Vec<ChunkEntry> = (0..10u32)
            .map(|n| ChunkEntry {
                hash: ChunkHash::of(&n.to_le_bytes()),
                len: n * 1000 + 1,
            })
            .collect();
        let packed = pack_chunk_list(&entries);
        assert_eq!(packed.len(), 360);
        assert_eq!(unpack_chunk_list(&packed).unwrap(), entries);
        assert!(unpack_chunk_list(&packed[..35]).is_err());
    }

    #[test]
    fn hashes_parse_only_from_lowercase_hex() {
        let hash = ChunkHash::of(b"x");
        assert_eq!(ChunkHash::parse(&hash.to_hex()), Some(hash));
        assert_eq!(ChunkHash::parse(&hash.to_hex().to_uppercase()), None);
        assert_eq!(ChunkHash::parse("../../etc/passwd"), None);
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(serde_json::from_str::<ChunkHash>(&json).unwrap(), hash);
        assert!(serde_json::from_str::<ChunkHash>("\"zz\"").is_err());
    }
}
