//! What Python sees of a message: [`PyHeaders`] (a read-only mapping with typed accessors),
//! [`PyMessage`] (a delivery to settle with `ack`/`retry`/`dead_letter`), [`PyStored`] (a
//! stored message read back, e.g. from the DLQ) and [`Receipt`] (what a publish returns).

use crate::errors::{ClosedError, new_err};
use ampybus::headers::names;
use ampybus::runtime::{Message, Outcome};
use ampybus::{ErrorKind, Headers};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyType};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Where a [`Ticket`] sends its message's outcome: the consumer that handed the message to
/// Python (`consumer::Inbox`), so that this module needs nothing of the consumer's.
pub trait Returns: Send + Sync {
    /// Queues `outcome` for the runtime; `Err` when the consumer is gone (message released).
    fn queue(&self, tx: oneshot::Sender<Outcome>, outcome: Outcome) -> Result<(), Outcome>;
    /// The message is no longer held by Python.
    fn release(&self);
}

/// The way back for one message's outcome, held by the Python `Message`; counted while it
/// lives, so that a close can wait for Python to settle what it holds.
pub struct Ticket {
    reply: Option<oneshot::Sender<Outcome>>,
    back: Arc<dyn Returns>,
}

impl Ticket {
    /// A ticket that answers `reply` through `back`.
    pub fn new(reply: oneshot::Sender<Outcome>, back: Arc<dyn Returns>) -> Ticket {
        Ticket {
            reply: Some(reply),
            back,
        }
    }

    /// Queues `outcome` for the runtime; `Err` when the consumer is gone (message released).
    pub fn send(mut self, outcome: Outcome) -> Result<(), Outcome> {
        match self.reply.take() {
            Some(tx) => self.back.queue(tx, outcome),
            None => Err(outcome),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.back.release();
    }
}

/// An awaitable that is already done (its `await` returns `None` at once): what `ack`,
/// `retry` and `dead_letter` return, since handing the outcome to the runtime never waits.
#[pyclass(module = "ampybus._native", frozen)]
pub struct Ready;

#[pymethods]
impl Ready {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self) -> Option<()> {
        None
    }
}

/// Message headers: a read-only mapping of wire name to value, with typed accessors.
#[pyclass(module = "ampybus._native", name = "Headers", frozen, mapping)]
pub struct PyHeaders {
    inner: Headers,
}

impl PyHeaders {
    /// Wraps a header map.
    pub fn new(inner: Headers) -> PyHeaders {
        PyHeaders { inner }
    }
}

#[pymethods]
impl PyHeaders {
    fn __getitem__(&self, name: &str) -> PyResult<String> {
        self.inner
            .get(name)
            .map(str::to_owned)
            .ok_or_else(|| PyKeyError::new_err(name.to_owned()))
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, name: &Bound<'_, PyAny>) -> bool {
        name.extract::<String>()
            .is_ok_and(|n| self.inner.get(&n).is_some())
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PyList::new(py, self.inner.iter().map(|(k, _)| k))?
            .try_iter()
            .map(Bound::into_any)
    }

    fn __repr__(&self) -> String {
        let items: Vec<String> = self
            .inner
            .iter()
            .map(|(k, v)| format!("{k:?}: {v:?}"))
            .collect();
        format!("Headers({{{}}})", items.join(", "))
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        if let Ok(o) = other.cast::<PyHeaders>() {
            return o.get().inner == self.inner;
        }
        match other.cast::<PyDict>() {
            Ok(d) => {
                d.len() == self.inner.len()
                    && self.inner.iter().all(|(k, v)| {
                        d.get_item(k)
                            .ok()
                            .flatten()
                            .and_then(|x| x.extract::<String>().ok())
                            .is_some_and(|x| x == v)
                    })
            }
            Err(_) => false,
        }
    }

    /// The value of header `name`, or `default` when absent.
    #[pyo3(signature = (name, default=None))]
    fn get(&self, py: Python<'_>, name: &str, default: Option<Py<PyAny>>) -> Py<PyAny> {
        match self.inner.get(name) {
            Some(v) => v
                .into_pyobject(py)
                .map(|s| s.into_any().unbind())
                .unwrap_or_else(|_| py.None()),
            None => default.unwrap_or_else(|| py.None()),
        }
    }

