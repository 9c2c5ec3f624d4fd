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

/// The Python exception for a Rust error: the class of its kind, the message of its `Display`,
/// and the field it is about ([`Error::field`], `AmpybusError.field` in Python).
pub fn to_py(e: Error) -> PyErr {
    let field = e.field().map(str::to_owned);
    kind_err_with(e.kind(), e.to_string(), field)
}

/// An exception of the class for `kind` with `text` as its message (already prefixed).
pub fn kind_err(kind: ErrorKind, text: String) -> PyErr {
    let field = Error::new(kind, text.clone()).field().map(str::to_owned);
    kind_err_with(kind, text, field)
}

/// The exception with its message and field (the class's `__init__(message, field)`).
fn kind_err_with(kind: ErrorKind, text: String, field: Option<String>) -> PyErr {
    let args = (text, field);
    match kind {
        ErrorKind::Topic => TopicError::new_err(args),
        ErrorKind::Header => HeaderError::new_err(args),
        ErrorKind::Envelope => EnvelopeError::new_err(args),
        ErrorKind::Payload => PayloadError::new_err(args),
        ErrorKind::Config => ConfigError::new_err(args),
        ErrorKind::Transport => TransportError::new_err(args),
        ErrorKind::Timeout => TimeoutError::new_err(args),
        ErrorKind::Closed => ClosedError::new_err(args),
        _ => AmpybusError::new_err(args),
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
