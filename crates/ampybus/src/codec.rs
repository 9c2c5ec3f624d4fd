//! Payload codec: gzip above 128 KiB, transparent inflate, and the object-store pointer pattern
//! (`blob_ref`/`blob_hash`/`blob_size`) above the inline size limit.

use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::headers::{Headers, names};
use bytes::Bytes;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use sha2::{Digest, Sha256};
use std::sync::Arc;

pub(crate) mod gzip;
mod s3;

pub use gzip::{DEFAULT_MAX_INFLATED, gzip, inflate_if_needed};

/// Payloads strictly larger than this (in bytes) are gzipped: 128 KiB.
pub const COMPRESS_THRESHOLD: usize = 128 * 1024;
/// Default inline limit after compression: 1 MiB. Larger payloads go to the blob store.
pub const DEFAULT_MAX_INLINE: usize = 1024 * 1024;
/// The error of a payload over the limit consumers accept (`what` says which bytes: "payload"
/// or "payload as carried").
pub(crate) fn over_limit(what: &str, len: usize, max: usize) -> Error {
    Error::payload(format!(
        "{what} is {len} bytes, over the limit of {max} bytes ({} MiB) that consumers accept (they dead-letter larger payloads as payload_too_large); store it elsewhere and publish a reference",
        max / (1024 * 1024)
    ))
}

/// How long blobs of a domain are kept: what the transports keep by default — 30 days for
/// orders, fills, positions and the DLQ, 7 days for every other domain.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(ampybus::codec::default_blob_retention("fills"), Some(Duration::from_secs(30 * 86_400)));
/// assert_eq!(ampybus::codec::default_blob_retention("bars"), Some(Duration::from_secs(7 * 86_400)));
/// ```
pub fn default_blob_retention(domain: &str) -> Option<std::time::Duration> {
    let days = match domain {
        "orders" | "fills" | "positions" | "dlq" => 30,
        _ => 7,
    };
    Some(std::time::Duration::from_secs(days * 86_400))
}

/// Runs [`BlobStore::expire`] with [`default_blob_retention`] a minute after it is called and
/// every hour after that, logging what it deleted, until the runtime stops.
pub(crate) fn spawn_blob_expiry(store: BlobStore) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        let mut wait = std::time::Duration::from_secs(60);
        loop {
            tokio::time::sleep(wait).await;
            wait = std::time::Duration::from_secs(3600);
            match store
                .expire(chrono::Utc::now(), default_blob_retention)
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(deleted = n, store = %store.url_prefix(), "blob store: expired blobs deleted")
                }
                Err(e) => tracing::warn!(error = %e, "blob store: expiry pass failed"),
            }
        }
    });
}

