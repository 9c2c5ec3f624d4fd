//! Exactly-once effects: a transactional inbox and a transactional outbox (issue 21), on
//! PostgreSQL (cargo feature `inbox-postgres`, module [`pg`]) and SQLite (feature
//! `inbox-sqlite`, module [`sqlite`]).
//!
//! **Inbox.** A consumer built with [`crate::runtime::ConsumerBuilder::inbox`] uses the inbox
//! instead of its dedupe store (also for replays). For each message the runtime opens a
//! transaction on the application's database, inserts the message's inbox row (`consumer`,
//! `message_id`, `domain`, `dedupe_key`, `topic`, `applied_at`; unique on
//! `(consumer, message_id)` and on `(consumer, domain, dedupe_key)` when a dedupe key is
//! present), hands the open transaction to the handler with the message, commits when the
//! handler returned [`Outcome::Ok`], and only then acks (on PostgreSQL the messages in flight
//! together — up to 64 per transaction, 4 transactions at once — share one transaction, their
//! inbox rows inserted by one statement, and none is acked before that commit: one WAL flush
//! for many messages; see [`pg`] for what a failing handler does to the others). An insert that
//! hits either unique key
//! means the message was applied: the handler is not called, the message is acked and counted
//! in `bus_inbox_skipped_total{consumer}`. A `Retry` or `DeadLetter` outcome, an error or a
//! panic rolls the transaction back. A concurrent duplicate waits on the unique key and is
//! skipped once the first commits. While the database is unreachable (the connection is lost
//! before the commit, or the commit fails) the message is held, not acked, and tried again
//! until the database answers; a commit whose answer was lost is found by the retry's insert,
//! so nothing is applied twice. Inbox rows expire after [`DEFAULT_RETENTION`] (7 days;
//! `with_retention`): a copy of a message delivered later than that is applied again.
//!
//! **Outbox.** Inside any transaction on the same database the application stages messages
//! ([`pg::PgOutbox::stage`], [`sqlite::SqliteOutbox::stage`]): each row gets its final
//! `message_id` (and every other publish default) at staging, and a per-partition-key `seq`
//! taken under a per-key lock (an advisory transaction lock on PostgreSQL; SQLite serialises
//! writers), so a key's rows commit in `seq` order. [`OutboxRelay`] publishes committed rows
//! in that order, marks them sent, retries unconfirmed ones with the same ids, and moves a row
//! the bus refuses for good (a bad header, a permission) to the DLQ with its reason. One relay
//! per outbox table is active at a time (a session advisory lock on PostgreSQL, a `flock` next
//! to the SQLite file); others wait as standbys. Sent rows are purged after
//! [`DEFAULT_SENT_RETENTION`] (1 day). Metrics: `bus_outbox_depth{table}`,
//! `bus_outbox_age_seconds{table}`.
//!
//! **Tables.** PostgreSQL: `ampybus.inbox` and `ampybus.outbox` in the archive's schema and
//! under its version table (`ampybus.schema_version`, version 2; see
//! [`crate::archive::SCHEMA_VERSION`]). SQLite: `ampybus_inbox`, `ampybus_outbox` and
//! `ampybus_schema_version` in the application's own file. Both are created and migrated on
//! first use; a database at a newer version is a Config error naming both versions.
//!
//! **What is promised.** The effects a handler writes through the transaction it is given, and
//! the messages it stages there, happen once per `message_id` (and per dedupe key) within the
//! retention, whatever crashes — on every transport, since the guarantee is the consumer's
//! database's, not the broker's. Effects outside the transaction (an HTTP call, a file) are
//! at-least-once as before. The relay publishes at least once; a staged message keeps its
//! `message_id`, so a consumer with an inbox (or dedupe) applies it once.

#[cfg(feature = "inbox-postgres")]
pub mod pg;
#[cfg(feature = "inbox-postgres")]
mod pg_watch;
mod relay;
#[cfg(feature = "inbox-sqlite")]
pub mod sqlite;

pub use crate::runtime::InboxBinding;
pub use relay::{OutboxRelay, RelayOptions, RelayStats};

use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::obs::BusMetrics;
use crate::runtime::{Handler, Message, Outcome};
use crate::topic::Topic;
use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use std::time::Duration;

/// How long inbox rows are kept (and count) by default: 7 days.
///
/// ```
/// assert_eq!(ampybus::inbox::DEFAULT_RETENTION.as_secs(), 7 * 24 * 3600);
/// ```
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long sent outbox rows are kept by default: 1 day.
///
/// ```
/// assert_eq!(ampybus::inbox::DEFAULT_SENT_RETENTION.as_secs(), 24 * 3600);
/// ```
pub const DEFAULT_SENT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The named crash points of the test-only hook (see [`crash_point`]).
///
/// ```
/// assert_eq!(ampybus::inbox::CRASH_POINTS.len(), 4);
/// ```
pub const CRASH_POINTS: [&str; 4] = [
    CRASH_BEFORE_COMMIT,
    CRASH_BEFORE_ACK,
    CRASH_BEFORE_PUBLISH,
    CRASH_BEFORE_MARK,
];
/// Inbox: the handler's effects are written, the transaction is not committed.
pub const CRASH_BEFORE_COMMIT: &str = "inbox_before_commit";
/// Inbox: committed, not acked.
pub const CRASH_BEFORE_ACK: &str = "inbox_before_ack";
/// Relay: rows staged and read, not published.
pub const CRASH_BEFORE_PUBLISH: &str = "relay_before_publish";
/// Relay: published, not marked sent.
pub const CRASH_BEFORE_MARK: &str = "relay_before_mark";

