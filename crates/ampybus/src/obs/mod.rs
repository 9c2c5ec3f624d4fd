//! Observability: Prometheus metrics ([`BusMetrics`]), OpenTelemetry spans linked through
//! `traceparent` ([`extract_context`], [`init_tracing`]), structured logs ([`init_logging`])
//! and the counts `/stats` shows ([`ConsumerStats`], [`ProducerStats`]); the endpoint that
//! serves them is [`crate::ops`].
//!
//! Every [`crate::Bus`] handle (and its clones) carries one [`BusMetrics`] registry; the
//! runtime records into it as messages flow:
//!
//! | family | labels | recorded |
//! |---|---|---|
//! | `bus_produced_total` | topic, producer | after the broker confirmed a publish (duplicates not counted) |
//! | `bus_consumed_total` | topic, consumer | a handler returned `Ok`, or [`ReaderCounter::consumed`](crate::ops::ReaderCounter::consumed) |
//! | `bus_delivery_latency_ms` | topic | `produced_at` → handler start |
//! | `bus_handler_duration_ms` | topic, consumer | each handler attempt |
//! | `bus_batch_size_bytes` | topic | payload bytes of each confirmed publish batch |
//! | `bus_consumer_lag` | topic, consumer | the transport's pending count, polled every second |
//! | `bus_dlq_total` | topic, reason | a DLQ write succeeded (reason = `DlqCode`) |
//! | `bus_retry_total` | topic, reason | a retry was scheduled (`handler`, `blob_unavailable`) |
//! | `bus_decode_fail_total` | topic, reason | `decode_error`, `contract_violation`, `blob_hash_mismatch`, `payload_too_large` |
//! | `bus_dropped_total` | topic, reason | a `Producer` shed a message (`DropReason`) |
//! | `bus_inflight` | consumer | fetched, not yet settled |
//!
//! `topic` is always the domain-level prefix (`ampy.prod.bars.v1`), `consumer_lag`'s the
//! consumer's pattern cut the same way.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use ampybus::{Bus, Headers, Topic};
//! let dir = tempfile::tempdir().unwrap();
//! let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
//! let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
//! bus.publish(&topic, Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k"), b"x".to_vec())
//!     .await.unwrap();
//! let text = bus.metrics().encode();
//! assert!(text.contains(r#"bus_produced_total{topic="ampy.dev.news.v1",producer="p@1"} 1"#));
//! # });
//! ```

mod metrics;
mod stats;
mod trace;

pub use metrics::{
    BusMetrics, DECODE_FAIL_CODES, LATENCY_BUCKETS_MS, RETRY_REASONS, SIZE_BUCKETS_BYTES,
    domain_topic,
};
pub use stats::{ConsumerStats, DropCounts, DropReason, ProducerStats};
pub use trace::{TRACER_NAME, extract_context, inject_context};

pub(crate) use metrics::{
    ConsumerTopic, FastCounter, FastHistogram, LATENCY_BUCKETS, ProducerTopic, latency_bucket,
    thread_number,
};
pub(crate) use trace::{BusTracer, PublishSpan};

use crate::error::{Error, Result};
use std::sync::{Arc, Mutex, Weak};

/// What one bus handle shares with its runtime pieces: metrics, the tracer, and the consumers
/// and producers running on it (for `/health` and `/stats`).
pub(crate) struct Obs {
    pub(crate) enabled: bool,
    pub(crate) metrics: BusMetrics,
    pub(crate) tracer: BusTracer,
    consumers: Mutex<Vec<Entry>>,
    producers: Mutex<Vec<ProducerEntry>>,
    feeds: Mutex<Vec<Box<FeedProbe>>>,
}

/// A feed monitor's `/stats` entry; `None` once it is gone.
type FeedProbe = dyn Fn() -> Option<serde_json::Value> + Send + Sync;

type ProducerProbe = dyn Fn() -> Option<ProducerStats> + Send + Sync;

struct ProducerEntry {
    id: u64,
    capacity: usize,
    probe: Box<ProducerProbe>,
}

impl Obs {
    pub(crate) fn new(enabled: bool) -> Obs {
        Obs {
            enabled,
            metrics: BusMetrics::new(),
            tracer: BusTracer::from_global(),
            consumers: Mutex::new(Vec::new()),
            producers: Mutex::new(Vec::new()),
            feeds: Mutex::new(Vec::new()),
        }
    }

    /// A runtime consumer; held until it has stopped and another one is registered.
    pub(crate) fn add_consumer(&self, m: Arc<dyn ConsumerProbe>) {
        self.add_entry(Entry::Held(m));
    }

    /// A hand-written reader ([`crate::ops::ReaderCounter`]); held weakly, gone when its
    /// counter is.
    pub(crate) fn add_reader(&self, r: Weak<dyn ConsumerProbe>) {
        self.add_entry(Entry::Weak(r));
    }

    fn add_entry(&self, e: Entry) {
        let mut c = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|x| x.live().is_some_and(|l| !l.is_stopped()));
        c.push(e);
    }

    /// The consumers registered on this handle and still alive (stopped ones included until
    /// the next registration).
    pub(crate) fn consumers(&self) -> Vec<ConsumerEntry> {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Entry::live)
            .collect()
    }

    pub(crate) fn add_producer<T: Send + Sync + 'static>(
        &self,
        id: u64,
        capacity: usize,
        weak: Weak<T>,
        stats: fn(&T) -> ProducerStats,
    ) {
        let probe = move || weak.upgrade().map(|s| stats(&s));
        let mut p = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        p.retain(|e| (e.probe)().is_some());
        p.push(ProducerEntry {
            id,
            capacity,
            probe: Box::new(probe),
        });
    }

    /// Registers a feed monitor's `/stats` entry (dropped once the probe returns `None`).
    pub(crate) fn add_feed(&self, probe: Box<FeedProbe>) {
        let mut f = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        f.retain(|p| p().is_some());
        f.push(probe);
    }

    /// The `/stats` entries of the live feed monitors.
    pub(crate) fn feeds(&self) -> Vec<serde_json::Value> {
        self.feeds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|p| p())
            .collect()
    }

    /// (id, capacity, stats) of every live producer.
    pub(crate) fn producers(&self) -> Vec<(u64, usize, ProducerStats)> {
        self.producers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|e| (e.probe)().map(|s| (e.id, e.capacity, s)))
            .collect()
    }
}

