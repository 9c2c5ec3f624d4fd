//! The on-disk format of the embedded log: segment files of checksummed frames.
//!
//! A segment `log/<domain>/<first_seq>.seg` starts with a 16-byte file header (`SEG_MAGIC`,
//! then the first sequence it may hold) and continues with frames:
//!
//! ```text
//! frame  = crc32c u32 LE | word u32 LE | body[len]      word = kind << 28 | len
//!          (the CRC covers the word and the body)
//! BATCH  = first_seq u64 | count u32 | log_us i64 | prev_seq u64     one per commit
//! TOPIC  = id u16 | topic text                                       dictionary, per segment
//! HSET   = id u32 | header entries                                   dictionary, per segment
//! RECORD = key16 u16 | topic_id varint | header_len varint | stored headers | payload
//! ```
//!
//! A commit is one BATCH frame followed by its `count` RECORD frames (TOPIC frames may come
//! between them, before the record that first uses the topic). Record `i` of a batch has
//! sequence `first_seq + i`; `prev_seq` is the last sequence of the previous batch in the
//! same domain (0 for none), so a batch that vanished is seen as a broken chain.

use bytes::Bytes;
use std::sync::Arc;

/// Magic of a segment file's header.
pub(crate) const SEG_MAGIC: &[u8; 8] = b"AMPYSEG1";
/// Length of the segment file header (magic + first sequence).
pub(crate) const SEG_HEADER: usize = 16;
/// Bytes of a frame's CRC and length word.
pub(crate) const FRAME_HEAD: usize = 8;
/// Largest frame body (the length field has 28 bits).
pub(crate) const MAX_BODY: usize = (1 << 28) - 1;

pub(crate) const KIND_BATCH: u32 = 1;
pub(crate) const KIND_TOPIC: u32 = 2;
pub(crate) const KIND_RECORD: u32 = 3;
/// Consumer-group journal frames (never in a segment).
pub(crate) const KIND_LEASE: u32 = 4;
pub(crate) const KIND_ACK: u32 = 5;
pub(crate) const KIND_NACK: u32 = 6;
pub(crate) const KIND_DELIVERED: u32 = 7;
pub(crate) const KIND_SNAPSHOT: u32 = 8;
/// A list of purged sequences (`log/<domain>/purged`).
pub(crate) const KIND_PURGE: u32 = 9;
/// A header set of a segment: id u32 LE, then the entries' bytes.
pub(crate) const KIND_HSET: u32 = 10;

/// Length of a BATCH body.
pub(crate) const BATCH_BODY: usize = 28;

/// CRC32C (Castagnoli), hardware-accelerated where the CPU has it.
pub(crate) fn crc(parts: &[&[u8]]) -> u32 {
    let mut c = 0u32;
    for p in parts {
        c = crc32c::crc32c_append(c, p);
    }
    c
}

/// Appends one frame of `kind` whose body is the concatenation of `body`.
pub(crate) fn put_frame(out: &mut Vec<u8>, kind: u32, body: &[&[u8]]) {
    let len: usize = body.iter().map(|b| b.len()).sum();
    debug_assert!(len <= MAX_BODY);
    let word = ((kind << 28) | len as u32).to_le_bytes();
    let mut c = crc32c::crc32c_append(0, &word);
    for b in body {
        c = crc32c::crc32c_append(c, b);
    }
    out.extend_from_slice(&c.to_le_bytes());
    out.extend_from_slice(&word);
    for b in body {
        out.extend_from_slice(b);
    }
}

/// The file header of a segment whose first sequence is `first`.
pub(crate) fn seg_header(first: u64) -> [u8; SEG_HEADER] {
    let mut h = [0u8; SEG_HEADER];
    h[..8].copy_from_slice(SEG_MAGIC);
    h[8..].copy_from_slice(&first.to_le_bytes());
    h
}

/// Checks a segment file header; returns the first sequence it names.
pub(crate) fn check_seg_header(buf: &[u8]) -> Option<u64> {
    if buf.len() < SEG_HEADER || &buf[..8] != SEG_MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(buf[8..16].try_into().ok()?))
}

