//! The consumer: fetch → per-key FIFO → workers → batched ack.

use super::dlq::{build_dlq_envelope, dlq_topic_for};
use super::{DlqCode, Handler, Message, Outcome, RetryPolicy};
use crate::bus::Bus;
use crate::codec::DecodeFailure;
use crate::dedupe::DedupeStore;
use crate::error::{Error, ErrorKind, Result};
use crate::obs::{BusTracer, ConsumerTopic};
use crate::topic::{Topic, TopicPattern};
use crate::transport::{Delivery, StartAt, SubscribeSpec};
use futures::FutureExt;
use opentelemetry::context::FutureExt as OtelFutureExt;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

/// The domains whose messages are handled in strict per-key order unless the builder says
/// otherwise.
const STRICT_DOMAINS: [crate::topic::Domain; 2] =
    [crate::topic::Domain::Orders, crate::topic::Domain::Fills];

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const HARD_STOP: u8 = 2;

/// Largest fetch per round trip.
const FETCH_BATCH: usize = 256;
/// How long one fetch waits for messages (also bounds how fast shutdown stops fetching).
const FETCH_WAIT: Duration = Duration::from_millis(100);
/// How long the acker gathers finished messages before one flush.
const ACK_LINGER: Duration = Duration::from_millis(2);

/// Tries of a failed batch ack before the acker gives up on an error that another try cannot
/// mend, or while the consumer shuts down; a transport error is retried while it runs.
const ACK_TRIES: u32 = 5;

/// The longest pause between two tries of a failed batch ack.
const ACK_RETRY_MAX: Duration = Duration::from_secs(1);

/// Entry point of the consumer runtime; see [`Consumer::builder`].
#[derive(Debug)]
pub struct Consumer;

impl Consumer {
    /// Starts configuring a durable consumer named `name` on `pattern`.
    ///
    /// Defaults: 8 workers, 1,024 messages in flight, [`RetryPolicy::default`], strict per-key
    /// order when the pattern's domain token is literally `orders` or `fills`, a 30 s ack
    /// deadline, start at the earliest retained message, and the transport's own dedupe store
    /// ([`crate::transport::Transport::dedupe_store`]; on the embedded log a table in the log,
    /// written in the same transaction as the acks) — no dedupe when the transport has none and
    /// none is given.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::runtime::{Consumer, Outcome, RetryPolicy, handler_fn};
    /// use ampybus::{Bus, TopicPattern};
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let handle = Consumer::builder(bus, TopicPattern::parse("ampy.dev.orders.>").unwrap(), "oms")
    ///     .handler(handler_fn(|_msg| async { Outcome::Ok }))
    ///     .workers(4)
    ///     .max_in_flight(256)
    ///     .retry(RetryPolicy { max_attempts: 3, ..Default::default() })
    ///     .ack_deadline(Duration::from_secs(10))
    ///     .start()
    ///     .await
    ///     .unwrap();
    /// assert!(handle.is_strict());
    /// let stats = handle.shutdown(Duration::from_secs(1)).await;
    /// assert_eq!(stats.handled_ok, 0);
    /// # });
    /// ```
    pub fn builder(bus: Bus, pattern: TopicPattern, name: &str) -> ConsumerBuilder {
        ConsumerBuilder {
            bus,
            pattern,
            name: name.to_owned(),
            handler: None,
            workers: None,
            default_workers: 8,
            max_in_flight: 1024,
            retry: RetryPolicy::default(),
            strict: None,
            dedupe: DedupeChoice::Default,
            ack_deadline: Duration::from_secs(30),
            start: StartAt::Earliest,
            serve_replays: true,
            handler_dedupes: false,
            max_payload: DEFAULT_MAX_PAYLOAD,
            shed: super::ShedOptions::default(),
            lag_alert: super::lag::DEFAULT_LAG_ALERT,
            heal: None,
        }
    }
}

/// Default [`ConsumerBuilder::max_payload_bytes`]: 64 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = crate::codec::DEFAULT_MAX_INFLATED;

enum DedupeChoice {
    Default,
    Off,
    Store(Arc<dyn DedupeStore>),
}

/// Configures a consumer; [`ConsumerBuilder::start`] runs it.
///
/// Ordering: messages of one `partition_key` are handled one at a time, in the order they were
/// delivered, whatever the number of workers; workers take the next key that is ready.
///
/// * **Strict mode** (by default for every message of the `orders` and `fills` domains,
///   whatever the pattern — `ampy.prod.>` too): a message waiting for a retry parks its key; later messages of that key wait until it succeeds or is
///   dead-lettered. Other keys keep flowing.
/// * **Non-strict mode**: a message waiting for a retry steps aside; later messages of its key
///   may be handled before it, and it rejoins the back of its key's queue when its delay ends.
///
/// Retry delays are served in-process (no worker sleeps) and are capped at half the ack
/// deadline so that the lease, refreshed before each wait and during handlers, never lapses.
pub struct ConsumerBuilder {
    bus: Bus,
    pattern: TopicPattern,
    name: String,
    handler: Option<Arc<dyn Handler>>,
    workers: Option<usize>,
    /// Workers when [`ConsumerBuilder::workers`] was not called (8; an inbox's choice).
    default_workers: usize,
    max_in_flight: usize,
    retry: RetryPolicy,
    strict: Option<bool>,
    dedupe: DedupeChoice,
    ack_deadline: Duration,
    start: StartAt,
    serve_replays: bool,
    /// The handler skips what was applied before by itself (an inbox): replays need no store.
    handler_dedupes: bool,
    max_payload: usize,
    shed: super::ShedOptions,
    lag_alert: Duration,
    heal: Option<super::feeds::GapHealer>,
}

impl std::fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("pattern", &self.pattern.as_str())
            .field("name", &self.name)
            .field("workers", &self.workers.unwrap_or(self.default_workers))
            .field("max_in_flight", &self.max_in_flight)
            .field("retry", &self.retry)
            .field("strict", &self.strict)
            .finish()
    }
}

impl ConsumerBuilder {
    /// The handler (required).
    pub fn handler(mut self, h: impl Handler) -> Self {
        self.handler = Some(Arc::new(h));
        self
    }

    /// A shared handler.
    pub fn handler_arc(mut self, h: Arc<dyn Handler>) -> Self {
        self.handler = Some(h);
        self
    }

    /// Number of concurrent handlers (default 8, at least 1; an inbox consumer's default is its
    /// inbox's: `inbox::InboxBinding::workers`, with the `inbox-postgres` or `inbox-sqlite`
    /// feature).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n.max(1));
        self
    }

    /// Messages fetched but not yet acked, at most (default 1,024, at least 1). A full runtime
    /// stops fetching until messages complete.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// The retry policy.
    pub fn retry(mut self, p: RetryPolicy) -> Self {
        self.retry = p;
        self
    }

    /// Strict per-key order (see the type docs).
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = Some(strict);
        self
    }

    /// The dedupe store of this consumer name, instead of the transport's own: instances of
    /// the name skip each other's applied messages only when they reach the same store.
    pub fn dedupe(mut self, store: Arc<dyn DedupeStore>) -> Self {
        self.dedupe = DedupeChoice::Store(store);
        self
    }

    /// The bounded queue of a best-effort pattern (see [`crate::runtime::shedding`]; default
    /// 10,000 messages, no conflation). Ignored on other tiers; the README's "Durability
    /// tiers" has an example.
    pub fn best_effort_queue(mut self, opts: super::ShedOptions) -> Self {
        self.shed = opts;
        self
    }

    /// The lag alert threshold (default 30 s): see [`ConsumerHandle::lag_watch`] (example).
    pub fn lag_alert_after(mut self, d: Duration) -> Self {
        self.lag_alert = d;
        self
    }

    /// Turns dedupe off (every delivery reaches the handler).
    pub fn without_dedupe(mut self) -> Self {
        self.dedupe = DedupeChoice::Off;
        self
    }

    /// A transactional inbox with its handler ([`crate::inbox`]) instead of a handler and a
    /// dedupe store: each message's inbox row and its effects commit in one database
    /// transaction before the ack, and a message found there is acked without calling the
    /// handler. Replays go through it too. See `PgInbox::handler` / `SqliteInbox::handler`
    /// for the handler signatures and a complete example.
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    pub fn inbox(self, inbox: impl crate::inbox::InboxBinding) -> Self {
        let workers = inbox.workers();
        let h = Box::new(inbox).bind(&self.name, self.bus.metrics());
        let mut b = self.handler_arc(h).without_dedupe();
        b.default_workers = workers.max(1);
        b.handler_dedupes = true;
        b
    }

    /// Ack deadline of the subscription (default 30 s).
    pub fn ack_deadline(mut self, d: Duration) -> Self {
        self.ack_deadline = d.max(Duration::from_millis(100));
        self
    }

    /// Where a new durable consumer starts (default: earliest retained).
    pub fn start_at(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }

    /// Largest payload handed to the handler, as carried and after inflating (default
    /// [`crate::codec::DEFAULT_MAX_INFLATED`], 64 MiB); a larger one is dead-lettered with
    /// `payload_too_large`.
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload = n.max(1);
        self
    }

    /// Whether this consumer serves `ampy.control.v1.ReplayRequest`s addressed to its name
    /// (default on, when the transport can read by time window). See [`crate::control`]: it
    /// listens on `ampy.{env}.control.v1.replay_requests` through a durable consumer named
    /// `{name}-replay-control` (starting at the end of the log) and replays through this
    /// consumer's handler and dedupe store.
    pub fn serve_replays(mut self, on: bool) -> Self {
        self.serve_replays = on;
        self
    }

    /// Heals gaps in the `sequence` of what this consumer is delivered by asking itself to
    /// replay the missing range (see [`GapHealer`](super::feeds::GapHealer), which has an
    /// example). [`start`](ConsumerBuilder::start) fails with a `Config` error naming
    /// `heal_gaps` on a best-effort pattern, a transport that cannot replay, without
    /// [`serve_replays`](ConsumerBuilder::serve_replays) or without a dedupe store.
    pub fn heal_gaps(mut self, healer: super::feeds::GapHealer) -> Self {
        self.heal = Some(healer);
        self
    }

    /// The dedupe store this consumer uses on `tier` (none when the choice is the default and
    /// the tier or the transport has none).
    fn dedupe_store(&self, tier: crate::tier::Tier) -> Option<Arc<dyn DedupeStore>> {
        match &self.dedupe {
            DedupeChoice::Off => None,
            DedupeChoice::Store(s) => Some(s.clone()),
            DedupeChoice::Default if tier != crate::tier::Tier::AtLeastOnceDedupe => None,
            DedupeChoice::Default => self.bus.transport().dedupe_store(),
        }
    }

    /// Subscribes and spawns the fetcher, the workers and the acker (and the replay control
    /// listener, see [`ConsumerBuilder::serve_replays`]).
    pub async fn start(mut self) -> Result<ConsumerHandle> {
        let serve = self.serve_replays && self.bus.replay().is_some();
        if let Some(healer) = self.heal.take() {
            let tier = self.bus.tier_of_pattern(&self.pattern, None).0;
            let has_dedupe = self.handler_dedupes || self.dedupe_store(tier).is_some();
            super::feeds::GapHealer::check(
                &self.bus,
                &self.name,
                &self.pattern,
                tier,
                self.serve_replays,
                has_dedupe,
            )?;
            self.handler = self.handler.map(|h| healer.wrap(h));
            healer.bind(self.bus.clone(), &self.name, self.pattern.clone());
        }
        let handler_dedupes = self.handler_dedupes;
        let bus = self.bus.clone();
        let pattern = self.pattern.clone();
        let mut handle = self.start_inner().await?;
        if serve {
            match super::control::start_listener(
                bus,
                &handle.shared.name,
                pattern,
                handle.shared.handler.clone(),
                match (&handle.shared.dedupe, handler_dedupes) {
                    (Some(_), _) => Some(Arc::new(LiveAwareDedupe {
                        shared: handle.shared.clone(),
                    }) as Arc<dyn DedupeStore>),
                    // An inbox consumer: every replayed message goes through the inbox, which
                    // skips what it applied before (counted in bus_inbox_skipped_total).
                    (None, true) => Some(Arc::new(HandlerDedupes) as Arc<dyn DedupeStore>),
                    (None, false) => None,
                },
            )
            .await
            {
                Ok(control) => handle.control = Some(Box::new(control)),
                Err(e) => {
                    handle.shutdown(Duration::from_secs(5)).await;
                    return Err(e);
                }
            }
        }
        Ok(handle)
    }

    /// [`ConsumerBuilder::start`] as a boxed future (the control listener is itself a consumer).
    pub(crate) fn start_boxed(
        self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ConsumerHandle>> + Send>> {
        Box::pin(self.start())
    }

    async fn start_inner(mut self) -> Result<ConsumerHandle> {
        let handler = self
            .handler
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Config, "consumer: no handler set"))?;
        if self.name.trim().is_empty() {
            return Err(Error::new(ErrorKind::Config, "consumer: empty name"));
        }
        // Unset: decided per message by its domain (orders and fills are strict), so a pattern
        // such as `ampy.prod.>` keeps orders in strict order and lets ticks step aside.
        let strict = self.strict;
        // The tier of the pattern (crate::tier): dedupe only on at_least_once_dedupe;
        // best-effort reads through the shedding queue.
        let tier = self.bus.tier_of_pattern(&self.pattern, None).0;
        let dedupe = self.dedupe_store(tier);
        if dedupe.is_none()
            && matches!(self.dedupe, DedupeChoice::Default)
            && tier == crate::tier::Tier::AtLeastOnceDedupe
        {
            tracing::warn!(consumer = %self.name, "no dedupe store configured for this transport; dedupe is off");
        }
        let spec = SubscribeSpec {
            pattern: self.pattern.clone(),
            durable: Some(self.name.clone()),
            start: self.start,
            ack_deadline: self.ack_deadline,
            tier: Some(tier),
        };
        let mut sub = self.bus.subscribe(spec).await?;
        if tier == crate::tier::Tier::BestEffort {
            sub = super::shedding(&self.bus, sub, self.shed).0;
        }
        let (phase_tx, phase_rx) = watch::channel(RUNNING);
        let obs = self.bus.obs().clone();
        let shared = Arc::new(Shared {
            obs_on: obs.enabled,
            tracer: obs.tracer.clone(),
            topic_metrics: RwLock::new(HashMap::new()),
            inflight_gauge: obs.metrics.inflight(&self.name),
            lag_gauge: obs.metrics.consumer_lag(self.pattern.as_str(), &self.name),
            last_message_us: AtomicI64::new(0),
            stopped: AtomicBool::new(false),
            max_in_flight: self.max_in_flight,
            schemas: self.bus.schema_gate(),
            bus: self.bus,
            pattern: self.pattern,
            name: self.name,
            handler,
            answers_at_once: AtomicBool::new(false),
            retry: self.retry,
            strict,
            ack_deadline: self.ack_deadline,
            max_payload: self.max_payload,
            dedupe,
            book: Mutex::new(KeyBook::new(KEY_BOOK_CAP + 4 * self.max_in_flight)),
            topics: Mutex::new(HashMap::with_hasher(FastHash::new())),
            id: NEXT_CONSUMER_ID.fetch_add(1, Ordering::Relaxed),
            sched: Mutex::new(Sched::new()),
            notify: Notify::new(),
            counters: Counters::default(),
            permits: Semaphore::new(self.max_in_flight),
            phase: phase_rx,
            acks: Mutex::new(AckBuf::default()),
            ack_notify: Notify::new(),
            ack_full: Notify::new(),
            lag_clock: super::lag::LagClock::new(self.lag_alert),
        });
        super::lag::spawn_sampler(
            &shared.bus,
            shared.pattern.as_str(),
            &shared.name,
            shared.lag_clock.clone(),
            Arc::downgrade(&shared),
            |s: &Shared| s.counters.settled.load(Ordering::SeqCst),
        );
        let acker = tokio::spawn(run_acker(shared.clone()));
        let fetcher = tokio::spawn(run_fetcher(shared.clone(), sub));
        let refresher = tokio::spawn(run_refresher(shared.clone()));
        if shared.obs_on {
            obs.add_consumer(ConsumerMonitor {
                shared: shared.clone(),
            });
            if shared.bus.has_consumer_lag() {
                tokio::spawn(run_lag_poller(shared.clone()));
            }
        }
        let workers = (0..self.workers.unwrap_or(self.default_workers))
            .map(|_| tokio::spawn(run_worker(shared.clone())))
            .collect();
        Ok(ConsumerHandle {
            shared,
            phase_tx,
            fetcher: Some(fetcher),
            workers,
            acker: Some(acker),
            refresher: Some(refresher),
            control: None,
        })
    }
}

