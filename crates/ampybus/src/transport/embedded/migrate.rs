//! `ampybus migrate`: converts a data directory written by an earlier version (one SQLite file,
//! `ampybus.sqlite3`) to the segment-log format, in place.
//!
//! What becomes of what:
//!
//! * **Messages** (table `messages`), in sequence order: appended to the domain logs with
//!   their original log time, topic, headers (re-encoded in the compact form) and payload, and
//!   the hash of their partition key. Sequences are new (1, 2, … over the whole directory);
//!   the order of the messages, across domains too, is kept. Dead-lettered messages are
//!   messages of domain `dlq` like any other.
//! * **Durable consumers** (table `consumers`) become consumer groups of the same name and
//!   pattern. The old cursor (every sequence at or below it settled) becomes the group's
//!   start: the new sequence of the last message at or below the cursor. Messages above the
//!   cursor that were acked (table `pending`, `acked = 1`) go into an ACK frame; messages
//!   delivered and not acked are delivered again, their partitions marked as handed out (a
//!   DELIVERED frame) so that their delivery counts go on; a delay asked for by a nack still
//!   in the future is kept (a NACK frame). Leases are not carried over.
//! * **Dedupe records** (table `applied`) go into ACK frames of the group of the same consumer
//!   name, with their original times; a name that is no durable consumer gets a group of its
//!   own with an empty pattern (dedupe records only).
//!
//! Crash safety: the new files are written in their real places, after removing whatever an
//! interrupted earlier run left there (`log/`, `groups/`, `state.shm`, `writer.lock`: possible
//! only while `FORMAT` is absent). The commit point is `FORMAT`: every new file and directory
//! is fsynced, then `FORMAT` is written (temporary file, fsync, rename), then the SQLite file
//! (and its `-wal`/`-shm` files) is renamed to `ampybus.sqlite3.migrated`. A run stopped
//! before `FORMAT` leaves the old file untouched and is redone from the start by the next run;
//! a run stopped after it is finished by the next run (the renames).
//!
//! Stop every process using the directory first: a write by another process during the
//! conversion is detected and fails the run (nothing committed).

use super::format::{self, key_hash};
use super::group::{self, Journal, Meta};
use super::log::{LogWriter, NewRec, domain_index};
use super::shared::{Shared, io_error, sync_dir};
use super::{FORMAT_FILE, FORMAT_TEXT, LEGACY_DB_FILE};
use crate::error::{Error, ErrorKind, Result};
use crate::topic::Domain;
use crate::transport::decode_headers;
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the SQLite file is renamed to once the conversion is committed.
const MIGRATED_DB_FILE: &str = "ampybus.sqlite3.migrated";
/// What an interrupted run may have left (removed before converting again).
const LEFTOVER_DIRS: [&str; 2] = ["log", "groups"];
const LEFTOVER_FILES: [&str; 2] = ["state.shm", "writer.lock"];
/// A commit of the conversion holds at most this many messages or payload bytes.
const COMMIT_MESSAGES: usize = 4096;
const COMMIT_BYTES: usize = 8 * 1024 * 1024;
/// At most this many sequences or keys per journal frame.
const FRAME_ITEMS: usize = 65_536;

/// What [`migrate`] did.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("FORMAT"), "ampybus-log 2\n").unwrap();
/// let r = ampybus::transport::embedded::migrate(dir.path()).unwrap();
/// assert!(r.already_migrated);
/// assert_eq!(r.messages, 0);
/// assert!(r.to_string().starts_with("already migrated"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// The data directory.
    pub dir: PathBuf,
    /// The directory was already in the new format: nothing was converted (only the renaming
    /// of the old file, when an earlier run stopped just before it, was finished).
    pub already_migrated: bool,
    /// Files of an interrupted earlier run were removed before converting.
    pub redone: bool,
    /// Messages converted.
    pub messages: u64,
    /// Messages converted, per domain (domains without messages are left out).
    pub messages_by_domain: BTreeMap<Domain, u64>,
    /// Messages of domain `dlq` (dead-lettered).
    pub dlq_messages: u64,
    /// Durable consumers converted to consumer groups.
    pub consumers: u64,
    /// Messages above a consumer's cursor that it had acked (kept as acked).
    pub acked_above_cursor: u64,
    /// Messages delivered and not acked (they are delivered again, with counts going on).
    pub in_flight: u64,
    /// Dedupe records converted.
    pub dedupe_entries: u64,
    /// Groups made only to hold dedupe records (a dedupe name that is no durable consumer).
    pub dedupe_only_groups: u64,
    /// Where the old SQLite file is now.
    pub legacy_file: Option<PathBuf>,
}