/// The BATCH body.
pub(crate) fn batch_body(
    first_seq: u64,
    count: u32,
    log_us: i64,
    prev_seq: u64,
) -> [u8; BATCH_BODY] {
    let mut b = [0u8; BATCH_BODY];
    b[..8].copy_from_slice(&first_seq.to_le_bytes());
    b[8..12].copy_from_slice(&count.to_le_bytes());
    b[12..20].copy_from_slice(&log_us.to_le_bytes());
    b[20..28].copy_from_slice(&prev_seq.to_le_bytes());
    b
}

/// Appends `v` as LEB128.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 value at `*at`, advancing it; `None` when truncated or over 64 bits.
pub(crate) fn get_varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The hash of a partition key (FNV-1a folded to 16 bits, as stored in each record):
/// consumer groups assign a record to partition `key_hash % partitions` without decoding its
/// headers.
pub(crate) fn key_hash(key: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h ^ (h >> 16)) & 0xFFFF
}

/// One frame as found in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A whole frame with a good checksum: kind, body range, offset after it.
    Ok {
        kind: u32,
        body: (usize, usize),
        next: usize,
    },
    /// The buffer ends inside the frame.
    Incomplete,
    /// The checksum does not match, or the kind is unknown.
    Bad(&'static str),
}

/// The frame at `at` in `buf`.
pub(crate) fn frame_at(buf: &[u8], at: usize) -> Frame {
    let Some(head) = buf.get(at..at + FRAME_HEAD) else {
        return Frame::Incomplete;
    };
    let stored = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let word = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let kind = word >> 28;
    let len = (word & 0x0FFF_FFFF) as usize;
    if !(KIND_BATCH..=KIND_HSET).contains(&kind) {
        return Frame::Bad("unknown frame kind");
    }
    let start = at + FRAME_HEAD;
    let Some(body) = buf.get(start..start + len) else {
        return Frame::Incomplete;
    };
    if crc32c::crc32c_append(crc32c::crc32c(&head[4..8]), body) != stored {
        return Frame::Bad("checksum mismatch");
    }
    Frame::Ok {
        kind,
        body: (start, start + len),
        next: start + len,
    }
}

/// A decoded BATCH body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Batch {
    pub first_seq: u64,
    pub count: u32,
    pub log_us: i64,
    pub prev_seq: u64,
}

pub(crate) fn parse_batch(body: &[u8]) -> Option<Batch> {
    if body.len() != BATCH_BODY {
        return None;
    }
    Some(Batch {
        first_seq: u64::from_le_bytes(body[..8].try_into().ok()?),
        count: u32::from_le_bytes(body[8..12].try_into().ok()?),
        log_us: i64::from_le_bytes(body[12..20].try_into().ok()?),
        prev_seq: u64::from_le_bytes(body[20..28].try_into().ok()?),
    })
}

/// In stored headers: the entries that repeat from message to message, stored once per
/// segment as a header set (a HSET frame) — this tag, then the set's id (varint). Only the
/// storage uses it; readers expand it before the headers are decoded.
pub(crate) const TAG_SET: u8 = 0x51;
/// In stored headers: `produced_at` as the difference to the batch's log time (zigzag
/// varint, µs) instead of 8 bytes.
pub(crate) const TAG_TIME_DELTA: u8 = 0x52;

/// Header tags (slot numbers of the compact encoding) whose values repeat from message to
/// message: content_encoding, content_type, dlq_consumer, original_topic, producer, run_id,
/// schema_fqdn, schema_hash, schema_version, source.
const SET_TAGS: [u8; 10] = [3, 4, 7, 10, 14, 18, 19, 20, 21, 22];
/// The compact encoding's `produced_at` as 8 bytes.
const TAG_TIME_BIN: u8 = 0x41;

/// Walks the entries of compact headers `h`, calling `f(tag, entry bytes, text value)` for
/// each (entry bytes include the tag). Returns `None` when `h` is malformed.
fn walk(h: &[u8], mut f: impl FnMut(u8, &[u8], Option<&[u8]>)) -> Option<()> {
    let mut at = 1;
    while at < h.len() {
        let tag = h[at];
        let start = at;
        at += 1;
        let fixed = match tag {
            0x40 => Some(16),
            TAG_TIME_BIN => Some(8),
            0x42 => Some(25),
            0x43 | 0x44 => Some(0),
            _ => None,
        };
        match (tag, fixed) {
            (_, Some(n)) => {
                at = at.checked_add(n).filter(|e| *e <= h.len())?;
                f(tag, &h[start..at], None);
            }
            (0..=25, None) => {
                let len = get_varint(h, &mut at)? as usize;
                let vstart = at;
                at = at.checked_add(len).filter(|e| *e <= h.len())?;
                f(tag, &h[start..at], Some(&h[vstart..at]));
            }
            (0x7F, None) | (TAG_SET, None) | (TAG_TIME_DELTA, None) => {
                let n = if tag == 0x7F { 2 } else { 0 };
                if tag != 0x7F {
                    get_varint(h, &mut at)?;
                }
                for _ in 0..n {
                    let len = get_varint(h, &mut at)? as usize;
                    at = at.checked_add(len).filter(|e| *e <= h.len())?;
                }
                f(tag, &h[start..at], None);
            }
            _ => return None,
        }
    }
    Some(())
}

