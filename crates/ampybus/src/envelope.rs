//! The envelope (topic + headers + payload bytes) and its JSON diagnostic form, used by golden
//! files, `ampybus sub --json`, `ampybus validate` and humans.

use crate::error::{Error, Result};
use crate::headers::Headers;
use crate::topic::Topic;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One message as carried on the wire: a topic, the headers and the payload bytes (compressed
/// when `content_encoding=gzip`, empty when `blob_ref` points at an object store).
///
/// ```
/// use ampybus::{Envelope, Headers, Topic};
/// let topic = Topic::parse("ampy.prod.orders.v1.requests").unwrap();
/// let headers = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
/// let env = Envelope::new(&topic, headers, b"\x0a\x04co_1".to_vec());
/// env.validate_for_publish().unwrap();
/// let line = env.to_json_line(None);
/// let back = Envelope::from_json_str(&line).unwrap();
/// assert_eq!(back, env);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The concrete topic. Kept as text so that a message from the wire with a bad topic
    /// can still be carried to the DLQ; [`Envelope::topic`] parses it. Shared: bindings hand
    /// every message of one topic the same text ([`TopicName`]).
    pub topic: TopicName,
    /// The headers.
    pub headers: Headers,
    /// The payload bytes as carried.
    pub payload: Bytes,
}

/// The topic of an envelope as carried: text shared by reference count, so that the
/// messages of one topic a binding receives share one copy of it (a clone is a count, not an
/// allocation). Reads as a `&str` (it dereferences to one) and compares with strings.
///
/// ```
/// use ampybus::envelope::TopicName;
/// let t = TopicName::from("ampy.prod.fx.v1.rates");
/// let u = t.clone();
/// assert_eq!(u, "ampy.prod.fx.v1.rates");
/// assert!(t.starts_with("ampy.prod."));
/// assert_eq!(t.as_str().len(), 21);
/// assert_eq!(format!("{t} {u:?}"), "ampy.prod.fx.v1.rates \"ampy.prod.fx.v1.rates\"");
/// ```
#[derive(Clone, Default)]
pub struct TopicName(Option<std::sync::Arc<str>>);

impl TopicName {
    fn of(s: std::sync::Arc<str>) -> TopicName {
        TopicName((!s.is_empty()).then_some(s))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }

    /// The shared text itself (a count, except for the empty name).
    ///
    /// ```
    /// let t = ampybus::envelope::TopicName::from("ampy.dev.news.v1.raw");
    /// assert!(std::sync::Arc::ptr_eq(&t.to_arc(), &t.clone().to_arc()));
    /// ```
    pub fn to_arc(&self) -> std::sync::Arc<str> {
        self.0.clone().unwrap_or_else(|| std::sync::Arc::from(""))
    }

    /// The address of the shared text (0 for the empty name): equal for names that are
    /// [`TopicName::same`], and not reused while either is alive.
    pub(crate) fn addr(&self) -> usize {
        self.0
            .as_ref()
            .map_or(0, |a| std::sync::Arc::as_ptr(a) as *const u8 as usize)
    }

