//! The replay control protocol on the embedded log: a `ReplayRequest` on
//! `ampy.{env}.control.v1.replay_requests` is served once by the running consumer it names,
//! through its own handler and dedupe store, and reported on `…replay_status`.

use ampybus::control::{REPLAY_STATUS_SCHEMA, ReplayRequest, ReplayState, ReplayStatus};
use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
use ampybus::headers::names;
use ampybus::runtime::control::request_replay;
use ampybus::runtime::{Consumer, ConsumerHandle, Outcome, handler_fn};
use ampybus::transport::{StartAt, SubscribeSpec, WindowQuery};
use ampybus::{Bus, Envelope, ErrorKind, Headers, Topic, TopicPattern};
use chrono::{DateTime, Utc};
use prost::Message as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HANG: Duration = Duration::from_secs(60);
const KEYS: [&str; 4] = ["co_1", "co_2", "co_3", "co_4"];

/// message_id → (times handled, replay_request_id of the last call).
type Calls = Arc<Mutex<HashMap<String, (u32, Option<String>)>>>;

async fn bus_at(dir: &std::path::Path) -> Bus {
    Bus::connect(&format!("file://{}?sync=normal", dir.display()))
        .await
        .unwrap()
}

fn pat(s: &str) -> TopicPattern {
    TopicPattern::parse(s).unwrap()
}

/// Publishes 5 messages per key on ampy.dev.orders.v1.requests; returns their ids in order.
async fn publish_orders(bus: &Bus) -> Vec<String> {
    let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let mut batch = Vec::new();
    for i in 0..5 {
        for k in KEYS {
            let h = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "test", k);
            batch.push(Envelope::new(&topic, h, format!("{k}-{i}").into_bytes()));
        }
    }
    let ids = batch
        .iter()
        .map(|e| e.headers.message_id().unwrap().to_owned())
        .collect();
    bus.publish_batch(batch).await.unwrap();
    ids
}

async fn start_consumer(
    bus: &Bus,
    name: &str,
    calls: Calls,
    store: &std::path::Path,
) -> ConsumerHandle {
    let store: Arc<dyn DedupeStore> = Arc::new(SqliteDedupeStore::open(store).unwrap());
    Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), name)
        .handler(handler_fn(move |m| {
            let calls = calls.clone();
            async move {
                let id = m.headers.message_id().unwrap().to_owned();
                let tag = m.headers.get(names::REPLAY_REQUEST_ID).map(str::to_owned);
                let mut c = calls.lock().unwrap();
                let e = c.entry(id).or_insert((0, None));
                e.0 += 1;
                e.1 = tag;
                Outcome::Ok
            }
        }))
        .dedupe(store)
        .start()
        .await
        .unwrap()
}

