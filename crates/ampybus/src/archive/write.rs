//! Writing batches: binary `COPY` in one transaction, with a staging path for rows already
//! archived.

use super::cell::Cell;
use super::schema::{self, ENVELOPES, Table, TableSpec};
use super::{connect, parse_url, pg_error};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::pin_mut;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

/// Envelopes and typed rows to write in one transaction.
///
/// ```
/// use ampybus::archive::{ArchiveBatch, Cell, Table};
/// use ampybus::{Envelope, Headers, Topic};
/// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
/// let env = Envelope::new(&topic, Headers::for_publish("ampy.news.v1.NewsBatch", "p@1", "p", "n-1"), b"".to_vec());
/// let mut batch = ArchiveBatch::new();
/// batch.push_envelope(&env, chrono::Utc::now(), 7, None);
/// let mut row = vec![Cell::text("some-id"), Cell::Int4(0)];
/// row.resize(Table::News.spec().columns.len(), Cell::Null);
/// batch.push_row(Table::News, row).unwrap();
/// assert_eq!(batch.len(), 1);
/// assert_eq!(batch.rows(Table::News), 1);
/// let err = batch.push_row(Table::Bars, vec![Cell::Int8(1)]).unwrap_err();
/// assert!(err.to_string().contains("ampybus.bars"), "{err}");
/// ```
///
/// Rows are checked and encoded in PostgreSQL's binary `COPY` form when they are added, so
/// a value the column cannot take is an error of the message that brought it, and writing is
/// sending bytes.
#[derive(Debug, Default)]
pub struct ArchiveBatch {
    envelopes: Encoded,
    typed: [Encoded; 9],
}

/// Rows of one table in binary `COPY` form (without the file header and trailer).
#[derive(Debug, Default)]
struct Encoded {
    /// Full chunks of whole rows (at least [`COPY_CHUNK`] bytes each), sent without a copy.
    sealed: Vec<Bytes>,
    /// The rows after them.
    buf: BytesMut,
    rows: usize,
}

impl Encoded {
    /// Between rows: once the rows encoded so far fill a chunk, they become a sealed chunk
    /// (shared, not copied, when the batch is written) and the next ones go to a fresh buffer.
    fn seal_full(&mut self) {
        if self.buf.len() >= COPY_CHUNK {
            self.sealed.push(self.buf.split().freeze());
            self.buf.reserve(COPY_CHUNK + COPY_CHUNK / 4);
        }
    }

