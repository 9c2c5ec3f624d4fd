//! The Kafka binding (cargo feature `kafka`): `kafka://` URLs, on librdkafka (crate `rdkafka`,
//! built from source and linked statically).
//!
//! * **Wire form.** One Kafka topic per `ampy.{env}.{domain}.{version}`
//!   (`{namespace}ampy.{env}.{domain}.{version}`), or per full logical topic for the streams
//!   named in `full_topics`. Record key = the `partition_key` header, so one key stays on one
//!   partition and its order follows from the partition. Record headers = the contract headers
//!   (UTF-8 values) plus `topic`, the full logical topic, so subscribers filter by subtopic. A
//!   contract header named `topic` is refused on publish.
//! * **Topics** are created on first use (publish, or a subscription naming one stream) with
//!   `partitions` partitions, `replication` replicas (default: the broker's) and `retention.ms`
//!   from the retention (7 days; 30 for orders, fills, positions, dlq).
//! * **Publish**: an idempotent producer (`enable.idempotence=true`, `acks=all`), every
//!   delivery report checked, at most [`KafkaOptions::max_in_flight`] records unconfirmed;
//!   receipts in order, `sequence` = [`pack_offset`]`(partition, offset)`.
//! * **Consume**: a consumer group per durable name (`{namespace}{durable}`); a new group
//!   starts at the earliest retained offset (`StartAt::Latest`: the end; `StartAt::Time`:
//!   offsets from timestamps, committed before joining). Offsets are never committed
//!   automatically: the committed offset of a partition is the first one the runtime has not
//!   acknowledged (see [`consume`]). Records whose logical topic does not match the pattern are
//!   skipped (counted as settled) and never handed out.
//! * **Replay**: start offsets from timestamps (`offsets_for_times`), the end bound, the
//!   pattern and the keys enforced on the client ([`crate::transport::ReplayByTime`]).
//! * **Lag**: high watermark − committed offset, summed over the group's partitions.
//! * **Dedupe**: the runtime's store is SQLite on local disk by default
//!   (`dedupe=sqlite:PATH`), or Redis keys shared by every host (`dedupe=redis://…`, feature
//!   `redis`), or off.
//!
//! # URL
//!
//! `kafka://[user:password@]host:port[,host:port…][?option=value&…]`. Options with a dot in
//! their name are librdkafka client settings passed through as they are
//! (`security.protocol`, `sasl.mechanism`, `sasl.username`, `sasl.password`,
//! `ssl.ca.location`, `ssl.certificate.location`, `ssl.key.location`, …); a userinfo sets
//! `sasl.username`/`sasl.password` (and, unless given, `security.protocol=SASL_PLAINTEXT`,
//! `sasl.mechanism=PLAIN`). Settings the binding owns (`bootstrap.servers`, `group.id`,
//! `enable.auto.commit`, `enable.auto.offset.store`, `enable.idempotence`, `acks`) are
//! refused. Own options:
//!
//! | option | meaning |
//! |---|---|
//! | `namespace=P` | prefix of every Kafka topic and group id (default empty) |
//! | `full_topics=S1,S2` | streams (`ampy.{env}.{domain}.{version}`) whose Kafka topic is the full logical topic |
//! | `partitions=N` | partitions of a topic the binding creates (default 6) |
//! | `replication=N` | replicas of a topic the binding creates (default: the broker's default) |
//! | `max_in_flight=N` | unconfirmed records at most (default 10,000) |
//! | `max_age_days=N` | `retention.ms` of created topics (default 7; 30 for orders, fills, positions, dlq) |
//! | `connect_timeout_ms=N` | first metadata answer (default 5,000) |
//! | `request_timeout_ms=N` | one broker request, a delivery report (default 10,000) |
//! | `session_timeout_ms=N` | consumer group session (default 10,000) |
//! | `dedupe=…` | `sqlite:PATH` (default `sqlite:./ampybus-data/kafka-dedupe.sqlite3`), `redis://…` (percent-encoded), `off` |
//!
//! ```
//! use ampybus::transport::kafka::KafkaOptions;
//! let o = KafkaOptions::from_url("kafka://k1:9092,k2:9093?namespace=t1.&partitions=3").unwrap();
//! assert_eq!(o.brokers, vec!["k1:9092".to_owned(), "k2:9093".to_owned()]);
//! assert_eq!(o.kafka_topic("ampy.dev.bars.v1.XNAS.AAPL"), "t1.ampy.dev.bars.v1");
//! assert_eq!(o.partitions, 3);
//! ```

