//! Publishing: pipelined, bounded in flight, every PubAck awaited and checked.

use super::{Shared, streams, to_header_map};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind};
use crate::headers::names;
use crate::topic::Topic;
use crate::transport::{BatchOutcome, PublishOutcome, PublishReceipt};
use async_nats::Subject;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use std::collections::VecDeque;
use std::sync::Arc;

struct Pending {
    index: usize,
    stream: Arc<streams::StreamRef>,
    /// The subject.
    topic: Topic,
    ack: PublishAckFuture,
}

/// Publishes with per-message outcomes: a message whose PubAck came is confirmed; after the
/// first failure nothing more is sent (the rest stay [`PublishOutcome::Unsent`]). With
/// `settle_rest` the PubAcks of what was already sent are then awaited, concurrently (so
/// within one `request_timeout`); without it they count as unknown at once (the fail-fast
/// `Transport::publish_batch`).
///
/// Send errors are `Unsent` (the message never entered the client's queue); a PubAck timeout
/// or a lost connection is `Unknown`; a definite answer that nothing was stored (no stream,
/// wrong last id/sequence, a refused publish) is `Unsent`; anything else `Unknown`.
pub(crate) async fn publish_outcomes(
    shared: &Shared,
    batch: Vec<Envelope>,
    settle_rest: bool,
) -> BatchOutcome {
    let total = batch.len();
    let mut outcomes = vec![PublishOutcome::Unsent; total];
    let mut error: Option<Error> = None;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut violations = shared.violations.subscribe();
    let limit = shared.opts.max_in_flight.max(1);
    // Batches usually share a topic: parse it, find its stream and make its subject once per
    // run of it (the subject is then shared by every message of the run, not copied).
    let mut last: Option<(Topic, Arc<streams::StreamRef>, Subject)> = None;
    'send: for (index, env) in batch.into_iter().enumerate() {
        let (topic, stream, subject) = match last.take() {
            Some((t, s, subject)) if t.as_str() == env.topic => (t, s, subject),
            _ => {
                let resolved = match env.topic() {
                    Ok(topic) => streams::resolve(shared, topic.env(), topic.domain())
                        .await
                        .map(|s| (topic, s, Subject::from(env.topic.as_str()))),
                    Err(e) => Err(Error::new(
                        e.kind(),
                        format!("message {index}: {}", e.message()),
                    )),
                };
                match resolved {
                    Ok(ts) => ts,
                    Err(e) => {
                        error = Some(e);
                        break 'send;
                    }
                }
            }
        };
        last = Some((topic.clone(), stream.clone(), subject.clone()));
        let headers = match to_header_map(&env.headers) {
            Ok(h) => h,
            Err(e) => {
                error = Some(Error::new(
                    e.kind(),
                    format!("message {index}: {}", e.message()),
                ));
                break 'send;
            }
        };
        let mut msg = PublishMessage::build().headers(headers);
        if let Some(id) = env.headers.get(names::MESSAGE_ID) {
            msg = msg.message_id(id);
        }
        let msg = msg.payload(env.payload);
        while pending.len() >= limit {
            let p = pending.pop_front().expect("non-empty");
            if let Some(e) = settle(shared, p, total, &mut violations, &mut outcomes).await {
                error = Some(e);
                break 'send;
            }
        }
        match shared.js.send_publish(subject, msg).await {
            Ok(ack) => pending.push_back(Pending {
                index,
                stream,
                topic,
                ack,
            }),
            Err(e) => {
                error = Some(publish_error(
                    shared,
                    index,
                    total,
                    topic.as_str(),
                    e.kind(),
                    e.to_string(),
                    e,
                ));
                break 'send;
            }
        }
    }
    while error.is_none()
        && let Some(p) = pending.pop_front()
    {
        error = settle(shared, p, total, &mut violations, &mut outcomes).await;
    }
    if settle_rest {
        let settled = futures::future::join_all(pending.into_iter().map(|p| {
            let mut violations = shared.violations.subscribe();
            async move {
                let i = p.index;
                (i, await_ack(shared, p, total, &mut violations).await)
            }
        }))
        .await;
        for (i, r) in settled {
            outcomes[i] = match r {
                Ok(r) => PublishOutcome::Confirmed(r),
                Err((_, o)) => o,
            };
        }
    } else {
        for p in pending {
            outcomes[p.index] = PublishOutcome::Unknown;
        }
    }
    BatchOutcome { outcomes, error }
}

