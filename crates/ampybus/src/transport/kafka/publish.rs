//! Publishing: every record of a batch is handed to the idempotent producer in order (record
//! key = `partition_key`, headers = the contract headers plus `topic`) and every delivery
//! report is awaited, oldest first. The transport-wide semaphore (one permit per unconfirmed
//! record) bounds them to `max_in_flight` across concurrent batches; at the bound the oldest
//! report is awaited before the next record goes out.

use super::{Shared, TOPIC_HEADER, kafka_error, pack_offset};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::names;
use crate::transport::{BatchOutcome, PublishOutcome, PublishReceipt};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::producer::future_producer::DeliveryFuture;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// The record headers of an envelope: the contract headers, then `topic`.
pub(crate) fn record_headers(env: &Envelope) -> Result<OwnedHeaders> {
    let mut h = OwnedHeaders::new_with_capacity(env.headers.len() + 1);
    for (k, v) in env.headers.iter() {
        if k == TOPIC_HEADER {
            return Err(Error::new(
                ErrorKind::Header,
                format!(
                    "`{k}`: this name is reserved on Kafka (the record header holding the logical topic)"
                ),
            ));
        }
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    Ok(h.insert(Header {
        key: TOPIC_HEADER,
        value: Some(env.topic.as_bytes()),
    }))
}

/// Publishes with per-message outcomes: a record whose delivery report came is confirmed; a
/// failed report is unknown (librdkafka gave up; a timed-out record may still have been
/// written); after the first failure no further record is handed over (the rest stay
/// [`PublishOutcome::Unsent`]). With `settle_rest` the reports of the records already handed
/// over are then awaited; without it they count as unknown at once.
pub(crate) async fn publish_outcomes(
    shared: &Shared,
    batch: Vec<Envelope>,
    settle_rest: bool,
) -> BatchOutcome {
    if batch.is_empty() {
        return BatchOutcome::confirmed(Vec::new());
    }
    let total = batch.len();
    // The Kafka topic of each run of messages on one topic, named once per run; `run[i]` is
    // message i's.
    let mut topics: Vec<String> = Vec::new();
    let mut run: Vec<u32> = Vec::with_capacity(total);
    for (i, e) in batch.iter().enumerate() {
        if i == 0 || batch[i - 1].topic != e.topic {
            let t = shared.opts.kafka_topic(&e.topic);
            if topics.last() != Some(&t) {
                topics.push(t);
            }
        }
        run.push((topics.len() - 1) as u32);
    }
    let topic_of = |i: usize| topics[run[i] as usize].as_str();
    if let Err(e) = shared.ensure_topics(&topics).await {
        return BatchOutcome::all(total, PublishOutcome::Unsent, e);
    }
    let mut outcomes = vec![PublishOutcome::Unsent; total];
    let mut error: Option<Error> = None;
    // A sliding window: one permit per unconfirmed record (shared by concurrent batches, so
    // the bound holds across them), released when its delivery report arrived; reports are
    // awaited oldest first, so a huge batch streams instead of draining in chunks.
    let mut pending: VecDeque<(usize, DeliveryFuture, OwnedSemaphorePermit)> = VecDeque::new();
    'send: for (i, env) in batch.iter().enumerate() {
        let permit = match shared.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // At the bound: our own oldest report frees a permit soonest.
                if let Some((j, f, p)) = pending.pop_front() {
                    let r = settle(shared, topic_of(j), f).await;
                    drop(p);
                    if !record(&mut outcomes, &mut error, j, r) {
                        break 'send;
                    }
                }
                match shared.permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => {
                        error = Some(Error::new(
                            ErrorKind::Closed,
                            "kafka: the transport is closed",
                        ));
                        break 'send;
                    }
                }
            }
        };
        let headers = match record_headers(env) {
            Ok(h) => h,
            Err(e) => {
                error = Some(e);
                break 'send;
            }
        };
        let key = env.headers.get(names::PARTITION_KEY).unwrap_or("");
        let mut record_ = FutureRecord::to(topic_of(i))
            .payload(env.payload.as_ref())
            .key(key)
            .headers(headers);
        loop {
            match shared.producer.send_result(record_) {
                Ok(f) => {
                    pending.push_back((i, f, permit));
                    break;
                }
                Err((e, back)) => {
                    use rdkafka::types::RDKafkaErrorCode;
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) {
                        // The local queue is full: wait for the oldest report, then retry.
                        record_ = back;
                        if let Some((j, f, p)) = pending.pop_front() {
                            let r = settle(shared, topic_of(j), f).await;
                            drop(p);
                            if !record(&mut outcomes, &mut error, j, r) {
                                break 'send;
                            }
                        } else {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        continue;
                    }
                    error = Some(kafka_error(
                        &shared.where_(),
                        &format!("publish to `{}`", topic_of(i)),
                        e,
                    ));
                    break 'send;
                }
            }
        }
    }
    for (j, f, p) in pending {
        if error.is_some() && !settle_rest {
            outcomes[j] = PublishOutcome::Unknown;
            continue;
        }
        let r = settle(shared, topic_of(j), f).await;
        drop(p);
        record(&mut outcomes, &mut error, j, r);
    }
    BatchOutcome { outcomes, error }
}

/// Records one delivery report; `false` when it failed (the first failure is kept).
fn record(
    outcomes: &mut [PublishOutcome],
    error: &mut Option<Error>,
    j: usize,
    r: Result<PublishReceipt>,
) -> bool {
    match r {
        Ok(r) => {
            outcomes[j] = PublishOutcome::Confirmed(r);
            true
        }
        Err(e) => {
            outcomes[j] = PublishOutcome::Unknown;
            error.get_or_insert(e);
            false
        }
    }
}

async fn settle(shared: &Shared, topic: &str, f: DeliveryFuture) -> Result<PublishReceipt> {
    match f.await {
        Ok(Ok(d)) => Ok(PublishReceipt {
            sequence: pack_offset(d.partition, d.offset),
            duplicate: false,
        }),
        Ok(Err((e, _))) => Err(kafka_error(
            &shared.where_(),
            &format!("delivery to `{topic}` failed"),
            e,
        )),
        Err(_) => Err(Error::new(
            ErrorKind::Closed,
            format!(
                "{}: delivery to `{topic}`: the producer went away before reporting",
                shared.where_()
            ),
        )),
    }
}
