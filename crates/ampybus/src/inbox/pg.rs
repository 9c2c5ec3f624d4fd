//! The inbox and outbox on PostgreSQL (cargo feature `inbox-postgres`), through the
//! archive's client crate (`tokio-postgres`) in its schema `ampybus`: tables `ampybus.inbox`
//! and `ampybus.outbox`, version 2 of `ampybus.schema_version`.
//!
//! The handler is async and receives the open transaction:
//!
//! ```text
//! #[async_trait]
//! trait PgHandler: Send + Sync + 'static {
//!     async fn handle(&self, msg: &Message, tx: &tokio_postgres::Transaction<'_>) -> Outcome;
//! }
//! ```
//!
//! (or a closure through [`pg_handler_fn`]: `for<'a> Fn(&'a Message, &'a Transaction<'a>) ->
//! BoxFuture<'a, Outcome>`). The message's inbox row is already inserted in `tx`; the handler
//! writes its effects and stages messages ([`PgOutbox::stage`]) through it. Messages handled at
//! the same time share a transaction (up to 64 per transaction, 4 transactions at once, each
//! on a connection of its own; an inbox consumer has [`DEFAULT_WORKERS`] (128) workers unless
//! told otherwise: as many messages in flight): one statement inserts the batch's inbox
//! rows, the handlers run one after the other, and one commit (with the server's
//! `synchronous_commit`) precedes the acks. When a handler does not return `Ok` (or panics,
//! or returns `Ok` after one of its statements failed) the whole transaction is rolled back,
//! that message keeps its outcome (a failed statement under `Ok` makes it a retry), and the
//! other messages go again in a new transaction with a savepoint each — their handlers are
//! called a second time; nothing of the first call was committed. A deadlock (SQLSTATE
//! `40P01`) or serialization failure (`40001`) in a shared transaction is not a handler's
//! failure: whatever the handler returned after it (or a panic on it), the lane rolls the
//! transaction back and applies its messages again — together once more, then one per
//! transaction until each goes through — and counts it in
//! `bus_inbox_conflict_retries_total{consumer}` ([`PgInbox::conflict_retries`]); handlers may
//! run more than once, their effects commit once. After a conflict the consumer's lanes take
//! turns, one transaction at a time, for [`DEFAULT_CONFLICT_TURNS`] (10 s,
//! [`PgInbox::with_conflict_turns`]), so effects that conflict all the time pay PostgreSQL's
//! `deadlock_timeout` about once per period, not once per batch. The handler must not end the
//! transaction itself.
//!
//! ```no_run
//! # async fn f(bus: ampybus::Bus) -> ampybus::Result<()> {
//! use ampybus::inbox::pg::{PgInbox, PgOutbox, pg_handler_fn};
//! use ampybus::runtime::{Consumer, Outcome};
//! use ampybus::{Headers, Topic};
//! let inbox = PgInbox::connect("postgres://postgres@127.0.0.1/oms").await?;
//! let fills = Topic::parse("ampy.prod.fills.v1.sim")?;
//! let handle = Consumer::builder(bus, "ampy.prod.orders.>".parse()?, "oms")
//!     .inbox(inbox.handler(pg_handler_fn(move |msg, tx| {
//!         let fills = fills.clone();
//!         Box::pin(async move {
//!             let id = msg.headers.partition_key().unwrap_or_default().to_owned();
//!             if tx.execute("INSERT INTO orders (id) VALUES ($1)", &[&id]).await.is_err() {
//!                 return Outcome::Retry { after: None };
//!             }
//!             let h = Headers::for_publish("ampy.fills.v1.Fill", "oms@1", "oms", &format!("acct|{id}"));
//!             match PgOutbox.stage(tx, &fills, h, b"fill".to_vec()).await {
//!                 Ok(_) => Outcome::Ok,
//!                 Err(_) => Outcome::Retry { after: None },
//!             }
//!         })
//!     })))
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```

use super::pg_watch::is_conflict;
use super::relay::{OutboxRow, RelayStore};
use super::{
    Attempted, CRASH_BEFORE_ACK, CRASH_BEFORE_COMMIT, DEFAULT_RETENTION, InboxAttempt,
    InboxBinding, InboxRow, OutboxRelay, RelayOptions, Skips, crash_point, prepare_stage,
};
use crate::archive::{connect, migrate, parse_url, pg_error};
use crate::bus::Bus;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::obs::BusMetrics;
use crate::runtime::{Handler, Message, Outcome};
use crate::topic::Topic;
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, Transaction};

/// Inserts a message's inbox row ([`super::InboxRow`]): `$1` consumer, `$2` message_id, `$3`
/// domain, `$4` dedupe_key (NULL when none), `$5` topic. No row inserted means the message was
/// applied before (either unique key). The one statement of the Rust inbox and the Python
/// SDK's (asyncpg), so both write the same rows.
///
/// ```
/// assert!(ampybus::inbox::pg::INBOX_INSERT_SQL.ends_with("ON CONFLICT DO NOTHING"));
/// ```
pub const INBOX_INSERT_SQL: &str = "INSERT INTO ampybus.inbox (consumer, message_id, domain, dedupe_key, topic) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";

/// Deletes inbox rows older than `$1` seconds (float8): the retention.
///
/// ```
/// assert!(ampybus::inbox::pg::INBOX_PURGE_SQL.starts_with("DELETE FROM ampybus.inbox"));
/// ```
pub const INBOX_PURGE_SQL: &str =
    "DELETE FROM ampybus.inbox WHERE applied_at < now() - make_interval(secs => $1)";

