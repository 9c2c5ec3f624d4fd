//! A service: several consumers and producers on one bus, one ops endpoint (`/health`,
//! `/metrics`, `/stats`), one shutdown on SIGINT/SIGTERM with one deadline, combined stats, and
//! a middleware seam — layers wrapped around every handler (timing, auth, enrichment).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use ampybus::runtime::{DlqCode, HandlerError, handler_try};
//! use ampybus::service::{Service, StopReason};
//! use ampybus::{Bus, Headers, Topic};
//! use std::time::Duration;
//! let dir = tempfile::tempdir().unwrap();
//! let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
//! let service = Service::builder(bus.clone())
//!     .consumer("ampy.dev.orders.>", "oms", handler_try(|msg| async move {
//!         let qty: u32 = std::str::from_utf8(&msg.payload)?.parse()?; // an error: retried
//!         if qty == 0 {
//!             return Err(HandlerError::dead_letter(DlqCode::HandlerError, "zero quantity"));
//!         }
//!         Ok(())
//!     }))
//!     .consumer_with("ampy.dev.fills.>", "positions", handler_try(|_m| async { Ok(()) }), |c| {
//!         c.workers(8).strict(true)
//!     })
//!     .ops_addr("127.0.0.1:0")
//!     .shutdown_deadline(Duration::from_secs(10))
//!     .start()
//!     .await
//!     .unwrap();
//! let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
//! bus.publish(&topic, Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "co-1"), b"5".to_vec())
//!     .await.unwrap();
//! while service.stats().total().handled_ok < 1 {
//!     tokio::time::sleep(Duration::from_millis(5)).await;
//! }
//! assert!(service.ops_addr().is_some());
//! // In a real service: `let report = service.run().await;` (returns on SIGINT or SIGTERM)
//! // and `std::process::exit(report.reason.exit_code().into())`.
//! let report = service.run_until(async {}).await;
//! assert_eq!(report.reason, StopReason::Requested);
//! assert_eq!(report.stats.consumer("oms").unwrap().handled_ok, 1);
//! # });
//! ```

use crate::bus::Bus;
use crate::error::{Error, ErrorKind, Result};
use crate::ops::{ObsServer, serve_with};
use crate::runtime::{
    Consumer, ConsumerBuilder, ConsumerHandle, ConsumerMonitor, ConsumerStats, Handler, Producer,
    ProducerStats, shutdown_signal,
};
use crate::topic::TopicPattern;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A layer around every handler of a [`Service`]: given the consumer's name and its handler,
/// returns the handler to run instead — one that may look at or change the message (a header
/// added, a copy enriched), time it, refuse it (an [`Outcome`](crate::Outcome) without
/// calling the inner handler: e.g. a dead letter for a message without credentials) or map
/// the inner handler's outcome. Forward [`Handler::handle_now`] too, so the inner handler's
/// fast path (an answer without a future) is kept.
///
/// Layers are applied in the order they were added: the first one added is the outermost
/// (sees the message first). A closure `Fn(&str, Arc<dyn Handler>) -> Arc<dyn Handler>` is a
/// middleware.
///
/// ```
/// use ampybus::runtime::{DlqCode, Handler, Message, Outcome};
/// use ampybus::service::Middleware;
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// /// Dead-letters messages without an `auth` header, counts the rest.
/// struct Auth { seen: Arc<AtomicU64> }
/// struct AuthLayer { inner: Arc<dyn Handler>, seen: Arc<AtomicU64> }
///
/// impl AuthLayer {
///     fn check(&self, msg: &Message) -> Option<Outcome> {
///         self.seen.fetch_add(1, Ordering::Relaxed);
///         msg.headers.get("auth").is_none()
///             .then(|| Outcome::DeadLetter(DlqCode::HandlerError.reason("unauthenticated")))
///     }
/// }
///
/// #[async_trait::async_trait]
/// impl Handler for AuthLayer {
///     async fn handle(&self, msg: &Message) -> Outcome {
///         match self.check(msg) {
///             Some(refused) => refused,
///             None => self.inner.handle(msg).await,
///         }
///     }
///     fn handle_now(&self, msg: &Message) -> Option<Outcome> {
///         // Asked first: refuse here, else the inner fast path (or `handle` on `None`,
///         // which would count twice — so count only when answering here).
///         let inner = self.inner.handle_now(msg)?;
///         Some(self.check(msg).unwrap_or(inner))
///     }
/// }
///
/// impl Middleware for Auth {
///     fn wrap(&self, _consumer: &str, inner: Arc<dyn Handler>) -> Arc<dyn Handler> {
///         Arc::new(AuthLayer { inner, seen: self.seen.clone() })
///     }
/// }
/// let _m: Box<dyn Middleware> = Box::new(Auth { seen: Arc::default() });
/// ```
pub trait Middleware: Send + Sync + 'static {
    /// The handler to run for consumer `consumer` instead of `inner`.
    fn wrap(&self, consumer: &str, inner: Arc<dyn Handler>) -> Arc<dyn Handler>;
}

