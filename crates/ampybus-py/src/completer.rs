//! [`Completer`]: resolves asyncio futures from the tokio side in batches, without taking the
//! GIL there.
//!
//! `pyo3_async_runtimes::tokio::future_into_py` costs, per awaitable, a tokio task plus a
//! blocking-pool hop that takes the GIL to call `loop.call_soon_threadsafe`. On the hot paths
//! (publish, a consumer waiting for messages) that hop dominates. A completer instead keeps a
//! queue of `(future, value)` pairs: Rust pushes to it (no GIL), and only the push that finds
//! the queue empty writes one byte to a socket pair whose read end the event loop watches
//! (`loop.add_reader`). The loop then calls [`Completer::drain`], which resolves every queued
//! future in one pass — one wake-up and one native call per batch, however many futures
//! completed meanwhile.
//!
//! One completer serves one event loop (`ampybus._bus._completer(loop)` makes and caches it).
//! Where the loop cannot watch a socket (e.g. the Windows proactor loop), or off Unix, the
//! completer wakes the loop with `loop.call_soon_threadsafe(drain)` from a blocking-pool thread
//! instead (still one hop per batch, not per future).

use crate::errors::to_py;
use crate::message::Receipt;
use pyo3::intern;
use pyo3::prelude::*;
use std::sync::{Arc, Mutex, OnceLock};

/// What a future is resolved with.
pub enum Value {
    /// `None` (a wake-up: "look again").
    Wake,
    /// One publish receipt.
    Receipt(Receipt),
    /// The receipts of a batch, as a list.
    Receipts(Vec<Receipt>),
    /// An exception: the Python class of the error's kind.
    Error(ampybus::Error),
}

impl Value {
    fn into_result(self, py: Python<'_>) -> PyResult<Result<Py<PyAny>, PyErr>> {
        Ok(match self {
            Value::Wake => Ok(py.None()),
            Value::Receipt(r) => Ok(Py::new(py, r)?.into_any()),
            Value::Receipts(rs) => Ok(pyo3::types::PyList::new(py, rs)?.into_any().unbind()),
            Value::Error(e) => Err(to_py(e)),
        })
    }
}

/// An asyncio future to resolve.
pub type Future = Py<PyAny>;

/// The part of a completer the tokio side holds.
pub struct Shared {
    queue: Mutex<Vec<(Future, Value)>>,
    /// `(tx, rx)`: the loop watches `rx`; a byte on `tx` wakes it.
    #[cfg(unix)]
    socket: (
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
    ),
    /// Set when the loop cannot watch the socket (always off Unix): wake through
    /// `call_soon_threadsafe` instead.
    fallback: OnceLock<Arc<Threadsafe>>,
}

/// `(loop.call_soon_threadsafe, drain)`, called from a blocking-pool thread.
struct Threadsafe(Py<PyAny>, Py<PyAny>);

impl Shared {
    fn new() -> std::io::Result<Shared> {
        Ok(Shared {
            queue: Mutex::new(Vec::new()),
            #[cfg(unix)]
            socket: {
                let (tx, rx) = std::os::unix::net::UnixStream::pair()?;
                tx.set_nonblocking(true)?;
                rx.set_nonblocking(true)?;
                (tx, rx)
            },
            fallback: OnceLock::new(),
        })
    }

    /// Queues `fut` to be resolved with `value` on the loop's thread.
    pub fn push(&self, fut: Future, value: Value) {
        let was_empty = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let was_empty = q.is_empty();
            q.push((fut, value));
            was_empty
        };
        if was_empty {
            self.wake();
        }
    }

    /// Queues many futures at once (one wake-up at most).
    pub fn push_many(&self, items: impl IntoIterator<Item = (Future, Value)>) {
        let was_empty = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let was_empty = q.is_empty();
            q.extend(items);
            was_empty && !q.is_empty()
        };
        if was_empty {
            self.wake();
        }
    }

    fn wake(&self) {
        if let Some(ts) = self.fallback.get() {
            let ts = ts.clone();
            pyo3_async_runtimes::tokio::get_runtime().spawn_blocking(move || {
                // Not once the interpreter exits (see `aio`).
                crate::aio::attach_unless_exiting(|py| {
                    // A closed loop: nobody waits for these futures any more.
                    let _ = ts.0.call1(py, (ts.1.clone_ref(py),));
                });
            });
            return;
        }
        #[cfg(unix)]
        {
            use std::io::Write;
            // A full socket buffer means a wake-up is pending already.
            let _ = (&self.socket.0).write(&[1]);
        }
    }

    /// Empties the wake-up socket.
    fn clear(&self) {
        #[cfg(unix)]
        {
            use std::io::Read;
            let mut buf = [0u8; 256];
            while matches!((&self.socket.1).read(&mut buf), Ok(n) if n == buf.len()) {}
        }
    }
}

/// Resolves asyncio futures of one event loop in batches (see the module docs). Made by
/// `ampybus._bus._completer(loop)`; not for direct use.
#[pyclass(module = "ampybus._native", frozen)]
pub struct Completer {
    shared: Arc<Shared>,
}

impl Completer {
    /// The part the tokio side holds.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }
}

#[pymethods]
impl Completer {
    #[new]
    fn py_new() -> PyResult<Completer> {
        let shared = Shared::new().map_err(|e| {
            pyo3::exceptions::PyOSError::new_err(format!("completer: socket pair: {e}"))
        })?;
        Ok(Completer {
            shared: Arc::new(shared),
        })
    }

    /// The file descriptor the event loop watches (`loop.add_reader(fd, drain)`); -1 when
    /// there is none (then call `use_threadsafe`).
    fn fileno(&self) -> i64 {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            i64::from(self.shared.socket.1.as_raw_fd())
        }
        #[cfg(not(unix))]
        -1
    }

    /// Wakes the loop with `call_soon(drain)` (`loop.call_soon_threadsafe`) instead of the
    /// socket, for loops that cannot watch one.
    fn use_threadsafe(slf: &Bound<'_, Self>, call_soon: Py<PyAny>) -> PyResult<()> {
        let py = slf.py();
        let drain = slf.getattr(intern!(py, "drain"))?.unbind();
        let _ = slf
            .get()
            .shared
            .fallback
            .set(Arc::new(Threadsafe(call_soon, drain)));
        Ok(())
    }

    /// Resolves every queued future (skipping those already done, e.g. cancelled); returns
    /// how many were queued. Called by the event loop when the socket is readable.
    fn drain(&self, py: Python<'_>) -> PyResult<usize> {
        self.shared.clear();
        let items =
            std::mem::take(&mut *self.shared.queue.lock().unwrap_or_else(|p| p.into_inner()));
        let n = items.len();
        for (fut, value) in items {
            let fut = fut.bind(py);
            if fut.call_method0(intern!(py, "done"))?.is_truthy()? {
                continue;
            }
            let r = match value.into_result(py)? {
                Ok(v) => fut.call_method1(intern!(py, "set_result"), (v,)),
                Err(e) => fut.call_method1(intern!(py, "set_exception"), (e.into_value(py),)),
            };
            if let Err(e) = r {
                e.write_unraisable(py, Some(fut));
            }
        }
        Ok(n)
    }
}
