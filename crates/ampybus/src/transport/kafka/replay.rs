//! Replay by store time and keys: a consumer without a group position, assigned to every
//! partition of the matching topics at the offset of the first record at or after the start
//! (`offsets_for_times`; the record before it is read too, and the lookup is stepped back when
//! that record is already inside the window), reading each partition to its end, one topic at a
//! time. The end bound, the pattern and the keys are enforced here, on the client.
//!
//! Offsets of different partitions are not comparable, so a page is merged by record
//! timestamp (milliseconds) and `sequence` is that timestamp: a page holds the first `limit`
//! records by time plus every other record of its last millisecond, and the next page starts
//! at the following millisecond. A partition stops at its first record at or after the end.

use super::{KafkaTransport, kafka_error};
use crate::error::{Error, ErrorKind, Result};
use crate::headers::names;
use crate::transport::{ReplayByTime, StoredMessage, WindowQuery};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The first millisecond at or after `t`.
fn ceil_ms(t: DateTime<Utc>) -> i64 {
    let ms = t.timestamp_millis();
    if t.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms + 1
    }
}

/// One record kept for the page: `(timestamp ms, produced_at µs, message)`.
type Kept = (i64, i64, StoredMessage);

/// One partition's part of a page.
struct PartRead {
    /// Lowest retained offset.
    low: i64,
    /// The high watermark the broker reported when the call started (a hint only: a
    /// partition is read to its end).
    high: i64,
    /// Where the scan starts.
    from: i64,
    /// What `offsets_for_times` answered (`None`: no start time, scan from `low`).
    lookup: Option<i64>,
    done: bool,
    got: Vec<Kept>,
    cutoff: Option<i64>,
}

/// The read of one page: `Ok(records per partition)`, or the partitions whose timestamp
/// lookup proved too high (their first record read was already at or after the start).
enum Scan {
    Done(Vec<Vec<Kept>>),
    BackOff(Vec<(String, i32)>),
}

#[async_trait]
impl ReplayByTime for KafkaTransport {
    async fn read_window(&self, q: &WindowQuery) -> Result<Vec<StoredMessage>> {
        let shared = self.shared.clone();
        let topics = shared.topics_for(&q.pattern).await?;
        if topics.is_empty() {
            return Ok(Vec::new());
        }
        let limit = if q.limit == 0 { 1000 } else { q.limit };
        let mut start_ms = q.start.map(ceil_ms);
        if q.after_sequence > 0 {
            let after = i64::try_from(q.after_sequence)
                .unwrap_or(i64::MAX)
                .saturating_add(1);
            start_ms = Some(start_ms.map_or(after, |s| s.max(after)));
        }
        let end_ms = q.end.map(ceil_ms);
        if let (Some(s), Some(e)) = (start_ms, end_ms)
            && s >= e
        {
            return Ok(Vec::new());
        }
        let q = q.clone();
        tokio::task::spawn_blocking(move || {
            let opts = &shared.opts;
            let where_ = shared.where_();
            let timeout = opts.request_timeout;
            let consumer = replay_consumer(&shared)?;
            let mut parts: HashMap<(String, i32), PartRead> = HashMap::new();
            let mut times = TopicPartitionList::new();
            for (topic, n) in &topics {
                for p in 0..*n as i32 {
                    let (low, high) =
                        consumer.fetch_watermarks(topic, p, timeout).map_err(|e| {
                            kafka_error(&where_, &format!("watermarks of {topic}/{p}"), e)
                        })?;
                    if high <= low {
                        continue;
                    }
                    parts.insert(
                        (topic.clone(), p),
                        PartRead {
                            low,
                            high,
                            from: low,
                            lookup: None,
                            done: false,
                            got: Vec::new(),
                            cutoff: None,
                        },
                    );
                    if let Some(ms) = start_ms {
                        times
                            .add_partition_offset(topic, p, Offset::Offset(ms))
                            .map_err(|e| kafka_error(&where_, "offsets", e))?;
                    }
                }
            }
            if times.count() > 0 {
                let found = consumer
                    .offsets_for_times(times, timeout)
                    .map_err(|e| kafka_error(&where_, "offsets for times", e))?;
                for e in found.elements() {
                    let key = (e.topic().to_owned(), e.partition());
                    if let Some(part) = parts.get_mut(&key) {
                        // "Nothing at or after the start" (no offset) is checked like any
                        // answer: as the high watermark.
                        let o = match e.offset() {
                            Offset::Offset(o) => o.max(part.low),
                            _ => part.high,
                        };
                        // Start one record early: that record must be older than the start,
                        // which proves the lookup did not skip anything.
                        part.lookup = Some(o);
                        part.from = (o - 1).max(part.low);
                    }
                }
            }
            drop(consumer);
            // One topic at a time: the end-of-partition event names only the partition.
            let mut names: Vec<String> = parts.keys().map(|(t, _)| t.clone()).collect();
            names.sort();
            names.dedup();
            let mut per_part = Vec::new();
            for topic in &names {
                loop {
                    match scan(&shared, &mut parts, topic, &q, limit, start_ms, end_ms)? {
                        Scan::Done(v) => {
                            per_part.extend(v);
                            break;
                        }
                        Scan::BackOff(keys) => {
                            // The broker's lookup answered an offset past records at or after
                            // the start: step back twice as far and read the topic again.
                            for k in keys {
                                if let Some(p) = parts.get_mut(&k) {
                                    let lookup = p.lookup.unwrap_or(p.low);
                                    let back = (lookup - p.from).max(1) * 2;
                                    p.from = (lookup - back).max(p.low);
                                }
                            }
                            for ((t, _), p) in parts.iter_mut() {
                                if t == topic {
                                    p.done = false;
                                    p.got.clear();
                                    p.cutoff = None;
                                }
                            }
                        }
                    }
                }
            }
            Ok(merge(per_part, limit))
        })
        .await
        .map_err(|e| Error::transport("kafka: replay task failed", e))?
    }
}

