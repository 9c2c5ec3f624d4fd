//! The NATS wire form, against the server on 127.0.0.1:4222 (`scripts/brokers.sh start nats`):
//! what ampybus publishes (subject = topic, the contract headers by their exact names,
//! `Nats-Msg-Id` = `message_id`), and that a message in the seed's Python form (lower-snake
//! headers, no `Nats-Msg-Id`, no `traceparent`, all-zero `trace_id`, UUIDv4 id, `+00:00`
//! offset) is consumed and normalised.

use ampybus::runtime::{Consumer, Message, Outcome, handler_fn};
use ampybus::transport::nats::NatsKvDedupeStore;
use ampybus::{Bus, Headers, Topic, TopicPattern};
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const URL: &str =
    "nats://127.0.0.1:4222?stream_prefix=AMPYCONF&max_age_days=1&consumer_inactive_s=600";

fn uid() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_wire_form_has_the_contract_headers_and_nats_msg_id() {
    tokio::task::spawn_blocking(|| ampybus_conformance::start_test_broker("nats"))
        .await
        .unwrap();
    let bus = Bus::connect(URL).await.expect("connect");
    let topic = Topic::parse(&format!("ampy.dev.news.v1.w{}.wire", uid())).unwrap();
    let h = Headers::for_publish(ampybus::headers::RAW_BYTES_SCHEMA, "wire@1", "wire", "n-1")
        .with("x_custom", "kept");
    let receipt = bus
        .publish(&topic, h, b"body".to_vec())
        .await
        .expect("publish");
    assert!(!receipt.duplicate);

    // Read it back with the plain client: a direct get by sequence from the stream.
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut names = Vec::new();
    let mut list = js.stream_names();
    while let Some(n) = list.next().await {
        names.push(n.unwrap());
    }
    let mut found = None;
    for n in names {
        let s = js.get_stream(&n).await.unwrap();
        if s.cached_info()
            .config
            .subjects
            .iter()
            .any(|x| x == "ampy.dev.news.>" || x == "ampy.>")
        {
            found = Some(s);
            break;
        }
    }
    let stream = found.expect("the news stream");
    let raw = stream
        .get_raw_message(receipt.sequence)
        .await
        .expect("stored message");
    assert_eq!(raw.subject.as_str(), topic.as_str());
    assert_eq!(&raw.payload[..], b"body");
    let hm = raw.headers;
    let get = |k: &str| hm.get(k).map(|v| v.as_str().to_owned());
    let id = get("message_id").expect("message_id header");
    assert_eq!(get("Nats-Msg-Id").as_deref(), Some(id.as_str()));
    for name in [
        "schema_fqdn",
        "schema_version",
        "content_type",
        "produced_at",
        "producer",
        "source",
        "run_id",
        "traceparent",
        "partition_key",
    ] {
        assert!(get(name).is_some(), "header {name} missing on the wire");
    }
    assert_eq!(get("partition_key").as_deref(), Some("n-1"));
    assert_eq!(get("x_custom").as_deref(), Some("kept"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_the_python_seed_form_is_consumed_and_normalised() {
    tokio::task::spawn_blocking(|| ampybus_conformance::start_test_broker("nats"))
        .await
        .unwrap();
    let bus = Bus::connect(URL).await.expect("connect");
    let id = uid();
    let topic = format!("ampy.dev.bars.v1.py{id}.XNAS.AAPL");
    // Make sure the stream exists (ampybus creates it on first use), then publish as the
    // seed's Python package does: its own header set, no Nats-Msg-Id.
    let t = Topic::parse(&topic).unwrap();
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let js = async_nats::jetstream::new(client);
    let v4 = uuid::Uuid::new_v4().to_string();
    let mut hm = async_nats::HeaderMap::new();
    for (k, v) in [
        ("message_id", v4.as_str()),
        ("schema_fqdn", "ampy.bars.v1.BarBatch"),
        ("schema_version", "1.0.0"),
        ("content_type", "application/x-protobuf"),
        ("produced_at", "2025-09-05T19:31:01.123456+00:00"),
        ("producer", "py-producer@1"),
        ("source", "yfinance"),
        ("run_id", "run-1"),
        ("trace_id", "00000000000000000000000000000000"),
        ("partition_key", "XNAS.AAPL"),
    ] {
        hm.insert(k, v);
    }
    let store = Arc::new(NatsKvDedupeStore::connect(URL).await.unwrap());
    let seen: Arc<Mutex<Vec<Message>>> = Arc::default();
    let s2 = seen.clone();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse(&format!("ampy.dev.bars.v1.py{id}.>")).unwrap(),
        &format!("py-{id}"),
    )
    .dedupe(store)
    .handler(handler_fn(move |m: Message| {
        let seen = s2.clone();
        async move {
            seen.lock().unwrap().push(m);
            Outcome::Ok
        }
    }))
    .start()
    .await
    .expect("consumer");
    // The consumer's subscribe has created the stream. Publish, and once handled publish the
    // same message again (a Python retry: same id, no Nats-Msg-Id, so the broker stores both).
    for round in 1..=2u64 {
        js.publish_with_headers(
            t.as_str().to_owned(),
            hm.clone(),
            b"\x0a\x00".to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .expect("PubAck");
        let start = Instant::now();
        while handle.stats().handled_ok + handle.stats().skipped_duplicates < round {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{:?}",
                handle.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        (stats.handled_ok, stats.skipped_duplicates),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(stats.dead_lettered_total(), 0);
    let seen = seen.lock().unwrap();
    let m = &seen[0];
    assert_eq!(m.headers.message_id(), Some(v4.as_str()));
    assert_eq!(m.headers.produced_at(), Some("2025-09-05T19:31:01.123456Z"));
    assert!(m.headers.trace_context().is_none());
    assert_eq!(m.headers.get("Nats-Msg-Id"), None);
    assert_eq!(m.info.delivery_count, 1);
    assert_eq!(m.topic.as_str(), topic);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_dedupe_store_is_shared_and_scoped_by_consumer() {
    use ampybus::dedupe::DedupeStore;
    tokio::task::spawn_blocking(|| ampybus_conformance::start_test_broker("nats"))
        .await
        .unwrap();
    let a = NatsKvDedupeStore::connect(URL).await.expect("store a");
    let b = NatsKvDedupeStore::connect(URL)
        .await
        .expect("store b (another connection)");
    let id = uid();
    let keys = vec![format!("m-{id}"), format!("orders:dk {id}/x")];
    let consumer = format!("c.{id}");
    assert!(!a.is_applied(&consumer, &keys).await.unwrap());
    a.record_applied(&consumer, &keys).await.unwrap();
    assert!(b.is_applied(&consumer, &keys).await.unwrap());
    assert!(b.is_applied(&consumer, &keys[1..]).await.unwrap());
    assert!(!b.is_applied(&format!("other-{id}"), &keys).await.unwrap());
    assert!(
        !b.is_applied(&consumer, &[format!("m2-{id}")])
            .await
            .unwrap()
    );
}
