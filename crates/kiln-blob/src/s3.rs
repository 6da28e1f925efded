//! Images and build files in S3-compatible object storage, through the `object_store`
//! crate.
//!
//! [`S3Config`] says where (`s3://BUCKET[/PREFIX]`, an endpoint, a region, a key);
//! [`S3Config::connect`] opens the bucket. [`S3PackFiles`] keeps packs as objects
//! `PREFIX/packs/<name>.pack`, each written once: an open pack goes out in parts of a
//! multipart upload as it fills, so what it holds in memory is a part being sent and
//! one filling, and its seal completes the upload (a pack smaller than one part is
//! one `PUT` with `If-None-Match: *`, `PutMode::Create`). [`S3BlobStore`] keeps build files archives as
//! objects `PREFIX/files/<key>`, streamed in with multipart upload and out by range.
//!
//! Every failure to reach the store, or a refusal from it other than "not found", is
//! [`BlobError::Unavailable`]: the server answers 503 with `Retry-After`, records
//! nothing, and the client tries again. Calls are retried a little inside
//! `object_store` (a short budget, so that a store that is down is reported in
//! seconds rather than minutes).

use crate::packs::{
    is_pack_name, new_pack_name, parse_store_id, OpenPack, PackFiles, PACK_MAGIC, STORE_ID_NAME,
};
use crate::{is_valid_key, BlobError, BlobRead, BlobStore, ByteReader};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The size an S3 pack is sealed at.
pub const S3_PACK_BYTES: u64 = 16 << 20;
/// The parts a pack is sent in as it fills (S3's smallest but the last's): what an
/// open pack holds in memory is the part being sent and the one filling.
pub const S3_PACK_PART_BYTES: u64 = 5 << 20;
/// Parts of one pack being sent at once. Measured (docs/benchmarks.md): a second
/// part in flight, or 8 MiB parts, upload 1 GiB about 15 % faster but take the
/// server's peak memory over 64 MiB.
const PARTS_IN_FLIGHT: usize = 1;
/// Parts of a multipart upload of a build files archive.
const PART_BYTES: usize = 8 << 20;

/// Where images and build files rest in object storage.
#[derive(Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Prepended to every object's name (no leading or trailing slash); may be empty.
    pub prefix: String,
    /// The store's URL, e.g. `http://127.0.0.1:8333`.
    pub endpoint: String,
    pub region: String,
    /// The access key and its secret; anonymous requests without them.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &self.credentials.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl S3Config {
    /// Reads `s3://BUCKET[/PREFIX]`; the rest is filled in by the caller.
    pub fn from_url(url: &str, endpoint: &str, region: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an s3://BUCKET[/PREFIX] URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("{url:?} names no bucket"));
        }
        Ok(S3Config {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: endpoint.to_owned(),
            region: region.to_owned(),
            credentials: None,
        })
    }

    /// Opens the bucket (no request is made until the first call).
    pub fn connect(&self) -> Result<Arc<AmazonS3>, BlobError> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(&self.endpoint)
            .with_region(&self.region)
            .with_virtual_hosted_style_request(false)
            // Options replace the builder's, so plain HTTP is allowed here.
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            )
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(10),
                ..RetryConfig::default()
            });
        builder = match &self.credentials {
            Some((key, secret)) => builder
                .with_access_key_id(key)
                .with_secret_access_key(secret),
            // Never the instance metadata service: unsigned requests.
            None => builder.with_skip_signature(true),
        };
        let store = builder
            .build()
            .map_err(|err| unavailable("opening the bucket", err))?;
        Ok(Arc::new(store))
    }

    fn object(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }
}

fn unavailable(what: impl Into<String>, err: object_store::Error) -> BlobError {
    BlobError::Unavailable {
        what: what.into(),
        source: Box::new(err),
    }
}

/// An `object_store` error in the store's words: not found, or unavailable.
fn store_error(what: String, err: object_store::Error) -> BlobError {
    match err {
        object_store::Error::NotFound { .. } => BlobError::NotFound(what),
        err => unavailable(what, err),
    }
}

/// Packs as objects.
pub struct S3PackFiles {
    store: Arc<AmazonS3>,
    config: S3Config,
    target_pack_bytes: u64,
}

impl S3PackFiles {
    /// Packs in the bucket `config` names, under `PREFIX/packs/`.
    pub fn new(store: Arc<AmazonS3>, config: S3Config) -> Self {
        S3PackFiles {
            store,
            config,
            target_pack_bytes: S3_PACK_BYTES,
        }
    }

    /// The same, sealing packs at `bytes`.
    pub fn with_target_pack_bytes(mut self, bytes: u64) -> Self {
        self.target_pack_bytes = bytes.max(1);
        self
    }

