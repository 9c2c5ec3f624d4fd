//! The transport traits: the few primitives a binding translates. Everything above them (the
//! consumer runtime, retries, DLQ, dedupe) is written once.
//!
//! * [`Transport`]: publish a batch, open a subscription, close.
//! * [`Subscription`]: fetch deliveries.
//! * [`Delivery`]: one message; settling consumes it (`ack(self)`), so a double ack does not
//!   compile.
//! * Optional capabilities are separate traits: [`ReplayByTime`], [`ConsumerLag`], [`Inspect`].
//!
//! Bindings: [`embedded`] (always), `nats` (cargo feature `nats`: NATS JetStream), `redis`
//! (cargo feature `redis`: Redis Streams), `kafka` (cargo feature `kafka`: Kafka).

pub(crate) mod dedupe_store;
pub mod embedded;
mod headers_codec;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg_attr(not(any(feature = "nats", feature = "redis")), allow(dead_code))]
mod lease;
#[cfg_attr(
    not(any(feature = "nats", feature = "redis", feature = "kafka")),
    allow(dead_code)
)]
mod multi;
#[cfg(any(feature = "redis", feature = "kafka"))]
mod naming;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
pub mod url;

pub use headers_codec::{decode_headers, encode_headers};
pub use lease::InstanceOrder;
pub use multi::{ReplayCursor, ReplayPage};

use crate::envelope::Envelope;
use crate::error::Result;
use crate::topic::TopicPattern;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::Duration;

/// What the broker or log said about one published message.
///
/// ```
/// let r = ampybus::transport::PublishReceipt { sequence: 7, duplicate: false };
/// assert_eq!(r.sequence, 7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReceipt {
    /// Position in the log/stream (sequence, offset or id-derived number).
    pub sequence: u64,
    /// The broker recognised the message id as a duplicate and did not store it again.
    pub duplicate: bool,
}

/// What became of one message of a published batch: see [`Transport::publish_batch_outcomes`].
///
/// ```
/// use ampybus::transport::{PublishOutcome, PublishReceipt};
/// let r = PublishReceipt { sequence: 3, duplicate: false };
/// assert_eq!(PublishOutcome::Confirmed(r).receipt(), Some(r));
/// assert_eq!(PublishOutcome::Unknown.receipt(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// The log or broker confirmed it: stored, or recognised as a duplicate of a stored
    /// message (`duplicate` in the receipt).
    Confirmed(PublishReceipt),
    /// Sent, and no confirmation came (the broker or the connection went away, the
    /// confirmation timed out, a commit failed half way): it may or may not be stored. Retry
    /// it with the same `message_id`; broker dedupe (NATS) or consumer dedupe catches a copy
    /// that did land.
    Unknown,
    /// Not stored: never sent, or refused by the log or broker with a definite answer.
    Unsent,
}

impl PublishOutcome {
    /// The receipt when confirmed.
    pub fn receipt(&self) -> Option<PublishReceipt> {
        match self {
            PublishOutcome::Confirmed(r) => Some(*r),
            _ => None,
        }
    }
}

/// The outcome of every message of a batch, in order, and the error that stopped the batch.
/// `error` is `None` exactly when every outcome is [`PublishOutcome::Confirmed`].
///
/// ```
/// use ampybus::transport::{BatchOutcome, PublishOutcome, PublishReceipt};
/// let ok = BatchOutcome::confirmed(vec![PublishReceipt { sequence: 1, duplicate: false }]);
/// assert_eq!(ok.counts(), (1, 0, 0));
/// assert_eq!(ok.into_result().unwrap()[0].sequence, 1);
///
/// let e = ampybus::Error::new(ampybus::ErrorKind::Transport, "broker gone");
/// let failed = BatchOutcome::all(2, PublishOutcome::Unknown, e);
/// assert_eq!(failed.counts(), (0, 2, 0));
/// assert!(failed.into_result().unwrap_err().to_string().contains("broker gone"));
/// ```
#[derive(Debug)]
pub struct BatchOutcome {
    /// One outcome per message, in batch order.
    pub outcomes: Vec<PublishOutcome>,
    /// Why some message is not confirmed (the first failure).
    pub error: Option<crate::Error>,
}