/// ```
/// let r = ampybus::transport::embedded::MigrateReport {
///     dir: "/data".into(),
///     messages: 2,
///     messages_by_domain: [(ampybus::Domain::Bars, 2)].into_iter().collect(),
///     ..Default::default()
/// };
/// assert!(r.to_string().contains("messages: 2 (bars 2)"));
/// ```
impl std::fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.already_migrated {
            writeln!(
                f,
                "already migrated: {} is in the current format ({FORMAT_FILE}); nothing converted",
                self.dir.display()
            )?;
            if let Some(p) = &self.legacy_file {
                writeln!(f, "old log file: {}", p.display())?;
            }
            return Ok(());
        }
        writeln!(f, "migrated: {}", self.dir.display())?;
        if self.redone {
            writeln!(
                f,
                "note: removed the files of an interrupted earlier run and converted again"
            )?;
        }
        let per: Vec<String> = self
            .messages_by_domain
            .iter()
            .map(|(d, n)| format!("{} {n}", d.as_str()))
            .collect();
        if per.is_empty() {
            writeln!(f, "messages: 0")?;
        } else {
            writeln!(f, "messages: {} ({})", self.messages, per.join(", "))?;
        }
        writeln!(f, "dlq messages: {}", self.dlq_messages)?;
        writeln!(
            f,
            "consumers: {} (acked above their cursor: {}, delivered and not acked: {})",
            self.consumers, self.acked_above_cursor, self.in_flight
        )?;
        writeln!(
            f,
            "dedupe entries: {} ({} dedupe-only group(s))",
            self.dedupe_entries, self.dedupe_only_groups
        )?;
        if let Some(p) = &self.legacy_file {
            writeln!(f, "old log file kept as: {}", p.display())?;
        }
        Ok(())
    }
}

/// Converts the data directory `dir` of an earlier version (`ampybus.sqlite3`) to the current
/// format, in place (see the module docs for what becomes of what, and for crash safety).
///
/// A directory already in the current format is reported as such and left unchanged. A
/// directory with neither format, or one another process writes to during the run, is
/// refused; nothing is committed then and the old file is untouched.
///
/// ```
/// use ampybus::transport::embedded::migrate;
/// let dir = tempfile::tempdir().unwrap();
/// // Neither format: refused, naming the directory.
/// let err = migrate(dir.path()).unwrap_err();
/// assert!(err.to_string().contains("neither"));
/// // The current format: nothing to do.
/// std::fs::write(dir.path().join("FORMAT"), "ampybus-log 2\n").unwrap();
/// assert!(migrate(dir.path()).unwrap().already_migrated);
/// ```
pub fn migrate(dir: &Path) -> Result<MigrateReport> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!("migrate {}: not a directory", dir.display()),
            ));
        }
        Err(e) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "migrate {}: cannot read the data directory: {e}",
                    dir.display()
                ),
            ));
        }
    }
    if let Some(r) = committed(dir)? {
        return Ok(r);
    }
    let db = dir.join(LEGACY_DB_FILE);
    // Two runs never interleave: each holds an flock on the old file (SQLite's own locks are
    // fcntl locks, which this does not touch) and looks for FORMAT again once it has it.
    let _lock = match File::open(&db) {
        Ok(f) => lock_exclusive(f, &db)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Renamed by a run that committed meanwhile, or never there.
            return committed(dir)?.ok_or_else(|| neither(dir));
        }
        Err(e) => return Err(io_error(&db, "opening the old log", e)),
    };
    if let Some(r) = committed(dir)? {
        return Ok(r);
    }
    if !db.is_file() {
        return Err(neither(dir));
    }
    let redone = remove_leftovers(dir)?;
    let mut report = match convert(dir, &db).and_then(|r| sync_tree(dir).map(|()| r)) {
        Ok(r) => r,
        Err(e) => {
            // Nothing is committed: leave the directory as it was (what a crash leaves instead
            // is removed by the next run).
            let _ = remove_leftovers(dir);
            return Err(e);
        }
    };
    report.redone = redone;
    // The commit point.
    let format_path = dir.join(FORMAT_FILE);
    let tmp = dir.join(format!("{FORMAT_FILE}.migrate.tmp"));
    std::fs::write(&tmp, FORMAT_TEXT)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .map_err(|e| io_error(&tmp, "writing the format marker", e))?;
    std::fs::rename(&tmp, &format_path)
        .map_err(|e| io_error(&format_path, "writing the format marker", e))?;
    sync_dir(dir)?;
    rename_legacy(dir)?;
    drop_empty_wal(dir);
    report.legacy_file = Some(dir.join(MIGRATED_DB_FILE));
    Ok(report)
}

/// The report of a directory already in the current format (after finishing the renaming of
/// the old file, when a run stopped just before it), or `None` when `FORMAT` is absent.
fn committed(dir: &Path) -> Result<Option<MigrateReport>> {
    let format_path = dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&format_path) {
        Ok(s) if s == FORMAT_TEXT => {
            let moved = rename_legacy(dir)?;
            let kept = dir.join(MIGRATED_DB_FILE);
            Ok(Some(MigrateReport {
                dir: dir.to_path_buf(),
                already_migrated: true,
                legacy_file: (moved || kept.exists()).then_some(kept),
                ..MigrateReport::default()
            }))
        }
        Ok(s) => Err(Error::new(
            ErrorKind::Config,
            format!(
                "migrate {}: unknown format {:?} in {FORMAT_FILE} (this version writes {:?}); nothing changed",
                format_path.display(),
                s.trim(),
                FORMAT_TEXT.trim()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&format_path, "reading the format marker", e)),
    }
}

fn neither(dir: &Path) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "migrate {}: not an ampybus data directory: neither {FORMAT_FILE} (current format) nor {LEGACY_DB_FILE} (earlier format) is there",
            dir.display()
        ),
    )
}

/// Takes an exclusive `flock` on `f` (waiting for it); released when the file is dropped.
fn lock_exclusive(f: File, path: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: a valid open descriptor, owned by `f` for the whole call.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io_error(path, "locking the old log for the migration", e));
        }
    }
}

