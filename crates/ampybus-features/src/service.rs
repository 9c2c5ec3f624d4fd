//! The service around the [`FeatureEngine`]: a consumer of `ampy.{env}.ticks.v1.>`, the
//! rate-limited feature publisher, the signal publisher, and the HTTP routes
//! `/state/latest?symbol=` and `/features/latest?symbol=` served next to the bus's own
//! `/health`, `/metrics`, `/stats` ([`ampybus::ops::serve_with`]).

use crate::engine::{Direction, FeatureEngine, RateLimiter, SignalRule, TickEvent, time_json};
use ampybus::runtime::feeds::Clock;
use ampybus::runtime::{Consumer, ConsumerHandle, ConsumerStats, DlqCode, Message, Outcome};
use ampybus::transport::StartAt;
use ampybus::{Bus, Error, ErrorKind, Headers, Topic, TopicPattern, partition};
use ampybus_proto::ampy::common::v1::{ActionType, Decimal, SecurityId, SignalType};
use ampybus_proto::ampy::metrics::v1::{Metric, MetricBatch};
use ampybus_proto::ampy::signals::v1::{Signal, signal};
use ampybus_proto::ampy::ticks::v1::{QuoteTick, Tick, TickBatch, TradeTick, tick};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prost::Message as _;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Payload types the service reads on the ticks topics.
pub const TICK_SCHEMAS: [&str; 4] = [
    "ampy.ticks.v1.TradeTick",
    "ampy.ticks.v1.QuoteTick",
    "ampy.ticks.v1.Tick",
    "ampy.ticks.v1.TickBatch",
];
/// The heartbeat payload (`ampy.{env}.ticks.v1.heartbeat.{source}`): read and ignored.
const HEARTBEAT_SCHEMA: &str = "ampy.metrics.v1.Metric";
const METRIC_BATCH: &str = "ampy.metrics.v1.MetricBatch";
const SIGNAL: &str = "ampy.signals.v1.Signal";

/// How the service runs.
///
/// ```
/// let c = ampybus_features::ServiceConfig::new("dev", "md-features");
/// assert_eq!(c.publish_interval, std::time::Duration::from_millis(100));
/// assert_eq!(c.model_id, "md-features");
/// ```
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// `dev`, `paper` or `prod`: the `{env}` of every topic.
    pub env: String,
    /// The service name: metric keys `{service}|{SYMBOL}`, the `source` header.
    pub service: String,
    /// The `producer` header of what it publishes (`{service}@{pid}` by default).
    pub producer: String,
    /// The durable consumer name (the service name by default).
    pub consumer: String,
    /// Signals go to `ampy.{env}.signals.v1.{model_id}`.
    pub model_id: String,
    /// The signals' `horizon` (and the last part of their key).
    pub horizon: String,
    /// At most one feature batch per symbol per interval (100 ms = the seed's 10 Hz).
    pub publish_interval: Duration,
    /// The signal rule.
    pub rule: SignalRule,
    /// Where a new durable consumer starts.
    pub start_at: StartAt,
}

impl ServiceConfig {
    /// Defaults for `service` on `env`.
    ///
    /// ```
    /// let c = ampybus_features::ServiceConfig::new("prod", "feat");
    /// assert_eq!(c.consumer, "feat");
    /// assert_eq!(c.horizon, "10s");
    /// ```
    pub fn new(env: &str, service: &str) -> Self {
        ServiceConfig {
            env: env.to_owned(),
            service: service.to_owned(),
            producer: format!("{service}@{}", std::process::id()),
            consumer: service.to_owned(),
            model_id: service.to_owned(),
            horizon: "10s".to_owned(),
            publish_interval: Duration::from_millis(100),
            rule: SignalRule::default(),
            start_at: StartAt::Earliest,
        }
    }
}

/// Counters of a running service.
///
/// ```
/// assert_eq!(ampybus_features::ServiceStats::default().ticks, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Messages handled (whatever their outcome).
    pub messages: u64,
    /// Ticks applied to the state.
    pub ticks: u64,
    /// Ticks older than their symbol's window, ignored.
    pub late: u64,
    /// Heartbeat messages read (and ignored).
    pub heartbeats: u64,
    /// Feature batches published.
    pub features_published: u64,
    /// Feature publishes skipped by the rate limit.
    pub rate_limited: u64,
    /// Signals published.
    pub signals_published: u64,
}

