//! [`NativeBus`]: the Rust [`ampybus::Bus`] seen from Python (wrapped by `ampybus.Bus`).
//! Every method that talks to the log or a broker returns an asyncio awaitable; the Rust side
//! runs on the tokio runtime of `pyo3-async-runtimes` without the GIL.

use crate::completer::{Completer, Future, Shared, Value};
use crate::consumer::{self, ConsumerOptions, NativeConsumer};
use crate::errors::{OrRaise, new_err};
use crate::message::{PyStored, Receipt, ReceiptId};
use ampybus::headers::names;
use ampybus::transport::{StoredMessage, WindowQuery};
use ampybus::{Bus, Domain, Envelope, ErrorKind, Headers, Topic, TopicPattern};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// Connects to the bus at `url` (see the README's URL forms); an awaitable of [`NativeBus`].
/// `registry` (a registry file) is enforced on the handle, `service` names the consuming
/// service (see `Bus::with_registry`, `Bus::with_service`).
#[pyfunction]
#[pyo3(signature = (url, observability=true, service=None, registry=None))]
pub fn connect(
    py: Python<'_>,
    url: String,
    observability: bool,
    service: Option<String>,
    registry: Option<String>,
) -> PyResult<Bound<'_, PyAny>> {
    crate::aio::future_into_py(py, async move {
        let reg = registry
            .map(|p| ampybus::registry::Registry::load(std::path::Path::new(&p)))
            .transpose()
            .map_err(ampybus::Error::from)
            .or_raise()?;
        // With a registry, the binding also applies its retention where it creates storage.
        let mut bus = match reg {
            Some(r) => Bus::connect_with_registry(&url, r).await.or_raise()?,
            None => Bus::connect(&url).await.or_raise()?,
        };
        if let Some(s) = &service {
            bus = bus.with_service(s);
        }
        Ok(NativeBus {
            bus: bus.with_observability(observability),
            publisher: OnceLock::new(),
            coalesced: Arc::default(),
        })
    })
}

/// A connection to the bus.
#[pyclass(module = "ampybus._native", frozen)]
pub struct NativeBus {
    bus: Bus,
    /// The queue of the publisher task (started by the first `publish`).
    publisher: OnceLock<mpsc::UnboundedSender<PublishReq>>,
    /// What the publisher task did: messages taken, largest batch.
    coalesced: Arc<PublisherStats>,
}

/// Counts of a bus's publisher task (for the tests: did concurrent publishes coalesce?).
#[derive(Default)]
struct PublisherStats {
    sent: AtomicU64,
    largest: AtomicU64,
}

/// Headers from a Python `dict` of strings, laid over `base` when given.
pub(crate) fn headers_from_dict(
    d: &Bound<'_, PyDict>,
    base: Option<&Headers>,
) -> PyResult<Headers> {
    let mut h = base.cloned().unwrap_or_default();
    for (k, v) in d.iter() {
        let k = k.cast_into::<PyString>()?;
        let v = v.cast_into::<PyString>()?;
        h.set(&*k.to_cow()?, v.to_cow()?);
    }
    Ok(h)
}

/// The handler of `_bench_consume`: counts, notes the first and the `n`-th call.
struct CountingHandler {
    n: u64,
    seen: AtomicU64,
    first: OnceLock<std::time::Instant>,
    last: OnceLock<std::time::Instant>,
    done: tokio::sync::Notify,
}

/// [`CountingHandler`] shared with the benchmark that reads it.
struct SharedHandler(Arc<CountingHandler>);

#[async_trait::async_trait]
impl ampybus::runtime::Handler for SharedHandler {
    async fn handle(&self, _msg: &ampybus::runtime::Message) -> ampybus::runtime::Outcome {
        let c = &self.0;
        let k = c.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if k == 1 {
            let _ = c.first.set(std::time::Instant::now());
        }
        if k == c.n {
            let _ = c.last.set(std::time::Instant::now());
            c.done.notify_one();
        }
        ampybus::runtime::Outcome::Ok
    }
}

/// One `bus.publish` on its way to the publisher task.
struct PublishReq {
    topic: String,
    headers: Headers,
    payload: Bytes,
    fut: Future,
    done: Arc<Shared>,
}

/// Most messages the publisher task sends as one batch.
const MAX_COALESCED: usize = 1024;

