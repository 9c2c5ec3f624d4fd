//! The consumer behind `bus.subscribe(...)` and `bus.run(...)`: the Rust runtime
//! ([`ampybus::Consumer`]) with a handler that hands each message to Python through a bounded
//! channel and waits for its outcome.
//!
//! Backpressure: a runtime worker waits for the Python outcome of the message it handed over,
//! so at most `workers` messages are with Python at once (the channel holds at most that many
//! too); the runtime then stops fetching at `max_in_flight`. Per-key order is the runtime's: the
//! next message of a key reaches Python only after the previous one was settled.
//!
//! Closing: no more messages reach Python; messages Python holds unsettled may still be settled
//! until the close timeout; then everything unsettled — queued for Python, held by Python, or in
//! the runtime's queues — is released to the transport (nack, no delay): it comes again, and
//! the release does not count as an attempt. Garbage-collecting the subscription closes it with
//! no timeout. A message garbage-collected unsettled while the subscription runs counts as a
//! failed attempt (retry with the policy's backoff).

use crate::message::PyMessage;
use ampybus::runtime::{ConsumerHandle, ConsumerMonitor, ConsumerStats, Handler, Message, Outcome};
use async_trait::async_trait;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// One message on its way to Python, with the way back for its outcome.
pub struct Pending {
    msg: Message,
    reply: oneshot::Sender<Outcome>,
}

/// The way back for one message's outcome, held by the Python `Message`; counted while it
/// lives, so that a close can wait for Python to settle what it holds.
pub struct Ticket {
    reply: Option<oneshot::Sender<Outcome>>,
    held: watch::Sender<usize>,
}

impl Ticket {
    fn new(reply: oneshot::Sender<Outcome>, held: &watch::Sender<usize>) -> Ticket {
        held.send_modify(|n| *n += 1);
        Ticket {
            reply: Some(reply),
            held: held.clone(),
        }
    }