    /// Encodes one checked row; on an encoding error nothing of it stays.
    fn push(&mut self, spec: &TableSpec, row: &[Cell]) -> Result<()> {
        let start = self.buf.len();
        self.buf.put_i16(row.len() as i16);
        for ((name, ty), cell) in spec.columns.iter().zip(row) {
            if matches!(cell, Cell::Null) {
                self.buf.put_i32(-1);
                continue;
            }
            let at = self.buf.len();
            self.buf.put_i32(0);
            if let Err(e) = cell.to_sql(&ty.pg(), &mut self.buf) {
                self.buf.truncate(start);
                return Err(Error::new(
                    ErrorKind::Payload,
                    format!("ampybus.{}.{name}: {e}", spec.name),
                ));
            }
            let len = (self.buf.len() - at - 4) as i32;
            self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        self.rows += 1;
        Ok(())
    }

    fn clear(&mut self) {
        self.sealed.clear();
        self.buf.clear();
        self.rows = 0;
    }

    /// Encodes the `ampybus.envelopes` row of a message whose id is `id` straight from the
    /// envelope's buffers: the same values as [`envelope_row`] gives, without building them
    /// first (no text copied twice, the headers' JSON and the payload hash written in place).
    fn push_envelope(
        &mut self,
        id: &str,
        env: &Envelope,
        stored_at: DateTime<Utc>,
        sequence: u64,
        decode_error: Option<&str>,
    ) -> Result<()> {
        let start = self.buf.len();
        let h = &env.headers;
        let (env_token, domain) = topic_tokens(&env.topic);
        let b = &mut self.buf;
        b.reserve(200 + env.topic.len() * 2 + env.payload.len());
        b.put_i16(ENVELOPES.columns.len() as i16);
        put_text(b, id);
        put_text(b, &env.topic);
        put_text(b, env_token);
        put_text(b, domain);
        match h.partition_key() {
            Some(k) => put_text(b, k),
            None => b.put_i32(-1),
        }
        let times = [h.produced_at_time(), Some(stored_at)];
        for (t, name) in times.iter().zip(["produced_at", "stored_at"]) {
            if let Some(t) = t {
                if let Err(e) = put_sql(b, t, &tokio_postgres::types::Type::TIMESTAMPTZ) {
                    b.truncate(start);
                    return Err(Error::new(
                        ErrorKind::Payload,
                        format!("ampybus.envelopes.{name}: {e}"),
                    ));
                }
            } else {
                b.put_i32(-1);
            }
        }
        b.put_i32(8);
        b.put_i64(i64::try_from(sequence).unwrap_or(i64::MAX));
        // The headers' JSON text (serde_json escapes control characters: no NUL byte).
        let at = b.len();
        b.put_i32(0);
        if serde_json::to_writer((&mut *b).writer(), h).is_err() {
            b.truncate(at + 4);
            b.put_slice(b"{}");
        }
        let len = (b.len() - at - 4) as i32;
        b[at..at + 4].copy_from_slice(&len.to_be_bytes());
        b.put_i32(env.payload.len() as i32);
        b.put_slice(&env.payload);
        let mut hash = [0u8; 7 + 64];
        hash[..7].copy_from_slice(b"sha256:");
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&env.payload);
        hex::encode_to_slice(digest, &mut hash[7..]).expect("64 hex digits for 32 bytes");
        b.put_i32(hash.len() as i32);
        b.put_slice(&hash);
        match decode_error {
            Some(e) => put_text(b, e),
            None => b.put_i32(-1),
        }
        self.rows += 1;
        Ok(())
    }
}

/// The environment and domain tokens of a topic (`ampy.ENV.DOMAIN.…`; empty when absent).
fn topic_tokens(topic: &str) -> (&str, &str) {
    let mut tokens = topic.split('.');
    (tokens.nth(1).unwrap_or(""), tokens.next().unwrap_or(""))
}

/// A `text` value, length first, each NUL byte replaced by U+FFFD (as [`Cell::text`] does).
fn put_text(b: &mut BytesMut, s: &str) {
    if s.as_bytes().contains(&0) {
        return put_text(b, &s.replace('\0', "\u{fffd}"));
    }
    b.put_i32(s.len() as i32);
    b.put_slice(s.as_bytes());
}

