//! The replay control protocol over the bus (see [`crate::control`]): the operator side
//! ([`request_replay`]) and the consumer side (a [`Consumer`] serves requests addressed to its
//! name through its own handler and dedupe store).

use super::replay::{ReplayReport, replay_window_with_progress};
use super::{Consumer, ConsumerHandle, Handler, Message, Outcome};
use crate::bus::Bus;
use crate::control::{
    REPLAY_REQUEST_SCHEMA, REPLAY_REQUESTS, REPLAY_STATUS_SCHEMA, ReplayRequest, ReplayState,
    ReplayStatus, replay_requests_topic, replay_status_topic,
};
use crate::dedupe::DedupeStore;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::names;
use crate::topic::{Env, TopicPattern};
use crate::transport::{StartAt, SubscribeSpec, WindowQuery};
use async_trait::async_trait;
use prost::Message as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Name of the durable consumer through which consumer `name` receives replay requests.
///
/// ```
/// assert_eq!(ampybus::runtime::control::control_consumer_name("oms"), "oms-replay-control");
/// ```
pub fn control_consumer_name(name: &str) -> String {
    format!("{name}-replay-control")
}

/// The pattern on which a consumer of `pattern` listens for replay requests: the requests topic
/// of its env, or of every env when its env token is a wildcard.
///
/// ```
/// use ampybus::TopicPattern;
/// use ampybus::runtime::control::requests_pattern_for;
/// let p = |s| TopicPattern::parse(s).unwrap();
/// assert_eq!(requests_pattern_for(&p("ampy.dev.orders.>")).as_str(), "ampy.dev.control.v1.replay_requests");
/// assert_eq!(requests_pattern_for(&p("ampy.*.bars.>")).as_str(), "ampy.*.control.v1.replay_requests");
/// ```
pub fn requests_pattern_for(pattern: &TopicPattern) -> TopicPattern {
    let env = match pattern.env_token() {
        Some(e) if e.parse::<Env>().is_ok() => e.to_owned(),
        _ => "*".to_owned(),
    };
    TopicPattern::parse(&format!("ampy.{env}.control.v1.{REPLAY_REQUESTS}"))
        .expect("valid control pattern")
}

/// Publishes `request` on `ampy.{env}.control.v1.replay_requests` (env from the request's
/// pattern, which must name one) and follows the serving consumer's reports until a final one
/// ([`ReplayState::is_final`]), calling `on_status` for each. Returns the final report.
///
/// Errors: the request is invalid ([`ErrorKind::Payload`], naming the field), or no final report
/// came within `timeout` ([`ErrorKind::Timeout`]; is the consumer running?). A `Rejected` or
/// `Failed` report is returned as a report, not an error.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::control::{ReplayRequest, ReplayState};
/// use ampybus::runtime::control::request_replay;
/// use ampybus::runtime::{Consumer, Outcome, handler_fn};
/// use ampybus::{Bus, Headers, Topic, TopicPattern};
/// use std::time::Duration;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let pattern = TopicPattern::parse("ampy.dev.news.>").unwrap();
/// let handle = Consumer::builder(bus.clone(), pattern, "reader")
///     .handler(handler_fn(|_m| async { Outcome::Ok }))
///     .start()
///     .await
///     .unwrap();
/// let t0 = chrono::Utc::now() - chrono::Duration::seconds(1);
/// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
/// for _ in 0..3 {
///     bus.publish(&topic, Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k"), b"x".to_vec())
///         .await.unwrap();
/// }
/// while handle.stats().handled_ok < 3 { tokio::time::sleep(Duration::from_millis(5)).await; }
/// let req = ReplayRequest::new("reader", "ampy.dev.news.>", t0, chrono::Utc::now());
/// let done = request_replay(&bus, &req, Duration::from_secs(30), |_| {}).await.unwrap();
/// assert_eq!(done.state(), ReplayState::Completed);
/// assert_eq!((done.read, done.applied, done.skipped_duplicates), (3, 0, 3));
/// handle.shutdown(Duration::from_secs(5)).await;
/// # });
/// ```
pub async fn request_replay(
    bus: &Bus,
    request: &ReplayRequest,
    timeout: Duration,
    mut on_status: impl FnMut(&ReplayStatus),
) -> Result<ReplayStatus> {
    let valid = request.validate()?;
    let env: Env = match valid.pattern.env_token().map(str::parse::<Env>) {
        Some(Ok(env)) => env,
        _ => {
            return Err(Error::new(
                ErrorKind::Payload,
                format!(
                    "replay request: `pattern` {:?} must name one env (ampy.dev|paper|prod.…) so the request goes to that env's control topic",
                    request.pattern
                ),
            ));
        }
    };
    let status_pattern = TopicPattern::parse(replay_status_topic(env).as_str())?;
    // Listen before asking: reports stored from a second ago on are read.
    let since = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut sub = bus
        .subscribe(SubscribeSpec::ephemeral(
            status_pattern,
            StartAt::Time(since),
        ))
        .await?;
    let producer = format!("ampybus@{}", env!("CARGO_PKG_VERSION"));
    bus.publish(
        &replay_requests_topic(env),
        request.headers(&producer),
        request.encode_to_vec(),
    )
    .await?;
    tracing::info!(request_id = %request.request_id, consumer = %request.consumer, pattern = %request.pattern, "replay requested");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "replay {}: no final report from consumer `{}` within {:?} (is it running, with this name, on this bus?)",
                    request.request_id, request.consumer, timeout
                ),
            ));
        }
        let got = sub.fetch(64, left.min(Duration::from_millis(500))).await?;
        for d in got {
            let mine = d.envelope.headers.schema_fqdn() == Some(REPLAY_STATUS_SCHEMA)
                && d.envelope.headers.partition_key() == Some(request.request_id.as_str());
            let status = if mine {
                ReplayStatus::decode(&d.envelope.payload[..]).ok()
            } else {
                None
            };
            let _ = d.ack().await;
            let Some(status) = status else { continue };
            if status.request_id != request.request_id {
                continue;
            }
            on_status(&status);
            if status.state().is_final() {
                return Ok(status);
            }
        }
    }
}

