//! Durable consumer groups: leased partitions and an append-only journal per group.
//!
//! `groups/<name>/` holds `meta` (pattern and start position, written once), `journal`
//! (checksummed frames, appended with `O_APPEND`, one `write` per frame) and `lock` (`flock`:
//! shared while appending, exclusive while changing leases or compacting). Every instance of
//! the group, in any process, replays the journal into the same [`GroupState`]:
//!
//! * **LEASE** `(owner, partitions, expires)`: the partitions an instance holds (a key
//!   hashes to one of [`PARTITIONS`]; one owner per partition gives per-key order across
//!   instances and processes).
//! * **ACK** `(owner, positions, acked sequences, dedupe keys, time)`: one frame, one CRC — the
//!   dedupe records and the acks of a batch are one atomic write. A position (everything of a
//!   domain's partition at or below it is settled) counts only from the partition's owner.
//! * **NACK** `(slot, sequence, due)`: a delayed redelivery that a new owner also respects.
//! * **DELIVERED** `(slot, through)`: how far a partition was handed out (delivery counts after
//!   a takeover).
//! * **SNAPSHOT**: the whole state, first frame of a compacted journal.
//!
//! The journal is written without `fsync` (like the positions of the SQLite log before it): it
//! survives `kill -9` of any process; a power loss may lose the last acks, which are then
//! delivered again (and skipped by dedupe when its records survived).

use super::format::{self, Frame, put_frame};
use super::shared::{FileLock, io_error, sync_dir};
use crate::error::{Error, ErrorKind, Result};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A cheap hasher for keys that are already hashes or sequences (dedupe key hashes, message
/// sequences): a multiply, no SipHash.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut a = [0u8; 8];
            a[..c.len()].copy_from_slice(c);
            self.0 =
                (self.0.rotate_left(5) ^ u64::from_le_bytes(a)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by hashes or sequences.
pub(crate) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// The slot recorded for an acked sequence whose slot the acking instance did not know.
pub(crate) const UNKNOWN_SLOT: usize = 255;

/// Sequences acked above their slot's position, per slot (dropped as positions pass them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Acked {
    /// No empty sets: when every ack is at or below its position (the usual state of a
    /// group that keeps up) the map is empty and a lookup is one length check.
    by_slot: FastMap<usize, std::collections::BTreeSet<u64>>,
}

impl Acked {
    /// True when `seq` (of `slot`) was acked.
    pub fn contains(&self, slot: usize, seq: u64) -> bool {
        if self.by_slot.is_empty() {
            return false;
        }
        [slot, UNKNOWN_SLOT]
            .iter()
            .any(|s| self.by_slot.get(s).is_some_and(|set| set.contains(&seq)))
    }

    fn insert(&mut self, slot: usize, seq: u64) {
        self.by_slot.entry(slot).or_default().insert(seq);
    }

    /// Forgets the sequences of `slot` at or below `pos`.
    fn prune(&mut self, slot: usize, pos: u64) {
        if let Some(set) = self.by_slot.get_mut(&slot) {
            *set = set.split_off(&(pos + 1));
            if set.is_empty() {
                self.by_slot.remove(&slot);
            }
        }
    }

    /// Every (slot, sequence) kept.
    pub fn iter(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.by_slot
            .iter()
            .flat_map(|(s, set)| set.iter().map(move |q| (*s, *q)))
    }
}

/// Partitions per consumer group (fixed).
pub(crate) const PARTITIONS: u32 = 16;
/// Slots: one per (domain, partition).
pub(crate) const SLOTS: usize = 16 * PARTITIONS as usize;
/// A journal longer than this is compacted into a snapshot.
const COMPACT_BYTES: u64 = 32 * 1024 * 1024;

/// The slot of a domain index and key hash.
pub(crate) fn slot(domain: usize, key_hash: u32) -> usize {
    domain * PARTITIONS as usize + (key_hash % PARTITIONS) as usize
}

/// The partition of a slot.
pub(crate) fn partition_of(slot: usize) -> u32 {
    (slot % PARTITIONS as usize) as u32
}

/// 128-bit FNV-1a of a dedupe key (stable across versions and processes).
pub(crate) fn key128(key: &str) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in key.as_bytes() {
        h ^= u128::from(*b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    h
}

/// The directory of a group (name percent-encoded to one path component).
pub(crate) fn group_dir(data: &Path, name: &str) -> PathBuf {
    let mut s = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && !s.is_empty()) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    data.join("groups").join(s)
}

/// The group's definition, written once when it is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub name: String,
    pub pattern: String,
    /// Every slot starts at this position.
    pub start: u64,
    pub created_us: i64,
}

