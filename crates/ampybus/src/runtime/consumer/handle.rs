//! What a running consumer shows: [`ConsumerHandle`] and [`ConsumerMonitor`] (its counts are
//! [`crate::obs::ConsumerStats`]).

use super::*;

#[derive(Default)]
pub(super) struct Counters {
    /// Added to by every worker per message: sharded by thread.
    pub(super) handled_ok: crate::obs::FastCounter,
    pub(super) retried: AtomicU64,
    pub(super) dead_lettered: [AtomicU64; DlqCode::ALL.len()],
    pub(super) skipped: AtomicU64,
    pub(super) released: AtomicU64,
    pub(super) deferred: AtomicU64,
    pub(super) fetched: AtomicU64,
    pub(super) settled: AtomicU64,
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
    pub(super) shared: Arc<Shared>,
    pub(super) phase_tx: watch::Sender<Phase>,
    pub(super) fetcher: Option<JoinHandle<()>>,
    pub(super) workers: Vec<JoinHandle<()>>,
    pub(super) acker: Option<JoinHandle<()>>,
    pub(super) refresher: Option<JoinHandle<()>>,
    pub(super) control: Option<Box<ConsumerHandle>>,
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

    /// Runs until SIGINT or SIGTERM ([`crate::runtime::shutdown_signal`]), then shuts down gracefully
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
        let signal = crate::runtime::shutdown_signal();
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
    pub fn lag_watch(&self) -> crate::runtime::LagWatch {
        crate::runtime::LagWatch::new(self.shared.lag_clock.clone())
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
        let _ = self.phase_tx.send(Phase::Draining);
        self.shared.notify.notify_waiters();
        if let Some(f) = self.fetcher.take() {
            let _ = f.await;
        }
        let rest = deadline.saturating_sub(started.elapsed());
        let joined =
            tokio::time::timeout(rest, futures::future::join_all(self.workers.iter_mut())).await;
        if joined.is_err() {
            let _ = self.phase_tx.send(Phase::HardStop);
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
        self.shared.ack_closing.store(true, Ordering::SeqCst);
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
    pub(super) shared: Arc<Shared>,
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
        self.shared.phase() != Phase::Running
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

impl crate::obs::ConsumerProbe for ConsumerMonitor {
    fn name(&self) -> &str {
        ConsumerMonitor::name(self)
    }
    fn pattern(&self) -> &TopicPattern {
        ConsumerMonitor::pattern(self)
    }
    fn stats(&self) -> ConsumerStats {
        ConsumerMonitor::stats(self)
    }
    fn is_stopped(&self) -> bool {
        ConsumerMonitor::is_stopped(self)
    }
    fn is_draining(&self) -> bool {
        ConsumerMonitor::is_draining(self)
    }
    fn last_message_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        ConsumerMonitor::last_message_at(self)
    }
    fn max_in_flight(&self) -> usize {
        ConsumerMonitor::max_in_flight(self)
    }
    fn lag_name(&self) -> Option<&str> {
        Some(ConsumerMonitor::name(self))
    }
    fn set_lag(&self, pending: u64) {
        ConsumerMonitor::set_lag(self, pending)
    }
}

impl Shared {
    /// The acker was told to flush and stop.
    pub(super) fn acks_closing(&self) -> bool {
        self.ack_closing.load(Ordering::SeqCst)
    }

    pub(super) fn stats(&self) -> ConsumerStats {
        let c = &self.counters;
        let mut dead_lettered = BTreeMap::new();
        for code in DlqCode::ALL {
            let n = c.dead_lettered[code.index()].load(Ordering::SeqCst);
            if n > 0 {
                dead_lettered.insert(code, n);
            }
        }
        ConsumerStats {
            handled_ok: c.handled_ok.get(),
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
