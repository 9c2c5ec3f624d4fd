//! Candidate 3: a segmented append-only file with a sparse index.
//!
//! Segment `{first_seq:020}.seg`, rolled when the next commit would pass `roll` bytes. A commit
//! is one `write` of a batch-header frame followed by one frame per record, then one
//! `fdatasync`. Every frame:
//!
//! ```text
//! crc32c u32 | len u32 | seq_lo u32 | body (len & 0x7fff_ffff bytes)
//! ```
//!
//! The CRC32C covers `len`, `seq_lo` and the body. `len`'s top bit marks a batch header whose
//! body is `first_seq u64 | count u32 | log_us i64`; a record's `seq_lo` is the low 32 bits of
//! its sequence, so continuity is checked per record and the full sequence per batch.
//! Per message: 12 bytes of framing + 32 bytes per commit.
//!
//! The sparse index `{first_seq:020}.idx` holds `first_seq u64 | offset u64 | log_us i64` for
//! the first batch of a segment and then for a batch at least every `INDEX_EVERY` bytes. It is
//! written but never synced: recovery rebuilds it from the segment.
//!
//! Recovery (`open`): the last segment is scanned from its start; the file is truncated after
//! the last batch whose header and every record verify. Earlier segments were synced before
//! the roll and are not read.

use crate::store::{Candidate, Store, err, now_us};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub struct FileLog {
    pub roll: u64,
}

const BATCH: u32 = 0x8000_0000;
const FRAME: usize = 12;
const BATCH_BODY: usize = 20;
const INDEX_EVERY: u64 = 4096;

struct Open {
    dir: PathBuf,
    roll: u64,
    seg: File,
    idx: File,
    seg_len: u64,
    last_indexed: Option<u64>,
    next: u64,
    buf: Vec<u8>,
}

fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) == Some("seg") {
            let first: u64 = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| err(format!("{}: not a segment name", p.display())))?;
            v.push((first, p));
        }
    }
    v.sort();
    Ok(v)
}

fn seg_paths(dir: &Path, first: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{first:020}.seg")),
        dir.join(format!("{first:020}.idx")),
    )
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What a scan of one segment found.
struct SegScan {
    /// Records that verified.
    records: u64,
    body_bytes: u64,
    /// Offset just after the last complete, verified batch.
    good_end: u64,
    /// The sequence the next batch must start at.
    next_seq: u64,
    /// Why the scan stopped before the end of the data, with the offset.
    stopped: Option<(u64, String)>,
}

/// Verifies frames from the start of `buf`, which holds segment starting at `first`.
fn scan_segment(buf: &[u8], first: u64) -> SegScan {
    let mut s = SegScan {
        records: 0,
        body_bytes: 0,
        good_end: 0,
        next_seq: first,
        stopped: None,
    };
    let mut off = 0usize;
    let frame = |off: usize| -> Result<(u32, u32, &[u8]), String> {
        if buf.len() - off < FRAME {
            return Err("truncated frame header".into());
        }
        let crc = u32::from_le_bytes(buf[off..off + 4].try_into().unwrap());
        let len_word = u32::from_le_bytes(buf[off + 4..off + 8].try_into().unwrap());
        let seq_lo = u32::from_le_bytes(buf[off + 8..off + 12].try_into().unwrap());
        let len = (len_word & !BATCH) as usize;
        if buf.len() - off - FRAME < len {
            return Err(format!("frame of {len} bytes runs past the end"));
        }
        if crc32c::crc32c(&buf[off + 4..off + FRAME + len]) != crc {
            return Err("checksum mismatch".into());
        }
        Ok((len_word, seq_lo, &buf[off + FRAME..off + FRAME + len]))
    };
    'batches: while off < buf.len() {
        let batch_at = off;
        let (len_word, _, body) = match frame(off) {
            Ok(f) => f,
            Err(e) => {
                s.stopped = Some((off as u64, e));
                break;
            }
        };
        if len_word & BATCH == 0 || body.len() != BATCH_BODY {
            s.stopped = Some((off as u64, "expected a batch header".into()));
            break;
        }
        let first_seq = u64::from_le_bytes(body[..8].try_into().unwrap());
        let count = u32::from_le_bytes(body[8..12].try_into().unwrap());
        if first_seq != s.next_seq {
            s.stopped = Some((
                off as u64,
                format!("batch starts at seq {first_seq}, expected {}", s.next_seq),
            ));
            break;
        }
        off += FRAME + BATCH_BODY;
        let (mut recs, mut bytes) = (0u64, 0u64);
        for i in 0..count as u64 {
            let (len_word, seq_lo, body) = match frame(off) {
                Ok(f) => f,
                Err(e) => {
                    s.stopped = Some((off as u64, format!("batch at {batch_at}: {e}")));
                    break 'batches;
                }
            };
            if len_word & BATCH != 0 || seq_lo != (first_seq + i) as u32 {
                s.stopped = Some((off as u64, format!("batch at {batch_at}: sequence break")));
                break 'batches;
            }
            off += FRAME + body.len();
            recs += 1;
            bytes += body.len() as u64;
        }
        s.records += recs;
        s.body_bytes += bytes;
        s.next_seq = first_seq + count as u64;
        s.good_end = off as u64;
    }
    s
}

