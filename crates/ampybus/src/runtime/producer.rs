//! A producer with a bounded publish queue, best-effort shedding and consumer-lag slow-down.
//!
//! See [`Producer`] for the API and [`ShedClass`] for the exact shedding order.

use super::RetryPolicy;
use super::feeds::{Heartbeat, SEQUENCE, Sequencer};
use super::publisher::retry_transient;
use crate::bus::Bus;
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::obs::{DropCounts, DropReason, ProducerStats};
use crate::topic::{Topic, TopicPattern};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What [`Producer::send`] did with a message.
///
/// ```
/// use ampybus::runtime::{DropReason, SendOutcome};
/// assert!(SendOutcome::Queued.is_accepted());
/// assert!(SendOutcome::Conflated.is_accepted());
/// assert!(!SendOutcome::Dropped(DropReason::Heartbeat).is_accepted());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued for publishing (possibly after shedding older best-effort messages).
    Queued,
    /// Took the place of an older queued message of the same topic and `partition_key`, which
    /// will not be published.
    Conflated,
    /// Not queued: shed for this reason.
    Dropped(DropReason),
}

impl SendOutcome {
    /// True when the message will be published (queued or conflated).
    pub fn is_accepted(self) -> bool {
        !matches!(self, SendOutcome::Dropped(_))
    }
}

/// How a message may be shed under pressure. Only topics matching a pattern given to
/// [`ProducerBuilder::best_effort`] ever get a class other than [`ShedClass::Guaranteed`];
/// there is no default best-effort topic. On a best-effort topic the class is given by the
/// first subtopic token (for ticks, DESIGN.md §2: `ampy.{env}.ticks.v1.{class}.…`; other
/// domains use the same tokens): `heartbeat`, `quote`/`book`, `trade`, anything else.
///
/// # The shedding order
///
/// A message arriving at a queue holding `capacity` messages (or while a watched consumer
/// lags, see below) is handled by the first rule that applies:
///
/// 1. **Conflate** — a [`QuoteBook`](ShedClass::QuoteBook) or
///    [`Conflatable`](ShedClass::Conflatable) message replaces the *newest* queued message of
///    the same topic and `partition_key`, in that message's place (so per-key order within the
///    topic holds). The replaced message is counted as [`DropReason::Conflated`]; the send
///    returns [`SendOutcome::Conflated`].
/// 2. **Drop the incoming heartbeat** — a [`Heartbeat`](ShedClass::Heartbeat) never displaces
///    anything: it is dropped ([`DropReason::Heartbeat`]).
/// 3. **Evict a lower class, oldest first** — the oldest queued heartbeat is dropped to make
///    room ([`DropReason::Heartbeat`]); for an incoming `Conflatable` or `Guaranteed` message,
///    if no heartbeat is queued, the oldest queued quote/book message
///    ([`DropReason::QuoteBook`]). The incoming message is queued ([`SendOutcome::Queued`]).
///    A quote/book message evicts heartbeats only, never another quote/book.
/// 4. **Drop the incoming quote/book** — when nothing lower can go ([`DropReason::QuoteBook`]).
/// 5. **Block** — a `Conflatable` or `Guaranteed` message (every `trade`, every topic not
///    configured best-effort) waits until the flusher makes room. It is never dropped.
///
/// **While a watched consumer lags** (more than `max_pending` unacknowledged), before the
/// rules above and whatever the queue's fill: an incoming heartbeat is dropped, and an incoming
/// quote/book or conflatable message replaces the newest queued message of its topic and key
/// if there is one; both counted as [`DropReason::Lag`]. Otherwise the message goes on as
/// usual. `Guaranteed` messages are never affected by lag.
///
/// A replacement takes the slot of the message it replaces, so across *different* topics
/// sharing a `partition_key` (e.g. a trade and a quote of one symbol) a conflated quote may be
/// published before a trade sent earlier than it.
///
/// ```
/// use ampybus::runtime::ShedClass;
/// use ampybus::Topic;
/// let t = |s| Topic::parse(s).unwrap();
/// assert_eq!(ShedClass::of(&t("ampy.prod.ticks.v1.heartbeat.XNAS"), true), ShedClass::Heartbeat);
/// assert_eq!(ShedClass::of(&t("ampy.prod.ticks.v1.book.MSFT"), true), ShedClass::QuoteBook);
/// assert_eq!(ShedClass::of(&t("ampy.prod.ticks.v1.trade.MSFT"), true), ShedClass::Guaranteed);
/// assert_eq!(ShedClass::of(&t("ampy.prod.ticks.v1.imbalance.MSFT"), true), ShedClass::Conflatable);
/// // Not configured best-effort: never shed.
/// assert_eq!(ShedClass::of(&t("ampy.prod.ticks.v1.heartbeat.XNAS"), false), ShedClass::Guaranteed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShedClass {
    /// `heartbeat` on a best-effort topic: dropped first, never conflated.
    Heartbeat,
    /// `quote` or `book` on a best-effort topic: conflated per key, dropped after heartbeats.
    QuoteBook,
    /// Any other token (not `trade`) on a best-effort topic: conflated per key, never dropped;
    /// blocks when nothing can make room.
    Conflatable,
    /// `trade` on a best-effort topic and every topic not configured best-effort: never
    /// dropped or conflated; blocks on a full queue.
    Guaranteed,
}

impl ShedClass {
    /// The class of `topic`; `best_effort` says whether it matches a best-effort pattern.
    pub fn of(topic: &Topic, best_effort: bool) -> ShedClass {
        if !best_effort {
            return ShedClass::Guaranteed;
        }
        match topic.first_subtopic() {
            "heartbeat" => ShedClass::Heartbeat,
            "quote" | "book" => ShedClass::QuoteBook,
            "trade" => ShedClass::Guaranteed,
            _ => ShedClass::Conflatable,
        }
    }

    fn conflates(self) -> bool {
        matches!(self, ShedClass::QuoteBook | ShedClass::Conflatable)
    }
}

/// One queued message.
#[derive(Debug)]
struct Slot<T> {
    topic: String,
    key: String,
    value: T,
}

