//! `ampybus::transport::embedded::migrate` on real files: the data directory written by the
//! SQLite version of the embedded log (commit 1596101; `tests/fixtures/embedded-v1596101`,
//! whose README says how it was made), copied to a temporary directory and converted.
//!
//! Message-by-message and consumer-by-consumer checks through the log and group modules are
//! unit tests of `transport/embedded/migrate.rs`. The end-to-end check through the bus
//! (`the_bus_reads_a_migrated_directory`) is ignored until `EmbeddedLog` reads the new format.

use ampybus::transport::embedded::{MigrateReport, migrate};
use ampybus::transport::{SubscribeSpec, WindowQuery};
use ampybus::{Bus, Domain, ErrorKind, Headers, TopicPattern};
use rusqlite::{Connection, OpenFlags};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/embedded-v1596101/data"
);

/// A copy of the fixture's data directory.
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

/// Every file under `dir` (relative path → bytes).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, p: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for ent in std::fs::read_dir(p).unwrap() {
            let ent = ent.unwrap();
            let path = ent.path();
            if ent.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn under(t: &BTreeMap<PathBuf, Vec<u8>>, prefix: &str) -> BTreeMap<PathBuf, Vec<u8>> {
    t.iter()
        .filter(|(p, _)| p.starts_with(prefix))
        .map(|(p, b)| (p.clone(), b.clone()))
        .collect()
}

/// The counts of the fixture (see its README: 60 + 6 published messages, the demo's 45, three
/// consumers of the CLI and the demo's eight, the demo's 38 dedupe records).
fn check_fixture_report(r: &MigrateReport, dir: &Path) {
    assert!(!r.already_migrated);
    assert_eq!(r.dir, dir);
    assert_eq!(r.messages, 111);
    let by: Vec<(Domain, u64)> = r.messages_by_domain.iter().map(|(d, n)| (*d, *n)).collect();
    assert_eq!(
        by,
        vec![
            (Domain::Bars, 53),
            (Domain::Signals, 1),
            (Domain::Orders, 23),
            (Domain::Fills, 23),
            (Domain::Positions, 1),
            (Domain::Metrics, 5),
            (Domain::Dlq, 1),
            (Domain::Control, 4),
        ]
    );
    assert_eq!(r.dlq_messages, 1);
    assert_eq!(r.consumers, 11);
    assert_eq!(r.acked_above_cursor, 17);
    assert_eq!(r.in_flight, 4);
    assert_eq!(r.dedupe_entries, 38);
    assert_eq!(r.dedupe_only_groups, 0);
    assert_eq!(r.legacy_file, Some(dir.join("ampybus.sqlite3.migrated")));
}