struct Shared {
    bus: Bus,
    cfg: ServiceConfig,
    clock: Arc<dyn Clock>,
    engine: Mutex<FeatureEngine>,
    limiter: Mutex<RateLimiter>,
    /// Outputs of a message whose publish failed, by message id: a redelivery republishes
    /// them instead of applying the ticks twice.
    pending: Mutex<HashMap<String, Vec<Output>>>,
    /// These counters are also the service's families on the bus's `/metrics`
    /// (`features_*_total{service}`).
    ticks: Counter,
    late: Counter,
    heartbeats: Counter,
    features_published: Counter,
    rate_limited: Counter,
    signals_published: Counter,
    handled: tokio::sync::watch::Sender<u64>,
}

#[derive(Clone)]
struct Output {
    topic: Topic,
    fqdn: &'static str,
    key: String,
    payload: Vec<u8>,
}

/// A running features service; stop it with [`FeaturesService::shutdown`].
pub struct FeaturesService {
    shared: Arc<Shared>,
    consumer: ConsumerHandle,
    server: Option<ampybus::ops::ObsServer>,
}

impl std::fmt::Debug for FeaturesService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeaturesService")
            .field("service", &self.shared.cfg.service)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Decimal → f64; the scale must be in 0..=18.
fn decimal(d: Option<&Decimal>, field: &str) -> Result<f64, String> {
    let d = d.ok_or_else(|| format!("{field}: required"))?;
    if !(0..=18).contains(&d.scale) {
        return Err(format!("{field}.scale {}: must be 0..=18", d.scale));
    }
    Ok(d.scaled as f64 / 10f64.powi(d.scale))
}

fn timestamp(t: Option<&prost_types::Timestamp>, field: &str) -> Result<DateTime<Utc>, String> {
    let t = t.ok_or_else(|| format!("{field}: required"))?;
    u32::try_from(t.nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(t.seconds, n))
        .ok_or_else(|| {
            format!(
                "{field}: not a valid timestamp ({}s {}ns)",
                t.seconds, t.nanos
            )
        })
}

fn non_negative(v: i64, field: &str) -> Result<f64, String> {
    if v < 0 {
        return Err(format!("{field} {v}: must be >= 0"));
    }
    Ok(v as f64)
}

/// (symbol, mic) of a tick; the symbol must be usable as a topic token.
fn security(s: Option<&SecurityId>, what: &str) -> Result<(String, String), String> {
    let s = s.ok_or_else(|| format!("{what}.security: required"))?;
    if s.symbol.is_empty() {
        return Err(format!("{what}.security.symbol: required"));
    }
    if s.mic.is_empty() {
        return Err(format!("{what}.security.mic: required"));
    }
    if Topic::parse(&format!("ampy.dev.metrics.v1.features.{}", s.symbol)).is_err() {
        return Err(format!(
            "{what}.security.symbol {:?}: not usable as a topic token (no '.', '*', '>' or whitespace)",
            s.symbol
        ));
    }
    // The signal key carries `SYMBOL.MIC`: check its shape before anything is applied.
    partition::check_key(
        ampybus::Domain::Signals,
        &partition::signals("m", &s.symbol, &s.mic, None),
    )
    .map_err(|e| format!("{what}.security {}.{}: {e}", s.symbol, s.mic))?;
    Ok((s.symbol.clone(), s.mic.clone()))
}

/// One decoded tick: symbol, MIC, event (what [`decode_ticks`] returns).
///
/// ```
/// let t: ampybus_features::DecodedTick = ("MSFT".into(), "XNAS".into(),
///     ampybus_features::TickEvent::Trade { price: 1.0, size: 1.0, event_time: chrono::Utc::now() });
/// assert_eq!(t.1, "XNAS");
/// ```
pub type DecodedTick = (String, String, TickEvent);
type Parsed = DecodedTick;

fn trade(t: &TradeTick) -> Result<Parsed, String> {
    let (sym, mic) = security(t.security.as_ref(), "TradeTick")?;
    Ok((
        sym,
        mic,
        TickEvent::Trade {
            price: decimal(t.price.as_ref(), "TradeTick.price")?,
            size: non_negative(t.size, "TradeTick.size")?,
            event_time: timestamp(t.event_time.as_ref(), "TradeTick.event_time")?,
        },
    ))
}