/// Counts kept by a running consumer.
///
/// ```
/// use ampybus::runtime::{ConsumerStats, DlqCode};
/// let mut s = ConsumerStats::default();
/// s.dead_lettered.insert(DlqCode::HandlerPanic, 2);
/// assert_eq!(s.dlq(DlqCode::HandlerPanic), 2);
/// assert_eq!(s.dlq(DlqCode::DecodeError), 0);
/// assert_eq!(s.dead_lettered_total(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Handler returned `Ok` (acked, recorded for dedupe).
    pub handled_ok: u64,
    /// Attempts that ended in a retry being scheduled.
    pub retried: u64,
    /// Messages written to the DLQ (then acked), by reason code; only non-zero codes.
    pub dead_lettered: BTreeMap<DlqCode, u64>,
    /// Deliveries skipped because this consumer had already applied them.
    pub skipped_duplicates: u64,
    /// Deliveries handed back to the transport unfinished (shutdown).
    pub released: u64,
    /// Attempts put off because another message with one of the same dedupe keys was being
    /// handled at that moment (by this consumer or by a replay it serves); each is tried again
    /// shortly and is skipped when the other one applied it.
    pub deferred: u64,
    /// Fetched and not yet settled.
    pub in_flight: u64,
}

impl ConsumerStats {
    /// Dead-lettered count for one code.
    pub fn dlq(&self, code: DlqCode) -> u64 {
        self.dead_lettered.get(&code).copied().unwrap_or(0)
    }

    /// Dead-lettered count over all codes.
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.values().sum()
    }
}

#[derive(Default)]
struct Counters {
    handled_ok: AtomicU64,
    retried: AtomicU64,
    dead_lettered: [AtomicU64; DlqCode::ALL.len()],
    skipped: AtomicU64,
    released: AtomicU64,
    deferred: AtomicU64,
    fetched: AtomicU64,
    settled: AtomicU64,
}

/// A running consumer. Call [`ConsumerHandle::shutdown`] to stop it cleanly. Dropping the
/// handle instead stops it abruptly: running handlers are cancelled and their messages
/// released, finished ones are still acked, and queued ones come again after the ack deadline.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::runtime::{Consumer, Outcome, handler_fn};
/// use ampybus::{Bus, TopicPattern};
/// use std::time::Duration;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let handle = Consumer::builder(bus, TopicPattern::parse("ampy.dev.bars.>").unwrap(), "bars")
///     .handler(handler_fn(|_msg| async { Outcome::Ok }))
///     .start()
///     .await
///     .unwrap();
/// assert_eq!(handle.name(), "bars");
/// assert!(!handle.is_strict());
/// assert_eq!(handle.stats().in_flight, 0);
/// let stats = handle.shutdown(Duration::from_secs(5)).await;
/// assert_eq!(stats.released, 0);
/// # });
/// ```
pub struct ConsumerHandle {
    shared: Arc<Shared>,
    phase_tx: watch::Sender<u8>,
    fetcher: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    acker: Option<JoinHandle<()>>,
    refresher: Option<JoinHandle<()>>,
    control: Option<Box<ConsumerHandle>>,
}

impl std::fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("name", &self.shared.name)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ConsumerHandle {
    /// Current counts.
    pub fn stats(&self) -> ConsumerStats {
        self.shared.stats()
    }

    /// Whether strict per-key order is on for some of the messages: always after
    /// `.strict(true)`, never after `.strict(false)`, and by default when the pattern can
    /// match the `orders` or `fills` domain (then the messages of those domains, and only
    /// those, are handled in strict order).
    pub fn is_strict(&self) -> bool {
        self.shared.strict.unwrap_or_else(|| {
            STRICT_DOMAINS
                .iter()
                .any(|d| self.shared.pattern.may_match_domain(d.as_str()))
        })
    }

    /// The consumer name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Runs until SIGINT or SIGTERM ([`super::shutdown_signal`]), then shuts down gracefully
    /// with `deadline` (see [`ConsumerHandle::shutdown`]) and returns the final counts.
    ///
    /// ```no_run
    /// # async fn f(bus: ampybus::Bus) -> ampybus::Result<()> {
    /// use ampybus::runtime::{Consumer, Outcome, handler_fn};
    /// use std::time::Duration;
    /// let handle = Consumer::builder(bus, "ampy.prod.fills.>".parse()?, "positions")
    ///     .handler(handler_fn(|_m| async { Outcome::Ok }))
    ///     .start()
    ///     .await?;
    /// let stats = handle.run_until_signal(Duration::from_secs(30)).await;
    /// println!("handled {}, released {}", stats.handled_ok, stats.released);
    /// # Ok(()) }
    /// ```
    ///
    /// The signal listeners are installed by this call, before the returned future first runs.
    pub fn run_until_signal(
        self,
        deadline: Duration,
    ) -> impl std::future::Future<Output = ConsumerStats> + Send + 'static {
        let signal = super::shutdown_signal();
        async move {
            let signal = signal.await;
            tracing::info!(consumer = %self.shared.name, signal, "stop requested; shutting down");
            self.shutdown(deadline).await
        }
    }

    /// This consumer's lag in seconds and its lag alerts (`runtime::lag`).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::runtime::{Consumer, Outcome, handler_fn};
    /// use ampybus::{Bus, TopicPattern};
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let handle = Consumer::builder(bus, TopicPattern::parse("ampy.dev.bars.>").unwrap(), "bars")
    ///     .lag_alert_after(Duration::from_secs(10))
    ///     .handler(handler_fn(|_m| async { Outcome::Ok }))
    ///     .start()
    ///     .await
    ///     .unwrap();
    /// let lag = handle.lag_watch();
    /// assert_eq!((lag.seconds(), lag.alert_after()), (0.0, Duration::from_secs(10)));
    /// let _alerts = lag.events(); // LagEvent::Over / Back
    /// handle.shutdown(Duration::from_secs(1)).await;
    /// # });
    /// ```
    pub fn lag_watch(&self) -> super::LagWatch {
        super::LagWatch::new(self.shared.lag_clock.clone())
    }

    /// A cloneable read-only view of this consumer (counts, draining), for health and stats
    /// endpoints that outlive a `&self` borrow — e.g. while [`ConsumerHandle::run_until_signal`]
    /// owns the handle.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::runtime::{Consumer, Outcome, handler_fn};
    /// use ampybus::{Bus, TopicPattern};
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let handle = Consumer::builder(bus, TopicPattern::parse("ampy.dev.bars.>").unwrap(), "bars")
    ///     .handler(handler_fn(|_m| async { Outcome::Ok }))
    ///     .start()
    ///     .await
    ///     .unwrap();
    /// let monitor = handle.monitor();
    /// assert!(!monitor.is_draining());
    /// handle.shutdown(Duration::from_secs(1)).await;
    /// assert!(monitor.is_draining());
    /// assert_eq!(monitor.name(), "bars");
    /// # });
    /// ```
    pub fn monitor(&self) -> ConsumerMonitor {
        ConsumerMonitor {
            shared: self.shared.clone(),
        }
    }

    /// Stops fetching, lets handlers that are running finish until `deadline`, releases
    /// (nack, zero delay) everything else — queued, waiting for a retry, or still running at
    /// the deadline — flushes acks and dedupe records, and returns the final counts. No
    /// message is acked without its handler having finished.
    pub async fn shutdown(mut self, deadline: Duration) -> ConsumerStats {
        let started = tokio::time::Instant::now();
        if let Some(control) = self.control.take() {
            Box::pin(control.shutdown(deadline)).await;
        }
        let _ = self.phase_tx.send(DRAINING);
        self.shared.notify.notify_waiters();
        if let Some(f) = self.fetcher.take() {
            let _ = f.await;
        }
        let rest = deadline.saturating_sub(started.elapsed());
        let joined =
            tokio::time::timeout(rest, futures::future::join_all(self.workers.iter_mut())).await;
        if joined.is_err() {
            let _ = self.phase_tx.send(HARD_STOP);
            for w in self.workers.iter_mut() {
                if !w.is_finished() {
                    let _ = w.await;
                }
            }
        }
        self.workers.clear();
        if let Some(r) = self.refresher.take() {
            let _ = r.await;
        }
        let leftovers = self
            .shared
            .sched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain_all();
        for item in leftovers {
            self.shared.release(item).await;
        }
        self.shared
            .acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closing = true;
        self.shared.ack_notify.notify_one();
        if let Some(a) = self.acker.take() {
            let _ = a.await;
        }
        if self.shared.obs_on
            && self.shared.bus.has_consumer_lag()
            && let Ok(Ok(Some(l))) = tokio::time::timeout(
                Duration::from_secs(2),
                self.shared.bus.consumer_lag(&self.shared.name),
            )
            .await
        {
            self.shared
                .lag_gauge
                .set(i64::try_from(l.pending).unwrap_or(i64::MAX));
        }
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.sync_inflight();
        self.stats()
    }
}

