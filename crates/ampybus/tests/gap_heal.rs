//! Healing gaps by replay (issue 18, item 3): a consumer that lost its durable position and
//! restarted at the live edge misses stored messages; with `heal_gaps` the gap in `sequence`
//! becomes a replay request that applies each missing message once. Embedded log, real files.

mod common;

use ampybus::dedupe::SqliteDedupeStore;
use ampybus::runtime::feeds::{GapHealer, HealOptions};
use ampybus::runtime::{Consumer, ConsumerHandle, Outcome, Producer, handler_fn, handler_sync};
use ampybus::tier::Tier;
use ampybus::transport::StartAt;
use ampybus::{Bus, ErrorKind, Headers, Topic, TopicPattern};
use common::{bus_at, stored_envelopes};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HANG: Duration = Duration::from_secs(30);
const KEY: &str = "MSFT.XNAS";

fn pattern() -> TopicPattern {
    TopicPattern::parse("ampy.dev.ticks.>").unwrap()
}

/// The key and `sequence` of every message the handler applied, in order.
type Applied = Arc<Mutex<Vec<(String, u64)>>>;

async fn start(
    bus: &Bus,
    dedupe: &Path,
    applied: &Applied,
    healer: Option<&GapHealer>,
    at_once: bool,
) -> ConsumerHandle {
    let seen = applied.clone();
    let record = move |m: &ampybus::runtime::Message| {
        let seq = m.headers.get("sequence").unwrap().parse().unwrap();
        let key = m.headers.partition_key().unwrap().to_owned();
        seen.lock().unwrap().push((key, seq));
        Outcome::Ok
    };
    let b = Consumer::builder(bus.clone(), pattern(), "md");
    // Both kinds of handler go through the healer: one that answers at once (no future) and
    // one that is awaited.
    let b = if at_once {
        b.handler(handler_sync(record))
    } else {
        b.handler(handler_fn(move |m| {
            let outcome = record(&m);
            async move { outcome }
        }))
    };
    let mut b = b
        .dedupe(Arc::new(SqliteDedupeStore::open(dedupe).unwrap()))
        .start_at(StartAt::Latest);
    if let Some(h) = healer {
        b = b.heal_gaps(h.clone());
    }
    b.start().await.unwrap()
}

