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
use crate::error::{Error, ErrorKind};
use crate::topic::Topic;
use crate::transport::{BatchOutcome, PublishOutcome, PublishReceipt};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest pipeline.
const CHUNK: usize = 512;

struct Chunk {
    first: usize,
    /// The stream key of every message (shared by a run of messages on one stream).
    keys: Vec<Arc<str>>,
    pipe: redis::Pipeline,
    n: usize,
}

/// Publishes with per-message outcomes: every `XADD` answered with an entry id is confirmed
/// (also the ones after a refused command in the same pipeline); after the first failure no
/// further pipeline is sent (its messages stay [`PublishOutcome::Unsent`]). A refused `XADD`
/// is `Unsent`; a pipeline without an answer (timeout, lost connection) is `Unknown`. With
/// `settle_rest` the pipelines already sent are awaited; without it they count as unknown.
pub(crate) async fn publish_outcomes(
    shared: &Shared,
    batch: Vec<Envelope>,
    settle_rest: bool,
) -> BatchOutcome {
    let total = batch.len();
    if total == 0 {
        return BatchOutcome::confirmed(Vec::new());
    }
    let limit = shared.opts.max_in_flight.max(1);
    let chunk = limit.min(CHUNK);
    let parallel = (limit / chunk).max(1);
    let now_ms = chrono::Utc::now().timestamp_millis();
    // Build every pipeline first (validation errors before anything is sent).
    let mut chunks: Vec<Chunk> = Vec::with_capacity(total.div_ceil(chunk));
    let mut last: Option<(String, Arc<str>, String)> = None; // topic, key, minid
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
        if last.as_ref().is_none_or(|(t, _, _)| *t != env.topic) {
            last = {
                let topic: Topic = match env.topic() {
                    Ok(t) => t,
                    Err(e) => {
                        let e = Error::new(e.kind(), format!("message {index}: {}", e.message()));
                        return BatchOutcome::all(total, PublishOutcome::Unsent, e);
                    }
                };
                let key = shared.opts.stream_key(wire::stream_of(topic.as_str()));
                let age = shared
                    .opts
                    .max_age_at(topic.env(), topic.domain())
                    .as_millis() as i64;
                // An age of zero means unlimited: `MINID ~ 0-0` trims nothing.
                let minid = if age == 0 {
                    "0-0".to_owned()
                } else {
                    format!("{}-0", (now_ms - age).max(0))
                };
                Some((env.topic.to_string(), Arc::from(key), minid))
            };
        }
        let Some((_, key, minid)) = &last else {
            unreachable!("set above")
        };
        let mut cmd = wire::xadd(key, minid, &env);
        if let Err(e) = wire::add_fields(&mut cmd, &env) {
            let e = Error::new(e.kind(), format!("message {index}: {}", e.message()));
            return BatchOutcome::all(total, PublishOutcome::Unsent, e);
        }
        let c = chunks.last_mut().expect("a chunk");
        c.pipe.add_command(cmd);
        c.keys.push(key.clone());
        c.n += 1;
    }
    if let Some(max_len) = shared.opts.max_len {
        for c in &mut chunks {
            let mut keys = c.keys.clone();
            keys.dedup();
            for k in keys {
                c.pipe
                    .cmd("XTRIM")
                    .arg(&*k)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(max_len)
                    .ignore();
            }
        }
    }
    let where_ = shared.where_();
    let timeout = shared.opts.request_timeout;
    // Set at the first failure: pipelines not started by then are not sent.
    let stop = AtomicBool::new(false);
    let results = futures::stream::iter(chunks.into_iter().map(|c| {
        let mut conn = shared.conn.clone();
        let stop = &stop;
        async move {
            if stop.load(Ordering::SeqCst) {
                return (c.first, c.keys, None);
            }
            let r =
                tokio::time::timeout(timeout, c.pipe.query_async::<Vec<redis::Value>>(&mut conn))
                    .await;
            (c.first, c.keys, Some(r))
        }
    }))
    .buffered(parallel);
    let mut results = std::pin::pin!(results);
    let mut outcomes = vec![PublishOutcome::Unsent; total];
    let mut error: Option<Error> = None;
    let before = |i: usize| {
        if i > 0 {
            format!("; the {i} messages before it were stored (later ones may have been)")
        } else {
            String::new()
        }
    };
    while let Some((first, keys, r)) = results.next().await {
        let Some(r) = r else { continue };
        let span = first..first + keys.len();
        let values = match r {
            Err(_) => {
                outcomes[span.clone()].fill(PublishOutcome::Unknown);
                error.get_or_insert_with(|| Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{where_}: publish of messages {first}..{} of {total}: no answer within {timeout:?}{}",
                        span.end,
                        before(first)
                    ),
                ));
                stop.store(true, Ordering::SeqCst);
                if !settle_rest {
                    break;
                }
                continue;
            }
            Ok(Err(e)) => {
                outcomes[span.clone()].fill(PublishOutcome::Unknown);
                let e = command_error(
                    &where_,
                    &format!(
                        "publish of message {first} of {total} to stream {}",
                        keys.first().map_or("?", |k| &**k)
                    ),
                    e,
                );
                error.get_or_insert_with(|| {
                    Error::new(e.kind(), format!("{}{}", e.message(), before(first)))
                });
                stop.store(true, Ordering::SeqCst);
                if !settle_rest {
                    break;
                }
                continue;
            }
            Ok(Ok(v)) => v,
        };
        for (i, key) in keys.iter().enumerate() {
            let index = first + i;
            outcomes[index] = match values.get(i) {
                Some(redis::Value::ServerError(se)) => {
                    let e = command_error(
                        &where_,
                        &format!("publish of message {index} of {total} to stream {key}"),
                        redis::RedisError::from(se.clone()),
                    );
                    error.get_or_insert_with(|| {
                        Error::new(e.kind(), format!("{}{}", e.message(), before(index)))
                    });
                    stop.store(true, Ordering::SeqCst);
                    PublishOutcome::Unsent
                }
                Some(other) => {
                    match wire::pack_id_value(other) {
                        Some(sequence) => PublishOutcome::Confirmed(PublishReceipt {
                            sequence,
                            duplicate: false,
                        }),
                        None => {
                            error.get_or_insert_with(|| Error::new(
                                ErrorKind::Transport,
                                format!("{where_}: XADD to {key} answered {other:?}, not an entry id"),
                            ));
                            stop.store(true, Ordering::SeqCst);
                            PublishOutcome::Unknown
                        }
                    }
                }
                None => {
                    error.get_or_insert_with(|| {
                        Error::new(
                            ErrorKind::Transport,
                            format!(
                                "{where_}: publish of message {index} of {total} to stream {key}: no reply in the pipeline"
                            ),
                        )
                    });
                    stop.store(true, Ordering::SeqCst);
                    PublishOutcome::Unknown
                }
            };
        }
        if error.is_some() && !settle_rest {
            break;
        }
    }
    if error.is_some() && !settle_rest {
        // Pipelines still in flight when we stopped listening: their fate is not known.
        for o in &mut outcomes {
            if *o == PublishOutcome::Unsent {
                *o = PublishOutcome::Unknown;
            }
        }
    }
    BatchOutcome { outcomes, error }
}
