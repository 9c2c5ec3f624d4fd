//! Replay over patterns spanning several streams on the real brokers (NATS, Redis, and Kafka
//! when built with `kafka`): tiny pages, every message exactly once in store order, by cursor
//! and by `after_sequence`; windows, keys, a stream created between two pages; two streams
//! with the same store time on a page boundary (Redis: explicit entry ids); a Kafka partition
//! whose timestamps go backwards.

mod common;

use ampybus::transport::{ReplayByTime, StoredMessage, WindowQuery};
use ampybus::{Bus, Headers, Topic, TopicPattern};
use std::time::{SystemTime, UNIX_EPOCH};

fn unique() -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{}", n % (1 << 40), std::process::id())
}

fn headers(key: &str) -> Headers {
    Headers::for_publish(ampybus::headers::RAW_BYTES_SCHEMA, "merge@1", "merge", key)
}

fn body(m: &StoredMessage) -> String {
    String::from_utf8_lossy(&m.envelope.payload).into_owned()
}

/// Every page by cursor: bodies, and the number of pages.
async fn by_cursor(r: &dyn ReplayByTime, mut q: WindowQuery) -> (Vec<String>, usize) {
    let (mut out, mut pages) = (Vec::new(), 0);
    loop {
        let p = r.read_page(&q).await.expect("read_page");
        if p.messages.is_empty() {
            return (out, pages);
        }
        assert!(
            p.messages.len() <= q.limit,
            "a page of {}",
            p.messages.len()
        );
        pages += 1;
        out.extend(p.messages.iter().map(body));
        q.cursor = Some(p.next);
    }
}

/// Every page by `after_sequence` = the last message's `sequence`.
async fn by_sequence(r: &dyn ReplayByTime, mut q: WindowQuery) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let p = r.read_window(&q).await.expect("read_window");
        let Some(last) = p.last() else { return out };
        q.after_sequence = last.sequence;
        out.extend(p.iter().map(body));
    }
}

/// Publishes `n` messages round-robin over three streams (news, bars, fills), one at a time
/// (so store order is publish order), three keys per stream in the domain's key shape (news:
/// `k0`..`k2`); returns the bodies.
async fn publish_spread(bus: &Bus, n: usize, tag: &str) -> Vec<String> {
    let topics = [
        Topic::parse("ampy.dev.news.v1.raw").unwrap(),
        Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap(),
        Topic::parse("ampy.dev.fills.v1.events").unwrap(),
    ];
    let mut want = Vec::new();
    for i in 0..n {
        let b = format!("{tag}{i}");
        let t = (i * 7 / 3) % 3;
        let key = match t {
            0 => format!("k{}", i % 3),
            1 => ["XNAS.AAPL", "XNAS.MSFT", "XNAS.IBM"][i % 3].to_owned(),
            _ => format!("acct|co{}", i % 3),
        };
        bus.publish(&topics[t], headers(&key), b.clone())
            .await
            .unwrap();
        want.push(b);
    }
    want
}

