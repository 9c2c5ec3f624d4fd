//! Nothing lost by an operator (issue 14), the core's part: retention options that cannot wipe
//! a log by surprise and that only a publishing handle applies, damaged records and I/O failures
//! named with the file (and byte offset), URL forms that mean one thing, and the payload, header and pattern
//! limits enforced on publish.

use ampybus::codec::{DEFAULT_MAX_INFLATED, PayloadCodec};
use ampybus::headers::{MAX_HEADER_VALUE_BYTES, MAX_HEADERS_BYTES};
use ampybus::runtime::build_dlq_envelope;
use ampybus::transport::embedded::{DomainRetention, EmbeddedLog, EmbeddedOptions, SyncLevel};
use ampybus::transport::{ReplayByTime, StartAt, SubscribeSpec, Transport, WindowQuery};
use ampybus::{Bus, Domain, Envelope, ErrorKind, Headers, Topic, TopicPattern};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

const NEWS: &str = "ampy.dev.news.v1.ops";

fn news_env(i: usize) -> Envelope {
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "ops@1", "ops", "n-1");
    Envelope::new(
        &Topic::parse(NEWS).unwrap(),
        h,
        format!("news:{i:04}").into_bytes(),
    )
}

fn opts(dir: &Path) -> EmbeddedOptions {
    let mut o = EmbeddedOptions::new(dir);
    o.sync = SyncLevel::Normal;
    o
}

async fn count(log: &EmbeddedLog) -> u64 {
    log.stats().await.unwrap().0
}

/// Payload strings of every stored news message, in log order.
async fn stored_payloads(log: &EmbeddedLog) -> Vec<String> {
    let mut q = WindowQuery::new(TopicPattern::parse(">").unwrap());
    q.limit = 10_000;
    log.read_window(&q)
        .await
        .unwrap()
        .iter()
        .map(|m| String::from_utf8(m.envelope.payload.to_vec()).unwrap())
        .collect()
}

