//! The feature engine: latest state and rolling windows per symbol, the seed's eleven
//! features, the signal rule and the per-symbol publish rate limit. Pure and clock-injected:
//! nothing here reads a clock or does I/O, so tests script ticks and times exactly.
//!
//! ## Time
//!
//! Windows run on **event time** (the tick's `event_time`). A symbol's "now" is the latest
//! event time seen for it, so a replay or a scripted test computes the same values as the
//! live run did. An event at `t` is inside a window of length `W` at `now` when
//! `now - W < t <= now`: at exactly `W` old it has left the window. A tick older than the
//! 60 s window when it arrives is counted as late and changes nothing. Latency is
//! `received_at - event_time` in milliseconds, where `received_at` comes from the caller's
//! clock (the service injects an [`ampybus::runtime::feeds::Clock`]).
//!
//! ## Definitions
//!
//! | feature | definition (`None` when it cannot be computed) |
//! |---|---|
//! | `mid` | `(bid + ask) / 2` of the latest quote |
//! | `spread_abs` | `ask - bid` of the latest quote (negative when crossed, 0 when locked) |
//! | `spread_bps` | `spread_abs / mid * 10_000` (`None` when `mid <= 0`) |
//! | `trade_vwap_10s`, `trade_vwap_60s` | `Σ price·size / Σ size` over the window (`None` when the window has no volume) |
//! | `trade_count_10s` | trades in the 10 s window (zero-size trades count) |
//! | `trade_volume_10s` | `Σ size` over the 10 s window |
//! | `return_10s` | `last / reference - 1`, reference = the last trade at or before `now - 10 s` (the price as of 10 s ago; the last trade that left the 60 s window is kept for this) |
//! | `realized_vol_60s` | sample standard deviation (n − 1) of the log returns between consecutive trades in the 60 s window; needs two returns |
//! | `latency_ms_p50`, `latency_ms_p95` | nearest-rank percentile of the latencies of the ticks (trades and quotes) in the 60 s window |

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The short window (10 s).
pub const SHORT_WINDOW: Duration = Duration::from_secs(10);
/// The long window (60 s); state older than this is evicted.
pub const LONG_WINDOW: Duration = Duration::from_secs(60);

/// The feature names, in publish order.
///
/// ```
/// assert_eq!(ampybus_features::FEATURE_NAMES.len(), 11);
/// assert_eq!(ampybus_features::FEATURE_NAMES[0], "mid");
/// ```
pub const FEATURE_NAMES: [&str; 11] = [
    "mid",
    "spread_abs",
    "spread_bps",
    "trade_vwap_10s",
    "trade_vwap_60s",
    "trade_count_10s",
    "trade_volume_10s",
    "return_10s",
    "realized_vol_60s",
    "latency_ms_p50",
    "latency_ms_p95",
];

/// One market-data event of a symbol, in plain numbers.
///
/// ```
/// use ampybus_features::TickEvent;
/// let t = TickEvent::Trade { price: 100.0, size: 5.0, event_time: chrono::Utc::now() };
/// assert!(t.is_trade());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TickEvent {
    /// A trade.
    Trade {
        /// Trade price.
        price: f64,
        /// Trade size (0 allowed).
        size: f64,
        /// Exchange time.
        event_time: DateTime<Utc>,
    },
    /// A top-of-book quote.
    Quote {
        /// Best bid.
        bid: f64,
        /// Size at the bid.
        bid_size: f64,
        /// Best ask.
        ask: f64,
        /// Size at the ask.
        ask_size: f64,
        /// Exchange time.
        event_time: DateTime<Utc>,
    },
}

impl TickEvent {
    /// The exchange time of the event.
    ///
    /// ```
    /// use ampybus_features::TickEvent;
    /// let at = chrono::Utc::now();
    /// assert_eq!(TickEvent::Trade { price: 1.0, size: 1.0, event_time: at }.event_time(), at);
    /// ```
    pub fn event_time(&self) -> DateTime<Utc> {
        match *self {
            TickEvent::Trade { event_time, .. } | TickEvent::Quote { event_time, .. } => event_time,
        }
    }

