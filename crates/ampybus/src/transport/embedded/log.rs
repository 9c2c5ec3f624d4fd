//! The domain logs: appending (one writer at a time per data directory, group commit inside a
//! process), recovery after a crash, and reading.
//!
//! Order of a commit: take `writer.lock`; read the shared committed ends (another process may
//! have appended since, and a writer killed mid-commit may have left bytes past the end: they
//! were never acknowledged and are cut off); write one BATCH frame and its records per domain;
//! `fdatasync` (with `sync=full`); publish the new ends; release the lock; acknowledge. Readers
//! read only up to the published end, so they never see a half-written commit.

use super::format::{
    self, Damage, Rec, SEG_HEADER, SegState, Step, batch_body, check_seg_header, put_frame,
    put_varint, seg_header,
};
use super::shared::{DomainEnd, FileLock, MAX_DOMAINS, Shared, Snapshot, io_error, sync_dir};
use crate::error::{Error, ErrorKind, Result};
use crate::topic::Domain;
use bytes::Bytes;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A segment is closed and a new one started once it passes this size.
pub(crate) const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Header sets per segment at most (a new segment starts after).
const MAX_SETS: u32 = 1 << 20;
/// Bytes read from a segment at a time.
const CHUNK: usize = 1024 * 1024;

/// Index of a domain in the shared page.
pub(crate) fn domain_index(d: Domain) -> usize {
    Domain::ALL.iter().position(|x| *x == d).unwrap_or(0)
}

/// The directory of a domain's log.
pub(crate) fn domain_dir(data: &Path, d: Domain) -> PathBuf {
    data.join("log").join(d.as_str())
}

/// Path of the segment starting at `first`.
pub(crate) fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// The segments of a domain directory, by first sequence.
pub(crate) fn segments(dir: &Path) -> Result<Vec<u64>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir, "listing segments", e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| io_error(dir, "listing segments", e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name.strip_suffix(".seg")
            && let Ok(v) = n.parse::<u64>()
        {
            out.push(v);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The error for damage found in `path`.
pub(crate) fn damaged(path: &Path, d: &Damage) -> Error {
    Error::new(
        ErrorKind::Transport,
        format!(
            "embedded log {}: damaged at byte {}: {}; the messages from there on cannot be read (restore the file, or move it away to accept the loss)",
            path.display(),
            d.offset,
            d.what
        ),
    )
}

/// One message to append.
pub(crate) struct NewRec {
    pub domain: usize,
    pub topic: Arc<str>,
    pub key_hash: u32,
    /// Compact headers followed by the payload.
    pub headers: Vec<u8>,
    pub payload: Bytes,
}

/// A scan of a whole segment file.
struct Scanned {
    /// Offset after the last complete batch.
    good_end: u64,
    state: SegState,
    last_us: i64,
}

/// Reads `path` (a segment) from its start to `limit` (or its end), checking every frame.
/// `torn_ok`: a bad or incomplete frame with nothing valid after it is a torn tail (the scan
/// ends before it); otherwise, or when valid batches follow it, it is damage.
fn scan_file(path: &Path, limit: Option<u64>, torn_ok: bool) -> Result<Scanned> {
    let data = std::fs::read(path).map_err(|e| io_error(path, "reading a segment", e))?;
    let data = match limit {
        Some(l) if (l as usize) < data.len() => data[..l as usize].to_vec(),
        _ => data,
    };
    if check_seg_header(&data).is_none() {
        if torn_ok && data.len() < SEG_HEADER {
            return Ok(Scanned {
                good_end: 0,
                state: SegState::default(),
                last_us: 0,
            });
        }
        return Err(damaged(
            path,
            &Damage {
                offset: 0,
                what: "not a segment file (bad header)".into(),
            },
        ));
    }
    let shared = Bytes::from(data);
    let buf = &shared[..];
    let mut st = SegState::default();
    let mut at = SEG_HEADER;
    let mut good = (SEG_HEADER, st.clone(), 0i64);
    let mut last_us;
    loop {
        let (step, next) = st.step(buf, &shared, at);
        match step {
            Step::Rec(r) => {
                last_us = r.log_us;
                if st.at_boundary() {
                    good = (next, st.clone(), last_us);
                }
            }
            Step::Meta => {}
            Step::Incomplete if at == buf.len() && st.at_boundary() => break,
            Step::Incomplete | Step::Damage(_) => {
                let what = match step {
                    Step::Damage(w) => w,
                    _ => "frame runs past the end of the file",
                };
                if torn_ok && format::later_batch(buf, at, st.last_seq).is_none() {
                    tracing::warn!(
                        file = %path.display(),
                        offset = good.0,
                        "embedded log: cutting a torn tail (an unacknowledged commit) at byte {}",
                        good.0
                    );
                    break;
                }
                return Err(damaged(
                    path,
                    &Damage {
                        offset: at as u64,
                        what: what.into(),
                    },
                ));
            }
        }
        at = next;
    }
    Ok(Scanned {
        good_end: good.0 as u64,
        state: good.1,
        last_us: good.2,
    })
}

/// Cuts the file at `path` back to `len` when it is longer (`what` names the step in
/// errors); returns the file when it cut.
fn cut_back(path: &Path, len: u64, what: &str) -> Result<Option<File>> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, "opening a segment", e))?;
    let now = f
        .metadata()
        .map_err(|e| io_error(path, "reading a segment", e))?
        .len();
    if now <= len {
        return Ok(None);
    }
    f.set_len(len).map_err(|e| io_error(path, what, e))?;
    Ok(Some(f))
}

