//! The clock feed health runs on: the system clock in production, a [`ManualClock`] in tests,
//! so a test asserts exact event sequences by moving time itself instead of sleeping.

use chrono::{DateTime, Utc};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One reading of a [`Clock`]: a monotonic instant (for durations) and the wall time it
/// corresponds to (for the `at` of events).
///
/// ```
/// use ampybus::runtime::feeds::{Clock, SystemClock};
/// let a = SystemClock.now();
/// let b = a.after(std::time::Duration::from_secs(2));
/// assert_eq!(b.since(a), std::time::Duration::from_secs(2));
/// assert_eq!((b.wall - a.wall).num_seconds(), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub instant: Instant,
    /// Wall time (UTC).
    pub wall: DateTime<Utc>,
}

impl Now {
    /// This reading moved `d` later.
    pub fn after(self, d: Duration) -> Now {
        Now {
            instant: self.instant + d,
            wall: self.wall + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero()),
        }
    }

    /// Time from `earlier` to this reading (zero when `earlier` is later).
    pub fn since(self, earlier: Now) -> Duration {
        self.instant.saturating_duration_since(earlier.instant)
    }
}

/// Where feed health reads the time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> Now;
}

/// The system clock (`tokio::time::Instant`, so Tokio's paused time moves it too).
///
/// ```
/// use ampybus::runtime::feeds::{Clock, SystemClock};
/// assert!(SystemClock.now().wall <= chrono::Utc::now());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Now {
        Now {
            instant: tokio::time::Instant::now().into_std(),
            wall: Utc::now(),
        }
    }
}

/// A clock that moves only when told ([`ManualClock::advance`]); clones share the time.
///
/// ```
/// use ampybus::runtime::feeds::{Clock, ManualClock};
/// use std::time::Duration;
/// let clock = ManualClock::starting_at("2026-01-02T03:04:05Z".parse().unwrap());
/// let t0 = clock.now();
/// clock.advance(Duration::from_millis(1_500));
/// assert_eq!(clock.now().since(t0), Duration::from_millis(1_500));
/// assert_eq!(clock.now().wall.to_rfc3339(), "2026-01-02T03:04:06.500+00:00");
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<Now>>);

impl ManualClock {
    /// A clock reading `wall` now.
    pub fn starting_at(wall: DateTime<Utc>) -> ManualClock {
        ManualClock(Arc::new(Mutex::new(Now {
            instant: Instant::now(),
            wall,
        })))
    }

    /// Moves the time `d` forward.
    pub fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t = t.after(d);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Now {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