/// A value in its binary form, length first.
fn put_sql(
    b: &mut BytesMut,
    v: &(dyn ToSql + Sync),
    ty: &tokio_postgres::types::Type,
) -> std::result::Result<(), Box<dyn std::error::Error + Sync + Send>> {
    let at = b.len();
    b.put_i32(0);
    if let Err(e) = v.to_sql_checked(ty, b) {
        b.truncate(at);
        return Err(e);
    }
    let len = (b.len() - at - 4) as i32;
    b[at..at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

impl ArchiveBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a message as carried, with its store time and sequence on the bus, and why its
    /// payload gave no typed rows (`None`: it did, or its schema has no table).
    pub fn push_envelope(
        &mut self,
        env: &Envelope,
        stored_at: DateTime<Utc>,
        sequence: u64,
        decode_error: Option<&str>,
    ) {
        self.envelopes.seal_full();
        // Every value here is one the envelope columns take (text, a time from the headers'
        // own parse, bytes).
        let pushed = match env.headers.message_id() {
            Some(id) if !id.is_empty() => {
                self.envelopes
                    .push_envelope(id, env, stored_at, sequence, decode_error)
            }
            // A message without an id is rare: the general path keys it by a digest.
            _ => {
                let row = envelope_row(env, stored_at, sequence, decode_error);
                self.envelopes.push(&ENVELOPES, &row)
            }
        };
        if let Err(e) = pushed {
            tracing::error!(error = %e, "archive: an envelope row could not be encoded");
        }
    }

    /// Adds one typed row, its values in the order of `table.spec().columns`; a wrong count
    /// or type is an error naming the table and the column.
    pub fn push_row(&mut self, table: Table, row: Vec<Cell>) -> Result<()> {
        check_row(table.spec(), &row)?;
        let enc = &mut self.typed[table.index()];
        enc.seal_full();
        enc.push(table.spec(), &row)
    }

    /// Adds the typed rows of one message, all or none: the first row that does not fit its
    /// table is the error (see [`ArchiveBatch::push_row`]).
    ///
    /// ```
    /// use ampybus::archive::{ArchiveBatch, Cell, Numeric, Table};
    /// let mut row = vec![Cell::text("m"), Cell::Int4(0)];
    /// row.resize(Table::FxRates.spec().columns.len(), Cell::Null);
    /// let mut bad = row.clone();
    /// bad[4] = Cell::Numeric(Numeric::new(1, i32::MAX));
    /// let mut batch = ArchiveBatch::new();
    /// let err = batch.push_rows(vec![(Table::FxRates, row), (Table::FxRates, bad)]).unwrap_err();
    /// assert!(err.to_string().contains("ampybus.fx_rates.bid: decimal scale 2147483647"), "{err}");
    /// assert_eq!(batch.rows(Table::FxRates), 0);
    /// ```
    pub fn push_rows(&mut self, rows: Vec<(Table, Vec<Cell>)>) -> Result<()> {
        for (t, row) in &rows {
            check_row(t.spec(), row)?;
        }
        // Sealed before the marks: a rollback stays inside the open buffers.
        for enc in &mut self.typed {
            enc.seal_full();
        }
        let marks: [(usize, usize); 9] =
            std::array::from_fn(|i| (self.typed[i].buf.len(), self.typed[i].rows));
        for (t, row) in &rows {
            if let Err(e) = self.typed[t.index()].push(t.spec(), row) {
                for (enc, (len, n)) in self.typed.iter_mut().zip(marks) {
                    enc.buf.truncate(len);
                    enc.rows = n;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Envelopes in the batch.
    pub fn len(&self) -> usize {
        self.envelopes.rows
    }

    /// True when the batch holds no envelope.
    pub fn is_empty(&self) -> bool {
        self.envelopes.rows == 0
    }

    /// Typed rows of one table in the batch.
    pub fn rows(&self, table: Table) -> usize {
        self.typed[table.index()].rows
    }

    /// Empties the batch (keeping its capacity).
    pub fn clear(&mut self) {
        self.envelopes.clear();
        for t in &mut self.typed {
            t.clear();
        }
    }

    fn tables(&self) -> impl Iterator<Item = (&'static TableSpec, &Encoded)> {
        std::iter::once((&ENVELOPES, &self.envelopes)).chain(
            Table::ALL
                .iter()
                .map(|t| (t.spec(), &self.typed[t.index()])),
        )
    }
}

/// The `ampybus.envelopes` row of a message (values in the order of
/// [`TableSpec::envelopes`]): what [`ArchiveBatch::push_envelope`] adds, public for tools
/// that write the same rows themselves (the archive benchmark's raw `COPY`).
///
/// ```
/// use ampybus::{Envelope, Headers, Topic, archive::{Cell, envelope_row}};
/// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
/// let env = Envelope::new(&topic, Headers::for_publish("ampy.news.v1.NewsBatch", "p@1", "p", "n-1"), b"x".to_vec());
/// let row = envelope_row(&env, chrono::Utc::now(), 7, None);
/// assert_eq!(row[1], Cell::text("ampy.dev.news.v1.raw"));
/// assert_eq!(row[7], Cell::Int8(7));
/// ```
pub fn envelope_row(
    env: &Envelope,
    stored_at: DateTime<Utc>,
    sequence: u64,
    decode_error: Option<&str>,
) -> [Cell; 12] {
    let h = &env.headers;
    let (env_token, domain) = topic_tokens(&env.topic);
    let headers = serde_json::to_string(h).unwrap_or_else(|_| "{}".into());
    let payload_hash = crate::codec::sha256_tag(&env.payload);
    // A message without an id (it breaks the contract, yet it was on the bus) is keyed by
    // a digest of what it carries, so a redelivery is still recognised.
    let id = match h.message_id() {
        Some(id) if !id.is_empty() => Cell::text(id),
        _ => Cell::Text(format!(
            "absent:{}",
            crate::codec::sha256_tag(
                format!("{}\n{headers}\n{payload_hash}", env.topic).as_bytes()
            )
        )),
    };
    [
        id,
        Cell::text(&env.topic),
        Cell::text(env_token),
        Cell::text(domain),
        h.partition_key().map_or(Cell::Null, Cell::text),
        Cell::time(h.produced_at_time()),
        Cell::Time(stored_at),
        Cell::Int8(i64::try_from(sequence).unwrap_or(i64::MAX)),
        Cell::Text(headers),
        Cell::Bytes(env.payload.clone()),
        Cell::Text(payload_hash),
        decode_error.map_or(Cell::Null, Cell::text),
    ]
}

fn check_row(spec: &TableSpec, row: &[Cell]) -> Result<()> {
    if row.len() != spec.columns.len() {
        return Err(Error::new(
            ErrorKind::Payload,
            format!(
                "ampybus.{}: a row needs {} values, got {}",
                spec.name,
                spec.columns.len(),
                row.len()
            ),
        ));
    }
    for ((name, ty), cell) in spec.columns.iter().zip(row) {
        if let Cell::Numeric(n) = cell
            && !n.is_representable()
        {
            return Err(Error::new(
                ErrorKind::Payload,
                format!(
                    "ampybus.{}.{name}: decimal scale {} is outside numeric's range (-1000..=16383)",
                    spec.name, n.scale
                ),
            ));
        }
        if !cell.fits(*ty) {
            return Err(Error::new(
                ErrorKind::Payload,
                format!(
                    "ampybus.{}.{name}: a {} column cannot take {cell:?}",
                    spec.name,
                    ty.sql()
                ),
            ));
        }
    }
    Ok(())
}

/// What one [`ArchiveWriter::write`] did.
///
/// ```
/// let r = ampybus::archive::WriteReport::default();
/// assert_eq!(r.envelopes_new + r.envelopes_known, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Envelopes written now.
    pub envelopes_new: u64,
    /// Envelopes that were archived already (skipped).
    pub envelopes_known: u64,
    /// Typed rows written now.
    pub rows_new: u64,
}

/// After a batch met rows already archived, this many following batches take the staging
/// path at once (redeliveries after a restart come in runs).
const STAGED_RUN: u32 = 8;

/// Writes batches into the archive over one connection, reconnecting after a loss.
///
/// See the [module docs](super) for an example.
pub struct ArchiveWriter {
    config: tokio_postgres::Config,
    shown: String,
    client: Option<tokio_postgres::Client>,
    staging_ready: bool,
    staged_run: u32,
    migrated: (i32, i32),
}

impl std::fmt::Debug for ArchiveWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveWriter")
            .field("url", &self.shown)
            .finish()
    }
}

impl ArchiveWriter {
    /// Connects to the database at `url` (`postgres://user:pass@host:port/db`) and creates or
    /// migrates schema `ampybus`. Errors: a bad URL, wrong credentials, a missing database or
    /// a newer schema version are `Config`; an unreachable server is `Transport`.
    pub async fn connect(url: &str) -> Result<ArchiveWriter> {
        let config = parse_url(url)?;
        let shown = crate::transport::url::redact(url);
        let mut client = connect(&config, &shown).await?;
        let migrated = schema::migrate(&mut client).await?;
        Ok(ArchiveWriter {
            config,
            shown,
            client: Some(client),
            staging_ready: false,
            staged_run: 0,
            migrated,
        })
    }

    /// `(version found, version now)` of schema `ampybus` at connect.
    pub fn schema_versions(&self) -> (i32, i32) {
        self.migrated
    }

    /// The URL with credentials redacted.
    pub fn url_redacted(&self) -> &str {
        &self.shown
    }

    /// Writes the batch in one transaction. On a `Transport` error (connection lost or
    /// refused) nothing of the batch is committed, or all of it is (a commit whose answer was
    /// lost): writing the same batch again is always safe. The next call reconnects.
    pub async fn write(&mut self, batch: &ArchiveBatch) -> Result<WriteReport> {
        if batch.is_empty() {
            return Ok(WriteReport::default());
        }
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            self.staging_ready = false;
            let c = connect(&self.config, &self.shown).await?;
            // The schema may have changed while we were away.
            let row = c
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM ampybus.schema_version",
                    &[],
                )
                .await
                .map_err(|e| pg_error("reading ampybus.schema_version", e))?;
            schema::check_version(row.get(0))?;
            self.client = Some(c);
        }
        let result = if self.staged_run > 0 {
            self.staged_run -= 1;
            self.write_staged(batch).await
        } else {
            match self.write_direct(batch).await {
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    self.staged_run = STAGED_RUN;
                    self.write_staged(batch).await
                }
                other => other,
            }
        };
        result.map_err(|e| {
            let err = pg_error(
                &format!("writing a batch of {} to {}", batch.len(), self.shown),
                e,
            );
            if super::is_retryable(&err) {
                self.client = None;
            }
            err
        })
    }

    fn client(&mut self) -> &mut tokio_postgres::Client {
        self.client.as_mut().expect("connected before writing")
    }

    /// COPY straight into the tables.
    async fn write_direct(
        &mut self,
        batch: &ArchiveBatch,
    ) -> std::result::Result<WriteReport, tokio_postgres::Error> {
        let tx = self.client().transaction().await?;
        let mut report = WriteReport::default();
        for (spec, rows) in batch.tables() {
            if rows.rows == 0 {
                continue;
            }
            let n = copy_rows(&tx, &format!("ampybus.{}", spec.name), spec, rows).await?;
            if std::ptr::eq(spec, &ENVELOPES) {
                report.envelopes_new = n;
            } else {
                report.rows_new += n;
            }
        }
        tx.commit().await?;
        Ok(report)
    }

    /// COPY into per-connection staging tables, then `INSERT … ON CONFLICT DO NOTHING`.
    async fn write_staged(
        &mut self,
        batch: &ArchiveBatch,
    ) -> std::result::Result<WriteReport, tokio_postgres::Error> {
        if !self.staging_ready {
            let mut ddl = String::new();
            for (spec, _) in batch.tables() {
                ddl.push_str(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS stage_{0} ON COMMIT DELETE ROWS AS SELECT {1} FROM ampybus.{0} WITH NO DATA;",
                    spec.name,
                    spec.column_list()
                ));
            }
            self.client().batch_execute(&ddl).await?;
            self.staging_ready = true;
        }
        let tx = self.client().transaction().await?;
        let mut report = WriteReport::default();
        for (spec, rows) in batch.tables() {
            if rows.rows == 0 {
                continue;
            }
            let stage = format!("stage_{}", spec.name);
            copy_rows(&tx, &stage, spec, rows).await?;
            let cols = spec.column_list();
            let n = tx
                .execute(
                    &format!(
                        "INSERT INTO ampybus.{} ({cols}) SELECT {cols} FROM {stage} ON CONFLICT DO NOTHING",
                        spec.name
                    ),
                    &[],
                )
                .await?;
            if std::ptr::eq(spec, &ENVELOPES) {
                report.envelopes_new = n;
                report.envelopes_known = rows.rows as u64 - n;
            } else {
                report.rows_new += n;
            }
        }
        tx.commit().await?;
        Ok(report)
    }
}

