//! The archive's tables (schema `ampybus`) and their versioned migration.

use super::cell::ColType;
use super::pg_error;
use crate::error::{Error, Result};

/// The schema version this build writes and reads. A database at a newer version is refused.
///
/// ```
/// assert_eq!(ampybus::archive::SCHEMA_VERSION, 2);
/// ```
pub const SCHEMA_VERSION: i32 = 2;

/// One table of the archive: its columns in row order and its key.
///
/// ```
/// use ampybus::archive::Table;
/// let t = Table::Bars.spec();
/// assert_eq!(t.name, "bars");
/// assert_eq!(t.columns[0].0, "message_id");
/// ```
#[derive(Debug)]
pub struct TableSpec {
    /// Name inside schema `ampybus`.
    pub name: &'static str,
    /// `(column, type)` in the order rows list their values.
    pub columns: &'static [(&'static str, ColType)],
    /// The key clause (a primary key or a unique constraint); writes skip a row whose key
    /// is already there.
    pub key: &'static str,
}

use ColType::{Bool, Bytea, Int2, Int4, Int8, Numeric as Num, Text, Timestamptz as Ts};

/// `ampybus.envelopes`: one row per `message_id`, the message as carried.
pub(crate) static ENVELOPES: TableSpec = TableSpec {
    name: "envelopes",
    columns: &[
        ("message_id", Text),
        ("topic", Text),
        ("env", Text),
        ("domain", Text),
        ("partition_key", Text),
        ("produced_at", Ts),
        ("stored_at", Ts),
        ("bus_sequence", Int8),
        ("headers", Text),
        ("payload", Bytea),
        ("payload_hash", Text),
        ("decode_error", Text),
    ],
    key: "PRIMARY KEY (message_id)",
};

/// The typed tables, one per kind of domain record; a batch payload gives one row per record.
///
/// ```
/// use ampybus::archive::Table;
/// assert_eq!(Table::ALL.len(), 9);
/// assert_eq!(Table::Quotes.spec().name, "quotes");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// `ampybus.bars` (`ampy.bars.v1.Bar`)
    Bars,
    /// `ampybus.trades` (`ampy.ticks.v1.TradeTick`)
    Trades,
    /// `ampybus.quotes` (`ampy.ticks.v1.QuoteTick`)
    Quotes,
    /// `ampybus.orders` (`ampy.orders.v1.OrderRequest`)
    Orders,
    /// `ampybus.fills` (`ampy.fills.v1.FillEvent`)
    Fills,
    /// `ampybus.positions` (`ampy.positions.v1.PositionSnapshot`)
    Positions,
    /// `ampybus.signals` (`ampy.signals.v1.Signal`)
    Signals,
    /// `ampybus.fx_rates` (`ampy.fx.v1.FxRate`)
    FxRates,
    /// `ampybus.news` (`ampy.news.v1.NewsItem`)
    News,
}

impl Table {
    /// Every typed table.
    pub const ALL: [Table; 9] = [
        Table::Bars,
        Table::Trades,
        Table::Quotes,
        Table::Orders,
        Table::Fills,
        Table::Positions,
        Table::Signals,
        Table::FxRates,
        Table::News,
    ];