/// Rebuilds the shared state from the files (first open after a reboot or ever). Caller holds
/// the writer lock. Torn tails are cut; damage fails naming the file and offset.
pub(crate) fn recover(data: &Path, shared: &Shared) -> Result<Snapshot> {
    let mut snap = Snapshot::default();
    let mut max_seq = 0u64;
    for d in Domain::ALL {
        let i = domain_index(*d);
        let dir = domain_dir(data, *d);
        let mut segs = segments(&dir)?;
        let floor = read_floor(&dir)?;
        while let Some(&last) = segs.last() {
            let path = seg_path(&dir, last);
            let sc = scan_file(&path, None, true)?;
            if sc.state.last_seq == 0 {
                // Created by a writer that never committed to it.
                std::fs::remove_file(&path)
                    .map_err(|e| io_error(&path, "removing an empty segment", e))?;
                sync_dir(&dir)?;
                segs.pop();
                continue;
            }
            if let Some(f) = cut_back(&path, sc.good_end, "cutting a torn tail")? {
                f.sync_all()
                    .map_err(|e| io_error(&path, "syncing a segment", e))?;
            }
            snap.domains[i] = DomainEnd {
                seg_first: last,
                end: sc.good_end,
                last_seq: sc.state.last_seq,
                floor,
            };
            max_seq = max_seq.max(sc.state.last_seq);
            snap.last_us = snap.last_us.max(sc.last_us);
            break;
        }
        if segs.is_empty() {
            snap.domains[i].floor = floor;
        }
    }
    snap.next_seq = (max_seq + 1).max(shared.stale_next_seq());
    shared.publish(&snap);
    Ok(snap)
}

/// The retention floor of a domain (messages below it are deleted), from `floor`.
pub(crate) fn read_floor(dir: &Path) -> Result<u64> {
    let p = dir.join("floor");
    match std::fs::read(&p) {
        Ok(b)
            if b.len() == 12
                && format::crc(&[&b[..8]]) == u32::from_le_bytes([b[8], b[9], b[10], b[11]]) =>
        {
            Ok(u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])))
        }
        Ok(_) => Err(damaged(
            &p,
            &Damage {
                offset: 0,
                what: "retention floor file damaged".into(),
            },
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_error(&p, "reading the retention floor", e)),
    }
}

/// Writes a domain's retention floor durably (temp file, fsync, rename).
pub(crate) fn write_floor(dir: &Path, floor: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "creating the domain directory", e))?;
    let mut b = floor.to_le_bytes().to_vec();
    b.extend_from_slice(&format::crc(&[&b[..8]]).to_le_bytes());
    let tmp = dir.join("floor.tmp");
    let p = dir.join("floor");
    std::fs::write(&tmp, &b).map_err(|e| io_error(&tmp, "writing the retention floor", e))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(&tmp, "syncing the retention floor", e))?;
    std::fs::rename(&tmp, &p).map_err(|e| io_error(&p, "writing the retention floor", e))?;
    sync_dir(dir)
}

/// The open segment of one domain as this writer knows it.
struct Appender {
    seg_first: u64,
    path: PathBuf,
    file: File,
    end: u64,
    dict: HashMap<Arc<str>, u16>,
    /// Header sets of the segment (see `format::dict_encode`).
    sets: HashMap<Vec<u8>, u32>,
    /// The last topic and header set used (consecutive records mostly repeat them).
    last_topic: Option<(Arc<str>, u16)>,
    last_set: (Vec<u8>, u32),
    /// Offset up to which writeback was started (`sync=normal`).
    kicked: u64,
}

/// With `sync=normal`, writeback of a segment is started every this many bytes, so the sync
/// when the segment is closed finds little left to write (and commits never stall on it).
const KICK_BYTES: u64 = 4 * 1024 * 1024;

impl Appender {
    /// Segment `first` at `path`, known up to its file header only.
    fn empty(first: u64, path: PathBuf, file: File) -> Appender {
        Appender {
            seg_first: first,
            path,
            file,
            end: SEG_HEADER as u64,
            dict: HashMap::new(),
            sets: HashMap::new(),
            last_topic: None,
            last_set: (Vec::new(), 0),
            kicked: 0,
        }
    }

