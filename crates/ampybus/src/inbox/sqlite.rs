//! The inbox and outbox on SQLite (cargo feature `inbox-sqlite`), in the application's own
//! file: tables `ampybus_inbox`, `ampybus_outbox`, `ampybus_schema_version`.
//!
//! The handler is a synchronous closure run on a blocking thread:
//!
//! ```text
//! Fn(&Message, &rusqlite::Transaction<'_>) -> Outcome + Send + Sync + 'static
//! ```
//!
//! It receives the open transaction (begun `IMMEDIATE`, so writers queue on SQLite's lock
//! instead of failing) with the message's inbox row already inserted; it writes its effects
//! and stages messages ([`SqliteOutbox::stage`]) through it and returns an [`Outcome`]; the
//! runtime commits on `Ok` and rolls back otherwise.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use ampybus::inbox::sqlite::{SqliteInbox, SqliteOutbox};
//! use ampybus::runtime::{Consumer, Outcome};
//! use ampybus::{Bus, Headers, Topic, TopicPattern};
//! use std::time::Duration;
//! let dir = tempfile::tempdir().unwrap();
//! let bus = Bus::connect(dir.path().join("log").to_str().unwrap()).await.unwrap();
//! let inbox = SqliteInbox::open(dir.path().join("oms.sqlite3")).unwrap();
//! inbox.connection().unwrap()
//!     .execute_batch("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY)").unwrap();
//! let handle = Consumer::builder(bus.clone(), TopicPattern::parse("ampy.dev.orders.>").unwrap(), "oms")
//!     .inbox(inbox.handler(|msg, tx| {
//!         let id = msg.headers.partition_key().unwrap_or_default();
//!         if tx.execute("INSERT INTO orders (id) VALUES (?1)", [id]).is_err() {
//!             return Outcome::Retry { after: None };
//!         }
//!         // A fill to publish once the transaction commits (the relay sends it).
//!         let fills = Topic::parse("ampy.dev.fills.v1.sim").unwrap();
//!         let h = Headers::for_publish("ampy.fills.v1.Fill", "oms@1", "oms", &format!("acct|{id}"));
//!         match SqliteOutbox.stage(tx, &fills, h, b"fill".to_vec()) {
//!             Ok(_) => Outcome::Ok,
//!             Err(_) => Outcome::Retry { after: None },
//!         }
//!     }))
//!     .start()
//!     .await
//!     .unwrap();
//! let orders = Topic::parse("ampy.dev.orders.v1.new").unwrap();
//! let h = Headers::for_publish("ampy.orders.v1.OrderRequest", "gw@1", "gw", "co_1");
//! let copy = h.clone(); // the same message_id twice: applied once
//! bus.publish(&orders, h, b"o".to_vec()).await.unwrap();
//! bus.publish(&orders, copy, b"o".to_vec()).await.unwrap();
//! while inbox.skipped("oms") + handle.stats().handled_ok < 2 {
//!     tokio::time::sleep(Duration::from_millis(10)).await;
//! }
//! handle.shutdown(Duration::from_secs(5)).await;
//! let c = inbox.connection().unwrap();
//! let n: i64 = c.query_row("SELECT count(*) FROM orders", [], |r| r.get(0)).unwrap();
//! assert_eq!(n, 1);
//! let staged: i64 = c.query_row("SELECT count(*) FROM ampybus_outbox", [], |r| r.get(0)).unwrap();
//! assert_eq!(staged, 1);
//! # });
//! ```

use super::relay::{OutboxRow, RelayStore};
use super::{
    Attempted, CRASH_BEFORE_ACK, CRASH_BEFORE_COMMIT, DEFAULT_RETENTION, InboxAttempt,
    InboxBinding, InboxRow, OutboxRelay, RelayOptions, Skips, crash_point, prepare_stage,
};
use crate::bus::Bus;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::obs::BusMetrics;
use crate::runtime::{Handler, Message, Outcome};
use crate::topic::Topic;
use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The version of the SQLite inbox and outbox tables this build writes and reads.
///
/// ```
/// assert_eq!(ampybus::inbox::sqlite::SCHEMA_VERSION, 1);
/// ```
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE ampybus_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL, domain TEXT NOT NULL,
    dedupe_key TEXT, topic TEXT NOT NULL, applied_at_ms INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)) WITHOUT ROWID;
CREATE UNIQUE INDEX ampybus_inbox_dedupe ON ampybus_inbox (consumer, domain, dedupe_key)
    WHERE dedupe_key IS NOT NULL;