impl BatchOutcome {
    /// Every message confirmed.
    pub fn confirmed(receipts: Vec<PublishReceipt>) -> BatchOutcome {
        BatchOutcome {
            outcomes: receipts
                .into_iter()
                .map(PublishOutcome::Confirmed)
                .collect(),
            error: None,
        }
    }

    /// `n` messages, all with the same unconfirmed `outcome`, because of `error`.
    pub fn all(n: usize, outcome: PublishOutcome, error: crate::Error) -> BatchOutcome {
        BatchOutcome {
            outcomes: vec![outcome; n],
            error: Some(error),
        }
    }

    /// How many are confirmed, unknown and unsent.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for o in &self.outcomes {
            match o {
                PublishOutcome::Confirmed(_) => c.0 += 1,
                PublishOutcome::Unknown => c.1 += 1,
                PublishOutcome::Unsent => c.2 += 1,
            }
        }
        c
    }

    /// All receipts, or the error (the all-or-error form of [`Transport::publish_batch`]).
    pub fn into_result(self) -> Result<Vec<PublishReceipt>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.outcomes
            .into_iter()
            .map(|o| {
                o.receipt().ok_or_else(|| {
                    crate::Error::new(
                        crate::ErrorKind::Transport,
                        "a message of the batch was not confirmed",
                    )
                })
            })
            .collect()
    }
}

/// Where a new subscription starts.
///
/// ```
/// let s = ampybus::transport::StartAt::Earliest;
/// assert_eq!(s, ampybus::transport::StartAt::default());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// The earliest retained message (the default for a new durable consumer).
    #[default]
    Earliest,
    /// Only messages published after the subscription is created.
    Latest,
    /// The first message appended at or after this time.
    Time(DateTime<Utc>),
}

/// What to subscribe to and how.
///
/// ```
/// use ampybus::{TopicPattern, transport::SubscribeSpec};
/// let spec = SubscribeSpec::durable(TopicPattern::parse("ampy.prod.orders.>").unwrap(), "oms");
/// assert_eq!(spec.durable.as_deref(), Some("oms"));
/// ```
#[derive(Debug, Clone)]
pub struct SubscribeSpec {
    /// Which topics.
    pub pattern: TopicPattern,
    /// Durable consumer name: position and leases are shared by every instance using it.
    /// `None` reads without recording a position.
    pub durable: Option<String>,
    /// Where a new consumer starts (an existing durable consumer resumes where it was).
    pub start: StartAt,
    /// A delivery not settled within this time is delivered again.
    pub ack_deadline: Duration,
    /// The durability tier asked for (`None`: the bus decides from the pattern, see
    /// [`crate::tier`]; a transport given `None` subscribes at least once).
    /// [`crate::registry::Tier::BestEffort`] on NATS is a core subscription (see the README's
    /// tier table for the others).
    pub tier: Option<crate::registry::Tier>,
}

impl SubscribeSpec {
    /// A durable subscription starting at the earliest retained message, 30 s ack deadline.
    pub fn durable(pattern: TopicPattern, name: impl Into<String>) -> Self {
        SubscribeSpec {
            pattern,
            durable: Some(name.into()),
            start: StartAt::Earliest,
            ack_deadline: Duration::from_secs(30),
            tier: None,
        }
    }

    /// A non-durable read from `start` that records no position.
    ///
    /// ```
    /// use ampybus::{TopicPattern, transport::{SubscribeSpec, StartAt}};
    /// let spec = SubscribeSpec::ephemeral(TopicPattern::parse(">").unwrap(), StartAt::Earliest);
    /// assert!(spec.durable.is_none());
    /// ```
    pub fn ephemeral(pattern: TopicPattern, start: StartAt) -> Self {
        SubscribeSpec {
            pattern,
            durable: None,
            start,
            ack_deadline: Duration::from_secs(30),
            tier: None,
        }
    }

    /// Asks for a durability tier (a covering registry entry still wins).
    ///
    /// ```
    /// use ampybus::{TopicPattern, registry::Tier, transport::SubscribeSpec};
    /// let spec = SubscribeSpec::durable(TopicPattern::parse("ampy.prod.ticks.>").unwrap(), "md")
    ///     .with_tier(Tier::BestEffort);
    /// assert_eq!(spec.tier, Some(Tier::BestEffort));
    /// ```
    pub fn with_tier(mut self, tier: crate::registry::Tier) -> Self {
        self.tier = Some(tier);
        self
    }
}

