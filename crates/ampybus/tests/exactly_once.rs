//! The proof of exactly-once effects (issue 21, item 4), in three layouts (the embedded log
//! with SQLite, the embedded log with PostgreSQL, a private JetStream `nats-server` with
//! PostgreSQL): an order → fill → position pipeline where every component is a process of
//! its own — an orders consumer with an inbox that stages one fill per order through the
//! outbox, the outbox relay, a positions consumer that applies fills through an inbox — while
//! a seeded driver `kill -9`s them at random instants and at each named crash point, and, in
//! the NATS layout, also `kill -9`s the nats-server at seeded instants and starts it again on
//! the same port and store directory (the components reconnect on their own; one that exits
//! instead is started again like after a kill, and counted). Then, once both durable
//! consumers report nothing pending or in flight and the outbox has no unsent row: each order
//! produced exactly one fill `message_id`, every position is the exact sum of its fills, each
//! message is in each inbox once. The same kind of crash with the plain dedupe store applies
//! a fill twice: the window the inbox closes.
//!
//! The components are this test binary run again as children (`AMPYBUS_CHILD_ROLE`), entering
//! through `child_process_entry` (ignored when the binary runs on its own). Scale:
//! `AMPYBUS_TEST_SCALE` multiplies the orders (1,000), the random kills (50) and the
//! nats-server restarts (4, at least 3). Seed: `AMPYBUS_TEST_SEED` (default 21), printed first.

use ampybus::inbox::pg::{PgInbox, PgOutbox, pg_handler_fn};
use ampybus::inbox::sqlite::{SqliteInbox, SqliteOutbox};
use ampybus::inbox::{
    CRASH_BEFORE_ACK, CRASH_BEFORE_COMMIT, CRASH_BEFORE_MARK, CRASH_BEFORE_PUBLISH, RelayOptions,
};
use ampybus::runtime::{Consumer, Outcome, handler_fn};
use ampybus::{Bus, Headers, Topic, TopicPattern};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

#[path = "../../ampybus-cli/tests/archive_support/mod.rs"]
mod archive_support;
mod common;
#[allow(dead_code)] // the harness uses start, url, kill and restart
#[path = "../../ampybus-conformance/src/nats_server.rs"]
mod nats_server;
use nats_server::NatsServer;
use std::time::{Duration, Instant};

const ACCOUNTS: usize = 5;
const SYMBOLS: [&str; 4] = ["XNAS.AAPL", "XNAS.MSFT", "XNYS.IBM", "XNAS.NVDA"];

/// Order `i`: account, symbol, quantity (payload `acct|symbol|qty|order_id`).
fn order(i: usize) -> (String, &'static str, i64, String) {
    (
        format!("a{}", i % ACCOUNTS),
        SYMBOLS[i % SYMBOLS.len()],
        (i % 9) as i64 + 1,
        format!("co{i}"),
    )
}

fn orders_topic() -> Topic {
    Topic::parse("ampy.dev.orders.v1.new").unwrap()
}

fn fills_topic() -> Topic {
    Topic::parse("ampy.dev.fills.v1.sim").unwrap()
}

/// A child's bus: `AMPYBUS_HARNESS_BUS` (the NATS layout's server) or the embedded log in
/// `dir/log`.
fn bus_url(dir: &Path) -> String {
    std::env::var("AMPYBUS_HARNESS_BUS").unwrap_or_else(|_| embedded_url(dir))
}

fn embedded_url(dir: &Path) -> String {
    dir.join("log").display().to_string()
}

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn kill_9(&mut self) {
        // SAFETY: kill(2) on a child this process spawned and has not reaped.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }

    fn term(mut self) -> std::process::ExitStatus {
        // SAFETY: as above.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        wait_exit(&mut self.0, Duration::from_secs(60))
    }
}