CREATE INDEX ampybus_inbox_applied_at ON ampybus_inbox (applied_at_ms);
CREATE TABLE ampybus_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL, partition_key TEXT NOT NULL, seq INTEGER NOT NULL, headers BLOB NOT NULL,
    payload BLOB NOT NULL, staged_at_ms INTEGER NOT NULL, sent_at_ms INTEGER, dlq_reason TEXT,
    UNIQUE (partition_key, seq));
CREATE INDEX ampybus_outbox_unsent ON ampybus_outbox (id) WHERE sent_at_ms IS NULL;
CREATE INDEX ampybus_outbox_sent_at ON ampybus_outbox (sent_at_ms);
";

/// Inserts a message's inbox row ([`super::InboxRow`]): `?1` consumer, `?2` message_id, `?3`
/// domain, `?4` dedupe_key (NULL when none), `?5` topic, `?6` applied_at (Unix ms). No row
/// inserted means the message was applied before (either unique key). The one statement of
/// the Rust inbox and the Python SDK's (`sqlite3`), so both write the same rows.
///
/// ```
/// assert!(ampybus::inbox::sqlite::INBOX_INSERT_SQL.ends_with("ON CONFLICT DO NOTHING"));
/// ```
pub const INBOX_INSERT_SQL: &str = "INSERT INTO ampybus_inbox (consumer, message_id, domain, dedupe_key, topic, applied_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING";

/// Deletes inbox rows applied before `?1` (Unix ms): the retention.
///
/// ```
/// assert!(ampybus::inbox::sqlite::INBOX_PURGE_SQL.starts_with("DELETE FROM ampybus_inbox"));
/// ```
pub const INBOX_PURGE_SQL: &str = "DELETE FROM ampybus_inbox WHERE applied_at_ms < ?1";

/// Inserts a staged row with the key's next `seq` (in an `IMMEDIATE` transaction: SQLite's
/// write lock is the per-key lock): `?1` message_id, `?2` topic, `?3` partition key, `?4`
/// encoded headers (blob), `?5` payload (blob) — the values of [`super::prepare_stage`] —
/// and `?6` staged_at (Unix ms).
///
/// ```
/// assert!(ampybus::inbox::sqlite::OUTBOX_INSERT_SQL.starts_with("INSERT INTO ampybus_outbox"));
/// ```
pub const OUTBOX_INSERT_SQL: &str = "INSERT INTO ampybus_outbox (message_id, topic, partition_key, seq, headers, payload, staged_at_ms) VALUES (?1, ?2, ?3, (SELECT coalesce(max(seq), 0) + 1 FROM ampybus_outbox WHERE partition_key = ?3), ?4, ?5, ?6)";

fn db_err(path: &Path, what: &str, e: rusqlite::Error) -> Error {
    // A locked or busy database, a full disk, an I/O error: worth trying again.
    let kind = match e.sqlite_error_code() {
        Some(
            rusqlite::ErrorCode::DatabaseBusy
            | rusqlite::ErrorCode::DatabaseLocked
            | rusqlite::ErrorCode::DiskFull
            | rusqlite::ErrorCode::SystemIoFailure,
        ) => ErrorKind::Transport,
        Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly) => ErrorKind::Config,
        _ => ErrorKind::Transport,
    };
    Error::with_source(kind, format!("SQLite {}: {what}: {e}", path.display()), e)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Opens a connection the way the inbox uses it: WAL, `synchronous=FULL`, a 10 s busy
/// timeout.
fn open_conn(path: &Path) -> Result<Connection> {
    let c = Connection::open(path).map_err(|e| db_err(path, "cannot open", e))?;
    c.busy_timeout(Duration::from_secs(10))
        .map_err(|e| db_err(path, "busy_timeout", e))?;
    c.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| db_err(path, "journal_mode", e))?;
    c.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| db_err(path, "synchronous", e))?;
    Ok(c)
}

