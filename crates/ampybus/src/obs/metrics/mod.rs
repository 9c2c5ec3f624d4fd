//! Prometheus metrics ([`BusMetrics`]): one registry per [`crate::Bus`] handle, with the names
//! and labels of the contract (DESIGN §6, seed §11).

mod feeds;

use crate::dlq::DlqCode;
use crate::obs::DropReason;
use feeds::FeedFamilies;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Histogram buckets for latencies in milliseconds: 0.1 ms … 10 s.
///
/// ```
/// let b = ampybus::obs::LATENCY_BUCKETS_MS;
/// assert_eq!((b[0], b[b.len() - 1]), (0.1, 10_000.0));
/// ```
pub const LATENCY_BUCKETS_MS: [f64; 16] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0,
    5_000.0, 10_000.0,
];

/// Histogram buckets for batch sizes in bytes: 64 B … 16 MiB.
///
/// ```
/// assert_eq!(ampybus::obs::SIZE_BUCKETS_BYTES[0], 64.0);
/// ```
pub const SIZE_BUCKETS_BYTES: [f64; 10] = [
    64.0,
    256.0,
    1_024.0,
    4_096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
];

/// Why a consumer retried: the closed set of `bus_retry_total{reason}`.
///
/// ```
/// assert_eq!(ampybus::obs::RETRY_REASONS, ["handler", "blob_unavailable"]);
/// ```
pub const RETRY_REASONS: [&str; 2] = ["handler", "blob_unavailable"];

