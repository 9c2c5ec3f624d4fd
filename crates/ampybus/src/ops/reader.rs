//! [`ReaderCounter`]: metrics and `/stats` for a consumer that reads a
//! [`crate::transport::Subscription`] itself instead of through [`crate::runtime::Consumer`]
//! (e.g. `ampybus sub`).

use crate::bus::Bus;
use crate::obs::ConsumerStats;
use crate::obs::{ConsumerProbe, ConsumerTopic};
use crate::topic::TopicPattern;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub(crate) struct ReaderShared {
    bus: Bus,
    name: String,
    pattern: TopicPattern,
    /// A durable name the transport knows (its lag is read); `false` for an ephemeral read.
    durable: bool,
    max_in_flight: usize,
    consumed: AtomicU64,
    last_message_us: AtomicI64,
    stopped: AtomicBool,
    lag_gauge: Option<Gauge>,
    topics: Mutex<HashMap<String, Arc<ConsumerTopic>>>,
}

impl ConsumerProbe for ReaderShared {
    fn name(&self) -> &str {
        &self.name
    }

    fn pattern(&self) -> &TopicPattern {
        &self.pattern
    }

    fn stats(&self) -> ConsumerStats {
        ConsumerStats {
            handled_ok: self.consumed.load(Ordering::SeqCst),
            ..ConsumerStats::default()
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn is_draining(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn last_message_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        match self.last_message_us.load(Ordering::Relaxed) {
            0 => None,
            us => chrono::DateTime::from_timestamp_micros(us),
        }
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    fn lag_name(&self) -> Option<&str> {
        self.durable.then_some(self.name.as_str())
    }

    fn set_lag(&self, pending: u64) {
        if let Some(g) = &self.lag_gauge {
            g.set(i64::try_from(pending).unwrap_or(i64::MAX));
        }
    }
}

/// Counts what a hand-written reader consumed: `bus_consumed_total{topic,consumer}` on
/// `/metrics` and a consumer entry (`handled_ok`, `last_message_at`, and for a durable name
/// `lag`) on `/stats` of [`super::serve`] — what [`crate::runtime::Consumer`] records on its
/// own. Call [`ReaderCounter::consumed`] once per message the reader finished (for a durable
/// reader: after its ack). Dropping the counter (or [`ReaderCounter::stop`]) takes the
/// consumer off `/stats` and `/health`; its counters stay on `/metrics`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::{Bus, TopicPattern, ops::ReaderCounter};
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let pattern = TopicPattern::parse("ampy.dev.news.>").unwrap();
/// let reader = ReaderCounter::register(&bus, "audit", pattern, true, 256);
/// reader.consumed("ampy.dev.news.v1.raw");
/// reader.consumed("ampy.dev.news.v1.raw");
/// assert_eq!(reader.count(), 2);
/// let text = bus.metrics().encode();
/// assert!(text.contains(r#"bus_consumed_total{topic="ampy.dev.news.v1",consumer="audit"} 2"#));
/// reader.stop();
/// # });
/// ```
#[derive(Clone)]
pub struct ReaderCounter {
    inner: Arc<ReaderShared>,
}

impl std::fmt::Debug for ReaderCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderCounter")
            .field("name", &self.inner.name)
            .field("consumed", &self.count())
            .finish()
    }
}

impl ReaderCounter {
    /// Registers a reader named `name` (the `consumer` label) reading `pattern` on `bus`;
    /// `durable`: `name` is a durable consumer the transport knows, so its lag is reported;
    /// `max_in_flight`: the most it fetches at once (shown on `/stats`). On a bus with
    /// observability off nothing is recorded. See [`ReaderCounter`] for an example.
    pub fn register(
        bus: &Bus,
        name: impl Into<String>,
        pattern: TopicPattern,
        durable: bool,
        max_in_flight: usize,
    ) -> ReaderCounter {
        let name = name.into();
        let obs = bus.obs();
        let lag_gauge =
            (obs.enabled && durable).then(|| obs.metrics.consumer_lag(pattern.as_str(), &name));
        let inner = Arc::new(ReaderShared {
            bus: bus.clone(),
            name,
            pattern,
            durable,
            max_in_flight,
            consumed: AtomicU64::new(0),
            last_message_us: AtomicI64::new(0),
            stopped: AtomicBool::new(false),
            lag_gauge,
            topics: Mutex::new(HashMap::new()),
        });
        if obs.enabled {
            let probe: Arc<dyn ConsumerProbe> = inner.clone();
            obs.add_reader(Arc::downgrade(&probe));
        }
        ReaderCounter { inner }
    }

    /// Counts one message of `topic` consumed; see [`ReaderCounter`] for an example.
    pub fn consumed(&self, topic: &str) {
        let s = &self.inner;
        s.consumed.fetch_add(1, Ordering::SeqCst);
        s.last_message_us
            .store(chrono::Utc::now().timestamp_micros(), Ordering::Relaxed);
        if let Some(h) = self.topic_handles(topic) {
            h.consumed.inc();
        }
    }

    /// Counts one message of `topic` whose payload did not decode as its schema
    /// (`bus_decode_fail_total{topic,reason="decode_error"}`), for a reader that keeps such
    /// messages instead of dead-lettering them (e.g. `ampybus archive`).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, TopicPattern, ops::ReaderCounter};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let reader = ReaderCounter::register(&bus, "archive", TopicPattern::parse(">").unwrap(), true, 1);
    /// reader.decode_failed("ampy.dev.bars.v1.XNAS.AAPL");
    /// let text = bus.metrics().encode();
    /// assert!(text.contains(r#"bus_decode_fail_total{topic="ampy.dev.bars.v1",reason="decode_error"} 1"#), "{text}");
    /// # });
    /// ```
    pub fn decode_failed(&self, topic: &str) {
        let at = crate::dlq::DlqCode::ALL
            .iter()
            .position(|c| *c == crate::dlq::DlqCode::DecodeError);
        if let Some(h) = self.topic_handles(topic)
            && let Some(Some(c)) = at.map(|i| &h.decode_fail[i])
        {
            c.inc();
        }
    }

    /// The metric handles of `topic`'s domain-level prefix (`None` with observability off).
    fn topic_handles(&self, topic: &str) -> Option<Arc<ConsumerTopic>> {
        let s = &self.inner;
        let obs = s.bus.obs();
        if !obs.enabled {
            return None;
        }
        let key = crate::obs::domain_topic(topic);
        let mut topics = s.topics.lock().unwrap_or_else(|p| p.into_inner());
        let h = match topics.get(key) {
            Some(h) => h.clone(),
            None => {
                let h = Arc::new(obs.metrics.consumer_topic(key, &s.name));
                topics.insert(key.to_owned(), h.clone());
                h
            }
        };
        drop(topics);
        Some(h)
    }

    /// Messages counted so far; see [`ReaderCounter`] for an example.
    pub fn count(&self) -> u64 {
        self.inner.consumed.load(Ordering::SeqCst)
    }

    /// Takes the reader off `/stats` and `/health` (also done on drop of the last clone); see
    /// [`ReaderCounter`] for an example.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
    }
}