/// The queue and its shedding policy as a plain data structure (no async, no clock); see
/// [`ShedClass`] for the rules. Positions are slot numbers that only grow, so "everything
/// queued before" is "every slot up to n".
#[derive(Debug)]
pub(crate) struct ShedQueue<T> {
    capacity: usize,
    slots: BTreeMap<u64, Slot<T>>,
    next_slot: u64,
    /// The newest slot of each (topic, key) of a conflating class.
    newest: HashMap<(String, String), u64>,
    heartbeats: BTreeSet<u64>,
    quote_books: BTreeSet<u64>,
    pub(crate) dropped: DropCounts,
    pub(crate) conflated: u64,
    /// Topic and reason of each drop since the last [`ShedQueue::take_drops`] (when kept).
    drop_log: Option<Vec<(String, DropReason)>>,
    /// Conflate latest-per-key (the producer always; a consumer where configured).
    conflate: bool,
}

impl<T> ShedQueue<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        ShedQueue {
            capacity: capacity.max(1),
            slots: BTreeMap::new(),
            next_slot: 1,
            newest: HashMap::new(),
            heartbeats: BTreeSet::new(),
            quote_books: BTreeSet::new(),
            dropped: DropCounts::default(),
            conflated: 0,
            drop_log: None,
            conflate: true,
        }
    }

    /// Never conflates: quote/book messages are only dropped, other classes kept.
    pub(crate) fn without_conflation(mut self) -> Self {
        self.conflate = false;
        self
    }

    /// Queues a message past the shedding capacity (a class that is never dropped, on a
    /// queue whose hard bound is elsewhere).
    pub(crate) fn push_over(&mut self, class: ShedClass, topic: &str, key: &str, value: T) {
        self.push(class, topic, key, value);
    }

    /// Keeps the topic of every drop for [`ShedQueue::take_drops`].
    pub(crate) fn log_drops(mut self) -> Self {
        self.drop_log = Some(Vec::new());
        self
    }

    /// The drops logged since the last call.
    pub(crate) fn take_drops(&mut self) -> Vec<(String, DropReason)> {
        self.drop_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn bump(&mut self, topic: &str, reason: DropReason) {
        self.dropped.bump(reason);
        if let Some(log) = &mut self.drop_log {
            log.push((topic.to_owned(), reason));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The last slot number handed out (0: none yet).
    pub(crate) fn last_slot(&self) -> u64 {
        self.next_slot - 1
    }

    /// The oldest slot still queued.
    pub(crate) fn first_slot(&self) -> Option<u64> {
        self.slots.keys().next().copied()
    }

    /// Offers a message. `Err(value)` hands it back: no room and it may not be shed (block).
    pub(crate) fn offer(
        &mut self,
        class: ShedClass,
        topic: &str,
        key: &str,
        value: T,
        lagging: bool,
    ) -> std::result::Result<SendOutcome, T> {
        let value = if lagging && class == ShedClass::Heartbeat {
            self.bump(topic, DropReason::Lag);
            return Ok(SendOutcome::Dropped(DropReason::Lag));
        } else if lagging && self.conflates(class) {
            match self.conflate(topic, key, value, DropReason::Lag) {
                Ok(outcome) => return Ok(outcome),
                Err(value) => value,
            }
        } else {
            value
        };
        if self.slots.len() < self.capacity {
            self.push(class, topic, key, value);
            return Ok(SendOutcome::Queued);
        }
        let value = if self.conflates(class) {
            match self.conflate(topic, key, value, DropReason::Conflated) {
                Ok(outcome) => return Ok(outcome),
                Err(value) => value,
            }
        } else {
            value
        };
        if class == ShedClass::Heartbeat {
            self.bump(topic, DropReason::Heartbeat);
            return Ok(SendOutcome::Dropped(DropReason::Heartbeat));
        }
        let victim = match (self.heartbeats.first(), self.quote_books.first()) {
            (Some(&slot), _) => Some((slot, DropReason::Heartbeat)),
            (None, Some(&slot)) if class != ShedClass::QuoteBook => {
                Some((slot, DropReason::QuoteBook))
            }
            _ => None,
        };
        if let Some((slot, reason)) = victim {
            if let Some(gone) = self.remove(slot) {
                self.bump(&gone.topic, reason);
            }
            self.push(class, topic, key, value);
            return Ok(SendOutcome::Queued);
        }
        if class == ShedClass::QuoteBook {
            self.bump(topic, DropReason::QuoteBook);
            return Ok(SendOutcome::Dropped(DropReason::QuoteBook));
        }
        Err(value)
    }

    fn conflates(&self, class: ShedClass) -> bool {
        self.conflate && class.conflates()
    }

    /// Replaces the newest queued message of (topic, key) with `value`, counting the replaced
    /// one under `reason`; hands `value` back when there is none.
    fn conflate(
        &mut self,
        topic: &str,
        key: &str,
        value: T,
        reason: DropReason,
    ) -> std::result::Result<SendOutcome, T> {
        let found = self
            .newest
            .get(&(topic.to_owned(), key.to_owned()))
            .copied();
        let Some(slot) = found.and_then(|slot| self.slots.get_mut(&slot)) else {
            return Err(value);
        };
        slot.value = value;
        self.bump(topic, reason);
        self.conflated += 1;
        Ok(SendOutcome::Conflated)
    }

    fn push(&mut self, class: ShedClass, topic: &str, key: &str, value: T) {
        let slot = self.next_slot;
        self.next_slot += 1;
        match class {
            ShedClass::Heartbeat => {
                self.heartbeats.insert(slot);
            }
            ShedClass::QuoteBook => {
                self.quote_books.insert(slot);
            }
            _ => {}
        }
        if self.conflates(class) {
            self.newest.insert((topic.to_owned(), key.to_owned()), slot);
        }
        self.slots.insert(
            slot,
            Slot {
                topic: topic.to_owned(),
                key: key.to_owned(),
                value,
            },
        );
    }

    fn remove(&mut self, slot: u64) -> Option<Slot<T>> {
        let s = self.slots.remove(&slot)?;
        self.heartbeats.remove(&slot);
        self.quote_books.remove(&slot);
        let k = (s.topic.clone(), s.key.clone());
        if self.newest.get(&k) == Some(&slot) {
            self.newest.remove(&k);
        }
        Some(s)
    }

    /// Takes up to `max` messages from the front, with their slot numbers.
    pub(crate) fn take(&mut self, max: usize) -> Vec<(u64, T)> {
        let mut out = Vec::with_capacity(max.min(self.slots.len()));
        while out.len() < max {
            let Some(slot) = self.first_slot() else { break };
            if let Some(s) = self.remove(slot) {
                out.push((slot, s.value));
            }
        }
        out
    }

    /// The queued values in publish order (tests and debugging).
    #[cfg(test)]
    fn values(&self) -> Vec<&T> {
        self.slots.values().map(|s| &s.value).collect()
    }
}

/// Counters and flags behind the producer's lock.
#[derive(Debug)]
struct State {
    queue: ShedQueue<Envelope>,
    paused: bool,
    closing: bool,
    lagging: bool,
    /// Lowest slot and count of the batch being published.
    in_flight: Option<(u64, usize)>,
    accepted: u64,
    published: u64,
    failed: u64,
    /// Failures not yet reported by `flush`/`close`, and the last error.
    unreported: u64,
    last_error: Option<(ErrorKind, String)>,
    /// `sequence` numbers, when stamping is on.
    sequencer: Option<Sequencer>,
}

impl State {
    fn stats(&self) -> ProducerStats {
        ProducerStats {
            accepted: self.accepted,
            queued: self.queue.len() as u64,
            in_flight: self.in_flight.map_or(0, |(_, n)| n as u64),
            published: self.published,
            failed: self.failed,
            dropped: self.queue.dropped,
            conflated: self.queue.conflated,
            lagging: self.lagging,
        }
    }

    /// The failures since the last report, as an error; resets them.
    fn take_failures(&mut self) -> Result<()> {
        if self.unreported == 0 {
            return Ok(());
        }
        let n = std::mem::take(&mut self.unreported);
        let (kind, last) = self
            .last_error
            .take()
            .unwrap_or((ErrorKind::Transport, "unknown".into()));
        Err(Error::new(
            kind,
            format!("producer: {n} message(s) failed to publish; last error: {last}"),
        ))
    }
}

#[derive(Debug)]
struct LagWatch {
    consumer: String,
    max_pending: u64,
    every: Duration,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Notified (all waiters) on every change: room made, work queued, batch settled.
    changed: Notify,
    bus: Bus,
    policy: RetryPolicy,
    best_effort: Vec<TopicPattern>,
    max_batch: usize,
    lag: Option<LagWatch>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_best_effort(&self, topic: &Topic) -> bool {
        self.best_effort.iter().any(|p| p.matches(topic.as_str()))
            || self.bus.tier_of(topic) == crate::tier::Tier::BestEffort
    }

    /// [`Producer::send`].
    async fn send(&self, topic: &Topic, headers: Headers, payload: Bytes) -> Result<SendOutcome> {
        if self.lock().closing {
            return Err(closed());
        }
        let env = self.bus.prepare(topic, headers, payload).await?;
        // A registry entry's `max_rate` slows the owner down here; nothing is dropped.
        self.bus.throttle(topic).await;
        let key = env.headers.partition_key().unwrap_or_default().to_owned();
        let class = ShedClass::of(topic, self.is_best_effort(topic));
        let mut env = Some(env);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if st.closing {
                    return Err(closed());
                }
                let lagging = st.lagging;
                let mut value = env.take().expect("message present until queued");
                // Numbered in the order messages enter the queue; taken only when accepted.
                let seq = st.sequencer.as_ref().map(|s| {
                    let h = &value.headers;
                    let (p, r) = (h.producer().unwrap_or(""), h.run_id().unwrap_or(""));
                    (p.to_owned(), r.to_owned(), s.peek(p, r, &key))
                });
                if let Some((_, _, n)) = &seq {
                    value.headers.set(SEQUENCE, n.to_string());
                }
                match st.queue.offer(class, topic.as_str(), &key, value, lagging) {
                    Ok(outcome) => {
                        st.accepted += 1;
                        if let (Some(s), Some((p, r, n))) = (st.sequencer.as_mut(), &seq) {
                            s.commit(p, r, &key, *n);
                        }
                        let drops = st.queue.take_drops();
                        drop(st);
                        for (t, reason) in &drops {
                            self.bus.metrics().dropped(t, *reason);
                        }
                        if let SendOutcome::Dropped(reason) = outcome {
                            tracing::debug!(topic = %topic, reason = %reason, result = "dropped", "producer: message dropped");
                        }
                        self.changed.notify_waiters();
                        return Ok(outcome);
                    }
                    Err(back) => env = Some(back),
                }
            }
            notified.await;
        }
    }

    async fn refresh_lag(&self) -> Result<bool> {
        let Some(w) = &self.lag else {
            return Err(Error::new(
                ErrorKind::Config,
                "slow_down_on_lag: not configured on this producer",
            ));
        };
        let lag = self.bus.consumer_lag(&w.consumer).await?;
        let now = lag.is_some_and(|l| l.pending > w.max_pending);
        let before = std::mem::replace(&mut self.lock().lagging, now);
        if before != now {
            tracing::info!(
                consumer = %w.consumer,
                pending = lag.map_or(0, |l| l.pending),
                max_pending = w.max_pending,
                lagging = now,
                "producer: consumer lag state changed"
            );
        }
        Ok(now)
    }
}

