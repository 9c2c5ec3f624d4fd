//! Feed health (issue 18): the partition rule and `sequence` header on publish, producer
//! heartbeats and sequence stamping on the embedded log, the monitor's exact event sequences
//! (state machine and over a subscription, with its metrics and `/stats`), failover with
//! sources that stop, flap and recover, and A/B arbitration through `dedupe_key`. Time is a
//! `ManualClock`: nothing here sleeps to synchronise.

mod common;

use ampybus::runtime::feeds::{
    Clock, FailoverConfig, FailoverEvent, FailoverProducer, FailoverState, FeedConfig, FeedEvent,
    FeedEventKind, FeedMonitor, FeedWatch, Heartbeat, ManualClock, Offered,
};
use ampybus::runtime::{Consumer, Outcome, Producer, SendOutcome, handler_fn};
use ampybus::transport::{StartAt, SubscribeSpec};
use ampybus::{Bus, Env, ErrorKind, Headers, Topic, TopicPattern};
use common::{embedded, stored_envelopes};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HANG: Duration = Duration::from_secs(30);
const TICKS: &str = "ampy.ticks.v1.TradeBatch";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn t(s: &str) -> Topic {
    Topic::parse(s).unwrap()
}

fn clock() -> ManualClock {
    ManualClock::starting_at("2026-03-02T09:30:00Z".parse().unwrap())
}

/// Publishes one message (payload `t`) on the embedded log.
async fn send(bus: &Bus, topic: &Topic, headers: Headers) {
    bus.publish(topic, headers, b"t".to_vec()).await.unwrap();
}

/// A tick message's headers: producer, source, key, optional sequence and run.
fn tick(producer: &str, source: &str, key: &str, seq: Option<u64>, run: &str) -> Headers {
    let mut h = Headers::for_publish(TICKS, producer, source, key);
    h.set("run_id", run);
    if let Some(n) = seq {
        h.set("sequence", n.to_string());
    }
    h
}

/// Events as compact strings: `kind source key [detail]`.
fn brief(events: &[FeedEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let mut s = format!(
                "{} {} {}",
                e.kind.as_str(),
                e.source.as_deref().unwrap_or("-"),
                e.key.as_deref().unwrap_or("-")
            );
            if let Some((a, b)) = e.missing {
                s.push_str(&format!(" missing={a}-{b}"));
            }
            if let Some(d) = e.silent_for {
                s.push_str(&format!(" silent={}ms", d.as_millis()));
            }
            if e.kind == FeedEventKind::Duplicate {
                s.push_str(&format!(" seq={}", e.sequence.unwrap()));
            }
            s
        })
        .collect()
}

// ---------------------------------------------------------------- the contract on publish