pub use crate::registry::UnitRetention;

/// The retention of a domain's streams in a broker binding: the binding's `max_age` option
/// when set, else the domain's default (30 days for orders, fills, positions and dlq, 7 for
/// the rest); zero: unlimited.
#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
pub(crate) fn retention_for(max_age: Option<Duration>, domain: crate::topic::Domain) -> Duration {
    max_age.unwrap_or_else(|| domain.default_retention())
}

/// The retention of the streams of env + domain in a broker binding: the registry's for that
/// unit, else [`retention_for`].
#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
pub(crate) fn retention_at(
    registry: &UnitRetention,
    max_age: Option<Duration>,
    env: crate::topic::Env,
    domain: crate::topic::Domain,
) -> Duration {
    registry
        .get(&(env, domain))
        .copied()
        .unwrap_or_else(|| retention_for(max_age, domain))
}

/// Facts about one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// Position in the log/stream.
    pub sequence: u64,
    /// How many times this message has been delivered to this consumer, this one included.
    pub delivery_count: u32,
    /// When the log/broker stored the message.
    pub stored_at: DateTime<Utc>,
}

/// Settles deliveries on the transport. Implemented by bindings; used through [`Delivery`].
#[async_trait]
pub trait Settler: Send + Sync {
    /// The settler as `Any`, so a binding can recognise its own deliveries (e.g. to ack them
    /// in one transaction with its own dedupe records). Default: `None`.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// Acknowledges handled messages (by sequence) in one round trip where possible.
    async fn ack(&self, sequences: &[u64]) -> Result<()>;
    /// Releases a message for redelivery after `delay` (zero: as soon as possible).
    async fn nack(&self, sequence: u64, delay: Duration) -> Result<()>;
    /// Extends the ack deadline of a message still being worked on.
    async fn in_progress(&self, sequence: u64) -> Result<()>;
}

/// One delivered message. Settle it exactly once: [`Delivery::ack`], [`Delivery::nack`];
/// both take `self`. Dropping it unsettled leaves it to be delivered again after the ack
/// deadline.
pub struct Delivery {
    /// The message as carried (payload still compressed/pointer as on the wire).
    pub envelope: Envelope,
    /// Sequence, delivery count, store time.
    pub info: DeliveryInfo,
    /// `None`: nothing to settle (a best-effort delivery, or the runtime's placeholder). No
    /// shared settler there, so making and dropping a placeholder touches no reference count
    /// that every worker's core would contend for.
    settler: Option<Arc<dyn Settler>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.envelope.topic)
            .field("info", &self.info)
            .finish()
    }
}

/// An envelope that holds nothing (no allocation).
fn empty_envelope() -> Envelope {
    Envelope {
        topic: crate::envelope::TopicName::default(),
        headers: crate::Headers::new(),
        payload: bytes::Bytes::new(),
    }
}

impl Delivery {
    /// An empty delivery that settles nothing: what the runtime leaves in a reused slot
    /// after moving the real delivery out (no allocation).
    pub(crate) fn placeholder() -> Delivery {
        Delivery {
            envelope: empty_envelope(),
            info: DeliveryInfo {
                sequence: 0,
                delivery_count: 0,
                stored_at: DateTime::<Utc>::UNIX_EPOCH,
            },
            settler: None,
        }
    }

    /// Drops the message it carries (topic, headers, payload) here and now, keeping what
    /// settles it (sequence and settler). The runtime does this on the worker that handled
    /// the message, so that the acker — one task for the whole consumer — settles sequences
    /// and frees nothing per message.
    pub(crate) fn drop_content(&mut self) {
        self.envelope = empty_envelope();
    }

