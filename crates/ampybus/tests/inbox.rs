//! The transactional inbox and outbox (issue 21) on real databases: SQLite files and
//! PostgreSQL (a database of its own on the shared server; a server of its own for the outage
//! test), with the embedded log as the bus. Exact counts: what was applied, what was skipped,
//! what was rolled back. Inbox consumers declared on a `Service` too.

#[path = "../../ampybus-cli/tests/archive_support/mod.rs"]
mod archive_support;
mod common;

use ampybus::inbox::pg::{DEFAULT_CONFLICT_TURNS, PgInbox, PgOutbox, pg_handler_fn};
use ampybus::inbox::sqlite::{SqliteInbox, SqliteOutbox};
use ampybus::inbox::{OutboxRelay, RelayOptions};
use ampybus::runtime::{
    Consumer, ConsumerHandle, DlqCode, Handler, Message, Outcome, RetryPolicy, handler_sync,
};
use ampybus::service::{Service, ServiceBuilder, StopReason};
use ampybus::transport::{StartAt, SubscribeSpec};
use ampybus::{Bus, ErrorKind, Headers, Topic, TopicPattern};
use archive_support::{Db, OwnServer, count, query};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Waits for `cond`, failing after a generous minute (a hang becomes a failure).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An embedded log and a SQLite inbox in a fresh directory, with the test's `effects` table.
async fn sqlite_setup(effects_table: &str) -> (tempfile::TempDir, Bus, SqliteInbox) {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(dir.path().join("log").to_str().unwrap())
        .await
        .unwrap();
    let inbox = SqliteInbox::open(dir.path().join("pos.sqlite3")).unwrap();
    inbox
        .connection()
        .unwrap()
        .execute_batch(effects_table)
        .unwrap();
    (dir, bus, inbox)
}

fn fills() -> Topic {
    Topic::parse("ampy.dev.fills.v1.sim").unwrap()
}

/// A fill: `qty` and what the handler should do (`ok`, `retry-once`, `panic`, `dead`).
fn fill_headers(key: &str) -> Headers {
    Headers::for_publish("ampy.fills.v1.Fill", "test@1", "test", key)
}

async fn publish(bus: &Bus, h: Headers, body: &str) {
    bus.publish(&fills(), h, body.as_bytes().to_vec())
        .await
        .unwrap();
}

/// The mixed batch both inbox tests send: 20 plain fills, one exact copy, one dedupe-key
/// twin, one that fails its first attempt after writing, one that panics and one that asks
/// for the DLQ after writing. Returns the message ids expected to be applied.
async fn publish_mixed(bus: &Bus) -> Vec<String> {
    let mut applied = Vec::new();
    for i in 0..20 {
        let h = fill_headers(&format!("a{}|co{i}", i % 4));
        applied.push(h.message_id().unwrap().to_owned());
        let copy = h.clone();
        publish(bus, h, &format!("{}|ok", i + 1)).await;
        if i == 7 {
            publish(bus, copy, &format!("{}|ok", i + 1)).await;
        }
    }
    let twin_a = fill_headers("a9|dk").with("dedupe_key", "fill-dk");
    applied.push(twin_a.message_id().unwrap().to_owned());
    publish(bus, twin_a, "100|ok").await;
    publish(
        bus,
        fill_headers("a9|dk").with("dedupe_key", "fill-dk"),
        "100|ok",
    )
    .await;
    let retry = fill_headers("a8|r");
    applied.push(retry.message_id().unwrap().to_owned());
    publish(bus, retry, "1000|retry-once").await;
    publish(bus, fill_headers("a7|p"), "5|panic").await;
    publish(bus, fill_headers("a6|d"), "7|dead").await;
    applied
}

/// The quantity of a payload `qty|mode`.
fn qty_of(payload: &[u8]) -> i64 {
    let s = std::str::from_utf8(payload).unwrap();
    s.split_once('|').unwrap().0.parse().unwrap()
}

/// The handler's decision for a payload `qty|mode`; `failed` remembers the retry-once case.
fn decide(payload: &[u8], failed: &AtomicBool) -> Outcome {
    let s = std::str::from_utf8(payload).unwrap();
    match s.split_once('|').unwrap().1 {
        "ok" => Outcome::Ok,
        "retry-once" if !failed.swap(true, Ordering::SeqCst) => Outcome::Retry {
            after: Some(Duration::from_millis(20)),
        },
        "retry-once" => Outcome::Ok,
        "panic" => panic!("handler panic after writing its effect"),
        "dead" => Outcome::DeadLetter("handler_error: refused after writing".into()),
        m => panic!("unknown mode {m}"),
    }
}

