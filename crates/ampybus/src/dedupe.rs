//! Consumer-side dedupe: "has this consumer already applied this message?".
//!
//! A message is identified by its `message_id` and, when it carries one, by
//! `{domain}:{dedupe_key}` ([`dedupe_keys`]). The consumer runtime asks
//! [`DedupeStore::is_applied`] before running a handler and calls
//! [`DedupeStore::record_applied`] only after the handler returned `Ok`, in the same batch as
//! the ack, so a crash never turns into a loss (at worst the handler runs again).
//!
//! [`SqliteDedupeStore`] is the durable implementation: one SQLite file (WAL) shared by every
//! instance — threads or processes — of a consumer name that opens the same file (so on one
//! host; instances on other hosts need a shared store, e.g. the transport's own on NATS and
//! Redis, see [`crate::transport::Transport::dedupe_store`]). Entries older than the window
//! (default [`DEFAULT_WINDOW`], 7 days) no longer count and are purged periodically.

use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::topic::Domain;
use async_trait::async_trait;
use rusqlite::{Connection, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Default dedupe window: 7 days.
///
/// ```
/// assert_eq!(ampybus::dedupe::DEFAULT_WINDOW.as_secs(), 7 * 24 * 3600);
/// ```
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// File name of the embedded default store, next to the embedded log.
///
/// ```
/// assert_eq!(ampybus::dedupe::DEFAULT_FILE, "dedupe.sqlite3");
/// ```
pub const DEFAULT_FILE: &str = "dedupe.sqlite3";

/// The dedupe keys of a message: its `message_id` and, if present, `{domain}:{dedupe_key}`.
///
/// ```
/// use ampybus::{Domain, Headers};
/// let h = Headers::new().with("message_id", "m1").with("dedupe_key", "co_1");
/// assert_eq!(ampybus::dedupe::dedupe_keys(&h, Domain::Orders), vec!["m1", "orders:co_1"]);
/// ```
pub fn dedupe_keys(headers: &Headers, domain: Domain) -> Vec<String> {
    let mut keys = Vec::with_capacity(2);
    if let Some(id) = headers.message_id() {
        keys.push(id.to_owned());
    }
    if let Some(scope) = headers.dedupe_scope(domain) {
        keys.push(scope);
    }
    keys
}

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
        deliveries: Vec<crate::transport::Delivery>,
    ) -> std::result::Result<(), (crate::Error, Vec<crate::transport::Delivery>)> {
        if let Err(e) = self.record_applied(consumer, keys).await {
            return Err((e, deliveries));
        }
        crate::transport::Delivery::ack_all(deliveries).await
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
        deliveries: Vec<crate::transport::Delivery>,
    ) -> std::result::Result<(), (crate::Error, Vec<crate::transport::Delivery>)> {
        let owned: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        self.record_and_ack(consumer, &owned, deliveries).await
    }
}

/// The durable SQLite dedupe store (WAL mode, busy timeout, one file shared by processes).
///
/// ```
/// use ampybus::dedupe::SqliteDedupeStore;
/// use std::time::Duration;
/// let dir = tempfile::tempdir().unwrap();
/// let store = SqliteDedupeStore::open(dir.path().join("dedupe.sqlite3"))
///     .unwrap()
///     .with_window(Duration::from_secs(3600));
/// assert_eq!(store.window(), Duration::from_secs(3600));
/// ```
#[derive(Clone)]
pub struct SqliteDedupeStore {
    inner: Arc<Inner>,
    window: Duration,
}

struct Inner {
    conn: Mutex<Connection>,
    /// Idle read connections (WAL lets them read while `conn` writes); lookups take one, run
    /// one indexed query inline on the calling task and put it back.
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
    last_purge_ms: Mutex<i64>,
}

impl std::fmt::Debug for SqliteDedupeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDedupeStore")
            .field("path", &self.inner.path)
            .field("window", &self.window)
            .finish()
    }
}

/// How often old rows are purged (at most).
const PURGE_EVERY_MS: i64 = 60_000;

