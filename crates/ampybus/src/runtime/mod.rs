//! The consumer runtime, written once above the transport traits: handlers, per-key ordering
//! with many workers, retries with backoff, dead-lettering, dedupe, batched acks and graceful
//! shutdown; plus a publisher with retries and a [`Producer`] with a bounded publish queue
//! (backpressure, best-effort shedding, consumer-lag slow-down).
//!
//! ## What happens to a delivery
//!
//! 1. The topic is parsed and the headers normalised ([`Headers::normalize_for_consume`]);
//!    a failure dead-letters it with `contract_violation`. The payload is made raw (blob
//!    fetched and verified, gzip inflated): `decode_error` / `blob_hash_mismatch` dead-letter
//!    at once; an unavailable blob is retried like a handler retry.
//! 2. Dedupe: skipped (and acked) when its `message_id` or `{domain}:{dedupe_key}` was applied
//!    by this consumer name within the store's window, or is being handled right now here.
//! 3. The handler runs ([`Outcome`]); a panic dead-letters with `handler_panic`. The attempt
//!    number is `delivery_count - 1` plus the attempts made in this process; after
//!    `max_attempts` the message is dead-lettered with `max_retries: <last error>`.
//! 4. Acks are batched (a few ms or 1,024 messages); dedupe records for `Ok` messages are
//!    written in one transaction right before the ack of the same batch.
//!
//! ## Dead-lettering
//!
//! The DLQ message goes to `topic.dlq_topic()` (`ampy.{env}.dlq.v1.{domain}`) with the original
//! payload bytes as carried and the original headers, plus `dlq_reason` (`code: detail`, see
//! [`DlqCode`]), `original_topic`, `retry_count` (the incoming `retry_count` plus the delivery attempts of this consumer), `dlq_at`,
//! `dlq_consumer`, `payload_hash` (`sha256:` of the carried bytes). It gets a new
//! `message_id`; the old one is kept in [`ORIGINAL_MESSAGE_ID`]. Original headers that would
//! break publish validation are moved to `original_<name>` (see [`build_dlq_envelope`]).
//! A topic that does not parse cannot name its DLQ exactly: the message goes to
//! `ampy.{env}.dlq.v1.{domain}` using the env and domain tokens of the raw topic when they are
//! valid, else the env token of the subscription pattern, else `prod`, and the domain
//! `control`; the raw topic is kept in [`ORIGINAL_TOPIC_RAW`]. Nothing is ever dropped. The
//! DLQ write is retried with backoff until it succeeds (or shutdown releases the message);
//! the original is acked only after it.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use ampybus::runtime::{Consumer, Outcome, handler_fn};
//! use ampybus::{Bus, Headers, Topic, TopicPattern};
//! use std::time::Duration;
//! let dir = tempfile::tempdir().unwrap();
//! let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
//! let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
//! bus.publish(&topic, Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k"), b"hi".to_vec())
//!     .await.unwrap();
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let handle = Consumer::builder(bus.clone(), TopicPattern::parse("ampy.dev.news.>").unwrap(), "reader")
//!     .handler(handler_fn(move |msg| {
//!         let tx = tx.clone();
//!         async move { tx.send(msg.payload.clone()).unwrap(); Outcome::Ok }
//!     }))
//!     .start()
//!     .await
//!     .unwrap();
//! assert_eq!(&rx.recv().await.unwrap()[..], b"hi");
//! let stats = handle.shutdown(Duration::from_secs(5)).await;
//! assert_eq!(stats.handled_ok, 1);
//! # });
//! ```

mod consumer;
pub mod control;
mod dlq;
mod fallible;
pub mod feeds;
mod lag;
mod producer;
mod publisher;
pub mod replay;
mod shed;

pub use crate::dlq::{
    DLQ_ONLY_HEADERS, DlqCode, ORIGINAL_MESSAGE_ID, ORIGINAL_TOPIC_RAW, REDRIVE_CONSUMER,
    build_dlq_envelope, redrive_envelope,
};
pub use crate::obs::{ConsumerStats, DropCounts, DropReason, ProducerStats};
#[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
pub use consumer::InboxBinding;
pub use consumer::{Consumer, ConsumerBuilder, ConsumerHandle, ConsumerMonitor};
pub use dlq::{RedrivePlan, plan_redrive, record_redriven};
pub use fallible::{HandlerError, HandlerResult, handler_try, typed_try};
pub use lag::{DEFAULT_LAG_ALERT, LagEvent, LagWatch};
pub use producer::{Producer, ProducerBuilder, SendOutcome, ShedClass};
pub use publisher::Publisher;
pub use shed::{SHED_AT_PERCENT, ShedMonitor, ShedOptions, ShedStats, shedding};

