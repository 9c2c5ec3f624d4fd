//! Replay by time window and by keys, and finding the sequence at a time.

use super::format::{self, FRAME_HEAD, SEG_HEADER};
use super::log::{self, DomainReader};
use super::log::{envelope_of, us_to_time};
use super::{EmbeddedLog, Inner};
use crate::error::Result;
use crate::topic::{Domain, TopicPattern};
use crate::transport::{ReplayByTime, StoredMessage, WindowQuery};
use async_trait::async_trait;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;

/// The domains (indexes) a pattern may match.
pub(crate) fn domains_of(p: &TopicPattern) -> Vec<usize> {
    Domain::ALL
        .iter()
        .enumerate()
        .filter(|(_, d)| p.may_match_domain(d.as_str()))
        .map(|(i, _)| i)
        .collect()
}

/// Log time of the first batch of a segment, if it has one.
fn first_batch_us(path: &std::path::Path) -> Option<i64> {
    let f = std::fs::File::open(path).ok()?;
    let mut b = [0u8; FRAME_HEAD + format::BATCH_BODY];
    f.read_exact_at(&mut b, SEG_HEADER as u64).ok()?;
    match format::frame_at(&b, 0) {
        format::Frame::Ok {
            kind: format::KIND_BATCH,
            body,
            ..
        } => format::parse_batch(&b[body.0..body.1]).map(|x| x.log_us),
        _ => None,
    }
}

/// A reader of domain `d` placed before the first record stored at or after `t_us` (it may
/// still return a few earlier records of the same segment: callers filter on time).
fn reader_near(inner: &Inner, d: usize, t_us: i64) -> Result<DomainReader> {
    let dir = log::domain_dir(&inner.dir, Domain::ALL[d]);
    let segs = log::segments(&dir)?;
    let mut start = 0u64;
    for s in segs {
        match first_batch_us(&log::seg_path(&dir, s)) {
            Some(us) if us < t_us => start = s.saturating_sub(1),
            _ => break,
        }
    }
    Ok(DomainReader::new(&inner.dir, d, start))
}

/// The sequence after which every record is stored at or after `t_us` (so a reader started
/// there sees exactly the records from that time on).
pub(crate) fn seq_at_time(inner: &Inner, t_us: i64) -> Result<u64> {
    let snap = inner.shared.snapshot();
    let mut first: Option<u64> = None;
    for d in 0..Domain::ALL.len() {
        let e = snap.domains[d];
        if e.last_seq == 0 {
            continue;
        }
        reader_near(inner, d, t_us)?.scan(&e, |rec| {
            if rec.log_us >= t_us {
                first = Some(first.map_or(rec.seq, |f| f.min(rec.seq)));
                return Ok(ControlFlow::Break(()));
            }
            Ok(ControlFlow::Continue(()))
        })?;
    }
    Ok(match first {
        Some(f) => f - 1,
        None => snap.next_seq.saturating_sub(1),
    })
}

fn read_window_blocking(inner: &Inner, q: &WindowQuery) -> Result<Vec<StoredMessage>> {
    let snap = inner.shared.snapshot();
    let limit = q.limit.max(1);
    let start_us = q.start.map(|t| t.timestamp_micros());
    let end_us = q.end.map(|t| t.timestamp_micros());
    let key_hashes: Option<Vec<(u32, &str)>> = q.keys.as_ref().map(|ks| {
        ks.iter()
            .map(|k| (format::key_hash(k.as_bytes()), k.as_str()))
            .collect()
    });
    let mut found: Vec<StoredMessage> = Vec::new();
    for d in domains_of(&q.pattern) {
        let e = snap.domains[d];
        if e.last_seq == 0 {
            continue;
        }
        let mut r = match start_us {
            Some(t) => reader_near(inner, d, t)?,
            None => DomainReader::new(&inner.dir, d, 0),
        };
        if q.after_sequence > r.pos {
            r = DomainReader::new(&inner.dir, d, q.after_sequence);
        }
        let mut n = 0usize;
        r.scan(&e, |rec| {
            if rec.seq <= q.after_sequence || start_us.is_some_and(|s| rec.log_us < s) {
                return Ok(ControlFlow::Continue(()));
            }
            if end_us.is_some_and(|end| rec.log_us >= end) {
                return Ok(ControlFlow::Break(()));
            }
            if !q.pattern.matches(&rec.topic) {
                return Ok(ControlFlow::Continue(()));
            }
            if let Some(keys) = &key_hashes
                && !keys.iter().any(|(h, _)| *h == rec.key_hash)
            {
                return Ok(ControlFlow::Continue(()));
            }
            let env = envelope_of(inner, &rec)?;
            if let Some(keys) = &key_hashes {
                let k = env.headers.partition_key().unwrap_or("");
                if !keys.iter().any(|(_, want)| *want == k) {
                    return Ok(ControlFlow::Continue(()));
                }
            }
            found.push(StoredMessage {
                sequence: rec.seq,
                stored_at: us_to_time(rec.log_us),
                envelope: env,
            });
            n += 1;
            Ok(if n >= limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
    }
    found.sort_by_key(|m| m.sequence);
    found.truncate(limit);
    Ok(found)
}

#[async_trait]
impl ReplayByTime for EmbeddedLog {
    async fn read_window(&self, query: &WindowQuery) -> Result<Vec<StoredMessage>> {
        let inner = self.inner.clone();
        let q = query.clone();
        tokio::task::spawn_blocking(move || read_window_blocking(&inner, &q))
            .await
            .map_err(|e| self.inner.task_failed("read task", e))?
    }
}