fn db_err(what: &str, e: rusqlite::Error) -> Error {
    Error::with_source(ErrorKind::Transport, format!("dedupe store: {what}"), e)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl SqliteDedupeStore {
    /// Opens (creating if needed) the store in `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::with_source(
                    ErrorKind::Config,
                    format!("dedupe store: cannot create {}", parent.display()),
                    e,
                )
            })?;
        }
        let conn = Connection::open(&path).map_err(|e| db_err("open", e))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| db_err("busy_timeout", e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| db_err("journal_mode", e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| db_err("synchronous", e))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS applied (
                consumer TEXT NOT NULL,
                key TEXT NOT NULL,
                applied_at_ms INTEGER NOT NULL,
                PRIMARY KEY (consumer, key)
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS applied_by_time ON applied (applied_at_ms);",
        )
        .map_err(|e| db_err("create schema", e))?;
        Ok(SqliteDedupeStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                readers: Mutex::new(Vec::new()),
                path,
                last_purge_ms: Mutex::new(now_ms()),
            }),
            window: DEFAULT_WINDOW,
        })
    }

    /// Sets the dedupe window (entries older than this no longer count).
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The dedupe window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn reader(&self) -> Result<Connection> {
        if let Some(c) = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
        {
            return Ok(c);
        }
        let c = Connection::open(&self.inner.path).map_err(|e| db_err("open reader", e))?;
        c.busy_timeout(Duration::from_secs(10))
            .map_err(|e| db_err("busy_timeout", e))?;
        Ok(c)
    }

    fn cutoff_ms(&self) -> i64 {
        now_ms().saturating_sub(i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX))
    }

    /// Deletes entries older than the window; returns how many.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteDedupeStore::open(dir.path().join("d.sqlite3")).unwrap()
    ///     .with_window(Duration::ZERO);
    /// store.record_applied("c", &["k".to_owned()]).await.unwrap();
    /// std::thread::sleep(Duration::from_millis(5));
    /// assert_eq!(store.purge().await.unwrap(), 1);
    /// # });
    /// ```
    pub async fn purge(&self) -> Result<u64> {
        let this = self.clone();
        blocking(move || {
            let cutoff = this.cutoff_ms();
            let conn = this.inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            let n = conn
                .execute(
                    "DELETE FROM applied WHERE applied_at_ms < ?1",
                    params![cutoff],
                )
                .map_err(|e| db_err("purge", e))?;
            Ok(n as u64)
        })
        .await
    }

    fn maybe_purge(&self, conn: &Connection) {
        let now = now_ms();
        {
            let mut last = self
                .inner
                .last_purge_ms
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if now - *last < PURGE_EVERY_MS {
                return;
            }
            *last = now;
        }
        if let Err(e) = conn.execute(
            "DELETE FROM applied WHERE applied_at_ms < ?1",
            params![self.cutoff_ms()],
        ) {
            tracing::warn!(error = %e, "dedupe store: purge failed");
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Transport, "dedupe store: task failed", e))?
}

#[async_trait]
impl DedupeStore for SqliteDedupeStore {
    async fn is_applied(&self, consumer: &str, keys: &[String]) -> Result<bool> {
        if keys.is_empty() {
            return Ok(false);
        }
        // A primary-key lookup takes microseconds: it runs inline, on a pooled read
        // connection, instead of a round trip through the blocking pool per message.
        let conn = self.reader()?;
        let found = (|| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT 1 FROM applied WHERE consumer = ?1 AND key = ?2 AND applied_at_ms >= ?3",
                )
                .map_err(|e| db_err("prepare", e))?;
            let cutoff = self.cutoff_ms();
            for k in keys {
                if stmt
                    .exists(params![consumer, k, cutoff])
                    .map_err(|e| db_err("query", e))?
                {
                    return Ok(true);
                }
            }
            Ok(false)
        })();
        self.inner
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        found
    }

    async fn record_applied(&self, consumer: &str, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let this = self.clone();
        let consumer = consumer.to_owned();
        let keys = keys.to_vec();
        blocking(move || {
            let mut conn = this.inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            let now = now_ms();
            let tx = conn.transaction().map_err(|e| db_err("begin", e))?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO applied (consumer, key, applied_at_ms) VALUES (?1, ?2, ?3)",
                    )
                    .map_err(|e| db_err("prepare", e))?;
                for k in &keys {
                    stmt.execute(params![consumer, k, now])
                        .map_err(|e| db_err("insert", e))?;
                }
            }
            tx.commit().map_err(|e| db_err("commit", e))?;
            this.maybe_purge(&conn);
            Ok(())
        })
        .await
    }
}