async fn until_applied(applied: &Applied, n: usize) {
    let t0 = tokio::time::Instant::now();
    while applied.lock().unwrap().len() < n {
        assert!(
            t0.elapsed() < HANG,
            "applied {:?}, waiting for {n}",
            applied.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Publishes 1..3, lets "md" apply them, stops it; publishes 4..6 while it is down; loses its
/// position (its group directory is removed, as when Kafka offsets expire or a JetStream
/// durable is deleted after its inactive threshold) and restarts it at the live edge on a
/// fresh handle (a new process), then publishes 7..10. Its dedupe store (SQLite) survives.
/// Every step for each of `keys`; the handler answers at once when `at_once`. Returns what the
/// handler applied and the second bus.
async fn lose_position_and_restart(
    keys: &[&str],
    healer: Option<&GapHealer>,
    at_once: bool,
) -> (tempfile::TempDir, Bus, Applied) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let dedupe = dir.path().join("dedupe.db");
    let a = bus_at(&log).await;
    let p = Producer::builder(a.clone()).sequence(true).start().unwrap();
    let topic = Topic::parse("ampy.dev.ticks.v1.trade.MSFT").unwrap();
    let send = |n: u64| {
        let (p, topic) = (&p, &topic);
        async move {
            for key in keys {
                let h =
                    Headers::for_publish("ampy.ticks.v1.TradeBatch", "md@feed-a", "feed-a", key);
                p.send(topic, h, format!("t{n}").into_bytes())
                    .await
                    .unwrap();
            }
        }
    };
    let k = keys.len();
    let applied: Applied = Arc::default();
    let c = start(&a, &dedupe, &applied, healer, at_once).await;
    for n in 1..=3 {
        send(n).await;
    }
    p.flush().await.unwrap();
    until_applied(&applied, 3 * k).await;
    c.shutdown(Duration::from_secs(5)).await;
    for n in 4..=6 {
        send(n).await;
    }
    p.flush().await.unwrap();
    std::fs::remove_dir_all(log.join("groups").join("md")).unwrap();
    let b = bus_at(&log).await;
    let c = start(&b, &dedupe, &applied, healer, at_once).await;
    for n in 7..=10 {
        send(n).await;
    }
    p.close().await.unwrap();
    until_applied(&applied, 7 * k).await;
    // The heal (if any) ran to its end, or nothing more comes.
    if let Some(h) = healer {
        let t0 = tokio::time::Instant::now();
        while h.stats().healed + h.stats().failed == 0 {
            assert!(t0.elapsed() < HANG, "no heal outcome: {:?}", h.stats());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    c.shutdown(Duration::from_secs(5)).await;
    (dir, b, applied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_after_a_lost_position_is_replayed_and_applied_once() {
    let healer = GapHealer::new(HealOptions {
        min_interval: Duration::from_millis(200),
        ..Default::default()
    });
    let (_dir, bus, applied) = lose_position_and_restart(&[KEY], Some(&healer), false).await;
    let mut got: Vec<u64> = applied.lock().unwrap().iter().map(|a| a.1).collect();
    // Live: 1..3, then 7..10; the heal's replay: 4..6 (after 7, the message that revealed it).
    assert_eq!(&got[..3], &[1, 2, 3]);
    assert_eq!(got.len(), 10, "applied {got:?}");
    got.sort_unstable();
    assert_eq!(got, (1..=10).collect::<Vec<u64>>(), "each message once");
    let mut events = Vec::new();
    while let Some(e) = healer.try_next() {
        events.push(e);
    }
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["gap", "heal_requested", "healed"]);
    for e in &events {
        assert_eq!((e.key.as_deref(), e.missing), (Some(KEY), Some((4, 6))));
    }
    let h = events[2].heal.as_ref().unwrap();
    assert_eq!(events[1].heal.as_ref().unwrap().request_id, h.request_id);
    // The window reads 3 (the last before the gap: skipped), 4..6 (applied) and 7 (skipped),
    // and maybe later ones already applied live (skipped).
    assert_eq!(h.applied, 3, "{h:?}");
    assert_eq!(h.read, h.applied + h.skipped);
    assert!(h.skipped >= 2, "{h:?}");
    let j = events[2].to_json();
    assert_eq!(
        (
            &j["event"],
            &j["key"],
            &j["first_missing"],
            &j["last_missing"]
        ),
        (&"healed".into(), &KEY.into(), &4.into(), &6.into())
    );
    assert_eq!(
        (&j["request_id"], &j["applied"]),
        (&h.request_id.clone().into(), &3.into())
    );
    assert!(
        events[2].to_string().contains(" missing=4-6 "),
        "{}",
        events[2]
    );
    assert!(
        events[2].to_string().contains(" applied=3 "),
        "{}",
        events[2]
    );
    let s = healer.stats();
    assert_eq!(
        (s.gaps, s.requests, s.healed, s.failed, s.applied),
        (1, 1, 1, 0, 3)
    );
    let text = bus.metrics().encode();
    assert!(
        text.contains("bus_gap_heal_requests_total{topic=\"ampy.dev.ticks.v1\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("bus_gap_total{topic=\"ampy.dev.ticks.v1\"} 1\n"),
        "{text}"
    );
    assert_eq!(
        stored_envelopes(&bus, "ampy.dev.control.v1.replay_requests")
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_healing_the_gap_stays_and_nothing_is_requested() {
    let (_dir, bus, applied) = lose_position_and_restart(&[KEY], None, false).await;
    let got: Vec<u64> = applied.lock().unwrap().iter().map(|a| a.1).collect();
    assert_eq!(got, [1, 2, 3, 7, 8, 9, 10]);
    assert!(
        stored_envelopes(&bus, "ampy.dev.control.>")
            .await
            .is_empty(),
        "no replay request"
    );
}

/// Five keys with a gap each at once: one request for all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_gaps_is_one_request() {
    let keys = [
        "AAPL.XNAS",
        "AMZN.XNAS",
        "MSFT.XNAS",
        "NVDA.XNAS",
        "TSLA.XNAS",
    ];
    let healer = GapHealer::new(HealOptions {
        coalesce: Duration::from_secs(2),
        ..Default::default()
    });
    let (_dir, bus, applied) = lose_position_and_restart(&keys, Some(&healer), true).await;
    let mut got = applied.lock().unwrap().clone();
    assert_eq!(got.len(), 50, "applied {got:?}");
    got.sort_unstable();
    let want: Vec<(String, u64)> = keys
        .iter()
        .flat_map(|k| (1..=10).map(move |n| (k.to_string(), n)))
        .collect();
    assert_eq!(got, want, "each message of each key once");
    let mut kinds = Vec::new();
    while let Some(e) = healer.try_next() {
        kinds.push(e.kind.as_str());
    }
    assert_eq!(
        kinds,
        [
            "gap",
            "gap",
            "gap",
            "gap",
            "gap",
            "heal_requested",
            "healed"
        ]
    );
    let s = healer.stats();
    assert_eq!((s.gaps, s.requests, s.healed, s.applied), (5, 1, 1, 15));
    assert_eq!(
        stored_envelopes(&bus, "ampy.dev.control.v1.replay_requests")
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn healing_needs_a_durable_tier_replays_and_a_dedupe_store() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let go = |b: ampybus::runtime::ConsumerBuilder| async move {
        b.handler(handler_fn(|_m| async { Outcome::Ok }))
            .heal_gaps(GapHealer::default())
            .start()
            .await
            .unwrap_err()
    };
    let no_dedupe = go(Consumer::builder(bus.clone(), pattern(), "a").without_dedupe()).await;
    let no_serve = go(Consumer::builder(bus.clone(), pattern(), "b").serve_replays(false)).await;
    let be = bus.clone().with_tier(pattern(), Tier::BestEffort);
    let best_effort = go(Consumer::builder(be, pattern(), "c")).await;
    for (e, rule) in [
        (&no_dedupe, "needs a dedupe store"),
        (&no_serve, "needs serve_replays(true)"),
        (
            &best_effort,
            "is best_effort, so nothing is stored to replay",
        ),
    ] {
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.to_string().contains("heal_gaps"), "{e}");
        assert!(e.to_string().contains(rule), "{e}");
    }
    // Nothing was started: no consumer group was created.
    assert!(!dir.path().join("groups").join("a").exists());
}