fn quote(q: &QuoteTick) -> Result<Parsed, String> {
    let (sym, mic) = security(q.security.as_ref(), "QuoteTick")?;
    Ok((
        sym,
        mic,
        TickEvent::Quote {
            bid: decimal(q.bid.as_ref(), "QuoteTick.bid")?,
            bid_size: non_negative(q.bid_size, "QuoteTick.bid_size")?,
            ask: decimal(q.ask.as_ref(), "QuoteTick.ask")?,
            ask_size: non_negative(q.ask_size, "QuoteTick.ask_size")?,
            event_time: timestamp(q.event_time.as_ref(), "QuoteTick.event_time")?,
        },
    ))
}

fn one(t: &Tick) -> Result<Parsed, String> {
    match &t.kind {
        Some(tick::Kind::Trade(x)) => trade(x),
        Some(tick::Kind::Quote(x)) => quote(x),
        None => Err("Tick.kind: required (trade or quote)".into()),
    }
}

/// Decodes a ticks-topic payload into ticks, or the DLQ reason (`schema_mismatch`,
/// `decode_error`, `contract_violation`: `code: detail` naming the field and the rule).
/// `Ok(None)` for a heartbeat.
///
/// ```
/// use ampybus_proto::ampy::ticks::v1::TradeTick;
/// use prost::Message;
/// let r = ampybus_features::decode_ticks("ampy.ticks.v1.TradeTick",
///                                        &TradeTick::default().encode_to_vec());
/// assert_eq!(r.unwrap_err(), "contract_violation: TradeTick.security: required");
/// let r = ampybus_features::decode_ticks("ampy.bars.v1.BarBatch", b"");
/// assert!(r.unwrap_err().starts_with("schema_mismatch: "));
/// ```
pub fn decode_ticks(fqdn: &str, payload: &[u8]) -> Result<Option<Vec<DecodedTick>>, String> {
    fn dec<M: prost::Message + Default>(fqdn: &str, b: &[u8]) -> Result<M, String> {
        M::decode(b).map_err(|e| DlqCode::DecodeError.reason(&format!("{fqdn}: {e}")))
    }
    let cv = |e: String| DlqCode::ContractViolation.reason(&e);
    let ticks = match fqdn {
        "ampy.ticks.v1.TradeTick" => vec![trade(&dec(fqdn, payload)?).map_err(cv)?],
        "ampy.ticks.v1.QuoteTick" => vec![quote(&dec(fqdn, payload)?).map_err(cv)?],
        "ampy.ticks.v1.Tick" => vec![one(&dec(fqdn, payload)?).map_err(cv)?],
        "ampy.ticks.v1.TickBatch" => {
            let b: TickBatch = dec(fqdn, payload)?;
            b.ticks
                .iter()
                .enumerate()
                .map(|(i, t)| one(t).map_err(|e| cv(format!("ticks[{i}]: {e}"))))
                .collect::<Result<_, _>>()?
        }
        HEARTBEAT_SCHEMA => return Ok(None),
        other => {
            return Err(DlqCode::SchemaMismatch.reason(&format!(
                "expected one of {} (or {HEARTBEAT_SCHEMA} on heartbeat topics) got {other}",
                TICK_SCHEMAS.join(", ")
            )));
        }
    };
    Ok(Some(ticks))
}