/// The publisher task of a bus: publishes whatever accumulated in its queue as one batch, in
/// order, one batch at a time.
async fn run_publisher(
    bus: Bus,
    mut rx: mpsc::UnboundedReceiver<PublishReq>,
    stats: Arc<PublisherStats>,
) {
    let mut buf = Vec::with_capacity(MAX_COALESCED);
    while rx.recv_many(&mut buf, MAX_COALESCED).await > 0 {
        let n = buf.len() as u64;
        stats.sent.fetch_add(n, Ordering::Relaxed);
        stats.largest.fetch_max(n, Ordering::Relaxed);
        publish_coalesced(&bus, &mut buf).await;
    }
}

/// `message N: ` as the core prefixes a batch member's error, removed (the caller published
/// one message).
fn unprefixed(e: &ampybus::Error) -> ampybus::Error {
    let m = e.message();
    let rest = m
        .strip_prefix("message ")
        .and_then(|r| r.split_once(": "))
        .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .map_or(m, |(_, r)| r);
    ampybus::Error::new(e.kind(), rest.to_owned())
}

/// Publishes the requests in `reqs` (emptied) as one batch and resolves each one's future.
async fn publish_coalesced(bus: &Bus, reqs: &mut Vec<PublishReq>) {
    let mut envs = Vec::with_capacity(reqs.len());
    let mut waiting = Vec::with_capacity(reqs.len());
    let mut failed = Vec::new();
    let mut last: Option<Topic> = None;
    // A lone message needs no separate check: the core's error is its own.
    let alone = reqs.len() == 1;
    for mut r in reqs.drain(..) {
        // Each message is checked here, on its own: an invalid one fails only its caller.
        let checked = if alone {
            Ok(())
        } else {
            let topic = match last.take() {
                Some(t) if t.as_str() == r.topic => Ok(t),
                _ => Topic::parse(&r.topic),
            };
            topic.and_then(|t| {
                r.headers.fill_publish_defaults();
                r.headers.validate_for_publish(&t)?;
                last = Some(t);
                Ok(())
            })
        };
        match checked {
            Ok(()) => {
                if alone {
                    // Filled here (the core would fill it) so that the receipt can name it.
                    r.headers.fill_publish_defaults();
                }
                let message_id = ReceiptId::of(&r.headers);
                envs.push(Envelope {
                    topic: r.topic.into(),
                    headers: r.headers,
                    payload: r.payload,
                });
                waiting.push((r.fut, r.done, message_id));
            }
            Err(e) => failed.push((r.fut, r.done, e)),
        }
    }
    for (fut, done, e) in failed {
        done.push(fut, Value::Error(e));
    }
    if envs.is_empty() {
        return;
    }
    let out = bus.publish_batch_outcomes(envs).await;
    let mut results = Vec::with_capacity(waiting.len());
    for ((fut, done, message_id), o) in waiting.into_iter().zip(out.outcomes) {
        let value = match (o.receipt(), &out.error) {
            (Some(r), _) => Value::Receipt(Receipt {
                id: message_id,
                sequence: r.sequence,
                duplicate: r.duplicate,
            }),
            (None, Some(e)) => Value::Error(unprefixed(e)),
            (None, None) => Value::Error(ampybus::Error::new(
                ErrorKind::Transport,
                "publish: the transport returned no receipt",
            )),
        };
        results.push((done, fut, value));
    }
    // One push (at most one wake-up) per run of the same event loop.
    let mut it = results.into_iter().peekable();
    while let Some((done, fut, value)) = it.next() {
        let mut run = vec![(fut, value)];
        while let Some((_, f, v)) = it.next_if(|(d, _, _)| Arc::ptr_eq(d, &done)) {
            run.push((f, v));
        }
        done.push_many(run);
    }
}

fn parse_time(what: &str, v: &str) -> PyResult<DateTime<Utc>> {
    ampybus::ids::parse_time(v.trim()).ok_or_else(|| {
        new_err(
            ErrorKind::Config,
            format!("{what}: {v:?} is not an RFC3339 time with offset (e.g. 2025-09-05T13:30:00Z)"),
        )
    })
}

fn opt_time(what: &str, v: Option<String>) -> PyResult<Option<DateTime<Utc>>> {
    v.map(|s| parse_time(what, &s)).transpose()
}