/// Renames `ampybus.sqlite3` and its `-wal`/`-shm` files to `ampybus.sqlite3.migrated…`
/// (the WAL first: the main file, renamed last, marks an unfinished renaming). True when
/// something was renamed.
fn rename_legacy(dir: &Path) -> Result<bool> {
    let mut moved = false;
    for suffix in ["-wal", "-shm", ""] {
        let from = dir.join(format!("{LEGACY_DB_FILE}{suffix}"));
        let to = dir.join(format!("{MIGRATED_DB_FILE}{suffix}"));
        match std::fs::rename(&from, &to) {
            Ok(()) => moved = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&from, "renaming the old log file", e)),
        }
    }
    if moved {
        sync_dir(dir)?;
    }
    Ok(moved)
}

/// Removes the `-wal` and `-shm` files of the kept old file when the WAL is empty (reading it
/// may have created them; the file alone then holds everything). Best effort.
fn drop_empty_wal(dir: &Path) {
    let wal = dir.join(format!("{MIGRATED_DB_FILE}-wal"));
    if std::fs::metadata(&wal).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(&wal);
        let _ = std::fs::remove_file(dir.join(format!("{MIGRATED_DB_FILE}-shm")));
    }
}

/// Removes what an interrupted run left (only ever called while `FORMAT` is absent, so none of
/// it holds committed data). True when something was removed.
fn remove_leftovers(dir: &Path) -> Result<bool> {
    let mut removed = false;
    for d in LEFTOVER_DIRS {
        let p = dir.join(d);
        match std::fs::remove_dir_all(&p) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io_error(
                    &p,
                    "removing what an interrupted migration left",
                    e,
                ));
            }
        }
    }
    let rd = std::fs::read_dir(dir).map_err(|e| io_error(dir, "listing the data directory", e))?;
    let mut files: Vec<PathBuf> = LEFTOVER_FILES.iter().map(|f| dir.join(f)).collect();
    for ent in rd {
        let ent = ent.map_err(|e| io_error(dir, "listing the data directory", e))?;
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&format!("{FORMAT_FILE}.")) && name.ends_with(".tmp") {
            files.push(ent.path());
        }
    }
    for p in files {
        match std::fs::remove_file(&p) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io_error(
                    &p,
                    "removing what an interrupted migration left",
                    e,
                ));
            }
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// fsyncs every file and directory the conversion wrote.
fn sync_tree(dir: &Path) -> Result<()> {
    fn walk(p: &Path) -> Result<()> {
        let rd = match std::fs::read_dir(p) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error(p, "listing a directory to sync it", e)),
        };
        for ent in rd {
            let ent = ent.map_err(|e| io_error(p, "listing a directory to sync it", e))?;
            let path = ent.path();
            let ty = ent
                .file_type()
                .map_err(|e| io_error(&path, "reading a file type", e))?;
            if ty.is_dir() {
                walk(&path)?;
            } else if ty.is_file() {
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io_error(&path, "syncing a converted file", e))?;
            }
        }
        sync_dir(p)
    }
    for d in LEFTOVER_DIRS {
        walk(&dir.join(d))?;
    }
    sync_dir(dir)
}

/// An SQLite error of the old file, naming it and what failed.
fn sql(db: &Path, what: &str, e: rusqlite::Error) -> Error {
    Error::new(
        ErrorKind::Transport,
        format!("migrate {}: {what}: {e}", db.display()),
    )
}

/// One old message as converted: old sequence, new sequence, group slot.
#[derive(Clone, Copy)]
struct Mapped {
    old: i64,
    new: u64,
    slot: u16,
}

/// Old → new sequences, in old-sequence order (the new ones grow with them).
struct SeqMap(Vec<Mapped>);

impl SeqMap {
    fn get(&self, old: i64) -> Option<Mapped> {
        self.0
            .binary_search_by_key(&old, |m| m.old)
            .ok()
            .map(|i| self.0[i])
    }

    /// The new sequence of the last message at or below `old` (0 for none).
    fn at_or_below(&self, old: i64) -> u64 {
        let i = self.0.partition_point(|m| m.old <= old);
        if i == 0 { 0 } else { self.0[i - 1].new }
    }
}

/// The messages of one commit of the conversion, waiting to be appended.
struct Pending {
    recs: Vec<NewRec>,
    olds: Vec<(i64, u16)>,
    log_us: i64,
    last_domain: usize,
    bytes: usize,
}

impl Pending {
    /// True when `domain` at `log_us` cannot join this commit: a commit has one log time, and
    /// its records are sequenced domain by domain, so the domains must not go back.
    fn must_flush_before(&self, log_us: i64, domain: usize) -> bool {
        !self.recs.is_empty()
            && (log_us != self.log_us
                || domain < self.last_domain
                || self.recs.len() >= COMMIT_MESSAGES
                || self.bytes >= COMMIT_BYTES)
    }

    fn flush(&mut self, w: &mut LogWriter, map: &mut SeqMap) -> Result<()> {
        if self.recs.is_empty() {
            return Ok(());
        }
        let seqs = w.append_at(&self.recs, self.log_us)?;
        for ((old, slot), new) in self.olds.drain(..).zip(seqs) {
            map.0.push(Mapped { old, new, slot });
        }
        self.recs.clear();
        self.bytes = 0;
        Ok(())
    }
}

