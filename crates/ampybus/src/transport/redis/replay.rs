//! Replay by store time and keys: `XRANGE` over millisecond ids, `[start, end)` (the end
//! exclusive: `(end_ms-0`), reading only streams that exist; topics and keys filtered here.
//!
//! `sequence` is the packed entry id ([`super::pack_id`]), which orders like store time across
//! streams too, so a pattern spanning several streams is read stream by stream and merged by
//! it. A page never ends between two entries of different streams with the same id (it may
//! then hold a few more than `limit`), so paging by `after_sequence` loses nothing.

use super::{RedisTransport, Shared, wire};
use crate::error::Result;
use crate::headers::names;
use crate::transport::{ReplayByTime, StoredMessage, WindowQuery};
use async_trait::async_trait;

/// Largest `XRANGE` page while scanning.
const SCAN_BATCH: usize = 1000;

#[async_trait]
impl ReplayByTime for RedisTransport {
    async fn read_window(&self, q: &WindowQuery) -> Result<Vec<StoredMessage>> {
        let shared = &self.shared;
        let limit = if q.limit == 0 { 1000 } else { q.limit };
        if let (Some(s), Some(e)) = (q.start, q.end)
            && s >= e
        {
            return Ok(Vec::new());
        }
        let keys = shared.existing_streams(&q.pattern).await?;
        let mut all = Vec::new();
        for key in &keys {
            all.extend(read_stream(shared, key, q, limit).await?);
        }
        if keys.len() > 1 {
            all.sort_by_key(|m| m.sequence);
            if all.len() > limit {
                let last = all[limit - 1].sequence;
                let keep = limit
                    + all[limit..]
                        .iter()
                        .take_while(|m| m.sequence == last)
                        .count();
                all.truncate(keep);
            }
        }
        Ok(all)
    }
}

/// Up to `limit` matches from one stream, in id order.
async fn read_stream(
    shared: &Shared,
    key: &str,
    q: &WindowQuery,
    limit: usize,
) -> Result<Vec<StoredMessage>> {
    let mut from = match q.start {
        Some(s) => format!("{}-0", wire::ceil_ms(s).max(0)),
        None => "-".to_owned(),
    };
    if q.after_sequence > 0 {
        let after = wire::unpack_id(q.after_sequence);
        let after_is_later = q.start.is_none_or(|s| {
            wire::pack_id(&format!("{}-0", wire::ceil_ms(s).max(0))).unwrap_or(0)
                <= q.after_sequence
        });
        if after_is_later {
            from = format!("({after}");
        }
    }
    let to = match q.end {
        Some(e) => format!("({}-0", wire::ceil_ms(e).max(0)),
        None => "+".to_owned(),
    };
    let mut out = Vec::new();
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
            let Some(env) = wire::to_envelope(fields) else {
                continue;
            };
            if !q.pattern.matches(&env.topic) {
                continue;
            }
            if let Some(keys) = &q.keys
                && !env
                    .headers
                    .get(names::PARTITION_KEY)
                    .is_some_and(|k| keys.iter().any(|x| x == k))
            {
                continue;
            }
            let Some(sequence) = wire::pack_id(&e.id) else {
                continue;
            };
            out.push(StoredMessage {
                sequence,
                stored_at: wire::id_time(&e.id),
                envelope: env,
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
