//! The consumer: fetch → per-key FIFO → workers → batched ack.
//!
//! - `builder`: [`ConsumerBuilder`], what a consumer is configured with, and its start;
//! - `handle`: [`ConsumerHandle`] and [`ConsumerMonitor`], what a running consumer shows;
//! - `sched`: the per-key scheduler (one FIFO per partition key, ready keys for workers);
//! - `keys`: dedupe keys as the runtime holds them, and the key book;
//! - `pipeline`: the tasks — fetcher, workers, acker, lease refresher, lag poller;
//! - `attempt`: one handling attempt, prepare → dedupe → handle → settle;
//! - `clock`: the workers' clock readings (the wall time derived from the monotonic clock);
//! - `tally`: what a worker's run counts per message and writes into the metrics once;
//! - `shared`: the state every task of one consumer shares;
//! - `replay_stores`: the dedupe stores replays served by a running consumer go through.

mod attempt;
mod builder;
mod clock;
mod handle;
mod keys;
mod pipeline;
mod replay_stores;
mod sched;
mod shared;
mod tally;
#[cfg(test)]
mod tests;

use keys::*;
use pipeline::*;
use replay_stores::*;
use sched::*;
use shared::*;
use tally::Tally;

use builder::DedupeChoice;
#[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
pub use builder::InboxBinding;
pub use builder::{ConsumerBuilder, DEFAULT_MAX_PAYLOAD};
use handle::Counters;
pub use handle::{ConsumerHandle, ConsumerMonitor};

use super::{DlqCode, Handler, Message, Outcome, RetryPolicy};
use crate::bus::Bus;
use crate::codec::DecodeFailure;
use crate::dedupe::DedupeStore;
use crate::dlq::{build_dlq_envelope, dlq_topic_for};
use crate::error::{Error, ErrorKind, Result};
use crate::fasthash::{FastHash, FastMap};
use crate::obs::{BusTracer, ConsumerStats, ConsumerTopic};
use crate::topic::{Topic, TopicPattern};
use crate::transport::{Delivery, StartAt, SubscribeSpec};
use futures::FutureExt;
use opentelemetry::context::FutureExt as OtelFutureExt;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

/// The domains whose messages are handled in strict per-key order unless the builder says
/// otherwise.
const STRICT_DOMAINS: [crate::topic::Domain; 2] =
    [crate::topic::Domain::Orders, crate::topic::Domain::Fills];

/// Where a consumer is in its life; only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Fetching and handling.
    Running,
    /// Stopped fetching; finishing what is in flight.
    Draining,
    /// The drain deadline passed: release what is left and stop.
    HardStop,
}

/// Largest fetch per round trip.
const FETCH_BATCH: usize = 256;
/// How long one fetch waits for messages (also bounds how fast shutdown stops fetching).
const FETCH_WAIT: Duration = Duration::from_millis(100);
/// How long the acker gathers finished messages before one flush.
const ACK_LINGER: Duration = Duration::from_millis(2);

/// Tries of a failed batch ack before the acker gives up on an error that another try cannot
/// mend, or while the consumer shuts down; a transport error is retried while it runs.
const ACK_TRIES: u32 = 5;

/// The longest pause between two tries of a failed batch ack.
const ACK_RETRY_MAX: Duration = Duration::from_secs(1);

/// Entry point of the consumer runtime; see [`Consumer::builder`].
#[derive(Debug)]
pub struct Consumer;

impl Consumer {
    /// Starts configuring a durable consumer named `name` on `pattern`.
    ///
    /// Defaults: 8 workers, 1,024 messages in flight, [`RetryPolicy::default`], strict per-key
    /// order when the pattern's domain token is literally `orders` or `fills`, a 30 s ack
    /// deadline, start at the earliest retained message, and the transport's own dedupe store
    /// ([`crate::transport::Transport::dedupe_store`]; on the embedded log a table in the log,
    /// written in the same transaction as the acks) — no dedupe when the transport has none and
    /// none is given.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::runtime::{Consumer, Outcome, RetryPolicy, handler_fn};
    /// use ampybus::{Bus, TopicPattern};
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let handle = Consumer::builder(bus, TopicPattern::parse("ampy.dev.orders.>").unwrap(), "oms")
    ///     .handler(handler_fn(|_msg| async { Outcome::Ok }))
    ///     .workers(4)
    ///     .max_in_flight(256)
    ///     .retry(RetryPolicy { max_attempts: 3, ..Default::default() })
    ///     .ack_deadline(Duration::from_secs(10))
    ///     .start()
    ///     .await
    ///     .unwrap();
    /// assert!(handle.is_strict());
    /// let stats = handle.shutdown(Duration::from_secs(1)).await;
    /// assert_eq!(stats.handled_ok, 0);
    /// # });
    /// ```
    pub fn builder(bus: Bus, pattern: TopicPattern, name: &str) -> ConsumerBuilder {
        ConsumerBuilder {
            bus,
            pattern,
            name: name.to_owned(),
            handler: None,
            workers: None,
            default_workers: 8,
            max_in_flight: 1024,
            retry: RetryPolicy::default(),
            strict: None,
            dedupe: DedupeChoice::Default,
            ack_deadline: Duration::from_secs(30),
            start: StartAt::Earliest,
            serve_replays: true,
            handler_dedupes: false,
            max_payload: DEFAULT_MAX_PAYLOAD,
            shed: super::ShedOptions::default(),
            lag_alert: super::lag::DEFAULT_LAG_ALERT,
            heal: None,
        }
    }
}

enum Step {
    Finished,
    Retry(Item, Duration),
}

/// How many parsed topics a consumer keeps (see `Shared::topics`).
const TOPIC_CACHE_MAX: usize = 4096;

async fn wait_phase(rx: &mut watch::Receiver<Phase>, at_least: Phase) {
    loop {
        if *rx.borrow_and_update() >= at_least {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Whether the consumer still runs, as seen by `rx` (cheap: one atomic load while nothing
/// changed; a dropped handle counts as stopped).
fn still_running(rx: &mut watch::Receiver<Phase>) -> bool {
    match rx.has_changed() {
        Ok(false) => *rx.borrow() == Phase::Running,
        Ok(true) => *rx.borrow_and_update() == Phase::Running,
        Err(_) => false,
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}