/// Builds a [`Producer`]; see [`Producer::builder`].
#[derive(Debug)]
pub struct ProducerBuilder {
    bus: Bus,
    capacity: usize,
    best_effort: Vec<TopicPattern>,
    policy: RetryPolicy,
    max_batch: usize,
    lag: Option<(String, u64)>,
    lag_every: Duration,
    heartbeats: Vec<Heartbeat>,
    sequence: bool,
}

impl ProducerBuilder {
    /// Queue capacity in messages (default 10,000; at least 1).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let err = ampybus::runtime::Producer::builder(bus).capacity(0).start().unwrap_err();
    /// assert!(err.to_string().contains("capacity"));
    /// # });
    /// ```
    pub fn capacity(mut self, messages: usize) -> Self {
        self.capacity = messages;
        self
    }

    /// Marks the topics matching `pattern` best-effort: they may be conflated or dropped under
    /// pressure in the order [`ShedClass`] gives. Call it once per pattern; without it (or a
    /// best-effort tier on the bus, [`Bus::with_tier`]) nothing is ever shed.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Topic, TopicPattern, runtime::Producer};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = Producer::builder(bus)
    ///     .best_effort(TopicPattern::parse("ampy.prod.ticks.v1.quote.>").unwrap())
    ///     .start()
    ///     .unwrap();
    /// assert!(p.is_best_effort(&Topic::parse("ampy.prod.ticks.v1.quote.MSFT").unwrap()));
    /// assert!(!p.is_best_effort(&Topic::parse("ampy.prod.ticks.v1.trade.MSFT").unwrap()));
    /// # });
    /// ```
    pub fn best_effort(mut self, pattern: TopicPattern) -> Self {
        self.best_effort.push(pattern);
        self
    }

