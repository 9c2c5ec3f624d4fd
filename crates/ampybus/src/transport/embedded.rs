//! The embedded durable log: SQLite (bundled, WAL) in a data directory. Nothing to install.
//!
//! * **Durability.** `publish_batch` returns after the batch is committed. With
//!   `sync=full` (the default) the commit fsyncs the WAL first, so a returned publish survives
//!   a power loss; `sync=normal` survives a crash or `kill -9` of any process but may lose the
//!   last commits on power loss. Consumer positions and leases are written with
//!   `synchronous=NORMAL` in both modes: losing one only causes a redelivery.
//! * **Group commit.** One writer thread per handle takes every pending append (and ack) off
//!   its queue and commits them in one transaction, so many concurrent publishers share an
//!   fsync.
//! * **Several processes** may open the same directory: SQLite's locks serialise writers, and
//!   waiting consumers notice commits from other processes by polling `PRAGMA data_version`
//!   every `poll_ms` (default 2 ms); within one process they are woken at once.
//! * **Durable consumers** keep a cursor (every sequence at or below it is settled) and a
//!   lease row per delivered, unsettled message. A lease not acked within the ack deadline is
//!   delivered again. A message is never leased while an earlier message of the same
//!   partition key is leased to another instance, so per-key order holds across processes.
//! * **Retention** by age and size per domain, checked after the first publish on a handle
//!   and then every minute (a handle that only reads never deletes); every pass that deletes
//!   logs its counts at `info`.

#[allow(dead_code)]
pub(crate) mod format;
#[allow(dead_code)]
pub(crate) mod group;
#[allow(dead_code)]
pub(crate) mod log;
pub(crate) mod migrate;
#[allow(dead_code)]
pub(crate) mod shared;
pub use migrate::{MigrateReport, migrate};

use super::{
    Delivery, DeliveryInfo, PublishReceipt, ReplayByTime, Settler, StartAt, StoredMessage,
    SubscribeSpec, Subscription, Transport, WindowQuery, decode_headers, encode_headers,
};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::topic::{Domain, TopicPattern};
use crate::transport::url_parts::{MAX_RETENTION_DAYS, percent_decode, retention_value};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "ampybus.sqlite3";

/// How hard a publish commit syncs to disk.
///
/// ```
/// assert_eq!("normal".parse::<ampybus::transport::embedded::SyncLevel>().unwrap(),
///            ampybus::transport::embedded::SyncLevel::Normal);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncLevel {
    /// fsync the WAL on every publish commit: survives power loss (default).
    #[default]
    Full,
    /// No fsync on commit: survives process crashes, not power loss.
    Normal,
}

impl std::str::FromStr for SyncLevel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(SyncLevel::Full),
            "normal" => Ok(SyncLevel::Normal),
            _ => Err(Error::config(format!(
                "url option `sync`: must be `full` or `normal` (got {s:?})"
            ))),
        }
    }
}

/// Retention of one domain. `None` means unlimited.
///
/// ```
/// let r = ampybus::transport::embedded::DomainRetention::days(7);
/// assert_eq!(r.max_age, Some(std::time::Duration::from_secs(7 * 86_400)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainRetention {
    /// Delete messages stored longer ago than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest messages of the domain while it holds more bytes than this.
    pub max_bytes: Option<u64>,
}

impl DomainRetention {
    /// `max_age` of `n` days, no size cap.
    pub fn days(n: u64) -> Self {
        DomainRetention {
            max_age: Some(Duration::from_secs(n.saturating_mul(86_400))),
            max_bytes: None,
        }
    }

    /// Neither an age limit nor a size cap: messages are kept forever.
    ///
    /// ```
    /// use ampybus::transport::embedded::DomainRetention;
    /// assert!(DomainRetention::UNLIMITED.is_unlimited());
    /// assert!(!DomainRetention::days(7).is_unlimited());
    /// ```
    pub const UNLIMITED: DomainRetention = DomainRetention {
        max_age: None,
        max_bytes: None,
    };

    /// True when nothing is ever deleted.
    pub fn is_unlimited(&self) -> bool {
        self.max_age.is_none() && self.max_bytes.is_none()
    }
}

/// `7 days, no size cap`, `no age limit, 512 MiB`, `unlimited` (as `topics describe` and the
/// retention log lines show it).
///
/// ```
/// use ampybus::transport::embedded::DomainRetention;
/// assert_eq!(DomainRetention::days(7).to_string(), "7 days, no size cap");
/// let r = DomainRetention { max_age: None, max_bytes: Some(512 * 1024 * 1024) };
/// assert_eq!(r.to_string(), "no age limit, 512 MiB");
/// assert_eq!(DomainRetention::UNLIMITED.to_string(), "unlimited");
/// ```
impl std::fmt::Display for DomainRetention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_unlimited() {
            return f.write_str("unlimited");
        }
        match self.max_age {
            Some(a) if a.as_secs() % 86_400 == 0 => write!(f, "{} days", a.as_secs() / 86_400)?,
            Some(a) => write!(f, "{:?}", a)?,
            None => f.write_str("no age limit")?,
        }
        match self.max_bytes {
            Some(b) if b % (1024 * 1024) == 0 => write!(f, ", {} MiB", b / (1024 * 1024)),
            Some(b) => write!(f, ", {b} bytes"),
            None => f.write_str(", no size cap"),
        }
    }
}

/// Options of the embedded log. Built from a URL by [`EmbeddedOptions::from_url`] or by hand.
///
/// Defaults: `sync=full`, `poll_ms=2`, retention 7 days for every domain except `orders`,
/// `fills`, `positions` and `dlq` (30 days), no size cap.
///
/// ```
/// let o = ampybus::transport::embedded::EmbeddedOptions::new("/tmp/data");
/// assert_eq!(o.retention_for(ampybus::Domain::Orders).max_age, Some(std::time::Duration::from_secs(30 * 86_400)));
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// The data directory (created if missing).
    pub dir: PathBuf,
    /// Publish durability.
    pub sync: SyncLevel,
    /// How often a waiting consumer checks for commits by other processes.
    pub poll_interval: Duration,
    /// Per-domain retention; domains not listed use `default_retention`.
    pub retention: HashMap<Domain, DomainRetention>,
    /// Retention of domains not in `retention`.
    pub default_retention: DomainRetention,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// How long a writer waits for another process's lock before failing.
    pub busy_timeout: Duration,
}