pub mod consume;
mod inspect;
/// The `rdkafka` crate this binding is built on (for [`KafkaOptions::client_config`] and a
/// raw client with the same settings).
pub use rdkafka;
mod publish;
mod replay;

use crate::dedupe::DedupeStore;
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::topic::{Domain, TopicPattern};
use crate::transport::naming::{stream_may_match, stream_of};
use crate::transport::url::{UrlReader, host_port, missing_host, percent_decode, query_pairs};
use crate::transport::{
    ConsumerLag, Inspect, PublishReceipt, ReplayByTime, SubscribeSpec, Subscription, Transport,
};
use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, Producer as _};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The client context of the binding's consumers: librdkafka's log lines and global errors go
/// to `tracing` (target `librdkafka`) as librdkafka ranks them, except three notices that are
/// expected here and go at debug level: a configuration warning about a setting of the URL
/// meant for the other client kind (the URL's settings go to producer and consumers alike),
/// the end of a partition (replay reads to it), and a subscribed pattern no topic matches yet.
#[derive(Clone, Copy, Default)]
pub(crate) struct Quiet;

impl Quiet {
    fn log_line(level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if fac == "CONFWARN" && msg.contains("will be ignored by this") {
            tracing::debug!(target: "librdkafka", "librdkafka: {fac} {msg}");
            return;
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {msg}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {msg}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {msg}"),
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {msg}"),
        }
    }

