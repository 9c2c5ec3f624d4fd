//! Replay by store time and keys: an ephemeral consumer (no acks) starting by time or after a
//! sequence, filtered to the pattern, reading at most what the stream held when the call
//! started, stopping at the first message stored at or after `end`. Keys are filtered here.
//!
//! Within one stream `sequence` is the stream sequence. Sequences of different streams are not
//! comparable, so a pattern spanning several streams (`ampy.dev.>`) is read stream by stream,
//! merged by store time, and `sequence` is then the store time in nanoseconds since the epoch
//! (paging continues after it; two messages of different streams stored in the same nanosecond
//! across a page boundary would lose the second).

use super::streams::StreamRef;
use super::{NatsTransport, Shared, from_header_map, streams};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::names;
use crate::transport::{ReplayByTime, StoredMessage, WindowQuery};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, pull};
use async_trait::async_trait;
use futures::StreamExt;
use std::time::Duration;

/// Largest pull while scanning.
const SCAN_BATCH: usize = 512;

#[async_trait]
impl ReplayByTime for NatsTransport {
    async fn read_window(&self, q: &WindowQuery) -> Result<Vec<StoredMessage>> {
        let shared = &self.shared;
        let targets = streams::streams_for_pattern(shared, &q.pattern, false).await?;
        match targets.as_slice() {
            [] => Ok(Vec::new()),
            [(stream, filter)] => read_stream(shared, stream, filter, q).await,
            many => {
                // Several streams: their sequences are not comparable, so the page is merged
                // by store time and `sequence` is the store time in nanoseconds since the
                // epoch (pages continue after it).
                let limit = if q.limit == 0 { 1000 } else { q.limit };
                let mut sub = q.clone();
                sub.after_sequence = 0;
                if q.after_sequence > 0 {
                    let after = chrono::DateTime::from_timestamp_nanos(
                        i64::try_from(q.after_sequence).unwrap_or(i64::MAX),
                    );
                    sub.start = Some(q.start.map_or(after, |s| s.max(after)));
                }
                let mut all = Vec::new();
                for (stream, filter) in many {
                    all.extend(read_stream(shared, stream, filter, &sub).await?);
                }
                for m in &mut all {
                    m.sequence = m
                        .stored_at
                        .timestamp_nanos_opt()
                        .and_then(|n| u64::try_from(n).ok())
                        .unwrap_or(0);
                }
                all.retain(|m| m.sequence > q.after_sequence);
                all.sort_by_key(|m| m.sequence);
                all.truncate(limit);
                Ok(all)
            }
        }
    }
}

/// One page from one stream, by stream sequence.
async fn read_stream(
    shared: &Shared,
    stream: &StreamRef,
    filter: &str,
    q: &WindowQuery,
) -> Result<Vec<StoredMessage>> {
    let where_ = format!("{} stream {}", shared.where_(), stream.name);
    let api = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
        Error::with_source(ErrorKind::Transport, format!("{where_}: {what}: {e}"), e)
    };
    let limit = if q.limit == 0 { 1000 } else { q.limit };
    if let (Some(s), Some(e)) = (q.start, q.end)
        && s >= e
    {
        return Ok(Vec::new());
    }
    let mut js_stream = shared
        .js
        .get_stream(&stream.name)
        .await
        .map_err(|e| api("opening the stream", e.into()))?;
    let last_seq = js_stream
        .info()
        .await
        .map_err(|e| api("reading the stream", e.into()))?
        .state
        .last_sequence;
    if q.after_sequence >= last_seq {
        return Ok(Vec::new());
    }
    let deliver_policy = if q.after_sequence > 0 {
        DeliverPolicy::ByStartSequence {
            start_sequence: q.after_sequence + 1,
        }
    } else if let Some(start) = q.start {
        DeliverPolicy::ByStartTime { start_time: start }
    } else {
        DeliverPolicy::All
    };
    let cfg = pull::Config {
        deliver_policy,
        ack_policy: AckPolicy::None,
        filter_subject: filter.to_owned(),
        replay_policy: ReplayPolicy::Instant,
        inactive_threshold: Duration::from_secs(30),
        description: Some("ampybus replay".to_owned()),
        ..Default::default()
    };
    let mut consumer = js_stream
        .create_consumer(cfg)
        .await
        .map_err(|e| api("creating a replay consumer", e.into()))?;
    let mut pending = consumer
        .info()
        .await
        .map_err(|e| api("reading the replay consumer", e.into()))?
        .num_pending;
    let consumer_name = consumer.cached_info().name.clone();
    let keys = q.keys.as_ref();
    let mut out = Vec::new();
    let mut empty_pulls = 0;
    'scan: while pending > 0 && out.len() < limit {
        let want = (pending as usize).min(SCAN_BATCH);
        let batch = consumer
            .batch()
            .max_messages(want)
            .expires(shared.opts.request_timeout.min(Duration::from_secs(2)))
            .messages()
            .await
            .map_err(|e| api("pulling replay messages", e.into()))?;
        let mut batch = std::pin::pin!(batch);
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| api("pulling replay messages", e))?;
            got += 1;
            pending -= 1;
            let Ok(info) = m.info() else { continue };
            let (seq, stored_at) = (info.stream_sequence, info.published);
            if seq > last_seq {
                break 'scan;
            }
            if q.end.is_some_and(|end| stored_at >= end) {
                break 'scan;
            }
            if q.start.is_some_and(|start| stored_at < start) {
                continue;
            }
            let headers = from_header_map(m.message.headers.as_ref());
            if let Some(keys) = keys
                && !headers
                    .get(names::PARTITION_KEY)
                    .is_some_and(|k| keys.iter().any(|x| x == k))
            {
                continue;
            }
            out.push(StoredMessage {
                sequence: seq,
                stored_at,
                envelope: Envelope {
                    topic: m.message.subject.as_str().into(),
                    headers,
                    payload: m.message.payload.clone(),
                },
            });
            if out.len() >= limit || seq >= last_seq {
                break 'scan;
            }
        }
        if got == 0 {
            // Messages counted as pending were removed meanwhile (age, purge).
            empty_pulls += 1;
            if empty_pulls >= 2 {
                break;
            }
        }
    }
    if let Err(e) = js_stream.delete_consumer(&consumer_name).await {
        tracing::debug!(consumer = %consumer_name, error = %e, "nats: replay consumer not deleted (it expires by itself)");
    }
    Ok(out)
}