    /// Starts writeback of what was written since the last kick, without waiting for it.
    fn kick(&mut self) {
        if self.end - self.kicked < KICK_BYTES {
            return;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor; the call only starts writeback of the given range.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.kicked as libc::off64_t,
                (self.end - self.kicked) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.kicked = self.end;
    }

    /// The dictionary id of `s`, adding it (a TOPIC frame into `buf`) when new; `None` when
    /// the dictionary is full.
    fn intern(&mut self, s: &str, buf: &mut Vec<u8>) -> Option<u16> {
        if let Some((last, id)) = &self.last_topic
            && **last == *s
        {
            return Some(*id);
        }
        if let Some((k, id)) = self.dict.get_key_value(s) {
            self.last_topic = Some((k.clone(), *id));
            return Some(*id);
        }
        let id = u16::try_from(self.dict.len())
            .ok()
            .filter(|i| *i < u16::MAX)?;
        put_frame(buf, format::KIND_TOPIC, &[&id.to_le_bytes(), s.as_bytes()]);
        self.dict.insert(Arc::from(s), id);
        Some(id)
    }

    /// The id of header set `set`, adding it (a HSET frame into `buf`) when new.
    fn intern_set(&mut self, set: &[u8], buf: &mut Vec<u8>) -> Option<u32> {
        if self.last_set.0 == set {
            return Some(self.last_set.1);
        }
        if let Some(id) = self.sets.get(set) {
            self.last_set = (set.to_vec(), *id);
            return Some(*id);
        }
        let id = u32::try_from(self.sets.len())
            .ok()
            .filter(|i| *i < MAX_SETS)?;
        put_frame(buf, format::KIND_HSET, &[&id.to_le_bytes(), set]);
        self.sets.insert(set.to_vec(), id);
        self.last_set = (set.to_vec(), id);
        Some(id)
    }

    /// Opens segment `first` of `dir` and reads its dictionary up to `end`.
    fn open(dir: &Path, first: u64, end: u64) -> Result<Appender> {
        let path = seg_path(dir, first);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(&path, "opening a segment", e))?;
        let mut a = Appender::empty(first, path, file);
        a.catch_up(end)?;
        Ok(a)
    }

    /// Reads the topics another process added between our end and `end`.
    fn catch_up(&mut self, end: u64) -> Result<()> {
        if end <= self.end {
            return Ok(());
        }
        let mut buf = vec![0u8; (end - self.end) as usize];
        self.file
            .read_exact_at(&mut buf, self.end)
            .map_err(|e| io_error(&self.path, "reading a segment", e))?;
        let mut at = 0;
        while at < buf.len() {
            match format::frame_at(&buf, at) {
                format::Frame::Ok { kind, body, next } => {
                    let b = &buf[body.0..body.1];
                    if kind == format::KIND_TOPIC
                        && b.len() >= 2
                        && let Ok(t) = std::str::from_utf8(&b[2..])
                    {
                        self.dict
                            .insert(Arc::from(t), u16::from_le_bytes([b[0], b[1]]));
                    } else if kind == format::KIND_HSET && b.len() >= 4 {
                        self.sets.insert(
                            b[4..].to_vec(),
                            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                        );
                    }
                    at = next;
                }
                _ => {
                    return Err(damaged(
                        &self.path,
                        &Damage {
                            offset: self.end + at as u64,
                            what: "bad frame inside the committed part".into(),
                        },
                    ));
                }
            }
        }
        self.end = end;
        Ok(())
    }
}

/// The appending side of a data directory (one per handle, used by its writer thread).
pub(crate) struct LogWriter {
    data: PathBuf,
    shared: Arc<Shared>,
    lock: FileLock,
    lock_path: PathBuf,
    pub sync_full: bool,
    open: Vec<Option<Appender>>,
    buf: Vec<u8>,
    /// Scratch: one record's headers as stored, and its header set.
    hdr: Vec<u8>,
    set: Vec<u8>,
}