impl<F> Middleware for F
where
    F: Fn(&str, Arc<dyn Handler>) -> Arc<dyn Handler> + Send + Sync + 'static,
{
    fn wrap(&self, consumer: &str, inner: Arc<dyn Handler>) -> Arc<dyn Handler> {
        self(consumer, inner)
    }
}

type Configure = Box<dyn FnOnce(ConsumerBuilder) -> ConsumerBuilder + Send>;

/// What a consumer of the service applies messages with.
enum Applies {
    /// A handler (wrapped in the service's layers).
    Handler(Arc<dyn Handler>),
    /// An inbox with its handler, bound to the consumer's name at start (the bound handler
    /// is wrapped in the service's layers).
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    Inbox(Box<dyn crate::inbox::InboxBinding>),
}

struct ConsumerSpec {
    /// Another handle than the service's (see [`ServiceBuilder::consumer_on`]).
    bus: Option<Bus>,
    pattern: String,
    name: String,
    applies: Applies,
    configure: Option<Configure>,
}

/// Builds a [`Service`]; see [`Service::builder`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::runtime::{Outcome, handler_sync};
/// let dir = tempfile::tempdir().unwrap();
/// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let b = ampybus::service::Service::builder(bus)
///     .consumer("ampy.dev.bars.>", "bars", handler_sync(|_m| Outcome::Ok));
/// let service = b.start().await.unwrap();
/// assert_eq!(service.consumer_names(), ["bars"]);
/// service.shutdown().await;
/// # });
/// ```
pub struct ServiceBuilder {
    bus: Bus,
    consumers: Vec<ConsumerSpec>,
    producers: Vec<(String, Arc<Producer>)>,
    layers: Vec<Arc<dyn Middleware>>,
    ops_addr: Option<String>,
    ops_routes: axum::Router,
    deadline: Duration,
}

