//! Reading the archive back: `postgres://` as a read URL for `sub --since/--until` and `dlq
//! inspect` (byte for byte what the bus gives over the same window, on the embedded log and on
//! NATS), and `archive verify`.

mod archive_support;
mod common;

use archive_support::{Db, query};
use common::{ampybus_in, ampybus_on};
use std::path::Path;

const SINCE: &str = "2000-01-01T00:00:00Z";
const UNTIL: &str = "2100-01-01T00:00:00Z";

fn publish(url: &str, topic: &str, key: &str, n: usize) {
    for i in 0..n {
        let payload = format!("{key}-{i}");
        common::pub_one(
            url,
            topic,
            key,
            &["--payload", &payload, "--header", "x-desk=rates"],
        );
    }
}

/// `sub --since/--until --json` over `pattern`, lines in the order printed.
fn window_in_order(url: &str, pattern: &str) -> Vec<String> {
    let o = ampybus_on(
        url,
        &[
            "sub",
            "--pattern",
            pattern,
            "--since",
            SINCE,
            "--until",
            UNTIL,
            "--json",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    o.lines().into_iter().map(str::to_owned).collect()
}

/// [`window_in_order`], lines sorted (the archive reads in archive order, the bus in store
/// order).
fn window(url: &str, pattern: &str) -> Vec<String> {
    let mut lines = window_in_order(url, pattern);
    lines.sort();
    lines
}

fn archive(bus: &str, pattern: &str, durable: &str, to: &str, n: usize) {
    let o = ampybus_on(
        bus,
        &[
            "archive",
            "--pattern",
            pattern,
            "--durable",
            durable,
            "--to",
            to,
            "--max",
            &n.to_string(),
            "--timeout",
            "60",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr
            .contains(&format!("archived {n} message(s): {n} new")),
        "{}",
        o.stderr
    );
}

#[test]
fn embedded_window_and_dlq_read_back_from_the_archive_byte_for_byte() {
    let db = Db::shared();
    let dir = tempfile::tempdir().unwrap();
    let bus = dir.path().to_str().unwrap().to_owned();
    publish(&bus, "ampy.dev.news.v1.raw", "n-1", 3);
    publish(&bus, "ampy.dev.fx.v1.rates", "USD.JPY", 2);
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../golden/dlq");
    for f in [
        "decode_error.json",
        "handler_error.json",
        "max_retries.json",
    ] {
        let o = ampybus_on(
            &bus,
            &["pub", "--json-envelope", golden.join(f).to_str().unwrap()],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    archive(&bus, ">", "archive", &db.url, 8);

    let from_bus = window(&bus, ">");
    assert_eq!(from_bus.len(), 8);
    assert_eq!(window(&db.url, ">"), from_bus);
    assert_eq!(
        window(&db.url, "ampy.dev.news.>"),
        window(&bus, "ampy.dev.news.>")
    );
    assert_eq!(window(&db.url, "ampy.dev.news.>").len(), 3);

    // dlq inspect reads the archived DLQ messages as it reads the bus's.
    let inspect = |url: &str| {
        let o = ampybus_on(url, &["dlq", "inspect", "--json"]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let mut l: Vec<String> = o.lines().into_iter().map(str::to_owned).collect();
        l.sort();
        l
    };
    let dlq = inspect(&bus);
    assert_eq!(dlq.len(), 3);
    assert_eq!(inspect(&db.url), dlq);

    // The archive is read-only.
    let o = ampybus_on(
        &db.url,
        &[
            "pub",
            "--topic",
            "ampy.dev.news.v1.raw",
            "--producer",
            "t@1",
            "--source",
            "t",
            "--pk",
            "n-1",
            "--payload",
            "x",
        ],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("the archive is read-only: publishing needs a bus URL"),
        "{}",
        o.stderr
    );

    // verify: equal, then a difference exits 1 naming the topic.
    let verify = || {
        ampybus_in(
            Some(dir.path()),
            &[
                "archive", "verify", "--to", &db.url, "--since", SINCE, "--until", UNTIL,
            ],
        )
    };
    let o = verify();
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(
        o.lines(),
        [
            "OK   ampy.dev.fx.v1.rates: bus 2, archive 2",
            "OK   ampy.dev.news.v1.raw: bus 3, archive 3",
            "OK   ampy.prod.dlq.v1.bars: bus 1, archive 1",
            "OK   ampy.prod.dlq.v1.fills: bus 1, archive 1",
            "OK   ampy.prod.dlq.v1.orders: bus 1, archive 1",
        ]
    );
    query(
        &db.url,
        "UPDATE ampybus.envelopes SET payload_hash = 'sha256:00' WHERE topic = 'ampy.dev.fx.v1.rates' AND message_id = (SELECT min(message_id) FROM ampybus.envelopes WHERE topic = 'ampy.dev.fx.v1.rates')",
    );
    query(
        &db.url,
        "DELETE FROM ampybus.envelopes WHERE topic = 'ampy.dev.news.v1.raw' AND message_id = (SELECT min(message_id) FROM ampybus.envelopes WHERE topic = 'ampy.dev.news.v1.raw')",
    );
    let o = verify();
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(
        &o.lines()[..2],
        [
            "DIFF ampy.dev.fx.v1.rates: bus 2, archive 2 (payload hashes differ)",
            "DIFF ampy.dev.news.v1.raw: bus 3, archive 2",
        ]
    );
    assert!(o.stderr.contains("2 topic(s) differ"), "{}", o.stderr);
}

#[test]
fn nats_window_reads_back_from_the_archive_byte_for_byte() {
    common::start_broker("nats");
    let db = Db::shared();
    let nats = "nats://127.0.0.1:4222?stream_prefix=AMPYARCH&max_age_days=1";
    let id = common::unique();
    let pattern = format!("ampy.dev.news.v1.arch{id}.>");
    publish(nats, &format!("ampy.dev.news.v1.arch{id}.a"), "n-a", 3);
    publish(nats, &format!("ampy.dev.news.v1.arch{id}.b"), "n-b", 2);
    archive(nats, &pattern, &format!("arch{id}"), &db.url, 5);
    let from_bus = window(nats, &pattern);
    assert_eq!(from_bus.len(), 5);
    assert_eq!(window(&db.url, &pattern), from_bus);
}

#[test]
fn a_bus_with_archive_option_serves_what_its_transport_no_longer_holds() {
    let db = Db::shared();
    // The old log: archived, then gone from the bus we read (a fresh log holds only new ones).
    let old = tempfile::tempdir().unwrap();
    let old_url = old.path().to_str().unwrap().to_owned();
    publish(&old_url, "ampy.dev.news.v1.raw", "n-1", 3);
    archive(&old_url, "ampy.dev.news.>", "archive", &db.url, 3);
    let new = tempfile::tempdir().unwrap();
    let new_url = new.path().to_str().unwrap().to_owned();
    publish(&new_url, "ampy.dev.news.v1.raw", "n-1", 2);

    let sub = |url: &str| window_in_order(url, "ampy.dev.news.>");
    let encoded: String = url::form_urlencoded::byte_serialize(db.url.as_bytes()).collect();
    let tiered = sub(&format!("{new_url}?archive={encoded}"));
    let mut want = sub(&old_url);
    want.extend(sub(&new_url));
    assert_eq!(tiered.len(), 5);
    assert_eq!(tiered, want);
    // The option's credentials never show.
    let o = ampybus_on(
        &format!("{new_url}?archive=postgres%3A%2F%2Fpostgres%3Asecret%40127.0.0.1%3A1%2Fx"),
        &["sub", "--pattern", ">", "--since", SINCE],
    );
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(!o.stderr.contains("secret"), "{}", o.stderr);
}
