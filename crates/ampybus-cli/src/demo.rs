//! `ampybus demo`: the end-to-end narrative on the transport at `--url` (the embedded log, NATS,
//! Redis or Kafka) with synthetic, deterministic data.
//!
//! bars producer → features/signals → order service → paper broker → positions, plus metrics
//! from every service, one poison bars message that must be dead-lettered with
//! `decode_error`, and one replay of this run's bars window through the features handler that
//! must apply nothing new.
//!
//! ## Runs on a data directory that already holds earlier runs
//!
//! Every run gets a suffix `r<UTC yyyymmddHHMMSSmmm>`: the consumer names
//! (`demo-features-<run>`, …) and the model id (`momo-<run>`, hence the signals topic
//! `ampy.dev.signals.v1.momo-<run>`) carry it. Consumers start at the end of the log
//! (`StartAt::Latest`, created before anything is published), and handlers ignore messages
//! whose `run_id` header is not this process's run id, so the counts are exact per run. The
//! per-topic counts are read back from the log (everything stored since this run started with
//! this run's `run_id`). The replay reads this run's bars window restricted to the demo's
//! symbol keys (the poison message uses key `XNAS.ZZZZ`, so it is not part of the replay).
//!
//! Payloads are protobuf, built and read through the schema registry of `ampybus-proto`
//! (`encode_from_json` / `decode_to_json`). The order service reads the reference price from a
//! `ref_price` header the features service sets on each signal (unknown headers are carried).
//!
//! The features step runs on `ampybus-features`' engine (the seed 004 consumer's features and
//! signal rule): each one-minute bar is read as the ticks that engine takes, a quote at the
//! bar's end (bid = low, ask = high) and a trade (close × volume) at the same time, so
//! `return_10s` is the close-to-close return and the demo's signal rule
//! ([`DEMO_RULE`]) is the seed's with thresholds for one-minute bars.

use crate::error::{CliError, CliResult, EXIT_OK};
use ampybus::control::{ReplayRequest, ReplayState, ReplayStatus};
use ampybus::dedupe::DedupeStore;
use ampybus::inbox::sqlite::{SqliteInbox, SqliteInboxBinding, SqliteOutbox};
use ampybus::inbox::{InboxBinding, RelayOptions};
use ampybus::runtime::control::request_replay;
use ampybus::runtime::{
    ConsumerBuilder, ConsumerStats, DlqCode, Handler, Message, Outcome, handler_fn,
};
use ampybus::service::{Service, ServiceBuilder};
use ampybus::transport::{StartAt, WindowQuery};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern, partition};
use ampybus_features::{FeatureEngine, SignalRule, TickEvent};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exit code when an invariant of the demo does not hold.
const EXIT_DEMO_FAILED: u8 = 1;
const MIC: &str = "XNAS";
const ACCOUNT: &str = "PAPER-1";
const POISON_SYMBOL: &str = "ZZZZ";
const SEED: u64 = 0x00A1_B2C3_D4E5_F607;
/// The seed's rule with thresholds for one-minute bars: |close-to-close return| above 0.2 %,
/// any volume, a bar range (the synthetic spread) under 60 bps.
const DEMO_RULE: SignalRule = SignalRule {
    return_threshold: 0.002,
    volume_threshold: 0.0,
    max_spread_bps: 60.0,
};
const ORDER_QTY: f64 = 100.0;
const TIMEOUT: Duration = Duration::from_secs(120);

/// `ampybus demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// One-minute bars per symbol
    #[arg(long, default_value_t = 300)]
    pub bars: usize,
    /// Comma-separated symbols (XNAS)
    #[arg(long, default_value = "AAPL,MSFT,NVDA", value_delimiter = ',')]
    pub symbols: Vec<String>,
    /// Print the summary as one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
    /// The SQLite file of the positions service (its positions table and its inbox) [default:
    /// demo-positions.sqlite3 in the embedded log's data directory; on other transports
    /// demo-positions-<hash of the URL>.sqlite3 in the system temp directory]
    #[arg(long, value_name = "PATH")]
    pub positions_db: Option<std::path::PathBuf>,
}

/// splitmix64: small, fixed-seed, deterministic.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Roughly standard normal (Irwin–Hall, 12 uniforms).
    fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn dec(v: f64, scale: u32) -> Value {
    json!({"scaled": (v * 10f64.powi(scale as i32)).round() as i64, "scale": scale})
}

fn undec(v: &Value) -> f64 {
    let num = |x: &Value| match x {
        Value::String(s) => s.parse::<f64>().unwrap_or(0.0),
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        _ => 0.0,
    };
    num(&v["scaled"]) / 10f64.powi(num(&v["scale"]) as i32)
}

