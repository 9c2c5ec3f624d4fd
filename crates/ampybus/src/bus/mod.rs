//! [`Bus`]: the handle applications use. Chooses a transport from a URL, fills and validates
//! headers, encodes payloads (gzip, blob pointer) and publishes; opens subscriptions.

mod tiers;

use crate::codec::{BlobStore, PayloadCodec};
use crate::envelope::{Envelope, TopicName};
use crate::error::{Error, Result};
use crate::headers::Headers;
use crate::obs::{BusMetrics, Obs, PublishSpan};
use crate::registry::{RateLimits, Registry, SchemaGate};
use crate::topic::Topic;
use crate::transport::embedded::{EmbeddedLog, EmbeddedOptions};
use crate::transport::{
    BatchOutcome, Lag, PublishOutcome, PublishReceipt, ReplayByTime, SubscribeSpec, Subscription,
    Transport,
};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// Default data directory when no URL is given: `$AMPYBUS_URL`, else `./ampybus-data`.
///
/// ```
/// assert!(!ampybus::bus::default_url().is_empty());
/// ```
pub fn default_url() -> String {
    std::env::var("AMPYBUS_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "./ampybus-data".to_owned())
}

/// Which transport a URL selects.
///
/// ```
/// use ampybus::bus::{TransportKind, transport_kind};
/// assert_eq!(transport_kind("file:///tmp/x").unwrap(), TransportKind::Embedded);
/// assert_eq!(transport_kind("./data").unwrap(), TransportKind::Embedded);
/// assert_eq!(transport_kind("nats://127.0.0.1:4222").unwrap(), TransportKind::Nats);
/// assert!(transport_kind("ftp://x").unwrap_err().to_string().contains("ftp"));
/// assert!(!transport_kind("ftp://bob:secret@h/x").unwrap_err().to_string().contains("secret"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// `file://` or a plain path.
    Embedded,
    /// `nats://`, `tls://`.
    Nats,
    /// `kafka://`.
    Kafka,
    /// `redis://`, `rediss://`.
    Redis,
    /// `postgres://`, `postgresql://`: the archive, read-only (feature `archive`).
    Archive,
}

/// Classifies a URL without connecting.
pub fn transport_kind(url: &str) -> Result<TransportKind> {
    let url = url.trim();
    if url.is_empty() {
        return Err(Error::config("url: empty"));
    }
    match url.split_once("://").map(|(s, _)| s) {
        Some("file") => Ok(TransportKind::Embedded),
        Some("nats") | Some("tls") => Ok(TransportKind::Nats),
        Some("kafka") => Ok(TransportKind::Kafka),
        Some("redis") | Some("rediss") => Ok(TransportKind::Redis),
        Some("postgres") | Some("postgresql") => Ok(TransportKind::Archive),
        Some(other) => Err(Error::config(format!(
            "url {:?}: scheme `{other}` is not supported (use file://, a path, nats://, tls://, kafka://, redis://, rediss:// or postgres:// for the archive)",
            redact(url)
        ))),
        None if url.starts_with("file:") => Ok(TransportKind::Embedded),
        None if url.contains(':') && !url.starts_with('.') && !url.starts_with('/') => {
            Err(Error::config(format!(
                "url {:?}: not a path and no `scheme://` (use file://, a path, nats://, kafka:// or redis://)",
                redact(url)
            )))
        }
        None => Ok(TransportKind::Embedded),
    }
}

/// A connection to the bus.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::{Bus, Headers, Topic, TopicPattern, transport::SubscribeSpec};
/// use std::time::Duration;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
/// let headers = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
/// bus.publish(&topic, headers, b"order".to_vec()).await.unwrap();
/// let pattern = TopicPattern::parse("ampy.dev.orders.>").unwrap();
/// let mut sub = bus.subscribe(SubscribeSpec::durable(pattern, "oms")).await.unwrap();
/// let got = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
/// assert_eq!(got.len(), 1);
/// assert_eq!(&got[0].envelope.payload[..], b"order");
/// for d in got { d.ack().await.map_err(|(e, _)| e).unwrap(); }
/// bus.close().await.unwrap();
/// # });
/// ```
#[derive(Clone)]
pub struct Bus {
    transport: Arc<dyn Transport>,
    /// Stored windows with an archive behind the transport (`archive=` option).
    history: Option<Arc<dyn ReplayByTime>>,
    codec: PayloadCodec,
    url: String,
    obs: Arc<Obs>,
    registry: Option<Arc<Registry>>,
    service: Option<Arc<str>>,
    rates: Option<Arc<RateLimits>>,
    /// Tiers set with [`Bus::with_tier`] (see [`crate::tier`]).
    tiers: Arc<crate::tier::TierTable>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("transport", &self.transport.name())
            .field("url", &redact(&self.url))
            .finish()
    }
}

pub use crate::transport::url::redact;

