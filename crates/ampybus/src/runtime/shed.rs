//! The bounded queue of a best-effort consumer: shedding by class past 90 % fill.
//!
//! [`shedding`] wraps a [`Subscription`] of a best-effort pattern: a task reads the
//! subscription as fast as it delivers into a queue of [`ShedOptions::capacity`] messages, and
//! the consumer fetches from that queue. Once the queue holds 90 % of its capacity, incoming
//! messages are shed in the producer's order ([`crate::runtime::ShedClass`], the same code):
//! a `heartbeat` is dropped; a `quote`/`book` evicts the oldest queued heartbeat or is
//! dropped (with [`ShedOptions::conflate`]: first replaces the newest queued message of its
//! topic and key, latest-per-key); a `trade` — and every message not of a ticks class — is
//! never dropped: it takes the last 10 %, and when the queue is full the task stops reading
//! (the transport's own buffer then holds, or on NATS core drops, what comes). Every drop is
//! counted by reason in [`ShedStats`] and in `bus_dropped{topic,reason}` (the producer's
//! metric), and a dropped delivery is acknowledged (a no-op on NATS core; on a transport that
//! is at-least-once underneath it is not delivered again).

use crate::bus::Bus;
use crate::error::Result;
use crate::headers::names;
use crate::runtime::{DropCounts, SendOutcome, ShedClass, producer::ShedQueue};
use crate::topic::Topic;
use crate::transport::{Delivery, Subscription};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Fill (percent of the capacity) from which a best-effort consumer sheds.
pub const SHED_AT_PERCENT: usize = 90;

/// The queue of a best-effort consumer.
///
/// ```
/// let o = ampybus::runtime::ShedOptions::default();
/// assert_eq!((o.capacity, o.conflate), (10_000, false));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShedOptions {
    /// Messages the queue holds at most (shedding starts at 90 % of it).
    pub capacity: usize,
    /// Conflate quote/book and other non-trade ticks latest-per-key before dropping.
    pub conflate: bool,
}

impl Default for ShedOptions {
    fn default() -> Self {
        ShedOptions {
            capacity: 10_000,
            conflate: false,
        }
    }
}

/// What a best-effort consumer's queue did: `received == delivered + queued +
/// dropped.total()` (a conflation counts the replaced message as dropped).
///
/// ```
/// let s = ampybus::runtime::ShedStats::default();
/// assert_eq!(s.received, s.delivered + s.queued as u64 + s.dropped.total());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShedStats {
    /// Read from the subscription.
    pub received: u64,
    /// Waiting in the queue.
    pub queued: usize,
    /// Handed to the consumer.
    pub delivered: u64,
    /// Shed, by reason.
    pub dropped: DropCounts,
}

/// Reads a best-effort consumer's queue counts.
#[derive(Clone)]
pub struct ShedMonitor {
    inner: Arc<Inner>,
    received: watch::Receiver<u64>,
}

impl std::fmt::Debug for ShedMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShedMonitor")
            .field("stats", &self.stats())
            .finish()
    }
}

impl ShedMonitor {
    /// The counts now.
    pub fn stats(&self) -> ShedStats {
        let s = self.inner.lock();
        ShedStats {
            received: s.received,
            queued: s.queue.len(),
            delivered: s.delivered,
            dropped: s.queue.dropped,
        }
    }

