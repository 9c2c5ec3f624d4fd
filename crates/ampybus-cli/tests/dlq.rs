//! End-to-end tests of `ampybus dlq inspect|redrive|purge` on a temporary data directory.

use ampybus::runtime::build_dlq_envelope;
use ampybus::{Bus, Envelope, Headers, Topic};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

const ORDERS: &str = "ampy.dev.orders.v1.requests";
const NEWS: &str = "ampy.dev.news.v1.raw";

mod common;
use common::{Out, ampybus_in};

fn run(dir: &Path, args: &[&str]) -> Out {
    ampybus_in(Some(dir), args)
}

fn ok(dir: &Path, args: &[&str]) -> Out {
    let o = run(dir, args);
    assert_eq!(o.code, 0, "{args:?} failed:\n{}", o.stderr);
    o
}

fn header<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v["headers"][name].as_str()
}

/// Two `handler_error` entries from `ORDERS` (retry_count 3) and one `decode_error` from
/// `NEWS` (retry_count 1); returns the original message ids of the handler_error ones.
fn seed(dir: &Path) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bus = Bus::connect(dir.to_str().unwrap()).await.unwrap();
        let mut batch = Vec::new();
        let mut ids = Vec::new();
        for (i, (topic, reason, retries)) in [
            (ORDERS, "handler_error: poison 0", 3),
            (ORDERS, "handler_error: poison 1", 3),
            (NEWS, "decode_error: bad bytes", 1),
        ]
        .into_iter()
        .enumerate()
        {
            let t = Topic::parse(topic).unwrap();
            let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "test", &format!("k{i}"));
            if reason.starts_with("handler_error") {
                ids.push(h.message_id().unwrap().to_owned());
            }
            let orig = Envelope::new(&t, h, format!("payload-{i}").into_bytes());
            batch.push(build_dlq_envelope(
                &orig,
                &t.dlq_topic(),
                reason,
                retries,
                "svc",
            ));
        }
        bus.publish_wire(batch).await.unwrap();
        bus.close().await.unwrap();
        ids
    })
}

fn sub(dir: &Path, pattern: &str) -> Vec<Value> {
    ok(
        dir,
        &["sub", "--pattern", pattern, "--json", "--timeout", "0.5"],
    )
    .json_lines()
}

#[test]
fn inspect_filters_by_reason() {
    let d = tempfile::tempdir().unwrap();
    seed(d.path());
    let all = ok(d.path(), &["dlq", "inspect", "--json"]).json_lines();
    assert_eq!(all.len(), 3);
    let h = ok(
        d.path(),
        &["dlq", "inspect", "--json", "--reason", "handler_error"],
    )
    .json_lines();
    assert_eq!(h.len(), 2);
    for v in &h {
        assert_eq!(v["topic"], "ampy.dev.dlq.v1.orders");
        assert_eq!(header(v, "original_topic"), Some(ORDERS));
        assert!(
            header(v, "dlq_reason")
                .unwrap()
                .starts_with("handler_error: poison")
        );
    }
    let dec = ok(
        d.path(),
        &["dlq", "inspect", "--json", "--reason", "decode_error"],
    )
    .json_lines();
    assert_eq!(dec.len(), 1);
    assert_eq!(header(&dec[0], "original_topic"), Some(NEWS));
    let none = ok(
        d.path(),
        &[
            "dlq",
            "inspect",
            "--pattern",
            "ampy.prod.dlq.v1.>",
            "--json",
        ],
    );
    assert_eq!(none.lines().len(), 0);
    let pretty = ok(d.path(), &["dlq", "inspect", "--reason", "decode_error"]);
    let text = pretty
        .stdout
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        text.contains("original_topic: ampy.dev.news.v1.raw"),
        "{}",
        pretty.stdout
    );
    assert!(text.contains("dlq_reason: decode_error: bad bytes"));
    assert!(text.contains("payload: 9 bytes"));
    let bad = run(d.path(), &["dlq", "inspect", "--reason", "nope"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("--reason \"nope\""), "{}", bad.stderr);
}