#[test]
fn the_fixture_is_converted_and_committed_by_the_format_file() {
    let tmp = fixture();
    let dir = tmp.path();
    let r = migrate(dir).unwrap();
    check_fixture_report(&r, dir);
    assert!(!r.redone);
    let text = r.to_string();
    assert!(text.contains("messages: 111 (bars 53, signals 1, orders 23, fills 23, positions 1, metrics 5, dlq 1, control 4)"), "{text}");
    assert!(text.contains("dlq messages: 1"), "{text}");
    assert!(text.contains("consumers: 11"), "{text}");
    assert!(text.contains("dedupe entries: 38"), "{text}");

    assert_eq!(
        std::fs::read_to_string(dir.join("FORMAT")).unwrap(),
        "ampybus-log 2\n"
    );
    assert!(!dir.join("ampybus.sqlite3").exists());
    assert!(!dir.join("ampybus.sqlite3-wal").exists());
    // Reading the old file left no empty WAL beside it.
    assert!(!dir.join("ampybus.sqlite3.migrated-wal").exists());
    assert!(!dir.join("ampybus.sqlite3.migrated-shm").exists());
    // The old file is kept, unchanged in content.
    let c = Connection::open_with_flags(
        dir.join("ampybus.sqlite3.migrated"),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 111);
    // One log per domain with messages, one group per consumer.
    let t = tree(dir);
    for d in [
        "bars",
        "signals",
        "orders",
        "fills",
        "positions",
        "metrics",
        "dlq",
        "control",
    ] {
        assert!(
            t.keys()
                .any(|p| p.starts_with(format!("log/{d}/"))
                    && p.extension().is_some_and(|e| e == "seg")),
            "no segment for {d}"
        );
    }
    let groups: BTreeSet<String> = std::fs::read_dir(dir.join("groups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(groups.len(), 11);
    assert!(groups.contains("audit") && groups.contains("fills-audit") && groups.contains("stuck"));
}

#[test]
fn rerunning_says_already_migrated_and_changes_nothing() {
    let tmp = fixture();
    let dir = tmp.path();
    migrate(dir).unwrap();
    let before = tree(dir);
    let r = migrate(dir).unwrap();
    assert!(r.already_migrated);
    assert_eq!(r.messages, 0);
    assert_eq!(r.legacy_file, Some(dir.join("ampybus.sqlite3.migrated")));
    assert!(r.to_string().starts_with("already migrated: "), "{r}");
    assert_eq!(tree(dir), before);
}

#[test]
fn an_interrupted_run_is_redone_from_the_start() {
    let clean = fixture();
    migrate(clean.path()).unwrap();

    let tmp = fixture();
    let dir = tmp.path();
    // What a run killed before its commit point leaves: partial logs and groups, the shared
    // page, the writer lock, a half-written format marker; and the old file as it was.
    std::fs::create_dir_all(dir.join("log/bars")).unwrap();
    std::fs::write(
        dir.join("log/bars/00000000000000000001.seg"),
        b"AMPYSEG1torn",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("log/zzz")).unwrap();
    std::fs::create_dir_all(dir.join("groups/audit")).unwrap();
    std::fs::write(dir.join("groups/audit/journal"), [7u8; 40]).unwrap();
    std::fs::write(
        dir.join("groups/audit/meta"),
        b"ampybus-group 1\nname audit\n",
    )
    .unwrap();
    std::fs::write(dir.join("state.shm"), [1u8; 4096]).unwrap();
    std::fs::write(dir.join("writer.lock"), b"").unwrap();
    std::fs::write(dir.join("FORMAT.migrate.tmp"), b"ampy").unwrap();

    let r = migrate(dir).unwrap();
    check_fixture_report(&r, dir);
    assert!(r.redone);
    assert!(r.to_string().contains("interrupted"), "{r}");
    let (a, b) = (tree(clean.path()), tree(dir));
    // The logs are byte for byte those of an uninterrupted run (log times are the old ones).
    assert_eq!(under(&b, "log"), under(&a, "log"));
    // The same groups, with the same definitions.
    let metas = |t: &BTreeMap<PathBuf, Vec<u8>>| -> BTreeMap<PathBuf, Vec<u8>> {
        under(t, "groups")
            .into_iter()
            .filter(|(p, _)| p.ends_with("meta"))
            .collect()
    };
    assert_eq!(metas(&b), metas(&a));
    assert_eq!(
        under(&b, "groups").keys().collect::<Vec<_>>(),
        under(&a, "groups").keys().collect::<Vec<_>>()
    );
    assert!(!b.contains_key(Path::new("FORMAT.migrate.tmp")));
    assert!(!b.keys().any(|p| p.starts_with("log/zzz")));
}

#[test]
fn two_runs_at_once_convert_once() {
    let tmp = fixture();
    let dir = tmp.path().to_path_buf();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let d = dir.clone();
            std::thread::spawn(move || migrate(&d).unwrap())
        })
        .collect();
    let mut reports: Vec<MigrateReport> = runs.into_iter().map(|t| t.join().unwrap()).collect();
    reports.sort_by_key(|r| r.already_migrated);
    assert!(reports[1].already_migrated, "{}", reports[1]);
    check_fixture_report(&reports[0], &dir);
    let clean = fixture();
    migrate(clean.path()).unwrap();
    assert_eq!(under(&tree(&dir), "log"), under(&tree(clean.path()), "log"));
}

#[test]
fn a_run_stopped_after_its_commit_point_is_finished() {
    let tmp = fixture();
    let dir = tmp.path();
    migrate(dir).unwrap();
    // Stopped between writing FORMAT and renaming the old file.
    std::fs::rename(
        dir.join("ampybus.sqlite3.migrated"),
        dir.join("ampybus.sqlite3"),
    )
    .unwrap();
    let log_before = under(&tree(dir), "log");
    let r = migrate(dir).unwrap();
    assert!(r.already_migrated);
    assert!(!dir.join("ampybus.sqlite3").exists());
    assert!(dir.join("ampybus.sqlite3.migrated").exists());
    assert_eq!(under(&tree(dir), "log"), log_before);
}

#[test]
fn a_directory_of_neither_format_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let e = migrate(dir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let msg = e.to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(
        msg.contains("neither") && msg.contains("ampybus.sqlite3"),
        "{msg}"
    );
    assert!(tree(dir).is_empty(), "nothing may be left behind");

    let missing = dir.join("nope");
    let e = migrate(&missing).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("nope"), "{e}");
    assert!(!missing.exists());

    std::fs::write(dir.join("FORMAT"), "ampybus-log 9\n").unwrap();
    let e = migrate(dir).unwrap_err().to_string();
    assert!(e.contains("unknown format") && e.contains("FORMAT"), "{e}");
}

