//! `ampybus outbox relay`: publishes a transactional outbox's committed rows (see
//! `ampybus::inbox`), one active relay per outbox table.

use crate::error::{CliError, CliResult, EXIT_OK};
use crate::util::{self, Signals};
use ampybus::inbox::{OutboxRelay, RelayOptions};
use clap::{Args, Subcommand};
use std::time::Duration;

/// `ampybus outbox`.
#[derive(Debug, Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    pub command: OutboxCommand,
}

/// Subcommands of `outbox`.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Publish the outbox's committed rows to the bus, in per-key order, until a signal
    #[command(after_help = "\
Examples:
  ampybus outbox relay --db postgres://postgres@127.0.0.1/oms --url nats://127.0.0.1:4222
  ampybus outbox relay --db sqlite:///var/lib/oms.sqlite3 --url /var/lib/ampybus-data

One relay per outbox table is active at a time (a PostgreSQL advisory lock; for SQLite a flock
on <file>.outbox-relay.lock); another one started on the same table waits as a standby and takes
over when the first goes away. Rows are published with the message_id they got at staging, in
staging order per partition key, marked sent after the bus confirmed them and tried again
(same ids) when it did not. A row the bus refuses for good goes to the DLQ with its reason.
Sent rows are deleted after --purge-after seconds (default one day). Runs until SIGTERM
(exit 0) or SIGINT (exit 130); with --drain, publishes what is committed and exits 0.")]
    Relay(RelayArgs),
}

/// `ampybus outbox relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The application's database: postgres://… or sqlite:///path (or a plain file path)
    #[arg(long, value_name = "URL", env = "AMPYBUS_OUTBOX_DB")]
    pub db: String,
    /// Rows published per round
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
    /// Delete sent rows older than this many seconds
    #[arg(long, value_name = "SECS", default_value = "86400", value_parser = crate::util::parse_secs)]
    pub purge_after: f64,
    /// Publish what is committed now, then exit
    #[arg(long)]
    pub drain: bool,
}

/// Runs `outbox relay`.
pub async fn run(url: &str, args: OutboxArgs) -> CliResult<u8> {
    match args.command {
        OutboxCommand::Relay(r) => relay(url, r).await,
    }
}

/// Opens the relay of the outbox in `db` on `bus`.
pub async fn open_relay(db: &str, bus: ampybus::Bus, opts: RelayOptions) -> CliResult<OutboxRelay> {
    let shown = ampybus::bus::redact(db);
    let ctx = format!("--db {shown:?}");
    if ampybus::archive::is_postgres_url(db) {
        let inbox = ampybus::inbox::pg::PgInbox::connect(db)
            .await
            .map_err(|e| CliError::bus(&ctx, &e))?;
        return Ok(inbox.relay(bus, opts));
    }
    let path = db.strip_prefix("sqlite://").unwrap_or(db);
    if path.is_empty() || db.contains("://") && !db.starts_with("sqlite://") {
        return Err(CliError::usage(format!(
            "{ctx}: must be postgres://… or sqlite:///path/to/file"
        )));
    }
    if !std::path::Path::new(path).exists() {
        return Err(CliError::usage(format!(
            "{ctx}: no such file (the application creates its database; the relay only reads its outbox)"
        )));
    }
    let inbox =
        ampybus::inbox::sqlite::SqliteInbox::open(path).map_err(|e| CliError::bus(&ctx, &e))?;
    Ok(inbox.relay(bus, opts))
}

async fn relay(url: &str, args: RelayArgs) -> CliResult<u8> {
    let mut signals = Signals::new()?;
    let bus = util::connect(url).await?;
    let opts = RelayOptions {
        batch: args.batch as usize,
        purge_after: Duration::from_secs_f64(args.purge_after),
        ..RelayOptions::default()
    };
    let relay = open_relay(&args.db, bus.clone(), opts).await?;
    let table = relay.table().to_owned();
    if args.drain {
        let stats = relay
            .drain()
            .await
            .map_err(|e| CliError::bus(format!("outbox relay {table}"), &e))?;
        eprintln!(
            "outbox relay {table}: published {}, dead-lettered {}",
            stats.published, stats.dead_lettered
        );
        let _ = bus.close().await;
        return Ok(EXIT_OK);
    }
    eprintln!("outbox relay {table}: running (SIGTERM to stop)");
    let mut got = None;
    let stats = relay
        .run_until(async {
            got = Some(signals.recv().await);
        })
        .await
        .map_err(|e| CliError::bus(format!("outbox relay {table}"), &e))?;
    let _ = bus.close().await;
    eprintln!(
        "outbox relay {table}: published {}, dead-lettered {}",
        stats.published, stats.dead_lettered
    );
    Ok(got.map_or(EXIT_OK, |s| s.open_code()))
}