    /// Hands `outcome` to the runtime; `Err` when the consumer is gone (message released).
    pub fn send(mut self, outcome: Outcome) -> Result<(), Outcome> {
        match self.reply.take() {
            Some(tx) => tx.send(outcome),
            None => Err(outcome),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.held.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The runtime handler: forwards to Python, waits for the outcome.
pub struct PyHandler {
    tx: mpsc::Sender<Pending>,
    closing: watch::Receiver<bool>,
}

/// Resolves once `closing` is set (or its sender is gone).
async fn closed(mut closing: watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

#[async_trait]
impl Handler for PyHandler {
    async fn handle(&self, msg: &Message) -> Outcome {
        if *self.closing.borrow() {
            // Released by the shutdown (hard stop), no attempt counted.
            std::future::pending::<()>().await;
        }
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            msg: msg.clone(),
            reply,
        };
        tokio::select! {
            biased;
            sent = self.tx.send(pending) => {
                if sent.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ = closed(self.closing.clone()) => std::future::pending::<()>().await,
        }
        match rx.await {
            Ok(outcome) => outcome,
            // Dropped unsettled: while closing the shutdown releases it; otherwise it is a
            // failed attempt.
            Err(_) if *self.closing.borrow() => std::future::pending().await,
            Err(_) => {
                tracing::warn!(
                    message_id = msg.headers.message_id().unwrap_or("-"),
                    "message dropped by Python without ack/retry/dead_letter; retrying it"
                );
                Outcome::Retry { after: None }
            }
        }
    }
}

/// Options of a consumer, as given from Python.
pub struct ConsumerOptions {
    pub workers: usize,
    pub max_in_flight: Option<usize>,
    pub retry: ampybus::RetryPolicy,
    pub strict: Option<bool>,
    pub ack_deadline: Option<Duration>,
    pub start: ampybus::transport::StartAt,
    pub dedupe: bool,
    pub serve_replays: bool,
    pub max_payload_bytes: Option<usize>,
}

/// Starts the runtime on `bus` and returns the Python-side handle.
pub async fn start(
    bus: ampybus::Bus,
    pattern: ampybus::TopicPattern,
    name: String,
    o: ConsumerOptions,
) -> ampybus::Result<NativeConsumer> {
    let workers = o.workers.max(1);
    let (tx, rx) = mpsc::channel(workers);
    let (closing_tx, closing_rx) = watch::channel(false);
    let handler = PyHandler {
        tx,
        closing: closing_rx,
    };
    let mut b = ampybus::Consumer::builder(bus, pattern, &name)
        .handler(handler)
        .workers(workers)
        .retry(o.retry)
        .start_at(o.start)
        .serve_replays(o.serve_replays);
    if let Some(n) = o.max_in_flight {
        b = b.max_in_flight(n);
    }
    if let Some(s) = o.strict {
        b = b.strict(s);
    }
    if let Some(d) = o.ack_deadline {
        b = b.ack_deadline(d);
    }
    if !o.dedupe {
        b = b.without_dedupe();
    }
    if let Some(n) = o.max_payload_bytes {
        b = b.max_payload_bytes(n);
    }
    let handle = b.start().await?;
    Ok(NativeConsumer {
        monitor: handle.monitor(),
        name,
        rx: Arc::new(tokio::sync::Mutex::new(rx)),
        closing: closing_tx,
        held: watch::channel(0).0,
        handle: Mutex::new(Some(handle)),
    })
}

/// A running consumer seen from Python (wrapped by `ampybus.Subscription`).
#[pyclass(module = "ampybus._native", frozen)]
pub struct NativeConsumer {
    monitor: ConsumerMonitor,
    name: String,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Pending>>>,
    closing: watch::Sender<bool>,
    /// Messages held by Python, unsettled.
    held: watch::Sender<usize>,
    handle: Mutex<Option<ConsumerHandle>>,
}

/// How long the runtime's shutdown lets handlers whose outcome Python gave finish before the
/// rest is released.
const FINISH_GRACE: Duration = Duration::from_millis(50);

/// Closes: stops delivery, waits up to `timeout` for Python to settle what it holds, then
/// shuts the runtime down (the unsettled rest is released).
async fn close_consumer(
    handle: Option<ConsumerHandle>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Pending>>>,
    mut held: watch::Receiver<usize>,
    timeout: Duration,
) -> Option<ConsumerStats> {
    {
        // Messages still queued for Python: their handlers see the closing flag.
        let mut rx = rx.lock().await;
        rx.close();
        while rx.try_recv().is_ok() {}
    }
    let handle = handle?;
    let _ = tokio::time::timeout(timeout, held.wait_for(|n| *n == 0)).await;
    Some(handle.shutdown(FINISH_GRACE).await)
}

fn stats_dict<'py>(py: Python<'py>, s: &ConsumerStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("handled_ok", s.handled_ok)?;
    d.set_item("retried", s.retried)?;
    let dl = PyDict::new(py);
    for (code, n) in &s.dead_lettered {
        dl.set_item(code.as_str(), n)?;
    }
    d.set_item("dead_lettered", dl)?;
    d.set_item("skipped_duplicates", s.skipped_duplicates)?;
    d.set_item("released", s.released)?;
    d.set_item("in_flight", s.in_flight)?;
    Ok(d)
}

/// Final counts, converted to a `dict` when they reach Python.
pub struct Stats(ConsumerStats);

impl<'py> IntoPyObject<'py> for Stats {
    type Target = PyDict;
    type Output = Bound<'py, PyDict>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.0)
    }
}

impl NativeConsumer {
    fn begin_close(&self) -> Option<ConsumerHandle> {
        let _ = self.closing.send(true);
        self.handle.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[pymethods]
impl NativeConsumer {
    /// The durable consumer name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Up to `max` messages that are ready now, without waiting (an empty list when none).
    fn take(&self, max: usize) -> Vec<PyMessage> {
        let mut out = Vec::new();
        if *self.closing.borrow() {
            return out;
        }
        if let Ok(mut rx) = self.rx.try_lock() {
            while out.len() < max {
                match rx.try_recv() {
                    Ok(p) => out.push(PyMessage::new(p.msg, Ticket::new(p.reply, &self.held))),
                    Err(_) => break,
                }
            }
        }
        out
    }

    /// Waits for at least one message and returns up to `max`; `None` once closed.
    fn wait<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyAny>> {
        let rx = self.rx.clone();
        let closing = self.closing.subscribe();
        let held = self.held.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            if *closing.borrow() {
                return Ok(None);
            }
            let mut rx = tokio::select! {
                rx = rx.lock() => rx,
                _ = closed(closing.clone()) => return Ok(None),
            };
            let first = tokio::select! {
                p = rx.recv() => p,
                _ = closed(closing) => None,
            };
            let Some(first) = first else {
                return Ok(None);
            };
            let mut out = vec![PyMessage::new(first.msg, Ticket::new(first.reply, &held))];
            while out.len() < max.max(1) {
                match rx.try_recv() {
                    Ok(p) => out.push(PyMessage::new(p.msg, Ticket::new(p.reply, &held))),
                    Err(_) => break,
                }
            }
            Ok(Some(out))
        })
    }

    /// Current counts (`handled_ok`, `retried`, `dead_lettered` by code, …).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.monitor.stats())
    }

    /// True while the consumer runs (not closing or closed).
    #[getter]
    fn running(&self) -> bool {
        !*self.closing.borrow() && !self.monitor.is_draining()
    }

    /// Number of messages Python holds unsettled.
    #[getter]
    fn held(&self) -> usize {
        *self.held.borrow()
    }

    /// Stops the consumer: no more messages reach Python; what Python holds may still be
    /// settled for `timeout` seconds, then everything unsettled is released (it comes again).
    /// Returns the final counts; a second call returns `None`.
    #[pyo3(signature = (timeout=5.0))]
    fn close<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let timeout = Duration::from_secs_f64(if timeout.is_finite() {
            timeout.max(0.0)
        } else {
            0.0
        });
        let handle = self.begin_close();
        let rx = self.rx.clone();
        let held = self.held.subscribe();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            Ok(close_consumer(handle, rx, held, timeout).await.map(Stats))
        })
    }
}

impl Drop for NativeConsumer {
    fn drop(&mut self) {
        if let Some(h) = self.begin_close() {
            let rx = self.rx.clone();
            let held = self.held.subscribe();
            pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
                close_consumer(Some(h), rx, held, Duration::ZERO).await;
            });
        }
    }
}

/// Parses `start_at` from Python: `"earliest"`, `"latest"` or an RFC3339 time.
pub fn parse_start(v: Option<&str>) -> PyResult<ampybus::transport::StartAt> {
    use ampybus::transport::StartAt;
    match v.map(str::trim) {
        None | Some("earliest") => Ok(StartAt::Earliest),
        Some("latest") => Ok(StartAt::Latest),
        Some(t) => ampybus::ids::parse_time(t).map(StartAt::Time).ok_or_else(|| {
            crate::errors::new_err(
                ampybus::ErrorKind::Config,
                format!(
                    "subscribe: `start_at` {t:?} is not \"earliest\", \"latest\" or an RFC3339 time with offset"
                ),
            )
        }),
    }
}