    /// A delivery of a best-effort subscription: nothing to settle, so `ack`, `nack` and
    /// `in_progress` succeed and do nothing (a nacked message is not delivered again). The
    /// one settler of every transport's best-effort deliveries.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::transport::{Delivery, DeliveryInfo};
    /// let e = ampybus::Envelope { topic: "ampy.dev.ticks.v1.quote.X".into(),
    ///     headers: ampybus::Headers::new(), payload: bytes::Bytes::new() };
    /// let info = DeliveryInfo { sequence: 1, delivery_count: 1, stored_at: chrono::Utc::now() };
    /// Delivery::best_effort(e, info).ack().await.unwrap();
    /// # });
    /// ```
    pub fn best_effort(envelope: Envelope, info: DeliveryInfo) -> Delivery {
        let mut d = Delivery::placeholder();
        d.envelope = envelope;
        d.info = info;
        d
    }

    /// Builds a delivery (for bindings).
    pub fn new(envelope: Envelope, info: DeliveryInfo, settler: Arc<dyn Settler>) -> Self {
        Delivery {
            envelope,
            info,
            settler: Some(settler),
        }
    }

    /// Acknowledges the message. On failure the delivery is handed back so the caller can
    /// retry the ack or release it.
    pub async fn ack(self) -> std::result::Result<(), (crate::Error, Delivery)> {
        let Some(settler) = &self.settler else {
            return Ok(());
        };
        match settler.ack(&[self.info.sequence]).await {
            Ok(()) => Ok(()),
            Err(e) => Err((e, self)),
        }
    }

    /// Releases the message for redelivery after `delay`.
    pub async fn nack(self, delay: Duration) -> std::result::Result<(), (crate::Error, Delivery)> {
        let Some(settler) = &self.settler else {
            return Ok(());
        };
        match settler.nack(self.info.sequence, delay).await {
            Ok(()) => Ok(()),
            Err(e) => Err((e, self)),
        }
    }

    /// The binding-side settler as `Any` (see [`Settler::as_any`]).
    pub fn settler_any(&self) -> Option<&dyn std::any::Any> {
        self.settler.as_ref().and_then(|s| s.as_any())
    }

    /// Tells the transport the handler is still working, extending the ack deadline.
    pub async fn in_progress(&self) -> Result<()> {
        match &self.settler {
            Some(s) => s.in_progress(self.info.sequence).await,
            None => Ok(()),
        }
    }

    /// Whether both are settled by one settler (or both by none).
    fn same_settler(&self, other: &Delivery) -> bool {
        match (&self.settler, &other.settler) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    /// Acknowledges many deliveries, one round trip per settler.
    pub async fn ack_all(
        deliveries: Vec<Delivery>,
    ) -> std::result::Result<(), (crate::Error, Vec<Delivery>)> {
        // Nearly always one settler (one subscription): ack in place, nothing moved.
        if let Some(first) = deliveries.first()
            && deliveries.iter().all(|d| d.same_settler(first))
        {
            let Some(settler) = first.settler.clone() else {
                return Ok(());
            };
            let seqs: Vec<u64> = deliveries.iter().map(|d| d.info.sequence).collect();
            return match settler.ack(&seqs).await {
                Ok(()) => Ok(()),
                Err(e) => Err((e, deliveries)),
            };
        }
        let mut groups: Vec<Vec<Delivery>> = Vec::new();
        for d in deliveries {
            match groups.iter_mut().find(|g| g[0].same_settler(&d)) {
                Some(g) => g.push(d),
                None => groups.push(vec![d]),
            }
        }
        let mut failed: Option<(crate::Error, Vec<Delivery>)> = None;
        for ds in groups {
            let Some(settler) = ds[0].settler.clone() else {
                continue;
            };
            let seqs: Vec<u64> = ds.iter().map(|d| d.info.sequence).collect();
            if let Err(e) = settler.ack(&seqs).await {
                match &mut failed {
                    Some((_, v)) => v.extend(ds),
                    None => failed = Some((e, ds)),
                }
            }
        }
        match failed {
            None => Ok(()),
            Some(f) => Err(f),
        }
    }
}

/// An open subscription.
#[async_trait]
pub trait Subscription: Send {
    /// Waits up to `wait` for at least one delivery and returns up to `max` (possibly none).
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>>;
}

/// A message read back from the log/stream for replay or inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Position in the log/stream.
    pub sequence: u64,
    /// When it was stored.
    pub stored_at: DateTime<Utc>,
    /// The message as carried.
    pub envelope: Envelope,
}

