//! The CLI on Redis Streams (server on 127.0.0.1:6379, started or found by
//! `scripts/brokers.sh start redis`): `pub`, `sub --durable`, `topics list|describe|lag`,
//! `bench-redis` (both modes). Each run uses a key prefix of its own, so its streams hold only
//! its messages.

mod common;

fn brokers() {
    common::start_broker("redis");
}

#[test]
fn pub_sub_and_topics_over_redis() {
    brokers();
    let id = common::unique();
    let url = format!("redis://127.0.0.1:6379?key_prefix=clitest{id}:");
    let run = |args: &[&str]| common::ampybus_on(&url, args);
    common::pub_five_news_sub_one(&url);

    let o = run(&["topics", "list", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json_lines();
    assert_eq!(v.len(), 1, "{}", o.stdout);
    assert_eq!(v[0]["topic"], "ampy.dev.news.v1");
    assert_eq!(v[0]["messages"], 5);
    assert!(v[0]["bytes"].is_null());
    assert!(v[0]["first_seq"].as_u64().unwrap() < v[0]["last_seq"].as_u64().unwrap());

    let o = run(&["topics", "describe", "ampy.dev.news.>", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let d = &o.json_lines()[0];
    assert_eq!(d["messages"], 5);
    assert_eq!(d["consumers"][0]["name"], "audit", "{d}");
    assert_eq!(d["consumers"][0]["lag"], 4, "{d}");

    let o = run(&["topics", "lag", "--consumer", "audit", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json_lines();
    assert_eq!(v.len(), 1);
    assert_eq!(
        (v[0]["lag"].as_u64(), v[0]["in_flight"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(v[0]["pattern"], "ampy.dev.news.v1.>");

    let o = run(&["topics", "lag", "--consumer", "nobody"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
}

#[test]
fn demo_runs_end_to_end_on_redis() {
    brokers();
    let url = format!(
        "redis://127.0.0.1:6379?key_prefix=clidemo{}:",
        common::unique()
    );
    let dir = tempfile::tempdir().unwrap();
    common::demo_runs_end_to_end(&url, dir.path());
}

#[test]
fn bench_redis_consume_and_publish_modes() {
    brokers();
    let url = format!(
        "redis://127.0.0.1:6379?key_prefix=clitest{}:",
        common::unique()
    );
    common::consume_bench_smoke(&url, "redis", "raw_redis_msg_s");
    common::publish_bench_smoke(&url, "redis", "raw_redis_msg_s");
}