/// The class id of the per-key staging locks (`$1` of [`STAGE_LOCK_SQL`]).
///
/// ```
/// assert_eq!(ampybus::inbox::pg::STAGE_LOCK_CLASS, 0x6f75_7462); // "outb"
/// ```
pub const STAGE_LOCK_CLASS: i32 = 0x6f75_7462; // "outb"

/// Takes the per-key staging lock until the transaction ends: `$1` [`STAGE_LOCK_CLASS`]
/// (int4), `$2` the partition key.
///
/// ```
/// assert!(ampybus::inbox::pg::STAGE_LOCK_SQL.contains("pg_advisory_xact_lock"));
/// ```
pub const STAGE_LOCK_SQL: &str = "SELECT pg_advisory_xact_lock($1, hashtext($2))";

/// Inserts a staged row with the key's next `seq` (run after [`STAGE_LOCK_SQL`], in the same
/// transaction): `$1` message_id, `$2` topic, `$3` partition key, `$4` encoded headers
/// (bytea), `$5` payload (bytea) — the values of [`super::prepare_stage`].
///
/// ```
/// assert!(ampybus::inbox::pg::OUTBOX_INSERT_SQL.starts_with("INSERT INTO ampybus.outbox"));
/// ```
pub const OUTBOX_INSERT_SQL: &str = "INSERT INTO ampybus.outbox (message_id, topic, partition_key, seq, headers, payload) VALUES ($1, $2, $3, (SELECT coalesce(max(seq), 0) + 1 FROM ampybus.outbox WHERE partition_key = $3), $4, $5)";

/// An inbox consumer's handler on PostgreSQL: the message and the open transaction.
///
/// ```
/// use ampybus::inbox::pg::PgHandler;
/// use ampybus::runtime::{Message, Outcome};
/// struct Positions;
/// #[async_trait::async_trait]
/// impl PgHandler for Positions {
///     async fn handle(&self, msg: &Message, tx: &tokio_postgres::Transaction<'_>) -> Outcome {
///         let qty: i64 = std::str::from_utf8(&msg.payload).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
///         match tx.execute("UPDATE positions SET qty = qty + $1", &[&qty]).await {
///             Ok(_) => Outcome::Ok,
///             Err(_) => Outcome::Retry { after: None },
///         }
///     }
/// }
/// let _h: Box<dyn PgHandler> = Box::new(Positions);
/// ```
#[async_trait]
pub trait PgHandler: Send + Sync + 'static {
    /// Handles one message inside `tx` (the inbox row is inserted; commit and ack follow an
    /// `Ok`).
    async fn handle(&self, msg: &Message, tx: &Transaction<'_>) -> Outcome;
}

/// A [`PgHandler`] from a closure returning a boxed future; see [`pg_handler_fn`].
///
/// ```
/// let h = ampybus::inbox::pg::pg_handler_fn(|_m, _tx| Box::pin(async { ampybus::Outcome::Ok }));
/// let _: &dyn ampybus::inbox::pg::PgHandler = &h;
/// ```
pub struct PgFnHandler<F>(F);

impl<F> std::fmt::Debug for PgFnHandler<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgFnHandler")
    }
}

/// Wraps `for<'a> Fn(&'a Message, &'a Transaction<'a>) -> BoxFuture<'a, Outcome>` as a
/// [`PgHandler`].
///
/// ```
/// use ampybus::inbox::pg::pg_handler_fn;
/// let _h = pg_handler_fn(|msg, tx| Box::pin(async move {
///     let id = msg.headers.message_id().unwrap_or_default().to_owned();
///     match tx.execute("INSERT INTO seen (id) VALUES ($1)", &[&id]).await {
///         Ok(_) => ampybus::Outcome::Ok,
///         Err(_) => ampybus::Outcome::Retry { after: None },
///     }
/// }));
/// ```
pub fn pg_handler_fn<F>(f: F) -> PgFnHandler<F>
where
    F: for<'a> Fn(&'a Message, &'a Transaction<'a>) -> BoxFuture<'a, Outcome>
        + Send
        + Sync
        + 'static,
{
    PgFnHandler(f)
}

#[async_trait]
impl<F> PgHandler for PgFnHandler<F>
where
    F: for<'a> Fn(&'a Message, &'a Transaction<'a>) -> BoxFuture<'a, Outcome>
        + Send
        + Sync
        + 'static,
{
    async fn handle(&self, msg: &Message, tx: &Transaction<'_>) -> Outcome {
        (self.0)(msg, tx).await
    }
}

/// A transactional inbox (and outbox) in a PostgreSQL database.
///
/// ```no_run
/// # async fn f() -> ampybus::Result<()> {
/// use ampybus::inbox::pg::PgInbox;
/// let inbox = PgInbox::connect("postgres://postgres@127.0.0.1/oms").await?
///     .with_retention(std::time::Duration::from_secs(3 * 24 * 3600));
/// assert_eq!(inbox.schema_versions().1, ampybus::archive::SCHEMA_VERSION);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgInbox {
    inner: Arc<Inner>,
    retention: Duration,
    turns: Duration,
}

struct Inner {
    config: tokio_postgres::Config,
    shown: String,
    idle: Mutex<Vec<Client>>,
    last_purge: Mutex<Option<Instant>>,
    migrated: (i32, i32),
    skipped: Skips,
    conflict_retries: Skips,
}

impl std::fmt::Debug for PgInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgInbox")
            .field("url", &self.inner.shown)
            .field("retention", &self.retention)
            .field("conflict_turns", &self.turns)
            .finish()
    }
}

const PURGE_EVERY: Duration = Duration::from_secs(60);