fn wait_exit(c: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        assert!(t.elapsed() < limit, "child {} did not exit", c.id());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `role` as a child process (this test binary again), with `env` added to its environment.
fn spawn_with(role: &str, dir: &Path, env: &[(&str, String)]) -> Proc {
    let mut c = common::child(role, dir, env);
    c.stdout(Stdio::null());
    Proc(c.spawn().unwrap())
}

/// Where a pipeline runs: the test directory, the store, and the bus — the embedded log in
/// the directory, or a private nats-server (JetStream, its store in the directory) that the
/// driver restarts.
struct Layout<'a> {
    dir: &'a Path,
    store: Store,
    nats: Option<NatsServer>,
}

impl Layout<'_> {
    fn bus_url(&self) -> String {
        match &self.nats {
            Some(server) => server.url("nats", "?request_timeout_ms=2000"),
            None => embedded_url(self.dir),
        }
    }

    /// `role` as a child process, armed with the crash point `crash` (`name@hit`) when given.
    fn spawn(&self, role: &str, crash: Option<String>) -> Proc {
        let mut env = self.store.child_env();
        if self.nats.is_some() {
            env.push(("AMPYBUS_HARNESS_BUS", self.bus_url()));
        }
        if let Some(point) = crash {
            env.push(("AMPYBUS_CRASH_AT", point));
        }
        spawn_with(role, self.dir, &env)
    }
}

/// Where the components keep their state: SQLite files in the test directory (`oms.sqlite3`,
/// `pos.sqlite3`) or one PostgreSQL database (children: `AMPYBUS_HARNESS_PG`).
#[derive(Clone)]
enum Store {
    Sqlite(PathBuf),
    Pg(String),
}

impl Store {
    fn of_child(dir: &Path) -> Store {
        match std::env::var("AMPYBUS_HARNESS_PG") {
            Ok(url) => Store::Pg(url),
            Err(_) => Store::Sqlite(dir.to_path_buf()),
        }
    }

    fn child_env(&self) -> Vec<(&'static str, String)> {
        match self {
            Store::Sqlite(_) => Vec::new(),
            Store::Pg(url) => vec![("AMPYBUS_HARNESS_PG", url.clone())],
        }
    }

    /// One number from `sql`, written in SQLite's spelling (`ampybus_inbox`,
    /// `ampybus_outbox`, `sent_at_ms`), on the orders side (`oms`) or the positions side; 0
    /// while the tables do not exist yet.
    fn scalar(&self, oms: bool, sql: &str) -> i64 {
        match self {
            Store::Sqlite(dir) => scalar(
                &dir.join(if oms { "oms.sqlite3" } else { "pos.sqlite3" }),
                sql,
            ),
            Store::Pg(url) => {
                let sql = sql
                    .replace("ampybus_inbox", "ampybus.inbox")
                    .replace("ampybus_outbox", "ampybus.outbox")
                    .replace("sent_at_ms", "sent_at");
                archive_support::block(async {
                    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                        .await
                        .ok()?;
                    tokio::spawn(conn);
                    c.query_one(&sql, &[])
                        .await
                        .ok()
                        .map(|r| r.get::<_, i64>(0))
                })
                .unwrap_or(0)
            }
        }
    }

    /// The application tables (created before the components start).
    fn create_app_tables(&self) {
        match self {
            Store::Sqlite(dir) => {
                SqliteInbox::open(dir.join("oms.sqlite3"))
                    .unwrap()
                    .connection()
                    .unwrap()
                    .execute_batch("CREATE TABLE orders_applied (order_id TEXT NOT NULL)")
                    .unwrap();
                sqlite(&dir.join("pos.sqlite3"))
                    .execute_batch(
                        "PRAGMA journal_mode=WAL;
                         CREATE TABLE fills_applied (fill_id TEXT NOT NULL, order_id TEXT NOT NULL);
                         CREATE TABLE positions (acct_sym TEXT PRIMARY KEY, qty INTEGER NOT NULL);",
                    )
                    .unwrap();
            }
            Store::Pg(url) => {
                for sql in [
                    "CREATE TABLE orders_applied (order_id text NOT NULL)",
                    "CREATE TABLE fills_applied (fill_id text NOT NULL, order_id text NOT NULL)",
                    "CREATE TABLE positions (acct_sym text PRIMARY KEY, qty bigint NOT NULL)",
                ] {
                    archive_support::query(url, sql);
                }
            }
        }
    }