impl EmbeddedOptions {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let mut retention = HashMap::new();
        for d in [
            Domain::Orders,
            Domain::Fills,
            Domain::Positions,
            Domain::Dlq,
        ] {
            retention.insert(d, DomainRetention::days(30));
        }
        EmbeddedOptions {
            dir: dir.into(),
            sync: SyncLevel::Full,
            poll_interval: Duration::from_millis(2),
            retention,
            default_retention: DomainRetention::days(7),
            retention_interval: Duration::from_secs(60),
            busy_timeout: Duration::from_secs(30),
        }
    }

    /// The retention that applies to `domain`.
    pub fn retention_for(&self, domain: Domain) -> DomainRetention {
        self.retention
            .get(&domain)
            .copied()
            .unwrap_or(self.default_retention)
    }

    /// Parses `file:///abs/dir?opt=…`, `file:rel/dir` or a plain path. Options:
    /// `sync=full|normal`, `poll_ms=N`, `retention_days=N` (every domain),
    /// `retention.<domain>.days=N`, `retention.<domain>.max_mb=N`. A retention value is a
    /// whole number ≥ 1 or `unlimited` (keep forever); 0 is refused.
    ///
    /// Refused: `file:///` (the root as data directory) and `file://host/…` (a host).
    ///
    /// ```
    /// use ampybus::transport::embedded::{EmbeddedOptions, SyncLevel};
    /// let o = EmbeddedOptions::from_url("file:///var/lib/ampy?sync=normal&retention.ticks.max_mb=512").unwrap();
    /// assert_eq!(o.dir, std::path::PathBuf::from("/var/lib/ampy"));
    /// assert_eq!(o.sync, SyncLevel::Normal);
    /// assert_eq!(o.retention_for(ampybus::Domain::Ticks).max_bytes, Some(512 * 1024 * 1024));
    /// let o = EmbeddedOptions::from_url("file:///x?retention.bars.days=unlimited").unwrap();
    /// assert_eq!(o.retention_for(ampybus::Domain::Bars).max_age, None);
    /// assert!(EmbeddedOptions::from_url("file:///x?bogus=1").is_err());
    /// assert!(EmbeddedOptions::from_url("file:///x?retention_days=0").unwrap_err().to_string().contains("unlimited"));
    /// assert!(EmbeddedOptions::from_url("file:///").is_err());
    /// assert!(EmbeddedOptions::from_url("file://host/x").is_err());
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let (path, query) = match url.strip_prefix("file://") {
            Some(rest) => {
                let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
                if !path.is_empty() && !path.starts_with('/') {
                    let host = path.split('/').next().unwrap_or(path);
                    return Err(Error::config(format!(
                        "url {url:?}: `file://{host}/…` names a host ({host:?}), which the embedded log does not support; {FILE_URL_FORMS}"
                    )));
                }
                (path, query)
            }
            None => match url.strip_prefix("file:") {
                Some(rest) => rest.split_once('?').unwrap_or((rest, "")),
                None => (url, ""),
            },
        };
        if path.is_empty() {
            return Err(Error::config(format!(
                "url {url:?}: the data directory path is empty; {FILE_URL_FORMS}"
            )));
        }
        let path = percent_decode(path);
        let p = Path::new(&path);
        if p.has_root() && p.parent().is_none() {
            return Err(Error::config(format!(
                "url {url:?}: the data directory would be the filesystem root `/`; {FILE_URL_FORMS}"
            )));
        }
        let mut o = EmbeddedOptions::new(path);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let num = |what: &str| -> Result<u64> {
                v.parse::<u64>().map_err(|_| {
                    Error::config(format!(
                        "url option `{k}`: {what} must be a non-negative integer (got {v:?})"
                    ))
                })
            };
            let retention = |unit: &str, scale: u64, max: u64| -> Result<Option<u64>> {
                retention_value(k, unit, v, scale, max)
                    .map_err(|rule| Error::config(format!("url option `{k}`: {rule}")))
            };
            match k {
                "sync" => o.sync = v.parse()?,
                "poll_ms" => {
                    let ms = num("poll_ms")?;
                    if ms == 0 || ms > 10_000 {
                        return Err(Error::config(format!(
                            "url option `poll_ms`: must be 1..=10000 (got {ms})"
                        )));
                    }
                    o.poll_interval = Duration::from_millis(ms);
                }
                "retention_days" => {
                    let age =
                        retention("days", 86_400, MAX_RETENTION_DAYS)?.map(Duration::from_secs);
                    o.default_retention.max_age = age;
                    for r in o.retention.values_mut() {
                        r.max_age = age;
                    }
                }
                _ if k.starts_with("retention.") => {
                    let mut it = k.split('.');
                    let (_, dom, field, extra) = (
                        it.next(),
                        it.next().unwrap_or(""),
                        it.next().unwrap_or(""),
                        it.next(),
                    );
                    let domain: Domain = dom.parse().map_err(|e: Error| {
                        Error::config(format!("url option `{k}`: {}", e.message()))
                    })?;
                    let mut r = o.retention_for(domain);
                    match (field, extra) {
                        ("days", None) => {
                            r.max_age = retention("days", 86_400, MAX_RETENTION_DAYS)?
                                .map(Duration::from_secs)
                        }
                        ("max_mb", None) => r.max_bytes = retention("MiB", 1024 * 1024, u64::MAX)?,
                        _ => {
                            return Err(Error::config(format!(
                                "url option `{k}`: expected retention.<domain>.days or .max_mb"
                            )));
                        }
                    }
                    o.retention.insert(domain, r);
                }
                _ => {
                    return Err(Error::config(format!(
                        "url option `{k}` is unknown for the embedded log (known: sync, poll_ms, retention_days, retention.<domain>.days, retention.<domain>.max_mb)"
                    )));
                }
            }
        }
        Ok(o)
    }
}

/// The accepted forms of an embedded-log URL, as errors list them.
const FILE_URL_FORMS: &str =
    "accepted forms: /abs/dir, ./rel/dir, file:///abs/dir?options, file:rel/dir?options";

fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

fn us_to_time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// An error of the database file `db` while doing `what`, keeping SQLite's own words (e.g.
/// "database disk image is malformed", "attempt to write a readonly database", "database or
/// disk is full") in the message as well as in the source.
pub(crate) fn storage(db: &Path, what: &str, e: rusqlite::Error) -> Error {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && (f.code == rusqlite::ErrorCode::DatabaseBusy
            || f.code == rusqlite::ErrorCode::DatabaseLocked)
    {
        return Error::with_source(
            ErrorKind::Timeout,
            format!(
                "embedded log {}: {what}: the database stayed locked by another process ({e})",
                db.display()
            ),
            e,
        );
    }
    Error::transport(format!("embedded log {}: {what}: {e}", db.display()), e)
}

/// A stored row whose headers cannot be decoded: named by data file and sequence, never
/// delivered with empty headers.
pub(crate) fn damaged_row(db: &Path, seq: i64, topic: &str, e: &Error) -> Error {
    Error::new(
        ErrorKind::Transport,
        format!(
            "embedded log {}: message seq {seq} on {topic:?} is damaged: {}; it cannot be delivered (restore the data file from a backup or remove the row)",
            db.display(),
            e.message()
        ),
    )
}

/// The log's tables and indexes (also used by `ampybus bench --raw-sqlite` for its baseline).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    domain TEXT NOT NULL,
    pkey TEXT NOT NULL,
    message_id TEXT NOT NULL,
    log_us INTEGER NOT NULL,
    size INTEGER NOT NULL,
    headers BLOB NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages(log_us);
