//! The feature engine on scripted ticks: exact values, window edges at exactly 10 s and 60 s,
//! empty windows, zero volume, crossed and locked quotes, late ticks, percentiles, signals.

use ampybus_features::{Applied, Direction, FeatureEngine, Features, SignalRule, TickEvent};
use chrono::{DateTime, Utc};

fn t0() -> DateTime<Utc> {
    "2026-01-02T15:00:00Z".parse().unwrap()
}

/// `t0 + ms` milliseconds.
fn at(ms: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::milliseconds(ms)
}

fn trade(ms: i64, price: f64, size: f64) -> TickEvent {
    TickEvent::Trade {
        price,
        size,
        event_time: at(ms),
    }
}

fn quote(ms: i64, bid: f64, ask: f64) -> TickEvent {
    TickEvent::Quote {
        bid,
        bid_size: 3.0,
        ask,
        ask_size: 4.0,
        event_time: at(ms),
    }
}

/// Applies `ev`, received `lat_ms` after its event time.
fn feed(e: &mut FeatureEngine, ev: TickEvent, lat_ms: i64) -> Applied {
    let recv = ev.event_time() + chrono::Duration::milliseconds(lat_ms);
    e.apply("MSFT", "XNAS", ev, recv)
}

fn f(e: &FeatureEngine) -> Features {
    e.features("MSFT").unwrap()
}

#[test]
fn quote_only_gives_book_features_and_empty_trade_windows() {
    let mut e = FeatureEngine::new();
    assert_eq!(feed(&mut e, quote(0, 99.5, 100.5), 2), Applied::Updated);
    assert_eq!(
        f(&e),
        Features {
            at: Some(at(0)),
            mid: Some(100.0),
            spread_abs: Some(1.0),
            spread_bps: Some(100.0),
            trade_vwap_10s: None,
            trade_vwap_60s: None,
            trade_count_10s: Some(0.0),
            trade_volume_10s: Some(0.0),
            return_10s: None,
            realized_vol_60s: None,
            latency_ms_p50: Some(2.0),
            latency_ms_p95: Some(2.0),
        }
    );
    assert!(e.features("AAPL").is_none());
}

#[test]
fn trades_vwap_count_volume_return_and_vol_exact() {
    let mut e = FeatureEngine::new();
    feed(&mut e, quote(0, 99.9375, 100.0625), 10);
    feed(&mut e, trade(0, 100.0, 2.0), 10);
    feed(&mut e, trade(5_000, 104.0, 2.0), 10);
    feed(&mut e, trade(10_000, 101.0, 4.0), 10);
    let got = f(&e);
    // The trade at 0 is exactly 10 s old at 10 s: out of the 10 s window, in the 60 s one.
    assert_eq!(got.trade_vwap_10s, Some((104.0 * 2.0 + 101.0 * 4.0) / 6.0));
    assert_eq!(got.trade_vwap_10s, Some(102.0));
    assert_eq!(got.trade_vwap_60s, Some(101.5));
    assert_eq!(got.trade_count_10s, Some(2.0));
    assert_eq!(got.trade_volume_10s, Some(6.0));
    // Reference: the last trade at or before now - 10 s (the one at exactly 0).
    assert_eq!(got.return_10s, Some(101.0 / 100.0 - 1.0));
    assert_eq!(got.mid, Some(100.0));
    assert_eq!(got.spread_abs, Some(0.125));
    assert_eq!(got.spread_bps, Some(12.5));
    let (r1, r2) = ((104.0f64 / 100.0).ln(), (101.0f64 / 104.0).ln());
    let expected_vol = (r1 - r2).abs() / 2f64.sqrt(); // sample std of two values
    let vol = got.realized_vol_60s.unwrap();
    assert!(
        (vol - expected_vol).abs() < 1e-15,
        "{vol} vs {expected_vol}"
    );
    assert_eq!(got.latency_ms_p50, Some(10.0));
    assert_eq!(got.latency_ms_p95, Some(10.0));
    assert_eq!(got.at, Some(at(10_000)));
}