/// Starts the control listener of consumer `name` (called by [`Consumer`]'s builder).
pub(crate) async fn start_listener(
    bus: Bus,
    name: &str,
    pattern: TopicPattern,
    handler: Arc<dyn Handler>,
    dedupe: Option<Arc<dyn DedupeStore>>,
) -> Result<ConsumerHandle> {
    let server = ReplayServer {
        bus: bus.clone(),
        name: name.to_owned(),
        pattern: pattern.clone(),
        handler,
        dedupe,
    };
    Consumer::builder(
        bus,
        requests_pattern_for(&pattern),
        &control_consumer_name(name),
    )
    .handler(server)
    .workers(1)
    .max_in_flight(16)
    .strict(false)
    .start_at(StartAt::Latest)
    .serve_replays(false)
    // A replay can take long: the lease is extended while the handler runs.
    .ack_deadline(Duration::from_secs(30))
    .start_boxed()
    .await
}

struct ReplayServer {
    bus: Bus,
    name: String,
    pattern: TopicPattern,
    handler: Arc<dyn Handler>,
    dedupe: Option<Arc<dyn DedupeStore>>,
}

/// Adds `replay_request_id` to each replayed message, then calls the consumer's handler.
struct Tagged {
    inner: Arc<dyn Handler>,
    request_id: String,
}

#[async_trait]
impl Handler for Tagged {
    async fn handle(&self, msg: &Message) -> Outcome {
        let mut m = msg.clone();
        m.headers.set(names::REPLAY_REQUEST_ID, &self.request_id);
        self.inner.handle(&m).await
    }
}

/// How often progress is reported at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