/// 20 + 1 copy + 2 twins + 1 retried settled Ok (2 of them skips), 1 panic, 1 dead letter.
async fn wait_settled(handle: &ConsumerHandle) {
    let t = Instant::now();
    loop {
        let s = handle.stats();
        if s.handled_ok == 24 && s.dead_lettered_total() == 2 && s.in_flight == 0 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "not settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publishes the mixed batch to a started consumer "pos", waits until every message settled,
/// stops it and checks its counts; returns the ids that must have been applied.
async fn run_mixed(bus: &Bus, handle: ConsumerHandle, skipped: impl Fn() -> u64) -> Vec<String> {
    let applied = publish_mixed(bus).await;
    wait_settled(&handle).await;
    let stats = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stats.dlq(DlqCode::HandlerPanic), 1);
    assert_eq!(stats.dlq(DlqCode::HandlerError), 1);
    assert_eq!(stats.retried, 1);
    assert_eq!(skipped(), 2);
    assert_metrics(bus, "pos", 2);
    applied
}

/// The effect rows (message id, quantity) are the applied messages', each once: nothing of a
/// skipped, rolled-back, panicked or dead-lettered attempt is left.
fn assert_effects(rows: &[(String, i64)], applied: &[String]) {
    let mut got: Vec<&str> = rows.iter().map(|(m, _)| m.as_str()).collect();
    let mut want: Vec<&str> = applied.iter().map(|s| s.as_str()).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    let sum: i64 = rows.iter().map(|(_, q)| q).sum();
    assert_eq!(sum, (1..=20).sum::<i64>() + 100 + 1000);
}

fn assert_metrics(bus: &Bus, consumer: &str, skipped: u64) {
    let text = bus.metrics().encode();
    let line = format!("bus_inbox_skipped_total{{consumer=\"{consumer}\"}} {skipped}");
    assert!(text.contains(&line), "{line} not in\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_inbox_applies_each_message_once_and_rolls_back_failures() {
    let (_dir, bus, inbox) =
        sqlite_setup("CREATE TABLE effects (message_id TEXT NOT NULL, qty INTEGER NOT NULL)").await;
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.fills.>").unwrap(),
        "pos",
    )
    .inbox(inbox.handler(move |msg, tx| {
        // The effect is written first, whatever the outcome: rollbacks must undo it.
        tx.execute(
            "INSERT INTO effects (message_id, qty) VALUES (?1, ?2)",
            rusqlite::params![msg.headers.message_id().unwrap(), qty_of(&msg.payload)],
        )
        .unwrap();
        decide(&msg.payload, &f)
    }))
    .retry(RetryPolicy {
        max_attempts: 3,
        ..Default::default()
    })
    .start()
    .await
    .unwrap();
    let applied = run_mixed(&bus, handle, || inbox.skipped("pos")).await;
    let c = inbox.connection().unwrap();
    let rows: Vec<(String, i64)> = c
        .prepare("SELECT message_id, qty FROM effects")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_effects(&rows, &applied);
    let inbox_rows: i64 = c
        .query_row(
            "SELECT count(*) FROM ampybus_inbox WHERE consumer = 'pos'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(inbox_rows, applied.len() as i64);
}

#[test]
fn sqlite_tables_of_a_newer_version_and_an_unopenable_file_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sqlite3");
    let inbox = SqliteInbox::open(&path).unwrap();
    assert_eq!(inbox.schema_versions(), (0, 1));
    assert_eq!(SqliteInbox::open(&path).unwrap().schema_versions(), (1, 1));
    inbox
        .connection()
        .unwrap()
        .execute(
            "INSERT INTO ampybus_schema_version VALUES (9, 0, 'future')",
            [],
        )
        .unwrap();
    let e = SqliteInbox::open(&path).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert_eq!(
        e.to_string(),
        format!(
            "invalid configuration: SQLite {}: ampybus_schema_version: the inbox/outbox tables in this file are version 9, newer than version 1 that this ampybus build knows; use a newer ampybus (nothing was changed)",
            path.display()
        )
    );
    let e = SqliteInbox::open("/nonexistent-ampybus-dir/app.sqlite3").unwrap_err();
    assert!(
        e.to_string()
            .contains("SQLite /nonexistent-ampybus-dir/app.sqlite3: cannot open"),
        "{e}"
    );
}

/// Every message on `pattern`, in order: (partition key, message id, payload).
async fn read_all(bus: &Bus, pattern: &str, n: usize) -> Vec<(String, String, String)> {
    let mut sub = bus
        .subscribe(SubscribeSpec::ephemeral(
            TopicPattern::parse(pattern).unwrap(),
            StartAt::Earliest,
        ))
        .await
        .unwrap();
    let mut out = Vec::new();
    let t = Instant::now();
    while out.len() < n {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "only {} of {n} on {pattern}",
            out.len()
        );
        for d in sub.fetch(1000, Duration::from_millis(200)).await.unwrap() {
            let h = &d.envelope.headers;
            out.push((
                h.partition_key().unwrap().to_owned(),
                h.message_id().unwrap().to_owned(),
                String::from_utf8(d.envelope.payload.to_vec()).unwrap(),
            ));
        }
    }
    // Nothing more than expected.
    assert!(
        sub.fetch(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
    );
    out
}

/// Checks what a relay published: every staged id once, each key's rows in staging order.
fn assert_relayed(
    got: &[(String, String, String)],
    staged: &BTreeMap<String, Vec<(String, String)>>,
) {
    let mut by_key: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (k, id, p) in got {
        by_key
            .entry(k.clone())
            .or_default()
            .push((id.clone(), p.clone()));
    }
    assert_eq!(&by_key, staged);
}

/// Stages `keys` × `per_key` messages over several transactions (keys interleaved), plus
/// one transaction that is rolled back; returns what was committed, per key in order.
fn stage_sqlite(
    inbox: &SqliteInbox,
    keys: usize,
    per_key: usize,
) -> BTreeMap<String, Vec<(String, String)>> {
    let mut staged: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut conn = inbox.connection().unwrap();
    for round in 0..per_key {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        for k in 0..keys {
            let key = format!("acct|co{k}");
            let body = format!("{key}#{round}");
            let id = SqliteOutbox
                .stage(&tx, &fills(), fill_headers(&key), body.clone().into_bytes())
                .unwrap();
            staged.entry(key).or_default().push((id, body));
        }
        tx.commit().unwrap();
        if round == 1 {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .unwrap();
            SqliteOutbox
                .stage(
                    &tx,
                    &fills(),
                    fill_headers("acct|co0"),
                    b"rolled back".to_vec(),
                )
                .unwrap();
            drop(tx);
        }
    }
    staged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_outbox_relay_publishes_each_row_once_in_key_order_and_dead_letters_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(dir.path().join("log").to_str().unwrap())
        .await
        .unwrap();
    let inbox = SqliteInbox::open(dir.path().join("oms.sqlite3")).unwrap();
    let staged = stage_sqlite(&inbox, 5, 40);
    // A row the bus refuses for good: its topic changed under it to a domain whose
    // partition-key rule the key breaks.
    {
        let mut conn = inbox.connection().unwrap();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        let bad = SqliteOutbox
            .stage(&tx, &fills(), fill_headers("acct|bad"), b"bad".to_vec())
            .unwrap();
        tx.execute(
            "UPDATE ampybus_outbox SET topic = 'ampy.dev.bars.v1.XNAS.AAPL' WHERE message_id = ?1",
            [&bad],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    // Two relays on one file: the second stands by while the first holds the lock.
    let first = inbox.relay(bus.clone(), RelayOptions::default());
    let stats = first.drain().await.unwrap();
    assert_eq!((stats.published, stats.dead_lettered), (200, 1));
    let second: OutboxRelay = inbox.relay(bus.clone(), RelayOptions::default());
    let standby = tokio::time::timeout(Duration::from_millis(300), second.drain()).await;
    assert!(
        standby.is_err(),
        "a second relay must wait while the first holds the lock"
    );
    let got = read_all(&bus, "ampy.dev.fills.>", 200).await;
    assert_relayed(&got, &staged);
    let dlq = read_all(&bus, "ampy.dev.dlq.>", 1).await;
    assert_eq!(dlq[0].2, "bad");
    let c = inbox.connection().unwrap();
    let (unsent, dead): (i64, i64) = c
        .query_row(
            "SELECT count(*) FILTER (WHERE sent_at_ms IS NULL), count(*) FILTER (WHERE dlq_reason LIKE 'other: outbox relay: refused by the bus: %partition_key%')
             FROM ampybus_outbox",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((unsent, dead), (0, 1));
    // The first relay goes away: the standby takes over and finds nothing left to do.
    drop(first);
    let stats = second.drain().await.unwrap();
    assert_eq!(stats.published, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_inbox_applies_each_message_once_and_relays_staged_fills() {
    let db = Db::shared();
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(dir.path().join("log").to_str().unwrap())
        .await
        .unwrap();
    let inbox = PgInbox::connect(&db.url).await.unwrap();
    assert_eq!(inbox.schema_versions(), (0, 2));
    query(
        &db.url,
        "CREATE TABLE effects (message_id text NOT NULL, qty bigint NOT NULL)",
    );
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    let positions = Topic::parse("ampy.dev.positions.v1.sim").unwrap();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.fills.>").unwrap(),
        "pos",
    )
    .inbox(inbox.handler(pg_handler_fn(move |msg, tx| {
        let f = f.clone();
        let positions = positions.clone();
        Box::pin(async move {
            let id = msg.headers.message_id().unwrap().to_owned();
            let q = qty_of(&msg.payload);
            tx.execute(
                "INSERT INTO effects (message_id, qty) VALUES ($1, $2)",
                &[&id, &q],
            )
            .await
            .unwrap();
            let h = Headers::for_publish(
                "ampy.positions.v1.Position",
                "pos@1",
                "pos",
                "acct|XNAS.AAPL",
            );
            PgOutbox
                .stage(tx, &positions, h, id.into_bytes())
                .await
                .unwrap();
            decide(&msg.payload, &f)
        })
    })))
    .retry(RetryPolicy {
        max_attempts: 3,
        ..Default::default()
    })
    .start()
    .await
    .unwrap();
    let applied = run_mixed(&bus, handle, || inbox.skipped("pos")).await;
    let rows: Vec<(String, i64)> = query(&db.url, "SELECT message_id, qty FROM effects")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_effects(&rows, &applied);
    assert_eq!(
        count(&db.url, "ampybus.inbox WHERE consumer = 'pos'"),
        applied.len() as i64
    );
    // One staged position per applied fill (the rolled-back attempts staged nothing).
    assert_eq!(count(&db.url, "ampybus.outbox"), applied.len() as i64);
    let relay = inbox.relay(bus.clone(), RelayOptions::default());
    assert_eq!(relay.drain().await.unwrap().published, applied.len() as u64);
    let got = read_all(&bus, "ampy.dev.positions.>", applied.len()).await;
    let bodies: Vec<&str> = got.iter().map(|(_, _, p)| p.as_str()).collect();
    let staged: Vec<String> = query(&db.url, "SELECT payload FROM ampybus.outbox ORDER BY seq")
        .iter()
        .map(|r| String::from_utf8(r.get::<_, Vec<u8>>(0)).unwrap())
        .collect();
    assert_eq!(
        bodies,
        staged.iter().map(|s| s.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(count(&db.url, "ampybus.outbox WHERE sent_at IS NULL"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_unreachable_at_start_and_newer_schema_are_named() {
    let e = PgInbox::connect("postgres://postgres:secret@127.0.0.1:1/oms")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport);
    let text = e.to_string();
    assert!(
        text.contains("connecting to postgres://***@127.0.0.1:1/oms"),
        "{text}"
    );
    assert!(!text.contains("secret"), "{text}");
    let db = Db::shared();
    PgInbox::connect(&db.url).await.unwrap();
    query(
        &db.url,
        "INSERT INTO ampybus.schema_version (version, applied_by) VALUES (7, 'future')",
    );
    let e = PgInbox::connect(&db.url).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(
        e.to_string()
            .contains("is version 7, newer than version 2 that this ampybus build knows"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_lost_mid_run_holds_messages_and_applies_each_once() {
    let n = (3_000.0 * common::scale()) as usize;
    let server = OwnServer::start(None);
    let db = Db::on(&server.admin_url(), &format!("127.0.0.1:{}", server.port));
    query(
        &db.url,
        "CREATE TABLE effects (message_id text NOT NULL, qty bigint NOT NULL)",
    );
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(dir.path().join("log").to_str().unwrap())
        .await
        .unwrap();
    for i in 0..n {
        publish(
            &bus,
            fill_headers(&format!("a{}|co{i}", i % 16)),
            &format!("{}|ok", i % 7),
        )
        .await;
    }
    let inbox = PgInbox::connect(&db.url).await.unwrap();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.fills.>").unwrap(),
        "pos",
    )
    .inbox(inbox.handler(pg_handler_fn(|msg, tx| {
        Box::pin(async move {
            let id = msg.headers.message_id().unwrap().to_owned();
            let q = qty_of(&msg.payload);
            match tx
                .execute(
                    "INSERT INTO effects (message_id, qty) VALUES ($1, $2)",
                    &[&id, &q],
                )
                .await
            {
                Ok(_) => Outcome::Ok,
                // The server went away under the handler: the runtime holds the message.
                Err(_) => Outcome::Retry { after: None },
            }
        })
    })))
    .ack_deadline(Duration::from_secs(5))
    .start()
    .await
    .unwrap();
    until("a tenth applied", || {
        handle.stats().handled_ok as usize >= n / 10
    })
    .await;
    server.pg_ctl_stop();
    let at_stop = handle.stats().handled_ok;
    tokio::time::sleep(Duration::from_millis(500)).await; // the outage lasts a while
    let during = handle.stats();
    // At most the messages in flight at the stop (whose commit was answered before it) are
    // counted after it.
    let in_flight = ampybus::inbox::pg::DEFAULT_WORKERS as u64;
    assert!(
        during.handled_ok <= at_stop + in_flight,
        "{during:?} vs {at_stop}"
    );
    assert_eq!(during.dead_lettered_total(), 0, "{during:?}");
    server.pg_ctl_start();
    until("every message settled", || {
        let s = handle.stats();
        s.handled_ok as usize == n && s.in_flight == 0
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stats.dead_lettered_total(), 0, "{stats:?}");
    assert_eq!(count(&db.url, "effects"), n as i64);
    assert_eq!(
        count(&db.url, "(SELECT DISTINCT message_id FROM effects) d"),
        n as i64
    );
    assert_eq!(count(&db.url, "ampybus.inbox"), n as i64);
    let expected: i64 = (0..n).map(|i| (i % 7) as i64).sum();
    let sum: i64 = query(&db.url, "SELECT sum(qty)::bigint FROM effects")[0].get(0);
    assert_eq!(sum, expected);
}

/// Deadlocks between the commit lanes' shared transactions are rolled back and applied again,
/// out of the handlers' sight: many messages (32 accounts) whose effects each update two of
/// four shared rows, in an order that differs from message to message, through the default
/// workers (128: four lanes with big transactions at once). The handlers meet the deadlocks
/// (PostgreSQL aborts a lane's transaction) and do what handlers do with an error: a third
/// returns `Retry`, a third panics on `unwrap`, a third returns `Ok` over it. None of that
/// reaches the runtime (no retry, no dead letter), each message is applied exactly once (rows,
/// sums, inbox rows exact), and the retries are counted — first with the lanes always running
/// at once (`with_conflict_turns(ZERO)`: every batch may conflict), then with the default turns
/// after a conflict (one transaction at a time for 10 s), which leave far fewer conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_lane_deadlocks_are_retried_and_each_message_applied_once() {
    let (codes, at_once) = lane_conflicts(false, Duration::ZERO).await;
    assert!(codes.contains_key("40P01"), "{codes:?}");
    let (_, taking_turns) = lane_conflicts(false, DEFAULT_CONFLICT_TURNS).await;
    assert!(
        taking_turns < at_once,
        "{taking_turns} conflicts taking turns, {at_once} at once"
    );
}

/// The same under `SERIALIZABLE` (the database's default isolation), with effects that read a
/// row and write back the sum: concurrent lanes fail with serialization failures (`40001`),
/// and the sums are still exact — every committed transaction is one that no conflict hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_lane_serialization_failures_are_retried_and_each_message_applied_once() {
    let (codes, _) = lane_conflicts(true, Duration::ZERO).await;
    assert!(codes.contains_key("40001"), "{codes:?}");
}

/// Runs the conflict test (see above) with the lanes taking `turns` after a conflict; returns
/// how many times the handlers saw each SQLSTATE, and the lane retries.
async fn lane_conflicts(serializable: bool, turns: Duration) -> (BTreeMap<String, u64>, u64) {
    let n = (2_000.0 * common::scale()) as usize;
    let db = Db::shared();
    // Deadlocks found in milliseconds rather than the default second.
    query(
        &db.url,
        &format!("ALTER DATABASE {} SET deadlock_timeout = '10ms'", db.name),
    );
    if serializable {
        query(
            &db.url,
            &format!(
                "ALTER DATABASE {} SET default_transaction_isolation = 'serializable'",
                db.name
            ),
        );
    }
    query(
        &db.url,
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)",
    );
    query(
        &db.url,
        "INSERT INTO accounts SELECT g, 0 FROM generate_series(0, 3) g",
    );
    query(
        &db.url,
        "CREATE TABLE applied (message_id text NOT NULL, qty bigint NOT NULL)",
    );
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(dir.path().join("log").to_str().unwrap())
        .await
        .unwrap();
    // Message i: quantity, the two rows it updates in that order, what its handler does with
    // an error.
    let plan = |i: usize| {
        let first = (i % 4) as i32;
        let second = ((i % 4 + 1 + (i / 4) % 3) % 4) as i32;
        ((i % 7 + 1) as i64, first, second, i % 3)
    };
    let mut expected = BTreeMap::new();
    for i in 0..n {
        let (qty, first, second, mode) = plan(i);
        *expected.entry(first).or_insert(0i64) += qty;
        *expected.entry(second).or_insert(0i64) += qty;
        publish(
            &bus,
            fill_headers(&format!("acct{}|co{i}", i % 32)),
            &format!("{qty}|{first}|{second}|{mode}"),
        )
        .await;
    }
    let inbox = PgInbox::connect(&db.url)
        .await
        .unwrap()
        .with_conflict_turns(turns);
    let seen: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let codes = seen.clone();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.fills.>").unwrap(),
        "lanes",
    )
    .inbox(inbox.handler(pg_handler_fn(move |msg, tx| {
        let codes = codes.clone();
        Box::pin(async move {
            let id = msg.headers.message_id().unwrap().to_owned();
            let body = std::str::from_utf8(&msg.payload).unwrap().to_owned();
            let f: Vec<i64> = body.split('|').map(|v| v.parse().unwrap()).collect();
            let (qty, first, second, mode) = (f[0], f[1] as i32, f[2] as i32, f[3]);
            let effects = async {
                tx.execute(
                    "INSERT INTO applied (message_id, qty) VALUES ($1, $2)",
                    &[&id, &qty],
                )
                .await?;
                for row in [first, second] {
                    if serializable {
                        // Read, then write the sum back: right only if serializable holds.
                        let balance: i64 = tx
                            .query_one("SELECT balance FROM accounts WHERE id = $1", &[&row])
                            .await?
                            .get(0);
                        tx.execute(
                            "UPDATE accounts SET balance = $1 WHERE id = $2",
                            &[&(balance + qty), &row],
                        )
                        .await?;
                    } else {
                        tx.execute(
                            "UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                            &[&qty, &row],
                        )
                        .await?;
                    }
                }
                Ok::<_, tokio_postgres::Error>(())
            };
            let r = effects.await;
            if let Some(code) = r.as_ref().err().and_then(|e| e.code()) {
                *codes
                    .lock()
                    .unwrap()
                    .entry(code.code().to_owned())
                    .or_default() += 1;
            }
            match (r, mode) {
                (Ok(()), _) => Outcome::Ok,
                (Err(_), 0) => Outcome::Retry { after: None },
                (Err(e), 1) => panic!("the handler unwraps: {e}"),
                (Err(_), _) => Outcome::Ok,
            }
        })
    })))
    .start()
    .await
    .unwrap();
    let t = Instant::now();
    loop {
        let s = handle.stats();
        if s.handled_ok as usize == n && s.in_flight == 0 {
            break;
        }
        assert!(s.retried == 0 && s.dead_lettered_total() == 0, "{s:?}");
        assert!(t.elapsed() < Duration::from_secs(120), "not settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stats.handled_ok as usize, n, "{stats:?}");
    assert_eq!(stats.retried, 0, "{stats:?}");
    assert_eq!(stats.dead_lettered_total(), 0, "{stats:?}");
    assert_eq!(inbox.skipped("lanes"), 0);
    // Each message applied once: its row once, the rows' sums exact, one inbox row each.
    assert_eq!(count(&db.url, "applied"), n as i64);
    assert_eq!(
        count(&db.url, "(SELECT DISTINCT message_id FROM applied) d"),
        n as i64
    );
    assert_eq!(
        count(&db.url, "ampybus.inbox WHERE consumer = 'lanes'"),
        n as i64
    );
    let balances: BTreeMap<i32, i64> = query(&db.url, "SELECT id, balance FROM accounts")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(balances, expected);
    let retries = inbox.conflict_retries("lanes");
    let codes = seen.lock().unwrap().clone();
    eprintln!(
        "{n} messages, turns {turns:?}: {retries} lane transactions retried after a conflict in {:?}; SQLSTATEs the handlers saw: {codes:?}",
        t.elapsed()
    );
    assert!(retries > 0, "no conflict was provoked");
    // Each conflict a handler saw aborted its lane's transaction: one retry each (a conflict
    // on the lane's own statements — the inbox rows, the commit — is retried unseen).
    let seen_conflicts: u64 = ["40P01", "40001"]
        .iter()
        .filter_map(|c| codes.get(*c))
        .sum();
    assert!(retries >= seen_conflicts, "{retries} < {codes:?}");
    let text = bus.metrics().encode();
    let line = format!("bus_inbox_conflict_retries_total{{consumer=\"lanes\"}} {retries}\n");
    assert!(text.contains(&line), "{line} not in\n{text}");
    (codes, retries)
}

/// A replay request to an inbox consumer goes through its inbox (it has no dedupe store): the
/// window is read again, every message reaches the inbox, which skips them all — nothing is
/// applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_consumer_serves_a_replay_through_its_inbox() {
    use ampybus::control::{ReplayRequest, ReplayState};
    use ampybus::runtime::control::request_replay;
    let (_dir, bus, inbox) = sqlite_setup("CREATE TABLE effects (message_id TEXT NOT NULL)").await;
    let t0 = chrono::Utc::now() - chrono::Duration::seconds(1);
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.fills.>").unwrap(),
        "pos",
    )
    .inbox(inbox.handler(|msg, tx| {
        tx.execute(
            "INSERT INTO effects (message_id) VALUES (?1)",
            rusqlite::params![msg.headers.message_id().unwrap()],
        )
        .unwrap();
        Outcome::Ok
    }))
    .start()
    .await
    .unwrap();
    for i in 0..6 {
        publish(&bus, fill_headers(&format!("a|co{i}")), "1|ok").await;
    }
    until("six applied", || handle.stats().handled_ok == 6).await;
    let req = ReplayRequest::new("pos", "ampy.dev.fills.>", t0, chrono::Utc::now());
    let done = request_replay(&bus, &req, Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(done.state(), ReplayState::Completed, "{done:?}");
    assert_eq!((done.read, done.failed), (6, 0), "{done:?}");
    // Every replayed message was handed to the inbox, which found its row.
    assert_eq!(inbox.skipped("pos"), 6);
    let n: i64 = inbox
        .connection()
        .unwrap()
        .query_row("SELECT count(*) FROM effects", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 6);
    handle.shutdown(Duration::from_secs(10)).await;
}

/// A service layer: counts every message it sees by consumer and dead-letters the ones with
/// an `auth: no` header without calling the inner handler (so without any transaction).
struct Gate {
    consumer: String,
    inner: Arc<dyn Handler>,
    seen: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

#[async_trait::async_trait]
impl Handler for Gate {
    async fn handle(&self, msg: &Message) -> Outcome {
        *self
            .seen
            .lock()
            .unwrap()
            .entry(self.consumer.clone())
            .or_default() += 1;
        if msg.headers.get("auth") == Some("no") {
            return Outcome::DeadLetter(DlqCode::HandlerError.reason("unauthenticated"));
        }
        self.inner.handle(msg).await
    }
}

/// Runs a service of two consumers on `bus` — `builder` has added the inbox consumer "pos"
/// on `ampy.dev.fills.>`, this adds a plain consumer "orders" and the [`Gate`] layer — sends
/// the mixed batch, one fill the layer refuses and three orders, waits until every message is
/// settled and shuts the service down. Checks the report and the layer's counts; returns the
/// ids that must have been applied, and the refused fill's id.
async fn run_mixed_service(bus: &Bus, builder: ServiceBuilder) -> (Vec<String>, String) {
    let seen: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let s = seen.clone();
    let orders = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let o = orders.clone();
    let service = builder
        .consumer(
            "ampy.dev.orders.>",
            "orders",
            handler_sync(move |_m| {
                o.fetch_add(1, Ordering::SeqCst);
                Outcome::Ok
            }),
        )
        .layer(
            move |name: &str, inner: Arc<dyn Handler>| -> Arc<dyn Handler> {
                Arc::new(Gate {
                    consumer: name.to_owned(),
                    inner,
                    seen: s.clone(),
                })
            },
        )
        .start()
        .await
        .unwrap();
    assert_eq!(service.consumer_names(), ["pos", "orders"]);
    let applied = publish_mixed(bus).await;
    let mut refused = fill_headers("a5|auth");
    refused.set("auth", "no");
    let refused_id = refused.message_id().unwrap().to_owned();
    publish(bus, refused, "9|ok").await;
    let order_topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    for i in 0..3 {
        let h = Headers::for_publish("ampy.raw.v1.Bytes", "test@1", "test", &format!("co{i}"));
        bus.publish(&order_topic, h, b"o".to_vec()).await.unwrap();
    }
    // 24 fills Ok (2 of them skipped by the inbox), 3 dead-lettered; 3 orders Ok.
    until("every message settled", || {
        let t = service.stats().total();
        t.handled_ok == 27 && t.dead_lettered_total() == 3 && t.in_flight == 0
    })
    .await;
    let report = service.shutdown().await;
    assert_eq!(report.reason, StopReason::Requested);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let names: Vec<&str> = report
        .stats
        .consumers
        .iter()
        .map(|c| c.0.as_str())
        .collect();
    assert_eq!(names, ["pos", "orders"]);
    let pos = report.stats.consumer("pos").unwrap();
    assert_eq!(pos.handled_ok, 24, "{pos:?}");
    assert_eq!(pos.retried, 1, "{pos:?}");
    assert_eq!(pos.dlq(DlqCode::HandlerPanic), 1, "{pos:?}");
    assert_eq!(pos.dlq(DlqCode::HandlerError), 2, "{pos:?}");
    assert_eq!(pos.dead_lettered_total(), 3, "{pos:?}");
    assert_eq!(
        pos.skipped_duplicates, 0,
        "the inbox skips, not a dedupe store: {pos:?}"
    );
    assert_eq!(report.stats.consumer("orders").unwrap().handled_ok, 3);
    assert_eq!(orders.load(Ordering::SeqCst), 3);
    // The layer saw every delivery of "pos": 20 + 1 copy + 2 twins + 2 attempts of the
    // retried one + the panic + the dead letter + the refused one; and the 3 orders.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        BTreeMap::from([("orders".to_owned(), 3), ("pos".to_owned(), 28)])
    );
    assert_metrics(bus, "pos", 2);
    (applied, refused_id)
}

/// An inbox consumer declared on a `Service` (SQLite inbox, embedded log): applied once, the
/// copy and the dedupe-key twin skipped and counted, failures rolled back, wrapped by the
/// service's layer (whose refusal touches no database), and reported by the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_declares_a_sqlite_inbox_consumer_like_any_other() {
    let (_dir, bus, inbox) =
        sqlite_setup("CREATE TABLE effects (message_id TEXT NOT NULL, qty INTEGER NOT NULL)").await;
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    let builder = Service::builder(bus.clone()).inbox_consumer_with(
        "ampy.dev.fills.>",
        "pos",
        inbox.handler(move |msg, tx| {
            tx.execute(
                "INSERT INTO effects (message_id, qty) VALUES (?1, ?2)",
                rusqlite::params![msg.headers.message_id().unwrap(), qty_of(&msg.payload)],
            )
            .unwrap();
            decide(&msg.payload, &f)
        }),
        |c| {
            c.retry(RetryPolicy {
                max_attempts: 3,
                ..Default::default()
            })
        },
    );
    let (applied, refused) = run_mixed_service(&bus, builder).await;
    assert_eq!(inbox.skipped("pos"), 2);
    let c = inbox.connection().unwrap();
    let rows: Vec<(String, i64)> = c
        .prepare("SELECT message_id, qty FROM effects")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_effects(&rows, &applied);
    let ids: Vec<String> = c
        .prepare("SELECT message_id FROM ampybus_inbox WHERE consumer = 'pos'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(ids.len(), applied.len());
    assert!(
        !ids.contains(&refused),
        "the refused fill reached the inbox"
    );
}

/// The same on PostgreSQL (a database of its own): the inbox's own workers, one commit lane
/// per batch, the same counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_declares_a_pg_inbox_consumer_like_any_other() {
    let db = Db::shared();
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(dir.path().join("log").to_str().unwrap())
        .await
        .unwrap();
    let inbox = PgInbox::connect(&db.url).await.unwrap();
    query(
        &db.url,
        "CREATE TABLE effects (message_id text NOT NULL, qty bigint NOT NULL)",
    );
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    let builder = Service::builder(bus.clone()).inbox_consumer_with(
        "ampy.dev.fills.>",
        "pos",
        inbox.handler(pg_handler_fn(move |msg, tx| {
            let f = f.clone();
            Box::pin(async move {
                let id = msg.headers.message_id().unwrap().to_owned();
                let q = qty_of(&msg.payload);
                tx.execute(
                    "INSERT INTO effects (message_id, qty) VALUES ($1, $2)",
                    &[&id, &q],
                )
                .await
                .unwrap();
                decide(&msg.payload, &f)
            })
        })),
        |c| {
            c.retry(RetryPolicy {
                max_attempts: 3,
                ..Default::default()
            })
        },
    );
    let (applied, refused) = run_mixed_service(&bus, builder).await;
    assert_eq!(inbox.skipped("pos"), 2);
    let rows: Vec<(String, i64)> = query(&db.url, "SELECT message_id, qty FROM effects")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_effects(&rows, &applied);
    assert_eq!(
        count(&db.url, "ampybus.inbox WHERE consumer = 'pos'"),
        applied.len() as i64
    );
    assert_eq!(
        count(
            &db.url,
            &format!("ampybus.inbox WHERE message_id = '{refused}'")
        ),
        0
    );
}