/// `sha256:<hex>` of some bytes, the form of `blob_hash` and `payload_hash`.
///
/// ```
/// assert_eq!(ampybus::codec::sha256_tag(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
/// ```
pub fn sha256_tag(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Where oversized payloads are stored: an `object_store` store plus the URL prefix that
/// `blob_ref` values start with. Local filesystem by default.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let store = ampybus::codec::BlobStore::local(dir.path()).unwrap();
/// assert!(store.url_prefix().starts_with("file://"));
/// ```
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

/// Shows the `blob_ref` prefix only: a client's configuration (credentials) is never printed.
impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl BlobStore {
    /// A store in a local directory (created if missing).
    pub fn local(dir: &std::path::Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::config(format!("blob dir {}: cannot create: {e}", dir.display()))
        })?;
        let abs = dir
            .canonicalize()
            .map_err(|e| Error::config(format!("blob dir {}: {e}", dir.display())))?;
        let fs = LocalFileSystem::new_with_prefix(&abs)
            .map_err(|e| Error::config(format!("blob dir {}: {e}", abs.display())))?;
        let url = url::Url::from_directory_path(&abs).map_err(|_| {
            Error::config(format!("blob dir {}: not an absolute path", abs.display()))
        })?;
        Ok(BlobStore {
            store: Arc::new(fs),
            prefix: url.to_string(),
        })
    }

    /// The store a `blob_store=` bus URL option names, with the AWS settings of the process
    /// environment ([`BlobStore::from_url_with_env`] over `std::env::vars`):
    ///
    /// - `file:///absolute/dir` — a local directory (created if missing);
    /// - `s3://bucket[/prefix][?endpoint=URL&region=NAME&allow_http=true]` — S3 or an
    ///   S3-compatible server through `object_store`'s AWS support (cargo feature `blob-s3`,
    ///   which the CLI and the Python SDK enable). Credentials come from the standard AWS
    ///   variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    ///   `AWS_REGION`, `AWS_ENDPOINT_URL`, …; credentials in the URL are refused); the
    ///   `endpoint` and `region` options beat the environment's. Plain `http://` endpoints are
    ///   allowed to a loopback address only, unless `allow_http=true` (or `AWS_ALLOW_HTTP=true`).
    ///   Objects are `prefix/{domain}/{day}/{message_id}`; `blob_ref` is
    ///   `s3://bucket/prefix/{domain}/{day}/{message_id}`.
    ///
    /// Anything else is a Config error naming the option and the rule (bucket missing or
    /// malformed, a bad prefix segment, an unknown or repeated option, plain http to another
    /// host). Nothing is contacted here: an unreachable server shows on the first write or read.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let url = format!("file://{}", dir.path().display());
    /// assert!(ampybus::codec::BlobStore::from_url(&url).is_ok());
    /// let e = ampybus::codec::BlobStore::from_url("s3://bucket/x?colour=red").unwrap_err();
    /// assert!(e.to_string().contains("unknown option \"colour\""), "{e}");
    /// let e = ampybus::codec::BlobStore::from_url("ftp://h/x").unwrap_err();
    /// assert!(e.to_string().contains("must be file:///absolute/dir or s3://bucket[/prefix]"), "{e}");
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        BlobStore::from_url_with_env(url, env)
    }

    /// [`BlobStore::from_url`] with the environment given: `env` holds the variables an
    /// `s3://` store reads (those starting with `AWS_`; others are ignored). For a process
    /// that keeps several S3 identities, or a test that must not touch its environment.
    ///
    /// ```
    /// # #[cfg(feature = "blob-s3")] {
    /// use ampybus::codec::BlobStore;
    /// let env = [
    ///     ("AWS_ACCESS_KEY_ID".to_string(), "AKIDEXAMPLE".to_string()),
    ///     ("AWS_SECRET_ACCESS_KEY".to_string(), "secret".to_string()),
    /// ];
    /// let store = BlobStore::from_url_with_env("s3://bucket/blobs?endpoint=http://127.0.0.1:9000", env).unwrap();
    /// assert_eq!(store.url_prefix(), "s3://bucket/blobs/");
    /// # }
    /// ```
    pub fn from_url_with_env(
        url: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        if url.starts_with("s3://") {
            let env: Vec<(String, String)> = env
                .into_iter()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .collect();
            let loc = s3::S3Url::parse(url, &env)?;
            return s3::open(url, &loc, &env);
        }
        match url.strip_prefix("file://") {
            Some(path) if path.starts_with('/') && path.len() > 1 => {
                BlobStore::local(std::path::Path::new(path))
            }
            _ => Err(Error::config(format!(
                "blob_store {:?}: must be file:///absolute/dir or s3://bucket[/prefix][?options] (see BlobStore::from_url)",
                crate::transport::url::redact(url)
            ))),
        }
    }

    /// Any `object_store` (0.12) store whose objects are named `<url_prefix><key>` in
    /// `blob_ref`. This crate compiles `object_store` with its `fs` feature, and its `aws`
    /// feature with cargo feature `blob-s3` ([`BlobStore::from_url`] builds those stores); for
    /// GCS or Azure, depend on `object_store` 0.12 with its `gcp` or `azure` feature in your
    /// own crate (cargo builds one `object_store` with both feature sets) and pass the store
    /// here.
    ///
    /// ```
    /// use std::sync::Arc;
    /// let store = ampybus::codec::BlobStore::new(
    ///     Arc::new(object_store::memory::InMemory::new()),
    ///     "mem://blobs",
    /// );
    /// assert_eq!(store.url_prefix(), "mem://blobs/");
    /// ```
    pub fn new(store: Arc<dyn ObjectStore>, url_prefix: impl Into<String>) -> Self {
        let mut prefix = url_prefix.into();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        BlobStore { store, prefix }
    }

    /// The prefix of every `blob_ref` this store writes.
    pub fn url_prefix(&self) -> &str {
        &self.prefix
    }

    /// Deletes the blobs older than their domain's retention (`retention(domain)`, the first
    /// segment of the key; `None` keeps them) as of `now`; returns how many were deleted.
    /// Blobs are written under `{domain}/{day}/{message_id}`.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::codec::{BlobStore, default_blob_retention};
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = BlobStore::local(dir.path()).unwrap();
    /// store.put("bars/2025-09-05/a", bytes::Bytes::from_static(b"x")).await.unwrap();
    /// let later = chrono::Utc::now() + chrono::Duration::days(8);
    /// assert_eq!(store.expire(later, default_blob_retention).await.unwrap(), 1);
    /// assert_eq!(store.expire(later, default_blob_retention).await.unwrap(), 0);
    /// # });
    /// ```
    pub async fn expire(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        retention: impl Fn(&str) -> Option<std::time::Duration>,
    ) -> Result<u64> {
        use futures::TryStreamExt;
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list(None)
            .try_collect()
            .await
            .map_err(|e| Error::transport("blob store: cannot list blobs", e))?;
        let mut deleted = 0;
        for meta in listed {
            let domain = meta.location.parts().next();
            let Some(keep) = domain.and_then(|d| retention(d.as_ref())) else {
                continue;
            };
            let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
            if meta.last_modified + keep < now {
                match self.store.delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(e) => {
                        return Err(Error::transport(
                            format!("blob store: cannot delete {}", meta.location),
                            e,
                        ));
                    }
                }
            }
        }
        Ok(deleted)
    }

    /// Stores bytes under `key`, returning the `blob_ref`.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<String> {
        let path =
            ObjPath::parse(key).map_err(|e| Error::payload(format!("blob key {key:?}: {e}")))?;
        self.store
            .put(&path, bytes.into())
            .await
            .map_err(|e| Error::transport(format!("blob store: cannot write {key}"), e))?;
        Ok(format!("{}{}", self.prefix, path))
    }

    /// The object path of a `blob_ref` of this store; refs under another prefix are refused.
    fn path_of(&self, blob_ref: &str) -> Result<ObjPath> {
        let key = blob_ref.strip_prefix(&self.prefix).ok_or_else(|| {
            Error::payload(format!(
                "blob_ref {blob_ref:?} is not under this store ({})",
                self.prefix
            ))
        })?;
        ObjPath::parse(key).map_err(|e| Error::payload(format!("blob_ref {blob_ref:?}: {e}")))
    }

    /// Fetches the bytes a `blob_ref` points at. Only refs under this store's prefix are
    /// fetched; a missing blob is a Transport error saying so ("no such blob").
    pub async fn get(&self, blob_ref: &str) -> Result<Bytes> {
        let path = self.path_of(blob_ref)?;
        let got = self.store.get(&path).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => Error::transport(
                format!("blob store: cannot read {blob_ref}: no such blob (never written, deleted, or expired with its topic's retention)"),
                e,
            ),
            e => Error::transport(format!("blob store: cannot read {blob_ref}: {e}"), e),
        })?;
        got.bytes()
            .await
            .map_err(|e| Error::transport(format!("blob store: cannot read {blob_ref}: {e}"), e))
    }

    /// Deletes the blob a `blob_ref` of this store points at (a missing blob is not an error).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = ampybus::codec::BlobStore::local(dir.path()).unwrap();
    /// let r = store.put("news/2025-09-05/a", bytes::Bytes::from_static(b"x")).await.unwrap();
    /// store.delete(&r).await.unwrap();
    /// let e = store.get(&r).await.unwrap_err();
    /// assert!(e.to_string().contains("no such blob"), "{e}");
    /// store.delete(&r).await.unwrap();
    /// # });
    /// ```
    pub async fn delete(&self, blob_ref: &str) -> Result<()> {
        match self.store.delete(&self.path_of(blob_ref)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::transport(
                format!("blob store: cannot delete {blob_ref}: {e}"),
                e,
            )),
        }
    }
}