/// Writes compact headers `h` as stored: the entries that repeat (see `SET_TAGS`, and the
/// trace/span "same as traceparent" markers) become one header-set reference when `set_id`
/// gives an id for their bytes, and `produced_at` a difference to `log_us`. Malformed or
/// empty input is copied unchanged.
pub(crate) fn dict_encode(
    h: &[u8],
    log_us: i64,
    out: &mut Vec<u8>,
    set: &mut Vec<u8>,
    mut set_id: impl FnMut(&[u8]) -> Option<u32>,
) {
    let start = out.len();
    let Some(&first) = h.first() else { return };
    out.push(first);
    set.clear();
    let ok = walk(h, |tag, entry, value| {
        if tag == 0x43 || tag == 0x44 || (value.is_some() && SET_TAGS.contains(&tag)) {
            set.extend_from_slice(entry);
        } else if tag == TAG_TIME_BIN {
            let t = i64::from_le_bytes(entry[1..9].try_into().unwrap_or([0; 8]));
            let d = log_us.wrapping_sub(t);
            out.push(TAG_TIME_DELTA);
            put_varint(out, ((d << 1) ^ (d >> 63)) as u64);
        } else {
            out.extend_from_slice(entry);
        }
    });
    if ok.is_none() {
        out.truncate(start);
        out.extend_from_slice(h);
        return;
    }
    if !set.is_empty() {
        match set_id(set) {
            Some(id) => {
                out.push(TAG_SET);
                put_varint(out, u64::from(id));
            }
            None => out.extend_from_slice(set),
        }
    }
}

/// True when stored headers need [`dict_decode`] (they hold a set reference or a time
/// difference).
pub(crate) fn needs_decode(h: &[u8]) -> bool {
    h.iter().any(|b| *b == TAG_SET || *b == TAG_TIME_DELTA)
}

/// Gives back the compact headers of stored headers `h` (see [`dict_encode`]).
pub(crate) fn dict_decode(
    h: &[u8],
    log_us: i64,
    sets: &[Option<Bytes>],
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let Some(&first) = h.first() else {
        return Ok(());
    };
    out.push(first);
    let mut bad = None;
    walk(h, |tag, entry, _| match tag {
        TAG_SET => {
            let mut at = 1;
            let id = get_varint(entry, &mut at).unwrap_or(u64::MAX);
            match usize::try_from(id).ok().and_then(|i| sets.get(i)) {
                Some(Some(v)) => out.extend_from_slice(v),
                _ => bad = Some("stored headers name an unknown header set"),
            }
        }
        TAG_TIME_DELTA => {
            let mut at = 1;
            let z = get_varint(entry, &mut at).unwrap_or(0);
            let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
            out.push(TAG_TIME_BIN);
            out.extend_from_slice(&log_us.wrapping_sub(d).to_le_bytes());
        }
        _ => out.extend_from_slice(entry),
    })
    .ok_or("stored headers malformed")?;
    bad.map_or(Ok(()), Err)
}

/// One stored message as read: its sequence, log time, partition key hash, topic, and the
/// compact headers and payload as slices of the read buffer.
#[derive(Debug, Clone)]
pub(crate) struct Rec {
    pub seq: u64,
    pub log_us: i64,
    pub key_hash: u32,
    pub topic: Arc<str>,
    pub headers: Bytes,
    pub payload: Bytes,
    /// Bytes the record takes on disk (frame included).
    pub stored: u32,
}

/// Damage found while reading: what and where (byte offset in the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    pub offset: u64,
    pub what: String,
}

