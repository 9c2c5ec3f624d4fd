//! The consumer behind `bus.subscribe(...)` and `bus.run(...)`: the Rust runtime
//! ([`ampybus::Consumer`]) with a handler that queues each message for Python and waits for its
//! outcome.
//!
//! Messages cross per batch: a runtime worker pushes its message onto the consumer's ready
//! queue (no GIL) and, only when a Python task is parked waiting, queues a wake-up on that
//! task's [`Completer`](crate::completer) (one wake-up per batch of pushes). Python takes
//! everything ready in one call (`take`), one GIL acquisition per batch. Outcomes go back the
//! same way: `ack`/`retry`/`dead_letter` append to a queue and the first of a batch wakes one
//! tokio task that hands the whole batch to the runtime's waiting handlers.
//!
//! Backpressure: a runtime worker waits for the Python outcome of the message it handed over,
//! so at most `workers` messages are with Python (queued or held) at once; the runtime then
//! stops fetching at `max_in_flight`. Per-key order is the runtime's: the next message of a
//! key reaches Python only after the previous one was settled.
//!
//! Closing: no more messages reach Python; messages Python holds unsettled may still be settled
//! until the close timeout; then everything unsettled — queued for Python, held by Python, or in
//! the runtime's queues — is released to the transport (nack, no delay): it comes again, and
//! the release does not count as an attempt. Garbage-collecting the subscription closes it with
//! no timeout. A message garbage-collected unsettled while the subscription runs counts as a
//! failed attempt (retry with the policy's backoff).

use crate::completer::{Completer, Future, Shared, Value};
use crate::message::{PyMessage, Returns, Ticket};
use ampybus::runtime::{ConsumerHandle, ConsumerMonitor, ConsumerStats, Handler, Message, Outcome};
use async_trait::async_trait;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// One message on its way to Python, with the way back for its outcome.
struct Pending {
    msg: Message,
    reply: oneshot::Sender<Outcome>,
}

/// A Python task parked until messages are ready.
type Waiter = (Future, Arc<Shared>);

/// What the runtime's handlers and Python share.
pub struct Inbox {
    state: Mutex<InboxState>,
    /// Set by a close (from Python, or when the subscription is garbage-collected).
    closing: AtomicBool,
    /// Messages held by Python, unsettled.
    held: AtomicUsize,
    held_changed: Notify,
    /// Outcomes given by Python, not yet handed to their handlers.
    outcomes: Mutex<Vec<(oneshot::Sender<Outcome>, Outcome)>>,
    outcomes_ready: Notify,
    /// Set once the runtime was shut down: the outcome task stops.
    finished: AtomicBool,
}

struct InboxState {
    ready: VecDeque<Pending>,
    /// No more messages for Python (closing, or the runtime stopped).
    closed: bool,
    waiters: Vec<Waiter>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resolves parked Python tasks' futures with `None` (one push per event loop).
fn wake(waiters: Vec<Waiter>) {
    let mut it = waiters.into_iter().peekable();
    while let Some((fut, done)) = it.next() {
        let mut run = vec![(fut, Value::Wake)];
        while let Some((f, _)) = it.next_if(|(_, d)| Arc::ptr_eq(d, &done)) {
            run.push((f, Value::Wake));
        }
        done.push_many(run);
    }
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            state: Mutex::new(InboxState {
                ready: VecDeque::new(),
                closed: false,
                waiters: Vec::new(),
            }),
            closing: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            held_changed: Notify::new(),
            outcomes: Mutex::new(Vec::new()),
            outcomes_ready: Notify::new(),
            finished: AtomicBool::new(false),
        }
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// No more messages for Python; what is queued is dropped (its handler, seeing the
    /// closing flag, waits for the shutdown to release it), parked tasks are woken.
    fn close(&self) {
        let (queued, waiters) = {
            let mut st = locked(&self.state);
            st.closed = true;
            (
                std::mem::take(&mut st.ready),
                std::mem::take(&mut st.waiters),
            )
        };
        drop(queued);
        wake(waiters);
    }

    /// Hands every outcome given so far to its handler.
    fn flush_outcomes(&self) {
        let batch = std::mem::take(&mut *locked(&self.outcomes));
        for (tx, outcome) in batch {
            // Err: the handler is gone (released by a shutdown); the message comes again.
            let _ = tx.send(outcome);
        }
    }

    fn unhold(&self) {
        if self.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.held_changed.notify_waiters();
        }
    }

    async fn wait_unheld(&self) {
        loop {
            let changed = self.held_changed.notified();
            if self.held.load(Ordering::Acquire) == 0 {
                return;
            }
            changed.await;
        }
    }
}

/// Hands outcomes to the runtime in batches until the consumer is shut down.
async fn run_outcomes(inbox: Arc<Inbox>) {
    loop {
        inbox.outcomes_ready.notified().await;
        inbox.flush_outcomes();
        if inbox.finished.load(Ordering::Acquire) {
            return;
        }
    }
}

