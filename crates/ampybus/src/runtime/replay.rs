//! Replaying a stored time window through a handler, with the consumer's dedupe semantics.
//!
//! [`replay_window`] pages through [`Bus::replay`] and runs each stored message through the
//! same steps as a consumer delivery: topic parse and [`Headers::normalize_for_consume`],
//! payload decode ([`Bus::decode_payload`]: blob fetched and verified, gzip inflated), the
//! dedupe check (skipped when its `message_id` or `{domain}:{dedupe_key}` was applied by this
//! consumer name), the handler, and the dedupe record after [`Outcome::Ok`]. Nothing is
//! retried and nothing is dead-lettered: a message that fails to prepare, whose handler asks
//! to retry or to dead-letter, or that panics, is counted in [`ReplayReport::failed`].
//!
//! [`Headers::normalize_for_consume`]: crate::Headers::normalize_for_consume

use super::{Handler, Message, Outcome};
use crate::bus::Bus;
use crate::dedupe::{DedupeStore, dedupe_keys};
use crate::error::{Error, ErrorKind, Result};
use crate::topic::Topic;
use crate::transport::{DeliveryInfo, WindowQuery};
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

/// What a [`replay_window`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Stored messages read in the window.
    pub read: u64,
    /// Handled with [`Outcome::Ok`] (and recorded for dedupe).
    pub applied: u64,
    /// Skipped: already applied by this consumer name.
    pub skipped_duplicates: u64,
    /// Could not be prepared, or the handler did not return `Ok` (not retried).
    pub failed: u64,
    /// Sequence of the first message read.
    pub first_id: Option<u64>,
    /// Sequence of the last message read.
    pub last_id: Option<u64>,
    /// `message_id` of the first message read.
    pub first_message_id: Option<String>,
    /// `message_id` of the last message read.
    pub last_message_id: Option<String>,
}

/// Replays `query` through `handler` as consumer `consumer`, paging by cursor
/// ([`crate::transport::ReplayByTime::read_page`]; `query.limit` per page, 1,000 when 0). Fails with [`ErrorKind::Config`] when the bus's
/// transport cannot read by time window.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
/// use ampybus::runtime::replay::replay_window;
/// use ampybus::runtime::{Handler, Outcome, handler_fn};
/// use ampybus::transport::WindowQuery;
/// use ampybus::{Bus, Headers, Topic, TopicPattern};
/// use std::sync::Arc;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
/// for i in 0..5 {
///     let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
///     let body = if i == 4 { b"bad".to_vec() } else { b"ok".to_vec() };
///     bus.publish(&topic, h, body).await.unwrap();
/// }
/// let handler: Arc<dyn Handler> = Arc::new(handler_fn(|m| async move {
///     if &m.payload[..] == b"ok" { Outcome::Ok } else { Outcome::DeadLetter("bad".into()) }
/// }));
/// let store: Arc<dyn DedupeStore> =
///     Arc::new(SqliteDedupeStore::open(dir.path().join("replay.sqlite3")).unwrap());
/// let q = WindowQuery { limit: 2, ..WindowQuery::new(TopicPattern::parse("ampy.dev.news.>").unwrap()) };
/// let first = replay_window(&bus, q.clone(), handler.clone(), store.clone(), "r").await.unwrap();
/// assert_eq!((first.read, first.applied, first.skipped_duplicates, first.failed), (5, 4, 0, 1));
/// assert!(first.first_id.unwrap() < first.last_id.unwrap());
/// let again = replay_window(&bus, q, handler, store, "r").await.unwrap();
/// assert_eq!((again.read, again.applied, again.skipped_duplicates, again.failed), (5, 0, 4, 1));
/// # });
/// ```
pub async fn replay_window(
    bus: &Bus,
    query: WindowQuery,
    handler: Arc<dyn Handler>,
    dedupe: Arc<dyn DedupeStore>,
    consumer: &str,
) -> Result<ReplayReport> {
    replay_window_with_progress(bus, query, handler, dedupe, consumer, &mut |_| {}).await
}

