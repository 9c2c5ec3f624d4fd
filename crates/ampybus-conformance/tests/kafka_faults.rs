//! Kafka fault and bad-input tests, against the Kafka-API broker on 127.0.0.1:9092
//! (`scripts/brokers.sh start kafka`: tansu 0.6.0 with in-memory storage in CI). Every test
//! uses a namespace of its own, so topics and groups never meet another test's.
//!
//! The test broker keeps its log in memory, so restarting it loses every topic: the restart
//! test restarts the consumer side instead (a consumer process dies mid-run and another takes
//! its partitions over).

use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
use ampybus::runtime::{Consumer, Message, Outcome, Publisher, RetryPolicy, handler_fn};
use ampybus::transport::kafka::KafkaOptions;
use ampybus::transport::{StartAt, SubscribeSpec, WindowQuery};
use ampybus::{Bus, Envelope, ErrorKind, Headers, Topic, TopicPattern};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn headers(key: &str) -> Headers {
    Headers::for_publish(
        ampybus::headers::RAW_BYTES_SCHEMA,
        "faults@1",
        "faults",
        key,
    )
}

/// `batch.num.messages=1`: one record per produce batch, because tansu 0.6.0 answers a fetch
/// from an offset inside a stored batch with nothing (a consumer resuming mid-batch would wait
/// forever; see `tansu_deviations.rs`). Real Kafka needs no such setting.
fn url(label: &str, dir: &std::path::Path, extra: &str) -> String {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    format!(
        "kafka://127.0.0.1:9092?namespace=kf{label}{id}.&partitions=3&max_age_days=1&batch.num.messages=1&dedupe=sqlite:{}{extra}",
        dir.join("dedupe.sqlite3").display()
    )
}

fn start_shared() {
    ampybus_conformance::start_test_broker("kafka");
}

fn raw(topic: &Topic, key: &str, payload: &str) -> Envelope {
    Envelope::new(topic, headers(key), payload.as_bytes().to_vec())
}

