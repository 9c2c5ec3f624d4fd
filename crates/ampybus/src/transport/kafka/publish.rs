//! Publishing: every record of a batch is handed to the idempotent producer in order (record
//! key = `partition_key`, headers = the contract headers plus `topic`), then every delivery
//! report is awaited in order. The transport-wide semaphore bounds unconfirmed records to
//! `max_in_flight` across concurrent batches.

use super::{Shared, TOPIC_HEADER, kafka_error, pack_offset};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::names;
use crate::transport::PublishReceipt;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::producer::future_producer::DeliveryFuture;
use std::time::Duration;

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
    // Chunks no larger than the in-flight bound, so one huge batch cannot wait forever.
    let chunk = shared.opts.max_in_flight.max(1);
    let mut start = 0;
    while start < batch.len() {
        let end = (start + chunk).min(batch.len());
        let n = (end - start) as u32;
        let _permits = shared
            .permits
            .acquire_many(n)
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "kafka: the transport is closed"))?;
        let mut pending: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(n as usize);
        for i in start..end {
            let env = &batch[i];
            let headers = record_headers(env)?;
            let key = env.headers.get(names::PARTITION_KEY).unwrap_or("");
            let mut record = FutureRecord::to(&topics[i])
                .payload(env.payload.as_ref())
                .key(key)
                .headers(headers);
            loop {
                match shared.producer.send_result(record) {
                    Ok(f) => {
                        pending.push((i, f));
                        break;
                    }
                    Err((e, back)) => {
                        use rdkafka::types::RDKafkaErrorCode;
                        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) {
                            // The local queue is full: wait for the oldest report, then retry.
                            record = back;
                            if let Some((j, f)) = (!pending.is_empty()).then(|| pending.remove(0)) {
                                receipts.push((j, settle(shared, &topics[j], f).await?));
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
        for (j, f) in pending {
            receipts.push((j, settle(shared, &topics[j], f).await?));
        }
        start = end;
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
