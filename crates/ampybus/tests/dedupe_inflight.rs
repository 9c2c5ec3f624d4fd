//! Dedupe off the critical path (issue 15 item 3): the batch lookup runs beside the handling
//! of earlier batches, so a duplicate can be fetched — and its lookup answered "not applied" —
//! while its first copy is still being handled. The runtime's own record of keys it has taken
//! (being handled, handled but not recorded yet, recorded lately) must catch it: handled once,
//! skipped once, both acked. Waits poll counters; no sleep is used as synchronisation.

use ampybus::runtime::{Consumer, ConsumerHandle, ConsumerStats, Handler, Message, Outcome};
use ampybus::transport::SubscribeSpec;
use ampybus::{Bus, Headers, Topic, TopicPattern};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const HANG: Duration = Duration::from_secs(60);

async fn wait_stats(what: &str, h: &ConsumerHandle, cond: impl Fn(&ConsumerStats) -> bool) {
    let start = Instant::now();
    loop {
        let s = h.stats();
        if cond(&s) {
            return;
        }
        assert!(
            start.elapsed() < HANG,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `cond` holds (checked every 5 ms; fails after [`HANG`]).
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < HANG, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Holds the first message it gets until `release` is notified; records every call.
struct Gate {
    entered: AtomicU64,
    release: Notify,
    calls: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Handler for Gate {
    async fn handle(&self, msg: &Message) -> Outcome {
        self.calls
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&msg.payload).into_owned());
        if self.entered.fetch_add(1, Ordering::SeqCst) == 0 {
            self.release.notified().await;
        }
        Outcome::Ok
    }
}

fn with_dedupe_key(key: &str, dedupe_key: &str) -> Headers {
    Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", key).with("dedupe_key", dedupe_key)
}

/// Nothing is left for the consumer name: everything was acked.
async fn all_acked(bus: &Bus, pattern: &str, name: &str) {
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(
            TopicPattern::parse(pattern).unwrap(),
            name,
        ))
        .await
        .unwrap();
    let left = sub.fetch(10, Duration::from_millis(500)).await.unwrap();
    assert!(left.is_empty(), "{} messages not acked", left.len());
}

/// A bus on an embedded log in a new temporary directory (kept while the first value lives)
/// and the topic the tests publish on.
async fn embedded_bus() -> (tempfile::TempDir, Bus, Topic) {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(&format!("file://{}?sync=normal", dir.path().display()))
        .await
        .unwrap();
    (
        dir,
        bus,
        Topic::parse("ampy.dev.orders.v1.requests").unwrap(),
    )
}

async fn run(strict: bool, same_batch: bool) {
    let (_dir, bus, topic) = embedded_bus().await;
    let gate = Arc::new(Gate {
        entered: AtomicU64::new(0),
        release: Notify::new(),
        calls: Mutex::default(),
    });
    // Two messages with different ids and partition keys (so they may run at once) and one
    // dedupe_key.
    bus.publish(&topic, with_dedupe_key("co_1", "dk-1"), b"first".to_vec())
        .await
        .unwrap();
    if same_batch {
        bus.publish(&topic, with_dedupe_key("co_2", "dk-1"), b"second".to_vec())
            .await
            .unwrap();
    }
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.orders.>").unwrap(),
        "inflight",
    )
    .handler_arc(gate.clone())
    .strict(strict)
    .workers(4)
    .serve_replays(false)
    .start()
    .await
    .unwrap();
    wait_until("the first copy in the handler", || {
        gate.entered.load(Ordering::SeqCst) > 0
    })
    .await;
    if !same_batch {
        // The duplicate arrives while its first copy is in flight.
        bus.publish(&topic, with_dedupe_key("co_2", "dk-1"), b"second".to_vec())
            .await
            .unwrap();
    }
    // Both fetched, the first still held: the duplicate's lookup cannot have seen a record.
    wait_stats("both fetched", &handle, |s| s.in_flight == 2).await;
    assert_eq!(handle.stats().handled_ok, 0);
    assert_eq!(gate.calls.lock().unwrap().len(), 1);
    gate.release.notify_one();
    wait_stats("one handled, one skipped", &handle, |s| {
        s.handled_ok == 1 && s.skipped_duplicates == 1 && s.in_flight == 0
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        (
            stats.handled_ok,
            stats.skipped_duplicates,
            stats.released,
            stats.in_flight,
            stats.dead_lettered_total()
        ),
        (1, 1, 0, 0, 0),
        "{stats:?}"
    );
    // Whichever copy came first was handled, exactly once.
    assert_eq!(gate.calls.lock().unwrap().len(), 1);
    all_acked(&bus, "ampy.dev.orders.>", "inflight").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_dedupe_key_arriving_while_the_first_copy_is_in_flight() {
    run(true, false).await;
    run(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_dedupe_key_in_the_same_batch_as_the_first_copy() {
    run(true, true).await;
    run(false, true).await;
}

/// Holds `slow-1` until `fillers` other messages were handled; records every call.
struct Blocker {
    fillers: u64,
    done: AtomicU64,
    release: Notify,
    calls: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Handler for Blocker {
    async fn handle(&self, msg: &Message) -> Outcome {
        let text = String::from_utf8_lossy(&msg.payload).into_owned();
        if text == "slow-1" {
            while self.done.load(Ordering::SeqCst) < self.fillers {
                // Woken by the filler that completes the count (checked again after each).
                let n = self.release.notified();
                if self.done.load(Ordering::SeqCst) >= self.fillers {
                    break;
                }
                n.await;
            }
        } else if text.starts_with("fill") {
            if self.done.fetch_add(1, Ordering::SeqCst) + 1 == self.fillers {
                self.release.notify_waiters();
            }
            return Outcome::Ok;
        }
        self.calls.lock().unwrap().push(text);
        Outcome::Ok
    }
}

/// A duplicate looked up with its first copy's batch (both "not applied") waits behind a slow
/// message of its partition key while 80,000 other messages are handled and recorded — more
/// than the key book ever kept by count (65,536 + 4 × in flight) — and is still skipped: the
/// book keeps a record while a batch looked up before it has a message in the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_waiting_behind_a_slow_key_is_skipped_however_many_pass_meanwhile() {
    let (_dir, bus, topic) = embedded_bus().await;
    let fillers = 80_000u64;
    let plain = |key: &str| Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", key);
    // One batch: the slow message, the first copy (its own key), the duplicate (behind the
    // slow one), then the fillers on many keys.
    let mut batch = vec![
        ampybus::Envelope::new(&topic, plain("co_slow"), b"slow-1".to_vec()),
        ampybus::Envelope::new(&topic, with_dedupe_key("co_a", "dk-9"), b"first".to_vec()),
        ampybus::Envelope::new(
            &topic,
            with_dedupe_key("co_slow", "dk-9"),
            b"second".to_vec(),
        ),
    ];
    bus.publish_batch(std::mem::take(&mut batch)).await.unwrap();
    for i in 0..fillers {
        batch.push(ampybus::Envelope::new(
            &topic,
            plain(&format!("co_f{}", i % 500)),
            format!("fill-{i}").into_bytes(),
        ));
        if batch.len() == 1000 {
            bus.publish_batch(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    let blocker = Arc::new(Blocker {
        fillers,
        done: AtomicU64::new(0),
        release: Notify::new(),
        calls: Mutex::default(),
    });
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.orders.>").unwrap(),
        "longwait",
    )
    .handler_arc(blocker.clone())
    .strict(true)
    .workers(8)
    .serve_replays(false)
    .start()
    .await
    .unwrap();
    let total = fillers + 3;
    let start = Instant::now();
    loop {
        let s = handle.stats();
        if s.handled_ok + s.skipped_duplicates == total && s.in_flight == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "timed out: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        (
            stats.handled_ok,
            stats.skipped_duplicates,
            stats.dead_lettered_total()
        ),
        (fillers + 2, 1, 0),
        "{stats:?}"
    );
    // The first copy was handled; its duplicate never reached the handler.
    assert_eq!(*blocker.calls.lock().unwrap(), ["first", "slow-1"]);
    all_acked(&bus, "ampy.dev.orders.>", "longwait").await;
}

/// The embedded log's dedupe store, except that its first batch lookup waits until
/// `release` is notified.
struct SlowFirstLookup {
    inner: Arc<dyn ampybus::dedupe::DedupeStore>,
    lookups: AtomicU64,
    release: Notify,
}

#[async_trait::async_trait]
impl ampybus::dedupe::DedupeStore for SlowFirstLookup {
    async fn is_applied(&self, consumer: &str, keys: &[String]) -> ampybus::Result<bool> {
        self.inner.is_applied(consumer, keys).await
    }
    async fn record_applied(&self, consumer: &str, keys: &[String]) -> ampybus::Result<()> {
        self.inner.record_applied(consumer, keys).await
    }
    async fn lookup_batch(&self, consumer: &str, keys: &[&str]) -> ampybus::Result<Vec<bool>> {
        if self.lookups.fetch_add(1, Ordering::SeqCst) == 0 {
            self.release.notified().await;
        }
        self.inner.lookup_batch(consumer, keys).await
    }
    async fn commit_batch(
        &self,
        consumer: &str,
        keys: &[&str],
        deliveries: Vec<ampybus::transport::Delivery>,
    ) -> std::result::Result<(), (ampybus::Error, Vec<ampybus::transport::Delivery>)> {
        self.inner.commit_batch(consumer, keys, deliveries).await
    }
}

/// Records the payload of every message it handles.
#[derive(Default)]
struct Calls(Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Handler for Calls {
    async fn handle(&self, msg: &Message) -> Outcome {
        self.0
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&msg.payload).into_owned());
        Outcome::Ok
    }
}

/// Batch lookups run beside each other: while the lookup of one fetched batch is slow, the
/// messages of later batches (other partition keys) are looked up and handled; the slow
/// batch's message waits for its own lookup and is then handled, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lookup_holds_only_its_own_batch() {
    let (_dir, bus, topic) = embedded_bus().await;
    let plain = |key: &str| Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", key);
    let store = Arc::new(SlowFirstLookup {
        inner: bus
            .transport()
            .dedupe_store()
            .expect("the embedded log's store"),
        lookups: AtomicU64::new(0),
        release: Notify::new(),
    });
    let calls = Arc::new(Calls::default());
    bus.publish(&topic, plain("co_1"), b"first".to_vec())
        .await
        .unwrap();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.orders.>").unwrap(),
        "lookups",
    )
    .handler_arc(calls.clone())
    .dedupe(store.clone())
    .workers(4)
    .serve_replays(false)
    .start()
    .await
    .unwrap();
    // The first batch (one message) is fetched and its lookup waits.
    wait_until("the first batch looked up", || {
        store.lookups.load(Ordering::SeqCst) > 0
    })
    .await;
    for i in 2..=4 {
        bus.publish(
            &topic,
            plain(&format!("co_{i}")),
            format!("m{i}").into_bytes(),
        )
        .await
        .unwrap();
    }
    // Later batches go past it (handled and acked; the slow batch's message still waits).
    wait_stats("the later messages handled", &handle, |s| {
        s.handled_ok == 3 && s.in_flight == 1
    })
    .await;
    let mut seen = calls.0.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, ["m2", "m3", "m4"]);
    store.release.notify_one();
    wait_stats("all handled", &handle, |s| {
        s.handled_ok == 4 && s.in_flight == 0
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        (
            stats.handled_ok,
            stats.skipped_duplicates,
            stats.released,
            stats.dead_lettered_total()
        ),
        (4, 0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(
        calls.0.lock().unwrap().last().map(String::as_str),
        Some("first")
    );
    assert_eq!(calls.0.lock().unwrap().len(), 4);
    all_acked(&bus, "ampy.dev.orders.>", "lookups").await;
}