/// A registered consumer as stored: a runtime consumer, or a hand-written reader held weakly.
enum Entry {
    Held(Arc<dyn ConsumerProbe>),
    Weak(Weak<dyn ConsumerProbe>),
}

impl Entry {
    fn live(&self) -> Option<ConsumerEntry> {
        match self {
            Entry::Held(m) => Some(m.clone()),
            Entry::Weak(w) => w.upgrade(),
        }
    }
}

/// A consumer shown on `/health`, `/stats` and in `bus_consumer_lag`: one of the runtime's
/// or a hand-written reader ([`crate::ops::ReaderCounter`]).
pub(crate) type ConsumerEntry = Arc<dyn ConsumerProbe>;

/// What the ops endpoint and the lag poller read of a registered consumer (implemented by the
/// runtime's consumers and by hand-written readers).
pub(crate) trait ConsumerProbe: Send + Sync {
    /// The consumer's name.
    fn name(&self) -> &str;
    /// The pattern it reads.
    fn pattern(&self) -> &crate::topic::TopicPattern;
    /// Its counts now.
    fn stats(&self) -> ConsumerStats;
    /// It has stopped.
    fn is_stopped(&self) -> bool;
    /// It is stopping (no longer fetching).
    fn is_draining(&self) -> bool;
    /// When a message last reached it.
    fn last_message_at(&self) -> Option<chrono::DateTime<chrono::Utc>>;
    /// Its in-flight limit.
    fn max_in_flight(&self) -> usize;
    /// The durable name whose lag the transport can report (`None`: an ephemeral reader).
    fn lag_name(&self) -> Option<&str>;
    /// Sets its `bus_consumer_lag`.
    fn set_lag(&self, pending: u64);
}

/// The log line format of [`init_logging`].
///
/// ```
/// assert_eq!("json".parse::<ampybus::obs::LogFormat>().unwrap(), ampybus::obs::LogFormat::Json);
/// assert!("xml".parse::<ampybus::obs::LogFormat>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (fields flattened: `message_id`, `trace_id`, `topic`,
    /// `consumer`/`producer`, `result`, `latency_ms`, …).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<LogFormat> {
        match s {
            "text" | "pretty" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(Error::config(format!(
                "log format `{other}`: use `text` or `json`"
            ))),
        }
    }
}

/// Installs a `tracing` subscriber writing to stderr, filtered by `RUST_LOG` (default
/// `default_filter`), as text or JSON lines. Payloads and credentials are never logged by this
/// crate. Returns an error when a global subscriber is already set.
///
/// ```
/// use ampybus::obs::{LogFormat, init_logging};
/// init_logging(LogFormat::Json, "warn").unwrap();
/// assert!(init_logging(LogFormat::Text, "warn").is_err());
/// ```
pub fn init_logging(format: LogFormat, default_filter: &str) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let r = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    r.map_err(|e| Error::config(format!("logging: {e}")))
}

/// Keeps the tracer provider installed by [`init_tracing`]; flushes and shuts it down on drop.
#[derive(Debug, Default)]
pub struct TracingGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl TracingGuard {
    /// Whether spans are exported; see [`init_tracing`] for an example.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global OpenTelemetry tracer provider exporting spans over OTLP
/// (http/protobuf) when `endpoint` is given or `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the service name is `OTEL_SERVICE_NAME`, else
/// `service`. With neither, nothing is installed: spans are no-ops and cost next to nothing.
/// Call it before `Bus::connect` (a bus takes its tracer when it is made). Needs cargo feature
/// `otlp` to export; without it an endpoint is a `Config` error.
///
/// ```
/// // SAFETY: single-threaded doc test.
/// unsafe { std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT") };
/// unsafe { std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") };
/// let guard = ampybus::obs::init_tracing("svc", None).unwrap();
/// assert!(!guard.is_exporting());
/// ```
pub fn init_tracing(service: &str, endpoint: Option<&str>) -> Result<TracingGuard> {
    let endpoint = endpoint
        .map(str::to_owned)
        .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let Some(endpoint) = endpoint else {
        return Ok(TracingGuard::default());
    };
    let service = env_nonempty("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_owned());
    otlp_provider(&service, &endpoint).map(|provider| {
        opentelemetry::global::set_tracer_provider(provider.clone());
        TracingGuard {
            provider: Some(provider),
        }
    })
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.trim().is_empty())
}

#[cfg(feature = "otlp")]
fn otlp_provider(
    service: &str,
    endpoint: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::{SpanExporter, WithExportConfig};
    // The signal path is appended to a base endpoint, as the OTLP spec says for
    // OTEL_EXPORTER_OTLP_ENDPOINT.
    let url = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| {
            Error::config(format!(
                "OTLP exporter for {}: {e}",
                crate::transport::url::redact(endpoint)
            ))
        })?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[cfg(not(feature = "otlp"))]
fn otlp_provider(
    _service: &str,
    endpoint: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    Err(Error::config(format!(
        "OTLP endpoint {} is set but this build has no OTLP exporter (enable cargo feature `otlp` of crate `ampybus`)",
        crate::transport::url::redact(endpoint)
    )))
}
