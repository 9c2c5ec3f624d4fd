//! The CLI on NATS JetStream (server on 127.0.0.1:4222, started or found by
//! `scripts/brokers.sh start nats`): `streams ensure|list|describe`, `pub` and `sub` with a
//! `nats://` URL, `topics list|describe|lag`, `bench` and `bench-nats` (both modes) against the
//! server.

mod common;

use common::ampybus_in;

fn brokers() {
    common::start_broker("nats");
}

const URL: &str =
    "nats://127.0.0.1:4222?stream_prefix=AMPYCONF&max_age_days=1&consumer_inactive_s=600";

fn run(args: &[&str]) -> common::Out {
    let mut all = vec!["--url", URL];
    all.extend_from_slice(args);
    ampybus_in(None, &all)
}

#[test]
fn streams_ensure_list_describe() {
    brokers();
    let o = run(&[
        "streams", "ensure", "--env", "dev", "--domain", "fx", "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json_lines();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["subject"], "ampy.dev.fx.>");
    let name = v[0]["stream"].as_str().unwrap().to_owned();
    assert!(["created", "exists", "updated"].contains(&v[0]["action"].as_str().unwrap()));

    let o = run(&["streams", "list", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.json_lines().iter().any(|s| s["name"] == name.as_str()));

    let o = run(&["streams", "describe", &name, "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let d = &o.json_lines()[0];
    assert_eq!(d["name"], name.as_str());
    assert_eq!(d["storage"], "file");

    let o = run(&["streams", "describe", "NO_SUCH_STREAM_X"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("NO_SUCH_STREAM_X"), "{}", o.stderr);

    let o = ampybus_in(None, &["--url", "/tmp/not-nats", "streams", "list"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("not a NATS URL"), "{}", o.stderr);
}

#[test]
fn pub_and_sub_over_nats() {
    brokers();
    let id = common::unique();
    let topic = format!("ampy.dev.news.v1.cli{id}.raw");
    let o = run(&[
        "pub",
        "--topic",
        &topic,
        "--producer",
        "cli@1",
        "--source",
        "cli",
        "--pk",
        "n-1",
        "--payload",
        "hello-nats",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let pattern = format!("ampy.dev.news.v1.cli{id}.>");
    let o = run(&["sub", "--pattern", &pattern, "--json", "--max", "1"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json_lines();
    assert_eq!(v.len(), 1, "{}", o.stdout);
    assert_eq!(v[0]["topic"], topic.as_str());
    assert_eq!(v[0]["headers"]["partition_key"], "n-1");
}

fn publish(topic: &str, key: &str, payload: &str) {
    let o = run(&[
        "pub",
        "--topic",
        topic,
        "--producer",
        "cli@1",
        "--source",
        "cli",
        "--pk",
        key,
        "--payload",
        payload,
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn topics_list_describe_lag_over_nats() {
    brokers();
    let id = common::unique();
    let (a, b) = (
        format!("ampy.dev.news.v1.top{id}.a"),
        format!("ampy.dev.news.v1.top{id}.b"),
    );
    for i in 0..3 {
        publish(&a, "n-a", &format!("a{i}"));
    }
    for i in 0..2 {
        publish(&b, "n-b", &format!("b{i}"));
    }
    let pattern = format!("ampy.dev.news.v1.top{id}.>");
    let consumer = format!("lag{id}");
    // A durable consumer that read (and acked) one message of the five.
    let o = run(&[
        "sub",
        "--pattern",
        &pattern,
        "--durable",
        &consumer,
        "--json",
        "--max",
        "1",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json_lines().len(), 1);

    let o = run(&["topics", "list", "--pattern", &pattern, "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json_lines();
    let rows: Vec<(&str, u64)> = v
        .iter()
        .map(|t| {
            (
                t["topic"].as_str().unwrap(),
                t["messages"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, vec![(a.as_str(), 3), (b.as_str(), 2)]);
    for t in &v {
        assert!(
            t["bytes"].is_null(),
            "NATS reports no per-subject sizes: {t}"
        );
        let (first, last) = (
            t["first_seq"].as_u64().unwrap(),
            t["last_seq"].as_u64().unwrap(),
        );
        assert!(first > 0 && first < last, "{t}");
        assert!(t["oldest"].as_str().unwrap() <= t["newest"].as_str().unwrap());
    }

    let o = run(&["topics", "describe", &pattern, "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let d = &o.json_lines()[0];
    assert_eq!(d["messages"], 5);
    let mine: Vec<&serde_json::Value> = d["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == consumer.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{d}");
    assert_eq!(mine[0]["lag"], 4);
    assert_eq!(mine[0]["pattern"], pattern.as_str());

    let o = run(&["topics", "lag", "--consumer", &consumer, "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json_lines();
    assert_eq!(v.len(), 1);
    assert_eq!(
        (v[0]["lag"].as_u64(), v[0]["in_flight"].as_u64()),
        (Some(4), Some(0))
    );
    assert!(v[0]["cursor"].as_u64().unwrap() > 0);

    let o = run(&["topics", "lag", "--consumer", &format!("nobody{id}")]);
    assert_eq!(o.code, 2, "{}", o.stderr);
}

#[test]
fn bench_runs_against_the_server() {
    brokers();
    let o = run(&[
        "bench",
        "--messages",
        "2000",
        "--single-messages",
        "200",
        "--rounds",
        "1",
        "--rate",
        "2000",
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r = &o.json_lines()[0];
    assert_eq!(r["e2e"]["rounds"][0]["unique"], 2000, "{r}");
    assert_eq!(r["publish_batched"]["messages"], 2000, "{r}");
    assert_eq!(r["publish_single"]["messages"], 200, "{r}");
    let o = run(&["bench", "--raw", "--rounds", "1"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("bench-nats"), "{}", o.stderr);
}

#[test]
fn bench_nats_consume_and_publish_modes() {
    brokers();
    common::consume_bench_smoke(URL, "nats", "raw_async_nats_msg_s");
    common::publish_bench_smoke(URL, "nats", "raw_async_nats_msg_s");
}

#[test]
fn tier_flags_best_effort_bench_and_describe() {
    brokers();
    // e2e over NATS core, consumer in another process; the tier is in the report.
    let o = run(&[
        "bench",
        "--mode",
        "e2e",
        "--tier",
        "best-effort",
        "--messages",
        "1000",
        "--rate",
        "2000",
        "--rounds",
        "1",
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r = &o.json_lines()[0];
    assert_eq!(r["config"]["tier"], "best_effort", "{r}");
    let unique = r["e2e"]["rounds"][0]["unique"].as_u64().unwrap();
    assert!(unique > 0 && unique <= 1000, "{r}");
    // Core publishes against raw core publishes (the other spelling).
    let r = common::publish_bench_smoke_with(
        URL,
        "nats",
        "raw_async_nats_msg_s",
        &["--tier", "best_effort"],
    );
    assert_eq!(r["tier"], "best_effort", "{r}");
    // Consume mode reads JetStream: refused with the reason.
    let o = run(&["bench-nats", "--tier", "best-effort", "--mode", "consume"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--mode publish"), "{}", o.stderr);
    // A bad tier names the flag and the choices.
    let o = run(&[
        "pub",
        "--tier",
        "fast",
        "--topic",
        "ampy.dev.news.v1.x",
        "--producer",
        "p@1",
        "--source",
        "s",
        "--pk",
        "k",
        "--payload",
        "x",
    ]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("--tier") && o.stderr.contains("best_effort"),
        "{}",
        o.stderr
    );
    // describe shows the default tier and where it comes from.
    let o = run(&["topics", "describe", "ampy.dev.ticks.>", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let d = &o.json_lines()[0];
    assert_eq!(d["tier"]["tier"], "at_least_once_dedupe", "{d}");
    assert_eq!(d["tier"]["source"], "default", "{d}");
}