async fn wait_handled(h: &ConsumerHandle, n: u64) {
    let start = Instant::now();
    while h.stats().handled_ok < n {
        assert!(start.elapsed() < HANG, "timed out: {:?}", h.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn total_calls(calls: &Calls) -> u32 {
    calls.lock().unwrap().values().map(|c| c.0).sum()
}

/// Every status report stored for `request_id`, in order.
async fn reports(bus: &Bus, request_id: &str) -> Vec<ReplayStatus> {
    let q = WindowQuery::new(pat("ampy.dev.control.v1.replay_status"));
    let got = bus.replay().unwrap().read_window(&q).await.unwrap();
    got.into_iter()
        .filter(|m| m.envelope.headers.schema_fqdn() == Some(REPLAY_STATUS_SCHEMA))
        .map(|m| ReplayStatus::decode(&m.envelope.payload[..]).unwrap())
        .filter(|s| s.request_id == request_id)
        .collect()
}

fn window(t0: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    (t0, Utc::now() + chrono::Duration::seconds(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_request_is_served_through_the_handler_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let calls: Calls = Arc::default();
    let oms = start_consumer(&bus, "oms", calls.clone(), &dir.path().join("oms.sqlite3")).await;
    let t0 = Utc::now() - chrono::Duration::seconds(1);
    let ids = publish_orders(&bus).await;
    wait_handled(&oms, 20).await;
    assert_eq!(total_calls(&calls), 20);

    // The whole window: everything was applied already.
    let (start, end) = window(t0);
    let req = ReplayRequest::new("oms", "ampy.dev.orders.>", start, end);
    let mut seen = Vec::new();
    let done = request_replay(&bus, &req, HANG, |s| seen.push(s.state()))
        .await
        .unwrap();
    assert_eq!(done.state(), ReplayState::Completed, "{}", done.error);
    assert_eq!(
        (
            done.read,
            done.applied,
            done.skipped_duplicates,
            done.failed
        ),
        (20, 0, 20, 0)
    );
    assert_eq!(done.first_message_id, ids[0]);
    assert_eq!(done.last_message_id, ids[19]);
    assert_eq!(done.consumer, "oms");
    assert_eq!(seen.first(), Some(&ReplayState::Accepted));
    assert_eq!(seen.last(), Some(&ReplayState::Completed));
    assert_eq!(total_calls(&calls), 20, "nothing applied twice");

    // Scoped to two keys.
    let mut req = ReplayRequest::new("oms", "ampy.dev.orders.v1.requests", start, end);
    req.keys = vec!["co_2".into(), "co_4".into()];
    let done = request_replay(&bus, &req, HANG, |_| {}).await.unwrap();
    assert_eq!(
        (
            done.state(),
            done.read,
            done.applied,
            done.skipped_duplicates
        ),
        (ReplayState::Completed, 10, 0, 10)
    );
    assert_eq!(done.first_message_id, ids[1]);
    assert_eq!(done.last_message_id, ids[19]);

    // Exactly one accepted and one completed report per request, stored on the status topic.
    let stored = reports(&bus, &req.request_id).await;
    let states: Vec<ReplayState> = stored.iter().map(|s| s.state()).collect();
    assert_eq!(states.first(), Some(&ReplayState::Accepted));
    assert_eq!(states.last(), Some(&ReplayState::Completed));
    assert_eq!(states.iter().filter(|s| s.is_final()).count(), 1);
    assert!(states.iter().all(|s| matches!(
        s,
        ReplayState::Accepted | ReplayState::Progress | ReplayState::Completed
    )));
    oms.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_that_lost_its_dedupe_state_reapplies_exactly_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let calls: Calls = Arc::default();
    let first = start_consumer(&bus, "risk", calls.clone(), &dir.path().join("a.sqlite3")).await;
    let t0 = Utc::now() - chrono::Duration::seconds(1);
    publish_orders(&bus).await;
    wait_handled(&first, 20).await;
    first.shutdown(Duration::from_secs(10)).await;

    // The same consumer name with an empty dedupe store (its state was lost): a replay of the
    // window applies all 20 again, once each, tagged with the request id.
    let second = start_consumer(&bus, "risk", calls.clone(), &dir.path().join("b.sqlite3")).await;
    let (start, end) = window(t0);
    let req = ReplayRequest::new("risk", "ampy.dev.orders.>", start, end);
    let done = request_replay(&bus, &req, HANG, |_| {}).await.unwrap();
    assert_eq!(
        (
            done.state(),
            done.read,
            done.applied,
            done.skipped_duplicates
        ),
        (ReplayState::Completed, 20, 20, 0)
    );
    {
        let c = calls.lock().unwrap();
        assert_eq!(c.len(), 20);
        for (count, tag) in c.values() {
            assert_eq!(*count, 2);
            assert_eq!(tag.as_deref(), Some(req.request_id.as_str()));
        }
    }
    // And a second identical request changes nothing.
    let again = ReplayRequest::new("risk", "ampy.dev.orders.>", start, end);
    let done = request_replay(&bus, &again, HANG, |_| {}).await.unwrap();
    assert_eq!((done.applied, done.skipped_duplicates), (0, 20));
    assert_eq!(total_calls(&calls), 40);
    second.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_of_a_consumer_serve_a_request_once() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let calls: Calls = Arc::default();
    let store = dir.path().join("shared.sqlite3");
    let a = start_consumer(&bus, "oms", calls.clone(), &store).await;
    let b = start_consumer(&bus, "oms", calls.clone(), &store).await;
    let t0 = Utc::now() - chrono::Duration::seconds(1);
    publish_orders(&bus).await;
    let start = Instant::now();
    while a.stats().handled_ok + b.stats().handled_ok < 20 {
        assert!(start.elapsed() < HANG);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, e) = window(t0);
    let req = ReplayRequest::new("oms", "ampy.dev.orders.>", s, e);
    let done = request_replay(&bus, &req, HANG, |_| {}).await.unwrap();
    assert_eq!((done.read, done.skipped_duplicates), (20, 20));
    let stored = reports(&bus, &req.request_id).await;
    let accepted = stored
        .iter()
        .filter(|s| s.state() == ReplayState::Accepted)
        .count();
    assert_eq!(accepted, 1, "one instance serves it");
    assert_eq!(total_calls(&calls), 20);
    a.shutdown(Duration::from_secs(10)).await;
    b.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_are_rejected_with_the_reason_and_unknown_consumers_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let calls: Calls = Arc::default();
    let oms = start_consumer(&bus, "oms", calls.clone(), &dir.path().join("oms.sqlite3")).await;
    let plain = Consumer::builder(bus.clone(), pat("ampy.dev.fills.>"), "nodedupe")
        .handler(handler_fn(|_m| async { Outcome::Ok }))
        .without_dedupe()
        .start()
        .await
        .unwrap();
    let t0 = Utc::now() - chrono::Duration::seconds(60);
    let t1 = Utc::now();

    // Outside the consumer's own pattern: rejected by the consumer, naming both patterns.
    let req = ReplayRequest::new("oms", "ampy.dev.bars.>", t0, t1);
    let done = request_replay(&bus, &req, HANG, |_| {}).await.unwrap();
    assert_eq!(done.state(), ReplayState::Rejected);
    assert!(
        done.error.contains(
            "\"ampy.dev.bars.>\" is not within consumer `oms`'s pattern \"ampy.dev.orders.>\""
        ),
        "{}",
        done.error
    );

    // A consumer without dedupe cannot replay safely.
    let req = ReplayRequest::new("nodedupe", "ampy.dev.fills.>", t0, t1);
    let done = request_replay(&bus, &req, HANG, |_| {}).await.unwrap();
    assert_eq!(done.state(), ReplayState::Rejected);
    assert!(done.error.contains("no dedupe store"), "{}", done.error);

    // Invalid requests never leave the caller.
    let bad = ReplayRequest::new("oms", "ampy.dev.orders.>", t1, t0);
    let e = request_replay(&bus, &bad, HANG, |_| {}).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Payload);
    assert!(e.to_string().contains("`end` must be after `start`"), "{e}");
    let bad = ReplayRequest::new("oms", "ampy.*.orders.>", t0, t1);
    let e = request_replay(&bus, &bad, HANG, |_| {}).await.unwrap_err();
    assert!(e.to_string().contains("must name one env"), "{e}");
    let mut bad = ReplayRequest::new("oms", "ampy.dev.orders.>", t0, t1);
    bad.keys = vec!["a b".into()];
    let e = request_replay(&bus, &bad, HANG, |_| {}).await.unwrap_err();
    assert!(e.to_string().contains("`keys` entry \"a b\""), "{e}");

    // Nobody named `ghost` runs: a clear timeout, not a hang.
    let req = ReplayRequest::new("ghost", "ampy.dev.orders.>", t0, t1);
    let e = request_replay(&bus, &req, Duration::from_millis(1500), |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.to_string().contains("consumer `ghost`"), "{e}");

    // Garbage on the requests topic is dead-lettered by the listener, which keeps running.
    plain.shutdown(Duration::from_secs(10)).await;
    let topic = Topic::parse("ampy.dev.control.v1.replay_requests").unwrap();
    let h = Headers::for_publish(ampybus::control::REPLAY_REQUEST_SCHEMA, "x@1", "x", "r-bad");
    bus.publish(&topic, h, vec![0xff, 0xff, 0xff])
        .await
        .unwrap();
    let ok = ReplayRequest::new("oms", "ampy.dev.orders.>", t0, Utc::now());
    let done = request_replay(&bus, &ok, HANG, |_| {}).await.unwrap();
    assert_eq!(done.state(), ReplayState::Completed);
    // The garbage and the good request have different keys: the listener may finish the
    // good one first, so wait for the dead letter itself to be stored.
    let mut dead = bus
        .subscribe(SubscribeSpec::ephemeral(
            pat("ampy.dev.dlq.v1.control"),
            StartAt::Earliest,
        ))
        .await
        .unwrap();
    assert_eq!(dead.fetch(1, HANG).await.unwrap().len(), 1);
    let dlq = bus
        .replay()
        .unwrap()
        .read_window(&WindowQuery::new(pat("ampy.dev.dlq.v1.control")))
        .await
        .unwrap();
    let reasons: Vec<&str> = dlq
        .iter()
        .filter_map(|m| m.envelope.headers.dlq_reason())
        .collect();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].starts_with("decode_error: "), "{reasons:?}");
    assert_eq!(total_calls(&calls), 0);
    assert_eq!(
        dlq[0].envelope.headers.dlq_consumer(),
        Some("oms-replay-control")
    );
    oms.shutdown(Duration::from_secs(10)).await;
}

async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(HANG, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

/// A replay that is applying a message when the live path reaches the same message: the live
/// copy waits for the replay's handler (it is counted as deferred), then is skipped as applied
/// — the message is applied once, by the replay. Before the replay claimed its keys in the
/// consumer's key book, the live copy (looked up in the store before the replay's record)
/// was handled a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_twin_of_a_message_a_replay_is_applying_waits_and_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let t0 = Utc::now() - chrono::Duration::seconds(1);
    // A and X share a partition key: live, X waits behind A.
    let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let batch: Vec<Envelope> = ["a", "x"]
        .iter()
        .map(|p| {
            let h = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "test", "co_1");
            Envelope::new(&topic, h, p.as_bytes().to_vec())
        })
        .collect();
    let a = batch[0].headers.message_id().unwrap().to_owned();
    let x = batch[1].headers.message_id().unwrap().to_owned();
    bus.publish_batch(batch).await.unwrap();

    // (message id, replayed) → calls.
    let calls: Arc<Mutex<HashMap<(String, bool), u32>>> = Arc::default();
    let gate_a = Arc::new(tokio::sync::Semaphore::new(0));
    let gate_x = Arc::new(tokio::sync::Semaphore::new(0));
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<(String, bool)>();
    let handler = {
        let (calls, gate_a, gate_x, a, x) = (
            calls.clone(),
            gate_a.clone(),
            gate_x.clone(),
            a.clone(),
            x.clone(),
        );
        handler_fn(move |m| {
            let (calls, gate_a, gate_x, a, x, entered_tx) = (
                calls.clone(),
                gate_a.clone(),
                gate_x.clone(),
                a.clone(),
                x.clone(),
                entered_tx.clone(),
            );
            async move {
                let id = m.headers.message_id().unwrap().to_owned();
                let replayed = m.headers.get(names::REPLAY_REQUEST_ID).is_some();
                *calls
                    .lock()
                    .unwrap()
                    .entry((id.clone(), replayed))
                    .or_default() += 1;
                let _ = entered_tx.send((id.clone(), replayed));
                if id == a && !replayed {
                    gate_a.acquire().await.unwrap().forget();
                }
                if id == x && replayed {
                    gate_x.acquire().await.unwrap().forget();
                }
                Outcome::Ok
            }
        })
    };
    let store: Arc<dyn DedupeStore> =
        Arc::new(SqliteDedupeStore::open(dir.path().join("oms.sqlite3")).unwrap());
    let oms = Consumer::builder(bus.clone(), pat("ampy.dev.orders.>"), "oms")
        .handler(handler)
        .dedupe(store)
        .start()
        .await
        .unwrap();
    assert_eq!(next(&mut entered).await, (a.clone(), false), "live A first");

    // The replay skips A (the live path is handling it) and applies X, held in the handler.
    let (start, end) = window(t0);
    let req = ReplayRequest::new("oms", "ampy.dev.orders.>", start, end);
    let replay = {
        let bus = bus.clone();
        tokio::spawn(async move { request_replay(&bus, &req, HANG, |_| {}).await })
    };
    assert_eq!(next(&mut entered).await, (x.clone(), true), "replayed X");

    // Live A finishes; live X reaches its claim while the replay still holds X.
    gate_a.add_permits(1);
    let waited = Instant::now();
    while oms.stats().deferred == 0 && !calls.lock().unwrap().contains_key(&(x.clone(), false)) {
        assert!(waited.elapsed() < HANG, "timed out: {:?}", oms.stats());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        calls.lock().unwrap().get(&(x.clone(), false)),
        None,
        "the live twin ran while the replay was applying X"
    );
    gate_x.add_permits(1);
    let done = replay.await.unwrap().unwrap();
    assert_eq!(done.state(), ReplayState::Completed, "{}", done.error);
    assert_eq!(
        (
            done.read,
            done.applied,
            done.skipped_duplicates,
            done.failed
        ),
        (2, 1, 1, 0)
    );
    let waited = Instant::now();
    while oms.stats().skipped_duplicates < 1 || oms.stats().in_flight > 0 {
        assert!(waited.elapsed() < HANG, "timed out: {:?}", oms.stats());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let stats = oms.shutdown(Duration::from_secs(10)).await;
    assert_eq!((stats.handled_ok, stats.skipped_duplicates), (1, 1));
    assert!(stats.deferred >= 1);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        HashMap::from([((a.clone(), false), 1), ((x.clone(), true), 1)]),
        "each message applied once"
    );
}
