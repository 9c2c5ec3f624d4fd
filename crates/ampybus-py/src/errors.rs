//! Rust errors as Python exceptions: one class per [`ampybus::ErrorKind`], all subclasses of
//! `ampybus.AmpybusError`, defined in `python/ampybus/errors.py` and raised from here with the
//! same text as the Rust error's `Display` (`invalid header: `producer`: …`).

use ampybus::{Error, ErrorKind};
use pyo3::PyErr;

pyo3::import_exception!(ampybus.errors, AmpybusError);
pyo3::import_exception!(ampybus.errors, TopicError);
pyo3::import_exception!(ampybus.errors, HeaderError);
pyo3::import_exception!(ampybus.errors, EnvelopeError);
pyo3::import_exception!(ampybus.errors, PayloadError);
pyo3::import_exception!(ampybus.errors, ConfigError);
pyo3::import_exception!(ampybus.errors, TransportError);
pyo3::import_exception!(ampybus.errors, TimeoutError);
pyo3::import_exception!(ampybus.errors, ClosedError);

/// The Python exception for a Rust error: the class of its kind, the message of its `Display`.
pub fn to_py(e: Error) -> PyErr {
    kind_err(e.kind(), e.to_string())
}

/// An exception of the class for `kind` with `text` as its message (already prefixed).
pub fn kind_err(kind: ErrorKind, text: String) -> PyErr {
    match kind {
        ErrorKind::Topic => TopicError::new_err(text),
        ErrorKind::Header => HeaderError::new_err(text),
        ErrorKind::Envelope => EnvelopeError::new_err(text),
        ErrorKind::Payload => PayloadError::new_err(text),
        ErrorKind::Config => ConfigError::new_err(text),
        ErrorKind::Transport => TransportError::new_err(text),
        ErrorKind::Timeout => TimeoutError::new_err(text),
        ErrorKind::Closed => ClosedError::new_err(text),
        _ => AmpybusError::new_err(text),
    }
}

/// An error of `kind` built here, formatted exactly as the core formats its own.
pub fn new_err(kind: ErrorKind, message: impl Into<String>) -> PyErr {
    to_py(Error::new(kind, message))
}

/// `?`-friendly conversion of `ampybus::Result` into `PyResult`.
pub trait OrRaise<T> {
    /// Maps the error with [`to_py`].
    fn or_raise(self) -> pyo3::PyResult<T>;
}

impl<T> OrRaise<T> for ampybus::Result<T> {
    fn or_raise(self) -> pyo3::PyResult<T> {
        self.map_err(to_py)
    }
}