/// A query over stored messages: `[start, end)` by store time, a pattern, optional keys.
///
/// ```
/// use ampybus::{TopicPattern, transport::WindowQuery};
/// let q = WindowQuery::new(TopicPattern::parse("ampy.prod.bars.>").unwrap());
/// assert!(q.start.is_none() && q.keys.is_none());
/// ```
#[derive(Debug, Clone)]
pub struct WindowQuery {
    /// Which topics.
    pub pattern: TopicPattern,
    /// Inclusive lower bound on store time.
    pub start: Option<DateTime<Utc>>,
    /// Exclusive upper bound on store time.
    pub end: Option<DateTime<Utc>>,
    /// Only these partition keys.
    pub keys: Option<Vec<String>>,
    /// Only sequences greater than this (paging by the last message's `sequence`; see
    /// [`ReplayByTime::read_window`]). Ignored when `cursor` is set.
    pub after_sequence: u64,
    /// Where this page starts: the previous page's [`ReplayPage::next`] (see
    /// [`ReplayByTime::read_page`]); `None`: at the window's start (or `after_sequence`).
    pub cursor: Option<ReplayCursor>,
    /// At most this many per call.
    pub limit: usize,
}

impl WindowQuery {
    /// Everything matching `pattern`, 1,000 per page.
    pub fn new(pattern: TopicPattern) -> Self {
        WindowQuery {
            pattern,
            start: None,
            end: None,
            keys: None,
            after_sequence: 0,
            cursor: None,
            limit: 1000,
        }
    }
}

/// Reading stored history by time window and keys: the base of replay.
///
/// Page with [`ReplayByTime::read_page`] and its cursor. The older form,
/// [`ReplayByTime::read_window`] with `after_sequence` set to the last message's `sequence`,
/// also pages without loss: on a broker whose pattern spans several streams `sequence` is then
/// the store time in nanoseconds and a page never ends between two messages stored in the same
/// nanosecond (see `transport::multi`).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::transport::{ReplayByTime, Transport, WindowQuery};
/// use ampybus::transport::embedded::{EmbeddedLog, EmbeddedOptions};
/// use ampybus::{Envelope, Headers, Topic, TopicPattern};
/// let dir = tempfile::tempdir().unwrap();
/// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
/// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
/// for i in 0..3 {
///     let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
///     h.fill_publish_defaults();
///     log.publish_batch(vec![Envelope::new(&topic, h, format!("m{i}"))]).await.unwrap();
/// }
/// let mut q = WindowQuery::new(TopicPattern::parse("ampy.dev.>").unwrap());
/// q.limit = 2;
/// let mut got = Vec::new();
/// loop {
///     let page = log.read_page(&q).await.unwrap();
///     if page.messages.is_empty() { break; }
///     got.extend(page.messages.iter().map(|m| m.envelope.payload.clone()));
///     q.cursor = Some(page.next);
/// }
/// assert_eq!(got, ["m0", "m1", "m2"]);
/// # });
/// ```
#[async_trait]
pub trait ReplayByTime: Send + Sync {
    /// One page of matches in store order; an empty page means the end. Pages by
    /// `after_sequence` (or a cursor, where the reader has one sequence).
    async fn read_window(&self, query: &WindowQuery) -> Result<Vec<StoredMessage>>;

    /// One page of matches in store order and where the next one starts (put `next` in
    /// `query.cursor`); an empty page means the end. Paging by cursor never skips or repeats a
    /// message, whatever the store times of the streams a pattern spans.
    ///
    /// The default, for a reader with one sequence, reads [`ReplayByTime::read_window`] after
    /// the cursor's sequence; the broker bindings keep a position per stream.
    async fn read_page(&self, query: &WindowQuery) -> Result<ReplayPage> {
        let mut q = query.clone();
        if let Some(c) = query.cursor.as_ref() {
            q.after_sequence = c.sequence().ok_or_else(|| {
                crate::Error::new(
                    crate::ErrorKind::Config,
                    "replay: query.cursor holds per-stream positions, which this reader (one sequence) cannot resume from",
                )
            })?;
        }
        q.cursor = None;
        let messages = self.read_window(&q).await?;
        let after = messages.last().map_or(q.after_sequence, |m| m.sequence);
        Ok(ReplayPage {
            messages,
            next: ReplayCursor::after_sequence(after),
        })
    }
}

