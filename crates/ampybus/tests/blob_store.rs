//! Blob stores of the `blob_store=` URL option under the consumer runtime, each test run on a
//! `file://` directory and on an `s3://` bucket of the S3-compatible server of
//! `scripts/brokers.sh` (moto): a tampered blob is dead-lettered as `blob_hash_mismatch`, a
//! missing one is retried and then dead-lettered naming it, blobs expire with their domain's
//! retention, and bad store URLs are refused naming the rule. (The 5 MiB round trips on every
//! transport are `crates/ampybus-cli/tests/blobs.rs`.)

mod common;

use ampybus::codec::{BlobStore, PayloadCodec, default_blob_retention, sha256_tag};
use ampybus::runtime::{Consumer, ConsumerHandle, DlqCode, Outcome, RetryPolicy, handler_fn};
use ampybus::transport::{Delivery, StartAt, SubscribeSpec};
use ampybus::{Bus, Headers, Topic, TopicPattern};
use common::{HANG, bus_at, fetch_exact};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A fresh store: a temporary directory (kept alive by the returned guard) or a fresh bucket.
fn store(kind: &str) -> (BlobStore, Option<tempfile::TempDir>) {
    match kind {
        "file" => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("file://{}", dir.path().display());
            (BlobStore::from_url(&url).unwrap(), Some(dir))
        }
        _ => {
            let (url, env) = common::s3_bucket("bus/blobs");
            (BlobStore::from_url_with_env(&url, env).unwrap(), None)
        }
    }
}

/// An embedded-log bus whose codec sends every payload over 8 bytes to `blobs`.
async fn blob_bus(dir: &std::path::Path, blobs: BlobStore) -> Bus {
    bus_at(dir).await.with_codec(PayloadCodec {
        compress_threshold: usize::MAX,
        max_inline: 8,
        blobs: Some(blobs),
        ..Default::default()
    })
}

