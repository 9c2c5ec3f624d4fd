//! Publishing: pipelined, bounded in flight, every PubAck awaited and checked. Frames go out
//! on the binding's own connection ([`super::wire`]) when it has one, else through async-nats.

use super::wire::{self, AckError, PubAck};
use super::{Shared, streams, to_header_map};
use crate::envelope::Envelope;
use crate::error::{BoxError, Error, ErrorKind};
use crate::headers::names;
use crate::topic::Topic;
use crate::transport::{BatchOutcome, PublishOutcome, PublishReceipt};
use async_nats::Subject;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use std::collections::VecDeque;
use std::sync::Arc;

/// A PubAck to await, on whichever connection the message went.
enum AckOn {
    Wire(Arc<wire::Link>, wire::AckWait),
    Client(PublishAckFuture),
}

struct Pending {
    index: usize,
    stream: Arc<streams::StreamRef>,
    /// The subject.
    topic: Topic,
    ack: AckOn,
}

/// Where a batch's frames go.
enum Out {
    Wire(Arc<wire::Link>, Vec<u8>),
    Client,
}

impl Drop for Out {
    /// Frames appended and not yet written go now (a batch given up or cancelled between
    /// its appends and its waits does not leave them for the next publisher).
    fn drop(&mut self) {
        if let Out::Wire(link, _) = self {
            link.push();
        }
    }
}

impl Out {
    /// The binding's own connection when it has one (connecting again if the last ended).
    async fn open(shared: &Shared) -> Result<Out, Error> {
        Ok(match &shared.wire {
            Some(p) => Out::Wire(p.link().await?, Vec::with_capacity(1024)),
            None => Out::Client,
        })
    }

    /// Sends one JetStream publish; the PubAck to await.
    async fn send(
        &mut self,
        shared: &Shared,
        subject: &Subject,
        env: Envelope,
    ) -> Result<AckOn, SendError> {
        match self {
            Out::Wire(link, scratch) => {
                let wait = wire_send(
                    link,
                    scratch,
                    subject,
                    &env,
                    true,
                    shared.opts.request_timeout,
                )
                .await?;
                let wait = wait.ok_or_else(|| {
                    SendError::Failed(Error::new(ErrorKind::Transport, "no PubAck inbox"))
                })?;
                Ok(AckOn::Wire(link.clone(), wait))
            }
            Out::Client => {
                let headers = to_header_map(&env.headers).map_err(SendError::Refused)?;
                let mut msg = PublishMessage::build().headers(headers);
                if let Some(id) = env.headers.get(names::MESSAGE_ID) {
                    msg = msg.message_id(id);
                }
                let msg = msg.payload(env.payload);
                match shared.js.send_publish(subject.clone(), msg).await {
                    Ok(f) => Ok(AckOn::Client(f)),
                    Err(e) => Err(SendError::Client(e)),
                }
            }
        }
    }

    /// Sends one core publish (no PubAck).
    async fn send_core(
        &mut self,
        shared: &Shared,
        subject: &Subject,
        env: Envelope,
    ) -> Result<(), SendError> {
        match self {
            Out::Wire(link, scratch) => {
                wire_send(
                    link,
                    scratch,
                    subject,
                    &env,
                    false,
                    shared.opts.request_timeout,
                )
                .await?;
                Ok(())
            }
            Out::Client => {
                let mut headers = to_header_map(&env.headers).map_err(SendError::Refused)?;
                if let Some(id) = env.headers.get(names::MESSAGE_ID) {
                    headers.insert("Nats-Msg-Id", id);
                }
                shared
                    .client
                    .publish_with_headers(subject.clone(), headers, env.payload)
                    .await
                    .map_err(|e| {
                        SendError::Failed(Error::with_source(
                            ErrorKind::Transport,
                            format!("{}: core publish", shared.where_()),
                            e,
                        ))
                    })
            }
        }
    }

    /// Waits until what was sent is written out (core publishes: the one confirmation).
    async fn flush(&self, shared: &Shared) -> Result<(), Error> {
        match self {
            Out::Wire(link, _) => link.flushed(link.queued()).await,
            Out::Client => shared.client.flush().await.map_err(|e| {
                Error::with_source(
                    ErrorKind::Transport,
                    format!("{}: flushing core publishes", shared.where_()),
                    e,
                )
            }),
        }
    }
}

