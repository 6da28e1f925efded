//! Chunk frames as clients send them over the network, and packed chunk lists.
//!
//! The first byte is the size of the pieces the rest arrives in (0: all at once); the
//! [`FrameReader`] must take frames apart from any split, every frame it yields must
//! decode or be refused, and a header that declares more data than a chunk may have
//! must be refused before the reader waits for (and buffers) that data. The same bytes
//! are also unpacked as a chunk list, which must pack back to them.

#![no_main]

use kiln_blob::frames::{
    pack_chunk_list, unpack_chunk_list, FrameReader, FRAME_HEADER_BYTES, MAX_CHUNK_BYTES,
};
use libfuzzer_sys::fuzz_target;

/// How much longer than its chunk a frame's data may be (the reader's bound for zstd).
const MAX_DATA_BYTES: usize = MAX_CHUNK_BYTES as usize + 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&piece_size, stream)) = data.split_first() else {
        return;
    };
    let piece_size = if piece_size == 0 {
        stream.len().max(1)
    } else {
        usize::from(piece_size)
    };

    let mut reader = FrameReader::new();
    // Where in `stream` the frame the reader is working on starts, and how much of
    // the stream it has been given.
    let mut frame_start = 0;
    let mut pushed = 0;
    'stream: for piece in stream.chunks(piece_size) {
        reader.push(piece);
        pushed += piece.len();
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    frame_start += frame.wire_len();
                    assert!(frame_start <= pushed, "a frame longer than the stream");
                    assert!(frame.data.len() <= MAX_DATA_BYTES);
                    if let Ok(chunk) = frame.decode() {
                        assert_eq!(chunk.len(), frame.raw_len as usize);
                    }
                }
                Ok(None) => {
                    // The reader waits for more: if it has a whole header, that header
                    // must be one it accepts.
                    if pushed - frame_start >= FRAME_HEADER_BYTES {
                        let header = &stream[frame_start..frame_start + FRAME_HEADER_BYTES];
                        let raw_len = u32::from_le_bytes(header[32..36].try_into().unwrap());
                        let data_len = u32::from_le_bytes(header[37..41].try_into().unwrap());
                        assert!((1..=MAX_CHUNK_BYTES).contains(&raw_len), "{raw_len}");
                        assert!(data_len as usize <= MAX_DATA_BYTES, "{data_len}");
                    }
                    break;
                }
                // A server refuses the rest of a stream after a bad frame.
                Err(_) => break 'stream,
            }
        }
    }
    let _ = reader.finish();

    if let Ok(entries) = unpack_chunk_list(stream) {
        assert_eq!(pack_chunk_list(&entries), stream);
    }
});