    fn positions(&self) -> BTreeMap<String, i64> {
        match self {
            Store::Sqlite(dir) => positions(&dir.join("pos.sqlite3")),
            Store::Pg(url) => archive_support::query(url, "SELECT acct_sym, qty FROM positions")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        }
    }

    /// Fills applied whose id is a staged outbox row's.
    fn matched_fills(&self) -> i64 {
        const JOIN: &str =
            "SELECT count(*) FROM fills_applied f JOIN {outbox} o ON o.message_id = f.fill_id";
        match self {
            Store::Sqlite(dir) => {
                let c = sqlite(&dir.join("pos.sqlite3"));
                c.execute(
                    "ATTACH DATABASE ?1 AS oms",
                    [dir.join("oms.sqlite3").display().to_string()],
                )
                .unwrap();
                c.query_row(&JOIN.replace("{outbox}", "oms.ampybus_outbox"), [], |r| {
                    r.get(0)
                })
                .unwrap()
            }
            Store::Pg(url) => {
                archive_support::query(url, &JOIN.replace("{outbox}", "ampybus.outbox"))[0].get(0)
            }
        }
    }
}

fn sqlite(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    c
}

fn scalar(path: &Path, sql: &str) -> i64 {
    if !path.exists() {
        return 0;
    }
    let c = sqlite(path);
    c.query_row(sql, [], |r| r.get(0)).unwrap_or(0)
}

/// Entry point of the child processes.
#[test]
#[ignore = "run by the multi-process tests as a child process"]
fn child_process_entry() {
    let (role, dir) = common::child_role();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run_role(&role, &dir));
}

