//! Handlers that return a `Result`, so `?` works inside them: any error means "retry, and keep
//! this cause for the DLQ reason"; [`HandlerError::dead_letter`] dead-letters at once with a
//! [`DlqCode`]. [`handler_try`] and [`typed_try`] turn such closures into
//! [`Handler`](super::Handler)s.

use super::{DlqCode, FnHandler, Message, Outcome, TypedHandler};
use std::future::Future;
use std::time::Duration;

/// What a fallible handler returns: `Ok(())` acks, an error retries or dead-letters.
///
/// ```
/// use ampybus::runtime::{HandlerError, HandlerResult};
/// fn apply(qty: &str) -> HandlerResult {
///     let _n: u32 = qty.parse()?; // a parse error: retried, its text kept for the DLQ reason
///     Ok(())
/// }
/// assert!(apply("12").is_ok());
/// assert_eq!(apply("x").unwrap_err().cause(), "invalid digit found in string");
/// ```
pub type HandlerResult = Result<(), HandlerError>;

/// What to do with a message after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Retry { after: Option<Duration> },
    DeadLetter(DlqCode),
}

/// Why a handler failed, and what the runtime should do: retry (the default for any error
/// converted by `?`, with the error's text and its sources as the cause) or dead-letter with a
/// [`DlqCode`].
///
/// Like `anyhow::Error`, it converts from every `std::error::Error + Send + Sync + 'static`,
/// which is why it does not implement `std::error::Error` itself (the blanket conversion would
/// then overlap with `From<T> for T`). The converted error stays reachable through
/// [`HandlerError::source`].
///
/// ```
/// use ampybus::runtime::{DlqCode, HandlerError, Outcome};
/// use std::time::Duration;
/// let e: HandlerError = std::io::Error::other("disk full").into();
/// assert_eq!(Outcome::from(e), Outcome::failed("disk full"));
/// let e = HandlerError::retry_after(Duration::from_secs(2), "rate limited");
/// assert_eq!(
///     Outcome::from(e),
///     Outcome::Failed { after: Some(Duration::from_secs(2)), cause: "rate limited".into() }
/// );
/// let e = HandlerError::dead_letter(DlqCode::SchemaMismatch, "expected v2");
/// assert_eq!(Outcome::from(e), Outcome::DeadLetter("schema_mismatch: expected v2".into()));
/// ```
pub struct HandlerError {
    action: Action,
    cause: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl HandlerError {
    /// Retry after the policy's backoff, with `cause` as the reason.
    ///
    /// ```
    /// let e = ampybus::runtime::HandlerError::retry("broker busy");
    /// assert!(!e.is_dead_letter());
    /// assert_eq!(e.cause(), "broker busy");
    /// ```
    pub fn retry(cause: impl std::fmt::Display) -> HandlerError {
        HandlerError {
            action: Action::Retry { after: None },
            cause: cause.to_string(),
            source: None,
        }
    }

    /// Retry after `after` (instead of the policy's backoff), with `cause` as the reason.
    ///
    /// ```
    /// use std::time::Duration;
    /// let e = ampybus::runtime::HandlerError::retry_after(Duration::from_millis(50), "slow down");
    /// assert_eq!(e.retry_delay(), Some(Duration::from_millis(50)));
    /// ```
    pub fn retry_after(after: Duration, cause: impl std::fmt::Display) -> HandlerError {
        HandlerError {
            action: Action::Retry { after: Some(after) },
            cause: cause.to_string(),
            source: None,
        }
    }

    /// Dead-letter now with `code` (the `dlq_reason` header becomes `code: detail`). A message
    /// that can never be applied (poison) should say so, rather than use up its retries.
    ///
    /// ```
    /// use ampybus::runtime::{DlqCode, HandlerError};
    /// let e = HandlerError::dead_letter(DlqCode::HandlerError, "unknown account");
    /// assert_eq!(e.dlq_code(), Some(DlqCode::HandlerError));
    /// assert_eq!(e.to_string(), "handler_error: unknown account");
    /// ```
    pub fn dead_letter(code: DlqCode, detail: impl std::fmt::Display) -> HandlerError {
        HandlerError {
            action: Action::DeadLetter(code),
            cause: detail.to_string(),
            source: None,
        }
    }

    /// The same failure, dead-lettered now with `code` instead of retried (its cause kept).
    ///
    /// ```
    /// use ampybus::runtime::{DlqCode, HandlerError};
    /// fn parse(b: &[u8]) -> Result<u32, HandlerError> {
    ///     let s = std::str::from_utf8(b).map_err(|e| HandlerError::from(e).poison(DlqCode::DecodeError))?;
    ///     Ok(s.parse()?)
    /// }
    /// assert_eq!(parse(&[0xff]).unwrap_err().dlq_code(), Some(DlqCode::DecodeError));
    /// assert_eq!(parse(b"x").unwrap_err().dlq_code(), None);
    /// ```
    pub fn poison(mut self, code: DlqCode) -> HandlerError {
        self.action = Action::DeadLetter(code);
        self
    }

    /// The cause: the text given, or the converted error's text followed by its sources
    /// (`outer: inner: …`).
    ///
    /// ```
    /// let e = ampybus::runtime::HandlerError::retry("timeout");
    /// assert_eq!(e.cause(), "timeout");
    /// ```
    pub fn cause(&self) -> &str {
        &self.cause
    }

    /// The `DlqCode` when this error dead-letters, `None` when it retries.
    ///
    /// ```
    /// assert_eq!(ampybus::runtime::HandlerError::retry("x").dlq_code(), None);
    /// ```
    pub fn dlq_code(&self) -> Option<DlqCode> {
        match self.action {
            Action::DeadLetter(code) => Some(code),
            Action::Retry { .. } => None,
        }
    }

    /// True when this error dead-letters the message at once.
    ///
    /// ```
    /// use ampybus::runtime::{DlqCode, HandlerError};
    /// assert!(HandlerError::dead_letter(DlqCode::HandlerError, "x").is_dead_letter());
    /// ```
    pub fn is_dead_letter(&self) -> bool {
        self.dlq_code().is_some()
    }

    /// The explicit retry delay, if one was given.
    ///
    /// ```
    /// assert_eq!(ampybus::runtime::HandlerError::retry("x").retry_delay(), None);
    /// ```
    pub fn retry_delay(&self) -> Option<Duration> {
        match self.action {
            Action::Retry { after } => after,
            Action::DeadLetter(_) => None,
        }
    }

    /// The error converted by `?`, if this came from one (e.g. to downcast it).
    ///
    /// ```
    /// use ampybus::runtime::HandlerError;
    /// let e: HandlerError = std::io::Error::other("gone").into();
    /// assert!(e.source().unwrap().downcast_ref::<std::io::Error>().is_some());
    /// ```
    pub fn source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(e: E) -> HandlerError {
        let mut cause = e.to_string();
        let mut next = e.source();
        while let Some(inner) = next {
            let text = inner.to_string();
            // Errors that already print their source would repeat it.
            if !cause.ends_with(&text) {
                cause.push_str(": ");
                cause.push_str(&text);
            }
            next = inner.source();
        }
        HandlerError {
            action: Action::Retry { after: None },
            cause,
            source: Some(Box::new(e)),
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.action {
            Action::DeadLetter(code) => f.write_str(&code.reason(&self.cause)),
            Action::Retry { .. } => f.write_str(&self.cause),
        }
    }
}

impl std::fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerError")
            .field("action", &self.action)
            .field("cause", &self.cause)
            .finish_non_exhaustive()
    }
}

