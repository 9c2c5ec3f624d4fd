//! End-to-end tests of `ampybus topics` on a temporary data directory.

use serde_json::Value;
use std::path::Path;

mod common;
use common::{Out, ampybus_in};

fn ampybus(dir: &Path, args: &[&str]) -> Out {
    ampybus_in(Some(dir), args)
}

fn ok(dir: &Path, args: &[&str]) -> Out {
    let o = ampybus(dir, args);
    assert_eq!(o.code, 0, "{args:?} failed: {}", o.stderr);
    o
}

fn json_lines(o: &Out) -> Vec<Value> {
    o.json_lines()
}

fn publish(dir: &Path, topic: &str, count: u64) {
    ok(
        dir,
        &[
            "pub",
            "--topic",
            topic,
            "--producer",
            "t@1",
            "--source",
            "test",
            "--pk",
            "n-1",
            "--payload",
            "hello topics",
            "--count",
            &count.to_string(),
        ],
    );
}

const A: &str = "ampy.dev.news.v1.topics-a";
const B: &str = "ampy.dev.news.v1.topics-b";
const C: &str = "ampy.prod.news.v1.topics-c";

#[test]
fn list_describe_and_lag_report_exact_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    publish(dir, A, 7);
    publish(dir, B, 4);
    publish(dir, C, 2);

    // A durable consumer of the news topics consumes 5 of their 11 messages.
    let k = 5u64;
    let sub = ok(
        dir,
        &[
            "sub",
            "--pattern",
            "ampy.dev.news.>",
            "--durable",
            "audit",
            "--max",
            &k.to_string(),
            "--timeout",
            "5",
            "--json",
        ],
    );
    assert_eq!(sub.json_lines().len() as u64, k);

    // list --json: one object per topic with exact counts.
    let list = json_lines(&ok(dir, &["topics", "list", "--json"]));
    let counts: Vec<(String, u64, u64)> = list
        .iter()
        .map(|v| {
            (
                v["topic"].as_str().unwrap().to_string(),
                v["messages"].as_u64().unwrap(),
                v["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    let names: Vec<&str> = counts.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(names, [A, B, C]);
    assert_eq!(counts[0].1, 7);
    assert_eq!(counts[1].1, 4);
    assert_eq!(counts[2].1, 2);
    assert!(counts.iter().all(|c| c.2 > 0));
    assert_eq!(list[0]["first_seq"].as_u64(), Some(1));
    assert_eq!(list[0]["last_seq"].as_u64(), Some(7));

    // --pattern filters.
    let news = json_lines(&ok(
        dir,
        &["topics", "list", "--pattern", "ampy.dev.news.>", "--json"],
    ));
    assert_eq!(news.len(), 2);

    // The text form has a header and one row per topic.
    let text = ok(dir, &["topics", "list"]);
    let rows: Vec<&str> = text.stdout.lines().collect();
    assert_eq!(rows.len(), 4, "{}", text.stdout);
    assert!(rows[0].starts_with("TOPIC"));
    assert!(rows[1].starts_with(A) && rows[1].contains(" 7 "));

    // describe a pattern: totals equal the list sums; the consumer is shown with its lag.
    let total_news = 7 + 4;
    let news_bytes = counts[0].2 + counts[1].2;
    let d = json_lines(&ok(
        dir,
        &["topics", "describe", "ampy.dev.news.>", "--json"],
    ));
    assert_eq!(d.len(), 1);
    let d = &d[0];
    assert_eq!(d["messages"].as_u64(), Some(total_news));
    assert_eq!(d["bytes"].as_u64(), Some(news_bytes));
    assert_eq!(d["topics"].as_array().unwrap().len(), 2);
    let consumers = d["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0]["name"], "audit");
    assert_eq!(consumers[0]["lag"].as_u64(), Some(total_news - k));

    // describe a concrete topic.
    let d = json_lines(&ok(dir, &["topics", "describe", B, "--json"]));
    assert_eq!(d[0]["messages"].as_u64(), Some(4));
    assert_eq!(d[0]["bytes"].as_u64(), Some(counts[1].2));
    assert_eq!(d[0]["consumers"].as_array().unwrap().len(), 1);
    // The prod topic is not read by `audit`.
    let d = json_lines(&ok(dir, &["topics", "describe", C, "--json"]));
    assert_eq!(d[0]["messages"].as_u64(), Some(2));
    assert!(d[0]["consumers"].as_array().unwrap().is_empty());
    // Text form carries the totals.
    let t = ok(dir, &["topics", "describe", "ampy.dev.news.>"]);
    assert!(t.stdout.contains(&format!("messages  {total_news}\n")));
    assert!(t.stdout.contains(&format!("bytes     {news_bytes}\n")));

    // lag: exact, in JSON and text.
    let lag = json_lines(&ok(
        dir,
        &["topics", "lag", "--consumer", "audit", "--json"],
    ));
    assert_eq!(lag.len(), 1);
    assert_eq!(lag[0]["lag"].as_u64(), Some(total_news - k));
    assert_eq!(lag[0]["pattern"], "ampy.dev.news.>");
    assert_eq!(lag[0]["in_flight"].as_u64(), Some(0));
    assert_eq!(lag[0]["newest_seq"].as_u64(), Some(11));
    let lag_all = json_lines(&ok(dir, &["topics", "lag", "--json"]));
    assert_eq!(lag_all.len(), 1);
    let text = ok(dir, &["topics", "lag"]);
    assert!(text.stdout.lines().nth(1).unwrap().starts_with("audit"));

    // Consuming the rest brings lag to 0.
    ok(
        dir,
        &[
            "sub",
            "--pattern",
            "ampy.dev.news.>",
            "--durable",
            "audit",
            "--max",
            &(total_news - k).to_string(),
            "--timeout",
            "5",
        ],
    );
    let lag = json_lines(&ok(
        dir,
        &["topics", "lag", "--consumer", "audit", "--json"],
    ));
    assert_eq!(lag[0]["lag"].as_u64(), Some(0));

    // Unknown consumer: usage error.
    let o = ampybus(dir, &["topics", "lag", "--consumer", "nobody"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("nobody"), "{}", o.stderr);
}

#[test]
fn missing_directory_and_bad_pattern_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let o = ampybus(&missing, &["topics", "list"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(!missing.exists());
    let o = ampybus(tmp.path(), &["topics", "list", "--pattern", "a..b"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
}