impl ReplayServer {
    async fn report(&self, env: Env, status: &ReplayStatus) {
        let producer = format!("{}@ampybus", self.name);
        let topic = replay_status_topic(env);
        let mut tries = 0u32;
        loop {
            match self
                .bus
                .publish(&topic, status.headers(&producer), status.encode_to_vec())
                .await
            {
                Ok(_) => return,
                Err(e) if tries < 5 => {
                    tries += 1;
                    tracing::warn!(consumer = %self.name, error = %e, "replay status report failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                }
                Err(e) => {
                    tracing::error!(consumer = %self.name, error = %e, request_id = %status.request_id, "replay status report lost");
                    return;
                }
            }
        }
    }

    fn status(&self, request_id: &str, state: ReplayState, r: &ReplayReport) -> ReplayStatus {
        ReplayStatus {
            read: r.read,
            applied: r.applied,
            skipped_duplicates: r.skipped_duplicates,
            failed: r.failed,
            first_message_id: r.first_message_id.clone().unwrap_or_default(),
            last_message_id: r.last_message_id.clone().unwrap_or_default(),
            ..ReplayStatus::new(request_id, &self.name, state)
        }
    }

    /// Why this consumer cannot serve `req`, if it cannot.
    fn refuse(&self, req: &ReplayRequest) -> Option<String> {
        let valid = match req.validate() {
            Ok(v) => v,
            Err(e) => return Some(e.message().to_owned()),
        };
        if !valid.pattern.is_within(&self.pattern) {
            return Some(format!(
                "replay request: `pattern` {:?} is not within consumer `{}`'s pattern {:?}",
                req.pattern,
                self.name,
                self.pattern.as_str()
            ));
        }
        if self.dedupe.is_none() {
            return Some(format!(
                "consumer `{}` has no dedupe store, so a replay could apply effects twice",
                self.name
            ));
        }
        if self.bus.replay().is_none() {
            return Some(format!(
                "transport `{}` cannot read stored messages by time window",
                self.bus.transport().name()
            ));
        }
        None
    }
}

#[async_trait]
impl Handler for ReplayServer {
    async fn handle(&self, msg: &Message) -> Outcome {
        let env = msg.topic.env();
        if msg.headers.schema_fqdn() != Some(REPLAY_REQUEST_SCHEMA) {
            return Outcome::DeadLetter(format!(
                "schema_mismatch: expected {REPLAY_REQUEST_SCHEMA}, got {:?}",
                msg.headers.schema_fqdn().unwrap_or("")
            ));
        }
        let req = match ReplayRequest::decode(&msg.payload[..]) {
            Ok(r) => r,
            Err(e) => {
                return Outcome::DeadLetter(format!(
                    "decode_error: not a {REPLAY_REQUEST_SCHEMA}: {e}"
                ));
            }
        };
        if req.consumer != self.name {
            return Outcome::Ok;
        }
        if let Some(why) = self.refuse(&req) {
            tracing::warn!(consumer = %self.name, request_id = %req.request_id, reason = %why, "replay request rejected");
            let mut s = ReplayStatus::new(&req.request_id, &self.name, ReplayState::Rejected);
            s.error = why;
            self.report(env, &s).await;
            return Outcome::Ok;
        }
        let valid = req.validate().expect("checked by refuse");
        tracing::info!(consumer = %self.name, request_id = %req.request_id, pattern = %req.pattern, requested_by = %req.requested_by, reason = %req.reason, "replay accepted");
        self.report(
            env,
            &ReplayStatus::new(&req.request_id, &self.name, ReplayState::Accepted),
        )
        .await;
        let mut query = WindowQuery::new(valid.pattern);
        query.start = Some(valid.start);
        query.end = Some(valid.end);
        query.keys = (!valid.keys.is_empty()).then_some(valid.keys);
        let handler: Arc<dyn Handler> = Arc::new(Tagged {
            inner: self.handler.clone(),
            request_id: req.request_id.clone(),
        });
        let dedupe = self.dedupe.clone().expect("checked by refuse");
        // Progress goes out from a side task so the replay never waits on a report.
        let (tx, mut rx) = mpsc::unbounded_channel::<ReplayReport>();
        let reporter = {
            let this = ReplayServer {
                bus: self.bus.clone(),
                name: self.name.clone(),
                pattern: self.pattern.clone(),
                handler: self.handler.clone(),
                dedupe: None,
            };
            let request_id = req.request_id.clone();
            tokio::spawn(async move {
                let mut last_sent = tokio::time::Instant::now() - PROGRESS_EVERY;
                while let Some(mut r) = rx.recv().await {
                    while let Ok(newer) = rx.try_recv() {
                        r = newer;
                    }
                    if last_sent.elapsed() >= PROGRESS_EVERY {
                        last_sent = tokio::time::Instant::now();
                        let s = this.status(&request_id, ReplayState::Progress, &r);
                        this.report(env, &s).await;
                    }
                }
            })
        };
        let result =
            replay_window_with_progress(&self.bus, query, handler, dedupe, &self.name, &mut |r| {
                let _ = tx.send(r.clone());
            })
            .await;
        drop(tx);
        let _ = reporter.await;
        let status = match result {
            Ok(r) => {
                tracing::info!(consumer = %self.name, request_id = %req.request_id, read = r.read, applied = r.applied, skipped = r.skipped_duplicates, failed = r.failed, "replay completed");
                self.status(&req.request_id, ReplayState::Completed, &r)
            }
            Err(e) => {
                tracing::error!(consumer = %self.name, request_id = %req.request_id, error = %e, "replay failed");
                let mut s = ReplayStatus::new(&req.request_id, &self.name, ReplayState::Failed);
                s.error = e.to_string();
                s
            }
        };
        self.report(env, &status).await;
        Outcome::Ok
    }
}