/// A cloneable read-only view of a running consumer; see [`ConsumerHandle::monitor`].
#[derive(Clone)]
pub struct ConsumerMonitor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ConsumerMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerMonitor")
            .field("name", &self.shared.name)
            .finish()
    }
}

impl ConsumerMonitor {
    /// Current counts.
    pub fn stats(&self) -> ConsumerStats {
        self.shared.stats()
    }

    /// The consumer name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The subscription pattern.
    pub fn pattern(&self) -> &TopicPattern {
        &self.shared.pattern
    }

    /// True once shutdown has begun (no more fetching).
    pub fn is_draining(&self) -> bool {
        self.shared.phase() != RUNNING
    }

    /// True once [`ConsumerHandle::shutdown`] has finished.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::runtime::{Consumer, Outcome, handler_fn};
    /// use ampybus::{Bus, TopicPattern};
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let handle = Consumer::builder(bus, TopicPattern::parse("ampy.dev.bars.>").unwrap(), "bars")
    ///     .handler(handler_fn(|_m| async { Outcome::Ok }))
    ///     .max_in_flight(64)
    ///     .start()
    ///     .await
    ///     .unwrap();
    /// let monitor = handle.monitor();
    /// assert_eq!(monitor.max_in_flight(), 64);
    /// assert!(monitor.last_message_at().is_none());
    /// handle.shutdown(Duration::from_secs(1)).await;
    /// assert!(monitor.is_stopped());
    /// # });
    /// ```
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    /// When a message last reached this consumer's handler, to the millisecond (`None`: not
    /// yet); see
    /// [`ConsumerMonitor::is_stopped`] for an example.
    pub fn last_message_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        match self.shared.last_message_us.load(Ordering::Relaxed) {
            0 => None,
            us => chrono::DateTime::from_timestamp_micros(us),
        }
    }

    /// The configured [`ConsumerBuilder::max_in_flight`]; see
    /// [`ConsumerMonitor::is_stopped`] for an example.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight
    }

    /// Sets `bus_consumer_lag` of this consumer.
    pub(crate) fn set_lag(&self, pending: u64) {
        self.shared
            .lag_gauge
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }
}

impl Shared {
    /// The acker was told to flush and stop.
    fn acks_closing(&self) -> bool {
        self.acks.lock().unwrap_or_else(|p| p.into_inner()).closing
    }

    fn stats(&self) -> ConsumerStats {
        let c = &self.counters;
        let mut dead_lettered = BTreeMap::new();
        for code in DlqCode::ALL {
            let n = c.dead_lettered[code.index()].load(Ordering::SeqCst);
            if n > 0 {
                dead_lettered.insert(code, n);
            }
        }
        ConsumerStats {
            handled_ok: c.handled_ok.load(Ordering::SeqCst),
            retried: c.retried.load(Ordering::SeqCst),
            dead_lettered,
            skipped_duplicates: c.skipped.load(Ordering::SeqCst),
            released: c.released.load(Ordering::SeqCst),
            deferred: c.deferred.load(Ordering::SeqCst),
            in_flight: c
                .fetched
                .load(Ordering::SeqCst)
                .saturating_sub(c.settled.load(Ordering::SeqCst)),
        }
    }
}

use crate::fasthash::{FastHash, FastMap};

/// One dedupe key as the runtime holds it: a canonical `message_id` as its 128 bits (no
/// allocation), or any other key text (`{domain}:{dedupe_key}`) shared by reference count.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum DKey {
    Id(u128),
    Text(Arc<str>),
}

impl DKey {
    fn parse(s: &str) -> DKey {
        match canonical_uuid(s) {
            Some(v) => DKey::Id(v),
            None => DKey::Text(Arc::from(s)),
        }
    }
}

/// The 128 bits of a UUID in canonical form (lowercase, hyphenated) — the form
/// `normalize_for_consume` leaves `message_id` in; `None` for any other text.
fn canonical_uuid(s: &str) -> Option<u128> {
    crate::headers::canonical_uuid(s).map(u128::from_be_bytes)
}

/// Writes the text of a key into `buf` (for ids) and returns it.
fn key_text<'a>(k: &'a DKey, buf: &'a mut [u8; 36]) -> &'a str {
    match k {
        DKey::Id(v) => {
            crate::ids::uuid_text(&v.to_be_bytes(), buf);
            // SAFETY: `uuid_text` writes 36 ASCII bytes.
            unsafe { std::str::from_utf8_unchecked(buf) }
        }
        DKey::Text(s) => s,
    }
}

/// The texts of `keys`, for a [`DedupeStore`] call.
fn key_texts(keys: &[DKey]) -> Vec<String> {
    let mut buf = [0u8; 36];
    keys.iter()
        .map(|k| key_text(k, &mut buf).to_owned())
        .collect()
}

/// The texts of `keys` borrowed, ids written into `bufs` (one buffer per batch, no string
/// per key).
fn key_strs<'a>(keys: &'a [DKey], bufs: &'a mut Vec<[u8; 36]>) -> Vec<&'a str> {
    bufs.clear();
    bufs.resize(keys.len(), [0u8; 36]);
    keys.iter()
        .zip(bufs.iter_mut())
        .map(|(k, buf)| match k {
            DKey::Id(v) => {
                crate::ids::uuid_text(&v.to_be_bytes(), buf);
                // SAFETY: `uuid_text` writes 36 ASCII bytes.
                unsafe { std::str::from_utf8_unchecked(buf) }
            }
            DKey::Text(s) => &**s,
        })
        .collect()
}

/// The dedupe keys of one message (what [`crate::dedupe::dedupe_keys`] gives, held without allocating for
/// the `message_id`).
#[derive(Clone, Default)]
struct Keys([Option<DKey>; 2]);

impl Keys {
    fn of(headers: &crate::headers::Headers, domain: crate::topic::Domain) -> Keys {
        Keys([
            match headers.message_uuid() {
                Some(u) => Some(DKey::Id(u.as_u128())),
                None => headers.message_id().map(DKey::parse),
            },
            headers
                .dedupe_scope(domain)
                .map(|s| DKey::Text(Arc::from(s))),
        ])
    }

    fn iter(&self) -> impl Iterator<Item = &DKey> {
        self.0.iter().flatten()
    }

    fn len(&self) -> usize {
        self.iter().count()
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}

/// The answer of one batch dedupe lookup: one flag per key of the batch (`None`: the lookup
/// failed, each message is then checked on its own). Set once; until then no message of the
/// batch is handled.
#[derive(Default)]
struct Lookup {
    done: std::sync::OnceLock<Option<Vec<bool>>>,
}

/// A delivered message on its way through the runtime, boxed: it moves between the fetcher,
/// its key's queue, a worker and the acker several times, as one pointer.
type Item = Box<ItemData>;

/// What an [`Item`] holds.
struct ItemData {
    delivery: Delivery,
    local_attempts: u32,
    msg: Option<Message>,
    /// Topic and normalised headers (parsed by the preparer when dedupe is on, else by the
    /// worker).
    prepared: Option<(Topic, crate::headers::Headers)>,
    /// The envelope's headers were moved into `prepared`/`msg` (they needed no rewrite).
    headers_moved: bool,
    /// Metric handles of the message's domain-level topic (observability on, topic parsed).
    metrics: Option<Arc<ConsumerTopic>>,
    /// Dedupe keys (empty with dedupe off).
    keys: Keys,
    /// The batch lookup this message waits for and the index of its first key in it.
    lookup: Option<(Arc<Lookup>, u32)>,
    dedupe_checked: bool,
    last_error: String,
    /// When the lease was last taken or extended.
    refreshed: Instant,
    /// Put back at the head of its key's queue by a strict retry.
    parked_head: bool,
}

impl ItemData {
    /// The message's headers wherever they are now (moved into the prepared form or the
    /// message when they needed no rewrite).
    fn headers(&self) -> &crate::headers::Headers {
        match (&self.msg, &self.prepared) {
            (Some(m), _) if self.headers_moved => &m.headers,
            (None, Some((_, h))) if self.headers_moved => h,
            _ => &self.delivery.envelope.headers,
        }
    }

    /// Gives moved headers back to the envelope (a dead letter carries the envelope).
    fn restore_headers(&mut self) {
        if !self.headers_moved {
            return;
        }
        let h = match (self.msg.take(), self.prepared.take()) {
            (Some(m), _) => m.headers,
            (None, Some((_, h))) => h,
            (None, None) => return,
        };
        self.delivery.envelope.headers = h;
        self.headers_moved = false;
    }

    fn new(delivery: Delivery, at: Instant) -> Item {
        Box::new(ItemData::fresh(delivery, at))
    }

    fn fresh(delivery: Delivery, at: Instant) -> ItemData {
        ItemData {
            delivery,
            local_attempts: 0,
            msg: None,
            prepared: None,
            headers_moved: false,
            metrics: None,
            keys: Keys::default(),
            lookup: None,
            dedupe_checked: false,
            last_error: String::new(),
            refreshed: at,
            parked_head: false,
        }
    }

