//! The counts the runtime keeps and `/stats` shows: a consumer's ([`ConsumerStats`]) and a
//! producer's ([`ProducerStats`], with its drops by [`DropReason`]). Also exported from
//! `ampybus::runtime`, which keeps them.

use crate::dlq::DlqCode;
use std::collections::BTreeMap;

/// Counts kept by a running consumer.
///
/// ```
/// use ampybus::runtime::{ConsumerStats, DlqCode};
/// let mut s = ConsumerStats::default();
/// s.dead_lettered.insert(DlqCode::HandlerPanic, 2);
/// assert_eq!(s.dlq(DlqCode::HandlerPanic), 2);
/// assert_eq!(s.dlq(DlqCode::DecodeError), 0);
/// assert_eq!(s.dead_lettered_total(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Handler returned `Ok` (acked, recorded for dedupe).
    pub handled_ok: u64,
    /// Attempts that ended in a retry being scheduled.
    pub retried: u64,
    /// Messages written to the DLQ (then acked), by reason code; only non-zero codes.
    pub dead_lettered: BTreeMap<DlqCode, u64>,
    /// Deliveries skipped because this consumer had already applied them.
    pub skipped_duplicates: u64,
    /// Deliveries handed back to the transport unfinished (shutdown).
    pub released: u64,
    /// Attempts put off because another message with one of the same dedupe keys was being
    /// handled at that moment (by this consumer or by a replay it serves); each is tried again
    /// shortly and is skipped when the other one applied it.
    pub deferred: u64,
    /// Fetched and not yet settled.
    pub in_flight: u64,
}

impl ConsumerStats {
    /// Dead-lettered count for one code.
    pub fn dlq(&self, code: DlqCode) -> u64 {
        self.dead_lettered.get(&code).copied().unwrap_or(0)
    }

    /// Dead-lettered count over all codes.
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.values().sum()
    }
}

/// Why a message was shed instead of published. Every shed message is counted under exactly
/// one reason (see [`DropCounts`]); the labels are stable for metrics.
///
/// ```
/// use ampybus::runtime::DropReason;
/// assert_eq!(DropReason::QuoteBook.as_str(), "quote_book");
/// assert_eq!(DropReason::ALL.map(DropReason::as_str), ["heartbeat", "quote_book", "conflated", "lag"]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A heartbeat dropped because the queue was full.
    Heartbeat,
    /// A quote or book message dropped because the queue was full.
    QuoteBook,
    /// A queued message replaced by a newer one of the same topic and `partition_key` because
    /// the queue was full.
    Conflated,
    /// Dropped or replaced because a watched consumer lags (see
    /// [`ProducerBuilder::slow_down_on_lag`](crate::runtime::ProducerBuilder::slow_down_on_lag)).
    Lag,
}

impl DropReason {
    /// Every reason, in declaration order.
    pub const ALL: [DropReason; 4] = [
        DropReason::Heartbeat,
        DropReason::QuoteBook,
        DropReason::Conflated,
        DropReason::Lag,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Heartbeat => "heartbeat",
            DropReason::QuoteBook => "quote_book",
            DropReason::Conflated => "conflated",
            DropReason::Lag => "lag",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shed messages by reason. Each shed message is counted once.
///
/// ```
/// use ampybus::runtime::{DropCounts, DropReason};
/// let d = DropCounts { heartbeat: 2, quote_book: 1, conflated: 3, lag: 0 };
/// assert_eq!(d.get(DropReason::Conflated), 3);
/// assert_eq!(d.total(), 6);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DropCounts {
    /// [`DropReason::Heartbeat`]
    pub heartbeat: u64,
    /// [`DropReason::QuoteBook`]
    pub quote_book: u64,
    /// [`DropReason::Conflated`]
    pub conflated: u64,
    /// [`DropReason::Lag`]
    pub lag: u64,
}

impl DropCounts {
    /// The count of one reason.
    pub fn get(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Heartbeat => self.heartbeat,
            DropReason::QuoteBook => self.quote_book,
            DropReason::Conflated => self.conflated,
            DropReason::Lag => self.lag,
        }
    }

    /// Every reason together.
    pub fn total(&self) -> u64 {
        self.heartbeat + self.quote_book + self.conflated + self.lag
    }

    pub(crate) fn bump(&mut self, reason: DropReason) {
        match reason {
            DropReason::Heartbeat => self.heartbeat += 1,
            DropReason::QuoteBook => self.quote_book += 1,
            DropReason::Conflated => self.conflated += 1,
            DropReason::Lag => self.lag += 1,
        }
    }
}

/// A snapshot of a producer's counters. Every accepted send ends in exactly one place:
/// `accepted == queued + in_flight + published + failed + dropped.total()`, where a
/// conflation counts the *replaced* message as dropped and the new one as queued, and
/// `accepted` counts every send that returned `Ok` (a send that returned
/// `Dropped` is counted as accepted and dropped).
///
/// ```
/// let s = ampybus::runtime::ProducerStats::default();
/// assert_eq!(s.accepted, s.queued + s.in_flight + s.published + s.failed + s.dropped.total());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProducerStats {
    /// Sends that returned `Ok` (any [`SendOutcome`](crate::runtime::SendOutcome)).
    pub accepted: u64,
    /// Messages waiting in the queue now.
    pub queued: u64,
    /// Messages being published by the flusher now.
    pub in_flight: u64,
    /// Messages the transport stored (broker duplicates included).
    pub published: u64,
    /// Messages whose publish failed for good (retries exhausted or a permanent error).
    pub failed: u64,
    /// Shed messages by reason.
    pub dropped: DropCounts,
    /// Sends that returned [`SendOutcome::Conflated`](crate::runtime::SendOutcome::Conflated) (full queue and lag together).
    pub conflated: u64,
    /// Whether a watched consumer lags right now.
    pub lagging: bool,
}