    /// Waits until at least `n` messages were read from the subscription; false after
    /// `timeout`.
    pub async fn wait_received(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.received.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

struct State {
    queue: ShedQueue<Held>,
    received: u64,
    delivered: u64,
}

struct Inner {
    state: Mutex<State>,
    /// Messages are waiting (one waiter: the fetcher).
    ready: Notify,
    /// Room was made (one waiter: the reader task).
    room: Notify,
    capacity: usize,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A queued delivery; one dropped from the queue (shed, conflated away) goes to `graves` to
/// be acknowledged.
struct Held {
    delivery: Option<Delivery>,
    graves: Arc<Mutex<Vec<Delivery>>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(d) = self.delivery.take() {
            self.graves
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(d);
        }
    }
}

/// Wraps `sub` (a subscription of a best-effort pattern) in the shedding queue; see the module
/// docs. The reader task ends when the returned subscription is dropped.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::{Bus, TopicPattern, runtime::{ShedOptions, shedding}, transport::SubscribeSpec};
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let sub = bus.subscribe(SubscribeSpec::durable(TopicPattern::parse("ampy.dev.ticks.>").unwrap(), "md")).await.unwrap();
/// let (_sub, monitor) = shedding(&bus, sub, ShedOptions { capacity: 10, conflate: true });
/// assert_eq!(monitor.stats().received, 0);
/// # });
/// ```
pub fn shedding(
    bus: &Bus,
    sub: Box<dyn Subscription>,
    opts: ShedOptions,
) -> (Box<dyn Subscription>, ShedMonitor) {
    let capacity = opts.capacity.max(1);
    let shed_at = (capacity * SHED_AT_PERCENT).div_ceil(100).max(1);
    let mut queue = ShedQueue::new(shed_at).log_drops();
    if !opts.conflate {
        queue = queue.without_conflation();
    }
    let inner = Arc::new(Inner {
        state: Mutex::new(State {
            queue,
            received: 0,
            delivered: 0,
        }),
        ready: Notify::new(),
        room: Notify::new(),
        capacity,
    });
    let (tx, rx) = watch::channel(0u64);
    let reader = tokio::spawn(read_into_queue(bus.clone(), sub, inner.clone(), tx));
    (
        Box::new(ShedSubscription {
            inner: inner.clone(),
            reader,
        }),
        ShedMonitor {
            inner,
            received: rx,
        },
    )
}

const READ_BATCH: usize = 512;
const READ_WAIT: Duration = Duration::from_millis(100);

async fn read_into_queue(
    bus: Bus,
    mut sub: Box<dyn Subscription>,
    inner: Arc<Inner>,
    received: watch::Sender<u64>,
) {
    let graves: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    loop {
        let room = loop {
            let room = inner.capacity.saturating_sub(inner.lock().queue.len());
            if room > 0 {
                break room;
            }
            inner.room.notified().await;
        };
        let got = match sub.fetch(room.min(READ_BATCH), READ_WAIT).await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "best-effort consumer: fetch failed; retrying");
                tokio::time::sleep(READ_WAIT).await;
                continue;
            }
        };
        if got.is_empty() {
            continue;
        }
        let drops = {
            let mut s = inner.lock();
            for d in got {
                s.received += 1;
                let class = Topic::parse(&d.envelope.topic)
                    .map_or(ShedClass::Guaranteed, |t| ShedClass::of(&t, true));
                let topic = d.envelope.topic.clone();
                let key = d
                    .envelope
                    .headers
                    .get(names::PARTITION_KEY)
                    .unwrap_or_default()
                    .to_owned();
                let held = Held {
                    delivery: Some(d),
                    graves: graves.clone(),
                };
                match s.queue.offer(class, &topic, &key, held, false) {
                    Ok(SendOutcome::Dropped(_) | SendOutcome::Queued | SendOutcome::Conflated) => {}
                    Err(held) => s.queue.push_over(class, &topic, &key, held),
                }
            }
            received.send_replace(s.received);
            s.queue.take_drops()
        };
        inner.ready.notify_one();
        for (topic, reason) in &drops {
            bus.metrics().dropped(topic, *reason);
            tracing::debug!(topic = %topic, reason = %reason, "best-effort consumer: message dropped");
        }
        let dead = std::mem::take(&mut *graves.lock().unwrap_or_else(|p| p.into_inner()));
        if !dead.is_empty()
            && let Err((e, _)) = Delivery::ack_all(dead).await
        {
            tracing::warn!(error = %e, "best-effort consumer: acknowledging dropped messages failed");
        }
    }
}

struct ShedSubscription {
    inner: Arc<Inner>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for ShedSubscription {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[async_trait]
impl Subscription for ShedSubscription {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let out: Vec<Delivery> = {
                let mut s = self.inner.lock();
                let out: Vec<Delivery> = s
                    .queue
                    .take(max.max(1))
                    .into_iter()
                    .filter_map(|(_, mut h)| h.delivery.take())
                    .collect();
                s.delivered += out.len() as u64;
                out
            };
            if !out.is_empty() {
                self.inner.room.notify_one();
                return Ok(out);
            }
            if tokio::time::timeout_at(deadline, self.inner.ready.notified())
                .await
                .is_err()
            {
                return Ok(Vec::new());
            }
        }
    }
}
