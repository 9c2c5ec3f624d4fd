//! The one error type of the crate: a small closed set of kinds plus a message that names the
//! field and the rule that was broken.

use std::fmt;

/// A boxed error used as the optional cause of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for `Result<T, ampybus::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, as a closed set. Match on this; the message is for humans.
///
/// ```
/// use ampybus::{ErrorKind, Topic};
/// let err = Topic::parse("ampy.staging.bars.v1.X").unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Topic);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A topic or topic pattern broke the taxonomy rules.
    Topic,
    /// A header is missing or breaks its rule.
    Header,
    /// An envelope (JSON form, wire form) is malformed as a whole.
    Envelope,
    /// The payload cannot be encoded, decoded, inflated or fetched.
    Payload,
    /// A URL, option or configuration value is invalid.
    Config,
    /// The broker or log failed or refused the operation.
    Transport,
    /// The operation did not finish in time.
    Timeout,
    /// The handle was closed or shut down.
    Closed,
}

impl ErrorKind {
    /// A short lower-case label, stable for metrics and exit codes.
    ///
    /// ```
    /// assert_eq!(ampybus::ErrorKind::Header.as_str(), "header");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Topic => "topic",
            ErrorKind::Header => "header",
            ErrorKind::Envelope => "envelope",
            ErrorKind::Payload => "payload",
            ErrorKind::Config => "config",
            ErrorKind::Transport => "transport",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "closed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Topic => "invalid topic",
            ErrorKind::Header => "invalid header",
            ErrorKind::Envelope => "invalid envelope",
            ErrorKind::Payload => "invalid payload",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Transport => "transport error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Closed => "closed",
        };
        f.write_str(s)
    }
}

/// An ampybus error: a [`ErrorKind`], a message naming what and where, and an optional cause.
///
/// ```
/// use ampybus::{Error, ErrorKind};
/// let e = Error::new(ErrorKind::Config, "url: scheme `ftp` is not supported");
/// assert_eq!(e.to_string(), "invalid configuration: url: scheme `ftp` is not supported");
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// The field the error is about, when it was built knowing it (see [`Error::field`]).
    field: Option<Box<str>>,
    #[source]
    source: Option<BoxError>,
}

impl Error {
    /// Builds an error of `kind` with a message.
    ///
    /// ```
    /// let e = ampybus::Error::new(ampybus::ErrorKind::Closed, "bus closed");
    /// assert!(e.to_string().contains("bus closed"));
    /// ```
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            field: None,
            source: None,
        }
    }

    /// Builds an error of `kind` with a message and a cause.
    ///
    /// ```
    /// let io = std::io::Error::other("disk full");
    /// let e = ampybus::Error::with_source(ampybus::ErrorKind::Transport, "append failed", io);
    /// assert!(std::error::Error::source(&e).is_some());
    /// ```
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            field: None,
            source: Some(source.into()),
        }
    }

    /// The kind of error.
    ///
    /// ```
    /// let e = ampybus::Error::new(ampybus::ErrorKind::Timeout, "no message in 5s");
    /// assert_eq!(e.kind(), ampybus::ErrorKind::Timeout);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the kind prefix.
    ///
    /// ```
    /// let e = ampybus::Error::new(ampybus::ErrorKind::Timeout, "no message in 5s");
    /// assert_eq!(e.message(), "no message in 5s");
    /// ```
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The field the error is about — a header, option, key or token — as the code that made
    /// the error knew it, else the first name in backticks in the message (the crate's
    /// messages name what broke a rule that way); `None` when there is none. The Python SDK's
    /// `AmpybusError.field` is this value.
    ///
    /// ```
    /// use ampybus::{Error, ErrorKind, Headers, Topic};
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k").with("producer", "");
    /// let e = h.validate_for_publish(&topic).unwrap_err();
    /// assert_eq!(e.field(), Some("producer"), "{e}");
    /// let e = Error::new(ErrorKind::Config, "option `dedupe`: must be `sqlite:PATH`");
    /// assert_eq!(e.field(), Some("dedupe"));
    /// assert_eq!(Error::new(ErrorKind::Closed, "bus closed").field(), None);
    /// ```
    pub fn field(&self) -> Option<&str> {
        if let Some(f) = &self.field {
            return Some(f);
        }
        let (_, rest) = self.message.split_once('`')?;
        let (name, _) = rest.split_once('`')?;
        (!name.is_empty()).then_some(name)
    }

    pub(crate) fn topic(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Topic, message)
    }
    pub(crate) fn header(header: &str, rule: impl fmt::Display) -> Self {
        let mut e = Error::new(ErrorKind::Header, format!("`{header}`: {rule}"));
        e.field = Some(header.into());
        e
    }
    pub(crate) fn envelope(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Envelope, message)
    }
    pub(crate) fn payload(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Payload, message)
    }
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }
    pub(crate) fn transport(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::with_source(ErrorKind::Transport, message, source)
    }
}

/// Shows a value from input in an error message: quoted, escaped and cut to 80 characters.
pub(crate) fn show(value: &str) -> String {
    let mut s: String = value.chars().take(80).collect();
    if s.len() < value.len() {
        s.push('…');
    }
    format!("{s:?}")
}