fn ts(t: DateTime<Utc>) -> Value {
    Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn encode(fqdn: &str, v: &Value) -> Result<Vec<u8>, String> {
    match ampybus_proto::encode_from_json(fqdn, v) {
        Some(Ok(b)) => Ok(b),
        Some(Err(e)) => Err(format!("{fqdn}: {e}")),
        None => Err(format!("{fqdn}: unknown schema")),
    }
}

/// Checks `schema_fqdn` and decodes; the error is a DLQ reason.
fn decode(msg: &Message, fqdn: &str) -> Result<Value, String> {
    let got = msg.headers.schema_fqdn().unwrap_or_default();
    if got != fqdn {
        return Err(DlqCode::SchemaMismatch.reason(&format!("expected {fqdn} got {got}")));
    }
    match ampybus_proto::decode_to_json(fqdn, &msg.payload) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(DlqCode::DecodeError.reason(&format!("{fqdn}: {e}"))),
        None => Err(DlqCode::DecodeError.reason(&format!("{fqdn}: unknown schema"))),
    }
}

/// State shared by every service of one run.
struct Ctx {
    bus: Bus,
    run: String,
    run_id: String,
    model_id: String,
    latency_us: Mutex<hdrhistogram::Histogram<u64>>,
    bars_handled: AtomicU64,
    signals_pub: AtomicU64,
    orders_seen: AtomicU64,
    orders_pub: AtomicU64,
    fills_seen: AtomicU64,
    fills_pub: AtomicU64,
    positions_pub: AtomicU64,
    features: Mutex<FeatureEngine>,
    /// This run's fills as the positions service applied them (handed to it again by the
    /// redelivery step).
    fills_applied: Mutex<Vec<Message>>,
    last_features: Mutex<BTreeMap<String, Value>>,
}

impl Ctx {
    /// True for this run's messages; records the delivery latency.
    fn admit(&self, msg: &Message) -> bool {
        if msg.headers.get("run_id") != Some(self.run_id.as_str()) {
            return false;
        }
        if let Some(at) = msg.headers.produced_at_time() {
            let us = (Utc::now() - at).num_microseconds().unwrap_or(0).max(0) as u64;
            let mut h = self.latency_us.lock().unwrap_or_else(|p| p.into_inner());
            let _ = h.record(us.max(1));
        }
        true
    }