/// How far a durable consumer is behind: what [`ConsumerLag::lag`] reports.
///
/// ```
/// let lag = ampybus::transport::Lag { pending: 12, in_flight: 4 };
/// assert!(lag.pending >= lag.in_flight);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lag {
    /// Messages matching the consumer's pattern that it has not acknowledged yet (delivered
    /// or not).
    pub pending: u64,
    /// Of those, delivered and not yet acknowledged (leases held or expired, or waiting out
    /// a retry delay); a message released for redelivery now (nack without delay) is not.
    pub in_flight: u64,
}

/// Reading a durable consumer's lag: lets producers slow down low-priority topics while a
/// consumer is behind (see `runtime::Producer`).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::transport::{ConsumerLag, Lag};
/// struct Fixed;
/// #[async_trait::async_trait]
/// impl ConsumerLag for Fixed {
///     async fn lag(&self, consumer: &str) -> ampybus::Result<Option<Lag>> {
///         Ok((consumer == "audit").then_some(Lag { pending: 3, in_flight: 1 }))
///     }
/// }
/// assert_eq!(Fixed.lag("audit").await.unwrap().unwrap().pending, 3);
/// assert!(Fixed.lag("other").await.unwrap().is_none());
/// # });
/// ```
#[async_trait]
pub trait ConsumerLag: Send + Sync {
    /// The lag of the durable consumer `consumer`; `None` when no such consumer exists.
    async fn lag(&self, consumer: &str) -> Result<Option<Lag>>;
}

/// What a transport stores for one concrete topic (what `ampybus topics list` shows).
///
/// ```
/// let s = ampybus::transport::TopicStats {
///     topic: "ampy.dev.news.v1.raw".into(),
///     messages: 2,
///     bytes: Some(10),
///     oldest: None,
///     newest: None,
///     first_seq: 1,
///     last_seq: 2,
/// };
/// assert_eq!(s.messages, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicStats {
    /// The concrete topic.
    pub topic: String,
    /// Messages stored.
    pub messages: u64,
    /// Sum of the stored message sizes (headers and payload as stored); `None` where the
    /// broker does not report sizes per topic (NATS: per stream only).
    pub bytes: Option<u64>,
    /// Store time of the oldest message.
    pub oldest: Option<DateTime<Utc>>,
    /// Store time of the newest message.
    pub newest: Option<DateTime<Utc>>,
    /// Lowest sequence.
    pub first_seq: u64,
    /// Highest sequence.
    pub last_seq: u64,
}

/// Position and backlog of one durable consumer (what `ampybus topics lag` shows).
///
/// ```
/// let c = ampybus::transport::ConsumerStats {
///     name: "audit".into(),
///     pattern: "ampy.dev.>".into(),
///     cursor: Some(3),
///     in_flight: 1,
///     lag: 4,
///     newest_seq: Some(9),
/// };
/// assert_eq!(c.lag, 4);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Durable consumer name.
    pub name: String,
    /// The pattern it subscribes to (on brokers: the filter subjects, comma-separated, when
    /// the consumer spans several streams).
    pub pattern: String,
    /// Every sequence at or below the cursor is settled; `None` when the consumer spans
    /// several streams whose sequences are not comparable.
    pub cursor: Option<u64>,
    /// Delivered and not yet acknowledged (leases held or expired, or waiting out a retry
    /// delay); a message released for redelivery now (nack without delay) is not counted.
    pub in_flight: u64,
    /// Matching messages not yet acknowledged (delivered or not).
    pub lag: u64,
    /// Highest sequence of a stored message matching the pattern; `None` when unknown or
    /// not comparable.
    pub newest_seq: Option<u64>,
}

/// Reading what a transport stores per topic and its durable consumers: the base of
/// `ampybus topics list|describe|lag`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::TopicPattern;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let inspect = bus.transport().inspect().expect("the embedded log can be inspected");
/// assert!(inspect.topic_stats(&TopicPattern::parse(">").unwrap()).await.unwrap().is_empty());
/// assert!(inspect.consumer_stats().await.unwrap().is_empty());
/// # });
/// ```
#[async_trait]
pub trait Inspect: Send + Sync {
    /// Per-topic statistics of the stored topics `pattern` matches, sorted by topic.
    async fn topic_stats(&self, pattern: &TopicPattern) -> Result<Vec<TopicStats>>;
    /// Every durable consumer with its position and lag, sorted by name.
    async fn consumer_stats(&self) -> Result<Vec<ConsumerStats>>;
}

