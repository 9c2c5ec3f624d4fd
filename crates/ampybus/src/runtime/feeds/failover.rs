//! [`FailoverProducer`]: one active source among several feeding the same topics, switched
//! on silence or failures and switched back once the primary has been healthy for a while.

use super::clock::{Clock, Now, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::runtime::{Producer, ProducerStats, SendOutcome};
use crate::topic::Topic;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Thresholds of a [`FailoverState`].
///
/// ```
/// use ampybus::runtime::feeds::FailoverConfig;
/// use std::time::Duration;
/// let c = FailoverConfig::new(Duration::from_secs(2)).max_failures(5).recover_after(Duration::from_secs(30));
/// assert_eq!((c.silence_after, c.max_failures, c.recover_after), (Duration::from_secs(2), 5, Duration::from_secs(30)));
/// assert_eq!(FailoverConfig::new(Duration::from_secs(2)).recover_after, Duration::from_secs(20));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverConfig {
    /// A source without data for this long is unhealthy.
    pub silence_after: Duration,
    /// A source with this many failures in a row (no data between them) is unhealthy.
    pub max_failures: u32,
    /// The primary must have been healthy this long before it is made active again.
    pub recover_after: Duration,
}

impl FailoverConfig {
    /// `silence_after` as given, 3 failures, recovery after 10 × `silence_after`.
    pub fn new(silence_after: Duration) -> FailoverConfig {
        FailoverConfig {
            silence_after,
            max_failures: 3,
            recover_after: silence_after * 10,
        }
    }

    /// Failures in a row that make a source unhealthy (at least 1).
    pub fn max_failures(mut self, n: u32) -> FailoverConfig {
        self.max_failures = n.max(1);
        self
    }

    /// How long the primary must be healthy before switching back to it.
    pub fn recover_after(mut self, d: Duration) -> FailoverConfig {
        self.recover_after = d;
        self
    }
}

/// Why the active source changed.
///
/// ```
/// assert_eq!(ampybus::runtime::feeds::FailoverReason::PrimaryRecovered.as_str(), "primary_recovered");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailoverReason {
    /// The active source sent nothing for `silence_after`.
    Silent,
    /// The active source reached `max_failures` failures in a row.
    Failing,
    /// The primary was healthy for `recover_after`.
    PrimaryRecovered,
}

impl FailoverReason {
    /// The label used in logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverReason::Silent => "silent",
            FailoverReason::Failing => "failing",
            FailoverReason::PrimaryRecovered => "primary_recovered",
        }
    }
}

/// One switch of the active source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverEvent {
    /// The source that was active.
    pub from: String,
    /// The source active now.
    pub to: String,
    /// Why.
    pub reason: FailoverReason,
    /// When.
    pub at: DateTime<Utc>,
    /// Switches so far, this one included.
    pub switches: u64,
}

#[derive(Debug)]
struct Source {
    name: String,
    last_data: Option<Now>,
    failures: u32,
    /// Since when it has been healthy without a break (`None`: unhealthy now).
    healthy_since: Option<Now>,
}