/// A test-only crash point. With cargo feature `crash-hooks` and `AMPYBUS_CRASH_AT=name` (or
/// `name@n`: the n-th time this process reaches it), the process kills itself with SIGKILL
/// here; without the feature this does nothing and reads nothing.
///
/// ```
/// ampybus::inbox::crash_point("not_armed"); // returns: no hook armed for this name
/// ```
pub fn crash_point(name: &str) {
    #[cfg(feature = "crash-hooks")]
    hooks::hit(name);
    #[cfg(not(feature = "crash-hooks"))]
    let _ = name;
}

#[cfg(feature = "crash-hooks")]
mod hooks {
    use std::sync::atomic::{AtomicU64, Ordering};

    static HITS: AtomicU64 = AtomicU64::new(0);

    pub(super) fn hit(name: &str) {
        let Ok(spec) = std::env::var("AMPYBUS_CRASH_AT") else {
            return;
        };
        let (point, nth) = match spec.split_once('@') {
            Some((p, n)) => (p.to_owned(), n.parse::<u64>().unwrap_or(1)),
            None => (spec.clone(), 1),
        };
        if point != name {
            return;
        }
        if HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
            eprintln!("ampybus crash hook: SIGKILL at {name} (hit {nth})");
            // SAFETY: kill(2) on this process's own pid.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

/// Counters of the consumers bound to one inbox handle, by consumer name (the
/// `bus_inbox_skipped_total` ones; on PostgreSQL also `bus_inbox_conflict_retries_total`),
/// each counter once: binding the inbox to a consumer name twice on one bus (a service's
/// consumer and a handler kept to hand messages to it again) shares its counter.
#[derive(Default)]
pub(crate) struct Skips(std::sync::Mutex<Vec<(String, usize, Counter)>>);

impl Skips {
    /// Skips counted for consumers named `consumer`.
    pub(crate) fn total(&self, consumer: &str) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(c, _, _)| c == consumer)
            .map(|(_, _, n)| n.get())
            .sum()
    }

    /// Counts `counter` (of `metrics`' families) under consumer `consumer` too, unless it is
    /// counted already.
    pub(crate) fn track(&self, consumer: &str, metrics: &BusMetrics, counter: Counter) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let id = metrics.id();
        if !all.iter().any(|(c, m, _)| c == consumer && *m == id) {
            all.push((consumer.to_owned(), id, counter));
        }
    }

    /// The runtime handler of consumer `consumer` over `store`, its skips counted here and in
    /// `metrics`.
    pub(crate) fn bind<A: InboxAttempt>(
        &self,
        store: A,
        consumer: &str,
        metrics: &BusMetrics,
    ) -> Arc<dyn Handler> {
        let skipped = metrics.inbox_skipped(consumer);
        self.track(consumer, metrics, skipped.clone());
        Arc::new(InboxHandler {
            store,
            consumer: consumer.to_owned(),
            skipped,
        })
    }
}

/// The inbox row of a message (all but `applied_at`, which the database sets): what the
/// inbox inserts, and what an inbox outside this crate (the Python SDK's) must insert too.
///
/// ```
/// use ampybus::inbox::InboxRow;
/// use ampybus::runtime::Message;
/// use ampybus::{Headers, Topic, transport::DeliveryInfo};
/// let mut headers = Headers::for_publish("ampy.fills.v1.Fill", "oms@1", "oms", "acct|co_1");
/// headers.fill_publish_defaults();
/// let msg = Message {
///     topic: Topic::parse("ampy.dev.fills.v1.sim").unwrap(),
///     headers,
///     payload: bytes::Bytes::new(),
///     info: DeliveryInfo { sequence: 1, delivery_count: 1, stored_at: chrono::Utc::now() },
/// };
/// let row = InboxRow::of(&msg).unwrap();
/// assert_eq!(row.domain, "fills");
/// assert_eq!(row.topic, "ampy.dev.fills.v1.sim");
/// assert_eq!(row.dedupe_key, None);
/// ```
#[derive(Debug, Clone)]
pub struct InboxRow {
    /// The message's `message_id` (unique per consumer).
    pub message_id: String,
    /// The topic's domain (`fills`, `orders`, …): a `dedupe_key` is unique per consumer and
    /// domain.
    pub domain: &'static str,
    /// The message's `dedupe_key`, if any.
    pub dedupe_key: Option<String>,
    /// The concrete topic.
    pub topic: String,
}

