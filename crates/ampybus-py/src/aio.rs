//! Awaitables resolved from the tokio side, and the tokio side kept away from the interpreter
//! once it exits.
//!
//! The tokio runtime's threads live as long as the process: nothing stops them when the
//! interpreter finalises. A thread that attaches to the interpreter then (to resolve an
//! asyncio future whose Rust work just finished, or whose Python side was just cancelled by
//! `asyncio.run` closing its loop) is ended by CPython with `pthread_exit` in the middle of
//! Rust frames — undefined behaviour, seen as a SIGSEGV of a process that had ended normally.
//! So every attach from a tokio thread goes through [`attach_unless_exiting`], and an `atexit`
//! hook ([`at_exit`], registered when the module is imported; `atexit` hooks run before the
//! interpreter starts finalising) closes the gate: attaches already under way finish (the hook
//! waits for them with the GIL released), later ones do not happen — what they would have
//! resolved belongs to an event loop that is gone.
//!
//! [`future_into_py`] replaces `pyo3_async_runtimes::tokio::future_into_py`, whose completion
//! attaches unconditionally (also for a cancelled future): here a cancelled future's Rust work
//! is dropped without attaching at all, and a completed one attaches through the gate.

use pyo3::prelude::*;
use pyo3::{IntoPyObjectExt, intern};
use std::future::Future;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Whether the interpreter is exiting, and how many tokio-side attaches are under way.
struct Gate {
    closed: bool,
    attached: usize,
}

static GATE: Mutex<Gate> = Mutex::new(Gate {
    closed: false,
    attached: 0,
});
static IDLE: Condvar = Condvar::new();

/// How long [`at_exit`] waits for attaches under way (each is a few Python calls).
const AT_EXIT_WAIT: Duration = Duration::from_secs(10);

fn gate() -> std::sync::MutexGuard<'static, Gate> {
    GATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts one attach under way until dropped.
struct Attached;

impl Drop for Attached {
    fn drop(&mut self) {
        let mut g = gate();
        g.attached -= 1;
        if g.attached == 0 {
            IDLE.notify_all();
        }
    }
}

/// Runs `f` attached to the interpreter, from a thread of the tokio side; `None` (and `f` not
/// run) once the interpreter is exiting.
pub fn attach_unless_exiting<R>(f: impl FnOnce(Python<'_>) -> R) -> Option<R> {
    {
        let mut g = gate();
        if g.closed {
            return None;
        }
        g.attached += 1;
    }
    let _attached = Attached;
    Some(Python::attach(f))
}

/// The `atexit` hook: no tokio-side attach from now on; waits (GIL released) for those under
/// way. Not for direct use.
#[pyfunction]
pub fn at_exit(py: Python<'_>) {
    gate().closed = true;
    py.detach(|| {
        let deadline = Instant::now() + AT_EXIT_WAIT;
        let mut g = gate();
        while g.attached > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    attached = g.attached,
                    "ampybus: interpreter exit: native threads still attached after {AT_EXIT_WAIT:?}"
                );
                return;
            }
            g = IDLE
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    });
}

/// Registers [`at_exit`] with Python's `atexit`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(at_exit, m)?)?;
    let hook = m.getattr("at_exit")?;
    m.py().import("atexit")?.call_method1("register", (hook,))?;
    Ok(())
}

/// Sets an asyncio future's outcome on its loop's thread, unless it is done already
/// (cancelled meanwhile).
#[pyclass(module = "ampybus._native", frozen)]
struct Settle;

#[pymethods]
impl Settle {
    fn __call__(&self, fut: &Bound<'_, PyAny>, ok: bool, value: Bound<'_, PyAny>) -> PyResult<()> {
        let py = fut.py();
        if fut.call_method0(intern!(py, "done"))?.is_truthy()? {
            return Ok(());
        }
        let method = if ok {
            intern!(py, "set_result")
        } else {
            intern!(py, "set_exception")
        };
        fut.call_method1(method, (value,))?;
        Ok(())
    }
}

/// The done-callback of an asyncio future: tells the Rust side when it was cancelled.
#[pyclass(module = "ampybus._native", frozen)]
struct OnCancel {
    tx: Mutex<Option<oneshot::Sender<()>>>,
}

#[pymethods]
impl OnCancel {
    fn __call__(&self, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        let cancelled = fut
            .call_method0(intern!(fut.py(), "cancelled"))?
            .is_truthy()?;
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let (true, Some(tx)) = (cancelled, tx) {
            let _ = tx.send(());
        }
        Ok(())
    }
}

/// An asyncio future of the running loop, resolved with what `fut` (run on the tokio runtime)
/// returns: its value converted to Python, or its error raised. Cancelling the asyncio future
/// drops `fut`. What `pyo3_async_runtimes::tokio::future_into_py` does, with the tokio side's
/// attach through [`attach_unless_exiting`] and none at all for a cancelled future.
pub fn future_into_py<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let event_loop = py
        .import(intern!(py, "asyncio"))?
        .call_method0(intern!(py, "get_running_loop"))?;
    let py_fut = event_loop.call_method0(intern!(py, "create_future"))?;
    let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
    let on_cancel = OnCancel {
        tx: Mutex::new(Some(cancel_tx)),
    };
    py_fut.call_method1(intern!(py, "add_done_callback"), (on_cancel,))?;
    let target = py_fut.clone().unbind();
    let event_loop = event_loop.unbind();
    pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
        // A callback dropped without being called (the future collected unresolved) is not
        // a cancellation: the work goes on, as with pyo3_async_runtimes.
        let cancelled = async {
            if cancel_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            r = fut => r,
            () = cancelled => return,
        };
        attach_unless_exiting(move |py| {
            let (ok, value) = match result.and_then(|v| v.into_py_any(py)) {
                Ok(v) => (true, v),
                Err(e) => (false, e.into_value(py).into_any()),
            };
            // A closed loop refuses the call: nobody waits for this future any more.
            let _ = event_loop.call_method1(
                py,
                intern!(py, "call_soon_threadsafe"),
                (Settle, target, ok, value),
            );
        });
    });
    Ok(py_fut)
}
