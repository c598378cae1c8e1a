//! The template store: where template images live so that every host can get them. One
//! interface over two backends, a directory (the embedded default, or a mount shared by several
//! hosts) and any S3-compatible service, both through `object_store`.
//!
//! Objects are content-addressed (`blobs/sha256/<hex>`), so a publish of bytes the store already
//! has costs a lookup, two templates with the same image share it, and a fetched file is checked
//! against the name it was asked for. Fetches go by bounded ranges into `<file>.partial`: an
//! interrupted pull resumes where it stopped, a damaged partial is detected by the checksum and
//! fetched again, and no request has to outlive the backend's per-request timeout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, RetryConfig, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Layout, StoreConfig, StoreUrl};
use crate::progress::{Progress, Throttled};

/// Bytes per ranged GET and per multipart part: large enough to keep a link busy, small enough
/// that one request finishes well within the backend's request timeout on a slow link.
const CHUNK_BYTES: u64 = 32 << 20;
/// Parts uploaded at once by a publish.
const UPLOAD_CONCURRENCY: usize = 4;
/// How often a transfer reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// A file in the store: its SHA-256 (lowercase hex) and size. Both are checked on every fetch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    pub sha256: String,
    pub size_bytes: u64,
}

impl BlobRef {
    pub fn new(sha256: &str, size_bytes: u64) -> Result<Self, StoreError> {
        let valid = sha256.len() == 64
            && sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(StoreError::BadDigest(sha256.to_owned()));
        }
        Ok(Self {
            sha256: sha256.to_owned(),
            size_bytes,
        })
    }

    fn key(&self) -> ObjectPath {
        ObjectPath::from(format!("blobs/sha256/{}", self.sha256))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the template store is misconfigured: {0}")]
    Config(String),
    #[error("`{0}` is not a SHA-256 digest (64 lowercase hex digits)")]
    BadDigest(String),
    #[error("the template store has no blob sha256:{0}")]
    Missing(String),
    #[error(
        "the template store's blob sha256:{sha256} is {found} bytes, not the {expected} registered"
    )]
    SizeMismatch {
        sha256: String,
        expected: u64,
        found: u64,
    },
    #[error("the template store's blob sha256:{expected} arrived with checksum sha256:{found}, twice: the stored object is damaged")]
    Corrupt { expected: String, found: String },
    #[error("the template store at {location} is unreachable: {source}")]
    Unreachable {
        location: String,
        source: object_store::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The configured store. Cheap to clone.
#[derive(Clone)]
pub struct TemplateStore {
    objects: Arc<dyn ObjectStore>,
    location: String,
}

impl std::fmt::Debug for TemplateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateStore")
            .field("location", &self.location)
            .finish()
    }
}