impl Meta {
    fn encode(&self) -> String {
        format!(
            "ampybus-group 1\nname {}\npattern {}\nstart {}\ncreated_us {}\n",
            self.name, self.pattern, self.start, self.created_us
        )
    }

    fn decode(path: &Path, s: &str) -> Result<Meta> {
        let bad = |what: &str| {
            Error::new(
                ErrorKind::Transport,
                format!(
                    "embedded log {}: damaged group definition: {what}",
                    path.display()
                ),
            )
        };
        let mut lines = s.lines();
        if lines.next() != Some("ampybus-group 1") {
            return Err(bad("unknown version line"));
        }
        let mut m = Meta {
            name: String::new(),
            pattern: String::new(),
            start: 0,
            created_us: 0,
        };
        for l in lines {
            let (k, v) = l
                .split_once(' ')
                .ok_or_else(|| bad("a line without a value"))?;
            match k {
                "name" => m.name = v.to_owned(),
                "pattern" => m.pattern = v.to_owned(),
                "start" => m.start = v.parse().map_err(|_| bad("start"))?,
                "created_us" => m.created_us = v.parse().map_err(|_| bad("created_us"))?,
                _ => {}
            }
        }
        // An empty pattern: a group known only by its dedupe records.
        Ok(m)
    }

    /// Reads the definition of the group in `dir`, if it exists.
    pub fn read(dir: &Path) -> Result<Option<Meta>> {
        let p = dir.join("meta");
        match std::fs::read_to_string(&p) {
            Ok(s) => Meta::decode(&p, &s).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&p, "reading the group definition", e)),
        }
    }

    /// Writes the definition durably (temp file, fsync, rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error(dir, "creating the group directory", e))?;
        let tmp = dir.join("meta.tmp");
        let p = dir.join("meta");
        let mut f =
            File::create(&tmp).map_err(|e| io_error(&tmp, "writing the group definition", e))?;
        f.write_all(self.encode().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io_error(&tmp, "writing the group definition", e))?;
        std::fs::rename(&tmp, &p).map_err(|e| io_error(&p, "writing the group definition", e))?;
        sync_dir(dir)
    }
}

/// A lease: which partitions (bit mask) an owner holds until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub mask: u64,
    pub expires_us: i64,
}

/// The state every instance rebuilds from the journal.
#[derive(Debug, Clone)]
pub(crate) struct GroupState {
    pub positions: Vec<u64>,
    pub delivered: Vec<u64>,
    /// Sequences acked above their slot's position.
    pub acked: Acked,
    /// Delayed redeliveries: sequence → due (µs).
    pub nacked: FastMap<u64, i64>,
    pub leases: HashMap<u128, Lease>,
    /// Dedupe records: key hash → applied at (ms).
    pub dedupe: FastMap<u128, i64>,
}

impl GroupState {
    pub fn new(start: u64) -> GroupState {
        GroupState {
            positions: vec![start; SLOTS],
            delivered: vec![start; SLOTS],
            acked: Acked::default(),
            nacked: FastMap::default(),
            leases: HashMap::new(),
            dedupe: FastMap::default(),
        }
    }

