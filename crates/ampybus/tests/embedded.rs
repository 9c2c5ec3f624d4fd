//! Embedded log behaviour: durable consumers, redelivery, per-key order across instances and
//! processes, windows, retention, and crash safety (`kill -9`).
//!
//! The multi-process tests re-run this test binary as a child with `AMPYBUS_CHILD_ROLE` set;
//! the child enters through `child_process_entry` (ignored when run on its own).

use ampybus::transport::embedded::{DomainRetention, EmbeddedLog, EmbeddedOptions, SyncLevel};
use ampybus::transport::{Delivery, StartAt, SubscribeSpec, WindowQuery};
use ampybus::{Bus, Domain, Envelope, Headers, Topic, TopicPattern};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{
    HANG, bus_at, child, child_role, fetch_exact, ids_after_crash, marked_lines, order_env,
    orders_topic, parse_payload, scale,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_consumer_resumes_after_reopen_and_new_consumer_starts_at_earliest() {
    let dir = tempfile::tempdir().unwrap();
    let topic = orders_topic();
    let pattern = TopicPattern::parse("ampy.dev.orders.>").unwrap();
    {
        let bus = bus_at(dir.path()).await;
        let batch: Vec<Envelope> = (0..10).map(|i| order_env(&topic, "co_1", i)).collect();
        let receipts = bus.publish_batch(batch).await.unwrap();
        assert_eq!(
            receipts.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<u64>>()
        );
        let mut sub = bus
            .subscribe(SubscribeSpec::durable(pattern.clone(), "c1"))
            .await
            .unwrap();
        let got = fetch_exact(&mut sub, 4).await;
        assert_eq!(
            got.iter().map(|d| parse_payload(d).1).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
        bus.close().await.unwrap();
    }
    let bus = bus_at(dir.path()).await;
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(pattern.clone(), "c1"))
        .await
        .unwrap();
    let got = fetch_exact(&mut sub, 6).await;
    assert_eq!(
        got.iter().map(|d| parse_payload(d).1).collect::<Vec<_>>(),
        vec![4, 5, 6, 7, 8, 9]
    );
    assert!(got.iter().all(|d| d.info.delivery_count == 1));
    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
    assert!(
        sub.fetch(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
    );
    // A second consumer name starts at the earliest retained message.
    let mut other = bus
        .subscribe(SubscribeSpec::durable(pattern.clone(), "c2"))
        .await
        .unwrap();
    assert_eq!(fetch_exact(&mut other, 10).await.len(), 10);
    // Latest: only new messages.
    let mut spec = SubscribeSpec::durable(pattern.clone(), "c3");
    spec.start = StartAt::Latest;
    let mut latest = bus.subscribe(spec).await.unwrap();
    assert!(
        latest
            .fetch(10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
    bus.publish_envelope(order_env(&topic, "co_1", 10))
        .await
        .unwrap();
    let got = fetch_exact(&mut latest, 1).await;
    assert_eq!(parse_payload(&got[0]).1, 10);
    // The same name with another pattern is refused with a clear error.
    let Err(err) = bus
        .subscribe(SubscribeSpec::durable(
            TopicPattern::parse("ampy.dev.fills.>").unwrap(),
            "c1",
        ))
        .await
    else {
        panic!("a second pattern for c1 was accepted")
    };
    assert!(
        err.to_string().contains("already exists with pattern"),
        "{err}"
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_message_is_redelivered_after_the_deadline_and_nack_delays_its_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = orders_topic();
    bus.publish_batch(vec![
        order_env(&topic, "A", 0),
        order_env(&topic, "A", 1),
        order_env(&topic, "B", 0),
    ])
    .await
    .unwrap();
    let pattern = TopicPattern::parse("ampy.dev.orders.v1.requests").unwrap();
    let mut spec = SubscribeSpec::durable(pattern.clone(), "redeliver");
    spec.ack_deadline = Duration::from_millis(300);
    let mut first = bus.subscribe(spec.clone()).await.unwrap();
    let got = fetch_exact(&mut first, 3).await;
    let keys: Vec<_> = got.iter().map(parse_payload).collect();
    assert_eq!(
        keys,
        vec![("A".into(), 0), ("A".into(), 1), ("B".into(), 0)]
    );
    let mut it = got.into_iter();
    let a0 = it.next().unwrap();
    let a1 = it.next().unwrap();
    let b0 = it.next().unwrap();
    b0.ack().await.map_err(|(e, _)| e).unwrap();
    // a0 is released with a delay; a1 is dropped unacked (a crashed handler).
    a0.nack(Duration::from_millis(500))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    drop(a1);
    // Another instance sees nothing of key A before the delay: A:0 blocks A:1.
    let mut second = bus.subscribe(spec).await.unwrap();
    let t0 = Instant::now();
    let again = fetch_exact(&mut second, 2).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "redelivered before the deadline"
    );
    let again_keys: Vec<_> = again.iter().map(parse_payload).collect();
    assert_eq!(again_keys, vec![("A".into(), 0), ("A".into(), 1)]);
    assert_eq!(
        again
            .iter()
            .map(|d| d.info.delivery_count)
            .collect::<Vec<_>>(),
        vec![2, 2]
    );
    Delivery::ack_all(again).await.map_err(|(e, _)| e).unwrap();
    assert!(
        second
            .fetch(10, Duration::from_millis(700))
            .await
            .unwrap()
            .is_empty()
    );
    bus.close().await.unwrap();
}

/// Records read after a key was released with a delay wait behind it, while other keys'
/// records go out at once; when the delay is over the key's records come out in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_read_while_their_key_is_delayed_wait_and_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = orders_topic();
    bus.publish_batch(vec![order_env(&topic, "A", 0), order_env(&topic, "B", 0)])
        .await
        .unwrap();
    let pattern = TopicPattern::parse("ampy.dev.orders.v1.requests").unwrap();
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(pattern, "delayed-key"))
        .await
        .unwrap();
    let got = fetch_exact(&mut sub, 2).await;
    let mut it = got.into_iter();
    let a0 = it.next().unwrap();
    let b0 = it.next().unwrap();
    assert_eq!(parse_payload(&a0), ("A".into(), 0));
    b0.ack().await.map_err(|(e, _)| e).unwrap();
    a0.nack(Duration::from_millis(400))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    bus.publish_batch(vec![
        order_env(&topic, "A", 1),
        order_env(&topic, "B", 1),
        order_env(&topic, "A", 2),
    ])
    .await
    .unwrap();
    // B:1 at once; A:1 and A:2 wait for A:0.
    let first = sub.fetch(10, Duration::from_millis(300)).await.unwrap();
    let keys: Vec<_> = first.iter().map(parse_payload).collect();
    assert_eq!(keys, vec![("B".into(), 1)]);
    Delivery::ack_all(first).await.map_err(|(e, _)| e).unwrap();
    let rest = fetch_exact(&mut sub, 3).await;
    let keys: Vec<_> = rest.iter().map(parse_payload).collect();
    assert_eq!(
        keys,
        vec![("A".into(), 0), ("A".into(), 1), ("A".into(), 2)]
    );
    assert_eq!(
        rest.iter()
            .map(|d| d.info.delivery_count)
            .collect::<Vec<_>>(),
        vec![2, 1, 1]
    );
    Delivery::ack_all(rest).await.map_err(|(e, _)| e).unwrap();
    assert!(
        sub.fetch(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    bus.close().await.unwrap();
}

/// A record found released with a delay when an instance takes over (its key's earlier
/// record was handled but not acked when the first instance went) does not overtake that
/// earlier record, even when the earlier one is still queued behind other keys when the
/// delay is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_record_found_on_takeover_does_not_overtake_its_keys_earlier_record() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = orders_topic();
    let mut batch: Vec<Envelope> = (0..5).map(|i| order_env(&topic, "B", i)).collect();
    batch.push(order_env(&topic, "A", 0));
    batch.push(order_env(&topic, "A", 1));
    bus.publish_batch(batch).await.unwrap();
    let pattern = TopicPattern::parse("ampy.dev.orders.v1.requests").unwrap();
    let spec = SubscribeSpec::durable(pattern, "takeover-delay");
    let delay = Duration::from_millis(1000);
    let due_at;
    {
        let mut first = bus.subscribe(spec.clone()).await.unwrap();
        let got = fetch_exact(&mut first, 7).await;
        let mut got: Vec<Delivery> = got;
        let a1 = got.pop().unwrap();
        assert_eq!(parse_payload(&a1), ("A".into(), 1));
        a1.nack(delay).await.map_err(|(e, _)| e).unwrap();
        due_at = Instant::now() + delay;
        // The rest (A:0 included) are dropped unacked with the instance.
    }
    let mut second = bus.subscribe(spec).await.unwrap();
    let mut order = Vec::new();
    let one = second.fetch(1, Duration::from_secs(5)).await.unwrap();
    assert!(
        Instant::now() < due_at,
        "the first fetch came after the delay: the test proves nothing"
    );
    order.extend(one.iter().map(parse_payload));
    tokio::time::sleep_until((due_at + Duration::from_millis(100)).into()).await;
    while order.len() < 7 {
        let got = second.fetch(1, Duration::from_secs(5)).await.unwrap();
        assert!(!got.is_empty(), "nothing after {order:?}");
        order.extend(got.iter().map(parse_payload));
    }
    let expected: Vec<(String, usize)> = (0..5)
        .map(|i| ("B".to_string(), i))
        .chain([("A".to_string(), 0), ("A".to_string(), 1)])
        .collect();
    assert_eq!(order, expected);
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_work_exactly_once_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = orders_topic();
    let n = (20_000.0 * scale()) as usize;
    let keys = 50;
    let mut counters = vec![0usize; keys];
    let mut batch = Vec::new();
    for j in 0..n {
        let k = (j * 7919) % keys;
        batch.push(order_env(&topic, &format!("k{k}"), counters[k]));
        counters[k] += 1;
        if batch.len() == 1000 {
            bus.publish_batch(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    bus.publish_batch(batch).await.unwrap();
    let seen: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let total = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for inst in 0..2 {
        let bus = if inst == 0 {
            bus.clone()
        } else {
            bus_at(dir.path()).await
        };
        let seen = seen.clone();
        let total = total.clone();
        tasks.push(tokio::spawn(async move {
            let pattern = TopicPattern::parse("ampy.dev.orders.>").unwrap();
            let mut sub = bus
                .subscribe(SubscribeSpec::durable(pattern, "shared"))
                .await
                .unwrap();
            let start = Instant::now();
            let mut mine = 0;
            while total.load(std::sync::atomic::Ordering::SeqCst) < n {
                assert!(start.elapsed() < HANG);
                let got = sub.fetch(256, Duration::from_millis(100)).await.unwrap();
                {
                    let mut s = seen.lock().unwrap();
                    for d in &got {
                        let (k, i) = parse_payload(d);
                        s.entry(k).or_default().push(i);
                    }
                }
                mine += got.len();
                let c = got.len();
                Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
                total.fetch_add(c, std::sync::atomic::Ordering::SeqCst);
            }
            mine
        }));
    }
    let mut per_instance = Vec::new();
    for t in tasks {
        per_instance.push(t.await.unwrap());
    }
    assert_eq!(
        per_instance.iter().sum::<usize>(),
        n,
        "handled {per_instance:?}"
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), keys);
        for (k, v) in seen.iter() {
            let idx: usize = k[1..].parse().unwrap();
            assert_eq!(
                v,
                &(0..counters[idx]).collect::<Vec<_>>(),
                "key {k} out of order or duplicated"
            );
        }
    }
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_and_key_queries_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = orders_topic();
    let fills = Topic::parse("ampy.dev.fills.v1.events").unwrap();
    bus.publish_batch((0..5).map(|i| order_env(&topic, "early", i)).collect())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t1 = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    bus.publish_batch(
        (0..6)
            .map(|i| order_env(&topic, if i % 2 == 0 { "x" } else { "y" }, i))
            .collect(),
    )
    .await
    .unwrap();
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "t", "t", "acct|x");
    bus.publish(&fills, h, b"fill".to_vec()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t2 = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    bus.publish_batch((0..3).map(|i| order_env(&topic, "late", i)).collect())
        .await
        .unwrap();

    let replay = bus.replay().unwrap();
    let mut q = WindowQuery::new(TopicPattern::parse("ampy.dev.orders.>").unwrap());
    q.start = Some(t1);
    q.end = Some(t2);
    let got = replay.read_window(&q).await.unwrap();
    let payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.envelope.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(payloads, vec!["x:0", "y:1", "x:2", "y:3", "x:4", "y:5"]);
    // Paging with a small limit gives the same sequence.
    q.limit = 4;
    let p1 = replay.read_window(&q).await.unwrap();
    assert_eq!(p1.len(), 4);
    q.after_sequence = p1.last().unwrap().sequence;
    let p2 = replay.read_window(&q).await.unwrap();
    assert_eq!(p2.len(), 2);
    q.after_sequence = p2.last().unwrap().sequence;
    assert!(replay.read_window(&q).await.unwrap().is_empty());
    // Keys.
    let mut q = WindowQuery::new(TopicPattern::parse(">").unwrap());
    q.keys = Some(vec!["y".into(), "late".into(), "acct|x".into()]);
    let got = replay.read_window(&q).await.unwrap();
    let payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.envelope.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(
        payloads,
        vec!["y:1", "y:3", "y:5", "fill", "late:0", "late:1", "late:2"]
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_and_size_per_domain() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = EmbeddedOptions::new(dir.path());
    opts.sync = SyncLevel::Normal;
    opts.retention.insert(
        Domain::Ticks,
        DomainRetention {
            max_age: Some(Duration::from_millis(50)),
            max_bytes: None,
        },
    );
    opts.retention.insert(
        Domain::Bars,
        DomainRetention {
            max_age: None,
            max_bytes: Some(20_000),
        },
    );
    let log = EmbeddedLog::open(opts).unwrap();
    let bus = Bus::with_transport(Arc::new(log.clone()), "test");
    let ticks = Topic::parse("ampy.dev.ticks.v1.trade.MSFT").unwrap();
    let bars = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
    let orders = orders_topic();
    for i in 0..10 {
        bus.publish(
            &ticks,
            Headers::for_publish("x.y.Z", "p", "s", "MSFT.XNAS"),
            vec![i as u8; 10],
        )
        .await
        .unwrap();
        bus.publish(
            &orders,
            Headers::for_publish("x.y.Z", "p", "s", "co"),
            vec![i as u8; 10],
        )
        .await
        .unwrap();
    }
    for i in 0..100 {
        bus.publish(
            &bars,
            Headers::for_publish("x.y.Z", "p", "s", "XNAS.AAPL"),
            vec![i as u8; 1000],
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let deleted = log.run_retention().await.unwrap();
    let replay = bus.replay().unwrap();
    let count = |p: &str| {
        let mut q = WindowQuery::new(TopicPattern::parse(p).unwrap());
        q.limit = 10_000;
        async move { replay.read_window(&q).await.unwrap() }
    };
    assert_eq!(count("ampy.dev.ticks.>").await.len(), 0);
    assert_eq!(count("ampy.dev.orders.>").await.len(), 10);
    let bars_left = count("ampy.dev.bars.>").await;
    // Each bar row is ~1000 payload + headers (~450) + topic bytes; the newest that fit in 20,000 remain.
    assert!(
        !bars_left.is_empty() && bars_left.len() < 20,
        "{} bars left",
        bars_left.len()
    );
    assert_eq!(bars_left.last().unwrap().envelope.payload[0], 99);
    assert_eq!(deleted as usize, 10 + (100 - bars_left.len()));
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_reads_record_no_position() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    let topic = orders_topic();
    bus.publish_batch((0..5).map(|i| order_env(&topic, "k", i)).collect())
        .await
        .unwrap();
    for _ in 0..2 {
        let mut sub = bus
            .subscribe(SubscribeSpec::ephemeral(
                TopicPattern::parse(">").unwrap(),
                StartAt::Earliest,
            ))
            .await
            .unwrap();
        let got = fetch_exact(&mut sub, 5).await;
        assert_eq!(
            got.iter().map(|d| parse_payload(d).1).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        assert!(
            sub.fetch(5, Duration::from_millis(50))
                .await
                .unwrap()
                .is_empty()
        );
    }
    bus.close().await.unwrap();
}

// ---------- multi-process ----------

#[test]
fn two_consumer_processes_drain_a_producer_process_exactly_once_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let n = ((100_000.0 * scale()) as usize).max(1000);
    let keys = 100;
    // Create the log (and the durable consumer) before the processes start.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bus = bus_at(dir.path()).await;
        bus.subscribe(SubscribeSpec::durable(
            TopicPattern::parse("ampy.dev.orders.>").unwrap(),
            "drain",
        ))
        .await
        .unwrap();
        bus.close().await.unwrap();
    });
    let done = dir.path().join("producer.done");
    // Drain each consumer's stdout while it runs: a full pipe would stall it before its acks.
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let mut c = child(
                "consume",
                dir.path(),
                &[("AMPYBUS_CHILD_DONE", done.display().to_string())],
            )
            .spawn()
            .unwrap();
            let mut stdout = c.stdout.take().unwrap();
            let reader = std::thread::spawn(move || {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut stdout, &mut buf).unwrap();
                buf
            });
            (c, reader)
        })
        .collect();
    let producer = child(
        "produce",
        dir.path(),
        &[
            ("AMPYBUS_CHILD_N", n.to_string()),
            ("AMPYBUS_CHILD_KEYS", keys.to_string()),
        ],
    )
    .output()
    .unwrap();
    assert!(producer.status.success(), "producer failed");
    std::fs::write(&done, b"1").unwrap();
    let mut records: Vec<(u64, String, usize, usize)> = Vec::new(); // (time_us, key, i, consumer)
    let mut redelivered = 0;
    for (ci, (mut c, reader)) in consumers.into_iter().enumerate() {
        assert!(c.wait().unwrap().success(), "consumer {ci} failed");
        let stdout = reader.join().unwrap();
        for l in marked_lines(&stdout) {
            let mut it = l.split(' ');
            let t: u64 = it.next().unwrap().parse().unwrap();
            let (k, i) = it.next().unwrap().rsplit_once(':').unwrap();
            let _seq: u64 = it.next().unwrap().parse().unwrap();
            let count: u64 = it.next().unwrap().parse().unwrap();
            redelivered += usize::from(count > 1);
            records.push((t, k.to_owned(), i.parse().unwrap(), ci));
        }
    }
    assert_eq!(redelivered, 0, "no lease should expire in this run");
    assert_eq!(records.len(), n, "handled {} of {n}", records.len());
    let per_consumer: Vec<usize> = (0..2)
        .map(|c| records.iter().filter(|r| r.3 == c).count())
        .collect();
    let mut by_key: BTreeMap<String, Vec<(u64, usize)>> = BTreeMap::new();
    for (t, k, i, _) in &records {
        by_key.entry(k.clone()).or_default().push((*t, *i));
    }
    assert_eq!(by_key.len(), keys);
    for (k, mut v) in by_key {
        v.sort();
        let order: Vec<usize> = v.iter().map(|x| x.1).collect();
        assert_eq!(
            order,
            (0..order.len()).collect::<Vec<_>>(),
            "key {k}: not exactly once in publish order"
        );
    }
    eprintln!("handled {n} messages; per consumer process: {per_consumer:?}");
}

#[test]
fn kill_9_of_a_publisher_loses_no_returned_publish_and_the_log_opens_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = child("publish_forever", dir.path(), &[]).spawn().unwrap();
    let mut acked = Vec::new();
    {
        let stdout = c.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let start = Instant::now();
        while acked.len() < 3000 {
            assert!(start.elapsed() < HANG, "publisher too slow");
            let line = lines.next().expect("publisher exited early").unwrap();
            if let Some((_, id)) = line.split_once('@') {
                acked.push(id.to_owned());
            }
        }
        // SIGKILL while it is mid-stream.
        let _ = Command::new("kill")
            .args(["-9", &c.id().to_string()])
            .status();
        // Drain what it printed before dying: those publishes returned too.
        for line in lines.map_while(Result::ok) {
            if let Some((_, id)) = line.split_once('@') {
                acked.push(id.to_owned());
            }
        }
    }
    let status = c.wait().unwrap();
    assert!(!status.success(), "publisher was not killed");
    let stored: HashSet<String> = ids_after_crash(dir.path()).into_iter().collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged publishes lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert!(stored.len() >= acked.len());
}

#[test]
fn a_consumer_killed_before_acking_gets_the_message_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let published = rt.block_on(async {
        let bus = bus_at(dir.path()).await;
        let r = bus
            .publish_envelope(order_env(&orders_topic(), "co_9", 0))
            .await
            .unwrap();
        bus.close().await.unwrap();
        r.sequence
    });
    let out = child("crash_consumer", dir.path(), &[]).output().unwrap();
    assert!(
        !out.status.success(),
        "the crashing consumer exited cleanly"
    );
    let first = marked_lines(&out.stdout);
    assert_eq!(
        first.len(),
        1,
        "crash consumer printed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let redelivered = rt.block_on(async {
        let bus = bus_at(dir.path()).await;
        let mut spec =
            SubscribeSpec::durable(TopicPattern::parse("ampy.dev.orders.>").unwrap(), "crashy");
        spec.ack_deadline = Duration::from_secs(1);
        let mut sub = bus.subscribe(spec).await.unwrap();
        let got = fetch_exact(&mut sub, 1).await;
        let d = got.into_iter().next().unwrap();
        let info = (
            d.info.sequence,
            d.info.delivery_count,
            d.envelope.headers.message_id().unwrap().to_owned(),
        );
        d.ack().await.map_err(|(e, _)| e).unwrap();
        assert!(
            sub.fetch(1, Duration::from_millis(1500))
                .await
                .unwrap()
                .is_empty()
        );
        bus.close().await.unwrap();
        info
    });
    assert_eq!(redelivered.0, published);
    assert_eq!(redelivered.1, 2);
    assert_eq!(redelivered.2, first[0]);
}

