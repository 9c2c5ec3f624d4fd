//! `ampybus bench --mode inbox --db URL`: consume-and-ack throughput through a transactional
//! inbox (PostgreSQL or SQLite, no-op effect: the inbox row and the commit are the cost)
//! against the same runtime with its default dedupe store, in the same run, interleaved; and
//! the outbox relay's throughput (rows staged, then published to the embedded log).
//!
//! One embedded log is filled once with `--messages` messages over `--keys` keys (sync as
//! `--sync`); every round reads all of it with fresh consumer names. On PostgreSQL the
//! server's `synchronous_commit` is reported (on by default: each commit waits for its WAL
//! flush).

use crate::bench::BenchArgs;
use crate::bench::raw::{Clock, runtime_consume, settle};
use crate::bench::stats::{median, round, show_series, spread_json};
use crate::error::{CliError, CliResult, EXIT_OK};
use crate::util;
use ampybus::inbox::pg::{PgInbox, PgOutbox, pg_handler_fn};
use ampybus::inbox::sqlite::{SqliteInbox, SqliteOutbox};
use ampybus::inbox::{InboxBinding, OutboxRelay, RelayOptions};
use ampybus::runtime::{Consumer, Outcome};
use ampybus::{Bus, Headers, Topic, TopicPattern};
use serde_json::json;
use std::path::Path;
use std::time::Instant;

const PATTERN: &str = "ampy.dev.bars.>";

/// The database under test.
enum Db {
    Pg(PgInbox),
    Sqlite(SqliteInbox),
}

impl Db {
    /// The inbox's default workers, and what makes a consumer an inbox consumer.
    fn binding(
        &self,
    ) -> (
        usize,
        Box<dyn FnOnce(ampybus::runtime::ConsumerBuilder) -> ampybus::runtime::ConsumerBuilder>,
    ) {
        fn with(
            b: impl InboxBinding,
        ) -> (
            usize,
            Box<dyn FnOnce(ampybus::runtime::ConsumerBuilder) -> ampybus::runtime::ConsumerBuilder>,
        ) {
            (b.workers(), Box::new(move |c| c.inbox(b)))
        }
        match self {
            Db::Pg(p) => with(p.handler(pg_handler_fn(|_m, _tx| Box::pin(async { Outcome::Ok })))),
            Db::Sqlite(s) => with(s.handler(|_m, _tx| Outcome::Ok)),
        }
    }

    fn relay(&self, bus: Bus, batch: usize) -> OutboxRelay {
        let opts = RelayOptions {
            batch,
            ..RelayOptions::default()
        };
        match self {
            Db::Pg(p) => p.relay(bus, opts),
            Db::Sqlite(s) => s.relay(bus, opts),
        }
    }

    /// Empties the inbox and outbox tables (the benchmark owns this database).
    async fn clear(&self) -> CliResult<()> {
        match self {
            Db::Pg(p) => {
                let c = p.client().await.map_err(|e| CliError::bus("--db", &e))?;
                c.batch_execute("TRUNCATE ampybus.inbox, ampybus.outbox")
                    .await
                    .map_err(|e| CliError::transport(format!("--db: truncate: {e}")))?;
                p.give_back(c);
            }
            Db::Sqlite(s) => {
                let c = s.connection().map_err(|e| CliError::bus("--db", &e))?;
                c.execute_batch("DELETE FROM ampybus_inbox; DELETE FROM ampybus_outbox;")
                    .map_err(|e| CliError::transport(format!("--db: delete: {e}")))?;
            }
        }
        Ok(())
    }

    /// Stages `n` fills over `keys` keys, `batch` per transaction.
    async fn stage(&self, n: u64, keys: u64, batch: u64) -> CliResult<()> {
        let topic =
            Topic::parse("ampy.dev.fills.v1.bench").map_err(|e| CliError::bus("topic", &e))?;
        let h = |i: u64| {
            Headers::for_publish(
                "ampy.fills.v1.Fill",
                "bench@ampybus",
                "bench",
                &format!("acct|co{}", i % keys),
            )
        };
        let mut i = 0;
        while i < n {
            let k = (n - i).min(batch);
            match self {
                Db::Pg(p) => {
                    let mut c = p.client().await.map_err(|e| CliError::bus("--db", &e))?;
                    let tx = c
                        .transaction()
                        .await
                        .map_err(|e| CliError::transport(format!("--db: {e}")))?;
                    for j in i..i + k {
                        PgOutbox
                            .stage(&tx, &topic, h(j), vec![7u8; 64])
                            .await
                            .map_err(|e| CliError::bus("stage", &e))?;
                    }
                    tx.commit()
                        .await
                        .map_err(|e| CliError::transport(format!("--db: {e}")))?;
                    p.give_back(c);
                }
                Db::Sqlite(s) => {
                    let mut c = s.connection().map_err(|e| CliError::bus("--db", &e))?;
                    let tx = c
                        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                        .map_err(|e| CliError::transport(format!("--db: {e}")))?;
                    for j in i..i + k {
                        SqliteOutbox
                            .stage(&tx, &topic, h(j), vec![7u8; 64])
                            .map_err(|e| CliError::bus("stage", &e))?;
                    }
                    tx.commit()
                        .map_err(|e| CliError::transport(format!("--db: {e}")))?;
                }
            }
            i += k;
        }
        Ok(())
    }
}