/// One frame on the binding's own connection (a PubAck inbox with `ack`), then, when the
/// buffer is past its high-water mark, a wait for the writer.
async fn wire_send(
    link: &wire::Link,
    scratch: &mut Vec<u8>,
    subject: &Subject,
    env: &Envelope,
    ack: bool,
    limit: std::time::Duration,
) -> Result<Option<wire::AckWait>, SendError> {
    let (wait, full) = link
        .hpub(subject.as_str(), &env.headers, &env.payload, ack, scratch)
        .map_err(SendError::Refused)?;
    if full {
        link.room(limit).await.map_err(SendError::Failed)?;
    }
    Ok(wait)
}

/// Why a message was not sent.
pub(crate) enum SendError {
    /// The message cannot travel (a header NATS cannot carry, over `max_payload`).
    Refused(Error),
    /// The connection failed.
    Failed(Error),
    /// async-nats refused it.
    Client(async_nats::jetstream::context::PublishError),
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
    let mut out: Option<Out> = None;
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
        while pending.len() >= limit {
            let p = pending.pop_front().expect("non-empty");
            if let Some(e) = settle(shared, p, total, &mut violations, &mut outcomes).await {
                error = Some(e);
                break 'send;
            }
        }
        if out.is_none() {
            match Out::open(shared).await {
                Ok(o) => out = Some(o),
                Err(e) => {
                    error = Some(e);
                    break 'send;
                }
            }
        }
        let sender = out.as_mut().expect("opened");
        match sender.send(shared, &subject, env).await {
            Ok(ack) => pending.push_back(Pending {
                index,
                stream,
                topic,
                ack,
            }),
            Err(SendError::Refused(e)) => {
                error = Some(Error::new(
                    e.kind(),
                    format!("message {index}: {}", e.message()),
                ));
                break 'send;
            }
            Err(SendError::Failed(e)) => {
                error = Some(e);
                break 'send;
            }
            Err(SendError::Client(e)) => {
                let (kind, text) = (e.kind(), e.to_string());
                let (k, what) = client_send_error(shared, kind, text);
                error = Some(publish_error(
                    shared,
                    index,
                    total,
                    topic.as_str(),
                    k,
                    what,
                    Some(Box::new(e)),
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
    let limit = shared.opts.request_timeout;
    let ack = async move {
        match ack {
            AckOn::Wire(link, w) => link.await_ack(w, limit).await,
            AckOn::Client(f) => f
                .await
                .map(|a| PubAck {
                    stream: Arc::from(a.stream.as_str()),
                    sequence: a.sequence,
                    duplicate: a.duplicate,
                })
                .map_err(|e| client_ack_error(e.kind(), e.to_string())),
        }
    };
    let mut ack = std::pin::pin!(ack);
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
            if *a.stream != *stream.name {
                tracing::warn!(expected = %stream.name, got = %a.stream, subject = %subject, "nats: message stored in another stream than expected");
            }
            Ok(PublishReceipt {
                sequence: a.sequence,
                duplicate: a.duplicate,
            })
        }
        Err(e) => {
            if matches!(e, AckError::NoStream | AckError::TimedOut) {
                // The stream may have been deleted under us: look it up again next time.
                streams::invalidate(shared, topic.env(), topic.domain());
            }
            let (kind, what, outcome) = ack_failure(shared, e);
            Err((
                publish_error(shared, index, total, subject, kind, what, None),
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

/// What an async-nats send error means: its kind and text.
fn client_send_error(shared: &Shared, kind: PublishErrorKind, text: String) -> (ErrorKind, String) {
    if matches!(kind, PublishErrorKind::MaxPayloadExceeded) {
        return (
            ErrorKind::Payload,
            format!("message larger than the server's max_payload: {text}"),
        );
    }
    let (k, what, _) = ack_failure(shared, client_ack_error(kind, text));
    (k, what)
}

/// An async-nats publish error in the terms of the binding's own connection.
fn client_ack_error(kind: PublishErrorKind, text: String) -> AckError {
    match kind {
        PublishErrorKind::StreamNotFound => AckError::NoStream,
        PublishErrorKind::TimedOut => AckError::TimedOut,
        PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::MaxPayloadExceeded => AckError::Refused(text),
        PublishErrorKind::BrokenPipe => AckError::Lost(text),
        _ => AckError::Api(text),
    }
}

/// What a missing PubAck means: the error's kind and text, and the message's outcome (a
/// definite refusal is `Unsent`; a timeout, a lost connection or another API error `Unknown`).
fn ack_failure(shared: &Shared, e: AckError) -> (ErrorKind, String, PublishOutcome) {
    match e {
        AckError::NoStream => (
            ErrorKind::Transport,
            "no stream answered (stream deleted, or the server is unavailable)".to_owned(),
            PublishOutcome::Unsent,
        ),
        AckError::Refused(text) => (ErrorKind::Transport, text, PublishOutcome::Unsent),
        AckError::TimedOut => (
            ErrorKind::Timeout,
            format!("no PubAck within {:?}", shared.opts.request_timeout),
            PublishOutcome::Unknown,
        ),
        AckError::Lost(why) => (
            ErrorKind::Transport,
            format!("connection lost before the PubAck ({why})"),
            PublishOutcome::Unknown,
        ),
        AckError::Api(text) => (ErrorKind::Transport, text, PublishOutcome::Unknown),
    }
}

fn publish_error(
    shared: &Shared,
    index: usize,
    total: usize,
    subject: &str,
    kind: ErrorKind,
    what: String,
    source: Option<BoxError>,
) -> Error {
    let before = if index > 0 {
        format!("; the {index} messages before it were stored")
    } else {
        String::new()
    };
    let text = format!(
        "{}: publish of message {index} of {total} to `{subject}` failed: {what}{before}",
        shared.where_()
    );
    match source {
        Some(s) => Error::with_source(kind, text, s),
        None => Error::new(kind, text),
    }
}

/// Core publish of a batch (the best-effort tier; see `best_effort.rs`): every message
/// written, then one flush; a message is `Confirmed` once flushed (receipt sequence 0).
/// Bounded by `request_timeout` as a whole (a connection that cannot write — the server gone —
/// does not hold the caller).
pub(crate) async fn publish_core(shared: &Shared, batch: Vec<Envelope>) -> BatchOutcome {
    let total = batch.len();
    let deadline = tokio::time::Instant::now() + shared.opts.request_timeout;
    let mut outcomes = vec![PublishOutcome::Unsent; total];
    let mut handed = 0usize;
    let mut out: Option<Out> = None;
    // One timer for the whole batch; `handed` counts what was taken before it fired.
    let sent = tokio::time::timeout_at(deadline, async {
        let sender = out.insert(Out::open(shared).await?);
        let mut last: Option<Subject> = None;
        for (index, env) in batch.into_iter().enumerate() {
            let subject = match last.take() {
                Some(s) if s.as_str() == env.topic.as_str() => s,
                _ => Subject::from(env.topic.as_str()),
            };
            last = Some(subject.clone());
            match sender.send_core(shared, &subject, env).await {
                Ok(()) => handed += 1,
                Err(SendError::Refused(e)) => {
                    return Err(Error::new(
                        e.kind(),
                        format!("message {index}: {}", e.message()),
                    ));
                }
                Err(SendError::Failed(e)) => {
                    return Err(Error::new(
                        e.kind(),
                        format!("core publish of message {index}: {}", e.message()),
                    ));
                }
                Err(SendError::Client(e)) => {
                    return Err(Error::with_source(
                        ErrorKind::Transport,
                        format!("{}: core publish of message {index}", shared.where_()),
                        e,
                    ));
                }
            }
        }
        Ok::<(), Error>(())
    })
    .await;
    let mut error = match sent {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(core_timeout(shared, handed)),
    };
    let flushed = match &out {
        None => PublishOutcome::Unknown,
        Some(o) => match tokio::time::timeout_at(deadline, o.flush(shared)).await {
            Ok(Ok(())) => PublishOutcome::Confirmed(PublishReceipt {
                sequence: 0,
                duplicate: false,
            }),
            Ok(Err(e)) => {
                error.get_or_insert(e);
                PublishOutcome::Unknown
            }
            Err(_) => {
                error.get_or_insert(core_timeout(shared, handed));
                PublishOutcome::Unknown
            }
        },
    };
    outcomes[..handed].fill(flushed);
    BatchOutcome { outcomes, error }
}

fn core_timeout(shared: &Shared, index: usize) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "{}: core publish: message {index} not written within {:?} (the server is unreachable)",
            shared.where_(),
            shared.opts.request_timeout
        ),
    )
}