/// Why a payload could not be made ready for a handler; maps onto DLQ reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeFailure {
    /// gzip did not inflate, or inflated past the limit.
    Decode,
    /// The fetched blob's hash or size does not match the envelope.
    BlobHashMismatch,
    /// The blob could not be fetched (may be transient).
    BlobUnavailable,
}

/// Encodes payloads for publish and decodes them for consume.
///
/// ```
/// # tokio_test_block(async {
/// use ampybus::{Headers, codec::PayloadCodec};
/// let codec = PayloadCodec::default();
/// let mut h = Headers::new();
/// let wire = codec.encode(&mut h, vec![7u8; 200_000].into(), "bars").await.unwrap();
/// assert_eq!(h.content_encoding(), Some("gzip"));
/// assert!(wire.len() < 200_000);
/// let raw = codec.decode(&h, &wire).await.unwrap();
/// assert_eq!(raw.len(), 200_000);
/// # });
/// # fn tokio_test_block<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PayloadCodec {
    /// Payloads strictly larger than this are gzipped.
    pub compress_threshold: usize,
    /// Largest inline payload after compression; above it the blob store is used.
    pub max_inline: usize,
    /// Largest payload accepted after inflating.
    pub max_inflated: usize,
    /// Where oversized payloads go; `None` makes them a publish error.
    pub blobs: Option<BlobStore>,
}

