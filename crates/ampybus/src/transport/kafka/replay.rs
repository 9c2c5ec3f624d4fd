//! Replay by store time and keys, translated for Kafka: the streams of a pattern are the
//! partitions of its topics; one page of each is read by a consumer without a group position,
//! assigned right after the offset the cursor holds, or at the first record at or after the
//! start (`offsets_for_times`; the record before it is read too, and the lookup is stepped back
//! when that record is already inside the window), one topic at a time. A partition stops at its
//! first record at or after the end. Merging the partitions, the tie rule (record timestamps are
//! whole milliseconds: the producer's `produced_at` orders a millisecond), the cursor and the
//! client-side filter (window, pattern, keys) are `transport::multi`'s. `sequence` is the offset
//! when the pattern spans one partition, else the store time in nanoseconds.

use super::{KafkaTransport, Shared, kafka_error};
use crate::error::{Error, ErrorKind, Result};
use crate::topic::TopicPattern;
use crate::transport::multi::{
    self, Entry, Filter, Start, StreamRead, StreamSource, Verdict, ceil_ms,
};
use crate::transport::{ReplayByTime, ReplayPage, StoredMessage, WindowQuery};
use async_trait::async_trait;
use chrono::DateTime;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[async_trait]
impl ReplayByTime for KafkaTransport {
    async fn read_window(&self, q: &WindowQuery) -> Result<Vec<StoredMessage>> {
        multi::read_window(&Source(self.shared.clone()), q).await
    }

    async fn read_page(&self, q: &WindowQuery) -> Result<ReplayPage> {
        multi::read_page(&Source(self.shared.clone()), q).await
    }
}

/// The Kafka side of a multi-stream read.
struct Source(Arc<Shared>);

/// A partition: `(Kafka topic, partition)`.
type Part = (String, i32);

#[async_trait]
impl StreamSource for Source {
    type Stream = Part;

    async fn streams(&self, pattern: &TopicPattern) -> Result<Vec<Part>> {
        Ok(self
            .0
            .topics_for(pattern)
            .await?
            .into_iter()
            .flat_map(|(t, n)| {
                (0..i32::try_from(n).unwrap_or(i32::MAX)).map(move |p| (t.clone(), p))
            })
            .collect())
    }

    /// `topic/partition`, the partition zero-padded so names order like partitions.
    fn name(stream: &Part) -> String {
        format!("{}/{:06}", stream.0, stream.1)
    }

    async fn read(
        &self,
        reads: Vec<StreamRead<Part>>,
        filter: &Filter,
        limit: usize,
    ) -> Result<Vec<Vec<Entry>>> {
        let shared = self.0.clone();
        let filter = filter.clone();
        tokio::task::spawn_blocking(move || read_blocking(&shared, reads, &filter, limit))
            .await
            .map_err(|e| Error::transport("kafka: replay task failed", e))?
    }
}

/// One partition's part of a page.
struct PartRead {
    /// Lowest retained offset.
    low: i64,
    /// The high watermark when the read started.
    high: i64,
    /// Where the scan starts.
    from: i64,
    /// The first millisecond of a read by time.
    start_ms: Option<i64>,
    /// What `offsets_for_times` answered (`None`: not read by time).
    lookup: Option<i64>,
    /// Nothing to read (empty, or the cursor is at its end).
    nothing: bool,
    done: bool,
    got: Vec<Entry>,
}