impl From<HandlerError> for Outcome {
    fn from(e: HandlerError) -> Outcome {
        match e.action {
            Action::Retry { after } => Outcome::Failed {
                after,
                cause: e.cause,
            },
            Action::DeadLetter(code) => Outcome::DeadLetter(code.reason(&e.cause)),
        }
    }
}

impl From<HandlerResult> for Outcome {
    /// `Ok(())` is [`Outcome::Ok`]; an error as in `From<HandlerError>`.
    fn from(r: HandlerResult) -> Outcome {
        match r {
            Ok(()) => Outcome::Ok,
            Err(e) => e.into(),
        }
    }
}

/// Wraps an async closure `Fn(Message) -> impl Future<Output = HandlerResult>` as a
/// [`Handler`](super::Handler): `Ok(())` acks; an error from `?` retries with its text kept, so a message
/// that runs out of attempts is dead-lettered with `max_retries: attempt N: <error>`;
/// [`HandlerError::dead_letter`] dead-letters at once with its code.
///
/// ```
/// use ampybus::runtime::{DlqCode, Handler, HandlerError, handler_try};
/// let h = handler_try(|msg| async move {
///     if msg.payload.is_empty() {
///         return Err(HandlerError::dead_letter(DlqCode::HandlerError, "empty"));
///     }
///     let text = std::str::from_utf8(&msg.payload)?; // retried on error
///     let _qty: u64 = text.parse()?;
///     Ok(())
/// });
/// fn is_handler(_: &impl Handler) {}
/// is_handler(&h);
/// ```
pub fn handler_try<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    FnHandler(f)
}

/// [`typed`](super::typed) with a closure returning a [`HandlerResult`]: the payload is
/// checked and decoded as `M` (a mismatch or a decode failure dead-letters as there), then
/// the closure's result maps as in [`handler_try`].
///
/// ```
/// use ampybus::runtime::{DlqCode, Handler, HandlerError, typed_try};
/// #[derive(Clone, PartialEq, prost::Message)]
/// struct Order { #[prost(string, tag = "1")] qty: String }
/// impl prost::Name for Order {
///     const NAME: &'static str = "Order";
///     const PACKAGE: &'static str = "demo.v1";
/// }
/// let h = typed_try(|o: Order, _msg| async move {
///     let qty: u32 = o.qty.parse()?;
///     if qty == 0 {
///         return Err(HandlerError::dead_letter(DlqCode::HandlerError, "zero quantity"));
///     }
///     Ok(())
/// });
/// fn is_handler(_: &impl Handler) {}
/// is_handler(&h);
/// ```
pub fn typed_try<M, F, Fut>(f: F) -> TypedHandler<M, F>
where
    M: prost::Message + prost::Name + Default + Send + 'static,
    F: Fn(M, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    TypedHandler {
        f,
        _m: std::marker::PhantomData,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot write position")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_converted_error_keeps_its_source_chain_as_the_cause() {
        let e: HandlerError = Outer(std::io::Error::other("disk full")).into();
        assert_eq!(e.cause(), "cannot write position: disk full");
        assert_eq!(e.dlq_code(), None);
        assert!(e.source().unwrap().downcast_ref::<Outer>().is_some());
        assert_eq!(
            Outcome::from(e),
            Outcome::failed("cannot write position: disk full")
        );
    }

    #[test]
    fn a_dead_letter_carries_its_code_and_poison_keeps_the_cause() {
        let e = HandlerError::dead_letter(DlqCode::DecodeError, "bad\nbytes");
        assert_eq!(
            Outcome::from(e),
            Outcome::DeadLetter("decode_error: bad bytes".into())
        );
        let e = HandlerError::retry("late").poison(DlqCode::HandlerError);
        assert_eq!(
            Outcome::from(Err(e)),
            Outcome::DeadLetter("handler_error: late".into())
        );
        assert_eq!(Outcome::from(HandlerResult::Ok(())), Outcome::Ok);
    }
}
