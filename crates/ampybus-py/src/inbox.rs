//! What the Python inbox and outbox (`python/ampybus/inbox.py`, on `asyncpg` and `sqlite3`
//! connections) take from the Rust core, so that they write exactly the rows the Rust inbox
//! writes and the Rust relay (`ampybus::inbox::OutboxRelay`, `ampybus outbox relay`) reads:
//! the migrations (the core creates and migrates the tables), the SQL statements (constants of
//! `ampybus::inbox::pg` and `ampybus::inbox::sqlite`, exported as module attributes), a
//! message's inbox row (`ampybus::inbox::InboxRow`) and a staged row's values (final
//! `message_id`, checked and encoded headers: `ampybus::inbox::prepare_stage`).

use crate::bus::headers_from_dict;
use crate::errors::OrRaise;
use crate::message::PyMessage;
use ampybus::Topic;
use ampybus::inbox::{InboxRow, pg, prepare_stage, sqlite};
use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

/// Creates or migrates schema `ampybus` (with `ampybus.inbox` and `ampybus.outbox`) in the
/// PostgreSQL database at `url`; an awaitable of `(version found, version now, url without
/// its password)`. Raises
/// `TransportError` naming the URL (password removed) when the server does not answer,
/// `ConfigError` for a bad URL, a missing database or tables of a newer version.
#[pyfunction]
fn inbox_migrate_pg(py: Python<'_>, url: String) -> PyResult<Bound<'_, PyAny>> {
    crate::aio::future_into_py(py, async move {
        let inbox = pg::PgInbox::connect(&url).await.or_raise()?;
        let (found, now) = inbox.schema_versions();
        Ok((found, now, ampybus::bus::redact(&url)))
    })
}

/// Creates or migrates `ampybus_inbox`, `ampybus_outbox` and `ampybus_schema_version` in the
/// SQLite file `path` (created if missing; WAL journal); `(version found, version now)`.
/// Raises `ConfigError` naming the file when it cannot be opened or holds a newer version.
#[pyfunction]
fn inbox_migrate_sqlite(py: Python<'_>, path: std::path::PathBuf) -> PyResult<(i64, i64)> {
    py.detach(|| sqlite::SqliteInbox::open(&path).map(|i| i.schema_versions()))
        .or_raise()
}

/// The inbox row of a delivered message: `(message_id, domain, dedupe_key, topic)`, `None`
/// when it has no `message_id`.
#[pyfunction]
fn inbox_row(msg: &PyMessage) -> Option<(String, &'static str, Option<String>, String)> {
    InboxRow::of(msg.message()).map(|r| (r.message_id, r.domain, r.dedupe_key, r.topic))
}

/// The values of an outbox row for a message on `topic` with `headers` (a `dict` of str):
/// `(message_id, topic, partition_key, encoded headers)`; the payload column is the raw
/// payload as it is. Every publish default is filled
/// (the final `message_id`) and the headers are checked as a publish checks them: a bad topic
/// raises `TopicError`, a bad header `HeaderError` naming it.
#[pyfunction]
fn outbox_row<'py>(
    py: Python<'py>,
    topic: &str,
    headers: &Bound<'py, PyDict>,
) -> PyResult<(String, String, String, Bound<'py, PyBytes>)> {
    let topic = Topic::parse(topic).or_raise()?;
    let h = headers_from_dict(headers, None)?;
    // The payload goes from Python to the database as it is: only the headers are made here.
    let s = prepare_stage(&topic, h, Bytes::new()).or_raise()?;
    Ok((s.message_id, s.topic, s.key, PyBytes::new(py, &s.headers)))
}

/// Adds the functions and the SQL constants to the native module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(inbox_migrate_pg, m)?)?;
    m.add_function(wrap_pyfunction!(inbox_migrate_sqlite, m)?)?;
    m.add_function(wrap_pyfunction!(inbox_row, m)?)?;
    m.add_function(wrap_pyfunction!(outbox_row, m)?)?;
    m.add("PG_INBOX_INSERT_SQL", pg::INBOX_INSERT_SQL)?;
    m.add("PG_INBOX_PURGE_SQL", pg::INBOX_PURGE_SQL)?;
    m.add("PG_STAGE_LOCK_SQL", pg::STAGE_LOCK_SQL)?;
    m.add("PG_STAGE_LOCK_CLASS", pg::STAGE_LOCK_CLASS)?;
    m.add("PG_OUTBOX_INSERT_SQL", pg::OUTBOX_INSERT_SQL)?;
    m.add("SQLITE_INBOX_INSERT_SQL", sqlite::INBOX_INSERT_SQL)?;
    m.add("SQLITE_INBOX_PURGE_SQL", sqlite::INBOX_PURGE_SQL)?;
    m.add("SQLITE_OUTBOX_INSERT_SQL", sqlite::OUTBOX_INSERT_SQL)?;
    m.add(
        "INBOX_DEFAULT_RETENTION_SECS",
        ampybus::inbox::DEFAULT_RETENTION.as_secs_f64(),
    )?;
    Ok(())
}