impl std::fmt::Debug for ServiceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBuilder")
            .field(
                "consumers",
                &self.consumers.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .field(
                "producers",
                &self.producers.iter().map(|p| &p.0).collect::<Vec<_>>(),
            )
            .field("layers", &self.layers.len())
            .field("ops_addr", &self.ops_addr)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl ServiceBuilder {
    /// Adds a consumer of `pattern` (NATS-style, checked by [`ServiceBuilder::start`]) named
    /// `name` (its durable name: unique within the service) with the runtime's defaults.
    ///
    /// ```no_run
    /// # let bus: ampybus::Bus = todo!();
    /// use ampybus::runtime::handler_try;
    /// let b = ampybus::service::Service::builder(bus)
    ///     .consumer("ampy.prod.fills.>", "positions", handler_try(|_m| async { Ok(()) }));
    /// ```
    pub fn consumer(self, pattern: &str, name: &str, handler: impl Handler) -> Self {
        self.push_consumer(pattern, name, Applies::Handler(Arc::new(handler)), None)
    }

    /// [`ServiceBuilder::consumer`] with options: `configure` gets the [`ConsumerBuilder`]
    /// (handler set) and returns it with workers, retry policy, order, dedupe store, start
    /// position, … as [`Consumer::builder`] takes them.
    ///
    /// ```no_run
    /// # let bus: ampybus::Bus = todo!();
    /// use ampybus::runtime::{RetryPolicy, handler_try};
    /// let b = ampybus::service::Service::builder(bus).consumer_with(
    ///     "ampy.prod.orders.>",
    ///     "oms",
    ///     handler_try(|_m| async { Ok(()) }),
    ///     |c| c.workers(8).retry(RetryPolicy { max_attempts: 3, ..RetryPolicy::default() }),
    /// );
    /// ```
    pub fn consumer_with(
        self,
        pattern: &str,
        name: &str,
        handler: impl Handler,
        configure: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder + Send + 'static,
    ) -> Self {
        self.push_consumer(
            pattern,
            name,
            Applies::Handler(Arc::new(handler)),
            Some(Box::new(configure)),
        )
    }

    /// [`ServiceBuilder::consumer_with`] on another handle of the same bus: e.g.
    /// `bus.clone().with_service("oms")`, so that under a registry each consumer is checked
    /// as the service it belongs to. Its metrics and its entry in `/health` and `/stats` are
    /// shared with the service's handle as for any clone.
    ///
    /// ```no_run
    /// # let bus: ampybus::Bus = todo!();
    /// use ampybus::runtime::handler_try;
    /// let b = ampybus::service::Service::builder(bus.clone()).consumer_on(
    ///     bus.clone().with_service("oms"),
    ///     "ampy.prod.signals.>",
    ///     "oms",
    ///     handler_try(|_m| async { Ok(()) }),
    ///     |c| c,
    /// );
    /// ```
    pub fn consumer_on(
        self,
        bus: Bus,
        pattern: &str,
        name: &str,
        handler: impl Handler,
        configure: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder + Send + 'static,
    ) -> Self {
        let b = self.push_consumer(
            pattern,
            name,
            Applies::Handler(Arc::new(handler)),
            Some(Box::new(configure)),
        );
        b.on_bus(bus)
    }

    /// Adds a consumer of `pattern` named `name` that applies each message once through a
    /// transactional inbox ([`crate::inbox`]): what
    /// [`ConsumerBuilder::inbox`](crate::runtime::ConsumerBuilder::inbox) makes, declared like
    /// any other consumer of the service — started, counted (`/stats`, the
    /// [`ServiceReport`]) and stopped with the others. `inbox` is the inbox with its handler
    /// (`SqliteInbox::handler`, `PgInbox::handler`); the service binds it to `name` at
    /// [`ServiceBuilder::start`]. A message applied before is acked without calling the
    /// handler: it counts as `handled_ok` and in the inbox's `skipped(name)` and
    /// `bus_inbox_skipped_total{consumer}`. The service's layers wrap the whole inbox step (the
    /// transaction, the insert, the handler, the commit): a layer sees every message, those
    /// the inbox skips too, before any transaction is opened, and an outcome it returns
    /// without calling the inner handler touches no database. Needs the `inbox-postgres` or
    /// `inbox-sqlite` feature.
    ///
    /// ```
    /// # #[cfg(feature = "inbox-sqlite")]
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::inbox::sqlite::SqliteInbox;
    /// use ampybus::runtime::Outcome;
    /// use ampybus::service::Service;
    /// use ampybus::{Bus, Headers, Topic};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().join("log").to_str().unwrap()).await.unwrap();
    /// let inbox = SqliteInbox::open(dir.path().join("positions.sqlite3")).unwrap();
    /// inbox.connection().unwrap()
    ///     .execute_batch("CREATE TABLE fills (message_id TEXT PRIMARY KEY)").unwrap();
    /// let service = Service::builder(bus.clone())
    ///     .inbox_consumer("ampy.dev.fills.>", "positions", inbox.handler(|msg, tx| {
    ///         // The effect commits with the message's inbox row, or not at all.
    ///         match tx.execute("INSERT INTO fills VALUES (?1)", [msg.headers.message_id()]) {
    ///             Ok(_) => Outcome::Ok,
    ///             Err(_) => Outcome::Retry { after: None },
    ///         }
    ///     }))
    ///     .start()
    ///     .await
    ///     .unwrap();
    /// let topic = Topic::parse("ampy.dev.fills.v1.sim").unwrap();
    /// let h = Headers::for_publish("ampy.fills.v1.FillEvent", "oms@1", "oms", "acct|co_1");
    /// bus.publish(&topic, h.clone(), b"f".to_vec()).await.unwrap();
    /// bus.publish(&topic, h, b"f".to_vec()).await.unwrap(); // the same message_id again
    /// while service.stats().total().handled_ok < 2 {
    ///     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    /// }
    /// let report = service.shutdown().await;
    /// assert_eq!(report.stats.consumer("positions").unwrap().handled_ok, 2);
    /// assert_eq!(inbox.skipped("positions"), 1);
    /// # });
    /// ```
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    pub fn inbox_consumer(
        self,
        pattern: &str,
        name: &str,
        inbox: impl crate::inbox::InboxBinding,
    ) -> Self {
        self.push_consumer(pattern, name, Applies::Inbox(Box::new(inbox)), None)
    }

    /// [`ServiceBuilder::inbox_consumer`] with options, as [`ServiceBuilder::consumer_with`]
    /// takes them (workers — the inbox's default when not set, retry policy, start position,
    /// …; the inbox replaces the dedupe store, leave `dedupe` unset).
    ///
    /// ```no_run
    /// # #[cfg(feature = "inbox-sqlite")]
    /// # async fn f(bus: ampybus::Bus) -> ampybus::Result<()> {
    /// use ampybus::inbox::sqlite::SqliteInbox;
    /// use ampybus::runtime::{Outcome, RetryPolicy};
    /// let inbox = SqliteInbox::open("/var/lib/positions.sqlite3")?;
    /// let service = ampybus::service::Service::builder(bus)
    ///     .inbox_consumer_with(
    ///         "ampy.prod.fills.>",
    ///         "positions",
    ///         inbox.handler(|_msg, _tx| Outcome::Ok),
    ///         |c| c.workers(4).retry(RetryPolicy { max_attempts: 3, ..RetryPolicy::default() }),
    ///     )
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    pub fn inbox_consumer_with(
        self,
        pattern: &str,
        name: &str,
        inbox: impl crate::inbox::InboxBinding,
        configure: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder + Send + 'static,
    ) -> Self {
        self.push_consumer(
            pattern,
            name,
            Applies::Inbox(Box::new(inbox)),
            Some(Box::new(configure)),
        )
    }

    /// [`ServiceBuilder::inbox_consumer_with`] on another handle of the same bus, as
    /// [`ServiceBuilder::consumer_on`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "inbox-sqlite")]
    /// # async fn f(bus: ampybus::Bus) -> ampybus::Result<()> {
    /// use ampybus::inbox::sqlite::SqliteInbox;
    /// use ampybus::runtime::Outcome;
    /// let inbox = SqliteInbox::open("/var/lib/positions.sqlite3")?;
    /// let b = ampybus::service::Service::builder(bus.clone()).inbox_consumer_on(
    ///     bus.clone().with_service("positions"),
    ///     "ampy.prod.fills.>",
    ///     "positions",
    ///     inbox.handler(|_msg, _tx| Outcome::Ok),
    ///     |c| c,
    /// );
    /// # Ok(()) }
    /// ```
    #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
    pub fn inbox_consumer_on(
        self,
        bus: Bus,
        pattern: &str,
        name: &str,
        inbox: impl crate::inbox::InboxBinding,
        configure: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder + Send + 'static,
    ) -> Self {
        self.inbox_consumer_with(pattern, name, inbox, configure)
            .on_bus(bus)
    }

    /// The last consumer added runs on `bus`.
    fn on_bus(mut self, bus: Bus) -> Self {
        if let Some(c) = self.consumers.last_mut() {
            c.bus = Some(bus);
        }
        self
    }

    fn push_consumer(
        mut self,
        pattern: &str,
        name: &str,
        applies: Applies,
        configure: Option<Configure>,
    ) -> Self {
        self.consumers.push(ConsumerSpec {
            bus: None,
            pattern: pattern.to_owned(),
            name: name.to_owned(),
            applies,
            configure,
        });
        self
    }

    /// Adds a producer started by the caller (handlers usually hold a clone of the `Arc`).
    /// The service reports its stats under `name` and, at shutdown, after every consumer has
    /// stopped, publishes what it still holds within the same deadline (closing it when the
    /// service holds the last reference, else flushing it).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::runtime::Producer;
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let producer = std::sync::Arc::new(Producer::builder(bus.clone()).start().unwrap());
    /// let service = ampybus::service::Service::builder(bus)
    ///     .producer("signals", producer.clone())
    ///     .start()
    ///     .await
    ///     .unwrap();
    /// drop(producer);
    /// let report = service.shutdown().await;
    /// assert_eq!(report.stats.producers[0].0, "signals");
    /// # });
    /// ```
    pub fn producer(mut self, name: &str, producer: Arc<Producer>) -> Self {
        self.producers.push((name.to_owned(), producer));
        self
    }

    /// Adds a middleware layer around every handler (the first added is the outermost).
    ///
    /// ```no_run
    /// # let bus: ampybus::Bus = todo!();
    /// use ampybus::runtime::Handler;
    /// use std::sync::Arc;
    /// let b = ampybus::service::Service::builder(bus)
    ///     .layer(|consumer: &str, inner: Arc<dyn Handler>| {
    ///         tracing::info!(consumer, "wrapping");
    ///         inner
    ///     });
    /// ```
    pub fn layer(mut self, middleware: impl Middleware) -> Self {
        self.layers.push(Arc::new(middleware));
        self
    }

    /// Serves `/health`, `/metrics` and `/stats` on `addr` (e.g. `0.0.0.0:9464`; port 0 picks
    /// one, see [`Service::ops_addr`]) while the service runs; see [`crate::ops::serve`] for
    /// what each returns.
    ///
    /// ```no_run
    /// # let bus: ampybus::Bus = todo!();
    /// let b = ampybus::service::Service::builder(bus).ops_addr("127.0.0.1:9464");
    /// ```
    pub fn ops_addr(mut self, addr: &str) -> Self {
        self.ops_addr = Some(addr.to_owned());
        self
    }

    /// The service's own routes, served next to the three of [`ServiceBuilder::ops_addr`]
    /// (see [`crate::ops::serve_with`]).
    ///
    /// ```no_run
    /// # let bus: ampybus::Bus = todo!();
    /// use axum::routing::get;
    /// let b = ampybus::service::Service::builder(bus)
    ///     .ops_addr("127.0.0.1:0")
    ///     .ops_routes(axum::Router::new().route("/version", get(|| async { "1.0" })));
    /// ```
    pub fn ops_routes(mut self, routes: axum::Router) -> Self {
        self.ops_routes = routes;
        self
    }

    /// How long the shutdown may take in all (default 30 s): running handlers finish within
    /// it, then producers publish what they hold; what is left is released for redelivery.
    ///
    /// ```no_run
    /// # let bus: ampybus::Bus = todo!();
    /// let b = ampybus::service::Service::builder(bus)
    ///     .shutdown_deadline(std::time::Duration::from_secs(10));
    /// ```
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Checks the configuration (patterns parse, consumer and producer names are non-empty
    /// and unique), then starts every consumer in the order added and the ops endpoint. On
    /// an error, what was started is shut down again and the error names the consumer and
    /// the field.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::runtime::{Outcome, handler_sync};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let err = ampybus::service::Service::builder(bus)
    ///     .consumer("ampy.dev.>", "a", handler_sync(|_m| Outcome::Ok))
    ///     .consumer("ampy.dev.>", "a", handler_sync(|_m| Outcome::Ok))
    ///     .start()
    ///     .await
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), ampybus::ErrorKind::Config);
    /// assert!(err.to_string().contains(r#"consumer "a": name: given twice"#), "{err}");
    /// # });
    /// ```
    pub async fn start(self) -> Result<Service> {
        let config = |what: String| Error::new(ErrorKind::Config, format!("service: {what}"));
        let mut patterns = Vec::with_capacity(self.consumers.len());
        for (i, c) in self.consumers.iter().enumerate() {
            if c.name.trim().is_empty() {
                return Err(config(format!("consumer {i}: name: must not be empty")));
            }
            if self.consumers[..i].iter().any(|o| o.name == c.name) {
                return Err(config(format!("consumer {:?}: name: given twice", c.name)));
            }
            let p = TopicPattern::parse(&c.pattern)
                .map_err(|e| config(format!("consumer {:?}: pattern: {e}", c.name)))?;
            patterns.push(p);
        }
        for (i, (name, _)) in self.producers.iter().enumerate() {
            if name.trim().is_empty() {
                return Err(config(format!("producer {i}: name: must not be empty")));
            }
            if self.producers[..i].iter().any(|o| &o.0 == name) {
                return Err(config(format!("producer {name:?}: name: given twice")));
            }
        }
        let mut consumers = Vec::with_capacity(self.consumers.len());
        for (spec, pattern) in self.consumers.into_iter().zip(patterns) {
            let bus = spec.bus.unwrap_or_else(|| self.bus.clone());
            let wrap = |inner: Arc<dyn Handler>| {
                self.layers
                    .iter()
                    .rev()
                    .fold(inner, |h, layer| layer.wrap(&spec.name, h))
            };
            let builder = Consumer::builder(bus.clone(), pattern, &spec.name);
            let mut builder = match spec.applies {
                Applies::Handler(h) => builder.handler_arc(wrap(h)),
                #[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
                Applies::Inbox(inbox) => {
                    let workers = inbox.workers();
                    let bound = inbox.bind(&spec.name, bus.metrics());
                    builder.inbox_handler(wrap(bound), workers)
                }
            };
            if let Some(configure) = spec.configure {
                builder = configure(builder);
            }
            match builder.start().await {
                Ok(h) => consumers.push(h),
                Err(e) => {
                    stop_consumers(consumers, self.deadline).await;
                    let what = format!("service: consumer {:?}: {}", spec.name, e.message());
                    return Err(Error::with_source(e.kind(), what, e));
                }
            }
        }
        let ops = match &self.ops_addr {
            Some(addr) => match serve_with(&self.bus, addr, self.ops_routes).await {
                Ok(s) => Some(s),
                Err(e) => {
                    stop_consumers(consumers, self.deadline).await;
                    return Err(e);
                }
            },
            None => None,
        };
        Ok(Service {
            consumers,
            producers: self.producers,
            ops,
            deadline: self.deadline,
        })
    }
}

