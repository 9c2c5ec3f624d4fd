//! [`FeedWatch`]: a [`FeedMonitor`] run over a subscription of new messages.

use super::clock::{Clock, SystemClock};
use super::monitor::{FeedConfig, FeedEvent, FeedEventKind, FeedMonitor, FeedStats};
use crate::bus::Bus;
use crate::error::{Error, ErrorKind, Result};
use crate::topic::TopicPattern;
use crate::transport::{StartAt, SubscribeSpec};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Most deliveries taken per fetch.
const FETCH_MAX: usize = 512;

/// Builds a [`FeedWatch`]; see [`FeedWatch::builder`].
#[derive(Debug)]
pub struct FeedWatchBuilder {
    bus: Bus,
    pattern: TopicPattern,
    config: FeedConfig,
    clock: Arc<dyn Clock>,
    check_every: Option<Duration>,
    name: String,
}

impl FeedWatchBuilder {
    /// The clock (default [`SystemClock`]); a [`ManualClock`](super::ManualClock) makes the
    /// events' times and the staleness decisions the test's own.
    pub fn clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How often silence is looked for when no message arrives (default: a quarter of the
    /// shortest threshold, between 10 ms and 1 s).
    pub fn check_every(mut self, every: Duration) -> Self {
        self.check_every = Some(every);
        self
    }

    /// The name shown on `/stats` (default `feeds`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Subscribes (new messages only, no durable position: any tier) and starts watching on
    /// the current Tokio runtime. `Config` error for a zero threshold or check interval.
    pub async fn start(self) -> Result<FeedWatch> {
        let shortest = self.config.shortest();
        if shortest.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "feed monitor stale_after: must be greater than zero",
            ));
        }
        let every = self.check_every.unwrap_or_else(|| {
            (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
        if every.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "feed monitor check_every: must be greater than zero",
            ));
        }
        let sub = self
            .bus
            .subscribe(SubscribeSpec::ephemeral(
                self.pattern.clone(),
                StartAt::Latest,
            ))
            .await?;
        let shared = Arc::new(Shared {
            monitor: Mutex::new(FeedMonitor::new(self.config)),
            clock: self.clock,
            bus: self.bus.clone(),
            stop: AtomicBool::new(false),
        });
        if self.bus.observability() {
            let weak = Arc::downgrade(&shared);
            let (name, pattern) = (self.name.clone(), self.pattern.as_str().to_owned());
            let stale_after = self.config.source_threshold().as_secs_f64();
            self.bus.obs().add_feed(Box::new(move || {
                let s = weak.upgrade()?;
                let mut v = s.stats().to_json();
                let o = v.as_object_mut()?;
                o.insert("name".into(), json!(name));
                o.insert("pattern".into(), json!(pattern));
                o.insert("stale_after_s".into(), json!(stale_after));
                Some(v)
            }));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(shared.clone(), sub, every, tx));
        Ok(FeedWatch {
            events: rx,
            shared,
            task: Some(task),
        })
    }
}

#[derive(Debug)]
struct Shared {
    monitor: Mutex<FeedMonitor>,
    clock: Arc<dyn Clock>,
    bus: Bus,
    stop: AtomicBool,
}

impl Shared {
    fn monitor(&self) -> std::sync::MutexGuard<'_, FeedMonitor> {
        self.monitor.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> FeedStats {
        self.monitor().stats(self.clock.now())
    }

    /// Metrics for one event, then hands it to the application.
    fn emit(&self, e: FeedEvent, tx: &mpsc::UnboundedSender<FeedEvent>) {
        let source_event = e.key.is_none();
        if source_event && self.bus.observability() {
            match e.kind {
                FeedEventKind::Stale => self.bus.metrics().feeds().stale_sources(1),
                FeedEventKind::Recovered => self.bus.metrics().feeds().stale_sources(-1),
                _ => {}
            }
        }
        note(&self.bus, &e);
        // The receiver may be gone (the application stopped listening): the state and the
        // metrics still hold.
        let _ = tx.send(e);
    }
}