CREATE INDEX IF NOT EXISTS messages_by_key ON messages(pkey, seq);
CREATE TABLE IF NOT EXISTS consumers(
    name TEXT PRIMARY KEY,
    pattern TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    created_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending(
    consumer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    pkey TEXT NOT NULL,
    owner TEXT,
    not_before_us INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(consumer, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied(
    consumer TEXT NOT NULL,
    key TEXT NOT NULL,
    applied_at_ms INTEGER NOT NULL,
    PRIMARY KEY(consumer, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS applied_by_time ON applied(applied_at_ms);
";

/// How long a connection waits for another process's lock, in ms (shared by every
/// connection of the process; set from [`EmbeddedOptions::busy_timeout`]).
static BUSY_LIMIT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(30_000);

thread_local! {
    static BUSY_SINCE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// SQLite's default busy handler sleeps up to 100 ms between attempts, so under steady
/// contention (a producer committing in a tight loop) a waiting consumer can miss the lock for
/// tens of seconds — long enough for its leases to expire. This one retries after 50 µs, then
/// every 0.2–1 ms with jitter, until the limit.
fn busy_wait(count: i32) -> bool {
    let now = Instant::now();
    let since = BUSY_SINCE.with(|c| {
        if count == 0 || c.get().is_none() {
            c.set(Some(now));
        }
        c.get().unwrap_or(now)
    });
    let limit = Duration::from_millis(BUSY_LIMIT_MS.load(std::sync::atomic::Ordering::Relaxed));
    if now.duration_since(since) >= limit {
        BUSY_SINCE.with(|c| c.set(None));
        return false;
    }
    let us = if count < 8 {
        50
    } else {
        rand::random_range(200..1000)
    };
    std::thread::sleep(Duration::from_micros(us));
    true
}

fn open_conn(path: &Path, busy: Duration) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| storage(path, "open", e))?;
    BUSY_LIMIT_MS.store(
        busy.as_millis() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    conn.busy_handler(Some(busy_wait))
        .map_err(|e| storage(path, "busy handler", e))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| storage(path, "journal_mode=WAL", e))?;
    conn.pragma_update(None, "foreign_keys", "OFF")
        .map_err(|e| storage(path, "pragma", e))?;
    Ok(conn)
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// A message ready for insertion: columns extracted and headers encoded by the publisher.
struct NewRow {
    topic: String,
    domain: String,
    pkey: String,
    message_id: String,
    size: i64,
    headers: Vec<u8>,
    payload: Bytes,
}

impl From<Envelope> for NewRow {
    fn from(env: Envelope) -> Self {
        let headers = encode_headers(&env.headers);
        let size = (headers.len() + env.payload.len() + env.topic.len()) as i64;
        NewRow {
            domain: env.topic.split('.').nth(2).unwrap_or("").to_owned(),
            pkey: env.headers.partition_key().unwrap_or("").to_owned(),
            message_id: env.headers.message_id().unwrap_or("").to_owned(),
            size,
            headers,
            payload: env.payload,
            topic: env.topic,
        }
    }
}

enum Cmd {
    Append {
        batch: Vec<NewRow>,
        reply: Reply<Vec<PublishReceipt>>,
    },
    Ack {
        consumer: String,
        seqs: Vec<u64>,
        /// Dedupe records written in the same transaction: (consumer, keys).
        applied: Option<(String, Vec<String>)>,
        reply: Reply<()>,
    },
    Run(Box<dyn FnOnce(&mut Writer) + Send>),
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    /// The database file, named in every error.
    db: PathBuf,
    opts: EmbeddedOptions,
    sync_full: bool,
    last_retention: Instant,
    /// Retention runs only once this handle has published (a process that only reads never
    /// deletes).
    published: bool,
}

impl Writer {
    fn set_sync(&mut self, full: bool) -> Result<()> {
        if self.sync_full != full {
            self.conn
                .pragma_update(None, "synchronous", if full { "FULL" } else { "NORMAL" })
                .map_err(|e| storage(&self.db, "pragma synchronous", e))?;
            self.sync_full = full;
        }
        Ok(())
    }

    fn append(&mut self, batches: &[&[NewRow]]) -> Result<Vec<Vec<PublishReceipt>>> {
        self.set_sync(self.opts.sync == SyncLevel::Full)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| storage(&self.db, "begin append", e))?;
        let last: i64 = tx
            .query_row(
                "SELECT log_us FROM messages ORDER BY seq DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| storage(&self.db, "read last time", e))?
            .unwrap_or(0);
        let log_us = now_us().max(last);
        let mut out = Vec::with_capacity(batches.len());
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO messages(topic, domain, pkey, message_id, log_us, size, headers, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(|e| storage(&self.db, "prepare insert", e))?;
            for batch in batches {
                let mut receipts = Vec::with_capacity(batch.len());
                for row in batch.iter() {
                    ins.execute(params![
                        row.topic,
                        row.domain,
                        row.pkey,
                        row.message_id,
                        log_us,
                        row.size,
                        row.headers,
                        &row.payload[..]
                    ])
                    .map_err(|e| storage(&self.db, "insert", e))?;
                    receipts.push(PublishReceipt {
                        sequence: tx.last_insert_rowid() as u64,
                        duplicate: false,
                    });
                }
                out.push(receipts);
            }
        }
        tx.commit()
            .map_err(|e| storage(&self.db, "commit append", e))?;
        Ok(out)
    }

    fn ack(&mut self, acks: &[(&str, &[u64])], applied: &[(&str, &[String])]) -> Result<()> {
        self.set_sync(false)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| storage(&self.db, "begin ack", e))?;
        if !applied.is_empty() {
            let now = chrono::Utc::now().timestamp_millis();
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO applied(consumer, key, applied_at_ms) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| storage(&self.db, "prepare dedupe record", e))?;
            for (consumer, keys) in applied {
                for k in keys.iter() {
                    ins.execute(params![consumer, k, now])
                        .map_err(|e| storage(&self.db, "dedupe record", e))?;
                }
            }
        }
        {
            let mut up = tx
                .prepare_cached("UPDATE pending SET acked = 1 WHERE consumer = ?1 AND seq = ?2")
                .map_err(|e| storage(&self.db, "prepare ack", e))?;
            for (consumer, seqs) in acks {
                for s in seqs.iter() {
                    up.execute(params![consumer, *s as i64])
                        .map_err(|e| storage(&self.db, "ack", e))?;
                }
            }
        }
        tx.commit().map_err(|e| storage(&self.db, "commit ack", e))
    }

    fn retention(&mut self) -> Result<u64> {
        self.last_retention = Instant::now();
        self.set_sync(false)?;
        let mut deleted = 0u64;
        // (domain, deleted by age, deleted by size)
        let mut counts: Vec<(String, u64, u64)> = Vec::new();
        let now = now_us();
        let domains: Vec<String> = {
            let mut st = self
                .conn
                .prepare("SELECT DISTINCT domain FROM messages")
                .map_err(|e| storage(&self.db, "retention", e))?;
            st.query_map([], |r| r.get::<_, String>(0))
                .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| storage(&self.db, "retention", e))?
        };
        for dom in domains {
            let r = match dom.parse::<Domain>() {
                Ok(d) => self.opts.retention_for(d),
                Err(_) => self.opts.default_retention,
            };
            let (mut by_age, mut by_size) = (0u64, 0u64);
            if let Some(age) = r.max_age {
                let cutoff = now.saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX));
                loop {
                    let n = self
                        .conn
                        .execute(
                            "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE log_us < ?1 AND domain = ?2 LIMIT 10000)",
                            params![cutoff, dom],
                        )
                        .map_err(|e| storage(&self.db, "retention delete", e))?;
                    by_age += n as u64;
                    if n < 10000 {
                        break;
                    }
                }
            }
            if let Some(max) = r.max_bytes {
                let total: i64 = self
                    .conn
                    .query_row(
                        "SELECT COALESCE(SUM(size), 0) FROM messages WHERE domain = ?1",
                        [&dom],
                        |r| r.get(0),
                    )
                    .map_err(|e| storage(&self.db, "retention size", e))?;
                let mut excess = total.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX));
                while excess > 0 {
                    let rows: Vec<(i64, i64)> = {
                        let mut st = self
                            .conn
                            .prepare_cached("SELECT seq, size FROM messages WHERE domain = ?1 ORDER BY seq LIMIT 5000")
                            .map_err(|e| storage(&self.db, "retention size", e))?;
                        st.query_map([&dom], |r| Ok((r.get(0)?, r.get(1)?)))
                            .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
                            .map_err(|e| storage(&self.db, "retention size", e))?
                    };
                    if rows.is_empty() {
                        break;
                    }
                    let mut upto = 0;
                    for (seq, size) in rows {
                        upto = seq;
                        excess -= size;
                        if excess <= 0 {
                            break;
                        }
                    }
                    by_size += self
                        .conn
                        .execute(
                            "DELETE FROM messages WHERE domain = ?1 AND seq <= ?2",
                            params![dom, upto],
                        )
                        .map_err(|e| storage(&self.db, "retention delete", e))?
                        as u64;
                }
            }
            if by_age + by_size > 0 {
                deleted += by_age + by_size;
                counts.push((dom, by_age, by_size));
            }
        }
        if deleted > 0 {
            self.conn
                .execute("DELETE FROM pending WHERE seq < (SELECT COALESCE(MIN(seq), 9223372036854775807) FROM messages)", [])
                .map_err(|e| storage(&self.db, "retention pending", e))?;
            for (domain, by_age, by_size) in &counts {
                let r = match domain.parse::<Domain>() {
                    Ok(d) => self.opts.retention_for(d),
                    Err(_) => self.opts.default_retention,
                };
                tracing::info!(
                    db = %self.db.display(),
                    domain = %domain,
                    by_age,
                    by_size,
                    retention = %r,
                    "embedded log retention deleted {} message(s) of domain {domain}",
                    by_age + by_size
                );
            }
            tracing::info!(
                db = %self.db.display(),
                deleted,
                "embedded log retention deleted {deleted} message(s) in all"
            );
        }
        Ok(deleted)
    }
}