/// Microseconds since the epoch.
pub(crate) fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl LogWriter {
    pub fn new(data: &Path, shared: Arc<Shared>, sync_full: bool) -> Result<LogWriter> {
        let lock_path = data.join("writer.lock");
        let lock = FileLock::lock(&lock_path, true)?;
        lock.unlock();
        Ok(LogWriter {
            data: data.to_path_buf(),
            shared,
            lock,
            lock_path,
            sync_full,
            open: (0..MAX_DOMAINS).map(|_| None).collect(),
            buf: Vec::with_capacity(1 << 20),
            hdr: Vec::with_capacity(512),
            set: Vec::with_capacity(512),
        })
    }

    /// Runs `f` holding the writer lock, with the current committed state (recovered first
    /// when the shared page is not of this boot).
    pub fn locked<T>(
        &mut self,
        f: impl FnOnce(&mut LogWriter, Snapshot) -> Result<T>,
    ) -> Result<T> {
        self.lock.relock(&self.lock_path, true)?;
        // A torn page under the writer lock: its last writer was killed while publishing.
        let snap = if self.shared.is_current() && !self.shared.torn() {
            let snap = self.shared.snapshot();
            if self.shared.dirty() {
                self.clean_after_crash(&snap)
                    .map(|()| self.shared.set_dirty(false))
                    .map(|()| snap)
            } else {
                Ok(snap)
            }
        } else {
            for a in &mut self.open {
                *a = None;
            }
            recover(&self.data, &self.shared)
        };
        let out = snap.and_then(|s| f(self, s));
        self.lock.unlock();
        out
    }

    /// The last writer died between changing files for a commit and publishing it: what it
    /// wrote past the committed ends, and the segments it created, were never acknowledged nor
    /// read. Removes them in every domain (the next commits reuse their sequences, and a
    /// recovery must not find them).
    fn clean_after_crash(&mut self, snap: &Snapshot) -> Result<()> {
        for a in &mut self.open {
            *a = None;
        }
        for (d, domain) in Domain::ALL.iter().enumerate().take(MAX_DOMAINS) {
            let e = snap.domains[d];
            let dir = domain_dir(&self.data, *domain);
            let mut removed = false;
            for first in segments(&dir)? {
                let path = seg_path(&dir, first);
                if e.seg_first == 0 || first > e.seg_first {
                    tracing::warn!(file = %path.display(), "embedded log: removing a segment a killed writer created");
                    std::fs::remove_file(&path)
                        .map_err(|er| io_error(&path, "removing an unpublished segment", er))?;
                    removed = true;
                } else if first == e.seg_first
                    && cut_back(&path, e.end, "cutting an unacknowledged commit")?.is_some()
                {
                    tracing::warn!(file = %path.display(), offset = e.end, "embedded log: cut a commit a killed writer never published");
                }
            }
            if removed {
                sync_dir(&dir)?;
            }
        }
        Ok(())
    }

    /// Brings the appender of domain `d` in line with the committed state `e`.
    fn sync_appender(&mut self, d: usize, e: &DomainEnd) -> Result<()> {
        let dir = domain_dir(&self.data, Domain::ALL[d]);
        if e.seg_first == 0 {
            self.open[d] = None;
            return Ok(());
        }
        let reopen =
            !matches!(&self.open[d], Some(a) if a.seg_first == e.seg_first && a.end <= e.end);
        if reopen {
            self.open[d] = Some(Appender::open(&dir, e.seg_first, e.end)?);
        }
        let a = self.open[d].as_mut().expect("opened above");
        a.catch_up(e.end)?;
        let len = a
            .file
            .metadata()
            .map_err(|er| io_error(&a.path, "reading a segment", er))?
            .len();
        if len > e.end {
            // A writer was killed during a commit it never acknowledged.
            a.file
                .set_len(e.end)
                .map_err(|er| io_error(&a.path, "cutting an unacknowledged commit", er))?;
        }
        Ok(())
    }

    /// Starts a new segment for domain `d` whose first sequence is `first`.
    fn roll(&mut self, d: usize, first: u64) -> Result<()> {
        let dir = domain_dir(&self.data, Domain::ALL[d]);
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_error(&dir, "creating the domain directory", e))?;
        if let Some(old) = &self.open[d] {
            old.file
                .sync_data()
                .map_err(|e| io_error(&old.path, "syncing a closed segment", e))?;
        }
        let path = seg_path(&dir, first);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error(&path, "creating a segment", e))?;
        file.write_all_at(&seg_header(first), 0)
            .map_err(|e| io_error(&path, "writing a segment header", e))?;
        file.sync_all()
            .map_err(|e| io_error(&path, "syncing a new segment", e))?;
        sync_dir(&dir)?;
        self.open[d] = Some(Appender::empty(first, path, file));
        Ok(())
    }

    /// Appends `recs` as one commit; returns the sequence of each, in order.
    pub fn append(&mut self, recs: &[NewRec]) -> Result<Vec<u64>> {
        if recs.is_empty() {
            return Ok(Vec::new());
        }
        self.locked(|w, snap| w.append_locked(recs, None, snap))
    }

    /// Appends `recs` as one commit stamped with log time `log_us` instead of now (`ampybus
    /// migrate` keeps the original times); a time before the last commit's is raised to it, so
    /// log times never decrease along the sequence.
    pub fn append_at(&mut self, recs: &[NewRec], log_us: i64) -> Result<Vec<u64>> {
        if recs.is_empty() {
            return Ok(Vec::new());
        }
        self.locked(|w, snap| w.append_locked(recs, Some(log_us), snap))
    }

    fn append_locked(
        &mut self,
        recs: &[NewRec],
        at_us: Option<i64>,
        mut snap: Snapshot,
    ) -> Result<Vec<u64>> {
        let mut by_domain: [Vec<usize>; MAX_DOMAINS] = Default::default();
        for (i, r) in recs.iter().enumerate() {
            by_domain[r.domain].push(i);
        }
        let mut seqs = vec![0u64; recs.len()];
        let mut next = snap.next_seq.max(1);
        let log_us = at_us.unwrap_or_else(now_us).max(snap.last_us);
        let mut touched: Vec<(usize, u64)> = Vec::new(); // (domain, end before)
        let mut created: Vec<(usize, u64)> = Vec::new(); // (domain, first) of new segments
        // Until published (or cut back below): a writer dying in between leaves files the
        // next one must clean up.
        self.shared.set_dirty(true);
        let result = (|| -> Result<()> {
            for (d, idx) in by_domain.iter().enumerate() {
                if idx.is_empty() {
                    continue;
                }
                let e = snap.domains[d];
                self.sync_appender(d, &e)?;
                let first = next;
                let need_roll = match &self.open[d] {
                    None => true,
                    Some(a) => {
                        a.end >= SEGMENT_BYTES
                            || a.dict.len() + idx.len() >= u16::MAX as usize
                            || a.sets.len() + idx.len() >= MAX_SETS as usize
                    }
                };
                if need_roll {
                    created.push((d, first));
                    self.roll(d, first)?;
                }
                let mut buf = std::mem::take(&mut self.buf);
                buf.clear();
                let a = self.open[d].as_mut().expect("rolled above");
                put_frame(
                    &mut buf,
                    format::KIND_BATCH,
                    &[&batch_body(first, idx.len() as u32, log_us, e.last_seq)],
                );
                let mut len = Vec::with_capacity(10);
                let mut hdr = std::mem::take(&mut self.hdr);
                let mut set = std::mem::take(&mut self.set);
                for &i in idx {
                    let r = &recs[i];
                    let tid = a.intern(&r.topic, &mut buf).unwrap_or(u16::MAX);
                    hdr.clear();
                    format::dict_encode(&r.headers, log_us, &mut hdr, &mut set, |v| {
                        a.intern_set(v, &mut buf)
                    });
                    len.clear();
                    put_varint(&mut len, u64::from(tid));
                    put_varint(&mut len, hdr.len() as u64);
                    let body = 2 + len.len() + hdr.len() + r.payload.len();
                    if body > format::MAX_BODY {
                        return Err(Error::new(
                            ErrorKind::Payload,
                            format!(
                                "embedded log: a message of {body} bytes is over the 256 MiB record limit"
                            ),
                        ));
                    }
                    put_frame(
                        &mut buf,
                        format::KIND_RECORD,
                        &[&(r.key_hash as u16).to_le_bytes(), &len, &hdr, &r.payload],
                    );
                    seqs[i] = next;
                    next += 1;
                }
                self.hdr = hdr;
                self.set = set;
                touched.push((d, a.end));
                let w = a.file.write_all_at(&buf, a.end);
                self.buf = buf;
                let a = self.open[d].as_mut().expect("rolled above");
                w.map_err(|e| io_error(&a.path, "appending", e))?;
                a.end += self.buf.len() as u64;
                if !self.sync_full {
                    a.kick();
                }
                snap.domains[d].seg_first = a.seg_first;
                snap.domains[d].end = a.end;
                snap.domains[d].last_seq = next - 1;
            }
            if self.sync_full {
                for (d, _) in &touched {
                    let a = self.open[*d].as_ref().expect("written above");
                    a.file
                        .sync_data()
                        .map_err(|e| io_error(&a.path, "syncing", e))?;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Nothing of this commit was published: cut what was written, remove the
            // segments it created, forget the appenders (their dictionaries may name cut
            // topics). Done, nothing is left for the next writer to clean up.
            let mut clean = true;
            for (d, end) in touched {
                if let Some(a) = self.open[d].take() {
                    clean &= a.file.set_len(end).is_ok();
                }
            }
            for (d, first) in created {
                let path = seg_path(&domain_dir(&self.data, Domain::ALL[d]), first);
                clean &= match std::fs::remove_file(&path) {
                    Ok(()) => true,
                    Err(e) => matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ),
                };
            }
            for (d, idx) in by_domain.iter().enumerate() {
                if !idx.is_empty() {
                    self.open[d] = None;
                }
            }
            if clean {
                self.shared.set_dirty(false);
            }
            return Err(e);
        }
        snap.next_seq = next;
        snap.last_us = log_us;
        self.shared.publish(&snap);
        Ok(seqs)
    }

    /// The shared page.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }
}

/// Reads one domain's log in sequence order from a position, never past the committed end.
pub(crate) struct DomainReader {
    dir: PathBuf,
    /// Index of the domain in the shared page.
    pub d: usize,
    seg_first: u64,
    path: PathBuf,
    file: Option<File>,
    off: u64,
    state: SegState,
    /// Records with a sequence at or below this are skipped.
    pub after: u64,
    /// Last sequence returned or skipped.
    pub pos: u64,
    /// Purged sequences of this domain, and the length of the file they were read from.
    purged: (u64, std::collections::HashSet<u64>),
    /// The last chunk read from the open segment and its file offset: the next call goes on
    /// from it rather than reading the file again (a call takes a few hundred records of a
    /// chunk that holds thousands).
    chunk: Option<(u64, Bytes)>,
}

/// The purged sequences of a domain directory (`purged`: KIND_PURGE frames of u64s).
pub(crate) fn read_purged(dir: &Path) -> Result<(u64, std::collections::HashSet<u64>)> {
    let p = dir.join("purged");
    let data = match std::fs::read(&p) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, Default::default())),
        Err(e) => return Err(io_error(&p, "reading the purged list", e)),
    };
    let mut set = std::collections::HashSet::new();
    let mut at = 0;
    while at < data.len() {
        match format::frame_at(&data, at) {
            format::Frame::Ok {
                kind: format::KIND_PURGE,
                body,
                next,
            } => {
                for c in data[body.0..body.1].chunks_exact(8) {
                    set.insert(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
                }
                at = next;
            }
            // A torn append (a purge that never returned) ends the list.
            format::Frame::Incomplete => break,
            _ => {
                return Err(damaged(
                    &p,
                    &Damage {
                        offset: at as u64,
                        what: "bad frame in the purged list".into(),
                    },
                ));
            }
        }
    }
    Ok((at as u64, set))
}