    /// Not waiting for its batch's dedupe lookup.
    fn runnable(&self) -> bool {
        self.lookup
            .as_ref()
            .is_none_or(|(l, _)| l.done.get().is_some())
    }
}

/// One partition key's FIFO. Slots are kept while idle (so a busy key costs no allocation
/// per message) and swept when there are many.
struct KeyState {
    queue: VecDeque<Item>,
    busy: bool,
    parked: bool,
    /// The refresher has the queue out to extend leases.
    refreshing: bool,
    in_ready: bool,
    /// Non-strict retries of this key waiting out their delay.
    delayed: u32,
}

impl KeyState {
    fn idle(&self) -> bool {
        !self.busy
            && !self.parked
            && !self.refreshing
            && !self.in_ready
            && self.delayed == 0
            && self.queue.is_empty()
    }
}

/// Recorded dedupe keys a consumer keeps at most (see [`KeyBook`]; normally it holds about
/// what is in flight).
const KEY_BOOK_CAP: usize = 1 << 20;

/// Finished items' boxes kept for reuse.
const SPARE_ITEMS: usize = 1024;

/// Idle key slots kept before a sweep (at least; a sweep sets the next bound to twice what
/// is left).
const KEY_SWEEP_MIN: usize = 8192;

struct Sched {
    slots: Vec<KeyState>,
    index: FastMap<Arc<str>, u32>,
    free: Vec<u32>,
    ready: VecDeque<u32>,
    delayed: HashMap<u64, (u32, Item)>,
    next_id: u64,
    sweep_at: usize,
}

impl Sched {
    fn new() -> Sched {
        Sched {
            slots: Vec::new(),
            index: HashMap::with_hasher(FastHash::new()),
            free: Vec::new(),
            ready: VecDeque::new(),
            delayed: HashMap::new(),
            next_id: 0,
            sweep_at: KEY_SWEEP_MIN,
        }
    }

    /// The slot of `key`, made if needed.
    fn slot(&mut self, key: &str) -> u32 {
        if let Some(&id) = self.index.get(key) {
            return id;
        }
        if self.index.len() >= self.sweep_at {
            self.sweep();
        }
        let name: Arc<str> = Arc::from(key);
        let ks = KeyState {
            queue: VecDeque::new(),
            busy: false,
            parked: false,
            refreshing: false,
            in_ready: false,
            delayed: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = ks;
                id
            }
            None => {
                self.slots.push(ks);
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(name, id);
        id
    }

    /// Forgets idle keys.
    fn sweep(&mut self) {
        let Sched {
            slots, index, free, ..
        } = self;
        index.retain(|_, id| {
            let ks = &mut slots[*id as usize];
            if ks.idle() {
                ks.queue = VecDeque::new();
                free.push(*id);
                false
            } else {
                true
            }
        });
        self.sweep_at = (2 * self.index.len()).max(KEY_SWEEP_MIN);
    }

    /// Queues key `id` for a worker if it can run now; true if it was queued.
    fn make_ready(&mut self, id: u32) -> bool {
        let Some(ks) = self.slots.get_mut(id as usize) else {
            return false;
        };
        if !ks.busy
            && !ks.parked
            && !ks.refreshing
            && !ks.in_ready
            && ks.queue.front().is_some_and(|i| i.runnable())
        {
            ks.in_ready = true;
            self.ready.push_back(id);
            return true;
        }
        false
    }

    fn push(&mut self, id: u32, item: Item) -> bool {
        self.slots[id as usize].queue.push_back(item);
        self.make_ready(id)
    }

    fn take(&mut self) -> Option<(u32, Item)> {
        while let Some(id) = self.ready.pop_front() {
            let Some(ks) = self.slots.get_mut(id as usize) else {
                continue;
            };
            ks.in_ready = false;
            if ks.busy || ks.parked || ks.refreshing {
                continue;
            }
            if !ks.queue.front().is_some_and(|i| i.runnable()) {
                continue;
            }
            if let Some(mut item) = ks.queue.pop_front() {
                item.parked_head = false;
                ks.busy = true;
                return Some((id, item));
            }
        }
        None
    }

    /// Key `id` finished a message: frees it and queues it again if it has more.
    fn finish(&mut self, id: u32) -> bool {
        if let Some(ks) = self.slots.get_mut(id as usize) {
            ks.busy = false;
        }
        self.make_ready(id)
    }

    /// Everything queued or delayed, for release at shutdown.
    fn drain_all(&mut self) -> Vec<Item> {
        let mut items = Vec::new();
        for ks in self.slots.iter_mut() {
            items.extend(ks.queue.drain(..));
            ks.in_ready = false;
        }
        items.extend(self.delayed.drain().map(|(_, (_, it))| it));
        self.ready.clear();
        items
    }
}

/// Finished messages waiting for the acker's next batch.
#[derive(Default)]
struct AckBuf {
    deliveries: Vec<Delivery>,
    keys: Vec<DKey>,
    /// Boxes of finished items, for the fetcher to reuse (at most [`SPARE_ITEMS`]).
    spare: Vec<Item>,
    /// No more messages will come: flush and stop.
    closing: bool,
    /// The acker has stopped.
    closed: bool,
}

struct Shared {
    /// Unique in the process (see [`TOPICS_HERE`]).
    id: u64,
    /// Fetch marks for the lag in seconds (`runtime::lag`).
    lag_clock: Arc<super::lag::LagClock>,
    /// Metrics and spans recorded (the bus handle's setting).
    obs_on: bool,
    tracer: BusTracer,
    /// Pre-resolved metric handles per domain-level topic.
    topic_metrics: RwLock<HashMap<String, Arc<ConsumerTopic>>>,
    inflight_gauge: Gauge,
    lag_gauge: Gauge,
    /// Unix micros of the last handler start (0: none).
    last_message_us: AtomicI64,
    stopped: AtomicBool,
    max_in_flight: usize,
    bus: Bus,
    pattern: TopicPattern,
    name: String,
    handler: Arc<dyn Handler>,
    /// The handler's last answer came from [`Handler::handle_now`] (no future): workers take
    /// runs of messages ([`RUN_MAX`]) instead of one at a time.
    answers_at_once: AtomicBool,
    retry: RetryPolicy,
    /// `Some`: every message; `None`: by the message's domain (see [`strict_domain`]).
    strict: Option<bool>,
    ack_deadline: Duration,
    max_payload: usize,
    dedupe: Option<Arc<dyn DedupeStore>>,
    /// The registry's schema check (a bus opened with a registry).
    schemas: Option<crate::registry::SchemaGate>,
    /// The dedupe keys this process is handling, has applied and not recorded yet, or has
    /// recorded while a batch looked up before the record is still in the runtime (so that a
    /// batch lookup made at fetch time cannot miss what was applied here since).
    book: Mutex<KeyBook>,
    /// Topics already parsed, by their text, with their metric handles: a consumer sees few
    /// distinct topics, so each is parsed and validated once (bounded by
    /// [`TOPIC_CACHE_MAX`]; cleared when full).
    topics: Mutex<FastMap<String, TopicEntry>>,
    sched: Mutex<Sched>,
    notify: Notify,
    counters: Counters,
    /// Room for messages in flight (fetched, not settled); taken by the fetcher, given back
    /// when messages are settled.
    permits: Semaphore,
    phase: watch::Receiver<u8>,
    acks: Mutex<AckBuf>,
    ack_notify: Notify,
    /// A quarter of the in-flight limit waits for its ack: the acker stops lingering.
    ack_full: Notify,
}

/// A parsed topic and its metric handles (observability on).
type TopicEntry = (Topic, Option<Arc<ConsumerTopic>>);

/// Entries [`Shared::topic_of_name`] keeps per thread (over every consumer on the thread;
/// cleared when full).
const TOPICS_HERE_MAX: usize = 4096;

/// (consumer id, address of the topic's shared text) → the name and its entry.
type TopicsHere = FastMap<(u64, usize), (crate::envelope::TopicName, TopicEntry)>;

thread_local! {
    static TOPICS_HERE: std::cell::RefCell<TopicsHere> =
        std::cell::RefCell::new(HashMap::with_hasher(FastHash::new()));
}

/// Numbers consumers for [`TOPICS_HERE`] (an address could be reused by a later consumer).
static NEXT_CONSUMER_ID: AtomicU64 = AtomicU64::new(1);

/// What one handling attempt did, for its span, metrics and log line.
struct Attempt {
    /// `None` with observability off.
    handles: Option<Arc<ConsumerTopic>>,
    /// `ok`, `retry`, `dlq`, `skipped`, `deferred` (same dedupe key busy), `released`.
    result: &'static str,
    dlq_code: Option<DlqCode>,
    /// Index into [`crate::obs::RETRY_REASONS`].
    retry_reason: usize,
    latency_ms: Option<f64>,
}

impl Attempt {
    /// A message going round again takes its topic's metric handles with it.
    fn give_back(&mut self, step: Step) -> Step {
        match step {
            Step::Retry(mut item, delay) => {
                if item.metrics.is_none() {
                    item.metrics = self.handles.take();
                }
                Step::Retry(item, delay)
            }
            step => step,
        }
    }

