//! The chunked image transfer's vocabulary (see docs/transfer.md): chunk names and
//! chunk list entries, and the JSON bodies of the transfer calls.

use serde::{Deserialize, Serialize};
use std::fmt;
use utoipa::ToSchema;

/// A chunk's name: the BLAKE3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// `hashes` without repeats, in their first order.
    pub fn distinct(hashes: &[ChunkHash]) -> Vec<ChunkHash> {
        let mut seen = std::collections::HashSet::with_capacity(hashes.len());
        hashes
            .iter()
            .filter(|hash| seen.insert(**hash))
            .copied()
            .collect()
    }

    /// The name of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ChunkHash(*blake3::hash(bytes).as_bytes())
    }

    /// Parses 64 lowercase hex digits.
    pub fn parse(hex_digits: &str) -> Option<Self> {
        if !is_hex_digest(hex_digits) {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut bytes).ok()?;
        Some(ChunkHash(bytes))
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..12])
    }
}

impl serde::Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl utoipa::PartialSchema for ChunkHash {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9a-f]{64}$"))
            .description(Some(
                "A chunk's name: the BLAKE3 hash of its bytes, 64 lowercase hex digits.",
            ))
            .examples([serde_json::json!(
                "c805427c511d12196cc7cd6141f66be66066672ac39216ffa1784159a99cca8a"
            )])
            .into()
    }
}

impl ToSchema for ChunkHash {}

impl<'de> serde::Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        ChunkHash::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid chunk name {text:?}: expected 64 lowercase hex digits"
            ))
        })
    }
}

/// One entry of an image's chunk list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, ToSchema)]
pub struct ChunkEntry {
    pub hash: ChunkHash,
    /// The chunk's length in bytes, 1 to 1 MiB.
    #[schema(minimum = 1, maximum = 1048576)]
    pub len: u32,
}

/// Whether `text` is a lowercase hex digest of 64 characters (a BLAKE3 or SHA-256).
pub fn is_hex_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The most chunks one `chunks/missing` question may name.
pub const MAX_MISSING_QUERY: usize = 4096;
/// The most chunks one `chunks/fetch` request may name.
pub const MAX_FETCH: usize = 1024;
/// Media type of a body of frames.
pub const FRAMES_CONTENT_TYPE: &str = "application/x-kiln-chunks";
/// Media type of a packed chunk list: [`PACKED_ENTRY_BYTES`] a chunk, back to back.
pub const CHUNK_LIST_CONTENT_TYPE: &str = "application/x-kiln-chunk-list";
/// Bytes of one entry of a packed chunk list: the chunk's BLAKE3 (32 bytes, raw) and
/// its length (u32, little-endian).
pub const PACKED_ENTRY_BYTES: usize = 36;

/// Packs a chunk list, [`PACKED_ENTRY_BYTES`] an entry: 36 bytes a chunk where JSON
/// with hex names takes about 87.
pub fn pack_chunk_list(entries: &[ChunkEntry]) -> Vec<u8> {
    let mut packed = Vec::with_capacity(entries.len() * PACKED_ENTRY_BYTES);
    for entry in entries {
        packed.extend_from_slice(&entry.hash.0);
        packed.extend_from_slice(&entry.len.to_le_bytes());
    }
    packed
}

/// Unpacks what [`pack_chunk_list`] packed; `None` when `packed` is not a whole
/// number of entries.
pub fn unpack_chunk_list(packed: &[u8]) -> Option<Vec<ChunkEntry>> {
    if !packed.len().is_multiple_of(PACKED_ENTRY_BYTES) {
        return None;
    }
    Some(
        packed
            .chunks_exact(PACKED_ENTRY_BYTES)
            .map(|entry| ChunkEntry {
                hash: ChunkHash(entry[..32].try_into().expect("32 bytes")),
                len: u32::from_le_bytes(entry[32..].try_into().expect("4 bytes")),
            })
            .collect(),
    )
}

/// `POST /v1/jobs/B/J/chunks/missing`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissingRequest {
    /// The next chunks of the image, in order, repeats included.
    pub chunks: Vec<ChunkEntry>,
    /// The image they belong to. With it, the server hashes the image in order while
    /// its chunks arrive, so the commit need not read it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Where in the image the first of `chunks` starts (0 starts the image again).
    #[serde(default)]
    pub offset: u64,
}

/// The answer: the chunks the server lacks, in the order asked, each once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissingResponse {
    pub missing: Vec<ChunkHash>,
}

/// The answer to a body of chunks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PutChunksResponse {
    /// Chunks in the body.
    pub chunks: u64,
    /// Bytes of the body.
    pub bytes_received: u64,
    /// Bytes newly written to disk (chunks the server did not have).
    pub bytes_stored: u64,
}

/// `POST /v1/jobs/B/J/images/NAME/commit`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommitRequest {
    /// The image's size in bytes: the sum of its chunks' lengths.
    pub size: u64,
    /// The whole image's BLAKE3, 64 lowercase hex digits.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub blake3: String,
    /// The whole image's SHA-256, 64 lowercase hex digits.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub sha256: String,
    /// The image's chunks in order. Left out (or empty) with `announced_chunks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkEntry>,
    /// Instead of `chunks`: how many chunks the image's `chunks/missing` questions
    /// named, from offset 0 on, in order; those are its chunk list, which then
    /// travels once. Refused with 409 `chunk_list_needed` when the server does not
    /// hold that list (it restarted since, say): commit again with `chunks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced_chunks: Option<u64>,
}

/// `GET /v1/jobs/B/J/images/NAME/index`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageIndex {
    pub name: String,
    pub size: u64,
    pub blake3: String,
    pub sha256: String,
    pub chunks: Vec<ChunkEntry>,
}

/// `POST /v1/chunks/fetch`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FetchRequest {
    pub chunks: Vec<ChunkHash>,
}

/// `GET /v1/storage`: what the server has received and keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StorageStats {
    /// Chunk bytes received on the wire, as sent (compressed).
    pub bytes_received: u64,
    /// Bytes of chunks clients offered that the server already had.
    pub bytes_deduplicated: u64,
    /// Bytes of chunk files on disk.
    pub bytes_stored: u64,
    /// Chunk files on disk.
    pub chunks_stored: u64,
    /// Sum of the sizes of the images stored.
    pub image_bytes: u64,
    /// Images stored.
    pub images: u64,
}

/// `DELETE /v1/builds/B`: what went.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct DeleteReport {
    pub build: String,
    pub jobs: u64,
    pub images: u64,
    /// Chunks no image uses any more, deleted.
    pub chunks_freed: u64,
    pub bytes_freed: u64,
}

#[cfg(test)]
mod tests {
    use super::ChunkHash;

    #[test]
    fn distinct_keeps_each_hash_once_in_its_first_order() {
        let [a, b, c] = [b"a", b"b", b"c"].map(|bytes| ChunkHash::of(bytes));
        assert_eq!(ChunkHash::distinct(&[b, a, b, c, a]), [b, a, c]);
        assert!(ChunkHash::distinct(&[]).is_empty());
    }
}