fn writer_loop(mut w: Writer, rx: mpsc::Receiver<Cmd>, notify: Arc<Notify>) {
    loop {
        // Before this handle's first publish there is no retention to schedule.
        let first = if w.published {
            let due = w
                .opts
                .retention_interval
                .saturating_sub(w.last_retention.elapsed());
            match rx.recv_timeout(due) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = w.retention() {
                        tracing::warn!(error = %e, "embedded log retention failed");
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(c) => c,
                Err(_) => break,
            }
        };
        let mut cmds = vec![first];
        while cmds.len() < 4096 {
            match rx.try_recv() {
                Ok(c) => cmds.push(c),
                Err(_) => break,
            }
        }
        let mut appends = Vec::new();
        let mut acks = Vec::new();
        let mut runs = Vec::new();
        for c in cmds {
            match c {
                Cmd::Append { batch, reply } => appends.push((batch, reply)),
                Cmd::Ack {
                    consumer,
                    seqs,
                    applied,
                    reply,
                } => acks.push((consumer, seqs, applied, reply)),
                Cmd::Run(f) => runs.push(f),
            }
        }
        if !appends.is_empty() {
            let refs: Vec<&[NewRow]> = appends.iter().map(|(b, _)| b.as_slice()).collect();
            match w.append(&refs) {
                Ok(receipts) => {
                    for ((_, reply), r) in appends.into_iter().zip(receipts) {
                        let _ = reply.send(Ok(r));
                    }
                    if !w.published {
                        // The first publish on this handle: retention starts now (the
                        // publishers have their receipts already).
                        w.published = true;
                        if let Err(e) = w.retention() {
                            tracing::warn!(error = %e, "embedded log retention failed");
                        }
                    }
                }
                Err(e) => {
                    for (_, reply) in appends {
                        let _ = reply.send(Err(Error::new(e.kind(), e.message().to_owned())));
                    }
                }
            }
        }
        if !acks.is_empty() {
            let refs: Vec<(&str, &[u64])> = acks
                .iter()
                .map(|(c, s, _, _)| (c.as_str(), s.as_slice()))
                .collect();
            let applied: Vec<(&str, &[String])> = acks
                .iter()
                .filter_map(|(_, _, a, _)| a.as_ref().map(|(c, k)| (c.as_str(), k.as_slice())))
                .collect();
            let res = w.ack(&refs, &applied);
            for (_, _, _, reply) in acks {
                let _ = reply.send(match &res {
                    Ok(()) => Ok(()),
                    Err(e) => Err(Error::new(e.kind(), e.message().to_owned())),
                });
            }
        }
        for f in runs {
            f(&mut w);
        }
        notify.notify_waiters();
        if w.published
            && w.last_retention.elapsed() >= w.opts.retention_interval
            && let Err(e) = w.retention()
        {
            tracing::warn!(error = %e, "embedded log retention failed");
        }
    }
}

pub(crate) struct Inner {
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    notify: Arc<Notify>,
    opts: EmbeddedOptions,
    db_path: PathBuf,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Inner {
    fn send(&self, cmd: Cmd) -> Result<()> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(tx) => tx.send(cmd).map_err(|_| self.closed("is closed")),
            None => Err(self.closed("is closed")),
        }
    }

    /// A `Closed` error naming the data file.
    fn closed(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Closed,
            format!("embedded log {} {what}", self.db_path.display()),
        )
    }

    /// A failed blocking task (panicked or cancelled), naming the data file and the cause.
    pub(crate) fn task_failed(&self, what: &str, e: tokio::task::JoinError) -> Error {
        let message = format!(
            "embedded log {}: {what} failed: {e}",
            self.db_path.display()
        );
        Error::transport(message, e)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Writer) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Run(Box::new(move |w| {
            let _ = reply.send(f(w));
        })))?;
        rx.await.map_err(|_| self.closed("writer stopped"))?
    }

    pub(crate) fn reader(&self) -> Result<Connection> {
        let c = open_conn(&self.db_path, self.opts.busy_timeout)?;
        Ok(c)
    }
}

/// The embedded log transport. Cheap to clone; every clone shares one writer thread.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::transport::{Transport, embedded::{EmbeddedLog, EmbeddedOptions}};
/// let dir = tempfile::tempdir().unwrap();
/// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
/// assert_eq!(log.name(), "embedded");
/// log.close().await.unwrap();
/// # });
/// ```
#[derive(Clone)]
pub struct EmbeddedLog {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("db", &self.inner.db_path)
            .finish()
    }
}

