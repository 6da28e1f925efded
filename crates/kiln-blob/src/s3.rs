//! Images and build files in S3-compatible object storage, through the `object_store`
//! crate.
//!
//! [`S3Config`] says where (`s3://BUCKET[/PREFIX]`, an endpoint, a region, a key);
//! [`S3Config::connect`] opens the bucket. [`S3PackFiles`] keeps packs as objects
//! `PREFIX/packs/<name>.pack`, each written once with `If-None-Match: *`
//! (`PutMode::Create`); an open pack is held in memory until it is sealed, so a pack's
//! target size bounds what it costs. [`S3BlobStore`] keeps build files archives as
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
    ClientOptions, GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The size an S3 pack is sealed at: held in memory until then.
pub const S3_PACK_BYTES: u64 = 16 << 20;
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
        Ok(Box::new(S3OpenPack {
            name,
            path,
            store: self.store.clone(),
            pieces: vec![Bytes::from_static(PACK_MAGIC)],
            starts: vec![0],
            len: PACK_MAGIC.len() as u64,
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

/// A pack held in memory until it is sealed as one object.
struct S3OpenPack {
    name: String,
    path: ObjectPath,
    store: Arc<AmazonS3>,
    pieces: Vec<Bytes>,
    /// Where each piece starts in the pack.
    starts: Vec<u64>,
    len: u64,
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
        for piece in pieces {
            self.starts.push(self.len);
            self.len += piece.len() as u64;
            self.pieces.push(piece);
        }
        Ok(())
    }

    async fn read(&self, range: Range<u64>) -> Result<Bytes, BlobError> {
        if range.end > self.len {
            return Err(BlobError::Damaged(format!(
                "pack {}: range past its end",
                self.name
            )));
        }
        let first = self.starts.partition_point(|start| *start <= range.start) - 1;
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for (piece, start) in self.pieces[first..].iter().zip(&self.starts[first..]) {
            if *start >= range.end {
                break;
            }
            let from = range.start.saturating_sub(*start) as usize;
            let to = ((range.end - start) as usize).min(piece.len());
            out.extend_from_slice(&piece[from..to]);
        }
        Ok(Bytes::from(out))
    }

    async fn seal(&self) -> Result<(), BlobError> {
        let payload: PutPayload = self.pieces.iter().cloned().collect();
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&self.path, payload, options)
            .await
            .map_err(|err| unavailable(format!("storing pack {}", self.name), err))?;
        Ok(())
    }

    async fn abandon(&self) {}
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