fn table_exists(conn: &Connection, db: &Path, name: &str) -> Result<bool> {
    conn.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |_| Ok(()),
    )
    .optional()
    .map(|r| r.is_some())
    .map_err(|e| sql(db, "reading the schema", e))
}

fn data_version(conn: &Connection, db: &Path) -> Result<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
        .map_err(|e| sql(db, "reading the data version", e))
}

/// Reads the old file in one read transaction and writes the new logs and groups.
fn convert(dir: &Path, db: &Path) -> Result<MigrateReport> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sql(db, "opening the old log read-only", e))?;
    if !table_exists(&conn, db, "messages")? {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "migrate {}: not an ampybus log (no `messages` table)",
                db.display()
            ),
        ));
    }
    let version = data_version(&conn, db)?;
    conn.execute_batch("BEGIN")
        .map_err(|e| sql(db, "starting the read", e))?;
    let mut report = MigrateReport {
        dir: dir.to_path_buf(),
        ..MigrateReport::default()
    };
    let map = convert_messages(dir, db, &conn, &mut report)?;
    convert_groups(dir, db, &conn, &map, &mut report)?;
    conn.execute_batch("COMMIT")
        .map_err(|e| sql(db, "ending the read", e))?;
    if data_version(&conn, db)? != version {
        return Err(Error::new(
            ErrorKind::Transport,
            format!(
                "migrate {}: another process wrote to the old log during the migration; stop every process using {} and run `ampybus migrate` again (nothing was committed)",
                db.display(),
                dir.display()
            ),
        ));
    }
    Ok(report)
}

/// A row of `messages`: seq, topic, domain, pkey, log_us, headers, payload.
type OldRow = (i64, String, String, String, i64, Vec<u8>, Vec<u8>);

fn convert_messages(
    dir: &Path,
    db: &Path,
    conn: &Connection,
    report: &mut MigrateReport,
) -> Result<SeqMap> {
    let shared = Arc::new(Shared::open(dir, super::log::recover)?);
    let mut w = LogWriter::new(dir, shared, false)?;
    let mut map = SeqMap(Vec::new());
    let mut topics: HashMap<String, Arc<str>> = HashMap::new();
    let mut pending = Pending {
        recs: Vec::new(),
        olds: Vec::new(),
        log_us: 0,
        last_domain: 0,
        bytes: 0,
    };
    let mut st = conn
        .prepare(
            "SELECT seq, topic, domain, pkey, log_us, headers, payload FROM messages ORDER BY seq",
        )
        .map_err(|e| sql(db, "reading the messages", e))?;
    let mut rows = st
        .query([])
        .map_err(|e| sql(db, "reading the messages", e))?;
    while let Some(r) = rows
        .next()
        .map_err(|e| sql(db, "reading the messages", e))?
    {
        let row = || -> rusqlite::Result<OldRow> {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        };
        let (seq, topic, domain, pkey, log_us, headers, payload) =
            row().map_err(|e| sql(db, "reading the messages", e))?;
        let damaged = |what: String| {
            Error::new(
                ErrorKind::Transport,
                format!(
                    "migrate {}: message seq {seq} on {topic:?}: {what}; nothing was committed (restore the file or remove the row, then run migrate again)",
                    db.display()
                ),
            )
        };
        let d: Domain = domain
            .parse()
            .map_err(|e: Error| damaged(format!("domain {domain:?}: {}", e.message())))?;
        let h = decode_headers(&headers).map_err(|e| damaged(e.message().to_owned()))?;
        let mut compact = Vec::with_capacity(headers.len());
        h.encode_compact(&mut compact);
        let di = domain_index(d);
        if pending.must_flush_before(log_us, di) {
            pending.flush(&mut w, &mut map)?;
        }
        let topic = match topics.get(topic.as_str()) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = Arc::from(topic.as_str());
                topics.insert(topic, t.clone());
                t
            }
        };
        let kh = key_hash(pkey.as_bytes());
        pending.bytes += compact.len() + payload.len() + topic.len();
        pending.recs.push(NewRec {
            domain: di,
            topic,
            key_hash: kh,
            headers: compact,
            payload: Bytes::from(payload),
        });
        pending.olds.push((seq, group::slot(di, kh) as u16));
        pending.log_us = log_us;
        pending.last_domain = di;
        report.messages += 1;
        *report.messages_by_domain.entry(d).or_default() += 1;
        if d == Domain::Dlq {
            report.dlq_messages += 1;
        }
    }
    pending.flush(&mut w, &mut map)?;
    Ok(map)
}

/// A durable consumer of the old file.
struct OldConsumer {
    name: String,
    pattern: String,
    cursor: i64,
    created_us: i64,
}