impl Returns for Inbox {
    fn queue(&self, tx: oneshot::Sender<Outcome>, outcome: Outcome) -> Result<(), Outcome> {
        if tx.is_closed() || self.finished.load(Ordering::Acquire) {
            return Err(outcome);
        }
        let first = {
            let mut q = locked(&self.outcomes);
            q.push((tx, outcome));
            q.len() == 1
        };
        if first {
            self.outcomes_ready.notify_one();
        }
        Ok(())
    }

    fn release(&self) {
        self.unhold();
    }
}

/// The runtime handler: queues the message for Python, waits for the outcome.
pub struct PyHandler {
    inbox: Arc<Inbox>,
}

impl Drop for PyHandler {
    fn drop(&mut self) {
        // The runtime stopped: Python's iteration ends once it took what is queued.
        self.inbox.close();
    }
}

#[async_trait]
impl Handler for PyHandler {
    async fn handle(&self, msg: &Message) -> Outcome {
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            msg: msg.clone(),
            reply,
        };
        let queued = {
            let mut st = locked(&self.inbox.state);
            if st.closed {
                None
            } else {
                st.ready.push_back(pending);
                Some(std::mem::take(&mut st.waiters))
            }
        };
        match queued {
            // Released by the shutdown (hard stop), no attempt counted.
            None => return std::future::pending().await,
            Some(waiters) if !waiters.is_empty() => wake(waiters),
            Some(_) => {}
        }
        match rx.await {
            Ok(outcome) => outcome,
            // Dropped unsettled: while closing the shutdown releases it; otherwise it is a
            // failed attempt.
            Err(_) if self.inbox.closing() => std::future::pending().await,
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
    let inbox = Arc::new(Inbox::new());
    let handler = PyHandler {
        inbox: inbox.clone(),
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
    tokio::spawn(run_outcomes(inbox.clone()));
    Ok(NativeConsumer {
        monitor: handle.monitor(),
        name,
        inbox,
        handle: std::sync::Mutex::new(Some(handle)),
    })
}

/// A running consumer seen from Python (wrapped by `ampybus.Subscription`).
#[pyclass(module = "ampybus._native", frozen)]
pub struct NativeConsumer {
    monitor: ConsumerMonitor,
    name: String,
    inbox: Arc<Inbox>,
    handle: std::sync::Mutex<Option<ConsumerHandle>>,
}

/// How long the runtime's shutdown lets handlers whose outcome Python gave finish before the
/// rest is released.
const FINISH_GRACE: Duration = Duration::from_millis(50);

/// Closes: stops delivery, waits up to `timeout` for Python to settle what it holds, then
/// shuts the runtime down (the unsettled rest is released).
async fn close_consumer(
    handle: Option<ConsumerHandle>,
    inbox: Arc<Inbox>,
    timeout: Duration,
) -> Option<ConsumerStats> {
    inbox.close();
    let handle = handle?;
    let _ = tokio::time::timeout(timeout, inbox.wait_unheld()).await;
    inbox.flush_outcomes();
    let stats = handle.shutdown(FINISH_GRACE).await;
    inbox.finished.store(true, Ordering::Release);
    inbox.flush_outcomes();
    inbox.outcomes_ready.notify_one();
    Some(stats)
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
        self.inbox.closing.store(true, Ordering::Release);
        locked(&self.handle).take()
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
        let batch: Vec<Pending> = {
            let mut st = locked(&self.inbox.state);
            if st.closed || self.inbox.closing() {
                return Vec::new();
            }
            let n = st.ready.len().min(max);
            st.ready.drain(..n).collect()
        };
        self.inbox.held.fetch_add(batch.len(), Ordering::AcqRel);
        batch
            .into_iter()
            .map(|p| {
                let ticket = Ticket::new(p.reply, self.inbox.clone());
                PyMessage::new(p.msg, ticket)
            })
            .collect()
    }

    /// Parks the calling task until messages are ready: `1` when `fut` (a future of
    /// `completer`'s loop) will be resolved with `None` then (or at close), `0` when messages
    /// are ready already (take them), `-1` when closed (no more messages).
    fn arm(&self, fut: Future, completer: &Bound<'_, Completer>) -> i32 {
        let mut st = locked(&self.inbox.state);
        if st.closed || self.inbox.closing() {
            -1
        } else if !st.ready.is_empty() {
            0
        } else {
            st.waiters.push((fut, completer.get().shared()));
            1
        }
    }

    /// Current counts (`handled_ok`, `retried`, `dead_lettered` by code, …).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.monitor.stats())
    }

    /// True while the consumer runs (not closing or closed).
    #[getter]
    fn running(&self) -> bool {
        !self.inbox.closing() && !self.monitor.is_draining()
    }

    /// Number of messages Python holds unsettled.
    #[getter]
    fn held(&self) -> usize {
        self.inbox.held.load(Ordering::Acquire)
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
        let inbox = self.inbox.clone();
        crate::aio::future_into_py(py, async move {
            Ok(close_consumer(handle, inbox, timeout).await.map(Stats))
        })
    }
}

impl Drop for NativeConsumer {
    fn drop(&mut self) {
        if let Some(h) = self.begin_close() {
            let inbox = self.inbox.clone();
            pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
                close_consumer(Some(h), inbox, Duration::ZERO).await;
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
