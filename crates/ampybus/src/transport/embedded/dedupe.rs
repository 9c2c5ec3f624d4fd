//! The embedded log's dedupe store: records live in the consumer group's journal, so the
//! records and the acks of a batch are one journal frame.

use super::Inner;
use super::group::{Journal, Meta, key128};
use super::log::now_us;
use super::subscription::{DurableSettler, Instance};
use crate::error::{Error, Result};
use crate::transport::Delivery;
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The embedded log's own dedupe store. A consumer's records are kept in its group's journal
/// (`groups/<consumer>/`), so that the runtime records the dedupe entries of a batch and acks
/// it in **one** atomic write ([`crate::transport::dedupe_store::DedupeStore::record_and_ack`]). Lookups are
/// answered from memory (the journal replayed, and caught up with other processes' writes
/// before each lookup). Entries older than the window (default
/// [`crate::transport::dedupe_store::DEFAULT_WINDOW`]) no longer count and are dropped when the journal is
/// compacted.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let store = bus.transport().dedupe_store().unwrap();
/// let keys = vec!["m1".to_owned()];
/// assert!(!store.is_applied("oms", &keys).await.unwrap());
/// store.record_applied("oms", &keys).await.unwrap();
/// assert!(store.is_applied("oms", &keys).await.unwrap());
/// assert!(!store.is_applied("risk", &keys).await.unwrap());
/// # });
/// ```
pub struct EmbeddedDedupe {
    inner: Arc<Inner>,
    window: Duration,
}

impl std::fmt::Debug for EmbeddedDedupe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedDedupe")
            .field("dir", &self.inner.dir)
            .field("window", &self.window)
            .finish()
    }
}

impl EmbeddedDedupe {
    pub(crate) fn new(inner: Arc<Inner>) -> EmbeddedDedupe {
        EmbeddedDedupe {
            inner,
            window: crate::transport::dedupe_store::DEFAULT_WINDOW,
        }
    }

    /// Sets the window (entries older than this no longer count).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = ampybus::transport::embedded::EmbeddedLog::open(
    ///     ampybus::transport::embedded::EmbeddedOptions::new(dir.path())).unwrap();
    /// let _store = ampybus::transport::embedded::EmbeddedDedupe::for_log(&log)
    ///     .with_window(std::time::Duration::from_secs(3600));
    /// # });
    /// ```
    pub fn with_window(mut self, window: Duration) -> EmbeddedDedupe {
        self.window = window;
        self
    }

    /// The dedupe store of `log`.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = ampybus::transport::embedded::EmbeddedLog::open(
    ///     ampybus::transport::embedded::EmbeddedOptions::new(dir.path())).unwrap();
    /// let store = ampybus::transport::embedded::EmbeddedDedupe::for_log(&log);
    /// assert!(format!("{store:?}").contains("EmbeddedDedupe"));
    /// ```
    pub fn for_log(log: &super::EmbeddedLog) -> EmbeddedDedupe {
        EmbeddedDedupe::new(log.inner.clone())
    }

    fn cutoff_ms(&self) -> i64 {
        now_us() / 1000 - i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX / 2)
    }

    /// The journal of `consumer` (created as a dedupe-only group when it does not exist).
    fn journal(&self, consumer: &str) -> Result<Arc<Mutex<Journal>>> {
        if consumer.is_empty() || consumer.len() > 200 {
            return Err(Error::config(format!(
                "dedupe consumer name {consumer:?}: must be 1–200 characters"
            )));
        }
        self.inner.group(consumer, || {
            Ok(Meta {
                name: consumer.to_owned(),
                pattern: String::new(),
                start: 0,
                created_us: now_us(),
            })
        })
    }

    async fn lookup(&self, consumer: &str, keys: &[&str]) -> Result<Vec<bool>> {
        let j = self.journal(consumer)?;
        let mut j = crate::yield_lock::lock_yielding(&*j).await;
        j.catch_up(false)?;
        let cutoff = self.cutoff_ms();
        Ok(keys
            .iter()
            .map(|k| j.state.dedupe.get(&key128(k)).is_some_and(|t| *t >= cutoff))
            .collect())
    }

    fn record(&self, consumer: &str, keys: &[u128]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let j = self.journal(consumer)?;
        let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
        let body = super::group::frames::ack(0, now_us() / 1000, &[], &[], keys);
        j.append_shared(super::format::KIND_ACK, &body)
    }

    /// The instance all `deliveries` belong to, when they are durable deliveries of one
    /// instance (the caller checks, under its lock, that it is of this log and of `consumer`).
    fn instance_of(&self, deliveries: &[Delivery]) -> Option<Arc<Mutex<Instance>>> {
        let first = deliveries
            .first()?
            .settler_any()?
            .downcast_ref::<DurableSettler>()?
            .inst
            .clone();
        deliveries
            .iter()
            .all(|d| {
                d.settler_any()
                    .and_then(|a| a.downcast_ref::<DurableSettler>())
                    .is_some_and(|s| Instance::same(&s.inst, &first))
            })
            .then_some(first)
    }

    async fn commit(
        &self,
        consumer: &str,
        keys: Vec<u128>,
        deliveries: Vec<Delivery>,
    ) -> std::result::Result<(), (Error, Vec<Delivery>)> {
        if let Some(inst) = self.instance_of(&deliveries) {
            let seqs: Vec<u64> = deliveries.iter().map(|d| d.info.sequence).collect();
            let r = {
                let mut i = crate::yield_lock::lock_yielding(&*inst).await;
                i.belongs_to(&self.inner, consumer)
                    .then(|| i.ack(&seqs, &keys))
            };
            if let Some(r) = r {
                return r.map_err(|e| (e, deliveries));
            }
        }
        if let Err(e) = self.record(consumer, &keys) {
            return Err((e, deliveries));
        }
        Delivery::ack_all(deliveries).await
    }
}

#[async_trait]
impl crate::transport::dedupe_store::DedupeStore for EmbeddedDedupe {
    async fn is_applied(&self, consumer: &str, keys: &[String]) -> Result<bool> {
        let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
        Ok(self.lookup(consumer, &ks).await?.into_iter().any(|b| b))
    }

    async fn applied_among(
        &self,
        consumer: &str,
        keys: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
        let found = self.lookup(consumer, &ks).await?;
        Ok(keys
            .iter()
            .zip(found)
            .filter(|(_, f)| *f)
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn lookup_batch(&self, consumer: &str, keys: &[&str]) -> Result<Vec<bool>> {
        self.lookup(consumer, keys).await
    }

    async fn record_applied(&self, consumer: &str, keys: &[String]) -> Result<()> {
        let ks: Vec<u128> = keys.iter().map(|k| key128(k)).collect();
        self.record(consumer, &ks)
    }

    async fn record_and_ack(
        &self,
        consumer: &str,
        keys: &[String],
        deliveries: Vec<Delivery>,
    ) -> std::result::Result<(), (Error, Vec<Delivery>)> {
        let ks: Vec<u128> = keys.iter().map(|k| key128(k)).collect();
        self.commit(consumer, ks, deliveries).await
    }

    async fn commit_batch(
        &self,
        consumer: &str,
        keys: &[&str],
        deliveries: Vec<Delivery>,
    ) -> std::result::Result<(), (Error, Vec<Delivery>)> {
        let ks: Vec<u128> = keys.iter().map(|k| key128(k)).collect();
        self.commit(consumer, ks, deliveries).await
    }
}