    /// The table's columns and key.
    pub fn spec(self) -> &'static TableSpec {
        &TYPED[self as usize]
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Every typed table starts with the message it came from and the record's index in it.
static TYPED: [TableSpec; 9] = [
    TableSpec {
        name: "bars",
        columns: &[
            ("message_id", Text),
            ("idx", Int4),
            ("symbol", Text),
            ("mic", Text),
            ("bar_start", Ts),
            ("bar_end", Ts),
            ("open", Num),
            ("high", Num),
            ("low", Num),
            ("close", Num),
            ("vwap", Num),
            ("volume", Int8),
            ("trade_count", Int8),
            ("adjusted", Bool),
            ("adjustment_policy", Int2),
            ("event_time", Ts),
            ("ingest_time", Ts),
            ("as_of", Ts),
        ],
        key: "UNIQUE NULLS NOT DISTINCT (symbol, mic, bar_start, bar_end, adjustment_policy)",
    },
    TableSpec {
        name: "trades",
        columns: &[
            ("message_id", Text),
            ("idx", Int4),
            ("symbol", Text),
            ("mic", Text),
            ("price", Num),
            ("size", Int8),
            ("venue", Text),
            ("event_time", Ts),
            ("ingest_time", Ts),
        ],
        key: "PRIMARY KEY (message_id, idx)",
    },
    TableSpec {
        name: "quotes",
        columns: &[
            ("message_id", Text),
            ("idx", Int4),
            ("symbol", Text),
            ("mic", Text),
            ("bid", Num),
            ("bid_size", Int8),
            ("ask", Num),
            ("ask_size", Int8),
            ("venue", Text),
            ("event_time", Ts),
            ("ingest_time", Ts),
        ],
        key: "PRIMARY KEY (message_id, idx)",
    },
    TableSpec {
        name: "orders",
        columns: &[
            ("message_id", Text),
            ("idx", Int4),
            ("account_id", Text),
            ("client_order_id", Text),
            ("symbol", Text),
            ("mic", Text),
            ("side", Int2),
            ("order_type", Int2),
            ("tif", Int2),
            ("quantity", Num),
            ("limit_price", Num),
            ("stop_price", Num),
            ("venue", Text),
            ("strategy_tag", Text),
            ("created_at", Ts),
        ],
        key: "PRIMARY KEY (message_id, idx)",
    },
    TableSpec {
        name: "fills",
        columns: &[
            ("message_id", Text),
            ("idx", Int4),
            ("account_id", Text),
            ("client_order_id", Text),
            ("broker_order_id", Text),
            ("symbol", Text),
            ("mic", Text),
            ("price", Num),
            ("quantity", Num),
            ("venue", Text),
            ("event_time", Ts),
        ],
        key: "PRIMARY KEY (message_id, idx)",
    },
    TableSpec {
        name: "positions",
        columns: &[
            ("message_id", Text),
            ("idx", Int4),
            ("account_id", Text),
            ("symbol", Text),
            ("mic", Text),
            ("quantity", Num),
            ("avg_price", Num),
            ("unrealized_pnl", Num),
            ("unrealized_pnl_currency", Text),
            ("realized_pnl", Num),
            ("realized_pnl_currency", Text),
            ("as_of", Ts),
        ],
        key: "UNIQUE NULLS NOT DISTINCT (account_id, symbol, mic, as_of)",
    },
    TableSpec {
        name: "signals",
        columns: &[
            ("message_id", Text),
            ("idx", Int4),
            ("model_id", Text),
            ("symbol", Text),
            ("mic", Text),
            ("signal_type", Int2),
            ("horizon", Text),
            ("generated_at", Ts),
            ("expires_at", Ts),
            ("score", Num),
            ("action", Int2),
        ],
        key: "UNIQUE NULLS NOT DISTINCT (model_id, symbol, mic, horizon, generated_at)",
    },
    TableSpec {
        name: "fx_rates",
        columns: &[
            ("message_id", Text),
            ("idx", Int4),
            ("base", Text),
            ("quote", Text),
            ("bid", Num),
            ("ask", Num),
            ("mid", Num),
            ("as_of", Ts),
        ],
        key: "UNIQUE NULLS NOT DISTINCT (base, quote, as_of)",
    },
    TableSpec {
        name: "news",
        columns: &[
            ("message_id", Text),
            ("idx", Int4),
            ("news_id", Text),
            ("source", Text),
            ("url", Text),
            ("headline", Text),
            ("body", Text),
            ("tickers", Text),
            ("sentiment_score_bp", Int4),
            ("published_at", Ts),
            ("ingest_time", Ts),
        ],
        key: "UNIQUE NULLS NOT DISTINCT (news_id)",
    },
];

impl TableSpec {
    /// `ampybus.envelopes`: message_id, topic, env, domain, partition_key, produced_at,
    /// stored_at, bus_sequence, headers (JSON object text), payload, payload_hash,
    /// decode_error.
    ///
    /// ```
    /// let t = ampybus::archive::TableSpec::envelopes();
    /// assert_eq!(t.columns.len(), 12);
    /// assert_eq!(t.key, "PRIMARY KEY (message_id)");
    /// ```
    pub fn envelopes() -> &'static TableSpec {
        &ENVELOPES
    }

    /// `CREATE TABLE ampybus.<name> (…)`; the envelopes table adds `archived_at` and
    /// `archive_seq` (archive order), typed tables the columns only.
    fn create(&self, extra: &str) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (n, t))| {
                // message_id and idx (or the envelope's fixed columns) are never NULL.
                let not_null = if i < 2
                    || matches!(
                        *n,
                        "topic" | "env" | "domain" | "stored_at" | "bus_sequence" | "headers"
                    )
                    || matches!(*n, "payload" | "payload_hash")
                {
                    " NOT NULL"
                } else {
                    ""
                };
                format!("{n} {}{not_null}", t.sql())
            })
            .collect();
        format!(
            "CREATE TABLE ampybus.{} ({}{extra}, {})",
            self.name,
            cols.join(", "),
            self.key
        )
    }

    /// The comma-separated column list.
    pub(crate) fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The statements of each version step, `MIGRATIONS[v - 1]` bringing version `v - 1` to `v`.