    fn off() -> Attempt {
        Attempt {
            handles: None,
            result: "released",
            dlq_code: None,
            retry_reason: 0,
            latency_ms: None,
        }
    }
}

/// How often a running consumer reads its lag into `bus_consumer_lag` (at most).
const LAG_POLL: Duration = Duration::from_secs(1);

/// A lag read may take at most this share of the time between two reads: reading the lag can
/// cost in proportion to the backlog (the embedded log counts the matching messages after the
/// positions), and a poll every second over a deep backlog took a fifth of the consumer's CPU.
const LAG_POLL_SHARE: u32 = 50;

/// The pause after a lag read that took `took`: [`LAG_POLL`], or longer when the read was slow.
fn lag_poll_pause(took: Duration) -> Duration {
    LAG_POLL.max(took.saturating_mul(LAG_POLL_SHARE))
}

async fn run_lag_poller(shared: Arc<Shared>) {
    let mut phase = shared.phase.clone();
    loop {
        let started = Instant::now();
        match shared.bus.consumer_lag(&shared.name).await {
            Ok(Some(l)) => {
                shared
                    .lag_gauge
                    .set(i64::try_from(l.pending).unwrap_or(i64::MAX));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(consumer = %shared.name, error = %e, "lag read failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(lag_poll_pause(started.elapsed())) => {}
            _ = wait_phase(&mut phase, DRAINING) => return,
        }
    }
}

/// How long a message waits when another one with the same dedupe key is being handled.
const CLAIM_WAIT: Duration = Duration::from_millis(5);

/// In-process claim on dedupe keys while a handler runs; released on drop.
/// Where a dedupe key of this process stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mark {
    /// A message with this key is being handled now.
    Handling,
    /// Handled Ok; its dedupe record is not written yet.
    Pending,
    /// Recorded while a message looked up before the record may still be in the runtime.
    Recorded,
}

/// What a claim on a message's keys found.
enum Claimed<'a> {
    /// The keys are this message's until the claim is dropped or promoted.
    Taken(Claim<'a>),
    /// Another message with one of the keys is being handled: wait and claim again.
    Busy,
    /// One of the keys was applied by this process (pending or recorded): skip the message.
    Applied,
}

/// The dedupe keys this process knows, one map under one lock: a key moves from `Handling` to
/// `Pending` (handled Ok) to `Recorded` (record written). A recorded key matters only to a
/// message whose batch was looked up in the store before the record was written (the store
/// answered "not applied"); every later lookup finds the record in the store. So a recorded
/// key is kept while a batch opened before its record still has a message in the runtime
/// (a message holds its batch's [`Lookup`] until it leaves), and forgotten after — which
/// keeps the map about as large as what is in flight. `cap` bounds it whatever happens (a
/// message stuck behind a slow key for a long time): past it the oldest records go.
struct KeyBook {
    marks: FastMap<DKey, Mark>,
    /// Recorded keys with the newest batch open when they were recorded, oldest first.
    order: VecDeque<(DKey, u64)>,
    /// Batches opened and not known to be finished, oldest first.
    batches: VecDeque<(u64, std::sync::Weak<Lookup>)>,
    /// The newest batch opened.
    last_epoch: u64,
    cap: usize,
}

impl KeyBook {
    fn new(cap: usize) -> KeyBook {
        KeyBook {
            marks: HashMap::with_hasher(FastHash::new()),
            order: VecDeque::new(),
            batches: VecDeque::new(),
            last_epoch: 0,
            cap,
        }
    }

    /// A new batch's lookup, numbered after every batch before it.
    fn open_batch(&mut self) -> Arc<Lookup> {
        self.last_epoch += 1;
        // Records written after this are kept until the batch's last message has left.
        let l = Arc::new(Lookup::default());
        self.batches
            .push_back((self.last_epoch, Arc::downgrade(&l)));
        l
    }

    /// The oldest batch that still has a message in the runtime (or the next one).
    fn oldest_live(&mut self) -> u64 {
        while let Some((_, w)) = self.batches.front() {
            if w.strong_count() > 0 {
                break;
            }
            self.batches.pop_front();
        }
        self.batches
            .front()
            .map_or(self.last_epoch + 1, |(epoch, _)| *epoch)
    }

    fn mark(&self, k: &DKey) -> Option<Mark> {
        if self.marks.is_empty() {
            return None;
        }
        self.marks.get(k).copied()
    }

    /// True when one of `keys` was applied here (pending or recorded).
    fn applied(&self, keys: &Keys) -> bool {
        keys.iter()
            .any(|k| matches!(self.mark(k), Some(Mark::Pending | Mark::Recorded)))
    }

    /// True when one of `keys` is known here in any state.
    fn known(&self, keys: &[DKey]) -> bool {
        keys.iter().any(|k| self.mark(k).is_some())
    }

    /// The keys of a message that handled Ok: pending until recorded.
    fn promote(&mut self, keys: &Keys) {
        for k in keys.iter() {
            if let Some(m) = self.marks.get_mut(k) {
                *m = Mark::Pending;
            }
        }
    }

    /// Keys whose records were written (or given up on); forgets the records no message in
    /// the runtime can need any more.
    fn record(&mut self, keys: &[DKey]) {
        // Every batch opened so far may have been looked up before these records were
        // written; batches opened from now on are looked up after.
        let epoch = self.last_epoch;
        for k in keys {
            match self.marks.get_mut(k) {
                Some(m) if *m == Mark::Recorded => continue,
                Some(m) => *m = Mark::Recorded,
                None => {
                    self.marks.insert(k.clone(), Mark::Recorded);
                }
            }
            self.order.push_back((k.clone(), epoch));
        }
        let live = self.oldest_live();
        while let Some((_, at)) = self.order.front() {
            if *at >= live && self.order.len() <= self.cap {
                break;
            }
            if let Some((old, _)) = self.order.pop_front()
                && self.marks.get(&old) == Some(&Mark::Recorded)
            {
                self.marks.remove(&old);
            }
        }
    }
}

/// The claim of a message on its dedupe keys while it is handled: released on drop, or
/// promoted to pending when the message was handled Ok.
struct Claim<'a> {
    book: &'a Mutex<KeyBook>,
    keys: Keys,
    settled: bool,
}

impl<'a> Claim<'a> {
    fn take(book: &'a Mutex<KeyBook>, keys: &Keys) -> Claimed<'a> {
        let mut b = book.lock().unwrap_or_else(|p| p.into_inner());
        let mut applied = false;
        for k in keys.iter() {
            match b.mark(k) {
                Some(Mark::Handling) => return Claimed::Busy,
                Some(_) => applied = true,
                None => {}
            }
        }
        if applied {
            return Claimed::Applied;
        }
        for k in keys.iter() {
            b.marks.insert(k.clone(), Mark::Handling);
        }
        Claimed::Taken(Claim {
            book,
            keys: keys.clone(),
            settled: false,
        })
    }

    /// Handled Ok: the keys stay, pending their record.
    fn promote(mut self) {
        self.settled = true;
        self.book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .promote(&self.keys);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut b = self.book.lock().unwrap_or_else(|p| p.into_inner());
        for k in self.keys.iter() {
            if b.marks.get(k) == Some(&Mark::Handling) {
                b.marks.remove(k);
            }
        }
    }
}

enum Step {
    Finished,
    Retry(Item, Duration),
}

/// How many parsed topics a consumer keeps (see `Shared::topics`).
const TOPIC_CACHE_MAX: usize = 4096;

async fn wait_phase(rx: &mut watch::Receiver<u8>, at_least: u8) {
    loop {
        if *rx.borrow_and_update() >= at_least {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Whether the consumer still runs, as seen by `rx` (cheap: one atomic load while nothing
/// changed; a dropped handle counts as stopped).
fn still_running(rx: &mut watch::Receiver<u8>) -> bool {
    match rx.has_changed() {
        Ok(false) => *rx.borrow() == RUNNING,
        Ok(true) => *rx.borrow_and_update() == RUNNING,
        Err(_) => false,
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

async fn run_fetcher(shared: Arc<Shared>, sub: Box<dyn crate::transport::Subscription>) {
    // Fetching and preparing overlap: the next fetch runs while the previous batch is
    // prepared and queued. The preparer never waits for a dedupe lookup: it queues the batch
    // (its messages wait, in their keys' order, until the lookup answers) and starts the
    // lookup on a task of its own, so lookups of later batches overlap the handling of
    // earlier ones.
    let (tx, mut rx) = mpsc::channel::<(Vec<Delivery>, Instant)>(2);
    let prep = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some((got, at)) = rx.recv().await {
                shared.enqueue(got, at);
            }
        })
    };
    fetch_loop(&shared, sub, tx).await;
    // The sender is gone: the preparer queues what it holds and ends.
    let _ = prep.await;
}

async fn fetch_loop(
    shared: &Arc<Shared>,
    mut sub: Box<dyn crate::transport::Subscription>,
    tx: mpsc::Sender<(Vec<Delivery>, Instant)>,
) {
    let mut phase = shared.phase.clone();
    loop {
        if *phase.borrow() != RUNNING {
            break;
        }
        tokio::select! {
            p = shared.permits.acquire() => match p {
                Ok(p) => p.forget(),
                Err(_) => break,
            },
            _ = wait_phase(&mut phase, DRAINING) => break,
        }
        let mut room = 1usize;
        let more = shared.permits.available_permits().min(FETCH_BATCH - 1);
        if more > 0
            && let Ok(p) = shared.permits.try_acquire_many(more as u32)
        {
            p.forget();
            room += more;
        }
        match sub.fetch(room, FETCH_WAIT).await {
            Ok(got) => {
                if got.len() < room {
                    shared.permits.add_permits(room - got.len());
                }
                if got.is_empty() {
                    continue;
                }
                let before = shared
                    .counters
                    .fetched
                    .fetch_add(got.len() as u64, Ordering::SeqCst);
                shared.lag_clock.on_fetch(before + got.len() as u64, &got);
                shared.sync_inflight();
                if let Err(mpsc::error::SendError((got, at))) = tx.send((got, Instant::now())).await
                {
                    // Cannot happen while this loop runs (the preparer outlives it); release
                    // rather than hold anything unsettled.
                    for d in got {
                        shared.release(ItemData::new(d, at)).await;
                    }
                }
            }
            Err(e) => {
                shared.permits.add_permits(room);
                tracing::warn!(consumer = %shared.name, error = %e, "fetch failed; retrying");
                tokio::time::sleep(FETCH_WAIT).await;
            }
        }
    }
}

/// Extends the leases of messages waiting in the per-key queues (behind a slow handler or a
/// parked retry) so that they are not delivered again while they wait. A key whose queue is
/// out for refreshing is blocked like a parked key, so its order holds.
async fn run_refresher(shared: Arc<Shared>) {
    let every = (shared.ack_deadline / 3).max(Duration::from_millis(10));
    let mut phase = shared.phase.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wait_phase(&mut phase, DRAINING) => return,
        }
        let Some(cutoff) = Instant::now().checked_sub(every) else {
            continue;
        };
        let due: Vec<(u32, VecDeque<Item>)> = {
            let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
            let mut due = Vec::new();
            for (id, ks) in s.slots.iter_mut().enumerate() {
                if !ks.refreshing && ks.queue.iter().any(|it| it.refreshed <= cutoff) {
                    ks.refreshing = true;
                    due.push((id as u32, std::mem::take(&mut ks.queue)));
                }
            }
            due
        };
        for (id, mut queue) in due {
            for it in queue.iter_mut().filter(|it| it.refreshed <= cutoff) {
                if let Err(e) = it.delivery.in_progress().await {
                    tracing::warn!(consumer = %shared.name, error = %e, "lease extension failed");
                }
                it.refreshed = Instant::now();
            }
            let queued = {
                let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                let ks = &mut s.slots[id as usize];
                // A strict retry parked meanwhile goes first; arrivals go last.
                let mut merged = VecDeque::with_capacity(queue.len() + ks.queue.len());
                while ks.queue.front().is_some_and(|it| it.parked_head) {
                    merged.extend(ks.queue.pop_front());
                }
                merged.extend(queue);
                merged.extend(ks.queue.drain(..));
                ks.queue = merged;
                ks.refreshing = false;
                s.make_ready(id)
            };
            if queued {
                shared.notify.notify_one();
            }
        }
    }
}

/// Messages one worker takes under one lock when its handler answers at once: run one after
/// the other, their keys freed together under the next lock. A handler that awaits takes one
/// at a time, so that `workers` of them wait concurrently.
const RUN_MAX: usize = 32;

/// How long a run may take before its remaining messages are handed back: a handler that
/// answers at once but slowly must not hold messages outside their queues, where their
/// leases are not extended.
const RUN_BUDGET: Duration = Duration::from_millis(2);

async fn run_worker(shared: Arc<Shared>) {
    let mut phase = shared.phase.clone();
    // Keys this worker's last run finished: freed, and the next run taken, under one lock.
    let mut finished: Vec<u32> = Vec::new();
    let mut run: Vec<(u32, Item)> = Vec::new();
    loop {
        if !still_running(&mut phase) {
            if !finished.is_empty() {
                let woke = {
                    let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                    finished.drain(..).filter(|id| s.finish(*id)).count()
                };
                shared.wake(woke);
            }
            return;
        }
        let limit = if shared.answers_at_once.load(Ordering::Relaxed) {
            RUN_MAX
        } else {
            1
        };
        let mut more = shared.take_run(&mut finished, &mut run, limit);
        if run.is_empty() {
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            more = shared.take_run(&mut finished, &mut run, limit);
            if run.is_empty() {
                tokio::select! {
                    _ = notified => {}
                    _ = wait_phase(&mut phase, DRAINING) => return,
                }
                continue;
            }
        }
        if more {
            // Another ready key may be waiting for a worker: pass the wake-up on.
            shared.notify.notify_one();
        }
        let started = Instant::now();
        let mut rest = run.drain(..);
        while let Some((id, item)) = rest.next() {
            if let Some(id) = shared.run_one(id, item).await {
                finished.push(id);
            }
            if rest.len() > 0 && started.elapsed() > RUN_BUDGET {
                // Slower than a run is meant to be: the rest go back to their keys' queues
                // (where the refresher extends their leases) for any worker to take.
                let back: Vec<(u32, Item)> = rest.by_ref().collect();
                shared.untake(back);
            }
        }
    }
}

/// Gathers finished messages for [`ACK_LINGER`] after the first, then records and acks them
/// as one batch; on close, flushes what is left and stops.
async fn run_acker(shared: Arc<Shared>) {
    let mut phase = shared.phase.clone();
    let mut handle_dropped = false;
    let mut spare: Vec<DKey> = Vec::new();
    loop {
        let closing = shared.acks_closing();
        if !closing {
            tokio::select! {
                biased;
                _ = shared.ack_notify.notified() => {}
                // The handle was dropped without shutdown: flush what is queued, then stop.
                _ = async { while phase.changed().await.is_ok() {} }, if !handle_dropped => {
                    handle_dropped = true;
                    shared.acks.lock().unwrap_or_else(|p| p.into_inner()).closing = true;
                }
            }
        }
        let closing = shared.acks_closing();
        if !closing {
            // Gather for a moment, but not while the fetcher is starved of permits.
            tokio::select! {
                _ = tokio::time::sleep(ACK_LINGER) => {}
                _ = shared.ack_full.notified() => {}
            }
        }
        let (deliveries, keys, closing) = {
            let mut a = shared.acks.lock().unwrap_or_else(|p| p.into_inner());
            // The next batch gets a buffer of this one's size: one allocation per batch,
            // not a doubling series of reallocations while workers push.
            let cap = a.deliveries.len().max(16);
            let d = std::mem::replace(&mut a.deliveries, Vec::with_capacity(cap));
            let k = std::mem::replace(&mut a.keys, std::mem::take(&mut spare));
            if closing && d.is_empty() {
                a.closed = true;
            }
            (d, k, a.closing)
        };
        let stop = closing && deliveries.is_empty();
        if !deliveries.is_empty() {
            spare = shared.flush(deliveries, keys).await;
        }
        if stop {
            break;
        }
    }
}

impl Shared {
    fn phase(&self) -> u8 {
        *self.phase.borrow()
    }

    fn count_dlq(&self, code: DlqCode) {
        self.counters.dead_lettered[code.index()].fetch_add(1, Ordering::SeqCst);
    }

    /// The topic of a delivered message, parsed once per distinct topic, with its metric
    /// handles.
    fn topic_of(&self, raw: &str) -> Result<TopicEntry> {
        if let Some(hit) = self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(raw)
        {
            return Ok(hit.clone());
        }
        let t = Topic::parse(raw)?;
        let m = self.obs_on.then(|| self.topic_metrics(t.as_str()));
        let mut c = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= TOPIC_CACHE_MAX {
            c.clear();
        }
        c.insert(raw.to_owned(), (t.clone(), m.clone()));
        Ok((t, m))
    }

    /// [`Shared::topic_of`] through entries kept per thread, found by the address of the
    /// name's shared text (the embedded log and NATS hand out one text per topic): no lock,
    /// and no hashing or comparing of the topic's text, per message on the workers.
    fn topic_of_name(&self, name: &crate::envelope::TopicName) -> Result<TopicEntry> {
        if name.is_empty() {
            return self.topic_of(name);
        }
        let key = (self.id, name.addr());
        let hit = TOPICS_HERE.with(|c| c.borrow().get(&key).map(|(_, e)| e.clone()));
        if let Some(e) = hit {
            return Ok(e);
        }
        let e = self.topic_of(name)?;
        TOPICS_HERE.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= TOPICS_HERE_MAX {
                c.clear();
            }
            // The name is kept with its entry: its text, and so its address, stays this
            // topic's while the entry exists.
            c.insert(key, (name.clone(), e.clone()));
        });
        Ok(e)
    }