impl TemplateStore {
    /// The store `config` names; with no URL, the directory `store/` under the files root.
    pub fn open(config: &StoreConfig, layout: &Layout) -> Result<Self, StoreError> {
        let url = config
            .url
            .clone()
            .unwrap_or_else(|| StoreUrl::Dir(layout.store_dir()));
        let location = url.to_string();
        let objects: Arc<dyn ObjectStore> = match &url {
            StoreUrl::Dir(dir) => {
                std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
                Arc::new(
                    LocalFileSystem::new_with_prefix(dir)
                        .map_err(|e| StoreError::Config(e.to_string()))?,
                )
            }
            StoreUrl::S3 { bucket, prefix } => {
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(&config.s3_region)
                    .with_allow_http(config.s3_allow_http)
                    .with_client_options(
                        ClientOptions::new()
                            .with_connect_timeout(Duration::from_secs(5))
                            .with_timeout(Duration::from_secs(120))
                            .with_allow_http(config.s3_allow_http),
                    )
                    // A few quick retries: a pull is resumable and its caller retries as a
                    // whole, and an unreachable store must surface as an error, not minutes
                    // of waiting.
                    .with_retry(RetryConfig {
                        max_retries: 3,
                        retry_timeout: Duration::from_secs(20),
                        ..RetryConfig::default()
                    });
                if let Some(endpoint) = &config.s3_endpoint {
                    if endpoint.0.scheme() == "http" && !config.s3_allow_http {
                        return Err(StoreError::Config(format!(
                            "store.s3_endpoint {endpoint} is plain http://; set store.s3_allow_http to allow it"
                        )));
                    }
                    builder = builder.with_endpoint(endpoint.to_string());
                }
                if let Some(key) = &config.s3_access_key_id {
                    builder = builder.with_access_key_id(key);
                }
                if let Some(secret) = &config.s3_secret_access_key {
                    builder = builder.with_secret_access_key(secret.expose());
                }
                let s3 = builder
                    .build()
                    .map_err(|e| StoreError::Config(e.to_string()))?;
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix.as_str()))
                }
            }
        };
        Ok(Self { objects, location })
    }

    /// Where the store is, for logs and errors.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn unreachable(&self) -> impl FnOnce(object_store::Error) -> StoreError + '_ {
        |source| StoreError::Unreachable {
            location: self.location.clone(),
            source,
        }
    }

    /// The blob's size when the store has it.
    pub async fn size_of(&self, sha256: &str) -> Result<Option<u64>, StoreError> {
        let key = BlobRef::new(sha256, 0)?.key();
        match self.objects.head(&key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.unreachable()(e)),
        }
    }

    /// Checks that the store holds `blob` with its registered size.
    pub async fn check(&self, blob: &BlobRef) -> Result<(), StoreError> {
        match self.size_of(&blob.sha256).await? {
            None => Err(StoreError::Missing(blob.sha256.clone())),
            Some(found) if found != blob.size_bytes => Err(StoreError::SizeMismatch {
                sha256: blob.sha256.clone(),
                expected: blob.size_bytes,
                found,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Puts a small document into the store as a blob, content-addressed like a file.
    pub async fn publish_bytes(&self, bytes: Vec<u8>) -> Result<BlobRef, StoreError> {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let blob = BlobRef::new(&sha256, bytes.len() as u64)?;
        if self.check(&blob).await.is_ok() {
            return Ok(blob);
        }
        self.objects
            .put(&blob.key(), bytes.into())
            .await
            .map_err(self.unreachable())?;
        Ok(blob)
    }

    /// Reads a small blob (a document [`Self::publish_bytes`] put) whole, checked against its
    /// reference.
    pub async fn read_bytes(&self, blob: &BlobRef) -> Result<Vec<u8>, StoreError> {
        let answer = match self.objects.get(&blob.key()).await {
            Ok(answer) => answer,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::Missing(blob.sha256.clone()))
            }
            Err(e) => return Err(self.unreachable()(e)),
        };
        let bytes = answer.bytes().await.map_err(self.unreachable())?;
        let found = hex::encode(Sha256::digest(&bytes));
        if bytes.len() as u64 != blob.size_bytes || found != blob.sha256 {
            return Err(StoreError::Corrupt {
                expected: blob.sha256.clone(),
                found,
            });
        }
        Ok(bytes.to_vec())
    }

    /// Uploads `file` unless the store already holds its bytes; returns its reference.
    pub async fn publish(
        &self,
        file: &Path,
        report: impl FnMut(&Progress) + Send,
    ) -> Result<BlobRef, StoreError> {
        let (sha256, size_bytes) = sha256_of(file).await?;
        let blob = BlobRef::new(&sha256, size_bytes)?;
        if self.size_of(&blob.sha256).await? == Some(size_bytes) {
            tracing::info!(sha256, store = %self.location, "the store already holds this blob");
            return Ok(blob);
        }
        let mut progress = Throttled::new(PROGRESS_EVERY, report);
        let upload = self
            .objects
            .put_multipart(&blob.key())
            .await
            .map_err(self.unreachable())?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, CHUNK_BYTES as usize);
        let mut source = tokio::fs::File::open(file)
            .await
            .map_err(StoreError::io(file))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        let result: Result<(), StoreError> = async {
            loop {
                writer
                    .wait_for_capacity(UPLOAD_CONCURRENCY)
                    .await
                    .map_err(self.unreachable())?;
                let n = source.read(&mut buf).await.map_err(StoreError::io(file))?;
                if n == 0 {
                    break;
                }
                writer.write(&buf[..n]);
                done += n as u64;
                progress.update(done, size_bytes);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                writer.finish().await.map_err(self.unreachable())?;
            }
            Err(error) => {
                // Multipart parts left behind cost storage until the bucket's lifecycle rule
                // removes them; aborting frees them now.
                let _ = writer.abort().await;
                return Err(error);
            }
        }
        // A file that changed while it was read would be stored under the wrong name.
        let (after, _) = sha256_of(file).await?;
        if after != blob.sha256 {
            let _ = self.objects.delete(&blob.key()).await;
            return Err(StoreError::Io {
                path: file.to_owned(),
                source: std::io::Error::other("the file changed while it was published"),
            });
        }
        Ok(blob)
    }

    /// Fetches `blob` into `dest` (atomically: `dest` appears only complete and verified).
    /// Resumes from `dest`'s `.partial` left by an interrupted fetch; a partial whose bytes turn
    /// out wrong is discarded and the blob fetched once more from the start.
    pub async fn fetch(
        &self,
        blob: &BlobRef,
        dest: &Path,
        report: impl FnMut(&Progress) + Send,
    ) -> Result<(), StoreError> {
        self.check(blob).await?;
        let partial = Layout::partial(dest);
        let mut progress = Throttled::new(PROGRESS_EVERY, report);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let found = self.fetch_into(blob, &partial, &mut progress).await?;
            if found == blob.sha256 {
                break;
            }
            let _ = tokio::fs::remove_file(&partial).await;
            if attempt == 2 {
                return Err(StoreError::Corrupt {
                    expected: blob.sha256.clone(),
                    found,
                });
            }
            tracing::warn!(
                expected = blob.sha256,
                found,
                "a fetched template blob failed its checksum; fetching it again from the start"
            );
        }
        tokio::fs::rename(&partial, dest)
            .await
            .map_err(StoreError::io(dest))
    }

    /// Completes `partial` (appending after what it already holds) and returns the checksum of
    /// the whole file.
    async fn fetch_into<F: FnMut(&Progress)>(
        &self,
        blob: &BlobRef,
        partial: &Path,
        progress: &mut Throttled<F>,
    ) -> Result<String, StoreError> {
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(partial)
            .await
            .map_err(StoreError::io(partial))?;
        let mut have = file
            .metadata()
            .await
            .map_err(StoreError::io(partial))?
            .len();
        if have > blob.size_bytes {
            file.set_len(0).await.map_err(StoreError::io(partial))?;
            have = 0;
        }
        let mut hasher = Sha256::new();
        if have > 0 {
            tracing::info!(
                sha256 = blob.sha256,
                have,
                "resuming an interrupted template fetch"
            );
            let mut buf = vec![0u8; 1 << 20];
            let mut left = have;
            while left > 0 {
                let want = buf.len().min(left as usize);
                let n = file
                    .read(&mut buf[..want])
                    .await
                    .map_err(StoreError::io(partial))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
        }
        let key = blob.key();
        while have < blob.size_bytes {
            let end = (have + CHUNK_BYTES).min(blob.size_bytes);
            let options = GetOptions {
                range: Some(GetRange::Bounded(have..end)),
                ..GetOptions::default()
            };
            let answer = self
                .objects
                .get_opts(&key, options)
                .await
                .map_err(|e| match e {
                    object_store::Error::NotFound { .. } => {
                        StoreError::Missing(blob.sha256.clone())
                    }
                    e => self.unreachable()(e),
                })?;
            let mut stream = answer.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(self.unreachable())?;
                file.write_all(&chunk)
                    .await
                    .map_err(StoreError::io(partial))?;
                hasher.update(&chunk);
                have += chunk.len() as u64;
                progress.update(have, blob.size_bytes);
            }
            if have < end {
                return Err(self.unreachable()(object_store::Error::Generic {
                    store: "template store",
                    source: format!("a ranged read ended at byte {have} of {end}").into(),
                }));
            }
        }
        file.flush().await.map_err(StoreError::io(partial))?;
        file.sync_all().await.map_err(StoreError::io(partial))?;
        Ok(hex::encode(hasher.finalize()))
    }

    /// Writes the small document `key` (a JSON manifest; not content-addressed, so it can be
    /// replaced and must be read back to be trusted).
    pub async fn put_document(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.objects
            .put(&ObjectPath::from(key), bytes.into())
            .await
            .map_err(self.unreachable())?;
        Ok(())
    }

    /// The document `key`, if the store holds it.
    pub async fn get_document(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.objects.get(&ObjectPath::from(key)).await {
            Ok(answer) => Ok(Some(
                answer.bytes().await.map_err(self.unreachable())?.to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.unreachable()(e)),
        }
    }

    /// Removes the document `key`; removing one the store does not hold is not an error.
    pub async fn delete_document(&self, key: &str) -> Result<(), StoreError> {
        match self.objects.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unreachable()(e)),
        }
    }

    /// Removes a blob; removing one the store does not hold is not an error.
    pub async fn delete(&self, sha256: &str) -> Result<(), StoreError> {
        let key = BlobRef::new(sha256, 0)?.key();
        match self.objects.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unreachable()(e)),
        }
    }
}

