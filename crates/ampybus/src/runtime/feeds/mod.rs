//! Feed health (DESIGN §2, seeds 002 and 004): market data whose silence is noticed.
//!
//! * **Heartbeats** ([`Heartbeat`], [`ProducerBuilder::heartbeat`](crate::runtime::ProducerBuilder::heartbeat)):
//!   a producer sends `ampy.metrics.v1.Metric` (`name` = `heartbeat`, label `source`,
//!   `value` = the count this run) on `ampy.{env}.ticks.v1.heartbeat.{source}`, partition key
//!   = the source id, every interval.
//! * **Sequence numbers** ([`ProducerBuilder::sequence`](crate::runtime::ProducerBuilder::sequence)):
//!   the optional header `sequence` (unsigned decimal, per producer run and partition key,
//!   from 1) stamped in the order messages enter the producer's queue. A message the queue
//!   sheds (best-effort topics) keeps its number, so consumers see the loss as a gap.
//! * **Monitoring** ([`FeedMonitor`], the state machine; [`FeedWatch`], which runs one over a
//!   subscription of new messages on any tier): `stale` / `recovered` per source and per
//!   partition key, `gap` / `duplicate` per (producer, run, key), as [`FeedEvent`]s to the
//!   application, as metrics (`bus_stale_sources`, `bus_seconds_since_last{topic}`,
//!   `bus_gap_total{topic}`) and on `/stats` (`feeds`). `ampybus monitor` prints them.
//! * **Healing** ([`GapHealer`], enabled by
//!   [`ConsumerBuilder::heal_gaps`](crate::runtime::ConsumerBuilder::heal_gaps)): on a durable
//!   tier, a gap in what a consumer is delivered becomes a replay request for the missing
//!   range, served by that consumer through its handler and dedupe store.
//! * **Failover** ([`FailoverProducer`]): one active source among several of the same
//!   topics, switched on silence or failures, switched back after the primary was healthy
//!   for a set time.
//!
//! Time comes from a [`Clock`]: [`SystemClock`] in services, [`ManualClock`] in tests, so
//! event sequences are asserted exactly without sleeping.

mod clock;
mod failover;
mod heal;
mod heartbeat;
mod monitor;
mod watch;

pub use clock::{Clock, ManualClock, Now, SystemClock};
pub use failover::{
    FailoverConfig, FailoverEvent, FailoverProducer, FailoverReason, FailoverState, Offered,
};
pub use heal::{GapHealer, HealOptions, HealStats};
pub use heartbeat::{
    HEARTBEAT_NAME, HEARTBEAT_SCHEMA, Heartbeat, HeartbeatMetric, heartbeat_topic,
};
pub use monitor::{
    FeedConfig, FeedEvent, FeedEventKind, FeedMonitor, FeedStats, HealReport, SEQUENCE,
};
pub use watch::{FeedWatch, FeedWatchBuilder};

use std::collections::HashMap;

pub use crate::headers::check_sequence;

/// The producer side of `sequence`: the last number given per (`producer`, `run_id`,
/// partition key). [`peek`](Sequencer::peek) the next number, and
/// [`commit`](Sequencer::commit) it once the message was accepted.
///
/// ```
/// use ampybus::runtime::feeds::Sequencer;
/// let mut s = Sequencer::default();
/// assert_eq!(s.peek("p", "r", "k"), 1);
/// s.commit("p", "r", "k", 1);
/// assert_eq!(s.peek("p", "r", "k"), 2);
/// assert_eq!(s.peek("p", "r", "other"), 1);
/// ```
#[derive(Debug, Default)]
pub struct Sequencer {
    last: HashMap<(String, String, String), u64>,
}

impl Sequencer {
    /// The number the next message of (producer, run, key) gets.
    pub fn peek(&self, producer: &str, run_id: &str, key: &str) -> u64 {
        self.last
            .get(&(producer.to_owned(), run_id.to_owned(), key.to_owned()))
            .map_or(1, |n| n + 1)
    }

    /// Records `n` as given.
    pub fn commit(&mut self, producer: &str, run_id: &str, key: &str, n: u64) {
        self.last
            .insert((producer.to_owned(), run_id.to_owned(), key.to_owned()), n);
    }
}