    fn path_of(&self, pack: &str) -> Result<ObjectPath, BlobError> {
        if !is_pack_name(pack) {
            return Err(BlobError::InvalidKey(pack.to_owned()));
        }
        Ok(self.config.object(&format!("packs/{pack}.pack")))
    }
}

#[async_trait]
impl PackFiles for S3PackFiles {
    async fn begin(&self) -> Result<Box<dyn OpenPack>, BlobError> {
        let name = new_pack_name();
        let path = self.path_of(&name)?;
        let mut held = Held::default();
        held.pieces.push_back((0, Bytes::from_static(PACK_MAGIC)));
        Ok(Box::new(S3OpenPack {
            name,
            path,
            store: self.store.clone(),
            len: PACK_MAGIC.len() as u64,
            held: std::sync::Mutex::new(held),
            upload: tokio::sync::Mutex::default(),
        }))
    }

    async fn read(&self, pack: &str, range: Range<u64>) -> Result<Bytes, BlobError> {
        let path = self.path_of(pack)?;
        let expected = range.end - range.start;
        let bytes = self
            .store
            .get_range(&path, range)
            .await
            .map_err(|err| store_error(format!("pack {pack}"), err))?;
        if bytes.len() as u64 != expected {
            return Err(BlobError::Damaged(format!(
                "pack {pack} is shorter than its index says"
            )));
        }
        Ok(bytes)
    }

    async fn remove(&self, pack: &str) -> Result<(), BlobError> {
        let path = self.path_of(pack)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(unavailable(format!("deleting pack {pack}"), err)),
        }
    }

    fn target_pack_bytes(&self) -> u64 {
        self.target_pack_bytes
    }

    async fn store_id(&self) -> Result<Option<String>, BlobError> {
        let path = self.config.object(&format!("packs/{STORE_ID_NAME}"));
        match self.store.get(&path).await {
            Ok(got) => {
                let bytes = got
                    .bytes()
                    .await
                    .map_err(|err| unavailable(format!("reading {path}"), err))?;
                parse_store_id(&bytes, &format!("object {path}")).map(Some)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(unavailable(format!("reading {path}"), err)),
        }
    }

    async fn claim_store_id(&self, id: &str) -> Result<String, BlobError> {
        let path = self.config.object(&format!("packs/{STORE_ID_NAME}"));
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(format!("{id}\n"));
        match self.store.put_opts(&path, payload, options).await {
            Ok(_) => Ok(id.to_owned()),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => self
                .store_id()
                .await?
                .ok_or_else(|| BlobError::NotFound(format!("object {path}"))),
            Err(err) => Err(unavailable(format!("writing {path}"), err)),
        }
    }
}

/// A pack sent to the store as it fills: once a part's worth of bytes is held, it
/// goes out as a part of a multipart upload while the next part fills, and the seal
/// sends the rest and completes the upload. A pack that never fills one part is
/// stored with one `PUT` (`If-None-Match: *`) at its seal. Bytes are held only until
/// the store has answered for the part they are in.
struct S3OpenPack {
    name: String,
    path: ObjectPath,
    store: Arc<AmazonS3>,
    len: u64,
    /// The bytes not yet answered for: the part being sent, then those filling the
    /// next. Shared with readers (a pack being sealed is read while its seal runs).
    held: std::sync::Mutex<Held>,
    /// The multipart upload; the seal and `abandon` take it over.
    upload: tokio::sync::Mutex<Upload>,
}

/// Pieces of a pack from some offset on, each with where it starts.
#[derive(Default)]
struct Held {
    pieces: std::collections::VecDeque<(u64, Bytes)>,
}

impl Held {
    /// The slices of the pieces held that make up `range`, in order (only those of
    /// it that are held).
    fn slices(&self, range: &Range<u64>) -> impl Iterator<Item = Bytes> + '_ {
        let first = self
            .pieces
            .partition_point(|(start, _)| *start <= range.start)
            .saturating_sub(1);
        let range = range.clone();
        self.pieces
            .range(first..)
            .take_while(move |(start, _)| *start < range.end)
            .filter(move |(start, piece)| start + piece.len() as u64 > range.start)
            .map(move |(start, piece)| {
                let from = range.start.saturating_sub(*start) as usize;
                let to = ((range.end - start) as usize).min(piece.len());
                piece.slice(from..to)
            })
    }

    /// `range`, if all of it is held.
    fn read(&self, range: &Range<u64>) -> Option<Bytes> {
        let first = self.pieces.front()?;
        if range.start < first.0 {
            return None;
        }
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for slice in self.slices(range) {
            out.extend_from_slice(&slice);
        }
        (out.len() as u64 == range.end - range.start).then(|| Bytes::from(out))
    }

    /// The bytes of `range`, as slices of the pieces held.
    fn payload(&self, range: &Range<u64>) -> PutPayload {
        self.slices(range).collect()
    }

    /// Lets go of the pieces wholly before `end`.
    fn release_before(&mut self, end: u64) {
        while let Some((start, piece)) = self.pieces.front() {
            if start + piece.len() as u64 > end {
                break;
            }
            self.pieces.pop_front();
        }
    }
}