/// A message transport: the embedded log or a broker binding.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Short name: `embedded`, `nats`, `kafka`, `redis`.
    fn name(&self) -> &'static str;
    /// Stores a batch durably; one receipt per message, in order. Messages are already
    /// validated and encoded by the caller.
    async fn publish_batch(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>>;
    /// Publishes a batch like [`Transport::publish_batch`] and tells, per message, what the
    /// transport confirmed: nothing the broker confirmed is hidden behind an error. After the
    /// first failure no further message is sent; those already sent are settled (each
    /// confirmed or unknown).
    ///
    /// The default builds on `publish_batch`: all confirmed, or all
    /// [`PublishOutcome::Unknown`] on an error (the right answer for the embedded log, whose
    /// batch is one transaction: a failed commit may still have reached the disk). The NATS,
    /// Redis and Kafka bindings answer per message.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::transport::{Transport, embedded::{EmbeddedLog, EmbeddedOptions}};
    /// use ampybus::{Envelope, Headers, Topic};
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
    /// h.fill_publish_defaults();
    /// let out = log.publish_batch_outcomes(vec![Envelope::new(&topic, h, "x")]).await;
    /// assert_eq!(out.counts(), (1, 0, 0));
    /// # });
    /// ```
    async fn publish_batch_outcomes(&self, batch: Vec<Envelope>) -> BatchOutcome {
        let n = batch.len();
        match self.publish_batch(batch).await {
            Ok(receipts) if receipts.len() == n => BatchOutcome::confirmed(receipts),
            Ok(receipts) => BatchOutcome::all(
                n,
                PublishOutcome::Unknown,
                crate::Error::new(
                    crate::ErrorKind::Transport,
                    format!(
                        "{}: {} receipt(s) for a batch of {n}",
                        self.name(),
                        receipts.len()
                    ),
                ),
            ),
            Err(e) => BatchOutcome::all(n, PublishOutcome::Unknown, e),
        }
    }
    /// Publishes a batch of best-effort topics ([`crate::registry::Tier::BestEffort`]):
    /// `Confirmed` may mean only "handed to the connection" (receipt sequence 0). Default:
    /// [`Transport::publish_batch_outcomes`] — at least once, where the transport cannot do
    /// anything cheaper (the embedded log, Redis, Kafka). NATS: a core publish, no PubAck.
    async fn publish_best_effort(&self, batch: Vec<Envelope>) -> BatchOutcome {
        self.publish_batch_outcomes(batch).await
    }
    /// Opens a subscription.
    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>>;
    /// Time-window/key reads, when the transport can.
    fn replay(&self) -> Option<&dyn ReplayByTime> {
        None
    }
    /// The transport's own durable dedupe store, used by a [`crate::Consumer`] that is not
    /// given one. Default: none. Who shares it depends on the transport: every process on the
    /// embedded log's data directory, every host on NATS and Redis, on Kafka only the processes
    /// that open the same SQLite file (the default, one host) unless the URL names Redis.
    fn dedupe_store(&self) -> Option<Arc<dyn dedupe_store::DedupeStore>> {
        None
    }
    /// Consumer lag reads, when the transport can.
    fn consumer_lag(&self) -> Option<&dyn ConsumerLag> {
        None
    }
    /// Per-topic and per-consumer statistics, when the transport can.
    fn inspect(&self) -> Option<&dyn Inspect> {
        None
    }
    /// A cheap "is the transport connected" probe for `/health`: `Ok` when it can serve
    /// requests now. Default: `Ok` (a transport without a probe always reports healthy).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::transport::{Transport, embedded::{EmbeddedLog, EmbeddedOptions}};
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
    /// log.health().await.unwrap();
    /// # });
    /// ```
    async fn health(&self) -> Result<()> {
        Ok(())
    }
    /// Flushes and closes.
    async fn close(&self) -> Result<()>;
}