use crate::headers::Headers;
use crate::topic::Topic;
use crate::transport::DeliveryInfo;
use async_trait::async_trait;
use bytes::Bytes;
use std::future::Future;
use std::time::Duration;

/// A message ready for a handler.
///
/// ```
/// use ampybus::runtime::Message;
/// use ampybus::{Headers, Topic, transport::DeliveryInfo};
/// let m = Message {
///     topic: Topic::parse("ampy.dev.news.v1.raw").unwrap(),
///     headers: Headers::new(),
///     payload: bytes::Bytes::from_static(b"x"),
///     info: DeliveryInfo { sequence: 1, delivery_count: 1, stored_at: chrono::Utc::now() },
/// };
/// assert_eq!(m.topic.as_str(), "ampy.dev.news.v1.raw");
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    /// The concrete topic.
    pub topic: Topic,
    /// Headers after [`Headers::normalize_for_consume`].
    pub headers: Headers,
    /// The raw payload: inflated, blob fetched and verified.
    pub payload: Bytes,
    /// Sequence, delivery count, store time.
    pub info: DeliveryInfo,
}

/// What a handler decided.
///
/// ```
/// use ampybus::runtime::Outcome;
/// let o = Outcome::Retry { after: None };
/// assert_ne!(o, Outcome::Ok);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: ack it (and record it for dedupe).
    Ok,
    /// Try again later: after `after`, or after the policy's backoff when `None`.
    Retry {
        /// Explicit delay; `None` uses exponential backoff with full jitter.
        after: Option<Duration>,
    },
    /// Poison: dead-letter now. A reason written as `code: detail` with a known [`DlqCode`]
    /// is kept as is; anything else becomes `handler_error: <reason>`.
    DeadLetter(String),
    /// The attempt failed with `cause`: retried like [`Outcome::Retry`], and the cause is
    /// kept, so a message that runs out of attempts is dead-lettered with
    /// `max_retries: attempt N: <cause>`. What a [`HandlerError`] from `?` becomes.
    Failed {
        /// Explicit delay; `None` uses exponential backoff with full jitter.
        after: Option<Duration>,
        /// Why the attempt failed (one line in the DLQ reason).
        cause: String,
    },
}

impl Outcome {
    /// [`Outcome::Failed`] with the policy's backoff.
    ///
    /// ```
    /// use ampybus::runtime::Outcome;
    /// let o = Outcome::failed("database unavailable");
    /// assert_eq!(o, Outcome::Failed { after: None, cause: "database unavailable".into() });
    /// ```
    pub fn failed(cause: impl Into<String>) -> Outcome {
        Outcome::Failed {
            after: None,
            cause: cause.into(),
        }
    }
}

/// Handles messages. Implement it, or use [`handler_fn`] / [`typed`] for closures.
///
/// ```
/// use ampybus::runtime::{Handler, Message, Outcome};
/// struct Count(std::sync::atomic::AtomicU64);
/// #[async_trait::async_trait]
/// impl Handler for Count {
///     async fn handle(&self, _msg: &Message) -> Outcome {
///         self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         Outcome::Ok
///     }
/// }
/// let _h: Box<dyn Handler> = Box::new(Count(Default::default()));
/// ```
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    async fn handle(&self, msg: &Message) -> Outcome;

    /// For a handler that decides without awaiting anything: the runtime asks here first and
    /// awaits [`Handler::handle`] only when this answers `None` (the default). Answering
    /// here spares the boxed future `handle` returns (one allocation per message); panics
    /// are caught as in `handle`. [`handler_sync`] makes such a handler from a closure.
    ///
    /// ```
    /// use ampybus::runtime::{Handler, Message, Outcome};
    /// struct Book;
    /// #[async_trait::async_trait]
    /// impl Handler for Book {
    ///     async fn handle(&self, msg: &Message) -> Outcome {
    ///         self.handle_now(msg).unwrap_or(Outcome::Ok)
    ///     }
    ///     fn handle_now(&self, msg: &Message) -> Option<Outcome> {
    ///         // update an order book from `msg.payload` …
    ///         Some(if msg.payload.is_empty() { Outcome::DeadLetter("empty".into()) } else { Outcome::Ok })
    ///     }
    /// }
    /// ```
    fn handle_now(&self, msg: &Message) -> Option<Outcome> {
        let _ = msg;
        None
    }
}