async fn run_role(role: &str, dir: &Path) {
    // SIGTERM is taken from the first instant: a component the driver stops while it is still
    // starting (spawned in the last round) finishes starting and stops cleanly, instead of
    // dying of the signal's default action.
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    // A bus that is down at start (nats-server being restarted): exit, and the driver starts
    // this component again as after a kill.
    let bus = match Bus::connect(&bus_url(dir)).await {
        Ok(bus) => bus,
        Err(e) => {
            eprintln!("{role}: cannot connect to the bus: {e}");
            std::process::exit(3);
        }
    };
    let pattern = |p: &str| TopicPattern::parse(p).unwrap();
    let handle = match role {
        "orders" => {
            let b = Consumer::builder(bus.clone(), pattern("ampy.dev.orders.>"), "oms")
                .ack_deadline(Duration::from_secs(1));
            match Store::of_child(dir) {
                Store::Sqlite(d) => b.inbox(
                    SqliteInbox::open(d.join("oms.sqlite3"))
                        .unwrap()
                        .handler(|msg, tx| {
                            let (order_id, h) = fill_of(&msg.payload);
                            tx.execute(
                                "INSERT INTO orders_applied (order_id) VALUES (?1)",
                                [&order_id],
                            )
                            .unwrap();
                            SqliteOutbox
                                .stage(tx, &fills_topic(), h, msg.payload.clone())
                                .unwrap();
                            Outcome::Ok
                        }),
                ),
                Store::Pg(url) => b.inbox(PgInbox::connect(&url).await.unwrap().handler(
                    pg_handler_fn(|msg, tx| {
                        Box::pin(async move {
                            let (order_id, h) = fill_of(&msg.payload);
                            tx.execute(
                                "INSERT INTO orders_applied (order_id) VALUES ($1)",
                                &[&order_id],
                            )
                            .await
                            .unwrap();
                            PgOutbox
                                .stage(tx, &fills_topic(), h, msg.payload.clone())
                                .await
                                .unwrap();
                            Outcome::Ok
                        })
                    }),
                )),
            }
            .start()
            .await
            .unwrap()
        }
        "relay" => {
            let relay = match Store::of_child(dir) {
                Store::Sqlite(d) => SqliteInbox::open(d.join("oms.sqlite3"))
                    .unwrap()
                    .relay(bus.clone(), RelayOptions::default()),
                Store::Pg(url) => PgInbox::connect(&url)
                    .await
                    .unwrap()
                    .relay(bus.clone(), RelayOptions::default()),
            };
            relay
                .run_until(async move {
                    term.recv().await;
                })
                .await
                .unwrap();
            bus.close().await.unwrap();
            return;
        }
        "positions" => {
            let b = Consumer::builder(bus.clone(), pattern("ampy.dev.fills.>"), "positions")
                .ack_deadline(Duration::from_secs(1));
            match Store::of_child(dir) {
                Store::Sqlite(d) => b.inbox(SqliteInbox::open(d.join("pos.sqlite3")).unwrap().handler(
                    |msg, tx| {
                        apply_fill(tx, msg.headers.message_id().unwrap(), &msg.payload);
                        Outcome::Ok
                    },
                )),
                Store::Pg(url) => b.inbox(PgInbox::connect(&url).await.unwrap().handler(pg_handler_fn(
                    |msg, tx| {
                        Box::pin(async move {
                            let (acct_sym, qty, order_id) = parse_fill(&msg.payload);
                            let fill_id = msg.headers.message_id().unwrap();
                            tx.execute(
                                "INSERT INTO fills_applied (fill_id, order_id) VALUES ($1, $2)",
                                &[&fill_id, &order_id],
                            )
                            .await
                            .unwrap();
                            tx.execute(
                                "INSERT INTO positions (acct_sym, qty) VALUES ($1, $2)
                                 ON CONFLICT (acct_sym) DO UPDATE SET qty = positions.qty + excluded.qty",
                                &[&acct_sym, &qty],
                            )
                            .await
                            .unwrap();
                            Outcome::Ok
                        })
                    },
                ))),
            }
            .start()
            .await
            .unwrap()
        }
        "positions-dedupe" => {
            // The plain runtime: the transport's dedupe store, effects committed by the handler
            // itself; `CRASH_AFTER_EFFECTS=n` kills the process right after the n-th effect.
            let path = dir.join("pos.sqlite3");
            let conn = std::sync::Mutex::new(sqlite(&path));
            let crash_at: Option<u64> = std::env::var("CRASH_AFTER_EFFECTS")
                .ok()
                .map(|v| v.parse().unwrap());
            let seen = std::sync::atomic::AtomicU64::new(0);
            let state = std::sync::Arc::new((conn, crash_at, seen));
            Consumer::builder(bus.clone(), pattern("ampy.dev.fills.>"), "positions")
                .handler(handler_fn(move |msg| {
                    let state = state.clone();
                    async move {
                        let (conn, crash_at, seen) = &*state;
                        {
                            let mut c = conn.lock().unwrap();
                            let tx = c.transaction().unwrap();
                            apply_fill(&tx, msg.headers.message_id().unwrap(), &msg.payload);
                            tx.commit().unwrap();
                        }
                        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        if *crash_at == Some(n) {
                            // SAFETY: kill(2) on this process's own pid.
                            unsafe {
                                libc::kill(libc::getpid(), libc::SIGKILL);
                            }
                        }
                        Outcome::Ok
                    }
                }))
                .workers(1)
                .max_in_flight(1)
                .ack_deadline(Duration::from_secs(1))
                .start()
                .await
                .unwrap()
        }
        r => panic!("unknown role {r}"),
    };
    term.recv().await;
    handle.shutdown(Duration::from_secs(10)).await;
    bus.close().await.unwrap();
}