impl PgInbox {
    /// Connects and creates or migrates schema `ampybus` (the archive's, with the inbox and
    /// outbox tables). Errors: a bad URL (Config), an unreachable server (Transport, naming
    /// the URL without its password), a missing database or wrong credentials (Config), a
    /// schema of a newer version (Config, naming both versions).
    pub async fn connect(url: &str) -> Result<PgInbox> {
        let config = parse_url(url)?;
        let shown = crate::transport::url::redact(url);
        let mut client = connect(&config, &shown).await?;
        let migrated = migrate(&mut client).await?;
        Ok(PgInbox {
            inner: Arc::new(Inner {
                config,
                shown,
                idle: Mutex::new(vec![client]),
                last_purge: Mutex::new(None),
                migrated,
                skipped: Skips::default(),
                conflict_retries: Skips::default(),
            }),
            retention: DEFAULT_RETENTION,
            turns: DEFAULT_CONFLICT_TURNS,
        })
    }

    /// Sets how long inbox rows count (default [`DEFAULT_RETENTION`], 7 days).
    pub fn with_retention(mut self, d: Duration) -> PgInbox {
        self.retention = d;
        self
    }

    /// How long inbox rows count.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Sets how long the commit lanes of a consumer take turns after a deadlock or
    /// serialization failure (default [`DEFAULT_CONFLICT_TURNS`], 10 s; `Duration::ZERO`: never
    /// — the lanes always run at once and retry every conflict).
    ///
    /// ```no_run
    /// # async fn f() -> ampybus::Result<()> {
    /// use ampybus::inbox::pg::PgInbox;
    /// let inbox = PgInbox::connect("postgres://postgres@127.0.0.1/oms").await?
    ///     .with_conflict_turns(std::time::Duration::from_secs(30));
    /// assert_eq!(inbox.conflict_turns().as_secs(), 30);
    /// # Ok(()) }
    /// ```
    pub fn with_conflict_turns(mut self, d: Duration) -> PgInbox {
        self.turns = d;
        self
    }

    /// How long the commit lanes of a consumer take turns after a conflict.
    pub fn conflict_turns(&self) -> Duration {
        self.turns
    }

    /// `(version found, version now)` of schema `ampybus` when this handle connected.
    pub fn schema_versions(&self) -> (i32, i32) {
        self.inner.migrated
    }

    /// A connection of this inbox's pool, for the application's own transactions (give it
    /// back with [`PgInbox::give_back`], or drop it).
    pub async fn client(&self) -> Result<Client> {
        self.take().await
    }

    /// Returns a connection to the pool (a closed one is dropped).
    pub fn give_back(&self, client: Client) {
        if client.is_closed() {
            return;
        }
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < 64 {
            idle.push(client);
        }
    }

    /// How many messages consumers named `consumer` of this handle found applied already.
    pub fn skipped(&self, consumer: &str) -> u64 {
        self.inner.skipped.total(consumer)
    }

    /// How many times the commit lanes of consumers named `consumer` of this handle rolled a
    /// transaction back after a deadlock (SQLSTATE `40P01`) or a serialization failure
    /// (`40001`) and applied its messages again (also `bus_inbox_conflict_retries_total`).
    ///
    /// ```no_run
    /// # async fn f(inbox: ampybus::inbox::pg::PgInbox) {
    /// println!("{} conflicts retried", inbox.conflict_retries("positions"));
    /// # }
    /// ```
    pub fn conflict_retries(&self, consumer: &str) -> u64 {
        self.inner.conflict_retries.total(consumer)
    }

    /// Binds `handler` to this inbox for [`crate::runtime::ConsumerBuilder::inbox`].
    pub fn handler(&self, handler: impl PgHandler) -> PgInboxBinding {
        PgInboxBinding {
            inbox: self.clone(),
            handler: Arc::new(handler),
        }
    }

    /// A relay for this database's outbox (`bus_outbox_*{table="ampybus.outbox@<db>"}`); one
    /// per database is active at a time (a session advisory lock).
    pub fn relay(&self, bus: Bus, opts: RelayOptions) -> OutboxRelay {
        let db = self.inner.config.get_dbname().unwrap_or("postgres");
        OutboxRelay::new(
            Arc::new(PgRelayStore {
                inbox: self.clone(),
                table: format!("ampybus.outbox@{db}"),
                lock: tokio::sync::Mutex::new(None),
                work: tokio::sync::Mutex::new(None),
            }),
            bus,
            opts,
        )
    }

    async fn take(&self) -> Result<Client> {
        loop {
            let c = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            match c {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => return connect(&self.inner.config, &self.inner.shown).await,
            }
        }
    }

    async fn maybe_purge(&self, client: &Client) {
        {
            let mut last = self
                .inner
                .last_purge
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < PURGE_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let secs = self.retention.as_secs_f64();
        match client.execute(INBOX_PURGE_SQL, &[&secs]).await {
            Ok(n) if n > 0 => {
                tracing::info!(db = %self.inner.shown, rows = n, "inbox: expired rows purged")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(db = %self.inner.shown, error = %e, "inbox: purge failed"),
        }
    }
}

/// A [`PgInbox`] with its handler ([`PgInbox::handler`]).
pub struct PgInboxBinding {
    inbox: PgInbox,
    handler: Arc<dyn PgHandler>,
}

impl std::fmt::Debug for PgInboxBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgInboxBinding")
            .field("inbox", &self.inbox)
            .finish()
    }
}