/// Bytes handed to the connection per send of a `COPY`.
const COPY_CHUNK: usize = 256 * 1024;

/// Binary `COPY` of encoded rows into `target` (the columns of `spec`, in order) inside
/// `tx`: the sealed chunks as they are, the rest in chunks of 256 KiB; returns the number of
/// rows.
async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    target: &str,
    spec: &TableSpec,
    rows: &Encoded,
) -> std::result::Result<u64, tokio_postgres::Error> {
    use futures::SinkExt;
    let sql = format!(
        "COPY {target} ({}) FROM STDIN (FORMAT binary)",
        spec.column_list()
    );
    let sink = tx.copy_in::<_, Bytes>(&sql).await?;
    pin_mut!(sink);
    let mut head = BytesMut::with_capacity(19);
    head.put_slice(b"PGCOPY\n\xff\r\n\0");
    head.put_i32(0); // flags
    head.put_i32(0); // header extension
    sink.feed(head.freeze()).await?;
    for chunk in &rows.sealed {
        sink.feed(chunk.clone()).await?;
    }
    for chunk in rows.buf.chunks(COPY_CHUNK) {
        sink.feed(Bytes::copy_from_slice(chunk)).await?;
    }
    sink.send(Bytes::from_static(&[0xff, 0xff])).await?;
    sink.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Headers, Topic};

    /// A batch larger than a chunk keeps its rows in sealed chunks plus the open buffer:
    /// together byte for byte the rows in order, whole rows per chunk; a refused message
    /// leaves them as they were.
    #[test]
    fn sealed_chunks_hold_whole_rows_in_order() {
        let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
        let at = Utc::now();
        let (mut batch, mut flat) = (ArchiveBatch::new(), Encoded::default());
        for i in 0..100u64 {
            let h = Headers::for_publish("ampy.news.v1.NewsBatch", "p@1", "p", &format!("k{i}"));
            let env = Envelope::new(&topic, h, vec![i as u8; 10_000]);
            batch.push_envelope(&env, at, i, None);
            let id = env.headers.message_id().unwrap();
            flat.push_envelope(id, &env, at, i, None).unwrap();
        }
        let e = &batch.envelopes;
        assert_eq!(e.sealed.len(), 3);
        assert!(e.sealed.iter().all(|c| c.len() >= COPY_CHUNK));
        let mut joined = BytesMut::new();
        for c in &e.sealed {
            joined.extend_from_slice(c);
        }
        joined.extend_from_slice(&e.buf);
        assert_eq!(joined, flat.buf);
        assert_eq!(batch.len(), 100);

        let spec = Table::News.spec();
        let row = |id: &str, body: String| {
            let mut r = vec![Cell::text(id), Cell::Int4(0)];
            r.resize(spec.columns.len(), Cell::Null);
            r[6] = Cell::Text(body);
            r
        };
        for i in 0..30 {
            batch
                .push_rows(vec![(
                    Table::News,
                    row(&format!("n{i}"), "b".repeat(10_000)),
                )])
                .unwrap();
        }
        let news = &batch.typed[Table::News.index()];
        let before = (news.sealed.len(), news.buf.len());
        assert_eq!(before.0, 1);
        let mut bad = row("bad", String::new());
        bad[4] = Cell::Int8(1);
        let bad = vec![
            (Table::News, row("ok", "b".repeat(10_000))),
            (Table::News, bad),
        ];
        assert!(batch.push_rows(bad).is_err());
        let news = &batch.typed[Table::News.index()];
        assert_eq!((news.sealed.len(), news.buf.len()), before);
        assert_eq!(batch.rows(Table::News), 30);
        batch.clear();
        assert!(batch.is_empty() && batch.envelopes.sealed.is_empty());
    }

    /// The envelope row written in place is byte for byte the row of `envelope_row`.
    #[test]
    fn envelope_in_place_equals_the_general_row() {
        let topic = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
        let mut h = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "p", "XNAS.AA\0PL");
        h.set("x-note", "quote \" and \u{1} and \0");
        let env = Envelope::new(&topic, h, b"pay\0load".to_vec());
        let at = Utc::now();
        for err in [None, Some("decode_error: bad\0")] {
            let id = env.headers.message_id().unwrap();
            let mut fast = Encoded::default();
            fast.push_envelope(id, &env, at, 42, err).unwrap();
            let mut general = Encoded::default();
            general
                .push(&ENVELOPES, &envelope_row(&env, at, 42, err))
                .unwrap();
            assert_eq!(fast.rows, 1);
            assert_eq!(fast.buf, general.buf);
        }
    }
}