async fn stop_consumers(
    consumers: Vec<ConsumerHandle>,
    deadline: Duration,
) -> Vec<(String, ConsumerStats)> {
    futures::future::join_all(consumers.into_iter().map(|c| async move {
        let name = c.name().to_owned();
        (name, c.shutdown(deadline).await)
    }))
    .await
}

/// Why a service stopped.
///
/// ```
/// use ampybus::service::StopReason;
/// assert_eq!(StopReason::Terminate.exit_code(), 0);
/// assert_eq!(StopReason::Interrupt.exit_code(), 130);
/// assert_eq!(StopReason::Interrupt.as_str(), "SIGINT");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM: the normal way to stop a service.
    Terminate,
    /// The future given to [`Service::run_until`] resolved, or [`Service::shutdown`].
    Requested,
}

impl StopReason {
    /// `SIGINT`, `SIGTERM` or `requested`.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Interrupt => "SIGINT",
            StopReason::Terminate => "SIGTERM",
            StopReason::Requested => "requested",
        }
    }

    /// The process exit code of a service stopped this way, the rule of the README's
    /// exit-code table for open-ended commands: 130 after SIGINT, 0 after SIGTERM (after
    /// draining) or a requested stop.
    pub fn exit_code(self) -> u8 {
        match self {
            StopReason::Interrupt => 130,
            StopReason::Terminate | StopReason::Requested => 0,
        }
    }
}