    /// Retry policy for transient publish failures (default [`RetryPolicy::default`]).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::runtime::{Producer, RetryPolicy};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let _p = Producer::builder(bus).retry(RetryPolicy { max_attempts: 2, ..Default::default() })
    ///     .start().unwrap();
    /// # });
    /// ```
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Most messages per `publish_batch` call (default 512; at least 1).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let _p = ampybus::runtime::Producer::builder(bus).max_batch(64).start().unwrap();
    /// # });
    /// ```
    pub fn max_batch(mut self, messages: usize) -> Self {
        self.max_batch = messages;
        self
    }

    /// Watches the durable consumer `consumer`: while more than `max_pending` of its messages
    /// are unacknowledged, best-effort topics are shed as [`ShedClass`] describes (reason
    /// [`DropReason::Lag`]). Needs a bus that can report lag ([`Bus::has_consumer_lag`]).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = ampybus::runtime::Producer::builder(bus)
    ///     .slow_down_on_lag("risk", 1_000)
    ///     .start()
    ///     .unwrap();
    /// assert!(!p.refresh_lag().await.unwrap()); // no such consumer yet: not lagging
    /// # });
    /// ```
    pub fn slow_down_on_lag(mut self, consumer: impl Into<String>, max_pending: u64) -> Self {
        self.lag = Some((consumer.into(), max_pending));
        self
    }

    /// How often the lag is read (default 250 ms).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let _p = ampybus::runtime::Producer::builder(bus)
    ///     .slow_down_on_lag("risk", 10)
    ///     .lag_poll_interval(std::time::Duration::from_secs(1))
    ///     .start()
    ///     .unwrap();
    /// # });
    /// ```
    pub fn lag_poll_interval(mut self, every: Duration) -> Self {
        self.lag_every = every;
        self
    }

    /// Sends heartbeats for one source (call once per source): the first at start, then one
    /// every interval, through the queue like any message (on a best-effort heartbeat topic
    /// the queue may shed them first). See [`Heartbeat`] for topic, headers and payload.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Env, runtime::{Producer, feeds::Heartbeat}};
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = Producer::builder(bus)
    ///     .heartbeat(Heartbeat::new(Env::Dev, "md@feed-a", "feed-a", Duration::from_secs(1)).unwrap())
    ///     .start()
    ///     .unwrap();
    /// p.close().await.unwrap();
    /// # });
    /// ```
    pub fn heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeats.push(heartbeat);
        self
    }

    /// Stamps the `sequence` header (1, 2, … per `producer`, `run_id` and `partition_key`)
    /// on every message in the order it enters the queue (default off). A message the queue
    /// sheds keeps its number: consumers checking sequences see the loss as a gap.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Headers, Topic, runtime::Producer};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = Producer::builder(bus).sequence(true).start().unwrap();
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// p.send(&topic, Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k"), b"x".to_vec())
    ///     .await.unwrap();
    /// p.close().await.unwrap();
    /// # });
    /// ```
    pub fn sequence(mut self, on: bool) -> Self {
        self.sequence = on;
        self
    }

    /// Starts the flusher (and the lag watcher) on the current Tokio runtime. Errors
    /// (`Config`) on a zero capacity or batch size, an empty consumer name, a zero poll
    /// interval, or lag watching on a bus that cannot report lag.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = ampybus::runtime::Producer::builder(bus).start().unwrap();
    /// assert_eq!(p.capacity(), 10_000);
    /// # });
    /// ```
    pub fn start(self) -> Result<Producer> {
        let config = |m: &str| Error::new(ErrorKind::Config, m.to_owned());
        if self.capacity == 0 {
            return Err(config("producer capacity: must be at least 1 message"));
        }
        if self.max_batch == 0 {
            return Err(config("producer max_batch: must be at least 1 message"));
        }
        let lag = match self.lag {
            None => None,
            Some((consumer, max_pending)) => {
                if consumer.trim().is_empty() {
                    return Err(config(
                        "slow_down_on_lag consumer: must be a durable consumer name, not empty",
                    ));
                }
                if self.lag_every.is_zero() {
                    return Err(config("lag_poll_interval: must be greater than zero"));
                }
                if !self.bus.has_consumer_lag() {
                    return Err(config(
                        "slow_down_on_lag: this bus's transport cannot report consumer lag",
                    ));
                }
                Some(LagWatch {
                    consumer,
                    max_pending,
                    every: self.lag_every,
                })
            }
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: if self.bus.observability() {
                    ShedQueue::new(self.capacity).log_drops()
                } else {
                    ShedQueue::new(self.capacity)
                },
                paused: false,
                closing: false,
                lagging: false,
                in_flight: None,
                accepted: 0,
                published: 0,
                failed: 0,
                unreported: 0,
                last_error: None,
                sequencer: self.sequence.then(Sequencer::default),
            }),
            changed: Notify::new(),
            bus: self.bus,
            policy: self.policy,
            best_effort: self.best_effort,
            max_batch: self.max_batch,
            lag,
        });
        if shared.bus.observability() {
            static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            shared.bus.obs().add_producer(
                id,
                self.capacity,
                Arc::downgrade(&shared),
                |s: &Shared| s.lock().stats(),
            );
        }
        let flusher = tokio::spawn(flush_loop(shared.clone()));
        let watcher = shared.lag.as_ref().map(|w| {
            let every = w.every;
            let weak = Arc::downgrade(&shared);
            tokio::spawn(async move {
                // The first read is one interval after start: a producer starts not lagging.
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(shared) = weak.upgrade() else { return };
                    if let Err(e) = shared.refresh_lag().await {
                        tracing::warn!(error = %e, "producer: reading consumer lag failed; keeping the last state");
                    }
                }
            })
        });
        let heartbeats = self
            .heartbeats
            .into_iter()
            .map(|hb| tokio::spawn(heartbeat_loop(Arc::downgrade(&shared), hb)))
            .collect();
        Ok(Producer {
            shared,
            capacity: self.capacity,
            flusher: Some(flusher),
            watcher,
            heartbeats,
        })
    }
}