#[test]
fn a_retention_of_zero_is_refused_and_unlimited_keeps_forever() {
    for option in [
        "retention_days",
        "retention.bars.days",
        "retention.bars.max_mb",
    ] {
        let e = EmbeddedOptions::from_url(&format!("file:///tmp/x?{option}=0")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("url option `{option}`: 0 is refused")),
            "{text}"
        );
        assert!(text.contains(&format!("`{option}=unlimited`")), "{text}");
    }
    let e = EmbeddedOptions::from_url("file:///tmp/x?retention_days=-1").unwrap_err();
    assert!(e.to_string().contains("or `unlimited`"), "{e}");
    let e = EmbeddedOptions::from_url("file:///tmp/x?retention_days=9999999").unwrap_err();
    assert!(e.to_string().contains("more than 365000"), "{e}");

    let o = EmbeddedOptions::from_url("file:///tmp/x?retention_days=unlimited").unwrap();
    for d in Domain::ALL {
        assert_eq!(o.retention_for(*d).max_age, None, "{d:?}");
    }
    let o = EmbeddedOptions::from_url(
        "file:///tmp/x?retention.bars.days=unlimited&retention.ticks.max_mb=unlimited&retention.fills.max_mb=2",
    )
    .unwrap();
    assert_eq!(o.retention_for(Domain::Bars), DomainRetention::UNLIMITED);
    assert_eq!(o.retention_for(Domain::Ticks), DomainRetention::days(7));
    assert_eq!(
        o.retention_for(Domain::Fills).max_bytes,
        Some(2 * 1024 * 1024)
    );
    assert_eq!(o.retention_for(Domain::News), DomainRetention::days(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_handle_never_deletes_and_the_first_publish_starts_retention() {
    let dir = tempfile::tempdir().unwrap();
    // A writer without a size cap stores 10 messages of one size.
    let writer = EmbeddedLog::open(opts(dir.path())).unwrap();
    writer
        .publish_batch((0..10).map(news_env).collect())
        .await
        .unwrap();
    let stats = writer
        .topic_stats(&TopicPattern::parse(">").unwrap())
        .await
        .unwrap();
    let row = stats[0].bytes.unwrap() / stats[0].messages;
    assert_eq!(stats[0].bytes.unwrap(), 10 * row, "rows of one size");
    writer.close().await.unwrap();

    // A handle whose news retention holds 5 rows and runs every 20 ms reads, follows a durable
    // consumer and acks: it never publishes, so nothing is deleted.
    let mut o = opts(dir.path());
    o.retention.insert(
        Domain::News,
        DomainRetention {
            max_age: None,
            max_bytes: Some(5 * row),
        },
    );
    o.retention_interval = Duration::from_millis(20);
    let reader = EmbeddedLog::open(o).unwrap();
    assert_eq!(count(&reader).await, 10);
    let mut sub = reader
        .subscribe(SubscribeSpec::durable(
            TopicPattern::parse("ampy.dev.news.>").unwrap(),
            "audit",
        ))
        .await
        .unwrap();
    let got = sub.fetch(100, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), 10);
    for d in got {
        d.ack().await.map_err(|(e, _)| e).unwrap();
    }
    let mut eph = reader
        .subscribe(SubscribeSpec::ephemeral(
            TopicPattern::parse(">").unwrap(),
            StartAt::Earliest,
        ))
        .await
        .unwrap();
    assert_eq!(
        eph.fetch(100, Duration::from_secs(10)).await.unwrap().len(),
        10
    );
    // No event marks "retention did not run": give it 15 of its intervals to prove it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&reader).await, 10);

    // The first publish on the handle starts retention: the 6 oldest go, the newest 5 stay.
    reader.publish_batch(vec![news_env(10)]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(&reader).await != 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention did not run after the first publish: {} stored",
            count(&reader).await
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        stored_payloads(&reader).await,
        [
            "news:0006",
            "news:0007",
            "news:0008",
            "news:0009",
            "news:0010"
        ]
    );
    reader.close().await.unwrap();
}

/// Damages the stored bytes of the `nth` record (1-based) of `domain`'s only segment: 4 bytes
/// in the middle of its frame (flipped: a second call with the same arguments restores them).
/// Returns the segment and the byte offset of the frame.
fn damage_record(data: &Path, domain: &str, nth: usize) -> (PathBuf, u64) {
    let seg = common::only_segment(data, domain);
    let rec = common::frames(&seg, common::SEG_HEADER)
        .into_iter()
        .filter(|f| f.kind == common::KIND_RECORD)
        .nth(nth - 1)
        .unwrap();
    common::flip_bytes(&seg, rec.offset + rec.len / 2, 4);
    (seg, rec.offset)
}

/// The error every read path gives for a record damaged at `offset` of `seg`.
fn damage_error(seg: &Path, offset: u64) -> String {
    format!(
        "transport error: embedded log {}: damaged at byte {offset}: checksum mismatch; the messages from there on cannot be read (restore the file, or move it away to accept the loss)",
        seg.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_named_on_every_read_path_and_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(opts(dir.path())).unwrap();
    log.publish_batch((0..5).map(news_env).collect())
        .await
        .unwrap();
    let dlq = Topic::parse("ampy.dev.dlq.v1.news").unwrap();
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "ops@1", "ops", "k");
    let r = log
        .publish_batch(vec![Envelope::new(&dlq, h, b"x".to_vec())])
        .await
        .unwrap();
    assert_eq!(r[0].sequence, 6);
    // Record 3 of the news log (sequence 3): its checksum no longer matches.
    let (seg, offset) = damage_record(dir.path(), "news", 3);
    let want = damage_error(&seg, offset);
    let named = |e: &ampybus::Error| {
        assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
        assert_eq!(e.to_string(), want);
    };
    let payloads = |ds: &[ampybus::transport::Delivery]| -> Vec<String> {
        ds.iter()
            .map(|d| {
                assert!(d.envelope.headers.message_id().is_some());
                String::from_utf8(d.envelope.payload.to_vec()).unwrap()
            })
            .collect()
    };

    // Ephemeral read: the records before it, then the error, again on every later fetch.
    let pattern = TopicPattern::parse("ampy.dev.news.>").unwrap();
    let mut eph = log
        .subscribe(SubscribeSpec::ephemeral(pattern.clone(), StartAt::Earliest))
        .await
        .unwrap();
    let first = eph.fetch(100, Duration::from_secs(5)).await.unwrap();
    assert_eq!(payloads(&first), ["news:0000", "news:0001"]);
    named(&eph.fetch(100, Duration::from_secs(5)).await.unwrap_err());
    named(&eph.fetch(100, Duration::from_secs(5)).await.unwrap_err());

    // Durable: the same; the damaged record and those after it are never handed out.
    let mut dur = log
        .subscribe(SubscribeSpec::durable(pattern.clone(), "audit"))
        .await
        .unwrap();
    let first = dur.fetch(100, Duration::from_secs(5)).await.unwrap();
    assert_eq!(payloads(&first), ["news:0000", "news:0001"]);
    for d in first {
        d.ack().await.map_err(|(e, _)| e).unwrap();
    }
    named(&dur.fetch(100, Duration::from_secs(5)).await.unwrap_err());
    named(&dur.fetch(100, Duration::from_secs(5)).await.unwrap_err());
    // Lag is a scan of the log too.
    named(&log.consumer_stats().await.unwrap_err());

    // Window reads (replay, `sub --since`, `dlq inspect`): a read that reaches the damaged
    // record fails, also one that starts after it (the records after it are reached only
    // through it); one that stops before it, or reads another domain, is unaffected.
    let mut q = WindowQuery::new(pattern.clone());
    named(&log.read_window(&q).await.unwrap_err());
    q.after_sequence = 3;
    named(&log.read_window(&q).await.unwrap_err());
    let mut q = WindowQuery::new(pattern.clone());
    q.limit = 2;
    assert_eq!(log.read_window(&q).await.unwrap().len(), 2);
    let dlq_pattern = TopicPattern::parse("ampy.*.dlq.v1.>").unwrap();
    let q = WindowQuery::new(dlq_pattern.clone());
    assert_eq!(log.read_window(&q).await.unwrap().len(), 1);

    // Purge refuses (and deletes nothing) when a selected DLQ record is damaged.
    let (dlq_seg, dlq_offset) = damage_record(dir.path(), "dlq", 1);
    let e = log.purge(&dlq_pattern, |_| true).await.unwrap_err();
    assert_eq!(e.to_string(), damage_error(&dlq_seg, dlq_offset));
    // With both records restored, all 6 messages are there: nothing was lost or purged.
    damage_record(dir.path(), "news", 3);
    damage_record(dir.path(), "dlq", 1);
    assert_eq!(count(&log).await, 6);
    assert_eq!(
        stored_payloads(&log).await,
        [
            "news:0000",
            "news:0001",
            "news:0002",
            "news:0003",
            "news:0004",
            "x"
        ]
    );
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_errors_name_the_path() {
    // The news log's directory replaced by a file: a real I/O failure (ENOTDIR) whatever
    // the permissions of the user running the tests.
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(opts(dir.path())).unwrap();
    log.publish_batch(vec![news_env(0)]).await.unwrap();
    log.close().await.unwrap();
    let news = dir.path().join("log").join("news");
    let seg = common::only_segment(dir.path(), "news");
    let moved = dir.path().join("news.away");
    std::fs::rename(&news, &moved).unwrap();
    std::fs::write(&news, b"not a directory").unwrap();
    let log = EmbeddedLog::open(opts(dir.path())).unwrap();
    let e = log.publish_batch(vec![news_env(1)]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert_eq!(
        e.to_string(),
        format!(
            "transport error: embedded log {}: opening a segment: Not a directory (os error 20)",
            seg.display()
        )
    );
    let e = log.stats().await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "transport error: embedded log {}: listing segments: Not a directory (os error 20)",
            news.display()
        )
    );
    // Other domains are unaffected.
    let dlq = Topic::parse("ampy.dev.dlq.v1.news").unwrap();
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "ops@1", "ops", "k");
    log.publish_batch(vec![Envelope::new(&dlq, h, b"x".to_vec())])
        .await
        .unwrap();
    // The directory back: the first message is there, the failed one was never stored.
    std::fs::remove_file(&news).unwrap();
    std::fs::rename(&moved, &news).unwrap();
    assert_eq!(stored_payloads(&log).await, ["news:0000", "x"]);
    log.close().await.unwrap();

    // A segment whose file header is overwritten: opening it names the file and byte 0.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[..8].fill(0xff);
    std::fs::write(&seg, &bytes).unwrap();
    let log = EmbeddedLog::open(opts(dir.path())).unwrap();
    let e = log.stats().await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "transport error: embedded log {}: damaged at byte 0: segment header does not match its name; the messages from there on cannot be read (restore the file, or move it away to accept the loss)",
            seg.display()
        )
    );
    log.close().await.unwrap();
}