async fn within<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung for more than {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_unreachable_brokers_and_bad_records_fail_clearly() {
    // Unreachable: a clear timeout naming the broker, within the connect timeout and a margin.
    let started = Instant::now();
    let e = within(
        "connect to a closed port",
        Duration::from_secs(20),
        Bus::connect("kafka://127.0.0.1:1?connect_timeout_ms=1500"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(
        e.to_string().contains("127.0.0.1:1") && e.to_string().contains("no broker answered"),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    // Bad URLs: Config errors naming the option and the rule, never the password.
    for (u, needle) in [
        ("kafka://h:9092?bogus=1", "unknown option `bogus`"),
        (
            "kafka://bob:s3cret@h:9092?group.id=x",
            "`group.id`: set by the binding",
        ),
        ("kafka://h:notaport", "port `notaport`"),
        (
            "kafka://h:9092?partitions=0",
            "`partitions`: must be 1..=10000",
        ),
        ("kafka://h:9092/path", "no path"),
        ("kafka://h:9092?dedupe=mysql:x", "`dedupe`: must be"),
        ("kafka://h:9092?full_topics=ampy.dev", "`full_topics`"),
        ("kafka://h:9092?namespace=a/b", "`namespace`"),
        (
            "kafka://h:9092?sasl.username=",
            "`sasl.username`: empty value",
        ),
    ] {
        let e = KafkaOptions::from_url(u).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{u}: {e}");
        assert!(e.to_string().contains(needle), "{u}: {e}");
        assert!(!e.to_string().contains("s3cret"), "{u}: {e}");
    }

    start_shared();
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(&url("bad", dir.path(), "&full_topics=ampy.dev.news.v1"))
        .await
        .expect("connect");
    // A contract header may not be named `topic` (the record header of the logical topic).
    let topic = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
    let mut env = raw(&topic, "XNAS.AAPL", "x");
    env.headers.set("topic", "spoofed");
    let e = bus.publish_wire(vec![env]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Header, "{e}");
    assert!(e.to_string().contains("`topic`"), "{e}");
    // A full-topic stream whose subtopic holds a character Kafka forbids in topic names.
    let bad = Topic::parse("ampy.dev.news.v1.desk:a").unwrap();
    let e = bus
        .publish_wire(vec![raw(&bad, "k", "x")])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Topic, "{e}");
    assert!(e.to_string().contains("desk:a"), "{e}");
    // Nothing of either reached the broker.
    let stats = ampybus_conformance::all_topic_stats(&bus).await;
    assert!(stats.iter().all(|s| s.messages == 0), "{stats:?}");
}

/// What the test broker does with SASL credentials it was not configured for: tansu 0.6.0
/// has no authentication, so the client's SASL handshake is refused and the connect fails
/// with a clear error instead of hanging (on a real Kafka cluster wrong credentials fail the
/// same first metadata request, as `SaslAuthenticationFailed`, mapped to `Config`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_the_broker_cannot_check_fail_at_connect() {
    start_shared();
    let started = Instant::now();
    let r = within(
        "connect with SASL PLAIN",
        Duration::from_secs(30),
        Bus::connect("kafka://alice:s3cret@127.0.0.1:9092?connect_timeout_ms=3000&dedupe=off"),
    )
    .await;
    let e = r.expect_err("the test broker has no SASL; the connect must not pass");
    eprintln!(
        "SASL against the test broker: {e} after {:?}",
        started.elapsed()
    );
    assert!(
        matches!(e.kind(), ErrorKind::Config | ErrorKind::Timeout),
        "{e}"
    );
    assert!(!e.to_string().contains("s3cret"), "{e}");
}

/// A consumer process dies mid-run (its handlers stop, its connection goes) while 4
/// publishers keep publishing; a second process takes the group over: every message handled,
/// at most what was in flight at the crash handled twice, nothing dead-lettered, nothing left
/// behind (lag 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_restart_mid_run_loses_nothing_and_applies_once() {
    start_shared();
    let dir = tempfile::tempdir().unwrap();
    let url = url("restart", dir.path(), "");
    let n = ((50_000.0 * ampybus_conformance::scale()) as usize).max(2_000);
    let publishers = 4usize;
    let max_in_flight = 512;
    let store: Arc<dyn DedupeStore> = Arc::new(
        SqliteDedupeStore::open(dir.path().join("consumer-dedupe.sqlite3")).expect("store"),
    );
    let effects: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let dead = Arc::new(AtomicBool::new(false));
    let pattern = TopicPattern::parse("ampy.dev.news.v1.fault.>").unwrap();
    let start = |bus: Bus, dead: Arc<AtomicBool>| {
        let effects = effects.clone();
        Consumer::builder(bus, pattern.clone(), "fault-consumer")
            .dedupe(store.clone())
            .workers(8)
            .max_in_flight(max_in_flight)
            .ack_deadline(Duration::from_secs(10))
            .handler(handler_fn(move |m: Message| {
                let (effects, dead) = (effects.clone(), dead.clone());
                async move {
                    if dead.load(Ordering::SeqCst) {
                        // The process is gone: nothing runs any more.
                        std::future::pending::<()>().await;
                    }
                    *effects
                        .lock()
                        .unwrap()
                        .entry(String::from_utf8_lossy(&m.payload).into_owned())
                        .or_default() += 1;
                    Outcome::Ok
                }
            }))
            .start()
    };
    let pub_bus = Bus::connect(&url).await.expect("connect publishers");
    let first_bus = Bus::connect(&url).await.expect("connect first consumer");
    let first = start(first_bus.clone(), dead.clone()).await.expect("first");

    let published = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let publisher = Publisher::new(pub_bus.clone()).with_policy(RetryPolicy {
            max_attempts: 20,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
        });
        let published = published.clone();
        tasks.push(tokio::spawn(async move {
            let topic = Topic::parse(&format!("ampy.dev.news.v1.fault.p{p}")).unwrap();
            let mut failed = Vec::new();
            let mine: Vec<usize> = (p..n).step_by(publishers).collect();
            for chunk in mine.chunks(200) {
                let batch: Vec<(Topic, Headers, Vec<u8>)> = chunk
                    .iter()
                    .map(|i| {
                        (
                            topic.clone(),
                            headers(&format!("k{}", i % 32)),
                            format!("m{i}").into_bytes(),
                        )
                    })
                    .collect();
                for (t, h, b) in batch {
                    match publisher.publish(&t, h, b).await {
                        Ok(_) => {
                            published.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failed.push(e.to_string()),
                    }
                }
            }
            failed
        }));
    }

    let hang = ampybus_conformance::hang_timeout();
    let t0 = Instant::now();
    while effects.lock().unwrap().len() < n / 3 {
        assert!(
            t0.elapsed() < hang,
            "no progress before the crash: {:?}",
            first.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The crash: handlers stop, the connection goes (its consumer leaves the group).
    dead.store(true, Ordering::SeqCst);
    let handled_at_crash = effects.lock().unwrap().len();
    first_bus.transport().close().await.expect("close");
    drop(first);
    eprintln!("first consumer died after {handled_at_crash} handled");

    let second_bus = Bus::connect(&url).await.expect("connect second consumer");
    let second = start(second_bus.clone(), Arc::new(AtomicBool::new(false)))
        .await
        .expect("second");
    for t in tasks {
        let failed = within("a publisher", hang, t)
            .await
            .expect("publisher task");
        assert!(
            failed.is_empty(),
            "publishes failed: {:?}",
            &failed[..failed.len().min(5)]
        );
    }
    assert_eq!(published.load(Ordering::SeqCst), n as u64);
    let t0 = Instant::now();
    loop {
        let done = effects.lock().unwrap().len();
        let s = second.stats();
        if done == n && s.in_flight == 0 {
            break;
        }
        assert!(
            t0.elapsed() < hang,
            "timed out: {done} of {n} handled; {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = second.shutdown(Duration::from_secs(10)).await;
    let twice: usize = {
        let effects = effects.lock().unwrap();
        assert_eq!(effects.len(), n, "distinct messages handled");
        effects.values().filter(|c| **c > 1).count()
    };
    assert!(
        twice <= max_in_flight,
        "{twice} messages handled more than once (more than were in flight)"
    );
    assert_eq!(stats.dead_lettered_total(), 0, "{stats:?}");
    // Nothing left behind: committed offsets reached the high watermarks.
    let lag = second_bus
        .consumer_lag("fault-consumer")
        .await
        .expect("lag")
        .expect("group");
    assert_eq!(lag.pending, 0, "{lag:?}");
    eprintln!(
        "n={n}: all published ({publishers} publishers), all handled; {twice} handled twice, {} skipped as applied by the second consumer",
        stats.skipped_duplicates
    );
}

/// A durable consumer on a pattern spanning two streams, two instances sharing its group,
/// `StartAt::Time`, and replay across streams by time and keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_span_topics_share_partitions_and_start_where_asked() {
    start_shared();
    let dir = tempfile::tempdir().unwrap();
    let url = url("span", dir.path(), "");
    let bus = Bus::connect(&url).await.expect("connect");
    let bars = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
    let news = Topic::parse("ampy.dev.news.v1.wire.AAPL").unwrap();
    let first: Vec<Envelope> = (0..30)
        .map(|i| {
            raw(
                if i % 2 == 0 { &bars } else { &news },
                &format!("XNAS.K{}", i % 6),
                &format!("a{i}"),
            )
        })
        .collect();
    bus.publish_wire(first).await.expect("publish");
    let mid = chrono::Utc::now();
    // Make sure the second batch is stored after `mid` (the broker's clock, millisecond ticks).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second: Vec<Envelope> = (0..10)
        .map(|i| {
            raw(
                if i % 2 == 0 { &bars } else { &news },
                &format!("XNAS.K{}", i % 6),
                &format!("b{i}"),
            )
        })
        .collect();
    bus.publish_wire(second).await.expect("publish");

    let all = TopicPattern::parse("ampy.dev.>").unwrap();
    // Two instances of one durable consumer share the partitions: 40 records in all, each
    // handed to exactly one of them.
    let mut a = bus
        .subscribe(SubscribeSpec::durable(all.clone(), "shared"))
        .await
        .unwrap();
    let mut b = bus
        .subscribe(SubscribeSpec::durable(all.clone(), "shared"))
        .await
        .unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let t0 = Instant::now();
    while seen.len() < 40 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "only {} of 40 delivered",
            seen.len()
        );
        for sub in [&mut a, &mut b] {
            for d in sub.fetch(64, Duration::from_millis(200)).await.unwrap() {
                *seen
                    .entry(String::from_utf8_lossy(&d.envelope.payload).into_owned())
                    .or_default() += 1;
                d.ack().await.map_err(|(e, _)| e).unwrap();
            }
        }
    }
    assert_eq!(seen.len(), 40);
    assert!(seen.values().all(|c| *c == 1), "{seen:?}");
    let lag = bus.consumer_lag("shared").await.unwrap().expect("group");
    assert_eq!((lag.pending, lag.in_flight), (0, 0), "{lag:?}");

    // StartAt::Time: a new group starts at the first record at or after `mid`.
    let mut spec = SubscribeSpec::durable(all.clone(), "from-mid");
    spec.start = StartAt::Time(mid);
    let mut sub = bus.subscribe(spec).await.unwrap();
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "from-mid got {got:?}"
        );
        for d in sub.fetch(64, Duration::from_millis(200)).await.unwrap() {
            got.push(String::from_utf8_lossy(&d.envelope.payload).into_owned());
            d.ack().await.map_err(|(e, _)| e).unwrap();
        }
    }
    got.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    want.sort();
    assert_eq!(got, want);

    // Replay across both topics: the window from `mid` and only keys XNAS.K0 and XNAS.K1.
    let replay = bus.replay().expect("replay");
    let mut q = WindowQuery::new(all.clone());
    q.start = Some(mid);
    q.keys = Some(vec!["XNAS.K0".into(), "XNAS.K1".into()]);
    q.limit = 2;
    let mut pages = Vec::new();
    loop {
        let page = replay.read_window(&q).await.unwrap();
        if page.is_empty() {
            break;
        }
        q.after_sequence = page.iter().map(|m| m.sequence).max().unwrap();
        pages.push(page);
    }
    let mut replayed: Vec<String> = pages
        .iter()
        .flatten()
        .map(|m| String::from_utf8_lossy(&m.envelope.payload).into_owned())
        .collect();
    replayed.sort();
    // b0..b9 have keys K0,K1,K2,K3,K4,K5,K0,K1,K2,K3: K0/K1 are b0, b1, b6, b7.
    assert_eq!(replayed, vec!["b0", "b1", "b6", "b7"]);
    drop((a, b, sub));
}