/// The workers of a PostgreSQL inbox consumer unless
/// [`crate::runtime::ConsumerBuilder::workers`] says otherwise: 128, so that the commit lanes'
/// shared transactions fill (a lane commits what is in flight: with the runtime's usual 8
/// workers a transaction holds 2 messages and the inbox does 3–6k msg/s with a no-op effect;
/// with 128, 18–40k — docs/benchmarks.md, Run G and Run I). Bigger transactions meet more
/// deadlocks on application rows several messages update; a lane rolls a transaction that
/// lost one back and applies its messages again (see [`PgInbox::conflict_retries`]), so no
/// handler outcome of it counts, and the lanes then take turns for a while
/// ([`PgInbox::with_conflict_turns`]). Fewer workers do not avoid deadlocks: with 8, effects
/// on a few shared rows still deadlock across the lanes, with fewer messages per transaction.
///
/// ```
/// assert_eq!(ampybus::inbox::pg::DEFAULT_WORKERS, 128);
/// ```
pub const DEFAULT_WORKERS: usize = 128;

impl InboxBinding for PgInboxBinding {
    fn workers(&self) -> usize {
        DEFAULT_WORKERS
    }

    fn bind(self: Box<Self>, consumer: &str, metrics: &BusMetrics) -> Arc<dyn Handler> {
        let skips = self.inbox.inner.clone();
        let retries = metrics.inbox_conflict_retries(consumer);
        skips
            .conflict_retries
            .track(consumer, metrics, retries.clone());
        let store = PgAttempt {
            inbox: self.inbox,
            handler: self.handler,
            retries,
            lanes: std::sync::OnceLock::new(),
        };
        skips.skipped.bind(store, consumer, metrics)
    }
}

struct PgAttempt {
    inbox: PgInbox,
    handler: Arc<dyn PgHandler>,
    /// `bus_inbox_conflict_retries_total` of the consumer.
    retries: Counter,
    /// The queue of the commit lanes, started on first use.
    lanes: std::sync::OnceLock<tokio::sync::mpsc::Sender<Job>>,
}

/// How many transactions an inbox consumer keeps open at once (each on a connection of its
/// own), and how many messages one of them takes at most.
const LANES: usize = 4;
const MAX_BATCH: usize = 64;

/// A message waiting for a shared transaction, and where its result goes.
struct Job {
    consumer: String,
    row: InboxRow,
    msg: Message,
    reply: tokio::sync::oneshot::Sender<JobResult>,
}

enum JobResult {
    Done(Attempted),
    /// The handler panicked (its effects rolled back): the panic goes on in the worker.
    Panicked(Box<dyn std::any::Any + Send>),
    Failed(Error),
}

#[async_trait]
impl InboxAttempt for PgAttempt {
    async fn attempt(&self, consumer: &str, row: &InboxRow, msg: &Message) -> Result<Attempted> {
        let lanes = self.lanes.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel::<Job>(MAX_BATCH * LANES);
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            let turns = Arc::new(Turns {
                // At most a year: `Instant + calm` must not overflow.
                calm: self.inbox.turns.min(Duration::from_secs(365 * 24 * 3600)),
                calm_until: Mutex::new(None),
                turn: tokio::sync::Mutex::new(()),
            });
            for _ in 0..LANES {
                let lane = Lane {
                    inbox: self.inbox.clone(),
                    handler: self.handler.clone(),
                    retries: self.retries.clone(),
                    queue: rx.clone(),
                    conn: None,
                    carry: Vec::new(),
                    turns: turns.clone(),
                };
                tokio::spawn(lane.run());
            }
            tx
        });
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            consumer: consumer.to_owned(),
            row: row.clone(),
            msg: msg.clone(),
            reply,
        };
        let closed = || Error::new(ErrorKind::Closed, "inbox: the commit lanes stopped");
        lanes.send(job).await.map_err(|_| closed())?;
        match answer.await.map_err(|_| closed())? {
            JobResult::Done(a) => Ok(a),
            JobResult::Panicked(p) => std::panic::resume_unwind(p),
            JobResult::Failed(e) => Err(e),
        }
    }
}

/// The inbox rows of a whole batch in one statement (sorted by message id, so that two lanes
/// take the rows' locks in one order); the ids it returns are the rows inserted, the others
/// were applied before.
const INSERT_ROWS: &str =
    "INSERT INTO ampybus.inbox (consumer, message_id, domain, dedupe_key, topic)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
     ON CONFLICT DO NOTHING RETURNING message_id";
/// One message's inbox row (the savepoint path): the statement the Python SDK runs too.
const INSERT_ONE: &str = INBOX_INSERT_SQL;
/// Fails in a transaction a failed statement aborted (where `COMMIT` would roll back without
/// an error).
const CHECK: &str = "SELECT 1";

/// A lane's connection with its statements, prepared once.
struct Conn {
    client: Client,
    /// Deadlocks and serialization failures the server reported on this connection
    /// ([`super::pg_watch`]).
    conflicts: Arc<AtomicU64>,
    rows: tokio_postgres::Statement,
    one: tokio_postgres::Statement,
    check: tokio_postgres::Statement,
}

/// One commit lane: takes what is queued (up to [`MAX_BATCH`]), applies it in one
/// transaction, commits, then answers every message.
///
/// The batch first goes through together: one statement inserts every inbox row, the
/// handlers run one after the other, a check statement proves that none of their statements
/// failed, one commit. A handler that does not return `Ok` (or panics, or returned `Ok` after
/// a failed statement) rolls the whole transaction back; its result stands, and the other
/// messages go again in a new transaction with a savepoint each (their handlers are called a
/// second time; nothing of the first call was committed).
///
/// A deadlock (`40P01`) or serialization failure (`40001`) anywhere in the transaction — seen
/// on the lane's connection whichever statement it answered, [`super::pg_watch`] — voids every
/// outcome of the attempt, whatever the handlers made of the error (a `Retry`, a panic on
/// `unwrap`, an `Ok` over it): the transaction is rolled back and the batch goes again
/// together; after a second conflict one message per transaction, each again until it goes
/// through (a deadlock's other transaction does; after [`MAX_CONFLICTS`] in a row the message
/// is held and tried again like during an outage). Each retry counts in
/// `bus_inbox_conflict_retries_total{consumer}`, and the consumer's lanes take turns for a
/// while ([`Turns`]).
struct Lane {
    inbox: PgInbox,
    handler: Arc<dyn PgHandler>,
    retries: Counter,
    queue: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Job>>>,
    conn: Option<Conn>,
    /// Copies (same message id, or same dedupe key) of a message of the batch being formed,
    /// held for the next batch: the one insert must see the first copy's fate.
    carry: Vec<Job>,
    /// Shared by the consumer's lanes: whether they take turns.
    turns: Arc<Turns>,
}