/// A producer with a bounded publish queue, drained in batches by one background task.
///
/// * [`send`](Producer::send) validates and encodes the message at once (`Bus::prepare`: a bad
///   topic or header is an immediate error naming the field; nothing is queued), fixes its
///   `message_id`, then queues it. When the queue is full, a message on a topic not
///   configured best-effort (and every `trade`) **waits for room**; best-effort topics are
///   conflated or dropped in the order [`ShedClass`] documents, each counted by
///   [`DropReason`].
/// * The flusher publishes up to `max_batch` queued messages per `publish_batch` call and
///   retries transient failures (`Transport`, `Timeout`) with the [`RetryPolicy`] backoff,
///   keeping every `message_id` (the same retry loop as [`Publisher`](super::Publisher)). A
///   batch that still fails is counted in [`ProducerStats::failed`], logged with
///   `tracing::error!` and reported by the next [`flush`](Producer::flush) or
///   [`close`](Producer::close).
/// * [`slow_down_on_lag`](ProducerBuilder::slow_down_on_lag) watches a consumer's lag and
///   sheds best-effort topics while it is behind.
/// * [`pause`](Producer::pause) / [`resume`](Producer::resume) hold the flusher, e.g. for a
///   broker maintenance window: the queue fills and then applies its policy.
///
/// Messages queued when a `Producer` is dropped without [`close`](Producer::close) are still
/// published by the background task (if the runtime lives on); only `close` reports failures.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::runtime::{Producer, SendOutcome};
/// use ampybus::{Bus, Headers, Topic, TopicPattern};
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let producer = Producer::builder(bus)
///     .capacity(1_000)
///     .best_effort(TopicPattern::parse("ampy.dev.ticks.v1.quote.>").unwrap())
///     .start()
///     .unwrap();
/// let topic = Topic::parse("ampy.dev.ticks.v1.quote.MSFT").unwrap();
/// let h = Headers::for_publish("ampy.ticks.v1.Tick", "md@1", "md", "XNAS.MSFT");
/// assert_eq!(producer.send(&topic, h, b"q1".to_vec()).await.unwrap(), SendOutcome::Queued);
/// producer.flush().await.unwrap();
/// let stats = producer.close().await.unwrap();
/// assert_eq!((stats.accepted, stats.published), (1, 1));
/// # });
/// ```
#[derive(Debug)]
pub struct Producer {
    shared: Arc<Shared>,
    capacity: usize,
    flusher: Option<JoinHandle<()>>,
    watcher: Option<JoinHandle<()>>,
    heartbeats: Vec<JoinHandle<()>>,
}

impl Producer {
    /// The bus this producer publishes on.
    pub(crate) fn bus(&self) -> &Bus {
        &self.shared.bus
    }

    /// A builder with the defaults: capacity 10,000, no best-effort topic, default retry
    /// policy, batches of 512, no lag watching.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = ampybus::runtime::Producer::builder(bus).capacity(8).start().unwrap();
    /// assert_eq!(p.capacity(), 8);
    /// # });
    /// ```
    pub fn builder(bus: Bus) -> ProducerBuilder {
        ProducerBuilder {
            bus,
            capacity: 10_000,
            best_effort: Vec::new(),
            policy: RetryPolicy::default(),
            max_batch: 512,
            lag: None,
            lag_every: Duration::from_millis(250),
            heartbeats: Vec::new(),
            sequence: false,
        }
    }

    /// Queue capacity in messages.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether `topic` matches a best-effort pattern of this producer or is best-effort on
    /// its bus ([`Bus::tier_of`]).
    pub fn is_best_effort(&self, topic: &Topic) -> bool {
        self.shared.is_best_effort(topic)
    }

    /// The [`ShedClass`] of `topic` on this producer.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Topic, runtime::{Producer, ShedClass}};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = Producer::builder(bus).start().unwrap();
    /// let hb = Topic::parse("ampy.dev.ticks.v1.heartbeat.X").unwrap();
    /// assert_eq!(p.class_of(&hb), ShedClass::Guaranteed); // nothing configured best-effort
    /// # });
    /// ```
    pub fn class_of(&self, topic: &Topic) -> ShedClass {
        ShedClass::of(topic, self.is_best_effort(topic))
    }

