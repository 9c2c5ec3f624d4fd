//! The CLI on Kafka (a Kafka-API broker on 127.0.0.1:9092, started or found by
//! `scripts/brokers.sh start kafka`): `pub`, `sub --durable`, `topics list|describe|lag`, the
//! demo, `bench-kafka` (both modes). Each run uses a namespace of its own, so its topics hold
//! only its messages.

mod common;

fn brokers() {
    common::start_broker("kafka");
}

fn kafka_url(label: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "kafka://127.0.0.1:9092?namespace=cli{label}{}.&partitions=1&batch.num.messages=1&dedupe=sqlite:{}",
        common::unique(),
        dir.path().join("dedupe.sqlite3").display()
    );
    (dir, url)
}

#[test]
fn pub_sub_and_topics_over_kafka() {
    brokers();
    let (_dir, url) = kafka_url("t");
    let run = |args: &[&str]| common::ampybus_on(&url, args);
    // One partition: the first record is the first published.
    let first = common::pub_five_news_sub_one(&url);
    assert_eq!(first["payload_base64"], "bi1hLTA=", "{first}");

    let o = run(&["topics", "list", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json_lines();
    assert_eq!(v.len(), 1, "{}", o.stdout);
    assert_eq!(v[0]["topic"], "ampy.dev.news.v1");
    assert_eq!(v[0]["messages"], 5);
    assert!(v[0]["bytes"].is_null());
    assert_eq!(
        (v[0]["first_seq"].as_u64(), v[0]["last_seq"].as_u64()),
        (Some(0), Some(4))
    );

    let o = run(&["topics", "lag", "--consumer", "audit", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json_lines();
    assert_eq!(v.len(), 1);
    assert_eq!(
        (v[0]["lag"].as_u64(), v[0]["in_flight"].as_u64()),
        (Some(4), Some(0)),
        "{}",
        v[0]
    );
    assert_eq!(v[0]["pattern"], "ampy.dev.news.v1");

    let o = run(&["topics", "describe", "ampy.dev.news.>", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let d = &o.json_lines()[0];
    assert_eq!(d["messages"], 5);
    assert_eq!(d["consumers"][0]["name"], "audit", "{d}");
    assert_eq!(d["consumers"][0]["lag"], 4, "{d}");

    let o = run(&["topics", "lag", "--consumer", "nobody"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
}

#[test]
fn demo_runs_end_to_end_on_kafka() {
    brokers();
    let (dir, url) = kafka_url("demo");
    common::demo_runs_end_to_end(&url, dir.path());
}

#[test]
fn bench_kafka_consume_and_publish_modes() {
    brokers();
    let url = "kafka://127.0.0.1:9092";
    common::consume_bench_smoke(url, "kafka", "raw_rdkafka_msg_s");
    common::publish_bench_smoke(url, "kafka", "raw_rdkafka_msg_s");
    // The runtime with dedupe needs a store.
    let o = common::ampybus_on(
        "kafka://127.0.0.1:9092?dedupe=off",
        &[
            "bench-kafka",
            "--mode",
            "consume",
            "--messages",
            "10",
            "--rounds",
            "1",
        ],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("dedupe=off"), "{}", o.stderr);
}