/// Appends purged sequences to a domain's list, durably.
pub(crate) fn append_purged(dir: &Path, seqs: &[u64]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "creating the domain directory", e))?;
    let p = dir.join("purged");
    let mut body = Vec::with_capacity(seqs.len() * 8);
    for s in seqs {
        body.extend_from_slice(&s.to_le_bytes());
    }
    let mut out = Vec::new();
    put_frame(&mut out, format::KIND_PURGE, &[&body]);
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(|e| io_error(&p, "opening the purged list", e))?;
    let before = f
        .metadata()
        .map_err(|e| io_error(&p, "reading the purged list", e))?
        .len();
    use std::io::Write;
    (&f).write_all(&out)
        .and_then(|()| f.sync_data())
        .map_err(|e| {
            // A partial frame (disk full) would make the next append follow a bad frame:
            // cut it (the caller holds the writer lock; nobody else appends).
            let _ = f.set_len(before);
            io_error(&p, "appending to the purged list", e)
        })
}

impl DomainReader {
    /// A reader of domain `d` that returns records after sequence `after`.
    pub fn new(data: &Path, d: usize, after: u64) -> DomainReader {
        DomainReader {
            dir: domain_dir(data, Domain::ALL[d]),
            d,
            seg_first: 0,
            path: PathBuf::new(),
            file: None,
            off: 0,
            state: SegState::default(),
            after,
            pos: after,
            purged: (0, Default::default()),
            chunk: None,
        }
    }

