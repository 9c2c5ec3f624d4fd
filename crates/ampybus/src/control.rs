//! Control messages: `ampy.control.v1.ReplayRequest` and its status reports.
//!
//! ampy-proto has no control messages, so these are ours. Their schema is
//! [`CONTROL_PROTO`] (`crates/ampybus/proto/ampy/control/v1/control.proto`); the types here are
//! written to match it field for field (`ampybus-proto` compiles the file and checks that).
//!
//! The protocol:
//!
//! 1. An operator (CLI `ampybus replay`, or [`crate::runtime::control::request_replay`])
//!    publishes a [`ReplayRequest`] on `ampy.{env}.control.v1.replay_requests`
//!    ([`replay_requests_topic`]), partition key = `request_id`.
//! 2. Every [`crate::Consumer`] listens there (unless turned off) through a durable consumer of
//!    its own named `{name}-replay-control`, so one instance of a consumer group serves each
//!    request once. A request for another consumer name is ignored.
//! 3. The consumer checks the request ([`ReplayRequest::validate`], and that the pattern lies
//!    within its own), reports [`ReplayState::Accepted`] or [`ReplayState::Rejected`] on
//!    `ampy.{env}.control.v1.replay_status` ([`replay_status_topic`]), replays `[start, end)`
//!    through its own handler with its dedupe store, reports [`ReplayState::Progress`] after each
//!    page, then [`ReplayState::Completed`] with counts and the first/last `message_id` (or
//!    [`ReplayState::Failed`]).

use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::topic::{Domain, Env, Topic, TopicPattern};
use chrono::{DateTime, Utc};

/// `schema_fqdn` of [`ReplayRequest`].
pub const REPLAY_REQUEST_SCHEMA: &str = "ampy.control.v1.ReplayRequest";
/// `schema_fqdn` of [`ReplayStatus`].
pub const REPLAY_STATUS_SCHEMA: &str = "ampy.control.v1.ReplayStatus";
/// Subtopic of replay requests.
pub const REPLAY_REQUESTS: &str = "replay_requests";
/// Subtopic of replay status reports.
pub const REPLAY_STATUS: &str = "replay_status";
/// Most partition keys one request may name.
pub const MAX_REPLAY_KEYS: usize = 10_000;
/// The `.proto` source of the control messages.
pub const CONTROL_PROTO: &str = include_str!("../proto/ampy/control/v1/control.proto");

/// `ampy.{env}.control.v1.replay_requests`.
///
/// ```
/// use ampybus::{Env, control::replay_requests_topic};
/// assert_eq!(replay_requests_topic(Env::Dev).as_str(), "ampy.dev.control.v1.replay_requests");
/// ```
pub fn replay_requests_topic(env: Env) -> Topic {
    Topic::new(env, Domain::Control, 1, REPLAY_REQUESTS).expect("valid control topic")
}

/// `ampy.{env}.control.v1.replay_status`.
///
/// ```
/// use ampybus::{Env, control::replay_status_topic};
/// assert_eq!(replay_status_topic(Env::Prod).as_str(), "ampy.prod.control.v1.replay_status");
/// ```
pub fn replay_status_topic(env: Env) -> Topic {
    Topic::new(env, Domain::Control, 1, REPLAY_STATUS).expect("valid control topic")
}

/// Asks the running consumer `consumer` to replay `[start, end)` of `pattern` through its own
/// handler (see the module docs).
///
/// ```
/// use ampybus::control::ReplayRequest;
/// use prost::Message;
/// let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().to_utc();
/// let req = ReplayRequest::new("oms", "ampy.dev.orders.>", t0, t0 + chrono::Duration::hours(1));
/// let back = ReplayRequest::decode(&req.encode_to_vec()[..]).unwrap();
/// assert_eq!(back, req);
/// assert_eq!(back.validate().unwrap().start, t0);
/// ```
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReplayRequest {
    /// Unique id of the request; every status report carries it.
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// Durable consumer name that must serve the request.
    #[prost(string, tag = "2")]
    pub consumer: String,
    /// Topic pattern to replay; must lie within the consumer's own pattern.
    #[prost(string, tag = "3")]
    pub pattern: String,
    /// Window start, inclusive (store time, UTC).
    #[prost(message, optional, tag = "4")]
    pub start: Option<prost_types::Timestamp>,
    /// Window end, exclusive.
    #[prost(message, optional, tag = "5")]
    pub end: Option<prost_types::Timestamp>,
    /// Only these partition keys when not empty.
    #[prost(string, repeated, tag = "6")]
    pub keys: Vec<String>,
    /// Who asked, for the audit trail.
    #[prost(string, tag = "7")]
    pub requested_by: String,
    /// Why, for the audit trail.
    #[prost(string, tag = "8")]
    pub reason: String,
}

