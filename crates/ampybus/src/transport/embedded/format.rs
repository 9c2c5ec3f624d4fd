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

/// In stored headers: a value taken from the segment's dictionary — the original tag, then
/// the entry's id (u16 LE). Only the storage uses this tag; readers expand it before the
/// headers are decoded (`Headers::decode_compact` never sees it).
pub(crate) const TAG_DICT: u8 = 0x50;

/// Header tags (slot numbers of the compact encoding) whose values repeat from message to
/// message and are stored once per segment: content_encoding, content_type, dlq_consumer,
/// original_topic, producer, run_id, schema_fqdn, schema_hash, schema_version, source.
const DICT_TAGS: [u8; 10] = [3, 4, 7, 10, 14, 18, 19, 20, 21, 22];

/// Walks the entries of compact headers `h`, calling `f(tag, entry bytes)` for each
/// (entry bytes include the tag). Returns `None` when `h` is malformed.
fn walk(h: &[u8], mut f: impl FnMut(u8, &[u8], Option<&[u8]>)) -> Option<()> {
    if h.is_empty() {
        return Some(());
    }
    let mut at = 1;
    while at < h.len() {
        let tag = h[at];
        let start = at;
        at += 1;
        let fixed = match tag {
            0x40 => Some(16),
            0x41 => Some(8),
            0x42 => Some(25),
            0x43 | 0x44 => Some(0),
            TAG_DICT => Some(3),
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
            (0x7F, None) => {
                for _ in 0..2 {
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

/// Writes `h` (compact headers) to `out`, replacing repeating values by dictionary
/// references where `id_of` gives an id. Malformed input is copied unchanged.
pub(crate) fn dict_encode(h: &[u8], out: &mut Vec<u8>, mut id_of: impl FnMut(&str) -> Option<u16>) {
    let start = out.len();
    if let Some(&first) = h.first() {
        out.push(first);
    }
    let ok = walk(h, |tag, entry, value| {
        if let Some(v) = value
            && v.len() >= 3
            && DICT_TAGS.contains(&tag)
            && let Ok(text) = std::str::from_utf8(v)
            && let Some(id) = id_of(text)
        {
            out.push(TAG_DICT);
            out.push(tag);
            out.extend_from_slice(&id.to_le_bytes());
            return;
        }
        out.extend_from_slice(entry);
    });
    if ok.is_none() {
        out.truncate(start);
        out.extend_from_slice(h);
    }
}

/// Expands the dictionary references of stored headers `h` (see [`dict_encode`]).
pub(crate) fn dict_decode(
    h: &[u8],
    dict: &[Option<Arc<str>>],
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    if let Some(&first) = h.first() {
        out.push(first);
    }
    let mut bad = None;
    walk(h, |tag, entry, _| {
        if tag == TAG_DICT {
            let id = u16::from_le_bytes([entry[2], entry[3]]) as usize;
            match dict.get(id) {
                Some(Some(v)) => {
                    out.push(entry[1]);
                    put_varint(out, v.len() as u64);
                    out.extend_from_slice(v.as_bytes());
                }
                _ => bad = Some("stored headers name an unknown dictionary entry"),
            }
        } else {
            out.extend_from_slice(entry);
        }
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
                        let raw = &buf[hstart..hend];
                        let headers = if raw.contains(&TAG_DICT) {
                            let mut out = Vec::with_capacity(raw.len() + 128);
                            if let Err(why) = dict_decode(raw, &self.dict, &mut out) {
                                return (Step::Damage(why), at);
                            }
                            Bytes::from(out)
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
        let mut dict: Vec<String> = Vec::new();
        let mut stored = Vec::new();
        dict_encode(&compact, &mut stored, |v| {
            let id = dict.iter().position(|d| d == v).unwrap_or_else(|| {
                dict.push(v.to_owned());
                dict.len() - 1
            });
            Some(id as u16)
        });
        assert!(
            stored.len() + 20 < compact.len(),
            "{} vs {}",
            stored.len(),
            compact.len()
        );
        assert!(
            dict.contains(&"ampy.bars.v1.BarBatch".to_owned()),
            "{dict:?}"
        );
        assert!(
            !dict.contains(&"XNAS.AAPL".to_owned()),
            "the partition key stays inline"
        );
        let table: Vec<Option<Arc<str>>> =
            dict.iter().map(|d| Some(Arc::from(d.as_str()))).collect();
        let mut back = Vec::new();
        dict_decode(&stored, &table, &mut back).unwrap();
        assert_eq!(back, compact);
        assert_eq!(
            crate::Headers::decode_compact(&Bytes::from(back)).unwrap(),
            h
        );
        // An id the dictionary does not have is damage, not a panic.
        assert!(dict_decode(&stored, &table[..1], &mut Vec::new()).is_err());
        // Malformed input is stored unchanged.
        let mut out = Vec::new();
        dict_encode(&[0xA1, 0x13, 0x50], &mut out, |_| Some(0));
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
