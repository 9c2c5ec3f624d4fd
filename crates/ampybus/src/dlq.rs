//! The DLQ contract: the closed set of reason codes ([`DlqCode`]), the headers a dead letter
//! carries, the DLQ topic of a message, and the envelopes of a dead letter and of its
//! redrive. The consumer runtime writes dead letters with it; `ampybus dlq` reads and redrives
//! them (the plan and the record of a redrive are the runtime's:
//! `ampybus::runtime::plan_redrive`). Everything here is also exported from
//! `ampybus::runtime`.

use crate::codec::sha256_tag;
use crate::envelope::Envelope;
use crate::headers::{Headers, RAW_BYTES_SCHEMA, names};
use crate::ids;
use crate::topic::{Domain, Env, Topic, TopicPattern};

/// The closed set of DLQ reason codes. The `dlq_reason` header is `code: detail`; metrics label
/// by code only.
///
/// | code                 | meaning                                                           |
/// |----------------------|-------------------------------------------------------------------|
/// | `decode_error`       | payload does not inflate / decode as its schema                   |
/// | `schema_mismatch`    | `schema_fqdn` is not the type the handler expects                 |
/// | `contract_violation` | headers or topic break the consume-side contract                  |
/// | `handler_error`      | the handler said "dead-letter now" (poison)                       |
/// | `handler_panic`      | the handler panicked                                              |
/// | `blob_hash_mismatch` | the fetched blob does not match `blob_hash`/`blob_size`           |
/// | `max_retries`        | the last allowed attempt failed                                   |
/// | `payload_too_large`  | the payload (as carried or inflated) exceeds the consumer's limit |
/// | `other`              | anything else, e.g. reasons written by other tools                |
///
/// ```
/// use ampybus::runtime::DlqCode;
/// assert_eq!(DlqCode::MaxRetries.as_str(), "max_retries");
/// assert_eq!(DlqCode::parse("handler_panic"), DlqCode::HandlerPanic);
/// assert_eq!(DlqCode::parse("made_up"), DlqCode::Other);
/// assert_eq!(DlqCode::from_reason("decode_error: bad gzip"), DlqCode::DecodeError);
/// assert_eq!(DlqCode::DecodeError.reason("bad gzip"), "decode_error: bad gzip");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DlqCode {
    /// `decode_error`
    DecodeError,
    /// `schema_mismatch`
    SchemaMismatch,
    /// `contract_violation`
    ContractViolation,
    /// `handler_error`
    HandlerError,
    /// `handler_panic`
    HandlerPanic,
    /// `blob_hash_mismatch`
    BlobHashMismatch,
    /// `max_retries`
    MaxRetries,
    /// `payload_too_large`
    PayloadTooLarge,
    /// `other`
    Other,
}

impl DlqCode {
    /// Every code, in declaration order.
    pub const ALL: [DlqCode; 9] = [
        DlqCode::DecodeError,
        DlqCode::SchemaMismatch,
        DlqCode::ContractViolation,
        DlqCode::HandlerError,
        DlqCode::HandlerPanic,
        DlqCode::BlobHashMismatch,
        DlqCode::MaxRetries,
        DlqCode::PayloadTooLarge,
        DlqCode::Other,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqCode::DecodeError => "decode_error",
            DlqCode::SchemaMismatch => "schema_mismatch",
            DlqCode::ContractViolation => "contract_violation",
            DlqCode::HandlerError => "handler_error",
            DlqCode::HandlerPanic => "handler_panic",
            DlqCode::BlobHashMismatch => "blob_hash_mismatch",
            DlqCode::MaxRetries => "max_retries",
            DlqCode::PayloadTooLarge => "payload_too_large",
            DlqCode::Other => "other",
        }
    }

    /// Parses a code; unknown codes are [`DlqCode::Other`].
    pub fn parse(code: &str) -> DlqCode {
        DlqCode::ALL
            .into_iter()
            .find(|c| c.as_str() == code.trim())
            .unwrap_or(DlqCode::Other)
    }

    /// The code of a `code: detail` reason.
    pub fn from_reason(reason: &str) -> DlqCode {
        DlqCode::parse(reason.split(':').next().unwrap_or_default())
    }

    /// Formats `code: detail` (detail on one line, cut to 4,096 bytes so the `dlq_reason`
    /// header stays far below the header limits).
    ///
    /// ```
    /// let r = ampybus::DlqCode::HandlerError.reason(&"x".repeat(100_000));
    /// assert!(r.len() < 4200 && r.ends_with('…'));
    /// ```
    pub fn reason(self, detail: &str) -> String {
        const MAX_DETAIL: usize = 4096;
        let mut detail: String = detail
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push('…');
        }
        let detail = detail.trim();
        if detail.is_empty() {
            format!("{}: -", self.as_str())
        } else {
            format!("{}: {detail}", self.as_str())
        }
    }

    pub(crate) fn index(self) -> usize {
        DlqCode::ALL
            .iter()
            .position(|c| *c == self)
            .unwrap_or(DlqCode::ALL.len() - 1)
    }
}