/// The failover decision as a state machine (no clock, no I/O): sources in priority order
/// (the first is the primary), fed data, failures and clock readings.
///
/// * A source is **healthy** while it has had data within `silence_after` (before its
///   first message: within `silence_after` of the start) and fewer than `max_failures`
///   failures since its last data. Data resets the failures.
/// * When the active source is unhealthy, the first healthy source in priority order
///   becomes active (reason [`Silent`](FailoverReason::Silent) or
///   [`Failing`](FailoverReason::Failing)); when none is healthy the active one stays.
/// * When a standby is active and the primary has been healthy without a break for
///   `recover_after`, the primary becomes active again
///   ([`PrimaryRecovered`](FailoverReason::PrimaryRecovered)). A primary that flaps (goes
///   silent or fails again) restarts that time.
/// * Each call returns the switch it made, if any (at most one).
///
/// ```
/// use ampybus::runtime::feeds::{Clock, FailoverConfig, FailoverReason, FailoverState, ManualClock};
/// use std::time::Duration;
/// let clock = ManualClock::starting_at(chrono::Utc::now());
/// let cfg = FailoverConfig::new(Duration::from_secs(2)).recover_after(Duration::from_secs(5));
/// let mut s = FailoverState::new(&["a", "b"], cfg, clock.now()).unwrap();
/// assert_eq!(s.active(), "a");
/// clock.advance(Duration::from_secs(1));
/// assert!(s.on_data("b", clock.now()).unwrap().is_none());
/// clock.advance(Duration::from_secs(1)); // a: silent for 2 s
/// let e = s.tick(clock.now()).unwrap();
/// assert_eq!((e.from.as_str(), e.to.as_str(), e.reason), ("a", "b", FailoverReason::Silent));
/// ```
#[derive(Debug)]
pub struct FailoverState {
    config: FailoverConfig,
    sources: Vec<Source>,
    active: usize,
    started: Now,
    switches: u64,
}

impl FailoverState {
    /// Sources in priority order (at least two, distinct, non-empty); the first is active.
    pub fn new(sources: &[&str], config: FailoverConfig, now: Now) -> Result<FailoverState> {
        let mut seen = std::collections::HashSet::new();
        if sources.len() < 2
            || sources
                .iter()
                .any(|s| s.trim().is_empty() || !seen.insert(*s))
        {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "failover sources: at least two distinct, non-empty source ids (got {sources:?})"
                ),
            ));
        }
        if config.silence_after.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "failover silence_after: must be greater than zero",
            ));
        }
        Ok(FailoverState {
            config,
            sources: sources
                .iter()
                .map(|s| Source {
                    name: (*s).to_owned(),
                    last_data: None,
                    failures: 0,
                    healthy_since: Some(now),
                })
                .collect(),
            active: 0,
            started: now,
            switches: 0,
        })
    }

    /// The active source.
    pub fn active(&self) -> &str {
        &self.sources[self.active].name
    }

    /// Switches so far.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// Whether `source` is healthy at `now` (false for an unknown source).
    pub fn is_healthy(&self, source: &str, now: Now) -> bool {
        self.index(source).is_some_and(|i| self.healthy(i, now))
    }

    fn index(&self, source: &str) -> Option<usize> {
        self.sources.iter().position(|s| s.name == source)
    }

    fn healthy(&self, i: usize, now: Now) -> bool {
        let s = &self.sources[i];
        let last = s.last_data.unwrap_or(self.started);
        s.failures < self.config.max_failures && now.since(last) < self.config.silence_after
    }

    /// `source` delivered data at `now`. `Config` error for an unknown source.
    pub fn on_data(&mut self, source: &str, now: Now) -> Result<Option<FailoverEvent>> {
        let i = self.known(source)?;
        self.refresh(now);
        let s = &mut self.sources[i];
        s.last_data = Some(now);
        s.failures = 0;
        if s.healthy_since.is_none() {
            s.healthy_since = Some(now);
        }
        Ok(self.decide(now))
    }

    /// `source` failed (a disconnect, an unreadable message, …) at `now`. `Config` error for
    /// an unknown source.
    pub fn on_failure(&mut self, source: &str, now: Now) -> Result<Option<FailoverEvent>> {
        let i = self.known(source)?;
        self.refresh(now);
        self.sources[i].failures = self.sources[i].failures.saturating_add(1);
        self.refresh(now);
        Ok(self.decide(now))
    }

    /// Looks at the time alone (silence).
    pub fn tick(&mut self, now: Now) -> Option<FailoverEvent> {
        self.refresh(now);
        self.decide(now)
    }

    fn known(&self, source: &str) -> Result<usize> {
        self.index(source).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("failover: unknown source {source:?}"),
            )
        })
    }

    /// Ends the healthy stretch of every source unhealthy at `now` (including one whose
    /// silence began and ended between two looks: it is unhealthy from its silence on).
    fn refresh(&mut self, now: Now) {
        for i in 0..self.sources.len() {
            if !self.healthy(i, now) {
                self.sources[i].healthy_since = None;
            }
        }
    }

    fn decide(&mut self, now: Now) -> Option<FailoverEvent> {
        let (to, reason) = if !self.healthy(self.active, now) {
            let to = (0..self.sources.len()).find(|&j| j != self.active && self.healthy(j, now))?;
            let reason = if self.sources[self.active].failures >= self.config.max_failures {
                FailoverReason::Failing
            } else {
                FailoverReason::Silent
            };
            (to, reason)
        } else if self.active != 0
            && self.healthy(0, now)
            && self.sources[0]
                .healthy_since
                .is_some_and(|t| now.since(t) >= self.config.recover_after)
        {
            (0, FailoverReason::PrimaryRecovered)
        } else {
            return None;
        };
        let from = std::mem::replace(&mut self.active, to);
        self.switches += 1;
        Some(FailoverEvent {
            from: self.sources[from].name.clone(),
            to: self.sources[to].name.clone(),
            reason,
            at: now.wall,
            switches: self.switches,
        })
    }
}