    /// Opens the segment holding `after + 1` (or the next one).
    fn open_segment(&mut self, end: &DomainEnd) -> Result<bool> {
        let segs = segments(&self.dir)?;
        let want = self.pos + 1;
        let pick = if self.file.is_none() {
            segs.iter()
                .rev()
                .find(|s| **s <= want)
                .or(segs.first())
                .copied()
        } else {
            segs.iter().find(|s| **s > self.seg_first).copied()
        };
        let Some(first) = pick else { return Ok(false) };
        if end.seg_first == 0 || first > end.seg_first {
            return Ok(false);
        }
        let path = seg_path(&self.dir, first);
        let file = match File::open(&path) {
            Ok(f) => f,
            // Removed by retention meanwhile: list again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.file = None;
                return Ok(false);
            }
            Err(e) => return Err(io_error(&path, "opening a segment", e)),
        };
        let mut h = [0u8; SEG_HEADER];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| io_error(&path, "reading a segment header", e))?;
        if check_seg_header(&h) != Some(first) {
            return Err(damaged(
                &path,
                &Damage {
                    offset: 0,
                    what: "segment header does not match its name".into(),
                },
            ));
        }
        let last_seq = self.state.last_seq;
        self.state = SegState {
            last_seq: if self.file.is_some() { last_seq } else { 0 },
            ..SegState::default()
        };
        self.seg_first = first;
        self.path = path;
        self.file = Some(file);
        self.off = SEG_HEADER as u64;
        self.chunk = None;
        Ok(true)
    }

    /// Calls `f` with every committed record after the position, in order, until `f` says
    /// stop; damage fails the scan (after the records before it were passed to `f`).
    pub fn scan(
        &mut self,
        end: &DomainEnd,
        mut f: impl FnMut(Rec) -> Result<std::ops::ControlFlow<()>>,
    ) -> Result<()> {
        let mut buf = Vec::new();
        loop {
            let more = self.read(end, &mut buf, 4096)?;
            for rec in buf.drain(..) {
                if f(rec)?.is_break() {
                    return Ok(());
                }
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Appends to `out` up to `max` records after the position, reading at most about
    /// `budget` bytes; returns false when nothing more is committed now. Damage (or an
    /// error) found after some records were appended ends the call with those records;
    /// the next call fails with it.
    pub fn read(&mut self, end: &DomainEnd, out: &mut Vec<Rec>, max: usize) -> Result<bool> {
        if end.last_seq <= self.pos {
            return Ok(false);
        }
        let start_len = out.len();
        let plen = std::fs::metadata(self.dir.join("purged"))
            .map(|m| m.len())
            .unwrap_or(0);
        if plen != self.purged.0 {
            self.purged = read_purged(&self.dir)?;
        }
        loop {
            if self.file.is_none() && !self.open_segment(end)? {
                return Ok(out.len() > start_len);
            }
            let sealed = self.seg_first < end.seg_first;
            let limit = if sealed {
                self.file
                    .as_ref()
                    .expect("open")
                    .metadata()
                    .map_err(|e| io_error(&self.path, "reading a segment", e))?
                    .len()
            } else {
                end.end
            };
            if self.off >= limit {
                if !self.state.at_boundary() {
                    if out.len() > start_len {
                        return Ok(true);
                    }
                    return Err(damaged(
                        &self.path,
                        &Damage {
                            offset: self.off,
                            what: "segment ends inside a batch".into(),
                        },
                    ));
                }
                if sealed {
                    let next = self.open_segment(end)?;
                    if !next {
                        return Ok(out.len() > start_len);
                    }
                    continue;
                }
                return Ok(out.len() > start_len);
            }
            if out.len() - start_len >= max {
                return Ok(true);
            }
            // The rest of the last chunk, when it goes on from here.
            let cached = match &self.chunk {
                Some((start, bytes))
                    if self.off >= *start && self.off < start + bytes.len() as u64 =>
                {
                    Some(bytes.slice((self.off - start) as usize..))
                }
                _ => None,
            };
            let from_cache = cached.is_some();
            let shared = match cached {
                Some(rest) => rest,
                None => {
                    let b = self.read_chunk(limit)?;
                    self.chunk = Some((self.off, b.clone()));
                    b
                }
            };
            let buf = &shared[..];
            let mut at = 0usize;
            loop {
                if out.len() - start_len >= max && self.state.at_boundary() {
                    break;
                }
                let (step, next) = self.state.step(buf, &shared, at);
                match step {
                    Step::Rec(r) => {
                        if r.seq > self.pos {
                            self.pos = r.seq;
                            if r.seq > self.after
                                && r.seq >= end.floor
                                && !self.purged.1.contains(&r.seq)
                            {
                                out.push(r);
                            }
                        }
                    }
                    Step::Meta => {}
                    // The cached chunk ends inside this frame: read from the file.
                    Step::Incomplete if at == 0 && from_cache => {
                        self.chunk = None;
                        break;
                    }
                    Step::Incomplete => {
                        if at == 0 {
                            if out.len() > start_len {
                                return Ok(true);
                            }
                            return Err(damaged(
                                &self.path,
                                &Damage {
                                    offset: self.off,
                                    what: "frame runs past the committed end".into(),
                                },
                            ));
                        }
                        break;
                    }
                    Step::Damage(what) => {
                        // Stop at the damaged frame (the state is that of its offset): the
                        // records before it are returned first, and this call or the next
                        // fails there, every time with the same offset.
                        self.off += at as u64;
                        if out.len() > start_len {
                            return Ok(true);
                        }
                        return Err(damaged(
                            &self.path,
                            &Damage {
                                offset: self.off,
                                what: what.into(),
                            },
                        ));
                    }
                }
                at = next;
            }
            self.off += at as u64;
            if at == buf.len() {
                // All of it read: the records hold what they need of it.
                self.chunk = None;
            }
        }
    }

    /// Reads the bytes of the open segment from the position, up to `limit`: a chunk, or
    /// the whole of a frame longer than a chunk.
    fn read_chunk(&mut self, limit: u64) -> Result<Bytes> {
        let want = (limit - self.off).min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; want];
        let file = self.file.as_ref().expect("open");
        file.read_exact_at(&mut buf, self.off)
            .map_err(|e| io_error(&self.path, "reading a segment", e))?;
        // A frame longer than the chunk: read it whole.
        if let format::Frame::Incomplete = format::frame_at(&buf, 0)
            && buf.len() >= format::FRAME_HEAD
        {
            let word = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let need = format::FRAME_HEAD + (word & 0x0FFF_FFFF) as usize;
            if (need as u64) <= limit - self.off && need > buf.len() {
                buf = vec![0u8; need];
                file.read_exact_at(&mut buf, self.off)
                    .map_err(|e| io_error(&self.path, "reading a segment", e))?;
            }
        }
        Ok(Bytes::from(buf))
    }
}

/// A log time (micros since the epoch) as a time.
pub(crate) fn us_to_time(us: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// The envelope of a stored record (headers decoded; a damaged record is an error naming its
/// sequence).
pub(crate) fn envelope_of(
    inner: &super::Inner,
    rec: &super::format::Rec,
) -> Result<crate::envelope::Envelope> {
    Ok(crate::envelope::Envelope {
        topic: rec.topic.clone().into(),
        headers: headers_of(inner, rec)?,
        payload: rec.payload.clone(),
    })
}

/// The decoded headers of a stored record; a record whose headers do not decode is damage.
pub(crate) fn headers_of(
    inner: &super::Inner,
    rec: &super::format::Rec,
) -> Result<crate::headers::Headers> {
    crate::headers::Headers::decode_compact(&rec.headers).map_err(|e| {
        damaged(
            &inner.dir,
            &super::format::Damage {
                offset: 0,
                what: format!(
                    "message {} on {}: stored headers do not decode: {}",
                    rec.seq,
                    rec.topic,
                    e.message()
                ),
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(payload: &[u8]) -> NewRec {
        let h = crate::Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
        let mut headers = Vec::new();
        h.encode_compact(&mut headers);
        NewRec {
            domain: domain_index(Domain::News),
            topic: Arc::from("ampy.dev.news.v1.raw"),
            key_hash: format::key_hash(b"k"),
            headers,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    /// After a reboot (the shared page of another boot) whose power cut tore the last commit,
    /// recovery cuts it — and the next commit does not reuse its sequences, which a consumer
    /// group may already have acked.
    #[test]
    fn recovery_after_a_reboot_never_hands_a_sequence_out_twice() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(Shared::open(dir.path(), recover).unwrap());
        let mut w = LogWriter::new(dir.path(), shared.clone(), false).unwrap();
        assert_eq!(w.append(&[rec(b"a"), rec(b"b")]).unwrap(), vec![1, 2]);
        assert_eq!(w.append(&[rec(b"c")]).unwrap(), vec![3]);
        drop(w);
        // The last commit torn on disk, and the page left by a boot that is over.
        let seg = seg_path(&domain_dir(dir.path(), Domain::News), 1);
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let page = dir.path().join("state.shm");
        let mut bytes = std::fs::read(&page).unwrap();
        bytes[16..32].fill(0);
        std::fs::write(&page, &bytes).unwrap();
        drop(shared);
        let shared = Arc::new(Shared::open(dir.path(), recover).unwrap());
        assert!(!shared.is_current());
        let mut w = LogWriter::new(dir.path(), shared.clone(), false).unwrap();
        assert_eq!(
            w.append(&[rec(b"d")]).unwrap(),
            vec![4],
            "sequence 3 handed out again"
        );
        let snap = shared.snapshot();
        let e = snap.domains[domain_index(Domain::News)];
        let mut r = DomainReader::new(dir.path(), domain_index(Domain::News), 0);
        let mut out = Vec::new();
        while r.read(&e, &mut out, 100).unwrap() {}
        let got: Vec<(u64, Vec<u8>)> = out.iter().map(|r| (r.seq, r.payload.to_vec())).collect();
        assert_eq!(
            got,
            vec![(1, b"a".to_vec()), (2, b"b".to_vec()), (4, b"d".to_vec())]
        );
    }

    /// A reader goes on from the chunk it read last: records split across the end of a
    /// chunk, a record longer than a chunk, and records committed after the chunk was read
    /// all come out once, in order, whole.
    #[test]
    fn reading_in_small_steps_across_chunks_returns_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Arc::new(Shared::open(dir.path(), recover).unwrap());
        let mut w = LogWriter::new(dir.path(), shared.clone(), false).unwrap();
        let payload = |i: usize| -> Vec<u8> {
            let len = if i == 1500 {
                CHUNK + CHUNK / 2
            } else {
                100 + (i * 37) % 900
            };
            (0..len).map(|b| (b + i) as u8).collect()
        };
        let mut expected = Vec::new();
        let d = domain_index(Domain::News);
        let mut r = DomainReader::new(dir.path(), d, 0);
        let mut out = Vec::new();
        for part in 0..3 {
            for i in part * 1000..(part + 1) * 1000 {
                let p = payload(i);
                let seqs = w.append(&[rec(&p)]).unwrap();
                expected.push((seqs[0], p));
            }
            // Part of what is committed, in steps of 7 (the rest after more is written).
            let e = shared.snapshot().domains[d];
            for _ in 0..50 {
                r.read(&e, &mut out, 7).unwrap();
            }
        }
        let e = shared.snapshot().domains[d];
        while r.read(&e, &mut out, 7).unwrap() {}
        let got: Vec<(u64, Vec<u8>)> = out.iter().map(|r| (r.seq, r.payload.to_vec())).collect();
        assert_eq!(got.len(), 3000);
        assert!(got == expected, "records differ from what was written");
    }
}