    fn apply(&mut self, kind: u32, b: &[u8]) -> Option<()> {
        let mut r = Rd { b, at: 0 };
        match kind {
            format::KIND_LEASE => {
                let owner = r.u128()?;
                let mask = r.u64()?;
                let expires_us = r.i64()?;
                if mask == 0 && expires_us == 0 {
                    // Released: the instance is gone.
                    self.leases.remove(&owner);
                } else {
                    // (A mask of 0 with a time: alive, holding nothing; it counts when the
                    // partitions are shared out.)
                    // A lease frame is written after checking the partitions are free.
                    for (o, l) in self.leases.iter_mut() {
                        if *o != owner {
                            l.mask &= !mask;
                        }
                    }
                    self.leases.insert(owner, Lease { mask, expires_us });
                }
            }
            format::KIND_ACK => {
                let owner = r.u128()?;
                let at_ms = r.i64()?;
                let n = r.u16()?;
                for _ in 0..n {
                    let slot = r.u8()? as usize;
                    let pos = r.u64()?;
                    let held = self
                        .leases
                        .get(&owner)
                        .is_some_and(|l| l.mask & (1 << partition_of(slot)) != 0);
                    if held && slot < SLOTS && pos > self.positions[slot] {
                        self.positions[slot] = pos;
                        self.acked.prune(slot, pos);
                    }
                }
                let n = r.u32()?;
                for _ in 0..n {
                    let slot = r.u8()? as usize;
                    let s = r.u64()?;
                    if slot >= SLOTS || s > self.positions[slot] {
                        self.acked.insert(slot, s);
                    }
                    self.nacked.remove(&s);
                }
                let n = r.u32()?;
                for _ in 0..n {
                    self.dedupe.insert(r.u128()?, at_ms);
                }
            }
            format::KIND_NACK => {
                let _slot = r.u8()?;
                let seq = r.u64()?;
                let due = r.i64()?;
                self.nacked.insert(seq, due);
            }
            format::KIND_DELIVERED => {
                let n = r.u16()?;
                for _ in 0..n {
                    let slot = r.u8()? as usize;
                    let through = r.u64()?;
                    if slot < SLOTS && through > self.delivered[slot] {
                        self.delivered[slot] = through;
                    }
                }
            }
            format::KIND_SNAPSHOT => {
                let mut s = GroupState::new(0);
                for i in 0..SLOTS {
                    s.positions[i] = r.u64()?;
                    s.delivered[i] = r.u64()?;
                }
                for _ in 0..r.u32()? {
                    let slot = r.u8()? as usize;
                    s.acked.insert(slot, r.u64()?);
                }
                for _ in 0..r.u32()? {
                    let k = r.u64()?;
                    s.nacked.insert(k, r.i64()?);
                }
                for _ in 0..r.u32()? {
                    let o = r.u128()?;
                    let mask = r.u64()?;
                    let expires_us = r.i64()?;
                    s.leases.insert(o, Lease { mask, expires_us });
                }
                for _ in 0..r.u32()? {
                    let k = r.u128()?;
                    s.dedupe.insert(k, r.i64()?);
                }
                *self = s;
            }
            _ => return None,
        }
        (r.at == b.len()).then_some(())
    }

    /// The state as one SNAPSHOT body (dedupe records older than `cutoff_ms` and acked
    /// sequences below every position are left out).
    fn snapshot_body(&self, cutoff_ms: i64) -> Vec<u8> {
        let mut b = Vec::new();
        for i in 0..SLOTS {
            b.extend_from_slice(&self.positions[i].to_le_bytes());
            b.extend_from_slice(&self.delivered[i].to_le_bytes());
        }
        let acked: Vec<(usize, u64)> = self.acked.iter().collect();
        b.extend_from_slice(&(acked.len() as u32).to_le_bytes());
        for (slot, s) in acked {
            b.push(slot as u8);
            b.extend_from_slice(&s.to_le_bytes());
        }
        b.extend_from_slice(&(self.nacked.len() as u32).to_le_bytes());
        for (k, v) in &self.nacked {
            b.extend_from_slice(&k.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.leases.len() as u32).to_le_bytes());
        for (o, l) in &self.leases {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&l.mask.to_le_bytes());
            b.extend_from_slice(&l.expires_us.to_le_bytes());
        }
        let keys: Vec<(&u128, &i64)> = self
            .dedupe
            .iter()
            .filter(|(_, t)| **t >= cutoff_ms)
            .collect();
        b.extend_from_slice(&(keys.len() as u32).to_le_bytes());
        for (k, t) in keys {
            b.extend_from_slice(&k.to_le_bytes());
            b.extend_from_slice(&t.to_le_bytes());
        }
        b
    }
}

struct Rd<'a> {
    b: &'a [u8],
    at: usize,
}

impl Rd<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let s = self.b.get(self.at..self.at + N)?;
        self.at += N;
        s.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take()?))
    }
    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.take()?))
    }
}