    fn global_error(error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as C;
        if matches!(
            error.rdkafka_error_code(),
            Some(C::PartitionEOF | C::UnknownTopicOrPartition)
        ) {
            tracing::debug!(target: "librdkafka", "librdkafka: {error}: {reason}");
        } else {
            tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::ClientContext for Quiet {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        Quiet::log_line(level, fac, msg)
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        Quiet::global_error(error, reason)
    }
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

/// Name of the record header holding the full logical topic.
pub const TOPIC_HEADER: &str = "topic";

/// Bits of a packed sequence given to the offset (see [`pack_offset`]).
const OFFSET_BITS: u32 = 40;

/// Packs a partition and an offset into one `u64`: `partition << 40 | offset` (offsets below
/// 2^40, partitions below 2^24). Within one partition packed values order like offsets.
///
/// ```
/// use ampybus::transport::kafka::{pack_offset, unpack_offset};
/// let s = pack_offset(3, 17);
/// assert_eq!(unpack_offset(s), (3, 17));
/// assert!(pack_offset(3, 18) > s);
/// ```
pub fn pack_offset(partition: i32, offset: i64) -> u64 {
    let p = u64::try_from(partition).unwrap_or(0) & ((1 << (64 - OFFSET_BITS)) - 1);
    let o = u64::try_from(offset).unwrap_or(0) & ((1 << OFFSET_BITS) - 1);
    (p << OFFSET_BITS) | o
}

/// The `(partition, offset)` of a packed sequence (see [`pack_offset`]).
///
/// ```
/// assert_eq!(ampybus::transport::kafka::unpack_offset(1 << 40 | 5), (1, 5));
/// ```
pub fn unpack_offset(seq: u64) -> (i32, i64) {
    (
        (seq >> OFFSET_BITS) as i32,
        (seq & ((1 << OFFSET_BITS) - 1)) as i64,
    )
}

/// Where a Kafka consumer's applied-message records live (the `dedupe=` option): a
/// [`crate::dedupe::DedupeSpec`].
///
/// ```
/// use ampybus::transport::kafka::{KafkaDedupe, KafkaOptions};
/// let o = KafkaOptions::from_url("kafka://h:9092?dedupe=off").unwrap();
/// assert_eq!(o.dedupe, KafkaDedupe::Off);
/// ```
pub type KafkaDedupe = crate::dedupe::DedupeSpec;

/// Options of a Kafka connection and of the topics the binding creates.
///
/// ```
/// use ampybus::transport::kafka::KafkaOptions;
/// let o = KafkaOptions::default();
/// assert_eq!(o.brokers, vec!["127.0.0.1:9092".to_owned()]);
/// assert_eq!((o.partitions, o.max_in_flight), (6, 10_000));
/// ```
#[derive(Clone)]
pub struct KafkaOptions {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// librdkafka settings passed through (`security.protocol`, `sasl.*`, `ssl.*`, …).
    pub client: Vec<(String, String)>,
    /// Prefix of every Kafka topic and group id.
    pub namespace: String,
    /// Streams whose Kafka topic is the full logical topic.
    pub full_topics: HashSet<String>,
    /// Partitions of a created topic.
    pub partitions: i32,
    /// Replicas of a created topic; `None`: the broker's default.
    pub replication: Option<i32>,
    /// Unconfirmed records at most.
    pub max_in_flight: usize,
    /// `retention.ms` of created topics; `None`: 7 days, 30 for orders, fills, positions, dlq;
    /// `Some(Duration::ZERO)`: unlimited (`retention.ms=-1`; URL `max_age_days=unlimited`).
    pub max_age: Option<Duration>,
    /// `retention.ms` per env and domain from a topic registry; beats `max_age` for those
    /// topics (set by [`crate::Bus::connect_with_registry`]).
    pub registry_retention: crate::transport::UnitRetention,
    /// Time allowed for the first metadata answer.
    pub connect_timeout: Duration,
    /// Time allowed for one request or delivery report.
    pub request_timeout: Duration,
    /// Consumer group session timeout.
    pub session_timeout: Duration,
    /// The runtime's dedupe store.
    pub dedupe: KafkaDedupe,
}

impl std::fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let client: Vec<(String, String)> = self
            .client
            .iter()
            .map(|(k, v)| {
                let secret = k.contains("password") || k.contains("secret") || k.contains("key");
                (k.clone(), if secret { "***".into() } else { v.clone() })
            })
            .collect();
        f.debug_struct("KafkaOptions")
            .field("brokers", &self.brokers)
            .field("client", &client)
            .field("namespace", &self.namespace)
            .field("partitions", &self.partitions)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            brokers: vec!["127.0.0.1:9092".to_owned()],
            client: Vec::new(),
            namespace: String::new(),
            full_topics: HashSet::new(),
            partitions: 6,
            replication: None,
            max_in_flight: 10_000,
            max_age: None,
            registry_retention: Default::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            session_timeout: Duration::from_secs(10),
            dedupe: KafkaDedupe::Sqlite(PathBuf::from("./ampybus-data/kafka-dedupe.sqlite3")),
        }
    }
}

/// librdkafka settings the binding sets itself.
const OWNED_SETTINGS: [&str; 7] = [
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
];

/// Characters Kafka allows in a topic name.
fn kafka_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 249
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