impl Default for PayloadCodec {
    fn default() -> Self {
        PayloadCodec {
            compress_threshold: COMPRESS_THRESHOLD,
            max_inline: DEFAULT_MAX_INLINE,
            max_inflated: DEFAULT_MAX_INFLATED,
            blobs: None,
        }
    }
}

impl PayloadCodec {
    /// Whether [`PayloadCodec::encode`] hands a raw payload of `len` bytes back unchanged
    /// (not over `max_inflated`, not compressed, not offloaded), whatever the headers say.
    ///
    /// ```
    /// let codec = ampybus::codec::PayloadCodec::default();
    /// assert!(codec.passes_through(256));
    /// assert!(!codec.passes_through(codec.compress_threshold + 1));
    /// ```
    pub fn passes_through(&self, len: usize) -> bool {
        len <= self.compress_threshold && len <= self.max_inline && len <= self.max_inflated
    }

    /// Turns a raw payload into wire bytes, setting `content_encoding` and the blob headers as
    /// needed. `domain` names the blob folder. Call before validating headers.
    ///
    /// A payload larger than `max_inflated` (64 MiB by default, what consumers accept) is
    /// refused.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use ampybus::{Headers, codec::PayloadCodec};
    /// let codec = PayloadCodec { max_inflated: 10, ..PayloadCodec::default() };
    /// let err = codec.encode(&mut Headers::new(), vec![0u8; 11].into(), "bars").await.unwrap_err();
    /// assert!(err.to_string().contains("11 bytes, over the limit of 10 bytes"), "{err}");
    /// # });
    /// ```
    pub async fn encode(&self, headers: &mut Headers, raw: Bytes, domain: &str) -> Result<Bytes> {
        if raw.len() > self.max_inflated {
            return Err(over_limit("payload", raw.len(), self.max_inflated));
        }
        let wire = if raw.len() > self.compress_threshold && headers.content_encoding().is_none() {
            headers.set(names::CONTENT_ENCODING, "gzip");
            Bytes::from(gzip(&raw))
        } else {
            raw
        };
        self.offload(headers, wire, domain).await
    }

    /// Moves wire bytes (already compressed when they are going to be) to the blob store when
    /// they are over [`PayloadCodec::max_inline`], setting `blob_ref`, `blob_hash` and
    /// `blob_size` and returning an empty inline payload; bytes within the limit are returned
    /// unchanged. Never compresses: the second half of [`PayloadCodec::encode`], also used
    /// for envelopes that arrive in their wire form ([`crate::Bus::publish_wire`]).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use ampybus::{Headers, codec::{BlobStore, PayloadCodec}};
    /// let dir = tempfile::tempdir().unwrap();
    /// let codec = PayloadCodec {
    ///     max_inline: 4,
    ///     blobs: Some(BlobStore::local(dir.path()).unwrap()),
    ///     ..Default::default()
    /// };
    /// let mut h = Headers::new().with("message_id", "m1");
    /// assert_eq!(&codec.offload(&mut h, b"abcd".to_vec().into(), "news").await.unwrap()[..], b"abcd");
    /// assert!(h.blob_ref().is_none());
    /// assert!(codec.offload(&mut h, b"abcde".to_vec().into(), "news").await.unwrap().is_empty());
    /// assert_eq!(h.blob_size(), Some(5));
    /// assert!(h.content_encoding().is_none());
    /// # });
    /// ```
    pub async fn offload(&self, headers: &mut Headers, wire: Bytes, domain: &str) -> Result<Bytes> {
        if wire.len() <= self.max_inline {
            return Ok(wire);
        }
        let Some(store) = &self.blobs else {
            return Err(Error::payload(format!(
                "payload is {} bytes after compression, over the inline limit of {} bytes, and no blob store is configured",
                wire.len(),
                self.max_inline
            )));
        };
        let id = headers.message_id().unwrap_or("unidentified").to_owned();
        let day = chrono::Utc::now().format("%Y-%m-%d");
        let key = format!("{domain}/{day}/{id}");
        let blob_ref = store.put(&key, wire.clone()).await?;
        headers.set(names::BLOB_REF, blob_ref);
        headers.set(names::BLOB_HASH, sha256_tag(&wire));
        headers.set(names::BLOB_SIZE, wire.len().to_string());
        Ok(Bytes::new())
    }

