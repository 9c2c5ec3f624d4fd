//! The consumer: fetch → per-key FIFO → workers → batched ack.

use super::dlq::{build_dlq_envelope, dlq_topic_for};
use super::{DlqCode, Handler, Message, Outcome, RetryPolicy};
use crate::bus::Bus;
use crate::codec::DecodeFailure;
use crate::dedupe::{DedupeStore, dedupe_keys};
use crate::error::{Error, ErrorKind, Result};
use crate::headers::names;
use crate::obs::{BusTracer, ConsumerTopic};
use crate::topic::{Topic, TopicPattern};
use crate::transport::{Delivery, StartAt, SubscribeSpec};
use futures::FutureExt;
use opentelemetry::context::FutureExt as OtelFutureExt;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const HARD_STOP: u8 = 2;

/// Largest fetch per round trip.
const FETCH_BATCH: usize = 256;
/// How long one fetch waits for messages (also bounds how fast shutdown stops fetching).
const FETCH_WAIT: Duration = Duration::from_millis(100);
/// How long the acker gathers finished messages before one flush.
const ACK_LINGER: Duration = Duration::from_millis(2);
/// Largest ack batch.
const ACK_BATCH: usize = 1024;

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
            workers: 8,
            max_in_flight: 1024,
            retry: RetryPolicy::default(),
            strict: None,
            dedupe: DedupeChoice::Default,
            ack_deadline: Duration::from_secs(30),
            start: StartAt::Earliest,
            serve_replays: true,
            max_payload: DEFAULT_MAX_PAYLOAD,
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
/// * **Strict mode** (default for the `orders` and `fills` domains): a message waiting for a
///   retry parks its key; later messages of that key wait until it succeeds or is
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
    workers: usize,
    max_in_flight: usize,
    retry: RetryPolicy,
    strict: Option<bool>,
    dedupe: DedupeChoice,
    ack_deadline: Duration,
    start: StartAt,
    serve_replays: bool,
    max_payload: usize,
}