fn secs(what: &str, v: f64) -> PyResult<Duration> {
    if v.is_finite() && v >= 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{what}: must be a finite number of seconds >= 0, got {v}"
        )))
    }
}

/// Every stored message matching `q`, page by page.
async fn read_all(
    bus: &Bus,
    mut q: WindowQuery,
    max: Option<usize>,
) -> ampybus::Result<Vec<StoredMessage>> {
    let reader = bus.replay().ok_or_else(|| {
        ampybus::Error::new(
            ErrorKind::Config,
            format!(
                "read: the {} transport cannot read stored messages",
                bus.transport().name()
            ),
        )
    })?;
    let mut out = Vec::new();
    loop {
        if let Some(m) = max {
            if out.len() >= m {
                out.truncate(m);
                break;
            }
            q.limit = (m - out.len()).min(1000);
        }
        let page = reader.read_page(&q).await?;
        if page.messages.is_empty() {
            break;
        }
        q.cursor = Some(page.next);
        out.extend(page.messages);
    }
    Ok(out)
}

/// DLQ messages under `pattern` (a `dlq` domain topic), with reason code `code` if given.
async fn dlq_select(
    bus: &Bus,
    pattern: TopicPattern,
    code: Option<String>,
    since: Option<DateTime<Utc>>,
) -> ampybus::Result<Vec<StoredMessage>> {
    let mut q = WindowQuery::new(pattern.clone());
    q.start = since;
    let all = read_all(bus, q, None).await?;
    Ok(all
        .into_iter()
        .filter(|m| {
            let is_dlq = Topic::parse(&m.envelope.topic).is_ok_and(|t| t.domain() == Domain::Dlq);
            let reason = m.envelope.headers.dlq_reason().unwrap_or_default();
            let got = reason.split_once(':').map_or(reason, |(c, _)| c).trim();
            is_dlq && pattern.matches(&m.envelope.topic) && code.as_deref().is_none_or(|c| c == got)
        })
        .collect())
}

fn dlq_code(reason: Option<String>) -> PyResult<Option<String>> {
    match reason {
        None => Ok(None),
        Some(r) => {
            let code = ampybus::DlqCode::ALL
                .iter()
                .find(|c| c.as_str() == r.trim())
                .ok_or_else(|| {
                    let all: Vec<&str> = ampybus::DlqCode::ALL.iter().map(|c| c.as_str()).collect();
                    new_err(
                        ErrorKind::Config,
                        format!(
                            "dlq: `reason` {r:?} is not a DLQ reason code (one of {})",
                            all.join(", ")
                        ),
                    )
                })?;
            Ok(Some(code.as_str().to_owned()))
        }
    }
}

fn pattern(what: &str, p: &str) -> PyResult<TopicPattern> {
    TopicPattern::parse(p).map_err(|e| {
        crate::errors::kind_err(e.kind(), format!("{}: {what}: {}", e.kind(), e.message()))
    })
}

#[pymethods]
impl NativeBus {
    /// The URL, credentials removed.
    #[getter]
    fn url(&self) -> String {
        self.bus.url_redacted()
    }

    /// The transport's name (`embedded`, `nats`, `redis`, …).
    #[getter]
    fn transport(&self) -> String {
        self.bus.transport().name().to_owned()
    }