    /// Header names, in name order.
    fn keys(&self) -> Vec<String> {
        self.inner.iter().map(|(k, _)| k.to_owned()).collect()
    }

    /// Header values, in name order.
    fn values(&self) -> Vec<String> {
        self.inner.iter().map(|(_, v)| v.to_owned()).collect()
    }

    /// `(name, value)` pairs, in name order.
    fn items(&self) -> Vec<(String, String)> {
        self.inner
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// A plain `dict` copy.
    fn to_dict(&self) -> std::collections::BTreeMap<String, String> {
        self.inner.to_map()
    }

    /// `message_id` (a UUID; v7 when published by ampybus).
    #[getter]
    fn message_id(&self) -> Option<&str> {
        self.inner.message_id()
    }

    /// `schema_fqdn`, e.g. `ampy.bars.v1.BarBatch`.
    #[getter]
    fn schema_fqdn(&self) -> Option<&str> {
        self.inner.schema_fqdn()
    }

    /// `schema_version` (semver).
    #[getter]
    fn schema_version(&self) -> Option<&str> {
        self.inner.schema_version()
    }

    /// `content_type`.
    #[getter]
    fn content_type(&self) -> Option<&str> {
        self.inner.content_type()
    }

    /// `content_encoding` as carried (`gzip` or absent).
    #[getter]
    fn content_encoding(&self) -> Option<&str> {
        self.inner.content_encoding()
    }

    /// `produced_at` as a timezone-aware UTC `datetime`.
    #[getter]
    fn produced_at(&self) -> Option<DateTime<Utc>> {
        self.inner.produced_at_time()
    }

    /// `producer`.
    #[getter]
    fn producer(&self) -> Option<&str> {
        self.inner.producer()
    }

    /// `source`.
    #[getter]
    fn source(&self) -> Option<&str> {
        self.inner.source()
    }

    /// `run_id`.
    #[getter]
    fn run_id(&self) -> Option<&str> {
        self.inner.run_id()
    }

    /// `partition_key`.
    #[getter]
    fn partition_key(&self) -> Option<&str> {
        self.inner.partition_key()
    }

    /// `dedupe_key`.
    #[getter]
    fn dedupe_key(&self) -> Option<&str> {
        self.inner.dedupe_key()
    }

    /// `traceparent` (W3C).
    #[getter]
    fn traceparent(&self) -> Option<&str> {
        self.inner.traceparent()
    }

    /// The trace id (from `traceparent`, else `trace_id`); `None` when absent or all-zero.
    #[getter]
    fn trace_id(&self) -> Option<String> {
        self.inner.trace_context().map(|t| t.trace_id)
    }

    /// `retry_count` as an `int` (0 when absent; `None` when not a number).
    #[getter]
    fn retry_count(&self) -> Option<u32> {
        self.inner.retry_count()
    }

    /// `dlq_reason` (`code: detail`).
    #[getter]
    fn dlq_reason(&self) -> Option<&str> {
        self.inner.dlq_reason()
    }

    /// `original_topic` (DLQ and redriven messages).
    #[getter]
    fn original_topic(&self) -> Option<&str> {
        self.inner.original_topic()
    }

    /// `redrive_of`: the message id a redrive republished.
    #[getter]
    fn redrive_of(&self) -> Option<&str> {
        self.inner.redrive_of()
    }

    /// `blob_size` as an `int`, when the payload travelled as a blob.
    #[getter]
    fn blob_size(&self) -> Option<u64> {
        self.inner.blob_size()
    }
}

/// Decodes `payload` as the protobuf class `cls` after checking `schema_fqdn` against the
/// class's descriptor; errors are `PayloadError`s naming both.
fn decode_as<'py>(
    py: Python<'py>,
    headers: &Headers,
    payload: &[u8],
    cls: &Bound<'py, PyType>,
) -> PyResult<Bound<'py, PyAny>> {
    let want: String = cls
        .getattr("DESCRIPTOR")
        .and_then(|d| d.getattr("full_name"))
        .and_then(|n| n.extract())
        .map_err(|_| {
            PyTypeError::new_err(
                "decode: expected a google.protobuf message class (with DESCRIPTOR)",
            )
        })?;
    let got = headers.schema_fqdn().unwrap_or_default();
    if got != want {
        return Err(new_err(
            ErrorKind::Payload,
            format!("decode: `schema_fqdn` is {got:?}, not {want:?} (the class asked for)"),
        ));
    }
    cls.call_method1("FromString", (PyBytes::new(py, payload),))
        .map_err(|e| {
            new_err(
                ErrorKind::Payload,
                format!("decode: the payload does not decode as {want}: {e}"),
            )
        })
}

