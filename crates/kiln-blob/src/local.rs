//! [`LocalBlobStore`]: blobs as files under `DIR/objects/ab/abcdef...`.

use crate::{is_valid_key, BlobError, BlobStore, StagedBlob};
use async_trait::async_trait;
use rand::RngCore;
use std::path::{Path, PathBuf};

/// Blobs as files in a directory, named by their key.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    objects: PathBuf,
    staging: PathBuf,
}

impl LocalBlobStore {
    /// Opens (creating) the store in `dir`, clearing staging files a crash left behind.
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        let objects = dir.join("objects");
        let staging = dir.join("staging");
        std::fs::create_dir_all(&objects)
            .map_err(|err| BlobError::io(format!("creating {}", objects.display()), err))?;
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .map_err(|err| BlobError::io(format!("clearing {}", staging.display()), err))?;
        }
        std::fs::create_dir_all(&staging)
            .map_err(|err| BlobError::io(format!("creating {}", staging.display()), err))?;
        Ok(LocalBlobStore { objects, staging })
    }

    fn object_path(&self, key: &str) -> Result<PathBuf, BlobError> {
        if !is_valid_key(key) {
            return Err(BlobError::InvalidKey(key.to_owned()));
        }
        Ok(self.objects.join(&key[..2]).join(key))
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn stage(&self) -> Result<StagedBlob, BlobError> {
        let mut bytes = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut bytes);
        let path = self.staging.join(format!("{}.part", hex::encode(bytes)));
        Ok(StagedBlob {
            path,
            committed: false,
        })
    }

    async fn commit(&self, mut staged: StagedBlob, key: &str) -> Result<(), BlobError> {
        let target = self.object_path(key)?;
        let source = staged.path.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<(), BlobError> {
            let parent = target.parent().expect("object paths have a parent");
            if target.exists() {
                return Ok(());
            }
            std::fs::create_dir_all(parent)
                .map_err(|err| BlobError::io(format!("creating {}", parent.display()), err))?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&source)
                .map_err(|err| BlobError::io(format!("opening {}", source.display()), err))?;
            file.sync_all()
                .map_err(|err| BlobError::io(format!("syncing {}", source.display()), err))?;
            std::fs::rename(&source, &target)
                .map_err(|err| BlobError::io(format!("storing {}", target.display()), err))?;
            fsync_dir(parent)
                .map_err(|err| BlobError::io(format!("syncing {}", parent.display()), err))?;
            Ok(())
        })
        .await
        .map_err(|err| BlobError::io("storing a blob", std::io::Error::other(err)))?;
        // Renamed away (or already present): either way the staging file is no longer ours.
        staged.committed = result.is_ok();
        if staged.committed {
            let _ = std::fs::remove_file(&staged.path);
        }
        result
    }

    async fn contains(&self, key: &str) -> Result<bool, BlobError> {
        Ok(tokio::fs::try_exists(self.object_path(key)?)
            .await
            .unwrap_or(false))
    }

    async fn size(&self, key: &str) -> Result<u64, BlobError> {
        let path = self.object_path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(meta.len()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Err(BlobError::NotFound(key.to_owned()))
            }
            Err(err) => Err(BlobError::io(format!("reading {}", path.display()), err)),
        }
    }

    fn local_path(&self, key: &str) -> Result<PathBuf, BlobError> {
        self.object_path(key)
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

    #[tokio::test]
    async fn staged_blob_is_visible_only_after_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let staged = store.stage().await.unwrap();
        std::fs::write(staged.path(), b"image bytes").unwrap();
        let mut hasher = ImageHasher::new();
        hasher.update(b"image bytes");
        let key = hasher.finish().blake3;
        assert!(!store.contains(&key).await.unwrap());
        store.commit(staged, &key).await.unwrap();
        assert!(store.contains(&key).await.unwrap());
        assert_eq!(store.size(&key).await.unwrap(), 11);
        assert_eq!(
            std::fs::read(store.local_path(&key).unwrap()).unwrap(),
            b"image bytes"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn dropped_staging_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let staged = store.stage().await.unwrap();
        std::fs::write(staged.path(), b"partial").unwrap();
        let path = staged.path().to_owned();
        drop(staged);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn keys_that_are_not_digests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.local_path("../../etc/passwd"),
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