/// How long the commit lanes of a consumer take turns after a deadlock or serialization
/// failure, unless [`PgInbox::with_conflict_turns`] says otherwise: 10 s.
///
/// ```
/// assert_eq!(ampybus::inbox::pg::DEFAULT_CONFLICT_TURNS.as_secs(), 10);
/// ```
pub const DEFAULT_CONFLICT_TURNS: Duration = Duration::from_secs(10);

/// After a conflict the lanes of a consumer take turns — one transaction at a time — for
/// `calm` ([`PgInbox::with_conflict_turns`]): their transactions can no longer deadlock with
/// each other, so effects that conflict all the time (a few shared rows updated in varying
/// orders) pay PostgreSQL's `deadlock_timeout` (1 s by default) about once per period instead
/// of once per batch. Without conflicts the lanes run at once. A lane never waits for its
/// turn with a transaction open, so a turn cannot wait on a row lock of a lane waiting for
/// the turn.
struct Turns {
    calm: Duration,
    calm_until: Mutex<Option<Instant>>,
    turn: tokio::sync::Mutex<()>,
}

impl Turns {
    fn taking(&self) -> bool {
        self.calm_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    /// A conflict: turns for the next `calm`; waits for this lane's turn if it has none.
    async fn conflict<'a>(&'a self, held: &mut Option<tokio::sync::MutexGuard<'a, ()>>) {
        if self.calm.is_zero() {
            return;
        }
        *self.calm_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + self.calm);
        if held.is_none() {
            *held = Some(self.turn.lock().await);
        }
    }
}

/// The message ids and dedupe keys of a batch being formed.
#[derive(Default)]
struct Formed {
    jobs: Vec<Job>,
    ids: std::collections::HashSet<String>,
    keys: std::collections::HashSet<(&'static str, String)>,
}

impl Formed {
    /// Takes `j` into the batch, or into `carry` when the batch is full or has a copy of it.
    fn offer(&mut self, j: Job, carry: &mut Vec<Job>) {
        let key = j.row.dedupe_key.clone().map(|k| (j.row.domain, k));
        let copy = self.ids.contains(&j.row.message_id)
            || key.as_ref().is_some_and(|k| self.keys.contains(k));
        if copy || self.jobs.len() >= MAX_BATCH {
            carry.push(j);
            return;
        }
        self.ids.insert(j.row.message_id.clone());
        if let Some(k) = key {
            self.keys.insert(k);
        }
        self.jobs.push(j);
    }
}

/// What the batch did when it went through together.
enum Together {
    Committed(Vec<JobResult>),
    /// A deadlock or serialization failure aborted it: rolled back, every outcome void.
    Conflict,
    /// Rolled back; again with a savepoint each, but for the message at `.0` whose result
    /// is `.1` (none: a handler returned `Ok` after a failed statement, unknown which).
    Redo(Option<(usize, JobResult)>),
}

impl Lane {
    async fn run(mut self) {
        while let Some(jobs) = self.gather().await {
            self.batch(jobs).await;
        }
        if let Some(c) = self.conn.take() {
            self.inbox.give_back(c.client);
        }
    }

    /// The next batch: the held copies first, then what is queued (waiting for one message
    /// when there is nothing else); `None` once the queue is closed.
    async fn gather(&mut self) -> Option<Vec<Job>> {
        let mut formed = Formed::default();
        for j in std::mem::take(&mut self.carry) {
            formed.offer(j, &mut self.carry);
        }
        let mut q = self.queue.lock().await;
        if formed.jobs.is_empty() {
            formed.offer(q.recv().await?, &mut self.carry);
        }
        for _ in 0..MAX_BATCH {
            if formed.jobs.len() >= MAX_BATCH {
                break;
            }
            match q.try_recv() {
                Ok(j) => formed.offer(j, &mut self.carry),
                Err(_) => break,
            }
        }
        Some(formed.jobs)
    }