/// A delivered message. Settle it once with `ack()`, `retry(delay)` or `dead_letter(reason)`.
#[pyclass(module = "ampybus._native", name = "Message", frozen)]
pub struct PyMessage {
    msg: Message,
    /// The way back while unsettled, and how it was settled (one lock for both).
    state: Mutex<Settle>,
    headers: PyOnceLock<Py<PyHeaders>>,
    payload: PyOnceLock<Py<PyBytes>>,
}

impl PyMessage {
    /// The runtime's message.
    pub fn message(&self) -> &Message {
        &self.msg
    }

    /// A message whose outcome goes to `reply`.
    pub fn new(msg: Message, reply: Ticket) -> PyMessage {
        PyMessage {
            msg,
            state: Mutex::new(Settle {
                reply: Some(reply),
                how: None,
            }),
            headers: PyOnceLock::new(),
            payload: PyOnceLock::new(),
        }
    }

    fn id(&self) -> &str {
        self.msg.headers.message_id().unwrap_or("-")
    }

    fn settle(&self, outcome: Outcome, what: &'static str) -> PyResult<Ready> {
        let tx = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match st.reply.take() {
                Some(tx) => {
                    st.how = Some(what);
                    tx
                }
                None => {
                    let prev = st.how.unwrap_or("released");
                    drop(st);
                    return Err(PyRuntimeError::new_err(format!(
                        "message {}: already settled ({prev}); settle a message once",
                        self.id()
                    )));
                }
            }
        };
        tx.send(outcome).map_err(|_| {
            ClosedError::new_err(format!(
                "closed: message {}: the subscription stopped before it was settled; it is delivered again",
                self.id()
            ))
        })?;
        Ok(Ready)
    }
}

/// A delivery's settlement: the ticket while unsettled, then how it was settled.
struct Settle {
    reply: Option<Ticket>,
    how: Option<&'static str>,
}

#[pymethods]
impl PyMessage {
    /// The concrete topic.
    #[getter]
    fn topic(&self) -> &str {
        self.msg.topic.as_str()
    }

    /// The headers (normalised on consume), a read-only mapping.
    #[getter]
    fn headers(&self, py: Python<'_>) -> PyResult<Py<PyHeaders>> {
        self.headers
            .get_or_try_init(py, || Py::new(py, PyHeaders::new(self.msg.headers.clone())))
            .map(|h| h.clone_ref(py))
    }

    /// The raw payload (`bytes`): inflated, blob fetched and verified.
    #[getter]
    fn payload(&self, py: Python<'_>) -> Py<PyBytes> {
        self.payload
            .get_or_init(py, || PyBytes::new(py, &self.msg.payload).unbind())
            .clone_ref(py)
    }

    /// `message_id`.
    #[getter]
    fn message_id(&self) -> Option<&str> {
        self.msg.headers.message_id()
    }

    /// `partition_key`.
    #[getter]
    fn partition_key(&self) -> Option<&str> {
        self.msg.headers.partition_key()
    }

    /// How many times this message was delivered (1 the first time).
    #[getter]
    fn delivery_count(&self) -> u32 {
        self.msg.info.delivery_count
    }

    /// Position in the log or stream.
    #[getter]
    fn sequence(&self) -> u64 {
        self.msg.info.sequence
    }

    /// When the log or broker stored it (UTC).
    #[getter]
    fn stored_at(&self) -> DateTime<Utc> {
        self.msg.info.stored_at
    }