/// The SHA-256 and size of a file, read off the async runtime's threads.
pub async fn sha256_of(path: &Path) -> Result<(String, u64), StoreError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&owned).map_err(StoreError::io(&owned))?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher).map_err(StoreError::io(&owned))?;
        Ok((hex::encode(hasher.finalize()), size))
    })
    .await
    .map_err(|e| StoreError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_store(root: &Path) -> TemplateStore {
        let config = crate::config::Config::default().store;
        TemplateStore::open(&config, &Layout::new(root)).unwrap()
    }

    fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Neither a multiple of a read buffer nor of a chunk.
    fn sample() -> Vec<u8> {
        (0..(3 << 20) + 12345)
            .map(|i: u32| (i * 7 % 251) as u8)
            .collect()
    }

    #[tokio::test]
    async fn publishes_once_and_fetches_verified() {
        let root = tempfile::tempdir().unwrap();
        let store = dir_store(root.path());
        assert!(
            root.path().join("store").is_dir(),
            "the default is under the files root"
        );
        let bytes = sample();
        let source = file_with(root.path(), "image", &bytes);
        let mut reports = 0;
        let blob = store.publish(&source, |_| reports += 1).await.unwrap();
        assert_eq!(blob.size_bytes, bytes.len() as u64);
        assert_eq!(blob.sha256, hex::encode(Sha256::digest(&bytes)));
        assert!(reports >= 1, "the last update is always reported");
        assert_eq!(store.publish(&source, |_| {}).await.unwrap(), blob);
        store.check(&blob).await.unwrap();

        let dest = root.path().join("fetched");
        store.fetch(&blob, &dest, |_| {}).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert!(!Layout::partial(&dest).exists());
    }

    #[tokio::test]
    async fn resumes_a_partial_and_refetches_a_damaged_one() {
        let root = tempfile::tempdir().unwrap();
        let store = dir_store(root.path());
        let bytes = sample();
        let blob = store
            .publish(&file_with(root.path(), "image", &bytes), |_| {})
            .await
            .unwrap();

        let dest = root.path().join("resumed");
        std::fs::write(Layout::partial(&dest), &bytes[..1_000_000]).unwrap();
        let mut first_report = None;
        store
            .fetch(&blob, &dest, |p| {
                first_report.get_or_insert(p.done);
            })
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert!(
            first_report.unwrap() > 1_000_000,
            "resumed after the partial's bytes"
        );

        let dest = root.path().join("damaged");
        let mut damaged = bytes[..2_000_000].to_vec();
        damaged[10] ^= 0xff;
        std::fs::write(Layout::partial(&dest), &damaged).unwrap();
        store.fetch(&blob, &dest, |_| {}).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    }

    #[tokio::test]
    async fn a_damaged_or_missing_blob_is_an_error_and_leaves_no_file() {
        let root = tempfile::tempdir().unwrap();
        let store = dir_store(root.path());
        let bytes = sample();
        let blob = store
            .publish(&file_with(root.path(), "image", &bytes), |_| {})
            .await
            .unwrap();
        let stored = root.path().join("store/blobs/sha256").join(&blob.sha256);
        let mut damaged = bytes.clone();
        damaged[bytes.len() / 2] ^= 1;
        std::fs::write(&stored, &damaged).unwrap();

        let dest = root.path().join("fetched");
        let error = store.fetch(&blob, &dest, |_| {}).await.unwrap_err();
        assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
        assert!(!dest.exists() && !Layout::partial(&dest).exists());

        std::fs::write(&stored, &bytes[..10]).unwrap();
        let error = store.fetch(&blob, &dest, |_| {}).await.unwrap_err();
        assert!(
            matches!(error, StoreError::SizeMismatch { found: 10, .. }),
            "{error}"
        );

        store.delete(&blob.sha256).await.unwrap();
        store.delete(&blob.sha256).await.unwrap();
        let error = store.fetch(&blob, &dest, |_| {}).await.unwrap_err();
        assert!(matches!(error, StoreError::Missing(_)), "{error}");
        assert!(!dest.exists());
    }

    #[test]
    fn digests_are_checked() {
        assert!(BlobRef::new(&"a".repeat(64), 1).is_ok());
        for bad in ["", "../../etc/passwd", &"A".repeat(64), &"a".repeat(63)] {
            assert!(matches!(
                BlobRef::new(bad, 1),
                Err(StoreError::BadDigest(_))
            ));
        }
    }
}