    /// True for a trade.
    ///
    /// ```
    /// use ampybus_features::TickEvent;
    /// let q = TickEvent::Quote { bid: 1.0, bid_size: 1.0, ask: 2.0, ask_size: 1.0, event_time: chrono::Utc::now() };
    /// assert!(!q.is_trade());
    /// ```
    pub fn is_trade(&self) -> bool {
        matches!(self, TickEvent::Trade { .. })
    }
}

/// The features of one symbol at its latest event time; see the module docs for definitions.
///
/// ```
/// let f = ampybus_features::Features::default();
/// assert_eq!(f.values()[0], ("mid", None));
/// assert_eq!(f.to_json()["features"]["mid"], serde_json::Value::Null);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Features {
    /// The symbol's latest event time (`None` before any tick).
    pub at: Option<DateTime<Utc>>,
    /// `(bid + ask) / 2`.
    pub mid: Option<f64>,
    /// `ask - bid`.
    pub spread_abs: Option<f64>,
    /// Spread in basis points of mid.
    pub spread_bps: Option<f64>,
    /// VWAP over 10 s.
    pub trade_vwap_10s: Option<f64>,
    /// VWAP over 60 s.
    pub trade_vwap_60s: Option<f64>,
    /// Trades in 10 s.
    pub trade_count_10s: Option<f64>,
    /// Volume in 10 s.
    pub trade_volume_10s: Option<f64>,
    /// Return over 10 s.
    pub return_10s: Option<f64>,
    /// Realised volatility over 60 s.
    pub realized_vol_60s: Option<f64>,
    /// Median latency, ms.
    pub latency_ms_p50: Option<f64>,
    /// 95th-percentile latency, ms.
    pub latency_ms_p95: Option<f64>,
}

impl Features {
    /// `(name, value)` in [`FEATURE_NAMES`] order.
    ///
    /// ```
    /// let f = ampybus_features::Features { mid: Some(1.5), ..Default::default() };
    /// assert_eq!(f.values()[0], ("mid", Some(1.5)));
    /// ```
    pub fn values(&self) -> [(&'static str, Option<f64>); 11] {
        let v = [
            self.mid,
            self.spread_abs,
            self.spread_bps,
            self.trade_vwap_10s,
            self.trade_vwap_60s,
            self.trade_count_10s,
            self.trade_volume_10s,
            self.return_10s,
            self.realized_vol_60s,
            self.latency_ms_p50,
            self.latency_ms_p95,
        ];
        let mut out = [("", None); 11];
        for (i, (name, value)) in FEATURE_NAMES.iter().zip(v).enumerate() {
            out[i] = (*name, value);
        }
        out
    }

    /// `{"at": RFC3339|null, "features": {name: number|null}}` (what `/features/latest`
    /// serves, with the symbol added).
    ///
    /// ```
    /// let f = ampybus_features::Features { spread_abs: Some(0.5), ..Default::default() };
    /// assert_eq!(f.to_json()["features"]["spread_abs"], 0.5);
    /// ```
    pub fn to_json(&self) -> Value {
        let features: serde_json::Map<String, Value> = self
            .values()
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.map_or(Value::Null, |x| json!(x))))
            .collect();
        json!({"at": time_json(self.at), "features": features})
    }
}

/// RFC3339 UTC with microseconds (the contract's time form), or null.
pub(crate) fn time_json(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| Value::String(ampybus::ids::format_time(t)))
}

/// A signal direction.
///
/// ```
/// assert_eq!(ampybus_features::Direction::Long.action(), "ACTION_TYPE_BUY");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Buy.
    Long,
    /// Sell.
    Short,
}

impl Direction {
    /// The `ampy.common.v1.ActionType` name of the direction.
    ///
    /// ```
    /// assert_eq!(ampybus_features::Direction::Short.action(), "ACTION_TYPE_SELL");
    /// ```
    pub fn action(self) -> &'static str {
        match self {
            Direction::Long => "ACTION_TYPE_BUY",
            Direction::Short => "ACTION_TYPE_SELL",
        }
    }
}