    /// How it was settled: `"ack"`, `"retry"`, `"dead_letter"`, or `None` while unsettled.
    #[getter]
    fn settled(&self) -> Option<&'static str> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).how
    }

    /// Done: the runtime acks it (in batches) and records it for dedupe.
    fn ack(&self) -> PyResult<Ready> {
        self.settle(Outcome::Ok, "ack")
    }

    /// Try again after `delay` seconds, or after the retry policy's backoff when `None`;
    /// after the policy's last attempt it is dead-lettered (`max_retries`), with `cause` (why
    /// this attempt failed) in the reason when given: `max_retries: attempt N: <cause>`.
    #[pyo3(signature = (delay=None, cause=None))]
    fn retry(&self, delay: Option<f64>, cause: Option<String>) -> PyResult<Ready> {
        let after = match delay {
            None => None,
            Some(d) if d.is_finite() && d >= 0.0 => Some(Duration::from_secs_f64(d)),
            Some(d) => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "retry: `delay` must be a finite number of seconds >= 0, got {d}"
                )));
            }
        };
        let outcome = match cause {
            Some(cause) => Outcome::Failed { after, cause },
            None => Outcome::Retry { after },
        };
        self.settle(outcome, "retry")
    }

    /// Poison: dead-letter it now. `reason` is kept as is when written `code: detail` with a
    /// known code, else it becomes `handler_error: <reason>`.
    fn dead_letter(&self, reason: String) -> PyResult<Ready> {
        self.settle(Outcome::DeadLetter(reason), "dead_letter")
    }

    /// Gives the message back unsettled (what garbage collection of an unsettled message does).
    fn _release(&self) {
        let ticket = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reply
            .take();
        drop(ticket);
    }

    /// Decodes the payload as the protobuf class `cls` (its descriptor's full name must be
    /// this message's `schema_fqdn`).
    fn decode<'py>(
        &self,
        py: Python<'py>,
        cls: &Bound<'py, PyType>,
    ) -> PyResult<Bound<'py, PyAny>> {
        decode_as(py, &self.msg.headers, &self.msg.payload, cls)
    }

    fn __repr__(&self) -> String {
        format!(
            "Message(topic={:?}, message_id={:?}, partition_key={:?}, payload=<{} bytes>, delivery_count={})",
            self.msg.topic.as_str(),
            self.id(),
            self.msg.headers.partition_key().unwrap_or(""),
            self.msg.payload.len(),
            self.msg.info.delivery_count
        )
    }
}

/// A stored message read back by `read` or `dlq.inspect` (not a delivery: nothing to settle).
#[pyclass(module = "ampybus._native", name = "StoredMessage", frozen)]
pub struct PyStored {
    topic: String,
    headers: Headers,
    payload: Bytes,
    sequence: u64,
    stored_at: DateTime<Utc>,
    header_obj: PyOnceLock<Py<PyHeaders>>,
}

impl PyStored {
    /// Wraps a stored message.
    pub fn new(m: ampybus::transport::StoredMessage) -> PyStored {
        PyStored {
            topic: m.envelope.topic.to_string(),
            headers: m.envelope.headers,
            payload: m.envelope.payload,
            sequence: m.sequence,
            stored_at: m.stored_at,
            header_obj: PyOnceLock::new(),
        }
    }
}

#[pymethods]
impl PyStored {
    /// The topic it is stored under.
    #[getter]
    fn topic(&self) -> &str {
        &self.topic
    }

    /// The headers as carried.
    #[getter]
    fn headers(&self, py: Python<'_>) -> PyResult<Py<PyHeaders>> {
        self.header_obj
            .get_or_try_init(py, || Py::new(py, PyHeaders::new(self.headers.clone())))
            .map(|h| h.clone_ref(py))
    }