/// A [`ReplayRequest`] that passed [`ReplayRequest::validate`].
///
/// ```
/// use ampybus::control::ReplayRequest;
/// let t0 = chrono::Utc::now();
/// let v = ReplayRequest::new("c", "ampy.dev.bars.>", t0, t0 + chrono::Duration::seconds(1))
///     .validate()
///     .unwrap();
/// assert_eq!(v.pattern.as_str(), "ampy.dev.bars.>");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ValidReplay {
    /// The pattern.
    pub pattern: TopicPattern,
    /// Start, inclusive.
    pub start: DateTime<Utc>,
    /// End, exclusive.
    pub end: DateTime<Utc>,
    /// Partition keys (empty: all).
    pub keys: Vec<String>,
}

fn to_ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn from_ts(field: &str, ts: Option<&prost_types::Timestamp>) -> Result<DateTime<Utc>> {
    let ts = ts.ok_or_else(|| Error::payload(format!("replay request: `{field}` is missing")))?;
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Error::payload(format!(
            "replay request: `{field}`.nanos {} must be in 0..1e9",
            ts.nanos
        )));
    }
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32).ok_or_else(|| {
        Error::payload(format!(
            "replay request: `{field}` ({} s) is out of range",
            ts.seconds
        ))
    })
}

impl ReplayRequest {
    /// A request with a new UUIDv7 `request_id`.
    pub fn new(
        consumer: &str,
        pattern: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> ReplayRequest {
        ReplayRequest {
            request_id: crate::ids::new_message_id(),
            consumer: consumer.to_owned(),
            pattern: pattern.to_owned(),
            start: Some(to_ts(start)),
            end: Some(to_ts(end)),
            keys: Vec::new(),
            requested_by: String::new(),
            reason: String::new(),
        }
    }

    /// Checks every field; the error names the field and the rule.
    ///
    /// ```
    /// use ampybus::control::ReplayRequest;
    /// let t0 = chrono::Utc::now();
    /// let mut r = ReplayRequest::new("c", "ampy.dev.bars.>", t0, t0);
    /// assert!(r.validate().unwrap_err().to_string().contains("`end` must be after `start`"));
    /// r.end = None;
    /// assert!(r.validate().unwrap_err().to_string().contains("`end` is missing"));
    /// ```
    pub fn validate(&self) -> Result<ValidReplay> {
        let bad = |m: String| Error::payload(format!("replay request: {m}"));
        if self.request_id.trim().is_empty() {
            return Err(bad("`request_id` must not be empty".into()));
        }
        if self.consumer.trim().is_empty()
            || self
                .consumer
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad(format!(
                "`consumer` {:?} must be a non-empty name without whitespace",
                self.consumer
            )));
        }
        let pattern = TopicPattern::parse(&self.pattern)
            .map_err(|e| bad(format!("`pattern`: {}", e.message())))?;
        let start = from_ts("start", self.start.as_ref())?;
        let end = from_ts("end", self.end.as_ref())?;
        if end <= start {
            return Err(bad(format!(
                "`end` must be after `start` (start {}, end {})",
                crate::ids::format_time(start),
                crate::ids::format_time(end)
            )));
        }
        if self.keys.len() > MAX_REPLAY_KEYS {
            return Err(bad(format!(
                "`keys` names {} keys; at most {MAX_REPLAY_KEYS}",
                self.keys.len()
            )));
        }
        if let Some(k) = self
            .keys
            .iter()
            .find(|k| k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(bad(format!(
                "`keys` entry {k:?} must be non-empty, without whitespace"
            )));
        }
        Ok(ValidReplay {
            pattern,
            start,
            end,
            keys: self.keys.clone(),
        })
    }

    /// Headers for publishing this request (partition key = `request_id`).
    pub fn headers(&self, producer: &str) -> Headers {
        Headers::for_publish(REPLAY_REQUEST_SCHEMA, producer, "ampybus", &self.request_id)
    }
}

/// State of a replay, as reported by the serving consumer.
///
/// ```
/// use ampybus::control::ReplayState;
/// assert!(ReplayState::Completed.is_final());
/// assert!(!ReplayState::Progress.is_final());
/// assert_eq!(ReplayState::Rejected.as_str(), "rejected");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ReplayState {
    /// Not set.
    Unspecified = 0,
    /// Taken; reading starts.
    Accepted = 1,
    /// Counts so far.
    Progress = 2,
    /// Done.
    Completed = 3,
    /// Started but could not finish.
    Failed = 4,
    /// Invalid or not servable by this consumer.
    Rejected = 5,
}

impl ReplayState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayState::Unspecified => "unspecified",
            ReplayState::Accepted => "accepted",
            ReplayState::Progress => "progress",
            ReplayState::Completed => "completed",
            ReplayState::Failed => "failed",
            ReplayState::Rejected => "rejected",
        }
    }

    /// Completed, failed or rejected: no more reports follow.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ReplayState::Completed | ReplayState::Failed | ReplayState::Rejected
        )
    }
}