    /// Publishes one message: `fut` (an asyncio future of `completer`'s loop) gets its
    /// [`Receipt`] once the log or broker confirmed it, or the exception.
    ///
    /// The message joins the bus's publisher queue: a tokio task drains it and publishes
    /// whatever accumulated as one batch (concurrent publishes coalesce); each message is
    /// checked on its own, so an invalid one fails only its own future. Messages are sent in
    /// the order of the calls.
    fn publish(
        &self,
        topic: String,
        payload: &Bound<'_, PyBytes>,
        headers: &Bound<'_, PyDict>,
        fut: Py<PyAny>,
        completer: &Bound<'_, Completer>,
    ) -> PyResult<()> {
        let req = PublishReq {
            topic,
            headers: headers_from_dict(headers, None)?,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            fut,
            done: completer.get().shared(),
        };
        let tx = self.publisher.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            pyo3_async_runtimes::tokio::get_runtime().spawn(run_publisher(
                self.bus.clone(),
                rx,
                self.coalesced.clone(),
            ));
            tx
        });
        if let Err(mpsc::error::SendError(req)) = tx.send(req) {
            let e = ampybus::Error::new(ErrorKind::Closed, "publish: the publisher task stopped");
            req.done.push(req.fut, Value::Error(e));
        }
        Ok(())
    }

    /// Publishes `items` as one batch; every message is validated before any is sent. Each
    /// item is a tuple in `ampybus.Outgoing`'s field order — `(topic, payload: bytes,
    /// partition_key[, dedupe_key[, schema_fqdn[, headers: dict]]])`, `None` for absent — laid
    /// over `common`; `schema_fqdn` defaults to `default_schema`. `fut` gets the list of
    /// [`Receipt`]s, or the exception.
    ///
    /// With `as_given`, `items` is the caller's own list: when one of its items is not a
    /// plain `tuple` or `Outgoing` of 3 to 6 fields with a `bytes` payload and no own headers
    /// (what the SDK's Python side would first convert), nothing is sent, `fut` is left
    /// alone and the answer is `False` (convert, then call again); otherwise `True`.
    #[pyo3(signature = (items, common, default_schema, fut, completer, as_given=false))]
    fn publish_batch(
        &self,
        items: &Bound<'_, PyList>,
        common: &Bound<'_, PyDict>,
        default_schema: &str,
        fut: Py<PyAny>,
        completer: &Bound<'_, Completer>,
        as_given: bool,
    ) -> PyResult<bool> {
        static OUTGOING: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> =
            pyo3::sync::PyOnceLock::new();
        let outgoing = if as_given {
            Some(OUTGOING.import(items.py(), "ampybus._bus", "Outgoing")?)
        } else {
            None
        };
        let common = headers_from_dict(common, None)?;
        // The map every message starts from: the common headers and the default schema.
        let mut with_default_schema = common.clone();
        with_default_schema.set(names::SCHEMA_FQDN, default_schema);
        let mut batch = Vec::with_capacity(items.len());
        let mut payloads: Vec<u8> = Vec::new();
        let mut spans: Vec<(usize, usize)> = Vec::with_capacity(items.len());
        // Consecutive items usually share their topic and schema objects: read each once.
        let mut topic: Option<(Bound<'_, PyAny>, ampybus::TopicName)> = None;
        let mut schema: Option<(Bound<'_, PyAny>, String)> = None;
        for (i, item) in items.iter().enumerate() {
            let at = |e: PyErr| {
                pyo3::exceptions::PyTypeError::new_err(format!(
                    "publish_batch: message {i}: expected (topic: str, payload: bytes, partition_key: str, dedupe_key, schema_fqdn, headers) ({e})"
                ))
            };
            if let Some(outgoing) = outgoing {
                let plain = (item.is_exact_instance_of::<PyTuple>()
                    || item.get_type().is(outgoing))
                    && item.cast::<PyTuple>().is_ok_and(|t| {
                        (3..=6).contains(&t.len())
                            && t.get_item(1)
                                .is_ok_and(|p| p.is_exact_instance_of::<PyBytes>())
                            && (t.len() < 6 || t.get_item(5).is_ok_and(|h| h.is_none()))
                    });
                if !plain {
                    return Ok(false);
                }
            }
            let t = item.cast::<PyTuple>().map_err(|e| at(e.into()))?;
            if t.len() < 3 {
                return Err(at(pyo3::exceptions::PyValueError::new_err("too short")));
            }
            let field = |k: usize| -> PyResult<Option<Bound<'_, PyAny>>> {
                if k >= t.len() {
                    return Ok(None);
                }
                let v = t.get_item(k)?;
                Ok((!v.is_none()).then_some(v))
            };
            let topic_obj = t.get_item(0)?;
            let topic_str = match &topic {
                Some((o, s)) if o.is(&topic_obj) => s.clone(),
                _ => {
                    let s = ampybus::TopicName::from(topic_obj.extract::<String>().map_err(at)?);
                    topic = Some((topic_obj, s.clone()));
                    s
                }
            };
            let payload = t.get_item(1)?;
            let payload = payload
                .cast::<PyBytes>()
                .map_err(|e| at(e.into()))?
                .as_bytes();
            if payloads.capacity() == 0 {
                // Room for the batch if its payloads are about this size.
                payloads.reserve(payload.len().saturating_mul(items.len()).min(64 << 20));
            }
            let from = payloads.len();
            payloads.extend_from_slice(payload);
            let own = field(5)?;
            let schema_obj = field(4)?;
            let plain = own.is_none() && schema_obj.is_none();
            let mut h = if plain {
                with_default_schema.clone()
            } else {
                common.clone()
            };
            if let Some(own) = own {
                for (k, v) in own.cast::<PyDict>().map_err(|e| at(e.into()))?.iter() {
                    let k = k.cast_into::<PyString>().map_err(|e| at(e.into()))?;
                    let v = v.cast_into::<PyString>().map_err(|e| at(e.into()))?;
                    h.set(&*k.to_cow()?, v.to_cow()?);
                }
            }
            match schema_obj {
                None if plain => {}
                None => {
                    h.set(names::SCHEMA_FQDN, default_schema);
                }
                Some(o) => {
                    let s = match &schema {
                        Some((prev, s)) if prev.is(&o) => s.clone(),
                        _ => {
                            let s = o.extract::<String>().map_err(at)?;
                            schema = Some((o, s.clone()));
                            s
                        }
                    };
                    h.set(names::SCHEMA_FQDN, s);
                }
            }
            if let Some(k) = field(2)? {
                let k = k.cast_into::<PyString>().map_err(|e| at(e.into()))?;
                h.set(names::PARTITION_KEY, k.to_cow()?);
            }
            if let Some(d) = field(3)? {
                let d = d.cast_into::<PyString>().map_err(|e| at(e.into()))?;
                h.set(names::DEDUPE_KEY, d.to_cow()?);
            }
            batch.push(Envelope {
                topic: topic_str,
                headers: h,
                payload: Bytes::new(),
            });
            spans.push((from, payload.len()));
        }
        // One buffer for the batch's payloads (each message's a slice of it), not one each.
        let payloads = Bytes::from(payloads);
        for (e, (from, len)) in batch.iter_mut().zip(spans) {
            e.payload = payloads.slice(from..from + len);
        }
        let bus = self.bus.clone();
        let done = completer.get().shared();
        pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
            // Filled here (what the core would fill) so that each receipt can name its id.
            let ids: Vec<ReceiptId> = batch
                .iter_mut()
                .map(|e| {
                    e.headers.fill_publish_defaults();
                    ReceiptId::of(&e.headers)
                })
                .collect();
            let value = match bus.publish_batch(batch).await {
                Ok(receipts) => Value::Receipts(
                    ids.into_iter()
                        .zip(receipts)
                        .map(|(id, r)| Receipt {
                            id,
                            sequence: r.sequence,
                            duplicate: r.duplicate,
                        })
                        .collect(),
                ),
                Err(e) => Value::Error(e),
            };
            done.push(fut, value);
        });
        Ok(true)
    }

    /// Test aid (not API): `(messages taken by the publisher task, largest batch it sent)`.
    fn _publisher_stats(&self) -> (u64, u64) {
        (
            self.coalesced.sent.load(Ordering::Relaxed),
            self.coalesced.largest.load(Ordering::Relaxed),
        )
    }

    /// Benchmark aid (not API): publishes `n` messages like the SDK benchmark's (256-byte
    /// payloads over 100 partition keys, the contract's headers) with the core's
    /// `Bus::publish_wire`, `batch` per call, the envelopes prepared before the clock starts;
    /// an awaitable of the seconds the publishes took.
    ///
    /// With `wire=False` it times `Bus::publish_batch` instead, of envelopes whose headers
    /// (producer, source, schema, partition key) were built before the clock: the ids, times
    /// and trace context are filled and everything is validated in the timed part, as for the
    /// SDK's `publish_batch`.
    #[pyo3(signature = (topic, n, batch=1000, payload_len=256, schema_fqdn="ampy.bars.v1.BarBatch".to_owned(), wire=true))]
    #[allow(clippy::too_many_arguments)]
    fn _bench_publish_wire<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        n: usize,
        batch: usize,
        payload_len: usize,
        schema_fqdn: String,
        wire: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            let topic = Topic::parse(&topic).or_raise()?;
            let payload = Bytes::from((0..payload_len).map(|i| i as u8).collect::<Vec<u8>>());
            let mut envs = Vec::with_capacity(n);
            for i in 0..n {
                let key = format!("XNAS.K{:03}", i % 100);
                let h = Headers::for_publish(&schema_fqdn, "bench@1", "bench", &key);
                envs.push(if wire {
                    bus.prepare(&topic, h, payload.clone()).await.or_raise()?
                } else {
                    Envelope::new(&topic, h, payload.clone())
                });
            }
            let t0 = std::time::Instant::now();
            let mut it = envs.into_iter().peekable();
            while it.peek().is_some() {
                let chunk: Vec<Envelope> = it.by_ref().take(batch.max(1)).collect();
                if wire {
                    bus.publish_wire(chunk).await.or_raise()?;
                } else {
                    bus.publish_batch(chunk).await.or_raise()?;
                }
            }
            Ok(t0.elapsed().as_secs_f64())
        })
    }

    /// Benchmark aid (not API): the core's consumer runtime alone on `pattern` (a Rust
    /// handler that only counts, borrowing each message), `workers` workers, until `n`
    /// messages were handled; an awaitable of the seconds from the first handler call to the
    /// `n`-th. Fails unless exactly `n` were handled.
    #[pyo3(signature = (pattern, consumer, n, workers=64, dedupe=false, max_in_flight=4096))]
    #[allow(clippy::too_many_arguments)]
    fn _bench_consume<'py>(
        &self,
        py: Python<'py>,
        pattern: String,
        consumer: String,
        n: u64,
        workers: usize,
        dedupe: bool,
        max_in_flight: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            let pattern = TopicPattern::parse(&pattern).or_raise()?;
            let counter = Arc::new(CountingHandler {
                n,
                seen: AtomicU64::new(0),
                first: OnceLock::new(),
                last: OnceLock::new(),
                done: tokio::sync::Notify::new(),
            });
            let mut b = ampybus::Consumer::builder(bus, pattern, &consumer)
                .handler(SharedHandler(counter.clone()))
                .workers(workers)
                .max_in_flight(max_in_flight);
            if !dedupe {
                b = b.without_dedupe();
            }
            let handle = b.start().await.or_raise()?;
            counter.done.notified().await;
            let stats = handle.shutdown(Duration::from_secs(5)).await;
            if stats.handled_ok != n {
                return Err(new_err(
                    ErrorKind::Config,
                    format!("bench: handled {} messages, not {n}", stats.handled_ok),
                ));
            }
            let (Some(first), Some(last)) = (counter.first.get(), counter.last.get()) else {
                return Err(new_err(ErrorKind::Config, "bench: no message handled"));
            };
            Ok(last.duration_since(*first).as_secs_f64())
        })
    }

    /// Starts a durable consumer; an awaitable of `NativeConsumer`.
    #[pyo3(signature = (
        pattern, consumer, *, workers=8, max_in_flight=None, max_attempts=5, min_delay=0.1,
        max_delay=30.0, strict=None, ack_deadline=None, start_at=None, dedupe=true,
        serve_replays=true, max_payload_bytes=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn subscribe<'py>(
        &self,
        py: Python<'py>,
        pattern: String,
        consumer: String,
        workers: usize,
        max_in_flight: Option<usize>,
        max_attempts: u32,
        min_delay: f64,
        max_delay: f64,
        strict: Option<bool>,
        ack_deadline: Option<f64>,
        start_at: Option<String>,
        dedupe: bool,
        serve_replays: bool,
        max_payload_bytes: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if max_attempts == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "subscribe: `max_attempts` must be at least 1 (the first attempt counts)",
            ));
        }
        let opts = ConsumerOptions {
            workers,
            max_in_flight,
            retry: ampybus::RetryPolicy {
                max_attempts,
                min_delay: secs("subscribe: `min_delay`", min_delay)?,
                max_delay: secs("subscribe: `max_delay`", max_delay)?,
            },
            strict,
            ack_deadline: ack_deadline
                .map(|d| secs("subscribe: `ack_deadline`", d))
                .transpose()?,
            start: consumer::parse_start(start_at.as_deref())?,
            dedupe,
            serve_replays,
            max_payload_bytes,
        };
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            let pattern = TopicPattern::parse(&pattern).or_raise()?;
            let c: NativeConsumer = consumer::start(bus, pattern, consumer, opts)
                .await
                .or_raise()?;
            Ok(c)
        })
    }

    /// Asks the running consumer `consumer` to replay `[start, end)` of `pattern` through its
    /// own handler; an awaitable of the final status `dict`.
    #[pyo3(signature = (consumer, pattern, start, end, keys=Vec::new(), reason=String::new(), timeout=600.0))]
    #[allow(clippy::too_many_arguments)]
    fn request_replay<'py>(
        &self,
        py: Python<'py>,
        consumer: String,
        pattern: String,
        start: String,
        end: String,
        keys: Vec<String>,
        reason: String,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let start = parse_time("replay: `start`", &start)?;
        let end = parse_time("replay: `end`", &end)?;
        let timeout = secs("replay: `timeout`", timeout)?;
        let mut req = ampybus::control::ReplayRequest::new(&consumer, &pattern, start, end);
        req.keys = keys;
        req.reason = reason;
        req.requested_by = "ampybus-python".to_owned();
        req.validate().or_raise()?;
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            let s = ampybus::runtime::control::request_replay(&bus, &req, timeout, |_| {})
                .await
                .or_raise()?;
            Ok(ReplayResult(s))
        })
    }

    /// Stored messages of `pattern` in `[start, end)` (store time), optionally only `keys`,
    /// at most `limit`; an awaitable of a list of `StoredMessage`.
    #[pyo3(signature = (pattern, start=None, end=None, keys=None, limit=None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        pattern: String,
        start: Option<String>,
        end: Option<String>,
        keys: Option<Vec<String>>,
        limit: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut q = WindowQuery::new(self::pattern("read: `pattern`", &pattern)?);
        q.start = opt_time("read: `start`", start)?;
        q.end = opt_time("read: `end`", end)?;
        q.keys = keys;
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            let msgs = read_all(&bus, q, limit).await.or_raise()?;
            Ok(msgs.into_iter().map(PyStored::new).collect::<Vec<_>>())
        })
    }

    /// Dead-lettered messages under `pattern`, optionally only reason code `reason` and stored
    /// at or after `since`; an awaitable of a list of `StoredMessage`.
    #[pyo3(signature = (pattern, reason=None, since=None))]
    fn dlq_inspect<'py>(
        &self,
        py: Python<'py>,
        pattern: String,
        reason: Option<String>,
        since: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let p = self::pattern("dlq.inspect: `pattern`", &pattern)?;
        let code = dlq_code(reason)?;
        let since = opt_time("dlq.inspect: `since`", since)?;
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            let msgs = dlq_select(&bus, p, code, since).await.or_raise()?;
            Ok(msgs.into_iter().map(PyStored::new).collect::<Vec<_>>())
        })
    }

    /// Publishes the selected DLQ messages back to their `original_topic` (new `message_id`,
    /// `redrive_of`, `retry_count` + 1) at most `rate` per second; an awaitable of a list of
    /// `(dlq_message_id, original_topic, new_message_id)`.
    ///
    /// Every selected entry is checked before any is sent: an entry that cannot be redriven
    /// (no `original_topic`, …) fails the call naming it, unless `skip_invalid`. Each sent
    /// entry is recorded in the transport's dedupe store (consumer `ampybus-redrive`), so a
    /// repeated call sends only what was not sent yet.
    #[pyo3(signature = (pattern, reason=None, since=None, rate=100.0, dry_run=false, skip_invalid=false))]
    #[allow(clippy::too_many_arguments)]
    fn dlq_redrive<'py>(
        &self,
        py: Python<'py>,
        pattern: String,
        reason: Option<String>,
        since: Option<String>,
        rate: f64,
        dry_run: bool,
        skip_invalid: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let p = self::pattern("dlq.redrive: `pattern`", &pattern)?;
        let code = dlq_code(reason)?;
        let since = opt_time("dlq.redrive: `since`", since)?;
        if !(rate.is_finite() && rate > 0.0) {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "dlq.redrive: `rate` must be a positive number of messages per second, got {rate}"
            )));
        }
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            let msgs = dlq_select(&bus, p, code, since).await.or_raise()?;
            let entries: Vec<ampybus::Envelope> = msgs.into_iter().map(|m| m.envelope).collect();
            let store = bus.transport().dedupe_store();
            let plan = ampybus::runtime::plan_redrive(&entries, store.as_deref())
                .await
                .or_raise()?;
            if !skip_invalid && let Some((i, e)) = plan.invalid.first() {
                let dlq_id = entries[*i].headers.message_id().unwrap_or("-");
                return Err(crate::errors::kind_err(
                    e.kind(),
                    format!(
                        "{}: DLQ message {dlq_id}: {} ({} of the selected entries cannot be redriven; nothing was sent; pass skip_invalid=True to send the rest)",
                        e.kind(),
                        e.message(),
                        plan.invalid.len()
                    ),
                ));
            }
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut out = Vec::with_capacity(plan.ready.len());
            for (i, env) in plan.ready {
                let dlq = &entries[i];
                let dlq_id = dlq.headers.message_id().unwrap_or("-").to_owned();
                let new_id = env.headers.message_id().unwrap_or("-").to_owned();
                let topic = env.topic.to_string();
                if !dry_run {
                    tick.tick().await;
                    bus.publish_wire(vec![env]).await.or_raise()?;
                    if let Some(store) = &store {
                        ampybus::runtime::record_redriven(store.as_ref(), dlq)
                            .await
                            .or_raise()?;
                    }
                    tracing::info!(dlq_message_id = %dlq_id, topic = %topic, message_id = %new_id, "redriven");
                }
                out.push((dlq_id, topic, new_id));
            }
            Ok(out)
        })
    }

    /// Serves `/metrics`, `/health` and `/stats` for this bus on `addr` (port 0 picks one);
    /// an awaitable of `MetricsServer`.
    fn serve_metrics<'py>(&self, py: Python<'py>, addr: String) -> PyResult<Bound<'py, PyAny>> {
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            let server = ampybus::ops::serve(&bus, &addr).await.or_raise()?;
            Ok(MetricsServer {
                addr: server.local_addr().to_string(),
                server: Mutex::new(Some(server)),
            })
        })
    }

    /// The Prometheus text of this bus's metric families.
    fn metrics_text(&self) -> String {
        self.bus.metrics().encode()
    }

    /// Adds `n` to `bus_inbox_skipped_total{consumer}` (the Python inbox's skips; `n = 0`
    /// creates the series at 0).
    fn count_inbox_skipped(&self, consumer: &str, n: u64) {
        self.bus.metrics().inbox_skipped(consumer).inc_by(n);
    }

    /// Checks the transport's connection; raises when it is down.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            bus.health().await.or_raise()?;
            Ok(())
        })
    }

    /// The lag of durable consumer `consumer` as `{"pending", "in_flight"}`, `None` if unknown.
    fn consumer_lag<'py>(&self, py: Python<'py>, consumer: String) -> PyResult<Bound<'py, PyAny>> {
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            let lag = bus.consumer_lag(&consumer).await.or_raise()?;
            Ok(lag.map(|l| {
                let mut m = HashMap::new();
                m.insert("pending", l.pending);
                m.insert("in_flight", l.in_flight);
                m
            }))
        })
    }

    /// Flushes and closes the transport.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let bus = self.bus.clone();
        crate::aio::future_into_py(py, async move {
            bus.close().await.or_raise()?;
            Ok(())
        })
    }
}