/// Runs the inbox benchmark.
pub async fn run(args: &BenchArgs, parent: &Path) -> CliResult<u8> {
    let url = args
        .db
        .as_deref()
        .ok_or_else(|| CliError::usage("--mode inbox needs --db postgres://… or sqlite:///path"))?;
    let shown = ampybus::bus::redact(url);
    let (db, sync_commit) = if ampybus::archive::is_postgres_url(url) {
        let p = PgInbox::connect(url)
            .await
            .map_err(|e| CliError::bus(format!("--db {shown:?}"), &e))?;
        let c = p.client().await.map_err(|e| CliError::bus("--db", &e))?;
        let v: String = c
            .query_one("SHOW synchronous_commit", &[])
            .await
            .map_err(|e| CliError::transport(format!("--db: {e}")))?
            .get(0);
        p.give_back(c);
        (Db::Pg(p), v)
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        let s =
            SqliteInbox::open(path).map_err(|e| CliError::bus(format!("--db {shown:?}"), &e))?;
        (Db::Sqlite(s), "synchronous=FULL".to_owned())
    };
    let dir = tempfile::Builder::new()
        .prefix("ampybus-bench-inbox-")
        .tempdir_in(parent)
        .map_err(|e| CliError::usage(format!("--dir {:?}: {e}", parent.display())))?;
    let bus_url = format!(
        "file://{}?sync={}",
        dir.path().display(),
        args.sync.as_str()
    );
    let bus = util::connect(&bus_url).await?;
    crate::bench::consume::fill(&bus, args).await?;
    let pattern = TopicPattern::parse(PATTERN).map_err(|e| CliError::bus("pattern", &e))?;
    let mut dedupe = Vec::new();
    let mut inbox = Vec::new();
    let mut relay = Vec::new();
    // Both runtimes get the same workers: --workers, else the inbox consumer's default.
    let workers = args.workers.unwrap_or(db.binding().0 as u64);
    for round in 1..=args.rounds {
        db.clear().await?;
        let c = runtime_consume(
            &bus,
            &pattern,
            args.messages,
            workers,
            &format!("dedupe-{round}"),
            true,
            Clock::AtStart,
        )
        .await?;
        dedupe.push(c.rate());
        let name = format!("inbox-{round}");
        let started = Instant::now();
        let handle = (db.binding().1)(
            Consumer::builder(bus.clone(), pattern.clone(), &name).workers(workers as usize),
        )
        .start()
        .await
        .map_err(|e| CliError::bus("consumer", &e))?;
        inbox.push(
            settle(handle, args.messages, &name, started, None)
                .await?
                .rate(),
        );
        db.stage(args.messages, args.keys, args.batch).await?;
        let r = db.relay(bus.clone(), args.batch as usize);
        let started = Instant::now();
        let stats = r.drain().await.map_err(|e| CliError::bus("relay", &e))?;
        if stats.published != args.messages {
            return Err(CliError::transport(format!(
                "relay: published {} of {}",
                stats.published, args.messages
            )));
        }
        relay.push(args.messages as f64 / started.elapsed().as_secs_f64());
        eprintln!(
            "round {round}: runtime with dedupe {:.0} msg/s, through the inbox {:.0} msg/s, relay {:.0} msg/s",
            dedupe[dedupe.len() - 1],
            inbox[inbox.len() - 1],
            relay[relay.len() - 1]
        );
    }
    db.clear().await?;
    util::close(&bus).await?;
    let report = json!({
        "mode": "inbox",
        "db": if matches!(db, Db::Pg(_)) { "postgres" } else { "sqlite" },
        "synchronous_commit": sync_commit,
        "messages": args.messages,
        "keys": args.keys,
        "workers": workers,
        "rounds": args.rounds,
        "dedupe_msg_per_sec": spread_json(&dedupe, true, 0),
        "inbox_msg_per_sec": spread_json(&inbox, true, 0),
        "relay_msg_per_sec": spread_json(&relay, true, 0),
        "ratio": round(median(&inbox) / median(&dedupe), 3),
    });
    let mut out = util::Out::new();
    if args.json {
        out.line(&report.to_string())?;
    } else {
        out.line(&format!(
            "inbox ({}, {}), {} messages over {} keys, {} workers, {} rounds (best/median/worst msg/s)\n  runtime, default dedupe store: {}\n  runtime through the inbox: {}\n  outbox relay: {}\n  ratio inbox/dedupe (median): {}",
            report["db"],
            sync_commit,
            args.messages,
            args.keys,
            workers,
            args.rounds,
            show_series(&report["dedupe_msg_per_sec"]),
            show_series(&report["inbox_msg_per_sec"]),
            show_series(&report["relay_msg_per_sec"]),
            report["ratio"]
        ))?;
    }
    out.flush()?;
    Ok(EXIT_OK)
}