/// The counts of every consumer and producer of a service, by name, in the order added.
///
/// ```
/// use ampybus::runtime::ConsumerStats;
/// use ampybus::service::ServiceStats;
/// let s = ServiceStats {
///     consumers: vec![
///         ("a".into(), ConsumerStats { handled_ok: 2, ..Default::default() }),
///         ("b".into(), ConsumerStats { handled_ok: 3, retried: 1, ..Default::default() }),
///     ],
///     producers: vec![],
/// };
/// assert_eq!(s.consumer("b").unwrap().retried, 1);
/// assert_eq!((s.total().handled_ok, s.total().retried), (5, 1));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Each consumer's counts.
    pub consumers: Vec<(String, ConsumerStats)>,
    /// Each producer's counts.
    pub producers: Vec<(String, ProducerStats)>,
}

impl ServiceStats {
    /// The counts of the consumer named `name`.
    pub fn consumer(&self, name: &str) -> Option<&ConsumerStats> {
        self.consumers.iter().find(|c| c.0 == name).map(|c| &c.1)
    }

    /// The counts of the producer named `name`.
    pub fn producer(&self, name: &str) -> Option<&ProducerStats> {
        self.producers.iter().find(|p| p.0 == name).map(|p| &p.1)
    }

    /// Every consumer's counts added up.
    pub fn total(&self) -> ConsumerStats {
        let mut t = ConsumerStats::default();
        for (_, s) in &self.consumers {
            t.handled_ok += s.handled_ok;
            t.retried += s.retried;
            t.skipped_duplicates += s.skipped_duplicates;
            t.released += s.released;
            t.in_flight += s.in_flight;
            for (code, n) in &s.dead_lettered {
                *t.dead_lettered.entry(*code).or_default() += n;
            }
        }
        t
    }
}