impl std::fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("pattern", &self.pattern.as_str())
            .field("name", &self.name)
            .field("workers", &self.workers)
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

    /// Number of concurrent handlers (default 8, at least 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
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

    /// The dedupe store shared by every instance of this consumer name.
    pub fn dedupe(mut self, store: Arc<dyn DedupeStore>) -> Self {
        self.dedupe = DedupeChoice::Store(store);
        self
    }

    /// Turns dedupe off (every delivery reaches the handler).
    pub fn without_dedupe(mut self) -> Self {
        self.dedupe = DedupeChoice::Off;
        self
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
    /// [`DEFAULT_MAX_PAYLOAD`], 64 MiB); a larger one is dead-lettered with
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

    /// Subscribes and spawns the fetcher, the workers and the acker (and the replay control
    /// listener, see [`ConsumerBuilder::serve_replays`]).
    pub async fn start(self) -> Result<ConsumerHandle> {
        let serve = self.serve_replays && self.bus.replay().is_some();
        let bus = self.bus.clone();
        let pattern = self.pattern.clone();
        let mut handle = self.start_inner().await?;
        if serve {
            match super::control::start_listener(
                bus,
                &handle.shared.name,
                pattern,
                handle.shared.handler.clone(),
                handle.shared.dedupe.as_ref().map(|_| {
                    Arc::new(LiveAwareDedupe {
                        shared: handle.shared.clone(),
                    }) as Arc<dyn DedupeStore>
                }),
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

    async fn start_inner(self) -> Result<ConsumerHandle> {
        let handler = self
            .handler
            .ok_or_else(|| Error::new(ErrorKind::Config, "consumer: no handler set"))?;
        if self.name.trim().is_empty() {
            return Err(Error::new(ErrorKind::Config, "consumer: empty name"));
        }
        let strict = self.strict.unwrap_or_else(|| {
            matches!(
                self.pattern.as_str().split('.').nth(2),
                Some("orders") | Some("fills")
            )
        });
        let dedupe: Option<Arc<dyn DedupeStore>> = match self.dedupe {
            DedupeChoice::Off => None,
            DedupeChoice::Store(s) => Some(s),
            DedupeChoice::Default if self.bus.transport().dedupe_store().is_some() => {
                self.bus.transport().dedupe_store()
            }
            DedupeChoice::Default => {
                tracing::warn!(consumer = %self.name, "no dedupe store configured for this transport; dedupe is off");
                None
            }
        };
        let spec = SubscribeSpec {
            pattern: self.pattern.clone(),
            durable: Some(self.name.clone()),
            start: self.start,
            ack_deadline: self.ack_deadline,
        };
        let sub = self.bus.subscribe(spec).await?;
        let (phase_tx, phase_rx) = watch::channel(RUNNING);
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
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
            bus: self.bus,
            pattern: self.pattern,
            name: self.name,
            handler,
            retry: self.retry,
            strict,
            ack_deadline: self.ack_deadline,
            max_payload: self.max_payload,
            dedupe,
            pending: Mutex::new(HashSet::new()),
            handling: Mutex::new(HashSet::new()),
            topics: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::new(65_536 + 4 * self.max_in_flight)),
            sched: Mutex::new(Sched::default()),
            notify: Notify::new(),
            counters: Counters::default(),
            permits: Arc::new(Semaphore::new(self.max_in_flight)),
            phase: phase_rx,
            ack_tx,
        });
        let acker = tokio::spawn(run_acker(shared.clone(), ack_rx));
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
        let workers = (0..self.workers)
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

    /// Whether strict per-key order is on.
    pub fn is_strict(&self) -> bool {
        self.shared.strict
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
        let leftovers = {
            let mut s = self.shared.sched.lock().unwrap_or_else(|p| p.into_inner());
            let mut items = Vec::new();
            for (_, ks) in s.keys.drain() {
                items.extend(ks.queue);
            }
            items.extend(s.delayed.drain().map(|(_, (_, it))| it));
            s.ready.clear();
            items
        };
        for item in leftovers {
            self.shared.release(item).await;
        }
        let _ = self.shared.ack_tx.send(AckMsg::Close);
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

    /// When a message last reached this consumer's handler (`None`: not yet); see
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
            in_flight: c
                .fetched
                .load(Ordering::SeqCst)
                .saturating_sub(c.settled.load(Ordering::SeqCst)),
        }
    }
}

struct Item {
    delivery: Delivery,
    _permit: Option<OwnedSemaphorePermit>,
    local_attempts: u32,
    msg: Option<Message>,
    dedupe_checked: bool,
    /// Topic and normalised headers, prepared by the fetcher for the batch dedupe lookup.
    prepared: Option<(Topic, crate::headers::Headers)>,
    /// The batch lookup's answer (fetch time): `Some(true)` applied already.
    pre_applied: Option<bool>,
    last_error: String,
    /// When the lease was last taken or extended.
    refreshed: Instant,
    /// Put back at the head of its key's queue by a strict retry.
    parked_head: bool,
}

#[derive(Default)]
struct KeyState {
    queue: VecDeque<Item>,
    busy: bool,
    parked: bool,
    /// The refresher has the queue out to extend leases.
    refreshing: bool,
    in_ready: bool,
}

#[derive(Default)]
struct Sched {
    keys: HashMap<String, KeyState>,
    ready: VecDeque<String>,
    delayed: HashMap<u64, (String, Item)>,
    next_id: u64,
}

impl Sched {
    /// Queues `key` for a worker if it can run now; true if it was queued.
    fn make_ready(&mut self, key: &str) -> bool {
        let Some(ks) = self.keys.get_mut(key) else {
            return false;
        };
        let blocked = ks.busy || ks.parked || ks.refreshing;
        if !blocked && !ks.in_ready && !ks.queue.is_empty() {
            ks.in_ready = true;
            self.ready.push_back(key.to_owned());
            return true;
        }
        if !blocked && ks.queue.is_empty() {
            self.keys.remove(key);
        }
        false
    }

    fn push(&mut self, key: String, item: Item) -> bool {
        self.keys
            .entry(key.clone())
            .or_default()
            .queue
            .push_back(item);
        self.make_ready(&key)
    }

