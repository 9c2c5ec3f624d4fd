//! The lease of a durable consumer on JetStream KV (see [`crate::transport::InstanceOrder`]):
//! bucket `{prefix}_leases` (one value per key, no max age, deletes allowed so an operator
//! can free a lease), key = the consumer name in URL-safe base64, value `held {token}` or
//! `free`. Every write is revision-checked (`update` with the last revision), so two
//! instances can never both believe they took it.
//!
//! NATS 2.9 has no per-key TTL, so a lease runs out by observation: a standby that sees the
//! same revision for a whole lease time (its own clock) knows the holder stopped renewing —
//! the holder renews every quarter of it and stops fetching after 4/5 of it without a
//! confirmed renewal — and takes it over with a revision-checked update. A delete marker
//! where a holder was means the lease was removed while held ([`Previous::Removed`]).

use super::kv_dedupe::{BucketSpec, open_bucket};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::lease::{LeaseStore, Previous};
use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use base64::Engine as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) struct NatsLease {
    js: jetstream::Context,
    bucket_name: String,
    replicas: usize,
    key: String,
    where_: String,
    bucket: tokio::sync::OnceCell<kv::Store>,
    /// The revision this instance last wrote.
    rev: Mutex<u64>,
    /// A holder's revision and when this instance first saw it.
    seen: Mutex<Option<(u64, Instant)>>,
}

impl NatsLease {
    pub(crate) fn new(shared: &super::Shared, consumer: &str) -> NatsLease {
        NatsLease {
            js: shared.js.clone(),
            bucket_name: format!("{}_leases", shared.opts.stream_prefix),
            replicas: shared.opts.replicas,
            key: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(consumer.as_bytes()),
            where_: format!("{} consumer lease {consumer}", shared.where_()),
            bucket: tokio::sync::OnceCell::new(),
            rev: Mutex::new(0),
            seen: Mutex::new(None),
        }
    }

    async fn bucket(&self) -> Result<&kv::Store> {
        self.bucket
            .get_or_try_init(|| {
                open_bucket(
                    &self.js,
                    &self.bucket_name,
                    BucketSpec {
                        description: "ampybus consumer leases (one active instance per consumer name)",
                        max_age: Duration::ZERO,
                        replicas: self.replicas,
                        deny_delete: false,
                    },
                    &self.where_,
                )
            })
            .await
    }

    fn err(&self, what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::with_source(
            ErrorKind::Transport,
            format!("{}: {what}: {e}", self.where_),
            e,
        )
    }

    fn held(token: &str) -> bytes::Bytes {
        bytes::Bytes::from(format!("held {token}"))
    }

    /// Writes `value` over revision `rev`; `None`: someone wrote first.
    async fn write(&self, b: &kv::Store, value: bytes::Bytes, rev: u64) -> Result<Option<u64>> {
        match b.update(&self.key, value, rev).await {
            Ok(r) => {
                *self.rev.lock().unwrap_or_else(|p| p.into_inner()) = r;
                Ok(Some(r))
            }
            Err(e) if e.to_string().contains("wrong last sequence") => Ok(None),
            Err(e) => Err(self.err("writing the lease", e)),
        }
    }
}

#[async_trait]
impl LeaseStore for NatsLease {
    async fn acquire(&self, token: &str, ttl: Duration) -> Result<Option<Previous>> {
        let b = self.bucket().await?;
        let entry = b
            .entry(&self.key)
            .await
            .map_err(|e| self.err("reading the lease", e))?;
        let Some(e) = entry else {
            return Ok(match b.create(&self.key, Self::held(token)).await {
                Ok(r) => {
                    *self.rev.lock().unwrap_or_else(|p| p.into_inner()) = r;
                    Some(Previous::Clean)
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => None,
                Err(e) => return Err(self.err("creating the lease", e)),
            });
        };
        let prev = match e.operation {
            kv::Operation::Delete | kv::Operation::Purge => Previous::Removed(ttl),
            kv::Operation::Put => {
                let v = String::from_utf8_lossy(&e.value);
                match v.strip_prefix("held ") {
                    None => Previous::Clean,
                    Some(t) if t == token => Previous::Mine,
                    Some(_) => {
                        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                        match *seen {
                            Some((r, since)) if r == e.revision && since.elapsed() >= ttl => {
                                Previous::Lapsed
                            }
                            Some((r, _)) if r == e.revision => return Ok(None),
                            _ => {
                                *seen = Some((e.revision, Instant::now()));
                                return Ok(None);
                            }
                        }
                    }
                }
            }
        };
        Ok(self
            .write(b, Self::held(token), e.revision)
            .await?
            .map(|_| prev))
    }

    async fn renew(&self, token: &str, _ttl: Duration) -> Result<bool> {
        let b = self.bucket().await?;
        let rev = *self.rev.lock().unwrap_or_else(|p| p.into_inner());
        if self.write(b, Self::held(token), rev).await?.is_some() {
            return Ok(true);
        }
        // Someone wrote since: our own earlier write whose answer was lost, or another holder.
        let e = b
            .entry(&self.key)
            .await
            .map_err(|e| self.err("reading the lease", e))?;
        match e {
            Some(e)
                if e.operation == kv::Operation::Put && e.value == Self::held(token).as_ref() =>
            {
                Ok(self
                    .write(b, Self::held(token), e.revision)
                    .await?
                    .is_some())
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, token: &str) -> Result<()> {
        let b = self.bucket().await?;
        let e = b
            .entry(&self.key)
            .await
            .map_err(|e| self.err("reading the lease", e))?;
        if let Some(e) = e
            && e.operation == kv::Operation::Put
            && e.value == Self::held(token).as_ref()
        {
            self.write(b, bytes::Bytes::from_static(b"free"), e.revision)
                .await?;
        }
        Ok(())
    }
}