fn migrations() -> Vec<Vec<String>> {
    let mut v1 = vec![ENVELOPES.create(
        ", archived_at timestamptz NOT NULL DEFAULT now(), archive_seq bigint GENERATED ALWAYS AS IDENTITY",
    )];
    v1.push("CREATE INDEX envelopes_stored_at ON ampybus.envelopes (stored_at)".into());
    v1.push(
        "CREATE VIEW ampybus.envelopes_json AS SELECT e.*, e.headers::jsonb AS headers_json FROM ampybus.envelopes e"
            .into(),
    );
    v1.extend(TYPED.iter().map(|t| t.create("")));
    // Version 2: the transactional inbox and outbox (`crate::inbox`, issue 21).
    let v2 = INBOX_OUTBOX_V2.iter().map(|s| (*s).to_owned()).collect();
    vec![v1, v2]
}

/// The inbox and outbox tables (version 2), the PostgreSQL twins of `crate::inbox`'s SQLite
/// ones.
const INBOX_OUTBOX_V2: [&str; 6] = [
    "CREATE TABLE ampybus.inbox (consumer text NOT NULL, message_id text NOT NULL, domain text NOT NULL, dedupe_key text, topic text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer, message_id))",
    "CREATE UNIQUE INDEX inbox_dedupe ON ampybus.inbox (consumer, domain, dedupe_key) WHERE dedupe_key IS NOT NULL",
    "CREATE INDEX inbox_applied_at ON ampybus.inbox (applied_at)",
    "CREATE TABLE ampybus.outbox (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, message_id text NOT NULL UNIQUE, topic text NOT NULL, partition_key text NOT NULL, seq bigint NOT NULL, headers bytea NOT NULL, payload bytea NOT NULL, staged_at timestamptz NOT NULL DEFAULT now(), sent_at timestamptz, dlq_reason text, UNIQUE (partition_key, seq))",
    "CREATE INDEX outbox_unsent ON ampybus.outbox (id) WHERE sent_at IS NULL",
    "CREATE INDEX outbox_sent_at ON ampybus.outbox (sent_at)",
];

/// A key for `pg_advisory_xact_lock`, so concurrent archivers migrate one at a time.
const MIGRATION_LOCK: i64 = 0x616d_7079_6275_7301;

/// Creates or migrates schema `ampybus` to [`SCHEMA_VERSION`] in one transaction; returns
/// `(version found, version now)`. A newer version in the database is a Config error naming
/// both versions.
pub(crate) async fn migrate(client: &mut tokio_postgres::Client) -> Result<(i32, i32)> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error("starting the migration", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg_error("locking the archive schema for migration", e))?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS ampybus;
         CREATE TABLE IF NOT EXISTS ampybus.schema_version (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now(),
             applied_by text NOT NULL)",
    )
    .await
    .map_err(|e| pg_error("creating schema ampybus", e))?;
    let row = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM ampybus.schema_version",
            &[],
        )
        .await
        .map_err(|e| pg_error("reading ampybus.schema_version", e))?;
    let found: i32 = row.get(0);
    check_version(found)?;
    for (i, step) in migrations().iter().enumerate() {
        let version = i as i32 + 1;
        if version <= found {
            continue;
        }
        for sql in step {
            tx.batch_execute(sql)
                .await
                .map_err(|e| pg_error(&format!("migrating to version {version}"), e))?;
        }
        let by = format!("ampybus {}", env!("CARGO_PKG_VERSION"));
        tx.execute(
            "INSERT INTO ampybus.schema_version (version, applied_by) VALUES ($1, $2)",
            &[&version, &by],
        )
        .await
        .map_err(|e| pg_error(&format!("recording version {version}"), e))?;
    }
    tx.commit()
        .await
        .map_err(|e| pg_error("committing the migration", e))?;
    Ok((found, SCHEMA_VERSION))
}

/// The error for a database whose archive schema is newer than this build.
pub(crate) fn check_version(found: i32) -> Result<()> {
    if found > SCHEMA_VERSION {
        return Err(Error::new(
            crate::ErrorKind::Config,
            format!(
                "ampybus.schema_version: the archive schema in this database is version {found}, newer than version {SCHEMA_VERSION} that this ampybus build knows; use a newer ampybus (nothing was changed)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_is_generated_from_the_specs() {
        let m = migrations();
        assert_eq!(m.len() as i32, SCHEMA_VERSION);
        assert!(m[0][0].starts_with(
            "CREATE TABLE ampybus.envelopes (message_id text NOT NULL, topic text NOT NULL"
        ));
        assert!(m[0].iter().any(|s| s.contains(
            "CREATE TABLE ampybus.bars (message_id text NOT NULL, idx integer NOT NULL, symbol text"
        )));
        let e = check_version(SCHEMA_VERSION + 1).unwrap_err();
        assert!(
            e.to_string().contains("version 3, newer than version 2"),
            "{e}"
        );
    }
}
