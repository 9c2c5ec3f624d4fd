//! Publishing: `XADD` with an approximate `MINID` trim, pipelined in chunks, at most
//! `max_in_flight` commands unanswered, receipts in order.
//!
//! A batch is cut into pipelines of up to 512 `XADD`s; up to `max_in_flight / chunk` of them are
//! in flight at once on the multiplexed connection, and their replies are taken in order. A
//! command the server refuses (`NOPERM` for a key the ACL user may not write, `OOM`, a wrong
//! type) fails the batch with an error naming the message index and the stream key; NOPERM is a
//! `Config` error (not retried by `runtime::Publisher`).

use super::{Shared, command_error, wire};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::topic::Topic;
use crate::transport::PublishReceipt;
use futures::StreamExt;

/// Largest pipeline.
const CHUNK: usize = 512;

struct Chunk {
    first: usize,
    keys: Vec<String>,
    pipe: redis::Pipeline,
    n: usize,
}

pub(crate) async fn publish_batch(
    shared: &Shared,
    batch: Vec<Envelope>,
) -> Result<Vec<PublishReceipt>> {
    let total = batch.len();
    if total == 0 {
        return Ok(Vec::new());
    }
    let limit = shared.opts.max_in_flight.max(1);
    let chunk = limit.min(CHUNK);
    let parallel = (limit / chunk).max(1);
    let now_ms = chrono::Utc::now().timestamp_millis();
    // Build every pipeline first (validation errors before anything is sent).
    let mut chunks: Vec<Chunk> = Vec::with_capacity(total.div_ceil(chunk));
    let mut last: Option<(String, String, String)> = None; // topic, key, minid
    for (index, env) in batch.into_iter().enumerate() {
        if chunks.last().is_none_or(|c| c.n >= chunk) {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            chunks.push(Chunk {
                first: index,
                keys: Vec::with_capacity(chunk),
                pipe,
                n: 0,
            });
        }
        let (key, minid) = match &last {
            Some((t, k, m)) if *t == env.topic => (k.clone(), m.clone()),
            _ => {
                let topic: Topic = env.topic().map_err(|e| {
                    Error::new(e.kind(), format!("message {index}: {}", e.message()))
                })?;
                let key = shared.opts.stream_key(wire::stream_of(topic.as_str()));
                let age = shared.opts.max_age_for(topic.domain()).as_millis() as i64;
                // An age of zero means unlimited: `MINID ~ 0-0` trims nothing.
                let minid = if age == 0 {
                    "0-0".to_owned()
                } else {
                    format!("{}-0", (now_ms - age).max(0))
                };
                last = Some((env.topic.clone(), key.clone(), minid.clone()));
                (key, minid)
            }
        };
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&key).arg("MINID").arg("~").arg(&minid).arg("*");
        wire::add_fields(&mut cmd, &env)
            .map_err(|e| Error::new(e.kind(), format!("message {index}: {}", e.message())))?;
        let c = chunks.last_mut().expect("a chunk");
        c.pipe.add_command(cmd);
        c.keys.push(key);
        c.n += 1;
    }
    if let Some(max_len) = shared.opts.max_len {
        for c in &mut chunks {
            let mut keys = c.keys.clone();
            keys.dedup();
            for k in keys {
                c.pipe
                    .cmd("XTRIM")
                    .arg(&k)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(max_len)
                    .ignore();
            }
        }
    }
    let where_ = shared.where_();
    let timeout = shared.opts.request_timeout;
    let results = futures::stream::iter(chunks.into_iter().map(|c| {
        let mut conn = shared.conn.clone();
        async move {
            let r =
                tokio::time::timeout(timeout, c.pipe.query_async::<Vec<redis::Value>>(&mut conn))
                    .await;
            (c.first, c.keys, r)
        }
    }))
    .buffered(parallel);
    let mut results = std::pin::pin!(results);
    let mut receipts = Vec::with_capacity(total);
    let before = |i: usize| {
        if i > 0 {
            format!("; the {i} messages before it were stored (later ones may have been)")
        } else {
            String::new()
        }
    };
    while let Some((first, keys, r)) = results.next().await {
        let values = match r {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{where_}: publish of messages {first}..{} of {total}: no answer within {timeout:?}{}",
                        first + keys.len(),
                        before(first)
                    ),
                ));
            }
            Ok(Err(e)) => {
                let e = command_error(
                    &where_,
                    &format!(
                        "publish of message {first} of {total} to stream {}",
                        keys.first().map(String::as_str).unwrap_or("?")
                    ),
                    e,
                );
                return Err(Error::new(
                    e.kind(),
                    format!("{}{}", e.message(), before(first)),
                ));
            }
            Ok(Ok(v)) => v,
        };
        for (i, (v, key)) in values.iter().zip(&keys).enumerate() {
            let index = first + i;
            match v {
                redis::Value::ServerError(se) => {
                    let e = command_error(
                        &where_,
                        &format!("publish of message {index} of {total} to stream {key}"),
                        redis::RedisError::from(se.clone()),
                    );
                    return Err(Error::new(
                        e.kind(),
                        format!("{}{}", e.message(), before(index)),
                    ));
                }
                other => {
                    let id = wire::string_of(other).unwrap_or_default();
                    let sequence = wire::pack_id(&id).ok_or_else(|| {
                        Error::new(
                            ErrorKind::Transport,
                            format!("{where_}: XADD to {key} answered {other:?}, not an entry id"),
                        )
                    })?;
                    receipts.push(PublishReceipt {
                        sequence,
                        duplicate: false,
                    });
                }
            }
        }
    }
    Ok(receipts)
}