/// A pack's multipart upload, begun when its first part is full.
#[derive(Default)]
struct Upload {
    multipart: Option<Box<dyn MultipartUpload>>,
    /// The parts being sent, oldest first, and where each ends.
    sending: std::collections::VecDeque<(tokio::task::JoinHandle<object_store::Result<()>>, u64)>,
    /// Where the next part starts: the bytes before it were handed to the upload.
    cut: u64,
}

impl S3OpenPack {
    fn failed(&self, err: object_store::Error) -> BlobError {
        unavailable(format!("storing pack {}", self.name), err)
    }

    /// Waits until at most `in_flight` parts are being sent, letting go of the bytes
    /// of those sent.
    async fn parts_sent(&self, upload: &mut Upload, in_flight: usize) -> Result<(), BlobError> {
        while upload.sending.len() > in_flight {
            let (sending, end) = upload.sending.pop_front().expect("a part being sent");
            match sending.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(self.failed(err)),
                Err(err) => {
                    return Err(BlobError::io(
                        format!("storing pack {}", self.name),
                        std::io::Error::other(err),
                    ))
                }
            }
            self.held
                .lock()
                .expect("a pack's bytes")
                .release_before(end);
        }
        Ok(())
    }

    /// Sends the bytes from `upload.cut` to `end` as the next part, once the part
    /// before it is sent.
    async fn send_part(&self, upload: &mut Upload, end: u64) -> Result<(), BlobError> {
        self.parts_sent(upload, PARTS_IN_FLIGHT - 1).await?;
        if upload.multipart.is_none() {
            let begun = self
                .store
                .put_multipart(&self.path)
                .await
                .map_err(|err| self.failed(err))?;
            upload.multipart = Some(begun);
        }
        let payload = self
            .held
            .lock()
            .expect("a pack's bytes")
            .payload(&(upload.cut..end));
        let multipart = upload.multipart.as_mut().expect("a multipart upload");
        upload
            .sending
            .push_back((tokio::spawn(multipart.put_part(payload)), end));
        upload.cut = end;
        Ok(())
    }
}

#[async_trait]
impl OpenPack for S3OpenPack {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.len
    }

    async fn append(&mut self, pieces: Vec<Bytes>) -> Result<(), BlobError> {
        {
            let mut held = self.held.lock().expect("a pack's bytes");
            for piece in pieces {
                let start = self.len;
                self.len += piece.len() as u64;
                held.pieces.push_back((start, piece));
            }
        }
        let mut upload = std::mem::take(self.upload.get_mut());
        let mut sent = Ok(());
        while sent.is_ok() && self.len - upload.cut >= S3_PACK_PART_BYTES {
            let end = upload.cut + S3_PACK_PART_BYTES;
            sent = self.send_part(&mut upload, end).await;
        }
        *self.upload.get_mut() = upload;
        sent
    }

    async fn read(&self, range: Range<u64>) -> Result<Option<Bytes>, BlobError> {
        if range.end > self.len {
            return Err(BlobError::Damaged(format!(
                "pack {}: range past its end",
                self.name
            )));
        }
        Ok(self.held.lock().expect("a pack's bytes").read(&range))
    }

    async fn seal(&self) -> Result<(), BlobError> {
        let mut upload = self.upload.lock().await;
        if upload.multipart.is_none() {
            let payload = self
                .held
                .lock()
                .expect("a pack's bytes")
                .payload(&(0..self.len));
            let options = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            self.store
                .put_opts(&self.path, payload, options)
                .await
                .map_err(|err| self.failed(err))?;
        } else {
            if self.len > upload.cut {
                self.send_part(&mut upload, self.len).await?;
            }
            self.parts_sent(&mut upload, 0).await?;
            let multipart = upload.multipart.as_mut().expect("a multipart upload");
            multipart.complete().await.map_err(|err| self.failed(err))?;
        }
        // Read from where it rests from now on.
        self.held.lock().expect("a pack's bytes").pieces.clear();
        Ok(())
    }

    async fn abandon(&self) {
        let mut upload = self.upload.lock().await;
        for (sending, _) in upload.sending.drain(..) {
            sending.abort();
        }
        self.held.lock().expect("a pack's bytes").pieces.clear();
        // In a task of its own: a store that is down takes its retries to refuse, and
        // the caller may hold the store's lock.
        if let Some(mut multipart) = upload.multipart.take() {
            let name = self.name.clone();
            tokio::spawn(async move {
                if let Err(err) = multipart.abort().await {
                    tracing::warn!(pack = %name, error = %err, "an abandoned pack's multipart upload could not be aborted; the store's rule for incomplete uploads removes it");
                }
            });
        }
    }
}