#[test]
fn embedded_urls_mean_one_thing() {
    for (url, want) in [
        (
            "file:///",
            "the data directory would be the filesystem root `/`",
        ),
        (
            "file:////",
            "the data directory would be the filesystem root `/`",
        ),
        ("/", "the data directory would be the filesystem root `/`"),
        ("file://host/x", "`file://host/…` names a host (\"host\")"),
        (
            "file://localhost/x",
            "`file://localhost/…` names a host (\"localhost\")",
        ),
        ("file://", "the data directory path is empty"),
    ] {
        let e = EmbeddedOptions::from_url(url).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{url}");
        let t = e.to_string();
        assert!(t.contains(&format!("url {url:?}: {want}")), "{url}: {t}");
        assert!(
            t.ends_with(
                "accepted forms: /abs/dir, ./rel/dir, file:///abs/dir?options, file:rel/dir?options"
            ),
            "{url}: {t}"
        );
    }
    for (url, dir) in [
        ("file:///var/lib/ampy", "/var/lib/ampy"),
        ("file:///var/lib/ampy?sync=normal", "/var/lib/ampy"),
        ("file:rel/dir", "rel/dir"),
        ("./rel/dir", "./rel/dir"),
        ("/abs/dir", "/abs/dir"),
    ] {
        assert_eq!(
            EmbeddedOptions::from_url(url).unwrap().dir,
            Path::new(dir),
            "{url}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_over_the_consumer_limit_are_refused_on_publish() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(&format!("file://{}?sync=normal", dir.path().display()))
        .await
        .unwrap();
    let topic = Topic::parse(NEWS).unwrap();
    let h = || Headers::for_publish("ampy.raw.v1.Bytes", "ops@1", "ops", "n-1");
    let e = bus
        .publish(&topic, h(), vec![0u8; DEFAULT_MAX_INFLATED + 1])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Payload);
    assert!(
        e.to_string().contains(
            "payload is 67108865 bytes, over the limit of 67108864 bytes (64 MiB) that consumers accept"
        ),
        "{e}"
    );

    // The boundary, with a small limit: at the limit accepted, one byte over refused; the wire
    // form (`pub --json-envelope`, redrive) is held to it as carried, except a DLQ copy.
    let small = bus.clone().with_codec(PayloadCodec {
        max_inflated: 100,
        ..PayloadCodec::default()
    });
    small.publish(&topic, h(), vec![1u8; 100]).await.unwrap();
    let e = small
        .publish(&topic, h(), vec![1u8; 101])
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("payload is 101 bytes, over the limit of 100 bytes"),
        "{e}"
    );
    let mut wire = h();
    wire.fill_publish_defaults();
    let env = Envelope::new(&topic, wire, vec![2u8; 101]);
    let e = small.publish_wire(vec![env.clone()]).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("message 0: payload as carried is 101 bytes, over the limit of 100 bytes"),
        "{e}"
    );
    let dlq = build_dlq_envelope(&env, &topic.dlq_topic(), "payload_too_large: big", 1, "c");
    small.publish_wire(vec![dlq]).await.unwrap();
    assert_eq!(
        bus.replay()
            .unwrap()
            .read_window(&WindowQuery::new(TopicPattern::parse(">").unwrap()))
            .await
            .unwrap()
            .len(),
        2
    );
    bus.close().await.unwrap();
}

