//! Consumer lag in seconds: `bus_consumer_lag_seconds{topic,consumer}` and the lag alert.
//!
//! The consumer runtime records, per fetched batch, the store time of its oldest message and
//! how many messages had been fetched after it ([`LagClock::on_fetch`]); a sampler task reads
//! the runtime's settled count once a second and reports the age of the oldest batch not yet
//! wholly settled: the age of the oldest unacknowledged message this consumer holds (exact
//! when messages settle in fetch order; a message parked for a retry while later ones settle
//! can read younger). 0 when everything fetched is settled. While the consumer is behind, the
//! batches it fetches are old and the figure is how far behind it reads; while it is stuck,
//! the figure grows with the clock. Past the threshold ([`DEFAULT_LAG_ALERT`], 30 s) a
//! [`LagEvent::Over`] goes to [`LagWatch::events`] and a `warn` log line; below it again a
//! [`LagEvent::Back`].

use crate::transport::Delivery;
use chrono::{DateTime, Utc};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::broadcast;

/// Default lag alert threshold: 30 s (seed 002).
pub const DEFAULT_LAG_ALERT: Duration = Duration::from_secs(30);

/// How often the sampler reads the lag.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// A lag alert of one consumer.
///
/// ```
/// use ampybus::runtime::LagEvent;
/// let e = LagEvent::Over { consumer: "risk".into(), pattern: "ampy.prod.>".into(), lag_seconds: 31.0, at: chrono::Utc::now() };
/// assert_eq!(e.kind(), "lag");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum LagEvent {
    /// The lag passed the threshold.
    Over {
        /// Consumer name.
        consumer: String,
        /// Its pattern.
        pattern: String,
        /// Age of the oldest unacknowledged message, seconds.
        lag_seconds: f64,
        /// When it was seen.
        at: DateTime<Utc>,
    },
    /// The lag is below the threshold again.
    Back {
        /// Consumer name.
        consumer: String,
        /// Its pattern.
        pattern: String,
        /// Lag now, seconds.
        lag_seconds: f64,
        /// When it was seen.
        at: DateTime<Utc>,
    },
}

impl LagEvent {
    /// `lag` (over the threshold) or `lag_recovered`.
    pub fn kind(&self) -> &'static str {
        match self {
            LagEvent::Over { .. } => "lag",
            LagEvent::Back { .. } => "lag_recovered",
        }
    }
}

/// The fetch marks of one consumer and its alert state.
pub(crate) struct LagClock {
    /// (messages fetched up to and including the batch, oldest store time of the batch, µs).
    marks: Mutex<VecDeque<(u64, i64)>>,
    seconds: Mutex<f64>,
    events: broadcast::Sender<LagEvent>,
    alert_after: Duration,
}

impl LagClock {
    pub(crate) fn new(alert_after: Duration) -> Arc<LagClock> {
        Arc::new(LagClock {
            marks: Mutex::new(VecDeque::new()),
            seconds: Mutex::new(0.0),
            events: broadcast::channel(64).0,
            alert_after,
        })
    }

    /// Records a fetched batch; `fetched_after` = messages fetched so far, this batch included.
    pub(crate) fn on_fetch(&self, fetched_after: u64, batch: &[Delivery]) {
        if let Some(oldest) = batch
            .iter()
            .map(|d| d.info.stored_at.timestamp_micros())
            .min()
        {
            self.marks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back((fetched_after, oldest));
        }
    }

    /// The age of the oldest batch not wholly settled once `settled` messages are.
    fn age(&self, settled: u64, now: DateTime<Utc>) -> f64 {
        let mut m = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        while m.front().is_some_and(|(n, _)| *n <= settled) {
            m.pop_front();
        }
        m.front().map_or(0.0, |(_, at)| {
            ((now.timestamp_micros() - at) as f64 / 1e6).max(0.0)
        })
    }
}

/// Reads one consumer's lag in seconds and its alerts (from
/// [`crate::runtime::ConsumerHandle::lag_watch`]).
#[derive(Clone)]
pub struct LagWatch {
    clock: Arc<LagClock>,
}

impl std::fmt::Debug for LagWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagWatch")
            .field("seconds", &self.seconds())
            .finish()
    }
}

impl LagWatch {
    pub(crate) fn new(clock: Arc<LagClock>) -> LagWatch {
        LagWatch { clock }
    }

    /// The last sampled lag, seconds.
    pub fn seconds(&self) -> f64 {
        *self.clock.seconds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The alert threshold.
    pub fn alert_after(&self) -> Duration {
        self.clock.alert_after
    }

    /// Alerts from now on.
    pub fn events(&self) -> broadcast::Receiver<LagEvent> {
        self.clock.events.subscribe()
    }
}

/// Samples the lag of a consumer once a second until `settled` says it is gone (`None`):
/// sets `bus_consumer_lag_seconds{topic,consumer}` and sends the alerts.
pub(crate) fn spawn_sampler<S: Send + Sync + 'static>(
    bus: &crate::Bus,
    pattern: &str,
    consumer: &str,
    clock: Arc<LagClock>,
    owner: Weak<S>,
    settled: fn(&S) -> u64,
) {
    let gauge = bus.metrics().consumer_lag_seconds(pattern, consumer);
    let (pattern, consumer) = (pattern.to_owned(), consumer.to_owned());
    tokio::spawn(async move {
        let mut over = false;
        loop {
            tokio::time::sleep(SAMPLE_EVERY).await;
            let Some(owner) = owner.upgrade() else { return };
            let now = Utc::now();
            let secs = clock.age(settled(&owner), now);
            drop(owner);
            *clock.seconds.lock().unwrap_or_else(|p| p.into_inner()) = secs;
            gauge.set(secs);
            let is_over = secs > clock.alert_after.as_secs_f64();
            if is_over == over {
                continue;
            }
            over = is_over;
            let (p, c) = (pattern.clone(), consumer.clone());
            let event = if is_over {
                tracing::warn!(consumer = %c, pattern = %p, lag_seconds = secs, "consumer lag over its alert threshold");
                LagEvent::Over {
                    consumer: c,
                    pattern: p,
                    lag_seconds: secs,
                    at: now,
                }
            } else {
                tracing::info!(consumer = %c, pattern = %p, lag_seconds = secs, "consumer lag back under its alert threshold");
                LagEvent::Back {
                    consumer: c,
                    pattern: p,
                    lag_seconds: secs,
                    at: now,
                }
            };
            let _ = clock.events.send(event);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::DeliveryInfo;

    fn d(at_us: i64) -> Delivery {
        Delivery::best_effort(
            crate::Envelope {
                topic: Default::default(),
                headers: crate::Headers::new(),
                payload: bytes::Bytes::new(),
            },
            DeliveryInfo {
                sequence: 1,
                delivery_count: 1,
                stored_at: DateTime::from_timestamp_micros(at_us).unwrap(),
            },
        )
    }

    #[test]
    fn age_of_the_oldest_batch_not_wholly_settled() {
        let c = LagClock::new(DEFAULT_LAG_ALERT);
        let now = DateTime::from_timestamp_micros(100_000_000).unwrap();
        assert_eq!(c.age(0, now), 0.0);
        c.on_fetch(2, &[d(90_000_000), d(80_000_000)]); // 20 s old
        c.on_fetch(3, &[d(95_000_000)]); // 5 s old
        assert_eq!(c.age(0, now), 20.0);
        assert_eq!(c.age(1, now), 20.0);
        assert_eq!(c.age(2, now), 5.0);
        assert_eq!(c.age(3, now), 0.0);
    }
}
