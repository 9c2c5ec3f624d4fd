//! [`GapHealer`]: a consumer that saw a gap in the `sequence` of what it applied asks itself,
//! through the replay control protocol, to replay the missing range from the store.

use super::clock::{Clock, SystemClock};
use super::monitor::{FeedConfig, FeedEvent, FeedEventKind, FeedMonitor, HealReport};
use crate::bus::Bus;
use crate::control::{ReplayRequest, ReplayState};
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{Handler, Message, Outcome};
use crate::tier::Tier;
use crate::topic::{Env, TopicPattern};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// How a [`GapHealer`] paces its replay requests.
///
/// ```
/// use ampybus::runtime::feeds::HealOptions;
/// use std::time::Duration;
/// let o = HealOptions { min_interval: Duration::from_secs(5), ..Default::default() };
/// assert_eq!(o.coalesce, Duration::from_millis(100));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealOptions {
    /// How long gaps are gathered after the first one before a request goes out: every gap
    /// gathered (any key) goes into one request (default 100 ms).
    pub coalesce: Duration,
    /// Least time between two requests (default 1 s); gaps seen meanwhile wait and are
    /// gathered into the next. One request runs at a time.
    pub min_interval: Duration,
    /// How long to wait for the replay's final report (default 60 s); past it the heal is
    /// reported failed (the replay may still complete).
    pub timeout: Duration,
    /// How much earlier than the last message before a gap the window starts (default 1 s;
    /// a wider window only costs dedupe lookups).
    pub slack: Duration,
}

impl Default for HealOptions {
    fn default() -> Self {
        HealOptions {
            coalesce: Duration::from_millis(100),
            min_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
            slack: Duration::from_secs(1),
        }
    }
}

/// Counters of a [`GapHealer`].
///
/// ```
/// let s = ampybus::runtime::feeds::HealStats::default();
/// assert_eq!(s.gaps + s.requests + s.healed + s.failed, 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealStats {
    /// Gaps seen in what the consumer was delivered.
    pub gaps: u64,
    /// Replay requests sent (several gaps may share one).
    pub requests: u64,
    /// Requests whose replay completed.
    pub healed: u64,
    /// Requests rejected, failed or unanswered within the timeout.
    pub failed: u64,
    /// Messages the heals' replays applied.
    pub applied: u64,
}

/// One gap to heal: where the request goes and its window.
#[derive(Debug)]
struct Job {
    pattern: String,
    topic: String,
    key: String,
    missing: (u64, u64),
    start: DateTime<Utc>,
    end: DateTime<Utc>,
}

/// The consumer a healer serves (set by [`ConsumerBuilder::heal_gaps`](crate::runtime::ConsumerBuilder::heal_gaps)).
#[derive(Debug, Clone)]
struct Binding {
    bus: Bus,
    consumer: String,
    pattern: TopicPattern,
}

#[derive(Debug)]
struct Inner {
    options: HealOptions,
    clock: Arc<dyn Clock>,
    monitor: Mutex<FeedMonitor>,
    binding: Mutex<Option<Binding>>,
    jobs: mpsc::UnboundedSender<Job>,
    /// Taken by the request task when the healer is first bound.
    jobs_rx: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
    events: mpsc::UnboundedSender<FeedEvent>,
    events_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<FeedEvent>>,
    gaps: AtomicU64,
    requests: AtomicU64,
    healed: AtomicU64,
    failed: AtomicU64,
    applied: AtomicU64,
}