pub(crate) fn replay_consumer(shared: &super::Shared) -> Result<BaseConsumer<super::Quiet>> {
    let opts = &shared.opts;
    let mut cfg = opts.client_config();
    cfg.set(
        "group.id",
        format!(
            "{}ampy-replay-{}",
            opts.namespace,
            uuid::Uuid::new_v4().simple()
        ),
    )
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false")
    .set("enable.partition.eof", "true");
    cfg.create_with_context(super::Quiet)
        .map_err(|e| kafka_error(&shared.where_(), "invalid consumer settings", e))
}

/// Reads every partition from `from` up to its high watermark, the end, or the page's cutoff.
fn scan(
    shared: &super::Shared,
    parts: &mut HashMap<(String, i32), PartRead>,
    topic: &str,
    q: &WindowQuery,
    limit: usize,
    start_ms: Option<i64>,
    end_ms: Option<i64>,
) -> Result<Scan> {
    let where_ = shared.where_();
    let consumer = replay_consumer(shared)?;
    let mut assign = TopicPartitionList::new();
    for ((t, p), part) in parts.iter().filter(|((t, _), _)| t == topic) {
        assign
            .add_partition_offset(t, *p, Offset::Offset(part.from))
            .map_err(|e| kafka_error(&where_, "offsets", e))?;
    }
    consumer
        .assign(&assign)
        .map_err(|e| kafka_error(&where_, "assign", e))?;
    let overall = shared.opts.request_timeout * 3;
    let mut last_progress = Instant::now();
    let mut back_off = Vec::new();
    let pending = |parts: &HashMap<(String, i32), PartRead>| {
        parts.iter().any(|((t, _), p)| t == topic && !p.done)
    };
    while pending(parts) {
        let m = match consumer.poll(Duration::from_millis(100)) {
            None => {
                if last_progress.elapsed() > overall {
                    let stuck: Vec<String> = parts
                        .iter()
                        .filter(|((t, _), p)| t == topic && !p.done)
                        .map(|((t, p), _)| format!("{t}/{p}"))
                        .collect();
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "{where_}: replay: neither records nor the end within {overall:?} from {}",
                            stuck.join(", ")
                        ),
                    ));
                }
                continue;
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(part) = parts.get_mut(&(topic.to_owned(), p)) {
                    part.done = true;
                }
                last_progress = Instant::now();
                continue;
            }
            Some(Err(e)) => return Err(kafka_error(&where_, "replay fetch", e)),
            Some(Ok(m)) => m,
        };
        last_progress = Instant::now();
        let key = (m.topic().to_owned(), m.partition());
        let Some(part) = parts.get_mut(&key) else {
            continue;
        };
        let off = m.offset();
        if part.done || off < part.from {
            continue;
        }
        let ts = m.timestamp().to_millis().unwrap_or(0);
        if off == part.from
            && part.lookup.is_some_and(|l| l > part.low && off < l)
            && start_ms.is_some_and(|s| ts >= s)
        {
            // The record before the looked-up offset is already inside the window.
            back_off.push(key);
            part.done = true;
            continue;
        }
        if end_ms.is_some_and(|e| ts >= e) || part.cutoff.is_some_and(|c| ts > c) {
            part.done = true;
            continue;
        }
        if start_ms.is_some_and(|s| ts < s) {
            continue;
        }
        let envelope = super::consume::to_envelope(&m, &shared.opts.namespace);
        if !q.pattern.matches(&envelope.topic) {
            continue;
        }
        if let Some(keys) = &q.keys {
            let k = envelope.headers.get(names::PARTITION_KEY).unwrap_or("");
            if !keys.iter().any(|x| x == k) {
                continue;
            }
        }
        let produced = envelope
            .headers
            .produced_at_time()
            .map_or(i64::MAX, |t| t.timestamp_micros());
        part.got.push((
            ts,
            produced,
            StoredMessage {
                sequence: u64::try_from(ts).unwrap_or(0),
                stored_at: DateTime::from_timestamp_millis(ts).unwrap_or_default(),
                envelope,
            },
        ));
        if part.got.len() == limit {
            part.cutoff = Some(ts);
        }
    }
    if !back_off.is_empty() {
        return Ok(Scan::BackOff(back_off));
    }
    Ok(Scan::Done(
        parts
            .iter_mut()
            .filter(|((t, _), _)| t == topic)
            .map(|(_, p)| std::mem::take(&mut p.got))
            .collect(),
    ))
}

/// Merges partitions (each in offset order, kept as it is) by `(timestamp, produced_at)` of
/// their heads; keeps the first `limit` and the rest of the last millisecond.
fn merge(mut per_part: Vec<Vec<Kept>>, limit: usize) -> Vec<StoredMessage> {
    let mut heads: Vec<std::collections::VecDeque<Kept>> =
        per_part.drain(..).map(Into::into).collect();
    let mut out: Vec<Kept> = Vec::new();
    loop {
        let best = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.front().map(|m| (i, (m.0, m.1))))
            .min_by_key(|(_, k)| *k);
        let Some((i, (ts, _))) = best else { break };
        if out.len() >= limit && out.last().is_some_and(|l| l.0 != ts) {
            break;
        }
        out.extend(heads[i].pop_front());
    }
    out.into_iter().map(|m| m.2).collect()
}