/// Builders of journal frame bodies.
pub(crate) mod frames {
    /// LEASE.
    pub fn lease(owner: u128, mask: u64, expires_us: i64) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&owner.to_le_bytes());
        b.extend_from_slice(&mask.to_le_bytes());
        b.extend_from_slice(&expires_us.to_le_bytes());
        b
    }

    /// ACK.
    pub fn ack(
        owner: u128,
        at_ms: i64,
        positions: &[(usize, u64)],
        acked: &[(usize, u64)],
        keys: &[u128],
    ) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(34 + positions.len() * 9 + acked.len() * 9 + keys.len() * 16);
        b.extend_from_slice(&owner.to_le_bytes());
        b.extend_from_slice(&at_ms.to_le_bytes());
        b.extend_from_slice(&(positions.len() as u16).to_le_bytes());
        for (slot, pos) in positions {
            b.push(*slot as u8);
            b.extend_from_slice(&pos.to_le_bytes());
        }
        b.extend_from_slice(&(acked.len() as u32).to_le_bytes());
        for (slot, s) in acked {
            b.push(*slot as u8);
            b.extend_from_slice(&s.to_le_bytes());
        }
        b.extend_from_slice(&(keys.len() as u32).to_le_bytes());
        for k in keys {
            b.extend_from_slice(&k.to_le_bytes());
        }
        b
    }

    /// NACK.
    pub fn nack(slot: usize, seq: u64, due_us: i64) -> Vec<u8> {
        let mut b = Vec::with_capacity(17);
        b.push(slot as u8);
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&due_us.to_le_bytes());
        b
    }

    /// DELIVERED.
    pub fn delivered(through: &[(usize, u64)]) -> Vec<u8> {
        let mut b = Vec::with_capacity(2 + through.len() * 9);
        b.extend_from_slice(&(through.len() as u16).to_le_bytes());
        for (slot, t) in through {
            b.push(*slot as u8);
            b.extend_from_slice(&t.to_le_bytes());
        }
        b
    }
}

/// One process's view of a group's journal: the state replayed so far and the file to append
/// to.
pub(crate) struct Journal {
    dir: PathBuf,
    path: PathBuf,
    lock_path: PathBuf,
    lock: FileLock,
    file: File,
    ino: u64,
    off: u64,
    pub state: GroupState,
    pub meta: Meta,
    buf: Vec<u8>,
}