fn convert_groups(
    dir: &Path,
    db: &Path,
    conn: &Connection,
    map: &SeqMap,
    report: &mut MigrateReport,
) -> Result<()> {
    let now_us = super::log::now_us();
    let now_ms = now_us / 1000;
    let mut consumers: Vec<OldConsumer> = Vec::new();
    if table_exists(conn, db, "consumers")? {
        let mut st = conn
            .prepare("SELECT name, pattern, cursor, created_us FROM consumers ORDER BY name")
            .map_err(|e| sql(db, "reading the consumers", e))?;
        let rows = st
            .query_map([], |r| {
                Ok(OldConsumer {
                    name: r.get(0)?,
                    pattern: r.get(1)?,
                    cursor: r.get(2)?,
                    created_us: r.get(3)?,
                })
            })
            .map_err(|e| sql(db, "reading the consumers", e))?;
        for c in rows {
            consumers.push(c.map_err(|e| sql(db, "reading the consumers", e))?);
        }
    }
    let has_pending = table_exists(conn, db, "pending")?;
    let mut journals: HashMap<String, Journal> = HashMap::new();
    for c in &consumers {
        check_name(db, &c.name)?;
        let meta = Meta {
            name: c.name.clone(),
            pattern: c.pattern.clone(),
            start: map.at_or_below(c.cursor),
            created_us: c.created_us,
        };
        let gdir = group::group_dir(dir, &c.name);
        meta.write(&gdir)?;
        let mut j = Journal::open(&gdir, meta)?;
        report.consumers += 1;
        if has_pending {
            let mut acked = Vec::new();
            let mut delivered: BTreeMap<usize, u64> = BTreeMap::new();
            let mut nacks = Vec::new();
            let mut st = conn
                .prepare_cached(
                    "SELECT seq, owner IS NULL, not_before_us, deliveries, acked FROM pending WHERE consumer = ?1 AND seq > ?2 ORDER BY seq",
                )
                .map_err(|e| sql(db, "reading the pending acks", e))?;
            let rows = st
                .query_map(params![c.name, c.cursor], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, bool>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, bool>(4)?,
                    ))
                })
                .map_err(|e| sql(db, "reading the pending acks", e))?;
            for row in rows {
                let (seq, released, not_before_us, deliveries, is_acked) =
                    row.map_err(|e| sql(db, "reading the pending acks", e))?;
                // A message deleted by retention meanwhile has nothing left to settle.
                let Some(m) = map.get(seq) else { continue };
                if is_acked {
                    acked.push((m.slot as usize, m.new));
                    continue;
                }
                if deliveries > 0 {
                    let t = delivered.entry(m.slot as usize).or_default();
                    *t = (*t).max(m.new);
                    report.in_flight += 1;
                }
                if released && not_before_us > now_us {
                    nacks.push((m.slot as usize, m.new, not_before_us));
                }
            }
            report.acked_above_cursor += acked.len() as u64;
            for chunk in acked.chunks(FRAME_ITEMS) {
                let body = group::frames::ack(0, now_ms, &[], chunk, &[]);
                j.append_shared(format::KIND_ACK, &body)?;
            }
            if !delivered.is_empty() {
                let through: Vec<(usize, u64)> = delivered.into_iter().collect();
                j.append_shared(format::KIND_DELIVERED, &group::frames::delivered(&through))?;
            }
            for (slot, seq, due) in nacks {
                j.append_shared(format::KIND_NACK, &group::frames::nack(slot, seq, due))?;
            }
        }
        journals.insert(c.name.clone(), j);
    }
    if !table_exists(conn, db, "applied")? {
        return Ok(());
    }
    // Dedupe records: one ACK frame per consumer and applied time (a frame has one time).
    let mut st = conn
        .prepare("SELECT consumer, key, applied_at_ms FROM applied ORDER BY consumer, applied_at_ms, key")
        .map_err(|e| sql(db, "reading the dedupe records", e))?;
    let mut rows = st
        .query([])
        .map_err(|e| sql(db, "reading the dedupe records", e))?;
    let mut batch: Option<(String, i64, Vec<u128>)> = None;
    let flush = |b: (String, i64, Vec<u128>),
                 journals: &mut HashMap<String, Journal>,
                 report: &mut MigrateReport|
     -> Result<()> {
        let (name, at_ms, keys) = b;
        if !journals.contains_key(&name) {
            check_name(db, &name)?;
            let meta = Meta {
                name: name.clone(),
                pattern: String::new(),
                start: 0,
                created_us: now_us,
            };
            let gdir = group::group_dir(dir, &name);
            meta.write(&gdir)?;
            journals.insert(name.clone(), Journal::open(&gdir, meta)?);
            report.dedupe_only_groups += 1;
        }
        let j = journals.get_mut(&name).expect("inserted above");
        for chunk in keys.chunks(FRAME_ITEMS) {
            let body = group::frames::ack(0, at_ms, &[], &[], chunk);
            j.append_shared(format::KIND_ACK, &body)?;
        }
        report.dedupe_entries += keys.len() as u64;
        Ok(())
    };
    while let Some(r) = rows
        .next()
        .map_err(|e| sql(db, "reading the dedupe records", e))?
    {
        let (consumer, key, at_ms): (String, String, i64) =
            (|| Ok::<_, rusqlite::Error>((r.get(0)?, r.get(1)?, r.get(2)?)))()
                .map_err(|e| sql(db, "reading the dedupe records", e))?;
        let same = batch
            .as_ref()
            .is_some_and(|(c, t, k)| *c == consumer && *t == at_ms && k.len() < FRAME_ITEMS);
        if !same && let Some(b) = batch.take() {
            flush(b, &mut journals, report)?;
        }
        batch
            .get_or_insert_with(|| (consumer, at_ms, Vec::new()))
            .2
            .push(group::key128(&key));
    }
    if let Some(b) = batch.take() {
        flush(b, &mut journals, report)?;
    }
    Ok(())
}