/// Reads frames of one segment in order, checking the batch structure: the state carried from
/// one buffer to the next (dictionary, open batch, last sequence).
#[derive(Debug, Clone, Default)]
pub(crate) struct SegState {
    /// Topic dictionary of the segment, by id.
    pub dict: Vec<Option<Arc<str>>>,
    /// Header sets of the segment, by id.
    pub sets: Vec<Option<Bytes>>,
    /// The batch being read: (batch, records of it read so far).
    pub open: Option<(Batch, u32)>,
    /// Last sequence of a complete batch (the domain's chain), 0 before any.
    pub last_seq: u64,
    /// Sequence of the last record read (inside an open batch or not).
    pub last_rec: u64,
    /// Where expanded headers are written (see `step`), and a scratch buffer.
    pub(crate) arena: bytes::BytesMut,
    pub(crate) scratch: Vec<u8>,
}

/// Size of the blocks expanded headers are written into.
const ARENA_BLOCK: usize = 64 * 1024;

/// What one step of [`SegState::step`] found.
pub(crate) enum Step {
    /// A record (the batch it belongs to may still be open).
    Rec(Rec),
    /// A non-record frame was consumed.
    Meta,
    /// The buffer ends inside the next frame (a torn tail, or bytes not yet read).
    Incomplete,
    Damage(&'static str),
}

impl SegState {
    /// True when no batch is half read.
    pub fn at_boundary(&self) -> bool {
        self.open.is_none()
    }