    /// Parses the topic and normalises the headers of a delivered message, and takes its
    /// dedupe keys (dedupe on).
    fn prepare(&self, item: &mut Item) -> Result<()> {
        let env = &mut item.delivery.envelope;
        let (topic, metrics) = self.topic_of_name(&env.topic)?;
        item.metrics = metrics;
        let h = &env.headers;
        let headers = if h.message_uuid().is_some()
            && h.produced_at_micros().is_some()
            && h.trace_ids().is_some()
        {
            // Canonical already (parsed when the transport built the headers): normalising
            // would rewrite nothing, so the message takes these headers instead of a copy;
            // `restore_headers` gives them back to the envelope before a dead letter.
            let mut headers = std::mem::take(&mut env.headers);
            if let Err(e) = headers.normalize_for_consume() {
                // A failed check changes nothing: the envelope gets them back as they came.
                env.headers = headers;
                return Err(e);
            }
            item.headers_moved = true;
            headers
        } else {
            let mut headers = env.headers.clone();
            headers.normalize_for_consume()?;
            headers
        };
        if self.dedupe.is_some() {
            item.keys = Keys::of(&headers, topic.domain());
        }
        item.prepared = Some((topic, headers));
        Ok(())
    }

    /// Queues a fetched batch by key. With dedupe on, its messages are prepared here and wait
    /// for one lookup of all their keys, started on a task of its own.
    fn enqueue(self: &Arc<Self>, got: Vec<Delivery>, at: Instant) {
        // Boxes of finished items first (no allocation), new ones for the rest.
        let mut items: Vec<Item> = Vec::with_capacity(got.len());
        {
            let mut a = self.acks.lock().unwrap_or_else(|p| p.into_inner());
            let from = a.spare.len().saturating_sub(got.len());
            items.extend(a.spare.drain(from..));
        }
        let reused = items.len();
        for (i, d) in got.into_iter().enumerate() {
            match items.get_mut(i) {
                Some(b) if i < reused => **b = ItemData::fresh(d, at),
                _ => items.push(ItemData::new(d, at)),
            }
        }
        let mut lookup: Option<(Arc<Lookup>, Vec<DKey>)> = None;
        if self.dedupe.is_some() {
            let l = self
                .book
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .open_batch();
            let mut keys = Vec::with_capacity(items.len());
            for it in items.iter_mut() {
                // A message that does not prepare is dead-lettered by its worker.
                if self.prepare(it).is_ok() && !it.keys.is_empty() {
                    it.lookup = Some((l.clone(), keys.len() as u32));
                    keys.extend(it.keys.iter().cloned());
                }
            }
            if !keys.is_empty() {
                lookup = Some((l, keys));
            }
        }
        let mut slots = Vec::new();
        let mut woke = 0usize;
        {
            let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
            for it in items {
                let key = it.headers().partition_key().unwrap_or_default();
                let id = s.slot(key);
                if lookup.is_some() && it.lookup.is_some() {
                    slots.push(id);
                }
                if s.push(id, it) {
                    woke += 1;
                }
            }
        }
        self.wake(woke);
        if let (Some((l, keys)), Some(store)) = (lookup, self.dedupe.clone()) {
            let shared = self.clone();
            tokio::spawn(async move {
                let mut bufs = Vec::new();
                let strs = key_strs(&keys, &mut bufs);
                let answer = match store.lookup_batch(&shared.name, &strs).await {
                    Ok(flags) if flags.len() == keys.len() => Some(flags),
                    Ok(_) => {
                        tracing::warn!(consumer = %shared.name, "batch dedupe lookup gave a wrong count; checking one by one");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %shared.name, error = %e, "batch dedupe lookup failed; checking one by one");
                        None
                    }
                };
                let _ = l.done.set(answer);
                let woke = {
                    let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                    slots.into_iter().filter(|id| s.make_ready(*id)).count()
                };
                shared.wake(woke);
            });
        }
    }

    /// Frees the keys in `finished` and takes up to `limit` ready messages into `run`, under
    /// one lock; true when more keys are ready than were taken.
    fn take_run(&self, finished: &mut Vec<u32>, run: &mut Vec<(u32, Item)>, limit: usize) -> bool {
        let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        for id in finished.drain(..) {
            s.finish(id);
        }
        while run.len() < limit {
            match s.take() {
                Some(next) => run.push(next),
                None => break,
            }
        }
        !s.ready.is_empty()
    }

    /// Puts messages taken in a run and not started back at the head of their keys' queues.
    fn untake(&self, back: Vec<(u32, Item)>) {
        let mut woke = 0;
        {
            let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
            for (id, item) in back {
                let ks = &mut s.slots[id as usize];
                ks.busy = false;
                ks.queue.push_front(item);
                if s.make_ready(id) {
                    woke += 1;
                }
            }
        }
        self.wake(woke);
    }

    /// Wakes workers for `n` keys made ready.
    fn wake(&self, n: usize) {
        match n {
            0 => {}
            1 => self.notify.notify_one(),
            _ => self.notify.notify_waiters(),
        }
    }

    /// Handles one message of key `id`; returns the key when it is free for its next message.
    async fn run_one(self: &Arc<Self>, id: u32, item: Item) -> Option<u32> {
        match self.process(item).await {
            Step::Finished => Some(id),
            step => {
                self.after(id, step).await;
                None
            }
        }
    }

    fn done(&self, mut item: Item, keys: Keys) {
        let delivery = std::mem::replace(&mut item.delivery, Delivery::placeholder());
        // The message's buffers go now, not when the box is next used; so does its hold on
        // the key book's records (its batch's lookup).
        item.msg = None;
        item.prepared = None;
        item.lookup = None;
        let waiting = {
            let mut a = self.acks.lock().unwrap_or_else(|p| p.into_inner());
            if a.closed {
                drop(a);
                tracing::error!(consumer = %self.name, sequence = delivery.info.sequence, "acker gone; message will be redelivered");
                return;
            }
            a.deliveries.push(delivery);
            for k in keys.0.into_iter().flatten() {
                a.keys.push(k);
            }
            let waiting = a.deliveries.len();
            if a.spare.len() < SPARE_ITEMS {
                a.spare.push(item);
            }
            waiting
        };
        if waiting == 1 {
            self.ack_notify.notify_one();
        }
        if waiting == (self.max_in_flight / 4).max(1) {
            self.ack_full.notify_one();
        }
    }

    async fn release(&self, item: Item) {
        self.counters.released.fetch_add(1, Ordering::SeqCst);
        self.counters.settled.fetch_add(1, Ordering::SeqCst);
        self.sync_inflight();
        self.permits.add_permits(1);
        if let Err((e, _)) = item.delivery.nack(Duration::ZERO).await {
            tracing::warn!(consumer = %self.name, error = %e, "release failed; the ack deadline will redeliver");
        }
    }

    /// Records and acks one batch; gives back the (emptied) key buffer for reuse.
    async fn flush(&self, deliveries: Vec<Delivery>, mut keys: Vec<DKey>) -> Vec<DKey> {
        let count = deliveries.len();
        let mut todo = deliveries;
        let mut tries = 0;
        while !todo.is_empty() {
            // Dedupe records first (or in the same transaction, on a store that lives with the
            // transport), then acks: a crash in between redelivers what dedupe then skips.
            let result = match &self.dedupe {
                Some(store) => {
                    let mut bufs = Vec::new();
                    let strs = key_strs(&keys, &mut bufs);
                    store.commit_batch(&self.name, &strs, todo).await
                }
                None => Delivery::ack_all(todo).await,
            };
            match result {
                Ok(()) => break,
                Err((e, failed)) => {
                    tries += 1;
                    // A broker that is away (restarting, failing over) gets asked again for
                    // as long as the consumer runs: giving up would leave the messages
                    // unacknowledged until their lease runs out, handled but not settled.
                    // Meanwhile the fetcher waits for permits. Errors that another try cannot
                    // mend, and a consumer shutting down, get a few tries only.
                    let transient = matches!(e.kind(), ErrorKind::Transport | ErrorKind::Timeout);
                    if tries >= ACK_TRIES && (!transient || self.acks_closing()) {
                        tracing::error!(consumer = %self.name, error = %e, count = failed.len(), tries, "ack failed; messages will be redelivered");
                        break;
                    }
                    if tries == ACK_TRIES {
                        tracing::warn!(consumer = %self.name, error = %e, count = failed.len(), "ack failing; retrying until the broker answers");
                    }
                    tokio::time::sleep(self.retry.backoff(tries.min(ACK_TRIES)).min(ACK_RETRY_MAX))
                        .await;
                    todo = failed;
                }
            }
        }
        if !keys.is_empty() {
            self.book
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(&keys);
        }
        keys.clear();
        self.counters
            .settled
            .fetch_add(count as u64, Ordering::SeqCst);
        self.sync_inflight();
        self.permits.add_permits(count);
        keys
    }

