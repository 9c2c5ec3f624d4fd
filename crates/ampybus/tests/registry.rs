//! The registry enforced by a bus on the embedded log: publish refused and allowed, a
//! subscription refused, a schema mismatch dead-lettered and counted, `max_rate` slowing a
//! Producer without dropping.

use ampybus::registry::Registry;
use ampybus::runtime::{Consumer, DlqCode, Producer, SendOutcome, handler_fn};
use ampybus::transport::{StartAt, SubscribeSpec};
use ampybus::{Bus, ErrorKind, Headers, Outcome, Topic, TopicPattern};
use std::time::{Duration, Instant};

const REGISTRY: &str = r#"
[[topic]]
pattern = "ampy.*.orders.v1.>"
owner = "oms"
schemas = ["ampy.orders.v1.OrderRequest"]
tier = "at_least_once_dedupe"
retention_days = 30
consumers = ["risk"]

[[topic]]
pattern = "ampy.*.news.v1.>"
owner = "news"
schemas = ["ampy.raw.v1.Bytes"]
tier = "at_least_once"
retention_days = 7
max_rate = 200
"#;

fn registry() -> Registry {
    Registry::parse(REGISTRY, "registry.toml").unwrap()
}

async fn bus(dir: &std::path::Path) -> Bus {
    Bus::connect(dir.to_str().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_refused_outside_claims_and_allowed_inside() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(dir.path()).await.with_registry(registry());
    let orders = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let h = |p: &str, s: &str| Headers::for_publish(s, p, "test", "co_1");
    bus.publish(
        &orders,
        h("oms@1", "ampy.orders.v1.OrderRequest"),
        b"o".to_vec(),
    )
    .await
    .expect("the owner publishes");
    let e = bus
        .publish(
            &orders,
            h("risk@2", "ampy.orders.v1.OrderRequest"),
            b"o".to_vec(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Header);
    assert_eq!(
        e.message(),
        "`producer`: service `risk` (producer \"risk@2\") may not publish topic \"ampy.dev.orders.v1.requests\": it is owned by `oms` (registry registry.toml:2, pattern \"ampy.*.orders.v1.>\")"
    );
    let e = bus
        .publish(&orders, h("oms@1", "ampy.raw.v1.Bytes"), b"o".to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Header);
    assert!(
        e.message()
            .starts_with("`schema_fqdn`: \"ampy.raw.v1.Bytes\" is not listed")
    );
    let bars = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
    let e = bus
        .publish(
            &bars,
            Headers::for_publish("ampy.bars.v1.BarBatch", "md@1", "t", "XNAS.AAPL"),
            b"b".to_vec(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Topic);
    assert_eq!(
        e.message(),
        "topic \"ampy.dev.bars.v1.XNAS.AAPL\": no entry of the registry registry.toml claims it, so no service may publish it (producer \"md@1\", service `md`); add a [[topic]] entry"
    );
    // The bus's own domains stay open to everyone.
    let dlq = Topic::parse("ampy.dev.dlq.v1.orders").unwrap();
    bus.publish(&dlq, h("anyone@1", "ampy.raw.v1.Bytes"), b"d".to_vec())
        .await
        .expect("dlq is open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_may_not_subscribe_outside_its_reads() {
    let dir = tempfile::tempdir().unwrap();
    let base = bus(dir.path()).await;
    let ui = base.clone().with_registry(registry()).with_service("ui");
    let e = Consumer::builder(ui.clone(), TopicPattern::parse("ampy.dev.>").unwrap(), "ui")
        .handler(handler_fn(|_m| async { Outcome::Ok }))
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert_eq!(
        e.message(),
        "service `ui` may not read pattern \"ampy.dev.>\": it overlaps \"ampy.*.orders.v1.>\" (registry registry.toml:2, owner `oms`), readable by oms, risk"
    );
    // News has no consumer list: anyone reads it.
    let h = Consumer::builder(ui, TopicPattern::parse("ampy.dev.news.>").unwrap(), "ui")
        .handler(handler_fn(|_m| async { Outcome::Ok }))
        .start()
        .await
        .expect("news is open");
    h.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_schema_is_dead_lettered_as_schema_mismatch_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    // A producer without the registry writes one listed and one unlisted schema.
    let plain = bus(dir.path()).await;
    let orders = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    for (key, schema) in [
        ("co_1", "ampy.orders.v1.OrderRequest"),
        ("co_2", "ampy.fills.v1.FillEvent"),
    ] {
        plain
            .publish(
                &orders,
                Headers::for_publish(schema, "oms@1", "t", key),
                b"x".to_vec(),
            )
            .await
            .unwrap();
    }
    let risk = plain.clone().with_registry(registry()).with_service("risk");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = Consumer::builder(
        risk.clone(),
        TopicPattern::parse("ampy.dev.orders.>").unwrap(),
        "risk",
    )
    .handler(handler_fn(move |m| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(m.headers.partition_key().unwrap_or_default().to_owned());
            Outcome::Ok
        }
    }))
    .serve_replays(false)
    .start()
    .await
    .unwrap();
    let mut dlq = plain
        .subscribe(SubscribeSpec::ephemeral(
            TopicPattern::parse("ampy.dev.dlq.>").unwrap(),
            StartAt::Earliest,
        ))
        .await
        .unwrap();
    let got = dlq.fetch(1, Duration::from_secs(20)).await.unwrap();
    assert_eq!(got.len(), 1);
    let reason = got[0].envelope.headers.get("dlq_reason").unwrap();
    assert_eq!(
        reason,
        "schema_mismatch: \"ampy.fills.v1.FillEvent\" is not listed for topic ampy.dev.orders.v1.requests by the registry registry.toml (listed: ampy.orders.v1.OrderRequest)"
    );
    assert_eq!(got[0].envelope.headers.partition_key(), Some("co_2"));
    assert_eq!(rx.recv().await.as_deref(), Some("co_1"));
    let stats = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stats.dlq(DlqCode::SchemaMismatch), 1);
    assert_eq!(stats.handled_ok, 1);
    assert!(
        rx.try_recv().is_err(),
        "the mismatched message reached the handler"
    );
    let text = risk.metrics().encode();
    assert!(
        text.contains("bus_schema_mismatch_total{topic=\"ampy.dev.orders.v1\"} 1\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_slows_the_owner_and_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(dir.path()).await.with_registry(registry());
    let producer = Producer::builder(bus.clone()).start().unwrap();
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    const N: usize = 300;
    let start = Instant::now();
    for i in 0..N {
        let h = Headers::for_publish("ampy.raw.v1.Bytes", "news@1", "t", &format!("n-{i}"));
        assert_eq!(
            producer.send(&topic, h, b"x".to_vec()).await.unwrap(),
            SendOutcome::Queued
        );
    }
    let elapsed = start.elapsed().as_secs_f64();
    producer.flush().await.unwrap();
    let stats = producer.close().await.unwrap();
    assert_eq!((stats.accepted, stats.published), (N as u64, N as u64));
    // 200 msg/s with a burst of 20: the last message cannot be sent before (300 - 20) / 200 s.
    let floor = (N as f64 - 20.0) / 200.0;
    assert!(
        elapsed >= floor * 0.98,
        "{N} messages in {elapsed:.3}s, faster than the 200 msg/s limit allows"
    );
    let rate = N as f64 / elapsed;
    assert!(
        rate <= 200.0 * 1.1,
        "measured {rate:.1} msg/s over {elapsed:.3}s"
    );
}
