//! # ampybus-py
//!
//! The Python SDK of ampybus: the native module `ampybus._native`, built with PyO3 and maturin
//! from the same Rust core (`ampybus`) the CLI and Rust services use, so a Python service gets
//! the same contract checks, consumer runtime (at-least-once, per-key order, dedupe, retries,
//! DLQ, replay) and transports. The Pythonic API (`ampybus.connect`, `Bus`, `Subscription`,
//! exceptions) is in `python/ampybus/`; this crate is what it calls.
//!
//! Every operation that waits on the log or a broker is awaitable from asyncio: the Rust future
//! runs on a tokio runtime without the GIL, and only the result is handed back to the event
//! loop. The hot paths (publish, a consumer waiting for messages) resolve asyncio futures in
//! batches through a per-loop completer (`completer.rs`; no GIL taken on the tokio side); the rest uses
//! `aio::future_into_py`. No tokio thread attaches to the interpreter once it exits (`aio.rs`:
//! an `atexit` hook closes the gate every such attach goes through).
//!
//! Build and test: `scripts/python-sdk.sh test` (a venv in `.venv-ampybus/`, `maturin develop`
//! on the workspace's target dir, then pytest).

mod aio;
mod bus;
mod completer;
mod consumer;
mod errors;
mod inbox;
mod message;

use pyo3::prelude::*;

/// The native module. Not for direct use: import `ampybus`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(bus::connect, m)?)?;
    m.add_class::<bus::NativeBus>()?;
    m.add_class::<completer::Completer>()?;
    m.add_class::<bus::MetricsServer>()?;
    m.add_class::<consumer::NativeConsumer>()?;
    m.add_class::<message::PyHeaders>()?;
    m.add_class::<message::PyMessage>()?;
    m.add_class::<message::PyStored>()?;
    m.add_class::<message::Receipt>()?;
    m.add_class::<message::Ready>()?;
    inbox::register(m)?;
    aio::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("RAW_BYTES_SCHEMA", ampybus::headers::RAW_BYTES_SCHEMA)?;
    Ok(())
}