    async fn publish(
        &self,
        topic: &str,
        fqdn: &str,
        service: &str,
        key: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> Result<(), String> {
        let topic = Topic::parse(topic).map_err(|e| e.to_string())?;
        let mut h =
            Headers::for_publish(fqdn, &format!("{service}@demo-{}", self.run), service, key);
        for (k, v) in extra {
            h.set(*k, *v);
        }
        let payload = encode(fqdn, body)?;
        self.bus
            .publish(&topic, h, payload)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn outcome(r: Result<(), String>) -> Outcome {
    match r {
        Ok(()) => Outcome::Ok,
        Err(e)
            if e.starts_with("decode_error:")
                || e.starts_with("schema_mismatch:")
                || e.starts_with("contract_violation:") =>
        {
            Outcome::DeadLetter(e)
        }
        // Retried with its cause, which a `max_retries` dead letter would carry.
        Err(e) => Outcome::failed(e),
    }
}

/// features/signals: the bar as a quote and a trade into the seed 004 feature engine, the
/// seed's signal rule ([`DEMO_RULE`]) on the result.
async fn features(ctx: &Ctx, msg: &Message) -> Result<(), String> {
    let batch = decode(msg, "ampy.bars.v1.BarBatch")?;
    let empty = Vec::new();
    for bar in batch["bars"].as_array().unwrap_or(&empty) {
        let sym = bar["security"]["symbol"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let (high, low, close) = (
            undec(&bar["high"]),
            undec(&bar["low"]),
            undec(&bar["close"]),
        );
        let volume: f64 = bar["volume"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        let end = bar["end"].as_str().unwrap_or_default().to_owned();
        let event_time = DateTime::parse_from_rfc3339(&end)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| DlqCode::ContractViolation.reason(&format!("bars[].end {end:?}: {e}")))?;
        let signal = {
            let mut engine = ctx.features.lock().unwrap_or_else(|p| p.into_inner());
            let now = Utc::now();
            let quote = TickEvent::Quote {
                bid: low,
                bid_size: 0.0,
                ask: high,
                ask_size: 0.0,
                event_time,
            };
            let trade = TickEvent::Trade {
                price: close,
                size: volume,
                event_time,
            };
            engine.apply(&sym, MIC, quote, now);
            engine.apply(&sym, MIC, trade, now);
            if let Some(f) = engine.features(&sym) {
                ctx.last_features
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sym.clone(), f.to_json()["features"].clone());
            }
            engine.signal(&sym, &DEMO_RULE).map(|d| d.action())
        };
        if let Some(action) = signal {
            let body = json!({
                "security": {"symbol": sym, "mic": MIC},
                "type": "SIGNAL_TYPE_ACTION",
                "model_id": ctx.model_id,
                "horizon": "1m",
                "generated_at": end,
                "action": action,
            });
            let key = partition::signals(&ctx.model_id, &sym, MIC, Some("1m"));
            let price = format!("{close:.4}");
            ctx.publish(
                &format!("ampy.dev.signals.v1.{}", ctx.model_id),
                "ampy.signals.v1.Signal",
                "demo-features",
                &key,
                &body,
                &[("ref_price", &price)],
            )
            .await?;
            ctx.signals_pub.fetch_add(1, Ordering::SeqCst);
        }
    }
    ctx.bars_handled.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// order service: one OrderRequest per signal, key and dedupe_key = client_order_id.
async fn orders(ctx: &Ctx, msg: &Message) -> Result<(), String> {
    let sig = decode(msg, "ampy.signals.v1.Signal")?;
    let sym = sig["security"]["symbol"].as_str().unwrap_or_default();
    let side = if sig["action"] == "ACTION_TYPE_SELL" {
        "SIDE_SELL"
    } else {
        "SIDE_BUY"
    };
    let at = sig["generated_at"]
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.timestamp() / 60)
        .unwrap_or(0);
    let coid = format!("co-{}-{sym}-{at}", ctx.run);
    let price: f64 = msg
        .headers
        .get("ref_price")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    let body = json!({
        "account_id": ACCOUNT,
        "client_order_id": coid,
        "security": {"symbol": sym, "mic": MIC},
        "side": side,
        "order_type": "ORDER_TYPE_LIMIT",
        "tif": "TIME_IN_FORCE_DAY",
        "quantity": dec(ORDER_QTY, 0),
        "limit_price": dec(price, 4),
        "strategy_tag": ctx.model_id,
        "created_at": ts(Utc::now()),
    });
    ctx.publish(
        "ampy.dev.orders.v1.requests",
        "ampy.orders.v1.OrderRequest",
        "demo-oms",
        &coid,
        &body,
        &[("dedupe_key", &coid)],
    )
    .await?;
    ctx.orders_pub.fetch_add(1, Ordering::SeqCst);
    ctx.orders_seen.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// paper broker: fills every order in full at its limit price.
async fn broker(ctx: &Ctx, msg: &Message) -> Result<(), String> {
    let o = decode(msg, "ampy.orders.v1.OrderRequest")?;
    let coid = o["client_order_id"].as_str().unwrap_or_default();
    let account = o["account_id"].as_str().unwrap_or_default();
    let qty = undec(&o["quantity"]);
    let signed = if o["side"] == "SIDE_SELL" { -qty } else { qty };
    let body = json!({
        "account_id": account,
        "client_order_id": coid,
        "broker_order_id": format!("pb-{coid}"),
        "security": o["security"],
        "price": o["limit_price"],
        "quantity": dec(signed, 0),
        "venue": MIC,
        "event_time": ts(Utc::now()),
    });
    let key = partition::fills(account, coid);
    ctx.publish(
        "ampy.dev.fills.v1.events",
        "ampy.fills.v1.FillEvent",
        "demo-paper-broker",
        &key,
        &body,
        &[],
    )
    .await?;
    ctx.fills_pub.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// The positions service's table (one row per run, account and symbol) in its SQLite file.
const POSITIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS demo_positions (
    run TEXT NOT NULL, account TEXT NOT NULL, symbol TEXT NOT NULL,
    qty REAL NOT NULL, avg_price REAL NOT NULL, fills INTEGER NOT NULL,
    PRIMARY KEY (run, account, symbol))";

/// A position after a fill of `qty` (signed) at `price`: quantity and average price.
fn next_position((q, avg): (f64, f64), qty: f64, price: f64) -> (f64, f64) {
    let nq = q + qty;
    let avg = if qty > 0.0 && nq != 0.0 {
        (q * avg + qty * price) / nq
    } else if nq == 0.0 {
        0.0
    } else {
        avg
    };
    (nq, avg)
}

/// positions: applies a fill through the SQLite inbox, in `tx` (the inbox row is inserted, the
/// commit follows `Ok`): the running quantity and average price per account and symbol in
/// `demo_positions`, and a PositionSnapshot staged in the outbox (the relay publishes it).
fn apply_fill(ctx: &Ctx, msg: &Message, tx: &rusqlite::Transaction<'_>) -> Result<(), String> {
    use rusqlite::OptionalExtension;
    let f = decode(msg, "ampy.fills.v1.FillEvent")?;
    let account = f["account_id"].as_str().unwrap_or_default();
    let sym = f["security"]["symbol"].as_str().unwrap_or_default();
    let (qty, price) = (undec(&f["quantity"]), undec(&f["price"]));
    let sql = |e: rusqlite::Error| format!("positions: {e}");
    let before = tx
        .query_row(
            "SELECT qty, avg_price FROM demo_positions WHERE run = ?1 AND account = ?2 AND symbol = ?3",
            (&ctx.run, account, sym),
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(sql)?;
    let (q, avg) = next_position(before.unwrap_or((0.0, 0.0)), qty, price);
    tx.execute(
        "INSERT INTO demo_positions (run, account, symbol, qty, avg_price, fills) VALUES (?1, ?2, ?3, ?4, ?5, 1)
         ON CONFLICT (run, account, symbol) DO UPDATE SET qty = excluded.qty, avg_price = excluded.avg_price, fills = fills + 1",
        (&ctx.run, account, sym, q, avg),
    )
    .map_err(sql)?;
    let body = json!({
        "account_id": account,
        "security": f["security"],
        "quantity": dec(q, 0),
        "avg_price": dec(avg, 4),
        "as_of": ts(Utc::now()),
    });
    let fqdn = "ampy.positions.v1.PositionSnapshot";
    let topic = Topic::parse("ampy.dev.positions.v1.snapshots").map_err(|e| e.to_string())?;
    let h = Headers::for_publish(
        fqdn,
        &format!("demo-positions@demo-{}", ctx.run),
        "demo-positions",
        &partition::positions(account, sym, MIC),
    );
    SqliteOutbox
        .stage(tx, &topic, h, encode(fqdn, &body)?)
        .map_err(|e| format!("positions: staging the snapshot: {e}"))?;
    ctx.fills_applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(msg.clone());
    ctx.fills_seen.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// The positions service: [`apply_fill`] through the SQLite inbox of `inbox` (a fill applied
/// before is skipped and counted there), to be bound to the positions consumer's name.
fn positions_service(ctx: &Arc<Ctx>, inbox: &SqliteInbox) -> SqliteInboxBinding {
    let ctx = ctx.clone();
    inbox.handler(move |msg: &Message, tx: &rusqlite::Transaction<'_>| {
        if !ctx.admit(msg) {
            return Outcome::Ok;
        }
        outcome(apply_fill(&ctx, msg, tx))
    })
}

/// This run's rows of `demo_positions`: `{"ACCOUNT|SYMBOL": {qty, avg_price, fills}}`.
fn read_positions(inbox: &SqliteInbox, run: &str) -> CliResult<BTreeMap<String, Value>> {
    let err = |e: rusqlite::Error| CliError::transport(format!("positions db: {e}"));
    let c = inbox
        .connection()
        .map_err(|e| CliError::bus("positions db", &e))?;
    let mut st = c
        .prepare("SELECT account, symbol, qty, avg_price, fills FROM demo_positions WHERE run = ?1")
        .map_err(err)?;
    let rows = st
        .query_map([run], |r| {
            Ok((
                format!("{}|{}", r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                json!({
                    "qty": r.get::<_, f64>(2)?,
                    "avg_price": (r.get::<_, f64>(3)? * 1e4).round() / 1e4,
                    "fills": r.get::<_, i64>(4)?,
                }),
            ))
        })
        .map_err(err)?;
    rows.collect::<Result<_, _>>().map_err(err)
}

/// Where the positions service keeps its SQLite file when `--positions-db` is not given.
fn default_positions_db(url: &str) -> std::path::PathBuf {
    use ampybus::bus::{TransportKind, transport_kind, transport_url};
    let bus_url = transport_url(url);
    let dir = match transport_kind(&bus_url) {
        Ok(TransportKind::Embedded) => {
            ampybus::transport::embedded::EmbeddedOptions::from_url(&bus_url)
                .map(|o| o.dir)
                .unwrap_or_else(|_| std::env::temp_dir())
        }
        // One file per bus URL: demos on two transports (or two namespaces of one) at the
        // same time must not share an outbox, whose relay would publish the other's rows.
        _ => {
            let name = format!("demo-positions-{:016x}.sqlite3", fnv(&bus_url));
            return std::env::temp_dir().join(name);
        }
    };
    dir.join("demo-positions.sqlite3")
}

type Step = for<'a> fn(
    &'a Ctx,
    &'a Message,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

fn service_step(ctx: &Arc<Ctx>, step: Step) -> Arc<dyn Handler> {
    let ctx = ctx.clone();
    Arc::new(handler_fn(move |msg: Message| {
        let ctx = ctx.clone();
        async move {
            if !ctx.admit(&msg) {
                return Outcome::Ok;
            }
            outcome(step(&ctx, &msg).await)
        }
    }))
}

fn step_features<'a>(
    c: &'a Ctx,
    m: &'a Message,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
    Box::pin(features(c, m))
}
fn step_orders<'a>(
    c: &'a Ctx,
    m: &'a Message,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
    Box::pin(orders(c, m))
}
fn step_broker<'a>(
    c: &'a Ctx,
    m: &'a Message,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
    Box::pin(broker(c, m))
}

fn bar_json(sym: &str, start: DateTime<Utc>, o: f64, h: f64, l: f64, c: f64, vol: u64) -> Value {
    let end = start + chrono::Duration::minutes(1);
    json!({"bars": [{
        "security": {"symbol": sym, "mic": MIC},
        "start": ts(start),
        "end": ts(end),
        "open": dec(o, 4),
        "high": dec(h, 4),
        "low": dec(l, 4),
        "close": dec(c, 4),
        "vwap": dec((h + l + c) / 3.0, 4),
        "volume": vol.to_string(),
        "trade_count": (vol / 25).to_string(),
        "adjusted": false,
        "event_time": ts(end),
    }]})
}

/// The synthetic bars of one symbol: a random walk from a fixed seed.
fn synth_bars(sym: &str, n: usize) -> Vec<Value> {
    let mut rng = Rng(SEED ^ fnv(sym));
    let mut price = 50.0 + (fnv(sym) % 400) as f64;
    let t0 = Utc
        .with_ymd_and_hms(2025, 9, 5, 13, 30, 0)
        .single()
        .unwrap_or_else(Utc::now);
    (0..n)
        .map(|i| {
            let open = price;
            let drift = if (i / 40) % 2 == 0 { 0.0006 } else { -0.0006 };
            price *= 1.0 + drift + 0.0015 * rng.normal();
            let close = price;
            let high = open.max(close) * (1.0 + 0.0008 * rng.unit());
            let low = open.min(close) * (1.0 - 0.0008 * rng.unit());
            let vol = 1_000 + rng.next_u64() % 9_000;
            bar_json(
                sym,
                t0 + chrono::Duration::minutes(i as i64),
                open,
                high,
                low,
                close,
                vol,
            )
        })
        .collect()
}

/// How a consumer of the demo applies what it reads.
enum Applies<'a> {
    /// A service step, with the shared dedupe store.
    Step(Step, &'a Arc<dyn DedupeStore>),
    /// The positions service, through its SQLite inbox.
    Inbox(SqliteInboxBinding),
}

/// Adds one consumer of the demo to the service being built: strict order, four workers,
/// from the end of the log.
fn consumer(
    service: ServiceBuilder,
    ctx: &Arc<Ctx>,
    pattern: &str,
    name: &str,
    applies: Applies<'_>,
) -> ServiceBuilder {
    // With a registry each consumer runs as its own service (the name without the run id),
    // so subscriptions are checked against what that service may read.
    let bus = match ctx.bus.registry() {
        Some(_) => {
            let svc = name.rsplit_once('-').map_or(name, |(s, _)| s);
            ctx.bus.clone().with_service(svc)
        }
        None => ctx.bus.clone(),
    };
    let options = |c: ConsumerBuilder| c.workers(4).strict(true).start_at(StartAt::Latest);
    match applies {
        Applies::Step(step, store) => {
            let store = store.clone();
            service.consumer_on(bus, pattern, name, service_step(ctx, step), move |c| {
                options(c.dedupe(store))
            })
        }
        Applies::Inbox(binding) => service.inbox_consumer_on(bus, pattern, name, binding, options),
    }
}

/// Runs the demo; returns the exit code.
pub async fn run(url: &str, args: DemoArgs) -> CliResult<u8> {
    let wall = Instant::now();
    if args.bars == 0 || args.symbols.is_empty() {
        return Err(CliError::usage(
            "--bars must be > 0 and --symbols non-empty",
        ));
    }
    let symbols: Vec<String> = args
        .symbols
        .iter()
        .map(|s| s.trim().to_ascii_uppercase())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &symbols {
        ampybus::partition::check_key(ampybus::Domain::Bars, &partition::bars(s, MIC))
            .map_err(|e| CliError::usage(format!("--symbols {s}: {e}")))?;
    }
    let bus = crate::util::connect(url).await?;
    let started_at = Utc::now() - chrono::Duration::milliseconds(5);
    let run = format!("r{}", Utc::now().format("%Y%m%d%H%M%S%3f"));
    // The transport's own dedupe store (on the embedded log: a table of the log, recorded in
    // the same transaction as the acks), shared by every service of the demo.
    let store: Arc<dyn DedupeStore> = bus.transport().dedupe_store().ok_or_else(|| {
        CliError::usage(format!(
            "demo: the {} transport has no dedupe store",
            bus.transport().name()
        ))
    })?;
    let ctx = Arc::new(Ctx {
        bus: bus.clone(),
        run: run.clone(),
        run_id: ampybus::ids::process_run_id().to_owned(),
        model_id: format!("momo-{run}"),
        latency_us: Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
                .map_err(|e| CliError::usage(e.to_string()))?,
        ),
        bars_handled: AtomicU64::new(0),
        signals_pub: AtomicU64::new(0),
        orders_seen: AtomicU64::new(0),
        orders_pub: AtomicU64::new(0),
        fills_seen: AtomicU64::new(0),
        fills_pub: AtomicU64::new(0),
        positions_pub: AtomicU64::new(0),
        features: Mutex::new(FeatureEngine::new()),
        fills_applied: Mutex::new(Vec::new()),
        last_features: Mutex::new(BTreeMap::new()),
    });

    // The positions service applies fills through a transactional inbox in its own SQLite
    // file: a fill delivered again is skipped, whatever the transport.
    let positions_db = args
        .positions_db
        .clone()
        .unwrap_or_else(|| default_positions_db(url));
    let inbox = SqliteInbox::open(&positions_db)
        .map_err(|e| CliError::bus(format!("--positions-db {:?}", positions_db.display()), &e))?;
    inbox
        .connection()
        .and_then(|c| {
            c.execute_batch(POSITIONS_TABLE).map_err(|e| {
                ampybus::Error::new(ampybus::ErrorKind::Config, format!("demo_positions: {e}"))
            })
        })
        .map_err(|e| CliError::bus(format!("--positions-db {:?}", positions_db.display()), &e))?;

    // Every step of the pipeline is a consumer of one service, started and stopped together.
    let feat_name = format!("demo-features-{run}");
    let pos_name = format!("demo-positions-{run}");
    let signals_pattern = format!("ampy.dev.signals.v1.{}", ctx.model_id);
    let steps = [
        (
            "ampy.dev.bars.>",
            feat_name.clone(),
            Applies::Step(step_features, &store),
        ),
        (
            signals_pattern.as_str(),
            format!("demo-oms-{run}"),
            Applies::Step(step_orders, &store),
        ),
        (
            "ampy.dev.orders.v1.requests",
            format!("demo-paper-broker-{run}"),
            Applies::Step(step_broker, &store),
        ),
        (
            "ampy.dev.fills.v1.events",
            pos_name.clone(),
            Applies::Inbox(positions_service(&ctx, &inbox)),
        ),
    ];
    let mut builder = Service::builder(bus.clone()).shutdown_deadline(Duration::from_secs(10));
    for (pattern, name, applies) in steps {
        builder = consumer(builder, &ctx, pattern, &name, applies);
    }
    let service = builder.start().await.map_err(|e| {
        // The consumer's own error (it names the registry service and rule), exit 3 as when
        // each consumer was started by hand.
        let cause = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<ampybus::Error>())
            .unwrap_or(&e);
        CliError::transport(format!("demo: start: {cause}"))
    })?;

    // Producer: one BarBatch per symbol per minute, one batch (commit) per minute.
    let mut series: Vec<std::vec::IntoIter<Value>> = symbols
        .iter()
        .map(|s| synth_bars(s, args.bars).into_iter())
        .collect();
    let producer = format!("demo-bars@demo-{run}");
    let mut produced = 0u64;
    for i in 0..args.bars {
        let mut batch = Vec::with_capacity(symbols.len() + 1);
        for (sym, bars) in symbols.iter().zip(series.iter_mut()) {
            let topic = Topic::parse(&format!("ampy.dev.bars.v1.{MIC}.{sym}"))
                .map_err(|e| CliError::usage(e.to_string()))?;
            let key = partition::bars(sym, MIC);
            let h = Headers::for_publish("ampy.bars.v1.BarBatch", &producer, "demo-bars", &key);
            let payload = encode("ampy.bars.v1.BarBatch", &bars.next().unwrap_or_default())
                .map_err(CliError::usage)?;
            batch.push(Envelope::new(&topic, h, payload));
        }
        if i == args.bars / 2 {
            // The poison message: a valid bars envelope whose payload is not a BarBatch.
            let sym = POISON_SYMBOL;
            let topic = Topic::parse(&format!("ampy.dev.bars.v1.{MIC}.{sym}"))
                .map_err(|e| CliError::usage(e.to_string()))?;
            let key = partition::bars(sym, MIC);
            let h = Headers::for_publish("ampy.bars.v1.BarBatch", &producer, "demo-bars", &key);
            batch.push(Envelope::new(&topic, h, vec![0xffu8; 16]));
        }
        produced += batch.len() as u64;
        bus.publish_batch(batch)
            .await
            .map_err(|e| CliError::transport(format!("publish bars: {e}")))?;
    }
    let expected_bars = (symbols.len() * args.bars) as u64;

    // Wait for every service to drain, by counters.
    let deadline = Instant::now() + TIMEOUT;
    let drained = loop {
        let dlq = service
            .consumer(&feat_name)
            .map_or(0, |c| c.stats().dlq(DlqCode::DecodeError));
        let done = ctx.bars_handled.load(Ordering::SeqCst) == expected_bars
            && dlq >= 1
            && ctx.orders_seen.load(Ordering::SeqCst) == ctx.signals_pub.load(Ordering::SeqCst)
            && ctx.fills_seen.load(Ordering::SeqCst) == ctx.fills_pub.load(Ordering::SeqCst)
            && ctx.fills_pub.load(Ordering::SeqCst) == ctx.orders_pub.load(Ordering::SeqCst);
        if done {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    // Replay this run's bars window through the running features service, the way an operator
    // would (`ampybus replay`): a ReplayRequest on the control topic, served by the consumer
    // through its own handler and dedupe store. Nothing new may be applied.
    let mut req = ReplayRequest::new(&feat_name, "ampy.dev.bars.>", started_at, Utc::now());
    req.keys = symbols.iter().map(|s| partition::bars(s, MIC)).collect();
    req.requested_by = "ampybus demo".into();
    req.reason = "demo: replay must change nothing already applied".into();
    let replay: ReplayStatus = request_replay(&bus, &req, TIMEOUT, |_| {})
        .await
        .map_err(|e| CliError::transport(format!("replay: {e}")))?;

    // Redelivery: every fill the positions service applied is handed to it again, as a
    // broker redelivers a message whose ack was lost. Its inbox must skip each one and the
    // positions must not move. The positions service's inbox bound to its consumer name
    // once more, as the running consumer has it (skips are counted under the same name).
    let pos_handler = Box::new(positions_service(&ctx, &inbox)).bind(&pos_name, bus.metrics());
    let positions_before = read_positions(&inbox, &run)?;
    let applied_fills =
        std::mem::take(&mut *ctx.fills_applied.lock().unwrap_or_else(|p| p.into_inner()));
    let skipped_before = inbox.skipped(&pos_name);
    let mut redelivered_not_ok = 0u64;
    for m in &applied_fills {
        if pos_handler.handle(m).await != Outcome::Ok {
            redelivered_not_ok += 1;
        }
    }
    let redelivery_skipped = inbox.skipped(&pos_name) - skipped_before;
    let positions = read_positions(&inbox, &run)?;

    let stats: Vec<ConsumerStats> = service
        .shutdown()
        .await
        .stats
        .consumers
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    // The outbox relay publishes the snapshots the positions service staged.
    let relayed = inbox
        .relay(bus.clone(), RelayOptions::default())
        .drain()
        .await
        .map_err(|e| CliError::bus("positions outbox relay", &e))?;
    ctx.positions_pub
        .fetch_add(relayed.published, Ordering::SeqCst);
    let retries: u64 = stats.iter().map(|s| s.retried).sum();
    let mut dlq_by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for s in &stats {
        for (code, n) in &s.dead_lettered {
            *dlq_by_reason.entry(code.as_str().to_owned()).or_default() += n;
        }
    }

    // Metrics: one per service.
    let counts = [
        ("demo-bars", "demo.bars_published", produced),
        (
            "demo-features",
            "demo.bars_handled",
            ctx.bars_handled.load(Ordering::SeqCst),
        ),
        (
            "demo-oms",
            "demo.orders_published",
            ctx.orders_pub.load(Ordering::SeqCst),
        ),
        (
            "demo-paper-broker",
            "demo.fills_published",
            ctx.fills_pub.load(Ordering::SeqCst),
        ),
        (
            "demo-positions",
            "demo.snapshots_published",
            ctx.positions_pub.load(Ordering::SeqCst),
        ),
    ];
    for (svc, name, v) in counts {
        let body =
            json!({"name": name, "labels": {"run": run}, "value": v as f64, "at": ts(Utc::now())});
        ctx.publish(
            &format!("ampy.dev.metrics.v1.{svc}"),
            "ampy.metrics.v1.Metric",
            svc,
            &partition::metrics(svc, name),
            &body,
            &[],
        )
        .await
        .map_err(|e| CliError::transport(format!("publish metric: {e}")))?;
    }

    // Read back what this run stored, per domain.
    let mut per_domain: BTreeMap<String, u64> = BTreeMap::new();
    let mut dlq_in_log = 0u64;
    if let Some(reader) = bus.replay() {
        let mut q = WindowQuery::new(
            TopicPattern::parse("ampy.dev.>").map_err(|e| CliError::usage(e.to_string()))?,
        );
        q.start = Some(started_at);
        loop {
            let page = reader
                .read_page(&q)
                .await
                .map_err(|e| CliError::transport(format!("read back: {e}")))?;
            if page.messages.is_empty() {
                break;
            }
            q.cursor = Some(page.next);
            for m in page.messages {
                if m.envelope.headers.get("run_id") != Some(ctx.run_id.as_str()) {
                    continue;
                }
                let domain = m.envelope.topic.split('.').nth(2).unwrap_or("?").to_owned();
                if m.envelope.topic == "ampy.dev.dlq.v1.bars"
                    && m.envelope
                        .headers
                        .get("dlq_reason")
                        .is_some_and(|r| DlqCode::from_reason(r) == DlqCode::DecodeError)
                {
                    dlq_in_log += 1;
                }
                *per_domain.entry(domain).or_default() += 1;
            }
        }
    }
    let (p50, p99, samples) = {
        let h = ctx.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.len())
    };
    let signals = ctx.signals_pub.load(Ordering::SeqCst);
    let orders_n = ctx.orders_pub.load(Ordering::SeqCst);
    let fills_n = ctx.fills_pub.load(Ordering::SeqCst);
    let positions_n = ctx.positions_pub.load(Ordering::SeqCst);
    let dlq_total: u64 = dlq_by_reason.values().sum();

    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    check(drained, "services did not drain within 120 s".into());
    check(
        ctx.bars_handled.load(Ordering::SeqCst) == expected_bars,
        format!(
            "bars handled {} != {expected_bars}",
            ctx.bars_handled.load(Ordering::SeqCst)
        ),
    );
    check(dlq_total == 1, format!("DLQ count {dlq_total} != 1"));
    check(
        dlq_by_reason.get("decode_error") == Some(&1),
        "the poison message is not dead-lettered with decode_error".into(),
    );
    check(
        dlq_in_log == 1,
        format!("decode_error messages in ampy.dev.dlq.v1.bars: {dlq_in_log} != 1"),
    );
    check(signals > 0, "no signals".into());
    check(
        orders_n == signals,
        format!("orders {orders_n} != signals {signals}"),
    );
    check(
        fills_n == orders_n,
        format!("fills {fills_n} != orders {orders_n}"),
    );
    check(
        positions_n == fills_n,
        format!("positions {positions_n} != fills {fills_n}"),
    );
    check(retries == 0, format!("retries {retries} != 0"));
    check(
        applied_fills.len() as u64 == fills_n
            && redelivery_skipped == fills_n
            && redelivered_not_ok == 0,
        format!(
            "redelivery: {} fills handed again, {redelivery_skipped} skipped by the inbox, {redelivered_not_ok} not Ok (expected {fills_n}, {fills_n}, 0)",
            applied_fills.len()
        ),
    );
    check(
        positions == positions_before,
        "redelivery: the positions moved".into(),
    );
    let position_fills: i64 = positions
        .values()
        .map(|p| p["fills"].as_i64().unwrap_or(0))
        .sum();
    check(
        position_fills == fills_n as i64,
        format!("positions table: {position_fills} fills applied, expected {fills_n}"),
    );
    check(
        replay.state() == ReplayState::Completed,
        format!("replay ended {}: {}", replay.state().as_str(), replay.error),
    );
    check(
        replay.applied == 0,
        format!("replay applied {} != 0", replay.applied),
    );
    check(
        replay.read == expected_bars && replay.skipped_duplicates == expected_bars,
        format!(
            "replay read {} skipped {} (expected {expected_bars} each)",
            replay.read, replay.skipped_duplicates
        ),
    );
    let expect_log = [
        ("bars", expected_bars + 1),
        ("signals", signals),
        ("orders", orders_n),
        ("fills", fills_n),
        ("positions", positions_n),
        ("metrics", counts.len() as u64),
        ("dlq", 1),
    ];
    for (d, n) in expect_log {
        let got = per_domain.get(d).copied().unwrap_or(0);
        check(
            got == n,
            format!("log holds {got} {d} messages of this run, expected {n}"),
        );
    }
    let wall_ms = wall.elapsed().as_millis() as u64;
    let ok = failures.is_empty();

    let summary = json!({
        "run": run,
        "url": bus.url_redacted(),
        "symbols": symbols,
        "bars_per_symbol": args.bars,
        "topics": per_domain,
        "counts": {
            "bars": expected_bars,
            "poison": 1,
            "bars_handled": ctx.bars_handled.load(Ordering::SeqCst),
            "signals": signals,
            "orders": orders_n,
            "fills": fills_n,
            "positions": positions_n,
            "metrics": counts.len(),
        },
        "latency_us": {"p50": p50, "p99": p99, "samples": samples},
        "retries": retries,
        "dlq": {"total": dlq_total, "by_reason": dlq_by_reason},
        "replay": {
            "read": replay.read,
            "applied": replay.applied,
            "skipped_duplicates": replay.skipped_duplicates,
            "failed": replay.failed,
            "request_id": replay.request_id,
            "state": replay.state().as_str(),
            "first_message_id": replay.first_message_id,
            "last_message_id": replay.last_message_id,
        },
        "positions": positions,
        "inbox": {
            "db": positions_db.display().to_string(),
            "redelivered": applied_fills.len(),
            "skipped": redelivery_skipped,
        },
        "last_features": *ctx.last_features.lock().unwrap_or_else(|p| p.into_inner()),
        "wall_ms": wall_ms,
        "ok": ok,
        "failures": failures,
    });
    if args.json {
        crate::util::outln!("{summary}");
    } else {
        print_table(&summary);
    }
    let _ = bus.close().await;
    if ok {
        Ok(EXIT_OK)
    } else {
        for f in &failures {
            eprintln!("demo invariant failed: {f}");
        }
        Ok(EXIT_DEMO_FAILED)
    }
}

fn print_table(s: &Value) {
    crate::util::outln!("ampybus demo — run {} on {}", s["run"], s["url"]);
    crate::util::outln!();
    crate::util::outln!("{:<28} {:>10}", "messages per topic (domain)", "count");
    if let Some(t) = s["topics"].as_object() {
        for (d, n) in t {
            crate::util::outln!("  ampy.dev.{:<18} {:>10}", format!("{d}.>"), n);
        }
    }
    crate::util::outln!();
    let c = &s["counts"];
    crate::util::outln!(
        "pipeline: bars {} (+{} poison) → signals {} → orders {} → fills {} → positions {}; metrics {}",
        c["bars"],
        c["poison"],
        c["signals"],
        c["orders"],
        c["fills"],
        c["positions"],
        c["metrics"]
    );
    crate::util::outln!(
        "delivery latency (produced_at → handler start): p50 {} µs, p99 {} µs ({} deliveries)",
        s["latency_us"]["p50"],
        s["latency_us"]["p99"],
        s["latency_us"]["samples"]
    );
    crate::util::outln!("retries: {}", s["retries"]);
    crate::util::outln!("DLQ: {} {}", s["dlq"]["total"], s["dlq"]["by_reason"]);
    let r = &s["replay"];
    crate::util::outln!(
        "replay of the bars window (ReplayRequest {} on the control topic, served by the features consumer): {}, read {}, applied {}, skipped (duplicates) {}, failed {}",
        r["request_id"].as_str().unwrap_or("-"),
        r["state"].as_str().unwrap_or("-"),
        r["read"],
        r["applied"],
        r["skipped_duplicates"],
        r["failed"]
    );
    if let Some(p) = s["positions"].as_object() {
        crate::util::outln!("positions (SQLite inbox {}):", s["inbox"]["db"]);
        for (k, v) in p {
            crate::util::outln!(
                "  {k:<20} qty {:>8} avg price {:>10} ({} fills)",
                v["qty"],
                v["avg_price"],
                v["fills"]
            );
        }
    }
    crate::util::outln!(
        "redelivery of every fill to the positions service: {} handed again, {} skipped by its inbox",
        s["inbox"]["redelivered"],
        s["inbox"]["skipped"]
    );
    crate::util::outln!("wall time: {} ms", s["wall_ms"]);
    crate::util::outln!("result: {}", if s["ok"] == true { "OK" } else { "FAILED" });
    if let Some(f) = s["failures"].as_array() {
        for x in f {
            crate::util::outln!("  failed: {x}");
        }
    }
}
