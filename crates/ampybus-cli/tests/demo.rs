//! `ampybus demo`: runs the end-to-end pipeline twice on one data directory and checks the
//! exact per-run counts of the JSON summary, and the positions the positions service applied
//! through its SQLite inbox (each fill once, a second delivery of every fill skipped).

use serde_json::Value;
use std::process::Command;

fn demo(dir: &std::path::Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ampybus"))
        .args(["demo", "--url"])
        .arg(dir)
        .args(["--bars", "60", "--json"])
        .output()
        .expect("run ampybus demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON summary on stdout")
}

/// Quantity and fills per position (the average price depends on the order in which fills of
/// different orders arrive).
fn quantities(s: &Value) -> Value {
    let p = s["positions"]
        .as_object()
        .expect("positions in the summary");
    p.iter()
        .map(|(k, v)| (k.clone(), serde_json::json!([v["qty"], v["fills"]])))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The counts that must be the same on every run.
fn per_run(s: &Value) -> Value {
    serde_json::json!({
        "positions": quantities(s),
        "inbox": {"redelivered": s["inbox"]["redelivered"], "skipped": s["inbox"]["skipped"]},
        "counts": s["counts"],
        "topics": s["topics"],
        "dlq": s["dlq"],
        "retries": s["retries"],
        "replay": {
            "read": s["replay"]["read"],
            "applied": s["replay"]["applied"],
            "skipped_duplicates": s["replay"]["skipped_duplicates"],
            "failed": s["replay"]["failed"],
        },
    })
}

#[test]
fn demo_runs_twice_on_one_dir_with_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let first = demo(dir.path());
    assert_eq!(first["ok"], true, "{first}");
    let c = &first["counts"];
    assert_eq!(c["bars"], 180);
    assert_eq!(c["bars_handled"], 180);
    assert_eq!(c["poison"], 1);
    assert_eq!(c["metrics"], 5);
    let signals = c["signals"].as_u64().unwrap();
    assert!(signals > 0, "{first}");
    assert_eq!(c["orders"], signals);
    assert_eq!(c["fills"], signals);
    assert_eq!(c["positions"], signals);
    let t = &first["topics"];
    assert_eq!(t["bars"], 181);
    assert_eq!(t["signals"], signals);
    assert_eq!(t["orders"], signals);
    assert_eq!(t["fills"], signals);
    assert_eq!(t["positions"], signals);
    assert_eq!(t["metrics"], 5);
    assert_eq!(t["dlq"], 1);
    assert_eq!(first["dlq"]["total"], 1);
    assert_eq!(first["dlq"]["by_reason"]["decode_error"], 1);
    assert_eq!(first["retries"], 0);
    let r = &first["replay"];
    assert_eq!(r["read"], 180);
    assert_eq!(r["applied"], 0);
    assert_eq!(r["skipped_duplicates"], 180);
    assert_eq!(r["failed"], 0);
    assert_eq!(first["latency_us"]["samples"], 181 + 3 * signals);
    // Positions from the positions service's table, each fill applied once: the synthetic data
    // is seeded, so the quantities are exact. Every fill handed to it a second time was skipped
    // by its inbox.
    assert_eq!(
        quantities(&first),
        serde_json::json!({
            "PAPER-1|AAPL": [300.0, 9],
            "PAPER-1|MSFT": [100.0, 13],
            "PAPER-1|NVDA": [600.0, 12],
        }),
        "{first}"
    );
    let fills: u64 = first["positions"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v["fills"].as_u64().unwrap())
        .sum();
    assert_eq!(fills, signals);
    assert_eq!(first["inbox"]["redelivered"], signals);
    assert_eq!(first["inbox"]["skipped"], signals);
    let db = dir.path().join("demo-positions.sqlite3");
    assert_eq!(first["inbox"]["db"], db.display().to_string());
    let c = rusqlite::Connection::open(&db).unwrap();
    let rows: i64 = c
        .query_row(
            "SELECT count(*) FROM ampybus_inbox WHERE consumer = ?1",
            [format!("demo-positions-{}", first["run"].as_str().unwrap())],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows as u64, signals);

    let second = demo(dir.path());
    assert_eq!(second["ok"], true, "{second}");
    assert_ne!(first["run"], second["run"]);
    assert_eq!(per_run(&first), per_run(&second));
}