/// The seed's signal rule: long when `return_10s > return_threshold`, `trade_volume_10s >
/// volume_threshold` and `0 <= spread_bps < max_spread_bps`; short the same with
/// `return_10s < -return_threshold`. A crossed quote (negative spread) never signals.
///
/// ```
/// use ampybus_features::{Direction, Features, SignalRule};
/// let f = Features { return_10s: Some(0.004), trade_volume_10s: Some(2.0),
///                    spread_bps: Some(5.0), ..Default::default() };
/// assert_eq!(SignalRule::default().direction(&f), Some(Direction::Long));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalRule {
    /// Minimum |return_10s| (fraction; the seed's 0.3 % = 0.003).
    pub return_threshold: f64,
    /// Minimum trade volume over 10 s (exclusive).
    pub volume_threshold: f64,
    /// Maximum spread in bps (exclusive).
    pub max_spread_bps: f64,
}

impl Default for SignalRule {
    fn default() -> Self {
        SignalRule {
            return_threshold: 0.003,
            volume_threshold: 1.0,
            max_spread_bps: 20.0,
        }
    }
}

impl SignalRule {
    /// The direction `f` calls for, if any.
    ///
    /// ```
    /// use ampybus_features::{Features, SignalRule};
    /// assert_eq!(SignalRule::default().direction(&Features::default()), None);
    /// ```
    pub fn direction(&self, f: &Features) -> Option<Direction> {
        let (ret, vol, spread) = (f.return_10s?, f.trade_volume_10s?, f.spread_bps?);
        if vol <= self.volume_threshold || !(0.0..self.max_spread_bps).contains(&spread) {
            return None;
        }
        if ret > self.return_threshold {
            Some(Direction::Long)
        } else if ret < -self.return_threshold {
            Some(Direction::Short)
        } else {
            None
        }
    }
}

/// Latest trade of a symbol.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LastTrade {
    price: f64,
    size: f64,
    event_time: DateTime<Utc>,
    received_at: DateTime<Utc>,
}

/// Latest quote of a symbol.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LastQuote {
    bid: f64,
    bid_size: f64,
    ask: f64,
    ask_size: f64,
    event_time: DateTime<Utc>,
    received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy)]
struct WinTrade {
    at: DateTime<Utc>,
    price: f64,
    size: f64,
}

#[derive(Debug, Default)]
struct SymbolState {
    mic: String,
    now: Option<DateTime<Utc>>,
    trade: Option<LastTrade>,
    quote: Option<LastQuote>,
    /// Trades inside the 60 s window, in event-time order.
    trades: VecDeque<WinTrade>,
    /// The last trade that left the 60 s window (the price as of before the window).
    anchor: Option<WinTrade>,
    /// (event time, latency ms) of ticks inside the 60 s window, in event-time order.
    latencies: VecDeque<(DateTime<Utc>, f64)>,
    ticks: u64,
    /// The direction of the previous evaluation of the signal rule.
    direction: Option<Direction>,
}