/// What [`FailoverProducer::offer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// From the active source: handed to the producer, with its outcome.
    Sent(SendOutcome),
    /// From a standby source: recorded as a sign of health, not published.
    Standby,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<FailoverState>,
    clock: Arc<dyn Clock>,
    tx: mpsc::UnboundedSender<FailoverEvent>,
    /// Counts switches (`bus_failover_switches_total`) when the bus observes.
    bus: Option<crate::Bus>,
    service: String,
}

impl Inner {
    fn emit(&self, e: Option<FailoverEvent>) {
        if let Some(e) = e {
            tracing::warn!(
                from = %e.from, to = %e.to, reason = e.reason.as_str(), switches = e.switches,
                "failover: switched the active source"
            );
            if let Some(bus) = &self.bus {
                bus.metrics()
                    .feeds()
                    .failover_switch(&self.service, e.reason.as_str());
            }
            let _ = self.tx.send(e);
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FailoverState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A [`Producer`] fed by several sources of the same topics (instances of one service, e.g.
/// `md@feed-a` and `md@feed-b`), of which one is active at a time ([`FailoverState`] has
/// the rules). Every source's data is [`offer`](FailoverProducer::offer)ed: the active
/// source's is published with `producer` = `{service}@{source}` and `source` = the source
/// id; a standby's only proves it alive. Each switch is logged (`warn`), counted
/// ([`switches`](FailoverProducer::switches)) and handed to the application
/// ([`next_event`](FailoverProducer::next_event)).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::runtime::Producer;
/// use ampybus::runtime::feeds::{FailoverConfig, FailoverProducer, Offered};
/// use ampybus::{Bus, Headers, Topic};
/// use std::time::Duration;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let producer = Producer::builder(bus).start().unwrap();
/// let fo = FailoverProducer::new(producer, "md", &["feed-a", "feed-b"],
///     FailoverConfig::new(Duration::from_secs(2))).unwrap();
/// let topic = Topic::parse("ampy.dev.ticks.v1.trade.MSFT").unwrap();
/// let h = || Headers::for_publish("ampy.ticks.v1.TradeBatch", "md", "md", "MSFT.XNAS");
/// assert!(matches!(fo.offer("feed-a", &topic, h(), b"t1".to_vec()).await.unwrap(), Offered::Sent(_)));
/// assert_eq!(fo.offer("feed-b", &topic, h(), b"t1".to_vec()).await.unwrap(), Offered::Standby);
/// let stats = fo.close().await.unwrap();
/// assert_eq!(stats.published, 1);
/// # });
/// ```
#[derive(Debug)]
pub struct FailoverProducer {
    producer: Producer,
    service: String,
    inner: Arc<Inner>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<FailoverEvent>>,
    ticker: Option<JoinHandle<()>>,
}

impl FailoverProducer {
    /// Over `sources` in priority order (the first is the primary) with the system clock and
    /// a background check for silence every quarter of `silence_after` (at most 1 s).
    /// `Config` error for fewer than two distinct sources, an empty service or a zero
    /// `silence_after`.
    pub fn new(
        producer: Producer,
        service: &str,
        sources: &[&str],
        config: FailoverConfig,
    ) -> Result<FailoverProducer> {
        let every =
            (config.silence_after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        Self::with_clock(producer, service, sources, config, SystemClock, Some(every))
    }

    /// [`new`](FailoverProducer::new) with a clock of its own and the background check
    /// every `check_every` (`None`: only when [`tick`](FailoverProducer::tick) is called and
    /// on each offer or failure — what tests with a [`ManualClock`](super::ManualClock) use).
    pub fn with_clock(
        producer: Producer,
        service: &str,
        sources: &[&str],
        config: FailoverConfig,
        clock: impl Clock + 'static,
        check_every: Option<Duration>,
    ) -> Result<FailoverProducer> {
        if service.trim().is_empty() || service.contains('@') {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "failover service: must be a non-empty service name without `@` (got {service:?})"
                ),
            ));
        }
        let clock: Arc<dyn Clock> = Arc::new(clock);
        let state = FailoverState::new(sources, config, clock.now())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let bus = producer.bus();
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            clock,
            tx,
            bus: bus.observability().then(|| bus.clone()),
            service: service.to_owned(),
        });
        let ticker = check_every.filter(|d| !d.is_zero()).map(|every| {
            let weak: Weak<Inner> = Arc::downgrade(&inner);
            tokio::spawn(async move {
                let mut t = tokio::time::interval(every);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    t.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let e = inner.state().tick(inner.clock.now());
                    inner.emit(e);
                }
            })
        });
        Ok(FailoverProducer {
            producer,
            service: service.to_owned(),
            inner,
            events: tokio::sync::Mutex::new(rx),
            ticker,
        })
    }

    /// Data from `source`: recorded for its health (which may switch the active source
    /// first); published when `source` is then the active one. `headers` get `producer` =
    /// `{service}@{source}` and `source` = `source`. Errors: an unknown source (`Config`) and
    /// whatever [`Producer::send`] returns.
    pub async fn offer(
        &self,
        source: &str,
        topic: &Topic,
        mut headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<Offered> {
        let active = {
            let mut st = self.inner.state();
            let e = st.on_data(source, self.inner.clock.now())?;
            let active = st.active() == source;
            drop(st);
            self.inner.emit(e);
            active
        };
        if !active {
            return Ok(Offered::Standby);
        }
        headers.set(
            crate::headers::names::PRODUCER,
            format!("{}@{source}", self.service),
        );
        headers.set(crate::headers::names::SOURCE, source);
        Ok(Offered::Sent(
            self.producer.send(topic, headers, payload).await?,
        ))
    }

    /// A failure of `source` (disconnect, unreadable data, …). `Config` error for an
    /// unknown source.
    pub fn report_failure(&self, source: &str) -> Result<()> {
        let e = self
            .inner
            .state()
            .on_failure(source, self.inner.clock.now())?;
        self.inner.emit(e);
        Ok(())
    }

    /// Checks for silence now (the background check does it too when enabled).
    pub fn tick(&self) {
        let e = self.inner.state().tick(self.inner.clock.now());
        self.inner.emit(e);
    }

    /// The active source.
    pub fn active(&self) -> String {
        self.inner.state().active().to_owned()
    }

    /// Switches so far.
    pub fn switches(&self) -> u64 {
        self.inner.state().switches()
    }

    /// The next switch (waits for one).
    pub async fn next_event(&self) -> Option<FailoverEvent> {
        self.events.lock().await.recv().await
    }

    /// The next switch if one happened and was not taken yet.
    pub fn try_next_event(&self) -> Option<FailoverEvent> {
        self.events.try_lock().ok()?.try_recv().ok()
    }

    /// The producer underneath.
    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Stops the background check and closes the producer ([`Producer::close`]).
    pub async fn close(mut self) -> Result<ProducerStats> {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
        self.producer.close().await
    }
}
