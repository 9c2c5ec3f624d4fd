//! The ops endpoint: `/metrics`, `/health`, `/stats` of a bus over HTTP (axum) — what
//! [`crate::obs`] counts, the bus's consumers, producers and feeds, and the transport's health
//! and lag — and [`ReaderCounter`], the `/stats` entry of a hand-written reader.

mod reader;

pub use reader::ReaderCounter;

use crate::bus::Bus;
use crate::error::{Error, ErrorKind, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long `/health` waits for the transport probe, and `/stats`, `/metrics` for lag reads.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

struct AppState {
    bus: Bus,
    started: Instant,
    /// Previous `/stats` sample per consumer and producer: (when, count).
    samples: Mutex<HashMap<String, (Instant, u64)>>,
}

/// A running ops endpoint; stops on [`ObsServer::shutdown`] or drop.
#[derive(Debug)]
pub struct ObsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ObsServer {
    /// The bound address (useful with port 0); see [`serve`] for an example.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the server task; see [`serve`] for an example.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ObsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Serves `/metrics` (Prometheus text), `/health` and `/stats` (JSON) for `bus` and the
/// consumers and producers running on it, on `addr` (e.g. `127.0.0.1:9464`; port 0 picks one).
///
/// * `/health`: `200` while the transport answers its probe
///   ([`crate::transport::Transport::health`]) and every consumer runs (idle included), else
///   `503`; body `{"status", "transport": {"name", "connected", "error"}, "consumers": [{"name",
///   "running", "last_message_at", "idle_ms"}]}`.
/// * `/stats`: `{"transport", "connected", "uptime_s", "consumers": [{"name", "pattern",
///   "handled_ok", "retried", "dead_lettered", "skipped_duplicates", "released", "in_flight",
///   "max_in_flight", "queue_fill", "rate_per_s", "lag", "last_message_at"}], "producers":
///   [{"id", "accepted", "published", "failed", "queued", "in_flight", "capacity",
///   "queue_fill", "dropped": {…, "total"}, "rate_per_s"}], "feeds": [{"name", "pattern",
///   "stale_after_s", "sources", "stale_sources", "keys", "stale_keys", "gaps", "missing",
///   "duplicates", "bad_sequence", "seconds_since_last": {topic: s}}] (one per running
///   [`FeedWatch`](crate::runtime::feeds::FeedWatch)), "totals": {"in_flight", "dropped",
///   "dead_lettered"}}`. Rates are per second since the previous `/stats` call (the first:
///   since the endpoint started).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let server = ampybus::ops::serve(&bus, "127.0.0.1:0").await.unwrap();
/// assert_ne!(server.local_addr().port(), 0);
/// server.shutdown().await;
/// # });
/// ```
pub async fn serve(bus: &Bus, addr: &str) -> Result<ObsServer> {
    serve_with(bus, addr, Router::new()).await
}

/// [`serve`] plus the application's own routes, merged into the same server: a service adds
/// its endpoints next to `/metrics`, `/health` and `/stats` instead of running a second HTTP
/// server. A route of `extra` that repeats one of the three is a configuration error (axum
/// refuses overlapping routes), reported as a `Config` error.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use axum::routing::get;
/// let dir = tempfile::tempdir().unwrap();
/// let bus = ampybus::Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let extra = axum::Router::new().route("/hello", get(|| async { "hi" }));
/// let server = ampybus::ops::serve_with(&bus, "127.0.0.1:0", extra).await.unwrap();
/// assert_ne!(server.local_addr().port(), 0);
/// server.shutdown().await;
/// // A route that repeats a built-in one is refused.
/// let clash = axum::Router::new().route("/health", get(|| async { "mine" }));
/// let err = ampybus::ops::serve_with(&bus, "127.0.0.1:0", clash).await.unwrap_err();
/// assert_eq!(err.kind(), ampybus::ErrorKind::Config);
/// # });
/// ```
pub async fn serve_with(bus: &Bus, addr: &str, extra: Router) -> Result<ObsServer> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("metrics endpoint: cannot listen on {addr}"),
            e,
        )
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::with_source(ErrorKind::Config, "metrics endpoint: local address", e))?;
    let state = Arc::new(AppState {
        bus: bus.clone(),
        started: Instant::now(),
        samples: Mutex::new(HashMap::new()),
    });
    let base = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/stats", get(stats))
        .with_state(state);
    // axum panics on overlapping routes; that is a configuration error here, not a crash.
    let app = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| base.merge(extra)))
        .map_err(|_| {
            Error::new(
                ErrorKind::Config,
                "metrics endpoint: an extra route repeats /metrics, /health or /stats",
            )
        })?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %local, "serving /metrics /health /stats");
    Ok(ObsServer {
        addr: local,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    st.bus.refresh_lag_metrics(PROBE_TIMEOUT).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.bus.metrics().encode(),
    )
        .into_response()
}