fn proto_time(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

impl Shared {
    fn output(
        &self,
        topic: &str,
        fqdn: &'static str,
        key: String,
        payload: Vec<u8>,
    ) -> Result<Output, String> {
        let topic = Topic::parse(topic)
            .map_err(|e| DlqCode::ContractViolation.reason(&format!("topic {topic}: {e}")))?;
        Ok(Output {
            topic,
            fqdn,
            key,
            payload,
        })
    }

    /// Applies the ticks and returns what to publish.
    fn apply(&self, ticks: Vec<Parsed>) -> Result<Vec<Output>, String> {
        let now = self.clock.now();
        let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        let mut touched: BTreeMap<String, String> = BTreeMap::new();
        for (sym, mic, ev) in ticks {
            match engine.apply(&sym, &mic, ev, now.wall) {
                crate::engine::Applied::Updated => {
                    self.ticks.inc();
                    touched.insert(sym, mic);
                }
                crate::engine::Applied::Late => {
                    self.late.inc();
                }
            }
        }
        let mut out = Vec::new();
        let mut limiter = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        let (svc, env) = (&self.cfg.service, &self.cfg.env);
        for (sym, mic) in touched {
            let Some(f) = engine.features(&sym) else {
                continue;
            };
            let at = f.at.map(proto_time);
            if limiter.allow(&sym, now.instant) {
                let labels: BTreeMap<String, String> = [
                    ("symbol".to_owned(), sym.clone()),
                    ("service".to_owned(), svc.clone()),
                ]
                .into();
                let metrics = f
                    .values()
                    .iter()
                    .filter_map(|(name, v)| {
                        v.map(|value| Metric {
                            name: (*name).to_owned(),
                            labels: labels.clone(),
                            value,
                            at,
                        })
                    })
                    .collect();
                out.push(self.output(
                    &format!("ampy.{env}.metrics.v1.features.{sym}"),
                    METRIC_BATCH,
                    partition::metrics(svc, &sym),
                    MetricBatch { metrics }.encode_to_vec(),
                )?);
            } else {
                self.rate_limited.inc();
            }
            if let Some(d) = engine.signal(&sym, &self.cfg.rule) {
                let action = match d {
                    Direction::Long => ActionType::Buy,
                    Direction::Short => ActionType::Sell,
                };
                let sig = Signal {
                    security: Some(SecurityId {
                        symbol: sym.clone(),
                        mic: mic.clone(),
                        ..Default::default()
                    }),
                    r#type: SignalType::Action as i32,
                    model_id: self.cfg.model_id.clone(),
                    horizon: self.cfg.horizon.clone(),
                    generated_at: at,
                    value: Some(signal::Value::Action(action as i32)),
                    ..Default::default()
                };
                out.push(self.output(
                    &format!("ampy.{env}.signals.v1.{}", self.cfg.model_id),
                    SIGNAL,
                    partition::signals(&self.cfg.model_id, &sym, &mic, Some(&self.cfg.horizon)),
                    sig.encode_to_vec(),
                )?);
            }
        }
        Ok(out)
    }

    /// Publishes in order; on a failure, the error and the index of the first output not
    /// published.
    async fn publish(&self, outputs: &[Output]) -> Result<(), (usize, ampybus::Error)> {
        for (i, o) in outputs.iter().enumerate() {
            let h = Headers::for_publish(o.fqdn, &self.cfg.producer, &self.cfg.service, &o.key);
            if let Err(e) = self.bus.publish(&o.topic, h, o.payload.clone()).await {
                return Err((i, e));
            }
            if o.fqdn == SIGNAL {
                self.signals_published.inc();
            } else {
                self.features_published.inc();
            }
        }
        Ok(())
    }

    async fn handle(&self, msg: &Message) -> Outcome {
        let id = msg.headers.get("message_id").unwrap_or_default().to_owned();
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let outputs = match pending {
            Some(o) => o,
            None => {
                let fqdn = msg.headers.schema_fqdn().unwrap_or_default();
                match decode_ticks(fqdn, &msg.payload) {
                    Err(reason) => return Outcome::DeadLetter(reason),
                    Ok(None) => {
                        self.heartbeats.inc();
                        return Outcome::Ok;
                    }
                    Ok(Some(ticks)) => match self.apply(ticks) {
                        Ok(o) => o,
                        Err(reason) => return Outcome::DeadLetter(reason),
                    },
                }
            }
        };
        match self.publish(&outputs).await {
            Ok(()) => Outcome::Ok,
            Err((_, e))
                if matches!(
                    e.kind(),
                    ErrorKind::Header | ErrorKind::Topic | ErrorKind::Payload
                ) =>
            {
                // Retrying cannot fix what the contract refuses.
                Outcome::DeadLetter(DlqCode::ContractViolation.reason(&format!("publish: {e}")))
            }
            Err((done, e)) => {
                tracing::warn!(error = %e, message_id = %id, "features: publish failed; will retry");
                // The redelivery publishes what is left, without applying the ticks again.
                let mut outputs = outputs;
                outputs.drain(..done);
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, outputs);
                Outcome::Retry { after: None }
            }
        }
    }

    fn stats(&self) -> ServiceStats {
        ServiceStats {
            messages: *self.handled.borrow(),
            ticks: self.ticks.get(),
            late: self.engine.lock().unwrap_or_else(|p| p.into_inner()).late(),
            heartbeats: self.heartbeats.get(),
            features_published: self.features_published.get(),
            rate_limited: self.rate_limited.get(),
            signals_published: self.signals_published.get(),
        }
    }
}