#[test]
fn the_10s_window_edge_is_exclusive_at_exactly_10s() {
    let mut e = FeatureEngine::new();
    feed(&mut e, trade(0, 100.0, 1.0), 0);
    feed(&mut e, quote(9_999, 99.0, 101.0), 0);
    assert_eq!(f(&e).trade_count_10s, Some(1.0));
    assert_eq!(f(&e).trade_vwap_10s, Some(100.0));
    // No trade at or before -1 ms: no reference price.
    assert_eq!(f(&e).return_10s, None);
    feed(&mut e, quote(10_000, 99.0, 101.0), 0);
    let got = f(&e);
    assert_eq!(got.trade_count_10s, Some(0.0));
    assert_eq!(got.trade_volume_10s, Some(0.0));
    assert_eq!(got.trade_vwap_10s, None);
    assert_eq!(got.trade_vwap_60s, Some(100.0));
    assert_eq!(got.return_10s, Some(0.0));
}

#[test]
fn the_60s_window_edge_evicts_at_exactly_60s_and_keeps_the_anchor_price() {
    let mut e = FeatureEngine::new();
    feed(&mut e, trade(0, 100.0, 1.0), 5);
    feed(&mut e, quote(59_999, 99.0, 101.0), 1);
    let got = f(&e);
    assert_eq!(got.trade_vwap_60s, Some(100.0));
    assert_eq!(got.latency_ms_p50, Some(1.0));
    assert_eq!(got.latency_ms_p95, Some(5.0));
    feed(&mut e, quote(60_000, 99.0, 101.0), 1);
    let got = f(&e);
    assert_eq!(got.trade_vwap_60s, None);
    assert_eq!(got.trade_count_10s, Some(0.0));
    // The trade at 0 and its latency sample left the window.
    assert_eq!(got.latency_ms_p95, Some(1.0));
    assert_eq!(e.state_json("MSFT").unwrap()["trades_in_window"], 0);
    // The price as of 10 s ago is still that trade's: return 0, not unknown.
    assert_eq!(got.return_10s, Some(0.0));
    // One minute later a trade at 102 compares with it.
    feed(&mut e, trade(120_000, 102.0, 1.0), 0);
    assert_eq!(f(&e).return_10s, Some(102.0 / 100.0 - 1.0));
}

#[test]
fn zero_volume_trades_count_but_give_no_vwap() {
    let mut e = FeatureEngine::new();
    feed(&mut e, trade(1_000, 100.0, 0.0), 0);
    feed(&mut e, trade(2_000, 101.0, 0.0), 0);
    let got = f(&e);
    assert_eq!(got.trade_count_10s, Some(2.0));
    assert_eq!(got.trade_volume_10s, Some(0.0));
    assert_eq!(got.trade_vwap_10s, None);
    assert_eq!(got.trade_vwap_60s, None);
    // One return only: no volatility yet.
    assert_eq!(got.realized_vol_60s, None);
}

#[test]
fn crossed_quotes_have_negative_spread_and_never_signal_locked_ones_can() {
    let rule = SignalRule::default();
    let mut e = FeatureEngine::new();
    feed(&mut e, trade(0, 100.0, 5.0), 0);
    feed(&mut e, trade(10_000, 101.0, 5.0), 0);
    feed(&mut e, quote(10_000, 101.0, 100.0), 0);
    let got = f(&e);
    assert_eq!(got.spread_abs, Some(-1.0));
    assert_eq!(got.mid, Some(100.5));
    assert_eq!(got.spread_bps, Some(-1.0 / 100.5 * 10_000.0));
    assert_eq!(rule.direction(&got), None);
    assert_eq!(e.signal("MSFT", &rule), None);
    feed(&mut e, quote(10_000, 100.0, 100.0), 0);
    let got = f(&e);
    assert_eq!((got.spread_abs, got.spread_bps), (Some(0.0), Some(0.0)));
    assert_eq!(e.signal("MSFT", &rule), Some(Direction::Long));
}