#[test]
#[ignore = "entry point of the child processes spawned by the multi-process tests"]
fn child_process_entry() {
    let (role, dir) = child_role();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let out = std::io::stdout();
        match role.as_str() {
            "produce" => {
                let n: usize = std::env::var("AMPYBUS_CHILD_N").unwrap().parse().unwrap();
                let keys: usize = std::env::var("AMPYBUS_CHILD_KEYS")
                    .unwrap()
                    .parse()
                    .unwrap();
                let bus = bus_at(&dir).await;
                let topic = orders_topic();
                let mut counters = vec![0usize; keys];
                let mut batch = Vec::new();
                for j in 0..n {
                    let k = (j * 7919 + j / 3) % keys;
                    batch.push(order_env(&topic, &format!("k{k}"), counters[k]));
                    counters[k] += 1;
                    if batch.len() == 500 {
                        bus.publish_batch(std::mem::take(&mut batch)).await.unwrap();
                    }
                }
                bus.publish_batch(batch).await.unwrap();
                bus.close().await.unwrap();
            }
            "consume" => {
                let done = std::path::PathBuf::from(std::env::var("AMPYBUS_CHILD_DONE").unwrap());
                let bus = bus_at(&dir).await;
                let pattern = TopicPattern::parse("ampy.dev.orders.>").unwrap();
                let mut sub = bus
                    .subscribe(SubscribeSpec::durable(pattern, "drain"))
                    .await
                    .unwrap();
                let mut idle_since: Option<Instant> = None;
                let mut buf = String::new();
                let start = Instant::now();
                loop {
                    assert!(start.elapsed() < HANG);
                    let got = sub.fetch(256, Duration::from_millis(200)).await.unwrap();
                    if got.is_empty() {
                        if done.exists() {
                            let since = *idle_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_secs(2) {
                                break;
                            }
                        }
                        continue;
                    }
                    idle_since = None;
                    buf.clear();
                    for d in &got {
                        let t = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_micros();
                        let p = std::str::from_utf8(&d.envelope.payload).unwrap();
                        buf.push_str(&format!(
                            "@{t} {p} {} {}\n",
                            d.info.sequence, d.info.delivery_count
                        ));
                    }
                    out.lock().write_all(buf.as_bytes()).unwrap();
                    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
                }
                bus.close().await.unwrap();
            }
            "publish_forever" => {
                let bus = Bus::connect(dir.to_str().unwrap()).await.unwrap(); // sync=full
                let topic = orders_topic();
                for i in 0..1_000_000 {
                    let env = order_env(&topic, "k", i);
                    let id = env.headers.message_id().unwrap().to_owned();
                    bus.publish_envelope(env).await.unwrap();
                    let mut o = out.lock();
                    writeln!(o, "@{id}").unwrap();
                    o.flush().unwrap();
                }
            }
            "crash_consumer" => {
                let bus = bus_at(&dir).await;
                let mut spec = SubscribeSpec::durable(
                    TopicPattern::parse("ampy.dev.orders.>").unwrap(),
                    "crashy",
                );
                spec.ack_deadline = Duration::from_secs(1);
                let mut sub = bus.subscribe(spec).await.unwrap();
                let got = fetch_exact(&mut sub, 1).await;
                let mut o = out.lock();
                writeln!(o, "@{}", got[0].envelope.headers.message_id().unwrap()).unwrap();
                o.flush().unwrap();
                std::process::abort();
            }
            other => panic!("unknown child role {other}"),
        }
    });
}
