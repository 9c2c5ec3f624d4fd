//! Per-message publish outcomes on Redis Streams (server on 127.0.0.1:6379): a batch whose
//! 601st `XADD` the server refuses reports every message for what it is, and the metrics
//! count exactly the confirmed ones.

use ampybus::transport::PublishOutcome;
use ampybus::{Bus, Envelope, Headers, Topic};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_batch_outcomes_are_per_message() {
    ampybus_conformance::start_test_broker("redis");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("outcomes{nanos:x}:");
    // One pipeline of 512 at a time, so which pipelines were sent is exact.
    let url =
        format!("redis://127.0.0.1:6379?key_prefix={prefix}&max_in_flight=512&max_age_days=1");
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // The ticks stream's key holds a string: every XADD to it is refused (WRONGTYPE).
    let ticks_key = format!("{prefix}ampy.dev.ticks.v1");
    redis::cmd("SET")
        .arg(&ticks_key)
        .arg("not a stream")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let bus = Bus::connect(&url).await.unwrap();
    let news = Topic::parse("ampy.dev.news.v1.outcomes").unwrap();
    let ticks = Topic::parse("ampy.dev.ticks.v1.outcomes").unwrap();
    let batch: Vec<Envelope> = (0..1200)
        .map(|i| {
            let (topic, key) = if i == 600 {
                (&ticks, "XNAS.AAPL")
            } else {
                (&news, "k")
            };
            let h = Headers::for_publish(ampybus::headers::RAW_BYTES_SCHEMA, "out@1", "t", key);
            Envelope::new(topic, h, format!("m{i}"))
        })
        .collect();
    let out = bus.publish_batch_outcomes(batch).await;

    let e = out.error.as_ref().expect("an error");
    assert!(
        e.to_string().contains("message 600") && e.to_string().contains("WRONGTYPE"),
        "{e}"
    );
    let kind = |o: &PublishOutcome| match o {
        PublishOutcome::Confirmed(_) => 'c',
        PublishOutcome::Unknown => 'u',
        PublishOutcome::Unsent => 's',
    };
    let kinds: String = out.outcomes.iter().map(kind).collect();
    // Pipelines 0..512 and 512..1024 were sent: all confirmed but the refused one (the
    // messages after it in its pipeline were stored too); 1024..1200 never went out.
    let expected = format!("{}s{}{}", "c".repeat(600), "c".repeat(423), "s".repeat(176));
    assert_eq!(kinds, expected);
    assert_eq!(out.counts(), (1023, 0, 177));

    let news_key = format!("{prefix}ampy.dev.news.v1");
    let len: u64 = redis::cmd("XLEN")
        .arg(&news_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 1023, "stored = confirmed");
    let metrics = bus.metrics().encode();
    let line = r#"bus_produced_total{topic="ampy.dev.news.v1",producer="out@1"} "#;
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .unwrap_or_else(|| panic!("no {line} in\n{metrics}"));
    assert_eq!(counted.trim().parse::<f64>().unwrap(), 1023.0);
    assert!(
        !metrics.contains(r#"bus_produced_total{topic="ampy.dev.ticks.v1",producer="out@1"} 1"#),
        "{metrics}"
    );

    let _: () = redis::cmd("DEL")
        .arg(&news_key)
        .arg(&ticks_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    bus.close().await.unwrap();
}