impl Journal {
    /// Opens the journal of the group defined by `meta` in `dir` and replays it.
    pub fn open(dir: &Path, meta: Meta) -> Result<Journal> {
        let path = dir.join("journal");
        let lock_path = dir.join("lock");
        let lock = FileLock::lock(&lock_path, false)?;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io_error(&path, "opening the group journal", e))?;
        let ino = file
            .metadata()
            .map_err(|e| io_error(&path, "reading the group journal", e))?
            .ino();
        lock.unlock();
        let mut j = Journal {
            dir: dir.to_path_buf(),
            path,
            lock_path,
            lock,
            file,
            ino,
            off: 0,
            state: GroupState::new(meta.start),
            meta,
            buf: Vec::new(),
        };
        j.with_lock(true, |j| j.catch_up(true))?;
        Ok(j)
    }

    /// Runs `f` holding the group lock (exclusive or shared); the journal is caught up first.
    pub fn with_lock<T>(
        &mut self,
        exclusive: bool,
        f: impl FnOnce(&mut Journal) -> Result<T>,
    ) -> Result<T> {
        self.lock.relock(&self.lock_path, exclusive)?;
        let out = self.catch_up(exclusive).and_then(|()| f(self));
        self.lock.unlock();
        out
    }

    /// Replays frames appended since the last call. With the exclusive lock held, a bad frame
    /// with nothing valid after it is a torn append of a killed process and is cut off;
    /// otherwise (or when valid frames follow) it is damage. Without it, a bad tail may be an
    /// append in progress and is left for later.
    pub fn catch_up(&mut self, exclusive: bool) -> Result<()> {
        // A compaction replaced the file: start over on the new one.
        let ino = std::fs::metadata(&self.path)
            .map_err(|e| io_error(&self.path, "reading the group journal", e))?
            .ino();
        if ino != self.ino {
            self.file = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| io_error(&self.path, "opening the group journal", e))?;
            self.ino = ino;
            self.off = 0;
            self.state = GroupState::new(self.meta.start);
        }
        let len = self
            .file
            .metadata()
            .map_err(|e| io_error(&self.path, "reading the group journal", e))?
            .len();
        if len <= self.off {
            return Ok(());
        }
        let mut buf = vec![0u8; (len - self.off) as usize];
        self.file
            .read_exact_at(&mut buf, self.off)
            .map_err(|e| io_error(&self.path, "reading the group journal", e))?;
        let mut at = 0;
        while at < buf.len() {
            match format::frame_at(&buf, at) {
                Frame::Ok { kind, body, next } => {
                    if self.state.apply(kind, &buf[body.0..body.1]).is_none() {
                        return Err(super::log::damaged(
                            &self.path,
                            &format::Damage {
                                offset: self.off + at as u64,
                                what: "malformed journal frame".into(),
                            },
                        ));
                    }
                    at = next;
                }
                Frame::Incomplete | Frame::Bad(_) => {
                    if !exclusive {
                        break;
                    }
                    let valid_after = (at + 1..buf.len())
                        .any(|i| matches!(format::frame_at(&buf, i), Frame::Ok { .. }));
                    if valid_after {
                        return Err(super::log::damaged(
                            &self.path,
                            &format::Damage {
                                offset: self.off + at as u64,
                                what: "bad journal frame followed by valid ones".into(),
                            },
                        ));
                    }
                    let cut = self.off + at as u64;
                    tracing::warn!(journal = %self.path.display(), offset = cut, "embedded log: cutting a torn journal append");
                    self.file
                        .set_len(cut)
                        .map_err(|e| io_error(&self.path, "cutting a torn journal append", e))?;
                    buf.truncate(at);
                    break;
                }
            }
        }
        self.off += at as u64;
        Ok(())
    }

    /// Appends one frame (caller holds the lock, shared or exclusive) and applies it.
    pub fn append(&mut self, kind: u32, body: &[u8]) -> Result<()> {
        self.buf.clear();
        put_frame(&mut self.buf, kind, &[body]);
        let mut start = None;
        let mut done = 0;
        while done < self.buf.len() {
            match (&self.file).write(&self.buf[done..]) {
                Ok(0) => {
                    let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                    return Err(self.cut_partial_append(start, e));
                }
                Ok(n) => {
                    if start.is_none() {
                        // Where this frame starts (O_APPEND: the offset is after our bytes).
                        start = (&self.file).stream_position().ok().map(|p| p - n as u64);
                    }
                    done += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.cut_partial_append(start, e)),
            }
        }
        // Frames appended by others before ours are read by the next catch-up; ours is
        // applied then too (the file is replayed in order).
        self.catch_up(false)
    }

    /// After a failed append (disk full) that wrote part of a frame from `start`: cuts it
    /// off, so that later appends do not follow a bad frame (which would make the journal
    /// read as damaged). Only when it is still the end of the file under the exclusive lock
    /// (kept until the caller's `with_lock` ends); otherwise another process appended after
    /// it, or already cut it as a torn append. Returns the error of the append.
    fn cut_partial_append(&mut self, start: Option<u64>, e: std::io::Error) -> Error {
        let err = io_error(&self.path, "appending to the group journal", e);
        let Some(start) = start else { return err };
        let cut = self.lock.relock(&self.lock_path, true).and_then(|()| {
            let end = (&self.file)
                .stream_position()
                .and_then(|pos| Ok((pos, self.file.metadata()?.len())))
                .map_err(|e| io_error(&self.path, "reading the group journal", e))?;
            match end {
                (pos, len) if len == pos => self
                    .file
                    .set_len(start)
                    .map_err(|e| io_error(&self.path, "cutting a partial journal append", e)),
                _ => Ok(()),
            }
        });
        if let Err(c) = cut {
            tracing::warn!(journal = %self.path.display(), error = %c, "embedded log: a partial journal append could not be cut");
        }
        err
    }

    /// Appends a frame under the shared lock.
    pub fn append_shared(&mut self, kind: u32, body: &[u8]) -> Result<()> {
        self.with_lock(false, |j| j.append(kind, body))
    }

    /// Replaces the journal by a snapshot of its state when it has grown past the limit
    /// (caller holds the exclusive lock).
    pub fn maybe_compact(&mut self, cutoff_ms: i64) -> Result<()> {
        if self.off < COMPACT_BYTES {
            return Ok(());
        }
        let body = self.state.snapshot_body(cutoff_ms);
        let mut out = Vec::new();
        put_frame(&mut out, format::KIND_SNAPSHOT, &[&body]);
        let tmp = self.dir.join("journal.tmp");
        let mut f =
            File::create(&tmp).map_err(|e| io_error(&tmp, "compacting the group journal", e))?;
        f.write_all(&out)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_error(&tmp, "compacting the group journal", e))?;
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| io_error(&self.path, "compacting the group journal", e))?;
        sync_dir(&self.dir)?;
        self.catch_up(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            name: "g".into(),
            pattern: ">".into(),
            start: 5,
            created_us: 1,
        }
    }

    #[test]
    fn two_journals_see_each_others_frames_and_positions_count_only_from_owners() {
        let dir = tempfile::tempdir().unwrap();
        meta().write(dir.path()).unwrap();
        let mut a = Journal::open(dir.path(), Meta::read(dir.path()).unwrap().unwrap()).unwrap();
        let mut b = Journal::open(dir.path(), meta()).unwrap();
        a.with_lock(true, |j| {
            j.append(format::KIND_LEASE, &frames::lease(1, 0b1, i64::MAX))
        })
        .unwrap();
        // Owner 1 holds partition 0: its position for slot 0 counts; owner 2's for slot 0 not.
        a.append_shared(
            format::KIND_ACK,
            &frames::ack(1, 10, &[(0, 9)], &[(0, 12)], &[key128("m1")]),
        )
        .unwrap();
        b.append_shared(
            format::KIND_ACK,
            &frames::ack(2, 11, &[(0, 50)], &[], &[key128("m2")]),
        )
        .unwrap();
        b.with_lock(false, |_| Ok(())).unwrap();
        a.with_lock(false, |_| Ok(())).unwrap();
        for j in [&a, &b] {
            assert_eq!(j.state.positions[0], 9);
            assert_eq!(j.state.positions[1], 5);
            assert!(j.state.acked.contains(0, 12));
            assert_eq!(j.state.dedupe.get(&key128("m1")), Some(&10));
            assert_eq!(j.state.dedupe.get(&key128("m2")), Some(&11));
            assert_eq!(j.state.leases.get(&1).map(|l| l.mask), Some(1));
        }
    }

    #[test]
    fn a_torn_append_is_cut_and_damage_before_valid_frames_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Journal::open(dir.path(), meta()).unwrap();
        a.append_shared(format::KIND_NACK, &frames::nack(0, 7, 100))
            .unwrap();
        let good = std::fs::metadata(&a.path).unwrap().len();
        // Half a frame at the end: a process killed inside its write.
        let mut f = OpenOptions::new().append(true).open(&a.path).unwrap();
        f.write_all(&[1, 2, 3, 4, 5]).unwrap();
        let b = Journal::open(dir.path(), meta()).unwrap();
        assert_eq!(std::fs::metadata(&b.path).unwrap().len(), good);
        assert_eq!(b.state.nacked.get(&7), Some(&100));
        // Damage in the middle: a flipped byte in the first of two frames.
        drop(b);
        a.append_shared(format::KIND_NACK, &frames::nack(0, 8, 100))
            .unwrap();
        let mut bytes = std::fs::read(&a.path).unwrap();
        bytes[10] ^= 0xFF;
        std::fs::write(&a.path, &bytes).unwrap();
        let err = Journal::open(dir.path(), meta()).err().unwrap().to_string();
        assert!(err.contains("journal") && err.contains("byte 0"), "{err}");
    }

    #[test]
    fn compaction_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Journal::open(dir.path(), meta()).unwrap();
        a.with_lock(true, |j| {
            j.append(format::KIND_LEASE, &frames::lease(3, 0b11, 99))
        })
        .unwrap();
        a.append_shared(
            format::KIND_ACK,
            &frames::ack(3, 7, &[(1, 40)], &[(1, 44)], &[9]),
        )
        .unwrap();
        let before = a.state.clone();
        a.off = COMPACT_BYTES; // force
        a.with_lock(true, |j| j.maybe_compact(0)).unwrap();
        let b = Journal::open(dir.path(), meta()).unwrap();
        assert_eq!(b.state.positions, before.positions);
        assert_eq!(b.state.acked, before.acked);
        assert_eq!(b.state.dedupe, before.dedupe);
        assert_eq!(b.state.leases, before.leases);
    }
}