    /// Decodes the frame at `at` of `buf` (a buffer holding file bytes from `base`). `shared`
    /// is `buf` as `Bytes` (records are slices of it). On success returns the step and the
    /// offset after the frame.
    pub fn step(&mut self, buf: &[u8], shared: &Bytes, at: usize) -> (Step, usize) {
        match frame_at(buf, at) {
            Frame::Incomplete => (Step::Incomplete, at),
            Frame::Bad(why) => (Step::Damage(why), at),
            Frame::Ok { kind, body, next } => {
                let b = &buf[body.0..body.1];
                match kind {
                    KIND_BATCH => {
                        if self.open.is_some() {
                            return (Step::Damage("batch header inside an unfinished batch"), at);
                        }
                        let Some(batch) = parse_batch(b) else {
                            return (Step::Damage("malformed batch header"), at);
                        };
                        if batch.count == 0 || batch.first_seq == 0 {
                            return (Step::Damage("empty batch or sequence 0"), at);
                        }
                        if self.last_seq != 0 && batch.prev_seq != self.last_seq {
                            return (
                                Step::Damage("sequence chain broken (a batch is missing)"),
                                at,
                            );
                        }
                        if batch.first_seq <= batch.prev_seq {
                            return (Step::Damage("sequence goes backwards"), at);
                        }
                        self.open = Some((batch, 0));
                        (Step::Meta, next)
                    }
                    KIND_TOPIC => {
                        if b.len() < 3 {
                            return (Step::Damage("malformed topic entry"), at);
                        }
                        let id = u16::from_le_bytes([b[0], b[1]]) as usize;
                        let Ok(text) = std::str::from_utf8(&b[2..]) else {
                            return (Step::Damage("topic entry is not UTF-8"), at);
                        };
                        if self.dict.len() <= id {
                            self.dict.resize(id + 1, None);
                        }
                        self.dict[id] = Some(Arc::from(text));
                        (Step::Meta, next)
                    }
                    KIND_HSET => {
                        if b.len() < 4 {
                            return (Step::Damage("malformed header set"), at);
                        }
                        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                        if id > self.sets.len() + 1_000_000 {
                            return (Step::Damage("header set id out of range"), at);
                        }
                        if self.sets.len() <= id {
                            self.sets.resize(id + 1, None);
                        }
                        self.sets[id] = Some(shared.slice(body.0 + 4..body.1));
                        (Step::Meta, next)
                    }
                    KIND_RECORD => {
                        let Some((batch, done)) = self.open.as_mut() else {
                            return (Step::Damage("record outside a batch"), at);
                        };
                        if b.len() < 4 {
                            return (Step::Damage("record too short"), at);
                        }
                        let key_hash = u32::from(u16::from_le_bytes([b[0], b[1]]));
                        let mut p = 2;
                        let Some(tid) = get_varint(b, &mut p) else {
                            return (Step::Damage("record topic id malformed"), at);
                        };
                        let Some(Some(topic)) =
                            usize::try_from(tid).ok().and_then(|t| self.dict.get(t))
                        else {
                            return (Step::Damage("record names an unknown topic id"), at);
                        };
                        let Some(hlen) = get_varint(b, &mut p) else {
                            return (Step::Damage("record header length malformed"), at);
                        };
                        let hstart = body.0 + p;
                        let Some(hend) = hstart.checked_add(hlen as usize).filter(|e| *e <= body.1)
                        else {
                            return (Step::Damage("record header length past its end"), at);
                        };
                        let seq = batch.first_seq + u64::from(*done);
                        let raw = &buf[hstart..hend];
                        let headers = if needs_decode(raw) {
                            // Expanded headers go into a shared block (one allocation for many
                            // records, not one each).
                            self.scratch.clear();
                            if let Err(why) =
                                dict_decode(raw, batch.log_us, &self.sets, &mut self.scratch)
                            {
                                return (Step::Damage(why), at);
                            }
                            if self.arena.capacity() - self.arena.len() < self.scratch.len() {
                                self.arena = bytes::BytesMut::with_capacity(
                                    ARENA_BLOCK.max(self.scratch.len()),
                                );
                            }
                            self.arena.extend_from_slice(&self.scratch);
                            self.arena.split().freeze()
                        } else {
                            shared.slice(hstart..hend)
                        };
                        let rec = Rec {
                            seq,
                            log_us: batch.log_us,
                            key_hash,
                            topic: topic.clone(),
                            headers,
                            payload: shared.slice(hend..body.1),
                            stored: (next - at) as u32,
                        };
                        *done += 1;
                        self.last_rec = seq;
                        if *done == batch.count {
                            self.last_seq = batch.first_seq + u64::from(batch.count) - 1;
                            self.open = None;
                        }
                        (Step::Rec(rec), next)
                    }
                    _ => (Step::Damage("a journal frame inside a segment"), at),
                }
            }
        }
    }
}

/// Looks for a valid BATCH frame after `from` whose sequence continues `last_seq` (used to
/// tell a torn tail from damage in the middle: if one exists, bytes were damaged).
pub(crate) fn later_batch(buf: &[u8], from: usize, last_seq: u64) -> Option<usize> {
    let mut at = from + 1;
    while at + FRAME_HEAD + BATCH_BODY <= buf.len() {
        if let Frame::Ok {
            kind: KIND_BATCH,
            body,
            ..
        } = frame_at(buf, at)
            && let Some(b) = parse_batch(&buf[body.0..body.1])
            && b.first_seq > last_seq
            && (last_seq == 0 || b.prev_seq >= last_seq)
        {
            return Some(at);
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(out: &mut Vec<u8>, key: &[u8], tid: u16, headers: &[u8], payload: &[u8]) {
        let mut len = Vec::new();
        put_varint(&mut len, u64::from(tid));
        put_varint(&mut len, headers.len() as u64);
        put_frame(
            out,
            KIND_RECORD,
            &[
                &(key_hash(key) as u16).to_le_bytes(),
                &len,
                headers,
                payload,
            ],
        );
    }

    fn sample() -> Vec<u8> {
        let mut buf = Vec::new();
        put_frame(&mut buf, KIND_BATCH, &[&batch_body(1, 2, 10, 0)]);
        put_frame(
            &mut buf,
            KIND_TOPIC,
            &[&0u16.to_le_bytes(), b"ampy.dev.orders.v1.x"],
        );
        record(&mut buf, b"k", 0, b"hh", b"payload-1");
        record(&mut buf, b"k", 0, b"", b"payload-2");
        put_frame(&mut buf, KIND_BATCH, &[&batch_body(3, 1, 11, 2)]);
        record(&mut buf, b"j", 0, b"h", b"p3");
        buf
    }

    /// Reads `buf` as a committed region (`whole`: a frame running past its end is damage)
    /// or as a file that may have a torn tail.
    fn read(buf: &[u8], whole: bool) -> (Vec<Rec>, Option<(usize, &'static str)>, usize) {
        let shared = Bytes::copy_from_slice(buf);
        let mut st = SegState::default();
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            let (step, next) = st.step(buf, &shared, at);
            match step {
                Step::Rec(r) => out.push(r),
                Step::Meta => {}
                Step::Incomplete if whole && (at < buf.len() || !st.at_boundary()) => {
                    return (out, Some((at, "frame runs past the committed end")), at);
                }
                Step::Incomplete => return (out, None, at),
                Step::Damage(w) => return (out, Some((at, w)), at),
            }
            at = next;
        }
    }

    #[test]
    fn frames_round_trip_with_sequences_and_slices() {
        let buf = sample();
        let (recs, damage, end) = read(&buf, true);
        assert_eq!(damage, None);
        assert_eq!(end, buf.len());
        let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(&recs[0].payload[..], b"payload-1");
        assert_eq!(&recs[0].headers[..], b"hh");
        assert_eq!(&recs[2].payload[..], b"p3");
        assert_eq!(recs[2].log_us, 11);
        assert_eq!(&*recs[1].topic, "ampy.dev.orders.v1.x");
        assert_eq!(recs[0].key_hash, key_hash(b"k"));
    }

    #[test]
    fn every_flipped_byte_is_caught_and_every_cut_is_incomplete() {
        let buf = sample();
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x5A;
            let (recs, damage, _) = read(&b, true);
            assert!(
                damage.is_some(),
                "flip at {i} not caught ({} records)",
                recs.len()
            );
        }
        for cut in 0..buf.len() {
            let (_, damage, _) = read(&buf[..cut], false);
            assert_eq!(damage, None, "cut at {cut}");
        }
    }

    #[test]
    fn a_missing_batch_breaks_the_chain() {
        let mut buf = Vec::new();
        put_frame(&mut buf, KIND_BATCH, &[&batch_body(1, 1, 10, 0)]);
        put_frame(&mut buf, KIND_TOPIC, &[&0u16.to_le_bytes(), b"t"]);
        record(&mut buf, b"k", 0, b"", b"a");
        put_frame(&mut buf, KIND_BATCH, &[&batch_body(5, 1, 10, 4)]);
        record(&mut buf, b"k", 0, b"", b"b");
        let (recs, damage, _) = read(&buf, true);
        assert_eq!(recs.len(), 1);
        assert_eq!(
            damage.unwrap().1,
            "sequence chain broken (a batch is missing)"
        );
    }

    #[test]
    fn repeating_header_values_are_stored_once_and_read_back_exactly() {
        let h = crate::Headers::for_publish(
            "ampy.bars.v1.BarBatch",
            "bars@host-1",
            "bars",
            "XNAS.AAPL",
        )
        .with("x-desk", "rates");
        let mut compact = Vec::new();
        h.encode_compact(&mut compact);
        let log_us = h.produced_at_micros().unwrap() + 1234;
        let mut sets: Vec<Vec<u8>> = Vec::new();
        let mut stored = Vec::new();
        let mut scratch = Vec::new();
        let mut id_of = |v: &[u8]| {
            let id = sets.iter().position(|d| d == v).unwrap_or_else(|| {
                sets.push(v.to_vec());
                sets.len() - 1
            });
            Some(id as u32)
        };
        dict_encode(&compact, log_us, &mut stored, &mut scratch, &mut id_of);
        let mut again = Vec::new();
        dict_encode(&compact, log_us, &mut again, &mut scratch, &mut id_of);
        assert_eq!(sets.len(), 1, "the same values make the same set");
        assert_eq!(again, stored);
        assert!(
            stored.len() + 40 < compact.len(),
            "{} vs {}",
            stored.len(),
            compact.len()
        );
        let table: Vec<Option<Bytes>> = sets.iter().map(|d| Some(Bytes::from(d.clone()))).collect();
        assert!(needs_decode(&stored));
        let mut back = Vec::new();
        dict_decode(&stored, log_us, &table, &mut back).unwrap();
        assert_eq!(
            crate::Headers::decode_compact(&Bytes::from(back)).unwrap(),
            h
        );
        // A set the dictionary does not have is damage, not a panic.
        assert!(dict_decode(&stored, log_us, &[], &mut Vec::new()).is_err());
        // Malformed input is stored unchanged.
        let mut out = Vec::new();
        dict_encode(&[0xA1, 0x13, 0x50], 0, &mut out, &mut scratch, |_| Some(0));
        assert_eq!(out, [0xA1, 0x13, 0x50]);
    }

    #[test]
    fn varints_round_trip_and_reject_truncation() {
        for v in [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut at = 0;
            assert_eq!(get_varint(&b, &mut at), Some(v));
            assert_eq!(at, b.len());
            let mut at = 0;
            assert_eq!(get_varint(&b[..b.len() - 1], &mut at), None);
        }
    }
}