/// The codes that count as a decode failure (`bus_decode_fail_total{reason}`).
///
/// ```
/// use ampybus::runtime::DlqCode;
/// assert!(ampybus::obs::DECODE_FAIL_CODES.contains(&DlqCode::DecodeError));
/// assert!(!ampybus::obs::DECODE_FAIL_CODES.contains(&DlqCode::HandlerError));
/// ```
pub const DECODE_FAIL_CODES: [DlqCode; 4] = [
    DlqCode::DecodeError,
    DlqCode::ContractViolation,
    DlqCode::BlobHashMismatch,
    DlqCode::PayloadTooLarge,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicProducer {
    topic: String,
    producer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicConsumer {
    topic: String,
    consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicOnly {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicReason {
    topic: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableOnly {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerOnly {
    consumer: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type FastFamily<L> = Family<L, FastHistogram, fn() -> FastHistogram>;

fn latency_histogram() -> FastHistogram {
    FastHistogram::new(&LATENCY_BUCKETS_MS)
}

/// Shards of a [`FastHistogram`]: threads are spread over them, so two cores rarely write
/// the same cache line.
const SHARDS: usize = 8;

/// The shard of the current thread (see [`thread_number`]).
fn shard_index() -> usize {
    thread_number() % SHARDS
}

/// A number for the current thread, assigned round-robin at its first use: what state
/// sharded by thread (metrics here, the consumer's acker buffer) takes modulo its shard
/// count, so that two cores rarely write the same cache line.
pub(crate) fn thread_number() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.try_with(|n| *n).unwrap_or(0)
}

/// A histogram for observations made per message (delivery latency, handler duration):
/// lock-free counters sharded by thread, summed when scraped. (The client library's
/// histogram takes a mutex per observation, which two cores observing per message contend
/// for.) Encodes exactly as that histogram does; `_count` is the sum of the buckets.
#[derive(Clone)]
pub(crate) struct FastHistogram(Arc<FastInner>);

struct FastInner {
    /// Upper bounds, the last one infinite (`+Inf`).
    bounds: Vec<f64>,
    shards: Vec<FastShard>,
}

/// One shard on cache lines of its own.
#[repr(align(128))]
struct FastShard {
    /// `f64` bits of the sum.
    sum: AtomicU64,
    buckets: Vec<AtomicU64>,
}

impl FastShard {
    fn add_sum(&self, v: f64) {
        let mut cur = self.sum.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(cur) + v).to_bits();
            match self
                .sum
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
    }
}

/// Buckets of a latency histogram ([`LATENCY_BUCKETS_MS`] and `+Inf`).
pub(crate) const LATENCY_BUCKETS: usize = LATENCY_BUCKETS_MS.len() + 1;

/// The bucket of a latency histogram that `ms` falls in (the last, `+Inf`, for NaN and
/// anything over the largest bound), for tallying observations before
/// [`FastHistogram::add`].
#[inline]
pub(crate) fn latency_bucket(ms: f64) -> usize {
    LATENCY_BUCKETS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(LATENCY_BUCKETS - 1)
}

impl FastHistogram {
    fn new(bounds: &[f64]) -> FastHistogram {
        let bounds: Vec<f64> = bounds.iter().copied().chain([f64::INFINITY]).collect();
        let shards = (0..SHARDS)
            .map(|_| FastShard {
                sum: AtomicU64::new(0f64.to_bits()),
                buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            })
            .collect();
        FastHistogram(Arc::new(FastInner { bounds, shards }))
    }

    /// Records one observation (the consumer tallies its observations per run and
    /// [`FastHistogram::add`]s them).
    #[cfg(test)]
    pub(crate) fn observe(&self, v: f64) {
        let inner = &*self.0;
        let shard = &inner.shards[shard_index()];
        let last = inner.bounds.len() - 1;
        let i = inner.bounds.iter().position(|b| v <= *b).unwrap_or(last);
        shard.buckets[i].fetch_add(1, Ordering::Relaxed);
        shard.add_sum(v);
    }

    /// Records observations tallied elsewhere: `counts[i]` of them in bucket `i` (as
    /// [`latency_bucket`] numbers them), their values summing to `sum`. Counts past this
    /// histogram's buckets go to its last (`+Inf`).
    pub(crate) fn add(&self, counts: &[u32], sum: f64) {
        let inner = &*self.0;
        let shard = &inner.shards[shard_index()];
        let last = inner.bounds.len() - 1;
        for (i, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            shard.buckets[i.min(last)].fetch_add(u64::from(*n), Ordering::Relaxed);
        }
        shard.add_sum(sum);
    }

    /// (sum, count, per-bucket counts) over all shards.
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.0;
        let mut buckets: Vec<(f64, u64)> = inner.bounds.iter().map(|b| (*b, 0)).collect();
        let mut sum = 0.0;
        for shard in &inner.shards {
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
            for (b, n) in buckets.iter_mut().zip(&shard.buckets) {
                b.1 += n.load(Ordering::Relaxed);
            }
        }
        let count = buckets.iter().map(|b| b.1).sum();
        (sum, count, buckets)
    }
}

impl std::fmt::Debug for FastHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (sum, count, _) = self.totals();
        f.debug_struct("FastHistogram")
            .field("sum", &sum)
            .field("count", &count)
            .finish()
    }
}

impl prometheus_client::metrics::TypedMetric for FastHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

/// A counter incremented per message by workers on every core: sharded by thread like
/// [`FastHistogram`] (one cache line per shard), summed when scraped. Encodes as the client
/// library's `Counter<u64>` does. (That counter is one atomic, a line every core writes per
/// message.)
#[derive(Clone, Default)]
pub(crate) struct FastCounter(Arc<[CounterShard; SHARDS]>);

/// One shard on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct CounterShard(AtomicU64);

impl FastCounter {
    /// Adds one, on the current thread's shard.
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`, on the current thread's shard.
    pub(crate) fn add(&self, n: u64) {
        self.0[shard_index()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The sum over the shards.
    pub(crate) fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl std::fmt::Debug for FastCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FastCounter").field(&self.get()).finish()
    }
}

impl prometheus_client::metrics::TypedMetric for FastCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for FastCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder
            .encode_counter::<prometheus_client::encoding::NoLabelSet, u64, u64>(&self.get(), None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

impl EncodeMetric for FastHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.totals();
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS_BYTES.iter().copied())
}

/// The metric families of one bus handle. Cloning shares the same families.
///
/// Every family is registered at creation, so `/metrics` lists each one (`# HELP`/`# TYPE`)
/// before its first event. Label values stay bounded: `topic` is the domain-level prefix of
/// the topic (`ampy.prod.bars.v1`, see [`domain_topic`]), `reason` comes from a closed set.
///
/// ```
/// let m = ampybus::obs::BusMetrics::new();
/// let text = m.encode();
/// // OpenMetrics names a counter family without `_total`; its samples carry it.
/// for family in ["bus_produced counter", "bus_consumed counter", "bus_delivery_latency_ms histogram",
///     "bus_handler_duration_ms histogram", "bus_batch_size_bytes histogram",
///     "bus_consumer_lag gauge", "bus_consumer_lag_seconds gauge", "bus_publish_failed counter", "bus_dlq counter", "bus_retry counter",
///     "bus_decode_fail counter", "bus_dropped counter", "bus_inflight gauge",
///     "bus_schema_mismatch counter", "bus_stale_sources gauge", "bus_seconds_since_last gauge",
///     "bus_gap counter",
///     "bus_inbox_skipped counter", "bus_inbox_conflict_retries counter", "bus_outbox_depth gauge",
///     "bus_outbox_age_seconds gauge"] {
///     assert!(text.contains(&format!("# TYPE {family}\n")), "{family}");
/// }
/// // Merge into an application's own registry:
/// let mut mine = prometheus_client::registry::Registry::default();
/// m.register(&mut mine);
/// ```
#[derive(Clone)]
pub struct BusMetrics {
    inner: Arc<Families>,
}

/// A counter family of the application's ([`BusMetrics::app_counter`]).
type AppFamily = Family<Vec<(String, String)>, Counter>;

struct Families {
    registry: Registry,
    /// Counter families an application added ([`BusMetrics::app_counter`]), served after the
    /// bus's, by name.
    app: std::sync::Mutex<(Registry, HashMap<String, AppFamily>)>,
    produced: Family<TopicProducer, Counter>,
    consumed: Family<TopicConsumer, FastCounter>,
    delivery_latency: FastFamily<TopicOnly>,
    handler_duration: FastFamily<TopicConsumer>,
    batch_size: HistFamily<TopicOnly>,
    consumer_lag: Family<TopicConsumer, Gauge>,
    consumer_lag_seconds: Family<TopicConsumer, Gauge<f64, AtomicU64>>,
    publish_failed: Family<TopicProducer, Counter>,
    dlq: Family<TopicReason, Counter>,
    retry: Family<TopicReason, Counter>,
    decode_fail: Family<TopicReason, Counter>,
    dropped: Family<TopicReason, Counter>,
    inflight: Family<ConsumerOnly, Gauge>,
    schema_mismatch: Family<TopicOnly, Counter>,
    feeds: FeedFamilies,
    inbox_skipped: Family<ConsumerOnly, Counter>,
    inbox_conflict_retries: Family<ConsumerOnly, Counter>,
    outbox_depth: Family<TableOnly, Gauge>,
    outbox_age: Family<TableOnly, Gauge<f64, AtomicU64>>,
    producer_cache: RwLock<HashMap<String, HashMap<String, Arc<ProducerTopic>>>>,
    drop_cache: RwLock<HashMap<String, Arc<[Counter; 4]>>>,
}

impl std::fmt::Debug for BusMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusMetrics").finish_non_exhaustive()
    }
}

impl Default for BusMetrics {
    fn default() -> Self {
        BusMetrics::new()
    }
}

/// Pre-resolved publish-side handles for one (topic, producer).
pub(crate) struct ProducerTopic {
    pub(crate) produced: Counter,
    /// `bus_publish_failed_total{topic,producer}`: messages of a publish call that were not
    /// confirmed (the call failed).
    pub(crate) failed: Counter,
    pub(crate) batch_size: Histogram,
}

/// Pre-resolved consume-side handles for one (topic, consumer).
pub(crate) struct ConsumerTopic {
    pub(crate) consumed: FastCounter,
    pub(crate) delivery_latency: FastHistogram,
    pub(crate) handler_duration: FastHistogram,
    pub(crate) retry: [Counter; 2],
    pub(crate) dlq: Vec<Counter>,
    pub(crate) decode_fail: Vec<Option<Counter>>,
}

/// The domain-level prefix of a topic used as the `topic` label: its first four tokens
/// (`ampy.{env}.{domain}.{version}`).
///
/// ```
/// use ampybus::obs::domain_topic;
/// assert_eq!(domain_topic("ampy.prod.bars.v1.XNAS.AAPL"), "ampy.prod.bars.v1");
/// assert_eq!(domain_topic("ampy.dev.>"), "ampy.dev.>");
/// ```
pub fn domain_topic(topic: &str) -> &str {
    match topic.match_indices('.').nth(3) {
        Some((i, _)) => &topic[..i],
        None => topic,
    }
}

impl BusMetrics {
    /// The identity of these families (clones share it): what a counter of theirs is told
    /// apart by when an inbox is bound to one consumer more than once.
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Fresh families in a registry of their own.
    ///
    /// ```
    /// assert!(ampybus::obs::BusMetrics::new().encode().ends_with("# EOF\n"));
    /// ```
    pub fn new() -> BusMetrics {
        let mut registry = Registry::default();
        let f = Families {
            registry: Registry::default(),
            app: std::sync::Mutex::new((Registry::default(), HashMap::new())),
            produced: Family::default(),
            consumed: Family::default(),
            delivery_latency: Family::new_with_constructor(latency_histogram),
            handler_duration: Family::new_with_constructor(latency_histogram),
            batch_size: Family::new_with_constructor(size_histogram),
            consumer_lag: Family::default(),
            consumer_lag_seconds: Family::default(),
            publish_failed: Family::default(),
            dlq: Family::default(),
            retry: Family::default(),
            decode_fail: Family::default(),
            dropped: Family::default(),
            inflight: Family::default(),
            schema_mismatch: Family::default(),
            feeds: FeedFamilies::default(),
            inbox_skipped: Family::default(),
            inbox_conflict_retries: Family::default(),
            outbox_depth: Family::default(),
            outbox_age: Family::default(),
            producer_cache: RwLock::new(HashMap::new()),
            drop_cache: RwLock::new(HashMap::new()),
        };
        register_all(&f, &mut registry);
        BusMetrics {
            inner: Arc::new(Families { registry, ..f }),
        }
    }

    /// Registers these families (shared, not copied) in another registry, e.g. the
    /// application's own.
    ///
    /// ```
    /// use prometheus_client::{encoding::text::encode, registry::Registry};
    /// let mut mine = Registry::default();
    /// ampybus::obs::BusMetrics::new().register(&mut mine);
    /// let mut text = String::new();
    /// encode(&mut text, &mine).unwrap();
    /// assert!(text.contains("# TYPE bus_inflight gauge"));
    /// ```
    pub fn register(&self, registry: &mut Registry) {
        register_all(&self.inner, registry);
    }

    /// This handle's own registry.
    ///
    /// ```
    /// let m = ampybus::obs::BusMetrics::new();
    /// let mut text = String::new();
    /// prometheus_client::encoding::text::encode(&mut text, m.registry()).unwrap();
    /// assert_eq!(text, m.encode());
    /// ```
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The registry in the Prometheus/OpenMetrics text format (see [`BusMetrics`]), followed
    /// by the counters added with [`BusMetrics::app_counter`].
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        let app = self.inner.app.lock().unwrap_or_else(|p| p.into_inner());
        let mut extra = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut extra, &app.0);
        if extra != "# EOF\n" {
            // One exposition: the first part's end marker goes.
            if let Some(body) = out.strip_suffix("# EOF\n") {
                out.truncate(body.len());
            }
            out.push_str(&extra);
        }
        out
    }

    /// A counter of the application's own, served on `/metrics` with the bus's families
    /// (every clone of the handle shares it): family `name` (a `_total` suffix is added by the
    /// encoder), the series of `labels`. The family is made on first use; a later call with
    /// the same name and labels returns the same counter. `name` follows Prometheus naming
    /// (letters, digits, `_`, not starting with a digit) and must not start with `bus_`.
    ///
    /// ```
    /// let m = ampybus::obs::BusMetrics::new();
    /// let ticks = m.app_counter("features_ticks", "Ticks applied", &[("service", "feat")]).unwrap();
    /// ticks.inc_by(3);
    /// m.app_counter("features_ticks", "Ticks applied", &[("service", "feat")]).unwrap().inc();
    /// let text = m.encode();
    /// assert!(text.contains(r#"features_ticks_total{service="feat"} 4"#), "{text}");
    /// assert!(text.contains("# TYPE bus_inflight gauge"));
    /// assert_eq!(text.matches("# EOF").count(), 1);
    /// assert!(text.ends_with("# EOF\n"));
    /// let e = m.app_counter("bus_x", "x", &[]).unwrap_err();
    /// assert!(e.to_string().contains("`bus_x`"), "{e}");
    /// assert!(m.app_counter("9x", "x", &[]).is_err());
    /// ```
    pub fn app_counter(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
    ) -> crate::Result<Counter> {
        let well_formed = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !well_formed {
            return Err(crate::Error::config(format!(
                "metric name `{name}`: must be letters, digits and `_`, not starting with a digit"
            )));
        }
        if name.starts_with("bus_") {
            return Err(crate::Error::config(format!(
                "metric name `{name}`: `bus_` is the bus's own prefix"
            )));
        }
        let mut app = self.inner.app.lock().unwrap_or_else(|p| p.into_inner());
        let (registry, families) = &mut *app;
        let family = families.entry(name.to_owned()).or_insert_with(|| {
            let f = AppFamily::default();
            registry.register(name, help, f.clone());
            f
        });
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Ok(family.get_or_create(&labels).clone())
    }

    pub(crate) fn producer_topic(&self, topic: &str, producer: &str) -> Arc<ProducerTopic> {
        let t = domain_topic(topic);
        if let Some(h) = self
            .inner
            .producer_cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(t)
            .and_then(|m| m.get(producer))
        {
            return h.clone();
        }
        let h = Arc::new(ProducerTopic {
            failed: self
                .inner
                .publish_failed
                .get_or_create(&TopicProducer {
                    topic: t.to_owned(),
                    producer: producer.to_owned(),
                })
                .clone(),
            produced: self
                .inner
                .produced
                .get_or_create(&TopicProducer {
                    topic: t.to_owned(),
                    producer: producer.to_owned(),
                })
                .clone(),
            batch_size: self
                .inner
                .batch_size
                .get_or_create(&TopicOnly {
                    topic: t.to_owned(),
                })
                .clone(),
        });
        self.inner
            .producer_cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(t.to_owned())
            .or_default()
            .insert(producer.to_owned(), h.clone());
        h
    }

    pub(crate) fn consumer_topic(&self, topic: &str, consumer: &str) -> ConsumerTopic {
        let topic = domain_topic(topic).to_owned();
        let tc = TopicConsumer {
            topic: topic.clone(),
            consumer: consumer.to_owned(),
        };
        let tr = |reason: &str| TopicReason {
            topic: topic.clone(),
            reason: reason.to_owned(),
        };
        let i = &self.inner;
        ConsumerTopic {
            consumed: i.consumed.get_or_create(&tc).clone(),
            delivery_latency: i
                .delivery_latency
                .get_or_create(&TopicOnly {
                    topic: topic.clone(),
                })
                .clone(),
            handler_duration: i.handler_duration.get_or_create(&tc).clone(),
            retry: RETRY_REASONS.map(|r| i.retry.get_or_create(&tr(r)).clone()),
            dlq: DlqCode::ALL
                .iter()
                .map(|c| i.dlq.get_or_create(&tr(c.as_str())).clone())
                .collect(),
            decode_fail: DlqCode::ALL
                .iter()
                .map(|c| {
                    DECODE_FAIL_CODES
                        .contains(c)
                        .then(|| i.decode_fail.get_or_create(&tr(c.as_str())).clone())
                })
                .collect(),
        }
    }

    /// `bus_inflight{consumer}` (created at 0).
    pub(crate) fn inflight(&self, consumer: &str) -> Gauge {
        self.inner
            .inflight
            .get_or_create(&ConsumerOnly {
                consumer: consumer.to_owned(),
            })
            .clone()
    }

    /// `bus_inbox_skipped_total{consumer}`: messages a transactional inbox found applied
    /// already (created at 0). Public for the inboxes that live outside this crate (the
    /// Python SDK's, on asyncpg and sqlite3 connections); with the inbox features only.
    ///
    /// ```
    /// let m = ampybus::obs::BusMetrics::new();
    /// m.inbox_skipped("positions").inc();
    /// assert_eq!(m.inbox_skipped("positions").get(), 1);
    /// ```
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    pub fn inbox_skipped(&self, consumer: &str) -> Counter {
        self.inner
            .inbox_skipped
            .get_or_create(&ConsumerOnly {
                consumer: consumer.to_owned(),
            })
            .clone()
    }

    /// `bus_inbox_conflict_retries_total{consumer}`: transactions of a PostgreSQL inbox's
    /// commit lanes that a deadlock (SQLSTATE `40P01`) or a serialization failure (`40001`)
    /// aborted, rolled back and applied again (no handler's outcome counts from them).
    ///
    /// ```
    /// let m = ampybus::obs::BusMetrics::new();
    /// m.inbox_conflict_retries("positions").inc();
    /// assert_eq!(m.inbox_conflict_retries("positions").get(), 1);
    /// ```
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    pub fn inbox_conflict_retries(&self, consumer: &str) -> Counter {
        self.inner
            .inbox_conflict_retries
            .get_or_create(&ConsumerOnly {
                consumer: consumer.to_owned(),
            })
            .clone()
    }

    /// `bus_outbox_depth{table}` and `bus_outbox_age_seconds{table}` (created at 0).
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    pub(crate) fn outbox(&self, table: &str) -> (Gauge, Gauge<f64, AtomicU64>) {
        let l = TableOnly {
            table: table.to_owned(),
        };
        (
            self.inner.outbox_depth.get_or_create(&l).clone(),
            self.inner.outbox_age.get_or_create(&l).clone(),
        )
    }

    /// `bus_consumer_lag{topic,consumer}` (created at 0).
    pub(crate) fn consumer_lag(&self, topic: &str, consumer: &str) -> Gauge {
        self.inner
            .consumer_lag
            .get_or_create(&TopicConsumer {
                topic: domain_topic(topic).to_owned(),
                consumer: consumer.to_owned(),
            })
            .clone()
    }

    /// `bus_consumer_lag_seconds{topic,consumer}` (created at 0): see `runtime::lag`.
    pub(crate) fn consumer_lag_seconds(
        &self,
        topic: &str,
        consumer: &str,
    ) -> Gauge<f64, AtomicU64> {
        self.inner
            .consumer_lag_seconds
            .get_or_create(&TopicConsumer {
                topic: domain_topic(topic).to_owned(),
                consumer: consumer.to_owned(),
            })
            .clone()
    }

    /// Counts one consumed message whose `schema_fqdn` the registry does not list for its
    /// topic (`bus_schema_mismatch_total{topic}`).
    pub(crate) fn schema_mismatch(&self, topic: &str) {
        self.inner
            .schema_mismatch
            .get_or_create(&TopicOnly {
                topic: domain_topic(topic).to_owned(),
            })
            .inc();
    }

    /// The feed-health families (`runtime::feeds`).
    pub(crate) fn feeds(&self) -> &FeedFamilies {
        &self.inner.feeds
    }

    /// Counts one producer-side drop.
    pub(crate) fn dropped(&self, topic: &str, reason: DropReason) {
        let t = domain_topic(topic);
        let idx = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        if let Some(h) = self
            .inner
            .drop_cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(t)
        {
            h[idx].inc();
            return;
        }
        let h: Arc<[Counter; 4]> = Arc::new(DropReason::ALL.map(|r| {
            self.inner
                .dropped
                .get_or_create(&TopicReason {
                    topic: t.to_owned(),
                    reason: r.as_str().to_owned(),
                })
                .clone()
        }));
        h[idx].inc();
        self.inner
            .drop_cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.to_owned(), h);
    }
}