struct ServiceHandler(Arc<Shared>);

#[async_trait::async_trait]
impl ampybus::runtime::Handler for ServiceHandler {
    async fn handle(&self, msg: &Message) -> Outcome {
        let out = self.0.handle(msg).await;
        self.0.handled.send_modify(|n| *n += 1);
        out
    }
}

impl FeaturesService {
    /// Starts the consumer of `ampy.{env}.ticks.v1.>` on `bus`, reading time from `clock`
    /// ([`ampybus::runtime::feeds::SystemClock`] in production). Strict per-key order, so a
    /// retried publish blocks only its own symbol; undecodable or invalid ticks are
    /// dead-lettered with their reason.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus_features::{FeaturesService, ServiceConfig};
    /// use ampybus::runtime::feeds::SystemClock;
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let svc = FeaturesService::start(&bus, ServiceConfig::new("dev", "feat"),
    ///                                  std::sync::Arc::new(SystemClock)).await.unwrap();
    /// assert_eq!(svc.stats().ticks, 0);
    /// svc.shutdown(std::time::Duration::from_secs(5)).await;
    /// # });
    /// ```
    pub async fn start(
        bus: &Bus,
        cfg: ServiceConfig,
        clock: Arc<dyn Clock>,
    ) -> ampybus::Result<FeaturesService> {
        let pattern = TopicPattern::parse(&format!("ampy.{}.ticks.v1.>", cfg.env))?;
        Topic::parse(&format!("ampy.{}.metrics.v1.features", cfg.env))?;
        Topic::parse(&format!("ampy.{}.signals.v1.{}", cfg.env, cfg.model_id)).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("model_id {:?}: not a topic token: {e}", cfg.model_id),
            )
        })?;
        partition::check_key(
            ampybus::Domain::Metrics,
            &partition::metrics(&cfg.service, "SYMBOL"),
        )
        .map_err(|e| Error::new(ErrorKind::Config, format!("service {:?}: {e}", cfg.service)))?;
        let (handled, _) = tokio::sync::watch::channel(0);
        let service = cfg.service.clone();
        let counter = |name: &str, help: &str| {
            bus.metrics()
                .app_counter(name, help, &[("service", service.as_str())])
        };
        let shared = Arc::new(Shared {
            bus: bus.clone(),
            limiter: Mutex::new(RateLimiter::new(cfg.publish_interval)),
            clock,
            engine: Mutex::new(FeatureEngine::new()),
            pending: Mutex::new(HashMap::new()),
            ticks: counter("features_ticks", "Ticks applied to the features state")?,
            late: counter(
                "features_late_ticks",
                "Ticks older than their symbol's 60 s window, ignored",
            )?,
            heartbeats: counter(
                "features_heartbeats",
                "Heartbeat messages read (and ignored)",
            )?,
            features_published: counter("features_batches_published", "Feature batches published")?,
            rate_limited: counter(
                "features_rate_limited",
                "Feature publishes skipped by the per-symbol rate limit",
            )?,
            signals_published: counter("features_signals_published", "Signals published")?,
            handled,
            cfg,
        });
        let consumer = Consumer::builder(bus.clone(), pattern, &shared.cfg.consumer)
            .handler(ServiceHandler(shared.clone()))
            .strict(true)
            .start_at(shared.cfg.start_at)
            .start()
            .await?;
        Ok(FeaturesService {
            shared,
            consumer,
            server: None,
        })
    }

    /// Serves `/health`, `/metrics`, `/stats` (the bus's) and `/state/latest?symbol=`,
    /// `/features/latest?symbol=` (this service's) on `addr` (port 0 picks one); returns the
    /// bound address.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus_features::{FeaturesService, ServiceConfig};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let mut svc = FeaturesService::start(&bus, ServiceConfig::new("dev", "feat"),
    ///     std::sync::Arc::new(ampybus::runtime::feeds::SystemClock)).await.unwrap();
    /// let addr = svc.serve_http("127.0.0.1:0").await.unwrap();
    /// assert_ne!(addr.port(), 0);
    /// svc.shutdown(std::time::Duration::from_secs(5)).await;
    /// # });
    /// ```
    pub async fn serve_http(&mut self, addr: &str) -> ampybus::Result<std::net::SocketAddr> {
        let server = ampybus::ops::serve_with(&self.shared.bus, addr, self.router()).await?;
        let local = server.local_addr();
        if let Some(old) = self.server.replace(server) {
            old.shutdown().await;
        }
        Ok(local)
    }

    /// The service's own routes (`/state/latest`, `/features/latest`), for a caller that
    /// serves them itself.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// # let svc = ampybus_features::FeaturesService::start(&bus,
    /// #     ampybus_features::ServiceConfig::new("dev", "feat"),
    /// #     std::sync::Arc::new(ampybus::runtime::feeds::SystemClock)).await.unwrap();
    /// let _routes: axum::Router = svc.router();
    /// # svc.shutdown(std::time::Duration::from_secs(5)).await;
    /// # });
    /// ```
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/state/latest", get(state_latest))
            .route("/features/latest", get(features_latest))
            .with_state(self.shared.clone())
    }

    /// Counters so far; see [`FeaturesService::start`] for an example.
    pub fn stats(&self) -> ServiceStats {
        self.shared.stats()
    }

    /// Waits until the handler has finished `n` messages in total (any outcome), or
    /// `timeout` passes; returns whether it got there.
    ///
    /// ```no_run
    /// # async fn f(svc: ampybus_features::FeaturesService) {
    /// assert!(svc.wait_handled(3, std::time::Duration::from_secs(10)).await);
    /// # }
    /// ```
    pub async fn wait_handled(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.handled.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The consumer's runtime counters (handled, dead-lettered by reason, …).
    ///
    /// ```no_run
    /// # fn f(svc: &ampybus_features::FeaturesService) {
    /// println!("{}", svc.consumer_stats().handled_ok);
    /// # }
    /// ```
    pub fn consumer_stats(&self) -> ConsumerStats {
        self.consumer.stats()
    }

    /// Stops HTTP, then the consumer (waiting up to `deadline` for in-flight messages);
    /// returns the consumer's final counters. See [`FeaturesService::start`] for an example.
    pub async fn shutdown(mut self, deadline: Duration) -> ConsumerStats {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.consumer.shutdown(deadline).await
    }

    /// Runs until SIGINT or SIGTERM, then [`FeaturesService::shutdown`].
    ///
    /// ```no_run
    /// # async fn f(svc: ampybus_features::FeaturesService) {
    /// let stats = svc.run_until_signal(std::time::Duration::from_secs(30)).await;
    /// # }
    /// ```
    pub async fn run_until_signal(mut self, deadline: Duration) -> ConsumerStats {
        let server = self.server.take();
        let stats = self.consumer.run_until_signal(deadline).await;
        if let Some(s) = server {
            s.shutdown().await;
        }
        stats
    }
}