impl EmbeddedLog {
    /// Opens (creating if needed) the log in `opts.dir`. Retention first runs after the first
    /// publish on this handle (then every [`EmbeddedOptions::retention_interval`]): a process
    /// that only reads never deletes.
    pub fn open(opts: EmbeddedOptions) -> Result<Self> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| {
            Error::config(format!(
                "data directory {}: cannot create: {e}",
                opts.dir.display()
            ))
        })?;
        let db_path = opts.dir.join(DB_FILE);
        let conn = open_conn(&db_path, opts.busy_timeout)?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| storage(&db_path, "create schema", e))?;
        let sync_full = opts.sync == SyncLevel::Full;
        conn.pragma_update(
            None,
            "synchronous",
            if sync_full { "FULL" } else { "NORMAL" },
        )
        .map_err(|e| storage(&db_path, "pragma synchronous", e))?;
        let w = Writer {
            conn,
            db: db_path.clone(),
            opts: opts.clone(),
            sync_full,
            last_retention: Instant::now(),
            published: false,
        };
        let (tx, rx) = mpsc::channel();
        let notify = Arc::new(Notify::new());
        let n2 = notify.clone();
        let thread = std::thread::Builder::new()
            .name("ampybus-embedded-writer".into())
            .spawn(move || writer_loop(w, rx, n2))
            .map_err(|e| {
                let message = format!(
                    "embedded log {}: cannot start writer thread: {e}",
                    db_path.display()
                );
                Error::transport(message, e)
            })?;
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                tx: Mutex::new(Some(tx)),
                notify,
                opts,
                db_path,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &EmbeddedOptions {
        &self.inner.opts
    }

    /// Path of the SQLite file.
    pub fn db_path(&self) -> &Path {
        &self.inner.db_path
    }

    /// Runs retention now, whether or not this handle has published; returns how many
    /// messages were deleted.
    pub async fn run_retention(&self) -> Result<u64> {
        self.inner.run(|w| w.retention()).await
    }

    /// Total messages stored, and the highest sequence.
    pub async fn stats(&self) -> Result<(u64, u64)> {
        let conn = self.inner.reader()?;
        let db = self.inner.db_path.clone();
        tokio::task::spawn_blocking(move || {
            conn.query_row(
                "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM messages",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(|e| storage(&db, "stats", e))
        })
        .await
        .map_err(|e| self.inner.task_failed("stats task", e))?
    }
}

struct EmbeddedSettler {
    inner: Arc<Inner>,
    consumer: Option<String>,
    owner: String,
    ack_deadline: Duration,
}

#[async_trait]
impl Settler for EmbeddedSettler {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn ack(&self, sequences: &[u64]) -> Result<()> {
        let Some(consumer) = &self.consumer else {
            return Ok(());
        };
        let (reply, rx) = oneshot::channel();
        self.inner.send(Cmd::Ack {
            consumer: consumer.clone(),
            seqs: sequences.to_vec(),
            applied: None,
            reply,
        })?;
        rx.await.map_err(|_| self.inner.closed("writer stopped"))?
    }

    async fn nack(&self, sequence: u64, delay: Duration) -> Result<()> {
        let Some(consumer) = self.consumer.clone() else {
            return Ok(());
        };
        self.inner
            .run(move |w| {
                w.set_sync(false)?;
                w.conn
                    .execute(
                        "UPDATE pending SET owner = NULL, not_before_us = ?3 WHERE consumer = ?1 AND seq = ?2 AND acked = 0",
                        params![consumer, sequence as i64, now_us() + delay.as_micros() as i64],
                    )
                    .map_err(|e| storage(&w.db, "nack", e))?;
                Ok(())
            })
            .await
    }

    async fn in_progress(&self, sequence: u64) -> Result<()> {
        let Some(consumer) = self.consumer.clone() else {
            return Ok(());
        };
        let owner = self.owner.clone();
        let until = self.ack_deadline.as_micros() as i64;
        self.inner
            .run(move |w| {
                w.set_sync(false)?;
                w.conn
                    .execute(
                        "UPDATE pending SET not_before_us = ?4 WHERE consumer = ?1 AND seq = ?2 AND owner = ?3 AND acked = 0",
                        params![consumer, sequence as i64, owner, now_us() + until],
                    )
                    .map_err(|e| storage(&w.db, "in_progress", e))?;
                Ok(())
            })
            .await
    }
}

/// One row as fetched.
struct Row {
    seq: i64,
    topic: String,
    log_us: i64,
    headers: crate::Headers,
    payload: Vec<u8>,
    deliveries: u32,
}

struct FetchOut {
    rows: Vec<Row>,
    /// Earliest time a blocking lease or delay expires, if any.
    next_due_us: Option<i64>,
}