/// A family that is listed (`# HELP`/`# TYPE`) even before it has a sample: the contract wants
/// every family on `/metrics` from start-up, and `prometheus-client` skips empty ones.
#[derive(Debug)]
pub(super) struct Listed<M>(pub(super) M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
    fn is_empty(&self) -> bool {
        false
    }
}

fn register_all(f: &Families, r: &mut Registry) {
    r.register(
        "bus_produced",
        "Messages the broker confirmed, by domain-level topic and producer",
        Listed(f.produced.clone()),
    );
    r.register(
        "bus_consumed",
        "Messages handled Ok (then acked), by domain-level topic and consumer",
        Listed(f.consumed.clone()),
    );
    r.register(
        "bus_delivery_latency_ms",
        "Milliseconds from produced_at to handler start",
        Listed(f.delivery_latency.clone()),
    );
    r.register(
        "bus_handler_duration_ms",
        "Milliseconds a handler ran, per attempt",
        Listed(f.handler_duration.clone()),
    );
    r.register(
        "bus_batch_size_bytes",
        "Bytes of payload per published batch and domain-level topic",
        Listed(f.batch_size.clone()),
    );
    r.register(
        "bus_consumer_lag",
        "Messages not yet acked by a durable consumer",
        Listed(f.consumer_lag.clone()),
    );
    r.register(
        "bus_publish_failed",
        "Messages of failed publish calls not confirmed by the transport, by domain-level topic and producer",
        Listed(f.publish_failed.clone()),
    );
    r.register(
        "bus_consumer_lag_seconds",
        "Age in seconds of the oldest message a consumer holds unacknowledged (0: none)",
        Listed(f.consumer_lag_seconds.clone()),
    );
    r.register(
        "bus_dlq",
        "Messages dead-lettered, by domain-level topic and DLQ reason code",
        Listed(f.dlq.clone()),
    );
    r.register(
        "bus_retry",
        "Retries scheduled by consumers, by domain-level topic and reason",
        Listed(f.retry.clone()),
    );
    r.register(
        "bus_decode_fail",
        "Deliveries that could not be turned into a message, by reason code",
        Listed(f.decode_fail.clone()),
    );
    r.register(
        "bus_dropped",
        "Messages shed by a producer queue or a best-effort consumer queue, by domain-level topic and reason",
        Listed(f.dropped.clone()),
    );
    r.register(
        "bus_inflight",
        "Messages fetched and not yet settled, per consumer",
        Listed(f.inflight.clone()),
    );
    r.register(
        "bus_schema_mismatch",
        "Consumed messages whose schema_fqdn the registry does not list for their topic (dead-lettered as schema_mismatch), by domain-level topic",
        Listed(f.schema_mismatch.clone()),
    );
    f.feeds.register(r);
    r.register(
        "bus_inbox_skipped",
        "Messages a transactional inbox found applied already (handler not called, acked), per consumer",
        Listed(f.inbox_skipped.clone()),
    );
    r.register(
        "bus_inbox_conflict_retries",
        "Transactions of a PostgreSQL inbox aborted by a deadlock or serialization failure, rolled back and applied again, per consumer",
        Listed(f.inbox_conflict_retries.clone()),
    );
    r.register(
        "bus_outbox_depth",
        "Outbox rows staged and not yet published, per outbox table",
        Listed(f.outbox_depth.clone()),
    );
    r.register(
        "bus_outbox_age_seconds",
        "Age in seconds of the oldest unpublished outbox row (0 when none), per outbox table",
        Listed(f.outbox_age.clone()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition text of one metric registered as `h`.
    fn text(m: Box<dyn EncodeMetric + Send + Sync>) -> String {
        struct Named(Box<dyn EncodeMetric + Send + Sync>);
        impl std::fmt::Debug for Named {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("Named")
            }
        }
        impl EncodeMetric for Named {
            fn encode(&self, e: MetricEncoder) -> Result<(), std::fmt::Error> {
                self.0.encode(e)
            }
            fn metric_type(&self) -> MetricType {
                self.0.metric_type()
            }
        }
        let mut r = Registry::default();
        r.register("h", "help", Named(m));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    /// Counts from several threads sum exactly, and the text is the client library's
    /// counter's.
    #[test]
    fn fast_counter_counts_exactly_and_encodes_as_the_library_counter() {
        let fast = FastCounter::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let fast = fast.clone();
                s.spawn(move || (0..2_500).for_each(|_| fast.inc()));
            }
        });
        let lib: Counter = Counter::default();
        (0..10_000).for_each(|_| {
            lib.inc();
        });
        assert_eq!(fast.get(), 10_000);
        let fast_text = text(Box::new(fast));
        assert!(fast_text.contains("h_total 10000\n"), "{fast_text}");
        assert_eq!(fast_text, text(Box::new(lib)));
    }

    /// The same observations, from several threads, give the same exposition text as the
    /// client library's histogram.
    #[test]
    fn fast_histogram_encodes_as_the_library_histogram() {
        let values: Vec<f64> = (0..2_000)
            .map(|i| f64::from(i % 37) * 0.75 + f64::from(i % 5) * 1_000.0 + 0.05)
            .chain([0.1, 10_000.0, 10_000.5, 0.0])
            .collect();
        let fast = FastHistogram::new(&LATENCY_BUCKETS_MS);
        let lib = Histogram::new(LATENCY_BUCKETS_MS.iter().copied());
        std::thread::scope(|s| {
            for chunk in values.chunks(500) {
                let fast = fast.clone();
                s.spawn(move || chunk.iter().for_each(|v| fast.observe(*v)));
            }
        });
        values.iter().for_each(|v| lib.observe(*v));
        let (fast_text, lib_text) = (text(Box::new(fast.clone())), text(Box::new(lib)));
        assert!(fast_text.contains("h_count 2004"), "{fast_text}");
        assert!(
            fast_text.contains(r#"h_bucket{le="+Inf"} 2004"#),
            "{fast_text}"
        );
        // Sums may differ in the last bits (added in another order): compare the rest exactly.
        let strip = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with("h_sum"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(strip(&fast_text), strip(&lib_text));
        let sum = |t: &str| -> f64 {
            t.lines()
                .find_map(|l| l.strip_prefix("h_sum "))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(
            (sum(&fast_text) - sum(&lib_text)).abs() < 1e-6,
            "{fast_text}\n{lib_text}"
        );
    }
    /// Observations tallied by bucket and added at once read exactly as the same
    /// observations made one by one, in every bucket, `+Inf` and NaN included.
    #[test]
    fn tallied_observations_read_as_observed_ones() {
        let values: Vec<f64> = (0..3_000)
            .map(|i| f64::from(i % 41) * 0.37 + f64::from(i % 7) * 1_700.0)
            .chain([0.1, 0.25, 10_000.0, 10_000.5, 0.0, f64::INFINITY, f64::NAN])
            .collect();
        let one_by_one = FastHistogram::new(&LATENCY_BUCKETS_MS);
        values.iter().for_each(|v| one_by_one.observe(*v));
        let tallied = FastHistogram::new(&LATENCY_BUCKETS_MS);
        let mut counts = [0u32; LATENCY_BUCKETS];
        for v in &values {
            counts[latency_bucket(*v)] += 1;
        }
        tallied.add(&counts, values.iter().sum());
        let strip = |t: &str| {
            t.lines()
                .filter(|l| !l.starts_with("h_sum"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let (a, b) = (text(Box::new(one_by_one)), text(Box::new(tallied)));
        assert!(a.contains(r#"h_bucket{le="+Inf"} 3007"#), "{a}");
        assert!(a.contains(r#"h_bucket{le="0.1"} "#), "{a}");
        assert_eq!(strip(&a), strip(&b));
        let counter = FastCounter::default();
        counter.add(40);
        counter.inc();
        assert_eq!(counter.get(), 41);
    }
}