fn window(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Inserts keeping event-time order (ticks mostly arrive in order: a scan from the back).
fn insert_sorted<T>(q: &mut VecDeque<T>, item: T, at: impl Fn(&T) -> DateTime<Utc>) {
    let t = at(&item);
    let pos = q.iter().rposition(|x| at(x) <= t).map_or(0, |i| i + 1);
    q.insert(pos, item);
}

impl SymbolState {
    fn evict(&mut self, now: DateTime<Utc>) {
        let edge = now - window(LONG_WINDOW);
        while self.trades.front().is_some_and(|t| t.at <= edge) {
            self.anchor = self.trades.pop_front();
        }
        while self.latencies.front().is_some_and(|(t, _)| *t <= edge) {
            self.latencies.pop_front();
        }
    }

    fn features(&self) -> Features {
        let Some(now) = self.now else {
            return Features::default();
        };
        let mut f = Features {
            at: Some(now),
            ..Features::default()
        };
        if let Some(q) = self.quote {
            let mid = (q.bid + q.ask) / 2.0;
            let spread = q.ask - q.bid;
            f.mid = Some(mid);
            f.spread_abs = Some(spread);
            f.spread_bps = (mid > 0.0).then(|| spread / mid * 10_000.0);
        }
        let short_edge = now - window(SHORT_WINDOW);
        let vwap = |edge: DateTime<Utc>| {
            let (pv, v) = self
                .trades
                .iter()
                .filter(|t| t.at > edge)
                .fold((0.0, 0.0), |(pv, v), t| (pv + t.price * t.size, v + t.size));
            (v > 0.0).then(|| pv / v)
        };
        f.trade_vwap_10s = vwap(short_edge);
        f.trade_vwap_60s = vwap(now - window(LONG_WINDOW));
        let short: Vec<&WinTrade> = self.trades.iter().filter(|t| t.at > short_edge).collect();
        f.trade_count_10s = Some(short.len() as f64);
        f.trade_volume_10s = Some(short.iter().map(|t| t.size).sum());
        let last = self.trades.back().or(self.anchor.as_ref());
        let reference = self
            .trades
            .iter()
            .rev()
            .find(|t| t.at <= short_edge)
            .or(self.anchor.as_ref());
        if let (Some(last), Some(r)) = (last, reference)
            && r.price > 0.0
        {
            f.return_10s = Some(last.price / r.price - 1.0);
        }
        let rets: Vec<f64> = self
            .trades
            .iter()
            .zip(self.trades.iter().skip(1))
            .filter(|(a, b)| a.price > 0.0 && b.price > 0.0)
            .map(|(a, b)| (b.price / a.price).ln())
            .collect();
        if rets.len() >= 2 {
            let n = rets.len() as f64;
            let mean = rets.iter().sum::<f64>() / n;
            let var = rets.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0);
            f.realized_vol_60s = Some(var.sqrt());
        }
        if !self.latencies.is_empty() {
            let mut l: Vec<f64> = self.latencies.iter().map(|(_, ms)| *ms).collect();
            l.sort_by(f64::total_cmp);
            f.latency_ms_p50 = Some(nearest_rank(&l, 0.50));
            f.latency_ms_p95 = Some(nearest_rank(&l, 0.95));
        }
        f
    }
}

