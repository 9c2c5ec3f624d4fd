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

pub use crate::transport::dedupe_store::{DEFAULT_WINDOW, DedupeStore};

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

/// Which dedupe store a consumer uses, as a URL option (`dedupe=…`) names it: the one place
/// that turns such a name into a store ([`open`]), so no binding names another's store.
///
/// ```
/// use ampybus::dedupe::DedupeSpec;
/// use std::path::PathBuf;
/// assert_eq!(DedupeSpec::parse("off").unwrap(), DedupeSpec::Off);
/// assert_eq!(DedupeSpec::parse("sqlite:/d/x.sqlite3").unwrap(), DedupeSpec::Sqlite(PathBuf::from("/d/x.sqlite3")));
/// assert_eq!(DedupeSpec::parse("redis://h:6379").unwrap(), DedupeSpec::Redis("redis://h:6379".into()));
/// assert!(DedupeSpec::parse("sqlite:").unwrap_err().contains("needs a path"));
/// assert!(DedupeSpec::parse("mongo://h").unwrap_err().contains("must be"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DedupeSpec {
    /// A SQLite file on this host (`sqlite:PATH`).
    Sqlite(PathBuf),
    /// Redis keys with a TTL, shared by every host (`redis://…` or `rediss://…`; needs cargo
    /// feature `redis`).
    Redis(String),
    /// No dedupe store (`off`; the runtime warns).
    Off,
}

impl DedupeSpec {
    /// Parses `sqlite:PATH`, `redis://…`, `rediss://…` or `off`; the error is the rule broken
    /// (callers prefix the option's name).
    ///
    /// ```
    /// assert!(ampybus::dedupe::DedupeSpec::parse("rediss://h").is_ok());
    /// ```
    pub fn parse(v: &str) -> std::result::Result<DedupeSpec, String> {
        if v == "off" {
            Ok(DedupeSpec::Off)
        } else if let Some(p) = v.strip_prefix("sqlite:") {
            if p.is_empty() {
                return Err("`sqlite:` needs a path".into());
            }
            Ok(DedupeSpec::Sqlite(PathBuf::from(p)))
        } else if v.starts_with("redis://") || v.starts_with("rediss://") {
            Ok(DedupeSpec::Redis(v.to_owned()))
        } else {
            Err("must be `sqlite:PATH`, `redis://…` or `off`".into())
        }
    }
}

/// Opens the store `spec` names (`None` for [`DedupeSpec::Off`]). A SQLite file's directory
/// is created when missing. Errors start with `context` (e.g. the bus URL, redacted) and name
/// the option `dedupe`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::dedupe::{DedupeSpec, open};
/// let dir = tempfile::tempdir().unwrap();
/// let spec = DedupeSpec::Sqlite(dir.path().join("sub/d.sqlite3"));
/// let store = open(&spec, "example").await.unwrap().unwrap();
/// store.record_applied("oms", &["m1".to_owned()]).await.unwrap();
/// assert!(store.is_applied("oms", &["m1".to_owned()]).await.unwrap());
/// assert!(open(&DedupeSpec::Off, "example").await.unwrap().is_none());
/// # });
/// ```
pub async fn open(spec: &DedupeSpec, context: &str) -> Result<Option<Arc<dyn DedupeStore>>> {
    match spec {
        DedupeSpec::Off => Ok(None),
        DedupeSpec::Sqlite(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Config,
                        format!(
                            "{context}: option `dedupe`: cannot create {}",
                            dir.display()
                        ),
                        e,
                    )
                })?;
            }
            let p = p.clone();
            let store = tokio::task::spawn_blocking(move || SqliteDedupeStore::open(p))
                .await
                .map_err(|e| Error::transport("dedupe: open task failed", e))??;
            Ok(Some(Arc::new(store)))
        }
        #[cfg(feature = "redis")]
        DedupeSpec::Redis(u) => Ok(Some(Arc::new(
            crate::transport::redis::RedisDedupeStore::connect(u).await?,
        ))),
        #[cfg(not(feature = "redis"))]
        DedupeSpec::Redis(_) => Err(Error::config(format!(
            "{context}: option `dedupe=redis://…` needs cargo feature `redis` of crate `ampybus`"
        ))),
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