    /// Validates, encodes and queues one message (raw payload). Returns at once with a
    /// `Topic`/`Header`/`Payload` error for a message that would not publish; waits for room
    /// when the queue is full and the message may not be shed; `Closed` after
    /// [`close`](Producer::close) began.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, ErrorKind, Headers, Topic, runtime::Producer};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = Producer::builder(bus).start().unwrap();
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let bad = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "");
    /// let err = p.send(&topic, bad, b"x".to_vec()).await.unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Header);
    /// assert_eq!(p.stats().accepted, 0);
    /// # });
    /// ```
    pub async fn send(
        &self,
        topic: &Topic,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<SendOutcome> {
        self.shared.send(topic, headers, payload.into()).await
    }

    /// Waits until every message queued before this call was published or failed for good
    /// (while [paused](Producer::pause), that is after [`resume`](Producer::resume)). Returns
    /// an error of the last failure's kind when publishes failed since the last
    /// `flush`/`close` (reported once).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Headers, Topic, runtime::Producer};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = Producer::builder(bus).start().unwrap();
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// for i in 0..10 {
    ///     let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
    ///     p.send(&topic, h, format!("m{i}").into_bytes()).await.unwrap();
    /// }
    /// p.flush().await.unwrap();
    /// assert_eq!(p.stats().published, 10);
    /// # });
    /// ```
    pub async fn flush(&self) -> Result<()> {
        let target = self.shared.lock().queue.last_slot();
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.shared.lock();
                let oldest = [st.queue.first_slot(), st.in_flight.map(|(s, _)| s)]
                    .into_iter()
                    .flatten()
                    .min();
                if oldest.is_none_or(|s| s > target) {
                    return st.take_failures();
                }
            }
            notified.await;
        }
    }

    /// Stops accepting messages (later sends get `Closed`), resumes a paused flusher,
    /// publishes everything queued, stops the background tasks and returns the final stats;
    /// an error when publishes failed since the last [`flush`](Producer::flush).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Headers, Topic, runtime::Producer};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = Producer::builder(bus).start().unwrap();
    /// p.pause();
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
    /// p.send(&topic, h, b"x".to_vec()).await.unwrap();
    /// let stats = p.close().await.unwrap();
    /// assert_eq!((stats.published, stats.queued), (1, 0));
    /// # });
    /// ```
    pub async fn close(mut self) -> Result<ProducerStats> {
        self.heartbeats.drain(..).for_each(|h| h.abort());
        self.begin_close();
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        if let Some(f) = self.flusher.take()
            && let Err(e) = f.await
        {
            return Err(Error::with_source(
                ErrorKind::Closed,
                "producer: the flusher task ended abnormally",
                e,
            ));
        }
        let mut st = self.shared.lock();
        st.take_failures()?;
        Ok(st.stats())
    }

    /// A snapshot of the counters.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = ampybus::runtime::Producer::builder(bus).start().unwrap();
    /// assert_eq!(p.stats(), ampybus::runtime::ProducerStats::default());
    /// # });
    /// ```
    pub fn stats(&self) -> ProducerStats {
        self.shared.lock().stats()
    }

    /// Holds the flusher: nothing more is published until [`resume`](Producer::resume) (a
    /// batch already being published finishes). For maintenance windows; sends keep queueing
    /// and the full-queue policy applies.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = ampybus::runtime::Producer::builder(bus).start().unwrap();
    /// p.pause();
    /// assert!(p.is_paused());
    /// p.resume();
    /// assert!(!p.is_paused());
    /// # });
    /// ```
    pub fn pause(&self) {
        self.shared.lock().paused = true;
        tracing::info!("producer: paused");
    }

    /// Lets the flusher publish again.
    pub fn resume(&self) {
        self.shared.lock().paused = false;
        self.shared.changed.notify_waiters();
        tracing::info!("producer: resumed");
    }

    /// Whether the flusher is held by [`pause`](Producer::pause).
    pub fn is_paused(&self) -> bool {
        self.shared.lock().paused
    }

    /// Whether the watched consumer lagged at the last lag read.
    pub fn lagging(&self) -> bool {
        self.shared.lock().lagging
    }

    /// Reads the watched consumer's lag now (the background watcher also does it every
    /// poll interval), updates [`lagging`](Producer::lagging) and returns it. `Config` error
    /// when [`slow_down_on_lag`](ProducerBuilder::slow_down_on_lag) was not set.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = ampybus::runtime::Producer::builder(bus).start().unwrap();
    /// assert_eq!(p.refresh_lag().await.unwrap_err().kind(), ampybus::ErrorKind::Config);
    /// # });
    /// ```
    pub async fn refresh_lag(&self) -> Result<bool> {
        self.shared.refresh_lag().await
    }

    fn begin_close(&self) {
        {
            let mut st = self.shared.lock();
            st.closing = true;
            st.paused = false;
        }
        self.shared.changed.notify_waiters();
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
        self.heartbeats.drain(..).for_each(|h| h.abort());
        if self.flusher.take().is_some() {
            // The flusher drains what is queued and ends on its own.
            self.begin_close();
        }
    }
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "producer: closed; send after close")
}

/// Sends `hb`'s heartbeats until the producer closes: the first at once, then every interval
/// (a late tick is not made up for).
async fn heartbeat_loop(shared: std::sync::Weak<Shared>, hb: Heartbeat) {
    let mut tick = tokio::time::interval(hb.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut count = 0u64;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        count += 1;
        let (headers, payload) = hb.message(count, chrono::Utc::now());
        match shared.send(hb.topic(), headers, payload.into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Closed => return,
            Err(e) => {
                tracing::warn!(topic = %hb.topic(), error = %e, "producer: heartbeat not sent");
            }
        }
    }
}