/// Leases up to `max` messages for `consumer` (see the module docs for the rules).
fn fetch_durable(
    w: &mut Writer,
    consumer: &str,
    owner: &str,
    pattern: &TopicPattern,
    max: usize,
    deadline_us: i64,
) -> Result<FetchOut> {
    w.set_sync(false)?;
    let db = w.db.clone();
    let tx = w
        .conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| storage(&db, "begin fetch", e))?;
    let now = now_us();
    let mut cursor: i64 = tx
        .query_row(
            "SELECT cursor FROM consumers WHERE name = ?1",
            [consumer],
            |r| r.get(0),
        )
        .map_err(|e| storage(&db, "read consumer", e))?;
    // seq -> (owner, not_before, deliveries, acked)
    let mut pend: HashMap<i64, (Option<String>, i64, u32, bool)> = HashMap::new();
    {
        let mut st = tx
            .prepare_cached("SELECT seq, owner, not_before_us, deliveries, acked FROM pending WHERE consumer = ?1")
            .map_err(|e| storage(&db, "read pending", e))?;
        let rows = st
            .query_map([consumer], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    (
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, u32>(3)?,
                        r.get::<_, bool>(4)?,
                    ),
                ))
            })
            .map_err(|e| storage(&db, "read pending", e))?;
        for r in rows {
            let (k, v) = r.map_err(|e| storage(&db, "read pending", e))?;
            pend.insert(k, v);
        }
    }
    let mut blocked: HashSet<String> = HashSet::new();
    let mut taken: Vec<(i64, String, u32)> = Vec::new();
    let mut next_due: Option<i64> = None;
    let mut settled_prefix = true;
    let mut scan_from = cursor;
    let mut scanned_total = 0usize;
    let scan_chunk = (max * 4).max(1024) + pend.len();
    'outer: loop {
        let chunk: Vec<(i64, String, String)> = {
            let mut st = tx
                .prepare_cached(
                    "SELECT seq, topic, pkey FROM messages WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(|e| storage(&db, "scan", e))?;
            st.query_map(params![scan_from, scan_chunk as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| storage(&db, "scan", e))?
        };
        if chunk.is_empty() {
            break;
        }
        scanned_total += chunk.len();
        for (seq, topic, pkey) in chunk {
            scan_from = seq;
            let matches = pattern.matches(&topic);
            let settled = if !matches {
                true
            } else if let Some((p_owner, not_before, deliveries, acked)) = pend.get(&seq) {
                if *acked {
                    true
                } else if *not_before > now {
                    if p_owner.as_deref() != Some(owner) {
                        blocked.insert(pkey);
                        next_due = Some(next_due.map_or(*not_before, |d: i64| d.min(*not_before)));
                    }
                    false
                } else if blocked.contains(&pkey) {
                    false
                } else if taken.len() < max {
                    taken.push((seq, pkey, deliveries + 1));
                    false
                } else {
                    break 'outer;
                }
            } else if blocked.contains(&pkey) {
                false
            } else if taken.len() < max {
                taken.push((seq, pkey, 1));
                false
            } else {
                break 'outer;
            };
            if settled_prefix {
                if settled {
                    cursor = seq;
                } else {
                    settled_prefix = false;
                }
            }
        }
        if taken.len() >= max || scanned_total >= 65_536 {
            break;
        }
    }
    // Read and decode the taken rows first: a damaged row is never leased or delivered. The
    // rows before it are; when it is the first, the fetch fails naming it (nothing changes).
    let mut rows = Vec::with_capacity(taken.len());
    {
        let mut get = tx
            .prepare_cached("SELECT topic, log_us, headers, payload FROM messages WHERE seq = ?1")
            .map_err(|e| storage(&db, "read message", e))?;
        for (seq, _, deliveries) in &taken {
            let (topic, log_us, headers, payload): (String, i64, Vec<u8>, Vec<u8>) = get
                .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(|e| storage(&db, "read message", e))?;
            let headers = match decode_headers(&headers) {
                Ok(h) => h,
                Err(e) if rows.is_empty() => return Err(damaged_row(&db, *seq, &topic, &e)),
                Err(e) => {
                    tracing::debug!(seq, error = %e, "embedded log: damaged row; delivering the rows before it");
                    break;
                }
            };
            rows.push(Row {
                seq: *seq,
                topic,
                log_us,
                headers,
                payload,
                deliveries: *deliveries,
            });
        }
    }
    taken.truncate(rows.len());
    {
        let mut up = tx
            .prepare_cached(
                "INSERT INTO pending(consumer, seq, pkey, owner, not_before_us, deliveries, acked) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)
                 ON CONFLICT(consumer, seq) DO UPDATE SET owner = excluded.owner, not_before_us = excluded.not_before_us, deliveries = excluded.deliveries",
            )
            .map_err(|e| storage(&db, "lease", e))?;
        for (seq, pkey, deliveries) in &taken {
            up.execute(params![
                consumer,
                seq,
                pkey,
                owner,
                now + deadline_us,
                deliveries
            ])
            .map_err(|e| storage(&db, "lease", e))?;
        }
    }
    tx.execute(
        "UPDATE consumers SET cursor = ?2 WHERE name = ?1 AND cursor < ?2",
        params![consumer, cursor],
    )
    .map_err(|e| storage(&db, "advance cursor", e))?;
    tx.execute(
        "DELETE FROM pending WHERE consumer = ?1 AND seq <= ?2",
        params![consumer, cursor],
    )
    .map_err(|e| storage(&db, "trim pending", e))?;
    tx.commit().map_err(|e| storage(&db, "commit fetch", e))?;
    Ok(FetchOut {
        rows,
        next_due_us: next_due,
    })
}

fn row_to_delivery(r: Row, settler: &Arc<dyn Settler>) -> Delivery {
    Delivery::new(
        Envelope {
            topic: r.topic,
            headers: r.headers,
            payload: Bytes::from(r.payload),
        },
        DeliveryInfo {
            sequence: r.seq as u64,
            delivery_count: r.deliveries,
            stored_at: us_to_time(r.log_us),
        },
        settler.clone(),
    )
}

struct EmbeddedSubscription {
    inner: Arc<Inner>,
    spec: SubscribeSpec,
    owner: String,
    settler: Arc<dyn Settler>,
    watch: Connection,
    last_version: i64,
    /// Position of an ephemeral read.
    position: i64,
}