impl KafkaOptions {
    /// Parses a `kafka://` URL (see the module docs). Errors name the URL (credentials
    /// redacted), the option and the rule.
    ///
    /// ```
    /// use ampybus::transport::kafka::KafkaOptions;
    /// let o = KafkaOptions::from_url("kafka://app:s3cret@h:9092?ssl.ca.location=/ca.pem&security.protocol=SASL_SSL").unwrap();
    /// assert!(o.client.contains(&("sasl.username".into(), "app".into())));
    /// assert!(o.client.contains(&("security.protocol".into(), "SASL_SSL".into())));
    /// let e = KafkaOptions::from_url("kafka://bob:s3cret@h:9092?group.id=x").unwrap_err();
    /// assert!(e.to_string().contains("group.id") && !e.to_string().contains("s3cret"));
    /// ```
    pub fn from_url(url: &str) -> Result<KafkaOptions> {
        let u = UrlReader::new(url);
        let parts = u.split(url, "Kafka", &["kafka"])?;
        if !parts.path.is_empty() {
            return Err(u.bad("a Kafka URL has no path (options go after `?`)"));
        }
        let mut o = KafkaOptions::default();
        if parts.hosts.is_empty() {
            return Err(u.bad(missing_host("kafka", "kafka://127.0.0.1:9092")));
        }
        o.brokers.clear();
        for hp in parts.hosts.split(',') {
            let (host, port) = host_port(hp, 9092).map_err(|p| {
                u.bad(format!(
                    "broker `{hp}`: port `{}` is not a number 1..=65535",
                    p.written
                ))
            })?;
            if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
                return Err(u.bad(format!("broker `{hp}`: host is empty or invalid")));
            }
            o.brokers.push(format!("{host}:{port}"));
        }
        let mut sasl_user = None;
        let mut sasl_password = None;
        if let Some(ui) = parts.userinfo {
            let (user, p) = ui.split_once(':').unwrap_or((ui, ""));
            if user.is_empty() {
                return Err(u.bad("userinfo: empty user name"));
            }
            sasl_user = Some(percent_decode(user));
            sasl_password = Some(percent_decode(p));
        }
        for (k, v) in query_pairs(parts.query) {
            let k = percent_decode(k);
            if k.contains('.') {
                if OWNED_SETTINGS.contains(&k.as_str()) {
                    return Err(u.bad(format!(
                        "option `{k}`: set by the binding itself and cannot be overridden"
                    )));
                }
                let v = u.nonempty(&k, &v)?;
                o.client.retain(|(ck, _)| ck != &k);
                o.client.push((k, v));
                continue;
            }
            match k.as_str() {
                "namespace" => {
                    if !v.is_empty() && !kafka_name_ok(&v) {
                        return Err(u.bad(format!(
                            "option `namespace`: {v:?} may hold only ASCII letters, digits, `.`, `_` and `-`"
                        )));
                    }
                    o.namespace = v;
                }
                "full_topics" => {
                    for s in v.split(',').filter(|s| !s.is_empty()) {
                        if s.split('.').count() != 4 || !s.starts_with("ampy.") {
                            return Err(u.bad(format!(
                                "option `full_topics`: `{s}` is not a stream name `ampy.{{env}}.{{domain}}.{{version}}`"
                            )));
                        }
                        o.full_topics.insert(s.to_owned());
                    }
                }
                "partitions" => o.partitions = u.num_in(&k, &v, 1..=10_000)? as i32,
                "replication" => o.replication = Some(u.num_in(&k, &v, 1..=100)? as i32),
                "max_in_flight" => o.max_in_flight = u.num_in(&k, &v, 1..=1_000_000)? as usize,
                "max_age_days" => o.max_age = Some(u.max_age_days(&k, &v)?),
                "connect_timeout_ms" => o.connect_timeout = u.millis(&k, &v)?,
                "request_timeout_ms" => o.request_timeout = u.millis(&k, &v)?,
                "session_timeout_ms" => {
                    let n = u.num_in(&k, &v, 1_000..=3_600_000)?;
                    o.session_timeout = Duration::from_millis(n);
                }
                "dedupe" => {
                    o.dedupe = KafkaDedupe::parse(&v)
                        .map_err(|rule| u.bad(format!("option `dedupe`: {rule}")))?;
                }
                other => {
                    return Err(u.bad(format!(
                        "unknown option `{other}` (known: namespace, full_topics, partitions, replication, max_in_flight, max_age_days, connect_timeout_ms, request_timeout_ms, session_timeout_ms, dedupe, and librdkafka settings with a dot such as security.protocol)"
                    )));
                }
            }
        }
        if let Some(user) = sasl_user {
            let has = |c: &[(String, String)], k: &str| c.iter().any(|(ck, _)| ck == k);
            if !has(&o.client, "security.protocol") {
                o.client
                    .push(("security.protocol".into(), "SASL_PLAINTEXT".into()));
            }
            if !has(&o.client, "sasl.mechanism") && !has(&o.client, "sasl.mechanisms") {
                o.client.push(("sasl.mechanism".into(), "PLAIN".into()));
            }
            o.client
                .retain(|(k, _)| k != "sasl.username" && k != "sasl.password");
            o.client.push(("sasl.username".into(), user));
            o.client
                .push(("sasl.password".into(), sasl_password.unwrap_or_default()));
        }
        Ok(o)
    }

    /// The Kafka topic a logical topic is stored in.
    ///
    /// ```
    /// use ampybus::transport::kafka::KafkaOptions;
    /// let o = KafkaOptions::from_url("kafka://h:9092?full_topics=ampy.prod.ticks.v1").unwrap();
    /// assert_eq!(o.kafka_topic("ampy.prod.ticks.v1.trade.AAPL"), "ampy.prod.ticks.v1.trade.AAPL");
    /// assert_eq!(o.kafka_topic("ampy.prod.bars.v1.XNAS.AAPL"), "ampy.prod.bars.v1");
    /// ```
    pub fn kafka_topic(&self, topic: &str) -> String {
        let stream = stream_of(topic);
        if self.full_topics.contains(stream) {
            format!("{}{topic}", self.namespace)
        } else {
            format!("{}{stream}", self.namespace)
        }
    }

    /// The consumer group id of a durable consumer name.
    ///
    /// ```
    /// let o = ampybus::transport::kafka::KafkaOptions::from_url("kafka://h:1?namespace=t.").unwrap();
    /// assert_eq!(o.group_id("oms"), "t.oms");
    /// ```
    pub fn group_id(&self, durable: &str) -> String {
        format!("{}{durable}", self.namespace)
    }

    /// Retention of a domain's topics.
    ///
    /// ```
    /// use ampybus::{Domain, transport::kafka::KafkaOptions};
    /// assert_eq!(KafkaOptions::default().max_age_for(Domain::Fills).as_secs(), 30 * 86_400);
    /// ```
    pub fn max_age_for(&self, domain: Domain) -> Duration {
        crate::transport::retention_for(self.max_age, domain)
    }

    /// Retention of the topics of env + domain: the registry's for that unit, else
    /// [`KafkaOptions::max_age_for`].
    ///
    /// ```
    /// use ampybus::{Domain, Env, transport::kafka::KafkaOptions};
    /// let mut o = KafkaOptions::default();
    /// o.registry_retention.insert((Env::Prod, Domain::Fills), std::time::Duration::from_secs(86_400));
    /// assert_eq!(o.max_age_at(Env::Prod, Domain::Fills).as_secs(), 86_400);
    /// assert_eq!(o.max_age_at(Env::Dev, Domain::Fills).as_secs(), 30 * 86_400);
    /// ```
    pub fn max_age_at(&self, env: crate::topic::Env, domain: Domain) -> Duration {
        crate::transport::retention_at(&self.registry_retention, self.max_age, env, domain)
    }

    /// The brokers as shown in logs and errors (never credentials).
    ///
    /// ```
    /// let o = ampybus::transport::kafka::KafkaOptions::from_url("kafka://u:p@a:1,b:2").unwrap();
    /// assert_eq!(o.server_shown(), "a:1,b:2");
    /// ```
    pub fn server_shown(&self) -> String {
        self.brokers.join(",")
    }

    /// Whether the Kafka topic `name` may hold logical topics matching `pattern`.
    pub(crate) fn topic_may_match(&self, name: &str, pattern: &TopicPattern) -> bool {
        let Some(rest) = name.strip_prefix(&self.namespace) else {
            return false;
        };
        let stream = stream_of(rest);
        if rest.len() > stream.len() {
            // A full-topic Kafka topic: its name is the logical topic.
            self.full_topics.contains(stream) && pattern.matches(rest)
        } else {
            stream_may_match(rest, pattern)
        }
    }

    /// The settings of the transport's producer: [`KafkaOptions::client_config`] plus
    /// `enable.idempotence=true`, `acks=all`, `linger.ms=1`, a delivery timeout of three
    /// request timeouts and a local queue of at least `max_in_flight` records; librdkafka
    /// settings of the URL other than those the binding owns win over these defaults.
    /// Public so that a benchmark's raw producer can use exactly the same settings.
    ///
    /// ```
    /// use ampybus::transport::kafka::KafkaOptions;
    /// let o = KafkaOptions::from_url("kafka://127.0.0.1:9092?linger.ms=5").unwrap();
    /// let c = o.producer_config();
    /// assert_eq!(c.get("enable.idempotence"), Some("true"));
    /// assert_eq!(c.get("linger.ms"), Some("5"));
    /// ```
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set(
                "message.timeout.ms",
                (self.request_timeout.as_millis().max(1000) * 3).to_string(),
            )
            .set(
                "queue.buffering.max.messages",
                self.max_in_flight.max(100_000).to_string(),
            );
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }

    /// The settings every client of the transport starts from: `bootstrap.servers`, socket
    /// timeouts from `request_timeout`/`connect_timeout`, warnings-and-up logging, then the
    /// librdkafka settings of the URL.
    ///
    /// ```
    /// use ampybus::transport::kafka::KafkaOptions;
    /// let o = KafkaOptions::from_url("kafka://k1:9092,k2:9092?security.protocol=SSL").unwrap();
    /// let c = o.client_config();
    /// assert_eq!(c.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
    /// assert_eq!(c.get("security.protocol"), Some("SSL"));
    /// ```
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers.join(","));
        c.set(
            "socket.timeout.ms",
            self.request_timeout.as_millis().max(10).to_string(),
        );
        c.set(
            "socket.connection.setup.timeout.ms",
            self.connect_timeout.as_millis().max(1000).to_string(),
        );
        c.set("log_level", "4");
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }
}