/// The shared checks: tiny pages both ways, a window, keys, a stream appearing mid-read.
async fn pages_across_streams(bus: &Bus, limits: &[usize]) {
    let want = publish_spread(bus, 15, "m").await;
    let r = bus.replay().expect("replay");
    let all = WindowQuery::new(TopicPattern::parse("ampy.dev.>").unwrap());
    for &limit in limits {
        let mut q = all.clone();
        q.limit = limit;
        let (got, pages) = by_cursor(r, q.clone()).await;
        assert_eq!(got, want, "cursor, limit {limit}");
        assert_eq!(
            pages,
            want.len().div_ceil(limit),
            "cursor pages, limit {limit}"
        );
        assert_eq!(
            by_sequence(r, q).await,
            want,
            "after_sequence, limit {limit}"
        );
    }

    // A window [stored_at of m3, stored_at of m12) and keys.
    let mut q = all.clone();
    q.limit = 1000;
    let stored = r.read_page(&q).await.unwrap().messages;
    assert_eq!(stored.len(), want.len());
    q.start = Some(stored[3].stored_at);
    q.end = Some(stored[12].stored_at);
    q.limit = 4;
    // Store times of whole milliseconds may be shared with a neighbour: the window is what
    // the store times say.
    let in_window: Vec<String> = stored
        .iter()
        .filter(|m| m.stored_at >= stored[3].stored_at && m.stored_at < stored[12].stored_at)
        .map(body)
        .collect();
    // How many fall inside depends on how many shared a millisecond (fast publishes share
    // many): exact below either way; not empty whenever the bounds differ.
    if stored[3].stored_at < stored[12].stored_at {
        assert!(!in_window.is_empty(), "{in_window:?}");
    }
    assert_eq!(
        by_cursor(r, q.clone()).await.0,
        in_window,
        "window by cursor"
    );
    assert_eq!(
        by_sequence(r, q.clone()).await,
        in_window,
        "window by sequence"
    );
    q.keys = Some(vec!["k1".into()]);
    let keyed: Vec<String> = stored
        .iter()
        .filter(|m| m.stored_at >= stored[3].stored_at && m.stored_at < stored[12].stored_at)
        .filter(|m| m.envelope.headers.get("partition_key") == Some("k1"))
        .map(body)
        .collect();
    assert!(!keyed.is_empty());
    assert_eq!(by_cursor(r, q).await.0, keyed, "window and keys");
    let mut q = all.clone();
    q.pattern = TopicPattern::parse("ampy.dev.bars.>").unwrap();
    q.limit = 3;
    let bars: Vec<String> = stored
        .iter()
        .filter(|m| m.envelope.topic.starts_with("ampy.dev.bars."))
        .map(body)
        .collect();
    assert_eq!(by_cursor(r, q).await.0, bars, "one stream");

    // A stream created between two pages is read from the window's start.
    let mut q = all.clone();
    q.limit = 10;
    let first = r.read_page(&q).await.unwrap();
    assert_eq!(
        first.messages.iter().map(body).collect::<Vec<_>>(),
        want[..10]
    );
    let sig = Topic::parse("ampy.dev.signals.v1.alpha").unwrap();
    bus.publish(&sig, headers("m1|AAPL.XNAS"), "late")
        .await
        .unwrap();
    q.cursor = Some(first.next);
    let (rest, _) = by_cursor(r, q).await;
    let mut expect: Vec<String> = want[10..].to_vec();
    expect.push("late".into());
    assert_eq!(rest, expect, "after a new stream");
}

