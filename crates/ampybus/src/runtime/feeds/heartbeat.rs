//! Producer heartbeats: `ampy.metrics.v1.Metric` on `ampy.{env}.ticks.v1.heartbeat.{source}`.

use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::topic::{Env, Topic};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::Duration;

/// `schema_fqdn` of a heartbeat payload.
pub const HEARTBEAT_SCHEMA: &str = "ampy.metrics.v1.Metric";
/// The metric name a heartbeat carries.
pub const HEARTBEAT_NAME: &str = "heartbeat";

/// The heartbeat payload: `ampy.metrics.v1.Metric` written field for field (the core does not
/// depend on `ampybus-proto`; a test decodes it with that crate's type). `name` =
/// `heartbeat`, label `source`, `value` = the number of heartbeats this run (1, 2, …), `at` =
/// when it was sent.
///
/// ```
/// use ampybus::runtime::feeds::HeartbeatMetric;
/// use prost::Message;
/// let m = HeartbeatMetric::new("feed-a", 3, "2026-01-02T03:04:05Z".parse().unwrap());
/// let back = HeartbeatMetric::decode(m.encode_to_vec().as_slice()).unwrap();
/// assert_eq!((back.name.as_str(), back.labels["source"].as_str(), back.value), ("heartbeat", "feed-a", 3.0));
/// ```
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeartbeatMetric {
    /// Always `heartbeat`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// `source` → the source id.
    #[prost(map = "string, string", tag = "2")]
    pub labels: HashMap<String, String>,
    /// The count of heartbeats sent by this source in this run.
    #[prost(double, tag = "3")]
    pub value: f64,
    /// When it was sent.
    #[prost(message, optional, tag = "4")]
    pub at: Option<prost_types::Timestamp>,
}

impl HeartbeatMetric {
    /// The `count`th heartbeat of `source`, sent at `at`.
    pub fn new(source: &str, count: u64, at: DateTime<Utc>) -> HeartbeatMetric {
        HeartbeatMetric {
            name: HEARTBEAT_NAME.to_owned(),
            labels: HashMap::from([("source".to_owned(), source.to_owned())]),
            value: count as f64,
            at: Some(prost_types::Timestamp {
                seconds: at.timestamp(),
                nanos: at.timestamp_subsec_nanos() as i32,
            }),
        }
    }
}

/// `ampy.{env}.ticks.v1.heartbeat.{source}`; a `Topic` error when `source` is not one valid
/// topic token.
///
/// ```
/// use ampybus::{Env, runtime::feeds::heartbeat_topic};
/// assert_eq!(heartbeat_topic(Env::Prod, "feed-a").unwrap().as_str(), "ampy.prod.ticks.v1.heartbeat.feed-a");
/// assert!(heartbeat_topic(Env::Prod, "a.b").is_err());
/// ```
pub fn heartbeat_topic(env: Env, source: &str) -> Result<Topic> {
    if source.is_empty() || source.contains('.') {
        return Err(Error::new(
            ErrorKind::Topic,
            format!("heartbeat source {source:?}: must be one non-empty topic token (no `.`)"),
        ));
    }
    Topic::parse(&format!("ampy.{env}.ticks.v1.heartbeat.{source}"))
}

/// Heartbeats a [`Producer`](crate::runtime::Producer) sends for one source; see
/// [`ProducerBuilder::heartbeat`](crate::runtime::ProducerBuilder::heartbeat).
///
/// ```
/// use ampybus::{Env, runtime::feeds::Heartbeat};
/// let hb = Heartbeat::new(Env::Dev, "md@feed-a", "feed-a", std::time::Duration::from_secs(1)).unwrap();
/// assert_eq!(hb.topic().as_str(), "ampy.dev.ticks.v1.heartbeat.feed-a");
/// let (h, payload) = hb.message(1, chrono::Utc::now());
/// assert_eq!((h.partition_key(), h.source(), h.schema_fqdn()), (Some("feed-a"), Some("feed-a"), Some("ampy.metrics.v1.Metric")));
/// assert!(!payload.is_empty());
/// ```
#[derive(Debug, Clone)]
pub struct Heartbeat {
    topic: Topic,
    producer: String,
    source: String,
    interval: Duration,
}

impl Heartbeat {
    /// Heartbeats of `source`, published as `producer`, every `interval` (the first at once).
    /// Errors: a source that is not one topic token (`Topic`), an empty producer or a zero
    /// interval (`Config`).
    pub fn new(
        env: Env,
        producer: impl Into<String>,
        source: impl Into<String>,
        interval: Duration,
    ) -> Result<Heartbeat> {
        let (producer, source) = (producer.into(), source.into());
        if producer.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "heartbeat producer: must not be empty",
            ));
        }
        if interval.is_zero() {
            return Err(Error::new(
                ErrorKind::Config,
                "heartbeat interval: must be greater than zero",
            ));
        }
        Ok(Heartbeat {
            topic: heartbeat_topic(env, &source)?,
            producer,
            source,
            interval,
        })
    }

    /// The topic heartbeats go to.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Headers and payload of the `count`th heartbeat.
    pub fn message(&self, count: u64, at: DateTime<Utc>) -> (Headers, Vec<u8>) {
        use prost::Message;
        let h = Headers::for_publish(HEARTBEAT_SCHEMA, &self.producer, &self.source, &self.source);
        (
            h,
            HeartbeatMetric::new(&self.source, count, at).encode_to_vec(),
        )
    }
}