    fn take(&mut self) -> Option<(String, Item)> {
        while let Some(key) = self.ready.pop_front() {
            let Some(ks) = self.keys.get_mut(&key) else {
                continue;
            };
            ks.in_ready = false;
            if ks.busy || ks.parked || ks.refreshing {
                continue;
            }
            if let Some(mut item) = ks.queue.pop_front() {
                item.parked_head = false;
                ks.busy = true;
                return Some((key, item));
            }
        }
        None
    }
}

// A `Delivery` is large (the headers' typed slots live inline); it moves once per message.
#[allow(clippy::large_enum_variant)]
enum AckMsg {
    Done {
        delivery: Delivery,
        keys: Vec<String>,
        _permit: Option<OwnedSemaphorePermit>,
    },
    Close,
}

struct Shared {
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
    retry: RetryPolicy,
    strict: bool,
    ack_deadline: Duration,
    max_payload: usize,
    dedupe: Option<Arc<dyn DedupeStore>>,
    /// Keys handled Ok whose dedupe record is not written yet.
    pending: Mutex<HashSet<String>>,
    /// Dedupe keys of messages being handled right now.
    handling: Mutex<HashSet<String>>,
    /// Topics already parsed, by their text: a consumer sees few distinct topics, so each is
    /// parsed and validated once (bounded by [`TOPIC_CACHE_MAX`]; cleared when full).
    topics: Mutex<HashMap<String, Topic>>,
    /// Keys this process recorded lately (moved here from `pending` by the acker), so that a
    /// batch lookup made at fetch time cannot miss what was applied here since.
    recent: Mutex<Recent>,
    sched: Mutex<Sched>,
    notify: Notify,
    counters: Counters,
    permits: Arc<Semaphore>,
    phase: watch::Receiver<u8>,
    ack_tx: mpsc::UnboundedSender<AckMsg>,
}

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

/// How often a running consumer reads its lag into `bus_consumer_lag`.
const LAG_POLL: Duration = Duration::from_secs(1);

async fn run_lag_poller(shared: Arc<Shared>) {
    let mut phase = shared.phase.clone();
    loop {
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
            _ = tokio::time::sleep(LAG_POLL) => {}
            _ = wait_phase(&mut phase, DRAINING) => return,
        }
    }
}

/// How long a message waits when another one with the same dedupe key is being handled.
const CLAIM_WAIT: Duration = Duration::from_millis(5);

/// In-process claim on dedupe keys while a handler runs; released on drop.
struct Claim<'a> {
    set: &'a Mutex<HashSet<String>>,
    keys: Vec<String>,
}

impl<'a> Claim<'a> {
    fn take(set: &'a Mutex<HashSet<String>>, keys: &[String]) -> Option<Claim<'a>> {
        let mut s = set.lock().unwrap_or_else(|p| p.into_inner());
        if keys.iter().any(|k| s.contains(k)) {
            return None;
        }
        s.extend(keys.iter().cloned());
        Some(Claim {
            set,
            keys: keys.to_vec(),
        })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut s = self.set.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            s.remove(k);
        }
    }
}