fn json_error(code: StatusCode, msg: String) -> Response {
    (code, axum::Json(json!({"error": msg}))).into_response()
}

/// The `symbol` query parameter, or the 400 naming it.
fn symbol_param(q: Option<&str>, route: &str) -> Result<String, Box<Response>> {
    let sym = q.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "symbol")
            .map(|(_, v)| v.trim().to_owned())
    });
    match sym {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Box::new(json_error(
            StatusCode::BAD_REQUEST,
            format!("missing query parameter `symbol`: use {route}?symbol=SYMBOL"),
        ))),
    }
}

fn unknown(sym: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        format!("unknown symbol `{sym}`: no ticks seen for it"),
    )
}

async fn state_latest(State(st): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let sym = match symbol_param(q.as_deref(), "/state/latest") {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let engine = st.engine.lock().unwrap_or_else(|p| p.into_inner());
    match engine.state_json(&sym) {
        Some(v) => axum::Json(v).into_response(),
        None => unknown(&sym),
    }
}

async fn features_latest(State(st): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let sym = match symbol_param(q.as_deref(), "/features/latest") {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let engine = st.engine.lock().unwrap_or_else(|p| p.into_inner());
    match (engine.features(&sym), engine.mic(&sym)) {
        (Some(f), Some(mic)) => {
            let mut v = f.to_json();
            v["symbol"] = json!(sym);
            v["mic"] = json!(mic);
            v["at"] = time_json(f.at);
            axum::Json(v).into_response()
        }
        _ => unknown(&sym),
    }
}