#[test]
fn header_values_are_capped_each_and_in_all() {
    let topic = Topic::parse(NEWS).unwrap();
    let base = || {
        let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "ops@1", "ops", "n-1");
        h.fill_publish_defaults();
        h
    };
    let h = base().with("x_note", "a".repeat(MAX_HEADER_VALUE_BYTES));
    h.validate_for_publish(&topic).unwrap();
    let h = base().with("x_note", "a".repeat(MAX_HEADER_VALUE_BYTES + 1));
    let e = h.validate_for_publish(&topic).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Header);
    assert_eq!(
        e.to_string(),
        "invalid header: `x_note`: value is 65537 bytes, over the limit of 65536 bytes (64 KiB) per header value"
    );

    // Five values of 60 KiB: each allowed, together over 256 KiB; the largest is named.
    let mut h = base();
    for i in 0..4 {
        h.set(format!("x_part{i}"), "b".repeat(60 * 1024));
    }
    h.validate_for_publish(&topic).unwrap();
    h.set("x_part4", "b".repeat(60 * 1024 + 7));
    let e = h.validate_for_publish(&topic).unwrap_err();
    let t = e.to_string();
    assert!(
        t.starts_with("invalid header: `x_part4`: the headers are "),
        "{t}"
    );
    assert!(
        t.contains(&format!("over the limit of {MAX_HEADERS_BYTES} bytes (256 KiB); this is the largest (61454 bytes)")),
        "{t}"
    );

    // A dead-lettered copy of a message carrying an oversized header still validates (the
    // header is dropped), and a very long reason is cut.
    let env = Envelope::new(&topic, h, b"p".to_vec());
    let reason = ampybus::DlqCode::HandlerError.reason(&"r".repeat(200_000));
    let dlq = build_dlq_envelope(&env, &topic.dlq_topic(), &reason, 1, "c");
    dlq.validate_for_publish().unwrap();
    assert!(
        dlq.headers
            .get("dlq_reason")
            .unwrap()
            .starts_with("handler_error: rrr")
    );
}

#[test]
fn patterns_that_can_never_match_are_refused() {
    for p in [
        "*",
        "ampy",
        "ampy.*",
        "ampy.dev.*",
        "ampy.*.*.*",
        "ampy.dev.news.v1",
    ] {
        let e = TopicPattern::parse(p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Topic, "{p}");
        let t = e.to_string();
        assert!(
            t.contains(&format!(
                "pattern {p:?}: has {} token(s) and no trailing `>`, so it can never match a topic",
                p.split('.').count()
            )),
            "{p}: {t}"
        );
    }
    let e = TopicPattern::parse("ampy.*").unwrap_err();
    assert!(e.to_string().contains("add `.>` (e.g. \"ampy.>\")"), "{e}");
    for p in [
        ">",
        "*.>",
        "ampy.>",
        "ampy.dev.news.v1.>",
        "ampy.dev.news.v1.*",
        "ampy.*.*.*.*",
    ] {
        let pat = TopicPattern::parse(p).unwrap();
        assert!(pat.matches(NEWS), "{p}");
    }
}