fn read_blocking(
    shared: &Shared,
    reads: Vec<StreamRead<Part>>,
    filter: &Filter,
    limit: usize,
) -> Result<Vec<Vec<Entry>>> {
    let where_ = shared.where_();
    let timeout = shared.opts.request_timeout;
    let consumer = shared.reader()?;
    let mut parts: HashMap<Part, PartRead> = HashMap::new();
    let mut times = TopicPartitionList::new();
    for r in &reads {
        let (topic, p) = &r.stream;
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(|e| kafka_error(&where_, &format!("watermarks of {topic}/{p}"), e))?;
        let mut part = PartRead {
            low,
            high,
            from: low,
            start_ms: None,
            lookup: None,
            nothing: high <= low,
            done: false,
            got: Vec::new(),
        };
        match r.from {
            Start::After(off) => {
                part.from = i64::try_from(off)
                    .unwrap_or(i64::MAX)
                    .saturating_add(1)
                    .max(low);
                // The high watermark when the call started is a hint only (a partition is
                // read to its end), but nothing past it is there to read yet.
                part.nothing |= part.from >= high;
            }
            Start::Time(None) => {}
            Start::Time(Some(t)) if !part.nothing => {
                let ms = ceil_ms(t);
                part.start_ms = Some(ms);
                times
                    .add_partition_offset(topic, *p, Offset::Offset(ms))
                    .map_err(|e| kafka_error(&where_, "offsets", e))?;
            }
            Start::Time(Some(_)) => {}
        }
        part.done = part.nothing;
        parts.insert(r.stream.clone(), part);
    }
    if times.count() > 0 {
        let found = consumer
            .offsets_for_times(times, timeout)
            .map_err(|e| kafka_error(&where_, "offsets for times", e))?;
        for e in found.elements() {
            let key = (e.topic().to_owned(), e.partition());
            if let Some(part) = parts.get_mut(&key) {
                // "Nothing at or after the start" (no offset) is checked like any answer: as
                // the high watermark.
                let o = match e.offset() {
                    Offset::Offset(o) => o.max(part.low),
                    _ => part.high,
                };
                // Start one record early: that record must be older than the start, which
                // proves the lookup did not skip anything.
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
    for topic in &names {
        loop {
            let back_off = scan(shared, &mut parts, topic, filter, limit)?;
            if back_off.is_empty() {
                break;
            }
            // The broker's lookup answered an offset past records at or after the start:
            // step back twice as far and read the topic again.
            for k in back_off {
                if let Some(p) = parts.get_mut(&k) {
                    let lookup = p.lookup.unwrap_or(p.low);
                    let back = (lookup - p.from).max(1) * 2;
                    p.from = (lookup - back).max(p.low);
                }
            }
            for ((t, _), p) in parts.iter_mut() {
                if t == topic {
                    p.done = p.nothing;
                    p.got.clear();
                }
            }
        }
    }
    Ok(reads
        .iter()
        .map(|r| {
            parts
                .get_mut(&r.stream)
                .map(|p| std::mem::take(&mut p.got))
                .unwrap_or_default()
        })
        .collect())
}

/// Reads the partitions of `topic` from `from` to their end, the window's end, or `limit` kept
/// records; answers the partitions whose timestamp lookup proved too high (their first record
/// read was already at or after the start).
fn scan(
    shared: &Shared,
    parts: &mut HashMap<Part, PartRead>,
    topic: &str,
    filter: &Filter,
    limit: usize,
) -> Result<Vec<Part>> {
    let where_ = shared.where_();
    let consumer = shared.reader()?;
    let mut assign = TopicPartitionList::new();
    for ((t, p), part) in parts.iter().filter(|((t, _), _)| t == topic) {
        if part.done {
            continue;
        }
        assign
            .add_partition_offset(t, *p, Offset::Offset(part.from))
            .map_err(|e| kafka_error(&where_, "offsets", e))?;
    }
    if assign.count() == 0 {
        return Ok(Vec::new());
    }
    consumer
        .assign(&assign)
        .map_err(|e| kafka_error(&where_, "assign", e))?;
    let overall = shared.opts.request_timeout * 3;
    let mut last_progress = Instant::now();
    let mut back_off = Vec::new();
    let mut names = crate::envelope::TopicNames::default();
    let pending =
        |parts: &HashMap<Part, PartRead>| parts.iter().any(|((t, _), p)| t == topic && !p.done);
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
            && part.start_ms.is_some_and(|s| ts >= s)
        {
            // The record before the looked-up offset is already inside the window.
            back_off.push(key);
            part.done = true;
            continue;
        }
        let stored_at = DateTime::from_timestamp_millis(ts).unwrap_or_default();
        let envelope = super::consume::to_envelope(&m, &shared.opts.namespace, &mut names);
        match filter.check(stored_at, &envelope) {
            Verdict::Stop => {
                part.done = true;
                continue;
            }
            Verdict::Skip => continue,
            Verdict::Keep => {}
        }
        part.got.push(Entry {
            seq: u64::try_from(off).unwrap_or(0),
            stored_at,
            envelope,
        });
        if part.got.len() >= limit {
            part.done = true;
        }
    }
    Ok(back_off)
}