/// Nearest-rank percentile of sorted, non-empty `v`: the value at rank `ceil(p · n)`.
fn nearest_rank(v: &[f64], p: f64) -> f64 {
    let rank = (p * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// What [`FeatureEngine::apply`] did with a tick.
///
/// ```
/// assert_ne!(ampybus_features::Applied::Updated, ampybus_features::Applied::Late);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The state changed.
    Updated,
    /// The tick was older than the symbol's 60 s window; nothing changed.
    Late,
}

/// Per-symbol state and features for every symbol seen.
///
/// ```
/// use ampybus_features::{FeatureEngine, TickEvent};
/// let t0: chrono::DateTime<chrono::Utc> = "2026-01-02T15:00:00Z".parse().unwrap();
/// let mut e = FeatureEngine::new();
/// e.apply("MSFT", "XNAS", TickEvent::Quote { bid: 99.0, bid_size: 1.0, ask: 101.0,
///                                          ask_size: 1.0, event_time: t0 }, t0);
/// let f = e.features("MSFT").unwrap();
/// assert_eq!(f.mid, Some(100.0));
/// assert_eq!(f.spread_bps, Some(200.0));
/// ```
#[derive(Debug, Default)]
pub struct FeatureEngine {
    symbols: BTreeMap<String, SymbolState>,
    late: u64,
}

impl FeatureEngine {
    /// An empty engine.
    ///
    /// ```
    /// assert!(ampybus_features::FeatureEngine::new().symbols().is_empty());
    /// ```
    pub fn new() -> Self {
        FeatureEngine::default()
    }

    /// Applies one tick of `symbol` (listed on `mic`), received at `received_at`.
    ///
    /// ```
    /// use ampybus_features::{Applied, FeatureEngine, TickEvent};
    /// let t0: chrono::DateTime<chrono::Utc> = "2026-01-02T15:00:00Z".parse().unwrap();
    /// let mut e = FeatureEngine::new();
    /// let trade = |s: i64| TickEvent::Trade { price: 10.0, size: 1.0,
    ///                                         event_time: t0 + chrono::Duration::seconds(s) };
    /// assert_eq!(e.apply("A", "XNAS", trade(100), t0), Applied::Updated);
    /// assert_eq!(e.apply("A", "XNAS", trade(40), t0), Applied::Late);
    /// assert_eq!(e.late(), 1);
    /// ```
    pub fn apply(
        &mut self,
        symbol: &str,
        mic: &str,
        ev: TickEvent,
        received_at: DateTime<Utc>,
    ) -> Applied {
        let st = self.symbols.entry(symbol.to_owned()).or_default();
        let at = ev.event_time();
        if st.now.is_some_and(|now| at <= now - window(LONG_WINDOW)) {
            self.late += 1;
            return Applied::Late;
        }
        if st.mic.is_empty() || !mic.is_empty() {
            st.mic = mic.to_owned();
        }
        st.ticks += 1;
        let latency = (received_at - at)
            .num_microseconds()
            .map_or(f64::MAX, |us| us as f64 / 1000.0);
        insert_sorted(&mut st.latencies, (at, latency), |x| x.0);
        match ev {
            TickEvent::Trade {
                price,
                size,
                event_time,
            } => {
                insert_sorted(
                    &mut st.trades,
                    WinTrade {
                        at: event_time,
                        price,
                        size,
                    },
                    |t| t.at,
                );
                if st.trade.is_none_or(|t| t.event_time <= event_time) {
                    st.trade = Some(LastTrade {
                        price,
                        size,
                        event_time,
                        received_at,
                    });
                }
            }
            TickEvent::Quote {
                bid,
                bid_size,
                ask,
                ask_size,
                event_time,
            } => {
                if st.quote.is_none_or(|q| q.event_time <= event_time) {
                    st.quote = Some(LastQuote {
                        bid,
                        bid_size,
                        ask,
                        ask_size,
                        event_time,
                        received_at,
                    });
                }
            }
        }
        let now = st.now.map_or(at, |n| n.max(at));
        st.now = Some(now);
        st.evict(now);
        Applied::Updated
    }

    /// The features of `symbol` at its latest event time; `None` for a symbol never seen.
    ///
    /// ```
    /// assert!(ampybus_features::FeatureEngine::new().features("MSFT").is_none());
    /// ```
    pub fn features(&self, symbol: &str) -> Option<Features> {
        self.symbols.get(symbol).map(SymbolState::features)
    }

    /// Evaluates `rule` on the current features of `symbol` and returns the direction when it
    /// differs from the previous evaluation's (edge-triggered: a condition that holds over many
    /// ticks signals once; it signals again after it lapsed, or when it flips).
    ///
    /// ```
    /// use ampybus_features::{Direction, FeatureEngine, SignalRule, TickEvent};
    /// let t0: chrono::DateTime<chrono::Utc> = "2026-01-02T15:00:00Z".parse().unwrap();
    /// let s = |n: i64| t0 + chrono::Duration::seconds(n);
    /// let mut e = FeatureEngine::new();
    /// e.apply("A", "XNAS", TickEvent::Quote { bid: 100.9, bid_size: 1.0, ask: 101.1,
    ///                                       ask_size: 1.0, event_time: s(0) }, s(0));
    /// e.apply("A", "XNAS", TickEvent::Trade { price: 100.0, size: 1.0, event_time: s(0) }, s(0));
    /// e.apply("A", "XNAS", TickEvent::Trade { price: 101.0, size: 2.0, event_time: s(10) }, s(10));
    /// assert_eq!(e.signal("A", &SignalRule::default()), Some(Direction::Long));
    /// assert_eq!(e.signal("A", &SignalRule::default()), None); // still long: no new signal
    /// ```
    pub fn signal(&mut self, symbol: &str, rule: &SignalRule) -> Option<Direction> {
        let st = self.symbols.get_mut(symbol)?;
        let now = rule.direction(&st.features());
        let prev = std::mem::replace(&mut st.direction, now);
        if now != prev { now } else { None }
    }

    /// The latest trade and quote of `symbol` as JSON (what `/state/latest` serves); `None`
    /// for a symbol never seen.
    ///
    /// ```
    /// use ampybus_features::{FeatureEngine, TickEvent};
    /// let t0: chrono::DateTime<chrono::Utc> = "2026-01-02T15:00:00Z".parse().unwrap();
    /// let mut e = FeatureEngine::new();
    /// e.apply("A", "XNAS", TickEvent::Trade { price: 10.5, size: 3.0, event_time: t0 }, t0);
    /// let s = e.state_json("A").unwrap();
    /// assert_eq!(s["trade"]["price"], 10.5);
    /// assert_eq!(s["quote"], serde_json::Value::Null);
    /// ```
    pub fn state_json(&self, symbol: &str) -> Option<Value> {
        let st = self.symbols.get(symbol)?;
        let trade = st.trade.map_or(Value::Null, |t| {
            json!({
                "price": t.price,
                "size": t.size,
                "event_time": time_json(Some(t.event_time)),
                "received_at": time_json(Some(t.received_at)),
            })
        });
        let quote = st.quote.map_or(Value::Null, |q| {
            json!({
                "bid": q.bid,
                "bid_size": q.bid_size,
                "ask": q.ask,
                "ask_size": q.ask_size,
                "event_time": time_json(Some(q.event_time)),
                "received_at": time_json(Some(q.received_at)),
            })
        });
        Some(json!({
            "symbol": symbol,
            "mic": st.mic,
            "ticks": st.ticks,
            "trades_in_window": st.trades.len(),
            "trade": trade,
            "quote": quote,
        }))
    }

    /// The MIC a symbol was last seen with.
    ///
    /// ```
    /// assert_eq!(ampybus_features::FeatureEngine::new().mic("A"), None);
    /// ```
    pub fn mic(&self, symbol: &str) -> Option<&str> {
        self.symbols.get(symbol).map(|s| s.mic.as_str())
    }

    /// Symbols seen, sorted.
    ///
    /// ```
    /// assert!(ampybus_features::FeatureEngine::new().symbols().is_empty());
    /// ```
    pub fn symbols(&self) -> Vec<String> {
        self.symbols.keys().cloned().collect()
    }

    /// Ticks ignored because they were older than their symbol's 60 s window.
    ///
    /// ```
    /// assert_eq!(ampybus_features::FeatureEngine::new().late(), 0);
    /// ```
    pub fn late(&self) -> u64 {
        self.late
    }
}

/// At most one publish per symbol per `min_interval` (the seed's `FEATURES_PUB_RATE_HZ`; 10 Hz =
/// 100 ms). Reads the time it is given, so tests move it by hand.
///
/// ```
/// use ampybus_features::RateLimiter;
/// use std::time::{Duration, Instant};
/// let mut r = RateLimiter::new(Duration::from_millis(100));
/// let t0 = Instant::now();
/// assert!(r.allow("A", t0));
/// assert!(!r.allow("A", t0 + Duration::from_millis(99)));
/// assert!(r.allow("B", t0));
/// assert!(r.allow("A", t0 + Duration::from_millis(100)));
/// ```
#[derive(Debug)]
pub struct RateLimiter {
    min_interval: Duration,
    last: HashMap<String, Instant>,
}

impl RateLimiter {
    /// A limiter allowing one publish per symbol per `min_interval` (zero: every time).
    ///
    /// ```
    /// let mut r = ampybus_features::RateLimiter::new(std::time::Duration::ZERO);
    /// let t = std::time::Instant::now();
    /// assert!(r.allow("A", t) && r.allow("A", t));
    /// ```
    pub fn new(min_interval: Duration) -> Self {
        RateLimiter {
            min_interval,
            last: HashMap::new(),
        }
    }

    /// True (and records `now`) when `symbol` may publish at `now`.
    ///
    /// ```
    /// let mut r = ampybus_features::RateLimiter::new(std::time::Duration::from_secs(1));
    /// let t = std::time::Instant::now();
    /// assert!(r.allow("A", t));
    /// assert!(!r.allow("A", t));
    /// ```
    pub fn allow(&mut self, symbol: &str, now: Instant) -> bool {
        match self.last.get(symbol) {
            Some(prev) if now.saturating_duration_since(*prev) < self.min_interval => false,
            _ => {
                self.last.insert(symbol.to_owned(), now);
                true
            }
        }
    }
}