/// A status report of a replay, published on `ampy.{env}.control.v1.replay_status`.
///
/// ```
/// use ampybus::control::{ReplayState, ReplayStatus};
/// let s = ReplayStatus::new("r1", "oms", ReplayState::Completed);
/// assert_eq!(s.state(), ReplayState::Completed);
/// let json = s.to_json();
/// assert_eq!(json["state"], "completed");
/// assert_eq!(json["request_id"], "r1");
/// ```
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReplayStatus {
    /// The request this reports on.
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// The consumer serving it.
    #[prost(string, tag = "2")]
    pub consumer: String,
    /// The state.
    #[prost(enumeration = "ReplayState", tag = "3")]
    pub state: i32,
    /// Stored messages read in the window so far.
    #[prost(uint64, tag = "4")]
    pub read: u64,
    /// Handled with `Ok` (newly applied).
    #[prost(uint64, tag = "5")]
    pub applied: u64,
    /// Skipped: already applied by this consumer.
    #[prost(uint64, tag = "6")]
    pub skipped_duplicates: u64,
    /// Could not be prepared, or the handler did not return `Ok`.
    #[prost(uint64, tag = "7")]
    pub failed: u64,
    /// `message_id` of the first message read.
    #[prost(string, tag = "8")]
    pub first_message_id: String,
    /// `message_id` of the last message read.
    #[prost(string, tag = "9")]
    pub last_message_id: String,
    /// Why it failed or was rejected.
    #[prost(string, tag = "10")]
    pub error: String,
    /// When the report was made.
    #[prost(message, optional, tag = "11")]
    pub reported_at: Option<prost_types::Timestamp>,
}

impl ReplayStatus {
    /// A report with zero counts, stamped now.
    pub fn new(request_id: &str, consumer: &str, state: ReplayState) -> ReplayStatus {
        ReplayStatus {
            request_id: request_id.to_owned(),
            consumer: consumer.to_owned(),
            state: state as i32,
            reported_at: Some(to_ts(Utc::now())),
            ..Default::default()
        }
    }

    /// Headers for publishing this report (partition key = `request_id`).
    pub fn headers(&self, producer: &str) -> Headers {
        Headers::for_publish(REPLAY_STATUS_SCHEMA, producer, "ampybus", &self.request_id)
    }

    /// The report as JSON (the form `ampybus replay --json` prints).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "request_id": self.request_id,
            "consumer": self.consumer,
            "state": self.state().as_str(),
            "read": self.read,
            "applied": self.applied,
            "skipped_duplicates": self.skipped_duplicates,
            "failed": self.failed,
            "first_message_id": self.first_message_id,
            "last_message_id": self.last_message_id,
            "error": self.error,
            "reported_at": self
                .reported_at
                .as_ref()
                .and_then(|t| from_ts("reported_at", Some(t)).ok())
                .map(crate::ids::format_time),
        })
    }
}

/// Decodes a control payload of the given `schema_fqdn` into JSON (for `sub --decode`).
///
/// ```
/// use ampybus::control::{ReplayState, ReplayStatus, REPLAY_STATUS_SCHEMA, decode_to_json};
/// use prost::Message;
/// let s = ReplayStatus::new("r1", "oms", ReplayState::Accepted);
/// let j = decode_to_json(REPLAY_STATUS_SCHEMA, &s.encode_to_vec()).unwrap().unwrap();
/// assert_eq!(j["state"], "accepted");
/// assert!(decode_to_json("ampy.bars.v1.Bar", b"").unwrap().is_none());
/// ```
pub fn decode_to_json(schema_fqdn: &str, payload: &[u8]) -> Result<Option<serde_json::Value>> {
    use prost::Message;
    let err = |e: prost::DecodeError| {
        Error::with_source(
            ErrorKind::Payload,
            format!("payload does not decode as {schema_fqdn}"),
            e,
        )
    };
    match schema_fqdn {
        REPLAY_REQUEST_SCHEMA => {
            let r = ReplayRequest::decode(payload).map_err(err)?;
            let t = |ts: &Option<prost_types::Timestamp>| {
                from_ts("t", ts.as_ref()).ok().map(crate::ids::format_time)
            };
            Ok(Some(serde_json::json!({
                "request_id": r.request_id,
                "consumer": r.consumer,
                "pattern": r.pattern,
                "start": t(&r.start),
                "end": t(&r.end),
                "keys": r.keys,
                "requested_by": r.requested_by,
                "reason": r.reason,
            })))
        }
        REPLAY_STATUS_SCHEMA => Ok(Some(ReplayStatus::decode(payload).map_err(err)?.to_json())),
        _ => Ok(None),
    }
}