fn read_all(path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    File::open(path)?.read_to_end(buf)?;
    Ok(())
}

impl Candidate for FileLog {
    fn name(&self) -> &'static str {
        "file"
    }

    fn open(&self, dir: &Path) -> io::Result<Box<dyn Store>> {
        let segs = segments(dir)?;
        let (first, seg_len, next) = match segs.last() {
            None => (1, 0, 1),
            Some((first, path)) => {
                let mut buf = Vec::new();
                read_all(path, &mut buf)?;
                let s = scan_segment(&buf, *first);
                if s.good_end < buf.len() as u64 {
                    // A torn tail (the last commit was not acknowledged): cut it off. Damage
                    // followed by valid data would be corruption, which a real implementation
                    // reports (file and offset) instead of truncating.
                    let f = OpenOptions::new().write(true).open(path)?;
                    f.set_len(s.good_end)?;
                    f.sync_all()?;
                }
                (*first, s.good_end, s.next_seq)
            }
        };
        let (sp, ip) = seg_paths(dir, first);
        let seg = OpenOptions::new().create(true).append(true).open(&sp)?;
        let idx = OpenOptions::new().create(true).append(true).open(&ip)?;
        if segs.is_empty() {
            sync_dir(dir)?;
        }
        Ok(Box::new(Open {
            dir: dir.to_path_buf(),
            roll: self.roll,
            seg,
            idx,
            seg_len,
            last_indexed: if seg_len == 0 { None } else { Some(seg_len) },
            next,
            buf: Vec::with_capacity(1 << 20),
        }))
    }

    fn scan(&self, dir: &Path) -> io::Result<(u64, u64)> {
        let mut buf = Vec::new();
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut expect = 1u64;
        for (first, path) in segments(dir)? {
            if first != expect {
                return Err(err(format!(
                    "{}: segment starts at seq {first}, expected {expect}",
                    path.display()
                )));
            }
            read_all(&path, &mut buf)?;
            let s = scan_segment(&buf, first);
            if let Some((off, why)) = s.stopped {
                return Err(err(format!("{} offset {off}: {why}", path.display())));
            }
            n += s.records;
            bytes += s.body_bytes;
            expect = s.next_seq;
        }
        Ok((n, bytes))
    }
}

impl Open {
    fn roll(&mut self) -> io::Result<()> {
        let (sp, ip) = seg_paths(&self.dir, self.next);
        self.seg = OpenOptions::new().create(true).append(true).open(&sp)?;
        self.idx = OpenOptions::new().create(true).append(true).open(&ip)?;
        // The new file's directory entry must be durable before a commit in it is acked.
        sync_dir(&self.dir)?;
        self.seg_len = 0;
        self.last_indexed = None;
        Ok(())
    }

    fn put_frame(buf: &mut Vec<u8>, len_word: u32, seq_lo: u32, body: &[&[u8]]) {
        let at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&len_word.to_le_bytes());
        buf.extend_from_slice(&seq_lo.to_le_bytes());
        for b in body {
            buf.extend_from_slice(b);
        }
        let crc = crc32c::crc32c(&buf[at + 4..]);
        buf[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

impl Store for Open {
    fn append(&mut self, rows: &[&[u8]]) -> io::Result<()> {
        let total: u64 = (FRAME + BATCH_BODY) as u64
            + rows.iter().map(|r| (FRAME + r.len()) as u64).sum::<u64>();
        if self.seg_len > 0 && self.seg_len + total > self.roll {
            self.roll()?;
        }
        let log_us = now_us();
        let first = self.next;
        self.buf.clear();
        Self::put_frame(
            &mut self.buf,
            BATCH | BATCH_BODY as u32,
            first as u32,
            &[
                &first.to_le_bytes(),
                &(rows.len() as u32).to_le_bytes(),
                &log_us.to_le_bytes(),
            ],
        );
        for (i, r) in rows.iter().enumerate() {
            Self::put_frame(&mut self.buf, r.len() as u32, (first + i as u64) as u32, &[r]);
        }
        self.seg.write_all(&self.buf)?;
        self.seg.sync_data()?;
        if self
            .last_indexed
            .is_none_or(|at| self.seg_len - at >= INDEX_EVERY)
        {
            let mut e = [0u8; 24];
            e[..8].copy_from_slice(&first.to_le_bytes());
            e[8..16].copy_from_slice(&self.seg_len.to_le_bytes());
            e[16..].copy_from_slice(&log_us.to_le_bytes());
            self.idx.write_all(&e)?;
            self.last_indexed = Some(self.seg_len);
        }
        self.seg_len += self.buf.len() as u64;
        self.next += rows.len() as u64;
        Ok(())
    }

    fn close(self: Box<Self>) -> io::Result<()> {
        self.idx.sync_data()?;
        Ok(())
    }
}
