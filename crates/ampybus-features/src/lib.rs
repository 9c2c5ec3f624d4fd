//! The seed 004 market-data consumer as an ampybus service.
//!
//! * [`FeatureEngine`]: latest trade and quote plus 60 s rolling windows per symbol, the
//!   seed's eleven features ([`FEATURE_NAMES`]) and the edge-triggered [`SignalRule`]. Pure
//!   and clock-injected (time comes in as arguments), so tests script exact values. The
//!   `ampybus demo` features step runs on it too.
//! * [`FeaturesService`]: a consumer of `ampy.{env}.ticks.v1.>` (payloads
//!   `ampy.ticks.v1.TradeTick`, `QuoteTick`, `Tick`, `TickBatch`; heartbeats are read and
//!   ignored; anything else is dead-lettered with its reason), publishing features
//!   rate-limited per symbol as `ampy.metrics.v1.MetricBatch` on
//!   `ampy.{env}.metrics.v1.features.{SYMBOL}` (key `{service}|{SYMBOL}`, one `Metric` per
//!   computable feature, labels `symbol` and `service`, `at` = the symbol's latest event time)
//!   and signals as `ampy.signals.v1.Signal` on `ampy.{env}.signals.v1.{model_id}`, and
//!   serving `/state/latest?symbol=` and `/features/latest?symbol=` next to the bus's
//!   `/health`, `/metrics`, `/stats`.
//! * The `ampybus-features` binary runs the service.
//!
//! ```
//! use ampybus_features::{FeatureEngine, TickEvent};
//! let t0: chrono::DateTime<chrono::Utc> = "2026-01-02T15:00:00Z".parse().unwrap();
//! let s = |n: i64| t0 + chrono::Duration::seconds(n);
//! let mut e = FeatureEngine::new();
//! e.apply("MSFT", "XNAS", TickEvent::Trade { price: 100.0, size: 1.0, event_time: s(0) }, s(0));
//! e.apply("MSFT", "XNAS", TickEvent::Trade { price: 103.0, size: 3.0, event_time: s(5) }, s(5));
//! let f = e.features("MSFT").unwrap();
//! assert_eq!(f.trade_vwap_10s, Some(102.25));
//! assert_eq!(f.trade_count_10s, Some(2.0));
//! ```

mod engine;
mod service;

pub use engine::{
    Applied, Direction, FEATURE_NAMES, FeatureEngine, Features, LONG_WINDOW, RateLimiter,
    SHORT_WINDOW, SignalRule, TickEvent,
};
pub use service::{
    DecodedTick, FeaturesService, ServiceConfig, ServiceStats, TICK_SCHEMAS, decode_ticks,
};