    /// Whether both share one text (then they are equal without comparing it).
    ///
    /// ```
    /// let mut names = ampybus::envelope::TopicNames::default();
    /// let a = names.get("ampy.dev.news.v1.raw");
    /// assert!(a.same(&names.get("ampy.dev.news.v1.raw")));
    /// assert!(!a.same(&ampybus::envelope::TopicName::from("ampy.dev.news.v1.raw")));
    /// ```
    pub fn same(&self, other: &TopicName) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl PartialEq for TopicName {
    fn eq(&self, other: &TopicName) -> bool {
        self.same(other) || self.as_str() == other.as_str()
    }
}

impl Eq for TopicName {}

impl std::hash::Hash for TopicName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialOrd for TopicName {
    fn partial_cmp(&self, other: &TopicName) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TopicName {
    fn cmp(&self, other: &TopicName) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::ops::Deref for TopicName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&str> for TopicName {
    fn from(s: &str) -> Self {
        TopicName((!s.is_empty()).then(|| std::sync::Arc::from(s)))
    }
}

impl From<String> for TopicName {
    fn from(s: String) -> Self {
        TopicName((!s.is_empty()).then(|| std::sync::Arc::from(s)))
    }
}

impl From<&String> for TopicName {
    fn from(s: &String) -> Self {
        TopicName::from(s.as_str())
    }
}

impl From<std::sync::Arc<str>> for TopicName {
    fn from(s: std::sync::Arc<str>) -> Self {
        TopicName::of(s)
    }
}

impl From<&Topic> for TopicName {
    fn from(t: &Topic) -> Self {
        TopicName::of(t.shared().clone())
    }
}

impl From<TopicName> for String {
    fn from(t: TopicName) -> Self {
        t.as_str().to_owned()
    }
}

impl PartialEq<str> for TopicName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for TopicName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for TopicName {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<TopicName> for str {
    fn eq(&self, other: &TopicName) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<TopicName> for &str {
    fn eq(&self, other: &TopicName) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<TopicName> for String {
    fn eq(&self, other: &TopicName) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for TopicName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TopicName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d).map(TopicName::from)
    }
}

/// Hands the messages of one topic one shared [`TopicName`]: a binding keeps one per
/// subscription and asks it for the topic of each message it receives (up to 4,096 distinct
/// topics are remembered; then it starts over). A topic that arrives as bytes is checked for
/// UTF-8 only the first time ([`TopicNames::get_utf8`]).
///
/// ```
/// let mut names = ampybus::envelope::TopicNames::default();
/// let a = names.get("ampy.dev.ticks.v1.trade.XNAS.AAPL");
/// let b = names.get("ampy.dev.ticks.v1.trade.XNAS.AAPL");
/// assert!(a.same(&b));
/// let c = names.get_utf8(b"ampy.dev.ticks.v1.trade.XNAS.AAPL").unwrap();
/// assert!(a.same(&c));
/// assert!(names.get_utf8(b"ampy.dev.\xff").is_err());
/// ```
#[derive(Debug, Clone)]
pub struct TopicNames {
    last: Option<TopicName>,
    seen: crate::fasthash::FastSet<ByBytes>,
}

/// A remembered name, found by its bytes (so that bytes from the wire are looked up before
/// they are checked for UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ByBytes(TopicName);

impl std::hash::Hash for ByBytes {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_bytes().hash(state)
    }
}

impl std::borrow::Borrow<[u8]> for ByBytes {
    fn borrow(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl Default for TopicNames {
    fn default() -> Self {
        TopicNames {
            last: None,
            seen: crate::fasthash::FastSet::with_hasher(crate::fasthash::FastHash::new()),
        }
    }
}

impl TopicNames {
    /// Distinct topics remembered before the set starts over.
    const MAX: usize = 4096;

    /// The shared name of `topic`.
    pub fn get(&mut self, topic: &str) -> TopicName {
        match self.known(topic.as_bytes()) {
            Some(name) => name,
            None => self.remember(topic),
        }
    }

    /// The shared name of a topic received as bytes; an error when they are not UTF-8. Bytes
    /// met before are not checked again.
    pub fn get_utf8(
        &mut self,
        topic: &[u8],
    ) -> std::result::Result<TopicName, std::str::Utf8Error> {
        match self.known(topic) {
            Some(name) => Ok(name),
            None => Ok(self.remember(std::str::from_utf8(topic)?)),
        }
    }

    /// The remembered name with these bytes. `last` is the newest name remembered, not the
    /// last one asked for: a subscription on one topic finds it by one comparison, and a hit
    /// in the set writes nothing (moving `last` cost a reference count up and one down, on a
    /// text the consumer's other threads are counting too).
    fn known(&self, topic: &[u8]) -> Option<TopicName> {
        if let Some(last) = &self.last
            && last.as_bytes() == topic
        {
            return Some(last.clone());
        }
        Some(self.seen.get(topic)?.0.clone())
    }

    /// A new shared name for `topic`, remembered.
    fn remember(&mut self, topic: &str) -> TopicName {
        if self.seen.len() >= Self::MAX {
            self.seen.clear();
        }
        let name = TopicName::from(topic);
        self.seen.insert(ByBytes(name.clone()));
        self.last = Some(name.clone());
        name
    }
}

/// Looks up payload schemas by `schema_fqdn` to show payloads as JSON. Implemented by
/// `ampybus-proto` for the domain schemas; the core never depends on them.
///
/// ```
/// struct NoSchemas;
/// impl ampybus::PayloadDecoder for NoSchemas {
///     fn decode_json(&self, _fqdn: &str, _bytes: &[u8]) -> Option<Result<serde_json::Value, String>> { None }
/// }
/// use ampybus::PayloadDecoder as _;
/// assert!(NoSchemas.decode_json("ampy.bars.v1.BarBatch", b"").is_none());
/// ```
pub trait PayloadDecoder: Send + Sync {
    /// `None` when the schema is unknown; `Some(Err)` when the bytes do not decode as it.
    fn decode_json(
        &self,
        fqdn: &str,
        bytes: &[u8],
    ) -> Option<std::result::Result<serde_json::Value, String>>;
}

/// The JSON diagnostic form of an envelope. Key order on output: `topic`, `headers`,
/// `payload_base64`, then `payload_json` when the schema is known and the payload decodes.
///
/// `payload_base64` holds the bytes as carried (gzip-compressed when `content_encoding=gzip`);
/// `payload_json` is informational (the inflated, decoded payload).
///
/// ```
/// let j: ampybus::EnvelopeJson = serde_json::from_str(
///     r#"{"topic":"ampy.dev.news.v1.raw","headers":{},"payload_base64":""}"#).unwrap();
/// assert_eq!(j.topic, "ampy.dev.news.v1.raw");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeJson {
    /// The topic.
    pub topic: String,
    /// The headers; every value is a string.
    pub headers: BTreeMap<String, String>,
    /// Standard base64 of the payload bytes as carried.
    pub payload_base64: String,
    /// The decoded payload, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_json: Option<serde_json::Value>,
}

impl Envelope {
    /// Builds an envelope.
    pub fn new(topic: &Topic, headers: Headers, payload: impl Into<Bytes>) -> Self {
        Envelope {
            topic: TopicName::from(topic),
            headers,
            payload: payload.into(),
        }
    }

    /// Parses the topic.
    ///
    /// ```
    /// # use ampybus::{Envelope, Headers};
    /// let env = Envelope { topic: "ampy.prod.fx.v1.rates".into(), headers: Headers::new(), payload: Default::default() };
    /// assert_eq!(env.topic().unwrap().domain(), ampybus::Domain::Fx);
    /// ```
    pub fn topic(&self) -> Result<Topic> {
        Topic::parse(&self.topic)
    }

    /// Checks the topic and every publish-side header rule, plus payload consistency (a
    /// pointer envelope carries no inline payload). Returns the parsed topic.
    pub fn validate_for_publish(&self) -> Result<Topic> {
        let topic = self.topic()?;
        self.headers.validate_for_publish(&topic)?;
        if self.headers.blob_ref().is_some() && !self.payload.is_empty() {
            return Err(Error::envelope(
                "`blob_ref` is set, so the inline payload must be empty",
            ));
        }
        Ok(topic)
    }

    /// The JSON form as a value. With a decoder, `payload_json` is added when the schema is
    /// known and the (inflated) payload decodes.
    pub fn to_json(&self, decoder: Option<&dyn PayloadDecoder>) -> EnvelopeJson {
        let payload_json = decoder.and_then(|d| {
            let fqdn = self.headers.schema_fqdn()?;
            if self.headers.blob_ref().is_some() {
                return None;
            }
            let raw = crate::codec::gzip::inflate_if_needed(
                &self.headers,
                &self.payload,
                crate::codec::gzip::DEFAULT_MAX_INFLATED,
            )
            .ok()?;
            d.decode_json(fqdn, &raw)?.ok()
        });
        EnvelopeJson {
            topic: self.topic.to_string(),
            headers: self.headers.to_map(),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&self.payload),
            payload_json,
        }
    }

    /// One line of JSON (no trailing newline), as `ampybus sub --json` prints.
    pub fn to_json_line(&self, decoder: Option<&dyn PayloadDecoder>) -> String {
        serde_json::to_string(&self.to_json(decoder)).expect("envelope JSON serialises")
    }

    /// Pretty JSON with a trailing newline, as golden files are written.
    pub fn to_json_pretty(&self, decoder: Option<&dyn PayloadDecoder>) -> String {
        let mut s =
            serde_json::to_string_pretty(&self.to_json(decoder)).expect("envelope JSON serialises");
        s.push('\n');
        s
    }

    /// Parses the JSON form. Errors name the field (`topic`, `headers.<name>`,
    /// `payload_base64`) and the rule. Only the shape is checked here: call
    /// [`Envelope::validate_for_publish`] for the contract rules.
    ///
    /// ```
    /// let err = ampybus::Envelope::from_json_str(r#"{"topic":"t","headers":{"a":1},"payload_base64":""}"#).unwrap_err();
    /// assert!(err.to_string().contains("headers.a"), "{err}");
    /// ```
    pub fn from_json_str(s: &str) -> Result<Envelope> {
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|e| Error::envelope(format!("not valid JSON: {e}")))?;
        Envelope::from_json_value(&v)
    }

    /// Like [`Envelope::from_json_str`], from a parsed value.
    pub fn from_json_value(v: &serde_json::Value) -> Result<Envelope> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::envelope("must be a JSON object"))?;
        for k in obj.keys() {
            if !matches!(
                k.as_str(),
                "topic" | "headers" | "payload_base64" | "payload_json"
            ) {
                return Err(Error::envelope(format!(
                    "unknown field `{k}` (expected topic, headers, payload_base64, payload_json)"
                )));
            }
        }
        let topic = match obj.get("topic") {
            Some(serde_json::Value::String(t)) => t.clone(),
            Some(_) => return Err(Error::envelope("field `topic` must be a string")),
            None => return Err(Error::envelope("missing field `topic`")),
        };
        let mut headers = Headers::new();
        match obj.get("headers") {
            Some(serde_json::Value::Object(m)) => {
                for (k, v) in m {
                    match v {
                        serde_json::Value::String(s) => {
                            headers.set(k.clone(), s.clone());
                        }
                        _ => {
                            return Err(Error::envelope(format!(
                                "field `headers.{k}` must be a string (header values are strings on every transport)"
                            )));
                        }
                    }
                }
            }
            Some(_) => {
                return Err(Error::envelope(
                    "field `headers` must be an object of strings",
                ));
            }
            None => return Err(Error::envelope("missing field `headers`")),
        }
        let payload = match obj.get("payload_base64") {
            Some(serde_json::Value::String(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| {
                    Error::envelope(format!(
                        "field `payload_base64` is not standard base64: {e}"
                    ))
                })?,
            Some(serde_json::Value::Null) | None => Vec::new(),
            Some(_) => return Err(Error::envelope("field `payload_base64` must be a string")),
        };
        Ok(Envelope {
            topic: topic.into(),
            headers,
            payload: Bytes::from(payload),
        })
    }
}