impl EmbeddedSubscription {
    fn data_version(&self) -> Result<i64> {
        self.watch
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| storage(&self.inner.db_path, "data_version", e))
    }

    fn read_ephemeral(&mut self, max: usize) -> Result<Vec<Row>> {
        let mut out = Vec::new();
        let mut st = self
            .watch
            .prepare_cached("SELECT seq, topic, log_us, headers, payload FROM messages WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(|e| storage(&self.inner.db_path, "read", e))?;
        for _ in 0..64 {
            let rows: Vec<WindowRow> = st
                .query_map(params![self.position, 1024i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .and_then(|rows| rows.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| storage(&self.inner.db_path, "read", e))?;
            if rows.is_empty() {
                break;
            }
            for (seq, topic, log_us, headers, payload) in rows {
                if out.len() >= max {
                    return Ok(out);
                }
                if self.spec.pattern.matches(&topic) {
                    // A damaged row stops the read before it: the rows before it are
                    // delivered, and the next read fails naming it.
                    let headers = match decode_headers(&headers) {
                        Ok(h) => h,
                        Err(e) if out.is_empty() => {
                            return Err(damaged_row(&self.inner.db_path, seq, &topic, &e));
                        }
                        Err(_) => return Ok(out),
                    };
                    out.push(Row {
                        seq,
                        topic,
                        log_us,
                        headers,
                        payload,
                        deliveries: 1,
                    });
                }
                self.position = seq;
            }
            if !out.is_empty() {
                break;
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        let give_up = tokio::time::Instant::now() + wait;
        loop {
            let inner = self.inner.clone();
            let notified = inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.last_version = self.data_version()?;
            let (rows, next_due) = match &self.spec.durable {
                Some(name) => {
                    let (name, owner, pattern) =
                        (name.clone(), self.owner.clone(), self.spec.pattern.clone());
                    let deadline = self.spec.ack_deadline.as_micros() as i64;
                    let out = self
                        .inner
                        .run(move |w| fetch_durable(w, &name, &owner, &pattern, max, deadline))
                        .await?;
                    (out.rows, out.next_due_us)
                }
                None => (self.read_ephemeral(max)?, None),
            };
            if !rows.is_empty() {
                return Ok(rows
                    .into_iter()
                    .map(|r| row_to_delivery(r, &self.settler))
                    .collect());
            }
            // Wait for a commit in this process (notify), in another (data_version), a lease
            // to expire, or the caller's deadline.
            loop {
                let now = tokio::time::Instant::now();
                if now >= give_up {
                    return Ok(Vec::new());
                }
                let mut until = (now + self.inner.opts.poll_interval).min(give_up);
                if let Some(due) = next_due {
                    let in_us = (due - now_us()).max(0) as u64;
                    until = until.min(now + Duration::from_micros(in_us));
                }
                tokio::select! {
                    _ = &mut notified => break,
                    _ = tokio::time::sleep_until(until) => {}
                }
                if next_due.is_some_and(|d| now_us() >= d)
                    || self.data_version()? != self.last_version
                {
                    break;
                }
            }
        }
    }
}

#[async_trait]
impl Transport for EmbeddedLog {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn publish_batch(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // Encode on the caller's task, so the writer holds the lock only for the inserts.
        let batch: Vec<NewRow> = batch.into_iter().map(NewRow::from).collect();
        let (reply, rx) = oneshot::channel();
        self.inner.send(Cmd::Append { batch, reply })?;
        rx.await.map_err(|_| self.inner.closed("writer stopped"))?
    }

    /// One trivial query through the writer thread: the thread runs and the database answers.
    async fn health(&self) -> Result<()> {
        self.inner
            .run(|w| {
                w.conn
                    .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                    .map(|_| ())
                    .map_err(|e| storage(&w.db, "health probe", e))
            })
            .await
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        let watch = self.inner.reader()?;
        let mut position = 0i64;
        if let Some(name) = &spec.durable {
            if name.is_empty()
                || name.len() > 200
                || name.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(Error::config(format!(
                    "durable consumer name {name:?}: must be 1–200 characters without whitespace"
                )));
            }
            let (name, pattern, start) =
                (name.clone(), spec.pattern.as_str().to_owned(), spec.start);
            self.inner
                .run(move |w| {
                    w.set_sync(false)?;
                    let tx = w
                        .conn
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .map_err(|e| storage(&w.db, "begin subscribe", e))?;
                    let existing: Option<String> = tx
                        .query_row("SELECT pattern FROM consumers WHERE name = ?1", [&name], |r| r.get(0))
                        .optional()
                        .map_err(|e| storage(&w.db, "read consumer", e))?;
                    match existing {
                        Some(p) if p != pattern => {
                            return Err(Error::config(format!(
                                "durable consumer {name:?} already exists with pattern {p:?}, not {pattern:?}; use another name"
                            )));
                        }
                        Some(_) => {}
                        None => {
                            let cursor = start_cursor(&w.db, &tx, start)?;
                            tx.execute(
                                "INSERT INTO consumers(name, pattern, cursor, created_us) VALUES (?1, ?2, ?3, ?4)",
                                params![name, pattern, cursor, now_us()],
                            )
                            .map_err(|e| storage(&w.db, "create consumer", e))?;
                        }
                    }
                    tx.commit().map_err(|e| storage(&w.db, "commit subscribe", e))
                })
                .await?;
        } else {
            position = start_cursor(&self.inner.db_path, &watch, spec.start)?;
        }
        let owner = uuid::Uuid::new_v4().to_string();
        let settler: Arc<dyn Settler> = Arc::new(EmbeddedSettler {
            inner: self.inner.clone(),
            consumer: spec.durable.clone(),
            owner: owner.clone(),
            ack_deadline: spec.ack_deadline,
        });
        Ok(Box::new(EmbeddedSubscription {
            inner: self.inner.clone(),
            spec,
            owner,
            settler,
            watch,
            last_version: 0,
            position,
        }))
    }

    fn replay(&self) -> Option<&dyn ReplayByTime> {
        Some(self)
    }

    fn consumer_lag(&self) -> Option<&dyn super::ConsumerLag> {
        Some(self)
    }

    fn inspect(&self) -> Option<&dyn super::Inspect> {
        Some(self)
    }

    fn dedupe_store(&self) -> Option<Arc<dyn crate::dedupe::DedupeStore>> {
        Some(Arc::new(EmbeddedDedupe::new(self.inner.clone())))
    }

    async fn close(&self) -> Result<()> {
        let tx = self
            .inner
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(tx);
        let handle = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|e| self.inner.task_failed("close", e))?
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Transport,
                        format!(
                            "embedded log {}: writer thread panicked",
                            self.inner.db_path.display()
                        ),
                    )
                })?;
        }
        Ok(())
    }
}

fn start_cursor(db: &Path, conn: &Connection, start: StartAt) -> Result<i64> {
    let q = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<i64> {
        conn.query_row(sql, p, |r| r.get::<_, i64>(0))
            .map_err(|e| storage(db, "start position", e))
    };
    match start {
        StartAt::Earliest => Ok(0),
        StartAt::Latest => q("SELECT COALESCE(MAX(seq), 0) FROM messages", &[]),
        StartAt::Time(t) => {
            let us = t.timestamp_micros();
            let first: i64 = q(
                "SELECT COALESCE(MIN(seq), -1) FROM messages WHERE log_us >= ?1",
                &[&us],
            )?;
            if first < 0 {
                q("SELECT COALESCE(MAX(seq), 0) FROM messages", &[])
            } else {
                Ok(first - 1)
            }
        }
    }
}

#[async_trait]
impl ReplayByTime for EmbeddedLog {
    async fn read_window(&self, query: &WindowQuery) -> Result<Vec<StoredMessage>> {
        let conn = self.inner.reader()?;
        let q = query.clone();
        let db = self.inner.db_path.clone();
        tokio::task::spawn_blocking(move || read_window_blocking(&db, &conn, &q))
            .await
            .map_err(|e| self.inner.task_failed("read task", e))?
    }
}

/// `(seq, topic, log_us, headers, payload)` as read for a window.
type WindowRow = (i64, String, i64, Vec<u8>, Vec<u8>);