    /// The payload bytes as carried (gzip and blob pointers are not undone).
    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.payload)
    }

    /// Position in the log or stream.
    #[getter]
    fn sequence(&self) -> u64 {
        self.sequence
    }

    /// When it was stored (UTC).
    #[getter]
    fn stored_at(&self) -> DateTime<Utc> {
        self.stored_at
    }

    /// `message_id`.
    #[getter]
    fn message_id(&self) -> Option<&str> {
        self.headers.message_id()
    }

    /// `dlq_reason` (`code: detail`), on DLQ messages.
    #[getter]
    fn dlq_reason(&self) -> Option<&str> {
        self.headers.dlq_reason()
    }

    /// The code of `dlq_reason` (`max_retries`, `handler_error`, …), on DLQ messages.
    #[getter]
    fn dlq_code(&self) -> Option<&str> {
        self.headers
            .dlq_reason()
            .map(|r| r.split_once(':').map_or(r, |(c, _)| c).trim())
    }

    /// `original_topic`, on DLQ messages.
    #[getter]
    fn original_topic(&self) -> Option<&str> {
        self.headers
            .original_topic()
            .or_else(|| self.headers.get(ampybus::runtime::ORIGINAL_TOPIC_RAW))
    }

    /// The `message_id` of the message that was dead-lettered (DLQ copies get a new id).
    #[getter]
    fn original_message_id(&self) -> Option<&str> {
        self.headers.get(ampybus::runtime::ORIGINAL_MESSAGE_ID)
    }

    /// Decodes the payload as the protobuf class `cls` (see `Message.decode`).
    fn decode<'py>(
        &self,
        py: Python<'py>,
        cls: &Bound<'py, PyType>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.headers.get(names::CONTENT_ENCODING).is_some() || self.headers.blob_ref().is_some()
        {
            return Err(new_err(
                ErrorKind::Payload,
                "decode: a stored gzip or blob payload is not decoded here; consume it instead",
            ));
        }
        decode_as(py, &self.headers, &self.payload, cls)
    }

    fn __repr__(&self) -> String {
        format!(
            "StoredMessage(topic={:?}, message_id={:?}, sequence={}, payload=<{} bytes>)",
            self.topic,
            self.headers.message_id().unwrap_or("-"),
            self.sequence,
            self.payload.len()
        )
    }
}

/// The `message_id` a receipt names: the 16 bytes of an id written in the canonical form
/// (every id the SDK generates; its text is written when Python reads it), or the text a
/// caller gave in another form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiptId {
    /// A lowercase, hyphenated UUID, held as its bytes.
    Uuid(uuid::Uuid),
    /// Any other text, as given.
    Text(String),
}

impl ReceiptId {
    /// The id of a message about to be published (its `message_id` filled).
    pub fn of(headers: &Headers) -> ReceiptId {
        match headers.message_uuid() {
            Some(u) => ReceiptId::Uuid(u),
            None => ReceiptId::Text(headers.message_id().unwrap_or_default().to_owned()),
        }
    }

    /// The text: a UUID held as bytes is written into `buf`.
    fn text<'a>(&'a self, buf: &'a mut [u8; 36]) -> &'a str {
        match self {
            ReceiptId::Uuid(u) => u.hyphenated().encode_lower(buf),
            ReceiptId::Text(t) => t,
        }
    }
}

/// What a publish returns. (A free list keeps the objects of dropped receipts for the next
/// batch: a `publish_batch` of 1,000 messages would otherwise allocate, and count towards
/// Python's garbage collection, 1,000 new objects per call. The id is held as 16 bytes and
/// written as text only when read.)
#[pyclass(module = "ampybus._native", frozen, freelist = 4096)]
pub struct Receipt {
    /// The `message_id` it was published with.
    pub id: ReceiptId,
    /// Position in the log or stream.
    #[pyo3(get)]
    pub sequence: u64,
    /// The broker recognised the message id as a duplicate and did not store it again.
    #[pyo3(get)]
    pub duplicate: bool,
}

#[pymethods]
impl Receipt {
    /// The `message_id` it was published with.
    #[getter]
    fn message_id<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        let mut buf = [0u8; 36];
        PyString::new(py, self.id.text(&mut buf))
    }

    fn __repr__(&self) -> String {
        let mut buf = [0u8; 36];
        format!(
            "Receipt(message_id={:?}, sequence={}, duplicate={})",
            self.id.text(&mut buf),
            self.sequence,
            if self.duplicate { "True" } else { "False" }
        )
    }
}