    /// Whether a retry of `item` parks its key (strict order).
    fn strict_for(&self, item: &Item) -> bool {
        self.strict.unwrap_or_else(|| {
            let domain = match (&item.msg, &item.prepared) {
                (Some(m), _) => Some(m.topic.domain()),
                (None, Some((t, _))) => Some(t.domain()),
                (None, None) => item
                    .delivery
                    .envelope
                    .topic
                    .split('.')
                    .nth(2)
                    .and_then(|d| d.parse().ok()),
            };
            domain.is_some_and(|d| STRICT_DOMAINS.contains(&d))
        })
    }

    async fn after(self: &Arc<Self>, id: u32, step: Step) {
        let wake = match step {
            Step::Finished => self
                .sched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .finish(id),
            Step::Retry(item, delay) if self.strict_for(&item) => {
                {
                    let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                    let ks = &mut s.slots[id as usize];
                    ks.busy = false;
                    ks.parked = true;
                    let mut item = item;
                    item.parked_head = true;
                    ks.queue.push_front(item);
                }
                let shared = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let queued = {
                        let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(ks) = s.slots.get_mut(id as usize) {
                            ks.parked = false;
                        }
                        s.make_ready(id)
                    };
                    if queued {
                        shared.notify.notify_one();
                    }
                });
                false
            }
            Step::Retry(item, delay) => {
                let (rid, wake) = {
                    let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                    let rid = s.next_id;
                    s.next_id += 1;
                    s.delayed.insert(rid, (id, item));
                    let ks = &mut s.slots[id as usize];
                    ks.delayed += 1;
                    ks.busy = false;
                    (rid, s.make_ready(id))
                };
                let shared = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let queued = {
                        let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                        match s.delayed.remove(&rid) {
                            Some((id, it)) => {
                                s.slots[id as usize].delayed -= 1;
                                s.push(id, it)
                            }
                            None => false,
                        }
                    };
                    if queued {
                        shared.notify.notify_one();
                    }
                });
                wake
            }
        };
        if wake {
            self.notify.notify_one();
        }
    }

    async fn process_attempt(&self, mut item: Item, att: &mut Attempt) -> Step {
        if item.msg.is_none() {
            // The prepared headers stay in the item until the message is built, so that a
            // dead letter or a retry from here finds them (they may have been moved out of
            // the envelope).
            if item.prepared.is_none()
                && let Err(e) = self.prepare(&mut item)
            {
                let reason = DlqCode::ContractViolation.reason(&e.to_string());
                return self
                    .dead_letter(item, DlqCode::ContractViolation, reason, att)
                    .await;
            }
            let Some((topic, headers)) = item.prepared.as_ref() else {
                unreachable!("prepared above");
            };
            if let Some(detail) = self
                .schemas
                .as_ref()
                .and_then(|g| g.mismatch(topic, headers))
            {
                let reason = DlqCode::SchemaMismatch.reason(&detail);
                return self
                    .dead_letter(item, DlqCode::SchemaMismatch, reason, att)
                    .await;
            }
            let env = &item.delivery.envelope;
            if env.payload.len() > self.max_payload {
                let reason = DlqCode::PayloadTooLarge.reason(&format!(
                    "{} bytes as carried; this consumer's limit is {}",
                    env.payload.len(),
                    self.max_payload
                ));
                return self
                    .dead_letter(item, DlqCode::PayloadTooLarge, reason, att)
                    .await;
            }
            // A payload carried inline and not compressed is handed over as it came (the
            // codec would copy it).
            let plain = headers.blob_ref().is_none()
                && !headers
                    .content_encoding()
                    .is_some_and(|ce| ce.eq_ignore_ascii_case("gzip"));
            let decoded = if plain {
                Ok(env.payload.clone())
            } else {
                self.bus
                    .codec()
                    .decode_detailed(headers, &env.payload)
                    .await
            };
            match decoded {
                Ok(payload) if payload.len() > self.max_payload => {
                    let reason = DlqCode::PayloadTooLarge.reason(&format!(
                        "{} bytes after decoding; this consumer's limit is {}",
                        payload.len(),
                        self.max_payload
                    ));
                    return self
                        .dead_letter(item, DlqCode::PayloadTooLarge, reason, att)
                        .await;
                }
                Ok(payload) => {
                    let (topic, headers) = item.prepared.take().expect("prepared above");
                    item.msg = Some(Message {
                        topic,
                        headers,
                        payload,
                        info: item.delivery.info.clone(),
                    });
                }
                Err((DecodeFailure::Decode, e)) => {
                    let reason = DlqCode::DecodeError.reason(&e.to_string());
                    return self
                        .dead_letter(item, DlqCode::DecodeError, reason, att)
                        .await;
                }
                Err((DecodeFailure::BlobHashMismatch, e)) => {
                    let reason = DlqCode::BlobHashMismatch.reason(&e.to_string());
                    return self
                        .dead_letter(item, DlqCode::BlobHashMismatch, reason, att)
                        .await;
                }
                Err((DecodeFailure::BlobUnavailable, e)) => {
                    let attempt = self.next_attempt(&mut item);
                    item.last_error = e.to_string();
                    return {
                        att.retry_reason = 1;
                        self.retry_or_give_up(item, attempt, None, att).await
                    };
                }
            }
        }
        // Taken out while the handler borrows it; put back before the item moves on.
        let msg = item.msg.take().expect("prepared above");
        let mut claim = None;
        if self.dedupe.is_some() {
            // Two messages with one dedupe key (e.g. the same `dedupe_key` under different
            // partition keys) never run at once here: the later one waits and then re-checks.
            // A key this process applied since the batch lookup (pending or recorded) makes
            // it a duplicate, also for a retry whose twin was applied meanwhile.
            match Claim::take(&self.book, &item.keys) {
                Claimed::Taken(c) => claim = Some(c),
                Claimed::Busy => {
                    item.msg = Some(msg);
                    att.result = "deferred";
                    self.counters.deferred.fetch_add(1, Ordering::SeqCst);
                    return Step::Retry(item, CLAIM_WAIT);
                }
                Claimed::Applied => {
                    item.msg = Some(msg);
                    att.result = "skipped";
                    self.counters.skipped.fetch_add(1, Ordering::SeqCst);
                    self.done(item, Keys::default());
                    return Step::Finished;
                }
            }
            if !item.dedupe_checked {
                item.dedupe_checked = true;
                // The lookup stays with the message until it leaves the runtime: while it is
                // held, the key book keeps every record written since the batch was looked up.
                let answer = item.lookup.as_ref().and_then(|(l, first)| {
                    // Read in place: the batch's flags are shared by all its messages.
                    l.done.get().and_then(Option::as_ref).map(|flags| {
                        let first = *first as usize;
                        flags[first..first + item.keys.len()].iter().any(|b| *b)
                    })
                });
                let applied = match answer {
                    // Looked up with its batch; what this process applied since was found
                    // by the claim.
                    Some(pre) => pre,
                    None => self.already_applied(&item.keys).await,
                };
                if applied {
                    att.result = "skipped";
                    self.counters.skipped.fetch_add(1, Ordering::SeqCst);
                    self.done(item, Keys::default());
                    return Step::Finished;
                }
            }
        }
        let attempt = self.next_attempt(&mut item);
        if item.local_attempts > 1 {
            let _ = item.delivery.in_progress().await;
            item.refreshed = Instant::now();
        }
        let now_us = crate::ids::now_micros();
        // Written at most once a millisecond: every worker on every core would otherwise
        // write this one cache line per message.
        if now_us.saturating_sub(self.last_message_us.load(Ordering::Relaxed)) >= 1000 {
            self.last_message_us.store(now_us, Ordering::Relaxed);
        }
        if let Some(h) = &att.handles {
            let produced = msg
                .headers
                .produced_at_micros()
                .or_else(|| msg.headers.produced_at_time().map(|t| t.timestamp_micros()));
            if let Some(t) = produced {
                let ms = (now_us.saturating_sub(t)) as f64 / 1000.0;
                let ms = ms.max(0.0);
                h.delivery_latency.observe(ms);
                att.latency_ms = Some(ms);
            }
        }
        let started = att.handles.is_some().then(Instant::now);
        // A handler that answers at once (`handle_now`) needs no future.
        let now = std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.handle_now(&msg)));
        let at_once = !matches!(now, Ok(None));
        if self.answers_at_once.load(Ordering::Relaxed) != at_once {
            self.answers_at_once.store(at_once, Ordering::Relaxed);
        }
        let outcome = if let Some(now) = now.transpose() {
            Some(now)
        } else {
            let mut fut =
                std::pin::pin!(AssertUnwindSafe(self.handler.handle(&msg)).catch_unwind());
            // Most handlers finish in their first poll: no timer, no watch until they do not.
            match futures::poll!(fut.as_mut()) {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending => {
                    let beat = (self.ack_deadline / 3).max(Duration::from_millis(10));
                    let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
                    let mut phase = self.phase.clone();
                    loop {
                        tokio::select! {
                            r = &mut fut => break Some(r),
                            _ = hb.tick() => {
                                let _ = item.delivery.in_progress().await;
                            }
                            _ = wait_phase(&mut phase, HARD_STOP) => break None,
                        }
                    }
                }
            }
        };
        item.msg = Some(msg);
        if let (Some(h), Some(started)) = (&att.handles, started) {
            h.handler_duration
                .observe(started.elapsed().as_secs_f64() * 1000.0);
        }
        match outcome {
            None => {
                att.result = "released";
                self.release(item).await;
                Step::Finished
            }
            Some(Err(panic)) => {
                let reason = DlqCode::HandlerPanic.reason(&panic_message(panic.as_ref()));
                self.dead_letter(item, DlqCode::HandlerPanic, reason, att)
                    .await
            }
            Some(Ok(Outcome::Ok)) => {
                let keys = match claim.take() {
                    Some(c) => {
                        c.promote();
                        std::mem::take(&mut item.keys)
                    }
                    None => Keys::default(),
                };
                self.counters.handled_ok.fetch_add(1, Ordering::SeqCst);
                att.result = "ok";
                if let Some(h) = &att.handles {
                    h.consumed.inc();
                }
                self.done(item, keys);
                Step::Finished
            }
            Some(Ok(Outcome::DeadLetter(r))) => {
                let code = DlqCode::from_reason(&r);
                let (code, reason) = if r.contains(':') && code != DlqCode::Other {
                    (
                        code,
                        DlqCode::reason(code, r.split_once(':').map_or("", |x| x.1)),
                    )
                } else {
                    (DlqCode::HandlerError, DlqCode::HandlerError.reason(&r))
                };
                self.dead_letter(item, code, reason, att).await
            }
            Some(Ok(Outcome::Retry { after })) => {
                item.last_error = format!("attempt {attempt}: handler asked to retry");
                self.retry_or_give_up(item, attempt, after, att).await
            }
            Some(Ok(Outcome::Failed { after, cause })) => {
                item.last_error = format!("attempt {attempt}: {cause}");
                self.retry_or_give_up(item, attempt, after, att).await
            }
        }
    }

    /// One handling attempt, observed: the metrics of its domain-level topic, a debug log
    /// line with its result, and — when the tracer records — a consumer span (child of the
    /// message's `traceparent`) with the handler running in its context.
    async fn process(&self, mut item: Item) -> Step {
        if !self.obs_on {
            return self.process_attempt(item, &mut Attempt::off()).await;
        }
        if item.metrics.is_none() && item.msg.is_none() && item.prepared.is_none() {
            // Not prepared yet (dedupe off): the topic's handles come with its parse, which
            // `process_attempt` then finds done (a failure is met again there and
            // dead-lettered).
            let _ = self.prepare(&mut item);
        }
        // Taken, not cloned (a clone and a drop per message of a count every worker shares);
        // a retry gets them back below.
        let handles = match item.metrics.take() {
            Some(h) => h,
            // A topic that does not parse is labelled `invalid`.
            None => self.topic_metrics("invalid"),
        };
        let mut att = Attempt {
            handles: Some(handles),
            result: "released",
            dlq_code: None,
            retry_reason: 0,
            latency_ms: None,
        };
        let log = tracing::enabled!(tracing::Level::DEBUG);
        if !self.tracer.is_recording() && !log {
            let step = self.process_attempt(item, &mut att).await;
            return att.give_back(step);
        }
        let env = &item.delivery.envelope;
        let (topic_label, headers) = match (&item.msg, &item.prepared) {
            (Some(m), _) => (m.topic.as_str(), &m.headers),
            (None, Some((t, h))) => (t.as_str(), h),
            (None, None) if item.metrics.is_some() => (env.topic.as_str(), &env.headers),
            (None, None) => ("invalid", &env.headers),
        };
        let span = self.tracer.start_consume(topic_label, headers, &self.name);
        let ids = log.then(|| {
            (
                env.topic.clone(),
                headers.message_id().unwrap_or_default().to_owned(),
            )
        });
        let step = if self.tracer.is_recording() {
            let cx = span.context().clone();
            self.process_attempt(item, &mut att).with_context(cx).await
        } else {
            self.process_attempt(item, &mut att).await
        };
        if let Some((topic, message_id)) = ids {
            tracing::debug!(
                consumer = %self.name,
                topic = %topic,
                message_id = %message_id,
                trace_id = %span.trace_id(),
                result = att.result,
                latency_ms = att.latency_ms,
                "message handled"
            );
        }
        span.end(att.result, att.dlq_code.map(DlqCode::as_str));
        att.give_back(step)
    }

    /// The metric handles of one domain-level topic, resolved once.
    fn topic_metrics(&self, topic: &str) -> Arc<ConsumerTopic> {
        let key = crate::obs::domain_topic(topic);
        if let Some(h) = self
            .topic_metrics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return h.clone();
        }
        let h = Arc::new(self.bus.metrics().consumer_topic(key, &self.name));
        self.topic_metrics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), h.clone());
        h
    }

    fn sync_inflight(&self) {
        if self.obs_on {
            let c = &self.counters;
            let n = c
                .fetched
                .load(Ordering::SeqCst)
                .saturating_sub(c.settled.load(Ordering::SeqCst));
            self.inflight_gauge
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// True when this process applied one of `keys` (recorded or not yet).
    fn applied_here(&self, keys: &Keys) -> bool {
        !keys.is_empty()
            && self
                .book
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .applied(keys)
    }

    fn next_attempt(&self, item: &mut Item) -> u32 {
        item.local_attempts += 1;
        item.delivery.info.delivery_count.saturating_sub(1) + item.local_attempts
    }

    /// Asks the store about one message (its batch lookup failed): what this process applied
    /// and has not recorded yet counts too.
    async fn already_applied(&self, keys: &Keys) -> bool {
        if keys.is_empty() {
            return false;
        }
        if self.applied_here(keys) {
            return true;
        }
        match &self.dedupe {
            None => false,
            Some(store) => {
                let texts = key_texts(&keys.iter().cloned().collect::<Vec<_>>());
                match store.is_applied(&self.name, &texts).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(consumer = %self.name, error = %e, "dedupe lookup failed; handling the message");
                        false
                    }
                }
            }
        }
    }

    async fn retry_or_give_up(
        &self,
        item: Item,
        attempt: u32,
        after: Option<Duration>,
        att: &mut Attempt,
    ) -> Step {
        if attempt >= self.retry.max_attempts.max(1) {
            let reason = DlqCode::MaxRetries.reason(&item.last_error);
            return self
                .dead_letter(item, DlqCode::MaxRetries, reason, att)
                .await;
        }
        if self.phase() != RUNNING {
            att.result = "released";
            self.release(item).await;
            return Step::Finished;
        }
        self.counters.retried.fetch_add(1, Ordering::SeqCst);
        att.result = "retry";
        if let Some(h) = &att.handles {
            h.retry[att.retry_reason].inc();
        }
        let delay = after
            .unwrap_or_else(|| self.retry.backoff(attempt))
            .min(self.ack_deadline / 2);
        let mut item = item;
        let _ = item.delivery.in_progress().await;
        item.refreshed = Instant::now();
        Step::Retry(item, delay)
    }

    async fn dead_letter(
        &self,
        mut item: Item,
        code: DlqCode,
        reason: String,
        att: &mut Attempt,
    ) -> Step {
        item.restore_headers();
        let env = &item.delivery.envelope;
        let info = &item.delivery.info;
        // Attempts in this life of the message, on top of what it carried in (a redriven
        // message arrives with the count of its earlier lives), so the history is kept.
        let attempts = info
            .delivery_count
            .max(info.delivery_count.saturating_sub(1) + item.local_attempts);
        let carried = env.headers.retry_count().unwrap_or(0);
        let retry_count = carried.saturating_add(attempts);
        let dlq_topic = dlq_topic_for(&env.topic, &self.pattern);
        let dlq = build_dlq_envelope(env, &dlq_topic, &reason, retry_count, &self.name);
        let mut tries = 0u32;
        let mut phase = self.phase.clone();
        loop {
            match self.bus.publish_wire(vec![dlq.clone()]).await {
                Ok(_) => break,
                Err(e) => {
                    tries += 1;
                    tracing::warn!(consumer = %self.name, error = %e, tries, topic = %dlq_topic, "DLQ write failed; retrying (original not acked)");
                    let pause = self.retry.backoff(tries.min(16));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = wait_phase(&mut phase, HARD_STOP) => {
                            att.result = "released";
                            self.release(item).await;
                            return Step::Finished;
                        }
                    }
                    let _ = item.delivery.in_progress().await;
                }
            }
        }
        tracing::warn!(
            consumer = %self.name,
            topic = %env.topic,
            message_id = env.headers.message_id().unwrap_or_default(),
            dlq = %dlq_topic,
            reason = code.as_str(),
            result = "dlq",
            "message dead-lettered"
        );
        self.count_dlq(code);
        att.result = "dlq";
        att.dlq_code = Some(code);
        if let Some(h) = &att.handles {
            h.dlq[code.index()].inc();
            if let Some(c) = &h.decode_fail[code.index()] {
                c.inc();
            }
        }
        self.done(item, Keys::default());
        Step::Finished
    }
}

