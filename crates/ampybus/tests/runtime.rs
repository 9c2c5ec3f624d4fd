//! Consumer runtime on the embedded transport: at-least-once, dedupe, per-key order, retries,
//! DLQ reasons, graceful shutdown. Waits poll counters with a generous timeout that turns a
//! hang into a failure; no sleep is used as synchronisation.

use ampybus::codec::sha256_tag;
use ampybus::runtime::{
    Consumer, ConsumerHandle, DlqCode, Outcome, RetryPolicy, handler_fn, handler_sync, typed,
};
use ampybus::transport::{Delivery, StartAt, SubscribeSpec};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HANG: Duration = Duration::from_secs(60);

fn scale() -> f64 {
    std::env::var("AMPYBUS_TEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

async fn bus_at(dir: &std::path::Path) -> Bus {
    Bus::connect(&format!("file://{}?sync=normal", dir.display()))
        .await
        .unwrap()
}

fn pat(s: &str) -> TopicPattern {
    TopicPattern::parse(s).unwrap()
}

fn env_for(topic: &Topic, key: &str, payload: &str) -> Envelope {
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "test@1", "test", key);
    Envelope::new(topic, h, payload.as_bytes().to_vec())
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < HANG, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What a handler of `{key}:{i}` payloads saw, per key in handling order.
type Seqs = Arc<Mutex<HashMap<String, Vec<usize>>>>;

/// Publishes `per_key` messages on each of the keys `key0…`, interleaved, with the payload
/// `key{k}:{i}`, in batches of 1,000.
async fn publish_keyed(bus: &Bus, topic: &Topic, keys: usize, per_key: usize) {
    let mut batch = Vec::with_capacity(1000);
    for i in 0..per_key {
        for k in 0..keys {
            batch.push(env_for(topic, &format!("key{k}"), &format!("key{k}:{i}")));
            if batch.len() == 1000 {
                bus.publish_batch(std::mem::take(&mut batch)).await.unwrap();
            }
        }
    }
    if !batch.is_empty() {
        bus.publish_batch(batch).await.unwrap();
    }
}

/// Notes a handled `key{k}:{i}` payload.
fn note_seq(seqs: &Seqs, payload: &[u8]) {
    let s = std::str::from_utf8(payload).unwrap();
    let (k, i) = s.rsplit_once(':').unwrap();
    seqs.lock()
        .unwrap()
        .entry(k.to_owned())
        .or_default()
        .push(i.parse().unwrap());
}

/// Every one of `keys` keys saw exactly `0..per_key`, in order.
fn assert_each_key_in_order(seqs: &Seqs, keys: usize, per_key: usize) {
    let seqs = seqs.lock().unwrap();
    assert_eq!(seqs.len(), keys);
    let want: Vec<usize> = (0..per_key).collect();
    for (k, v) in seqs.iter() {
        assert_eq!(v, &want, "order of {k}");
    }
}

async fn wait_stats(
    what: &str,
    h: &ConsumerHandle,
    cond: impl Fn(&ampybus::runtime::ConsumerStats) -> bool,
) {
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

/// Another instance of durable consumer `name` on `ampy.dev.news.>` fetches nothing within
/// `wait`: everything was acked.
async fn assert_news_all_acked(bus: &Bus, name: &str, wait: Duration) {
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(pat("ampy.dev.news.>"), name))
        .await
        .unwrap();
    assert!(sub.fetch(10, wait).await.unwrap().is_empty());
}

/// Reads exactly `n` messages of `pattern` from the start (ephemeral), then checks no more come.
async fn read_all(bus: &Bus, pattern: &str, n: usize) -> Vec<Delivery> {
    let mut sub = bus
        .subscribe(SubscribeSpec::ephemeral(pat(pattern), StartAt::Earliest))
        .await
        .unwrap();
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < n {
        assert!(start.elapsed() < HANG, "read {} of {n}", out.len());
        out.extend(
            sub.fetch(n - out.len(), Duration::from_secs(1))
                .await
                .unwrap(),
        );
    }
    let extra = sub.fetch(10, Duration::from_millis(200)).await.unwrap();
    assert!(extra.is_empty(), "more than {n} messages on {pattern}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_each_message_handled_once_and_acked() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    let n = 500;
    let batch: Vec<Envelope> = (0..n)
        .map(|i| env_for(&topic, &format!("k{}", i % 10), &format!("m{i}")))
        .collect();
    bus.publish_batch(batch).await.unwrap();

    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let s2 = seen.clone();
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.news.>"), "alo")
        .handler(handler_fn(move |msg| {
            let seen = s2.clone();
            async move {
                let p = String::from_utf8(msg.payload.to_vec()).unwrap();
                *seen.lock().unwrap().entry(p).or_default() += 1;
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    assert!(!handle.is_strict());
    wait_stats("all handled", &handle, |s| s.handled_ok == n as u64).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, n as u64);
    assert_eq!(stats.skipped_duplicates, 0);
    assert_eq!(stats.released, 0);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.dead_lettered_total(), 0);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), n);
        assert!(seen.values().all(|c| *c == 1));
    }

    // Everything was acked: another instance of the same consumer sees nothing.
    assert_news_all_acked(&bus, "alo", Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_by_message_id_and_by_dedupe_key_within_domain() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let orders = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let fills = Topic::parse("ampy.dev.fills.v1.events").unwrap();

    // The same envelope (same message_id) twice.
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", "co_1");
    let same = bus
        .prepare(&orders, h, bytes::Bytes::from_static(b"dup-id"))
        .await
        .unwrap();
    bus.publish_wire(vec![same.clone(), same.clone()])
        .await
        .unwrap();
    // Two messages with different ids but one dedupe_key in the orders domain …
    for p in ["dk-1", "dk-2"] {
        let h =
            Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", "co_2").with("dedupe_key", "k9");
        bus.publish(&orders, h, p.as_bytes().to_vec())
            .await
            .unwrap();
    }
    // … and under different partition keys (may be in flight at once: still applied once).
    for (p, key) in [("dk-3", "co_3"), ("dk-4", "co_4")] {
        let h =
            Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", key).with("dedupe_key", "k10");
        bus.publish(&orders, h, p.as_bytes().to_vec())
            .await
            .unwrap();
    }
    // … and the same dedupe_key in another domain (not a duplicate).
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", "acct-1|co_9")
        .with("dedupe_key", "k9");
    bus.publish(&fills, h, b"fill-k9".to_vec()).await.unwrap();

    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let start = |calls: Arc<Mutex<Vec<String>>>| {
        Consumer::builder(bus.clone(), pat("ampy.dev.*.v1.>"), "dd").handler(handler_fn(
            move |msg| {
                let calls = calls.clone();
                async move {
                    calls
                        .lock()
                        .unwrap()
                        .push(String::from_utf8(msg.payload.to_vec()).unwrap());
                    Outcome::Ok
                }
            },
        ))
    };
    let handle = start(calls.clone()).start().await.unwrap();
    wait_stats("4 handled + 3 skipped", &handle, |s| {
        s.handled_ok == 4 && s.skipped_duplicates == 3
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!((stats.handled_ok, stats.skipped_duplicates), (4, 3));
    let mut got = calls.lock().unwrap().clone();
    got.sort();
    let k10 = got.iter().filter(|p| *p == "dk-3" || *p == "dk-4").count();
    assert_eq!(k10, 1, "{got:?}");
    got.retain(|p| p != "dk-3" && p != "dk-4");
    assert_eq!(got, vec!["dk-1", "dup-id", "fill-k9"]);

    // The store is durable and shared by instances: a later duplicate is skipped by a new one.
    bus.publish_wire(vec![same.clone()]).await.unwrap();
    let handle = start(calls.clone()).start().await.unwrap();
    wait_stats("skip after restart", &handle, |s| s.skipped_duplicates == 1).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!((stats.handled_ok, stats.skipped_duplicates), (0, 1));
    assert_eq!(calls.lock().unwrap().len(), 4);
    // The records live in the log's own dedupe store (table `applied`, written with the acks).
    let store = bus.transport().dedupe_store().unwrap();
    let id = same.headers.message_id().unwrap().to_owned();
    assert!(
        store
            .is_applied("dd", std::slice::from_ref(&id))
            .await
            .unwrap()
    );
    assert!(!store.is_applied("other", &[id]).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_with_many_workers() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let keys = 100;
    let total = ((20_000.0 * scale()) as usize).max(keys);
    let per_key = total / keys;
    let total = per_key * keys;
    publish_keyed(&bus, &topic, keys, per_key).await;

    let seqs: Seqs = Arc::default();
    let running = Arc::new(AtomicU32::new(0));
    let max_running = Arc::new(AtomicU32::new(0));
    let (s2, r2, m2) = (seqs.clone(), running.clone(), max_running.clone());
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "order")
        .workers(8)
        .handler(handler_fn(move |msg| {
            let (seqs, running, max_running) = (s2.clone(), r2.clone(), m2.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                if rand::random_bool(0.5) {
                    tokio::task::yield_now().await;
                }
                note_seq(&seqs, &msg.payload);
                if rand::random_bool(0.3) {
                    tokio::task::yield_now().await;
                }
                running.fetch_sub(1, Ordering::SeqCst);
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    assert!(handle.is_strict());
    wait_stats("all handled", &handle, |s| s.handled_ok == total as u64).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, total as u64);
    assert_eq!(stats.skipped_duplicates, 0);
    assert_each_key_in_order(&seqs, keys, per_key);
    assert!(
        max_running.load(Ordering::SeqCst) > 1,
        "handlers ran concurrently"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_answers_at_once_but_slowly_keeps_order_and_counts() {
    // A worker takes a run of messages when its handler answers at once; a run slower than its
    // budget hands the rest back to their keys' queues. Every message once, each key in order.
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.orders.v1.slow").unwrap();
    let (keys, per_key) = (16, 8);
    publish_keyed(&bus, &topic, keys, per_key).await;
    let seqs: Seqs = Arc::default();
    let s2 = seqs.clone();
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "slow")
        .workers(4)
        .handler(handler_sync(move |msg| {
            // Slower than a run's budget: blocking work done in the handler itself.
            std::thread::sleep(Duration::from_millis(3));
            note_seq(&s2, &msg.payload);
            Outcome::Ok
        }))
        .start()
        .await
        .unwrap();
    wait_stats("all handled", &handle, |s| {
        s.handled_ok == (keys * per_key) as u64 && s.in_flight == 0
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, (keys * per_key) as u64, "{stats:?}");
    assert_eq!((stats.retried, stats.released), (0, 0), "{stats:?}");
    assert_each_key_in_order(&seqs, keys, per_key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_waits_hands_the_rest_of_its_run_to_other_workers() {
    // An async handler whose futures finish in their first poll gets runs of messages, as a
    // handler that answers at once does. When one message of a run has to wait, the rest of
    // the run goes back to their keys' queues for the other worker instead of waiting behind
    // it: here the waiting message is let go only after all the others were handled.
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.orders.v1.runs").unwrap();
    let others = Arc::new(AtomicU64::new(0));
    let (open, gate) = tokio::sync::watch::channel(false);
    let (o2, order) = (others.clone(), Arc::new(Mutex::new(Vec::<String>::new())));
    let order2 = order.clone();
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "runs")
        .workers(2)
        .handler(handler_fn(move |msg| {
            let (others, order) = (o2.clone(), order2.clone());
            let mut gate = gate.clone();
            async move {
                let p = String::from_utf8(msg.payload.to_vec()).unwrap();
                if p == "block" {
                    gate.wait_for(|open| *open).await.unwrap();
                } else {
                    others.fetch_add(1, Ordering::SeqCst);
                }
                order.lock().unwrap().push(p);
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    // One message first: its future finishes in its first poll, so workers take runs.
    bus.publish_batch(vec![env_for(&topic, "warm", "warm")])
        .await
        .unwrap();
    wait_for("the first message", || others.load(Ordering::SeqCst) == 1).await;
    // One batch, one ready key each: the waiting message heads a worker's run.
    let mut batch = vec![env_for(&topic, "held", "block")];
    batch.extend((0..20).map(|i| env_for(&topic, &format!("k{i}"), &format!("k{i}"))));
    bus.publish_batch(batch).await.unwrap();
    wait_for("the messages queued behind the waiting one", || {
        others.load(Ordering::SeqCst) == 21
    })
    .await;
    open.send(true).unwrap();
    wait_stats("all handled", &handle, |s| {
        s.handled_ok == 22 && s.in_flight == 0
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, 22, "{stats:?}");
    assert_eq!((stats.retried, stats.released), (0, 0), "{stats:?}");
    let order = order.lock().unwrap().clone();
    assert_eq!(order.len(), 22);
    assert_eq!(order.last().map(String::as_str), Some("block"), "{order:?}");
    let mut rest: Vec<&str> = order[1..21].iter().map(String::as_str).collect();
    rest.sort_unstable();
    let mut want: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    want.sort_unstable();
    assert_eq!(rest, want.iter().map(String::as_str).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_waits_frees_the_keys_its_run_finished_first() {
    // A worker's run handles `first` (key a), then `wait` (key w), whose handler waits until
    // `after` — queued behind `first` on key a — is handled. Before the worker waits, it must
    // free key a: otherwise `after` can never run and the two wait for each other. Five
    // rounds, each with keys of its own.
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.orders.v1.freed").unwrap();
    let (seen_tx, seen) = tokio::sync::watch::channel(Vec::<String>::new());
    let seen_tx = Arc::new(seen_tx);
    let log = seen.clone();
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "freed")
        .workers(2)
        .handler(handler_fn(move |msg| {
            let (seen_tx, mut seen) = (seen_tx.clone(), seen.clone());
            async move {
                let p = String::from_utf8(msg.payload.to_vec()).unwrap();
                if let Some(round) = p.strip_prefix("wait-") {
                    let after = format!("after-{round}");
                    seen.wait_for(|v| v.contains(&after)).await.unwrap();
                }
                seen_tx.send_modify(|v| v.push(p));
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    // One message first: its future finishes in its first poll, so workers take runs.
    bus.publish_batch(vec![env_for(&topic, "warm", "warm")])
        .await
        .unwrap();
    wait_stats("the first message", &handle, |s| s.handled_ok == 1).await;
    for r in 0..5 {
        let (a, w) = (format!("a{r}"), format!("w{r}"));
        bus.publish_batch(vec![
            env_for(&topic, &a, &format!("first-{r}")),
            env_for(&topic, &w, &format!("wait-{r}")),
            env_for(&topic, &a, &format!("after-{r}")),
        ])
        .await
        .unwrap();
        let want = 1 + 3 * (r + 1);
        wait_stats("the round handled", &handle, |s| s.handled_ok == want).await;
    }
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, 16, "{stats:?}");
    assert_eq!((stats.retried, stats.released), (0, 0), "{stats:?}");
    let order = log.borrow().clone();
    assert_eq!(order.len(), 16, "{order:?}");
    for r in 0..5 {
        let at = |p: &str| order.iter().position(|x| *x == format!("{p}-{r}")).unwrap();
        assert!(at("first") < at("after"), "key order: {order:?}");
        assert!(at("after") < at("wait"), "{order:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_handled_shows_in_the_stats_while_a_later_one_of_its_run_waits() {
    // One worker takes `first` and `wait` (keys of their own) as one run; `wait`'s handler
    // waits until the stats count `first`. A worker tallies its run's counts and writes them
    // when the run ends: it must write them before a message of the run waits, or the two
    // wait for each other. Five rounds, each after a message that makes the worker take
    // runs again.
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.orders.v1.tally").unwrap();
    let (go_tx, go) = tokio::sync::watch::channel(0usize);
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "tally")
        .workers(1)
        .handler(handler_fn(move |msg| {
            let mut go = go.clone();
            async move {
                let p = String::from_utf8(msg.payload.to_vec()).unwrap();
                if let Some(round) = p.strip_prefix("wait-") {
                    let round: usize = round.parse().unwrap();
                    go.wait_for(|r| *r > round).await.unwrap();
                }
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    for r in 0..5u64 {
        // A message whose future finishes in its first poll: the worker takes runs again (a
        // handler that waited made it take one message at a time).
        bus.publish_batch(vec![env_for(&topic, "warm", &format!("warm-{r}"))])
            .await
            .unwrap();
        wait_stats("warm counted", &handle, |s| s.handled_ok == 1 + 3 * r).await;
        bus.publish_batch(vec![
            env_for(&topic, &format!("f{r}"), &format!("first-{r}")),
            env_for(&topic, &format!("w{r}"), &format!("wait-{r}")),
        ])
        .await
        .unwrap();
        wait_stats("first counted", &handle, |s| s.handled_ok == 2 + 3 * r).await;
        go_tx.send_replace(r as usize + 1);
        wait_stats("wait counted", &handle, |s| s.handled_ok == 3 + 3 * r).await;
    }
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, 15, "{stats:?}");
    assert_eq!((stats.retried, stats.released), (0, 0), "{stats:?}");
}

/// A handler that answers at once (`handler_sync`, no future) gets the runtime's guarantees:
/// per-key order over 8 workers, a retry that then succeeds, a dead letter with its reason,
/// a panic caught and dead-lettered, exact counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_handlers_keep_order_retries_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.orders.v1.sync").unwrap();
    let keys = 20;
    let per_key = 50;
    publish_keyed(&bus, &topic, keys, per_key).await;
    // Three special messages on keys of their own.
    let batch = vec![
        env_for(&topic, "r", "retry-once"),
        env_for(&topic, "d", "dead"),
        env_for(&topic, "p", "panic"),
    ];
    bus.publish_batch(batch).await.unwrap();
    let total = keys * per_key + 3;

    let seqs: Seqs = Arc::default();
    let retried = Arc::new(AtomicU32::new(0));
    let (s2, r2) = (seqs.clone(), retried.clone());
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "sync")
        .workers(8)
        .retry(RetryPolicy {
            max_attempts: 3,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        })
        .handler(handler_sync(move |msg| {
            let s = std::str::from_utf8(&msg.payload).unwrap();
            match s {
                "retry-once" if r2.fetch_add(1, Ordering::SeqCst) == 0 => {
                    Outcome::Retry { after: None }
                }
                "retry-once" => Outcome::Ok,
                "dead" => Outcome::DeadLetter("bad fill".into()),
                "panic" => panic!("sync boom"),
                _ => {
                    note_seq(&s2, &msg.payload);
                    Outcome::Ok
                }
            }
        }))
        .start()
        .await
        .unwrap();
    wait_stats("all settled", &handle, |s| {
        s.handled_ok + s.dead_lettered_total() == total as u64
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, (keys * per_key + 1) as u64, "{stats:?}");
    assert_eq!(stats.retried, 1, "{stats:?}");
    assert_eq!(stats.dlq(DlqCode::HandlerError), 1, "{stats:?}");
    assert_eq!(stats.dlq(DlqCode::HandlerPanic), 1, "{stats:?}");
    assert_eq!(retried.load(Ordering::SeqCst), 2);
    assert_each_key_in_order(&seqs, keys, per_key);
    let dlq = read_all(&bus, "ampy.dev.dlq.>", 2).await;
    let mut reasons: Vec<String> = dlq
        .iter()
        .map(|d| d.envelope.headers.get("dlq_reason").unwrap().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["handler_error: bad fill", "handler_panic: sync boom"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_backoff_parks_only_its_key_in_strict_mode() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    bus.publish_batch(vec![
        env_for(&topic, "slow", "slow:0"),
        env_for(&topic, "slow", "slow:1"),
    ])
    .await
    .unwrap();
    let fast: Vec<Envelope> = (0..20)
        .map(|i| env_for(&topic, "fast", &format!("fast:{i}")))
        .collect();
    bus.publish_batch(fast).await.unwrap();

    #[derive(Default)]
    struct Log {
        slow0_attempts: Vec<Instant>,
        done: Vec<(String, Instant)>,
    }
    let log: Arc<Mutex<Log>> = Arc::default();
    let l2 = log.clone();
    let policy = RetryPolicy {
        max_attempts: 5,
        min_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
    };
    // One worker: the slow key's waits must not hold it.
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "retry")
        .workers(1)
        .retry(policy)
        .handler(handler_fn(move |msg| {
            let log = l2.clone();
            async move {
                let p = String::from_utf8(msg.payload.to_vec()).unwrap();
                let mut log = log.lock().unwrap();
                if p == "slow:0" {
                    log.slow0_attempts.push(Instant::now());
                    match log.slow0_attempts.len() {
                        1 => {
                            return Outcome::Retry {
                                after: Some(Duration::from_millis(800)),
                            };
                        }
                        2 => return Outcome::Retry { after: None },
                        _ => {}
                    }
                }
                log.done.push((p, Instant::now()));
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    wait_stats("22 handled", &handle, |s| s.handled_ok == 22).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, 22);
    assert_eq!(stats.retried, 2);
    assert_eq!(stats.dead_lettered_total(), 0);
    let log = log.lock().unwrap();
    let a = &log.slow0_attempts;
    assert_eq!(a.len(), 3);
    let gap1 = a[1] - a[0];
    let gap2 = a[2] - a[1];
    assert!(
        gap1 >= Duration::from_millis(800),
        "explicit delay honoured: {gap1:?}"
    );
    assert!(
        gap1 <= Duration::from_millis(800) + Duration::from_secs(3),
        "{gap1:?}"
    );
    // Full jitter after attempt 2: within [0, 200 ms], plus generous scheduling slack.
    assert!(
        gap2 <= Duration::from_millis(200) + Duration::from_secs(3),
        "{gap2:?}"
    );
    let when = |p: &str| log.done.iter().find(|(x, _)| x == p).unwrap().1;
    let slow0_ok = when("slow:0");
    // The other key flowed while the slow key waited (with a single worker).
    for i in 0..20 {
        assert!(
            when(&format!("fast:{i}")) < a[1],
            "fast:{i} finished during the backoff"
        );
    }
    // Strict: the slow key's later message waited for the retried one.
    assert!(when("slow:1") > slow0_ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_strict_lets_later_messages_of_the_key_pass() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    bus.publish_batch(vec![env_for(&topic, "k", "a"), env_for(&topic, "k", "b")])
        .await
        .unwrap();
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let tries = Arc::new(AtomicU32::new(0));
    let (o2, t2) = (order.clone(), tries.clone());
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.news.>"), "ns")
        .strict(false)
        .handler(handler_fn(move |msg| {
            let (order, tries) = (o2.clone(), t2.clone());
            async move {
                if &msg.payload[..] == b"a" && tries.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Outcome::Retry {
                        after: Some(Duration::from_millis(300)),
                    };
                }
                order
                    .lock()
                    .unwrap()
                    .push(String::from_utf8(msg.payload.to_vec()).unwrap());
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    assert!(!handle.is_strict());
    wait_stats("2 handled", &handle, |s| s.handled_ok == 2).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.retried, 1);
    assert_eq!(*order.lock().unwrap(), vec!["b", "a"]);
}

/// With the default order, a pattern spanning domains keeps orders and fills strict and lets
/// other domains step aside: a retried order holds back its key's next order, a retried news
/// item does not hold back its key's next news item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_order_is_strict_by_the_message_domain_not_the_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let orders = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let news = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    bus.publish_batch(vec![
        env_for(&orders, "k", "o0"),
        env_for(&orders, "k", "o1"),
        env_for(&news, "k", "n0"),
        env_for(&news, "k", "n1"),
    ])
    .await
    .unwrap();
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let tried: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (o2, t2) = (order.clone(), tried.clone());
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.>"), "mixed")
        .handler(handler_fn(move |msg| {
            let (order, tried) = (o2.clone(), t2.clone());
            async move {
                let p = String::from_utf8(msg.payload.to_vec()).unwrap();
                if p.ends_with('0') && tried.lock().unwrap().insert(p.clone()) {
                    return Outcome::Retry {
                        after: Some(Duration::from_millis(300)),
                    };
                }
                order.lock().unwrap().push(p);
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    assert!(handle.is_strict(), "the pattern can match orders");
    wait_stats("4 handled", &handle, |s| s.handled_ok == 4).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.retried, 2);
    let order = order.lock().unwrap().clone();
    let at = |p: &str| order.iter().position(|x| x == p).unwrap();
    assert!(at("o0") < at("o1"), "orders stay in key order: {order:?}");
    assert!(at("n1") < at("n0"), "news steps aside: {order:?}");
}

#[derive(Clone, PartialEq, prost::Message)]
struct Ping {
    #[prost(string, tag = "1")]
    id: String,
}
impl prost::Name for Ping {
    const NAME: &'static str = "Ping";
    const PACKAGE: &'static str = "demo.v1";
}

fn check_dlq(d: &Delivery, original: &Envelope, code: DlqCode, consumer: &str, retry_count: u32) {
    let h = &d.envelope.headers;
    assert_eq!(d.envelope.topic, "ampy.dev.dlq.v1.news");
    let reason = h.get("dlq_reason").unwrap();
    assert_eq!(DlqCode::from_reason(reason), code, "{reason}");
    assert!(
        reason.starts_with(&format!("{}: ", code.as_str())),
        "{reason}"
    );
    assert_eq!(h.get("original_topic"), Some(original.topic.as_str()));
    assert_eq!(
        h.get("retry_count"),
        Some(retry_count.to_string().as_str()),
        "{reason}"
    );
    assert!(ampybus::ids::is_canonical_time(h.get("dlq_at").unwrap()));
    assert_eq!(h.get("dlq_consumer"), Some(consumer));
    assert_eq!(
        h.get("payload_hash").unwrap(),
        sha256_tag(&original.payload)
    );
    assert_eq!(
        d.envelope.payload, original.payload,
        "original bytes as carried"
    );
    assert_eq!(h.get("original_message_id"), original.headers.message_id());
    assert_ne!(h.message_id(), original.headers.message_id());
    assert_eq!(h.partition_key(), original.headers.partition_key());
    d.envelope.validate_for_publish().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_reason_headers_and_original_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let raw = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    let typed_topic = Topic::parse("ampy.dev.news.v1.typed").unwrap();

    let mut originals: HashMap<&str, Envelope> = HashMap::new();
    for (name, payload) in [
        ("poison", "poison"),
        ("retry", "retry"),
        ("panic", "panic"),
        ("ok1", "ok1"),
        ("ok2", "ok2"),
    ] {
        let env = bus
            .prepare(
                &raw,
                Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", name),
                payload.as_bytes().to_vec().into(),
            )
            .await
            .unwrap();
        bus.publish_wire(vec![env.clone()]).await.unwrap();
        originals.insert(name, env);
    }
    // Bad gzip: valid headers, content_encoding=gzip, bytes that do not inflate.
    let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", "gz");
    h.set("content_encoding", "gzip");
    let gz = Envelope::new(&raw, h, b"definitely not gzip".to_vec());
    bus.publish_wire(vec![gz.clone()]).await.unwrap();
    originals.insert("gz", gz);
    // Malformed headers, written straight to the transport (bypassing publish validation).
    let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", "bad");
    h.set("produced_at", "yesterday");
    let bad = Envelope::new(&raw, h, b"malformed".to_vec());
    bus.transport()
        .publish_batch(vec![bad.clone()])
        .await
        .unwrap();
    originals.insert("bad", bad);
    // Typed: wrong schema, right schema with a payload that does not decode, a good one.
    let mk = |fqdn: &str, key: &str, payload: Vec<u8>| {
        Envelope::new(
            &typed_topic,
            Headers::for_publish(fqdn, "t@1", "t", key),
            payload,
        )
    };
    let wrong = mk("demo.v1.Pong", "t1", b"x".to_vec());
    let undecodable = mk("demo.v1.Ping", "t2", vec![0x0a, 0xff, 0xff]);
    let good = mk(
        "demo.v1.Ping",
        "t3",
        prost::Message::encode_to_vec(&Ping { id: "p1".into() }),
    );
    bus.publish_wire(vec![wrong.clone(), undecodable.clone(), good])
        .await
        .unwrap();

    let ok_calls = Arc::new(AtomicU64::new(0));
    let retry_calls = Arc::new(AtomicU64::new(0));
    let (oc, rc) = (ok_calls.clone(), retry_calls.clone());
    let raw_consumer = Consumer::builder(bus.clone(), pat("ampy.dev.news.v1.raw"), "dlq-raw")
        .retry(RetryPolicy {
            max_attempts: 3,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        })
        .handler(handler_fn(move |msg| {
            let (oc, rc) = (oc.clone(), rc.clone());
            async move {
                match &msg.payload[..] {
                    b"poison" => Outcome::DeadLetter("cannot apply".into()),
                    b"retry" => {
                        rc.fetch_add(1, Ordering::SeqCst);
                        Outcome::Retry { after: None }
                    }
                    b"panic" => panic!("boom"),
                    _ => {
                        oc.fetch_add(1, Ordering::SeqCst);
                        Outcome::Ok
                    }
                }
            }
        }))
        .start()
        .await
        .unwrap();
    let pings: Arc<Mutex<Vec<String>>> = Arc::default();
    let p2 = pings.clone();
    let typed_consumer = Consumer::builder(bus.clone(), pat("ampy.dev.news.v1.typed"), "dlq-typed")
        .handler(typed(move |ping: Ping, _msg| {
            let pings = p2.clone();
            async move {
                pings.lock().unwrap().push(ping.id);
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();

    wait_stats("raw consumer settled", &raw_consumer, |s| {
        s.handled_ok == 2 && s.dead_lettered_total() == 5
    })
    .await;
    wait_stats("typed consumer settled", &typed_consumer, |s| {
        s.handled_ok == 1 && s.dead_lettered_total() == 2
    })
    .await;
    // The consumer survived the panic: a message published now is still handled.
    bus.publish(
        &raw,
        Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", "late"),
        b"late".to_vec(),
    )
    .await
    .unwrap();
    wait_stats("late message", &raw_consumer, |s| s.handled_ok == 3).await;

    let rs = raw_consumer.shutdown(Duration::from_secs(10)).await;
    let ts = typed_consumer.shutdown(Duration::from_secs(10)).await;
    for code in [
        DlqCode::HandlerError,
        DlqCode::MaxRetries,
        DlqCode::HandlerPanic,
        DlqCode::DecodeError,
        DlqCode::ContractViolation,
    ] {
        assert_eq!(rs.dlq(code), 1, "{code}: {rs:?}");
    }
    assert_eq!(rs.dead_lettered_total(), 5);
    assert_eq!(rs.handled_ok, 3);
    assert_eq!(rs.retried, 2);
    assert_eq!(retry_calls.load(Ordering::SeqCst), 3);
    assert_eq!(ok_calls.load(Ordering::SeqCst), 3);
    assert_eq!(ts.dlq(DlqCode::SchemaMismatch), 1);
    assert_eq!(ts.dlq(DlqCode::DecodeError), 1);
    assert_eq!(ts.handled_ok, 1);
    assert_eq!(*pings.lock().unwrap(), vec!["p1"]);

    let dlq = read_all(&bus, "ampy.dev.dlq.v1.news", 7).await;
    let by_key: HashMap<String, &Delivery> = dlq
        .iter()
        .map(|d| (d.envelope.headers.partition_key().unwrap().to_owned(), d))
        .collect();
    assert_eq!(by_key.len(), 7);
    check_dlq(
        by_key["poison"],
        &originals["poison"],
        DlqCode::HandlerError,
        "dlq-raw",
        1,
    );
    assert_eq!(
        by_key["poison"].envelope.headers.get("dlq_reason"),
        Some("handler_error: cannot apply")
    );
    check_dlq(
        by_key["retry"],
        &originals["retry"],
        DlqCode::MaxRetries,
        "dlq-raw",
        3,
    );
    check_dlq(
        by_key["panic"],
        &originals["panic"],
        DlqCode::HandlerPanic,
        "dlq-raw",
        1,
    );
    assert_eq!(
        by_key["panic"].envelope.headers.get("dlq_reason"),
        Some("handler_panic: boom")
    );
    check_dlq(
        by_key["gz"],
        &originals["gz"],
        DlqCode::DecodeError,
        "dlq-raw",
        1,
    );
    assert_eq!(
        by_key["gz"].envelope.headers.content_encoding(),
        Some("gzip")
    );
    let bad = by_key["bad"];
    check_dlq(
        bad,
        &originals["bad"],
        DlqCode::ContractViolation,
        "dlq-raw",
        1,
    );
    assert!(
        bad.envelope
            .headers
            .get("dlq_reason")
            .unwrap()
            .contains("produced_at")
    );
    assert_eq!(
        bad.envelope.headers.get("original_produced_at"),
        Some("yesterday")
    );
    check_dlq(
        by_key["t1"],
        &wrong,
        DlqCode::SchemaMismatch,
        "dlq-typed",
        1,
    );
    assert_eq!(
        by_key["t1"].envelope.headers.get("dlq_reason"),
        Some("schema_mismatch: expected demo.v1.Ping got demo.v1.Pong")
    );
    check_dlq(
        by_key["t2"],
        &undecodable,
        DlqCode::DecodeError,
        "dlq-typed",
        1,
    );

    // Every original was acked (DLQ write first): nothing comes again.
    for (p, name) in [
        ("ampy.dev.news.v1.raw", "dlq-raw"),
        ("ampy.dev.news.v1.typed", "dlq-typed"),
    ] {
        let mut sub = bus
            .subscribe(SubscribeSpec::durable(pat(p), name))
            .await
            .unwrap();
        assert!(
            sub.fetch(10, Duration::from_millis(300))
                .await
                .unwrap()
                .is_empty()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_releases_unfinished_messages() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.news.v1.sd").unwrap();
    let n = 10;
    let batch: Vec<Envelope> = (0..n)
        .map(|i| env_for(&topic, &format!("k{i}"), &format!("m{i}")))
        .collect();
    bus.publish_batch(batch).await.unwrap();

    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(AtomicU32::new(0));
    let finished: Arc<Mutex<Vec<String>>> = Arc::default();
    let make = |gate: Arc<tokio::sync::Semaphore>,
                started: Arc<AtomicU32>,
                finished: Arc<Mutex<Vec<String>>>| {
        handler_fn(move |msg| {
            let (gate, started, finished) = (gate.clone(), started.clone(), finished.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                gate.acquire().await.unwrap().forget();
                finished
                    .lock()
                    .unwrap()
                    .push(String::from_utf8(msg.payload.to_vec()).unwrap());
                Outcome::Ok
            }
        })
    };
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.news.>"), "sd")
        .workers(4)
        .ack_deadline(Duration::from_secs(5))
        .handler(make(gate.clone(), started.clone(), finished.clone()))
        .start()
        .await
        .unwrap();
    wait_for("4 handlers in flight", || {
        started.load(Ordering::SeqCst) == 4
    })
    .await;
    wait_stats("all fetched", &handle, |s| s.in_flight == n).await;
    // Let exactly two handlers finish; the rest hang past the deadline.
    gate.add_permits(2);
    let stats = handle.shutdown(Duration::from_millis(500)).await;
    let first: HashSet<String> = finished.lock().unwrap().iter().cloned().collect();
    assert_eq!(first.len(), 2);
    assert_eq!(stats.handled_ok, 2);
    assert_eq!(stats.released, n - 2);
    assert_eq!(stats.in_flight, 0);

    // A new instance gets exactly the unfinished ones, at once (released, not left to expire).
    let finished2: Arc<Mutex<Vec<String>>> = Arc::default();
    let open = Arc::new(tokio::sync::Semaphore::new(1000));
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.news.>"), "sd")
        .handler(make(open, Arc::new(AtomicU32::new(0)), finished2.clone()))
        .start()
        .await
        .unwrap();
    wait_stats("rest handled", &handle, |s| s.handled_ok == n - 2).await;
    let stats2 = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats2.handled_ok, n - 2);
    assert_eq!(stats2.skipped_duplicates, 0);
    let second: HashSet<String> = finished2.lock().unwrap().iter().cloned().collect();
    assert_eq!(second.len(), (n - 2) as usize);
    assert!(first.is_disjoint(&second));
    let all: HashSet<String> = first.union(&second).cloned().collect();
    assert_eq!(all.len(), n as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_queued_messages_are_extended_behind_a_slow_handler() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let n = 4;
    let batch: Vec<Envelope> = (0..n)
        .map(|i| env_for(&topic, "co_slow", &format!("m{i}")))
        .collect();
    bus.publish_batch(batch).await.unwrap();
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let s2 = seen.clone();
    // Each handler outlives the ack deadline; the messages queued behind it wait ~n× as long.
    // The deadline is 1 s (refreshed every ~333 ms), so a busy CI machine needs a refresh to
    // be late by over 600 ms before a lease could lapse.
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "slow")
        .workers(1)
        .ack_deadline(Duration::from_secs(1))
        .handler(handler_fn(move |msg| {
            let seen = s2.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1300)).await;
                seen.lock().unwrap().push((
                    String::from_utf8(msg.payload.to_vec()).unwrap(),
                    msg.info.delivery_count,
                ));
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    wait_stats("all handled", &handle, |s| s.handled_ok == n as u64).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, n as u64);
    assert_eq!(stats.skipped_duplicates, 0, "nothing was delivered twice");
    let seen = seen.lock().unwrap().clone();
    let want: Vec<(String, u32)> = (0..n).map(|i| (format!("m{i}"), 1)).collect();
    assert_eq!(seen, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_failures_and_unparseable_topics() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let raw = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    // A codec that sends every payload over 8 bytes to the blob store.
    let blob_bus = bus.clone().with_codec(ampybus::codec::PayloadCodec {
        compress_threshold: usize::MAX,
        max_inline: 8,
        blobs: bus.codec().blobs.clone(),
        ..Default::default()
    });
    let blob_path = |env: &Envelope| {
        std::path::PathBuf::from(
            env.headers
                .blob_ref()
                .unwrap()
                .strip_prefix("file://")
                .unwrap(),
        )
    };
    let h = |key: &str| Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", key);
    let tampered = blob_bus
        .prepare(
            &raw,
            h("tamper"),
            bytes::Bytes::from_static(b"tampered-blob-xx"),
        )
        .await
        .unwrap();
    let missing = blob_bus
        .prepare(
            &raw,
            h("missing"),
            bytes::Bytes::from_static(b"missing-blob-yy"),
        )
        .await
        .unwrap();
    assert!(tampered.payload.is_empty() && missing.payload.is_empty());
    std::fs::write(blob_path(&tampered), b"TAMPERED-BLOB-XX").unwrap();
    let missing_bytes = std::fs::read(blob_path(&missing)).unwrap();
    std::fs::remove_file(blob_path(&missing)).unwrap();
    bus.publish_wire(vec![tampered.clone(), missing.clone()])
        .await
        .unwrap();
    // A topic that does not parse (whitespace in a token), straight to the transport.
    let bad_topic = Envelope {
        topic: "ampy.dev.news.v1.bad topic".into(),
        headers: h("badtopic"),
        payload: bytes::Bytes::from_static(b"bt"),
    };
    bus.transport()
        .publish_batch(vec![bad_topic.clone()])
        .await
        .unwrap();

    let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let g2 = got.clone();
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.news.>"), "blobs")
        .retry(RetryPolicy {
            max_attempts: 10_000,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
        })
        .handler(handler_fn(move |msg| {
            let got = g2.clone();
            async move {
                got.lock().unwrap().push(msg.payload.to_vec());
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    // An unavailable blob is retried (it may be transient) …
    wait_stats("blob retries and 2 DLQ", &handle, |s| {
        s.retried >= 2 && s.dead_lettered_total() == 2
    })
    .await;
    assert_eq!(handle.stats().handled_ok, 0);
    // … and handled once it is back.
    // Put back whole (written aside, then renamed): a retry must never read half a blob.
    let back = blob_path(&missing).with_extension("part");
    std::fs::write(&back, &missing_bytes).unwrap();
    std::fs::rename(&back, blob_path(&missing)).unwrap();
    wait_stats("blob back", &handle, |s| s.handled_ok == 1).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.dlq(DlqCode::BlobHashMismatch), 1);
    assert_eq!(stats.dlq(DlqCode::ContractViolation), 1);
    assert_eq!(stats.dead_lettered_total(), 2);
    assert_eq!(*got.lock().unwrap(), vec![b"missing-blob-yy".to_vec()]);

    let dlq = read_all(&bus, "ampy.dev.dlq.v1.news", 2).await;
    let by_key: HashMap<String, &Delivery> = dlq
        .iter()
        .map(|d| (d.envelope.headers.partition_key().unwrap().to_owned(), d))
        .collect();
    check_dlq(
        by_key["tamper"],
        &tampered,
        DlqCode::BlobHashMismatch,
        "blobs",
        1,
    );
    assert_eq!(
        by_key["tamper"].envelope.headers.blob_ref(),
        tampered.headers.blob_ref()
    );
    let bt = &by_key["badtopic"].envelope;
    assert_eq!(
        DlqCode::from_reason(bt.headers.get("dlq_reason").unwrap()),
        DlqCode::ContractViolation
    );
    assert_eq!(bt.headers.get("original_topic"), None);
    assert_eq!(
        bt.headers.get("original_topic_raw"),
        Some("ampy.dev.news.v1.bad topic")
    );
    assert_eq!(bt.payload, bad_topic.payload);
    assert_eq!(bt.headers.get("payload_hash").unwrap(), sha256_tag(b"bt"));
}

/// Delegates to a real transport but fails publishes to DLQ topics while `fail` is set.
struct FlakyDlq {
    inner: Arc<dyn ampybus::transport::Transport>,
    fail: std::sync::atomic::AtomicBool,
    failures: AtomicU32,
}

#[async_trait::async_trait]
impl ampybus::transport::Transport for FlakyDlq {
    fn name(&self) -> &'static str {
        "flaky"
    }
    async fn publish_batch(
        &self,
        batch: Vec<Envelope>,
    ) -> ampybus::Result<Vec<ampybus::transport::PublishReceipt>> {
        if self.fail.load(Ordering::SeqCst) && batch.iter().any(|e| e.topic.contains(".dlq.")) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(ampybus::Error::new(
                ampybus::ErrorKind::Transport,
                "injected DLQ failure",
            ));
        }
        self.inner.publish_batch(batch).await
    }
    async fn subscribe(
        &self,
        spec: SubscribeSpec,
    ) -> ampybus::Result<Box<dyn ampybus::transport::Subscription>> {
        self.inner.subscribe(spec).await
    }
    async fn close(&self) -> ampybus::Result<()> {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dlq_write_is_retried_and_the_original_is_not_acked_before() {
    let dir = tempfile::tempdir().unwrap();
    let real = bus_at(dir.path()).await;
    let flaky = Arc::new(FlakyDlq {
        inner: real.transport().clone(),
        fail: true.into(),
        failures: AtomicU32::new(0),
    });
    let bus = Bus::with_transport(flaky.clone(), "flaky://");
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    real.publish(
        &topic,
        Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", "p"),
        b"poison".to_vec(),
    )
    .await
    .unwrap();
    let poison = || handler_fn(|_msg| async { Outcome::DeadLetter("poison".into()) });
    let retry = RetryPolicy {
        max_attempts: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    };
    // 1. The DLQ keeps failing: nothing is acked; shutdown hands the message back.
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.news.>"), "flaky")
        .retry(retry)
        .handler(poison())
        .start()
        .await
        .unwrap();
    wait_for("DLQ write failures", || {
        flaky.failures.load(Ordering::SeqCst) >= 3
    })
    .await;
    let stats = handle.shutdown(Duration::from_millis(200)).await;
    assert_eq!(stats.dead_lettered_total(), 0);
    assert_eq!(stats.released, 1);
    // 2. A new instance gets it again; the DLQ recovers after a few more failures.
    let before = flaky.failures.load(Ordering::SeqCst);
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.news.>"), "flaky")
        .retry(retry)
        .handler(poison())
        .start()
        .await
        .unwrap();
    wait_for("more failures", || {
        flaky.failures.load(Ordering::SeqCst) >= before + 2
    })
    .await;
    flaky.fail.store(false, Ordering::SeqCst);
    wait_stats("dead-lettered", &handle, |s| s.dead_lettered_total() == 1).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.dlq(DlqCode::HandlerError), 1);
    let dlq = read_all(&real, "ampy.dev.dlq.v1.news", 1).await;
    assert_eq!(&dlq[0].envelope.payload[..], b"poison");
    assert_eq!(dlq[0].envelope.headers.get("retry_count"), Some("2"));
    // Acked after the DLQ write: nothing comes again.
    assert_news_all_acked(&real, "flaky", Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_store_is_shared_by_handles_on_one_file_and_windowed() {
    use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.sqlite3");
    let a = SqliteDedupeStore::open(&path).unwrap();
    let b = SqliteDedupeStore::open(&path).unwrap();
    let keys = vec!["m1".to_owned(), "orders:k1".to_owned()];
    assert!(!b.is_applied("c", &keys).await.unwrap());
    a.record_applied("c", &keys).await.unwrap();
    assert!(b.is_applied("c", &keys[1..]).await.unwrap());
    assert!(!b.is_applied("other", &keys).await.unwrap());
    // A zero window: nothing counts any more, and a purge removes the rows.
    let zero = SqliteDedupeStore::open(&path)
        .unwrap()
        .with_window(Duration::ZERO);
    let start = Instant::now();
    while zero.is_applied("c", &keys).await.unwrap() {
        assert!(start.elapsed() < HANG);
        tokio::task::yield_now().await;
    }
    assert_eq!(zero.purge().await.unwrap(), 2);
    assert!(!a.is_applied("c", &keys).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_holds_under_random_retries() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let (keys, per_key) = (20, 50);
    publish_keyed(&bus, &topic, keys, per_key).await;
    let seqs: Seqs = Arc::default();
    let s2 = seqs.clone();
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "flappy")
        .retry(RetryPolicy {
            max_attempts: 1000,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        })
        .handler(handler_fn(move |msg| {
            let seqs = s2.clone();
            async move {
                if rand::random_bool(0.2) {
                    return Outcome::Retry { after: None };
                }
                note_seq(&seqs, &msg.payload);
                Outcome::Ok
            }
        }))
        .start()
        .await
        .unwrap();
    let total = (keys * per_key) as u64;
    wait_stats("all handled", &handle, |s| s.handled_ok == total).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, total);
    assert!(stats.retried > 0);
    assert_eq!(stats.dead_lettered_total(), 0);
    assert_each_key_in_order(&seqs, keys, per_key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettering_a_redriven_message_keeps_its_retry_history() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    // A message that already lived twice (as a redrive would send it).
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", "k").with("retry_count", "2");
    bus.publish(&topic, h, b"poison".to_vec()).await.unwrap();
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.news.>"), "history")
        .handler(handler_fn(|_msg: ampybus::runtime::Message| async {
            Outcome::DeadLetter("still bad".into())
        }))
        .start()
        .await
        .unwrap();
    wait_stats("dead-lettered", &handle, |s| s.dead_lettered_total() == 1).await;
    handle.shutdown(Duration::from_secs(10)).await;
    let dlq = read_all(&bus, "ampy.dev.dlq.v1.news", 1).await;
    // 2 carried in + 1 attempt here.
    assert_eq!(dlq[0].envelope.headers.get("retry_count"), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_payloads_are_dead_lettered_and_the_consumer_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    let h = |k: &str| Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", k);
    // Inline 4 KiB; and 200 KiB of zeros, gzipped on publish (small on the wire, large inflated).
    let big_inline = Envelope::new(&topic, h("a"), vec![1u8; 4096]);
    bus.publish_wire(vec![big_inline.clone()]).await.unwrap();
    bus.publish(&topic, h("b"), vec![0u8; 200 * 1024])
        .await
        .unwrap();
    bus.publish(&topic, h("c"), b"small".to_vec())
        .await
        .unwrap();
    let handle = Consumer::builder(bus.clone(), pat("ampy.dev.news.>"), "sized")
        .max_payload_bytes(1024)
        .handler(handler_fn(|m| async move {
            assert_eq!(&m.payload[..], b"small");
            Outcome::Ok
        }))
        .start()
        .await
        .unwrap();
    wait_stats("all settled", &handle, |s| {
        s.handled_ok + s.dead_lettered_total() == 3
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, 1);
    assert_eq!(stats.dlq(DlqCode::PayloadTooLarge), 2);
    assert_eq!(stats.dead_lettered_total(), 2);
    let dlq = read_all(&bus, "ampy.dev.dlq.v1.news", 2).await;
    let mut reasons: Vec<String> = dlq
        .iter()
        .map(|d| d.envelope.headers.dlq_reason().unwrap().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            "payload_too_large: 204800 bytes after decoding; this consumer's limit is 1024"
                .to_owned(),
            "payload_too_large: 4096 bytes as carried; this consumer's limit is 1024".to_owned(),
        ]
    );
    check_dlq(
        dlq.iter()
            .find(|d| d.envelope.payload.len() == 4096)
            .unwrap(),
        &big_inline,
        DlqCode::PayloadTooLarge,
        "sized",
        1,
    );
}