async fn wait_stats(
    what: &str,
    h: &ConsumerHandle,
    cond: impl Fn(&ampybus::runtime::ConsumerStats) -> bool,
) {
    let start = Instant::now();
    while !cond(&h.stats()) {
        assert!(
            start.elapsed() < HANG,
            "timed out waiting for {what}: {:?}",
            h.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every message of the news DLQ, read from the start (exactly `n`).
async fn dlq(bus: &Bus, n: usize) -> Vec<Delivery> {
    let pattern = TopicPattern::parse("ampy.dev.dlq.v1.news").unwrap();
    let mut sub = bus
        .subscribe(SubscribeSpec::ephemeral(pattern, StartAt::Earliest))
        .await
        .unwrap();
    let out = fetch_exact(&mut sub, n).await;
    assert!(
        sub.fetch(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
    );
    out
}

/// A tampered blob goes to the DLQ at once as `blob_hash_mismatch`; a missing one is retried
/// (it may come back) and after `max_attempts` dead-lettered as `max_retries`, naming the blob
/// and that it does not exist; an intact one is handled.
async fn tampered_and_missing(kind: &str) {
    let (blobs, _guard) = store(kind);
    let dir = tempfile::tempdir().unwrap();
    let bus = blob_bus(dir.path(), blobs.clone()).await;
    let raw = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    let h = |key: &str| Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", key);
    let mut sent = Vec::new();
    for key in ["tamper", "missing", "intact"] {
        let payload = format!("{key}-blob-payload").into_bytes();
        let env = bus.prepare(&raw, h(key), payload.into()).await.unwrap();
        assert!(env.payload.is_empty(), "stored as a blob");
        let blob_ref = env.headers.blob_ref().unwrap().to_owned();
        assert!(blob_ref.starts_with(blobs.url_prefix()), "{blob_ref}");
        assert!(blob_ref.contains("/news/"), "{blob_ref}");
        sent.push(env);
    }
    let tamper_ref = sent[0].headers.blob_ref().unwrap().to_owned();
    let missing_ref = sent[1].headers.blob_ref().unwrap().to_owned();
    let key = tamper_ref.strip_prefix(blobs.url_prefix()).unwrap();
    blobs
        .put(key, b"TAMPERED-blob-payload-".to_vec().into())
        .await
        .unwrap();
    blobs.delete(&missing_ref).await.unwrap();
    bus.publish_wire(sent.clone()).await.unwrap();

    let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let g2 = got.clone();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.news.>").unwrap(),
        "blobs",
    )
    .retry(RetryPolicy {
        max_attempts: 3,
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
    wait_stats("1 handled and 2 DLQ", &handle, |s| {
        s.handled_ok == 1 && s.dead_lettered_total() == 2
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.dlq(DlqCode::BlobHashMismatch), 1);
    assert_eq!(stats.dlq(DlqCode::MaxRetries), 1);
    assert_eq!(stats.retried, 2, "the missing blob: 3 attempts");
    assert_eq!(*got.lock().unwrap(), vec![b"intact-blob-payload".to_vec()]);

    let dead = dlq(&bus, 2).await;
    let by_key = |k: &str| {
        dead.iter()
            .find(|d| d.envelope.headers.partition_key() == Some(k))
            .unwrap_or_else(|| panic!("no DLQ message for {k}"))
    };
    let tampered = &by_key("tamper").envelope;
    let reason = tampered.headers.get("dlq_reason").unwrap();
    assert!(
        reason.starts_with(&format!(
            "blob_hash_mismatch: invalid payload: blob {tamper_ref}: hash sha256:"
        )),
        "{reason}"
    );
    assert!(
        reason.contains("does not match blob_hash sha256:"),
        "{reason}"
    );
    assert_eq!(tampered.headers.blob_ref(), Some(tamper_ref.as_str()));
    assert_eq!(tampered.headers.get("retry_count"), Some("1"));
    let missing = &by_key("missing").envelope;
    let reason = missing.headers.get("dlq_reason").unwrap();
    assert_eq!(
        reason,
        format!(
            "max_retries: transport error: blob store: cannot read {missing_ref}: no such blob (never written, deleted, or expired with its topic's retention)"
        )
    );
    assert_eq!(missing.headers.get("retry_count"), Some("3"));
    assert_eq!(
        missing.headers.get("payload_hash").unwrap(),
        sha256_tag(b"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_missing_blobs_on_a_file_store() {
    tampered_and_missing("file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_missing_blobs_on_s3() {
    tampered_and_missing("s3").await;
}

/// Blobs live as long as their domain's default retention (7 days for news, 30 for orders),
/// counted from when they were stored; what expired is gone for readers too.
async fn expiry(kind: &str) {
    let (blobs, _guard) = store(kind);
    let codec = PayloadCodec {
        max_inline: 4,
        blobs: Some(blobs.clone()),
        ..Default::default()
    };
    let mut refs = Vec::new();
    for (domain, id) in [("news", "n-1"), ("news", "n-2"), ("orders", "o-1")] {
        let mut h = Headers::new().with("message_id", id);
        codec
            .offload(&mut h, b"over four".to_vec().into(), domain)
            .await
            .unwrap();
        refs.push(h.blob_ref().unwrap().to_owned());
    }
    let now = chrono::Utc::now();
    let days = |d: i64| now + chrono::Duration::days(d);
    assert_eq!(
        blobs.expire(days(6), default_blob_retention).await.unwrap(),
        0
    );
    assert_eq!(
        blobs.expire(days(8), default_blob_retention).await.unwrap(),
        2
    );
    for r in &refs[..2] {
        let e = blobs.get(r).await.unwrap_err().to_string();
        assert!(e.contains("no such blob"), "{e}");
    }
    assert_eq!(&blobs.get(&refs[2]).await.unwrap()[..], b"over four");
    assert_eq!(
        blobs
            .expire(days(29), default_blob_retention)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        blobs
            .expire(days(31), default_blob_retention)
            .await
            .unwrap(),
        1
    );
    assert!(blobs.get(&refs[2]).await.is_err());
    assert_eq!(
        blobs
            .expire(days(365), default_blob_retention)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn blobs_expire_with_their_domain_on_a_file_store() {
    expiry("file").await;
}

#[tokio::test]
async fn blobs_expire_with_their_domain_on_s3() {
    expiry("s3").await;
}

/// A bus URL's `blob_store=` that breaks a rule fails `Bus::connect` naming the rule, and a
/// valid `s3://` store is the bus's store.
#[tokio::test]
async fn bus_urls_with_s3_blob_stores() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!("file://{}", dir.path().display());
    for (store, rule) in [
        ("s3://", "the bucket is missing"),
        (
            "s3://Bad_Bucket",
            "bucket \"Bad_Bucket\": only lowercase letters",
        ),
        ("s3://bkt/a//b", "prefix \"a//b\": an empty segment"),
        ("s3://bkt?acl=public", "unknown option \"acl\""),
        (
            "s3://bkt?endpoint=http://192.0.2.1:9000",
            "plain http is allowed only to a loopback address",
        ),
        (
            "gs://bkt",
            "must be file:///absolute/dir or s3://bucket[/prefix]",
        ),
    ] {
        let e = Bus::connect(&format!("{base}?blob_store={store}"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(rule), "{store}: {e}");
        assert!(e.contains("blob_store "), "{store}: {e}");
    }
    let bus = Bus::connect(&format!(
        "{base}?blob_store=s3://some-bucket/x/y?endpoint=http://127.0.0.1:9"
    ))
    .await
    .unwrap();
    assert_eq!(
        bus.codec().blobs.as_ref().unwrap().url_prefix(),
        "s3://some-bucket/x/y/"
    );
    // The store's Debug shows its prefix, never the client's configuration.
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "hunter2-secret"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let s = BlobStore::from_url_with_env("s3://some-bucket", env).unwrap();
    assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
}