/// The replay store of a consumer whose handler dedupes by itself (an inbox): it knows nothing
/// and records nothing, so every replayed message reaches the handler, which skips it when its
/// inbox row exists.
struct HandlerDedupes;

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
struct LiveAwareDedupe {
    shared: Arc<Shared>,
}

impl LiveAwareDedupe {
    fn keys(keys: &[String]) -> Vec<DKey> {
        keys.iter().map(|k| DKey::parse(k)).collect()
    }

    fn known(&self, keys: &[DKey]) -> bool {
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

#[cfg(test)]
mod tests {
    /// A record is kept while a batch looked up before it still has a message in the runtime,
    /// forgotten once none has (at the next record), and `cap` bounds the book regardless.
    #[test]
    fn key_book_keeps_records_while_an_earlier_batch_is_in_flight() {
        use super::{DKey, KeyBook, Keys};
        let key = |i: u128| DKey::Id(i);
        let one = |i: u128| Keys([Some(key(i)), None]);
        let mut b = KeyBook::new(1000);
        let early = b.open_batch();
        b.record(&[key(1), key(2)]);
        // A later batch was looked up after the records: it does not hold them.
        let late = b.open_batch();
        drop(late);
        b.record(&[key(3)]);
        assert!(b.applied(&one(1)) && b.applied(&one(2)) && b.applied(&one(3)));
        // The early batch's last message leaves: the next record forgets what it no longer
        // needs (all of it: no batch is open any more).
        drop(early);
        b.record(&[key(4)]);
        assert!(!b.applied(&one(1)) && !b.applied(&one(2)) && !b.applied(&one(3)));
        assert!(!b.applied(&one(4)), "no batch in flight needs key 4");
        assert_eq!(b.order.len(), 0);
        // Keys being handled or pending are never forgotten by recording others.
        let held = b.open_batch();
        b.marks.insert(key(9), super::Mark::Pending);
        b.record(&[key(5)]);
        drop(held);
        b.record(&[key(6)]);
        assert!(b.applied(&one(9)));
        // The cap bounds the records even while a batch holds them.
        let mut b = KeyBook::new(3);
        let _stuck = b.open_batch();
        b.record(&[key(1), key(2), key(3), key(4), key(5)]);
        assert_eq!(b.order.len(), 3);
        assert!(!b.applied(&one(1)) && !b.applied(&one(2)));
        assert!(b.applied(&one(3)) && b.applied(&one(5)));
    }

    #[test]
    fn a_slow_lag_read_spaces_out_the_next() {
        assert_eq!(super::lag_poll_pause(Duration::ZERO), super::LAG_POLL);
        assert_eq!(
            super::lag_poll_pause(Duration::from_millis(10)),
            super::LAG_POLL
        );
        assert_eq!(
            super::lag_poll_pause(Duration::from_millis(300)),
            Duration::from_secs(15)
        );
    }

    use super::*;

    #[test]
    fn canonical_forms_parse_exactly() {
        let id = "018f5e2f-9b1c-46aa-8f7a-3b1d8f3ea0c2";
        let v = canonical_uuid(id).unwrap();
        let mut buf = [0u8; 36];
        assert_eq!(key_text(&DKey::Id(v), &mut buf), id);
        assert!(canonical_uuid("018F5E2F-9B1C-46AA-8F7A-3B1D8F3EA0C2").is_none());
        assert!(canonical_uuid("018f5e2f9b1c46aa8f7a3b1d8f3ea0c2").is_none());
        assert_eq!(
            DKey::parse("orders:co_1"),
            DKey::Text(Arc::from("orders:co_1"))
        );
    }

    #[test]
    fn idle_keys_are_swept_and_slots_reused() {
        let mut s = Sched::new();
        s.sweep_at = 4;
        let ids: Vec<u32> = (0..4).map(|i| s.slot(&format!("k{i}"))).collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
        s.slots[1].busy = true;
        // The fifth key sweeps the three idle ones and reuses a slot.
        let id = s.slot("k4");
        assert!(id != 1 && id < 4);
        assert_eq!(s.index.len(), 2);
        assert_eq!(s.slot("k1"), 1);
    }
}