/// [`replay_window`], calling `progress` with the counts so far after each page.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
/// use ampybus::runtime::replay::replay_window_with_progress;
/// use ampybus::runtime::{Handler, Outcome, handler_fn};
/// use ampybus::transport::WindowQuery;
/// use ampybus::{Bus, Headers, Topic, TopicPattern};
/// use std::sync::Arc;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
/// for _ in 0..5 {
///     bus.publish(&topic, Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k"), b"x".to_vec())
///         .await.unwrap();
/// }
/// let handler: Arc<dyn Handler> = Arc::new(handler_fn(|_m| async { Outcome::Ok }));
/// let store: Arc<dyn DedupeStore> =
///     Arc::new(SqliteDedupeStore::open(dir.path().join("d.sqlite3")).unwrap());
/// let q = WindowQuery { limit: 2, ..WindowQuery::new(TopicPattern::parse("ampy.dev.news.>").unwrap()) };
/// let mut pages = Vec::new();
/// let r = replay_window_with_progress(&bus, q, handler, store, "r", &mut |p| pages.push(p.read))
///     .await
///     .unwrap();
/// assert_eq!(pages, vec![2, 4, 5]);
/// assert_eq!(r.applied, 5);
/// assert!(r.first_message_id.is_some() && r.first_message_id != r.last_message_id);
/// # });
/// ```
pub async fn replay_window_with_progress(
    bus: &Bus,
    query: WindowQuery,
    handler: Arc<dyn Handler>,
    dedupe: Arc<dyn DedupeStore>,
    consumer: &str,
    progress: &mut (dyn FnMut(&ReplayReport) + Send),
) -> Result<ReplayReport> {
    let Some(reader) = bus.replay() else {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "replay: transport `{}` cannot read stored messages by time window",
                bus.transport().name()
            ),
        ));
    };
    let mut query = query;
    if query.limit == 0 {
        query.limit = 1000;
    }
    let mut report = ReplayReport::default();
    loop {
        let page = reader.read_page(&query).await?;
        if page.messages.is_empty() {
            break;
        }
        query.cursor = Some(page.next);
        for stored in page.messages {
            report.read += 1;
            report.first_id.get_or_insert(stored.sequence);
            report.last_id = Some(stored.sequence);
            let id = stored.envelope.headers.message_id().map(str::to_owned);
            if report.first_message_id.is_none() {
                report.first_message_id = id.clone();
            }
            report.last_message_id = id;
            let Ok(topic) = Topic::parse(&stored.envelope.topic) else {
                report.failed += 1;
                continue;
            };
            let mut headers = stored.envelope.headers.clone();
            if headers.normalize_for_consume().is_err() {
                report.failed += 1;
                continue;
            }
            let payload = match bus.decode_payload(&stored.envelope).await {
                Ok(p) => p,
                Err(_) => {
                    report.failed += 1;
                    continue;
                }
            };
            let msg = Message {
                topic,
                headers,
                payload,
                info: DeliveryInfo {
                    sequence: stored.sequence,
                    delivery_count: 1,
                    stored_at: stored.stored_at,
                },
            };
            let keys = dedupe_keys(&msg.headers, msg.topic.domain());
            if !keys.is_empty() && dedupe.is_applied(consumer, &keys).await? {
                report.skipped_duplicates += 1;
                continue;
            }
            let outcome = AssertUnwindSafe(handler.handle(&msg)).catch_unwind().await;
            match outcome {
                Ok(Outcome::Ok) => {
                    if !keys.is_empty() {
                        dedupe.record_applied(consumer, &keys).await?;
                    }
                    report.applied += 1;
                }
                _ => {
                    if !keys.is_empty() {
                        dedupe.abandon(consumer, &keys).await?;
                    }
                    report.failed += 1;
                }
            }
        }
        progress(&report);
    }
    Ok(report)
}
