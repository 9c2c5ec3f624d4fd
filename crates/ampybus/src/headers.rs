//! Envelope headers: the wire names, typed accessors, builders and the validation rules of the
//! contract (strict on publish, liberal but safe on consume).

use crate::error::{Error, Result, show};
use crate::ids::{self, TraceContext};
use crate::partition;
use crate::topic::{Domain, Topic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Wire names of every header the contract defines.
pub mod names {
    /// UUIDv7 (publish) / any UUID (consume).
    pub const MESSAGE_ID: &str = "message_id";
    /// Fully-qualified payload type, e.g. `ampy.bars.v1.BarBatch`.
    pub const SCHEMA_FQDN: &str = "schema_fqdn";
    /// Semver of the payload schema.
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// `application/x-protobuf` or `application/json`.
    pub const CONTENT_TYPE: &str = "content_type";
    /// Absent or `gzip`.
    pub const CONTENT_ENCODING: &str = "content_encoding";
    /// RFC3339 UTC creation time.
    pub const PRODUCED_AT: &str = "produced_at";
    /// Logical service instance.
    pub const PRODUCER: &str = "producer";
    /// Upstream system.
    pub const SOURCE: &str = "source";
    /// Pipeline run id.
    pub const RUN_ID: &str = "run_id";
    /// W3C traceparent.
    pub const TRACEPARENT: &str = "traceparent";
    /// Older trace id header (32 hex).
    pub const TRACE_ID: &str = "trace_id";
    /// Older span id header (16 hex).
    pub const SPAN_ID: &str = "span_id";
    /// Ordering/sharding key.
    pub const PARTITION_KEY: &str = "partition_key";
    /// Domain idempotency key.
    pub const DEDUPE_KEY: &str = "dedupe_key";
    /// Deliveries/republishes so far.
    pub const RETRY_COUNT: &str = "retry_count";
    /// `code: detail` on dead-lettered messages.
    pub const DLQ_REASON: &str = "dlq_reason";
    /// Hash of the payload schema.
    pub const SCHEMA_HASH: &str = "schema_hash";
    /// Object-store pointer for oversized payloads.
    pub const BLOB_REF: &str = "blob_ref";
    /// `sha256:<hex>` of the stored blob.
    pub const BLOB_HASH: &str = "blob_hash";
    /// Size of the stored blob in bytes.
    pub const BLOB_SIZE: &str = "blob_size";
    /// Extension: the topic a dead-lettered message was published to.
    pub const ORIGINAL_TOPIC: &str = "original_topic";
    /// Extension: when the message was dead-lettered.
    pub const DLQ_AT: &str = "dlq_at";
    /// Extension: the consumer that dead-lettered it.
    pub const DLQ_CONSUMER: &str = "dlq_consumer";
    /// Extension: `sha256:<hex>` of the payload bytes as carried.
    pub const PAYLOAD_HASH: &str = "payload_hash";
    /// Extension: the replay request that caused this delivery.
    pub const REPLAY_REQUEST_ID: &str = "replay_request_id";
    /// Extension: the message id a redriven message replaces.
    pub const REDRIVE_OF: &str = "redrive_of";

    /// Headers that must be present on every message.
    pub const REQUIRED: [&str; 9] = [
        MESSAGE_ID,
        SCHEMA_FQDN,
        SCHEMA_VERSION,
        CONTENT_TYPE,
        PRODUCED_AT,
        PRODUCER,
        SOURCE,
        RUN_ID,
        PARTITION_KEY,
    ];
}

use names::*;

/// `application/x-protobuf`.
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";
/// `application/json` (diagnostics).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Schema used when a publisher gives none: opaque bytes.
pub const RAW_BYTES_SCHEMA: &str = "ampy.raw.v1.Bytes";
/// Largest value of one header on publish, in bytes: 64 KiB.
pub const MAX_HEADER_VALUE_BYTES: usize = 64 * 1024;
/// Largest sum of every header's name and value on publish, in bytes: 256 KiB.
pub const MAX_HEADERS_BYTES: usize = 256 * 1024;

/// The header map of an envelope: wire name → string value. Unknown headers are carried
/// through untouched. Keys are kept sorted.
///
/// ```
/// use ampybus::Headers;
/// let h = Headers::for_publish("ampy.bars.v1.BarBatch", "yfinance-go@ingest-1", "yfinance-go", "XNAS.AAPL");
/// assert_eq!(h.schema_fqdn(), Some("ampy.bars.v1.BarBatch"));
/// assert_eq!(h.get("schema_version"), Some("1.0.0"));
/// let topic = ampybus::Topic::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap();
/// h.validate_for_publish(&topic).unwrap();
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headers(BTreeMap<String, String>);

macro_rules! getters {
    ($($fn:ident => $name:ident),* $(,)?) => {
        $(
            #[doc = concat!("The `", stringify!($fn), "` header, if present.")]
            pub fn $fn(&self) -> Option<&str> { self.get($name) }
        )*
    };
}

impl Headers {
    /// An empty header map.
    ///
    /// ```
    /// assert!(ampybus::Headers::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Headers(BTreeMap::new())
    }

    /// Headers for a new publish: fills `message_id` (UUIDv7), `produced_at` (now),
    /// `schema_version` `1.0.0`, `content_type` protobuf, `run_id` (the process run id),
    /// and a fresh `traceparent` with `trace_id`/`span_id` for older peers.
    ///
    /// ```
    /// let h = ampybus::Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
    /// assert_eq!(h.partition_key(), Some("co_1"));
    /// assert!(h.traceparent().is_some());
    /// ```
    pub fn for_publish(
        schema_fqdn: &str,
        producer: &str,
        source: &str,
        partition_key: &str,
    ) -> Self {
        let mut h = Headers::new();
        h.set(MESSAGE_ID, ids::new_message_id());
        h.set(SCHEMA_FQDN, schema_fqdn);
        h.set(SCHEMA_VERSION, "1.0.0");
        h.set(CONTENT_TYPE, CONTENT_TYPE_PROTOBUF);
        h.set(PRODUCED_AT, ids::now_timestamp());
        h.set(PRODUCER, producer);
        h.set(SOURCE, source);
        h.set(RUN_ID, ids::process_run_id());
        h.set(PARTITION_KEY, partition_key);
        h.set_trace_context(&TraceContext::new_root());
        h
    }

    /// Fills what a publish needs and the caller left out: `message_id`, `produced_at`,
    /// `schema_version`, `content_type`, `run_id`, `traceparent` (from `trace_id` when only
    /// that is given), `trace_id`/`span_id`. Existing values are kept.
    ///
    /// ```
    /// let mut h = ampybus::Headers::new();
    /// h.fill_publish_defaults();
    /// assert!(h.message_id().is_some() && h.produced_at().is_some() && h.traceparent().is_some());
    /// ```
    pub fn fill_publish_defaults(&mut self) {
        if self.get(MESSAGE_ID).is_none() {
            self.set(MESSAGE_ID, ids::new_message_id());
        }
        if self.get(PRODUCED_AT).is_none() {
            self.set(PRODUCED_AT, ids::now_timestamp());
        }
        if self.get(SCHEMA_VERSION).is_none() {
            self.set(SCHEMA_VERSION, "1.0.0");
        }
        if self.get(CONTENT_TYPE).is_none() {
            self.set(CONTENT_TYPE, CONTENT_TYPE_PROTOBUF);
        }
        if self.get(RUN_ID).is_none() {
            self.set(RUN_ID, ids::process_run_id());
        }
        if self.get(TRACEPARENT).is_none() {
            let tc = self
                .get(TRACE_ID)
                .and_then(|t| TraceContext::from_ids(t, self.get(SPAN_ID)))
                .unwrap_or_else(TraceContext::new_root);
            self.set_trace_context(&tc);
        } else if let Some(tc) = self.traceparent().and_then(TraceContext::parse) {
            if self.get(TRACE_ID).is_none() {
                self.set(TRACE_ID, tc.trace_id.clone());
            }
            if self.get(SPAN_ID).is_none() {
                self.set(SPAN_ID, tc.span_id);
            }
        }
    }

    /// Sets `traceparent`, `trace_id` and `span_id` from a trace context.
    ///
    /// ```
    /// let mut h = ampybus::Headers::new();
    /// let tc = ampybus::ids::TraceContext::new_root();
    /// h.set_trace_context(&tc);
    /// assert_eq!(h.trace_context(), Some(tc));
    /// ```
    pub fn set_trace_context(&mut self, tc: &TraceContext) {
        self.set(TRACEPARENT, tc.to_traceparent());
        self.set(TRACE_ID, tc.trace_id.clone());
        self.set(SPAN_ID, tc.span_id.clone());
    }

    /// The trace context: from `traceparent`, else from `trace_id`/`span_id`; `None` when
    /// absent, malformed or all-zero.
    ///
    /// ```
    /// let mut h = ampybus::Headers::new();
    /// h.set("trace_id", "00000000000000000000000000000000");
    /// assert!(h.trace_context().is_none());
    /// ```
    pub fn trace_context(&self) -> Option<TraceContext> {
        self.traceparent()
            .and_then(TraceContext::parse)
            .or_else(|| TraceContext::from_ids(self.get(TRACE_ID)?, self.get(SPAN_ID)))
    }

    /// A header value by wire name.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Sets a header, returning the previous value.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(name.into(), value.into())
    }

    /// Sets a header and returns `self` (builder style).
    ///
    /// ```
    /// let h = ampybus::Headers::new().with("dedupe_key", "co_1");
    /// assert_eq!(h.dedupe_key(), Some("co_1"));
    /// ```
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set(name, value);
        self
    }

    /// Removes a header, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.0.remove(name)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates `(name, value)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The underlying map.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    getters! {
        message_id => MESSAGE_ID,
        schema_fqdn => SCHEMA_FQDN,
        schema_version => SCHEMA_VERSION,
        content_type => CONTENT_TYPE,
        content_encoding => CONTENT_ENCODING,
        produced_at => PRODUCED_AT,
        producer => PRODUCER,
        source => SOURCE,
        run_id => RUN_ID,
        traceparent => TRACEPARENT,
        partition_key => PARTITION_KEY,
        dedupe_key => DEDUPE_KEY,
        dlq_reason => DLQ_REASON,
        schema_hash => SCHEMA_HASH,
        blob_ref => BLOB_REF,
        blob_hash => BLOB_HASH,
        original_topic => ORIGINAL_TOPIC,
        dlq_consumer => DLQ_CONSUMER,
        payload_hash => PAYLOAD_HASH,
        replay_request_id => REPLAY_REQUEST_ID,
        redrive_of => REDRIVE_OF,
    }

    /// `retry_count` as a number (absent → 0; unparsable → `None`).
    ///
    /// ```
    /// let h = ampybus::Headers::new().with("retry_count", "2");
    /// assert_eq!(h.retry_count(), Some(2));
    /// assert_eq!(ampybus::Headers::new().retry_count(), Some(0));
    /// ```
    pub fn retry_count(&self) -> Option<u32> {
        match self.get(RETRY_COUNT) {
            None => Some(0),
            Some(v) => v.parse().ok(),
        }
    }

    /// `blob_size` as a number, if present and valid.
    pub fn blob_size(&self) -> Option<u64> {
        self.get(BLOB_SIZE)?.parse().ok()
    }

    /// `produced_at` parsed (any RFC3339 accepted).
    pub fn produced_at_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        ids::parse_time(self.produced_at()?)
    }

    /// Checks every publish-side rule of the contract for a message on `topic`. The error
    /// names the header and the rule.
    ///
    /// ```
    /// let topic = ampybus::Topic::parse("ampy.prod.orders.v1.requests").unwrap();
    /// let mut h = ampybus::Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
    /// h.set("produced_at", "yesterday");
    /// let err = h.validate_for_publish(&topic).unwrap_err();
    /// assert!(err.to_string().contains("`produced_at`"), "{err}");
    /// ```
    pub fn validate_for_publish(&self, topic: &Topic) -> Result<()> {
        let mut total = 0usize;
        let mut largest: Option<(&str, usize)> = None;
        for (k, v) in &self.0 {
            check_name(k)?;
            if v.contains(['\r', '\n', '\0']) {
                return Err(Error::header(k, "value must not contain CR, LF or NUL"));
            }
            if v.len() > MAX_HEADER_VALUE_BYTES {
                return Err(Error::header(
                    k,
                    format!(
                        "value is {} bytes, over the limit of {MAX_HEADER_VALUE_BYTES} bytes (64 KiB) per header value",
                        v.len()
                    ),
                ));
            }
            let size = k.len() + v.len();
            total += size;
            if largest.is_none_or(|(_, n)| size > n) {
                largest = Some((k, size));
            }
        }
        if total > MAX_HEADERS_BYTES
            && let Some((name, size)) = largest
        {
            return Err(Error::header(
                name,
                format!(
                    "the headers are {total} bytes in all (names and values), over the limit of {MAX_HEADERS_BYTES} bytes (256 KiB); this is the largest ({size} bytes)"
                ),
            ));
        }
        for name in REQUIRED {
            if self.get(name).is_none() {
                return Err(Error::header(name, "required header is missing"));
            }
        }
        let id = self.get(MESSAGE_ID).unwrap_or_default();
        match uuid::Uuid::try_parse(id) {
            Ok(u)
                if u.get_version_num() == 7
                    && u.get_variant() == uuid::Variant::RFC4122
                    && u.hyphenated().to_string() == id => {}
            Ok(_) => {
                return Err(Error::header(
                    MESSAGE_ID,
                    format!(
                        "must be a UUIDv7, lowercase and hyphenated (got {})",
                        show(id)
                    ),
                ));
            }
            Err(_) => {
                return Err(Error::header(
                    MESSAGE_ID,
                    format!("not a UUID (got {})", show(id)),
                ));
            }
        }
        check_fqdn(self.get(SCHEMA_FQDN).unwrap_or_default())?;
        check_semver(self.get(SCHEMA_VERSION).unwrap_or_default())?;
        let ct = self.get(CONTENT_TYPE).unwrap_or_default();
        if ct != CONTENT_TYPE_PROTOBUF && ct != CONTENT_TYPE_JSON {
            return Err(Error::header(
                CONTENT_TYPE,
                format!(
                    "must be `{CONTENT_TYPE_PROTOBUF}` or `{CONTENT_TYPE_JSON}` (got {})",
                    show(ct)
                ),
            ));
        }
        if let Some(ce) = self.get(CONTENT_ENCODING)
            && ce != "gzip"
        {
            return Err(Error::header(
                CONTENT_ENCODING,
                format!("must be absent or `gzip` (got {})", show(ce)),
            ));
        }
        let pa = self.get(PRODUCED_AT).unwrap_or_default();
        if !ids::is_canonical_time(pa) {
            return Err(Error::header(
                PRODUCED_AT,
                format!(
                    "must be RFC3339 UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ (got {})",
                    show(pa)
                ),
            ));
        }
        for name in [PRODUCER, SOURCE, RUN_ID] {
            check_text(name, self.get(name).unwrap_or_default())?;
        }
        match self.get(TRACEPARENT) {
            None => {
                return Err(Error::header(
                    TRACEPARENT,
                    "required on publish (use fill_publish_defaults)",
                ));
            }
            Some(tp) => {
                let tc = TraceContext::parse(tp).ok_or_else(|| {
                    Error::header(
                        TRACEPARENT,
                        format!(
                            "must be W3C `00-<32 hex>-<16 hex>-<2 hex>` with non-zero ids (got {})",
                            show(tp)
                        ),
                    )
                })?;
                if let Some(t) = self.get(TRACE_ID)
                    && !t.eq(&tc.trace_id)
                {
                    return Err(Error::header(
                        TRACE_ID,
                        "must equal the trace id inside `traceparent`",
                    ));
                }
                if let Some(s) = self.get(SPAN_ID)
                    && !s.eq(&tc.span_id)
                {
                    return Err(Error::header(
                        SPAN_ID,
                        "must equal the span id inside `traceparent`",
                    ));
                }
            }
        }
        partition::check_key(topic.domain(), self.get(PARTITION_KEY).unwrap_or_default())?;
        self.validate_optional()?;
        Ok(())
    }

    fn validate_optional(&self) -> Result<()> {
        if let Some(v) = self.get(DEDUPE_KEY) {
            check_text(DEDUPE_KEY, v)?;
        }
        if let Some(v) = self.get(RETRY_COUNT)
            && (!is_decimal(v) || v.parse::<u32>().is_err())
        {
            return Err(Error::header(
                RETRY_COUNT,
                format!("must be a non-negative integer (got {})", show(v)),
            ));
        }
        if let Some(v) = self.get(DLQ_REASON) {
            let code = v.split(':').next().unwrap_or_default();
            if !v.contains(':')
                || code.is_empty()
                || !code.starts_with(|c: char| c.is_ascii_lowercase())
                || !code
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(Error::header(
                    DLQ_REASON,
                    format!(
                        "must be `code: detail` with a lower_snake code (got {})",
                        show(v)
                    ),
                ));
            }
        }
        if let Some(v) = self.get(SCHEMA_HASH) {
            let hex = v
                .strip_prefix("nameonly:sha256:")
                .or_else(|| v.strip_prefix("sha256:"));
            if !hex.is_some_and(is_sha256_hex) {
                return Err(Error::header(
                    SCHEMA_HASH,
                    format!(
                        "must be `sha256:<64 hex>` or `nameonly:sha256:<64 hex>` (got {})",
                        show(v)
                    ),
                ));
            }
        }
        for name in [BLOB_HASH, PAYLOAD_HASH] {
            if let Some(v) = self.get(name)
                && !v.strip_prefix("sha256:").is_some_and(is_sha256_hex)
            {
                return Err(Error::header(
                    name,
                    format!("must be `sha256:<64 lowercase hex>` (got {})", show(v)),
                ));
            }
        }
        let blob = [
            self.get(BLOB_REF).is_some(),
            self.get(BLOB_HASH).is_some(),
            self.get(BLOB_SIZE).is_some(),
        ];
        if blob.iter().any(|b| *b) && !blob.iter().all(|b| *b) {
            return Err(Error::header(
                BLOB_REF,
                "`blob_ref`, `blob_hash` and `blob_size` go together: all three or none",
            ));
        }
        if let Some(v) = self.get(BLOB_SIZE)
            && (!is_decimal(v) || v.parse::<u64>().is_err())
        {
            return Err(Error::header(
                BLOB_SIZE,
                format!("must be a non-negative integer (got {})", show(v)),
            ));
        }
        if let Some(v) = self.get(BLOB_REF) {
            check_text(BLOB_REF, v)?;
        }
        if let Some(v) = self.get(ORIGINAL_TOPIC) {
            Topic::parse(v).map_err(|e| Error::header(ORIGINAL_TOPIC, e.message()))?;
        }
        if let Some(v) = self.get(DLQ_AT)
            && !ids::is_canonical_time(v)
        {
            return Err(Error::header(
                DLQ_AT,
                format!(
                    "must be RFC3339 UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ (got {})",
                    show(v)
                ),
            ));
        }
        if let Some(v) = self.get(DLQ_CONSUMER) {
            check_text(DLQ_CONSUMER, v)?;
        }
        for name in [REPLAY_REQUEST_ID, REDRIVE_OF] {
            if let Some(v) = self.get(name)
                && uuid::Uuid::try_parse(v).is_err()
            {
                return Err(Error::header(
                    name,
                    format!("must be a UUID (got {})", show(v)),
                ));
            }
        }
        Ok(())
    }

    /// Applies the liberal consume-side rules in place: required headers must be present and
    /// non-empty; `message_id` may be any UUID (normalised to lowercase hyphenated);
    /// `produced_at` any RFC3339 time with offset (normalised to UTC with microseconds); a
    /// missing or malformed `traceparent` is rebuilt from `trace_id`/`span_id` when those are
    /// valid and non-zero. The partition key is only required to be non-empty. Errors name the
    /// header and the rule; the caller dead-letters the message with `contract_violation`.
    ///
    /// ```
    /// let mut h = ampybus::Headers::new()
    ///     .with("message_id", "018F5E2F-9B1C-46AA-8F7A-3B1D8F3EA0C2")
    ///     .with("schema_fqdn", "ampy.bars.v1.BarBatch").with("schema_version", "1.0.0")
    ///     .with("content_type", "application/x-protobuf")
    ///     .with("produced_at", "2025-09-05T19:31:01+00:00")
    ///     .with("producer", "p").with("source", "s").with("run_id", "r")
    ///     .with("partition_key", "XNAS.AAPL")
    ///     .with("trace_id", "00000000000000000000000000000000");
    /// h.normalize_for_consume().unwrap();
    /// assert_eq!(h.message_id(), Some("018f5e2f-9b1c-46aa-8f7a-3b1d8f3ea0c2"));
    /// assert_eq!(h.produced_at(), Some("2025-09-05T19:31:01.000000Z"));
    /// assert!(h.trace_context().is_none());
    /// ```
    pub fn normalize_for_consume(&mut self) -> Result<()> {
        for name in REQUIRED {
            match self.get(name) {
                None => return Err(Error::header(name, "required header is missing")),
                Some(v) if v.trim().is_empty() => {
                    return Err(Error::header(name, "must not be empty"));
                }
                _ => {}
            }
        }
        let id = self.get(MESSAGE_ID).unwrap_or_default();
        let u = uuid::Uuid::try_parse(id.trim())
            .map_err(|_| Error::header(MESSAGE_ID, format!("not a UUID (got {})", show(id))))?;
        // Rewrite only what is not in canonical form already (the common case costs nothing).
        let mut buf = uuid::Uuid::encode_buffer();
        let canonical = u.hyphenated().encode_lower(&mut buf);
        if canonical != id {
            let canonical = canonical.to_owned();
            self.set(MESSAGE_ID, canonical);
        }
        let pa = self.get(PRODUCED_AT).unwrap_or_default();
        let t = ids::parse_time(pa.trim()).ok_or_else(|| {
            Error::header(
                PRODUCED_AT,
                format!("must be an RFC3339 time with offset (got {})", show(pa)),
            )
        })?;
        if !is_canonical_time(pa) {
            self.set(PRODUCED_AT, ids::format_time(t));
        }
        if let Some(ce) = self.get(CONTENT_ENCODING)
            && !ce.is_empty()
            && !ce.eq_ignore_ascii_case("gzip")
            && !ce.eq_ignore_ascii_case("identity")
        {
            return Err(Error::header(
                CONTENT_ENCODING,
                format!(
                    "unsupported encoding {} (absent, `gzip` or `identity`)",
                    show(ce)
                ),
            ));
        }
        if let Some(v) = self.get(RETRY_COUNT)
            && v.trim().parse::<u32>().is_err()
        {
            return Err(Error::header(
                RETRY_COUNT,
                format!("must be a non-negative integer (got {})", show(v)),
            ));
        }
        if self.traceparent().and_then(TraceContext::parse).is_none() {
            if let Some(tc) = self
                .get(TRACE_ID)
                .and_then(|t| TraceContext::from_ids(t, self.get(SPAN_ID)))
            {
                self.set(TRACEPARENT, tc.to_traceparent());
            } else if self
                .get(TRACE_ID)
                .is_some_and(|t| t.bytes().all(|b| b == b'0'))
            {
                // An all-zero trace id counts as absent.
                self.remove(TRACE_ID);
            }
        }
        Ok(())
    }

    /// The dedupe scope key for this message's `dedupe_key` within `domain`
    /// (`"{domain}:{dedupe_key}"`), if it has one.
    ///
    /// ```
    /// let h = ampybus::Headers::new().with("dedupe_key", "co_1");
    /// assert_eq!(h.dedupe_scope(ampybus::Domain::Orders).as_deref(), Some("orders:co_1"));
    /// ```
    pub fn dedupe_scope(&self, domain: Domain) -> Option<String> {
        self.dedupe_key().map(|k| format!("{domain}:{k}"))
    }
}