/// A shared handler is a handler (both paths forwarded), so an `Arc<dyn Handler>` kept
/// elsewhere — e.g. to hand it a message again, or to wrap it in a middleware layer — can be
/// given wherever `impl Handler` is taken.
///
/// ```
/// use ampybus::runtime::{Handler, Outcome, handler_sync};
/// use std::sync::Arc;
/// let shared: Arc<dyn Handler> = Arc::new(handler_sync(|_m| Outcome::Ok));
/// fn is_handler(_: &impl Handler) {}
/// is_handler(&shared);
/// ```
// Written out (not `#[async_trait]`): the shared handler's own future is returned as it is,
// where an `async` forwarding would box a second future around it on every message.
impl<H: Handler + ?Sized> Handler for std::sync::Arc<H> {
    fn handle<'life0, 'life1, 'async_trait>(
        &'life0 self,
        msg: &'life1 Message,
    ) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        (**self).handle(msg)
    }

    fn handle_now(&self, msg: &Message) -> Option<Outcome> {
        (**self).handle_now(msg)
    }
}

/// A handler made from a closure that decides at once, borrowing the message; see
/// [`handler_sync`].
///
/// ```
/// let h: ampybus::runtime::SyncFnHandler<_> =
///     ampybus::runtime::handler_sync(|_m| ampybus::runtime::Outcome::Ok);
/// let _shared: std::sync::Arc<dyn ampybus::runtime::Handler> = std::sync::Arc::new(h);
/// ```
#[derive(Clone)]
pub struct SyncFnHandler<F>(F);

impl<F> std::fmt::Debug for SyncFnHandler<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncFnHandler")
    }
}

/// Wraps a closure `Fn(&Message) -> Outcome` as a [`Handler`] that answers without a future
/// ([`Handler::handle_now`]): for handlers that do their work in memory (an order book, a
/// feature window, a counter) and await nothing. The runtime gives it the same guarantees
/// (per-key order, retries, DLQ, dedupe, panics caught).
///
/// ```
/// use ampybus::runtime::{Handler, Outcome, handler_sync};
/// let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
/// let s = seen.clone();
/// let h = handler_sync(move |msg| {
///     s.fetch_add(msg.payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
///     Outcome::Ok
/// });
/// fn is_handler(_: &impl Handler) {}
/// is_handler(&h);
/// ```
pub fn handler_sync<F>(f: F) -> SyncFnHandler<F>
where
    F: Fn(&Message) -> Outcome + Send + Sync + 'static,
{
    SyncFnHandler(f)
}

#[async_trait]
impl<F> Handler for SyncFnHandler<F>
where
    F: Fn(&Message) -> Outcome + Send + Sync + 'static,
{
    async fn handle(&self, msg: &Message) -> Outcome {
        (self.0)(msg)
    }

    fn handle_now(&self, msg: &Message) -> Option<Outcome> {
        Some((self.0)(msg))
    }
}

/// A handler made from an async closure taking an owned [`Message`]; see [`handler_fn`].
///
/// ```
/// let h: ampybus::runtime::FnHandler<_> = ampybus::runtime::handler_fn(|_m| async {
///     ampybus::runtime::Outcome::Ok
/// });
/// let _shared: std::sync::Arc<dyn ampybus::runtime::Handler> = std::sync::Arc::new(h);
/// ```
#[derive(Clone)]
pub struct FnHandler<F>(F);

impl<F> std::fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnHandler")
    }
}

/// Wraps an async closure `Fn(Message) -> impl Future<Output = Outcome>` as a [`Handler`].
///
/// ```
/// use ampybus::runtime::{Handler, Outcome, handler_fn};
/// let h = handler_fn(|msg| async move {
///     if msg.payload.is_empty() { Outcome::DeadLetter("empty".into()) } else { Outcome::Ok }
/// });
/// fn is_handler(_: &impl Handler) {}
/// is_handler(&h);
/// ```
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    FnHandler(f)
}

/// Also the handler of [`handler_try`], whose closure's future gives a [`HandlerResult`].
#[async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Into<Outcome>,
{
    async fn handle(&self, msg: &Message) -> Outcome {
        (self.0)(msg.clone()).await.into()
    }
}

/// A handler that checks `schema_fqdn` and decodes a protobuf payload; see [`typed`].
///
/// ```
/// use ampybus::runtime::{Outcome, TypedHandler, typed};
/// #[derive(Clone, PartialEq, prost::Message)]
/// struct Tick { #[prost(int64, tag = "1")] seconds: i64 }
/// impl prost::Name for Tick {
///     const NAME: &'static str = "Tick";
///     const PACKAGE: &'static str = "demo.v1";
/// }
/// let h: TypedHandler<Tick, _> = typed(|t: Tick, _msg| async move {
///     if t.seconds >= 0 { Outcome::Ok } else { Outcome::DeadLetter("negative".into()) }
/// });
/// let _shared: std::sync::Arc<dyn ampybus::runtime::Handler> = std::sync::Arc::new(h);
/// ```
pub struct TypedHandler<M, F> {
    f: F,
    _m: std::marker::PhantomData<fn() -> M>,
}