/// A bounded set of the most recently recorded dedupe keys (oldest forgotten first).
struct Recent {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Recent {
    fn new(cap: usize) -> Recent {
        Recent {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn insert(&mut self, key: String) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn contains_any(&self, keys: &[String]) -> bool {
        keys.iter().any(|k| self.set.contains(k))
    }
}

enum Step {
    Finished,
    Retry(Box<Item>, Duration),
}

/// How many parsed topics a consumer keeps (see `Shared::topics`).
const TOPIC_CACHE_MAX: usize = 4096;

/// Parses the topic (once per distinct topic, through `cache`) and normalises the headers of
/// a delivered envelope.
fn prepare(
    cache: &Mutex<HashMap<String, Topic>>,
    env: &crate::Envelope,
) -> Result<(Topic, crate::headers::Headers)> {
    let cached = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(env.topic.as_str())
        .cloned();
    let topic = match cached {
        Some(t) => t,
        None => {
            let t = Topic::parse(&env.topic)?;
            let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
            if c.len() >= TOPIC_CACHE_MAX {
                c.clear();
            }
            c.insert(env.topic.clone(), t.clone());
            t
        }
    };
    let mut headers = env.headers.clone();
    headers.normalize_for_consume()?;
    Ok((topic, headers))
}

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
    // Fetching and preparing (batch dedupe lookup, then queueing by key) overlap: the next
    // fetch runs while the previous batch is prepared. One preparer keeps batches in order.
    let (tx, mut rx) = mpsc::channel::<Vec<(String, Item)>>(2);
    let prep = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(mut items) = rx.recv().await {
                shared.pre_check(&mut items).await;
                for (key, item) in items {
                    let queued = shared
                        .sched
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(key, item);
                    if queued {
                        shared.notify.notify_one();
                    }
                }
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
    tx: mpsc::Sender<Vec<(String, Item)>>,
) {
    let mut phase = shared.phase.clone();
    loop {
        if *phase.borrow() != RUNNING {
            break;
        }
        let first = tokio::select! {
            p = shared.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = wait_phase(&mut phase, DRAINING) => break,
        };
        let mut permits = vec![first];
        while permits.len() < FETCH_BATCH {
            match shared.permits.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        match sub.fetch(permits.len(), FETCH_WAIT).await {
            Ok(got) => {
                shared
                    .counters
                    .fetched
                    .fetch_add(got.len() as u64, Ordering::SeqCst);
                shared.sync_inflight();
                let items: Vec<(String, Item)> = got
                    .into_iter()
                    .map(|d| {
                        let key = d
                            .envelope
                            .headers
                            .get(names::PARTITION_KEY)
                            .unwrap_or_default()
                            .to_owned();
                        let item = Item {
                            delivery: d,
                            _permit: permits.pop(),
                            local_attempts: 0,
                            msg: None,
                            dedupe_checked: false,
                            prepared: None,
                            pre_applied: None,
                            last_error: String::new(),
                            refreshed: Instant::now(),
                            parked_head: false,
                        };
                        (key, item)
                    })
                    .collect();
                if let Err(mpsc::error::SendError(items)) = tx.send(items).await {
                    // Cannot happen while this loop runs (the preparer outlives it); release
                    // rather than hold anything unsettled.
                    for (_, item) in items {
                        shared.release(item).await;
                    }
                }
            }
            Err(e) => {
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
        let due: Vec<(String, VecDeque<Item>)> = {
            let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
            let mut due = Vec::new();
            for (k, ks) in s.keys.iter_mut() {
                if !ks.refreshing && ks.queue.iter().any(|it| it.refreshed <= cutoff) {
                    ks.refreshing = true;
                    due.push((k.clone(), std::mem::take(&mut ks.queue)));
                }
            }
            due
        };
        for (key, mut queue) in due {
            for it in queue.iter_mut().filter(|it| it.refreshed <= cutoff) {
                if let Err(e) = it.delivery.in_progress().await {
                    tracing::warn!(consumer = %shared.name, error = %e, "lease extension failed");
                }
                it.refreshed = Instant::now();
            }
            let queued = {
                let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                let ks = s.keys.entry(key.clone()).or_default();
                // A strict retry parked meanwhile goes first; arrivals go last.
                let mut merged = VecDeque::with_capacity(queue.len() + ks.queue.len());
                while ks.queue.front().is_some_and(|it| it.parked_head) {
                    merged.extend(ks.queue.pop_front());
                }
                merged.extend(queue);
                merged.extend(ks.queue.drain(..));
                ks.queue = merged;
                ks.refreshing = false;
                s.make_ready(&key)
            };
            if queued {
                shared.notify.notify_one();
            }
        }
    }
}

async fn run_worker(shared: Arc<Shared>) {
    let mut phase = shared.phase.clone();
    loop {
        if *phase.borrow() != RUNNING {
            return;
        }
        let notified = shared.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = shared
            .sched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some((key, item)) = next else {
            tokio::select! {
                _ = notified => {}
                _ = wait_phase(&mut phase, DRAINING) => return,
            }
            continue;
        };
        // Another ready key may be waiting for a worker: pass the wake-up on.
        if !shared
            .sched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ready
            .is_empty()
        {
            shared.notify.notify_one();
        }
        let step = shared.process(item).await;
        shared.after(key, step).await;
    }
}

async fn run_acker(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<AckMsg>) {
    let mut closing = false;
    let mut phase = shared.phase.clone();
    let mut handle_dropped = false;
    while !closing {
        let first = tokio::select! {
            biased;
            m = rx.recv() => m,
            // The handle was dropped without shutdown: flush what is queued, then stop.
            _ = async { while phase.changed().await.is_ok() {} }, if !handle_dropped => {
                handle_dropped = true;
                Some(AckMsg::Close)
            }
        };
        let Some(first) = first else {
            break;
        };
        let mut batch = Vec::new();
        match first {
            AckMsg::Close => closing = true,
            m => batch.push(m),
        }
        if !closing {
            tokio::time::sleep(ACK_LINGER).await;
        }
        while batch.len() < ACK_BATCH {
            match rx.try_recv() {
                Ok(AckMsg::Close) => closing = true,
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if closing {
            while let Ok(m) = rx.try_recv() {
                if !matches!(m, AckMsg::Close) {
                    batch.push(m);
                }
            }
        }
        shared.flush(batch).await;
    }
}

impl Shared {
    fn phase(&self) -> u8 {
        *self.phase.borrow()
    }

    fn count_dlq(&self, code: DlqCode) {
        self.counters.dead_lettered[code.index()].fetch_add(1, Ordering::SeqCst);
    }

    fn done(&self, item: Item, keys: Vec<String>) {
        let msg = AckMsg::Done {
            delivery: item.delivery,
            keys,
            _permit: item._permit,
        };
        if let Err(mpsc::error::SendError(AckMsg::Done { delivery, .. })) = self.ack_tx.send(msg) {
            tracing::error!(consumer = %self.name, sequence = delivery.info.sequence, "acker gone; message will be redelivered");
        }
    }

    async fn release(&self, item: Item) {
        self.counters.released.fetch_add(1, Ordering::SeqCst);
        self.counters.settled.fetch_add(1, Ordering::SeqCst);
        self.sync_inflight();
        if let Err((e, _)) = item.delivery.nack(Duration::ZERO).await {
            tracing::warn!(consumer = %self.name, error = %e, "release failed; the ack deadline will redeliver");
        }
    }

    async fn flush(&self, batch: Vec<AckMsg>) {
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut keys = Vec::new();
        let mut permits = Vec::with_capacity(batch.len());
        for m in batch {
            if let AckMsg::Done {
                delivery,
                keys: k,
                _permit,
            } = m
            {
                deliveries.push(delivery);
                keys.extend(k);
                permits.push(_permit);
            }
        }
        let count = deliveries.len() as u64;
        let mut todo = deliveries;
        let mut tries = 0;
        while !todo.is_empty() {
            // Dedupe records first (or in the same transaction, on a store that lives with the
            // transport), then acks: a crash in between redelivers what dedupe then skips.
            let result = match &self.dedupe {
                Some(store) => store.record_and_ack(&self.name, &keys, todo).await,
                None => Delivery::ack_all(todo).await,
            };
            match result {
                Ok(()) => break,
                Err((e, failed)) => {
                    tries += 1;
                    if tries >= 5 {
                        tracing::error!(consumer = %self.name, error = %e, count = failed.len(), "ack failed; messages will be redelivered");
                        break;
                    }
                    tokio::time::sleep(self.retry.backoff(tries)).await;
                    todo = failed;
                }
            }
        }
        if !keys.is_empty() {
            // Into `recent` before leaving `pending`, so a check never sees neither.
            {
                let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                for k in &keys {
                    r.insert(k.clone());
                }
            }
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for k in &keys {
                p.remove(k);
            }
        }
        self.counters.settled.fetch_add(count, Ordering::SeqCst);
        self.sync_inflight();
        drop(permits);
    }

    async fn after(self: &Arc<Self>, key: String, step: Step) {
        let wake = match step {
            Step::Finished => {
                let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(ks) = s.keys.get_mut(&key) {
                    ks.busy = false;
                }
                s.make_ready(&key)
            }
            Step::Retry(item, delay) if self.strict => {
                {
                    let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                    let ks = s.keys.entry(key.clone()).or_default();
                    ks.busy = false;
                    ks.parked = true;
                    let mut item = *item;
                    item.parked_head = true;
                    ks.queue.push_front(item);
                }
                let shared = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let queued = {
                        let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(ks) = s.keys.get_mut(&key) {
                            ks.parked = false;
                        }
                        s.make_ready(&key)
                    };
                    if queued {
                        shared.notify.notify_one();
                    }
                });
                false
            }
            Step::Retry(item, delay) => {
                let (id, wake) = {
                    let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                    let id = s.next_id;
                    s.next_id += 1;
                    s.delayed.insert(id, (key.clone(), *item));
                    if let Some(ks) = s.keys.get_mut(&key) {
                        ks.busy = false;
                    }
                    (id, s.make_ready(&key))
                };
                let shared = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let queued = {
                        let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                        match s.delayed.remove(&id) {
                            Some((k, it)) => s.push(k, it),
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
            let env = &item.delivery.envelope;
            let (topic, headers) = match item.prepared.take() {
                Some(p) => p,
                None => match prepare(&self.topics, env) {
                    Ok(p) => p,
                    Err(e) => {
                        let reason = DlqCode::ContractViolation.reason(&e.to_string());
                        return self
                            .dead_letter(item, DlqCode::ContractViolation, reason, att)
                            .await;
                    }
                },
            };
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
            match self
                .bus
                .codec()
                .decode_detailed(&headers, &env.payload)
                .await
            {
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
        let keys = dedupe_keys(&msg.headers, msg.topic.domain());
        // Two messages with one dedupe key (e.g. the same `dedupe_key` under different
        // partition keys) never run at once here: the later one waits and then re-checks.
        let Some(_claim) = Claim::take(&self.handling, &keys) else {
            item.msg = Some(msg);
            att.result = "deferred";
            return Step::Retry(Box::new(item), CLAIM_WAIT);
        };
        if !item.dedupe_checked {
            item.dedupe_checked = true;
            let applied = match item.pre_applied {
                // Looked up with its batch at fetch time; what this process applied since is
                // in `pending` or `recent`.
                Some(pre) => pre || self.applied_here(&keys),
                None => self.already_applied(&keys).await,
            };
            if applied {
                att.result = "skipped";
                self.counters.skipped.fetch_add(1, Ordering::SeqCst);
                self.done(item, Vec::new());
                return Step::Finished;
            }
        }
        let attempt = self.next_attempt(&mut item);
        if item.local_attempts > 1 {
            let _ = item.delivery.in_progress().await;
            item.refreshed = Instant::now();
        }
        let started = Instant::now();
        if let Some(h) = &att.handles {
            let now = chrono::Utc::now();
            self.last_message_us
                .store(now.timestamp_micros(), Ordering::Relaxed);
            if let Some(t) = msg.headers.produced_at_time() {
                let ms = (now - t).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0;
                let ms = ms.max(0.0);
                h.delivery_latency.observe(ms);
                att.latency_ms = Some(ms);
            }
        } else {
            self.last_message_us
                .store(chrono::Utc::now().timestamp_micros(), Ordering::Relaxed);
        }
        let outcome = {
            let fut = AssertUnwindSafe(self.handler.handle(&msg)).catch_unwind();
            tokio::pin!(fut);
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
        };
        item.msg = Some(msg);
        if let Some(h) = &att.handles {
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
                let keys = if self.dedupe.is_some() {
                    self.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(keys.iter().cloned());
                    keys
                } else {
                    Vec::new()
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
        }
    }

    /// One handling attempt, observed: a consumer span (child of the message's
    /// `traceparent`) around it with the handler running in its context, the metrics of its
    /// domain-level topic, and a debug log line with its result.
    async fn process(&self, item: Item) -> Step {
        if !self.obs_on {
            return self.process_attempt(item, &mut Attempt::off()).await;
        }
        let env = &item.delivery.envelope;
        let (topic_label, headers) = match (&item.msg, &item.prepared) {
            (Some(m), _) => (m.topic.as_str(), &m.headers),
            (None, Some((t, h))) => (t.as_str(), h),
            // Not parsed yet: a topic that does not parse is labelled `invalid`.
            (None, None) if Topic::parse(&env.topic).is_ok() => (env.topic.as_str(), &env.headers),
            (None, None) => ("invalid", &env.headers),
        };
        let span = self.tracer.start_consume(topic_label, headers, &self.name);
        let mut att = Attempt {
            handles: Some(self.topic_metrics(topic_label)),
            result: "released",
            dlq_code: None,
            retry_reason: 0,
            latency_ms: None,
        };
        let log = tracing::enabled!(tracing::Level::DEBUG);
        let ids = log.then(|| {
            (
                env.topic.clone(),
                headers.message_id().unwrap_or_default().to_owned(),
            )
        });
        let cx = span.context().clone();
        let step = self.process_attempt(item, &mut att).with_context(cx).await;
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
        step
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
    fn applied_here(&self, keys: &[String]) -> bool {
        if keys.is_empty() {
            return false;
        }
        {
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if keys.iter().any(|k| p.contains(k)) {
                return true;
            }
        }
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_any(keys)
    }

    /// Whether a message with these keys is being handled by this consumer right now.
    fn handling_now(&self, keys: &[String]) -> bool {
        let h = self.handling.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter().any(|k| h.contains(k))
    }

    /// Prepares a fetched batch and asks the dedupe store about all of its keys in one call.
    async fn pre_check(&self, items: &mut [(String, Item)]) {
        let Some(store) = &self.dedupe else {
            return;
        };
        let mut all = Vec::new();
        let mut per_item = Vec::with_capacity(items.len());
        for (_, item) in items.iter_mut() {
            match prepare(&self.topics, &item.delivery.envelope) {
                Ok((topic, headers)) => {
                    let keys = dedupe_keys(&headers, topic.domain());
                    all.extend(keys.iter().cloned());
                    per_item.push(Some(keys));
                    item.prepared = Some((topic, headers));
                }
                Err(_) => per_item.push(None),
            }
        }
        if all.is_empty() {
            return;
        }
        match store.applied_among(&self.name, &all).await {
            Ok(applied) => {
                for ((_, item), keys) in items.iter_mut().zip(per_item) {
                    if let Some(keys) = keys {
                        item.pre_applied = Some(keys.iter().any(|k| applied.contains(k)));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(consumer = %self.name, error = %e, "batch dedupe lookup failed; checking one by one");
            }
        }
    }

    fn next_attempt(&self, item: &mut Item) -> u32 {
        item.local_attempts += 1;
        item.delivery.info.delivery_count.saturating_sub(1) + item.local_attempts
    }

    async fn already_applied(&self, keys: &[String]) -> bool {
        if keys.is_empty() {
            return false;
        }
        {
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if keys.iter().any(|k| p.contains(k)) {
                return true;
            }
        }
        match &self.dedupe {
            None => false,
            Some(store) => match store.is_applied(&self.name, keys).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(consumer = %self.name, error = %e, "dedupe lookup failed; handling the message");
                    false
                }
            },
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
        Step::Retry(Box::new(item), delay)
    }

    async fn dead_letter(
        &self,
        item: Item,
        code: DlqCode,
        reason: String,
        att: &mut Attempt,
    ) -> Step {
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
        self.done(item, Vec::new());
        Step::Finished
    }
}

/// The dedupe store a consumer's replays use: what the live path applied but has not recorded
/// yet (`pending`), recorded lately (`recent`) or is handling right now counts as applied, so a
/// replay that arrives while the live path is finishing a message never applies it twice.
struct LiveAwareDedupe {
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl DedupeStore for LiveAwareDedupe {
    async fn is_applied(&self, consumer: &str, keys: &[String]) -> Result<bool> {
        if self.shared.applied_here(keys) || self.shared.handling_now(keys) {
            return Ok(true);
        }
        match &self.shared.dedupe {
            Some(store) => store.is_applied(consumer, keys).await,
            None => Ok(false),
        }
    }

    async fn record_applied(&self, consumer: &str, keys: &[String]) -> Result<()> {
        match &self.shared.dedupe {
            Some(store) => store.record_applied(consumer, keys).await,
            None => Ok(()),
        }
    }
}