#[tokio::test]
async fn publish_checks_the_heartbeat_key_and_the_sequence_header() {
    let (_dir, bus) = embedded().await;
    let hb = t("ampy.dev.ticks.v1.heartbeat.feed-a");
    let h = |key: &str| Headers::for_publish("ampy.metrics.v1.Metric", "md@a", "feed-a", key);
    bus.publish(&hb, h("feed-a"), b"x".to_vec()).await.unwrap();
    let e = bus
        .publish(&hb, h("MSFT.XNAS"), b"x".to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Header);
    assert!(e.to_string().contains("`partition_key`"), "{e}");
    assert!(e.to_string().contains("the source id `feed-a`"), "{e}");
    let trade = t("ampy.dev.ticks.v1.trade.MSFT");
    for bad in ["0", "-1", "1.5", "x", "99999999999999999999"] {
        let e = bus
            .publish(
                &trade,
                tick("md@a", "feed-a", "MSFT.XNAS", None, "r").with("sequence", bad),
                b"x".to_vec(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Header, "{bad}");
        assert!(e.to_string().contains("`sequence`"), "{bad}: {e}");
    }
    send(
        &bus,
        &trade,
        tick("md@a", "feed-a", "MSFT.XNAS", Some(7), "r"),
    )
    .await;
    assert_eq!(stored_envelopes(&bus, "ampy.dev.ticks.>").await.len(), 2);
}

// ---------------------------------------------------------------- producer side

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_stamps_sequence_per_producer_run_and_key() {
    let (_dir, bus) = embedded().await;
    let p = Producer::builder(bus.clone())
        .sequence(true)
        .start()
        .unwrap();
    let trade = t("ampy.dev.ticks.v1.trade.MSFT");
    let sends = [
        ("md@a", "MSFT.XNAS"),
        ("md@a", "AAPL.XNAS"),
        ("md@a", "MSFT.XNAS"),
        ("md@b", "MSFT.XNAS"),
        ("md@a", "MSFT.XNAS"),
        // A sequence the caller set is replaced by the producer's own.
        ("md@a", "AAPL.XNAS"),
    ];
    for (i, (producer, key)) in sends.iter().enumerate() {
        let mut h = tick(producer, "feed", key, None, "run-1");
        if i == 5 {
            h.set("sequence", "41");
        }
        assert_eq!(
            p.send(&trade, h, b"t".to_vec()).await.unwrap(),
            SendOutcome::Queued
        );
    }
    p.close().await.unwrap();
    let got: Vec<(String, String, String)> = stored_envelopes(&bus, "ampy.dev.ticks.>")
        .await
        .iter()
        .map(|e| {
            (
                e.headers.producer().unwrap().to_owned(),
                e.headers.partition_key().unwrap().to_owned(),
                e.headers.get("sequence").unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        ("md@a", "MSFT.XNAS", "1"),
        ("md@a", "AAPL.XNAS", "1"),
        ("md@a", "MSFT.XNAS", "2"),
        ("md@b", "MSFT.XNAS", "1"),
        ("md@a", "MSFT.XNAS", "3"),
        ("md@a", "AAPL.XNAS", "2"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(got, want);
}

/// A message the queue sheds keeps its number: the consumer sees the loss as a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_message_shows_as_a_gap() {
    let (_dir, bus) = embedded().await;
    let p = Producer::builder(bus.clone())
        .capacity(1)
        .sequence(true)
        .best_effort(TopicPattern::parse("ampy.dev.ticks.v1.quote.>").unwrap())
        .start()
        .unwrap();
    let quote = t("ampy.dev.ticks.v1.quote.MSFT");
    p.pause();
    let h = || tick("md@a", "feed-a", "MSFT.XNAS", None, "run-1");
    assert_eq!(
        p.send(&quote, h(), b"q1".to_vec()).await.unwrap(),
        SendOutcome::Queued
    );
    assert_eq!(
        p.send(&quote, h(), b"q2".to_vec()).await.unwrap(),
        SendOutcome::Conflated
    );
    p.resume();
    p.flush().await.unwrap();
    assert_eq!(
        p.send(&quote, h(), b"q3".to_vec()).await.unwrap(),
        SendOutcome::Queued
    );
    p.close().await.unwrap();
    let seqs: Vec<String> = stored_envelopes(&bus, "ampy.dev.ticks.>")
        .await
        .iter()
        .map(|e| e.headers.get("sequence").unwrap().to_owned())
        .collect();
    assert_eq!(seqs, ["2", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_metrics_counting_up_on_the_heartbeat_topic() {
    use prost::Message;
    let (_dir, bus) = embedded().await;
    let pattern = TopicPattern::parse("ampy.dev.ticks.v1.heartbeat.>").unwrap();
    let mut sub = bus
        .subscribe(SubscribeSpec::ephemeral(pattern, StartAt::Earliest))
        .await
        .unwrap();
    let p = Producer::builder(bus.clone())
        .heartbeat(
            Heartbeat::new(Env::Dev, "md@host-1", "feed-a", Duration::from_millis(20)).unwrap(),
        )
        .heartbeat(
            Heartbeat::new(Env::Dev, "md@host-1", "feed-b", Duration::from_secs(3_600)).unwrap(),
        )
        .start()
        .unwrap();
    // Wait for three of feed-a's and feed-b's first (the test waits for messages, not time).
    let (mut seen_a, mut seen_b) = (0, 0);
    tokio::time::timeout(HANG, async {
        while seen_a < 3 || seen_b < 1 {
            for d in sub.fetch(16, Duration::from_millis(200)).await.unwrap() {
                seen_a += usize::from(d.envelope.topic.ends_with("feed-a"));
                seen_b += usize::from(d.envelope.topic.ends_with("feed-b"));
            }
        }
    })
    .await
    .expect("three heartbeats");
    p.close().await.unwrap();
    let all = stored_envelopes(&bus, "ampy.dev.ticks.v1.heartbeat.>").await;
    for source in ["feed-a", "feed-b"] {
        let mine: Vec<_> = all.iter().filter(|e| e.topic.ends_with(source)).collect();
        assert!(!mine.is_empty());
        for (i, e) in mine.iter().enumerate() {
            assert_eq!(e.topic, format!("ampy.dev.ticks.v1.heartbeat.{source}"));
            assert_eq!(e.headers.partition_key(), Some(source));
            assert_eq!(e.headers.source(), Some(source));
            assert_eq!(e.headers.producer(), Some("md@host-1"));
            assert_eq!(e.headers.schema_fqdn(), Some("ampy.metrics.v1.Metric"));
            // Decoded with ampy-proto's own type: wire-identical.
            let m = ampybus_proto::ampy::metrics::v1::Metric::decode(&e.payload[..]).unwrap();
            assert_eq!(m.name, "heartbeat");
            assert_eq!(m.labels.get("source").map(String::as_str), Some(source));
            assert_eq!(m.value, (i + 1) as f64, "{source} #{i}");
            assert!(m.at.is_some());
        }
    }
    // feed-b's interval is an hour: exactly its first heartbeat.
    assert_eq!(
        all.iter().filter(|e| e.topic.ends_with("feed-b")).count(),
        1
    );
    assert!(all.iter().filter(|e| e.topic.ends_with("feed-a")).count() >= 3);
}

// ---------------------------------------------------------------- the monitor as a state machine

/// Observes a message that must cause no event.
fn quiet(m: &mut FeedMonitor, now: ampybus::runtime::feeds::Now, topic: &str, h: &Headers) {
    let ev = m.observe(now, topic, h);
    assert!(ev.is_empty(), "{:?}", brief(&ev));
}

#[test]
fn sources_and_keys_go_stale_and_recover_in_a_fixed_order() {
    let c = clock();
    let mut m = FeedMonitor::new(FeedConfig::new(secs(5)).sequence(false));
    let trade = "ampy.dev.ticks.v1.trade.MSFT";
    let hb = "ampy.dev.ticks.v1.heartbeat.feed-b";
    quiet(
        &mut m,
        c.now(),
        trade,
        &tick("md@a", "feed-a", "MSFT.XNAS", None, "r"),
    );
    quiet(
        &mut m,
        c.now(),
        trade,
        &tick("md@a", "feed-a", "AAPL.XNAS", None, "r"),
    );
    let hb_headers = Headers::for_publish("ampy.metrics.v1.Metric", "md@b", "feed-b", "feed-b");
    quiet(&mut m, c.now(), hb, &hb_headers);
    c.advance(secs(3));
    // feed-b keeps beating; AAPL trades again.
    quiet(&mut m, c.now(), hb, &hb_headers);
    quiet(
        &mut m,
        c.now(),
        trade,
        &tick("md@a", "feed-a", "AAPL.XNAS", None, "r"),
    );
    c.advance(Duration::from_millis(1_999));
    assert!(m.tick(c.now()).is_empty(), "4.999 s is not yet 5 s");
    c.advance(Duration::from_millis(1));
    // Sources (by name), then keys (heartbeats make no key).
    let ev = m.tick(c.now());
    assert_eq!(brief(&ev), ["stale feed-a MSFT.XNAS silent=5000ms"]);
    assert!(m.tick(c.now()).is_empty(), "stale once");
    c.advance(secs(3));
    let ev = m.tick(c.now());
    assert_eq!(
        brief(&ev),
        [
            "stale feed-a - silent=5000ms",
            "stale feed-b - silent=5000ms",
            "stale feed-a AAPL.XNAS silent=5000ms",
        ]
    );
    assert_eq!(ev[0].at.to_rfc3339(), "2026-03-02T09:30:08+00:00");
    assert_eq!(ev[0].topic, trade);
    assert_eq!(ev[1].topic, hb);
    let s = m.stats(c.now());
    assert_eq!(
        (s.sources, s.stale_sources.clone(), s.keys, s.stale_keys),
        (2, vec!["feed-a".to_owned(), "feed-b".to_owned()], 2, 2)
    );
    assert_eq!(s.seconds_since_last["ampy.dev.ticks.v1"], 5.0);
    c.advance(secs(1));
    // MSFT comes back: its source first, then its key; AAPL stays stale.
    let ev = m.observe(
        c.now(),
        trade,
        &tick("md@a", "feed-a", "MSFT.XNAS", None, "r"),
    );
    assert_eq!(
        brief(&ev),
        [
            "recovered feed-a - silent=6000ms",
            "recovered feed-a MSFT.XNAS silent=9000ms",
        ]
    );
    let ev = m.observe(c.now(), hb, &hb_headers);
    assert_eq!(brief(&ev), ["recovered feed-b - silent=6000ms"]);
    let s = m.stats(c.now());
    assert_eq!((s.stale_sources.len(), s.stale_keys), (0, 1));
}

#[test]
fn late_data_makes_its_topic_lag_once_until_a_message_is_on_time_again() {
    let c = clock(); // 2026-03-02T09:30:00Z
    let mut m = FeedMonitor::new(FeedConfig::new(secs(60)).sequence(false));
    let at = |produced: &str, key: &str| {
        let mut h = tick("md@a", "feed-a", key, None, "r");
        h.set("produced_at", produced);
        h
    };
    let lag = |ev: &[FeedEvent]| -> Vec<String> {
        ev.iter()
            .map(|e| {
                format!(
                    "{} {} {} {}ms",
                    e.kind.as_str(),
                    e.topic,
                    e.key.as_deref().unwrap_or("-"),
                    e.lag.map_or(0, |d| d.as_millis())
                )
            })
            .collect()
    };
    let trade = "ampy.dev.ticks.v1.trade.MSFT";
    // 29.5 s late: under the default 30 s.
    quiet(
        &mut m,
        c.now(),
        trade,
        &at("2026-03-02T09:29:30.500000Z", "MSFT.XNAS"),
    );
    // 31 s late: the topic lags.
    let ev = m.observe(
        c.now(),
        trade,
        &at("2026-03-02T09:29:29.000000Z", "MSFT.XNAS"),
    );
    assert_eq!(
        lag(&ev),
        ["lag ampy.dev.ticks.v1.trade.MSFT MSFT.XNAS 31000ms"]
    );
    assert_eq!(ev[0].to_json()["lag_ms"], 31000);
    assert_eq!(ev[0].to_json()["event"], "lag");
    // Still late, another symbol of the same domain-level topic: no second event.
    quiet(
        &mut m,
        c.now(),
        "ampy.dev.ticks.v1.trade.AAPL",
        &at("2026-03-02T09:29:00.000000Z", "AAPL.XNAS"),
    );
    // On time again.
    c.advance(secs(1));
    let ev = m.observe(
        c.now(),
        trade,
        &at("2026-03-02T09:30:00.750000Z", "MSFT.XNAS"),
    );
    assert_eq!(
        lag(&ev),
        ["lag_recovered ampy.dev.ticks.v1.trade.MSFT MSFT.XNAS 250ms"]
    );
    // Checking off: nothing, however late.
    let mut off = FeedMonitor::new(FeedConfig::new(secs(60)).sequence(false).lag_after(None));
    quiet(
        &mut off,
        c.now(),
        trade,
        &at("2026-03-01T09:30:00.000000Z", "MSFT.XNAS"),
    );
}

#[test]
fn key_tracking_can_be_off() {
    let c = clock();
    let mut m = FeedMonitor::new(FeedConfig::new(secs(1)).key_stale_after(None));
    m.observe(
        c.now(),
        "ampy.dev.bars.v1.XNAS.MSFT",
        &tick("b@1", "bars", "XNAS.MSFT", None, "r"),
    );
    c.advance(secs(1));
    assert_eq!(brief(&m.tick(c.now())), ["stale bars - silent=1000ms"]);
    assert_eq!(m.stats(c.now()).keys, 0);
}

#[test]
fn gaps_and_duplicates_per_producer_run_and_key() {
    let c = clock();
    let mut m = FeedMonitor::new(FeedConfig::new(secs(60)));
    let trade = "ampy.dev.ticks.v1.trade.MSFT";
    let mut feed = |producer: &str, key: &str, seq: u64, run: &str| {
        brief(&m.observe(
            c.now(),
            trade,
            &tick(producer, "feed-a", key, Some(seq), run),
        ))
    };
    // The first message seen sets the baseline, whatever its number.
    assert!(feed("md@a", "MSFT.XNAS", 5, "r1").is_empty());
    assert!(feed("md@a", "MSFT.XNAS", 6, "r1").is_empty());
    assert_eq!(
        feed("md@a", "MSFT.XNAS", 9, "r1"),
        ["gap feed-a MSFT.XNAS missing=7-8"]
    );
    assert_eq!(
        feed("md@a", "MSFT.XNAS", 9, "r1"),
        ["duplicate feed-a MSFT.XNAS seq=9"]
    );
    assert_eq!(
        feed("md@a", "MSFT.XNAS", 4, "r1"),
        ["duplicate feed-a MSFT.XNAS seq=4"]
    );
    assert!(feed("md@a", "MSFT.XNAS", 10, "r1").is_empty());
    // Another key and another producer have numbers of their own.
    assert!(feed("md@a", "AAPL.XNAS", 1, "r1").is_empty());
    assert!(feed("md@b", "MSFT.XNAS", 1, "r9").is_empty());
    assert_eq!(
        feed("md@a", "AAPL.XNAS", 3, "r1"),
        ["gap feed-a AAPL.XNAS missing=2-2"]
    );
    // A new run numbers from 1 again: a new baseline, no event.
    assert!(feed("md@a", "MSFT.XNAS", 1, "r2").is_empty());
    assert!(feed("md@a", "MSFT.XNAS", 2, "r2").is_empty());
    // A replayed message is not checked; a malformed number is counted, not checked.
    let replayed = tick("md@a", "feed-a", "MSFT.XNAS", Some(1), "r2")
        .with("replay_request_id", "0190b6c2-7a5e-7c3a-9a52-1d2e3f405162");
    assert!(m.observe(c.now(), trade, &replayed).is_empty());
    let bad = tick("md@a", "feed-a", "MSFT.XNAS", None, "r2").with("sequence", "0");
    assert!(m.observe(c.now(), trade, &bad).is_empty());
    let s = m.stats(c.now());
    assert_eq!(
        (s.gaps, s.missing, s.duplicates, s.bad_sequence),
        (2, 3, 2, 1)
    );
    let e = &m.observe(
        c.now(),
        trade,
        &tick("md@a", "feed-a", "MSFT.XNAS", Some(4), "r2"),
    )[0];
    assert_eq!(
        e.to_json(),
        serde_json::json!({
            "event": "gap", "topic": trade, "key": "MSFT.XNAS", "source": "feed-a",
            "at": "2026-03-02T09:30:00.000000Z", "producer": "md@a", "run_id": "r2",
            "first_missing": 3, "last_missing": 3, "sequence": 4,
        })
    );
}

// ---------------------------------------------------------------- the monitor over a subscription

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// Waits (bounded) until `cond` holds on the watch's stats.
async fn until(watch: &FeedWatch, cond: impl Fn(&ampybus::runtime::feeds::FeedStats) -> bool) {
    tokio::time::timeout(HANG, async {
        while !cond(&watch.stats()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the watch saw the messages");
}

async fn next_events(watch: &mut FeedWatch, n: usize) -> Vec<FeedEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(
            tokio::time::timeout(HANG, watch.next())
                .await
                .expect("an event")
                .unwrap(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_reports_new_messages_only_with_metrics_and_stats() {
    let (_dir, bus) = embedded().await;
    let trade = t("ampy.dev.ticks.v1.trade.MSFT");
    let hb = t("ampy.dev.ticks.v1.heartbeat.feed-b");
    // Before the watch: never seen, never stale.
    send(
        &bus,
        &trade,
        tick("md@old", "feed-old", "OLD.XNAS", Some(1), "r0"),
    )
    .await;
    let c = clock();
    let mut watch = FeedWatch::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.ticks.>").unwrap(),
        FeedConfig::new(secs(5)),
    )
    .clock(c.clone())
    .check_every(Duration::from_millis(5))
    .name("md-health")
    .start()
    .await
    .unwrap();
    let server = ampybus::ops::serve(&bus, "127.0.0.1:0").await.unwrap();
    for seq in [1, 2, 5] {
        send(
            &bus,
            &trade,
            tick("md@a", "feed-a", "MSFT.XNAS", Some(seq), "r1"),
        )
        .await;
    }
    send(
        &bus,
        &hb,
        Headers::for_publish("ampy.metrics.v1.Metric", "md@b", "feed-b", "feed-b"),
    )
    .await;
    until(&watch, |s| s.sources == 2).await;
    assert_eq!(
        brief(&next_events(&mut watch, 1).await),
        ["gap feed-a MSFT.XNAS missing=3-4"]
    );
    c.advance(secs(5));
    let ev = next_events(&mut watch, 3).await;
    assert_eq!(
        brief(&ev),
        [
            "stale feed-a - silent=5000ms",
            "stale feed-b - silent=5000ms",
            "stale feed-a MSFT.XNAS silent=5000ms",
        ]
    );
    assert_eq!(crate_at(&ev[0]), "2026-03-02T09:30:05.000000Z");
    send(
        &bus,
        &trade,
        tick("md@a", "feed-a", "MSFT.XNAS", Some(6), "r1"),
    )
    .await;
    let ev = next_events(&mut watch, 2).await;
    assert_eq!(
        brief(&ev),
        [
            "recovered feed-a - silent=5000ms",
            "recovered feed-a MSFT.XNAS silent=5000ms"
        ]
    );
    // Metrics: one source still stale, one gap, seconds since the last message per topic.
    let text = bus.metrics().encode();
    assert!(text.contains("bus_stale_sources 1\n"), "{text}");
    assert!(
        text.contains("bus_gap_total{topic=\"ampy.dev.ticks.v1\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("bus_seconds_since_last{topic=\"ampy.dev.ticks.v1\"}"),
        "{text}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&http_get(server.local_addr(), "/stats").await).unwrap();
    let f = &stats["feeds"][0];
    assert_eq!(f["name"], "md-health");
    assert_eq!(f["pattern"], "ampy.dev.ticks.>");
    assert_eq!(f["stale_sources"], serde_json::json!(["feed-b"]));
    assert_eq!(
        (
            f["sources"].as_u64(),
            f["keys"].as_u64(),
            f["gaps"].as_u64(),
            f["missing"].as_u64()
        ),
        (Some(2), Some(1), Some(1), Some(2))
    );
    let end = watch.stop().await.unwrap();
    assert_eq!(
        end.sources, 2,
        "the message published before the watch was not seen"
    );
    // A stopped monitor's stale sources are no longer counted.
    assert!(bus.metrics().encode().contains("bus_stale_sources 0\n"));
    server.shutdown().await;
}

fn crate_at(e: &FeedEvent) -> String {
    ampybus::ids::format_time(e.at)
}

// ---------------------------------------------------------------- failover

fn fo_brief(e: &FailoverEvent) -> String {
    format!("{}->{} {} #{}", e.from, e.to, e.reason.as_str(), e.switches)
}

#[test]
fn failover_switches_on_silence_and_back_after_a_steady_primary() {
    let c = clock();
    let cfg = FailoverConfig::new(secs(2)).recover_after(secs(10));
    let mut s = FailoverState::new(&["a", "b", "c"], cfg, c.now()).unwrap();
    let mut log = Vec::new();
    let mut step = |s: &mut FailoverState, what: &str, advance: u64| {
        c.advance(secs(advance));
        let e = match what {
            "tick" => s.tick(c.now()),
            w if w.starts_with("fail:") => s.on_failure(&w[5..], c.now()).unwrap(),
            w => s.on_data(w, c.now()).unwrap(),
        };
        if let Some(e) = e {
            log.push(fo_brief(&e));
        }
        s.active().to_owned()
    };
    // Both feeds flow.
    assert_eq!(step(&mut s, "a", 1), "a");
    assert_eq!(step(&mut s, "b", 0), "a");
    assert_eq!(step(&mut s, "c", 0), "a");
    // a stops; b and c go on.
    assert_eq!(step(&mut s, "b", 1), "a");
    assert_eq!(step(&mut s, "c", 0), "a");
    assert_eq!(step(&mut s, "tick", 1), "b", "a silent for 2 s");
    // a flaps: one message, then silent again before 10 s — no switch back.
    assert_eq!(step(&mut s, "b", 1), "b");
    assert_eq!(step(&mut s, "a", 0), "b");
    assert_eq!(step(&mut s, "b", 1), "b");
    assert_eq!(step(&mut s, "b", 1), "b");
    assert_eq!(step(&mut s, "tick", 0), "b");
    assert!(!s.is_healthy("a", c.now()));
    // a recovers for good at t; b and c keep flowing; a is active again at t + 10 s.
    let mut active = Vec::new();
    for _ in 0..=10 {
        active.push(step(&mut s, "a", 1));
        step(&mut s, "b", 0);
    }
    assert_eq!(active[..10], ["b"; 10]);
    assert_eq!(active[10], "a");
    assert_eq!(log, ["a->b silent #1", "b->a primary_recovered #2"]);
    assert_eq!(s.switches(), 2);
}

#[test]
fn failover_on_failures_skips_unhealthy_standbys_and_stays_when_none_is_healthy() {
    let c = clock();
    let cfg = FailoverConfig::new(secs(5))
        .max_failures(2)
        .recover_after(secs(3));
    let mut s = FailoverState::new(&["a", "b", "c"], cfg, c.now()).unwrap();
    let mut log = Vec::new();
    let mut note = |e: Option<FailoverEvent>| {
        if let Some(e) = e {
            log.push(fo_brief(&e));
        }
    };
    note(s.on_data("a", c.now()).unwrap());
    note(s.on_data("c", c.now()).unwrap());
    note(s.on_failure("b", c.now()).unwrap());
    note(s.on_failure("b", c.now()).unwrap()); // b unhealthy (2 failures)
    note(s.on_failure("a", c.now()).unwrap());
    assert_eq!(s.active(), "a", "one failure is not enough");
    note(s.on_failure("a", c.now()).unwrap());
    assert_eq!(s.active(), "c", "b is unhealthy too: c");
    // Everything goes silent: c stays active (nothing better), no switch.
    c.advance(secs(6));
    note(s.tick(c.now()));
    assert_eq!(s.active(), "c");
    // a comes back (data resets its failures) and stays 3 s.
    note(s.on_data("a", c.now()).unwrap());
    // c is silent: a is the only healthy source, so it takes over at once (silent).
    assert_eq!(s.active(), "a");
    assert_eq!(log, ["a->c failing #1", "c->a silent #2"]);
    // Unknown sources and bad configurations are Config errors.
    assert_eq!(
        s.on_data("zz", c.now()).unwrap_err().kind(),
        ErrorKind::Config
    );
    assert_eq!(
        FailoverState::new(&["a"], cfg, c.now()).unwrap_err().kind(),
        ErrorKind::Config
    );
    assert_eq!(
        FailoverState::new(&["a", "a"], cfg, c.now())
            .unwrap_err()
            .kind(),
        ErrorKind::Config
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_producer_publishes_the_active_source_only() {
    let (_dir, bus) = embedded().await;
    let c = clock();
    let p = Producer::builder(bus.clone())
        .sequence(true)
        .start()
        .unwrap();
    let fo = FailoverProducer::with_clock(
        p,
        "md",
        &["feed-a", "feed-b"],
        FailoverConfig::new(secs(2)).recover_after(secs(4)),
        c.clone(),
        None,
    )
    .unwrap();
    let trade = t("ampy.dev.ticks.v1.trade.MSFT");
    let h = || Headers::for_publish(TICKS, "md", "md", "MSFT.XNAS");
    let mut offered = Vec::new();
    // Each second both feeds deliver the same tick n; feed-a is silent for n in 3..=5.
    for n in 1..=12u32 {
        c.advance(secs(1));
        fo.tick();
        for src in ["feed-a", "feed-b"] {
            if src == "feed-a" && (3..=5).contains(&n) {
                continue;
            }
            let r = fo
                .offer(src, &trade, h(), format!("{src}:{n}").into_bytes())
                .await
                .unwrap();
            offered.push((n, src, matches!(r, Offered::Sent(SendOutcome::Queued))));
        }
    }
    assert_eq!(fo.switches(), 2);
    let mut events = Vec::new();
    while let Some(e) = fo.try_next_event() {
        events.push(fo_brief(&e));
    }
    assert_eq!(
        events,
        [
            "feed-a->feed-b silent #1",
            "feed-b->feed-a primary_recovered #2"
        ]
    );
    let text = bus.metrics().encode();
    for reason in ["silent", "primary_recovered"] {
        let line = format!("bus_failover_switches_total{{service=\"md\",reason=\"{reason}\"}} 1\n");
        assert!(text.contains(&line), "{line} in {text}");
    }
    // Errors: an unknown source.
    assert_eq!(
        fo.offer("feed-z", &trade, h(), b"x".to_vec())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Config
    );
    fo.close().await.unwrap();
    let got: Vec<String> = stored_envelopes(&bus, "ampy.dev.ticks.>")
        .await
        .iter()
        .map(|e| {
            assert_eq!(
                e.headers.producer().unwrap(),
                format!("md@{}", e.headers.source().unwrap())
            );
            String::from_utf8(e.payload.to_vec()).unwrap()
        })
        .collect();
    // a is silent from t=3 (tick 3 is lost: b is still standby); at t=4 (2 s without data)
    // the tick switches to b; a is back at t=6 and has been healthy for 4 s at t=10.
    let want: Vec<String> = (1..=12)
        .filter(|n| *n != 3)
        .map(|n| match n {
            1..=2 => format!("feed-a:{n}"),
            4..=9 => format!("feed-b:{n}"),
            _ => format!("feed-a:{n}"),
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(offered.iter().filter(|o| o.2).count(), 11);
}

// ---------------------------------------------------------------- A/B arbitration

/// Two feeds of the same data, first copy wins: both publish with `dedupe_key` = the
/// exchange's own trade id, the consumer's dedupe store applies each trade once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_arbitration_through_dedupe_key_applies_each_trade_once() {
    let (_dir, bus) = embedded().await;
    let trade = t("ampy.dev.ticks.v1.trade.MSFT");
    // Feed A misses trades 4 and 7, feed B misses 2; both carry the rest.
    for (feed, ids) in [
        ("feed-a", vec![1, 2, 3, 5, 6, 8]),
        ("feed-b", vec![1, 3, 4, 5, 6, 7, 8]),
    ] {
        for id in ids {
            let h = Headers::for_publish(TICKS, &format!("md@{feed}"), feed, "MSFT.XNAS")
                .with("dedupe_key", format!("XNAS:MSFT:{id}"));
            bus.publish(&trade, h, format!("{feed}:{id}").into_bytes())
                .await
                .unwrap();
        }
    }
    let applied: Arc<Mutex<Vec<String>>> = Arc::default();
    let a2 = applied.clone();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.ticks.>").unwrap(),
        "features",
    )
    .handler(handler_fn(move |msg| {
        let a2 = a2.clone();
        let done_tx = done_tx.clone();
        async move {
            a2.lock()
                .unwrap()
                .push(String::from_utf8(msg.payload.to_vec()).unwrap());
            let _ = done_tx.send(());
            Outcome::Ok
        }
    }))
    .start()
    .await
    .unwrap();
    for _ in 0..8 {
        tokio::time::timeout(HANG, done_rx.recv()).await.unwrap();
    }
    tokio::time::timeout(HANG, async {
        while handle.stats().skipped_duplicates < 5 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    let stats = handle.shutdown(secs(5)).await;
    assert_eq!((stats.handled_ok, stats.skipped_duplicates), (8, 5));
    let got = applied.lock().unwrap().clone();
    assert_eq!(
        got,
        [
            "feed-a:1", "feed-a:2", "feed-a:3", "feed-a:5", "feed-a:6", "feed-a:8", "feed-b:4",
            "feed-b:7"
        ]
    );
}