/// Build files archives as objects.
pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    config: S3Config,
}

impl S3BlobStore {
    /// Blobs in the bucket `config` names, under `PREFIX/files/`.
    pub fn new(store: Arc<AmazonS3>, config: S3Config) -> Self {
        S3BlobStore { store, config }
    }

    fn path_of(&self, key: &str) -> Result<ObjectPath, BlobError> {
        if !is_valid_key(key) {
            return Err(BlobError::InvalidKey(key.to_owned()));
        }
        Ok(self.config.object(&format!("files/{key}")))
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, key: &str, mut reader: ByteReader) -> Result<u64, BlobError> {
        let path = self.path_of(key)?;
        if self.contains(key).await? {
            return Ok(0);
        }
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|err| unavailable(format!("storing blob {key}"), err))?;
        let mut upload = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buffer = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buffer).await {
                Ok(n) => n,
                Err(err) => {
                    let _ = upload.abort().await;
                    return Err(BlobError::io(format!("reading blob {key}"), err));
                }
            };
            if n == 0 {
                break;
            }
            size += n as u64;
            // At most two parts in flight: memory stays at a few parts.
            if let Err(err) = upload.wait_for_capacity(2).await {
                return Err(unavailable(format!("storing blob {key}"), err));
            }
            upload.write(&buffer[..n]);
        }
        upload
            .finish()
            .await
            .map_err(|err| unavailable(format!("storing blob {key}"), err))?;
        Ok(size)
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<BlobRead, BlobError> {
        let path = self.path_of(key)?;
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&path, options)
            .await
            .map_err(|err| store_error(key.to_owned(), err))?;
        let size = result.meta.size;
        let key = key.to_owned();
        let body = result
            .into_stream()
            .map(move |piece| piece.map_err(|err| unavailable(format!("reading blob {key}"), err)))
            .boxed();
        Ok(BlobRead { size, body })
    }

    async fn size(&self, key: &str) -> Result<u64, BlobError> {
        let path = self.path_of(key)?;
        let meta = self
            .store
            .head(&path)
            .await
            .map_err(|err| store_error(key.to_owned(), err))?;
        Ok(meta.size)
    }

    async fn contains(&self, key: &str) -> Result<bool, BlobError> {
        match self.size(key).await {
            Ok(_) => Ok(true),
            Err(BlobError::NotFound(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    async fn remove(&self, key: &str) -> Result<(), BlobError> {
        let path = self.path_of(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(unavailable(format!("deleting blob {key}"), err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of 3, 4 and 5 bytes from offset 10: bytes 10..22, each its offset's
    /// value.
    fn held() -> Held {
        let mut held = Held::default();
        let mut start = 10u64;
        for len in [3u64, 4, 5] {
            let piece: Vec<u8> = (start..start + len).map(|at| at as u8).collect();
            held.pieces.push_back((start, Bytes::from(piece)));
            start += len;
        }
        held
    }

    fn bytes_of(range: Range<u64>) -> Vec<u8> {
        range.map(|at| at as u8).collect()
    }

    #[test]
    fn held_bytes_read_across_pieces_and_not_before_them() {
        let held = held();
        assert_eq!(held.read(&(11..20)).as_deref(), Some(&bytes_of(11..20)[..]));
        assert_eq!(held.read(&(13..17)).as_deref(), Some(&bytes_of(13..17)[..]));
        assert_eq!(held.read(&(9..12)), None, "byte 9 was let go");
        assert_eq!(Held::default().read(&(0..1)), None);
    }

    #[test]
    fn a_part_is_cut_from_the_pieces_at_any_offsets() {
        let held = held();
        for range in [11..20, 10..22, 14..15, 13..17] {
            let payload: Vec<u8> = held
                .payload(&range)
                .iter()
                .flat_map(|piece| piece.to_vec())
                .collect();
            assert_eq!(payload, bytes_of(range.clone()), "part {range:?}");
        }
    }

    #[test]
    fn pieces_are_let_go_only_once_wholly_sent() {
        let mut held = held();
        held.release_before(15);
        assert_eq!(held.read(&(13..14)), Some(Bytes::from(bytes_of(13..14))));
        held.release_before(17);
        assert_eq!(held.read(&(16..17)), None);
        assert_eq!(held.read(&(17..22)).as_deref(), Some(&bytes_of(17..22)[..]));
        held.release_before(22);
        assert!(held.pieces.is_empty());
    }
}