impl InboxRow {
    /// The row of `msg`; `None` when it has no `message_id` (the inbox dead-letters it as a
    /// `contract_violation`).
    pub fn of(msg: &Message) -> Option<InboxRow> {
        Some(InboxRow {
            message_id: msg.headers.message_id()?.to_owned(),
            domain: msg.topic.domain().as_str(),
            dedupe_key: msg.headers.dedupe_key().map(str::to_owned),
            topic: msg.topic.as_str().to_owned(),
        })
    }
}

/// What one inbox attempt did.
pub(crate) enum Attempted {
    /// The row was there: applied before.
    Skipped,
    /// The handler ran; its effects are committed when this is `Outcome::Ok`, rolled back
    /// otherwise.
    Handled(Outcome),
}

/// One database's inbox: one attempt = begin, insert the row, run the handler, commit on Ok.
/// An `Err` means the database did not answer (or lost the transaction): nothing was
/// committed, or the commit's fate is unknown — the next attempt's insert tells.
#[async_trait]
pub(crate) trait InboxAttempt: Send + Sync + 'static {
    async fn attempt(&self, consumer: &str, row: &InboxRow, msg: &Message) -> Result<Attempted>;
}

/// The runtime handler of an inbox consumer: attempts until the database answers.
pub(crate) struct InboxHandler<A> {
    pub(crate) store: A,
    pub(crate) consumer: String,
    pub(crate) skipped: Counter,
}

/// Longest pause between attempts while the database is away.
const MAX_PAUSE: Duration = Duration::from_secs(2);

#[async_trait]
impl<A: InboxAttempt> Handler for InboxHandler<A> {
    async fn handle(&self, msg: &Message) -> Outcome {
        let Some(row) = InboxRow::of(msg) else {
            return Outcome::DeadLetter(
                "contract_violation: no message_id: the inbox keys messages by it".into(),
            );
        };
        let mut tries = 0u32;
        loop {
            match self.store.attempt(&self.consumer, &row, msg).await {
                Ok(Attempted::Skipped) => {
                    self.skipped.inc();
                    tracing::debug!(consumer = %self.consumer, message_id = %row.message_id, "inbox: applied before; skipped");
                    return Outcome::Ok;
                }
                Ok(Attempted::Handled(o)) => {
                    if tries > 0 {
                        tracing::info!(consumer = %self.consumer, tries, "inbox: the database answers again");
                    }
                    return o;
                }
                Err(e) => {
                    tries += 1;
                    let pause = pause(tries);
                    tracing::warn!(consumer = %self.consumer, message_id = %row.message_id, error = %e, tries,
                        "inbox: database unavailable; message held (not acked), trying again");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// A message ready for an outbox row: final headers (every publish default filled, checked as
/// a publish would check them, encoded as the relay decodes them), raw payload. Made by
/// [`prepare_stage`].
#[derive(Debug, Clone)]
pub struct Staged {
    /// The final `message_id` (the relay publishes with it).
    pub message_id: String,
    /// The concrete topic.
    pub topic: String,
    /// The partition key (`""` when none): the rows of a key are published in `seq` order.
    pub key: String,
    /// The headers in the compact encoding the relay decodes (the `headers` column).
    pub headers: Vec<u8>,
    /// The raw payload (the `payload` column).
    pub payload: Bytes,
}

/// Fills publish defaults (the final `message_id`), validates the headers as a publish would
/// (a bad one is a Header error naming it) and encodes them: the values of one outbox row.
/// Used by [`pg::PgOutbox::stage`], [`sqlite::SqliteOutbox::stage`] and the Python SDK's
/// outbox, which then insert them with the table's staging statement.
///
/// ```
/// use ampybus::{Headers, Topic};
/// let topic = Topic::parse("ampy.dev.orders.v1.new").unwrap();
/// let h = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
/// let s = ampybus::inbox::prepare_stage(&topic, h, b"o".to_vec().into()).unwrap();
/// assert_eq!(s.key, "co_1");
/// assert!(!s.message_id.is_empty());
/// let bad = Headers::for_publish("ampy.orders.v1.OrderRequest", "", "oms", "co_1");
/// assert!(ampybus::inbox::prepare_stage(&topic, bad, b"o".to_vec().into()).is_err());
/// ```
pub fn prepare_stage(topic: &Topic, mut headers: Headers, payload: Bytes) -> Result<Staged> {
    headers.fill_publish_defaults();
    headers.validate_for_publish(topic)?;
    let message_id = headers
        .message_id()
        .ok_or_else(|| Error::new(ErrorKind::Header, "`message_id`: missing after defaults"))?
        .to_owned();
    let key = headers.partition_key().unwrap_or_default().to_owned();
    let mut buf = Vec::with_capacity(256);
    headers.encode_compact(&mut buf);
    Ok(Staged {
        message_id,
        topic: topic.as_str().to_owned(),
        key,
        headers: buf,
        payload,
    })
}

/// A pause that grows with `tries`, at most [`MAX_PAUSE`].
pub(crate) fn pause(tries: u32) -> Duration {
    (Duration::from_millis(50) * tries.min(64)).min(MAX_PAUSE)
}