/// The background task: takes batches from the front of the queue and publishes them.
async fn flush_loop(shared: Arc<Shared>) {
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let batch = {
            let mut st = shared.lock();
            if !st.paused && !st.queue.is_empty() {
                let batch = st.queue.take(shared.max_batch);
                st.in_flight = Some((batch[0].0, batch.len()));
                Some(batch)
            } else if st.closing && st.queue.is_empty() {
                return;
            } else {
                None
            }
        };
        let Some(batch) = batch else {
            notified.await;
            continue;
        };
        // Room was made.
        shared.changed.notify_waiters();
        let envs: Vec<Envelope> = batch.into_iter().map(|(_, e)| e).collect();
        let n = envs.len() as u64;
        let result = retry_transient(&shared.policy, "producer batch", || {
            shared.bus.publish_wire(envs.clone())
        })
        .await;
        {
            let mut st = shared.lock();
            st.in_flight = None;
            match result {
                Ok(_) => st.published += n,
                Err(e) => {
                    tracing::error!(
                        messages = n,
                        max_attempts = shared.policy.max_attempts,
                        error = %e,
                        "producer: publish failed for good; messages lost"
                    );
                    st.failed += n;
                    st.unreported += n;
                    st.last_error = Some((e.kind(), e.message().to_owned()));
                }
            }
        }
        shared.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: ShedClass = ShedClass::Heartbeat;
    const QB: ShedClass = ShedClass::QuoteBook;
    const CF: ShedClass = ShedClass::Conflatable;
    const GU: ShedClass = ShedClass::Guaranteed;

    fn class_topic(c: ShedClass) -> &'static str {
        match c {
            HB => "hb",
            QB => "quote",
            CF => "imb",
            GU => "trade",
        }
    }

    /// Offers `name` (topic from the class, key `key`) and returns the outcome; `Err` is "blocks".
    fn offer(
        q: &mut ShedQueue<String>,
        c: ShedClass,
        key: &str,
        name: &str,
        lagging: bool,
    ) -> std::result::Result<SendOutcome, String> {
        q.offer(c, class_topic(c), key, name.to_owned(), lagging)
    }

    fn contents(q: &ShedQueue<String>) -> Vec<&str> {
        q.values().into_iter().map(String::as_str).collect()
    }

    fn counts(q: &ShedQueue<String>) -> (u64, u64, u64, u64) {
        let d = q.dropped;
        (d.heartbeat, d.quote_book, d.conflated, d.lag)
    }

    #[test]
    fn below_capacity_everything_is_queued_in_order() {
        let mut q = ShedQueue::new(4);
        for (c, n) in [(HB, "h1"), (QB, "q1"), (QB, "q2"), (GU, "t1")] {
            assert_eq!(offer(&mut q, c, "A", n, false), Ok(SendOutcome::Queued));
        }
        assert_eq!(contents(&q), ["h1", "q1", "q2", "t1"]);
        assert_eq!(counts(&q), (0, 0, 0, 0));
        assert_eq!(q.last_slot(), 4);
    }

    #[test]
    fn full_queue_conflates_the_newest_message_of_the_same_topic_and_key() {
        let mut q = ShedQueue::new(4);
        for (c, k, n) in [
            (QB, "A", "qa1"),
            (QB, "B", "qb1"),
            (QB, "A", "qa2"),
            (GU, "A", "t1"),
        ] {
            offer(&mut q, c, k, n, false).unwrap();
        }
        assert_eq!(
            offer(&mut q, QB, "A", "qa3", false),
            Ok(SendOutcome::Conflated)
        );
        // qa2 (the newest of A) replaced in place; qa1 kept, so A's order holds.
        assert_eq!(contents(&q), ["qa1", "qb1", "qa3", "t1"]);
        assert_eq!(counts(&q), (0, 0, 1, 0));
        assert_eq!(q.conflated, 1);
        // A conflatable message with nothing of its key queued evicts the oldest quote.
        assert_eq!(offer(&mut q, CF, "A", "i1", false), Ok(SendOutcome::Queued));
        assert_eq!(contents(&q), ["qb1", "qa3", "t1", "i1"]);
        // Another key with nothing lower to evict: the incoming quote is dropped.
        assert_eq!(
            offer(&mut q, QB, "C", "qc1", false),
            Ok(SendOutcome::Dropped(DropReason::QuoteBook))
        );
        assert_eq!(counts(&q), (0, 2, 1, 0));
        assert_eq!(contents(&q), ["qb1", "qa3", "t1", "i1"]);
    }

    #[test]
    fn conflation_does_not_cross_topics() {
        let mut q: ShedQueue<String> = ShedQueue::new(2);
        q.offer(QB, "quote.X", "A", "q1".into(), false).unwrap();
        q.offer(QB, "book.X", "A", "b1".into(), false).unwrap();
        assert_eq!(
            q.offer(QB, "quote.Y", "A", "q2".into(), false),
            Ok(SendOutcome::Dropped(DropReason::QuoteBook))
        );
        assert_eq!(
            q.offer(QB, "book.X", "A", "b2".into(), false),
            Ok(SendOutcome::Conflated)
        );
        assert_eq!(contents(&q), ["q1", "b2"]);
    }

    #[test]
    fn incoming_heartbeat_on_a_full_queue_is_dropped_and_displaces_nothing() {
        let mut q = ShedQueue::new(3);
        for (c, n) in [(HB, "h1"), (QB, "q1"), (GU, "t1")] {
            offer(&mut q, c, "A", n, false).unwrap();
        }
        assert_eq!(
            offer(&mut q, HB, "A", "h2", false),
            Ok(SendOutcome::Dropped(DropReason::Heartbeat))
        );
        assert_eq!(contents(&q), ["h1", "q1", "t1"]);
        assert_eq!(counts(&q), (1, 0, 0, 0));
    }

    #[test]
    fn eviction_takes_heartbeats_oldest_first_then_quote_book_oldest_first() {
        let mut q = ShedQueue::new(5);
        for (c, k, n) in [
            (QB, "A", "qa1"),
            (HB, "A", "h1"),
            (QB, "B", "qb1"),
            (HB, "B", "h2"),
            (GU, "A", "t1"),
        ] {
            offer(&mut q, c, k, n, false).unwrap();
        }
        // A quote of a new key evicts the oldest heartbeat.
        assert_eq!(
            offer(&mut q, QB, "C", "qc1", false),
            Ok(SendOutcome::Queued)
        );
        assert_eq!(contents(&q), ["qa1", "qb1", "h2", "t1", "qc1"]);
        // A trade evicts the next heartbeat, then quotes oldest first.
        assert_eq!(offer(&mut q, GU, "A", "t2", false), Ok(SendOutcome::Queued));
        assert_eq!(contents(&q), ["qa1", "qb1", "t1", "qc1", "t2"]);
        assert_eq!(offer(&mut q, GU, "B", "t3", false), Ok(SendOutcome::Queued));
        assert_eq!(contents(&q), ["qb1", "t1", "qc1", "t2", "t3"]);
        // A quote of a new key cannot evict another quote: dropped.
        assert_eq!(
            offer(&mut q, QB, "D", "qd1", false),
            Ok(SendOutcome::Dropped(DropReason::QuoteBook))
        );
        // A conflatable message evicts a quote too.
        assert_eq!(offer(&mut q, CF, "A", "i1", false), Ok(SendOutcome::Queued));
        assert_eq!(contents(&q), ["t1", "qc1", "t2", "t3", "i1"]);
        assert_eq!(offer(&mut q, GU, "A", "t4", false), Ok(SendOutcome::Queued));
        assert_eq!(contents(&q), ["t1", "t2", "t3", "i1", "t4"]);
        // Nothing sheddable is left: a trade blocks, a conflatable of a new key blocks, one
        // of a queued key conflates.
        assert_eq!(offer(&mut q, GU, "A", "t5", false), Err("t5".to_owned()));
        assert_eq!(offer(&mut q, CF, "B", "i2", false), Err("i2".to_owned()));
        assert_eq!(
            offer(&mut q, CF, "A", "i3", false),
            Ok(SendOutcome::Conflated)
        );
        assert_eq!(contents(&q), ["t1", "t2", "t3", "i3", "t4"]);
        // heartbeat 2 (evicted), quote_book 4 (3 evicted + 1 dropped incoming), conflated 1.
        assert_eq!(counts(&q), (2, 4, 1, 0));
    }

    #[test]
    fn taking_from_the_front_frees_room_and_forgets_conflation_targets() {
        let mut q = ShedQueue::new(2);
        offer(&mut q, QB, "A", "qa1", false).unwrap();
        offer(&mut q, GU, "A", "t1", false).unwrap();
        let taken = q.take(1);
        assert_eq!(taken, vec![(1, "qa1".to_owned())]);
        assert_eq!(q.first_slot(), Some(2));
        assert_eq!(
            offer(&mut q, QB, "A", "qa2", false),
            Ok(SendOutcome::Queued)
        );
        // Full again; qa2 is the conflation target now.
        assert_eq!(
            offer(&mut q, QB, "A", "qa3", false),
            Ok(SendOutcome::Conflated)
        );
        assert_eq!(contents(&q), ["t1", "qa3"]);
        assert_eq!(q.take(10).len(), 2);
        assert!(q.is_empty());
        assert_eq!(q.first_slot(), None);
        assert_eq!(q.last_slot(), 3);
    }

    #[test]
    fn an_evicted_newest_message_is_no_longer_a_conflation_target() {
        let mut q = ShedQueue::new(2);
        offer(&mut q, QB, "A", "qa1", false).unwrap();
        offer(&mut q, GU, "A", "t1", false).unwrap();
        // The trade evicts qa1.
        assert_eq!(offer(&mut q, GU, "A", "t2", false), Ok(SendOutcome::Queued));
        assert_eq!(
            offer(&mut q, QB, "A", "qa2", false),
            Ok(SendOutcome::Dropped(DropReason::QuoteBook))
        );
        assert_eq!(contents(&q), ["t1", "t2"]);
        assert_eq!(counts(&q), (0, 2, 0, 0));
    }

    #[test]
    fn while_lagging_heartbeats_drop_and_quotes_conflate_at_any_fill() {
        let mut q = ShedQueue::new(10);
        offer(&mut q, QB, "A", "qa1", false).unwrap();
        offer(&mut q, HB, "A", "h1", false).unwrap();
        assert_eq!(
            offer(&mut q, HB, "A", "h2", true),
            Ok(SendOutcome::Dropped(DropReason::Lag))
        );
        assert_eq!(
            offer(&mut q, QB, "A", "qa2", true),
            Ok(SendOutcome::Conflated)
        );
        // No queued message of the key: queued as usual.
        assert_eq!(offer(&mut q, QB, "B", "qb1", true), Ok(SendOutcome::Queued));
        assert_eq!(offer(&mut q, CF, "B", "i1", true), Ok(SendOutcome::Queued));
        assert_eq!(
            offer(&mut q, CF, "B", "i2", true),
            Ok(SendOutcome::Conflated)
        );
        // Guaranteed messages are not affected.
        assert_eq!(offer(&mut q, GU, "A", "t1", true), Ok(SendOutcome::Queued));
        assert_eq!(offer(&mut q, GU, "A", "t2", true), Ok(SendOutcome::Queued));
        assert_eq!(contents(&q), ["qa2", "h1", "qb1", "i2", "t1", "t2"]);
        assert_eq!(counts(&q), (0, 0, 0, 3));
        assert_eq!(q.conflated, 2);
    }

    #[test]
    fn capacity_one_keeps_working() {
        let mut q = ShedQueue::new(1);
        assert_eq!(offer(&mut q, HB, "A", "h1", false), Ok(SendOutcome::Queued));
        assert_eq!(offer(&mut q, GU, "A", "t1", false), Ok(SendOutcome::Queued));
        assert_eq!(offer(&mut q, GU, "A", "t2", false), Err("t2".to_owned()));
        assert_eq!(contents(&q), ["t1"]);
        assert_eq!(counts(&q), (1, 0, 0, 0));
    }

    #[test]
    fn classes_come_from_the_first_subtopic_token_of_best_effort_topics_only() {
        let t = |s: &str| Topic::parse(s).unwrap();
        assert_eq!(ShedClass::of(&t("ampy.dev.ticks.v1.quote.X"), true), QB);
        assert_eq!(ShedClass::of(&t("ampy.dev.ticks.v1.book.X.L2"), true), QB);
        assert_eq!(ShedClass::of(&t("ampy.dev.ticks.v1.heartbeat"), true), HB);
        assert_eq!(ShedClass::of(&t("ampy.dev.ticks.v1.trade.X"), true), GU);
        assert_eq!(ShedClass::of(&t("ampy.dev.ticks.v1.status.X"), true), CF);
        assert_eq!(ShedClass::of(&t("ampy.dev.ticks.v1.quote.X"), false), GU);
        // A token that only starts like a class is not that class.
        assert_eq!(ShedClass::of(&t("ampy.dev.ticks.v1.quotes.X"), true), CF);
    }
}
