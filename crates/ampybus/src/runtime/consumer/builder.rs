//! [`ConsumerBuilder`]: what a consumer is configured with, and how it starts.

use super::*;

/// Default [`ConsumerBuilder::max_payload_bytes`]: 64 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = crate::codec::DEFAULT_MAX_INFLATED;

pub(super) enum DedupeChoice {
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
    pub(super) bus: Bus,
    pub(super) pattern: TopicPattern,
    pub(super) name: String,
    pub(super) handler: Option<Arc<dyn Handler>>,
    pub(super) workers: Option<usize>,
    /// Workers when [`ConsumerBuilder::workers`] was not called (8; an inbox's choice).
    pub(super) default_workers: usize,
    pub(super) max_in_flight: usize,
    pub(super) retry: RetryPolicy,
    pub(super) strict: Option<bool>,
    pub(super) dedupe: DedupeChoice,
    pub(super) ack_deadline: Duration,
    pub(super) start: StartAt,
    pub(super) serve_replays: bool,
    /// The handler skips what was applied before by itself (an inbox): replays need no store.
    pub(super) handler_dedupes: bool,
    pub(super) max_payload: usize,
    pub(super) shed: crate::runtime::ShedOptions,
    pub(super) lag_alert: Duration,
    pub(super) heal: Option<crate::runtime::feeds::GapHealer>,
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
    pub fn best_effort_queue(mut self, opts: crate::runtime::ShedOptions) -> Self {
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
    pub fn inbox(self, inbox: impl InboxBinding) -> Self {
        let workers = inbox.workers();
        let h = Box::new(inbox).bind(&self.name, self.bus.metrics());
        self.inbox_handler(h, workers)
    }

    /// What [`ConsumerBuilder::inbox`] does with the bound inbox `h` (perhaps wrapped in a
    /// service's middleware) and the inbox's default `workers`.
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    pub(crate) fn inbox_handler(self, h: Arc<dyn Handler>, workers: usize) -> Self {
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
    /// replay the missing range (see [`GapHealer`](crate::runtime::feeds::GapHealer), which has an
    /// example). [`start`](ConsumerBuilder::start) fails with a `Config` error naming
    /// `heal_gaps` on a best-effort pattern, a transport that cannot replay, without
    /// [`serve_replays`](ConsumerBuilder::serve_replays) or without a dedupe store.
    pub fn heal_gaps(mut self, healer: crate::runtime::feeds::GapHealer) -> Self {
        self.heal = Some(healer);
        self
    }

    /// The dedupe store this consumer uses on `tier` (none when the choice is the default and
    /// the tier or the transport has none).
    pub(super) fn dedupe_store(&self, tier: crate::tier::Tier) -> Option<Arc<dyn DedupeStore>> {
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
            crate::runtime::feeds::GapHealer::check(
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
            match crate::runtime::control::start_listener(
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

    pub(super) async fn start_inner(mut self) -> Result<ConsumerHandle> {
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
            sub = crate::runtime::shedding(&self.bus, sub, self.shed).0;
        }
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        let obs = self.bus.obs().clone();
        let shared = Arc::new(Shared {
            obs_on: obs.enabled,
            tracer: obs.tracer.clone(),
            topic_metrics: RwLock::new(HashMap::new()),
            handles: HandleTable::new(),
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
            acks: Default::default(),
            ack_closing: AtomicBool::new(false),
            ack_notify: Notify::new(),
            ack_full: Notify::new(),
            lag_clock: crate::runtime::lag::LagClock::new(self.lag_alert),
        });
        crate::runtime::lag::spawn_sampler(
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
            obs.add_consumer(Arc::new(ConsumerMonitor {
                shared: shared.clone(),
            }));
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

#[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
/// An inbox with its handler, ready to become a consumer's handler: what
/// [`ConsumerBuilder::inbox`] takes (`ampybus::inbox::pg::PgInbox::handler` and
/// `ampybus::inbox::sqlite::SqliteInbox::handler` make one; also `ampybus::inbox::InboxBinding`).
///
/// ```no_run
/// # #[cfg(feature = "inbox-sqlite")]
/// # async fn f(bus: ampybus::Bus) -> ampybus::Result<()> {
/// use ampybus::inbox::sqlite::SqliteInbox;
/// use ampybus::runtime::{Consumer, Outcome};
/// let inbox = SqliteInbox::open("/var/lib/positions.sqlite3")?;
/// let handle = Consumer::builder(bus, "ampy.prod.fills.>".parse()?, "positions")
///     .inbox(inbox.handler(|_msg, _tx| Outcome::Ok))
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
pub trait InboxBinding: Send + 'static {
    /// The runtime handler of consumer `consumer`, counting skips in `metrics`.
    fn bind(self: Box<Self>, consumer: &str, metrics: &crate::obs::BusMetrics) -> Arc<dyn Handler>;

    /// The workers of a consumer of this inbox when
    /// [`ConsumerBuilder::workers`] is not called: the runtime's default, 8,
    /// unless the inbox takes more messages at once (the PostgreSQL inbox:
    /// `ampybus::inbox::pg::DEFAULT_WORKERS`).
    fn workers(&self) -> usize {
        8
    }
}