    /// This lane's connection, (re)connected and its statements prepared when needed.
    async fn connection(&mut self) -> Result<&mut Conn> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let (client, conflicts) =
                super::pg_watch::connect(&self.inbox.inner.config, &self.inbox.inner.shown).await?;
            let (rows, one, check) = tokio::try_join!(
                client.prepare(INSERT_ROWS),
                client.prepare(INSERT_ONE),
                client.prepare(CHECK)
            )
            .map_err(|e| pg_error("preparing the inbox statements", e))?;
            self.conn = Some(Conn {
                client,
                conflicts,
                rows,
                one,
                check,
            });
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    async fn batch(&mut self, jobs: Vec<Job>) {
        let handler = self.handler.clone();
        let retries = self.retries.clone();
        let shown = self.inbox.inner.shown.clone();
        let turns = self.turns.clone();
        let mut held = match turns.taking() {
            true => Some(turns.turn.lock().await),
            false => None,
        };
        let lane = Conflicts {
            retries: &retries,
            turns: &turns,
        };
        let r = match self.connection().await {
            Ok(conn) => match apply(&*handler, conn, &jobs, &lane, &mut held).await {
                // The connection went away while a handler ran: a Retry or DeadLetter may be
                // the outage's doing, not the message's. Held and tried again.
                Ok(_) if conn.client.is_closed() => Err(Error::new(
                    ErrorKind::Transport,
                    format!("PostgreSQL {shown}: the connection was lost during the transaction"),
                )),
                r => r,
            },
            Err(e) => Err(e),
        };
        drop(held);
        match r {
            Ok(results) => {
                if let Some(c) = &self.conn {
                    self.inbox.maybe_purge(&c.client).await;
                }
                for (j, res) in jobs.into_iter().zip(results) {
                    let _ = j.reply.send(res);
                }
            }
            Err(e) => {
                for j in jobs {
                    let _ = j
                        .reply
                        .send(JobResult::Failed(Error::new(e.kind(), e.message())));
                }
            }
        }
    }
}

/// Applies a batch: together first, then (after a handler's failure) the others a savepoint
/// each. A conflict (a deadlock or serialization failure, [`super::pg_watch`]) rolls the
/// transaction back and goes again: the batch together once more, then one message per
/// transaction, each until it goes through — no outcome of an aborted attempt counts.
async fn apply<'a>(
    handler: &dyn PgHandler,
    conn: &mut Conn,
    jobs: &[Job],
    lane: &Conflicts<'a>,
    held: &mut Option<tokio::sync::MutexGuard<'a, ()>>,
) -> Result<Vec<JobResult>> {
    for attempt in 1..=2 {
        let (at, failed) = match together(handler, conn, jobs).await? {
            Together::Committed(out) => return Ok(out),
            Together::Conflict => {
                lane.hit(held).await;
                tracing::debug!(
                    attempt,
                    messages = jobs.len(),
                    "inbox: a deadlock or serialization failure aborted the lane's transaction; rolled back, applying again"
                );
                continue;
            }
            Together::Redo(Some((at, failed))) => (Some(at), Some(failed)),
            Together::Redo(None) => (None, None),
        };
        let others: Vec<&Job> = (0..jobs.len())
            .filter(|i| Some(*i) != at)
            .map(|i| &jobs[i])
            .collect();
        let mut out = match each_in_savepoint(handler, conn, &others).await? {
            Some(out) => out,
            None => {
                lane.hit(held).await;
                one_by_one(handler, conn, &others, lane, held).await?
            }
        };
        if let (Some(at), Some(failed)) = (at, failed) {
            out.insert(at, failed);
        }
        return Ok(out);
    }
    let all: Vec<&Job> = jobs.iter().collect();
    one_by_one(handler, conn, &all, lane, held).await
}

/// What a conflict does to a lane: counted, and the consumer's lanes take turns ([`Turns`]).
struct Conflicts<'a> {
    retries: &'a Counter,
    turns: &'a Turns,
}

impl<'a> Conflicts<'a> {
    async fn hit(&self, held: &mut Option<tokio::sync::MutexGuard<'a, ()>>) {
        self.retries.inc();
        self.turns.conflict(held).await;
    }
}

/// How many conflicts in a row one message's own transaction may meet before the lane gives
/// it back as a database error (the message is held and tried again by the inbox handler).
const MAX_CONFLICTS: u32 = 50;

/// Each message in a transaction of its own (with its savepoint), again after a conflict
/// (after a short pause that grows: the other transaction of a deadlock went through).
async fn one_by_one<'a>(
    handler: &dyn PgHandler,
    conn: &mut Conn,
    jobs: &[&Job],
    lane: &Conflicts<'a>,
    held: &mut Option<tokio::sync::MutexGuard<'a, ()>>,
) -> Result<Vec<JobResult>> {
    let mut out = Vec::with_capacity(jobs.len());
    for j in jobs {
        let mut tries = 0u32;
        loop {
            if let Some(mut r) = each_in_savepoint(handler, conn, std::slice::from_ref(j)).await? {
                out.push(r.pop().expect("one result per message"));
                break;
            }
            lane.hit(held).await;
            tries += 1;
            if tries >= MAX_CONFLICTS {
                out.push(JobResult::Failed(Error::new(
                    ErrorKind::Transport,
                    format!(
                        "inbox: message {} met {tries} deadlocks or serialization failures in a row",
                        j.row.message_id
                    ),
                )));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5 * u64::from(tries.min(20)))).await;
        }
    }
    Ok(out)
}

/// Whether a conflict hit the connection since the count was `base`.
fn conflicted(conn_conflicts: &AtomicU64, base: u64) -> bool {
    conn_conflicts.load(Ordering::SeqCst) > base
}