/// A replay's final status, converted to a `dict` when it reaches Python.
struct ReplayResult(ampybus::control::ReplayStatus);

impl<'py> IntoPyObject<'py> for ReplayResult {
    type Target = PyDict;
    type Output = Bound<'py, PyDict>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.0;
        let d = PyDict::new(py);
        d.set_item("request_id", &s.request_id)?;
        d.set_item("consumer", &s.consumer)?;
        d.set_item("state", s.state().as_str())?;
        d.set_item("read", s.read)?;
        d.set_item("applied", s.applied)?;
        d.set_item("skipped_duplicates", s.skipped_duplicates)?;
        d.set_item("failed", s.failed)?;
        d.set_item("first_message_id", &s.first_message_id)?;
        d.set_item("last_message_id", &s.last_message_id)?;
        d.set_item("error", &s.error)?;
        Ok(d)
    }
}

/// A running `/metrics` `/health` `/stats` endpoint.
#[pyclass(module = "ampybus._native", frozen)]
pub struct MetricsServer {
    addr: String,
    server: Mutex<Option<ampybus::ops::ObsServer>>,
}

#[pymethods]
impl MetricsServer {
    /// The bound address, `host:port`.
    #[getter]
    fn address(&self) -> &str {
        &self.addr
    }

    /// Stops serving.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        crate::aio::future_into_py(py, async move {
            if let Some(s) = server {
                s.shutdown().await;
            }
            Ok(())
        })
    }
}
