//! Replay by store time and keys, translated for Redis Streams: the stream keys a pattern
//! spans (existing ones, `SCAN`) and one page of each by `XRANGE` over millisecond ids,
//! `[start, end)` (the end exclusive: `(end_ms-0`), or after an entry id. Merging the streams,
//! the tie rule, the cursor and the client-side filter (topics, keys) are `transport::multi`'s.
//! `sequence` is the packed entry id ([`super::pack_id`]) when the pattern spans one stream,
//! else the store time in nanoseconds.

use super::{RedisTransport, Shared, wire};
use crate::error::Result;
use crate::topic::TopicPattern;
use crate::transport::multi::{self, Entry, Filter, Start, StreamRead, StreamSource, Verdict};
use crate::transport::{ReplayByTime, ReplayPage, StoredMessage, WindowQuery};
use async_trait::async_trait;

/// Largest `XRANGE` page while scanning.
const SCAN_BATCH: usize = 1000;

#[async_trait]
impl ReplayByTime for RedisTransport {
    async fn read_window(&self, q: &WindowQuery) -> Result<Vec<StoredMessage>> {
        multi::read_window(&Source(&self.shared), q).await
    }

    async fn read_page(&self, q: &WindowQuery) -> Result<ReplayPage> {
        multi::read_page(&Source(&self.shared), q).await
    }
}

/// The Redis side of a multi-stream read.
struct Source<'a>(&'a Shared);

#[async_trait]
impl StreamSource for Source<'_> {
    /// A stream key.
    type Stream = String;

    async fn streams(&self, pattern: &TopicPattern) -> Result<Vec<String>> {
        self.0.existing_streams(pattern).await
    }

    fn name(stream: &String) -> String {
        stream.clone()
    }

    async fn read(
        &self,
        reads: Vec<StreamRead<String>>,
        filter: &Filter,
        limit: usize,
    ) -> Result<Vec<Vec<Entry>>> {
        futures::future::try_join_all(
            reads
                .iter()
                .map(|r| read_stream(self.0, &r.stream, r.from, filter, limit)),
        )
        .await
    }
}

/// Up to `limit` kept entries of one stream, in id order.
async fn read_stream(
    shared: &Shared,
    key: &str,
    from: Start,
    filter: &Filter,
    limit: usize,
) -> Result<Vec<Entry>> {
    let mut from = match from {
        Start::After(packed) => format!("({}", wire::unpack_id(packed)),
        Start::Time(Some(s)) => format!("{}-0", wire::ceil_ms(s).max(0)),
        Start::Time(None) => "-".to_owned(),
    };
    let to = match filter.end() {
        Some(e) => format!("({}-0", wire::ceil_ms(e).max(0)),
        None => "+".to_owned(),
    };
    let mut out = Vec::new();
    let mut names = crate::envelope::TopicNames::default();
    loop {
        let v: redis::Value = shared
            .query(
                &format!("stream {key}: XRANGE"),
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(&from)
                    .arg(&to)
                    .arg("COUNT")
                    .arg(SCAN_BATCH),
            )
            .await?;
        let entries = wire::parse_entries(&v);
        let n = entries.len();
        let Some(last) = entries.last().map(|e| e.id.clone()) else {
            break;
        };
        for e in entries {
            let Some(fields) = &e.fields else { continue };
            let Some(envelope) = wire::to_envelope(fields, &mut names) else {
                continue;
            };
            let Some(seq) = wire::pack_id(&e.id) else {
                continue;
            };
            let stored_at = wire::id_time(&e.id);
            match filter.check(stored_at, &envelope) {
                Verdict::Stop => return Ok(out),
                Verdict::Skip => continue,
                Verdict::Keep => {}
            }
            out.push(Entry {
                seq,
                stored_at,
                envelope,
            });
            if out.len() >= limit {
                return Ok(out);
            }
        }
        if n < SCAN_BATCH {
            break;
        }
        from = format!("({last}");
    }
    Ok(out)
}
