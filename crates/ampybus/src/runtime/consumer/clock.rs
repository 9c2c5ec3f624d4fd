//! The worker's clock: one monotonic reading per message, taken after its handler, which is
//! also where the next handler of the worker's run starts (see `tally`) and what the run
//! budget reads; the wall time is derived from it (the realtime clock is read once a second
//! per thread to anchor it). Readings are whole nanoseconds ([`Mono`]), so their differences
//! are one subtraction.

use std::cell::Cell;
use std::time::Duration;

/// How long a thread derives the wall time from one anchor before it reads the realtime clock
/// again (so a step of the system clock shows in the delivery latency within this long).
const ANCHOR_FOR: Duration = Duration::from_secs(1);

/// A reading of the monotonic clock, in nanoseconds from an arbitrary start: on Unix
/// `CLOCK_MONOTONIC` read directly (the clock `std::time::Instant` reads on Linux), elsewhere
/// `Instant` itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Mono(u64);

impl Mono {
    /// Now.
    #[inline]
    pub(super) fn now() -> Mono {
        #[cfg(unix)]
        if let Some((secs, nanos)) = crate::ids::read_clock(libc::CLOCK_MONOTONIC) {
            return Mono((secs.max(0) as u64) * 1_000_000_000 + nanos.max(0) as u64);
        }
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(std::time::Instant::now);
        Mono(start.elapsed().as_nanos() as u64)
    }

    /// The time from `earlier` to this reading; none when `earlier` is later.
    #[inline]
    pub(super) fn since(self, earlier: Mono) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// [`Mono::since`] in milliseconds.
    #[inline]
    pub(super) fn millis_since(self, earlier: Mono) -> f64 {
        self.0.saturating_sub(earlier.0) as f64 / 1e6
    }
}

thread_local! {
    /// `(monotonic, wall µs)` read together.
    static ANCHOR: Cell<Option<(Mono, i64)>> = const { Cell::new(None) };
}

/// The wall time at `at` (a monotonic reading just taken), in µs since the Unix epoch.
pub(super) fn wall_micros(at: Mono) -> i64 {
    let anchored = ANCHOR.with(|a| {
        let (mono, wall) = a.get()?;
        let ns = at.0.checked_sub(mono.0)?;
        (ns < ANCHOR_FOR.as_nanos() as u64).then(|| wall + (ns / 1000) as i64)
    });
    anchored.unwrap_or_else(|| {
        let wall = crate::ids::now_micros();
        ANCHOR.with(|a| a.set(Some((at, wall))));
        wall
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_time_follows_the_monotonic_clock_from_its_anchor() {
        let t0 = Mono::now();
        let w0 = wall_micros(t0);
        let real = crate::ids::now_micros();
        assert!((real - w0).abs() < 100_000, "anchor {w0} vs clock {real}");
        // Within the anchor's second the wall time is the anchor's plus the monotonic step.
        let t1 = Mono(t0.0 + 250_000_000);
        assert_eq!(wall_micros(t1), w0 + 250_000);
        // Past it, the realtime clock is read again.
        let t2 = Mono(t0.0 + ANCHOR_FOR.as_nanos() as u64 + 1_000_000);
        let w2 = wall_micros(t2);
        assert!(
            (w2 - crate::ids::now_micros()).abs() < 100_000,
            "re-anchored {w2}"
        );
        assert_eq!(wall_micros(Mono(t2.0 + 7_000)), w2 + 7);
        // A reading before the anchor re-anchors rather than going back.
        let w_before = wall_micros(Mono(t2.0 - 1));
        assert!((w_before - crate::ids::now_micros()).abs() < 100_000);
    }

    #[test]
    fn the_monotonic_clock_follows_instant() {
        let (m0, i0) = (Mono::now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (i1, m1) = (std::time::Instant::now(), Mono::now());
        let (mono, inst) = (m1.since(m0), i1 - i0);
        // Read in the opposite order around the pause: on the same clock the monotonic step
        // encloses the other; in the wrong unit it would be a thousand times off.
        assert!(mono >= inst, "{mono:?} vs {inst:?}");
        assert!(mono < Duration::from_secs(1), "{mono:?} vs {inst:?}");
        assert_eq!(m0.since(m1), Duration::ZERO);
        assert_eq!(Mono(3_500_000).millis_since(Mono(1_000_000)), 2.5);
    }
}
