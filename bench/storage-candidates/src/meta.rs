//! The consumer side's store: dedupe records and the ack of a batch in one atomic commit, at
//! `sync=normal` (survives `kill -9`, as today's positions). Per batch of `batch` messages:
//! look up each dedupe key (16 bytes, random, as hashes of `message_id` would be), record them
//! all and advance the partition's position, atomically.
//!
//! * `sqlite`: tables `dedupe(key BLOB PRIMARY KEY, at) WITHOUT ROWID` and
//!   `positions(part PRIMARY KEY, pos)`, WAL, `synchronous=NORMAL`, one transaction per batch.
//! * `journal`: the file log's consumer-group journal: one frame per batch (CRC32C, length,
//!   sequence, then partition, position, count and the keys) appended with one `write`, no
//!   fsync; lookups in an in-memory hash set that open rebuilds from the journal.

use crate::store::{err, now_us};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::time::Instant;

fn keys(n: usize) -> Vec<[u8; 16]> {
    let mut x = 0x1234_5678_9abc_def1u64;
    (0..n)
        .map(|_| {
            let mut k = [0u8; 16];
            for half in k.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                half.copy_from_slice(&x.to_le_bytes());
            }
            k
        })
        .collect()
}

/// Keys per second through lookup + record + ack on SQLite.
pub fn sqlite(dir: &Path, n: usize, batch: usize) -> io::Result<f64> {
    let sql = |e: rusqlite::Error| err(format!("sqlite meta: {e}"));
    let mut conn = Connection::open(dir.join("meta.sqlite3")).map_err(sql)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(sql)?;
    conn.execute_batch(
        "CREATE TABLE dedupe(key BLOB PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE positions(part INTEGER PRIMARY KEY, pos INTEGER NOT NULL);",
    )
    .map_err(sql)?;
    let ks = keys(n);
    let t = Instant::now();
    let mut pos = 0i64;
    for chunk in ks.chunks(batch) {
        let tx = conn.transaction().map_err(sql)?;
        {
            let mut look = tx
                .prepare_cached("SELECT 1 FROM dedupe WHERE key = ?1")
                .map_err(sql)?;
            let mut ins = tx
                .prepare_cached("INSERT OR REPLACE INTO dedupe(key, at) VALUES (?1, ?2)")
                .map_err(sql)?;
            let at = now_us();
            for k in chunk {
                let seen: Option<i64> = look
                    .query_row(params![&k[..]], |r| r.get(0))
                    .optional()
                    .map_err(sql)?;
                if seen.is_none() {
                    ins.execute(params![&k[..], at]).map_err(sql)?;
                }
            }
            pos += chunk.len() as i64;
            tx.execute(
                "INSERT OR REPLACE INTO positions(part, pos) VALUES (3, ?1)",
                params![pos],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Keys per second through lookup + record + ack on the journal.
pub fn journal(dir: &Path, n: usize, batch: usize) -> io::Result<f64> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("group.journal"))?;
    let ks = keys(n);
    let mut set: HashSet<u128> = HashSet::with_capacity(n);
    let mut buf = Vec::with_capacity(batch * 16 + 64);
    let t = Instant::now();
    let (mut pos, mut seq) = (0u64, 0u32);
    for chunk in ks.chunks(batch) {
        buf.clear();
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&[0; 4]); // length, filled below
        buf.extend_from_slice(&seq.to_le_bytes());
        pos += chunk.len() as u64;
        buf.extend_from_slice(&3u16.to_le_bytes());
        buf.extend_from_slice(&pos.to_le_bytes());
        let count_at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        let mut count = 0u32;
        for k in chunk {
            if set.insert(u128::from_le_bytes(*k)) {
                buf.extend_from_slice(k);
                count += 1;
            }
        }
        buf[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        let len = (buf.len() - 12) as u32;
        buf[4..8].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&buf[4..]);
        buf[..4].copy_from_slice(&crc.to_le_bytes());
        f.write_all(&buf)?;
        seq = seq.wrapping_add(1);
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}