fn time_json(t: Option<chrono::DateTime<chrono::Utc>>) -> Value {
    t.map_or(Value::Null, |t| Value::String(crate::ids::format_time(t)))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let probe = tokio::time::timeout(PROBE_TIMEOUT, st.bus.transport().health()).await;
    let (connected, error) = match probe {
        Ok(Ok(())) => (true, Value::Null),
        Ok(Err(e)) => (false, Value::String(e.to_string())),
        Err(_) => (false, Value::String("health probe timed out".into())),
    };
    let now = chrono::Utc::now();
    let mut all_running = true;
    let consumers: Vec<Value> = st
        .bus
        .obs()
        .consumers()
        .iter()
        .filter(|c| !c.is_stopped())
        .map(|c| {
            let running = !c.is_draining();
            all_running &= running;
            let last = c.last_message_at();
            json!({
                "name": c.name(),
                "running": running,
                "last_message_at": time_json(last),
                "idle_ms": last.map(|t| (now - t).num_milliseconds().max(0)),
            })
        })
        .collect();
    let ok = connected && all_running;
    let body = json!({
        "status": if ok { "ok" } else { "unhealthy" },
        "transport": { "name": st.bus.transport().name(), "connected": connected, "error": error },
        "consumers": consumers,
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

impl AppState {
    fn rate(&self, key: String, count: u64) -> f64 {
        let now = Instant::now();
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let (then, before) = s.get(&key).copied().unwrap_or((self.started, 0));
        s.insert(key, (now, count));
        let secs = now.duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            count.saturating_sub(before) as f64 / secs
        }
    }
}

async fn stats(State(st): State<Arc<AppState>>) -> Response {
    let connected = matches!(
        tokio::time::timeout(PROBE_TIMEOUT, st.bus.transport().health()).await,
        Ok(Ok(()))
    );
    let mut consumers = Vec::new();
    let (mut total_in_flight, mut total_dlq) = (0u64, 0u64);
    for c in st.bus.obs().consumers() {
        if c.is_stopped() {
            continue;
        }
        let s = c.stats();
        let lag = match c.lag_name() {
            Some(name) if st.bus.has_consumer_lag() => {
                match tokio::time::timeout(PROBE_TIMEOUT, st.bus.consumer_lag(name)).await {
                    Ok(Ok(Some(l))) => json!(l.pending),
                    _ => Value::Null,
                }
            }
            _ => Value::Null,
        };
        let finished = s.handled_ok + s.dead_lettered_total() + s.skipped_duplicates;
        total_in_flight += s.in_flight;
        total_dlq += s.dead_lettered_total();
        let dlq: serde_json::Map<String, Value> = s
            .dead_lettered
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), json!(v)))
            .collect();
        consumers.push(json!({
            "name": c.name(),
            "pattern": c.pattern().as_str(),
            "handled_ok": s.handled_ok,
            "retried": s.retried,
            "dead_lettered": dlq,
            "skipped_duplicates": s.skipped_duplicates,
            "released": s.released,
            "in_flight": s.in_flight,
            "max_in_flight": c.max_in_flight(),
            "queue_fill": s.in_flight as f64 / c.max_in_flight().max(1) as f64,
            "rate_per_s": st.rate(format!("c:{}", c.name()), finished),
            "lag": lag,
            "last_message_at": time_json(c.last_message_at()),
        }));
    }
    let mut producers = Vec::new();
    let mut total_dropped = 0u64;
    for (id, capacity, s) in st.bus.obs().producers() {
        total_in_flight += s.in_flight;
        total_dropped += s.dropped.total();
        producers.push(json!({
            "id": id,
            "accepted": s.accepted,
            "published": s.published,
            "failed": s.failed,
            "queued": s.queued,
            "in_flight": s.in_flight,
            "capacity": capacity,
            "queue_fill": s.queued as f64 / capacity.max(1) as f64,
            "dropped": {
                "heartbeat": s.dropped.heartbeat,
                "quote_book": s.dropped.quote_book,
                "conflated": s.dropped.conflated,
                "lag": s.dropped.lag,
                "total": s.dropped.total(),
            },
            "rate_per_s": st.rate(format!("p:{id}"), s.published),
        }));
    }
    axum::Json(json!({
        "transport": st.bus.transport().name(),
        "connected": connected,
        "uptime_s": st.started.elapsed().as_secs_f64(),
        "consumers": consumers,
        "producers": producers,
        "feeds": st.bus.obs().feeds(),
        "totals": { "in_flight": total_in_flight, "dropped": total_dropped, "dead_lettered": total_dlq },
    }))
    .into_response()
}