/// What [`Service::run`] (or `run_until`, `shutdown`) returns after the shutdown.
///
/// ```
/// let r = ampybus::service::ServiceReport {
///     reason: ampybus::service::StopReason::Terminate,
///     stats: Default::default(),
///     problems: vec![],
///     drain: std::time::Duration::from_millis(3),
/// };
/// assert_eq!(r.reason.exit_code(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct ServiceReport {
    /// Why it stopped.
    pub reason: StopReason,
    /// The final counts.
    pub stats: ServiceStats,
    /// What did not stop cleanly (a producer that could not publish everything in time, or
    /// whose publishes failed), one line each; empty after a clean stop.
    pub problems: Vec<String>,
    /// How long the shutdown took.
    pub drain: Duration,
}

/// A running service; see the [module docs](self) for an example.
pub struct Service {
    consumers: Vec<ConsumerHandle>,
    producers: Vec<(String, Arc<Producer>)>,
    ops: Option<ObsServer>,
    deadline: Duration,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("consumers", &self.consumer_names())
            .field("ops_addr", &self.ops_addr())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A builder on `bus` (no consumer, no producer, no ops endpoint, a 30 s deadline).
    ///
    /// ```no_run
    /// # let bus: ampybus::Bus = todo!();
    /// let builder = ampybus::service::Service::builder(bus);
    /// ```
    pub fn builder(bus: Bus) -> ServiceBuilder {
        ServiceBuilder {
            bus,
            consumers: Vec::new(),
            producers: Vec::new(),
            layers: Vec::new(),
            ops_addr: None,
            ops_routes: axum::Router::new(),
            deadline: Duration::from_secs(30),
        }
    }

