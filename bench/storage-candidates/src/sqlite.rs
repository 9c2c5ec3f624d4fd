//! Candidate 1: SQLite (bundled) with a compact schema.
//!
//! One table keyed by sequence (the rowid), the append time, a CRC32C of the body and the body
//! (headers blob + payload) as one BLOB. No secondary index: append time only grows with the
//! sequence (the writer keeps `log_us = max(now, last)`), so replay by time is a binary search
//! on the rowid. WAL, `synchronous=FULL`, one transaction per append.

use crate::store::{Candidate, Store, err, now_us};
use rusqlite::{Connection, TransactionBehavior, params};
use std::io;
use std::path::Path;

pub struct Sqlite;

const FILE: &str = "log.sqlite3";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log(
    seq INTEGER PRIMARY KEY,
    log_us INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    body BLOB NOT NULL
);";

struct Open {
    conn: Connection,
    next: i64,
}

fn sql(e: rusqlite::Error) -> io::Error {
    err(format!("sqlite: {e}"))
}

impl Candidate for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn open(&self, dir: &Path) -> io::Result<Box<dyn Store>> {
        let conn = Connection::open(dir.join(FILE)).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let next: i64 = conn
            .query_row("SELECT coalesce(max(seq), 0) + 1 FROM log", [], |r| r.get(0))
            .map_err(sql)?;
        Ok(Box::new(Open { conn, next }))
    }

    fn scan(&self, dir: &Path) -> io::Result<(u64, u64)> {
        let conn = Connection::open(dir.join(FILE)).map_err(sql)?;
        let mut st = conn
            .prepare("SELECT seq, crc, body FROM log ORDER BY seq")
            .map_err(sql)?;
        let mut rows = st.query([]).map_err(sql)?;
        let (mut n, mut bytes, mut expect) = (0u64, 0u64, 1i64);
        while let Some(r) = rows.next().map_err(sql)? {
            let seq: i64 = r.get(0).map_err(sql)?;
            let crc: i64 = r.get(1).map_err(sql)?;
            let body = r.get_ref(2).map_err(sql)?.as_blob().map_err(|e| err(e))?;
            if seq != expect {
                return Err(err(format!("sqlite: sequence gap: {seq} after {}", expect - 1)));
            }
            if crc32c::crc32c(body) as i64 != crc {
                return Err(err(format!("sqlite: checksum mismatch at seq {seq}")));
            }
            expect += 1;
            n += 1;
            bytes += body.len() as u64;
        }
        Ok((n, bytes))
    }
}

impl Store for Open {
    fn append(&mut self, rows: &[&[u8]]) -> io::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        {
            let mut ins = tx
                .prepare_cached("INSERT INTO log(seq, log_us, crc, body) VALUES (?1, ?2, ?3, ?4)")
                .map_err(sql)?;
            let log_us = now_us();
            for (i, body) in rows.iter().enumerate() {
                ins.execute(params![
                    self.next + i as i64,
                    log_us,
                    crc32c::crc32c(body) as i64,
                    body
                ])
                .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)?;
        self.next += rows.len() as i64;
        Ok(())
    }

    fn close(self: Box<Self>) -> io::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(sql)?;
        self.conn.close().map_err(|(_, e)| sql(e))
    }
}