/// State shared by the publish, consume, replay and inspect halves.
pub(crate) struct Shared {
    pub(crate) opts: KafkaOptions,
    pub(crate) producer: FutureProducer,
    pub(crate) admin: AdminClient<DefaultClientContext>,
    /// Kafka topics known to exist (created or seen).
    known: Mutex<HashSet<String>>,
    /// Live subscriptions (for close and for local in-flight counts).
    pub(crate) subs: Mutex<Vec<std::sync::Weak<consume::SubShared>>>,
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    pub(crate) fn where_(&self) -> String {
        format!("kafka {}", self.opts.server_shown())
    }

    /// A consumer without a group position (a fresh group id, nothing committed, the end of
    /// a partition reported): what replay and the start-offset lookups read with.
    pub(crate) fn reader(&self) -> Result<rdkafka::consumer::BaseConsumer<Quiet>> {
        let mut cfg = self.opts.client_config();
        cfg.set(
            "group.id",
            format!(
                "{}ampy-replay-{}",
                self.opts.namespace,
                uuid::Uuid::new_v4().simple()
            ),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true");
        cfg.create_with_context(Quiet)
            .map_err(|e| kafka_error(&self.where_(), "invalid consumer settings", e))
    }

    /// Creates the Kafka topics not known to exist yet (an existing one is fine).
    pub(crate) async fn ensure_topics(&self, topics: &[String]) -> Result<()> {
        let missing: Vec<String> = {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let mut m: Vec<String> = topics
                .iter()
                .filter(|t| !known.contains(*t))
                .cloned()
                .collect();
            m.sort();
            m.dedup();
            m
        };
        if missing.is_empty() {
            return Ok(());
        }
        for t in &missing {
            if !kafka_name_ok(t) {
                return Err(Error::topic(format!(
                    "kafka topic `{t}`: may hold only ASCII letters, digits, `.`, `_` and `-`, at most 249 characters"
                )));
            }
        }
        let retention: Vec<String> = missing
            .iter()
            .map(|t| {
                let rest = t.strip_prefix(&self.opts.namespace).unwrap_or(t);
                let domain = rest
                    .split('.')
                    .nth(2)
                    .and_then(|d| d.parse::<Domain>().ok())
                    .unwrap_or(Domain::News);
                let age = match rest.split('.').nth(1).and_then(|e| e.parse().ok()) {
                    Some(env) => self.opts.max_age_at(env, domain),
                    None => self.opts.max_age_for(domain),
                };
                match age.as_millis() {
                    0 => "-1".to_owned(), // unlimited
                    ms => ms.to_string(),
                }
            })
            .collect();
        let replicas = self.opts.replication.unwrap_or(-1);
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .zip(&retention)
            .map(|(t, r)| {
                NewTopic::new(t, self.opts.partitions, TopicReplication::Fixed(replicas))
                    .set("retention.ms", r)
            })
            .collect();
        let opts = AdminOptions::new()
            .operation_timeout(Some(self.opts.request_timeout))
            .request_timeout(Some(self.opts.request_timeout));
        let results = self
            .admin
            .create_topics(new.iter(), &opts)
            .await
            .map_err(|e| kafka_error(&self.where_(), "create topics", e))?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for r in results {
            match r {
                Ok(t) => {
                    known.insert(t);
                }
                Err((t, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                    known.insert(t);
                }
                Err((t, code)) => {
                    let kind = if matches!(
                        code,
                        rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed
                            | rdkafka::types::RDKafkaErrorCode::ClusterAuthorizationFailed
                    ) {
                        ErrorKind::Config
                    } else {
                        ErrorKind::Transport
                    };
                    return Err(Error::new(
                        kind,
                        format!("{}: cannot create topic `{t}`: {code}", self.where_()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every Kafka topic of the namespace that may hold topics matching `pattern`, sorted.
    pub(crate) async fn topics_for(&self, pattern: &TopicPattern) -> Result<Vec<(String, usize)>> {
        let md = self.metadata(None).await?;
        let mut out: Vec<(String, usize)> = md
            .into_iter()
            .filter(|(t, _)| self.opts.topic_may_match(t, pattern))
            .collect();
        out.sort();
        Ok(out)
    }

    /// `(topic, partition count)` of every topic (or of one).
    pub(crate) async fn metadata(&self, topic: Option<&str>) -> Result<Vec<(String, usize)>> {
        let client = self.producer.clone();
        let topic = topic.map(str::to_owned);
        let timeout = self.opts.request_timeout;
        let where_ = self.where_();
        tokio::task::spawn_blocking(move || {
            let md = client
                .client()
                .fetch_metadata(topic.as_deref(), timeout)
                .map_err(|e| kafka_error(&where_, "metadata", e))?;
            Ok(md
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| (t.name().to_owned(), t.partitions().len()))
                .collect())
        })
        .await
        .map_err(|e| Error::transport("kafka: metadata task failed", e))?
    }
}

/// Maps a librdkafka error to one of ours, naming where and what.
pub(crate) fn kafka_error(where_: &str, what: &str, e: rdkafka::error::KafkaError) -> Error {
    use rdkafka::types::RDKafkaErrorCode as C;
    let code = e.rdkafka_error_code();
    let kind = match code {
        Some(
            C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::IllegalSASLState
            | C::UnsupportedSASLMechanism,
        ) => ErrorKind::Config,
        Some(C::OperationTimedOut | C::RequestTimedOut | C::MessageTimedOut) => ErrorKind::Timeout,
        _ => ErrorKind::Transport,
    };
    let hint = match code {
        Some(C::BrokerTransportFailure | C::AllBrokersDown | C::Resolve) => {
            " (is a Kafka broker listening there?)"
        }
        Some(C::SaslAuthenticationFailed | C::Authentication) => {
            " (check the SASL user, password and mechanism)"
        }
        Some(C::TopicAuthorizationFailed) => " (the user may not use this topic)",
        _ => "",
    };
    Error::with_source(kind, format!("{where_}: {what}: {e}{hint}"), e)
}

/// A Kafka connection: producer, admin client, consumers per subscription.
pub struct KafkaTransport {
    shared: Arc<Shared>,
    dedupe: Option<Arc<dyn DedupeStore>>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("opts", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

impl KafkaTransport {
    /// Connects with a `kafka://` URL (see the module docs).
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// let t = ampybus::transport::kafka::KafkaTransport::connect_url("kafka://127.0.0.1:9092").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_url(url: &str) -> Result<KafkaTransport> {
        Self::connect(KafkaOptions::from_url(url)?).await
    }

    /// Connects with options: creates the producer and the admin client and waits for the
    /// first metadata answer (an unreachable broker or refused credentials fail here, within
    /// `connect_timeout`), then opens the dedupe store.
    pub async fn connect(opts: KafkaOptions) -> Result<KafkaTransport> {
        let where_ = format!("kafka {}", opts.server_shown());
        let producer: FutureProducer = opts
            .producer_config()
            .create()
            .map_err(|e| kafka_error(&where_, "invalid producer settings", e))?;
        let admin: AdminClient<DefaultClientContext> = opts
            .client_config()
            .create()
            .map_err(|e| kafka_error(&where_, "invalid admin settings", e))?;
        // The first metadata answer proves the brokers answer and accept the credentials.
        let probe = producer.clone();
        let timeout = opts.connect_timeout;
        let w = where_.clone();
        tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| {
                    let mut err = kafka_error(&w, "no metadata", e);
                    if err.kind() == ErrorKind::Transport || err.kind() == ErrorKind::Timeout {
                        err = Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "{w}: no broker answered within {timeout:?} (is a Kafka broker listening there? are security.protocol and the credentials right?): {}",
                                err.message()
                            ),
                        );
                    }
                    err
                })
        })
        .await
        .map_err(|e| Error::transport("kafka: connect task failed", e))??;
        let dedupe = crate::dedupe::open(&opts.dedupe, &where_).await?;
        let permits = Arc::new(tokio::sync::Semaphore::new(opts.max_in_flight));
        Ok(KafkaTransport {
            shared: Arc::new(Shared {
                opts,
                producer,
                admin,
                known: Mutex::new(HashSet::new()),
                subs: Mutex::new(Vec::new()),
                permits,
            }),
            dedupe,
        })
    }

    /// The options in use.
    pub fn options(&self) -> &KafkaOptions {
        &self.shared.opts
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn publish_batch(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        publish::publish_outcomes(&self.shared, batch, false)
            .await
            .into_result()
    }

    /// Per-record delivery reports: see [`Transport::publish_batch_outcomes`].
    async fn publish_batch_outcomes(&self, batch: Vec<Envelope>) -> crate::transport::BatchOutcome {
        publish::publish_outcomes(&self.shared, batch, true).await
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        consume::subscribe(&self.shared, spec).await
    }

    fn replay(&self) -> Option<&dyn ReplayByTime> {
        Some(self)
    }

    fn dedupe_store(&self) -> Option<Arc<dyn DedupeStore>> {
        self.dedupe.clone()
    }

    fn consumer_lag(&self) -> Option<&dyn ConsumerLag> {
        Some(self)
    }

    fn inspect(&self) -> Option<&dyn Inspect> {
        Some(self)
    }

    async fn health(&self) -> Result<()> {
        let client = self.shared.producer.clone();
        let where_ = self.shared.where_();
        tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|_| ())
                .map_err(|e| kafka_error(&where_, "health", e))
        })
        .await
        .map_err(|e| Error::transport("kafka: health task failed", e))?
    }

    async fn close(&self) -> Result<()> {
        consume::close_all(&self.shared);
        let producer = self.shared.producer.clone();
        let timeout = self.shared.opts.request_timeout;
        let where_ = self.shared.where_();
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer as _;
            producer
                .flush(timeout)
                .map_err(|e| kafka_error(&where_, "flush", e))
        })
        .await
        .map_err(|e| Error::transport("kafka: close task failed", e))?
    }
}
