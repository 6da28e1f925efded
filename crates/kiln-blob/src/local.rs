//! [`LocalBlobStore`]: blobs as files under `DIR/objects/ab/abcdef...`.

use crate::{is_valid_key, BlobError, BlobRead, BlobStore, ByteReader};
use async_trait::async_trait;
use futures::StreamExt;
use kiln_common::fs::{AtomicFile, TEMP_PREFIX};
use std::ops::Range;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Bytes read from a blob file at a time when streaming it out.
const READ_PIECE: usize = 256 << 10;

/// Blobs as files in a directory, named by their key.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    objects: PathBuf,
}

impl LocalBlobStore {
    /// Opens (creating) the store in `dir`, removing what writes a crash interrupted
    /// left behind (and the staging directory older versions kept).
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects)
            .map_err(|err| BlobError::io(format!("creating {}", objects.display()), err))?;
        let staging = dir.join("staging");
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .map_err(|err| BlobError::io(format!("clearing {}", staging.display()), err))?;
        }
        let shards = std::fs::read_dir(&objects)
            .map_err(|err| BlobError::io(format!("listing {}", objects.display()), err))?;
        for shard in shards.flatten() {
            let Ok(entries) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(LocalBlobStore { objects })
    }

    fn object_path(&self, key: &str) -> Result<PathBuf, BlobError> {
        if !is_valid_key(key) {
            return Err(BlobError::InvalidKey(key.to_owned()));
        }
        Ok(self.objects.join(&key[..2]).join(key))
    }
}

fn not_found_or(key: &str, path: &Path, doing: &str, err: std::io::Error) -> BlobError {
    if err.kind() == std::io::ErrorKind::NotFound {
        BlobError::NotFound(key.to_owned())
    } else {
        BlobError::io(format!("{doing} {}", path.display()), err)
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, key: &str, reader: ByteReader) -> Result<u64, BlobError> {
        let target = self.object_path(key)?;
        if tokio::fs::try_exists(&target).await.unwrap_or(false) {
            // The same key is the same bytes; the reader is not needed.
            return Ok(0);
        }
        let mut reader = tokio_util::io::SyncIoBridge::new(reader);
        tokio::task::spawn_blocking(move || {
            let parent = target.parent().expect("object paths have a parent");
            std::fs::create_dir_all(parent)
                .map_err(|err| BlobError::io(format!("creating {}", parent.display()), err))?;
            let mut file =
                AtomicFile::create(&target).map_err(|err| BlobError::io("storing a blob", err))?;
            let size = std::io::copy(&mut reader, &mut file)
                .map_err(|err| BlobError::io(format!("storing {}", target.display()), err))?;
            file.commit()
                .map_err(|err| BlobError::io("storing a blob", err))?;
            Ok(size)
        })
        .await
        .map_err(|err| BlobError::io("storing a blob", std::io::Error::other(err)))?
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<BlobRead, BlobError> {
        let path = self.object_path(key)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|err| not_found_or(key, &path, "opening", err))?;
        let size = file
            .metadata()
            .await
            .map_err(|err| BlobError::io(format!("reading {}", path.display()), err))?
            .len();
        let range = range.unwrap_or(0..size);
        let end = range.end.min(size);
        file.seek(std::io::SeekFrom::Start(range.start))
            .await
            .map_err(|err| BlobError::io(format!("reading {}", path.display()), err))?;
        let body = futures::stream::unfold(
            (file, end.saturating_sub(range.start), path),
            |(mut file, left, path)| async move {
                if left == 0 {
                    return None;
                }
                let mut piece = vec![0u8; (left as usize).min(READ_PIECE)];
                match file.read(&mut piece).await {
                    Ok(0) => Some((
                        Err(BlobError::io(
                            format!("reading {}", path.display()),
                            std::io::ErrorKind::UnexpectedEof.into(),
                        )),
                        (file, 0, path),
                    )),
                    Ok(n) => {
                        piece.truncate(n);
                        Some((Ok(piece.into()), (file, left - n as u64, path)))
                    }
                    Err(err) => Some((
                        Err(BlobError::io(format!("reading {}", path.display()), err)),
                        (file, 0, path),
                    )),
                }
            },
        )
        .boxed();
        Ok(BlobRead { size, body })
    }

    async fn size(&self, key: &str) -> Result<u64, BlobError> {
        let path = self.object_path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(meta.len()),
            Err(err) => Err(not_found_or(key, &path, "reading", err)),
        }
    }

    async fn contains(&self, key: &str) -> Result<bool, BlobError> {
        Ok(tokio::fs::try_exists(self.object_path(key)?)
            .await
            .unwrap_or(false))
    }

    async fn remove(&self, key: &str) -> Result<(), BlobError> {
        let path = self.object_path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(BlobError::io(format!("deleting {}", path.display()), err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageHasher;

    fn key_of(bytes: &[u8]) -> String {
        let mut hasher = ImageHasher::new();
        hasher.update(bytes);
        hasher.finish().blake3
    }

    async fn read_all(read: BlobRead) -> Vec<u8> {
        let pieces: Vec<_> = read.body.collect().await;
        pieces
            .into_iter()
            .flat_map(|piece| piece.unwrap().to_vec())
            .collect()
    }

    #[tokio::test]
    async fn a_blob_put_reads_back_whole_and_by_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let bytes = crate::noise::noise(600_000, 5);
        let key = key_of(&bytes);
        assert!(!store.contains(&key).await.unwrap());
        let put = store
            .put(&key, Box::new(std::io::Cursor::new(bytes.clone())))
            .await
            .unwrap();
        assert_eq!(put, bytes.len() as u64);
        assert!(store.contains(&key).await.unwrap());
        assert_eq!(store.size(&key).await.unwrap(), bytes.len() as u64);
        assert_eq!(read_all(store.get(&key, None).await.unwrap()).await, bytes);
        let read = store.get(&key, Some(1000..300_000)).await.unwrap();
        assert_eq!(read.size, bytes.len() as u64);
        assert_eq!(read_all(read).await, &bytes[1000..300_000]);
        // Putting the same key again keeps what is there.
        assert_eq!(
            store
                .put(&key, Box::new(std::io::Cursor::new(Vec::new())))
                .await
                .unwrap(),
            0
        );
        assert_eq!(read_all(store.get(&key, None).await.unwrap()).await, bytes);
        let shard = dir.path().join("objects").join(&key[..2]);
        assert_eq!(
            std::fs::read_dir(shard).unwrap().count(),
            1,
            "no temporary file"
        );
    }

    #[tokio::test]
    async fn a_put_that_fails_half_way_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let key = key_of(b"never whole");
        struct Broken;
        impl tokio::io::AsyncRead for Broken {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Err(std::io::Error::other("the network broke")))
            }
        }
        assert!(store.put(&key, Box::new(Broken)).await.is_err());
        assert!(!store.contains(&key).await.unwrap());
        let shard = dir.path().join("objects").join(&key[..2]);
        assert_eq!(std::fs::read_dir(shard).unwrap().count(), 0);
        assert!(matches!(
            store.get(&key, None).await,
            Err(BlobError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn keys_that_are_not_digests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.size("../../etc/passwd").await,
            Err(BlobError::InvalidKey(_))
        ));
    }

    #[test]
    fn hasher_matches_known_digests() {
        let mut hasher = ImageHasher::new();
        hasher.update(b"abc");
        let digests = hasher.finish();
        assert_eq!(
            digests.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            digests.blake3,
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(digests.size, 3);
    }
}