/// A consumer name must fit one line of a group definition.
fn check_name(db: &Path, name: &str) -> Result<()> {
    if name.is_empty() || name.chars().any(|c| c.is_control()) {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "migrate {}: consumer name {name:?} is empty or has control characters; a group cannot be named so (rename it in the old file, then run migrate again)",
                db.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The conversion checked against the old file itself: the fixture written by the
    //! SQLite version (commit 1596101), read back through the log and group modules.
    use super::*;
    use crate::headers::Headers;
    use crate::topic::TopicPattern;
    use crate::transport::embedded::format::Rec;
    use crate::transport::embedded::log::DomainReader;
    use std::collections::{BTreeSet, HashSet};

    /// The schema of the old file (as commit 1596101 created it).
    const OLD_SCHEMA: &str = "
        CREATE TABLE messages(seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
            domain TEXT NOT NULL, pkey TEXT NOT NULL, message_id TEXT NOT NULL,
            log_us INTEGER NOT NULL, size INTEGER NOT NULL, headers BLOB NOT NULL,
            payload BLOB NOT NULL);
        CREATE TABLE consumers(name TEXT PRIMARY KEY, pattern TEXT NOT NULL,
            cursor INTEGER NOT NULL, created_us INTEGER NOT NULL);
        CREATE TABLE pending(consumer TEXT NOT NULL, seq INTEGER NOT NULL, pkey TEXT NOT NULL,
            owner TEXT, not_before_us INTEGER NOT NULL, deliveries INTEGER NOT NULL,
            acked INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(consumer, seq)) WITHOUT ROWID;
        CREATE TABLE applied(consumer TEXT NOT NULL, key TEXT NOT NULL,
            applied_at_ms INTEGER NOT NULL, PRIMARY KEY(consumer, key)) WITHOUT ROWID;
    ";

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/embedded-v1596101/data"
    );

    /// A copy of the fixture's data directory.
    fn fixture() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        for ent in std::fs::read_dir(FIXTURE).unwrap() {
            let ent = ent.unwrap();
            if ent.file_type().unwrap().is_file() {
                std::fs::copy(ent.path(), tmp.path().join(ent.file_name())).unwrap();
            }
        }
        tmp
    }

    struct OldMsg {
        seq: i64,
        topic: String,
        log_us: i64,
        headers: Headers,
        payload: Vec<u8>,
    }

    struct Old {
        msgs: Vec<OldMsg>,
        /// name → (pattern, cursor)
        consumers: BTreeMap<String, (String, i64)>,
        /// (consumer, seq) → (deliveries, acked)
        pending: BTreeMap<(String, i64), (i64, bool)>,
        /// consumer → key → applied_at_ms
        applied: BTreeMap<String, BTreeMap<String, i64>>,
    }

    fn read_old(db: &Path) -> Old {
        let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let mut st = c
            .prepare("SELECT seq, topic, log_us, headers, payload FROM messages ORDER BY seq")
            .unwrap();
        let msgs = st
            .query_map([], |r| {
                Ok(OldMsg {
                    seq: r.get(0)?,
                    topic: r.get(1)?,
                    log_us: r.get(2)?,
                    headers: decode_headers(&r.get::<_, Vec<u8>>(3)?).unwrap(),
                    payload: r.get(4)?,
                })
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let mut st = c
            .prepare("SELECT name, pattern, cursor FROM consumers")
            .unwrap();
        let consumers = st
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let mut st = c
            .prepare("SELECT consumer, seq, deliveries, acked FROM pending")
            .unwrap();
        let pending = st
            .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?))))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let mut applied: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        let mut st = c
            .prepare("SELECT consumer, key, applied_at_ms FROM applied")
            .unwrap();
        for r in st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .unwrap()
        {
            let (c, k, t) = r.unwrap();
            applied.entry(c).or_default().insert(k, t);
        }
        Old {
            msgs,
            consumers,
            pending,
            applied,
        }
    }

    /// Every record of the converted directory, in sequence order.
    fn read_new(data: &Path) -> Vec<Rec> {
        let mut w = LogWriter::new(
            data,
            Arc::new(Shared::open(data, super::super::log::recover).unwrap()),
            false,
        )
        .unwrap();
        let snap = w.locked(|_, s| Ok(s)).unwrap();
        let mut out = Vec::new();
        for (d, end) in snap.domains.iter().enumerate().take(Domain::ALL.len()) {
            let mut r = DomainReader::new(data, d, 0);
            while r.read(end, &mut out, usize::MAX).unwrap() {}
        }
        out.sort_by_key(|r| r.seq);
        out
    }

    fn journal(data: &Path, name: &str) -> Journal {
        let dir = group::group_dir(data, name);
        let meta = Meta::read(&dir).unwrap().unwrap();
        Journal::open(&dir, meta).unwrap()
    }

    fn domain_of(topic: &str) -> usize {
        domain_index(topic.split('.').nth(2).unwrap().parse().unwrap())
    }

    /// Checks the converted directory `data` against the old file `db`, message by message and
    /// consumer by consumer; returns the old contents for further checks.
    fn check_against(data: &Path, db: &Path) -> (Old, Vec<Rec>) {
        let old = read_old(db);
        let new = read_new(data);
        // Every message, in the same order, with the same topic, time, headers and payload.
        assert_eq!(new.len(), old.msgs.len());
        let seqs: Vec<u64> = new.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=old.msgs.len() as u64).collect::<Vec<_>>());
        let mut new_of_old = HashMap::new();
        for (o, n) in old.msgs.iter().zip(&new) {
            assert_eq!(&*n.topic, o.topic, "seq {}", o.seq);
            assert_eq!(n.log_us, o.log_us, "seq {}", o.seq);
            assert_eq!(Headers::decode_compact(&n.headers).unwrap(), o.headers);
            assert_eq!(&n.payload[..], &o.payload[..], "seq {}", o.seq);
            let pkey = o.headers.partition_key().unwrap_or("");
            assert_eq!(n.key_hash, key_hash(pkey.as_bytes()));
            new_of_old.insert(o.seq, n);
        }
        // Each consumer: what a group delivers from now on is exactly what the old consumer
        // had not settled; what it delivers again counts as delivered before.
        for (name, (pattern, cursor)) in &old.consumers {
            let j = journal(data, name);
            assert_eq!(j.meta.pattern, *pattern);
            let pat = TopicPattern::parse(pattern).unwrap();
            let settled_new = |r: &Rec| {
                let s = group::slot(domain_of(&r.topic), r.key_hash);
                r.seq <= j.state.positions[s] || j.state.acked.contains(s, r.seq)
            };
            let owed_new: BTreeSet<u64> = new
                .iter()
                .filter(|r| pat.matches(&r.topic) && !settled_new(r))
                .map(|r| r.seq)
                .collect();
            let owed_old: BTreeSet<u64> = old
                .msgs
                .iter()
                .filter(|m| {
                    pat.matches(&m.topic)
                        && m.seq > *cursor
                        && old.pending.get(&(name.clone(), m.seq)).is_none_or(|p| !p.1)
                })
                .map(|m| new_of_old[&m.seq].seq)
                .collect();
            assert_eq!(owed_new, owed_old, "consumer {name}");
            let again_new: BTreeSet<u64> = new
                .iter()
                .filter(|r| {
                    owed_new.contains(&r.seq)
                        && r.seq <= j.state.delivered[group::slot(domain_of(&r.topic), r.key_hash)]
                })
                .map(|r| r.seq)
                .collect();
            let again_old: BTreeSet<u64> = old
                .pending
                .iter()
                .filter(|((c, s), (d, acked))| c == name && *s > *cursor && *d > 0 && !acked)
                .filter_map(|((_, s), _)| new_of_old.get(s).map(|r| r.seq))
                .collect();
            assert_eq!(again_new, again_old, "consumer {name}: delivered before");
        }
        // Dedupe records, with their times, in the group of the same name.
        for (name, keys) in &old.applied {
            let dir = group::group_dir(data, name);
            let meta = Meta::read(&dir).ok().flatten().unwrap_or(Meta {
                name: name.clone(),
                pattern: String::new(),
                start: 0,
                created_us: 0,
            });
            let j = Journal::open(&dir, meta).unwrap();
            assert_eq!(j.state.dedupe.len(), keys.len(), "consumer {name}");
            for (k, t) in keys {
                assert_eq!(j.state.dedupe.get(&group::key128(k)), Some(t), "{name} {k}");
            }
        }
        (old, new)
    }

    fn names(dir: &Path) -> HashSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_fixture_converts_message_by_message_and_consumer_by_consumer() {
        let tmp = fixture();
        let dir = tmp.path();
        let r = migrate(dir).unwrap();
        assert!(!r.already_migrated && !r.redone);
        assert_eq!(r.messages, 111);
        let by: Vec<(&str, u64)> = r
            .messages_by_domain
            .iter()
            .map(|(d, n)| (d.as_str(), *n))
            .collect();
        assert_eq!(
            by,
            vec![
                ("bars", 53),
                ("signals", 1),
                ("orders", 23),
                ("fills", 23),
                ("positions", 1),
                ("metrics", 5),
                ("dlq", 1),
                ("control", 4)
            ]
        );
        assert_eq!(r.dlq_messages, 1);
        assert_eq!(r.consumers, 11);
        assert_eq!(r.acked_above_cursor, 17); // audit 10, fills-audit 7
        assert_eq!(r.in_flight, 4); // stuck
        assert_eq!(r.dedupe_entries, 38);
        assert_eq!(r.dedupe_only_groups, 0);
        assert_eq!(r.legacy_file, Some(dir.join(MIGRATED_DB_FILE)));
        assert_eq!(
            std::fs::read_to_string(dir.join(FORMAT_FILE)).unwrap(),
            FORMAT_TEXT
        );
        let files = names(dir);
        assert!(!files.contains(LEGACY_DB_FILE));
        let (old, new) = check_against(dir, &dir.join(MIGRATED_DB_FILE));
        // After a reboot the shared page is rebuilt from the files: the same records.
        std::fs::remove_file(dir.join("state.shm")).unwrap();
        let again = read_new(dir);
        let key = |r: &Rec| {
            (
                r.seq,
                r.log_us,
                r.topic.clone(),
                r.headers.clone(),
                r.payload.clone(),
            )
        };
        assert_eq!(
            again.iter().map(key).collect::<Vec<_>>(),
            new.iter().map(key).collect::<Vec<_>>()
        );

        // The fixture's particular cases, by hand.
        let audit = journal(dir, "audit");
        assert_eq!(audit.meta.start, 25);
        let acked: BTreeSet<u64> = audit.state.acked.iter().map(|(_, q)| q).collect();
        assert_eq!(acked, (26..=35).collect());
        let fills = journal(dir, "fills-audit");
        assert_eq!(fills.meta.start, 5);
        assert_eq!(fills.state.acked.iter().count(), 7);
        let owed_fills = new
            .iter()
            .filter(|r| r.topic.starts_with("ampy.dev.fills.") && r.seq > 5)
            .filter(|r| {
                let s = group::slot(domain_of(&r.topic), r.key_hash);
                !fills.state.acked.contains(s, r.seq)
            })
            .count();
        assert_eq!(owed_fills, 16);
        let stuck = journal(dir, "stuck");
        assert_eq!(stuck.meta.start, 0);
        let s = group::slot(domain_index(Domain::Orders), key_hash(b"co_fx_001"));
        assert_eq!(stuck.state.delivered[s], 4);
        // One commit of three domains whose order goes back and forth kept its order and time.
        let mixed: Vec<&str> = new[60..66]
            .iter()
            .map(|r| r.topic.split('.').nth(2).unwrap())
            .collect();
        assert_eq!(
            mixed,
            ["fills", "bars", "orders", "bars", "fills", "orders"]
        );
        assert!(new[60..66].iter().all(|r| r.log_us == new[60].log_us));
        let dlq: Vec<&Rec> = new
            .iter()
            .filter(|r| r.topic.starts_with("ampy.dev.dlq."))
            .collect();
        assert_eq!(dlq.len(), 1);
        assert_eq!(&*dlq[0].topic, "ampy.dev.dlq.v1.bars");
        assert_eq!(old.applied.values().map(|k| k.len()).sum::<usize>(), 38);
    }

    #[test]
    fn gaps_nack_delays_and_dedupe_only_names_are_carried_over() {
        let tmp = fixture();
        let dir = tmp.path();
        let due = super::super::log::now_us() + 3_600_000_000;
        {
            let c = Connection::open(dir.join(LEGACY_DB_FILE)).unwrap();
            // Retention took some messages (sequences now have gaps, at the cursor too); a
            // nack delayed one message of `stuck`; a dedupe name that is no consumer.
            c.execute_batch(&format!(
                "DELETE FROM messages WHERE seq IN (1, 2, 3, 25, 30, 111);
                 UPDATE pending SET owner = NULL, not_before_us = {due} WHERE consumer = 'stuck' AND seq = 4;
                 INSERT INTO applied(consumer, key, applied_at_ms) VALUES ('side-effects', 'k-1', 1000), ('side-effects', 'k-2', 1000), ('side-effects', 'k-3', 2000);
                 PRAGMA wal_checkpoint(TRUNCATE);"
            ))
            .unwrap();
        }
        let r = migrate(dir).unwrap();
        assert_eq!(r.messages, 105);
        assert_eq!(r.acked_above_cursor, 16); // audit's 30 is gone
        assert_eq!(r.dedupe_entries, 41);
        assert_eq!(r.dedupe_only_groups, 1);
        let (_, new) = check_against(dir, &dir.join(MIGRATED_DB_FILE));
        // The cursor 25 of `audit` was deleted: its start is the message before it (old 24,
        // new 21).
        assert_eq!(journal(dir, "audit").meta.start, 21);
        assert_eq!(journal(dir, "fills-audit").meta.start, 2);
        // Old seq 4 is new 1: its delay holds.
        let stuck = journal(dir, "stuck");
        assert_eq!(stuck.state.nacked.get(&1), Some(&due));
        assert_eq!(&*new[0].topic, "ampy.dev.orders.v1.requests");
        // The dedupe-only group: an empty pattern.
        let meta =
            std::fs::read_to_string(group::group_dir(dir, "side-effects").join("meta")).unwrap();
        assert!(meta.contains("\npattern \n"), "{meta}");
    }

    #[test]
    fn an_empty_old_log_converts_to_an_empty_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        Connection::open(dir.join(LEGACY_DB_FILE))
            .unwrap()
            .execute_batch(OLD_SCHEMA)
            .unwrap();
        let r = migrate(dir).unwrap();
        assert_eq!((r.messages, r.consumers, r.dedupe_entries), (0, 0, 0));
        assert!(read_new(dir).is_empty());
        assert!(migrate(dir).unwrap().already_migrated);
    }

    #[test]
    fn a_damaged_row_fails_naming_it_and_commits_nothing() {
        let tmp = fixture();
        let dir = tmp.path();
        let c = Connection::open(dir.join(LEGACY_DB_FILE)).unwrap();
        c.execute("UPDATE messages SET headers = x'0500' WHERE seq = 7", [])
            .unwrap();
        drop(c);
        let e = migrate(dir).unwrap_err().to_string();
        assert!(e.contains("seq 7") && e.contains(LEGACY_DB_FILE), "{e}");
        assert!(!dir.join(FORMAT_FILE).exists());
        assert!(dir.join(LEGACY_DB_FILE).exists());
        // Repaired, the next run removes the partial files and converts.
        let c = Connection::open(dir.join(LEGACY_DB_FILE)).unwrap();
        c.execute("DELETE FROM messages WHERE seq = 7", []).unwrap();
        drop(c);
        assert!(!dir.join("log").exists() && !dir.join("groups").exists());
        let r = migrate(dir).unwrap();
        assert!(!r.redone);
        assert_eq!(r.messages, 110);
        check_against(dir, &dir.join(MIGRATED_DB_FILE));
    }
}
