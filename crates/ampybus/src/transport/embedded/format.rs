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
//! RECORD = key_hash u32 | topic_id u16 | header_len varint | compact headers | payload
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

/// The hash of a partition key stored in each record (FNV-1a, 32 bits): consumer groups
/// assign a record to partition `key_hash % partitions` without decoding its headers.
pub(crate) fn key_hash(key: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
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
    if !(KIND_BATCH..=KIND_PURGE).contains(&kind) {
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
    /// The batch being read: (batch, records of it read so far).
    pub open: Option<(Batch, u32)>,
    /// Last sequence of a complete batch (the domain's chain), 0 before any.
    pub last_seq: u64,
    /// Sequence of the last record read (inside an open batch or not).
    pub last_rec: u64,
}

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
                    KIND_RECORD => {
                        let Some((batch, done)) = self.open.as_mut() else {
                            return (Step::Damage("record outside a batch"), at);
                        };
                        if b.len() < 7 {
                            return (Step::Damage("record too short"), at);
                        }
                        let key_hash = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        let tid = u16::from_le_bytes([b[4], b[5]]) as usize;
                        let Some(Some(topic)) = self.dict.get(tid) else {
                            return (Step::Damage("record names an unknown topic id"), at);
                        };
                        let mut p = 6;
                        let Some(hlen) = get_varint(b, &mut p) else {
                            return (Step::Damage("record header length malformed"), at);
                        };
                        let hstart = body.0 + p;
                        let Some(hend) = hstart.checked_add(hlen as usize).filter(|e| *e <= body.1)
                        else {
                            return (Step::Damage("record header length past its end"), at);
                        };
                        let seq = batch.first_seq + u64::from(*done);
                        let rec = Rec {
                            seq,
                            log_us: batch.log_us,
                            key_hash,
                            topic: topic.clone(),
                            headers: shared.slice(hstart..hend),
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
        put_varint(&mut len, headers.len() as u64);
        put_frame(
            out,
            KIND_RECORD,
            &[
                &key_hash(key).to_le_bytes(),
                &tid.to_le_bytes(),
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