    /// Turns wire bytes back into the raw payload: fetches and verifies a blob when
    /// `blob_ref` is set, then inflates gzip.
    pub async fn decode(&self, headers: &Headers, wire: &Bytes) -> Result<Bytes> {
        self.decode_detailed(headers, wire)
            .await
            .map_err(|(_, e)| e)
    }

    /// Like [`PayloadCodec::decode`], with the failure class for DLQ reasons.
    pub async fn decode_detailed(
        &self,
        headers: &Headers,
        wire: &Bytes,
    ) -> std::result::Result<Bytes, (DecodeFailure, Error)> {
        let fetched = self.fetch_blob(headers).await?;
        let bytes = fetched.as_ref().unwrap_or(wire);
        inflate_if_needed(headers, bytes, self.max_inflated).map_err(|e| (DecodeFailure::Decode, e))
    }

    /// The envelope with a blob-stored payload brought inline: the blob's bytes as carried
    /// (still gzip-compressed when `content_encoding=gzip`, which is kept), fetched and
    /// verified against `blob_hash` and `blob_size`, and the `blob_ref`, `blob_hash` and
    /// `blob_size` headers removed. An envelope without `blob_ref` comes back unchanged.
    /// Publishing the result stores the payload as any publish does (offloaded again when it
    /// is over the inline limit of the receiving bus). Errors name the `blob_ref`: the blob
    /// cannot be read (kind `Transport`, or `Payload` when no store serves the ref), or its
    /// hash or size does not match (kind `Payload`).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use ampybus::{Envelope, Headers, Topic, codec::{BlobStore, PayloadCodec}};
    /// let dir = tempfile::tempdir().unwrap();
    /// let codec = PayloadCodec {
    ///     max_inline: 4,
    ///     blobs: Some(BlobStore::local(dir.path()).unwrap()),
    ///     ..Default::default()
    /// };
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "n-1");
    /// let wire = codec.encode(&mut h, b"large payload".to_vec().into(), "news").await.unwrap();
    /// let pointer = Envelope::new(&topic, h, wire);
    /// assert!(pointer.payload.is_empty());
    /// let inline = codec.inline_blob(&pointer).await.unwrap();
    /// assert_eq!(&inline.payload[..], b"large payload");
    /// assert!(inline.headers.blob_ref().is_none() && inline.headers.blob_hash().is_none());
    /// assert_eq!(inline.headers.message_id(), pointer.headers.message_id());
    /// # });
    /// ```
    pub async fn inline_blob(&self, env: &Envelope) -> Result<Envelope> {
        let Some(bytes) = self.fetch_blob(&env.headers).await.map_err(|(_, e)| e)? else {
            return Ok(env.clone());
        };
        let mut headers = env.headers.clone();
        for name in [names::BLOB_REF, names::BLOB_HASH, names::BLOB_SIZE] {
            headers.remove(name);
        }
        Ok(Envelope {
            topic: env.topic.clone(),
            headers,
            payload: bytes,
        })
    }

    /// The verified blob bytes when `blob_ref` is set; `None` for an inline payload.
    async fn fetch_blob(
        &self,
        headers: &Headers,
    ) -> std::result::Result<Option<Bytes>, (DecodeFailure, Error)> {
        Ok(if let Some(blob_ref) = headers.blob_ref() {
            let store = self
                .blobs
                .clone()
                .or_else(|| local_store_for(blob_ref))
                .ok_or_else(|| {
                    (
                        DecodeFailure::BlobUnavailable,
                        Error::payload(format!(
                            "blob_ref {blob_ref:?}: no blob store configured for it"
                        )),
                    )
                })?;
            let fetched = store
                .get(blob_ref)
                .await
                .map_err(|e| (DecodeFailure::BlobUnavailable, e))?;
            let want = headers.blob_hash().unwrap_or_default();
            let got = sha256_tag(&fetched);
            if got != want {
                return Err((
                    DecodeFailure::BlobHashMismatch,
                    Error::payload(format!(
                        "blob {blob_ref}: hash {got} does not match blob_hash {want}"
                    )),
                ));
            }
            if headers
                .blob_size()
                .is_some_and(|s| s != fetched.len() as u64)
            {
                return Err((
                    DecodeFailure::BlobHashMismatch,
                    Error::payload(format!(
                        "blob {blob_ref}: size {} does not match blob_size",
                        fetched.len()
                    )),
                ));
            }
            Some(fetched)
        } else {
            None
        })
    }
}

