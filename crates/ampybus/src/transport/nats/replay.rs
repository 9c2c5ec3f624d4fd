//! Replay by store time and keys, translated for JetStream: the streams a pattern spans
//! ([`streams::streams_for_pattern`], existing ones only) and one page of each through an
//! ephemeral consumer (no acks) filtered to the pattern, starting after a stream sequence or by
//! time, reading at most what the stream held when the read started. Merging the streams, the
//! tie rule, the cursor and the client-side filter (window end, keys) are `transport::multi`'s.
//! `sequence` is the stream sequence when the pattern spans one stream, else the store time in
//! nanoseconds.

use super::streams::StreamRef;
use super::{NatsTransport, Shared, from_header_map, streams};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::topic::TopicPattern;
use crate::transport::multi::{self, Entry, Filter, Start, StreamRead, StreamSource, Verdict};
use crate::transport::{ReplayByTime, ReplayPage, StoredMessage, WindowQuery};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, pull};
use async_trait::async_trait;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// Largest pull while scanning.
const SCAN_BATCH: usize = 512;

#[async_trait]
impl ReplayByTime for NatsTransport {
    async fn read_window(&self, q: &WindowQuery) -> Result<Vec<StoredMessage>> {
        multi::read_window(&Source(&self.shared), q).await
    }

    async fn read_page(&self, q: &WindowQuery) -> Result<ReplayPage> {
        multi::read_page(&Source(&self.shared), q).await
    }
}

/// The JetStream side of a multi-stream read.
struct Source<'a>(&'a Shared);

#[async_trait]
impl StreamSource for Source<'_> {
    /// A stream and the consumer filter to use on it.
    type Stream = (Arc<StreamRef>, String);

    async fn streams(&self, pattern: &TopicPattern) -> Result<Vec<Self::Stream>> {
        let mut s = streams::streams_for_pattern(self.0, pattern, false).await?;
        s.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(s)
    }

    fn name(stream: &Self::Stream) -> String {
        stream.0.name.clone()
    }

    async fn read(
        &self,
        reads: Vec<StreamRead<Self::Stream>>,
        filter: &Filter,
        limit: usize,
    ) -> Result<Vec<Vec<Entry>>> {
        futures::future::try_join_all(
            reads
                .iter()
                .map(|r| read_stream(self.0, &r.stream.0, &r.stream.1, r.from, filter, limit)),
        )
        .await
    }
}

/// Up to `limit` kept messages of one stream, by stream sequence.
async fn read_stream(
    shared: &Shared,
    stream: &StreamRef,
    subject: &str,
    from: Start,
    filter: &Filter,
    limit: usize,
) -> Result<Vec<Entry>> {
    let where_ = format!("{} stream {}", shared.where_(), stream.name);
    let api = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
        Error::with_source(ErrorKind::Transport, format!("{where_}: {what}: {e}"), e)
    };
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
    let deliver_policy = match from {
        Start::After(seq) if seq >= last_seq => return Ok(Vec::new()),
        Start::After(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
        Start::Time(Some(start_time)) => DeliverPolicy::ByStartTime { start_time },
        Start::Time(None) => DeliverPolicy::All,
    };
    let cfg = pull::Config {
        deliver_policy,
        ack_policy: AckPolicy::None,
        filter_subject: subject.to_owned(),
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
            let envelope = Envelope {
                topic: m.message.subject.as_str().into(),
                headers: from_header_map(m.message.headers.as_ref()),
                payload: m.message.payload.clone(),
            };
            match filter.check(stored_at, &envelope) {
                Verdict::Stop => break 'scan,
                Verdict::Skip => {}
                Verdict::Keep => out.push(Entry {
                    seq,
                    stored_at,
                    envelope,
                }),
            }
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