#[test]
fn redrive_publishes_exactly_the_selected_ones() {
    let d = tempfile::tempdir().unwrap();
    let ids = seed(d.path());
    let dlq = ok(
        d.path(),
        &["dlq", "inspect", "--json", "--reason", "handler_error"],
    )
    .json_lines();
    let dlq_ids: Vec<&str> = dlq
        .iter()
        .map(|v| header(v, "message_id").unwrap())
        .collect();

    let dry = ok(
        d.path(),
        &["dlq", "redrive", "--reason", "handler_error", "--dry-run"],
    );
    assert_eq!(dry.lines().len(), 2);
    for (line, id) in dry.lines().iter().zip(&dlq_ids) {
        assert!(
            line.starts_with(&format!("would redrive {id} -> {ORDERS} as ")),
            "{line}"
        );
    }
    assert_eq!(sub(d.path(), "ampy.dev.orders.>").len(), 0);
    assert_eq!(sub(d.path(), "ampy.dev.news.>").len(), 0);

    let done = ok(
        d.path(),
        &[
            "dlq",
            "redrive",
            "--reason",
            "handler_error",
            "--rate",
            "1000",
        ],
    );
    let lines = done.lines();
    assert_eq!(lines.len(), 2, "{}", done.stdout);
    let mut new_ids = Vec::new();
    for (line, id) in lines.iter().zip(&dlq_ids) {
        let prefix = format!("redrive {id} -> {ORDERS} as ");
        assert!(line.starts_with(&prefix), "{line}");
        new_ids.push(line[prefix.len()..].to_owned());
    }
    let got = sub(d.path(), "ampy.dev.orders.>");
    assert_eq!(got.len(), 2);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v["topic"], ORDERS);
        assert_eq!(header(v, "message_id"), Some(new_ids[i].as_str()));
        assert_eq!(header(v, "redrive_of"), Some(ids[i].as_str()));
        assert_ne!(new_ids[i], ids[i]);
        assert_eq!(header(v, "retry_count"), Some("4"));
        for gone in [
            "dlq_reason",
            "original_topic",
            "dlq_at",
            "original_message_id",
        ] {
            assert_eq!(header(v, gone), None, "{gone} still set");
        }
    }
    assert_eq!(sub(d.path(), "ampy.dev.news.>").len(), 0);
    // Redrive keeps the DLQ entries.
    assert_eq!(ok(d.path(), &["dlq", "inspect", "--json"]).lines().len(), 3);
}

#[test]
fn purge_refuses_without_yes_and_deletes_exactly_the_selected_ones() {
    let d = tempfile::tempdir().unwrap();
    seed(d.path());
    let refused = run(d.path(), &["dlq", "purge", "--reason", "handler_error"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("pass --yes"), "{}", refused.stderr);
    assert_eq!(ok(d.path(), &["dlq", "inspect", "--json"]).lines().len(), 3);

    let before = ok(
        d.path(),
        &["dlq", "inspect", "--json", "--reason", "handler_error"],
    )
    .json_lines();
    let mut want: Vec<String> = before
        .iter()
        .map(|v| {
            format!(
                "purged {} from ampy.dev.dlq.v1.orders",
                header(v, "message_id").unwrap()
            )
        })
        .collect();
    let purged = ok(
        d.path(),
        &["dlq", "purge", "--reason", "handler_error", "--yes"],
    );
    let mut got: Vec<String> = purged.lines().iter().map(|s| s.to_string()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let left = ok(d.path(), &["dlq", "inspect", "--json"]).json_lines();
    assert_eq!(left.len(), 1);
    assert!(
        header(&left[0], "dlq_reason")
            .unwrap()
            .starts_with("decode_error")
    );

    let wrong = run(
        d.path(),
        &["dlq", "purge", "--pattern", "ampy.dev.news.>", "--yes"],
    );
    assert_eq!(wrong.code, 2, "{}", wrong.stderr);
    let nats = Command::new(env!("CARGO_BIN_EXE_ampybus"))
        .args(["--url", "nats://localhost:4222", "dlq", "purge", "--yes"])
        .stdin(Stdio::null())
        .output()
        .expect("run ampybus");
    let nats = Out {
        code: nats.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&nats.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&nats.stderr).into_owned(),
    };
    assert_eq!(nats.code, 2);
    assert!(
        nats.stderr
            .contains("purge is supported on the embedded log only"),
        "{}",
        nats.stderr
    );
}