impl std::fmt::Display for DlqCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Header holding the original `message_id` on a DLQ message (which gets a new one, so that
/// broker-side dedupe does not swallow it).
///
/// ```
/// assert_eq!(ampybus::runtime::ORIGINAL_MESSAGE_ID, "original_message_id");
/// ```
pub const ORIGINAL_MESSAGE_ID: &str = "original_message_id";

/// Header holding the original topic string when it does not parse (then `original_topic`,
/// which must be a valid topic, is left out).
///
/// ```
/// assert_eq!(ampybus::runtime::ORIGINAL_TOPIC_RAW, "original_topic_raw");
/// ```
pub const ORIGINAL_TOPIC_RAW: &str = "original_topic_raw";

/// The DLQ topic for a message whose topic string may not parse: `topic.dlq_topic()` when it
/// parses; otherwise `ampy.{env}.dlq.v1.{domain}` from whatever tokens are readable, with the
/// env falling back to the pattern's literal env token, then `prod`, and the domain to
/// `control`.
pub(crate) fn dlq_topic_for(raw_topic: &str, pattern: &TopicPattern) -> Topic {
    if let Ok(t) = Topic::parse(raw_topic) {
        return t.dlq_topic();
    }
    let toks: Vec<&str> = raw_topic.split('.').collect();
    let pat_env = pattern.as_str().split('.').nth(1).unwrap_or_default();
    let env = toks
        .get(1)
        .and_then(|t| t.parse::<Env>().ok())
        .or_else(|| pat_env.parse::<Env>().ok())
        .unwrap_or(Env::Prod);
    let domain = toks
        .get(2)
        .and_then(|t| t.parse::<Domain>().ok())
        .filter(|d| *d != Domain::Dlq)
        .unwrap_or(Domain::Control);
    Topic::parse(&format!("ampy.{env}.dlq.v1.{domain}"))
        .unwrap_or_else(|_| Topic::parse("ampy.prod.dlq.v1.control").expect("valid topic"))
}

/// Makes a header value publishable (single line, non-empty).
fn clean(v: &str) -> String {
    let s: String = v
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let s = s.trim().to_owned();
    if s.is_empty() { "-".to_owned() } else { s }
}

/// Builds the DLQ envelope for `original` (as carried): the original payload bytes and headers,
/// a new `message_id` (the old one in [`ORIGINAL_MESSAGE_ID`]), and `dlq_reason`,
/// `original_topic`, `retry_count`, `dlq_at`, `dlq_consumer`, `payload_hash`.
///
/// The result always passes publish validation: an original header that breaks a publish rule
/// is moved to `original_<name>` (value made single-line) and required headers are refilled
/// (`schema_fqdn` = `ampy.raw.v1.Bytes`, `producer` = the consumer, `source` = `ampybus-dlq`,
/// `partition_key` = the original topic).
///
/// ```
/// use ampybus::{Envelope, Headers, Topic};
/// use ampybus::runtime::build_dlq_envelope;
/// let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
/// let h = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
/// let env = Envelope::new(&topic, h.clone(), b"p".to_vec());
/// let dlq = build_dlq_envelope(&env, &topic.dlq_topic(), "handler_error: nope", 1, "oms");
/// assert_eq!(dlq.topic, "ampy.dev.dlq.v1.orders");
/// assert_eq!(dlq.headers.get("dlq_reason"), Some("handler_error: nope"));
/// assert_eq!(dlq.headers.get("original_message_id"), h.message_id());
/// assert_ne!(dlq.headers.message_id(), h.message_id());
/// dlq.validate_for_publish().unwrap();
/// ```
pub fn build_dlq_envelope(
    original: &Envelope,
    dlq_topic: &Topic,
    reason: &str,
    retry_count: u32,
    consumer: &str,
) -> Envelope {
    let mut h = original.headers.clone();
    if let Some(id) = h.remove(names::MESSAGE_ID) {
        h.set(ORIGINAL_MESSAGE_ID, clean(&id));
    }
    h.set(names::MESSAGE_ID, ids::new_message_id());
    h.set(names::DLQ_REASON, clean(reason));
    if Topic::parse(&original.topic).is_ok() {
        h.set(names::ORIGINAL_TOPIC, original.topic.clone());
    } else {
        h.remove(names::ORIGINAL_TOPIC);
        h.set(ORIGINAL_TOPIC_RAW, clean(&original.topic));
    }
    h.set(names::RETRY_COUNT, retry_count.to_string());
    h.set(names::DLQ_AT, ids::now_timestamp());
    h.set(names::DLQ_CONSUMER, clean(consumer));
    h.set(names::PAYLOAD_HASH, sha256_tag(&original.payload));
    let mut env = Envelope::new(dlq_topic, h, original.payload.clone());
    for _ in 0..64 {
        fill_required(&mut env.headers, &original.topic, consumer);
        let err = match env.validate_for_publish() {
            Ok(_) => return env,
            Err(e) => e,
        };
        let msg = err.message();
        let name = msg
            .strip_prefix('`')
            .and_then(|m| m.split_once('`'))
            .map(|(n, _)| n.to_owned());
        match name {
            Some(n) if env.headers.get(&n).is_some() => {
                let v = env.headers.remove(&n).unwrap_or_default();
                let keep = [
                    names::DLQ_REASON,
                    names::DLQ_AT,
                    names::DLQ_CONSUMER,
                    names::PAYLOAD_HASH,
                    names::RETRY_COUNT,
                    names::MESSAGE_ID,
                ];
                if !keep.contains(&n.as_str()) && !n.starts_with("original_") {
                    env.headers.set(format!("original_{n}"), clean(&v));
                }
                if n == names::TRACEPARENT {
                    env.headers.remove(names::TRACE_ID);
                    env.headers.remove(names::SPAN_ID);
                }
                if n == names::TRACE_ID || n == names::SPAN_ID {
                    env.headers.remove(names::TRACEPARENT);
                }
            }
            _ => break,
        }
    }
    // Last resort: a minimal, valid envelope that still carries the payload and the reason.
    let mut h = Headers::for_publish(RAW_BYTES_SCHEMA, consumer, "ampybus-dlq", &original.topic);
    for name in [
        names::DLQ_REASON,
        names::RETRY_COUNT,
        names::DLQ_AT,
        names::DLQ_CONSUMER,
        names::PAYLOAD_HASH,
        names::ORIGINAL_TOPIC,
        ORIGINAL_TOPIC_RAW,
        ORIGINAL_MESSAGE_ID,
        names::CONTENT_ENCODING,
        names::BLOB_REF,
        names::BLOB_HASH,
        names::BLOB_SIZE,
    ] {
        if let Some(v) = env.headers.get(name) {
            h.set(name, v);
        }
    }
    let mut fallback = Envelope::new(dlq_topic, h.clone(), original.payload.clone());
    if fallback.validate_for_publish().is_err() {
        for name in [
            names::CONTENT_ENCODING,
            names::BLOB_REF,
            names::BLOB_HASH,
            names::BLOB_SIZE,
        ] {
            h.remove(name);
        }
        fallback = Envelope::new(dlq_topic, h, original.payload.clone());
    }
    fallback
}

fn fill_required(h: &mut Headers, original_topic: &str, consumer: &str) {
    let mut set_if_missing = |name: &str, v: &str| {
        if h.get(name).is_none_or(|x| x.trim().is_empty()) {
            h.set(name, clean(v));
        }
    };
    set_if_missing(names::SCHEMA_FQDN, RAW_BYTES_SCHEMA);
    set_if_missing(names::PRODUCER, consumer);
    set_if_missing(names::SOURCE, "ampybus-dlq");
    set_if_missing(names::PARTITION_KEY, original_topic);
    h.fill_publish_defaults();
}

/// Headers that only make sense on a dead-lettered copy; [`redrive_envelope`] removes them.
pub const DLQ_ONLY_HEADERS: [&str; 7] = [
    names::DLQ_REASON,
    names::ORIGINAL_TOPIC,
    ORIGINAL_TOPIC_RAW,
    names::DLQ_AT,
    names::DLQ_CONSUMER,
    names::PAYLOAD_HASH,
    ORIGINAL_MESSAGE_ID,
];

/// The envelope that redrives one dead-lettered message (DESIGN §2): its original bytes on
/// its `original_topic`, with a NEW `message_id`, `redrive_of` = the DLQ message's
/// `original_message_id` (or its own `message_id` when absent), `retry_count` + 1, and every
/// DLQ-only header removed, so that neither broker nor consumer dedupe swallows it.
///
/// Fails (`Header`/`Topic` error) when the DLQ message has no parseable `original_topic`, or
/// when the envelope it would publish breaks a publish rule (the error names the header).
///
/// ```
/// use ampybus::{Envelope, Headers, Topic};
/// use ampybus::runtime::{build_dlq_envelope, redrive_envelope};
/// let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
/// let h = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
/// let env = Envelope::new(&topic, h.clone(), b"p".to_vec());
/// let dlq = build_dlq_envelope(&env, &topic.dlq_topic(), "handler_error: nope", 1, "oms");
/// let again = redrive_envelope(&dlq).unwrap();
/// assert_eq!(again.topic, "ampy.dev.orders.v1.requests");
/// assert_eq!(again.headers.get("redrive_of"), h.message_id());
/// assert_eq!(again.headers.get("retry_count"), Some("2"));
/// assert!(again.headers.get("dlq_reason").is_none());
/// assert_ne!(again.headers.message_id(), h.message_id());
/// assert_ne!(again.headers.message_id(), dlq.headers.message_id());
/// ```
pub fn redrive_envelope(dlq: &Envelope) -> crate::Result<Envelope> {
    let h = &dlq.headers;
    let original_topic = h.get(names::ORIGINAL_TOPIC).ok_or_else(|| {
        crate::Error::new(
            crate::ErrorKind::Header,
            "redrive: the DLQ message has no original_topic",
        )
    })?;
    let topic = Topic::parse(original_topic)?;
    let redrive_of = h
        .get(ORIGINAL_MESSAGE_ID)
        .or_else(|| h.message_id())
        .unwrap_or_default()
        .to_owned();
    let retry_count = h.retry_count().unwrap_or(0).saturating_add(1);
    let mut headers = h.clone();
    for name in DLQ_ONLY_HEADERS {
        headers.remove(name);
    }
    headers.set(names::MESSAGE_ID, ids::new_message_id());
    headers.set(names::REDRIVE_OF, redrive_of);
    headers.set(names::RETRY_COUNT, retry_count.to_string());
    let env = Envelope {
        topic: crate::envelope::TopicName::from(&topic),
        headers,
        payload: dlq.payload.clone(),
    };
    env.validate_for_publish()?;
    Ok(env)
}

/// The consumer name under which redrives are recorded in the transport's dedupe store (one
/// entry per redriven DLQ `message_id`), so that a repeated redrive skips what was sent.
/// Reserved: do not name a consumer of your own so.
///
/// ```
/// assert_eq!(ampybus::runtime::REDRIVE_CONSUMER, "ampybus-redrive");
/// ```
pub const REDRIVE_CONSUMER: &str = "ampybus-redrive";