#[test]
fn signals_are_edge_triggered_per_direction() {
    let rule = SignalRule::default();
    let mut e = FeatureEngine::new();
    feed(&mut e, quote(0, 99.9375, 100.0625), 0);
    feed(&mut e, trade(0, 100.0, 1.0), 0);
    // Volume 1.0 over 10 s is not > 1.0.
    feed(&mut e, trade(10_000, 101.0, 1.0), 0);
    assert_eq!(e.signal("MSFT", &rule), None);
    feed(&mut e, trade(11_000, 101.0, 1.0), 0);
    assert_eq!(e.signal("MSFT", &rule), Some(Direction::Long));
    feed(&mut e, trade(12_000, 101.5, 1.0), 0);
    assert_eq!(e.signal("MSFT", &rule), None, "still long: no new signal");
    // Return 0.2 %: the condition lapses.
    feed(&mut e, trade(13_000, 100.2, 1.0), 0);
    assert_eq!(f(&e).return_10s, Some(100.2 / 100.0 - 1.0));
    assert_eq!(e.signal("MSFT", &rule), None);
    // Below -0.3 %: short.
    feed(&mut e, trade(14_000, 99.0, 1.0), 0);
    assert_eq!(e.signal("MSFT", &rule), Some(Direction::Short));
    assert_eq!(e.signal("NOPE", &rule), None);
}

#[test]
fn late_ticks_change_nothing_and_are_counted() {
    let mut e = FeatureEngine::new();
    feed(&mut e, trade(100_000, 100.0, 1.0), 0);
    assert_eq!(feed(&mut e, trade(40_000, 50.0, 1.0), 0), Applied::Late);
    assert_eq!(e.late(), 1);
    // Just inside the window: applied, in event-time order.
    assert_eq!(feed(&mut e, trade(40_001, 98.0, 1.0), 0), Applied::Updated);
    let got = f(&e);
    assert_eq!(got.trade_vwap_60s, Some(99.0));
    assert_eq!(got.at, Some(at(100_000)));
    // The latest trade stays the newest by event time.
    assert_eq!(e.state_json("MSFT").unwrap()["trade"]["price"], 100.0);
    assert_eq!(got.return_10s, Some(100.0 / 98.0 - 1.0));
}

#[test]
fn latency_percentiles_are_nearest_rank() {
    let mut e = FeatureEngine::new();
    for i in 1..=20 {
        feed(&mut e, quote(i * 100, 99.0, 101.0), i);
    }
    let got = f(&e);
    assert_eq!(got.latency_ms_p50, Some(10.0));
    assert_eq!(got.latency_ms_p95, Some(19.0));
}

#[test]
fn state_json_is_exact() {
    let mut e = FeatureEngine::new();
    feed(&mut e, quote(0, 99.5, 100.5), 3);
    feed(&mut e, trade(1_500, 100.25, 7.0), 4);
    assert_eq!(
        e.state_json("MSFT").unwrap(),
        serde_json::json!({
            "symbol": "MSFT", "mic": "XNAS", "ticks": 2, "trades_in_window": 1,
            "trade": {"price": 100.25, "size": 7.0,
                      "event_time": "2026-01-02T15:00:01.500000Z",
                      "received_at": "2026-01-02T15:00:01.504000Z"},
            "quote": {"bid": 99.5, "bid_size": 3.0, "ask": 100.5, "ask_size": 4.0,
                      "event_time": "2026-01-02T15:00:00.000000Z",
                      "received_at": "2026-01-02T15:00:00.003000Z"},
        })
    );
    assert_eq!(e.symbols(), vec!["MSFT".to_owned()]);
}
