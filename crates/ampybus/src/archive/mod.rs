//! The PostgreSQL archive (cargo feature `archive`): every message kept once in
//! `ampybus.envelopes` (as carried: headers, payload bytes) plus narrow typed tables per domain
//! record, written in batches, one transaction per batch.
//!
//! - [`ArchiveWriter::connect`] connects and creates or migrates schema `ampybus`
//!   ([`SCHEMA_VERSION`], table `ampybus.schema_version`; a newer version in the database is
//!   refused with an error naming both versions).
//! - [`ArchiveBatch`] collects envelopes and typed rows ([`Table`], [`Cell`]); the decoding of
//!   payloads into typed rows lives outside the core (the `ampybus` CLI uses `ampybus-proto`).
//! - [`ArchiveWriter::write`] writes a batch in one transaction: binary `COPY` straight into
//!   the tables; when a row is already there (a redelivery after a crash, a record seen
//!   before under its natural key) the transaction is rolled back and the batch goes through
//!   staging tables and `INSERT … ON CONFLICT DO NOTHING` instead, so every message is kept
//!   once and every record once.
//!
//! Headers are stored as their JSON object text (`headers`, names in wire order, values
//! exactly as carried); the view `ampybus.envelopes_json` adds them as `jsonb` for queries.
//!
//! ```no_run
//! # async fn f(env: ampybus::Envelope) -> ampybus::Result<()> {
//! use ampybus::archive::{ArchiveBatch, ArchiveWriter};
//! let mut writer = ArchiveWriter::connect("postgres://postgres@127.0.0.1/archive").await?;
//! let mut batch = ArchiveBatch::new();
//! batch.push_envelope(&env, chrono::Utc::now(), 1, None);
//! let report = writer.write(&batch).await?;
//! assert_eq!(report.envelopes_new, 1);
//! # Ok(()) }
//! ```

mod cell;
mod read;
mod schema;
mod write;

pub use cell::{Cell, ColType, Numeric};
pub use read::{ArchiveReader, ArchiveTransport, Tiered, pattern_regex};
#[cfg(feature = "inbox-postgres")]
pub(crate) use schema::migrate;
pub use schema::{SCHEMA_VERSION, Table, TableSpec};
pub use write::{ArchiveBatch, ArchiveWriter, WriteReport, envelope_row};

use crate::error::{Error, ErrorKind, Result};

/// Whether `url` names a PostgreSQL database (`postgres://` or `postgresql://`).
///
/// ```
/// assert!(ampybus::archive::is_postgres_url("postgres://u@h/db"));
/// assert!(!ampybus::archive::is_postgres_url("nats://h:4222"));
/// ```
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Parses a `postgres://` URL into a client configuration; the error names the URL
/// (credentials redacted) and the rule.
pub(crate) fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
    let shown = crate::transport::url::redact(url);
    if !is_postgres_url(url) {
        return Err(Error::new(
            ErrorKind::Config,
            format!("archive URL {shown:?}: must start with postgres:// or postgresql://"),
        ));
    }
    let config: tokio_postgres::Config = url.parse().map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("archive URL {shown:?}: not a valid PostgreSQL URL: {e}"),
            e,
        )
    })?;
    if config.get_hosts().is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("archive URL {shown:?}: names no host"),
        ));
    }
    Ok(config)
}

/// Connects, spawning the connection task; errors say which database and why.
pub(crate) async fn connect(
    config: &tokio_postgres::Config,
    shown: &str,
) -> Result<tokio_postgres::Client> {
    let mut config = config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(5));
    }
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| pg_error(&format!("connecting to {shown}"), e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "archive: PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Maps a PostgreSQL error to the crate's kinds: authentication and missing databases or
/// schema are `Config`; lost or refused connections `Transport` (worth retrying); everything
/// the server refused otherwise `Transport` too, with its SQLSTATE in the message.
pub(crate) fn pg_error(context: &str, e: tokio_postgres::Error) -> Error {
    let detail = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(inner) = src {
                s = format!("{s}: {inner}");
                src = inner.source();
            }
            s
        }
    };
    // Classes: 28 authentication, 3D no such database, 42/3F a missing or unusable table or
    // schema, 22/23 a value or row the server refused; the rest (connection, 57 shutdown, 08, 53) is
    // worth retrying.
    let class = e.code().map(|c| &c.code()[..2]);
    // A value the client could not encode is the row's fault, not the connection's.
    let client_side = e.code().is_none() && e.to_string().starts_with("error serializing");
    let kind = match class {
        _ if client_side => ErrorKind::Payload,
        Some("28" | "3D" | "42" | "3F") => ErrorKind::Config,
        Some("22" | "23") => ErrorKind::Payload,
        _ => ErrorKind::Transport,
    };
    Error::with_source(kind, format!("PostgreSQL: {context}: {detail}"), e)
}

/// Whether an error from this module is worth retrying after a reconnect (the connection
/// was lost or refused, the server is starting or shutting down).
///
/// ```
/// use ampybus::{Error, ErrorKind};
/// assert!(ampybus::archive::is_retryable(&Error::new(ErrorKind::Transport, "gone")));
/// assert!(!ampybus::archive::is_retryable(&Error::new(ErrorKind::Config, "bad password")));
/// ```
pub fn is_retryable(e: &Error) -> bool {
    e.kind() == ErrorKind::Transport
}
