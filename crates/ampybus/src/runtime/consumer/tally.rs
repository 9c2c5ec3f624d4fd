//! What a worker tallies per message during one run and writes once, when the run ends or
//! before anything in it waits: messages handled Ok, and messages consumed, delivery latency
//! and handler duration of the run's domain-level topic (a run of one topic writes each once,
//! not per message: these atomic writes per message were a twentieth of the consume path's
//! time on two cores); and the clock reading taken after the last handler, from which the
//! next message's handler starts (one reading of the clock per message instead of two).

use super::*;
use crate::obs::{FastHistogram, LATENCY_BUCKETS, latency_bucket};

/// Observations of one histogram, by bucket.
#[derive(Clone, Copy)]
struct HistTally {
    counts: [u32; LATENCY_BUCKETS],
    sum: f64,
    n: u32,
}

impl Default for HistTally {
    fn default() -> Self {
        HistTally {
            counts: [0; LATENCY_BUCKETS],
            sum: 0.0,
            n: 0,
        }
    }
}

impl HistTally {
    #[inline]
    fn observe(&mut self, ms: f64) {
        self.counts[latency_bucket(ms)] += 1;
        self.sum += ms;
        self.n += 1;
    }

    fn write(&self, h: &FastHistogram) {
        if self.n > 0 {
            h.add(&self.counts, self.sum);
        }
    }
}

/// One worker's tally (see the module's text). Written at the end of every run
/// ([`Tally::end_run`]) and before it tallies another topic's messages.
#[derive(Default)]
pub(super) struct Tally {
    /// The topic slot tallied (`None`: nothing tallied).
    slot: Option<TopicSlot>,
    consumed: u64,
    latency: HistTally,
    duration: HistTally,
    /// Messages handled Ok (`handled_ok` of the consumer's stats, whatever the topic):
    /// written after the metrics, so that a reader who sees a message counted there finds it
    /// in the metrics too.
    handled_ok: u64,
    /// A reading taken after the last handler of the run: the start of the next message's
    /// handler when nothing waited in between.
    pub(super) last: Option<clock::Mono>,
}

impl Tally {
    /// The tally of `slot`: what was tallied for another slot is written first.
    #[inline]
    fn of(&mut self, shared: &Shared, slot: TopicSlot) -> &mut Tally {
        if self.slot != Some(slot) {
            self.flush(shared);
            self.slot = Some(slot);
        }
        self
    }

    /// A delivery latency of a message of `slot`.
    #[inline]
    pub(super) fn latency(&mut self, shared: &Shared, slot: TopicSlot, ms: f64) {
        self.of(shared, slot).latency.observe(ms);
    }

    /// A handler duration of a message of `slot`.
    #[inline]
    pub(super) fn duration(&mut self, shared: &Shared, slot: TopicSlot, ms: f64) {
        self.of(shared, slot).duration.observe(ms);
    }

    /// A message handled Ok.
    #[inline]
    pub(super) fn handled_ok(&mut self) {
        self.handled_ok += 1;
    }

    /// A message of `slot` consumed.
    #[inline]
    pub(super) fn consumed(&mut self, shared: &Shared, slot: TopicSlot) {
        self.of(shared, slot).consumed += 1;
    }

    /// The end of a run, or of what a message did before it waits: writes what is tallied
    /// and forgets the last clock reading (what follows starts from a new one).
    pub(super) fn end_run(&mut self, shared: &Shared) {
        self.last = None;
        self.flush(shared);
        if self.handled_ok > 0 {
            std::sync::atomic::fence(Ordering::Release);
            shared.counters.handled_ok.add(self.handled_ok);
            self.handled_ok = 0;
        }
    }

    /// Writes what is tallied into its slot's metrics and starts over.
    fn flush(&mut self, shared: &Shared) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        if let Some(h) = shared.handles.get(slot) {
            if self.consumed > 0 {
                h.consumed.add(self.consumed);
            }
            self.latency.write(&h.delivery_latency);
            self.duration.write(&h.handler_duration);
        }
        self.consumed = 0;
        self.latency = HistTally::default();
        self.duration = HistTally::default();
    }
}