/// Heals gaps on a durable tier: given to
/// [`ConsumerBuilder::heal_gaps`](crate::runtime::ConsumerBuilder::heal_gaps), it checks the
/// `sequence` header of every message delivered to the consumer's handler (per producer, run
/// and partition key, as [`FeedMonitor`] does) and, for a gap, sends that consumer a
/// [`ReplayRequest`] for the key with the window from the store time of the last message
/// before the gap (less [`HealOptions::slack`]) to that of the message that revealed it. The
/// consumer serves it through its own handler and dedupe store (see
/// [`crate::runtime::control`]), so what it applied already is skipped and each missing message
/// is applied once; a healed message arrives after the later messages of its key.
///
/// Gaps are gathered for [`HealOptions::coalesce`] into one request (all their keys, the
/// union of their windows), one request runs at a time and requests are at least
/// [`HealOptions::min_interval`] apart, so a burst of gaps does not flood the control topic.
/// Each gap, request and outcome is a [`FeedEvent`] ([`next`](GapHealer::next)): `gap`,
/// `heal_requested`, then `healed` or `heal_failed`; counted in `bus_gap_total{topic}` and
/// `bus_gap_heal_requests_total{topic}`, and logged.
///
/// Keep the healer (it is a cheap handle) to read its events, and reuse it when the consumer
/// restarts in the same process: what it has seen survives, so a consumer that lost its
/// position and restarted at the live edge still finds the hole. Messages a replay delivers
/// are not checked.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::runtime::feeds::{FeedEventKind, GapHealer, HealOptions};
/// use ampybus::runtime::{Consumer, Outcome, handler_fn};
/// use ampybus::{Bus, TopicPattern};
/// use std::time::Duration;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let healer = GapHealer::new(HealOptions::default());
/// let handle = Consumer::builder(bus.clone(), TopicPattern::parse("ampy.dev.ticks.>").unwrap(), "md")
///     .handler(handler_fn(|_m| async { Outcome::Ok }))
///     .heal_gaps(healer.clone())
///     .start()
///     .await
///     .unwrap();
/// // … a gap in what "md" is delivered is replayed to it:
/// // healer.next().await is a `gap`, then `heal_requested`, then `healed`.
/// assert_eq!(healer.stats().requests, 0);
/// handle.shutdown(Duration::from_secs(5)).await;
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct GapHealer {
    inner: Arc<Inner>,
}

impl Default for GapHealer {
    fn default() -> Self {
        GapHealer::new(HealOptions::default())
    }
}

impl GapHealer {
    /// A healer with nothing seen, not yet bound to a consumer.
    pub fn new(options: HealOptions) -> GapHealer {
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let config = FeedConfig::new(Duration::MAX)
            .key_stale_after(None)
            .lag_after(None);
        GapHealer {
            inner: Arc::new(Inner {
                options,
                clock: Arc::new(SystemClock),
                monitor: Mutex::new(FeedMonitor::new(config)),
                binding: Mutex::new(None),
                jobs,
                jobs_rx: Mutex::new(Some(jobs_rx)),
                events,
                events_rx: tokio::sync::Mutex::new(events_rx),
                gaps: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                healed: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                applied: AtomicU64::new(0),
            }),
        }
    }

    /// The next event (`gap`, `heal_requested`, `healed`, `heal_failed`); waits for one.
    pub async fn next(&self) -> Option<FeedEvent> {
        self.inner.events_rx.lock().await.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_next(&self) -> Option<FeedEvent> {
        self.inner.events_rx.try_lock().ok()?.try_recv().ok()
    }

    /// Counters.
    pub fn stats(&self) -> HealStats {
        let i = &self.inner;
        HealStats {
            gaps: i.gaps.load(Ordering::Relaxed),
            requests: i.requests.load(Ordering::Relaxed),
            healed: i.healed.load(Ordering::Relaxed),
            failed: i.failed.load(Ordering::Relaxed),
            applied: i.applied.load(Ordering::Relaxed),
        }
    }

    /// Why consumer `name` on `pattern` cannot heal gaps, as a `Config` error naming
    /// `heal_gaps`: a best-effort tier (nothing stored to replay), a transport that cannot
    /// read by time window, replays not served, or no dedupe store (a replay could apply a
    /// message twice).
    pub(crate) fn check(
        bus: &Bus,
        name: &str,
        pattern: &TopicPattern,
        tier: Tier,
        serves_replays: bool,
        has_dedupe: bool,
    ) -> Result<()> {
        let no = |why: String| {
            Err(Error::new(
                ErrorKind::Config,
                format!("consumer `{name}` heal_gaps: {why}",),
            ))
        };
        if tier == Tier::BestEffort {
            return no(format!(
                "pattern {:?} is best_effort, so nothing is stored to replay; heal gaps on at_least_once or at_least_once_dedupe",
                pattern.as_str()
            ));
        }
        if bus.replay().is_none() {
            return no(format!(
                "transport `{}` cannot read stored messages by time window",
                bus.transport().name()
            ));
        }
        if !serves_replays {
            return no("needs serve_replays(true): the heal is a replay request served by the consumer itself".into());
        }
        if !has_dedupe {
            return no("needs a dedupe store (or an inbox): without one a replayed message already applied would be applied twice".into());
        }
        Ok(())
    }

    /// Serves consumer `consumer` on `pattern` from now on; starts the request task once.
    pub(crate) fn bind(&self, bus: Bus, consumer: &str, pattern: TopicPattern) {
        *self.inner.binding.lock().unwrap_or_else(|p| p.into_inner()) = Some(Binding {
            bus,
            consumer: consumer.to_owned(),
            pattern,
        });
        let rx = self
            .inner
            .jobs_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            tokio::spawn(run(Arc::downgrade(&self.inner), rx));
        }
    }

