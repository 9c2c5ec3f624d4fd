//! The dedupe stores replays served by a running consumer go through.

use super::*;

/// The replay store of a consumer whose handler dedupes by itself (an inbox): it knows nothing
/// and records nothing, so every replayed message reaches the handler, which skips it when its
/// inbox row exists.
pub(super) struct HandlerDedupes;

#[async_trait::async_trait]
impl DedupeStore for HandlerDedupes {
    async fn is_applied(&self, _consumer: &str, _keys: &[String]) -> Result<bool> {
        Ok(false)
    }

    async fn record_applied(&self, _consumer: &str, _keys: &[String]) -> Result<()> {
        Ok(())
    }
}

/// The dedupe store a consumer's replays use, sharing the live path's key book: a key the live
/// path is handling, applied and has not recorded yet, or recorded while an earlier lookup is in
/// flight counts as applied (then the store is asked). A key the replay goes on to apply is
/// claimed in the book (`Handling`) from the moment it is found not applied until its record is
/// written (`Recorded`, kept while live batches looked up before it are in flight) or the
/// handling fails ([`DedupeStore::abandon`]): so a live twin arriving meanwhile waits and is then
/// skipped, and a replay and the live path never apply one key twice, whichever comes first.
pub(super) struct LiveAwareDedupe {
    pub(super) shared: Arc<Shared>,
}

impl LiveAwareDedupe {
    pub(super) fn keys(keys: &[String]) -> Vec<DKey> {
        keys.iter().map(|k| DKey::parse(k)).collect()
    }

    pub(super) fn known(&self, keys: &[DKey]) -> bool {
        self.shared
            .book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .known(keys)
    }
}

#[async_trait::async_trait]
impl DedupeStore for LiveAwareDedupe {
    async fn is_applied(&self, consumer: &str, keys: &[String]) -> Result<bool> {
        let dkeys = LiveAwareDedupe::keys(keys);
        if self.known(&dkeys) {
            return Ok(true);
        }
        if let Some(store) = &self.shared.dedupe
            && store.is_applied(consumer, keys).await?
        {
            return Ok(true);
        }
        // Not applied anywhere: the replay takes the keys, unless the live path took or
        // applied one of them while the store was asked.
        let mut book = self.shared.book.lock().unwrap_or_else(|p| p.into_inner());
        if book.known(&dkeys) {
            return Ok(true);
        }
        for k in dkeys {
            book.marks.insert(k, Mark::Handling);
        }
        Ok(false)
    }

    async fn record_applied(&self, consumer: &str, keys: &[String]) -> Result<()> {
        let written = match &self.shared.dedupe {
            Some(store) => store.record_applied(consumer, keys).await,
            None => Ok(()),
        };
        // Applied, written or not: the book keeps the keys as the live path keeps its own
        // records (a live twin looked up before now is skipped).
        self.shared
            .book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&LiveAwareDedupe::keys(keys));
        written
    }

    async fn abandon(&self, _consumer: &str, keys: &[String]) -> Result<()> {
        let mut book = self.shared.book.lock().unwrap_or_else(|p| p.into_inner());
        for k in LiveAwareDedupe::keys(keys) {
            if book.marks.get(&k) == Some(&Mark::Handling) {
                book.marks.remove(&k);
            }
        }
        Ok(())
    }
}
