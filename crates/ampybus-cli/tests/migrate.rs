//! `ampybus migrate --url DIR` on a copy of the data directory written by the SQLite version
//! of the embedded log (commit 1596101; crates/ampybus/tests/fixtures/embedded-v1596101).

use std::path::Path;

mod common;
use common::ampybus_in;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ampybus/tests/fixtures/embedded-v1596101/data"
);

fn fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for ent in std::fs::read_dir(FIXTURE).unwrap() {
        let ent = ent.unwrap();
        if ent.file_type().unwrap().is_file() {
            std::fs::copy(ent.path(), tmp.path().join(ent.file_name())).unwrap();
        }
    }
    tmp
}

#[test]
fn migrate_converts_prints_the_report_and_a_second_run_changes_nothing() {
    let tmp = fixture();
    let dir = tmp.path();
    let o = ampybus_in(Some(dir), &["migrate"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let out = &o.stdout;
    assert!(
        out.starts_with(&format!("migrated: {}\n", dir.display())),
        "{out}"
    );
    for line in [
        "messages: 111 (bars 53, signals 1, orders 23, fills 23, positions 1, metrics 5, dlq 1, control 4)",
        "dlq messages: 1",
        "consumers: 11 (acked above their cursor: 17, delivered and not acked: 4)",
        "dedupe entries: 38 (0 dedupe-only group(s))",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "no line {line:?} in:\n{out}"
        );
    }
    assert!(dir.join("FORMAT").exists());
    assert!(dir.join("ampybus.sqlite3.migrated").exists());
    assert!(!dir.join("ampybus.sqlite3").exists());

    let o = ampybus_in(Some(dir), &["migrate", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = &o.json_lines()[0];
    assert_eq!(v["already_migrated"], true);
    assert_eq!(v["messages"], 0);
    let o = ampybus_in(Some(dir), &["migrate"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("already migrated: "), "{}", o.stdout);
}

#[test]
fn migrate_json_report_has_the_counts() {
    let tmp = fixture();
    let url = format!("file://{}", tmp.path().display());
    let o = common::ampybus_on(&url, &["migrate", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = &o.json_lines()[0];
    assert_eq!(v["already_migrated"], false);
    assert_eq!(v["messages"], 111);
    assert_eq!(v["messages_by_domain"]["bars"], 53);
    assert_eq!(v["messages_by_domain"]["dlq"], 1);
    assert_eq!(v["dlq_messages"], 1);
    assert_eq!(v["consumers"], 11);
    assert_eq!(v["dedupe_entries"], 38);
}

#[test]
fn migrate_refuses_what_it_cannot_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let o = ampybus_in(Some(tmp.path()), &["migrate"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("neither"), "{}", o.stderr);
    assert!(
        o.stderr.contains(&tmp.path().display().to_string()),
        "{}",
        o.stderr
    );
    assert!(o.stdout.is_empty());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

    let o = common::ampybus_on("nats://127.0.0.1:4222", &["migrate"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("embedded-log data directory"),
        "{}",
        o.stderr
    );

    let missing = Path::new(tmp.path()).join("missing");
    let o = ampybus_in(Some(&missing), &["migrate"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(!missing.exists());
}

#[test]
fn migrate_help_has_examples() {
    let o = ampybus_in(None, &["migrate", "--help"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("Examples:"), "{}", o.stdout);
    assert!(o.stdout.contains("ampybus migrate --url"), "{}", o.stdout);
}