/// The batch in one transaction without savepoints (see [`Lane`]).
async fn together(handler: &dyn PgHandler, conn: &mut Conn, jobs: &[Job]) -> Result<Together> {
    use futures::FutureExt;
    let Conn {
        client,
        conflicts,
        rows,
        check,
        ..
    } = conn;
    let base = conflicts.load(Ordering::SeqCst);
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error("begin", e))?;
    let mut order: Vec<&Job> = jobs.iter().collect();
    order.sort_unstable_by(|a, b| a.row.message_id.cmp(&b.row.message_id));
    let consumers: Vec<&str> = order.iter().map(|j| j.consumer.as_str()).collect();
    let ids: Vec<&str> = order.iter().map(|j| j.row.message_id.as_str()).collect();
    let domains: Vec<&str> = order.iter().map(|j| j.row.domain).collect();
    let keys: Vec<Option<&str>> = order.iter().map(|j| j.row.dedupe_key.as_deref()).collect();
    let topics: Vec<&str> = order.iter().map(|j| j.row.topic.as_str()).collect();
    let inserted = match tx
        .query(&*rows, &[&consumers, &ids, &domains, &keys, &topics])
        .await
    {
        Ok(rows) => rows,
        Err(e) if is_conflict(&e) => {
            tx.rollback().await.map_err(|e| pg_error("rollback", e))?;
            return Ok(Together::Conflict);
        }
        Err(e) => return Err(pg_error("inserting the inbox rows", e)),
    };
    let fresh: std::collections::HashSet<&str> = inserted.iter().map(|r| r.get(0)).collect();
    let mut out = Vec::with_capacity(jobs.len());
    for (i, j) in jobs.iter().enumerate() {
        if !fresh.contains(j.row.message_id.as_str()) {
            out.push(JobResult::Done(Attempted::Skipped));
            continue;
        }
        let failed = match std::panic::AssertUnwindSafe(handler.handle(&j.msg, &tx))
            .catch_unwind()
            .await
        {
            Ok(Outcome::Ok) => {
                out.push(JobResult::Done(Attempted::Handled(Outcome::Ok)));
                continue;
            }
            Ok(other) => JobResult::Done(Attempted::Handled(other)),
            Err(panic) => JobResult::Panicked(panic),
        };
        tx.rollback().await.map_err(|e| pg_error("rollback", e))?;
        // A handler that fails after a deadlock or serialization failure (its own statement's
        // or an earlier handler's, which left the transaction aborted) failed because of it.
        if conflicted(conflicts, base) {
            return Ok(Together::Conflict);
        }
        return Ok(Together::Redo(Some((i, failed))));
    }
    if !fresh.is_empty() {
        match tx.query(&*check, &[]).await {
            Ok(_) => {}
            Err(e) if e.as_db_error().is_some() => {
                tx.rollback().await.map_err(|e| pg_error("rollback", e))?;
                if conflicted(conflicts, base) {
                    return Ok(Together::Conflict);
                }
                tracing::warn!(error = %e,
                    "inbox: a handler returned Ok after a failed statement; the batch goes again a savepoint each");
                return Ok(Together::Redo(None));
            }
            Err(e) => return Err(pg_error("checking the transaction", e)),
        }
    }
    crash_point(CRASH_BEFORE_COMMIT);
    match tx.commit().await {
        Ok(()) => {}
        // A serialization failure at commit (serializable isolation): nothing committed.
        Err(e) if is_conflict(&e) => return Ok(Together::Conflict),
        Err(e) => return Err(pg_error("commit", e)),
    }
    crash_point(CRASH_BEFORE_ACK);
    Ok(Together::Committed(out))
}

/// The transaction with a savepoint per message: the savepoint, the inbox row, the handler;
/// released when the handler said Ok, rolled back to otherwise; then one commit. `None`: a
/// conflict aborted the transaction (rolled back; nothing of it counts).
async fn each_in_savepoint(
    handler: &dyn PgHandler,
    conn: &mut Conn,
    jobs: &[&Job],
) -> Result<Option<Vec<JobResult>>> {
    use futures::FutureExt;
    let Conn {
        client,
        conflicts,
        one,
        ..
    } = conn;
    let base = conflicts.load(Ordering::SeqCst);
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error("begin", e))?;
    // Ends the transaction after a conflict.
    macro_rules! conflict {
        () => {{
            tx.rollback().await.map_err(|e| pg_error("rollback", e))?;
            return Ok(None);
        }};
    }
    let mut out = Vec::with_capacity(jobs.len());
    for j in jobs {
        let row = &j.row;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &j.consumer,
            &row.message_id,
            &row.domain,
            &row.dedupe_key,
            &row.topic,
        ];
        // Sent together: one round trip for the savepoint and the row.
        let (sp, inserted) = tokio::join!(
            tx.batch_execute("SAVEPOINT ampybus_msg"),
            tx.execute(&*one, &params)
        );
        sp.map_err(|e| pg_error("savepoint", e))?;
        let inserted = match inserted {
            Ok(n) => n,
            Err(e) if is_conflict(&e) => conflict!(),
            Err(e) => return Err(pg_error("inserting the inbox row", e)),
        };
        if inserted == 0 {
            tx.batch_execute("RELEASE SAVEPOINT ampybus_msg")
                .await
                .map_err(|e| pg_error("release savepoint", e))?;
            out.push(JobResult::Done(Attempted::Skipped));
            continue;
        }
        let handled = std::panic::AssertUnwindSafe(handler.handle(&j.msg, &tx))
            .catch_unwind()
            .await;
        let res = match handled {
            Ok(Outcome::Ok) => match tx.batch_execute("RELEASE SAVEPOINT ampybus_msg").await {
                Ok(()) => JobResult::Done(Attempted::Handled(Outcome::Ok)),
                Err(_) if conflicted(conflicts, base) => conflict!(),
                // A statement of the handler failed and it said Ok anyway: nothing of it
                // can commit; tried again as a retry.
                Err(e) if e.as_db_error().is_some() => {
                    tracing::warn!(error = %e, message_id = %row.message_id,
                        "inbox: the handler returned Ok after a failed statement; rolled back, retrying");
                    roll_back(&tx).await?;
                    JobResult::Done(Attempted::Handled(Outcome::Retry { after: None }))
                }
                Err(e) => return Err(pg_error("release savepoint", e)),
            },
            _ if conflicted(conflicts, base) => conflict!(),
            Ok(other) => {
                roll_back(&tx).await?;
                JobResult::Done(Attempted::Handled(other))
            }
            Err(panic) => {
                roll_back(&tx).await?;
                JobResult::Panicked(panic)
            }
        };
        out.push(res);
    }
    crash_point(CRASH_BEFORE_COMMIT);
    match tx.commit().await {
        Ok(()) => {}
        Err(e) if is_conflict(&e) => return Ok(None),
        Err(e) => return Err(pg_error("commit", e)),
    }
    crash_point(CRASH_BEFORE_ACK);
    Ok(Some(out))
}