fn read_window_blocking(
    db: &Path,
    conn: &Connection,
    q: &WindowQuery,
) -> Result<Vec<StoredMessage>> {
    let first_at = |t: Option<DateTime<Utc>>, default: i64| -> Result<i64> {
        match t {
            None => Ok(default),
            Some(t) => conn
                .query_row("SELECT COALESCE(MIN(seq), 9223372036854775807) FROM messages WHERE log_us >= ?1", [t.timestamp_micros()], |r| r.get(0))
                .map_err(|e| storage(db, "window bound", e)),
        }
    };
    let lo = first_at(q.start, 0)?.max(q.after_sequence as i64 + 1);
    let hi = first_at(q.end, i64::MAX)?; // exclusive
    let limit = q.limit.max(1);
    let mut out = Vec::new();
    let to_msg = |r: &rusqlite::Row<'_>| -> rusqlite::Result<WindowRow> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    };
    // A damaged row fails the read, naming it: never a message with empty headers.
    let mut push = |(seq, topic, log_us, headers, payload): WindowRow| -> Result<()> {
        let headers = decode_headers(&headers).map_err(|e| damaged_row(db, seq, &topic, &e))?;
        out.push(StoredMessage {
            sequence: seq as u64,
            stored_at: us_to_time(log_us),
            envelope: Envelope {
                topic,
                headers,
                payload: Bytes::from(payload),
            },
        });
        Ok(())
    };
    match &q.keys {
        Some(keys) => {
            let mut rows = Vec::new();
            let mut st = conn
                .prepare_cached("SELECT seq, topic, log_us, headers, payload FROM messages WHERE pkey = ?1 AND seq >= ?2 AND seq < ?3 ORDER BY seq LIMIT ?4")
                .map_err(|e| storage(db, "window by key", e))?;
            for k in keys {
                let mut from = lo;
                loop {
                    let got: Vec<_> = st
                        .query_map(params![k, from, hi, limit as i64], to_msg)
                        .and_then(|r| r.collect::<std::result::Result<Vec<_>, _>>())
                        .map_err(|e| storage(db, "window by key", e))?;
                    let n = got.len();
                    let mut matched = 0;
                    for r in got {
                        from = r.0 + 1;
                        if q.pattern.matches(&r.1) {
                            rows.push(r);
                            matched += 1;
                        }
                    }
                    if n < limit || matched > 0 {
                        break;
                    }
                }
            }
            rows.sort_by_key(|r| r.0);
            rows.truncate(limit);
            for r in rows {
                push(r)?;
            }
        }
        None => {
            let mut st = conn
                .prepare_cached("SELECT seq, topic, log_us, headers, payload FROM messages WHERE seq >= ?1 AND seq < ?2 ORDER BY seq LIMIT ?3")
                .map_err(|e| storage(db, "window", e))?;
            let mut from = lo;
            let chunk = limit.max(1000);
            let mut count = 0;
            'scan: loop {
                let got: Vec<_> = st
                    .query_map(params![from, hi, chunk as i64], to_msg)
                    .and_then(|r| r.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| storage(db, "window", e))?;
                let n = got.len();
                for r in got {
                    from = r.0 + 1;
                    if q.pattern.matches(&r.1) {
                        push(r)?;
                        count += 1;
                        if count >= limit {
                            break 'scan;
                        }
                    }
                }
                if n < chunk || count > 0 {
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// The embedded log's own dedupe store: table `applied` in the log's database, so that the
/// consumer runtime records the dedupe entries of a batch and acks it in **one** transaction
/// ([`crate::dedupe::DedupeStore::record_and_ack`]). Lookups run inline on pooled read
/// connections. Entries older than the window (default
/// [`crate::dedupe::DEFAULT_WINDOW`]) no longer count and are purged at most once a minute.
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
    readers: Mutex<Vec<Connection>>,
    window: Duration,
    last_purge: Mutex<Instant>,
}

impl std::fmt::Debug for EmbeddedDedupe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedDedupe")
            .field("db", &self.inner.db_path)
            .field("window", &self.window)
            .finish()
    }
}

impl EmbeddedDedupe {
    fn new(inner: Arc<Inner>) -> EmbeddedDedupe {
        EmbeddedDedupe {
            inner,
            readers: Mutex::new(Vec::new()),
            window: crate::dedupe::DEFAULT_WINDOW,
            last_purge: Mutex::new(Instant::now()),
        }
    }

    /// Sets the window (entries older than this no longer count).
    pub fn with_window(mut self, window: Duration) -> EmbeddedDedupe {
        self.window = window;
        self
    }

    fn cutoff_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
            - i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX / 2)
    }

    async fn send_ack(
        &self,
        consumer: String,
        seqs: Vec<u64>,
        applied: Option<(String, Vec<String>)>,
    ) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.inner.send(Cmd::Ack {
            consumer,
            seqs,
            applied,
            reply,
        })?;
        let r = rx.await.map_err(|_| self.inner.closed("writer stopped"))?;
        self.maybe_purge();
        r
    }

    fn maybe_purge(&self) {
        {
            let mut last = self.last_purge.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < Duration::from_secs(60) {
                return;
            }
            *last = Instant::now();
        }
        let cutoff = self.cutoff_ms();
        let _ = self.inner.send(Cmd::Run(Box::new(move |w| {
            if let Err(e) = w.conn.execute(
                "DELETE FROM applied WHERE applied_at_ms < ?1",
                params![cutoff],
            ) {
                tracing::warn!(error = %e, "embedded dedupe: purge failed");
            }
        })));
    }
}

#[async_trait]
impl crate::dedupe::DedupeStore for EmbeddedDedupe {
    async fn is_applied(&self, consumer: &str, keys: &[String]) -> Result<bool> {
        if keys.is_empty() {
            return Ok(false);
        }
        let conn = match self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            Some(c) => c,
            None => self.inner.reader()?,
        };
        let found = (|| {
            let mut st = conn
                .prepare_cached(
                    "SELECT 1 FROM applied WHERE consumer = ?1 AND key = ?2 AND applied_at_ms >= ?3",
                )
                .map_err(|e| storage(&self.inner.db_path, "prepare dedupe lookup", e))?;
            let cutoff = self.cutoff_ms();
            for k in keys {
                if st
                    .exists(params![consumer, k, cutoff])
                    .map_err(|e| storage(&self.inner.db_path, "dedupe lookup", e))?
                {
                    return Ok(true);
                }
            }
            Ok(false)
        })();
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        found
    }

    async fn applied_among(
        &self,
        consumer: &str,
        keys: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        let mut out = std::collections::HashSet::new();
        if keys.is_empty() {
            return Ok(out);
        }
        let conn = match self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            Some(c) => c,
            None => self.inner.reader()?,
        };
        let cutoff = self.cutoff_ms();
        let found = (|| {
            for chunk in keys.chunks(400) {
                let marks = vec!["?"; chunk.len()].join(",");
                let sql = format!(
                    "SELECT key FROM applied WHERE consumer = ? AND applied_at_ms >= ? AND key IN ({marks})"
                );
                let mut st = conn
                    .prepare_cached(&sql)
                    .map_err(|e| storage(&self.inner.db_path, "prepare dedupe batch lookup", e))?;
                let mut args: Vec<&dyn rusqlite::ToSql> = vec![&consumer, &cutoff];
                args.extend(chunk.iter().map(|k| k as &dyn rusqlite::ToSql));
                let rows = st
                    .query_map(&args[..], |r| r.get::<_, String>(0))
                    .map_err(|e| storage(&self.inner.db_path, "dedupe batch lookup", e))?;
                for r in rows {
                    out.insert(
                        r.map_err(|e| storage(&self.inner.db_path, "dedupe batch lookup", e))?,
                    );
                }
            }
            Ok(())
        })();
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        found.map(|()| out)
    }

    async fn record_applied(&self, consumer: &str, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.send_ack(
            consumer.to_owned(),
            Vec::new(),
            Some((consumer.to_owned(), keys.to_vec())),
        )
        .await
    }

    async fn record_and_ack(
        &self,
        consumer: &str,
        keys: &[String],
        deliveries: Vec<Delivery>,
    ) -> std::result::Result<(), (Error, Vec<Delivery>)> {
        // One transaction when every delivery is a durable delivery of this very log.
        let durable = deliveries.first().and_then(|d| {
            d.settler_any()
                .and_then(|a| a.downcast_ref::<EmbeddedSettler>())
                .filter(|s| Arc::ptr_eq(&s.inner, &self.inner))
                .and_then(|s| s.consumer.clone())
        });
        let same = durable.as_ref().is_some_and(|name| {
            deliveries.iter().all(|d| {
                d.settler_any()
                    .and_then(|a| a.downcast_ref::<EmbeddedSettler>())
                    .is_some_and(|s| {
                        Arc::ptr_eq(&s.inner, &self.inner) && s.consumer.as_ref() == Some(name)
                    })
            })
        });
        match durable {
            Some(name) if same => {
                let seqs = deliveries.iter().map(|d| d.info.sequence).collect();
                let applied = (!keys.is_empty()).then(|| (consumer.to_owned(), keys.to_vec()));
                match self.send_ack(name, seqs, applied).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err((e, deliveries)),
                }
            }
            _ => {
                if let Err(e) = self.record_applied(consumer, keys).await {
                    return Err((e, deliveries));
                }
                Delivery::ack_all(deliveries).await
            }
        }
    }
}