    /// `handler`, with every message it is given checked first.
    pub(crate) fn wrap(&self, handler: Arc<dyn Handler>) -> Arc<dyn Handler> {
        Arc::new(Healing {
            inner: handler,
            healer: self.inner.clone(),
        })
    }
}

/// The consumer's handler behind a healer's check.
struct Healing {
    inner: Arc<dyn Handler>,
    healer: Arc<Inner>,
}

#[async_trait]
impl Handler for Healing {
    async fn handle(&self, msg: &Message) -> Outcome {
        self.healer.observe(msg);
        self.inner.handle(msg).await
    }

    /// A handler that answers at once keeps doing so (no future per message): the message is
    /// checked once it answered (or panicked); when it does not answer here, `handle` checks it.
    fn handle_now(&self, msg: &Message) -> Option<Outcome> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.handle_now(msg)))
        {
            Ok(None) => None,
            Ok(Some(outcome)) => {
                self.healer.observe(msg);
                Some(outcome)
            }
            Err(panic) => {
                self.healer.observe(msg);
                std::panic::resume_unwind(panic)
            }
        }
    }
}

impl Inner {
    fn binding(&self) -> Option<Binding> {
        self.binding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Checks one delivered message; a gap becomes a job.
    fn observe(&self, msg: &Message) {
        let stored =
            (msg.info.stored_at != DateTime::<Utc>::UNIX_EPOCH).then_some(msg.info.stored_at);
        let now = self.clock.now();
        let events = self
            .monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe_stored(now, msg.topic.as_str(), &msg.headers, stored);
        for e in events {
            if e.kind != FeedEventKind::Gap {
                continue;
            }
            self.gaps.fetch_add(1, Ordering::Relaxed);
            let binding = self.binding();
            if let (Some(b), Some(key), Some(missing)) = (&binding, &e.key, e.missing) {
                let end = stored.unwrap_or(now.wall) + chrono::Duration::milliseconds(1);
                let since = e.since.unwrap_or(end - chrono::Duration::seconds(60));
                let slack = chrono::Duration::from_std(self.options.slack).unwrap_or_default();
                let _ = self.jobs.send(Job {
                    pattern: request_pattern(&b.pattern, msg.topic.env()),
                    topic: e.topic.clone(),
                    key: key.clone(),
                    missing,
                    start: since - slack,
                    end,
                });
            }
            self.emit(binding.as_ref().map(|b| &b.bus), e);
        }
    }

    /// Metrics and a log line for `e`, then hands it to the application.
    fn emit(&self, bus: Option<&Bus>, e: FeedEvent) {
        if let Some(bus) = bus {
            super::watch::note(bus, &e);
        }
        let _ = self.events.send(e);
    }

    /// Sends one request for `jobs` (one pattern) and reports its outcome.
    async fn heal(&self, b: &Binding, pattern: &str, jobs: &[Job]) {
        let mut keys: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for j in jobs {
            let m = keys.entry(&j.key).or_insert(j.missing);
            *m = (m.0.min(j.missing.0), m.1.max(j.missing.1));
        }
        let start = jobs
            .iter()
            .map(|j| j.start)
            .min()
            .expect("one job at least");
        let end = jobs.iter().map(|j| j.end).max().expect("one job at least");
        let mut req = ReplayRequest::new(&b.consumer, pattern, start, end);
        req.keys = keys.keys().map(|k| (*k).to_owned()).collect();
        req.requested_by = format!("{}@gap-healer", b.consumer);
        req.reason = keys
            .iter()
            .map(|(k, (a, z))| format!("gap {k} {a}-{z}"))
            .collect::<Vec<_>>()
            .join(", ");
        let single = (keys.len() == 1)
            .then(|| keys.iter().next().map(|(k, m)| ((*k).to_owned(), *m)))
            .flatten();
        let event = |kind, heal: HealReport| {
            let mut e = FeedEvent::new(kind, &jobs[0].topic, self.clock.now().wall);
            if let Some((k, m)) = &single {
                e.key = Some(k.clone());
                e.missing = Some(*m);
            }
            e.heal = Some(heal);
            e
        };
        let report = HealReport {
            request_id: req.request_id.clone(),
            ..Default::default()
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        tracing::info!(consumer = %b.consumer, request_id = %req.request_id, pattern, keys = %req.reason, "gap heal: replay requested");
        self.emit(
            Some(&b.bus),
            event(FeedEventKind::HealRequested, report.clone()),
        );
        let outcome =
            crate::runtime::control::request_replay(&b.bus, &req, self.options.timeout, |_| {})
                .await;
        let done = match outcome {
            Ok(s) if s.state() == ReplayState::Completed => {
                self.healed.fetch_add(1, Ordering::Relaxed);
                self.applied.fetch_add(s.applied, Ordering::Relaxed);
                event(
                    FeedEventKind::Healed,
                    HealReport {
                        read: s.read,
                        applied: s.applied,
                        skipped: s.skipped_duplicates,
                        ..report
                    },
                )
            }
            Ok(s) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                event(
                    FeedEventKind::HealFailed,
                    HealReport {
                        error: Some(format!("{}: {}", s.state().as_str(), s.error)),
                        ..report
                    },
                )
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                event(
                    FeedEventKind::HealFailed,
                    HealReport {
                        error: Some(e.to_string()),
                        ..report
                    },
                )
            }
        };
        self.emit(Some(&b.bus), done);
    }
}

/// The pattern of a request: the consumer's own, with its env made the message's when it is a
/// wildcard (a request names one env).
fn request_pattern(pattern: &TopicPattern, env: Env) -> String {
    match pattern.env_token() {
        Some(e) if e.parse::<Env>().is_ok() => pattern.as_str().to_owned(),
        _ => {
            let rest = pattern.as_str().splitn(3, '.').nth(2).unwrap_or(">");
            format!("ampy.{}.{rest}", env.as_str())
        }
    }
}

/// Gathers gaps into requests, one at a time, paced by the options.
async fn run(healer: Weak<Inner>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut last: Option<tokio::time::Instant> = None;
    while let Some(first) = jobs.recv().await {
        let Some(options) = healer.upgrade().map(|i| i.options) else {
            return;
        };
        if let Some(t) = last {
            tokio::time::sleep_until(t + options.min_interval).await;
        }
        tokio::time::sleep(options.coalesce).await;
        let mut by_pattern: BTreeMap<String, Vec<Job>> = BTreeMap::new();
        by_pattern
            .entry(first.pattern.clone())
            .or_default()
            .push(first);
        while let Ok(j) = jobs.try_recv() {
            by_pattern.entry(j.pattern.clone()).or_default().push(j);
        }
        let Some(inner) = healer.upgrade() else {
            return;
        };
        let Some(b) = inner.binding() else { continue };
        for (pattern, js) in &by_pattern {
            last = Some(tokio::time::Instant::now());
            inner.heal(&b, pattern, js).await;
        }
    }
}
