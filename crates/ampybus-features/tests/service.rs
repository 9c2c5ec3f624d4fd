//! The features service on the embedded log (a temp dir): scripted ticks in, the exact
//! `MetricBatch`es and `Signal` it publishes, the exact JSON of `/features/latest` and
//! `/state/latest`, bad query input, and undecodable or invalid ticks in the DLQ with their
//! reason. Time is a `ManualClock`, moved by the test.

use ampybus::runtime::feeds::ManualClock;
use ampybus::transport::WindowQuery;
use ampybus::{Bus, Headers, Topic, TopicPattern, partition};
use ampybus_features::{FeaturesService, ServiceConfig};
use ampybus_proto::ampy::common::v1::{Decimal, SecurityId};
use ampybus_proto::ampy::metrics::v1::{Metric, MetricBatch};
use ampybus_proto::ampy::signals::v1::Signal;
use ampybus_proto::ampy::ticks::v1::{QuoteTick, Tick, TickBatch, TradeTick, tick};
use chrono::{DateTime, Utc};
use prost::Message as _;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const HANG: Duration = Duration::from_secs(30);

fn t0() -> DateTime<Utc> {
    "2026-01-02T15:00:00Z".parse().unwrap()
}

fn at(ms: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::milliseconds(ms)
}

fn ts(ms: i64) -> prost_types::Timestamp {
    let t = at(ms);
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn sec(symbol: &str) -> Option<SecurityId> {
    Some(SecurityId {
        symbol: symbol.into(),
        mic: "XNAS".into(),
        ..Default::default()
    })
}

/// `v` with 4 decimals.
fn d4(v: f64) -> Option<Decimal> {
    Some(Decimal {
        scaled: (v * 10_000.0).round() as i64,
        scale: 4,
    })
}

fn trade(symbol: &str, ms: i64, price: f64, size: i64) -> TradeTick {
    TradeTick {
        security: sec(symbol),
        price: d4(price),
        size,
        venue: "XNAS".into(),
        event_time: Some(ts(ms)),
        ..Default::default()
    }
}

fn quote(symbol: &str, ms: i64, bid: f64, ask: f64) -> QuoteTick {
    QuoteTick {
        security: sec(symbol),
        bid: d4(bid),
        bid_size: 3,
        ask: d4(ask),
        ask_size: 4,
        venue: "XNAS".into(),
        event_time: Some(ts(ms)),
        ..Default::default()
    }
}

async fn publish(bus: &Bus, kind: &str, symbol: &str, fqdn: &str, payload: Vec<u8>) {
    let topic = Topic::parse(&format!("ampy.dev.ticks.v1.{kind}.{symbol}")).unwrap();
    let h = Headers::for_publish(fqdn, "md@feed-a", "md", &partition::ticks(symbol, "XNAS"));
    bus.publish(&topic, h, payload).await.unwrap();
}

/// Status and JSON body of `GET path`.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = ampybus_conformance::http_get(addr, path).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Every message stored on `pattern`: (topic, key, headers, payload).
async fn read_all(bus: &Bus, pattern: &str) -> Vec<(String, String, Headers, Vec<u8>)> {
    let reader = bus.replay().unwrap();
    let mut q = WindowQuery::new(TopicPattern::parse(pattern).unwrap());
    let mut out = Vec::new();
    loop {
        let page = reader.read_window(&q).await.unwrap();
        if page.is_empty() {
            return out;
        }
        for m in page {
            q.after_sequence = q.after_sequence.max(m.sequence);
            let e = m.envelope;
            let key = e.headers.partition_key().unwrap_or_default().to_owned();
            out.push((
                e.topic.to_string(),
                key,
                e.headers.clone(),
                e.payload.to_vec(),
            ));
        }
    }
}

/// `(name, value)` of a batch, with `realized_vol_60s` checked against `vol` and removed;
/// every metric's labels and `at` checked.
fn metrics(b: &MetricBatch, symbol: &str, at_ms: i64, vol: Option<f64>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for Metric {
        name,
        labels,
        value,
        at,
    } in &b.metrics
    {
        assert_eq!(
            labels,
            &[
                ("symbol".to_owned(), symbol.to_owned()),
                ("service".to_owned(), "feat".to_owned())
            ]
            .into()
        );
        assert_eq!(at, &Some(ts(at_ms)));
        if name == "realized_vol_60s" {
            let want = vol.expect("no volatility expected");
            assert!((value - want).abs() < 1e-15, "{value} vs {want}");
            continue;
        }
        out.insert(name.clone(), *value);
    }
    assert_eq!(
        b.metrics.iter().any(|m| m.name == "realized_vol_60s"),
        vol.is_some()
    );
    out
}

/// `v` through its text form, as the HTTP body is read (serde_json's default float parsing
/// may differ from the value in the last bit; the text the server wrote is what is compared).
fn reparsed(v: Value) -> Value {
    serde_json::from_str(&v.to_string()).unwrap()
}

fn map(v: &[(&str, f64)]) -> BTreeMap<String, f64> {
    v.iter().map(|(k, x)| ((*k).to_owned(), *x)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_ticks_give_exact_features_signals_http_and_dlq() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    // Received 10 ms after the first ticks' event time.
    let clock = ManualClock::starting_at(at(10));
    let mut svc = FeaturesService::start(
        &bus,
        ServiceConfig::new("dev", "feat"),
        Arc::new(clock.clone()),
    )
    .await
    .unwrap();
    let addr = svc.serve_http("127.0.0.1:0").await.unwrap();

    // 1. A quote: the first features of MSFT are published.
    publish(
        &bus,
        "quote",
        "MSFT",
        "ampy.ticks.v1.QuoteTick",
        quote("MSFT", 0, 99.9375, 100.0625).encode_to_vec(),
    )
    .await;
    assert!(svc.wait_handled(1, HANG).await);
    // 2. A trade at the same instant of the clock: rate-limited, not published.
    publish(
        &bus,
        "trade",
        "MSFT",
        "ampy.ticks.v1.TradeTick",
        trade("MSFT", 0, 100.0, 2).encode_to_vec(),
    )
    .await;
    assert!(svc.wait_handled(2, HANG).await);
    // 3. Ten seconds later, a batch of two trades: published, and a long signal
    //    (return 1 % > 0.3 %, volume 6 > 1, spread 12.5 bps < 20).
    clock.advance(Duration::from_secs(10));
    let batch = TickBatch {
        ticks: vec![
            Tick {
                kind: Some(tick::Kind::Trade(trade("MSFT", 5_000, 104.0, 2))),
            },
            Tick {
                kind: Some(tick::Kind::Trade(trade("MSFT", 10_000, 101.0, 4))),
            },
        ],
    };
    publish(
        &bus,
        "trade",
        "MSFT",
        "ampy.ticks.v1.TickBatch",
        batch.encode_to_vec(),
    )
    .await;
    assert!(svc.wait_handled(3, HANG).await);
    // 4. Another symbol at the same instant: its own rate limit, published.
    publish(
        &bus,
        "quote",
        "AAPL",
        "ampy.ticks.v1.QuoteTick",
        quote("AAPL", 10_000, 199.5, 200.5).encode_to_vec(),
    )
    .await;
    // 5. A heartbeat (read, ignored), an undecodable trade and a trade without a price.
    let hb = Topic::parse("ampy.dev.ticks.v1.heartbeat.feed-a").unwrap();
    let h = Headers::for_publish("ampy.metrics.v1.Metric", "md@feed-a", "md", "feed-a");
    let beat = Metric {
        name: "heartbeat".into(),
        value: 1.0,
        ..Default::default()
    };
    bus.publish(&hb, h, beat.encode_to_vec()).await.unwrap();
    publish(
        &bus,
        "trade",
        "MSFT",
        "ampy.ticks.v1.TradeTick",
        vec![0xff; 8],
    )
    .await;
    let mut no_price = trade("MSFT", 10_000, 1.0, 1);
    no_price.price = None;
    publish(
        &bus,
        "trade",
        "MSFT",
        "ampy.ticks.v1.TradeTick",
        no_price.encode_to_vec(),
    )
    .await;
    assert!(svc.wait_handled(7, HANG).await);
    // The runtime settles a message (ack, DLQ write) after its handler returned.
    tokio::time::timeout(HANG, async {
        loop {
            let c = svc.consumer_stats();
            if c.handled_ok == 5 && c.dead_lettered_total() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the consumer settled all 7 messages");
    let st = svc.stats();
    assert_eq!(
        (
            st.ticks,
            st.late,
            st.heartbeats,
            st.features_published,
            st.rate_limited,
            st.signals_published
        ),
        (5, 0, 1, 3, 1, 1)
    );

    // The published feature batches, in order.
    let vol = ((104.0f64 / 100.0).ln() - (101.0f64 / 104.0).ln()).abs() / 2f64.sqrt();
    let got = read_all(&bus, "ampy.dev.metrics.v1.>").await;
    let shape: Vec<(&str, &str)> = got
        .iter()
        .map(|(t, k, _, _)| (t.as_str(), k.as_str()))
        .collect();
    assert_eq!(
        shape,
        vec![
            ("ampy.dev.metrics.v1.features.MSFT", "feat|MSFT"),
            ("ampy.dev.metrics.v1.features.MSFT", "feat|MSFT"),
            ("ampy.dev.metrics.v1.features.AAPL", "feat|AAPL"),
        ]
    );
    for (_, _, h, _) in &got {
        assert_eq!(h.schema_fqdn(), Some("ampy.metrics.v1.MetricBatch"));
        assert_eq!(h.get("source"), Some("feat"));
    }
    let batches: Vec<MetricBatch> = got
        .iter()
        .map(|(_, _, _, p)| MetricBatch::decode(p.as_slice()).unwrap())
        .collect();
    assert_eq!(
        metrics(&batches[0], "MSFT", 0, None),
        map(&[
            ("mid", 100.0),
            ("spread_abs", 0.125),
            ("spread_bps", 12.5),
            ("trade_count_10s", 0.0),
            ("trade_volume_10s", 0.0),
            ("latency_ms_p50", 10.0),
            ("latency_ms_p95", 10.0),
        ])
    );
    assert_eq!(
        metrics(&batches[1], "MSFT", 10_000, Some(vol)),
        map(&[
            ("mid", 100.0),
            ("spread_abs", 0.125),
            ("spread_bps", 12.5),
            ("trade_vwap_10s", 102.0),
            ("trade_vwap_60s", 101.5),
            ("trade_count_10s", 2.0),
            ("trade_volume_10s", 6.0),
            ("return_10s", 101.0 / 100.0 - 1.0),
            // Latencies 10, 10 (quote, trade at 0), 5010 (trade at 5 s), 10 (trade at 10 s).
            ("latency_ms_p50", 10.0),
            ("latency_ms_p95", 5010.0),
        ])
    );
    assert_eq!(
        metrics(&batches[2], "AAPL", 10_000, None),
        map(&[
            ("mid", 200.0),
            ("spread_abs", 1.0),
            ("spread_bps", 50.0),
            ("trade_count_10s", 0.0),
            ("trade_volume_10s", 0.0),
            ("latency_ms_p50", 10.0),
            ("latency_ms_p95", 10.0),
        ])
    );

    // The one signal.
    let sigs = read_all(&bus, "ampy.dev.signals.v1.>").await;
    assert_eq!(sigs.len(), 1);
    let (topic, key, h, payload) = &sigs[0];
    assert_eq!(topic, "ampy.dev.signals.v1.feat");
    assert_eq!(key, "feat|MSFT.XNAS|10s");
    assert_eq!(h.schema_fqdn(), Some("ampy.signals.v1.Signal"));
    assert_eq!(
        ampybus_proto::decode_to_json("ampy.signals.v1.Signal", payload)
            .unwrap()
            .unwrap(),
        json!({
            "security": {"symbol": "MSFT", "mic": "XNAS"},
            "type": "SIGNAL_TYPE_ACTION",
            "model_id": "feat",
            "horizon": "10s",
            "generated_at": "2026-01-02T15:00:10Z",
            "action": "ACTION_TYPE_BUY",
        })
    );
    let _: Signal = Signal::decode(payload.as_slice()).unwrap();

    // The DLQ: both bad ticks, with their reasons; the heartbeat is not there.
    let dlq = read_all(&bus, "ampy.dev.dlq.v1.>").await;
    let reasons: Vec<&str> = dlq
        .iter()
        .map(|(_, _, h, _)| h.get("dlq_reason").unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("decode_error: ampy.ticks.v1.TradeTick: "),
        "{}",
        reasons[0]
    );
    assert_eq!(reasons[1], "contract_violation: TradeTick.price: required");
    assert_eq!(dlq[0].0, "ampy.dev.dlq.v1.ticks");
    assert_eq!(dlq[0].3, vec![0xff; 8], "the original payload bytes");

    // HTTP: the latest features and state, exactly.
    let (code, mut body) = http_get(addr, "/features/latest?symbol=MSFT").await;
    assert_eq!(code, 200);
    let v = body["features"]["realized_vol_60s"].as_f64().unwrap();
    assert!((v - vol).abs() < 1e-15);
    body["features"]["realized_vol_60s"] = Value::Null;
    assert_eq!(
        body,
        reparsed(json!({
            "symbol": "MSFT", "mic": "XNAS", "at": "2026-01-02T15:00:10.000000Z",
            "features": {
                "mid": 100.0, "spread_abs": 0.125, "spread_bps": 12.5,
                "trade_vwap_10s": 102.0, "trade_vwap_60s": 101.5,
                "trade_count_10s": 2.0, "trade_volume_10s": 6.0,
                "return_10s": 101.0 / 100.0 - 1.0, "realized_vol_60s": null,
                "latency_ms_p50": 10.0, "latency_ms_p95": 5010.0,
            }
        }))
    );
    let (code, body) = http_get(addr, "/state/latest?symbol=MSFT").await;
    assert_eq!(code, 200);
    assert_eq!(
        body,
        json!({
            "symbol": "MSFT", "mic": "XNAS", "ticks": 4, "trades_in_window": 3,
            "trade": {"price": 101.0, "size": 4.0,
                      "event_time": "2026-01-02T15:00:10.000000Z",
                      "received_at": "2026-01-02T15:00:10.010000Z"},
            "quote": {"bid": 99.9375, "bid_size": 3.0, "ask": 100.0625, "ask_size": 4.0,
                      "event_time": "2026-01-02T15:00:00.000000Z",
                      "received_at": "2026-01-02T15:00:00.010000Z"},
        })
    );
    let (code, body) = http_get(addr, "/features/latest?symbol=AAPL").await;
    assert_eq!((code, &body["features"]["mid"]), (200, &json!(200.0)));
    // Bad input.
    assert_eq!(
        http_get(addr, "/features/latest?symbol=NOPE").await,
        (
            404,
            json!({"error": "unknown symbol `NOPE`: no ticks seen for it"})
        )
    );
    assert_eq!(
        http_get(addr, "/state/latest?symbol=NOPE").await,
        (
            404,
            json!({"error": "unknown symbol `NOPE`: no ticks seen for it"})
        )
    );
    assert_eq!(
        http_get(addr, "/state/latest").await,
        (
            400,
            json!({"error": "missing query parameter `symbol`: use /state/latest?symbol=SYMBOL"})
        )
    );
    assert_eq!(
        http_get(addr, "/features/latest?symbol=").await,
        (
            400,
            json!({"error": "missing query parameter `symbol`: use /features/latest?symbol=SYMBOL"})
        )
    );
    // The bus's own endpoints on the same server.
    let (code, health) = http_get(addr, "/health").await;
    assert_eq!((code, &health["status"]), (200, &json!("ok")));
    // The service's own counters on the bus's /metrics, with the values of `stats()`.
    let (code, text) = ampybus_conformance::http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        r#"features_ticks_total{service="feat"} 5"#,
        r#"features_late_ticks_total{service="feat"} 0"#,
        r#"features_heartbeats_total{service="feat"} 1"#,
        r#"features_batches_published_total{service="feat"} 3"#,
        r#"features_rate_limited_total{service="feat"} 1"#,
        r#"features_signals_published_total{service="feat"} 1"#,
    ] {
        assert_eq!(
            text.lines().filter(|l| *l == line).count(),
            1,
            "{line} in:\n{text}"
        );
    }
    assert_eq!(text.matches("# EOF").count(), 1);
    let (code, stats) = http_get(addr, "/stats").await;
    assert_eq!(code, 200);
    assert_eq!(stats["consumers"][0]["name"], "feat");
    assert_eq!(stats["consumers"][0]["handled_ok"], 5);
    assert_eq!(
        stats["consumers"][0]["dead_lettered"],
        json!({"contract_violation": 1, "decode_error": 1})
    );

    // 6. A trade 70 s older than MSFT's latest tick: late, counted, nothing published.
    publish(
        &bus,
        "trade",
        "MSFT",
        "ampy.ticks.v1.TradeTick",
        trade("MSFT", -60_000, 100.0, 1).encode_to_vec(),
    )
    .await;
    assert!(svc.wait_handled(8, HANG).await);
    let st = svc.stats();
    assert_eq!((st.ticks, st.late, st.features_published), (5, 1, 3));
    let (_, text) = ampybus_conformance::http_get(addr, "/metrics").await;
    for line in [
        r#"features_ticks_total{service="feat"} 5"#,
        r#"features_late_ticks_total{service="feat"} 1"#,
    ] {
        assert_eq!(text.lines().filter(|l| *l == line).count(), 1, "{line}");
    }

    let final_stats = svc.shutdown(Duration::from_secs(10)).await;
    assert_eq!(final_stats.handled_ok, 6);
    assert_eq!(final_stats.dead_lettered_total(), 2);
}