/// Creates or migrates the tables in one `IMMEDIATE` transaction; a newer version is a
/// Config error naming both versions. Returns `(found, now)`.
fn migrate(path: &Path, conn: &mut Connection) -> Result<(i64, i64)> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| db_err(path, "starting the migration", e))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS ampybus_schema_version (version INTEGER PRIMARY KEY,
            applied_at_ms INTEGER NOT NULL, applied_by TEXT NOT NULL)",
    )
    .map_err(|e| db_err(path, "creating ampybus_schema_version", e))?;
    let found: i64 = tx
        .query_row(
            "SELECT coalesce(max(version), 0) FROM ampybus_schema_version",
            [],
            |r| r.get(0),
        )
        .map_err(|e| db_err(path, "reading ampybus_schema_version", e))?;
    if found > SCHEMA_VERSION {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "SQLite {}: ampybus_schema_version: the inbox/outbox tables in this file are version {found}, newer than version {SCHEMA_VERSION} that this ampybus build knows; use a newer ampybus (nothing was changed)",
                path.display()
            ),
        ));
    }
    if found < 1 {
        tx.execute_batch(SCHEMA_V1)
            .map_err(|e| db_err(path, "creating the inbox and outbox tables", e))?;
        tx.execute(
            "INSERT INTO ampybus_schema_version (version, applied_at_ms, applied_by) VALUES (1, ?1, ?2)",
            params![now_ms(), format!("ampybus {}", env!("CARGO_PKG_VERSION"))],
        )
        .map_err(|e| db_err(path, "recording version 1", e))?;
    }
    tx.commit()
        .map_err(|e| db_err(path, "committing the migration", e))?;
    Ok((found, SCHEMA_VERSION))
}

/// A transactional inbox (and outbox) in the application's SQLite file.
///
/// ```
/// use ampybus::inbox::sqlite::SqliteInbox;
/// use std::time::Duration;
/// let dir = tempfile::tempdir().unwrap();
/// let inbox = SqliteInbox::open(dir.path().join("app.sqlite3")).unwrap()
///     .with_retention(Duration::from_secs(3600));
/// assert_eq!(inbox.retention(), Duration::from_secs(3600));
/// assert_eq!(inbox.schema_versions(), (0, 1)); // created now
/// ```
#[derive(Clone)]
pub struct SqliteInbox {
    inner: Arc<Inner>,
    retention: Duration,
}

struct Inner {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    last_purge_ms: Mutex<i64>,
    migrated: (i64, i64),
    skipped: Skips,
}

impl std::fmt::Debug for SqliteInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteInbox")
            .field("path", &self.inner.path)
            .field("retention", &self.retention)
            .finish()
    }
}

/// How often expired inbox rows are deleted (at most).
const PURGE_EVERY_MS: i64 = 60_000;

impl SqliteInbox {
    /// Opens the application's database file (creating it if needed) and creates or
    /// migrates the inbox and outbox tables. Errors: a file that cannot be opened or
    /// written (Config, naming the file), tables of a newer version (Config, naming both).
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteInbox> {
        let path = path.as_ref().to_path_buf();
        let mut conn = open_conn(&path)?;
        let migrated = migrate(&path, &mut conn)?;
        Ok(SqliteInbox {
            inner: Arc::new(Inner {
                path,
                idle: Mutex::new(vec![conn]),
                last_purge_ms: Mutex::new(0),
                migrated,
                skipped: Skips::default(),
            }),
            retention: DEFAULT_RETENTION,
        })
    }

    /// Sets how long inbox rows count (default [`DEFAULT_RETENTION`], 7 days).
    pub fn with_retention(mut self, d: Duration) -> SqliteInbox {
        self.retention = d;
        self
    }

    /// How long inbox rows count.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// `(version found, version now)` of the tables when this handle opened them.
    pub fn schema_versions(&self) -> (i64, i64) {
        self.inner.migrated
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A new connection to the file, set up as the inbox's (WAL, busy timeout), for the
    /// application's own reads and transactions.
    pub fn connection(&self) -> Result<Connection> {
        open_conn(&self.inner.path)
    }

    /// How many messages consumers named `consumer` of this handle found applied already.
    pub fn skipped(&self, consumer: &str) -> u64 {
        self.inner.skipped.total(consumer)
    }

    /// Binds `handler` to this inbox for [`crate::runtime::ConsumerBuilder::inbox`]. The
    /// handler runs on a blocking thread with the open transaction; see the module docs.
    pub fn handler<F>(&self, handler: F) -> SqliteInboxBinding
    where
        F: Fn(&Message, &Transaction<'_>) -> Outcome + Send + Sync + 'static,
    {
        SqliteInboxBinding {
            inbox: self.clone(),
            handler: Arc::new(handler),
        }
    }

    /// A relay for this file's outbox (`bus_outbox_*{table="ampybus_outbox@<file name>"}`);
    /// one per file is active at a time (a `flock` on `<file>.outbox-relay.lock`).
    pub fn relay(&self, bus: Bus, opts: RelayOptions) -> OutboxRelay {
        let name = self
            .inner
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        OutboxRelay::new(
            Arc::new(Arc::new(SqliteRelayStore {
                path: self.inner.path.clone(),
                table: format!("ampybus_outbox@{name}"),
                conn: Mutex::new(None),
                lock: Mutex::new(None),
            })),
            bus,
            opts,
        )
    }

    fn take(&self) -> Result<Connection> {
        if let Some(c) = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
        {
            return Ok(c);
        }
        open_conn(&self.inner.path)
    }

    fn give(&self, c: Connection) {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < 64 {
            idle.push(c);
        }
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
        let cutoff =
            now.saturating_sub(i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX));
        match conn.execute(INBOX_PURGE_SQL, params![cutoff]) {
            Ok(n) if n > 0 => {
                tracing::info!(file = %self.inner.path.display(), rows = n, "inbox: expired rows purged")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(file = %self.inner.path.display(), error = %e, "inbox: purge failed")
            }
        }
    }
}

type SyncHandler = dyn Fn(&Message, &Transaction<'_>) -> Outcome + Send + Sync;

/// A [`SqliteInbox`] with its handler ([`SqliteInbox::handler`]).
pub struct SqliteInboxBinding {
    inbox: SqliteInbox,
    handler: Arc<SyncHandler>,
}

impl std::fmt::Debug for SqliteInboxBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteInboxBinding")
            .field("inbox", &self.inbox)
            .finish()
    }
}