/// Splits the `archive=` option (a percent-encoded `postgres://` URL) off a bus URL: the URL
/// the transport sees, and the archive's URL.
///
/// ```
/// let (url, archive) = ampybus::bus::take_archive_option("file:///d?sync=full&archive=postgres%3A%2F%2Fu%40h%2Fdb");
/// assert_eq!(url, "file:///d?sync=full");
/// assert_eq!(archive.as_deref(), Some("postgres://u@h/db"));
/// assert_eq!(ampybus::bus::take_archive_option("/d").1, None);
/// ```
pub fn take_archive_option(url: &str) -> (String, Option<String>) {
    take_option(url, "archive")
}

/// The URL a transport sees: `url` without the options the bus handles itself (`archive`,
/// `blob_store`).
///
/// ```
/// assert_eq!(ampybus::bus::transport_url("/d?blob_store=file:///b&archive=x"), "/d");
/// assert_eq!(ampybus::bus::transport_url("nats://h:4222?stream_prefix=A"), "nats://h:4222?stream_prefix=A");
/// ```
pub fn transport_url(url: &str) -> String {
    let (url, _) = take_option(url, "archive");
    take_option(&url, "blob_store").0
}

/// Splits the option `name` (its value percent-decoded) off a URL: options the bus itself
/// handles (`archive`, `blob_store`) on any transport's URL.
fn take_option(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut archive = None;
    let key = format!("{name}=");
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix(key.as_str()) {
            Some(v) => {
                archive = Some(
                    url::form_urlencoded::parse(format!("a={v}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default(),
                );
                false
            }
            None => true,
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, archive)
}

impl Bus {
    /// Connects to the transport the URL names: `file:///dir` or a path (embedded log);
    /// `nats://`, `tls://`, `kafka://`, `redis://`, `rediss://` when those bindings are
    /// built in. Errors name the URL (credentials redacted) and the problem.
    pub async fn connect(url: &str) -> Result<Bus> {
        Bus::open(url, None).await
    }

    /// [`Bus::connect`] enforcing `registry` ([`Bus::with_registry`]), whose retention the
    /// binding applies where it creates or trims storage: each entry's `retention_days` (the
    /// longest of the entries sharing a unit) becomes the NATS stream `max_age`, the Kafka
    /// topic `retention.ms`, the Redis `MINID` trim of that env and domain, and the embedded
    /// log's retention of the domain (the longest over envs; the log keeps one per domain).
    /// The registry beats the URL's `max_age_days` / `retention_days` for the units it covers.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, registry::Registry};
    /// let reg = Registry::parse(r#"
    /// [[topic]]
    /// pattern = "ampy.*.news.v1.>"
    /// owner = "news"
    /// schemas = ["ampy.raw.v1.Bytes"]
    /// tier = "at_least_once"
    /// retention_days = 2
    /// "#, "registry.toml").unwrap();
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect_with_registry(dir.path().to_str().unwrap(), reg).await.unwrap();
    /// assert_eq!(bus.registry().unwrap().entries().len(), 1);
    /// # });
    /// ```
    pub async fn connect_with_registry(url: &str, registry: Registry) -> Result<Bus> {
        let retention = registry.unit_retentions();
        Ok(Bus::open(url, Some(&retention))
            .await?
            .with_registry(registry))
    }

    async fn open(url: &str, retention: Option<&crate::transport::UnitRetention>) -> Result<Bus> {
        let (url, archive) = take_archive_option(url);
        let (url, blob_store) = take_option(&url, "blob_store");
        let mut bus = Bus::connect_transport(&url, retention).await?;
        if let Some(b) = blob_store {
            let store = BlobStore::from_url(&b)?;
            // Blobs in a store of the option's expire with the transports' default retention
            // (the embedded log's own `<dir>/blobs` follows its configurable retention instead).
            crate::codec::spawn_blob_expiry(store.clone());
            bus = bus.with_blob_store(store);
        }
        match archive {
            None => Ok(bus),
            #[cfg(feature = "archive")]
            Some(a) => Ok(bus.with_archive(crate::archive::ArchiveReader::connect(&a).await?)),
            #[cfg(not(feature = "archive"))]
            Some(_) => Err(Error::config(format!(
                "url {:?}: option `archive`: reading the archive is not available in this build (enable cargo feature `archive` of crate `ampybus`)",
                redact(&url)
            ))),
        }
    }

    async fn connect_transport(
        url: &str,
        retention: Option<&crate::transport::UnitRetention>,
    ) -> Result<Bus> {
        match transport_kind(url)? {
            TransportKind::Embedded => {
                let mut opts = EmbeddedOptions::from_url(url)?;
                if let Some(r) = retention {
                    opts.apply_registry_retention(r);
                }
                if opts.dir.is_file() {
                    return Err(Error::config(format!(
                        "url {:?}: the data directory {} is a file",
                        redact(url),
                        opts.dir.display()
                    )));
                }
                let blobs = BlobStore::local(&opts.dir.join("blobs"))?;
                let dir = opts.dir.clone();
                let log = tokio::task::spawn_blocking(move || EmbeddedLog::open(opts))
                    .await
                    .map_err(|e| {
                        let message =
                            format!("embedded log in {}: open task failed: {e}", dir.display());
                        Error::transport(message, e)
                    })??;
                Ok(Bus::with_transport(Arc::new(log), url).with_blob_store(blobs))
            }
            #[cfg(feature = "archive")]
            TransportKind::Archive => {
                let t = crate::archive::ArchiveTransport::connect(url).await?;
                Ok(Bus::with_transport(Arc::new(t), url))
            }
            #[cfg(not(feature = "archive"))]
            TransportKind::Archive => Err(Error::config(format!(
                "url {:?}: reading the archive is not available in this build (enable cargo feature `archive` of crate `ampybus`)",
                redact(url)
            ))),
            #[cfg(feature = "nats")]
            TransportKind::Nats => {
                let mut opts = crate::transport::nats::NatsOptions::from_url(url)?;
                if let Some(r) = retention {
                    opts.registry_retention = r.clone();
                }
                let t = crate::transport::nats::NatsTransport::connect(opts).await?;
                Ok(Bus::with_transport(Arc::new(t), url))
            }
            #[cfg(not(feature = "nats"))]
            TransportKind::Nats => Err(Error::config(format!(
                "url {:?}: the NATS binding is not available in this build (enable cargo feature `nats` of crate `ampybus`)",
                redact(url)
            ))),
            #[cfg(feature = "kafka")]
            TransportKind::Kafka => {
                let mut opts = crate::transport::kafka::KafkaOptions::from_url(url)?;
                if let Some(r) = retention {
                    opts.registry_retention = r.clone();
                }
                let t = crate::transport::kafka::KafkaTransport::connect(opts).await?;
                Ok(Bus::with_transport(Arc::new(t), url))
            }
            #[cfg(not(feature = "kafka"))]
            TransportKind::Kafka => Err(Error::config(format!(
                "url {:?}: the Kafka binding is not available in this build (enable cargo feature `kafka` of crate `ampybus`)",
                redact(url)
            ))),
            #[cfg(feature = "redis")]
            TransportKind::Redis => {
                let mut opts = crate::transport::redis::RedisOptions::from_url(url)?;
                if let Some(r) = retention {
                    opts.registry_retention = r.clone();
                }
                let t = crate::transport::redis::RedisTransport::connect(opts).await?;
                Ok(Bus::with_transport(Arc::new(t), url))
            }
            #[cfg(not(feature = "redis"))]
            TransportKind::Redis => Err(Error::config(format!(
                "url {:?}: the Redis binding is not available in this build (enable cargo feature `redis` of crate `ampybus`)",
                redact(url)
            ))),
        }
    }

    /// Wraps any transport (used by bindings and tests).
    pub fn with_transport(transport: Arc<dyn Transport>, url: &str) -> Bus {
        Bus {
            transport,
            history: None,
            codec: PayloadCodec::default(),
            url: url.to_owned(),
            obs: Arc::new(Obs::new(true)),
            registry: None,
            service: None,
            rates: None,
            tiers: Arc::default(),
        }
    }

    pub(crate) fn tier_table(&self) -> &crate::tier::TierTable {
        &self.tiers
    }

    pub(crate) fn map_tiers(mut self, f: impl FnOnce(&mut crate::tier::TierTable)) -> Bus {
        f(Arc::make_mut(&mut self.tiers));
        self
    }

    /// Enforces a topic registry on this handle (and everything built on it): a publish
    /// outside the producer service's claims, of an unclaimed topic or of a schema not listed
    /// for its topic is refused ([`Registry::check_publish`]); with a
    /// [service](Bus::with_service), subscriptions outside what it may read are refused
    /// ([`Registry::check_subscribe`]); consumers dead-letter messages whose `schema_fqdn` is
    /// not listed as `schema_mismatch`; a [`crate::runtime::Producer`] keeps each entry's
    /// `max_rate`. The `dlq` and `control` domains stay open to every service.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, ErrorKind, Headers, Topic, registry::Registry};
    /// let reg = Registry::parse(r#"
    /// [[topic]]
    /// pattern = "ampy.*.news.v1.>"
    /// owner = "news"
    /// schemas = ["ampy.raw.v1.Bytes"]
    /// tier = "at_least_once"
    /// retention_days = 7
    /// "#, "registry.toml").unwrap();
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap().with_registry(reg);
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let ok = Headers::for_publish("ampy.raw.v1.Bytes", "news@1", "wire", "n-1");
    /// bus.publish(&topic, ok, b"x".to_vec()).await.unwrap();
    /// let other = Headers::for_publish("ampy.raw.v1.Bytes", "ui@1", "wire", "n-2");
    /// let e = bus.publish(&topic, other, b"x".to_vec()).await.unwrap_err();
    /// assert_eq!(e.kind(), ErrorKind::Header);
    /// assert!(e.message().contains("owned by `news`"));
    /// # });
    /// ```
    pub fn with_registry(mut self, registry: Registry) -> Bus {
        let registry = Arc::new(registry);
        self.rates = RateLimits::new(registry.clone()).map(Arc::new);
        self.registry = Some(registry);
        self
    }

    /// Names the service using this handle (the consumer side of the registry): with a
    /// [registry](Bus::with_registry), subscribing to a pattern the service may not read is
    /// a `Config` error naming the pattern, the entry and who may read it.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap().with_service("risk");
    /// assert_eq!(bus.service(), Some("risk"));
    /// # });
    /// ```
    pub fn with_service(mut self, service: &str) -> Bus {
        self.service = Some(Arc::from(service));
        self
    }

    /// The registry this handle enforces, if any.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// assert!(bus.registry().is_none());
    /// # });
    /// ```
    pub fn registry(&self) -> Option<&Arc<Registry>> {
        self.registry.as_ref()
    }

    /// The service named with [`Bus::with_service`].
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// assert_eq!(bus.service(), None);
    /// # });
    /// ```
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }

    /// Waits until one more message of `topic` fits the `max_rate` of its registry entry
    /// (at once without a registry or a rate).
    pub(crate) async fn throttle(&self, topic: &Topic) {
        if let Some(r) = &self.rates {
            r.acquire(topic).await;
        }
    }

    /// The registry's publish check, when the handle has a registry.
    fn check_claims(&self, topic: &Topic, headers: &Headers) -> Result<()> {
        match &self.registry {
            Some(r) => r.check_publish(topic, headers.producer(), headers.schema_fqdn()),
            None => Ok(()),
        }
    }

    /// The consume-side schema check of a consumer on this handle (`None` without registry).
    pub(crate) fn schema_gate(&self) -> Option<SchemaGate> {
        self.registry.as_ref().map(|r| {
            SchemaGate::new(
                r.clone(),
                self.obs.enabled.then(|| self.obs.metrics.clone()),
            )
        })
    }

    /// Turns metrics, spans and per-message logs of this handle on (the default) or off. A
    /// handle turned off records nothing and starts no spans (its `/metrics` families stay at
    /// zero); `traceparent` is still written on every publish. Consumers and producers built
    /// on the handle afterwards follow it.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Headers, Topic};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap().with_observability(false);
    /// assert!(!bus.observability());
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// bus.publish(&topic, Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k"), b"x".to_vec())
    ///     .await.unwrap();
    /// assert!(!bus.metrics().encode().contains("producer=\"p@1\""));
    /// # });
    /// ```
    pub fn with_observability(mut self, on: bool) -> Bus {
        self.obs = Arc::new(Obs::new(on));
        self
    }

    /// Whether metrics and spans are recorded on this handle; see
    /// [`Bus::with_observability`] for an example.
    pub fn observability(&self) -> bool {
        self.obs.enabled
    }

    /// The metric families of this handle (shared by its clones and everything built on it);
    /// serve them with [`crate::ops::serve`] or merge them into your own registry with
    /// [`BusMetrics::register`].
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// assert!(bus.metrics().encode().contains("# TYPE bus_produced counter"));
    /// # });
    /// ```
    pub fn metrics(&self) -> &BusMetrics {
        &self.obs.metrics
    }

    pub(crate) fn obs(&self) -> &Arc<Obs> {
        &self.obs
    }

    /// Asks the transport whether it is connected ([`Transport::health`]).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// bus.health().await.unwrap();
    /// # });
    /// ```
    pub async fn health(&self) -> Result<()> {
        self.transport.health().await
    }

    /// Reads the lag of every consumer running on this handle into `bus_consumer_lag`, each
    /// read bounded by `timeout` (consumers also refresh it every second on their own).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// bus.refresh_lag_metrics(std::time::Duration::from_secs(1)).await;
    /// # });
    /// ```
    pub async fn refresh_lag_metrics(&self, timeout: Duration) {
        if !self.obs.enabled || !self.has_consumer_lag() {
            return;
        }
        for c in self.obs.consumers() {
            let Some(name) = c.lag_name().filter(|_| !c.is_stopped()) else {
                continue;
            };
            if let Ok(Ok(Some(l))) = tokio::time::timeout(timeout, self.consumer_lag(name)).await {
                c.set_lag(l.pending);
            }
        }
    }

    /// Publishes a prepared batch and records what the broker confirmed.
    async fn send(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        if self.has_best_effort() {
            return self.send_by_tier(batch).await;
        }
        if !self.obs.enabled {
            return self.transport.publish_batch(batch).await;
        }
        let labels = self.labels(&batch);
        let receipts = match self.transport.publish_batch(batch).await {
            Ok(r) => r,
            Err(e) => {
                self.record_confirmed(&labels, std::iter::repeat(None));
                return Err(e);
            }
        };
        self.record_confirmed(&labels, receipts.iter().map(Some));
        Ok(receipts)
    }

    /// [`Bus::send`] over [`tiers::publish_outcomes`] (some topic is best-effort).
    async fn send_by_tier(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        self.send_outcomes(batch).await.into_result()
    }

    /// [`Bus::send`] with per-message outcomes; only confirmed messages are counted.
    async fn send_outcomes(&self, batch: Vec<Envelope>) -> BatchOutcome {
        if !self.obs.enabled {
            return tiers::publish_outcomes(self, batch).await;
        }
        let labels = self.labels(&batch);
        let out = tiers::publish_outcomes(self, batch).await;
        self.record_confirmed(
            &labels,
            out.outcomes.iter().map(|o| match o {
                PublishOutcome::Confirmed(r) => Some(r),
                _ => None,
            }),
        );
        out
    }

    /// The metric handles of a batch, looked up once per run of messages with the same topic
    /// and producer (a batch is usually one run).
    fn labels(&self, batch: &[Envelope]) -> Labels {
        let mut runs: Vec<(Arc<crate::obs::ProducerTopic>, usize)> = Vec::new();
        let mut sizes = Vec::with_capacity(batch.len());
        let mut prev: Option<(&TopicName, Option<&str>)> = None;
        for (i, e) in batch.iter().enumerate() {
            sizes.push(e.payload.len() as u64);
            let producer = e.headers.producer();
            let same = prev.is_some_and(|(topic, p)| *topic == e.topic && p == producer);
            prev = Some((&e.topic, producer));
            if same {
                continue;
            }
            let h = self
                .obs
                .metrics
                .producer_topic(&e.topic, producer.unwrap_or_default());
            match runs.last_mut() {
                Some((last, _)) if Arc::ptr_eq(last, &h) => {}
                _ => runs.push((h, i)),
            }
        }
        Labels { runs, sizes }
    }

    /// Counts the confirmed messages (`None`: not confirmed) into `bus_produced_total` and
    /// the batch-size histogram (one observation per run of confirmed messages with the same
    /// topic and producer, the bytes of their payloads), the others into
    /// `bus_publish_failed_total`.
    fn record_confirmed<'a>(
        &self,
        labels: &Labels,
        receipts: impl Iterator<Item = Option<&'a PublishReceipt>>,
    ) {
        let mut receipts = receipts;
        let mut open: Option<(&Arc<crate::obs::ProducerTopic>, u64)> = None;
        for (r, (h, start)) in labels.runs.iter().enumerate() {
            let end = labels.runs.get(r + 1).map_or(labels.sizes.len(), |n| n.1);
            let (mut produced, mut confirmed, mut bytes) = (0u64, false, 0u64);
            for size in &labels.sizes[*start..end] {
                let Some(Some(receipt)) = receipts.next() else {
                    h.failed.inc();
                    continue;
                };
                confirmed = true;
                produced += u64::from(!receipt.duplicate);
                bytes += size;
            }
            if produced > 0 {
                h.produced.inc_by(produced);
            }
            if !confirmed {
                continue;
            }
            open = match open {
                Some((prev, b)) if Arc::ptr_eq(prev, h) => Some((prev, b + bytes)),
                Some((prev, b)) => {
                    prev.batch_size.observe(b as f64);
                    Some((h, bytes))
                }
                None => Some((h, bytes)),
            };
        }
        if let Some((prev, b)) = open {
            prev.batch_size.observe(b as f64);
        }
    }

    /// Whether [`Bus::consumer_lag`] can answer on this bus.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// assert!(bus.has_consumer_lag());
    /// # });
    /// ```
    pub fn has_consumer_lag(&self) -> bool {
        self.transport.consumer_lag().is_some()
    }

    /// The lag of the durable consumer `consumer`: `Ok(None)` when it does not exist; a
    /// `Config` error when the transport cannot report lag.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Headers, Topic, TopicPattern, transport::SubscribeSpec};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let pattern = TopicPattern::parse("ampy.dev.news.>").unwrap();
    /// drop(bus.subscribe(SubscribeSpec::durable(pattern, "reader")).await.unwrap());
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// for _ in 0..3 {
    ///     let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
    ///     bus.publish(&topic, h, b"x".to_vec()).await.unwrap();
    /// }
    /// assert_eq!(bus.consumer_lag("reader").await.unwrap().unwrap().pending, 3);
    /// assert!(bus.consumer_lag("nobody").await.unwrap().is_none());
    /// # });
    /// ```
    pub async fn consumer_lag(&self, consumer: &str) -> Result<Option<Lag>> {
        match self.transport.consumer_lag() {
            Some(l) => l.lag(consumer).await,
            None => Err(Error::config(format!(
                "consumer_lag: the {} transport cannot report consumer lag",
                self.transport.name()
            ))),
        }
    }

    /// Sets the blob store used for oversized payloads.
    pub fn with_blob_store(mut self, store: BlobStore) -> Bus {
        self.codec.blobs = Some(store);
        self
    }

    /// Replaces the payload codec (thresholds, limits, blob store).
    pub fn with_codec(mut self, codec: PayloadCodec) -> Bus {
        self.codec = codec;
        self
    }

    /// The payload codec in use.
    pub fn codec(&self) -> &PayloadCodec {
        &self.codec
    }

    /// The transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// The URL with credentials removed.
    pub fn url_redacted(&self) -> String {
        redact(&self.url)
    }

    /// Prepares one message for the wire: fills publish defaults, validates topic and
    /// headers, encodes the payload (gzip, blob pointer), and re-validates.
    ///
    /// With observability on and a recording tracer installed, this starts the message's
    /// publish span (ended here; see [`Bus::publish`]) and writes its context to
    /// `traceparent`.
    pub async fn prepare(
        &self,
        topic: &Topic,
        headers: Headers,
        payload: Bytes,
    ) -> Result<Envelope> {
        let (r, span) = self
            .prepare_traced(topic, TopicName::from(topic), headers, payload)
            .await;
        if let Some(span) = span {
            span.end(r.as_ref().err());
        }
        r
    }

    /// [`Bus::prepare`], handing back the open publish span; `name` is the topic's text (the
    /// caller's envelope string, moved into the prepared envelope).
    async fn prepare_traced(
        &self,
        topic: &Topic,
        name: TopicName,
        mut headers: Headers,
        payload: Bytes,
    ) -> (Result<Envelope>, Option<PublishSpan>) {
        headers.fill_publish_defaults();
        // Without a recording tracer a span would be the parent's context handed back (the
        // OpenTelemetry no-op tracer): nothing to start, nothing to write.
        let span = (self.obs.enabled && self.obs.tracer.is_recording())
            .then(|| self.obs.tracer.start_publish(topic.as_str(), &mut headers));
        (
            self.encode_prepared(topic, name, headers, payload).await,
            span,
        )
    }

    async fn encode_prepared(
        &self,
        topic: &Topic,
        name: TopicName,
        mut headers: Headers,
        payload: Bytes,
    ) -> Result<Envelope> {
        headers.validate_for_publish(topic)?;
        self.check_claims(topic, &headers)?;
        // A payload the codec leaves as it is (the usual case) skips its async call.
        let wire = if self.codec.passes_through(payload.len()) {
            payload
        } else {
            self.codec
                .encode(&mut headers, payload, topic.domain().as_str())
                .await?
        };
        // Validated once above: the codec only adds `content_encoding=gzip` (when absent) and
        // well-formed blob headers with an empty inline payload.
        Ok(Envelope {
            topic: name,
            headers,
            payload: wire,
        })
    }

    /// Publishes one message with a raw payload; durable when this returns. With
    /// observability on, its publish span (kind producer, parent: the current OpenTelemetry
    /// context, else the `traceparent` given) lasts until the broker confirmed, and
    /// `bus_produced_total` counts it then.
    pub async fn publish(
        &self,
        topic: &Topic,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<PublishReceipt> {
        self.publish_one(topic, TopicName::from(topic), headers, payload.into())
            .await
    }

    /// Publishes an envelope whose payload is raw (not yet encoded).
    pub async fn publish_envelope(&self, env: Envelope) -> Result<PublishReceipt> {
        let topic = env.topic()?;
        self.publish_one(&topic, env.topic, env.headers, env.payload)
            .await
    }

    /// One message through prepare, send and its span (`raw` is the topic's text, moved into
    /// the envelope).
    async fn publish_one(
        &self,
        topic: &Topic,
        raw: TopicName,
        headers: Headers,
        payload: Bytes,
    ) -> Result<PublishReceipt> {
        let (env, span) = self.prepare_traced(topic, raw, headers, payload).await;
        let r = match env {
            Ok(env) => self.send(vec![env]).await.and_then(|mut r| {
                r.pop().ok_or_else(|| {
                    Error::new(crate::ErrorKind::Transport, "transport returned no receipt")
                })
            }),
            Err(e) => Err(e),
        };
        if let Some(span) = span {
            span.end(r.as_ref().err());
        }
        r
    }

    /// Publishes many raw-payload envelopes as one batch (one commit on the embedded log).
    /// Every message is validated before any is sent; the first invalid one fails the call
    /// with its index.
    pub async fn publish_batch(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        let mut ready = Vec::with_capacity(batch.len());
        let mut spans = Vec::new();
        let mut last: Option<Topic> = None;
        for (i, env) in batch.into_iter().enumerate() {
            // Batches usually share a topic: parse each distinct run of it once.
            let topic = match last.take() {
                Some(t) if t.as_str() == env.topic => t,
                _ => env
                    .topic()
                    .map_err(|e| Error::new(e.kind(), format!("message {i}: {}", e.message())))?,
            };
            let (prepared, span) = self
                .prepare_traced(&topic, env.topic, env.headers, env.payload)
                .await;
            last = Some(topic);
            spans.extend(span);
            let prepared = match prepared {
                Ok(p) => p,
                Err(e) => {
                    let e = Error::new(e.kind(), format!("message {i}: {}", e.message()));
                    for s in spans {
                        s.end(Some(&e));
                    }
                    return Err(e);
                }
            };
            ready.push(prepared);
        }
        let r = self.send(ready).await;
        for s in spans {
            s.end(r.as_ref().err());
        }
        r
    }

    /// [`Bus::publish_batch`], telling per message what the transport confirmed (see
    /// [`Transport::publish_batch_outcomes`]) instead of all-or-error: a message the broker
    /// confirmed is never hidden behind a later failure. An invalid message fails the batch
    /// before anything is sent (every outcome `Unsent`). Metrics count the confirmed ones.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Envelope, Headers, Topic, transport::PublishOutcome};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let h = || Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
    /// let batch = vec![Envelope::new(&topic, h(), "a"), Envelope::new(&topic, h(), "b")];
    /// let out = bus.publish_batch_outcomes(batch).await;
    /// assert!(out.error.is_none());
    /// assert!(matches!(out.outcomes[1], PublishOutcome::Confirmed(_)));
    /// # });
    /// ```
    pub async fn publish_batch_outcomes(&self, batch: Vec<Envelope>) -> BatchOutcome {
        let n = batch.len();
        let mut ready = Vec::with_capacity(n);
        let mut spans: Vec<PublishSpan> = Vec::new();
        let mut last: Option<Topic> = None;
        for (i, env) in batch.into_iter().enumerate() {
            let topic = match last.take() {
                Some(t) if t.as_str() == env.topic => t,
                _ => match env.topic() {
                    Ok(t) => t,
                    Err(e) => {
                        let e = Error::new(e.kind(), format!("message {i}: {}", e.message()));
                        for s in spans {
                            s.end(Some(&e));
                        }
                        return BatchOutcome::all(n, PublishOutcome::Unsent, e);
                    }
                },
            };
            let (prepared, span) = self
                .prepare_traced(&topic, env.topic, env.headers, env.payload)
                .await;
            last = Some(topic);
            spans.extend(span);
            match prepared {
                Ok(p) => ready.push(p),
                Err(e) => {
                    let e = Error::new(e.kind(), format!("message {i}: {}", e.message()));
                    for s in spans {
                        s.end(Some(&e));
                    }
                    return BatchOutcome::all(n, PublishOutcome::Unsent, e);
                }
            }
        }
        let out = self.send_outcomes(ready).await;
        let failed = out.error.as_ref().map_or_else(
            || Error::new(crate::ErrorKind::Transport, "not confirmed"),
            |e| Error::new(e.kind(), e.message().to_owned()),
        );
        for (s, o) in spans.into_iter().zip(&out.outcomes) {
            s.end(o.receipt().is_none().then_some(&failed));
        }
        out
    }

    /// Publishes envelopes that are already on the wire form (validated as such), e.g. from
    /// `--json-envelope` files or a redrive. A carried payload over the codec's inline limit
    /// goes to the blob store as on any publish ([`PayloadCodec::offload`]: `blob_ref`,
    /// `blob_hash`, `blob_size`; an error when no blob store is configured); payloads within
    /// the limit and pointer envelopes are sent as they are, never re-compressed. A payload
    /// larger than the codec's `max_inflated` (what consumers accept) as carried is refused,
    /// except on a DLQ topic: a dead-lettered copy carries the original bytes as they were.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
    /// use ampybus::transport::{StartAt, SubscribeSpec};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "n-1");
    /// h.fill_publish_defaults();
    /// let big = Envelope::new(&topic, h, vec![7u8; bus.codec().max_inline + 1]);
    /// bus.publish_wire(vec![big]).await.unwrap();
    /// let pattern = TopicPattern::parse("ampy.dev.news.>").unwrap();
    /// let mut sub = bus.subscribe(SubscribeSpec::ephemeral(pattern, StartAt::Earliest)).await.unwrap();
    /// let got = sub.fetch(1, std::time::Duration::from_secs(5)).await.unwrap();
    /// assert!(got[0].envelope.payload.is_empty() && got[0].envelope.headers.blob_ref().is_some());
    /// assert_eq!(bus.decode_payload(&got[0].envelope).await.unwrap().len(), bus.codec().max_inline + 1);
    /// # });
    /// ```
    pub async fn publish_wire(&self, mut batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        self.prepare_wire(&mut batch).await?;
        self.send(batch).await
    }

    /// The checks and blob offload of [`Bus::publish_wire`], for every message of a batch;
    /// the first failure names its index.
    async fn prepare_wire(&self, batch: &mut [Envelope]) -> Result<()> {
        let mut last: Option<Topic> = None;
        for (i, env) in batch.iter_mut().enumerate() {
            let at = |e: Error| Error::new(e.kind(), format!("message {i}: {}", e.message()));
            // The checks of `Envelope::validate_for_publish`, with the topic of a run of
            // messages on one topic parsed once.
            let topic = match last.take() {
                Some(t) if t.as_str() == env.topic => t,
                _ => env.topic().map_err(at)?,
            };
            env.headers.validate_for_publish(&topic).map_err(at)?;
            self.check_claims(&topic, &env.headers).map_err(at)?;
            if !env.payload.is_empty() && env.headers.blob_ref().is_some() {
                return Err(at(Error::envelope(
                    "`blob_ref` is set, so the inline payload must be empty",
                )));
            }
            if env.payload.len() > self.codec.max_inflated && topic.domain() != crate::Domain::Dlq {
                return Err(at(crate::codec::over_limit(
                    "payload as carried",
                    env.payload.len(),
                    self.codec.max_inflated,
                )));
            }
            if env.payload.len() > self.codec.max_inline {
                let wire = std::mem::take(&mut env.payload);
                env.payload = self
                    .codec
                    .offload(&mut env.headers, wire, topic.domain().as_str())
                    .await
                    .map_err(at)?;
            }
            last = Some(topic);
        }
        Ok(())
    }

    /// [`Bus::publish_wire`] with per-message outcomes (see [`Bus::publish_batch_outcomes`]):
    /// an invalid envelope fails the batch before anything is sent.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Envelope, Headers, Topic};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
    /// h.fill_publish_defaults();
    /// let out = bus.publish_wire_outcomes(vec![Envelope::new(&topic, h, "x")]).await;
    /// assert_eq!(out.counts(), (1, 0, 0));
    /// # });
    /// ```
    pub async fn publish_wire_outcomes(&self, mut batch: Vec<Envelope>) -> BatchOutcome {
        if let Err(e) = self.prepare_wire(&mut batch).await {
            return BatchOutcome::all(batch.len(), PublishOutcome::Unsent, e);
        }
        self.send_outcomes(batch).await
    }

    /// Opens a subscription.
    /// With a [registry](Bus::with_registry) and a [service](Bus::with_service), a pattern the
    /// service may not read is refused before anything reaches the transport. The spec's
    /// `tier` is settled here ([`Bus::tier_of_pattern`]: a covering registry entry wins).
    pub async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        if let (Some(r), Some(s)) = (&self.registry, &self.service) {
            r.check_subscribe(s, &spec.pattern)?;
        }
        let mut spec = spec;
        spec.tier = Some(self.tier_of_pattern(&spec.pattern, spec.tier).0);
        self.transport.subscribe(spec).await
    }

    /// Time-window and key reads, when the transport supports them.
    pub fn replay(&self) -> Option<&dyn ReplayByTime> {
        match &self.history {
            Some(h) => Some(h.as_ref()),
            None => self.transport.replay(),
        }
    }

    /// Serves stored windows from `archive` where they are older than what the transport
    /// still holds (the part the transport holds from the transport): [`Bus::replay`] — and
    /// so `sub --since/--until` and replay requests — then reads a window older than the
    /// transport's retention from the archive. What `archive=postgres://…` on the URL does.
    ///
    /// ```no_run
    /// # async fn f() -> ampybus::Result<()> {
    /// let archive = ampybus::archive::ArchiveReader::connect("postgres://postgres@127.0.0.1/ampy").await?;
    /// let bus = ampybus::Bus::connect("./ampybus-data").await?.with_archive(archive);
    /// assert!(bus.replay().is_some());
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "archive")]
    pub fn with_archive(mut self, archive: crate::archive::ArchiveReader) -> Bus {
        self.history = Some(Arc::new(crate::archive::Tiered::new(
            self.transport.clone(),
            archive,
        )));
        self
    }

    /// Decodes a delivered payload: fetches and verifies a blob, inflates gzip.
    pub async fn decode_payload(&self, env: &Envelope) -> Result<Bytes> {
        self.codec.decode(&env.headers, &env.payload).await
    }

    /// Flushes and closes the transport.
    pub async fn close(&self) -> Result<()> {
        self.transport.close().await
    }
}

/// The metric handles of a batch ([`Bus::send`]): each run's handle with the index of its
/// first message, and every message's payload size.
struct Labels {
    runs: Vec<(Arc<crate::obs::ProducerTopic>, usize)>,
    sizes: Vec<u64>,
}