/// A local store for a `file://` blob_ref written by another process on this host.
fn local_store_for(blob_ref: &str) -> Option<BlobStore> {
    let url = url::Url::parse(blob_ref).ok()?;
    if url.scheme() != "file" {
        return None;
    }
    let path = url.to_file_path().ok()?;
    let dir = path.parent()?;
    let store = LocalFileSystem::new_with_prefix(dir).ok()?;
    let prefix = url::Url::from_directory_path(dir).ok()?.to_string();
    Some(BlobStore {
        store: Arc::new(store),
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn threshold_is_strictly_greater() {
        rt().block_on(async {
            let c = PayloadCodec::default();
            let mut h = Headers::new();
            let w = c
                .encode(&mut h, vec![1u8; COMPRESS_THRESHOLD].into(), "bars")
                .await
                .unwrap();
            assert_eq!(h.content_encoding(), None);
            assert_eq!(w.len(), COMPRESS_THRESHOLD);
            let mut h = Headers::new();
            c.encode(&mut h, vec![1u8; COMPRESS_THRESHOLD + 1].into(), "bars")
                .await
                .unwrap();
            assert_eq!(h.content_encoding(), Some("gzip"));
        });
    }

    #[test]
    fn blob_round_trip_and_tamper() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let c = PayloadCodec {
                max_inline: 1024,
                blobs: Some(BlobStore::local(dir.path()).unwrap()),
                ..Default::default()
            };
            // Random-ish bytes that gzip cannot shrink below 1 KiB.
            let raw: Vec<u8> = (0..300_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let mut h = Headers::new().with("message_id", "018f5e2f-9b1c-76aa-8f7a-3b1d8f3ea0c2");
            let wire = c.encode(&mut h, raw.clone().into(), "bars").await.unwrap();
            assert!(wire.is_empty());
            assert!(h.blob_ref().unwrap().starts_with("file://"));
            let size: usize = h.blob_size().unwrap() as usize;
            assert_eq!(h.blob_hash().unwrap().len(), 71);
            assert_eq!(&c.decode(&h, &wire).await.unwrap()[..], &raw[..]);
            // A consumer without a configured store still reads a local file:// blob.
            let plain = PayloadCodec::default();
            assert_eq!(plain.decode(&h, &wire).await.unwrap().len(), raw.len());
            // Tamper with the blob: hash mismatch.
            let path = url::Url::parse(h.blob_ref().unwrap())
                .unwrap()
                .to_file_path()
                .unwrap();
            std::fs::write(&path, vec![0u8; size]).unwrap();
            let (kind, e) = c.decode_detailed(&h, &wire).await.unwrap_err();
            assert_eq!(kind, DecodeFailure::BlobHashMismatch);
            assert!(e.to_string().contains("does not match blob_hash"), "{e}");
            // No store and too large: clear error.
            let mut h2 = Headers::new();
            let e = PayloadCodec {
                max_inline: 10,
                ..Default::default()
            }
            .encode(&mut h2, raw.into(), "bars")
            .await
            .unwrap_err();
            assert!(
                e.to_string().contains("over the inline limit of 10 bytes"),
                "{e}"
            );
        });
    }

    #[test]
    fn gzip_bomb_is_refused() {
        let h = Headers::new().with("content_encoding", "gzip");
        let z = gzip(&vec![0u8; 10_000_000]);
        let e = inflate_if_needed(&h, &z, 1_000_000).unwrap_err();
        assert!(e.to_string().contains("more than 1000000 bytes"), "{e}");
    }
}