async fn roll_back(tx: &Transaction<'_>) -> Result<()> {
    tx.batch_execute("ROLLBACK TO SAVEPOINT ampybus_msg; RELEASE SAVEPOINT ampybus_msg")
        .await
        .map_err(|e| pg_error("rollback to savepoint", e))
}

/// Stages messages into `ampybus.outbox`, inside the application's transaction.
///
/// ```no_run
/// # async fn f(inbox: ampybus::inbox::pg::PgInbox) -> ampybus::Result<()> {
/// use ampybus::inbox::pg::PgOutbox;
/// use ampybus::{Headers, Topic};
/// let mut client = inbox.client().await?;
/// let tx = client.transaction().await.unwrap();
/// let topic = Topic::parse("ampy.prod.orders.v1.new")?;
/// let h = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
/// let id = PgOutbox.stage(&tx, &topic, h, b"order".to_vec()).await?;
/// tx.commit().await.unwrap();
/// println!("will publish {id}");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct PgOutbox;

/// The class id of the relay's session lock.
const RELAY_LOCK_CLASS: i32 = 0x7265_6c79; // "rely"

impl PgOutbox {
    /// Stages one message in `tx`: fills every publish default, checks the headers as a
    /// publish would, takes the key's next `seq` under a per-key advisory transaction lock
    /// (held until `tx` ends, so a key's rows commit in `seq` order), and returns the final
    /// `message_id`. Published after the commit by the database's [`OutboxRelay`].
    pub async fn stage(
        &self,
        tx: &Transaction<'_>,
        topic: &Topic,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<String> {
        let s = prepare_stage(topic, headers, payload.into())?;
        tx.execute(STAGE_LOCK_SQL, &[&STAGE_LOCK_CLASS, &s.key])
            .await
            .map_err(|e| pg_error("locking the partition key for staging", e))?;
        tx.execute(
            OUTBOX_INSERT_SQL,
            &[
                &s.message_id,
                &s.topic,
                &s.key,
                &s.headers,
                &s.payload.as_ref(),
            ],
        )
        .await
        .map_err(|e| pg_error("staging into ampybus.outbox", e))?;
        Ok(s.message_id)
    }
}

/// The relay's side of `ampybus.outbox`.
struct PgRelayStore {
    inbox: PgInbox,
    table: String,
    /// The session holding the relay's advisory lock.
    lock: tokio::sync::Mutex<Option<Client>>,
    work: tokio::sync::Mutex<Option<Client>>,
}

impl PgRelayStore {
    async fn work(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut g = self.work.lock().await;
        if g.as_ref().is_none_or(|c| c.is_closed()) {
            *g = Some(connect(&self.inbox.inner.config, &self.inbox.inner.shown).await?);
        }
        Ok(g)
    }
}

#[async_trait]
impl RelayStore for PgRelayStore {
    fn table(&self) -> &str {
        &self.table
    }

    async fn try_lock(&self) -> Result<bool> {
        let mut g = self.lock.lock().await;
        if g.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(true);
        }
        *g = None;
        let c = connect(&self.inbox.inner.config, &self.inbox.inner.shown).await?;
        let got: bool = c
            .query_one("SELECT pg_try_advisory_lock($1, 0)", &[&RELAY_LOCK_CLASS])
            .await
            .map_err(|e| pg_error("taking the relay lock", e))?
            .get(0);
        if got {
            *g = Some(c);
        }
        Ok(got)
    }

    async fn unsent(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let g = self.work().await?;
        let c = g.as_ref().expect("connected");
        let rows = c
            .query(
                "SELECT id, topic, headers, payload FROM ampybus.outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1",
                &[&(limit as i64)],
            )
            .await
            .map_err(|e| pg_error("reading unsent rows", e))?;
        Ok(rows
            .into_iter()
            .map(|r| OutboxRow {
                id: r.get(0),
                topic: r.get(1),
                headers: r.get(2),
                payload: r.get(3),
            })
            .collect())
    }

    async fn mark_sent(&self, ids: &[i64]) -> Result<()> {
        let g = self.work().await?;
        g.as_ref()
            .expect("connected")
            .execute(
                "UPDATE ampybus.outbox SET sent_at = now() WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .map(|_| ())
            .map_err(|e| pg_error("marking rows sent", e))
    }

    async fn mark_dead_lettered(&self, id: i64, reason: &str) -> Result<()> {
        let g = self.work().await?;
        g.as_ref()
            .expect("connected")
            .execute(
                "UPDATE ampybus.outbox SET sent_at = now(), dlq_reason = $2 WHERE id = $1",
                &[&id, &reason],
            )
            .await
            .map(|_| ())
            .map_err(|e| pg_error("marking a row dead-lettered", e))
    }

    async fn purge_sent(&self, older_than: Duration) -> Result<u64> {
        let g = self.work().await?;
        g.as_ref()
            .expect("connected")
            .execute(
                "DELETE FROM ampybus.outbox WHERE sent_at < now() - make_interval(secs => $1)",
                &[&older_than.as_secs_f64()],
            )
            .await
            .map_err(|e| pg_error("purging sent rows", e))
    }

    async fn depth(&self) -> Result<(i64, f64)> {
        let g = self.work().await?;
        let r = g
            .as_ref()
            .expect("connected")
            .query_one(
                "SELECT count(*), coalesce(extract(epoch FROM now() - min(staged_at)), 0)::float8
                 FROM ampybus.outbox WHERE sent_at IS NULL",
                &[],
            )
            .await
            .map_err(|e| pg_error("counting unsent rows", e))?;
        Ok((r.get(0), r.get(1)))
    }
}