/// A JetStream server of its own (the shared one's streams already hold `ampy.dev.>`
/// subjects of other tests, and a stream prefix does not separate subjects); killed on drop.
struct OwnNats {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OwnNats {
    fn start() -> OwnNats {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server on PATH");
        OwnNats {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_pages_across_streams_exactly_once_in_order() {
    let server = OwnNats::start();
    let url = format!(
        "nats://127.0.0.1:{}?stream_prefix=RM&max_age_days=1",
        server.port
    );
    // Connect once the server listens.
    let t0 = std::time::Instant::now();
    let bus = loop {
        match Bus::connect(&url).await {
            Ok(b) => break b,
            Err(e) if t0.elapsed() < std::time::Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("nats-server on {}: {e}", server.port),
        }
    };
    pages_across_streams(&bus, &[1, 5, 100]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pages_across_streams_exactly_once_in_order() {
    common::start_broker("redis");
    let bus = Bus::connect(&format!(
        "redis://127.0.0.1:6379?key_prefix=rm{}:&max_age_days=1",
        unique()
    ))
    .await
    .unwrap();
    pages_across_streams(&bus, &[1, 5, 100]).await;
}

/// Entries of two streams with the same ids (the same store time) on every page boundary:
/// each comes exactly once, ordered by store time, then stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_same_store_time_across_streams_on_page_boundaries() {
    common::start_broker("redis");
    let prefix = format!("rt{}:", unique());
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    // news and bars each get entries at ms 1000, 1001, 1002 (one each), bars two more at 1002.
    let mut want = Vec::new();
    for ms in 1000..1003 {
        for (stream, topic, n) in [
            (
                "ampy.dev.bars.v1",
                "ampy.dev.bars.v1.XNAS.AAPL",
                if ms == 1002 { 3 } else { 1 },
            ),
            ("ampy.dev.news.v1", "ampy.dev.news.v1.raw", 1),
        ] {
            for seq in 0..n {
                let b = format!("{stream}@{ms}-{seq}");
                let _: String = redis::cmd("XADD")
                    .arg(format!("{prefix}{stream}"))
                    .arg(format!("{ms}-{seq}"))
                    .arg("topic")
                    .arg(topic)
                    .arg("payload")
                    .arg(&b)
                    .arg("partition_key")
                    .arg("k")
                    .query_async(&mut con)
                    .await
                    .unwrap();
                want.push(b);
            }
        }
    }
    let bus = Bus::connect(&format!("redis://127.0.0.1:6379?key_prefix={prefix}"))
        .await
        .unwrap();
    let r = bus.replay().unwrap();
    for limit in [1, 2, 4, want.len()] {
        let mut q = WindowQuery::new(TopicPattern::parse("ampy.dev.>").unwrap());
        q.limit = limit;
        let (got, pages) = by_cursor(r, q.clone()).await;
        assert_eq!(got, want, "cursor, limit {limit}");
        assert_eq!(pages, want.len().div_ceil(limit));
        assert_eq!(
            by_sequence(r, q).await,
            want,
            "after_sequence, limit {limit}"
        );
    }
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{prefix}ampy.dev.bars.v1"))
        .arg(format!("{prefix}ampy.dev.news.v1"))
        .query_async(&mut con)
        .await
        .unwrap();
}

#[cfg(feature = "kafka")]
mod kafka {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::time::Duration;

    fn url(ns: &str) -> String {
        format!(
            "kafka://127.0.0.1:9092?namespace={ns}.&partitions=3&max_age_days=1&batch.num.messages=1"
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_pages_across_partitions_exactly_once_in_order() {
        common::start_broker("kafka");
        let bus = Bus::connect(&url(&format!("rm{}", unique())))
            .await
            .unwrap();
        // Each page reads every partition with a fresh consumer: fewer, larger pages.
        pages_across_streams(&bus, &[2, 7]).await;
    }

    /// Two producers' clocks disagree: partition 0 holds a record stamped 100 ms after one
    /// stamped earlier. Paging by cursor still returns all three, each once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_timestamps_going_backwards_in_a_partition() {
        common::start_broker("kafka");
        let ns = format!("rb{}", unique());
        let bus = Bus::connect(&url(&ns)).await.unwrap();
        // Creates the topic (3 partitions) with one record we leave out of the window.
        let news = Topic::parse("ampy.dev.news.v1.raw").unwrap();
        bus.publish(&news, headers("k"), "first").await.unwrap();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9092")
            .create()
            .unwrap();
        let kt = format!("{ns}.ampy.dev.news.v1");
        let base = chrono::Utc::now().timestamp_millis() + 60_000;
        for (p, ts, b) in [
            (0, base + 100, "late-clock"),
            (0, base + 50, "early-clock"),
            (1, base + 75, "other"),
        ] {
            producer
                .send(
                    FutureRecord::to(&kt)
                        .partition(p)
                        .timestamp(ts)
                        .payload(b)
                        .key("k")
                        .headers(
                            rdkafka::message::OwnedHeaders::new()
                                .insert(rdkafka::message::Header {
                                    key: "topic",
                                    value: Some("ampy.dev.news.v1.raw"),
                                })
                                .insert(rdkafka::message::Header {
                                    key: "partition_key",
                                    value: Some("k"),
                                }),
                        ),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
        let r = bus.replay().unwrap();
        let mut q = WindowQuery::new(TopicPattern::parse("ampy.dev.news.>").unwrap());
        q.start = chrono::DateTime::from_timestamp_millis(base);
        q.limit = 2;
        let (got, pages) = by_cursor(r, q).await;
        // Merged by the heads: `other` (75) before partition 0's `late-clock` (100), whose
        // partition then goes on with `early-clock`.
        assert_eq!(got, ["other", "late-clock", "early-clock"]);
        assert_eq!(pages, 2);
    }
}