impl<M, F> std::fmt::Debug for TypedHandler<M, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TypedHandler")
    }
}

/// Wraps an async closure `Fn(M, Message)` for a protobuf type `M`. A message whose
/// `schema_fqdn` is not `M::full_name()` is dead-lettered with
/// `schema_mismatch: expected X got Y`; one that does not decode with `decode_error: …`.
///
/// ```
/// use ampybus::runtime::{Handler, Outcome, typed};
/// #[derive(Clone, PartialEq, prost::Message)]
/// struct Ping { #[prost(string, tag = "1")] id: String }
/// impl prost::Name for Ping {
///     const NAME: &'static str = "Ping";
///     const PACKAGE: &'static str = "demo.v1";
/// }
/// let h = typed(|ping: Ping, _msg| async move {
///     if ping.id.is_empty() { Outcome::DeadLetter("no id".into()) } else { Outcome::Ok }
/// });
/// fn is_handler(_: &impl Handler) {}
/// is_handler(&h);
/// ```
pub fn typed<M, F, Fut>(f: F) -> TypedHandler<M, F>
where
    M: prost::Message + prost::Name + Default + Send + 'static,
    F: Fn(M, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    TypedHandler {
        f,
        _m: std::marker::PhantomData,
    }
}

/// Also the handler of [`typed_try`], whose closure's future gives a [`HandlerResult`].
#[async_trait]
impl<M, F, Fut> Handler for TypedHandler<M, F>
where
    M: prost::Message + prost::Name + Default + Send + 'static,
    F: Fn(M, Message) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Into<Outcome>,
{
    async fn handle(&self, msg: &Message) -> Outcome {
        match decode_typed::<M>(msg) {
            Ok(m) => (self.f)(m, msg.clone()).await.into(),
            Err(dead) => dead,
        }
    }
}

/// Checks `schema_fqdn` against `M` and decodes the payload; the error is the dead-letter
/// outcome ([`DlqCode::SchemaMismatch`] or [`DlqCode::DecodeError`]). Shared by [`typed`] and
/// [`typed_try`].
pub(crate) fn decode_typed<M>(msg: &Message) -> Result<M, Outcome>
where
    M: prost::Message + prost::Name + Default,
{
    let expected = M::full_name();
    let got = msg.headers.schema_fqdn().unwrap_or_default();
    if got != expected {
        return Err(Outcome::DeadLetter(
            DlqCode::SchemaMismatch.reason(&format!("expected {expected} got {got}")),
        ));
    }
    M::decode(msg.payload.clone())
        .map_err(|e| Outcome::DeadLetter(DlqCode::DecodeError.reason(&format!("{expected}: {e}"))))
}

/// Retry policy: bounded attempts, exponential backoff with full jitter.
///
/// The delay before attempt `n + 1` is uniform in `[0, min(max_delay, min_delay · 2^(n-1))]`.
///
/// ```
/// use ampybus::runtime::RetryPolicy;
/// use std::time::Duration;
/// let p = RetryPolicy::default();
/// assert_eq!(p.max_attempts, 5);
/// assert_eq!(p.bound(1), Duration::from_millis(100));
/// assert_eq!(p.bound(3), Duration::from_millis(400));
/// assert_eq!(p.bound(30), Duration::from_secs(30));
/// assert!(p.backoff(3) <= Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff bound after the first failure.
    pub min_delay: Duration,
    /// Largest backoff bound.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the delay after failed attempt `attempt` (1-based).
    pub fn bound(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(30);
        self.min_delay
            .saturating_mul(1u32 << shift)
            .min(self.max_delay)
    }

    /// A full-jitter delay after failed attempt `attempt`: uniform in `[0, bound(attempt)]`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let bound = self.bound(attempt).as_micros() as u64;
        Duration::from_micros(rand::random_range(0..=bound))
    }
}

/// Resolves when the process is asked to stop: SIGINT (Ctrl-C) or SIGTERM on Unix, Ctrl-C
/// elsewhere, with the signal's name. The listeners are installed when this function is
/// called (not when the future is first polled), so a signal sent right after the call is
/// not missed. Must be called inside a tokio runtime.
///
/// ```no_run
/// # async fn run(handle: ampybus::ConsumerHandle) {
/// let signal = ampybus::runtime::shutdown_signal().await;
/// tracing::info!(signal, "stopping");
/// let stats = handle.shutdown(std::time::Duration::from_secs(30)).await;
/// # let _ = stats; }
/// ```
///
/// [`ConsumerHandle::run_until_signal`] does exactly that.
pub fn shutdown_signal() -> impl Future<Output = &'static str> + Send + 'static {
    #[cfg(unix)]
    let listeners = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        if let (Some(mut int), Some(mut term)) = listeners {
            return tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