/// Not a test: makes the SQLite file of a fixture directory self-contained (checkpoints its
/// WAL into it and compacts it, so no `-wal`/`-shm` file is needed). See the fixture's
/// README.md: `AMPYBUS_CHECKPOINT_DIR=DIR cargo test -p ampybus --test embedded_migrate --
/// --ignored checkpoint_a_fixture_directory`.
#[test]
#[ignore = "a tool for making fixtures, run by hand"]
fn checkpoint_a_fixture_directory() {
    let dir = std::env::var("AMPYBUS_CHECKPOINT_DIR").expect("AMPYBUS_CHECKPOINT_DIR");
    let db = Path::new(&dir).join("ampybus.sqlite3");
    let c = Connection::open(&db).unwrap();
    let (busy, _, _): (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(busy, 0, "{} is in use", db.display());
    c.execute_batch("VACUUM").unwrap();
    let (busy, _, _): (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(busy, 0);
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    drop(c);
    for f in ["ampybus.sqlite3-wal", "ampybus.sqlite3-shm"] {
        assert!(!Path::new(&dir).join(f).exists(), "{f} left");
    }
}

/// The old contents, read from the kept SQLite file.
struct OldRow {
    seq: i64,
    topic: String,
    log_us: i64,
    headers: Headers,
    payload: Vec<u8>,
}

fn old_rows(db: &Path) -> Vec<OldRow> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut st = c
        .prepare("SELECT seq, topic, log_us, headers, payload FROM messages ORDER BY seq")
        .unwrap();
    st.query_map([], |r| {
        Ok(OldRow {
            seq: r.get(0)?,
            topic: r.get(1)?,
            log_us: r.get(2)?,
            headers: ampybus::transport::decode_headers(&r.get::<_, Vec<u8>>(3)?).unwrap(),
            payload: r.get(4)?,
        })
    })
    .unwrap()
    .map(|r| r.unwrap())
    .collect()
}

/// The whole path through the bus: a migrated directory opens and serves what the old one held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_reads_a_migrated_directory() {
    let tmp = fixture();
    let dir = tmp.path();
    // The fixture's dedupe records are older than the dedupe window (7 days), which would
    // hide them: make them recent first (only their times change).
    let now_ms = chrono::Utc::now().timestamp_millis();
    Connection::open(dir.join("ampybus.sqlite3"))
        .unwrap()
        .execute("UPDATE applied SET applied_at_ms = ?1", [now_ms])
        .unwrap();
    migrate(dir).unwrap();
    let old = old_rows(&dir.join("ampybus.sqlite3.migrated"));
    // No retention may run on the fixture's old messages.
    let url = format!("file://{}?retention_days=unlimited", dir.display());
    let bus = Bus::connect(&url).await.unwrap();

    // Every message, in order, with its topic, headers, payload and store time.
    let replay = bus.transport().replay().unwrap();
    let mut q = WindowQuery::new(TopicPattern::parse(">").unwrap());
    let mut got = Vec::new();
    loop {
        let page = replay.read_window(&q).await.unwrap();
        let Some(last) = page.last() else { break };
        q.after_sequence = last.sequence;
        got.extend(page);
    }
    assert_eq!(got.len(), old.len());
    let mut new_of_old = HashMap::new();
    for (n, o) in got.iter().zip(&old) {
        assert_eq!(n.envelope.topic, o.topic);
        assert_eq!(n.envelope.headers, o.headers);
        assert_eq!(&n.envelope.payload[..], &o.payload[..]);
        assert_eq!(n.stored_at.timestamp_micros(), o.log_us);
        new_of_old.insert(o.seq, n.sequence);
    }
    let id = |h: &Headers| h.message_id().unwrap().to_owned();
    let dlq = got
        .iter()
        .filter(|m| m.envelope.topic.starts_with("ampy.dev.dlq."))
        .count();
    assert_eq!(dlq, 1);

    // `audit` (cursor 25, acked 26..=35) resumes with exactly old 36..=111.
    let expect: BTreeSet<String> = old
        .iter()
        .filter(|o| o.seq > 35)
        .map(|o| id(&o.headers))
        .collect();
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(
            TopicPattern::parse("ampy.dev.>").unwrap(),
            "audit",
        ))
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    loop {
        let batch = sub.fetch(64, Duration::from_millis(500)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for d in batch {
            assert_eq!(d.info.delivery_count, 1);
            assert!(seen.insert(id(&d.envelope.headers)));
            d.ack().await.unwrap();
        }
    }
    assert_eq!(seen, expect);

    // `stuck` had old 1..=4 in flight: they come again, counted as delivered before.
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(
            TopicPattern::parse("ampy.dev.orders.>").unwrap(),
            "stuck",
        ))
        .await
        .unwrap();
    let first = sub.fetch(4, Duration::from_secs(2)).await.unwrap();
    let firsts: Vec<u64> = first.iter().map(|d| d.info.sequence).collect();
    let want: Vec<u64> = (1..=4).map(|s| new_of_old[&s]).collect();
    assert_eq!(firsts, want);
    assert!(first.iter().all(|d| d.info.delivery_count >= 2));
    drop(first);

    // The dedupe records: every applied key reported as applied for its consumer.
    let store = bus.transport().dedupe_store().unwrap();
    let c = Connection::open_with_flags(
        dir.join("ampybus.sqlite3.migrated"),
        OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut st = c.prepare("SELECT consumer, key FROM applied").unwrap();
    let applied: Vec<(String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(applied.len(), 38);
    for (consumer, key) in &applied {
        assert!(
            store
                .is_applied(consumer, std::slice::from_ref(key))
                .await
                .unwrap(),
            "{consumer} {key}"
        );
    }
    assert!(
        !store
            .is_applied("audit", &["never".to_owned()])
            .await
            .unwrap()
    );
    bus.close().await.unwrap();
}