impl InboxBinding for SqliteInboxBinding {
    fn bind(self: Box<Self>, consumer: &str, metrics: &BusMetrics) -> Arc<dyn Handler> {
        let skips = self.inbox.inner.clone();
        let store = SqliteAttempt {
            inbox: self.inbox,
            handler: self.handler,
        };
        skips.skipped.bind(store, consumer, metrics)
    }
}

struct SqliteAttempt {
    inbox: SqliteInbox,
    handler: Arc<SyncHandler>,
}

#[async_trait]
impl InboxAttempt for SqliteAttempt {
    async fn attempt(&self, consumer: &str, row: &InboxRow, msg: &Message) -> Result<Attempted> {
        let inbox = self.inbox.clone();
        let handler = self.handler.clone();
        let consumer = consumer.to_owned();
        let row = row.clone();
        let msg = msg.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut conn = inbox.take()?;
            let path = inbox.inner.path.clone();
            let r = (|| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(|e| db_err(&path, "begin", e))?;
                let n = tx
                    .prepare_cached(INBOX_INSERT_SQL)
                    .and_then(|mut s| {
                        s.execute(params![
                            consumer,
                            row.message_id,
                            row.domain,
                            row.dedupe_key,
                            row.topic,
                            now_ms()
                        ])
                    })
                    .map_err(|e| db_err(&path, "inserting the inbox row", e))?;
                if n == 0 {
                    drop(tx);
                    return Ok(Attempted::Skipped);
                }
                // A panic unwinds through here: the transaction rolls back as it drops.
                let outcome = handler(&msg, &tx);
                if outcome != Outcome::Ok {
                    drop(tx);
                    return Ok(Attempted::Handled(outcome));
                }
                crash_point(CRASH_BEFORE_COMMIT);
                tx.commit().map_err(|e| db_err(&path, "commit", e))?;
                crash_point(CRASH_BEFORE_ACK);
                Ok(Attempted::Handled(Outcome::Ok))
            })();
            if r.is_ok() {
                inbox.maybe_purge(&conn);
            }
            inbox.give(conn);
            r
        })
        .await;
        match joined {
            Ok(r) => r,
            // The handler panicked: the runtime dead-letters it as `handler_panic`.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::with_source(
                ErrorKind::Closed,
                "inbox: the blocking task was cancelled",
                e,
            )),
        }
    }
}

/// Stages messages into the SQLite outbox, inside the application's transaction.
///
/// ```
/// use ampybus::inbox::sqlite::{SqliteInbox, SqliteOutbox};
/// use ampybus::{Headers, Topic};
/// let dir = tempfile::tempdir().unwrap();
/// let inbox = SqliteInbox::open(dir.path().join("app.sqlite3")).unwrap();
/// let mut conn = inbox.connection().unwrap();
/// let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
/// let topic = Topic::parse("ampy.dev.orders.v1.new").unwrap();
/// let h = || Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
/// let a = SqliteOutbox.stage(&tx, &topic, h(), b"a".to_vec()).unwrap();
/// let b = SqliteOutbox.stage(&tx, &topic, h(), b"b".to_vec()).unwrap();
/// tx.commit().unwrap();
/// assert_ne!(a, b);
/// let seqs: Vec<i64> = conn.prepare("SELECT seq FROM ampybus_outbox ORDER BY id").unwrap()
///     .query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect();
/// assert_eq!(seqs, vec![1, 2]);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SqliteOutbox;

