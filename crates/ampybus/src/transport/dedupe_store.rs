//! The dedupe store's contract ([`DedupeStore`]), next to the deliveries it records and acks
//! (public as `ampybus::dedupe::DedupeStore`; the stores themselves: [`crate::dedupe`] and the
//! bindings').

use super::Delivery;
use crate::error::Result;
use async_trait::async_trait;
use std::time::Duration;

/// Default dedupe window: 7 days.
///
/// ```
/// assert_eq!(ampybus::dedupe::DEFAULT_WINDOW.as_secs(), 7 * 24 * 3600);
/// ```
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where a consumer remembers what it has applied. Instances of a consumer name see each other's
/// records when they use the same store. A transport's default store
/// ([`crate::transport::Transport::dedupe_store`]) reaches every host on NATS and Redis (and on
/// Kafka with `dedupe=redis://…`), the processes on one data directory on the embedded log, and
/// on Kafka by default only the processes that open the same SQLite file.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
/// let dir = tempfile::tempdir().unwrap();
/// let store = SqliteDedupeStore::open(dir.path().join("d.sqlite3")).unwrap();
/// let keys = vec!["m1".to_owned()];
/// assert!(!store.is_applied("oms", &keys).await.unwrap());
/// store.record_applied("oms", &keys).await.unwrap();
/// assert!(store.is_applied("oms", &keys).await.unwrap());
/// assert!(!store.is_applied("risk", &keys).await.unwrap());
/// # });
/// ```
#[async_trait]
pub trait DedupeStore: Send + Sync + 'static {
    /// True when any of `keys` was applied by `consumer` within the window.
    async fn is_applied(&self, consumer: &str, keys: &[String]) -> Result<bool>;
    /// Records `keys` as applied by `consumer`, all in one transaction.
    async fn record_applied(&self, consumer: &str, keys: &[String]) -> Result<()>;
    /// Which of `keys` `consumer` applied within the window — one lookup for a whole fetched
    /// batch. The default asks [`DedupeStore::is_applied`] key by key.
    async fn applied_among(
        &self,
        consumer: &str,
        keys: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        let mut out = std::collections::HashSet::new();
        for k in keys {
            if self.is_applied(consumer, std::slice::from_ref(k)).await? {
                out.insert(k.clone());
            }
        }
        Ok(out)
    }
    /// Records `keys` as applied by `consumer`, then acks `deliveries` — the runtime's last
    /// step for a batch. The default does the two one after the other (the record first, so a
    /// crash in between redelivers messages that dedupe then skips); a store that lives with
    /// the transport (the embedded log's) does both in one transaction. On failure the
    /// deliveries not acked are handed back.
    async fn record_and_ack(
        &self,
        consumer: &str,
        keys: &[String],
        deliveries: Vec<Delivery>,
    ) -> std::result::Result<(), (crate::error::Error, Vec<Delivery>)> {
        if let Err(e) = self.record_applied(consumer, keys).await {
            return Err((e, deliveries));
        }
        Delivery::ack_all(deliveries).await
    }
    /// Which of `keys` `consumer` applied within the window, as one flag per key in order —
    /// the consumer runtime's one lookup per fetched batch, with the keys borrowed. The
    /// default builds on [`DedupeStore::applied_among`] (a `String` per key); a store that can
    /// look up borrowed keys overrides it.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteDedupeStore::open(dir.path().join("d.sqlite3")).unwrap();
    /// store.record_applied("oms", &["m2".to_owned()]).await.unwrap();
    /// assert_eq!(store.lookup_batch("oms", &["m1", "m2"]).await.unwrap(), vec![false, true]);
    /// # });
    /// ```
    async fn lookup_batch(&self, consumer: &str, keys: &[&str]) -> Result<Vec<bool>> {
        let owned: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        let applied = self.applied_among(consumer, &owned).await?;
        Ok(owned.iter().map(|k| applied.contains(k)).collect())
    }
    /// `keys` were found not applied by [`DedupeStore::is_applied`], and the handling that
    /// followed did not apply them (it failed): a store that reserves keys while they are
    /// handled (the store a running consumer's replays use) frees them here. The default does
    /// nothing.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteDedupeStore::open(dir.path().join("d.sqlite3")).unwrap();
    /// let keys = ["m1".to_owned()];
    /// assert!(!store.is_applied("oms", &keys).await.unwrap());
    /// store.abandon("oms", &keys).await.unwrap();
    /// assert!(!store.is_applied("oms", &keys).await.unwrap());
    /// # });
    /// ```
    async fn abandon(&self, consumer: &str, keys: &[String]) -> Result<()> {
        let _ = (consumer, keys);
        Ok(())
    }
    /// [`DedupeStore::record_and_ack`] with the keys borrowed — the consumer runtime's last
    /// step for a batch. The default builds on `record_and_ack` (a `String` per key), so a
    /// store that records and acks in one transaction keeps doing so; a store that can record
    /// borrowed keys overrides it.
    async fn commit_batch(
        &self,
        consumer: &str,
        keys: &[&str],
        deliveries: Vec<Delivery>,
    ) -> std::result::Result<(), (crate::error::Error, Vec<Delivery>)> {
        let owned: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        self.record_and_ack(consumer, &owned, deliveries).await
    }
}