/// The counters (`bus_gap_total`, `bus_gap_heal_requests_total`) and the log line of one
/// event, wherever it was noticed (a [`FeedWatch`] or a [`GapHealer`](super::GapHealer)).
pub(super) fn note(bus: &Bus, e: &FeedEvent) {
    if bus.observability() {
        match e.kind {
            FeedEventKind::Gap => bus.metrics().feeds().gap(&e.topic),
            FeedEventKind::HealRequested => bus.metrics().feeds().heal_request(&e.topic),
            _ => {}
        }
    }
    match e.kind {
        FeedEventKind::Stale
        | FeedEventKind::Gap
        | FeedEventKind::Lag
        | FeedEventKind::HealFailed => {
            tracing::warn!(event = e.kind.as_str(), topic = %e.topic, key = ?e.key, source = ?e.source, "feed: {e}")
        }
        _ => {
            tracing::info!(event = e.kind.as_str(), topic = %e.topic, key = ?e.key, source = ?e.source, "feed: {e}")
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Stale sources of a monitor that is gone are no longer counted.
        if self.bus.observability() {
            let n = self.stats().stale_sources.len() as i64;
            if n > 0 {
                self.bus.metrics().feeds().stale_sources(-n);
            }
        }
    }
}

async fn run(
    shared: Arc<Shared>,
    mut sub: Box<dyn crate::transport::Subscription>,
    every: Duration,
    tx: mpsc::UnboundedSender<FeedEvent>,
) -> Result<()> {
    while !shared.stop.load(Ordering::Acquire) {
        let got = sub.fetch(FETCH_MAX, every).await?;
        let mut events = Vec::new();
        {
            let mut m = shared.monitor();
            for d in &got {
                let now = shared.clock.now();
                events.extend(m.observe(now, &d.envelope.topic, &d.envelope.headers));
            }
            let now = shared.clock.now();
            events.extend(m.tick(now));
            if shared.bus.observability() {
                let feeds = shared.bus.metrics().feeds();
                for (topic, secs) in m.stats(now).seconds_since_last {
                    feeds.seconds_since_last(&topic, secs);
                }
            }
        }
        for e in events {
            shared.emit(e, &tx);
        }
        // Non-durable: nothing to acknowledge; the deliveries are dropped.
        drop(got);
    }
    Ok(())
}

/// A [`FeedMonitor`] over a subscription of new messages on `pattern` (no durable position,
/// so it works on any tier and takes nothing from other consumers): every message is
/// observed as it arrives, silence is looked for every `check_every`, and each
/// [`FeedEvent`] is counted in the bus's metrics, logged (`warn` for stale and gap, `info`
/// otherwise) and handed to the application through [`next`](FeedWatch::next). `/stats`
/// lists it under `feeds`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::runtime::feeds::{Clock, FeedConfig, FeedEventKind, FeedWatch, ManualClock};
/// use ampybus::{Bus, Headers, Topic, TopicPattern};
/// use std::time::Duration;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let clock = ManualClock::starting_at(chrono::Utc::now());
/// let mut watch = FeedWatch::builder(bus.clone(), TopicPattern::parse("ampy.dev.ticks.>").unwrap(),
///         FeedConfig::new(Duration::from_secs(5)).key_stale_after(None))
///     .clock(clock.clone())
///     .check_every(Duration::from_millis(10))
///     .start()
///     .await
///     .unwrap();
/// let topic = Topic::parse("ampy.dev.ticks.v1.trade.MSFT").unwrap();
/// bus.publish(&topic, Headers::for_publish("ampy.ticks.v1.TradeBatch", "md@a", "feed-a", "MSFT.XNAS"), b"t".to_vec())
///     .await.unwrap();
/// // Wait until it was seen, then let five seconds pass on the clock.
/// while watch.stats().sources == 0 { tokio::task::yield_now().await; }
/// clock.advance(Duration::from_secs(5));
/// let e = watch.next().await.unwrap();
/// assert_eq!((e.kind, e.source.as_deref()), (FeedEventKind::Stale, Some("feed-a")));
/// watch.stop().await.unwrap();
/// # });
/// ```
#[derive(Debug)]
pub struct FeedWatch {
    events: mpsc::UnboundedReceiver<FeedEvent>,
    shared: Arc<Shared>,
    task: Option<JoinHandle<Result<()>>>,
}

impl FeedWatch {
    /// A builder watching `pattern` on `bus` with `config`.
    pub fn builder(bus: Bus, pattern: TopicPattern, config: FeedConfig) -> FeedWatchBuilder {
        FeedWatchBuilder {
            bus,
            pattern,
            config,
            clock: Arc::new(SystemClock),
            check_every: None,
            name: "feeds".to_owned(),
        }
    }

    /// The next event; `None` once the watch ended (stopped, or its subscription failed:
    /// [`stop`](FeedWatch::stop) returns that error).
    pub async fn next(&mut self) -> Option<FeedEvent> {
        self.events.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_next(&mut self) -> Option<FeedEvent> {
        self.events.try_recv().ok()
    }

    /// Counters and what is stale now.
    pub fn stats(&self) -> FeedStats {
        self.shared.stats()
    }

    /// Stops watching (within one check interval) and returns the final counters, or the
    /// error that ended the subscription.
    pub async fn stop(mut self) -> Result<FeedStats> {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.task.take() {
            t.await.map_err(|e| {
                Error::with_source(ErrorKind::Closed, "feed monitor: task ended abnormally", e)
            })??;
        }
        Ok(self.shared.stats())
    }
}

impl Drop for FeedWatch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}