/// The positions effect: the fill's row in `fills_applied` (no unique key: a second
/// application shows) and its quantity added to the position.
fn apply_fill(tx: &rusqlite::Transaction<'_>, fill_id: &str, payload: &[u8]) {
    let (acct_sym, qty, order_id) = parse_fill(payload);
    tx.execute(
        "INSERT INTO fills_applied (fill_id, order_id) VALUES (?1, ?2)",
        [fill_id, &order_id],
    )
    .unwrap();
    tx.execute(
        "INSERT INTO positions (acct_sym, qty) VALUES (?1, ?2)
         ON CONFLICT (acct_sym) DO UPDATE SET qty = qty + excluded.qty",
        rusqlite::params![acct_sym, qty],
    )
    .unwrap();
}

/// A payload `acct|symbol|qty|order_id`: (`acct|symbol`, qty, order id).
fn parse_fill(payload: &[u8]) -> (String, i64, String) {
    let body = std::str::from_utf8(payload).unwrap();
    let parts: Vec<&str> = body.split('|').collect();
    (
        format!("{}|{}", parts[0], parts[1]),
        parts[2].parse().unwrap(),
        parts[3].to_owned(),
    )
}

/// The order id of an order payload and the headers of its fill (key `acct|order_id`).
fn fill_of(payload: &[u8]) -> (String, Headers) {
    let (acct_sym, _, order_id) = parse_fill(payload);
    let acct = acct_sym.split('|').next().unwrap();
    let h = Headers::for_publish(
        "ampy.fills.v1.Fill",
        "oms@1",
        "oms",
        &format!("{acct}|{order_id}"),
    );
    (order_id, h)
}

/// The envelopes of orders `range` (each with its own fresh `message_id`).
fn order_envelopes(range: std::ops::Range<usize>) -> Vec<ampybus::Envelope> {
    range
        .map(|i| {
            let (acct, sym, qty, id) = order(i);
            let h = Headers::for_publish("ampy.orders.v1.OrderRequest", "gw@1", "gw", &id);
            ampybus::Envelope::new(
                &orders_topic(),
                h,
                format!("{acct}|{sym}|{qty}|{id}").into_bytes(),
            )
        })
        .collect()
}

