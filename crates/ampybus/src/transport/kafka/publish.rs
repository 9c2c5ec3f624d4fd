//! Publishing: every record of a batch is handed to the idempotent producer in order (record
//! key = `partition_key`, headers = the contract headers plus `topic`) and every delivery
//! report is awaited, oldest first. The transport-wide semaphore (one permit per unconfirmed
//! record) bounds them to `max_in_flight` across concurrent batches; at the bound the oldest
//! report is awaited before the next record goes out.

use super::{Shared, TOPIC_HEADER, kafka_error, pack_offset};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::names;
use crate::transport::PublishReceipt;
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

pub(crate) async fn publish_batch(
    shared: &Shared,
    batch: Vec<Envelope>,
) -> Result<Vec<PublishReceipt>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let topics: Vec<String> = batch
        .iter()
        .map(|e| shared.opts.kafka_topic(&e.topic))
        .collect();
    shared.ensure_topics(&topics).await?;
    let mut receipts = Vec::with_capacity(batch.len());
    // A sliding window: one permit per unconfirmed record (shared by concurrent batches, so
    // the bound holds across them), released when its delivery report arrived; reports are
    // awaited oldest first, so a huge batch streams instead of draining in chunks.
    let mut pending: VecDeque<(usize, DeliveryFuture, OwnedSemaphorePermit)> = VecDeque::new();
    for (i, env) in batch.iter().enumerate() {
        let permit =
            match shared.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // At the bound: our own oldest report frees a permit soonest.
                    if let Some((j, f, p)) = pending.pop_front() {
                        receipts.push((j, settle(shared, &topics[j], f).await?));
                        drop(p);
                    }
                    shared.permits.clone().acquire_owned().await.map_err(|_| {
                        Error::new(ErrorKind::Closed, "kafka: the transport is closed")
                    })?
                }
            };
        let headers = record_headers(env)?;
        let key = env.headers.get(names::PARTITION_KEY).unwrap_or("");
        let mut record = FutureRecord::to(&topics[i])
            .payload(env.payload.as_ref())
            .key(key)
            .headers(headers);
        loop {
            match shared.producer.send_result(record) {
                Ok(f) => {
                    pending.push_back((i, f, permit));
                    break;
                }
                Err((e, back)) => {
                    use rdkafka::types::RDKafkaErrorCode;
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) {
                        // The local queue is full: wait for the oldest report, then retry.
                        record = back;
                        if let Some((j, f, p)) = pending.pop_front() {
                            receipts.push((j, settle(shared, &topics[j], f).await?));
                            drop(p);
                        } else {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        continue;
                    }
                    return Err(kafka_error(
                        &shared.where_(),
                        &format!("publish to `{}`", topics[i]),
                        e,
                    ));
                }
            }
        }
    }
    for (j, f, p) in pending {
        receipts.push((j, settle(shared, &topics[j], f).await?));
        drop(p);
    }
    receipts.sort_by_key(|(i, _)| *i);
    Ok(receipts.into_iter().map(|(_, r)| r).collect())
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