    /// The bound address of the ops endpoint, when one was asked for.
    ///
    /// ```
    /// # async fn f(service: ampybus::service::Service) {
    /// if let Some(addr) = service.ops_addr() { println!("ops on http://{addr}/health"); }
    /// # }
    /// ```
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops.as_ref().map(ObsServer::local_addr)
    }

    /// The consumers' names, in the order added.
    ///
    /// ```
    /// # async fn f(service: ampybus::service::Service) {
    /// for name in service.consumer_names() { println!("{name}"); }
    /// # }
    /// ```
    pub fn consumer_names(&self) -> Vec<&str> {
        self.consumers.iter().map(ConsumerHandle::name).collect()
    }

    /// The running consumer named `name` (its stats, lag watch, monitor).
    ///
    /// ```
    /// # async fn f(service: ampybus::service::Service) {
    /// let handled = service.consumer("oms").map(|c| c.stats().handled_ok);
    /// # }
    /// ```
    pub fn consumer(&self, name: &str) -> Option<&ConsumerHandle> {
        self.consumers.iter().find(|c| c.name() == name)
    }

    /// A read-only view of every consumer, for checks that outlive a borrow of the service.
    ///
    /// ```
    /// # async fn f(service: ampybus::service::Service) {
    /// let monitors = service.monitors();
    /// let report = service.shutdown().await;
    /// assert!(monitors.iter().all(|m| m.is_stopped()));
    /// # }
    /// ```
    pub fn monitors(&self) -> Vec<ConsumerMonitor> {
        self.consumers.iter().map(ConsumerHandle::monitor).collect()
    }

    /// The counts of every consumer and producer now.
    ///
    /// ```
    /// # async fn f(service: ampybus::service::Service) {
    /// println!("handled {}", service.stats().total().handled_ok);
    /// # }
    /// ```
    pub fn stats(&self) -> ServiceStats {
        ServiceStats {
            consumers: self
                .consumers
                .iter()
                .map(|c| (c.name().to_owned(), c.stats()))
                .collect(),
            producers: self
                .producers
                .iter()
                .map(|(n, p)| (n.clone(), p.stats()))
                .collect(),
        }
    }

    /// Runs until SIGINT or SIGTERM (Ctrl-C elsewhere), then shuts down (see
    /// [`Service::shutdown`]); the report says which signal — map it to the exit code with
    /// [`StopReason::exit_code`]. The signal listeners are installed by this call, before the
    /// returned future first runs.
    ///
    /// ```no_run
    /// # async fn f(service: ampybus::service::Service) {
    /// let report = service.run().await;
    /// std::process::exit(report.reason.exit_code().into());
    /// # }
    /// ```
    pub fn run(self) -> impl Future<Output = ServiceReport> + Send {
        self.run_until(std::future::pending())
    }

    /// [`Service::run`], also stopping when `stop` resolves (e.g. a cancellation token's
    /// `cancelled()`, a oneshot receiver, a timer).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let service = ampybus::service::Service::builder(bus).start().await.unwrap();
    /// let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    /// tx.send(()).unwrap();
    /// let report = service.run_until(async { let _ = rx.await; }).await;
    /// assert_eq!(report.reason, ampybus::service::StopReason::Requested);
    /// # });
    /// ```
    pub fn run_until(
        self,
        stop: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = ServiceReport> + Send {
        let signal = shutdown_signal();
        async move {
            let reason = tokio::select! {
                s = signal => if s == "SIGTERM" { StopReason::Terminate } else { StopReason::Interrupt },
                () = stop => StopReason::Requested,
            };
            tracing::info!(
                reason = reason.as_str(),
                "service: stop requested; shutting down"
            );
            self.stop(reason).await
        }
    }

    /// Shuts down now ([`StopReason::Requested`]): every consumer stops fetching and drains
    /// at the same time — running handlers finish within the deadline, everything else is
    /// released for redelivery, acks are flushed — then the producers publish what they hold
    /// within what is left of the same deadline, then the ops endpoint stops.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let service = ampybus::service::Service::builder(bus).start().await.unwrap();
    /// let report = service.shutdown().await;
    /// assert!(report.problems.is_empty());
    /// # });
    /// ```
    pub async fn shutdown(self) -> ServiceReport {
        self.stop(StopReason::Requested).await
    }

    async fn stop(self, reason: StopReason) -> ServiceReport {
        let started = Instant::now();
        let consumers = stop_consumers(self.consumers, self.deadline).await;
        let mut producers = Vec::with_capacity(self.producers.len());
        let mut problems = Vec::new();
        for (name, p) in self.producers {
            let rest = self.deadline.saturating_sub(started.elapsed());
            let stats = p.stats();
            let done = match Arc::try_unwrap(p) {
                Ok(p) => tokio::time::timeout(rest, p.close()).await,
                Err(shared) => {
                    tokio::time::timeout(rest, async {
                        shared.flush().await.map(|()| shared.stats())
                    })
                    .await
                }
            };
            match done {
                Ok(Ok(s)) => producers.push((name, s)),
                Ok(Err(e)) => {
                    problems.push(format!("producer {name:?}: {e}"));
                    producers.push((name, stats));
                }
                Err(_) => {
                    problems.push(format!(
                        "producer {name:?}: not everything published within the shutdown deadline"
                    ));
                    producers.push((name, stats));
                }
            }
        }
        if let Some(ops) = self.ops {
            ops.shutdown().await;
        }
        ServiceReport {
            reason,
            stats: ServiceStats {
                consumers,
                producers,
            },
            problems,
            drain: started.elapsed(),
        }
    }
}
