//! The worker's clock: one monotonic reading per message before the handler and one after,
//! with the wall time derived from the first (the realtime clock is read once a second per
//! thread to anchor it) and the second reused by the worker's run budget.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How long a thread derives the wall time from one anchor before it reads the realtime clock
/// again (so a step of the system clock shows in the delivery latency within this long).
const ANCHOR_FOR: Duration = Duration::from_secs(1);

thread_local! {
    /// `(monotonic, wall µs)` read together.
    static ANCHOR: Cell<Option<(Instant, i64)>> = const { Cell::new(None) };
    /// The last reading taken after a handler on this thread, for the run budget.
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The wall time at `at` (a monotonic reading just taken), in µs since the Unix epoch.
pub(super) fn wall_micros(at: Instant) -> i64 {
    let anchored = ANCHOR.with(|a| {
        let (mono, wall) = a.get()?;
        let d = at.checked_duration_since(mono)?;
        // Whole seconds and the µs of the rest (no 128-bit division).
        (d < ANCHOR_FOR)
            .then(|| wall + d.as_secs() as i64 * 1_000_000 + i64::from(d.subsec_micros()))
    });
    anchored.unwrap_or_else(|| {
        let wall = crate::ids::now_micros();
        ANCHOR.with(|a| a.set(Some((at, wall))));
        wall
    })
}

/// A monotonic reading taken after a handler, kept for [`elapsed_since`].
pub(super) fn after_handler() -> Instant {
    let now = Instant::now();
    LAST.with(|l| l.set(Some(now)));
    now
}

/// Time since `started`: from the reading taken after the last handler on this thread when
/// there is one (taken once), else from a new reading. A reading from before `started`
/// counts as no time at all.
pub(super) fn elapsed_since(started: Instant) -> Duration {
    LAST.with(|l| l.take())
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_time_follows_the_monotonic_clock_from_its_anchor() {
        let t0 = Instant::now();
        let w0 = wall_micros(t0);
        let real = crate::ids::now_micros();
        assert!((real - w0).abs() < 100_000, "anchor {w0} vs clock {real}");
        // Within the anchor's second the wall time is the anchor's plus the monotonic step.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(wall_micros(t1), w0 + 250_000);
        // Past it, the realtime clock is read again.
        let t2 = t0 + ANCHOR_FOR + Duration::from_millis(1);
        let w2 = wall_micros(t2);
        assert!(
            (w2 - crate::ids::now_micros()).abs() < 100_000,
            "re-anchored {w2}"
        );
        assert_eq!(wall_micros(t2 + Duration::from_micros(7)), w2 + 7);
    }

    #[test]
    fn a_reading_after_a_handler_is_used_once() {
        let started = Instant::now();
        let after = after_handler();
        assert_eq!(elapsed_since(started), after - started);
        // Taken: the next call reads the clock, which cannot be earlier.
        assert!(elapsed_since(started) >= after - started);
        // A reading from before `started` counts as nothing.
        let _ = after_handler();
        assert_eq!(
            elapsed_since(Instant::now() + Duration::from_secs(5)),
            Duration::ZERO
        );
    }
}