/// Whether a time that parsed as RFC3339 is already in the emitted form
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, microseconds), so normalising it would not change it.
fn is_canonical_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 27
        && b[10] == b'T'
        && b[19] == b'.'
        && b[26] == b'Z'
        && b[20..26].iter().all(u8::is_ascii_digit)
}

impl FromIterator<(String, String)> for Headers {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Headers(iter.into_iter().collect())
    }
}

impl From<BTreeMap<String, String>> for Headers {
    fn from(m: BTreeMap<String, String>) -> Self {
        Headers(m)
    }
}

fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        return Err(Error::header(name, "header names must be 1–128 bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(Error::header(
            name,
            "header names must be printable ASCII without spaces or `:`",
        ));
    }
    Ok(())
}

fn check_text(name: &str, v: &str) -> Result<()> {
    if v.trim().is_empty() {
        return Err(Error::header(name, "must not be empty"));
    }
    if v.trim() != v {
        return Err(Error::header(
            name,
            format!("must not start or end with whitespace (got {})", show(v)),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(Error::header(name, "must not contain control characters"));
    }
    Ok(())
}

fn check_fqdn(v: &str) -> Result<()> {
    let ok = v.split('.').count() >= 2
        && v.split('.').all(|t| {
            let mut c = t.chars();
            c.next()
                .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::header(
            SCHEMA_FQDN,
            format!(
                "must be a dotted protobuf name such as `ampy.bars.v1.BarBatch` (got {})",
                show(v)
            ),
        ))
    }
}

/// `-pre.release` and/or `+build.meta`: non-empty dot-separated `[0-9A-Za-z-]` identifiers.
fn semver_tail_ok(tail: &str) -> bool {
    let idents_ok = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|id| {
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    let (pre, build) = match tail.split_once('+') {
        Some((pre, build)) => (pre, Some(build)),
        None => (tail, None),
    };
    let pre_ok = pre.is_empty() || pre.strip_prefix('-').is_some_and(idents_ok);
    pre_ok && build.is_none_or(idents_ok)
}

fn check_semver(v: &str) -> Result<()> {
    let core = v.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    let ok = parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
        })
        && semver_tail_ok(&v[core.len()..]);
    if ok {
        Ok(())
    } else {
        Err(Error::header(
            SCHEMA_VERSION,
            format!(
                "must be semver MAJOR.MINOR.PATCH such as `1.0.0` (got {})",
                show(v)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_times_are_recognised_and_others_normalised() {
        assert!(is_canonical_time("2025-09-05T19:31:01.000000Z"));
        for t in [
            "2025-09-05t19:31:01.000000Z",
            "2025-09-05T19:31:01.000000z",
            "2025-09-05T19:31:01Z",
            "2025-09-05T19:31:01.000000+00:00",
            " 2025-09-05T19:31:01.00000Z",
        ] {
            assert!(!is_canonical_time(t), "{t}");
        }
        let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
        h.fill_publish_defaults();
        h.set(PRODUCED_AT, "2025-09-05t19:31:01.5z");
        h.set(MESSAGE_ID, "018F5E2F-9B1C-46AA-8F7A-3B1D8F3EA0C2");
        h.normalize_for_consume().unwrap();
        assert_eq!(h.produced_at(), Some("2025-09-05T19:31:01.500000Z"));
        assert_eq!(h.message_id(), Some("018f5e2f-9b1c-46aa-8f7a-3b1d8f3ea0c2"));
        let before = h.clone();
        h.normalize_for_consume().unwrap();
        assert_eq!(h, before, "normalising a normal form changes nothing");
    }

    fn topic() -> Topic {
        Topic::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap()
    }

    fn good() -> Headers {
        Headers::for_publish(
            "ampy.bars.v1.BarBatch",
            "yfinance-go@ingest-1",
            "yfinance-go",
            "XNAS.AAPL",
        )
    }

    #[test]
    fn publish_rules_name_header_and_rule() {
        good().validate_for_publish(&topic()).unwrap();
        let cases: Vec<(&str, Option<&str>, &str)> = vec![
            (MESSAGE_ID, None, "`message_id`: required header is missing"),
            (MESSAGE_ID, Some("not-a-uuid"), "`message_id`: not a UUID"),
            (
                MESSAGE_ID,
                Some("6ba7b810-9dad-41d1-80b4-00c04fd430c8"),
                "`message_id`: must be a UUIDv7",
            ),
            (
                MESSAGE_ID,
                Some("018F5E2F-9B1C-76AA-8F7A-3B1D8F3EA0C2"),
                "`message_id`: must be a UUIDv7, lowercase",
            ),
            (
                SCHEMA_FQDN,
                Some("BarBatch"),
                "`schema_fqdn`: must be a dotted",
            ),
            (
                SCHEMA_VERSION,
                Some("1.0"),
                "`schema_version`: must be semver",
            ),
            (
                SCHEMA_VERSION,
                Some("01.0.0"),
                "`schema_version`: must be semver",
            ),
            (CONTENT_TYPE, Some("text/plain"), "`content_type`: must be"),
            (
                CONTENT_ENCODING,
                Some("br"),
                "`content_encoding`: must be absent or `gzip`",
            ),
            (
                PRODUCED_AT,
                Some("2025-09-05T19:31:01Z"),
                "`produced_at`: must be RFC3339 UTC",
            ),
            (
                PRODUCED_AT,
                Some("2025-02-30T19:31:01.000000Z"),
                "`produced_at`: must be RFC3339 UTC",
            ),
            (PRODUCER, Some(""), "`producer`: must not be empty"),
            (
                SOURCE,
                Some(" x"),
                "`source`: must not start or end with whitespace",
            ),
            (
                RUN_ID,
                Some("a\tb"),
                "`run_id`: must not contain control characters",
            ),
            (
                TRACEPARENT,
                Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
                "`traceparent`: must be W3C",
            ),
            (TRACEPARENT, None, "`traceparent`: required on publish"),
            (
                TRACE_ID,
                Some("4b5b3f2a0f9d4e3db4c8a1f0e3a7c812"),
                "`trace_id`: must equal",
            ),
            (PARTITION_KEY, Some("AAPL"), "`partition_key`"),
            (
                RETRY_COUNT,
                Some("-1"),
                "`retry_count`: must be a non-negative integer",
            ),
            (
                DLQ_REASON,
                Some("oops"),
                "`dlq_reason`: must be `code: detail`",
            ),
            (SCHEMA_HASH, Some("md5:abc"), "`schema_hash`: must be"),
            (
                BLOB_REF,
                Some("file:///x"),
                "`blob_ref`: `blob_ref`, `blob_hash` and `blob_size` go together",
            ),
            (ORIGINAL_TOPIC, Some("ampy.prod.bars"), "`original_topic`"),
            (DLQ_AT, Some("now"), "`dlq_at`: must be RFC3339"),
            (REDRIVE_OF, Some("x"), "`redrive_of`: must be a UUID"),
            (
                RETRY_COUNT,
                Some("+1"),
                "`retry_count`: must be a non-negative integer",
            ),
            (
                SCHEMA_VERSION,
                Some("1.0.0-+"),
                "`schema_version`: must be semver",
            ),
            (
                MESSAGE_ID,
                Some("019a6b3c-1d2e-7f00-0a00-0123456789ab"),
                "`message_id`: must be a UUIDv7",
            ),
            (
                DLQ_REASON,
                Some("5xx: upstream"),
                "`dlq_reason`: must be `code: detail`",
            ),
            (
                "bad name",
                Some("x"),
                "header names must be printable ASCII",
            ),
            (DEDUPE_KEY, Some("a\nb"), "must not contain CR, LF or NUL"),
        ];
        for (name, value, want) in cases {
            let mut h = good();
            match value {
                Some(v) => h.set(name, v),
                None => h.remove(name),
            };
            let e = h.validate_for_publish(&topic()).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Header, "{name}");
            assert!(
                e.to_string().contains(want),
                "{name}={value:?}: {e} does not contain {want:?}"
            );
        }
    }

    #[test]
    fn tightened_rules_still_accept_valid_forms() {
        for (name, v) in [
            (SCHEMA_VERSION, "1.2.3-rc.1+build.7"),
            (DLQ_REASON, "http_500: upstream failed"),
            (RETRY_COUNT, "12"),
        ] {
            good().with(name, v).validate_for_publish(&topic()).unwrap();
        }
    }

    #[test]
    fn consume_rules_are_liberal_but_not_blind() {
        let mut h = good();
        h.set(PRODUCED_AT, "2025-09-05T19:31:01.462+00:00");
        h.remove(TRACEPARENT);
        h.set(TRACE_ID, "A0C1B2D3E4F5061728394A5B6C7D8E9F");
        h.remove(SPAN_ID);
        h.normalize_for_consume().unwrap();
        assert_eq!(h.produced_at(), Some("2025-09-05T19:31:01.462000Z"));
        assert_eq!(
            h.trace_context().unwrap().trace_id,
            "a0c1b2d3e4f5061728394a5b6c7d8e9f"
        );

        let mut h = good();
        h.set(PARTITION_KEY, "");
        assert!(
            h.normalize_for_consume()
                .unwrap_err()
                .to_string()
                .contains("`partition_key`: must not be empty")
        );
        let mut h = good();
        h.remove(SOURCE);
        assert!(
            h.normalize_for_consume()
                .unwrap_err()
                .to_string()
                .contains("`source`: required header is missing")
        );
        let mut h = good();
        h.set(PRODUCED_AT, "19:31");
        assert!(
            h.normalize_for_consume()
                .unwrap_err()
                .to_string()
                .contains("`produced_at`")
        );
    }
}