impl SqliteOutbox {
    /// Stages one message in `tx` (begin it `IMMEDIATE`, as the inbox does, so the key's
    /// `seq` is taken under SQLite's write lock): fills every publish default, checks the
    /// headers as a publish would, and returns the final `message_id`. It is published after
    /// the transaction commits, by the file's [`OutboxRelay`].
    pub fn stage(
        &self,
        tx: &Transaction<'_>,
        topic: &Topic,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<String> {
        let s = prepare_stage(topic, headers, payload.into())?;
        let path = PathBuf::from(tx.path().unwrap_or_default());
        tx.prepare_cached(OUTBOX_INSERT_SQL)
            .and_then(|mut st| {
                st.execute(params![
                    s.message_id,
                    s.topic,
                    s.key,
                    s.headers,
                    s.payload.as_ref(),
                    now_ms()
                ])
            })
            .map_err(|e| db_err(&path, "staging into ampybus_outbox", e))?;
        Ok(s.message_id)
    }
}

/// The relay's side of a SQLite outbox.
struct SqliteRelayStore {
    path: PathBuf,
    table: String,
    conn: Mutex<Option<Connection>>,
    lock: Mutex<Option<std::fs::File>>,
}

impl SqliteRelayStore {
    async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Path, &mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = this.conn.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_none() {
                *g = Some(open_conn(&this.path)?);
            }
            let conn = g.as_mut().expect("opened above");
            f(&this.path, conn)
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Closed, "outbox relay: task failed", e))?
    }
}

#[async_trait]
impl RelayStore for Arc<SqliteRelayStore> {
    fn table(&self) -> &str {
        &self.table
    }

    async fn try_lock(&self) -> Result<bool> {
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_some() {
            return Ok(true);
        }
        let lock_path = PathBuf::from(format!("{}.outbox-relay.lock", self.path.display()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Config,
                    format!("outbox relay: cannot open {}", lock_path.display()),
                    e,
                )
            })?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock(2) on a descriptor this function owns.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            *g = Some(f);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn unsent(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        self.with(move |path, c| {
            let mut st = c
                .prepare_cached(
                    "SELECT id, topic, headers, payload FROM ampybus_outbox WHERE sent_at_ms IS NULL ORDER BY id LIMIT ?1",
                )
                .map_err(|e| db_err(path, "reading unsent rows", e))?;
            let rows = st
                .query_map(params![limit as i64], |r| {
                    Ok(OutboxRow {
                        id: r.get(0)?,
                        topic: r.get(1)?,
                        headers: r.get(2)?,
                        payload: r.get(3)?,
                    })
                })
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| db_err(path, "reading unsent rows", e))?;
            Ok(rows)
        })
        .await
    }

    async fn mark_sent(&self, ids: &[i64]) -> Result<()> {
        let ids = ids.to_vec();
        self.with(move |path, c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| db_err(path, "begin", e))?;
            {
                let mut st = tx
                    .prepare_cached("UPDATE ampybus_outbox SET sent_at_ms = ?1 WHERE id = ?2")
                    .map_err(|e| db_err(path, "marking rows sent", e))?;
                let now = now_ms();
                for id in ids {
                    st.execute(params![now, id])
                        .map_err(|e| db_err(path, "marking rows sent", e))?;
                }
            }
            tx.commit()
                .map_err(|e| db_err(path, "marking rows sent", e))
        })
        .await
    }

    async fn mark_dead_lettered(&self, id: i64, reason: &str) -> Result<()> {
        let reason = reason.to_owned();
        self.with(move |path, c| {
            c.execute(
                "UPDATE ampybus_outbox SET sent_at_ms = ?1, dlq_reason = ?2 WHERE id = ?3",
                params![now_ms(), reason, id],
            )
            .map(|_| ())
            .map_err(|e| db_err(path, "marking a row dead-lettered", e))
        })
        .await
    }

    async fn purge_sent(&self, older_than: Duration) -> Result<u64> {
        let cutoff =
            now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
        self.with(move |path, c| {
            c.execute(
                "DELETE FROM ampybus_outbox WHERE sent_at_ms < ?1",
                params![cutoff],
            )
            .map(|n| n as u64)
            .map_err(|e| db_err(path, "purging sent rows", e))
        })
        .await
    }

    async fn depth(&self) -> Result<(i64, f64)> {
        self.with(move |path, c| {
            c.query_row(
                "SELECT count(*), min(staged_at_ms) FROM ampybus_outbox WHERE sent_at_ms IS NULL",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
            )
            .map(|(n, oldest)| {
                let age = oldest.map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
                (n, age)
            })
            .map_err(|e| db_err(path, "counting unsent rows", e))
        })
        .await
    }
}