fn positions(path: &Path) -> BTreeMap<String, i64> {
    let c = sqlite(path);
    let mut st = c.prepare("SELECT acct_sym, qty FROM positions").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn expected_positions(orders: impl Iterator<Item = usize>) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for i in orders {
        let (acct, sym, qty, _) = order(i);
        *m.entry(format!("{acct}|{sym}")).or_insert(0) += qty;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_sqlite_pipeline_applies_every_effect_once_under_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    run_pipeline(Layout {
        dir: dir.path(),
        store: Store::Sqlite(dir.path().to_path_buf()),
        nats: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_postgres_pipeline_applies_every_effect_once_under_kill_9() {
    let db = archive_support::Db::shared();
    let dir = tempfile::tempdir().unwrap();
    run_pipeline(Layout {
        dir: dir.path(),
        store: Store::Pg(db.url.clone()),
        nats: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_postgres_pipeline_applies_every_effect_once_under_kill_9_and_server_restarts() {
    let db = archive_support::Db::shared();
    let dir = tempfile::tempdir().unwrap();
    let js = dir.path().join("js");
    let server = NatsServer::start(dir.path(), &["-js", "-sd", js.to_str().unwrap()]);
    run_pipeline(Layout {
        dir: dir.path(),
        store: Store::Pg(db.url.clone()),
        nats: Some(server),
    })
    .await;
}

/// Publishes orders `range`, each batch tried again (same envelopes, so the same
/// `message_id`s) while the bus is down.
async fn publish_orders(bus: &Bus, range: std::ops::Range<usize>) {
    let policy = ampybus::runtime::RetryPolicy {
        max_attempts: u32::MAX,
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
    };
    let batch = order_envelopes(range);
    for chunk in batch.chunks(500) {
        let t = Instant::now();
        let mut attempt = 0;
        while let Err(e) = bus.publish_batch(chunk.to_vec()).await {
            assert!(t.elapsed() < common::HANG, "publishing orders: {e}");
            attempt += 1;
            tokio::time::sleep(policy.backoff(attempt)).await;
        }
    }
}

/// The consumers' lag as their broker reports it: (pending, in flight) of `oms` and of
/// `positions`; `None` while it cannot be read (the server restarting).
async fn lags(bus: &Bus) -> Option<[(u64, u64); 2]> {
    let mut out = [(0, 0); 2];
    for (slot, name) in out.iter_mut().zip(["oms", "positions"]) {
        let lag = bus.consumer_lag(name).await.ok()??;
        *slot = (lag.pending, lag.in_flight);
    }
    Some(out)
}

/// The pipeline under `kill -9` (and nats-server restarts in the NATS layout).
async fn run_pipeline(mut layout: Layout<'_>) {
    let n = (1_000.0 * common::scale()) as usize;
    let kills = (50.0 * common::scale()) as usize;
    let restarts = match layout.nats {
        Some(_) => ((4.0 * common::scale()).round() as usize).clamp(3, kills.max(3)),
        None => 0,
    };
    let seed: u64 = std::env::var("AMPYBUS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(21);
    eprintln!(
        "exactly-once harness: {n} orders, {kills} random kills, {restarts} nats-server restarts, seed {seed} (AMPYBUS_TEST_SEED)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let store = layout.store.clone();
    store.create_app_tables();
    // A first tenth now (work for the crash points), the rest in slices between the random
    // kills, so that every kill lands while the pipeline has work.
    let bus = Bus::connect(&layout.bus_url()).await.unwrap();
    let first = n / 10;
    publish_orders(&bus, 0..first).await;
    let roles = ["orders", "relay", "positions"];
    // Each named crash point, in the process that has it, started in pipeline order so that
    // each has work when it starts: orders (orders waiting), then the relay (rows staged),
    // then positions (fills published). Then the role's plain instance keeps running.
    let points: [(usize, &[&str]); 3] = [
        (0, &[CRASH_BEFORE_COMMIT, CRASH_BEFORE_ACK]),
        (1, &[CRASH_BEFORE_PUBLISH, CRASH_BEFORE_MARK]),
        (2, &[CRASH_BEFORE_COMMIT, CRASH_BEFORE_ACK]),
    ];
    let mut procs: Vec<Option<Proc>> = vec![None, None, None];
    for (idx, list) in points {
        eprintln!(
            "crash points of {}: {} orders applied, {} fills applied",
            roles[idx],
            store.scalar(
                true,
                "SELECT count(*) FROM ampybus_inbox WHERE consumer = 'oms'"
            ),
            store.scalar(
                false,
                "SELECT count(*) FROM ampybus_inbox WHERE consumer = 'positions'"
            )
        );
        for point in list {
            // Inbox points are hit once per transaction — a commit lane's batch of up to 64
            // messages, as many as are in flight (128 workers by default on PostgreSQL) — so
            // the first tenth of the orders is certain to bring `first / 64` (rounded up) of
            // them: the hit is drawn from those, at most 5; the relay's once per round (one is
            // certain to come).
            let most = first.div_ceil(64).clamp(1, 5);
            let hit = if idx == 1 {
                1
            } else {
                rng.random_range(1..=most)
            };
            let mut p = layout.spawn(roles[idx], Some(format!("{point}@{hit}")));
            let st = wait_exit(&mut p.0, Duration::from_secs(120));
            assert_eq!(
                st.signal(),
                Some(libc::SIGKILL),
                "{} at {point}: {st:?}",
                roles[idx]
            );
        }
        procs[idx] = Some(layout.spawn(roles[idx], None));
    }
    // The rounds after which nats-server is killed and started again (distinct, seeded).
    let mut restart_rounds = std::collections::BTreeSet::new();
    while restart_rounds.len() < restarts.min(kills) {
        restart_rounds.insert(rng.random_range(0..kills));
    }
    // Components that exited on their own (a lost connection): started again, counted.
    let mut exited = 0usize;
    let mut revive = |procs: &mut Vec<Option<Proc>>, layout: &Layout<'_>| {
        for (idx, slot) in procs.iter_mut().enumerate() {
            let status = slot.as_mut().and_then(|p| p.0.try_wait().unwrap());
            if let Some(st) = status {
                eprintln!("{} exited on its own ({st:?}); started again", roles[idx]);
                exited += 1;
                *slot = Some(layout.spawn(roles[idx], None));
            }
        }
    };
    // Random instants.
    let per_kill = (n - first).div_ceil(kills.max(1));
    let mut next = first;
    for round in 0..kills {
        let end = (next + per_kill).min(n);
        publish_orders(&bus, next..end).await;
        next = end;
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..250))).await;
        if restart_rounds.contains(&round) {
            let outage = Duration::from_millis(rng.random_range(0..300));
            let server = layout.nats.as_mut().unwrap();
            server.kill();
            // The outage itself (a fault parameter), not a synchronisation.
            tokio::time::sleep(outage).await;
            tokio::task::block_in_place(|| server.restart());
            eprintln!(
                "round {round}: nats-server kill -9, down {outage:?}, started again ({} orders applied)",
                store.scalar(
                    true,
                    "SELECT count(*) FROM ampybus_inbox WHERE consumer = 'oms'"
                )
            );
        }
        let idx = rng.random_range(0..roles.len());
        if let Some(mut p) = procs[idx].take() {
            p.kill_9();
        }
        procs[idx] = Some(layout.spawn(roles[idx], None));
        revive(&mut procs, &layout);
    }
    publish_orders(&bus, next..n).await;
    eprintln!(
        "after the kills: {} of {n} orders applied, {} fills applied",
        store.scalar(
            true,
            "SELECT count(*) FROM ampybus_inbox WHERE consumer = 'oms'"
        ),
        store.scalar(
            false,
            "SELECT count(*) FROM ampybus_inbox WHERE consumer = 'positions'"
        )
    );
    let t = Instant::now();
    loop {
        revive(&mut procs, &layout);
        let applied = store.scalar(
            false,
            "SELECT count(*) FROM ampybus_inbox WHERE consumer = 'positions'",
        );
        let unsent = store.scalar(
            true,
            "SELECT count(*) FROM ampybus_outbox WHERE sent_at_ms IS NULL",
        );
        let staged = store.scalar(true, "SELECT count(*) FROM ampybus_outbox");
        // Both consumers report nothing pending and nothing in flight.
        let lag = lags(&bus).await;
        if applied as usize >= n && unsent == 0 && staged as usize >= n && lag == Some([(0, 0); 2])
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "not done (seed {seed}): {applied} applied, {staged} staged, {unsent} unsent, lag (pending, in flight) of oms, positions: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bus.close().await.unwrap();
    for p in procs.into_iter().flatten() {
        let st = p.term();
        assert_eq!(st.code(), Some(0), "seed {seed}: {st:?}");
    }
    eprintln!(
        "done in {:?} after the kills; {exited} components exited on their own",
        t.elapsed()
    );
    // Each order applied once, with exactly one fill staged for it (`true`: the orders side);
    // each fill applied once.
    for (oms, sql) in [
        (
            true,
            "SELECT count(*) FROM ampybus_inbox WHERE consumer = 'oms'",
        ),
        (true, "SELECT count(*) FROM orders_applied"),
        (true, "SELECT count(DISTINCT order_id) FROM orders_applied"),
        (true, "SELECT count(*) FROM ampybus_outbox"),
        (
            true,
            "SELECT count(DISTINCT message_id) FROM ampybus_outbox",
        ),
        (
            false,
            "SELECT count(*) FROM ampybus_inbox WHERE consumer = 'positions'",
        ),
        (false, "SELECT count(*) FROM fills_applied"),
        (false, "SELECT count(DISTINCT fill_id) FROM fills_applied"),
        (false, "SELECT count(DISTINCT order_id) FROM fills_applied"),
    ] {
        assert_eq!(store.scalar(oms, sql), n as i64, "seed {seed}: {sql}");
    }
    // The fills applied are exactly the staged ones.
    let matched = store.matched_fills();
    assert_eq!(matched, n as i64, "seed {seed}");
    assert_eq!(store.positions(), expected_positions(0..n), "seed {seed}");
}

/// The plain dedupe store, killed after a handler's effects and before the dedupe record:
/// the redelivered fill is applied a second time (the window the inbox closes). The same
/// crash with the inbox (after commit, before ack) applies nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_dedupe_store_applies_a_fill_twice_after_a_crash_the_inbox_does_not() {
    let m = 20usize;
    for with_inbox in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let layout = Layout {
            dir: d,
            store: Store::Sqlite(d.to_path_buf()),
            nats: None,
        };
        layout.store.create_app_tables();
        {
            let bus = Bus::connect(&layout.bus_url()).await.unwrap();
            for i in 0..m {
                let (acct, sym, qty, id) = order(i);
                let h = Headers::for_publish(
                    "ampy.fills.v1.Fill",
                    "oms@1",
                    "oms",
                    &format!("{acct}|{id}"),
                );
                bus.publish(
                    &fills_topic(),
                    h,
                    format!("{acct}|{sym}|{qty}|{id}").into_bytes(),
                )
                .await
                .unwrap();
            }
            bus.close().await.unwrap();
        }
        let (role, crash) = if with_inbox {
            ("positions", Some(format!("{CRASH_BEFORE_ACK}@5")))
        } else {
            ("positions-dedupe", None)
        };
        let mut p = match crash {
            Some(_) => layout.spawn(role, crash),
            None => spawn_with(role, d, &[("CRASH_AFTER_EFFECTS", "5".to_owned())]),
        };
        let st = wait_exit(&mut p.0, Duration::from_secs(60));
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
        drop(p);
        let p = layout.spawn(role, None);
        let pos = d.join("pos.sqlite3");
        let t = Instant::now();
        while scalar(&pos, "SELECT count(DISTINCT fill_id) FROM fills_applied") < m as i64 {
            assert!(t.elapsed() < Duration::from_secs(60), "fills not applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(p.term().code(), Some(0));
        let applied = scalar(&pos, "SELECT count(*) FROM fills_applied");
        let twice: Vec<String> = {
            let c = sqlite(&pos);
            let mut st = c
                .prepare("SELECT order_id FROM fills_applied GROUP BY fill_id HAVING count(*) > 1")
                .unwrap();
            st.query_map([], |r| r.get(0))
                .unwrap()
                .map(|r| r.unwrap())
                .collect()
        };
        if with_inbox {
            assert_eq!(applied, m as i64);
            assert!(twice.is_empty(), "{twice:?}");
            assert_eq!(positions(&pos), expected_positions(0..m));
        } else {
            // The fill being handled when the process died after its effect (the fifth
            // one) was not recorded: it came again and was applied again.
            eprintln!("plain dedupe store: {applied} applications of {m} fills; twice: {twice:?}");
            assert_eq!(applied, m as i64 + 1);
            assert_eq!(twice.len(), 1, "{twice:?}");
            let again: usize = twice[0].trim_start_matches("co").parse().unwrap();
            assert_eq!(positions(&pos), expected_positions((0..m).chain([again])));
        }
    }
}
