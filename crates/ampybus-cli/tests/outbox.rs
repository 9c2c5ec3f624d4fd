//! `ampybus outbox relay` on a SQLite outbox staged by the library: every row published once,
//! with the `message_id` it got at staging, in staging order; a running relay publishes what
//! is staged while it runs and stops on SIGTERM (exit 0) or SIGINT (exit 130); bad `--db`
//! values named.

mod common;

use ampybus::inbox::sqlite::{SqliteInbox, SqliteOutbox};
use ampybus::{Headers, Topic};
use common::{ampybus_command, ampybus_in};
use std::io::{BufRead, BufReader};

#[test]
fn relay_drain_publishes_staged_rows_once_with_their_ids_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let db = dir.path().join("oms.sqlite3");
    let inbox = SqliteInbox::open(&db).unwrap();
    let mut conn = inbox.connection().unwrap();
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let topic = Topic::parse("ampy.dev.fills.v1.sim").unwrap();
    let ids: Vec<String> = (0..10)
        .map(|i| {
            let h = Headers::for_publish(
                "ampy.fills.v1.Fill",
                "oms@1",
                "oms",
                &format!("acct|co{}", i % 3),
            );
            SqliteOutbox
                .stage(&tx, &topic, h, format!("fill {i}").into_bytes())
                .unwrap()
        })
        .collect();
    tx.commit().unwrap();
    let db_url = format!("sqlite://{}", db.display());
    let relay = |what: &str| {
        let o = ampybus_in(Some(&log), &["outbox", "relay", "--db", &db_url, "--drain"]);
        assert_eq!(o.code, 0, "{what}: {}", o.stderr);
        o.stderr
    };
    let first = relay("first drain");
    assert!(first.contains(": published 10, dead-lettered 0"), "{first}");
    let second = relay("second drain");
    assert!(
        second.contains(": published 0, dead-lettered 0"),
        "{second}"
    );
    let got = published_ids(&log, 20, 1);
    assert_eq!(got, ids);
}

/// The `message_id`s of the fills on the log at `log`, in log order (`sub` waits up to
/// `timeout` seconds for `max` of them).
fn published_ids(log: &std::path::Path, max: u32, timeout: u32) -> Vec<String> {
    let (max, timeout) = (max.to_string(), timeout.to_string());
    let o = ampybus_in(
        Some(log),
        &[
            "sub",
            "--pattern",
            "ampy.dev.fills.>",
            "--json",
            "--max",
            &max,
            "--timeout",
            &timeout,
        ],
    );
    o.json_lines()
        .iter()
        .map(|m| m["headers"]["message_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Stages `n` fills for key `acct|{key}` in one transaction; their ids in staging order.
fn stage(db: &std::path::Path, key: &str, n: usize) -> Vec<String> {
    let inbox = SqliteInbox::open(db).unwrap();
    let mut conn = inbox.connection().unwrap();
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let topic = Topic::parse("ampy.dev.fills.v1.sim").unwrap();
    let ids = (0..n)
        .map(|i| {
            let h =
                Headers::for_publish("ampy.fills.v1.Fill", "oms@1", "oms", &format!("acct|{key}"));
            SqliteOutbox
                .stage(&tx, &topic, h, format!("fill {key} {i}").into_bytes())
                .unwrap()
        })
        .collect();
    tx.commit().unwrap();
    ids
}

#[test]
fn a_running_relay_publishes_what_is_staged_and_stops_on_sigterm_0_and_sigint_130() {
    for (signal, code, key) in [("TERM", 0, "t"), ("INT", 130, "i")] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let db = dir.path().join("oms.sqlite3");
        // The tables exist before the relay opens them.
        drop(SqliteInbox::open(&db).unwrap());
        let db_url = format!("sqlite://{}", db.display());
        let mut child = ampybus_command(Some(&log), &["outbox", "relay", "--db", &db_url])
            .spawn()
            .expect("spawn the relay");
        let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
        let first = err.next().expect("a line").unwrap();
        assert!(first.contains("running (SIGTERM to stop)"), "{first}");
        // Staged while it runs: published, in order, with the staged ids (sub waits for them).
        let ids = stage(&db, key, 3);
        let got = published_ids(&log, 3, 60);
        assert_eq!(got, ids, "{signal}");
        let st = std::process::Command::new("kill")
            .args(["-s", signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{signal}");
        let rest: Vec<String> = err.map_while(Result::ok).collect();
        assert_eq!(
            rest.last().map(String::as_str),
            Some("outbox relay ampybus_outbox@oms.sqlite3: published 3, dead-lettered 0"),
            "{signal}: {rest:?}"
        );
    }
}

#[test]
fn relay_names_a_bad_db() {
    let dir = tempfile::tempdir().unwrap();
    let o = ampybus_in(
        Some(dir.path()),
        &["outbox", "relay", "--db", "mysql://h/oms", "--drain"],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert_eq!(
        o.stderr.trim(),
        "error: --db \"mysql://h/oms\": must be postgres://… or sqlite:///path/to/file"
    );
    let o = ampybus_in(
        Some(dir.path()),
        &[
            "outbox",
            "relay",
            "--db",
            "sqlite:///nonexistent-ampybus/oms.sqlite3",
            "--drain",
        ],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("no such file"), "{}", o.stderr);
}
