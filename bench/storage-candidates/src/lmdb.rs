//! Candidate 2: LMDB through `heed`. Key: sequence as big-endian u64 (so byte order is
//! numeric order and `MDB_APPEND` fills pages completely); value: CRC32C (u32 LE) + append
//! time (i64 LE) + body. Default environment flags: every commit writes the dirty pages,
//! fdatasyncs, writes the meta page and fdatasyncs again.

use crate::store::{Candidate, Store, err, now_us};
use heed::byteorder::BigEndian;
use heed::types::{Bytes, U64};
use heed::{Database, Env, EnvOpenOptions, PutFlags};
use std::io;
use std::path::Path;

pub struct Lmdb;

type Db = Database<U64<BigEndian>, Bytes>;

struct Open {
    env: Env,
    db: Db,
    next: u64,
    scratch: Vec<u8>,
}

fn h(e: heed::Error) -> io::Error {
    err(format!("lmdb: {e}"))
}

fn open_env(dir: &Path) -> io::Result<(Env, Db)> {
    // SAFETY: the environment is opened once per directory in this process and never while
    // another handle to the same files is open in it.
    let env = unsafe {
        EnvOpenOptions::new()
            .map_size(16 << 30)
            .max_dbs(4)
            .open(dir)
            .map_err(h)?
    };
    let mut wtxn = env.write_txn().map_err(h)?;
    let db: Db = env.create_database(&mut wtxn, Some("log")).map_err(h)?;
    wtxn.commit().map_err(h)?;
    Ok((env, db))
}

impl Candidate for Lmdb {
    fn name(&self) -> &'static str {
        "lmdb"
    }

    fn open(&self, dir: &Path) -> io::Result<Box<dyn Store>> {
        let (env, db) = open_env(dir)?;
        let next = {
            let rtxn = env.read_txn().map_err(h)?;
            db.last(&rtxn).map_err(h)?.map(|(k, _)| k + 1).unwrap_or(1)
        };
        Ok(Box::new(Open {
            env,
            db,
            next,
            scratch: Vec::with_capacity(1024),
        }))
    }

    fn scan(&self, dir: &Path) -> io::Result<(u64, u64)> {
        let (env, db) = open_env(dir)?;
        let res = {
            let rtxn = env.read_txn().map_err(h)?;
            let (mut n, mut bytes, mut expect) = (0u64, 0u64, 1u64);
            for item in db.iter(&rtxn).map_err(h)? {
                let (seq, v) = item.map_err(h)?;
                if seq != expect {
                    return Err(err(format!("lmdb: sequence gap: {seq} after {}", expect - 1)));
                }
                if v.len() < 12 {
                    return Err(err(format!("lmdb: short value at seq {seq}")));
                }
                let crc = u32::from_le_bytes(v[..4].try_into().unwrap());
                if crc32c::crc32c(&v[12..]) != crc {
                    return Err(err(format!("lmdb: checksum mismatch at seq {seq}")));
                }
                expect += 1;
                n += 1;
                bytes += (v.len() - 12) as u64;
            }
            (n, bytes)
        };
        env.prepare_for_closing().wait();
        Ok(res)
    }
}

impl Store for Open {
    fn append(&mut self, rows: &[&[u8]]) -> io::Result<()> {
        let mut wtxn = self.env.write_txn().map_err(h)?;
        let log_us = now_us();
        for (i, body) in rows.iter().enumerate() {
            self.scratch.clear();
            self.scratch
                .extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
            self.scratch.extend_from_slice(&log_us.to_le_bytes());
            self.scratch.extend_from_slice(body);
            self.db
                .put_with_flags(&mut wtxn, PutFlags::APPEND, &(self.next + i as u64), &self.scratch)
                .map_err(h)?;
        }
        wtxn.commit().map_err(h)?;
        self.next += rows.len() as u64;
        Ok(())
    }

    fn close(self: Box<Self>) -> io::Result<()> {
        self.env.force_sync().map_err(h)?;
        let Open { env, .. } = *self;
        env.prepare_for_closing().wait();
        Ok(())
    }
}