/// Awaits one PubAck and records the message's outcome; the error when it failed.
async fn settle(
    shared: &Shared,
    p: Pending,
    total: usize,
    violations: &mut tokio::sync::broadcast::Receiver<String>,
    outcomes: &mut [PublishOutcome],
) -> Option<Error> {
    let i = p.index;
    match await_ack(shared, p, total, violations).await {
        Ok(r) => {
            outcomes[i] = PublishOutcome::Confirmed(r);
            None
        }
        Err((e, o)) => {
            outcomes[i] = o;
            Some(e)
        }
    }
}

/// Awaits one PubAck; on failure the error and what it means for the message.
async fn await_ack(
    shared: &Shared,
    p: Pending,
    total: usize,
    violations: &mut tokio::sync::broadcast::Receiver<String>,
) -> std::result::Result<PublishReceipt, (Error, PublishOutcome)> {
    let Pending {
        index,
        stream,
        topic,
        ack,
    } = p;
    let subject = topic.as_str();
    let mut ack = std::pin::pin!(ack.into_future());
    let res = loop {
        tokio::select! {
            r = &mut ack => break r,
            v = violations.recv() => {
                if let Ok(s) = v
                    && s == subject
                {
                    return Err((
                        permission_denied(shared, index, total, subject),
                        PublishOutcome::Unsent,
                    ));
                }
            }
        }
    };
    match res {
        Ok(a) => {
            if a.stream != stream.name {
                tracing::warn!(expected = %stream.name, got = %a.stream, subject = %subject, "nats: message stored in another stream than expected");
            }
            Ok(PublishReceipt {
                sequence: a.sequence,
                duplicate: a.duplicate,
            })
        }
        Err(e) => {
            if matches!(
                e.kind(),
                PublishErrorKind::StreamNotFound | PublishErrorKind::TimedOut
            ) {
                // The stream may have been deleted under us: look it up again next time.
                streams::invalidate(shared, topic.env(), topic.domain());
            }
            let outcome = match e.kind() {
                PublishErrorKind::StreamNotFound
                | PublishErrorKind::WrongLastMessageId
                | PublishErrorKind::WrongLastSequence
                | PublishErrorKind::MaxPayloadExceeded => PublishOutcome::Unsent,
                _ => PublishOutcome::Unknown,
            };
            Err((
                publish_error(shared, index, total, subject, e.kind(), e.to_string(), e),
                outcome,
            ))
        }
    }
}

fn permission_denied(shared: &Shared, index: usize, total: usize, subject: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "{}: message {index} of {total}: permission denied: the server refused publish to `{subject}` (Permissions Violation; check the user's publish permissions); not retried",
            shared.where_()
        ),
    )
}

fn publish_error(
    shared: &Shared,
    index: usize,
    total: usize,
    subject: &str,
    kind: PublishErrorKind,
    text: String,
    source: impl Into<crate::error::BoxError>,
) -> Error {
    let before = if index > 0 {
        format!("; the {index} messages before it were stored")
    } else {
        String::new()
    };
    let (k, what) = match kind {
        PublishErrorKind::TimedOut => (
            ErrorKind::Timeout,
            format!("no PubAck within {:?}", shared.opts.request_timeout),
        ),
        PublishErrorKind::StreamNotFound => (
            ErrorKind::Transport,
            "no stream answered (stream deleted, or the server is unavailable)".to_owned(),
        ),
        PublishErrorKind::MaxPayloadExceeded => (
            ErrorKind::Payload,
            format!("message larger than the server's max_payload: {text}"),
        ),
        _ => (ErrorKind::Transport, text),
    };
    Error::with_source(
        k,
        format!(
            "{}: publish of message {index} of {total} to `{subject}` failed: {what}{before}",
            shared.where_()
        ),
        source,
    )
}
